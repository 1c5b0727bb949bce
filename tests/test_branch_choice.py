"""Branch decomposition by choice: for each sum, parallel-merge reads the branches on the tensor
that lets the most of them merge, trying every tensor along each branch's chain of affine
producers, and leaves the affine steps above that tensor in the graph.

The spellings: RepGhost (``X = Conv1x1(Y); DWConv(X) + BN(X)``, every ``ghost2`` block in timm)
and FastViT's TorchScript export (``X = Mul(g, 0.5)``, the last step of GELU; ``Conv(X) + BN(X)``).
A greedy decomposition files the BN branch under ``Y`` (or ``g``) and no group forms."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxrep
from graphs import Builder, count, histogram, run
from onnxrep import ops
from onnxrep.graph import GraphView, import_model
from onnxrep.passes import _sums, parallel_merge

PASS = "parallel-merge"
RTOL, ATOL = 1e-5, 1e-6


def assert_close(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict):
    """Equal outputs in onnxruntime: ``|a - b| <= ATOL * max|a| + RTOL * |a|`` elementwise."""
    for x, y in zip(run(a, feeds), run(b, feeds), strict=True):
        assert x.shape == y.shape
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        bound = ATOL * float(np.max(np.abs(x64))) + RTOL * np.abs(x64)
        worst = float(np.max(np.abs(x64 - y64) - bound))
        assert worst <= 0, f"error exceeds rtol {RTOL} / atol {ATOL} (of the largest value) by {worst}"


def optimize(model, feeds, passes=(PASS,), **kw):
    out, report = onnxrep.optimize(model, passes=list(passes), **kw)
    onnx.checker.check_model(out)
    assert_close(model, out, feeds)
    again, report2 = onnxrep.optimize(out, passes=list(passes), **kw)
    assert report2.rewritten == 0 and histogram(again) == histogram(out), "optimizing twice changed the model"
    return out, report


def skips(report):
    return [s["reason"] for p in report.to_dict()["passes"] if p["name"] == PASS for s in p["skips"]]


def op_count(model, op):
    return count(model, op)


def ort_optimized(model: onnx.ModelProto, tmp_path) -> onnx.ModelProto:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "ort.onnx"))


# --------------------------------------------------------------------------------------------
# RepGhost: Conv1x1 -> X; DWConv3x3(X) + BN(X); ReLU
# --------------------------------------------------------------------------------------------


def repghost(c=4, outputs_x=False, sub=False):
    b = Builder(c, (8, 8), seed=3)
    x = b.conv("x", c, c, kernel=1)  # the ghost block's primary 1x1 (BN already folded)
    dw = b.bn(b.conv(x, c, c, kernel=3, groups=c, bias=False), c)
    ident = b.bn(x, c)
    y = b.relu(b.sub(dw, ident) if sub else b.add(dw, ident))
    return b, (b.model(y, x) if outputs_x else b.model(y))


@pytest.mark.parametrize("sub", [False, True])
def test_repghost_merges_on_the_1x1_output(sub):
    b, model = repghost(sub=sub)
    out, report = optimize(model, b.feeds())
    assert report.rewritten == 1, skips(report)
    assert histogram(out) == {ops.CONV: 2, ops.RELU: 1}
    conv1x1, dw = [n for n in out.graph.node if n.op_type == ops.CONV]
    assert [a.ints for a in conv1x1.attribute if a.name == "kernel_shape"] == [[1, 1]]
    assert [a.i for a in dw.attribute if a.name == "group"] == [4]
    assert dw.input[0] == conv1x1.output[0]  # the 1x1 stays, the merged depthwise conv reads it


def test_repghost_with_x_read_elsewhere_merges_and_keeps_x():
    """X itself may be read elsewhere: it is the merge's input, not a tensor inside a branch."""
    b, model = repghost(outputs_x=True)
    out, report = optimize(model, b.feeds())
    assert report.rewritten == 1 and op_count(out, ops.BATCH_NORM) == 0


def test_repghost_full_pipeline():
    b, model = repghost()
    out, _ = optimize(model, b.feeds(), passes=())  # every pass
    assert op_count(out, ops.BATCH_NORM) == 0 and op_count(out, ops.CONV) == 2


# --------------------------------------------------------------------------------------------
# FastViT (TorchScript): GELU's tail Mul(g, 0.5) -> X; Conv(X) + BN(X)
# --------------------------------------------------------------------------------------------


def gelu_then_branches(c=4, x_elsewhere=False):
    """TorchScript's GELU ``Div(h, sqrt2) -> Erf -> Add(1) -> Mul(h) -> Mul(0.5)``, then
    ``Conv3x3(X) + BN(X)`` (FastViT's RepMixer / RepCPE spelling after a GELU)."""
    b = Builder(c, (8, 8), seed=5)
    h = b.conv("x", c, c, kernel=1)
    e = b.node("Erf", [b.node("Div", [h, b.const(np.sqrt(2.0))])])
    g = b.node("Mul", [b.node("Add", [e, b.const(1.0)]), h])
    x = b.node("Mul", [g, b.const(0.5)])
    y = b.add(b.conv(x, c, c, kernel=3, groups=c), b.bn(x, c))
    if x_elsewhere:
        return b, b.model(y, g)
    return b, b.model(y)


