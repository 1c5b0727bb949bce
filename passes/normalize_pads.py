"""Normalize pads: explicit zero padding in front of a Conv or AveragePool, and SAME auto-padding,
become the window op's own ``pads``.

Spellings.
  * ``Pad(x) -> Conv`` (mode ``constant``, value 0 or absent, pads on the spatial axes only): the
    pads are added to the Conv's ``pads``. Pads come as an attribute (``paddings`` at opset 1,
    ``pads`` up to opset 10) or as a constant input (from opset 11), with an ``axes`` input from
    opset 18. The same before an AveragePool that counts padding (``count_include_pad=1``): the
    zeros the Pad wrote were counted as elements of the window, and so are the pool's own pads.
  * Paddle's spelling of a 4-D pad, ``Unsqueeze(axis u) -> Pad (5-D) -> Squeeze(axis u)``, where
    the Pad leaves axis ``u`` as it is: the same, with axis ``u`` taken out.
  * ``auto_pad = SAME_UPPER / SAME_LOWER`` on a Conv or AveragePool with a static input size ->
    explicit ``pads`` by the operator's formula: per axis the total
    ``max(0, (ceil(L / s) - 1) * s + d * (k - 1) + 1 - L)``, its odd part at the end (UPPER) or the
    beginning (LOWER). Asymmetric pads stay asymmetric.

Zero padding composes: a window op that reads ``Pad(x, p)`` with pads ``q`` reads exactly the
zero-padded ``x`` with pads ``p + q``, and gives the same output size. A Pad read by several
window ops is taken into each of them; it stays when anything else reads it.

Conditions of a Pad (checked in this order):
  1. ``pad_mode``       mode is ``constant`` (reflect / edge copy values, not zeros).
  2. ``pad_value``      the padding value is a constant 0 (or absent).
  3. ``constant_pads``  pads (and axes) are constants, of a length that fits the tensor.
  4. ``non_negative``   no pad is negative (a negative pad crops).
  5. ``spatial_only``   no pad on the batch or channel axis (nor, in the Unsqueeze -> Pad -> Squeeze
                        spelling, on the inserted axis; Unsqueeze and Squeeze name one same axis).
  6. ``explicit_pads``  the window op has ``auto_pad`` NOTSET or VALID (SAME is made explicit first).
  7. ``avgpool_exact``  an AveragePool reading the Pad counts padding (``count_include_pad=1``) or
                        has no pads of its own (it is then made to count padding: the Pad's zeros
                        were elements of its windows), and has ``ceil_mode=0``.
  8. ``pad_readers``    the padded tensor is read only by Conv / AveragePool nodes and is no graph
                        output; the tensors inside the Unsqueeze -> Pad -> Squeeze chain are read
                        only by the chain.
Conditions of SAME auto-padding:
  1. ``static_size``    the input's spatial size is static (the pads depend on it).
  2. ``known_kernel``   the kernel size is known (``kernel_shape`` or the weight's shape).
  3. ``runtime_same_pads``  onnxruntime's pads are the spec's: an AveragePool has no dilation
                        (onnxruntime pads a dilated pool for the undilated kernel; it refuses a
                        dilated SAME Conv, whose pads are the spec's), and per axis
                        ``(ceil(L / s) - 1) * s + d * (k - 1) + 1 - L >= -1`` (a kernel 2 or more
                        smaller than the stride can make onnxruntime's head pad negative: its
                        windows then start inside the input).
  4. ``ceil_mode``      an AveragePool has ``ceil_mode=0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import ops
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, NewNode, Plan, run_checks

from . import register
from ._common import is_op, same_pad_reason
from ._spelling import NotConstant, int_operand, normalize_axes

PAD, SAME = "pad", "same"
WINDOW_OPS = (ops.CONV, ops.AVERAGE_POOL)
SAME_MODES = ("SAME_UPPER", "SAME_LOWER")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _auto_pad(node: gs.Node) -> str:
    return _text(node.attrs.get("auto_pad", "NOTSET"))


@dataclass
class Candidate:
    kind: str
    window: gs.Node  # the Conv or AveragePool rewritten
    chain: list[gs.Node]  # PAD: [Pad] or [Squeeze, Pad, Unsqueeze], from the window op back
    source: gs.Tensor | None = None  # PAD: the tensor the chain pads

    @property
    def pad(self) -> gs.Node:
        return self.chain[0] if len(self.chain) == 1 else self.chain[1]


# --------------------------------------------------------------------------------------------
# match
# --------------------------------------------------------------------------------------------


def _chain(tensor: gs.Tensor, view: GraphView) -> tuple[list[gs.Node], gs.Tensor] | None:
    node = view.producer(tensor)
    if is_op(node, ops.PAD) and node.inputs:
        return [node], view.source(node.inputs[0])
    if is_op(node, ops.SQUEEZE) and node.inputs:
        pad = view.producer(node.inputs[0])
        if is_op(pad, ops.PAD) and pad.inputs:
            unsqueeze = view.producer(pad.inputs[0])
            if is_op(unsqueeze, ops.UNSQUEEZE) and unsqueeze.inputs:
                return [node, pad, unsqueeze], view.source(unsqueeze.inputs[0])
    return None


def _match(node: gs.Node, view: GraphView) -> Candidate | None:
    if not is_op(node, *WINDOW_OPS) or not node.inputs or len(node.outputs) != 1:
        return None
    if _auto_pad(node) in SAME_MODES:
        return Candidate(SAME, node, [])
    found = _chain(node.inputs[0], view)
    if found is None:
        return None
    return Candidate(PAD, node, found[0], found[1])


# --------------------------------------------------------------------------------------------
# the Pad's parameters
# --------------------------------------------------------------------------------------------


def _pads(c: Candidate, view: GraphView, ctx: Context) -> list[int] | str:
    """The Pad's pads over every axis of its input (begins, then ends), or a reason."""
    pad = c.pad
    pads = int_operand(pad, "pads", 1, view)
    if pads is None and "paddings" in pad.attrs:
        pads = [int(v) for v in pad.attrs["paddings"]]
    if isinstance(pads, NotConstant):
        return pads
    if pads is None or len(pads) % 2:
        return f"Pad '{pad.name}' has no pads of even length"
    axes = None if "pads" in pad.attrs or "paddings" in pad.attrs else int_operand(pad, "", 3, view)
    if isinstance(axes, NotConstant):
        return axes
    if axes is None:
        return pads
    shape = ctx.shape(pad.inputs[0])
    rank = len(shape) if shape is not None else None
    norm = normalize_axes(axes, rank)
    if rank is None or norm is None or len(norm) * 2 != len(pads) or len(set(norm)) != len(norm):
        return f"Pad '{pad.name}' axes {axes} do not fit its input of rank {rank if rank is not None else 'unknown'}"
    full = [0] * (2 * rank)
    for i, a in enumerate(norm):
        full[a], full[a + rank] = pads[i], pads[i + len(norm)]
    return full


