"""A small RepViT-style network (Wang et al., 2024, "RepViT: Revisiting Mobile CNN From ViT
Perspective"), without squeeze-excite and with ReLU for GELU.

Stem: two 3x3 stride-2 conv-BN-ReLU (3 -> C/2 -> C). Stages of RepViT blocks, each a token mixer
then a channel mixer:

    t = BN_post((BN(dwconv3x3(x)) + dwconv1x1(x)) + x)                  (RepVGGDW; the 1x1 has a bias)
    y = t + BN_2(pw2(ReLU(BN_1(pw1(t)))))                                 (channel mixer, C -> 2C -> C)

Stages are joined by a depthwise 3x3 stride-2 conv-BN and a 1x1 conv-BN (C -> C'), as in RepViT's
stride-2 token mixer. Head: GlobalAveragePool, Flatten, then RepViT's ``Classfier`` with
distillation in eval mode: ``(Linear_a(BN1d_a(x)) + Linear_b(BN1d_b(x))) / 2`` (a
BatchNormalization on the 2-d ``[N, C]`` tensor, Gemm, Add, Div by 2).

Deploy (RepViT's ``fuse``): each RepVGGDW becomes one depthwise 3x3 conv with bias (the 1x1 kernel
zero-padded into the 3x3, plus the identity kernel, then the post-sum BN folded in); every other
conv-BN is fused; the classifier becomes one Gemm with both BN1d folded into their Linear layers
and the two heads averaged. The channel mixer's residual Add stays.
"""

from __future__ import annotations

import numpy as np
import onnx

from .builder import F32, BNParams, GraphBuilder, conv_bn, fuse_bn, identity_kernel, pad_center, scaled

WIDTHS = (48, 96, 192, 384)
BLOCKS = (2, 2, 6, 2)
EXPANSION = 2
#: The downsampling convs read tensors that are not ReLU-ed, where He init doubles the variance.
DOWNSAMPLE_BN_SCALE = float(np.sqrt(0.5))


def conv_bn_relu(b: GraphBuilder, x: str, cin: int, cout: int, k: int, stride: int, group: int, deploy: bool, name: str) -> str:
    return b.relu(conv_bn(b, x, cin, cout, k, stride, group, deploy, name=name), f"{name}/relu")


def repvgg_dw(b: GraphBuilder, x: str, c: int, deploy: bool, name: str) -> str:
    """RepViT's ``RepVGGDW``: ``BN((BN(dwconv3x3(x)) + dwconv1x1(x)) + x)``; deploy: one depthwise
    3x3 conv with bias."""
    w3 = b.conv_weight(c, 1, 3, branches=2)  # He init assumes a ReLU-ed input; x is not
    bn3 = b.bn_params(c)
    w1 = b.conv_weight(c, 1, 1, branches=2)
    b1 = b.rng.normal(0.0, 0.1, c).astype(F32)
    bn = b.bn_params(c, 1.0 / np.sqrt(3.0))  # three summands

    if not deploy:
        a = b.batch_norm(b.conv(x, w3, None, 1, 1, c, f"{name}/conv/c"), bn3, f"{name}/conv/bn")
        o = b.conv(x, w1, b1, 1, 0, c, f"{name}/conv1")
        s = b.add(b.add(a, o, f"{name}/add0"), x, f"{name}/add1")
        return b.batch_norm(s, bn, f"{name}/bn")

    k3, c3 = fuse_bn(w3, bn3)
    kernel = k3 + pad_center(w1.astype(np.float64), 3) + identity_kernel(c, c, 3)
    bias = c3 + b1.astype(np.float64)
    kernel, shift = fuse_bn(kernel, bn)  # the post-sum BN: kernel * t, beta - mean * t
    t = bn.gamma.astype(np.float64) / np.sqrt(bn.var.astype(np.float64) + bn.eps)
    bias = shift + bias * t
    return b.conv(x, kernel.astype(F32), bias.astype(F32), 1, 1, c, f"{name}/reparam/conv")


