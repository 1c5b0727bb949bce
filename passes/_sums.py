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

from dataclasses import dataclass, field, replace
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
    split: str | None = None  # set on a report-only candidate: why its branches form no group

    @property
    def x(self) -> gs.Tensor:
        return self.group[0].x


def leaf_options(leaf, identity: Callable, view: GraphView) -> list:
    """Every way to read ``leaf`` as a branch, shallowest first: the identity of ``leaf.tensor``,
    then of each tensor below one more of its affine nodes (those nodes kept on the branch), and
    ``leaf`` itself (its base, or the identity of the deepest tensor). Each option is a leaf of
    ``leaf.tensor`` with its own ``x``; no two options share an ``x``."""
    options, seen = [], set()
    for k in range(len(leaf.affines), -1, -1):  # k: the affine nodes the option keeps, outermost last
        if k == len(leaf.affines):
            x = leaf.tensor
        else:
            data = affine_data_input(leaf.affines[k], view)
            if data is None:
                break
            x = view.source(data)
        if id(x) in seen:
            continue
        seen.add(id(x))
        options.append(replace(identity(x, leaf.sign), tensor=leaf.tensor, affines=list(leaf.affines[k:])))
    return [opt for opt in options if opt.x is not leaf.x] + [leaf]


def _valid_group(group: list, tree: list[gs.Node], view: GraphView) -> list:
    """``group`` less the leaves with a tensor read outside the nodes the group would replace (the
    ``single_use`` condition), dropped until none is."""
    while True:
        inside = tree + [n for leaf in group for n in leaf.nodes()]
        keep = [leaf for leaf in group if not any(outside_reader_reason(t, inside, view) for t in leaf.internal_tensors())]
        if len(keep) == len(group):
            return group
        group = keep


def choose_groups(
    leaves: list, tree: list[gs.Node], wanted: Callable, identity: Callable, view: GraphView, strict: bool = True, left=None
) -> list[dict]:
    """The groups a sum's leaves form, each ``{leaf index: the leaf as read in the group}``:
    repeatedly, the tensor that the most remaining leaves can read (trying every tensor along each
    leaf's chain of affine producers, see :func:`leaf_options`) while no tensor inside a branch is
    read outside the merge; ties go to the group that replaces the most nodes, then to the
    deepest. Affine nodes above the chosen tensor stay in the graph. Each group has two or more
    leaves and is ``wanted``. ``strict=False``: no leaf is dropped for a tensor read elsewhere
    (such a group is a candidate that ``single_use`` declines, with the reason). ``left``: the
    indices of the leaves to group (default: all)."""
    options = [leaf_options(leaf, identity, view) for leaf in leaves]
    left = list(range(len(leaves))) if left is None else list(left)
    groups: list[dict] = []
    while len(left) >= 2:
        best, best_score = None, None
        tensors: dict[int, None] = {}
        for i in left:
            for opt in options[i]:
                tensors.setdefault(id(opt.x))
        for key in tensors:
            group = [(i, opt) for i in left for opt in options[i] if id(opt.x) == key]
            valid = [opt for _, opt in group]
            if strict:
                valid = _valid_group(valid, tree, view)
            if len(valid) < 2 or not wanted(valid):
                continue
            chosen = [(i, opt) for i, opt in group if any(opt is v for v in valid)]
            depth = sum(next(d for d, o in enumerate(options[i]) if o is opt) for i, opt in chosen)
            score = (len(chosen), sum(len(opt.nodes()) for _, opt in chosen), depth)
            if best_score is None or score > best_score:
                best, best_score = chosen, score
        if best is None:
            break
        groups.append(dict(best))
        left = [i for i in left if i not in groups[-1]]
    return groups


def candidates(
    view: GraphView,
    decompose: Callable,
    wanted: Callable[[list], bool],
    identity: Callable,
    roots=None,
    report_split: bool = False,
) -> Iterator[Match]:
    """One Match per (sum, group of leaves on one tensor) that ``wanted`` accepts.

    ``decompose(tensor, sign, view)`` reads a summand as deeply as it goes (through every affine
    producer down to its base); the group a leaf joins is then chosen by :func:`choose_groups`
    among every tensor along that chain, so ``X = Conv(Y); DWConv(X) + BN(X)`` groups both
    branches on ``X`` with the Conv kept; a summand that is itself the tensor another group reads
    (``x + conv(x)`` where ``x`` is a conv's output) joins that group as its identity.
    ``identity(tensor, sign)`` makes the identity leaf of ``tensor`` (its ``affines`` are set
    here). Leaves that no choice groups are then grouped the same way without dropping those with
    a tensor read elsewhere, so that such a group is still a candidate (declined as
    ``single_use`` with the reason). ``roots``: only the sums
    under these nodes (default: every sum of the graph). ``report_split``: a sum that yields no
    group although two or more of its leaves are each ``wanted`` yields one report-only candidate
    whose ``split`` says which tensors the branches read (its group holds those leaves).
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
        groups = choose_groups(leaves, tree, wanted, identity, view)
        left = [i for i in range(len(leaves)) if not any(i in g for g in groups)]
        groups += choose_groups(leaves, tree, wanted, identity, view, strict=False, left=left)
        yielded = False
        for members in groups:
            group = list(members.values())
            rest = [(leaf.tensor, leaf.sign) for i, leaf in enumerate(leaves) if i not in members]
            post = post_affines(root, view) if not rest else []
            cand = SumCandidate(root, tree, group, rest, constants, post)
            cand.nodes = tree + [n for leaf in group for n in leaf.nodes()] + post
            yielded = True
            yield Match(f"{root.outputs[0].name}<-{group[0].x.name}", cand.nodes, cand)
        if yielded or not report_split:
            continue
        lone = [leaf for leaf in leaves if wanted([leaf])]
        if len(lone) < 2:
            continue
        names = ", ".join(f"'{leaf.tensor.name}' reads '{leaf.x.name}'" for leaf in lone)
        cand = SumCandidate(root, tree, lone, [], constants, [], list(tree), split=f"branches read different tensors: {names}")
        yield Match(f"{root.outputs[0].name}<-split", cand.nodes, cand)


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
