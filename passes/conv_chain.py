"""Conv chain: two convolutions in a row, nothing nonlinear between them, become one Conv.

Pattern. ``Conv1 -> Conv2`` (Conv2 may be an AveragePool, a depthwise conv with a ``1/|k|`` kernel)
where Conv1's output is read by nothing else; or ``Conv1 -> ring -> Conv2`` where ``ring`` pads
Conv1's output and fills the border with one value per channel (DBB's BNAndPadLayer, in any of its
spellings: Pad and scatter writes, ``Concat(strip, Y, strip)`` along each spatial axis in either
order, ``Sub(b) -> Pad(0) -> Add(b)``; see :mod:`onnxrep.passes._ring`, which recognizes a ring from
what it computes). :func:`shift_ring_reason` tells affine-fold which Add/Sub nodes belong to a ring
this pass takes whole. Covers DBB's 1x1->kxk and 1x1->avg branches, ResRep's compactor
after a conv, pointwise pairs (1x1 C->4C -> 1x1 4C->C of a depth-pruned ConvNeXt block), and their
grouped forms.

Algebra (:func:`onnxrep.algebra.compose_pointwise_first` / ``compose_pointwise_last``). Both
kernels are brought to the grouping ``G = gcd(g1, g2)``. With Conv1 a 1x1 (stride 1, no pads) the
merged conv has Conv2's geometry and ``W = W2 . W1``, ``b = b2 + sum W2 b1``; with Conv2 a 1x1
(stride 1, no pads) it has Conv1's geometry and ``W = W2 . W1``, ``b = b2 + W2 b1``. A ring of pads
``p`` moves to the front: the merged conv pads its input by ``p`` (plus Conv2's own pads).

Exactness conditions (checked in this order):
  1. ``constant_weights``  both weights and biases are constants.
  2. ``static_geometry``   both convs' pads are known (SAME needs a static input size).
  3. ``avgpool_exact``     an AveragePool counts its padding and has ceil_mode=0.
  4. ``pointwise``         Conv1 or Conv2 is a 1x1 with stride 1 and no pads (with a ring: Conv1).
  5. ``ring``              the nodes between the convs form a padding ring whose value per channel
                           equals Conv1's bias (its response to a zero input) within 4 ulps.
  6. ``border``            when Conv1 comes first, Conv2 pads with zeros, and Conv1's bias is not
                           zero, the merge would put ``b1`` where Conv2 read zeros: skipped.
  7. ``single_use``        Conv1's output (and every tensor of a ring) is read by nothing else.
  8. ``cost``              the merged conv has no more MACs per output and no more weights than
                           the two (a depthwise kxk -> dense 1x1 would densify). Not charged: a
                           chain whose result is a branch of a sum that also holds a Conv of the
                           same input with at least the merged kernel, when parallel-merge's own
                           conditions accept that sum with the merged conv in the chain's place
                           (checked here on a stand-in node, so that a sum parallel-merge would
                           decline, e.g. for ``single_use``, does not leave the dearer conv behind).
                           The engine checks the net cost of the whole run as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import algebra, ops
from onnxrep.algebra import AxisTaps
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, Plan, run_checks

from . import _ring, register
from ._common import (
    Geometry,
    affine_data_input,
    conv_constants_reason,
    conv_geometry,
    conv_groups,
    conv_params,
    conv_attrs,
    conv_spec,
    conv_weight,
    has_padding,
    is_op,
    outside_reader_reason,
    window_geometry,
)
from . import _sums
from ._sums import root_of
from .parallel_merge import CONV as LEAF_CONV
from .parallel_merge import IDENTITY as LEAF_IDENTITY
from .parallel_merge import Leaf, ParallelMerge, decompose_leaf

FIRST, LAST = "pointwise-first", "pointwise-last"


@dataclass
class Candidate:
    conv1: gs.Node
    node2: gs.Node  # Conv or AveragePool
    between: gs.Tensor  # conv1's output
    ring_nodes: list[gs.Node] = field(default_factory=list)  # empty: a plain chain
    ring_region: list[gs.Node] | None = None

    @property
    def has_ring(self) -> bool:
        return self.ring_region is not None


def _is_pool(node: gs.Node) -> bool:
    return is_op(node, ops.AVERAGE_POOL)


def _x(c: Candidate, view: GraphView) -> gs.Tensor:
    return view.source(c.conv1.inputs[0])


def _channels(c: Candidate, view: GraphView) -> int:
    return int(conv_weight(c.conv1, view).shape[0])


def _geometry2(c: Candidate, view: GraphView, ctx: Context) -> Geometry | str:
    inp = view.source(c.node2.inputs[0])
    if _is_pool(c.node2):
        return window_geometry(c.node2, tuple(int(v) for v in c.node2.attrs["kernel_shape"]), ctx.shape(inp))
    return conv_geometry(c.node2, view, ctx.shape(inp))


def _geometry1(c: Candidate, view: GraphView, ctx: Context) -> Geometry | str:
    return conv_geometry(c.conv1, view, ctx.shape(_x(c, view)))


def _second(c: Candidate, view: GraphView) -> tuple[np.ndarray, np.ndarray, int]:
    """Conv2 (or the pool as a depthwise conv) as (float64 weight, bias, groups)."""
    if _is_pool(c.node2):
        ch = _channels(c, view)
        return algebra.avgpool_kernel(ch, [int(v) for v in c.node2.attrs["kernel_shape"]]), np.zeros(ch), ch
    w, b = conv_params(c.node2, view)
    return w, b, conv_groups(c.node2)


def _is_pointwise(geo: Geometry) -> bool:
    return all(t.count == 1 for t in geo.taps) and all(s == 1 for s in geo.strides) and not has_padding(geo)


def _mode(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if _is_pointwise(_geometry1(c, view, ctx)):
        return FIRST
    if not c.has_ring and _is_pointwise(_geometry2(c, view, ctx)):
        return LAST
    return None


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def _check_constants(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    for node in (c.conv1, c.node2):
        if is_op(node, ops.CONV):
            reason = conv_constants_reason(node, view)
            if reason:
                return reason
    return None


def _check_geometry(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    for geo in (_geometry1(c, view, ctx), _geometry2(c, view, ctx)):
        if isinstance(geo, str):
            return geo
    return None


def _check_pool(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if not _is_pool(c.node2):
        return None
    if int(c.node2.attrs.get("ceil_mode", 0)) != 0:
        return f"AveragePool '{c.node2.name}' has ceil_mode=1"
    if int(c.node2.attrs.get("count_include_pad", 0)) != 1 and has_padding(_geometry2(c, view, ctx)):
        return f"AveragePool '{c.node2.name}' pads without count_include_pad=1"
    return None


def _check_pointwise(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if _mode(c, view, ctx) is None:
        if c.has_ring:
            return f"Conv '{c.conv1.name}' before the padding ring is not a 1x1 with stride 1 and no pads"
        return "neither conv is a 1x1 with stride 1 and no pads"
    return None


def _candidate_ring(c: Candidate, view: GraphView, ctx: Context):
    y = view.source(c.node2.inputs[0])
    return _ring.analyze(view, c.between, y, ctx.shape(c.between), ctx.opsets)


def _check_ring(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if not c.has_ring:
        return None
    if isinstance(c.ring_region, str):
        return c.ring_region
    ring = _candidate_ring(c, view, ctx)
    if isinstance(ring, str):
        return ring
    _, b1 = conv_params(c.conv1, view)
    dtype = conv_weight(c.conv1, view).dtype
    tol = 4 * np.spacing(np.maximum(np.abs(ring.values), np.abs(b1)).astype(dtype)).astype(np.float64)
    if np.any(np.abs(ring.values - b1) > tol):
        worst = int(np.argmax(np.abs(ring.values - b1) - tol))
        return (
            f"the padding ring holds {ring.values[worst]:.7g} on channel {worst}, not the bias "
            f"{b1[worst]:.7g} of Conv '{c.conv1.name}'"
        )
    return None


def _check_border(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if _mode(c, view, ctx) != FIRST or not has_padding(_geometry2(c, view, ctx)):
        return None
    _, b1 = conv_params(c.conv1, view)
    if np.any(b1 != 0):
        return (
            f"'{c.node2.name}' pads with zeros where the merged conv would see the bias of "
            f"'{c.conv1.name}' (no padding ring)"
        )
    return None


def _check_single_use(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    readers = [*c.ring_nodes, c.node2]
    for t in [c.between] + [o for n in c.ring_nodes for o in n.outputs]:
        reason = outside_reader_reason(t, readers, view)
        if reason:
            return reason
    return None


def _layout(c: Candidate, view: GraphView, ctx: Context):
    """(groups, merged weight shape) without computing the weights."""
    w1 = conv_weight(c.conv1, view)
    g1 = conv_groups(c.conv1)
    if _is_pool(c.node2):
        ch = _channels(c, view)
        shape2, g2 = (ch, 1) + tuple(int(v) for v in c.node2.attrs["kernel_shape"]), ch
    else:
        shape2, g2 = conv_weight(c.node2, view).shape, conv_groups(c.node2)
    groups = algebra.merge_groups([g1, g2])
    cin = w1.shape[1] * g1
    kernel = shape2[2:] if _mode(c, view, ctx) == FIRST else w1.shape[2:]
    return groups, (shape2[0], cin // groups) + tuple(kernel), w1.shape, shape2, g2


def _merged_geometry(c: Candidate, view: GraphView, ctx: Context) -> tuple[tuple[int, ...], list[AxisTaps]]:
    """Strides and per-axis taps of the merged conv."""
    if _mode(c, view, ctx) == LAST:
        geo = _geometry1(c, view, ctx)
        return geo.strides, list(geo.taps)
    geo = _geometry2(c, view, ctx)
    taps = list(geo.taps)
    if c.has_ring:
        pads = _candidate_ring(c, view, ctx).pads
        rank = len(taps)
        taps = [
            AxisTaps(t.first - pads[i], t.step, t.count, t.excess + pads[i] + pads[i + rank])
            for i, t in enumerate(taps)
        ]
    return geo.strides, taps


def _stand_in(c: Candidate, view: GraphView, ctx: Context, shape: tuple, groups: int) -> gs.Node:
    """A Conv node shaped like the merged one (zero weights), linked to fresh tensors only: the
    graph is not touched. Parallel-merge's conditions read it in place of the chain."""
    strides, taps = _merged_geometry(c, view, ctx)
    dtype = conv_weight(c.conv1, view).dtype
    name = f"{c.node2.name or 'chain'}.merged"
    inputs = [
        gs.Variable(f"{name}.input", dtype=c.conv1.inputs[0].dtype),
        gs.Constant(f"{name}.weight", np.broadcast_to(np.zeros((), dtype), shape)),
        gs.Constant(f"{name}.bias", np.zeros(shape[0], dtype)),
    ]
    out = gs.Variable(f"{name}.output", dtype=c.node2.outputs[0].dtype)
    return gs.Node(ops.CONV, name, conv_attrs(shape, groups, strides, taps), inputs, [out])


