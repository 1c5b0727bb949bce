"""Normalize layout: the Transposes that NHWC exports (tf2onnx, jax2onnx, Keras) put around every
convolution are de-duplicated, cancelled, and moved below sums and per-channel affines, so that a
block's linear chain sits in one layout (NCHW, where the Conv reads it) and the folds see
``Y + Conv(Y)`` and ``Affine(Conv(Y))`` as they do in a PyTorch export.

Rewrites (``T(x, p)`` is ``Transpose(x, perm=p)``):
  * ``dedupe``      several Transposes with the same perm reading the same tensor: one new
                    Transpose takes their place, and every reader of every copy is issued again
                    reading it (the copies are left without readers and removed). The new nodes
                    read the copies' input, so the rewritten region starts where the copies do.
  * ``cancel``      ``T(T(x, p), q)`` with ``p[q[i]] = i`` for every axis: the readers of the outer
                    one read ``x`` (the inner one stays while something else reads it).
  * ``sink_sum``    ``Add/Sub(T(a, p), T(b, p))`` -> ``T(Add/Sub(a, b), p)``: one Transpose less.
                    Both operands have the rank ``len(p)``, so broadcasting acts axis by axis and
                    commutes with the permutation. Also with a chain of Add/Sub/Mul/Div by constants
                    on one operand, ``Add/Sub(T(a, p), A_k(...A_1(T(b, p))))``: the chain is issued
                    again on ``b``, constants permuted by the inverse of ``p`` (the BN on the NHWC
                    output of an average-pool branch, summed with the conv branches).
  * ``sink_mixed``  ``Add/Sub(T(a, p), Z)`` where ``Z = A_k(...A_1(X))`` is a chain (maybe empty) of
                    Add/Sub/Mul/Div by a constant on a tensor ``X`` that some Transpose already reads
                    as ``Y = T(X, q)`` with ``q`` the inverse of ``p`` -> ``T(Add/Sub(a, Z'), p)``
                    with ``Z' = A'_k(...A'_1(Y))``, each constant ``K`` (right-aligned to the rank)
                    permuted by ``q``: ``T(Z, q) = Z'`` element for element and ``T(T(Z, q), p) = Z``.
                    The chain is issued again on a new ``T(X, q)`` (a copy of the one that exists,
                    which dedupe then merges with it) and the Transpose moves below the sum (the
                    residual ``X + T(Conv(T(X)))`` of an NHWC block).
  * ``hoist_affine`` ``T(A_k(...A_1(X)), p)`` where each ``A_i`` is Add/Sub/Mul/Div by a constant and
                    another Transpose with the same perm already reads ``X`` ->
                    ``A'_k(...A'_1(T(X, p)))``, each constant (right-aligned to the rank) permuted by
                    ``p``: tf2onnx's optimizer writes a block's identity BN as an affine on the NHWC
                    input ahead of the Transpose the conv branches read; so moved, the identity branch
                    reads that Transpose (a new copy of it, which dedupe merges).
  * ``cancel_through`` ``T(S_k(...S_1(T(c, p))), q)`` with ``q`` the inverse of ``p``, where each ``S_i``
                    is an Add/Sub/Mul/Div by a constant, a Pad with constant pads, or an element-wise
                    activation, and one at least is not an activation -> ``S'_k(...S'_1(c))``:
                    constants (right-aligned to the rank) and pads permuted by ``q``, both Transposes
                    gone (an NHWC padding ring ``T(Add(Pad(T(conv)), b))`` of a DBB block then sits
                    on the conv's NCHW output, where conv-chain finds it).
  * ``sink_unary``  ``U(T(x, p))`` for an element-wise activation ``U`` whose output a Transpose
                    with the inverse perm reads -> ``T(U(x), p)``, which that Transpose then cancels
                    (``T -> Relu -> T`` between two NHWC blocks).
  * ``sink_affine`` ``A_k(...A_1(T(c, p)))`` where ``c`` is a Conv's output and each ``A_i`` is
                    Add/Sub/Mul/Div by a constant that acts on the channel axis only (shape ``[C]``,
                    ``[1, 1, 1, C]``, a scalar, wherever ``p`` puts channel axis 1) ->
                    ``T(A'_k(...A'_1(c)), p)`` with the constants reshaped to ``[C, 1, 1]``: the
                    affine then sits on the Conv's output, where affine-fold takes it in. The
                    chain ends before the first step whose constant is not per channel.
Every rewrite computes the same floating-point operations on the same elements: transposition only
moves elements, so the results are bit for bit equal. None adds a node for good: dedupe, cancel
and sink_sum remove Transposes; sink_unary and sink_affine move them, and sink_mixed moves one and
makes a copy of another that dedupe merges (each is taken only where a merge, a cancellation or a
fold follows: an existing inverse Transpose, a Conv's output). Every new node reads tensors that the
nodes it replaces compute from, so that each rewritten region can be checked on its own.

Conditions (checked in this order):
  1. ``opset``         the graph's default opset is 7 or more and the element-wise nodes have no
                       legacy ``broadcast`` attribute (older broadcasting aligns operands otherwise).
  2. ``perm``          every Transpose involved has an explicit ``perm`` (the default reverses the
                       axes of a rank that may not be known).
  3. ``same_perm``     sink_sum: both Transposes have the same perm; cancel: the two perms compose
                       to the identity.
  4. ``inverse_transpose`` sink_mixed: a Transpose with the inverse perm already reads ``X`` (else
                       a new one would only move a node, and nothing merges); sink_unary: one reads
                       the activation's output (else nothing cancels). hoist_affine is matched only
                       where another Transpose with the same perm reads ``X`` (else nothing merges,
                       and a Transpose after an affine is no candidate). sink_mixed and
                       hoist_affine: that Transpose is no graph output (dedupe merges the rewrite's
                       copy of it only then).
  5. ``single_use``    the tensors the rewrite stops computing (a sunk Transpose's output, the
                       chain's intermediates) are read by nothing else and are not graph outputs;
                       sink_affine: the Conv's output is read by the Transpose only (so the fold
                       follows). dedupe: no copy is a graph output; cancel: the Transpose whose
                       readers move is no graph output.
  6. ``readers``       dedupe / cancel: each reader that is issued again is a default-domain node
                       with one output and no subgraph (dedupe: the copies have a reader).
  7. ``conv_producer`` sink_affine: the Transpose reads the output of a Conv with constant weights.
  8. ``static_shape``  sink_affine: the Conv output's shape is known (evidence, ``ctx.shape``) with
                       rank ``len(p)``; sink_mixed, hoist_affine, cancel_through: each chain
                       constant has at most that rank.
  8b. ``constant_pads`` cancel_through: every Pad's pads are a constant of length ``2 len(p)`` and it
                       has no ``axes`` input.
  9. ``per_channel``   sink_affine: the constant broadcasts along the channel axis only (a
                       constant over spatial positions would not fold).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import ops
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, NewNode, Plan, run_checks

from . import register
from ._common import LEGACY_OPSET, affine_data_input, graph_opset, is_op, outside_reader_reason
from ._spelling import NotConstant, int_operand

DEDUPE, CANCEL, SINK_SUM, SINK_MIXED, SINK_AFFINE = "dedupe", "cancel", "sink_sum", "sink_mixed", "sink_affine"
SINK_UNARY, HOIST_AFFINE, CANCEL_THROUGH = "sink_unary", "hoist_affine", "cancel_through"


def _perm(node: gs.Node) -> tuple[int, ...] | None:
    perm = node.attrs.get("perm")
    return None if perm is None else tuple(int(v) for v in perm)


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _is_perm(perm) -> bool:
    return perm is not None and sorted(perm) == list(range(len(perm)))


@dataclass
class Candidate:
    kind: str
    root: gs.Node  # DEDUPE: the first copy; CANCEL: the Transpose whose readers move; sums: the Add/Sub; SINK_AFFINE: the Transpose
    keep: gs.Node | None = None  # CANCEL: the inner one
    transposes: list[gs.Node] = field(default_factory=list)  # sums: the sunk Transposes (by operand); DEDUPE: the copies
    chain: list[gs.Node] = field(default_factory=list)  # affine nodes, in data order
    sides: list[int] = field(default_factory=list)  # SINK_MIXED: [index of T(a) operand, index of Z operand]
    base: gs.Tensor | None = None  # SINK_MIXED, HOIST_AFFINE: X; SINK_AFFINE: the Conv output c
    inverse: gs.Node | None = None  # SINK_MIXED: the Transpose T(X, q); HOIST_AFFINE: the other T(X, p); CANCEL_THROUGH: the inner T(c, p)

    @property
    def target(self) -> gs.Tensor:
        if self.kind in (SINK_AFFINE, SINK_UNARY):
            return self.chain[-1].outputs[0]
        return self.root.outputs[0]

    def nodes(self, view: GraphView) -> list[gs.Node]:
        out = [self.root, *self.transposes, *self.chain]
        if self.keep is not None:
            out.append(self.keep)
        if self.inverse is not None and self.kind in (SINK_MIXED, HOIST_AFFINE, CANCEL_THROUGH):
            out.append(self.inverse)
        if self.kind == CANCEL:
            out += _raw_readers(self.root.outputs[0])
        if self.kind == DEDUPE:
            out += _group_readers(self.transposes)
        return out


def _raw_readers(tensor: gs.Tensor) -> list[gs.Node]:
    seen, out = set(), []
    for n in tensor.outputs:
        if id(n) not in seen:
            seen.add(id(n))
            out.append(n)
    return out


def _group_readers(copies: list[gs.Node]) -> list[gs.Node]:
    """The readers of any of ``copies``' outputs, each once, in order."""
    seen, out = set(), []
    for t in copies:
        for n in _raw_readers(t.outputs[0]):
            if id(n) not in seen:
                seen.add(id(n))
                out.append(n)
    return out


