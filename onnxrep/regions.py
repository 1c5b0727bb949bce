"""Region and body checks: each rewrite verified on its own, with probes chosen to expose it.

A whole-model check feeds random inputs to both models and compares their outputs; a rewrite that is
wrong only at the border of a feature map, only for large values, or only in a branch the random
inputs never take can pass it. Here every rewritten *region* is checked in isolation:

* **Regions.** A region is the subgraph that computes some tensors (``Region.output``, names the
  rewrite kept) from others (``Region.inputs``: the non-constant tensors the new nodes read; the
  engine's report names both). It is cut out of the original model and out of the optimized one
  (every node on a path from the inputs and constants to the outputs; the inputs become graph
  inputs, with the shapes and element types they have when the original model runs on seeded
  random inputs, not the declared ones, which may be stale), and both are fed the same probes.
  An input that an earlier rewrite made (it is not in the original) is replaced by the original
  tensors it is computed from.
* **Superseded regions.** A later rewrite may consume a region: its output is gone from the
  optimized model, or its start is (or is read past). When the original subgraph of another region
  that is checked computes that tensor, the region is reported ``superseded``: that region covers
  it. Otherwise a region whose output is gone is ``unchecked`` (and does not pass), and one whose
  start moved grows back to where the optimized subgraph starts (inputs that the optimized
  subgraph no longer reads and that the original computes from the other inputs leave the region)
  and is checked from there; a lost input that cannot be computed from the others is fed as it
  was, so that a dropped term shows.
* **Probes** (:data:`PROBES`), for every float input at once: zeros; standard normal values (per
  seed) at x1 and x1000; an index ramp (every position a distinct value, so that a position mix-up
  shows); the border of the spatial axes (axes 2 and up; the last axis of a matrix) set to large
  distinct values (:data:`BORDER_MAGNITUDE`), over zeros and over normal noise, and each spatial
  corner alone at that magnitude (a one-hot: what only a corner pixel sets off shows); and the
  values the original model computes there on seeded random inputs. Integer and bool inputs keep
  the value the original model computes (shape tensors, indices).
* **Proof.** When every node of both subgraphs is affine in the region inputs (:func:`affine_reason`:
  Conv, Gemm and MatMul by constants, BatchNormalization in inference, sums, products and quotients
  by constants, pooling by averages, padding, scatters at constant indices, and the ops that only
  move elements), the inputs hold at most ``max_proof_elems`` float elements ``N``, and ``N + 1``
  runs of both subgraphs take at most ``max_proof_macs`` multiply-accumulates, both subgraphs are
  affine maps ``x -> A x + c``: the zero probe and every basis vector (``N + 1`` spanning probes)
  give ``c`` and each column of ``A``, so outputs that agree on all of them agree everywhere, up to
  the rounding the tolerance admits. Such a region is ``proven`` (method ``spanning probes (N+1)``).
  The spanning probes run stacked along the batch axis where every op keeps it apart
  (:func:`batch_reason`, then checked against single runs), else one by one.
* **Bodies.** A rewritten If / Loop / Scan body (a report entry with a ``scope``) is checked as a
  graph of its own, whether or not the model's inputs ever reach it: the body graph of each model,
  found by its label (owner node name + attribute, nested labels joined with ``/``, as
  :mod:`onnxrep.scopes` names them), with the values it reads from enclosing scopes turned into
  graph inputs, is fed the same probes, and proven the same way when it is affine in float inputs
  only (an If branch; not a Loop body, whose iteration count and condition are inputs). An outer
  value that is an initializer of an enclosing graph in either model is no input: each body reads
  it as a constant, its own model's, or the other model's where its own enclosing graphs hold none
  (the original body reads weights of the main graph that the optimized body folded in and the
  optimized main graph dropped; a value only one model holds as a constant is that constant in
  both).

Comparison. Every output element must satisfy ``|got - ref| <= atol + rtol * |ref|``, the rule
of :mod:`onnxrep.equivalence`, with its ``rtol`` per element type (:func:`onnxrep.equivalence.rtol_for`;
at least float16's or bfloat16's when the subgraph computes in them anywhere). ``atol`` defaults to
``rtol`` times the median nonzero magnitude of that output on that probe, as in the model check,
for the dense probes (zeros, normal, index, the model's values), and to ``rtol`` times its
*largest* magnitude for the sparse ones (border, corners, spanning): there most elements of an
output can be zero or a bias while a few carry every large term, and the rounding of a
re-associated sum scales with its largest terms, not with its result. An explicit ``atol`` is
absolute, on every probe.
Integer and bool outputs must be equal. ``max_rel_error`` is the largest error over the output's
largest magnitude, on the probe where it was largest. float16 inputs get probes scaled to at most
:data:`onnxrep.equivalence.FLOAT16_MAX_MAGNITUDE`, so that sums stay finite.

Use: ``check_regions(original, optimized, report)`` (or a list of :class:`Region`, or None for
the regions :func:`changed_regions` finds by comparing the models) returns one
:class:`RegionCheck` per region and per rewritten body; :func:`summarize` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, shape_inference

from . import equivalence, ops
from .cost import model_cost
from .errors import first_line
from .graph import _tensor_proto_array  # decodes lazily loaded initializers too
from .io import skeleton

#: The probe kinds, in the order they run.
PROBES = ("zeros", "normal", "large", "index", "border", "model")
#: Magnitude of the border and corner probes: above what the x1000 normal probes reach.
BORDER_MAGNITUDE = 1e4
#: Scale of the ``large`` probes.
LARGE_SCALE = 1e3
#: Largest work of a proof: MACs of both subgraphs (Conv, Gemm, MatMul) times the N + 1 probes.
MAX_PROOF_MACS = 2e10
#: Rounds of moving a region's start back (:func:`_grow`).
MAX_GROWTH = 64

EQUAL, DIFFERS, SUPERSEDED, UNCHECKED = "equal", "differs", "superseded", "unchecked"


@dataclass
class Region:
    """The tensors ``output`` as computed from ``inputs`` (non-constant tensor names); ``scope``
    labels the If / Loop / Scan body a rewrite was made in (then the body is checked as a whole and
    ``output`` and ``inputs`` may be empty); ``key`` names the rewrite (its report candidate)."""

    output: list[str]
    inputs: list[str]
    scope: str | None = None
    key: str = ""


@dataclass
class RegionCheck:
    """The outcome for one region or body. ``status``: ``equal``, ``differs``, ``superseded``
    (consumed by a later rewrite whose region covers it) or ``unchecked`` (it could not be cut out
    or run: see ``note``). ``ok`` is true for ``equal`` and ``superseded`` only: what was not
    checked does not pass. ``max_abs_error`` and ``max_rel_error`` are ``inf`` when a region
    differs without a measured error (shapes, types or integers differ, or it does not load or run); :meth:`to_dict`
    gives them as None then (JSON has no infinity), so the dict is standard JSON."""

    key: str
    scope: str | None
    outputs: list[str]
    inputs: list[str]
    ok: bool
    proven: bool
    method: str
    probes: int
    max_abs_error: float
    max_rel_error: float
    note: str = ""
    status: str = EQUAL
    candidates: list[str] = field(default_factory=list)  # the report's rewrites this check covers

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "scope": self.scope,
            "outputs": list(self.outputs),
            "inputs": list(self.inputs),
            "ok": self.ok,
            "status": self.status,
            "proven": self.proven,
            "method": self.method,
            "probes": self.probes,
            "max_abs_error": _finite(self.max_abs_error),
            "max_rel_error": _finite(self.max_rel_error),
            "note": self.note,
            "candidates": list(self.candidates),
        }


def _finite(value: float) -> float | None:
    """``value`` as a float, or None when it is inf or NaN (not JSON)."""
    value = float(value)
    return value if np.isfinite(value) else None


def summarize(checks: Sequence[RegionCheck]) -> dict:
    """Counts of a list of checks: ``ok`` (all of them ok), ``regions``, ``proven``, and one count
    per status (``equal``, ``differs``, ``superseded``, ``unchecked``)."""
    out = {"ok": all(c.ok for c in checks), "regions": len(checks), "proven": sum(c.proven for c in checks)}
    for status in (EQUAL, DIFFERS, SUPERSEDED, UNCHECKED):
        out[status] = sum(c.status == status for c in checks)
    return out


# --------------------------------------------------------------------------------------------
# regions from a report, or from the difference of two models
# --------------------------------------------------------------------------------------------


def _names(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _entries(report) -> list[dict]:
    if isinstance(report, dict):
        passes = report.get("passes", [])
        return [e for p in passes for e in p.get("rewrites", [])]
    if hasattr(report, "passes"):
        return [e for p in report.passes for e in p.rewrites]
    return list(report)


def regions_from_report(report) -> tuple[list[Region], list[str]]:
    """Regions of the rewrites in ``report`` (an :class:`onnxrep.engine.Report`, its ``to_dict()``,
    or a list of rewrite entries): a body region for each entry with a ``scope``, a main-graph
    region for each entry with ``output`` and ``inputs``; and the candidates of main-graph entries
    that have neither (written before the report carried them: see :func:`regions_for`)."""
    regions, missing = [], []
    for entry in _entries(report):
        key = str(entry.get("candidate", ""))
        if entry.get("scope"):
            regions.append(Region(_names(entry.get("output")), _names(entry.get("inputs")), entry["scope"], key))
        elif "output" in entry and "inputs" in entry:
            regions.append(Region(_names(entry["output"]), _names(entry["inputs"]), None, key))
        else:
            missing.append(key)
    return regions, missing


def regions_for(report, original: onnx.ModelProto, optimized: onnx.ModelProto) -> list[Region]:
    """The regions of ``report``; when some main-graph entries do not name their tensors, the
    main-graph regions are found from the two models instead (:func:`changed_regions`)."""
    regions, missing = regions_from_report(report)
    if missing:
        regions = [r for r in regions if r.scope] + [r for r in changed_regions(original, optimized) if not r.scope]
    return regions


def changed_regions(original: onnx.ModelProto, optimized: onnx.ModelProto) -> list[Region]:
    """Regions found by comparing the models: the main-graph nodes of ``optimized`` that
    ``original`` does not have (same op, attributes, inputs, outputs and constant values), split at
    the tensors that exist in ``original`` (the names rewrites keep) into connected groups, each a
    region from the non-constant tensors it reads to the original tensors it computes; and a body
    region for each If / Loop / Scan body whose own nodes differ."""
    a, b = _Graph(original.graph), _Graph(optimized.graph)
    known = {_node_signature(n, a.consts) for n in original.graph.node}
    new = [n for n in optimized.graph.node if _node_signature(n, b.consts) not in known]
    values_a = a.values()
    parent = list(range(len(new)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    made = {out: i for i, n in enumerate(new) for out in n.output if out}
    for i, n in enumerate(new):
        for name in _reads(n):
            j = made.get(name)
            if j is not None and name not in values_a:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(new)):
        groups.setdefault(find(i), []).append(i)
    regions = []
    for members in groups.values():
        nodes = [new[i] for i in members]
        produced = {o for n in nodes for o in n.output if o}
        outputs = [o for n in nodes for o in n.output if o and o in values_a]
        inputs: list[str] = []
        for n in nodes:
            for name in _reads(n):
                if name and name not in produced and name not in b.consts and name not in inputs:
                    inputs.append(name)
        if outputs:
            regions.append(Region(outputs, inputs, None, "changed:" + ",".join(outputs)))
    bodies_a, bodies_b = body_graphs(original), body_graphs(optimized)
    for label, body in bodies_b.items():
        if label in bodies_a and _shallow(bodies_a[label].graph) != _shallow(body.graph):
            regions.append(Region([], [], label, label))
    return regions


def _node_signature(node: onnx.NodeProto, consts: dict) -> bytes:
    """The node with the constants it reads; bodies left out (they are compared on their own)."""
    shallow = node
    if any(True for _ in _subgraphs(node)):
        shallow = onnx.NodeProto()
        shallow.CopyFrom(node)
        _clear_bodies(shallow)
    parts = [shallow.SerializeToString(deterministic=True)]
    for name in node.input:
        t = consts.get(name)
        if t is not None:
            parts.append(name.encode() + b"=" + t.SerializeToString(deterministic=True))
    return b"\0".join(parts)


def _shallow(graph: onnx.GraphProto) -> bytes:
    """``graph`` serialized without the bodies nested in it (they are compared on their own)."""
    g = onnx.GraphProto()
    g.CopyFrom(graph)
    del g.value_info[:]
    for node in g.node:
        _clear_bodies(node)
    return g.SerializeToString(deterministic=True)


def _clear_bodies(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            attr.g.Clear()
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for sub in attr.graphs:
                sub.Clear()


# --------------------------------------------------------------------------------------------
# graphs, walks and bodies
# --------------------------------------------------------------------------------------------


def _subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, None, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(attr.graphs):
                yield attr.name, i, g


def free_names(graph: onnx.GraphProto) -> list[str]:
    """Names that ``graph`` (or a body nested in it) reads without defining them: the values it
    takes from enclosing scopes, in order of first use."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    defined |= {o for n in graph.node for o in n.output}
    out: dict[str, None] = {}
    for node in graph.node:
        for name in _reads(node):
            if name and name not in defined:
                out.setdefault(name)
    for o in graph.output:
        if o.name not in defined:
            out.setdefault(o.name)
    return list(out)


