"""Shapes from evidence: what the passes assume about shapes comes from onnxruntime runs or exact
operator formulas, never from declared value_info / output shapes or onnx inference alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper, shape_inference

from graphs import examples

import onnxrep
from onnxrep import cost
from onnxrep.equivalence import compare_outputs, reference_session
from onnxrep.rewrite import Context, Options

OPSET = [helper.make_opsetid("", 19)]
F = TensorProto.FLOAT


def make(nodes, inputs, outputs, inits=(), value_info=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def run(model, feeds, extra=()):
    """Outputs of ``model`` in onnxruntime (optimizations off), ``extra`` tensors added as outputs."""
    if extra:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        del m.graph.value_info[:]
        for name in extra:
            m.graph.output.append(helper.make_empty_tensor_value_info(name))
        model = m
    session = reference_session(model, log_severity=4)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def assert_same(a, b, feeds):
    ra, rb = run(a, feeds), run(b, feeds)
    assert list(ra) == list(rb)
    for name in ra:
        check = compare_outputs(name, ra[name], rb[name])
        assert check.ok, check


def optimize(model, passes=None):
    before = model.SerializeToString()
    out, report = onnxrep.optimize(model, passes=passes)
    assert model.SerializeToString() == before  # the input is left as it was
    onnx.checker.check_model(out)
    return out, report


def ops_of(model):
    return [n.op_type for n in model.graph.node]


def skips(report):
    return {k: v for p in report.passes for k, v in p.skipped.items()}


# --------------------------------------------------------------------------------------------
# stale declared shapes
# --------------------------------------------------------------------------------------------


def stale_batch_model(value_info=True, input_value_info=False):
    """x: [N, 2, 3] -> Relu -> t; y = Reshape(t, [Gather(Shape(t), 0), -1]); t declared [1, 2, 3]."""
    nodes = [
        helper.make_node("Relu", ["x"], ["t"]),
        helper.make_node("Shape", ["t"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["t", "target"], ["y"]),
    ]
    vi = []
    if value_info:
        vi += [helper.make_tensor_value_info("t", F, [1, 2, 3]), helper.make_tensor_value_info("s", TensorProto.INT64, [3])]
    if input_value_info:
        vi.append(helper.make_tensor_value_info("x", F, [1, 2, 3]))
    inits = [const("zero", np.int64(0)), const("axes", np.array([0], np.int64)), const("minus_one", np.array([-1], np.int64))]
    return make(nodes, [helper.make_tensor_value_info("x", F, ["N", 2, 3])],
                [helper.make_tensor_value_info("y", F, ["N", 6])], inits, vi)


def feeds_x(shape, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def test_stale_value_info_does_not_fold_a_dynamic_batch():
    model = stale_batch_model()
    out, report = optimize(model)
    for batch in (1, 2, 3):
        assert_same(model, out, feeds_x((batch, 2, 3), batch))
    assert run(out, feeds_x((2, 2, 3)))["y"].shape == (2, 6)
    evidence = cost.infer_evidence(model)
    assert evidence.shapes["t"] == ("N", 2, 3)
    # the static part of the shape is still known
    assert evidence.shapes["s"] == (3,)


def test_graph_input_value_info_does_not_override_the_input():
    model = stale_batch_model(value_info=False, input_value_info=True)
    out, _ = optimize(model)
    for batch in (1, 2):
        assert_same(model, out, feeds_x((batch, 2, 3), batch))
    evidence = cost.infer_evidence(model)
    assert evidence.shapes["x"] == ("N", 2, 3)
    assert [c["declared_in"] for c in evidence.contradictions] == ["input value_info"]


@pytest.mark.parametrize("runtime", [True, False])
def test_declared_contradictions_are_recorded(runtime):
    model = stale_batch_model()
    evidence = cost.infer_evidence(model, runtime=runtime)
    by_name = {c["tensor"]: c for c in evidence.contradictions}
    assert set(by_name) == {"t"}  # s: [3] is right; y: [N, 6] is right
    t = by_name["t"]
    assert t["declared_in"] == "value_info" and t["declared"] == [1, 2, 3] and t["evidence"] == ["N", 2, 3]
    if runtime:
        assert evidence.method == "onnxruntime"
        assert t["observed"] == [[1, 2, 3], [2, 2, 3]]
    else:
        assert evidence.method == "formula" and "observed" not in t


def test_no_contradiction_when_declarations_hold():
    model = stale_batch_model(value_info=False)
    model = shape_inference.infer_shapes(model)  # value_info as onnx writes it: right here
    assert len(model.graph.value_info) > 0
    assert cost.infer_evidence(model).contradictions == []


def test_declared_output_contradiction():
    model = stale_batch_model(value_info=False)
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1  # y declared [1, 6]
    evidence = cost.infer_evidence(model)
    assert [(c["tensor"], c["declared_in"], c["declared"]) for c in evidence.contradictions] == [("y", "output", [1, 6])]
    assert evidence.shapes["y"][0] == "N"  # (onnx names the other dim of Reshape(.., [N, -1]) itself)


# --------------------------------------------------------------------------------------------
# ceil-mode pooling: onnx infers 4 where onnxruntime gives 3
# --------------------------------------------------------------------------------------------

POOLS = ["MaxPool", "AveragePool"]


def pool(op, x, y, **extra):
    attrs = dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
    attrs.update(extra)
    return helper.make_node(op, [x], [y], **attrs)


def pool_fold_model(op, declared=False):
    """p = Pool(x: [1, 2, 5, 5]) (onnx: 4x4, onnxruntime: 3x3); y = Reshape(p, Shape(p)) and
    z = Reshape(p, [Size(p)])."""
    nodes = [
        pool(op, "x", "p"),
        helper.make_node("Shape", ["p"], ["shape"]),
        helper.make_node("Reshape", ["p", "shape"], ["y"]),
        helper.make_node("Size", ["p"], ["size"]),
        helper.make_node("Unsqueeze", ["size", "axes"], ["flat"]),
        helper.make_node("Reshape", ["p", "flat"], ["z"]),
    ]
    model = make(nodes, [helper.make_tensor_value_info("x", F, [1, 2, 5, 5])],
                 [helper.make_tensor_value_info("y", F, [None] * 4), helper.make_tensor_value_info("z", F, [None])],
                 [const("axes", np.array([0], np.int64))])
    if declared:  # value_info as onnx inference writes it: p [1, 2, 4, 4]
        model = shape_inference.infer_shapes(model)
    return model


@pytest.mark.parametrize("declared", [False, True])
@pytest.mark.parametrize("op", POOLS)
def test_ceil_pool_shape_and_size_fold_to_the_runtime_values(op, declared):
    model = pool_fold_model(op, declared)
    if declared:
        assert cost.graph_types(model.graph)[0]["p"] == (1, 2, 4, 4)  # what onnx believes
    out, report = optimize(model, passes=["constant-fold"])
    assert "Shape" not in ops_of(out) and "Size" not in ops_of(out)  # folded...
    values = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert values["shape"].tolist() == [1, 2, 3, 3]  # ...to what onnxruntime computes
    assert values["flat"].tolist() == [18]
    assert_same(model, out, feeds_x((1, 2, 5, 5)))
    evidence = cost.infer_evidence(model)
    assert evidence.shapes["p"] == (1, 2, 3, 3)
    if declared:
        assert {c["tensor"] for c in evidence.contradictions} >= {"p"}


def shifted_same_conv_model(op, batch="N", value_info=False):
    """x -> Pool ceil (5 -> 3; onnx says 4) -> + shift -> Conv SAME_UPPER k=2 s=2: at 3 the conv pads
    one at the end (at 4 it would read no padding, and the shift could fold into it)."""
    rng = np.random.default_rng(3)
    nodes = [
        pool(op, "x", "p"),
        helper.make_node("Add", ["p", "shift"], ["q"]),
        helper.make_node("Conv", ["q", "w", "b"], ["y"], kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
    ]
    inits = [
        const("shift", (rng.standard_normal((1, 2, 1, 1)) * 3 + 5).astype(np.float32)),
        const("w", rng.standard_normal((3, 2, 2, 2)).astype(np.float32)),
        const("b", rng.standard_normal(3).astype(np.float32)),
    ]
    model = make(nodes, [helper.make_tensor_value_info("x", F, [batch, 2, 5, 5])], [helper.make_tensor_value_info("y", F, [None] * 4)], inits)
    if value_info:
        model = shape_inference.infer_shapes(model)
    return model


@pytest.mark.parametrize("value_info", [False, True])
@pytest.mark.parametrize("op", POOLS)
def test_shift_before_same_conv_after_ceil_pool_is_not_folded(op, value_info, monkeypatch):
    model = shifted_same_conv_model(op, value_info=value_info)
    out, report = optimize(model, passes=["affine-fold"])
    assert report.rewritten == 0 and ops_of(out) == ops_of(model)
    reasons = list(skips(report).values())
    assert reasons and all(r.startswith("no_padding:") for r in reasons), reasons
    for batch in (1, 2):
        assert_same(model, out, feeds_x((batch, 2, 5, 5), batch))
    # the same without running the model (above the size limit): the pool's formula
    monkeypatch.setattr(cost, "RUNTIME_EVIDENCE_BYTES", 0)
    evidence = cost.infer_evidence(model)
    assert evidence.method == "formula" and evidence.shapes["p"] == ("N", 2, 3, 3)
    assert evidence.shapes["y"] == ("N", 3, 2, 2)  # inferred again from the corrected shape
    out, report = optimize(model, passes=["affine-fold"])
    assert report.rewritten == 0
    assert all(r.startswith("no_padding:") for r in skips(report).values())


@pytest.mark.parametrize("limit", ["RUNTIME_EVIDENCE_BYTES", "RUNTIME_EVIDENCE_ACTIVATIONS"])
def test_runtime_evidence_is_skipped_above_its_limits(limit, monkeypatch):
    model = pool_fold_model("MaxPool", declared=True)
    assert cost.infer_evidence(model).method == "onnxruntime"
    monkeypatch.setattr(cost, limit, 1)  # weights: 8 bytes; tensors: hundreds
    evidence = cost.infer_evidence(model)
    assert evidence.method == "formula" and evidence.note.startswith("not run:")
    assert evidence.shapes["p"] == (1, 2, 3, 3)
    assert [c["tensor"] for c in evidence.contradictions] == ["p"]  # (Reshape's outputs: onnx's own)


def test_models_of_ops_whose_inference_agrees_do_not_run():
    """Pool -> Add -> Conv: the pool's shape by formula, the rest by onnx: no onnxruntime session."""
    evidence = cost.infer_evidence(shifted_same_conv_model("MaxPool"))
    assert evidence.method == "formula" and "agrees" in evidence.note
    assert evidence.shapes["p"] == ("N", 2, 3, 3) and evidence.shapes["y"] == ("N", 3, 2, 2)
    # a Reshape to a computed shape, a Shape, an If: onnx's inference is not taken alone
    assert cost.infer_evidence(stale_batch_model()).method == "onnxruntime"


