"""Command-line conventions: positional output, exit codes per case (the same in every command),
``check`` for CI, ``--json PATH|-`` everywhere, ``--input-shapes``, validation before any work,
progress lines on stderr without control characters, report permissions, bench's batch."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import stat
import subprocess
import sys

import numpy as np
import onnx
import pytest

from graphs import Builder, histogram
from helpers import break_parallel_merge, invoke
from onnxrep import cli

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n


def _train(c=8, shape=("N", 8, 8, 8)):
    b = Builder(c, input_shape=list(shape))
    return b.model(b.relu(b.sum([b.bn(b.conv("x", c, c, 3, bias=False), c), b.bn(b.conv("x", c, c, 1), c), b.bn("x", c)])))


def _deploy(c=8, shape=("N", 8, 8, 8)):
    b = Builder(c, input_shape=list(shape))
    return b.model(b.relu(b.conv("x", c, c, 3)))


@pytest.fixture
def train(tmp_path):
    path = tmp_path / "train.onnx"
    onnx.save(_train(), path)
    return path


@pytest.fixture
def deploy(tmp_path):
    path = tmp_path / "deploy.onnx"
    onnx.save(_deploy(), path)
    return path


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def error_line(res) -> str:
    """The one error line: the last line of stderr, the only one that is no progress line."""
    lines = [line for line in res.stderr.splitlines() if not line.startswith("onnxrep: ")]
    assert len(lines) == 1 and lines[0] == res.stderr.splitlines()[-1], res.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def onnxrep_command() -> list[str]:
    exe = shutil.which("onnxrep")
    return [exe] if exe else [sys.executable, "-m", "onnxrep.cli"]


# --------------------------------------------------------------------------------------------
# positional output
# --------------------------------------------------------------------------------------------


def test_positional_output_like_onnxsim(train, tmp_path):
    res = invoke("optimize", train, tmp_path / "out.onnx", "-q")
    assert res.exit_code == 0, res.stderr
    assert histogram(onnx.load(tmp_path / "out.onnx")) == {"Conv": 1, "Relu": 1}
    res = invoke("optimize", train, tmp_path / "o2.onnx", "-o", tmp_path / "o2.onnx", "-q")  # the same file twice
    assert res.exit_code == 0, res.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        ([], "missing output: give OUT or -o OUT"),
        (["a.onnx", "-o", "b.onnx"], "two different outputs given"),
        (["--input-shapes", "x:1,8,8,8", "y:1,4"], "OUT 'y:1,4' looks like an input shape"),
        (["a.onnx", "--json", "r.json", "--report", "s.json"], "two different reports given"),
        (["a.onnx", "--json", "train.onnx"], "not written over a .onnx file"),
        (["a.onnx", "--json", "a.onnx"], "not written over a .onnx file"),
    ],
)
def test_output_usage_errors_exit_2_and_write_nothing(train, tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    before = files(tmp_path)
    res = invoke("optimize", "train.onnx", *args)
    assert res.exit_code == 2
    assert words in error_line(res)
    assert files(tmp_path) == before


# --------------------------------------------------------------------------------------------
# exit codes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["optimize", "train.onnx", "o.onnx", "--passes", "nope"], 2, "unknown pass 'nope'"),
        (["optimize", "train.onnx", "o.onnx", "--dim", "nosuchdim=4"], 2, "no symbolic dim 'nosuchdim'"),
        (["optimize", "train.onnx", "o.onnx", "--dim", "N=0"], 2, "--dim expects NAME=POSITIVE_INT"),
        (["optimize", "train.onnx", "o.onnx", "--seeds", "0"], 2, "--seeds"),
        (["optimize", "train.onnx", "o.onnx", "--input-shapes", "x:1,8,a,8"], 2, "--input-shapes expects NAME:D1,D2"),
        (["optimize", "train.onnx", "o.onnx", "--input-shapes", "y:1,8,8,8"], 2, "no input 'y'"),
        (["optimize", "train.onnx", "o.onnx", "--input-shapes", "x:1,4,8,8"], 2, "has size 8 on axis 1"),
        (["optimize", "train.onnx", "o.onnx", "--input-shapes", "x:1,8,8"], 2, "has rank 4"),
        (["optimize", "train.onnx", "o.onnx", "--nosuchoption"], 2, "No such option"),
        (["optimize", "train.onnx", "o.onnx", "--no-verify", "--dim", "nosuchdim=4"], 2, "--dim shapes the verification"),
        (["optimize", "train.onnx", "o.onnx", "--no-verify", "--rtol", "1e-3", "--on-mismatch", "bisect"], 2, "--rtol, --on-mismatch shape the verification"),
        (["optimize", "missing.onnx", "o.onnx"], 1, "no such file"),
        (["optimize", "train.onnx", "nowhere/o.onnx"], 1, "does not exist"),
        (["optimize", "train.onnx", "o.onnx", "--json", "nowhere/r.json"], 1, "does not exist"),
        (["inspect", "train.onnx", "--passes", "nope"], 2, "unknown pass 'nope'"),
        (["inspect", "missing.onnx"], 1, "no such file"),
        (["check", "train.onnx", "--skip", "nope"], 2, "unknown pass 'nope'"),
        (["check", "train.onnx", "--input-shapes", "y:1"], 2, "no input 'y'"),
        (["verify", "train.onnx", "train.onnx", "--dim", "nosuchdim=4"], 2, "no symbolic dim 'nosuchdim'"),
        (["verify", "train.onnx", "missing.onnx"], 1, "no such file"),
        (["bench", "train.onnx", "--rounds", "0"], 2, "--rounds"),
        (["bench", "train.onnx", "--dim", "nosuchdim=4"], 2, "no symbolic dim 'nosuchdim'"),
        (["bench", "train.onnx", "--json", "train.onnx"], 2, "not written over a .onnx file"),
        (["verify", "train.onnx", "m.model", "--json", "m.model"], 2, "is also a model path"),
        (["demo", "--family", "nope"], 2, "unknown family 'nope'"),
    ],
)
def test_exit_codes_per_case_and_nothing_written(train, tmp_path, monkeypatch, args, code, words):
    monkeypatch.chdir(tmp_path)
    before = files(tmp_path)
    res = invoke(*args)
    assert res.exit_code == code, res.stderr
    assert words in error_line(res)
    assert files(tmp_path) == before  # nothing written, the input untouched


def test_exit_3_on_a_verification_mismatch_in_optimize_and_verify(train, tmp_path, monkeypatch):
    out = tmp_path / "o.onnx"
    assert invoke("optimize", train, out, "-q").exit_code == 0
    break_parallel_merge(monkeypatch, {0})
    res = invoke("optimize", train, tmp_path / "bad.onnx")
    assert res.exit_code == 3 and "differs" in error_line(res)
    assert not (tmp_path / "bad.onnx").exists()
    bad = onnx.load(out)
    init = next(i for i in bad.graph.initializer if len(i.dims) == 4)
    arr = onnx.numpy_helper.to_array(init) * np.float32(1.01)
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(bad, tmp_path / "bad.onnx")
    res = invoke("verify", train, tmp_path / "bad.onnx")
    assert res.exit_code == 3 and "differs" in error_line(res)


def test_nothing_to_rewrite_is_said_plainly_and_exit_4_on_request(deploy, tmp_path):
    out = tmp_path / "o.onnx"
    res = invoke("optimize", deploy, out)
    assert res.exit_code == 0, res.stderr
    assert "nothing to rewrite: no pass matched anything" in res.stdout
    assert "\n\n" not in res.stdout and not any(line.strip() == "" for line in res.stdout.splitlines())
    assert not re.search(r"^[a-z-]+: 0 matched", res.stdout, re.M)  # no blank pass summary
    assert histogram(onnx.load(out)) == histogram(onnx.load(deploy))
    out.unlink()
    res = invoke("optimize", deploy, out, "--fail-if-unchanged")
    assert res.exit_code == 4
    assert "nothing to rewrite" in error_line(res) and "nothing written" in res.stderr
    assert not out.exists()
    res = invoke("optimize", tmp_path / "deploy.onnx", out, "--fail-if-unchanged", "--no-verify", "-q")
    assert res.exit_code == 4 and not out.exists()


def test_nothing_to_fold_but_cleanup_counts_as_a_change(tmp_path):
    from onnx import helper as h

    c = 4
    w = onnx.numpy_helper.from_array(np.ones((c, c, 3, 3), np.float32), "w")
    nodes = [h.make_node("Identity", ["x"], ["i"]), h.make_node("Conv", ["i", "w"], ["y"], pads=[1, 1, 1, 1])]
    graph = h.make_graph(
        nodes, "idconv", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, c, 8, 8])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, c, 8, 8])], [w],
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "id.onnx")
    out = tmp_path / "o.onnx"
    res = invoke("optimize", tmp_path / "id.onnx", out, "--fail-if-unchanged")
    assert res.exit_code == 0, res.stderr
    assert "cleanup: " in res.stdout and "nothing to rewrite" in res.stdout and "unchanged" not in res.stdout
    assert histogram(onnx.load(out)) == {"Conv": 1}
    res = invoke("optimize", tmp_path / "id.onnx", tmp_path / "o2.onnx", "--no-cleanup", "--fail-if-unchanged")
    assert res.exit_code == 4 and not (tmp_path / "o2.onnx").exists()


def test_fail_if_unchanged_lets_a_change_through(train, tmp_path):
    res = invoke("optimize", train, tmp_path / "o.onnx", "--fail-if-unchanged", "-q")
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "o.onnx").is_file()


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------


def test_check_fails_on_foldable_structure_and_lists_it(train, deploy, tmp_path):
    before = files(tmp_path)
    res = invoke("check", train)
    assert res.exit_code == 5
    assert f"{train}: 1 foldable (1 parallel-merge)" in res.stdout
    assert re.search(r"^  parallel-merge \S+: ", res.stdout, re.M)
    assert files(tmp_path) == before
    res = invoke("check", deploy)
    assert res.exit_code == 0, res.stderr
    assert f"{deploy}: ok, nothing to fold" in res.stdout
    assert res.stderr == ""  # one result line per model, no stage lines in a CI log
    out = tmp_path / "o.onnx"
    assert invoke("optimize", train, out, "-q").exit_code == 0
    assert invoke("check", out).exit_code == 0  # an optimized model passes


def test_check_many_files_error_wins_and_every_file_is_reported(train, deploy, tmp_path):
    res = invoke("check", deploy, train, tmp_path / "missing.onnx", "--json", "-")
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    assert data["exit_code"] == 1 and not data["ok"]
    by_path = {m["path"]: m for m in data["models"]}
    assert by_path[str(deploy)]["ok"] and not by_path[str(train)]["ok"]
    assert by_path[str(train)]["foldable"][0]["pass"] == "parallel-merge"
    assert "no such file" in by_path[str(tmp_path / "missing.onnx")]["error"]
    assert "missing.onnx: no such file" in res.stderr
    assert f"{train}: 1 foldable" in res.stderr  # the text goes to stderr when stdout has the JSON
    res = invoke("check", deploy, train)
    assert res.exit_code == 5


def test_check_does_not_count_preparatory_rewrites(tmp_path):
    """A zero Pad before a Conv is merged into the Conv's pads by normalize-pads: no training-time
    structure, so check passes."""
    from onnx import helper as h

    c = 4
    w = onnx.numpy_helper.from_array(np.ones((c, c, 3, 3), np.float32), "w")
    pads = onnx.numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    nodes = [h.make_node("Pad", ["x", "pads"], ["p"]), h.make_node("Conv", ["p", "w"], ["y"])]
    graph = h.make_graph(
        nodes, "padconv", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, c, 8, 8])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, c, 8, 8])], [w, pads],
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "pad.onnx")
    res = invoke("inspect", tmp_path / "pad.onnx", "--json", "-")
    rewritten = {p["name"]: p["rewritten"] for p in json.loads(res.stdout)["passes"]}
    assert rewritten["normalize-pads"] == 1  # the case is a preparatory rewrite
    res = invoke("check", tmp_path / "pad.onnx")
    assert res.exit_code == 0 and "ok, nothing to fold" in res.stdout


# --------------------------------------------------------------------------------------------
# --json everywhere
# --------------------------------------------------------------------------------------------


def test_json_dash_is_stdout_in_every_command(train, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o.onnx"
    res = invoke("optimize", train, out, "--json", "-")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["rewritten"] == 1 and data["verification"]["ok"]
    assert data["schema_version"] >= 1 and data["onnxrep_version"]
    assert set(data["seconds"]) >= {"load", "passes", "verify", "write", "total"}
    assert "| Conv" in res.stderr and "verification: ok" in res.stderr
    res = invoke("optimize", train, out, "--report", "-", "-q")
    assert res.exit_code == 0 and json.loads(res.stdout)["rewritten"] == 1
    assert not (tmp_path / "-").exists()
    for args in (["inspect", train], ["check", train], ["verify", train, out], ["bench", train, out, "--rounds", "1", "--warmup", "0"]):
        res = invoke(*args, "--json", "-")
        assert res.exit_code in (0, 5), (args, res.stderr)
        json.loads(res.stdout)
    assert not (tmp_path / "-").exists()


@pytest.mark.parametrize("command", ["optimize", "inspect", "check", "verify", "bench"])
def test_json_path_is_written_with_umask_permissions(train, tmp_path, command):
    path = tmp_path / "r.json"
    args = {
        "optimize": ["optimize", train, tmp_path / "o.onnx"],
        "inspect": ["inspect", train],
        "check": ["check", train],
        "verify": ["verify", train, train, "--seeds", "1"],
        "bench": ["bench", train, "--rounds", "1", "--warmup", "0"],
    }[command]
    old = os.umask(0o022)
    try:
        res = invoke(*args, "--json", path, "-q")
    finally:
        os.umask(old)
    assert res.exit_code in (0, 5), res.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    json.loads(path.read_text())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_json_without_a_path_is_stdout_and_never_a_model_file(train, deploy, tmp_path):
    res = invoke("inspect", train, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["rewritten"] == 1
    res = invoke("check", train, "--json")
    assert res.exit_code == 5 and json.loads(res.stdout)["exit_code"] == 5
    before = files(tmp_path)
    res = invoke("inspect", "--json", deploy, train)  # a model taken for the report's path
    assert res.exit_code == 2 and "not written over a .onnx file" in error_line(res)
    res = invoke("inspect", "--json", train)
    assert res.exit_code == 2 and "Missing argument 'IN'" in error_line(res)
    assert files(tmp_path) == before


# --------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------


def test_input_shapes_fix_the_output_and_show_in_the_summary(train, tmp_path):
    out = tmp_path / "o.onnx"
    res = invoke("optimize", train, out, "--input-shapes", "x:2,8,8,8", "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.stderr
    dims = [d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 8, 8, 8]
    assert re.search(r"\| input x\s+\|\s+float32 \[N, 8, 8, 8\] \|\s+float32 \[2, 8, 8, 8\] \|", res.stdout), res.stdout
    assert re.search(r"\| opset / IR\s+\|\s+\d+ / \d+ \|", res.stdout)
    assert re.search(r"\| output \S+\s+\|\s+float32 \[N, 8, 8, 8\] \|\s+float32 \[2, 8, 8, 8\] \|", res.stdout), res.stdout
    assert json.loads((tmp_path / "r.json").read_text())["input_shapes"] == {"x": [2, 8, 8, 8]}


def test_verify_takes_input_shapes(train, tmp_path):
    out = tmp_path / "o.onnx"
    assert invoke("optimize", train, out, "-q").exit_code == 0
    res = invoke("verify", train, out, "--input-shapes", "x:3,8,8,8", "--seeds", "1", "--json", "-")
    assert res.exit_code == 0, res.stderr
    assert {tuple(s["shapes"]["x"]) for s in json.loads(res.stdout)["input_sets"]} == {(3, 8, 8, 8)}
    res = invoke("verify", train, out, "--input-shapes", "x:3,8,8")
    assert res.exit_code == 2 and "has rank 4" in error_line(res)


def test_several_input_shapes_in_one_value(tmp_path):
    from onnx import helper as h

    graph = h.make_graph(
        [h.make_node("Add", ["x", "y"], ["z"])], "two",
        [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", 4]) for n in "xy"],
        [h.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 4])],
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "two.onnx")
    res = invoke("optimize", tmp_path / "two.onnx", tmp_path / "o.onnx", "--input-shapes", "x:3,4 y:3,4", "-q")
    assert res.exit_code == 0, res.stderr
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in onnx.load(tmp_path / "o.onnx").graph.input}
    assert shapes == {"x": [3, 4], "y": [3, 4]}


def test_dim_takes_comma_lists(tmp_path):
    path = tmp_path / "hw.onnx"
    onnx.save(_train(shape=("N", 8, "H", "W")), path)
    res = invoke("optimize", path, tmp_path / "o.onnx", "--dim", "H=6,W=5", "--seeds", "1")
    assert res.exit_code == 0, res.stderr
    assert "x [1, 8, 6, 5]" in res.stdout
    res = invoke("optimize", path, tmp_path / "o.onnx", "--dim", "H=6,nosuch=5")
    assert res.exit_code == 2 and "no symbolic dim 'nosuch'" in error_line(res)


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------


def test_bench_batch_on_a_static_model_is_refused_in_one_line(tmp_path):
    path = tmp_path / "static.onnx"
    onnx.save(_train(shape=(1, 8, 8, 8)), path)
    res = invoke("bench", path, "--batch", "8", "--rounds", "1")
    assert res.exit_code == 2
    assert "--batch 8" in error_line(res) and "static batch of 1" in res.stderr
    res = invoke("bench", path, "--rounds", "1", "--warmup", "0", "--json", "-", "-q")
    assert res.exit_code == 0 and json.loads(res.stdout)["batch"] == 1
    res = invoke("bench", path, "--batch", "1", "--rounds", "1", "--warmup", "0", "-q")
    assert res.exit_code == 0


def test_bench_batch_on_a_symbolic_model_times_that_batch(train):
    res = invoke("bench", train, "--batch", "8", "--rounds", "1", "--warmup", "0", "--json", "-")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["batch"] == 8 and data["inputs"] == {"x": [8, 8, 8, 8]}
    assert "inputs x [8, 8, 8, 8]" in res.stderr


# --------------------------------------------------------------------------------------------
# real processes: exit codes, output without control characters off a terminal, progress on one
# --------------------------------------------------------------------------------------------


def test_real_process_exit_codes_and_plain_output(train, deploy, tmp_path):
    cmd = onnxrep_command()
    run = lambda *a: subprocess.run([*cmd, *map(str, a)], capture_output=True, text=True, cwd=tmp_path)  # noqa: E731
    proc = run("optimize", train, tmp_path / "o.onnx")
    assert proc.returncode == 0, proc.stderr
    assert not CONTROL.search(proc.stdout) and not CONTROL.search(proc.stderr)
    stages = [line.split()[1] for line in proc.stderr.splitlines()]
    assert stages[0] == "loaded" and "passes:" in stages and "verified" in stages and stages[-1] == "wrote", proc.stderr
    assert all(line.startswith("onnxrep: ") for line in proc.stderr.splitlines())
    proc = run("optimize", train, tmp_path / "o.onnx", "-q")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    assert run("check", train).returncode == 5
    assert run("check", tmp_path / "o.onnx").returncode == 0
    assert run("optimize", deploy, tmp_path / "d.onnx", "--fail-if-unchanged", "-q").returncode == 4
    proc = run("optimize", train, tmp_path / "x.onnx", "--passes", "nope")
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown pass") and proc.stderr.count("\n") == 1
    assert run("bench", train, "--rounds", "0").returncode == 2
    assert run("optimize", tmp_path / "missing.onnx", tmp_path / "x.onnx").returncode == 1
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "d.onnx").exists()
    proc = run("--help")
    assert "Exit codes" in proc.stdout and "check: foldable" in proc.stdout
    # python -m onnxrep is the same command
    proc = subprocess.run([sys.executable, "-m", "onnxrep", "check", str(train)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 5 and "1 foldable" in proc.stdout, proc.stderr


def test_progress_on_a_terminal_is_a_status_line(train, tmp_path):
    """With stderr on a terminal the stages show as one line rewritten in place, cleared at the
    end; the summary on stdout (a pipe) has no control characters."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*onnxrep_command(), "optimize", str(train), str(tmp_path / "o.onnx")],
            stdout=subprocess.PIPE, stderr=slave, text=True, cwd=tmp_path,
        )
        os.close(slave)
        err = b""
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            err += chunk
        out = proc.stdout.read()
        assert proc.wait(60) == 0
    finally:
        os.close(master)
    text = err.decode()
    assert "\r" in text and "passes round" in text and "verify" in text
    assert text.endswith("\r\x1b[K")  # the status line is cleared before the summary
    assert "onnxrep: loaded" not in text  # no plain lines on a terminal
    assert not CONTROL.search(out) and "verification: ok" in out


