"""Any exporter, any spelling, same result: the normalize-* passes rewrite other spellings of a sum
(variadic Sum / Mean, stack-and-ReduceSum / ReduceMean, Sub of a Neg), of zero padding (Pad before
a Conv or AveragePool, Paddle's Unsqueeze -> Pad -> Squeeze, SAME auto-padding) and dynamo's
computed zero bias (CastLike of a constant), so that every block folds exactly like its plain
spelling. Positives compare the optimized op histogram with the plain spelling's and the outputs
in onnxruntime; negatives leave the graph as it is and name the condition."""

from __future__ import annotations

from math import ceil

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

import onnxrep
from graphs import Builder, examples, histogram, run

C = 8
FOLDED = {"Conv": 1, "Relu": 1}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def optimize(model, **kw):
    out, report = onnxrep.optimize(model, **kw)
    onnx.checker.check_model(out)
    return out, report


def assert_equivalent(a, b, feeds, rtol=1e-5, atol=1e-6):
    """Equal outputs on the feeds and on the feeds times 100 (atol relative to the output's largest
    magnitude: a re-associated sum rounds with its largest terms, a wrong fold errs by the values)."""
    for scale in (1.0, 100.0):
        scaled = {k: (v * scale).astype(v.dtype) for k, v in feeds.items()}
        for x, y in zip(run(a, scaled), run(b, scaled)):
            np.testing.assert_allclose(y, x, rtol=rtol, atol=atol * max(float(np.max(np.abs(x), initial=0.0)), 1.0))


def assert_like_plain(spelled, plain, feeds, runs=True):
    """``spelled`` optimizes to the op histogram of ``plain`` optimized, with equal outputs (to
    ``spelled`` itself unless onnxruntime cannot run it, and to ``plain``); the optimized model is
    a fixed point."""
    out_s, rep_s = optimize(spelled)
    out_p, _ = optimize(plain)
    assert histogram(out_s) == histogram(out_p), rep_s.to_dict()["passes"]
    assert_equivalent(spelled if runs else plain, out_s, feeds)
    assert_equivalent(out_p, out_s, feeds)
    again, rep = optimize(out_s)
    assert rep.rewritten == 0, rep.to_dict()["passes"]
    assert histogram(again) == histogram(out_s)
    return out_s, rep_s


def skips(report, name):
    return [s["reason"] for p in report.to_dict()["passes"] if p["name"] == name for s in p["skips"]]


def rewrites(report, name):
    return [r["summary"] for p in report.to_dict()["passes"] if p["name"] == name for r in p["rewrites"]]


def assert_declined(model, name, condition, op):
    """Optimizing ``model`` keeps every ``op`` node, rewrites nothing with pass ``name`` and
    declines a candidate for ``condition``."""
    out, report = optimize(model)
    assert histogram(out).get(op, 0) == histogram(model).get(op, 0)
    assert not rewrites(report, name)
    reasons = skips(report, name)
    assert any(r.startswith(condition + ":") for r in reasons), reasons
    return out, report


def branches(b: Builder, x="x", k=3, stride=1, identity=True, **conv):
    """RepVGG-style branches on ``x``: BN(kxk conv), BN(1x1 conv) and (stride 1) BN(x)."""
    terms = [b.bn(b.conv(x, C, C, k, stride, bias=False, **conv), C), b.bn(b.conv(x, C, C, 1, stride, pads=[0, 0, 0, 0], bias=False), C)]
    if identity and stride == 1:
        terms.append(b.bn(x, C))
    return terms


def stack(b: Builder, terms, axis=0, reduce="ReduceSum", attr_axes=False, keepdims=0, concat_axis=None):
    """``torch.stack(terms, axis).sum(axis)`` in ONNX: Unsqueeze each, Concat, reduce."""
    if attr_axes:
        unsq = [b.node("Unsqueeze", [t], axes=[axis]) for t in terms]
    else:
        unsq = [b.node("Unsqueeze", [t, b.const_int([axis])]) for t in terms]
    cat = b.node("Concat", unsq, axis=axis if concat_axis is None else concat_axis)
    if attr_axes:
        return b.node(reduce, [cat], axes=[axis], keepdims=keepdims)
    return b.node(reduce, [cat, b.const_int([axis])], keepdims=keepdims)


def plain_block(seed=0, spatial=(9, 10), scale=None):
    b = Builder(C, spatial=spatial, seed=seed)
    y = b.sum(branches(b))
    if scale is not None:
        y = b.mul_const(y, scale)
    return b.model(b.relu(y)), b.feeds()


# --------------------------------------------------------------------------------------------
# sums
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Sum", "Mean"])
def test_variadic_sum_and_mean(op):
    b = Builder(C, spatial=(9, 10))
    model = b.model(b.relu(b.node(op, branches(b))))
    plain, feeds = plain_block(scale=np.float32(1 / 3) if op == "Mean" else None)
    out, report = assert_like_plain(model, plain, feeds)
    assert histogram(out) == FOLDED
    assert rewrites(report, "normalize-sums")


