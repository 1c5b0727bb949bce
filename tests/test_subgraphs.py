"""Subgraph bodies (If, Loop, Scan) are optimized inside where exact and left alone otherwise; local
functions pass through as they are. Every model is run in onnxruntime against the original on both
branch conditions (or several trip counts), and the node counts inside the bodies are checked."""

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxrep
from graphs import Builder, run
from onnxrep import engine
from onnxrep.rewrite import Options

C = 4
SHAPE = [1, C, 8, 8]


def repvgg(b: Builder, x: str, c: int = C) -> str:
    return b.sum([b.bn(b.conv(x, c, c, 3, bias=False), c), b.bn(b.conv(x, c, c, 1, bias=False), c), b.bn(x, c)])


def builder(offset: int, seed: int | None = None) -> Builder:
    """A Builder whose generated names start at ``offset`` (names stay unique across bodies)."""
    b = Builder(C, spatial=SHAPE[2:], seed=offset if seed is None else seed)
    b._n = offset
    return b


def rename_output(b: Builder, tensor: str, name: str) -> None:
    """Make the node that computes ``tensor`` compute ``name`` instead."""
    for node in b.nodes:
        for i, o in enumerate(node.output):
            if o == tensor:
                node.output[i] = name


def body(b: Builder, name: str, outputs, inputs=()) -> onnx.GraphProto:
    outs = [o if isinstance(o, onnx.ValueInfoProto) else helper.make_tensor_value_info(o, TensorProto.FLOAT, SHAPE) for o in outputs]
    return helper.make_graph(b.nodes, name, list(inputs), outs, b.inits)


def model_of(nodes, inputs, outputs, inits=(), functions=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "main", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(f.domain, 1) for f in functions[:1]]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)
COND = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)


def subgraph(model_or_graph, *path):
    """The body at ``path``: node name, attribute name, (node name, attribute name, ...)."""
    graph = model_or_graph.graph if isinstance(model_or_graph, onnx.ModelProto) else model_or_graph
    for node_name, attr in zip(path[::2], path[1::2]):
        node = next(n for n in graph.node if n.name == node_name)
        graph = next(a.g for a in node.attribute if a.name == attr)
    return graph


def ops(graph) -> dict:
    graph = graph.graph if isinstance(graph, onnx.ModelProto) else graph
    return dict(Counter(n.op_type for n in graph.node))


def all_graphs(graph):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from all_graphs(g)


def assert_names_unique(model):
    """Node names and the names of computed values are unique across the model."""
    nodes = [n.name for g in all_graphs(model.graph) for n in g.node if n.name]
    values = [o for g in all_graphs(model.graph) for n in g.node for o in n.output if o]
    assert len(nodes) == len(set(nodes)), Counter(nodes).most_common(3)
    assert len(values) == len(set(values)), Counter(values).most_common(3)


def assert_same_outputs(a, b, feeds, rtol=1e-5):
    ra, rb = run(a, feeds), run(b, feeds)
    for x, y in zip(ra, rb):
        assert x.shape == y.shape and x.dtype == y.dtype
        err = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)), initial=0.0))
        assert err <= rtol * max(float(np.max(np.abs(x), initial=0.0)), 1e-30), err


def x_feed(seed=1):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def optimize(model, **kw):
    out, report = onnxrep.optimize(model, verify=True, **kw)
    onnx.checker.check_model(out, full_check=True)
    assert out.graph.input == model.graph.input and out.graph.output == model.graph.output
    assert_names_unique(out)
    return out, report


def scoped_rewrites(report):
    return [(p.name, r["scope"]) for p in report.passes for r in p.rewrites if "scope" in r]


# --------------------------------------------------------------------------------------------
# If
# --------------------------------------------------------------------------------------------


def if_model(main_block=True):
    """x -> [RepVGG block] -> If(cond): then RepVGG+Relu, else conv3x3 + conv1x1 + identity."""
    m = builder(0)
    h = m.relu(repvgg(m, "x")) if main_block else "x"
    t = builder(1000)
    rename_output(t, t.relu(repvgg(t, h)), "t_out")
    e = builder(2000)
    rename_output(e, e.relu(e.sum([e.conv(h, C, C, 3), e.conv(h, C, C, 1), h])), "e_out")
    m.nodes.append(
        helper.make_node("If", ["cond"], ["y"], name="the_if", then_branch=body(t, "then", ["t_out"]), else_branch=body(e, "else", ["e_out"]))
    )
    return model_of(m.nodes, [X, COND], [Y], m.inits)