def test_shift_before_same_conv_folds_where_it_reads_no_padding():
    """The positive case: a pool without ceil mode gives 3 (L=6, k=2, s=2) ... padded; L=8 -> 4:
    SAME k=2 s=2 reads no padding and the shift folds, exactly."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Add", ["p", "shift"], ["q"]),
        helper.make_node("Conv", ["q", "w", "b"], ["y"], kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
    ]
    inits = [
        const("shift", rng.standard_normal((1, 2, 1, 1)).astype(np.float32)),
        const("w", rng.standard_normal((3, 2, 2, 2)).astype(np.float32)),
        const("b", rng.standard_normal(3).astype(np.float32)),
    ]
    model = make(nodes, [helper.make_tensor_value_info("x", F, ["N", 2, 8, 8])], [helper.make_tensor_value_info("y", F, [None] * 4)], inits)
    out, report = optimize(model, passes=["affine-fold"])
    assert report.rewritten == 1 and ops_of(out) == ["MaxPool", "Conv"]
    for batch in (1, 2):
        assert_same(model, out, feeds_x((batch, 2, 8, 8), batch))


def test_ceil_pool_inside_an_if_body():
    """Body shapes come from the same evidence: Reshape(p, [Size(p)]) of a ceil-mode pool in a branch."""
    then = helper.make_graph(
        [pool("MaxPool", "x", "p"), helper.make_node("Size", ["p"], ["size"]),
         helper.make_node("Unsqueeze", ["size", "axes"], ["flat"]), helper.make_node("Reshape", ["p", "flat"], ["t_out"])],
        "then", [], [helper.make_tensor_value_info("t_out", F, [None])],
    )
    # (onnxruntime itself trips over onnx's inference of a ceil-mode pool in a body when a later
    # node's shape follows from it statically, as Flatten's would: the other branch avoids that)
    other = helper.make_graph(
        [helper.make_node("Reshape", ["x", "minus_one"], ["e_out"])],
        "else", [], [helper.make_tensor_value_info("e_out", F, [None])],
    )
    model = make(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        [helper.make_tensor_value_info("x", F, [1, 2, 5, 5]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", F, [None])],
        [const("axes", np.array([0], np.int64)), const("minus_one", np.array([-1], np.int64))],
    )
    out, report = optimize(model, passes=["constant-fold"])
    then_out = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert "Size" not in [n.op_type for n in then_out.node]
    for cond in (True, False):
        feeds = feeds_x((1, 2, 5, 5)) | {"cond": np.array(cond)}
        assert_same(model, out, feeds)
        assert run(out, feeds)["y"].shape == ((18,) if cond else (50,))


# --------------------------------------------------------------------------------------------
# property: the shapes onnxrep uses are onnxruntime's or unknown, never a wrong int
# --------------------------------------------------------------------------------------------


@st.composite
def window_chains(draw):
    rank = draw(st.sampled_from([1, 2]))
    sizes = [draw(st.integers(1, 12)) for _ in range(rank)]
    nodes, inits, x = [], [], "x"
    for i in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["MaxPool", "AveragePool", "LpPool", "Conv"]))
        k = [draw(st.integers(1, 4)) for _ in range(rank)]
        attrs = dict(kernel_shape=k, strides=[draw(st.integers(1, 3)) for _ in range(rank)])
        auto = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
        if auto == "NOTSET":
            attrs["pads"] = [draw(st.integers(0, kk - 1)) for kk in k] + [draw(st.integers(0, kk - 1)) for kk in k]
        else:
            attrs["auto_pad"] = auto
        if draw(st.booleans()):
            attrs["dilations"] = [draw(st.integers(1, 3)) for _ in range(rank)]
        if op != "Conv":
            attrs["ceil_mode"] = draw(st.integers(0, 1))
        y = f"t{i}"
        inputs = [x]
        if op == "Conv":
            inits.append(const(f"w{i}", np.ones([2, 2] + k, np.float32)))
            inputs.append(f"w{i}")
        nodes.append(helper.make_node(op, inputs, [y], **attrs))
        if draw(st.booleans()):  # a Shape chain downstream, as constant-fold would read it
            nodes.append(helper.make_node("Shape", [y], [f"s{i}"]))
        x = y
    batch = draw(st.sampled_from([1, "N"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [batch, 2] + sizes)],
                              [helper.make_tensor_value_info(x, F, [None] * (rank + 2))], inits)
    return helper.make_model(graph, opset_imports=OPSET, ir_version=9)


def _actual_shapes(model, batch):
    names = [o for n in model.graph.node for o in n.output if o != model.graph.output[0].name]
    shape = [batch if isinstance(d, str) else d for d in cost.graph_types(model.graph)[0]["x"]]
    try:
        got = run(model, feeds_x(shape), extra=names)
    except Exception:  # noqa: BLE001 - onnxruntime refuses the model: nothing to compare
        return None
    return {k: v.shape if k[0] == "t" else tuple(v.tolist()) for k, v in got.items()}


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=window_chains(), runtime=st.booleans())
def test_shapes_are_the_runtime_ones_or_unknown(model, runtime):
    note(onnx.printer.to_text(model.graph))
    actual = {b: _actual_shapes(model, b) for b in (1, 2)}
    assume(actual[1] is not None)
    evidence = cost.infer_evidence(model, runtime=runtime)
    for name, seen in actual[1].items():
        if name[0] == "s":  # the value of Shape(t_i): what constant-fold would fold to
            shape = evidence.shapes.get("t" + name[1:])
            if shape is not None and all(isinstance(d, int) for d in shape):
                assert tuple(shape) == seen, (name, shape, seen)
            continue
        shape = evidence.shapes.get(name)
        if shape is None:
            continue
        assert len(shape) == len(seen), (name, shape, seen)
        for axis, d in enumerate(shape):
            if isinstance(d, int):
                assert d == seen[axis], (name, shape, seen)
                if actual[2] is not None:
                    assert d == actual[2][name][axis], (name, shape, actual[2][name])


# --------------------------------------------------------------------------------------------
# Context: evidence only
# --------------------------------------------------------------------------------------------


def test_context_ignores_declared_tensor_shapes():
    ctx = Context(Options(), shapes={"known": ("N", 4)}, dtypes={"known": np.dtype(np.float32)})
    declared = gs.Variable("declared", dtype=np.float32, shape=[1, 4])
    assert ctx.shape(declared) is None
    known = gs.Variable("known", dtype=np.float16, shape=[1, 4])
    assert ctx.shape(known) == ("N", 4) and ctx.dtype(known) == np.float32
    new = ctx.like("new", known)
    assert ctx.shape(new) == ("N", 4) and new.shape == ["N", 4] and ctx.dtype(new) == np.float32
    assert ctx.shape(ctx.like("other", declared)) is None
    c = gs.Constant("c", np.zeros((2, 3), np.float32))
    assert ctx.shape(c) == (2, 3) and ctx.dtype(c) == np.float32


# --------------------------------------------------------------------------------------------
# the caller's model is not modified
# --------------------------------------------------------------------------------------------


def test_optimize_leaves_the_input_model_byte_for_byte():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    c_then = helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.ones((1,), np.float32)))
    then = helper.make_graph(
        [c_then, helper.make_node("Add", ["y", "one"], ["t_out"])], "then", [],
        [helper.make_tensor_value_info("t_out", F, [1, 2, 4, 4])],
    )
    other = helper.make_graph(
        [helper.make_node("Conv", ["y", "w2"], ["c2"], pads=[1, 1, 1, 1]),
         helper.make_node("Constant", [], ["bn_s"], value=numpy_helper.from_array(np.full((1, 2, 1, 1), 2, np.float32))),
         helper.make_node("Mul", ["c2", "bn_s"], ["e_out"])],
        "else", [], [helper.make_tensor_value_info("e_out", F, [1, 2, 4, 4])],
    )
    nodes = [
        helper.make_node("Constant", [], ["scale"], value=numpy_helper.from_array(np.full((1, 2, 1, 1), 3, np.float32))),
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "scale"], ["y"]),
        helper.make_node("ConstantOfShape", ["shape"], ["z"], value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("Add", ["y", "z"], ["y2"]),
        helper.make_node("If", ["cond"], ["out"], then_branch=then, else_branch=other),
    ]
    model = make(
        nodes,
        [helper.make_tensor_value_info("x", F, [1, 2, 4, 4]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", F, [1, 2, 4, 4]), helper.make_tensor_value_info("y2", F, [1, 2, 4, 4])],
        [const("w", w), const("w2", w[::-1].copy()), const("shape", np.array([1, 2, 4, 4], np.int64))],
        [helper.make_tensor_value_info("c", F, [1, 2, 4, 4])],
    )
    before = model.SerializeToString()
    out, report = onnxrep.optimize(model)
    assert model.SerializeToString() == before
    assert report.rewritten > 0
    for cond in (True, False):
        assert_same(model, out, feeds_x((1, 2, 4, 4)) | {"cond": np.array(cond)})
    try:  # verification runs the input model too: it must leave it as it was, whatever its verdict
        onnxrep.optimize(model, verify=True)
    except onnxrep.VerificationError:
        pass
    assert model.SerializeToString() == before


# --------------------------------------------------------------------------------------------
# auto_pad SAME where onnxruntime's padding is not the spec's
# --------------------------------------------------------------------------------------------


def test_same_conv_with_a_kernel_smaller_than_the_stride_is_not_merged():
    """Conv 1x1 stride 4 SAME_UPPER on 8: onnxruntime's pad_needed is -3, its head pad -1 (it reads
    x[1], x[5]); the spec's pads are 0 (x[0], x[4]). A merge written with explicit pads must not use
    the spec's."""
    rng = np.random.default_rng(0)

    def conv(x, w, y):
        return helper.make_node("Conv", [x, w], [y], kernel_shape=[1, 1], strides=[4, 4], auto_pad="SAME_UPPER")

    model = make(
        [conv("x", "wa", "a"), conv("x", "wb", "b"), helper.make_node("Add", ["a", "b"], ["y"])],
        [helper.make_tensor_value_info("x", F, ["N", 2, 8, 8])], [helper.make_tensor_value_info("y", F, [None] * 4)],
        [const("wa", rng.standard_normal((3, 2, 1, 1)).astype(np.float32)),
         const("wb", rng.standard_normal((3, 2, 1, 1)).astype(np.float32))],
    )
    out, _ = optimize(model, passes=["parallel-merge"])
    for batch in (1, 2):
        assert_same(model, out, feeds_x((batch, 2, 8, 8), batch))


