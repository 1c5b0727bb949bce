"""ResNet-18 with Diverse Branch Blocks (Ding et al., 2021, "Diverse Branch Block").

Every 3x3 conv-BN of ResNet-18 is a DBB, the sum of four branches that all see the block input x:

    origin   BN(convKxK(x, stride, pad K//2))
    1x1      BN(conv1x1(x, stride))
    avg      BN_avg(AvgPool_K,stride(BNAndPad(conv1x1(x))))
    1x1-KxK  BN_2(convKxK(BNAndPad(idconv1x1(x)), stride, pad 0))

``idconv1x1`` is DBB's ``IdentityBasedConv1x1`` (its weight plus the identity, constant-folded into
one 1x1 kernel). ``BNAndPad`` is DBB's ``BNAndPadLayer``: a BN, then a zero pad of K//2 whose ring
is overwritten with the BN's value at zero input, ``v = beta - mean * gamma / sqrt(var + eps)``, so
that the branch equals a padded conv of the pre-BN tensor. In the graph it is written the way
torch's TorchScript exporter writes ``F.pad`` followed by the four slice assignments
``out[:, :, :p, :] = v; out[:, :, -p:, :] = v; out[:, :, :, :p] = v; out[:, :, :, -p:] = v``
(with static shapes and constant folding):

    BatchNormalization -> Pad(mode="constant", pads=[0,0,p,p,0,0,p,p], value 0)
      -> ScatterND(indices int64 [N, C, p, W+2p, 4], updates [N, C, p, W+2p])  top rows
      -> ScatterND(indices int64 [N, C, p, W+2p, 4], updates [N, C, p, W+2p])  bottom rows
      -> ScatterND(indices int64 [N, C, H+2p, p, 4], updates [N, C, H+2p, p])  left columns
      -> ScatterND(indices int64 [N, C, H+2p, p, 4], updates [N, C, H+2p, p])  right columns

with constant indices (every written element's full (n, c, h, w), row-major, the layout torch
2.x's exporter computes) and updates (initializers; the exporter computes both with Shape/Range/
Expand chains that constant folding or onnx-simplifier reduce to these constants). With a symbolic
batch dim the batch index and the updates cannot be constants: the indices are then
``Range(0, N)`` (from ``Shape``) times a one-hot row plus a constant, and the updates a constant
``Expand``-ed to the batch.

Layout: 7x7 stride-2 conv-BN-ReLU stem (a plain conv-BN, as in DBB's ``convnet_utils`` for
kernels >= 7), 3x3 stride-2 MaxPool, four stages of two BasicBlocks (widths 64, 128, 256, 512,
stride 2 at the first block of stages 2-4, 1x1 conv-BN shortcut there), each
``ReLU(DBB2(ReLU(DBB1(x))) + shortcut(x))``; GlobalAveragePool, Flatten, Gemm.

Deploy (DBB's ``switch_to_deploy``): each DBB becomes one KxK conv with bias by the transforms of
the paper: I (conv-BN fusion), II (branch addition), III (1x1 then KxK sequential merge,
``K = K2 * K1``, ``b = sum(K2 * b1) + b2``), V (average pooling as a conv) and VI (1x1 zero-padded
to KxK). The stem and shortcut conv-BNs are fused.
"""

from __future__ import annotations

import numpy as np
import onnx

from .builder import F32, BNParams, GraphBuilder, conv_bn, conv_out, fuse_bn, identity_kernel, pad_center, scaled

WIDTHS = (64, 128, 256, 512)
BLOCKS = (2, 2, 2, 2)
STEM_WIDTH = 64


# --------------------------------------------------------------------------------------------
# DBB transforms (float64)
# --------------------------------------------------------------------------------------------


def trans_iii_1x1_kxk(k1: np.ndarray, b1: np.ndarray, k2: np.ndarray, b2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 1x1 conv ``(k1, b1)`` (``(M, C, 1, 1)``) followed by a KxK conv ``(k2, b2)`` (``(O, M, K, K)``)
    whose input is padded with ``b1``: ``K = sum_m k2[o, m] * k1[m, i]``, ``b = sum_{m,h,w} k2 * b1 + b2``."""
    k = np.einsum("omhw,mi->oihw", k2, k1[:, :, 0, 0], optimize=True)
    b = np.einsum("omhw,m->o", k2, b1, optimize=True) + b2
    return k, b


def trans_v_avg(channels: int, k: int) -> np.ndarray:
    """``AvgPool(k)`` over each channel as a dense ``(C, C, k, k)`` kernel."""
    return np.eye(channels)[:, :, None, None] * np.full((k, k), 1.0 / (k * k))


def pad_value(bn: BNParams) -> np.ndarray:
    """The BN's output for a zero input, ``beta - mean * gamma / sqrt(var + eps)``, per channel."""
    t = bn.gamma.astype(np.float64) / np.sqrt(bn.var.astype(np.float64) + bn.eps)
    return bn.beta.astype(np.float64) - bn.mean.astype(np.float64) * t


# --------------------------------------------------------------------------------------------
# BNAndPadLayer as exported
# --------------------------------------------------------------------------------------------


def _grid(*axes: np.ndarray) -> np.ndarray:
    """All index tuples over ``axes``: shape ``[len(a) for a in axes] + [len(axes)]``, int64."""
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.int64)


