"""The pruning passes on hand-built graphs: ``dead-channels`` (all-zero output channels, ResRep) and
``identical-filters`` (equal output channels, C-SGD).

Every positive case checks that channels were actually dropped (the source's weight shape) and
that onnxruntime, with its own optimizations off, computes the same outputs at float32 tolerance;
every negative case names the exactness condition that must decline it and checks that nothing
changed. Property tests draw random layers, steps and consumers.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxrep
from graphs import Builder, examples, run
from onnxrep import algebra

DEAD, SAME = "dead-channels", "identical-filters"
REL = 1e-5


def assert_same(a, b, feeds):
    for ya, yb in zip(run(a, feeds), run(b, feeds)):
        assert ya.shape == yb.shape
        scale = max(1.0, float(np.max(np.abs(ya))))
        assert np.max(np.abs(ya - yb)) <= REL * scale


def optimize(model, passes=(DEAD,), **kw):
    return onnxrep.optimize(model, passes=list(passes), **kw)


def skips(report, name):
    return next(p for p in report.passes if p.name == name).skipped


def rewrites(report, name):
    return next(p for p in report.passes if p.name == name).rewrites


def weight_of(model, reading):
    """The weight of the node that reads tensor ``reading`` (first input)."""
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.input and n.input[0] == reading and n.op_type in ("Conv", "Gemm", "MatMul"))
    return list(inits[node.input[1]].dims)


def widths(model):
    """Output channels of every Conv, in graph order."""
    inits = {i.name: i for i in model.graph.initializer}
    return [inits[n.input[1]].dims[0] for n in model.graph.node if n.op_type == "Conv"]


def dead_source(b, cin, cout, dead, kernel=1, bias=None, **conv):
    """A Conv from ``x`` whose output channels ``dead`` have zero weights, with bias ``bias``
    (None: no bias input); ``conv``: its attributes (default pads keep the size)."""
    w = b.weight(cout, cin, kernel)
    w[list(dead)] = 0
    inputs = ["x", b.const(w, "w")] + ([] if bias is None else [b.const(bias, "b")])
    conv.setdefault("pads", [(kernel - 1) // 2] * 4)
    return b.node("Conv", inputs, kernel_shape=[kernel] * 2, **conv)


# --------------------------------------------------------------------------------------------
# algebra
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel,dilation", [(1, 1), (3, 1), (3, 2), (2, 1)])
def test_fold_constant_inputs_matches_direct_convolution(kernel, dilation):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 9, 9))
    v = np.array([0.0, 1.5, 0.0, -2.0, 0.0])
    const = v != 0
    x[:, const] = v[const][None, :, None, None]
    w, b = rng.standard_normal((4, 5, kernel, kernel)), rng.standard_normal(4)
    ref = __import__("graphs").conv_ref(x, w, b, dilations=(dilation,) * 2)
    bias = algebra.fold_constant_inputs(w, b, np.where(const, v, 0))
    got = __import__("graphs").conv_ref(x[:, ~const], w[:, ~const], bias, dilations=(dilation,) * 2)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    # a linear layer (K, N): features on axis 0
    wl = rng.standard_normal((5, 3))
    xl = np.where(const, v, rng.standard_normal((6, 5)))
    bl = algebra.fold_constant_inputs(wl, np.zeros(3), np.where(const, v, 0), axis=0)
    np.testing.assert_allclose(xl[:, ~const] @ wl[~const] + bl, xl @ wl, rtol=1e-12, atol=1e-12)


def test_merge_input_channels_matches_direct_convolution():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 7, 7))
    x[:, 3] = x[:, 1]  # channel 3 equals channel 1
    w = rng.standard_normal((2, 4, 3, 3))
    conv_ref = __import__("graphs").conv_ref
    ref = conv_ref(x, w, pads=(1, 1, 1, 1))
    merged = algebra.merge_input_channels(w, [0, 1, 2, 1])
    got = conv_ref(x[:, :3], merged[:, :3], pads=(1, 1, 1, 1))
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_depthwise_constant_matches_direct_convolution():
    rng = np.random.default_rng(2)
    v = np.array([0.5, -1.0, 2.0])
    x = np.broadcast_to(v[None, :, None, None], (1, 3, 6, 6)).copy()
    w, b = rng.standard_normal((3, 1, 3, 3)), rng.standard_normal(3)
    y = __import__("graphs").conv_ref(x, w, b, groups=3)  # no padding: one value per channel
    np.testing.assert_allclose(y[0, :, 0, 0], algebra.depthwise_constant(w, b, v), rtol=1e-12)
    assert np.allclose(y, y[:, :, :1, :1])


# --------------------------------------------------------------------------------------------
# dead channels: positive cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src_kernel,stride,dilation,consumer_kernel,consumer_pads,consumer_dilation,with_bias",
    [
        (1, 1, 1, 1, 0, 1, True),
        (3, 1, 1, 3, 0, 1, True),
        (3, 2, 1, 3, 0, 2, True),
        (3, 1, 2, 1, 0, 1, False),
        (1, 1, 1, 3, 1, 1, False),  # zero bias: dropped even where the consumer pads
        (3, 1, 1, 5, 2, 1, False),
        (2, 1, 1, 2, 0, 1, True),
    ],
)
def test_dead_channels_dropped(src_kernel, stride, dilation, consumer_kernel, consumer_pads, consumer_dilation, with_bias):
    b = Builder(channels=3, spatial=(11, 11))
    dead = [0, 4, 5]
    bias = np.where(np.isin(np.arange(7), dead), 0.0, 0.3) + np.arange(7) * 0.1 if with_bias else None
    if bias is not None and consumer_pads:
        bias[dead] = 0
    y = dead_source(b, 3, 7, dead, kernel=src_kernel, bias=bias, strides=[stride] * 2, dilations=[dilation] * 2,
                    pads=[0] * 4 if src_kernel == 2 else [dilation * (src_kernel - 1) // 2] * 4)
    z = b.conv(y, 7, 5, kernel=consumer_kernel, pads=[consumer_pads] * 4, dilation=consumer_dilation)
    m = b.model(z)
    out, rep = optimize(m)
    assert widths(out)[0] == 4
    assert weight_of(out, "x")[0] == 4
    assert rewrites(rep, DEAD)[0]["details"]["channels"] == [7, 4]
    assert rep.cost_after.macs < rep.cost_before.macs
    assert_same(m, out, b.feeds())


def test_nonzero_constant_folded_into_unpadded_consumer_and_kept_at_padded_one():
    b = Builder(channels=3, spatial=(8, 8))
    bias = np.array([0.5, 0.0, -0.7, 0.2, 0.0, 0.9])
    y = dead_source(b, 3, 6, [0, 1, 2], bias=bias)
    z1 = b.conv(y, 6, 4, kernel=1)  # reads every dead channel's constant: folded into its bias
    m = b.model(z1)
    out, rep = optimize(m)
    assert widths(out) == [3, 4]
    assert_same(m, out, b.feeds())

    b = Builder(channels=3, spatial=(8, 8))
    y = dead_source(b, 3, 6, [0, 1, 2], bias=bias)
    z2 = b.conv(y, 6, 4, kernel=3, pads=[1, 1, 1, 1])  # zero-pads: channels 0 and 2 (constant != 0) stay
    m = b.model(z2)
    out, rep = optimize(m)
    assert widths(out) == [5, 4]
    assert "1" in rewrites(rep, DEAD)[0]["summary"]
    assert_same(m, out, b.feeds())


def test_border_declines_when_every_dead_channel_is_nonzero_at_a_padded_consumer():
    b = Builder(channels=3, spatial=(8, 8))
    y = dead_source(b, 3, 6, [2], bias=np.full(6, 0.4))
    m = b.model(b.conv(y, 6, 4, kernel=3, pads=[1, 1, 1, 1]))
    out, rep = optimize(m)
    assert widths(out) == [6, 4]
    assert list(skips(rep, DEAD).values())[0].startswith("border:")
    assert_same(m, out, b.feeds())


STEPS = [
    "bn", "relu", "sigmoid", "silu", "prelu", "hardswish", "clip", "leakyrelu", "gelu_erf", "mul_const",
    "sub_const_first", "maxpool", "avgpool_exclude_pad", "avgpool_include_pad", "depthwise", "depthwise_padded",
    "concat", "cast_roundtrip",
]


def apply_step(b: Builder, y: str, c: int, step: str) -> str:
    if step == "bn":
        return b.bn(y, c)
    if step == "relu":
        return b.relu(y)
    if step == "sigmoid":
        return b.node("Sigmoid", [y])
    if step == "silu":
        return b.node("Mul", [y, b.node("Sigmoid", [y])])
    if step == "prelu":
        return b.node("PRelu", [y, b.const(b.rng.uniform(0.1, 0.3, (c, 1, 1)), "slope")])
    if step == "hardswish":
        return b.node("HardSwish", [y])
    if step == "clip":
        return b.node("Clip", [y, b.const(np.array(-0.2), "lo"), b.const(np.array(0.25), "hi")])
    if step == "leakyrelu":
        return b.node("LeakyRelu", [y], alpha=0.2)
    if step == "gelu_erf":  # TorchScript's GELU: x * (erf(x / sqrt 2) + 1) * 0.5
        e = b.node("Erf", [b.node("Div", [y, b.const(np.array(np.sqrt(2.0)), "d")])])
        return b.node("Mul", [b.node("Mul", [y, b.node("Add", [e, b.const(np.array(1.0), "one")])]), b.const(np.array(0.5), "h")])
    if step == "mul_const":
        return b.mul_const(y, b.rng.uniform(0.5, 1.5, (1, c, 1, 1)))
    if step == "sub_const_first":
        return b.node("Sub", [b.const(b.rng.standard_normal((c, 1, 1)) * 0.1, "t"), y])
    if step == "maxpool":
        return b.node("MaxPool", [y], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    if step == "avgpool_exclude_pad":
        return b.avgpool(y, 3, pads=[1, 1, 1, 1], count_include_pad=0)
    if step == "avgpool_include_pad":
        return b.avgpool(y, 3, pads=[1, 1, 1, 1], count_include_pad=1)
    if step in ("depthwise", "depthwise_padded"):
        return b.conv(y, c, c, kernel=3, groups=c, pads=[1] * 4 if step == "depthwise_padded" else [0] * 4)
    if step == "concat":
        other = b.conv("x", b.channels, 2, kernel=1)
        return b.node("Concat", [other, y], axis=1)
    if step == "cast_roundtrip":
        return b.node("Cast", [b.node("Cast", [y], to=10)], to=1)
    raise ValueError(step)


def step_width(step: str, c: int) -> int:
    return c + 2 if step == "concat" else c


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("zero_bias", [True, False])
def test_dead_channels_followed_through(step, zero_bias):
    b = Builder(channels=3, spatial=(9, 9))
    bias = np.linspace(-0.5, 0.5, 6)
    dead = [1, 4]
    if zero_bias:
        bias[dead] = 0
    y = dead_source(b, 3, 6, dead, bias=bias)
    y = apply_step(b, y, 6, step)
    z = b.conv(y, step_width(step, 6), 4, kernel=1)  # unpadded consumer: every dead channel folds
    m = b.model(z)
    out, rep = optimize(m)
    padded_step = step in ("avgpool_include_pad", "depthwise_padded")
    if padded_step and not zero_bias:
        assert list(skips(rep, DEAD).values())[0].startswith("border:")
    else:
        assert rewrites(rep, DEAD), skips(rep, DEAD)
        if step != "concat":  # there the other input's conv reads x first
            assert weight_of(out, "x")[0] == 4
        assert rewrites(rep, DEAD)[0]["details"]["channels"] == [6, 4]
    assert_same(m, out, b.feeds())


def test_dead_channels_into_a_classifier_head():
    """GlobalAveragePool -> Flatten -> Gemm: the constant folds into the Gemm's bias."""
    b = Builder(channels=3, spatial=(7, 7))
    y = b.relu(dead_source(b, 3, 8, [0, 3, 7], bias=np.linspace(0.1, 0.8, 8)))
    f = b.node("Flatten", [b.node("GlobalAveragePool", [y])], axis=1)
    z = b.node("Gemm", [f, b.const(b.rng.standard_normal((5, 8)), "fc"), b.const(b.rng.standard_normal(5), "fcb")], transB=1, alpha=0.5, beta=2.0)
    m = b.model(z)
    out, rep = optimize(m)
    assert weight_of(out, "x")[0] == 5
    assert_same(m, out, b.feeds())


