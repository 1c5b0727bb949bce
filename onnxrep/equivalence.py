"""Equivalence checks in onnxruntime: the same inputs into two models, outputs compared element by
element.

Sessions run on the CPU with onnxruntime's graph optimizations disabled, so that what is compared is
the two graphs as written.

Input sets. For each seed, seeded random inputs (standard normal floats, small non-negative ints,
random bools) at magnitudes x1, x10 and x1000 (:data:`MAGNITUDES`; float16 inputs at most x100,
:data:`FLOAT16_MAX_MAGNITUDE`), so that a difference that shows only for large values (a clip at 6,
a ``Where(x > 6)``) is seen; a magnitude at which the original model's outputs overflow to inf or
NaN (where they do not at x1) is skipped and named in :attr:`VerifyResult.skipped`, and so is a
set other than a seed's first on which the original fails to run (a model that only runs at batch
1). A model without float inputs runs at x1 only. A symbolic batch dim (axis 0 of an input, or a
dim named like ``N``/``batch``) is run at 1 and at 2 (:data:`BATCH_SIZES`; batch 2 with seed 0 at
x1 only, to keep the cost down), unless ``dims`` names it; other symbolic dims take ``dims`` or
:data:`DEFAULT_DIM`; static dims their declared size. User feed dicts (``inputs``) are run as
given. Every set is described by an :class:`InputSet` (its name, e.g. ``"seed0 x10"`` or
``"seed0 x1 batch2"``, and the input shapes). For RepVGG-A0 at 224x224 the default (3 seeds: 9
sets, 10 with a symbolic batch) takes 2.3x (2.8x) the time of the earlier 3 sets at x1.

Tolerance. Each output is compared element by element, numpy style::

    |candidate - reference| <= atol + rtol * |reference|
    rtol = RTOL[dtype of the output]            (float32 2e-5, float64 1e-12, float16 1e-2, bfloat16 8e-2)
    atol = rtol * (scale + tiny),  scale = median of the nonzero |reference| of that output in that
                                   input set, tiny = the dtype's smallest normal number

so an error is measured against the element itself, or against the output's typical magnitude
where the element is smaller than that (near zero, where a correct fold's rounding error does not
shrink with the value: it is a rounding of sums whose terms are of the output's typical size).
The scale is a median, not a maximum or an RMS, so that a few large elements cannot widen the
tolerance of the others: one element of 1e5 among values of order 1 leaves the scale at order 1
(a maximum-relative rule would allow an error of 1e5 * rtol everywhere). Only if more than half
the nonzero elements were large could the scale rise, and then it is their typical size. An
output that is zero everywhere has an atol of rtol * tiny (1e-38 * rtol in float32; below tiny a
float keeps an absolute, not a relative, precision): in effect it must match exactly. Integer,
bool and string outputs must be equal. NaN and inf must be at the same places (inf with the same
sign) in both.

Sensitivity. Where a float output still differs, the original is run again on the same input set
with its float inputs moved by up to ``SENSITIVITY_SCALE * rtol`` (4 rtol, relative, uniform; two
random draws), and each element may also differ by the largest change that makes to the
original's own output there. That is the output's conditioning at that input, which the rule
above cannot know: a softmax or exponential of large values turns a fold's rounding into a
relative error far above rtol (a softmax of logits in the thousands moves by the logits' absolute
rounding error), and so does heavy cancellation. An error of the kinds the rule is there for (a
clip, a 1e-3 scale, a wrong weight) is far beyond that change and still fails. Outputs computed
through a discrete selection get no such allowance (a perturbation could flip the selection;
they go through the tie check below). :attr:`OutputCheck.notes` names the input sets where it
was needed.

The defaults were measured on the folds of :mod:`onnxrep.models` (all ten families, 20 to 116
rewrites, 22 to 30 layers deep, at 64x64 and 224x224, inputs x1/x10/x1000, batch 1 and 2): the
largest ``|a-b| / (scale + |ref|)`` of a correct fold is 2e-6 to 5e-6 in float32 (a
re-association of a K-term float32 sum rounds by about sqrt(K) ulps, carried through every layer
after it: some 30 ulps in all), 1e-3 to 5e-3 in float16 and 1e-2 to 4e-2 in bfloat16 (widened,
see below: the folded weights rounded once to bfloat16's 8 significant bits); about 5 ulps of each
16-bit type. The defaults keep a margin of 2 to 4 over the deepest of those: float32 2e-5 (an error of
1e-4 relative to an element, or 4e-5 of the output's typical magnitude, fails), float16 1e-2 and
bfloat16 8e-2, about 10 ulps of each; not tighter, or correct folds of deep networks would fail.
float64 keeps the 1e-12 of the earlier maximum-relative rule. ``rtol`` and ``atol`` (keywords of
:func:`compare`) replace the defaults for every output; ``rtol`` alone keeps ``atol = rtol *
scale``.

An output's rtol is that of its own dtype, or of float16 / bfloat16 if the *original* model
computes that output (its own ancestors in the main graph) through those types: a Cast to them,
weights or intermediate values in them, or a subgraph or local function that holds them. A float16
output beside a float32 one does not loosen the float32 one; a float16 input cast up at once is no
float16 arithmetic. The candidate's types never loosen anything.

Discrete selections. An output computed (in the original's main graph) through TopK, ArgMax,
ArgMin, NonMaxSuppression or a comparison (Greater, Less, Equal, ...) may differ in an exact
rewrite: two near-equal scores swap places when their rounding does. A mismatch of such an output
is reported as a tie (ok, with a note on the output) only when all of these hold:

* the tensors read and written by those selection nodes exist under the same names in both
  models, and the candidate computes them with a node of the same type and attributes;
* every selection input agrees within the tolerance (both models run again with them as extra
  outputs);
* each selection that differs is a near tie on the original's own inputs: the candidate's TopK
  picks values equal to the original's within twice the tolerance, its ArgMax/ArgMin points at a
  value within twice the tolerance of the original's extreme, its comparisons differ only where
  the two operands are within twice the tolerance of each other (NonMaxSuppression: the same node
  on agreeing inputs);
* the candidate, run with the original's selection results in place of its own, agrees with the
  original within the tolerance (so an error after the selection is not excused).

Otherwise the output fails as usual, with a note saying why the mismatch is not a tie. Selections
inside If/Loop/Scan bodies are not examined.

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
  tolerance; it cannot see the intermediate rounding a bfloat16 runtime adds, which the original
  model has too.
* double -> float32 rounds the weights and the inputs, and the arithmetic is float32: the check is
  as sharp as a float32 one, so its tolerance is float32's, not float64's. It catches any wrong fold
  (a structural error is of the order of the output), but not an error below float32 resolution.
  The tests check double folds against a float64 fold of their own.

:attr:`VerifyResult.widened` names the types that were widened (empty when compared as written).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper, helper, numpy_helper

from . import io, ops
from .errors import VerificationError, first_line
from .graph import _tensor_proto_array  # decodes lazily loaded initializers too
from .io import EXTERNAL_THRESHOLD, temporary_path, tensor_bytes

#: Default relative tolerance of a float output, by its dtype (see the module docstring).
RTOL = {
    np.dtype(np.float32): 2e-5,
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float16): 1e-2,
}
BF16_TOLERANCE = 8e-2
RELATIVE_TOLERANCE = RTOL  # the earlier name

#: Input magnitudes of every seed, and the largest for float16 inputs (65504 is its largest value).
MAGNITUDES = (1, 10, 1000)
FLOAT16_MAX_MAGNITUDE = 100
#: Values a symbolic batch dim takes (the first in every set, the others with seed 0 at x1 only).
BATCH_SIZES = (1, 2)
#: Names of symbolic dims taken for a batch dim on any axis (axis 0 is one whatever its name).
BATCH_DIM_NAME = re.compile(r"^(n|b|bs|nb|.*batch.*)$", re.IGNORECASE)

#: The original's sensitivity (see the module docstring): its float inputs moved by up to
#: ``SENSITIVITY_SCALE * rtol`` (relative, uniform), ``SENSITIVITY_DRAWS`` random draws.
SENSITIVITY_SCALE = 4
SENSITIVITY_DRAWS = 2

#: Element types a widened comparison turns into float32.
WIDENED_TYPES = {onnx.TensorProto.DOUBLE: "double", onnx.TensorProto.BFLOAT16: "bfloat16"}
_LOW_PRECISION = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}

#: A symbolic or unknown dim is set to this, unless named in ``dims`` (a batch dim: 1 or 2).
DEFAULT_DIM = 32


def rtol_for(dtype) -> float | None:
    """The default relative tolerance of an array of ``dtype``; None for exact (non-float) types."""
    if str(dtype) == "bfloat16":
        return BF16_TOLERANCE
    return RTOL.get(np.dtype(dtype))


_tolerance = rtol_for  # the earlier name


def _elem_rtol(elem_type: int) -> float | None:
    if elem_type == onnx.TensorProto.BFLOAT16:
        return BF16_TOLERANCE
    try:
        return rtol_for(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class InputSet:
    """One set of inputs both models ran on."""

    name: str
    shapes: dict[str, list[int]]
    seed: int | None = None
    magnitude: float | None = None
    batch: int | None = None
    source: str = "random"  # or "user"

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class OutputCheck:
    """The comparison of one output, over every input set (the worst one is described).

    ``max_abs_error``: the largest ``|a-b|``; ``ratio``: the largest ``|a-b| / (atol +
    rtol*|ref|)`` (ok when at most 1); ``max_rel_error``: the largest ``|a-b| / max(|ref|,
    scale)``; ``where``, ``ref_value``, ``got_value``, ``tolerance`` (the allowed error there),
    ``scale``, ``atol``, ``rtol`` and ``input_set``: of the element with the largest ratio."""

    name: str
    max_abs_error: float
    max_magnitude: float
    tolerance: float
    ok: bool
    max_rel_error: float = 0.0
    ratio: float = 0.0
    rtol: float = 0.0
    atol: float = 0.0
    scale: float = 0.0
    where: list[int] | None = None
    ref_value: float | None = None
    got_value: float | None = None
    input_set: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = self.__dict__.copy()
        out["notes"] = list(self.notes)
        return out

    def describe(self) -> str:
        """One line: where the worst element is and how far it is off."""
        text = f"output '{self.name}'"
        if self.ok:
            text += f" agrees: worst relative error {self.max_rel_error:.3g} (rtol {self.rtol:.3g})"
        elif self.where is None and self.notes:
            text += f" differs: {self.notes[0]}"
        else:
            text += " differs"
            if self.where is not None:
                text += f" at {list(self.where)}"
            if self.input_set:
                text += f" in input set '{self.input_set}'"
            if self.ref_value is not None:
                text += f": {self.got_value:.7g} where the original has {self.ref_value:.7g}"
            if self.rtol or self.atol:
                text += (
                    f", error {abs(self.got_value - self.ref_value) if self.ref_value is not None else self.max_abs_error:.3g}"
                    f" > tolerance {self.tolerance:.3g} (atol {self.atol:.3g} + rtol {self.rtol:.3g} * |ref|)"
                )
            text += f"; max abs error {self.max_abs_error:.3g}, max relative error {self.max_rel_error:.3g}"
        return text


@dataclass
class VerifyResult:
    ok: bool
    seeds: int
    outputs: list[OutputCheck] = field(default_factory=list)
    widened: list[str] = field(default_factory=list)  # types compared as float32 (see module doc)
    input_sets: list[InputSet] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # input sets left out, and why
    regions: list = field(default_factory=list)  # onnxrep.regions.RegionCheck, where they were checked

    def worst(self) -> OutputCheck | None:
        bad = [o for o in self.outputs if not o.ok] or self.outputs
        return max(bad, key=_badness, default=None)

    def summary(self) -> str:
        """One line, e.g. ``ok: 12 input sets (seeds 0-2 x1/x10/x1000, batch 1/2); worst relative
        error 3e-06 (output 'y')``."""
        text = f"{'ok' if self.ok else 'FAILED'}: {len(self.input_sets)} input sets"
        described = _describe_sets(self.input_sets)
        if described:
            text += f" ({described})"
        if self.widened:
            text += f", widened to float32 ({', '.join(self.widened)})"
        if not self.ok:
            text += f"; {self.worst().describe()}"
        elif any(o.rtol for o in self.outputs):
            w = max((o for o in self.outputs if o.rtol), key=lambda o: o.max_rel_error)
            text += f"; worst relative error {w.max_rel_error:.2g} (output '{w.name}', rtol {w.rtol:.2g})"
        elif self.outputs:
            text += "; outputs equal"
        sensitive = [o.name for o in self.outputs if any(n.startswith("within the original's own") for n in o.notes)]
        if sensitive:
            text += f"; within the original's own sensitivity for {', '.join(repr(t) for t in sensitive)}"
        ties = [o.name for o in self.outputs if any(n.startswith("tie") for n in o.notes)]
        if ties:
            text += f"; near ties in discrete selections accepted for {', '.join(repr(t) for t in ties)}"
        if self.skipped:
            text += f"; {len(self.skipped)} skipped ({self.skipped[0]}{', ...' if len(self.skipped) > 1 else ''})"
        if self.regions:
            differ = [r.key for r in self.regions if getattr(r, "status", "") == "differs"]
            proven = sum(1 for r in self.regions if r.proven)
            text += f"; {len(self.regions)} changed regions checked on their own, {proven} proven"
            if differ:
                text += f", {len(differ)} differ ({differ[0]}{', ...' if len(differ) > 1 else ''})"
        return text

    def to_dict(self) -> dict:
        out = {
            "ok": self.ok,
            "seeds": self.seeds,
            "outputs": [o.to_dict() for o in self.outputs],
            "input_sets": [s.to_dict() for s in self.input_sets],
            "summary": self.summary(),
        }
        if self.skipped:
            out["skipped"] = list(self.skipped)
        if self.widened:
            out["widened_to_float32"] = list(self.widened)
        if self.regions:
            out["regions"] = [r.to_dict() for r in self.regions]
        return out


def _badness(o: OutputCheck) -> float:
    ratio = getattr(o, "ratio", 0.0)
    if ratio or not o.tolerance:
        return ratio
    return o.max_abs_error / max(o.tolerance, 1e-300)


def _describe_sets(sets: list[InputSet]) -> str:
    random = [s for s in sets if s.source == "random"]
    parts = []
    if random:
        seeds = sorted({s.seed for s in random})
        seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
        if seeds != list(range(seeds[0], seeds[-1] + 1)):
            seed_text = "seeds " + ",".join(map(str, seeds))
        mags = sorted({s.magnitude for s in random})
        parts.append(seed_text + " " + "/".join(f"x{m:g}" for m in mags))
        batches = sorted({s.batch for s in random if s.batch is not None})
        if batches:
            parts.append("batch " + "/".join(map(str, batches)))
    users = sum(1 for s in sets if s.source == "user")
    if users:
        parts.append(f"{users} given")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Sessions and inputs
# --------------------------------------------------------------------------------------------


def reference_session(model: onnx.ModelProto, log_severity: int = 4) -> ort.InferenceSession:
    """A CPU session with onnxruntime's graph optimizations disabled: the graph runs as written.
    onnxruntime logs nothing below ``log_severity`` (4: fatal only): its errors reach the user as
    the one-line message of the exception they raise, not as its own coloured log lines.
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


