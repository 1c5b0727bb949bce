"""Recognize a padding ring: a tensor padded on its spatial axes whose border is filled with one
constant per channel (DBB's BNAndPadLayer, exported as Pad followed by ScatterND or slice-scatter
writes, often behind Shape/Gather/Range chains; as ``Concat(strip, A, strip)`` along one spatial
axis then the other by frameworks that can only pad with a scalar; or as ``Sub(b) -> Pad(0) ->
Add(b)``).

Method. The nodes between the source tensor ``A`` and the ring tensor ``Y`` must all be selection
ops (Pad, Slice, ScatterND, Transpose, Reshape, Concat, ...), which only move elements of their data
inputs or fill in values computed from constants and shapes, or shifts (``Add`` of, ``Sub`` of, a
value computed from constants and shapes); values computed from ``A``'s shape (Shape, Size) do not
depend on its data. ``A`` is found by following the data inputs wherever they sit (the middle input
of a Concat of strips, the minuend of a Sub): the inputs computed from constants and shapes alone
are fill values. Every element of ``Y`` is then ``A[j] + o`` or a fill value, ``o`` a constant
offset, and runs identify which exactly:

* the selection alone (every shift replaced by its data input): ``A = 0`` and ``A = 1, 2, 3, ...``
  (distinct, exactly representable) tell which elements are copies of ``A`` and of which element;
* the whole region at ``A = 0`` gives the offsets and fill values as onnxruntime computes them in
  float32. With shifts in the region the same run is made in float64 as well, and every value must
  have the bit pattern of the float32 one: the offsets and fill values are then exact, not a rounding
  leftover (``(0 - b) + b`` is 0 in both; a border of ``0 + b`` is ``b`` in both).

The ring is accepted when ``Y`` is ``A`` padded by fixed pads, the copies of ``A`` carry offset 0 in
exact arithmetic, and every border element holds one value per channel. In float32 the runtime
rounds ``(A - b) + b``; the ring stands for its exact value ``A``. With a symbolic batch dim the runs
are made at two batch sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxrep import ops
from onnxrep.equivalence import reference_session
from onnxrep.graph import GraphView

#: Selection ops and the input positions through which data may flow.
SELECT_OPS: dict[str, tuple[int, ...] | None] = {
    ops.PAD: (0,),
    ops.SLICE: (0,),
    ops.SCATTER_ND: (0, 2),
    ops.SCATTER_ELEMENTS: (0, 2),
    ops.TRANSPOSE: (0,),
    ops.RESHAPE: (0,),
    ops.IDENTITY: (0,),
    ops.EXPAND: (0,),
    ops.UNSQUEEZE: (0,),
    ops.SQUEEZE: (0,),
    ops.FLATTEN: (0,),
    ops.GATHER: (0,),
    ops.CONCAT: None,  # any input
}
#: Shifts and the input positions through which data may flow (the other input is a fill value).
SHIFT_OPS: dict[str, tuple[int, ...]] = {ops.ADD: (0, 1), ops.SUB: (0,)}
#: Ops whose output depends on the shape of their input, not on its values.
SHAPE_OPS = frozenset({ops.SHAPE, ops.SIZE})

_EXACT_LIMIT = 2**24  # float32 holds every integer up to here exactly


@dataclass(frozen=True)
class Ring:
    pads: tuple[int, ...]  # begin per spatial axis, then end per spatial axis
    values: np.ndarray  # one per channel


#: At most this many nodes are looked at to tell a fill value: strips and fill values are computed
#: by a few nodes; a tensor whose computation is larger counts as data.
_FILL_NODES = 64


def data_free(view: GraphView, t: gs.Tensor | None, memo: dict | None = None) -> bool:
    """Whether ``t`` is computed from constants and tensor shapes alone (a fill value), within
    :data:`_FILL_NODES` nodes."""
    memo = {} if memo is None else memo
    if t is None or not t.name:
        return True
    t = view.source(t)
    if id(t) in memo:
        return memo[id(t)]
    seen, stack, free = set(), [t], True
    while stack and free:
        u = view.source(stack.pop())
        if id(u) in seen or isinstance(u, gs.Constant) or view.is_constant(u):
            continue
        if memo.get(id(u)) is True:
            continue
        seen.add(id(u))
        node = view.producer(u)
        if node is None or memo.get(id(u)) is False or len(seen) > _FILL_NODES:
            free = False
        elif node.op not in SHAPE_OPS:
            stack.extend(i for i in node.inputs if i is not None and i.name)
    memo[id(t)] = free
    return free


def _data_positions(view: GraphView, node: gs.Node | None, memo: dict) -> list[int] | None:
    """The inputs of ``node`` that carry data (not fill values), or None when ``node`` neither
    selects nor shifts its data (or carries data where it may not)."""
    if node is None:
        return None
    data = [i for i, t in enumerate(node.inputs) if not data_free(view, t, memo)]
    if node.op in SELECT_OPS:
        allowed = SELECT_OPS[node.op]
    elif node.op in SHIFT_OPS:
        if len(data) != 1:
            return None
        allowed = SHIFT_OPS[node.op]
    else:
        return None
    if allowed is not None and any(i not in allowed for i in data):
        return None
    return data


def select_chain_source(view: GraphView, y: gs.Tensor) -> gs.Tensor | None:
    """Walk back from ``y`` through the data inputs of selection ops and shifts, wherever they sit;
    the tensor where the walk stops (produced by something else), or None when ``y`` is not
    produced by a selection op, no selection op is on the way, or the walk stops at more than one
    tensor."""
    memo: dict = {}
    t = view.source(y)
    if _data_positions(view, view.producer(t), memo) is None:
        return None
    sources: list[gs.Tensor] = []
    seen, selects, stack = {id(t)}, 0, [t]
    while stack:
        t = stack.pop()
        node = view.producer(t)
        positions = _data_positions(view, node, memo)
        if positions is None:
            sources.append(t)
            continue
        selects += node.op in SELECT_OPS
        for i in positions:
            s = view.source(node.inputs[i])
            if id(s) not in seen:
                seen.add(id(s))
                stack.append(s)
    if not selects or len(sources) != 1:
        return None
    return sources[0]


def region(view: GraphView, a: gs.Tensor, y: gs.Tensor) -> list[gs.Node] | str:
    """The nodes that compute ``y`` from ``a`` and constants, in graph order; a reason when ``y``
    depends on anything else or a node handles ``a``'s data other than by selection or shift."""
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
        if node.op in SHIFT_OPS:
            if len(data) != 1 or data[0] not in SHIFT_OPS[node.op]:
                return f"'{node.name}' ({node.op}) computes with the values of '{a.name}'"
        else:
            allowed = SELECT_OPS.get(node.op, ())
            if node.op not in SELECT_OPS or (allowed is not None and any(i not in allowed for i in data)):
                return f"'{node.name}' ({node.op}) computes with the values of '{a.name}'"
            if node.op == ops.PAD and node.attrs.get("mode", "constant") not in ("constant", b"constant"):
                return f"Pad '{node.name}' is not in constant mode"
        tainted.update(id(o) for o in node.outputs)
    return nodes


