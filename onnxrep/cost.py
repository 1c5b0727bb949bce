"""Shapes and cost of a model: shapes the passes may rely on, multiply-accumulates and weight counts.

Shapes come from evidence, not from what a model declares:

* onnx shape inference runs on a copy of the model without its ``value_info`` and with the graph
  outputs' (and subgraph outputs') shapes cleared: a declared dim that went stale (a model made
  dynamic by editing its inputs only, still saying batch 1 inside) does not reach the passes. The
  graph inputs' declared shapes are the contract and stay; ``value_info`` entries of graph inputs
  never override them.
* onnx infers some shapes differently from the runtime: MaxPool / AveragePool / LpPool with
  ``ceil_mode=1`` (onnxruntime drops a last window that would start in the end padding), auto_pad
  SAME with dilations (onnxruntime pads for the undilated kernel), and a kernel smaller than the
  stride. Unless every op of the model is one whose inference agrees with onnxruntime
  (``ops.SHAPE_INFERENCE_AGREES``: element-wise ops, Conv, BN, linear layers, Concat, Flatten,
  Transpose, global pools, Reshape to a constant shape; and the windowed pools, recomputed below),
  and when the model is small enough (:data:`RUNTIME_EVIDENCE_BYTES` of tensor data), it runs
  in onnxruntime (graph optimizations off) with every tensor of the main graph as an output, at the
  declared input shapes, with symbolic dims set to two different assignments where it has any
  (batch 1 and 2; 32 and 37 elsewhere): a dim stays a static int only where onnx infers an int and
  the runs agree (two runs that agree with each other but not with onnx give their value; one run
  that disagrees with onnx gives an unknown dim); a dim onnx calls symbolic stays symbolic unless
  the runs give one name different values; a tensor whose shape changed makes every tensor computed
  from it that the runs did not observe unknown.
* Before that, and whether or not the model runs, the pools' output shapes are recomputed with
  onnxruntime's exact formula (:func:`pool_output_size`): in the main graph, a pool whose output
  onnx infers differently has that output made a graph input of the exact shape and inference runs
  again from there (round by round, downstream pools after upstream ones); in subgraph bodies,
  which cannot be cut so, the pool's output takes the exact shape and every shape computed from it
  becomes unknown (as does every body tensor computed from an enclosing value whose shape changed).
  Larger models and models onnxruntime cannot load or run get only this.

Where a declared shape (``value_info``, graph outputs, a graph input's ``value_info``) contradicts
the evidence, the contradiction is recorded (:class:`ShapeEvidence`, ``contradictions``).
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass, field
from math import prod

import onnx
import numpy as np
from onnx import helper, shape_inference

from . import ops
from .io import materialize, skeleton, tensor_bytes

#: Models with at most this many bytes of tensor data run in onnxruntime to confirm their shapes.
RUNTIME_EVIDENCE_BYTES = 64 << 20
#: ... and when every tensor of its main graph, as inferred, holds at most this many bytes together
#: at the larger of the two runs (symbolic dims at their value there, unknown dims counted as 1).
RUNTIME_EVIDENCE_ACTIVATIONS = 512 << 20
#: Values of symbolic input dims in the two runs: axis 0 (batch) and every other axis.
RUN_DIMS = ((1, 32), (2, 37))

#: Pooling ops whose output size :func:`pool_output_size` computes as onnxruntime does.
WINDOW_POOLS = frozenset({ops.MAX_POOL, ops.AVERAGE_POOL, ops.LP_POOL})


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Shapes of every tensor (ints, strings for symbolic dims, None unknown), without running the
    model (see :func:`infer_evidence`)."""
    return infer(model, runtime=False)[0]


def infer(model: onnx.ModelProto, runtime: bool = True) -> tuple[dict[str, tuple], dict[str, np.dtype]]:
    """Shapes (as :func:`infer_shapes`) and element types of the main graph's tensors, from
    evidence (:func:`infer_evidence`)."""
    evidence = infer_evidence(model, runtime=runtime)
    return evidence.shapes, evidence.dtypes