def bn_and_pad(
    b: GraphBuilder, x: str, bn: BNParams, c: int, h: int, w: int, pad: int, batch: int | str, name: str
) -> str:
    """BN, then a constant-0 ``Pad`` of ``pad`` whose ring is filled with the BN's zero-input value
    by four ``ScatterND`` (top, bottom, left, right), as exported from DBB's ``BNAndPadLayer``."""
    y = b.batch_norm(x, bn, f"{name}/bn")
    if pad == 0:
        return y
    v = pad_value(bn).astype(F32).reshape(1, c, 1, 1)
    pads = b.constant(f"{name}/pad/pads", np.array([0, 0, pad, pad, 0, 0, pad, pad]), np.int64)
    zero = b.constant(f"{name}/pad/value", np.array(0.0, F32))
    y = b.node("Pad", [y, pads, zero], f"{name}/pad", mode="constant")
    hp, wp = h + 2 * pad, w + 2 * pad
    rows_cols = {
        "top": (np.arange(pad), None),
        "bottom": (np.arange(hp - pad, hp), None),
        "left": (None, np.arange(pad)),
        "right": (None, np.arange(wp - pad, wp)),
    }
    static = isinstance(batch, int)
    if not static:  # batch index from the runtime shape: Range(0, N) as a column
        shape = b.node("Shape", [y], f"{name}/shape")
        n_vec = b.node(
            "Slice",
            [shape, b.constant(f"{name}/n/starts", np.array([0]), np.int64), b.constant(f"{name}/n/ends", np.array([1]), np.int64)],
            f"{name}/n",
        )
        n = b.node("Squeeze", [n_vec, b.constant(f"{name}/n/axes", np.array([0]), np.int64)], f"{name}/n/squeeze")
        n_range = b.node(
            "Range",
            [b.constant(f"{name}/n/start", np.array(0), np.int64), n, b.constant(f"{name}/n/delta", np.array(1), np.int64)],
            f"{name}/n/range",
        )
    for side, (rows, cols) in rows_cols.items():
        nb = batch if static else 1
        if cols is None:  # out[:, :, rows, :] = v
            idx = _grid(np.arange(nb), np.arange(c), rows, np.arange(wp))
            upd_shape = (nb, c, len(rows), wp)
        else:  # out[:, :, :, cols] = v
            idx = _grid(np.arange(nb), np.arange(c), np.arange(hp), cols)
            upd_shape = (nb, c, hp, len(cols))
        upd = np.broadcast_to(v, upd_shape)
        if static:
            indices = b.constant(f"{name}/{side}/indices", idx, np.int64)
            updates = b.constant(f"{name}/{side}/updates", upd)
        else:
            q = idx.shape[-1]
            col = b.node(
                "Reshape", [n_range, b.constant(f"{name}/{side}/n_shape", np.array([-1] + [1] * q), np.int64)],
                f"{name}/{side}/n_col",
            )
            onehot = np.zeros(q, np.int64)
            onehot[0] = 1
            col = b.mul(col, b.constant(f"{name}/{side}/onehot", onehot, np.int64), f"{name}/{side}/n_mul")
            indices = b.add(col, b.constant(f"{name}/{side}/indices", idx, np.int64), f"{name}/{side}/indices")
            target = b.node(
                "Concat", [n_vec, b.constant(f"{name}/{side}/upd_shape", np.array(upd_shape[1:]), np.int64)],
                f"{name}/{side}/upd_shape", axis=0,
            )
            updates = b.node("Expand", [b.constant(f"{name}/{side}/updates", upd), target], f"{name}/{side}/updates")
        y = b.node("ScatterND", [y, indices, updates], f"{name}/{side}/scatter")
    return y


# --------------------------------------------------------------------------------------------
# The block
# --------------------------------------------------------------------------------------------


