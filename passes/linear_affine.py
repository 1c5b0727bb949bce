"""Linear affine fold: per-feature affine nodes before or after a linear layer fold into it.

Pattern. ``Linear -> A`` or ``A -> Linear``, where the linear layer is a Gemm or a MatMul by a
constant matrix (with its bias Add), and ``A`` is BatchNormalization on ``[N, C]`` or
Mul/Div/Add/Sub with a scalar or a constant along the last (feature) axis; the tensor between them
is read by nothing else. Covers RepViT's BN1d before its heads, BN after a Linear, layer scales.

Algebra (``y = x @ W + b``, features on the last axis).
  after:  ``s * (x @ W + b) + t = x @ (W diag(s)) + (s b + t)``.
  before: ``(s * x + t) @ W + b = x @ (diag(s) W) + (t @ W + b)``: a linear layer reads no
          padding, so the shift always folds.

Exactness conditions (checked in this order):
  1. ``inference_bn``      a BatchNormalization is in inference mode with one output in use.
  2. ``layout``            the weight and bias are constants, ``transA = 0``, and the bias broadcasts
                           along the output features only.
  3. ``per_feature``       the affine acts on the feature axis (BatchNormalization only on 2-D
                           tensors) with a scalar or one value per feature, and before the layer it
                           does not broadcast the input to more features.
  4. ``single_use``        the tensor between the two is read by nothing else.
Cost condition (``--allow-cost-increase`` lifts it):
  5. ``runtime_fusion``    the affine node is not part of a decomposition that onnxruntime or
                           OpenVINO fuse into one kernel (the ``Mul(0.5)`` of TorchScript's GELU,
                           the scale and bias of a decomposed LayerNorm before a linear layer):
                           folding it would leave the rest unfused (see :mod:`passes._fusions`).

Through layout ops. The affine may also reach the linear layers through Reshape, Flatten,
Squeeze, Unsqueeze, Transpose, AveragePool and GlobalAveragePool (Identity looked through):
  before: ``A -> layout ops -> linear layers`` with fan-out (NextViT: ``BN(NCHW) -> Reshape
          [N, C, HW] -> Transpose -> q, k, v``, and ``-> AveragePool -> Transpose -> k, v``); every
          layer absorbs the affine, the layout ops are re-emitted on A's input;
  after:  ``linear -> layout ops -> A`` (LeViT: ``MatMul -> Flatten(axis=2) -> BN -> Reshape``);
          the layer absorbs A, and a chain of reshapes with the Reshape after A becomes one
          Reshape, or none when it gives back the layer's own output shape.
The affine is a *field* (``S * x + T`` with constants broadcast over the data's static shape, see
:mod:`passes._linear`) moved through each op exactly: a Transpose permutes it; a reshape
regroups it in C order, block by block of axes with equal element counts (an axis split or merged
with others gives the field repeated over the block); an average pool keeps it when it is constant
over the pooled axes. At each linear layer it must vary along the feature axis only (equal values
along another axis count as constant). Conditions, in order:
  1. ``inference_bn``   as above.
  2. ``readers``        (before) every reader along the way is a layout op or a linear layer that
                        reads the tensor as its input.
  3. ``single_use``     no tensor along the way is a graph output; (after) each is read only by
                        the next step.
  4. ``layout``         every linear layer as in 2. above.
  5. ``static_shape``   the shapes along the way are known, and each reshape's regrouping of the
                        affine's axes is static (symbolic dims only where the field is constant).
  6. ``per_feature``    the constants broadcast along the data without enlarging it, the field is
                        constant over pooled axes, and it reaches every layer per feature.
  7. ``pool_border``    a shift passes an AveragePool only when each window divides by its own
                        element count: no padding read or ``count_include_pad = 0`` (with
                        ``count_include_pad = 1`` a border window over ``r`` of ``k`` elements gives
                        ``t r / k``), and ``ceil_mode = 0``. A scale alone always passes.
  8. ``runtime_fusion`` as above, for the affine, the layout ops and all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import ops
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, NewNode, Plan, run_checks

from . import _linear, register
from ._fusions import breaks_fusion
from ._common import (
    affine_data_input,
    bn_inference_reason,
    graph_opset,
    is_op,
    legacy_operand,
    node_affine,
    outside_reader_reason,
)

AFTER, BEFORE = "after", "before"


@dataclass
class Candidate:
    lin: _linear.Linear
    affine: gs.Node
    side: str

    @property
    def between(self) -> gs.Tensor:
        return self.lin.out if self.side == AFTER else self.affine.outputs[0]


def _rank(c: Candidate, view: GraphView, ctx: Context) -> int | None:
    """Rank of the tensor the rewritten layer reads (an affine constant of higher rank would
    change the output's rank, so per_channel refuses it)."""
    if c.side == BEFORE:
        return _linear.rank_of(view.source(affine_data_input(c.affine, view)), ctx)
    return 2 if c.lin.is_gemm else _linear.rank_of(c.lin.x, ctx)


def _affine(c: Candidate, view: GraphView, ctx: Context):
    k, n = _linear.dims(c.lin, view)
    rank = _rank(c, view, ctx)
    if rank is None:
        return f"the rank of '{c.lin.x.name}' is not known"
    return node_affine(c.affine, view, n if c.side == AFTER else k, rank, axis=-1)


def _check_bn(c, view, ctx):
    return bn_inference_reason(c.affine, view) if is_op(c.affine, ops.BATCH_NORM) else None


def _check_layout(c, view, ctx):
    return _linear.layout_reason(c.lin, view, ctx)


def _check_per_feature(c, view, ctx):
    aff = _affine(c, view, ctx)
    if isinstance(aff, str):
        return aff
    if c.side == BEFORE and not is_op(c.affine, ops.BATCH_NORM):
        data = view.source(affine_data_input(c.affine, view))
        shape = ctx.shape(data)
        k, _ = _linear.dims(c.lin, view)
        if shape is None or not shape or shape[-1] != k:
            return f"'{data.name}' is not known to have the {k} features that '{c.lin.head.name}' reads"
    return None


def _check_single_use(c, view, ctx):
    return outside_reader_reason(c.between, [c.affine if c.side == AFTER else c.lin.head], view)


def _check_runtime_fusion(c, view, ctx):
    if ctx.options.allow_cost_increase:
        return None
    return breaks_fusion([c.affine] + c.lin.nodes, view)


CONDITIONS = [
    ("inference_bn", _check_bn),
    ("layout", _check_layout),
    ("per_feature", _check_per_feature),
    ("single_use", _check_single_use),
    ("runtime_fusion", _check_runtime_fusion),
]


# --------------------------------------------------------------------------------------------
# through layout ops
# --------------------------------------------------------------------------------------------


@dataclass
class LayoutBefore:
    """``A -> layout ops -> linear layers``: the tree of A's readers (``layout``: the layout nodes
    in visiting order; ``linears``: the leaves), with the readers that are neither (``others``)
    and the tensors of the tree that are graph outputs (``escaping``)."""

    affine: gs.Node
    layout: list
    linears: list
    others: list
    escaping: list
    cache: dict = field(default_factory=dict)


@dataclass
class LayoutAfter:
    """``linear -> layout ops -> A``: the chain of layout nodes from the layer's output to A."""

    lin: _linear.Linear
    chain: list
    affine: gs.Node
    shapes: list = field(default_factory=list)  # Shape nodes reading the layer's output (``reshape_as``)
    cache: dict = field(default_factory=dict)


def _shape(t: gs.Tensor, view: GraphView, ctx: Context) -> tuple | None:
    shape = ctx.shape(t)
    return shape if shape is not None else ctx.shape(view.source(t))


def _data_reads(node: gs.Node, t: gs.Tensor, view: GraphView) -> bool:
    """``node`` reads ``t`` as its first input and nowhere else."""
    srcs = [view.source(i) if i is not None and i.name else None for i in node.inputs]
    return bool(srcs) and srcs[0] is t and all(s is not t for s in srcs[1:])


def _before_tree(affine: gs.Node, view: GraphView) -> LayoutBefore:
    layout, linears, others, escaping = [], [], [], []
    stack = [affine.outputs[0]]
    while stack:
        t = stack.pop(0)
        if view.escapes(t):
            escaping.append(t)
        for u in view.users(t):
            lin = _linear.as_linear(u, view)
            if lin is not None and _data_reads(u, t, view):
                linears.append(lin)
            elif is_op(u, *_linear.LAYOUT_OPS) and _data_reads(u, t, view) and len(u.outputs) == 1:
                layout.append(u)
                stack.append(u.outputs[0])
            else:
                others.append(u)
    return LayoutBefore(affine, layout, linears, others, escaping)


def _after_chain(affine: gs.Node, view: GraphView) -> LayoutAfter | None:
    chain = []
    t = view.source(affine_data_input(affine, view))
    node = view.producer(t)
    while is_op(node, *_linear.LAYOUT_OPS) and len(node.outputs) == 1:
        chain.insert(0, node)
        t = view.source(node.inputs[0])
        lin = _linear.producer_linear(t, view)
        if lin is not None:
            shapes = [u for u in view.users(lin.out) if is_op(u, ops.SHAPE) and u is not chain[0]]
            return LayoutAfter(lin, chain, affine, shapes)
        node = view.producer(t)
    return None


def _root_field(affine: gs.Node, view: GraphView, ctx: Context) -> _linear.Field | tuple[str, str]:
    """The affine node's field on its data input (of static rank), or (condition, reason)."""
    data = affine_data_input(affine, view)
    shape = _shape(data, view, ctx)
    if shape is None:
        return "static_shape", f"the shape of '{data.name}' is not known"
    rank = len(shape)
    if is_op(affine, ops.BATCH_NORM):
        if rank < 2 or not isinstance(shape[1], int):
            return "static_shape", f"the channels of '{data.name}' (shape {list(shape)}) are not static"
        aff = node_affine(affine, view, shape[1], rank, axis=1)
        if isinstance(aff, str):
            return "per_feature", aff
        cshape = (1, shape[1]) + (1,) * (rank - 2)
        return _linear.Field(aff.scale.reshape(cshape), aff.shift.reshape(cshape))
    a, b = affine.inputs
    const_first = view.is_constant(a)
    raw = view.constant(a if const_first else b)
    operand = legacy_operand(affine, raw, const_first, rank, graph_opset(view))
    if isinstance(operand, str):
        return "per_feature", operand
    v = np.asarray(operand)
    if v.dtype.kind != "f" and str(v.dtype) != "bfloat16":
        return "per_feature", f"{affine.op} '{affine.name}' constant has dtype {v.dtype}"
    if v.ndim > rank:
        return "per_feature", f"{affine.op} '{affine.name}' constant of shape {list(v.shape)} raises the rank of '{data.name}'"
    v = np.array(v, dtype=np.float64).reshape((1,) * (rank - v.ndim) + tuple(v.shape))
    for d, n in zip(v.shape, shape):
        if d != 1 and d != n:
            return "per_feature", (
                f"{affine.op} '{affine.name}' constant of shape {list(np.shape(raw))} broadcasts '{data.name}' "
                f"of shape {list(shape)}"
            )
    ones, zeros = np.ones_like(v), np.zeros_like(v)
    if affine.op == ops.MUL:
        return _linear.Field(v, zeros)
    if affine.op == ops.DIV:
        if np.any(v == 0):
            return "per_feature", f"Div '{affine.name}' divides by zero"
        return _linear.Field(1.0 / v, zeros)
    if affine.op == ops.ADD:
        return _linear.Field(ones, v)
    return _linear.Field(-ones, v) if const_first else _linear.Field(ones, -v)  # Sub


def _through(f: _linear.Field, node: gs.Node, view: GraphView, ctx: Context, backward: bool):
    """The field moved through layout node ``node`` (from its input to its output, or back), or
    (condition, reason)."""
    src, dst = _shape(node.inputs[0], view, ctx), _shape(node.outputs[0], view, ctx)
    for t, shape in ((node.inputs[0], src), (node.outputs[0], dst)):
        if shape is None:
            return "static_shape", f"the shape of '{t.name}' is not known"
    have = src if not backward else dst
    if f.scale.ndim != len(have):
        return "static_shape", f"the rank of '{node.inputs[0].name}' is not the one its producer gives"
    if node.op in _linear.RESHAPE_LIKE:
        moved = _linear.reshape_field(f, dst, src) if backward else _linear.reshape_field(f, src, dst)
        if moved is None:
            return "static_shape", (
                f"{node.op} '{node.name}' from {list(src)} to {list(dst)}: how it regroups the affine's axes is not "
                "known (symbolic dims)"
            )
        return moved
    if node.op == ops.TRANSPOSE:
        perm = node.attrs.get("perm")
        perm = list(range(len(src)))[::-1] if perm is None else [int(p) for p in perm]
        return _linear.transpose_field(f, np.argsort(perm) if backward else perm)
    reason = _linear.spatial_reason(f, node)
    if reason:
        return "per_feature", reason
    reason = _linear.pool_reason(f, node, view, src)
    if reason:
        return "pool_border", reason
    if len(src) != len(dst):
        return "static_shape", f"{node.op} '{node.name}' changes the rank"
    return f


def _before_vectors(c: LayoutBefore, view: GraphView, ctx: Context):
    """Per linear layer (in ``c.linears`` order), the ``(s, t)`` it absorbs; or (condition, reason)."""
    if "result" in c.cache:
        return c.cache["result"]
    result = _compute_before(c, view, ctx)
    c.cache["result"] = result
    return result


def _compute_before(c: LayoutBefore, view: GraphView, ctx: Context):
    root = _root_field(c.affine, view, ctx)
    if isinstance(root, tuple):
        return root
    fields = {id(c.affine.outputs[0]): root}
    for node in c.layout:
        moved = _through(fields[id(view.source(node.inputs[0]))], node, view, ctx, backward=False)
        if isinstance(moved, tuple):
            return moved
        fields[id(node.outputs[0])] = moved
    out = []
    for lin in c.linears:
        f = fields[id(view.source(lin.head.inputs[0]))]
        k, _ = _linear.dims(lin, view)
        shape = _shape(lin.head.inputs[0], view, ctx)
        if shape is None:
            return "static_shape", f"the shape of '{lin.head.inputs[0].name}' is not known"
        vec = _linear.feature_vectors(f, k)
        if vec is None or len(shape) != f.scale.ndim:
            return "per_feature", (
                f"the affine '{c.affine.name}' reaches '{lin.head.name}' varying along axes "
                f"{[i for i, d in enumerate(np.broadcast_shapes(f.scale.shape, f.shift.shape)) if d != 1]} of "
                f"'{lin.head.inputs[0].name}' {list(shape)}, not along its {k} input features alone"
            )
        out.append(vec)
    return out


def _after_vectors(c: LayoutAfter, view: GraphView, ctx: Context):
    """The ``(s, t)`` along the layer's output features; or (condition, reason)."""
    if "result" in c.cache:
        return c.cache["result"]
    c.cache["result"] = result = _compute_after(c, view, ctx)
    return result


def _compute_after(c: LayoutAfter, view: GraphView, ctx: Context):
    f = _root_field(c.affine, view, ctx)
    if isinstance(f, tuple):
        return f
    for node in reversed(c.chain):
        f = _through(f, node, view, ctx, backward=True)
        if isinstance(f, tuple):
            return f
    _, n = _linear.dims(c.lin, view)
    vec = _linear.feature_vectors(f, n)
    if vec is None:
        return "per_feature", (
            f"the affine '{c.affine.name}' seen at '{c.lin.out.name}' varies along other axes than the {n} "
            f"output features of '{c.lin.head.name}'"
        )
    return vec


def _stage(name: str, compute):
    def check(c, view, ctx):
        result = compute(c, view, ctx)
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str):
            return result[1] if result[0] == name else None
        return None

    return check