def test_if_branches_are_folded_and_agree_on_both_conditions():
    model = if_model()
    assert ops(subgraph(model, "the_if", "then_branch")) == {"Conv": 2, "BatchNormalization": 3, "Add": 2, "Relu": 1}
    assert ops(subgraph(model, "the_if", "else_branch")) == {"Conv": 2, "Add": 2, "Relu": 1}
    out, report = optimize(model)
    assert ops(out) == {"Conv": 1, "Relu": 1, "If": 1}
    assert ops(subgraph(out, "the_if", "then_branch")) == {"Conv": 1, "Relu": 1}
    assert ops(subgraph(out, "the_if", "else_branch")) == {"Conv": 1, "Relu": 1}
    assert sorted(scoped_rewrites(report)) == [
        ("parallel-merge", "the_if.else_branch"),
        ("parallel-merge", "the_if.then_branch"),
    ]
    for branch, name in (("then_branch", "t_out"), ("else_branch", "e_out")):
        assert [o.name for o in subgraph(out, "the_if", branch).output] == [name]
    # the report counts the nodes inside the bodies too
    assert report.body_ops_before == {"Conv": 4, "BatchNormalization": 3, "Add": 4, "Relu": 2}
    assert report.body_ops_after == {"Conv": 2, "Relu": 2}
    for cond in (True, False):
        assert_same_outputs(model, out, {"x": x_feed(), "cond": np.array(cond)})


def test_cli_table_counts_the_nodes_in_bodies(tmp_path):
    from click.testing import CliRunner

    from onnxrep import cli

    onnx.save(if_model(), tmp_path / "m.onnx")
    res = CliRunner().invoke(cli.main, ["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx")])
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if "nodes in bodies" in line)
    assert row.split("|")[2].strip() == "13" and row.split("|")[3].strip() == "4"


@pytest.mark.parametrize("branch", ["then_branch", "else_branch"])
def test_verification_runs_both_branches_of_an_if_on_an_input_flag(branch):
    from onnxrep import equivalence

    model = if_model(main_block=False)
    out, _ = onnxrep.optimize(model)
    bad = onnx.ModelProto()
    bad.CopyFrom(out)
    g = subgraph(bad, "the_if", branch)
    init = next(i for i in g.initializer if len(i.dims) == 4)
    w = numpy_helper.to_array(init).copy()
    w[:, :, 1, 1] += 0.1
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    assert [bool(equivalence.random_inputs(model, s)["cond"]) for s in range(6)] == [True, False] * 3
    assert equivalence.compare(model, out, seeds=2).ok
    assert not equivalence.compare(model, bad, seeds=2).ok


def test_unnamed_if_nodes_get_distinct_scopes():
    nodes, h = [], "x"
    for k in range(2):
        t = builder(1000 + 2000 * k)
        rename_output(t, repvgg(t, h), f"t_out{k}")
        e = builder(2000 + 2000 * k)
        rename_output(e, e.relu(h), f"e_out{k}")
        out_name = "y" if k == 1 else "h0"
        nodes.append(helper.make_node("If", ["cond"], [out_name], then_branch=body(t, f"then{k}", [f"t_out{k}"]), else_branch=body(e, f"else{k}", [f"e_out{k}"])))
        h = out_name
    model = model_of(nodes, [X, COND], [Y])
    out, report = optimize(model)
    assert sorted(scoped_rewrites(report)) == [("parallel-merge", "If.then_branch"), ("parallel-merge", "If.then_branch#2")]
    for node in out.graph.node:
        then = next(a.g for a in node.attribute if a.name == "then_branch")
        assert ops(then) == {"Conv": 1}
    for cond in (True, False):
        assert_same_outputs(model, out, {"x": x_feed(), "cond": np.array(cond)})


def test_optimizing_an_optimized_model_with_subgraphs_changes_nothing():
    once, _ = onnxrep.optimize(if_model())
    twice, report = onnxrep.optimize(once)
    assert report.rewritten == 0
    assert twice.SerializeToString() == once.SerializeToString()


