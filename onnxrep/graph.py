"""A thin read-only view over an onnx-graphsurgeon graph, and the model import/export around it.

Passes see the graph only through :class:`GraphView`: producers and users of a tensor with Identity
nodes looked through, constants whether they come from initializers or Constant nodes, and the
"used only here" checks that exactness needs. Only the engine mutates the graph.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict, defaultdict
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from . import io, ops

@contextmanager
def quiet_graphsurgeon() -> Iterator[None]:
    """onnx-graphsurgeon's warnings (its own logger and the ``onnx_graphsurgeon`` logging logger)
    silenced for the duration, then both set back as they were: importing onnxrep changes no
    logger, and a caller's settings hold outside onnxrep's calls."""
    std = logging.getLogger("onnx_graphsurgeon")
    level, severity = std.level, gs.logger.G_LOGGER.severity
    if severity < gs.logger.G_LOGGER.ERROR:
        gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    if level < logging.ERROR:
        std.setLevel(logging.ERROR)
    try:
        yield
    finally:
        if gs.logger.G_LOGGER.severity != severity:
            gs.logger.G_LOGGER.severity = severity
        if std.level != level:
            std.setLevel(level)


def import_model(model: onnx.ModelProto) -> gs.Graph:
    """Import a model into a graphsurgeon graph (constant values are loaded lazily).

    The graph's constants refer to the model's own TensorProtos, and graphsurgeon writes a
    constant's name into its TensorProto whenever it exports the node or subgraph that holds it
    (a Constant node's ``value`` without a name gets ``name: ""``). The names of those TensorProtos
    are put back by :func:`export_model`, and when the graph is freed, so that ``model`` stays as
    it was, byte for byte."""
    with quiet_graphsurgeon():
        graph = gs.import_onnx(model)
    names = _tensor_names(model.graph)
    graph._onnxrep_names = names  # noqa: SLF001 - read by export_model
    weakref.finalize(graph, _restore_names, names)
    return graph


def _tensor_names(graph: onnx.GraphProto, records: list | None = None, body: bool = False) -> list:
    """``(proto, had a name, name)`` for every TensorProto graphsurgeon may rename: tensors held
    in node attributes at any depth, and the initializers of subgraphs."""
    records = [] if records is None else records
    if body:
        records.extend((t, t.HasField("name"), t.name) for t in graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                records.append((attr.t, attr.t.HasField("name"), attr.t.name))
            records.extend((t, t.HasField("name"), t.name) for t in attr.tensors)
            if attr.HasField("g"):
                _tensor_names(attr.g, records, True)
            for sub in attr.graphs:
                _tensor_names(sub, records, True)
    return records


def _restore_names(records: list) -> None:
    for proto, had, name in records:
        if had:
            if proto.name != name:
                proto.name = name
        elif proto.HasField("name"):
            proto.ClearField("name")


def export_model(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """Write ``graph`` back into a model shaped like ``original``.

    Model fields (IR version, opsets, producer, doc strings, metadata, functions), the graph's inputs,
    outputs and name come verbatim from ``original``: the engine never changes them, and symbolic
    dims stay as they were. Nodes come from the graph; initializers that were not rewritten are the
    original TensorProtos (no decoding), new ones are written straight from their arrays; value_info
    is kept for the tensors that still exist.
    """
    model = onnx.ModelProto()
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, name, getattr(original, name))
    model.opset_import.extend(original.opset_import)
    model.metadata_props.extend(original.metadata_props)
    model.functions.extend(original.functions)
    g, og = model.graph, original.graph
    g.name, g.doc_string = og.name, og.doc_string
    g.input.extend(og.input)
    g.output.extend(og.output)
    with quiet_graphsurgeon():
        g.node.extend(OnnxExporter.export_node(node) for node in graph.nodes)
    tensors = graph.tensors()
    for tensor in tensors.values():
        if not isinstance(tensor, gs.Constant):
            continue
        values = tensor._values
        if isinstance(values, gs.ir.tensor.SparseValues):
            g.sparse_initializer.add().CopyFrom(values.tensor)
        elif isinstance(values, gs.ir.tensor.LazyValues):
            g.initializer.add().CopyFrom(values.tensor)  # a deep copy, much faster than append
            g.initializer[-1].name = tensor.name
        else:
            proto = g.initializer.add()
            _write_array(proto, tensor.name, np.asarray(values))
            # the graph now reads these values from the new model: the array can be freed as soon
            # as nothing else holds it, instead of living as long as the graph
            tensor._values = gs.ir.tensor.LazyValues(proto)
            del values
    g.value_info.extend(vi for vi in og.value_info if isinstance(tensors.get(vi.name), gs.Variable))
    _restore_names(getattr(graph, "_onnxrep_names", ()))
    return model


def _write_array(proto: onnx.TensorProto, name: str, array: np.ndarray) -> None:
    """Fill ``proto`` from ``array`` with a single copy of the data (little-endian raw bytes)."""
    plain = array.dtype.kind in "fiub" and array.dtype.isnative and np.little_endian
    if plain:
        proto.name = name
        proto.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        proto.dims.extend(array.shape)
        # raw_data parsed from a numpy buffer holding the encoded field: one copy into the model
        # (``tobytes`` would make a second, and in memory that numpy does not back with huge pages)
        head = io.field_header(io.RAW_DATA_FIELD, array.nbytes)
        field = np.empty(len(head) + array.nbytes, np.uint8)
        field[: len(head)] = np.frombuffer(head, np.uint8)
        field[len(head):] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        proto.MergeFromString(memoryview(field))
    else:  # bfloat16, float8 and friends: let onnx encode them
        proto.CopyFrom(numpy_helper.from_array(array, name))


def finalize(graph: gs.Graph) -> None:
    """Remove dead nodes and tensors, and sort the nodes topologically."""
    with quiet_graphsurgeon():
        graph.cleanup(remove_unused_graph_inputs=False).toposort()


_RAW_DTYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
}


def _tensor_proto_array(proto: onnx.TensorProto) -> np.ndarray:
    """Decode a TensorProto; the common raw little-endian case is a read-only view of its bytes.
    A lazy initializer (``io.load(..., lazy=True)``) is read from its file."""
    dtype = _RAW_DTYPES.get(proto.data_type)
    source = io.lazy_source(proto)
    if source is not None:
        if dtype is not None and np.little_endian:
            count = source.length // np.dtype(dtype).itemsize
            array = np.fromfile(source.path, dtype=dtype, count=count, offset=source.offset)
            if array.size != count:
                raise io.OnnxrepError(f"{source.path}: ends before the data of tensor '{proto.name}'")
            array = array.reshape(tuple(proto.dims))
            array.flags.writeable = False
            return array
        copy = onnx.TensorProto()
        io._copy_fields(proto, copy, ("raw_data", "data_location", "external_data"))
        copy.raw_data = io.read_source(source)
        return numpy_helper.to_array(copy)
    if dtype is not None and proto.HasField("raw_data") and np.little_endian:
        return np.frombuffer(proto.raw_data, dtype=dtype).reshape(tuple(proto.dims))
    return numpy_helper.to_array(proto)


def constant_values(tensor: gs.Constant) -> np.ndarray:
    """The values of a graphsurgeon Constant, decoded by onnx (so bfloat16/float16 stay exact)."""
    lazy = tensor._values
    if isinstance(lazy, gs.ir.tensor.LazyValues):
        return _tensor_proto_array(lazy.tensor)
    return np.asarray(tensor.values)


#: Bytes of decoded constants a GraphView keeps (the most recently read ones).
CACHE_BUDGET = 256 << 20


class GraphView:
    """Read-only queries over a graph, built once per matching round."""

    def __init__(self, graph: gs.Graph, input_names: set[str] | None = None):
        """``input_names``: the model's graph input names. graphsurgeon drops an input that is also
        an initializer, but such a value can be fed at run time and is no constant."""
        self.graph = graph
        self._outputs = {id(t) for t in graph.outputs}
        self._input_names = {t.name for t in graph.inputs} | set(input_names or ())
        # id of a tensor -> (the tensor, its values): the entry holds the tensor, so that its id
        # cannot be reused by another tensor while the entry lives
        self._constants: OrderedDict[int, tuple[gs.Tensor, np.ndarray | None]] = OrderedDict()
        self._cached = 0  # bytes held by ``_constants``
        self._users: dict[int, list[gs.Node]] = defaultdict(list)
        for node in graph.nodes:
            for t in node.inputs:
                if t is not None and t.name:
                    self._users[id(t)].append(node)
        # tensors read by subgraphs (If/Loop/Scan bodies) from the outer scope count as used there
        self._outer_used: set[str] = set()
        for node in graph.nodes:
            for attr in node.attrs.values():
                for sub in attr if isinstance(attr, list) else [attr]:
                    if isinstance(sub, gs.Graph):
                        self._outer_used |= _outer_names(sub)

    # -- producers and users ----------------------------------------------------------------

    def producer(self, tensor: gs.Tensor) -> gs.Node | None:
        """The node that computes ``tensor``, looking through Identity nodes."""
        node = self._raw_producer(tensor)
        while node is not None and node.op == ops.IDENTITY and _default_domain(node):
            node = self._raw_producer(node.inputs[0])
        return node

    def source(self, tensor: gs.Tensor) -> gs.Tensor:
        """``tensor`` with any chain of Identity nodes in front of it looked through."""
        node = self._raw_producer(tensor)
        while node is not None and node.op == ops.IDENTITY and _default_domain(node):
            tensor = node.inputs[0]
            node = self._raw_producer(tensor)
        return tensor

    @staticmethod
    def _raw_producer(tensor: gs.Tensor) -> gs.Node | None:
        return tensor.inputs[0] if isinstance(tensor, gs.Variable) and tensor.inputs else None

    def users(self, tensor: gs.Tensor) -> list[gs.Node]:
        """Nodes that read ``tensor``, with Identity nodes replaced by their own users."""
        out: list[gs.Node] = []
        for node in self._users.get(id(tensor), []):
            if node.op == ops.IDENTITY and _default_domain(node):
                out.extend(self.users(node.outputs[0]))
            else:
                out.append(node)
        return out

    def escapes(self, tensor: gs.Tensor) -> bool:
        """True when ``tensor`` (or an Identity copy of it) is a graph output or read by a subgraph."""
        if id(tensor) in self._outputs or tensor.name in self._outer_used:
            return True
        return any(
            self.escapes(node.outputs[0])
            for node in self._users.get(id(tensor), [])
            if node.op == ops.IDENTITY and _default_domain(node)
        )

    def used_only_by(self, tensor: gs.Tensor, node: gs.Node) -> bool:
        """True when ``node`` is the only reader of ``tensor`` and the tensor does not escape."""
        users = self.users(tensor)
        return not self.escapes(tensor) and len(users) >= 1 and all(u is node for u in users)

    # -- constants --------------------------------------------------------------------------

    def constant(self, tensor: gs.Tensor | None) -> np.ndarray | None:
        """Values of ``tensor`` if it is a constant (initializer, Constant node, through Identity).

        An initializer that is also a graph input can be overridden at run time: not a constant.
        """
        if tensor is None:
            return None
        key = id(tensor)
        if key in self._constants:
            self._constants.move_to_end(key)
            return self._constants[key][1]
        value = self._lookup_constant(tensor)
        # the most recently read constants are kept up to CACHE_BUDGET bytes; older ones are
        # decoded again when asked for again, so that a pass over a big model does not hold every
        # input weight it read at once
        self._constants[key] = (tensor, value)
        self._cached += 0 if value is None else value.nbytes
        while self._cached > CACHE_BUDGET and len(self._constants) > 1:
            _, (_, old) = self._constants.popitem(last=False)
            self._cached -= 0 if old is None else old.nbytes
        return value

    def _lookup_constant(self, tensor: gs.Tensor) -> np.ndarray | None:
        tensor = self.source(tensor)
        if tensor.name in self._input_names:
            return None
        if isinstance(tensor, gs.Constant):
            return constant_values(tensor)
        node = self._raw_producer(tensor)
        if node is not None and node.op == ops.CONSTANT and _default_domain(node):
            return _constant_node_value(node)
        return None

    def is_constant(self, tensor: gs.Tensor | None) -> bool:
        return self.constant(tensor) is not None


def _default_domain(node: gs.Node) -> bool:
    return (node.domain or "") in ops.DEFAULT_DOMAINS


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return constant_values(value) if isinstance(value, gs.Constant) else np.asarray(value)
    if "value_float" in attrs:
        return np.asarray(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.asarray(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.asarray(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.asarray(attrs["value_ints"], dtype=np.int64)
    return None


def _outer_names(graph: gs.Graph) -> set[str]:
    """Names a subgraph reads that it does not define itself (its outer-scope inputs)."""
    defined = {t.name for t in graph.inputs}
    for node in graph.nodes:
        defined.update(t.name for t in node.outputs)
    names: set[str] = set()
    for node in graph.nodes:
        for t in node.inputs:
            if t is not None and t.name and t.name not in defined and not isinstance(t, gs.Constant):
                names.add(t.name)
        for attr in node.attrs.values():
            for sub in attr if isinstance(attr, list) else [attr]:
                if isinstance(sub, gs.Graph):
                    names |= _outer_names(sub) - defined
    names.update(t.name for t in graph.outputs if t.name not in defined)
    return names


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Count of each op type in the main graph (``domain::Op`` for non-default domains)."""
    counts: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        counts[_op_key(node)] += 1
    return dict(counts)


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def body_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Count of each op type inside the If / Loop / Scan bodies of the main graph, at any depth."""
    counts: dict[str, int] = defaultdict(int)

    def bodies(nodes):
        for node in nodes:
            for attr in node.attribute:
                for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    for inner in g.node:
                        counts[_op_key(inner)] += 1
                    bodies(g.node)

    bodies(model.graph.node)
    return dict(counts)
