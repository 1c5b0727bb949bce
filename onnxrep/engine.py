"""The pipeline: run registered passes to a fixed point and report what each did.

One round runs every selected pass once. For a pass, all candidates are matched and checked on the
unchanged graph, plans are computed, and only then applied; two plans that would replace the same
node are not applied in one round (the second is retried in the next). Rounds repeat until no pass
rewrites anything, so optimizing an optimized model changes nothing.

Subgraph bodies (If branches, Loop and Scan bodies) go through the same rounds, each as a graph of
its own, after the graph that holds them (see :mod:`onnxrep.scopes` for what a body may assume about
its enclosing scopes); their rewrites and declines are reported with the body's label as a prefix
(``the_if.then_branch/<candidate>``). When a body changed, the model is gone over again, since the
enclosing graph may now read less of it. Local functions are left as they are.

Cost. Every rewrite is charged what its new nodes cost (multiply-accumulates of Conv, ConvTranspose,
Gemm and MatMul, counted like :func:`onnxrep.cost.model_cost`, and elements of new float
initializers and Constant nodes) less what the nodes it leaves dead cost; the report gives these per rewrite and per
pass (``macs_delta``, ``params_delta``). A pass may accept a dearer intermediate that a later pass
takes in (conv-chain before parallel-merge), but the run as a whole may not end dearer than its
input: unless ``Options.allow_cost_increase``, a run whose output has more MACs, or more weights
without moving fewer elements per inference (weights and intermediate tensors together, all shapes
known: :meth:`onnxrep.cost.Cost.traffic`), than its input (the main graph by :func:`onnxrep.cost.model_cost` plus the values of its Constant
nodes, :func:`model_weights`; each subgraph body by the sum of its rewrites' charges) is run again with the rewrites responsible left out (condition
``net_cost``): first those that added cost and whose nodes are still in the output, then any that
added cost, and as a last resort all of them.

Kernels. MACs and weights do not see a runtime's fusions: folding one step of a decomposition that
onnxruntime runs as one kernel is cheaper by the count and slower in fact. The passes keep the
decompositions catalogued in :mod:`passes._fusions`; as a check on the whole result, unless
``Options.allow_cost_increase``, a run that rewrote anything compares the node counts of
onnxruntime's own optimized graphs (CPU, ``ORT_ENABLE_ALL``) of its input and its output
(:mod:`onnxrep.kernels`; models of at most ``kernels.MAX_WEIGHT_BYTES`` of weights and
``kernels.MAX_NODES`` nodes). With more kernels in the output, the rewrites responsible are
narrowed down by halves (each half left out in a run of its own, at most ``MAX_KERNEL_RUNS``
runs) and left out (condition ``kernel_count``), or, when no half is found, every rewrite. The
report gives both counts (``kernels_before``, ``kernels_after``) and ``kernel_check``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from math import prod
from typing import Callable, Iterable, Sequence

import numpy as np

import onnx
import onnx_graphsurgeon as gs

from . import kernels, ops
from . import passes as _passes
from . import scopes
from .cost import Cost, ShapeEvidence, infer_evidence, model_cost
from .errors import OnnxrepError
from .graph import GraphView, body_histogram, export_model, finalize, import_model, op_histogram
from .rewrite import Context, Options, Plan

MAX_ROUNDS = 64
#: Runs of the pipeline at most, each leaving out more of the rewrites that raised the cost; the
#: last one leaves out every rewrite.
MAX_COST_RUNS = 6
NET_COST = "net_cost"
#: Runs of the pipeline at most that narrow down the rewrites that raised onnxruntime's kernel
#: count (each with the net-cost runs it takes); then the rewrites narrowed down to are left out.
MAX_KERNEL_RUNS = 8
KERNEL_COUNT = "kernel_count"


@dataclass
class PassReport:
    name: str
    rewritten: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # candidate key -> "condition: reason"
    rewrites: list[dict] = field(default_factory=list)
    macs_delta: int = 0  # net multiply-accumulates the pass's rewrites added (negative: removed)
    params_delta: int = 0  # net float weight elements (initializers, Constant nodes) its rewrites added
    seconds: float = 0.0  # time spent in the pass (matching, checks, rewrites, applying them)

    @property
    def matched(self) -> int:
        return self.rewritten + len(self.skipped)

    def skipped_by_condition(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for reason in self.skipped.values():
            cond = reason.split(":", 1)[0]
            counts[cond] = counts.get(cond, 0) + 1
        return counts

    def to_dict(self, timings: bool = True) -> dict:
        """The pass's figures; ``timings=False`` leaves out ``seconds`` (for comparing two runs)."""
        d = {
            "name": self.name,
            "matched": self.matched,
            "rewritten": self.rewritten,
            "skipped": len(self.skipped),
            "skipped_by_condition": self.skipped_by_condition(),
            "rewrites": self.rewrites,
            "skips": [{"candidate": k, "reason": v} for k, v in self.skipped.items()],
            "macs_delta": self.macs_delta,
            "params_delta": self.params_delta,
        }
        if timings:
            d["seconds"] = round(self.seconds, 6)
        return d