def test_a_denied_body_rewrite_is_left_out_and_reported():
    model = if_model(main_block=False)
    _, report = engine.run(model)
    (key,) = [r["candidate"] for p in report.passes for r in p.rewrites if r.get("scope") == "the_if.then_branch"]
    assert key.startswith("the_if.then_branch/")
    out, report = engine.run(model, options=Options(deny=frozenset({key})))
    # the sum stays; the BNs after the convs still fold into them (affine-fold)
    assert ops(subgraph(out, "the_if", "then_branch")) == {"Conv": 2, "BatchNormalization": 1, "Add": 2, "Relu": 1}
    assert ops(subgraph(out, "the_if", "else_branch")) == {"Conv": 1, "Relu": 1}
    merge = next(p for p in report.passes if p.name == "parallel-merge")
    assert merge.skipped[key].startswith("denied")


def test_outer_initializer_read_by_a_branch_is_a_constant_and_stays_in_the_main_graph():
    """A weight of the main graph read by a branch conv and by a main conv: the branch folds (outer
    initializers are constants); the weight is written once, in the main graph, not copied."""
    m = builder(0)
    shared = m.const(m.weight(C, C, 1), "shared")
    main_conv = m.node("Conv", ["x", shared], kernel_shape=[1, 1])
    t = builder(1000)
    rename_output(t, t.add(t.bn(t.conv("x", C, C, 3, bias=False), C), t.node("Conv", ["x", shared], kernel_shape=[1, 1])), "t_out")
    e = builder(2000)
    rename_output(e, e.node("Conv", ["x", shared], kernel_shape=[1, 1]), "e_out")
    m.nodes.append(helper.make_node("If", ["cond"], ["o"], name="the_if", then_branch=body(t, "then", ["t_out"]), else_branch=body(e, "else", ["e_out"])))
    m.nodes.append(helper.make_node("Add", ["o", main_conv], ["y"], name="final"))
    model = model_of(m.nodes, [X, COND], [Y], m.inits)
    out, _ = optimize(model)
    assert ops(subgraph(out, "the_if", "then_branch")) == {"Conv": 1}
    everywhere = [i.name for g in all_graphs(out.graph) for i in g.initializer]
    assert everywhere.count(shared) == 1 and shared in [i.name for i in out.graph.initializer]
    for cond in (True, False):
        assert_same_outputs(model, out, {"x": x_feed(), "cond": np.array(cond)})


def test_no_op_export_does_not_copy_outer_weights_into_branches():
    model = if_model(main_block=True)
    out, report = onnxrep.optimize(model, passes=["token-bn"])
    assert report.rewritten == 0
    sizes = [sum(len(i.raw_data) for i in g.initializer) for g in (model.graph, out.graph)]
    assert sizes[0] == sizes[1]
    for branch in ("then_branch", "else_branch"):
        assert [i.name for i in subgraph(out, "the_if", branch).initializer] == [
            i.name for i in subgraph(model, "the_if", branch).initializer
        ]


# --------------------------------------------------------------------------------------------
# Loop and Scan
# --------------------------------------------------------------------------------------------


def loop_model(carried_weight=False):
    """Loop(trip count n): s <- Relu(BN(Conv3x3(s) + Conv1x1(s))) (or a conv whose weight is a
    carried value), with the per-iteration values as a scan output."""
    b = builder(1000)
    if carried_weight:
        y = b.bn(b.node("Conv", ["s_in", "w_in"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), C)
    else:
        y = b.bn(b.add(b.conv("s_in", C, C, 3), b.conv("s_in", C, C, 1)), C)
    rename_output(b, b.relu(y), "s_out")
    b.nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond_pass"))
    b.nodes.append(helper.make_node("Identity", ["s_out"], ["scan_out"], name="scan_pass"))
    inputs = [
        helper.make_tensor_value_info("i", TensorProto.INT64, []),
        helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        helper.make_value_info("s_in", helper.make_tensor_type_proto(TensorProto.FLOAT, None)),
    ]
    outputs = [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), "s_out", "scan_out"]
    carried_in = ["x"]
    if carried_weight:
        inputs.append(helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [C, C, 3, 3]))
        b.nodes.append(helper.make_node("Identity", ["w_in"], ["w_out"], name="w_pass"))
        outputs.insert(2, helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [C, C, 3, 3]))
        carried_in.append("w0")
    graph = body(b, "loop_body", outputs, inputs)
    m = builder(0)
    inits = [numpy_helper.from_array(np.array(True), "true")]
    if carried_weight:
        inits.append(numpy_helper.from_array(m.weight(C, C, 3).astype(np.float32), "w0"))
    loop_outs = ["y"] + (["w_final"] if carried_weight else []) + ["ys"]
    loop = helper.make_node("Loop", ["n", "true", *carried_in], loop_outs, name="the_loop", body=graph)
    outs = [Y] + ([helper.make_tensor_value_info("w_final", TensorProto.FLOAT, [C, C, 3, 3])] if carried_weight else [])
    outs.append(helper.make_tensor_value_info("ys", TensorProto.FLOAT, ["T", *SHAPE]))
    n = helper.make_tensor_value_info("n", TensorProto.INT64, [])
    return model_of([loop], [X, n], outs, inits)


