"""Arguments are checked before any work: the API raises UsageError (a ValueError) naming the
valid values, the command line prints one line and writes nothing; user inputs and tolerances
reach the verification."""

import os

import numpy as np
import onnx
import pytest

import onnxrep
from graphs import Builder, histogram
from helpers import break_parallel_merge, invoke
from onnxrep import UsageError


def _model(c=8, batch="N"):
    b = Builder(c, input_shape=[batch, c, 8, 8])
    return b.model(b.relu(b.sum([b.bn(b.conv("x", c, c, 3, bias=False), c), b.bn(b.conv("x", c, c, 1), c), b.bn("x", c)])))


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "train.onnx"
    onnx.save(_model(), path)
    return path


def _files(folder):
    return sorted(p for p in os.listdir(folder))


# --------------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------------


def test_passes_as_one_string_is_a_list_of_names():
    out, report = onnxrep.optimize(_model(), passes="parallel-merge")
    assert [p.name for p in report.passes] == ["parallel-merge"]
    assert histogram(out) == {"Conv": 1, "Relu": 1}
    _, report = onnxrep.optimize(_model(), passes="parallel-merge, affine-fold")
    assert [p.name for p in report.passes] == ["parallel-merge", "affine-fold"]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"passes": ["nope"]}, "unknown pass 'nope'; available: "),
        ({"skip": "nope"}, "unknown pass 'nope'"),
        ({"on_mismatch": "bisekt"}, "on_mismatch must be one of fail, bisect"),
        ({"tolerance": -1}, "tolerance must be a finite number >= 0"),
        ({"tolerance": float("nan")}, "tolerance must be a finite number >= 0"),
        ({"verify": True, "seeds": 0}, "seeds must be an integer >= 1"),
        ({"verify": True, "rtol": -1e-3}, "rtol must be a finite number >= 0"),
        ({"verify": True, "dims": {"nosuch": 4}}, "no symbolic dim 'nosuch' (symbolic dims: N)"),
        ({"verify": True, "dims": {"N": 0}}, "dim 'N' must be an integer >= 1"),
        ({"verify": True, "inputs": [{"y": np.zeros((1, 8, 8, 8), np.float32)}]}, "the model has no input 'y'"),
        ({"verify": True, "inputs": [{"x": np.zeros((1, 8, 8), np.float32)}]}, "has rank 3, the model expects 4"),
        ({"verify": True, "inputs": [{"x": np.zeros((1, 8, 8, 8), np.float64)}]}, "has dtype float64"),
        ({"verify": True, "inputs": [{"x": np.zeros((1, 4, 8, 8), np.float32)}]}, "size 4 on axis 1, the model expects 8"),
    ],
)
def test_invalid_arguments_raise_value_errors_naming_the_valid_values(kwargs, words):
    model = _model()
    before = model.SerializeToString()
    with pytest.raises(ValueError) as err:
        onnxrep.optimize(model, **kwargs)
    assert isinstance(err.value, UsageError) and words in str(err.value)
    assert model.SerializeToString() == before


def test_bad_arguments_are_refused_before_the_model_is_read(tmp_path):
    with pytest.raises(UsageError):
        onnxrep.optimize(tmp_path / "does-not-exist.onnx", on_mismatch="bisekt")


def test_user_inputs_reach_the_verification():
    x = np.full((2, 8, 8, 8), 7.0, np.float32)
    _, report = onnxrep.optimize(_model(), verify=True, seeds=1, inputs=[{"x": x}])
    assert report.verification["ok"]
    sets = report.verification["input_sets"]
    assert any(s.get("shapes", {}).get("x") == [2, 8, 8, 8] for s in sets), sets


def test_verify_api_checks_its_arguments():
    with pytest.raises(UsageError, match="seeds must be an integer >= 1"):
        onnxrep.verify(_model(), _model(), seeds=0)
    assert onnxrep.verify(_model(), _model(), seeds=1).ok


