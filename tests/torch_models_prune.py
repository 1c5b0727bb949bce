"""Small PyTorch blocks that end in exactly prunable channels, for ``tests/test_torch_pruning.py``
(no tests here).

* ResRep (Ding et al., 2021): ``conv -> BN -> compactor``, a 1x1 conv whose pruned rows are exactly
  zero after training; the compactor may have a bias (then a pruned row holds that bias).
* Centripetal SGD (Ding et al., 2019): clusters of filters trained to be identical, with identical
  BN parameters.

Every entry of :data:`FAMILIES` / :data:`NEGATIVE` maps a name to ``(constructor, input shape,
expected Conv output widths after onnxrep, sorted, the condition that must decline it or None)``.
Weights come from the global torch generator (seeded by :func:`build`); BN statistics from
:func:`torch_blocks.randomize_bn`.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch_blocks import randomize_bn  # noqa: E402


class Compacted(nn.Module):
    """``compactor(BN(conv(x)))`` with the compactor rows ``dead`` zeroed (their bias: ``dead_bias``)."""

    def __init__(self, cin, c, dead, kernel=3, dead_bias=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, c, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.compactor = nn.Conv2d(c, c, 1, bias=dead_bias is not None)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(c, c))
            self.compactor.weight.copy_(q.reshape(c, c, 1, 1))
            self.compactor.weight[list(dead)] = 0
            if dead_bias is not None:
                self.compactor.bias.copy_(torch.randn(c) * 0.3)
                for row, value in dead_bias.items():
                    self.compactor.bias[row] = value

    def forward(self, x):
        return self.compactor(self.bn(self.conv(x)))


class Clustered(nn.Module):
    """``BN(conv(x))`` whose output channels in each cluster have identical filters and BN parameters."""

    def __init__(self, cin, c, clusters, kernel=3):
        super().__init__()
        self.conv = nn.Conv2d(cin, c, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.clusters = clusters

    def tie(self):
        with torch.no_grad():
            for cl in self.clusters:
                self.conv.weight[cl[1:]] = self.conv.weight[cl[0]].clone()
                for p in (self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var):
                    p[cl[1:]] = p[cl[0]].clone()
        return self

    def forward(self, x):
        return self.bn(self.conv(x))


class Seq(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Residual(nn.Module):
    """``relu(relu(x) + compacted(x))`` then a 1x1: only the compactor's side of the sum is dead
    (``relu(x)`` is no conv branch of ``x``, so the sum stays a sum)."""

    def __init__(self):
        super().__init__()
        self.block = Compacted(8, 8, [1, 5])
        self.head = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        return self.head(torch.relu(torch.relu(x) + self.block(x)))


class Concat(nn.Module):
    """``conv1x1(relu(cat(conv(x), compacted(x))))``: the dead channels sit at an offset of 3."""

    def __init__(self):
        super().__init__()
        self.other = nn.Conv2d(4, 3, 1)
        self.block = Compacted(4, 8, [0, 4])
        self.head = nn.Conv2d(11, 6, 1)

    def forward(self, x):
        return self.head(torch.relu(torch.cat([self.other(x), self.block(x)], dim=1)))


class Depthwise(nn.Module):
    """``conv1x1(relu(BN(depthwise3x3(compacted(x)))))``: the channel dies on both sides."""

    def __init__(self):
        super().__init__()
        self.block = Compacted(4, 8, [2, 5], kernel=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.dw(self.block(x)))))


def _resrep_1x1():
    return Seq(Compacted(4, 8, [1, 3, 6]), nn.ReLU(), nn.Conv2d(8, 6, 1))


def _resrep_relu_3x3():
    return Seq(Compacted(4, 8, [1, 3, 6]), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))


def _resrep_bias_3x3():
    # rows 1 and 3 hold relu(0.5) = 0.5, which the padded 3x3 would see replaced by zeros at the
    # border: dead-channels keeps them, but they are equal, so identical-filters merges them into one;
    # row 6 holds relu(-0.5) = 0: it goes
    return Seq(Compacted(4, 8, [1, 3, 6], dead_bias={1: 0.5, 3: 0.5, 6: -0.5}), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))


def _csgd_1x1():
    return Seq(Clustered(4, 8, [[0, 3, 5], [2, 7]]).tie(), nn.ReLU(), nn.Conv2d(8, 6, 1))


def _csgd_3x3():
    return Seq(Clustered(4, 8, [[0, 3, 5], [2, 7]]).tie(), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))


def _resrep_border():
    # one pruned row holding relu(0.5) = 0.5 before a padded 3x3: the border would change, it stays
    return Seq(Compacted(4, 8, [1], dead_bias={1: 0.5}), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))


def _output():
    return Compacted(4, 8, [1, 3])


def _csgd_differing_bn():
    m = Clustered(4, 8, [[0, 3]])
    return Seq(m, nn.ReLU(), nn.Conv2d(8, 6, 1))  # conv filters tied after randomize_bn, BN not


SHAPE = (1, 4, 12, 12)
FAMILIES = {
    "resrep_1x1": (_resrep_1x1, SHAPE, [5, 6], None),
    "resrep_relu_padded_3x3": (_resrep_relu_3x3, SHAPE, [5, 6], None),
    "resrep_bias_padded_3x3": (_resrep_bias_3x3, SHAPE, [6, 6], None),
    "csgd_1x1": (_csgd_1x1, SHAPE, [5, 6], None),
    "csgd_3x3": (_csgd_3x3, SHAPE, [5, 6], None),
    "concat": (Concat, SHAPE, [3, 6, 6], None),
    "depthwise": (Depthwise, SHAPE, [6, 6, 6], None),
}
NEGATIVE = {
    "residual_one_side_dead": (Residual, (1, 8, 12, 12), [6, 8], "outside_operand"),
    "reaches_graph_output": (_output, SHAPE, [8], "graph_output"),
    "constant_at_padded_border": (_resrep_border, SHAPE, [6, 8], "border"),
    "csgd_differing_bn": (_csgd_differing_bn, SHAPE, [6, 8], None),
}


def build(family: str, seed: int = 0):
    """The module of ``family`` in eval mode with seeded weights and BN statistics, its input shape,
    the expected sorted Conv widths after onnxrep and the declining condition (or None)."""
    ctor, shape, widths, condition = {**FAMILIES, **NEGATIVE}[family]
    torch.manual_seed(seed)
    model = ctor()
    randomize_bn(model, seed + 1)
    for m in model.modules():
        if isinstance(m, Clustered) and family != "csgd_differing_bn":
            m.tie()  # BN statistics were randomized after the clusters were tied
        elif isinstance(m, Clustered):
            with torch.no_grad():
                for cl in m.clusters:
                    m.conv.weight[cl[1:]] = m.conv.weight[cl[0]].clone()
    return model.eval(), shape, widths, condition
