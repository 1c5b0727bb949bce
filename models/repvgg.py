"""RepVGG-A0 and RepVGG-B1g4 (Ding et al., 2021): 3x3 conv-BN + 1x1 conv-BN + identity BN, summed,
ReLU. RepVGG-B1g4 uses groupwise (4 groups) 3x3 and 1x1 convs in some layers."""

from __future__ import annotations

import onnx

from .builder import GraphBuilder, multi_branch, scaled

#: Blocks per stage (the first stage is the stem block) and widths of RepVGG-A0 (a = 0.75, b = 2.5).
A0_BLOCKS = (1, 2, 4, 14, 1)
A0_WIDTHS = (48, 48, 96, 192, 1280)

#: RepVGG-B1g4: blocks per stage, widths (min(64, 64a), 64a, 128a, 256a, 512b with a = 2, b = 4),
#: and the layers (counted over all blocks from 0, the stem block being layer 0) whose convs are
#: groupwise with ``B1G4_GROUPS`` groups: RepVGG's ``optional_groupwise_layers`` (the paper's 3rd,
#: 5th, ..., 27th layers).
B1_BLOCKS = (1, 4, 6, 16, 1)
B1_WIDTHS = (64, 128, 256, 512, 2048)
B1G4_GROUPS = 4
OPTIONAL_GROUPWISE_LAYERS = (2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26)


def repvgg_block(
    b: GraphBuilder, x: str, cin: int, cout: int, stride: int, deploy: bool, name: str, groups: int = 1
) -> str:
    """RepVGGBlock: 3x3 + 1x1 (+ identity BN when stride 1 and cin == cout), then ReLU; both convs
    with ``groups`` groups. Deploy (``switch_to_deploy``): one 3x3 Conv with bias, then ReLU."""
    identity = stride == 1 and cin == cout
    y = multi_branch(b, x, cin, cout, [3, 1], stride, groups, identity, deploy, name=name)
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
    b = GraphBuilder.for_form("repvgg_a0", deploy, seed)
    x, cin = "input", 3
    for s, (blocks, width) in enumerate(zip(A0_BLOCKS, A0_WIDTHS)):
        cout = scaled(width, width_scale)
        for i in range(blocks):
            x = repvgg_block(b, x, cin, cout, 2 if i == 0 else 1, deploy, f"stage{s}.{i}")
            cin = cout
    logits = b.classifier(x, cin)
    return b.image_model(logits, batch, resolution)


def repvgg_b1g4(
    deploy: bool = False,
    resolution: int = 224,
    batch: int | str = 1,
    seed: int = 0,
    width_scale: float = 1.0,
) -> onnx.ModelProto:
    """RepVGG-B1g4: stages of [1, 4, 6, 16, 1] blocks, widths [64, 128, 256, 512, 2048] (times
    ``width_scale``, at least 8, rounded up to a multiple of 4), stride 2 at the first block of
    every stage; the blocks at layers 2, 4, ..., 26 (RepVGG's ``g4_map``) use 4 groups;
    GlobalAveragePool, Flatten, Gemm to 1000 classes. ``deploy`` gives the fused form of the same
    parameters."""
    b = GraphBuilder.for_form("repvgg_b1g4", deploy, seed)
    x, cin, layer = "input", 3, 0
    for s, (blocks, width) in enumerate(zip(B1_BLOCKS, B1_WIDTHS)):
        cout = -(-scaled(width, width_scale) // B1G4_GROUPS) * B1G4_GROUPS
        for i in range(blocks):
            groups = B1G4_GROUPS if layer in OPTIONAL_GROUPWISE_LAYERS else 1
            x = repvgg_block(b, x, cin, cout, 2 if i == 0 else 1, deploy, f"stage{s}.{i}", groups)
            cin = cout
            layer += 1
    logits = b.classifier(x, cin)
    return b.image_model(logits, batch, resolution)
