"""Semantics below opset 7: BatchNormalization-1/-6 are in training mode unless ``is_test=1``, and
Add/Sub/Mul/Div broadcast only with ``broadcast=1``, aligning the second operand at ``axis`` (by
default at the end). onnxruntime loads opset 6 models but has no kernels for these versions of the
ops: the original is computed in numpy (float64), the folded model (Conv-1 only) in onnxruntime."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxrep
from graphs import conv_ref, histogram, run
from onnxrep.graph import GraphView, import_model
from onnxrep.passes._common import bn_inference_reason, legacy_operand, node_affine

C, HW = 4, 6


def legacy_model(nodes, inits, opset=6, out="y", out_shape=(1, C, HW, HW)):
    graph = helper.make_graph(
        nodes,
        "legacy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, HW, HW])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, list(out_shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 4  # initializers need not be graph inputs (IR 3 would make them inputs)
    onnx.checker.check_model(model)
    return model


def conv_nodes(rng):
    w = rng.standard_normal((C, C, 3, 3)).astype(np.float32) / 6
    b = rng.standard_normal(C).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    return [helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3])], inits


def conv_of(model, x, w="w", b="b"):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    k = inits[w]
    pads = [(k.shape[-1] - 1) // 2] * 4
    return conv_ref(x, inits[w], inits.get(b), pads=pads), inits


def assert_matches(reference, out):
    """``out`` (Conv nodes only) in onnxruntime against the float64 reference of the original."""
    [got] = run(out, feeds())
    err = float(np.max(np.abs(got.astype(np.float64) - reference)))
    assert err <= 1e-5 * float(np.max(np.abs(reference))), err


def bn_model(opset=6, **attrs):
    rng = np.random.default_rng(0)
    nodes, inits = conv_nodes(rng)
    params = [rng.uniform(0.5, 1.5, C), rng.standard_normal(C) * 0.1, rng.standard_normal(C) * 0.1, rng.uniform(0.5, 2, C)]
    for name, p in zip(("scale", "bias", "mean", "var"), params):
        inits.append(numpy_helper.from_array(p.astype(np.float32), name))
    nodes.append(helper.make_node("BatchNormalization", ["h", "scale", "bias", "mean", "var"], ["y"], name="bn", epsilon=1e-5, **attrs))
    return legacy_model(nodes, inits, opset)


def binary_model(op, const, const_first=False, opset=6, **attrs):
    rng = np.random.default_rng(0)
    nodes, inits = conv_nodes(rng)
    inits.append(numpy_helper.from_array(np.asarray(const, np.float32), "k"))
    operands = ["k", "h"] if const_first else ["h", "k"]
    nodes.append(helper.make_node(op, operands, ["y"], name="binary", **attrs))
    return legacy_model(nodes, inits, opset)


def feeds():
    return {"x": np.random.default_rng(1).standard_normal((1, C, HW, HW)).astype(np.float32)}


def affine_fold(model):
    out, report = onnxrep.optimize(model, passes=["affine-fold"])
    onnx.checker.check_model(out)
    return out, report


def skips(report):
    return [s["reason"] for p in report.to_dict()["passes"] for s in p["skips"]]


# --------------------------------------------------------------------------------------------
# BatchNormalization below opset 7
# --------------------------------------------------------------------------------------------


def bn_reference(model):
    h, inits = conv_of(model, feeds()["x"])
    scale, bias, mean, var = (inits[n].astype(np.float64).reshape(1, C, 1, 1) for n in ("scale", "bias", "mean", "var"))
    return (h - mean) / np.sqrt(var + 1e-5) * scale + bias


@pytest.mark.parametrize("attrs", [{}, {"is_test": 0}])
def test_bn6_in_training_mode_is_not_folded(attrs):
    model = bn_model(**attrs)
    out, report = affine_fold(model)
    assert report.rewritten == 0 and histogram(out) == histogram(model)
    [reason] = skips(report)
    assert reason.startswith("inference_bn: BatchNormalization 'bn' has is_test=0 below opset 7")


def test_bn6_in_test_mode_is_folded_exactly():
    model = bn_model(is_test=1)
    out, report = affine_fold(model)
    assert histogram(out) == {"Conv": 1}
    assert_matches(bn_reference(model), out)


def test_bn1_with_consumed_inputs():
    """BatchNormalization-1: ``consumed_inputs`` (in-place updates of training) and ``is_test``."""
    model = bn_model(opset=5, is_test=1, consumed_inputs=[0, 0, 0, 1, 1])
    out, report = affine_fold(model)
    assert histogram(out) == {"Conv": 1}
    assert_matches(bn_reference(model), out)
    model = bn_model(opset=5, consumed_inputs=[0, 0, 0, 1, 1])
    out, report = affine_fold(model)
    assert report.rewritten == 0 and skips(report)[0].startswith("inference_bn:")


def test_bn_condition_takes_the_opset():
    graph = import_model(bn_model(opset=7))  # is_test is no attribute of BatchNormalization-7
    bn = next(n for n in graph.nodes if n.op == "BatchNormalization")
    view = GraphView(graph)
    assert bn_inference_reason(bn, view) is None
    assert bn_inference_reason(bn, view, 6).startswith("BatchNormalization 'bn' has is_test=0 below opset 7")
    bn.attrs["is_test"] = 1
    assert bn_inference_reason(bn, view, 6) is None


# --------------------------------------------------------------------------------------------
# legacy broadcasting
# --------------------------------------------------------------------------------------------


SCALE = np.array([0.5, -2.0, 3.0, 1.5])


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
def test_per_channel_constant_at_axis_1_folds_on_axis_1(op):
    """broadcast=1, axis=1: a [C] constant is per channel on axis 1 (read the modern way it would
    lie on the last axis), and folds into the conv as such."""
    model = binary_model(op, SCALE, broadcast=1, axis=1)
    out, report = affine_fold(model)
    assert histogram(out) == {"Conv": 1}, skips(report)
    h, _ = conv_of(model, feeds()["x"])
    k = SCALE.astype(np.float32).astype(np.float64).reshape(1, C, 1, 1)
    reference = {"Mul": h * k, "Add": h + k, "Sub": h - k, "Div": h / k}[op]
    assert_matches(reference, out)


def test_per_channel_constant_on_the_last_axis_is_not_read_as_channels():
    """broadcast=1 without axis aligns a [W] constant with the last axis: not per channel."""
    model = binary_model("Mul", np.linspace(0.5, 2, HW), broadcast=1)
    out, report = affine_fold(model)
    assert report.rewritten == 0 and histogram(out) == histogram(model)
    assert skips(report) == [f"per_channel: Mul 'binary' constant of shape [{HW}] is not per-channel for {C} channels"]


def test_constant_first_operand_with_broadcast_is_declined():
    model = binary_model("Sub", np.float32(3.0).reshape(1), const_first=True, broadcast=1)
    out, report = affine_fold(model)
    assert report.rewritten == 0
    [reason] = skips(report)
    assert "uses legacy broadcast (broadcast=1) below opset 7" in reason and "first operand" in reason


def test_broadcast_0_needs_equal_shapes():
    graph = import_model(binary_model("Mul", SCALE.reshape(1, C, 1, 1), broadcast=1, axis=0))
    node = next(n for n in graph.nodes if n.op == "Mul")
    node.attrs.pop("broadcast")
    node.attrs.pop("axis")
    assert legacy_operand(node, SCALE, False, 4, 6).startswith(
        "Mul 'binary' uses legacy broadcast (broadcast=0) below opset 7: its constant of shape [4] does not have the data's 4 dims"
    )
    assert legacy_operand(node, SCALE.reshape(1, C, 1, 1), False, 4, 6).shape == (1, C, 1, 1)
    assert legacy_operand(node, SCALE, False, 4, 7) is SCALE


def test_constant_that_does_not_fit_its_axis_is_declined():
    graph = import_model(binary_model("Mul", SCALE, broadcast=1, axis=1))
    node = next(n for n in graph.nodes if n.op == "Mul")
    node.attrs["axis"] = 3  # [C] aligned with the last axis: fits, but is not per channel
    assert node_affine(node, GraphView(graph), C, 4) == "Mul 'binary' constant of shape [4] is not per-channel for 4 channels"
    node.attrs["axis"] = 4
    reason = node_affine(node, GraphView(graph), C, 4)
    assert reason == "Mul 'binary' uses legacy broadcast (broadcast=1) below opset 7: its constant of shape [4] does not fit at axis 4 of 4 dims"
    assert "is not per-channel" in node_affine(node, GraphView(graph), C, 4, opset=7)  # modern: the last axis


def test_legacy_sum_with_broadcast_is_a_term_not_a_sum():
    """parallel-merge does not take an Add with broadcast=1 below opset 7 for a sum of branches."""
    rng = np.random.default_rng(0)
    nodes, inits = conv_nodes(rng)
    inits.append(numpy_helper.from_array(rng.standard_normal((C, C, 1, 1)).astype(np.float32), "w1"))
    nodes.append(helper.make_node("Conv", ["x", "w1"], ["h1"], name="conv1", kernel_shape=[1, 1]))
    nodes.append(helper.make_node("Add", ["h", "h1"], ["y"], name="add"))
    model = legacy_model(nodes, inits)
    out, _ = onnxrep.optimize(model, passes=["parallel-merge"])
    assert histogram(out) == {"Conv": 1}  # broadcast=0 (equal shapes): an ordinary sum
    h, inits_ = conv_of(model, feeds()["x"])
    h1 = conv_ref(feeds()["x"], inits_["w1"])
    assert_matches(h + h1, out)
    nodes[-1] = helper.make_node("Add", ["h", "h1"], ["y"], name="add", broadcast=1)
    model = legacy_model(nodes, inits)
    out, report = onnxrep.optimize(model, passes=["parallel-merge"])
    assert histogram(out) == histogram(model) and report.passes[0].matched == 0


# --------------------------------------------------------------------------------------------
# channel pruning through a legacy-broadcast Mul / Add
# --------------------------------------------------------------------------------------------


def pruning_model(op, const, shape_attrs, dead=True):
    """conv (channel 2 dead: zero filter and bias, or a copy of channel 0) -> op(h, k, legacy
    broadcast) -> Relu -> conv2."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((C, C, 3, 3)).astype(np.float32) / 6
    b = rng.standard_normal(C).astype(np.float32) * 0.1
    if dead:
        w[2], b[2] = 0, 0
    else:
        w[2], b[2] = w[0], b[0]
    w2 = rng.standard_normal((C, C, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.asarray(const, np.float32), "k")]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node(op, ["h", "k"], ["m"], name="binary", **shape_attrs),
        helper.make_node("Relu", ["m"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", kernel_shape=[1, 1]),
    ]
    return legacy_model(nodes, inits)


def pruning_reference(model, op, const, shape_attrs):
    """The original in float64, the constant placed by legacy broadcasting."""
    h, inits = conv_of(model, feeds()["x"])
    k = np.asarray(const, np.float32).astype(np.float64)
    start = shape_attrs.get("axis", 4 - k.ndim)
    k = k.reshape((1,) * start + k.shape + (1,) * (4 - start - k.ndim))
    m = h * k if op == "Mul" else h + k
    return conv_ref(np.maximum(m, 0.0), inits["w2"])


SHARED = np.array([0.5, -2.0, 0.5, 1.5])  # channels 0 and 2 alike (identical-filters merges them)
LEGACY_PRUNING_CASES = [
    ("Mul", SHARED, {"broadcast": 1, "axis": 1}),  # [C] at axis 1: per channel
    ("Add", SHARED * 0.1, {"broadcast": 1, "axis": 1}),
    ("Mul", SHARED.reshape(C, 1, 1), {"broadcast": 1}),  # [C, 1, 1] aligned at the end: per channel
    ("Mul", SHARED.reshape(1, C, 1), {"broadcast": 1, "axis": 0}),  # [1, C, 1] at axis 0: per channel
    ("Mul", SHARED.reshape(1, C, 1, 1), {}),  # broadcast=0: equal ranks
]


@pytest.mark.parametrize("dead", [True, False], ids=["dead-channels", "identical-filters"])
@pytest.mark.parametrize("op,const,attrs", LEGACY_PRUNING_CASES)
def test_channel_pruning_through_a_legacy_broadcast_is_exact(op, const, attrs, dead):
    """A channel pruned before a Mul/Add with legacy broadcasting: its constant is sliced where
    legacy broadcasting places the channels (not where numpy's would), or the candidate is
    declined; never a wrong model."""
    model = pruning_model(op, const, attrs, dead)
    reference = pruning_reference(model, op, const, attrs)
    out, report = onnxrep.optimize(model, passes=["dead-channels" if dead else "identical-filters"])
    onnx.checker.check_model(out, full_check=True)
    assert report.rewritten == 1, skips(report)
    weights = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert weights[conv.input[1]].shape[0] == C - 1
    binary = next(n for n in out.graph.node if n.op_type == op)
    assert {a.name: helper.get_attribute_value(a) for a in binary.attribute} == attrs
    k = weights[binary.input[1]]
    assert k.ndim == np.ndim(const) and k.size == C - 1
    # the pruned model in float64 (its Mul/Add legacy too), against the original
    h, _ = conv_of(out, feeds()["x"], w=conv.input[1], b=conv.input[2])
    start = attrs.get("axis", 4 - k.ndim)
    k64 = k.astype(np.float64).reshape((1,) * start + k.shape + (1,) * (4 - start - k.ndim))
    m = h * k64 if op == "Mul" else h + k64
    conv2 = [n for n in out.graph.node if n.op_type == "Conv"][1]
    got = conv_ref(np.maximum(m, 0.0), weights[conv2.input[1]], weights.get(conv2.input[2]) if len(conv2.input) > 2 else None)
    err = float(np.max(np.abs(got - reference)))
    assert err <= 1e-5 * float(np.max(np.abs(reference))), err


def test_channel_pruning_through_a_constant_first_legacy_broadcast_is_declined():
    model = pruning_model("Mul", SHARED, {"broadcast": 1, "axis": 1})
    node = model.graph.node[1]
    node.input[0], node.input[1] = "k", "h"
    out, report = onnxrep.optimize(model, passes=["dead-channels"])
    assert report.rewritten == 0
    assert any(r.startswith("per_channel:") and "first operand" in r for r in skips(report)), skips(report)