def _absorption_reason(c: Candidate, view: GraphView, ctx: Context, shape: tuple, groups: int) -> str:
    """Why parallel-merge would not take the merged chain into a sum at no extra cost, or "".

    Absorbed: the chain's result is (through per-channel affine nodes) a branch of a sum that also
    holds a Conv of the same input whose kernel covers the merged one, and parallel-merge's own
    conditions accept that sum with the merged conv in the chain's place."""
    out = c.node2.outputs[0]
    while True:
        users = view.users(out)
        if len(users) != 1 or view.escapes(out):
            return "its result is not one branch of a sum"
        node = users[0]
        if affine_data_input(node, view) is not None:  # an Add of a constant is a shift, not a sum
            out = node.outputs[0]
            continue
        if is_op(node, *ops.SUM_OPS):
            break
        return "its result is not one branch of a sum"
    x = _x(c, view)
    stand_in = _stand_in(c, view, ctx, shape, groups)

    def decompose(tensor, sign, v):
        leaf = decompose_leaf(tensor, sign, v)
        if leaf.base is c.node2:
            return Leaf(leaf.tensor, leaf.sign, x, LEAF_CONV, stand_in, leaf.affines)
        return leaf

    match = next(
        (
            m
            for m in _sums.candidates(
                view,
                decompose,
                lambda group: any(leaf.kind == LEAF_CONV for leaf in group),
                lambda tensor, sign: Leaf(tensor, sign, tensor, LEAF_IDENTITY, None, []),
                roots=[root_of(node, view)],
            )
            if any(leaf.base is stand_in for leaf in m.data.group)
        ),
        None,
    )
    if match is None:
        return "no other branch of its sum reads the same input"
    covered = False
    for leaf in match.data.group:
        if leaf.kind != LEAF_CONV or leaf.base is stand_in or not view.is_constant(leaf.base.inputs[1]):
            continue
        w = conv_weight(leaf.base, view)
        if (
            w.shape[0] == shape[0]
            and groups % conv_groups(leaf.base) == 0
            and all(k >= m for k, m in zip(w.shape[2:], shape[2:]))
        ):
            covered = True
            break
    if not covered:
        return "no Conv of the same input in its sum covers the merged kernel"
    reason = outside_reader_reason(c.node2.outputs[0], match.nodes, view)
    if reason:
        return f"parallel-merge would decline the sum: single_use: {reason}"
    decline = ParallelMerge().check(match, view, ctx)
    if decline is not None:
        return f"parallel-merge would decline the sum: {decline}"
    return ""