def _reads(node: onnx.NodeProto) -> list[str]:
    """What ``node`` reads: its inputs and the outer values its bodies read."""
    out = [i for i in node.input if i]
    for _, _, sub in _subgraphs(node):
        out.extend(n for n in free_names(sub) if n not in out)
    return out


class _Graph:
    """A graph with its producers and the constants visible in it (its initializers over those of
    the enclosing graphs)."""

    def __init__(self, graph: onnx.GraphProto, outer: dict | None = None):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output if o}
        own = {t.name: t for t in graph.initializer}
        self.consts = {**(outer or {}), **own}
        self.inputs = [i.name for i in graph.input if i.name not in own]

    def values(self) -> set[str]:
        """Non-constant tensors: graph inputs and node outputs."""
        return set(self.producer) | set(self.inputs)

    def walk(self, outputs: Iterable[str], stop: set[str]):
        """Nodes on the paths from ``stop`` and the constants to ``outputs`` (graph order), the
        names of ``stop`` reached, the constants read and the other names reached that no node
        computes (graph inputs or undefined)."""
        seen: set[int] = set()
        reached, consts, free = [], [], []
        visited: set[str] = set()
        stack = list(reversed(list(outputs)))
        while stack:
            name = stack.pop()
            if not name or name in visited:
                continue
            visited.add(name)
            if name in stop:
                reached.append(name)
                continue
            node = self.producer.get(name)
            if node is not None:
                if id(node) not in seen:
                    seen.add(id(node))
                    stack.extend(reversed(_reads(node)))
            elif name in self.consts:
                consts.append(name)
            else:
                free.append(name)
        nodes = _toposort([n for n in self.graph.node if id(n) in seen])
        return nodes, reached, consts, free


