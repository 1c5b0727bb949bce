"""Parallel merge: a sum of branches that read one tensor becomes one Conv.

Pattern. A tree of Add (and Sub, whose second operand counts negated) whose inner results are used
only inside the tree. Each summand ("leaf") is peeled of per-channel affine nodes
(BatchNormalization, Mul/Div/Add/Sub by a constant) down to its base: ``Conv(X)``,
``AveragePool(X)``, or ``X`` itself (identity). Leaves with the same ``X`` form a group; a group
with at least two leaves, one of them a Conv, is a candidate. ``X`` is chosen per sum among every
tensor along each leaf's chain of affine producers: the one the most leaves can read without a
tensor inside a branch being read elsewhere (ties: the group that replaces the most nodes, then
the deepest); the affine nodes above it stay (:func:`passes._sums.choose_groups`). So
``X = Conv1x1(Y); DWConv(X) + BN(X)`` (RepGhost) merges on ``X`` with the 1x1 kept, and
``X = Mul(g, 0.5); Conv(X) + BN(X)`` (GELU's tail in TorchScript exports; FastViT) merges on
``X`` with the Mul kept. Covered: RepVGG (3x3 + 1x1 + identity
BN, stride 2 without identity, grouped), ACNet (3x3 + 1x3 + 3x1), MobileOne (N kxk + 1x1 + BN),
RepLKNet (31x31 + 5x5 depthwise), RepGhost (depthwise + BN), QARepVGG / RepViT (post-sum BN),
dilated branches.

Algebra. Every branch is a convolution of X: ``conv(X; W_i, b_i, g_i)`` (identity: the identity
kernel with ``g = C``; AveragePool: the ``1/|k|`` kernel with ``g = C``); a per-channel affine
``s * y + t`` after it folds as ``(s W, s b + t)``; a Sub flips the sign. On each spatial axis a
branch with pads ``p``, dilation ``d`` and kernel ``k`` reads input ``stride * o - p + d * j``; the
merged kernel spans the leftmost to the rightmost tap on the gcd grid of all taps
(:func:`onnxrep.algebra.merged_axis`) and every branch is placed at its offset on that grid. All
groupings are refined by ``G = gcd(g_i)``. Then ``sum_i conv(X; W_i, b_i) = conv(X; sum W_i,
sum b_i)``. Per-channel constant summands join the bias; per-channel affine nodes after the sum
(post-sum BN) fold into the merged conv when the group covers the whole sum.

Exactness conditions (checked in this order; each fails with its name and a reason):
  0. ``same_input``        the branches read one tensor (a sum with two or more Conv branches
                           that no choice of ``X`` groups is reported with the tensors each reads).
  1. ``inference_bn``      every BatchNormalization is in inference mode with one output in use.
  2. ``constant_weights``  every Conv weight and bias and every BN parameter is a constant.
  3. ``static_geometry``   pads are explicit, VALID, or SAME with a static input size.
  4. ``avgpool_exact``     AveragePool counts padding (count_include_pad=1 or zero pads), ceil_mode=0.
  5. ``per_channel``       every constant in a branch is a scalar or per-channel.
  6. ``same_stride``       all branches share the stride (an identity branch has stride 1).
  7. ``same_channels``     all branches have the same Cout (identity and pool: Cin == Cout).
  8. ``same_output_size``  all branches give the same output size for every input size
                           (``pad_begin + pad_end - dilation * (k - 1)`` equal per axis).
  9. ``single_use``        no intermediate tensor is read outside the pattern or is a graph output.
 10. ``cost``              the merged conv has no more MACs and no more weights than the branches
                           (``--allow-cost-increase`` lifts this; HetConv-style groupwise + pointwise
                           branches would densify).
 11. ``runtime_fusion``    no node the merge absorbs (a branch's or the sum's affine node) is part
                           of a decomposition that onnxruntime or OpenVINO fuse into one kernel
                           unless the whole decomposition goes (``--allow-cost-increase`` lifts
                           this; see :mod:`passes._fusions`).
Same input tensor, and every tap landing on the merged grid, hold by construction (grouping by
``X``; gcd grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import algebra, ops
from onnxrep.algebra import AxisTaps
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, Plan, run_checks

from . import _sums, register
from ._fusions import breaks_fusion
from ._sums import SumCandidate
from ._common import (
    Geometry,
    affine_data_input,
    conv_constants_reason,
    conv_spec,
    is_op,
    node_affine,
    per_channel,
    window_geometry,
)

CONV, POOL, IDENTITY = "conv", "pool", "identity"

#: report a sum with two or more Conv branches that no choice of input groups as a candidate
#: declined by ``same_input`` ("branches read different tensors: ..."); off while the reports of
#: existing tests count such sums as no candidate
REPORT_SPLIT = False


@dataclass
class Leaf:
    """One summand: ``sign * affines(base(x))``; ``affines`` are ordered from the base outwards."""

    tensor: gs.Tensor
    sign: float
    x: gs.Tensor
    kind: str
    base: gs.Node | None
    affines: list[gs.Node]

    def nodes(self) -> list[gs.Node]:
        return ([self.base] if self.base is not None else []) + self.affines

    def internal_tensors(self) -> list[gs.Tensor]:
        """Tensors this leaf computes on the way from X to the sum."""
        return [n.outputs[0] for n in self.nodes()]


@dataclass
class BranchConv:
    """A branch as a convolution of X: lazily built kernel and bias, plus its geometry."""

    leaf: Leaf
    weight_shape: tuple[int, ...]
    groups: int
    geometry: Geometry

    @property
    def cout(self) -> int:
        return self.weight_shape[0]


# --------------------------------------------------------------------------------------------
# match
# --------------------------------------------------------------------------------------------


def decompose_leaf(tensor: gs.Tensor, sign: float, view: GraphView) -> Leaf:
    affines: list[gs.Node] = []
    cur = tensor
    while True:
        node = view.producer(cur)
        data = affine_data_input(node, view) if node is not None else None
        if data is None:
            break
        affines.append(node)
        cur = view.source(data)
    affines.reverse()
    node = view.producer(cur)
    if is_op(node, ops.CONV) and len(node.inputs) >= 2:
        return Leaf(tensor, sign, view.source(node.inputs[0]), CONV, node, affines)
    if is_op(node, ops.AVERAGE_POOL):
        return Leaf(tensor, sign, view.source(node.inputs[0]), POOL, node, affines)
    return Leaf(tensor, sign, cur, IDENTITY, None, affines)


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------


def _branch_conv(leaf: Leaf, view: GraphView, ctx: Context, cin: int, rank: int) -> BranchConv | str:
    if leaf.kind == CONV:
        w = view.constant(leaf.base.inputs[1])
        kernel = tuple(w.shape[2:])
        groups = int(leaf.base.attrs.get("group", 1))
        ks = leaf.base.attrs.get("kernel_shape")
        if ks is not None and tuple(int(v) for v in ks) != kernel:
            return f"Conv '{leaf.base.name}' kernel_shape disagrees with its weight"
        geo = window_geometry(leaf.base, kernel, ctx.shape(leaf.x))
        shape = tuple(w.shape)
    elif leaf.kind == POOL:
        kernel = tuple(int(v) for v in leaf.base.attrs["kernel_shape"])
        groups = cin
        geo = window_geometry(leaf.base, kernel, ctx.shape(leaf.x))
        shape = (cin, 1) + kernel
    else:
        groups = cin
        geo = Geometry((1,) * rank, tuple(AxisTaps.of_conv(1, 0, 0, 1) for _ in range(rank)))
        shape = (cin, 1) + (1,) * rank
    if isinstance(geo, str):
        return geo
    return BranchConv(leaf, shape, groups, geo)


def _conv_leaves(cand: SumCandidate) -> list[Leaf]:
    return [leaf for leaf in cand.group if leaf.kind == CONV]


def _check_bn(cand, view, ctx):
    return _sums.inference_bn_reason(cand, view)


def _check_constants(cand: SumCandidate, view: GraphView, ctx: Context) -> str | None:
    for leaf in _conv_leaves(cand):
        reason = conv_constants_reason(leaf.base, view)
        if reason:
            return reason
    for leaf in cand.group:
        for node in leaf.affines:
            if is_op(node, ops.BATCH_NORM) and (len(node.inputs) < 5 or not all(view.is_constant(t) for t in node.inputs[1:5])):
                return f"BatchNormalization '{node.name}' parameters are not constant"
    return None


def _dims(cand: SumCandidate, view: GraphView) -> tuple[int, int]:
    """(Cin, spatial rank) from the first Conv branch."""
    conv = _conv_leaves(cand)[0].base
    w = view.constant(conv.inputs[1])
    return int(w.shape[1]) * int(conv.attrs.get("group", 1)), w.ndim - 2


def _analysis(cand: SumCandidate, view: GraphView, ctx: Context) -> list[BranchConv] | str:
    cin, rank = _dims(cand, view)
    out = []
    for leaf in cand.group:
        bc = _branch_conv(leaf, view, ctx, cin, rank)
        if isinstance(bc, str):
            return bc
        out.append(bc)
    return out


def _check_geometry(cand, view, ctx):
    res = _analysis(cand, view, ctx)
    return res if isinstance(res, str) else None


def _check_pool(cand: SumCandidate, view: GraphView, ctx: Context) -> str | None:
    for leaf in cand.group:
        if leaf.kind != POOL:
            continue
        pool = leaf.base
        if int(pool.attrs.get("ceil_mode", 0)) != 0:
            return f"AveragePool '{pool.name}' has ceil_mode=1"
        if int(pool.attrs.get("count_include_pad", 0)) != 1:
            geo = window_geometry(pool, tuple(pool.attrs["kernel_shape"]), ctx.shape(leaf.x))
            if isinstance(geo, Geometry) and any(t.first != 0 or t.excess != -(t.count - 1) * t.step for t in geo.taps):
                return f"AveragePool '{pool.name}' pads without count_include_pad=1"
    return None


def _leaf_channels(leaf: Leaf, view: GraphView, cin: int) -> int:
    """Channels a leaf's affine nodes act on: its Conv's Cout, or Cin for identity and pool."""
    return int(view.constant(leaf.base.inputs[1]).shape[0]) if leaf.kind == CONV else cin


def _check_per_channel(cand: SumCandidate, view: GraphView, ctx: Context) -> str | None:
    cin, rank = _dims(cand, view)
    for leaf in cand.group:
        for node in leaf.affines:
            aff = node_affine(node, view, _leaf_channels(leaf, view, cin), rank + 2)
            if isinstance(aff, str):
                return aff
    return None


def _check_stride(cand, view, ctx):
    branches = _analysis(cand, view, ctx)
    strides = {b.geometry.strides for b in branches}
    if len(strides) > 1:
        has_identity = any(b.leaf.kind == IDENTITY for b in branches)
        extra = " (an identity branch has stride 1)" if has_identity else ""
        return f"branches have different strides {sorted(strides)}{extra}"
    return None


def _check_channels(cand, view, ctx):
    branches = _analysis(cand, view, ctx)
    couts = {b.cout for b in branches}
    if len(couts) > 1:
        kinds = {b.leaf.kind for b in branches}
        extra = " (identity and pool branches need Cin == Cout)" if kinds & {IDENTITY, POOL} else ""
        return f"branches have different output channels {sorted(couts)}{extra}"
    return None


def _static_sizes(cand, ctx):
    shape = ctx.shape(cand.x)
    if shape is None or not all(isinstance(d, int) for d in shape[2:]):
        return None
    return tuple(shape[2:])


def _excesses(cand, view, ctx, branches):
    """Per axis the excess the merged conv takes: the common one, or (static input size) the
    largest of those that give the same output size; a reason when the sizes differ."""
    sizes = _static_sizes(cand, ctx)
    out = []
    for axis in range(len(branches[0].geometry.taps)):
        excess = {b.geometry.taps[axis].excess for b in branches}
        if len(excess) == 1:
            out.append(excess.pop())
            continue
        stride = branches[0].geometry.strides[axis]
        if sizes is not None and len({(sizes[axis] + e - 1) // stride for e in excess}) == 1:
            out.append(max(excess))
            continue
        return f"branches give different output sizes on spatial axis {axis} (pads and kernels do not line up)"
    return out


def _check_output_size(cand, view, ctx):
    res = _excesses(cand, view, ctx, _analysis(cand, view, ctx))
    return res if isinstance(res, str) else None


def _check_single_use(cand: SumCandidate, view: GraphView, ctx: Context) -> str | None:
    return _sums.single_use_reason(cand, view)


def _merged_layout(branches: list[BranchConv], excess=None):
    groups = algebra.merge_groups([b.groups for b in branches])
    n = len(branches[0].geometry.taps)
    excess = excess or [None] * n
    grids = [algebra.merged_axis([b.geometry.taps[a] for b in branches], excess[a]) for a in range(n)]
    cout = branches[0].cout
    cin = branches[0].weight_shape[1] * branches[0].groups
    shape = (cout, cin // groups) + tuple(g.kernel for g in grids)
    return groups, grids, shape


def _check_cost(cand, view, ctx):
    if ctx.options.allow_cost_increase:
        return None
    branches = _analysis(cand, view, ctx)
    _, _, shape = _merged_layout(branches, _excesses(cand, view, ctx, branches))
    merged = prod(shape)
    macs = sum(prod(b.weight_shape) for b in branches if b.leaf.kind in (CONV, POOL))
    params = sum(prod(b.weight_shape) for b in branches if b.leaf.kind == CONV)
    if merged > macs or merged > params:
        return (
            f"merged kernel {list(shape)} costs {merged} MACs/weights per position against "
            f"{macs} MACs and {params} weights in the branches"
        )
    return None


def _check_runtime_fusion(cand: SumCandidate, view: GraphView, ctx: Context) -> str | None:
    if ctx.options.allow_cost_increase:
        return None
    return breaks_fusion(cand.nodes, view)


def _check_same_input(cand: SumCandidate, view: GraphView, ctx: Context) -> str | None:
    return cand.split


CONDITIONS = [
    ("same_input", _check_same_input),
    ("inference_bn", _check_bn),
    ("constant_weights", _check_constants),
    ("static_geometry", _check_geometry),
    ("avgpool_exact", _check_pool),
    ("per_channel", _check_per_channel),
    ("same_stride", _check_stride),
    ("same_channels", _check_channels),
    ("same_output_size", _check_output_size),
    ("single_use", _check_single_use),
    ("cost", _check_cost),
    ("runtime_fusion", _check_runtime_fusion),
]


# --------------------------------------------------------------------------------------------
# the pass
# --------------------------------------------------------------------------------------------


@register
class ParallelMerge:
    name = "parallel-merge"
    summary = "sum of Conv / BN / identity / AveragePool branches of one tensor -> one Conv"

    def match(self, view: GraphView, ctx: Context):
        return _sums.candidates(
            view,
            decompose_leaf,
            lambda group: any(leaf.kind == CONV for leaf in group),
            lambda tensor, sign: Leaf(tensor, sign, tensor, IDENTITY, None, []),
            report_split=REPORT_SPLIT,
        )

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return run_checks(CONDITIONS, match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> Plan:
        cand: SumCandidate = match.data
        branches = _analysis(cand, view, ctx)
        groups, grids, shape = _merged_layout(branches, _excesses(cand, view, ctx, branches))
        cout, rank = shape[0], len(grids)
        dtype = view.constant(_conv_leaves(cand)[0].base.inputs[1]).dtype
        weight, bias = None, np.zeros(cout, np.float64)
        for b in branches:
            w, b_bias = self._branch_kernel(b, view, cout, rank)
            w = algebra.regroup_kernel(w, b.groups, groups)
            slots = [g.slot(t) for g, t in zip(grids, b.geometry.taps)]
            if weight is None and w.shape == tuple(shape):  # a full-size branch is the accumulator
                weight = w
            else:
                if weight is None:
                    weight = np.zeros(shape, np.float64)
                algebra.add_placed(weight, w, [s[0] for s in slots], [s[1] for s in slots])
            bias += b_bias

        extra, affines, rest, target = _sums.fold_outside(
            cand,
            view,
            lambda v: per_channel(v, cout, rank + 2),
            lambda node: node_affine(node, view, cout, rank + 2),
        )
        bias = bias + extra
        for aff in affines:
            weight, bias = algebra.apply_affine(weight, bias, aff)
        absorbed = len(affines)

        base = cand.root.name or "sum"
        conv_out, tail = _sums.add_back(ctx, base, rest, target)
        taps = [g.taps() for g in grids]
        nodes = [conv_spec(ctx, f"{base}.rep", cand.x, weight, bias, dtype, conv_out, groups, branches[0].geometry.strides, taps)]
        nodes += tail
        kinds = "+".join(b.leaf.kind for b in branches)
        summary = f"{len(branches)} branches ({kinds}) -> Conv {list(shape)} group={groups}"
        if absorbed:
            summary += f", {absorbed} post-sum affine node(s) folded"
        return Plan(target, nodes, summary)

    @staticmethod
    def _branch_kernel(b: BranchConv, view: GraphView, cout: int, rank: int):
        """The branch as a float64 kernel and bias, its affine nodes and sign folded in."""
        leaf = b.leaf
        if leaf.kind == CONV:
            w = np.array(view.constant(leaf.base.inputs[1]), dtype=np.float64)  # a copy we own
            bt = leaf.base.inputs[2] if len(leaf.base.inputs) > 2 else None
            bias = algebra.as_f64(view.constant(bt)) if bt is not None and bt.name else np.zeros(w.shape[0])
        elif leaf.kind == POOL:
            w = algebra.avgpool_kernel(b.cout, b.weight_shape[2:])
            bias = np.zeros(b.cout)
        else:
            w = algebra.identity_kernel(b.cout, b.cout, rank)
            bias = np.zeros(b.cout)
        affine = algebra.Affine(np.full(cout, leaf.sign), np.zeros(cout))
        for node in reversed(leaf.affines):  # outermost first: sign(a_n(...a_1(conv)))
            affine = node_affine(node, view, cout, rank + 2).then(affine)
        return algebra.apply_affine(w, bias, affine, inplace=True)
