"""Pieces that several passes share: conv geometry from node attributes, per-channel constants,
and affine nodes (BatchNormalization, Mul/Div/Add/Sub by a constant) read as :class:`Affine` maps."""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import ops
from onnxrep.algebra import Affine, AxisTaps, as_f64, bn_affine
from onnxrep.graph import GraphView
from onnxrep.rewrite import NewNode


def is_op(node: gs.Node | None, *op_types: str) -> bool:
    return node is not None and node.op in op_types and (node.domain or "") in ops.DEFAULT_DOMAINS


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Stride and taps of a sliding-window op along every spatial axis."""

    strides: tuple[int, ...]
    taps: tuple[AxisTaps, ...]


def same_pad_reason(node: gs.Node, size, kernel, strides, dilations, auto_pad: str) -> str | None:
    """Why onnxruntime's pads of ``auto_pad = SAME_UPPER / SAME_LOWER`` may differ from the
    spec's ``max(0, (ceil(L / s) - 1) * s + d * (k - 1) + 1 - L)``, or None when they agree.

    onnxruntime computes ``need = (ceil(L / s) - 1) * s + k - L`` without the ``max(0, ...)``:
      * a pool with dilations is padded for the undilated kernel (it then reads other windows,
        and may even give another output size);
      * when the kernel is 2 or more smaller than the stride, ``need`` can fall below -1 and
        the head pad goes negative: the windows start inside the input.
    A Conv with SAME and dilations is refused by onnxruntime; the spec's pads (which the onnx
    reference evaluator uses) stand for it, ``need`` taken with the dilated kernel.
    For ``need >= -1`` and an undilated pool both agree (swept against onnxruntime for Conv and
    AveragePool, SAME_UPPER and SAME_LOWER, ``L <= 16``, ``k <= 5``, ``s <= 7``).
    """
    conv = is_op(node, ops.CONV)
    for n, k, s, d in zip(size, kernel, strides, dilations):
        if d != 1 and not conv:
            return f"{node.op} '{node.name}' uses auto_pad={auto_pad} with dilations: onnxruntime pads it for the undilated kernel"
        need = (ceil(n / s) - 1) * s + d * (k - 1) + 1 - n
        if need < -1:
            return (
                f"{node.op} '{node.name}' uses auto_pad={auto_pad} with a kernel {k} smaller than its stride {s} "
                f"by 2 or more on a size {n}: onnxruntime pads it negatively"
            )
    return None


def window_geometry(node: gs.Node, kernel: tuple[int, ...], input_shape: tuple | None) -> Geometry | str:
    """Geometry of a Conv or AveragePool from its attributes; a reason string when it is not static.

    ``auto_pad = SAME_UPPER / SAME_LOWER`` is resolved to explicit pads when the input's spatial
    size is known: total ``max(0, (ceil(L / s) - 1) * s + d * (k - 1) + 1 - L)``, the odd one at the
    end (UPPER) or the beginning (LOWER); a reason when onnxruntime pads otherwise
    (``same_pad_reason``: a dilated pool, or a kernel 2 or more smaller than the stride).
    """
    rank = len(kernel)
    strides = tuple(int(v) for v in node.attrs.get("strides", [1] * rank))
    dilations = tuple(int(v) for v in node.attrs.get("dilations", [1] * rank))
    pads = [int(v) for v in node.attrs.get("pads", [0] * (2 * rank))]
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if len(strides) != rank or len(dilations) != rank or len(pads) != 2 * rank:
        return f"{node.op} '{node.name}' has attributes of the wrong length"
    if auto_pad == "VALID":
        pads = [0] * (2 * rank)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        spatial = None if input_shape is None else input_shape[2:]
        if spatial is None or len(spatial) != rank or not all(isinstance(v, int) for v in spatial):
            return f"{node.op} '{node.name}' uses auto_pad={auto_pad} and its input size is not static"
        pads = [0] * (2 * rank)
        reason = same_pad_reason(node, spatial, kernel, strides, dilations, auto_pad)
        if reason is not None:
            return reason
        for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
            total = max(0, (ceil(size / s) - 1) * s + d * (k - 1) + 1 - size)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + rank] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    elif auto_pad != "NOTSET":
        return f"{node.op} '{node.name}' has unknown auto_pad={auto_pad}"
    taps = tuple(AxisTaps.of_conv(k, pads[i], pads[i + rank], dilations[i]) for i, k in enumerate(kernel))
    return Geometry(strides, taps)


# --------------------------------------------------------------------------------------------
# Per-channel constants and affine nodes
# --------------------------------------------------------------------------------------------


def per_channel(values: np.ndarray, channels: int, rank: int, axis: int = 1) -> np.ndarray | None:
    """``values`` as a float64 vector of ``channels`` if it broadcasts against a tensor of ``rank``
    dims along ``axis`` only (scalar, or ``C`` at ``axis`` and 1 elsewhere): axis 1 for the
    ``(N, C, ...)`` tensors of convolutions, the last axis for the features of linear layers."""
    v = np.asarray(values)
    if v.dtype.kind != "f" and str(v.dtype) != "bfloat16":
        return None
    if v.ndim > rank:
        return None
    shape = (1,) * (rank - v.ndim) + tuple(v.shape)
    axis = axis % rank
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(as_f64(v).reshape(-1), (channels,)).copy()


def outside_reader_reason(tensor: gs.Tensor, readers, view: GraphView) -> str | None:
    """Why ``tensor`` is a graph output or is read by a node not in ``readers``, or None."""
    if view.escapes(tensor):
        return f"tensor '{tensor.name}' is a graph output"
    inside = {id(n) for n in readers}
    others = [u for u in view.users(tensor) if id(u) not in inside]
    if others:
        return f"tensor '{tensor.name}' is also read by '{others[0].name}' ({others[0].op})"
    return None


def affine_data_input(node: gs.Node, view: GraphView) -> gs.Tensor | None:
    """The data operand of an affine-looking node, or None when it is not one.

    BatchNormalization: its first input. Mul/Add: the operand that is not constant (exactly one
    must be). Sub: either operand. Div: only ``data / constant``.
    """
    if is_op(node, ops.BATCH_NORM):
        return node.inputs[0]
    if not is_op(node, *ops.AFFINE_BINARY_OPS) or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    ca, cb = view.is_constant(a), view.is_constant(b)
    if ca == cb:
        return None
    if node.op == ops.DIV and ca:
        return None
    return b if ca else a


#: Below this opset of the default domain, Add/Sub/Mul/Div broadcast only with ``broadcast=1`` (the
#: second operand aligned at ``axis``, by default at the end) and BatchNormalization has ``is_test``.
LEGACY_OPSET = 7


def opset_version(opsets) -> int | None:
    """The default domain's version among ``opsets`` (OperatorSetIdProtos, e.g. ``Context.opsets``)."""
    for entry in opsets or ():
        if entry.domain in ops.DEFAULT_DOMAINS:
            return int(entry.version)
    return None