def test_loop_body_conv_sum_and_bn_fold_into_one_conv():
    model = loop_model()
    assert ops(subgraph(model, "the_loop", "body")) == {"Conv": 2, "Add": 1, "BatchNormalization": 1, "Relu": 1, "Identity": 2}
    out, report = optimize(model)
    assert ops(subgraph(out, "the_loop", "body")) == {"Conv": 1, "Relu": 1, "Identity": 2}
    assert {scope for _, scope in scoped_rewrites(report)} == {"the_loop.body"}
    assert [o.name for o in subgraph(out, "the_loop", "body").output] == ["cond_out", "s_out", "scan_out"]
    assert [i.name for i in subgraph(out, "the_loop", "body").input] == ["i", "cond_in", "s_in"]
    for trips in (0, 1, 3):
        assert_same_outputs(model, out, {"x": x_feed(trips), "n": np.array(trips, np.int64)})


def test_loop_carried_weight_is_not_a_constant():
    model = loop_model(carried_weight=True)
    out, report = optimize(model)
    assert ops(subgraph(out, "the_loop", "body")) == ops(subgraph(model, "the_loop", "body"))
    assert report.rewritten == 0
    for trips in (1, 2):
        assert_same_outputs(model, out, {"x": x_feed(trips), "n": np.array(trips, np.int64)})


def test_scan_body_is_folded():
    b = builder(1000)
    rename_output(b, b.relu(repvgg(b, "xs_t")), "ys_t")
    graph = body(b, "scan_body", ["ys_t"], [helper.make_tensor_value_info("xs_t", TensorProto.FLOAT, SHAPE)])
    scan = helper.make_node("Scan", ["xs"], ["ys"], name="the_scan", body=graph, num_scan_inputs=1)
    xs = helper.make_tensor_value_info("xs", TensorProto.FLOAT, [3, *SHAPE])
    ys = helper.make_tensor_value_info("ys", TensorProto.FLOAT, [3, *SHAPE])
    model = model_of([scan], [xs], [ys])
    out, _ = optimize(model)
    assert ops(subgraph(out, "the_scan", "body")) == {"Conv": 1, "Relu": 1}
    feed = np.random.default_rng(3).standard_normal([3, *SHAPE]).astype(np.float32)
    assert_same_outputs(model, out, {"xs": feed})


def test_if_nested_in_a_loop_body_is_folded():
    t = builder(3000)
    rename_output(t, repvgg(t, "s_in"), "t_out")
    e = builder(4000)
    rename_output(e, e.node("Relu", ["s_in"]), "e_out")
    b = builder(1000)
    b.nodes.append(helper.make_node("Greater", ["i", "one"], ["gt"], name="gt_node"))
    b.inits.append(numpy_helper.from_array(np.array(1, np.int64), "one"))
    b.nodes.append(helper.make_node("If", ["gt"], ["s_out"], name="inner_if", then_branch=body(t, "then", ["t_out"]), else_branch=body(e, "else", ["e_out"])))
    b.nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond_pass"))
    inputs = [
        helper.make_tensor_value_info("i", TensorProto.INT64, []),
        helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        helper.make_tensor_value_info("s_in", TensorProto.FLOAT, SHAPE),
    ]
    graph = body(b, "loop_body", [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), "s_out"], inputs)
    loop = helper.make_node("Loop", ["n", "", "x"], ["y"], name="the_loop", body=graph)
    model = model_of([loop], [X, helper.make_tensor_value_info("n", TensorProto.INT64, [])], [Y])
    out, report = optimize(model)
    inner = ("the_loop", "body", "inner_if", "then_branch")
    assert ops(subgraph(out, *inner)) == {"Conv": 1}
    assert ("parallel-merge", "the_loop.body/inner_if.then_branch") in scoped_rewrites(report)
    for trips in (1, 3):
        assert_same_outputs(model, out, {"x": x_feed(trips), "n": np.array(trips, np.int64)})


