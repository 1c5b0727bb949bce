"""The wrong-model routes found by review, end to end: each model is saved to a file and goes
through ``onnxrep.optimize(path)`` (no verification) and through the command line (verification
on). Either the output equals the original on inputs that reach the difference (batch 2 where the
batch is symbolic), or the model is refused with one line and nothing is written."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxrep
from helpers import invoke
from onnxrep.equivalence import reference_session

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits=(), value_info=(), opset=19):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def stale_batch():
    """A dynamic batch whose value_info still says batch 1 (an export made dynamic by editing its
    inputs and outputs only): Relu -> Shape -> Gather(0) -> Reshape to (N, -1)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("Shape", ["h"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["h", "shape"], ["y"]),
    ]
    inits = [_const("zero", np.int64(0)), _const("zero1", np.array([0], np.int64)), _const("minus1", np.array([-1], np.int64))]
    stale = [helper.make_tensor_value_info("h", F, [1, 3, 4, 4])]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 3, 4, 4])],
                   [helper.make_tensor_value_info("y", F, ["N", 48])], inits, stale)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)}
    return model, feeds


def ceil_pool_size():
    """MaxPool with ceil_mode=1 (L=5, k=2, s=2, pad=1: onnx infers 4, the runtime gives 3), then
    Size of its output used as a scale."""
    nodes = [
        helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
        helper.make_node("Size", ["p"], ["n"]),
        helper.make_node("Cast", ["n"], ["nf"], to=F),
        helper.make_node("Mul", ["p", "nf"], ["y"]),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [1, 2, 5, 5])], [helper.make_tensor_value_info("y", F, [1, 2, 3, 3])])
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 2, 5, 5)).astype(np.float32)}
    return model, feeds


def softmax_opset11():
    """Softmax at opset 11 of a constant [2, 3, 4] on axis 1 (coerced to 2-D, not per axis)."""
    c = np.random.default_rng(2).standard_normal((2, 3, 4)).astype(np.float32)
    nodes = [helper.make_node("Softmax", ["c"], ["s"], axis=1), helper.make_node("Add", ["x", "s"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [2, 3, 4])], [helper.make_tensor_value_info("y", F, [2, 3, 4])],
                   [_const("c", c)], opset=11)
    return model, {"x": np.zeros((2, 3, 4), np.float32)}


def dearer_chain():
    """A depthwise 3x3 -> 1x1 chain summed with a dense 3x3 that is also a graph output: merging
    the chain would raise MACs and weights, and parallel-merge would then decline the sum."""
    rng = np.random.default_rng(3)
    c = 16
    inits = [
        _const("wd", rng.standard_normal((c, 1, 3, 3)).astype(np.float32)),
        _const("wp", rng.standard_normal((c, c, 1, 1)).astype(np.float32)),
        _const("wb", rng.standard_normal((c, c, 3, 3)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wd"], ["d"], group=c, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["d", "wp"], ["a"]),
        helper.make_node("Conv", ["x", "wb"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [1, c, 8, 8])],
                   [helper.make_tensor_value_info("y", F, [1, c, 8, 8]), helper.make_tensor_value_info("b", F, [1, c, 8, 8])], inits)
    return model, {"x": rng.standard_normal((1, c, 8, 8)).astype(np.float32)}


CASES = {"stale_batch": stale_batch, "ceil_pool_size": ceil_pool_size, "softmax_opset11": softmax_opset11, "dearer_chain": dearer_chain}


def _run(model, feeds):
    session = reference_session(model, log_severity=4)
    return session.run(None, feeds)


def _cost(model):
    return onnxrep.optimize(model, passes=[])[1].cost_before


def assert_not_dearer(model, out):
    """No more MACs, and no more weights unless fewer elements are moved (a Size -> Cast folded
    into a one-element constant: +1 weight, two nodes and their outputs gone)."""
    before, after = _cost(model), _cost(out)
    assert after.macs <= before.macs, (before, after)
    assert after.params <= before.params or after.traffic(after.params) < before.traffic(before.params), (before, after)


@pytest.mark.parametrize("case", sorted(CASES))
def test_optimize_path_without_verification_is_right_on_inputs_that_reach_the_difference(case, tmp_path):
    model, feeds = CASES[case]()
    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    data = path.read_bytes()
    out, _ = onnxrep.optimize(path)
    onnx.checker.check_model(out)  # (full_check's shape inference is the one wrong on ceil-mode pools)
    for want, got in zip(_run(model, feeds), _run(out, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert path.read_bytes() == data
    assert_not_dearer(model, out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_with_verification_writes_a_right_model(case, tmp_path):
    model, feeds = CASES[case]()
    path, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    res = invoke("optimize", path, "-o", out, "-q")
    assert res.exit_code == 0, res.stderr
    for want, got in zip(_run(model, feeds), _run(onnx.load(out), feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bn6_in_training_mode_is_refused_to_fold_through_both_doors(tmp_path):
    """BatchNormalization-6 with is_test=0 normalizes with the batch's statistics: never folded."""
    c = 4
    rng = np.random.default_rng(4)
    inits = [_const("w", rng.standard_normal((c, c, 1, 1)).astype(np.float32))]
    inits += [_const(n, rng.uniform(0.5, 1.5, c).astype(np.float32)) for n in ("s", "b", "m", "v")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]), helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["y"], is_test=0)]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [2, c, 3, 3])], [helper.make_tensor_value_info("y", F, [2, c, 3, 3])], inits, opset=6)
    model.ir_version = 4
    path = tmp_path / "bn6.onnx"
    onnx.save(model, path)
    out, report = onnxrep.optimize(path)
    assert [n.op_type for n in out.graph.node] == ["Conv", "BatchNormalization"]
    assert any("training mode" in r for p in report.passes for r in p.skipped.values())