@dataclass
class Report:
    passes: list[PassReport]
    rounds: int
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    cost_before: Cost
    cost_after: Cost
    verification: dict | None = None
    body_ops_before: dict[str, int] = field(default_factory=dict)  # inside If / Loop / Scan bodies
    body_ops_after: dict[str, int] = field(default_factory=dict)
    #: candidate key -> reason, for rewrites left out because the run would have cost more
    left_out_for_cost: dict[str, str] = field(default_factory=dict)
    runs: int = 1  # pipeline runs (more than one when rewrites were left out for cost)
    #: declared shapes (value_info, graph outputs) that the evidence contradicts: each
    #: ``{"tensor", "declared_in", "declared", "evidence"}`` (and ``"observed"`` when it ran)
    declared_shape_contradictions: list[dict] = field(default_factory=list)
    #: where the shapes the passes relied on came from (:meth:`onnxrep.cost.ShapeEvidence.to_dict`)
    shape_evidence: dict = field(default_factory=dict)
    #: nodes of onnxruntime's optimized graph (CPU, ORT_ENABLE_ALL) of the input and the output
    #: (:mod:`onnxrep.kernels`), None where not counted; ``kernel_check`` says what came of it
    kernels_before: int | None = None
    kernels_after: int | None = None
    kernel_check: str = ""

    @property
    def rewritten(self) -> int:
        return sum(p.rewritten for p in self.passes)

    @property
    def passes_seconds(self) -> float:
        return sum(p.seconds for p in self.passes)

    def to_dict(self, timings: bool = True) -> dict:
        """The report as JSON-ready data; ``timings=False`` leaves out the seconds per pass and in
        all, which differ from run to run (for comparing two runs)."""
        d = {
            "rounds": self.rounds,
            "rewritten": self.rewritten,
            "passes": [p.to_dict(timings) for p in self.passes],
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "cost_before": self.cost_before.to_dict(),
            "cost_after": self.cost_after.to_dict(),
            "verification": self.verification,
            "body_ops_before": self.body_ops_before,
            "body_ops_after": self.body_ops_after,
            "left_out_for_cost": sorted(self.left_out_for_cost),
            "runs": self.runs,
            "declared_shape_contradictions": self.declared_shape_contradictions,
            "shape_evidence": self.shape_evidence,
            "kernels": {"before": self.kernels_before, "after": self.kernels_after, "check": self.kernel_check},
        }
        if timings:
            d["passes_seconds"] = round(self.passes_seconds, 6)
        return d


def available_passes() -> dict[str, type]:
    return dict(_passes.REGISTRY)


