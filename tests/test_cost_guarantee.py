"""The output never costs more than the input: conv-chain asks parallel-merge's own conditions
before it relies on a sum to absorb a dearer merged conv, and the engine checks the net cost of the
whole run and leaves out the rewrites that raised it. Also the per-rewrite and per-pass cost and
region fields of the report."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxrep
import onnxrep.passes.conv_chain as conv_chain
from graphs import Builder, histogram, run
from onnxrep.cost import model_cost
from test_parallel_merge import assert_equivalent

C, HW = 16, 8


def chain_plus_dense(b_is_output: bool, c: int = C, hw: int = HW) -> onnx.ModelProto:
    """x -> depthwise 3x3 -> 1x1 = a; x -> dense 3x3 = b; y = a + b (and b a graph output)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 1, 3, 3)).astype(np.float32), "w_dw"),
        numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(np.float32), "w_pw"),
        numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "w_dense"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w_dw"], ["t"], name="dw", group=c, pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Conv", ["t", "w_pw"], ["a"], name="pw", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["x", "w_dense"], ["b"], name="dense", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    shape = [1, c, hw, hw]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
    if b_is_output:
        outputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, shape))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def feeds(c: int = C, hw: int = HW):
    return {"x": np.random.default_rng(1).standard_normal((1, c, hw, hw)).astype(np.float32)}


def by_name(report, name):
    return next(p for p in report.to_dict()["passes"] if p["name"] == name)


def assert_not_dearer(model, out):
    before, after = model_cost(model), model_cost(out)
    assert after.macs <= before.macs and after.params <= before.params, (before, after)


# --------------------------------------------------------------------------------------------
# the case found by review
# --------------------------------------------------------------------------------------------


def test_chain_is_not_merged_when_parallel_merge_would_decline_the_sum():
    model = chain_plus_dense(b_is_output=True)
    assert model_cost(model).macs == 173056 and model_cost(model).params == 2704
    out, report = onnxrep.optimize(model, verify=True)
    assert report.verification["ok"]
    assert_equivalent(model, out, feeds())
    assert_not_dearer(model, out)
    assert histogram(out) == histogram(model)
    chain = by_name(report, "conv-chain")
    assert chain["rewritten"] == 0
    [skip] = chain["skips"]
    assert skip["candidate"] == "dw->pw"
    assert skip["reason"].startswith("cost: merged kernel [16, 16, 3, 3]")
    assert "parallel-merge would decline the sum: single_use: tensor 'b' is a graph output" in skip["reason"]
    assert by_name(report, "parallel-merge")["matched"] == 0  # the sum reads two different tensors
    assert report.left_out_for_cost == {} and report.runs == 1


def test_allow_cost_increase_merges_the_chain():
    model = chain_plus_dense(b_is_output=True)
    out, report = onnxrep.optimize(model, verify=True, allow_cost_increase=True)
    assert report.verification["ok"]
    assert_equivalent(model, out, feeds())
    assert by_name(report, "conv-chain")["rewritten"] == 1
    assert histogram(out) == {"Conv": 2, "Add": 1}
    after = model_cost(out)
    assert after.macs == 2 * 64 * C * C * 9 and after.params == 2 * C * C * 9  # two dense 3x3, no bias
    assert report.runs == 1


def test_chain_absorbed_by_its_sum_is_merged_and_the_sum_folds():
    """Without the extra graph output parallel-merge takes the merged chain in: the dearer
    intermediate is allowed, and the whole is cheaper than the input."""
    model = chain_plus_dense(b_is_output=False)
    out, report = onnxrep.optimize(model, verify=True)
    assert report.verification["ok"]
    assert_equivalent(model, out, feeds())
    assert histogram(out) == {"Conv": 1}
    chain, merge = by_name(report, "conv-chain"), by_name(report, "parallel-merge")
    assert chain["rewritten"] == 1 and merge["rewritten"] == 1
    assert chain["macs_delta"] > 0 and merge["macs_delta"] < 0
    before, after = model_cost(model), model_cost(out)
    assert chain["macs_delta"] + merge["macs_delta"] == after.macs - before.macs < 0
    assert chain["params_delta"] + merge["params_delta"] == after.params - before.params < 0


