"""Linear merge: a sum of linear layers (and the identity) that read one tensor becomes one.

Pattern. A tree of Add/Sub (as in parallel-merge) whose summands, peeled of per-feature affine
nodes, are linear layers of one tensor ``x`` (Gemm, or MatMul by a constant matrix) or ``x``
itself. Covers averaged classifier heads (``(head(x) + dist(x)) / 2``), RepMLP-style parallel
linears, residual identities ``x + Linear(x)`` and layer-scaled residuals. Per-feature constant
summands join the bias; per-feature affine nodes after the sum fold in when the group covers the
whole sum.

Algebra. Every summand is ``x @ W_i + b_i`` (identity: ``W = I``), an affine ``s * y + t`` after
it gives ``(W diag(s), s b + t)``, a Sub flips the sign; then ``sum_i (x @ W_i + b_i) =
x @ (sum W_i) + sum b_i``.

Exactness conditions (checked in this order):
  1. ``inference_bn``  every BatchNormalization is in inference mode with one output in use.
  2. ``layout``        weights and biases constant, ``transA = 0``, biases along the features.
  3. ``per_feature``   every affine acts on the feature axis with one value per feature.
  4. ``same_features`` every summand has the same input and output features (identity: K == N).
  5. ``single_use``    no intermediate tensor is read outside the pattern or is a graph output.
The merged layer never costs more than the summands: it has the weight of one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, Plan, run_checks

from . import _linear, _sums, register
from ._common import affine_data_input, node_affine, per_channel
from ._sums import SumCandidate


@dataclass
class Leaf:
    tensor: gs.Tensor
    sign: float
    x: gs.Tensor
    lin: _linear.Linear | None  # None: the identity
    affines: list[gs.Node]  # from the base outwards

    def nodes(self) -> list[gs.Node]:
        return (self.lin.nodes if self.lin else []) + self.affines

    def internal_tensors(self) -> list[gs.Tensor]:
        return [n.outputs[0] for n in self.nodes()]


def _decompose(tensor: gs.Tensor, sign: float, view: GraphView) -> Leaf:
    affines: list[gs.Node] = []
    cur = tensor
    while True:
        lin = _linear.producer_linear(cur, view)
        if lin is not None:
            affines.reverse()
            return Leaf(tensor, sign, lin.x, lin, affines)
        node = view.producer(cur)
        data = affine_data_input(node, view) if node is not None else None
        if data is None:
            affines.reverse()
            return Leaf(tensor, sign, cur, None, affines)
        affines.append(node)
        cur = view.source(data)


def _rank(c: SumCandidate, ctx: Context) -> int | None:
    if any(leaf.lin is not None and leaf.lin.is_gemm for leaf in c.group):
        return 2
    return _linear.rank_of(c.group[0].x, ctx)


def _features(c: SumCandidate, view: GraphView) -> tuple[int, int]:
    return _linear.dims(next(leaf.lin for leaf in c.group if leaf.lin is not None), view)


def _check_bn(cand, view, ctx):
    return _sums.inference_bn_reason(cand, view)


def _check_layout(c, view, ctx):
    for leaf in c.group:
        if leaf.lin is not None:
            reason = _linear.layout_reason(leaf.lin, view, ctx)
            if reason:
                return reason
    return None


def _leaf_affine(leaf: Leaf, node: gs.Node, c: SumCandidate, view: GraphView, ctx: Context):
    rank = _rank(c, ctx)
    if rank is None:
        return f"the rank of '{leaf.x.name}' is not known"
    k, n = _features(c, view)
    return node_affine(node, view, n if leaf.lin is not None else k, rank, axis=-1)


def _check_per_feature(c, view, ctx):
    for leaf in c.group:
        for node in leaf.affines:
            aff = _leaf_affine(leaf, node, c, view, ctx)
            if isinstance(aff, str):
                return aff
    return None


def _check_features(c, view, ctx):
    k, n = _features(c, view)
    for leaf in c.group:
        kn = _linear.dims(leaf.lin, view) if leaf.lin is not None else (k, k)
        if kn != (k, n):
            return f"summands map {kn[0]} -> {kn[1]} and {k} -> {n} features"
    return None


def _check_single_use(c, view, ctx):
    return _sums.single_use_reason(c, view)


CONDITIONS = [
    ("inference_bn", _check_bn),
    ("layout", _check_layout),
    ("per_feature", _check_per_feature),
    ("same_features", _check_features),
    ("single_use", _check_single_use),
]


@register
class LinearMerge:
    name = "linear-merge"
    summary = "sum of Gemm / MatMul / identity summands of one tensor -> one Gemm or MatMul"

    def match(self, view: GraphView, ctx: Context):
        return _sums.candidates(
            view,
            _decompose,
            lambda group: any(leaf.lin is not None for leaf in group),
            lambda tensor, sign: Leaf(tensor, sign, tensor, None, []),
        )

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return run_checks(CONDITIONS, match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> Plan:
        c: SumCandidate = match.data
        k, n = _features(c, view)
        rank = _rank(c, ctx)
        weight, bias = np.zeros((k, n)), np.zeros(n)
        for leaf in c.group:
            w, b = _linear.params(leaf.lin, view) if leaf.lin is not None else (np.eye(k), np.zeros(k))
            for node in leaf.affines:
                aff = _leaf_affine(leaf, node, c, view, ctx)
                w, b = w * aff.scale[None, :], aff.scale * b + aff.shift
            weight += leaf.sign * w
            bias += leaf.sign * b
        extra, affines, rest, target = _sums.fold_outside(
            c,
            view,
            lambda v: per_channel(v, n, rank or 1, -1) if np.ndim(v) <= (rank or 1) else None,
            lambda node: node_affine(node, view, n, rank, axis=-1) if rank else "the rank is not known",
        )
        bias = bias + extra
        for aff in affines:
            weight, bias = weight * aff.scale[None, :], aff.scale * bias + aff.shift
        dtype = view.constant(next(leaf.lin for leaf in c.group if leaf.lin).head.inputs[1]).dtype
        base = c.root.name or "sum"
        out, tail = _sums.add_back(ctx, base, rest, target)
        nodes = _linear.emit(ctx, base, c.x, weight, bias, dtype, out, rank) + tail
        kinds = "+".join("linear" if leaf.lin else "identity" for leaf in c.group)
        return Plan(target, nodes, f"{len(c.group)} summands ({kinds}) -> {k}x{n}")