def _check_cost(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if ctx.options.allow_cost_increase:
        return None
    groups, shape, shape1, shape2, _ = _layout(c, view, ctx)
    geo2 = _geometry2(c, view, ctx)
    first_rate = prod(geo2.strides) if _mode(c, view, ctx) == FIRST else 1  # conv1 positions per output
    macs = prod(shape1) * first_rate + prod(shape2)
    params = prod(shape1) + (0 if _is_pool(c.node2) else prod(shape2))
    merged = prod(shape)
    if merged <= macs and merged <= params:
        return None
    absorption = _absorption_reason(c, view, ctx, shape, groups)
    if not absorption:
        return None
    return (
        f"merged kernel {list(shape)} costs {merged} MACs/weights per output position against "
        f"{macs} MACs and {params} weights in the two, and parallel-merge would not absorb it ({absorption})"
    )


CONDITIONS = [
    ("constant_weights", _check_constants),
    ("static_geometry", _check_geometry),
    ("avgpool_exact", _check_pool),
    ("pointwise", _check_pointwise),
    ("ring", _check_ring),
    ("border", _check_border),
    ("single_use", _check_single_use),
    ("cost", _check_cost),
]


def _match_at(view: GraphView, node2: gs.Node) -> Match | None:
    """The chain that ends in ``node2`` (a Conv or AveragePool), if any."""
    if not (is_op(node2, ops.CONV) and len(node2.inputs) >= 2) and not _is_pool(node2):
        return None
    y = view.source(node2.inputs[0])
    prev = view.producer(y)
    if is_op(prev, ops.CONV) and len(prev.inputs) >= 2:
        return Match(f"{prev.name}->{node2.name}", [prev, node2], Candidate(prev, node2, y))
    a = _ring.select_chain_source(view, y)
    conv1 = view.producer(a) if a is not None else None
    if not (is_op(conv1, ops.CONV) and len(conv1.inputs) >= 2):
        return None
    region = _ring.region(view, a, y)
    ring_nodes = region if isinstance(region, list) else []
    cand = Candidate(conv1, node2, a, ring_nodes, region)
    return Match(f"{conv1.name}->ring->{node2.name}", [conv1, node2, *ring_nodes], cand)


def shift_ring_reason(view: GraphView, node: gs.Node, ctx: Context) -> str | None:
    """Why an Add/Sub ``node`` should be left to this pass, or None.

    ``node`` is a shift of a ring spelled ``Sub(b) -> Pad(0) -> Add(b)`` (see
    :func:`onnxrep.passes._ring.shift_ring_reader`) in front of a Conv or AveragePool, and either
    this pass accepts the chain from the Conv before the ring, or the ring's source is a chain of
    per-channel affines of a Conv output (a BatchNormalization, or ``Mul`` then ``Add``, that
    affine-fold folds first). Folding one of the
    shifts into a conv on its own would leave the ring check comparing a ring of 0 with a rounding
    leftover of the bias; the whole ring folds exactly here. For affine-fold, as a condition."""
    found = _ring.shift_ring_reader(view, node, ctx)
    if found is None:
        return None
    a, reader = found
    producer = view.producer(a)
    if is_op(producer, ops.CONV):
        match = _match_at(view, reader)
        if match is None or match.data.conv1 is not producer or ConvChain().check(match, view, ctx) is not None:
            return None
    elif not _affines_of_a_conv(producer, view):
        return None
    return f"{node.op} '{node.name}' is part of a padding ring before '{reader.name}', merged by conv-chain as a whole"


def _affines_of_a_conv(node: gs.Node | None, view: GraphView, depth: int = 8) -> bool:
    """Whether ``node`` ends a chain of per-channel affines (a BatchNormalization, or one written as
    ``Mul`` then ``Add``) of a Conv output, which affine-fold folds into that Conv first."""
    for _ in range(depth):
        data = affine_data_input(node, view) if node is not None else None
        if data is None:
            return False
        node = view.producer(view.source(data))
        if is_op(node, ops.CONV):
            return True
    return False


@register
class ConvChain:
    name = "conv-chain"
    summary = "Conv -> Conv (or AveragePool), one of them 1x1, optionally across a padding ring -> one Conv"

    def match(self, view: GraphView, ctx: Context):
        for node2 in view.graph.nodes:
            m = _match_at(view, node2)
            if m is not None:
                yield m

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return run_checks(CONDITIONS, match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> Plan:
        c: Candidate = match.data
        mode = _mode(c, view, ctx)
        groups, _, _, _, g2 = _layout(c, view, ctx)
        w1, b1 = conv_params(c.conv1, view)
        w2, b2, _ = _second(c, view)
        w1 = algebra.regroup_kernel(w1, conv_groups(c.conv1), groups)
        w2 = algebra.regroup_kernel(w2, g2, groups)
        if mode == FIRST:
            w, b = algebra.compose_pointwise_first(w1, b1, w2, b2, groups)
        else:
            w, b = algebra.compose_pointwise_last(w1, b1, w2, b2, groups)
        strides, taps = _merged_geometry(c, view, ctx)
        dtype = conv_weight(c.conv1, view).dtype
        target = c.node2.outputs[0]
        node = conv_spec(ctx, c.node2.name or "chain", c.conv1.inputs[0], w, b, dtype, target, groups, strides, taps)
        ring = " across a padding ring" if c.has_ring else ""
        return Plan(target, [node], f"{c.conv1.name} -> {c.node2.name}{ring} -> Conv {list(w.shape)} group={groups}")