def graph_opset(view: GraphView, opset: int | None = None) -> int | None:
    """``opset`` if given, else the default-domain opset of the graph ``view`` shows."""
    if opset is not None:
        return int(opset)
    version = getattr(view.graph, "opset", None)
    return int(version) if version is not None else None


def legacy_operand(node: gs.Node, values: np.ndarray, const_first: bool, rank: int, opset: int | None) -> np.ndarray | str:
    """The constant operand of a binary Add/Sub/Mul/Div as a modern broadcasting operand: ``values``
    from opset 7 on; below it (legacy broadcasting) reshaped to where ``broadcast=1`` and ``axis``
    place it against the data operand of ``rank`` dims, or the reason it does not broadcast that
    way (a constant first operand with ``broadcast=1``, which the data would be broadcast to; a
    constant that does not fit; ``broadcast=0``, which needs equal shapes, with another rank)."""
    if opset is None or opset >= LEGACY_OPSET:
        return values
    v = np.asarray(values)
    broadcast = int(node.attrs.get("broadcast", 0))
    where = f"{node.op} '{node.name}' uses legacy broadcast (broadcast={broadcast}) below opset {LEGACY_OPSET}"
    if broadcast == 0:
        if v.ndim != rank:
            return f"{where}: its constant of shape {list(v.shape)} does not have the data's {rank} dims"
        return v
    if const_first:
        return f"{where}: the constant is the first operand, which the data would be broadcast to"
    start = int(node.attrs["axis"]) if "axis" in node.attrs else rank - v.ndim
    if start < 0:
        start += rank
    if start < 0 or start + v.ndim > rank:
        return f"{where}: its constant of shape {list(v.shape)} does not fit at axis {start} of {rank} dims"
    return v.reshape((1,) * start + tuple(v.shape) + (1,) * (rank - start - v.ndim))


