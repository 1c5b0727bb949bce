"""Decompositions that runtimes fuse into one kernel, and whether a rewrite would break one.

onnxruntime (graph optimization level EXTENDED and up, the default ALL included) and OpenVINO
recognize a few multi-node spellings of common functions and run each as one fused kernel. Several
of those spellings contain an affine node (a Mul, Div or Add by a constant) at one end, next to the
Conv or linear layer around the activation; folding that node into the layer is exact, but leaves
the rest of the spelling unrecognized: the function then runs as three or four kernels, and on
the CPU every extra kernel between two convs costs a reorder to and from the blocked layout too.
TorchScript's GELU, ``Div(x, 1.414..) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5)``, is the case that
matters most: with its ``Mul(0.5)`` folded into the next Conv, a RepViT or FastViT runs slower than
before optimizing. The passes that absorb affine nodes (``affine-fold``, ``linear-affine``,
``parallel-merge``) therefore ask :func:`breaks_fusion` first and decline (condition
``runtime_fusion``, lifted by ``--allow-cost-increase``) when a rewrite takes some members of a
matched pattern but not all of them.

Sources: onnxruntime ``onnxruntime/core/optimizer/`` (microsoft/onnxruntime; fusions at level 2,
registered for the CPU in ``graph_transformer_utils.cc``; constants compared by
``optimizer_utils::IsInitializerWithExpectedValue`` in ``utils.cc``), OpenVINO
``src/common/transformations/src/transformations/common_optimizations/`` (openvinotoolkit/openvino;
constants by ``op::util::has_constant_value``). Each pattern that onnxruntime fuses is checked
against onnxruntime's own optimized graph in ``tests/test_fusions.py``.

Catalogue (``x`` is the pattern's input; binary ops match with their operands in either order
unless noted; every intermediate result is read only by the next step and is no graph output, as
onnxruntime requires; a constant is one element, for onnxruntime of rank 0 or shape ``[1]``):

``GELU (erf)`` -> onnxruntime ``Gelu`` (com.microsoft), OpenVINO ``Gelu``
    ``d = Div(x, c)`` with ``c`` = sqrt(2) (onnxruntime: 1.4142135 or 1.4142099618911743 within
    ``1e-8 + 1e-5 |c|``; OpenVINO: within 0.001), ``e = Erf(d)``, ``a = Add(e, 1)``, then either
      1. ``h = Mul(x, 0.5)``, ``Mul(h, a)`` (onnxruntime pattern 1, OpenVINO GeluFusionWithErfOne)
      2. ``m = Mul(x, a)``, ``Mul(m, 0.5)`` (onnxruntime pattern 2, OpenVINO ...ErfTwo; TorchScript);
         onnxruntime 1.32 not where ``x`` is computed by a Mul (it takes that Mul for pattern 1's
         ``Mul(x, 0.5)``, fails its check and gives up: FastViT's GELU after its SE gate)
      3. ``m = Mul(a, 0.5)``, ``Mul(x, m)`` (OpenVINO ...ErfThree)
    or ``Mul(x, 1/sqrt(2)) -> Erf -> Mul(0.5) -> Add(0.5) -> Mul(x)`` (OpenVINO ...ErfFour).
    onnxruntime: ``gelu_fusion.cc``; OpenVINO: ``gelu_fusion.cpp``.
``GELU (tanh)`` -> onnxruntime ``FastGelu`` (com.microsoft), OpenVINO ``Gelu(tanh)``
    inner ``u``, either ``Mul(Add(Mul(Mul(x, 0.044715), x), 1), Mul(x, 0.7978845834732056))``
    (onnxruntime formula 1, OpenVINO GeluFusionWithTanhNoPower) or
    ``Mul(Add(Mul(Pow(x, 3), 0.044715), x), 0.7978845834732056)`` (onnxruntime formula 2, OpenVINO
    GeluFusionWithTanh); then ``t = Tanh(u)``, ``a = Add(t, 1)`` and ``Mul(a, Mul(x, 0.5))`` (both
    runtimes) or ``Mul(x, Mul(a, 0.5))`` (OpenVINO). onnxruntime: the tolerance above, on the CPU
    float32 only, and the result no graph output; OpenVINO: 0.044715 within 0.001, sqrt(2/pi) within
    0.01. TorchScript's own tanh GELU (``x*x*x``, the 0.5 applied last) is matched by neither.
    onnxruntime: ``fast_gelu_fusion.cc``; OpenVINO: ``gelu_fusion.cpp``.
``HardSwish`` -> OpenVINO ``HSwish`` (onnxruntime fuses no HardSwish decomposition)
    ``Mul(x, Min(Relu(Add(x, 3)), 6))`` then ``Div(6)`` or ``Mul(1/6)`` (HSwishFusionWithReluDiv /
    ...ReluMul); ``Mul(Clip(Add(x, 3), 0, 6), x)`` (HSwishFusionWithClamp: ``HSwish(x) * 6``, a
    division after it is not part of the pattern); ``Mul(x, HardSigmoid(x))`` with alpha 1/6, beta
    0.5 (HSwishFusionWithHSigmoid). OpenVINO: ``hswish_fusion.cpp``.
``HardSigmoid`` -> OpenVINO ``HSigmoid``
    ``Min(Relu(Add(x, 3)), 6)`` or ``Clip(Add(x, 3), 0, 6)``, then ``Div(6)`` or ``Mul(1/6)``; or
    ``Div(Min(Max(Add(x, 3), 0), 6), 6)``. OpenVINO: ``hsigmoid_fusion.cpp``. Catalogued but never
    protected: its members besides the clamp are affine maps, and folding them into the Convs
    around it leaves the clamp alone, which both runtimes run as the Conv's activation
    (onnxruntime's ``conv_activation_fusion.cc`` takes Relu, Clip with constant bounds, Sigmoid,
    Tanh, LeakyRelu and HardSigmoid on the CPU; it has no HardSigmoid decomposition fusion).
``SiLU / Swish`` -> onnxruntime ``QuickGelu`` (com.microsoft), OpenVINO ``Swish``
    ``Mul(x, Sigmoid(x))`` or ``Mul(x, Sigmoid(Mul(x, alpha)))`` with any scalar alpha (onnxruntime
    ``quick_gelu_fusion.cc``; OpenVINO SwishFusionWithSigmoid / ...WithSigmoidWithBeta), and
    ``Div(x, Add(Exp(Neg(x)), 1))`` or with ``Neg(Mul(x, beta))`` (OpenVINO SwishFusionWithoutBeta /
    ...WithBeta). OpenVINO: ``swish_fusion.cpp``.
``LayerNorm`` -> onnxruntime ``LayerNormalization``
    ``m = ReduceMean(x)``, ``d = Sub(x, m)`` (once, or twice as older PyTorch exports: one Sub feeding
    Pow, one feeding Div), ``Pow(d, e)``, ``ReduceMean``, ``Add(eps)``, ``Sqrt``, ``q = Div(d, sqrt)``,
    ``Mul(q, scale)``, ``Add(bias)``; both ReduceMeans over the same single axis, the last one
    (attribute, or a constant input from opset 18); scale and bias of rank 1 and equal length.
    onnxruntime: ``layer_norm_fusion.cc`` (LayerNormFusion; Cast steps of mixed precision are not
    catalogued).
``RMSNorm`` -> onnxruntime ``SimplifiedLayerNormalization``
    ``Pow(x, e) -> ReduceMean (last axis) -> Add(eps) -> Sqrt -> Div(x, sqrt) -> Mul(scale)``, scale
    of rank 1. onnxruntime: ``layer_norm_fusion.cc`` (SimplifiedLayerNormFusion).

Fusions the folds do not break (so not catalogued): the epilogue fusions, onnxruntime's
``conv_activation_fusion.cc`` (Conv + Relu / Clip / Sigmoid / Tanh / LeakyRelu / HardSigmoid),
``conv_add_act_fusion.cc`` (NCHWc Conv + Add + activation), ``conv_add_fusion.cc`` /
``conv_mul_fusion.cc`` / ``conv_bn_fusion.cc`` (an affine node after a Conv into its weights),
``matmul_add_fusion.cc`` (MatMul + Add -> Gemm) and ``gemm_activation_fusion.cc``, and OpenVINO's
Conv/MatMul post-op fusions. The folds never remove an activation; the rewritten Conv keeps its
attributes and its output tensor, so an activation that read the Conv reads the new Conv; the
affine nodes a fold absorbs after a Conv are the ones onnxruntime's own Conv+Add / Conv+Mul /
Conv+BN fusions absorb the same way; and a folded linear layer is written as a Gemm (2-D input)
or a MatMul with its bias Add, the spellings ``matmul_add_fusion`` and ``gemm_activation_fusion``
read. ``tests/test_fusions.py`` checks each of these against onnxruntime's optimized graph of the
output (Conv + BN + Relu, an NCHWc Conv with its residual Add and Relu from
``nchwc_transformer.cc``, MatMul + Add + Relu).

Beyond this catalogue the engine checks the whole result (:mod:`onnxrep.kernels`): onnxruntime's
optimized graph of the output may not have more nodes than the input's (condition
``kernel_count``), so that a fusion missing here is kept too, where the model is small enough
for the check and no saving elsewhere in the graph makes up for it. Decompositions that
onnxruntime does not fuse at all are rewritten by ``normalize-activations``
(``passes/normalize_activations.py``) into the standard op or a spelling catalogued here.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import ops
from onnxrep.graph import GraphView

from ._common import is_op

ORT, OPENVINO = "onnxruntime", "OpenVINO"
BOTH = (ORT, OPENVINO)

SQRT2 = math.sqrt(2.0)
SQRT2_BERT = 1.4142099618911743  # the approximation some BERT exports use; onnxruntime accepts it
SQRT_2_OVER_PI = 0.7978845834732056
GELU_CUBIC = 0.044715
GELU_CUBIC_POW = 0.044714998453855515  # onnxruntime's constant in formula 2 (float32 of 0.044715)


@dataclass(frozen=True)
class Fusion:
    """One matched decomposition: its member nodes (input side first) and what runs it fused."""

    pattern: str  # e.g. "GELU (erf)"
    fused_op: str  # the fused kernel, e.g. "Gelu"
    runtimes: tuple[str, ...]
    nodes: tuple[gs.Node, ...]
    x: gs.Tensor
    protected: bool = True  # False: breaking it costs nothing (see HardSigmoid in the docstring)

    def role(self, node: gs.Node) -> str:
        if node is self.nodes[-1]:
            return "the last step"
        if node is self.nodes[0]:
            return "the first step"
        return "a step"

    def reason(self, node: gs.Node) -> str:
        who = " and ".join(self.runtimes)
        return (
            f"{node.op} '{node.name}' is {self.role(node)} of a {self.pattern} that {who} "
            f"fuse{'s' if len(self.runtimes) == 1 else ''} into one {self.fused_op} kernel; folding it breaks the fusion"
        )


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _scalar(view: GraphView, tensor: gs.Tensor | None) -> tuple[float, bool] | None:
    """``(value, onnxruntime_shape_ok)`` of a one-element float constant, else None."""
    v = view.constant(tensor)
    if v is None or np.size(v) != 1 or (v.dtype.kind != "f" and str(v.dtype) != "bfloat16"):
        return None
    return float(np.asarray(v, np.float64).reshape(-1)[0]), np.ndim(v) <= 1


def _ort_near(value: float, expected: float) -> bool:
    """onnxruntime's ``IsInitializerWithExpectedValue``: ``|v - e| <= 1e-8 + 1e-5 |e|``."""
    return abs(value - expected) <= 1e-8 + 1e-5 * abs(expected)


