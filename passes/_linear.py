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


# --------------------------------------------------------------------------------------------
# Affine fields seen through layout ops
# --------------------------------------------------------------------------------------------
#
# An affine node ``y = S * x + T`` whose constants broadcast against ``x`` (BatchNormalization:
# ``[1, C, 1, ...]``; Mul/Add/Sub/Div: the constant's shape) is a *field*: two float64 arrays of the
# data's rank, each dim 1 or the data's. A layout op ``L`` that only moves, regroups or averages
# elements commutes with it exactly: ``L(S * x + T) = S' * L(x) + T'`` with ``(S', T')`` the same
# move applied to the field (for an average pool only when the field is constant over the window
# and, for ``T``, when every window divides by its own element count; see ``pool_reason``).

#: ops that only regroup elements in C order (a Reshape to the static output shape)
RESHAPE_LIKE = frozenset({ops.RESHAPE, ops.FLATTEN, ops.SQUEEZE, ops.UNSQUEEZE})
#: ops an affine field is seen through (``LAYOUT_OPS``); Identity nodes are looked through by the view
LAYOUT_OPS = RESHAPE_LIKE | frozenset({ops.TRANSPOSE, ops.AVERAGE_POOL, ops.GLOBAL_AVERAGE_POOL})


@dataclass
class Field:
    scale: np.ndarray
    shift: np.ndarray


def _blocks(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Contiguous blocks of axes of shapes ``a`` and ``b`` (no dim 1 in either) with equal element
    counts, the finest such; a symbolic dim must be a block of its own on both sides. None when
    the shapes do not regroup into each other."""
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if i >= len(a) or j >= len(b):
            return None
        if isinstance(a[i], str) or isinstance(b[j], str):
            if a[i] != b[j]:
                return None
            out.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        ia, jb, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(a) or isinstance(a[i], str):
                    return None
                pa *= a[i]
                ia.append(i)
                i += 1
            else:
                if j >= len(b) or isinstance(b[j], str):
                    return None
                pb *= b[j]
                jb.append(j)
                j += 1
        out.append((ia, jb))
    return out


def _reshape_array(v: np.ndarray, src: tuple, dst: tuple) -> np.ndarray | None:
    """``v`` (broadcastable to ``src``: each dim 1 or ``src``'s) regrouped as a C-order reshape of
    the data from ``src`` to ``dst`` would regroup it (broadcastable to ``dst``), or None."""
    keep_a = [k for k, d in enumerate(src) if d != 1]
    keep_b = [k for k, d in enumerate(dst) if d != 1]
    a, b = tuple(src[k] for k in keep_a), tuple(dst[k] for k in keep_b)
    blocks = _blocks(a, b)
    if blocks is None:
        return None
    core = v.reshape(tuple(v.shape[k] for k in keep_a))
    full_in, full_out = [], []
    for ia, jb in blocks:
        if all(core.shape[k] == 1 for k in ia):
            full_in += [1] * len(ia)
            full_out += [1] * len(jb)
        else:
            if any(isinstance(a[k], str) for k in ia):
                return None
            full_in += [a[k] for k in ia]
            full_out += [b[k] for k in jb]
    core = np.broadcast_to(core, tuple(full_in)).reshape(tuple(full_out))
    shape = [1] * len(dst)
    for pos, k in enumerate(keep_b):
        shape[k] = core.shape[pos]
    return core.reshape(shape)


def reshape_field(f: Field, src: tuple, dst: tuple) -> Field | None:
    s, t = _reshape_array(f.scale, src, dst), _reshape_array(f.shift, src, dst)
    return None if s is None or t is None else Field(s, t)


def transpose_field(f: Field, perm) -> Field:
    return Field(np.transpose(f.scale, perm), np.transpose(f.shift, perm))


def spatial_reason(f: Field, node: gs.Node) -> str | None:
    """Why the field is not constant over the spatial axes (2 and up) that ``node`` pools, or None."""
    for arr in (f.scale, f.shift):
        if arr.ndim < 3 or any(d != 1 for d in arr.shape[2:]) :
            return f"the affine varies along the axes that {node.op} '{node.name}' averages"
    return None


def pool_reason(f: Field, node: gs.Node, view: GraphView, in_shape: tuple | None) -> str | None:
    """Why an AveragePool does not commute with the field's shift, or None.

    ``avg(s x + t) = s avg(x) + t`` when each window divides by the number of elements it sums:
    no window reads padding, or ``count_include_pad = 0`` (the divisor is then the count of
    input elements in the window). With ``count_include_pad = 1`` a window over ``r`` of ``k``
    input elements gives ``s avg(x) + t r / k``; ``ceil_mode = 1`` windows are declined alike.
    The scale alone always commutes."""
    if not np.any(f.shift):
        return None
    if not is_op(node, ops.AVERAGE_POOL):
        return None  # GlobalAveragePool reads no padding
    from ._common import has_padding, window_geometry

    kernel = tuple(int(k) for k in node.attrs.get("kernel_shape", ()))
    geo = window_geometry(node, kernel, in_shape)
    if isinstance(geo, str):
        return geo
    if int(node.attrs.get("ceil_mode", 0)):
        return f"AveragePool '{node.name}' has ceil_mode=1: a shift before it does not commute with its last windows"
    if has_padding(geo) and int(node.attrs.get("count_include_pad", 0)):
        return (
            f"AveragePool '{node.name}' reads padding with count_include_pad=1: the shift before it "
            "is averaged with the padded zeros at the border"
        )
    return None


def _constant_axes_dropped(arr: np.ndarray) -> np.ndarray:
    """``arr`` with every axis but the last reduced to size 1 where its values do not change along
    it (an affine over ``(tokens, features)`` with equal rows is exactly per feature)."""
    for axis in range(arr.ndim - 1):
        if arr.shape[axis] > 1:
            first = np.take(arr, [0], axis=axis)
            if np.array_equal(np.broadcast_to(first, arr.shape), arr):
                arr = first
    return arr


def feature_vectors(f: Field, features: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(s, t)`` of length ``features`` when the field varies along the last axis only (exactly:
    equal values along another axis count as not varying), else None."""
    scale, shift = _constant_axes_dropped(f.scale), _constant_axes_dropped(f.shift)
    s = per_channel(scale, features, scale.ndim, -1) if scale.ndim else None
    t = per_channel(shift, features, shift.ndim, -1) if shift.ndim else None
    if s is None or t is None:
        return None
    return s, t
