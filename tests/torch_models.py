"""Small PyTorch training-time blocks of re-parameterizable CNNs, each with its own deploy form.

Test-only helpers for ``tests/test_torch_exports.py`` (no tests here). Every block is written the
way the original papers' code writes it: branches of ``Conv2d(bias=False) + BatchNorm2d`` (and a
bare ``BatchNorm2d`` identity branch) summed. ``switch_to_deploy()`` returns a NEW module (the
training-time module is left untouched) built with the classic recipe, independently of onnxrep:
fuse each BN into its conv, pad small kernels to the big one with ``F.pad`` (or place them on the
dilated grid), write the identity branch as a kernel, and sum.

Families: RepVGG (plain, stride 2 without identity, grouped as in RepVGG-B1g4), ACNet, MobileOne
(depthwise and pointwise halves), RepLKNet, RepGhost, dilated branches.

``ConvBN``, the BN fusion (float64, cast back to float32 in the deploy conv) and the build
plumbing come from ``tests/torch_blocks.py``: :func:`build` returns every model in ``eval()`` mode
with seeded, non-trivial BN statistics.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")  # imported by tests/test_torch_exports.py after its own importorskip

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch_blocks import (  # noqa: E402
    Blocks,
    ConvBN,
    Deploy,
    build_model,
    deploy_conv,
    fuse_bn,
    identity_kernel,
    pad_to,
)

# --------------------------------------------------------------------------------------------
# RepVGG
# --------------------------------------------------------------------------------------------


class RepVGGBlock(nn.Module):
    """3x3 conv+BN + 1x1 conv+BN (+ identity BN when ``cin == cout`` and stride 1), then ReLU."""

    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.cin, self.cout, self.stride, self.groups = cin, cout, stride, groups
        self.dense = ConvBN(cin, cout, 3, stride, 1, groups=groups)
        self.one = ConvBN(cin, cout, 1, stride, 0, groups=groups)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.dense(x) + self.one(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        w3, b3 = self.dense.fused()
        w1, b1 = self.one.fused()
        w, b = w3 + pad_to(w1, 3), b3 + b1
        if self.identity is not None:
            wi, bi = fuse_bn(identity_kernel(self.cin, self.groups, 3), None, self.identity)
            w, b = w + wi, b + bi
        conv = deploy_conv(self.cin, self.cout, 3, self.stride, 1, w, b, groups=self.groups)
        return Deploy(conv, nn.ReLU())


class RepVGGNet(Blocks):
    """A stride-2 stem block without identity, a plain block, and grouped blocks with identity."""

    def __init__(self, cin=3, width=16):
        super().__init__(
            RepVGGBlock(cin, width, stride=2),
            RepVGGBlock(width, width),
            RepVGGBlock(width, width, groups=4),  # RepVGG-B1g4 style
            RepVGGBlock(width, width, groups=2),
            RepVGGBlock(width, 2 * width, stride=2, groups=2),
        )


# --------------------------------------------------------------------------------------------
# ACNet
# --------------------------------------------------------------------------------------------


class ACBlock(nn.Module):
    """Asymmetric convolution block: 3x3 + 1x3 (padding (0, 1)) + 3x1 (padding (1, 0)), each + BN."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride
        self.square = ConvBN(cin, cout, (3, 3), stride, (1, 1))
        self.hor = ConvBN(cin, cout, (1, 3), stride, (0, 1))
        self.ver = ConvBN(cin, cout, (3, 1), stride, (1, 0))

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        ws, bs = self.square.fused()
        wh, bh = self.hor.fused()
        wv, bv = self.ver.fused()
        w = ws + F.pad(wh, [0, 0, 1, 1]) + F.pad(wv, [1, 1, 0, 0])
        return Deploy(deploy_conv(self.cin, self.cout, 3, self.stride, 1, w, bs + bh + bv))