def test_dead_channels_reshape_head():
    b = Builder(channels=3, spatial=(5, 5))
    y = dead_source(b, 3, 6, [2], bias=np.linspace(0.1, 0.6, 6))
    f = b.node("Reshape", [b.node("GlobalAveragePool", [y]), b.const_int([1, -1])])
    z = b.node("MatMul", [f, b.const(b.rng.standard_normal((6, 4)), "fc")])
    m = b.model(z)
    out, rep = optimize(m)
    assert weight_of(out, "x")[0] == 5
    assert_same(m, out, b.feeds())


def linear_model(dead=(), equal=(), rank=2, act="Relu", k=6, n=8, m_out=5, seed=0):
    """x (rank 2: [4, k]; rank 3: [2, 3, k]) -> linear (k -> n) -> act -> linear (n -> m_out)."""
    shape = [4, k] if rank == 2 else [2, 3, k]
    b = Builder(input_shape=shape, seed=seed)
    w1 = b.rng.standard_normal((k, n))
    b1 = b.rng.standard_normal(n) * 0.2
    for d in dead:
        w1[:, d] = 0
    for c, d in equal:
        w1[:, d], b1[d] = w1[:, c], b1[c]
    if rank == 2:
        h = b.node("Gemm", ["x", b.const(w1.T, "w1"), b.const(b1, "b1")], transB=1)
    else:
        h = b.node("Add", [b.node("MatMul", ["x", b.const(w1, "w1")]), b.const(b1, "b1")])
    h = b.node(act, [h])
    w2 = b.const(b.rng.standard_normal((n, m_out)), "w2")
    y = b.node("Gemm", [h, w2, b.const(np.ones(m_out), "b2")]) if rank == 2 else b.node("MatMul", [h, w2])
    return b, b.model(y)


