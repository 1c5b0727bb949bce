"""The conv-chain pass on hand-built graphs, padding rings included."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import onnxrep
from graphs import Builder, examples, histogram
from test_parallel_merge import assert_equivalent

PASS = "conv-chain"


def optimize(model, feeds, passes=(PASS,), **kw):
    out, report = onnxrep.optimize(model, passes=list(passes), **kw)
    onnx.checker.check_model(out)
    assert_equivalent(model, out, feeds)
    return out, report


def reasons(report, name=PASS):
    return [r for p in report.passes if p.name == name for r in p.skipped.values()]


def declined(model, feeds, condition, passes=(PASS,)):
    out, report = optimize(model, feeds, passes)
    assert report.rewritten == 0 and histogram(out) == histogram(model)
    rs = reasons(report, passes[0])
    assert rs and all(r.startswith(condition + ":") for r in rs), rs


def ring(b, t, c, pad, values):
    """Pad ``t`` by ``pad`` and write ``values`` (per channel) into the border, as DBB's exporter
    output does: Pad, then ScatterND over the four borders."""
    shape = [1, c, *b.spatial]
    hp, wp = shape[2] + 2 * pad, shape[3] + 2 * pad
    pads = b.node("Pad", [t, b.const_int(np.array([0, 0, pad, pad, 0, 0, pad, pad]))], mode="constant")
    out = pads
    for rows, cols in (
        (range(0, pad), range(wp)),
        (range(hp - pad, hp), range(wp)),
        (range(hp), range(0, pad)),
        (range(hp), range(wp - pad, wp)),
    ):
        idx = np.array([[0, ch, r, q] for ch in range(c) for r in rows for q in cols], np.int64)
        upd = np.array([values[ch] for ch in range(c) for _ in rows for _ in cols])
        out = b.node("ScatterND", [out, b.const_int(idx), b.const(upd)])
    return out


def builder(c, spatial=(7, 8)):
    return Builder(c, spatial=spatial)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (5, 1), (1, 1)])
def test_pointwise_then_conv_without_padding(kernel, stride, groups):
    c = 8
    b = builder(c)
    y = b.conv(b.conv("x", c, 16, 1, groups=groups), 16, c, kernel, stride, pads=[0] * 4, groups=groups)
    out, report = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Conv": 1} and report.rewritten == 1


def test_unbiased_pointwise_then_padded_conv():
    c = 8
    b = builder(c)
    y = b.conv(b.conv("x", c, c, 1, bias=False), c, c, 3)
    out, _ = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Conv": 1}


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("kernel,stride,dilation", [(3, 1, 1), (3, 2, 1), (3, 1, 2), (1, 1, 1)])
def test_conv_then_pointwise(kernel, stride, dilation, groups):
    c = 8
    b = builder(c, spatial=(9, 9))
    y = b.conv(b.conv("x", c, c, kernel, stride, dilation=dilation, groups=groups), c, c, 1, groups=groups)
    out, _ = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Conv": 1}


def test_expansion_pair_merges_cheaper():
    c = 8
    b = builder(c)
    y = b.conv(b.conv("x", c, 4 * c, 1), 4 * c, c, 1)
    out, report = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Conv": 1}
    assert report.cost_after.params < report.cost_before.params


@pytest.mark.parametrize("pad,kernel,stride", [(1, 3, 1), (2, 5, 1), (1, 3, 2)])
def test_padding_ring_with_bias_values(pad, kernel, stride):
    """DBB's 1x1 -> kxk branch: the ring holds the 1x1's bias, so the pads move to the front."""
    c = 4
    b = builder(c)
    rng = np.random.default_rng(0)
    bias = rng.standard_normal(c).astype(np.float32)
    w = rng.standard_normal((c, c, 1, 1)) * 0.5
    one = b.node("Conv", ["x", b.const(w), b.const(bias)], kernel_shape=[1, 1], pads=[0] * 4)
    y = b.conv(ring(b, one, c, pad, bias), c, c, kernel, stride, pads=[0] * 4)
    out, report = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Conv": 1}
    assert "padding ring" in report.passes[0].rewrites[0]["summary"]


def test_padding_ring_into_average_pool():
    """DBB's 1x1 -> avg branch (merged only beside a kxk conv of the same input)."""
    c = 4
    b = builder(c)
    bias = np.random.default_rng(1).standard_normal(c).astype(np.float32)
    w = np.random.default_rng(2).standard_normal((c, c, 1, 1))
    one = b.node("Conv", ["x", b.const(w), b.const(bias)], kernel_shape=[1, 1], pads=[0] * 4)
    avg = b.avgpool(ring(b, one, c, 1, bias), 3, pads=[0] * 4)
    y = b.add(avg, b.conv("x", c, c, 3))
    out, _ = optimize(b.model(y), b.feeds(), passes=(PASS, "parallel-merge"))
    assert histogram(out) == {"Conv": 1}


