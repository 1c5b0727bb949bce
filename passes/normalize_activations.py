"""Normalize activations: a decomposition of GELU, HardSwish or HardSigmoid that onnxruntime does
not fuse becomes the standard op where the model's opset has it, else the spelling onnxruntime fuses.

onnxruntime (CPU, level EXTENDED and up) runs a few decompositions as one kernel (see
:mod:`passes._fusions`), and the ONNX ops ``Gelu`` (opset 20), ``HardSwish`` (14) and
``HardSigmoid`` (6) as one kernel each. Spelled any other way, the function runs as four to nine
element-wise kernels, and on the CPU every one of them between two Convs costs a layout
conversion too. Spellings seen in exports and hand-written models that onnxruntime 1.32 does not
fuse: GELU with ``Mul(x, 1/sqrt(2))`` instead of ``Div(x, sqrt(2))`` or with the 0.5 applied to
``1 + erf`` (OpenVINO's forms), TorchScript's erf GELU where its input comes from a Mul
(onnxruntime takes that Mul for its pattern 1's and gives up: FastViT's GELU after the SE gate),
TorchScript's tanh GELU (``x*x*x``, the 0.5 applied last), and
every HardSwish / HardSigmoid decomposition (``x * relu6(x + 3) / 6`` and its variants; onnxruntime
fuses none). torch's dynamo exporter writes ``nn.GELU`` at its default opset 20 as the ``Gelu`` op
itself, both approximations, which onnxruntime runs as one kernel (bit for bit its fused Gelu's
result): nothing to do there; below opset 20 (``opset_version=18``, the default of earlier torch
releases) it writes ``x * (0.5 * (1 + erf(x / sqrt2)))`` and ``x * (0.5 * (1 + tanh(...)))``,
neither of which onnxruntime fuses. What each decomposition becomes:

==================  ==================================  ==========================================
function            at the model's default opset >= N    below it (the spelling onnxruntime fuses)
==================  ==================================  ==========================================
GELU (erf)          ``Gelu`` (20)                        ``Mul(Mul(x, 0.5), Add(Erf(Div(x, sqrt2)), 1))``
                                                         (onnxruntime's ``gelu_fusion.cc``, pattern 1,
                                                         which it fuses whatever computes ``x``)
GELU (tanh)         ``Gelu(approximate="tanh")`` (20)    ``Mul(Add(Tanh(Mul(Add(Mul(Mul(x, c), x), 1),
                                                         Mul(x, k))), 1), Mul(x, 0.5))``
                                                         (``fast_gelu_fusion.cc``, formula 1)
HardSwish           ``HardSwish`` (14)                   ``Mul(x, HardSigmoid(x, 1/6, 0.5))`` (two
                                                         kernels; OpenVINO fuses it into HSwish)
HardSigmoid         ``HardSigmoid(alpha=1/6, beta=0.5)`` (6)
==================  ==================================  ==========================================

Exactness. Each rewrite computes the same function in exact arithmetic: ``x * (1 + erf(x / sqrt2))
/ 2`` whatever the grouping of its product of ``x``, ``1 + erf`` and ``0.5`` (a product of
constants and terms reordered), and whether ``x / sqrt2`` is spelled as a division or as a product
with ``1/sqrt2``; ``k (x + c x**3)`` with ``x**3`` as ``Pow(x, 3)`` or ``x*x*x``, or as ``k x (1 + c x**2)``; ``clip(x + 3, 0, 6) / 6 = clip(x/6 + 1/2,
0, 1)`` (HardSigmoid with alpha 1/6, beta 1/2; HardSwish is ``x`` times that). The constants a
spelling is matched with are the float rounding of the exact ones (within one unit in the last
place of their own type), and the new constants and attributes are the exact values rounded to
the model's type; so the result differs from the input by float rounding only (verification in
onnxruntime bounds it).

Conditions (checked in this order):
  1. ``dtype``           ``x`` is float32 (onnxruntime's CPU kernels of the standard ops and its
                         fusions are float32; other types are left as exported).
  2. ``constants``       every constant of the spelling is one element (of rank 0, or at most the
                         rank of ``x``: it does not broadcast ``x`` to a larger shape) with the
                         exact value within its own float rounding (0.5, 1, 3, 6, 1/6, sqrt(2),
                         1/sqrt(2), sqrt(2/pi), 0.044715).
  3. ``single_use``      every intermediate result is read once, by the next step.
  4. ``graph_output``    no intermediate result is a graph output (or read by a subgraph).
  5. ``fused_already``   onnxruntime does not fuse this spelling already (TorchScript's erf GELU
                         on most inputs, onnxruntime's own FastGelu formulas: left as they are,
                         they already run as one kernel), nor is it the spelling this pass writes.
  6. ``opset``           the model's default opset has HardSigmoid (6) for a HardSwish or
                         HardSigmoid (opset 6 and up: always, in practice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import ops
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, NewNode, Plan, run_checks

from . import register
from ._common import is_op
from ._fusions import ORT, fusion_members

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715
GELU_OPSET, HARD_SWISH_OPSET, HARD_SIGMOID_OPSET = 20, 14, 6

GELU_ERF, GELU_TANH, HARD_SWISH, HARD_SIGMOID = "GELU (erf)", "GELU (tanh)", "HardSwish", "HardSigmoid"


@dataclass
class Spelling:
    """A matched decomposition: the function, its input ``x``, its nodes (the last computes the
    result), the constants to check as ``(tensor, exact value)``, and its intermediate results."""

    function: str
    x: gs.Tensor
    nodes: tuple[gs.Node, ...]
    constants: list[tuple[gs.Tensor, float]] = field(default_factory=list)
    #: the spelling is already the one this pass writes below the standard op's opset
    target_spelling: bool = False

    @property
    def output(self) -> gs.Tensor:
        return self.nodes[-1].outputs[0]

    @property
    def intermediates(self) -> list[gs.Tensor]:
        return [n.outputs[0] for n in self.nodes[:-1]]


# --------------------------------------------------------------------------------------------
# matching (structure only: the constants' values are the constants condition's)
# --------------------------------------------------------------------------------------------


def _same(view: GraphView, a: gs.Tensor | None, b: gs.Tensor | None) -> bool:
    return a is not None and b is not None and view.source(a) is view.source(b)


def _user(view: GraphView, tensor: gs.Tensor, *op_types: str) -> gs.Node | None:
    """The first reader of ``tensor`` that is one of ``op_types`` (single use is a condition)."""
    return next((u for u in view.users(tensor) if is_op(u, *op_types) and len(u.inputs) >= 1), None)


def _split(view: GraphView, node: gs.Node | None, op: str) -> tuple[gs.Tensor, gs.Tensor] | None:
    """``(data, constant)`` of a binary ``node`` of type ``op`` with one constant operand (either
    order; Div: the constant second only)."""
    if not is_op(node, op) or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if view.is_constant(b) and not view.is_constant(a):
        return view.source(a), b
    if op != ops.DIV and view.is_constant(a) and not view.is_constant(b):
        return view.source(b), a
    return None


def _other(view: GraphView, node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    """The operand of binary ``node`` that is not ``tensor``."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if _same(view, a, tensor):
        return view.source(b)
    if _same(view, b, tensor):
        return view.source(a)
    return None


