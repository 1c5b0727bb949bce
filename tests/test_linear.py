"""Linear-layer passes on hand-built graphs: linear-merge, linear-affine, linear-chain, token-bn."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import onnxrep
from graphs import Builder, examples, histogram
from test_parallel_merge import assert_equivalent

LINEAR = ["token-bn", "linear-merge", "linear-affine", "linear-chain"]


def optimize(model, feeds, passes=LINEAR, **kw):
    out, report = onnxrep.optimize(model, passes=list(passes), **kw)
    onnx.checker.check_model(out)
    assert_equivalent(model, out, feeds)
    return out, report


def linear_count(model):
    return sum(n.op_type in ("Gemm", "MatMul") for n in model.graph.node)


def skip_reasons(report):
    return [r for p in report.passes for r in p.skipped.values()]


def tokens(c=8, shape=None):
    return Builder(c, input_shape=shape or [2, 5, c])


def gemm(b, x, k, n, trans_b=0, alpha=1.0, beta=1.0, bias=True):
    rng = b.rng
    w = rng.standard_normal((n, k) if trans_b else (k, n)) / np.sqrt(k)
    inputs = [x, b.const(w)] + ([b.const(rng.standard_normal(n) * 0.1)] if bias else [])
    return b.node("Gemm", inputs, transB=trans_b, alpha=alpha, beta=beta)


def matmul(b, x, k, n, bias=True):
    y = b.node("MatMul", [x, b.const(b.rng.standard_normal((k, n)) / np.sqrt(k))])
    return b.node("Add", [y, b.const(b.rng.standard_normal(n) * 0.1)]) if bias else y


def bn1d(b, x, c):
    return b.bn(x, c)


# positive ------------------------------------------------------------------------------------


@pytest.mark.parametrize("trans_b,alpha,beta", [(0, 1.0, 1.0), (1, 0.5, 2.0), (1, 1.0, 0.0)])
def test_averaged_heads_after_bn(trans_b, alpha, beta):
    """RepViT's classifier: BN1d -> two Linear heads, averaged."""
    c = 8
    b = Builder(c, input_shape=[3, c])
    x = bn1d(b, "x", c)
    y = b.node("Div", [b.add(gemm(b, x, c, 5, trans_b, alpha, beta), gemm(b, x, c, 5, trans_b, alpha, beta)), b.const(np.float32(2.0))])
    out, report = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Gemm": 1}


@pytest.mark.parametrize("bias", [True, False])
def test_token_mlp_chain_on_3d_tensors(bias):
    c = 8
    b = tokens(c)
    y = matmul(b, matmul(b, "x", c, 4 * c, bias), 4 * c, c, bias)
    out, report = optimize(b.model(y), b.feeds())
    assert linear_count(out) == 1
    assert report.cost_after.macs < report.cost_before.macs


def test_depth_pruned_block_with_token_bn_and_residual():
    c = 8
    b = tokens(c)
    t = b.node("Transpose", ["x"], perm=[0, 2, 1])
    t = b.node("Transpose", [b.bn(t, c)], perm=[0, 2, 1])
    y = b.add("x", b.mul_const(matmul(b, matmul(b, t, c, 4 * c), 4 * c, c), np.linspace(0.5, 1.5, c)))
    out, _ = optimize(b.model(y), b.feeds())
    assert linear_count(out) == 1 and "BatchNormalization" not in histogram(out)


def test_sum_with_sub_and_scalar():
    c = 6
    b = Builder(c, input_shape=[4, c])
    y = b.sub(b.add(gemm(b, "x", c, c), gemm(b, "x", c, c)), b.mul_const(gemm(b, "x", c, c), np.float32(0.5)))
    out, _ = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Gemm": 1}


def test_affine_after_matmul_and_mul_before():
    c = 8
    b = tokens(c)
    x = b.mul_const(b.relu("x"), np.linspace(1, 2, c))
    y = b.node("Add", [b.mul_const(matmul(b, x, c, c), np.linspace(-1, 1, c)), b.const(np.ones(c))])
    out, _ = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Relu": 1, "MatMul": 1, "Add": 1}


# negative ------------------------------------------------------------------------------------


def test_nonlinearity_between_stays():
    c = 8
    b = tokens(c)
    y = matmul(b, b.relu(matmul(b, "x", c, 4 * c)), 4 * c, c)
    out, report = optimize(b.model(y), b.feeds())
    assert linear_count(out) == 2 and report.rewritten == 0


def test_non_constant_gemm_weight_is_declined():
    c = 4
    b = Builder(c, input_shape=[3, c])
    b.inputs.append(helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [c, c]))
    y = b.node("Gemm", [bn1d(b, "x", c), "w"])
    out, report = optimize(b.model(y), b.feeds() | {"w": np.eye(c, dtype=np.float32)})
    assert report.rewritten == 0 and skip_reasons(report)[0].startswith("layout:")


