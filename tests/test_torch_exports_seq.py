"""End to end on real exporter output: the sequential, residual and affine re-parameterizable
families (DBB, OREPA, FastViT RepMixer/RepCPE, RepViT RepVGGDW, YOLOv6 QARepVGG, ResRep, pruned
ConvNeXt, YOLOv7 implicit, conv chains), exported with the TorchScript and the dynamo
``torch.onnx`` exporters, then optimized by onnxrep.

For every (family, exporter) the training-time module and its deploy form (built in torch by the
model's own ``switch_to_deploy``, see ``tests/torch_models_seq.py``) are exported; the optimized
training-time export must have as many Conv nodes as the deploy export, must have rewritten
something, must compute what the torch module computes (onnxruntime with graph optimizations off),
must keep the graph input/output names, and must be a fixed point of onnxrep.

The negative blocks (``torch_models_seq.NEGATIVE``) must keep all their Conv nodes: merging
across their boundary would be wrong at the borders or would cost more.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pathlib
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import onnxrep  # noqa: E402


import torch_models_seq as tm  # noqa: E402  (tests/ is on pytest's pythonpath)

REL_TOL = 1e-5
TORCHSCRIPT, DYNAMO = "torchscript", "dynamo"
EXPORTERS = (TORCHSCRIPT, DYNAMO)

FAMILIES = list(tm.FAMILIES)
NEGATIVE = list(tm.NEGATIVE)
CASES = [(family, exporter) for family in FAMILIES for exporter in EXPORTERS]
NEGATIVE_CASES = [(family, exporter) for family in NEGATIVE for exporter in EXPORTERS]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' warnings, log records and progress prints."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.filterwarnings("ignore")
            yield
    finally:
        logger.setLevel(level)


def export(module, x, path: pathlib.Path, exporter: str) -> onnx.ModelProto:
    """Export ``module`` on example input ``x`` to ``path`` and return the loaded model."""
    with _quiet():
        if exporter == DYNAMO:
            torch.onnx.export(module, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"], verbose=False)
        else:
            torch.onnx.export(
                module,
                (x,),
                str(path),
                dynamo=False,
                do_constant_folding=True,
                input_names=["x"],
                output_names=["y"],
                opset_version=17,
                verbose=False,
            )
    return onnx.load(str(path))


def conv_count(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "Conv")


def io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [v.name for v in model.graph.input], [v.name for v in model.graph.output]


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in sess.get_inputs()]
    return sess.run(None, {name: x})[0]


def assert_close(actual, reference, rel: float = REL_TOL) -> None:
    """max |actual - reference| <= rel * max |reference|."""
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    assert actual.shape == reference.shape, f"shape {actual.shape} != {reference.shape}"
    err = float(np.max(np.abs(actual - reference)))
    scale = float(np.max(np.abs(reference)))
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} * max |reference| {scale:.3g}"


def random_input(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_deploy_form_matches_training_form_in_torch(family):
    """The reference deploy forms are right: same function as the training-time module."""
    model, shape = tm.build(family)
    deployed = tm.deploy(model)
    x = random_input(shape, 1)
    with torch.no_grad():
        assert_close(deployed(x).numpy(), model(x).numpy())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules())


@pytest.mark.parametrize("family,exporter", CASES)
def test_optimize_torch_export(family, exporter, tmp_path):
    model, shape = tm.build(family)
    deployed = tm.deploy(model)
    x_export = random_input(shape, 0)

    train_onnx = export(model, x_export, tmp_path / "train.onnx", exporter)
    deploy_onnx = export(deployed, x_export, tmp_path / "deploy.onnx", exporter)
    assert len(train_onnx.graph.node) > len(deploy_onnx.graph.node)  # there is something to fold

    optimized, report = onnxrep.optimize(tmp_path / "train.onnx")

    # (a) as many Conv nodes as the deploy form, and no BN left
    assert conv_count(optimized) == conv_count(deploy_onnx), report.to_dict()
    assert report.ops_after.get("Conv", 0) == conv_count(optimized)
    assert "BatchNormalization" not in report.ops_after, report.to_dict()
    # (b)
    assert report.rewritten > 0

    # (c) the optimized model computes what the torch training-time module computes
    x = random_input(shape, 1)
    with torch.no_grad():
        reference = model(x).numpy()
    assert_close(run_ort(optimized, x.numpy()), reference)

    # (d) graph input and output names unchanged
    assert io_names(optimized) == io_names(train_onnx) == (["x"], ["y"])

    # (e) a fixed point
    again, report2 = onnxrep.optimize(optimized)
    assert report2.rewritten == 0, report2.to_dict()
    assert conv_count(again) == conv_count(optimized)


@pytest.mark.parametrize("family,exporter", NEGATIVE_CASES)
def test_negative_not_merged(family, exporter, tmp_path):
    """Nothing is merged across a boundary where merging is wrong (borders) or costs more."""
    model, shape = tm.build(family)
    x_export = random_input(shape, 0)
    train_onnx = export(model, x_export, tmp_path / "train.onnx", exporter)

    optimized, report = onnxrep.optimize(tmp_path / "train.onnx")

    assert conv_count(optimized) == conv_count(train_onnx), report.to_dict()
    x = random_input(shape, 1)
    with torch.no_grad():
        reference = model(x).numpy()
    assert_close(run_ort(optimized, x.numpy()), reference)
    assert io_names(optimized) == io_names(train_onnx) == (["x"], ["y"])
