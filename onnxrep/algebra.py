"""Kernel algebra for structural re-parameterization, in pure numpy.

Every function here works on plain arrays and knows nothing of ONNX. A convolution is described by
its kernel ``W`` of shape ``(Cout, Cin // groups, k_1, ..., k_n)`` and its bias ``b`` of shape
``(Cout,)``; the geometry (stride, pads, dilation) lives with the caller. Arithmetic is done in
float64; callers cast the result back to the model's dtype once, at the end.

Notation: ``conv(X; W, b, g)`` is the ONNX Conv with ``group = g``; output channel ``o`` belongs to
group ``q = o // (Cout / g)`` and reads input channels ``q * Cin/g ... (q + 1) * Cin/g - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from math import gcd, prod
from typing import Sequence

import numpy as np

F64 = np.float64


def as_f64(a) -> np.ndarray:
    """Return ``a`` as a float64 array (a copy only where the dtype differs)."""
    return np.asarray(a, dtype=F64)


# --------------------------------------------------------------------------------------------
# Per-channel affine maps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Affine:
    """The per-channel affine map ``y[c] = scale[c] * x[c] + shift[c]`` on ``channels`` channels."""

    scale: np.ndarray
    shift: np.ndarray

    @staticmethod
    def identity(channels: int) -> "Affine":
        return Affine(np.ones(channels, F64), np.zeros(channels, F64))

    def then(self, other: "Affine") -> "Affine":
        """Composition: first ``self``, then ``other``: ``s2 * (s1 x + t1) + t2``."""
        return Affine(other.scale * self.scale, other.scale * self.shift + other.shift)


def bn_affine(scale, bias, mean, var, epsilon: float) -> Affine:
    """Inference-mode BatchNormalization as an affine map.

    ``y = scale * (x - mean) / sqrt(var + eps) + bias``, so ``s = scale / sqrt(var + eps)`` and
    ``t = bias - mean * s``.
    """
    s = as_f64(scale) / np.sqrt(as_f64(var) + F64(epsilon))
    return Affine(s, as_f64(bias) - as_f64(mean) * s)


def apply_affine(weight, bias, affine: Affine, inplace: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Fold an affine map applied after a convolution into its kernel and bias.

    ``s * conv(X; W, b) + t == conv(X; s[:, None, ...] * W, s * b + t)``. With ``inplace`` a
    float64 ``weight`` is scaled where it is (no copy of a large kernel).
    """
    w = as_f64(weight)
    s = affine.scale.reshape((-1,) + (1,) * (w.ndim - 1))
    if inplace:
        w *= s
    else:
        w = w * s
    return w, affine.scale * as_f64(bias) + affine.shift


