"""Region and body checks (onnxrep.regions): each rewrite the engine writes is cut out of both models
and probed on its own; affine regions are proven by spanning probes; wrong rewrites are caught
where whole-model random inputs miss them (a corner pixel, a branch never taken)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import Builder, run
from onnxrep import engine, equivalence, regions
from onnxrep.regions import Region, check_regions

C = 4
SHAPE = [1, C, 8, 8]


def repvgg(b: Builder, x: str, c: int = C) -> str:
    return b.sum([b.bn(b.conv(x, c, c, 3, bias=False), c), b.bn(b.conv(x, c, c, 1, bias=False), c), b.bn(x, c)])


def repvgg_model():
    b = Builder(C, spatial=SHAPE[2:], seed=3)
    y = b.relu(repvgg(b, b.relu(repvgg(b, "x"))))
    return b.model(y)


@pytest.fixture(scope="module")
def folded():
    model = repvgg_model()
    out, report = engine.run(model)
    return model, out, report


def by_key(checks):
    return {c.key: c for c in checks}


def only_conv(model: onnx.ModelProto, output: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if output in n.output)


def initializer(graph: onnx.GraphProto, name: str) -> onnx.TensorProto:
    return next(t for t in graph.initializer if t.name == name)


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


# --------------------------------------------------------------------------------------------
# correct folds are proven
# --------------------------------------------------------------------------------------------


def test_repvgg_fold_is_proven_by_spanning_probes(folded):
    model, out, report = folded
    regs = regions.regions_for(report, model, out)
    assert len(regs) == 2 and all(not r.scope for r in regs)
    before = (model.SerializeToString(), out.SerializeToString())
    checks = check_regions(model, out, regs)
    assert (model.SerializeToString(), out.SerializeToString()) == before  # neither model changed
    assert len(checks) == 2
    for c in checks:
        assert c.ok and c.status == "equal" and c.proven, c.to_dict()
        assert c.candidates == [c.key]
        assert c.method == "spanning probes (257)"  # 1 x 4 x 8 x 8 inputs + the zero probe
        assert c.probes > 257 and c.max_rel_error < 1e-5
        assert "spanning probes in batches of 257" in c.note
        assert c.to_dict()["proven"] is True


def test_changed_regions_match_the_report(folded):
    model, out, report = folded
    found = regions.changed_regions(model, out)
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert sorted((r.output, r.inputs) for r in found) == sorted(([n.output[0]], [n.input[0]]) for n in convs)
    assert regions.changed_regions(model, model) == []


def test_regions_from_report_entries():
    entries = [
        {"candidate": "a", "round": 1, "summary": "", "output": "y", "inputs": ["x"]},
        {"candidate": "b", "round": 1, "summary": "", "output": ["u", "v"], "inputs": ["x", "w"]},
        {"candidate": "body/c", "round": 1, "summary": "", "scope": "the_if.then_branch"},
        {"candidate": "d", "round": 1, "summary": ""},
    ]
    regs, missing = regions.regions_from_report(entries)
    assert regs == [
        Region(["y"], ["x"], None, "a"),
        Region(["u", "v"], ["x", "w"], None, "b"),
        Region([], [], "the_if.then_branch", "body/c"),
    ]
    assert missing == ["d"]


def test_region_above_max_proof_elems_is_checked_but_not_proven(folded):
    model, out, report = folded
    checks = check_regions(model, out, regions.regions_for(report, model, out), max_proof_elems=255)
    for c in checks:
        assert c.ok and not c.proven
        assert c.method == f"probes ({c.probes})" and 0 < c.probes < 257
        assert "256 input elements > 255" in c.note
    assert regions.summarize(checks) == {
        "ok": True, "regions": 2, "proven": 0, "equal": 2, "differs": 0, "superseded": 0, "unchecked": 0,
    }


def test_region_above_max_proof_macs_is_checked_but_not_proven(folded):
    model, out, report = folded
    # the original block: 3x3 and 1x1 convs (4*4*(9+1)*64 MACs), the folded one: a 3x3 conv (4*4*9*64)
    macs = 4 * 4 * 10 * 64 + 4 * 4 * 9 * 64
    regs = regions.regions_for(report, model, out)
    checks = check_regions(model, out, regs, max_proof_macs=257 * macs - 1)
    assert all(c.ok and not c.proven for c in checks)
    assert all(f"257 spanning probes x {macs:.3g} MACs" in c.note for c in checks)
    assert all(c.proven for c in check_regions(model, out, regs, max_proof_macs=257 * macs))


# --------------------------------------------------------------------------------------------
# wrong rewrites are caught
# --------------------------------------------------------------------------------------------


def test_one_wrong_border_weight_is_caught(folded):
    model, out, report = folded
    bad = copy(out)
    conv = bad.graph.node[0]
    w = initializer(bad.graph, conv.input[1])
    values = numpy_helper.to_array(w).copy()
    values[0, 0, 0, 0] *= 1.001  # a corner tap: reads the padding at the top-left border
    w.CopyFrom(numpy_helper.from_array(values, w.name))
    checks = check_regions(model, bad, regions.regions_for(report, model, bad))
    [wrong] = [c for c in checks if conv.output[0] in c.outputs]
    assert not wrong.ok and wrong.status == "differs" and not wrong.proven
    assert "differs on probe" in wrong.note
    [other] = [c for c in checks if c is not wrong]
    assert other.ok and other.proven  # the other block is still proven


def test_a_weight_off_by_1e_4_is_caught_by_the_proof_and_by_dense_probes(folded):
    """A fold 1e-4 off in one corner tap: the spanning probe of that input pixel sees it in the
    column it sits in, and the dense probes in the element-wise rule of the model check."""
    model, out, report = folded
    bad = copy(out)
    w = initializer(bad.graph, bad.graph.node[0].input[1])
    values = numpy_helper.to_array(w).copy()
    values[0, 0, 0, 0] *= np.float32(1.0001)
    w.CopyFrom(numpy_helper.from_array(values, w.name))
    regs = regions.regions_for(report, model, bad)
    [wrong] = [c for c in check_regions(model, bad, regs) if not c.ok]
    assert "differs on probe 'basis x[" in wrong.note
    [wrong] = [c for c in check_regions(model, bad, regs, max_proof_elems=10) if not c.ok]
    assert "differs on probe 'normal seed" in wrong.note


def test_dropped_padding_is_caught(folded):
    model, out, report = folded
    bad = copy(out)
    for attr in bad.graph.node[2].attribute:
        if attr.name == "pads":
            attr.ints[:] = [0, 0, 0, 0]
    bad.graph.ClearField("value_info")
    # the second block's output shrinks to 6 x 6 (the model's output too)
    bad.graph.output[0].type.tensor_type.ClearField("shape")
    checks = check_regions(model, bad, regions.regions_for(report, model, bad))
    wrong = [c for c in checks if not c.ok]
    assert len(wrong) == 1 and wrong[0].outputs == [bad.graph.node[2].output[0]]
    assert "shape (1, 4, 6, 6) instead of (1, 4, 8, 8)" in wrong[0].note


def corner_trigger(out: onnx.ModelProto, target: str, x: str = "x", factor: float = 4.0) -> onnx.ModelProto:
    """``out`` with ``relu(|x[:, :, 0, 0]| - factor * max|x elsewhere|)`` added at the top-left
    pixel of ``target``: wrong only when that corner pixel dominates the whole input."""
    bad = copy(out)
    g = bad.graph
    conv = only_conv(bad, target)
    conv.output[0] = target + ".pre"
    mask = np.ones(SHAPE, np.float32)
    mask[:, :, 0, 0] = 0
    g.initializer.extend([
        numpy_helper.from_array(mask, "corner.mask"),
        numpy_helper.from_array(np.array([0, 0], np.int64), "corner.starts"),
        numpy_helper.from_array(np.array([1, 1], np.int64), "corner.ends"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "corner.axes"),
        numpy_helper.from_array(np.array(factor, np.float32), "corner.factor"),
        numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 7, 7], np.int64), "corner.pads"),
    ])
    extra = [
        helper.make_node("Abs", [x], ["corner.abs"]),
        helper.make_node("Slice", ["corner.abs", "corner.starts", "corner.ends", "corner.axes"], ["corner.value"]),
        helper.make_node("Mul", ["corner.abs", "corner.mask"], ["corner.rest"]),
        helper.make_node("ReduceMax", ["corner.rest"], ["corner.rest_max"], keepdims=1),
        helper.make_node("Mul", ["corner.rest_max", "corner.factor"], ["corner.bound"]),
        helper.make_node("Sub", ["corner.value", "corner.bound"], ["corner.excess"]),
        helper.make_node("Relu", ["corner.excess"], ["corner.trigger"]),
        helper.make_node("Pad", ["corner.trigger", "corner.pads"], ["corner.full"]),
        helper.make_node("Add", [target + ".pre", "corner.full"], [target]),
    ]
    at = list(g.node).index(conv) + 1
    nodes = list(g.node[:at]) + extra + list(g.node[at:])
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(bad)
    return bad


def test_error_only_the_border_probe_sets_off(folded):
    model, out, report = folded
    target = out.graph.node[0].output[0]
    bad = corner_trigger(out, target)
    # the error is real: a lone bright corner pixel changes the output there
    probe = np.zeros(SHAPE, np.float32)
    probe[0, 0, 0, 0] = 1.0
    assert not np.allclose(run(model, {"x": probe})[0], run(bad, {"x": probe})[0], rtol=1e-3)
    # whole-model verification on random inputs does not see it
    assert equivalence.compare(model, bad).ok
    regs = regions.regions_for(report, model, bad)
    # nor does any probe but the border ones (zeros, normal x1 and x1000, index, the model's values)
    blind = by_key(check_regions(model, bad, regs, probes=("zeros", "normal", "large", "index", "model")))
    assert all(c.ok for c in blind.values())
    assert not any(c.proven for c in blind.values() if target in c.outputs)  # Abs, ReduceMax, Relu: not affine
    checks = by_key(check_regions(model, bad, regs))
    wrong = [c for c in checks.values() if not c.ok]
    assert len(wrong) == 1 and wrong[0].outputs == [target]
    assert "on probe 'border corner 0'" in wrong[0].note, wrong[0].note


def test_superseded_region():
    """conv-chain folds 1x1 -> 3x3 into the tensor that parallel-merge then folds into the sum."""
    b = Builder(C, spatial=SHAPE[2:], seed=5)
    chain = b.conv(b.conv("x", C, C, 1, bias=False), C, C, 3)
    y = b.add(chain, b.conv("x", C, C, 3))
    model = b.model(y)
    out, report = engine.run(model)
    passes = {p.name: p for p in report.passes}
    assert passes["conv-chain"].rewritten == 1 and passes["parallel-merge"].rewritten == 1
    regs = [
        Region([chain], ["x"], None, "conv-chain"),
        Region([y], ["x"], None, "parallel-merge"),
    ]
    checks = by_key(check_regions(model, out, regs))
    gone = checks["conv-chain"]
    assert gone.ok and gone.status == "superseded" and not gone.proven and gone.probes == 0
    assert f"'{chain}' is no longer in the optimized model" in gone.note
    assert checks["parallel-merge"].proven and checks["parallel-merge"].status == "equal"
    # without the region that consumed it, a vanished output is not passed
    [alone] = check_regions(model, out, regs[:1])
    assert alone.status == "unchecked" and not alone.ok
    assert "no checked region computes it" in alone.note


def bn_conv():
    """``y = Conv(BN(x))``: affine-fold writes ``y = Conv'(x)``, and ``h = BN(x)`` is gone."""
    b = Builder(C, spatial=SHAPE[2:], seed=6)
    h = b.bn("x", C)
    y = b.conv(h, C, C, 1)
    model = b.model(y)
    out, report = engine.run(model)
    assert [n.op_type for n in out.graph.node] == ["Conv"] and out.graph.node[0].input[0] == "x"
    return model, out, report, h, y


