"""Affine fold: per-channel affine nodes next to a Conv fold into its weights.

Pattern. ``Conv -> A`` or ``A -> Conv``, where ``A`` is BatchNormalization or Mul/Div/Add/Sub with a
scalar or per-channel constant (``y[c] = s[c] * x[c] + t[c]``) and the tensor between the two is read
by nothing else. Covers Conv+BN left by an exporter, layer scales (``gamma * conv(x)``), YOLOv7's
ImplicitA (add before a 1x1 conv) and ImplicitM (mul after it), ResRep's conv-BN before the
compactor, and the BN of a depthwise conv before a pointwise one.

Algebra.
  after:  ``s * conv(X; W, b) + t = conv(X; s[o] W[o], s b + t)``.
  before: ``conv(s * X + t; W, b) = conv(X; W[o, i] s[i], b + sum_{i,taps} W[o, i] t[i])``, where
          ``i`` runs over the input channels of output ``o``'s group. The shift term is exact only
          when the conv reads no padding: its zero padding would otherwise stand where ``t`` was.

Exactness conditions (checked in this order):
  1. ``inference_bn``      a BatchNormalization is in inference mode with one output in use.
  2. ``constant_weights``  the Conv's weight and bias and the affine node's constants are constants.
  3. ``static_geometry``   the Conv's pads are known (SAME needs a static input size).
  4. ``per_channel``       the constant is a scalar or per channel of the tensor it acts on.
  5. ``no_padding``        an affine with a shift before the conv: the conv has no padding.
  6. ``single_use``        the tensor between the two nodes is read by nothing else and is not a
                           graph output.
  7. ``ring_shift``        the affine node is not one of the shifts of a padding ring spelled
                           ``Sub(b) -> Pad(0) -> Add(b)`` that conv-chain takes whole
                           (:func:`passes.conv_chain.shift_ring_reason`): folding the shifts apart
                           would leave a ring of 0 against a bias rounded once more.
Cost condition (``--allow-cost-increase`` lifts it):
  8. ``runtime_fusion``    the affine node is not part of a decomposition that onnxruntime or
                           OpenVINO fuse into one kernel (TorchScript's GELU ends in ``Mul(0.5)``
                           before the next Conv): folding it would leave the rest unfused, several
                           kernels instead of one (see :mod:`passes._fusions`).
Folding never adds multiply-accumulates. It adds weights only when a shift reaches a Conv without
a bias (the Conv gains one; a zero bias is left out); the engine's net cost weighs that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import algebra, ops
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, NewNode, Plan, run_checks

from . import register
from ._fusions import breaks_fusion
from .conv_chain import shift_ring_reason
from ._common import (
    affine_data_input,
    bn_inference_reason,
    conv_constants_reason,
    conv_geometry,
    conv_groups,
    conv_params,
    conv_weight,
    has_padding,
    is_op,
    node_affine,
    outside_reader_reason,
)

AFTER, BEFORE = "after", "before"


@dataclass
class Candidate:
    conv: gs.Node
    affine: gs.Node
    side: str  # AFTER: conv -> affine; BEFORE: affine -> conv

    @property
    def between(self) -> gs.Tensor:
        return self.conv.outputs[0] if self.side == AFTER else self.affine.outputs[0]

    def channels(self, view: GraphView) -> tuple[int, int]:
        """(channels the affine acts on, tensor rank)."""
        w = conv_weight(self.conv, view)
        c = w.shape[0] if self.side == AFTER else w.shape[1] * conv_groups(self.conv)
        return int(c), w.ndim


def _check_bn(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    return bn_inference_reason(c.affine, view) if is_op(c.affine, ops.BATCH_NORM) else None


def _check_constants(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    reason = conv_constants_reason(c.conv, view)
    if reason:
        return reason
    if is_op(c.affine, ops.BATCH_NORM) and (
        len(c.affine.inputs) < 5 or not all(view.is_constant(t) for t in c.affine.inputs[1:5])
    ):
        return f"BatchNormalization '{c.affine.name}' parameters are not constant"
    return None


def _input_shape(c: Candidate, view: GraphView, ctx: Context):
    return ctx.shape(view.source(c.conv.inputs[0]))


def _check_geometry(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    geo = conv_geometry(c.conv, view, _input_shape(c, view, ctx))
    return geo if isinstance(geo, str) else None


def _affine(c: Candidate, view: GraphView):
    channels, rank = c.channels(view)
    return node_affine(c.affine, view, channels, rank)


def _check_per_channel(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    aff = _affine(c, view)
    if isinstance(aff, str):
        return aff
    if c.side == BEFORE and not is_op(c.affine, ops.BATCH_NORM):
        # a per-channel constant could broadcast a single-channel input up to the conv's channels
        data = view.source(affine_data_input(c.affine, view))
        shape = ctx.shape(data)
        channels, rank = c.channels(view)
        if shape is None or len(shape) != rank or shape[1] != channels:
            return f"'{data.name}' is not known to have the rank {rank} and {channels} channels that '{c.conv.name}' reads"
    return None


def _check_padding(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if c.side == AFTER or not np.any(_affine(c, view).shift):
        return None
    if has_padding(conv_geometry(c.conv, view, _input_shape(c, view, ctx))):
        return (
            f"the shift of '{c.affine.name}' before the padded Conv '{c.conv.name}' would be replaced "
            "by zeros at the borders"
        )
    return None


def _check_single_use(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    return outside_reader_reason(c.between, [c.affine if c.side == AFTER else c.conv], view)


def _check_ring_shift(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    return shift_ring_reason(view, c.affine, ctx)


def _check_runtime_fusion(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if ctx.options.allow_cost_increase:
        return None
    return breaks_fusion([c.conv, c.affine], view)


CONDITIONS = [
    ("inference_bn", _check_bn),
    ("constant_weights", _check_constants),
    ("static_geometry", _check_geometry),
    ("per_channel", _check_per_channel),
    ("no_padding", _check_padding),
    ("single_use", _check_single_use),
    ("ring_shift", _check_ring_shift),
    ("runtime_fusion", _check_runtime_fusion),
]


@register
class AffineFold:
    name = "affine-fold"
    summary = "per-channel BN / Mul / Div / Add / Sub by constants before or after a Conv -> into the Conv"

    def match(self, view: GraphView, ctx: Context):
        for conv in view.graph.nodes:
            if not is_op(conv, ops.CONV) or len(conv.inputs) < 2:
                continue
            out = conv.outputs[0]
            users = view.users(out)
            if len(users) == 1 and affine_data_input(users[0], view) is not None:
                if view.source(affine_data_input(users[0], view)) is out:
                    yield Match(f"{conv.name}->{users[0].name}", [conv, users[0]], Candidate(conv, users[0], AFTER))
            x = view.source(conv.inputs[0])
            prod_node = view.producer(x)
            if prod_node is not None and affine_data_input(prod_node, view) is not None:
                yield Match(f"{prod_node.name}->{conv.name}", [prod_node, conv], Candidate(conv, prod_node, BEFORE))

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return run_checks(CONDITIONS, match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> Plan:
        c: Candidate = match.data
        aff = _affine(c, view)
        w, b = conv_params(c.conv, view)
        dtype = conv_weight(c.conv, view).dtype
        if c.side == AFTER:
            w, b = algebra.apply_affine(w, b, aff, inplace=True)
            x, target = c.conv.inputs[0], c.affine.outputs[0]
        else:
            w, b = algebra.fold_input_affine(w, b, aff, conv_groups(c.conv))
            x, target = affine_data_input(c.affine, view), c.conv.outputs[0]
        wc = ctx.constant(f"{c.conv.name}.fold.weight", w.astype(dtype))
        inputs = [x, wc]
        if np.any(b.astype(dtype) != 0):  # a zero bias (a scale folded into a bias-free Conv) is left out
            inputs.append(ctx.constant(f"{c.conv.name}.fold.bias", b.astype(dtype)))
        node = NewNode(ops.CONV, ctx.fresh_name(f"{c.conv.name}/fold"), dict(c.conv.attrs), inputs, [target])
        return Plan(target, [node], f"{c.affine.op} '{c.affine.name}' folded into Conv '{c.conv.name}' ({c.side})")