def test_fastvit_gelu_tail_merges_with_the_mul_kept(tmp_path):
    b, model = gelu_then_branches()
    out, report = optimize(model, b.feeds())
    assert report.rewritten == 1, skips(report)
    hist = histogram(out)
    assert op_count(out, ops.BATCH_NORM) == 0 and hist[ops.CONV] == 2 and hist[ops.ADD] == 1  # the GELU's Add(1)
    assert hist[ops.MUL] == 2  # Mul(h) and the Mul(0.5) both stay
    fused = ort_optimized(out, tmp_path)
    assert sum(1 for n in fused.graph.node if n.op_type == "Gelu") == 1  # onnxruntime still fuses its GELU


def test_fastvit_gelu_tail_full_pipeline(tmp_path):
    b, model = gelu_then_branches()
    out, _ = optimize(model, b.feeds(), passes=())
    assert op_count(out, ops.BATCH_NORM) == 0 and op_count(out, ops.CONV) == 2
    assert sum(1 for n in ort_optimized(out, tmp_path).graph.node if n.op_type == "Gelu") == 1


def test_gelu_inner_tensor_read_elsewhere():
    """g (GELU's product before the 0.5) is also a graph output: still merges on X."""
    b, model = gelu_then_branches(x_elsewhere=True)
    out, report = optimize(model, b.feeds())
    assert report.rewritten == 1 and op_count(out, ops.BATCH_NORM) == 0


# --------------------------------------------------------------------------------------------
# negatives
# --------------------------------------------------------------------------------------------


def test_branch_tensor_read_elsewhere_declines_single_use():
    """X = Conv1x1(Y); DWConv(X) + BN(X) where the DWConv's output is also a graph output: the
    DWConv branch cannot be absorbed; the group stays declined with the reason."""
    c = 4
    b = Builder(c, (8, 8), seed=7)
    x = b.conv("x", c, c, kernel=1)
    dwc = b.conv(x, c, c, kernel=3, groups=c)
    y = b.add(dwc, b.bn(x, c))
    model = b.model(y, dwc)
    out, report = optimize(model, b.feeds())
    assert report.rewritten == 0
    reasons = skips(report)
    assert reasons and all(r.startswith("single_use:") for r in reasons), reasons
    assert op_count(out, ops.BATCH_NORM) == 1


def test_affine_output_read_elsewhere_stops_the_chain():
    """X = BN1(Y); Conv(Y) + BN2(X) with X also read by another node: the BN2 branch can not be
    read on Y (X would be inside the merge), so the branches read different tensors."""
    c = 4
    b = Builder(c, (8, 8), seed=8)
    y0 = b.relu("x")
    x = b.bn(y0, c)
    s = b.add(b.conv(y0, c, c, kernel=3), b.conv(x, c, c, kernel=1))
    t = b.add(s, b.bn(x, c))
    model = b.model(t, x)
    out, report = optimize(model, b.feeds())
    # conv(x) + BN(x) merge on x; conv(y0) stays a term of its own
    assert report.rewritten == 1 and op_count(out, ops.BATCH_NORM) == 1  # BN1 (a graph output) stays


@pytest.mark.parametrize("report", [True, False])
def test_branches_of_different_tensors_are_reported(report, monkeypatch):
    """With ``REPORT_SPLIT`` a sum of two Conv branches of different tensors is a candidate that
    ``same_input`` declines, naming the tensors; without it, no candidate."""
    monkeypatch.setattr(parallel_merge, "REPORT_SPLIT", report)
    c = 4
    b = Builder(c, (8, 8), seed=9)
    p, q = b.relu("x"), b.node("Sigmoid", ["x"])
    y = b.add(b.conv(p, c, c, kernel=3), b.conv(q, c, c, kernel=1))
    model = b.model(y)
    out, rep = optimize(model, b.feeds())
    assert rep.rewritten == 0
    if not report:
        assert skips(rep) == []
        return
    (reason,) = skips(rep)
    assert reason.startswith("same_input: branches read different tensors: ") and f"'{p}'" in reason and f"'{q}'" in reason


def test_a_single_conv_branch_is_not_reported(monkeypatch):
    """x + Conv(Relu(x)) (a residual) is no merge candidate and no decline."""
    monkeypatch.setattr(parallel_merge, "REPORT_SPLIT", True)
    c = 4
    b = Builder(c, (8, 8), seed=10)
    y = b.add("x", b.conv(b.relu("x"), c, c, kernel=3))
    _, report = optimize(b.model(y), b.feeds())
    assert report.rewritten == 0 and skips(report) == []


# --------------------------------------------------------------------------------------------
# the choice between tensors
# --------------------------------------------------------------------------------------------


