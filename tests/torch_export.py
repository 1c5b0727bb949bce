"""Helpers shared by the real-export tests (``tests/test_torch_exports*.py``; no tests here):
export a PyTorch module with the TorchScript or the dynamo ``torch.onnx`` exporter, run an ONNX
model in onnxruntime with graph optimizations off, compare with the torch module, count ops, and
the checks every (family, exporter) case of those files makes.

A registry entry's input shape is one shape, or a tuple of shapes for a module with several
inputs; the graph inputs are named ``x`` (then ``w``), the output ``y``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pathlib
import warnings

import numpy as np
import pytest

# imported by the test files after their own importorskip; skips, never fails, without these
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import onnxrep  # noqa: E402
from torch_blocks import deploy  # noqa: E402

REL_TOL = 1e-5
TORCHSCRIPT, TORCHSCRIPT_DYNAMIC, DYNAMO = "torchscript", "torchscript-dynamic", "dynamo"
EXPORTERS = (TORCHSCRIPT, DYNAMO)
INPUT_NAMES = ("x", "w")  # the second one only for two-input blocks


# --------------------------------------------------------------------------------------------
# export and run
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet():
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


def as_tuple(xs) -> tuple:
    """One input as a 1-tuple; a tuple or list of inputs as a tuple."""
    return tuple(xs) if isinstance(xs, (tuple, list)) else (xs,)


def input_names(count: int) -> list[str]:
    """The graph input names of a module with ``count`` inputs."""
    return list(INPUT_NAMES[:count])


def export(module, xs, path: pathlib.Path, exporter: str) -> onnx.ModelProto:
    """Export ``module`` on example input ``xs`` (a tensor or a tuple of tensors) to ``path`` and
    return the loaded model."""
    xs = as_tuple(xs)
    names = input_names(len(xs))
    with quiet():
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


def op_count(model: onnx.ModelProto, *ops: str) -> int:
    """How many nodes of ``model``'s graph are one of ``ops``."""
    return sum(1 for n in model.graph.node if n.op_type in ops)


def io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [v.name for v in model.graph.input], [v.name for v in model.graph.output]


def run_ort(model: onnx.ModelProto, xs) -> np.ndarray:
    """The first output of ``model`` on ``xs`` (an array or a tuple of arrays, one per graph input)."""
    xs = as_tuple(xs)
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


def shapes_of(shape) -> list[tuple[int, ...]]:
    """The input shapes of a registry entry: one shape, or a tuple of shapes."""
    return [tuple(s) for s in shape] if isinstance(shape[0], tuple) else [tuple(shape)]


def random_inputs(shape, seed: int) -> tuple[torch.Tensor, ...]:
    """Seeded standard-normal inputs for a registry entry's shape (or shapes)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g) for s in shapes_of(shape))


def random_input(shape, seed: int) -> torch.Tensor:
    """One seeded standard-normal input of ``shape``."""
    (x,) = random_inputs(shape, seed)
    return x


def run_shape(shape, exporter: str):
    """The input shape to run an export on: one more in the batch dim for a dynamic-batch export."""
    return (shape[0] + 1,) + tuple(shape[1:]) if exporter == TORCHSCRIPT_DYNAMIC else shape


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def assert_matches_torch(onnx_model: onnx.ModelProto, module, shape, seed: int = 1) -> None:
    """``onnx_model`` (in onnxruntime) computes what the torch ``module`` computes, on seeded inputs."""
    xs = random_inputs(shape, seed)
    with torch.no_grad():
        reference = module(*xs).numpy()
    assert_close(run_ort(onnx_model, tuple(x.numpy() for x in xs)), reference)


def assert_fixed_point(optimized: onnx.ModelProto, *ops: str) -> None:
    """onnxrep rewrites nothing more in ``optimized`` and keeps its count of ``ops`` nodes."""
    again, report = onnxrep.optimize(optimized)
    assert report.rewritten == 0, report.to_dict()
    assert op_count(again, *ops) == op_count(optimized, *ops)


def check_deploy_form(tm, family: str):
    """The reference deploy form of ``family`` (registry module ``tm``) computes what the
    training-time module computes, in torch; returns the deploy form."""
    model, shape = tm.build(family)
    deployed = deploy(model)
    xs = random_inputs(shape, 1)
    with torch.no_grad():
        assert_close(deployed(*xs).numpy(), model(*xs).numpy())
    return deployed


def check_optimize_export(tm, family: str, exporter: str, tmp_path: pathlib.Path, ops, folded: bool = False) -> None:
    """Export the training-time module of ``family`` (registry module ``tm``) and its deploy form,
    optimize the training-time export with onnxrep, and check that the result (a) has as many
    ``ops`` nodes as the deploy export and no BatchNormalization, (b) was rewritten (unless
    ``folded``: the exporter already did the fold, the export must then stay as it is), (c)
    computes what the torch module computes, (d) keeps the graph input/output names and (e) is a
    fixed point of onnxrep."""
    model, shape = tm.build(family)
    deployed = deploy(model)
    xs_export = random_inputs(shape, 0)

    train_onnx = export(model, xs_export, tmp_path / "train.onnx", exporter)
    deploy_onnx = export(deployed, xs_export, tmp_path / "deploy.onnx", exporter)
    if folded:  # the exporter did the fold: the export must stay as it is
        assert len(train_onnx.graph.node) == len(deploy_onnx.graph.node)
    else:
        assert len(train_onnx.graph.node) > len(deploy_onnx.graph.node)  # there is something to fold

    optimized, report = onnxrep.optimize(tmp_path / "train.onnx")

    # (a) as many ``ops`` nodes as the deploy form, and no BN left
    assert op_count(optimized, *ops) == op_count(deploy_onnx, *ops), report.to_dict()
    assert sum(report.ops_after.get(op, 0) for op in ops) == op_count(optimized, *ops)
    assert "BatchNormalization" not in report.ops_after, report.to_dict()
    # (b)
    assert report.rewritten > 0 or folded

    # (c) the optimized model computes what the torch training-time module computes
    assert_matches_torch(optimized, model, run_shape(shape, exporter))

    # (d) graph input and output names unchanged
    assert io_names(optimized) == io_names(train_onnx) == (["x"], ["y"])

    # (e) a fixed point
    assert_fixed_point(optimized, *ops)


def check_not_merged(tm, family: str, exporter: str, tmp_path: pathlib.Path, ops) -> onnx.ModelProto:
    """Export the (negative) module of ``family`` (registry module ``tm``), optimize it with
    onnxrep, and check that the result keeps all its ``ops`` nodes, computes what the torch module
    computes and keeps the graph input/output names; returns the optimized model."""
    model, shape = tm.build(family)
    xs_export = random_inputs(shape, 0)
    train_onnx = export(model, xs_export, tmp_path / "train.onnx", exporter)

    optimized, report = onnxrep.optimize(tmp_path / "train.onnx")

    assert op_count(optimized, *ops) == op_count(train_onnx, *ops), report.to_dict()
    assert_matches_torch(optimized, model, shape)
    assert io_names(optimized) == io_names(train_onnx) == (input_names(len(xs_export)), ["y"])
    return optimized
