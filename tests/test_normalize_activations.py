"""normalize-activations: GELU / HardSwish / HardSigmoid decompositions that onnxruntime does not
fuse become the standard op (or onnxruntime's fused spelling below its opset); equivalence in
onnxruntime, onnxruntime's own optimized graph of the result, each condition's decline."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper

from graphs import Builder, histogram
from test_parallel_merge import assert_equivalent

import onnxrep
from onnxrep import kernels
from onnxrep.graph import GraphView, import_model
from onnxrep.passes import REGISTRY, normalize_activations as na
from onnxrep.rewrite import Context, Options

PASS = "normalize-activations"
SQRT2 = math.sqrt(2.0)
K = math.sqrt(2.0 / math.pi)
C, H, W = 4, 5, 6
#: equivalence: float32 rounding of a handful of element-wise steps, relative to the output's
#: largest magnitude
RTOL = 2e-6


def pair(b: Builder, op: str, data: str, const: str, swap: bool) -> str:
    return b.node(op, [const, data] if swap else [data, const])


def scalar(b: Builder, value: float, shape=()) -> str:
    return b.const(np.full(shape, value))


def around(b: Builder, act) -> onnx.ModelProto:
    """Conv -> act -> Conv (the activation between two layers, as in a network)."""
    t = b.conv("x", C, 8, 3)
    return b.model(b.conv(act(b, t), 8, C, 1))


def gelu_erf(form: str, swaps=(False,) * 4, sqrt2=SQRT2, half=0.5, const_shape=()):
    """``form``: "mul-2" Mul by 1/sqrt2 then (x * a) * 0.5; "div-3" x * (a * 0.5); "div-4"
    x * (0.5 * erf + 0.5); "div-2" TorchScript's (onnxruntime fuses it); "div-1" (x * 0.5) * a."""

    def act(b, x):
        s = iter(swaps)
        pre, group = form.split("-")
        d = pair(b, "Mul", x, scalar(b, 1 / sqrt2, const_shape), next(s)) if pre == "mul" else b.node("Div", [x, scalar(b, sqrt2, const_shape)])
        e = b.node("Erf", [d])
        if group == "4":
            h = pair(b, "Mul", e, scalar(b, half, const_shape), next(s))
            return pair(b, "Mul", pair(b, "Add", h, scalar(b, 0.5, const_shape), next(s)), x, next(s))
        a = pair(b, "Add", e, scalar(b, 1.0, const_shape), next(s))
        if group == "1":
            return pair(b, "Mul", pair(b, "Mul", x, scalar(b, half, const_shape), next(s)), a, next(s))
        if group == "2":
            return pair(b, "Mul", pair(b, "Mul", a, x, next(s)), scalar(b, half, const_shape), next(s))
        return pair(b, "Mul", pair(b, "Mul", a, scalar(b, half, const_shape), next(s)), x, next(s))

    return act


def gelu_tanh(cube="mul", swaps=(False,) * 4, k=K):
    """TorchScript's tanh GELU: 0.5 applied last; ``cube`` "mul" x*x*x, "pow" Pow(x, 3)."""

    def act(b, x):
        s = iter(swaps)
        c3 = b.node("Pow", [x, scalar(b, 3.0)]) if cube == "pow" else b.node("Mul", [x, b.node("Mul", [x, x])])
        inner = pair(b, "Add", x, pair(b, "Mul", c3, scalar(b, 0.044715), next(s)), next(s))
        t = b.node("Tanh", [pair(b, "Mul", inner, scalar(b, k), next(s))])
        a = pair(b, "Add", t, scalar(b, 1.0), next(s))
        return b.node("Mul", [b.node("Mul", [x, a]), scalar(b, 0.5)])

    return act


def clamp(b, t, kind, swap):
    a = pair(b, "Add", t, scalar(b, 3.0), swap)
    if kind == "clip":
        return b.node("Clip", [a, scalar(b, 0.0), scalar(b, 6.0)])
    low = b.relu(a) if kind == "relu" else pair(b, "Max", a, scalar(b, 0.0), swap)
    return pair(b, "Min", low, scalar(b, 6.0), swap)


def sixth(b, t, by, swap):
    return b.node("Div", [t, scalar(b, 6.0)]) if by == "div" else pair(b, "Mul", t, scalar(b, 1 / 6), swap)