def test_region_whose_input_a_later_rewrite_consumed_is_superseded():
    model, out, _, h, y = bn_conv()
    checks = by_key(check_regions(model, out, [Region([y], [h], None, "early"), Region([y], ["x"], None, "later")]))
    assert checks["early"].status == "superseded" and checks["early"].ok
    assert f"'{h}' is no longer in the optimized model" in checks["early"].note
    assert checks["later"].status == "equal" and checks["later"].proven


def test_region_that_lost_an_input_no_other_region_explains_grows():
    """Without the region that consumed h, the region moves its start back to where the optimized
    subgraph starts (x), and is checked from there."""
    model, out, _, h, y = bn_conv()
    [check] = check_regions(model, out, [Region([y], [h], None, "alone")])
    assert check.status == "equal" and check.proven and check.inputs == ["x"]
    assert f"'{h}' is no longer in the optimized model: the region starts where the optimized subgraph does" in check.note


def test_region_that_dropped_a_term_differs():
    """``y = Conv(x) + BN(u)``, wrongly rewritten to a Conv of x alone: the lost input BN(u) cannot
    be computed from x, so it is fed as it was, and the difference shows."""
    b = Builder(C, spatial=SHAPE[2:], seed=14)
    b.inputs.append(helper.make_tensor_value_info("u", TensorProto.FLOAT, SHAPE))
    t = b.bn("u", C)
    y = b.add(b.conv("x", C, C, 3), t)
    model = b.model(y)
    bad = copy(model)
    keep = [n for n in bad.graph.node if n.op_type == "Conv"]
    keep[0].output[0] = y
    del bad.graph.node[:]
    bad.graph.node.extend(keep)
    [check] = check_regions(model, bad, [Region([y], ["x", t], None, "dropped")])
    assert check.status == "differs" and not check.ok and check.inputs == ["x", t]


