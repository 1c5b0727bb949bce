"""The Python API: :func:`optimize`, :func:`verify`, :func:`load`, :func:`save`.

Every function checks its arguments before any work (:class:`onnxrep.UsageError`, a
``ValueError``, names the valid values), so that a bad option never costs a model load, and the
command line goes through the same checks and the same sequence (:func:`optimize_file`): load,
input shapes, passes, cleanup, checker, verification and, on a mismatch, either an error or the
bisection that leaves the responsible rewrites out, then the atomic write.

A model is given as a path, an ``onnx.ModelProto``, the bytes of one, or an object with a
``model_proto`` attribute (torch's ``ONNXProgram`` from ``torch.onnx.export(..., dynamo=True)``).
A given model is never changed. Log records go to ``logging.getLogger("onnxrep")`` (one INFO
line per stage, a DEBUG line per pass and round); ``progress`` callbacks get :class:`Progress`
events.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, Union

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from . import __version__, engine, io, misses, regions
from . import cleanup as _cleanup
from .cost import Cost
from .equivalence import DEFAULT_DIM, VerifyResult, compare, graph_inputs, is_batch_dim, progress_steps
from .errors import InputError, UsageError, VerificationError, first_line
from .graph import op_histogram, quiet_graphsurgeon
from .rewrite import Options

log = logging.getLogger("onnxrep")

#: Version of the report's JSON layout (``Report.to_dict()["schema_version"]``); raised when a
#: key is renamed or removed or changes meaning (new keys do not raise it).
SCHEMA_VERSION = 1

#: The stages of :func:`optimize`, in order, as named in :class:`Progress` and ``Report.stages``.
STAGES = ("load", "passes", "cleanup", "verify", "bisect", "not_rewritten", "write")

ON_MISMATCH = ("fail", "bisect")


@dataclass(frozen=True)
class Check:
    """How a verification runs: random input sets, symbolic dim values, user inputs, tolerances
    (None: the defaults of each output's dtype, see :mod:`onnxrep.equivalence`)."""

    seeds: int = 3
    dims: Mapping[str, int] | None = None
    inputs: Sequence[Feeds] = ()
    rtol: float | None = None
    atol: float | None = None


# --------------------------------------------------------------------------------------------
# Argument checks (before any work)
# --------------------------------------------------------------------------------------------


def pass_names(value: str | Iterable[str] | None, what: str) -> list[str]:
    """Pass names from a comma-separated string or a sequence of them (each item may hold commas)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(i, str) for i in items):
        raise UsageError(f"{what} must be pass names (strings), got {value!r}")
    return [v.strip() for item in items for v in item.split(",") if v.strip()]


def check_options(
    only: Sequence[str], skip: Sequence[str], on_mismatch: str = "fail", tolerance: float = 0.0, check: Check | None = None
) -> None:
    """Raise :class:`UsageError` for an unknown pass, mismatch policy, or an out-of-range number."""
    registry = engine.available_passes()
    for name in list(only) + list(skip):
        if name not in registry:
            raise UsageError(f"unknown pass {name!r}; available: {', '.join(registry)}")
    if on_mismatch not in ON_MISMATCH:
        raise UsageError(f"on_mismatch must be one of {', '.join(ON_MISMATCH)}, got {on_mismatch!r}")
    _non_negative("tolerance", tolerance)
    if check is not None:
        if isinstance(check.seeds, bool) or not isinstance(check.seeds, (int, np.integer)) or check.seeds < 1:
            raise UsageError(f"seeds must be an integer >= 1, got {check.seeds!r}")
        for name in ("rtol", "atol"):
            if getattr(check, name) is not None:
                _non_negative(name, getattr(check, name))


def _non_negative(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise UsageError(f"{name} must be a number >= 0, got {value!r}")
    if not math.isfinite(float(value)) or value < 0:
        raise UsageError(f"{name} must be a finite number >= 0, got {value!r}")


def symbolic_dims(model: onnx.ModelProto) -> set[str]:
    """Names of the symbolic dims of the model's inputs."""
    return {
        d.dim_param
        for vi in graph_inputs(model)
        for d in vi.type.tensor_type.shape.dim
        if d.HasField("dim_param") and d.dim_param
    }


def check_model_args(model: onnx.ModelProto, check: Check) -> None:
    """Raise :class:`UsageError` for dims the model's inputs do not have and for user inputs that
    do not fit the model's inputs (unknown name, missing input, rank, static dims, element type)."""
    names = symbolic_dims(model)
    for name, value in (check.dims or {}).items():
        if name not in names:
            available = ", ".join(sorted(names)) or "none"
            raise UsageError(f"the model's inputs have no symbolic dim {name!r} (symbolic dims: {available})")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UsageError(f"dim {name!r} must be an integer >= 1, got {value!r}")
    declared = {vi.name: vi for vi in graph_inputs(model)}
    for i, feeds in enumerate(check.inputs):
        where = f"input set {i + 1}"
        for name in feeds:
            if name not in declared:
                raise UsageError(f"{where}: the model has no input {name!r} (inputs: {', '.join(declared)})")
        for name, vi in declared.items():
            if name not in feeds:
                raise UsageError(f"{where}: no value for input {name!r}")
            _check_feed(where, name, np.asarray(feeds[name]), vi)


def _check_feed(where: str, name: str, value: np.ndarray, vi: onnx.ValueInfoProto) -> None:
    t = vi.type.tensor_type
    want = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
    if value.dtype != want:
        raise UsageError(f"{where}: input {name!r} has dtype {value.dtype}, the model expects {want}")
    dims = list(t.shape.dim)
    if t.HasField("shape") and len(dims) != value.ndim:
        raise UsageError(f"{where}: input {name!r} has rank {value.ndim}, the model expects {len(dims)}")
    for axis, (d, n) in enumerate(zip(dims, value.shape)):
        if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != n:
            raise UsageError(f"{where}: input {name!r} has size {n} on axis {axis}, the model expects {d.dim_value}")



class HasModelProto(Protocol):
    """Anything with a ``model_proto`` attribute holding an ``onnx.ModelProto``, such as torch's
    ``torch.onnx.ONNXProgram``."""

    @property
    def model_proto(self) -> onnx.ModelProto: ...


#: What every ``model`` argument of the API takes.
ModelLike = Union[onnx.ModelProto, str, os.PathLike, bytes, bytearray, memoryview, HasModelProto]
Feeds = Mapping[str, np.ndarray]
Shapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class Progress:
    """A progress event of :func:`optimize` / :func:`verify` given to a ``progress`` callback.

    ``stage``: one of :data:`STAGES`. Each stage sends one event with ``done=0`` when it starts,
    one per step, and one with ``end=True`` when it is over. Steps: ``passes``: ``done`` is the
    round and ``detail`` the pass that just ran (``total`` None: rounds run to a fixed point);
    ``verify``: ``done`` of ``total`` input-set groups compared (then the region checks)."""

    stage: str
    done: int = 0
    total: int | None = None
    detail: str = ""
    end: bool = False


ProgressCallback = Callable[[Progress], None]


def interface(model: onnx.ModelProto) -> dict:
    """Opset (default domain), IR version, and each graph input (initializers excluded) and output
    with its dtype and shape (ints for static dims, names for symbolic ones, None for unknown;
    shape None when the rank is unknown)."""

    def value(vi: onnx.ValueInfoProto) -> dict:
        if not vi.type.HasField("tensor_type"):
            return {"name": vi.name, "dtype": vi.type.WhichOneof("value") or "?", "shape": None}
        t = vi.type.tensor_type
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        except (KeyError, ValueError, TypeError):
            dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower()
        shape = None if not t.HasField("shape") else [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
        ]
        return {"name": vi.name, "dtype": dtype, "shape": shape}

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "opset": opset,
        "ir_version": model.ir_version,
        "inputs": [value(vi) for vi in graph_inputs(model)],
        "outputs": [value(vi) for vi in model.graph.output],
    }


