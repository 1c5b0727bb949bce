"""Constant fold: subgraphs that compute from constants only are evaluated once.

Pattern. A node is foldable when it is deterministic, has no subgraph, and every input is a
constant (initializer or Constant node) or the output of a foldable node; ``Shape`` and ``Size`` of
a tensor whose shape is fully static are foldable too. A *frontier* tensor is a foldable node's
output read by a node that is not foldable (or a graph output). Each frontier tensor is computed by
onnx's reference evaluator from the constants its subgraph reads and becomes an initializer.
OREPA and ECB compute their kernels in ``forward`` (scaling, padding, summing parameters), and
TorchScript exports leave Shape/Gather/Concat chains: both fold here, so the other passes see
constant weights.

Conditions (checked in this order):
  1. ``graph_output``  the tensor is not a graph output (its producer stays).
  2. ``no_growth``     the folded tensor is no larger than the constants it is computed from, or
                       at most 4 KiB: an Expand of a small constant into a huge tensor is not folded.
  3. ``evaluates``     the reference evaluator computes it.
Values are computed in the model's own dtypes, as the ops define them; no rounding is changed
beyond what evaluating the same ops elsewhere would do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper
from onnx.reference import ReferenceEvaluator
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxrep import ops
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, Plan, run_checks

from . import register

NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
)
SMALL_BYTES = 4096


@dataclass
class Candidate:
    tensor: gs.Variable
    nodes: list[gs.Node]  # the subgraph computing it, in graph order
    shapes: dict[str, np.ndarray]  # Shape/Size outputs known from static shapes
    result: np.ndarray | Exception | None = None  # the evaluation, once made


def _static_shape(node: gs.Node, view: GraphView, ctx: Context) -> np.ndarray | None:
    """The value of a Shape or Size node whose input has a fully static shape."""
    shape = ctx.shape(view.source(node.inputs[0]))
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    if node.op == "Size":
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
        if (node.domain or "") not in ops.DEFAULT_DOMAINS or node.op in NONDETERMINISTIC or _has_subgraph(node):
            continue
        if node.op in (ops.CONSTANT, ops.IDENTITY):  # already constants to every pass
            continue
        if node.op in ("Shape", "Size") and len(node.outputs) == 1:
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


def _closure(tensor: gs.Tensor, view: GraphView, foldable: set[int]) -> list[gs.Node]:
    needed: dict[int, gs.Node] = {}
    stack = [tensor]
    while stack:
        t = view.source(stack.pop())
        node = view.producer(t)
        if node is None or id(node) not in foldable or id(node) in needed:
            continue
        needed[id(node)] = node
        if node.op not in ("Shape", "Size"):
            stack.extend(i for i in node.inputs if i is not None and i.name)
    return [n for n in view.graph.nodes if id(n) in needed]


def _external_constants(c: Candidate, view: GraphView) -> dict[str, np.ndarray]:
    produced = {o.name for n in c.nodes for o in n.outputs}
    feeds = {}
    for node in c.nodes:
        if node.op in ("Shape", "Size"):
            continue
        for t in node.inputs:
            if t is not None and t.name and t.name not in produced and t.name not in feeds:
                feeds[t.name] = np.asarray(view.constant(t))
    return feeds


def _evaluate(c: Candidate, view: GraphView, ctx: Context) -> np.ndarray | Exception:
    """The tensor's value (evaluated once per candidate), or the exception evaluation raised."""
    if c.result is None:
        try:
            c.result = _run_reference(c, view, ctx)
        except Exception as err:  # noqa: BLE001 - any failure: leave the subgraph as it is
            c.result = err
    return c.result


def _run_reference(c: Candidate, view: GraphView, ctx: Context) -> np.ndarray:
    feeds = _external_constants(c, view) | dict(c.shapes)
    nodes = [OnnxExporter.export_node(n) for n in c.nodes if n.outputs[0].name not in c.shapes]
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()]
    graph = helper.make_graph(nodes, "fold", inputs, [helper.make_value_info(c.tensor.name, helper.TypeProto())])
    model = helper.make_model(graph, opset_imports=list(ctx.opsets))
    return np.asarray(ReferenceEvaluator(model).run(None, feeds)[0])


def _check_output(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if view.escapes(c.tensor):
        return f"'{c.tensor.name}' is a graph output"
    return None


def _nbytes(c: Candidate, view: GraphView) -> tuple[int, int]:
    """(bytes of the constants read, bytes of the result if its shape is known or -1)."""
    read = sum(v.nbytes for v in _external_constants(c, view).values())
    shape = c.tensor.shape if c.tensor.shape is not None else None
    if shape is None or not all(isinstance(d, int) for d in shape) or c.tensor.dtype is None:
        return read, -1
    return read, int(np.prod(shape)) * np.dtype(c.tensor.dtype).itemsize


def _check_growth(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    read, out = _nbytes(c, view)
    if out < 0:
        value = _evaluate(c, view, ctx)
        if isinstance(value, Exception):
            return None  # reported by ``evaluates``
        out = value.nbytes
    if out > max(read, SMALL_BYTES):
        return f"'{c.tensor.name}' would be a {out}-byte constant computed from {read} bytes"
    return None


def _check_evaluates(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    value = _evaluate(c, view, ctx)
    if isinstance(value, Exception):
        return f"'{c.tensor.name}' cannot be evaluated ({type(value).__name__})"
    return None


CONDITIONS = [("graph_output", _check_output), ("no_growth", _check_growth), ("evaluates", _check_evaluates)]


@register
class ConstantFold:
    name = "constant-fold"
    summary = "subgraphs computed from constants only (OREPA kernels, shape chains) -> initializers"

    def match(self, view: GraphView, ctx: Context):
        foldable, shapes = _foldable(view, ctx)
        for node in view.graph.nodes:
            if id(node) not in foldable:
                continue
            for out in node.outputs:
                if not out.name:
                    continue
                users = view.users(out)
                if view.escapes(out) or any(id(u) not in foldable for u in users):
                    nodes = _closure(out, view, foldable)
                    sub = {n.outputs[0].name: shapes[n.outputs[0].name] for n in nodes if n.outputs[0].name in shapes}
                    yield Match(out.name, nodes, Candidate(out, nodes, sub))

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return run_checks(CONDITIONS, match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> Plan:
        c: Candidate = match.data
        value = _evaluate(c, view, ctx)
        return Plan(c.tensor, [], f"{len(c.nodes)} node(s) -> constant {list(value.shape)}", constant=value)
