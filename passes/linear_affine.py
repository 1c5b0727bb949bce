"""Linear affine fold: per-feature affine nodes before or after a linear layer fold into it.

Pattern. ``Linear -> A`` or ``A -> Linear``, where the linear layer is a Gemm or a MatMul by a
constant matrix (with its bias Add), and ``A`` is BatchNormalization on ``[N, C]`` or
Mul/Div/Add/Sub with a scalar or a constant along the last (feature) axis; the tensor between them
is read by nothing else. Covers RepViT's BN1d before its heads, BN after a Linear, layer scales.

Algebra (``y = x @ W + b``, features on the last axis).
  after:  ``s * (x @ W + b) + t = x @ (W diag(s)) + (s b + t)``.
  before: ``(s * x + t) @ W + b = x @ (diag(s) W) + (t @ W + b)``: a linear layer reads no
          padding, so the shift always folds.

Exactness conditions (checked in this order):
  1. ``inference_bn``      a BatchNormalization is in inference mode with one output in use.
  2. ``layout``            the weight and bias are constants, ``transA = 0``, and the bias broadcasts
                           along the output features only.
  3. ``per_feature``       the affine acts on the feature axis (BatchNormalization only on 2-D
                           tensors) with a scalar or one value per feature, and before the layer it
                           does not broadcast the input to more features.
  4. ``single_use``        the tensor between the two is read by nothing else.
Cost condition (``--allow-cost-increase`` lifts it):
  5. ``runtime_fusion``    the affine node is not part of a decomposition that onnxruntime or
                           OpenVINO fuse into one kernel (the ``Mul(0.5)`` of TorchScript's GELU,
                           the scale and bias of a decomposed LayerNorm before a linear layer):
                           folding it would leave the rest unfused (see :mod:`passes._fusions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxrep import ops
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, Plan, run_checks

from . import _linear, register
from ._fusions import breaks_fusion
from ._common import affine_data_input, bn_inference_reason, is_op, node_affine, outside_reader_reason

AFTER, BEFORE = "after", "before"


@dataclass
class Candidate:
    lin: _linear.Linear
    affine: gs.Node
    side: str

    @property
    def between(self) -> gs.Tensor:
        return self.lin.out if self.side == AFTER else self.affine.outputs[0]


def _rank(c: Candidate, view: GraphView, ctx: Context) -> int | None:
    """Rank of the tensor the rewritten layer reads (an affine constant of higher rank would
    change the output's rank, so per_channel refuses it)."""
    if c.side == BEFORE:
        return _linear.rank_of(view.source(affine_data_input(c.affine, view)), ctx)
    return 2 if c.lin.is_gemm else _linear.rank_of(c.lin.x, ctx)


def _affine(c: Candidate, view: GraphView, ctx: Context):
    k, n = _linear.dims(c.lin, view)
    rank = _rank(c, view, ctx)
    if rank is None:
        return f"the rank of '{c.lin.x.name}' is not known"
    return node_affine(c.affine, view, n if c.side == AFTER else k, rank, axis=-1)


def _check_bn(c, view, ctx):
    return bn_inference_reason(c.affine, view) if is_op(c.affine, ops.BATCH_NORM) else None


def _check_layout(c, view, ctx):
    return _linear.layout_reason(c.lin, view, ctx)


def _check_per_feature(c, view, ctx):
    aff = _affine(c, view, ctx)
    if isinstance(aff, str):
        return aff
    if c.side == BEFORE and not is_op(c.affine, ops.BATCH_NORM):
        data = view.source(affine_data_input(c.affine, view))
        shape = ctx.shape(data)
        k, _ = _linear.dims(c.lin, view)
        if shape is None or not shape or shape[-1] != k:
            return f"'{data.name}' is not known to have the {k} features that '{c.lin.head.name}' reads"
    return None


def _check_single_use(c, view, ctx):
    return outside_reader_reason(c.between, [c.affine if c.side == AFTER else c.lin.head], view)


def _check_runtime_fusion(c, view, ctx):
    if ctx.options.allow_cost_increase:
        return None
    return breaks_fusion([c.affine] + c.lin.nodes, view)


CONDITIONS = [
    ("inference_bn", _check_bn),
    ("layout", _check_layout),
    ("per_feature", _check_per_feature),
    ("single_use", _check_single_use),
    ("runtime_fusion", _check_runtime_fusion),
]


@register
class LinearAffine:
    name = "linear-affine"
    summary = "per-feature BN / Mul / Div / Add / Sub by constants before or after a Gemm or MatMul -> into it"

    def match(self, view: GraphView, ctx: Context):
        for node in view.graph.nodes:
            lin = _linear.as_linear(node, view)
            if lin is None:
                continue
            users = view.users(lin.out)
            if len(users) == 1 and affine_data_input(users[0], view) is not None:
                if view.source(affine_data_input(users[0], view)) is lin.out:
                    yield Match(f"{node.name}->{users[0].name}", lin.nodes + [users[0]], Candidate(lin, users[0], AFTER))
            prev = view.producer(lin.x)
            if prev is not None and affine_data_input(prev, view) is not None:
                yield Match(f"{prev.name}->{node.name}", [prev] + lin.nodes, Candidate(lin, prev, BEFORE))

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return run_checks(CONDITIONS, match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> Plan:
        c: Candidate = match.data
        aff = _affine(c, view, ctx)
        w, b = _linear.params(c.lin, view)
        if c.side == AFTER:
            w *= aff.scale[None, :]
            b = aff.scale * b + aff.shift
            x, target = c.lin.head.inputs[0], c.affine.outputs[0]
        else:
            b = b + aff.shift @ w
            w *= aff.scale[:, None]
            x, target = affine_data_input(c.affine, view), c.lin.out
        dtype = view.constant(c.lin.head.inputs[1]).dtype
        nodes = _linear.emit(ctx, c.lin.head.name or "linear", x, w, b, dtype, target, _rank(c, view, ctx))
        return Plan(target, nodes, f"{c.affine.op} '{c.affine.name}' folded into {c.lin.head.op} '{c.lin.head.name}' ({c.side})")
