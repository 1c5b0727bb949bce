"""The constant-fold pass."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import onnxrep
from graphs import examples, histogram
from test_conv_chain import builder, optimize, reasons


def test_kernel_computed_from_constants_is_folded_and_merged():
    c = 4
    b = builder(c)
    rng = np.random.default_rng(3)
    w = b.node("Mul", [b.const(rng.standard_normal((c, c, 3, 3))), b.const(rng.standard_normal((c, 1, 1, 1)))])
    w = b.node("Add", [w, b.node("Pad", [b.const(rng.standard_normal((c, c, 1, 1))), b.const_int(np.array([0, 0, 1, 1, 0, 0, 1, 1]))])])
    y = b.bn(b.node("Conv", ["x", w], pads=[1] * 4), c)
    out, report = optimize(b.model(y), b.feeds(), passes=("constant-fold", "affine-fold"))
    assert histogram(out) == {"Conv": 1}


def test_expand_into_a_large_constant_is_not_folded():
    c = 4
    b = builder(c, spatial=(32, 32))
    big = b.node("Expand", [b.const(np.ones((1, c, 1, 1))), b.const_int(np.array([1, c, 32, 32]))])
    y = b.node("Mul", ["x", big])
    out, report = optimize(b.model(y), b.feeds(), passes=("constant-fold",))
    assert histogram(out) == histogram(b.model(y))
    assert reasons(report, "constant-fold")[0].startswith("no_growth:")


def test_static_shape_chain_is_folded():
    c = 4
    b = builder(c, spatial=(6, 6))
    shape = b.node("Shape", ["x"])
    y = b.node("Reshape", ["x", shape])
    out, report = optimize(b.model(y), b.feeds(), passes=("constant-fold",))
    assert histogram(out) == {"Reshape": 1} and report.rewritten == 1


def test_random_ops_are_not_folded():
    c = 4
    b = builder(c, spatial=(2, 2))
    r = b.node("RandomUniform", [], shape=[1, c, 2, 2], seed=1.0)
    y = b.node("Mul", [b.node("Mul", [r, b.const(np.float32(0.0))]), "x"])
    out, report = onnxrep.optimize(b.model(y), passes=["constant-fold"])
    assert report.rewritten == 0 and histogram(out) == histogram(b.model(y))


OPS = ["Add", "Mul", "Sub", "Transpose", "Neg", "Abs", "Sqrt", "Concat", "Unsqueeze-Squeeze"]


@settings(max_examples=examples(40), deadline=None)
@given(st.lists(st.sampled_from(OPS), min_size=1, max_size=6), st.integers(0, 1000))
def test_random_constant_chains_fold_to_one_initializer(chain, seed):
    c = 4
    b = builder(c, spatial=(3, 3))
    rng = np.random.default_rng(seed)
    t = b.const(rng.uniform(0.5, 2.0, (1, c, 3, 3)))
    for op in chain:
        if op in ("Add", "Mul", "Sub"):
            t = b.node(op, [t, b.const(rng.uniform(0.5, 2.0, (1, c, 1, 3)))])
        elif op == "Transpose":
            t = b.node(op, [t], perm=[0, 1, 3, 2])
        elif op == "Concat":
            t = b.node("Slice", [b.node(op, [t, t], axis=1), b.const_int([0]), b.const_int([c]), b.const_int([1])])
        elif op == "Unsqueeze-Squeeze":
            t = b.node("Squeeze", [b.node("Unsqueeze", [t, b.const_int([0])]), b.const_int([0])])
        else:
            t = b.node(op, [b.node("Abs", [t])] if op == "Sqrt" else [t])
    model = b.model(b.node("Mul", ["x", t]))
    out, report = optimize(model, b.feeds(), passes=("constant-fold",))
    assert histogram(out) == {"Mul": 1} and report.rewritten == 1


@pytest.mark.parametrize("opset", [13, 18])
def test_split_with_both_outputs_folded_keeps_them_apart(opset):
    """A multi-output node folded one output at a time: the other output keeps its slot."""
    from onnx import helper

    b = builder(5, spatial=(3,))
    b.opset = opset
    c = b.const((np.arange(15, dtype=np.float32) + 1).reshape(3, 5, 1))
    b.nodes.append(helper.make_node("Split", [c, b.const_int([1, 2])], ["sa", "sb"], name="split", axis=0))
    y = b.node("Relu", [b.add(b.node("Mul", ["x", "sa"]), b.node("Sum", ["x", "sb"]))])
    out, report = optimize(b.model(y), b.feeds(), passes=("constant-fold",))
    assert report.rewritten == 2 and "Split" not in histogram(out)
