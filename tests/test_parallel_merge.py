"""The parallel-merge pass on hand-built graphs: positive cases, one negative test per exactness
condition, and property tests over random branch configurations."""

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import onnxrep
from graphs import Builder, count, examples, histogram, run

PASS = "parallel-merge"


def assert_equivalent(a, b, feeds, rtol=1e-5):
    ra, rb = run(a, feeds), run(b, feeds)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert x.shape == y.shape
        scale = float(np.max(np.abs(x)))
        err = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
        assert err <= rtol * max(scale, 1e-30), f"max abs error {err} vs magnitude {scale}"


def optimize(model, feeds, **kw):
    kw.setdefault("passes", [PASS])
    out, report = onnxrep.optimize(model, **kw)
    onnx.checker.check_model(out)
    assert_equivalent(model, out, feeds)
    return out, report


def skips(report):
    return [s["reason"] for p in report.to_dict()["passes"] if p["name"] == PASS for s in p["skips"]]


def only_skip(report, condition):
    reasons = skips(report)
    assert reasons and all(r.startswith(condition + ":") for r in reasons), reasons


# --------------------------------------------------------------------------------------------
# positive cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("kernel,dilation", [(3, 1), (5, 1), (3, 2), (2, 1), (4, 1)])
@pytest.mark.parametrize("stride", [1, 2])
def test_kxk_plus_1x1_plus_identity(kernel, dilation, stride, groups, bias):
    """RepVGG-style sums over kernel, dilation, stride, groups and bias (even kernels pad
    asymmetrically); the identity branch only where the stride is 1."""
    c = 8
    b = Builder(c, spatial=(9, 10))
    total = dilation * (kernel - 1)
    pads = [total // 2, total // 2, total - total // 2, total - total // 2]
    terms = [
        b.bn(b.conv("x", c, c, kernel, stride, pads=pads, dilation=dilation, groups=groups, bias=bias), c),
        b.bn(b.conv("x", c, c, 1, stride, pads=[0, 0, 0, 0], groups=groups, bias=bias), c),
    ]
    if stride == 1:
        terms.append(b.bn("x", c))
    model = b.model(b.relu(b.sum(terms)))
    out, report = optimize(model, b.feeds())
    assert histogram(out) == {"Conv": 1, "Relu": 1}
    assert report.rewritten == 1


def test_repvgg_grouped_stage_with_identity():
    c = 16
    b = Builder(c, spatial=(8, 8))
    y = b.relu(b.sum([b.bn(b.conv("x", c, c, 3, groups=4, bias=False), c), b.bn(b.conv("x", c, c, 1, groups=4, bias=False), c), b.bn("x", c)]))
    out, report = optimize(b.model(y), b.feeds())
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "group")) == 4
    assert histogram(out) == {"Conv": 1, "Relu": 1}


def test_acnet_asymmetric_pads():
    c = 6
    b = Builder(c, spatial=(7, 9))
    terms = [
        b.bn(b.conv("x", c, c, (3, 3), pads=[1, 1, 1, 1], bias=False), c),
        b.bn(b.conv("x", c, c, (1, 3), pads=[0, 1, 0, 1], bias=False), c),
        b.bn(b.conv("x", c, c, (3, 1), pads=[1, 0, 1, 0], bias=False), c),
    ]
    out, _ = optimize(b.model(b.sum(terms)), b.feeds())
    assert histogram(out) == {"Conv": 1}


@pytest.mark.parametrize("k_branches", [1, 3])
def test_mobileone_depthwise_and_pointwise(k_branches):
    c = 8
    b = Builder(c, spatial=(8, 8))
    dw = [b.bn(b.conv("x", c, c, 3, groups=c, bias=False), c) for _ in range(k_branches)]
    dw.append(b.bn(b.conv("x", c, c, 1, groups=c, bias=False), c))
    dw.append(b.bn("x", c))
    h = b.relu(b.sum(dw))
    pw = [b.bn(b.conv(h, c, c, 1, bias=False), c) for _ in range(k_branches)] + [b.bn(h, c)]
    y = b.relu(b.sum(pw))
    out, report = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Conv": 2, "Relu": 2}
    assert report.rewritten == 2