@pytest.mark.parametrize("op", ["Sum", "Mean"])
def test_variadic_sum_of_unrelated_tensors_is_left_as_one_node(op):
    """Three activations summed: no fold takes them in, and n - 1 Adds would only add nodes."""
    b = Builder(C, spatial=(8, 8))
    terms = [b.relu("x"), b.node("Sigmoid", ["x"]), b.node("Tanh", ["x"])]
    model = b.model(b.node(op, terms))
    assert_declined(model, "normalize-sums", "foldable", op)


def test_sum_of_two_and_of_one():
    b = Builder(C, spatial=(8, 8))
    terms = branches(b, identity=False)
    model = b.model(b.relu(b.node("Sum", [b.node("Sum", terms), b.node("Sum", [b.bn("x", C)])])))
    out, _ = optimize(model)
    assert histogram(out) == FOLDED
    assert_equivalent(model, out, b.feeds())


@pytest.mark.parametrize(
    "opset,attr_axes,axis", [(11, True, 0), (12, True, -5), (13, False, 0), (17, False, 4), (17, False, -1), (18, False, 2)]
)
@pytest.mark.parametrize("reduce", ["ReduceSum", "ReduceMean"])
def test_stack_reduce(opset, attr_axes, axis, reduce):
    """stack(branches, axis).sum(axis) / .mean(axis): axes as attributes below opset 13 (ReduceMean:
    18) and as inputs from there, any position of the new axis, negative axes."""
    if reduce == "ReduceMean":
        attr_axes = opset < 18
    elif opset >= 13:
        attr_axes = False
    b = Builder(C, spatial=(9, 10), opset=opset)
    terms = branches(b)
    unsq_attr = opset < 13
    if unsq_attr != attr_axes:  # Unsqueeze takes axes as an input from 13, ReduceMean from 18
        unsq = [b.node("Unsqueeze", [t], axes=[axis]) if unsq_attr else b.node("Unsqueeze", [t, b.const_int([axis])]) for t in terms]
        cat = b.node("Concat", unsq, axis=axis)
        y = b.node(reduce, [cat], axes=[axis], keepdims=0) if attr_axes else b.node(reduce, [cat, b.const_int([axis])], keepdims=0)
    else:
        y = stack(b, terms, axis, reduce, attr_axes)
    model = b.model(b.relu(y))
    plain, feeds = plain_block(scale=np.float32(1 / 3) if reduce == "ReduceMean" else None)
    out, report = assert_like_plain(model, plain, feeds)
    assert histogram(out) == FOLDED
    assert rewrites(report, "normalize-sums")


@pytest.mark.parametrize("spelling", ["sub_neg", "add_neg", "neg_add"])
def test_neg_spellings(spelling):
    b = Builder(C, spatial=(9, 10))
    a3, a1, ident = branches(b)
    if spelling == "sub_neg":  # a3 - (-a1)
        s = b.sub(a3, b.node("Neg", [a1]))
    elif spelling == "add_neg":  # a3 + (-(-a1))... a3 + Neg(Neg(a1))
        s = b.add(a3, b.node("Neg", [b.node("Neg", [a1])]))
    else:  # Neg(Neg(a1)) + a3
        s = b.add(b.node("Neg", [b.node("Neg", [a1])]), a3)
    model = b.model(b.relu(b.add(s, ident)))
    plain, feeds = plain_block()
    out, _ = assert_like_plain(model, plain, feeds)
    assert histogram(out) == FOLDED


def test_stack_with_unknown_shape_declines():
    """A stacked tensor of unknown shape: no evidence that the Concat did not need equal shapes."""
    b = Builder(C, spatial=(8, 8))
    b.inputs.append(helper.make_tensor_value_info("s", onnx.TensorProto.INT64, [4]))
    a3, a1, _ = branches(b)
    y = stack(b, [a3, b.node("Reshape", [a1, "s"])])
    model = b.model(b.relu(y), output_shapes=[[1, C, 8, 8]])
    assert_declined(model, "normalize-sums", "same_shape", "ReduceSum")


def test_stack_with_broadcasting_branch_declines():
    """A per-channel (1, C, 1, 1) summand stacked with (1, C, H, W) branches: an Add would
    broadcast it, the Concat does not: left as it is."""
    b = Builder(C, spatial=(8, 8))
    a3, a1, _ = branches(b)
    y = stack(b, [a3, a1, b.node("GlobalAveragePool", ["x"])])
    model = b.model(b.relu(y), output_shapes=[[1, C, 8, 8]])
    assert_declined(model, "normalize-sums", "same_shape", "ReduceSum")


@pytest.mark.parametrize("case", ["keepdims", "concat_axis", "reduce_all"])
def test_stack_on_another_axis_declines(case):
    b = Builder(C, spatial=(8, 8))
    terms = branches(b)
    if case == "keepdims":
        y = stack(b, terms, keepdims=1)
    elif case == "concat_axis":  # Concat along the channels of the unsqueezed tensors
        y = stack(b, terms, axis=0, concat_axis=2)
    else:
        unsq = [b.node("Unsqueeze", [t, b.const_int([0])]) for t in terms]
        y = b.node("ReduceSum", [b.node("Concat", unsq, axis=0)], keepdims=0)
    model = b.model(y)
    out, _ = assert_declined(model, "normalize-sums", "new_axis", "ReduceSum")
    assert_equivalent(model, out, b.feeds())