def test_same_conv_with_a_kernel_smaller_than_the_stride_keeps_its_windows():
    """One Conv 1x1 stride 4 SAME_UPPER on 8 through every pass: SAME written as explicit pads must
    be onnxruntime's, or stay SAME."""
    rng = np.random.default_rng(0)
    model = make(
        [helper.make_node("Conv", ["x", "w"], ["a"], kernel_shape=[1, 1], strides=[4, 4], auto_pad="SAME_UPPER"),
         helper.make_node("Relu", ["a"], ["y"])],
        [helper.make_tensor_value_info("x", F, ["N", 2, 8, 8])], [helper.make_tensor_value_info("y", F, [None] * 4)],
        [const("w", rng.standard_normal((3, 2, 1, 1)).astype(np.float32))],
    )
    out, _ = optimize(model)
    for batch in (1, 2):
        assert_same(model, out, feeds_x((batch, 2, 8, 8), batch))


def _same_window_model(op, size, kernel, stride, dilation, mode, rng):
    attrs = dict(kernel_shape=[kernel, kernel], strides=[stride, stride], auto_pad=mode)
    if dilation != 1:
        attrs["dilations"] = [dilation, dilation]
    inits = []
    inputs = ["x"]
    if op == "Conv":
        inits = [const("w", rng.standard_normal((3, 2, kernel, kernel)).astype(np.float32))]
        inputs = ["x", "w"]
    elif op == "AveragePool":
        attrs["count_include_pad"] = 1
    return make(
        [helper.make_node(op, inputs, ["a"], **attrs), helper.make_node("Relu", ["a"], ["y"])],
        [helper.make_tensor_value_info("x", F, ["N", 2, size, size])],
        [helper.make_tensor_value_info("y", F, [None] * 4)], inits,
    )


