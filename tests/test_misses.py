"""No silent misses: every sum, affine op next to a linear layer and 1x1 conv chain left in the
output is listed with the condition that stopped it (onnxrep.misses, `inspect`, the JSON report)."""

import json

import numpy as np
import onnx
import pytest

from graphs import Builder
from onnxrep import engine, misses
from test_cli import invoke


def run(model, **kw):
    out, report = engine.run(model, **kw)
    return out, report, misses.find(out, report)


def only(found, kind):
    return [m for m in found if m.kind == kind]


def node_name(model, output):
    return next(n.name for n in model.graph.node if output in n.output)


def se_gate(b, x):
    """A computed per-channel scale [N, C, 1, 1]: Sigmoid(GlobalAveragePool(x))."""
    return b.node("Sigmoid", [b.node("GlobalAveragePool", [x])])


# sums ----------------------------------------------------------------------------------------


def test_sum_of_branches_on_different_tensors_names_them():
    """Conv(x) + Conv(Relu(x)): the branches read x and Relu(x); the sum stays and says so."""
    c = 4
    b = Builder(c)
    r = b.relu("x")
    c1, c2 = b.conv("x", c, c, 3), b.conv(r, c, c, 3)
    y = b.add(c1, c2)
    model = b.model(y)
    out, _, found = run(model)
    sums = only(found, misses.SUM)
    assert len(sums) == 1, found
    m = sums[0]
    assert m.condition in ("same_input", misses.DIFFERENT_INPUTS)  # parallel-merge's own, or ours
    assert m.reason.startswith("branches read different tensors")
    assert "'x'" in m.reason or "x (a graph input)" in m.reason
    assert r in m.reason
    assert node_name(out, y) in m.nodes
    assert only(found, misses.AFFINE) == [] and only(found, misses.CHAIN) == []


def test_different_inputs_classified_without_a_decline():
    """With no report (no declines to read), the sum is classified as different_inputs, each
    branch's tensor named with the node that computes it."""
    c = 4
    b = Builder(c)
    r = b.relu("x")
    y = b.add(b.conv("x", c, c, 3), b.conv(r, c, c, 3))
    model = b.model(y)
    (m,) = only(misses.find(model), misses.SUM)
    assert m.condition == misses.DIFFERENT_INPUTS and m.pass_name is None
    relu = node_name(model, r)
    assert m.reason == f"branches read different tensors: x (a graph input), {r} (Relu '{relu}')"


def test_residual_of_two_activations_is_listed():
    """Every Add tree of computed terms is listed, also one no fold could ever take."""
    c = 4
    b = Builder(c)
    y = b.add(b.relu("x"), b.node("Sigmoid", ["x"]))
    _, _, found = run(b.model(y))
    assert [m.kind for m in found] == [misses.SUM]
    assert "branches read different tensors" in found[0].reason


def test_variadic_sum_kept_by_normalize_sums_reports_its_decline():
    """Sum(Relu(x), Sigmoid(x), Tanh(x)): normalize-sums keeps it (`foldable`) and says why."""
    c = 4
    b = Builder(c)
    y = b.node("Sum", [b.relu("x"), b.node("Sigmoid", ["x"]), b.node("Tanh", ["x"])])
    _, report, found = run(b.model(y))
    (m,) = only(found, misses.SUM)
    assert (m.condition, m.pass_name, m.key) == ("foldable", "normalize-sums", y)
    assert report.passes[[p.name for p in report.passes].index("normalize-sums")].skipped[y] == f"foldable: {m.reason}"


def test_sum_with_a_constant_term_is_no_sum_of_branches():
    """relu(x) + c has one computed term: an affine map, not a sum of branches."""
    c = 4
    b = Builder(c)
    y = b.node("Add", [b.relu("x"), b.const(np.ones((1, c, 1, 1)))])
    assert misses.find(b.model(y)) == []


# affine ops next to linear layers ------------------------------------------------------------


def test_conv_then_mul_by_a_computed_scale_is_not_constant():
    c = 4
    b = Builder(c)
    conv = b.conv("x", c, c, 3)
    y = b.node("Mul", [conv, se_gate(b, "x")])
    model = b.model(y)
    out, _, found = run(model)
    (m,) = only(found, misses.AFFINE)
    assert m.condition == misses.NOT_CONSTANT and m.pass_name is None
    assert m.nodes == (node_name(model, conv), node_name(model, y))
    assert m.key == f"{node_name(model, conv)}->{node_name(model, y)}"
    assert "Sigmoid" in m.reason and "not a constant" in m.reason