def select_passes(only: Sequence[str] | None = None, skip: Iterable[str] = ()) -> list:
    registry = available_passes()
    names = list(only) if only else list(registry)
    unknown = [n for n in list(names) + list(skip) if n not in registry]
    if unknown:
        raise OnnxrepError(f"unknown pass {unknown[0]!r}; available: {', '.join(registry)}")
    skip = set(skip)
    return [registry[n]() for n in names if n not in skip]


def _all_names(graph: gs.Graph) -> set[str]:
    names = set(graph.tensors().keys())
    for node in graph.nodes:
        names.add(node.name)
        for attr in node.attrs.values():
            for sub in attr if isinstance(attr, list) else [attr]:
                if isinstance(sub, gs.Graph):
                    names |= _all_names(sub)
    return names


def _apply(graph: gs.Graph, plan: Plan, ctx: Context, old_macs: dict[int, int]) -> tuple[list[gs.Node], list[gs.Node]]:
    """Apply ``plan``; returns (the nodes created, the nodes that used to produce the target).
    ``old_macs`` gets the MACs of those old producers, counted while they still produce it."""
    # detach the target from its old producer in place: a placeholder takes its slot, so that the
    # producer's other outputs (Split, BatchNormalization statistics) keep their positions
    old = list(plan.target.inputs)
    for node in old:
        old_macs.setdefault(id(node), _node_macs(node, ctx))
        slot = next(i for i, t in enumerate(node.outputs) if t is plan.target)
        node.outputs[slot] = gs.Variable(f"{plan.target.name}.detached.{id(node)}", dtype=plan.target.dtype)
    if plan.constant is not None:
        plan.target.to_constant(plan.constant)
    created = []
    for spec in plan.nodes:
        node = gs.Node(spec.op, spec.name, spec.attrs, list(spec.inputs), list(spec.outputs))
        graph.nodes.append(node)
        created.append(node)
    return created, old


# --------------------------------------------------------------------------------------------
# cost of a rewrite
# --------------------------------------------------------------------------------------------

_FLOAT_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _weight_count(tensor: gs.Tensor) -> int:
    """Elements of ``tensor`` when it is a float initializer (what ``model_cost`` counts), else 0."""
    if not isinstance(tensor, gs.Constant):
        return 0
    values = tensor._values
    if isinstance(values, gs.ir.tensor.LazyValues):
        proto = values.tensor
        return prod(proto.dims) if proto.data_type in _FLOAT_TYPES else 0
    if isinstance(values, np.ndarray):
        floating = values.dtype in _FLOAT_DTYPES or str(values.dtype) == "bfloat16"
        return int(values.size) if floating else 0
    return 0  # sparse initializers are not counted


def _constant_node_weights(node: gs.Node) -> int:
    """Float elements a Constant node holds (weights, though ``model_cost`` counts initializers only)."""
    if node.op != ops.CONSTANT or (node.domain or "") not in ops.DEFAULT_DOMAINS:
        return 0
    value = node.attrs.get("value")
    if isinstance(value, gs.Constant):
        return _weight_count(value)
    if "value_float" in node.attrs:
        return 1
    return len(node.attrs.get("value_floats", []))


def model_weights(model: onnx.ModelProto, cost: Cost) -> int:
    """Float weight elements of ``model``'s main graph: ``cost.params`` (its float initializers)
    and the float values of its Constant nodes."""
    total = cost.params
    for node in model.graph.node:
        if node.op_type != ops.CONSTANT or node.domain not in ops.DEFAULT_DOMAINS:
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type in _FLOAT_TYPES:
                total += prod(attr.t.dims)
            elif attr.name == "value_float":
                total += 1
            elif attr.name == "value_floats":
                total += len(attr.floats)
    return total


def _positions(shape) -> int:
    if shape is None:
        return 0
    return prod(d if isinstance(d, int) and d > 0 else 1 for d in shape)