def _ov_near(value: float, expected: float, tol: float = float(np.finfo(np.float32).eps)) -> bool:
    """OpenVINO's ``has_constant_value`` (float32 epsilon unless the pattern gives a tolerance)."""
    return abs(value - expected) <= tol


class _Const:
    """Which runtimes accept a constant operand: ``ort`` / ``ov`` flags, combined over a pattern."""

    def __init__(self):
        self.ort, self.ov = True, True

    def check(self, view, tensor, expected, ov_tol=None, ort_values=None) -> bool:
        """Record whether ``tensor`` matches ``expected``; True when some runtime still accepts."""
        got = _scalar(view, tensor)
        if got is None:
            self.ort = self.ov = False
            return False
        value, ort_shape = got
        ort_values = ort_values if ort_values is not None else (expected,)
        self.ort = self.ort and ort_shape and any(_ort_near(value, e) for e in ort_values)
        self.ov = self.ov and _ov_near(value, expected, *(() if ov_tol is None else (ov_tol,)))
        return self.ort or self.ov

    def runtimes(self, ort_form: bool, ov_form: bool) -> tuple[str, ...]:
        return tuple(r for r, ok in ((ORT, ort_form and self.ort), (OPENVINO, ov_form and self.ov)) if ok)


def _users(view: GraphView, tensor: gs.Tensor) -> list[gs.Node]:
    return view.users(tensor)


