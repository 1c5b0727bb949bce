"""The pipeline, the registry, the report, the graph layer and the verifier."""

import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxrep
from graphs import Builder, histogram
from helpers import break_parallel_merge
from onnxrep import engine, equivalence
from onnxrep.graph import GraphView, import_model


def repvgg_block(c=4, **kw):
    b = Builder(c, **kw)
    y = b.relu(b.sum([b.bn(b.conv("x", c, c, 3, bias=False), c), b.bn(b.conv("x", c, c, 1, bias=False), c), b.bn("x", c)]))
    return b, b.model(y)


def test_passes_folder_is_the_onnxrep_passes_package():
    import onnxrep.passes as p

    assert p.__name__ == "onnxrep.passes"
    assert "parallel-merge" in p.REGISTRY
    assert "passes" not in sys.modules


def test_unknown_pass_is_an_error():
    _, model = repvgg_block()
    with pytest.raises(onnxrep.OnnxrepError, match="unknown pass 'nope'"):
        onnxrep.optimize(model, passes=["nope"])


def test_skip_leaves_the_model_alone():
    _, model = repvgg_block()
    out, report = onnxrep.optimize(model, skip=list(onnxrep.engine.available_passes()))
    assert report.rewritten == 0 and histogram(out) == histogram(model)


def by_name(report, name):
    return next(p for p in report.to_dict()["passes"] if p["name"] == name)


def test_report_counts_ops_and_cost():
    _, model = repvgg_block()
    _, report = onnxrep.optimize(model, passes=["parallel-merge"], verify=True)
    d = report.to_dict()
    assert d["rewritten"] == 1 and by_name(report, "parallel-merge")["matched"] == 1
    assert d["ops_before"] == {"Conv": 2, "BatchNormalization": 3, "Add": 2, "Relu": 1}
    assert d["ops_after"] == {"Conv": 1, "Relu": 1}
    assert d["cost_after"]["macs"] < d["cost_before"]["macs"]
    assert d["cost_before"]["macs"] == 64 * (4 * 4 * 9 + 4 * 4)  # 8x8 positions, 3x3 + 1x1 convs
    assert d["verification"]["ok"] is True


def test_skips_are_reported_with_condition_and_reason():
    c = 8
    b = Builder(c)
    model = b.model(b.add(b.conv("x", c, c, 3, groups=4), b.conv("x", c, c, 1)))
    _, report = onnxrep.optimize(model)
    d = by_name(report, "parallel-merge")
    assert d["skipped_by_condition"] == {"cost": 1}
    assert d["skips"][0]["reason"].startswith("cost: merged kernel [8, 8, 3, 3]")


def test_model_level_fields_are_kept():
    _, model = repvgg_block(input_shape=["batch", 4, 8, 8])
    model.doc_string = "doc"
    model.producer_name, model.producer_version, model.model_version = "prod", "1.2", 7
    helper.set_model_props(model, {"author": "me"})
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    out, _ = onnxrep.optimize(model)
    assert out.doc_string == "doc" and out.producer_name == "prod" and out.model_version == 7
    assert {p.key: p.value for p in out.metadata_props} == {"author": "me"}
    assert list(out.opset_import) == list(model.opset_import)
    assert out.ir_version == model.ir_version
    assert out.graph.input == model.graph.input and out.graph.output == model.graph.output


