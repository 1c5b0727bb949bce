"""Model builders: synthetic re-parameterizable CNNs in their training and deploy forms.

Pure numpy + ``onnx.helper``; the deploy forms come from this package's own fusion code
(:mod:`.builder`), never from onnxrep. Every builder takes ``deploy``, ``resolution``, ``batch``
(an int, or a string for a symbolic batch dim), ``seed`` and ``width_scale`` and returns a checked
opset-17 ``onnx.ModelProto`` with input ``"input"`` ``[batch, 3, resolution, resolution]`` and
output ``"logits"`` ``[batch, 1000]``. Training and deploy forms built with the same seed hold the
same parameters and compute the same function.
"""

from __future__ import annotations

from .acnet import acnet_resnet18
from .builder import BNParams, GraphBuilder, conv_bn, fuse_bn, identity_kernel, multi_branch, pad_center
from .dbb import dbb_resnet18
from .fastvit import fastvit_style
from .mobileone import mobileone_s0
from .replknet import replknet_style
from .repvgg import repvgg_a0, repvgg_b1g4
from .repvit import repvit_style
from .resrep import resrep_pruned, resrep_style

BUILDERS = {
    "repvgg-a0": repvgg_a0,
    "mobileone-s0": mobileone_s0,
    "replknet": replknet_style,
    "fastvit": fastvit_style,
    "dbb-resnet18": dbb_resnet18,
    "resrep": resrep_style,
    "repvgg-b1g4": repvgg_b1g4,
    "acnet-resnet18": acnet_resnet18,
    "repvit": repvit_style,
    "resrep-pruned": resrep_pruned,
}

__all__ = [
    "BUILDERS",
    "BNParams",
    "GraphBuilder",
    "conv_bn",
    "fuse_bn",
    "identity_kernel",
    "multi_branch",
    "pad_center",
    "acnet_resnet18",
    "dbb_resnet18",
    "fastvit_style",
    "mobileone_s0",
    "replknet_style",
    "repvgg_a0",
    "repvgg_b1g4",
    "repvit_style",
    "resrep_pruned",
    "resrep_style",
]
