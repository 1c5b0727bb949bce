"""Hostile and unsupported input: external data that points outside the model's folder or past the
end of its file, onnxrep's own reference keys in a file, sparse tensors, and outputs that cannot be
written. Each is refused with one line before anything is written, through ``io.load``,
``onnxrep.optimize`` and the command line, and no file outside the model's folder is ever opened."""

import os
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import external_data_helper, helper, numpy_helper

import onnxrep
from onnxrep import cli, engine, io
from onnxrep.errors import InputError, OnnxrepError

# --------------------------------------------------------------------------------------------
# every file the process opens (Python-level opens, numpy.fromfile, and onnx's own C++ open)
# --------------------------------------------------------------------------------------------

_OPENED: list[str] | None = None


def _audit(event, args):
    if _OPENED is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@pytest.fixture
def opened(monkeypatch):
    """The real paths of the files opened while the test runs."""
    global _OPENED
    _OPENED = []
    original = external_data_helper._open_external_data_fd

    def record(base_dir, location, tensor_name, read_only):
        _OPENED.append(os.path.realpath(os.path.join(base_dir, location)))
        return original(base_dir, location, tensor_name, read_only)

    monkeypatch.setattr(external_data_helper, "_open_external_data_fd", record)
    try:
        yield _OPENED
    finally:
        _OPENED = None


def test_the_open_recorder_sees_every_way_of_reading_a_file(tmp_path, opened):
    f = tmp_path / "f.bin"
    f.write_bytes(b"\0" * 64)
    for read in (
        lambda: open(f, "rb").close(),
        lambda: os.close(os.open(f, os.O_RDONLY)),
        lambda: np.fromfile(f, dtype=np.float32, count=1),
        lambda: np.fromfile(str(f), dtype=np.float32, count=1, offset=4),
    ):
        opened.clear()
        read()
        assert opened == [os.path.realpath(f)]


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------

_W = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
_B = np.linspace(-1, 1, 64, dtype=np.float32)