def _product_tail(view: GraphView, t: gs.Tensor, x: gs.Tensor, nodes: list) -> tuple[list, list, str] | None:
    """The product of ``t`` (``1 + erf`` or ``1 + tanh``), ``x`` and 0.5 in any grouping, starting
    from ``t``: ``(nodes, [(half, 0.5)], grouping)`` with the last node computing the product and
    ``grouping`` one of ``(x*t)*h``, ``x*(t*h)``, ``(x*h)*t``; or None."""
    mul = _user(view, t, ops.MUL)
    if mul is None:
        return None
    other = _other(view, mul, t)
    if other is None:
        return None
    if _same(view, other, x):  # (x * t) * 0.5
        last = _user(view, mul.outputs[0], ops.MUL)
        split = _split(view, last, ops.MUL)
        if split is None or not _same(view, split[0], mul.outputs[0]):
            return None
        return nodes + [mul, last], [(split[1], 0.5)], "(x*t)*h"
    if view.is_constant(other):  # x * (t * 0.5)
        last = _user(view, mul.outputs[0], ops.MUL)
        if last is None or not _same(view, _other(view, last, mul.outputs[0]), x):
            return None
        return nodes + [mul, last], [(other, 0.5)], "x*(t*h)"
    half = view.producer(other)  # (x * 0.5) * t
    split = _split(view, half, ops.MUL)
    if split is None or not _same(view, split[0], x):
        return None
    return nodes + [half, mul], [(split[1], 0.5)], "(x*h)*t"


