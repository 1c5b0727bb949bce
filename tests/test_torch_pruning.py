"""End to end on real exporter output: ResRep-compacted and C-SGD-clustered blocks written in
PyTorch (``tests/torch_models_prune.py``), exported with the TorchScript and the dynamo
``torch.onnx`` exporters, then optimized by onnxrep with verification on.

Positive cases: the dead or duplicate channels are gone (the sorted output widths of every Conv
are the expected ones, fewer than before), the model computes what the torch module computes,
graph input/output names are kept, and optimizing again changes nothing. Negative cases keep every
channel and name the condition that declined them: a residual sum whose other side is alive, a
channel that reaches the graph output, clusters whose BN parameters differ.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnxrep  # noqa: E402
import torch_export as te  # noqa: E402
import torch_models_prune as tm  # noqa: E402

POSITIVE = [(f, e) for f in tm.FAMILIES for e in te.EXPORTERS]
NEGATIVE = [(f, e) for f in tm.NEGATIVE for e in te.EXPORTERS]


def conv_widths(model) -> list[int]:
    inits = {i.name: i for i in model.graph.initializer}
    return sorted(int(inits[n.input[1]].dims[0]) for n in model.graph.node if n.op_type == "Conv")


def pruning_skips(report) -> list[str]:
    return [r for p in report.passes if p.name in ("dead-channels", "identical-filters") for r in p.skipped.values()]


@pytest.mark.parametrize("family,exporter", POSITIVE)
def test_pruned_export(family, exporter, tmp_path):
    model, shape, widths, _ = tm.build(family)
    exported = te.export(model, te.random_inputs(shape, 0), tmp_path / "train.onnx", exporter)
    optimized, report = onnxrep.optimize(tmp_path / "train.onnx", verify=True)
    pruned = [r for p in report.passes if p.name in ("dead-channels", "identical-filters") for r in p.rewrites]
    assert pruned, report.to_dict()
    assert all(r["details"]["channels"][1] < r["details"]["channels"][0] for r in pruned)
    assert conv_widths(optimized) == widths, report.to_dict()
    assert sum(conv_widths(optimized)) < sum(conv_widths(exported)) or len(conv_widths(exported)) > len(widths)
    te.assert_matches_torch(optimized, model, shape)
    assert te.io_names(optimized) == te.io_names(exported) == (["x"], ["y"])
    te.assert_fixed_point(optimized, "Conv")


@pytest.mark.parametrize("family,exporter", NEGATIVE)
def test_channels_kept(family, exporter, tmp_path):
    model, shape, widths, condition = tm.build(family)
    te.export(model, te.random_inputs(shape, 0), tmp_path / "train.onnx", exporter)
    optimized, report = onnxrep.optimize(tmp_path / "train.onnx", verify=True)
    assert conv_widths(optimized) == widths, report.to_dict()
    skips = pruning_skips(report)
    if condition is None:  # not even a candidate after the folds (the BN made the rows differ)
        assert not any(p.rewrites for p in report.passes if p.name in ("dead-channels", "identical-filters"))
    else:
        assert skips and all(s.startswith(condition + ":") for s in skips), skips
    te.assert_matches_torch(optimized, model, shape)
