"""The README's integration recipes run as written: the three lines after ``torch.onnx.export``
with each exporter, and ``onnxrep check`` as a CI gate on what they produce."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import onnx  # noqa: E402

import onnxrep  # noqa: E402
from graphs import histogram  # noqa: E402
from helpers import invoke  # noqa: E402
from torch_export import quiet  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


def recipes() -> list[str]:
    """The Python blocks of the README's "Integration recipes" section."""
    text = README.read_text()
    section = text[text.index("### Integration recipes"):]
    section = section[: section.index("\n### ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


class Block(torch.nn.Module):
    """A RepVGG block in its training form: 3x3 + BN, 1x1 + BN, BN identity, summed, ReLU."""

    def __init__(self, c=8):
        super().__init__()
        self.k3 = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c))
        self.k1 = torch.nn.Sequential(torch.nn.Conv2d(c, c, 1, bias=False), torch.nn.BatchNorm2d(c))
        self.id = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.k3(x) + self.k1(x) + self.id(x))


def _trained(seed=0):
    torch.manual_seed(seed)
    model = Block()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    return model


def test_the_readme_has_one_recipe_per_exporter():
    blocks = recipes()
    assert len(blocks) == 2
    assert all(len([line for line in b.splitlines() if line.strip()]) == 3 for b in blocks)
    assert "dynamo=True" in blocks[0] and "dynamo=False" in blocks[1]


@pytest.mark.parametrize("index", [0, 1], ids=["dynamo", "torchscript"])
def test_recipe_after_torch_onnx_export(index, tmp_path, monkeypatch):
    if index == 0:
        pytest.importorskip("onnxscript")
    monkeypatch.chdir(tmp_path)
    namespace = {"torch": torch, "onnxrep": onnxrep, "model": _trained(), "x": torch.randn(1, 8, 8, 8)}
    with quiet():
        exec(recipes()[index], namespace)  # noqa: S102 - the README's own code
    report = namespace["report"]
    assert report.verification["ok"]
    ops = histogram(onnx.load(tmp_path / "model.onnx"))
    assert ops.get("BatchNormalization", 0) == 0 and ops.get("Conv") == 1, ops
    # the CI gate passes on the result, and fails on the training export
    assert invoke("check", tmp_path / "model.onnx").exit_code == 0
    if index == 1:
        res = invoke("check", tmp_path / "train.onnx")
        assert res.exit_code == 5 and "foldable" in res.stdout