def _affine_step(node: gs.Node | None, data: gs.Tensor, view: GraphView) -> bool:
    """``node`` is Add/Sub/Mul/Div of ``data`` by a constant (not ``constant / data``)."""
    if not is_op(node, *ops.AFFINE_BINARY_OPS) or len(node.outputs) != 1:
        return False
    inp = affine_data_input(node, view)
    return inp is not None and view.source(inp) is data


def _const_operand(node: gs.Node, view: GraphView) -> tuple[int, np.ndarray]:
    """(index, values) of the constant operand of an affine step."""
    idx = 0 if view.is_constant(node.inputs[0]) else 1
    return idx, view.constant(node.inputs[idx])


# --------------------------------------------------------------------------------------------
# match
# --------------------------------------------------------------------------------------------


def _forward_chain(tensor: gs.Tensor, view: GraphView) -> list[gs.Node]:
    """Affine steps after ``tensor`` while each tensor has exactly one reader."""
    chain = []
    while True:
        users = view.users(tensor)
        if len(users) != 1 or not _affine_step(users[0], tensor, view):
            return chain
        chain.append(users[0])
        tensor = users[0].outputs[0]


def _inverse_reader(tensor: gs.Tensor, perm: tuple[int, ...], view: GraphView, exclude: gs.Node | None,
                    kept: bool = False) -> gs.Node | None:
    """A Transpose (not ``exclude``) with the inverse of ``perm`` that reads ``tensor``; ``kept``:
    only one whose output is no graph output (so that it can cancel)."""
    want = _inverse(perm)
    for u in view.users(tensor):
        if kept and view.escapes(u.outputs[0]):
            continue
        if is_op(u, ops.TRANSPOSE) and _perm(u) == want and u is not exclude:
            return u
    return None


