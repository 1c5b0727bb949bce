"""API options: argument checks (ValueError naming the valid values, before any work), input
shapes fixed for the optimization and the verification, the report (schema and onnxrep version,
wall time per stage, not_rewritten, sizes, changed), progress events and log records."""

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxrep
from graphs import Builder, histogram, run
from onnxrep import Progress, Report, UsageError, api


def _model(c=8, shape=("N", 8, 8, 8)):
    b = Builder(c, input_shape=list(shape))
    return b.model(b.relu(b.sum([b.bn(b.conv("x", c, c, 3, bias=False), c), b.bn(b.conv("x", c, c, 1), c), b.bn("x", c)])))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"passes": "parallel-merge,nope"}, "unknown pass 'nope'; available: normalize-"),
        ({"on_mismatch": "bisekt"}, "on_mismatch must be one of fail, bisect, got 'bisekt'"),
        ({"tolerance": -1}, "tolerance must be a finite number >= 0, got -1"),
        ({"tolerance": "0"}, "tolerance must be a number >= 0"),
        ({"cleanup": "no"}, "cleanup must be True or False, got 'no'"),
        ({"verify": 1}, "verify must be True or False, got 1"),
        ({"input_shapes": [1, 8, 8, 8]}, "input_shapes must be a dict of input name -> shape"),
        ({"input_shapes": {"x": "1,8,8,8"}}, "input_shapes: the shape of 'x' must be a list of integers >= 1"),
        ({"input_shapes": {"x": [1, 8, 0, 8]}}, "input_shapes: the shape of 'x' must be a list of integers >= 1, got [1, 8, 0, 8]"),
        ({"input_shapes": {"x": [1, 8, -1, 8]}}, "must be a list of integers >= 1"),
        ({"input_shapes": {"x": [1.0, 8, 8, 8]}}, "must be a list of integers >= 1"),
        ({"input_shapes": {"y": [1, 8, 8, 8]}}, "input_shapes: the model has no input 'y' (inputs: x)"),
        ({"input_shapes": {"x": [1, 8, 8]}}, "input_shapes: input 'x' has rank 4 [N, 8, 8, 8], got 3 dims [1, 8, 8]"),
        ({"input_shapes": {"x": [1, 4, 8, 8]}}, "input_shapes: input 'x' has size 8 on axis 1, got 4"),
        ({"progress": 3}, "progress must be a callable"),
    ],
)
def test_invalid_arguments_are_value_errors_with_the_valid_values(kwargs, words):
    model = _model()
    before = model.SerializeToString()
    with pytest.raises(ValueError) as err:
        onnxrep.optimize(model, **kwargs)
    assert isinstance(err.value, UsageError)
    assert words in str(err.value), str(err.value)
    assert model.SerializeToString() == before


def test_argument_errors_come_before_the_model_is_read(tmp_path):
    missing = tmp_path / "missing.onnx"
    for kwargs in ({"cleanup": None}, {"input_shapes": {"x": [0]}}, {"passes": "nope"}):
        with pytest.raises(UsageError):
            onnxrep.optimize(missing, **kwargs)


def test_a_single_pass_name_as_a_string():
    out, report = onnxrep.optimize(_model(), passes="parallel-merge")
    assert [p.name for p in report.passes] == ["parallel-merge"]
    assert histogram(out) == {"Conv": 1, "Relu": 1}


# --------------------------------------------------------------------------------------------
# input shapes
# --------------------------------------------------------------------------------------------


def _dims(vi):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def test_input_shapes_fix_the_inputs_and_the_outputs_of_the_same_symbol():
    model = _model()
    assert _dims(model.graph.output[0]) == ["N", 8, 8, 8]
    out, report = onnxrep.optimize(model, input_shapes={"x": [3, 8, 8, 8]}, verify=True, seeds=1)
    assert _dims(out.graph.input[0]) == [3, 8, 8, 8]
    assert _dims(out.graph.output[0]) == [3, 8, 8, 8]
    assert _dims(model.graph.input[0]) == ["N", 8, 8, 8]  # the given model is not changed
    assert report.input_shapes == {"x": [3, 8, 8, 8]} and report.changed
    assert report.verification["ok"]
    # every input set of the verification has the fixed shape
    assert {tuple(s["shapes"]["x"]) for s in report.verification["input_sets"]} == {(3, 8, 8, 8)}


def test_input_shapes_give_unnamed_dynamic_dims_their_values_in_the_verification():
    model = _model(shape=(1, 8, 8, 8))
    for vi in (model.graph.input[0], model.graph.output[0]):
        for d in vi.type.tensor_type.shape.dim[2:]:
            d.Clear()  # unnamed dynamic dims: neither a value nor a name
    onnx.checker.check_model(model)
    out, report = onnxrep.optimize(model, input_shapes={"x": [1, 8, 6, 10]}, verify=True, seeds=1)
    assert report.verification["ok"] and histogram(out) == {"Conv": 1, "Relu": 1}
    assert _dims(out.graph.input[0]) == [1, 8, 6, 10]
    assert {tuple(s["shapes"]["x"]) for s in report.verification["input_sets"]} == {(1, 8, 6, 10)}


