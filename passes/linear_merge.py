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

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import ops
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, NewNode, Plan, run_checks

from . import _linear, register
from ._common import affine_data_input, bn_inference_reason, is_op, node_affine, per_channel
from .parallel_merge import is_root, sum_tree


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


@dataclass
class Candidate:
    root: gs.Node
    tree: list[gs.Node]
    group: list[Leaf]
    rest: list[tuple[gs.Tensor, float]]
    constants: list[tuple[gs.Tensor, float]]
    post: list[gs.Node]
    pattern: set[int] = field(default_factory=set)


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


def _post_affines(root: gs.Node, view: GraphView) -> list[gs.Node]:
    post, out = [], root.outputs[0]
    while not view.escapes(out):
        users = view.users(out)
        if len(users) != 1:
            break
        data = affine_data_input(users[0], view)
        if data is None or view.source(data) is not out:
            break
        post.append(users[0])
        out = users[0].outputs[0]
    return post


def _rank(c: Candidate, ctx: Context) -> int | None:
    if any(leaf.lin is not None and leaf.lin.is_gemm for leaf in c.group):
        return 2
    return _linear.rank_of(c.group[0].x, ctx)


def _features(c: Candidate, view: GraphView) -> tuple[int, int]:
    return _linear.dims(next(leaf.lin for leaf in c.group if leaf.lin is not None), view)


def _check_bn(c, view, ctx):
    for leaf in c.group:
        for node in leaf.affines:
            if is_op(node, ops.BATCH_NORM):
                reason = bn_inference_reason(node, view)
                if reason:
                    return reason
    return None


def _check_layout(c, view, ctx):
    for leaf in c.group:
        if leaf.lin is not None:
            reason = _linear.layout_reason(leaf.lin, view, ctx)
            if reason:
                return reason
    return None


def _leaf_affine(leaf: Leaf, node: gs.Node, c: Candidate, view: GraphView, ctx: Context):
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
    for leaf in c.group:
        for t in leaf.internal_tensors():
            if view.escapes(t):
                return f"tensor '{t.name}' is a graph output"
            outside = [u for u in view.users(t) if id(u) not in c.pattern]
            if outside:
                return f"tensor '{t.name}' is also read by '{outside[0].name}' ({outside[0].op})"
    return None


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
        for root in view.graph.nodes:
            if not is_op(root, *ops.SUM_OPS) or len(root.inputs) != 2 or not is_root(root, view):
                continue
            tree, terms = sum_tree(root, view)
            leaves, constants = [], []
            for tensor, sign in terms:
                if view.is_constant(tensor):
                    constants.append((tensor, sign))
                else:
                    leaves.append(_decompose(tensor, sign, view))
            by_x: dict[int, list[Leaf]] = {}
            for leaf in leaves:
                by_x.setdefault(id(leaf.x), []).append(leaf)
            for group in by_x.values():
                if len(group) < 2 or not any(leaf.lin is not None for leaf in group):
                    continue
                rest = [(leaf.tensor, leaf.sign) for leaf in leaves if leaf not in group]
                post = _post_affines(root, view) if not rest else []
                cand = Candidate(root, tree, group, rest, constants, post)
                nodes = tree + [n for leaf in group for n in leaf.nodes()] + post
                cand.pattern = {id(n) for n in nodes}
                yield Match(f"{root.outputs[0].name}<-{group[0].x.name}", nodes, cand)

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return run_checks(CONDITIONS, match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> Plan:
        c: Candidate = match.data
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
        rest = list(c.rest)
        for tensor, sign in c.constants:
            vec = per_channel(view.constant(tensor), n, rank or 1, -1)
            if vec is None or np.ndim(view.constant(tensor)) > (rank or 1):
                rest.append((tensor, sign))
            else:
                bias = bias + sign * vec
        target = c.root.outputs[0]
        if not rest:
            for node in c.post:
                aff = node_affine(node, view, n, rank or 1, axis=-1) if rank else "rank unknown"
                if isinstance(aff, str):
                    break
                weight, bias = weight * aff.scale[None, :], aff.scale * bias + aff.shift
                target = node.outputs[0]
        dtype = view.constant(next(leaf.lin for leaf in c.group if leaf.lin).head.inputs[1]).dtype
        base = c.root.name or "sum"
        out = target if not rest else ctx.like(f"{base}.rep.out", target)
        nodes = _linear.emit(ctx, base, c.group[0].x, weight, bias, dtype, out, rank)
        acc = out
        for i, (tensor, sign) in enumerate(rest):
            nxt = target if i == len(rest) - 1 else ctx.like(f"{base}.rep.sum", target)
            op = ops.ADD if sign > 0 else ops.SUB
            nodes.append(NewNode(op, ctx.fresh_name(f"{base}/rep_{op.lower()}"), {}, [acc, tensor], [nxt]))
            acc = nxt
        kinds = "+".join("linear" if leaf.lin else "identity" for leaf in c.group)
        return Plan(target, nodes, f"{len(c.group)} summands ({kinds}) -> {k}x{n}")