def _node_macs(node: gs.Node, ctx: Context) -> int:
    """Multiply-accumulates of one node, counted as :func:`onnxrep.cost.model_cost` does."""
    if (node.domain or "") not in ops.DEFAULT_DOMAINS or len(node.inputs) < 2:
        return 0
    if node.op in (ops.CONV, ops.CONV_TRANSPOSE):
        w = ctx.shape(node.inputs[1])
        n = _positions(ctx.shape(node.outputs[0] if node.op == ops.CONV else node.inputs[0]))
        return n * prod(w[1:]) if w is not None and n else 0
    if node.op in (ops.GEMM, ops.MATMUL):
        a, b = ctx.shape(node.inputs[0]), ctx.shape(node.inputs[1])
        n = _positions(ctx.shape(node.outputs[0]))
        if not a or b is None or not n:
            return 0
        trans_a = node.op == ops.GEMM and int(node.attrs.get("transA", 0))
        k = a[0] if trans_a else a[-1]
        return n * (k if isinstance(k, int) else 1)
    return 0


@dataclass
class _Charge:
    """What one rewrite added and removed, and the names it left in the graph."""

    macs: int = 0
    params: int = 0
    names: tuple[str, ...] = ()


def _charge(created: list[gs.Node], old: list[gs.Node], plans: list[Plan], ctx: Context, view: GraphView,
            dead: set[int], counted: set[int], old_macs: dict[int, int]) -> _Charge:
    """The cost of a just-applied group of plans: its new nodes and new float initializers, less the
    nodes that are now dead (nothing live reads them, and they are no graph output) and the
    initializers only dead nodes read. ``dead`` and ``counted`` (initializers charged or refunded)
    carry over between the groups of one pass, so a node is refunded once. ``old_macs``: the MACs
    of the nodes that produced a target, counted before they were detached from it."""
    new_ids = {id(n) for n in created}
    macs = sum(_node_macs(n, ctx) for n in created)
    params = sum(_constant_node_weights(n) for n in created)
    for node in created:
        for t in node.inputs:
            if isinstance(t, gs.Constant) and id(t) not in counted and all(id(u) in new_ids for u in t.outputs):
                counted.add(id(t))
                params += _weight_count(t)
    for plan in plans:
        if plan.constant is not None and id(plan.target) not in counted:
            counted.add(id(plan.target))
            params += _weight_count(plan.target)
    stack = list(old)
    while stack:
        node = stack.pop()
        if id(node) in dead or id(node) in new_ids:
            continue
        if any(view.escapes(t) or any(id(u) not in dead for u in t.outputs) for t in node.outputs):
            continue
        dead.add(id(node))
        macs -= old_macs[id(node)] if id(node) in old_macs else _node_macs(node, ctx)
        params -= _constant_node_weights(node)
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                if id(t) not in counted and not view.escapes(t) and all(id(u) in dead for u in t.outputs):
                    counted.add(id(t))
                    params -= _weight_count(t)
            else:
                stack.extend(t.inputs)
    names = tuple(n.name for n in created) + tuple(p.target.name for p in plans if p.constant is not None)
    return _Charge(macs, params, names)


def _region(plans: list[Plan], view: GraphView) -> tuple[str | list[str], list[str]]:
    """("output", "inputs") of a rewrite entry: the target name(s), and the names of the
    non-constant tensors its new nodes read that none of them computes."""
    targets = [p.target.name for p in plans]
    made = {id(t) for p in plans for spec in p.nodes for t in spec.outputs}
    inputs: list[str] = []
    for p in plans:
        for spec in p.nodes:
            for t in spec.inputs:
                if t is None or not t.name or id(t) in made or t.name in inputs:
                    continue
                if isinstance(t, gs.Constant) or view.is_constant(t):
                    continue
                inputs.append(t.name)
    return (targets[0] if len(targets) == 1 else targets), inputs


@dataclass
class _Scope:
    """A graph the passes run on: the main graph (label "") or a subgraph body."""

    graph: gs.Graph
    ctx: Context
    label: str = ""


def _outside_target(plan: Plan, graph: gs.Graph) -> bool:
    """True when ``plan`` would rewrite a tensor that no node of ``graph`` computes."""
    local = {id(n) for n in graph.nodes}
    return not plan.target.inputs or any(id(n) not in local for n in plan.target.inputs)