def test_engine_leaves_out_a_rewrite_that_ends_dearer(monkeypatch):
    """The engine's own net check, with conv-chain's check of parallel-merge switched off (the old
    waiver): the run that would end dearer is repeated without the chain."""
    monkeypatch.setattr(conv_chain, "_absorption_reason", lambda *a: "")
    model = chain_plus_dense(b_is_output=True)
    out, report = onnxrep.optimize(model, verify=True)
    assert report.verification["ok"]
    assert_equivalent(model, out, feeds())
    assert_not_dearer(model, out)
    assert histogram(out) == histogram(model)
    assert report.runs == 2
    assert list(report.left_out_for_cost) == ["dw->pw"]
    chain = by_name(report, "conv-chain")
    assert chain["skipped_by_condition"] == {"net_cost": 1}
    assert chain["skips"][0]["reason"] == "net_cost: left out: the model would end with more MACs than the input"
    assert report.to_dict()["left_out_for_cost"] == ["dw->pw"]

    out, report = onnxrep.optimize(model, verify=True, allow_cost_increase=True)
    assert by_name(report, "conv-chain")["rewritten"] == 1 and report.runs == 1
    assert model_cost(out).macs > model_cost(model).macs


def test_engine_keeps_the_rewrites_that_did_not_raise_the_cost(monkeypatch):
    """Two blocks side by side: the dear chain of one is left out, the RepVGG sum of the other
    still folds."""
    monkeypatch.setattr(conv_chain, "_absorption_reason", lambda *a: "")
    c = 8
    b = Builder(c)
    dense = b.conv("x", c, c, 3, bias=False)
    y1 = b.add(b.conv(b.conv("x", c, c, 3, groups=c, bias=False), c, c, 1, bias=False), dense)
    y2 = b.relu(b.sum([b.conv("x", c, c, 3), b.conv("x", c, c, 1), b.bn("x", c)]))
    model = b.model(y1, dense, y2)
    out, report = onnxrep.optimize(model, verify=True)
    assert report.verification["ok"]
    assert_equivalent(model, out, b.feeds())
    assert_not_dearer(model, out)
    assert len(report.left_out_for_cost) == 1 and "->" in next(iter(report.left_out_for_cost))
    assert by_name(report, "parallel-merge")["rewritten"] == 1


def test_merged_conv_without_bias_adds_no_weights():
    """A bias-free conv + an average pool merge into a conv without a bias input (a zero bias
    would add weights)."""
    c = 6
    b = Builder(c)
    model = b.model(b.add(b.avgpool("x", 3), b.conv("x", c, c, 3, bias=False)))
    out, report = onnxrep.optimize(model, verify=True)
    assert report.verification["ok"] and histogram(out) == {"Conv": 1}
    assert_equivalent(model, out, b.feeds())
    assert len(out.graph.node[0].input) == 2
    assert model_cost(out).params == model_cost(model).params


# --------------------------------------------------------------------------------------------
# report fields
# --------------------------------------------------------------------------------------------


