"""Identical filters: output channels of one layer that compute the same values are merged.

Pattern. A *source* (Conv with ``group = 1``, Gemm, MatMul by a constant) with constant weights
in which two or more output channels have equal weight rows and biases (Centripetal SGD's
clusters). The channels are followed to the layers that absorb them as in ``dead-channels``
(:mod:`onnxrep.passes._channels`).

Algebra. Channels ``c`` and ``d`` with equal filters hold equal tensors, ``x_c = x_d``, and stay
equal through every step that treats them alike: an activation, pooling, Flatten, Concat, a binary
op of two such tensors, and per-channel affine nodes, PRelu slopes and depthwise filters whose
parameters for ``c`` and ``d`` are equal too. A consumer then reads
``W[:, c] x_c + W[:, d] x_d = (W[:, c] + W[:, d]) x_c``
(:func:`onnxrep.algebra.merge_input_channels`), zero padding included (both channels are padded
alike), so one channel per cluster is kept (the lowest) and the consumers' slices are summed.

Exactness conditions (checked in this order; each fails with its name and a reason):
  1.-9. as ``dead-channels``: ``source``, ``static_shapes``, ``graph_output``,
        ``constant_weights``, ``grouped``, ``per_channel``, ``outside_operand``, ``followed``,
        ``consumers``.
 10. ``downstream_equal``  a cluster survives only where every step on the way has equal
                           per-channel parameters for its channels; the candidate is declined
                           when no cluster of two or more is left.
Equality is exact by default. ``--tolerance T`` (opt-in, not exact) also merges rows that differ
by at most ``T`` (max abs) from the cluster's first channel, which is kept as it is.
Merging only removes weights and multiply-accumulates.
"""

from __future__ import annotations

import numpy as np

from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, Plan, run_checks

from . import register
from ._channels import Candidate, candidates, channel_list, plans, refine, source_reason


def _clusters(rows: np.ndarray, tolerance: float) -> np.ndarray:
    """A label per row: the index of the first row equal to it."""
    return refine(np.zeros(rows.shape[0], dtype=np.int64), rows, tolerance)


def _some_equal_rows(tolerance: float):
    """A quick test on the raw weight rows (no float64 copy): are two of them equal, byte for
    byte once -0.0 is read as 0.0? Rows are first told apart by their sums (equal rows have
    equal sums: every row is reduced the same way); only rows whose sums collide are compared.
    With a tolerance every layer of two rows or more qualifies."""

    def maybe(raw: np.ndarray) -> bool:
        if raw.shape[0] < 2:
            return False
        if tolerance > 0:
            return True
        try:
            sums = raw.sum(axis=1, dtype=np.float64)
        except TypeError:  # a float type numpy cannot sum (bfloat16 on some numpy versions)
            sums = raw.astype(np.float32).sum(axis=1, dtype=np.float64)
        if np.isnan(sums).sum() > 1:
            return True  # NaN sums never compare equal: let the full test decide
        order = np.argsort(sums, kind="stable")
        ranked = sums[order]
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        for lo, hi in zip(starts, np.r_[starts[1:], len(ranked)]):
            group = order[lo:hi]
            for i in range(len(group)):
                for j in range(i + 1, len(group)):
                    if np.array_equal(raw[group[i]], raw[group[j]]):  # -0.0 == 0.0
                        return True
        return False

    return maybe


def _downstream_equal(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    labels = _clusters(c.region.source.out_rows, ctx.options.tolerance)
    labels = c.region.split_by_params(labels, ctx.options.tolerance)
    merged = labels != np.arange(len(labels))
    c.decision = labels
    if not merged.any():
        return "the equal filters meet per-channel parameters that differ downstream"
    return None


def _check(c: Candidate, view: GraphView, ctx: Context) -> Decline | None:
    decline = run_checks([("source", source_reason)], c, view, ctx)
    if decline is None and isinstance(c.region, Decline):
        return c.region
    return decline or run_checks([("downstream_equal", _downstream_equal)], c, view, ctx)


@register
class IdenticalFilters:
    name = "identical-filters"
    summary = "output channels with identical filters (C-SGD) -> one channel, the next layers' slices summed"

    def match(self, view: GraphView, ctx: Context):
        tolerance = ctx.options.tolerance
        return candidates(view, ctx, "same", lambda rows: _clusters(rows, tolerance) != np.arange(rows.shape[0]),
                          _some_equal_rows(tolerance))

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return _check(match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> list[Plan]:
        c: Candidate = match.data
        into = c.decision
        dropped = into != np.arange(len(into))
        summary = (
            f"merged {int(dropped.sum())} of {len(into)} channels of '{c.node.name}' into equal ones "
            f"({channel_list(dropped)})"
        )
        return plans(c.region, view, ctx, dropped, into, {}, summary)