@dataclass
class _Run:
    """State of one pipeline run shared by its scopes."""

    reports: dict[str, PassReport]
    skipped: dict[tuple[str, str], dict[str, str]]  # (scope, pass) -> the declines of the last round
    held: dict[str, str]  # candidate key -> reason: left out for cost
    hold_all: str | None = None  # a reason to leave out every rewrite (the last resort)
    charges: dict[str, _Charge] = field(default_factory=dict)  # candidate key -> its last charge
    body_cost: dict[str, list[int]] = field(default_factory=dict)  # body label -> [macs, params] added


def _optimize_scope(
    scope: _Scope,
    selected: list,
    input_names: set[str],
    state: _Run,
    progress: Callable[[int, str], None] | None,
) -> tuple[int, bool]:
    """Run the passes on one graph to a fixed point; returns the rounds run and whether anything
    changed. ``state.skipped[(scope, pass)]`` holds the declines of the last round."""
    graph, ctx, label = scope.graph, scope.ctx, scope.label
    options = ctx.options
    prefix = f"{label}/" if label else ""
    rounds, changed_any = 0, False
    for rounds in range(1, MAX_ROUNDS + 1):
        changed = False
        for p in selected:
            start = time.perf_counter()
            rep = state.reports[p.name]
            skips: dict[str, str] = {}  # the last round, which changes nothing, holds every standing decline
            state.skipped[(label, p.name)] = skips
            view = GraphView(graph, input_names)
            claimed: set[int] = set()
            plans: list[tuple[str, list[Plan]]] = []
            for match in p.match(view, ctx):
                key = prefix + match.key
                if key in options.deny:
                    skips[key] = "denied: left out after a verification mismatch"
                    continue
                if key in state.held or state.hold_all is not None:
                    skips[key] = state.held.get(key, state.hold_all)
                    continue
                decline = p.check(match, view, ctx)
                if decline is not None:
                    skips[key] = str(decline)
                    continue
                ids = {id(n) for n in match.nodes}
                if ids & claimed:
                    continue  # overlaps a rewrite of this round: matched again next round
                planned = p.rewrite(match, view, ctx)
                group = planned if isinstance(planned, list) else [planned]
                if label and any(_outside_target(plan, graph) for plan in group):
                    skips[key] = "scope: the rewrite would replace a value computed outside the subgraph"
                    continue
                claimed |= ids
                plans.append((key, group))
            dead: set[int] = set()
            counted: set[int] = set()
            for key, group in plans:
                output, inputs = _region(group, view)
                created, old, old_macs = [], [], {}
                for plan in group:
                    made, before = _apply(graph, plan, ctx, old_macs)
                    created += made
                    old += before
                charge = _charge(created, old, group, ctx, view, dead, counted, old_macs)
                if key in state.charges:  # the same candidate rewritten again in a later round
                    before = state.charges[key]
                    state.charges[key] = _Charge(before.macs + charge.macs, before.params + charge.params, before.names + charge.names)
                else:
                    state.charges[key] = charge
                rep.rewritten += 1
                rep.macs_delta += charge.macs
                rep.params_delta += charge.params
                if label:
                    totals = state.body_cost.setdefault(label, [0, 0])
                    totals[0] += charge.macs
                    totals[1] += charge.params
                entry = {
                    "candidate": key,
                    "round": rounds,
                    "summary": group[0].summary,
                    "output": output,
                    "inputs": inputs,
                    "macs_delta": charge.macs,
                    "params_delta": charge.params,
                }
                if label:
                    entry["scope"] = label
                if group[0].details:
                    entry["details"] = group[0].details
                rep.rewrites.append(entry)
            if plans:
                finalize(graph)
                changed = True
            rep.seconds += time.perf_counter() - start
            if progress is not None:
                progress(rounds, p.name)
        if not changed:
            break
        changed_any = True
    return rounds, changed_any