@dataclass
class ShapeEvidence:
    """Shapes and element types of a model's tensors as far as the evidence goes.

    ``shapes`` / ``dtypes``: the main graph's tensors (initializers included). ``contradictions``:
    declared shapes that the evidence contradicts, each ``{"tensor", "declared_in", "declared",
    "evidence"}`` (``"observed"`` too: the shapes onnxruntime gave, when it ran). ``method``:
    ``"onnxruntime"`` when the model ran, else ``"formula"``; ``note`` says why it did not run.
    ``bodies``: shapes and types of the tensors of each subgraph body, by its path
    (``((node index, attribute name, index in a GRAPHS list or None), ...)`` from the main graph).
    ``changed``: main-graph tensors whose shape differs from what onnx inferred."""

    shapes: dict[str, tuple]
    dtypes: dict[str, np.dtype]
    contradictions: list[dict] = field(default_factory=list)
    method: str = "formula"
    note: str = ""
    bodies: dict[tuple, tuple[dict, dict]] = field(default_factory=dict, repr=False)
    changed: set[str] = field(default_factory=set, repr=False)

    def to_dict(self) -> dict:
        out = {"method": self.method, "contradictions": self.contradictions}
        if self.note:
            out["note"] = self.note
        return out


def infer_evidence(model: onnx.ModelProto, runtime: bool = True) -> ShapeEvidence:
    """Shapes the passes may rely on (see the module docstring). With ``runtime=False`` the model
    is not run (only the formulas correct onnx's inference)."""
    inferred = _infer_stripped(model)
    g = inferred.graph
    shapes, dtypes = graph_types(g)
    for name in [n for n in shapes if n.endswith(_CUT)]:
        del shapes[name]
    for name in [n for n in dtypes if n.endswith(_CUT)]:
        del dtypes[name]
    elem = _elem_types(g)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    onnx_shapes = dict(shapes)
    runs: list[dict[str, tuple]] = []
    note = ""
    if runtime:
        runs, note = _observe(model, elem, onnx_shapes)
    else:
        note = "not run"
    observed: set[str] = set()
    changed: set[str] = set()
    if runs:
        names = set(runs[0])
        for run in runs[1:]:
            names &= set(run)
        names -= {i.name for i in model.graph.initializer}
        for name in names:
            if name in onnx_shapes:
                settled = _settle_dims(onnx_shapes[name], [run[name] for run in runs])
                observed.add(name)
                if settled != onnx_shapes[name]:
                    changed.add(name)
                    if settled is None:
                        shapes.pop(name, None)
                    else:
                        shapes[name] = settled
        _symbols_consistent(shapes, runs, observed, changed)
    bodies: dict[tuple, tuple[dict, dict]] = {}
    _settle_graph(g, shapes, observed, changed, bodies, ())
    contradictions = _contradictions(model, shapes, runs)
    return ShapeEvidence(shapes, dtypes, contradictions, "onnxruntime" if runs else "formula", note, bodies, changed)


# --------------------------------------------------------------------------------------------
# onnx inference on a copy without declared intermediate shapes
# --------------------------------------------------------------------------------------------


def _strip(graph: onnx.GraphProto) -> None:
    del graph.value_info[:]
    for out in graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                _strip(attr.g)
            for sub in attr.graphs:
                _strip(sub)


#: Suffix of the renamed output of a pooling node whose output became a graph input in
#: :func:`_infer_stripped` (onnx's inference then starts from the exact shape).
_CUT = "\x00onnxrep.cut"


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is advisory: an op it does not know leaves shapes unknown
        return model