def _lb_bn(c, view, ctx):
    return bn_inference_reason(c.affine, view) if is_op(c.affine, ops.BATCH_NORM) else None


def _lb_readers(c: LayoutBefore, view, ctx):
    if c.others:
        u = c.others[0]
        return (
            f"'{c.affine.name}' reaches '{u.name}' ({u.op}), which is neither a layout op "
            f"({', '.join(sorted(_linear.LAYOUT_OPS))}) nor a linear layer reading it as its input"
        )
    return None


def _lb_single_use(c: LayoutBefore, view, ctx):
    if c.escaping:
        return f"tensor '{c.escaping[0].name}' is a graph output"
    return None


def _lb_layout(c: LayoutBefore, view, ctx):
    for lin in c.linears:
        reason = _linear.layout_reason(lin, view, ctx)
        if reason:
            return reason
    return None


def _lb_fusion(c: LayoutBefore, view, ctx):
    if ctx.options.allow_cost_increase:
        return None
    return breaks_fusion([c.affine] + c.layout + [n for lin in c.linears for n in lin.nodes], view)


def _la_single_use(c: LayoutAfter, view, ctx):
    nodes = c.chain + [c.affine]
    for t in c.lin.internal_tensors():
        reason = outside_reader_reason(t, [c.lin.nodes[-1]], view)
        if reason:
            return reason
    prev, extra = c.lin.out, c.shapes  # a Shape of the layer's output reads the new layer's
    for node in nodes:
        reason = outside_reader_reason(prev, [node] + extra, view)
        if reason:
            return reason
        prev, extra = node.outputs[0], []
    return None