# negative cases ------------------------------------------------------------------------------


def test_biased_pointwise_into_padded_conv_is_declined():
    c = 4
    b = builder(c)
    declined(b.model(b.conv(b.conv("x", c, c, 1), c, c, 3)), b.feeds(), "border")


def test_ring_with_wrong_values_is_declined():
    c = 4
    b = builder(c)
    bias = np.ones(c, np.float32)
    one = b.node("Conv", ["x", b.const(np.ones((c, c, 1, 1))), b.const(bias)], kernel_shape=[1, 1], pads=[0] * 4)
    y = b.conv(ring(b, one, c, 1, bias + 0.5), c, c, 3, pads=[0] * 4)
    declined(b.model(y), b.feeds(), "ring")


def test_neither_pointwise_is_declined():
    c = 4
    b = builder(c)
    declined(b.model(b.conv(b.conv("x", c, c, 3), c, c, 3, pads=[0] * 4)), b.feeds(), "pointwise")


def test_depthwise_then_dense_pointwise_is_declined_for_cost():
    c = 8
    b = builder(c)
    declined(b.model(b.conv(b.conv("x", c, c, 3, groups=c), c, c, 1)), b.feeds(), "cost")


def test_bottleneck_is_declined_for_cost():
    c = 16
    b = builder(c)
    declined(b.model(b.conv(b.conv("x", c, 4, 1, bias=False), 4, c, 3)), b.feeds(), "cost")


def test_intermediate_read_elsewhere_is_declined():
    c = 4
    b = builder(c)
    one = b.conv("x", c, c, 1, bias=False)
    declined(b.model(b.conv(one, c, c, 3), one), b.feeds(), "single_use")


def test_non_constant_weight_is_declined():
    c = 4
    b = builder(c)
    b.inputs.append(helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [c, c, 3, 3]))
    y = b.node("Conv", [b.conv("x", c, c, 1), "w"], pads=[0] * 4)
    declined(b.model(y), b.feeds() | {"w": np.ones((c, c, 3, 3), np.float32)}, "constant_weights")


def test_average_pool_with_ceil_mode_is_declined():
    c = 4
    b = builder(c, spatial=(9, 9))
    y = b.avgpool(b.conv("x", c, c, 1, bias=False), 3, stride=2, pads=[0] * 4, ceil_mode=1)
    declined(b.model(y, output_shapes=[[1, c, 4, 4]]), b.feeds(), "avgpool_exact")


def test_dynamic_same_padding_is_declined():
    c = 4
    b = Builder(c, input_shape=[1, c, "H", "W"])
    y = b.conv(b.conv("x", c, c, 1, bias=False), c, c, 3, auto_pad="SAME_UPPER")
    declined(b.model(y), b.feeds(shape=[1, c, 6, 6]), "static_geometry")


# property ------------------------------------------------------------------------------------


@settings(max_examples=examples(50), deadline=None)
@given(
    st.sampled_from([1, 3]), st.sampled_from([1, 3]), st.sampled_from([0, 1]), st.sampled_from([0, 1]),
    st.sampled_from([1, 2]), st.sampled_from([1, 2, 4]), st.sampled_from([1, 2, 4]), st.booleans(), st.sampled_from([4, 8, 16]),
)
def test_random_chains_merge_exactly_or_are_declined(k1, k2, p1, p2, s2, g1, g2, bias, mid):
    c = 8
    b = builder(c, spatial=(7, 7))
    t = b.conv("x", c, mid, k1, pads=[p1] * 4, groups=g1, bias=bias)
    t = b.conv(t, mid, c, k2, s2, pads=[p2] * 4, groups=g2)
    out, report = optimize(b.model(t), b.feeds(), allow_cost_increase=True)
    for r in reasons(report):
        assert r.split(":")[0] in {"pointwise", "border"}, r