# (op, L, k, s, d, mode, onnxruntime's pads are the spec's)
SAME_CASES = [
    ("Conv", 8, 1, 4, 1, "SAME_UPPER", False),  # need -3: head pad -1
    ("Conv", 7, 1, 4, 1, "SAME_LOWER", False),  # need -2
    ("AveragePool", 8, 1, 4, 1, "SAME_UPPER", False),
    ("AveragePool", 9, 2, 5, 1, "SAME_LOWER", False),  # need -2
    ("AveragePool", 7, 2, 2, 2, "SAME_UPPER", False),  # dilated: padded for the undilated kernel
    ("AveragePool", 6, 3, 1, 2, "SAME_LOWER", False),
    ("Conv", 8, 1, 2, 1, "SAME_UPPER", True),  # need -1: both pad 0
    ("Conv", 9, 2, 4, 1, "SAME_LOWER", True),  # need -1
    ("Conv", 7, 3, 2, 1, "SAME_UPPER", True),
    ("AveragePool", 8, 1, 2, 1, "SAME_LOWER", True),
    ("AveragePool", 7, 3, 2, 1, "SAME_LOWER", True),
]


@pytest.mark.parametrize("op,size,kernel,stride,dilation,mode,agree", SAME_CASES)
def test_same_pads_are_onnxruntimes(op, size, kernel, stride, dilation, mode, agree):
    """normalize-pads writes SAME as explicit pads only where onnxruntime's pads are the spec's;
    elsewhere it declines with ``runtime_same_pads`` and the model keeps its windows."""
    model = _same_window_model(op, size, kernel, stride, dilation, mode, np.random.default_rng(size))
    out, report = optimize(model, passes=["normalize-pads"])
    reasons = list(skips(report).values())
    if agree:
        assert report.rewritten == 1 and not reasons
        assert not any(a.name == "auto_pad" for n in out.graph.node for a in n.attribute)
    else:
        assert report.rewritten == 0 and len(reasons) == 1 and reasons[0].startswith("runtime_same_pads:"), reasons
    for batch in (1, 2):
        assert_same(model, out, feeds_x((batch, 2, size, size), batch))
    out, _ = optimize(model)
    for batch in (1, 2):
        assert_same(model, out, feeds_x((batch, 2, size, size), batch))


