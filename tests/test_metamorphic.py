"""Spelling invariance: one random linear block, written many ways, must fold to the same thing.

A block is drawn as an abstract program (:class:`Block`: stages of branch sums, each with an
optional layer scale and a ReLU, then optionally a linear head) with all its numbers fixed up front. It is then
written out twice: *plainly* (NCHW, Add chains, pads on the Conv, BatchNormalization) and in a
*spelling* drawn at random per site, with the rewrites the exporters use:

* layout: NHWC input with a Transpose pair around every Conv, affines on the last axis as
  ``Mul``/``Add`` of shape ``[C]``, ``ReduceMean`` over H and W for the pooling (tf2onnx, jax2onnx);
* sums: left or right Add chains in any order, variadic ``Sum``, ``ReduceSum(Concat(Unsqueeze))``,
  ``Sub(a, Neg(b))``;
* pads: on the Conv, in an explicit zero ``Pad`` before it (whole or in part), ``auto_pad=SAME_UPPER``;
* padding rings: ``Sub(v) -> Pad(0) -> Add(v)`` or ``Concat`` of constant strips along W, then H;
* BatchNormalization as it is, or as ``Mul`` then ``Add`` of per-channel constants;
* scalings: one ``Mul`` or two scalar ``Mul`` in a row;
* no-ops: ``Identity`` nodes anywhere;
* head: ``Flatten`` or ``Reshape`` before it, ``Gemm`` or ``MatMul`` + ``Add``.

The property: onnxrep gives the spelled block the same number of compute nodes (Conv, Gemm and
MatMul) and affine nodes (Add, Sub, Mul, Sum, BatchNormalization) as the plain one, no
BatchNormalization, equal outputs, and a fixed point. Before that, the two written blocks are run
against each other, so that the test checks the spellings it generates, too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxrep
from graphs import Builder, examples, histogram, run

C = 6
EPS = 1e-5
TO_NCHW = [0, 3, 1, 2]
TO_NHWC = [0, 2, 3, 1]
COMPUTE = ("Conv", "Gemm", "MatMul")
AFFINE = ("Add", "Sub", "Mul", "Sum", "BatchNormalization")


# --------------------------------------------------------------------------------------------
# the abstract block
# --------------------------------------------------------------------------------------------


@dataclass
class Branch:
    """One summand: ``conv`` (k x k, then BN or a bias), ``chain`` (a bias-free 1x1, then a k x k
    conv and BN), ``ring`` (DBB's: a 1x1 conv and BN, padded with what that BN gives for a zero
    input, then an unpadded k x k conv and BN) or ``identity`` (BN of the stage input, or the
    input itself)."""

    kind: str
    k: int = 1
    weights: list = field(default_factory=list)  # conv weights, in order
    bias: np.ndarray | None = None
    bn: list | None = None  # gamma, beta, mean, var
    bn1: list | None = None  # ring: the BN after the 1x1


@dataclass
class Stage:
    """A sum of branches, then optionally a scaling (a layer scale: per-channel or scalar), then a
    ReLU."""

    stride: int
    branches: list[Branch]
    scale: np.ndarray | None = None


@dataclass
class Block:
    size: int
    stages: list[Stage]
    head: dict | None  # {"bn": [...] | None, "w": (C, K), "b": (K,)}


def bn_params(rng, c=C):
    return [rng.uniform(0.5, 1.5, c), rng.standard_normal(c) * 0.1, rng.standard_normal(c) * 0.1, rng.uniform(0.5, 2.0, c)]


def bn_affine(params) -> tuple[np.ndarray, np.ndarray]:
    """Scale and offset of an inference BN, from its parameters' float32 values (as a fold reads
    them, and as a framework writing ``Mul``/``Add`` computes them): the offset is what the BN gives
    for a zero input, the value a padding ring after it must hold."""
    gamma, beta, mean, var = [np.asarray(v, np.float32).astype(np.float64) for v in params]
    s = gamma / np.sqrt(var + np.float64(np.float32(EPS)))
    return s, beta - mean * s


@st.composite
def blocks(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    size = draw(st.integers(6, 11))
    stages = []
    for _ in range(draw(st.integers(1, 2))):
        if True:
            stride = draw(st.sampled_from([1, 1, 2]))
            kinds = draw(st.lists(st.sampled_from(["conv", "conv", "chain", "ring", "identity"]), min_size=2, max_size=4))
            if kinds.count("identity") == len(kinds):
                kinds[0] = "conv"
            branches = []
            for kind in kinds:
                if kind == "identity":
                    if stride != 1 or any(b.kind == "identity" for b in branches):
                        continue
                    branches.append(Branch("identity", bn=bn_params(rng) if draw(st.booleans()) else None))
                    continue
                k = draw(st.sampled_from([1, 3, 3, 5]))
                w = [rng.standard_normal((C, C, k, k)) / np.sqrt(C * k * k)]
                if kind in ("chain", "ring"):
                    k = draw(st.sampled_from([3, 5]))
                    w = [rng.standard_normal((C, C, 1, 1)) / np.sqrt(C), rng.standard_normal((C, C, k, k)) / np.sqrt(C * k * k)]
                with_bn = kind in ("chain", "ring") or draw(st.booleans())
                branches.append(
                    Branch(kind, k, w, bias=None if with_bn else rng.standard_normal(C) * 0.1, bn=bn_params(rng) if with_bn else None,
                           bn1=bn_params(rng) if kind == "ring" else None)
                )
            if len(branches) < 2:
                branches.append(Branch("conv", 1, [rng.standard_normal((C, C, 1, 1)) / np.sqrt(C)], bn=bn_params(rng)))
            scale = draw(st.sampled_from([None, (), (C,)]))
            stages.append(Stage(stride, branches, None if scale is None else rng.uniform(0.5, 1.5, scale)))
    head = None
    if draw(st.booleans()):
        k = draw(st.integers(2, 5))
        head = {"bn": bn_params(rng) if draw(st.booleans()) else None, "w": rng.standard_normal((C, k)) / np.sqrt(C),
                "b": rng.standard_normal(k) * 0.1}
    return Block(size, stages, head)


PLAIN = {"layout": "nchw", "sum": "add_left", "pad": "conv", "bn": "bn", "scale": "one", "noop": False,
         "flatten": "flatten", "linear": "gemm", "ring": "sub_pad_add"}

SPELLINGS = {
    "layout": ["nchw", "nhwc"],
    "sum": ["add_left", "add_right", "reorder", "Sum", "stack", "sub_neg"],
    "pad": ["conv", "pad_node", "pad_part", "same"],
    "bn": ["bn", "muladd"],
    "scale": ["one", "split"],
    "noop": [False, True],
    "flatten": ["flatten", "reshape"],
    "linear": ["gemm", "matmul_add"],
    "ring": ["sub_pad_add", "concat"],
}


# --------------------------------------------------------------------------------------------
# writing a block out
# --------------------------------------------------------------------------------------------


class Writer:
    """Writes a :class:`Block` with a spelling choice per site, drawn from ``choose(site)``."""

    def __init__(self, block: Block, choose):
        self.block, self.choose = block, choose
        self.nhwc = choose("layout") == "nhwc"
        shape = [1, block.size, block.size, C] if self.nhwc else [1, C, block.size, block.size]
        self.b = Builder(C, input_shape=shape)
        self.size = block.size  # of the current stage's input

    # plumbing ------------------------------------------------------------------------------
    def node(self, op, inputs, **attrs):
        y = self.b.node(op, inputs, **attrs)
        if self.choose("noop"):
            y = self.b.node("Identity", [y])
        return y

    def const(self, values):
        return self.b.const(np.asarray(values))

    def channel_shape(self, v):
        """A per-channel vector shaped to broadcast on the channel axis of this layout."""
        return np.asarray(v).reshape((C,) if self.nhwc else (C, 1, 1))

    # ops -----------------------------------------------------------------------------------
    def conv(self, x, w, stride, bias=None, pad=None):
        k = w.shape[-1]
        pad = (k - 1) // 2 if pad is None else pad
        attrs = {"kernel_shape": [k, k], "strides": [stride, stride]}
        spelling = self.choose("pad") if pad else "conv"
        if stride != 1 and spelling == "same":
            spelling = "conv"  # SAME at stride 2 pads after only: not the block's padding
        src = self.node("Transpose", [x], perm=TO_NCHW) if self.nhwc else x
        if spelling == "same":
            attrs["auto_pad"] = "SAME_UPPER"
        elif spelling in ("pad_node", "pad_part"):
            first = pad if spelling == "pad_node" else 1
            src = self.node("Pad", [src, self.b.const_int([0, 0, first, first, 0, 0, first, first])])
            attrs["pads"] = [pad - first] * 4
        else:
            attrs["pads"] = [pad] * 4
        inputs = [src, self.const(w)] + ([self.const(bias)] if bias is not None else [])
        y = self.node("Conv", inputs, **attrs)
        return self.node("Transpose", [y], perm=TO_NHWC) if self.nhwc else y

    def bn(self, x, params):
        if not self.nhwc and self.choose("bn") == "bn":
            return self.node("BatchNormalization", [x] + [self.const(p) for p in params], epsilon=EPS)
        s, t = bn_affine(params)
        y = self.node("Mul", [x, self.const(self.channel_shape(s))])
        return self.node("Add", [y, self.const(self.channel_shape(t))])

    def total(self, terms):
        spelling = self.choose("sum")
        if spelling == "Sum":
            return self.node("Sum", terms)
        if spelling == "stack":
            parts = [self.node("Unsqueeze", [t, self.b.const_int([0])]) for t in terms]
            return self.node("ReduceSum", [self.node("Concat", parts, axis=0), self.b.const_int([0])], keepdims=0)
        if spelling == "sub_neg":
            acc = terms[0]
            for t in terms[1:]:
                acc = self.node("Sub", [acc, self.node("Neg", [t])])
            return acc
        if spelling == "reorder":
            terms = terms[1:] + terms[:1]
        if spelling == "add_right":
            acc = terms[-1]
            for t in reversed(terms[:-1]):
                acc = self.node("Add", [t, acc])
            return acc
        acc = terms[0]
        for t in terms[1:]:
            acc = self.node("Add", [acc, t])
        return acc

    # the block -----------------------------------------------------------------------------
    def ring(self, y, p, params):
        """``y`` padded by ``p`` on H and W with, per channel, what the BN ``params`` give for a
        zero input (computed from their float32 values, as a fold reads them)."""
        _, v = bn_affine(params)
        h_axis, w_axis = (1, 2) if self.nhwc else (2, 3)
        if self.choose("ring") == "sub_pad_add":
            pads = [0] * 8
            pads[h_axis] = pads[w_axis] = pads[4 + h_axis] = pads[4 + w_axis] = p
            y = self.node("Sub", [y, self.const(self.channel_shape(v))])
            y = self.node("Pad", [y, self.b.const_int(pads)])
            return self.node("Add", [y, self.const(self.channel_shape(v))])
        n = self.size
        for axis, other in ((w_axis, n), (h_axis, n + 2 * p)):
            shape = [1, n, n, C] if self.nhwc else [1, C, n, n]
            shape[axis], shape[h_axis if axis == w_axis else w_axis] = p, other
            strip = np.broadcast_to(self.channel_shape(v), shape).astype(np.float64)
            y = self.node("Concat", [self.const(strip), y, self.const(strip)], axis=axis)
        return y

    def branch(self, x, br: Branch, stride):
        if br.kind == "identity":
            return self.bn(x, br.bn) if br.bn is not None else x
        y = x
        if br.kind == "chain":
            y = self.conv(y, br.weights[0], 1)
        if br.kind == "ring":
            y = self.ring(self.bn(self.conv(y, br.weights[0], 1), br.bn1), (br.k - 1) // 2, br.bn1)
            y = self.conv(y, br.weights[-1], stride, br.bias, pad=0)
            return self.bn(y, br.bn)
        y = self.conv(y, br.weights[-1], stride, br.bias)
        return self.bn(y, br.bn) if br.bn is not None else y

    def stage(self, x, st_: Stage):
        y = self.total([self.branch(x, br, st_.stride) for br in st_.branches])
        self.size = (self.size + st_.stride - 1) // st_.stride
        if st_.scale is not None:
            s = st_.scale if st_.scale.ndim == 0 else self.channel_shape(st_.scale)
            if self.choose("scale") == "split":
                return self.node("Mul", [self.node("Mul", [y, self.const(s * 2.0)]), self.const(np.float64(0.5))])
            return self.node("Mul", [y, self.const(s)])
        return y

    def head(self, x, head):
        if self.nhwc:
            y = self.node("ReduceMean", [x], axes=[1, 2], keepdims=0)
        else:
            y = self.node("GlobalAveragePool", [x])
            if self.choose("flatten") == "flatten":
                y = self.node("Flatten", [y], axis=1)
            else:
                y = self.node("Reshape", [y, self.b.const_int([1, C])])
        if head["bn"] is not None:
            if self.choose("bn") == "bn" and not self.nhwc:
                y = self.node("BatchNormalization", [y] + [self.const(p) for p in head["bn"]], epsilon=EPS)
            else:
                s, t = bn_affine(head["bn"])
                y = self.node("Add", [self.node("Mul", [y, self.const(s)]), self.const(t)])
        if self.choose("linear") == "gemm":
            return self.node("Gemm", [y, self.const(head["w"].T), self.const(head["b"])], transB=1)
        return self.node("Add", [self.node("MatMul", [y, self.const(head["w"])]), self.const(head["b"])])

    def write(self) -> onnx.ModelProto:
        y = "x"
        for st_ in self.block.stages:
            y = self.b.relu(self.stage(y, st_))
        if self.block.head is not None:
            y = self.head(y, self.block.head)
        return self.b.model(y)


def write(block: Block, choose) -> tuple[onnx.ModelProto, bool]:
    """The block written with ``choose``'s spellings, and whether it is in NHWC."""
    writer = Writer(block, choose)
    return writer.write(), writer.nhwc