def _toposort(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    made = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    order: list[int] = []
    state: dict[int, int] = {}
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            i, done = stack.pop()
            if done:
                state[i] = 2
                order.append(i)
                continue
            if state.get(i):
                continue
            state[i] = 1
            stack.append((i, True))
            for name in _reads(nodes[i]):
                j = made.get(name)
                if j is not None and not state.get(j):
                    stack.append((j, False))
    return [nodes[i] for i in order]


@dataclass
class BodyRef:
    """A body graph, the node that holds it, and the graphs around it (outermost first)."""

    graph: onnx.GraphProto
    owner: onnx.NodeProto
    attr: str
    enclosing: list[onnx.GraphProto] = field(default_factory=list)


def body_graphs(model: onnx.ModelProto) -> dict[str, BodyRef]:
    """Every If / Loop / Scan body of ``model`` by label, named as :func:`onnxrep.scopes.body_types`
    names them (``owner.attr``, ``[i]`` in a list of graphs, ``#k`` for a repeated label, nested
    labels joined with ``/``)."""
    out: dict[str, BodyRef] = {}
    used: set[str] = set()

    def visit(graph: onnx.GraphProto, prefix: str, chain: list) -> None:
        for node in graph.node:
            for attr, index, sub in _subgraphs(node):
                label = base = f"{prefix}{node.name or node.op_type}.{attr}" + ("" if index is None else f"[{index}]")
                k = 1
                while label in used:
                    k += 1
                    label = f"{base}#{k}"
                used.add(label)
                out[label] = BodyRef(sub, node, attr, chain + [graph])
                visit(sub, label + "/", chain + [graph])

    visit(model.graph, "", [])
    return out


# --------------------------------------------------------------------------------------------
# affine subgraphs
# --------------------------------------------------------------------------------------------

_ANY = frozenset({ops.ADD, ops.SUB, ops.SUM, ops.MEAN, ops.NEG, ops.IDENTITY, ops.CONCAT})
_FIRST = frozenset({
    ops.CONV, ops.CONV_TRANSPOSE, ops.BATCH_NORM, ops.TRANSPOSE, ops.FLATTEN, ops.RESHAPE, ops.SQUEEZE,
    ops.UNSQUEEZE, ops.SLICE, ops.SPLIT, ops.EXPAND, ops.TILE, ops.GATHER, ops.PAD, ops.AVERAGE_POOL,
    ops.GLOBAL_AVERAGE_POOL, ops.REDUCE_SUM, ops.REDUCE_MEAN, ops.DEPTH_TO_SPACE, ops.SPACE_TO_DEPTH, ops.DIV,
})
_ONE = frozenset({ops.MUL, ops.MATMUL})
#: Ops whose output depends on the shapes of their inputs only.
_SHAPE_ONLY = frozenset({ops.SHAPE, ops.SIZE})


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def affine_reason(nodes: Sequence[onnx.NodeProto], inputs: Iterable[str]) -> str | None:
    """None when every node of ``nodes`` (in topological order) is an affine map of the tensors that
    depend on ``inputs`` (the nodes that read none of them compute constants); else why not."""
    dep = set(inputs)
    for node in nodes:
        at = [i for i, name in enumerate(node.input) if name in dep]
        inner = [n for _, _, sub in _subgraphs(node) for n in free_names(sub) if n in dep]
        if not at and not inner:
            continue
        op = node.op_type
        where = f"{op} '{node.name or node.output[0]}'"
        if node.domain not in ops.DEFAULT_DOMAINS:
            return f"{where} is not a standard op"
        if inner:
            return f"{where} reads the inputs in a body"
        if op in _SHAPE_ONLY:
            continue
        if op in _ANY:
            pass
        elif op in _FIRST:
            if at != [0]:
                return f"{where} reads the inputs in a parameter"
            if op == ops.BATCH_NORM and (_attr(node, "training_mode", 0) or any(node.output[1:])):
                return f"{where} is in training mode"
        elif op in _ONE:
            if len(at) > 1:
                return f"{where} multiplies two values that depend on the inputs"
        elif op == ops.GEMM:
            if len(set(at) & {0, 1}) != 1 or 2 in at:
                return f"{where} is not linear in the inputs"
        elif op in (ops.SCATTER_ND, ops.SCATTER_ELEMENTS):
            if 1 in at:
                return f"{where} reads the inputs in its indices"
            if _attr(node, "reduction", b"none") not in (b"none", b"add", "none", "add"):
                return f"{where} reduces by {_attr(node, 'reduction')!r}"
        else:
            return f"{where} is not affine"
        dep.update(o for o in node.output if o)
    return None


# --------------------------------------------------------------------------------------------
# probes and comparison
# --------------------------------------------------------------------------------------------


@dataclass
class _Input:
    name: str
    dtype: np.dtype
    shape: tuple
    fixed: np.ndarray | None = None  # a runtime value (used for the "model" probe and non-float inputs)

    @property
    def floating(self) -> bool:
        return self.dtype.kind == "f" or str(self.dtype) == "bfloat16"

    @property
    def size(self) -> int:
        return int(prod(self.shape))


def _spatial_axes(rank: int) -> list[int]:
    if rank >= 3:
        return list(range(2, rank))
    return [rank - 1] if rank else []


def _border_mask(shape: tuple) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for axis in _spatial_axes(len(shape)):
        if shape[axis] == 0:
            continue
        for pos in {0, shape[axis] - 1}:
            index = [slice(None)] * len(shape)
            index[axis] = pos
            mask[tuple(index)] = True
    if not shape:
        mask = np.ones((), dtype=bool)
    return mask


def _corners(shape: tuple) -> list[np.ndarray]:
    axes = _spatial_axes(len(shape))[-3:]
    if not axes or any(shape[a] == 0 for a in axes):
        return []
    out = []
    for bits in range(2 ** len(axes)):
        mask = np.zeros(shape, dtype=bool)
        index = [slice(None)] * len(shape)
        for k, axis in enumerate(axes):
            index[axis] = shape[axis] - 1 if bits >> k & 1 else 0
        mask[tuple(index)] = True
        out.append(mask)
    # corners coincide on axes of length 1
    unique = []
    for m in out:
        if not any(np.array_equal(m, u) for u in unique):
            unique.append(m)
    return unique


def _other_value(spec: _Input, rng: np.random.Generator) -> np.ndarray:
    if spec.fixed is not None:
        return spec.fixed
    if spec.dtype.kind == "b":
        return np.ones(spec.shape, dtype=bool) if spec.size == 1 else rng.integers(0, 2, spec.shape).astype(bool)
    return rng.integers(0, 4, size=spec.shape).astype(spec.dtype)


def _cast(values: np.ndarray, spec: _Input) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if spec.dtype == np.float16:  # large probes scaled into float16's range, as the model checks do
        peak = float(np.max(np.abs(values), initial=0.0))
        if peak > equivalence.FLOAT16_MAX_MAGNITUDE:
            values = values * (equivalence.FLOAT16_MAX_MAGNITUDE / peak)
    return values.astype(spec.dtype)


def probe_sets(specs: Sequence[_Input], kinds: Sequence[str] = PROBES, seeds: int = 2) -> list[tuple[str, dict]]:
    """``(label, feeds)`` for each probe of ``kinds`` (see :data:`PROBES` and the module doc)."""
    floats = [s for s in specs if s.floating]
    out: list[tuple[str, dict]] = []

    def feeds(values: dict[str, np.ndarray], seed: int = 0) -> dict:
        rng = np.random.default_rng(1000 + seed)
        f = {s.name: _other_value(s, rng) for s in specs if not s.floating}
        f.update({s.name: _cast(values[s.name], s) for s in floats})
        return f

    for kind in kinds:
        if kind == "zeros":
            out.append(("zeros", feeds({s.name: np.zeros(s.shape) for s in floats})))
        elif kind in ("normal", "large"):
            scale = 1.0 if kind == "normal" else LARGE_SCALE
            for seed in range(seeds):
                rng = np.random.default_rng(seed)
                values = {s.name: rng.standard_normal(s.shape) * scale for s in floats}
                label = f"normal seed {seed}" + ("" if kind == "normal" else f" x{LARGE_SCALE:g}")
                out.append((label, feeds(values, seed)))
        elif kind == "index":
            values = {s.name: k + (np.arange(s.size) + 1.0).reshape(s.shape) / max(s.size, 1) for k, s in enumerate(floats)}
            out.append(("index", feeds(values)))
        elif kind == "border":
            rng = np.random.default_rng(7)
            ramp = {s.name: BORDER_MAGNITUDE * (1 + (np.arange(s.size) / max(s.size, 1)).reshape(s.shape)) for s in floats}
            masks = {s.name: _border_mask(s.shape) for s in floats}
            out.append(("border", feeds({n: np.where(masks[n], ramp[n], 0.0) for n in ramp})))
            noise = {s.name: rng.standard_normal(s.shape) for s in floats}
            out.append(("border over noise", feeds({n: np.where(masks[n], ramp[n], noise[n]) for n in ramp})))
            corners = {s.name: _corners(s.shape) for s in floats}
            for c in range(max((len(v) for v in corners.values()), default=0)):
                values = {
                    s.name: (corners[s.name][c] * BORDER_MAGNITUDE if c < len(corners[s.name]) else np.zeros(s.shape))
                    for s in floats
                }
                out.append((f"border corner {c}", feeds(values)))
        elif kind == "model":
            if all(s.fixed is not None for s in specs) and specs:
                out.append(("model", {s.name: s.fixed for s in specs}))
        else:
            raise ValueError(f"unknown probe kind {kind!r}; known: {', '.join(PROBES)}")
    return out


@dataclass
class _Diff:
    ok: bool
    abs_error: float
    rel_error: float
    reason: str = ""


def compare_arrays(ref: np.ndarray, got: np.ndarray, rtol: float | None, atol: float | None, dense: bool = False) -> _Diff:
    """The element-wise rule of the module doc; ``rtol`` None: integers and bools, equal. With
    ``dense`` (an output of a dense probe) and no ``atol``, ``atol`` is ``rtol`` times the median
    nonzero magnitude of ``ref``, as in the model check; else ``rtol`` times its largest."""
    ref, got = np.asarray(ref), np.asarray(got)
    if dense and atol is None and rtol is not None and ref.shape == got.shape and ref.dtype == got.dtype:
        mag = np.abs(ref[np.isfinite(ref)].astype(np.float64))
        nonzero = mag[mag > 0]
        atol = rtol * float(np.median(nonzero)) if nonzero.size else 0.0
    if ref.shape != got.shape:
        return _Diff(False, float("inf"), float("inf"), f"shape {got.shape} instead of {ref.shape}")
    if ref.dtype != got.dtype:
        return _Diff(False, float("inf"), float("inf"), f"type {got.dtype} instead of {ref.dtype}")
    if rtol is None:
        same = bool(np.array_equal(ref, got))
        return _Diff(same, 0.0 if same else float("inf"), 0.0 if same else float("inf"), "" if same else "values differ")
    if ref.size and np.isfinite(ref).all() and np.isfinite(got).all():
        return compare_rows(ref.reshape((1,) + ref.shape), got.reshape((1,) + got.shape), rtol, atol)[0]
    r, g = ref.astype(np.float64), got.astype(np.float64)
    nan_r = np.isnan(r)
    if not np.array_equal(nan_r, np.isnan(g)):
        return _Diff(False, float("nan"), float("nan"), "NaN at other positions")
    inf_r = np.isinf(r)
    if not np.array_equal(inf_r, np.isinf(g)) or not np.array_equal(r[inf_r], g[inf_r]):
        return _Diff(False, float("inf"), float("inf"), "infinities differ")
    finite = ~(nan_r | inf_r)
    r, g = r[finite], g[finite]
    err = np.abs(r - g)
    mag = float(np.max(np.abs(r), initial=0.0))
    floor = rtol * mag if atol is None else atol
    ok = bool(np.all(err <= floor + rtol * np.abs(r)))
    abs_error = float(np.max(err, initial=0.0))
    rel_error = abs_error / mag if mag > 0 else (0.0 if abs_error == 0 else float("inf"))
    return _Diff(ok, abs_error, rel_error)


def compare_rows(ref: np.ndarray, got: np.ndarray, rtol: float | None, atol: float | None) -> list[_Diff]:
    """:func:`compare_arrays` for each row (leading index) of two stacks of outputs at once."""
    ref, got = np.asarray(ref), np.asarray(got)
    k = ref.shape[0] if ref.ndim else 1
    if ref.shape != got.shape or ref.dtype != got.dtype or rtol is None or k == 0 or ref.size == 0:
        if ref.ndim and got.ndim and got.shape[0] == k:
            return [compare_arrays(ref[i : i + 1], got[i : i + 1], rtol, atol) for i in range(k)]
        return [compare_arrays(ref, got, rtol, atol)] * k
    work = np.float64 if ref.dtype == np.float64 else np.float32  # float16 and bfloat16 widen exactly
    r = ref.reshape(k, -1).astype(work, copy=False)
    g = got.reshape(k, -1).astype(work, copy=False)
    finite = np.isfinite(r)
    odd = ~finite.all(axis=1) | ~np.isfinite(g).all(axis=1)  # rows with NaN or inf: one by one
    mag_each = np.abs(r)
    err = np.abs(r - g)
    if odd.any():
        err[~finite] = 0
        mag_each[~finite] = 0
    mag = mag_each.max(axis=1)
    floor = rtol * mag if atol is None else np.full(k, atol, dtype=work)
    mag_each *= work(rtol)
    mag_each += floor[:, None]
    ok = (err <= mag_each).all(axis=1)
    abs_error = err.max(axis=1).astype(np.float64)
    mag = mag.astype(np.float64)
    out = []
    for i in range(k):
        if odd[i]:
            out.append(compare_arrays(ref[i : i + 1], got[i : i + 1], rtol, atol))
        else:
            a = float(abs_error[i])
            rel = a / mag[i] if mag[i] > 0 else (0.0 if a == 0 else float("inf"))
            out.append(_Diff(bool(ok[i]), a, rel))
    return out


def _rtol(dtype: np.dtype, floor: float) -> float | None:
    own = equivalence.rtol_for(dtype)
    return None if own is None else max(own, floor)


_LOW = {onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.BFLOAT16: "bfloat16"}


# --------------------------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """A region or body made ready to run: the two extracted models and their inputs."""

    key: str
    scope: str | None
    outputs: list[str]
    inputs: list[_Input] = field(default_factory=list)
    model_a: onnx.ModelProto | None = None
    model_b: onnx.ModelProto | None = None
    nodes_a: list = field(default_factory=list)
    nodes_b: list = field(default_factory=list)
    status: str = ""
    note: str = ""
    source_a: tuple = ()  # (model, constant names) a region is cut from
    source_b: tuple = ()
    pending: list = field(default_factory=list)  # (kind, tensor) for _settle
    widened: bool = False  # run widened to float32
    candidates: list = field(default_factory=list)  # report candidates
    covers: set = field(default_factory=set)  # original tensors the original subgraph computes


def _value_info(spec: _Input) -> onnx.ValueInfoProto:
    if str(spec.dtype) == "bfloat16":
        elem = onnx.TensorProto.BFLOAT16
    else:
        elem = helper.np_dtype_to_tensor_dtype(spec.dtype)
    return helper.make_tensor_value_info(spec.name, elem, list(spec.shape))


def _make_model(src: onnx.ModelProto, nodes, inputs: list[_Input], outputs: list[str], consts: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes), "region", [_value_info(s) for s in inputs],
        [helper.make_empty_tensor_value_info(o) for o in outputs], list(consts),
    )
    model = helper.make_model(graph, opset_imports=list(src.opset_import), functions=list(src.functions))
    model.ir_version = max(src.ir_version, 4)
    return model