def test_bottleneck_chain_is_declined_for_cost():
    c = 16
    b = tokens(c)
    out, report = optimize(b.model(matmul(b, matmul(b, "x", c, c // 4), c // 4, c)), b.feeds())
    assert linear_count(out) == 2 and skip_reasons(report)[0].startswith("cost:")


def test_transposed_input_gemm_is_declined():
    c = 4
    b = Builder(c, input_shape=[c, 3])
    rng = np.random.default_rng(0)
    y = b.node("Gemm", [b.relu("x"), b.const(rng.standard_normal((c, 5)))], transA=1)
    y = b.node("Gemm", [y, b.const(rng.standard_normal((5, 2)))])
    out, report = optimize(b.model(y), b.feeds())
    assert linear_count(out) == 2 and skip_reasons(report)[0].startswith("layout:")


def test_full_matrix_bias_is_declined():
    c = 4
    b = Builder(c, input_shape=[3, c])
    rng = np.random.default_rng(0)
    x = b.relu("x")
    y = b.node("Gemm", [x, b.const(rng.standard_normal((c, c))), b.const(rng.standard_normal((3, c)))])
    y = b.add(y, gemm(b, x, c, c))
    out, report = optimize(b.model(b.mul_const(y, np.float32(2.0))), b.feeds())
    assert any(r.startswith("layout:") for r in skip_reasons(report))


def test_bn_on_the_wrong_axis_is_declined():
    c, length = 4, 6
    b = Builder(c, input_shape=[2, c, length])
    y = matmul(b, b.bn("x", c), length, length)  # BN normalizes axis 1, the MatMul reads axis 2
    out, report = optimize(b.model(y), b.feeds())
    assert "BatchNormalization" in histogram(out)
    assert any(r.startswith("per_feature:") for r in skip_reasons(report))


def test_intermediate_read_elsewhere_is_declined():
    c = 8
    b = tokens(c)
    mid = matmul(b, "x", c, 4 * c)
    out, report = optimize(b.model(matmul(b, mid, 4 * c, c), mid), b.feeds())
    assert linear_count(out) == 2 and any(r.startswith("single_use:") for r in skip_reasons(report))


# property ------------------------------------------------------------------------------------


@settings(max_examples=examples(40), deadline=None)
@given(
    st.lists(st.sampled_from(["matmul", "gemm", "identity", "scaled"]), min_size=2, max_size=4),
    st.lists(st.booleans(), min_size=4, max_size=4),
    st.sampled_from([2, 3]),
    st.integers(0, 1000),
)
def test_random_linear_sums_merge_exactly(kinds, negs, rank, seed):
    c = 6
    b = Builder(c, input_shape=[3, c] if rank == 2 else [2, 3, c], seed=seed)
    terms = []
    for kind in kinds:
        if kind == "matmul":
            terms.append(matmul(b, "x", c, c, bias=bool(seed % 2)))
        elif kind == "gemm" and rank == 2:
            terms.append(gemm(b, "x", c, c, trans_b=seed % 2))
        elif kind == "scaled":
            terms.append(b.mul_const(matmul(b, "x", c, c), np.float32(0.25)))
        else:
            terms.append("x")
    acc = terms[0]
    for t, neg in zip(terms[1:], negs):
        acc = b.sub(acc, t) if neg else b.add(acc, t)
    model = b.model(acc)
    out, report = optimize(model, b.feeds())
    if any(k != "identity" for k in kinds):
        assert linear_count(out) <= 1


def test_bias_or_constant_of_higher_rank_is_not_folded():
    """A [1, 1, N] bias or scale on a 2-D input adds a dim: folding would drop it."""
    c = 4
    b = Builder(c, input_shape=[2, c])
    y = b.node("Add", [b.node("MatMul", ["x", b.const(np.ones((c, 3)))]), b.const(np.ones((1, 1, 3)))])
    y = b.mul_const(y, np.float32(2.0))
    z = b.node("MatMul", [b.mul_const(b.relu("x"), np.ones((1, 1, c))), b.const(np.ones((c, 3)))])
    model = b.model(y, z)
    out, report = optimize(model, b.feeds())
    assert [o.type.tensor_type.shape for o in out.graph.output] == [o.type.tensor_type.shape for o in model.graph.output]
    assert report.rewritten == 0


def test_token_bn_on_float16_data_with_float32_parameters():
    c = 4
    b = Builder(c, input_shape=[2, 5, c], dtype=np.float16, opset=15)
    t = b.node("Transpose", ["x"], perm=[0, 2, 1])
    params = [onnx.numpy_helper.from_array(p.astype(np.float32), f"p{i}") for i, p in enumerate(b.bn_params(c))]
    b.inits.extend(params)
    t = b.node("BatchNormalization", [t] + [p.name for p in params], epsilon=1e-5)
    y = b.node("Transpose", [t], perm=[0, 2, 1])
    model = b.model(y)
    out, _ = onnxrep.optimize(model, passes=["token-bn"], verify=True)
    assert "BatchNormalization" not in histogram(out)