def hard_swish(kind="clip", by="div", grouping="after", swap=False):
    def act(b, x):
        c = clamp(b, x, kind, swap)
        if grouping == "after":  # (x * clamp) / 6, TorchScript's x * relu6(x + 3) / 6
            return sixth(b, pair(b, "Mul", c, x, swap), by, swap)
        return pair(b, "Mul", sixth(b, c, by, swap), x, swap)  # x * (clamp / 6)

    return act


def hard_sigmoid(kind="clip", by="div", swap=False):
    return lambda b, x: sixth(b, clamp(b, x, kind, swap), by, swap)


def ort_ops(model) -> dict[str, int]:
    k = kernels.count_kernels(model)
    assert k.taken, k.reason
    return k.ops


def run_pass(model, b, **kw):
    out, report = onnxrep.optimize(model, passes=[PASS], **kw)
    onnx.checker.check_model(out)
    assert_equivalent(model, out, b.feeds(), rtol=RTOL)
    assert_equivalent(model, out, {"x": b.feeds()["x"] * 10}, rtol=RTOL)
    return out, report


def skips(report):
    return list(next(p for p in report.passes if p.name == PASS).skipped.values())


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------


def test_registered_before_the_folds():
    order = list(REGISTRY)
    assert order.index(PASS) < order.index("parallel-merge") < order.index("affine-fold")
    assert order.index("constant-fold") < order.index(PASS)


# --------------------------------------------------------------------------------------------
# GELU
# --------------------------------------------------------------------------------------------

UNFUSED_ERF = ["mul-1", "mul-2", "mul-3", "div-3", "div-4", "mul-4"]


@pytest.mark.parametrize("swaps", [(False,) * 4, (True,) * 4, (True, False, True, False)])
@pytest.mark.parametrize("form", UNFUSED_ERF)
def test_gelu_erf_to_gelu_op_at_opset_20(form, swaps, tmp_path):
    b = Builder(C, (H, W), opset=20)
    model = around(b, gelu_erf(form, swaps))
    assert "Gelu" not in ort_ops(model)  # onnxruntime runs it as several kernels
    out, report = run_pass(model, b)
    assert histogram(out) == {"Conv": 2, "Gelu": 1} and report.rewritten == 1
    gelu = next(n for n in out.graph.node if n.op_type == "Gelu")
    assert gelu.domain == "" and not gelu.attribute  # approximate="none", the default
    assert ort_ops(out)["Gelu"] == 1
    assert kernels.count_kernels(out).count < kernels.count_kernels(model).count


@pytest.mark.parametrize("form", UNFUSED_ERF)
def test_gelu_erf_below_opset_20_to_onnxruntimes_spelling(form):
    b = Builder(C, (H, W), opset=17)
    model = around(b, gelu_erf(form))
    out, report = run_pass(model, b)
    assert report.rewritten == 1
    assert histogram(out) == {"Conv": 2, "Div": 1, "Erf": 1, "Add": 1, "Mul": 2}
    assert ort_ops(out)["com.microsoft:Gelu"] == 1 and "com.microsoft:Gelu" not in ort_ops(model)


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("form", ["div-1", "div-2"])
def test_gelu_erf_onnxruntime_fuses_is_left(form, opset):
    b = Builder(C, (H, W), opset=opset)
    model = around(b, gelu_erf(form))
    out, report = onnxrep.optimize(model, passes=[PASS])
    assert histogram(out) == histogram(model) and report.rewritten == 0
    (reason,) = skips(report)
    assert reason == "fused_already: onnxruntime already fuses this GELU (erf) spelling into one Gelu kernel"