def _window_pads(c: Candidate, view: GraphView, ctx: Context) -> list[int] | str:
    """The Pad's pads on the window op's input axes (the Paddle chain's inserted axis taken out)."""
    pads = _pads(c, view, ctx)
    if isinstance(pads, str) or len(c.chain) == 1:
        return pads
    squeeze, _, unsqueeze = c.chain
    rank = len(pads) // 2
    uaxes, saxes = int_operand(unsqueeze, "axes", 1, view), int_operand(squeeze, "axes", 1, view)
    for node, axes in ((unsqueeze, uaxes), (squeeze, saxes)):
        if isinstance(axes, NotConstant):
            return axes
        if axes is None or len(axes) != 1:
            return f"{node.op} '{node.name}' does not name one axis"
    u, s = normalize_axes(uaxes, rank), normalize_axes(saxes, rank)
    if u is None or u != s:
        return f"Unsqueeze '{unsqueeze.name}' axes {uaxes} and Squeeze '{squeeze.name}' axes {saxes} differ"
    axis = u[0]
    if pads[axis] or pads[axis + rank]:
        return f"Pad '{c.pad.name}' pads the inserted axis {axis}"
    begins, ends = pads[:rank], pads[rank:]
    return begins[:axis] + begins[axis + 1:] + ends[:axis] + ends[axis + 1:]


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------


def _pad_only(fn):
    def check(c: Candidate, view: GraphView, ctx: Context):
        return fn(c, view, ctx) if c.kind == PAD else None

    return check


def _same_only(fn):
    def check(c: Candidate, view: GraphView, ctx: Context):
        return fn(c, view, ctx) if c.kind == SAME else None

    return check


@_pad_only
def _check_mode(c, view, ctx):
    mode = _text(c.pad.attrs.get("mode", "constant"))
    if mode != "constant":
        return f"Pad '{c.pad.name}' has mode={mode}"
    return None


