"""Generic cleanup of an optimized model, so that its output needs no second tool:

* ``constants``     Constant nodes (``value``, ``value_float(s)``, ``value_int(s)``,
                    ``value_string(s)``) become initializers of the same name;
* ``identities``    Identity nodes are removed: their readers read the Identity's input instead;
                    an Identity that computes a graph output gives its name to its input instead
                    (the graph output keeps its name), where the input is computed by a node or is
                    an initializer that is no graph input or output;
* ``shared``        initializers equal in type, shape and bytes are shared (the first one kept);
* ``initializers``  initializers that nothing reads are dropped;
* ``value_info``    value_info entries of tensors that no node computes any more are dropped.

Only the main graph is changed, and Constant nodes stay in models of IR version 3 or older
(where every initializer is also a graph input). If / Loop / Scan bodies are left as they are, and no name that a
body reads from the enclosing graph is renamed, removed or redirected (a Constant node's output
becomes an initializer of the same name, which a body still sees). Graph inputs, graph outputs
and their names are never touched; initializers that are graph inputs (defaults a caller may
override) are not shared or dropped. Local functions are kept verbatim.

Every step is exact: nothing is computed, only names and storage change. :func:`cleanup` works on
the model in place and returns the counts of what it did.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Iterable

import onnx
from onnx import helper

from . import io, ops

#: The counts that :func:`cleanup` reports.
STEPS = ("constants", "identities", "shared", "initializers", "value_info")

_HASH_CHUNK = 1 << 24

#: The IR version from which an initializer need not be listed among the graph inputs.
_IR_INITIALIZERS_WITHOUT_INPUTS = 4


def _default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ops.DEFAULT_DOMAINS


def _body_names(graph: onnx.GraphProto) -> set[str]:
    """Every name that a node of an If / Loop / Scan body of ``graph`` (at any depth) reads or
    writes, and the bodies' own input, output and initializer names: a superset of what the
    bodies read from the enclosing graph."""
    names: set[str] = set()

    def visit(g: onnx.GraphProto) -> None:
        names.update(i.name for i in g.input)
        names.update(o.name for o in g.output)
        names.update(t.name for t in g.initializer)
        for node in g.node:
            names.update(node.input)
            names.update(node.output)
            for body in _node_bodies(node):
                visit(body)

    for node in graph.node:
        for body in _node_bodies(node):
            visit(body)
    names.discard("")
    return names


def _node_bodies(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The value of a Constant node as a TensorProto named after its output, or None (a sparse
    value, or no value attribute)."""
    if len(node.attribute) != 1 or len(node.output) != 1:
        return None
    attr = node.attribute[0]
    name = node.output[0]
    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
        tensor.name = name
        return tensor
    if attr.name == "value_float":
        return helper.make_tensor(name, onnx.TensorProto.FLOAT, [], [attr.f])
    if attr.name == "value_floats":
        return helper.make_tensor(name, onnx.TensorProto.FLOAT, [len(attr.floats)], list(attr.floats))
    if attr.name == "value_int":
        return helper.make_tensor(name, onnx.TensorProto.INT64, [], [attr.i])
    if attr.name == "value_ints":
        return helper.make_tensor(name, onnx.TensorProto.INT64, [len(attr.ints)], list(attr.ints))
    if attr.name == "value_string":
        return helper.make_tensor(name, onnx.TensorProto.STRING, [], [attr.s])
    if attr.name == "value_strings":
        return helper.make_tensor(name, onnx.TensorProto.STRING, [len(attr.strings)], list(attr.strings))
    return None