def test_graph_view_constants_through_identity_and_constant_nodes():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(w)),
        helper.make_node("Identity", ["c"], ["c_id"]),
        helper.make_node("Identity", ["init"], ["init_id"]),
        helper.make_node("Add", ["c_id", "init_id"], ["s"]),
        helper.make_node("Add", ["s", "shadowed"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("shadowed", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(w + 1, "init"), numpy_helper.from_array(w, "shadowed")],
    )
    model = helper.make_model(graph)
    g = import_model(model)
    view = GraphView(g, {i.name for i in model.graph.input})
    t = g.tensors()
    np.testing.assert_array_equal(view.constant(t["c_id"]), w)
    np.testing.assert_array_equal(view.constant(t["init_id"]), w + 1)
    assert view.constant(t["shadowed"]) is None  # an initializer that is also an input can be fed
    assert view.constant(t["s"]) is None
    assert view.producer(t["s"]).op == "Add"
    assert view.source(t["c_id"]) is t["c"]


def test_tensor_read_by_a_subgraph_counts_as_escaping():
    c = 4
    b = Builder(c, spatial=(4, 4))
    one = b.conv("x", c, c, 1)
    y = b.add(b.conv("x", c, c, 3), one)
    then_out = helper.make_tensor_value_info("t_out", onnx.TensorProto.FLOAT, None)
    then_g = helper.make_graph([helper.make_node("Identity", [one], ["t_out"])], "then", [], [then_out])
    else_g = helper.make_graph([helper.make_node("Identity", [y], ["e_out"])], "else", [], [helper.make_tensor_value_info("e_out", onnx.TensorProto.FLOAT, None)])
    b.inits.append(numpy_helper.from_array(np.array(True), "cond"))
    z = b.node("If", ["cond"], then_branch=then_g, else_branch=else_g)
    model = b.model(y, z, output_shapes=[[1, c, 4, 4], [1, c, 4, 4]])
    out, report = onnxrep.optimize(model, verify=True)
    assert report.rewritten == 0
    assert by_name(report, "parallel-merge")["skipped_by_condition"] == {"single_use": 1}


# --------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------


def _perturbed(model, scale):
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    init = next(i for i in bad.graph.initializer if len(i.dims) == 4)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += scale * max(1.0, float(np.abs(arr).max()))
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return bad


def test_verifier_accepts_the_same_model_and_rejects_a_small_change():
    _, model = repvgg_block()
    assert equivalence.compare(model, model).ok
    result = equivalence.compare(model, _perturbed(model, 1e-3))
    assert not result.ok
    assert result.worst().name == model.graph.output[0].name


def test_optimize_raises_on_mismatch(monkeypatch):
    _, model = repvgg_block()
    real = engine.run

    def broken(*a, **kw):
        out, report = real(*a, **kw)
        return _perturbed(out, 1e-3), report

    monkeypatch.setattr(engine, "run", broken)
    with pytest.raises(onnxrep.VerificationError, match="output '.*' differs"):
        onnxrep.optimize(model, verify=True)


@pytest.mark.parametrize(
    "ref,got,ok",
    [
        (np.array([1.0, 2.0], np.float32), np.array([1.0, 2.0 + 1e-6], np.float32), True),
        (np.array([1.0, 2.0], np.float32), np.array([1.0, 2.0 + 1e-4], np.float32), False),
        (np.array([np.nan, 1.0], np.float32), np.array([np.nan, 1.0], np.float32), True),
        (np.array([np.nan, 1.0], np.float32), np.array([0.0, 1.0], np.float32), False),
        (np.array([np.inf, 1.0], np.float32), np.array([-np.inf, 1.0], np.float32), False),
        (np.array([3, 4], np.int64), np.array([3, 4], np.int64), True),
        (np.array([3, 4], np.int64), np.array([3, 5], np.int64), False),
        (np.array([1.0, 2.0], np.float16), np.array([1.0, 2.0 + 1e-2], np.float16), True),
        (np.zeros(3, np.float32), np.full(3, 1e-30, np.float32), False),
        (np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32), False),
    ],
)
def test_output_comparison_tolerances(ref, got, ok):
    assert equivalence.compare_outputs("y", ref, got).ok is ok


def test_random_inputs_fill_symbolic_dims():
    _, model = repvgg_block(input_shape=["N", 4, "H", "W"])
    feeds = equivalence.random_inputs(model, 0, {"H": 5})
    assert feeds["x"].shape == (1, 4, 5, equivalence.DEFAULT_DIM)


def _three_blocks():
    c = 4
    b = Builder(c)
    t = "x"
    for _ in range(3):
        t = b.relu(b.sum([b.conv(t, c, c, 3), b.conv(t, c, c, 1), b.bn(t, c)]))
    return b.model(t)


def test_mismatch_bisection_finds_and_drops_the_broken_rewrite(monkeypatch):
    model = _three_blocks()
    seen = break_parallel_merge(monkeypatch, {1})
    with pytest.raises(onnxrep.VerificationError):
        onnxrep.optimize(model, passes=["parallel-merge"], verify=True)
    out, report = onnxrep.optimize(model, passes=["parallel-merge"], verify=True, on_mismatch="bisect")
    assert report.verification["ok"] and report.verification["bisected"] == {"culprit": seen[1], "pass": "parallel-merge"}
    assert histogram(out)["Conv"] == 1 + 1 + 2  # two blocks merged, the broken one left as it was
    assert report.passes[0].skipped[seen[1]].startswith("denied:")


@pytest.mark.parametrize("opset", [11, 13, 15, 17, 21])
def test_opsets_11_to_21(opset):
    b, model = repvgg_block(opset=opset)
    if opset >= 21:
        model.ir_version = 10
    out, report = onnxrep.optimize(model, verify=True)
    assert histogram(out) == {"Conv": 1, "Relu": 1} and report.verification["ok"]
    assert list(out.opset_import) == list(model.opset_import)


def test_initializers_listed_as_inputs_are_left_alone():
    """IR 3 style: a weight that is also a graph input can be fed at run time, so it is no
    constant; the rewrite is declined with that reason rather than folded."""
    b, model = repvgg_block()
    for init in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    out, report = onnxrep.optimize(model)
    assert report.rewritten == 0 and histogram(out) == histogram(model)
    assert by_name(report, "parallel-merge")["skipped_by_condition"] == {"constant_weights": 1}
    assert by_name(report, "affine-fold")["skipped_by_condition"] == {"constant_weights": 2}


# --------------------------------------------------------------------------------------------
# net cost and the report's per-pass fields
# --------------------------------------------------------------------------------------------