def _model() -> onnx.ModelProto:
    """x @ w + b, then * 2 + 1 (foldable into the linear layer)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Mul", ["a", "two"], ["s"]),
        helper.make_node("Add", ["s", "one"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(_W, "w"),
        numpy_helper.from_array(_B, "b"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _set(tensor: onnx.TensorProto, **entries) -> None:
    """Set (or with None remove) external data entries of ``tensor``."""
    kept = [(e.key, e.value) for e in tensor.external_data if e.key not in entries]
    del tensor.external_data[:]
    for key, value in kept + [(k, str(v)) for k, v in entries.items() if v is not None]:
        e = tensor.external_data.add()
        e.key, e.value = key, value


class Case:
    """A model folder holding ``m.onnx`` whose initializer 'w' keeps its data in ``w.bin``, and a
    file outside it (``outside/secret.bin``) that holds the same bytes."""

    def __init__(self, root):
        self.folder = root / "model"
        self.folder.mkdir()
        self.path = self.folder / "m.onnx"
        self.outside = root / "outside" / "secret.bin"
        self.outside.parent.mkdir()
        self.outside.write_bytes(_W.tobytes())
        model = _model()
        onnx.save_model(model, self.path, save_as_external_data=True, location="w.bin", size_threshold=4096)
        self.header = onnx.load(self.path, load_external_data=False)
        assert [t.name for t in self.header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL] == ["w"]

    def tamper(self, **entries) -> "Case":
        model = onnx.ModelProto()
        model.CopyFrom(self.header)
        _set(model.graph.initializer[0], **entries)
        onnx.save(model, self.path)
        self.header = model
        return self

    def snapshot(self) -> dict:
        files = {}
        for root in (self.folder, self.outside.parent):
            for dirpath, _, names in os.walk(root):
                for n in names:
                    p = os.path.join(dirpath, n)
                    files[p] = None if os.path.islink(p) else open(p, "rb").read()
        return files


@pytest.fixture
def case(tmp_path):
    return Case(tmp_path)


def _escape_absolute(c: Case):
    c.tamper(location=str(c.outside))


def _escape_dotdot(c: Case):
    c.tamper(location="../outside/secret.bin")


def _escape_symlink(c: Case):
    os.symlink(c.outside, c.folder / "link.bin")
    c.tamper(location="link.bin")


def _escape_symlinked_folder(c: Case):
    os.symlink(c.outside.parent, c.folder / "sub")
    c.tamper(location="sub/secret.bin")


ESCAPES = {
    "absolute": (_escape_absolute, "is an absolute path"),
    "dotdot": (_escape_dotdot, "is outside the model's folder"),
    "symlink": (_escape_symlink, "is outside the model's folder"),
    "symlinked-folder": (_escape_symlinked_folder, "is outside the model's folder"),
}

_SIZE = _W.nbytes  # 16384
BAD_RANGES = {
    "negative-offset": (dict(offset=-8), "external data offset -8 of tensor 'w' is negative"),
    "negative-length": (dict(length=-1), "external data length -1 of tensor 'w' is negative"),
    "offset-not-an-integer": (dict(offset="0x10"), "external data offset '0x10' of tensor 'w' is not an integer"),
    "overflowing-offset": (dict(offset=2**64), f"starts at offset {2**64}, past the end of 'w.bin', {_SIZE} bytes"),
    "overflowing-length": (dict(offset=8, length=2**64 - 4), f"needs {2**64 - 4} bytes at offset 8, past the end of 'w.bin'"),
    "short-file": (dict(offset=4, length=_SIZE), f"needs {_SIZE} bytes at offset 4, past the end of 'w.bin', {_SIZE} bytes"),
    "no-location": (dict(location=None), "tensor 'w' has external data without a location"),
    "missing-file": (dict(location="nowhere.bin"), "external data file 'nowhere.bin' is missing"),
    "a-folder": (dict(location="."), "external data location '.' is not a regular file"),
    "nul-byte": (dict(location="w.bin\0x"), "cannot be used (embedded null byte)"),
}


def _short_file(c: Case):
    """The data file itself is cut short (the reference is as onnx wrote it)."""
    data = c.folder / "w.bin"
    data.write_bytes(data.read_bytes()[:-4])


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "internal error" not in text and "Traceback" not in text, text
    return lines[0]


# --------------------------------------------------------------------------------------------
# the ways in: io.load, onnxrep.optimize(path), the command line
# --------------------------------------------------------------------------------------------


def _via_load(c: Case, out, lazy: bool):
    io.load(c.path, lazy=lazy)


def _via_optimize(c: Case, out, verify: bool):
    model, _ = onnxrep.optimize(c.path, verify=verify)
    io.save(model, out)


def _via_cli(c: Case, out, verify: bool):
    res = CliRunner().invoke(cli.main, ["optimize", str(c.path), "-o", str(out), "-q"] + ([] if verify else ["--no-verify"]))
    assert res.exit_code != 0
    raise InputError(_one_line(res.output).removeprefix("error: "))


WAYS = {
    "load": lambda c, out: _via_load(c, out, False),
    "load-lazy": lambda c, out: _via_load(c, out, True),
    "optimize": lambda c, out: _via_optimize(c, out, False),
    "optimize-verify": lambda c, out: _via_optimize(c, out, True),
    "cli": lambda c, out: _via_cli(c, out, False),
    "cli-verify": lambda c, out: _via_cli(c, out, True),
}


def _refused(c: Case, way: str, tmp_path, message: str, opened) -> None:
    """``way`` on the case: an InputError of one line with ``message``, no file outside the model's
    folder opened, nothing written, the input unchanged."""
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir(exist_ok=True)
    before = c.snapshot()
    opened.clear()
    with pytest.raises(InputError) as err:
        WAYS[way](c, out)
    text = str(err.value)
    assert _one_line(text) == text
    assert text.startswith(str(c.path) + ": "), text
    assert message in text, text
    assert str(c.outside) not in opened and os.path.realpath(c.outside) not in opened, opened
    assert os.listdir(out.parent) == []
    assert c.snapshot() == before


def test_the_case_reads_fine_as_written(case, tmp_path, opened):
    """The control: the same model with its data where it belongs optimizes through every way."""
    for way in ("load", "load-lazy"):
        WAYS[way](case, None)
    assert os.path.realpath(case.folder / "w.bin") in opened
    for way in ("optimize", "optimize-verify"):
        out = tmp_path / f"{way}.onnx"
        WAYS[way](case, out)
        assert len(onnx.load(out).graph.node) < 4  # the scaling folded into the linear layer
    for verify in (False, True):
        out = tmp_path / f"cli-{verify}.onnx"
        args = ["optimize", str(case.path), "-o", str(out), "-q"] + ([] if verify else ["--no-verify"])
        res = CliRunner().invoke(cli.main, args)
        assert res.exit_code == 0, res.output
        assert out.exists()


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("escape", ESCAPES)
def test_external_data_outside_the_model_folder_is_refused_unopened(case, tmp_path, opened, way, escape):
    make, message = ESCAPES[escape]
    make(case)
    _refused(case, way, tmp_path, message, opened)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("bad", BAD_RANGES)
def test_bad_offsets_lengths_and_locations_are_refused(case, tmp_path, opened, way, bad):
    entries, message = BAD_RANGES[bad]
    case.tamper(**entries)
    _refused(case, way, tmp_path, message, opened)


@pytest.mark.parametrize("way", WAYS)
def test_a_short_data_file_is_refused(case, tmp_path, opened, way):
    _short_file(case)
    _refused(case, way, tmp_path, f"needs {_SIZE} bytes at offset 0, past the end of 'w.bin', {_SIZE - 4} bytes", opened)


def test_a_symbolic_link_inside_the_folder_is_refused_like_onnx_refuses_it(case, tmp_path, opened):
    os.symlink("w.bin", case.folder / "alias.bin")
    case.tamper(location="alias.bin")
    with pytest.raises(Exception, match="symbolic link"):
        onnx.load(case.path)
    for way in WAYS:
        _refused(case, way, tmp_path, "external data location 'alias.bin' is a symbolic link", opened)


def _hostile(name: str, outside) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(_B, name)
    tensor.ClearField("raw_data")
    _set(tensor, location=str(outside), offset=0, length=_B.nbytes)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    return tensor


def _in_a_constant(outside):
    model = _model()
    model.graph.node.insert(0, helper.make_node("Constant", [], ["c"], value=_hostile("c", outside)))
    model.graph.node[-1].input[1] = "c"
    return model


def _in_a_body(outside):
    def branch(name):
        return helper.make_graph(
            [helper.make_node("Add", ["y0", name], [name + "_out"])], name, [],
            [helper.make_tensor_value_info(name + "_out", onnx.TensorProto.FLOAT, [1, 64])], [_hostile(name, outside)],
        )

    model = _model()
    model.graph.node[-1].output[0] = "y0"
    model.graph.node.append(helper.make_node("Greater", ["one", "two"], ["cond"]))
    model.graph.node.append(helper.make_node("If", ["cond"], ["y"], then_branch=branch("t"), else_branch=branch("e")))
    return model


def _in_a_function(outside):
    model = _model()
    body = [helper.make_node("Constant", [], ["k"], value=_hostile("k", outside)), helper.make_node("Add", ["a", "k"], ["z"])]
    model.functions.append(helper.make_function("local", "addk", ["a"], ["z"], body, [helper.make_opsetid("", 17)]))
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.graph.node[-1].output[0] = "y0"
    model.graph.node.append(helper.make_node("addk", ["y0"], ["y"], domain="local"))
    return model


@pytest.mark.parametrize("build", [_in_a_constant, _in_a_body, _in_a_function])
def test_external_data_outside_the_folder_is_refused_wherever_the_tensor_is(tmp_path, opened, build):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(_B.tobytes())
    (tmp_path / "model").mkdir()
    path = tmp_path / "model" / "m.onnx"
    onnx.save(build(outside), path)
    opened.clear()
    for lazy in (False, True):
        with pytest.raises(InputError, match=f"external data location '{outside}' is an absolute path"):
            io.load(path, lazy=lazy)
    with pytest.raises(InputError, match="is an absolute path"):
        io.validate(onnx.load(path, load_external_data=False), base_dir=path.parent)
    assert os.path.realpath(outside) not in opened


def test_a_location_through_a_subfolder_inside_is_read(case, tmp_path):
    (case.folder / "sub").mkdir()
    os.replace(case.folder / "w.bin", case.folder / "sub" / "w.bin")
    case.tamper(location="sub/../sub/w.bin")
    for lazy in (False, True):
        model, external = io.load(case.path, lazy=lazy)
        assert external
        np.testing.assert_array_equal(numpy_helper.to_array(io.materialize(model).graph.initializer[0]), _W)


def test_the_command_line_in_a_subprocess_exits_non_zero_with_one_line(case, tmp_path):
    _escape_absolute(case)
    out = tmp_path / "o.onnx"
    before = case.snapshot()
    proc = subprocess.run(
        [sys.executable, "-m", "onnxrep.cli", "optimize", str(case.path), "-o", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert _one_line(proc.stderr) == f"error: {case.path}: external data location '{case.outside}' is an absolute path (it must be relative to the model's folder)"
    assert not out.exists()
    assert case.snapshot() == before


# --------------------------------------------------------------------------------------------
# onnxrep's own reference keys cannot come from a file
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("way", WAYS)
def test_a_forged_lazy_reference_in_a_file_is_refused(case, tmp_path, opened, way):
    """A reference as ``load(lazy=True)`` makes them (absolute location, offset, length and the private
    key), even with this process's own token, written into a file: refused, the file never opened."""
    case.tamper(location=str(case.outside), offset=0, length=_SIZE, **{io._LAZY: io._TOKEN})
    _refused(case, way, tmp_path, f"tensor 'w' holds the external data key '{io._LAZY}', reserved to onnxrep", opened)