def run(
    model: onnx.ModelProto,
    only: Sequence[str] | None = None,
    skip: Iterable[str] = (),
    options: Options | None = None,
    progress: Callable[[int, str], None] | None = None,
) -> tuple[onnx.ModelProto, Report]:
    """Optimize ``model`` (not modified) and return the new model and the report.

    Subgraph bodies (If, Loop, Scan) are optimized too, each as a graph of its own whose inputs and
    outer-scope values are opaque (:mod:`onnxrep.scopes`), after the graph that holds them; when a
    body changed, the whole model is gone over again. Local functions are left as they are.

    Unless ``options.allow_cost_increase``, the output never has more MACs or weights than the
    input: a run that would end dearer is repeated with the rewrites responsible left out
    (reported as skipped for ``net_cost`` and in ``Report.left_out_for_cost``); nor, where
    :mod:`onnxrep.kernels` counts them, more kernels in onnxruntime's optimized graph (skipped for
    ``kernel_count``).
    """
    options = options or Options()
    selected = select_passes(only, skip)
    evidence = infer_evidence(model, runtime=True)  # once: every run below shares it
    cost_before = model_cost(model, evidence.shapes)
    weights_before = model_weights(model, cost_before)

    def costed(held: dict[str, str], hold_all: str | None = None):
        return _run_costed(model, selected, options, progress, dict(held), hold_all, evidence, cost_before, weights_before)

    out, report, _, held = costed({})
    if options.allow_cost_increase:
        report.kernel_check = "not made: a cost increase is allowed"
    elif report.rewritten == 0:
        report.kernel_check = "not made: nothing was rewritten"
    else:
        out, report, held = _kernel_check(model, out, report, held, costed)
    report.left_out_for_cost = dict(held)
    report.left_out_for_cost.update(
        {k: v for p in report.passes for k, v in p.skipped.items() if v.startswith((NET_COST + ":", KERNEL_COUNT + ":"))}
    )
    return out, report


def _run_costed(model, selected, options, progress, held, hold_all, evidence, cost_before, weights_before):
    """Runs of the pipeline until the output costs no more MACs and weights than the input (unless
    ``options.allow_cost_increase``), each leaving out more rewrites (condition ``net_cost``);
    ``held`` (candidate key -> reason) and ``hold_all`` are left out from the start. Returns the
    output, its report, the run's state and every rewrite left out."""
    for attempt in range(1, MAX_COST_RUNS + 1):
        out, report, state, graph = _run_once(
            model, selected, options, progress, held, hold_all, evidence, cost_before
        )
        report.runs = attempt
        if options.allow_cost_increase or hold_all is not None:
            break
        dearer = _dearer(report, state, weights_before, model_weights(out, report.cost_after))
        if not dearer:
            break
        reason = f"{NET_COST}: left out: the model would end with more {dearer} than the input"
        if attempt == MAX_COST_RUNS - 1:
            hold_all = reason  # the last run: no rewrite at all
            continue
        culprits = _culprits(state, _all_names(graph), held)
        if not culprits:
            hold_all = reason
            continue
        held.update({key: reason for key in culprits})
    return out, report, state, held


def _applied(report: Report) -> list[str]:
    """The candidate keys of the rewrites a run applied, in the order the passes ran."""
    keys: list[str] = []
    for p in report.passes:
        for r in p.rewrites:
            if r["candidate"] not in keys:
                keys.append(r["candidate"])
    return keys


