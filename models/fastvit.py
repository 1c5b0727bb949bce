"""A small FastViT-style CNN (Vasu et al., 2023), the convolutional (RepMixer) variant, T8-like.

Stem: three MobileOne blocks with one conv branch (3x3 + 1x1 scale branch at stride 2; depthwise
3x3 + depthwise 1x1 at stride 2; 1x1 + identity BN), each followed by ReLU. Stages of RepMixer
blocks

    x = x + ls1 * (BN_mix(dwconv3x3(x)) - BN_norm(x))                         (RepMixer)
    x = x + ls2 * fc2(ReLU(fc1(BN(dwconv7x7(x)))))                             (ConvFFN)

with per-channel layer scales of shape ``(C, 1, 1)``, fc1 a 1x1 conv C -> 3C and fc2 3C -> C (both
with bias; the paper's GELU is a ReLU here). Stages are joined by a depthwise 3x3 stride-2 conv-BN
-ReLU and a 1x1 conv-BN-ReLU. Head: GlobalAveragePool, Flatten, Gemm.

Deploy (FastViT's ``reparameterize_model`` plus conv-BN fusion): the stem blocks become single
convs; each RepMixer becomes one depthwise 3x3 conv with
``W = I + ls1 * (W_mix - W_norm)``, ``b = ls1 * (b_mix - b_norm)`` (``W_mix, b_mix`` the fused
dwconv-BN, ``W_norm, b_norm`` the BN as a depthwise identity kernel); the ConvFFN's 7x7 conv gets
its BN folded; the downsampling convs get their BNs folded. The ConvFFN's layer-scale Mul and both
residual Adds of the ConvFFN stay, as in FastViT's own reparameterized model.
"""

from __future__ import annotations

import numpy as np
import onnx

from .builder import F32, GraphBuilder, conv_bn, fuse_bn, identity_kernel, multi_branch, scaled

#: FastViT-T8: embedding widths and RepMixer blocks per stage, ConvFFN expansion ratio.
WIDTHS = (48, 96, 192, 384)
BLOCKS = (2, 2, 4, 2)
MLP_RATIO = 3


def layer_scale(b: GraphBuilder, channels: int, low: float = 0.2, high: float = 0.6) -> np.ndarray:
    """A trained-looking per-channel layer scale (FastViT initializes it to 1e-5; a value that small
    would hide a wrong fold, so this draws O(1) values)."""
    return b.rng.uniform(low, high, channels).astype(F32)


def repmixer(b: GraphBuilder, x: str, c: int, deploy: bool, name: str) -> str:
    """``x + ls * (BN_mix(dwconv3x3(x)) - BN_norm(x))``; deploy: one depthwise 3x3 conv."""
    w_mix = b.conv_weight(c, 1, 3)
    bn_mix = b.bn_params(c)
    bn_norm = b.bn_params(c)
    ls = layer_scale(b, c)

    if not deploy:
        m = b.conv(x, w_mix, None, 1, 1, c, f"{name}/mixer/conv")
        m = b.batch_norm(m, bn_mix, f"{name}/mixer/bn")
        n = b.batch_norm(x, bn_norm, f"{name}/norm/bn")
        d = b.sub(m, n, f"{name}/sub")
        s = b.mul(b.constant(f"{name}/layer_scale", ls.reshape(c, 1, 1)), d, f"{name}/layer_scale/mul")
        return b.add(x, s, f"{name}/residual")

    k_mix, b_mix = fuse_bn(w_mix, bn_mix)
    k_norm, b_norm = fuse_bn(identity_kernel(c, c, 3), bn_norm)
    t = ls.astype(np.float64)
    kernel = identity_kernel(c, c, 3) + t.reshape(-1, 1, 1, 1) * (k_mix - k_norm)
    bias = t * (b_mix - b_norm)
    return b.conv(x, kernel.astype(F32), bias.astype(F32), 1, 1, c, f"{name}/reparam/conv")


def conv_ffn(b: GraphBuilder, x: str, c: int, deploy: bool, name: str) -> str:
    """``x + ls * fc2(ReLU(fc1(BN(dwconv7x7(x)))))``; deploy: the BN folded into the 7x7 conv."""
    hidden = MLP_RATIO * c
    w7 = b.conv_weight(c, 1, 7)
    bn7 = b.bn_params(c)
    w1 = b.conv_weight(hidden, c, 1)
    b1 = b.rng.normal(0.0, 0.01, hidden).astype(F32)
    w2 = b.conv_weight(c, hidden, 1)
    b2 = b.rng.normal(0.0, 0.01, c).astype(F32)
    ls = layer_scale(b, c)

    if not deploy:
        h = b.conv(x, w7, None, 1, 3, c, f"{name}/conv/conv")
        h = b.batch_norm(h, bn7, f"{name}/conv/bn")
    else:
        k7, c7 = fuse_bn(w7, bn7)
        h = b.conv(x, k7.astype(F32), c7.astype(F32), 1, 3, c, f"{name}/conv/reparam/conv")
    h = b.conv(h, w1, b1, 1, 0, 1, f"{name}/fc1")
    h = b.relu(h, f"{name}/act")
    h = b.conv(h, w2, b2, 1, 0, 1, f"{name}/fc2")
    h = b.mul(b.constant(f"{name}/layer_scale", ls.reshape(c, 1, 1)), h, f"{name}/layer_scale/mul")
    return b.add(x, h, f"{name}/residual")


def conv_bn_relu(b: GraphBuilder, x: str, cin: int, cout: int, k: int, stride: int, group: int, deploy: bool, name: str) -> str:
    return b.relu(conv_bn(b, x, cin, cout, k, stride, group, deploy, name=name), f"{name}/relu")


def fastvit_style(
    deploy: bool = False,
    resolution: int = 224,
    batch: int | str = 1,
    seed: int = 0,
    width_scale: float = 1.0,
) -> onnx.ModelProto:
    """FastViT-T8-like classifier: MobileOne stem (stride 4), stages of [2, 2, 4, 2] RepMixer +
    ConvFFN blocks at widths [48, 96, 192, 384] (times ``width_scale``, at least 8), stride-2
    depthwise 3x3 + 1x1 downsampling between stages; ``deploy`` gives the reparameterized form of
    the same parameters."""
    b = GraphBuilder.for_form("fastvit", deploy, seed)
    widths = [scaled(w, width_scale) for w in WIDTHS]
    c = widths[0]
    x = b.relu(multi_branch(b, "input", 3, c, [3, 1], 2, 1, False, deploy, name="stem.0"), "stem.0/relu")
    x = b.relu(multi_branch(b, x, c, c, [3, 1], 2, c, False, deploy, name="stem.1"), "stem.1/relu")
    x = b.relu(multi_branch(b, x, c, c, [1], 1, 1, True, deploy, name="stem.2"), "stem.2/relu")
    for s, (blocks, width) in enumerate(zip(BLOCKS, widths)):
        if s > 0:
            x = conv_bn_relu(b, x, c, c, 3, 2, c, deploy, f"downsample{s}/dw")
            x = conv_bn_relu(b, x, c, width, 1, 1, 1, deploy, f"downsample{s}/pw")
            c = width
        for i in range(blocks):
            x = repmixer(b, x, c, deploy, f"stage{s}.{i}/token_mixer")
            x = conv_ffn(b, x, c, deploy, f"stage{s}.{i}/convffn")
    logits = b.classifier(x, c)
    return b.image_model(logits, batch, resolution)