def test_a_lazy_model_saved_by_onnx_does_not_load_back_as_references(case, tmp_path, opened):
    lazy, _ = io.load(case.path, lazy=True)
    onnx.save(lazy, case.path)
    _refused(case, "load-lazy", tmp_path, "reserved to onnxrep", opened)


def test_a_reserved_key_is_refused_on_an_inline_tensor_too(tmp_path):
    model = _model()
    _set(model.graph.initializer[1], **{io._FROM_EXTERNAL: 1})
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(InputError, match=f"tensor 'b' holds the external data key '{io._FROM_EXTERNAL}'"):
        io.load(tmp_path / "m.onnx")


def test_only_references_made_here_are_lazy(case):
    lazy, _ = io.load(case.path, lazy=True)
    tensor = lazy.graph.initializer[0]
    assert io.lazy_source(tensor) is not None
    forged = onnx.TensorProto()
    forged.CopyFrom(tensor)
    _set(forged, **{io._LAZY: "0" * 32})
    assert io.lazy_source(forged) is None
    plain = onnx.TensorProto()
    plain.CopyFrom(tensor)
    _set(plain, **{io._LAZY: None})
    assert io.lazy_source(plain) is None


# --------------------------------------------------------------------------------------------
# a ModelProto with external data references, given to the API
# --------------------------------------------------------------------------------------------


