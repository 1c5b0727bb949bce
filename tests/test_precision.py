"""Precisions: float16, bfloat16 and float64 models, and float32 models with Cast nodes around a
conv block. Folds are checked against a float64 fold computed here and cast to the model's dtype;
verification runs in onnxruntime, widened to float32 where its CPU provider has no kernel."""

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxrep
from graphs import Builder, histogram
from onnxrep import equivalence

BF16 = np.dtype(ml_dtypes.bfloat16)
#: bfloat16 Conv exists in ONNX from opset 22 on (Conv-11 allows float16, float and double only).
OPSET = {np.dtype(np.float16): 17, np.dtype(np.float64): 17, BF16: 22}
DTYPES = [np.dtype(np.float16), BF16, np.dtype(np.float64)]
WIDENED = {np.dtype(np.float16): [], BF16: ["bfloat16"], np.dtype(np.float64): ["double"]}


def _ids(dtypes):
    return [str(d) for d in dtypes]


def _values(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _bn_affine_f64(model, node):
    """(scale, shift) in float64 of a BatchNormalization node of ``model``."""
    vals = _values(model)
    gamma, beta, mean, var = (vals[n].astype(np.float64) for n in node.input[1:5])
    s = gamma / np.sqrt(var + np.float64(_attr(node, "epsilon", 1e-5)))
    return s, beta - mean * s


def repvgg(b: Builder, x: str, c: int) -> str:
    """BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x), no conv biases."""
    return b.sum([b.bn(b.conv(x, c, c, 3, bias=False), c), b.bn(b.conv(x, c, c, 1, bias=False), c), b.bn(x, c)])


def repvgg_fold_f64(model, c):
    """The RepVGG fold of the (single) block in ``model``, done here in float64."""
    vals = _values(model)
    convs = {len(vals[n.input[1]].shape) and vals[n.input[1]].shape[-1]: n for n in model.graph.node if n.op_type == "Conv"}
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    after = {n.input[0]: n for n in bns}
    w3 = vals[convs[3].input[1]].astype(np.float64)
    w1 = vals[convs[1].input[1]].astype(np.float64)
    s3, t3 = _bn_affine_f64(model, after[convs[3].output[0]])
    s1, t1 = _bn_affine_f64(model, after[convs[1].output[0]])
    ident = next(n for n in bns if n.input[0] not in (convs[3].output[0], convs[1].output[0]))
    si, ti = _bn_affine_f64(model, ident)
    w = s3[:, None, None, None] * w3
    w[:, :, 1, 1] += s1[:, None] * w1[:, :, 0, 0]
    w[np.arange(c), np.arange(c), 1, 1] += si
    return w, t3 + t1 + ti


def folded_conv(model):
    (conv,) = [n for n in model.graph.node if n.op_type == "Conv"]
    vals = _values(model)
    return vals[conv.input[1]], vals[conv.input[2]]


def assert_folded_exactly(out, model, c, dtype):
    w, bias = folded_conv(out)
    w_ref, b_ref = repvgg_fold_f64(model, c)
    assert w.dtype == dtype and bias.dtype == dtype
    if dtype == np.float64:  # the same sums in another order: a few ulps of float64
        np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-14 * np.abs(w_ref).max())
        np.testing.assert_allclose(bias, b_ref, rtol=0, atol=1e-14 * np.abs(b_ref).max())
    else:  # folded in float64 and rounded once: the float64 fold rounded to the dtype, bit for bit
        np.testing.assert_array_equal(w.view(np.uint16), w_ref.astype(dtype).view(np.uint16))
        np.testing.assert_array_equal(bias.view(np.uint16), b_ref.astype(dtype).view(np.uint16))


# --------------------------------------------------------------------------------------------
# what onnxruntime's CPU provider runs (the reason for widened verification)
# --------------------------------------------------------------------------------------------