def _gelu_erf(view: GraphView, erf: gs.Node) -> Spelling | None:
    pre = view.producer(erf.inputs[0])
    div, mul = _split(view, pre, ops.DIV), _split(view, pre, ops.MUL)
    if div is None and mul is None:
        return None
    x, c = div or mul
    constants = [(c, SQRT2 if div else 1.0 / SQRT2)]
    e = erf.outputs[0]
    add = _user(view, e, ops.ADD)
    split = _split(view, add, ops.ADD)
    if split is not None and _same(view, split[0], e):  # x * (1 + erf) * 0.5, any grouping
        tail = _product_tail(view, add.outputs[0], x, [pre, erf, add])
        if tail is None:
            return None
        nodes, halves, grouping = tail
        ort_pattern_1 = div is not None and grouping == "(x*h)*t"
        return Spelling(GELU_ERF, x, tuple(nodes), constants + [(split[1], 1.0)] + halves, ort_pattern_1)
    half = _user(view, e, ops.MUL)  # x * (0.5 + 0.5 * erf)
    split = _split(view, half, ops.MUL)
    if split is None or not _same(view, split[0], e):
        return None
    add = _user(view, half.outputs[0], ops.ADD)
    add_split = _split(view, add, ops.ADD)
    if add_split is None or not _same(view, add_split[0], half.outputs[0]):
        return None
    last = _user(view, add.outputs[0], ops.MUL)
    if last is None or not _same(view, _other(view, last, add.outputs[0]), x):
        return None
    return Spelling(GELU_ERF, x, (pre, erf, half, add, last), constants + [(split[1], 0.5), (add_split[1], 0.5)])


def _cube(view: GraphView, t: gs.Tensor) -> tuple[gs.Tensor, list, list] | None:
    """``(x, nodes, constants)`` when ``t`` is ``x**3``: ``Pow(x, 3)`` or ``x*x*x`` in either
    grouping."""
    node = view.producer(t)
    if is_op(node, ops.POW) and len(node.inputs) == 2 and view.is_constant(node.inputs[1]):
        return view.source(node.inputs[0]), [node], [(node.inputs[1], 3.0)]
    if not is_op(node, ops.MUL) or len(node.inputs) != 2:
        return None
    a, b = (view.source(i) for i in node.inputs)
    for sq_t, x in ((a, b), (b, a)):
        sq = view.producer(sq_t)
        if is_op(sq, ops.MUL) and len(sq.inputs) == 2 and all(_same(view, i, x) for i in sq.inputs):
            return x, [sq, node], []
    return None