def test_region_read_past_its_start():
    """The optimized model still computes h (a graph output) but y no longer reads it."""
    model, out, _, h, y = bn_conv()
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    for m in (model, out):
        m.graph.output.append(helper.make_tensor_value_info(h, TensorProto.FLOAT, SHAPE))
    out.graph.node.insert(0, bn)
    out.graph.initializer.extend(t for t in model.graph.initializer if t.name in bn.input)
    [alone] = check_regions(model, out, [Region([y], [h], None, "alone")])
    assert alone.status == "equal" and alone.proven and alone.inputs == ["x"]
    assert f"'{h}' is read past: the region starts where the optimized subgraph does" in alone.note
    checks = by_key(check_regions(model, out, [Region([y], [h], None, "early"), Region([y], ["x"], None, "later")]))
    assert checks["early"].status == "superseded"
    assert checks["later"].status == "equal" and checks["later"].proven


# --------------------------------------------------------------------------------------------
# If / Loop / Scan bodies
# --------------------------------------------------------------------------------------------


def branch(seed: int, offset: int, name: str) -> onnx.GraphProto:
    b = Builder(C, spatial=SHAPE[2:], seed=seed)
    b._n = offset
    y = repvgg(b, "x")
    return helper.make_graph(b.nodes, name, [], [helper.make_tensor_value_info(y, TensorProto.FLOAT, SHAPE)], b.inits), y


