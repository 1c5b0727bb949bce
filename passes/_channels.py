"""Channel flow: where the output channels of one layer go, for the pruning passes.

A *source* is a Conv with ``group = 1`` or a linear layer (Gemm, MatMul by a constant, with its bias
Add) whose weights are constants. Its output channels are followed forward through *steps*, nodes
that act on every channel separately:

* per-channel affine nodes (inference BatchNormalization, Mul/Div/Add/Sub by a scalar or
  per-channel constant) and PRelu with a per-channel slope;
* element-wise activations (``ops.UNARY_ACTIVATIONS``, float-to-float Cast included);
* Add/Sub/Mul/Div/Max/Min of two tensors that carry the same channels at the same positions
  (``x * sigmoid(x)``, a residual inside the followed region);
* depthwise convs (``group = Cin = Cout``): the channel dies on both sides;
* pooling (MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool), Flatten and Reshape to
  ``(N, C)`` of a ``(N, C, 1, ...)`` tensor;
* Concat on the channel axis (the channels move by the widths of the inputs before them);

until every path ends in a *consumer* that mixes channels with constant weights: a Conv with
``group = 1`` or a linear layer over the channel axis. Anything else stops the flow: a graph output
or a subgraph reading a tensor on the way, an Add of the channels with a tensor that does not carry
them (a residual from outside), Split, Transpose, grouped convs, ops not listed. The passes then
drop channels at the source, slice the per-channel constants of every step, and fix up the
consumers; the consumers' outputs keep their names and shapes.

A :class:`Flow` records where source channel ``c`` sits in one tensor: ``index[c]`` along
``axis``, out of ``width`` channels (a Concat's output holds other channels too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from math import prod
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import algebra, ops
from onnxrep.algebra import as_f64
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, NewNode, Plan

from . import _linear
from ._common import (
    affine_data_input,
    conv_constants_reason,
    conv_geometry,
    conv_groups,
    conv_params,
    graph_opset,
    has_padding,
    is_op,
    legacy_operand,
    node_affine,
    per_channel,
    window_geometry,
)

CONV_AXIS = 1


@dataclass
class Flow:
    tensor: gs.Tensor
    index: np.ndarray  # position of every source channel along ``axis``
    width: int
    rank: int
    axis: int

    def positions(self, channels: np.ndarray) -> np.ndarray:
        return self.index[channels]

    def kept_positions(self, dropped: np.ndarray) -> np.ndarray:
        """Positions left along the axis once the source channels ``dropped`` (a mask) are gone."""
        keep = np.ones(self.width, dtype=bool)
        keep[self.index[dropped]] = False
        return np.flatnonzero(keep)


# --------------------------------------------------------------------------------------------
# Constants of one value per channel
# --------------------------------------------------------------------------------------------


def _slice_along(values: np.ndarray, flow: Flow, keep: np.ndarray) -> np.ndarray:
    """A constant broadcast against ``flow``'s tensor, with the channel positions not in ``keep``
    removed where it has one value per channel (a scalar or a size-1 channel dim stays)."""
    v = np.asarray(values)
    lead = flow.rank - v.ndim
    ax = flow.axis - lead
    if ax < 0 or v.shape[ax] != flow.width:
        return v
    return np.take(v, keep, axis=ax)


def _slice_operand(node: gs.Node, values: np.ndarray, const_first: bool, flow: Flow, keep: np.ndarray,
                   view: GraphView) -> np.ndarray:
    """The constant operand of a Mul/Add/Sub/Div with the channel positions not in ``keep``
    removed, in its own layout. From opset 7 numpy's broadcasting places it (``_slice_along``);
    below, legacy broadcasting (``broadcast=1`` and ``axis``): it is placed by
    :func:`legacy_operand`, sliced there and written back in its own shape, the node keeping its
    attributes. A constant legacy broadcasting does not place was declined (``per_channel``)."""
    v = np.asarray(values)
    placed = legacy_operand(node, v, const_first, flow.rank, graph_opset(view))
    assert not isinstance(placed, str), placed  # checked by ``_legacy_reason``
    if placed is v or placed.ndim == v.ndim:
        return _slice_along(v, flow, keep)
    start = int(node.attrs["axis"]) if "axis" in node.attrs else flow.rank - v.ndim
    start = start + flow.rank if start < 0 else start
    sliced = _slice_along(placed, flow, keep)
    return sliced.reshape(sliced.shape[start:start + v.ndim])


def _legacy_reason(node: gs.Node, flow: Flow, view: GraphView) -> str | None:
    """Why the constant of a Mul/Add/Sub/Div is not placed by legacy broadcasting below opset 7
    (:func:`legacy_operand`), or None."""
    const_first = view.is_constant(node.inputs[0])
    values = view.constant(node.inputs[0] if const_first else node.inputs[1])
    placed = legacy_operand(node, np.asarray(values), const_first, flow.rank, graph_opset(view))
    return placed if isinstance(placed, str) else None


def _channel_values(values: np.ndarray, flow: Flow) -> np.ndarray | None:
    """``values`` as a float64 vector over ``flow``'s positions, or None if not per channel."""
    return per_channel(values, flow.width, flow.rank, flow.axis)


# --------------------------------------------------------------------------------------------
# Element-wise functions, for the constant a dead channel carries
# --------------------------------------------------------------------------------------------

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _softplus(v):
    return np.logaddexp(0.0, v)