def _dear_chain_body(c, offset):
    """x -> depthwise 3x3 -> 1x1 plus x -> dense 3x3, summed; the dense branch is an output too."""
    b = Builder(c, seed=offset)
    b._n = offset
    dense = b.conv("x", c, c, 3, bias=False)
    y = b.add(b.conv(b.conv("x", c, c, 3, groups=c, bias=False), c, c, 1, bias=False), dense)
    return b, y, dense


def test_net_cost_is_checked_inside_if_bodies(monkeypatch):
    """A body is charged by its rewrites (model_cost sees the main graph only): with conv-chain's
    own check off, the dear chain inside the branch is left out by the engine."""
    import onnxrep.passes.conv_chain as conv_chain

    c = 8
    shape = [1, c, 8, 8]
    t, ty, tdense = _dear_chain_body(c, 1000)
    e = Builder(c, seed=2)
    e._n = 2000
    ey, edense = e.relu("x"), e.node("Neg", ["x"])
    branches = {}
    for name, blder, outs in (("then", t, (ty, tdense)), ("else", e, (ey, edense))):
        vis = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, shape) for o in outs]
        branches[name] = helper.make_graph(blder.nodes, name, [], vis, blder.inits)
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y", "yb"], name="the_if", then_branch=branches["then"], else_branch=branches["else"])],
        "main",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape), helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shape) for n in ("y", "yb")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)

    out, report = onnxrep.optimize(model, verify=True)  # conv-chain's own check declines
    assert report.rewritten == 0 and report.runs == 1
    assert by_name(report, "conv-chain")["skipped_by_condition"] == {"cost": 1}

    monkeypatch.setattr(conv_chain, "_absorption_reason", lambda *a: "")
    out, report = onnxrep.optimize(model, verify=True)
    assert report.verification["ok"] and report.rewritten == 0 and report.runs == 2
    [key] = report.left_out_for_cost
    assert key.startswith("the_if.then_branch/")
    chain = by_name(report, "conv-chain")
    assert chain["skipped_by_condition"] == {"net_cost": 1}
    assert out.graph.node[0].attribute[0].g.node == model.graph.node[0].attribute[0].g.node

    out, report = onnxrep.optimize(model, verify=True, allow_cost_increase=True)
    [entry] = by_name(report, "conv-chain")["rewrites"]
    assert entry["scope"] == "the_if.then_branch" and entry["macs_delta"] > 0 and entry["params_delta"] > 0


def test_last_resort_leaves_out_every_rewrite(monkeypatch):
    """When no rewrite can be named, the last run applies none: the output is the input."""
    import onnxrep.passes.conv_chain as conv_chain

    monkeypatch.setattr(conv_chain, "_absorption_reason", lambda *a: "")
    monkeypatch.setattr(engine, "_culprits", lambda *a: [])
    c = 8
    b, y, dense = _dear_chain_body(c, 0)
    block = b.relu(b.sum([b.conv("x", c, c, 3), b.conv("x", c, c, 1), b.bn("x", c)]))
    model = b.model(y, dense, block)
    out, report = onnxrep.optimize(model, verify=True)
    assert report.verification["ok"] and report.rewritten == 0 and report.runs == 2
    assert histogram(out) == histogram(model)
    reasons = {r.split(":", 1)[0] for p in report.passes for r in p.skipped.values()}
    assert "net_cost" in reasons
    assert len(report.left_out_for_cost) == 2  # the chain and the RepVGG sum


def test_report_times_every_pass():
    _, model = repvgg_block()
    _, report = onnxrep.optimize(model)
    d = report.to_dict()
    assert [p["name"] for p in d["passes"]] == list(engine.available_passes())
    assert all(isinstance(p["seconds"], float) and p["seconds"] >= 0 for p in d["passes"])
    assert by_name(report, "parallel-merge")["seconds"] > 0
    assert d["passes_seconds"] >= by_name(report, "parallel-merge")["seconds"]
    assert {"macs_delta", "params_delta", "seconds"} <= set(by_name(report, "affine-fold"))


def test_reports_of_two_runs_compare_equal_without_timings():
    _, model = repvgg_block()
    a, b = (onnxrep.optimize(model)[1] for _ in range(2))
    assert a.to_dict(timings=False) == b.to_dict(timings=False)
    assert "passes_seconds" not in a.to_dict(timings=False)
    assert all("seconds" not in p for p in a.to_dict(timings=False)["passes"])


def test_constant_cache_is_not_fooled_by_a_reused_id():
    """GraphView caches constants by id: a tensor made and dropped while the view lives (a pass's
    stand-in node) must not hand its values to a later tensor that gets the same id."""
    b, model = repvgg_block()
    view = GraphView(import_model(model), set())
    for i in range(200):
        tensor = onnxrep.graph.gs.Constant(f"t{i}", np.full((i % 7 + 1,), i, np.float32))
        assert np.array_equal(view.constant(tensor), np.full((i % 7 + 1,), i, np.float32))
        del tensor
