"""The API's front door: every accepted kind of model (path, ModelProto, bytes, an object with a
``model_proto`` such as torch's ONNXProgram), ``base_dir`` for external data, ``load`` and
``save`` (atomic, external data on request and above the threshold), and no given model changed."""

import os

import numpy as np
import onnx
import pytest

import onnxrep
from graphs import Builder, histogram, run
from onnxrep import InputError, UsageError, io


def _model(c=8, batch="N"):
    b = Builder(c, input_shape=[batch, c, 8, 8])
    return b.model(b.relu(b.sum([b.bn(b.conv("x", c, c, 3, bias=False), c), b.bn(b.conv("x", c, c, 1), c), b.bn("x", c)])))


class _Program:
    """Stands for torch's ONNXProgram: a ``model_proto`` property that builds the proto."""

    def __init__(self, model):
        self._bytes = model.SerializeToString()

    @property
    def model_proto(self):
        return onnx.load_from_string(self._bytes)


def _feeds(n=2):
    return {"x": np.random.default_rng(0).standard_normal((n, 8, 8, 8)).astype(np.float32)}


def _same_function(a, b):
    np.testing.assert_allclose(run(a, _feeds())[0], run(b, _feeds())[0], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", ["path", "str", "proto", "bytes", "bytearray", "program"])
def test_every_kind_of_model_gives_the_same_result(kind, tmp_path):
    model = _model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    given = {
        "path": path,
        "str": str(path),
        "proto": model,
        "bytes": model.SerializeToString(),
        "bytearray": bytearray(model.SerializeToString()),
        "program": _Program(model),
    }[kind]
    out, report = onnxrep.optimize(given, verify=True, seeds=1)
    reference, _ = onnxrep.optimize(model)
    assert histogram(out) == {"Conv": 1, "Relu": 1} == histogram(reference)
    assert report.verification["ok"]
    assert out.SerializeToString() == reference.SerializeToString()
    assert onnxrep.verify(given, out, seeds=1).ok
    loaded = onnxrep.load(given)
    assert loaded.SerializeToString() == model.SerializeToString()


def test_a_torch_dynamo_onnx_program_is_taken_as_it_is():
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k3, self.k1, self.bn = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.k3(x) + self.k1(x) + self.bn(x))

    block = Block().eval()
    with torch.no_grad():
        block.bn.running_mean.uniform_(-0.5, 0.5)
        block.bn.running_var.uniform_(0.5, 2.0)
    program = torch.onnx.export(block, (torch.randn(1, 4, 8, 8),), dynamo=True, verbose=False)
    assert isinstance(program, torch.onnx.ONNXProgram)
    out, report = onnxrep.optimize(program, verify=True, seeds=1)
    assert report.verification["ok"] and report.rewritten >= 1
    assert histogram(out) == {"Conv": 1, "Relu": 1}
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = block(torch.from_numpy(x)).numpy()
    got = run(out, {out.graph.input[0].name: x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [42, None, ["m.onnx"], object()])
def test_other_kinds_are_usage_errors_naming_the_accepted_ones(bad):
    with pytest.raises(UsageError, match="model must be a path, an onnx.ModelProto, bytes, or an object with a model_proto attribute"):
        onnxrep.optimize(bad)


def test_model_proto_attribute_that_is_no_model_proto():
    class Wrong:
        model_proto = b"not a proto"

    with pytest.raises(UsageError, match="model.model_proto must be an onnx.ModelProto, got bytes"):
        onnxrep.optimize(Wrong())


def test_bytes_that_are_no_model_are_an_input_error():
    with pytest.raises(InputError, match="^model: not a valid ONNX model"):
        onnxrep.optimize(b"\xff\xff\xff garbage")
    with pytest.raises(InputError, match="^model: not a valid ONNX model"):
        onnxrep.load(b"")


def test_given_models_are_not_changed():
    model = _model()
    data = model.SerializeToString()
    program = _Program(model)
    onnxrep.optimize(model, verify=True, seeds=1, input_shapes={"x": [1, 8, 8, 8]})
    onnxrep.optimize(model, cleanup=True)
    onnxrep.verify(model, model, seeds=1, input_shapes={"x": [2, 8, 8, 8]})
    onnxrep.load(model)
    onnxrep.save(model, _tmp_file())
    onnxrep.optimize(program)
    assert model.SerializeToString() == data
    assert program.model_proto.SerializeToString() == data


def _tmp_file():
    import tempfile

    folder = tempfile.mkdtemp()
    return os.path.join(folder, "saved.onnx")


# --------------------------------------------------------------------------------------------
# external data and base_dir
# --------------------------------------------------------------------------------------------


def _external(tmp_path):
    model = _model()
    path = tmp_path / "ext.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save moves the data of the model it is given out of it
    onnx.save(copy, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    return model, path


def _same_model(a, b):
    """Equal graphs and equal initializer values (however each tensor stores them)."""
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    assert [i.SerializeToString() for i in a.graph.input] == [i.SerializeToString() for i in b.graph.input]
    assert [o.SerializeToString() for o in a.graph.output] == [o.SerializeToString() for o in b.graph.output]
    values = lambda m: {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}  # noqa: E731
    va, vb = values(a), values(b)
    assert va.keys() == vb.keys()
    for name in va:
        assert va[name].dtype == vb[name].dtype and np.array_equal(va[name], vb[name])


def test_a_model_proto_without_its_external_data_names_base_dir(tmp_path):
    model, path = _external(tmp_path)
    bare = onnx.load(path, load_external_data=False)
    before = bare.SerializeToString()
    with pytest.raises(InputError, match=r"keeps its data in external file 'ext.onnx.data'; give the folder it is relative to \(base_dir\)"):
        onnxrep.optimize(bare)
    with pytest.raises(InputError, match=r"base_dir"):
        onnxrep.load(bare)
    out, report = onnxrep.optimize(bare, base_dir=tmp_path, verify=True, seeds=1)
    assert report.verification["ok"] and report.input_external_data
    assert bare.SerializeToString() == before
    assert not io.uses_external_data(out)
    _same_function(out, model)
    loaded = onnxrep.load(bare, base_dir=tmp_path)
    assert not io.uses_external_data(loaded) and loaded.graph.initializer[0].raw_data


def test_a_wrong_base_dir_is_an_input_error_naming_the_file(tmp_path):
    _, path = _external(tmp_path)
    bare = onnx.load(path, load_external_data=False)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(InputError, match="ext.onnx.data"):
        onnxrep.optimize(bare, base_dir=tmp_path / "elsewhere")


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------


def test_save_round_trip_inline(tmp_path):
    out, _ = onnxrep.optimize(_model())
    path = tmp_path / "o.onnx"
    onnxrep.save(out, path)
    assert os.listdir(tmp_path) == ["o.onnx"]
    assert onnx.load(path).SerializeToString() == out.SerializeToString()
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # an ordinary file, as the umask gives


def test_save_with_external_data_on_request_round_trips(tmp_path):
    out, _ = onnxrep.optimize(_model())
    path = tmp_path / "o.onnx"
    onnxrep.save(out, path, external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["o.onnx", "o.onnx.data"]
    bare = onnx.load(path, load_external_data=False)
    assert io.uses_external_data(bare)
    _same_model(onnx.load(path), out)
    # and back through the API, with base_dir
    again, _ = onnxrep.optimize(bare, base_dir=tmp_path)
    _same_function(again, out)


def test_save_goes_external_above_the_threshold(tmp_path, monkeypatch):
    out, _ = onnxrep.optimize(_model())
    monkeypatch.setattr(io, "EXTERNAL_THRESHOLD", 1000)
    onnxrep.save(out, tmp_path / "big.onnx")
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    _same_model(onnx.load(tmp_path / "big.onnx"), out)


def test_save_takes_an_onnx_program_and_refuses_other_things(tmp_path):
    model = _model()
    onnxrep.save(_Program(model), tmp_path / "p.onnx")
    assert onnx.load(tmp_path / "p.onnx").SerializeToString() == model.SerializeToString()
    with pytest.raises(UsageError, match="model must be an onnx.ModelProto or an object with a model_proto attribute"):
        onnxrep.save("m.onnx", tmp_path / "x.onnx")
    with pytest.raises(UsageError, match="external_data must be True or False"):
        onnxrep.save(model, tmp_path / "x.onnx", external_data="yes")


def test_save_is_atomic_and_names_the_path_when_it_cannot_write(tmp_path, monkeypatch):
    model = _model()
    target = tmp_path / "o.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(onnxrep.OnnxrepError, match="nowhere"):
        onnxrep.save(model, tmp_path / "nowhere" / "o.onnx")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io, "_write", boom)
    with pytest.raises(onnxrep.OnnxrepError, match=r"o.onnx: cannot write \(disk full\)"):
        onnxrep.save(model, target)
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["o.onnx"]


def test_optimize_file_writes_after_verification_and_times_every_stage(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(_model(), src)
    report = onnxrep.api.optimize_file(src, tmp_path / "out.onnx", seeds=1)
    assert report.output == str(tmp_path / "out.onnx") and report.verification["ok"]
    assert set(report.seconds) == {"load", "passes", "cleanup", "verify", "not_rewritten", "write", "total"}
    assert histogram(onnx.load(tmp_path / "out.onnx")) == {"Conv": 1, "Relu": 1}


def test_optimize_file_checks_the_output_before_any_work(tmp_path, monkeypatch):
    import onnxrep.engine

    def boom(*a, **k):
        raise AssertionError("the passes ran")

    monkeypatch.setattr(onnxrep.engine, "run", boom)
    with pytest.raises(onnxrep.OnnxrepError, match="does not exist"):
        onnxrep.api.optimize_file(_model(), tmp_path / "missing" / "out.onnx")


def test_optimize_file_keeps_external_data_as_the_input_had_it(tmp_path):
    _, path = _external(tmp_path)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    report = onnxrep.api.optimize_file(path, out, verify=False)
    assert report.input_external_data
    assert sorted(os.listdir(out.parent)) == ["o.onnx", "o.onnx.data"]
    onnxrep.api.optimize_file(path, out, verify=False, external_data=False)
    assert sorted(os.listdir(out.parent)) == ["o.onnx", "o.onnx.data"]  # the older data file stays
    assert not io.uses_external_data(onnx.load(out, load_external_data=False))