@_pad_only
def _check_value(c, view, ctx):
    pad = c.pad
    if "value" in pad.attrs:
        value = np.asarray(pad.attrs["value"])
    elif len(pad.inputs) > 2 and pad.inputs[2] is not None and pad.inputs[2].name:
        value = view.constant(pad.inputs[2])
        if value is None:
            return f"Pad '{pad.name}' value '{pad.inputs[2].name}' is not a constant"
    else:
        return None
    if np.any(np.asarray(value, dtype=np.float64) != 0):
        return f"Pad '{pad.name}' pads with {np.ravel(value)[:1].tolist()[0]}, not 0"
    return None


@_pad_only
def _check_pads(c, view, ctx):
    pads = _pads(c, view, ctx)
    if isinstance(pads, str):
        return pads
    shape = ctx.shape(c.pad.inputs[0])
    if shape is not None and len(shape) * 2 != len(pads):
        return f"Pad '{c.pad.name}' has {len(pads)} pads for an input of rank {len(shape)}"
    return None


@_pad_only
def _check_negative(c, view, ctx):
    pads = _pads(c, view, ctx)
    if any(p < 0 for p in pads):
        return f"Pad '{c.pad.name}' has negative pads {pads} (it crops)"
    return None


@_pad_only
def _check_spatial(c, view, ctx):
    pads = _window_pads(c, view, ctx)
    if isinstance(pads, str):
        return pads
    rank = len(pads) // 2
    if rank < 3 or any(pads[a] or pads[a + rank] for a in (0, 1)):
        return f"Pad '{c.pad.name}' pads {pads} touch the batch or channel axis"
    return None


@_pad_only
def _check_auto_pad(c, view, ctx):
    mode = _auto_pad(c.window)
    if mode not in ("NOTSET", "VALID"):
        return f"{c.window.op} '{c.window.name}' has auto_pad={mode}"
    return None


def _check_pool(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    w = c.window
    if not is_op(w, ops.AVERAGE_POOL):
        return None
    if int(w.attrs.get("ceil_mode", 0)) != 0:
        return f"AveragePool '{w.name}' has ceil_mode=1"
    if c.kind == PAD and int(w.attrs.get("count_include_pad", 0)) != 1 and any(int(p) for p in w.attrs.get("pads", [])):
        return f"AveragePool '{w.name}' does not count padding (count_include_pad=0) and pads itself"
    return None


@_pad_only
def _check_readers(c, view, ctx):
    out = c.chain[0].outputs[0]
    if view.escapes(out):
        return f"tensor '{out.name}' is a graph output"
    for user in view.users(out):
        if not is_op(user, *WINDOW_OPS) or any((view.source(t) is out) != (i == 0) for i, t in enumerate(user.inputs) if t is not None):
            return f"tensor '{out.name}' is also read by '{user.name}' ({user.op})"
    for outer, inner in zip(c.chain, c.chain[1:]):
        t = inner.outputs[0]
        users = view.users(t)
        if view.escapes(t) or any(u is not outer for u in users):
            return f"tensor '{t.name}' is read outside the Unsqueeze -> Pad -> Squeeze chain"
    return None


def _spatial_size(c: Candidate, ctx: Context) -> tuple | None:
    shape = ctx.shape(c.window.inputs[0])
    if shape is None or len(shape) < 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape[2:]):
        return None
    return tuple(int(d) for d in shape[2:])


def _kernel(c: Candidate, view: GraphView, ctx: Context) -> tuple | None:
    w = c.window
    if "kernel_shape" in w.attrs:
        return tuple(int(k) for k in w.attrs["kernel_shape"])
    if is_op(w, ops.CONV) and len(w.inputs) > 1:
        shape = ctx.shape(w.inputs[1])
        if shape is None and view.is_constant(w.inputs[1]):
            shape = view.constant(w.inputs[1]).shape
        if shape is not None and len(shape) > 2 and all(isinstance(d, (int, np.integer)) for d in shape[2:]):
            return tuple(int(d) for d in shape[2:])
    return None


@_same_only
def _check_size(c, view, ctx):
    if _spatial_size(c, ctx) is None:
        shape = ctx.shape(c.window.inputs[0])
        return (
            f"{c.window.op} '{c.window.name}' uses auto_pad={_auto_pad(c.window)} and its input size "
            f"{list(shape) if shape is not None else 'unknown'} is not static"
        )
    return None