def plain(site):
    return PLAIN[site]


def drawn(data):
    """A chooser that draws each site's spelling from hypothesis's ``data``."""
    return lambda site: data.draw(st.sampled_from(SPELLINGS[site]), label=site)


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def optimize(model):
    out, report = onnxrep.optimize(model)
    onnx.checker.check_model(out)
    return out, report


def counts(model) -> dict[str, int]:
    """Compute nodes, affine nodes (the bias Add of a MatMul counts as part of the layer, as Gemm's
    bias does) and BatchNormalization nodes."""
    h = histogram(model)
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    bias_adds = sum(1 for n in model.graph.node if n.op_type == "Add" and made_by.get(n.input[0]) == "MatMul")
    return {"compute": sum(h.get(op, 0) for op in COMPUTE),
            "affine": sum(h.get(op, 0) for op in AFFINE) - bias_adds,
            "BatchNormalization": h.get("BatchNormalization", 0)}


def outputs(model, x_nchw, nhwc):
    x = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1)) if nhwc else x_nchw
    (y,) = run(model, {"x": x})
    return y.transpose(0, 3, 1, 2) if nhwc and y.ndim == 4 else y


def assert_close(expected, actual, rtol=1e-5):
    """Element-wise ``|a - e| <= rtol * (|e| + max|e|)``: float32 sums re-associated by a fold
    round with the largest terms; a wrong fold errs by the values themselves."""
    e, a = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    bound = rtol * (np.abs(e) + np.max(np.abs(e), initial=0.0))
    assert np.all(np.abs(a - e) <= bound), float(np.max(np.abs(a - e) - bound))