def _la_layout(c: LayoutAfter, view, ctx):
    return _linear.layout_reason(c.lin, view, ctx)


def _la_fusion(c: LayoutAfter, view, ctx):
    if ctx.options.allow_cost_increase:
        return None
    return breaks_fusion([c.affine] + c.chain + c.lin.nodes, view)


LAYOUT_BEFORE_CONDITIONS = [
    ("inference_bn", _lb_bn),
    ("readers", _lb_readers),
    ("single_use", _lb_single_use),
    ("layout", _lb_layout),
    ("static_shape", _stage("static_shape", _before_vectors)),
    ("per_feature", _stage("per_feature", _before_vectors)),
    ("pool_border", _stage("pool_border", _before_vectors)),
    ("runtime_fusion", _lb_fusion),
]

LAYOUT_AFTER_CONDITIONS = [
    ("inference_bn", _lb_bn),
    ("single_use", _la_single_use),
    ("layout", _la_layout),
    ("static_shape", _stage("static_shape", _after_vectors)),
    ("per_feature", _stage("per_feature", _after_vectors)),
    ("pool_border", _stage("pool_border", _after_vectors)),
    ("runtime_fusion", _la_fusion),
]


def _is_affine(node: gs.Node, view: GraphView) -> bool:
    return affine_data_input(node, view) is not None