def if_model() -> onnx.ModelProto:
    """``If(sum(x * x) >= -1)``: always the then branch; the else branch is never run."""
    then_g, then_y = branch(1, 100, "then")
    else_g, else_y = branch(2, 200, "else")
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"], name="square"),
        helper.make_node("ReduceSum", ["sq"], ["ssum"], name="sum", keepdims=0),
        helper.make_node("GreaterOrEqual", ["ssum", "minus_one"], ["cond"], name="cmp"),
        helper.make_node("If", ["cond"], ["y"], name="the_if", then_branch=then_g, else_branch=else_g),
    ]
    graph = helper.make_graph(
        nodes, "main", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)],
        [numpy_helper.from_array(np.array(-1.0, np.float32), "minus_one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def folded_if():
    model = if_model()
    out, report = engine.run(model)
    return model, out, report


def test_rewritten_bodies_are_proven(folded_if):
    model, out, report = folded_if
    regs = regions.regions_for(report, model, out)
    assert {r.scope for r in regs} == {"the_if.then_branch", "the_if.else_branch"}
    checks = by_key(check_regions(model, out, regs))
    assert set(checks) == {"the_if.then_branch", "the_if.else_branch"}
    for label, c in checks.items():
        assert c.scope == label and c.inputs == ["x"]  # the outer value the body reads
        assert c.candidates and all(k.startswith(label + "/") for k in c.candidates)  # the body's rewrites
        assert c.ok and c.proven and c.method == "spanning probes (257)", c.to_dict()


def test_wrong_rewrite_in_a_branch_never_taken_is_caught(folded_if):
    model, out, report = folded_if
    bad = copy(out)
    body = regions.body_graphs(bad)["the_if.else_branch"].graph
    [conv] = [n for n in body.node if n.op_type == "Conv"]
    w = next(t for g in (body, bad.graph) for t in g.initializer if t.name == conv.input[1])
    values = numpy_helper.to_array(w).copy()
    values[1, 2, 1, 1] += 0.25
    w.CopyFrom(numpy_helper.from_array(values, w.name))
    assert equivalence.compare(model, bad, seeds=4).ok  # the else branch never runs on the model's inputs
    checks = by_key(check_regions(model, bad, regions.regions_for(report, model, bad)))
    assert checks["the_if.then_branch"].ok and checks["the_if.then_branch"].proven
    wrong = checks["the_if.else_branch"]
    assert not wrong.ok and wrong.status == "differs" and wrong.scope == "the_if.else_branch"
    assert "differs on probe" in wrong.note


def test_body_regions_without_a_report(folded_if):
    model, out, _ = folded_if
    found = regions.changed_regions(model, out)
    assert sorted(r.scope for r in found) == ["the_if.else_branch", "the_if.then_branch"]
    assert all(c.ok and c.proven for c in check_regions(model, out))


def test_loop_body_with_an_integer_input_is_checked_not_proven():
    b = Builder(C, spatial=SHAPE[2:], seed=9)
    b._n = 300
    y = repvgg(b, "v_in")
    b.nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    body = helper.make_graph(
        b.nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info(y, TensorProto.FLOAT, SHAPE)],
        b.inits,
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="the_loop", body=body)], "main",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)],
        [numpy_helper.from_array(np.array(2, np.int64), "trips")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, report = engine.run(model)
    [check] = check_regions(model, out, regions.regions_for(report, model, out))
    assert check.scope == "the_loop.body" and check.ok and check.status == "equal"
    assert not check.proven and "integer or bool inputs" in check.note
    assert check.inputs == ["i", "cond_in", "v_in"]


def outer_weights_if_model() -> onnx.ModelProto:
    """As the torch.cond (dynamo) export writes it: the branches read their weights from the main
    graph's initializers, and their input ``h`` from the main graph, where a RepVGG block (folded
    by a main-graph rewrite that keeps the name ``h``) computes it from ``x``."""
    b = Builder(C, spatial=SHAPE[2:], seed=5)
    h = repvgg(b, "x")
    main_nodes, inits = list(b.nodes), list(b.inits)
    branches = []
    for seed, offset, name in ((1, 100, "then"), (2, 200, "else")):
        g = Builder(C, spatial=SHAPE[2:], seed=seed)
        g._n = offset
        y = repvgg(g, h)
        inits += g.inits  # the weights stay in the main graph: read from the enclosing scope
        branches.append(helper.make_graph(g.nodes, name, [], [helper.make_tensor_value_info(y, TensorProto.FLOAT, SHAPE)]))
    main_nodes += [
        helper.make_node("ReduceSum", [h], ["hsum"], name="sum", keepdims=0),
        helper.make_node("Greater", ["hsum", "zero"], ["cond"], name="cmp"),
        helper.make_node("If", ["cond"], ["y"], name="the_if", then_branch=branches[0], else_branch=branches[1]),
    ]
    graph = helper.make_graph(
        main_nodes, "main", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)],
        inits + [numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    # the export declares the initializers' types too
    graph.value_info.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model, h


@pytest.fixture(scope="module")
def folded_outer_weights():
    model, h = outer_weights_if_model()
    out, report = engine.run(model)
    return model, out, report, h


def test_bodies_reading_outer_weights_the_optimized_model_dropped_are_proven(folded_outer_weights):
    """Regression: the original branches read main-graph initializers that the optimized branches
    folded in (and the optimized main graph dropped); those were fed as probe inputs to the
    original body only (zeros for weights on the first probe), and the first probe differed."""
    model, out, report, h = folded_outer_weights
    label = "the_if.then_branch"
    reads = regions.free_names(regions.body_graphs(model)[label].graph)
    assert reads[0] == h and len(reads) == 15  # h and 14 weights of the main graph
    assert not set(reads[1:]) & {t.name for t in out.graph.initializer}  # dropped from the optimized model
    assert regions.free_names(regions.body_graphs(out)[label].graph) == [h]
    assert only_conv(out, h).op_type == "Conv"  # the main-graph rewrite made what feeds the bodies
    checks = by_key(check_regions(model, out, report))
    assert set(checks) == {label, "the_if.else_branch", f"{h}<-x"}
    assert checks[f"{h}<-x"].proven  # the main-graph fold that feeds the bodies
    for scope in (label, "the_if.else_branch"):
        c = checks[scope]
        assert c.ok and c.status == "equal" and c.proven and c.method == "spanning probes (257)", c.to_dict()
        assert c.inputs == [h] and c.max_rel_error < 1e-5
    assert all(c.ok for c in checks.values())


def test_wrong_fold_of_outer_weights_in_a_body_is_caught(folded_outer_weights):
    model, out, report, _ = folded_outer_weights
    bad = copy(out)
    body = regions.body_graphs(bad)["the_if.else_branch"].graph
    [conv] = [n for n in body.node if n.op_type == "Conv"]
    w = initializer(body, conv.input[1])
    values = numpy_helper.to_array(w).copy()
    values[0, 1, 0, 2] += 1e-3
    w.CopyFrom(numpy_helper.from_array(values, w.name))
    checks = by_key(check_regions(model, bad, report))
    assert checks["the_if.then_branch"].ok
    wrong = checks["the_if.else_branch"]
    assert not wrong.ok and wrong.status == "differs" and "differs on probe" in wrong.note


def mul_body(name: str, t: str) -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Mul", ["x", t], [name + "_y"])], name, [],
        [helper.make_tensor_value_info(name + "_y", TensorProto.FLOAT, SHAPE)],
    )


