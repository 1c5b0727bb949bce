"""A VGG-style network with ResRep compactors (Ding et al., 2021).

Every layer is ``ReLU(P @ BN(conv3x3(x)))``: a 3x3 conv-BN followed by a compactor, a 1x1 conv
C -> C without bias whose matrix ``P`` is random and well conditioned (``U diag(s) V^T`` with ``U``,
``V`` random orthogonal and ``s`` in [0.5, 1.5]; a trained compactor before pruning). Stages of
[2, 2, 3, 3] layers at widths [64, 128, 256, 512], the first layer of each stage at stride 2.
Head: GlobalAveragePool, Flatten, Gemm.

Deploy (ResRep's conversion, without pruning): the BN is folded into the 3x3 conv, then the
compactor into its output channels, ``W' = P @ W`` (over the output-channel axis), ``b' = P @ b``:
one 3x3 conv with bias, then ReLU, per layer.

Pruned (``resrep_pruned``, what ResRep's training ends in): in every layer a fraction ``prune`` of
the compactor's rows (drawn at random) is exactly zero. Those output channels hold ``P[o] @ b =
0`` everywhere, and ``ReLU(0) = 0``, so the deploy form drops them: each layer keeps only its live
rows of ``P @ W`` and reads only the previous layer's live channels, and the classifier reads only
the last layer's.
"""

from __future__ import annotations

import numpy as np
import onnx

from .builder import F32, GraphBuilder, fuse_bn, scaled

WIDTHS = (64, 128, 256, 512)
LAYERS = (2, 2, 3, 3)


def compactor_matrix(b: GraphBuilder, channels: int, low: float = 0.5, high: float = 1.5) -> np.ndarray:
    """A random ``(channels, channels)`` matrix with singular values in ``[low, high]``."""
    u, _ = np.linalg.qr(b.rng.standard_normal((channels, channels)))
    v, _ = np.linalg.qr(b.rng.standard_normal((channels, channels)))
    s = b.rng.uniform(low, high, channels)
    return ((u * s) @ v.T).astype(F32)


def compactor_layer(
    b: GraphBuilder,
    x: str,
    cin: int,
    cout: int,
    stride: int,
    deploy: bool,
    name: str,
    prune: float = 0.0,
    live_in: np.ndarray | None = None,
) -> tuple[str, np.ndarray]:
    """conv3x3 -> BN -> compactor (1x1, no bias) -> ReLU; deploy: one 3x3 conv with bias -> ReLU.

    With ``prune``, that fraction of the compactor's rows is zero; the deploy conv then has only
    the live output channels and reads only ``live_in`` (the previous layer's live channels).
    Returns the output and the indices of its live channels."""
    w = b.conv_weight(cout, cin, 3)
    bn = b.bn_params(cout)
    p = compactor_matrix(b, cout)
    live = np.arange(cout)
    if prune > 0:
        dead = b.rng.choice(cout, int(round(prune * cout)), replace=False)
        p[dead] = 0
        live = np.setdiff1d(live, dead)
    live_in = np.arange(cin) if live_in is None else live_in

    if not deploy:
        y = b.conv(x, w, None, stride, 1, 1, f"{name}/conv")
        y = b.batch_norm(y, bn, f"{name}/bn")
        y = b.conv(y, p.reshape(cout, cout, 1, 1), None, 1, 0, 1, f"{name}/compactor")
    else:
        k, c = fuse_bn(w, bn)
        p64 = p.astype(np.float64)
        kernel = np.einsum("oc,cihw->oihw", p64, k, optimize=True)
        bias = p64 @ c
        kernel, bias = kernel[live][:, live_in], bias[live]
        y = b.conv(x, kernel.astype(F32), bias.astype(F32), stride, 1, 1, f"{name}/reparam/conv")
    return b.relu(y, f"{name}/relu"), live


def resrep_style(
    deploy: bool = False,
    resolution: int = 224,
    batch: int | str = 1,
    seed: int = 0,
    width_scale: float = 1.0,
    prune: float = 0.0,
) -> onnx.ModelProto:
    """VGG-like classifier whose every conv3x3-BN is followed by a ResRep compactor; ``deploy``
    gives the folded form (one 3x3 conv per layer) of the same parameters; ``prune``: the fraction
    of every compactor's rows that is zero (dropped in the deploy form)."""
    b = GraphBuilder.for_form("resrep", deploy, seed)
    x, cin = "input", 3
    live = None
    for s, (layers, width) in enumerate(zip(LAYERS, WIDTHS)):
        cout = scaled(width, width_scale)
        for i in range(layers):
            x, live = compactor_layer(b, x, cin, cout, 2 if i == 0 else 1, deploy, f"stage{s}.{i}", prune, live)
            cin = cout
    logits = b.classifier(x, cin, live=live if deploy else None)
    return b.image_model(logits, batch, resolution)


def resrep_pruned(
    deploy: bool = False,
    resolution: int = 224,
    batch: int | str = 1,
    seed: int = 0,
    width_scale: float = 1.0,
) -> onnx.ModelProto:
    """:func:`resrep_style` with half of every compactor's rows pruned to zero."""
    return resrep_style(deploy, resolution, batch, seed, width_scale, prune=0.5)