def _symbolic(d) -> bool:
    return not (d.HasField("dim_value") and d.dim_value > 0)


def is_batch_dim(axis: int, d) -> bool:
    """Whether a symbolic or unknown dim is a batch dim: axis 0, or named like one."""
    return _symbolic(d) and (axis == 0 or bool(d.dim_param and BATCH_DIM_NAME.match(d.dim_param)))


def has_symbolic_batch(model: onnx.ModelProto, dims: Mapping[str, int] | None = None) -> bool:
    """Whether some input has a symbolic batch dim that ``dims`` does not set."""
    dims = dims or {}
    return any(
        is_batch_dim(axis, d) and d.dim_param not in dims
        for vi in graph_inputs(model)
        for axis, d in enumerate(vi.type.tensor_type.shape.dim)
    )


def random_inputs(
    model: onnx.ModelProto,
    seed: int,
    dims: Mapping[str, int] | None = None,
    batch: int = 1,
    magnitude: float = 1.0,
) -> dict[str, np.ndarray]:
    """Seeded random feeds: standard normal floats times ``magnitude`` (float16 ones times at most
    :data:`FLOAT16_MAX_MAGNITUDE`), small non-negative ints, random bools (a single bool
    alternates with the seed: True on even seeds, False on odd ones). The values of a seed are the
    same at every magnitude, scaled.

    A symbolic or unknown dim takes its value from ``dims`` by name, else ``batch`` if it is a
    batch dim (axis 0, or named like one: :func:`is_batch_dim`) and :data:`DEFAULT_DIM`
    otherwise."""
    dims = dims or {}
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in graph_inputs(model):
        t = vi.type.tensor_type
        shape = []
        for axis, d in enumerate(t.shape.dim):
            if not _symbolic(d):
                shape.append(d.dim_value)
            elif d.dim_param in dims:
                shape.append(dims[d.dim_param])
            else:
                shape.append(batch if is_batch_dim(axis, d) else DEFAULT_DIM)
        np_dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        if np_dtype.kind == "f" or str(np_dtype) == "bfloat16":
            values = rng.standard_normal(shape)
            if magnitude != 1:
                values = values * (min(magnitude, FLOAT16_MAX_MAGNITUDE) if np_dtype == np.float16 else magnitude)
            value = values.astype(np_dtype)
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