def test_a_proto_with_external_references_needs_its_folder(case):
    with pytest.raises(InputError, match="tensor 'w' keeps its data in external file 'w.bin'; give the folder"):
        io.validate(case.header)
    with pytest.raises(InputError, match="tensor 'w' keeps its data in external file 'w.bin'"):
        onnxrep.optimize(case.header)
    io.validate(case.header, base_dir=case.folder)


def test_a_proto_with_external_references_reads_them_from_its_folder(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the model's folder
    before = case.header.SerializeToString()
    model = io.from_proto(case.header, base_dir=case.folder)
    assert case.header.SerializeToString() == before
    assert io.lazy_source(model.graph.initializer[0]) is not None
    out, _ = engine.run(model)
    io.materialize(out)
    want, _ = engine.run(onnx.load(case.path))
    assert out.SerializeToString() == want.SerializeToString()
    eager = onnx.ModelProto()
    eager.CopyFrom(case.header)
    assert io.materialize(eager, base_dir=case.folder).SerializeToString() == onnx.load(case.path).SerializeToString()


@pytest.mark.parametrize("verify", [False, True])
def test_optimize_reads_a_proto_s_external_data_from_base_dir(case, tmp_path, monkeypatch, verify):
    monkeypatch.chdir(tmp_path)  # not the model's folder
    (tmp_path / "w.bin").write_bytes(np.zeros_like(_W).tobytes())  # a decoy where the working folder would find it
    before = case.header.SerializeToString()
    out, _ = onnxrep.optimize(case.header, base_dir=case.folder, verify=verify)
    want, _ = onnxrep.optimize(onnx.load(case.path), verify=verify)
    assert case.header.SerializeToString() == before
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in out.graph.initializer)
    assert out.SerializeToString() == want.SerializeToString()