@dataclass
class Report(engine.Report):
    """What :func:`optimize` did. ``to_dict()`` gives it as JSON-ready data with
    ``schema_version`` (:data:`SCHEMA_VERSION`) and ``onnxrep_version``.

    From the engine (per run): ``passes`` (one :class:`onnxrep.engine.PassReport` each: matched,
    rewritten, skipped with reasons, ``rewrites``, net ``macs_delta`` / ``params_delta``,
    ``seconds``), ``rounds``, ``ops_before`` / ``ops_after`` (op histograms of the main graph),
    ``cost_before`` / ``cost_after`` (MACs and float weight elements: initializers and Constant
    node values), ``body_ops_before`` / ``body_ops_after``, ``left_out_for_cost``, ``runs``,
    ``declared_shape_contradictions``, ``shape_evidence``, and ``verification`` (None unless
    verified). Added here: ``seconds`` (wall seconds of each stage that ran, :data:`STAGES`, and
    ``total``), ``cleanup`` (counts of :func:`onnxrep.cleanup.cleanup`, None when off),
    ``not_rewritten`` (:mod:`onnxrep.misses`: every foldable structure left standing, with the
    condition that stopped it), ``input_shapes`` (as fixed), ``input_external_data`` (whether the
    input kept weights in external files), ``size_before`` / ``size_after`` (bytes of tensor data,
    :func:`onnxrep.io.tensor_bytes`), ``changed`` (whether the output differs from the input at
    all: a rewrite, a cleanup step or a fixed input shape), ``output`` (the file written, if
    any), and ``interface_before`` / ``interface_after`` (:func:`interface` of the model as given
    and of the result)."""

    seconds: dict[str, float] = field(default_factory=dict)
    cleanup: dict[str, int] | None = None
    not_rewritten: list[dict] = field(default_factory=list)
    input_shapes: dict[str, list[int]] | None = None
    input_external_data: bool = False
    size_before: int = 0
    size_after: int = 0
    changed: bool = False
    output: str | None = None
    interface_before: dict | None = None
    interface_after: dict | None = None

    @classmethod
    def from_engine(cls, report: engine.Report) -> "Report":
        if isinstance(report, cls):
            return report
        return cls(**{f.name: getattr(report, f.name) for f in fields(engine.Report)})

    def to_dict(self, timings: bool = True) -> dict:
        """The report as JSON-ready data; ``timings=False`` leaves out every wall time (the
        seconds per pass, per stage and in all), which differ from run to run."""
        d = {"schema_version": SCHEMA_VERSION, "onnxrep_version": __version__}
        d |= super().to_dict(timings)
        d |= {
            "cleanup": self.cleanup,
            "not_rewritten": self.not_rewritten,
            "input_shapes": self.input_shapes,
            "input_external_data": self.input_external_data,
            "size_before": self.size_before,
            "size_after": self.size_after,
            "changed": self.changed,
            "output": self.output,
            "interface_before": self.interface_before,
            "interface_after": self.interface_after,
        }
        if timings:
            d["seconds"] = {k: round(v, 6) for k, v in self.seconds.items()}
        return d

