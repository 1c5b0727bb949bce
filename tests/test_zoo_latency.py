"""``benchmarks/zoo_latency.py`` runs end to end on one small zoo model: one round, both runtimes,
every output written (JSON, plot, the generated section of a Markdown file, replaced in place on
a second write). Times nothing: the latencies are the benchmark's business, not the tests'.
Skipped without torch, timm, openvino or matplotlib."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("matplotlib")

import zoo_models as zm  # noqa: E402

zm.ensure_torchvision()
pytest.importorskip("timm")

pytestmark = pytest.mark.zoo

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_script():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("zoo_latency", ROOT / "benchmarks" / "zoo_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_model_one_round_writes_every_output(tmp_path):
    zl = load_script()
    cache = os.environ.get("ONNXREP_ZOO_CACHE") or str(tmp_path / "cache")
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\nbefore\n")
    out_json, out_png = tmp_path / "z.json", tmp_path / "z.png"
    argv = ["--models", "lcnetv2_small", "--exporters", "torchscript", "--runtimes", "ort", "openvino",
            "--batches", "1", "--rounds", "1", "--min-rounds", "1", "--warmup", "0", "--no-repeat",
            "--cache", cache, "--json", str(out_json), "--plot", str(out_png), "--markdown", str(md)]
    assert zl.main(argv) == 0

    doc = json.loads(out_json.read_text())
    assert doc["machine"]["cpu_model"] and doc["machine"]["cpu_usable"] >= 1
    for key in ("onnxrep_commit", "onnxruntime", "openvino", "torch", "timm", "python"):
        assert doc["versions"][key]
    assert doc["settings"]["ort_session_config"]["session.intra_op.allow_spinning"] == "0"
    assert doc["settings"]["openvino_config"]["PERFORMANCE_HINT"] == "LATENCY"
    rows = doc["results"]
    assert sorted(r["runtime"] for r in rows) == ["openvino", "ort"]
    for r in rows:
        assert "error" not in r, r.get("traceback")
        assert r["prep"]["check"]["onnxrep"]["exact"] and r["prep"]["check"]["deploy"]["exact"]
        (m,) = r["runs"]
        assert m["rounds"] == 1
        assert set(m["graphs"]) == {"train", "onnxrep", "deploy"}
        assert set(m["ratios"]) == {"onnxrep/deploy", "onnxrep/train", "deploy/train"}
    ort_row = next(r for r in rows if r["runtime"] == "ort")
    assert set(ort_row["ort_kernels"]) == {"train", "onnxrep", "deploy"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n") and text.count(zl.BEGIN) == 1 and text.count(zl.END) == 1
    zl.update_section(md, zl.BEGIN + "\nnew\n" + zl.END)  # a second write replaces the section
    again = md.read_text()
    assert again.count(zl.BEGIN) == 1 and "\nnew\n" in again and "lcnetv2_small" not in again


def test_above_target_judges_each_ratio_by_its_own_target():
    zl = load_script()

    def summary(**ratios):
        return {"ratios": {k.replace("_", "/"): {"ratio": v} for k, v in ratios.items()}}

    assert zl.above_target(summary(onnxrep_deploy=1.02, onnxrep_train=1.02), 1.02) == []
    assert zl.above_target(summary(onnxrep_deploy=1.021, onnxrep_train=0.9), 1.02) == ["onnxrep/deploy"]
    assert zl.above_target(summary(onnxrep_deploy=1.0, onnxrep_train=1.03), 1.02) == ["onnxrep/train"]
    assert zl.above_target(summary(onnxrep_deploy=1.0, onnxrep_train=1.0, deploy_train=2.0), 1.02) == []


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_round_orders_balance_positions_and_predecessors(n):
    from collections import Counter

    orders = load_script().williams(n)
    assert all(sorted(o) == list(range(n)) for o in orders)
    positions = Counter((v, i) for o in orders for i, v in enumerate(o))
    predecessors = Counter((o[i - 1], o[i]) for o in orders for i in range(1, n))
    assert len(positions) == n * n and len(set(positions.values())) == 1
    assert len(predecessors) == n * (n - 1) and len(set(predecessors.values())) == 1
