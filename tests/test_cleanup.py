"""The generic cleanup after folding (onnxrep/cleanup.py): Constant nodes become initializers,
Identity nodes go (graph outputs keep their names), unused initializers and stale value_info are
dropped, equal initializers are shared; If/Loop bodies are left as they are; nothing computed
changes (outputs equal bit for bit in onnxruntime)."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxrep
from graphs import Builder, histogram, run
from onnxrep import ops
from onnxrep.cleanup import cleanup

F = onnx.TensorProto.FLOAT


def _copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _fastvit_like():
    """A RepMixer-like block as TorchScript exports it: a Conv + BN + identity sum, a GELU spelled
    with Constant nodes, Identity nodes between layers, in front of the graph output and on a
    Constant, two equal biases, an unused initializer and value_info of a tensor that goes away."""
    c = 8
    b = Builder(c, input_shape=[1, c, 8, 8])
    y = b.relu(b.sum([b.bn(b.conv("x", c, c, 3, bias=False), c), b.bn(b.conv("x", c, c, 1), c), b.bn("x", c)]))
    y = b.node(ops.IDENTITY, [y])
    half = b.node(ops.CONSTANT, [], value=numpy_helper.from_array(np.array(0.5, np.float32)))
    one = b.node(ops.CONSTANT, [], value_float=1.0)
    sqrt2 = b.node(ops.CONSTANT, [], value=numpy_helper.from_array(np.array(np.sqrt(2.0), np.float32)))
    sqrt2 = b.node(ops.IDENTITY, [sqrt2])
    erf = b.node("Erf", [b.node("Div", [y, sqrt2])])
    gelu = b.node("Mul", [b.node("Mul", [y, half]), b.node("Add", [erf, one])])
    bias = b.rng.standard_normal((1, c, 1, 1)).astype(np.float32)
    t1 = b.node("Add", [gelu, b.const(bias, "bias")])
    t2 = b.node("Add", [t1, b.const(bias, "bias")])  # the same values under another name
    out = b.node(ops.IDENTITY, [t2])
    b.inits.append(numpy_helper.from_array(np.ones(3, np.float32), "unused"))
    model = b.model(out)
    model.graph.value_info.append(helper.make_tensor_value_info(y, F, [1, c, 8, 8]))
    model.graph.value_info.append(helper.make_tensor_value_info(t1, F, [1, c, 8, 8]))
    onnx.checker.check_model(model)
    return model, b


def test_fastvit_like_graph_ends_without_constant_or_identity_nodes_and_keeps_its_output_names():
    model, b = _fastvit_like()
    before = model.SerializeToString()
    assert histogram(model)[ops.CONSTANT] == 3 and histogram(model)[ops.IDENTITY] == 3
    out, report = onnxrep.optimize(model, verify=True, seeds=1)
    assert model.SerializeToString() == before
    assert ops.CONSTANT not in histogram(out) and ops.IDENTITY not in histogram(out)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in out.graph.input] == ["x"]
    assert report.verification["ok"]
    # the engine drops the unused initializer itself; the shared bias is left unused here
    assert report.cleanup == {"constants": 3, "identities": 3, "shared": 1, "initializers": 1, "value_info": 1}
    assert "unused" not in {t.name for t in out.graph.initializer}
    assert report.ops_after == histogram(out)
    # the weights that moved from Constant nodes into initializers are no new weights
    assert report.cost_after.params <= report.cost_before.params
    onnx.checker.check_model(out, full_check=True)
    feeds = b.feeds()
    np.testing.assert_allclose(run(out, feeds)[0], run(model, feeds)[0], rtol=2e-5, atol=2e-5)


def test_cleanup_alone_changes_no_output_bit_for_bit():
    model, b = _fastvit_like()
    cleaned = _copy(model)
    counts = cleanup(cleaned)
    assert counts == {"constants": 3, "identities": 3, "shared": 1, "initializers": 2, "value_info": 1}
    onnx.checker.check_model(cleaned, full_check=True)
    feeds = b.feeds()
    for got, want in zip(run(cleaned, feeds), run(model, feeds)):
        assert np.array_equal(got, want)
    # nothing left to do: a second cleanup changes nothing
    again = _copy(cleaned)
    assert not any(cleanup(again).values())
    assert again.SerializeToString() == cleaned.SerializeToString()


def test_no_cleanup_keeps_constant_and_identity_nodes():
    model, _ = _fastvit_like()
    out, report = onnxrep.optimize(model, cleanup=False)
    assert report.cleanup is None
    assert histogram(out)[ops.CONSTANT] == 3 and histogram(out)[ops.IDENTITY] == 3
    assert {"bias52", "bias55"} <= {t.name for t in out.graph.initializer}  # both equal biases stay


def test_optimizing_a_cleaned_model_changes_nothing():
    model, _ = _fastvit_like()
    out, _ = onnxrep.optimize(model)
    again, report = onnxrep.optimize(out)
    assert not report.changed and not any(report.cleanup.values()) and report.rewritten == 0
    assert [n.SerializeToString() for n in again.graph.node] == [n.SerializeToString() for n in out.graph.node]
    inits = lambda m: {t.name: t.SerializeToString() for t in m.graph.initializer}  # noqa: E731
    assert inits(again) == inits(out)


def _graph(nodes, inputs, outputs, inits=(), value_info=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits), value_info=list(value_info))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _vi(name, shape=(2, 3)):
    return helper.make_tensor_value_info(name, F, list(shape))


def _feeds(seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((2, 3)).astype(np.float32)}


def _same_outputs(a, b):
    for got, want in zip(run(a, _feeds()), run(b, _feeds())):
        assert np.array_equal(got, want)


def test_identity_of_a_graph_input_to_an_output_stays():
    m = _graph([helper.make_node(ops.IDENTITY, ["x"], ["y"])], [_vi("x")], [_vi("y")])
    out = _copy(m)
    assert cleanup(out)["identities"] == 0
    assert out.SerializeToString() == m.SerializeToString()


def test_two_outputs_of_one_tensor_keep_both_names():
    nodes = [
        helper.make_node("Relu", ["x"], ["t"]),
        helper.make_node(ops.IDENTITY, ["t"], ["o1"]),
        helper.make_node(ops.IDENTITY, ["t"], ["o2"]),
    ]
    m = _graph(nodes, [_vi("x")], [_vi("o1"), _vi("o2")])
    out = _copy(m)
    assert cleanup(out)["identities"] == 1
    onnx.checker.check_model(out, full_check=True)
    assert [o.name for o in out.graph.output] == ["o1", "o2"]
    assert [n.op_type for n in out.graph.node] == ["Relu", ops.IDENTITY]
    assert list(out.graph.node[0].output) == ["o1"]
    _same_outputs(out, m)


def test_identity_in_front_of_an_output_that_also_feeds_a_node():
    nodes = [
        helper.make_node("Relu", ["x"], ["t"]),
        helper.make_node(ops.IDENTITY, ["t"], ["y"]),
        helper.make_node("Neg", ["t"], ["z"]),
    ]
    m = _graph(nodes, [_vi("x")], [_vi("y"), _vi("z")], value_info=[_vi("t")])
    out = _copy(m)
    counts = cleanup(out)
    assert counts["identities"] == 1 and counts["value_info"] == 1
    onnx.checker.check_model(out, full_check=True)
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert list(out.graph.node[1].input) == ["y"]
    _same_outputs(out, m)


def test_identity_of_an_initializer_to_an_output_renames_the_initializer():
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    nodes = [helper.make_node(ops.IDENTITY, ["w"], ["y"]), helper.make_node("Add", ["x", "w"], ["z"])]
    m = _graph(nodes, [_vi("x")], [_vi("y"), _vi("z")], [w])
    out = _copy(m)
    assert cleanup(out)["identities"] == 1
    onnx.checker.check_model(out, full_check=True)
    assert [t.name for t in out.graph.initializer] == ["y"] and not len([n for n in out.graph.node if n.op_type == ops.IDENTITY])
    _same_outputs(out, m)


def test_a_constant_that_is_a_graph_output_stays_a_node():
    nodes = [helper.make_node(ops.CONSTANT, [], ["y"], value_floats=[1.0, 2.0]), helper.make_node("Relu", ["x"], ["z"])]
    m = _graph(nodes, [_vi("x")], [_vi("y", (2,)), _vi("z")])
    out = _copy(m)
    assert cleanup(out)["constants"] == 0
    assert out.SerializeToString() == m.SerializeToString()


@pytest.mark.parametrize(
    "attrs, want",
    [
        ({"value_float": 2.5}, np.array(2.5, np.float32)),
        ({"value_floats": [1.0, 2.0, 3.0]}, np.array([1.0, 2.0, 3.0], np.float32)),
        ({"value_int": 3}, np.array(3, np.int64)),
        ({"value_ints": [1, 2, 3]}, np.array([1, 2, 3], np.int64)),
        ({"value": numpy_helper.from_array(np.ones((2, 3), np.float16))}, np.ones((2, 3), np.float16)),
    ],
)
def test_every_constant_attribute_becomes_an_initializer_of_that_value(attrs, want):
    nodes = [helper.make_node(ops.CONSTANT, [], ["c"], **attrs), helper.make_node(ops.SHAPE, ["c"], ["s"]), helper.make_node("Relu", ["x"], ["z"])]
    m = _graph(nodes, [_vi("x")], [helper.make_tensor_value_info("s", onnx.TensorProto.INT64, [want.ndim]), _vi("z")])
    out = _copy(m)
    assert cleanup(out)["constants"] == 1
    onnx.checker.check_model(out, full_check=True)
    (init,) = out.graph.initializer
    value = numpy_helper.to_array(init)
    assert init.name == "c" and value.dtype == want.dtype and np.array_equal(value, want)
    _same_outputs(out, m)


def test_only_equal_type_shape_and_bytes_are_shared_and_inputs_never():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    inits = [
        numpy_helper.from_array(a, "a"),
        numpy_helper.from_array(a.copy(), "a_same"),
        numpy_helper.from_array(a.reshape(3, 2), "a_other_shape"),
        numpy_helper.from_array(a.view(np.int32), "a_other_type"),
        numpy_helper.from_array(a.copy(), "a_input"),  # also a graph input: a default the caller may override
    ]
    nodes = [
        helper.make_node("Add", ["x", "a"], ["t1"]),
        helper.make_node("Add", ["t1", "a_same"], ["t2"]),
        helper.make_node("Add", ["t2", "a_input"], ["t3"]),
        helper.make_node("Reshape", ["a_other_shape", "shape"], ["r"]),
        helper.make_node("Add", ["t3", "r"], ["t4"]),
        helper.make_node("Cast", ["a_other_type"], ["ci"], to=F),
        helper.make_node("Add", ["t4", "ci"], ["y"]),
    ]
    inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "shape"))
    m = _graph(nodes, [_vi("x"), _vi("a_input")], [_vi("y")], inits)
    out = _copy(m)
    counts = cleanup(out)
    assert counts["shared"] == 1 and counts["initializers"] == 1
    assert [t.name for t in out.graph.initializer] == ["a", "a_other_shape", "a_other_type", "a_input", "shape"]
    assert list(out.graph.node[1].input) == ["t1", "a"]
    onnx.checker.check_model(out, full_check=True)
    _same_outputs(out, m)


def _if_model():
    """An If whose branches hold a Constant and an Identity, and read outer tensors: an Identity's
    output and a Constant node's output of the main graph."""
    then_nodes = [
        helper.make_node(ops.CONSTANT, [], ["k"], value_float=2.0),
        helper.make_node(ops.IDENTITY, ["outer_id"], ["ti"]),
        helper.make_node("Mul", ["ti", "k"], ["then_out"]),
    ]
    then_g = helper.make_graph(then_nodes, "then", [], [_vi("then_out")])
    else_g = helper.make_graph([helper.make_node("Add", ["outer_id", "outer_c"], ["else_out"])], "else", [], [_vi("else_out")])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node(ops.IDENTITY, ["r"], ["outer_id"]),
        helper.make_node(ops.CONSTANT, [], ["outer_c"], value_float=1.0),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    return _graph(nodes, [_vi("x")], [_vi("y")], [zero])


