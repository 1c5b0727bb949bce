"""Property test of constant-fold: random constant subgraphs over 50 op types, at opsets 11 to 18,
folded by onnxrep, compute bit for bit what onnxruntime computes for the original model.

Each case builds a chain of steps from random constants (with NaN, infinities and signed zeros
among them): element-wise math, softmax-like ops (whose meaning changes at opset 13), reductions,
layout ops, gathers and slices, casts, comparisons and ``Where``, ``MatMul``, ``CumSum``, ``Range``,
``Shape`` / ``Size`` / ``ConstantOfShape`` (of constants and of the graph input), Identity copies.
A few of the tensors built are read by a node that also reads a graph input (an ``Add`` or ``Xor``),
so they are frontier tensors of the fold. The checks: the folded model passes the checker; every
output equals the original's in onnxruntime bit for bit (NaN where the original has NaN); every
new initializer is bit for bit the value onnxruntime computes for that tensor in the original; no
constant subgraph is left unfolded except for a named condition (``no_growth``).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import onnxrep
from graphs import examples, run
from test_constant_fold import _same, runtime_values

F, I, B = "float", "int64", "bool"
ELEM = {F: TP.FLOAT, I: TP.INT64, B: TP.BOOL}
MAX_ELEMENTS = 200  # every tensor built stays below the fold's 4 KiB growth limit

UNARY = ["Neg", "Abs", "Sqrt", "Exp", "Log", "Reciprocal", "Relu", "Sigmoid", "Tanh", "Erf", "Floor", "Ceil",
         "Sign", "Sin", "Softplus", "Round"]
BINARY = ["Add", "Sub", "Mul", "Div", "Pow", "Min", "Max"]
COMPARE = ["Equal", "Less", "Greater"]
SOFTMAX = ["Softmax", "LogSoftmax", "Hardmax"]
REDUCE = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd"]
LAYOUT = ["Transpose", "Reshape", "Concat", "Slice", "Gather", "Squeeze", "Unsqueeze", "Expand", "Tile", "Pad",
          "Identity"]
OTHER = ["Cast", "CastRoundTrip", "Where", "Not", "MatMul", "Clip", "CumSum", "Range", "Shape", "Size",
         "ConstantOfShape", "IntArith"]
STEPS = UNARY + BINARY + COMPARE + SOFTMAX + REDUCE + LAYOUT + OTHER


class Case:
    """A model under construction: constants, nodes, and the tensors built so far with their
    shape and kind (float / int64 / bool)."""

    def __init__(self, rng: np.random.Generator, opset: int):
        self.rng, self.opset = rng, opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.pool: list[tuple[str, tuple, str]] = []
        self.n = 0
        self.x_shape = (2, 3)  # the graph input ``s`` that only Shape and Size read

    def name(self, base):
        self.n += 1
        return f"{base}{self.n}"

    def const(self, value, keep=False) -> str:
        name = self.name("c")
        self.inits[name] = np.asarray(value)
        return name

    def floats(self, shape):
        v = self.rng.standard_normal(shape).astype(np.float32) * 3
        if v.size and self.rng.random() < 0.4:  # special values
            flat = v.reshape(-1)
            for _ in range(self.rng.integers(1, 3)):
                flat[self.rng.integers(flat.size)] = self.rng.choice([np.nan, np.inf, -np.inf, -0.0, 0.0, 1.0])
        return v

    def node(self, op, inputs, shape, kind, **attrs) -> str | None:
        if int(np.prod(shape, dtype=np.int64)) > MAX_ELEMENTS:
            return None
        out = self.name(op[:4].lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        self.pool.append((out, tuple(int(d) for d in shape), kind))
        return out

    def pick(self, kind=F, min_rank=0):
        options = [p for p in self.pool if p[2] == kind and len(p[1]) >= min_rank]
        if not options:
            return None
        if self.rng.random() < 0.7:  # mostly the newest: chains of steps, not a fan of single ones
            return options[-1]
        return options[self.rng.integers(len(options))]

    def axes_input(self, axes, attr_before):
        """``axes`` as an attribute before opset ``attr_before``, as an input from it on."""
        if self.opset < attr_before:
            return [], {"axes": list(axes)}
        return [self.const(np.array(axes, np.int64))], {}


def _broadcast_partner(case: Case, shape):
    """A float constant of a shape that broadcasts with ``shape``, or a built tensor that does."""
    other = case.pick(F)
    if other is not None and case.rng.random() < 0.5:
        try:
            return other[0], np.broadcast_shapes(shape, other[1])
        except ValueError:
            pass
    dims = [d if case.rng.random() < 0.6 else 1 for d in shape]
    dims = dims[case.rng.integers(0, len(dims) + 1):] if dims and case.rng.random() < 0.3 else dims
    return case.const(case.floats(tuple(dims))), np.broadcast_shapes(shape, tuple(dims))


def _slice_length(n, start, end, step):
    """Elements Slice takes along an axis of length ``n`` (ONNX: negative indices count from the
    end, then start and end are clamped to [0, n] going forward, [0, n-1] and [-1, n-1] backward)."""
    start, end = start + n if start < 0 else start, end + n if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), n), min(max(end, 0), n)
    else:
        start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
    return max(0, -(-(end - start) // step))


def step(case: Case, op: str) -> None:  # noqa: C901 - one branch per op
    rng = case.rng
    a = case.pick(F)
    if a is None:
        return
    name, shape, _ = a
    r = len(shape)
    if op in UNARY:
        case.node(op, [name], shape, F)
    elif op in BINARY:
        other, out = _broadcast_partner(case, shape)
        case.node(op, [name, other], out, F)
    elif op in COMPARE:
        other, out = _broadcast_partner(case, shape)
        case.node(op, [name, other], out, B)
    elif op in SOFTMAX and r >= 1:
        case.node(op, [name], shape, F, axis=int(rng.integers(-r, r)))
    elif op in REDUCE and r >= 1:
        axes = sorted(rng.choice(r, size=rng.integers(1, r + 1), replace=False).tolist())
        keep = int(rng.integers(0, 2))
        out = [1 if i in axes else d for i, d in enumerate(shape)] if keep else [d for i, d in enumerate(shape) if i not in axes]
        inputs, attrs = case.axes_input(axes, 13 if op == "ReduceSum" else 18)
        case.node(op, [name, *inputs], out, F, keepdims=keep, **attrs)
    elif op == "Transpose" and r >= 1:
        perm = rng.permutation(r).tolist()
        case.node(op, [name], [shape[p] for p in perm], F, perm=perm)
    elif op == "Reshape":
        size = int(np.prod(shape, dtype=np.int64))
        divisors = [d for d in range(1, size + 1) if size % d == 0] or [1]
        first = int(rng.choice(divisors))
        target = [[-1], [first, -1], [size // first, first], [1, -1, 1]][rng.integers(4)] if size else [0]
        out = [int(d) if d != -1 else (size // max(1, -int(np.prod(target)))) for d in target]
        case.node(op, [name, case.const(np.array(target, np.int64))], out, F)
    elif op == "Concat" and r >= 1:
        axis = int(rng.integers(r))
        extra = list(shape)
        extra[axis] = int(rng.integers(1, 3))
        out = list(shape)
        out[axis] += extra[axis]
        case.node(op, [name, case.const(case.floats(tuple(extra)))], out, F, axis=axis - r * int(rng.integers(2)))
    elif op == "Slice" and r >= 1:
        axis = int(rng.integers(r))
        n = shape[axis]
        stepv = int(rng.choice([1, 2, -1, -2]))
        if stepv > 0:
            start = int(rng.integers(0, max(n, 1)))
            end = int(rng.integers(start + 1, n + 3))
        else:
            start = int(rng.integers(0, max(n, 1)))
            end = int(rng.choice([-n - 5, max(start - 2, -1)])) if n else -1
        length = _slice_length(n, start, end, stepv)
        out = list(shape)
        out[axis] = length
        ins = [case.const(np.array(v, np.int64)) for v in ([start], [end], [axis], [stepv])]
        case.node(op, [name, *ins], out, F)
    elif op == "Gather" and r >= 1:
        axis = int(rng.integers(r))
        n = shape[axis]
        if n == 0:
            return
        ind_shape = [(), (int(rng.integers(1, 4)),), (2, 2)][rng.integers(3)]
        ind = rng.integers(-n, n, size=ind_shape).astype(np.int64)
        out = list(shape[:axis]) + list(ind_shape) + list(shape[axis + 1:])
        case.node(op, [name, case.const(ind)], out, F, axis=axis)
    elif op == "Squeeze":
        ones = [i for i, d in enumerate(shape) if d == 1]
        if not ones:
            return
        axes = ones[: int(rng.integers(1, len(ones) + 1))]
        inputs, attrs = case.axes_input(axes, 13)
        case.node(op, [name, *inputs], [d for i, d in enumerate(shape) if i not in axes], F, **attrs)
    elif op == "Unsqueeze":
        axis = int(rng.integers(0, r + 1))
        inputs, attrs = case.axes_input([axis], 13)
        case.node(op, [name, *inputs], list(shape[:axis]) + [1] + list(shape[axis:]), F, **attrs)
    elif op == "Expand":
        target = [int(rng.integers(1, 4)) if d == 1 else d for d in shape]
        if rng.random() < 0.3:
            target = [2] + target
        case.node(op, [name, case.const(np.array(target, np.int64))], target, F)
    elif op == "Tile" and r >= 1:
        reps = rng.integers(1, 3, size=r).astype(np.int64)
        case.node(op, [name, case.const(reps)], [d * k for d, k in zip(shape, reps)], F)
    elif op == "Pad" and r >= 1:
        mode = str(rng.choice(["constant", "edge", "reflect"]))
        if mode != "constant" and min(shape) < 2:
            mode = "constant"
        limit = [1 if mode == "constant" else d - 1 for d in shape]
        pads = [int(rng.integers(0, min(2, lim) + 1)) for lim in limit + limit]
        inputs = [name, case.const(np.array(pads, np.int64))]
        if mode == "constant":
            inputs.append(case.const(np.array(rng.standard_normal(), np.float32)))
        case.node(op, inputs, [d + pads[i] + pads[i + r] for i, d in enumerate(shape)], F, mode=mode)
    elif op == "Identity":
        case.node(op, [name], shape, F)
    elif op == "Cast":
        to = [I, B][rng.integers(2)]
        back = case.node(op, [name], shape, to, to=ELEM[to])
        if back is not None and rng.random() < 0.5:
            case.node(op, [back], shape, F, to=TP.FLOAT)
    elif op == "CastRoundTrip":  # through float16 or double: rounding there and back
        mid = case.name("mid")
        case.nodes.append(helper.make_node("Cast", [name], [mid], to=[TP.FLOAT16, TP.DOUBLE][rng.integers(2)]))
        case.node("Cast", [mid], shape, F, to=TP.FLOAT)
    elif op == "Where":
        cond = case.pick(B)
        if cond is None:
            return
        other, out = _broadcast_partner(case, shape)
        try:
            out = np.broadcast_shapes(cond[1], out)
        except ValueError:
            return
        case.node(op, [cond[0], name, other], out, F)
    elif op == "Not":
        cond = case.pick(B)
        if cond is not None:
            case.node(op, [cond[0]], cond[1], B)
    elif op == "MatMul" and r >= 1:
        k, n = shape[-1], int(rng.integers(1, 4))
        out = list(shape[:-1]) + [n]
        case.node(op, [name, case.const(case.floats((k, n)))], out, F)
    elif op == "Clip":
        lo = np.float32(rng.uniform(-2, 0))
        case.node(op, [name, case.const(lo), case.const(np.float32(lo + rng.uniform(0, 3)))], shape, F)
    elif op == "CumSum" and r >= 1:
        axis = case.const(np.array(int(rng.integers(-r, r)), np.int64))
        case.node(op, [name, axis], shape, F, exclusive=int(rng.integers(2)), reverse=int(rng.integers(2)))
    elif op == "Range":
        start, delta = int(rng.integers(-5, 5)), int(rng.choice([-3, -1, 1, 2]))
        limit = start + delta * int(rng.integers(0, 7))
        kind = [F, I][rng.integers(2)]
        dtype = np.float32 if kind == F else np.int64
        ins = [case.const(np.array(v, dtype)) for v in (start, limit, delta)]
        case.node(op, ins, [max(0, -(-(limit - start) // delta))], kind)
    elif op in ("Shape", "Size", "ConstantOfShape"):
        src, src_shape = (("s", case.x_shape) if rng.random() < 0.3 else (name, shape))
        if op == "Size":
            case.node(op, [src], (), I)
            return
        attrs = {}
        dims = list(src_shape)
        if case.opset >= 15 and rng.random() < 0.5 and dims:
            start = int(rng.integers(-len(dims), len(dims)))
            attrs["start"] = start
            dims = dims[start:]
        shp = case.node("Shape", [src], [len(dims)], I, **attrs)
        if op == "ConstantOfShape" and shp is not None:
            value = numpy_helper.from_array(np.array([rng.standard_normal()], np.float32), "value")
            case.node(op, [shp], dims, F, value=value)
    elif op == "IntArith":
        ints = case.pick(I)
        if ints is not None:
            other = case.const(rng.integers(-3, 4, size=ints[1][-1:] if ints[1] else ()).astype(np.int64))
            ops = ["Add", "Mul", "Sub"] + (["Max"] if case.opset >= 12 else [])  # int64 Max: opset 12
            case.node(str(rng.choice(ops)), [ints[0], other], ints[1], I)


def build(ops: list[str], seed: int, opset: int, outputs: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    case = Case(rng, opset)
    for _ in range(2):
        shape = tuple(int(d) for d in rng.integers(1, 5, size=rng.integers(0, 4)))
        value = case.floats(shape)
        case.pool.append((case.const(value), shape, F))
    start = len(case.pool)
    for op in ops:
        step(case, op)
    built = case.pool[start:] or case.pool[:1]
    chosen = {built[-1][0]: built[-1]}
    for _ in range(outputs - 1):
        t = built[rng.integers(len(built))]
        chosen[t[0]] = t
    inputs = {F: helper.make_tensor_value_info("x", TP.FLOAT, [1])}
    inputs["s"] = helper.make_tensor_value_info("s", TP.FLOAT, list(case.x_shape))
    graph_outputs = []
    for k, (name, shape, kind) in enumerate(chosen.values()):
        if kind == F:  # read with the graph input: a node that is never folded
            xin, op = "x", "Add"
            out_shape = np.broadcast_shapes(shape, (1,))
        else:
            xin, op = f"x_{kind}", "Xor" if kind == B else "Add"
            inputs[kind] = helper.make_tensor_value_info(xin, ELEM[kind], [1])
            out_shape = np.broadcast_shapes(shape, (1,))
        case.nodes.append(helper.make_node(op, [name, xin], [f"y{k}"]))
        graph_outputs.append(helper.make_tensor_value_info(f"y{k}", ELEM[kind], list(out_shape)))
    nodes, needed = [], {o.name for o in graph_outputs}
    for node in reversed(case.nodes):  # only what the outputs read: no dead steps
        if set(node.output) & needed:
            nodes.insert(0, node)
            needed |= set(node.input)
    inputs = {k: v for k, v in inputs.items() if v.name in needed}
    inits = [numpy_helper.from_array(v, k) for k, v in case.inits.items() if k in needed]
    graph = helper.make_graph(nodes, "random_constants", list(inputs.values()), graph_outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def feeds_for(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        elem = vi.type.tensor_type.elem_type
        if elem == TP.FLOAT:
            out[vi.name] = rng.standard_normal(shape).astype(np.float32)
        elif elem == TP.INT64:
            out[vi.name] = rng.integers(-3, 4, size=shape).astype(np.int64)
        else:
            out[vi.name] = rng.random(shape) < 0.5
    return out


def check_fold(model: onnx.ModelProto, seed: int) -> None:
    onnx.checker.check_model(model, full_check=True)
    feeds = feeds_for(model, seed)
    expected = run(model, feeds)
    # cost rules of the whole run are not what is tested here: every fold is kept
    out, report = onnxrep.optimize(model, passes=["constant-fold"], allow_cost_increase=True)
    onnx.checker.check_model(out, full_check=True)
    for a, b in zip(expected, run(out, feeds)):
        _same(b, a)
    before = {i.name for i in model.graph.initializer}
    folded = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer if i.name not in before}
    for (name, value), computed in zip(folded.items(), runtime_values(model, list(folded), feeds)):
        _same(value, computed)
    skips = [r for p in report.passes for r in p.skipped.values()]
    assert all(r.startswith("no_growth:") for r in skips), skips
    if not skips:  # every constant subgraph folded: only the nodes that read inputs are left (and
        # Identity copies of a constant, which every pass reads as that constant)
        assert {n.op_type for n in out.graph.node} <= {"Add", "Xor", "Identity"}, [n.op_type for n in out.graph.node]


@settings(max_examples=examples(25), deadline=None)
@given(
    st.lists(st.sampled_from(STEPS), min_size=1, max_size=10),
    st.integers(0, 2**31 - 1),
    st.sampled_from([11, 13, 17, 18]),
    st.integers(1, 3),
)
def test_property_random_constant_subgraphs_fold_to_what_onnxruntime_computes(ops, seed, opset, outputs):
    check_fold(build(ops, seed, opset, outputs), seed)


@pytest.mark.parametrize("opset", [11, 13, 17, 18])
def test_every_step_kind_builds_and_folds(opset):
    """Each op of the property test at least once, on fixed seeds (so none is dead code)."""
    for k, op in enumerate(STEPS):
        ops = ["Less", "Unsqueeze", op, op] if op in ("Where", "Not", "Squeeze") else [op, "Cast", "IntArith"]
        model = build(ops, 1000 + k, opset, 2)
        assert len(model.graph.node) >= 2
        check_fold(model, k)
