"""A small RepLKNet-style network (Ding et al., 2022).

Stem: 3x3 conv-BN-ReLU at stride 2, depthwise 3x3, 1x1, depthwise 3x3 at stride 2 (each conv-BN-
ReLU). Each stage holds RepLK blocks

    x + BN(pw2( ReLU( BN(dw_KxK(h)) + BN(dw_5x5(h)) ) )),   h = ReLU(BN(pw1(x)))

and stages are joined by a 1x1 conv-BN-ReLU and a depthwise 3x3 stride-2 conv-BN-ReLU. Deploy
(``structural_reparam`` plus conv-BN fusion): the 5x5 kernel is padded into the large kernel and
every BN is folded into its conv. The residual Add stays in both forms.
"""

from __future__ import annotations

import onnx

from .builder import GraphBuilder, conv_bn, multi_branch, scaled

WIDTHS = (64, 128, 256, 512)
BLOCKS = (2, 2, 2, 1)
SMALL_KERNEL = 5


def conv_bn_relu(b: GraphBuilder, x: str, cin: int, cout: int, k: int, stride: int, group: int, deploy: bool, name: str) -> str:
    return b.relu(conv_bn(b, x, cin, cout, k, stride, group, deploy, name=name), f"{name}/relu")


def replk_block(b: GraphBuilder, x: str, c: int, kernel: int, deploy: bool, name: str) -> str:
    h = conv_bn_relu(b, x, c, c, 1, 1, 1, deploy, f"{name}/pw1")
    h = multi_branch(b, h, c, c, [kernel, SMALL_KERNEL], 1, c, False, deploy, name=f"{name}/large_kernel")
    h = b.relu(h, f"{name}/lk_relu")
    h = conv_bn(b, h, c, c, 1, deploy=deploy, bn_scale=0.5, name=f"{name}/pw2")
    return b.add(x, h, f"{name}/residual")


def replknet_style(
    deploy: bool = False,
    resolution: int = 224,
    batch: int | str = 1,
    seed: int = 0,
    width_scale: float = 1.0,
    large_kernel: int = 31,
) -> onnx.ModelProto:
    """RepLKNet-like classifier: 4 stages of widths [64, 128, 256, 512] (times ``width_scale``)
    with [2, 2, 2, 1] blocks using ``large_kernel`` x ``large_kernel`` depthwise convs (padding
    ``large_kernel // 2``) re-parameterized with a parallel 5x5."""
    if large_kernel % 2 == 0 or large_kernel < SMALL_KERNEL:
        raise ValueError(f"large_kernel must be odd and at least {SMALL_KERNEL}")
    b = GraphBuilder.for_form("replknet", deploy, seed)
    widths = [scaled(w, width_scale) for w in WIDTHS]
    c = widths[0]
    x = conv_bn_relu(b, "input", 3, c, 3, 2, 1, deploy, "stem.0")
    x = conv_bn_relu(b, x, c, c, 3, 1, c, deploy, "stem.1")
    x = conv_bn_relu(b, x, c, c, 1, 1, 1, deploy, "stem.2")
    x = conv_bn_relu(b, x, c, c, 3, 2, c, deploy, "stem.3")
    for s, (blocks, width) in enumerate(zip(BLOCKS, widths)):
        if s > 0:
            x = conv_bn_relu(b, x, c, width, 1, 1, 1, deploy, f"transition{s}/pw")
            x = conv_bn_relu(b, x, width, width, 3, 2, width, deploy, f"transition{s}/dw")
            c = width
        for i in range(blocks):
            x = replk_block(b, x, c, large_kernel, deploy, f"stage{s}.{i}")
    logits = b.classifier(x, c)
    return b.image_model(logits, batch, resolution)
