"""The command line: optimize / inspect / verify / passes / demo, bad input, atomic output."""

import json
import os
import subprocess
import sys

import onnx
import pytest
import numpy as np
from onnx import numpy_helper

from graphs import Builder, histogram
from helpers import break_parallel_merge, invoke
from onnxrep import engine


@pytest.fixture
def model_path(tmp_path):
    c = 16  # weights above onnx's 1 KB threshold for external data
    b = Builder(c, input_shape=["N", c, 8, 8])
    y = b.relu(b.sum([b.bn(b.conv("x", c, c, 3, bias=False), c), b.bn(b.conv("x", c, c, 1), c), b.bn("x", c)]))
    path = tmp_path / "train.onnx"
    onnx.save(b.model(y), path)
    return path


def error_lines(res) -> list[str]:
    """The lines of stderr that report an error (progress lines start with "onnxrep: ")."""
    return [line for line in res.stderr.splitlines() if not line.startswith("onnxrep: ")]


def snapshot(folder):
    return {p: (folder / p).read_bytes() if (folder / p).is_file() else None for p in sorted(os.listdir(folder))}


def test_optimize_writes_model_table_and_report(model_path, tmp_path):
    before = model_path.read_bytes()
    out, report = tmp_path / "opt.onnx", tmp_path / "r.json"
    res = invoke("optimize", model_path, "-o", out, "--report", report)
    assert res.exit_code == 0, res.stderr
    assert "| Conv" in res.stdout and "parallel-merge: 1 matched, 1 rewritten, 0 skipped" in res.stdout
    assert "affine-fold" not in res.stdout  # the sum took the BNs along: nothing else matched
    assert "verification: ok" in res.stdout
    assert histogram(onnx.load(out)) == {"Conv": 1, "Relu": 1}
    data = json.loads(report.read_text())
    assert data["rewritten"] == 1 and data["verification"]["ok"] is True
    assert data["ops_after"] == {"Conv": 1, "Relu": 1}
    assert model_path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["opt.onnx", "r.json", "train.onnx"]


def test_optimize_no_verify_and_pass_selection(model_path, tmp_path):
    out = tmp_path / "opt.onnx"
    res = invoke("optimize", model_path, "-o", out, "--no-verify", "--skip", "parallel-merge,affine-fold", "-q")
    assert res.exit_code == 0 and res.stdout == ""
    assert histogram(onnx.load(out)) == histogram(onnx.load(model_path))
    res = invoke("optimize", model_path, "-o", out, "--passes", "nope")
    assert res.exit_code == 2 and res.stderr.startswith("error: unknown pass 'nope'")


def test_inspect_writes_nothing_and_explains_skips(tmp_path):
    c = 8
    b = Builder(c)
    path = tmp_path / "het.onnx"
    onnx.save(b.model(b.add(b.conv("x", c, c, 3, groups=4), b.conv("x", c, c, 1))), path)
    before = snapshot(tmp_path)
    res = invoke("inspect", path)
    assert res.exit_code == 0
    assert "skip" in res.stdout and "cost: merged kernel" in res.stdout
    assert snapshot(tmp_path) == before
    res = invoke("inspect", path, "--allow-cost-increase", "--json", "-")
    assert json.loads(res.stdout)["rewritten"] == 1


def test_verify_command(model_path, tmp_path):
    out = tmp_path / "opt.onnx"
    invoke("optimize", model_path, "-o", out, "-q")
    res = invoke("verify", model_path, out, "--dim", "N=2")
    assert res.exit_code == 0 and res.stdout.startswith("ok")
    bad = onnx.load(out)
    init = next(i for i in bad.graph.initializer if len(i.dims) == 4)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.1
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(bad, tmp_path / "bad.onnx")
    res = invoke("verify", model_path, tmp_path / "bad.onnx")
    assert res.exit_code == 3
    assert "FAIL" in res.stdout and "differs" in res.stderr.splitlines()[-1]