def _infer_stripped(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference on the model's :func:`~onnxrep.io.skeleton` with every ``value_info``
    removed and graph (and subgraph) outputs' shapes cleared: only the graph inputs' declared
    shapes and the operators' own rules count. A main-graph pooling node whose output onnx infers
    differently from :func:`_pool_shape` has its output made a graph input of the exact shape
    (the node's own output renamed), and inference runs again from there."""
    light = skeleton(model)
    _strip(light.graph)
    inferred = _infer(light)
    pools = [i for i, n in enumerate(light.graph.node) if n.op_type in WINDOW_POOLS and n.domain in ops.DEFAULT_DOMAINS]
    for _ in range(len(pools)):
        shapes, _ = graph_types(inferred.graph)
        elem = _elem_types(inferred.graph)
        cuts = []
        dirty: set[str] = set()  # computed from a shape corrected in this round: settled next round
        pool_ids = set(pools)
        for i, node in enumerate(light.graph.node):
            reads = {n for n in node.input if n}
            for _, _, sub in _subgraphs(node):
                reads |= _outer_reads(sub)
            if reads & dirty:
                dirty.update(o for o in node.output if o)
                continue
            if i not in pool_ids or not node.input or not node.output or node.output[0].endswith(_CUT):
                continue
            exact = _pool_shape(node, shapes.get(node.input[0]))
            got = shapes.get(node.output[0])
            if exact == got or (exact is None and (got is None or not any(isinstance(d, int) for d in got[2:]))):
                continue
            if exact is None:  # the rank and the leading dims are right, the rest is unknown
                exact = tuple(got[:2]) + (None,) * (len(got) - 2)
            names = [o for o in node.output if o]
            if all(o in elem for o in names):
                cuts.append((node, names, exact, elem))
                dirty.update(names)
        if not cuts:
            break
        for node, names, exact, elem in cuts:
            for j, o in enumerate(node.output):
                if o:
                    node.output[j] = o + _CUT
                    light.graph.input.append(helper.make_tensor_value_info(o, elem[o], list(exact)))
        inferred = _infer(light)
    return inferred


def _vi_dims(vi: onnx.ValueInfoProto) -> tuple | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)


def graph_types(graph: onnx.GraphProto) -> tuple[dict[str, tuple], dict[str, np.dtype]]:
    """Shapes and element types a graph's inputs, value_info and outputs give (its own only, not
    its subgraphs'); initializers' shapes from their dims."""
    shapes: dict[str, tuple] = {}
    dtypes: dict[str, np.dtype] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.WhichOneof("value") != "tensor_type":
            continue
        t = vi.type.tensor_type
        if t.elem_type:
            try:
                dtypes[vi.name] = helper.tensor_dtype_to_np_dtype(t.elem_type)
            except Exception:  # noqa: BLE001 - a type numpy cannot hold: leave it unknown
                pass
        dims = _vi_dims(vi)
        if dims is not None:
            shapes[vi.name] = dims
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes, dtypes


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    out = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.elem_type:
            out[vi.name] = vi.type.tensor_type.elem_type
    return out


# --------------------------------------------------------------------------------------------
# runtime evidence
# --------------------------------------------------------------------------------------------


def _input_dims(model: onnx.ModelProto) -> tuple[set[str], bool]:
    """(dim_params of the graph inputs on axes other than 0, whether any input dim is symbolic)."""
    inits = {i.name for i in model.graph.initializer}
    others, symbolic = set(), False
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if not (d.HasField("dim_value") and d.dim_value > 0):
                symbolic = True
                if axis and d.dim_param:
                    others.add(d.dim_param)
    return others, symbolic


def _observe(model: onnx.ModelProto, elem: dict[str, int], onnx_shapes: dict) -> tuple[list[dict], str]:
    """The shapes of the main graph's tensors in one or two onnxruntime runs; [] and a reason
    when the model is too large or does not run."""
    from .equivalence import random_inputs, reference_session  # equivalence imports this module's users

    if _inference_agrees(model):
        return [], "not run: onnx's shape inference of each of its ops agrees with onnxruntime"
    size = tensor_bytes(model)
    if size > RUNTIME_EVIDENCE_BYTES:
        return [], f"not run: {size} bytes of tensor data > {RUNTIME_EVIDENCE_BYTES}"
    held = _activation_bytes(model, elem, onnx_shapes)
    if held > RUNTIME_EVIDENCE_ACTIVATIONS:
        return [], f"not run: its tensors would hold about {held} bytes > {RUNTIME_EVIDENCE_ACTIVATIONS}"
    run = onnx.ModelProto()
    run.CopyFrom(model)
    materialize(run)
    g = run.graph
    del g.value_info[:]
    for out in g.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    present = {o.name for o in g.output}
    for node in g.node:
        for name in node.output:
            if name and name not in present and name in elem:
                g.output.append(helper.make_tensor_value_info(name, elem[name], None))
                present.add(name)
    try:
        session = reference_session(run, log_severity=4)
    except Exception as err:  # noqa: BLE001 - any failure: no runtime evidence
        return [], f"not run: onnxruntime does not load the model ({type(err).__name__})"
    del run
    names = [o.name for o in session.get_outputs()]
    others, symbolic = _input_dims(model)

    def attempt(seed: int, batch: int, other: int | None) -> dict[str, tuple] | None:
        dims = {name: other for name in others} if other is not None else {}
        try:
            values = session.run(names, random_inputs(model, seed, dims, batch=batch))
        except Exception:  # noqa: BLE001 - this assignment does not run
            return None
        return {n: tuple(int(d) for d in v.shape) for n, v in zip(names, values) if isinstance(v, np.ndarray)}

    (b1, o1), (b2, o2) = RUN_DIMS
    first = attempt(0, b1, None)
    if first is None:
        return [], "not run: onnxruntime fails on the declared input shapes"
    runs = [first]
    disagrees = any(
        name in first and _int_dims_differ(shape, first[name]) for name, shape in onnx_shapes.items()
    )
    if symbolic or disagrees:
        second = attempt(1, b2, o2) if others else None
        if second is None:
            second = attempt(1, b2, None)
        if second is not None:
            runs.append(second)
    return runs, ""


def _inference_agrees(model: onnx.ModelProto) -> bool:
    """True when every node of the main graph is an op of ``ops.SHAPE_INFERENCE_AGREES`` (a
    Reshape too, when it reads a constant shape) and none holds a subgraph."""
    constants = {i.name for i in model.graph.initializer} - {i.name for i in model.graph.input}
    for node in model.graph.node:
        if node.domain not in ops.DEFAULT_DOMAINS or any(True for _ in _subgraphs(node)):
            return False
        if node.op_type == ops.CONSTANT:
            constants.update(node.output)
        elif node.op_type == ops.RESHAPE:
            if len(node.input) < 2 or node.input[1] not in constants:
                return False
        elif node.op_type not in ops.SHAPE_INFERENCE_AGREES:
            return False
    return True


def _activation_bytes(model: onnx.ModelProto, elem: dict[str, int], shapes: dict) -> int:
    batch, other = RUN_DIMS[1]
    total = 0
    for node in model.graph.node:
        for name in node.output:
            shape, kind = shapes.get(name), elem.get(name)
            if shape is None or kind is None:
                continue
            try:
                itemsize = helper.tensor_dtype_to_np_dtype(kind).itemsize
            except Exception:  # noqa: BLE001 - a type numpy cannot hold
                itemsize = 8
            n = 1
            for axis, d in enumerate(shape):
                n *= d if isinstance(d, int) else (batch if axis == 0 and d is not None else other if d else 1)
            total += n * itemsize
    return total


def _int_dims_differ(shape: tuple | None, seen: tuple) -> bool:
    if shape is None:
        return False
    return len(shape) != len(seen) or any(isinstance(d, int) and d != s for d, s in zip(shape, seen))


def _settle_dims(inferred: tuple | None, seen: list[tuple]) -> tuple | None:
    """One tensor's shape from onnx's inference and the shapes of the runs (see the module
    docstring); None when the rank is not settled."""
    if inferred is None:
        return None
    if any(len(s) != len(inferred) for s in seen):
        return None
    out = []
    for axis, d in enumerate(inferred):
        values = {s[axis] for s in seen}
        if isinstance(d, int):
            if len(values) != 1:
                out.append(None)
            elif len(seen) > 1 or d in values:
                out.append(next(iter(values)))
            else:
                out.append(None)
        else:
            out.append(d)
    return tuple(out)


def _symbols_consistent(shapes: dict, runs: list[dict], observed: set, changed: set) -> None:
    """A symbolic dim name that the runs give two values within one run is unknown wherever it
    stands."""
    bad: set[str] = set()
    for run in runs:
        values: dict[str, set] = {}
        for name in observed:
            shape = shapes.get(name)
            if shape is None or name not in run or len(run[name]) != len(shape):
                continue
            for d, v in zip(shape, run[name]):
                if isinstance(d, str):
                    values.setdefault(d, set()).add(v)
        bad |= {k for k, v in values.items() if len(v) > 1}
    if not bad:
        return
    for name, shape in list(shapes.items()):
        if any(isinstance(d, str) and d in bad for d in shape):
            shapes[name] = tuple(None if isinstance(d, str) and d in bad else d for d in shape)
            changed.add(name)


# --------------------------------------------------------------------------------------------
# exact formulas, and what follows from a corrected shape
# --------------------------------------------------------------------------------------------


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _div0(a: int, b: int) -> int:
    """``a / b`` rounded toward zero, as C++ divides integers."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def pool_output_size(size: int, kernel: int, stride: int, dilation: int, head: int, tail: int,
                     ceil_mode: bool, auto_pad: str = "NOTSET") -> int | None:
    """Output length of one axis of MaxPool / AveragePool / LpPool as onnxruntime computes it;
    None where it would be negative (onnxruntime refuses the node)."""
    if auto_pad == "VALID":
        head = tail = 0
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        # onnxruntime pads for the undilated kernel, and lets the padding go negative
        need = (-(-size // stride) - 1) * stride + kernel - size
        head = _div0(need, 2) if auto_pad == "SAME_UPPER" else _div0(need + 1, 2)
        tail = need - head
    elif auto_pad != "NOTSET":
        return None
    span = size + head + tail - dilation * (kernel - 1) - 1
    if ceil_mode:
        out = -(-span // stride) + 1
        if (out - 1) * stride >= size + head:  # the last window would start in the end padding
            out -= 1
    else:
        out = _div0(span, stride) + 1
    return out if out >= 0 else None


def _pool_shape(node: onnx.NodeProto, shape: tuple | None) -> tuple | None:
    """The exact output shape of a pooling node reading ``shape``, or None when it is not static."""
    kernel = list(_attr(node, "kernel_shape", []))
    rank = len(kernel)
    if shape is None or len(shape) != rank + 2 or not rank:
        return None
    strides = list(_attr(node, "strides", [1] * rank))
    dilations = list(_attr(node, "dilations", [1] * rank))
    pads = list(_attr(node, "pads", [0] * (2 * rank)))
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    ceil_mode = bool(_attr(node, "ceil_mode", 0))
    if len(strides) != rank or len(dilations) != rank or len(pads) != 2 * rank:
        return None
    out = list(shape[:2])
    for i, size in enumerate(shape[2:]):
        if not isinstance(size, int):
            return None
        n = pool_output_size(size, kernel[i], strides[i], dilations[i], pads[i], pads[i + rank], ceil_mode, auto_pad)
        if n is None:
            return None
        out.append(n)
    return tuple(out)


def _subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.name, None, attr.g
        for i, sub in enumerate(attr.graphs):
            yield attr.name, i, sub


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    names: set[str] = set()
    for node in graph.node:
        names.update(n for n in node.input if n and n not in defined)
        for _, _, sub in _subgraphs(node):
            names |= _outer_reads(sub) - defined
        defined.update(node.output)
    return names


def _settle_graph(graph: onnx.GraphProto, shapes, observed: set, changed: set, bodies: dict, path: tuple) -> bool:
    """Correct pool output shapes with :func:`_pool_shape` and make unknown every shape computed
    from a changed one (tensors in ``observed`` are known from the runs and stay); bodies are
    settled into ``bodies`` by path. True when something of this graph changed."""
    any_change = False
    for index, node in enumerate(graph.node):
        outs = [o for o in node.output if o]
        reads = {n for n in node.input if n}
        body_changed = False
        for attr, i, sub in _subgraphs(node):
            reads |= _outer_reads(sub)
            own_shapes, own_dtypes = graph_types(sub)
            key = path + ((index, attr, i),)
            inner = set(changed)
            scope = ChainMap(own_shapes, shapes)
            if _settle_graph(sub, scope, set(), inner, bodies, key):
                body_changed = True
            bodies[key] = (own_shapes, own_dtypes)
        if body_changed or reads & changed:
            for o in outs:
                if o not in observed:
                    shapes.pop(o, None)
                    changed.add(o)
                    any_change = True
            continue
        if node.op_type in WINDOW_POOLS and node.domain in ops.DEFAULT_DOMAINS and node.input and not any(
            o.endswith(_CUT) for o in outs
        ):
            exact = _pool_shape(node, shapes.get(node.input[0]))
            for o in outs:
                if o in observed or shapes.get(o) == exact:
                    continue
                if exact is None:
                    if o not in shapes or not any(isinstance(d, int) for d in shapes[o][2:]):
                        continue  # nothing static was claimed
                    shapes.pop(o, None)
                else:
                    shapes[o] = exact
                changed.add(o)
                any_change = True
    return any_change


# --------------------------------------------------------------------------------------------
# declared shapes against the evidence
# --------------------------------------------------------------------------------------------


def _contradicts(declared: tuple, evidence: tuple | None, seen: list[tuple], symbols: set[str]) -> bool:
    if seen and any(len(s) != len(declared) for s in seen):
        return True
    if evidence is not None and len(evidence) != len(declared):
        return True
    for axis, d in enumerate(declared):
        if not isinstance(d, int):
            continue
        if any(s[axis] != d for s in seen):
            return True
        e = evidence[axis] if evidence is not None else None
        if isinstance(e, int) and e != d:
            return True
        if isinstance(e, str) and e in symbols:  # declared static, depends on an input's dim
            return True
    return False


def _contradictions(model: onnx.ModelProto, shapes: dict, runs: list[dict]) -> list[dict]:
    g = model.graph
    inputs = {vi.name: _vi_dims(vi) for vi in g.input}
    symbols = {d.dim_param for vi in g.input if vi.type.HasField("tensor_type")
               for d in vi.type.tensor_type.shape.dim if d.dim_param}
    out = []
    for where, infos in (("value_info", g.value_info), ("output", g.output)):
        for vi in infos:
            if vi.type.WhichOneof("value") != "tensor_type":
                continue
            declared = _vi_dims(vi)
            if declared is None:
                continue
            if where == "value_info" and vi.name in inputs:
                evidence, seen, where_ = inputs[vi.name], [], "input value_info"
                bad = evidence is not None and (len(evidence) != len(declared) or any(
                    isinstance(d, int) and d != e for d, e in zip(declared, evidence)))
            else:
                evidence, where_ = shapes.get(vi.name), where
                seen = [run[vi.name] for run in runs if vi.name in run]
                bad = _contradicts(declared, evidence, seen, symbols)
            if bad:
                entry = {"tensor": vi.name, "declared_in": where_, "declared": list(declared),
                         "evidence": None if evidence is None else list(evidence)}
                if seen:
                    entry["observed"] = [list(s) for s in seen]
                out.append(entry)
    return out


@dataclass
class Cost:
    """Multiply-accumulates of one inference (symbolic dims counted as 1), weight elements, and the
    elements of the intermediate tensors (what the nodes compute that is no graph output: each is
    written once and read at least once, so twice this is a lower bound of the activation traffic
    of one inference besides the weights read)."""

    macs: int
    params: int
    exact: bool  # False when some shape was symbolic or unknown
    activations: int = 0
    activations_exact: bool = False

    def to_dict(self) -> dict:
        return {"macs": self.macs, "params": self.params, "macs_exact": self.exact,
                "activations": self.activations, "activations_exact": self.activations_exact}

    def traffic(self, weights: int) -> int:
        """Elements moved by one inference at the least: ``weights`` read once, each intermediate
        tensor written once and read once."""
        return weights + 2 * self.activations


def _dims(shape) -> tuple[int, bool]:
    if shape is None:
        return 0, False
    exact = all(isinstance(d, int) and d > 0 for d in shape)
    return prod(d if isinstance(d, int) and d > 0 else 1 for d in shape), exact


def model_cost(model: onnx.ModelProto, shapes: dict[str, tuple] | None = None) -> Cost:
    """MACs of Conv, ConvTranspose, Gemm and MatMul nodes, and the element count of float weights."""
    shapes = infer_shapes(model) if shapes is None else shapes
    init_dims = {i.name: tuple(i.dims) for i in model.graph.initializer}
    macs, exact = 0, True
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in (ops.CONV, "ConvTranspose") and len(node.input) > 1:
            # Conv: every output element reads Cin/g * prod(k) inputs. ConvTranspose: every input
            # element is scattered to Cout/g * prod(k) outputs. Both are prod(W.shape[1:]).
            w = shapes.get(node.input[1]) or init_dims.get(node.input[1])
            src = node.output[0] if node.op_type == ops.CONV else node.input[0]
            n, ok = _dims(shapes.get(src))
            if w is None or not n:
                exact = False
                continue
            macs += n * prod(w[1:])
            exact &= ok
        elif node.op_type in (ops.GEMM, ops.MATMUL) and len(node.input) > 1:
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            out_n, ok = _dims(shapes.get(node.output[0]))
            if a is None or b is None or not out_n or not a:
                exact = False
                continue
            trans_a = node.op_type == ops.GEMM and any(at.name == "transA" and at.i for at in node.attribute)
            k = a[0] if trans_a else a[-1]
            macs += int(out_n * (k if isinstance(k, int) else 1))
            exact &= ok and isinstance(k, int)
    params = sum(prod(i.dims) for i in model.graph.initializer if i.data_type in _FLOAT_TYPES)
    activations, act_exact = _activations(model.graph, shapes)
    return Cost(macs, params, exact, activations, act_exact)


def _activations(graph: onnx.GraphProto, shapes: dict[str, tuple]) -> tuple[int, bool]:
    """Elements of the tensors the main graph's nodes compute that are no graph output (Constant
    nodes' values count as weights, not here), and whether every shape was known."""
    outputs = {o.name for o in graph.output}
    total, exact = 0, True
    for node in graph.node:
        if node.op_type == ops.CONSTANT and node.domain in ops.DEFAULT_DOMAINS:
            continue
        for name in node.output:
            if not name or name in outputs:
                continue
            n, ok = _dims(shapes.get(name))
            total += n
            exact &= ok
    return total, exact


_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}
