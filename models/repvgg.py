"""RepVGG-A0 (Ding et al., 2021): 3x3 conv-BN + 1x1 conv-BN + identity BN, summed, ReLU."""

from __future__ import annotations

import onnx

from .builder import GraphBuilder, multi_branch, scaled

#: Blocks per stage (the first stage is the stem block) and widths of RepVGG-A0 (a = 0.75, b = 2.5).
A0_BLOCKS = (1, 2, 4, 14, 1)
A0_WIDTHS = (48, 48, 96, 192, 1280)


def repvgg_block(b: GraphBuilder, x: str, cin: int, cout: int, stride: int, deploy: bool, name: str) -> str:
    """RepVGGBlock: 3x3 + 1x1 (+ identity BN when stride 1 and cin == cout), then ReLU.
    Deploy (``switch_to_deploy``): one 3x3 Conv with bias, then ReLU."""
    identity = stride == 1 and cin == cout
    y = multi_branch(b, x, cin, cout, [3, 1], stride, 1, identity, deploy, name=name)
    return b.relu(y, f"{name}/relu")


def repvgg_a0(
    deploy: bool = False,
    resolution: int = 224,
    batch: int | str = 1,
    seed: int = 0,
    width_scale: float = 1.0,
) -> onnx.ModelProto:
    """RepVGG-A0: stages of [1, 2, 4, 14, 1] blocks, widths [48, 48, 96, 192, 1280] (times
    ``width_scale``, at least 8), stride 2 at the first block of every stage; GlobalAveragePool,
    Flatten, Gemm to 1000 classes. ``deploy`` gives the fused form of the same parameters."""
    b = GraphBuilder(seed, "repvgg_a0" + ("_deploy" if deploy else "_train"))
    x, cin = "input", 3
    for s, (blocks, width) in enumerate(zip(A0_BLOCKS, A0_WIDTHS)):
        cout = scaled(width, width_scale)
        for i in range(blocks):
            x = repvgg_block(b, x, cin, cout, 2 if i == 0 else 1, deploy, f"stage{s}.{i}")
            cin = cout
    logits = b.classifier(x, cin)
    return b.build("input", [batch, 3, resolution, resolution], logits, "logits", [batch, 1000])
