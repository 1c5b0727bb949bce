"""Sums of branches, as parallel-merge and linear-merge see them.

A sum is a tree of Add and Sub nodes (Sub negates its second operand) whose inner results are read
only inside the tree; its *root* is an Add/Sub whose result is not itself absorbed by a parent sum.
The tree's terms are split into constants and leaves; a pass-specific ``decompose`` turns a leaf
tensor into an object with ``x`` (the tensor the branch reads), ``tensor``, ``sign``, ``nodes()``
and ``internal_tensors()``. Leaves are grouped by ``x``; a group that the pass wants becomes a
candidate, and what the group does not cover (other leaves, constants that do not fold) is added
back after the merged node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import onnx_graphsurgeon as gs

from onnxrep import ops
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Match, NewNode

from ._common import LEGACY_OPSET, affine_data_input, bn_inference_reason, graph_opset, is_op, outside_reader_reason


def _is_sum(node: gs.Node | None, view: GraphView) -> bool:
    """An Add/Sub of two operands that broadcasts the modern way (not ``broadcast=1`` below
    opset 7, where the second operand is aligned at ``axis``: such a node is a term, not a sum)."""
    if not (is_op(node, *ops.SUM_OPS) and len(node.inputs) == 2):
        return False
    opset = graph_opset(view)
    return opset is None or opset >= LEGACY_OPSET or int(node.attrs.get("broadcast", 0)) == 0


def _only_read_by(tensor: gs.Tensor, node: gs.Node, view: GraphView) -> bool:
    users = view.users(tensor)
    return bool(users) and not view.escapes(tensor) and all(u is node for u in users)


def sum_tree(root: gs.Node, view: GraphView) -> tuple[list[gs.Node], list[tuple[gs.Tensor, float]]]:
    """Expand the Add/Sub tree under ``root``: (its nodes, [(term tensor, sign)])."""
    nodes, terms = [], []
    stack = [(root, 1.0)]
    while stack:
        node, sign = stack.pop()
        nodes.append(node)
        for i, t in enumerate(node.inputs):
            s = -sign if (node.op == ops.SUB and i == 1) else sign
            src = view.source(t)
            below = view.producer(src)
            if _is_sum(below, view) and _only_read_by(src, node, view):
                stack.append((below, s))
            else:
                terms.append((src, s))
    return nodes, terms


def is_root(node: gs.Node, view: GraphView) -> bool:
    """True when ``node``'s result is not absorbed into a parent sum."""
    out = node.outputs[0]
    users = view.users(out)
    return not (len(users) == 1 and _is_sum(users[0], view) and not view.escapes(out))


def root_of(node: gs.Node, view: GraphView) -> gs.Node:
    while not is_root(node, view):
        node = view.users(node.outputs[0])[0]
    return node


def post_affines(root: gs.Node, view: GraphView) -> list[gs.Node]:
    """Affine nodes that read the sum, one after the other, each the only reader of the last."""
    post: list[gs.Node] = []
    out = root.outputs[0]
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


@dataclass
class SumCandidate:
    root: gs.Node
    tree: list[gs.Node]
    group: list  # the leaves merged, all reading ``group[0].x``
    rest: list[tuple[gs.Tensor, float]]  # other non-constant terms
    constants: list[tuple[gs.Tensor, float]]
    post: list[gs.Node]  # affine nodes after the sum (only when the group covers the whole sum)
    nodes: list[gs.Node] = field(default_factory=list)  # everything the merge replaces

    @property
    def x(self) -> gs.Tensor:
        return self.group[0].x