@pytest.mark.parametrize("escape", ESCAPES)
def test_a_proto_pointing_outside_its_folder_is_refused_unopened(case, opened, escape):
    make, message = ESCAPES[escape]
    make(case)
    header = onnx.load(case.path, load_external_data=False)
    opened.clear()
    for call in (
        lambda: io.validate(header, base_dir=case.folder),
        lambda: io.from_proto(header, base_dir=case.folder),
        lambda: io.materialize(header, base_dir=case.folder),
        lambda: onnxrep.optimize(header, base_dir=case.folder),
    ):
        with pytest.raises(InputError, match=message) as err:
            call()
        assert str(err.value).startswith("model: ")
    assert os.path.realpath(case.outside) not in opened
    assert header.SerializeToString() == case.header.SerializeToString()


@pytest.mark.parametrize("bad", BAD_RANGES)
def test_a_proto_with_a_bad_range_is_refused(case, bad):
    entries, message = BAD_RANGES[bad]
    case.tamper(**entries)
    for call in (lambda: io.from_proto(case.header, base_dir=case.folder), lambda: onnxrep.optimize(case.header, base_dir=case.folder)):
        with pytest.raises(InputError, match=None) as err:
            call()
        assert message in str(err.value)


def test_a_lazy_model_made_here_is_accepted_by_the_front_door(case):
    lazy, _ = io.load(case.path, lazy=True)
    io.validate(lazy)
    assert io.from_proto(lazy) is lazy


# --------------------------------------------------------------------------------------------
# sparse tensors
# --------------------------------------------------------------------------------------------


def _sparse(name: str) -> onnx.SparseTensorProto:
    return helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.0, 2.0], np.float32), name),
        numpy_helper.from_array(np.array([1, 5], np.int64), name + "_indices"), [2, 4],
    )


def _sparse_initializer() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
    )
    graph.sparse_initializer.append(_sparse("w"))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _sparse_constant() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], sparse_value=_sparse("w")), helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _sparse_in_a_body() -> onnx.ModelProto:
    def branch(name):
        g = helper.make_graph(
            [helper.make_node("Add", ["x", name], [name + "_out"])], name, [],
            [helper.make_tensor_value_info(name + "_out", onnx.TensorProto.FLOAT, [2, 4])],
        )
        g.sparse_initializer.append(_sparse(name))
        return g

    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch("t"), else_branch=branch("e"))], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4]), helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


SPARSE = {
    "initializer": (_sparse_initializer, "sparse initializer 'w' is not supported (onnxrep reads dense constants only"),
    "constant": (_sparse_constant, "the node making 'w' (Constant) holds a sparse tensor in attribute 'sparse_value', which is not supported"),
    "body": (_sparse_in_a_body, "sparse initializer 'e' is not supported"),  # the else branch: the first attribute
}