def test_report_charges_every_rewrite_and_pass():
    c = 4
    b = Builder(c)
    y = b.relu(b.sum([b.bn(b.conv("x", c, c, 3, bias=False), c), b.bn(b.conv("x", c, c, 1, bias=False), c), b.bn("x", c)]))
    model = b.model(y)
    out, report = onnxrep.optimize(model)
    d = report.to_dict()
    merge = by_name(report, "parallel-merge")
    [entry] = merge["rewrites"]
    assert entry["output"] == model.graph.node[-1].input[0]  # the sum the Relu reads
    assert entry["inputs"] == ["x"]
    assert entry["macs_delta"] == -64 * c * c * 1  # the 1x1 is gone, the 3x3 stays
    assert entry["params_delta"] == (c * c * 9 + c) - (c * c * 9 + c * c + 3 * 4 * c)
    assert merge["macs_delta"] == entry["macs_delta"] and merge["params_delta"] == entry["params_delta"]
    assert sum(p["macs_delta"] for p in d["passes"]) == d["cost_after"]["macs"] - d["cost_before"]["macs"]
    assert sum(p["params_delta"] for p in d["passes"]) == d["cost_after"]["params"] - d["cost_before"]["params"]
    assert all(p["seconds"] >= 0 for p in d["passes"])
    assert d["passes_seconds"] == pytest.approx(sum(p["seconds"] for p in d["passes"]), abs=1e-5)
    assert d["left_out_for_cost"] == [] and d["runs"] == 1


def test_rewrite_entries_name_their_region():
    model = chain_plus_dense(b_is_output=False)
    _, report = onnxrep.optimize(model)
    [chain] = by_name(report, "conv-chain")["rewrites"]
    assert chain["output"] == "a" and chain["inputs"] == ["x"]
    [merge] = by_name(report, "parallel-merge")["rewrites"]
    assert merge["output"] == "y" and merge["inputs"] == ["x"]


def test_partial_sum_region_reads_the_terms_added_back():
    """A merge that adds another branch back reads that branch's tensor: it is an input."""
    c = 4
    b = Builder(c)
    other = b.relu("x")
    y = b.sum([b.conv("x", c, c, 3), b.conv("x", c, c, 1), other])
    _, report = onnxrep.optimize(b.model(y), passes=["parallel-merge"])
    [entry] = by_name(report, "parallel-merge")["rewrites"]
    assert entry["output"] == y and sorted(entry["inputs"]) == sorted(["x", other])


def test_multi_plan_rewrite_lists_its_outputs():
    """dead-channels ends in several places: one output per plan."""
    c = 6
    b = Builder(c)
    w = b.weight(c, c, 3)
    w[2] = 0
    h = b.conv("x", c, c, 3, bias=False, w=w)
    y1, y2 = b.conv(h, c, c, 1), b.conv(h, c, c, 3)
    model = b.model(y1, y2)
    out, report = onnxrep.optimize(model, passes=["dead-channels"], verify=True)
    assert report.verification["ok"]
    [entry] = by_name(report, "dead-channels")["rewrites"]
    assert sorted(entry["output"]) == sorted([y1, y2])
    assert entry["inputs"] == ["x"]
    assert entry["params_delta"] < 0 and entry["macs_delta"] < 0


def test_constant_plan_region_has_no_inputs():
    """A subgraph of constants folded into an initializer reads no tensor the region would need."""
    c = 4
    b = Builder(c)
    k = b.node("Mul", [b.const(np.full((1, c, 1, 1), 2.0)), b.const(np.full((1, c, 1, 1), 3.0))])
    y = b.node("Add", ["x", k])
    model = b.model(y)
    out, report = onnxrep.optimize(model, passes=["constant-fold"], verify=True)
    assert report.verification["ok"]
    [entry] = by_name(report, "constant-fold")["rewrites"]
    assert entry["output"] == k and entry["inputs"] == []
    assert entry["macs_delta"] == 0 and entry["params_delta"] == c - 2 * c
    assert_equivalent(model, out, b.feeds())