@settings(max_examples=examples(40), deadline=None, suppress_health_check=list(HealthCheck))
@given(block=blocks(), data=st.data())
def test_property_every_spelling_folds_like_the_plain_block(block, data):
    choose = drawn(data)
    spelled, nhwc = write(block, choose)
    reference, _ = write(block, plain)
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1, C, block.size, block.size)).astype(np.float32) * s for s in (1.0, 50.0)]
    for x in xs:  # the spelling generator itself: both writings compute the same function
        assert_close(outputs(reference, x, False), outputs(spelled, x, nhwc), 1e-5)

    out_p, _ = optimize(reference)
    out_s, rep_s = optimize(spelled)
    assert counts(out_p)["BatchNormalization"] == 0
    assert counts(out_s) == counts(out_p), (histogram(out_s), histogram(out_p), rep_s.to_dict()["passes"])
    for x in xs:
        assert_close(outputs(spelled, x, nhwc), outputs(out_s, x, nhwc))
    again, rep = optimize(out_s)
    assert rep.rewritten == 0, rep.to_dict()["passes"]
    assert histogram(again) == histogram(out_s)


def test_the_plain_block_folds_to_one_conv_per_stage():
    """Teeth for the property: the plain writing of a two-stage block (a ring branch in the first,
    a chain in the second) with a head is one Conv per sum stage, the scaling folded, and one Gemm;
    the Concat ring folds the same."""
    rng = np.random.default_rng(0)
    w = lambda k: rng.standard_normal((C, C, k, k)) / np.sqrt(C * k * k)  # noqa: E731
    stages = [
        Stage(1, [Branch("conv", 3, [w(3)], bn=bn_params(rng)), Branch("conv", 1, [w(1)], bn=bn_params(rng)),
                  Branch("ring", 3, [w(1), w(3)], bn=bn_params(rng), bn1=bn_params(rng)),
                  Branch("identity", bn=bn_params(rng))], scale=rng.uniform(0.5, 1.5, (C,))),
        Stage(2, [Branch("chain", 3, [w(1), w(3)], bn=bn_params(rng)), Branch("conv", 1, [w(1)], bias=rng.standard_normal(C))]),
    ]
    block = Block(8, stages, {"bn": bn_params(rng), "w": rng.standard_normal((C, 3)), "b": rng.standard_normal(3)})
    for ring in SPELLINGS["ring"]:
        out, _ = optimize(write(block, dict(PLAIN, ring=ring).__getitem__)[0])
        assert counts(out) == {"compute": 3, "affine": 0, "BatchNormalization": 0}, histogram(out)