def _copy(node: gs.Node, data: gs.Tensor, out: gs.Tensor, ctx: Context) -> NewNode:
    return NewNode(node.op, ctx.fresh_name(node.name or node.op), dict(node.attrs), [data] + list(node.inputs[1:]), [out])


def _rewrite_before(c: LayoutBefore, view: GraphView, ctx: Context) -> list[Plan]:
    vectors = _before_vectors(c, view, ctx)
    made = {id(c.affine.outputs[0]): affine_data_input(c.affine, view)}
    layout_nodes = []
    for node in c.layout:
        out = ctx.like(f"{node.outputs[0].name}.unscaled", node.outputs[0])
        layout_nodes.append(_copy(node, made[id(view.source(node.inputs[0]))], out, ctx))
        made[id(node.outputs[0])] = out
    plans = []
    for i, (lin, (s, t)) in enumerate(zip(c.linears, vectors)):
        w, b = _linear.params(lin, view)
        b = b + t @ w
        w *= s[:, None]
        x = made[id(view.source(lin.head.inputs[0]))]
        dtype = view.constant(lin.head.inputs[1]).dtype
        rank = 2 if lin.is_gemm else _linear.rank_of(lin.x, ctx)
        nodes = _linear.emit(ctx, lin.head.name or "linear", x, w, b, dtype, lin.out, rank)
        plans.append(Plan(lin.out, (layout_nodes if i == 0 else []) + nodes, ""))
    names = ", ".join(f"'{lin.head.name}'" for lin in c.linears)
    plans[0].summary = (
        f"{c.affine.op} '{c.affine.name}' folded through {len(c.layout)} layout op(s) into {names} (before)"
    )
    return plans


