"""The kernel-count check on the whole result (onnxrep/kernels.py and the engine's
``kernel_count``): onnxruntime's own optimized graph of the output has no more nodes than the
input's, else the rewrites responsible are left out."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from graphs import Builder, histogram
from test_parallel_merge import assert_equivalent

import onnxrep
from onnxrep import engine, kernels
from onnxrep.passes import affine_fold

C, H, W = 4, 6, 6


def gelu_between_convs(b: Builder | None = None):
    """Conv -> TorchScript's GELU (``Div -> Erf -> Add -> Mul(x) -> Mul(0.5)``, which onnxruntime
    fuses into one Gelu) -> Conv."""
    b = b or Builder(C, (H, W))
    t = b.conv("x", C, 8, 3)
    a = b.node("Add", [b.node("Erf", [b.node("Div", [t, b.const(np.array(math.sqrt(2.0)))])]), b.const(np.array(1.0))])
    y = b.node("Mul", [b.node("Mul", [t, a]), b.const(np.array(0.5))])
    return b, b.model(b.conv(y, 8, C, 1))


def repvgg(b: Builder | None = None):
    """RepVGG block: 3x3 conv+BN + 1x1 conv+BN + BN(x), summed, then Relu and a 1x1 conv."""
    b = b or Builder(C, (H, W))
    s = b.sum([b.bn(b.conv("x", C, C, 3, bias=False), C), b.bn(b.conv("x", C, C, 1, bias=False), C), b.bn("x", C)])
    return b, b.model(b.conv(b.relu(s), C, C, 1))


def test_count_kernels_counts_onnxruntimes_fused_graph():
    _, model = gelu_between_convs()
    k = kernels.count_kernels(model)
    assert k.taken and k.reason == ""
    assert k.ops.get("com.microsoft:Gelu") == 1 and "Erf" not in k.ops
    assert k.count == sum(k.ops.values()) < len(model.graph.node)


def test_count_kernels_limits():
    _, model = repvgg()
    weights, nodes = kernels.size(model)
    assert weights > 0 and nodes == len(model.graph.node)
    k = kernels.count_kernels(model, max_weight_bytes=weights - 1)
    assert k.count is None and k.reason == f"{weights} bytes of weights, more than the {weights - 1} the check builds a session for"
    k = kernels.count_kernels(model, max_nodes=nodes - 1)
    assert k.count is None and k.reason == f"{nodes} nodes, more than the {nodes - 1} the check builds a session for"


def test_count_kernels_declines_what_onnxruntime_cannot_load():
    b = Builder(C, (H, W))
    model = b.model(b.node("Relu", [b.conv("x", C, C, 1)]))
    model.graph.node[-1].op_type = "NoSuchOp"
    k = kernels.count_kernels(model)
    assert k.count is None and k.reason.startswith("onnxruntime cannot build a session: ")


def test_ordinary_folds_pass_the_check():
    b, model = repvgg()
    out, report = onnxrep.optimize(model)
    assert histogram(out) == {"Conv": 2, "Relu": 1}
    assert report.kernel_check == "ok"
    assert report.kernels_after < report.kernels_before
    assert report.to_dict()["kernels"] == {"before": report.kernels_before, "after": report.kernels_after, "check": "ok"}
    assert_equivalent(model, out, b.feeds())


def test_nothing_rewritten_no_check():
    b = Builder(C, (H, W))
    model = b.model(b.relu(b.conv("x", C, C, 3)))
    _, report = onnxrep.optimize(model)
    assert report.rewritten == 0 and report.kernels_before is None
    assert report.kernel_check == "not made: nothing was rewritten"


def test_large_input_not_checked(monkeypatch):
    _, model = repvgg()
    monkeypatch.setattr(kernels, "MAX_WEIGHT_BYTES", 10)
    monkeypatch.setattr(kernels.count_kernels, "__defaults__", (10, kernels.MAX_NODES))
    out, report = onnxrep.optimize(model)
    assert report.kernels_before is None and report.rewritten > 0
    assert report.kernel_check.startswith("not made: the input: ") and "bytes of weights, more than the 10" in report.kernel_check


def test_check_catches_a_fusion_the_catalogue_does_not_know(monkeypatch):
    """With affine-fold blind to the catalogue (a fusion it does not know of), it folds GELU's Mul(0.5)
    into the next Conv: no dearer by MACs and weights, but onnxruntime no longer fuses the GELU and
    its graph has more kernels. The check leaves that rewrite out and keeps the other (the BN
    folded into the first Conv, which onnxruntime fuses as well: the same count).

    The count is of the whole graph: a fold elsewhere that saves kernels (a RepVGG block's
    branches merged) can make up for a broken fusion, which the check then lets pass; the
    catalogue in passes/_fusions.py is what keeps each fusion."""
    monkeypatch.setattr(affine_fold, "breaks_fusion", lambda nodes, view: None)
    b = Builder(C, (H, W))
    t = b.bn(b.conv("x", C, 8, 3), 8)
    a = b.node("Add", [b.node("Erf", [b.node("Div", [t, b.const(np.array(math.sqrt(2.0)))])]), b.const(np.array(1.0))])
    g = b.node("Mul", [b.node("Mul", [t, a]), b.const(np.array(0.5))])
    model = b.model(b.conv(g, 8, C, 1))

    # the cost model alone folds the Mul(0.5): onnxruntime's Gelu is gone
    folded, rep = onnxrep.optimize(model, allow_cost_increase=True)
    assert histogram(folded)["Mul"] == 1 and rep.kernel_check == "not made: a cost increase is allowed"
    before, after = kernels.count_kernels(model), kernels.count_kernels(folded)
    assert after.count > before.count and "com.microsoft:Gelu" not in after.ops

    out, report = onnxrep.optimize(model)
    assert histogram(out) == {"Conv": 2, "Div": 1, "Erf": 1, "Add": 1, "Mul": 2}
    assert report.kernels_before == before.count and report.kernels_after <= before.count
    assert kernels.count_kernels(out).ops.get("com.microsoft:Gelu") == 1
    reason = (
        f"kernel_count: left out: onnxruntime's optimized graph of the model would have {after.count} kernels, "
        f"more than the input's {before.count}"
    )
    held = {k: v for k, v in report.left_out_for_cost.items() if v == reason}
    assert len(held) == 1, report.left_out_for_cost
    (key,) = held
    affine = next(p for p in report.passes if p.name == "affine-fold")
    assert affine.skipped[key] == reason
    assert report.kernel_check.startswith("1 rewrite(s) left out (kernel_count)")
    assert affine.rewritten == 1  # the BN
    assert_equivalent(model, out, b.feeds())


def test_check_falls_back_to_no_rewrite(monkeypatch):
    """Where no set of rewrites can be left out to keep the count (here: a count that always says
    more), the output is the input's graph, every rewrite declined for kernel_count."""
    b, model = repvgg()
    real = kernels.count_kernels
    calls = []

    def count(m, *a, **kw):
        calls.append(1)
        k = real(m, *a, **kw)
        return k if len(calls) == 1 else kernels.KernelCount(10**6, k.ops)

    monkeypatch.setattr(kernels, "count_kernels", count)
    out, report = onnxrep.optimize(model)
    assert histogram(out) == histogram(model) and report.rewritten == 0
    assert report.kernel_check.startswith("every rewrite left out (kernel_count)")
    assert report.left_out_for_cost and all(v.startswith("kernel_count: ") for v in report.left_out_for_cost.values())
    assert len(calls) <= 2 + engine.MAX_KERNEL_RUNS + 1


