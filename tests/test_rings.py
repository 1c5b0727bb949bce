"""Padding rings in the spellings of frameworks that can only pad with a scalar: ``Concat(strip, Y,
strip)`` along one spatial axis then the other, and ``Sub(b) -> Pad(0) -> Add(b)``. The ring holds
the bias of the 1x1 before it (DBB's 1x1 -> kxk branch), so the chain merges into one Conv."""

import numpy as np
import onnx
import pytest

import onnxrep

from graphs import Builder, histogram
from test_conv_chain import declined, reasons
from test_parallel_merge import assert_equivalent

PASS = "conv-chain"
SPATIAL = (7, 8)


def strip(values, c, rows, cols):
    return np.broadcast_to(np.asarray(values, np.float32)[None, :, None, None], (1, c, rows, cols))


def concat_ring(b, t, c, values, order="WH", pads=(1, 1, 1, 1), right_values=None):
    """Concat strips of ``values`` around ``t``: ``pads`` = (top, left, bottom, right), axis by
    axis in ``order``; ``right_values`` fill the bottom and right strips when given."""
    h, w = SPATIAL
    top, left, bottom, right = pads
    after = values if right_values is None else right_values
    out = t
    for axis in order:
        if axis == "W":
            out = b.node("Concat", [b.const(strip(values, c, h, left)), out, b.const(strip(after, c, h, right))], axis=3)
            w += left + right
        else:
            out = b.node("Concat", [b.const(strip(values, c, top, w)), out, b.const(strip(after, c, bottom, w))], axis=2)
            h += top + bottom
    return out


def shape_ring(b, t, c, values, pad=1):
    """Concat strips computed from the bias and the shape of the tensor: ``Expand(b, [N, C, H, p])``
    with ``N`` read from ``Shape(t)``, along W then H."""
    h, w = SPATIAL
    bias = b.const(np.asarray(values, np.float32).reshape(1, c, 1, 1))
    batch = b.node("Slice", [b.node("Shape", [t]), b.const_int([0]), b.const_int([1])])
    out = t
    for axis, size in ((3, (h, pad)), (2, (pad, w + 2 * pad))):
        dims = b.node("Concat", [batch, b.const_int([c, *size])], axis=0)
        s = b.node("Expand", [bias, dims])
        out = b.node("Concat", [s, out, s], axis=axis)
    return out


def shift_ring(b, t, c, sub, add, pad=1):
    p = b.node("Sub", [t, b.const(np.asarray(sub, np.float32).reshape(1, c, 1, 1))])
    p = b.node("Pad", [p, b.const_int([0, 0, pad, pad, 0, 0, pad, pad])], mode="constant")
    return b.node("Add", [p, b.const(np.asarray(add, np.float32).reshape(1, c, 1, 1))])


def pointwise(b, c, bias, seed=0):
    w = np.random.default_rng(seed).standard_normal((c, c, 1, 1)) * 0.5
    return b.node("Conv", ["x", b.const(w), b.const(bias)], kernel_shape=[1, 1], pads=[0] * 4)


def setup(c=4, seed=0, **kw):
    b = Builder(c, spatial=SPATIAL, **kw)
    bias = np.random.default_rng(seed).standard_normal(c).astype(np.float32)
    return b, bias, pointwise(b, c, bias, seed + 1)


def optimize(model, feeds, passes=None):
    """All passes (None) or the given ones; the result is checked and equivalent (rtol 1e-5)."""
    out, report = onnxrep.optimize(model, **({} if passes is None else {"passes": list(passes)}))
    onnx.checker.check_model(out)
    assert_equivalent(model, out, feeds)
    return out, report


def merged(model, feeds, passes=None):
    out, report = optimize(model, feeds, passes=None if passes is None else list(passes))
    assert histogram(out) == {"Conv": 1}, (histogram(out), [r for p in report.passes for r in p.skipped.values()])
    assert any("padding ring" in r["summary"] for p in report.passes if p.name == PASS for r in p.rewrites)
    return out, report


# rings that merge --------------------------------------------------------------------------------


@pytest.mark.parametrize("passes", [(PASS,), None], ids=["conv-chain", "pipeline"])
@pytest.mark.parametrize("order", ["WH", "HW"])
@pytest.mark.parametrize("pad,kernel,stride", [(1, 3, 1), (2, 5, 1), (1, 3, 2)])
def test_concat_ring_of_the_bias_merges(order, pad, kernel, stride, passes):
    c = 4
    b, bias, one = setup(c)
    y = b.conv(concat_ring(b, one, c, bias, order, (pad,) * 4), c, c, kernel, stride, pads=[0] * 4)
    merged(b.model(y), b.feeds(), passes)