def _backward_chain(z: gs.Tensor, perm: tuple[int, ...], view: GraphView, exclude: gs.Node):
    """(X, chain, T(X, inverse perm)) with ``z = chain(X)``: walk back through affine steps until a
    tensor that a Transpose with the inverse perm reads; None when there is none."""
    chain: list[gs.Node] = []
    while True:
        inv = _inverse_reader(z, perm, view, exclude)
        if inv is not None:
            return z, chain[::-1], inv
        step = _affine_producer(z, view)
        if step is None:
            return None
        chain.append(step[0])
        z = view.source(step[1])
        if len(chain) > 64:
            return None


def _affine_producer(z: gs.Tensor, view: GraphView) -> tuple[gs.Node, gs.Tensor] | None:
    """The affine node by a constant (Add/Sub/Mul/Div) that computes ``z``, with its data input;
    None when ``z`` is computed otherwise."""
    node = view.producer(z)
    if node is None or not is_op(node, *ops.AFFINE_BINARY_OPS) or len(node.outputs) != 1:
        return None
    data = affine_data_input(node, view)
    return None if data is None else (node, data)


def _per_channel_reason(node: gs.Node, perm, channels: int, view: GraphView) -> str | None:
    """Why the constant of affine step ``node`` on ``T(c, perm)`` (``c`` with ``channels`` on axis 1)
    does not act on the channel axis only, or None."""
    rank, axis = len(perm), perm.index(1)
    _, k = _const_operand(node, view)
    if np.ndim(k) > rank:
        return f"{node.op} '{node.name}' constant of rank {np.ndim(k)} exceeds the data's rank {rank}"
    shape = (1,) * (rank - np.ndim(k)) + tuple(np.shape(k))
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return (
            f"{node.op} '{node.name}' constant of shape {list(np.shape(k))} is not per channel on axis {axis} "
            f"(where the Transpose puts the {channels} channels)"
        )
    return None


def _per_channel_prefix(chain: list[gs.Node], node: gs.Node, x: gs.Tensor, view: GraphView, ctx: Context) -> list[gs.Node]:
    """The longest start of ``chain`` whose constants act on the channel axis only (all of it when
    that cannot be told yet, or when no step does: the check then names the reason)."""
    perm, shape = _perm(node), ctx.shape(x)
    if not _is_perm(perm) or 1 not in perm or shape is None or len(shape) != len(perm) or not isinstance(shape[1], int):
        return chain
    n = 0
    while n < len(chain) and _per_channel_reason(chain[n], perm, shape[1], view) is None:
        n += 1
    return chain[:n] if n else chain


def _copies(view: GraphView) -> dict[int, list[gs.Node]]:
    """Transposes grouped by (input, perm), keyed by the id of each group's first one; only groups
    of two or more."""
    groups: dict[tuple, list[gs.Node]] = {}
    for node in view.graph.nodes:
        if is_op(node, ops.TRANSPOSE) and len(node.outputs) == 1 and node.inputs:
            x = view.source(node.inputs[0])
            if x is not None:
                key = (id(x), tuple(node.attrs.get("perm", ())) if "perm" in node.attrs else None)
                groups.setdefault(key, []).append(node)
    return {id(g[0]): g for g in groups.values() if len(g) > 1}