def node_affine(node: gs.Node, view: GraphView, channels: int, rank: int, axis: int = 1,
                opset: int | None = None) -> Affine | str:
    """The affine map ``node`` applies along ``axis`` of its data input (of ``rank`` dims), or the
    reason it is not one. BatchNormalization acts on axis 1. ``opset``: the default domain's
    (default: the graph's), for the semantics of BatchNormalization and broadcasting below 7."""
    opset = graph_opset(view, opset)
    if is_op(node, ops.BATCH_NORM):
        if axis % rank != 1:
            return f"BatchNormalization '{node.name}' normalizes axis 1, not the feature axis"
        reason = bn_inference_reason(node, view, opset)
        if reason:
            return reason
        if len(node.inputs) < 5 or not all(view.is_constant(t) for t in node.inputs[1:5]):
            return f"BatchNormalization '{node.name}' parameters are not constant"
        scale, bias, mean, var = (view.constant(t) for t in node.inputs[1:5])
        vecs = [per_channel(v, channels, 2) for v in (scale, bias, mean, var)]
        if any(v is None for v in vecs):
            return f"BatchNormalization '{node.name}' parameters do not have {channels} channels"
        return bn_affine(*vecs, float(node.attrs.get("epsilon", 1e-5)))
    a, b = node.inputs
    const_first = view.is_constant(a)
    raw = view.constant(a if const_first else b)
    operand = legacy_operand(node, raw, const_first, rank, opset)
    if isinstance(operand, str):
        return operand
    vec = per_channel(operand, channels, rank, axis)
    if vec is None:
        return f"{node.op} '{node.name}' constant of shape {list(np.shape(raw))} is not per-channel for {channels} channels"
    ones, zeros = np.ones(channels), np.zeros(channels)
    if node.op == ops.MUL:
        return Affine(vec, zeros)
    if node.op == ops.DIV:
        if np.any(vec == 0):
            return f"Div '{node.name}' divides by zero"
        return Affine(1.0 / vec, zeros)
    if node.op == ops.ADD:
        return Affine(ones, vec)
    return Affine(-ones, vec) if const_first else Affine(ones, -vec)  # Sub


def bn_inference_reason(node: gs.Node, view: GraphView, opset: int | None = None) -> str | None:
    """Why a BatchNormalization does not compute an inference-mode affine map (training mode,
    running statistics outputs, ``spatial = 0``), or None.

    Below opset 7 (BatchNormalization-1 and -6) the mode is the ``is_test`` attribute, whose
    default 0 is training mode. Up to opset 13 a BatchNormalization with more than one output *is*
    in training mode (it normalizes with the batch's statistics, whether or not the extra outputs
    are read); from opset 14 the extra outputs go with ``training_mode = 1``. Either way: any
    named extra output declines. ``opset``: the default domain's (default: the graph's)."""
    opset = graph_opset(view, opset)
    if (opset is not None and opset < LEGACY_OPSET) or "is_test" in node.attrs:
        if int(node.attrs.get("is_test", 0)) == 0:
            return (
                f"BatchNormalization '{node.name}' has is_test=0 below opset {LEGACY_OPSET} "
                "(training mode: it normalizes with the batch's statistics)"
            )
    if int(node.attrs.get("training_mode", 0)) != 0:
        return f"BatchNormalization '{node.name}' is in training mode"
    if int(node.attrs.get("spatial", 1)) != 1:
        return f"BatchNormalization '{node.name}' has spatial=0"
    if any(extra.name for extra in node.outputs[1:]):
        return f"BatchNormalization '{node.name}' has running statistics outputs (training mode)"
    return None