def _rename_inputs(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every main-graph node input named ``old`` reads ``new`` instead."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _content_key(tensor: onnx.TensorProto) -> tuple | None:
    """What makes two initializers interchangeable: type, shape and a digest of the data (None
    for a tensor whose data is in an external file, which is never shared)."""
    source = io.lazy_source(tensor)
    if source is None and tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    digest = hashlib.sha256()
    if source is not None:
        digest.update(b"raw")
        with open(source.path, "rb") as f:
            f.seek(source.offset)
            left = source.length
            while left:
                block = f.read(min(left, _HASH_CHUNK))
                if not block:
                    return None
                digest.update(block)
                left -= len(block)
    elif tensor.HasField("raw_data"):
        digest.update(b"raw")
        digest.update(tensor.raw_data)
    else:
        # typed fields (float_data, int64_data, string_data, ...): the tensor without its name
        copy = io._copy_fields(tensor, onnx.TensorProto(), ("name", "doc_string"))  # noqa: SLF001
        digest.update(b"typed")
        digest.update(copy.SerializeToString(deterministic=True))
    return tensor.data_type, tuple(tensor.dims), digest.hexdigest()


def _same_data(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    """Byte for byte equal data (after equal digests: no collision is trusted)."""
    def data(t: onnx.TensorProto) -> bytes:
        source = io.lazy_source(t)
        if source is not None:
            return io.read_source(source)
        if t.HasField("raw_data"):
            return t.raw_data
        return io._copy_fields(t, onnx.TensorProto(), ("name", "doc_string")).SerializeToString(deterministic=True)  # noqa: SLF001

    return data(a) == data(b)


def cleanup(model: onnx.ModelProto) -> dict[str, int]:
    """Clean ``model``'s main graph in place (module docstring); returns how many Constant nodes
    became initializers, Identity nodes were removed, initializers were shared and dropped, and
    value_info entries were dropped."""
    counts = dict.fromkeys(STEPS, 0)
    graph = model.graph
    body = _body_names(graph)
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}

    # Constant nodes -> initializers (from IR version 4 on: before it, every initializer must also
    # be a graph input, which a caller could then feed)
    constants: list[int] = []
    for index, node in enumerate(graph.node):
        if model.ir_version < _IR_INITIALIZERS_WITHOUT_INPUTS:
            break
        if node.op_type == ops.CONSTANT and _default_domain(node) and node.output and node.output[0] and node.output[0] not in outputs:
            tensor = _constant_tensor(node)
            if tensor is not None:
                graph.initializer.append(tensor)
                constants.append(index)
    _delete(graph.node, constants)
    counts["constants"] = len(constants)

    # Identity nodes
    initializers = {t.name: t for t in graph.initializer}
    removed: list[int] = []
    for index, node in enumerate(graph.node):
        if node.op_type != ops.IDENTITY or not _default_domain(node) or len(node.input) != 1 or len(node.output) != 1:
            continue
        src, dst = node.input[0], node.output[0]
        if not src or dst in body:
            continue
        if dst not in outputs:
            _rename_inputs(graph, dst, src)
        else:
            # the graph output keeps its name: the Identity's input takes it
            if src in inputs or src in outputs or src in body:
                continue
            producer = next((n for n in graph.node if src in n.output), None)
            if producer is not None:
                producer.output[list(producer.output).index(src)] = dst
            elif src in initializers:
                initializers[src].name = dst
                initializers[dst] = initializers.pop(src)
            else:
                continue
            _rename_inputs(graph, src, dst)
        removed.append(index)
    _delete(graph.node, removed)
    counts["identities"] = len(removed)

    # duplicate initializers shared
    groups: dict[tuple, list[onnx.TensorProto]] = defaultdict(list)
    by_shape: dict[tuple, list[onnx.TensorProto]] = defaultdict(list)
    for t in graph.initializer:
        if t.name in inputs or t.name in outputs or t.name in body:
            continue
        by_shape[(t.data_type, tuple(t.dims))].append(t)
    for candidates in by_shape.values():
        if len(candidates) < 2:
            continue
        for t in candidates:
            key = _content_key(t)
            if key is not None:
                groups[key].append(t)
    for members in groups.values():
        first = members[0]
        for other in members[1:]:
            if _same_data(first, other):
                _rename_inputs(graph, other.name, first.name)
                counts["shared"] += 1

    # unused initializers
    read = {name for node in graph.node for name in node.input} | outputs | inputs | body
    unused = [i for i, t in enumerate(graph.initializer) if t.name not in read]
    _delete(graph.initializer, unused)
    counts["initializers"] = len(unused)

    # value_info of tensors no node computes any more
    computed = {name for node in graph.node for name in node.output}
    stale = [i for i, vi in enumerate(graph.value_info) if vi.name not in computed or vi.name in outputs]
    _delete(graph.value_info, stale)
    counts["value_info"] = len(stale)
    return counts


def _delete(field, indices: list[int]) -> None:
    """Delete the elements at ``indices`` of a repeated field in place (the others are not
    copied: large raw data stays where it is)."""
    for i in sorted(indices, reverse=True):
        del field[i]


def histogram_of(model: onnx.ModelProto) -> dict[str, int]:
    """Constant and Identity nodes left in the main graph (what :func:`cleanup` removes)."""
    counts = {ops.CONSTANT: 0, ops.IDENTITY: 0}
    for node in model.graph.node:
        if node.op_type in counts and _default_domain(node):
            counts[node.op_type] += 1
    return counts