def test_if_bodies_are_left_alone_and_outer_names_they_read_are_kept():
    m = _if_model()
    out = _copy(m)
    counts = cleanup(out)
    # the outer Constant becomes an initializer of the same name (the else branch still sees it);
    # the Identity whose output the branches read stays
    assert counts["constants"] == 1 and counts["identities"] == 0
    if_node = next(n for n in out.graph.node if n.op_type == "If")
    original = next(n for n in m.graph.node if n.op_type == "If")
    assert if_node.SerializeToString() == original.SerializeToString()
    assert "outer_c" in {t.name for t in out.graph.initializer}
    onnx.checker.check_model(out, full_check=True)
    for seed in (0, 1, 2):
        feeds = {"x": np.random.default_rng(seed).standard_normal((2, 3)).astype(np.float32)}
        for got, want in zip(run(out, feeds), run(m, feeds)):
            assert np.array_equal(got, want)


def test_if_model_through_optimize_verifies():
    m = _if_model()
    out, report = onnxrep.optimize(m, verify=True, seeds=1)
    assert report.verification["ok"] and report.cleanup["constants"] == 1
    assert [o.name for o in out.graph.output] == ["y"]


def test_identity_in_another_domain_is_not_touched():
    nodes = [helper.make_node("Relu", ["x"], ["t"]), helper.make_node(ops.IDENTITY, ["t"], ["y"], domain="com.example")]
    g = helper.make_graph(nodes, "g", [_vi("x")], [_vi("y")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    out = _copy(m)
    assert cleanup(out)["identities"] == 0
    assert out.SerializeToString() == m.SerializeToString()


def test_lazily_read_duplicates_are_shared_when_written_without_verification(tmp_path):
    """Without verification a file's large weights stay in the file (io.load lazy): equal ones are
    still found (their bytes are read from the file) and shared."""
    w = np.random.default_rng(0).standard_normal((3, 200 * 200)).astype(np.float32).reshape(3, 200, 200)
    inits = [numpy_helper.from_array(w, "w1"), numpy_helper.from_array(w.copy(), "w2")]
    nodes = [helper.make_node("Add", ["x", "w1"], ["t"]), helper.make_node("Add", ["t", "w2"], ["y"])]
    shape = [3, 200, 200]
    m = _graph(nodes, [_vi("x", shape)], [_vi("y", shape)], inits)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    report = onnxrep.api.optimize_file(src, dst, verify=False)
    assert report.cleanup["shared"] == 1
    out = onnx.load(dst)
    assert [t.name for t in out.graph.initializer] == ["w1"]
    feeds = {"x": np.ones(shape, np.float32)}
    assert np.array_equal(run(out, feeds)[0], run(m, feeds)[0])


@pytest.mark.zoo
def test_timm_fastvit_torchscript_export_ends_without_constant_or_identity_nodes(tmp_path_factory):
    """timm's fastvit_t8 as TorchScript exports it holds Constant and Identity nodes (so does its
    deploy form's export); onnxrep's output holds none, keeps its output names, and verifies."""
    import os

    pytest.importorskip("torch")
    import zoo_models as zm

    try:
        zm.import_timm()
    except ImportError as err:
        pytest.skip(f"timm is not installed ({err})")
    folder = os.environ.get("ONNXREP_ZOO_CACHE") or tmp_path_factory.mktemp("zoo-cleanup")
    train, _ = zm.Builder(folder).paths("fastvit_t8", zm.TORCHSCRIPT)
    model = onnx.load(train)
    assert histogram(model)[ops.CONSTANT] > 0 and histogram(model)[ops.IDENTITY] > 0
    out, report = onnxrep.optimize(train, verify=True, seeds=1)
    assert report.verification["ok"]
    assert ops.CONSTANT not in histogram(out) and ops.IDENTITY not in histogram(out)
    assert report.cleanup["constants"] > 0 and report.cleanup["identities"] > 0
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]


def test_constant_nodes_stay_in_an_ir_version_3_model():
    """Before IR version 4 every initializer is also a graph input (a value a caller may feed):
    a Constant node made an initializer would have to become one."""
    value = numpy_helper.from_array(np.array(2.0, np.float32))
    nodes = [helper.make_node(ops.CONSTANT, [], ["c"], value=value), helper.make_node("Mul", ["x", "c"], ["y"])]
    g = helper.make_graph(nodes, "g", [_vi("x")], [_vi("y")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 8)])
    m.ir_version = 3
    onnx.checker.check_model(m)
    out = _copy(m)
    assert cleanup(out)["constants"] == 0
    assert out.SerializeToString() == m.SerializeToString()
    m.ir_version = 4
    out = _copy(m)
    assert cleanup(out)["constants"] == 1
    onnx.checker.check_model(out)