def head_model(nodes, inits, c, n):
    """An opset-17 model of ``nodes`` from input ``x`` [1, c] to output ``y`` [1, n]."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_only_the_pass_that_adds_up_to_more_is_left_out():
    """Two constant folds gather rows of one table (each adds a row, the last frees the table: no
    net change) and a BatchNormalization before a 10 -> 1000 Gemm would fold into a 1000-element
    bias (+1000 - 40 weights, against 20 elements of the BN's output written and read): the run
    keeps the folds and leaves out the BN fold alone (efficientvit's attention biases)."""
    rng = np.random.default_rng(5)
    c, n = 10, 1000
    inits = [
        numpy_helper.from_array(rng.standard_normal((2, c)).astype(np.float32), "table"),
        numpy_helper.from_array(np.array(0, np.int64), "i0"),
        numpy_helper.from_array(np.array(1, np.int64), "i1"),
        numpy_helper.from_array(rng.standard_normal((n, c)).astype(np.float32), "w"),
    ]
    inits += [numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), k) for k in ("s", "t", "m", "v")]
    nodes = [
        helper.make_node("Gather", ["table", "i0"], ["g0"], axis=0),
        helper.make_node("Gather", ["table", "i1"], ["g1"], axis=0),
        helper.make_node("Add", ["x", "g0"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Add", ["r", "g1"], ["h"]),
        helper.make_node("BatchNormalization", ["h", "s", "t", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Gemm", ["bn", "w"], ["y"], name="head", transB=1),
    ]
    model = head_model(nodes, inits, c, n)
    out, report = onnxrep.optimize(model)
    assert "Gather" not in histogram(out) and histogram(out)["BatchNormalization"] == 1
    assert report.runs == 2 and list(report.left_out_for_cost) == ["bn->head"]
    assert_not_dearer(model, out)
    x = {"x": rng.standard_normal((1, c)).astype(np.float32)}
    np.testing.assert_allclose(run(out, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-6)


def test_inexact_mac_counts_are_judged_by_the_rewrites_charges():
    """With unknown dims counted as 1, a fold that makes them known raises the count without adding
    work: the net check then adds up the rewrites' own charges (efficientvit TorchScript)."""
    from types import SimpleNamespace

    from onnxrep.engine import _Charge, _dearer, _Run
    from onnxrep.cost import Cost

    def report(before, after, exact):
        return SimpleNamespace(cost_before=Cost(before, 0, exact), cost_after=Cost(after, 0, exact))

    free = _Run({}, {}, {}, charges={"a": _Charge(0, 0), "b": _Charge(-4, 0)})
    dear = _Run({}, {}, {}, charges={"a": _Charge(5, 0), "b": _Charge(-4, 0)})
    assert _dearer(report(100, 120, False), free, 10, 10) == ""
    assert _dearer(report(100, 120, False), dear, 10, 10) == "MACs"
    assert _dearer(report(100, 120, True), free, 10, 10) == "MACs"
    assert _dearer(report(100, 100, True), dear, 10, 11) == "weights"


@pytest.mark.parametrize("c,n,folds", [(192, 1000, True), (192, 1200, False)])
def test_a_fold_that_adds_a_bias_is_judged_by_the_elements_moved(c, n, folds):
    """EfficientViT's head: BatchNormalization(192) before a bias-free 192 -> 1000 Gemm. The fold
    gives the Gemm a 1000-element bias (+1000 - 4 x 192 weights) but removes the BN, its
    parameters and its 192-element output, written and read: 193,000 elements moved per inference
    instead of 193,152, so it folds (timm's deploy form has that bias). With 1200 outputs the bias
    outweighs what the fold saves, and the engine leaves it out."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((n, c)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), k) for k in ("s", "t", "m", "v")]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "t", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Gemm", ["bn", "w"], ["y"], name="head", transB=1),
    ]
    model = head_model(nodes, inits, c, n)
    out, report = onnxrep.optimize(model, verify=True)
    assert report.verification["ok"]
    x = {"x": rng.standard_normal((1, c)).astype(np.float32)}
    np.testing.assert_allclose(run(out, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)
    if folds:
        assert histogram(out) == {"Gemm": 1} and report.runs == 1 and not report.left_out_for_cost
        before, after = report.cost_before, report.cost_after
        assert after.params - before.params == n - 4 * c
        assert after.traffic(after.params) < before.traffic(before.params)
    else:
        assert histogram(out) == {"BatchNormalization": 1, "Gemm": 1}
        assert list(report.left_out_for_cost) == ["bn->head"] and report.runs == 2