def test_input_shapes_static_shapes_let_more_folds_apply():
    """An average pool's padding ring needs a static spatial size: with symbolic H and W the
    fold that needs it declines, with fixed shapes it applies."""
    c = 4
    b = Builder(c, input_shape=[1, c, "H", "W"])
    y = b.sum([b.conv("x", c, c, 3), b.node("Conv", ["x", b.const(b.weight(c, c, 3), "w")], kernel_shape=[3, 3], auto_pad="SAME_UPPER")])
    model = b.model(y)
    _, free = onnxrep.optimize(model)
    _, fixed = onnxrep.optimize(model, input_shapes={"x": [1, c, 8, 8]}, verify=True, seeds=1)
    assert fixed.rewritten > free.rewritten, (free.to_dict(False)["passes"], fixed.to_dict(False)["passes"])
    assert fixed.verification["ok"]


def test_one_symbol_given_two_values_is_refused():
    b = Builder(4, input_shape=["N", 4, 8, 8])
    b.inputs.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 4, 8, 8]))
    model = b.model(b.add("x", "z"))
    with pytest.raises(UsageError, match="input_shapes: dim 'N' is given two values, 1 and 2"):
        onnxrep.optimize(model, input_shapes={"x": [1, 4, 8, 8], "z": [2, 4, 8, 8]})


def test_verify_takes_input_shapes_for_both_models():
    model = _model()
    out, _ = onnxrep.optimize(model)
    result = onnxrep.verify(model, out, seeds=1, input_shapes={"x": [2, 8, 8, 8]})
    assert result.ok and {tuple(s.shapes["x"]) for s in result.input_sets} == {(2, 8, 8, 8)}


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------


def test_report_carries_schema_version_time_per_stage_and_not_rewritten():
    c = 8
    b = Builder(c, input_shape=[1, c, 8, 8])
    other = b.conv("x", c, c, 1)
    y = b.sum([b.conv("x", c, c, 3), b.conv(other, c, c, 3)])  # the branches read different tensors
    out, report = onnxrep.optimize(b.model(y), verify=True, seeds=1)
    assert isinstance(report, Report) and isinstance(report, onnxrep.engine.Report)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["schema_version"] == api.SCHEMA_VERSION == 1
    assert data["onnxrep_version"] == onnxrep.__version__
    assert set(data["seconds"]) == {"load", "passes", "cleanup", "verify", "not_rewritten", "total"}
    assert data["seconds"]["total"] >= sum(v for k, v in data["seconds"].items() if k != "total") - 1e-3
    assert all(v >= 0 for v in data["seconds"].values())
    assert data["not_rewritten"] and data["not_rewritten"][0]["kind"] == "sum"
    assert data["size_before"] > 0 and data["size_after"] > 0
    assert data["cleanup"] is not None and data["input_external_data"] is False
    assert "seconds" not in report.to_dict(timings=False)


def test_report_says_when_nothing_changed():
    b = Builder(4, input_shape=[1, 4, 8, 8])
    model = b.model(b.relu(b.conv("x", 4, 4, 3)))
    out, report = onnxrep.optimize(model)
    assert not report.changed and report.rewritten == 0 and not any(report.cleanup.values())


# --------------------------------------------------------------------------------------------
# progress and logging
# --------------------------------------------------------------------------------------------


def test_progress_events_cover_every_stage_in_order():
    events: list[Progress] = []
    onnxrep.optimize(_model(), verify=True, seeds=1, progress=events.append)
    stages = list(dict.fromkeys(e.stage for e in events))
    assert stages == ["load", "passes", "cleanup", "verify", "not_rewritten"]
    for stage in stages:
        mine = [e for e in events if e.stage == stage]
        assert mine[0].done == 0 and not mine[0].end and mine[-1].end
        assert sum(e.end for e in mine) == 1
    passes = [e for e in events if e.stage == "passes" and not e.end and e.done]
    assert passes and {e.detail for e in passes} >= {"parallel-merge"}
    verify = [e for e in events if e.stage == "verify" and not e.end and e.done]
    total = verify[0].total
    assert [e.done for e in verify] == list(range(1, total + 1))


def test_verify_sends_progress_events():
    events: list[Progress] = []
    model = _model()
    assert onnxrep.verify(model, model, seeds=1, progress=events.append).ok
    assert {e.stage for e in events} == {"verify"} and events[0].done == 0 and events[-1].end


def test_log_records_go_to_the_onnxrep_logger(caplog):
    with caplog.at_level(logging.DEBUG, logger="onnxrep"):
        onnxrep.optimize(_model(), verify=True, seeds=1)
    names = {r.name for r in caplog.records}
    assert names == {"onnxrep"}, names
    text = "\n".join(r.getMessage() for r in caplog.records)
    for stage in ("load:", "passes:", "cleanup:", "verify: ok"):
        assert stage in text, text
    assert any(r.levelno == logging.DEBUG and "round 1: parallel-merge" in r.getMessage() for r in caplog.records)