# --------------------------------------------------------------------------------------------
# left alone: what a body shares with its enclosing graph
# --------------------------------------------------------------------------------------------


def test_main_tensor_read_by_a_branch_is_not_folded_away():
    """t = Conv3x3(x) is part of a main-graph sum and is read by the then-branch: the sum stays."""
    m = builder(0)
    k3 = m.conv("x", C, C, 3)
    s = m.add(k3, m.conv("x", C, C, 1))
    t = builder(1000)
    rename_output(t, t.relu(k3), "t_out")
    e = builder(2000)
    rename_output(e, e.relu(s), "e_out")
    m.nodes.append(helper.make_node("If", ["cond"], ["o"], name="the_if", then_branch=body(t, "then", ["t_out"]), else_branch=body(e, "else", ["e_out"])))
    m.nodes.append(helper.make_node("Add", ["o", s], ["y"], name="final"))
    model = model_of(m.nodes, [X, COND], [Y], m.inits)
    out, report = optimize(model)
    assert ops(out) == ops(model) == {"Conv": 2, "Add": 2, "If": 1}
    merge = next(p for p in report.passes if p.name == "parallel-merge")
    assert merge.skipped_by_condition() == {"single_use": 1}
    for cond in (True, False):
        assert_same_outputs(model, out, {"x": x_feed(), "cond": np.array(cond)})


def test_branch_reading_the_result_of_a_main_fold_still_finds_it():
    """The branches read s = Conv3x3(x) + Conv1x1(x) + x: the main graph folds the sum into one
    conv that computes the same tensor under the same name."""
    m = builder(0)
    s = m.sum([m.conv("x", C, C, 3), m.conv("x", C, C, 1), "x"])
    t = builder(1000)
    rename_output(t, t.relu(s), "t_out")
    e = builder(2000)
    rename_output(e, e.node("Neg", [s]), "e_out")
    m.nodes.append(helper.make_node("If", ["cond"], ["y"], name="the_if", then_branch=body(t, "then", ["t_out"]), else_branch=body(e, "else", ["e_out"])))
    model = model_of(m.nodes, [X, COND], [Y], m.inits)
    out, _ = optimize(model)
    assert ops(out) == {"Conv": 1, "If": 1}
    (conv,) = [n for n in out.graph.node if n.op_type == "Conv"]
    assert list(conv.output) == [s]
    for cond in (True, False):
        assert_same_outputs(model, out, {"x": x_feed(), "cond": np.array(cond)})


def test_branch_bn_of_a_main_conv_is_not_folded_into_it():
    """The then-branch applies a BN to a main-graph conv's output: the conv is outside the branch
    (and also read in the main graph), so nothing folds across the scope."""
    m = builder(0)
    c = m.conv("x", C, C, 3)
    t = builder(1000)
    rename_output(t, t.bn(c, C), "t_out")
    e = builder(2000)
    rename_output(e, e.relu(c), "e_out")
    m.nodes.append(helper.make_node("If", ["cond"], ["y"], name="the_if", then_branch=body(t, "then", ["t_out"]), else_branch=body(e, "else", ["e_out"])))
    model = model_of(m.nodes, [X, COND], [Y], m.inits)
    out, report = optimize(model)
    assert report.rewritten == 0
    assert ops(out) == {"Conv": 1, "If": 1}
    assert ops(subgraph(out, "the_if", "then_branch")) == {"BatchNormalization": 1}
    for cond in (True, False):
        assert_same_outputs(model, out, {"x": x_feed(), "cond": np.array(cond)})


