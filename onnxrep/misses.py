"""What the passes left standing, and why: no candidate is missed silently.

After a run, :func:`find` scans the output graph for the structures the folding passes are about
and that are still there:

* ``sum``: the root of every Add/Sub tree of two or more non-constant summands, and every variadic
  ``Sum`` / ``Mean`` of two or more;
* ``affine``: every Conv, Gemm or MatMul by a constant matrix followed or preceded by an affine op
  (BatchNormalization, Mul / Div / Add / Sub by a constant) or by a Mul / Div by a computed tensor
  (``not_constant``; not ``x * f(x)`` with ``f`` element-wise: that is an activation such as SiLU
  or GELU); an Add or Sub of two computed operands is a sum, listed as such, and a MatMul
  of two computed operands (attention scores) is no linear layer;
* ``chain``: every Conv -> Conv with one of them 1x1 (nothing but Identity between them; a
  nonlinearity between two convs makes no chain).

Each one gets the condition that stopped it: the decline a pass recorded for a candidate covering
it in the run's last round (``report.passes[i].skipped``, keys as the passes build them), or,
where no pass formed a candidate, a named reason of its own:

* ``different_inputs``  the branches of a sum read different tensors (each named, with the node
                        that computes it);
* ``not_constant``      the affine op's other operand is computed, not a constant;
* ``single_use``        the tensor between the layer and the affine op has other readers;
* ``runtime_fusion``    the structure is part of a decomposition that onnxruntime or OpenVINO fuse
                        into one kernel (GELU, LayerNorm, ...: :mod:`passes._fusions`);
* ``not_selected``      the pass that folds the structure did not run (``--passes`` / ``--skip``);
* ``no_pass_matched``   none of the above: the structure is described.

Only the main graph is scanned (If / Loop / Scan bodies are not).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from . import ops
from .graph import GraphView, import_model
from .passes import _linear, _sums, parallel_merge
from .passes._common import affine_data_input, is_op
from .passes._fusions import breaks_fusion

SUM, AFFINE, CHAIN = "sum", "affine", "chain"

DIFFERENT_INPUTS = "different_inputs"
NOT_CONSTANT = "not_constant"
SINGLE_USE = "single_use"
NOT_SELECTED = "not_selected"
RUNTIME_FUSION = "runtime_fusion"
NO_PASS_MATCHED = "no_pass_matched"

#: The passes that fold each kind of structure, whose declines explain it.
SUM_PASSES = ("parallel-merge", "linear-merge", "normalize-sums")
AFFINE_PASSES = ("affine-fold", "linear-affine", "token-bn")
CHAIN_PASSES = ("conv-chain",)
_PASSES = {SUM: SUM_PASSES, AFFINE: AFFINE_PASSES, CHAIN: CHAIN_PASSES}


#: Element-wise ops through which the second operand of ``x * f(x)`` is still a function of ``x``
#: alone, element by element: such a Mul is an activation, not a scaling.
_ELEMENTWISE = tuple(ops.UNARY_ACTIVATIONS | ops.AFFINE_BINARY_OPS | {ops.POW, ops.SQRT, ops.EXP, ops.RELU})


@dataclass(frozen=True)
class Miss:
    """A structure that was not rewritten: its kind, the candidate key the passes would give it,
    the nodes it is made of, and the condition with its reason."""

    kind: str
    key: str
    nodes: tuple[str, ...]
    condition: str
    reason: str
    pass_name: str | None = None  # the pass whose decline this is (None: classified here)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "candidate": self.key,
            "nodes": list(self.nodes),
            "condition": self.condition,
            "reason": self.reason,
            "pass": self.pass_name,
        }

    def __str__(self) -> str:
        by = f" ({self.pass_name})" if self.pass_name else ""
        return f"{self.kind} {self.key}: {self.condition}: {self.reason}{by}"


def _declines(report) -> tuple[dict[str, dict[str, str]], set[str]]:
    """(pass name -> {candidate key -> "condition: reason"}, names of the passes that ran) from an
    engine Report or its ``to_dict()``."""
    declines: dict[str, dict[str, str]] = {}
    ran: set[str] = set()
    if report is None:
        return declines, ran
    passes = report["passes"] if isinstance(report, dict) else report.passes
    for p in passes:
        if isinstance(p, dict):
            name, skipped = p["name"], {s["candidate"]: s["reason"] for s in p.get("skips", [])}
        else:
            name, skipped = p.name, dict(p.skipped)
        ran.add(name)
        declines.setdefault(name, {}).update(skipped)
    return declines, ran



def _affine_reason(first: gs.Node, second: gs.Node, affine: gs.Node, side: str, between: gs.Tensor, computed, view):
    """(condition, reason) for an affine node ``affine`` next to a linear layer, ``first -> second``
    through ``between``, that no pass folded: it applies a computed tensor, ``between`` has other
    readers, or nothing matched."""
    layer = second if affine is first else first
    if computed is not None:
        return NOT_CONSTANT, (
            f"{affine.op} '{affine.name}' {side} {layer.op} '{layer.name}' applies "
            f"{_describe(computed, view)}, which is not a constant"
        )
    readers = view.users(between)
    if len(readers) > 1 or view.escapes(between):
        return SINGLE_USE, _outside(between, second, readers, view)
    return NO_PASS_MATCHED, f"no pass matched: {first.op} '{first.name}' -> {second.op} '{second.name}'"

def _describe(tensor: gs.Tensor, view: GraphView) -> str:
    node = view.producer(tensor)
    if node is None:
        where = "a constant" if view.is_constant(tensor) else "a graph input"
        return f"{tensor.name} ({where})"
    return f"{tensor.name} ({node.op} '{node.name}')"


def _branch(leaf) -> str:
    """A leaf of a sum as ``Conv 'c1'`` / ``BatchNormalization 'bn'`` / ``identity``."""
    last = leaf.affines[-1] if leaf.affines else leaf.base
    return "identity" if last is None else f"{last.op} '{last.name}'"


class _Finder:
    def __init__(self, model: onnx.ModelProto, report):
        self.graph = import_model(model)
        self.view = GraphView(self.graph, {i.name for i in model.graph.input})
        self.declines, self.ran = _declines(report)
        self.misses: list[Miss] = []
        self.seen: set[tuple[str, str]] = set()

    # -- recording ---------------------------------------------------------------------------

    def lookup(self, kind: str, keys, prefix: str | None = None) -> tuple[str, str, str, str] | None:
        """The first recorded decline of one of ``keys`` (or of a key starting with ``prefix``) by a
        pass of ``kind``: (pass, condition, reason, the declined candidate's key)."""
        for name in _PASSES[kind]:
            skipped = self.declines.get(name, {})
            for key in keys:
                if key in skipped:
                    cond, _, reason = skipped[key].partition(": ")
                    return name, cond, reason, key
            if prefix is not None:
                for key, text in skipped.items():
                    if key.startswith(prefix):
                        cond, _, reason = text.partition(": ")
                        return name, cond, reason, key
        return None

    def add(self, kind: str, key: str, nodes, found, condition: str, reason: str, folders=None) -> None:
        """Record a miss; ``folders``: the passes that would fold it (default: those of ``kind``),
        for ``not_selected``."""
        if found is not None:
            key = found[3]
        if (kind, key) in self.seen:
            return
        self.seen.add((kind, key))
        names = tuple(n.name for n in nodes)
        if found is not None:
            self.misses.append(Miss(kind, key, names, found[1], found[2], found[0]))
            return
        fusion = breaks_fusion(nodes, self.view)
        if fusion:  # part of a decomposition runtimes fuse into one kernel: that is what keeps it
            condition, reason = RUNTIME_FUSION, fusion
        folders = folders or _PASSES[kind]
        if self.report_given() and not any(p in self.ran for p in folders):
            condition = NOT_SELECTED
            reason = f"{' / '.join(folders)} did not run"
        self.misses.append(Miss(kind, key, names, condition, reason))

    def report_given(self) -> bool:
        return bool(self.ran)

    # -- sums --------------------------------------------------------------------------------

    def sums(self) -> None:
        view = self.view
        for node in list(self.graph.nodes):
            if is_op(node, ops.SUM, ops.MEAN):
                terms = [view.source(t) for t in node.inputs if t is not None and t.name]
                if sum(1 for t in terms if not view.is_constant(t)) < 2:
                    continue
                key = node.outputs[0].name
                found = self.lookup(SUM, [key])
                what = f"a variadic {node.op} of {len(terms)}: {', '.join(_describe(t, view) for t in terms)}"
                self.add(SUM, key, [node], found, NO_PASS_MATCHED, f"no pass matched: {what}", ("normalize-sums",))
                continue
            if not _sums._is_sum(node, view) or not _sums.is_root(node, view):
                continue
            tree, terms = _sums.sum_tree(node, view)
            leaves = [parallel_merge.decompose_leaf(t, s, view) for t, s in terms if not view.is_constant(t)]
            if len(leaves) < 2:
                continue
            out = node.outputs[0].name
            key = f"{out}<-"
            found = self.lookup(SUM, [], prefix=key)
            nodes = tree + [n for leaf in leaves for n in leaf.nodes()]
            reads: dict[int, list] = {}
            for leaf in leaves:
                reads.setdefault(id(leaf.x), []).append(leaf)
            if len(reads) == len(leaves):
                xs = ", ".join(_describe(leaf.x, view) for leaf in leaves)
                self.add(SUM, out, nodes, found, DIFFERENT_INPUTS, f"branches read different tensors: {xs}")
                continue
            shared = max(reads.values(), key=len)
            x = shared[0].x
            branches = ", ".join(_branch(leaf) for leaf in shared)
            what = f"a sum of {len(leaves)} terms, {len(shared)} of them on '{x.name}' ({branches})"
            self.add(SUM, key + x.name, nodes, found, NO_PASS_MATCHED, f"no pass matched: {what}")

    # -- affine ops next to linear layers ------------------------------------------------------

    def _layer(self, node: gs.Node) -> tuple[gs.Tensor, gs.Tensor] | None:
        """(input, output) of a Conv, Gemm or MatMul by a constant matrix (with its bias Add), or
        None. A MatMul of two computed operands is no layer (attention scores): not listed."""
        if is_op(node, ops.CONV) and len(node.inputs) >= 2:
            return self.view.source(node.inputs[0]), node.outputs[0]
        lin = _linear.as_linear(node, self.view)
        if lin is None:
            return None
        return lin.x, lin.out

    def _computed_operand(self, node: gs.Node, data: gs.Tensor) -> gs.Tensor | None:
        """The other operand of a Mul / Div of ``data`` when it is computed, not a constant (the
        op then scales by a tensor: no affine map); None otherwise."""
        view = self.view
        if not (is_op(node, ops.MUL, ops.DIV) and len(node.inputs) == 2):
            return None
        a, b = (view.source(t) for t in node.inputs)
        if view.is_constant(a) or view.is_constant(b) or a is b:
            return None
        if node.op == ops.DIV and b is data:
            return None  # y / x is no affine map of x
        other = b if a is data else a
        if self._elementwise_of(other, data, 16):
            return None  # x * f(x): a gated activation (SiLU, GELU, HardSwish, Mish), no scaling
        return other

    def _elementwise_of(self, tensor: gs.Tensor, data: gs.Tensor, depth: int) -> bool:
        """True when ``tensor`` is computed from ``data`` by element-wise ops alone (activations,
        arithmetic with constants or with other such tensors)."""
        view = self.view
        if tensor is data:
            return True
        node = view.producer(tensor)
        if depth <= 0 or node is None or not is_op(node, *_ELEMENTWISE):
            return False
        computed = [view.source(t) for t in node.inputs if t is not None and t.name and not view.is_constant(t)]
        return bool(computed) and all(self._elementwise_of(t, data, depth - 1) for t in computed)

    def _is_affine_of(self, node: gs.Node, data: gs.Tensor | None) -> bool:
        """True when ``node`` is an affine op (BN, Mul/Div/Add/Sub by a constant) of ``data`` (of
        any tensor when None)."""
        got = affine_data_input(node, self.view)
        return got is not None and (data is None or self.view.source(got) is data)

    def affines(self) -> None:
        view = self.view
        for node in list(self.graph.nodes):
            layer = self._layer(node)
            if layer is None:
                continue
            x, out = layer
            users = view.users(out)
            for user in users:
                computed = self._computed_operand(user, out)
                if computed is None and not self._is_affine_of(user, out):
                    continue
                key = f"{node.name}->{user.name}"
                cond, reason = _affine_reason(node, user, user, "after", out, computed, view)
                self.add(AFFINE, key, [node, user], self.lookup(AFFINE, [key]), cond, reason, _folders(node))
            prev = view.producer(x)
            if prev is None:
                continue
            data = affine_data_input(prev, view)
            computed = None
            if data is None:
                a = view.source(prev.inputs[0]) if prev.inputs else None
                computed = self._computed_operand(prev, a) if a is not None else None
                if computed is None:
                    continue
            key = f"{prev.name}->{node.name}"
            cond, reason = _affine_reason(prev, node, prev, "before", x, computed, view)
            self.add(AFFINE, key, [prev, node], self.lookup(AFFINE, [key]), cond, reason, _folders(node))

    # -- conv chains ---------------------------------------------------------------------------

    def chains(self) -> None:
        view = self.view
        for node2 in list(self.graph.nodes):
            if not (is_op(node2, ops.CONV) and len(node2.inputs) >= 2):
                continue
            y = view.source(node2.inputs[0])
            prev = view.producer(y)
            if not (is_op(prev, ops.CONV) and len(prev.inputs) >= 2):
                continue
            if not (_pointwise(prev, view) or _pointwise(node2, view)):
                continue
            key = f"{prev.name}->{node2.name}"
            found = self.lookup(CHAIN, [key, f"{prev.name}->ring->{node2.name}"])
            users = view.users(y)
            if len(users) > 1 or view.escapes(y):
                cond, reason = SINGLE_USE, _outside(y, node2, users, view)
            else:
                cond, reason = NO_PASS_MATCHED, (
                    f"no pass matched: Conv '{prev.name}' {_kernel(prev, view)} -> Conv '{node2.name}' {_kernel(node2, view)}"
                )
            self.add(CHAIN, key, [prev, node2], found, cond, reason)


def _folders(layer: gs.Node) -> tuple[str, ...]:
    """The passes that fold an affine op into ``layer``."""
    return ("affine-fold",) if is_op(layer, ops.CONV) else ("linear-affine", "token-bn")


def _outside(tensor: gs.Tensor, node: gs.Node, users: list[gs.Node], view: GraphView) -> str:
    if view.escapes(tensor):
        return f"tensor '{tensor.name}' is a graph output"
    other = next(u for u in users if u is not node)
    return f"tensor '{tensor.name}' is also read by '{other.name}' ({other.op})"


def _kernel_shape(node: gs.Node, view: GraphView) -> tuple[int, ...] | None:
    ks = node.attrs.get("kernel_shape")
    if ks is not None:
        return tuple(int(k) for k in ks)
    w = view.source(node.inputs[1])
    shape = w.shape if isinstance(w, gs.Constant) else None  # read without decoding the values
    if shape is None:
        value = view.constant(w)
        shape = None if value is None else value.shape
    return tuple(int(k) for k in shape[2:]) if shape is not None and len(shape) >= 3 else None


def _pointwise(node: gs.Node, view: GraphView) -> bool:
    kernel = _kernel_shape(node, view)
    return kernel is not None and all(k == 1 for k in kernel)


def _kernel(node: gs.Node, view: GraphView) -> str:
    kernel = _kernel_shape(node, view)
    return "x".join(map(str, kernel)) if kernel else "(kernel unknown)"


def find(model: onnx.ModelProto, report=None) -> list[Miss]:
    """Every sum, affine op next to a Conv / Gemm / MatMul, and 1x1 conv chain still in ``model``'s
    main graph, with the condition that stopped it. ``report``: the engine Report of the run that
    produced ``model`` (or its ``to_dict()``), whose last-round declines give the conditions;
    without it every structure is classified here. ``model`` is not changed."""
    finder = _Finder(model, report)
    finder.sums()
    finder.affines()
    finder.chains()
    return finder.misses


def to_list(misses: list[Miss]) -> list[dict]:
    """The misses as JSON-ready data (``report["not_rewritten"]``)."""
    return [m.to_dict() for m in misses]


def summary(misses: list[Miss], details: bool = False, examples: int = 3) -> str:
    """The "not rewritten" section: counts per kind and condition, the first ``examples`` of each
    (every one with ``details``). Empty when nothing was missed."""
    if not misses:
        return ""
    groups: dict[tuple[str, str], list[Miss]] = {}
    for m in misses:
        groups.setdefault((m.kind, m.condition), []).append(m)
    lines = [f"not rewritten: {len(misses)}"]
    for (kind, cond), items in sorted(groups.items(), key=lambda kv: (kv[0][0], -len(kv[1]), kv[0][1])):
        lines.append(f"  {kind} {cond}: {len(items)}")
        shown = items if details else items[:examples]
        for m in shown:
            by = f" ({m.pass_name})" if m.pass_name else ""
            lines.append(f"    {m.key}: {m.reason}{by}")
        if len(shown) < len(items):
            lines.append(f"    ... {len(items) - len(shown)} more (-v or --json for all)")
    return "\n".join(lines)