def _single_op_model(op, elem, np_dtype, opset, inits=(), **attrs):
    names = [f"c{i}" for i in range(len(inits))]
    graph = helper.make_graph(
        [helper.make_node(op, ["x", *names], ["y"], **attrs)],
        "probe",
        [helper.make_tensor_value_info("x", elem, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", elem, [1, 2, 4, 4])],
        [numpy_helper.from_array(np.asarray(v).astype(np_dtype), n) for n, v in zip(names, inits)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


@pytest.mark.parametrize(
    "elem,np_dtype,opset",
    [(TensorProto.DOUBLE, np.float64, 17), (TensorProto.DOUBLE, np.float64, 22), (TensorProto.BFLOAT16, BF16, 22)],
)
def test_onnxruntime_cpu_has_no_conv_kernel_for_double_and_bfloat16(elem, np_dtype, opset):
    """If this starts failing, onnxruntime gained the kernel and the widened path is used less."""
    model = _single_op_model("Conv", elem, np_dtype, opset, [np.ones((2, 2, 3, 3))], pads=[1, 1, 1, 1])
    onnx.checker.check_model(model)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        equivalence.reference_session(model)


# --------------------------------------------------------------------------------------------
# RepVGG blocks in float16, bfloat16 and float64
# --------------------------------------------------------------------------------------------


def _block_model(dtype, c=4, relu=True):
    b = Builder(c, spatial=(6, 6), dtype=dtype, opset=OPSET[dtype])
    y = repvgg(b, "x", c)
    return b.model(b.relu(y) if relu else y)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_repvgg_block_folds_exactly_and_verifies(dtype):
    c = 4
    model = _block_model(dtype, c)
    out, report = onnxrep.optimize(model, verify=True)
    assert histogram(model) == {"Conv": 2, "BatchNormalization": 3, "Add": 2, "Relu": 1}
    assert histogram(out) == {"Conv": 1, "Relu": 1}
    assert out.graph.input == model.graph.input and out.graph.output == model.graph.output
    assert_folded_exactly(out, model, c, dtype)
    assert report.verification["ok"]
    assert report.verification.get("widened_to_float32", []) == WIDENED[dtype]
    onnx.checker.check_model(out, full_check=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_float32_bn_parameters_on_lower_or_higher_precision_data(dtype):
    """BatchNormalization-15 lets scale, bias, mean and var be float32 on data of another type:
    the fold still ends in the data's (the conv's) dtype, rounded once."""
    c = 4
    b = Builder(c, spatial=(6, 6), dtype=dtype, opset=OPSET[dtype])

    def bn32(x):
        names = [b.name("bnf") for _ in range(4)]
        for name, v in zip(names, b.bn_params(c)):
            b.inits.append(numpy_helper.from_array(v.astype(np.float32), name))
        return b.node("BatchNormalization", [x, *names], epsilon=1e-5)

    model = b.model(b.sum([bn32(b.conv("x", c, c, 3, bias=False)), bn32(b.conv("x", c, c, 1, bias=False)), bn32("x")]))
    out, report = onnxrep.optimize(model, verify=True)
    assert histogram(out) == {"Conv": 1}
    assert_folded_exactly(out, model, c, dtype)
    assert report.verification["ok"]


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_optimizing_twice_changes_nothing(dtype):
    once, _ = onnxrep.optimize(_block_model(dtype))
    twice, report = onnxrep.optimize(once)
    assert report.rewritten == 0 and twice.SerializeToString() == once.SerializeToString()


def _perturb_folded(out, rel):
    bad = onnx.ModelProto()
    bad.CopyFrom(out)
    (conv,) = [n for n in bad.graph.node if n.op_type == "Conv"]
    init = next(i for i in bad.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).astype(np.float64)
    w[:, :, 1, 1] += rel * np.abs(w).max()  # every output channel, at the centre tap
    init.CopyFrom(numpy_helper.from_array(w.astype(numpy_helper.to_array(init).dtype), init.name))
    return bad


@pytest.mark.parametrize("dtype,rel", [(BF16, 0.1), (np.dtype(np.float64), 1e-4), (np.dtype(np.float16), 0.1)])
def test_verification_rejects_a_wrong_fold(dtype, rel):
    model = _block_model(dtype, relu=False)
    out, _ = onnxrep.optimize(model)
    assert equivalence.compare(model, out).ok
    result = equivalence.compare(model, _perturb_folded(out, rel))
    assert not result.ok and result.widened == WIDENED[dtype]


def test_widened_double_verification_is_as_sharp_as_float32():
    """Widened to float32, a double model's check cannot see an error below float32 resolution:
    the tolerance is float32's, and the fold itself is checked against a float64 fold above."""
    model = _block_model(np.dtype(np.float64), relu=False)
    out, _ = onnxrep.optimize(model)
    fine = equivalence.compare(model, _perturb_folded(out, 1e-10))
    assert fine.ok and fine.widened == ["double"]
    assert all(o.rtol == equivalence.RTOL[np.dtype(np.float32)] for o in fine.outputs)


def test_double_model_onnxruntime_can_run_is_compared_in_double():
    """A double model without Conv (a linear sum) runs natively, under the float64 tolerance."""
    b = Builder(8, input_shape=[2, 8], dtype=np.float64)
    w1, w2 = b.const(b.rng.standard_normal((8, 8))), b.const(b.rng.standard_normal((8, 8)))
    y = b.sum([b.node("MatMul", ["x", w1]), b.node("MatMul", ["x", w2]), "x"])
    model = b.model(y)
    out, report = onnxrep.optimize(model, verify=True)
    assert len(out.graph.node) == 1 and out.graph.node[0].op_type in ("MatMul", "Gemm")
    assert "widened_to_float32" not in report.verification
    (check,) = report.verification["outputs"]
    assert check["rtol"] == equivalence.RTOL[np.dtype(np.float64)]
    bad = _perturb_matmul(out, 1e-9)
    assert not equivalence.compare(model, bad).ok


def _perturb_matmul(model, rel):
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    init = next(i for i in bad.graph.initializer if len(i.dims) == 2)
    w = numpy_helper.to_array(init).copy()
    w[0, 0] += rel * np.abs(w).max()
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    return bad


def test_bfloat16_inputs_are_drawn_in_bfloat16():
    model = _block_model(BF16)
    feeds = equivalence.random_inputs(model, 0)
    assert feeds["x"].dtype == BF16
    wide = equivalence.widen(model)
    assert {i.data_type for i in wide.graph.initializer} == {TensorProto.FLOAT}
    assert wide.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert equivalence.elem_types(model) == {TensorProto.BFLOAT16}


# --------------------------------------------------------------------------------------------
# float32 models with Cast nodes
# --------------------------------------------------------------------------------------------


def _mixed(inner, c=4, spatial=(6, 6)):
    """A float32 model whose body is built in ``inner`` (a dtype): the Builder makes constants in
    ``inner``; input and output are float32."""
    b = Builder(c, spatial=spatial, dtype=inner, opset=OPSET.get(np.dtype(inner), 17))
    b.inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, *spatial])]
    return b


def _finish(b, y):
    b.elem = TensorProto.FLOAT
    return b.model(y)


def _cast(b, x, dtype):
    return b.node("Cast", [x], to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


@pytest.mark.parametrize("inner", DTYPES, ids=_ids(DTYPES))
def test_cast_around_a_block_folds_it_in_its_own_dtype(inner):
    c = 4
    b = _mixed(inner, c)
    y = _cast(b, b.relu(repvgg(b, _cast(b, "x", inner), c)), np.float32)
    model = _finish(b, y)
    out, report = onnxrep.optimize(model, verify=True)
    assert histogram(out) == {"Cast": 2, "Conv": 1, "Relu": 1}
    assert_folded_exactly(out, model, c, inner)
    assert report.verification["ok"]
    assert report.verification.get("widened_to_float32", []) == WIDENED[inner]
    # a float32 output computed in float16 / bfloat16 is held to their tolerance, not float32's
    (check,) = report.verification["outputs"]
    rtol = equivalence.RTOL[np.dtype(np.float32)] if inner == np.float64 else equivalence.rtol_for(inner)
    assert check["rtol"] == rtol and bool(check["notes"]) == (inner != np.float64)  # the note says why


def test_cast_between_conv_and_bn_is_left_alone():
    """Conv in float16, Cast to float32, BN in float32: folding the BN into the float16 conv would
    drop the float32 BN arithmetic for float16 weights; not exact, not matched."""
    c = 4
    b = _mixed(np.float16, c)
    conv = b.conv(_cast(b, "x", np.float16), c, c, 3)
    up = _cast(b, conv, np.float32)
    bf = Builder(c, dtype=np.float32)  # float32 BN parameters
    bn_params = [b.name("bn") for _ in range(4)]
    for name, v in zip(bn_params, bf.bn_params(c)):
        b.inits.append(numpy_helper.from_array(v.astype(np.float32), name))
    y = b.node("BatchNormalization", [up, *bn_params], epsilon=1e-5)
    model = _finish(b, y)
    out, report = onnxrep.optimize(model, verify=True)
    assert histogram(out) == histogram(model) == {"Cast": 2, "Conv": 1, "BatchNormalization": 1}
    assert report.rewritten == 0 and report.verification["ok"]


def test_cast_between_branches_and_the_add_is_left_alone():
    """Each branch computes in float16 and is cast up before a float32 Add: the sum is not a sum
    of convolutions of one tensor in one dtype."""
    c = 4
    b = _mixed(np.float16, c)
    xh = _cast(b, "x", np.float16)
    k3 = _cast(b, b.conv(xh, c, c, 3), np.float32)
    k1 = _cast(b, b.conv(xh, c, c, 1), np.float32)
    y = b.add(k3, k1)
    model = _finish(b, y)
    out, report = onnxrep.optimize(model, verify=True)
    assert histogram(out) == histogram(model) == {"Cast": 3, "Conv": 2, "Add": 1}
    assert report.rewritten == 0 and report.verification["ok"]


def test_one_branch_through_float16_is_not_merged_with_a_float32_branch():
    c = 4
    b = _mixed(np.float32, c)
    k3 = b.conv("x", c, c, 3)
    bh = Builder(c, dtype=np.float16)
    w1 = b.name("w")
    b.inits.append(numpy_helper.from_array(bh.weight(c, c, 1).astype(np.float16), w1))
    k1 = _cast(b, b.node("Conv", [_cast(b, "x", np.float16), w1], kernel_shape=[1, 1]), np.float32)
    y = b.add(k3, k1)
    model = _finish(b, y)
    out, report = onnxrep.optimize(model, verify=True)
    assert histogram(out) == histogram(model)
    assert report.rewritten == 0 and report.verification["ok"]


def test_identity_branch_after_an_upcast_folds_in_float32():
    """x (float16) -> Cast to float32 -> conv3x3 + conv1x1 + identity: an exact float32 fold."""
    c = 4
    b = Builder(c, spatial=(6, 6), dtype=np.float32)
    b.inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, c, 6, 6])]
    xf = _cast(b, "x", np.float32)
    y = b.sum([b.conv(xf, c, c, 3), b.conv(xf, c, c, 1), xf])
    model = b.model(y)
    out, report = onnxrep.optimize(model, verify=True)
    assert histogram(out) == {"Cast": 1, "Conv": 1}
    assert report.verification["ok"]
    # float16 input values, float32 arithmetic: the float32 tolerance
    (check,) = report.verification["outputs"]
    assert check["rtol"] == equivalence.RTOL[np.dtype(np.float32)] and not check["notes"]