def _gelu_tanh(view: GraphView, tanh: gs.Node) -> Spelling | None:
    """``0.5 * x * (1 + tanh(k * (x + c * x**3)))``, the product in any grouping."""
    u = view.producer(tanh.inputs[0])
    split = _split(view, u, ops.MUL)
    if split is None:
        return None
    inner, k = split
    add0 = view.producer(inner)
    if not is_op(add0, ops.ADD) or len(add0.inputs) != 2:
        return None
    for cubic_t in add0.inputs:
        m0 = _split(view, view.producer(cubic_t), ops.MUL)
        if m0 is None:
            continue
        cube = _cube(view, m0[0])
        if cube is None:
            continue
        x, cube_nodes, cube_consts = cube
        if not _same(view, _other(view, add0, cubic_t), x):
            continue
        nodes = cube_nodes + [view.producer(cubic_t), add0, u, tanh]
        t = tanh.outputs[0]
        add = _user(view, t, ops.ADD)
        one = _split(view, add, ops.ADD)
        if one is None or not _same(view, one[0], t):
            return None
        tail = _product_tail(view, add.outputs[0], x, nodes + [add])
        if tail is None:
            return None
        tail_nodes, halves, _ = tail
        constants = cube_consts + [(m0[1], GELU_CUBIC), (k, SQRT_2_OVER_PI), (one[1], 1.0)] + halves
        return Spelling(GELU_TANH, x, tuple(tail_nodes), constants)
    return None


def _clip_bounds(view: GraphView, node: gs.Node) -> list[tuple[gs.Tensor, float]] | None:
    """The constants of ``Clip(t, 0, 6)`` (bounds as inputs, opset 11 and up), or None."""
    if len(node.inputs) != 3 or not all(i.name and view.is_constant(i) for i in node.inputs[1:]):
        return None
    return [(node.inputs[1], 0.0), (node.inputs[2], 6.0)]


def _hard(view: GraphView, add: gs.Node) -> Spelling | None:
    """HardSigmoid ``clamp(x + 3, 0, 6) / 6`` and HardSwish ``x * clamp(x + 3, 0, 6) / 6``, the
    clamp as ``Clip``, ``Min(Relu, 6)`` or ``Min(Max(0), 6)``, the division as ``Div(6)`` or
    ``Mul(1/6)``, HardSwish's product in either grouping."""
    split = _split(view, add, ops.ADD)
    if split is None:
        return None
    x, three = split
    constants = [(three, 3.0)]
    a = add.outputs[0]
    low = _user(view, a, ops.CLIP, ops.RELU, ops.MAX)
    if low is None:
        return None
    if is_op(low, ops.CLIP):
        bounds = _clip_bounds(view, low)
        if bounds is None:
            return None
        nodes, clamp = [add, low], low
        constants += bounds
    else:
        if is_op(low, ops.MAX):
            zero = _split(view, low, ops.MAX)
            if zero is None:
                return None
            constants.append((zero[1], 0.0))
        six = _split(view, _user(view, low.outputs[0], ops.MIN), ops.MIN)
        if six is None:
            return None
        clamp = _user(view, low.outputs[0], ops.MIN)
        nodes = [add, low, clamp]
        constants.append((six[1], 6.0))
    c = clamp.outputs[0]
    nxt = _user(view, c, ops.DIV, ops.MUL)
    if nxt is None:
        return None
    scale = _split(view, nxt, nxt.op)
    if scale is not None and _same(view, scale[0], c):  # clamp / 6, then maybe x * that
        scaled = constants + [(scale[1], 6.0 if nxt.op == ops.DIV else 1.0 / 6.0)]
        last = _user(view, nxt.outputs[0], ops.MUL)
        if last is not None and _same(view, _other(view, last, nxt.outputs[0]), x):
            return Spelling(HARD_SWISH, x, tuple(nodes + [nxt, last]), scaled)
        return Spelling(HARD_SIGMOID, x, tuple(nodes + [nxt]), scaled)
    if is_op(nxt, ops.MUL) and _same(view, _other(view, nxt, c), x):  # (x * clamp) / 6
        last = _user(view, nxt.outputs[0], ops.DIV, ops.MUL)
        scale = _split(view, last, last.op) if last is not None else None
        if scale is None or not _same(view, scale[0], nxt.outputs[0]):
            return None
        value = 6.0 if last.op == ops.DIV else 1.0 / 6.0
        return Spelling(HARD_SWISH, x, tuple(nodes + [nxt, last]), constants + [(scale[1], value)])
    return None


