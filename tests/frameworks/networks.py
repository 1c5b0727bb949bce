"""The small re-parameterizable networks that ``export_keras.py``, ``export_flax.py`` and
``export_paddle.py`` build in each framework's own style, and what their deploy form has.

Every network reads one image of ``CHANNELS`` channels and ``SIZE x SIZE`` pixels (NHWC in
Keras and Flax, NCHW in Paddle) and is written the way a port of the PyTorch block to that
framework writes it: ``padding="same"`` where the framework has it, explicit zero pads, padding
rings built from what the framework can pad with, BatchNorm layers in inference mode with
randomized statistics (moving mean and variance, gamma and beta: no fold is an identity).

``DEPLOY`` gives, per network, the compute ops of its re-parameterized single-path form (what
``switch_to_deploy`` leaves): ``conv`` Conv nodes, ``linear`` Gemm/MatMul nodes, and no
BatchNormalization. The export scripts copy it into the manifest; the test
(``tests/test_framework_exports.py``) holds onnxrep's output to it.

This module needs numpy only.
"""

from __future__ import annotations

import datetime
import json
import os

import numpy as np

CHANNELS = 8
WIDE = 16
SIZE = 16
CLASSES = 10
SEED = 0

#: name -> (what it is, deploy counts)
NETWORKS = {
    "repvgg_s1": ("RepVGG block, stride 1: BN(3x3 same) + BN(1x1) + BN(identity), ReLU", {"conv": 1, "linear": 0}),
    "repvgg_s2": ("RepVGG block, stride 2, 8 -> 16 channels: BN(3x3 same) + BN(1x1), ReLU", {"conv": 1, "linear": 0}),
    "repvgg_stack": ("a stride-2 RepVGG block, then a stride-1 one (Transposes meet between blocks)", {"conv": 2, "linear": 0}),
    "acnet": ("ACNet block: BN(3x3) + BN(1x3) + BN(3x1), all same padding, ReLU", {"conv": 1, "linear": 0}),
    "mobileone": ("MobileOne block (k=2): depthwise 3x3 x2 + depthwise 1x1 + BN identity, ReLU; then "
                  "pointwise 1x1 x2 + BN identity, ReLU", {"conv": 2, "linear": 0}),
    "dbb": ("DBB block: BN(3x3) + BN(1x1) + BN(1x1 -> BN -> ring -> 3x3 valid) + BN(1x1 -> BN -> ring -> avg-pool 3x3), "
            "ReLU; the ring is the BN's value at zero", {"conv": 1, "linear": 0}),
    "residual": ("residual: ReLU(x + BN(3x3(x)))", {"conv": 1, "linear": 0}),
    "conv_bn": ("two conv -> BN layers (the first with a bias) with a ReLU between", {"conv": 2, "linear": 0}),
    "head": ("classifier: 3x3 conv, ReLU, global average pool, BN, Dense", {"conv": 1, "linear": 1}),
}


def rng(name: str) -> np.random.Generator:
    """A generator per network (same weights whatever order the networks are built in)."""
    return np.random.default_rng([SEED, sum(ord(c) * (i + 1) for i, c in enumerate(name))])


def bn_stats(r: np.random.Generator, c: int) -> dict[str, np.ndarray]:
    """Randomized BatchNorm parameters and statistics: gamma, beta, moving mean, moving variance."""
    return {
        "gamma": r.uniform(0.5, 1.5, c).astype(np.float32),
        "beta": r.normal(0.0, 0.2, c).astype(np.float32),
        "mean": r.normal(0.0, 0.2, c).astype(np.float32),
        "var": r.uniform(0.5, 2.0, c).astype(np.float32),
    }


def bn_at_zero(stats: dict[str, np.ndarray], eps: float) -> np.ndarray:
    """What a BatchNorm in inference mode gives for an input of 0: the value of a DBB padding ring."""
    return (stats["beta"] - stats["mean"] * stats["gamma"] / np.sqrt(stats["var"] + eps)).astype(np.float32)


def weights(r: np.random.Generator, shape, fan_in: int) -> np.ndarray:
    return (r.normal(0.0, 1.0, shape) / np.sqrt(fan_in)).astype(np.float32)


def write_manifest(folder: str, exporter: str, framework: dict[str, str], files: dict[str, str],
                   failures: dict[str, str] | None = None, repairs: dict[str, str] | None = None) -> str:
    """``folder/manifest.json``: exporter, versions, date and, per file, its network's deploy counts;
    ``failures``: the networks the exporter could not export correctly, with the error; ``repairs``:
    what was changed in an export so that onnxruntime loads it."""
    entry = {
        "exporter": exporter,
        "versions": framework,
        "date": datetime.date.today().isoformat(),
        "input": {"channels": CHANNELS, "size": SIZE},
        "networks": {
            name: {"file": files[name], "what": NETWORKS[name][0], "deploy": NETWORKS[name][1]}
            for name in NETWORKS if name in files
        },
        "export_failures": dict(failures or {}),
        "repairs": dict(repairs or {}),
    }
    path = os.path.join(folder, "manifest.json")
    with open(path, "w") as f:
        json.dump(entry, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def data_folder(exporter: str) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    folder = os.path.join(here, "..", "data", "frameworks", exporter)
    os.makedirs(folder, exist_ok=True)
    return os.path.normpath(folder)