def candidates(
    view: GraphView, decompose: Callable, wanted: Callable[[list], bool], identity: Callable, roots=None
) -> Iterator[Match]:
    """One Match per (sum, group of leaves on one tensor) that ``wanted`` accepts.

    ``identity(tensor, sign)`` makes the identity leaf of ``tensor``: a summand that is itself the
    tensor another group reads (``x + conv(x)`` where ``x`` is a conv's output) joins that group
    as its identity instead of standing alone as a branch of its own input. ``roots``: only the
    sums under these nodes (default: every sum of the graph).
    """
    for root in view.graph.nodes if roots is None else roots:
        if not _is_sum(root, view) or not is_root(root, view):
            continue
        tree, terms = sum_tree(root, view)
        leaves, constants = [], []
        for tensor, sign in terms:
            if view.is_constant(tensor):
                constants.append((tensor, sign))
            else:
                leaves.append(decompose(tensor, sign, view))
        reads = {}
        for leaf in leaves:
            reads[id(leaf.x)] = reads.get(id(leaf.x), 0) + 1
        leaves = [
            identity(leaf.tensor, leaf.sign)
            if leaf.x is not leaf.tensor and id(leaf.tensor) in reads and reads[id(leaf.x)] == 1
            else leaf
            for leaf in leaves
        ]
        by_x: dict[int, list] = {}
        for leaf in leaves:
            by_x.setdefault(id(leaf.x), []).append(leaf)
        for group in by_x.values():
            if len(group) < 2 or not wanted(group):
                continue
            rest = [(leaf.tensor, leaf.sign) for leaf in leaves if leaf not in group]
            post = post_affines(root, view) if not rest else []
            cand = SumCandidate(root, tree, group, rest, constants, post)
            nodes = tree + [n for leaf in group for n in leaf.nodes()] + post
            cand.nodes = nodes
            yield Match(f"{root.outputs[0].name}<-{group[0].x.name}", nodes, cand)


def inference_bn_reason(cand: SumCandidate, view: GraphView, opset: int | None = None) -> str | None:
    """Why a BatchNormalization on one of the group's branches is not in inference mode, or None.
    ``opset``: the default domain's (default: the graph's)."""
    for leaf in cand.group:
        for node in leaf.affines:
            if is_op(node, ops.BATCH_NORM):
                reason = bn_inference_reason(node, view, opset)
                if reason:
                    return reason
    return None


def single_use_reason(cand: SumCandidate, view: GraphView) -> str | None:
    """Why a tensor inside the group's branches is read outside the pattern, or None."""
    for leaf in cand.group:
        for t in leaf.internal_tensors():
            reason = outside_reader_reason(t, cand.nodes, view)
            if reason:
                return reason
    return None


def fold_outside(cand: SumCandidate, view: GraphView, vector_of: Callable, affine_of: Callable):
    """What the merged node takes in besides its branches.

    Returns ``(bias, affines, rest, target)``: the sum of the constant summands that ``vector_of``
    reads as a bias vector, the post-sum affine maps (``affine_of`` gives an Affine or a reason;
    folded only when nothing is left over), the terms to add back, and the tensor the merged node
    (or the last add-back) produces.
    """
    bias, rest = 0.0, list(cand.rest)
    for tensor, sign in cand.constants:
        vec = vector_of(view.constant(tensor))
        if vec is None:
            rest.append((tensor, sign))
        else:
            bias = bias + sign * vec
    target, affines = cand.root.outputs[0], []
    if not rest:
        for node in cand.post:
            aff = affine_of(node)
            if isinstance(aff, str):
                break
            affines.append(aff)
            target = node.outputs[0]
    return bias, affines, rest, target


def add_back(ctx: Context, base: str, rest: list[tuple[gs.Tensor, float]], target: gs.Tensor):
    """``(head_out, nodes)``: where the merged node writes, and the Add/Sub chain that adds the
    remaining terms to it and ends in ``target``."""
    if not rest:
        return target, []
    head_out = ctx.like(f"{base}.rep.out", target)
    acc, nodes = head_out, []
    for i, (tensor, sign) in enumerate(rest):
        out = target if i == len(rest) - 1 else ctx.like(f"{base}.rep.sum", target)
        op = ops.ADD if sign > 0 else ops.SUB
        nodes.append(NewNode(op, ctx.fresh_name(f"{base}/rep_{op.lower()}"), {}, [acc, tensor], [out]))
        acc = out
    return head_out, nodes