def _rewrite_after(c: LayoutAfter, view: GraphView, ctx: Context) -> Plan:
    s, t = _after_vectors(c, view, ctx)
    w, b = _linear.params(c.lin, view)
    w *= s[None, :]
    b = s * b + t
    dtype = view.constant(c.lin.head.inputs[1]).dtype
    rank = 2 if c.lin.is_gemm else _linear.rank_of(c.lin.x, ctx)
    name = c.lin.head.name or "linear"
    summary = f"{c.affine.op} '{c.affine.name}' folded back through {len(c.chain)} layout op(s) into {c.lin.head.op} '{c.lin.head.name}' (after)"
    # a chain of reshapes, the affine and one reshape after it: one reshape (or none)
    users = view.users(c.affine.outputs[0])
    lin_shape = _shape(c.lin.out, view, ctx)
    if (
        not c.shapes  # the Reshape after A may read them: it stays, and they read the new layer
        and all(n.op in _linear.RESHAPE_LIKE for n in c.chain)
        and len(users) == 1
        and is_op(users[0], *_linear.RESHAPE_LIKE)
        and _data_reads(users[0], view.source(c.affine.outputs[0]), view)
        and not view.escapes(c.affine.outputs[0])
        and lin_shape is not None
    ):
        final = users[0].outputs[0]
        shape = _shape(final, view, ctx)
        if shape is not None and tuple(shape) == tuple(lin_shape):
            plan = Plan(final, _linear.emit(ctx, name, c.lin.x, w, b, dtype, final, rank), summary)
            return _with_shapes(plan, final, c, ctx)
        if shape is not None and all(isinstance(d, int) and d > 0 for d in shape):
            mid = ctx.like(f"{name}.out", c.lin.out)
            nodes = _linear.emit(ctx, name, c.lin.x, w, b, dtype, mid, rank)
            const = ctx.constant(f"{name}.shape", np.array(shape, dtype=np.int64))
            nodes.append(NewNode(ops.RESHAPE, ctx.fresh_name(f"{name}/reshape"), {}, [mid, const], [final]))
            return _with_shapes(Plan(final, nodes, summary), mid, c, ctx)
    first = prev = ctx.like(f"{name}.out", c.lin.out)
    nodes = _linear.emit(ctx, name, c.lin.x, w, b, dtype, prev, rank)
    for i, node in enumerate(c.chain):
        out = c.affine.outputs[0] if i == len(c.chain) - 1 else ctx.like(f"{node.outputs[0].name}.scaled", node.outputs[0])
        nodes.append(_copy(node, prev, out, ctx))
        prev = out
    return _with_shapes(Plan(c.affine.outputs[0], nodes, summary), first, c, ctx)