def _shift_data(nodes: list[gs.Node], a: gs.Tensor) -> dict[int, int]:
    """For each shift on ``a``'s data: id(node) -> its data input position."""
    tainted, shifts = {id(a)}, {}
    for node in nodes:
        data = [i for i, t in enumerate(node.inputs) if t is not None and id(t) in tainted]
        if not data or node.op in SHAPE_OPS:
            continue
        if node.op in SHIFT_OPS:
            shifts[id(node)] = data[0]
        tainted.update(id(o) for o in node.outputs)
    return shifts


def _to_double(proto: onnx.NodeProto) -> onnx.NodeProto:
    """``proto`` computing in float64 where it computed in float32."""
    f32, f64 = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
    for attr in proto.attribute:
        if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == f32:
            attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float64), attr.t.name))
        elif attr.type == onnx.AttributeProto.INT and attr.name == "to" and attr.i == f32:
            attr.i = f64
    return proto


def _probe_model(
    view: GraphView, nodes: list[gs.Node], a: gs.Tensor, y: gs.Tensor, shape: list[int], opsets,
    shifts: dict[int, int] | None = None, double: bool = False,
) -> onnx.ModelProto:
    """The region as a model of ``a``. ``shifts`` (id(node) -> data position): those nodes pass
    their data input through unchanged. ``double``: computed in float64."""
    inits, seen = [], {o.name for n in nodes for o in n.outputs}
    for node in nodes:
        for t in node.inputs:
            if t is None or not t.name or t.name in seen or t is a:
                continue
            seen.add(t.name)
            if isinstance(t, gs.Constant):
                proto = OnnxExporter.export_tensor_proto(t)
            else:  # a Constant node's output, or an Identity of a constant
                proto = numpy_helper.from_array(np.asarray(view.constant(t)), t.name)
            if double and proto.data_type == onnx.TensorProto.FLOAT:
                proto = numpy_helper.from_array(numpy_helper.to_array(proto).astype(np.float64), t.name)
            inits.append(proto)
    protos = []
    for node in nodes:
        if shifts is not None and id(node) in shifts:
            protos.append(helper.make_node(
                ops.IDENTITY, [node.inputs[shifts[id(node)]].name], [node.outputs[0].name], name=node.name
            ))
            continue
        proto = OnnxExporter.export_node(node)
        protos.append(_to_double(proto) if double else proto)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(np.float64 if double else np.float32))
    graph = helper.make_graph(
        protos,
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
    shifts = _shift_data(nodes, a)
    batches = [a_shape[0]] if isinstance(a_shape[0], int) and a_shape[0] > 0 else [1, 2]
    ring = None
    for n in batches:
        shape = [n, *a_shape[1:]]
        if int(np.prod(shape)) >= _EXACT_LIMIT:
            return f"'{a.name}' is too large to probe exactly"
        zeros = np.zeros(shape, np.float32)
        index = np.arange(1, int(np.prod(shape)) + 1, dtype=np.float32).reshape(shape)
        try:
            whole = reference_session(_probe_model(view, nodes, a, y, shape, opsets), log_severity=4)
            zero = whole.run(None, {a.name: zeros})[0]
            if shifts:
                select = reference_session(_probe_model(view, nodes, a, y, shape, opsets, shifts), log_severity=4)
                zero_select = select.run(None, {a.name: zeros})[0]
                probe = select.run(None, {a.name: index})[0]
            else:
                zero_select = zero
                probe = whole.run(None, {a.name: index})[0]
        except Exception as err:  # noqa: BLE001 - any failure means: not recognized
            return f"the nodes between '{a.name}' and '{y.name}' cannot be evaluated ({type(err).__name__})"
        if shifts:
            try:
                double = reference_session(_probe_model(view, nodes, a, y, shape, opsets, double=True), log_severity=4)
                exact = double.run(None, {a.name: zeros.astype(np.float64)})[0]
            except Exception as err:  # noqa: BLE001
                return f"the shifts between '{a.name}' and '{y.name}' cannot be evaluated in float64 ({type(err).__name__})"
            if exact.shape != zero.shape or not np.array_equal(exact, zero.astype(np.float64)):
                return f"the shifts between '{a.name}' and '{y.name}' round in float32: their values are not exact"
        if zero_select.shape != zero.shape or probe.shape != zero.shape:
            return f"a shift between '{a.name}' and '{y.name}' broadcasts its data to another shape"
        found = _ring_of(zero.astype(np.float64), zero_select.astype(np.float64), probe.astype(np.float64), shape)
        if isinstance(found, str):
            return found
        if ring is not None and (found.pads != ring.pads or not np.array_equal(found.values, ring.values)):
            return "the ring differs between batch sizes"
        ring = found
    return ring


def _ring_of(zero: np.ndarray, zero_select: np.ndarray, probe: np.ndarray, shape: list[int]) -> Ring | str:
    """``zero``: the region at 0 (fill values and offsets); ``zero_select``, ``probe``: its selection
    at 0 and at the index input."""
    if zero.ndim != len(shape) or zero.shape[:2] != tuple(shape[:2]):
        return "the padded tensor does not keep batch and channels"
    rank = len(shape) - 2
    taken = probe != zero_select
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


def shift_ring_reader(view: GraphView, node: gs.Node, ctx=None) -> tuple[gs.Tensor, gs.Node] | None:
    """``(A, reader)`` when ``node`` is a shift (Add/Sub of a fill value) inside a chain of selection
    ops and shifts from ``A`` (produced elsewhere) to ``reader``, a Conv or AveragePool, that starts
    and ends with a shift: the ``Sub(b) -> Pad(0) -> Add(b)`` spelling of a ring. Folding one such
    shift into a neighbouring conv leaves the ring check a rounding leftover to compare; conv-chain
    takes the whole ring instead. With ``ctx`` (a rewrite Context) the chain must also be a ring
    (:func:`analyze`). None otherwise."""
    if node is None or node.op not in SHIFT_OPS:
        return None
    memo: dict = {}
    if _data_positions(view, node, memo) is None:
        return None
    last = node  # down to the last node of the chain (single readers only)
    while True:
        out = last.outputs[0]
        users = view.users(out)
        if len(users) != 1 or view.escapes(out):
            return None
        reader = users[0]
        if reader.op in (ops.CONV, ops.AVERAGE_POOL) and view.source(reader.inputs[0]) is view.source(out):
            break
        if _data_positions(view, reader, memo) is None:
            return None
        last = reader
    if last.op not in SHIFT_OPS:
        return None
    a = select_chain_source(view, last.outputs[0])
    # the chain may begin with shifts that are not the ring's (the Add of a BN written as Mul then
    # Add before the ring's Sub): the ring starts at the first shift from which it is one
    while a is not None:
        nodes = region(view, a, last.outputs[0])
        if isinstance(nodes, str) or not any(n is node for n in nodes):
            return None
        first = next(
            (n for n in nodes if n.op not in SHAPE_OPS and any(i is not None and view.source(i) is a for i in n.inputs)),
            None,
        )
        if first is None or first.op not in SHIFT_OPS:
            return None
        if ctx is None or isinstance(analyze(view, a, last.outputs[0], ctx.shape(a), ctx.opsets), Ring):
            return a, reader
        if first is node or len(view.users(first.outputs[0])) != 1:
            return None
        a = first.outputs[0]
    return None
