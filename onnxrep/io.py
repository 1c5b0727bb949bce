"""Reading and writing models: clear errors for bad input, atomic writes, external data.

Large models are read and written tensor by tensor, so that memory holds the model once:

* :func:`load` parses the file piece by piece (the graph's large initializers one at a time)
  instead of reading all of its bytes and then parsing them. With ``lazy=True`` the data of large
  initializers is not read at all: they stay *file references* (see :func:`lazy_source`) that
  :func:`onnxrep.graph.constant_values` reads when a pass needs them and :func:`save` copies
  across; such a model is for onnxrep's own functions only (onnxruntime and the onnx checker
  reject it, and :func:`materialize` turns it into an ordinary model).
* :func:`save` writes the model without its initializers, then appends every initializer as a
  fragment of its own (``ModelProto(graph=GraphProto(initializer=[t]))``: protobuf merges
  concatenated messages, so the file parses to the same model), or writes their data to the
  external data file, instead of serializing the whole model into one buffer first.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from contextlib import contextmanager
from math import prod
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, helper

from .errors import InputError, OnnxrepError, first_line

#: Above this many bytes of tensor data a model is always saved with external data (protobuf
#: cannot serialize a message of 2 GiB or more).
EXTERNAL_THRESHOLD = 1_800_000_000

#: Initializers whose serialized size reaches this are read and written one at a time; smaller
#: fields are gathered into batches of about ``_BATCH`` bytes.
_BIG = 1 << 16
_BATCH = 1 << 23

#: Raw data of at least this many bytes is what ``onnx.save_model(..., save_as_external_data=True)``
#: moves out with its default threshold (it compares ``sys.getsizeof(raw_data)``, 33 bytes more).
_EXTERNAL_MIN = 1024 - 33


# --------------------------------------------------------------------------------------------
# file references (lazy initializers)
# --------------------------------------------------------------------------------------------


class Source(NamedTuple):
    """Where a lazy initializer's raw data lies: ``length`` bytes at ``offset`` of ``path``."""

    path: str
    offset: int
    length: int


#: External data keys that onnxrep uses on its own file references. A model read from a file or
#: given to the API may not hold them (:func:`validate`), so no file can make onnxrep read a path.
RESERVED_PREFIX = "onnxrep."

#: Marks a file reference made by this process: its value is a random token that no file holds.
_LAZY = RESERVED_PREFIX + "lazy"
_TOKEN = secrets.token_hex(16)

#: Marks a file reference made from external data: read back in, such a tensor keeps an explicit
#: ``data_location: DEFAULT``, as ``onnx.external_data_helper.load_external_data_for_tensor`` leaves it.
_FROM_EXTERNAL = RESERVED_PREFIX + "from_external"


def lazy_source(tensor: onnx.TensorProto) -> Source | None:
    """The file range holding ``tensor``'s raw data if it is a lazy reference made by
    ``load(..., lazy=True)`` in this process, else None. A reference carries a private key whose
    value is a random token of this process (its location is an absolute path, which onnxruntime
    refuses); external data written in a file is never taken for one."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in tensor.external_data}
    if info.get(_LAZY) != _TOKEN:
        return None
    return Source(info["location"], int(info["offset"]), int(info["length"]))


def _make_lazy(tensor: onnx.TensorProto, source: Source, from_external: bool = False) -> None:
    _set_reference(tensor, source.path, source.offset, source.length)
    entry = tensor.external_data.add()
    entry.key, entry.value = _LAZY, _TOKEN
    if from_external:
        entry = tensor.external_data.add()
        entry.key, entry.value = _FROM_EXTERNAL, "1"


def _set_reference(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Point ``tensor`` at ``length`` bytes at ``offset`` of ``location`` (as
    ``onnx.external_data_helper.set_external_data`` does); its raw data is left as it is."""
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def _unreference(tensor: onnx.TensorProto) -> None:
    """Drop a file reference's fields, as reading its data in leaves them."""
    external = any(e.key == _FROM_EXTERNAL for e in tensor.external_data)
    del tensor.external_data[:]
    if external:
        tensor.data_location = onnx.TensorProto.DEFAULT
    else:
        tensor.ClearField("data_location")


def read_source(source: Source) -> bytes:
    """The bytes of a file reference."""
    with open(source.path, "rb") as f:
        f.seek(source.offset)
        data = f.read(source.length)
    if len(data) != source.length:
        raise OnnxrepError(f"{source.path}: ends before the tensor data it should hold")
    return data