def _superseded(plan: _Plan, why: str) -> _Plan:
    plan.status, plan.note = SUPERSEDED, why
    return plan


def _plan_region(region: Region, a: _Graph, b: _Graph, original, optimized, grow: bool = False) -> tuple[_Plan, list[str]]:
    """Extract the region from both models; the names whose runtime values are needed. Tensors of
    the region that the optimized model no longer has, or that its optimized subgraph reads past,
    are left in ``plan.pending`` for :func:`_settle` (another region may cover them); with
    ``grow``, the region's start moves back instead (:func:`_grow`)."""
    plan = _Plan(region.key or ",".join(region.output), None, list(region.output))
    if not region.output:
        return _superseded(plan, "the rewrite names no output"), []
    values_a, values_b = a.values(), b.values()
    later = [o for o in region.output if o not in values_a]
    if later:
        return _superseded(plan, f"'{later[0]}' is not in the original model: checked with the rewrite that made it"), []
    inputs: list[str] = []
    for name in region.inputs:
        if name in a.consts and name not in values_a:
            continue
        if name in values_a:
            inputs.append(name)
            if name not in values_b and not grow:
                plan.pending.append(("input", name))
        elif name in values_b:  # made by an earlier rewrite: the region starts where that one did
            _, reached, _, free = b.walk([name], values_a)
            inputs.extend(n for n in reached + free if n not in inputs)
        else:
            return _superseded(plan, f"input '{name}' was made and consumed by other rewrites"), []
    inputs = list(dict.fromkeys(inputs))
    nodes_a, reached_a, consts_a, free_a = a.walk(region.output, set(inputs))
    plan.covers = {o for n in nodes_a for o in n.output if o}
    undefined = [n for n in free_a if n not in values_a]
    if undefined:
        plan.status, plan.note = UNCHECKED, f"'{undefined[0]}' is not defined in the original model"
        return plan, []
    inputs += [n for n in free_a if n not in inputs]
    gone = [o for o in region.output if o not in values_b]
    if gone:
        plan.pending.extend(("output", o) for o in gone)
        return plan, []
    if grow:
        plan.pending = []
        inputs = _grow(plan, inputs, a, b)
        if inputs is None:
            return plan, []
        nodes_a, reached_a, consts_a, _ = a.walk(region.output, set(inputs))
        plan.covers = {o for n in nodes_a for o in n.output if o}
    nodes_b, reached_b, consts_b, free_b = b.walk(region.output, set(inputs))
    if free_b:
        bypassed = [n for n in reached_a if n not in reached_b] or free_b
        plan.pending.extend(("bypassed", n) for n in bypassed)
    plan.nodes_a, plan.nodes_b = nodes_a, nodes_b
    plan.source_a, plan.source_b = (original, consts_a), (optimized, consts_b)
    return plan, inputs