def test_outer_value_a_constant_in_one_model_only_is_that_constant_in_both_bodies():
    """The original computes ``t`` in the main graph, the optimized model holds it as an initializer
    (and its else branch reads it no more): both bodies read that constant, not a probe on one
    side and a constant on the other."""
    scale = np.linspace(0.5, 2.0, C, dtype=np.float32).reshape(1, C, 1, 1)

    def model(t_const: bool, else_reads_t: bool):
        nodes = [] if t_const else [helper.make_node("Add", ["half", "half"], ["t"], name="double")]
        else_body = mul_body("else", "t") if else_reads_t else helper.make_graph(
            [helper.make_node("Mul", ["x", "t2"], ["else_y"])], "else", [],
            [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, SHAPE)],
            [numpy_helper.from_array(scale, "t2")],
        )
        nodes += [
            helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["cond"], name="cmp"),
            helper.make_node("If", ["cond"], ["y"], name="the_if", then_branch=mul_body("then", "t"), else_branch=else_body),
        ]
        inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
        inits.append(numpy_helper.from_array(scale, "t") if t_const else numpy_helper.from_array(scale / 2, "half"))
        graph = helper.make_graph(
            nodes, "main", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)], inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m

    original, optimized = model(False, True), model(True, False)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for sign in (1.0, -1.0):
        feeds = {"x": np.abs(x) * sign}
        np.testing.assert_array_equal(run(original, feeds)[0], run(optimized, feeds)[0])
    regs = [Region([], [], "the_if.then_branch", "the_if.then_branch"), Region([], [], "the_if.else_branch", "the_if.else_branch")]
    checks = by_key(check_regions(original, optimized, regs))
    for label in ("the_if.then_branch", "the_if.else_branch"):
        c = checks[label]
        assert c.ok and c.status == "equal" and c.inputs == ["x"], c.to_dict()
        assert "outer value 't' held at its constant value in both bodies" in c.note
    # a different constant in the optimized else branch still shows
    wrong = copy(optimized)
    else_g = regions.body_graphs(wrong)["the_if.else_branch"].graph
    else_g.initializer[0].CopyFrom(numpy_helper.from_array(scale * 1.001, "t2"))
    assert not by_key(check_regions(original, wrong, regs))["the_if.else_branch"].ok


