"""The kernel algebra against a direct convolution."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphs import conv_ref, examples
from onnxrep import algebra
from onnxrep.algebra import Affine, AxisTaps

RTOL = 1e-12


def close(a, b):
    scale = max(np.max(np.abs(b)), 1.0)
    assert np.max(np.abs(a - b)) <= RTOL * scale


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_fold_bn_matches_conv_then_bn(rng):
    x = rng.standard_normal((2, 3, 7, 6))
    w, b = rng.standard_normal((5, 3, 3, 3)), rng.standard_normal(5)
    gamma, beta, mean = rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal(5)
    var, eps = rng.uniform(0.1, 2, 5), 1e-3
    y = conv_ref(x, w, b, pads=(1, 1, 1, 1))
    expect = gamma[:, None, None] * (y - mean[:, None, None]) / np.sqrt(var[:, None, None] + eps) + beta[:, None, None]
    wf, bf = algebra.fold_bn(w, b, gamma, beta, mean, var, eps)
    close(conv_ref(x, wf, bf, pads=(1, 1, 1, 1)), expect)


def test_affine_composition(rng):
    a = Affine(rng.standard_normal(4), rng.standard_normal(4))
    b = Affine(rng.standard_normal(4), rng.standard_normal(4))
    x = rng.standard_normal(4)
    close(a.then(b).scale * x + a.then(b).shift, b.scale * (a.scale * x + a.shift) + b.shift)


@pytest.mark.parametrize("channels,groups", [(6, 1), (6, 2), (6, 3), (6, 6)])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_identity_kernel_reproduces_input(rng, channels, groups, rank):
    x = rng.standard_normal((2, channels) + (5,) * rank)
    w = algebra.identity_kernel(channels, groups, rank)
    assert w.shape == (channels, channels // groups) + (1,) * rank
    close(conv_ref(x, w, groups=groups), x)


def test_identity_kernel_rejects_bad_groups():
    with pytest.raises(ValueError):
        algebra.identity_kernel(6, 4, 2)


@pytest.mark.parametrize("kernel,stride,pad", [((3, 3), 1, 1), ((2, 2), 2, 0), ((3, 1), 1, 1), ((5, 5), 2, 2)])
def test_avgpool_kernel_is_counting_average(rng, kernel, stride, pad):
    c = 3
    x = rng.standard_normal((1, c, 9, 8))
    pads = [pad if k > 1 else 0 for k in kernel] * 2
    got = conv_ref(x, algebra.avgpool_kernel(c, kernel), strides=(stride, stride), pads=pads, groups=c)
    xp = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    oh = (xp.shape[2] - kernel[0]) // stride + 1
    ow = (xp.shape[3] - kernel[1]) // stride + 1
    expect = np.zeros((1, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = xp[:, :, i * stride : i * stride + kernel[0], j * stride : j * stride + kernel[1]]
            expect[:, :, i, j] = win.mean(axis=(2, 3))
    close(got, expect)


@pytest.mark.parametrize("groups,new_groups", [(4, 1), (4, 2), (2, 1), (8, 4), (8, 8), (6, 3)])
def test_regroup_kernel_is_the_same_conv(rng, groups, new_groups):
    cin, cout = 24, 16 if groups != 6 else 12
    w = rng.standard_normal((cout, cin // groups, 3, 3))
    x = rng.standard_normal((1, cin, 6, 6))
    wr = algebra.regroup_kernel(w, groups, new_groups)
    assert wr.shape == (cout, cin // new_groups, 3, 3)
    close(conv_ref(x, wr, pads=(1,) * 4, groups=new_groups), conv_ref(x, w, pads=(1,) * 4, groups=groups))


def test_regroup_kernel_rejects_non_refinement(rng):
    with pytest.raises(ValueError):
        algebra.regroup_kernel(rng.standard_normal((4, 2, 1, 1)), 2, 4)


@pytest.mark.parametrize("dilation", [(2, 2), (1, 3), (3, 1)])
def test_dilate_kernel_is_the_same_conv(rng, dilation):
    x = rng.standard_normal((1, 2, 11, 12))
    w = rng.standard_normal((3, 2, 3, 3))
    dense = algebra.dilate_kernel(w, dilation)
    assert dense.shape[2:] == tuple(d * 2 + 1 for d in dilation)
    close(conv_ref(x, dense), conv_ref(x, w, dilations=dilation))


def test_place_kernel_centred_1x1_in_3x3(rng):
    x = rng.standard_normal((1, 3, 6, 6))
    w = rng.standard_normal((4, 3, 1, 1))
    big = algebra.place_kernel(w, (3, 3), (1, 1))
    close(conv_ref(x, big, pads=(1,) * 4), conv_ref(x, w))


def test_place_kernel_acnet_1x3_and_3x1(rng):
    x = rng.standard_normal((1, 3, 6, 7))
    w13 = rng.standard_normal((4, 3, 1, 3))
    w31 = rng.standard_normal((4, 3, 3, 1))
    close(conv_ref(x, algebra.place_kernel(w13, (3, 3), (1, 0)), pads=(1,) * 4), conv_ref(x, w13, pads=(0, 1, 0, 1)))
    close(conv_ref(x, algebra.place_kernel(w31, (3, 3), (0, 1)), pads=(1,) * 4), conv_ref(x, w31, pads=(1, 0, 1, 0)))


def test_place_kernel_with_step_places_dilated_taps(rng):
    x = rng.standard_normal((1, 2, 9, 9))
    w = rng.standard_normal((2, 2, 3, 3))
    big = algebra.place_kernel(w, (5, 5), (0, 0), (2, 2))
    close(conv_ref(x, big, pads=(2,) * 4), conv_ref(x, w, pads=(2,) * 4, dilations=(2, 2)))


def test_place_kernel_rejects_overflow(rng):
    with pytest.raises(ValueError):
        algebra.place_kernel(rng.standard_normal((1, 1, 3, 3)), (3, 3), (1, 0))


def test_merged_axis_repvgg_and_stride():
    grid = algebra.merged_axis([AxisTaps.of_conv(3, 1, 1, 1), AxisTaps.of_conv(1, 0, 0, 1)])
    assert grid == algebra.AxisGrid(kernel=3, dilation=1, pad_begin=1, pad_end=1)
    assert grid.slot(AxisTaps.of_conv(1, 0, 0, 1)) == (1, 1)


def test_merged_axis_dilated_taps_keep_dilation():
    grid = algebra.merged_axis([AxisTaps.of_conv(3, 2, 2, 2), AxisTaps.of_conv(1, 0, 0, 1)])
    assert grid == algebra.AxisGrid(kernel=3, dilation=2, pad_begin=2, pad_end=2)


def test_merged_axis_rejects_different_output_sizes():
    with pytest.raises(ValueError):
        algebra.merged_axis([AxisTaps.of_conv(3, 1, 1, 1), AxisTaps.of_conv(3, 0, 0, 1)])


def test_merge_groups_is_gcd():
    assert algebra.merge_groups([4, 6, 8]) == 2
    assert algebra.merge_groups([16, 16]) == 16


@st.composite
def branch_sets(draw):
    """1-4 random conv branches (kernel, dilation, pads per axis) that share the output size."""
    excess = [draw(st.integers(-2, 2)) for _ in range(2)]
    branches = []
    for _ in range(draw(st.integers(1, 4))):
        taps = []
        for e in excess:
            k, d = draw(st.tuples(st.integers(1, 5), st.integers(1, 3)).filter(lambda kd, e=e: e + kd[1] * (kd[0] - 1) >= 0))
            total = e + d * (k - 1)
            pb = draw(st.integers(0, total))
            taps.append((k, d, pb, total - pb))
        branches.append(taps)
    return branches


@settings(max_examples=examples(80), deadline=None)
@given(branch_sets(), st.integers(0, 2**31 - 1))
def test_sum_of_placed_kernels_equals_sum_of_convs(branches, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 2, 9, 10))
    taps = [[AxisTaps.of_conv(k, pb, pe, d) for (k, d, pb, pe) in b] for b in branches]
    grids = [algebra.merged_axis([t[a] for t in taps]) for a in range(2)]
    expect, parts = 0.0, []
    for b, t in zip(branches, taps):
        w = rng.standard_normal((3, 2, b[0][0], b[1][0]))
        bias = rng.standard_normal(3)
        expect = expect + conv_ref(x, w, bias, pads=(b[0][2], b[1][2], b[0][3], b[1][3]), dilations=(b[0][1], b[1][1]))
        slots = [g.slot(tt) for g, tt in zip(grids, t)]
        parts.append((algebra.place_kernel(w, [g.kernel for g in grids], [s[0] for s in slots], [s[1] for s in slots]), bias))
    w, bias = algebra.sum_kernels(parts)
    got = conv_ref(
        x, w, bias, pads=[g.pad_begin for g in grids] + [g.pad_end for g in grids], dilations=[g.dilation for g in grids]
    )
    assert got.shape == expect.shape
    close(got, expect)


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_fold_input_affine_matches_conv_of_affine_input(rng, groups):
    cin, cout = 6, 12
    x = rng.standard_normal((2, cin, 5, 6))
    w, b = rng.standard_normal((cout, cin // groups, 3, 3)), rng.standard_normal(cout)
    aff = Affine(rng.standard_normal(cin), rng.standard_normal(cin))
    xs = x * aff.scale[None, :, None, None] + aff.shift[None, :, None, None]
    wf, bf = algebra.fold_input_affine(w, b, aff, groups)
    close(conv_ref(x, wf, bf, groups=groups), conv_ref(xs, w, b, groups=groups))


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("kernel,stride,pads", [((3, 3), 1, (0,) * 4), ((3, 1), 2, (0,) * 4), ((1, 1), 1, (0,) * 4)])
def test_compose_pointwise_first(rng, groups, kernel, stride, pads):
    cin, mid, cout = 8, 12, 4
    x = rng.standard_normal((1, cin, 7, 6))
    w1, b1 = rng.standard_normal((mid, cin // groups, 1, 1)), rng.standard_normal(mid)
    w2, b2 = rng.standard_normal((cout, mid // groups) + kernel), rng.standard_normal(cout)
    expect = conv_ref(conv_ref(x, w1, b1, groups=groups), w2, b2, strides=(stride,) * 2, pads=pads, groups=groups)
    w, b = algebra.compose_pointwise_first(w1, b1, w2, b2, groups)
    close(conv_ref(x, w, b, strides=(stride,) * 2, pads=pads, groups=groups), expect)


def test_compose_pointwise_first_with_bias_ring_equals_padded_second_conv(rng):
    """The DBB identity: a padded second conv whose ring holds b1 is the merged conv with pads."""
    x = rng.standard_normal((1, 3, 5, 5))
    w1, b1 = rng.standard_normal((4, 3, 1, 1)), rng.standard_normal(4)
    w2, b2 = rng.standard_normal((2, 4, 3, 3)), rng.standard_normal(2)
    y1 = conv_ref(x, w1, b1)
    ring = np.broadcast_to(b1[None, :, None, None], (1, 4, 7, 7)).copy()
    ring[:, :, 1:-1, 1:-1] = y1
    w, b = algebra.compose_pointwise_first(w1, b1, w2, b2)
    close(conv_ref(x, w, b, pads=(1,) * 4), conv_ref(ring, w2, b2))


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("kernel,stride,pads,dilation", [((3, 3), 1, (1,) * 4, 1), ((5, 3), 2, (2, 1, 1, 0), 1), ((3, 3), 1, (2,) * 4, 2)])
def test_compose_pointwise_last(rng, groups, kernel, stride, pads, dilation):
    cin, mid, cout = 8, 12, 4
    x = rng.standard_normal((1, cin, 9, 8))
    w1, b1 = rng.standard_normal((mid, cin // groups) + kernel), rng.standard_normal(mid)
    w2, b2 = rng.standard_normal((cout, mid // groups, 1, 1)), rng.standard_normal(cout)
    geo = dict(strides=(stride,) * 2, pads=pads, dilations=(dilation,) * 2)
    expect = conv_ref(conv_ref(x, w1, b1, groups=groups, **geo), w2, b2, groups=groups)
    w, b = algebra.compose_pointwise_last(w1, b1, w2, b2, groups)
    close(conv_ref(x, w, b, groups=groups, **geo), expect)
