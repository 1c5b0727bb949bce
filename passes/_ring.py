"""Recognize a padding ring: a tensor padded on its spatial axes whose border is filled with one
constant per channel (DBB's BNAndPadLayer, exported as Pad followed by ScatterND or slice-scatter
writes, often behind Shape/Gather/Range chains).

Method. The nodes between the source tensor ``A`` and the ring tensor ``Y`` must all be selection
ops (Pad, Slice, ScatterND, Transpose, Reshape, Concat, ...), which only move elements of their data
inputs or fill in values computed from constants and shapes; values computed from ``A``'s shape
(Shape, Size) do not depend on its data. Every element of ``Y`` is then either an element of ``A``
or a constant, and two runs identify which exactly: ``A = 0`` gives the constants, ``A = 1, 2, 3,
...`` (distinct, exactly representable) gives the source index of every element taken from ``A``.
The ring is accepted when ``Y`` is ``A`` zero-padded by fixed pads with every border element equal
to one value per channel. With a symbolic batch dim the runs are made at two batch sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxrep.equivalence import reference_session
from onnxrep.graph import GraphView

#: Selection ops and the input positions through which data may flow.
SELECT_OPS: dict[str, tuple[int, ...] | None] = {
    "Pad": (0,),
    "Slice": (0,),
    "ScatterND": (0, 2),
    "ScatterElements": (0, 2),
    "Transpose": (0,),
    "Reshape": (0,),
    "Identity": (0,),
    "Expand": (0,),
    "Unsqueeze": (0,),
    "Squeeze": (0,),
    "Flatten": (0,),
    "Gather": (0,),
    "Concat": None,  # any input
}
#: Ops whose output depends on the shape of their input, not on its values.
SHAPE_OPS = frozenset({"Shape", "Size"})

_EXACT_LIMIT = 2**24  # float32 holds every integer up to here exactly


@dataclass(frozen=True)
class Ring:
    pads: tuple[int, ...]  # begin per spatial axis, then end per spatial axis
    values: np.ndarray  # one per channel


def select_chain_source(view: GraphView, y: gs.Tensor) -> gs.Tensor | None:
    """Walk back from ``y`` through the data inputs of selection ops; the tensor where the walk
    stops (produced by something else), or None when ``y`` is not produced by a selection op."""
    t = view.source(y)
    node = view.producer(t)
    if node is None or node.op not in SELECT_OPS:
        return None
    while node is not None and node.op in SELECT_OPS:
        t = view.source(node.inputs[0])
        node = view.producer(t)
    return t


def region(view: GraphView, a: gs.Tensor, y: gs.Tensor) -> list[gs.Node] | str:
    """The nodes that compute ``y`` from ``a`` and constants, in graph order; a reason when ``y``
    depends on anything else or a node handles ``a``'s data other than by selection."""
    needed: dict[int, gs.Node] = {}
    stack = [view.source(y)]
    while stack:
        t = stack.pop()
        if t is a or isinstance(t, gs.Constant) or view.is_constant(t):
            continue
        node = t.inputs[0] if isinstance(t, gs.Variable) and t.inputs else None
        if node is None:
            return f"'{y.name}' depends on '{t.name}' besides '{a.name}'"
        if id(node) in needed:
            continue
        needed[id(node)] = node
        stack.extend(i for i in node.inputs if i is not None and i.name)
    nodes = [n for n in view.graph.nodes if id(n) in needed]
    tainted = {id(a)}
    for node in nodes:
        data = [i for i, t in enumerate(node.inputs) if t is not None and id(t) in tainted]
        if not data:
            continue
        if node.op in SHAPE_OPS:
            continue
        allowed = SELECT_OPS.get(node.op, ())
        if node.op not in SELECT_OPS or (allowed is not None and any(i not in allowed for i in data)):
            return f"'{node.name}' ({node.op}) computes with the values of '{a.name}'"
        if node.op == "Pad" and node.attrs.get("mode", "constant") not in ("constant", b"constant"):
            return f"Pad '{node.name}' is not in constant mode"
        tainted.update(id(o) for o in node.outputs)
    return nodes