# --------------------------------------------------------------------------------------------
# other folds in every precision
# --------------------------------------------------------------------------------------------


def _acnet(b, c):
    return b.sum([b.conv("x", c, c, (3, 3)), b.conv("x", c, c, (1, 3)), b.conv("x", c, c, (3, 1))])


def _avgpool_branch(b, c):
    return b.sum([b.conv("x", c, c, 3), b.bn(b.avgpool("x"), c)])


def _chain(b, c):
    return b.conv(b.conv("x", c, c, 1, bias=False), c, c, 3)


def _scaled(b, c):
    return b.mul_const(b.conv("x", c, c, 3), b.rng.uniform(0.5, 1.5, (1, c, 1, 1)))


def _linear(b, c):
    w1, w2 = b.const(b.rng.standard_normal((c, c)) / 3), b.const(b.rng.standard_normal((c, c)) / 3)
    return b.sum([b.node("MatMul", ["x", w1]), b.node("MatMul", ["x", w2]), "x"])


FOLDS = {  # builder, input shape, ops after
    "acnet": (_acnet, None, {"Conv": 1}),
    "avgpool-branch": (_avgpool_branch, None, {"Conv": 1}),
    "conv-chain": (_chain, None, {"Conv": 1}),
    "scaled-conv": (_scaled, None, {"Conv": 1}),
    "linear-sum": (_linear, [2, 8], None),
}


@pytest.mark.parametrize(
    "fold,dtype",
    [
        pytest.param(f, d, id=f"{d}-{f}")
        for d in DTYPES
        for f in FOLDS
    ],
)
def test_folds_verify_in_every_precision(fold, dtype):
    build, shape, after = FOLDS[fold]
    c = 8
    b = Builder(c, spatial=(6, 6), dtype=dtype, opset=OPSET[dtype], input_shape=shape)
    model = b.model(build(b, c))
    out, report = onnxrep.optimize(model, verify=True)
    assert report.rewritten >= 1
    if after is not None:
        assert histogram(out) == after
    else:
        assert len(out.graph.node) == 1
    assert {i.data_type for i in out.graph.initializer} == {helper.np_dtype_to_tensor_dtype(dtype)}
    assert report.verification["ok"]
