"""Linear chain: two linear layers in a row, nothing nonlinear between them, become one.

Pattern. ``Linear1 -> Linear2`` (Gemm, or MatMul by a constant matrix with its bias Add) where
Linear1's output is read by nothing else: the MLP of a depth-pruned transformer (GELU replaced by
identity), a projection followed by another.

Algebra. ``(x @ W1 + b1) @ W2 + b2 = x @ (W1 W2) + (b1 W2 + b2)``.

Exactness conditions (checked in this order):
  1. ``layout``      both weights and biases are constants, ``transA = 0``, biases broadcast along
                     the output features only.
  2. ``single_use``  Linear1's output is read by nothing else and is not a graph output.
  3. ``cost``        ``K * N2 <= K * N1 + N1 * N2`` multiply-accumulates per token (C -> 4C -> C
                     merges into C^2 from 8 C^2; a bottleneck C -> C/4 -> C would grow and stays).
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, Plan, run_checks

from . import _linear, register
from ._common import outside_reader_reason


@dataclass
class Candidate:
    first: _linear.Linear
    second: _linear.Linear


def _check_layout(c, view, ctx):
    return _linear.layout_reason(c.first, view, ctx) or _linear.layout_reason(c.second, view, ctx)


def _check_single_use(c, view, ctx):
    return outside_reader_reason(c.first.out, [c.second.head], view)


def _check_cost(c, view, ctx):
    if ctx.options.allow_cost_increase:
        return None
    k, n1 = _linear.dims(c.first, view)
    _, n2 = _linear.dims(c.second, view)
    if k * n2 > k * n1 + n1 * n2:
        return f"merged {k}x{n2} weight costs {k * n2} MACs per token against {k * n1 + n1 * n2}"
    return None


CONDITIONS = [("layout", _check_layout), ("single_use", _check_single_use), ("cost", _check_cost)]


@register
class LinearChain:
    name = "linear-chain"
    summary = "Gemm/MatMul -> Gemm/MatMul with nothing between -> one, when cheaper"

    def match(self, view: GraphView, ctx: Context):
        for node in view.graph.nodes:
            second = _linear.as_linear(node, view)
            if second is None or second.head is not node:
                continue
            first = _linear.producer_linear(second.x, view)
            if first is not None:
                yield Match(f"{first.head.name}->{node.name}", first.nodes + second.nodes, Candidate(first, second))

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return run_checks(CONDITIONS, match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> Plan:
        c: Candidate = match.data
        w1, b1 = _linear.params(c.first, view)
        w2, b2 = _linear.params(c.second, view)
        rank = 2 if c.first.is_gemm else _linear.rank_of(c.first.x, ctx)
        dtype = view.constant(c.first.head.inputs[1]).dtype
        target = c.second.out
        nodes = _linear.emit(ctx, c.second.head.name or "linear", c.first.head.inputs[0], w1 @ w2, b1 @ w2 + b2, dtype, target, rank)
        return Plan(target, nodes, f"{c.first.head.name} -> {c.second.head.name} -> {w1.shape[0]}x{w2.shape[1]}")