_ANCHORS = {ops.ERF: _gelu_erf, ops.TANH: _gelu_tanh, ops.ADD: _hard}


# --------------------------------------------------------------------------------------------
# conditions
# --------------------------------------------------------------------------------------------


def default_opset(ctx: Context) -> int | None:
    """The model's default-domain opset version."""
    for o in ctx.opsets:
        if (o.domain or "") in ops.DEFAULT_DOMAINS:
            return int(o.version)
    return None


def _check_dtype(s: Spelling, view: GraphView, ctx: Context) -> str | None:
    dtype = ctx.dtype(s.x)
    if dtype != np.dtype(np.float32):
        return f"'{s.x.name}' is {dtype if dtype is not None else 'of unknown type'}, not float32"
    return None


def exact(value: np.ndarray, expected: float) -> bool:
    """``value`` (one float element) is ``expected`` within one unit in the last place of its type."""
    v = np.asarray(value).reshape(-1)[0]
    if np.asarray(value).dtype.kind != "f":
        return False
    e = np.asarray(expected, dtype=np.asarray(value).dtype)
    return abs(float(v) - expected) <= float(np.spacing(np.abs(e)))


def _check_constants(s: Spelling, view: GraphView, ctx: Context) -> str | None:
    shape = ctx.shape(s.x)
    rank = len(shape) if shape is not None else None
    for tensor, expected in s.constants:
        value = view.constant(tensor)
        if value is None or np.size(value) != 1:
            return f"'{tensor.name}' is not a one-element constant"
        if np.ndim(value) > 0 and (rank is None or np.ndim(value) > rank):
            return f"'{tensor.name}' has rank {np.ndim(value)}, which may broadcast '{s.x.name}' (rank {rank}) to a larger shape"
        if not exact(value, expected):
            got = float(np.asarray(value, np.float64).reshape(-1)[0])
            return f"'{tensor.name}' is {got!r}, not {expected!r} within its float rounding"
    return None


def _check_single_use(s: Spelling, view: GraphView, ctx: Context) -> str | None:
    for t in s.intermediates:
        users = view.users(t)
        if len(users) != 1:
            return f"'{t.name}' is read by {len(users)} nodes"
    return None


def _check_graph_output(s: Spelling, view: GraphView, ctx: Context) -> str | None:
    for t in s.intermediates:
        if view.escapes(t):
            return f"'{t.name}' is a graph output"
    return None


def _check_fused_already(s: Spelling, view: GraphView, ctx: Context) -> str | None:
    f = fusion_members(view).get(id(s.nodes[-1]))
    if f is not None and ORT in f.runtimes and {id(n) for n in f.nodes} == {id(n) for n in s.nodes}:
        return f"onnxruntime already fuses this {s.function} spelling into one {f.fused_op} kernel"
    if s.target_spelling and (default_opset(ctx) or 0) < GELU_OPSET:
        return f"this {s.function} spelling is already the one onnxruntime fuses"
    return None


def _check_opset(s: Spelling, view: GraphView, ctx: Context) -> str | None:
    if s.function in (HARD_SWISH, HARD_SIGMOID):
        opset = default_opset(ctx)
        if opset is None or opset < HARD_SIGMOID_OPSET:
            return f"the model's default opset {opset} has no HardSigmoid (opset {HARD_SIGMOID_OPSET})"
    return None


CONDITIONS = [
    ("dtype", _check_dtype),
    ("constants", _check_constants),
    ("single_use", _check_single_use),
    ("graph_output", _check_graph_output),
    ("fused_already", _check_fused_already),
    ("opset", _check_opset),
]


# --------------------------------------------------------------------------------------------
# the rewrites
# --------------------------------------------------------------------------------------------