# --------------------------------------------------------------------------------------------
# models in: paths, ModelProtos, bytes, torch ONNXPrograms
# --------------------------------------------------------------------------------------------

_MODEL_KINDS = "a path, an onnx.ModelProto, bytes, or an object with a model_proto attribute (torch.onnx.ONNXProgram)"


def check_model_arg(model: Any, what: str = "model") -> None:
    """Raise :class:`UsageError` unless ``model`` is one of the accepted kinds."""
    if isinstance(model, (onnx.ModelProto, str, os.PathLike, bytes, bytearray, memoryview)):
        return
    if hasattr(model, "model_proto"):
        return
    raise UsageError(f"{what} must be {_MODEL_KINDS}, got {type(model).__name__}")


@dataclass
class _Input:
    """A model to read from: ``model`` (checked), whether the caller's object it came from had
    external data, and whether ``model`` is a private copy that may be changed."""

    model: onnx.ModelProto
    external: bool
    owned: bool
    name: str


def _open(model: ModelLike, base_dir: str | os.PathLike | None = None, lazy: bool = False, what: str = "model") -> _Input:
    """Read and check any accepted kind of model (:class:`InputError` with one line on failure).
    A path is loaded (``lazy``: large initializers stay in the file, :func:`io.load`); a
    ModelProto is validated and used as it is, or as a copy with lazy references to its external
    data relative to ``base_dir`` (:func:`io.from_proto`)."""
    check_model_arg(model, what)
    if isinstance(model, (str, os.PathLike)):
        loaded, external = io.load(model, lazy=lazy)
        return _Input(loaded, external, True, str(model))
    owned = False
    if isinstance(model, (bytes, bytearray, memoryview)):
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(bytes(model))
        except (DecodeError, RuntimeWarning, ValueError) as err:
            raise InputError(f"{what}: not a valid ONNX model (cannot be parsed: {first_line(err)})") from None
        if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
            raise InputError(f"{what}: not a valid ONNX model (no graph, IR version or opset)")
        owned = True
    elif isinstance(model, onnx.ModelProto):
        proto = model
    else:
        proto = model.model_proto
        if not isinstance(proto, onnx.ModelProto):
            raise UsageError(f"{what}.model_proto must be an onnx.ModelProto, got {type(proto).__name__}")
    external = io.uses_external_data(proto)
    checked = io.from_proto(proto, base_dir)
    return _Input(checked, external, owned or checked is not proto, what)


def load(model: ModelLike, base_dir: str | os.PathLike | None = None) -> onnx.ModelProto:
    """The model as a checked ``onnx.ModelProto`` with every tensor in memory.

    ``model``: a path (its external data is read from the model's folder), a ModelProto (its
    external data references, if any, relative to ``base_dir``), bytes, or an object with a
    ``model_proto`` attribute. A file that cannot be read, is not a valid ONNX model, or refers to
    external data outside its folder raises :class:`onnxrep.InputError` with one line. A given
    ModelProto is not changed (a copy is returned when its external data was read in)."""
    opened = _open(model, base_dir)
    return io.materialize(opened.model)


def save(model: ModelLike, path: str | os.PathLike, external_data: bool = False) -> None:
    """Write ``model`` to ``path`` atomically (a temporary file beside it, then a rename; nothing
    is left behind on failure). With ``external_data`` the weights go to ``<name>.data`` beside
    the model, laid out as ``onnx.save_model(..., save_as_external_data=True)`` lays them out;
    a model of 1.8 GB of tensors or more is always saved so (protobuf cannot hold 2 GiB).
    ``model``: a ModelProto or an object with a ``model_proto`` attribute (not changed). Raises
    :class:`onnxrep.OnnxrepError` with one line naming ``path`` when it cannot be written."""
    if not isinstance(external_data, bool):
        raise UsageError(f"external_data must be True or False, got {external_data!r}")
    if not isinstance(model, onnx.ModelProto):
        proto = getattr(model, "model_proto", None)
        if not isinstance(proto, onnx.ModelProto):
            raise UsageError(f"model must be an onnx.ModelProto or an object with a model_proto attribute, got {type(model).__name__}")
        model = proto
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    with quiet_graphsurgeon():
        io.save(model, path, external=external_data)


# --------------------------------------------------------------------------------------------
# input shapes
# --------------------------------------------------------------------------------------------


def check_writable(path: str | os.PathLike) -> None:
    """Raise :class:`onnxrep.OnnxrepError` (one line) unless a file can be written at ``path``
    (:func:`onnxrep.io.check_writable`); writes nothing that stays."""
    io.check_writable(path)