@pytest.mark.parametrize("cube", ["mul", "pow"])
@pytest.mark.parametrize("swaps", [(False,) * 4, (True,) * 4])
def test_gelu_tanh_torchscript_spelling(cube, swaps):
    b = Builder(C, (H, W), opset=17)
    model = around(b, gelu_tanh(cube, swaps))
    assert "com.microsoft:FastGelu" not in ort_ops(model)
    out, report = run_pass(model, b)
    assert report.rewritten == 1 and ort_ops(out)["com.microsoft:FastGelu"] == 1
    assert histogram(out) == {"Conv": 2, "Mul": 6, "Add": 2, "Tanh": 1}
    # the spelling reads the constants the input had: no weights added
    assert out.graph.initializer.__len__() <= model.graph.initializer.__len__()

    b = Builder(C, (H, W), opset=20)
    model = around(b, gelu_tanh(cube, swaps))
    out, report = run_pass(model, b)
    assert histogram(out) == {"Conv": 2, "Gelu": 1}
    (gelu,) = [n for n in out.graph.node if n.op_type == "Gelu"]
    assert helper.get_attribute_value(gelu.attribute[0]) == b"tanh"


# --------------------------------------------------------------------------------------------
# HardSwish, HardSigmoid
# --------------------------------------------------------------------------------------------

HARD = [(k, by) for k in ("clip", "relu", "max") for by in ("div", "mul")]


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("grouping", ["after", "before"])
@pytest.mark.parametrize("kind,by", HARD)
def test_hard_swish(kind, by, grouping, swap):
    b = Builder(C, (H, W), opset=14)
    model = around(b, hard_swish(kind, by, grouping, swap))
    out, report = run_pass(model, b)
    assert histogram(out) == {"Conv": 2, "HardSwish": 1} and report.rewritten == 1
    assert kernels.count_kernels(out).count < kernels.count_kernels(model).count


def test_hard_swish_below_opset_14():
    b = Builder(C, (H, W), opset=13)
    model = around(b, hard_swish())
    out, _ = run_pass(model, b)
    assert histogram(out) == {"Conv": 2, "HardSigmoid": 1, "Mul": 1}
    hs = next(n for n in out.graph.node if n.op_type == "HardSigmoid")
    attrs = {a.name: helper.get_attribute_value(a) for a in hs.attribute}
    assert attrs == {"alpha": pytest.approx(1 / 6, rel=1e-7), "beta": 0.5}


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("kind,by", HARD)
def test_hard_sigmoid(kind, by, swap):
    b = Builder(C, (H, W), opset=17)
    model = around(b, hard_sigmoid(kind, by, swap))
    out, _ = run_pass(model, b)
    assert histogram(out) == {"Conv": 2, "HardSigmoid": 1}


# --------------------------------------------------------------------------------------------
# conditions, one negative each
# --------------------------------------------------------------------------------------------


def declined(model, condition):
    out, report = onnxrep.optimize(model, passes=[PASS])
    assert histogram(out) == histogram(model) and report.rewritten == 0
    reasons = skips(report)
    assert reasons and all(r.startswith(condition + ": ") for r in reasons), reasons
    return reasons[0]


def test_dtype():
    b = Builder(C, (H, W), dtype=np.float64, opset=20)
    reason = declined(around(b, gelu_erf("mul-2")), "dtype")
    assert reason.endswith("is float64, not float32")


@pytest.mark.parametrize(
    "act,needle",
    [
        (gelu_erf("mul-2", sqrt2=1.5), "not 0.7071067811865475 within its float rounding"),
        (gelu_erf("div-3", sqrt2=1.41421), "not 1.4142135623730951 within its float rounding"),
        (gelu_erf("mul-2", half=0.5000001), "not 0.5 within its float rounding"),
        (gelu_tanh(k=0.79788), "not 0.7978845608028654 within its float rounding"),
    ],
    ids=["sqrt2", "sqrt2-5-digits", "half", "tanh-k"],
)
def test_constants(act, needle):
    b = Builder(C, (H, W), opset=20)
    model = around(b, act)
    assert needle in declined(model, "constants")


def test_constants_rank():
    b = Builder(input_shape=[2, 8], opset=20)
    model = b.model(gelu_erf("mul-2", const_shape=(1, 1, 1))(b, "x"))  # [2, 8] -> [1, 2, 8]
    assert "has rank 3, which may broadcast 'x' (rank 2) to a larger shape" in declined(model, "constants")


def test_constants_one_ulp_is_exact():
    assert na.exact(np.float32(math.sqrt(2.0)), SQRT2)
    assert na.exact(np.nextafter(np.float32(0.5), np.float32(1)), 0.5)
    assert not na.exact(np.nextafter(np.nextafter(np.float32(0.5), np.float32(1)), np.float32(1)), 0.5)
    assert not na.exact(np.int64(6), 6.0)