def diverse_branch_block(
    b: GraphBuilder,
    x: str,
    cin: int,
    cout: int,
    k: int,
    stride: int,
    h: int,
    w: int,
    batch: int | str,
    deploy: bool,
    bn_scale: float = 1.0,
    name: str = "dbb",
) -> str:
    """A DBB (groups 1, internal channels of the 1x1-KxK branch = ``cin``) on an input of spatial
    size ``h x w``; no activation. Deploy: one KxK conv with bias, stride ``stride``, pad ``k // 2``."""
    p = k // 2
    s = bn_scale / 2.0  # four summed branches
    # draw order: origin, 1x1, avg, 1x1-kxk
    w_origin = b.conv_weight(cout, cin, k)
    bn_origin = b.bn_params(cout, s)
    w_1x1 = b.conv_weight(cout, cin, 1)
    bn_1x1 = b.bn_params(cout, s)
    w_avg = b.conv_weight(cout, cin, 1)
    bn_avg_pad = b.bn_params(cout)
    bn_avg = b.bn_params(cout, s)
    w_id = (identity_kernel(cin, 1, 1) + 0.5 * b.conv_weight(cin, cin, 1)).astype(F32)  # IdentityBasedConv1x1, folded
    bn_id_pad = b.bn_params(cin)
    w_kxk = b.conv_weight(cout, cin, k)
    bn_kxk = b.bn_params(cout, s)

    if not deploy:
        origin = b.batch_norm(b.conv(x, w_origin, None, stride, p, 1, f"{name}/dbb_origin/conv"), bn_origin, f"{name}/dbb_origin/bn")
        one = b.batch_norm(b.conv(x, w_1x1, None, stride, 0, 1, f"{name}/dbb_1x1/conv"), bn_1x1, f"{name}/dbb_1x1/bn")
        a = b.conv(x, w_avg, None, 1, 0, 1, f"{name}/dbb_avg/conv")
        a = bn_and_pad(b, a, bn_avg_pad, cout, h, w, p, batch, f"{name}/dbb_avg")
        a = b.average_pool(a, k, stride, 0, f"{name}/dbb_avg/avg")
        a = b.batch_norm(a, bn_avg, f"{name}/dbb_avg/avgbn")
        t = b.conv(x, w_id, None, 1, 0, 1, f"{name}/dbb_1x1_kxk/idconv1")
        t = bn_and_pad(b, t, bn_id_pad, cin, h, w, p, batch, f"{name}/dbb_1x1_kxk/bn1")
        t = b.conv(t, w_kxk, None, stride, 0, 1, f"{name}/dbb_1x1_kxk/conv2")
        t = b.batch_norm(t, bn_kxk, f"{name}/dbb_1x1_kxk/bn2")
        return b.sum([origin, one, a, t], f"{name}/add")

    k_origin, b_origin = fuse_bn(w_origin, bn_origin)  # transI
    k_1x1, b_1x1 = fuse_bn(w_1x1, bn_1x1)
    k_avg, b_avg = trans_iii_1x1_kxk(*fuse_bn(w_avg, bn_avg_pad), *fuse_bn(trans_v_avg(cout, k), bn_avg))  # transV, III
    k_t, b_t = trans_iii_1x1_kxk(*fuse_bn(w_id, bn_id_pad), *fuse_bn(w_kxk, bn_kxk))  # transIII
    kernel = k_origin + pad_center(k_1x1, k) + k_avg + k_t  # transVI, II
    bias = b_origin + b_1x1 + b_avg + b_t
    return b.conv(x, kernel.astype(F32), bias.astype(F32), stride, p, 1, f"{name}/reparam/conv")


def basic_block(
    b: GraphBuilder, x: str, cin: int, cout: int, stride: int, h: int, w: int, batch: int | str, deploy: bool, name: str
) -> tuple[str, int, int]:
    y = diverse_branch_block(b, x, cin, cout, 3, stride, h, w, batch, deploy, name=f"{name}/conv1")
    y = b.relu(y, f"{name}/conv1/relu")
    h2, w2 = conv_out(h, 3, stride), conv_out(w, 3, stride)
    y = diverse_branch_block(b, y, cout, cout, 3, 1, h2, w2, batch, deploy, bn_scale=0.5, name=f"{name}/conv2")
    if stride != 1 or cin != cout:
        sc = conv_bn(b, x, cin, cout, 1, stride, 1, deploy, name=f"{name}/shortcut")
    else:
        sc = x
    y = b.add(y, sc, f"{name}/residual")
    return b.relu(y, f"{name}/relu"), h2, w2


def dbb_resnet18(
    deploy: bool = False,
    resolution: int = 224,
    batch: int | str = 1,
    seed: int = 0,
    width_scale: float = 1.0,
) -> onnx.ModelProto:
    """DBB-ResNet-18: every 3x3 conv-BN of ResNet-18 a Diverse Branch Block (widths [64, 128, 256,
    512] times ``width_scale``, at least 8); ``deploy`` gives the fused form of the same parameters."""
    b = GraphBuilder.for_form("dbb_resnet18", deploy, seed)
    c = scaled(STEM_WIDTH, width_scale)
    x = b.relu(conv_bn(b, "input", 3, c, 7, 2, 1, deploy, name="stem/conv"), "stem/relu")
    size = conv_out(resolution, 7, 2)
    x = b.max_pool(x, 3, 2, 1, "stem/maxpool")
    size = conv_out(size, 3, 2)
    h = w = size
    for s, (blocks, width) in enumerate(zip(BLOCKS, WIDTHS)):
        cout = scaled(width, width_scale)
        for i in range(blocks):
            stride = 2 if (i == 0 and s > 0) else 1
            x, h, w = basic_block(b, x, c, cout, stride, h, w, batch, deploy, f"stage{s + 1}.{i}")
            c = cout
    logits = b.classifier(x, c)
    return b.image_model(logits, batch, resolution)