def fold_input_affine(weight, bias, affine: Affine, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fold an affine map applied to a convolution's input into its kernel and bias.

    ``conv(s * X + t; W, b) == conv(X; W', b')`` with ``W'[o, l] = W[o, l] * s[i]`` and
    ``b'[o] = b[o] + sum_{l, taps} W[o, l] * t[i]``, where ``i = q * Cin/g + l`` is the input channel
    that tap column ``l`` of output ``o`` (group ``q``) reads. The shift part holds only where the
    convolution reads no zero padding (there the input would have been ``t``, not 0).
    """
    w = as_f64(weight)
    cout, cin_g = w.shape[:2]
    q = np.arange(cout) // (cout // groups)
    channel = q[:, None] * cin_g + np.arange(cin_g)[None, :]
    spatial = (1,) * (w.ndim - 2)
    b = as_f64(bias) + np.einsum("oik,oi->o", w.reshape(cout, cin_g, -1), affine.shift[channel])
    return w * affine.scale[channel].reshape(channel.shape + spatial), b


def fold_bn(weight, bias, scale, bn_bias, mean, var, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``BN(conv(X; W, b))`` into one convolution (``torch.nn.utils.fusion`` formula).

    ``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``.
    """
    return apply_affine(weight, bias, bn_affine(scale, bn_bias, mean, var, epsilon))


# --------------------------------------------------------------------------------------------
# Kernels for non-convolution branches
# --------------------------------------------------------------------------------------------


def identity_kernel(channels: int, groups: int, spatial_rank: int) -> np.ndarray:
    """The 1x..x1 kernel of ``conv(X; W, 0, groups) == X`` for ``X`` with ``channels`` channels.

    ``W[o, o % (C / groups), 0, ..., 0] = 1``; requires ``groups`` to divide ``channels``.
    """
    if channels % groups:
        raise ValueError(f"groups {groups} does not divide channels {channels}")
    per_group = channels // groups
    w = np.zeros((channels, per_group) + (1,) * spatial_rank, F64)
    idx = np.arange(channels)
    w[(idx, idx % per_group) + (0,) * spatial_rank] = 1.0
    return w


def avgpool_kernel(channels: int, kernel_shape: Sequence[int]) -> np.ndarray:
    """Depthwise kernel (``groups = channels``) of an AveragePool that counts padding.

    ``AveragePool(X)`` with ``count_include_pad = 1`` (or zero pads) is ``conv(X; W, 0, C)`` with
    ``W[c, 0, ...] = 1 / prod(kernel_shape)``.
    """
    k = tuple(int(v) for v in kernel_shape)
    return np.full((channels, 1) + k, 1.0 / prod(k), F64)


# --------------------------------------------------------------------------------------------
# Re-grouping, dilation and placement
# --------------------------------------------------------------------------------------------


def regroup_kernel(weight, groups: int, new_groups: int) -> np.ndarray:
    """Express a ``groups``-grouped kernel as an equivalent ``new_groups``-grouped one.

    Exact when ``groups % new_groups == 0`` (every new group holds whole old groups). The result has
    shape ``(Cout, Cin / new_groups, ...)``: output channel ``o`` of old group ``q`` keeps its taps
    on input channels ``q * Cin/groups ...`` at their offset inside new group ``o // (Cout/new_groups)``
    and zeros elsewhere.
    """
    w = as_f64(weight)
    if groups == new_groups:
        return w
    if groups % new_groups:
        raise ValueError(f"cannot regroup {groups} groups into {new_groups}")
    cout, cin_g = w.shape[:2]
    cin = cin_g * groups
    if cout % groups:
        raise ValueError(f"groups {groups} does not divide Cout {cout}")
    out = np.zeros((cout, cin // new_groups) + w.shape[2:], F64)
    cout_g, cout_ng, cin_ng = cout // groups, cout // new_groups, cin // new_groups
    for q in range(groups):
        o = slice(q * cout_g, (q + 1) * cout_g)
        start = q * cin_g - ((q * cout_g) // cout_ng) * cin_ng
        out[o, start : start + cin_g] = w[o]
    return out


def dilate_kernel(weight, dilation: Sequence[int]) -> np.ndarray:
    """Spread a kernel's taps ``dilation`` apart with zeros between them.

    ``conv(X; W, dilation=d) == conv(X; dilate_kernel(W, d), dilation=1)`` with the dense kernel of
    size ``d * (k - 1) + 1`` on each axis.
    """
    w = as_f64(weight)
    d = tuple(int(v) for v in dilation)
    if all(v == 1 for v in d):
        return w
    shape = w.shape[:2] + tuple(dv * (k - 1) + 1 for dv, k in zip(d, w.shape[2:]))
    out = np.zeros(shape, F64)
    out[(slice(None), slice(None)) + tuple(slice(None, None, dv) for dv in d)] = w
    return out


def _placement(kernel: Sequence[int], shape: Sequence[int], offset: Sequence[int], step: Sequence[int]) -> tuple:
    index = [slice(None), slice(None)]
    for size, off, st, k in zip(shape, offset, step, kernel):
        last = off + st * (k - 1)
        if off < 0 or last >= size:
            raise ValueError(f"kernel of size {k} at offset {off} step {st} does not fit in {size}")
        index.append(slice(off, last + 1, st))
    return tuple(index)


def add_placed(out: np.ndarray, weight, offset: Sequence[int], step: Sequence[int] | None = None) -> None:
    """``out += place_kernel(weight, out.shape[2:], offset, step)``, in place and without the
    intermediate zero kernel: how branch sums are accumulated."""
    w = np.asarray(weight)
    step = tuple(step) if step is not None else (1,) * (w.ndim - 2)
    out[_placement(w.shape[2:], out.shape[2:], offset, step)] += w


def place_kernel(weight, shape: Sequence[int], offset: Sequence[int], step: Sequence[int] | None = None) -> np.ndarray:
    """Place a kernel inside a larger zero kernel of spatial ``shape``.

    Tap ``j`` of axis ``i`` lands at ``offset[i] + step[i] * j``; ``step`` (default 1) is the ratio of
    the kernel's dilation to the larger kernel's. With ``offset = (K - k) // 2`` this is the centred
    zero padding of RepVGG (1x1 into 3x3) and RepLKNet (5x5 into 31x31); other offsets express the
    asymmetric pads of ACNet's 1x3 and 3x1 branches.
    """
    w = as_f64(weight)
    out = np.zeros(w.shape[:2] + tuple(int(s) for s in shape), F64)
    add_placed(out, w, offset, step)
    return out


# --------------------------------------------------------------------------------------------
# Geometry of a merged convolution
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisTaps:
    """Where a convolution reads along one spatial axis, relative to ``stride * output_index``.

    Tap ``j`` reads input position ``stride * o + first + step * j`` for ``j < count``; ``excess`` is
    ``pad_begin + pad_end - dilation * (kernel - 1)``, which with the stride fixes the output size
    ``floor((L + excess - 1) / stride) + 1`` for every input length ``L``.
    """

    first: int
    step: int
    count: int
    excess: int

    @staticmethod
    def of_conv(kernel: int, pad_begin: int, pad_end: int, dilation: int) -> "AxisTaps":
        return AxisTaps(-pad_begin, dilation, kernel, pad_begin + pad_end - dilation * (kernel - 1))

    @property
    def last(self) -> int:
        return self.first + self.step * (self.count - 1)


@dataclass(frozen=True)
class AxisGrid:
    """One axis of a merged convolution: kernel size, dilation and pads, chosen to hold all taps."""

    kernel: int
    dilation: int
    pad_begin: int
    pad_end: int

    def taps(self) -> AxisTaps:
        """The merged kernel's own taps on this axis."""
        excess = self.pad_begin + self.pad_end - self.dilation * (self.kernel - 1)
        return AxisTaps(-self.pad_begin, self.dilation, self.kernel, excess)

    def slot(self, taps: AxisTaps) -> tuple[int, int]:
        """(offset, step) at which the taps of one branch sit in the merged kernel (a single tap
        has no step of its own: 1)."""
        step = taps.step // self.dilation if taps.count > 1 else 1
        return (taps.first + self.pad_begin) // self.dilation, step


def merged_axis(branches: Sequence[AxisTaps], excess: int | None = None) -> AxisGrid:
    """The smallest grid holding every branch's taps on one axis.

    All branches must share ``excess`` (same output size for every input length). The merged kernel
    starts at the leftmost tap (``pad_begin = -min first``), its dilation is the gcd of every tap's
    distance from there, so that every tap lands on a grid point, and ``pad_end`` keeps ``excess``.
    """
    if excess is None:
        found = {t.excess for t in branches}
        if len(found) != 1:
            raise ValueError("branches disagree on output size")
        excess = found.pop()
    lo = min(t.first for t in branches)
    hi = max(t.last for t in branches)
    step = 0
    for t in branches:
        step = gcd(step, t.first - lo)
        if t.count > 1:
            step = gcd(step, t.step)
    step = step or 1
    kernel = (hi - lo) // step + 1
    pad_begin = -lo
    pad_end = excess + step * (kernel - 1) - pad_begin
    return AxisGrid(kernel, step, pad_begin, pad_end)


def merge_groups(groups: Sequence[int]) -> int:
    """The finest grouping that every branch's grouping refines: the gcd of their groups."""
    return reduce(gcd, groups)


# --------------------------------------------------------------------------------------------
# Sequential composition
# --------------------------------------------------------------------------------------------


def compose_pointwise_first(w1, b1, w2, b2, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``conv(conv(X; W1, b1); W2, b2)`` as one conv, ``W1`` a 1x1 conv with stride 1 and no pads.

    Both kernels in ``groups`` groups (see :func:`regroup_kernel`); per group ``q``:
    ``W[o, i, k] = sum_m W2[o, m, k] W1[m, i]`` and ``b[o] = b2[o] + sum_{m, k} W2[o, m, k] b1[m]``,
    with the second conv's geometry. The bias term counts every tap: exact when the second conv reads
    no zero padding, or when its padding ring holds ``b1`` (the first conv's response to zeros).
    """
    w1, w2 = as_f64(w1), as_f64(w2)
    m, cin_g = w1.shape[:2]
    cout, m_g = w2.shape[:2]
    w1g = w1.reshape(groups, 1, m // groups, cin_g)
    w2g = w2.reshape(groups, cout // groups, m_g, -1)
    w = (w2g.transpose(0, 1, 3, 2) @ w1g).transpose(0, 1, 3, 2)  # (g, o, i, k) as matrix products
    w = np.ascontiguousarray(w).reshape((cout, cin_g) + w2.shape[2:])
    b = as_f64(b2) + (w2g.sum(axis=3) @ as_f64(b1).reshape(groups, m_g, 1)).reshape(cout)
    return w, b


def compose_pointwise_last(w1, b1, w2, b2, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``conv(conv(X; W1, b1); W2, b2)`` as one conv, ``W2`` a 1x1 conv with stride 1 and no pads.

    Both in ``groups`` groups; per group: ``W[o, i, k] = sum_m W2[o, m] W1[m, i, k]``,
    ``b = b2 + W2 b1``, with the first conv's geometry. Always exact.
    """
    w1, w2 = as_f64(w1), as_f64(w2)
    m, cin_g = w1.shape[:2]
    cout, m_g = w2.shape[:2]
    w1g = w1.reshape(groups, m // groups, -1)
    w2g = w2.reshape(groups, cout // groups, m_g)
    w = (w2g @ w1g).reshape((cout, cin_g) + w1.shape[2:])
    b = as_f64(b2) + (w2g @ as_f64(b1).reshape(groups, m_g, 1)).reshape(cout)
    return w, b


# --------------------------------------------------------------------------------------------
# Sums and cost
# --------------------------------------------------------------------------------------------


def sum_kernels(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Branch sum: ``sum_i conv(X; W_i, b_i) == conv(X; sum_i W_i, sum_i b_i)`` on one grid."""
    w = sum(as_f64(p[0]) for p in parts)
    b = sum(as_f64(p[1]) for p in parts)
    return w, b


def conv_macs_per_position(weight_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one output position over all output channels: ``prod(W.shape)``."""
    return int(prod(int(v) for v in weight_shape))


# --------------------------------------------------------------------------------------------
# Channel pruning
# --------------------------------------------------------------------------------------------


def fold_constant_inputs(weight, bias, values, axis: int = 1) -> np.ndarray:
    """Bias after removing input channels that hold a constant over the whole input.

    ``weight`` is a group-1 conv kernel ``(Cout, Cin, k...)`` (``axis = 1``) or a linear weight
    ``(K, N)`` (``axis = 0``); ``values[c]`` is the constant of input channel ``c`` (0 for channels
    not removed). ``conv(X; W, b) = conv(X'; W', b + sum_c v[c] * sum_taps W[o, c])`` where ``X'``
    and ``W'`` lack the removed channels: exact only when the conv reads no padding (a zero pad
    sits where ``v[c]`` would be); for ``v[c] = 0`` it always is.
    """
    w = as_f64(weight)
    if axis == 0:
        w = w.T
    per_channel = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)  # (Cout, Cin): taps summed
    return as_f64(bias) + per_channel @ as_f64(values)


def merge_input_channels(weight, into: Sequence[int], axis: int = 1) -> np.ndarray:
    """Weight reading input channels that carry equal values through one channel each.

    ``into[c]`` is the channel that takes ``c``'s place (``c`` itself when kept). Since
    ``W[:, c] * x_c + W[:, d] * x_d = (W[:, c] + W[:, d]) * x_c`` when ``x_c = x_d`` everywhere,
    each kept slice becomes the sum of the slices merged into it (float64; the merged-away slices
    are left for the caller to drop). ``axis``: 1 for conv kernels, 0 for linear ``(K, N)``.
    """
    w = np.array(weight, dtype=F64)
    out = w.copy()
    for c, keep in enumerate(into):
        if keep != c:
            dst = [slice(None)] * w.ndim
            src = list(dst)
            dst[axis], src[axis] = keep, c
            out[tuple(dst)] += w[tuple(src)]
    return out


def depthwise_constant(weight, bias, values) -> np.ndarray:
    """Output of a depthwise conv (``W`` of shape ``(C, 1, k...)``) on channels holding constants
    ``values`` where its window reads no padding: ``v'[c] = b[c] + v[c] * sum_taps W[c, 0]``."""
    w = as_f64(weight)
    return as_f64(bias) + as_f64(values) * w.reshape(w.shape[0], -1).sum(axis=1)
