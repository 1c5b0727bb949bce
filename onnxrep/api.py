"""The Python API: ``optimize`` and ``verify``.

Both check every argument before any work (:class:`onnxrep.UsageError`, a ``ValueError``, names
the valid values), so that a bad option never costs a model load, and the command line goes
through the same checks. ``optimize`` runs one sequence for every caller: load, passes, checker,
verification, and on a mismatch either an error or the bisection that leaves the responsible
rewrites out.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from . import engine, io, regions
from .engine import Report
from .equivalence import VerifyResult, compare, graph_inputs
from .errors import UsageError, VerificationError
from .rewrite import Options

ON_MISMATCH = ("fail", "bisect")

ModelLike = onnx.ModelProto | str | os.PathLike
Feeds = Mapping[str, np.ndarray]


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


# --------------------------------------------------------------------------------------------
# optimize / verify
# --------------------------------------------------------------------------------------------


def _as_model(model_or_path: ModelLike, base_dir: str | os.PathLike | None = None) -> onnx.ModelProto:
    """A model to read from: a ModelProto validated (:func:`io.from_proto`), or a file loaded."""
    if isinstance(model_or_path, onnx.ModelProto):
        return io.from_proto(model_or_path, base_dir)
    return io.load(model_or_path)[0]


def optimize(
    model_or_path: ModelLike,
    passes: str | Sequence[str] | None = None,
    skip: str | Iterable[str] = (),
    allow_cost_increase: bool = False,
    verify: bool = False,
    seeds: int = 3,
    dims: Mapping[str, int] | None = None,
    progress=None,
    on_mismatch: str = "fail",
    tolerance: float = 0.0,
    rtol: float | None = None,
    atol: float | None = None,
    inputs: Sequence[Feeds] = (),
    base_dir: str | os.PathLike | None = None,
) -> tuple[onnx.ModelProto, Report]:
    """Return the optimized model (the input is not modified) and the report.

    ``passes`` selects passes by name (a list, or one comma-separated string; default: all, in
    registry order) and ``skip`` leaves some out. With ``verify``, both models run in onnxruntime
    on several input sets (``seeds`` random seeds at three magnitudes, symbolic batch 1 and 2,
    ``dims`` for other symbolic dims, and the feed dicts in ``inputs``), compared element by
    element within ``rtol``/``atol`` (default: from each output's dtype), and every rewritten
    region is checked on its own (:mod:`onnxrep.regions`); a mismatch raises
    :class:`onnxrep.VerificationError`. The result is stored in ``report.verification``. With
    ``on_mismatch="bisect"`` the rewrites responsible are left out instead (the failing regions
    first, then by bisection of the whole-model mismatch), and named in
    ``report.verification["bisected"]``. ``tolerance`` (opt-in, not exact) lets
    ``identical-filters`` merge filters that differ by at most that much. ``base_dir``: the folder
    external data of a ModelProto is relative to.
    """
    only, skip = pass_names(passes, "passes"), pass_names(skip, "skip")
    check = Check(seeds, dims, tuple(inputs), rtol, atol)
    check_options(only, skip, on_mismatch, tolerance, check if verify else None)
    if isinstance(model_or_path, onnx.ModelProto):
        # a copy whose external initializers are read when needed, when it has any
        model = io.from_proto(model_or_path, base_dir)
    else:
        # without verification the input's weights are needed only where a pass reads them: they
        # stay in the file until then, and the result gets the untouched ones from there at the end
        model = io.load(model_or_path, lazy=not verify)[0]
    if verify:
        check_model_args(model, check)
    options = Options(allow_cost_increase=allow_cost_increase, tolerance=tolerance)
    out, report = run(model, only, skip, options, verify=check if verify else None, on_mismatch=on_mismatch, progress=progress)
    del model
    io.materialize(out)  # lazy references (from a file or a ModelProto) read in; nothing else
    return out, report


def run(
    model: onnx.ModelProto,
    only: Sequence[str],
    skip: Sequence[str],
    options: Options,
    verify: Check | None = None,
    on_mismatch: str = "fail",
    progress=None,
    verify_progress: Callable[[int], None] | None = None,
) -> tuple[onnx.ModelProto, Report]:
    """The sequence behind :func:`optimize` and the command line, on a loaded model whose
    arguments were checked: passes, checker, verification and the mismatch policy."""
    out, report = engine.run(model, only, skip, options, progress)
    # every tensor of the output is encoded from an array of its shape or comes from the checked input
    io.check(out, data=False)
    if verify is None:
        return out, report
    result, region_checks = verify_rewrite(model, out, report, verify, verify_progress)
    if passed(result, region_checks):
        return out, report
    if on_mismatch != "bisect":
        raise mismatch_error(result, region_checks)
    out, report = bisect_mismatch(model, only, skip, options, report, verify, region_checks)
    io.check(out, data=False)
    return out, report


def verify_rewrite(
    original: onnx.ModelProto,
    optimized: onnx.ModelProto,
    report: Report,
    check: Check,
    progress: Callable[[int], None] | None = None,
) -> tuple[VerifyResult, list]:
    """Whole-model comparison and per-region checks of ``report``'s rewrites; both go into
    ``report.verification``."""
    result = compare_models(original, optimized, check, progress)
    # the probes of a region reach magnitudes far above the model's inputs: an absolute tolerance
    # chosen for those would not scale, so regions take the relative one and scale their own
    region_checks = regions.check_regions(original, optimized, report, rtol=check.rtol)
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


def compare_models(a: onnx.ModelProto, b: onnx.ModelProto, check: Check, progress=None) -> VerifyResult:
    return compare(
        a, b, seeds=check.seeds, dims=dict(check.dims or {}), progress=progress,
        rtol=check.rtol, atol=check.atol, inputs=list(check.inputs),
    )


def _rewrite_keys(report: Report) -> list[str]:
    return [r["candidate"] for p in report.passes for r in p.rewrites]


def bisect_mismatch(model, only, skip, options: Options, failed: Report, check: Check, region_checks=()):
    """Leave out the rewrites that break equivalence and return the verified result.

    Regions that failed their own check are left out first (they name their rewrite). If the
    whole model still differs, the remaining rewrites are bisected (halving the set left out).
    A VerificationError says what was tried when no set of rewrites explains the mismatch."""
    tried: list[str] = []

    def attempt(deny: set[str]):
        opts = Options(options.allow_cost_increase, frozenset(deny), options.tolerance)
        out, report = engine.run(model, only, skip, opts)
        result, checks = verify_rewrite(model, out, report, check)
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


def _bisected(out, report: Report, failed: Report, culprits: list[str]):
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
    progress: Callable[[int], None] | None = None,
) -> VerifyResult:
    """Compare two models' outputs in onnxruntime on the same input sets (see :func:`optimize`),
    and check on its own each region in which ``b``'s graph differs from ``a``'s
    (:func:`onnxrep.regions.changed_regions`; ``result.regions``)."""
    check = Check(seeds, dims, tuple(inputs), rtol, atol)
    check_options([], [], check=check)
    ma, mb = _as_model(a), _as_model(b)
    check_model_args(ma, check)
    result = compare_models(ma, mb, check, progress)
    # the regions in which the models differ in structure, found from their difference
    result.regions = regions.check_regions(ma, mb, None, rtol=check.rtol)
    result.ok = passed(result, result.regions)
    return result


def mismatch_error(result: VerifyResult, region_checks=()) -> VerificationError:
    bad_regions = _differing(region_checks)
    if all(o.ok for o in result.outputs) and bad_regions:
        r = bad_regions[0]
        return VerificationError(
            f"rewrite {r.key} differs on its own: max abs error {r.max_abs_error:.3g} on "
            f"{r.method} ({len(bad_regions)} region(s) failed)"
        )
    return VerificationError(result.worst().describe())
