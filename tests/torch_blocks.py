"""Plumbing shared by the PyTorch model files of the real-export tests (``tests/torch_models.py``,
``tests/torch_models_seq.py``, ``tests/torch_models_linear.py``; no tests here).

Fusion is done in float64 (:func:`f64`) and cast back to float32 when a deploy layer is written
(:func:`deploy_conv`). :func:`randomize_bn` gives every BN layer non-trivial running statistics,
weights and biases (fixed seed); :func:`build_model` builds a registry entry in ``eval()`` mode and
:func:`deploy` returns a model's deploy form, built by its own ``switch_to_deploy()``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")  # imported by the test files after their own importorskip

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

# --------------------------------------------------------------------------------------------
# float64 fusion
# --------------------------------------------------------------------------------------------


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def bn_affine(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``BN(x) = s * x + t`` per channel, in float64."""
    s = f64(bn.weight) / (f64(bn.running_var) + bn.eps).sqrt()
    return s, f64(bn.bias) - f64(bn.running_mean) * s


def fuse_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d):
    """``BN(conv(x; W, b))`` as one conv ``(W * s, b * s + t)``, float64."""
    s, t = bn_affine(bn)
    b = torch.zeros_like(s) if bias is None else f64(bias)
    return f64(weight) * s.reshape(-1, 1, 1, 1), b * s + t


class ConvBN(nn.Sequential):
    """``Conv2d(bias=False)`` followed by ``BatchNorm2d``: one training-time branch."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0, dilation=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kernel, bias) in float64 of the conv with the BN folded in."""
        return fuse_bn(self.conv.weight, None, self.bn)


def identity_kernel(channels: int, groups: int, kernel: int = 1) -> torch.Tensor:
    """The ``kernel x kernel`` conv kernel (grouped as ``groups``) that copies its input, float64."""
    per_group = channels // groups
    w = torch.zeros(channels, per_group, kernel, kernel, dtype=torch.float64)
    for c in range(channels):
        w[c, c % per_group, kernel // 2, kernel // 2] = 1.0
    return w


def pad_to(weight: torch.Tensor, kernel: int) -> torch.Tensor:
    """Zero-pad a centred ``k x k`` kernel to ``kernel x kernel``."""
    kh, kw = weight.shape[2:]
    ph, pw = (kernel - kh) // 2, (kernel - kw) // 2
    return F.pad(weight, [pw, pw, ph, ph])


# --------------------------------------------------------------------------------------------
# deploy layers
# --------------------------------------------------------------------------------------------


def holding(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """``layer`` (with a bias) with its ``weight`` and ``bias`` set to these (cast to float32)."""
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))
        layer.bias.copy_(bias.to(layer.bias.dtype))
    return layer


def deploy_conv(cin, cout, kernel, stride, padding, weight, bias, groups=1, dilation=1) -> nn.Conv2d:
    """An ``nn.Conv2d`` with bias holding ``weight`` and ``bias`` (cast to float32)."""
    return holding(nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias=True), weight, bias)


class Deploy(nn.Module):
    """Deploy form of a block: one conv, then an optional activation."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module | None = None):
        super().__init__()
        self.conv = conv
        self.act = act if act is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.conv(x))


class Chain(nn.Module):
    """``second(first(x))``; the subclass writes the merged deploy form."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.second(self.first(x))


class Blocks(nn.Module):
    """``blocks`` applied in sequence (as ``self.blocks``); the deploy form is the sequence of the
    blocks' deploy forms."""

    def __init__(self, *blocks: nn.Module):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)

    def switch_to_deploy(self) -> nn.Module:
        return nn.Sequential(*[b.switch_to_deploy() for b in self.blocks])


# --------------------------------------------------------------------------------------------
# non-trivial parameters, build and deploy
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm1d / BatchNorm2d of ``module`` non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return module


def channel_param(*shape, mean=0.0, std=0.5) -> nn.Parameter:
    """A parameter with random non-trivial values (from the global, seeded generator)."""
    return nn.Parameter(torch.randn(*shape) * std + mean)


def build_model(family: str, *registries: dict, seed: int = 0) -> tuple[nn.Module, tuple]:
    """The training-time model of ``family`` (from the first of ``registries`` that has it: family
    -> (constructor, input shape)) in eval mode, with seeded weights and BN statistics, and its
    input shape."""
    ctor, shape = next((registry[family] for registry in registries if family in registry), (None, None))
    if ctor is None:
        raise KeyError(family)
    torch.manual_seed(seed)
    model = ctor()
    randomize_bn(model, seed + 1)
    return model.eval(), shape


def deploy(model: nn.Module) -> nn.Module:
    """The deploy form of a model from :func:`build_model`, in eval mode."""
    return model.switch_to_deploy().eval()