@pytest.mark.parametrize("rank", [2, 3])
def test_dead_hidden_units_of_an_mlp(rank):
    b, m = linear_model(dead=(1, 6), rank=rank)
    out, rep = optimize(m)
    assert rewrites(rep, DEAD)[0]["details"]["channels"] == [8, 6]
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal([4, 6] if rank == 2 else [2, 3, 6]).astype(np.float32)}
    assert_same(m, out, feeds)


# --------------------------------------------------------------------------------------------
# dead channels: one negative case per exactness condition
# --------------------------------------------------------------------------------------------


def assert_declined(m, b, condition, passes=(DEAD,), **kw):
    out, rep = optimize(m, passes=passes, **kw)
    reasons = list(skips(rep, passes[0]).values())
    assert reasons and reasons[0].startswith(condition + ":"), reasons
    assert not rewrites(rep, passes[0])
    assert widths(out) == widths(m)
    assert_same(m, out, b.feeds())
    return reasons[0]


def test_source_grouped_conv_declined():
    b = Builder(channels=4, spatial=(6, 6))
    w = b.weight(4, 2, 1)
    w[1] = 0
    y = b.conv("x", 4, 4, kernel=1, groups=2, w=w, bias=False)
    m = b.model(b.conv(y, 4, 3, kernel=1))
    assert_declined(m, b, "source")