@pytest.mark.parametrize("large", [13, 31])
def test_replknet_large_plus_small_kernel(large):
    c = 4
    b = Builder(c, spatial=(12, 12))
    terms = [b.bn(b.conv("x", c, c, large, groups=c, bias=False), c), b.bn(b.conv("x", c, c, 5, groups=c, bias=False), c)]
    out, _ = optimize(b.model(b.sum(terms)), b.feeds())
    assert histogram(out) == {"Conv": 1}
    w = next(i for i in out.graph.initializer if len(i.dims) == 4)
    assert list(w.dims) == [c, 1, large, large]


def test_repghost_depthwise_plus_bn():
    c = 8
    b = Builder(c, spatial=(6, 6))
    y = b.add(b.bn(b.conv("x", c, c, 3, groups=c, bias=False), c), b.bn("x", c))
    out, _ = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Conv": 1}


def test_dilated_branch_on_the_merged_grid_keeps_dilation():
    c = 4
    b = Builder(c, spatial=(11, 11))
    y = b.sum([b.conv("x", c, c, 3, dilation=2), b.conv("x", c, c, 1), b.bn("x", c)])
    out, _ = optimize(b.model(y), b.feeds())
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["dilations"] == [2, 2] and attrs["kernel_shape"] == [3, 3]


def test_avgpool_branch_qarepvgg():
    c = 6
    b = Builder(c, spatial=(8, 8))
    y = b.bn(b.sum([b.conv("x", c, c, 3), b.conv("x", c, c, 1), b.avgpool("x", 3)]), c)
    out, report = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Conv": 1}
    assert "post-sum" in report.passes[0].rewrites[0]["summary"]


def test_sub_scalar_and_per_channel_scales_in_any_association():
    c = 4
    b = Builder(c, spatial=(7, 7))
    a = b.mul_const(b.conv("x", c, c, 3), np.float32(0.5))
    m = b.mul_const(b.conv("x", c, c, 1), np.arange(1, c + 1).reshape(c, 1, 1) * 0.25)
    n = b.bn("x", c)
    y = b.sub(b.add(b.mul_const("x", np.float32(-2.0)), a), b.sub(n, m))  # (-2x + a) - (n - m)
    out, _ = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Conv": 1}


def test_fastvit_repmixer_shape_with_layer_scale():
    c = 8
    b = Builder(c, spatial=(6, 6))
    mixer = b.bn(b.conv("x", c, c, 3, groups=c, bias=False), c)
    inner = b.mul_const(b.sub(mixer, b.bn("x", c)), np.full((c, 1, 1), 0.1))
    y = b.add("x", inner)
    out, _ = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Conv": 1}


def test_constant_summand_joins_the_bias():
    c = 4
    b = Builder(c, spatial=(5, 5))
    y = b.add(b.add(b.conv("x", c, c, 3), b.const(np.ones((1, c, 1, 1)))), b.conv("x", c, c, 1))
    out, _ = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Conv": 1}


def test_other_summands_are_kept():
    c = 4
    b = Builder(c, spatial=(5, 5))
    other = b.relu("x")
    y = b.add(b.add(b.conv("x", c, c, 3), other), b.conv("x", c, c, 1))
    out, _ = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Conv": 1, "Add": 1, "Relu": 1}


def test_summand_that_is_a_conv_output_joins_as_identity():
    """``y + dw(y)`` where ``y`` is itself a conv's output (RepViT after a downsample)."""
    c = 4
    b = Builder(c, spatial=(6, 6))
    y0 = b.conv("x", c, c, 1)
    z = b.bn(b.add(b.conv(y0, c, c, 3, groups=c), y0), c)
    out, report = optimize(b.model(z), b.feeds())
    assert histogram(out) == {"Conv": 2}