def input_plan(
    model: onnx.ModelProto, seeds: int, dims: Mapping[str, int] | None = None
) -> list[tuple[int, float, int | None]]:
    """The random input sets :func:`compare` runs: (seed, magnitude, batch or None when the model
    has no free symbolic batch dim), grouped by seed then magnitude; x1 only when no input is a
    float."""
    batched = has_symbolic_batch(model, dims)
    scaled = any(_is_float(vi.type.tensor_type.elem_type) for vi in graph_inputs(model))
    plan = []
    for seed in range(seeds):
        for magnitude in MAGNITUDES if scaled else MAGNITUDES[:1]:
            if not batched:
                plan.append((seed, magnitude, None))
                continue
            for batch in BATCH_SIZES:
                if batch == BATCH_SIZES[0] or (seed == 0 and magnitude == MAGNITUDES[0]):
                    plan.append((seed, magnitude, batch))
    return plan


def progress_steps(seeds: int, inputs: Sequence = (), model: onnx.ModelProto | None = None) -> int:
    """How many times :func:`compare` calls ``progress``: once per seed and magnitude (of
    ``model``'s plan, :func:`input_plan`; all magnitudes when not given), and once per user input
    set."""
    if model is None:
        return seeds * len(MAGNITUDES) + len(inputs)
    return len({p[:2] for p in input_plan(model, seeds)}) + len(inputs)