def channel_mixer(b: GraphBuilder, x: str, c: int, deploy: bool, name: str) -> str:
    """``x + BN(pw2(ReLU(BN(pw1(x)))))`` with pw1 C -> 2C and pw2 2C -> C (RepViT's ``Residual``)."""
    h = conv_bn_relu(b, x, c, EXPANSION * c, 1, 1, 1, deploy, f"{name}/m.0")
    h = conv_bn(b, h, EXPANSION * c, c, 1, deploy=deploy, bn_scale=0.5, name=f"{name}/m.2")
    return b.add(x, h, f"{name}/residual")


def bn_linear_params(b: GraphBuilder, channels: int, classes: int) -> tuple[BNParams, np.ndarray, np.ndarray]:
    bn = b.bn_params(channels)
    w, bias = b.linear_params(classes, channels)
    return bn, w, bias


def fuse_bn_linear(bn: BNParams, w: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``Linear(BN1d(x))`` as one Linear (RepViT's ``BN_Linear.fuse``), float64."""
    t = bn.gamma.astype(np.float64) / np.sqrt(bn.var.astype(np.float64) + bn.eps)
    shift = bn.beta.astype(np.float64) - bn.mean.astype(np.float64) * t
    w64 = w.astype(np.float64)
    return w64 * t[None, :], w64 @ shift + bias.astype(np.float64)


def distilled_classifier(b: GraphBuilder, x: str, channels: int, deploy: bool, classes: int = 1000, name: str = "head") -> str:
    """GAP, Flatten, ``(Linear_a(BN_a(x)) + Linear_b(BN_b(x))) / 2``; deploy: one Gemm."""
    head = bn_linear_params(b, channels, classes)
    dist = bn_linear_params(b, channels, classes)
    h = b.global_average_pool(x, f"{name}/gap")
    h = b.flatten(h, f"{name}/flatten")
    if not deploy:
        ya = b.gemm(b.batch_norm(h, head[0], f"{name}/classifier/bn"), head[1], head[2], f"{name}/classifier/l")
        yb = b.gemm(b.batch_norm(h, dist[0], f"{name}/classifier_dist/bn"), dist[1], dist[2], f"{name}/classifier_dist/l")
        s = b.add(ya, yb, f"{name}/add")
        return b.node("Div", [s, b.constant(f"{name}/two", np.array(2.0, F32))], f"{name}/div")
    wa, ba = fuse_bn_linear(*head)
    wb, bb = fuse_bn_linear(*dist)
    return b.gemm(h, ((wa + wb) / 2).astype(F32), ((ba + bb) / 2).astype(F32), f"{name}/reparam/fc")


def repvit_style(
    deploy: bool = False,
    resolution: int = 224,
    batch: int | str = 1,
    seed: int = 0,
    width_scale: float = 1.0,
) -> onnx.ModelProto:
    """RepViT-like classifier: stride-4 stem, stages of [2, 2, 6, 2] RepViT blocks at widths
    [48, 96, 192, 384] (times ``width_scale``, at least 8), depthwise 3x3 stride-2 + 1x1
    downsampling between stages, distilled BN-Linear head; ``deploy`` gives the fused form of the
    same parameters."""
    b = GraphBuilder.for_form("repvit", deploy, seed)
    widths = [scaled(w, width_scale) for w in WIDTHS]
    c = widths[0]
    half = scaled(WIDTHS[0] // 2, width_scale)
    x = conv_bn_relu(b, "input", 3, half, 3, 2, 1, deploy, "patch_embed.0")
    x = conv_bn_relu(b, x, half, c, 3, 2, 1, deploy, "patch_embed.2")
    for s, (blocks, width) in enumerate(zip(BLOCKS, widths)):
        if s > 0:
            x = conv_bn(b, x, c, c, 3, 2, c, deploy, DOWNSAMPLE_BN_SCALE, f"downsample{s}/dw")
            x = conv_bn(b, x, c, width, 1, 1, 1, deploy, DOWNSAMPLE_BN_SCALE, f"downsample{s}/pw")
            c = width
        for i in range(blocks):
            x = repvgg_dw(b, x, c, deploy, f"stage{s}.{i}/token_mixer")
            x = channel_mixer(b, x, c, deploy, f"stage{s}.{i}/channel_mixer")
    logits = distilled_classifier(b, x, c, deploy)
    return b.image_model(logits, batch, resolution)