def test_conv1d_branches():
    c = 4
    b = Builder(c, spatial=(11,))
    y = b.sum([b.conv("x", c, c, (5,)), b.conv("x", c, c, (1,)), b.bn("x", c)])
    out, _ = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Conv": 1}


def test_auto_pad_same_with_static_shape():
    c = 4
    b = Builder(c, spatial=(9, 9))
    y = b.add(b.conv("x", c, c, 3, auto_pad="SAME_UPPER"), b.conv("x", c, c, 1, auto_pad="SAME_UPPER"))
    out, _ = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Conv": 1}


def test_identity_nodes_and_constant_nodes_are_looked_through():
    c = 4
    b = Builder(c, spatial=(6, 6))
    w = np.random.default_rng(3).standard_normal((c, c, 3, 3)).astype(np.float32)
    b.nodes.append(helper.make_node("Constant", [], ["wc"], value=numpy_helper.from_array(w)))
    b.nodes.append(helper.make_node("Identity", ["wc"], ["wc_id"]))
    xi = b.node("Identity", ["x"])
    k3 = b.node("Conv", [xi, "wc_id"], pads=[1, 1, 1, 1])
    k3i = b.node("Identity", [k3])
    y = b.add(k3i, b.conv("x", c, c, 1))
    out, _ = optimize(b.model(y), b.feeds())
    assert count(out, "Conv") == 1


def test_float16_model():
    # (onnxruntime's CPU provider has no float64 Conv to compare against)
    for dtype, rtol in ((np.float16, 1e-2),):
        c = 4
        b = Builder(c, spatial=(6, 6), dtype=dtype)
        y = b.sum([b.bn(b.conv("x", c, c, 3, bias=False), c), b.conv("x", c, c, 1), b.bn("x", c)])
        model = b.model(y)
        out, _ = onnxrep.optimize(model, passes=[PASS])
        assert histogram(out) == {"Conv": 1}
        assert_equivalent(model, out, b.feeds(), rtol=rtol)


def test_dynamic_batch_and_names_kept():
    c = 4
    b = Builder(c, input_shape=["N", c, "H", "W"])
    y = b.relu(b.sum([b.conv("x", c, c, 3), b.conv("x", c, c, 1), b.bn("x", c)]))
    model = b.model(y, output_shapes=[["N", c, "H", "W"]])
    out, _ = optimize(model, b.feeds(shape=[2, c, 7, 5]))
    assert out.graph.input == model.graph.input and out.graph.output == model.graph.output
    assert histogram(out) == {"Conv": 1, "Relu": 1}


def test_optimizing_twice_changes_nothing():
    c = 4
    b = Builder(c)
    y = b.relu(b.sum([b.conv("x", c, c, 3), b.conv("x", c, c, 1), b.bn("x", c)]))
    once, _ = onnxrep.optimize(b.model(y), passes=[PASS])
    twice, report = onnxrep.optimize(once, passes=[PASS])
    assert report.rewritten == 0
    assert twice.SerializeToString() == once.SerializeToString()


def test_nested_sums_reach_a_fixed_point():
    c = 4
    b = Builder(c)
    inner = b.mul_const(b.add(b.conv("x", c, c, 3), b.conv("x", c, c, 1)), np.float32(0.5))
    y = b.add(inner, b.bn("x", c))
    out, report = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Conv": 1}


# --------------------------------------------------------------------------------------------
# negative cases: one per exactness condition
# --------------------------------------------------------------------------------------------


def declined(model, feeds, condition, **kw):
    out, report = optimize(model, feeds, **kw)
    assert report.rewritten == 0
    assert histogram(out) == histogram(model)
    only_skip(report, condition)
    return report


def test_different_inputs_are_not_merged():
    c = 4
    b = Builder(c)
    y = b.add(b.conv("x", c, c, 3), b.conv(b.relu("x"), c, c, 1))
    out, report = optimize(b.model(y), b.feeds())
    assert report.rewritten == 0 and count(out, "Conv") == 2


