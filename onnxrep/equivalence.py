"""Equivalence checks in onnxruntime: same random inputs into two models, outputs compared.

Sessions run on the CPU with onnxruntime's graph optimizations disabled, so that what is compared is
the two graphs as written. Every output must agree within a tolerance relative to the reference
output's largest magnitude: float32 1e-5, float64 1e-12, float16 and bfloat16 1e-2 (fold error is
a few ulps of the merged weights, accumulated over a deep network); integer and bool outputs exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .errors import VerificationError, first_line
from .io import EXTERNAL_THRESHOLD, temporary_path, tensor_bytes

RELATIVE_TOLERANCE = {
    np.dtype(np.float32): 1e-5,
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float16): 1e-2,
}
BF16_TOLERANCE = 1e-2

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

    def worst(self) -> OutputCheck | None:
        bad = [o for o in self.outputs if not o.ok] or self.outputs
        return max(bad, key=lambda o: o.max_abs_error / max(o.tolerance, 1e-300), default=None)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "seeds": self.seeds, "outputs": [o.to_dict() for o in self.outputs]}


def reference_session(model: onnx.ModelProto, log_severity: int = 3) -> ort.InferenceSession:
    """A CPU session with onnxruntime's graph optimizations disabled: the graph runs as written."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = log_severity
    providers = ["CPUExecutionProvider"]
    if tensor_bytes(model) < EXTERNAL_THRESHOLD:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    with temporary_path(model) as path:
        return ort.InferenceSession(path, opts, providers=providers)


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
    """Seeded random feeds: standard normal floats, small non-negative ints, random bools.

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


def compare_outputs(name: str, ref: np.ndarray, got: np.ndarray) -> OutputCheck:
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape or ref.dtype != got.dtype:
        return OutputCheck(name, float("inf"), 0.0, 0.0, False)
    rtol = _tolerance(ref.dtype)
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
    """Run both models on ``seeds`` random input sets and compare every output."""
    try:
        sess_a = reference_session(reference)
    except Exception as err:
        raise VerificationError(f"the original model does not load in onnxruntime: {first_line(err)}") from None
    try:
        sess_b = reference_session(candidate)
    except Exception as err:
        raise VerificationError(f"the optimized model does not load in onnxruntime: {first_line(err)}") from None
    names = [o.name for o in sess_a.get_outputs()]
    if names != [o.name for o in sess_b.get_outputs()]:
        raise VerificationError("the models have different outputs")
    worst: dict[str, OutputCheck] = {}
    for seed in range(seeds):
        feeds = random_inputs(reference, seed, dims)
        try:
            ref = sess_a.run(names, feeds)
        except Exception as err:
            raise VerificationError(f"the original model fails in onnxruntime: {first_line(err)}") from None
        try:
            got = sess_b.run(names, feeds)
        except Exception as err:
            raise VerificationError(f"the optimized model fails in onnxruntime: {first_line(err)}") from None
        for name, r, g in zip(names, ref, got):
            check = compare_outputs(name, r, g)
            prev = worst.get(name)
            if prev is None or not check.ok or (prev.ok and check.max_abs_error > prev.max_abs_error):
                if prev is None or prev.ok:
                    worst[name] = check
        if progress is not None:
            progress(seed + 1)
    outputs = [worst[n] for n in names]
    return VerifyResult(all(o.ok for o in outputs), seeds, outputs)