def _next(view: GraphView, node: gs.Node, *op_types: str) -> gs.Node | None:
    """The only reader of ``node``'s output when it is one of ``op_types`` and the output is no
    graph output."""
    out = node.outputs[0]
    users = _users(view, out)
    if len(users) != 1 or view.escapes(out) or not is_op(users[0], *op_types):
        return None
    return users[0]


def _only_reader(view: GraphView, tensor: gs.Tensor, node: gs.Node) -> bool:
    return view.used_only_by(tensor, node)


def _other(view: GraphView, node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    """The operand of binary ``node`` that is not ``tensor`` (Identity looked through)."""
    if len(node.inputs) != 2:
        return None
    a, b = (view.source(t) for t in node.inputs)
    src = view.source(tensor)
    if a is src:
        return b
    if b is src:
        return a
    return None


def _producer(view: GraphView, tensor: gs.Tensor, *op_types: str) -> gs.Node | None:
    node = view.producer(tensor)
    return node if is_op(node, *op_types) else None


def _same(view: GraphView, a: gs.Tensor | None, b: gs.Tensor | None) -> bool:
    return a is not None and b is not None and view.source(a) is view.source(b)


def _mul_by(view: GraphView, node: gs.Node | None, const: _Const, expected, **kw) -> gs.Tensor | None:
    """The data operand of ``node = Mul(data, c)`` (either order) with ``c`` near ``expected``."""
    if not is_op(node, ops.MUL) or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    for data, c in ((a, b), (b, a)):
        if view.is_constant(c) and not view.is_constant(data):
            return data if const.check(view, c, expected, **kw) else None
    return None


def _add_of(view: GraphView, node: gs.Node | None, data: gs.Tensor, const: _Const, expected, **kw) -> bool:
    """``node`` is ``Add(data, c)`` (either order) with ``c`` near ``expected``."""
    if not is_op(node, ops.ADD):
        return False
    c = _other(view, node, data)
    return c is not None and view.is_constant(c) and const.check(view, c, expected, **kw)


def _clip_bounds(view: GraphView, node: gs.Node) -> tuple[float | None, float | None]:
    """A Clip's min and max (attributes before opset 11, optional inputs after)."""
    if "min" in node.attrs or "max" in node.attrs:
        return node.attrs.get("min"), node.attrs.get("max")
    bounds = []
    for i in (1, 2):
        t = node.inputs[i] if len(node.inputs) > i else None
        got = _scalar(view, t) if t is not None and t.name else None
        bounds.append(got[0] if got else None)
    return bounds[0], bounds[1]


# --------------------------------------------------------------------------------------------
# matchers, one per pattern, each anchored at one distinctive node
# --------------------------------------------------------------------------------------------


def _gelu_erf(view: GraphView, erf: gs.Node) -> list[Fusion]:
    pre = view.producer(erf.inputs[0])
    if pre is None or not _only_reader(view, pre.outputs[0], erf):
        return []
    const = _Const()
    if is_op(pre, ops.DIV) and len(pre.inputs) == 2 and view.is_constant(pre.inputs[1]):
        if not const.check(view, pre.inputs[1], SQRT2, ov_tol=0.001, ort_values=(SQRT2, SQRT2_BERT)):
            return []
        x, divided = view.source(pre.inputs[0]), True
    else:
        const.ort = False  # onnxruntime matches the Div spelling only
        x = _mul_by(view, pre, const, 1.0 / SQRT2, ov_tol=0.001)
        if x is None:
            return []
        x, divided = view.source(x), False
    out = []
    if divided:
        add = _next(view, erf, ops.ADD)
        if add is None or not _add_of(view, add, erf.outputs[0], const, 1.0):
            return []
        users = _users(view, add.outputs[0])
        if len(users) != 1 or view.escapes(add.outputs[0]) or not is_op(users[0], ops.MUL):
            return []
        mul = users[0]
        other = _other(view, mul, add.outputs[0])
        if other is None:
            return []
        if _same(view, other, x):  # 2. (x * a) * 0.5
            last = _next(view, mul, ops.MUL)
            c = _Const()
            # onnxruntime looks for pattern 1's Mul(x, 0.5) among the inputs of Mul(x, a) first and
            # gives up when x itself comes from a Mul (an SE gate before the GELU): pattern 2 is
            # fused only where x has another producer (checked in tests/test_fusions.py)
            c.ort, c.ov = const.ort and not is_op(view.producer(x), ops.MUL), const.ov
            if last is not None and _mul_by(view, last, c, 0.5) is not None:
                out.append(Fusion("GELU (erf)", ops.FUSED_GELU, c.runtimes(True, True), (pre, erf, add, mul, last), x))
        else:
            half = _producer(view, other, ops.MUL)  # 1. (x * 0.5) * a
            c = _Const()
            c.ort, c.ov = const.ort, const.ov
            if half is not None and _only_reader(view, half.outputs[0], mul) and _same(view, _mul_by(view, half, c, 0.5), x):
                out.append(Fusion("GELU (erf)", ops.FUSED_GELU, c.runtimes(True, True), (pre, erf, add, half, mul), x))
            c = _Const()  # 3. x * (a * 0.5)
            c.ov = const.ov
            if _mul_by(view, mul, c, 0.5) is not None:
                last = _next(view, mul, ops.MUL)
                if last is not None and _same(view, _other(view, last, mul.outputs[0]), x):
                    out.append(Fusion("GELU (erf)", ops.FUSED_GELU, c.runtimes(False, True), (pre, erf, add, mul, last), x))
    else:  # OpenVINO ErfFour: x * (0.5 + 0.5 * erf(x / sqrt(2)))
        half = _next(view, erf, ops.MUL)
        if half is None or _mul_by(view, half, const, 0.5) is None:
            return []
        add = _next(view, half, ops.ADD)
        if add is None or not _add_of(view, add, half.outputs[0], const, 0.5):
            return []
        last = _next(view, add, ops.MUL)
        if last is not None and _same(view, _other(view, last, add.outputs[0]), x):
            out.append(Fusion("GELU (erf)", ops.FUSED_GELU, const.runtimes(False, True), (pre, erf, half, add, last), x))
    return [f for f in out if f.runtimes]


def _tanh_inner(view: GraphView, tanh: gs.Node, const: _Const):
    """``(x, nodes, ort_form, ov_form)`` of the tanh GELU's argument, or None."""
    u = view.producer(tanh.inputs[0])
    if not is_op(u, ops.MUL) or not _only_reader(view, u.outputs[0], tanh) or len(u.inputs) != 2:
        return None
    # formula 2: Mul(Add(Mul(Pow(x, 3), c), x), sqrt(2/pi))
    add0_t = _mul_by(view, u, const, SQRT_2_OVER_PI, ov_tol=0.01)
    if add0_t is not None:
        add0 = _producer(view, add0_t, ops.ADD)
        if add0 is None or not _only_reader(view, add0.outputs[0], u):
            return None
        for cubic_t in add0.inputs:
            mul0 = _producer(view, cubic_t, ops.MUL)
            if mul0 is None or not _only_reader(view, mul0.outputs[0], add0):
                continue
            pow_t = _mul_by(view, mul0, const, GELU_CUBIC, ov_tol=0.001, ort_values=(GELU_CUBIC_POW,))
            pw = _producer(view, pow_t, ops.POW) if pow_t is not None else None
            if pw is None or not _only_reader(view, pw.outputs[0], mul0):
                continue
            x = view.source(pw.inputs[0])
            if not _same(view, _other(view, add0, cubic_t), x) or not const.check(view, pw.inputs[1], 3.0):
                continue
            return x, (pw, mul0, add0, u), True, True
        return None
    # formula 1: Mul(Add(Mul(Mul(x, c), x), 1), Mul(x, sqrt(2/pi)))
    for a_t, b_t in (u.inputs, u.inputs[::-1]):
        add1, mul4 = _producer(view, a_t, ops.ADD), _producer(view, b_t, ops.MUL)
        if add1 is None or mul4 is None or not (_only_reader(view, add1.outputs[0], u) and _only_reader(view, mul4.outputs[0], u)):
            continue
        c = _Const()
        c.ort, c.ov = const.ort, const.ov
        x = _mul_by(view, mul4, c, SQRT_2_OVER_PI, ov_tol=0.01)
        if x is None:
            continue
        x = view.source(x)
        for mul2_t in add1.inputs:
            mul2 = _producer(view, mul2_t, ops.MUL)
            if mul2 is None or not _only_reader(view, mul2.outputs[0], add1) or not _add_of(view, add1, mul2_t, c, 1.0):
                continue
            for mul1_t in mul2.inputs:
                mul1 = _producer(view, mul1_t, ops.MUL)
                if mul1 is None or not _only_reader(view, mul1.outputs[0], mul2):
                    continue
                if _same(view, _other(view, mul2, mul1_t), x) and _same(view, _mul_by(view, mul1, c, GELU_CUBIC, ov_tol=0.001), x):
                    const.ort, const.ov = c.ort, c.ov
                    return x, (mul1, mul2, add1, mul4, u), True, True
    return None


def _gelu_tanh(view: GraphView, tanh: gs.Node) -> list[Fusion]:
    const = _Const()
    inner = _tanh_inner(view, tanh, const)
    if inner is None:
        return []
    x, nodes, ort_form, ov_form = inner
    add = _next(view, tanh, ops.ADD)
    if add is None or not _add_of(view, add, tanh.outputs[0], const, 1.0):
        return []
    users = _users(view, add.outputs[0])
    if len(users) != 1 or view.escapes(add.outputs[0]) or not is_op(users[0], ops.MUL):
        return []
    mul = users[0]
    out = []
    other = _other(view, mul, add.outputs[0])
    half = _producer(view, other, ops.MUL) if other is not None else None
    c = _Const()
    c.ort, c.ov = const.ort, const.ov
    if half is not None and _only_reader(view, half.outputs[0], mul) and _same(view, _mul_by(view, half, c, 0.5), x):
        # onnxruntime leaves a FastGelu whose result is a graph output unfused
        ort_form = ort_form and not view.escapes(mul.outputs[0])
        out.append(Fusion("GELU (tanh)", ops.FUSED_FAST_GELU, c.runtimes(ort_form, ov_form), nodes + (tanh, add, half, mul), x))
    c = _Const()
    c.ov = const.ov
    if _mul_by(view, mul, c, 0.5) is not None:  # OpenVINO: x * (0.5 * (1 + tanh))
        last = _next(view, mul, ops.MUL)
        if last is not None and _same(view, _other(view, last, mul.outputs[0]), x) and len(nodes) == 4:
            out.append(Fusion("GELU (tanh)", ops.FUSED_FAST_GELU, c.runtimes(False, ov_form), nodes + (tanh, add, mul, last), x))
    return [f for f in out if f.runtimes]


def _hard(view: GraphView, add: gs.Node) -> list[Fusion]:
    """HardSwish and HardSigmoid decompositions, anchored at their ``Add(x, 3)``."""
    const = _Const()
    if not is_op(add, ops.ADD) or len(add.inputs) != 2:
        return []
    a, b = add.inputs
    x = a if view.is_constant(b) else b
    three = b if x is a else a
    if view.is_constant(x) or not const.check(view, three, 3.0):
        return []
    x = view.source(x)
    const.ort = False  # onnxruntime fuses no HardSwish / HardSigmoid decomposition
    chains = []  # (nodes up to the clamp, clamp kind)
    relu = _next(view, add, ops.RELU, ops.MAX, ops.CLIP)
    if relu is None:
        return []
    if is_op(relu, ops.CLIP):
        lo, hi = _clip_bounds(view, relu)
        if lo == 0 and hi == 6:
            chains.append(((add, relu), "clip"))
    else:
        if is_op(relu, ops.MAX) and not (_other(view, relu, add.outputs[0]) is not None and const.check(view, _other(view, relu, add.outputs[0]), 0.0)):
            return []
        mn = _next(view, relu, ops.MIN)
        if mn is not None and len(mn.inputs) == 2:
            six = _other(view, mn, relu.outputs[0])
            if six is not None and const.check(view, six, 6.0):
                chains.append(((add, relu, mn), "relu" if is_op(relu, ops.RELU) else "max"))
    out = []
    for nodes, kind in chains:
        clamp = nodes[-1]
        nxt = _next(view, clamp, ops.DIV, ops.MUL)
        if nxt is None:
            continue
        c = _Const()
        c.ov = const.ov
        scaled = (
            is_op(nxt, ops.DIV) and _same(view, nxt.inputs[0], clamp.outputs[0]) and view.is_constant(nxt.inputs[1])
            and c.check(view, nxt.inputs[1], 6.0)
        ) or (kind != "max" and is_op(nxt, ops.MUL) and _mul_by(view, nxt, c, 1.0 / 6.0, ov_tol=0.0001) is not None)
        if scaled:  # HardSigmoid: clamp(x + 3, 0, 6) / 6
            out.append(Fusion("HardSigmoid decomposition", ops.FUSED_HSIGMOID, c.runtimes(False, True), nodes + (nxt,), x, protected=False))
        elif is_op(nxt, ops.MUL) and _same(view, _other(view, nxt, clamp.outputs[0]), x) and kind != "max":
            if kind == "clip":  # HSwishFusionWithClamp: the division after it is not part of it
                out.append(Fusion("HardSwish decomposition", ops.FUSED_HSWISH, (OPENVINO,), nodes + (nxt,), x))
                continue
            last = _next(view, nxt, ops.DIV, ops.MUL)
            c = _Const()
            c.ov = const.ov
            if last is not None and (
                (is_op(last, ops.DIV) and _same(view, last.inputs[0], nxt.outputs[0]) and view.is_constant(last.inputs[1])
                 and c.check(view, last.inputs[1], 6.0))
                or (is_op(last, ops.MUL) and _mul_by(view, last, c, 1.0 / 6.0, ov_tol=0.0001) is not None)
            ):
                out.append(Fusion("HardSwish decomposition", ops.FUSED_HSWISH, c.runtimes(False, True), nodes + (nxt, last), x))
    return [f for f in out if f.runtimes]


def _hswish_of_hsigmoid(view: GraphView, hs: gs.Node) -> list[Fusion]:
    """``Mul(x, HardSigmoid(x))`` with HardSwish's alpha and beta (OpenVINO HSwishFusionWithHSigmoid)."""
    alpha, beta = float(hs.attrs.get("alpha", 0.2)), float(hs.attrs.get("beta", 0.5))
    if not (_ov_near(alpha, 1.0 / 6.0, 1e-6) and _ov_near(beta, 0.5)):
        return []
    x = view.source(hs.inputs[0])
    mul = _next(view, hs, ops.MUL)
    if mul is None or not _same(view, _other(view, mul, hs.outputs[0]), x):
        return []
    return [Fusion("HardSwish decomposition", ops.FUSED_HSWISH, (OPENVINO,), (hs, mul), x)]


def _swish_sigmoid(view: GraphView, sig: gs.Node) -> list[Fusion]:
    inp = view.source(sig.inputs[0])
    pre = view.producer(inp)
    nodes: tuple = (sig,)
    x = inp
    if is_op(pre, ops.MUL) and _only_reader(view, pre.outputs[0], sig) and len(pre.inputs) == 2:
        a, b = pre.inputs
        if view.is_constant(a) != view.is_constant(b) and _scalar(view, a if view.is_constant(a) else b) is not None:
            data = b if view.is_constant(a) else a
            mul = _next(view, sig, ops.MUL)
            if mul is not None and _same(view, _other(view, mul, sig.outputs[0]), data):
                return [Fusion("SiLU / Swish", ops.FUSED_QUICK_GELU, BOTH, (pre, sig, mul), view.source(data))]
    mul = _next(view, sig, ops.MUL)
    if mul is None or not _same(view, _other(view, mul, sig.outputs[0]), x):
        return []
    return [Fusion("SiLU / Swish", ops.FUSED_QUICK_GELU, BOTH, nodes + (mul,), x)]


def _swish_exp(view: GraphView, exp: gs.Node) -> list[Fusion]:
    """OpenVINO's ``x / (1 + exp(-x))`` and ``x / (1 + exp(-x * beta))``."""
    neg = view.producer(exp.inputs[0])
    if not is_op(neg, ops.NEG) or not _only_reader(view, neg.outputs[0], exp):
        return []
    x = view.source(neg.inputs[0])
    nodes: tuple = (neg, exp)
    pre = view.producer(x)
    beta_mul = None
    if is_op(pre, ops.MUL) and _only_reader(view, pre.outputs[0], neg) and len(pre.inputs) == 2:
        a, b = pre.inputs
        if view.is_constant(a) != view.is_constant(b):
            beta_mul, x = pre, view.source(b if view.is_constant(a) else a)
    const = _Const()
    add = _next(view, exp, ops.ADD)
    if add is None or not _add_of(view, add, exp.outputs[0], const, 1.0):
        return []
    div = _next(view, add, ops.DIV)
    if div is None or not (_same(view, div.inputs[0], x) and _same(view, div.inputs[1], add.outputs[0])):
        return []
    members = ((beta_mul,) if beta_mul is not None else ()) + nodes + (add, div)
    return [Fusion("SiLU / Swish", ops.FUSED_SWISH, const.runtimes(False, True), members, x)] if const.ov else []


def _axes(view: GraphView, node: gs.Node) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and node.inputs[1].name:
        v = view.constant(node.inputs[1])
        return None if v is None else [int(a) for a in np.asarray(v).reshape(-1)]
    return None


def _last_axis_only(view: GraphView, node: gs.Node, x: gs.Tensor) -> bool:
    axes = _axes(view, node)
    if not axes or len(axes) != 1:
        return False
    if axes[0] < 0:
        return axes[0] == -1
    rank = len(x.shape) if x.shape is not None else None
    return rank is not None and axes[0] == rank - 1


def _rank1(view: GraphView, tensor: gs.Tensor) -> int | None:
    """The length of ``tensor`` when it has rank 1 (from its constant or declared shape)."""
    v = view.constant(tensor)
    shape = np.shape(v) if v is not None else (tuple(tensor.shape) if tensor.shape is not None else None)
    return int(shape[0]) if shape is not None and len(shape) == 1 and isinstance(shape[0], (int, np.integer)) else None


def _scale_tail(view: GraphView, div: gs.Node, with_bias: bool):
    """``(mul, add)`` after a normalization's Div: ``Mul(scale)`` then ``Add(bias)``, both rank 1."""
    mul = _next(view, div, ops.MUL)
    if mul is None:
        return None
    scale = _other(view, mul, div.outputs[0])
    if scale is None or _rank1(view, scale) is None:
        return None
    if not with_bias:
        return mul, None
    add = _next(view, mul, ops.ADD)
    if add is None:
        return None
    bias = _other(view, add, mul.outputs[0])
    if bias is None or _rank1(view, bias) != _rank1(view, scale):
        return None
    return mul, add


def _layer_norm(view: GraphView, mean: gs.Node) -> list[Fusion]:
    x = view.source(mean.inputs[0])
    out_t = mean.outputs[0]
    subs = _users(view, out_t)
    if view.escapes(out_t) or len(subs) not in (1, 2) or not all(is_op(s, ops.SUB) for s in subs):
        return []
    if not all(_same(view, _other(view, s, out_t), x) for s in subs):
        return []
    if not _last_axis_only(view, mean, x):
        return []
    readers = [u for s in subs for u in _users(view, s.outputs[0])]
    if any(view.escapes(s.outputs[0]) for s in subs) or len(readers) != 2:
        return []
    pw = next((u for u in readers if is_op(u, ops.POW)), None)
    div = next((u for u in readers if is_op(u, ops.DIV)), None)
    if pw is None or div is None:
        return []
    mean2 = _next(view, pw, ops.REDUCE_MEAN)
    eps = _next(view, mean2, ops.ADD) if mean2 is not None else None
    sqrt = _next(view, eps, ops.SQRT) if eps is not None else None
    if sqrt is None or _next(view, sqrt, ops.DIV) is not div or not _same(view, div.inputs[1], sqrt.outputs[0]):
        return []
    if _axes(view, mean2) != _axes(view, mean):
        return []
    tail = _scale_tail(view, div, with_bias=True)
    if tail is None:
        return []
    nodes = (mean, *subs, pw, mean2, eps, sqrt, div, *tail)
    return [Fusion("LayerNorm", ops.FUSED_LAYER_NORM, (ORT,), nodes, x)]


def _rms_norm(view: GraphView, pw: gs.Node) -> list[Fusion]:
    x = view.source(pw.inputs[0])
    mean = _next(view, pw, ops.REDUCE_MEAN)
    if mean is None or not _last_axis_only(view, mean, x):
        return []
    eps = _next(view, mean, ops.ADD)
    sqrt = _next(view, eps, ops.SQRT) if eps is not None else None
    div = _next(view, sqrt, ops.DIV) if sqrt is not None else None
    if div is None or not _same(view, div.inputs[0], x) or not _same(view, div.inputs[1], sqrt.outputs[0]):
        return []
    tail = _scale_tail(view, div, with_bias=False)
    if tail is None:
        return []
    return [Fusion("root-mean-square norm (RMSNorm)", ops.FUSED_SIMPLIFIED_LAYER_NORM, (ORT,), (pw, mean, eps, sqrt, div, tail[0]), x)]


_ANCHORS = {
    ops.ERF: _gelu_erf,
    ops.TANH: _gelu_tanh,
    ops.ADD: _hard,
    ops.HARD_SIGMOID: _hswish_of_hsigmoid,
    ops.SIGMOID: _swish_sigmoid,
    ops.EXP: _swish_exp,
    ops.REDUCE_MEAN: _layer_norm,
    ops.POW: _rms_norm,
}


# --------------------------------------------------------------------------------------------
# public interface
# --------------------------------------------------------------------------------------------


def find_fusions(view: GraphView) -> list[Fusion]:
    """Every catalogued pattern in ``view``'s graph."""
    found: list[Fusion] = []
    for node in view.graph.nodes:
        matcher = _ANCHORS.get(node.op)
        if matcher is not None and is_op(node, node.op):
            found.extend(matcher(view, node))
    # a match inside a larger one (an RMSNorm tail of a LayerNorm) is not what the runtime fuses:
    # onnxruntime runs LayerNormFusion before SimplifiedLayerNormFusion
    sets = [{id(n) for n in f.nodes} for f in found]
    return [f for f, s in zip(found, sets) if not any(s < other for other in sets)]


_CACHE: "weakref.WeakKeyDictionary[GraphView, dict[int, Fusion]]" = weakref.WeakKeyDictionary()


def fusion_members(view: GraphView) -> dict[int, Fusion]:
    """``id(node) -> Fusion`` for every member of a catalogued pattern (a node in two patterns
    keeps the first). Computed once per view: a view is built once per matching round, and the
    graph does not change while it lives."""
    members = _CACHE.get(view)
    if members is None:
        members = {}
        for fusion in find_fusions(view):
            for node in fusion.nodes:
                members.setdefault(id(node), fusion)
        _CACHE[view] = members
    return members


def breaks_fusion(nodes, view: GraphView) -> str | None:
    """Why a rewrite that removes or replaces ``nodes`` breaks a protected pattern a runtime fuses
    (it takes some of the pattern's members but not all), or None."""
    members = fusion_members(view)
    if not members:
        return None
    taken = {id(n) for n in nodes}
    for node in nodes:
        fusion = members.get(id(node))
        if fusion is not None and fusion.protected and not all(id(m) in taken for m in fusion.nodes):
            return fusion.reason(node)
    return None
