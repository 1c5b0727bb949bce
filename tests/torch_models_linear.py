"""Small PyTorch training-time blocks of the linear-layer (Gemm / MatMul) re-parameterizable
families, each with its own deploy form.

Test-only helpers for ``tests/test_torch_exports_linear.py`` (no tests here); the conv families
live in ``tests/torch_models.py`` and ``tests/torch_models_seq.py``. Every block is written the way
the original code writes it (RepViT's ``BN_Linear`` heads averaged in eval mode, a DeiT block
depth-pruned by UPDP with its BN applied to tokens through ``transpose(1, 2)``, ...).
``switch_to_deploy()`` returns a NEW module (the training-time module is left untouched): one
``nn.Linear`` built with the classic recipe, independently of onnxrep, in float64 and cast back to
float32 when the deploy linear is written.

Families: RepViT classifier head (BN_Linear + distillation head), depth-pruned DeiT MLP block
(UPDP), an MLP without activation, a layer-scaled residual linear, RepMLP-style parallel linears,
Linear -> BN. Inputs are ``[N, C]`` (TorchScript exports Gemm) or tokens ``[B, L, C]``
(MatMul + Add). :data:`NEGATIVE` holds the blocks that must NOT be merged; their deploy form is
themselves. ``neg_weight_input`` takes two inputs ``(x, w)``: its input shape is a pair of shapes.

The float64 BN affine, the seeded BN statistics and :func:`build` (every model in ``eval()``
mode) come from ``tests/torch_blocks.py``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")  # imported by tests/test_torch_exports_linear.py after its own importorskip

from torch import nn  # noqa: E402
from torch_blocks import Chain, bn_affine, build_model, channel_param, f64, holding  # noqa: E402

# --------------------------------------------------------------------------------------------
# helpers (float64 fusion; the shared ones are in tests/torch_blocks.py)
# --------------------------------------------------------------------------------------------


def linear_params(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight ``(out, in)``, bias ``(out,)``) of ``linear`` in float64 (zero bias if it has none)."""
    w = f64(linear.weight)
    b = torch.zeros(w.shape[0], dtype=torch.float64) if linear.bias is None else f64(linear.bias)
    return w, b