@_same_only
def _check_kernel(c, view, ctx):
    kernel = _kernel(c, view, ctx)
    size = _spatial_size(c, ctx)
    if kernel is None or len(kernel) != len(size):
        return f"{c.window.op} '{c.window.name}' kernel size is not known"
    return None


@_same_only
def _check_runtime_pads(c, view, ctx):
    size = _spatial_size(c, ctx)
    rank = len(size)
    w = c.window
    strides = [int(s) for s in w.attrs.get("strides", [1] * rank)]
    dilations = [int(d) for d in w.attrs.get("dilations", [1] * rank)]
    if len(strides) != rank or len(dilations) != rank:
        return f"{w.op} '{w.name}' has strides or dilations of the wrong length"
    return same_pad_reason(w, size, _kernel(c, view, ctx), strides, dilations, _auto_pad(w))


CONDITIONS = [
    ("pad_mode", _check_mode),
    ("pad_value", _check_value),
    ("constant_pads", _check_pads),
    ("non_negative", _check_negative),
    ("spatial_only", _check_spatial),
    ("explicit_pads", _check_auto_pad),
    ("static_size", _check_size),
    ("known_kernel", _check_kernel),
    ("runtime_same_pads", _check_runtime_pads),
    ("avgpool_exact", lambda c, view, ctx: _check_pool(c, view, ctx) if c.kind == PAD else None),
    ("ceil_mode", lambda c, view, ctx: _check_pool(c, view, ctx) if c.kind == SAME else None),
    ("pad_readers", _check_readers),
]


# --------------------------------------------------------------------------------------------
# the pass
# --------------------------------------------------------------------------------------------


def same_pads(size, kernel, strides, dilations, mode: str) -> list[int]:
    """Explicit pads (begins, then ends) of ``auto_pad = mode`` for a static spatial ``size``."""
    rank = len(size)
    pads = [0] * (2 * rank)
    for i, (n, k, s, d) in enumerate(zip(size, kernel, strides, dilations)):
        total = max(0, (ceil(n / s) - 1) * s + d * (k - 1) + 1 - n)
        small, big = total // 2, total - total // 2
        pads[i], pads[i + rank] = (small, big) if mode == "SAME_UPPER" else (big, small)
    return pads


def _attrs(node: gs.Node, pads: list[int]) -> dict:
    attrs = {k: v for k, v in node.attrs.items() if k != "auto_pad"}
    attrs["pads"] = [int(p) for p in pads]
    return attrs


@register
class NormalizePads:
    name = "normalize-pads"
    summary = "zero Pad before a Conv / AveragePool, and SAME auto-padding -> the op's own pads"

    def match(self, view: GraphView, ctx: Context):
        for node in view.graph.nodes:
            cand = _match(node, view)
            if cand is not None:
                yield Match(cand.window.outputs[0].name, [cand.window], cand)

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return run_checks(CONDITIONS, match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> Plan:
        c: Candidate = match.data
        w = c.window
        rank = None
        if c.kind == SAME:
            size = _spatial_size(c, ctx)
            rank = len(size)
            strides = [int(s) for s in w.attrs.get("strides", [1] * rank)]
            dilations = [int(d) for d in w.attrs.get("dilations", [1] * rank)]
            pads = same_pads(size, _kernel(c, view, ctx), strides, dilations, _auto_pad(w))
            inputs = list(w.inputs)
            summary = f"{w.op} auto_pad={_auto_pad(w)} -> pads {pads}"
        else:
            outer = _window_pads(c, view, ctx)
            full = len(outer) // 2
            rank = full - 2
            own = [0] * (2 * rank) if _auto_pad(w) == "VALID" else [int(p) for p in w.attrs.get("pads", [0] * (2 * rank))]
            add = outer[2:full] + outer[full + 2:]
            pads = [a + b for a, b in zip(own, add)]
            inputs = [c.source, *w.inputs[1:]]
            spelling = "Pad" if len(c.chain) == 1 else "Unsqueeze -> Pad -> Squeeze"
            summary = f"{spelling} {add} taken into {w.op} pads -> {pads}"
        attrs = _attrs(w, pads)
        if c.kind == PAD and is_op(w, ops.AVERAGE_POOL):
            attrs["count_include_pad"] = 1
        node = NewNode(w.op, ctx.fresh_name(w.name or w.op), attrs, inputs, [w.outputs[0]])
        return Plan(w.outputs[0], [node], summary)