def _with_shapes(plan: Plan, out: gs.Tensor, c: LayoutAfter, ctx: Context) -> Plan | list[Plan]:
    """``plan``, and a Shape of the new layer's output ``out`` (the old one's shape) for each Shape
    node that read the old layer's output."""
    if not c.shapes:
        return plan
    extra = [
        Plan(sh.outputs[0], [NewNode(ops.SHAPE, ctx.fresh_name(sh.name or ops.SHAPE), dict(sh.attrs), [out], [sh.outputs[0]])])
        for sh in c.shapes
    ]
    return [plan] + extra


@register
class LinearAffine:
    name = "linear-affine"
    summary = "per-feature BN / Mul / Div / Add / Sub by constants before or after a Gemm or MatMul -> into it"

    def match(self, view: GraphView, ctx: Context):
        for node in view.graph.nodes:
            lin = _linear.as_linear(node, view)
            if lin is None:
                continue
            users = view.users(lin.out)
            if len(users) == 1 and affine_data_input(users[0], view) is not None:
                if view.source(affine_data_input(users[0], view)) is lin.out:
                    yield Match(f"{node.name}->{users[0].name}", lin.nodes + [users[0]], Candidate(lin, users[0], AFTER))
            prev = view.producer(lin.x)
            if prev is not None and affine_data_input(prev, view) is not None:
                yield Match(f"{prev.name}->{node.name}", [prev] + lin.nodes, Candidate(lin, prev, BEFORE))
        for node in view.graph.nodes:
            if not _is_affine(node, view) or len(node.outputs) < 1:
                continue
            tree = _before_tree(node, view)
            direct = not tree.layout and len(tree.linears) == 1
            if tree.linears and not direct:
                nodes = [node] + tree.layout + [n for lin in tree.linears for n in lin.nodes]
                yield Match(f"{node.name}->layout->{tree.linears[0].head.name}", nodes, tree)
            after = _after_chain(node, view)
            if after is not None:
                nodes = after.lin.nodes + after.chain + [node] + after.shapes
                yield Match(f"{after.lin.head.name}->layout->{node.name}", nodes, after)

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        if isinstance(match.data, LayoutBefore):
            return run_checks(LAYOUT_BEFORE_CONDITIONS, match.data, view, ctx)
        if isinstance(match.data, LayoutAfter):
            return run_checks(LAYOUT_AFTER_CONDITIONS, match.data, view, ctx)
        return run_checks(CONDITIONS, match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> Plan | list[Plan]:
        if isinstance(match.data, LayoutBefore):
            return _rewrite_before(match.data, view, ctx)
        if isinstance(match.data, LayoutAfter):
            return _rewrite_after(match.data, view, ctx)
        c: Candidate = match.data
        aff = _affine(c, view, ctx)
        w, b = _linear.params(c.lin, view)
        if c.side == AFTER:
            w *= aff.scale[None, :]
            b = aff.scale * b + aff.shift
            x, target = c.lin.head.inputs[0], c.affine.outputs[0]
        else:
            b = b + aff.shift @ w
            w *= aff.scale[:, None]
            x, target = affine_data_input(c.affine, view), c.lin.out
        dtype = view.constant(c.lin.head.inputs[1]).dtype
        nodes = _linear.emit(ctx, c.lin.head.name or "linear", x, w, b, dtype, target, _rank(c, view, ctx))
        return Plan(target, nodes, f"{c.affine.op} '{c.affine.name}' folded into {c.lin.head.op} '{c.lin.head.name}' ({c.side})")
