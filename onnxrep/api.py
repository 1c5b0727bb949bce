"""The Python API: ``optimize`` and ``verify``."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import onnx

from . import engine, io
from .engine import Report
from .errors import VerificationError
from .rewrite import Options
from .equivalence import VerifyResult, compare


def _as_model(model_or_path: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    return io.load(model_or_path)[0]


def optimize(
    model_or_path: onnx.ModelProto | str | os.PathLike,
    passes: Sequence[str] | None = None,
    skip: Iterable[str] = (),
    allow_cost_increase: bool = False,
    verify: bool = False,
    seeds: int = 3,
    dims: dict[str, int] | None = None,
    progress=None,
    on_mismatch: str = "fail",
    tolerance: float = 0.0,
) -> tuple[onnx.ModelProto, Report]:
    """Return the optimized model (the input is not modified) and the report.

    ``passes`` selects passes by name (default: all, in registry order) and ``skip`` leaves some out.
    With ``verify``, both models run in onnxruntime on ``seeds`` random inputs and a mismatch raises
    :class:`onnxrep.VerificationError`; the result is stored in ``report.verification``. With
    ``on_mismatch="bisect"`` the rewrite responsible is found by bisection and left out instead,
    and named in ``report.verification["bisected"]``. ``tolerance`` (opt-in, not exact) lets
    ``identical-filters`` merge filters that differ by at most that much.
    """
    lazy = not verify and not isinstance(model_or_path, onnx.ModelProto)
    # without verification the input's weights are needed only where a pass reads them: they stay
    # in the file until then, and the result gets the untouched ones from there at the end
    model = io.load(model_or_path, lazy=True)[0] if lazy else _as_model(model_or_path)
    options = Options(allow_cost_increase=allow_cost_increase, tolerance=tolerance)
    out, report = engine.run(model, passes, skip, options, progress)
    io.check(out)
    if lazy:
        del model
        io.materialize(out)
    if verify:
        result = compare(model, out, seeds=seeds, dims=dims)
        report.verification = result.to_dict()
        if not result.ok:
            if on_mismatch != "bisect":
                raise mismatch_error(result)
            out, report = bisect_mismatch(model, passes, skip, options, report, seeds, dims)
    return out, report


def _rewrite_keys(report: Report) -> list[str]:
    return [r["candidate"] for p in report.passes for r in p.rewrites]


def bisect_mismatch(model, passes, skip, options: Options, failed: Report, seeds, dims):
    """Find the rewrite that breaks equivalence by halving the set of rewrites left out, leave
    it out, and return the verified result; a VerificationError when no single rewrite explains
    the mismatch."""

    def attempt(deny: set[str]):
        opts = Options(options.allow_cost_increase, frozenset(deny), options.tolerance)
        out, report = engine.run(model, passes, skip, opts)
        result = compare(model, out, seeds=seeds, dims=dims)
        report.verification = result.to_dict()
        return out, report, result

    suspects = _rewrite_keys(failed)
    while len(suspects) > 1:
        half = suspects[: len(suspects) // 2]
        *_, result = attempt(set(half))
        suspects = half if result.ok else suspects[len(half):]
    if not suspects:
        raise VerificationError("the mismatch remains with no rewrite applied")
    out, report, result = attempt(set(suspects))
    if not result.ok:
        raise mismatch_error(result)
    culprit = suspects[0]
    name = next((p.name for p in failed.passes if any(r["candidate"] == culprit for r in p.rewrites)), "?")
    report.verification["bisected"] = {"culprit": culprit, "pass": name}
    return out, report


def verify(
    a: onnx.ModelProto | str | os.PathLike,
    b: onnx.ModelProto | str | os.PathLike,
    seeds: int = 3,
    dims: dict[str, int] | None = None,
) -> VerifyResult:
    """Compare two models' outputs on the same random inputs in onnxruntime."""
    return compare(_as_model(a), _as_model(b), seeds=seeds, dims=dims)


def mismatch_error(result: VerifyResult) -> VerificationError:
    w = result.worst()
    return VerificationError(
        f"output '{w.name}' differs: max abs error {w.max_abs_error:.3g} > tolerance {w.tolerance:.3g} "
        f"(max magnitude {w.max_magnitude:.3g})"
    )