def check_input_shapes(input_shapes: Shapes | None) -> dict[str, list[int]] | None:
    """``input_shapes`` as ``{name: [dims]}``; :class:`UsageError` unless it maps names to
    sequences of integers >= 1."""
    if input_shapes is None:
        return None
    if not isinstance(input_shapes, Mapping):
        raise UsageError(f"input_shapes must be a dict of input name -> shape (a list of integers >= 1), got {type(input_shapes).__name__}")
    shapes: dict[str, list[int]] = {}
    for name, shape in input_shapes.items():
        if not isinstance(name, str):
            raise UsageError(f"input_shapes: input names must be strings, got {name!r}")
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
            raise UsageError(f"input_shapes: the shape of {name!r} must be a list of integers >= 1, got {shape!r}")
        dims = list(shape)
        if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in dims):
            raise UsageError(f"input_shapes: the shape of {name!r} must be a list of integers >= 1, got {dims!r}")
        shapes[name] = [int(d) for d in dims]
    return shapes


def _dim_text(d) -> str:
    if d.HasField("dim_value"):
        return str(d.dim_value)
    return d.dim_param or "?"


def fix_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> bool:
    """Give the model's inputs the static ``shapes`` (in place), and every symbolic dim they
    fix the same value in the graph's outputs and value_info. :class:`UsageError` for a name the
    model's inputs do not have, a rank or static size that differs, or one symbolic dim given two
    values; the model is changed only when every shape fits. Returns whether a dim changed."""
    declared = {vi.name: vi for vi in graph_inputs(model)}
    values: dict[str, int] = {}
    for name, shape in shapes.items():
        vi = declared.get(name)
        if vi is None:
            raise UsageError(f"input_shapes: the model has no input {name!r} (inputs: {', '.join(declared) or 'none'})")
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise UsageError(f"input_shapes: input {name!r} is not a tensor")
        dims = list(t.shape.dim)
        if t.HasField("shape") and len(dims) != len(shape):
            have = "[" + ", ".join(_dim_text(d) for d in dims) + "]"
            raise UsageError(f"input_shapes: input {name!r} has rank {len(dims)} {have}, got {len(shape)} dims {list(shape)}")
        for axis, (d, n) in enumerate(zip(dims, shape)):
            if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != n:
                raise UsageError(f"input_shapes: input {name!r} has size {d.dim_value} on axis {axis}, got {n}")
            if d.HasField("dim_param") and d.dim_param:
                if values.setdefault(d.dim_param, n) != n:
                    raise UsageError(f"input_shapes: dim {d.dim_param!r} is given two values, {values[d.dim_param]} and {n}")
    changed = False
    for name, shape in shapes.items():
        t = declared[name].type.tensor_type
        if not t.HasField("shape"):
            for n in shape:
                t.shape.dim.add().dim_value = n
            changed = True
            continue
        for d, n in zip(t.shape.dim, shape):
            if not d.HasField("dim_value") or d.dim_value != n:
                d.dim_value = n  # clears dim_param (one of)
                changed = True
    for vi in list(model.graph.output) + list(model.graph.value_info):
        if vi.type.HasField("tensor_type"):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_param") and d.dim_param in values:
                    d.dim_value = values[d.dim_param]
    return changed


# --------------------------------------------------------------------------------------------
# optimize / verify
# --------------------------------------------------------------------------------------------


class _Stages:
    """Wall time per stage, progress events and one log line per stage."""

    def __init__(self, progress: ProgressCallback | None):
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    def emit(self, stage: str, done: int = 0, total: int | None = None, detail: str = "", end: bool = False) -> None:
        if self.progress is not None:
            self.progress(Progress(stage, done, total, detail, end))

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[None]:
        log.debug("%s ...", name)
        self.emit(name, 0, total)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        self.emit(name, total or 0, total, end=True)

    def pass_step(self, rounds: int, name: str) -> None:
        log.debug("passes: round %d: %s", rounds, name)
        self.emit("passes", rounds, None, name)

    def verify_step(self, total: int) -> Callable[[int], None]:
        return lambda k: self.emit("verify", k, total)

    def total(self) -> float:
        return time.perf_counter() - self.start