def test_mismatch_writes_nothing(model_path, tmp_path, monkeypatch):
    real = engine.run

    def broken(*a, **kw):
        out, report = real(*a, **kw)
        init = next(i for i in out.graph.initializer if len(i.dims) == 4)
        arr = numpy_helper.to_array(init).copy() * 1.01
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        return out, report

    monkeypatch.setattr(engine, "run", broken)
    out = tmp_path / "opt.onnx"
    res = invoke("optimize", model_path, "-o", out)
    assert res.exit_code == 3
    assert error_lines(res) == [res.stderr.splitlines()[-1]]
    assert "output 'relu" in res.stderr and "differs" in res.stderr
    assert not out.exists()


def test_passes_lists_the_registry():
    res = invoke("passes")
    assert res.exit_code == 0
    assert {line.split()[0] for line in res.stdout.splitlines()} >= {"parallel-merge", "affine-fold"}


def test_external_data_is_kept(model_path, tmp_path):
    src = tmp_path / "ext" / "m.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(model_path), src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    out = tmp_path / "ext" / "o.onnx"
    res = invoke("optimize", src, "-o", out)
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "ext" / "o.onnx.data").is_file()
    assert histogram(onnx.load(out)) == {"Conv": 1, "Relu": 1}
    res = invoke("optimize", src, "-o", tmp_path / "inline.onnx", "--no-external-data", "-q")
    assert res.exit_code == 0 and not (tmp_path / "inline.onnx.data").exists()


def test_failed_write_leaves_no_partial_file(model_path, tmp_path, monkeypatch):
    def fail(*a, **kw):
        with open(a[1], "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", fail)
    res = invoke("optimize", model_path, "-o", tmp_path / "opt.onnx")
    assert res.exit_code == 1 and "disk full" in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["train.onnx"]


# --------------------------------------------------------------------------------------------
# bad input: one line on stderr, non-zero exit, nothing written, input untouched
# --------------------------------------------------------------------------------------------


def _bad_inputs(tmp_path, model_path):
    (tmp_path / "text.onnx").write_text("this is not a model\n")
    (tmp_path / "empty.onnx").write_bytes(b"")
    data = model_path.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "adir.onnx").mkdir()
    ext = tmp_path / "noext.onnx"
    onnx.save(onnx.load(model_path), ext, save_as_external_data=True, location="noext.data", size_threshold=0)
    (tmp_path / "noext.data").unlink()
    return {
        "missing.onnx": "no such file",
        "text.onnx": "not a valid ONNX model",
        "empty.onnx": "empty file",
        "truncated.onnx": "not a valid ONNX model",
        "adir.onnx": "is a directory",
        "noext.onnx": "external data file 'noext.data' is missing",
    }


@pytest.mark.parametrize("command", ["optimize", "inspect", "verify"])
def test_bad_input_gives_one_line_and_writes_nothing(model_path, tmp_path, command):
    cases = _bad_inputs(tmp_path, model_path)
    for name, message in cases.items():
        before = snapshot(tmp_path) if (tmp_path / name).is_file() else None
        args = {"optimize": ["optimize", tmp_path / name, "-o", tmp_path / "out.onnx"],
                "inspect": ["inspect", tmp_path / name],
                "verify": ["verify", model_path, tmp_path / name]}[command]
        res = invoke(*args)
        assert res.exit_code == 1, name
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and message in res.stderr, res.stderr
        assert not (tmp_path / "out.onnx").exists()
        if before is not None:
            assert snapshot(tmp_path) == before


def test_missing_output_folder(model_path, tmp_path):
    res = invoke("optimize", model_path, "-o", tmp_path / "nope" / "o.onnx")
    assert res.exit_code == 1 and "does not exist" in res.stderr


def test_bad_dim_option(model_path, tmp_path):
    res = invoke("verify", model_path, model_path, "--dim", "N=x")
    assert res.exit_code == 2 and "--dim expects NAME=POSITIVE_INT" in res.stderr