@pytest.mark.parametrize("passes", [(PASS,), None], ids=["conv-chain", "pipeline"])
def test_concat_ring_of_different_widths_merges(passes):
    """Strips 1 wide on top and left, 2 on the bottom and right: the merged conv pads the same way."""
    c = 4
    b, bias, one = setup(c, seed=3)
    y = b.conv(concat_ring(b, one, c, bias, "HW", (1, 1, 2, 2)), c, c, 3, pads=[0] * 4)
    out, _ = merged(b.model(y), b.feeds(), passes)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert [a.ints for a in conv.attribute if a.name == "pads"][0] == [1, 1, 2, 2]


@pytest.mark.parametrize("passes", [(PASS,), None], ids=["conv-chain", "pipeline"])
def test_concat_ring_with_strips_computed_from_bias_and_shape(passes):
    c = 4
    b, bias, one = setup(c, seed=5, input_shape=["N", c, *SPATIAL])
    y = b.conv(shape_ring(b, one, c, bias), c, c, 3, pads=[0] * 4)
    model = b.model(y)
    merged(model, b.feeds(shape=[2, c, *SPATIAL]), passes)


@pytest.mark.parametrize("passes", [(PASS,), None], ids=["conv-chain", "pipeline"])
def test_shift_ring_merges(passes):
    c = 4
    b, bias, one = setup(c, seed=7)
    y = b.conv(shift_ring(b, one, c, bias, bias), c, c, 3, pads=[0] * 4)
    merged(b.model(y), b.feeds(), passes)


def test_shift_ring_is_a_ring_of_its_value_exactly():
    """The 1x1's bias one ulp from the Sub/Add constant: the ring is recognized as a ring of ``b``
    itself (``(0 - b) + b`` is 0 exactly, the border ``0 + b`` is ``b``), and ``b`` is within the
    ring condition's 4 ulps of the bias."""
    c = 4
    b = Builder(c, spatial=SPATIAL)
    ring_value = np.random.default_rng(9).standard_normal(c).astype(np.float32)
    bias = np.nextafter(ring_value, np.float32(np.inf))
    one = pointwise(b, c, bias, 10)
    y = b.conv(shift_ring(b, one, c, ring_value, ring_value), c, c, 3, pads=[0] * 4)
    merged(b.model(y), b.feeds(), (PASS,))


def one_ulp_ring(bn):
    """A biased 1x1 (or a bias-free 1x1 and a BatchNormalization) before ``Sub(b) -> Pad(0) ->
    Add(b)`` whose ``b`` is one ulp from the 1x1's (folded) bias: computed in float32, as the
    exporting framework does, against affine-fold's float64 fold."""
    c = 4
    b = Builder(c, spatial=SPATIAL)
    if bn:
        one = b.node("Conv", ["x", b.const(np.random.default_rng(1).standard_normal((c, c, 1, 1)))], kernel_shape=[1, 1])
        g, beta, mean, var = [np.asarray(p, np.float32) for p in b.bn_params(c)]
        one = b.node("BatchNormalization", [one] + [b.const(p) for p in (g, beta, mean, var)], epsilon=1e-5)
        value = (beta - mean * g / np.sqrt(var + np.float32(1e-5))).astype(np.float32)
        folded = (beta.astype(np.float64) - mean * (g / np.sqrt(var.astype(np.float64) + 1e-5))).astype(np.float32)
        assert np.any(folded != value)  # the leftover the ring check would see
    else:
        value = np.random.default_rng(9).standard_normal(c).astype(np.float32)
        one = pointwise(b, c, np.nextafter(value, np.float32(np.inf)), 10)
    y = b.conv(shift_ring(b, one, c, value, value), c, c, 3, pads=[0] * 4)
    return b.model(y), b.feeds()


@pytest.mark.parametrize("bn", [False, True], ids=["bias", "bn"])
def test_shift_ring_with_one_ulp_bias_merges_in_the_pipeline(bn):
    """affine-fold leaves the shifts of the ring to conv-chain (ring_shift), which takes it whole."""
    merged(*one_ulp_ring(bn))


def test_shift_ring_reason_lets_affine_fold_take_the_shifts_of_a_wrong_ring():
    """conv-chain declines the ring (its value is not the bias): the shifts fold as before."""
    c = 4
    b, bias, one = setup(c)
    y = b.conv(shift_ring(b, one, c, bias + 1, bias + 1), c, c, 3, pads=[0] * 4)
    out, report = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Conv": 2}
    assert not any(r.startswith("ring_shift:") for p in report.passes for r in p.skipped.values())


