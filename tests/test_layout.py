"""NHWC layout spellings (tf2onnx, jax2onnx, Keras exports): Transposes around every conv, one per
branch or shared, BN written as Mul/Add/Sub by constants on the last axis. normalize-layout
de-duplicates, cancels and sinks the Transposes so that the block folds to one Conv, as its NCHW
spelling does. Positives compare op histograms with the NCHW block and outputs in onnxruntime;
negatives name the condition that declines."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxrep
from graphs import Builder, examples, histogram, run

C, H, W = 4, 6, 7
TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]
EPS = 1e-5


def optimize(model, **kw):
    out, report = onnxrep.optimize(model, **kw)
    onnx.checker.check_model(out)
    return out, report


def assert_equivalent(a, b, feeds, rtol=1e-5, atol=1e-6):
    """Equal outputs on the feeds and on the feeds times 100 (atol scaled with the inputs)."""
    for scale in (1.0, 100.0):
        scaled = {k: (v * scale).astype(v.dtype) for k, v in feeds.items()}
        for x, y in zip(run(a, scaled), run(b, scaled)):
            np.testing.assert_allclose(y, x, rtol=rtol, atol=atol * scale)


def layout(report, key="skips"):
    return [s["reason"] if key == "skips" else s["summary"]
            for p in report.to_dict()["passes"] if p["name"] == "normalize-layout" for s in p[key]]


def nhwc_builder(seed=0):
    return Builder(C, seed=seed, input_shape=[1, H, W, C])


def bn_last_axis(b: Builder, x, style: str, shape=(C,)):
    """Inference BN on the last axis of ``x``: ``Mul(s) + Add(t)``, ``Sub(mean) * s + beta``, or
    (``wrapped``, tf2onnx's FusedBatchNorm) a BatchNormalization between its own Transposes."""
    if style == "wrapped":
        return b.node("Transpose", [b.bn(b.node("Transpose", [x], perm=TO_NCHW), C)], perm=TO_NHWC)
    gamma, beta, mean, var = b.bn_params(C)
    s = gamma / np.sqrt(var + EPS)
    if style == "muladd":
        return b.node("Add", [b.node("Mul", [x, b.const(s.reshape(shape))]), b.const((beta - mean * s).reshape(shape))])
    y = b.node("Sub", [x, b.const(mean.reshape(shape))])
    return b.node("Add", [b.node("Mul", [y, b.const(s.reshape(shape))]), b.const(beta.reshape(shape))])


def nhwc_block(b: Builder, x="x", shared=False, style="muladd", shape=(C,), identity="affine", kernels=(3, 1)):
    """A RepVGG block on the NHWC tensor ``x``: one conv branch per kernel, each
    ``Transpose -> Conv -> Transpose -> BN(last axis)``, and an identity branch; summed."""
    y = b.node("Transpose", [x], perm=TO_NCHW) if shared else None
    terms = []
    for k in kernels:
        src = y if shared else b.node("Transpose", [x], perm=TO_NCHW)
        conv = b.conv(src, C, C, k, bias=False)
        terms.append(bn_last_axis(b, b.node("Transpose", [conv], perm=TO_NHWC), style, shape))
    if identity == "affine":
        terms.append(bn_last_axis(b, x, style, shape))
    elif identity == "plain":
        terms.append(x)
    elif identity == "bn_nchw":  # BatchNormalization between Transposes (tf2onnx's FusedBatchNorm)
        src = y if shared else b.node("Transpose", [x], perm=TO_NCHW)
        terms.append(b.node("Transpose", [b.bn(src, C)], perm=TO_NHWC))
    return b.sum(terms)


def nchw_block(b: Builder, x="x", kernels=(3, 1), identity=True):
    terms = [b.bn(b.conv(x, C, C, k, bias=False), C) for k in kernels]
    if identity:
        terms.append(b.bn(x, C))
    return b.sum(terms)


FOLDED_NHWC = {"Transpose": 2, "Conv": 1, "Relu": 1}


def assert_folds(model, feeds, expected=FOLDED_NHWC):
    out, report = optimize(model)
    assert histogram(out) == expected, (histogram(out), report.to_dict()["passes"])
    assert_equivalent(model, out, feeds)
    again, rep = optimize(out)
    assert rep.rewritten == 0, rep.to_dict()["passes"]
    assert histogram(again) == histogram(out)
    return out, report


# --------------------------------------------------------------------------------------------
# positives
# --------------------------------------------------------------------------------------------


def test_nchw_block_folds_to_one_conv():
    """The reference: the NCHW spelling folds to one Conv (and the pass does nothing to it)."""
    b = Builder(C, spatial=(H, W))
    model = b.model(b.relu(nchw_block(b)))
    out, report = optimize(model)
    assert histogram(out) == {"Conv": 1, "Relu": 1}
    assert not layout(report, "rewrites")


@pytest.mark.parametrize("shared", [False, True], ids=["per_branch", "shared"])
@pytest.mark.parametrize("style,shape", [("muladd", (C,)), ("subadd", (1, 1, 1, C)), ("muladd", (1, 1, 1, C)), ("wrapped", None)])
def test_nhwc_repvgg_block_folds(shared, style, shape):
    b = nhwc_builder()
    model = b.model(b.relu(nhwc_block(b, shared=shared, style=style, shape=shape)))
    out, report = assert_folds(model, b.feeds())
    done = layout(report, "rewrites")
    assert any(("moved before Transpose" if style != "wrapped" else "cancel") in s for s in done)
    assert any("one Transpose after it" in s for s in done)
    if not shared:
        assert any("copies of Transpose" in s for s in done)


@pytest.mark.parametrize("identity", ["plain", "bn_nchw"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_branch", "shared"])
def test_nhwc_identity_spellings(identity, shared):
    b = nhwc_builder(seed=3)
    model = b.model(b.relu(nhwc_block(b, shared=shared, identity=identity)))
    assert_folds(model, b.feeds())


@pytest.mark.parametrize("order", ["x_first", "conv_first"])
def test_nhwc_residual_difference(order):
    """``x - T(Conv(T(x)))`` and ``T(Conv(T(x))) - x``: the Sub keeps its operand order."""
    b = nhwc_builder(seed=11)
    t = b.node("Transpose", [b.conv(b.node("Transpose", ["x"], perm=TO_NCHW), C, C, 3)], perm=TO_NHWC)
    diff = b.sub("x", t) if order == "x_first" else b.sub(t, "x")
    assert_folds(b.model(b.relu(diff)), b.feeds())


@pytest.mark.parametrize("spelling", ["copies", "residual", "residual_affine"])
def test_layout_rewrites_pass_their_own_region_checks(spelling):
    """Regression: dedupe re-pointed the readers of a copy at the first copy's output, and
    sink_mixed issued the chain on the existing inverse Transpose's output; neither tensor is on
    the path the original computes the rewritten tensors by, so the region cut out of the
    original read the graph input while the rewritten one read that tensor, and verification
    failed every tf2onnx export without its optimizers (and every jax2onnx residual block). The new
    nodes now read what the replaced ones read, and ``optimize(verify=True)`` checks every region."""
    b = nhwc_builder(seed=5)
    if spelling == "copies":
        y = nhwc_block(b, shared=False, identity="bn_nchw")
    else:
        x = "x" if spelling == "residual" else bn_last_axis(b, "x", "muladd")
        t = b.node("Transpose", [b.conv(b.node("Transpose", ["x"], perm=TO_NCHW), C, C, 3)], perm=TO_NHWC)
        y = b.add(x, t)
    model = b.model(b.relu(y))
    out, report = optimize(model, verify=True)
    done = layout(report, "rewrites")
    assert any(("copies of Transpose" if spelling == "copies" else "one Transpose after it") in s for s in done), done
    regions = report.to_dict()["verification"]["regions"]
    assert regions and not [r for r in regions if r["status"] == "failed"], regions
    assert histogram(out) == FOLDED_NHWC


def tf2onnx_block(b: Builder):
    """A RepVGG block as tf2onnx's optimizer leaves it: the conv branches read ``T(x)`` in NCHW (their
    BNs folded), the identity BN is ``Mul/Add`` on the NHWC input ahead of a Transpose of its own."""
    t = b.node("Transpose", ["x"], perm=TO_NCHW)
    terms = [b.conv(t, C, C, k) for k in (3, 1)]
    terms.append(b.node("Transpose", [bn_last_axis(b, "x", "muladd")], perm=TO_NCHW))
    return b.node("Transpose", [b.relu(b.sum(terms))], perm=TO_NHWC)


def test_identity_affine_ahead_of_its_transpose_joins_the_block():
    b = nhwc_builder(seed=7)
    model = b.model(tf2onnx_block(b))
    out, report = optimize(model, verify=True)
    assert any("moved after Transpose" in s for s in layout(report, "rewrites"))
    assert histogram(out) == FOLDED_NHWC
    assert_equivalent(model, out, b.feeds())


def test_hoisted_affine_read_elsewhere_stays():
    b = nhwc_builder(seed=7)
    t = b.node("Transpose", ["x"], perm=TO_NCHW)
    scaled = b.node("Mul", ["x", b.const(np.full((C,), 1.5, np.float32))])
    moved = b.node("Transpose", [scaled], perm=TO_NCHW)
    model = b.model(b.add(b.conv(t, C, C, 3), moved), scaled)
    out, report = optimize(model)
    assert not any("moved after Transpose" in s for s in layout(report, "rewrites"))
    assert any(r.startswith("single_use:") for r in layout(report)), layout(report)


def nhwc_ring(b: Builder, pads_input=None, axes=False):
    """tf2onnx's DBB ring without its optimizers: ``T(Add(Pad(T(Conv1x1(x))), r))`` with the NHWC pads
    [0, 1, 1, 0, 0, 1, 1, 0] and a per-channel ``r`` on the last axis, then a 3x3 conv without pads."""
    c1 = b.conv(b.node("Transpose", ["x"], perm=TO_NCHW), C, C, 1, pads=[0, 0, 0, 0], bias=False)
    pads = b.const_int([0, 1, 1, 0, 0, 1, 1, 0]) if pads_input is None else pads_input
    inputs = [b.node("Transpose", [c1], perm=TO_NHWC), pads]
    if axes:
        inputs += [b.const(np.zeros((), np.float32)), b.const_int([0, 1, 2, 3])]
    ring = b.node("Add", [b.node("Pad", inputs), b.const(np.linspace(-1, 1, C).astype(np.float32))])
    y = b.conv(b.node("Transpose", [ring], perm=TO_NCHW), C, C, 3, pads=[0, 0, 0, 0])
    return b.node("Transpose", [y], perm=TO_NHWC)


def test_transposes_cancel_across_a_padding_ring():
    b = nhwc_builder(seed=9)
    model = b.model(nhwc_ring(b))
    out, report = optimize(model, verify=True)
    done = layout(report, "rewrites")
    assert any("cancel across 2 step(s) (Pad, Add)" in s for s in done), done
    assert histogram(out)["Transpose"] == 2
    assert_equivalent(model, out, b.feeds())


def test_ring_pads_not_constant_stay():
    b = nhwc_builder(seed=9)
    zero = b.node("Cast", [b.node("Mul", [b.node("ReduceMax", ["x"], keepdims=0), b.const(np.zeros((), np.float32))])], to=7)
    model = b.model(nhwc_ring(b, pads_input=b.node("Add", [b.const_int([0, 1, 1, 0, 0, 1, 1, 0]), zero])))
    report = optimize(model)[1]
    assert any(r.startswith("constant_pads:") for r in layout(report)), layout(report)


def test_ring_pad_with_axes_input_stays():
    b = Builder(C, seed=9, input_shape=[1, H, W, C], opset=18)
    model = b.model(nhwc_ring(b, axes=True))
    report = optimize(model)[1]
    assert any(r.startswith("constant_pads:") and "axes" in r for r in layout(report)), layout(report)


def nhwc_pool_block(b: Builder, expose=False):
    """``T(Conv(T(x))) + BN_last_axis(T(AvgPool(T(x))))``: the BN of an average-pool branch in NHWC,
    between the pool's Transpose back and the sum (tf2onnx without its optimizers, DBB)."""
    t = b.node("Transpose", ["x"], perm=TO_NCHW)
    conv = b.node("Transpose", [b.conv(t, C, C, 3)], perm=TO_NHWC)
    pool = b.node("Transpose", [b.avgpool(t, 3, count_include_pad=1)], perm=TO_NHWC)
    scaled = b.node("Mul", [pool, b.const(np.linspace(0.5, 1.5, C).astype(np.float32))])
    shifted = b.node("Add", [scaled, b.const(np.linspace(-0.3, 0.3, C).astype(np.float32))])
    return b.relu(b.add(conv, shifted)), ([scaled] if expose else [])


def test_sum_of_transposes_one_through_an_affine_chain():
    b = nhwc_builder(seed=13)
    y, _ = nhwc_pool_block(b)
    model = b.model(y)
    out, report = optimize(model, verify=True)
    assert any("one through 2 affine(s)" in s for s in layout(report, "rewrites")), layout(report, "rewrites")
    assert histogram(out) == FOLDED_NHWC
    assert_equivalent(model, out, b.feeds())


def test_sum_through_an_affine_chain_read_elsewhere_stays():
    b = nhwc_builder(seed=13)
    y, outputs = nhwc_pool_block(b, expose=True)
    model = b.model(y, *outputs)
    report = optimize(model)[1]
    assert not any("one through" in s for s in layout(report, "rewrites"))
    assert any(r.startswith("single_use:") for r in layout(report)), layout(report)


def test_sum_whose_inverse_transpose_is_a_graph_output_stays():
    """sink_mixed reads a copy of the inverse Transpose; when that Transpose is a graph output, the copy
    could never be merged with it and the rewrite would add a node."""
    b = nhwc_builder(seed=11)
    inv = b.node("Transpose", ["x"], perm=TO_NCHW)
    t = b.node("Transpose", [b.conv(inv, C, C, 3)], perm=TO_NHWC)
    model = b.model(b.relu(b.add("x", t)), inv)
    assert_declined(model, "inverse_transpose")


def test_two_nhwc_blocks_in_a_row_cancel_between():
    """Block 2 reads block 1's NHWC output: its Transposes cancel with block 1's last one."""
    b = nhwc_builder(seed=5)
    x1 = b.relu(nhwc_block(b))
    model = b.model(b.relu(nhwc_block(b, x1)))
    out, report = optimize(model)
    h = histogram(out)
    assert h.get("Conv") == 2 and h.get("Transpose") == 2, h
    assert not {"Mul", "Add", "Sub", "BatchNormalization"} & set(h)
    assert_equivalent(model, out, b.feeds())


def test_transposes_cancel_with_other_reader_kept():
    """``T(T(x))`` cancels; the inner Transpose stays for its other reader."""
    b = Builder(C, spatial=(H, W))
    t = b.node("Transpose", ["x"], perm=TO_NHWC)
    back = b.node("Transpose", [t], perm=TO_NCHW)
    model = b.model(b.relu(back), b.node("Sigmoid", [t]))
    out, report = optimize(model)
    assert histogram(out) == {"Transpose": 1, "Relu": 1, "Sigmoid": 1}
    assert any("cancel" in s for s in layout(report, "rewrites"))
    assert_equivalent(model, out, b.feeds())


def test_sink_sum_of_two_transposes_removes_one():
    b = Builder(C, spatial=(H, W))
    t1 = b.node("Transpose", [b.relu("x")], perm=TO_NHWC)
    t2 = b.node("Transpose", [b.node("Sigmoid", ["x"])], perm=TO_NHWC)
    model = b.model(b.sub(t1, t2))
    out, _ = optimize(model)
    assert histogram(out) == {"Transpose": 1, "Relu": 1, "Sigmoid": 1, "Sub": 1}
    assert_equivalent(model, out, b.feeds())


def test_affine_chain_moves_up_to_its_first_spatial_constant():
    """``Mul([C])`` then ``Add([1, H, 1, 1])`` after ``T(Conv)``: the Mul moves and folds, the
    spatial Add stays after the Transpose."""
    b = nhwc_builder(seed=7)
    y = b.node("Transpose", ["x"], perm=TO_NCHW)
    t = b.node("Transpose", [b.conv(y, C, C, 3, bias=False)], perm=TO_NHWC)
    scaled = b.node("Mul", [t, b.const(np.linspace(0.5, 1.5, C))])
    model = b.model(b.node("Add", [scaled, b.const(b.rng.standard_normal((1, H, 1, 1)))]))
    out, report = optimize(model)
    assert histogram(out) == {"Transpose": 2, "Conv": 1, "Add": 1}
    assert_equivalent(model, out, b.feeds())


def test_activation_between_two_nhwc_convs():
    """``T -> Relu -> T`` between two convs: the first Transpose moves below the Relu and cancels."""
    b = nhwc_builder(seed=8)
    c1 = b.conv(b.node("Transpose", ["x"], perm=TO_NCHW), C, C, 3)
    r = b.relu(b.node("Transpose", [c1], perm=TO_NHWC))
    c2 = b.conv(b.node("Transpose", [r], perm=TO_NCHW), C, C, 1)
    model = b.model(b.node("Transpose", [c2], perm=TO_NHWC))
    out, report = optimize(model)
    assert histogram(out) == {"Transpose": 2, "Conv": 1, "Relu": 1} or histogram(out) == {"Transpose": 2, "Conv": 2, "Relu": 1}
    assert histogram(out)["Transpose"] == 2
    assert any("moved below Relu" in s for s in layout(report, "rewrites"))
    assert_equivalent(model, out, b.feeds())


def test_activation_after_a_transpose_with_no_inverse_reader_stays():
    b = nhwc_builder()
    c1 = b.conv(b.node("Transpose", ["x"], perm=TO_NCHW), C, C, 3)
    model = b.model(b.relu(b.node("Transpose", [c1], perm=TO_NHWC)))
    assert_declined(model, "inverse_transpose")


# --------------------------------------------------------------------------------------------
# negatives, one per condition
# --------------------------------------------------------------------------------------------


def assert_declined(model, condition):
    out, report = optimize(model)
    assert histogram(out) == histogram(model), histogram(out)
    assert not layout(report, "rewrites")
    reasons = layout(report)
    assert any(r.startswith(condition + ":") for r in reasons), reasons
    return report


def test_different_perms_are_not_summed():
    b = Builder(C, spatial=(H, H))
    t1 = b.node("Transpose", [b.relu("x")], perm=[0, 2, 3, 1])
    t2 = b.node("Transpose", [b.node("Sigmoid", ["x"])], perm=[0, 3, 2, 1])
    assert_declined(b.model(b.add(t1, t2)), "same_perm")


def test_transposes_that_do_not_cancel():
    b = Builder(C, spatial=(H, H))
    t = b.node("Transpose", ["x"], perm=[0, 2, 3, 1])
    assert_declined(b.model(b.relu(b.node("Transpose", [t], perm=[0, 2, 3, 1]))), "same_perm")


def test_transpose_read_elsewhere_is_not_sunk():
    """The conv branch's Transpose back to NHWC is also a graph output: neither the affine nor the
    sum may move it (the Transpose would stay and one would be added)."""
    b = nhwc_builder()
    y = b.node("Transpose", ["x"], perm=TO_NCHW)
    t = b.node("Transpose", [b.conv(y, C, C, 3, bias=False)], perm=TO_NHWC)
    scaled = b.node("Mul", [t, b.const(np.linspace(0.5, 1.5, C))])
    t2 = b.node("Transpose", [b.conv(y, C, C, 1, bias=False)], perm=TO_NHWC)
    model = b.model(b.add(scaled, t2), t)
    report = assert_declined(model, "single_use")
    assert any("is a graph output" in r for r in layout(report))


def test_constant_not_per_channel_stays():
    b = nhwc_builder()
    y = b.node("Transpose", ["x"], perm=TO_NCHW)
    t = b.node("Transpose", [b.conv(y, C, C, 3, bias=False)], perm=TO_NHWC)
    spatial = b.rng.uniform(0.5, 1.5, (1, H, 1, 1))
    assert_declined(b.model(b.node("Mul", [t, b.const(spatial)])), "per_channel")


def test_affine_after_a_transpose_of_no_conv_stays():
    b = nhwc_builder()
    t = b.node("Transpose", [b.relu("x")], perm=TO_NCHW)
    assert_declined(b.model(b.node("Mul", [t, b.const(np.linspace(0.5, 1.5, C).reshape(C, 1, 1))])), "conv_producer")


def test_sum_with_a_tensor_no_inverse_transpose_reads():
    b = nhwc_builder()
    y = b.node("Transpose", ["x"], perm=TO_NCHW)
    t = b.node("Transpose", [b.conv(y, C, C, 3, bias=False)], perm=TO_NHWC)
    assert_declined(b.model(b.add(t, b.relu("x"))), "inverse_transpose")


def test_duplicate_transpose_that_is_a_graph_output_stays():
    b = nhwc_builder()
    t1 = b.node("Transpose", ["x"], perm=TO_NCHW)
    t2 = b.node("Transpose", ["x"], perm=TO_NCHW)
    assert_declined(b.model(b.relu(t1), t2), "single_use")


def test_transpose_without_perm():
    b = Builder(C, spatial=(H, W))
    t1 = b.node("Transpose", [b.relu("x")])
    t2 = b.node("Transpose", [b.node("Sigmoid", ["x"])])
    assert_declined(b.model(b.add(t1, t2)), "perm")


# --------------------------------------------------------------------------------------------
# property: a random linear block spelled in NHWC folds like its NCHW spelling
# --------------------------------------------------------------------------------------------


@settings(max_examples=examples(12), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    kernels=st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=3),
    identity=st.booleans(),
    shared=st.booleans(),
    style=st.sampled_from(["muladd", "subadd", "wrapped"]),
    shape=st.sampled_from([(C,), (1, 1, 1, C)]),
    seed=st.integers(0, 1000),
)
def test_nhwc_spelling_folds_like_nchw(kernels, identity, shared, style, shape, seed):
    p = Builder(C, spatial=(H, W), seed=seed)
    plain = p.model(p.relu(nchw_block(p, kernels=tuple(kernels), identity=identity)))
    out_p, _ = optimize(plain)
    b = nhwc_builder(seed)
    model = b.model(b.relu(nhwc_block(b, shared=shared, style=style, shape=shape,
                                      identity="affine" if identity else "none", kernels=tuple(kernels))))
    out, report = optimize(model)
    hp, h = histogram(out_p), histogram(out)
    assert h.get("Conv") == hp.get("Conv") == 1, (h, report.to_dict()["passes"])
    assert not {"Mul", "Add", "Sub", "BatchNormalization"} & set(h), h
    assert h.get("Transpose") == 2
    assert_equivalent(model, out, b.feeds())
    again, rep = optimize(out)
    assert rep.rewritten == 0