def test_real_entry_point_prints_no_traceback(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    proc = subprocess.run(
        [sys.executable, "-m", "onnxrep.cli", "optimize", str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "o.onnx")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    assert not (tmp_path / "o.onnx").exists()


def test_demo_runs_small(tmp_path):
    res = invoke("demo", "--resolution", 32, "--width-scale", 0.125, "--rounds", 2, "--save-dir", tmp_path)
    assert res.exit_code == 0, res.stderr
    assert "verified against the training graph: ok" in res.stdout
    assert "deploy" in res.stdout and "onnxrep" in res.stdout
    opt, dep = onnx.load(tmp_path / "repvgg-a0_optimized.onnx"), onnx.load(tmp_path / "repvgg-a0_deploy.onnx")
    assert histogram(opt).get("Conv") == histogram(dep).get("Conv")


def test_bench_interleaves_and_reports_ratios(model_path, tmp_path):
    out = tmp_path / "opt.onnx"
    invoke("optimize", model_path, "-o", out, "-q")
    res = invoke("bench", model_path, out, "--rounds", 3, "--warmup", 1, "--batch", 2, "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "inputs x [2, 16, 8, 8]" in lines[0] and lines[2].endswith("1.000")
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["batch"] == 2 and list(data["models"]) == [str(model_path), str(out)]
    assert all(m["runs"] == 3 for m in data["models"].values())


def test_bench_without_cuda_provider_says_so(model_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    res = invoke("bench", model_path, "--ep", "cuda")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "no CUDAExecutionProvider" in res.stderr


def test_on_mismatch_bisect_writes_the_verified_rest(model_path, tmp_path, monkeypatch):
    break_parallel_merge(monkeypatch, {0})
    out = tmp_path / "opt.onnx"
    res = invoke("optimize", model_path, "-o", out)
    assert res.exit_code == 3 and not out.exists()
    res = invoke("optimize", model_path, "-o", out, "--on-mismatch", "bisect", "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.stderr
    assert "broke equivalence and was left out" in res.stderr
    assert json.loads((tmp_path / "r.json").read_text())["verification"]["bisected"]["pass"] == "parallel-merge"


@pytest.mark.parametrize("seed", [*range(12), 59])  # 59: a name that is not UTF-8
def test_mutated_files_give_one_line_or_work(model_path, tmp_path, seed):
    """Bit flips and truncations anywhere in a model: a clean result or one error line, never a
    traceback, never a partial output."""
    rng = np.random.default_rng(seed)
    data = bytearray(model_path.read_bytes())
    for pos in rng.integers(0, len(data), size=1 + seed % 4):
        data[pos] ^= 1 << int(rng.integers(0, 8))
    if seed % 3 == 0:
        data = data[: int(rng.integers(1, len(data)))]
    bad = tmp_path / "mutated.onnx"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out.onnx"
    res = invoke("optimize", bad, "-o", out)
    assert res.exit_code in (0, 1, 3)  # 3: the optimized model differs from the mutated one
    assert "Traceback" not in res.stderr
    if res.exit_code:
        assert error_lines(res) == [res.stderr.splitlines()[-1]] and not out.exists()


def test_graph_with_a_cycle_or_missing_input_is_refused(tmp_path):
    from onnx import helper as h

    nodes = [h.make_node("Relu", ["b"], ["a"]), h.make_node("Relu", ["a"], ["b"])]
    graph = h.make_graph(nodes, "cycle", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                         [h.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [1])])
    onnx.save(h.make_model(graph), tmp_path / "cycle.onnx")
    res = invoke("optimize", tmp_path / "cycle.onnx", "-o", tmp_path / "o.onnx")
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and "invalid ONNX model" in res.stderr


@pytest.mark.parametrize("external", [False, True])
def test_no_verify_overwrites_its_input_only_when_named(model_path, tmp_path, external):
    """With --no-verify the weights are read from the input file while the output is written:
    writing over that very file (named by -o) must still give the right model."""
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    original = onnx.load(model_path)
    if external:
        onnx.save(original, src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    else:
        onnx.save(original, src)
    res = invoke("optimize", src, "-o", src, "--no-verify", "-q")
    assert res.exit_code == 0, res.stderr
    assert histogram(onnx.load(src)) == {"Conv": 1, "Relu": 1}
    assert (tmp_path / "in" / "m.onnx.data").is_file() == external
    assert invoke("verify", model_path, src).exit_code == 0