def test_branch_bn_of_a_main_conv_read_nowhere_else_is_not_moved_into_the_branch():
    m = builder(0)
    c = m.conv("x", C, C, 3)
    t = builder(1000)
    rename_output(t, t.bn(c, C), "t_out")
    e = builder(2000)
    rename_output(e, e.node("Identity", [c]), "e_out")
    m.nodes.append(helper.make_node("If", ["cond"], ["y"], name="the_if", then_branch=body(t, "then", ["t_out"]), else_branch=body(e, "else", ["e_out"])))
    model = model_of(m.nodes, [X, COND], [Y], m.inits)
    out, report = optimize(model)
    assert report.rewritten == 0 and ops(out) == {"Conv": 1, "If": 1}
    for cond in (True, False):
        assert_same_outputs(model, out, {"x": x_feed(), "cond": np.array(cond)})


def test_branch_sum_with_a_main_conv_is_not_merged_across_the_scope():
    """The then-branch adds a body conv to a main-graph conv of the same input: the main conv is
    not pulled into the branch (a Loop body would compute it every iteration)."""
    m = builder(0)
    c = m.conv("x", C, C, 3)
    t = builder(1000)
    rename_output(t, t.add(c, t.conv("x", C, C, 1)), "t_out")
    e = builder(2000)
    rename_output(e, e.relu("x"), "e_out")
    m.nodes.append(helper.make_node("If", ["cond"], ["y"], name="the_if", then_branch=body(t, "then", ["t_out"]), else_branch=body(e, "else", ["e_out"])))
    model = model_of(m.nodes, [X, COND], [Y], m.inits)
    out, report = optimize(model)
    assert report.rewritten == 0
    assert ops(out) == {"Conv": 1, "If": 1}
    assert ops(subgraph(out, "the_if", "then_branch")) == {"Conv": 1, "Add": 1}
    for cond in (True, False):
        assert_same_outputs(model, out, {"x": x_feed(), "cond": np.array(cond)})


def test_branch_output_inside_a_pattern_is_kept():
    """The then-branch returns the conv output and the BN of it: the BN cannot fold."""
    t = builder(1000)
    conv = t.conv("x", C, C, 3)
    rename_output(t, t.bn(conv, C), "t_bn")
    e = builder(2000)
    rename_output(e, e.relu("x"), "e_a")
    e.nodes.append(helper.make_node("Identity", ["x"], ["e_b"], name="e_id"))
    then_g = body(t, "then", [conv, "t_bn"])
    else_g = body(e, "else", ["e_a", "e_b"])
    y2 = helper.make_tensor_value_info("y2", TensorProto.FLOAT, SHAPE)
    node = helper.make_node("If", ["cond"], ["y", "y2"], name="the_if", then_branch=then_g, else_branch=else_g)
    model = model_of([node], [X, COND], [Y, y2])
    out, report = optimize(model)
    assert report.rewritten == 0
    assert ops(subgraph(out, "the_if", "then_branch")) == {"Conv": 1, "BatchNormalization": 1}
    for cond in (True, False):
        assert_same_outputs(model, out, {"x": x_feed(), "cond": np.array(cond)})