def test_three_branches_only_the_deeper_choice_merges_two():
    """X = Conv1x1(Y) read only by BN_a; branches: Conv3x3(Y), BN_a(X), Relu-fed BN_b(Z). Reading
    BN_a's branch on X (shallow) groups nothing; on Y (through the 1x1, deeper) it joins
    Conv3x3(Y); BN_b's branch reads a tensor of its own and stays a term."""
    c = 4
    b = Builder(c, (8, 8), seed=11)
    yt = b.relu("x")
    x = b.conv(yt, c, c, kernel=1)
    z = b.node("Sigmoid", ["x"])
    s = b.sum([b.conv(yt, c, c, kernel=3), b.bn(x, c), b.bn(z, c)])
    model = b.model(s)
    out, report = optimize(model, b.feeds())
    assert report.rewritten == 1, skips(report)
    assert op_count(out, ops.CONV) == 1 and op_count(out, ops.BATCH_NORM) == 1
    (merged,) = [n for n in out.graph.node if n.op_type == ops.CONV]
    assert merged.input[0] == yt


def test_the_most_branches_win():
    """X = Mul(Y, s) read by Conv_a and BN; Conv_b reads Y. On Y: Conv_b and (through the Mul)
    nothing else, since X is read by Conv_a; on X: Conv_a and BN: X is chosen, Conv_b stays."""
    c = 4
    b = Builder(c, (8, 8), seed=12)
    yt = b.relu("x")
    x = b.mul_const(yt, b.rng.uniform(0.5, 1.5, (1, c, 1, 1)))
    s = b.sum([b.conv(x, c, c, kernel=3), b.bn(x, c), b.conv(yt, c, c, kernel=1)])
    model = b.model(s)
    out, report = optimize(model, b.feeds())
    assert report.rewritten == 1
    assert op_count(out, ops.CONV) == 2 and op_count(out, ops.BATCH_NORM) == 0 and op_count(out, ops.MUL) == 1


def test_conv_plus_its_own_bn_still_merges_deep():
    """X = Conv(Y); X + BN(X): both branches read Y through the conv (X is read only inside)."""
    c = 4
    b = Builder(c, (8, 8), seed=13)
    x = b.conv(b.relu("x"), c, c, kernel=3)
    model = b.model(b.add(x, b.bn(x, c)))
    out, report = optimize(model, b.feeds())
    assert report.rewritten == 1 and histogram(out) == {ops.RELU: 1, ops.CONV: 1}


def test_leaf_options_walk_the_affine_chain():
    c = 4
    b = Builder(c, (8, 8), seed=14)
    y = b.relu("x")
    x = b.conv(y, c, c, kernel=1)
    top = b.bn(b.mul_const(x, 2.0), c)
    model = b.model(b.add(top, b.conv(y, c, c, kernel=3)))
    view = GraphView(import_model(model))
    tensor = next(t for n in view.graph.nodes for t in n.outputs if t.name == top)
    leaf = parallel_merge.decompose_leaf(tensor, 1.0, view)

    def identity(t, s):
        return parallel_merge.Leaf(t, s, t, parallel_merge.IDENTITY, None, [])

    opts = _sums.leaf_options(leaf, identity, view)
    assert [o.x.name for o in opts] == [top, opts[1].x.name, x, y]
    assert [len(o.affines) for o in opts] == [0, 1, 2, 2]
    assert [o.kind for o in opts] == [parallel_merge.IDENTITY] * 3 + [parallel_merge.CONV]


# --------------------------------------------------------------------------------------------
# real exports (timm, TorchScript)
# --------------------------------------------------------------------------------------------


def _zoo():
    try:
        import zoo_models
    except ImportError:
        pytest.skip("tests/zoo_models.py is not available")
    try:
        zoo_models.import_timm()
    except Exception as exc:  # noqa: BLE001 - timm (or torchvision) missing or broken
        pytest.skip(f"timm is not importable: {exc}")
    return zoo_models


@pytest.mark.parametrize("name", ["repghostnet_050", "fastvit_t8"])
def test_timm_torchscript_reaches_the_deploy_bn_count(name, tmp_path):
    z = _zoo()
    model = z.build(name)
    deploy = z.deploy_form(model)
    x = z.example_input(name)
    train = onnx.load(str(z.export(model, x, tmp_path / "train.onnx", z.TORCHSCRIPT)))
    dep = onnx.load(str(z.export(deploy, x, tmp_path / "deploy.onnx", z.TORCHSCRIPT)))
    out, _ = onnxrep.optimize(train)
    assert op_count(out, ops.BATCH_NORM) == op_count(dep, ops.BATCH_NORM), z.left_over(out, dep)
    assert z.reaches_deploy(out, dep), z.left_over(out, dep)
    a, o = z.run_ort(train, x), z.run_ort(out, x)
    assert float(np.max(np.abs(a - o))) <= z.RTOL * float(np.max(np.abs(a)))
