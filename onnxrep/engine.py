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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import onnx
import onnx_graphsurgeon as gs

from . import passes as _passes
from . import scopes
from .cost import Cost, infer, model_cost
from .errors import OnnxrepError
from .graph import GraphView, body_histogram, export_model, finalize, import_model, op_histogram
from .rewrite import Context, Options, Plan

MAX_ROUNDS = 64


@dataclass
class PassReport:
    name: str
    rewritten: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # candidate key -> "condition: reason"
    rewrites: list[dict] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return self.rewritten + len(self.skipped)

    def skipped_by_condition(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for reason in self.skipped.values():
            cond = reason.split(":", 1)[0]
            counts[cond] = counts.get(cond, 0) + 1
        return counts

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "matched": self.matched,
            "rewritten": self.rewritten,
            "skipped": len(self.skipped),
            "skipped_by_condition": self.skipped_by_condition(),
            "rewrites": self.rewrites,
            "skips": [{"candidate": k, "reason": v} for k, v in self.skipped.items()],
        }


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

    @property
    def rewritten(self) -> int:
        return sum(p.rewritten for p in self.passes)

    def to_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "rewritten": self.rewritten,
            "passes": [p.to_dict() for p in self.passes],
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "cost_before": self.cost_before.to_dict(),
            "cost_after": self.cost_after.to_dict(),
            "verification": self.verification,
            "body_ops_before": self.body_ops_before,
            "body_ops_after": self.body_ops_after,
        }


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


def _apply(graph: gs.Graph, plan: Plan) -> None:
    # detach the target from its old producer in place: a placeholder takes its slot, so that the
    # producer's other outputs (Split, BatchNormalization statistics) keep their positions
    for node in list(plan.target.inputs):
        slot = next(i for i, t in enumerate(node.outputs) if t is plan.target)
        node.outputs[slot] = gs.Variable(f"{plan.target.name}.detached.{id(node)}", dtype=plan.target.dtype)
    if plan.constant is not None:
        plan.target.to_constant(plan.constant)
    for spec in plan.nodes:
        graph.nodes.append(gs.Node(spec.op, spec.name, spec.attrs, list(spec.inputs), list(spec.outputs)))


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


def _optimize_scope(
    scope: _Scope,
    selected: list,
    input_names: set[str],
    reports: dict[str, PassReport],
    skipped: dict[tuple[str, str], dict[str, str]],
    progress: Callable[[int, str], None] | None,
) -> tuple[int, bool]:
    """Run the passes on one graph to a fixed point; returns the rounds run and whether anything
    changed. ``skipped[(scope, pass)]`` holds the declines of the last round."""
    graph, ctx, label = scope.graph, scope.ctx, scope.label
    options = ctx.options
    prefix = f"{label}/" if label else ""
    rounds, changed_any = 0, False
    for rounds in range(1, MAX_ROUNDS + 1):
        changed = False
        for p in selected:
            rep = reports[p.name]
            skips: dict[str, str] = {}  # the last round, which changes nothing, holds every standing decline
            skipped[(label, p.name)] = skips
            view = GraphView(graph, input_names)
            claimed: set[int] = set()
            plans: list[tuple[str, list[Plan]]] = []
            for match in p.match(view, ctx):
                key = prefix + match.key
                if key in options.deny:
                    skips[key] = "denied: left out after a verification mismatch"
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
            for key, group in plans:
                for plan in group:
                    _apply(graph, plan)
                rep.rewritten += 1
                entry = {"candidate": key, "round": rounds, "summary": group[0].summary}
                if label:
                    entry["scope"] = label
                if group[0].details:
                    entry["details"] = group[0].details
                rep.rewrites.append(entry)
            if plans:
                finalize(graph)
                changed = True
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
    """
    options = options or Options()
    selected = select_passes(only, skip)
    shapes, dtypes = infer(model)
    cost_before = model_cost(model, shapes)
    graph = import_model(model)
    input_names = {i.name for i in model.graph.input}
    opsets = list(model.opset_import)
    taken = _all_names(graph)  # shared by every scope: names stay unique across the model
    main = _Scope(graph, Context(options, shapes=shapes, dtypes=dtypes, taken_names=taken, opsets=opsets))
    types = scopes.body_types(model, graph) if scopes.has_subgraphs(graph) else {}
    labels = {key: t.label for key, t in types.items()}
    contexts: dict[int, Context] = {}
    reports = {p.name: PassReport(p.name) for p in selected}
    skipped: dict[tuple[str, str], dict[str, str]] = {}
    rounds = 0
    for _ in range(MAX_ROUNDS):
        used, _ = _optimize_scope(main, selected, input_names, reports, skipped, progress)
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
                    _Scope(body.graph, ctx, body.label), selected, input_names, reports, skipped, progress
                )
            finally:
                isolation.leave()
            body_changed |= changed
        if not body_changed:
            break
    for (_, name), skips in skipped.items():
        reports[name].skipped.update(skips)
    out = export_model(graph, model)
    if types:
        scopes.restore_outer_initializers(out, graph, frozenset(i.name for i in model.graph.initializer), types)
    cost_after = model_cost(out)
    report = Report(
        list(reports.values()), rounds, op_histogram(model), op_histogram(out), cost_before, cost_after,
        body_ops_before=body_histogram(model), body_ops_after=body_histogram(out),
    )
    return out, report