# rings that do not merge --------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["WH", "HW"])
def test_concat_ring_of_another_value_is_declined(order):
    c = 4
    b, bias, one = setup(c)
    y = b.conv(concat_ring(b, one, c, bias + 0.5, order), c, c, 3, pads=[0] * 4)
    declined(b.model(y), b.feeds(), "ring")
    _, report = optimize(b.model(y), b.feeds(), passes=[PASS])
    assert any("not the bias" in r for r in reasons(report)), reasons(report)


def test_concat_ring_with_another_value_on_one_side_is_declined():
    c = 4
    b, bias, one = setup(c)
    y = b.conv(concat_ring(b, one, c, bias, "WH", right_values=bias + 1), c, c, 3, pads=[0] * 4)
    model = b.model(y)
    declined(model, b.feeds(), "ring")
    _, report = optimize(model, b.feeds(), passes=[PASS])
    assert any("holds more than one value" in r for r in reasons(report)), reasons(report)


def test_concat_ring_of_different_widths_into_a_padded_conv_is_declined():
    """The 3x3 pads the ring with zeros of its own: the merged conv would see the bias there."""
    c = 4
    b, bias, one = setup(c)
    y = b.conv(concat_ring(b, one, c, bias, "WH", (1, 1, 2, 2)), c, c, 3, pads=[1] * 4)
    declined(b.model(y), b.feeds(), "border")


def test_concat_ring_read_elsewhere_is_declined():
    c = 4
    b, bias, one = setup(c)
    h, w = SPATIAL
    inner = b.node("Concat", [b.const(strip(bias, c, h, 1)), one, b.const(strip(bias, c, h, 1))], axis=3)
    ring = b.node("Concat", [b.const(strip(bias, c, 1, w + 2)), inner, b.const(strip(bias, c, 1, w + 2))], axis=2)
    y = b.conv(ring, c, c, 3, pads=[0] * 4)
    declined(b.model(y, inner), b.feeds(), "single_use")


def test_shift_ring_of_another_value_is_declined():
    c = 4
    b, bias, one = setup(c)
    sub = np.array([0.5, -1.25, 2.0, 0.75], np.float32)
    y = b.conv(shift_ring(b, one, c, sub, sub + 0.25), c, c, 3, pads=[0] * 4)
    declined(b.model(y), b.feeds(), "ring")
    _, report = optimize(b.model(y), b.feeds(), passes=[PASS])
    assert any("not zero-padded copies" in r for r in reasons(report)), reasons(report)


def test_shift_ring_that_rounds_in_float32_is_declined():
    """``Sub(1) -> Sub(2^-30) -> Pad -> Add(1) -> Add(2^-30)``: float32 leaves 2^-30 where the
    exact offset is 0."""
    c = 4
    b, bias, one = setup(c)
    tiny = np.full(c, 2.0**-30, np.float32).reshape(1, c, 1, 1)
    unit = np.ones((1, c, 1, 1), np.float32)
    t = b.node("Sub", [b.node("Sub", [one, b.const(unit)]), b.const(tiny)])
    t = b.node("Pad", [t, b.const_int([0, 0, 1, 1, 0, 0, 1, 1])], mode="constant")
    t = b.node("Add", [b.node("Add", [t, b.const(unit)]), b.const(tiny)])
    y = b.conv(t, c, c, 3, pads=[0] * 4)
    declined(b.model(y), b.feeds(), "ring")
    _, report = optimize(b.model(y), b.feeds(), passes=[PASS])
    assert any("round in float32" in r for r in reasons(report)), reasons(report)


def test_concat_ring_deep_in_a_graph_merges():
    """The data input of the Concats is told from the strips within a few nodes: a ring behind
    hundreds of nodes is found as quickly and merges."""
    c = 4
    b = Builder(c, spatial=SPATIAL)
    t = "x"
    for _ in range(300):
        t = b.relu(t)
    bias = np.random.default_rng(11).standard_normal(c).astype(np.float32)
    w = np.random.default_rng(12).standard_normal((c, c, 1, 1))
    one = b.node("Conv", [t, b.const(w), b.const(bias)], kernel_shape=[1, 1], pads=[0] * 4)
    y = b.conv(concat_ring(b, one, c, bias), c, c, 3, pads=[0] * 4)
    out, _ = optimize(b.model(y), b.feeds(), passes=[PASS])
    assert histogram(out) == {"Relu": 300, "Conv": 1}