def test_rewrites_a_run_without_the_suspects_makes_join_them(monkeypatch):
    """A run that leaves out the suspects can make rewrites of its own (a candidate that a
    left-out rewrite had replaced, under a key of its own): those join the suspects. Then the
    suspects are narrowed down by halves. Here rewrite ``b`` breaks a fusion, and left out, its
    replacement ``b2`` does too; ``a`` is innocent and stays."""
    replacements = {"b": "b2"}

    def costed(held, hold_all=None):
        applied = [] if hold_all else [k for k in ("a", "b") if k not in held]
        applied += [r for k, r in replacements.items() if k in held and r not in held and not hold_all]
        report = SimpleNamespace(passes=[SimpleNamespace(rewrites=[{"candidate": k} for k in applied])], runs=1)
        return frozenset(applied), report, None, dict(held)

    def count(out, *a, **kw):
        return kernels.KernelCount(5 + 3 * bool(out & {"b", "b2"}))

    monkeypatch.setattr(kernels, "count_kernels", count)
    model = frozenset()
    out, report, _, held = costed({})
    out, report, held = engine._kernel_check(model, out, report, held, costed)
    assert out == {"a"} and sorted(held) == ["b", "b2"]
    assert all(v.startswith("kernel_count: left out: ") for v in held.values())
    assert (report.kernels_before, report.kernels_after) == (5, 5)
    assert report.kernel_check == "2 rewrite(s) left out (kernel_count): with them the output had 8 kernels"
    # runs: all suspects (b2 appears), all three, then [a] (no), [b, b2] (yes), [b] (no), [b2] (no)
    assert report.runs == 1 + 6