def _is_float(elem_type: int) -> bool:
    return elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _set_name(seed: int, magnitude: float, batch: int | None) -> str:
    return f"seed{seed} x{magnitude:g}" + (f" batch{batch}" if batch is not None else "")


# --------------------------------------------------------------------------------------------
# Comparing one output
# --------------------------------------------------------------------------------------------


def _smallest_normal(dtype) -> float:
    """Below this, values are subnormal: their precision is absolute, not relative."""
    try:
        return float(np.finfo(dtype).tiny)
    except (TypeError, ValueError):  # bfloat16: float32's exponent range
        return float(np.finfo(np.float32).tiny)


def _fail(name: str, note: str, where=None) -> OutputCheck:
    inf = float("inf")
    return OutputCheck(name, inf, 0.0, 0.0, False, max_rel_error=inf, ratio=inf, where=where, notes=[note])


def _first_index(mask: np.ndarray) -> list[int] | None:
    idx = np.argwhere(mask)
    return [int(i) for i in idx[0]] if idx.size else None


def compare_outputs(
    name: str,
    ref: np.ndarray,
    got: np.ndarray,
    rtol: float | None = None,
    atol: float | None = None,
    sensitivity: np.ndarray | None = None,
) -> OutputCheck:
    """Compare one output element by element: ``|got - ref| <= atol + rtol * |ref|`` (see the
    module docstring). ``rtol`` replaces the default of ``ref``'s dtype; ``atol`` defaults to
    ``rtol`` times the median nonzero ``|ref|``; ``sensitivity`` (an array like ``ref``) is added
    to the allowed error of each element. Integers, bools and strings must be equal."""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape or ref.dtype != got.dtype:
        return _fail(name, f"shape {list(got.shape)} {got.dtype} where the original has {list(ref.shape)} {ref.dtype}")
    own = rtol_for(ref.dtype)
    if own is None:  # integers, bools, strings: exact
        differ = ref != got
        if not np.any(differ):
            return OutputCheck(name, 0.0, 0.0, 0.0, True)
        where = _first_index(differ)
        check = _fail(name, f"{int(np.count_nonzero(differ))} of {ref.size} elements differ", where)
        if ref.dtype.kind in "iub":
            r, g = ref.astype(np.float64), got.astype(np.float64)
            check.max_abs_error = float(np.max(np.abs(r - g)))
            check.max_magnitude = float(np.max(np.abs(r)))
            check.ref_value, check.got_value = float(r[tuple(where)]), float(g[tuple(where)])
        return check
    rtol = own if rtol is None else float(rtol)
    r, g = ref.astype(np.float64), got.astype(np.float64)
    nan_r, nan_g = np.isnan(r), np.isnan(g)
    if not np.array_equal(nan_r, nan_g):
        return _fail(name, "NaN where the other has a number", _first_index(nan_r != nan_g))
    inf_r, inf_g = np.isinf(r), np.isinf(g)
    if not np.array_equal(inf_r, inf_g) or not np.array_equal(r[inf_r], g[inf_g]):
        return _fail(name, "inf where the other has a number or the opposite inf", _first_index((inf_r | inf_g) & (r != g)))
    finite = ~(nan_r | inf_r)
    mag = np.where(finite, np.abs(r), 0.0)
    nonzero = mag[mag > 0]
    scale = float(np.median(nonzero)) if nonzero.size else 0.0
    atol = rtol * (scale + _smallest_normal(ref.dtype)) if atol is None else float(atol)
    diff = np.where(finite, np.abs(r - g), 0.0)
    allowed = atol + rtol * mag
    if sensitivity is not None:
        allowed = allowed + np.where(finite, np.nan_to_num(np.asarray(sensitivity, np.float64), posinf=0.0), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff > 0, diff / allowed, 0.0)
        rel = np.where(diff > 0, diff / np.maximum(mag, scale), 0.0)
    if ratio.size == 0:
        return OutputCheck(name, 0.0, 0.0, 0.0, True, rtol=rtol, atol=atol)
    flat = int(np.argmax(ratio))
    where = [int(i) for i in np.unravel_index(flat, ratio.shape)]
    worst = float(ratio.flat[flat])
    return OutputCheck(
        name,
        max_abs_error=float(diff.max()),
        max_magnitude=float(mag.max()),
        tolerance=float(allowed.flat[flat]),
        ok=bool(np.all(diff <= allowed)),
        max_rel_error=float(rel.max()),
        ratio=worst,
        rtol=rtol,
        atol=atol,
        scale=scale,
        where=where,
        ref_value=float(r.flat[flat]),
        got_value=float(g.flat[flat]),
    )


