"""Normalize sums: other spellings of a sum of branches become the binary Add tree the folds match.

Spellings.
  * ``Sum(a, b, c, ...)`` (variadic) -> ``Add(Add(a, b), c) ...``; ``Mean(a, b, ...)`` -> the
    same divided by ``n``. Both broadcast like Add, so any operand shapes are fine.
  * ``ReduceSum(Concat(Unsqueeze(b_1, a), ..., Unsqueeze(b_n, a), axis=a), axes=[a], keepdims=0)``:
    ``torch.stack(branches).sum(a)`` as TorchScript and dynamo export it (axes an attribute below
    opset 13, an input from 13; Unsqueeze's axes likewise) -> ``b_1 + ... + b_n``; ``ReduceMean``
    (``.mean(a)``) -> that sum divided by ``n`` (a per-tensor affine node after the sum, which the
    folds take in).
  * ``Sub(a, Neg(b))`` -> ``Add(a, b)``; ``Add(a, Neg(b))`` and ``Add(Neg(b), a)`` -> ``Sub(a, b)``
    (negation is exact: ``a - (-b)`` is ``a + b`` bit for bit).

The Add chain runs left to right, in the order of the operands.

Conditions (checked in this order):
  1. ``dtype``        the result is a float tensor (an integer mean divides with truncation).
  2. ``new_axis``     stack form: every Unsqueeze inserts the one axis ``a`` that Concat joins on
                      and the reduction removes (``keepdims=0``), and nothing else.
  3. ``single_use``   the unsqueezed tensors, the stacked tensor and the negated tensor are read by
                      nothing else and are not graph outputs.
  4. ``same_shape``   stack form: the stacked tensors all have the same known shape (a Concat
                      does not broadcast, an Add would: without that evidence the sum is left).
  5. ``foldable``     variadic form that the Add tree would make longer (more than two operands,
                      or a mean): two of the summands are branches a fold takes in (the output of
                      a Conv, BatchNormalization, Gemm, MatMul or AveragePool, or the tensor one of
                      those reads: an identity branch; each seen through Transposes and affines
                      by constants, as in the NHWC branch ``Mul(Transpose(Conv(Transpose(x))), s)``).
                      Otherwise the rewrite would only add nodes (one Sum kernel becomes n - 1
                      Adds). The stack and Neg forms always lose nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import ops
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, NewNode, Plan, run_checks

from . import register
from ._common import affine_data_input, is_op, outside_reader_reason
from ._spelling import NotConstant, int_operand, is_float, normalize_axes

VARIADIC, STACK, NEG = "variadic", "stack", "neg"


@dataclass
class Candidate:
    kind: str
    root: gs.Node  # the node whose output the plan rewrites
    terms: list[gs.Tensor]  # the summands, in order (NEG: [a, b] for a + b or a - b)
    mean: bool = False  # divide by len(terms)
    subtract: bool = False  # NEG: the result is a - b
    inner: list[gs.Node] = field(default_factory=list)  # nodes the rewrite removes besides the root
    unsqueezes: list[gs.Node] = field(default_factory=list)
    concat: gs.Node | None = None

    @property
    def target(self) -> gs.Tensor:
        return self.root.outputs[0]


# --------------------------------------------------------------------------------------------
# match
# --------------------------------------------------------------------------------------------


def _match_stack(node: gs.Node, view: GraphView) -> Candidate | None:
    concat = view.producer(node.inputs[0])
    if not is_op(concat, ops.CONCAT) or not concat.inputs:
        return None
    unsqueezes = [view.producer(t) for t in concat.inputs]
    if not all(is_op(u, ops.UNSQUEEZE) for u in unsqueezes):
        return None
    terms = [view.source(u.inputs[0]) for u in unsqueezes]
    return Candidate(STACK, node, terms, node.op == ops.REDUCE_MEAN, inner=[concat, *unsqueezes],
                     unsqueezes=unsqueezes, concat=concat)


def _match_neg(node: gs.Node, view: GraphView) -> Candidate | None:
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    na, nb = view.producer(b), view.producer(a)
    if is_op(na, ops.NEG):  # a +- Neg(b)
        return Candidate(NEG, node, [view.source(a), view.source(na.inputs[0])], subtract=node.op == ops.ADD, inner=[na])
    if node.op == ops.ADD and is_op(nb, ops.NEG):  # Neg(b) + a
        return Candidate(NEG, node, [view.source(b), view.source(nb.inputs[0])], subtract=True, inner=[nb])
    return None


def _match(node: gs.Node, view: GraphView) -> Candidate | None:
    if is_op(node, ops.SUM, ops.MEAN) and node.inputs:
        return Candidate(VARIADIC, node, [view.source(t) for t in node.inputs], node.op == ops.MEAN)
    if is_op(node, ops.REDUCE_SUM, ops.REDUCE_MEAN) and node.inputs:
        return _match_stack(node, view)
    if is_op(node, ops.ADD, ops.SUB):
        return _match_neg(node, view)
    return None


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------


def _dtype(c: Candidate, ctx: Context):
    """The element type of the result, or of the summands where the result's is not known."""
    dtype = ctx.dtype(c.target)
    if dtype is None:
        types = {ctx.dtype(t) for t in c.terms}
        dtype = types.pop() if len(types) == 1 else None
    return dtype


