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
) -> tuple[onnx.ModelProto, Report]:
    """Return the optimized model (the input is not modified) and the report.

    ``passes`` selects passes by name (default: all, in registry order) and ``skip`` leaves some out.
    With ``verify``, both models run in onnxruntime on ``seeds`` random inputs and a mismatch raises
    :class:`onnxrep.VerificationError`; the result is stored in ``report.verification``.
    """
    model = _as_model(model_or_path)
    out, report = engine.run(model, passes, skip, Options(allow_cost_increase=allow_cost_increase), progress)
    io.check(out)
    if verify:
        result = compare(model, out, seeds=seeds, dims=dims)
        report.verification = result.to_dict()
        if not result.ok:
            raise mismatch_error(result)
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