def test_mul_by_a_computed_scale_before_a_conv_is_not_constant():
    c = 4
    b = Builder(c)
    g = b.node("Mul", ["x", se_gate(b, "x")])
    conv = b.conv(g, c, c, 1)
    model = b.model(conv)
    (m,) = only(run(model)[2], misses.AFFINE)
    assert m.condition == misses.NOT_CONSTANT
    assert m.key == f"{node_name(model, g)}->{node_name(model, conv)}"


def test_bn_before_a_padded_conv_reports_affine_folds_own_decline():
    """BN(x) -> Conv 3x3 pads 1: the BN's shift would meet zero padding (`no_padding`)."""
    c = 4
    b = Builder(c)
    bn = b.bn("x", c)
    conv = b.conv(bn, c, c, 3)
    model = b.model(conv)
    out, report, found = run(model)
    (m,) = only(found, misses.AFFINE)
    key = f"{node_name(model, bn)}->{node_name(model, conv)}"
    assert (m.kind, m.key, m.condition, m.pass_name) == (misses.AFFINE, key, "no_padding", "affine-fold")
    fold = next(p for p in report.passes if p.name == "affine-fold")
    assert fold.skipped[key] == f"no_padding: {m.reason}"
    assert m.nodes == (node_name(model, bn), node_name(model, conv))


def test_conv_output_read_twice_is_single_use():
    """Conv -> BN with the conv's output also read by a Relu: no candidate is formed; the reason
    names the other reader."""
    c = 4
    b = Builder(c)
    conv = b.conv("x", c, c, 3)
    bn = b.bn(conv, c)
    r = b.relu(conv)
    model = b.model(bn, r)
    (m,) = only(run(model)[2], misses.AFFINE)
    assert m.condition == misses.SINGLE_USE
    assert m.reason == f"tensor '{conv}' is also read by '{node_name(model, r)}' (Relu)"


def test_affine_pass_left_out_is_not_selected():
    c = 4
    b = Builder(c)
    bn = b.bn(b.conv("x", c, c, 3), c)
    _, _, found = run(b.model(bn), skip=["affine-fold", "linear-affine", "token-bn", "parallel-merge"])
    (m,) = found
    assert (m.kind, m.condition) == (misses.AFFINE, misses.NOT_SELECTED)
    assert "affine-fold" in m.reason


def test_without_a_report_a_plain_conv_bn_is_no_pass_matched():
    c = 4
    b = Builder(c)
    bn = b.bn(b.conv("x", c, c, 3), c)
    (m,) = misses.find(b.model(bn))
    assert m.condition == misses.NO_PASS_MATCHED and m.reason.startswith("no pass matched: Conv '")


def test_linear_layer_bias_and_attention_scores_are_not_listed():
    """A MatMul's own bias Add is part of the layer; a MatMul of two computed tensors is no layer."""
    c = 8
    b = Builder(c, input_shape=[2, 5, c])
    w = b.const(b.rng.standard_normal((c, c)))
    q = b.node("Add", [b.node("MatMul", ["x", w]), b.const(b.rng.standard_normal(c))])
    kt = b.node("Transpose", ["x"], perm=[0, 2, 1])
    scores = b.node("Mul", [b.node("MatMul", [q, kt]), b.const(np.array(0.5))])
    assert misses.find(b.model(scores)) == []


def test_gemm_followed_by_mul_by_a_computed_tensor_is_listed():
    c = 8
    b = Builder(c, input_shape=[3, c])
    g = b.node("Gemm", ["x", b.const(b.rng.standard_normal((c, c))), b.const(b.rng.standard_normal(c))])
    y = b.node("Mul", [g, b.node("Sigmoid", ["x"])])
    model = b.model(y)
    (m,) = run(model)[2]
    assert (m.kind, m.condition) == (misses.AFFINE, misses.NOT_CONSTANT)
    assert m.nodes == (node_name(model, g), node_name(model, y))


# conv chains ---------------------------------------------------------------------------------


def test_biased_1x1_before_padded_conv_reports_conv_chains_decline():
    c = 4
    b = Builder(c)
    c1 = b.conv("x", c, c, 1)
    c2 = b.conv(c1, c, c, 3)
    model = b.model(c2)
    out, report, found = run(model)
    (m,) = only(found, misses.CHAIN)
    key = f"{node_name(model, c1)}->{node_name(model, c2)}"
    assert (m.key, m.condition, m.pass_name) == (key, "border", "conv-chain")
    assert next(p for p in report.passes if p.name == "conv-chain").skipped[key] == f"border: {m.reason}"


def test_conv_chain_through_a_nonlinearity_is_not_a_chain():
    c = 4
    b = Builder(c)
    y = b.conv(b.relu(b.conv("x", c, c, 1)), c, c, 3)
    assert run(b.model(y))[2] == []


