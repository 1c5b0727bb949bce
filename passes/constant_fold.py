"""Constant fold: subgraphs that compute from constants only are evaluated once, by onnxruntime.

Pattern. A node is foldable when it is deterministic, has no subgraph, and every input is a
constant (initializer or Constant node) or the output of a foldable node; ``Shape`` and ``Size`` of
a tensor whose shape is fully static (``ctx.shape``) are foldable too, their value taken from that
shape. Identity nodes between foldable nodes go with them. A *frontier* tensor is a foldable node's
output read by a node that is not foldable (or a graph output). Each frontier tensor is computed
from the constants its subgraph reads and becomes an initializer. OREPA and ECB compute their
kernels in ``forward`` (scaling, padding, summing parameters), and TorchScript exports leave
Shape/Gather/Concat chains: both fold here, so the other passes see constant weights.

Evaluation. The values come from onnxruntime, the runtime the model is verified and deployed in:
a CPU session with graph optimizations off (:func:`onnxrep.equivalence.reference_session`) over a
model made of the constant subgraph, with the model's opset imports (an op means what it means at
the model's opset: Softmax before opset 13 normalizes over the flattened trailing axes) and the
constants it reads as initializers. So a folded value is bit for bit what the runtime computes for
that tensor in the original model: no other implementation's rounding, NaN handling or reading of
an op's attributes. One session evaluates all frontier tensors of a round (in groups of at most
:data:`GROUP_BYTES` of constants); a group that fails is split in halves until the tensor that
cannot be computed is alone, so that one failing op does not keep the others from folding.

Conditions (checked in this order):
  1. ``graph_output``  the tensor is not a graph output (its producer stays).
  2. ``tensor_value``  the value is a tensor: neither what the graph declares for it (value_info)
                       nor what the runtime computes is a sequence, map, optional or sparse
                       tensor, which an initializer cannot hold.
  3. ``no_growth``     the folded tensor is no larger than the constants it is computed from, or
                       at most 4 KiB: an Expand of a small constant into a huge tensor is not folded.
                       A tensor every reader of which is a Conv / ConvTranspose / Gemm reading it
                       as its bias only, no larger (elements and bytes) than each reader's
                       constant weight, folds whatever its size: dynamo's zero bias
                       ``Expand(CastLike(0, x), [Cout])`` of a conv with more than 1024 channels.
  4. ``evaluates``     onnxruntime computes it (the reason quotes the first line of its error): an
                       op it has no kernel for (bfloat16 arithmetic on the CPU) stays in the graph.
  5. ``type_agrees``   the computed element type and shape are those the graph declares or infers
                       for the tensor, where it does (symbolic dims agree with any length): a
                       constant that contradicts the graph's own typing is not written.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxrep import ops
from onnxrep.equivalence import reference_session
from onnxrep.errors import first_line
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, Plan, run_checks

from . import register

SMALL_BYTES = 4096
#: Bytes of constants one evaluation session reads at most (a group of frontier tensors).
GROUP_BYTES = 256 << 20
TENSOR_TYPE = "tensor_type"  # graphsurgeon's kind of a value declared as a tensor
NOT_A_TENSOR = np.zeros(0)  # the result of a value the runtime types as no tensor (``tensor_value``)


@dataclass(eq=False)
class Candidate:
    tensor: gs.Variable
    nodes: list[gs.Node]  # the subgraph computing it, in graph order
    shapes: dict[str, np.ndarray]  # Shape/Size outputs known from static shapes
    batch: "_Batch | None" = None  # the round's candidates, evaluated together
    result: np.ndarray | Exception | None = None  # the evaluation, once made
    kind: str = ""  # the runtime's type of the value ("tensor(float)", "seq(tensor(float))", ...)
    constants: dict[str, int] | None = None  # the constants its subgraph reads: name -> bytes
    inputs: dict[str, gs.Tensor] = field(default_factory=dict)  # and those tensors, by name


@dataclass
class _Batch:
    """The candidates of one round: the first one that needs its value evaluates all of them that
    may fold (one session per group, not one per tensor)."""

    candidates: list[Candidate] = field(default_factory=list)
    done: bool = False


def _static_shape(node: gs.Node, view: GraphView, ctx: Context) -> np.ndarray | None:
    """The value of a Shape or Size node whose input has a fully static shape."""
    shape = ctx.shape(view.source(node.inputs[0]))
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    if node.op == ops.SIZE:
        return np.array(int(np.prod(shape)), dtype=np.int64)
    start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
    return np.array(shape[start:end], dtype=np.int64)


def _has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) or (isinstance(v, list) and any(isinstance(s, gs.Graph) for s in v)) for v in node.attrs.values())


def _foldable(view: GraphView, ctx: Context) -> tuple[set[int], dict[str, np.ndarray]]:
    """Ids of foldable nodes and the values of foldable Shape/Size nodes (graph is topological)."""
    foldable: set[int] = set()
    known: set[int] = set()  # ids of tensors whose value is known without running the graph
    shapes: dict[str, np.ndarray] = {}
    for node in view.graph.nodes:
        if (node.domain or "") not in ops.DEFAULT_DOMAINS or node.op in ops.NONDETERMINISTIC or _has_subgraph(node):
            continue
        if node.op in (ops.CONSTANT, ops.IDENTITY):  # already constants to every pass
            continue
        if node.op in (ops.SHAPE, ops.SIZE) and len(node.outputs) == 1:
            value = _static_shape(node, view, ctx)
            if value is not None:
                shapes[node.outputs[0].name] = value
                foldable.add(id(node))
                known.add(id(node.outputs[0]))
                continue
        inputs = [t for t in node.inputs if t is not None and t.name]
        if inputs and all(id(view.source(t)) in known or view.is_constant(t) for t in inputs):
            foldable.add(id(node))
            known.update(id(o) for o in node.outputs)
    return foldable, shapes


def _closure(
    tensor: gs.Tensor, view: GraphView, foldable: set[int], shapes: dict[str, np.ndarray], order: dict[int, int]
) -> list[gs.Node]:
    """The nodes that compute ``tensor`` from constants, Identity nodes between them included, in
    graph order (``order``: node id -> position)."""
    needed: dict[int, gs.Node] = {}
    stack = [tensor]
    while stack:
        t = stack.pop()
        node = view._raw_producer(t)
        if node is None or id(node) in needed:
            continue
        if node.op == ops.IDENTITY and (node.domain or "") in ops.DEFAULT_DOMAINS:
            if view.is_constant(t):
                continue  # a constant read through Identity: an initializer of the subgraph
        elif id(node) not in foldable:
            continue
        needed[id(node)] = node
        if not (node.op in (ops.SHAPE, ops.SIZE) and node.outputs[0].name in shapes):
            stack.extend(i for i in node.inputs if i is not None and i.name)
    return sorted(needed.values(), key=lambda n: order[id(n)])


def _external_constants(c: Candidate, view: GraphView) -> dict[str, int]:
    """The constants the subgraph reads, by the name it reads them under, with their sizes in
    bytes (the values themselves are read from ``view`` when needed, not held)."""
    if c.constants is None:
        produced = {o.name for n in c.nodes for o in n.outputs}
        tensors = {}
        for node in c.nodes:
            if node.outputs[0].name in c.shapes:
                continue
            for t in node.inputs:
                if t is not None and t.name and t.name not in produced and t.name not in tensors:
                    tensors[t.name] = t
        c.constants = {name: int(np.asarray(view.constant(t)).nbytes) for name, t in tensors.items()}
        c.inputs = tensors
    return c.constants


# -- evaluation in onnxruntime ---------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def runtime_ir_version() -> int:
    """The newest IR version both onnx and onnxruntime read (probed once with a one-node model)."""
    graph = helper.make_graph(
        [helper.make_node(ops.CONSTANT, [], ["y"], value_float=1.0)], "probe", [],
        [helper.make_value_info("y", onnx.TypeProto())],
    )
    for ir in range(onnx.IR_VERSION, 3, -1):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = ir
        try:
            reference_session(model)
            return ir
        except Exception:  # noqa: BLE001 - too new for this onnxruntime: try the one before
            continue
    return onnx.IR_VERSION


def _initializer(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _subgraph_model(group: list[Candidate], view: GraphView, ctx: Context) -> onnx.ModelProto:
    """One model computing every tensor of ``group`` from its constants (initializers)."""
    nodes = list({id(n): n for c in group for n in c.nodes}.values())
    order = {id(n): i for i, n in enumerate(view.graph.nodes)}
    nodes.sort(key=lambda n: order[id(n)])
    inits: list[onnx.TensorProto] = []
    written: set[str] = set()
    for c in group:
        _external_constants(c, view)
        for name, value in [*((k, t) for k, t in c.inputs.items()), *c.shapes.items()]:
            if name not in written:
                written.add(name)
                inits.append(_initializer(name, value if isinstance(value, np.ndarray) else view.constant(value)))
    known = {k for c in group for k in c.shapes}  # Shape/Size values: initializers, not nodes
    protos = [OnnxExporter.export_node(n) for n in nodes if n.outputs[0].name not in known]
    outputs = [helper.make_value_info(c.tensor.name, onnx.TypeProto()) for c in group]
    graph = helper.make_graph(protos, "constant_fold", [], outputs, inits)
    model = helper.make_model(graph, opset_imports=list(ctx.opsets))
    model.ir_version = max(runtime_ir_version(), 3)
    return model


def _read(value) -> np.ndarray:
    """The array of an onnxruntime tensor output, exactly as the runtime holds it, for element
    types numpy has no type of its own for too (bfloat16, float8: ml_dtypes; 4-bit types)."""
    elem, shape = value.element_type(), tuple(value.shape())
    if elem == onnx.TensorProto.STRING:
        return np.asarray(value.numpy())
    proto = onnx.TensorProto(data_type=elem, dims=shape)
    size = value.tensor_size_in_bytes()
    proto.raw_data = ctypes.string_at(value.data_ptr(), size) if size else b""
    return numpy_helper.to_array(proto)


def _run(group: list[Candidate], view: GraphView, ctx: Context) -> None:
    """Evaluate ``group`` in one session; on failure, halves of it, down to single tensors."""
    try:
        model = _subgraph_model(group, view, ctx)
        session = reference_session(model)
        # the kinds from the session's own typing: an optional holding a tensor reads back as that
        # tensor, and an empty one must not be read at all
        kinds = {o.name: o.type for o in session.get_outputs()}
        tensors = [c for c in group if kinds.get(c.tensor.name, "").startswith("tensor(")]
        values = session.run_with_ort_values([c.tensor.name for c in tensors], {}) if tensors else []
        for c in group:
            c.kind = kinds.get(c.tensor.name, "unknown")
            c.result = NOT_A_TENSOR
        for c, v in zip(tensors, values):
            c.result = _read(v)
    except Exception as err:  # noqa: BLE001 - any failure: find the tensors that cause it
        if len(group) == 1:
            group[0].result = err
            return
        half = len(group) // 2
        _run(group[:half], view, ctx)
        _run(group[half:], view, ctx)


def _groups(batch: list[Candidate], view: GraphView) -> list[list[Candidate]]:
    """``batch`` cut into runs whose constants together are at most :data:`GROUP_BYTES`."""
    groups: list[list[Candidate]] = []
    seen: set[str] = set()
    size = 0
    for c in batch:
        own = _external_constants(c, view)
        extra = sum(n for k, n in own.items() if k not in seen)
        if groups and size + extra > GROUP_BYTES:
            groups.append([])
            seen, size = set(), 0
            extra = sum(own.values())
        if not groups:
            groups.append([])
        groups[-1].append(c)
        seen.update(own)
        size += extra
    return groups


def _evaluate(c: Candidate, view: GraphView, ctx: Context) -> np.ndarray | Exception:
    """The tensor's value (evaluated with the round's other candidates), or the exception."""
    if c.result is None:
        batch = c.batch
        pending = [c]
        if batch is not None and not batch.done:
            batch.done = True
            pending = [d for d in batch.candidates if d.result is None and (d is c or _worth_evaluating(d, view, ctx))]
        for group in _groups(pending, view):
            _run(group, view, ctx)
    return c.result


# -- conditions -----------------------------------------------------------------------------


def _check_output(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if view.escapes(c.tensor):
        return f"'{c.tensor.name}' is a graph output"
    return None


def _declared_kind(c: Candidate) -> str:
    return getattr(c.tensor, "type", TENSOR_TYPE) or TENSOR_TYPE


def _check_tensor(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    declared = _declared_kind(c)
    if declared != TENSOR_TYPE:
        return f"'{c.tensor.name}' is declared a {declared.replace('_type', '')}, not a tensor"
    if not _worth_evaluating(c, view, ctx):
        return None  # a tensor of a known size that ``no_growth`` declines: not computed at all
    value = _evaluate(c, view, ctx)
    if isinstance(value, Exception):
        return None  # reported by ``evaluates``
    if not c.kind.startswith("tensor("):
        return f"'{c.tensor.name}' is a {c.kind} value, not a tensor"
    return None


def _nbytes(c: Candidate, view: GraphView, ctx: Context) -> tuple[int, int]:
    """(bytes of the constants read, bytes of the result if its shape and type are known or -1)."""
    read = sum(_external_constants(c, view).values())
    shape, dtype = ctx.shape(c.tensor), _declared_dtype(c, ctx)
    if shape is None or not all(isinstance(d, int) for d in shape) or dtype is None:
        return read, -1
    return read, int(np.prod(shape)) * dtype.itemsize


def _too_large(read: int, out: int) -> bool:
    return out > max(read, SMALL_BYTES)


BIAS_READERS = (ops.CONV, ops.CONV_TRANSPOSE, ops.GEMM)


def _bias_bound(c: Candidate, view: GraphView) -> tuple[int, int] | None:
    """``(elements, bytes)`` of the smallest constant weight among the readers of ``c.tensor``
    when every reader is a Conv / ConvTranspose / Gemm that reads it as its bias (input 2) only,
    with a constant weight; None otherwise. A bias no larger than its layer's weight is allowed
    to grow from the constants it is computed from (dynamo's zero bias
    ``Expand(CastLike(0, x), [Cout])``): the folded layer holds that many numbers anyway."""
    users = view.users(c.tensor)
    if not users:
        return None
    bound = None
    for node in users:
        if node.op not in BIAS_READERS or len(node.inputs) < 3:
            return None
        if any(t is c.tensor for i, t in enumerate(node.inputs) if i != 2) or node.inputs[2] is not c.tensor:
            return None
        weight = view.constant(node.inputs[1]) if view.is_constant(node.inputs[1]) else None
        if weight is None:
            return None
        size = (int(weight.size), int(weight.nbytes))
        bound = size if bound is None else (min(bound[0], size[0]), min(bound[1], size[1]))
    return bound


def _grows(c: Candidate, view: GraphView, read: int, out: int, elements: int | None) -> bool:
    """``no_growth`` declines: the result is larger than the constants it is computed from (and
    than :data:`SMALL_BYTES`), unless it is a bias no larger than each reader's weight."""
    if not _too_large(read, out):
        return False
    bound = _bias_bound(c, view)
    return bound is None or elements is None or elements > bound[0] or out > bound[1]


