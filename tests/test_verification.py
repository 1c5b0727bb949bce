"""The verification itself (onnxrep.equivalence): element-wise tolerances per output and dtype,
input sets at several magnitudes and batch sizes, user inputs, and near ties in discrete
selections. Each case is a pair of models built with onnx.helper that a weaker comparison would
let through, or an exact rewrite that a naive one would refuse."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxrep
from onnxrep import equivalence
from onnxrep.models import repvgg_a0

F32 = np.dtype(np.float32)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _const(name, values, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _scaled(factor, shape=(1, 4, 8, 8), elem=TensorProto.FLOAT, dtype=np.float32):
    """y = x * factor (a per-element constant broadcast over x)."""
    return _model(
        [helper.make_node("Mul", ["x", "s"], ["y"])],
        [_vi("x", elem, list(shape))],
        [_vi("y", elem, list(shape))],
        [_const("s", factor, dtype)],
    )


# --------------------------------------------------------------------------------------------
# magnitudes
# --------------------------------------------------------------------------------------------


def test_a_difference_only_above_six_is_found():
    """Relu against Clip(0, 6): equal for standard normal inputs, not at x10 and x1000."""
    shape = [1, 4, 8, 8]
    relu = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", TensorProto.FLOAT, shape)], [_vi("y", TensorProto.FLOAT, shape)])
    clip = _model(
        [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
        [_vi("x", TensorProto.FLOAT, shape)],
        [_vi("y", TensorProto.FLOAT, shape)],
        [_const("lo", 0.0), _const("hi", 6.0)],
    )
    # at x1 alone the two agree: the comparison the magnitudes replace could not tell them apart
    for seed in range(3):
        feeds = equivalence.random_inputs(relu, seed)
        assert np.array_equal(equivalence.run_model(relu, feeds)[0], equivalence.run_model(clip, feeds)[0])
    result = equivalence.compare(relu, clip)
    assert not result.ok
    (check,) = result.outputs
    assert " x1 " not in check.input_set + " " and check.ref_value > 6 and check.got_value == 6
    assert {s.magnitude for s in result.input_sets} == {1, 10, 1000}
    assert "differs" in check.describe() and "FAILED" in result.summary()


def test_a_where_above_six_is_found_and_is_no_tie():
    """Both models select with Greater(x, 6); the candidate scales the selected values wrongly.
    The selections agree, so the mismatch is not excused as a tie."""
    shape = [2, 16]

    def model(k):
        return _model(
            [
                helper.make_node("Greater", ["x", "six"], ["big"]),
                helper.make_node("Mul", ["x", "k"], ["xk"]),
                helper.make_node("Where", ["big", "xk", "x"], ["y"]),
            ],
            [_vi("x", TensorProto.FLOAT, shape)],
            [_vi("y", TensorProto.FLOAT, shape)],
            [_const("six", 6.0), _const("k", k)],
        )

    result = equivalence.compare(model(2.0), model(2.001))
    assert not result.ok
    (check,) = result.outputs
    assert any("selections of Greater" in n and "agree" in n for n in check.notes)
    assert equivalence.compare(model(2.0), model(2.0)).ok


def test_float16_inputs_are_scaled_within_range_and_overflowing_magnitudes_are_skipped():
    """float16 inputs go to x100 at most; where the original's output overflows to inf there
    (x * 1000 > 65504), that input set is skipped and named."""
    shape = [1, 64]
    model = _scaled(np.float16(1000.0), shape, TensorProto.FLOAT16, np.float16)
    feeds = equivalence.random_inputs(model, 0, magnitude=1000)
    base = equivalence.random_inputs(model, 0)
    np.testing.assert_allclose(feeds["x"].astype(np.float64), base["x"].astype(np.float64) * 100, rtol=1e-3)
    result = equivalence.compare(model, model)
    assert result.ok
    assert {s.name for s in result.input_sets} == {f"seed{s} x{m}" for s in range(3) for m in (1, 10)}
    assert len(result.skipped) == 3 and all("x1000" in s and "overflows" in s for s in result.skipped)
    assert "skipped" in result.summary()


# --------------------------------------------------------------------------------------------
# tolerances
# --------------------------------------------------------------------------------------------


def test_a_float16_output_does_not_loosen_a_float32_one():
    """y32 in float32 and y16 in float16 side by side; the candidate's y32 is off by 1e-3
    (relative): the float32 tolerance applies to it, and it fails."""
    shape = [2, 8]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)

    def model(k):
        return _model(
            [
                helper.make_node("MatMul", ["x", "w"], ["m"]),
                helper.make_node("Mul", ["m", "k"], ["y32"]),
                helper.make_node("Cast", ["m"], ["m16"], to=TensorProto.FLOAT16),
                helper.make_node("Relu", ["m16"], ["y16"]),
            ],
            [_vi("x", TensorProto.FLOAT, shape)],
            [_vi("y32", TensorProto.FLOAT, shape), _vi("y16", TensorProto.FLOAT16, shape)],
            [_const("w", w), _const("k", k)],
        )

    result = equivalence.compare(model(1.0), model(1.001))
    y32, y16 = result.outputs
    assert not result.ok and not y32.ok and y16.ok
    assert y32.rtol == equivalence.RTOL[F32] and y16.rtol == equivalence.RTOL[np.dtype(np.float16)]
    assert not y32.notes  # no note about float16: its own computation never leaves float32
    assert 5e-4 < y32.max_rel_error < 2e-3


def test_one_large_element_does_not_hide_an_error_in_the_others():
    """One element of 1e5, the others of order 1 and 21% off: a tolerance relative to the
    largest element (1e-5 * 1e5 * |x| = |x|) would let that through; element-wise it fails."""
    n = 64
    ref_scale = np.ones(n, np.float32)
    ref_scale[7] = 1e5
    bad_scale = np.full(n, 1.21, np.float32)
    bad_scale[7] = 1e5
    ref, bad = _scaled(ref_scale, (4, n)), _scaled(bad_scale, (4, n))
    result = equivalence.compare(ref, bad)
    (check,) = result.outputs
    assert not result.ok and check.where[1] != 7
    assert check.max_abs_error < 1e-5 * check.max_magnitude  # what the maximum-relative rule allowed
    assert check.max_rel_error == pytest.approx(0.21, rel=1e-3)
    # the large element itself may carry rounding-level differences
    tiny = ref_scale.copy()
    tiny[7] = np.nextafter(np.float32(1e5), np.float32(np.inf))
    assert equivalence.compare(ref, _scaled(tiny, (4, n))).ok


@pytest.mark.parametrize(
    "ref,got,ok",
    [
        # near zero, an error of the output's typical size times rtol passes (atol = rtol * scale)
        (np.array([1.0, -1.0, 1e-9, 2.0], np.float32), np.array([1.0, -1.0, 1e-9 + 5e-6, 2.0], np.float32), True),
        (np.array([1.0, -1.0, 1e-9, 2.0], np.float32), np.array([1.0, -1.0, 1e-9 + 1e-4, 2.0], np.float32), False),
        # a large element does not raise the scale of the others
        (np.array([1e5, 1.0, 1.0, 1.0], np.float32), np.array([1e5, 1.0, 1.001, 1.0], np.float32), False),
        # exact zero everywhere: exact
        (np.zeros(3, np.float32), np.full(3, 1e-30, np.float32), False),
        (np.array([0.0, 0.0], np.float32), np.array([0.0, 0.0], np.float32), True),
        # integers and bools: equal
        (np.array([True, False]), np.array([True, True]), False),
    ],
)
def test_element_wise_tolerance(ref, got, ok):
    assert equivalence.compare_outputs("y", ref, got).ok is ok


def test_tolerance_overrides():
    ref = np.array([1.0, 2.0, 3.0], np.float32)
    got = ref * np.float32(1.001)
    assert not equivalence.compare_outputs("y", ref, got).ok
    assert equivalence.compare_outputs("y", ref, got, rtol=2e-3).ok
    assert equivalence.compare_outputs("y", ref, got, rtol=0.0, atol=4e-3).ok
    assert not equivalence.compare_outputs("y", ref, got, rtol=0.0, atol=1e-3).ok
    check = equivalence.compare_outputs("y", ref, got, rtol=2e-3)
    assert check.rtol == 2e-3 and check.atol == pytest.approx(2e-3 * 2.0) and check.scale == 2.0
    model, off = _scaled(np.float32(1.0), (2, 8)), _scaled(np.float32(1.001), (2, 8))
    assert not equivalence.compare(model, off).ok
    assert equivalence.compare(model, off, rtol=2e-3).ok


def test_an_exact_reassociation_passes():
    """RepVGG-A0 (narrow, 32x32, symbolic batch) folded by onnxrep: every block's kernel sum is
    re-associated, within the float32 default with a margin."""
    model = repvgg_a0(resolution=32, width_scale=0.25, batch="N")
    out, report = onnxrep.optimize(model)
    assert report.rewritten > 0
    steps = []
    result = equivalence.compare(model, out, progress=steps.append)
    assert result.ok, result.summary()
    (check,) = result.outputs
    assert check.rtol == equivalence.RTOL[F32] and check.ratio < 0.5
    assert steps == list(range(1, equivalence.progress_steps(3) + 1))
    names = [s.name for s in result.input_sets]
    assert names[:4] == ["seed0 x1 batch1", "seed0 x1 batch2", "seed0 x10 batch1", "seed0 x1000 batch1"]
    assert len(names) == 10 and {s.batch for s in result.input_sets} == {1, 2}
    assert result.summary().startswith("ok: 10 input sets (seeds 0-2 x1/x10/x1000, batch 1/2); worst relative error")
    data = result.to_dict()
    assert data["input_sets"][1] == {
        "name": "seed0 x1 batch2", "shapes": {"input": [2, 3, 32, 32]}, "seed": 0, "magnitude": 1, "batch": 2, "source": "random",
    }
    assert {"max_rel_error", "atol", "rtol", "notes", "where", "input_set"} <= set(data["outputs"][0])


# --------------------------------------------------------------------------------------------
# input sets
# --------------------------------------------------------------------------------------------


def _batch_dependent(wrong: bool):
    """y = x * (1 + 0.5 * (batch - 1)) in the candidate, y = x in the original: equal at batch 1."""
    shape = ["N", 8]
    if not wrong:
        return _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", TensorProto.FLOAT, shape)], [_vi("y", TensorProto.FLOAT, shape)])
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["nf", "one"], ["extra"]),
        helper.make_node("Mul", ["extra", "half"], ["e2"]),
        helper.make_node("Add", ["e2", "one"], ["factor"]),
        helper.make_node("Mul", ["x", "factor"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"), _const("one", 1.0), _const("half", 0.5)]
    return _model(nodes, [_vi("x", TensorProto.FLOAT, shape)], [_vi("y", TensorProto.FLOAT, shape)], inits)


def test_a_symbolic_batch_runs_at_two():
    ref, bad = _batch_dependent(False), _batch_dependent(True)
    result = equivalence.compare(ref, bad)
    assert not result.ok and result.outputs[0].input_set == "seed0 x1 batch2"
    # with the batch fixed at 1 the difference is invisible
    fixed = equivalence.compare(ref, bad, dims={"N": 1})
    assert fixed.ok and {s.batch for s in fixed.input_sets} == {None}


def test_batch_dims_by_name():
    vi = _vi("x", TensorProto.FLOAT, [3, "batch_size", "T", None])
    model = _model([helper.make_node("Identity", ["x"], ["y"])], [vi], [_vi("y", TensorProto.FLOAT, [3, "batch_size", "T", None])])
    assert equivalence.random_inputs(model, 0, batch=2)["x"].shape == (3, 2, equivalence.DEFAULT_DIM, equivalence.DEFAULT_DIM)
    assert equivalence.has_symbolic_batch(model) and not equivalence.has_symbolic_batch(model, {"batch_size": 4})


def test_user_inputs_are_used():
    """The candidate is wrong only at x == 42, which no random input hits; a given input does."""
    shape = [1, 4]
    ref = _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", TensorProto.FLOAT, shape)], [_vi("y", TensorProto.FLOAT, shape)])
    bad = _model(
        [
            helper.make_node("Equal", ["x", "v"], ["hit"]),
            helper.make_node("Where", ["hit", "zero", "x"], ["y"]),
        ],
        [_vi("x", TensorProto.FLOAT, shape)],
        [_vi("y", TensorProto.FLOAT, shape)],
        [_const("v", 42.0), _const("zero", 0.0)],
    )
    assert equivalence.compare(ref, bad).ok
    given = [{"x": np.array([[1.0, 42.0, 3.0, 4.0]], np.float32)}]
    steps = []
    result = equivalence.compare(ref, bad, inputs=given, progress=steps.append)
    assert not result.ok
    assert result.outputs[0].input_set == "given1" and result.outputs[0].where == [0, 1]
    user = [s for s in result.input_sets if s.source == "user"]
    assert [(s.name, s.shapes) for s in user] == [("given1", {"x": [1, 4]})]
    assert len(steps) == equivalence.progress_steps(3, given)
    assert "1 given" in result.summary()
    with pytest.raises(onnxrep.VerificationError, match="no value for input 'x'"):
        equivalence.compare(ref, bad, seeds=1, inputs=[{}])


# --------------------------------------------------------------------------------------------
# discrete selections
# --------------------------------------------------------------------------------------------

ROWS, FEATURES, SCORES, K = 6, 16, 8, 3


def _topk_model(w, v, largest=1):
    """scores = x @ w; top-K indices of each row; picked = (x @ v) gathered at those indices."""
    return _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["scores"]),
            helper.make_node("TopK", ["scores", "k"], ["values", "indices"], axis=-1, largest=largest, name="topk"),
            helper.make_node("MatMul", ["x", "v"], ["features"]),
            helper.make_node("GatherElements", ["features", "indices"], ["picked"], axis=1),
        ],
        [_vi("x", TensorProto.FLOAT, [ROWS, FEATURES])],
        [_vi("indices", TensorProto.INT64, [ROWS, K]), _vi("picked", TensorProto.FLOAT, [ROWS, K])],
        [_const("w", w), _const("v", v), numpy_helper.from_array(np.array([K], np.int64), "k")],
    )


def _near_ties():
    """Score columns in identical pairs (exact ties), and the same weights with one column of each
    pair moved by one ulp: a candidate an exact rewrite could produce."""
    rng = np.random.default_rng(3)
    half = rng.standard_normal((FEATURES, SCORES // 2)).astype(np.float32)
    w = np.repeat(half, 2, axis=1)
    w_ulp = w.copy()
    w_ulp[:, 1::2] = np.nextafter(w[:, 1::2], np.float32(np.inf))
    v = rng.standard_normal((FEATURES, SCORES)).astype(np.float32)
    return w, w_ulp, v


def test_topk_near_ties_are_reported_as_ties():
    w, w_ulp, v = _near_ties()
    ref, cand = _topk_model(w, v), _topk_model(w_ulp, v)
    # the one-ulp change does flip selections: an exact comparison of the indices fails
    feeds = equivalence.random_inputs(ref, 0)
    assert not np.array_equal(equivalence.run_model(ref, feeds)[0], equivalence.run_model(cand, feeds)[0])
    result = equivalence.compare(ref, cand)
    assert result.ok, result.summary()
    for check in result.outputs:
        assert any(n.startswith("tie: TopK 'topk'") for n in check.notes), check.notes
    assert "near ties in discrete selections accepted for 'indices', 'picked'" in result.summary()


def test_topk_error_after_the_selection_is_not_a_tie():
    w, w_ulp, v = _near_ties()
    v_bad = v.copy()
    v_bad[:, 0] *= 1.01
    result = equivalence.compare(_topk_model(w, v), _topk_model(w_ulp, v_bad))
    picked = result.outputs[1]
    assert not result.ok and not picked.ok
    assert any("not a near tie" in n for n in picked.notes)


def test_topk_on_scores_that_differ_is_not_a_tie():
    w, _, v = _near_ties()
    w_bad = w.copy()
    w_bad[:, 1::2] *= 1.001
    result = equivalence.compare(_topk_model(w, v), _topk_model(w_bad, v))
    assert not result.ok
    assert any("input 'scores' differs" in n for o in result.outputs for n in o.notes)


def test_a_different_selection_node_is_not_a_tie():
    w, w_ulp, v = _near_ties()
    result = equivalence.compare(_topk_model(w, v), _topk_model(w_ulp, v, largest=0))
    assert not result.ok
    assert any("different node" in n for o in result.outputs for n in o.notes)


def test_argmax_near_tie():
    w, w_ulp, _ = _near_ties()

    def model(weights):
        return _model(
            [
                helper.make_node("MatMul", ["x", "w"], ["scores"]),
                helper.make_node("ArgMax", ["scores"], ["best"], axis=1, keepdims=0, name="argmax"),
            ],
            [_vi("x", TensorProto.FLOAT, [ROWS, FEATURES])],
            [_vi("best", TensorProto.INT64, [ROWS])],
            [_const("w", weights)],
        )

    result = equivalence.compare(model(w), model(w_ulp))
    assert result.ok and any(n.startswith("tie: ArgMax 'argmax'") for n in result.outputs[0].notes)


def test_integer_inputs_are_not_scaled():
    vi = _vi("i", TensorProto.INT64, [4])
    model = _model([helper.make_node("Identity", ["i"], ["y"])], [vi], [_vi("y", TensorProto.INT64, [4])])
    assert equivalence.input_plan(model, 2) == [(0, 1, None), (1, 1, None)]
    assert equivalence.progress_steps(2, model=model) == 2
    result = equivalence.compare(model, model, seeds=2)
    assert result.ok and len(result.input_sets) == 2 and result.summary().endswith("outputs equal")


def _softmax_of_branches(weights):
    """p = Softmax(x @ w1 + x @ w2 + ...): the branch sum linear-merge folds into one layer."""
    nodes, acc = [], None
    for i in range(len(weights)):
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"]))
        if acc is not None:
            nodes.append(helper.make_node("Add", [acc, f"m{i}"], [f"a{i}"]))
        acc = f"m{i}" if acc is None else f"a{i}"
    nodes.append(helper.make_node("Softmax", [acc], ["p"], axis=1))
    return _model(
        nodes, [_vi("x", TensorProto.FLOAT, ["N", 64])], [_vi("p", TensorProto.FLOAT, ["N", 32])],
        [_const(f"w{i}", w) for i, w in enumerate(weights)],
    )


def test_a_saturated_softmax_of_an_exact_fold_passes_within_its_own_sensitivity(monkeypatch):
    """At x10 and x1000 the logits are large and the softmax turns their rounding into relative
    errors far above rtol; the original moves as much when its inputs move by a few rtol."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal((64, 32)).astype(np.float32)
    model = _softmax_of_branches([w1, w2])
    out, report = onnxrep.optimize(model)
    assert report.rewritten == 1
    result = equivalence.compare(model, out)
    assert result.ok, result.summary()
    (check,) = result.outputs
    assert any(n.startswith("within the original's own sensitivity") for n in check.notes)
    assert "x1 " not in " ".join(check.notes) + " " and "own sensitivity for 'p'" in result.summary()
    # without that allowance the same exact fold would fail
    monkeypatch.setattr(equivalence, "SENSITIVITY_SCALE", 0)
    assert not equivalence.compare(model, out).ok
    monkeypatch.undo()
    # and it does not excuse a real error: 1e-3 on the weights
    bad = _softmax_of_branches([w1 * np.float32(1.001), w2 * np.float32(1.001)])
    assert not equivalence.compare(model, bad).ok


def test_a_model_failing_on_the_generated_inputs_gives_one_line_and_no_runtime_log(tmp_path):
    """onnxruntime's sessions log nothing of their own (severity fatal only): a model that fails on
    the inputs made for it (a Reshape that needs H = W = 8, the dims set to 32 by default) ends
    with onnxrep's one line on stderr, no coloured ``[E:onnxruntime:...]`` line before it."""
    import re
    import subprocess
    import sys

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])],
        [numpy_helper.from_array(np.array([1, 512], np.int64), "shape")],
    )
    path = tmp_path / "dims.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    proc = subprocess.run([sys.executable, "-m", "onnxrep", "optimize", str(path), str(tmp_path / "o.onnx"), "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1 and "onnxruntime" in proc.stderr, proc.stderr
    assert not re.search(r"\x1b\[|\[E:onnxruntime", proc.stderr), proc.stderr
    assert not (tmp_path / "o.onnx").exists()