def _unary_function(node: gs.Node, view: GraphView, ctx: Context) -> Callable[[np.ndarray], np.ndarray] | str:
    """The float64 function an activation applies element-wise, or why it is not followed."""
    a = node.attrs
    op = node.op
    if op == ops.CAST:
        to = ctx.dtype(node.outputs[0])
        src = ctx.dtype(node.inputs[0])
        if to is None or src is None or to.kind != "f" or src.kind != "f":
            return f"Cast '{node.name}' does not cast between float types"
        return lambda v: as_f64(np.asarray(v).astype(to))
    if op == ops.CLIP:
        bounds = [a.get("min", -np.inf), a.get("max", np.inf)]
        for i in (1, 2):
            if len(node.inputs) > i and node.inputs[i].name:
                c = view.constant(node.inputs[i])
                if c is None or c.size != 1:
                    return f"Clip '{node.name}' bound '{node.inputs[i].name}' is not a constant scalar"
                bounds[i - 1] = float(c.reshape(()))
        lo, hi = bounds
        return lambda v: np.clip(v, lo, hi)
    table = {
        "Relu": lambda v: np.maximum(v, 0.0),
        "LeakyRelu": lambda v: np.where(v >= 0, v, float(a.get("alpha", 0.01)) * v),
        "Sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)),
        "Tanh": np.tanh,
        "Elu": lambda v: np.where(v >= 0, v, float(a.get("alpha", 1.0)) * np.expm1(v)),
        "Celu": lambda v: np.maximum(v, 0.0) + np.minimum(0.0, float(a.get("alpha", 1.0)) * np.expm1(v / float(a.get("alpha", 1.0)))),
        "Selu": lambda v: float(a.get("gamma", 1.05070102214813232421875))
        * np.where(v > 0, v, float(a.get("alpha", 1.67326319217681884765625)) * np.expm1(v)),
        "Softplus": _softplus,
        "Softsign": lambda v: v / (1.0 + np.abs(v)),
        "HardSigmoid": lambda v: np.clip(float(a.get("alpha", 0.2)) * v + float(a.get("beta", 0.5)), 0.0, 1.0),
        "HardSwish": lambda v: v * np.clip(v / 6.0 + 0.5, 0.0, 1.0),
        "Erf": _erf,
        "Neg": np.negative,
        "Abs": np.abs,
        "Exp": np.exp,
        "Mish": lambda v: v * np.tanh(_softplus(v)),
        "Gelu": (
            (lambda v: 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3))))
            if a.get("approximate", "none") in ("tanh", b"tanh")
            else (lambda v: 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0))))
        ),
    }
    return table[op]


_BINARY = {
    ops.ADD: np.add,
    ops.SUB: np.subtract,
    ops.MUL: np.multiply,
    ops.DIV: np.divide,
    ops.MAX: np.maximum,
    ops.MIN: np.minimum,
}


# --------------------------------------------------------------------------------------------
# Steps: nodes the channels pass through
# --------------------------------------------------------------------------------------------