def _grow(plan: _Plan, inputs: list[str], a: _Graph, b: _Graph) -> list[str] | None:
    """Move the region's start back until it bounds both subgraphs: names the optimized subgraph
    reads past the inputs join them, and inputs the optimized subgraph no longer reads that the
    original computes from the other inputs leave them (the original subgraph then computes them,
    as the rewrite that consumed them does). The new inputs, or None (``plan`` marked unchecked)."""
    values_a = a.values()
    inputs = list(inputs)
    for _ in range(MAX_GROWTH):
        _, reached_b, _, free_b = b.walk(plan.outputs, set(inputs))
        outside = [n for n in free_b if n not in values_a]
        if outside:
            plan.status, plan.note = UNCHECKED, f"the optimized subgraph reads '{outside[0]}', which the original model does not have"
            return None
        inputs += [n for n in free_b if n not in inputs]
        if free_b:
            _, reached_b, _, free_b = b.walk(plan.outputs, set(inputs))
        unused = [t for t in inputs if t not in reached_b]
        derivable = [t for t in unused if not a.walk([t], set(inputs) - {t})[3]]
        if not free_b and not derivable:
            return inputs
        inputs = [t for t in inputs if t not in derivable]
        _, _, _, free_a = a.walk(plan.outputs, set(inputs))
        inputs += [n for n in free_a if n not in inputs]
    plan.status, plan.note = UNCHECKED, "the region's start does not settle"
    return None


def _settle(plans: list[_Plan], regions: dict, a: _Graph, b: _Graph, original, optimized, region_inputs: dict) -> None:
    """Decide the regions with pending tensors (see :func:`_plan_region`): superseded when the
    original subgraph of a region that is itself checked computes each of them (that region covers
    this one's rewrite); otherwise a region whose output is gone is unchecked, and the others grow
    (:func:`_grow`) to a start that bounds both subgraphs, and are checked so."""
    checked = [p for p in plans if not p.status and not p.pending]
    open_ = [p for p in plans if not p.status and p.pending]
    changed = True
    while changed:  # a grown region is checked too, and may cover others
        changed = False
        for plan in list(open_):
            covered = [t for _, t in plan.pending if any(t in other.covers for other in checked)]
            if len(covered) == len(plan.pending):
                kind, name = plan.pending[0]
                what = "is read past by the optimized subgraph" if kind == "bypassed" else "is no longer in the optimized model"
                _superseded(plan, f"'{name}' {what}: a later rewrite consumed it (its region covers this one)")
                open_.remove(plan)
                changed = True
    for plan in open_:
        gone = [t for k, t in plan.pending if k == "output"]
        if gone:
            plan.status = UNCHECKED
            plan.note = f"'{gone[0]}' is no longer in the optimized model and no checked region computes it"
            continue
        kind, name = plan.pending[0]
        grown, inputs = _plan_region(regions[id(plan)], a, b, original, optimized, grow=True)
        grown.key, grown.candidates = plan.key, plan.candidates
        plan.__dict__.update(grown.__dict__)
        region_inputs[id(plan)] = inputs
        if not plan.status:
            what = "read past" if kind == "bypassed" else "no longer in the optimized model"
            plan.note = _join(plan.note, f"'{name}' is {what}: the region starts where the optimized subgraph does")


def _plan_body(label: str, keys: list[str], bodies_a: dict, bodies_b: dict) -> tuple[_Plan, list[str]]:
    """The body ``label`` of both models, and the outer names it reads (whose runtime values give
    their shapes)."""
    plan = _Plan(label, label, [])
    plan.candidates = [k for k in keys if k != label]
    ref_a, ref_b = bodies_a.get(label), bodies_b.get(label)
    if ref_a is None:
        plan.status, plan.note = UNCHECKED, f"no body labelled '{label}' in the original model"
        return plan, []
    if ref_b is None:
        return _superseded(plan, f"no body labelled '{label}' in the optimized model any more"), []
    plan.outputs = [o.name for o in ref_a.graph.output]
    return plan, list(dict.fromkeys(free_names(ref_a.graph) + free_names(ref_b.graph)))


def _outer_consts(chain: list[onnx.GraphProto]) -> dict:
    consts: dict = {}
    for g in chain:
        consts.update({t.name: t for t in g.initializer})
    return consts


def check_regions(
    original: onnx.ModelProto,
    optimized: onnx.ModelProto,
    regions=None,
    *,
    max_proof_elems: int = 4096,
    max_proof_macs: float = MAX_PROOF_MACS,
    rtol: float | None = None,
    atol: float | None = None,
    probes: Sequence[str] = PROBES,
    seeds: int = 2,
) -> list[RegionCheck]:
    """Check every region of ``regions`` (a list of :class:`Region`, a report as
    :func:`regions_for` takes it, or None: :func:`changed_regions`) between the two models; one
    :class:`RegionCheck` per region, body regions merged per body. See the module doc."""
    if regions is None:
        regions = changed_regions(original, optimized)
    elif not (isinstance(regions, (list, tuple)) and all(isinstance(r, Region) for r in regions)):
        regions = regions_for(regions, original, optimized)
    a, b = _Graph(original.graph), _Graph(optimized.graph)
    plans: list[_Plan] = []
    region_inputs: dict[int, list[str]] = {}
    by_plan: dict[int, Region] = {}
    body_keys: dict[str, list[str]] = {}
    seen: dict[tuple, _Plan] = {}
    for region in regions:
        if region.scope:
            body_keys.setdefault(region.scope, [])
            if region.key and region.key not in body_keys[region.scope]:
                body_keys[region.scope].append(region.key)
            continue
        sig = (tuple(region.output), tuple(region.inputs))
        if sig in seen:
            if region.key and region.key not in seen[sig].candidates:
                seen[sig].candidates.append(region.key)
            continue
        plan, inputs = _plan_region(region, a, b, original, optimized)
        plan.candidates = [region.key] if region.key else []
        seen[sig] = plan
        plans.append(plan)
        region_inputs[id(plan)] = inputs
        by_plan[id(plan)] = region
    _settle(plans, by_plan, a, b, original, optimized, region_inputs)
    wanted = [n for plan in plans if not plan.status for n in region_inputs[id(plan)]]
    bodies_a = body_graphs(original) if body_keys else {}
    bodies_b = body_graphs(optimized) if body_keys else {}
    body_plans = []
    for label, keys in body_keys.items():
        plan, outer = _plan_body(label, keys, bodies_a, bodies_b)
        plans.append(plan)
        body_plans.append((plan, outer))
        if not plan.status:
            owner = bodies_a[label].owner
            wanted.extend(outer + [i for i in owner.input if i])
    runtime, run_note = _runtime(original, list(dict.fromkeys(wanted)), a)
    declared = _declared_types(original) if body_plans else {}
    for plan in plans:
        if plan.status:
            continue
        if plan.scope is None:
            original_model, consts_a = plan.source_a
            optimized_model, consts_b = plan.source_b
            specs = []
            for name in region_inputs[id(plan)]:
                value = runtime.get(name)
                if value is None:
                    plan.status = UNCHECKED
                    plan.note = f"no runtime value of '{name}'" + (f": {run_note}" if run_note else "")
                    break
                specs.append(_Input(name, value.dtype, tuple(value.shape), value))
            if plan.status:
                continue
            plan.inputs = specs
            plan.model_a = _make_model(original_model, plan.nodes_a, specs, plan.outputs, [a.consts[c] for c in consts_a])
            plan.model_b = _make_model(optimized_model, plan.nodes_b, specs, plan.outputs, [b.consts[c] for c in consts_b])
    for plan, outer in body_plans:
        if plan.status:
            continue
        _build_body(plan, outer, bodies_a[plan.scope], bodies_b[plan.scope], original, optimized, runtime, declared)
    return [_check(plan, max_proof_elems, max_proof_macs, rtol, atol, probes, seeds) for plan in plans]


def _runtime(model: onnx.ModelProto, names: list[str], graph: _Graph) -> tuple[dict[str, np.ndarray], str]:
    """Values of ``names`` (main-graph tensors; others are left out) when ``model`` runs on seeded
    random inputs (seed 0 of :func:`onnxrep.equivalence.random_inputs`)."""
    if not names:
        return {}, ""
    try:
        feeds = equivalence.random_inputs(model, 0)
    except Exception as err:  # noqa: BLE001
        return {}, first_line(err)
    out = {n: feeds[n] for n in names if n in feeds}
    extra = [n for n in names if n in graph.producer and n not in out]
    if not extra:
        return out, ""
    # the outputs are added to the model itself for as long as the sessions take to load (no copy
    # of a large model's weights), then removed again
    present = {o.name for o in model.graph.output}
    count = len(model.graph.output)
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in extra if n not in present)
    try:
        try:
            sess = equivalence.reference_session(model)
            run_feeds = feeds
        except Exception as err:  # noqa: BLE001 - a model onnxruntime runs only widened to float32
            try:
                sess = equivalence.reference_session(equivalence.widen(model))
                run_feeds = {k: equivalence._widen_array(v) for k, v in feeds.items()}
            except Exception:  # noqa: BLE001
                return out, f"the original model does not run: {first_line(err)}"
    finally:
        del model.graph.output[count:]
    try:
        results = sess.run(extra, run_feeds)
    except Exception as err:  # noqa: BLE001
        return out, f"the original model fails: {first_line(err)}"
    out.update(dict(zip(extra, (np.asarray(r) for r in results))))
    return out, ""