def _validate_flags(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise UsageError(f"{name} must be True or False, got {value!r}")


def optimize(
    model: ModelLike,
    passes: str | Sequence[str] | None = None,
    skip: str | Iterable[str] = (),
    allow_cost_increase: bool = False,
    verify: bool = False,
    seeds: int = 3,
    dims: Mapping[str, int] | None = None,
    progress: ProgressCallback | None = None,
    on_mismatch: str = "fail",
    tolerance: float = 0.0,
    rtol: float | None = None,
    atol: float | None = None,
    inputs: Sequence[Feeds] = (),
    base_dir: str | os.PathLike | None = None,
    input_shapes: Shapes | None = None,
    cleanup: bool = True,
) -> tuple[onnx.ModelProto, Report]:
    """Return the optimized model and the :class:`Report`; the given model is not changed.

    ``model``: a path, an ``onnx.ModelProto`` (``base_dir``: the folder its external data is
    relative to), bytes, or an object with a ``model_proto`` attribute (torch's ``ONNXProgram``).
    ``passes`` selects passes by name (a list, or one comma-separated string; default: all, in
    registry order) and ``skip`` leaves some out. ``input_shapes`` (``{name: [1, 3, 224, 224]}``)
    fixes the shapes of inputs for the optimization and the verification, and the result has them.
    ``cleanup`` (default on) turns Constant nodes into initializers, removes Identity nodes, and
    drops or shares unused and duplicate initializers (:mod:`onnxrep.cleanup`).

    With ``verify``, both models run in onnxruntime on several input sets (``seeds`` random seeds
    at three magnitudes, symbolic batch 1 and 2, ``dims`` for other symbolic dims, and the feed
    dicts in ``inputs``), compared element by element within ``rtol``/``atol`` (default: from each
    output's dtype), and every rewritten region is checked on its own (:mod:`onnxrep.regions`);
    a mismatch raises :class:`onnxrep.VerificationError`. The result is in
    ``report.verification``. With ``on_mismatch="bisect"`` the rewrites responsible are left out
    instead (the failing regions first, then by bisection of the whole-model mismatch), and named
    in ``report.verification["bisected"]``. ``tolerance`` (opt-in, not exact) lets
    ``identical-filters`` merge filters that differ by at most that much. ``progress`` gets
    :class:`Progress` events. Invalid arguments raise :class:`onnxrep.UsageError` (a
    ``ValueError``) before any work.
    """
    out, report = _optimize(
        model, passes, skip, allow_cost_increase, verify, seeds, dims, progress, on_mismatch, tolerance,
        rtol, atol, inputs, base_dir, input_shapes, cleanup, output=None, external_data=None,
    )
    io.materialize(out)  # lazy references (from a file or a ModelProto) read in; nothing else
    return out, report


def optimize_file(
    model: ModelLike,
    output: str | os.PathLike,
    *,
    external_data: bool | None = None,
    passes: str | Sequence[str] | None = None,
    skip: str | Iterable[str] = (),
    allow_cost_increase: bool = False,
    verify: bool = True,
    seeds: int = 3,
    dims: Mapping[str, int] | None = None,
    progress: ProgressCallback | None = None,
    on_mismatch: str = "fail",
    tolerance: float = 0.0,
    rtol: float | None = None,
    atol: float | None = None,
    inputs: Sequence[Feeds] = (),
    base_dir: str | os.PathLike | None = None,
    input_shapes: Shapes | None = None,
    cleanup: bool = True,
    write_unchanged: bool = True,
) -> Report:
    """:func:`optimize` ``model`` (verified by default) and write the result to ``output``
    atomically (:func:`save`), only after verification passed; returns the report. ``output`` is
    checked to be writable before any work. ``external_data``: None writes external data when the
    input had it (always above 1.8 GB). Without verification a file's large weights are not read
    into memory: they are copied from the input file to the output where no pass changed them
    (the input file must not change meanwhile). With ``write_unchanged=False`` nothing is written
    when the result equals the input (``report.changed`` False; ``report.output`` None)."""
    _, report = _optimize(
        model, passes, skip, allow_cost_increase, verify, seeds, dims, progress, on_mismatch, tolerance,
        rtol, atol, inputs, base_dir, input_shapes, cleanup, output=output, external_data=external_data,
        write_unchanged=write_unchanged,
    )
    return report


def _optimize(
    model, passes, skip, allow_cost_increase, verify, seeds, dims, progress, on_mismatch, tolerance,
    rtol, atol, inputs, base_dir, input_shapes, cleanup, output, external_data, write_unchanged=True,
) -> tuple[onnx.ModelProto, Report]:
    """The one sequence behind :func:`optimize`, :func:`optimize_file` and the command line."""
    only, skip = pass_names(passes, "passes"), pass_names(skip, "skip")
    check = Check(seeds, dims, tuple(inputs), rtol, atol)
    _validate_flags(allow_cost_increase=allow_cost_increase, verify=verify, cleanup=cleanup, write_unchanged=write_unchanged)
    if external_data is not None and not isinstance(external_data, bool):
        raise UsageError(f"external_data must be True, False or None, got {external_data!r}")
    check_options(only, skip, on_mismatch, tolerance, check if verify else None)
    shapes = check_input_shapes(input_shapes)
    check_model_arg(model)
    if progress is not None and not callable(progress):
        raise UsageError(f"progress must be a callable taking an onnxrep.Progress, got {type(progress).__name__}")
    if output is not None:
        # where the result goes is checked before any work: nothing is done when it cannot be written
        io.check_writable(output)
    stages = _Stages(progress)
    with quiet_graphsurgeon():
        with stages.stage("load"):
            # without verification a file's weights are needed only where a pass reads them: they
            # stay in the file until then, and the result gets the untouched ones from there
            opened = _open(model, base_dir, lazy=not verify)
            src, reshaped, had_external = opened.model, False, opened.external
            interface_before = interface(src)
            if shapes:
                if not opened.owned:
                    copy = onnx.ModelProto()
                    copy.CopyFrom(src)
                    src = copy
                reshaped = fix_input_shapes(src, shapes)
            if verify:
                check_model_args(src, check)
        log.info("load: %s (%d nodes) in %.2f s", opened.name, len(src.graph.node), stages.seconds["load"])
        size_before = io.tensor_bytes(src)
        options = Options(allow_cost_increase=allow_cost_increase, tolerance=tolerance)
        out, report = _run(src, only, skip, options, check if verify else None, on_mismatch, cleanup, stages)
        del src, opened
        with stages.stage("not_rewritten"):
            left = misses.find(out, report)
            report.not_rewritten = misses.to_list(left)
            report._misses = left  # the Miss objects, for inspect
        report.input_shapes = shapes
        report.input_external_data = had_external
        report.size_before, report.size_after = size_before, io.tensor_bytes(out)
        report.interface_before, report.interface_after = interface_before, interface(out)
        report.changed = bool(report.rewritten or reshaped or any((report.cleanup or {}).values()))
        if output is not None and (write_unchanged or report.changed):
            external = report.input_external_data if external_data is None else external_data
            with stages.stage("write"):
                io.save(out, output, external=external)
            report.output = str(output)
            log.info("write: %s in %.2f s", output, stages.seconds["write"])
    report.seconds = dict(stages.seconds) | {"total": stages.total()}
    return out, report


def _run(model, only, skip, options: Options, check: Check | None, on_mismatch: str, cleanup: bool, stages: _Stages):
    """Passes, cleanup, checker, verification and the mismatch policy, timed by stage."""
    with stages.stage("passes"):
        raw, report = engine.run(model, only, skip, options, stages.pass_step)
        report = Report.from_engine(report)
    log.info("passes: %d rewritten in %d rounds, %.2f s", report.rewritten, report.rounds, stages.seconds["passes"])
    # with verification the rewritten regions are checked in the engine's output, where the
    # report's rewrites name them: the cleanup works on a copy then
    out = _cleaned(raw, report, model, cleanup, stages, copy=check is not None)
    # every tensor of the output is encoded from an array of its shape or comes from the checked input
    io.check(out, data=False)
    if check is None:
        return out, report
    total = progress_steps(check.seeds, check.inputs, model)
    with stages.stage("verify", total):
        result, region_checks = verify_rewrite(model, out, report, check, stages.verify_step(total), raw=raw)
    ok = passed(result, region_checks)
    log.info("verify: %s in %.2f s", "ok" if ok else "mismatch", stages.seconds["verify"])
    if ok:
        return out, report
    if on_mismatch != "bisect":
        raise mismatch_error(result, region_checks)
    with stages.stage("bisect"):
        out, report = bisect_mismatch(model, only, skip, options, report, check, region_checks, cleanup=cleanup)
        io.check(out, data=False)
    log.info("bisect: %d rewrite(s) left out in %.2f s", len(report.verification["left_out"]), stages.seconds["bisect"])
    return out, report


def _cleaned(raw: onnx.ModelProto, report: Report, model: onnx.ModelProto, cleanup: bool, stages: _Stages | None = None,
             copy: bool = True):
    """The engine's output ``raw`` after :func:`onnxrep.cleanup.cleanup` (on a copy with
    ``copy``, else in place), with the report's histogram and cost after it."""
    if not cleanup:
        return raw
    timer = stages.stage("cleanup") if stages is not None else _no_stage()
    with timer:
        if copy:
            out = onnx.ModelProto()
            out.CopyFrom(raw)
        else:
            out = raw
        report.cleanup = _cleanup.cleanup(out)
        report.ops_after = op_histogram(out)
        # weights by the engine's measure (float initializers and Constant node values), before and
        # after: a Constant node that became an initializer moved, it was not added
        before = report.cost_before
        report.cost_before = replace(before, params=engine.model_weights(model, before))
        after = report.cost_after
        report.cost_after = replace(after, params=engine.model_weights(out, Cost(0, _float_params(out), True)))
    if stages is not None:
        log.info("cleanup: %s", ", ".join(f"{k} {v}" for k, v in report.cleanup.items()))
    return out


@contextmanager
def _no_stage() -> Iterator[None]:
    yield


def _float_params(model: onnx.ModelProto) -> int:
    from .cost import _FLOAT_TYPES  # noqa: PLC0415

    return sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type in _FLOAT_TYPES)