# --------------------------------------------------------------------------------------------
# What each output is computed through (the original's main graph)
# --------------------------------------------------------------------------------------------


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the scopes around it."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    reads: set[str] = set()
    for node in graph.node:
        reads.update(i for i in node.input if i and i not in defined)
        for sub in _node_subgraphs(node):
            reads |= _outer_reads(sub) - defined
        defined.update(o for o in node.output if o)
    return reads


def _reads(node: onnx.NodeProto) -> list[str]:
    names = [i for i in node.input if i]
    for sub in _node_subgraphs(node):
        names += sorted(_outer_reads(sub))
    return names


def _elem(vi: onnx.ValueInfoProto) -> int:
    return vi.type.tensor_type.elem_type if vi.type.WhichOneof("value") == "tensor_type" else 0


class _Lineage:
    """For each output of a model's main graph: the nodes it is computed through, the
    low-precision types those compute in, and the discrete selections among them."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.nodes = list(graph.node)
        producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.cones: dict[str, list[int]] = {}
        for out in graph.output:
            seen: set[int] = set()
            stack = [out.name]
            while stack:
                i = producer.get(stack.pop())
                if i is None or i in seen:
                    continue
                seen.add(i)
                stack.extend(_reads(self.nodes[i]))
            self.cones[out.name] = sorted(seen)
        self.computes = _low_precision_nodes(model)

    def low_types(self, output: str) -> set[int]:
        return {t for i in self.cones.get(output, []) for t in self.computes.get(i, ())}

    def selections(self, output: str) -> list[int]:
        return [
            i for i in self.cones.get(output, [])
            if _default(self.nodes[i]) and self.nodes[i].op_type in ops.SELECTION_OPS
        ]


def _low_in(types: set[int]) -> set[int]:
    return {t for t in types if t in _LOW_PRECISION}


def _low_precision_nodes(model: onnx.ModelProto) -> dict[int, set[int]]:
    """Main-graph node index -> the float16 / bfloat16 types it computes in: a Cast to them (from
    another type), a node reading a tensor of them, or a node whose subgraphs or local function
    hold them. A graph input of such a type that is only cast up counts for nothing."""
    graph = model.graph
    low: dict[str, int] = {}
    for t in graph.initializer:
        if t.data_type in _LOW_PRECISION:
            low[t.name] = t.data_type
    for vi in list(graph.input) + list(graph.value_info):
        if _elem(vi) in _LOW_PRECISION:
            low[vi.name] = _elem(vi)
    declared = {vi.name: _elem(vi) for vi in list(graph.value_info) + list(graph.output) if _elem(vi)}
    functions = {(f.domain, f.name): f for f in model.functions}
    computes: dict[int, set[int]] = {}
    for i, node in enumerate(graph.node):
        if _default(node) and node.op_type == ops.CONSTANT:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in _LOW_PRECISION:
                    low[node.output[0]] = attr.t.data_type
            continue
        if _default(node) and node.op_type == ops.CAST:
            to = next((a.i for a in node.attribute if a.name == "to"), 0)
            if to in _LOW_PRECISION:
                if low.get(node.input[0]) != to:
                    computes[i] = {to}
                low[node.output[0]] = to
            continue
        types = {low[x] for x in _reads(node) if x in low}
        for sub in _node_subgraphs(node):
            types |= _low_in(_graph_elem_types(sub))
        function = functions.get((node.domain, node.op_type))
        if function is not None:
            types |= _low_in(_function_elem_types(function))
        if not types:
            continue
        computes[i] = types
        for o in node.output:
            if o and declared.get(o, 0) in (0, *_LOW_PRECISION):
                low[o] = declared.get(o) or min(types)
    return computes


def _output_rtols(model: onnx.ModelProto, lineage: _Lineage, widened: bool) -> dict[str, tuple[float | None, list[str]]]:
    """Default rtol of each output (None: exact, or not known until its value is seen: 0.0 means
    'from the value's dtype') and a note when the original's low-precision arithmetic raised it."""
    out = {}
    for vi in model.graph.output:
        elem = _elem(vi)
        if widened and elem == onnx.TensorProto.DOUBLE:
            elem = onnx.TensorProto.FLOAT
        own = _elem_rtol(elem) if elem else 0.0
        lows = sorted(lineage.low_types(vi.name))
        notes = []
        if own is not None and lows:
            raised = max(_elem_rtol(t) for t in lows)
            if raised > (own or 0.0):
                names = "/".join(_LOW_PRECISION[t] for t in lows)
                notes.append(f"computed through {names} in the original: rtol {raised:g}")
                own = raised
        out[vi.name] = (own, notes)
    return out


# --------------------------------------------------------------------------------------------
# Discrete selections: ties
# --------------------------------------------------------------------------------------------


def _attr_key(node: onnx.NodeProto) -> list[bytes]:
    return sorted(a.SerializeToString(deterministic=True) for a in node.attribute)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = _copy(model)
    present = {o.name for o in out.graph.output}
    for name in names:
        if name not in present:
            vi = onnx.ValueInfoProto()
            vi.name = name
            out.graph.output.append(vi)
    return out


def _with_fed(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` in which the tensors of ``values`` are graph inputs instead of computed."""
    out = _copy(model)
    keep = [n for n in out.graph.node if not any(o in values for o in n.output)]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    for name, value in values.items():
        out.graph.input.append(
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))
        )
    return out


