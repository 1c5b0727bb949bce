"""Equivalence checks in onnxruntime: same random inputs into two models, outputs compared.

Sessions run on the CPU with onnxruntime's graph optimizations disabled, so that what is compared is
the two graphs as written. Every output must agree within a tolerance relative to the reference
output's largest magnitude: float32 1e-5, float64 1e-12, float16 and bfloat16 1e-2 (fold error is
a few ulps of the merged weights, accumulated over a deep network); integer and bool outputs exactly.
A float output of a model that computes anywhere in float16 or bfloat16 (a Cast to it, weights or
intermediate values in it) gets at least their tolerance: its value carries their rounding (and a
fold there rounds differently), whatever its own type. Inputs in such a type alone do not count.

Widened comparison. onnxruntime's CPU provider has no kernel for some ops in some types (1.32: no
double Conv, ConvTranspose, AveragePool or GlobalAveragePool; no bfloat16 Add, Mul, Relu,
BatchNormalization, MatMul, Conv or AveragePool at all, and no bfloat16 numpy feeds). When either
model does not load as it is, or has bfloat16 inputs or outputs, and the models hold double or
bfloat16 tensors, both are compared widened: every double and bfloat16 tensor, initializer, Cast
target and Constant becomes float32, in the main graph, subgraphs and local functions, and the
random inputs are drawn in the original type and then converted. What that comparison means:

* bfloat16 -> float32 is exact for every value, so each widened model computes the bfloat16 model's
  math with float32 intermediates (no bfloat16 rounding between ops). The check measures how far the
  folded weights, rounded once to bfloat16, move the result from the original's, under the bfloat16
  tolerance (1e-2); it cannot see the intermediate rounding a bfloat16 runtime adds, which the
  original model has too.
* double -> float32 rounds the weights and the inputs, and the arithmetic is float32: the check is
  as sharp as a float32 one, so its tolerance is float32's (1e-5), not float64's. It catches any
  wrong fold (a structural error is of the order of the output), but not an error below float32
  resolution. The tests check double folds against a float64 fold of their own.

:attr:`VerifyResult.widened` names the types that were widened (empty when compared as written).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper, helper, numpy_helper

from . import io
from .errors import VerificationError, first_line
from .graph import _tensor_proto_array  # decodes lazily loaded initializers too
from .io import EXTERNAL_THRESHOLD, temporary_path, tensor_bytes

RELATIVE_TOLERANCE = {
    np.dtype(np.float32): 1e-5,
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float16): 1e-2,
}
BF16_TOLERANCE = 1e-2

#: Element types a widened comparison turns into float32.
WIDENED_TYPES = {onnx.TensorProto.DOUBLE: "double", onnx.TensorProto.BFLOAT16: "bfloat16"}
_LOW_PRECISION = {onnx.TensorProto.FLOAT16: np.dtype(np.float16), onnx.TensorProto.BFLOAT16: "bfloat16"}

#: A symbolic or unknown dim is set to this, unless named in ``dims`` (the batch axis: 1).
DEFAULT_DIM = 32


@dataclass
class OutputCheck:
    name: str
    max_abs_error: float
    max_magnitude: float
    tolerance: float
    ok: bool

    def to_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class VerifyResult:
    ok: bool
    seeds: int
    outputs: list[OutputCheck] = field(default_factory=list)
    widened: list[str] = field(default_factory=list)  # types compared as float32 (see module doc)

    def worst(self) -> OutputCheck | None:
        bad = [o for o in self.outputs if not o.ok] or self.outputs
        return max(bad, key=lambda o: o.max_abs_error / max(o.tolerance, 1e-300), default=None)

    def to_dict(self) -> dict:
        out = {"ok": self.ok, "seeds": self.seeds, "outputs": [o.to_dict() for o in self.outputs]}
        if self.widened:
            out["widened_to_float32"] = list(self.widened)
        return out


def reference_session(model: onnx.ModelProto, log_severity: int = 3) -> ort.InferenceSession:
    """A CPU session with onnxruntime's graph optimizations disabled: the graph runs as written.
    Initializers still left in their file (``io.load(..., lazy=True)``) are read in first, into a
    copy."""
    if any(io.lazy_source(t) is not None for t in external_data_helper._get_all_tensors(model)):
        model = io.materialize(_copy(model))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = log_severity
    providers = ["CPUExecutionProvider"]
    if tensor_bytes(model) < EXTERNAL_THRESHOLD:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    with temporary_path(model) as path:
        return ort.InferenceSession(path, opts, providers=providers)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of ``model`` on ``feeds`` (CPU, graph optimizations disabled)."""
    return reference_session(model).run(None, feeds)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (old IR versions list weights as inputs too)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def random_inputs(
    model: onnx.ModelProto, seed: int, dims: dict[str, int] | None = None, batch: int = 1
) -> dict[str, np.ndarray]:
    """Seeded random feeds: standard normal floats, small non-negative ints, random bools (a single
    bool alternates with the seed: True on even seeds, False on odd ones).

    A symbolic or unknown dim takes its value from ``dims`` by name, else ``batch`` on axis 0 and
    :data:`DEFAULT_DIM` elsewhere."""
    dims = dims or {}
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in graph_inputs(model):
        t = vi.type.tensor_type
        shape = []
        for axis, d in enumerate(t.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            else:
                shape.append(dims.get(d.dim_param, batch if axis == 0 else DEFAULT_DIM))
        np_dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        if np_dtype.kind == "f" or str(np_dtype) == "bfloat16":
            value = rng.standard_normal(shape).astype(np_dtype)
        elif np_dtype.kind in "iu":
            value = rng.integers(0, 4, size=shape).astype(np_dtype)
        elif np_dtype.kind == "b" and int(np.prod(shape)) == 1:
            # a single flag (an If condition): True and False on alternate seeds, so that two seeds
            # run both branches
            value = np.full(shape, seed % 2 == 0, dtype=bool)
        elif np_dtype.kind == "b":
            value = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise VerificationError(f"cannot make a random value for input '{vi.name}' of type {np_dtype}")
        feeds[vi.name] = value
    return feeds


def _tolerance(dtype: np.dtype) -> float | None:
    if str(dtype) == "bfloat16":
        return BF16_TOLERANCE
    return RELATIVE_TOLERANCE.get(np.dtype(dtype))


def compare_outputs(name: str, ref: np.ndarray, got: np.ndarray, rtol: float | None = None) -> OutputCheck:
    """Compare one output; ``rtol`` overrides the float tolerance of ``ref``'s dtype."""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape or ref.dtype != got.dtype:
        return OutputCheck(name, float("inf"), 0.0, 0.0, False)
    own = _tolerance(ref.dtype)
    rtol = None if own is None else (own if rtol is None else rtol)
    if rtol is None:  # integers, bools, strings: exact
        same = bool(np.array_equal(ref, got))
        return OutputCheck(name, 0.0 if same else float("inf"), 0.0, 0.0, same)
    r, g = ref.astype(np.float64), got.astype(np.float64)
    nan_r, nan_g = np.isnan(r), np.isnan(g)
    if not np.array_equal(nan_r, nan_g):
        return OutputCheck(name, float("nan"), 0.0, 0.0, False)
    finite = ~nan_r
    if not np.array_equal(np.isinf(r), np.isinf(g)) or not np.array_equal(r[np.isinf(r)], g[np.isinf(g)]):
        return OutputCheck(name, float("inf"), 0.0, 0.0, False)
    finite &= ~np.isinf(r)
    err = float(np.max(np.abs(r[finite] - g[finite]), initial=0.0))
    mag = float(np.max(np.abs(r[finite]), initial=0.0))
    tol = rtol * max(mag, float(np.finfo(np.float64).tiny))
    return OutputCheck(name, err, mag, tol, err <= tol)


def compare(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    seeds: int = 3,
    dims: dict[str, int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifyResult:
    """Run both models on ``seeds`` random input sets and compare every output (widened to float32
    where onnxruntime cannot run them as they are: see the module docstring)."""
    types = elem_types(reference) | elem_types(candidate)
    sess_a, sess_b, widened = _sessions(reference, candidate, types)
    inner = elem_types(reference, io=False) | elem_types(candidate, io=False)
    floor = max((_tolerance(dt) for t, dt in _LOW_PRECISION.items() if t in inner), default=0.0)
    names = [o.name for o in sess_a.get_outputs()]
    if names != [o.name for o in sess_b.get_outputs()]:
        raise VerificationError("the models have different outputs")
    worst: dict[str, OutputCheck] = {}
    for seed in range(seeds):
        feeds = random_inputs(reference, seed, dims)
        if widened:
            feeds = {k: _widen_array(v) for k, v in feeds.items()}
        try:
            ref = sess_a.run(names, feeds)
        except Exception as err:
            raise VerificationError(f"the original model fails in onnxruntime: {first_line(err)}") from None
        try:
            got = sess_b.run(names, feeds)
        except Exception as err:
            raise VerificationError(f"the optimized model fails in onnxruntime: {first_line(err)}") from None
        for name, r, g in zip(names, ref, got):
            own = _tolerance(np.asarray(r).dtype)
            check = compare_outputs(name, r, g, None if own is None else max(own, floor))
            prev = worst.get(name)
            if prev is None or not check.ok or (prev.ok and check.max_abs_error > prev.max_abs_error):
                if prev is None or prev.ok:
                    worst[name] = check
        if progress is not None:
            progress(seed + 1)
    outputs = [worst[n] for n in names]
    return VerifyResult(all(o.ok for o in outputs), seeds, outputs, widened)


def _open(model: onnx.ModelProto, which: str) -> ort.InferenceSession:
    try:
        return reference_session(model)
    except Exception as err:
        raise VerificationError(f"the {which} model does not load in onnxruntime: {first_line(err)}") from None


def _sessions(reference: onnx.ModelProto, candidate: onnx.ModelProto, types: set[int]):
    """Sessions of both models as written, else (for double and bfloat16 models that onnxruntime
    cannot load or feed as they are) of both widened to float32; and the widened type names."""
    wide = [WIDENED_TYPES[t] for t in sorted(WIDENED_TYPES) if t in types]
    if not wide:
        return _open(reference, "original"), _open(candidate, "optimized"), []
    if onnx.TensorProto.BFLOAT16 not in _io_types(reference) | _io_types(candidate):
        try:
            return _open(reference, "original"), _open(candidate, "optimized"), []
        except VerificationError:
            pass
    return (
        _open(widen(reference), "original (widened to float32)"),
        _open(widen(candidate), "optimized (widened to float32)"),
        wide,
    )


# --------------------------------------------------------------------------------------------
# Element types and widening to float32
# --------------------------------------------------------------------------------------------

#: Integer attributes that name an element type (Cast ``to``; ``dtype`` of the random and EyeLike
#: generators).
_TYPE_ATTRS = ("to", "dtype")


def _graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph nested in its nodes' attributes."""
    yield graph
    for node in graph.node:
        for sub in _node_subgraphs(node):
            yield from _graphs(sub)


def _node_subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _all_nodes(model: onnx.ModelProto):
    for graph in _graphs(model.graph):
        yield from graph.node
    for function in model.functions:
        for node in function.node:
            yield node
            for sub in _node_subgraphs(node):
                for graph in _graphs(sub):
                    yield from graph.node


def _type_elems(tp: onnx.TypeProto):
    kind = tp.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        yield getattr(tp, kind).elem_type
    elif kind in ("sequence_type", "optional_type"):
        yield from _type_elems(getattr(tp, kind).elem_type)
    elif kind == "map_type":
        yield from _type_elems(tp.map_type.value_type)


def _io_types(model: onnx.ModelProto) -> set[int]:
    return {e for vi in list(model.graph.input) + list(model.graph.output) for e in _type_elems(vi.type)}


def elem_types(model: onnx.ModelProto, io: bool = True) -> set[int]:
    """Element types a model holds or computes in: of its declared values, initializers, constant
    attributes and Cast targets, in the main graph, subgraphs and local functions. With ``io``
    false, the main graph's inputs and outputs are left out (a float16 input cast to float32 at
    once is no float16 arithmetic; the tolerance of an output's own type applies anyway)."""
    types: set[int] = set()
    infos = [vi for g in _graphs(model.graph) for vi in list(g.input) + list(g.output) + list(g.value_info)]
    if not io:
        infos = infos[len(model.graph.input) + len(model.graph.output) :]
    infos += [vi for f in model.functions for vi in getattr(f, "value_info", [])]
    for vi in infos:
        types.update(_type_elems(vi.type))
    for g in _graphs(model.graph):
        types.update(t.data_type for t in g.initializer)
        types.update(t.values.data_type for t in g.sparse_initializer)
    for node in _all_nodes(model):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                types.add(attr.t.data_type)
            elif attr.type == onnx.AttributeProto.TENSORS:
                types.update(t.data_type for t in attr.tensors)
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                types.add(attr.sparse_tensor.values.data_type)
            elif attr.type == onnx.AttributeProto.INT and attr.name in _TYPE_ATTRS and _default(node):
                types.add(attr.i)
    types.discard(0)
    return types


def _default(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _widen_array(array: np.ndarray) -> np.ndarray:
    dtype = np.asarray(array).dtype
    if dtype == np.float64 or str(dtype) == "bfloat16":
        return np.asarray(array).astype(np.float32)
    return array


def _widen_tensor(tensor: onnx.TensorProto) -> None:
    if tensor.data_type in WIDENED_TYPES:
        try:
            values = _tensor_proto_array(tensor)  # also reads initializers left in their file
        except Exception as err:  # external data that cannot be read
            raise VerificationError(f"cannot widen tensor '{tensor.name}' to float32: {first_line(err)}") from None
        tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), tensor.name))


def _widen_type(tp: onnx.TypeProto) -> None:
    kind = tp.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        t = getattr(tp, kind)
        if t.elem_type in WIDENED_TYPES:
            t.elem_type = onnx.TensorProto.FLOAT
    elif kind in ("sequence_type", "optional_type"):
        _widen_type(getattr(tp, kind).elem_type)
    elif kind == "map_type":
        _widen_type(tp.map_type.value_type)


def _widen_node(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            _widen_tensor(attr.t)
        elif attr.type == onnx.AttributeProto.TENSORS:
            for t in attr.tensors:
                _widen_tensor(t)
        elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
            _widen_tensor(attr.sparse_tensor.values)
        elif attr.type == onnx.AttributeProto.INT and attr.name in _TYPE_ATTRS and _default(node):
            if attr.i in WIDENED_TYPES:
                attr.i = onnx.TensorProto.FLOAT
        elif attr.type == onnx.AttributeProto.TYPE_PROTO:
            _widen_type(attr.tp)
        elif attr.type == onnx.AttributeProto.TYPE_PROTOS:
            for tp in attr.type_protos:
                _widen_type(tp)
        elif attr.type == onnx.AttributeProto.GRAPH:
            _widen_graph(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                _widen_graph(g)


def _widen_graph(graph: onnx.GraphProto) -> None:
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        _widen_type(vi.type)
    for t in graph.initializer:
        _widen_tensor(t)
    for t in graph.sparse_initializer:
        _widen_tensor(t.values)
    for node in graph.node:
        _widen_node(node)


def widen(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every double and bfloat16 value, weight, constant and Cast target
    in float32 (main graph, subgraphs, local functions); other types are left as they are."""
    out = _copy(model)
    _widen_graph(out.graph)
    for function in out.functions:
        for vi in getattr(function, "value_info", []):
            _widen_type(vi.type)
        for node in function.node:
            _widen_node(node)
    return out