def _match_transpose(node: gs.Node, view: GraphView, copies: dict, ctx: Context) -> list[Candidate]:
    out = []
    x = view.source(node.inputs[0]) if node.inputs else None
    if x is None:
        return out
    if id(node) in copies:
        out.append(Candidate(DEDUPE, node, transposes=copies[id(node)]))
        return out
    if any(node in g for g in copies.values()):
        return out
    inner = view.producer(node.inputs[0])
    if is_op(inner, ops.TRANSPOSE):
        out.append(Candidate(CANCEL, node, keep=inner))
        return out
    perm = _perm(node)
    through = _through_chain(node, view)
    if through is not None:
        chain, inner_t = through
        out.append(Candidate(CANCEL_THROUGH, node, chain=chain, base=view.source(inner_t.inputs[0]), inverse=inner_t, keep=inner_t))
        return out
    if _is_perm(perm) and is_op(inner, *ops.AFFINE_BINARY_OPS):
        found = _backward_chain(x, _inverse(perm), view, node)
        if found is not None and found[1]:
            base, chain, other = found
            out.append(Candidate(HOIST_AFFINE, node, chain=chain, base=base, inverse=other))
            return out
    chain = _forward_chain(node.outputs[0], view)
    if chain:
        chain = _per_channel_prefix(chain, node, x, view, ctx)
        out.append(Candidate(SINK_AFFINE, node, chain=chain, base=x))
        return out
    users = view.users(node.outputs[0])
    if len(users) == 1 and is_op(users[0], *ops.UNARY_ACTIVATIONS) and len(users[0].outputs) == 1 \
            and users[0].inputs and view.source(users[0].inputs[0]) is node.outputs[0]:
        perm = _perm(node)
        inv = _inverse_reader(users[0].outputs[0], perm, view, None, kept=True) if _is_perm(perm) else None
        out.append(Candidate(SINK_UNARY, node, chain=[users[0]], base=x, inverse=inv))
    return out


def _through_step(node: gs.Node | None, view: GraphView) -> gs.Tensor | None:
    """The data input of ``node`` when it is a step cancel_through moves a Transpose across: an
    affine step by a constant, a Pad, or an element-wise activation; else None."""
    if node is None or len(node.outputs) != 1 or not node.inputs:
        return None
    if is_op(node, *ops.AFFINE_BINARY_OPS):
        return affine_data_input(node, view)
    if is_op(node, ops.PAD) or (is_op(node, *ops.UNARY_ACTIVATIONS) and len(node.inputs) == 1):
        return node.inputs[0]
    return None


def _through_chain(node: gs.Node, view: GraphView) -> tuple[list[gs.Node], gs.Node] | None:
    """(steps in data order, inner Transpose) for ``node = T(S_k(...S_1(T_inner(c))))`` with at least
    one step that is no activation; None otherwise (the perms are checked later)."""
    chain: list[gs.Node] = []
    z = node.inputs[0]
    while len(chain) <= 64:
        prod = view.producer(z)
        if is_op(prod, ops.TRANSPOSE):
            if chain and any(not is_op(n, *ops.UNARY_ACTIVATIONS) for n in chain):
                return chain[::-1], prod
            return None
        data = _through_step(prod, view)
        if data is None:
            return None
        chain.append(prod)
        z = data
    return None


def _chain_to_transpose(z: gs.Tensor, view: GraphView) -> tuple[gs.Node, list[gs.Node]] | None:
    """(T, chain) with ``z = chain(T(b))``, the chain of affine steps by constants non-empty, in data
    order; None otherwise."""
    chain: list[gs.Node] = []
    while len(chain) <= 64:
        node = view.producer(z)
        if is_op(node, ops.TRANSPOSE) and len(node.outputs) == 1:
            return (node, chain[::-1]) if chain else None
        step = _affine_producer(z, view)
        if step is None:
            return None
        chain.append(step[0])
        z = view.source(step[1])
    return None


def _match_sum(node: gs.Node, view: GraphView) -> Candidate | None:
    if len(node.inputs) != 2:
        return None
    prods = [view.producer(t) for t in node.inputs]
    ts = [is_op(p, ops.TRANSPOSE) for p in prods]
    if all(ts):
        return Candidate(SINK_SUM, node, transposes=list(prods))
    if not any(ts):
        return None
    i = ts.index(True)
    found = _chain_to_transpose(node.inputs[1 - i], view)
    if found is not None:
        other, chain = found
        return Candidate(SINK_SUM, node, transposes=[prods[i], other], chain=chain, sides=[i, 1 - i])
    perm = _perm(prods[i])
    if not _is_perm(perm):
        return Candidate(SINK_MIXED, node, transposes=[prods[i]], sides=[i, 1 - i])
    found = _backward_chain(view.source(node.inputs[1 - i]), perm, view, prods[i])
    if found is None:
        return Candidate(SINK_MIXED, node, transposes=[prods[i]], sides=[i, 1 - i])
    x, chain, inv = found
    return Candidate(SINK_MIXED, node, transposes=[prods[i]], chain=chain, sides=[i, 1 - i], base=x, inverse=inv)


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------