def _declared_types(model: onnx.ModelProto) -> dict[str, tuple[np.dtype, tuple]]:
    """Element types and shapes onnx infers for the tensors of every graph of ``model`` (for body
    values the runtime run cannot see); symbolic dims as None."""
    try:
        inferred = shape_inference.infer_shapes(skeleton(model), strict_mode=False)
    except Exception:  # noqa: BLE001
        inferred = model
    out: dict = {}

    def visit(graph: onnx.GraphProto) -> None:
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            t = vi.type.tensor_type
            if vi.type.WhichOneof("value") != "tensor_type" or not t.elem_type:
                continue
            try:
                dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type))
            except Exception:  # noqa: BLE001
                continue
            shape = None
            if t.HasField("shape"):
                shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
            out.setdefault(vi.name, (dtype, shape))
        for node in graph.node:
            for _, _, sub in _subgraphs(node):
                visit(sub)

    visit(inferred.graph)
    return out


def _concrete(shape, default_batch: int = 1) -> tuple | None:
    if shape is None:
        return None
    return tuple(
        (d if d else (default_batch if i == 0 else equivalence.DEFAULT_DIM)) for i, d in enumerate(shape)
    )


def _body_inputs(ref, runtime: dict, declared: dict) -> tuple[list[_Input], str]:
    """Specs of the body's own inputs, with shapes from the owner's runtime inputs where known."""
    owner, graph = ref.owner, ref.graph
    sources: dict[int, tuple[str, int | None]] = {}  # body input index -> (owner input, removed axis)
    if owner.op_type == ops.LOOP:
        for k in range(2, len(graph.input)):
            if k < len(owner.input):
                sources[k] = (owner.input[k], None)
    elif owner.op_type == ops.SCAN:
        m = int(_attr(owner, "num_scan_inputs", 0))
        n_state = len(owner.input) - m
        axes = list(_attr(owner, "scan_input_axes", []) or [0] * m)
        for k in range(len(graph.input)):
            if k < n_state:
                sources[k] = (owner.input[k], None)
            elif k - n_state < m:
                sources[k] = (owner.input[k], axes[k - n_state])
    specs = []
    for k, vi in enumerate(graph.input):
        dtype, shape = declared.get(vi.name, (None, None))
        t = vi.type.tensor_type
        if t.elem_type:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type))
            if t.HasField("shape"):
                shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        src = sources.get(k)
        if src is not None and src[0] in runtime:
            value = runtime[src[0]]
            dims = list(value.shape)
            if src[1] is not None:
                del dims[src[1] % max(len(dims), 1)]
            shape, dtype = tuple(dims), value.dtype
        if owner.op_type == ops.LOOP and k < 2:
            shape = ()
        if dtype is None or shape is None:
            return [], f"the shape of body input '{vi.name}' is unknown"
        specs.append(_Input(vi.name, np.dtype(dtype), _concrete(shape)))
    return specs, ""


def _build_body(plan: _Plan, outer: list[str], ref_a, ref_b, original, optimized, runtime, declared) -> None:
    specs, note = _body_inputs(ref_a, runtime, declared)
    if note:
        plan.status, plan.note = UNCHECKED, note
        return
    consts_a = _outer_consts(ref_a.enclosing)
    consts_b = _outer_consts(ref_b.enclosing)
    reads_a, reads_b = set(free_names(ref_a.graph)), set(free_names(ref_b.graph))
    own_names = {s.name for s in specs}
    fixed: dict[str, onnx.TensorProto] = {}  # outer constants of one model, given to both
    for name in outer:
        if name in own_names:
            continue
        const_a, const_b = name in consts_a, name in consts_b
        if const_a or const_b:
            # an outer constant is no probe input: each body that reads it reads a constant, its own
            # model's where that has one (an outer initializer that only the original body reads:
            # the optimized body folded it in and its graph dropped it), else the other's (a value
            # that only one model's enclosing graph holds as a constant)
            if name in reads_a and not const_a or name in reads_b and not const_b:
                fixed[name] = consts_a[name] if const_a else consts_b[name]
                plan.note = _join(plan.note, f"outer value '{name}' held at its constant value in both bodies")
            continue
        value = runtime.get(name)
        if value is not None:
            specs.append(_Input(name, value.dtype, tuple(value.shape), value))
            continue
        dtype, shape = declared.get(name, (None, None))
        if dtype is None or shape is None:
            plan.status, plan.note = UNCHECKED, f"the shape of outer value '{name}' is unknown"
            return
        specs.append(_Input(name, dtype, _concrete(shape)))
    fed = {s.name for s in specs}
    plan.inputs = specs

    def body_model(src, ref, consts):
        g = ref.graph
        reads = free_names(g)
        extra = [consts.get(n, fixed.get(n)) for n in reads if n not in fed and (n in consts or n in fixed)]
        own = {t.name for t in g.initializer}
        inits = [t for t in g.initializer] + [t for t in extra if t.name not in own]
        nodes = list(g.node)
        return _make_model(src, nodes, specs, [o.name for o in g.output], inits)

    plan.model_a = body_model(original, ref_a, consts_a)
    plan.model_b = body_model(optimized, ref_b, consts_b)
    plan.nodes_a, plan.nodes_b = list(ref_a.graph.node), list(ref_b.graph.node)
    if [o.name for o in ref_b.graph.output] != plan.outputs and len(ref_b.graph.output) == len(plan.outputs):
        plan.note = (plan.note + "; " if plan.note else "") + "outputs compared by position"


def _sessions(model_a: onnx.ModelProto, model_b: onnx.ModelProto):
    """Sessions of both models, widened to float32 together when one does not load as it is (or
    reads or writes bfloat16); and whether they were widened."""
    types = equivalence.elem_types(model_a) | equivalence.elem_types(model_b)
    io_types = {vi.type.tensor_type.elem_type for m in (model_a, model_b) for vi in list(m.graph.input) + list(m.graph.output)}
    if onnx.TensorProto.BFLOAT16 not in io_types:
        try:
            sess_a = equivalence.reference_session(model_a)
        except Exception as err:  # noqa: BLE001
            if not types & set(equivalence.WIDENED_TYPES):
                raise _NotRun(f"the original subgraph does not load: {first_line(err)}") from None
        else:
            try:
                return sess_a, equivalence.reference_session(model_b), False
            except Exception as err:  # noqa: BLE001
                if not types & set(equivalence.WIDENED_TYPES):
                    raise _Broken(f"the optimized subgraph does not load: {first_line(err)}") from None
    try:
        sess_a = equivalence.reference_session(equivalence.widen(model_a))
    except Exception as err:  # noqa: BLE001
        raise _NotRun(f"the original subgraph does not load: {first_line(err)}") from None
    try:
        sess_b = equivalence.reference_session(equivalence.widen(model_b))
    except Exception as err:  # noqa: BLE001
        raise _Broken(f"the optimized subgraph does not load: {first_line(err)}") from None
    return sess_a, sess_b, True


class _NotRun(Exception):
    pass


class _Broken(Exception):
    pass


def _spanning(specs: list[_Input]):
    """The zero probe and each basis vector of the float inputs, one by one."""
    for index in range(1 + sum(s.size for s in specs)):
        yield _spanning_label(specs, index), _spanning_probe(specs, index)


def _spanning_probe(specs: list[_Input], index: int) -> dict:
    """Spanning probe ``index``: 0 the zero probe, ``1 + i`` the basis vector ``i`` of the float
    inputs' elements in order."""
    feeds = {s.name: np.zeros(s.shape, dtype=s.dtype) for s in specs}
    index -= 1
    for s in specs:
        if 0 <= index < s.size:
            flat = feeds[s.name].reshape(-1)
            flat[index] = 1
            break
        index -= s.size
    return feeds


class _RunError(Exception):
    def __init__(self, which: str, label: str, err: BaseException):
        super().__init__(f"the {which} subgraph fails on probe '{label}': {first_line(err)}")
        self.which = which