@pytest.mark.parametrize("kind", SPARSE)
def test_sparse_tensors_are_refused_with_the_reason(tmp_path, kind):
    build, message = SPARSE[kind]
    message = re.escape(message)
    model = build()
    onnx.checker.check_model(model)  # a valid model, which onnxruntime runs
    feeds = {"x": np.ones((2, 4), np.float32), "c": np.array(True)}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    np.testing.assert_array_equal(got, [[1, 2, 1, 1], [1, 3, 1, 1]])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for lazy in (False, True):
        with pytest.raises(InputError, match=message):
            io.load(path, lazy=lazy)
    for verify in (False, True):
        with pytest.raises(InputError, match=message) as err:
            onnxrep.optimize(path, verify=verify)
        assert str(err.value).startswith(f"{path}: ")
        with pytest.raises(InputError, match=message) as err:
            onnxrep.optimize(model, verify=verify)
        assert str(err.value).startswith("model: ")
    out = tmp_path / "out.onnx"
    for extra in ([], ["--no-verify"]):
        res = CliRunner().invoke(cli.main, ["optimize", str(path), "-o", str(out)] + extra)
        assert res.exit_code == 1
        assert re.search(message, _one_line(res.output))
        assert not out.exists()


def test_the_checker_sees_sparse_initializers():
    """``io.check`` on a model with a sparse initializer that a node reads: no false "topologically
    sorted" error."""
    io.check(_sparse_initializer())


# --------------------------------------------------------------------------------------------
# outputs that cannot be written
# --------------------------------------------------------------------------------------------


UNWRITABLE = {
    "under-a-file": (lambda d: d / "file.txt" / "out.onnx", "is not a folder"),
    "missing-folder": (lambda d: d / "missing" / "out.onnx", "does not exist"),
    "a-folder": (lambda d: d / "folder", "is a directory"),
    "proc": (lambda d: "/proc/onnxrep-out.onnx", "cannot write in folder '/proc'"),
}


@pytest.fixture
def outdir(tmp_path):
    d = tmp_path / "outputs"
    d.mkdir()
    (d / "file.txt").write_text("a file")
    (d / "folder").mkdir()
    return d


def _listing(d):
    return sorted(os.path.relpath(os.path.join(p, n), d) for p, ds, fs in os.walk(d) for n in ds + fs)


@pytest.mark.parametrize("where", UNWRITABLE)
def test_an_unwritable_output_is_refused_with_one_line(case, outdir, where):
    target, message = UNWRITABLE[where]
    out = target(outdir)
    if where == "proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    before = _listing(outdir)
    with pytest.raises(OnnxrepError, match=message) as err:
        io.check_writable(out)
    assert _one_line(str(err.value)).startswith(f"{out}: ")
    model, _ = io.load(case.path, lazy=True)
    for external in (False, True):
        with pytest.raises(OnnxrepError, match=message) as err:
            io.save(model, out, external=external)
        assert _one_line(str(err.value)).startswith(f"{out}: ")
    for extra in ([], ["--no-verify"]):
        res = CliRunner().invoke(cli.main, ["optimize", str(case.path), "-o", str(out)] + extra)
        assert res.exit_code == 1
        line = _one_line(res.output)
        assert line.startswith(f"error: {out}: ") and message in line, line
    assert _listing(outdir) == before
    assert not os.path.exists(os.path.join(str(out), "out.onnx")) and not os.path.isfile(out)


def test_check_writable_accepts_a_writable_path_and_leaves_nothing(outdir):
    before = _listing(outdir)
    io.check_writable(outdir / "new.onnx")
    (outdir / "existing.onnx").write_bytes(b"old")
    io.check_writable(outdir / "existing.onnx")
    assert _listing(outdir) == sorted(before + ["existing.onnx"])
    assert (outdir / "existing.onnx").read_bytes() == b"old"


def test_a_failed_write_leaves_nothing_behind(case, outdir, monkeypatch):
    """A failure during the write (the source of a lazy tensor gone short): one line, no partial file,
    no temporary folder."""
    model, _ = io.load(case.path, lazy=True)
    data = case.folder / "w.bin"
    data.write_bytes(data.read_bytes()[:100])
    before = _listing(outdir)
    for external in (False, True):
        with pytest.raises(OnnxrepError, match="cannot write") as err:
            io.save(model, outdir / "o.onnx", external=external)
        assert _one_line(str(err.value)).startswith(f"{outdir / 'o.onnx'}: ")
    assert _listing(outdir) == before