def _check_dtype(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    dtype = _dtype(c, ctx)
    if not is_float(dtype):
        return f"'{c.target.name}' has element type {dtype if dtype is not None else 'unknown'}, not float"
    return None


def _stack_rank(c: Candidate, ctx: Context) -> int | None:
    """Rank of the stacked tensor (one more than the terms'), when known."""
    for t in [c.concat.outputs[0], *(u.outputs[0] for u in c.unsqueezes)]:
        shape = ctx.shape(t)
        if shape is not None:
            return len(shape)
    for t in c.terms:
        shape = ctx.shape(t)
        if shape is not None:
            return len(shape) + 1
    return None


def _check_axis(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if c.kind != STACK:
        return None
    rank = _stack_rank(c, ctx)
    reduce = c.root
    if int(reduce.attrs.get("keepdims", 1)) != 0:
        return f"{reduce.op} '{reduce.name}' keeps the reduced axis (keepdims=1)"
    axes = int_operand(reduce, "axes", 1, view)
    if isinstance(axes, NotConstant):
        return axes
    if not axes:
        return f"{reduce.op} '{reduce.name}' reduces over every axis"
    wanted = normalize_axes(axes, rank)
    if wanted is None or len(wanted) != 1:
        return f"{reduce.op} '{reduce.name}' axes {axes} are not one known axis"
    concat_axis = normalize_axes([int(c.concat.attrs.get("axis", 0))], rank)
    if concat_axis != wanted:
        return f"Concat '{c.concat.name}' joins axis {c.concat.attrs.get('axis')}, not the reduced axis {axes[0]}"
    for u in c.unsqueezes:
        uaxes = int_operand(u, "axes", 1, view)
        if isinstance(uaxes, NotConstant):
            return uaxes
        if uaxes is None or normalize_axes(uaxes, rank) != wanted:
            return f"Unsqueeze '{u.name}' inserts axes {uaxes}, not the reduced axis {axes[0]}"
    return None


def _check_single_use(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if c.kind == STACK:
        reason = outside_reader_reason(c.concat.outputs[0], [c.root], view)
        if reason:
            return reason
        for u in c.unsqueezes:
            reason = outside_reader_reason(u.outputs[0], [c.concat], view)
            if reason:
                return reason
    elif c.kind == NEG:
        return outside_reader_reason(c.inner[0].outputs[0], [c.root], view)
    return None


def _check_shapes(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if c.kind != STACK:
        return None
    shapes = [ctx.shape(t) for t in c.terms]
    for t, shape in zip(c.terms, shapes):
        if shape is None or any(d is None or (isinstance(d, str) and not d) for d in shape):
            return f"the shape of '{t.name}' is not known"
    if len({tuple(s) for s in shapes}) > 1:
        return f"the stacked tensors have different shapes {[list(s) for s in shapes]}"
    return None


#: Ops whose output a fold takes in as a branch of a sum (and whose data input, as the identity).
BRANCH_OPS = (ops.CONV, ops.BATCH_NORM, ops.GEMM, ops.MATMUL, ops.AVERAGE_POOL)


def _branch_end(tensor: gs.Tensor, view: GraphView) -> gs.Tensor:
    """``tensor`` looked back through what the other normalizations and folds take away before a
    sum is merged: Identity, Transpose (an NHWC branch, ``Transpose(Conv(Transpose(x)))``) and
    affines by constants (BN on the last axis written as ``Mul``/``Add``)."""
    seen = 0
    while seen < 16:
        node = view.producer(tensor)
        data = affine_data_input(node, view) if node is not None else None
        if is_op(node, ops.TRANSPOSE) and node.inputs:
            data = node.inputs[0]
        if data is None or is_op(node, ops.BATCH_NORM):
            return view.source(tensor)
        tensor, seen = data, seen + 1
    return view.source(tensor)


def _check_foldable(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if c.kind != VARIADIC or (len(c.terms) <= 2 and not c.mean):
        return None
    ends = [_branch_end(t, view) for t in c.terms]
    leaves = [view.producer(t) for t in ends]
    leaves = [p for p in leaves if is_op(p, *BRANCH_OPS)]
    inputs = {id(_branch_end(p.inputs[0], view)) for p in leaves if p.inputs}
    identities = [t for t in ends if id(t) in inputs]
    if len(leaves) + len(identities) >= 2:
        return None
    return (
        f"{c.root.op} '{c.root.name}': fewer than two summands are branches a fold takes in "
        f"({', '.join(BRANCH_OPS)} or their input); {len(c.terms) - 1} Adds would only add nodes"
    )


CONDITIONS = [
    ("dtype", _check_dtype),
    ("new_axis", _check_axis),
    ("single_use", _check_single_use),
    ("same_shape", _check_shapes),
    ("foldable", _check_foldable),
]


# --------------------------------------------------------------------------------------------
# the pass
# --------------------------------------------------------------------------------------------


def _intermediate(ctx: Context, base: str, target: gs.Tensor, same_shape: bool) -> gs.Variable:
    if same_shape:
        return ctx.like(base, target)
    return gs.Variable(ctx.fresh_name(base), dtype=target.dtype)


@register
class NormalizeSums:
    name = "normalize-sums"
    summary = "Sum / Mean / stack-and-ReduceSum / Sub of a Neg -> a binary Add tree"

    def match(self, view: GraphView, ctx: Context):
        for node in view.graph.nodes:
            cand = _match(node, view)
            if cand is not None:
                yield Match(cand.target.name, [cand.root, *cand.inner], cand)

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return run_checks(CONDITIONS, match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> Plan:
        c: Candidate = match.data
        target, base = c.target, c.root.name or "sum"
        if c.kind == NEG:
            op = ops.SUB if c.subtract else ops.ADD
            node = NewNode(op, ctx.fresh_name(f"{base}/{op.lower()}"), {}, list(c.terms), [target])
            return Plan(target, [node], f"{c.root.op} of a Neg -> {op}")
        target_shape = ctx.shape(target)
        same = target_shape is not None and all(ctx.shape(t) == target_shape for t in c.terms)
        nodes: list[NewNode] = []
        n = len(c.terms)
        if n == 1 and not c.mean:
            nodes.append(NewNode(ops.IDENTITY, ctx.fresh_name(f"{base}/identity"), {}, [c.terms[0]], [target]))
        else:
            acc = c.terms[0]
            for i, t in enumerate(c.terms[1:], start=1):
                last = i == n - 1 and not c.mean
                out = target if last else _intermediate(ctx, f"{base}.add", target, same)
                nodes.append(NewNode(ops.ADD, ctx.fresh_name(f"{base}/add"), {}, [acc, t], [out]))
                acc = out
            if c.mean:
                dtype = _dtype(c, ctx)
                count = ctx.constant(f"{base}.count", np.array(n, dtype=dtype))
                nodes.append(NewNode(ops.DIV, ctx.fresh_name(f"{base}/div"), {}, [acc, count], [target]))
        what = f"{'mean' if c.mean else 'sum'} of {n}"
        return Plan(target, nodes, f"{c.root.op} ({c.kind}) {what} -> {max(n - 1, 0)} Add{' + Div' if c.mean else ''}")