def test_per_channel_constant_of_rank_4_is_one_element_only():
    b = Builder(C, (H, W), opset=20)
    model = around(b, gelu_erf("mul-2", const_shape=(1, 1, 1, 1)))  # one element, rank 4 = x's
    out, _ = run_pass(model, b)
    assert histogram(out) == {"Conv": 2, "Gelu": 1}


def test_single_use():
    b = Builder(C, (H, W), opset=20)
    t = b.conv("x", C, 8, 3)
    y = gelu_erf("mul-2")(b, t)
    erf = next(n.output[0] for n in b.nodes if n.op_type == "Erf")
    model = b.model(b.conv(b.node("Add", [y, erf]), 8, C, 1))
    assert "is read by 2 nodes" in declined(model, "single_use")


def test_graph_output():
    b = Builder(C, (H, W), opset=20)
    t = b.conv("x", C, 8, 3)
    y = gelu_erf("mul-2")(b, t)
    erf = next(n.output[0] for n in b.nodes if n.op_type == "Erf")
    model = b.model(b.conv(y, 8, C, 1), erf)
    assert declined(model, "graph_output").endswith("is a graph output")


def test_opset_condition():
    b = Builder(C, (H, W))
    model = around(b, hard_sigmoid())
    view = GraphView(import_model(model))
    add = next(n for n in view.graph.nodes if n.op == "Add")
    s = na._hard(view, add)
    old = Context(Options(), opsets=[helper.make_opsetid("", 5)])
    assert na._check_opset(s, view, old) == "the model's default opset 5 has no HardSigmoid (opset 6)"
    assert na._check_opset(s, view, Context(Options(), opsets=[helper.make_opsetid("", 6)])) is None
    assert ("opset", na._check_opset) in na.CONDITIONS


def test_a_plain_relu6_is_no_hard_sigmoid():
    b = Builder(C, (H, W))
    model = around(b, lambda b, x: b.node("Clip", [x, scalar(b, 0.0), scalar(b, 6.0)]))
    _, report = onnxrep.optimize(model, passes=[PASS])
    assert report.rewritten == 0 and skips(report) == []


# --------------------------------------------------------------------------------------------
# the whole pipeline: the spelling onnxruntime fuses survives the folds
# --------------------------------------------------------------------------------------------


def test_pipeline_keeps_torchscript_tanh_gelu_fused():
    """TorchScript's tanh GELU between two Convs: without the pass affine-fold folds its trailing
    Mul(0.5) into the next Conv (no runtime fuses that spelling, so nothing protects it); with it,
    the GELU becomes onnxruntime's FastGelu spelling, which the folds keep."""
    b = Builder(C, (H, W), opset=17)
    model = around(b, gelu_tanh())
    out, report = onnxrep.optimize(model)
    assert ort_ops(out)["com.microsoft:FastGelu"] == 1
    assert report.kernels_after < report.kernels_before and report.kernel_check == "ok"
    assert_equivalent(model, out, b.feeds(), rtol=RTOL)
    without, _ = onnxrep.optimize(model, skip=[PASS])
    assert "com.microsoft:FastGelu" not in ort_ops(without)
    assert kernels.count_kernels(out).count < kernels.count_kernels(without).count


# --------------------------------------------------------------------------------------------
# real exports
# --------------------------------------------------------------------------------------------