def test_window_geometry_declines_the_same_pads_onnxruntime_does_not_use():
    from onnxrep.passes._common import window_geometry

    # onnxruntime refuses a dilated SAME Conv: the spec's pads (the onnx reference's) stand
    dilated_conv = [("Conv", 9, 3, 1, 2, "SAME_UPPER", True), ("Conv", 10, 2, 2, 3, "SAME_LOWER", True)]
    for op, size, kernel, stride, dilation, mode, agree in SAME_CASES + dilated_conv:
        attrs = dict(kernel_shape=[kernel, kernel], strides=[stride, stride], dilations=[dilation, dilation], auto_pad=mode)
        node = gs.Node(op, name="w", attrs=attrs)
        geo = window_geometry(node, (kernel, kernel), ("N", 2, size, size))
        assert isinstance(geo, str) != agree, (op, size, kernel, stride, dilation, mode, geo)
        if not agree:
            assert "onnxruntime" in geo


# --------------------------------------------------------------------------------------------
# the report: declared shapes the runtime contradicts
# --------------------------------------------------------------------------------------------


def test_report_lists_declared_shapes_the_runtime_contradicts():
    """A stale value_info batch 1 on a model with a dynamic batch: reported, with what the runs
    observed; the model is still optimized by the evidence, not the declaration."""
    out, report = optimize(stale_batch_model())
    d = report.to_dict()
    assert d["declared_shape_contradictions"] == [
        {"tensor": "t", "declared_in": "value_info", "declared": [1, 2, 3], "evidence": ["N", 2, 3],
         "observed": [[1, 2, 3], [2, 2, 3]]}
    ]
    assert d["shape_evidence"]["method"] == "onnxruntime"
    assert d["shape_evidence"]["contradictions"] == d["declared_shape_contradictions"]
    assert report.declared_shape_contradictions == d["declared_shape_contradictions"]