def _pairs(sess_a, sess_b, outs_a, outs_b, probes, prepare):
    """``([label], reference outputs, optimized outputs, False)`` per probe (a block of one)."""
    for label, feeds in probes:
        feeds = prepare(feeds)
        try:
            ref = sess_a.run(outs_a, feeds)
        except Exception as err:  # noqa: BLE001
            raise _RunError("original", label, err) from None
        try:
            got = sess_b.run(outs_b, feeds)
        except Exception as err:  # noqa: BLE001
            raise _RunError("optimized", label, err) from None
        yield [label], ref, got, False


# --------------------------------------------------------------------------------------------
# spanning probes as one batch
# --------------------------------------------------------------------------------------------

#: Elements (inputs, intermediates and outputs together) of one batched run of spanning probes.
BATCH_ELEMENTS = 1 << 22
_BATCH_DIM = "spanning_probe"
_ELEMENTWISE = frozenset({ops.ADD, ops.SUB, ops.MUL, ops.DIV, ops.SUM, ops.MEAN})
_PER_SAMPLE = frozenset({
    ops.CONV, ops.CONV_TRANSPOSE, ops.BATCH_NORM, ops.AVERAGE_POOL, ops.GLOBAL_AVERAGE_POOL, ops.DEPTH_TO_SPACE,
    ops.SPACE_TO_DEPTH, ops.NEG, ops.IDENTITY,
})