def run(
    model: onnx.ModelProto,
    only: Sequence[str],
    skip: Sequence[str],
    options: Options,
    verify: Check | None = None,
    on_mismatch: str = "fail",
    progress=None,
    verify_progress: Callable[[int], None] | None = None,
    cleanup: bool = True,
) -> tuple[onnx.ModelProto, Report]:
    """The sequence of :func:`optimize` on a loaded model whose arguments were checked: passes,
    cleanup, checker, verification and the mismatch policy. ``progress(round, pass name)``,
    ``verify_progress(k)``: callbacks of the engine and of the comparison (kept for callers of
    this older entry point; :func:`optimize` takes :class:`Progress` events)."""

    class _Legacy(_Stages):
        def pass_step(self, rounds: int, name: str) -> None:
            if progress is not None:
                progress(rounds, name)

        def verify_step(self, total: int) -> Callable[[int], None] | None:
            return verify_progress

    with quiet_graphsurgeon():
        return _run(model, only, skip, options, verify, on_mismatch, cleanup, _Legacy(None))


def verify_rewrite(
    original: onnx.ModelProto,
    optimized: onnx.ModelProto,
    report: engine.Report,
    check: Check,
    progress: Callable[[int], None] | None = None,
    raw: onnx.ModelProto | None = None,
) -> tuple[VerifyResult, list]:
    """Whole-model comparison of ``optimized`` with ``original``, and per-region checks of
    ``report``'s rewrites in ``raw`` (the engine's output, in which the rewrites name their
    regions; default ``optimized``); both go into ``report.verification``."""
    result = compare_models(original, optimized, check, progress)
    # the probes of a region reach magnitudes far above the model's inputs: an absolute tolerance
    # chosen for those would not scale, so regions take the relative one and scale their own
    region_checks = regions.check_regions(original, optimized if raw is None else raw, report, rtol=check.rtol)
    report.verification = result.to_dict() | {
        "ok": passed(result, region_checks),
        "regions": [r.to_dict() for r in region_checks],
        "regions_summary": regions.summarize(region_checks),
    }
    return result, region_checks