class _Writer:
    """New nodes of one plan, each output a fresh tensor like ``x`` but the last (the target). A
    constant the spelling already has (checked to be the exact value's float rounding) is read
    again rather than copied: a new spelling adds no weights where the old one had its values."""

    def __init__(self, s: Spelling, ctx: Context):
        self.s, self.ctx, self.nodes = s, ctx, []
        self.base = s.output.name
        self.known = {expected: tensor for tensor, expected in reversed(s.constants)}

    def const(self, value: float) -> gs.Tensor:
        if value in self.known:
            return self.known[value]
        self.known[value] = self.ctx.constant(f"{self.base}_c", np.array(value, dtype=np.float32))
        return self.known[value]

    def node(self, op: str, inputs: list, last: bool = False, **attrs) -> gs.Tensor:
        out = self.s.output if last else self.ctx.like(f"{self.base}_{op.lower()}", self.s.x)
        self.nodes.append(NewNode(op, self.ctx.fresh_name(f"{self.base}/{op}"), attrs, inputs, [out]))
        return out


def _plan(s: Spelling, ctx: Context) -> Plan:
    w = _Writer(s, ctx)
    x = s.x
    opset = default_opset(ctx) or 0
    if s.function == GELU_ERF and opset >= GELU_OPSET:
        w.node(ops.GELU, [x], last=True)
        summary = "GELU (erf) -> Gelu"
    elif s.function == GELU_TANH and opset >= GELU_OPSET:
        w.node(ops.GELU, [x], last=True, approximate="tanh")
        summary = "GELU (tanh) -> Gelu(approximate=tanh)"
    elif s.function == GELU_ERF:  # onnxruntime's pattern 1, fused whatever computes x
        e = w.node(ops.ERF, [w.node(ops.DIV, [x, w.const(SQRT2)])])
        a = w.node(ops.ADD, [e, w.const(1.0)])
        w.node(ops.MUL, [w.node(ops.MUL, [x, w.const(0.5)]), a], last=True)
        summary = "GELU (erf) -> the spelling onnxruntime fuses into Gelu"
    elif s.function == GELU_TANH:  # onnxruntime's FastGelu formula 1: k x (1 + c x^2)
        square = w.node(ops.MUL, [w.node(ops.MUL, [x, w.const(GELU_CUBIC)]), x])
        u = w.node(ops.MUL, [w.node(ops.ADD, [square, w.const(1.0)]), w.node(ops.MUL, [x, w.const(SQRT_2_OVER_PI)])])
        a = w.node(ops.ADD, [w.node(ops.TANH, [u]), w.const(1.0)])
        w.node(ops.MUL, [a, w.node(ops.MUL, [x, w.const(0.5)])], last=True)
        summary = "GELU (tanh) -> the spelling onnxruntime fuses into FastGelu"
    elif s.function == HARD_SWISH and opset >= HARD_SWISH_OPSET:
        w.node(ops.HARD_SWISH, [x], last=True)
        summary = "HardSwish decomposition -> HardSwish"
    elif s.function == HARD_SWISH:
        hs = w.node(ops.HARD_SIGMOID, [x], alpha=1.0 / 6.0, beta=0.5)
        w.node(ops.MUL, [x, hs], last=True)
        summary = "HardSwish decomposition -> Mul(x, HardSigmoid(x))"
    else:
        w.node(ops.HARD_SIGMOID, [x], last=True, alpha=1.0 / 6.0, beta=0.5)
        summary = "HardSigmoid decomposition -> HardSigmoid"
    return Plan(s.output, w.nodes, summary, details={"function": s.function, "nodes_before": len(s.nodes), "nodes_after": len(w.nodes)})


@register
class NormalizeActivations:
    name = "normalize-activations"
    summary = "GELU / HardSwish / HardSigmoid decompositions onnxruntime does not fuse -> the standard op (or its fused spelling)"

    def match(self, view: GraphView, ctx: Context):
        for node in view.graph.nodes:
            matcher = _ANCHORS.get(node.op)
            if matcher is None or not is_op(node, node.op):
                continue
            s = matcher(view, node)
            if s is not None:
                yield Match(s.output.name, list(s.nodes), s)

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return run_checks(CONDITIONS, match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> Plan:
        return _plan(match.data, ctx)