@dataclass
class Step:
    """A node the channels pass through; ``inputs`` are the flows it reads, ``out`` its own."""

    node: gs.Node
    inputs: list[Flow]
    out: Flow

    def constant(self, values: list[np.ndarray], known: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The constant each source channel holds in the output, given those of the inputs, and
        whether it still is one value over the whole tensor."""
        return values[0], known[0]

    def params(self) -> np.ndarray | None:
        """Per-position parameters ``(width, p)`` that two channels must share to stay equal."""
        return None

    def emit(self, ctx: Context, new_in: list[gs.Tensor], out: gs.Tensor, keep: np.ndarray) -> NewNode:
        """The node reading ``new_in`` (the pruned flows), with its channel constants sliced to the
        positions ``keep`` of its output."""
        return NewNode(self.node.op, ctx.fresh_name(self.node.name or self.node.op), self._attrs(keep),
                       self._inputs(ctx, new_in, keep), [out])

    def _inputs(self, ctx: Context, new_in: list[gs.Tensor], keep: np.ndarray) -> list[gs.Tensor]:
        return [new_in[0]] + list(self.node.inputs[1:])

    def _attrs(self, keep: np.ndarray) -> dict:
        return dict(self.node.attrs)


@dataclass
class AffineStep(Step):
    """BatchNormalization, or Mul/Div/Add/Sub by a constant: ``y = s[p] x + t[p]``."""

    affine: algebra.Affine = None
    view: GraphView = None

    def constant(self, values, known):
        pos = self.inputs[0].index
        return self.affine.scale[pos] * values[0] + self.affine.shift[pos], known[0]

    def params(self):
        return np.stack([self.affine.scale, self.affine.shift], axis=1)

    def _inputs(self, ctx, new_in, keep):
        node, flow = self.node, self.inputs[0]
        bn = is_op(node, ops.BATCH_NORM)
        inputs = []
        for i, t in enumerate(node.inputs[:5] if bn else node.inputs):
            value = self.view.constant(t) if t is not None and t.name else None
            if t is not None and t.name and self.view.source(t) is flow.tensor:
                inputs.append(new_in[0])
            elif value is not None:
                # BN parameters are vectors of C; a Mul/Add constant broadcasts against the data
                # (legacy broadcasting below opset 7)
                sliced = (
                    (value[keep] if value.size == flow.width else value)
                    if bn
                    else _slice_operand(node, value, i == 0, flow, keep, self.view)
                )
                inputs.append(ctx.constant(t.name, np.asarray(sliced)))
            else:
                inputs.append(t)
        return inputs


@dataclass
class PReluStep(Step):
    slope: np.ndarray = None  # per position
    raw: np.ndarray = None

    def constant(self, values, known):
        s = self.slope[self.inputs[0].index]
        return np.where(values[0] >= 0, values[0], s * values[0]), known[0]

    def params(self):
        return self.slope[:, None]

    def _inputs(self, ctx, new_in, keep):
        return [new_in[0], ctx.constant(self.node.inputs[1].name, _slice_along(self.raw, self.inputs[0], keep))]


@dataclass
class UnaryStep(Step):
    fn: Callable = None

    def constant(self, values, known):
        with np.errstate(all="ignore"):
            return self.fn(values[0]), known[0]


@dataclass
class BinaryStep(Step):
    fn: Callable = None

    def constant(self, values, known):
        with np.errstate(all="ignore"):
            return self.fn(values[0], values[1]), known[0] & known[1]

    def _inputs(self, ctx, new_in, keep):
        return list(new_in)


@dataclass
class DepthwiseStep(Step):
    weight: np.ndarray = None  # float64 (C, 1, k...)
    bias: np.ndarray = None
    padded: bool = False
    view: GraphView = None

    def constant(self, values, known):
        pos = self.inputs[0].index
        out = algebra.depthwise_constant(self.weight[pos], self.bias[pos], values[0])
        # a padded window sees zeros at the border where the constant stood: still one value only if it is 0
        return out, known[0] & ((values[0] == 0) if self.padded else True)

    def params(self):
        return np.concatenate([self.weight.reshape(self.weight.shape[0], -1), self.bias[:, None]], axis=1)

    def _inputs(self, ctx, new_in, keep):
        node = self.node
        raw = self.view.constant(node.inputs[1])
        inputs = [new_in[0], ctx.constant(node.inputs[1].name, np.asarray(raw)[keep])]
        if len(node.inputs) > 2 and node.inputs[2].name:
            inputs.append(ctx.constant(node.inputs[2].name, self.bias[keep].astype(raw.dtype)))
        return inputs

    def _attrs(self, keep):
        return dict(self.node.attrs) | {"group": int(len(keep))}


@dataclass
class PoolStep(Step):
    zero_only: bool = False  # the window averages in padding: a constant stays one only if 0

    def constant(self, values, known):
        return values[0], known[0] & ((values[0] == 0) if self.zero_only else True)


@dataclass
class ReshapeStep(Step):
    """Reshape of ``(N, C, 1, ...)`` to ``(N, C)`` by a constant shape."""

    shape: np.ndarray = None

    def _inputs(self, ctx, new_in, keep):
        shape = self.shape.copy()
        if shape[1] > 0:
            shape[1] = len(keep)
        return [new_in[0], ctx.constant(self.node.inputs[1].name, shape.astype(np.int64))]


@dataclass
class ConcatStep(Step):
    slot: int = 0  # which input carries the channels

    def _inputs(self, ctx, new_in, keep):
        inputs = list(self.node.inputs)
        inputs[self.slot] = new_in[0]
        return inputs


# --------------------------------------------------------------------------------------------
# Sources and consumers: layers that mix channels with constant weights
# --------------------------------------------------------------------------------------------


def _rows(weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``(Cout, -1)``: each output channel's weights (output channels first in ``weight``), bias last."""
    return np.concatenate([weight.reshape(weight.shape[0], -1), bias[:, None]], axis=1)


@dataclass
class Layer:
    """A Conv (``group = 1``) or linear layer, its weight as ``(Cout, Cin, k...)`` / ``(K, N)``."""

    node: gs.Node
    linear: _linear.Linear | None
    weight: np.ndarray  # float64
    bias: np.ndarray  # float64
    dtype: np.dtype

    @property
    def out(self) -> gs.Tensor:
        return self.linear.out if self.linear else self.node.outputs[0]

    @property
    def nodes(self) -> list[gs.Node]:
        return list(self.linear.nodes) if self.linear else [self.node]

    @property
    def out_axis(self) -> int:
        """Axis of ``weight`` that indexes output channels."""
        return 1 if self.linear else 0

    @property
    def in_axis(self) -> int:
        return 0 if self.linear else 1

    @cached_property
    def out_rows(self) -> np.ndarray:
        """The weights of every output channel, one row each ``(Cout, -1)``, and its bias last."""
        return _rows(self.weight.T if self.linear else self.weight, self.bias)


    def emit(self, ctx: Context, x: gs.Tensor, weight: np.ndarray, bias: np.ndarray, target: gs.Tensor,
             rank: int | None) -> list[NewNode]:
        name = self.node.name or self.node.op
        if self.linear and self.linear.is_gemm and rank == 2 and int(self.node.attrs.get("transB", 0)):
            # keep the layout of a Gemm that stores its weight as (N, K)
            wc = ctx.constant(f"{name}.weight", np.ascontiguousarray(weight.T).astype(self.dtype))
            bc = ctx.constant(f"{name}.bias", bias.astype(self.dtype))
            return [NewNode(ops.GEMM, ctx.fresh_name(name), {"transB": 1}, [x, wc, bc], [target])]
        if self.linear:
            return _linear.emit(ctx, name, x, weight, bias, self.dtype, target, rank)
        attrs = dict(self.node.attrs)
        attrs["kernel_shape"] = list(weight.shape[2:])
        w = ctx.constant(f"{name}.weight", weight.astype(self.dtype))
        inputs = [x, w]
        has_bias = len(self.node.inputs) > 2 and self.node.inputs[2].name
        if has_bias or np.any(bias):
            inputs.append(ctx.constant(f"{name}.bias", bias.astype(self.dtype)))
        return [NewNode(ops.CONV, ctx.fresh_name(name), attrs, inputs, [target])]

    def macs(self, out_shape, weight_shape) -> int:
        return _macs(out_shape, weight_shape, channel_last=self.linear is not None)


def _macs(out_shape, weight_shape, channel_last: bool) -> int:
    """Multiply-accumulates of a conv or linear layer (symbolic dims counted as 1): output positions
    (every dim but the channel axis) times the weight's size."""
    if out_shape is None:
        return 0
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in out_shape]
    positions = prod(dims[:-1]) if channel_last else prod(dims[:1] + dims[2:])
    return int(positions * algebra.conv_macs_per_position(weight_shape))


