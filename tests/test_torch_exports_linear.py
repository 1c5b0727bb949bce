"""End to end on real exporter output: the linear-layer (Gemm / MatMul) re-parameterizable
families (RepViT classifier head, depth-pruned DeiT MLP block, MLP without activation,
layer-scaled residual linear, RepMLP-style parallel linears, Linear -> BN), exported with the
TorchScript and the dynamo ``torch.onnx`` exporters, then optimized by onnxrep.

For every (family, exporter) the training-time module and its deploy form (built in torch by the
model's own ``switch_to_deploy``, see ``tests/torch_models_linear.py``) are exported; the optimized
training-time export must have as many Gemm + MatMul nodes as the deploy export and no
BatchNormalization, must have rewritten something, must compute what the torch module computes
(onnxruntime with graph optimizations off), must keep the graph input/output names, and must be a
fixed point of onnxrep. One TorchScript case has a dynamic batch dim. The checks are
``torch_export.check_*``, shared with the other ``test_torch_exports*.py`` files.

The negative blocks (``torch_models_linear.NEGATIVE``) must keep all their Gemm + MatMul nodes:
merging across an activation or a non-constant weight would be wrong, across a bottleneck would
cost more.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import torch_export as te  # noqa: E402  (tests/ is on pytest's pythonpath)
import torch_models_linear as tm  # noqa: E402

LINEAR_OPS = ("Gemm", "MatMul")

FAMILIES = list(tm.FAMILIES)
NEGATIVE = list(tm.NEGATIVE)
CASES = [(family, exporter) for family in FAMILIES for exporter in te.EXPORTERS]
CASES.append(("deit_pruned", te.TORCHSCRIPT_DYNAMIC))  # dynamic batch dim (dynamic_axes)
NEGATIVE_CASES = [(family, exporter) for family in NEGATIVE for exporter in te.EXPORTERS]
#: (family, exporter) whose training-time export is already its deploy form: the dynamo exporter's
#: onnxscript optimizer folds a BatchNormalization after a Gemm itself (its ``fuse_batchnorm``
#: rewrite, Gemm -> BN -> Gemm), so onnxrep has nothing to rewrite there
FOLDED_BY_EXPORTER = {("bn_after_linear", te.DYNAMO)}


@pytest.mark.parametrize("family", FAMILIES)
def test_deploy_form_matches_training_form_in_torch(family):
    """The reference deploy forms are right: same function as the training-time module, one Linear."""
    deployed = te.check_deploy_form(tm, family)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
    assert sum(isinstance(m, torch.nn.Linear) for m in deployed.modules()) == 1


@pytest.mark.parametrize("family,exporter", CASES)
def test_optimize_torch_export(family, exporter, tmp_path):
    """(a) as many Gemm + MatMul nodes as the deploy form and no BN, (b) rewritten (unless the
    exporter did the fold: then the export must stay as it is), (c) computes what the torch module
    computes, (d) graph input/output names kept, (e) a fixed point."""
    folded = (family, exporter) in FOLDED_BY_EXPORTER
    te.check_optimize_export(tm, family, exporter, tmp_path, LINEAR_OPS, folded=folded)


@pytest.mark.parametrize("family,exporter", NEGATIVE_CASES)
def test_negative_not_merged(family, exporter, tmp_path):
    """Nothing is merged across an activation, a non-constant weight, or where merging costs more."""
    optimized = te.check_not_merged(tm, family, exporter, tmp_path, LINEAR_OPS)
    te.assert_fixed_point(optimized, *LINEAR_OPS)