def test_stack_read_elsewhere_declines():
    b = Builder(C, spatial=(8, 8))
    terms = branches(b)
    unsq = [b.node("Unsqueeze", [t, b.const_int([0])]) for t in terms]
    cat = b.node("Concat", unsq, axis=0)
    y = b.node("ReduceSum", [cat, b.const_int([0])], keepdims=0)
    model = b.model(b.relu(y), b.node("ReduceMax", [cat], keepdims=0))
    out, _ = assert_declined(model, "normalize-sums", "single_use", "ReduceSum")
    assert_equivalent(model, out, b.feeds())


def test_neg_read_elsewhere_declines():
    b = Builder(C, spatial=(8, 8))
    a3, a1, _ = branches(b)
    neg = b.node("Neg", [a1])
    model = b.model(b.sub(a3, neg), neg)
    out, _ = assert_declined(model, "normalize-sums", "single_use", "Neg")
    assert_equivalent(model, out, b.feeds())


def test_integer_stack_declines():
    b = Builder(C, spatial=(8, 8))
    b.inputs = [helper.make_tensor_value_info(n, onnx.TensorProto.INT64, [2, 3]) for n in "ab"]
    y = stack(b, ["a", "b"])
    graph = helper.make_graph(b.nodes, "t", b.inputs, [helper.make_tensor_value_info(y, onnx.TensorProto.INT64, [2, 3])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, _ = assert_declined(model, "normalize-sums", "dtype", "ReduceSum")
    feeds = {"a": np.arange(6).reshape(2, 3), "b": np.arange(6, 12).reshape(2, 3)}
    np.testing.assert_array_equal(run(out, feeds)[0], run(model, feeds)[0])


# --------------------------------------------------------------------------------------------
# pads
# --------------------------------------------------------------------------------------------


def padded(b: Builder, x, pads4, opset_style="input", value=None, mode=None, axes=None):
    """``x`` padded on H, W by ``pads4`` = [top, left, bottom, right] in the Pad spelling of an
    opset: ``attr`` (<= 10), ``input`` (11+), ``axes`` (18+: pads of the spatial axes only)."""
    t, l, bo, r = pads4
    full = [0, 0, t, l, 0, 0, bo, r]
    attrs = {} if mode is None else {"mode": mode}
    if opset_style == "attr":
        if value is not None:
            attrs["value"] = float(value)
        return b.node("Pad", [x], pads=full, **attrs)
    if opset_style == "axes":
        ins = [x, b.const_int([t, l, bo, r]), b.const(np.array(0 if value is None else value)), b.const_int([2, 3])]
        return b.node("Pad", ins, **attrs)
    ins = [x, b.const_int(full)]
    if value is not None:
        ins.append(b.const(np.array(value)))
    return b.node("Pad", ins, **attrs)


@pytest.mark.parametrize(
    "opset,style,value", [(10, "attr", None), (10, "attr", 0.0), (13, "input", None), (13, "input", 0.0), (18, "axes", 0.0)]
)
@pytest.mark.parametrize("split", ["all_in_pad", "shared"])
def test_pad_before_conv(opset, style, value, split):
    """An explicit zero Pad before the 3x3 branch (the whole padding, or part of it with the rest in
    the Conv's own pads, asymmetric) folds like the plain block."""
    b = Builder(C, spatial=(9, 10), opset=opset)
    if split == "all_in_pad":
        x3 = padded(b, "x", [1, 1, 1, 1], style, value)
        conv_pads = [0, 0, 0, 0]
    else:
        x3 = padded(b, "x", [1, 0, 0, 1], style, value)
        conv_pads = [0, 1, 1, 0]
    a3 = b.bn(b.conv(x3, C, C, 3, pads=conv_pads, bias=False), C)
    a1 = b.bn(b.conv("x", C, C, 1, pads=[0, 0, 0, 0], bias=False), C)
    model = b.model(b.relu(b.sum([a3, a1, b.bn("x", C)])))
    plain, feeds = plain_block()
    out, report = assert_like_plain(model, plain, feeds)
    assert histogram(out) == FOLDED
    assert rewrites(report, "normalize-pads")


@pytest.mark.parametrize("count_include_pad", [1, 0])
def test_pad_before_avgpool_counting_padding(count_include_pad):
    """A pool without pads of its own counts the Pad's zeros whatever its count_include_pad (Keras'
    AveragePooling2D after a ZeroPadding2D): it is made to count padding when it takes the pads."""
    b = Builder(C, spatial=(9, 10))
    pool = b.avgpool(padded(b, "x", [1, 1, 1, 1]), 3, pads=[0, 0, 0, 0], count_include_pad=count_include_pad)
    model = b.model(b.relu(b.sum([b.conv("x", C, C, 3), pool])))
    p = Builder(C, spatial=(9, 10))
    plain = p.model(p.relu(p.sum([p.conv("x", C, C, 3), p.avgpool("x", 3, count_include_pad=1)])))
    out, _ = assert_like_plain(model, plain, b.feeds())
    assert histogram(out) == FOLDED


def test_paddle_unsqueeze_pad_squeeze():
    """Paddle pads a 4-D tensor as a 5-D one: Unsqueeze(axis 2) -> Pad (5-D) -> Squeeze."""
    b = Builder(C, spatial=(9, 10))
    u = b.node("Unsqueeze", ["x", b.const_int([2])])
    p = b.node("Pad", [u, b.const_int([0, 0, 0, 1, 1, 0, 0, 0, 1, 1])])
    x3 = b.node("Squeeze", [p, b.const_int([2])])
    a3 = b.bn(b.conv(x3, C, C, 3, pads=[0, 0, 0, 0], bias=False), C)
    a1 = b.bn(b.conv("x", C, C, 1, pads=[0, 0, 0, 0], bias=False), C)
    model = b.model(b.relu(b.sum([a3, a1, b.bn("x", C)])))
    plain, feeds = plain_block()
    out, _ = assert_like_plain(model, plain, feeds)
    assert histogram(out) == FOLDED


def test_pad_read_by_two_convs():
    """One Pad read by two 3x3 convs: both take the pads, the Pad goes."""
    b = Builder(C, spatial=(9, 10))
    x3 = padded(b, "x", [1, 1, 1, 1])
    y = b.sum([b.bn(b.conv(x3, C, C, 3, pads=[0, 0, 0, 0], bias=False), C) for _ in range(2)] + [b.bn("x", C)])
    model = b.model(b.relu(y))
    out, report = optimize(model)
    assert histogram(out) == FOLDED, report.to_dict()["passes"]
    assert len(rewrites(report, "normalize-pads")) == 2
    assert_equivalent(model, out, b.feeds())


@pytest.mark.parametrize(
    "case,condition",
    [
        ("value_1", "pad_value"),
        ("reflect", "pad_mode"),
        ("edge", "pad_mode"),
        ("channel_axis", "spatial_only"),
        ("negative", "non_negative"),
        ("other_reader", "pad_readers"),
        ("graph_output", "pad_readers"),
        ("count_exclude_pad", "avgpool_exact"),
        ("pool_ceil_mode", "avgpool_exact"),
        ("runtime_pads", "constant_pads"),
        ("runtime_value", "pad_value"),
        ("paddle_inserted_axis", "spatial_only"),
    ],
)
def test_pad_negatives(case, condition):
    b = Builder(C, spatial=(9, 10))
    outputs = []
    consumer = "conv"
    if case == "value_1":
        x3 = padded(b, "x", [1, 1, 1, 1], value=1.0)
    elif case in ("reflect", "edge"):
        x3 = padded(b, "x", [1, 1, 1, 1], mode=case)
    elif case == "channel_axis":
        x3 = b.node("Pad", ["x", b.const_int([0, 1, 1, 1, 0, 1, 1, 1])])
    elif case == "negative":
        x3 = b.node("Pad", ["x", b.const_int([0, 0, -1, 2, 0, 0, 3, 0])])
    elif case in ("other_reader", "graph_output"):
        x3 = padded(b, "x", [1, 1, 1, 1])
        outputs.append(b.node("Relu", [x3]) if case == "other_reader" else x3)
    elif case in ("count_exclude_pad", "pool_ceil_mode"):
        x3 = padded(b, "x", [1, 1, 1, 1])
        consumer = "pool"
    elif case == "runtime_pads":
        b.inputs.append(helper.make_tensor_value_info("p", onnx.TensorProto.INT64, [8]))
        x3 = b.node("Pad", ["x", "p"])
    elif case == "runtime_value":
        b.inputs.append(helper.make_tensor_value_info("v", b.elem, []))
        x3 = b.node("Pad", ["x", b.const_int([0, 0, 1, 1, 0, 0, 1, 1]), "v"])
    else:  # pads the inserted axis too (the Squeeze would then fail at run time: structure only)
        u = b.node("Unsqueeze", ["x", b.const_int([2])])
        p = b.node("Pad", [u, b.const_int([0, 0, 1, 1, 1, 0, 0, 0, 1, 1])])
        x3 = b.node("Squeeze", [p, b.const_int([2])])
    if consumer == "pool":
        if case == "count_exclude_pad":  # pads of its own that it does not count
            branch = b.avgpool(x3, 5, pads=[1, 1, 1, 1], count_include_pad=0)
        else:
            branch = b.avgpool(x3, 3, pads=[0, 0, 0, 0], count_include_pad=1, ceil_mode=1)
    else:
        branch = b.conv(x3, C + 2 if case == "channel_axis" else C, C, 3, pads=[0, 0, 0, 0])
    y = b.relu(b.sum([branch, b.conv("x", C, C, 1, pads=[0, 0, 0, 0])]))
    shapes = None
    if case in ("negative", "paddle_inserted_axis"):
        y = b.relu(branch)  # the shapes do not line up with an unpadded branch
        shapes = [[None] * 4] if case == "paddle_inserted_axis" else None
    model = b.model(y, *outputs, output_shapes=shapes)
    out, _ = assert_declined(model, "normalize-pads", condition, "Pad")
    if case not in ("runtime_pads", "runtime_value", "paddle_inserted_axis"):
        feeds = b.feeds()
        assert_equivalent(model, out, feeds)


# --------------------------------------------------------------------------------------------
# SAME auto-padding
# --------------------------------------------------------------------------------------------


def same_pads(size, k, s, d, upper=True):
    """Per axis (begin, end) of SAME padding, as the ONNX operator defines it."""
    total = max(0, (ceil(size / s) - 1) * s + d * (k - 1) + 1 - size)
    small, big = total // 2, total - total // 2
    return (small, big) if upper else (big, small)


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("k,d", [(3, 1), (4, 1), (3, 2)])
def test_same_conv(mode, k, d):
    """SAME on the kxk branch (stride 1: the output size is the input's) folds like explicit pads
    by the formula; even kernels stay asymmetric."""
    size = (9, 10)
    b = Builder(C, spatial=size)
    model = b.model(b.relu(b.sum(branches(b, k=k, dilation=d, auto_pad=mode))))
    p = Builder(C, spatial=size)
    hp = same_pads(size[0], k, 1, d, mode == "SAME_UPPER")
    wp = same_pads(size[1], k, 1, d, mode == "SAME_UPPER")
    plain = p.model(p.relu(p.sum(branches(p, k=k, dilation=d, pads=[hp[0], wp[0], hp[1], wp[1]]))))
    # onnxruntime runs no dilated SAME conv: the explicit spelling is the reference there
    out, report = assert_like_plain(model, plain, b.feeds(), runs=d == 1)
    assert histogram(out) == FOLDED
    assert any("pads" in r for r in rewrites(report, "normalize-pads"))
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert all(a.name != "auto_pad" or a.s == b"NOTSET" for a in conv.attribute)


@pytest.mark.parametrize("count_include_pad", [1, 0])
@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
def test_same_avgpool(mode, count_include_pad):
    """SAME on an AveragePool branch: explicit pads, asymmetric for the even kernel; padding not
    counted stays not counted (and does not fold, in either spelling)."""
    b = Builder(C, spatial=(9, 10))
    pool = b.node("AveragePool", ["x"], kernel_shape=[2, 3], auto_pad=mode, count_include_pad=count_include_pad)
    model = b.model(b.relu(b.sum([b.conv("x", C, C, (2, 3), pads=[0, 1, 1, 1] if mode == "SAME_UPPER" else [1, 1, 0, 1]), pool])))
    p = Builder(C, spatial=(9, 10))
    pads = [0, 1, 1, 1] if mode == "SAME_UPPER" else [1, 1, 0, 1]
    pool = p.avgpool("x", (2, 3), pads=pads, count_include_pad=count_include_pad)
    plain = p.model(p.relu(p.sum([p.conv("x", C, C, (2, 3), pads=pads), pool])))
    out, _ = assert_like_plain(model, plain, b.feeds())
    assert histogram(out) == (FOLDED if count_include_pad else {"Conv": 1, "AveragePool": 1, "Add": 1, "Relu": 1})


def test_same_with_symbolic_size_declines():
    b = Builder(C, input_shape=["N", C, "H", "W"])
    model = b.model(b.relu(b.sum(branches(b, auto_pad="SAME_UPPER"))))
    out, report = optimize(model)
    reasons = skips(report, "normalize-pads")
    assert any(r.startswith("static_size:") for r in reasons), reasons
    assert not rewrites(report, "normalize-pads")
    assert_equivalent(model, out, b.feeds(shape=[1, C, 7, 9]))


def test_same_avgpool_ceil_mode_declines():
    b = Builder(C, spatial=(9, 10))
    pool = b.node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER", ceil_mode=1)
    model = b.model(pool)
    out, _ = assert_declined(model, "normalize-pads", "ceil_mode", "AveragePool")
    assert_equivalent(model, out, b.feeds())


def keras_block(size=64):
    """Keras ``padding="same"``: a 3x3 stride-2 conv (pads 0 before, 1 after at an even size) and a
    1x1 stride-2 conv, summed: 64x64 -> 32x32."""
    b = Builder(C, spatial=(size, size))
    a3 = b.bn(b.conv("x", C, C, 3, 2, bias=False, auto_pad="SAME_UPPER"), C)
    a1 = b.bn(b.conv("x", C, C, 1, 2, bias=False, auto_pad="SAME_UPPER"), C)
    return b.model(b.relu(b.add(a3, a1))), b.feeds()


def test_keras_same_stride2_made_explicit():
    model, feeds = keras_block()
    out, report = optimize(model)
    assert sorted(rewrites(report, "normalize-pads")) == [
        "Conv auto_pad=SAME_UPPER -> pads [0, 0, 0, 0]",
        "Conv auto_pad=SAME_UPPER -> pads [0, 0, 1, 1]",
    ]
    assert "BatchNormalization" not in histogram(out)
    assert_equivalent(model, out, feeds)


def test_keras_same_stride2_merges():
    model, feeds = keras_block()
    out, report = optimize(model)
    assert histogram(out) == FOLDED, report.to_dict()["passes"]
    assert_equivalent(model, out, feeds)
    assert_equivalent(model, out, {k: v * 100 for k, v in feeds.items()}, atol=1e-4)


def _uneven_pads_block(spatial, input_shape=None):
    """A 3x3 stride-2 conv padded [0, 0, 1, 1] beside an unpadded 1x1 stride-2 conv: their output
    sizes agree only at even input sizes."""
    b = Builder(C, spatial=spatial, input_shape=input_shape)
    a3 = b.bn(b.conv("x", C, C, 3, 2, pads=[0, 0, 1, 1], bias=False), C)
    a1 = b.bn(b.conv("x", C, C, 1, 2, bias=False), C)
    return b.model(b.relu(b.add(a3, a1)))


def test_uneven_pads_merge_only_where_the_static_size_gives_equal_outputs():
    out, _ = optimize(_uneven_pads_block((64, 64)))
    assert histogram(out) == FOLDED
    # symbolic spatial size: the branches' output sizes differ at odd sizes
    out, report = optimize(_uneven_pads_block((64, 64), input_shape=[1, C, "H", "W"]))
    assert histogram(out)["Conv"] == 2
    assert any(r.startswith("same_output_size") for p in report.passes for r in p.skipped.values())


# --------------------------------------------------------------------------------------------
# CastLike
# --------------------------------------------------------------------------------------------


def castlike_bias_block():
    """dynamo optimize=False's bias of a bias-free conv: Expand(CastLike(0, x), [Cout])."""
    b = Builder(C, spatial=(9, 10))
    zero = b.node("CastLike", [b.const_int(0), "x"])
    bias = b.node("Expand", [zero, b.const_int([C])])
    w3 = b.const(b.weight(C, C, 3), "w")
    a3 = b.bn(b.node("Conv", ["x", w3, bias], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), C)
    return b, a3


def test_castlike_zero_bias():
    b, a3 = castlike_bias_block()
    a1 = b.bn(b.conv("x", C, C, 1, pads=[0, 0, 0, 0], bias=False), C)
    model = b.model(b.relu(b.sum([a3, a1, b.bn("x", C)])))
    plain, feeds = plain_block()
    out, report = assert_like_plain(model, plain, feeds)
    assert histogram(out) == FOLDED
    assert rewrites(report, "normalize-castlike")


def test_castlike_unknown_type_declines():
    b = Builder(C, spatial=(9, 10))
    custom = b.node("Opaque", ["x"], domain="com.example")
    y = b.node("CastLike", [b.const_int(0), custom])
    b.nodes[-2].domain = "com.example"
    graph = helper.make_graph(b.nodes, "t", b.inputs, [helper.make_tensor_value_info(y, onnx.TensorProto.INT64, ["d"])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    out, report = onnxrep.optimize(model)
    assert histogram(out)["CastLike"] == 1
    assert any(r.startswith("known_dtype:") for r in skips(report, "normalize-castlike"))


def test_castlike_graph_output_declines():
    b = Builder(C, spatial=(9, 10))
    y = b.node("CastLike", [b.const_int([1, 2]), "x"])
    model = b.model(y)
    assert_declined(model, "normalize-castlike", "graph_output", "CastLike")


# --------------------------------------------------------------------------------------------
# shifts before an average pool (tf2onnx's DBB average-pool branch)
# --------------------------------------------------------------------------------------------


def pool_branch(b: Builder, shift="tf2onnx", pool_pads=(0, 0, 0, 0), const_shape=(C, 1, 1), output=False):
    """DBB's average-pool branch as tf2onnx writes it: ``Conv1x1 (no bias) -> Pad(0) -> Add(r) ->
    AveragePool(3, no pads) -> BN``; ``shift="ring"``: ``Sub(r) -> Pad(0) -> Add(r)`` after a 1x1
    with bias ``r`` (the spelling conv-chain takes whole). Returns (branch, extra graph outputs)."""
    r = np.linspace(-0.5, 0.7, int(np.prod(const_shape))).astype(np.float32).reshape(const_shape)
    if shift == "ring":  # the ring holds the 1x1's bias (DBB's BN at zero): a valid ring
        w = np.random.default_rng(3).standard_normal((C, C, 1, 1)).astype(np.float32) * 0.5
        c1 = b.node("Conv", ["x", b.const(w), b.const(r.reshape(C))], kernel_shape=[1, 1], pads=[0] * 4)
        c1 = b.node("Sub", [c1, b.const(r)])
    else:
        c1 = b.conv("x", C, C, 1, pads=[0, 0, 0, 0], bias=False)
    shifted = b.node("Add", [padded(b, c1, [1, 1, 1, 1]), b.const(r)])
    kernel = 3 + pool_pads[0] + pool_pads[2]
    pool = b.avgpool(shifted, kernel, pads=list(pool_pads), count_include_pad=0)
    return b.bn(pool, C), ([shifted] if output else [])


def test_shift_before_pool_moves_after_it():
    b = Builder(C, spatial=(9, 10), seed=4)
    branch, _ = pool_branch(b)
    model = b.model(b.relu(b.sum([b.bn(b.conv("x", C, C, 3, bias=False), C), branch])))
    out, report = optimize(model, verify=True)
    assert any("moved after AveragePool" in r for r in rewrites(report, "normalize-shifts"))
    # the zero Pad then goes into the pool (normalize-pads) or, with the 1x1 before it, into the
    # merged conv (conv-chain, in the same round)
    assert histogram(out).get("Pad", 0) == 0
    assert_equivalent(model, out, b.feeds())


def test_shift_before_pool_folds_to_one_conv():
    b = Builder(C, spatial=(9, 10), seed=4)
    branch, _ = pool_branch(b)
    model = b.model(b.relu(b.sum([b.bn(b.conv("x", C, C, 3, bias=False), C), branch])))
    out, _ = optimize(model, verify=True)
    assert histogram(out) == FOLDED


@pytest.mark.parametrize(
    "case,condition",
    [
        ("spatial_constant", "per_channel"),
        ("pool_pads", "unpadded"),
        ("graph_output", "single_use"),
        ("ring", "ring_shift"),
    ],
)
def test_shift_before_pool_negatives(case, condition):
    b = Builder(C, spatial=(9, 10), seed=4)
    kw = {
        "spatial_constant": {"const_shape": (C, 11, 12)},
        "pool_pads": {"pool_pads": (1, 1, 1, 1)},
        "graph_output": {"output": True},
        "ring": {"shift": "ring"},
    }[case]
    branch, outputs = pool_branch(b, **kw)
    model = b.model(b.relu(b.sum([b.conv("x", C, C, 3), branch])), *outputs)
    if case == "ring":  # conv-chain takes the ring whole: the pipeline folds the block, the shift stays put
        assert histogram(optimize(model, verify=True)[0]) == FOLDED
    out, report = optimize(model, passes=["normalize-shifts"] if case == "ring" else None)
    assert not rewrites(report, "normalize-shifts")
    assert any(r.startswith(condition + ":") for r in skips(report, "normalize-shifts")), skips(report, "normalize-shifts")
    assert_equivalent(model, out, b.feeds())


# --------------------------------------------------------------------------------------------
# property test: every spelling of a random block folds like the plain one
# --------------------------------------------------------------------------------------------


def spelled_block(spelling, k, stride, dilation, pad_split, extra, size, seed):
    """A RepVGG-style block (kxk + 1x1 [+ identity]) with the kxk branch padded "same" as explicit
    pads, a Pad node, part of each, or auto_pad, and the sum spelled as Add, Sum or a stack; the
    weights depend on the seed only. With ``extra`` (stride 1, not auto_pad) both convs pad that
    much more at the ends, and there is no identity branch."""
    b = Builder(C, spatial=(size, size), seed=seed)
    total = dilation * (k - 1)
    explicit = [total // 2, total // 2, total - total // 2, total - total // 2]
    if stride == 2:
        hp = same_pads(size, k, 2, dilation)
        explicit = [hp[0], hp[0], hp[1], hp[1]]
    extra = extra if stride == 1 and spelling != "same" else 0
    explicit = explicit[:2] + [p + extra for p in explicit[2:]]
    conv = {"dilation": dilation}
    x3 = "x"
    if spelling == "pad":
        in_pad = [min(p, pad_split) for p in explicit]
        x3 = padded(b, "x", in_pad)
        conv["pads"] = [p - q for p, q in zip(explicit, in_pad)]
    elif spelling == "same":
        conv["auto_pad"] = "SAME_UPPER"
    else:
        conv["pads"] = explicit
    a3 = b.bn(b.conv(x3, C, C, k, stride, bias=False, **conv), C)
    one = {"auto_pad": "SAME_UPPER"} if spelling == "same" else {"pads": [0, 0, extra, extra]}
    a1 = b.bn(b.conv("x", C, C, 1, stride, bias=False, **one), C)
    terms = [a3, a1] + ([b.bn("x", C)] if stride == 1 and not extra else [])
    if spelling == "sum":
        y = b.node("Sum", terms)
    elif spelling == "stack":
        y = stack(b, terms)
    else:
        y = b.sum(terms)
    return b.model(b.relu(y)), b.feeds()


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.sampled_from([1, 3, 5]),
    stride=st.sampled_from([1, 2]),
    dilation=st.sampled_from([1, 2]),
    pad_split=st.integers(0, 4),
    extra=st.integers(0, 1),
    size=st.integers(5, 12),
    spelling=st.sampled_from(["pad", "same", "sum", "stack"]),
    seed=st.integers(0, 2**16),
)
def test_property_spellings_fold_like_plain(k, stride, dilation, pad_split, extra, size, spelling, seed):
    extra = 0 if spelling == "same" else extra
    model, feeds = spelled_block(spelling, k, stride, dilation, pad_split, extra, size, seed)
    plain, _ = spelled_block("plain", k, stride, dilation, pad_split, extra, size, seed)
    out_s, _ = optimize(model)
    out_p, _ = optimize(plain)
    assert histogram(out_s) == histogram(out_p)
    assert "BatchNormalization" not in histogram(out_s)
    # onnxruntime runs no dilated SAME conv: the explicit spelling is the reference there
    runs = not (spelling == "same" and dilation > 1)
    assert_equivalent(model if runs else plain, out_s, feeds)
    assert_equivalent(out_p, out_s, feeds)


# --------------------------------------------------------------------------------------------
# real exports: torch.stack(...).sum(0) with both exporters; dynamo without its optimizer
# --------------------------------------------------------------------------------------------

TS11 = "torchscript-opset11"


def _torch_block(spelling: str, bias: bool = True):
    """A RepVGG block (3x3 + BN, 1x1 + BN, BN identity) whose branches are summed as ``a + b + c``
    (``plain``), ``stack(...).sum(0)`` (``stack_sum``), ``(a + b + c) / 3`` (``plain_mean``) or
    ``stack(...).mean(0)`` (``stack_mean``)."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.ba = nn.Conv2d(C, C, 3, padding=1, bias=bias), nn.BatchNorm2d(C)
            self.b, self.bb = nn.Conv2d(C, C, 1, bias=bias), nn.BatchNorm2d(C)
            self.bi = nn.BatchNorm2d(C)

        def forward(self, x):
            terms = [self.ba(self.a(x)), self.bb(self.b(x)), self.bi(x)]
            if spelling == "plain":
                y = terms[0] + terms[1] + terms[2]
            elif spelling == "plain_mean":
                y = (terms[0] + terms[1] + terms[2]) / 3
            elif spelling == "stack_sum":
                y = torch.stack(terms).sum(0)
            else:
                y = torch.stack(terms).mean(0)
            return torch.relu(y)

    torch.manual_seed(0)
    block = Block()
    from torch_blocks import randomize_bn

    return randomize_bn(block).eval()


def _export(module, path, exporter, **kw):
    import torch
    from torch_export import DYNAMO, export, quiet

    x = torch.randn(1, C, 9, 10, generator=torch.Generator().manual_seed(0))
    if exporter == TS11:
        with quiet():
            torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"], opset_version=11)
        return onnx.load(str(path))
    if kw:
        with quiet():
            torch.onnx.export(module, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"], **kw)
        return onnx.load(str(path))
    return export(module, x, path, exporter)


def _torch_feeds():
    return {"x": np.random.default_rng(3).standard_normal((1, C, 9, 10)).astype(np.float32)}


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("exporter", ["torchscript", TS11, "dynamo"])
def test_torch_stack_reduce(exporter, reduce, tmp_path):
    """``torch.stack(branches).sum(0)`` / ``.mean(0)`` folds like ``a + b + c`` (``/ 3``), with
    TorchScript (axes as inputs at opset 17, as attributes at opset 11) and dynamo."""
    pytest.importorskip("torch")
    from torch_export import assert_matches_torch

    stacked = _torch_block(f"stack_{reduce}")
    plain = _torch_block("plain" if reduce == "sum" else "plain_mean")
    model = _export(stacked, tmp_path / "stack.onnx", exporter)
    reference = _export(plain, tmp_path / "plain.onnx", exporter)
    assert any(n.op_type in ("ReduceSum", "ReduceMean") for n in model.graph.node)
    out, report = assert_like_plain(model, reference, _torch_feeds())
    assert histogram(out) == FOLDED, report.to_dict()["passes"]
    assert_matches_torch(out, stacked, (1, C, 9, 10))


def test_dynamo_unoptimized_bias_free(tmp_path):
    """dynamo with ``optimize=False`` gives every bias-free conv ``Expand(CastLike(0, x), shape)``
    as its bias: the export folds to the node counts of the ``optimize=True`` export."""
    pytest.importorskip("torch")
    from torch_export import assert_matches_torch

    block = _torch_block("plain", bias=False)
    raw = _export(block, tmp_path / "raw.onnx", "dynamo", optimize=False)
    tidy = _export(block, tmp_path / "tidy.onnx", "dynamo", optimize=True)
    assert any(n.op_type == "CastLike" for n in raw.graph.node)
    out, report = assert_like_plain(raw, tidy, _torch_feeds())
    assert histogram(out) == FOLDED, report.to_dict()["passes"]
    assert rewrites(report, "normalize-castlike")
    assert_matches_torch(out, block, (1, C, 9, 10))


@pytest.mark.parametrize("family", ["repvgg", "acnet", "mobileone", "repghost"])
def test_dynamo_unoptimized_families(family, tmp_path):
    """Every training-time family exported by dynamo without its optimizer (bias-free convs with
    computed zero biases) folds to the op histogram of the optimized export."""
    pytest.importorskip("torch")
    import torch_models as tm
    from torch_export import assert_matches_torch, quiet, random_inputs

    import torch

    model, shape = tm.build(family)
    xs = random_inputs(shape, 0)
    outs = []
    for opt in (False, True):
        path = tmp_path / f"{opt}.onnx"
        with quiet():
            torch.onnx.export(model, xs, str(path), dynamo=True, optimize=opt, input_names=["x"], output_names=["y"])
        outs.append(optimize(onnx.load(str(path)))[0])
    assert histogram(outs[0]) == histogram(outs[1])
    assert "BatchNormalization" not in histogram(outs[0])
    assert_matches_torch(outs[0], model, shape)


def test_dynamo_unoptimized_wide_conv(tmp_path):
    pytest.importorskip("torch")
    import torch
    from torch import nn
    from torch_export import quiet

    block = nn.Sequential(nn.Conv2d(4, 1100, 1, bias=False), nn.BatchNorm2d(1100)).eval()
    with quiet():
        torch.onnx.export(block, (torch.randn(1, 4, 4, 4),), str(tmp_path / "m.onnx"), dynamo=True, optimize=False)
    out, report = optimize(onnx.load(str(tmp_path / "m.onnx")))
    assert histogram(out) == {"Conv": 1}, report.to_dict()["passes"]
