"""Small PyTorch training-time blocks of the sequential, residual and affine re-parameterizable
families, each with its own deploy form.

Test-only helpers for ``tests/test_torch_exports_seq.py`` (no tests here); the parallel-branch
families live in ``tests/torch_models.py``. Every block is written the way the original code
writes it (DBB's ``BNAndPadLayer`` with its slice assignments into the padded tensor, OREPA's
kernel computed in ``forward``, FastViT's ``x + layer_scale * (mixer(x) - norm(x))``, ...).
``switch_to_deploy()`` returns a NEW module (the training-time module is left untouched) built
with the classic recipe, independently of onnxrep, in float64 and cast back to float32 when the
deploy conv is written.

Families: DBB (with ``IdentityBasedConv1x1``, a 5x5 one, a depthwise one), OREPA, FastViT RepMixer
and RepCPE, RepViT RepVGGDW, YOLOv6 QARepVGG (and its AvgPool variant), ResRep compactor,
depth-pruned ConvNeXt (UPDP), YOLOv7 implicit layers, sequential conv chains. :data:`NEGATIVE`
holds the blocks that must NOT be merged; their deploy form is themselves.

Shared with ``tests/torch_models.py`` through ``tests/torch_blocks.py``: ``ConvBN``, BN fusion,
seeded BN statistics and :func:`build` (every model in ``eval()`` mode).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # imported by tests/test_torch_exports_seq.py after its own importorskip

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch_blocks import (  # noqa: E402
    Blocks,
    Chain,
    ConvBN,
    Deploy,
    build_model,
    channel_param,
    deploy_conv,
    f64,
    fuse_bn,
    identity_kernel,
    pad_to,
)

# --------------------------------------------------------------------------------------------
# helpers (float64 fusion; the shared ones are in tests/torch_blocks.py)
# --------------------------------------------------------------------------------------------


def to_dense(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped kernel ``(cout, cin / groups, kh, kw)`` as the block-diagonal dense ``(cout, cin, kh, kw)``."""
    cout, per_in = weight.shape[:2]
    per_out = cout // groups
    dense = weight.new_zeros(cout, per_in * groups, *weight.shape[2:])
    for g in range(groups):
        rows, cols = slice(g * per_out, (g + 1) * per_out), slice(g * per_in, (g + 1) * per_in)
        dense[rows, cols] = weight[rows]
    return dense


def to_grouped(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`to_dense`; the off-diagonal blocks must be zero."""
    cout, cin = dense.shape[:2]
    per_out, per_in = cout // groups, cin // groups
    blocks = []
    for g in range(groups):
        rows, cols = slice(g * per_out, (g + 1) * per_out), slice(g * per_in, (g + 1) * per_in)
        rest = dense[rows].clone()
        rest[:, cols] = 0
        assert not rest.any(), "kernel is not block-diagonal for these groups"
        blocks.append(dense[rows, cols])
    return torch.cat(blocks)


def compose_1x1_then_kxk(w1, b1, w2, b2):
    """``conv_kxk(conv_1x1(x; w1, b1); w2, b2)`` (dense kernels) as one kxk conv. Exact when the
    1x1 output is padded with the 1x1's response to zero (i.e. ``b1``) -- or when ``b1 == 0``."""
    w = torch.einsum("omhw,mi->oihw", w2, w1[:, :, 0, 0])
    return w, b2 + torch.einsum("omhw,m->o", w2, b1)


def compose_kxk_then_1x1(w1, b1, w2, b2):
    """``conv_1x1(conv_kxk(x; w1, b1); w2, b2)`` (dense kernels) as one kxk conv."""
    m = w2[:, :, 0, 0]
    return torch.einsum("om,mihw->oihw", m, w1), m @ b1 + b2


def avg_kernel(channels: int, groups: int, kernel: int) -> torch.Tensor:
    """``AvgPool2d(kernel)`` (count_include_pad) as a conv kernel grouped as ``groups``, float64."""
    per_group = channels // groups
    w = torch.zeros(channels, per_group, kernel, kernel, dtype=torch.float64)
    for c in range(channels):
        w[c, c % per_group] = 1.0 / (kernel * kernel)
    return w


class Residual(nn.Module):
    """Deploy form ``x + body(x)``."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


# --------------------------------------------------------------------------------------------
# DBB (Diverse Branch Block), as in DingXiaoH/DiverseBranchBlock
# --------------------------------------------------------------------------------------------


class IdentityBasedConv1x1(nn.Conv2d):
    """DBB's 1x1 conv of the 1x1-kxk branch: kernel = weight + identity, computed in forward."""

    def __init__(self, channels, groups=1):
        super().__init__(channels, channels, 1, 1, 0, groups=groups, bias=False)
        input_dim = channels // groups
        id_value = np.zeros((channels, input_dim, 1, 1))
        for i in range(channels):
            id_value[i, i % input_dim, 0, 0] = 1
        self.id_tensor = torch.from_numpy(id_value).type_as(self.weight)
        with torch.no_grad():  # the original starts at zero; trained weights are not
            self.weight.copy_(torch.randn_like(self.weight) * 0.2)

    def forward(self, input):
        kernel = self.weight + self.id_tensor.to(self.weight.device).type_as(self.weight)
        return F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)

    def get_actual_kernel(self):
        return f64(self.weight) + f64(self.id_tensor)


