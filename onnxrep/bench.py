"""Latency measurement in onnxruntime: models timed in interleaved rounds, medians and ratios.

Running the models round by round rather than one after the other makes slow drift of the
machine (frequency, other load) fall on all of them alike. The rounds follow a Williams design
(:func:`williams`): each model runs in each position, and right after each other model, equally
often. Rotating by one (A B C, B C A, C A B) balances the positions only: B would follow A in two
rounds of three, and a model timed right after a much slower one measures slower (cache and
thread wake-up effects). Worker threads (intra- and inter-op) block instead of spinning, so that
an idle session does not take the cores from the one being timed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import onnx
import onnxruntime as ort

import numpy as np

from .equivalence import DEFAULT_DIM, graph_inputs, has_symbolic_batch, is_batch_dim, random_inputs
from .errors import OnnxrepError, UsageError, first_line


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    stdev_ms: float
    runs: int

    @staticmethod
    def of(samples_ms: list[float]) -> "Timing":
        s = samples_ms
        stdev = statistics.stdev(s) if len(s) > 1 else 0.0
        return Timing(statistics.median(s), min(s), max(s), statistics.fmean(s), stdev, len(s))

    def to_dict(self) -> dict:
        return self.__dict__.copy()


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def provider_for(ep: str) -> str:
    """The onnxruntime provider for ``cpu`` / ``cuda``; an error when this build lacks it."""
    provider = PROVIDERS[ep]
    if provider not in ort.get_available_providers():
        raise OnnxrepError(
            f"onnxruntime {ort.__version__} has no {provider} here (available: "
            f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu for --ep cuda"
        )
    return provider


def session_options(threads: int = 2) -> ort.SessionOptions:
    """Options for timing: onnxruntime's full graph optimizations, as a deployment would use,
    ``threads`` intra-op threads, sequential execution, no spinning worker threads."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


def session(model: onnx.ModelProto, threads: int = 2, provider: str = "CPUExecutionProvider") -> ort.InferenceSession:
    """A session with :func:`session_options`."""
    opts = session_options(threads)
    opts.log_severity_level = 4  # a failing run is reported as one line (run_failure), not logged too
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)


def static_batch(model: onnx.ModelProto) -> tuple[str, int] | None:
    """The first input whose batch dim (axis 0) is static, with its size; None when some input
    has a symbolic batch dim (then the batch is the caller's to choose) or no input has a batch
    axis."""
    if has_symbolic_batch(model):
        return None
    for vi in graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return vi.name, dims[0].dim_value
    return None


def feeds_for(
    models: dict[str, onnx.ModelProto], dims: dict[str, int] | None = None, batch: int | None = None
) -> dict[str, np.ndarray]:
    """The one input every model is timed on: random values for the first model's inputs, its
    symbolic batch dims at ``batch`` (default 1). A model whose batch is static is timed at that
    size only: an explicit ``batch`` that differs from it is a :class:`UsageError` rather than a
    batch-1 timing labelled ``batch``."""
    if batch is not None:
        for name, model in models.items():
            fixed = static_batch(model)
            if fixed is not None and fixed[1] != batch:
                raise UsageError(
                    f"--batch {batch}: {name} has a static batch of {fixed[1]} (input {fixed[0]!r}); it can be "
                    f"timed only at that size (leave out --batch, or export with a dynamic batch dim)"
                )
    first = next(iter(models.values()))
    return random_inputs(first, seed=0, dims=dims, batch=1 if batch is None else batch)


def unset_dims(model: onnx.ModelProto, dims: dict[str, int] | None = None) -> list[str]:
    """The symbolic dims of the model's inputs that take :data:`DEFAULT_DIM` (not batch dims, not
    in ``dims``)."""
    dims = dims or {}
    names: list[str] = []
    for vi in graph_inputs(model):
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if is_batch_dim(axis, d) or (d.HasField("dim_value") and d.dim_value > 0):
                continue
            name = d.dim_param or f"{vi.name}[{axis}]"
            if name not in dims and name not in names:
                names.append(name)
    return names


def run_failure(err: BaseException, model: onnx.ModelProto, dims: dict[str, int] | None = None) -> OnnxrepError:
    """The one-line error for models that do not run on the timing input, with a hint when
    symbolic dims took the default value."""
    message = f"the models do not run in onnxruntime: {first_line(err)}"
    unset = unset_dims(model, dims)
    if unset:
        named = [n for n in unset if "[" not in n]
        message += f"; symbolic dims set by default: {', '.join(f'{n}={DEFAULT_DIM}' for n in unset)}"
        if named:
            message += f" (give their values with --dim {','.join(f'{n}=...' for n in named)})"
    return OnnxrepError(message)


def batch_of(feeds: dict[str, np.ndarray]) -> int | None:
    """The batch size the feeds hold: the size of axis 0 of the first input that has one."""
    return next((int(v.shape[0]) for v in feeds.values() if v.ndim), None)


def interleaved_latency(
    models: dict[str, onnx.ModelProto],
    rounds: int = 20,
    warmup: int = 3,
    threads: int = 2,
    dims: dict[str, int] | None = None,
    provider: str = "CPUExecutionProvider",
    progress: Callable[[int], None] | None = None,
    batch: int | None = None,
    feeds: dict[str, np.ndarray] | None = None,
) -> dict[str, Timing]:
    """Time one inference of each model ``rounds`` times, interleaved; the same input for all
    (``feeds``, else :func:`feeds_for` with ``dims`` and ``batch``)."""
    if rounds < 1 or warmup < 0:
        raise UsageError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds!r}, warmup={warmup!r}")
    if feeds is None:
        feeds = feeds_for(models, dims, batch)
    sessions = {name: session(m, threads, provider) for name, m in models.items()}
    runners = {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}
    times = interleaved_times(runners, warmup, rounds, progress=progress)
    return {n: Timing.of(t) for n, t in times.items()}


def williams(n: int) -> list[list[int]]:
    """Orders of ``n`` items in which every position and every immediate predecessor comes up
    equally often: a Williams design (a balanced Latin square; n orders for even n, 2n for odd n;
    for 3 all six permutations)."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(v + i) % n for v in first] for i in range(n)]
    return rows + [r[::-1] for r in rows] if n % 2 else rows


def interleaved_times(
    runners: dict[str, Callable[[], object]],
    warmup: int,
    min_rounds: int,
    max_rounds: int | None = None,
    seconds: float | None = None,
    order: str = "balanced",
    progress: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Every round's time in ms of each runner: ``warmup`` runs of each, then rounds that run each
    runner once, in the orders of :func:`williams` in turn (``order="balanced"``) or rotated by one
    per round (``"rotate"``). ``min_rounds`` rounds; with ``seconds`` as many as fit in that time
    (judged from the first round), up to ``max_rounds``."""
    names = list(runners)
    n = len(names)
    orders = williams(n) if order == "balanced" else [list(range(k, n)) + list(range(k)) for k in range(n)]
    for _ in range(warmup):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds, r, start = min_rounds, 0, time.perf_counter()
    while r < rounds:
        for name in (names[i] for i in orders[r % len(orders)]):
            t0 = time.perf_counter()
            runners[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        r += 1
        if progress is not None:
            progress(r)
        if r == 1 and seconds is not None:
            per_round = time.perf_counter() - start
            rounds = int(min(max_rounds or min_rounds, max(min_rounds, seconds / max(per_round, 1e-6))))
    return times