def test_calls_leave_graphsurgeon_loggers_as_the_caller_set_them():
    import onnx_graphsurgeon as gs

    std = logging.getLogger("onnx_graphsurgeon")
    level, severity = std.level, gs.logger.G_LOGGER.severity
    try:
        std.setLevel(logging.DEBUG)
        gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.VERBOSE
        seen = []
        original = gs.import_onnx

        def spy(model):
            seen.append((std.level, gs.logger.G_LOGGER.severity))
            return original(model)

        gs.import_onnx = spy
        try:
            onnxrep.optimize(_model(), verify=True, seeds=1)
        finally:
            gs.import_onnx = original
        assert std.level == logging.DEBUG and gs.logger.G_LOGGER.severity == gs.logger.G_LOGGER.VERBOSE
        assert seen and all(s == (logging.ERROR, gs.logger.G_LOGGER.ERROR) for s in seen)
    finally:
        std.setLevel(level)
        gs.logger.G_LOGGER.severity = severity


def test_outputs_agree_with_the_original_at_the_fixed_shape():
    model = _model()
    out, _ = onnxrep.optimize(model, input_shapes={"x": [2, 8, 8, 8]})
    x = np.random.default_rng(3).standard_normal((2, 8, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------------------------------
# a model that does not run on the inputs made for it; interface; write_unchanged; costs
# --------------------------------------------------------------------------------------------


def _flatten_model():
    """x [N, 8, H, W] -> Reshape [0, 512] -> MatMul: runs only where H * W = 64."""
    w = np.random.default_rng(0).standard_normal((512, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["y"]),
    ]
    inits = [onnx.numpy_helper.from_array(np.array([0, 512], np.int64), "shape"), onnx.numpy_helper.from_array(w, "w")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8, "H", "W"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_an_original_that_does_not_run_on_the_default_dims_is_an_input_error_with_a_hint():
    model = _flatten_model()
    with pytest.raises(onnxrep.InputError) as err:
        onnxrep.optimize(model, verify=True, seeds=1)
    text = str(err.value)
    assert text.startswith("the original model fails in onnxruntime on input set")
    assert text.endswith(
        "; symbolic dims set by default: N=1 and 2, H=32, W=32 (give their values with --dim NAME=INT or "
        "--input-shapes NAME:D1,D2,..; in Python dims= or input_shapes=)"
    ), text
    assert not isinstance(err.value, onnxrep.VerificationError)
    # with the dims given, it runs and verifies
    _, report = onnxrep.optimize(model, verify=True, seeds=1, dims={"H": 8, "W": 8})
    assert report.verification["ok"]
    _, report = onnxrep.optimize(model, verify=True, seeds=1, input_shapes={"x": [2, 8, 4, 16]})
    assert report.verification["ok"]


def test_interface_before_and_after():
    model = _model()
    _, report = onnxrep.optimize(model, input_shapes={"x": [2, 8, 8, 8]})
    assert report.interface_before == {
        "opset": 17, "ir_version": 8,
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 8, 8, 8]}],
        "outputs": [{"name": model.graph.output[0].name, "dtype": "float32", "shape": ["N", 8, 8, 8]}],
    }
    assert report.interface_after["inputs"] == [{"name": "x", "dtype": "float32", "shape": [2, 8, 8, 8]}]
    assert report.to_dict()["interface_after"] == report.interface_after


def test_optimize_file_can_leave_an_unchanged_model_unwritten(tmp_path):
    b = Builder(4, input_shape=[1, 4, 8, 8])
    src = tmp_path / "in.onnx"
    onnx.save(b.model(b.relu(b.conv("x", 4, 4, 3))), src)
    report = api.optimize_file(src, tmp_path / "out.onnx", write_unchanged=False, seeds=1)
    assert not report.changed and report.output is None and "write" not in report.seconds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]
    report = api.optimize_file(src, tmp_path / "out.onnx", seeds=1)
    assert report.output and (tmp_path / "out.onnx").exists()
    changed = tmp_path / "train.onnx"
    onnx.save(_model(), changed)
    report = api.optimize_file(changed, tmp_path / "deploy.onnx", write_unchanged=False, seeds=1)
    assert report.changed and (tmp_path / "deploy.onnx").exists()
    with pytest.raises(UsageError, match="write_unchanged must be True or False"):
        api.optimize_file(changed, tmp_path / "x.onnx", write_unchanged="no")


def test_costs_after_cleanup_keep_every_field_of_the_engine():
    from test_cleanup import _fastvit_like

    model, _ = _fastvit_like()
    _, raw = onnxrep.optimize(model, cleanup=False)
    _, report = onnxrep.optimize(model)
    for before, after in ((raw.cost_before, report.cost_before), (raw.cost_after, report.cost_after)):
        assert after.macs == before.macs and after.exact == before.exact
        for name in set(vars(before)) - {"params"}:
            assert getattr(after, name) == getattr(before, name), name
    # Constant-node values count as weights before and after; the shared bias is counted once
    assert report.cost_after.params == raw.cost_after.params + 3 - 8