def test_to_dict_is_standard_json(folded_if):
    import json

    model, out, report = folded_if
    bad = copy(out)
    body = regions.body_graphs(bad)["the_if.then_branch"].graph
    body.node.append(helper.make_node("Flatten", [body.output[0].name], ["flat"]))
    body.output[0].name = "flat"  # another shape: a difference with no measured error
    checks = by_key(check_regions(model, bad, regions.regions_for(report, model, bad)))
    broken = checks["the_if.then_branch"]
    assert not broken.ok and broken.max_abs_error == float("inf")
    data = broken.to_dict()
    assert data["max_abs_error"] is None and data["max_rel_error"] is None
    json.loads(json.dumps([c.to_dict() for c in checks.values()], allow_nan=False))
    assert checks["the_if.else_branch"].to_dict()["max_rel_error"] == checks["the_if.else_branch"].max_rel_error


# --------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------


def test_affine_reason():
    b = Builder(C, spatial=SHAPE[2:])
    y = b.relu(b.conv("x", C, C, 3))
    nodes = list(b.model(y).graph.node)
    assert regions.affine_reason(nodes[:1], ["x"]) is None
    assert "Relu" in regions.affine_reason(nodes, ["x"])
    square = helper.make_node("Mul", ["x", "x"], ["sq"])
    assert "two values" in regions.affine_reason([square], ["x"])
    training = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"])
    assert "training" in regions.affine_reason([training], ["x"])
    weight_input = helper.make_node("Conv", ["w", "x"], ["y"])
    assert "parameter" in regions.affine_reason([weight_input], ["x"])
    ring = helper.make_node("ScatterND", ["x", "idx", "values"], ["y"])  # DBB's padding ring: constant writes
    assert regions.affine_reason([ring], ["x"]) is None
    assert "indices" in regions.affine_reason([ring], ["x", "idx"])
    multiply = helper.make_node("ScatterND", ["x", "idx", "values"], ["y"], reduction="mul")
    assert "reduces by" in regions.affine_reason([multiply], ["x"])
    shape = helper.make_node("Shape", ["x"], ["s"])
    reshape = helper.make_node("Reshape", ["x", "s"], ["r"])
    assert regions.affine_reason([shape, reshape], ["x"]) is None  # a shape is no value