class BNAndPadLayer(nn.Module):
    """BN, then zero-pad, then write BN's response to zero into the border ring -- exactly as the
    official DBB code does (``F.pad`` then slice assignments into the padded tensor)."""

    def __init__(self, pad_pixels, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        self.pad_pixels = pad_pixels

    def forward(self, input):
        output = self.bn(input)
        if self.pad_pixels > 0:
            if self.bn.affine:
                pad_values = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / torch.sqrt(
                    self.bn.running_var + self.bn.eps
                )
            else:
                pad_values = -self.bn.running_mean / torch.sqrt(self.bn.running_var + self.bn.eps)
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            output[:, :, 0 : self.pad_pixels, :] = pad_values
            output[:, :, -self.pad_pixels :, :] = pad_values
            output[:, :, :, 0 : self.pad_pixels] = pad_values
            output[:, :, :, -self.pad_pixels :] = pad_values
        return output


class DiverseBranchBlock(nn.Module):
    """kxk conv+BN (``dbb_origin``) + 1x1 conv+BN (``dbb_1x1``) + 1x1 conv -> BNAndPad -> AvgPool
    (padding 0) -> BN (``dbb_avg``) + 1x1 conv -> BNAndPad -> kxk conv (padding 0) -> BN
    (``dbb_1x1_kxk``), summed, then ReLU. When ``groups == cout`` (depthwise) there is no 1x1
    branch and the avg branch is a bare ``AvgPool2d(k, stride, k // 2)`` + BN, as in the original.
    """

    def __init__(self, cin, cout, kernel, stride=1, groups=1, internal_channels_1x1_3x3=None):
        super().__init__()
        self.cin, self.cout, self.kernel, self.stride, self.groups = cin, cout, kernel, stride, groups
        padding = kernel // 2
        self.dbb_origin = ConvBN(cin, cout, kernel, stride, padding, groups=groups)

        self.dbb_avg = nn.Sequential()
        if groups < cout:
            self.dbb_avg.add_module("conv", nn.Conv2d(cin, cout, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(pad_pixels=padding, num_features=cout))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel, stride=stride, padding=0))
            self.dbb_1x1 = ConvBN(cin, cout, 1, stride, 0, groups=groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel, stride=stride, padding=padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))

        if internal_channels_1x1_3x3 is None:
            internal_channels_1x1_3x3 = cin if groups < cout else 2 * cin
        self.internal = internal_channels_1x1_3x3
        self.dbb_1x1_kxk = nn.Sequential()
        if internal_channels_1x1_3x3 == cin:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(cin, groups=groups))
        else:
            self.dbb_1x1_kxk.add_module(
                "conv1", nn.Conv2d(cin, internal_channels_1x1_3x3, 1, 1, 0, groups=groups, bias=False)
            )
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(pad_pixels=padding, num_features=internal_channels_1x1_3x3))
        self.dbb_1x1_kxk.add_module(
            "conv2", nn.Conv2d(internal_channels_1x1_3x3, cout, kernel, stride, 0, groups=groups, bias=False)
        )
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(cout))
        self.nonlinear = nn.ReLU()

    def forward(self, inputs):
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out = out + self.dbb_1x1(inputs)
        out = out + self.dbb_avg(inputs)
        out = out + self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        k, g = self.kernel, self.groups
        w, b = self.dbb_origin.fused()  # kxk

        if hasattr(self, "dbb_1x1"):
            w1, b1 = self.dbb_1x1.fused()
            w, b = w + pad_to(w1, k), b + b1

        # avg branch: [1x1 conv -> BN (ring = BN(0))] -> avg k -> BN
        wa = avg_kernel(self.cout, g, k)
        if hasattr(self.dbb_avg, "conv"):
            wc, bc = fuse_bn(self.dbb_avg.conv.weight, None, self.dbb_avg.bn.bn)
            zero = torch.zeros(self.cout, dtype=torch.float64)
            wa, ba = compose_1x1_then_kxk(to_dense(wc, g), bc, to_dense(wa, g), zero)
            wa = to_grouped(wa, g)
        else:
            ba = torch.zeros(self.cout, dtype=torch.float64)
        wa, ba = fuse_bn(wa, ba, self.dbb_avg.avgbn)
        w, b = w + wa, b + ba

        # 1x1-kxk branch: 1x1 conv -> BN (ring = BN(0)) -> kxk conv -> BN
        branch = self.dbb_1x1_kxk
        k1 = branch.idconv1.get_actual_kernel() if hasattr(branch, "idconv1") else f64(branch.conv1.weight)
        k1, c1 = fuse_bn(k1, None, branch.bn1.bn)
        k2, c2 = fuse_bn(branch.conv2.weight, None, branch.bn2)
        wk, bk = compose_1x1_then_kxk(to_dense(k1, g), c1, to_dense(k2, g), c2)
        w, b = w + to_grouped(wk, g), b + bk

        conv = deploy_conv(self.cin, self.cout, k, self.stride, k // 2, w, b, groups=g)
        return Deploy(conv, nn.ReLU())


class DBBNet(Blocks):
    """DBB with ``IdentityBasedConv1x1`` (the default internal width), then a stride-2 DBB."""

    def __init__(self, cin=8, width=16):
        super().__init__(DiverseBranchBlock(cin, width, 3), DiverseBranchBlock(width, width, 3, stride=2))


class SingleBlock(nn.Module):
    """A wrapper so that every family is built by a zero-argument constructor."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)

    def switch_to_deploy(self) -> nn.Module:
        return self.block.switch_to_deploy()


# --------------------------------------------------------------------------------------------
# OREPA: the kernel is computed in forward from parameters
# --------------------------------------------------------------------------------------------


class OREPABlock(nn.Module):
    """``BN(conv2d(x, W))`` with ``W = w_origin * v0 + (w_avg x avg_prior) * v1 + (w_1x1 x
    centre_prior) * v2 + (w_kxk o (w_idconv1 + I)) * v3`` computed in forward with einsums, as
    OREPA's online re-parameterization does."""

    def __init__(self, cin, cout, kernel=3, stride=1, internal=None):
        super().__init__()
        self.cin, self.cout, self.kernel, self.stride = cin, cout, kernel, stride
        internal = internal or cin
        fan = cin * kernel * kernel
        self.weight_origin = nn.Parameter(torch.randn(cout, cin, kernel, kernel) / fan**0.5)
        self.weight_avg_conv = nn.Parameter(torch.randn(cout, cin) / cin**0.5)
        self.register_buffer("avg_prior", torch.full((kernel, kernel), 1.0 / (kernel * kernel)))
        self.weight_1x1 = nn.Parameter(torch.randn(cout, cin) / cin**0.5)
        centre = torch.zeros(kernel, kernel)
        centre[kernel // 2, kernel // 2] = 1.0
        self.register_buffer("centre_prior", centre)
        self.weight_idconv1 = nn.Parameter(torch.randn(internal, cin) * 0.1)
        self.register_buffer("id_tensor", torch.eye(internal, cin))
        fan2 = internal * kernel * kernel
        self.weight_conv2 = nn.Parameter(torch.randn(cout, internal, kernel, kernel) / fan2**0.5)
        self.vector = nn.Parameter(torch.rand(4, cout) + 0.5)
        self.bn = nn.BatchNorm2d(cout)

    def weight_gen(self) -> torch.Tensor:
        w_origin = torch.einsum("oihw,o->oihw", self.weight_origin, self.vector[0])
        w_avg = torch.einsum("oi,hw->oihw", self.weight_avg_conv, self.avg_prior)
        w_avg = torch.einsum("oihw,o->oihw", w_avg, self.vector[1])
        # the 1x1 placed at the centre through a one-hot prior: F.pad of a parameter makes the
        # TorchScript exporter fail ("convolution for kernel of unknown shape")
        w_1x1 = torch.einsum("oi,hw->oihw", self.weight_1x1, self.centre_prior)
        w_1x1 = torch.einsum("oihw,o->oihw", w_1x1, self.vector[2])
        w_conv1 = self.weight_idconv1 + self.id_tensor
        w_1x1_kxk = torch.einsum("ti,othw->oihw", w_conv1, self.weight_conv2)
        w_1x1_kxk = torch.einsum("oihw,o->oihw", w_1x1_kxk, self.vector[3])
        return w_origin + w_avg + w_1x1 + w_1x1_kxk

    def forward(self, x):
        return self.bn(F.conv2d(x, self.weight_gen(), None, self.stride, self.kernel // 2))

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        k, v = self.kernel, f64(self.vector)
        w = f64(self.weight_origin) * v[0].reshape(-1, 1, 1, 1)
        w = w + f64(self.weight_avg_conv)[:, :, None, None] * f64(self.avg_prior) * v[1].reshape(-1, 1, 1, 1)
        w = w + pad_to(f64(self.weight_1x1)[:, :, None, None], k) * v[2].reshape(-1, 1, 1, 1)
        conv1 = f64(self.weight_idconv1) + f64(self.id_tensor)
        w = w + torch.einsum("othw,ti->oihw", f64(self.weight_conv2), conv1) * v[3].reshape(-1, 1, 1, 1)
        w, b = fuse_bn(w, None, self.bn)
        return Deploy(deploy_conv(self.cin, self.cout, k, self.stride, k // 2, w, b))


class OREPANet(nn.Module):
    """Two OREPA blocks. With ``width=32`` the second block's kernel (32 * 32 * 9 = 9216 values) is
    over the dynamo exporter's constant-folding limit (8192 elements), so its computation stays
    in the exported graph as nodes on constants; the first block's is folded by the exporter."""

    def __init__(self, cin=8, width=32):
        super().__init__()
        self.a = OREPABlock(cin, width, 3)
        self.b = OREPABlock(width, width, 3, stride=2)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))

    def switch_to_deploy(self) -> nn.Module:
        return nn.Sequential(self.a.switch_to_deploy(), nn.ReLU(), self.b.switch_to_deploy())


# --------------------------------------------------------------------------------------------
# FastViT: RepMixer and RepCPE
# --------------------------------------------------------------------------------------------


class MobileOneDW(nn.Module):
    """FastViT's ``MobileOneBlock`` used inside RepMixer (depthwise, no activation): identity BN
    (``rbr_skip``) + ``n`` kxk conv+BN + the 1x1 conv+BN scale branch, each optional."""

    def __init__(self, channels, kernel, n=1, use_scale_branch=True):
        super().__init__()
        self.c, self.kernel = channels, kernel
        self.rbr_skip = nn.BatchNorm2d(channels)
        c = channels
        self.rbr_conv = nn.ModuleList(ConvBN(c, c, kernel, 1, kernel // 2, groups=c) for _ in range(n))
        self.rbr_scale = ConvBN(c, c, 1, 1, 0, groups=c) if use_scale_branch and kernel > 1 else None

    def forward(self, x):
        out = self.rbr_skip(x)
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        for conv in self.rbr_conv:
            out = out + conv(x)
        return out

    def fused(self):
        k = self.kernel
        w, b = fuse_bn(identity_kernel(self.c, self.c, k), None, self.rbr_skip)
        if self.rbr_scale is not None:
            ws, bs = self.rbr_scale.fused()
            w, b = w + pad_to(ws, k), b + bs
        for conv in self.rbr_conv:
            wc, bc = conv.fused()
            w, b = w + wc, b + bc
        return w, b


class RepMixer(nn.Module):
    """``x + layer_scale * (mixer(x) - norm(x))``; ``norm`` is a MobileOneBlock with neither conv
    nor scale branch (so just a BN), ``mixer`` a full depthwise MobileOneBlock."""

    def __init__(self, dim, kernel_size=3):
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        self.norm = MobileOneDW(dim, kernel_size, n=0, use_scale_branch=False)
        self.mixer = MobileOneDW(dim, kernel_size, n=1)
        self.layer_scale = channel_param(dim, 1, 1, mean=0.5, std=0.3)  # trained, not the 1e-5 init

    def forward(self, x):
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        k = self.kernel_size
        wm, bm = self.mixer.fused()
        wn, bn = self.norm.fused()
        ls = f64(self.layer_scale).reshape(-1)
        w = identity_kernel(self.dim, self.dim, k) + ls.reshape(-1, 1, 1, 1) * (wm - wn)
        b = ls * (bm - bn)
        return Deploy(deploy_conv(self.dim, self.dim, k, 1, k // 2, w, b, groups=self.dim))


class RepCPE(nn.Module):
    """Conditional positional encoding: ``pe(x) + x``, ``pe`` a depthwise 7x7 conv with bias."""

    def __init__(self, dim, spatial=7):
        super().__init__()
        self.dim, self.spatial = dim, spatial
        self.pe = nn.Conv2d(dim, dim, spatial, 1, spatial // 2, bias=True, groups=dim)

    def forward(self, x):
        return self.pe(x) + x

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        k = self.spatial
        w = identity_kernel(self.dim, self.dim, k) + f64(self.pe.weight)
        return Deploy(deploy_conv(self.dim, self.dim, k, 1, k // 2, w, f64(self.pe.bias), groups=self.dim))


# --------------------------------------------------------------------------------------------
# RepViT RepVGGDW
# --------------------------------------------------------------------------------------------


class RepVGGDW(nn.Module):
    """``BN((dwconv3x3+BN(x) + dwconv1x1(x)) + x)``: a post-sum BN, the 1x1 with bias."""

    def __init__(self, ed):
        super().__init__()
        self.dim = ed
        self.conv = ConvBN(ed, ed, 3, 1, 1, groups=ed)
        self.conv1 = nn.Conv2d(ed, ed, 1, 1, 0, groups=ed)
        self.bn = nn.BatchNorm2d(ed)

    def forward(self, x):
        return self.bn((self.conv(x) + self.conv1(x)) + x)

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        w, b = self.conv.fused()
        w = w + pad_to(f64(self.conv1.weight), 3) + identity_kernel(self.dim, self.dim, 3)
        b = b + f64(self.conv1.bias)
        w, b = fuse_bn(w, b, self.bn)
        return Deploy(deploy_conv(self.dim, self.dim, 3, 1, 1, w, b, groups=self.dim))


class RepViTNet(nn.Module):
    """RepVGGDW, then a 1x1 conv+ReLU channel mixer, then another RepVGGDW (as RepViT interleaves)."""

    def __init__(self, dim=16):
        super().__init__()
        self.a = RepVGGDW(dim)
        self.pw = nn.Conv2d(dim, dim, 1)
        self.b = RepVGGDW(dim)

    def forward(self, x):
        return self.b(F.relu(self.pw(self.a(x))))

    def switch_to_deploy(self) -> nn.Module:
        return nn.Sequential(self.a.switch_to_deploy(), self.pw, nn.ReLU(), self.b.switch_to_deploy())


# --------------------------------------------------------------------------------------------
# YOLOv6 QARepVGG
# --------------------------------------------------------------------------------------------


class QARepVGGBlock(nn.Module):
    """``relu(BN(conv3x3+BN(x) + conv1x1(x) [+ x] [+ avgpool3x3(x)]))``: the 1x1 without BN or bias,
    a BN-less identity and a post-sum BN; ``avg`` is QARepVGGBlockV2's AvgPool2d(3, 1, 1) branch."""

    def __init__(self, cin, cout, stride=1, avg=False):
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride
        self.rbr_dense = ConvBN(cin, cout, 3, stride, 1)
        self.rbr_1x1 = nn.Conv2d(cin, cout, 1, stride, bias=False)
        same = cin == cout and stride == 1
        self.rbr_identity = nn.Identity() if same else None
        self.rbr_avg = nn.AvgPool2d(3, stride, 1) if avg and same else None
        self.bn = nn.BatchNorm2d(cout)
        self.nonlinearity = nn.ReLU()

    def forward(self, inputs):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        avg_out = 0 if self.rbr_avg is None else self.rbr_avg(inputs)
        return self.nonlinearity(self.bn(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out + avg_out))

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        w, b = self.rbr_dense.fused()
        w = w + pad_to(f64(self.rbr_1x1.weight), 3)
        if self.rbr_identity is not None:
            w = w + identity_kernel(self.cin, 1, 3)
        if self.rbr_avg is not None:
            w = w + avg_kernel(self.cin, 1, 3)
        w, b = fuse_bn(w, b, self.bn)
        return Deploy(deploy_conv(self.cin, self.cout, 3, self.stride, 1, w, b), nn.ReLU())


class QARepNet(Blocks):
    """A widening block (no identity), then blocks with identity (and the AvgPool branch when
    ``avg``), then a stride-2 block."""

    def __init__(self, cin=8, width=16, avg=False):
        super().__init__(
            QARepVGGBlock(cin, width, avg=avg),
            QARepVGGBlock(width, width, avg=avg),
            QARepVGGBlock(width, width, stride=2, avg=avg),
        )


# --------------------------------------------------------------------------------------------
# ResRep compactor
# --------------------------------------------------------------------------------------------


class ConvBNCompactor(nn.Module):
    """conv3x3 -> BN -> compactor (1x1 conv C->C, no bias, an orthogonal-ish matrix) -> ReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride
        self.conv = ConvBN(cin, cout, 3, stride, 1)
        self.compactor = nn.Conv2d(cout, cout, 1, 1, 0, bias=False)
        q, _ = torch.linalg.qr(torch.randn(cout, cout))
        with torch.no_grad():  # ResRep starts from the identity; trained compactors drift away from it
            self.compactor.weight.copy_((q * (torch.rand(cout) * 0.5 + 0.75)).reshape(cout, cout, 1, 1))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.compactor(self.conv(x)))

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        w, b = self.conv.fused()
        w, b = compose_kxk_then_1x1(w, b, f64(self.compactor.weight), torch.zeros(self.cout, dtype=torch.float64))
        return Deploy(deploy_conv(self.cin, self.cout, 3, self.stride, 1, w, b), nn.ReLU())


class ResRepNet(Blocks):
    def __init__(self, cin=8, width=16):
        super().__init__(ConvBNCompactor(cin, width), ConvBNCompactor(width, width, stride=2))


# --------------------------------------------------------------------------------------------
# Depth-pruned ConvNeXt block (UPDP)
# --------------------------------------------------------------------------------------------


class PrunedConvNeXtBlock(nn.Module):
    """``x + gamma * pw2(pw1(BN(dwconv7x7(x))))``: ConvNeXt with GELU removed and LayerNorm replaced
    by BN, as UPDP prunes a block to linear; the deploy form keeps the depthwise 7x7 (BN folded)
    and ONE 1x1 (pw1, pw2 and gamma merged) -- a dense 7x7 would cost more."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.dwconv = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.norm = nn.BatchNorm2d(dim)
        self.pwconv1 = nn.Conv2d(dim, 4 * dim, 1)
        self.pwconv2 = nn.Conv2d(4 * dim, dim, 1)
        self.gamma = channel_param(dim, 1, 1, mean=0.5, std=0.3)

    def forward(self, x):
        return x + self.gamma * self.pwconv2(self.pwconv1(self.norm(self.dwconv(x))))

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        wd, bd = fuse_bn(self.dwconv.weight, self.dwconv.bias, self.norm)
        dw = deploy_conv(self.dim, self.dim, 7, 1, 3, wd, bd, groups=self.dim)
        w, b = compose_kxk_then_1x1(
            f64(self.pwconv1.weight), f64(self.pwconv1.bias), f64(self.pwconv2.weight), f64(self.pwconv2.bias)
        )
        g = f64(self.gamma).reshape(-1)
        pw = deploy_conv(self.dim, self.dim, 1, 1, 0, w * g.reshape(-1, 1, 1, 1), b * g)
        return Residual(nn.Sequential(dw, pw))


# --------------------------------------------------------------------------------------------
# YOLOv7 implicit knowledge
# --------------------------------------------------------------------------------------------


class ImplicitA(nn.Module):
    def __init__(self, channel):
        super().__init__()
        self.implicit = channel_param(1, channel, 1, 1, mean=0.0, std=0.5)

    def forward(self, x):
        return self.implicit + x


class ImplicitM(nn.Module):
    def __init__(self, channel):
        super().__init__()
        self.implicit = channel_param(1, channel, 1, 1, mean=1.0, std=0.3)

    def forward(self, x):
        return self.implicit * x


class ImplicitHead(nn.Module):
    """YOLOv7's IDetect head on one level: ``im(m(ia(x)))``, ``m`` a 1x1 conv with bias."""

    def __init__(self, cin, cout):
        super().__init__()
        self.cin, self.cout = cin, cout
        self.ia = ImplicitA(cin)
        self.m = nn.Conv2d(cin, cout, 1)
        self.im = ImplicitM(cout)

    def forward(self, x):
        return self.im(self.m(self.ia(x)))

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        w, b = f64(self.m.weight), f64(self.m.bias)
        a, m = f64(self.ia.implicit).reshape(-1), f64(self.im.implicit).reshape(-1)
        b = (b + w[:, :, 0, 0] @ a) * m
        w = w * m.reshape(-1, 1, 1, 1)
        return Deploy(deploy_conv(self.cin, self.cout, 1, 1, 0, w, b))


# --------------------------------------------------------------------------------------------
# sequential conv chains
# --------------------------------------------------------------------------------------------


class ConvChain(Chain):
    """``second(first(x))``, both plain ``nn.Conv2d``; merged into one conv. The first conv must
    be 1x1 with stride 1 and padding 0 and, if the second conv pads, have no bias (or the second
    is 1x1), which is what makes the merge exact at the borders."""

    @torch.no_grad()
    def switch_to_deploy(self) -> nn.Module:
        a, c = self.first, self.second
        ba = f64(a.bias) if a.bias is not None else torch.zeros(a.out_channels, dtype=torch.float64)
        bc = f64(c.bias) if c.bias is not None else torch.zeros(c.out_channels, dtype=torch.float64)
        wa, wc = to_dense(f64(a.weight), a.groups), to_dense(f64(c.weight), c.groups)
        if c.kernel_size == (1, 1) and c.stride == (1, 1) and c.padding == (0, 0):
            w, b = compose_kxk_then_1x1(wa, ba, wc, bc)
            kernel, stride, padding = a.kernel_size, a.stride, a.padding
        else:
            assert a.kernel_size == (1, 1) and a.stride == (1, 1) and a.padding == (0, 0)
            assert a.bias is None or c.padding == (0, 0)
            w, b = compose_1x1_then_kxk(wa, ba, wc, bc)
            kernel, stride, padding = c.kernel_size, c.stride, c.padding
        groups = c.groups if c.groups == a.groups else 1
        w = to_grouped(w, groups)
        conv = deploy_conv(a.in_channels, c.out_channels, kernel, stride, padding, w, b, groups=groups)
        return Deploy(conv)


# --------------------------------------------------------------------------------------------
# negative cases: must NOT be merged
# --------------------------------------------------------------------------------------------


class AddThenConv(nn.Module):
    """``conv3x3(x + c)`` with padding 1 and a per-channel ``c``: folding ``c`` into the bias is
    wrong at the borders (the zero padding is applied after the add)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.c = channel_param(1, cin, 1, 1, mean=0.0, std=1.0)
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1)

    def forward(self, x):
        return self.conv(x + self.c)


def _biased_1x1_then_padded_3x3() -> nn.Module:
    # the 1x1's bias is not zero-padded away: merging would be wrong in the border ring
    return ConvChain(nn.Conv2d(8, 16, 1, bias=True), nn.Conv2d(16, 16, 3, 1, 1))


def _depthwise_then_dense() -> nn.Module:
    # merging would make a dense 3x3 (9 * 16 * 16 MACs) out of dw3x3 + 1x1 (9 * 16 + 16 * 16)
    return nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.Conv2d(16, 16, 1))


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

#: family -> (constructor, input shape (N, C, H, W)); every model has ``switch_to_deploy``
FAMILIES = {
    "dbb": (lambda: DBBNet(8, 16), (2, 8, 16, 16)),
    "dbb_k5": (lambda: SingleBlock(DiverseBranchBlock(8, 16, 5, internal_channels_1x1_3x3=16)), (2, 8, 16, 16)),
    "dbb_dw": (lambda: SingleBlock(DiverseBranchBlock(16, 16, 3, groups=16)), (2, 16, 16, 16)),
    "orepa": (lambda: OREPANet(8, 32), (2, 8, 16, 16)),
    "repmixer": (lambda: SingleBlock(RepMixer(16, 3)), (2, 16, 16, 16)),
    "repcpe": (lambda: SingleBlock(RepCPE(16, 7)), (2, 16, 16, 16)),
    "repvggdw": (lambda: RepViTNet(16), (2, 16, 16, 16)),
    "qarepvgg": (lambda: QARepNet(8, 16), (2, 8, 16, 16)),
    "qarepvgg_avg": (lambda: QARepNet(8, 16, avg=True), (2, 8, 16, 16)),
    "resrep": (lambda: ResRepNet(8, 16), (2, 8, 16, 16)),
    "convnext_pruned": (lambda: SingleBlock(PrunedConvNeXtBlock(16)), (2, 16, 16, 16)),
    "implicit": (lambda: SingleBlock(ImplicitHead(16, 24)), (2, 16, 16, 16)),
    "chain_1x1_1x1": (lambda: ConvChain(nn.Conv2d(8, 32, 1), nn.Conv2d(32, 8, 1)), (2, 8, 16, 16)),
    "chain_kxk_1x1": (lambda: ConvChain(nn.Conv2d(8, 16, 3, 1, 1), nn.Conv2d(16, 16, 1)), (2, 8, 16, 16)),
    "chain_1x1_kxk": (lambda: ConvChain(nn.Conv2d(8, 16, 1, bias=False), nn.Conv2d(16, 16, 3, 1, 1)), (2, 8, 16, 16)),
    "chain_grouped": (
        lambda: ConvChain(nn.Conv2d(16, 16, 1, groups=2, bias=False), nn.Conv2d(16, 16, 3, 1, 1, groups=2)),
        (2, 16, 16, 16),
    ),
}

#: family -> (constructor, input shape): blocks that must be left as they are
NEGATIVE = {
    "neg_biased_1x1_padded_3x3": (_biased_1x1_then_padded_3x3, (2, 8, 16, 16)),
    "neg_add_before_padded_3x3": (lambda: AddThenConv(8, 16), (2, 8, 16, 16)),
    "neg_depthwise_then_dense": (_depthwise_then_dense, (2, 16, 16, 16)),
}


def build(family: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """The training-time model of ``family`` (from :data:`FAMILIES` or :data:`NEGATIVE`) in eval
    mode, with seeded weights and BN statistics, and its input shape."""
    return build_model(family, FAMILIES, NEGATIVE, seed=seed)