def test_nhwc_variadic_sum_folds():
    """Found by the property: in NHWC a variadic ``Sum`` of ``Transpose(Conv(Transpose(x)))``
    branches with their BN as ``Mul``/``Add`` on the last axis was left as it is (normalize-sums
    did not see the branches behind the Transposes and affines); it folds like the Add chain."""
    rng = np.random.default_rng(1)
    w = lambda k: rng.standard_normal((C, C, k, k)) / np.sqrt(C * k * k)  # noqa: E731
    block = Block(7, [Stage(1, [Branch("conv", 3, [w(3)], bn=bn_params(rng)), Branch("conv", 1, [w(1)], bn=bn_params(rng)),
                                Branch("identity", bn=bn_params(rng))])], None)
    spelling = dict(PLAIN, layout="nhwc", sum="Sum")
    spelled, nhwc = write(block, spelling.__getitem__)
    out, report = optimize(spelled)
    assert counts(out) == {"compute": 1, "affine": 0, "BatchNormalization": 0}, histogram(out)
    x = rng.standard_normal((1, C, 7, 7)).astype(np.float32)
    assert_close(outputs(spelled, x, nhwc), outputs(out, x, nhwc))


def test_ring_after_a_bn_written_as_mul_add_folds():
    """Found by the property: a DBB ring ``Sub(v) -> Pad(0) -> Add(v)`` after a 1x1 conv whose BN
    is written ``Mul`` then ``Add`` (with an identity branch, so that the sum merges over two
    rounds): the BN's Add was taken for the ring's first shift, the ring was not recognized, and
    affine-fold folded its shifts apart, leaving three convs. It folds to one."""
    rng = np.random.default_rng(0)
    w = lambda k: rng.standard_normal((C, C, k, k)) / np.sqrt(C * k * k)  # noqa: E731
    block = Block(7, [Stage(1, [Branch("conv", 3, [w(3)], bn=bn_params(rng)),
                                Branch("ring", 3, [w(1), w(3)], bn=bn_params(rng), bn1=bn_params(rng)),
                                Branch("identity", bn=bn_params(rng))])], None)
    for ring in SPELLINGS["ring"]:
        spelled, _ = write(block, dict(PLAIN, bn="muladd", ring=ring).__getitem__)
        out, _ = optimize(spelled)
        assert counts(out) == {"compute": 1, "affine": 0, "BatchNormalization": 0}, histogram(out)
        x = rng.standard_normal((1, C, 7, 7)).astype(np.float32)
        assert_close(outputs(spelled, x, False), outputs(out, x, False))
