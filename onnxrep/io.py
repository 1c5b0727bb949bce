"""Reading and writing models: clear errors for bad input, atomic writes, external data."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from math import prod
from pathlib import Path
from typing import Iterator

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, helper

from .errors import InputError, OnnxrepError, first_line

#: Above this many bytes of tensor data a model is always saved with external data (protobuf
#: cannot serialize a message of 2 GiB or more).
EXTERNAL_THRESHOLD = 1_800_000_000


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(model))


def load(path: str | os.PathLike) -> tuple[onnx.ModelProto, bool]:
    """Load and check a model; returns it with every tensor in memory, and whether it had external
    data. Every failure is an :class:`InputError` with a one-line message naming the file."""
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
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, TypeError) as err:
        raise InputError(f"{p}: not a valid ONNX model (cannot be parsed: {first_line(err)})") from None
    except OSError as err:
        raise InputError(f"{p}: cannot read ({first_line(err)})") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise InputError(f"{p}: not a valid ONNX model (no graph, IR version or opset)")
    external = uses_external_data(model)
    if external:
        for tensor in external_data_helper._get_all_tensors(model):
            if not external_data_helper.uses_external_data(tensor):
                continue
            info = external_data_helper.ExternalDataInfo(tensor)
            data = p.parent / info.location
            if not data.is_file():
                raise InputError(f"{p}: external data file '{info.location}' is missing")
        try:
            external_data_helper.load_external_data_for_model(model, str(p.parent))
        except Exception as err:  # a short or unreadable data file
            raise InputError(f"{p}: external data cannot be read ({first_line(err)})") from None
    try:
        check(model)
    except onnx.checker.ValidationError as err:
        raise InputError(f"{p}: invalid ONNX model ({first_line(err)})") from None
    except UnicodeDecodeError:
        raise InputError(f"{p}: invalid ONNX model (a name or string is not valid UTF-8)") from None
    return model, external


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
    light = helper.make_graph(list(graph.node), graph.name, inputs, list(graph.output), small, value_info=list(graph.value_info))
    out = helper.make_model(light, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data the model holds (initializers, Constant nodes, subgraphs)."""
    total = 0
    for t in external_data_helper._get_all_tensors(model):
        total += len(t.raw_data) if t.HasField("raw_data") else prod(t.dims) * 4
    return total


_PACKED_4BIT = {
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1")
    if hasattr(onnx.TensorProto, name)
}


def check(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model`` on the model's :func:`skeleton` (no weight bytes serialized,
    whatever the model's size), and a check that every initializer holds as many bytes as its
    shape and type need. Raises ``onnx.checker.ValidationError``."""
    onnx.checker.check_model(skeleton(model))
    for init in model.graph.initializer:
        if not init.HasField("raw_data") or init.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            continue
        n = prod(init.dims)
        if init.data_type in _PACKED_4BIT:
            expected = (n + 1) // 2
        else:
            expected = n * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        if len(init.raw_data) != expected:
            raise onnx.checker.ValidationError(
                f"initializer '{init.name}' holds {len(init.raw_data)} bytes, its shape {list(init.dims)} needs {expected}"
            )


@contextmanager
def temporary_path(model: onnx.ModelProto) -> Iterator[str]:
    """The model saved in a temporary folder (with external data when large), removed afterwards."""
    tmp = tempfile.mkdtemp(prefix="onnxrep-")
    try:
        path = os.path.join(tmp, "model.onnx")
        external = tensor_bytes(model) >= EXTERNAL_THRESHOLD
        _write(model, path, external)
        if external:  # saving moved the tensors out of the model: read them back in
            external_data_helper.load_external_data_for_model(model, tmp)
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(model: onnx.ModelProto, path: str, external: bool) -> None:
    if external:
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=os.path.basename(path) + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, path)


def save(model: onnx.ModelProto, path: str | os.PathLike, external: bool = False) -> None:
    """Write ``model`` to ``path`` atomically: into a temporary folder beside it, then renamed.

    With ``external`` (or when the tensors reach 2 GiB) the weights go to ``<name>.data`` beside the
    model, which is renamed into place before the model file. Saving with external data moves the
    tensors of ``model`` out of memory: save last.
    """
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxrepError(f"{out}: folder '{parent}' does not exist")
    external = external or tensor_bytes(model) >= EXTERNAL_THRESHOLD
    tmp = tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent)
    try:
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