def test_bn_in_training_mode_is_declined():
    c = 4
    b = Builder(c, opset=15)
    y = b.add(b.conv("x", c, c, 3), b.bn("x", c, training_mode=1))
    model = b.model(y, output_shapes=[[1, c, 8, 8]])
    out, report = onnxrep.optimize(model, passes=[PASS])
    assert report.rewritten == 0
    only_skip(report, "inference_bn")


def test_non_constant_weight_is_declined():
    c = 4
    b = Builder(c)
    b.inputs.append(helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [c, c, 3, 3]))
    y = b.add(b.node("Conv", ["x", "w"], pads=[1, 1, 1, 1]), b.conv("x", c, c, 1))
    feeds = b.feeds() | {"w": np.ones((c, c, 3, 3), np.float32)}
    declined(b.model(y), feeds, "constant_weights")


def test_non_constant_bn_statistics_are_declined():
    c = 4
    b = Builder(c)
    b.inputs.append(helper.make_tensor_value_info("var", onnx.TensorProto.FLOAT, [c]))
    params = [b.const(p, "bn") for p in b.bn_params(c)]
    bn = b.node("BatchNormalization", ["x", params[0], params[1], params[2], "var"], epsilon=1e-5)
    y = b.add(b.conv("x", c, c, 3), bn)
    feeds = b.feeds() | {"var": np.ones(c, np.float32)}
    declined(b.model(y), feeds, "constant_weights")


def test_auto_pad_same_with_dynamic_size_is_declined():
    c = 4
    b = Builder(c, input_shape=[1, c, "H", "W"])
    y = b.add(b.conv("x", c, c, 3, auto_pad="SAME_UPPER"), b.conv("x", c, c, 1))
    declined(b.model(y), b.feeds(shape=[1, c, 6, 6]), "static_geometry")


def test_avgpool_that_does_not_count_padding_is_declined():
    c = 4
    b = Builder(c, spatial=(8, 8))
    y = b.add(b.conv("x", c, c, 3), b.avgpool("x", 3, count_include_pad=0))
    declined(b.model(y), b.feeds(), "avgpool_exact")


def test_avgpool_with_ceil_mode_is_declined():
    c = 4
    b = Builder(c, spatial=(9, 9))  # floor and ceil agree on 9 -> 5, so the graph is valid
    y = b.add(b.conv("x", c, c, 3, stride=2), b.avgpool("x", 3, stride=2, ceil_mode=1))
    declined(b.model(y, output_shapes=[[1, c, 5, 5]]), b.feeds(), "avgpool_exact")


def test_non_per_channel_constant_is_declined():
    c = 4
    b = Builder(c, spatial=(5, 5))
    scaled = b.mul_const(b.conv("x", c, c, 1), np.random.default_rng(0).standard_normal((1, c, 5, 5)))
    declined(b.model(b.add(b.conv("x", c, c, 3), scaled)), b.feeds(), "per_channel")


def test_identity_with_stride_two_is_declined():
    c = 4
    b = Builder(c, spatial=(8, 8))
    # stride-2 conv + a pooled identity of the same size is fine only if strides agree: here the
    # identity reads X at stride 1 and the Add broadcasts a 1x1 output against it
    conv = b.conv("x", c, c, 8, stride=2, pads=[0, 0, 0, 0])
    declined(b.model(b.add(conv, "x")), b.feeds(), "same_stride")


def test_broadcast_channels_are_declined():
    c = 4
    b = Builder(c, spatial=(6, 6))
    declined(b.model(b.add(b.conv("x", c, 1, 3), b.bn("x", c))), b.feeds(), "same_channels")


def test_different_output_sizes_are_declined():
    c = 4
    b = Builder(c, spatial=(6, 6))
    full = b.conv("x", c, c, 6, pads=[0, 0, 0, 0])  # 1x1 output, broadcast against 6x6
    declined(b.model(b.add(full, b.conv("x", c, c, 3))), b.feeds(), "same_output_size")