class _Ties:
    """Decides whether a mismatching output differs only by near ties in its discrete selections
    (see the module docstring), running both models again with the selections' tensors as
    outputs, and the candidate with the original's selection results fed in."""

    def __init__(self, reference, candidate, lineage: _Lineage, widened: bool, rtol, atol):
        self.reference, self.candidate, self.lineage = reference, candidate, lineage
        self.widened, self.rtol, self.atol = widened, rtol, atol
        self.producer = {o: n for n in candidate.graph.node for o in n.output if o}
        self.ref_inits = {t.name: t for t in reference.graph.initializer}
        self.cand_inits = {t.name: t for t in candidate.graph.initializer}
        self.feedable = {i.name for i in graph_inputs(reference)}
        self._sessions: dict[tuple, tuple] = {}

    def _session(self, model):
        return _open(widen(model) if self.widened else model, "original or optimized (selection check)")

    def check(self, name, failed: OutputCheck, rtol, feeds, ref_value, set_name) -> tuple[OutputCheck | None, str]:
        """(the check of the output with the original's selections fed to the candidate, a note) for
        a tie; (None, why not) otherwise."""
        nodes = [self.lineage.nodes[i] for i in self.lineage.selections(name)]
        if not nodes:
            return None, ""
        ops_text = ", ".join(sorted({f"{n.op_type} '{n.name or n.output[0]}'" for n in nodes}))
        for node in nodes:
            why = self._same_node(node)
            if why:
                return None, f"not a near tie of {ops_text}: {why}"
        data = sorted({i for n in nodes for i in n.input if i and i not in self.ref_inits})
        results = sorted({o for n in nodes for o in n.output if o})
        key = tuple(self.lineage.selections(name))
        if key not in self._sessions:
            fetch = [t for t in data + results if t not in self.feedable]
            self._sessions[key] = (
                fetch,
                self._session(_with_outputs(self.reference, fetch)),
                self._session(_with_outputs(self.candidate, fetch)),
            )
        fetch, sess_a, sess_b = self._sessions[key]
        try:
            ra = dict(zip(fetch, sess_a.run(fetch, feeds)))
            rb = dict(zip(fetch, sess_b.run(fetch, feeds)))
        except Exception as err:
            return None, f"not a near tie of {ops_text}: the selections could not be read back ({first_line(err)})"
        for t in self.feedable & set(data):
            ra[t] = rb[t] = np.asarray(feeds[t])
        atols = {}
        for t in data:
            own = rtol_for(ra[t].dtype)
            t_rtol = None if own is None else (self.rtol if self.rtol is not None else max(own, rtol))
            c = compare_outputs(t, ra[t], rb[t], t_rtol, self.atol)
            if not c.ok:
                return None, f"not a near tie of {ops_text}: their input '{t}' differs ({c.describe()})"
            atols[t] = (c.rtol, c.atol)
        flipped = [n for n in nodes if any(_exact_differs(ra[o], rb[o]) for o in n.output if o)]
        if not flipped:
            return None, f"not a near tie: the selections of {ops_text} agree, the difference comes from elsewhere"
        for node in flipped:
            try:
                why = _near_tie(node, ra, rb, atols)
            except (ValueError, IndexError, TypeError) as err:  # shapes the selection's rule does not fit
                why = f"{node.op_type} '{node.name}' cannot be checked ({first_line(err)})"
            if why:
                return None, f"not a near tie of {ops_text}: {why}"
        selected = {o: ra[o] for o in results}
        fed_key = ("fed",) + key
        if fed_key not in self._sessions:
            self._sessions[fed_key] = (None, None, self._session(_with_fed(self.candidate, selected)))
        try:
            got = self._sessions[fed_key][2].run([name], {**feeds, **selected})[0]
        except Exception as err:
            return None, f"not a near tie of {ops_text}: the optimized model does not run with the original's selections ({first_line(err)})"
        own = rtol_for(np.asarray(ref_value).dtype)
        check = compare_outputs(name, ref_value, got, None if own is None else (self.rtol if self.rtol is not None else rtol), self.atol)
        if not check.ok:
            return None, f"not a near tie: with the original's selections of {ops_text} fed in, {check.describe()}"
        names = ", ".join(sorted({f"{n.op_type} '{n.name or n.output[0]}'" for n in flipped}))
        return check, f"tie: {names} selected differently between near-equal inputs (which agree within the tolerance); with the original's selections the output agrees"

    def _same_node(self, node: onnx.NodeProto) -> str:
        outputs = [o for o in node.output if o]
        theirs = {id(self.producer.get(o)) for o in outputs}
        cand = self.producer.get(outputs[0])
        if cand is None or len(theirs) != 1:
            return f"the optimized model does not compute '{outputs[0]}' with one node"
        if (cand.op_type, cand.domain, list(cand.input), list(cand.output)) != (
            node.op_type, node.domain, list(node.input), list(node.output)
        ) or _attr_key(cand) != _attr_key(node):
            return f"the optimized model computes '{outputs[0]}' with a different node"
        for i in node.input:
            if i in self.ref_inits or i in self.cand_inits:
                a, b = self.ref_inits.get(i), self.cand_inits.get(i)
                if a is None or b is None or not np.array_equal(_tensor_proto_array(a), _tensor_proto_array(b)):
                    return f"the constant input '{i}' differs"
        return ""