def _kernel_check(model, out, report: Report, held: dict[str, str], costed):
    """Compare the kernels of onnxruntime's optimized graphs of ``model`` and ``out``
    (:mod:`onnxrep.kernels`); with more in ``out``, narrow down the rewrites responsible by halves
    (each half left out in a run of its own; a half whose leaving out is enough is narrowed down
    further, at most :data:`MAX_KERNEL_RUNS` runs) and leave them out (condition ``kernel_count``).
    Returns the output, its report and every rewrite left out."""
    before = kernels.count_kernels(model)
    report.kernels_before = before.count
    if not before.taken:
        report.kernel_check = f"not made: the input: {before.reason}"
        return out, report, held
    after = kernels.count_kernels(out)
    report.kernels_after = after.count
    if not after.taken:
        report.kernel_check = f"not made: the output: {after.reason}"
        return out, report, held
    if after.count <= before.count:
        report.kernel_check = "ok"
        return out, report, held
    reason = (
        f"{KERNEL_COUNT}: left out: onnxruntime's optimized graph of the model would have {after.count} "
        f"kernels, more than the input's {before.count}"
    )
    first_after = after.count
    suspects = [k for k in _applied(report) if k not in held]
    best = None  # (out, report, held, kernels) of the last run with no more kernels than the input
    runs, pipeline_runs = 0, report.runs

    def trial(keys):
        nonlocal runs, pipeline_runs
        trial_held = dict(held)
        trial_held.update({k: reason for k in keys})
        t_out, t_report, _, t_held = costed(trial_held)
        runs += 1
        pipeline_runs += t_report.runs
        count = kernels.count_kernels(t_out)
        ok = count.taken and count.count <= before.count
        return (t_out, t_report, t_held, count.count) if ok else None, t_report

    # first all of them; a run without them may make rewrites of its own (candidates that the
    # left-out rewrites had replaced), which join the suspects
    while suspects and best is None and runs < MAX_KERNEL_RUNS:
        best, t_report = trial(suspects)
        if best is None:
            more = [k for k in _applied(t_report) if k not in held and k not in suspects]
            if not more:
                break
            suspects += more
    # then by halves, while one half is enough
    while best is not None and len(suspects) > 1 and runs < MAX_KERNEL_RUNS:
        narrowed = False
        for half in (suspects[: len(suspects) // 2], suspects[len(suspects) // 2:]):
            if runs >= MAX_KERNEL_RUNS:
                break
            found, _ = trial(half)
            if found is not None:
                best, suspects, narrowed = found, half, True
                break
        if not narrowed:
            break
    if best is None:  # the last resort: no rewrite at all
        t_out, t_report, _, t_held = costed(dict(held), hold_all=reason)
        pipeline_runs += t_report.runs
        best = (t_out, t_report, t_held, kernels.count_kernels(t_out).count)
        left_out = "every rewrite"
    else:
        left_out = f"{len(suspects)} rewrite(s)"
    out, report, held, count = best
    report.kernels_before, report.kernels_after = before.count, count
    report.kernel_check = f"{left_out} left out ({KERNEL_COUNT}): with them the output had {first_after} kernels"
    report.runs = pipeline_runs
    return out, report, held


def _dearer(report: Report, state: _Run, weights_before: int, weights_after: int) -> str:
    """What the run's output has more of than its input ("" when nothing)."""
    more = []
    body = [sum(v[i] for v in state.body_cost.values() if v[i] > 0) for i in range(2)]
    if report.cost_before.exact and report.cost_after.exact:
        more_macs = report.cost_after.macs > report.cost_before.macs
    else:
        # a count with unknown dims (taken as 1) changes when a fold makes them known: the
        # rewrites' own charges say what they added
        more_macs = sum(c.macs for c in state.charges.values()) > 0
    if more_macs or body[0] > 0:
        more.append("MACs")
    if body[1] > 0 or (weights_after > weights_before and not _less_traffic(report, weights_before, weights_after)):
        more.append("weights")
    return " and ".join(more)


def _less_traffic(report: Report, weights_before: int, weights_after: int) -> bool:
    """Whether the output moves fewer elements per inference than the input, weights and
    intermediate tensors together (:meth:`onnxrep.cost.Cost.traffic`), with every shape known. A
    fold that removes a node and gives a bias-free layer a bias (an affine before a Gemm without
    one) adds a few weights but saves more: the node's own parameters and the tensor it wrote
    and its reader read. Weights alone are no cost: their traffic is."""
    before, after = report.cost_before, report.cost_after
    if not (before.activations_exact and after.activations_exact):
        return False
    return after.traffic(weights_after) < before.traffic(weights_before)


def _culprits(state: _Run, names: set[str], held: dict[str, str]) -> list[str]:
    """The rewrites to leave out next: among the dearer rewrites of the passes whose rewrites add
    up to more cost (else among all dearer rewrites), those whose nodes are still in the output,
    else all of them; else every rewrite."""
    charged = [(k, c) for k, c in state.charges.items() if k not in held]
    dearer = [k for k, c in charged if c.macs > 0 or c.params > 0]
    # a pass whose rewrites add up to no increase (constant folds that gather from a table the
    # last of them frees) is not to blame for the run's: its dearer rewrites are held only after
    # those of the passes whose rewrites do add up to more
    pass_of = {r["candidate"]: name for name, rep in state.reports.items() for r in rep.rewrites}
    totals: dict[str | None, list[int]] = {}
    for k, c in charged:
        t = totals.setdefault(pass_of.get(k), [0, 0])
        t[0] += c.macs
        t[1] += c.params
    blamed = [k for k in dearer if max(totals[pass_of.get(k)]) > 0]
    for group in (blamed, dearer):
        surviving = [k for k in group if any(n in names for n in state.charges[k].names)]
        if surviving or group:
            return surviving or group
    return [k for k, _ in charged]


def _run_once(model, selected, options, progress, held, hold_all, evidence: ShapeEvidence, cost_before):
    graph = import_model(model)
    input_names = {i.name for i in model.graph.input}
    opsets = list(model.opset_import)
    taken = _all_names(graph)  # shared by every scope: names stay unique across the model
    main = _Scope(
        graph,
        Context(options, shapes=dict(evidence.shapes), dtypes=dict(evidence.dtypes), taken_names=taken, opsets=opsets),
    )
    types = scopes.body_types(model, graph, evidence) if scopes.has_subgraphs(graph) else {}
    labels = {key: t.label for key, t in types.items()}
    contexts: dict[int, Context] = {}
    state = _Run({p.name: PassReport(p.name) for p in selected}, {}, held, hold_all)
    rounds = 0
    for _ in range(MAX_ROUNDS):
        used, _ = _optimize_scope(main, selected, input_names, state, progress)
        rounds += used
        body_changed = False
        for body in scopes.bodies(graph, labels):
            ctx = contexts.get(id(body.graph))
            if ctx is None:
                parent = contexts.get(id(body.parent), main.ctx)
                own = types.get(id(body.graph))
                ctx = Context(
                    options,
                    shapes=scopes.scoped(dict(own.shapes) if own else {}, parent.shapes),
                    dtypes=scopes.scoped(dict(own.dtypes) if own else {}, parent.dtypes),
                    taken_names=taken,
                    opsets=opsets,
                )
                contexts[id(body.graph)] = ctx
            isolation = scopes.Isolation(body.graph)
            isolation.enter()
            try:
                _, changed = _optimize_scope(
                    _Scope(body.graph, ctx, body.label), selected, input_names, state, progress
                )
            finally:
                isolation.leave()
            body_changed |= changed
        if not body_changed:
            break
    reports = state.reports
    for (_, name), skips in state.skipped.items():
        reports[name].skipped.update(skips)
    out = export_model(graph, model)
    if types:
        scopes.restore_outer_initializers(out, graph, frozenset(i.name for i in model.graph.initializer), types)
    cost_after = model_cost(out)
    report = Report(
        list(reports.values()), rounds, op_histogram(model), op_histogram(out), cost_before, cost_after,
        body_ops_before=body_histogram(model), body_ops_after=body_histogram(out),
        declared_shape_contradictions=[dict(c) for c in evidence.contradictions],
        shape_evidence=evidence.to_dict(),
    )
    return out, report, state, graph