def _hswish_module(kind):
    torch = pytest.importorskip("torch")
    from torch import nn
    from torch.nn import functional as F

    class Act(nn.Module):
        def forward(self, x):
            if kind == "hardswish":
                return x * F.relu6(x + 3) / 6
            if kind == "hardsigmoid":
                return F.relu6(x + 3) / 6
            return F.gelu(x, approximate="tanh")

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), Act(), nn.Conv2d(8, 4, 1)).eval()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("kind", ["hardswish", "hardsigmoid", "gelu-tanh"])
def test_exports(kind, exporter, tmp_path):
    te = pytest.importorskip("torch_export")
    module, shape = _hswish_module(kind), (1, 4, 8, 8)
    path = tmp_path / "m.onnx"
    exported = te.export(module, te.random_inputs(shape, 0), path, exporter)
    out, report = onnxrep.optimize(path, verify=True)
    te.assert_matches_torch(out, module, shape)
    assert report.kernel_check in ("ok", "not made: nothing was rewritten")
    done = next(p for p in report.passes if p.name == PASS).rewritten
    fused = ort_ops(out)
    if kind == "gelu-tanh" and exporter == "dynamo":
        assert done == 0 and histogram(exported)["Gelu"] == 1  # dynamo writes the Gelu op itself
        return
    assert done == 1
    assert report.kernels_after < report.kernels_before
    if kind == "gelu-tanh":  # TorchScript, opset 17
        assert fused["com.microsoft:FastGelu"] == 1
    else:
        assert histogram(out).get({"hardswish": "HardSwish", "hardsigmoid": "HardSigmoid"}[kind]) == 1


def test_onnxruntimes_own_spelling_is_not_rewritten_into_itself(monkeypatch):
    """Below opset 20 the pass writes onnxruntime's pattern 1 of the erf GELU; found in the graph it
    is left as it is even where the catalogue would not say onnxruntime fuses it."""
    monkeypatch.setattr(na, "fusion_members", lambda view: {})
    b = Builder(C, (H, W), opset=17)
    reason = declined(around(b, gelu_erf("div-1")), "fused_already")
    assert reason == "fused_already: this GELU (erf) spelling is already the one onnxruntime fuses"
    b = Builder(C, (H, W), opset=20)  # at opset 20 it becomes the Gelu op
    out, _ = run_pass(around(b, gelu_erf("div-1")), b)
    assert histogram(out) == {"Conv": 2, "Gelu": 1}


@pytest.mark.parametrize("opset", [17, 20])
def test_torchscript_gelu_after_a_mul(opset):
    """TorchScript's erf GELU whose input is computed by a Mul (FastViT's GELU after its SE gate):
    onnxruntime takes that Mul for its pattern 1's Mul(x, 0.5), fails and gives up; the pass
    writes pattern 1 (or the Gelu op), which it fuses."""
    b = Builder(C, (H, W), opset=opset)
    t = b.node("Mul", [b.conv("x", C, 8, 3), b.node("Sigmoid", [b.conv("x", C, 8, 1)])])
    model = b.model(b.conv(gelu_erf("div-2")(b, t), 8, C, 1))
    assert "com.microsoft:Gelu" not in ort_ops(model) and "Gelu" not in ort_ops(model)
    out, report = run_pass(model, b)
    assert report.rewritten == 1
    fused = ort_ops(out)
    assert fused.get("Gelu" if opset == 20 else "com.microsoft:Gelu") == 1
    assert kernels.count_kernels(out).count < kernels.count_kernels(model).count


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_dynamo_opset_18_gelu(approximate, tmp_path):
    """torch's dynamo exporter below opset 20 spells GELU as ``x * (0.5 * (1 + erf(x / sqrt2)))``
    (tanh: ``x * (0.5 * (1 + tanh(k * (x + c * Pow(x, 3)))))``), which onnxruntime does not fuse:
    the pass writes onnxruntime's spelling, and its optimized graph has a Gelu / FastGelu where the
    export's had none."""
    torch = pytest.importorskip("torch")
    te = pytest.importorskip("torch_export")
    from torch import nn

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GELU(approximate=approximate), nn.Conv2d(8, 4, 1)).eval()
    shape = (1, 4, 8, 8)
    path = tmp_path / "m.onnx"
    with te.quiet():
        torch.onnx.export(module, te.random_inputs(shape, 0), str(path), dynamo=True, opset_version=18,
                          input_names=["x"], output_names=["y"])
    exported = onnx.load(str(path))
    assert exported.opset_import[0].version == 18 and "Gelu" not in histogram(exported)
    fused = "com.microsoft:Gelu" if approximate == "none" else "com.microsoft:FastGelu"
    assert fused not in ort_ops(exported)
    out, report = onnxrep.optimize(path, verify=True)
    te.assert_matches_torch(out, module, shape)
    assert next(p for p in report.passes if p.name == PASS).rewritten == 1
    assert ort_ops(out)[fused] == 1
    assert report.kernels_after < report.kernels_before and report.kernel_check == "ok"
