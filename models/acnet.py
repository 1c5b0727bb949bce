"""ResNet-18 with Asymmetric Convolution Blocks (Ding et al., 2019, "ACNet").

Every 3x3 conv-BN of ResNet-18 is an ACB, the sum of three branches that all see the block input x:

    square   BN(conv3x3(x, stride, pads (1, 1)))
    hor      BN(conv1x3(x, stride, pads (0, 1)))
    ver      BN(conv3x1(x, stride, pads (1, 0)))

(ACNet's ``ACBlock`` with ``padding = kernel_size // 2``: its crop layers are identities and the
asymmetric convs pad only along their long axis, so all three outputs are aligned.)

Layout: 7x7 stride-2 conv-BN-ReLU stem (a plain conv-BN), 3x3 stride-2 MaxPool, four stages of two
BasicBlocks (widths 64, 128, 256, 512, stride 2 at the first block of stages 2-4, 1x1 conv-BN
shortcut there), each ``ReLU(ACB2(ReLU(ACB1(x))) + shortcut(x))``; GlobalAveragePool, Flatten,
Gemm.

Deploy (ACNet's ``switch_to_deploy``): each branch's BN is fused into its kernel, the 1x3 kernel is
added to the middle row and the 3x1 kernel to the middle column of the 3x3 kernel, biases summed:
one 3x3 conv with bias per ACB. The stem and shortcut conv-BNs are fused.
"""

from __future__ import annotations

import numpy as np
import onnx

from .builder import F32, GraphBuilder, conv_bn, fuse_bn, scaled

WIDTHS = (64, 128, 256, 512)
BLOCKS = (2, 2, 2, 2)
STEM_WIDTH = 64


def rect_weight(b: GraphBuilder, cout: int, cin: int, kh: int, kw: int) -> np.ndarray:
    """He-initialized ``(cout, cin, kh, kw)`` kernel."""
    std = np.sqrt(2.0 / (cin * kh * kw))
    return (b.rng.standard_normal((cout, cin, kh, kw)) * std).astype(F32)


def rect_conv(b: GraphBuilder, x: str, weight: np.ndarray, stride: int, pads: tuple[int, int], name: str) -> str:
    """A ``kh x kw`` Conv without bias, padding ``pads = (ph, pw)`` on both sides of each axis."""
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    ph, pw = pads
    return b.node(
        "Conv",
        [x, b.constant(f"{name}.weight", weight)],
        name,
        kernel_shape=[kh, kw],
        strides=[stride, stride],
        pads=[ph, pw, ph, pw],
        dilations=[1, 1],
        group=1,
    )


def ac_block(
    b: GraphBuilder,
    x: str,
    cin: int,
    cout: int,
    k: int,
    stride: int,
    deploy: bool,
    bn_scale: float = 1.0,
    name: str = "acb",
) -> str:
    """An ACB (groups 1): ``BN(convKxK(x)) + BN(conv1xK(x)) + BN(convKx1(x))``; no activation.
    Deploy: one KxK conv with bias, stride ``stride``, pad ``k // 2``."""
    p = k // 2
    s = bn_scale / np.sqrt(3.0)  # three summed branches
    # draw order: square, hor, ver (weight, then BN)
    w_square = b.conv_weight(cout, cin, k)
    bn_square = b.bn_params(cout, s)
    w_hor = rect_weight(b, cout, cin, 1, k)
    bn_hor = b.bn_params(cout, s)
    w_ver = rect_weight(b, cout, cin, k, 1)
    bn_ver = b.bn_params(cout, s)

    if not deploy:
        sq = b.batch_norm(b.conv(x, w_square, None, stride, p, 1, f"{name}/square/conv"), bn_square, f"{name}/square/bn")
        hor = b.batch_norm(rect_conv(b, x, w_hor, stride, (0, p), f"{name}/hor/conv"), bn_hor, f"{name}/hor/bn")
        ver = b.batch_norm(rect_conv(b, x, w_ver, stride, (p, 0), f"{name}/ver/conv"), bn_ver, f"{name}/ver/bn")
        return b.sum([sq, hor, ver], f"{name}/add")

    kernel, bias = fuse_bn(w_square, bn_square)
    k_hor, b_hor = fuse_bn(w_hor, bn_hor)
    k_ver, b_ver = fuse_bn(w_ver, bn_ver)
    kernel = kernel.copy()
    kernel[:, :, p : p + 1, :] += k_hor  # ACNet's _add_to_square_kernel
    kernel[:, :, :, p : p + 1] += k_ver
    bias = bias + b_hor + b_ver
    return b.conv(x, kernel.astype(F32), bias.astype(F32), stride, p, 1, f"{name}/reparam/conv")


def basic_block(b: GraphBuilder, x: str, cin: int, cout: int, stride: int, deploy: bool, name: str) -> str:
    y = ac_block(b, x, cin, cout, 3, stride, deploy, name=f"{name}/conv1")
    y = b.relu(y, f"{name}/conv1/relu")
    y = ac_block(b, y, cout, cout, 3, 1, deploy, bn_scale=0.5, name=f"{name}/conv2")
    if stride != 1 or cin != cout:
        sc = conv_bn(b, x, cin, cout, 1, stride, 1, deploy, name=f"{name}/shortcut")
    else:
        sc = x
    y = b.add(y, sc, f"{name}/residual")
    return b.relu(y, f"{name}/relu")


def acnet_resnet18(
    deploy: bool = False,
    resolution: int = 224,
    batch: int | str = 1,
    seed: int = 0,
    width_scale: float = 1.0,
) -> onnx.ModelProto:
    """ACNet-ResNet-18: every 3x3 conv-BN of ResNet-18 an Asymmetric Convolution Block (widths
    [64, 128, 256, 512] times ``width_scale``, at least 8); ``deploy`` gives the fused form of the
    same parameters."""
    b = GraphBuilder.for_form("acnet_resnet18", deploy, seed)
    c = scaled(STEM_WIDTH, width_scale)
    x = b.relu(conv_bn(b, "input", 3, c, 7, 2, 1, deploy, name="stem/conv"), "stem/relu")
    x = b.max_pool(x, 3, 2, 1, "stem/maxpool")
    for s, (blocks, width) in enumerate(zip(BLOCKS, WIDTHS)):
        cout = scaled(width, width_scale)
        for i in range(blocks):
            stride = 2 if (i == 0 and s > 0) else 1
            x = basic_block(b, x, c, cout, stride, deploy, f"stage{s + 1}.{i}")
            c = cout
    logits = b.classifier(x, c)
    return b.image_model(logits, batch, resolution)