def materialize(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> onnx.ModelProto:
    """Read the data of every lazy initializer of ``model`` into it (in place); returns it.

    With ``base_dir``, external data references (a model loaded with ``load_external_data=False``)
    are read in too, from files inside ``base_dir``: every reference is checked first
    (:func:`validate`), and an :class:`InputError` leaves the model unchanged."""
    if base_dir is not None:
        _read_external(model, Path(base_dir), "model", lazy=False)
    for tensor in external_data_helper._get_all_tensors(model):
        source = lazy_source(tensor)
        if source is not None:
            tensor.raw_data = read_source(source)
            _unreference(tensor)
    return model


# --------------------------------------------------------------------------------------------
# protobuf wire format
# --------------------------------------------------------------------------------------------


class _Malformed(Exception):
    """The file is not a well-formed protobuf message (onnx.load then reports it)."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class _Reader:
    """Sequential reads from a file, through a buffer, with the absolute position known."""

    CHUNK = 1 << 20

    def __init__(self, f, size: int):
        self.f, self.size = f, size
        self.buf, self.i, self.base = b"", 0, 0
        self._big: np.ndarray | None = None

    @property
    def pos(self) -> int:
        return self.base + self.i

    def _fill(self, n: int) -> None:
        """Make ``n`` bytes available from the current position (fewer only at the end of file)."""
        if len(self.buf) - self.i >= n:
            return
        rest = self.buf[self.i:]
        more = self.f.read(max(n - len(rest), self.CHUNK))
        self.base += self.i
        self.buf, self.i = rest + more, 0

    def varint(self) -> int:
        self._fill(10)
        buf, i, result, shift = self.buf, self.i, 0, 0
        while True:
            if i >= len(buf) or shift >= 70:
                raise _Malformed("bad varint")
            byte = buf[i]
            i += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                self.i = i
                return result
            shift += 7

    def take(self, n: int):
        """The next ``n`` bytes (bytes or a bytearray)."""
        if n > self.size - self.pos:
            raise _Malformed("truncated")
        if n <= self.CHUNK:
            self._fill(n)
            out = self.buf[self.i:self.i + n]
            self.i += n
            return out
        out = bytearray(n)
        have = len(self.buf) - self.i
        out[:have] = self.buf[self.i:]
        view = memoryview(out)[have:]
        while len(view):
            got = self.f.readinto(view)
            if not got:
                raise _Malformed("truncated")
            view = view[got:]
        self.base, self.buf, self.i = self.pos + n, b"", 0
        return out

    def take_view(self, n: int) -> memoryview:
        """The next ``n`` bytes as a view that is valid until the next call: large reads go into
        one numpy buffer, reused (fresh memory costs a page fault per page, and numpy asks the
        kernel for huge pages)."""
        if n <= self.CHUNK:
            return memoryview(self.take(n))
        if n > self.size - self.pos:
            raise _Malformed("truncated")
        if self._big is None or self._big.size < n:
            self._big = None
            self._big = np.empty(n, np.uint8)
        view = memoryview(self._big)[:n]
        have = len(self.buf) - self.i
        view[:have] = self.buf[self.i:]
        rest = view[have:]
        while len(rest):
            got = self.f.readinto(rest)
            if not got:
                raise _Malformed("truncated")
            rest = rest[got:]
        self.base, self.buf, self.i = self.pos + n, b"", 0
        return view

    def skip(self, n: int) -> None:
        if n > self.size - self.pos:
            raise _Malformed("truncated")
        if n <= len(self.buf) - self.i:
            self.i += n
            return
        self.seek(self.pos + n)

    def seek(self, pos: int) -> None:
        self.f.seek(pos)
        self.base, self.buf, self.i = pos, b"", 0

    def payload(self, wire_type: int) -> bytes:
        """The encoded payload of a field of ``wire_type`` (after its key)."""
        if wire_type == 0:
            return _varint(self.varint())
        if wire_type == 1:
            return bytes(self.take(8))
        if wire_type == 5:
            return bytes(self.take(4))
        if wire_type == 2:
            n = self.varint()
            return _varint(n) + bytes(self.take(n))
        raise _Malformed(f"wire type {wire_type}")


#: Field number of TensorProto.raw_data.
RAW_DATA_FIELD = 9


def field_header(number: int, length: int) -> bytes:
    """Key and length prefix of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


def _merge(message, pending: bytearray) -> None:
    if pending:
        message.MergeFromString(bytes(pending))
        pending.clear()


_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, RAW_DATA_FIELD  # ModelProto.graph, GraphProto.initializer, TensorProto.raw_data
_DATA_LOCATION, _EXTERNAL_DATA = 14, 13


def _read_model(path: Path, lazy: bool) -> tuple[onnx.ModelProto, dict[int, int], dict[int, Source]]:
    """Parse a binary ONNX file piece by piece; returns the model, the raw data length of each
    large main-graph initializer (by index), measured on the way, and with ``lazy`` where the raw
    data of those initializers lies in the file (by index: the tensors are left without it, and
    become file references only once the whole model was checked)."""
    model = onnx.ModelProto()
    lengths: dict[int, int] = {}
    refs: dict[int, Source] = {}
    size = path.stat().st_size
    with open(path, "rb", buffering=0) as f:
        r = _Reader(f, size)
        top = bytearray()
        while r.pos < size:
            key = r.varint()
            if key == (_GRAPH << 3 | 2):
                n = r.varint()
                if n > size - r.pos:
                    raise _Malformed("truncated")
                _merge(model, top)
                _read_graph(r, model.graph, r.pos + n, lazy, lengths, refs, str(path.resolve()))
            else:
                top += _varint(key) + r.payload(key & 7)
                if len(top) > _BATCH:
                    _merge(model, top)
        _merge(model, top)
    return model, lengths, refs


def _read_graph(r: _Reader, graph: onnx.GraphProto, end: int, lazy: bool, lengths: dict, refs: dict, path: str) -> None:
    pending = bytearray()
    while r.pos < end:
        key = r.varint()
        if key == (_INITIALIZER << 3 | 2):
            n = r.varint()
            if n > end - r.pos:
                raise _Malformed("truncated")
            if n >= _BIG:
                _merge(graph, pending)
                index = len(graph.initializer)
                tensor = graph.initializer.add()
                if lazy:
                    length, source = _read_tensor_lazy(r, tensor, r.pos + n, path)
                    if source is not None:
                        refs[index] = source
                else:
                    data = r.take_view(n)
                    tensor.ParseFromString(data)
                    length = _raw_length(data)
                    data.release()
                if length is not None:
                    lengths[index] = length
                continue
            pending += _varint(key) + _varint(n) + bytes(r.take(n))
        else:
            pending += _varint(key) + r.payload(key & 7)
        if len(pending) > _BATCH:
            _merge(graph, pending)
    if r.pos != end:
        raise _Malformed("a field runs past the end of the graph")
    _merge(graph, pending)


def _raw_length(data) -> int | None:
    """Length of the raw_data field of a serialized TensorProto (None when it has none)."""
    view, i, length = memoryview(data), 0, None
    while i < len(view):
        key, i = _decode_varint(view, i)
        wire_type = key & 7
        if wire_type == 0:
            _, i = _decode_varint(view, i)
        elif wire_type == 1:
            i += 8
        elif wire_type == 5:
            i += 4
        elif wire_type == 2:
            n, i = _decode_varint(view, i)
            if key >> 3 == _RAW_DATA:
                length = n
            i += n
        else:
            raise _Malformed(f"wire type {wire_type}")
    if i != len(view):
        raise _Malformed("truncated tensor")
    return length


def _decode_varint(view, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(view) or shift >= 70:
            raise _Malformed("bad varint")
        byte = view[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


def _read_tensor_lazy(r: _Reader, tensor: onnx.TensorProto, end: int, path: str) -> tuple[int | None, Source | None]:
    """Parse a TensorProto ending at ``end`` without reading its raw data; returns its length and
    where it lies in the file. A tensor that already describes external data, or holds raw data
    twice, is read whole instead (no source)."""
    start = r.pos
    fields = bytearray()
    raw: list[tuple[int, int]] = []
    plain = True
    while r.pos < end:
        key = r.varint()
        number, wire_type = key >> 3, key & 7
        if number in (_DATA_LOCATION, _EXTERNAL_DATA):
            plain = False
        if number == _RAW_DATA and wire_type == 2:
            n = r.varint()
            raw.append((r.pos, n))
            r.skip(n)
        else:
            fields += _varint(key) + r.payload(wire_type)
    if r.pos != end:
        raise _Malformed("a field runs past the end of a tensor")
    if not plain or len(raw) != 1:
        r.seek(start)
        data = r.take(end - start)
        tensor.ParseFromString(data)
        return _raw_length(data), None
    tensor.ParseFromString(bytes(fields))
    offset, length = raw[0]
    return length, Source(path, offset, length)


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------


def _binary(path: str | os.PathLike) -> bool:
    """Whether onnx would read or write ``path`` as binary protobuf (not a text format)."""
    fmt = onnx.serialization.registry.get_format_from_file_extension(os.path.splitext(str(path))[1])
    return fmt in (None, "protobuf")


def load(path: str | os.PathLike, lazy: bool = False) -> tuple[onnx.ModelProto, bool]:
    """Load and check a model; returns it, and whether it had external data. Every failure is an
    :class:`InputError` with a one-line message naming the file.

    By default every tensor is in memory. With ``lazy`` the data of the main graph's large
    initializers (inline or external) stays in its file as a reference (:func:`lazy_source`):
    the model then costs little memory, and the files must stay unchanged until it is saved.

    What the file holds is checked (:func:`validate`) before any external data file is opened:
    external data must lie in regular files inside the model's folder (no absolute location, no
    ``..`` or symbolic link out of it), within their size; sparse tensors are refused.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not an ONNX file")
    try:
        size = p.stat().st_size
    except OSError as err:
        raise InputError(f"{p}: cannot read ({first_line(err)})") from None
    if size == 0:
        raise InputError(f"{p}: empty file, not an ONNX model")
    model, lengths, refs = None, {}, {}
    if _binary(p):
        try:
            model, lengths, refs = _read_model(p, lazy)
        except (_Malformed, DecodeError, RuntimeWarning, ValueError, TypeError):
            model = None  # onnx.load gives the error message below
        except OSError as err:
            raise InputError(f"{p}: cannot read ({first_line(err)})") from None
    if model is None:
        lengths, refs = {}, {}
        try:
            model = onnx.load(str(p), load_external_data=False)
        except (DecodeError, RuntimeWarning, ValueError, TypeError) as err:
            raise InputError(f"{p}: not a valid ONNX model (cannot be parsed: {first_line(err)})") from None
        except OSError as err:
            raise InputError(f"{p}: cannot read ({first_line(err)})") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise InputError(f"{p}: not a valid ONNX model (no graph, IR version or opset)")
    _validate(model, p.parent, str(p), {}, trusted=False)
    external = uses_external_data(model)
    for index, source in refs.items():
        _make_lazy(model.graph.initializer[index], source)
    if external:
        _read_external(model, p.parent, str(p), lazy, lengths)
    try:
        check(model, _lengths=lengths)
    except onnx.checker.ValidationError as err:
        raise InputError(f"{p}: invalid ONNX model ({first_line(err)})") from None
    except UnicodeDecodeError:
        raise InputError(f"{p}: invalid ONNX model (a name or string is not valid UTF-8)") from None
    return model, external


def from_proto(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> onnx.ModelProto:
    """The API's front door for a ModelProto: :func:`validate` it, check it (an :class:`InputError`
    with one line for either), and return the model to optimize: ``model`` itself, or, when it
    holds external data references (relative to ``base_dir``), a copy in which the main graph's
    external initializers are lazy references (:func:`lazy_source`, read when needed; call
    :func:`materialize` on the result of the passes) and every other external tensor is read in.
    ``model`` is not changed."""
    validate(model, base_dir)
    if uses_external_data(model):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        _read_external(copy, Path(base_dir), "model", lazy=True)
        model = copy
    try:
        check(model)
    except onnx.checker.ValidationError as err:
        raise InputError(f"model: invalid ONNX model ({first_line(err)})") from None
    except UnicodeDecodeError:
        raise InputError("model: invalid ONNX model (a name or string is not valid UTF-8)") from None
    return model


# --------------------------------------------------------------------------------------------
# what a model may hold
# --------------------------------------------------------------------------------------------


def validate(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> None:
    """Raise :class:`InputError` (one line) if ``model`` holds what onnxrep refuses to read:

    * external data (``data_location: EXTERNAL``) whose location is empty, absolute, or resolves
      outside ``base_dir`` (``..``, or a symbolic link anywhere on the way; like ``onnx.load``, a
      location that is itself a symbolic link is refused), or is not a regular file; an offset or
      length that is not an integer, is negative, or reaches past the end of the file; and any
      external data at all when ``base_dir`` is None (there is no folder it could be relative to);
    * an external data key of onnxrep's own (:data:`RESERVED_PREFIX`), except on lazy references
      made by :func:`load` in this process;
    * a sparse tensor in the main graph or an If / Loop / Scan body: a sparse initializer, or a
      Constant node's ``sparse_value`` (the passes read dense constants only).

    Only file metadata is looked at (no external data file is opened). Tensors anywhere are
    checked: graphs, bodies, node attributes, local functions, training info, sparse tensors."""
    _validate(model, None if base_dir is None else Path(base_dir), "model", {}, trusted=True)


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether any tensor of ``model`` keeps its data in an external file (lazy references made by
    :func:`load` do not count)."""
    return any(_is_external(t) and lazy_source(t) is None for t in _all_tensors(model))


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for a in node.attribute:
        if a.HasField("t"):
            yield a.t
        yield from a.tensors
        for sparse in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
            yield sparse.values
            yield sparse.indices
        if a.HasField("g"):
            yield from _graph_tensors(a.g)
        for g in a.graphs:
            yield from _graph_tensors(g)


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model, wherever it is."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)
    for info in model.training_info:
        yield from _graph_tensors(info.initialization)
        yield from _graph_tensors(info.algorithm)


def _bodies(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in its nodes' attributes."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("g"):
                yield from _bodies(a.g)
            for g in a.graphs:
                yield from _bodies(g)


def _validate(model: onnx.ModelProto, base: Path | None, where: str, cache: dict, trusted: bool) -> None:
    for graph in _bodies(model.graph):
        for sparse in graph.sparse_initializer:
            name = sparse.values.name
            raise InputError(
                f"{where}: sparse initializer '{name}' is not supported (onnxrep reads dense constants only; "
                "store it as a dense initializer)"
            )
        for node in graph.node:
            for a in node.attribute:
                if a.HasField("sparse_tensor") or len(a.sparse_tensors):
                    label = f"node '{node.name}'" if node.name else f"the node making '{node.output[0] if node.output else ''}'"
                    raise InputError(
                        f"{where}: {label} ({node.op_type}) holds a sparse tensor in attribute '{a.name}', "
                        "which is not supported (onnxrep reads dense constants only)"
                    )
    for tensor in _all_tensors(model):
        if not len(tensor.external_data) and not _is_external(tensor):
            continue
        if trusted and lazy_source(tensor) is not None:
            continue
        for entry in tensor.external_data:
            if entry.key.startswith(RESERVED_PREFIX):
                raise InputError(f"{where}: tensor '{tensor.name}' holds the external data key '{entry.key}', reserved to onnxrep")
        if _is_external(tensor):
            _external_source(tensor, base, where, cache)


def _external_source(tensor: onnx.TensorProto, base: Path | None, where: str, cache: dict) -> Source:
    """The file range of an external tensor, after every check of :func:`validate` (an InputError
    names the tensor and what is wrong). ``cache`` keeps each location's file and size."""
    name = tensor.name
    info: dict[str, str] = {}
    for entry in tensor.external_data:
        info[entry.key] = entry.value  # the last one wins, as in onnx
    location = info.get("location", "")
    if base is None:
        raise InputError(
            f"{where}: tensor '{name}' keeps its data in external file '{location}'; give the folder it "
            "is relative to (base_dir) or load the model with its external data"
        )
    if not location:
        raise InputError(f"{where}: tensor '{name}' has external data without a location")
    if location not in cache:
        cache[location] = _data_file(base, location, where)
    data, size = cache[location]

    def integer(key: str) -> int | None:
        value = info.get(key)
        if value is None:
            return None
        try:
            number = int(value)
        except ValueError:
            raise InputError(f"{where}: external data {key} '{value}' of tensor '{name}' is not an integer") from None
        if number < 0:
            raise InputError(f"{where}: external data {key} {number} of tensor '{name}' is negative")
        return number

    offset, length = integer("offset") or 0, integer("length")
    if offset > size:
        raise InputError(
            f"{where}: external data cannot be read (tensor '{name}' starts at offset {offset}, past the end "
            f"of '{location}', {size} bytes)"
        )
    if length is None:
        length = size - offset
    if length > size - offset:
        raise InputError(
            f"{where}: external data cannot be read (tensor '{name}' needs {length} bytes at offset {offset}, "
            f"past the end of '{location}', {size} bytes)"
        )
    return Source(str(data), offset, length)


def _data_file(base: Path, location: str, where: str) -> tuple[Path, int]:
    """The external data file at ``location`` in ``base``, and its size; an InputError unless it is
    a regular file inside ``base`` reached without a symbolic link out of it."""
    if os.path.isabs(location) or location.startswith(("/", "\\")) or os.path.splitdrive(location)[0]:
        raise InputError(f"{where}: external data location '{location}' is an absolute path (it must be relative to the model's folder)")
    try:
        root = base.resolve()
        joined = root / location
        target = joined.resolve()
        if target != root and root not in target.parents:
            raise InputError(f"{where}: external data location '{location}' is outside the model's folder")
        if joined.is_symlink():
            raise InputError(f"{where}: external data location '{location}' is a symbolic link")
        if not target.exists():
            raise InputError(f"{where}: external data file '{location}' is missing")
        info = target.stat()
    except (OSError, ValueError) as err:
        raise InputError(f"{where}: external data location '{location}' cannot be used ({first_line(err)})") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{where}: external data location '{location}' is not a regular file")
    return target, info.st_size


def _read_external(model: onnx.ModelProto, base: Path, where: str, lazy: bool, lengths: dict[int, int] | None = None) -> None:
    """Check every external data reference of ``model`` (nothing is changed or opened when one is
    refused), then read the data in (one tensor at a time), or with ``lazy`` turn the main graph's
    external initializers into file references."""
    cache: dict = {}
    _validate(model, base, where, cache, trusted=True)
    if lazy:
        for index, tensor in enumerate(model.graph.initializer):
            if _is_external(tensor) and lazy_source(tensor) is None:
                source = _external_source(tensor, base, where, cache)
                tensor.ClearField("raw_data")
                _make_lazy(tensor, source, from_external=True)
                if lengths is not None:
                    lengths[index] = source.length
    for tensor in _all_tensors(model):
        if _is_external(tensor) and lazy_source(tensor) is None:
            source = _external_source(tensor, base, where, cache)
            try:
                data = read_source(source)
            except OSError as err:
                raise InputError(f"{where}: external data cannot be read ({first_line(err)})") from None
            except OnnxrepError:
                raise InputError(f"{where}: external data cannot be read (tensor '{tensor.name}' lies past the end of its file)") from None
            tensor.raw_data = data
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
            del data


# --------------------------------------------------------------------------------------------
# checks and sizes
# --------------------------------------------------------------------------------------------


#: Initializers up to this many elements stay in the copy used for shape inference (they may be
#: shapes that Reshape or Expand read); larger ones become typed graph inputs instead.
_SMALL = 64


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large initializers are typed graph inputs instead: enough for the
    checker and shape inference, and cheap to make and serialize."""
    graph = model.graph
    inputs = list(graph.input)
    names = {i.name for i in inputs}
    small = []
    for init in graph.initializer:
        n = prod(init.dims)
        if n <= _SMALL and init.data_location != onnx.TensorProto.EXTERNAL:
            small.append(init)
        elif init.name not in names:
            inputs.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    light = helper.make_graph(
        list(graph.node), graph.name, inputs, list(graph.output), small, value_info=list(graph.value_info),
        sparse_initializer=list(graph.sparse_initializer),
    )
    out = helper.make_model(light, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


_PACKED_4BIT = {
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1")
    if hasattr(onnx.TensorProto, name)
}


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of raw data that ``tensor``'s shape and type need (None for strings and unknown types)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    n = prod(tensor.dims)
    if tensor.data_type in _PACKED_4BIT:
        return (n + 1) // 2
    try:
        return n * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:  # noqa: BLE001 - a type numpy cannot hold
        return None


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data the model holds (initializers, Constant nodes, subgraphs), lazy
    references included. Raw data is counted from the tensor's shape and type (which
    :func:`check` compares with its length), without reading it."""
    total = 0
    for t in external_data_helper._get_all_tensors(model):
        expected = _expected_bytes(t)
        if t.HasField("raw_data"):
            total += expected if expected is not None else len(t.raw_data)
        elif lazy_source(t) is not None:
            total += lazy_source(t).length
        else:
            total += prod(t.dims) * 4
    return total


def check(model: onnx.ModelProto, data: bool = True, _lengths: dict[int, int] | None = None) -> None:
    """``onnx.checker.check_model`` on the model's :func:`skeleton` (no weight bytes serialized,
    whatever the model's size), and a check that every initializer holds as many bytes as its
    shape and type need. Raises ``onnx.checker.ValidationError``.

    Measuring raw data copies it out of the protobuf message (about 0.5 s per GB); ``data=False``
    leaves that out, for a model whose tensors are right by construction (``engine.run``'s output:
    every tensor it writes is encoded from an array of that shape, the others come from a checked
    model)."""
    onnx.checker.check_model(skeleton(model))
    if not data:
        return
    known = _lengths or {}
    for index, init in enumerate(model.graph.initializer):
        source = lazy_source(init)
        if source is None and not init.HasField("raw_data"):
            continue
        expected = _expected_bytes(init)
        if expected is None:
            continue
        if source is not None:
            held = source.length
        else:
            held = known[index] if index in known else len(init.raw_data)
        if held != expected:
            raise onnx.checker.ValidationError(
                f"initializer '{init.name}' holds {held} bytes, its shape {list(init.dims)} needs {expected}"
            )


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------


@contextmanager
def temporary_path(model: onnx.ModelProto) -> Iterator[str]:
    """The model saved in a temporary folder (with external data when large), removed afterwards."""
    tmp = tempfile.mkdtemp(prefix="onnxrep-")
    try:
        path = os.path.join(tmp, "model.onnx")
        _write(model, path, tensor_bytes(model) >= EXTERNAL_THRESHOLD)
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)
    return flag if flag is not None else field.label == field.LABEL_REPEATED


def _copy_fields(src, dst, skip: tuple[str, ...] = ()):
    """Copy every field of ``src`` but ``skip`` into ``dst`` (messages copied deep); returns dst."""
    for field in src.DESCRIPTOR.fields:
        name = field.name
        if name in skip:
            continue
        if _is_repeated(field):
            values = getattr(src, name)
            if not len(values):
                continue
            target = getattr(dst, name)
            if field.message_type is not None:
                for value in values:
                    target.add().CopyFrom(value)
            else:
                target.extend(values)
        elif src.HasField(name):
            if field.message_type is not None:
                getattr(dst, name).CopyFrom(getattr(src, name))
            else:
                setattr(dst, name, getattr(src, name))
    return dst


def _head(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without the main graph's initializers (a lazy tensor anywhere else, which
    a pass may have moved into a subgraph, is read in)."""
    head = _copy_fields(model, onnx.ModelProto(), ("graph",))
    if model.HasField("graph"):
        _copy_fields(model.graph, head.graph, ("initializer",))
    return materialize(head)


_COPY_CHUNK = 1 << 26


def _copy_source(source: Source, out) -> None:
    """Append the bytes of a file reference to the open file ``out``, in chunks."""
    with open(source.path, "rb") as f:
        f.seek(source.offset)
        left = source.length
        while left:
            block = f.read(min(left, _COPY_CHUNK))
            if not block:
                raise OnnxrepError(f"{source.path}: ends before the tensor data it should hold")
            out.write(block)
            left -= len(block)


def _write(model: onnx.ModelProto, path: str, external: bool) -> None:
    """Write ``model`` to ``path`` (and ``<name>.data`` beside it with ``external``) tensor by
    tensor; ``model`` is not changed. The model file parses to the same ModelProto that
    ``onnx.save_model`` would write, and with ``external`` both files are laid out as
    ``onnx.save_model(..., save_as_external_data=True, location=<name>.data)`` lays them out."""
    if external:
        _write_external(model, path)
    elif not _binary(path):  # a text format: onnx writes it whole
        if any(lazy_source(t) is not None for t in external_data_helper._get_all_tensors(model)):
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            model = materialize(copy)
        onnx.save_model(model, path)
    else:
        _write_inline(model, path)


def _write_inline(model: onnx.ModelProto, path: str) -> None:
    onnx.save_model(_head(model), path)
    if not model.HasField("graph"):
        return
    with open(path, "ab") as f:
        for tensor in model.graph.initializer:
            source = lazy_source(tensor)
            if source is None and not (tensor.HasField("raw_data") and (_expected_bytes(tensor) or 0) >= _BIG):
                _fragment(f, tensor.SerializeToString())
                continue
            meta = _copy_fields(tensor, onnx.TensorProto(), ("raw_data",))
            if source:
                _unreference(meta)
            head = meta.SerializeToString()
            data = None if source else tensor.raw_data
            length = source.length if source else len(data)
            tail = bytes([_RAW_DATA << 3 | 2]) + _varint(length)
            size = len(head) + len(tail) + length
            initializer = bytes([_INITIALIZER << 3 | 2]) + _varint(size)
            f.write(bytes([_GRAPH << 3 | 2]) + _varint(len(initializer) + size) + initializer + head + tail)
            if source:
                _copy_source(source, f)
            else:
                f.write(data)
                del data


def _fragment(f, tensor: bytes) -> None:
    initializer = bytes([_INITIALIZER << 3 | 2]) + _varint(len(tensor)) + tensor
    f.write(bytes([_GRAPH << 3 | 2]) + _varint(len(initializer)) + initializer)


def _write_external(model: onnx.ModelProto, path: str) -> None:
    location = os.path.basename(path) + ".data"
    data_path = os.path.join(os.path.dirname(path), location)
    head = _head(model)
    data = None
    try:
        def put(tensor: onnx.TensorProto, source: Source | None, raw: bytes | None) -> None:
            nonlocal data
            if data is None:
                data = open(data_path, "wb")
            offset = data.tell()
            if source is not None:
                _copy_source(source, data)
            else:
                data.write(raw)
            _set_reference(tensor, location, offset, data.tell() - offset)
            tensor.ClearField("raw_data")

        for tensor in model.graph.initializer if model.HasField("graph") else ():
            source = lazy_source(tensor)
            if source is not None:
                put(_copy_fields(tensor, head.graph.initializer.add(), ("data_location", "external_data")), source, None)
            elif tensor.HasField("raw_data") and (_expected_bytes(tensor) or len(tensor.raw_data)) >= _EXTERNAL_MIN:
                raw = tensor.raw_data
                if len(raw) < _EXTERNAL_MIN:  # onnx decides by the data's actual length
                    head.graph.initializer.add().CopyFrom(tensor)
                    continue
                put(_copy_fields(tensor, head.graph.initializer.add(), ("raw_data",)), None, raw)
                del raw
            else:
                head.graph.initializer.add().CopyFrom(tensor)
        # initializers of subgraphs (If / Loop / Scan bodies), as onnx moves them too
        for node in head.graph.node:
            for attribute in node.attribute:
                for tensor in external_data_helper._recursive_attribute_processor(
                    attribute, external_data_helper._get_initializer_tensors_from_graph
                ):
                    if tensor.HasField("raw_data") and len(tensor.raw_data) >= _EXTERNAL_MIN:
                        put(tensor, None, tensor.raw_data)
    finally:
        if data is not None:
            data.close()
    onnx.save_model(head, path)


def check_writable(path: str | os.PathLike) -> None:
    """Raise :class:`OnnxrepError` (one line naming ``path`` and the reason) unless a file can be
    written at ``path``: its folder exists and takes new files, and ``path`` is not a folder. Meant
    to be called before any work; writes nothing that stays (a temporary folder, removed)."""
    out = Path(path)
    parent = out.parent
    if str(out) in ("", ".") or out.name in ("", ".", ".."):
        raise OnnxrepError(f"{out}: not a file name")
    try:
        if out.is_dir():
            raise OnnxrepError(f"{out}: cannot write (is a directory)")
        if not parent.exists():
            raise OnnxrepError(f"{out}: cannot write (folder '{parent}' does not exist)")
        if not parent.is_dir():
            raise OnnxrepError(f"{out}: cannot write ('{parent}' is not a folder)")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OnnxrepError(f"{out}: cannot write (folder '{parent}' is not writable)")
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    except OSError as err:
        raise OnnxrepError(f"{out}: cannot write in folder '{parent}' ({err.strerror or first_line(err)})") from None


def save(model: onnx.ModelProto, path: str | os.PathLike, external: bool = False) -> None:
    """Write ``model`` to ``path`` atomically: into a temporary folder beside it, then renamed.

    With ``external`` (or when the tensors reach 2 GiB) the weights go to ``<name>.data`` beside the
    model, which is renamed into place before the model file. ``model`` is not changed; lazy
    initializers are copied from their files. Every failure is an :class:`OnnxrepError` with one
    line naming ``path`` (:func:`check_writable` first), and leaves nothing behind.
    """
    out = Path(path)
    check_writable(out)
    parent = out.parent
    external = external or tensor_bytes(model) >= EXTERNAL_THRESHOLD
    tmp = None
    try:
        tmp = tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent)
        tmp_model = os.path.join(tmp, out.name)
        _write(model, tmp_model, external)
        for name in os.listdir(tmp):
            _fsync(os.path.join(tmp, name))
        data = out.name + ".data"
        if external and os.path.exists(os.path.join(tmp, data)):  # no file when every tensor is small
            os.replace(os.path.join(tmp, data), parent / data)
        os.replace(tmp_model, out)
    except OSError as err:
        raise OnnxrepError(f"{out}: cannot write ({first_line(err)})") from None
    except OnnxrepError as err:
        raise OnnxrepError(f"{out}: cannot write ({first_line(err)})") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