def test_compare_arrays_rule():
    ref = np.array([1000.0, 1.0, 0.0], np.float32)
    # default atol: rtol x the largest magnitude, so rounding at 1000 is allowed at the zero too
    assert regions.compare_arrays(ref, ref + np.float32(5e-3), 1e-5, None).ok
    assert not regions.compare_arrays(ref, ref + np.float32(2e-2), 1e-5, None).ok
    # an explicit atol is absolute
    assert not regions.compare_arrays(ref, ref + np.float32(5e-3), 1e-5, 0.0).ok
    nan = np.array([np.nan, 1.0], np.float32)
    assert not regions.compare_arrays(nan, np.array([1.0, 1.0], np.float32), 1e-5, None).ok
    assert regions.compare_arrays(nan, nan.copy(), 1e-5, None).ok
    assert not regions.compare_arrays(np.array([1, 2]), np.array([1, 3]), None, None).ok
    assert not regions.compare_arrays(ref, ref[:2], 1e-5, None).ok


def test_probes_hit_every_border_position():
    spec = regions._Input("x", np.dtype(np.float32), (1, 2, 5, 6))
    probes = dict(regions.probe_sets([spec]))
    border = probes["border"]["x"]
    assert np.all(border[:, :, [0, -1], :] >= regions.BORDER_MAGNITUDE)
    assert np.all(border[:, :, :, [0, -1]] >= regions.BORDER_MAGNITUDE)
    assert np.all(border[:, :, 1:-1, 1:-1] == 0)
    assert len(np.unique(border[border != 0])) == np.count_nonzero(border)  # distinct values
    corners = [v["x"] for k, v in probes.items() if k.startswith("border corner")]
    assert len(corners) == 4 and all(np.count_nonzero(c) == 2 for c in corners)  # one pixel, both channels
    index = probes["index"]["x"]
    assert len(np.unique(index)) == index.size
    assert np.abs(probes["normal seed 0 x1000"]["x"]).max() > 100
    assert not np.any(probes["zeros"]["x"])


def flat_head(shape_values, bias_in_gemm: bool) -> onnx.ModelProto:
    """``Gemm(Reshape(Conv(x), shape))`` (+ a bias after it, or in the Gemm)."""
    b = Builder(C, spatial=(4, 4), seed=11)
    y = b.node("Reshape", [b.conv("x", C, C, 3), b.const_int(shape_values)])
    w = b.rng.standard_normal((C * 16, 5)) / 8
    bias = b.rng.standard_normal(5)
    if bias_in_gemm:
        y = b.node("Gemm", [y, b.const(w), b.const(bias)])
    else:
        y = b.add(b.node("Gemm", [y, b.const(w)]), b.const(bias))
    model = b.model(y)
    out_name = model.graph.output[0].name
    return model, out_name


def test_batch_reason():
    model, _ = flat_head([-1, C * 16], True)
    zero = {"x": np.zeros([1, C, 4, 4], np.float32)}
    assert regions.batch_reason(model, ["x"], regions._trace(model, zero)) is None
    model, _ = flat_head([1, -1], True)
    assert "Reshape" in regions.batch_reason(model, ["x"], regions._trace(model, zero))
    b = Builder(1, spatial=(4, 4))  # [1, 1, 4, 4]: the swap keeps the shape, not the batch axis
    moved = b.model(b.node("Transpose", ["x"], perm=[1, 0, 2, 3]))
    one = {"x": np.zeros([1, 1, 4, 4], np.float32)}
    assert "moves the leading axis" in regions.batch_reason(moved, ["x"], regions._trace(moved, one))
    b = Builder(C, spatial=(4, 4))
    swapped = b.model(b.node("Transpose", ["x"], perm=[1, 0, 2, 3]))
    assert "no leading batch axis" in regions.batch_reason(swapped, ["x"], regions._trace(swapped, zero))
    b = Builder(C, spatial=(4, 4))
    reduced = b.model(b.node("ReduceSum", ["x", b.const_int([0, 1])], keepdims=1))
    assert "acts on the leading axis" in regions.batch_reason(reduced, ["x"], regions._trace(reduced, zero))
    b = Builder(C, spatial=(4, 4))
    kept = b.model(b.node("ReduceSum", ["x", b.const_int([2, 3])], keepdims=1))
    assert regions.batch_reason(kept, ["x"], regions._trace(kept, zero)) is None


@pytest.mark.parametrize("shape", [[-1, C * 16], [1, -1]])
def test_spanning_probes_batched_or_one_by_one(shape):
    original, y = flat_head(shape, False)
    folded, y2 = flat_head(shape, True)
    for node in folded.graph.node:  # the folded model computes the same tensor name
        node.output[:] = [y if o == y2 else o for o in node.output]
    folded.graph.output[0].name = y
    [check] = check_regions(original, folded, [Region([y], ["x"], None, "head")])
    assert check.ok and check.proven and check.method == "spanning probes (65)"
    assert ("in batches of 65" if shape[0] == -1 else "one by one: Reshape") in check.note, check.note