def test_channel_reaching_a_graph_output_kept():
    b = Builder(channels=3, spatial=(6, 6))
    y = b.relu(dead_source(b, 3, 6, [1]))
    z = b.conv(y, 6, 4, kernel=1)
    m = b.model(z, y)
    assert_declined(m, b, "graph_output")


def test_residual_with_one_live_side_kept():
    b = Builder(channels=6, spatial=(6, 6))
    y = dead_source(b, 6, 6, [2], bias=np.zeros(6))
    r = b.relu(b.add(y, "x"))  # channel 2 of the sum is x's channel 2: alive
    m = b.model(b.conv(r, 6, 4, kernel=1))
    assert "residual" in assert_declined(m, b, "outside_operand")


def test_residual_fed_back_by_a_consumer_kept():
    b = Builder(channels=3, spatial=(6, 6))
    y = b.relu(dead_source(b, 3, 6, [2], bias=np.zeros(6)))
    r = b.add(y, b.conv(y, 6, 6, kernel=1))
    m = b.model(b.conv(r, 6, 4, kernel=1))
    assert_declined(m, b, "outside_operand")


def test_split_stops_the_flow():
    b = Builder(channels=3, spatial=(6, 6))
    y = dead_source(b, 3, 6, [0])
    s1 = b.node("Split", [y, b.const_int([3, 3])], n_out=2, axis=1)
    m = b.model(b.conv(s1, 3, 2, kernel=1))
    assert_declined(m, b, "followed")


def test_grouped_consumer_declined():
    b = Builder(channels=3, spatial=(6, 6))
    y = dead_source(b, 3, 6, [0])
    m = b.model(b.conv(y, 6, 4, kernel=1, groups=2))
    assert_declined(m, b, "grouped")


def test_consumer_with_runtime_weights_declined():
    b = Builder(channels=3, spatial=(6, 6))
    b.inputs.append(__import__("onnx").helper.make_tensor_value_info("w", b.elem, [4, 6, 1, 1]))
    y = dead_source(b, 3, 6, [0])
    z = b.node("Conv", [y, "w"])
    m = b.model(z)
    out, rep = optimize(m)
    reasons = list(skips(rep, DEAD).values())
    assert reasons[0].startswith("constant_weights:")


def test_non_per_channel_constant_declined():
    b = Builder(channels=3, spatial=(6, 6))
    y = dead_source(b, 3, 6, [0])
    y = b.mul_const(y, b.rng.standard_normal((1, 6, 6, 6)))  # varies over space
    m = b.model(b.conv(y, 6, 4, kernel=1))
    assert_declined(m, b, "per_channel")


def test_unknown_channel_count_at_concat_declined():
    b = Builder(input_shape=[1, 3, 6, 6])
    b.inputs.append(__import__("onnx").helper.make_tensor_value_info("e", b.elem, [1, "C", 6, 6]))
    y = dead_source(b, 3, 6, [0])
    cat = b.node("Concat", ["e", y], axis=1)
    m = b.model(b.relu(cat))
    out, rep = optimize(m)
    reasons = list(skips(rep, DEAD).values())
    assert reasons[0].startswith("static_shapes:") or reasons[0].startswith("followed:"), reasons