def _elements(c: Candidate, ctx: Context) -> int | None:
    shape = ctx.shape(c.tensor)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return int(np.prod(shape))


def _worth_evaluating(c: Candidate, view: GraphView, ctx: Context) -> bool:
    """False when a condition before ``evaluates`` declines ``c`` without its value."""
    if view.escapes(c.tensor) or _declared_kind(c) != TENSOR_TYPE:
        return False
    read, out = _nbytes(c, view, ctx)
    return out < 0 or not _grows(c, view, read, out, _elements(c, ctx))


def _check_growth(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    read, out = _nbytes(c, view, ctx)
    elements = _elements(c, ctx)
    if out < 0:
        value = _evaluate(c, view, ctx)
        if isinstance(value, Exception):
            return None  # reported by ``evaluates``
        out, elements = value.nbytes, value.size
    if _grows(c, view, read, out, elements):
        return f"'{c.tensor.name}' would be a {out}-byte constant computed from {read} bytes"
    return None


def _check_evaluates(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    value = _evaluate(c, view, ctx)
    if isinstance(value, Exception):
        return f"'{c.tensor.name}' cannot be evaluated in onnxruntime ({type(value).__name__}: {first_line(value)})"
    return None


def _as_dtype(dtype) -> np.dtype | None:
    if dtype is None:
        return None
    try:
        if isinstance(dtype, int):
            return np.dtype(helper.tensor_dtype_to_np_dtype(dtype))
        return np.dtype(dtype)
    except Exception:  # noqa: BLE001 - not an element type numpy knows (an optional's TypeProto)
        return None


def _declared_dtype(c: Candidate, ctx: Context) -> np.dtype | None:
    """The element type the graph declares or infers for the tensor, if it names one."""
    return _as_dtype(c.tensor.dtype) or _as_dtype(ctx.dtypes.get(c.tensor.name))


def _typings(c: Candidate, ctx: Context):
    """``(source, dtype, shape)``: what the graph declares for the tensor (its value_info, as
    graphsurgeon read it) and what shape inference gives it (``ctx``), each None where unknown."""
    yield "declared", _as_dtype(c.tensor.dtype), c.tensor.shape
    yield "inferred", _as_dtype(ctx.dtypes.get(c.tensor.name)), ctx.shape(c.tensor)


def _check_type(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    value = _evaluate(c, view, ctx)
    assert isinstance(value, np.ndarray)  # after ``evaluates``
    for source, dtype, shape in _typings(c, ctx):
        if dtype is not None and dtype != value.dtype:
            return f"'{c.tensor.name}' is {source} {dtype} but evaluates to {value.dtype}"
        if shape is not None and (
            len(shape) != value.ndim or any(isinstance(d, int) and d != n for d, n in zip(shape, value.shape))
        ):
            return f"'{c.tensor.name}' has {source} shape {list(shape)} but evaluates to shape {list(value.shape)}"
    return None


CONDITIONS = [
    ("graph_output", _check_output),
    ("tensor_value", _check_tensor),
    ("no_growth", _check_growth),
    ("evaluates", _check_evaluates),
    ("type_agrees", _check_type),
]


@register
class ConstantFold:
    name = "constant-fold"
    summary = "subgraphs computed from constants only (OREPA kernels, shape chains) -> initializers"

    def match(self, view: GraphView, ctx: Context):
        foldable, shapes = _foldable(view, ctx)
        batch = _Batch()
        matches = []
        order = {id(n): i for i, n in enumerate(view.graph.nodes)}
        for node in view.graph.nodes:
            if id(node) not in foldable:
                continue
            for out in node.outputs:
                if not out.name:
                    continue
                users = view.users(out)
                if view.escapes(out) or any(id(u) not in foldable for u in users):
                    nodes = _closure(out, view, foldable, shapes, order)
                    sub = {n.outputs[0].name: shapes[n.outputs[0].name] for n in nodes if n.outputs[0].name in shapes}
                    c = Candidate(out, nodes, sub, batch)
                    batch.candidates.append(c)
                    matches.append(Match(out.name, [n for n in nodes if n.op != ops.IDENTITY], c))
        return matches

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return run_checks(CONDITIONS, match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> Plan:
        c: Candidate = match.data
        value = _evaluate(c, view, ctx)
        return Plan(c.tensor, [], f"{len(c.nodes)} node(s) -> constant {list(value.shape)}", constant=value)
