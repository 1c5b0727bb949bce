"""MobileOne-S0 (Vasu et al., 2023), k = 4 over-parameterized branches.

Every block is a depthwise part (4 depthwise 3x3 conv-BN, a depthwise 1x1 conv-BN "scale" branch
and an identity BN when stride 1, summed, ReLU) followed by a pointwise part (4 1x1 conv-BN and an
identity BN when Cin == Cout, summed, ReLU). The stem is a MobileOneBlock with one 3x3 branch and
the 1x1 scale branch at stride 2.
"""

from __future__ import annotations

import onnx

from .builder import GraphBuilder, multi_branch, scaled

#: MobileOne-S0: stem width min(64, 64 * 0.75) = 48; stages of 64 * 0.75, 128, 256, 512 * 2
#: channels with [2, 8, 10, 1] blocks, the first of each at stride 2.
S0_STEM = 48
S0_WIDTHS = (48, 128, 256, 1024)
S0_BLOCKS = (2, 8, 10, 1)
S0_BRANCHES = 4


def mobileone_block(
    b: GraphBuilder, x: str, cin: int, cout: int, stride: int, branches: int, deploy: bool, name: str
) -> str:
    dw = multi_branch(
        b, x, cin, cin, [3] * branches + [1], stride, cin, stride == 1, deploy, name=f"{name}/dw"
    )
    dw = b.relu(dw, f"{name}/dw/relu")
    pw = multi_branch(b, dw, cin, cout, [1] * branches, 1, 1, cin == cout, deploy, name=f"{name}/pw")
    return b.relu(pw, f"{name}/pw/relu")


def mobileone_s0(
    deploy: bool = False,
    resolution: int = 224,
    batch: int | str = 1,
    seed: int = 0,
    width_scale: float = 1.0,
) -> onnx.ModelProto:
    """MobileOne-S0-style classifier; ``deploy`` gives the fused form of the same parameters."""
    b = GraphBuilder.for_form("mobileone_s0", deploy, seed)
    cin = scaled(S0_STEM, width_scale)
    x = multi_branch(b, "input", 3, cin, [3, 1], 2, 1, False, deploy, name="stage0")
    x = b.relu(x, "stage0/relu")
    for s, (blocks, width) in enumerate(zip(S0_BLOCKS, S0_WIDTHS), start=1):
        cout = scaled(width, width_scale)
        for i in range(blocks):
            x = mobileone_block(b, x, cin, cout, 2 if i == 0 else 1, S0_BRANCHES, deploy, f"stage{s}.{i}")
            cin = cout
    logits = b.classifier(x, cin)
    return b.image_model(logits, batch, resolution)
