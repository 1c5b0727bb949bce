"""Reading and writing models piece by piece: the same models as onnx.load / onnx.save_model, lazy
initializers, external data, and the command line on models with external data."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from onnxrep import cli, engine, io
from onnxrep.errors import InputError
from onnxrep.models import repvgg_a0


def _rich_model() -> onnx.ModelProto:
    """Large and small initializers in a mixed order, an If with initializers of its own in both
    branches, a Constant node, metadata and doc strings (sparse tensors are refused:
    tests/test_io_hostile.py)."""
    rng = np.random.default_rng(0)
    big = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    inits = [
        numpy_helper.from_array(big(64, 512), "w_big"),  # 128 KB: read and written on its own
        numpy_helper.from_array(np.array([1.5], np.float32), "s_small"),
        numpy_helper.from_array(big(512), "b_mid"),  # 2 KB: above onnx's external-data threshold
        numpy_helper.from_array(big(128, 512), "w_big2"),
        numpy_helper.from_array(np.arange(4, dtype=np.int64), "ints"),
        numpy_helper.from_array(big(512).astype(np.float16), "half"),
    ]

    def branch(name, scale):
        return helper.make_graph(
            [helper.make_node("Mul", ["y", f"{name}_k"], [f"{name}_out"])],
            name, [], [helper.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT, [1, 512])],
            [numpy_helper.from_array(np.full((512,), scale, np.float32), f"{name}_k")],
        )

    nodes = [
        helper.make_node("MatMul", ["x", "w_big"], ["mm"]),
        helper.make_node("Add", ["mm", "b_mid"], ["a"]),
        helper.make_node("Mul", ["a", "s_small"], ["y0"]),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(big(512), "c_value")),
        helper.make_node("Add", ["y0", "c"], ["y"]),
        helper.make_node("ReduceSum", ["y"], ["cond_f"], keepdims=0),
        helper.make_node("Greater", ["cond_f", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["z"], then_branch=branch("then", 2.0), else_branch=branch("else", -1.0)),
    ]
    graph = helper.make_graph(
        nodes, "rich", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 512])],
        inits + [numpy_helper.from_array(np.array(0.0, np.float32), "zero")], doc_string="graph doc",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test", doc_string="model doc")
    helper.set_model_props(model, {"author": "tests", "note": "ünïcode"})
    return model


@pytest.fixture
def rich_path(tmp_path):
    path = tmp_path / "rich.onnx"
    onnx.save(_rich_model(), path)
    return path


@pytest.fixture
def repvgg_path(tmp_path):
    path = tmp_path / "repvgg.onnx"
    onnx.save(repvgg_a0(width_scale=0.25, resolution=32), path)
    return path


def _bytes(model):
    return model.SerializeToString()


def _content(report) -> dict:
    """A report's dict without its timings (which differ from run to run)."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if "seconds" not in k}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(report.to_dict())


@pytest.mark.parametrize("fixture", ["rich_path", "repvgg_path"])
def test_load_is_onnx_load(fixture, request, monkeypatch):
    path = request.getfixturevalue(fixture)
    expected = _bytes(onnx.load(path))
    with monkeypatch.context() as m:  # read piece by piece, not by onnx.load
        m.setattr(onnx, "load", lambda *a, **k: pytest.fail("onnx.load was called"))
        model, external = io.load(path)
    assert not external
    assert _bytes(model) == expected


def test_lazy_load_references_large_initializers_and_materializes_to_the_same_model(rich_path):
    lazy, _ = io.load(rich_path, lazy=True)
    sources = {t.name: io.lazy_source(t) for t in lazy.graph.initializer}
    assert {n for n, s in sources.items() if s} == {"w_big", "w_big2"}
    assert all(os.path.isabs(s.path) for s in sources.values() if s)
    assert io.tensor_bytes(lazy) == io.tensor_bytes(onnx.load(rich_path))
    io.check(lazy)
    assert _bytes(io.materialize(lazy)) == _bytes(onnx.load(rich_path))