def _probe_model(view: GraphView, nodes: list[gs.Node], a: gs.Tensor, y: gs.Tensor, shape: list[int], opsets) -> onnx.ModelProto:
    inits, seen = [], {o.name for n in nodes for o in n.outputs}
    for node in nodes:
        for t in node.inputs:
            if t is None or not t.name or t.name in seen or t is a:
                continue
            seen.add(t.name)
            if isinstance(t, gs.Constant):
                inits.append(OnnxExporter.export_tensor_proto(t))
            else:  # a Constant node's output, or an Identity of a constant
                inits.append(numpy_helper.from_array(np.asarray(view.constant(t)), t.name))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(np.float32))
    graph = helper.make_graph(
        [OnnxExporter.export_node(n) for n in nodes],
        "ring",
        [helper.make_tensor_value_info(a.name, elem, shape)],
        [helper.make_tensor_value_info(y.name, elem, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=list(opsets))
    model.ir_version = 8
    return model


def analyze(view: GraphView, a: gs.Tensor, y: gs.Tensor, a_shape: tuple | None, opsets) -> Ring | str:
    """The ring that ``y`` is of ``a``, or the reason it is not one."""
    if a_shape is None or len(a_shape) < 3 or not all(isinstance(d, int) and d > 0 for d in a_shape[1:]):
        return f"the size of '{a.name}' is not static"
    if np.dtype(a.dtype if a.dtype is not None else np.float32) != np.float32:
        return f"'{a.name}' is not float32"
    nodes = region(view, a, y)
    if isinstance(nodes, str):
        return nodes
    batches = [a_shape[0]] if isinstance(a_shape[0], int) and a_shape[0] > 0 else [1, 2]
    ring = None
    for n in batches:
        shape = [n, *a_shape[1:]]
        if int(np.prod(shape)) >= _EXACT_LIMIT:
            return f"'{a.name}' is too large to probe exactly"
        try:
            sess = reference_session(_probe_model(view, nodes, a, y, shape, opsets), log_severity=4)
            zero = sess.run(None, {a.name: np.zeros(shape, np.float32)})[0]
            index = np.arange(1, int(np.prod(shape)) + 1, dtype=np.float32).reshape(shape)
            probe = sess.run(None, {a.name: index})[0]
        except Exception as err:  # noqa: BLE001 - any failure means: not recognized
            return f"the nodes between '{a.name}' and '{y.name}' cannot be evaluated ({type(err).__name__})"
        found = _ring_of(zero.astype(np.float64), probe.astype(np.float64), shape)
        if isinstance(found, str):
            return found
        if ring is not None and (found.pads != ring.pads or not np.array_equal(found.values, ring.values)):
            return "the ring differs between batch sizes"
        ring = found
    return ring


def _ring_of(zero: np.ndarray, probe: np.ndarray, shape: list[int]) -> Ring | str:
    if zero.ndim != len(shape) or zero.shape[:2] != tuple(shape[:2]):
        return "the padded tensor does not keep batch and channels"
    rank = len(shape) - 2
    taken = probe != zero
    if np.any(zero[taken] != 0):
        return "elements taken from the source are not zero-padded copies"
    begin, end = [], []
    for axis in range(rank):
        other = tuple(i for i in range(zero.ndim) if i != axis + 2)
        hit = np.flatnonzero(np.any(taken, axis=other))
        if hit.size != shape[axis + 2] or (hit.size and hit[-1] - hit[0] + 1 != hit.size):
            return "the source does not sit in one block of the padded tensor"
        begin.append(int(hit[0]))
        end.append(int(zero.shape[axis + 2] - hit[-1] - 1))
    inner = (slice(None), slice(None)) + tuple(slice(b, b + s) for b, s in zip(begin, shape[2:]))
    expected = np.arange(1, int(np.prod(shape)) + 1, dtype=np.float64).reshape(shape)
    if not np.array_equal(probe[inner], expected):
        return "the source elements are moved, not just padded"
    border = np.ones(zero.shape, bool)
    border[inner] = False
    values = np.zeros(shape[1])
    for c in range(shape[1]):
        ring_c = zero[:, c][border[:, c]]
        if ring_c.size and np.any(ring_c != ring_c[0]):
            return f"the border of channel {c} holds more than one value"
        values[c] = ring_c[0] if ring_c.size else 0.0
    return Ring(tuple(begin + end), values)
