"""End to end on real exporter output: PyTorch training-time blocks of re-parameterizable CNNs,
exported with the TorchScript and the dynamo ``torch.onnx`` exporters, then optimized by onnxrep.

For every (family, exporter) the training-time module and its deploy form (built in torch by the
model's own ``switch_to_deploy``, see ``tests/torch_models.py``) are exported; the optimized
training-time export must have as many Conv nodes as the deploy export, must have rewritten
something, must compute what the torch module computes (onnxruntime with graph optimizations off),
must keep the graph input/output names, and must be a fixed point of onnxrep (the checks are
``torch_export.check_*``, shared with the other ``test_torch_exports_*.py`` files).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import torch_export as te  # noqa: E402  (tests/ is on pytest's pythonpath)
import torch_models as tm  # noqa: E402

CONV_OPS = ("Conv",)

FAMILIES = list(tm.FAMILIES)
CASES = [(family, exporter) for family in FAMILIES for exporter in te.EXPORTERS]
CASES.append(("repvgg", te.TORCHSCRIPT_DYNAMIC))  # dynamic batch dim (dynamic_axes)


@pytest.mark.parametrize("family", FAMILIES)
def test_deploy_form_matches_training_form_in_torch(family):
    """The reference deploy forms are right: same function as the training-time module."""
    deployed = te.check_deploy_form(tm, family)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules())


@pytest.mark.parametrize("family,exporter", CASES)
def test_optimize_torch_export(family, exporter, tmp_path):
    """(a) as many Conv nodes as the deploy form and no BN, (b) rewritten, (c) computes what the
    torch module computes, (d) graph input/output names kept, (e) a fixed point."""
    te.check_optimize_export(tm, family, exporter, tmp_path, CONV_OPS)