def _check_opset(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    opset = graph_opset(view)
    if opset is not None and opset < LEGACY_OPSET:
        return f"the graph's opset {opset} broadcasts element-wise operands the legacy way"
    for n in [c.root, *c.chain] if c.kind in (SINK_SUM, SINK_MIXED) else c.chain:
        if "broadcast" in n.attrs or "axis" in n.attrs:
            return f"{n.op} '{n.name}' has a legacy broadcast attribute"
    return None


def _check_perm(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    nodes = [c.root] if c.kind in (CANCEL, SINK_AFFINE, SINK_UNARY, HOIST_AFFINE, CANCEL_THROUGH) else list(c.transposes)
    if c.keep is not None:
        nodes.append(c.keep)
    for n in nodes:
        if not _is_perm(_perm(n)):
            return f"Transpose '{n.name}' has no explicit perm"
    return None


def _check_same_perm(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if c.kind == SINK_SUM:
        p, q = (_perm(t) for t in c.transposes)
        if p != q:
            return f"the summed Transposes have different perms {list(p)} and {list(q)}"
    if c.kind in (CANCEL, CANCEL_THROUGH):
        p, q = _perm(c.keep), _perm(c.root)
        if len(p) != len(q) or any(p[q[i]] != i for i in range(len(q))):
            return f"Transposes '{c.keep.name}' {list(p)} then '{c.root.name}' {list(q)} do not cancel"
    return None


def _check_inverse(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if c.kind in (SINK_MIXED, HOIST_AFFINE) and c.inverse is not None and view.escapes(c.inverse.outputs[0]):
        return (
            f"Transpose '{c.inverse.name}' is a graph output: the copy of it the rewrite reads could not be "
            "merged with it, and the rewrite would add a node"
        )
    if c.kind == SINK_UNARY and c.inverse is None:
        u = c.chain[0]
        return (
            f"no Transpose with the inverse of '{c.root.name}' perm {list(_perm(c.root))} reads the output of "
            f"{u.op} '{u.name}': moving the Transpose below it would cancel nothing"
        )
    if c.kind == SINK_MIXED and c.inverse is None:
        t = c.transposes[0]
        return (
            f"no Transpose with the inverse of '{t.name}' perm {list(_perm(t))} reads the other operand "
            f"'{c.root.inputs[c.sides[1]].name}' of {c.root.op} '{c.root.name}' (or the tensor an affine chain "
            "computes it from): sinking the Transpose would only move it"
        )
    return None


def _check_single_use(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if c.kind in (DEDUPE, CANCEL):
        for t in c.transposes if c.kind == DEDUPE else [c.root]:
            if view.escapes(t.outputs[0]):
                return f"tensor '{t.outputs[0].name}' is a graph output"
        return None
    if c.kind == CANCEL_THROUGH:
        reason = outside_reader_reason(c.inverse.outputs[0], c.chain[:1], view)
        if reason:
            return reason
    if c.kind in (HOIST_AFFINE, CANCEL_THROUGH):
        for i, n in enumerate(c.chain):
            reader = c.chain[i + 1] if i + 1 < len(c.chain) else c.root
            reason = outside_reader_reason(n.outputs[0], [reader], view)
            if reason:
                return reason
        return None
    if c.kind in (SINK_SUM, SINK_MIXED):
        for j, t in enumerate(c.transposes):
            reader = c.chain[0] if c.kind == SINK_SUM and c.chain and j == 1 else c.root
            reason = outside_reader_reason(t.outputs[0], [reader], view)
            if reason:
                return reason
        for i, n in enumerate(c.chain):
            reader = c.chain[i + 1] if i + 1 < len(c.chain) else c.root
            reason = outside_reader_reason(n.outputs[0], [reader], view)
            if reason:
                return reason
        return None
    reason = outside_reader_reason(c.root.outputs[0], c.chain[:1], view)
    if reason or c.kind == SINK_UNARY:
        return reason
    # SINK_AFFINE
    for i, n in enumerate(c.chain[:-1]):
        reason = outside_reader_reason(n.outputs[0], [c.chain[i + 1]], view)
        if reason:
            return reason
    return outside_reader_reason(c.base, [c.root], view)


def _check_readers(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if c.kind not in (DEDUPE, CANCEL):
        return None
    readers = _group_readers(c.transposes) if c.kind == DEDUPE else _raw_readers(c.root.outputs[0])
    if not readers:
        return f"Transpose '{c.root.name}' has no reader"
    for r in readers:
        if (r.domain or "") not in ops.DEFAULT_DOMAINS:
            return f"reader {r.op} '{r.name}' is not in the default domain"
        if len(r.outputs) != 1:
            return f"reader {r.op} '{r.name}' has {len(r.outputs)} outputs"
        if any(isinstance(a, gs.Graph) or (isinstance(a, list) and any(isinstance(s, gs.Graph) for s in a))
               for a in r.attrs.values()):
            return f"reader {r.op} '{r.name}' holds a subgraph"
    return None


def _check_conv(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if c.kind != SINK_AFFINE:
        return None
    conv = view.producer(c.base)
    if not is_op(conv, ops.CONV):
        what = "a graph input" if conv is None else f"{conv.op} '{conv.name}'"
        return f"Transpose '{c.root.name}' reads {what}, not a Conv: no fold follows"
    if len(conv.inputs) < 2 or not view.is_constant(conv.inputs[1]):
        return f"Conv '{conv.name}' weight is not a constant"
    return None


def _check_shape(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if c.kind == SINK_AFFINE:
        rank = len(_perm(c.root))
        shape = ctx.shape(c.base)
        if shape is None or len(shape) != rank or not isinstance(shape[1], int):
            return f"the shape of '{c.base.name}' is not known with rank {rank} and static channels"
    if c.kind in (SINK_AFFINE, SINK_MIXED, HOIST_AFFINE, CANCEL_THROUGH, SINK_SUM):
        rank = len(_perm(c.transposes[0] if c.kind in (SINK_MIXED, SINK_SUM) else c.root))
        for n in c.chain:
            if not is_op(n, *ops.AFFINE_BINARY_OPS):
                continue
            _, k = _const_operand(n, view)
            if np.ndim(k) > rank:
                return f"{n.op} '{n.name}' constant of rank {np.ndim(k)} exceeds the data's rank {rank}"
    return None


def _pad_list(node: gs.Node, rank: int, view: GraphView) -> list[int] | str:
    """A Pad's pads (begins, then ends) over ``rank`` axes, or the reason they are not usable."""
    if len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name:
        return f"Pad '{node.name}' has an axes input"
    pads = int_operand(node, "pads", 1, view)
    if pads is None and "paddings" in node.attrs:
        pads = [int(v) for v in node.attrs["paddings"]]
    if isinstance(pads, NotConstant):
        return pads
    if pads is None or len(pads) != 2 * rank:
        return f"Pad '{node.name}' has no pads of length {2 * rank}"
    return pads


def _check_pads(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if c.kind != CANCEL_THROUGH:
        return None
    rank = len(_perm(c.root))
    for n in c.chain:
        if is_op(n, ops.PAD):
            pads = _pad_list(n, rank, view)
            if isinstance(pads, str):
                return pads
    return None


def _check_per_channel(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if c.kind != SINK_AFFINE:
        return None
    perm = _perm(c.root)
    if 1 not in perm:
        return f"Transpose '{c.root.name}' perm {list(perm)} has no channel axis 1"
    for n in c.chain:
        reason = _per_channel_reason(n, perm, ctx.shape(c.base)[1], view)
        if reason:
            return reason
    return None


CONDITIONS = [
    ("opset", _check_opset),
    ("perm", _check_perm),
    ("same_perm", _check_same_perm),
    ("inverse_transpose", _check_inverse),
    ("single_use", _check_single_use),
    ("readers", _check_readers),
    ("conv_producer", _check_conv),
    ("static_shape", _check_shape),
    ("constant_pads", _check_pads),
    ("per_channel", _check_per_channel),
]


# --------------------------------------------------------------------------------------------
# rewrite
# --------------------------------------------------------------------------------------------


def _permuted_shape(shape, perm):
    """Shape of ``T(x, perm)`` for ``x`` of ``shape`` (None stays None)."""
    return None if shape is None else tuple(shape[p] for p in perm)


def _var(ctx: Context, base: str, like: gs.Tensor, shape) -> gs.Variable:
    dtype = ctx.dtype(like)
    var = gs.Variable(ctx.fresh_name(base), dtype=dtype, shape=list(shape) if shape is not None else None)
    if shape is not None:
        ctx.shapes[var.name] = tuple(shape)
    if dtype is not None:
        ctx.dtypes[var.name] = dtype
    return var


def _permuted_constant(ctx: Context, node: gs.Node, values: np.ndarray, rank: int, perm) -> gs.Constant:
    """``values`` right-aligned to ``rank`` dims, transposed by ``perm``, leading 1s dropped."""
    k = np.asarray(values)
    if k.ndim == 0:
        return ctx.constant(f"{node.name or node.op}.const", k.copy())
    k4 = k.reshape((1,) * (rank - k.ndim) + k.shape).transpose(perm)
    lead = 0
    while lead < k4.ndim - 1 and k4.shape[lead] == 1:
        lead += 1
    return ctx.constant(f"{node.name or node.op}.const", np.ascontiguousarray(k4.reshape(k4.shape[lead:])))


def _reissue_chain(c: Candidate, view: GraphView, ctx: Context, start: gs.Tensor, perm, last_out=None):
    """The chain's nodes issued again on ``start``, constants transposed by ``perm``; returns
    (new nodes, output tensor)."""
    nodes, cur = [], start
    rank = len(perm)
    for i, n in enumerate(c.chain):
        idx, k = _const_operand(n, view)
        const = _permuted_constant(ctx, n, k, rank, perm)
        inputs = [const, cur] if idx == 0 else [cur, const]
        if last_out is not None and i == len(c.chain) - 1:
            out = last_out
        else:
            out = _var(ctx, f"{n.outputs[0].name}.perm", n.outputs[0], _permuted_shape(ctx.shape(n.outputs[0]), perm))
        nodes.append(NewNode(n.op, ctx.fresh_name(f"{n.name or n.op}/perm"), dict(n.attrs), inputs, [out]))
        cur = out
    return nodes, cur


def _reissue_through(c: Candidate, view: GraphView, ctx: Context, target: gs.Tensor) -> list[NewNode]:
    """cancel_through: the steps issued again on ``c.base`` in its own layout (constants and pads
    permuted by the outer perm ``q``; the last writes ``target``)."""
    q = _perm(c.root)
    rank = len(q)
    nodes, cur = [], c.base
    for i, n in enumerate(c.chain):
        last = i == len(c.chain) - 1
        out = target if last else _var(ctx, f"{n.outputs[0].name}.perm", n.outputs[0],
                                        _permuted_shape(ctx.shape(n.outputs[0]), q))
        name = ctx.fresh_name(f"{n.name or n.op}/perm")
        if is_op(n, *ops.AFFINE_BINARY_OPS):
            idx, k = _const_operand(n, view)
            const = _permuted_constant(ctx, n, k, rank, q)
            nodes.append(NewNode(n.op, name, dict(n.attrs), [const, cur] if idx == 0 else [cur, const], [out]))
        elif is_op(n, ops.PAD):
            pads = _pad_list(n, rank, view)
            moved = [pads[q[j]] for j in range(rank)] + [pads[rank + q[j]] for j in range(rank)]
            attrs = {k: v for k, v in n.attrs.items() if k not in ("pads", "paddings", "value")}
            opset = graph_opset(view)
            if opset is not None and opset < 11:
                attrs["pads"] = moved
                if "value" in n.attrs:
                    attrs["value"] = n.attrs["value"]
                if "paddings" in n.attrs:
                    attrs = {**{k: v for k, v in attrs.items() if k != "pads"}, "paddings": moved}
                inputs = [cur]
            else:
                inputs = [cur, ctx.constant(f"{n.name or n.op}.pads", np.array(moved, dtype=np.int64)), *n.inputs[2:3]]
            nodes.append(NewNode(n.op, name, attrs, inputs, [out]))
        else:
            nodes.append(NewNode(n.op, name, dict(n.attrs), [cur], [out]))
        cur = out
    return nodes


def _reissue_readers(readers: list[gs.Node], olds: list[gs.Tensor], replacement: gs.Tensor, ctx: Context, summary: str,
                     first: list[NewNode] = ()) -> list[Plan]:
    """Each of ``readers`` issued again with ``replacement`` for every tensor of ``olds`` it reads;
    ``first``: new nodes the first plan issues before its reader (the replacement's producer)."""
    old_ids = {id(t) for t in olds}
    plans = []
    for i, r in enumerate(readers):
        inputs = [replacement if t is not None and id(t) in old_ids else t for t in r.inputs]
        node = NewNode(r.op, ctx.fresh_name(r.name or r.op), dict(r.attrs), inputs, [r.outputs[0]])
        plans.append(Plan(r.outputs[0], [*(first if i == 0 else ()), node], summary))
    return plans


def _new_transpose(ctx: Context, x: gs.Tensor, perm, like: gs.Tensor, name: str) -> tuple[NewNode, gs.Variable]:
    """``Transpose(x, perm)`` into a new tensor shaped like ``like``."""
    out = _var(ctx, f"{like.name}.t", like, ctx.shape(like))
    return NewNode(ops.TRANSPOSE, ctx.fresh_name(name), {"perm": list(perm)}, [x], [out]), out


@register
class NormalizeLayout:
    name = "normalize-layout"
    summary = "NHWC Transposes de-duplicated, cancelled, and moved below sums and per-channel affines"

    def match(self, view: GraphView, ctx: Context):
        copies = _copies(view)
        for node in list(view.graph.nodes):
            cands: list[Candidate] = []
            if is_op(node, ops.TRANSPOSE) and len(node.outputs) == 1:
                cands = _match_transpose(node, view, copies, ctx)
            elif is_op(node, ops.ADD, ops.SUB):
                cand = _match_sum(node, view)
                cands = [cand] if cand is not None else []
            for cand in cands:
                yield Match(f"{cand.kind}:{cand.target.name}", cand.nodes(view), cand)

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return run_checks(CONDITIONS, match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context):
        c: Candidate = match.data
        if c.kind == DEDUPE:
            x = view.source(c.root.inputs[0])
            node, t = _new_transpose(ctx, x, _perm(c.root), c.root.outputs[0], f"{c.root.name or 'transpose'}/merged")
            return _reissue_readers(_group_readers(c.transposes), [n.outputs[0] for n in c.transposes], t, ctx,
                                    f"{len(c.transposes)} copies of Transpose '{c.root.name}' -> one", first=[node])
        if c.kind == CANCEL:
            x = view.source(c.keep.inputs[0])
            return _reissue_readers(_raw_readers(c.root.outputs[0]), [c.root.outputs[0]], x, ctx,
                                    f"Transposes '{c.keep.name}' then '{c.root.name}' cancel")
        target = c.target
        if c.kind == CANCEL_THROUGH:
            return Plan(target, _reissue_through(c, view, ctx, target),
                        f"Transposes '{c.inverse.name}' and '{c.root.name}' cancel across {len(c.chain)} step(s) "
                        f"({', '.join(n.op for n in c.chain)})")
        if c.kind == HOIST_AFFINE:
            perm = _perm(c.root)
            copy, y = _new_transpose(ctx, c.base, perm, c.inverse.outputs[0], f"{c.inverse.name or 'transpose'}/copy")
            nodes, _ = _reissue_chain(c, view, ctx, y, perm, last_out=target)
            return Plan(target, [copy, *nodes],
                        f"{len(c.chain)} affine(s) moved after Transpose '{c.root.name}' (a copy of '{c.inverse.name}' reads their input)")
        if c.kind == SINK_UNARY:
            perm, u = _perm(c.root), c.chain[0]
            inner = _var(ctx, f"{target.name}.inner", target, _permuted_shape(ctx.shape(target), _inverse(perm)))
            nodes = [
                NewNode(u.op, ctx.fresh_name(f"{u.name or u.op}/perm"), dict(u.attrs), [c.base, *u.inputs[1:]], [inner]),
                NewNode(ops.TRANSPOSE, ctx.fresh_name(f"{c.root.name or 'transpose'}/sunk"), {"perm": list(perm)}, [inner], [target]),
            ]
            return Plan(target, nodes, f"Transpose '{c.root.name}' moved below {u.op} '{u.name}' (an inverse Transpose follows)")
        if c.kind == SINK_AFFINE:
            perm = _perm(c.root)
            inv = _inverse(perm)
            nodes, cur = _reissue_chain(c, view, ctx, c.base, inv)
            nodes.append(NewNode(ops.TRANSPOSE, ctx.fresh_name(f"{c.root.name or 'transpose'}/sunk"), {"perm": list(perm)},
                                 [cur], [target]))
            return Plan(target, nodes, f"{len(c.chain)} per-channel affine(s) moved before Transpose '{c.root.name}'")
        perm = _perm(c.transposes[0])
        out_shape = ctx.shape(target)
        inner_shape = _permuted_shape(out_shape, _inverse(perm))
        inner = _var(ctx, f"{target.name}.inner", target, inner_shape)
        base = c.root.name or c.root.op
        if c.kind == SINK_SUM and c.chain:
            a, b = (view.source(t.inputs[0]) for t in c.transposes)
            nodes, z = _reissue_chain(c, view, ctx, b, _inverse(perm))
            operands = [None, None]
            operands[c.sides[0]], operands[c.sides[1]] = a, z
            nodes.append(NewNode(c.root.op, ctx.fresh_name(f"{base}/inner"), {}, operands, [inner]))
            what = f"{c.root.op} of two Transposes {list(perm)}, one through {len(c.chain)} affine(s) -> one Transpose after it"
        elif c.kind == SINK_SUM:
            a, b = (view.source(t.inputs[0]) for t in c.transposes)
            nodes = [NewNode(c.root.op, ctx.fresh_name(f"{base}/inner"), {}, [a, b], [inner])]
            what = f"{c.root.op} of two Transposes {list(perm)} -> one Transpose after it"
        else:
            copy, y = _new_transpose(ctx, c.base, _perm(c.inverse), c.inverse.outputs[0],
                                     f"{c.inverse.name or 'transpose'}/copy")
            nodes, z = _reissue_chain(c, view, ctx, y, _inverse(perm))
            nodes.insert(0, copy)
            operands = [None, None]
            operands[c.sides[0]] = view.source(c.transposes[0].inputs[0])
            operands[c.sides[1]] = z
            nodes.append(NewNode(c.root.op, ctx.fresh_name(f"{base}/inner"), {}, operands, [inner]))
            what = (f"{c.root.op} of Transpose {list(perm)} and '{c.base.name}' (read as '{c.inverse.outputs[0].name}'"
                    f"{f' through {len(c.chain)} affine(s)' if c.chain else ''}) -> one Transpose after it")
        nodes.append(NewNode(ops.TRANSPOSE, ctx.fresh_name(f"{base}/transpose"), {"perm": list(perm)}, [inner], [target]))
        return Plan(target, nodes, what)
