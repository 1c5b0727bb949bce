"""Subgraph bodies (If branches, Loop and Scan bodies) as graphs of their own for the passes.

A body is optimized like the main graph, with what it reads from the enclosing scopes held opaque:

* its own inputs (Loop iteration count, condition and carried values, Scan slices) are graph inputs,
  never constants;
* a value it reads from an enclosing scope is, while the body is optimized, replaced by a stand-in
  tensor of the same name with no producer (:class:`Isolation`): no pass sees, folds or moves the
  outer node that computes it (a Constant node's value included), and no pattern can end in it.
  Outer initializers stay constants, unless they are also graph inputs;
* its outputs are its graph outputs and keep their names, like the main graph's;
* node and tensor names come from one allocator for the whole model.

The enclosing graphs, in turn, count every value a body reads as escaping (``GraphView.escapes``):
they never fold it away. After export, initializers of an enclosing graph that the exporter copied
into a body go back where they were (:func:`restore_outer_initializers`).

Shapes and types of body tensors come from the shape evidence of the whole model
(:func:`onnxrep.cost.infer_evidence`: onnx inference without declared intermediate shapes, which
gives a Loop's carried values their element type only, since their shapes may change between
iterations; pool shapes by onnxruntime's formula), gathered per body (:func:`body_types`), on top
of the enclosing scope's.
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .cost import infer_evidence


@dataclass
class Body:
    """A subgraph ``graph`` held in attribute ``attr`` of ``owner``; ``label`` names it across the
    model (``owner.attr``, nested bodies joined with ``/``), and stays the same between runs."""

    graph: gs.Graph
    owner: gs.Node
    attr: str
    label: str
    parent: gs.Graph  # the graph that holds ``owner``


def subgraphs(node: gs.Node) -> Iterator[tuple[str, int | None, gs.Graph]]:
    """``(attribute, index in a GRAPHS list or None, graph)`` for each subgraph of ``node``."""
    for attr, value in node.attrs.items():
        if isinstance(value, gs.Graph):
            yield attr, None, value
        elif isinstance(value, list):
            for i, sub in enumerate(value):
                if isinstance(sub, gs.Graph):
                    yield attr, i, sub


def has_subgraphs(graph: gs.Graph) -> bool:
    return any(True for node in graph.nodes for _ in subgraphs(node))


def bodies(graph: gs.Graph, labels: dict[int, str], prefix: str = "") -> list[Body]:
    """Every body nested in ``graph``, each before the bodies nested in it. ``labels`` (by id of the
    body) holds the names given at import; a body made later gets one from its owner's name."""
    out: list[Body] = []
    for node in graph.nodes:
        for attr, index, sub in subgraphs(node):
            label = labels.get(id(sub)) or _label(prefix, node.name or node.op, attr, index)
            out.append(Body(sub, node, attr, label, graph))
            out.extend(bodies(sub, labels, label + "/"))
    return out


def _label(prefix: str, owner: str, attr: str, index: int | None) -> str:
    return f"{prefix}{owner}.{attr}" + ("" if index is None else f"[{index}]")


def walk(graph: gs.Graph) -> Iterator[gs.Graph]:
    """``graph`` and every graph nested in it."""
    yield graph
    for node in graph.nodes:
        for _, _, sub in subgraphs(node):
            yield from walk(sub)


# --------------------------------------------------------------------------------------------
# shapes and types of body tensors
# --------------------------------------------------------------------------------------------


@dataclass
class BodyTypes:
    label: str
    shapes: dict[str, tuple]
    dtypes: dict[str, np.dtype]
    initializers: frozenset  # names of the initializers the body itself holds in the input model


def body_types(model: onnx.ModelProto, graph: gs.Graph, evidence=None) -> dict[int, BodyTypes]:
    """Shapes and element types of the tensors of every body of ``graph`` (just imported from
    ``model``, so its nodes are in the model's order), by id of the body graph; with each body's
    label. They come from :func:`onnxrep.cost.infer_evidence` (``evidence``, or computed here
    without running the model): onnx inference without the declared ``value_info`` and output
    shapes, pool shapes by onnxruntime's formula, and unknown wherever they follow from a shape
    that was corrected (in the body or in an enclosing graph)."""
    if evidence is None:
        evidence = infer_evidence(model, runtime=False)
    out: dict[int, BodyTypes] = {}
    _collect(model.graph, graph, "", out, set(), evidence.bodies, ())
    return out


def _collect(proto: onnx.GraphProto, graph: gs.Graph, prefix: str, out: dict[int, BodyTypes], used: set[str],
             settled: dict, path: tuple) -> None:
    if len(proto.node) != len(graph.nodes):
        return
    for index, (pnode, node) in enumerate(zip(proto.node, graph.nodes)):
        if pnode.op_type != node.op:
            return
        for attr in pnode.attribute:
            value = node.attrs.get(attr.name)
            if attr.type == onnx.AttributeProto.GRAPH and isinstance(value, gs.Graph):
                pairs = [(None, attr.g, value)]
            elif attr.type == onnx.AttributeProto.GRAPHS and isinstance(value, list):
                pairs = list(zip(range(len(value)), attr.graphs, value))
            else:
                continue
            for i, sub_proto, sub in pairs:
                label = base = _label(prefix, node.name or node.op, attr.name, i)
                k = 1
                while label in used:  # owners without a (unique) name
                    k += 1
                    label = f"{base}#{k}"
                used.add(label)
                key = path + ((index, attr.name, i),)
                shapes, dtypes = settled.get(key, ({}, {}))
                inits = frozenset(t.name for t in sub_proto.initializer)
                out[id(sub)] = BodyTypes(label, dict(shapes), dict(dtypes), inits)
                _collect(sub_proto, sub, label + "/", out, used, settled, key)