def test_batches_that_disagree_fall_back_to_single_runs(monkeypatch):
    """With the op check forced to pass on a Reshape to [1, -1], the stacked probes come back as
    one row: the check notices, and runs every spanning probe on its own."""
    original, y = flat_head([1, -1], False)
    monkeypatch.setattr(regions, "batch_reason", lambda *args: None)
    [check] = check_regions(original, original, [Region([y], ["x"], None, "head")])
    assert check.ok and check.proven and check.method == "spanning probes (65)"
    assert "batched runs fail or disagree with single runs" in check.note


def test_region_starting_at_a_tensor_an_earlier_rewrite_made():
    """A region whose input exists only in the optimized model starts where that tensor's own
    computation starts in the original (here: at x)."""
    b = Builder(C, spatial=SHAPE[2:], seed=12)
    h = b.conv("x", C, C, 3)
    z = b.relu(h)
    model = b.model(z)
    good = copy(model)
    conv = only_conv(good, h)
    conv.output[0] = "made.earlier"
    good.graph.node.insert(1, helper.make_node("Identity", ["made.earlier"], [h]))
    [check] = check_regions(model, good, [Region([z], ["made.earlier"], None, "late")])
    assert check.status == "equal" and check.inputs == ["x"] and not check.proven  # Relu
    bad = copy(good)
    w = initializer(bad.graph, conv.input[1])
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(1.01), w.name))
    [check] = check_regions(model, bad, [Region([z], ["made.earlier"], None, "late")])
    assert check.status == "differs" and check.inputs == ["x"]


def test_scan_body_is_checked_per_slice():
    """A Scan body sees one slice of its scan input: its shape comes from the Scan's input at run
    time, without the scan axis."""
    b = Builder(C, spatial=SHAPE[2:], seed=13)
    b._n = 400
    y = repvgg(b, "slice")
    body = helper.make_graph(
        b.nodes, "body", [helper.make_tensor_value_info("slice", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], b.inits,
    )
    nodes = [
        helper.make_node("Unsqueeze", ["x", "zero"], ["x1"]),
        helper.make_node("Concat", ["x1", "x1"], ["stack"], axis=0),  # [2, 1, C, 8, 8]
        helper.make_node("Scan", ["stack"], ["ys"], name="the_scan", body=body, num_scan_inputs=1),
    ]
    graph = helper.make_graph(
        nodes, "main", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("ys", TensorProto.FLOAT, [2] + SHAPE)],
        [numpy_helper.from_array(np.array([0], np.int64), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, report = engine.run(model)
    regs = regions.regions_for(report, model, out)
    assert [r.scope for r in regs if r.scope] == ["the_scan.body"]
    [check] = [c for c in check_regions(model, out, regs) if c.scope]
    assert check.ok and check.proven and check.method == "spanning probes (257)"
    assert check.inputs == ["slice"]


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_float64_and_float16_folds_are_proven(dtype):
    """float64 regions run widened to float32 (no double Conv kernel in onnxruntime's CPU
    provider); float16 ones as they are, under float16's tolerance."""
    b = Builder(C, spatial=SHAPE[2:], seed=3, dtype=dtype)
    model = b.model(b.relu(repvgg(b, "x")))
    out, report = engine.run(model)
    [check] = check_regions(model, out, regions.regions_for(report, model, out))
    assert check.ok and check.proven and check.method == "spanning probes (257)"
    assert ("compared widened to float32" in check.note) == (dtype == np.float64)


def test_nested_bodies_by_their_labels():
    """If branches inside a Loop body: labelled ``the_loop.body/inner_if.<branch>``, each proven
    from the outer value it reads."""
    then_g, _ = branch(1, 100, "then")
    else_g, _ = branch(2, 200, "else")
    inner = [
        helper.make_node("If", ["cond_in"], ["yb"], name="inner_if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
    ]
    body = helper.make_graph(
        inner, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("yb", TensorProto.FLOAT, SHAPE)],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "c0"], ["ys"], name="the_loop", body=body)], "main",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("ys", TensorProto.FLOAT, [2] + SHAPE)],
        [numpy_helper.from_array(np.array(2, np.int64), "trips"), numpy_helper.from_array(np.array(True), "c0")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, report = engine.run(model)
    checks = by_key(check_regions(model, out, regions.regions_for(report, model, out)))
    assert set(checks) == {"the_loop.body/inner_if.then_branch", "the_loop.body/inner_if.else_branch"}
    assert all(c.ok and c.proven and c.inputs == ["x"] for c in checks.values())