class ACNet(nn.Module):
    def __init__(self, cin=8, width=16):
        super().__init__()
        self.a = ACBlock(cin, width)
        self.b = ACBlock(width, width, stride=2)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.b(self.act(self.a(x)))

    def switch_to_deploy(self) -> nn.Module:
        a, b = self.a.switch_to_deploy(), self.b.switch_to_deploy()
        return nn.Sequential(a, nn.ReLU(), b)


# --------------------------------------------------------------------------------------------
# MobileOne
# --------------------------------------------------------------------------------------------


class MobileOneBlock(nn.Module):
    """``n`` parallel kxk conv+BN branches, a 1x1 conv+BN scale branch (when k > 1) and an identity
    BN (when ``cin == cout`` and stride 1), summed, then ReLU. Depthwise when ``groups == cin``."""

    def __init__(self, cin, cout, kernel, stride=1, groups=1, n=3):
        super().__init__()
        self.cin, self.cout, self.kernel, self.stride, self.groups = cin, cout, kernel, stride, groups
        self.convs = nn.ModuleList(ConvBN(cin, cout, kernel, stride, kernel // 2, groups=groups) for _ in range(n))
        self.scale = ConvBN(cin, cout, 1, stride, 0, groups=groups) if kernel > 1 else None
        self.skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        # the order of the original: identity, scale, then the kxk branches
        out = self.skip(x) if self.skip is not None else None
        if self.scale is not None:
            out = self.scale(x) if out is None else out + self.scale(x)
        for conv in self.convs:
            out = conv(x) if out is None else out + conv(x)
        return self.act(out)

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        k = self.kernel
        w = torch.zeros(self.cout, self.cin // self.groups, k, k, dtype=torch.float64)
        b = torch.zeros(self.cout, dtype=torch.float64)
        for conv in self.convs:
            wc, bc = conv.fused()
            w, b = w + wc, b + bc
        if self.scale is not None:
            ws, bs = self.scale.fused()
            w, b = w + pad_to(ws, k), b + bs
        if self.skip is not None:
            wi, bi = fuse_bn(identity_kernel(self.cin, self.groups, k), None, self.skip)
            w, b = w + wi, b + bi
        conv = deploy_conv(self.cin, self.cout, k, self.stride, k // 2, w, b, groups=self.groups)
        return Deploy(conv, nn.ReLU())


class MobileOneNet(Blocks):
    """Depthwise 3x3 half then pointwise 1x1 half, twice (the second depthwise one with stride 2)."""

    def __init__(self, channels=16, n=3):
        c = channels
        super().__init__(
            MobileOneBlock(c, c, 3, groups=c, n=n),
            MobileOneBlock(c, c, 1, n=n),
            MobileOneBlock(c, c, 3, stride=2, groups=c, n=n),
            MobileOneBlock(c, c, 1, n=n),
        )


# --------------------------------------------------------------------------------------------
# RepLKNet
# --------------------------------------------------------------------------------------------


class RepLKBlock(nn.Module):
    """Depthwise ``large x large`` conv+BN + depthwise ``small x small`` conv+BN, summed.

    RepLKNet uses 31x31 with a 5x5 companion; the tests use 13x13 for speed and one 31x31 case.
    """

    def __init__(self, channels, large=13, small=5):
        super().__init__()
        self.c, self.large, self.small = channels, large, small
        self.lk = ConvBN(channels, channels, large, 1, large // 2, groups=channels)
        self.sk = ConvBN(channels, channels, small, 1, small // 2, groups=channels)

    def forward(self, x):
        return self.lk(x) + self.sk(x)

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        wl, bl = self.lk.fused()
        ws, bs = self.sk.fused()
        w = wl + pad_to(ws, self.large)
        conv = deploy_conv(self.c, self.c, self.large, 1, self.large // 2, w, bl + bs, groups=self.c)
        return Deploy(conv)


class RepLKNet(nn.Module):
    """1x1 conv, ReLU, the large-kernel block, ReLU, 1x1 conv (as in RepLKNet's block body)."""

    def __init__(self, channels=16, large=13, small=5):
        super().__init__()
        self.pw1 = nn.Conv2d(channels, channels, 1)
        self.lk = RepLKBlock(channels, large, small)
        self.pw2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return self.pw2(F.relu(self.lk(F.relu(self.pw1(x)))))

    def switch_to_deploy(self) -> nn.Module:
        net = RepLKNetDeploy(self.pw1, self.lk.switch_to_deploy(), self.pw2)
        return net


class RepLKNetDeploy(nn.Module):
    def __init__(self, pw1, lk, pw2):
        super().__init__()
        self.pw1, self.lk, self.pw2 = pw1, lk, pw2

    def forward(self, x):
        return self.pw2(F.relu(self.lk(F.relu(self.pw1(x)))))


# --------------------------------------------------------------------------------------------
# RepGhost
# --------------------------------------------------------------------------------------------


class RepGhostModule(nn.Module):
    """Primary 1x1 conv+BN+ReLU, then the cheap depthwise 3x3 conv+BN plus the fusion (identity)
    BN, summed, then ReLU."""

    def __init__(self, cin, cout):
        super().__init__()
        self.cout = cout
        self.primary = ConvBN(cin, cout, 1)
        self.cheap = ConvBN(cout, cout, 3, 1, 1, groups=cout)
        self.fusion_bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x):
        x1 = self.act(self.primary(x))
        return self.act(self.cheap(x1) + self.fusion_bn(x1))

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        wp, bp = self.primary.fused()
        primary = deploy_conv(wp.shape[1], self.cout, 1, 1, 0, wp, bp)
        wc, bc = self.cheap.fused()
        wi, bi = fuse_bn(identity_kernel(self.cout, self.cout, 3), None, self.fusion_bn)
        cheap = deploy_conv(self.cout, self.cout, 3, 1, 1, wc + wi, bc + bi, groups=self.cout)
        return nn.Sequential(Deploy(primary, nn.ReLU()), Deploy(cheap, nn.ReLU()))


# --------------------------------------------------------------------------------------------
# Dilated branches
# --------------------------------------------------------------------------------------------


class DilatedBlock(nn.Module):
    """3x3 conv+BN with dilation 2 and padding 2, + 1x1 conv+BN, + identity BN: the 1x1 and the
    identity land on the centre tap of the dilated grid."""

    def __init__(self, channels):
        super().__init__()
        self.c = channels
        self.dil = ConvBN(channels, channels, 3, 1, 2, dilation=2)
        self.one = ConvBN(channels, channels, 1)
        self.identity = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.dil(x) + self.one(x) + self.identity(x))

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        wd, bd = self.dil.fused()
        w1, b1 = self.one.fused()
        wi, bi = fuse_bn(identity_kernel(self.c, 1, 1), None, self.identity)
        w = wd + pad_to(w1 + wi, 3)  # the 3x3 kernel is on the dilation-2 grid: centre = offset 0
        conv = deploy_conv(self.c, self.c, 3, 1, 2, w, bd + b1 + bi, dilation=2)
        return Deploy(conv, nn.ReLU())


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

#: family -> (constructor, input shape (N, C, H, W))
FAMILIES = {
    "repvgg": (lambda: RepVGGNet(3, 16), (2, 3, 32, 32)),
    "acnet": (lambda: ACNet(8, 16), (2, 8, 24, 24)),
    "mobileone": (lambda: MobileOneNet(16, 3), (2, 16, 24, 24)),
    "replknet": (lambda: RepLKNet(16, 13, 5), (2, 16, 20, 20)),
    "replknet31": (lambda: RepLKNet(8, 31, 5), (1, 8, 12, 12)),  # RepLKNet's real kernel size
    "repghost": (lambda: RepGhostModule(8, 16), (2, 8, 24, 24)),
    "dilated": (lambda: DilatedBlock(16), (2, 16, 20, 20)),
}


def build(family: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """The training-time model of ``family`` in eval mode, with seeded weights and BN statistics,
    and its input shape."""
    return build_model(family, FAMILIES, seed=seed)