def scoped(own: dict, outer) -> ChainMap:
    """A body's view of a name -> value map: its own entries over the enclosing scope's; new
    entries go to its own."""
    return ChainMap(own, outer)


# --------------------------------------------------------------------------------------------
# isolating a body from its enclosing scopes
# --------------------------------------------------------------------------------------------


def local_tensors(body: gs.Graph) -> set[int]:
    """Ids of the tensors defined inside ``body``: its inputs and node outputs, nested bodies'
    included."""
    ids: set[int] = set()
    for g in walk(body):
        ids.update(id(t) for t in g.inputs)
        for node in g.nodes:
            ids.update(id(t) for t in node.outputs)
    return ids


def outer_reads(body: gs.Graph) -> list[gs.Variable]:
    """Values (not constants) that ``body`` or a body nested in it reads from enclosing scopes."""
    local = local_tensors(body)
    seen: dict[int, gs.Variable] = {}
    for g in walk(body):
        for t in [t for node in g.nodes for t in node.inputs] + list(g.outputs):
            if isinstance(t, gs.Variable) and t.name and id(t) not in local:
                seen.setdefault(id(t), t)
    return list(seen.values())


class Isolation:
    """Stand-ins for the outer values a body reads, swapped in by :meth:`enter` and back by
    :meth:`leave` (in nodes the passes added meanwhile too)."""

    def __init__(self, body: gs.Graph):
        self.body = body
        self.stand_in: dict[int, gs.Variable] = {}
        self.original: dict[int, gs.Variable] = {}
        for t in outer_reads(body):
            proxy = gs.Variable(t.name, dtype=t.dtype, shape=t.shape)
            self.stand_in[id(t)] = proxy
            self.original[id(proxy)] = t

    def enter(self) -> None:
        _swap(self.body, self.stand_in)

    def leave(self) -> None:
        _swap(self.body, self.original)


def _swap(body: gs.Graph, mapping: dict[int, gs.Variable]) -> None:
    if not mapping:
        return
    for g in walk(body):
        for node in g.nodes:
            for i, t in enumerate(node.inputs):
                if t is not None and id(t) in mapping:
                    node.inputs[i] = mapping[id(t)]
        for i, t in enumerate(g.outputs):
            if id(t) in mapping:
                g.outputs[i] = mapping[id(t)]


# --------------------------------------------------------------------------------------------
# outer initializers back where they were
# --------------------------------------------------------------------------------------------


def restore_outer_initializers(
    model: onnx.ModelProto, graph: gs.Graph, main_initializers: frozenset, types: dict[int, BodyTypes]
) -> None:
    """Undo a side effect of exporting: graphsurgeon writes every constant a body reads into that
    body's initializers, so an initializer of an enclosing graph that a body reads is copied into
    the body (once per body that reads it). Each such copy is removed again (in place) and the
    initializer is kept in the graph that held it in the input model, as one tensor.

    ``model`` was exported from ``graph``; ``types`` (from :func:`body_types`) tells which names each
    body held itself. A name a body held itself (shadowing an outer one) stays where it is."""
    _restore(model.graph, graph, [(model.graph, main_initializers)], types)


def _restore(proto: onnx.GraphProto, graph: gs.Graph, chain: list, types: dict[int, BodyTypes]) -> None:
    if len(proto.node) != len(graph.nodes):
        return
    for pnode, node in zip(proto.node, graph.nodes):
        for attr in pnode.attribute:
            value = node.attrs.get(attr.name)
            if attr.type == onnx.AttributeProto.GRAPH and isinstance(value, gs.Graph):
                pairs = [(attr.g, value)]
            elif attr.type == onnx.AttributeProto.GRAPHS and isinstance(value, list):
                pairs = list(zip(attr.graphs, value))
            else:
                continue
            for sub_proto, sub in pairs:
                known = types.get(id(sub))
                own = known.initializers if known is not None else None
                if own is not None:
                    _hoist(sub_proto, own, chain)
                _restore(sub_proto, sub, chain + [(sub_proto, own or frozenset())], types)


def _hoist(body: onnx.GraphProto, own: frozenset, chain: list) -> None:
    for index in reversed(range(len(body.initializer))):
        init = body.initializer[index]
        if init.name in own:
            continue
        home = next((g for g, names in reversed(chain) if init.name in names), None)
        if home is None:  # made by a rewrite in this body, or a constant the body computes
            continue
        if not any(i.name == init.name for i in home.initializer):
            home.initializer.add().CopyFrom(init)
        del body.initializer[index]