def _differing(region_checks) -> list:
    """Region checks whose outputs differ (a region that could not be run is reported, not
    failed: the whole-model comparison still covers it)."""
    return [r for r in region_checks if r.status == regions.DIFFERS]


def passed(result: VerifyResult, region_checks) -> bool:
    """The whole-model comparison agrees and no region differs."""
    return result.ok and not _differing(region_checks)


#: How :func:`onnxrep.equivalence.compare` begins the message when the original model itself
#: fails to run on an input set it needs.
_ORIGINAL_FAILS = "the original model fails in onnxruntime"


def compare_models(a: onnx.ModelProto, b: onnx.ModelProto, check: Check, progress=None) -> VerifyResult:
    """:func:`onnxrep.equivalence.compare` with ``check``'s settings. When the original model
    ``a`` does not run on the inputs made for it, that is an :class:`InputError` (no rewrite is to
    blame), ending with the values the symbolic dims were given by default, if any."""
    try:
        return compare(
            a, b, seeds=check.seeds, dims=dict(check.dims or {}), progress=progress,
            rtol=check.rtol, atol=check.atol, inputs=list(check.inputs),
        )
    except VerificationError as err:
        message = str(err)
        if not message.startswith(_ORIGINAL_FAILS):
            raise
        defaults = default_dims(a, check.dims)
        if defaults:
            message += (
                f"; symbolic dims set by default: {', '.join(defaults)} (give their values with --dim NAME=INT "
                "or --input-shapes NAME:D1,D2,..; in Python dims= or input_shapes=)"
            )
        raise InputError(message) from None


def default_dims(model: onnx.ModelProto, dims: Mapping[str, int] | None = None) -> list[str]:
    """The dims of ``model``'s inputs that the verification sets by default (symbolic or unknown,
    not in ``dims``): ``NAME=value`` (``input[axis]=value`` for an unnamed one), batch dims at
    1 and 2."""
    dims = dims or {}
    out: list[str] = []
    for vi in graph_inputs(model):
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            if d.dim_param and d.dim_param in dims:
                continue
            value = "1 and 2" if is_batch_dim(axis, d) else str(DEFAULT_DIM)
            text = f"{d.dim_param}={value}" if d.dim_param else f"{vi.name}[{axis}]={value}"
            if text not in out:
                out.append(text)
    return out


def _rewrite_keys(report: engine.Report) -> list[str]:
    return [r["candidate"] for p in report.passes for r in p.rewrites]