def bn_then_linear(bn: nn.BatchNorm1d, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear(BN(x))`` as one linear ``(W * s, W @ t + b)``, float64 (RepViT's ``BN_Linear.fuse``)."""
    s, t = bn_affine(bn)
    w, b = linear_params(linear)
    return w * s.reshape(1, -1), w @ t + b


def linear_then_bn(linear: nn.Linear, bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """``BN(linear(x))`` as one linear ``(W * s[:, None], b * s + t)``, float64."""
    s, t = bn_affine(bn)
    w, b = linear_params(linear)
    return w * s.reshape(-1, 1), b * s + t


def compose(w1, b1, w2, b2) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear2(linear1(x))`` as one linear ``(W2 @ W1, W2 @ b1 + b2)``."""
    return w2 @ w1, w2 @ b1 + b2


def deploy_linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` with bias holding ``weight`` ``(out, in)`` and ``bias`` (cast to float32)."""
    cout, cin = weight.shape
    return holding(nn.Linear(cin, cout, bias=True), weight, bias)


def trained_linear(cin: int, cout: int, bias: bool = True) -> nn.Linear:
    """``nn.Linear`` with random non-trivial weights and bias (RepViT/DeiT init the bias to zero
    and the weight with std 0.02; trained ones are not like that)."""
    linear = nn.Linear(cin, cout, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(cout, cin) / cin**0.5)
        if bias:
            linear.bias.copy_(torch.randn(cout) * 0.5)
    return linear


# --------------------------------------------------------------------------------------------
# RepViT classifier head (BN_Linear + distillation head)
# --------------------------------------------------------------------------------------------


class BNLinear(nn.Sequential):
    """RepViT's ``BN_Linear``: ``BatchNorm1d`` then ``Linear`` (with bias)."""

    def __init__(self, a, b):
        super().__init__()
        self.bn = nn.BatchNorm1d(a)
        self.l = trained_linear(a, b)  # noqa: E741  (the original's name)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        return bn_then_linear(self.bn, self.l)


class RepViTClassifier(nn.Module):
    """RepViT's ``Classfier`` with distillation: two ``BN_Linear`` heads on the pooled features
    ``[N, C]``, averaged in eval mode, as the original does."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.classifier = BNLinear(dim, num_classes)
        self.classifier_dist = BNLinear(dim, num_classes)

    def forward(self, x):
        x = self.classifier(x), self.classifier_dist(x)
        if not self.training:
            x = (x[0] + x[1]) / 2
        return x

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        w, b = self.classifier.fused()
        wd, bd = self.classifier_dist.fused()
        return deploy_linear((w + wd) / 2, (b + bd) / 2)


# --------------------------------------------------------------------------------------------
# DeiT MLP block after UPDP depth pruning
# --------------------------------------------------------------------------------------------


class TokenBN(nn.Module):
    """BatchNorm1d over the channels of tokens ``[B, L, C]``: ``bn(x.transpose(1, 2)).transpose(1, 2)``."""

    def __init__(self, dim):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x):
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class PrunedDeiTMlpBlock(nn.Module):
    """``x + fc2(fc1(BN(x)))`` on tokens: DeiT's ``x + mlp(norm2(x))`` with the attention branch
    pruned, LayerNorm replaced by BN and GELU by the identity (UPDP). Deploy: ONE C->C linear
    with the identity folded in, ``y = x @ (I + W)^T + b``."""

    def __init__(self, dim, mlp_ratio=4):
        super().__init__()
        self.dim = dim
        self.norm2 = TokenBN(dim)
        self.fc1 = trained_linear(dim, mlp_ratio * dim)
        self.act = nn.Identity()
        self.fc2 = trained_linear(mlp_ratio * dim, dim)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        w, b = bn_then_linear(self.norm2.bn, self.fc1)
        w, b = compose(w, b, *linear_params(self.fc2))
        return deploy_linear(torch.eye(self.dim, dtype=torch.float64) + w, b)


# --------------------------------------------------------------------------------------------
# token MLP without activation
# --------------------------------------------------------------------------------------------


class LinearChain(Chain):
    """``second(first(x))``, both plain ``nn.Linear``; merged into one linear."""

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        return deploy_linear(*compose(*linear_params(self.first), *linear_params(self.second)))


# --------------------------------------------------------------------------------------------
# layer-scaled residual linear
# --------------------------------------------------------------------------------------------


class LayerScaleResidual(nn.Module):
    """``x + gamma * fc(x)`` on tokens, ``gamma`` a per-channel ``(C,)`` layer scale."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.fc = trained_linear(dim, dim)
        self.gamma = channel_param(dim, mean=0.5, std=0.3)  # trained, not the 1e-5 init

    def forward(self, x):
        return x + self.gamma * self.fc(x)

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        w, b = linear_params(self.fc)
        g = f64(self.gamma)
        return deploy_linear(torch.eye(self.dim, dtype=torch.float64) + g.reshape(-1, 1) * w, g * b)


# --------------------------------------------------------------------------------------------
# RepMLP-style parallel linears
# --------------------------------------------------------------------------------------------


class ParallelLinear(nn.Module):
    """``fc_a(x) + fc_b(x) - 0.5 * fc_c(x)``: three linears reading one tensor."""

    def __init__(self, cin, cout):
        super().__init__()
        self.fc_a = trained_linear(cin, cout)
        self.fc_b = trained_linear(cin, cout)
        self.fc_c = trained_linear(cin, cout)

    def forward(self, x):
        return self.fc_a(x) + self.fc_b(x) - 0.5 * self.fc_c(x)

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        (wa, ba), (wb, bb), (wc, bc) = (linear_params(m) for m in (self.fc_a, self.fc_b, self.fc_c))
        return deploy_linear(wa + wb - 0.5 * wc, ba + bb - 0.5 * bc)


# --------------------------------------------------------------------------------------------
# Linear -> BN
# --------------------------------------------------------------------------------------------


class LinearBN(nn.Module):
    """``BatchNorm1d(linear(x))`` on ``[N, C]``."""

    def __init__(self, cin, cout):
        super().__init__()
        self.fc = trained_linear(cin, cout)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        return self.bn(self.fc(x))

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        return deploy_linear(*linear_then_bn(self.fc, self.bn))


# --------------------------------------------------------------------------------------------
# negative cases: must NOT be merged
# --------------------------------------------------------------------------------------------


class GeluMlp(nn.Module):
    """``fc2(GELU(fc1(x)))``: the activation between makes the pair non-linear."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = trained_linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = trained_linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class WeightInput(nn.Module):
    """``fc(x @ w)`` with ``w`` a graph input: the product with a non-constant weight can be
    neither folded nor composed with ``fc``."""

    def __init__(self, dim):
        super().__init__()
        self.fc = trained_linear(dim, dim)

    def forward(self, x, w):
        return self.fc(x @ w)


def _bottleneck() -> nn.Module:
    # merging would make a C x C matrix (C^2 MACs per row) out of C -> C/4 -> C (C^2 / 2)
    return LinearChain(trained_linear(32, 8), trained_linear(8, 32))


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

#: family -> (constructor, input shape (N, C) or tokens (B, L, C)); every model has ``switch_to_deploy``
FAMILIES = {
    "repvit_head": (lambda: RepViTClassifier(32, 10), (2, 32)),
    "deit_pruned": (lambda: PrunedDeiTMlpBlock(16), (2, 7, 16)),
    "mlp_no_act": (lambda: LinearChain(trained_linear(24, 96), trained_linear(96, 24)), (2, 7, 24)),
    "layerscale_residual": (lambda: LayerScaleResidual(16), (2, 7, 16)),
    "parallel_linear": (lambda: ParallelLinear(24, 32), (2, 24)),
    "bn_after_linear": (lambda: LinearBN(24, 32), (2, 24)),
}

#: family -> (constructor, input shape, or a tuple of input shapes for several inputs): blocks
#: that must be left as they are
NEGATIVE = {
    "neg_gelu_between": (lambda: GeluMlp(16, 64), (2, 7, 16)),
    "neg_weight_input": (lambda: WeightInput(24), ((2, 24), (24, 24))),
    "neg_bottleneck": (_bottleneck, (2, 32)),
}


def build(family: str, seed: int = 0) -> tuple[nn.Module, tuple]:
    """The training-time model of ``family`` (from :data:`FAMILIES` or :data:`NEGATIVE`) in eval
    mode, with seeded weights and BN statistics, and its input shape (or shapes)."""
    return build_model(family, FAMILIES, NEGATIVE, seed=seed)
