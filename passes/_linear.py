"""Linear layers as the passes see them: ``y = x @ W + b`` over the last axis of ``x``.

A linear layer is a ``Gemm`` (``alpha * A @ op(B) + beta * C`` with ``transA = 0``) or a ``MatMul``
whose second operand is a constant matrix, optionally followed by an ``Add`` of a bias along the
last axis. Its weight is given as ``W`` of shape ``(K, N)``: ``K`` input features, ``N`` outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import ops
from onnxrep.algebra import as_f64
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, NewNode

from ._common import is_op, per_channel


@dataclass
class Linear:
    nodes: list[gs.Node]  # [Gemm], [MatMul] or [MatMul, Add]
    x: gs.Tensor  # the input, Identity nodes looked through

    @property
    def head(self) -> gs.Node:
        return self.nodes[0]

    @property
    def out(self) -> gs.Tensor:
        return self.nodes[-1].outputs[0]

    @property
    def is_gemm(self) -> bool:
        return self.head.op == ops.GEMM

    def internal_tensors(self) -> list[gs.Tensor]:
        return [n.outputs[0] for n in self.nodes[:-1]]


def as_linear(node: gs.Node | None, view: GraphView, with_bias: bool = True) -> Linear | None:
    """The linear layer that ``node`` (a Gemm or a MatMul by a constant matrix) is, or None.

    With ``with_bias``, a MatMul's bias Add is included when the Add is the MatMul's only reader
    and adds a constant.
    """
    if is_op(node, ops.GEMM) and len(node.inputs) >= 2:
        return Linear([node], view.source(node.inputs[0]))
    if not (is_op(node, ops.MATMUL) and len(node.inputs) == 2):
        return None
    w = view.constant(node.inputs[1])
    if w is None or w.ndim != 2:
        return None
    nodes = [node]
    users = view.users(node.outputs[0])
    if with_bias and len(users) == 1 and not view.escapes(node.outputs[0]) and is_op(users[0], ops.ADD) and len(users[0].inputs) == 2:
        a, b = users[0].inputs
        other = b if view.source(a) is view.source(node.outputs[0]) else a
        if view.is_constant(other):
            nodes.append(users[0])
    return Linear(nodes, view.source(node.inputs[0]))


def producer_linear(tensor: gs.Tensor, view: GraphView) -> Linear | None:
    """The linear layer whose output ``tensor`` is (through a MatMul's bias Add too)."""
    node = view.producer(tensor)
    lin = as_linear(node, view, with_bias=False)
    if lin is not None and lin.out is view.source(tensor):
        return lin
    if is_op(node, ops.ADD):
        for t in node.inputs:
            lin = as_linear(view.producer(t), view)
            if lin is not None and lin.out is view.source(tensor):
                return lin
    return None


def rank_of(tensor: gs.Tensor, ctx: Context) -> int | None:
    shape = ctx.shape(tensor)
    return len(shape) if shape is not None else None


def layout_reason(lin: Linear, view: GraphView, ctx: Context) -> str | None:
    """Why the layer's weight, bias or attributes cannot be read as ``x @ W + b``, or None."""
    head = lin.head
    for t in head.inputs[1:]:
        if t is not None and t.name and not view.is_constant(t):
            return f"{head.op} '{head.name}' input '{t.name}' is not a constant"
    w = view.constant(head.inputs[1])
    if (w.dtype.kind != "f" and str(w.dtype) != "bfloat16") or w.ndim != 2:
        return f"{head.op} '{head.name}' weight is not a float matrix"
    if lin.is_gemm and int(head.attrs.get("transA", 0)) != 0:
        return f"Gemm '{head.name}' transposes its input (transA=1)"
    n = w.shape[0] if lin.is_gemm and int(head.attrs.get("transB", 0)) else w.shape[1]
    x_rank = 2 if lin.is_gemm else rank_of(lin.x, ctx)
    bias = _raw_bias(lin, view)
    if bias is not None:
        # the rewritten layer's output has the input's rank: a bias of higher rank would change it
        rank = x_rank if x_rank is not None else 1
        if bias.ndim > rank or per_channel(bias, n, rank, -1) is None:
            return f"the bias of '{head.name}' does not broadcast along the {n} output features alone"
    return None


def _raw_bias(lin: Linear, view: GraphView) -> np.ndarray | None:
    if lin.is_gemm:
        return view.constant(lin.head.inputs[2]) if len(lin.head.inputs) > 2 and lin.head.inputs[2].name else None
    if len(lin.nodes) > 1:
        add = lin.nodes[1]
        a, b = add.inputs
        return view.constant(b if view.source(a) is view.source(lin.head.outputs[0]) else a)
    return None


def params(lin: Linear, view: GraphView) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` in float64 with ``W`` of shape ``(K, N)``: ``alpha * op(B)`` and ``beta * C``."""
    head = lin.head
    w = np.array(view.constant(head.inputs[1]), dtype=np.float64)
    scale_w, scale_b = 1.0, 1.0
    if lin.is_gemm:
        if int(head.attrs.get("transB", 0)):
            w = np.ascontiguousarray(w.T)
        scale_w, scale_b = float(head.attrs.get("alpha", 1.0)), float(head.attrs.get("beta", 1.0))
    w *= scale_w
    raw = _raw_bias(lin, view)
    # beta = 0: C is not read at all (0 * inf would be NaN)
    b = np.zeros(w.shape[1]) if raw is None or scale_b == 0 else scale_b * np.broadcast_to(as_f64(raw).reshape(-1), (w.shape[1],))
    return w, np.array(b, dtype=np.float64)


def dims(lin: Linear, view: GraphView) -> tuple[int, int]:
    w = view.constant(lin.head.inputs[1])
    k, n = w.shape
    return (n, k) if lin.is_gemm and int(lin.head.attrs.get("transB", 0)) else (k, n)


def emit(ctx: Context, name: str, x: gs.Tensor, w: np.ndarray, b: np.ndarray, dtype, target: gs.Tensor,
         x_rank: int | None) -> list[NewNode]:
    """Nodes computing ``x @ w + b`` into ``target``: a Gemm for a 2-D input, else MatMul (+ Add)."""
    wc = ctx.constant(f"{name}.weight", w.astype(dtype))
    if x_rank == 2:
        bc = ctx.constant(f"{name}.bias", b.astype(dtype))
        return [NewNode(ops.GEMM, ctx.fresh_name(f"{name}/gemm"), {}, [x, wc, bc], [target])]
    if not np.any(b):
        return [NewNode(ops.MATMUL, ctx.fresh_name(f"{name}/matmul"), {}, [x, wc], [target])]
    mid = ctx.like(f"{name}.matmul_out", target)
    bc = ctx.constant(f"{name}.bias", b.astype(dtype))
    return [
        NewNode(ops.MATMUL, ctx.fresh_name(f"{name}/matmul"), {}, [x, wc], [mid]),
        NewNode(ops.ADD, ctx.fresh_name(f"{name}/add"), {}, [mid, bc], [target]),
    ]
