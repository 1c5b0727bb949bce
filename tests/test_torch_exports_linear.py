"""End to end on real exporter output: the linear-layer (Gemm / MatMul) re-parameterizable
families (RepViT classifier head, depth-pruned DeiT MLP block, MLP without activation,
layer-scaled residual linear, RepMLP-style parallel linears, Linear -> BN), exported with the
TorchScript and the dynamo ``torch.onnx`` exporters, then optimized by onnxrep.

For every (family, exporter) the training-time module and its deploy form (built in torch by the
model's own ``switch_to_deploy``, see ``tests/torch_models_linear.py``) are exported; the optimized
training-time export must have as many Gemm + MatMul nodes as the deploy export and no
BatchNormalization, must have rewritten something, must compute what the torch module computes
(onnxruntime with graph optimizations off), must keep the graph input/output names, and must be a
fixed point of onnxrep. One TorchScript case has a dynamic batch dim.

The negative blocks (``torch_models_linear.NEGATIVE``) must keep all their Gemm + MatMul nodes:
merging across an activation or a non-constant weight would be wrong, across a bottleneck would
cost more.
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


import torch_models_linear as tm  # noqa: E402  (tests/ is on pytest's pythonpath)

REL_TOL = 1e-5
TORCHSCRIPT, TORCHSCRIPT_DYNAMIC, DYNAMO = "torchscript", "torchscript-dynamic", "dynamo"
EXPORTERS = (TORCHSCRIPT, DYNAMO)
INPUT_NAMES = ("x", "w")  # the second one only for the two-input negative block
LINEAR_OPS = ("Gemm", "MatMul")

FAMILIES = list(tm.FAMILIES)
NEGATIVE = list(tm.NEGATIVE)
CASES = [(family, exporter) for family in FAMILIES for exporter in EXPORTERS]
CASES.append(("deit_pruned", TORCHSCRIPT_DYNAMIC))  # dynamic batch dim (dynamic_axes)
NEGATIVE_CASES = [(family, exporter) for family in NEGATIVE for exporter in EXPORTERS]
#: (family, exporter) whose training-time export is already its deploy form: the dynamo exporter's
#: onnxscript optimizer folds a BatchNormalization after a Gemm itself (its ``fuse_batchnorm``
#: rewrite, Gemm -> BN -> Gemm), so onnxrep has nothing to rewrite there
FOLDED_BY_EXPORTER = {("bn_after_linear", DYNAMO)}


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


def shapes_of(shape) -> list[tuple[int, ...]]:
    """The input shapes of a registry entry: one shape, or a tuple of shapes."""
    return [tuple(s) for s in shape] if isinstance(shape[0], tuple) else [tuple(shape)]


def export(module, xs: tuple, path: pathlib.Path, exporter: str) -> onnx.ModelProto:
    """Export ``module`` on example inputs ``xs`` to ``path`` and return the loaded model."""
    names = list(INPUT_NAMES[: len(xs)])
    with _quiet():
        if exporter == DYNAMO:
            torch.onnx.export(module, xs, str(path), dynamo=True, input_names=names, output_names=["y"], verbose=False)
        else:
            dynamic = {"dynamic_axes": {"x": {0: "N"}, "y": {0: "N"}}} if exporter == TORCHSCRIPT_DYNAMIC else {}
            torch.onnx.export(
                module,
                xs,
                str(path),
                dynamo=False,
                do_constant_folding=True,
                input_names=names,
                output_names=["y"],
                opset_version=17,
                verbose=False,
                **dynamic,
            )
    return onnx.load(str(path))


def linear_count(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type in LINEAR_OPS)


def io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [v.name for v in model.graph.input], [v.name for v in model.graph.output]


def run_ort(model: onnx.ModelProto, xs: tuple[np.ndarray, ...]) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert len(names) == len(xs)
    return sess.run(None, dict(zip(names, xs)))[0]


def assert_close(actual, reference, rel: float = REL_TOL) -> None:
    """max |actual - reference| <= rel * max |reference|."""
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    assert actual.shape == reference.shape, f"shape {actual.shape} != {reference.shape}"
    err = float(np.max(np.abs(actual - reference)))
    scale = float(np.max(np.abs(reference)))
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} * max |reference| {scale:.3g}"


def random_inputs(shape, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g) for s in shapes_of(shape))


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_deploy_form_matches_training_form_in_torch(family):
    """The reference deploy forms are right: same function as the training-time module, one Linear."""
    model, shape = tm.build(family)
    deployed = tm.deploy(model)
    xs = random_inputs(shape, 1)
    with torch.no_grad():
        assert_close(deployed(*xs).numpy(), model(*xs).numpy())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
    assert sum(isinstance(m, torch.nn.Linear) for m in deployed.modules()) == 1


@pytest.mark.parametrize("family,exporter", CASES)
def test_optimize_torch_export(family, exporter, tmp_path):
    model, shape = tm.build(family)
    deployed = tm.deploy(model)
    xs_export = random_inputs(shape, 0)

    train_onnx = export(model, xs_export, tmp_path / "train.onnx", exporter)
    deploy_onnx = export(deployed, xs_export, tmp_path / "deploy.onnx", exporter)
    folded = (family, exporter) in FOLDED_BY_EXPORTER
    if folded:  # the exporter did the fold: the export must stay as it is
        assert len(train_onnx.graph.node) == len(deploy_onnx.graph.node)
    else:
        assert len(train_onnx.graph.node) > len(deploy_onnx.graph.node)  # there is something to fold

    optimized, report = onnxrep.optimize(tmp_path / "train.onnx")

    # (a) as many Gemm + MatMul nodes as the deploy form, and (b) no BN left
    assert linear_count(optimized) == linear_count(deploy_onnx), report.to_dict()
    assert sum(report.ops_after.get(op, 0) for op in LINEAR_OPS) == linear_count(optimized)
    assert "BatchNormalization" not in report.ops_after, report.to_dict()
    assert report.rewritten > 0 or folded

    # (c) the optimized model computes what the torch training-time module computes
    test_shape = (shape[0] + 1,) + tuple(shape[1:]) if exporter == TORCHSCRIPT_DYNAMIC else shape
    xs = random_inputs(test_shape, 1)
    with torch.no_grad():
        reference = model(*xs).numpy()
    assert_close(run_ort(optimized, tuple(x.numpy() for x in xs)), reference)

    # (d) graph input and output names unchanged
    assert io_names(optimized) == io_names(train_onnx) == (["x"], ["y"])

    # (e) a fixed point
    again, report2 = onnxrep.optimize(optimized)
    assert report2.rewritten == 0, report2.to_dict()
    assert linear_count(again) == linear_count(optimized)


@pytest.mark.parametrize("family,exporter", NEGATIVE_CASES)
def test_negative_not_merged(family, exporter, tmp_path):
    """Nothing is merged across an activation, a non-constant weight, or where merging costs more."""
    model, shape = tm.build(family)
    xs_export = random_inputs(shape, 0)
    train_onnx = export(model, xs_export, tmp_path / "train.onnx", exporter)

    optimized, report = onnxrep.optimize(tmp_path / "train.onnx")

    assert linear_count(optimized) == linear_count(train_onnx), report.to_dict()
    xs = random_inputs(shape, 1)
    with torch.no_grad():
        reference = model(*xs).numpy()
    assert_close(run_ort(optimized, tuple(x.numpy() for x in xs)), reference)
    names = list(INPUT_NAMES[: len(xs)])
    assert io_names(optimized) == io_names(train_onnx) == (names, ["y"])

    again, report2 = onnxrep.optimize(optimized)
    assert report2.rewritten == 0, report2.to_dict()
    assert linear_count(again) == linear_count(optimized)
