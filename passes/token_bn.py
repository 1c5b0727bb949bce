"""Token BN: BatchNormalization between two transposes acts on the last axis; make that explicit.

Pattern. ``Transpose(perm) -> BatchNormalization -> Transpose(inverse perm)`` where ``perm``
brings the last axis to axis 1 (the exporters' spelling of ``BN(x.transpose(1, 2)).transpose(1, 2)``
on ``[B, L, C]`` token tensors, as in transformers whose LayerNorm a depth pruner replaced by BN).

Algebra. Inference-mode BN is ``y = s * x + t`` per channel with ``s = gamma / sqrt(var + eps)``,
``t = beta - mean * s``; with the channel on the last axis that is ``Mul(x, s) -> Add(t)`` with
constants of shape ``[C]``, which linear-affine then folds into the neighbouring linear layer.

Exactness conditions (checked in this order):
  1. ``inference_bn``   the BN is in inference mode with constant parameters and one output in use.
  2. ``round_trip``     the second transpose undoes the first, which moves the last axis to axis 1.
  3. ``dtype``          the data's type is known (the constants take it; BN parameters may differ).
  4. ``single_use``     the tensors between the three nodes are read by nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxrep import algebra, ops
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, NewNode, Plan, run_checks

from . import register
from ._common import bn_inference_reason, is_op, outside_reader_reason

TRANSPOSE = "Transpose"


@dataclass
class Candidate:
    first: gs.Node
    bn: gs.Node
    second: gs.Node


def _check_bn(c, view, ctx):
    reason = bn_inference_reason(c.bn, view)
    if reason:
        return reason
    if len(c.bn.inputs) < 5 or not all(view.is_constant(t) for t in c.bn.inputs[1:5]):
        return f"BatchNormalization '{c.bn.name}' parameters are not constant"
    return None


def _check_round_trip(c, view, ctx):
    p, q = c.first.attrs.get("perm"), c.second.attrs.get("perm")
    if p is None or q is None or len(p) != len(q) or len(p) < 3:
        return "the transposes have no explicit permutation of rank 3 or more"
    if [p[i] for i in q] != list(range(len(p))):
        return f"perm {list(q)} does not undo perm {list(p)}"
    if p[1] != len(p) - 1:
        return f"perm {list(p)} does not bring the last axis to the BN's channel axis"
    return None


def _check_single_use(c, view, ctx):
    for t, reader in ((c.first.outputs[0], c.bn), (c.bn.outputs[0], c.second)):
        reason = outside_reader_reason(t, [reader], view)
        if reason:
            return reason
    return None


def _check_dtype(c, view, ctx):
    if ctx.dtype(c.second.outputs[0]) is None:
        return f"the dtype of '{c.second.outputs[0].name}' is not known"
    return None


CONDITIONS = [
    ("inference_bn", _check_bn),
    ("round_trip", _check_round_trip),
    ("dtype", _check_dtype),
    ("single_use", _check_single_use),
]


@register
class TokenBN:
    name = "token-bn"
    summary = "Transpose -> BatchNormalization -> Transpose back -> Mul and Add on the last axis"

    def match(self, view: GraphView, ctx: Context):
        for bn in view.graph.nodes:
            if not is_op(bn, ops.BATCH_NORM):
                continue
            first = view.producer(view.source(bn.inputs[0]))
            users = view.users(bn.outputs[0])
            if is_op(first, TRANSPOSE) and len(users) == 1 and is_op(users[0], TRANSPOSE):
                yield Match(bn.name, [first, bn, users[0]], Candidate(first, bn, users[0]))

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return run_checks(CONDITIONS, match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> Plan:
        c: Candidate = match.data
        scale, bias, mean, var = (view.constant(t) for t in c.bn.inputs[1:5])
        aff = algebra.bn_affine(scale, bias, mean, var, float(c.bn.attrs.get("epsilon", 1e-5)))
        target = c.second.outputs[0]
        dtype = ctx.dtype(target)  # the data's type (BN parameters may be of another)
        mid = ctx.like(f"{c.bn.name}.scaled", target)
        s = ctx.constant(f"{c.bn.name}.scale", aff.scale.astype(dtype))
        t = ctx.constant(f"{c.bn.name}.shift", aff.shift.astype(dtype))
        nodes = [
            NewNode(ops.MUL, ctx.fresh_name(f"{c.bn.name}/mul"), {}, [c.first.inputs[0], s], [mid]),
            NewNode(ops.ADD, ctx.fresh_name(f"{c.bn.name}/add"), {}, [mid, t], [target]),
        ]
        return Plan(target, nodes, f"BatchNormalization '{c.bn.name}' on the last axis -> Mul, Add")
