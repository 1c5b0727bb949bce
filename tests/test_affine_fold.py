"""The affine-fold pass: per-channel affine nodes before or after a Conv."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from graphs import Builder, examples, histogram
from test_parallel_merge import assert_equivalent

import onnxrep

PASS = "affine-fold"


def optimize(model, feeds, **kw):
    out, report = onnxrep.optimize(model, passes=[PASS], **kw)
    onnx.checker.check_model(out)
    assert_equivalent(model, out, feeds)
    return out, report


def declined(model, feeds, condition):
    out, report = optimize(model, feeds)
    assert report.rewritten == 0 and histogram(out) == histogram(model)
    reasons = list(report.passes[0].skipped.values())
    assert reasons and all(r.startswith(condition + ":") for r in reasons), reasons


def affine(b, kind, t, c):
    rng = np.random.default_rng(7)
    if kind == "bn":
        return b.bn(t, c)
    if kind == "mul":
        return b.mul_const(t, rng.uniform(0.5, 1.5, (c, 1, 1)))
    if kind == "scalar":
        return b.mul_const(t, np.float32(-0.7))
    if kind == "div":
        return b.node("Div", [t, b.const(rng.uniform(0.5, 1.5, (1, c, 1, 1)))])
    if kind == "add":
        return b.node("Add", [b.const(rng.standard_normal((c, 1, 1))), t])
    if kind == "sub":
        return b.node("Sub", [t, b.const(rng.standard_normal(c).reshape(c, 1, 1))])
    if kind == "rsub":
        return b.node("Sub", [b.const(np.float32(0.3)), t])
    raise ValueError(kind)


KINDS = ["bn", "mul", "scalar", "div", "add", "sub", "rsub"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kernel,stride,groups,dilation", [(3, 1, 1, 1), (3, 2, 2, 1), (1, 1, 4, 1), (5, 1, 1, 2), (2, 2, 1, 1)])
def test_affine_after_conv(kind, kernel, stride, groups, dilation):
    c = 8
    b = Builder(c, spatial=(9, 8))
    y = affine(b, kind, b.conv("x", c, c, kernel, stride, groups=groups, dilation=dilation, bias=kind != "bn"), c)
    out, report = optimize(b.model(b.relu(y)), b.feeds())
    assert histogram(out) == {"Conv": 1, "Relu": 1} and report.rewritten == 1


@pytest.mark.parametrize("kind", ["mul", "scalar", "div"])
@pytest.mark.parametrize("kernel,groups", [(3, 1), (3, 4), (1, 2)])
def test_scale_before_padded_conv(kind, kernel, groups):
    c = 8
    b = Builder(c, spatial=(7, 7))
    y = b.conv(affine(b, kind, b.relu("x"), c), c, 4 * groups, kernel, groups=groups)
    out, _ = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Relu": 1, "Conv": 1}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kernel,groups,stride", [(1, 1, 1), (3, 2, 1), (3, 1, 2)])
def test_affine_before_conv_without_padding(kind, kernel, groups, stride):
    c = 8
    b = Builder(c, spatial=(9, 9))
    y = b.conv(affine(b, kind, b.relu("x"), c), c, 8, kernel, stride, pads=[0, 0, 0, 0], groups=groups)
    out, _ = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Relu": 1, "Conv": 1}


def test_yolov7_implicit_add_and_mul():
    c = 8
    b = Builder(c, spatial=(6, 6))
    a = b.node("Add", [b.relu("x"), b.const(np.random.default_rng(1).standard_normal((1, c, 1, 1)))])
    y = b.mul_const(b.conv(a, c, 16, 1, pads=[0, 0, 0, 0]), np.random.default_rng(2).standard_normal((1, 16, 1, 1)))
    out, report = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Relu": 1, "Conv": 1} and report.rewritten == 2


def test_chain_of_affines_reaches_a_fixed_point():
    c = 4
    b = Builder(c)
    y = b.mul_const(b.bn(b.conv("x", c, c, 3), c), np.float32(2.0))
    out, report = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Conv": 1} and report.rewritten == 2


# negative cases ------------------------------------------------------------------------------


def test_training_mode_bn_is_declined():
    c = 4
    b = Builder(c, opset=15)
    model = b.model(b.bn(b.conv("x", c, c, 3), c, training_mode=1), output_shapes=[[1, c, 8, 8]])
    out, report = onnxrep.optimize(model, passes=[PASS])  # (onnxruntime cannot run this graph)
    assert report.rewritten == 0 and histogram(out) == histogram(model)
    assert list(report.passes[0].skipped.values())[0].startswith("inference_bn:")


def test_non_constant_weight_is_declined():
    c = 4
    b = Builder(c)
    b.inputs.append(helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [c, c, 3, 3]))
    y = b.bn(b.node("Conv", ["x", "w"], pads=[1, 1, 1, 1]), c)
    declined(b.model(y), b.feeds() | {"w": np.ones((c, c, 3, 3), np.float32)}, "constant_weights")


def test_dynamic_same_padding_is_declined():
    c = 4
    b = Builder(c, input_shape=[1, c, "H", "W"])
    declined(b.model(b.bn(b.conv("x", c, c, 3, auto_pad="SAME_UPPER"), c)), b.feeds(shape=[1, c, 5, 5]), "static_geometry")


def test_spatial_constant_is_declined():
    c = 4
    b = Builder(c, spatial=(5, 5))
    y = b.mul_const(b.conv("x", c, c, 3), np.random.default_rng(0).standard_normal((1, c, 5, 5)))
    declined(b.model(y), b.feeds(), "per_channel")


def test_channel_broadcast_before_conv_is_declined():
    c = 4
    b = Builder(1, spatial=(5, 5))
    wide = b.mul_const(b.relu("x"), np.arange(1, c + 1, dtype=np.float32).reshape(1, c, 1, 1))  # 1 -> 4 channels
    declined(b.model(b.conv(wide, c, c, 1, pads=[0] * 4)), b.feeds(), "per_channel")


@pytest.mark.parametrize("kind", ["add", "bn", "sub"])
def test_shift_before_padded_conv_is_declined(kind):
    c = 4
    b = Builder(c)
    declined(b.model(b.conv(affine(b, kind, b.relu("x"), c), c, c, 3)), b.feeds(), "no_padding")


def test_intermediate_used_elsewhere_is_declined():
    c = 4
    b = Builder(c)
    conv = b.conv("x", c, c, 3)
    declined(b.model(b.bn(conv, c), conv), b.feeds(), "single_use")


# property ------------------------------------------------------------------------------------


@settings(max_examples=examples(60), deadline=None)
@given(
    st.lists(st.sampled_from(KINDS), min_size=1, max_size=3),
    st.lists(st.sampled_from(KINDS), max_size=2),
    st.sampled_from([1, 2, 3]),
    st.sampled_from([0, 1]),
    st.sampled_from([1, 2]),
    st.sampled_from([1, 2, 4]),
)
def test_random_affine_chains_fold_exactly_or_are_declined(after, before, kernel, pad, stride, groups):
    c = 4
    b = Builder(c, spatial=(7, 6))
    t = b.relu("x")
    for kind in before:
        t = affine(b, kind, t, c)
    t = b.conv(t, c, c, kernel, stride, pads=[pad] * 4, groups=groups)
    for kind in after:
        t = affine(b, kind, t, c)
    out, report = optimize(b.model(t), b.feeds())
    assert report.rewritten >= len(after)
    for reason in report.passes[0].skipped.values():
        assert reason.startswith("no_padding:")


def test_constant_that_raises_the_rank_before_a_conv_is_declined():
    c = 4
    b = Builder(c, input_shape=[c, c])  # 2-D data; the Mul makes it [1, 4, 4]
    t = b.mul_const(b.relu("x"), np.ones((1, c, 1)))
    declined(b.model(b.conv(t, c, c, (1,), pads=[0, 0])), b.feeds(), "per_channel")


@pytest.mark.parametrize("shift", [False, True])
def test_scale_into_a_bias_free_conv_adds_no_bias(shift):
    """A scalar Mul after a Conv without bias folds into the weight alone: no zero bias is added
    (it would only add weights). A shift does give the Conv a bias."""
    b = Builder(4)
    y = b.mul_const(b.conv("x", 4, 4, 3, bias=False), np.array(0.5))
    if shift:
        y = b.node("Add", [y, b.const(np.linspace(-1, 1, 4).reshape(4, 1, 1))])
    model = b.model(y)
    out, report = optimize(model, b.feeds())
    assert histogram(out) == {"Conv": 1}
    [conv] = out.graph.node
    assert len(conv.input) == (3 if shift else 2)
    assert report.cost_after.params == 4 * 4 * 9 + (4 if shift else 0)
