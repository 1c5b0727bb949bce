"""Normalize shifts: a per-channel shift before an unpadded average pool moves after it, so that the
pool reads the padded output of the conv before it and the shift folds after the pool.

Spelling. ``AveragePool(Add(x, b))`` (or ``Sub(x, b)``) where ``b`` is constant along the spatial
axes (a scalar, ``[C, 1, 1]``, ``[1, C, 1, 1]``) and the pool has no padding ->
``Add(AveragePool(x), b)``: every window averages ``k`` elements ``x_i + b``, which is
``mean(x_i) + b`` in exact arithmetic. tf2onnx writes the average-pool branch of a DBB block as
``Conv1x1 -> Pad(0) -> Add(b) -> AveragePool`` (the ring's ``Sub(b)`` cancelled the BN's offset in
the conv's bias); moved, the Pad sits before the pool (normalize-pads takes it in) and conv-chain
merges the conv and the pool, while the shift folds after them.

Conditions (checked in this order):
  1. ``per_channel``  the shift's constant broadcasts along the spatial axes only (it has at most the
                      data's rank, and size 1 on the batch axis and on every axis from 2 on; no
                      legacy ``broadcast`` attribute).
  2. ``unpadded``     the pool has no pads (all zero, or ``auto_pad`` VALID / NOTSET without pads)
                      and ``ceil_mode=0``: every window holds ``k`` elements of the shifted tensor.
  3. ``single_use``   the shifted tensor is read by the pool only and is no graph output.
  4. ``ring_shift``   the shift does not close a ``Sub(b) -> Pad(0) -> Add(b)`` padding ring
                      (conv-chain takes such a ring whole).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import ops
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, NewNode, Plan, run_checks

from . import register
from . import _ring
from ._common import affine_data_input, is_op, outside_reader_reason


@dataclass
class Candidate:
    pool: gs.Node
    shift: gs.Node
    data: gs.Tensor  # x
    const_index: int  # position of b in the shift


def _match(node: gs.Node, view: GraphView) -> Candidate | None:
    if not is_op(node, ops.AVERAGE_POOL) or not node.inputs or len(node.outputs) != 1:
        return None
    shift = view.producer(node.inputs[0])
    if not is_op(shift, ops.ADD, ops.SUB) or len(shift.outputs) != 1 or len(shift.inputs) != 2:
        return None
    data = affine_data_input(shift, view)
    if data is None:
        return None
    index = 1 if view.source(shift.inputs[0]) is view.source(data) else 0
    if shift.op == ops.SUB and index == 0:  # b - x negates x: not a shift
        return None
    return Candidate(node, shift, view.source(data), index)


def _check_per_channel(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if "broadcast" in c.shift.attrs or "axis" in c.shift.attrs:
        return f"{c.shift.op} '{c.shift.name}' has a legacy broadcast attribute"
    b = view.constant(c.shift.inputs[c.const_index])
    shape = ctx.shape(c.data)
    rank = len(shape) if shape is not None else None
    if rank is None or np.ndim(b) > rank or rank < 3:
        return f"{c.shift.op} '{c.shift.name}' constant of shape {list(np.shape(b))} does not fit data of rank {rank}"
    full = (1,) * (rank - np.ndim(b)) + tuple(np.shape(b))
    if any(d != 1 for d in full[2:]) or full[0] != 1:
        return f"{c.shift.op} '{c.shift.name}' constant of shape {list(np.shape(b))} varies along the batch or spatial axes"
    return None


def _check_unpadded(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    p = c.pool
    mode = p.attrs.get("auto_pad", "NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode not in ("NOTSET", "VALID"):
        return f"AveragePool '{p.name}' has auto_pad={mode}"
    if any(int(v) for v in p.attrs.get("pads", [])):
        return f"AveragePool '{p.name}' has pads {list(p.attrs['pads'])}"
    if int(p.attrs.get("ceil_mode", 0)) != 0:
        return f"AveragePool '{p.name}' has ceil_mode=1 (a partial window at the end)"
    return None


def _check_single_use(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    return outside_reader_reason(c.shift.outputs[0], [c.pool], view)


def _check_ring(c: Candidate, view: GraphView, ctx: Context) -> str | None:
    if _ring.shift_ring_reader(view, c.shift) is not None:
        return f"{c.shift.op} '{c.shift.name}' closes a Sub(b) -> Pad(0) -> Add(b) padding ring (conv-chain takes it whole)"
    return None


CONDITIONS = [
    ("per_channel", _check_per_channel),
    ("unpadded", _check_unpadded),
    ("single_use", _check_single_use),
    ("ring_shift", _check_ring),
]


@register
class NormalizeShifts:
    name = "normalize-shifts"
    summary = "a per-channel Add/Sub before an unpadded AveragePool -> after it"

    def match(self, view: GraphView, ctx: Context):
        for node in view.graph.nodes:
            cand = _match(node, view)
            if cand is not None:
                yield Match(cand.pool.outputs[0].name, [cand.pool, cand.shift], cand)

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return run_checks(CONDITIONS, match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> Plan:
        c: Candidate = match.data
        target = c.pool.outputs[0]
        pooled = gs.Variable(ctx.fresh_name(f"{target.name}.unshifted"), dtype=target.dtype)
        shape = ctx.shape(target)
        if shape is not None:
            pooled.shape = list(shape)
            ctx.shapes[pooled.name] = tuple(shape)
        dtype = ctx.dtype(target)
        if dtype is not None:
            ctx.dtypes[pooled.name] = dtype
        b = c.shift.inputs[c.const_index]
        inputs = [pooled, b] if c.const_index == 1 else [b, pooled]
        nodes = [
            NewNode(ops.AVERAGE_POOL, ctx.fresh_name(c.pool.name or "pool"), dict(c.pool.attrs), [c.data], [pooled]),
            NewNode(c.shift.op, ctx.fresh_name(c.shift.name or c.shift.op), dict(c.shift.attrs), inputs, [target]),
        ]
        return Plan(target, nodes, f"{c.shift.op} '{c.shift.name}' moved after AveragePool '{c.pool.name}'")