def test_two_3x3_convs_are_not_a_chain():
    c = 4
    b = Builder(c)
    y = b.conv(b.conv("x", c, c, 3), c, c, 3)
    assert only(misses.find(b.model(y)), misses.CHAIN) == []


def test_chain_with_a_shared_middle_is_single_use_without_a_report():
    c = 4
    b = Builder(c)
    c1 = b.conv("x", c, c, 1, bias=False)
    c2 = b.conv(c1, c, c, 3)
    r = b.relu(c1)
    model = b.model(c2, r)
    (m,) = only(misses.find(model), misses.CHAIN)
    assert m.condition == misses.SINGLE_USE and f"'{node_name(model, r)}'" in m.reason


# what folds lists nothing ----------------------------------------------------------------------


def repvgg_block(c=8):
    b = Builder(c, input_shape=["N", c, 8, 8])
    y = b.relu(b.sum([b.bn(b.conv("x", c, c, 3, bias=False), c), b.bn(b.conv("x", c, c, 1, bias=False), c), b.bn("x", c)]))
    return b.model(y)


def test_folded_repvgg_block_lists_nothing():
    model = repvgg_block()
    out, report, found = run(model)
    assert report.rewritten >= 1 and found == []
    assert misses.find(model) != []  # the training form has its sum and BNs standing


def test_find_leaves_the_model_as_it_was():
    model = repvgg_block()
    before = model.SerializeToString()
    misses.find(model)
    assert model.SerializeToString() == before


def test_report_dict_gives_the_same_misses():
    c = 4
    b = Builder(c)
    conv = b.conv(b.bn("x", c), c, c, 3)
    out, report = engine.run(b.model(conv))
    assert misses.find(out, report.to_dict()) == misses.find(out, report)


def test_summary_groups_by_condition_and_shows_the_first_few():
    c = 4
    b = Builder(c)
    outs = [b.add(b.relu("x"), b.node("Sigmoid", ["x"])) for _ in range(5)]
    found = run(b.model(*outs))[2]
    assert len(found) == 5
    text = misses.summary(found)
    assert text.splitlines()[0] == "not rewritten: 5"
    assert "... 2 more (-v or --json for all)" in text
    assert "more" not in misses.summary(found, details=True)
    assert misses.summary([]) == ""


# command line ----------------------------------------------------------------------------------


@pytest.fixture
def kept_path(tmp_path):
    c = 4
    b = Builder(c)
    y = b.add(b.conv("x", c, c, 3), b.conv(b.bn(b.relu("x"), c), c, c, 3))
    path = tmp_path / "kept.onnx"
    onnx.save(b.model(y), path)
    return path


def test_inspect_shows_the_section_and_json_lists_every_miss(kept_path):
    res = invoke("inspect", kept_path)
    assert res.exit_code == 0
    assert "not rewritten: 2" in res.stdout
    assert "branches read different tensors" in res.stdout and "no_padding" in res.stdout
    res = invoke("inspect", kept_path, "--json")
    data = json.loads(res.stdout)
    kinds = sorted((m["kind"], m["condition"]) for m in data["not_rewritten"])
    assert kinds[0] == ("affine", "no_padding") and kinds[1][0] == "sum"
    assert all(set(m) == {"kind", "candidate", "nodes", "condition", "reason", "pass"} for m in data["not_rewritten"])


def test_inspect_of_a_folded_model_has_nothing_standing(tmp_path):
    path = tmp_path / "repvgg.onnx"
    onnx.save(repvgg_block(), path)
    res = invoke("inspect", path)
    assert res.exit_code == 0 and "not rewritten: 0" in res.stdout
    assert json.loads(invoke("inspect", path, "--json").stdout)["not_rewritten"] == []