# --------------------------------------------------------------------------------------------
# CLI: one line, non-zero exit, nothing written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (["--seeds", "0"], "--seeds"),
        (["--dim", "nosuch=4"], "no symbolic dim 'nosuch'"),
        (["--dim", "N=0"], "--dim expects NAME=POSITIVE_INT"),
        (["--rtol", "-1"], "--rtol"),
        (["--passes", "nope"], "unknown pass 'nope'"),
        (["--on-mismatch", "bisekt"], "--on-mismatch"),
        (["--report", "missing/r.json"], "missing"),
        (["--check-inputs", "x.txt"], "--check-inputs expects NAME:FILE.npy or FILE.npz"),
        (["--check-inputs", "x:missing.npy"], "cannot read missing.npy"),
    ],
)
def test_cli_refuses_bad_options_in_one_line_and_writes_nothing(model_path, tmp_path, args, words, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _files(tmp_path)
    data = model_path.read_bytes()
    res = invoke("optimize", model_path, "-o", tmp_path / "out.onnx", *args)
    assert res.exit_code != 0
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert words in res.stderr
    assert _files(tmp_path) == before and model_path.read_bytes() == data


def test_cli_refuses_an_output_in_a_missing_folder_before_any_work(model_path, tmp_path, monkeypatch):
    import onnxrep.engine

    def boom(*a, **k):
        raise AssertionError("the passes ran")

    monkeypatch.setattr(onnxrep.engine, "run", boom)
    res = invoke("optimize", model_path, "-o", tmp_path / "nowhere" / "out.onnx")
    assert res.exit_code != 0 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    assert not (tmp_path / "nowhere").exists()


def test_cli_check_inputs_npz_and_npy(model_path, tmp_path):
    x = np.full((3, 8, 8, 8), -5.0, np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "set.npz", x=x[:1])
    out = tmp_path / "out.onnx"
    res = invoke(
        "optimize", model_path, "-o", out, "--seeds", "1", "--check-inputs", f"x:{tmp_path / 'x.npy'}",
        "--check-inputs", tmp_path / "set.npz", "--rtol", "1e-4", "--atol", "1e-5",
    )
    assert res.exit_code == 0, res.stderr
    assert "verification: ok" in res.stdout and "x [3, 8, 8, 8]" in res.stdout
    res = invoke("verify", model_path, out, "--seeds", "1", "--check-inputs", tmp_path / "set.npz")
    assert res.exit_code == 0, res.stderr
    assert "verification: ok" in res.stdout


def test_cli_usage_errors_are_one_line(model_path):
    res = invoke("bench", model_path, "--rounds", "0")
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    res = invoke("optimize", model_path)
    assert res.exit_code == 2 and "missing output: give OUT or -o OUT" in res.stderr and res.stderr.count("\n") == 1


# --------------------------------------------------------------------------------------------
# mismatch policy
# --------------------------------------------------------------------------------------------


def _three_blocks():
    c = 8
    b = Builder(c, input_shape=[1, c, 8, 8])
    y = "x"
    for _ in range(3):
        y = b.relu(b.sum([b.bn(b.conv(y, c, c, 3, bias=False), c), b.bn(b.conv(y, c, c, 1), c), b.bn(y, c)]))
    return b.model(y)


def test_bisect_leaves_out_every_rewrite_whose_region_differs(monkeypatch):
    seen = break_parallel_merge(monkeypatch, {0, 2})
    out, report = onnxrep.optimize(_three_blocks(), passes="parallel-merge", verify=True, seeds=1, on_mismatch="bisect")
    assert report.verification["ok"]
    assert sorted(c["candidate"] for c in report.verification["left_out"]) == sorted([seen[0], seen[2]])
    assert histogram(out)["Conv"] == 2 + 1 + 2


def test_bisect_says_what_it_tried_when_no_rewrite_explains_the_mismatch(monkeypatch):
    """Without the region checks to name them, two broken rewrites cannot be isolated by halving:
    the error says so and lists the runs."""
    import onnxrep.regions

    monkeypatch.setattr(onnxrep.regions, "check_regions", lambda *a, **k: [])
    break_parallel_merge(monkeypatch, {0, 2})
    with pytest.raises(onnxrep.VerificationError, match=r"bisect could not isolate the rewrites responsible \(\d+ runs: .*left out: mismatch"):
        onnxrep.optimize(_three_blocks(), passes="parallel-merge", verify=True, seeds=1, on_mismatch="bisect")
