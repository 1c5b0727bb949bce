"""The pass registry: every module in this folder registers its pass class with :func:`register`.

Installed as ``onnxrep.passes``. A pass has a ``name``, a one-line ``summary`` and the three
stages ``match`` -> ``check`` -> ``rewrite`` described in :mod:`onnxrep.rewrite`.
"""

from __future__ import annotations

REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add a pass to the registry under ``cls.name`` (registration order is the
    default run order)."""
    if cls.name in REGISTRY:
        raise ValueError(f"pass {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


from . import (  # noqa: E402,F401  (each registers itself)
    affine_fold,
    constant_fold,
    conv_chain,
    dead_channels,
    identical_filters,
    linear_affine,
    linear_chain,
    linear_merge,
    normalize_activations,
    normalize_castlike,
    normalize_layout,
    normalize_pads,
    normalize_shifts,
    normalize_sums,
    parallel_merge,
    token_bn,
)

#: Default run order: weights computed from constants first; then sums, which take the BN of each
#: branch along (one fold per weight); then single-conv folds and chains. Every pass runs to the
#: fixed point, so the order only saves work.
ORDER = [
    "normalize-castlike",
    "normalize-sums",
    "normalize-pads",
    "normalize-layout",
    "normalize-shifts",
    "constant-fold",
    "normalize-activations",
    "parallel-merge",
    "affine-fold",
    "conv-chain",
    "token-bn",
    "linear-merge",
    "linear-affine",
    "linear-chain",
    "dead-channels",
    "identical-filters",
]
REGISTRY = {name: REGISTRY[name] for name in ORDER + [n for n in REGISTRY if n not in ORDER]}