def as_layer(node: gs.Node, view: GraphView, ctx: Context) -> Layer | str | None:
    """``node`` as a :class:`Layer`; a reason string when it is a Conv/linear layer that cannot be
    read as one (non-constant or grouped weights); None when it is neither."""
    if is_op(node, ops.CONV):
        if len(node.inputs) < 2:
            return None
        reason = conv_constants_reason(node, view)
        if reason:
            return reason
        if conv_groups(node) != 1:
            return f"Conv '{node.name}' has group={conv_groups(node)}"
        w, b = conv_params(node, view)
        return Layer(node, None, w, b, view.constant(node.inputs[1]).dtype)
    lin = _linear.as_linear(node, view)
    if lin is None:
        return None
    reason = _linear.layout_reason(lin, view, ctx)
    if reason:
        return reason
    w, b = _linear.params(lin, view)
    return Layer(node, lin, w, b, view.constant(node.inputs[1]).dtype)


@dataclass
class Consumer:
    layer: Layer
    flow: Flow
    padded: bool  # a conv whose window reads zero padding


@dataclass
class Region:
    source: Layer
    channels: int
    steps: list[Step] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    flows: dict[int, Flow] = field(default_factory=dict)  # id(tensor) -> flow

    @property
    def nodes(self) -> list[gs.Node]:
        out = self.source.nodes + [s.node for s in self.steps]
        for c in self.consumers:
            out.extend(c.layer.nodes)
        return out

    def flow_of(self, tensor: gs.Tensor, view: GraphView) -> Flow | None:
        return self.flows.get(id(view.source(tensor)))

    # ---- the constants dead channels hold --------------------------------------------------

    def constants(self, values: np.ndarray, known: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Push the source's per-channel constants through every step: id(tensor) -> (values, known).

        A constant is followed in float64; one that is not finite, or beyond half the largest
        value of the source's type (where the model's own arithmetic could overflow or saturate
        differently), is no longer known: its channel stays."""
        limit = _largest(self.source.dtype) / 2

        def bounded(v, k):
            with np.errstate(invalid="ignore"):
                return k & np.isfinite(v) & (np.abs(v) <= limit)

        out = {id(self.source.out): (values, bounded(values, known))}
        for step in self.steps:
            ins = [out[id(f.tensor)] for f in step.inputs]
            v, k = step.constant([v for v, _ in ins], [k for _, k in ins])
            out[id(step.out.tensor)] = (v, bounded(v, k))
        return out

    # ---- channels that stay equal --------------------------------------------------------

    def split_by_params(self, labels: np.ndarray, tolerance: float) -> np.ndarray:
        """Refine a labelling of source channels so that two channels share a label only if every
        step gives them the same per-channel parameters."""
        for step in self.steps:
            params = step.params()
            if params is None:
                continue
            pos = step.inputs[0].index
            labels = refine(labels, params[pos], tolerance)
        return labels


def _largest(dtype) -> float:
    try:
        return float(np.finfo(dtype).max)
    except (TypeError, ValueError):
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).max)


def refine(labels: np.ndarray, rows: np.ndarray, tolerance: float) -> np.ndarray:
    """New labels: channels share one when they shared one in ``labels`` and their ``rows`` are
    equal (exactly, or within ``tolerance`` max abs difference to the group's first channel).
    A label is the index of the first channel that has it."""
    rows = np.asarray(rows, dtype=np.float64) + 0.0  # -0.0 == 0.0
    new = np.arange(len(labels), dtype=np.int64)
    if tolerance <= 0:
        first: dict[tuple, int] = {}
        for c in range(len(labels)):
            new[c] = first.setdefault((int(labels[c]), rows[c].tobytes()), c)
        return new
    reps: dict[int, list[int]] = {}
    for c in range(len(labels)):
        group = reps.setdefault(int(labels[c]), [])
        for r in group:
            if rows.shape[1] == 0 or np.max(np.abs(rows[c] - rows[r])) <= tolerance:
                new[c] = r
                break
        else:
            group.append(c)
    return new


# --------------------------------------------------------------------------------------------
# Following the channels
# --------------------------------------------------------------------------------------------


def follow(source: Layer, view: GraphView, ctx: Context) -> Region | Decline:
    """The region the source's channels flow through, or the named reason they cannot be followed."""
    out = view.source(source.out)
    channels = source.weight.shape[source.out_axis]
    shape = ctx.shape(out)
    if shape is None:
        return Decline("static_shapes", f"the rank of '{out.name}' is unknown")
    rank = len(shape)
    axis = rank - 1 if source.linear else CONV_AXIS
    region = Region(source, channels)
    region.flows[id(out)] = Flow(out, np.arange(channels), channels, rank, axis)
    order = {id(n): i for i, n in enumerate(view.graph.nodes)}
    pending = {id(out)}
    seen: set[int] = {id(n) for n in source.nodes}
    queue: list[gs.Node] = []
    while pending:
        t = region.flows[pending.pop()].tensor
        if view.escapes(t):
            return Decline("graph_output", f"the channels reach the graph output (or a subgraph) '{t.name}'")
        for user in view.users(t):
            if id(user) not in seen:
                seen.add(id(user))
                queue.append(user)
        # steps whose inputs are all known are resolved in graph order, so a binary step sees both sides
        queue.sort(key=lambda n: order.get(id(n), 0))
        progressed = True
        while progressed:
            progressed = False
            for node in list(queue):
                flows = [region.flow_of(i, view) for i in node.inputs if i is not None and i.name]
                if _waits(node, flows, region, view):
                    continue
                queue.remove(node)
                progressed = True
                result = _classify(node, region, view, ctx)
                if isinstance(result, Decline):
                    return result
                if isinstance(result, Step):
                    region.steps.append(result)
                    region.flows[id(result.out.tensor)] = result.out
                    pending.add(id(result.out.tensor))
                else:
                    region.consumers.append(result)
    if queue:
        node = queue[0]
        return Decline("outside_operand", f"{node.op} '{node.name}' combines the channels with a tensor that does not carry them")
    if not region.consumers:
        return Decline("consumers", "the channels reach no layer that could absorb the change")
    return region


def _waits(node: gs.Node, flows: list, region: Region, view: GraphView) -> bool:
    """A node another of whose inputs is computed from the source's output but not followed yet
    (the other side of a fork: ``x * sigmoid(x)``, a Concat of two paths). It is classified once
    every such input is followed; one that never is (it passes through a consumer) leaves the
    node waiting, and the candidate is declined."""
    pending = [t for t, f in zip([i for i in node.inputs if i is not None and i.name], flows)
               if f is None and not view.is_constant(t)]
    return bool(pending) and _downstream_of_source(pending, region, view)


def _downstream_of_source(tensors: list[gs.Tensor], region: Region, view: GraphView) -> bool:
    """True when one of ``tensors`` is computed from the source's output."""
    src = id(view.source(region.source.out))
    stack, seen = list(tensors), set()
    while stack:
        t = view.source(stack.pop())
        if id(t) == src or id(t) in region.flows:
            return True
        if id(t) in seen:
            continue
        seen.add(id(t))
        producer = view.producer(t)
        if producer is not None:
            stack.extend(i for i in producer.inputs if i is not None and i.name)
    return False


def _data_flow(node: gs.Node, region: Region, view: GraphView) -> tuple[int, Flow] | None:
    for i, t in enumerate(node.inputs):
        if t is not None and t.name:
            flow = region.flow_of(t, view)
            if flow is not None:
                return i, flow
    return None


def _new_flow(node: gs.Node, flow: Flow, **changes) -> Flow:
    fields = dict(tensor=node.outputs[0], index=flow.index, width=flow.width, rank=flow.rank, axis=flow.axis)
    fields.update(changes)
    return Flow(**fields)


def _extra_outputs_reason(node: gs.Node, view: GraphView) -> str | None:
    for extra in node.outputs[1:]:
        if extra.name and (view.users(extra) or view.escapes(extra)):
            return f"{node.op} '{node.name}' has a second output in use"
    return None


def _classify(node: gs.Node, region: Region, view: GraphView, ctx: Context) -> Step | Consumer | Decline:
    slot, flow = _data_flow(node, region, view)
    reason = _extra_outputs_reason(node, view)
    if reason:
        return Decline("followed", reason)
    conv_like = flow.axis == CONV_AXIS and flow.rank >= 3
    if is_op(node, ops.CONV) and slot == 0 and conv_like:
        return _conv_user(node, flow, region, view, ctx)
    if is_op(node, ops.GEMM, ops.MATMUL) and slot == 0:
        layer = as_layer(node, view, ctx)
        if isinstance(layer, Layer) and flow.axis == flow.rank - 1:
            return Consumer(layer, flow, False)
        why = layer if isinstance(layer, str) else f"{node.op} '{node.name}' does not contract the channel axis"
        return Decline("consumers", why)
    if is_op(node, ops.BATCH_NORM) or (is_op(node, *ops.AFFINE_BINARY_OPS) and affine_data_input(node, view) is not None):
        if is_op(node, ops.BATCH_NORM) and (slot != 0 or flow.axis != CONV_AXIS):
            return Decline("followed", f"BatchNormalization '{node.name}' does not normalize the channel axis")
        affine = node_affine(node, view, flow.width, flow.rank, flow.axis)
        if isinstance(affine, str):
            return Decline("per_channel", affine)
        if not is_op(node, ops.BATCH_NORM):
            reason = _legacy_reason(node, flow, view) or _broadcast_reason(node, flow, view, ctx)
            if reason:
                return Decline("per_channel", reason)
        return AffineStep(node, [flow], _new_flow(node, flow), affine=affine, view=view)
    if is_op(node, ops.PRELU) and slot == 0 and len(node.inputs) == 2 and view.is_constant(node.inputs[1]):
        raw = view.constant(node.inputs[1])
        slope = _channel_values(raw, flow)
        if slope is None:
            return Decline("per_channel", f"PRelu '{node.name}' slope is not per channel")
        return PReluStep(node, [flow], _new_flow(node, flow), slope=slope, raw=raw)
    if is_op(node, *ops.UNARY_ACTIVATIONS) and slot == 0:
        fn = _unary_function(node, view, ctx)
        if isinstance(fn, str):
            return Decline("followed", fn)
        return UnaryStep(node, [flow], _new_flow(node, flow), fn=fn)
    if is_op(node, *_BINARY) and len(node.inputs) == 2:
        other = region.flow_of(node.inputs[1 - slot], view)
        if other is None:
            return Decline(
                "outside_operand",
                f"{node.op} '{node.name}' combines the channels with '{node.inputs[1 - slot].name}', which does not carry them (a residual)",
            )
        if other.width != flow.width or other.rank != flow.rank or not np.array_equal(other.index, flow.index):
            return Decline("followed", f"{node.op} '{node.name}' combines the channels at different positions")
        shape = ctx.shape(node.outputs[0])
        if shape is None or len(shape) != flow.rank:
            return Decline("static_shapes", f"the rank of '{node.outputs[0].name}' is unknown")
        a, b = (region.flow_of(t, view) for t in node.inputs)
        return BinaryStep(node, [a, b], _new_flow(node, flow), fn=_BINARY[node.op])
    if is_op(node, ops.MAX_POOL, ops.AVERAGE_POOL, ops.GLOBAL_AVERAGE_POOL, ops.GLOBAL_MAX_POOL) and conv_like:
        return _pool_step(node, flow, view, ctx)
    if is_op(node, ops.FLATTEN, ops.RESHAPE) and slot == 0:
        return _flatten_step(node, flow, view, ctx)
    if is_op(node, ops.CONCAT):
        return _concat_step(node, slot, flow, region, view, ctx)
    return Decline("followed", f"{node.op} '{node.name}' reads the channels and is not followed")


def _broadcast_reason(node: gs.Node, flow: Flow, view: GraphView, ctx: Context) -> str | None:
    """A per-channel constant must not broadcast the data up to a bigger shape."""
    const = view.constant(node.inputs[0] if view.is_constant(node.inputs[0]) else node.inputs[1])
    if np.ndim(const) > flow.rank:
        return f"{node.op} '{node.name}' constant has a higher rank than the data"
    return None


def _conv_user(node: gs.Node, flow: Flow, region: Region, view: GraphView, ctx: Context) -> Step | Consumer | Decline:
    reason = conv_constants_reason(node, view)
    if reason:
        return Decline("constant_weights", reason)
    geo = conv_geometry(node, view, ctx.shape(flow.tensor))
    if isinstance(geo, str):
        return Decline("static_shapes", geo)
    groups = conv_groups(node)
    w = view.constant(node.inputs[1])
    if groups == 1:
        return Consumer(as_layer(node, view, ctx), flow, has_padding(geo))
    if groups == flow.width and w.shape[0] == flow.width and w.shape[1] == 1:
        weight, bias = conv_params(node, view)
        return DepthwiseStep(node, [flow], _new_flow(node, flow), weight=weight, bias=bias, padded=has_padding(geo), view=view)
    return Decline("grouped", f"Conv '{node.name}' has group={groups}: dropping channels would unbalance its groups")


def _pool_step(node: gs.Node, flow: Flow, view: GraphView, ctx: Context) -> Step | Decline:
    """Pooling keeps a constant ``v`` where every window reads at least one input element and
    averages over input elements only. A window that reads padding alone gives 0 (AveragePool) or
    the type's lowest value (MaxPool); AveragePool with ``count_include_pad`` averages zeros in.
    There only ``v = 0`` (AveragePool) survives, and MaxPool stops the flow."""
    zero_only = False
    if is_op(node, ops.MAX_POOL, ops.AVERAGE_POOL):
        kernel = tuple(int(k) for k in node.attrs.get("kernel_shape", []))
        shape = ctx.shape(flow.tensor)
        geo = window_geometry(node, kernel, shape)
        if isinstance(geo, str):
            return Decline("static_shapes", geo)
        ceil = int(node.attrs.get("ceil_mode", 0)) != 0
        if has_padding(geo) or ceil:
            empty = _empty_window(geo, shape, ceil)
            if is_op(node, ops.MAX_POOL) and empty is not False:
                return Decline("followed", f"MaxPool '{node.name}' may have windows that read only padding")
            zero_only = empty is not False or int(node.attrs.get("count_include_pad", 0)) != 0
    return PoolStep(node, [flow], _new_flow(node, flow), zero_only=zero_only)


def _empty_window(geo, shape, ceil: bool) -> bool | None:
    """Whether some output window of a pooling op reads no input element (None: the input size
    is not static). Windows start at ``stride * o + first`` and read ``count`` taps ``step`` apart."""
    spatial = None if shape is None else shape[2:]
    if spatial is None or len(spatial) != len(geo.taps) or not all(isinstance(v, int) for v in spatial):
        return None
    for size, stride, t in zip(spatial, geo.strides, geo.taps):
        pad_begin = -t.first
        pad_end = t.excess + t.step * (t.count - 1) + t.first
        span = size + pad_begin + pad_end - t.step * (t.count - 1) - 1
        out = (-(-span // stride) if ceil else span // stride) + 1
        if ceil and (out - 1) * stride >= size + pad_begin:
            out -= 1  # the last window must start inside the input or its leading padding
        for o in range(out):
            taps = stride * o + t.first + t.step * np.arange(t.count)
            if not np.any((taps >= 0) & (taps < size)):
                return True
    return False


def _flatten_step(node: gs.Node, flow: Flow, view: GraphView, ctx: Context) -> Step | Decline:
    shape = ctx.shape(flow.tensor)
    out_shape = ctx.shape(node.outputs[0])
    ones = shape is not None and all(d == 1 for d in shape[flow.axis + 1 :])
    if flow.axis != CONV_AXIS or not ones or out_shape is None or len(out_shape) != 2 or out_shape[1] != flow.width:
        return Decline("followed", f"{node.op} '{node.name}' does not only drop unit dims after the channels")
    if is_op(node, ops.FLATTEN):
        if int(node.attrs.get("axis", 1)) != 1:
            return Decline("followed", f"Flatten '{node.name}' does not flatten from axis 1")
        return Step(node, [flow], _new_flow(node, flow, rank=2))
    target = view.constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if target is None or target.ndim != 1 or len(target) != 2 or target[1] not in (-1, flow.width) or int(node.attrs.get("allowzero", 0)):
        return Decline("followed", f"Reshape '{node.name}' has a shape that is not a constant (N, C) or (N, -1)")
    return ReshapeStep(node, [flow], _new_flow(node, flow, rank=2), shape=np.array(target, dtype=np.int64))


def _concat_step(node: gs.Node, slot: int, flow: Flow, region: Region, view: GraphView, ctx: Context) -> Step | Decline:
    axis = int(node.attrs.get("axis", 0))
    axis = axis + flow.rank if axis < 0 else axis
    if axis != flow.axis:
        return Decline("followed", f"Concat '{node.name}' joins along axis {axis}, not the channel axis")
    carrying = [i for i, t in enumerate(node.inputs) if region.flow_of(t, view) is not None]
    if carrying != [slot]:
        return Decline("followed", f"Concat '{node.name}' takes the channels more than once")
    offset = 0
    for t in node.inputs[:slot]:
        shape = ctx.shape(t) if not view.is_constant(t) else view.constant(t).shape
        if shape is None or len(shape) != flow.rank or not isinstance(shape[axis], int):
            return Decline("static_shapes", f"the channel count of Concat '{node.name}' input '{t.name}' is unknown")
        offset += shape[axis]
    out_shape = ctx.shape(node.outputs[0])
    if out_shape is None or not isinstance(out_shape[axis], int):
        return Decline("static_shapes", f"the channel count of '{node.outputs[0].name}' is unknown")
    return ConcatStep(node, [flow], _new_flow(node, flow, index=flow.index + offset, width=out_shape[axis]), slot=slot)


# --------------------------------------------------------------------------------------------
# Rewriting
# --------------------------------------------------------------------------------------------


def _resized(ctx: Context, flow: Flow, width: int, base: str) -> gs.Variable:
    shape = ctx.shape(flow.tensor)
    if shape is not None:
        shape = list(shape)
        shape[flow.axis] = width
    dtype = ctx.dtype(flow.tensor)
    var = gs.Variable(ctx.fresh_name(base), dtype=dtype, shape=shape)
    if shape is not None:
        ctx.shapes[var.name] = tuple(shape)
    if dtype is not None:
        ctx.dtypes[var.name] = dtype
    return var


def plans(region: Region, view: GraphView, ctx: Context, dropped: np.ndarray, into: np.ndarray,
          folds: dict[int, np.ndarray], summary: str) -> list[Plan]:
    """Plans that drop the source channels ``dropped`` (a mask) everywhere in the region.

    Each consumer either adds the constant a dropped channel holds into its bias (``folds``:
    id(consumer input tensor) -> values over source channels, 0 where none) or, for a channel merged
    into another (``into[c] != c``), adds its weight slice to the kept channel's.
    """
    src = region.source
    keep_src = np.flatnonzero(~dropped)
    # the source, its output channels dropped
    w = src.weight.take(keep_src, axis=src.out_axis)
    b = src.bias[keep_src]
    first_flow = region.flows[id(view.source(src.out))]
    new: dict[int, gs.Tensor] = {id(first_flow.tensor): _resized(ctx, first_flow, len(keep_src), f"{first_flow.tensor.name}.pruned")}
    shared = src.emit(ctx, _source_input(src), w, b, new[id(first_flow.tensor)], first_flow.rank)
    macs_before = src.macs(ctx.shape(first_flow.tensor), src.weight.shape)
    macs_after = src.macs(ctx.shape(first_flow.tensor), w.shape)
    for step in region.steps:
        keep = step.out.kept_positions(dropped)
        out = _resized(ctx, step.out, len(keep), f"{step.out.tensor.name}.pruned")
        shared.append(step.emit(ctx, [new[id(f.tensor)] for f in step.inputs], out, keep))
        new[id(step.out.tensor)] = out
        if isinstance(step, DepthwiseStep):
            shape = ctx.shape(step.out.tensor)
            macs_before += _macs(shape, step.weight.shape, channel_last=False)
            macs_after += _macs(shape, (len(keep),) + step.weight.shape[1:], channel_last=False)
    result: list[Plan] = []
    for i, consumer in enumerate(region.consumers):
        layer, flow = consumer.layer, consumer.flow
        weight = algebra.merge_input_channels(layer.weight, _position_map(flow, into), layer.in_axis)
        bias = layer.bias
        values = folds.get(id(flow.tensor))
        if values is not None and np.any(values[dropped]):
            full = np.zeros(flow.width)
            full[flow.index[dropped]] = values[dropped]
            bias = algebra.fold_constant_inputs(layer.weight, layer.bias, full, layer.in_axis)
        keep = flow.kept_positions(dropped)
        weight = weight.take(keep, axis=layer.in_axis)
        nodes = layer.emit(ctx, new[id(flow.tensor)], weight, bias, layer.out, flow.rank)
        out_shape = ctx.shape(layer.out)
        macs_before += layer.macs(out_shape, layer.weight.shape)
        macs_after += layer.macs(out_shape, weight.shape)
        result.append(Plan(layer.out, (shared if i == 0 else []) + nodes, summary))
    # weights: the float constants of the nodes replaced, and of the nodes written
    written = [spec for plan in result for spec in plan.nodes]
    params_before = sum(_size(view.constant(t)) for n in region.nodes for t in n.inputs if _is_float_constant(t, view))
    params_after = sum(_size(t.values) for spec in written for t in spec.inputs
                       if isinstance(t, gs.Constant) and _is_float(t.values.dtype))
    result[0].details = {
        "layer": src.node.name,
        "channels": [int(region.channels), int(len(keep_src))],
        "params": [int(params_before), int(params_after)],
        "macs": [int(macs_before), int(macs_after)],
    }
    return result


def _position_map(flow: Flow, into: np.ndarray) -> list[int]:
    """``into`` over source channels as a map over ``flow``'s positions (identity elsewhere)."""
    pos = list(range(flow.width))
    for c, r in enumerate(into):
        pos[flow.index[c]] = int(flow.index[r])
    return pos


def _source_input(src: Layer) -> gs.Tensor:
    return src.linear.head.inputs[0] if src.linear else src.node.inputs[0]


def _size(a) -> int:
    return int(np.size(a))


def _is_float(dtype) -> bool:
    return np.dtype(dtype).kind == "f" or str(dtype) == "bfloat16"


def _is_float_constant(t: gs.Tensor | None, view: GraphView) -> bool:
    value = view.constant(t) if t is not None and t.name else None
    return value is not None and _is_float(value.dtype)


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """A source whose rows qualify (``marked``), the region its channels flow through or the
    reason they cannot be followed, and what the check decided (filled by the pass)."""

    node: gs.Node
    layer: Layer | str
    region: Region | Decline | None
    marked: np.ndarray
    decision: object = None


def raw_rows(node: gs.Node, view: GraphView) -> np.ndarray | None:
    """The constant weight of a Conv / Gemm / MatMul as one row per output channel, in its own
    dtype and without a copy where possible (for a quick look before the float64 work)."""
    w = view.constant(node.inputs[1])
    if w is None or w.ndim < 2:
        return None
    if is_op(node, ops.CONV):
        return w.reshape(w.shape[0], -1)
    if w.ndim != 2:
        return None
    return w if is_op(node, ops.GEMM) and int(node.attrs.get("transB", 0)) else w.T


def candidates(view: GraphView, ctx: Context, prefix: str, mark: Callable[[np.ndarray], np.ndarray],
               maybe: Callable[[np.ndarray], bool]):
    """Yield a Match for every Conv or linear layer with constant weights where ``mark`` (given the
    rows of :meth:`Layer.out_rows`) flags at least one output channel. ``maybe`` looks at the raw
    weight rows first (:func:`raw_rows`) and must be True whenever ``mark`` could flag a row: it
    spares the float64 copy of every layer that cannot qualify."""
    from onnxrep.rewrite import Match

    for node in view.graph.nodes:
        if not is_op(node, ops.CONV, ops.GEMM, ops.MATMUL) or len(node.inputs) < 2:
            continue
        rows = raw_rows(node, view)
        if rows is None or not maybe(rows):
            continue
        layer = as_layer(node, view, ctx)
        if layer is None:
            continue
        if isinstance(layer, str):
            # a grouped conv with constant weights is a candidate to decline by name; others are not candidates
            if not is_op(node, ops.CONV) or conv_constants_reason(node, view):
                continue
            marked = mark(_rows(*conv_params(node, view)))
            if marked.any():
                yield Match(f"{prefix}:{node.name}", [node], Candidate(node, layer, None, marked))
            continue
        marked = mark(layer.out_rows)
        if not marked.any():
            continue
        region = follow(layer, view, ctx)
        nodes = region.nodes if isinstance(region, Region) else layer.nodes
        yield Match(f"{prefix}:{node.name}", nodes, Candidate(node, layer, region, marked))


def source_reason(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    return c.layer if isinstance(c.layer, str) else None


def channel_list(mask: np.ndarray, limit: int = 8) -> str:
    idx = [int(i) for i in np.flatnonzero(mask)]
    text = ", ".join(str(i) for i in idx[:limit])
    return text + (f" and {len(idx) - limit} more" if len(idx) > limit else "")
