"""Dead channels: output channels of a Conv or linear layer whose weights are all zero are dropped.

Pattern. A *source* (Conv with ``group = 1``, Gemm, MatMul by a constant) with constant weights,
some of whose output channels have an all-zero weight row (ResRep's compactor after its pruned
rows were zeroed, folded with the conv before it by the other passes). Such a channel holds its
bias ``b[c]`` at every position. The channels are followed forward to the layers that absorb them
(:mod:`onnxrep.passes._channels`): through per-channel affine nodes, activations, pooling,
depthwise convs, Flatten and a Concat on the channel axis, to Convs (``group = 1``) and linear
layers.

Algebra. A channel that holds one value ``v`` over the whole tensor stays one value through each
step: ``s v + t`` (affine), ``f(v)`` (activation), ``b' + v * sum_taps W'`` (depthwise, no padding
read), ``v`` (pooling that never averages in padding, Flatten, Concat). A consumer then reads
``sum_taps W[o, c] * v`` from it at every output position it does not pad, so
``conv(X; W, b) = conv(X'; W', b + sum_c v[c] sum_taps W[o, c])`` with the channel gone from ``X'``
and ``W'`` (:func:`onnxrep.algebra.fold_constant_inputs`); linear layers likewise. Where the
consumer's window reads its zero padding the constant is replaced by 0 at the border, so a channel
with ``v != 0`` there is kept; a channel with ``v = 0`` is dropped everywhere.

Exactness conditions (checked in this order; each fails with its name and a reason):
  1. ``source``           the source is a Conv with ``group = 1`` or a linear layer over its last
                          axis (a grouped conv's output channels are tied to its input groups).
  2. ``static_shapes``    the ranks, and the channel counts a Concat offsets by, are known.
  3. ``graph_output``     no tensor the channels reach is a graph output or read by a subgraph.
  4. ``constant_weights`` every conv on the way has constant weights.
  5. ``grouped``          no conv on the way is grouped other than depthwise.
  6. ``per_channel``      every affine constant and PRelu slope is a scalar or per channel.
  7. ``outside_operand``  no Add/Mul/... combines the channels with a tensor that does not carry
                          them (a residual whose other side is live keeps the channel).
  8. ``followed``         every other node reading the channels is one the pass follows (Split,
                          Transpose, Reshape to other shapes, ... stop it).
  9. ``consumers``        every path ends in a Conv or a linear layer contracting the channels.
 10. ``border``           a channel that holds a value other than 0 where a consumer zero-pads,
                          or where a padded depthwise conv or pooling would see the border, is
                          kept; the candidate is declined when that leaves nothing to drop.
 11. ``keeps_one``        at least one channel remains (a layer with every channel dead is a
                          constant, left to constant folding).
Dropping channels only removes weights and multiply-accumulates (a consumer without a bias gains
one, smaller than the input slice it loses).
"""

from __future__ import annotations

import numpy as np

from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, Plan, run_checks

from . import register
from ._channels import Candidate, Region, candidates, channel_list, plans, source_reason


def _zero_rows(rows: np.ndarray) -> np.ndarray:
    return ~np.any(rows[:, :-1], axis=1)


def _some_zero_row(raw: np.ndarray) -> bool:
    return bool(raw.size) and not np.all(np.any(raw, axis=1))


def _removable(c: Candidate, view: GraphView) -> tuple[np.ndarray, dict, str]:
    """The dead channels that can be dropped, the constants at each consumer, and why others stay."""
    region: Region = c.region
    dead = c.marked
    values = np.where(dead, region.source.bias, 0.0)
    consts = region.constants(values, dead.copy())
    ok = dead.copy()
    why = ""
    for consumer in region.consumers:
        v, known = consts[id(consumer.flow.tensor)]
        fine = known & ((v == 0) if consumer.padded else True)
        if np.any(ok & ~fine) and not why:
            lost = ok & ~fine
            where = f"'{consumer.layer.node.name}' zero-pads" if consumer.padded else "a padded window on the way sees the border"
            which = f"channels {channel_list(lost)} hold" if lost.sum() > 1 else f"channel {channel_list(lost)} holds"
            why = f"{which} a constant that is not 0 where {where}"
        ok &= fine
    folds = {tid: np.where(ok, v, 0.0) for tid, (v, _) in consts.items()}
    return ok, folds, why


def _border(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    ok, folds, why = _removable(c, view)
    c.decision = (ok, folds)
    if not ok.any():
        return why or "no dead channel can be dropped"
    return None


def _keeps_one(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    ok, _ = c.decision
    if ok.all():
        return f"every output channel of '{c.node.name}' is dead: the layer is a constant"
    return None


def _check(c: Candidate, view: GraphView, ctx: Context) -> Decline | None:
    decline = run_checks([("source", source_reason)], c, view, ctx)
    if decline is None and isinstance(c.region, Decline):
        return c.region
    return decline or run_checks([("border", _border), ("keeps_one", _keeps_one)], c, view, ctx)


@register
class DeadChannels:
    name = "dead-channels"
    summary = "output channels with all-zero weights (ResRep) -> dropped, their constant folded into the next layers"

    def match(self, view: GraphView, ctx: Context):
        return candidates(view, ctx, "dead", _zero_rows, _some_zero_row)

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return _check(match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> list[Plan]:
        c: Candidate = match.data
        ok, folds = c.decision
        into = np.arange(len(ok))
        summary = f"dropped {int(ok.sum())} of {len(ok)} channels of '{c.node.name}' (all-zero weights: {channel_list(ok)})"
        return plans(c.region, view, ctx, ok, into, folds, summary)