def _trace(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """Every main-graph tensor of ``model`` on ``feeds``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    names = [o for n in m.graph.node for o in n.output if o and o not in have]
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    sess = equivalence.reference_session(m)
    out_names = [o.name for o in sess.get_outputs()]
    values = dict(zip(out_names, (np.asarray(v) for v in sess.run(out_names, feeds))))
    values.update(feeds)
    return values


def _axes(node: onnx.NodeProto, values, index: int, rank: int) -> list[int] | None:
    """The ``axes`` of ``node`` (attribute, or input ``index``), normalized for ``rank``."""
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > index and node.input[index]:
        axes = values(node.input[index])
    if axes is None:
        return None
    return [int(a) % rank for a in np.asarray(axes).reshape(-1)]


def batch_reason(model: onnx.ModelProto, inputs: Iterable[str], values: dict[str, np.ndarray]) -> str | None:
    """None when feeding ``model`` (whose ``inputs`` all have a leading dim of 1) a stack of
    probes along that dim computes each probe on its own, as when fed one by one: every op on a
    value that depends on the inputs keeps the leading axis as a batch axis (per-sample ops;
    broadcasts that do not reach it; moves, reshapes, slices, pads, reductions and concatenations
    on other axes). ``values`` holds every tensor of one unbatched run (:func:`_trace`)."""
    consts = {t.name: t for t in model.graph.initializer}

    def value(name: str):
        if name in values:
            return values[name]
        if name in consts:
            return _tensor_proto_array(consts[name])
        return None

    dep = set(inputs)
    for name in dep:
        v = values.get(name)
        if v is None or v.ndim == 0 or v.shape[0] != 1:
            return f"input '{name}' has no leading dim of 1"
    for node in model.graph.node:
        at = [i for i, name in enumerate(node.input) if name in dep]
        inner = [n for _, _, sub in _subgraphs(node) for n in free_names(sub) if n in dep]
        if not at and not inner:
            continue
        op = node.op_type
        where = f"{op} '{node.name or node.output[0]}'"
        outs = [values.get(o) for o in node.output if o]
        if inner or any(o is None or o.ndim == 0 or o.shape[0] != 1 for o in outs):
            return f"{where} has no leading batch axis"
        ins = [value(name) if name else None for name in node.input]
        rank = outs[0].ndim
        if op in _ELEMENTWISE:
            for i, v in enumerate(ins):
                if v is not None and (v.ndim > rank or (i in at and v.ndim != rank)):
                    return f"{where} broadcasts across the leading axis"
        elif op in _PER_SAMPLE:
            pass
        elif op == ops.TRANSPOSE:
            perm = _attr(node, "perm")
            if perm is None or perm[0] != 0:
                return f"{where} moves the leading axis"
        elif op == ops.RESHAPE:
            shape = [int(d) for d in np.asarray(ins[1]).reshape(-1)]
            if not shape or not (shape[0] == 0 and not _attr(node, "allowzero", 0) or shape[0] == -1 and -1 not in shape[1:]):
                return f"{where} does not keep the leading axis"
        elif op == ops.FLATTEN:
            if int(_attr(node, "axis", 1)) % max(ins[0].ndim, 1) == 0 and ins[0].ndim:
                return f"{where} flattens the leading axis"
        elif op in (ops.SQUEEZE, ops.REDUCE_SUM, ops.REDUCE_MEAN, ops.SLICE):
            index = 3 if op == ops.SLICE else 1
            axes = _axes(node, value, index, ins[0].ndim)
            if axes is None or 0 in axes:
                return f"{where} acts on the leading axis"
        elif op == ops.UNSQUEEZE:
            axes = _axes(node, value, 1, rank)
            if axes is None or 0 in axes:
                return f"{where} inserts a leading axis"
        elif op in (ops.CONCAT, ops.SPLIT, ops.GATHER):
            if int(_attr(node, "axis", 0)) % ins[0].ndim == 0:
                return f"{where} acts on the leading axis"
        elif op == ops.PAD:
            pads = _attr(node, "pads")
            if pads is None and len(ins) > 1:
                pads = ins[1]
            r = ins[0].ndim
            pads = [int(p) for p in np.asarray(pads).reshape(-1)] if pads is not None else None
            if pads is None or (len(node.input) > 3 and node.input[3]) or len(pads) != 2 * r or pads[0] or pads[r]:
                return f"{where} pads the leading axis"
        elif op == ops.GEMM:
            if at != [0] or _attr(node, "transA", 0):
                return f"{where} does not keep the leading axis"
        elif op == ops.MATMUL:
            other = ins[1]
            if at != [0] or ins[0].ndim < 2 or other is None or not (other.ndim <= 2 or other.ndim == ins[0].ndim and other.shape[0] == 1):
                return f"{where} does not keep the leading axis"
        elif op == ops.EXPAND:
            shape = [int(d) for d in np.asarray(ins[1]).reshape(-1)]
            if len(shape) > ins[0].ndim or (len(shape) == ins[0].ndim and shape[0] != 1):
                return f"{where} expands the leading axis"
        elif op == ops.TILE:
            if int(np.asarray(ins[1]).reshape(-1)[0]) != 1:
                return f"{where} tiles the leading axis"
        else:
            return f"{where} is not known to keep the leading axis"
        dep.update(o for o in node.output if o)
    missing = [o.name for o in model.graph.output if o.name not in dep]
    if missing:
        return f"output '{missing[0]}' does not depend on the inputs"
    return None


def _batched(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        dim = vi.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = _BATCH_DIM
    return m


def _spanning_batches(specs: list[_Input], chunk: int):
    """``(first probe index, feeds)`` for the zero probe and every basis vector, ``chunk`` at a
    time stacked along the leading axis."""
    total = 1 + sum(s.size for s in specs)
    offsets, o = {}, 0
    for s in specs:
        offsets[s.name] = o
        o += s.size
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        rows = np.arange(start, stop)
        feeds = {}
        for s in specs:
            flat = np.zeros((stop - start, s.size), dtype=s.dtype)
            g = rows - 1 - offsets[s.name]
            hit = (g >= 0) & (g < s.size)
            flat[np.nonzero(hit)[0], g[hit]] = 1
            feeds[s.name] = flat.reshape((stop - start,) + tuple(s.shape[1:]))
        yield start, feeds


def _spanning_label(specs: list[_Input], index: int) -> str:
    if index == 0:
        return "zeros (spanning)"
    index -= 1
    for s in specs:
        if index < s.size:
            return f"basis {s.name}[{index}]"
        index -= s.size
    return f"basis {index}"


def _spanning_pairs(plan: _Plan, traces, sess_a, sess_b, outs_a, outs_b, prepare, close) -> tuple[object, str]:
    """The spanning probes' ``(label, ref, got)``, stacked into batches where both subgraphs keep
    the leading axis apart (checked on the ops, then on three probes against single runs), else
    one by one; and a note on how."""
    specs = plan.inputs
    singles = _pairs(sess_a, sess_b, outs_a, outs_b, _spanning(specs), prepare)
    if plan.widened or traces is None:
        return singles, ""
    names = [s.name for s in specs]
    why = batch_reason(plan.model_a, names, traces[0]) or batch_reason(plan.model_b, names, traces[1])
    if why:
        return singles, f"spanning probes one by one: {why}"
    try:
        batch_a = equivalence.reference_session(_batched(plan.model_a))
        batch_b = equivalence.reference_session(_batched(plan.model_b))
    except Exception as err:  # noqa: BLE001
        return singles, f"spanning probes one by one: {first_line(err)}"
    per_row = max(1, sum(v.size for t in traces for v in t.values()))
    chunk = max(1, BATCH_ELEMENTS // per_row)
    total = 1 + sum(s.size for s in specs)
    # the batched runs must agree with single runs (first, second and last probe)
    checks = {}
    try:
        for i in {0, min(1, total - 1), total - 1}:
            feeds = _spanning_probe(specs, i)
            checks[i] = (sess_a.run(outs_a, feeds), sess_b.run(outs_b, feeds))
    except Exception:  # noqa: BLE001 - the single runs report it
        return singles, ""

    def gen():
        for start, feeds in _spanning_batches(specs, chunk):
            try:
                ref = [np.asarray(x) for x in batch_a.run(outs_a, feeds)]
                got = [np.asarray(x) for x in batch_b.run(outs_b, feeds)]
            except Exception:  # noqa: BLE001 - a batch that does not run: the single runs decide
                raise _BatchMismatch() from None
            rows = len(next(iter(feeds.values())))
            if any(x.ndim == 0 or x.shape[0] != rows for x in ref + got):
                raise _BatchMismatch()
            for index, (one_ref, one_got) in checks.items():
                if start <= index < start + rows:
                    r = index - start
                    pairs = zip(one_ref + one_got, [x[r : r + 1] for x in ref + got])
                    if not all(close(x, y) for x, y in pairs):
                        raise _BatchMismatch()
            yield [_spanning_label(specs, i) for i in range(start, start + rows)], ref, got, True

    return gen(), f"spanning probes in batches of {min(chunk, total)}"


class _BatchMismatch(Exception):
    pass


def _check(plan: _Plan, max_proof_elems: int, max_proof_macs: float, rtol, atol, kinds, seeds) -> RegionCheck:
    names = [s.name for s in plan.inputs]
    result = RegionCheck(plan.key, plan.scope, plan.outputs, names, True, False, "", 0, 0.0, 0.0, plan.note)
    result.candidates = list(plan.candidates)
    if plan.status:
        result.status = plan.status
        result.method = plan.status
        result.ok = plan.status == SUPERSEDED
        return result
    try:
        sess_a, sess_b, plan.widened = _sessions(plan.model_a, plan.model_b)
    except _NotRun as err:
        result.status, result.method, result.ok = UNCHECKED, UNCHECKED, False
        result.note = _join(plan.note, str(err))
        return result
    except _Broken as err:
        result.status, result.method, result.ok = DIFFERS, "load", False
        result.max_abs_error = result.max_rel_error = float("inf")
        result.note = _join(plan.note, str(err))
        return result
    inner = equivalence.elem_types(plan.model_a, io=False) | equivalence.elem_types(plan.model_b, io=False)
    floor = max((equivalence.rtol_for(t) for k, t in _LOW.items() if k in inner), default=0.0)
    if plan.widened:
        plan.note = _join(plan.note, "compared widened to float32")
    outs_a = [o.name for o in sess_a.get_outputs()]
    outs_b = [o.name for o in sess_b.get_outputs()]
    if len(outs_a) != len(outs_b):
        result.status, result.ok, result.method = DIFFERS, False, "outputs"
        result.note = _join(plan.note, f"{len(outs_b)} outputs instead of {len(outs_a)}")
        return result

    def tolerance(dtype):
        tol = _rtol(dtype, floor)
        return rtol if tol is not None and rtol is not None else tol

    def prepare(feeds):
        return {k: equivalence._widen_array(v) for k, v in feeds.items()} if plan.widened else feeds

    def close(x, y):
        x = np.asarray(x)
        return compare_arrays(x, np.asarray(y), tolerance(x.dtype), atol).ok

    floats = all(s.floating for s in plan.inputs) and plan.inputs
    n = sum(s.size for s in plan.inputs)
    traces = None
    if floats and n <= max_proof_elems:
        reason = affine_reason(plan.nodes_a, names) or affine_reason(plan.nodes_b, names)
        if reason is None and not plan.widened:
            try:
                zero = {s.name: np.zeros(s.shape, dtype=s.dtype) for s in plan.inputs}
                traces = [_trace(plan.model_a, zero), _trace(plan.model_b, zero)]
            except Exception:  # noqa: BLE001 - the probes report it
                traces = None
            if traces is not None:
                macs = sum(
                    model_cost(m, {k: tuple(v.shape) for k, v in t.items()}).macs
                    for m, t in zip((plan.model_a, plan.model_b), traces)
                )
                if (n + 1) * macs > max_proof_macs:
                    reason = f"{n + 1} spanning probes x {macs:.3g} MACs > {max_proof_macs:.3g}"
    else:
        reason = "integer or bool inputs" if not floats else f"{n} input elements > {max_proof_elems}"
    spanning = reason is None
    others = _pairs(sess_a, sess_b, outs_a, outs_b, probe_sets(plan.inputs, kinds, seeds), prepare)
    how = ""
    count = spanned = 0
    worst_label = ""

    def compare(block, spanning_block: bool):
        """None, or the RegionCheck of the first difference in ``block``; a difference found in a
        batch is confirmed on a single run of that probe (else the batch is not trusted)."""
        nonlocal count, spanned, worst_label
        labels, ref, got, rows = block
        dense = not spanning_block and not labels[0].startswith("border")
        diffs_per_output = []
        for r, g in zip(ref, got):
            r, g = np.asarray(r), np.asarray(g)
            tol = tolerance(r.dtype)
            diffs_per_output.append(compare_rows(r, g, tol, atol) if rows else [compare_arrays(r, g, tol, atol, dense)])
        if rows:
            bad = [i for diffs in diffs_per_output for i, d in enumerate(diffs) if not d.ok]
            if bad:
                feeds = prepare(_spanning_probe(plan.inputs, count + min(bad)))
                single = (sess_a.run(outs_a, feeds), sess_b.run(outs_b, feeds))
                if all(close(x, y) for x, y in zip(*single)):
                    raise _BatchMismatch()
        for i, label in enumerate(labels):
            count += 1
            spanned += spanning_block
            for out_name, diffs in zip(plan.outputs or outs_a, diffs_per_output):
                diff = diffs[i]
                if diff.rel_error > result.max_rel_error:
                    worst_label = label
                result.max_abs_error = max(result.max_abs_error, diff.abs_error)
                result.max_rel_error = max(result.max_rel_error, diff.rel_error)
                if not diff.ok:
                    detail = f": {diff.reason}" if diff.reason else (
                        f": max error {diff.abs_error:.3g} ({diff.rel_error:.3g} of the output's magnitude)"
                    )
                    return _differs(result, plan, count, f"output '{out_name}' differs on probe '{label}'{detail}")
        return None

    try:
        if spanning:
            first, how = _spanning_pairs(plan, traces, sess_a, sess_b, outs_a, outs_b, prepare, close)
            try:
                for block in first:
                    failed = compare(block, True)
                    if failed:
                        return failed
            except _BatchMismatch:
                # the batched runs disagree with single runs: every spanning probe one by one
                count = spanned = 0
                result.max_abs_error = result.max_rel_error = 0.0
                how = "spanning probes one by one: batched runs fail or disagree with single runs"
                for block in _pairs(sess_a, sess_b, outs_a, outs_b, _spanning(plan.inputs), prepare):
                    failed = compare(block, True)
                    if failed:
                        return failed
        for block in others:
            failed = compare(block, False)
            if failed:
                return failed
    except _RunError as err:
        if err.which == "original":
            result.status, result.method, result.ok = UNCHECKED, UNCHECKED, False
            result.note = _join(plan.note, str(err))
            result.probes = count
            return result
        return _differs(result, plan, count + 1, str(err))
    result.probes = count
    result.status = EQUAL
    if spanning:
        result.proven = True
        result.method = f"spanning probes ({spanned})"
        result.note = _join(plan.note, f"affine: equal on {spanned} spanning probes and {count - spanned} others", how)
    else:
        result.method = f"probes ({count})"
        result.note = _join(plan.note, f"not proven: {reason}")
    if worst_label:
        result.note = _join(result.note, f"largest relative error on probe '{worst_label}'")
    return result


def _differs(result: RegionCheck, plan: _Plan, count: int, why: str) -> RegionCheck:
    result.status, result.ok, result.probes = DIFFERS, False, count
    result.method = f"probes ({count})"
    result.note = _join(plan.note, why)
    if result.max_abs_error == 0:
        result.max_abs_error = result.max_rel_error = float("inf")
    return result


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)