def _exact_differs(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if rtol_for(a.dtype) is not None:  # a float result (TopK values) follows the indices
        return False
    return a.shape != b.shape or not np.array_equal(a, b)


def _within(values: np.ndarray, reference: np.ndarray, rtol: float, atol: float) -> bool:
    v, r = np.asarray(values, np.float64), np.asarray(reference, np.float64)
    return v.shape == r.shape and bool(np.all(np.abs(v - r) <= 2 * (atol + rtol * np.abs(r))))


def _near_tie(node: onnx.NodeProto, ra: dict, rb: dict, atols: dict) -> str:
    """Why the candidate's result of a selection ``node`` is not a near tie on the original's
    inputs (empty if it is)."""
    x = node.input[0]
    rtol, atol = atols.get(x, (0.0, 0.0))
    op = node.op_type
    if op == ops.TOPK:
        axis = _attr(node, "axis", -1)
        values, indices = ra[node.output[0]], rb[node.output[1]]
        if indices.shape != values.shape:
            return f"{op} '{node.name}' selects {list(indices.shape)} values where the original selects {list(values.shape)}"
        picked = np.take_along_axis(ra[x], indices.astype(np.int64), axis=axis)
        if not _within(np.sort(picked, axis=axis), np.sort(values, axis=axis), rtol, atol):
            return f"{op} '{node.name}' selects values that are not near the original's selection"
        return ""
    if op in (ops.ARGMAX, ops.ARGMIN):
        axis, keep = _attr(node, "axis", 0), _attr(node, "keepdims", 1)
        ia, ib = ra[node.output[0]].astype(np.int64), rb[node.output[0]].astype(np.int64)
        if not keep:
            ia, ib = np.expand_dims(ia, axis), np.expand_dims(ib, axis)
        if ia.shape != ib.shape:
            return f"{op} '{node.name}' has another shape"
        if not _within(np.take_along_axis(ra[x], ib, axis=axis), np.take_along_axis(ra[x], ia, axis=axis), rtol, atol):
            return f"{op} '{node.name}' points at a value that is not near the original's extreme"
        return ""
    if op in ops.COMPARISONS:
        a, b = np.asarray(ra[node.input[0]], np.float64), np.asarray(ra[node.input[1]], np.float64)
        ya, yb = ra[node.output[0]], rb[node.output[0]]
        if ya.shape != yb.shape:
            return f"{op} '{node.name}' has another shape"
        rtol = max(rtol, atols.get(node.input[1], (0.0, 0.0))[0])
        atol = max(atol, atols.get(node.input[1], (0.0, 0.0))[1])
        a, b = np.broadcast_to(a, ya.shape), np.broadcast_to(b, ya.shape)
        differ = ya != yb
        near = np.abs(a - b) <= 2 * (atol + rtol * np.maximum(np.abs(a), np.abs(b)))
        if not np.all(near[differ]):
            return f"{op} '{node.name}' differs where its operands are not near each other"
        return ""
    return ""  # NonMaxSuppression: the same node on agreeing inputs


# --------------------------------------------------------------------------------------------
# Comparing two models
# --------------------------------------------------------------------------------------------


def _shapes(feeds: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    return {k: [int(d) for d in np.shape(v)] for k, v in feeds.items()}


def _nonfinite(values: list) -> list[int]:
    out = []
    for v in values:
        v = np.asarray(v)
        out.append(int(np.count_nonzero(~np.isfinite(v.astype(np.float64)))) if rtol_for(v.dtype) is not None else 0)
    return out


def compare(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    seeds: int = 3,
    dims: Mapping[str, int] | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    inputs: Sequence[Mapping[str, np.ndarray]] = (),
) -> VerifyResult:
    """Run both models on the input sets of the module docstring (``seeds`` random seeds at
    several magnitudes and batch sizes, and the feed dicts of ``inputs``) and compare every output
    element by element (widened to float32 where onnxruntime cannot run them as they are).
    ``rtol``/``atol`` replace the per-dtype defaults. ``progress(k)`` is called with k = 1 ..
    :func:`progress_steps`."""
    dims = dict(dims or {})
    types = elem_types(reference) | elem_types(candidate)
    sess_a, sess_b, widened = _sessions(reference, candidate, types)
    names = [o.name for o in sess_a.get_outputs()]
    if names != [o.name for o in sess_b.get_outputs()]:
        raise VerificationError("the models have different outputs")
    lineage = _Lineage(reference)
    defaults = _output_rtols(reference, lineage, bool(widened))
    ties = _Ties(reference, candidate, lineage, bool(widened), rtol, atol)
    per_output: dict[str, list[OutputCheck]] = {n: [] for n in names}
    tie_sets: dict[str, dict[str, list[str]]] = {n: {} for n in names}
    sets: list[InputSet] = []
    skipped: list[str] = []
    x1_nonfinite: dict[tuple, list[int]] = {}

    sensitive: dict[str, list[str]] = {n: [] for n in names}
    perturbed: dict[tuple, list] = {}

    def sensitivity(feeds: dict, eta: float, index: int, ref: np.ndarray) -> np.ndarray | None:
        """How far the original's output moves when its float inputs move by a relative ``eta``
        (two random draws, the larger change per element); None if it does not run."""
        key = (len(sets), eta)  # the set being compared (appended before its outputs are)
        if key not in perturbed:
            perturbed.clear()
            runs = []
            for draw in range(SENSITIVITY_DRAWS):
                rng = np.random.default_rng([len(sets), draw])
                moved = {
                    k: (v * (1 + eta * rng.uniform(-1.0, 1.0, np.shape(v)))).astype(v.dtype)
                    if rtol_for(np.asarray(v).dtype) is not None else v
                    for k, v in feeds.items()
                }
                try:
                    runs.append(sess_a.run(names, moved))
                except Exception:
                    runs = None
                    break
            perturbed[key] = runs
        runs = perturbed[key]
        if not runs:
            return None
        r = ref.astype(np.float64)
        return np.max([np.abs(np.asarray(run[index], np.float64) - r) for run in runs], axis=0)

    def run_set(iset: InputSet, feeds: dict, required: bool, base: tuple | None) -> None:
        if widened:
            feeds = {k: _widen_array(v) for k, v in feeds.items()}
        try:
            ref = sess_a.run(names, feeds)
        except Exception as err:
            if required:
                raise VerificationError(
                    f"the original model fails in onnxruntime on input set '{iset.name}': {first_line(err)}"
                ) from None
            skipped.append(f"{iset.name}: the original model fails in onnxruntime ({first_line(err)})")
            return
        counts = _nonfinite(ref)
        if base is not None:
            if iset.magnitude == MAGNITUDES[0]:
                x1_nonfinite[base] = counts
            else:
                before = x1_nonfinite.get(base, [0] * len(counts))
                over = [n for n, c, b in zip(names, counts, before) if c > b]
                if over:
                    skipped.append(f"{iset.name}: the original's output '{over[0]}' overflows to inf or NaN")
                    return
        try:
            got = sess_b.run(names, feeds)
        except Exception as err:
            raise VerificationError(
                f"the optimized model fails in onnxruntime on input set '{iset.name}': {first_line(err)}"
            ) from None
        sets.append(iset)
        for name, r, g in zip(names, ref, got):
            own, _ = defaults[name]
            if own == 0.0:  # undeclared type: from the value
                own = rtol_for(np.asarray(r).dtype)
            rt = None if own is None else (rtol if rtol is not None else own)
            check = compare_outputs(name, r, g, rt, atol)
            if not check.ok and rt is not None and rtol_for(np.asarray(r).dtype) is not None and not lineage.selections(name):
                floor = sensitivity(feeds, SENSITIVITY_SCALE * rt, names.index(name), np.asarray(r))
                if floor is not None:
                    check = compare_outputs(name, r, g, rt, atol, floor)
                    if check.ok:
                        sensitive[name].append(iset.name)
            if not check.ok:
                tied, note = ties.check(name, check, own or 0.0, feeds, r, iset.name)
                if tied is not None:
                    check = tied
                    tie_sets[name].setdefault(note, []).append(iset.name)
                elif note:
                    check.notes.append(note)
            check.input_set = iset.name
            per_output[name].append(check)

    plan = input_plan(reference, seeds, dims)
    step = 0
    for k, (seed, magnitude, batch) in enumerate(plan):
        feeds = random_inputs(reference, seed, dims, batch or 1, magnitude)
        iset = InputSet(_set_name(seed, magnitude, batch), _shapes(feeds), seed, magnitude, batch)
        first = magnitude == MAGNITUDES[0] and batch in (None, BATCH_SIZES[0])
        run_set(iset, feeds, first, (seed, batch))
        if progress is not None and (k + 1 == len(plan) or plan[k + 1][:2] != (seed, magnitude)):
            step += 1
            progress(step)
    for i, given in enumerate(inputs):
        feeds = {k: np.asarray(v) for k, v in given.items()}
        missing = [vi.name for vi in graph_inputs(reference) if vi.name not in feeds]
        if missing:
            raise VerificationError(f"input set {i + 1} has no value for input '{missing[0]}'")
        run_set(InputSet(f"given{i + 1}", _shapes(feeds), source="user"), feeds, True, None)
        if progress is not None:
            step += 1
            progress(step)
    if not sets:
        raise VerificationError("no input set could be run: " + "; ".join(skipped))
    outputs = []
    for name in names:
        checks = per_output[name]
        worst = max(checks, key=_badness)
        worst.ok = all(c.ok for c in checks)
        notes = list(defaults[name][1])
        if sensitive[name]:
            notes.append(
                f"within the original's own sensitivity (its change when its float inputs move by {SENSITIVITY_SCALE} rtol, relative) "
                f"in input sets {', '.join(sensitive[name])}"
            )
        notes += [f"{note} (input sets {', '.join(s)})" for note, s in tie_sets[name].items()]
        worst.notes = notes + [n for n in worst.notes if n not in notes]
        outputs.append(worst)
    return VerifyResult(all(o.ok for o in outputs), seeds, outputs, widened, sets, skipped)


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
    once is no float16 arithmetic)."""
    types = _graph_elem_types(model.graph, io)
    for function in model.functions:
        types |= _function_elem_types(function)
    return types


def _graph_elem_types(graph: onnx.GraphProto, io: bool = True) -> set[int]:
    """Element types ``graph`` and its subgraphs hold or compute in (see :func:`elem_types`)."""
    types: set[int] = set()
    infos = [vi for g in _graphs(graph) for vi in list(g.input) + list(g.output) + list(g.value_info)]
    if not io:
        infos = infos[len(graph.input) + len(graph.output) :]
    for vi in infos:
        types.update(_type_elems(vi.type))
    for g in _graphs(graph):
        types.update(t.data_type for t in g.initializer)
        types.update(t.values.data_type for t in g.sparse_initializer)
        for node in g.node:
            types |= _node_elem_types(node)
    types.discard(0)
    return types


def _function_elem_types(function: onnx.FunctionProto) -> set[int]:
    types: set[int] = set()
    for vi in getattr(function, "value_info", []):
        types.update(_type_elems(vi.type))
    for node in function.node:
        types |= _node_elem_types(node)
        for sub in _node_subgraphs(node):
            types |= _graph_elem_types(sub)
    types.discard(0)
    return types


def _node_elem_types(node: onnx.NodeProto) -> set[int]:
    types: set[int] = set()
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            types.add(attr.t.data_type)
        elif attr.type == onnx.AttributeProto.TENSORS:
            types.update(t.data_type for t in attr.tensors)
        elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
            types.add(attr.sparse_tensor.values.data_type)
        elif attr.type == onnx.AttributeProto.INT and attr.name in _TYPE_ATTRS and _default(node):
            types.add(attr.i)
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