def bisect_mismatch(model, only, skip, options: Options, failed: engine.Report, check: Check, region_checks=(), cleanup: bool = True):
    """Leave out the rewrites that break equivalence and return the verified result.

    Regions that failed their own check are left out first (they name their rewrite). If the
    whole model still differs, the remaining rewrites are bisected (halving the set left out).
    A VerificationError says what was tried when no set of rewrites explains the mismatch."""
    tried: list[str] = []

    def attempt(deny: set[str]):
        opts = Options(options.allow_cost_increase, frozenset(deny), options.tolerance)
        raw, report = engine.run(model, only, skip, opts)
        report = Report.from_engine(report)
        out = _cleaned(raw, report, model, cleanup)
        result, checks = verify_rewrite(model, out, report, check, raw=raw)
        tried.append(f"{len(deny)} left out: {'ok' if passed(result, checks) else 'mismatch'}")
        return out, report, result, checks

    culprits = list(dict.fromkeys(k for r in _differing(region_checks) for k in (r.candidates or [r.key])))
    if culprits:
        out, report, result, checks = attempt(set(culprits))
        if passed(result, checks):
            return _bisected(out, report, failed, culprits)
    suspects = [k for k in _rewrite_keys(failed) if k not in culprits]
    base = set(culprits)
    while len(suspects) > 1:
        half = suspects[: len(suspects) // 2]
        *_, result, checks = attempt(base | set(half))
        ok = passed(result, checks)
        suspects = half if ok else suspects[len(half):]
    if not suspects and not base:
        raise VerificationError(
            "bisect: the mismatch remains with no rewrite applied (the original model does not agree with itself "
            "under these inputs)"
        )
    out, report, result, checks = attempt(base | set(suspects))
    if not passed(result, checks):
        raise VerificationError(
            f"bisect could not isolate the rewrites responsible ({len(tried)} runs: {'; '.join(tried)}); "
            + str(mismatch_error(result, checks))
        )
    return _bisected(out, report, failed, sorted(base | set(suspects)))


def _bisected(out, report: Report, failed: engine.Report, culprits: list[str]):
    def pass_of(key: str) -> str:
        return next((p.name for p in failed.passes if any(r["candidate"] == key for r in p.rewrites)), "?")

    report.verification["bisected"] = {"culprit": culprits[0], "pass": pass_of(culprits[0])}
    report.verification["left_out"] = [{"candidate": k, "pass": pass_of(k)} for k in culprits]
    return out, report


def verify(
    a: ModelLike,
    b: ModelLike,
    seeds: int = 3,
    dims: Mapping[str, int] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    inputs: Sequence[Feeds] = (),
    progress: ProgressCallback | None = None,
    base_dir: str | os.PathLike | None = None,
    input_shapes: Shapes | None = None,
) -> VerifyResult:
    """Compare two models' outputs in onnxruntime on the same input sets (see :func:`optimize`),
    and check on its own each region in which ``b``'s graph differs from ``a``'s
    (:func:`onnxrep.regions.changed_regions`; ``result.regions``). ``a`` and ``b``: any kind of
    model :func:`optimize` takes (``base_dir`` for the external data of both); ``input_shapes``
    fixes the inputs' shapes of both. ``progress`` gets :class:`Progress` events (stage
    ``verify``)."""
    check = Check(seeds, dims, tuple(inputs), rtol, atol)
    check_options([], [], check=check)
    shapes = check_input_shapes(input_shapes)
    check_model_arg(a, "a")
    check_model_arg(b, "b")
    with quiet_graphsurgeon():
        ma, mb = (_open(m, base_dir, what=w) for m, w in ((a, "a"), (b, "b")))
        models = []
        for opened in (ma, mb):
            m = opened.model
            if shapes:
                if not opened.owned:
                    copy = onnx.ModelProto()
                    copy.CopyFrom(m)
                    m = copy
                fix_input_shapes(m, shapes)
            models.append(m)
        ma, mb = models
        check_model_args(ma, check)
        stages = _Stages(progress)
        total = progress_steps(check.seeds, check.inputs, ma)
        with stages.stage("verify", total):
            result = compare_models(ma, mb, check, stages.verify_step(total))
            # the regions in which the models differ in structure, found from their difference
            result.regions = regions.check_regions(ma, mb, None, rtol=check.rtol)
            result.ok = passed(result, result.regions)
    return result


#: Passes that only bring a graph into the form the folds match, or compute constants: a rewrite
#: of theirs alone is no training-time structure left in a model (:func:`inspect`); with them,
#: every ``normalize-*`` pass.
PREPARE_PASSES = frozenset({"constant-fold", "token-bn"})
_PREPARE_PREFIX = "normalize-"


def fold_passes() -> frozenset[str]:
    """The registered passes whose rewrites remove training-time structure (every pass but the
    ``normalize-*`` ones and :data:`PREPARE_PASSES`)."""
    return frozenset(n for n in engine.available_passes() if n not in PREPARE_PASSES and not n.startswith(_PREPARE_PREFIX))


def inspect(
    model: ModelLike,
    passes: str | Sequence[str] | None = None,
    skip: str | Iterable[str] = (),
    allow_cost_increase: bool = False,
    tolerance: float = 0.0,
    input_shapes: Shapes | None = None,
    base_dir: str | os.PathLike | None = None,
    cleanup: bool = True,
    progress: ProgressCallback | None = None,
) -> tuple[onnx.ModelProto, Report, list]:
    """What :func:`optimize` would do to ``model``, without verification: the optimized model, the
    report, and the structures left standing (:func:`onnxrep.misses.find`, the ``Miss`` objects
    behind ``report.not_rewritten``). ``report.passes`` name every rewrite; those of
    :func:`fold_passes` are training-time structure still in ``model`` (a CI gate fails on them)."""
    out, report = optimize(
        model, passes=passes, skip=skip, allow_cost_increase=allow_cost_increase, tolerance=tolerance,
        input_shapes=input_shapes, base_dir=base_dir, cleanup=cleanup, progress=progress,
    )
    return out, report, report._misses


def foldable(report: engine.Report) -> list[dict]:
    """The rewrites of :func:`fold_passes` in ``report`` (each rewrite entry with its ``pass``)."""
    folds = fold_passes()
    return [r | {"pass": p.name} for p in report.passes if p.name in folds for r in p.rewrites]


def mismatch_error(result: VerifyResult, region_checks=()) -> VerificationError:
    bad_regions = _differing(region_checks)
    if all(o.ok for o in result.outputs) and bad_regions:
        r = bad_regions[0]
        return VerificationError(
            f"rewrite {r.key} differs on its own: max abs error {r.max_abs_error:.3g} on "
            f"{r.method} ({len(bad_regions)} region(s) failed)"
        )
    return VerificationError(result.worst().describe())