def test_a_lazy_model_is_rejected_by_onnxruntime_not_misread(rich_path):
    lazy, _ = io.load(rich_path, lazy=True)
    # the reference's private key makes onnxruntime refuse the model format; its location is absolute
    with pytest.raises(Exception, match="(?i)absolute|model format error"):
        ort.InferenceSession(lazy.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("lazy", [False, True])
def test_save_inline_parses_to_the_same_model(rich_path, tmp_path, lazy):
    model, _ = io.load(rich_path, lazy=lazy)
    before = _bytes(model)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    io.save(model, out)
    assert _bytes(model) == before  # not changed
    back = onnx.load(out)
    assert _bytes(back) == _bytes(onnx.load(rich_path))
    assert [t.name for t in back.graph.initializer] == [t.name for t in _rich_model().graph.initializer]
    onnx.checker.check_model(str(out))
    assert os.listdir(out.parent) == ["m.onnx"]
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    want = ort.InferenceSession(str(rich_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("lazy", [False, True])
def test_save_external_is_laid_out_as_onnx_lays_it_out(rich_path, tmp_path, lazy):
    model, _ = io.load(rich_path, lazy=lazy)
    before = _bytes(model)
    ours, theirs = tmp_path / "ours" / "m.onnx", tmp_path / "theirs" / "m.onnx"
    ours.parent.mkdir()
    theirs.parent.mkdir()
    io.save(model, ours, external=True)
    assert _bytes(model) == before  # not changed, unlike onnx.save_model
    onnx.save_model(onnx.load(rich_path), theirs, save_as_external_data=True, location="m.onnx.data", size_threshold=1024)
    assert ours.read_bytes() == theirs.read_bytes()
    assert (ours.parent / "m.onnx.data").read_bytes() == (theirs.parent / "m.onnx.data").read_bytes()
    assert sorted(os.listdir(ours.parent)) == ["m.onnx", "m.onnx.data"]


@pytest.mark.parametrize("lazy", [False, True])
def test_external_input_loads_and_saves_as_before(rich_path, tmp_path, lazy):
    src = tmp_path / "ext" / "m.onnx"
    src.parent.mkdir()
    onnx.save_model(onnx.load(rich_path), src, save_as_external_data=True, location="weights.bin", size_threshold=0)
    model, external = io.load(src, lazy=lazy)
    assert external
    expected = onnx.load(src)  # every tensor read in, with an explicit data_location DEFAULT
    for name, ext in (("inline.onnx", False), ("external.onnx", True)):
        io.save(model, tmp_path / name, external=ext)
        assert _bytes(onnx.load(tmp_path / name)) == _bytes(expected), name
    if lazy:
        assert any(io.lazy_source(t) for t in model.graph.initializer)
        assert _bytes(io.materialize(model)) == _bytes(expected)


def test_optimizing_a_lazy_model_gives_the_same_model(repvgg_path, tmp_path):
    eager, _ = io.load(repvgg_path)
    lazy, _ = io.load(repvgg_path, lazy=True)
    assert any(io.lazy_source(t) for t in lazy.graph.initializer)
    out_eager, report_eager = engine.run(eager)
    out_lazy, report_lazy = engine.run(lazy)
    assert _content(report_lazy) == _content(report_eager)
    io.check(out_lazy)
    io.save(out_lazy, tmp_path / "lazy.onnx")
    io.save(out_eager, tmp_path / "eager.onnx")
    assert _bytes(onnx.load(tmp_path / "lazy.onnx")) == _bytes(onnx.load(tmp_path / "eager.onnx")) == _bytes(out_eager)


def test_text_formats_are_written_whole(rich_path, tmp_path):
    model, _ = io.load(rich_path, lazy=True)
    out = tmp_path / "m.txtpb"
    io.save(model, out)
    assert _bytes(onnx.load(out)) == _bytes(onnx.load(rich_path))


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lazy", [False, True])
def test_truncated_and_corrupted_files_give_the_usual_errors(repvgg_path, tmp_path, lazy):
    data = repvgg_path.read_bytes()
    cases = {
        "cut.onnx": data[: len(data) - 1000],
        "half.onnx": data[: len(data) // 2],
        "garbage.onnx": b"\xff" * 100,
        "text.onnx": b"this is not a model\n",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError, match="not a valid ONNX model|invalid ONNX model"):
            io.load(tmp_path / name, lazy=lazy)


@pytest.mark.parametrize("lazy", [False, True])
def test_wrong_raw_data_length_is_caught_without_reading_it(tmp_path, lazy):
    model = _rich_model()
    model.graph.initializer[0].dims[0] = 63  # 64 rows of data, 63 declared
    path = tmp_path / "short.onnx"
    onnx.save(model, path)
    with pytest.raises(InputError, match="'w_big' holds 131072 bytes, its shape \\[63, 512\\] needs 129024"):
        io.load(path, lazy=lazy)


def test_lazy_external_data_must_stay_in_the_model_folder(rich_path, tmp_path):
    src = tmp_path / "ext" / "m.onnx"
    src.parent.mkdir()
    onnx.save_model(onnx.load(rich_path), src, save_as_external_data=True, location="m.data", size_threshold=0)
    model = onnx.load(src, load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../m.data"
    (tmp_path / "m.data").write_bytes((src.parent / "m.data").read_bytes())
    onnx.save(model, src)
    with pytest.raises(InputError, match="outside the model's folder"):
        io.load(src, lazy=True)


def test_lazy_external_data_past_the_end_of_its_file(rich_path, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save_model(onnx.load(rich_path), src, save_as_external_data=True, location="m.data", size_threshold=0)
    data = tmp_path / "m.data"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(InputError, match="external data cannot be read"):
        io.load(src, lazy=True)


# --------------------------------------------------------------------------------------------
# the command line on models with external data
# --------------------------------------------------------------------------------------------


def _invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def test_cli_optimizes_a_model_with_external_data_like_the_inline_one(repvgg_path, tmp_path):
    src = tmp_path / "ext" / "train.onnx"
    src.parent.mkdir()
    onnx.save_model(onnx.load(repvgg_path), src, save_as_external_data=True, location="train.onnx.data", size_threshold=1024)
    assert _invoke("optimize", repvgg_path, "-o", tmp_path / "inline.onnx", "-q").exit_code == 0
    res = _invoke("optimize", src, "-o", tmp_path / "ext" / "out.onnx", "--no-verify", "-q")
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(tmp_path / "ext")) == ["out.onnx", "out.onnx.data", "train.onnx", "train.onnx.data"]
    header = onnx.load(tmp_path / "ext" / "out.onnx", load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    a, b = onnx.load(tmp_path / "inline.onnx"), onnx.load(tmp_path / "ext" / "out.onnx")
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert len(a.graph.initializer) == len(b.graph.initializer)
    for x, y in zip(a.graph.initializer, b.graph.initializer):
        assert x.name == y.name
        np.testing.assert_array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y))
    res = _invoke("verify", src, tmp_path / "ext" / "out.onnx")
    assert res.exit_code == 0, res.output


def test_optimize_from_a_path_gives_a_whole_model_equal_to_optimizing_the_loaded_one(repvgg_path):
    import onnxrep

    from_path, report_a = onnxrep.optimize(repvgg_path)
    from_model, report_b = onnxrep.optimize(onnx.load(repvgg_path))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in from_path.graph.initializer)
    assert _bytes(from_path) == _bytes(from_model)
    assert _content(report_a) == _content(report_b)


def test_a_lazy_tensor_moved_into_a_subgraph_is_written_with_its_data(rich_path, tmp_path):
    lazy, _ = io.load(rich_path, lazy=True)
    body = next(n for n in lazy.graph.node if n.op_type == "If").attribute[0].g
    moved = body.initializer.add()
    moved.CopyFrom(next(t for t in lazy.graph.initializer if t.name == "w_big"))
    assert io.lazy_source(moved) is not None
    for name, ext in (("inline.onnx", False), ("external.onnx", True)):
        io.save(lazy, tmp_path / name, external=ext)
        back = onnx.load(tmp_path / name)
        inner = next(n for n in back.graph.node if n.op_type == "If").attribute[0].g.initializer[-1]
        want = numpy_helper.to_array(next(t for t in onnx.load(rich_path).graph.initializer if t.name == "w_big"))
        np.testing.assert_array_equal(numpy_helper.to_array(inner), want)
    assert io.lazy_source(moved) is not None  # the model itself is unchanged


def test_check_without_data_leaves_out_only_the_length_of_raw_data():
    model = _rich_model()
    model.graph.initializer[0].dims[0] = 63
    io.check(model, data=False)
    with pytest.raises(onnx.checker.ValidationError, match="holds 131072 bytes"):
        io.check(model)
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(onnx.checker.ValidationError):
        io.check(model, data=False)