def test_report_without_stale_declarations_lists_no_contradiction():
    _, report = optimize(stale_batch_model(value_info=False))
    d = report.to_dict()
    assert d["declared_shape_contradictions"] == [] and d["shape_evidence"]["method"] == "onnxruntime"


def test_shape_evidence_is_computed_once_for_every_net_cost_run(monkeypatch):
    """The net-cost loop runs the pipeline again with rewrites left out: the evidence (an
    onnxruntime run) is computed once, and every run and every body sees the same."""
    from onnxrep import engine, scopes

    calls, seen = [], []
    real, real_body_types = cost.infer_evidence, scopes.body_types
    monkeypatch.setattr(engine, "infer_evidence", lambda m, runtime=True: calls.append(runtime) or real(m, runtime=runtime))

    def body_types(model, graph, evidence=None):
        seen.append(evidence)
        return real_body_types(model, graph, evidence)

    monkeypatch.setattr(scopes, "body_types", body_types)
    # a 1100-channel zero bias computed by Expand: folded alone it adds weights (net_cost: a
    # second run without it); in an If branch so that the bodies' types are read too
    rng = np.random.default_rng(0)
    then = helper.make_graph(
        [helper.make_node("Expand", ["zero", "shape"], ["bias"]), helper.make_node("Conv", ["x", "w", "bias"], ["a"])],
        "then", [], [helper.make_tensor_value_info("a", F, [None] * 4)],
    )
    other = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["b"])], "else", [], [helper.make_tensor_value_info("b", F, [None] * 4)])
    model = make(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        [helper.make_tensor_value_info("x", F, ["N", 2, 2, 2]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", F, [None] * 4)],
        [const("w", rng.standard_normal((1100, 2, 1, 1)).astype(np.float32)), const("zero", np.zeros(1, np.float32)),
         const("shape", np.array([1100], np.int64))],
    )
    out, report = optimize(model)
    assert report.runs == 2 and report.left_out_for_cost
    assert calls == [True]
    assert len(seen) == 2 and seen[0] is seen[1] is not None
    for cond in (True, False):
        assert_same(model, out, feeds_x((2, 2, 2, 2)) | {"cond": np.array(cond)})