def test_optimize_report_lists_the_misses(kept_path, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    res = invoke("optimize", kept_path, "-o", out, "--report", report, "-q", "--no-verify")
    assert res.exit_code == 0
    data = json.loads(report.read_text())
    assert len(data["not_rewritten"]) == 2
    assert data["not_rewritten"] == json.loads(invoke("inspect", kept_path, "--json").stdout)["not_rewritten"]


@pytest.mark.parametrize("gate", ["silu", "gelu", "hardswish"])
def test_gated_activations_after_and_before_a_conv_are_not_listed(gate):
    """x * f(x) with f element-wise (SiLU, GELU, HardSwish) is an activation, not a scaling by a
    computed tensor: a conv net with them has nothing standing."""
    c = 4
    b = Builder(c)

    def act(x):
        if gate == "silu":
            return b.node("Mul", [x, b.node("Sigmoid", [x])])
        if gate == "gelu":
            erf = b.node("Erf", [b.node("Div", [x, b.const(np.array(1.4142135))])])
            return b.node("Mul", [b.node("Mul", [x, b.node("Add", [erf, b.const(np.array(1.0))])]), b.const(np.array(0.5))])
        clip = b.node("Clip", [b.node("Add", [x, b.const(np.array(3.0))]), b.const(np.array(0.0)), b.const(np.array(6.0))])
        return b.node("Div", [b.node("Mul", [x, clip]), b.const(np.array(6.0))])

    y = b.conv(act(b.conv("x", c, c, 3)), c, c, 3)
    found = [m for m in misses.find(b.model(y)) if m.condition == misses.NOT_CONSTANT]
    assert found == []


def test_squeeze_excitation_scale_is_listed_once_per_side():
    """SE: Conv -> x * Sigmoid(Conv(GAP(x))) -> Conv: the per-channel scale is computed; both the
    conv before it and the conv after it are listed as not_constant."""
    c = 4
    b = Builder(c)
    x = b.conv("x", c, c, 3)
    gap = b.node("GlobalAveragePool", [x])
    s = b.node("Sigmoid", [b.conv(b.relu(b.conv(gap, c, c, 1)), c, c, 1)])
    m = b.node("Mul", [x, s])
    y = b.conv(m, c, c, 1)
    model = b.model(y)
    got = sorted(x.key for x in misses.find(model) if x.condition == misses.NOT_CONSTANT)
    mul = node_name(model, m)
    assert got == sorted([f"{node_name(model, x)}->{mul}", f"{mul}->{node_name(model, y)}"])


def gelu_erf(b, x):
    """TorchScript's GELU: x * (Erf(x / sqrt 2) + 1) * 0.5."""
    erf = b.node("Erf", [b.node("Div", [x, b.const(np.array(1.4142135))])])
    return b.node("Mul", [b.node("Mul", [x, b.node("Add", [erf, b.const(np.array(1.0))])]), b.const(np.array(0.5))])


def test_affine_ops_inside_a_fused_gelu_are_runtime_fusion():
    """Linear -> GELU -> Linear: the GELU's Div (after fc1) and Mul(0.5) (before fc2) stay for
    the fused kernel; both say runtime_fusion, none says single_use."""
    c = 8
    b = Builder(c, input_shape=[2, 5, c])
    fc1 = b.node("MatMul", ["x", b.const(b.rng.standard_normal((c, c)))])
    act = gelu_erf(b, fc1)
    fc2 = b.node("MatMul", [act, b.const(b.rng.standard_normal((c, c)))])
    model = b.model(fc2)
    found = run(model)[2]
    assert sorted(m.condition for m in found) == ["runtime_fusion", "runtime_fusion"], found
    assert all("GELU" in m.reason for m in found)
    assert {m.nodes for m in found} == {
        (node_name(model, fc1), next(n.name for n in model.graph.node if n.op_type == "Div")),
        (node_name(model, act), node_name(model, fc2)),
    }


def test_layer_norm_decomposition_sum_is_runtime_fusion():
    """LayerNorm as TorchScript writes it: its Sub(x, ReduceMean(x)) is a sum of two computed terms
    that the runtime fuses with the rest into one kernel."""
    c = 8
    b = Builder(c, input_shape=[2, 5, c])
    d = b.node("Sub", ["x", b.node("ReduceMean", ["x"], axes=[-1])])
    var = b.node("ReduceMean", [b.node("Pow", [d, b.const(np.array(2.0))])], axes=[-1])
    y = b.node("Div", [d, b.node("Sqrt", [b.node("Add", [var, b.const(np.array(1e-5))])])])
    y = b.node("Add", [b.node("Mul", [y, b.const(np.ones(c))]), b.const(np.zeros(c))])
    fc = b.node("MatMul", [y, b.const(b.rng.standard_normal((c, c)))])
    found = run(b.model(fc), skip=["linear-affine"])[2]
    sums = only(found, misses.SUM)
    assert [m.condition for m in sums] == ["runtime_fusion"], found


def test_not_selected_names_the_pass_of_the_layer():
    """A BN after a Conv with affine-fold left out is not_selected, though linear-affine ran."""
    c = 4
    b = Builder(c)
    bn = b.bn(b.conv("x", c, c, 3), c)
    (m,) = run(b.model(bn), skip=["affine-fold", "parallel-merge"])[2]
    assert (m.condition, m.reason) == (misses.NOT_SELECTED, "affine-fold did not run")


@pytest.mark.parametrize("family", ["repvgg-a0", "mobileone-s0"])
def test_folded_networks_list_nothing(family):
    """Whole training-form networks that fold to their deploy form leave nothing standing."""
    from onnxrep import models

    model = models.BUILDERS[family](deploy=False, resolution=32, width_scale=0.25)
    out, report, found = run(model)
    assert report.rewritten > 0 and found == []
