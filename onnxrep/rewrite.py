"""The three stages every pass goes through: match -> check -> rewrite.

* ``match(view, ctx)`` finds candidates structurally and returns :class:`Match` objects; it never
  changes the graph.
* ``check(match, view, ctx)`` runs named exactness and cost conditions in order; the first that
  fails declines the candidate with a :class:`Decline` (condition name + reason).
* ``rewrite(match, view, ctx)`` computes folded weights and returns a :class:`Plan`: new nodes that
  produce an existing tensor (or a list of plans, one per existing tensor, when a rewrite ends in
  several places, as channel pruning does). Only the engine applies plans, after all matching is
  done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from .graph import GraphView


@dataclass
class Options:
    """User choices that passes consult."""

    allow_cost_increase: bool = False
    deny: frozenset = frozenset()  # candidate keys never to rewrite (set by mismatch bisection)
    tolerance: float = 0.0  # identical-filters: weights this close count as equal (0: exactly equal)


@dataclass
class Context:
    """What a pass may read besides the graph: options, inferred shapes, a name allocator."""

    options: Options
    shapes: dict[str, tuple] = field(default_factory=dict)
    dtypes: dict[str, np.dtype] = field(default_factory=dict)
    taken_names: set[str] = field(default_factory=set)
    opsets: list = field(default_factory=list)  # the model's opset imports

    def shape(self, tensor: gs.Tensor) -> tuple | None:
        """Static shape of ``tensor`` if known (ints, or strings for symbolic dims), else None.

        Only evidence counts (:mod:`onnxrep.cost`: shapes the model was run or inferred to have,
        without its declared ``value_info`` and output shapes): a constant's own values, or
        ``shapes``. graphsurgeon's ``tensor.shape`` of a variable comes from the declarations and
        is never read."""
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.shape)
        return self.shapes.get(tensor.name)

    def dtype(self, tensor: gs.Tensor) -> np.dtype | None:
        """Element type of ``tensor`` if known (inferred, else declared)."""
        if isinstance(tensor, gs.Constant):
            return np.dtype(tensor.dtype)
        dtype = self.dtypes.get(tensor.name)
        if dtype is not None:
            return np.dtype(dtype)
        return np.dtype(tensor.dtype) if tensor.dtype is not None else None

    def fresh_name(self, base: str) -> str:
        """A tensor or node name not used anywhere in the graph yet."""
        name, i = base, 0
        while name in self.taken_names:
            i += 1
            name = f"{base}_{i}"
        self.taken_names.add(name)
        return name

    def like(self, base: str, tensor: gs.Tensor) -> gs.Variable:
        """A new tensor with the dtype and shape of ``tensor`` (for a shape-preserving step), both
        as :meth:`shape` and :meth:`dtype` know them."""
        shape, dtype = self.shape(tensor), self.dtype(tensor)
        var = gs.Variable(self.fresh_name(base), dtype=dtype, shape=list(shape) if shape is not None else None)
        if shape is not None:
            self.shapes[var.name] = tuple(shape)
        if dtype is not None:
            self.dtypes[var.name] = dtype
        return var

    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.fresh_name(base), np.ascontiguousarray(values))


@dataclass
class Match:
    """A candidate found by a pass: ``key`` names it stably across rounds, ``nodes`` are the nodes
    its rewrite replaces (used to keep two rewrites of one round apart), ``data`` is pass-specific."""

    key: str
    nodes: Sequence[gs.Node]
    data: object


@dataclass(frozen=True)
class Decline:
    condition: str
    reason: str

    def __str__(self) -> str:
        return f"{self.condition}: {self.reason}"


@dataclass
class NewNode:
    """A node to create when the plan is applied (creating a graphsurgeon Node links it into its
    tensors at once, so passes describe nodes and the engine creates them)."""

    op: str
    name: str
    attrs: dict
    inputs: list[gs.Tensor]
    outputs: list[gs.Tensor]


@dataclass
class Plan:
    """New nodes, the last of which produces ``target``: an existing tensor whose name is kept.

    The nodes that used to compute ``target`` become dead once the plan is applied and are removed
    by cleanup.
    """

    target: gs.Variable
    nodes: list[NewNode]
    summary: str = ""
    constant: np.ndarray | None = None  # instead of nodes: ``target`` becomes this initializer
    details: dict | None = None  # figures for the report (e.g. channels, weights, MACs per layer)


Condition = Callable[..., "str | None"]


class Pass(Protocol):
    name: str
    summary: str

    def match(self, view: GraphView, ctx: Context) -> Iterable[Match]: ...

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None: ...

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> Plan | list[Plan]: ...


def run_checks(conditions: Sequence[tuple[str, Condition]], *args) -> Decline | None:
    """Evaluate ``(name, fn)`` conditions in order; ``fn(*args)`` returns a reason to decline or None."""
    for name, fn in conditions:
        reason = fn(*args)
        if reason:
            return Decline(name, reason)
    return None