def test_outer_constant_node_is_not_taken_as_a_constant_in_a_branch():
    """Only initializers are constants across the scope boundary; a main-graph Constant node's
    value read by a branch is held opaque (the branch is left as it is)."""
    m = builder(0)
    w = m.weight(C, C, 3).astype(np.float32)
    m.nodes.append(helper.make_node("Constant", [], ["wc"], name="wc_node", value=numpy_helper.from_array(w)))
    t = builder(1000)
    rename_output(t, t.bn(t.node("Conv", ["x", "wc"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), C), "t_out")
    e = builder(2000)
    rename_output(e, e.relu("x"), "e_out")
    m.nodes.append(helper.make_node("If", ["cond"], ["y"], name="the_if", then_branch=body(t, "then", ["t_out"]), else_branch=body(e, "else", ["e_out"])))
    model = model_of(m.nodes, [X, COND], [Y], m.inits)
    out, report = optimize(model)
    assert report.rewritten == 0
    assert ops(subgraph(out, "the_if", "then_branch")) == {"Conv": 1, "BatchNormalization": 1}
    for cond in (True, False):
        assert_same_outputs(model, out, {"x": x_feed(), "cond": np.array(cond)})


def test_outer_weight_listed_as_a_graph_input_is_not_a_constant_in_a_branch():
    """An initializer that is also a graph input can be fed at run time: a branch conv reading it
    is not folded with the BN after it."""
    m = builder(0)
    w = m.const(m.weight(C, C, 3), "w")
    t = builder(1000)
    rename_output(t, t.bn(t.node("Conv", ["x", w], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), C), "t_out")
    e = builder(2000)
    rename_output(e, e.relu("x"), "e_out")
    m.nodes.append(helper.make_node("If", ["cond"], ["y"], name="the_if", then_branch=body(t, "then", ["t_out"]), else_branch=body(e, "else", ["e_out"])))
    w_input = helper.make_tensor_value_info(w, TensorProto.FLOAT, [C, C, 3, 3])
    model = model_of(m.nodes, [X, COND, w_input], [Y], m.inits)
    out, report = onnxrep.optimize(model)
    onnx.checker.check_model(out, full_check=True)
    assert report.rewritten == 0
    assert ops(subgraph(out, "the_if", "then_branch")) == {"Conv": 1, "BatchNormalization": 1}
    other = np.random.default_rng(9).standard_normal((C, C, 3, 3)).astype(np.float32)
    for cond in (True, False):
        assert_same_outputs(model, out, {"x": x_feed(), "cond": np.array(cond), w: other})


# --------------------------------------------------------------------------------------------
# local functions
# --------------------------------------------------------------------------------------------


def test_local_function_calling_a_block_passes_through_intact():
    """A local function holding a RepVGG-style block is kept as it is; the main-graph block next
    to the call is folded; the model stays valid and agrees with the original."""
    f = builder(5000)
    f_w3 = f.weight(C, C, 3).astype(np.float32)
    f_w1 = f.weight(C, C, 1).astype(np.float32)
    fnodes = [
        helper.make_node("Constant", [], ["w3"], value=numpy_helper.from_array(f_w3)),
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(f_w1)),
        helper.make_node("Conv", ["a", "w3"], ["k3"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w1"], ["k1"]),
        helper.make_node("Add", ["k3", "k1"], ["s"]),
        helper.make_node("Add", ["s", "a"], ["b"]),
    ]
    function = helper.make_function("local", "RepBlock", ["a"], ["b"], fnodes, [helper.make_opsetid("", 17)])
    m = builder(0)
    h = m.relu(repvgg(m, "x"))
    m.nodes.append(helper.make_node("RepBlock", [h], ["y"], domain="local", name="call"))
    model = model_of(m.nodes, [X], [Y], m.inits, functions=[function])
    out, report = optimize(model)
    assert ops(out) == {"Conv": 1, "Relu": 1, "RepBlock": 1}
    assert [f.SerializeToString() for f in out.functions] == [function.SerializeToString()]
    assert_same_outputs(model, out, {"x": x_feed()})


# --------------------------------------------------------------------------------------------
# a real export: torch.cond -> If
# --------------------------------------------------------------------------------------------


def test_torch_cond_export_branches_are_folded(tmp_path):
    torch = pytest.importorskip("torch")
    from torch_export import DYNAMO, assert_close, export, run_ort

    class Rep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            bn = torch.nn.BatchNorm2d
            self.k3 = torch.nn.Sequential(torch.nn.Conv2d(C, C, 3, padding=1, bias=False), bn(C))
            self.k1 = torch.nn.Sequential(torch.nn.Conv2d(C, C, 1, bias=False), bn(C))
            self.id = bn(C)

        def forward(self, x):
            return torch.relu(self.k3(x) + self.k1(x) + self.id(x))

    class Branching(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Rep(), Rep()

        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda x: self.a(x), lambda x: self.b(x), (x,))

    torch.manual_seed(0)
    module = Branching().eval()
    for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.1, 0.1)
    model = export(module, torch.randn(SHAPE), tmp_path / "cond.onnx", DYNAMO)
    (node,) = [n for n in model.graph.node if n.op_type == "If"]
    out, report = optimize(model)
    (folded,) = [n for n in out.graph.node if n.op_type == "If"]
    for attr in ("then_branch", "else_branch"):
        before = ops(next(a.g for a in node.attribute if a.name == attr))
        after = ops(next(a.g for a in folded.attribute if a.name == attr))
        assert before["Conv"] == 2 and after == {"Conv": 1, "Relu": 1}
    for sign in (1.0, -1.0):  # both branches
        x = (np.abs(x_feed(5)) * sign).astype(np.float32)
        with torch.no_grad():
            ref = module(torch.from_numpy(x)).numpy()
        assert_close(run_ort(out, x), ref)
        assert_close(run_ort(out, x), run_ort(model, x))