@pytest.mark.parametrize("where", ["graph_output", "other_reader"])
def test_intermediate_used_outside_is_declined(where):
    c = 4
    b = Builder(c, spatial=(6, 6))
    one = b.conv("x", c, c, 1)
    y = b.add(b.conv("x", c, c, 3), one)
    if where == "graph_output":
        model = b.model(y, one)
    else:
        model = b.model(y, b.relu(one))
    declined(model, b.feeds(), "single_use")


def test_hetconv_densifying_is_declined_unless_allowed():
    c = 8
    b = Builder(c, spatial=(6, 6))
    y = b.add(b.conv("x", c, c, 3, groups=4), b.conv("x", c, c, 1))
    model = b.model(y)
    declined(model, b.feeds(), "cost")
    out, report = optimize(model, b.feeds(), allow_cost_increase=True)
    assert report.rewritten == 1 and histogram(out) == {"Conv": 1}


def test_pointwise_plus_avgpool_densifying_is_declined():
    c = 8
    b = Builder(c, spatial=(6, 6))
    declined(b.model(b.add(b.conv("x", c, c, 1), b.avgpool("x", 3))), b.feeds(), "cost")


# --------------------------------------------------------------------------------------------
# property tests
# --------------------------------------------------------------------------------------------


@st.composite
def branch_graphs(draw):
    c = draw(st.sampled_from([4, 6, 8]))
    stride = draw(st.sampled_from([1, 1, 2]))
    excess = draw(st.sampled_from([-1, 0, 0, 0, 1]))  # pads - dilation*(k-1), shared by all branches
    b = Builder(c, spatial=(draw(st.integers(5, 9)), draw(st.integers(5, 9))), seed=draw(st.integers(0, 1000)))
    terms = []
    for _ in range(draw(st.integers(2, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "conv", "bn", "identity", "pool"]))
        if kind == "conv":
            k = draw(st.sampled_from([1, 2, 3, 5]))
            d = draw(st.sampled_from([1, 1, 2]))
            g = draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0]))
            total = max(excess + d * (k - 1), 0)
            pb = draw(st.integers(0, total))
            t = b.conv("x", c, c, k, stride, pads=[pb, pb, total - pb, total - pb], dilation=d, groups=g, bias=draw(st.booleans()))
            if draw(st.booleans()):
                t = b.bn(t, c)
        elif kind == "pool":
            k = draw(st.sampled_from([2, 3]))
            total = max(excess + k - 1, 0)  # pads stay below the kernel, as onnxruntime requires
            t = b.avgpool("x", k, stride=stride, pads=[total // 2, total // 2, total - total // 2, total - total // 2])
        elif kind == "bn":
            t = b.bn("x", c)
        else:
            t = "x"
        if draw(st.booleans()):
            t = b.mul_const(t, np.float32(draw(st.floats(-2, 2, allow_nan=False, width=32))))
        terms.append((t, draw(st.booleans())))
    acc, _ = terms[0]
    for t, negative in terms[1:]:
        acc = b.sub(acc, t) if negative else b.add(acc, t)
    return b, acc


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(branch_graphs(), st.booleans())
def test_random_branch_sums_are_merged_exactly_or_declined_with_a_reason(spec, allow):
    b, y = spec
    try:
        model = b.model(y)
        run(model, b.feeds())
    except Exception:
        return  # the random graph does not type-check or broadcast: nothing to optimize
    out, report = optimize(model, b.feeds(), allow_cost_increase=allow)
    event("rewritten" if report.rewritten else "declined" if report.passes[0].skipped else "no candidate")
    for p in report.passes:
        for reason in p.skipped.values():
            assert reason.split(":", 1)[0] in {
                "inference_bn", "constant_weights", "static_geometry", "avgpool_exact", "per_channel",
                "same_stride", "same_channels", "same_output_size", "single_use", "cost",
            }
    if report.rewritten:
        assert count(out, "Conv") <= count(model, "Conv")