def test_every_channel_dead_declined():
    b = Builder(channels=3, spatial=(6, 6))
    y = dead_source(b, 3, 4, [0, 1, 2, 3])
    m = b.model(b.conv(y, 4, 2, kernel=1))
    assert_declined(m, b, "keeps_one")


def test_transpose_reader_declined():
    b = Builder(channels=3, spatial=(6, 6))
    y = dead_source(b, 3, 6, [0])
    m = b.model(b.node("Transpose", [y], perm=[0, 2, 3, 1]))
    assert_declined(m, b, "graph_output" if False else "followed")


# --------------------------------------------------------------------------------------------
# identical filters
# --------------------------------------------------------------------------------------------


def same_source(b, cin, cout, clusters, kernel=1, bias=True):
    """A Conv whose output channels in each cluster (a list of channel lists) are equal."""
    w = b.weight(cout, cin, kernel)
    bias_v = b.rng.standard_normal(cout) * 0.1
    for cl in clusters:
        w[cl[1:]] = w[cl[0]]
        bias_v[cl[1:]] = bias_v[cl[0]]
    inputs = ["x", b.const(w, "w")] + ([b.const(bias_v, "b")] if bias else [])
    return b.node("Conv", inputs, kernel_shape=[kernel] * 2, pads=[(kernel - 1) // 2] * 4)


def test_identical_filters_merged_before_a_padded_3x3():
    b = Builder(channels=3, spatial=(8, 8))
    y = b.relu(same_source(b, 3, 8, [[0, 3, 5], [2, 7]], kernel=3))
    m = b.model(b.conv(y, 8, 4, kernel=3, pads=[1, 1, 1, 1]))
    out, rep = optimize(m, passes=(SAME,))
    assert widths(out) == [5, 4]
    assert rewrites(rep, SAME)[0]["details"]["channels"] == [8, 5]
    assert_same(m, out, b.feeds())


@pytest.mark.parametrize("consumer_kernel", [1, 3])
def test_identical_filters_feeding_two_consumers(consumer_kernel):
    b = Builder(channels=3, spatial=(8, 8))
    y = b.relu(same_source(b, 3, 6, [[1, 4]]))
    z1 = b.conv(y, 6, 3, kernel=1)
    z2 = b.conv(y, 6, 3, kernel=consumer_kernel)
    m = b.model(b.add(z1, z2))
    out, rep = optimize(m, passes=(SAME,))
    assert widths(out)[0] == 5
    assert_same(m, out, b.feeds())


def test_downstream_parameters_split_clusters():
    b = Builder(channels=3, spatial=(6, 6))
    y = same_source(b, 3, 6, [[0, 1], [2, 3]])
    scale = np.ones((1, 6, 1, 1))
    scale[0, 1] = 2.0  # channel 1 is scaled differently from channel 0: that pair is split
    y = b.mul_const(y, scale)
    m = b.model(b.conv(y, 6, 4, kernel=1))
    out, rep = optimize(m, passes=(SAME,))
    assert widths(out)[0] == 5
    assert_same(m, out, b.feeds())

    b = Builder(channels=3, spatial=(6, 6))
    y = same_source(b, 3, 6, [[0, 1]])
    scale = np.ones((1, 6, 1, 1))
    scale[0, 1] = 2.0
    m = b.model(b.conv(b.mul_const(y, scale), 6, 4, kernel=1))
    assert_declined(m, b, "downstream_equal", passes=(SAME,))


def test_identical_filters_through_depthwise_and_bn():
    b = Builder(channels=3, spatial=(8, 8))
    y = same_source(b, 3, 4, [[0, 2]])
    dw = b.weight(4, 1, 3)
    dw[2] = dw[0]
    y = b.conv(y, 4, 4, kernel=3, groups=4, w=dw, bias=False)
    bn = b.bn_params(4)
    for p in bn:
        p[2] = p[0]
    y = b.node("BatchNormalization", [y] + [b.const(p, "bn") for p in bn], epsilon=1e-5)
    m = b.model(b.conv(b.relu(y), 4, 3, kernel=3))
    out, rep = optimize(m, passes=(SAME,))
    assert widths(out) == [3, 3, 3]
    assert_same(m, out, b.feeds())


def test_identical_filters_tolerance_is_opt_in():
    b = Builder(channels=3, spatial=(6, 6))
    w = b.weight(4, 3, 1)
    w[3] = w[1] + 1e-4
    y = b.conv("x", 3, 4, kernel=1, w=w, bias=False)
    m = b.model(b.conv(y, 4, 2, kernel=1))
    out, rep = optimize(m, passes=(SAME,))
    assert widths(out) == [4, 2] and not rewrites(rep, SAME)
    out, rep = onnxrep.optimize(m, passes=[SAME], tolerance=1e-3)
    assert widths(out) == [3, 2]


def test_identical_hidden_units_of_an_mlp():
    b, m = linear_model(equal=((0, 3), (0, 5)), rank=3, act="Sigmoid")
    out, rep = optimize(m, passes=(SAME,))
    assert rewrites(rep, SAME)[0]["details"]["channels"] == [8, 6]
    feeds = {"x": np.random.default_rng(4).standard_normal([2, 3, 6]).astype(np.float32)}
    assert_same(m, out, feeds)


def test_identical_channel_reaching_a_graph_output_kept():
    b = Builder(channels=3, spatial=(6, 6))
    y = same_source(b, 3, 4, [[0, 1]])
    m = b.model(b.conv(y, 4, 2, kernel=1), y)
    assert_declined(m, b, "graph_output", passes=(SAME,))


# --------------------------------------------------------------------------------------------
# pipeline behaviour
# --------------------------------------------------------------------------------------------


def test_resrep_layer_pruned_by_the_default_pipeline():
    """conv -> BN -> compactor with zero rows -> ReLU -> padded 3x3: the folds of the other passes
    first, then the dead channels go; optimizing again changes nothing."""
    b = Builder(channels=4, spatial=(8, 8))
    y = b.bn(b.conv("x", 4, 8, kernel=3), 8)
    p = b.rng.standard_normal((8, 8, 1, 1))
    p[[1, 2, 6]] = 0
    y = b.relu(b.conv(y, 8, 8, kernel=1, w=p, bias=False))
    m = b.model(b.conv(y, 8, 5, kernel=3))
    out, rep = onnxrep.optimize(m, verify=True)
    assert widths(out) == [5, 5]
    assert rep.cost_after.params < rep.cost_before.params
    again, rep2 = onnxrep.optimize(out)
    assert rep2.rewritten == 0


# --------------------------------------------------------------------------------------------
# property tests
# --------------------------------------------------------------------------------------------

PROPERTY_STEPS = ["bn", "relu", "sigmoid", "depthwise", "depthwise_padded", "maxpool", "avgpool_include_pad", "mul_const"]


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    src_kernel=st.sampled_from([1, 2, 3]),
    stride=st.sampled_from([1, 2]),
    dilation=st.sampled_from([1, 2]),
    cout=st.integers(2, 7),
    dead=st.sets(st.integers(0, 6), max_size=6),
    zero_bias=st.booleans(),
    steps=st.lists(st.sampled_from(PROPERTY_STEPS), max_size=3),
    consumer_kernel=st.sampled_from([1, 2, 3]),
    consumer_pad=st.sampled_from([0, 1]),
    consumer_stride=st.sampled_from([1, 2]),
    seed=st.integers(0, 1000),
)
def test_random_dead_channels_exact(src_kernel, stride, dilation, cout, dead, zero_bias, steps, consumer_kernel,
                                      consumer_pad, consumer_stride, seed):
    b = Builder(channels=3, spatial=(21, 21), seed=seed)  # room for stride 2 and three unpadded 3x3 steps
    dead = [d for d in dead if d < cout]
    bias = b.rng.standard_normal(cout) * 0.5
    if zero_bias:
        bias[dead] = 0
    y = dead_source(b, 3, cout, dead, kernel=src_kernel, bias=bias, strides=[stride] * 2, dilations=[dilation] * 2,
                    pads=[0] * 4 if src_kernel == 2 else [dilation * (src_kernel - 1) // 2] * 4)
    for s in steps:
        y = apply_step(b, y, cout, s)
    z = b.conv(y, cout, 3, kernel=consumer_kernel, stride=consumer_stride, pads=[consumer_pad] * 4)
    m = b.model(z)
    # the property is pruning's: onnxruntime may run these 1-3 channel convs with more layout
    # reorders once pruned (NCHWc or not), which the engine's kernel count would refuse
    # (tests/test_kernels.py); the pass itself never adds MACs or weights
    out, rep = optimize(m, allow_cost_increase=True)
    assert_same(m, out, b.feeds())
    assert rep.cost_after.macs <= rep.cost_before.macs and rep.cost_after.params <= rep.cost_before.params
    # no zero padding read anywhere: every dead channel goes, whatever constant it holds
    unpadded = not consumer_pad and not any("padded" in s or "include_pad" in s for s in steps)
    if 0 < len(dead) < cout and unpadded:
        assert weight_of(out, "x")[0] == cout - len(dead), rep.to_dict()["passes"]
    # zero bias and steps that keep 0 at 0: dropped even where the consumer pads
    if 0 < len(dead) < cout and zero_bias and set(steps) <= {"relu", "maxpool", "avgpool_include_pad", "mul_const"}:
        assert weight_of(out, "x")[0] == cout - len(dead), rep.to_dict()["passes"]


@settings(max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cout=st.integers(2, 7),
    labels=st.lists(st.integers(0, 3), min_size=7, max_size=7),
    steps=st.lists(st.sampled_from(["relu", "sigmoid", "maxpool", "avgpool_include_pad", "silu"]), max_size=3),
    consumer_kernel=st.sampled_from([1, 3]),
    consumer_pad=st.sampled_from([0, 1]),
    seed=st.integers(0, 1000),
)
def test_random_identical_filters_exact(cout, labels, steps, consumer_kernel, consumer_pad, seed):
    b = Builder(channels=3, spatial=(7, 7), seed=seed)
    labels = labels[:cout]
    clusters = [[c for c in range(cout) if labels[c] == lab] for lab in sorted(set(labels))]
    y = same_source(b, 3, cout, clusters, kernel=3)
    for s in steps:
        y = apply_step(b, y, cout, s)
    m = b.model(b.conv(y, cout, 3, kernel=consumer_kernel, pads=[consumer_pad] * 4))
    out, rep = optimize(m, passes=(SAME,))
    assert_same(m, out, b.feeds())
    assert weight_of(out, "x")[0] == len(clusters)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def test_cli_lists_pruned_layers_and_takes_a_tolerance(tmp_path):
    import json

    import onnx
    from click.testing import CliRunner

    from onnxrep import cli

    b = Builder(channels=3, spatial=(6, 6))
    w = b.weight(6, 3, 1)
    w[2] = 0
    w[4] = w[1] + 1e-4  # nearly equal to channel 1
    y = b.relu(b.conv("x", 3, 6, kernel=1, w=w, bias=False))
    m = b.model(b.conv(y, 6, 2, kernel=1))
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    run_cli = lambda *a: CliRunner().invoke(cli.main, [str(v) for v in a], catch_exceptions=False)  # noqa: E731

    res = run_cli("optimize", src, "-o", tmp_path / "a.onnx", "--report", tmp_path / "a.json")
    assert res.exit_code == 0, res.output
    assert "pruned layer" in res.output and "6 -> 5" in res.output
    report = json.loads((tmp_path / "a.json").read_text())
    dead = next(p for p in report["passes"] if p["name"] == DEAD)
    assert dead["rewrites"][0]["details"]["channels"] == [6, 5]
    assert widths(onnx.load(tmp_path / "a.onnx")) == [5, 2]

    res = run_cli("optimize", src, "-o", tmp_path / "b.onnx", "--tolerance", "1e-3", "--no-verify")
    assert res.exit_code == 0, res.output
    assert widths(onnx.load(tmp_path / "b.onnx")) == [4, 2]

    res = run_cli("optimize", src, "-o", tmp_path / "c.onnx", "--tolerance", "-1")
    assert res.exit_code != 0 and not (tmp_path / "c.onnx").exists()


# --------------------------------------------------------------------------------------------
# regressions: each of these once gave wrong values or a bigger model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("passes", [(DEAD,), (SAME,), ("affine-fold",)])
def test_batchnorm_with_statistics_outputs_is_training_mode(passes):
    """Before opset 14 a BatchNormalization with five outputs normalizes with the batch's
    statistics, whether or not the extra outputs are read."""
    b = Builder(channels=3, spatial=(7, 7), batch=2, opset=12)
    w = b.weight(6, 3, 1)
    w[1] = 0
    w[4] = w[2]
    y = b.node("Conv", ["x", b.const(w), b.const(np.r_[0.1, 0.2, 0.3, 0.4, 0.3, 0.6])], kernel_shape=[1, 1])
    bn = b.bn_params(6)
    for p in bn:
        p[4] = p[2]
    y = b.node("BatchNormalization", [y] + [b.const(p) for p in bn], n_out=5, epsilon=1e-5)
    m = b.model(b.conv(y, 6, 4, kernel=1, pads=[0] * 4))
    out, rep = optimize(m, passes=passes)
    assert rep.rewritten == 0
    assert any("training mode" in r for p in rep.passes for r in p.skipped.values())
    assert_same(m, out, b.feeds())


@pytest.mark.parametrize("op,extra", [("AveragePool", {"count_include_pad": 0}), ("MaxPool", {})])
def test_pooling_window_inside_the_padding_alone(op, extra):
    """Dilation 3 and pads 1 on an axis of 2: the first window reads rows -1 and 2, padding only."""
    b = Builder(channels=3, spatial=(2, 6), opset=19)
    w = b.weight(4, 3, 1)
    w[1] = 0
    y = b.node("Conv", ["x", b.const(w), b.const(np.array([0.1, 2.0, -0.3, 0.4]))], kernel_shape=[1, 1])
    p = b.node(op, [y], kernel_shape=[2, 1], dilations=[3, 1], pads=[1, 0, 1, 0], **extra)
    m = b.model(b.node("Conv", [p, b.const(np.full((2, 4, 1, 1), 0.5))], kernel_shape=[1, 1]))
    out, rep = optimize(m)
    assert weight_of(out, "x")[0] == 4
    feeds = b.feeds()  # MaxPool gives the lowest float there: compare exactly, infinities included
    np.testing.assert_array_equal(run(m, feeds)[0], run(out, feeds)[0])


NONFINITE = {
    "clip_without_max": (np.inf, lambda b, y: b.node("Clip", [y, b.const(np.array(0.0))])),
    "global_max_pool": (-np.inf, lambda b, y: b.node("GlobalMaxPool", [y])),
    "padded_max_pool": (-np.inf, lambda b, y: b.node("MaxPool", [y], kernel_shape=[3, 3], pads=[1, 1, 1, 1])),
    "exp_overflow": (89.0, lambda b, y: b.node("Exp", [y])),
    "nan": (np.nan, lambda b, y: b.relu(y)),
}


@pytest.mark.parametrize("case", list(NONFINITE))
def test_constants_beyond_the_type_keep_their_channel(case):
    bias1, step = NONFINITE[case]
    b = Builder(channels=3, spatial=(4, 4))
    w = b.weight(4, 3, 1)
    w[1] = 0
    y = b.node("Conv", ["x", b.const(w), b.const(np.array([0.1, bias1, -0.3, 0.4]))], kernel_shape=[1, 1])
    m = b.model(b.node("Conv", [step(b, y), b.const(np.full((2, 4, 1, 1), 0.5))], kernel_shape=[1, 1]))
    out, rep = optimize(m)
    assert weight_of(out, "x")[0] == 4
    feeds = b.feeds()
    np.testing.assert_array_equal(run(m, feeds)[0], run(out, feeds)[0])


def test_gemm_with_beta_zero_ignores_its_bias():
    b = Builder(input_shape=[4, 8])
    w = b.rng.standard_normal((8, 6))
    w[:, 1] = 0
    c = b.rng.standard_normal(6)
    c[4] = np.inf  # never read: beta = 0
    y = b.node("Gemm", ["x", b.const(w), b.const(c)], beta=0.0)
    m = b.model(b.node("Gemm", [y, b.const(b.rng.standard_normal((6, 3)))]))
    out, rep = optimize(m)
    assert rewrites(rep, DEAD)
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)}
    assert np.all(np.isfinite(run(out, feeds)[0]))
    assert_same(m, out, feeds)


@pytest.mark.parametrize("passes", [(DEAD,), (SAME,)])
def test_concat_reached_late_by_a_second_path_is_not_duplicated(passes):
    """Concat(sigmoid(relu(y)), y): the Concat takes the channels twice; it must be declined, not
    rewritten with the old source kept alive beside the new one."""
    b = Builder(channels=3, spatial=(7, 7))
    w = b.weight(6, 3, 1)
    w[1] = 0
    w[5] = w[3]
    y = b.node("Conv", ["x", b.const(w), b.const(np.r_[0.1, 0.0, 0.3, 0.4, 0.5, 0.4])], kernel_shape=[1, 1])
    s = b.node("Sigmoid", [b.node("Relu", [y])])
    m = b.model(b.conv(b.node("Concat", [s, y], axis=1), 12, 4, kernel=1, pads=[0] * 4))
    out, rep = optimize(m, passes=passes)
    assert rep.cost_after.macs <= rep.cost_before.macs and rep.cost_after.params <= rep.cost_before.params
    assert widths(out) == widths(m)
    assert_same(m, out, b.feeds())


def test_cast_after_a_pruned_region_still_followed():
    """The tensors a rewrite creates keep their dtype, so a Cast on them is followed next round."""
    b = Builder(channels=3, spatial=(6, 6))
    w = b.weight(6, 3, 1)
    w[0] = 0
    w[5] = w[2]
    y = b.node("Conv", ["x", b.const(w), b.const(np.r_[0.0, 0.1, 0.2, 0.3, 0.4, 0.2])], kernel_shape=[1, 1])
    y = b.node("Cast", [b.node("Cast", [b.relu(y)], to=10)], to=1)
    m = b.model(b.conv(y, 6, 3, kernel=1, pads=[0] * 4))
    out, rep = optimize(m, passes=(DEAD, SAME))
    assert weight_of(out, "x")[0] == 4
    assert_same(m, out, b.feeds())