def test_no_command_prints_the_help_and_exits_2():
    res = invoke()
    assert res.exit_code == 2
    assert res.stderr.startswith("Usage: ") and "Exit codes" in res.stderr  # the help, not "error: Usage: ..."


def test_help_lists_the_exit_codes():
    res = invoke("--help")
    for code, text in cli.EXIT_CODES.items():
        assert f"{code}" in res.stdout and text.split(":")[0] in res.stdout


def _needs_dims(path):
    """x [N, 8, H, W] -> Reshape to [N, 512] -> MatMul: runs only where 8 * H * W == 512."""
    from onnx import helper as h

    shape = onnx.numpy_helper.from_array(np.array([0, 512], np.int64), "shape")
    w = onnx.numpy_helper.from_array(np.ones((512, 4), np.float32), "w")
    nodes = [h.make_node("Reshape", ["x", "shape"], ["r"]), h.make_node("MatMul", ["r", "w"], ["y"])]
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8, "H", "W"])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])], [shape, w],
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)


def test_bench_on_dims_that_need_values_says_which_in_one_line(tmp_path):
    path = tmp_path / "dims.onnx"
    _needs_dims(path)
    proc = subprocess.run([*onnxrep_command(), "bench", str(path), "--rounds", "1"], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("onnxrep: loaded") and len(lines) == 2, proc.stderr
    assert lines[1].startswith("error: the models do not run")
    assert "symbolic dims set by default: H=32, W=32 (give their values with --dim H=...,W=...)" in proc.stderr
    assert not CONTROL.search(proc.stderr)  # no coloured onnxruntime log line
    proc = subprocess.run(
        [*onnxrep_command(), "bench", str(path), "--rounds", "1", "--dim", "H=8,W=8", "-q"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_a_model_that_needs_dim_values_is_bad_input_with_a_hint(tmp_path):
    path = tmp_path / "dims.onnx"
    _needs_dims(path)
    res = invoke("optimize", path, tmp_path / "o.onnx")
    assert res.exit_code == 1  # the input does not run on the inputs made for it: no mismatch (3)
    line = error_line(res)
    assert "the original model fails in onnxruntime" in line
    assert "symbolic dims set by default:" in line and "H=32, W=32" in line and "--dim" in line
    assert not (tmp_path / "o.onnx").exists()
    res = invoke("optimize", path, tmp_path / "o.onnx", "--dim", "H=8,W=8", "-q")
    assert res.exit_code == 0, res.stderr
    res = invoke("optimize", path, tmp_path / "o2.onnx", "--input-shapes", "x:1,8,8,8", "-q")
    assert res.exit_code == 0, res.stderr


@pytest.mark.parametrize(
    "values, shapes",
    [
        (("x:1,3,224,224",), {"x": [1, 3, 224, 224]}),
        (("input:0:1,3",), {"input:0": [1, 3]}),  # TensorFlow names hold a colon
        (("x:1,3 y:2",), {"x": [1, 3], "y": [2]}),
        (("x:1", "y:2,2"), {"x": [1], "y": [2, 2]}),
    ],
)
def test_input_shapes_syntax(values, shapes):
    assert cli._parse_input_shapes(values) == shapes


@pytest.mark.parametrize("value", ["x", "x:", ":1,2", "x:1,,2", "x:0,3", "x:-1,3", "x:1.5", "x:a"])
def test_input_shapes_syntax_errors(value):
    with pytest.raises(cli.UsageError, match="--input-shapes expects NAME:D1,D2"):
        cli._parse_input_shapes((value,))
    with pytest.raises(cli.UsageError, match="given twice"):
        cli._parse_input_shapes(("x:1", "x:2"))


def test_a_model_that_needs_dim_values_prints_no_onnxruntime_log(tmp_path):
    path = tmp_path / "dims.onnx"
    _needs_dims(path)
    proc = subprocess.run([*onnxrep_command(), "optimize", str(path), str(tmp_path / "o.onnx")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert not CONTROL.search(proc.stderr), proc.stderr  # no coloured onnxruntime line
    lines = proc.stderr.splitlines()
    assert all(line.startswith("onnxrep: ") for line in lines[:-1]), proc.stderr
    assert lines[-1].startswith("error: the original model fails in onnxruntime") and "H=32, W=32" in lines[-1]