# --------------------------------------------------------------------------------------------
# Conv nodes
# --------------------------------------------------------------------------------------------


def conv_constants_reason(conv: gs.Node, view: GraphView) -> str | None:
    """Why a Conv's weight or bias is not a usable constant, or None."""
    for t in conv.inputs[1:3]:
        if t is not None and t.name and not view.is_constant(t):
            return f"Conv '{conv.name}' input '{t.name}' is not a constant"
    w = view.constant(conv.inputs[1])
    if w.dtype.kind != "f" and str(w.dtype) != "bfloat16":
        return f"Conv '{conv.name}' weight has dtype {w.dtype}"
    return None


def conv_params(conv: gs.Node, view: GraphView) -> tuple[np.ndarray, np.ndarray]:
    """A Conv's weight (a float64 copy the caller owns) and bias (zeros when it has none)."""
    w = np.array(view.constant(conv.inputs[1]), dtype=np.float64)
    bt = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = as_f64(view.constant(bt)) if bt is not None and bt.name else np.zeros(w.shape[0])
    return w, bias


def conv_weight(conv: gs.Node, view: GraphView) -> np.ndarray:
    return view.constant(conv.inputs[1])


def conv_groups(conv: gs.Node) -> int:
    return int(conv.attrs.get("group", 1))


def conv_geometry(conv: gs.Node, view: GraphView, input_shape: tuple | None) -> Geometry | str:
    kernel = tuple(conv_weight(conv, view).shape[2:])
    ks = conv.attrs.get("kernel_shape")
    if ks is not None and tuple(int(v) for v in ks) != kernel:
        return f"Conv '{conv.name}' kernel_shape disagrees with its weight"
    return window_geometry(conv, kernel, input_shape)


def has_padding(geo: Geometry) -> bool:
    """True when some axis reads outside the input (pads on either side)."""
    return any(t.first != 0 or t.excess != -(t.count - 1) * t.step for t in geo.taps)


def conv_attrs(weight_shape, groups: int, strides, taps) -> dict:
    """Attributes of a Conv with a weight of ``weight_shape`` whose per-axis taps are ``taps``."""
    pads = [-t.first for t in taps] + [t.excess + t.step * (t.count - 1) + t.first for t in taps]
    return {
        "group": int(groups),
        "kernel_shape": [int(k) for k in weight_shape[2:]],
        "strides": [int(s) for s in strides],
        "dilations": [t.step if t.count > 1 else 1 for t in taps],
        "pads": pads,
    }


def conv_spec(ctx, name: str, x: gs.Tensor, weight: np.ndarray, bias: np.ndarray, dtype, out: gs.Tensor,
              groups: int, strides, taps) -> NewNode:
    """A Conv NewNode reading ``x`` with ``weight`` / ``bias`` (cast to ``dtype``) as constants
    (no bias input when it is all zeros); pads and dilations from the per-axis :class:`AxisTaps`
    of the merged kernel."""
    attrs = conv_attrs(weight.shape, groups, strides, taps)
    w = ctx.constant(f"{name}.weight", weight.astype(dtype))
    bias = bias.astype(dtype)
    if not np.any(bias != 0):  # no bias input: a zero bias would only add weights
        return NewNode(ops.CONV, ctx.fresh_name(f"{name}/conv"), attrs, [x, w], [out])
    b = ctx.constant(f"{name}.bias", bias)
    return NewNode(ops.CONV, ctx.fresh_name(f"{name}/conv"), attrs, [x, w, b], [out])
