#!/usr/bin/env python
"""Latency of the real-model zoo: timm exports, onnxrep's output of them and their deploy form, on
onnxruntime CPU and OpenVINO CPU.

For every model of ``tests/zoo_models.py`` (the smallest variant of each timm family that
``timm.utils.reparameterize_model`` changes; random seeded weights with randomized BatchNorm
statistics and layer scales; 64x64), every exporter (``torchscript``, ``dynamo``; optionally
``torchscript-nofold``), every runtime (``ort``: onnxruntime's CPU provider; ``openvino``:
OpenVINO's CPU plugin) and every batch size (1 and 32), three graphs are timed together:

* ``train``: the training export, as ``torch.onnx.export`` wrote it;
* ``onnxrep``: ``onnxrep.optimize(train)`` with its defaults, run fresh by this script (as a
  user would: any pass added since the last run takes part);
* ``deploy``: the export of ``timm.utils.reparameterize_model(model)``, same exporter;

and, for RepViT and FastViT (``CROSS_MODELS``) exported with dynamo, a fourth one, ``ts_deploy``:
the TorchScript deploy export of the same model, so that onnxrep's output of the dynamo export is
compared with the graph a TorchScript user deploys, in the same rounds.

Batch 32: the zoo's exports are static batch 1. For batch 32 this script re-exports the training
and the deploy form with a static batch of 32 (same exporter, same model, a batch-32 example input;
cached beside the zoo's exports under ``<cache>/<model>/batch32/``) rather than exporting with a
dynamic batch dim: a dynamic dim changes the graphs themselves (the exporters spell the attention
reshapes of LeViT, EfficientViT, TinyViT, ... with Shape/Gather/Concat chains instead of
constants, and the dynamo exporter adds symbolic-shape guards), so it would time other graphs than
the ones a user exporting for a fixed batch gets, and other ones than those the zoo checks at batch
1. The cost is one more export per model and exporter, once (the cache is reused while model,
seed and versions are unchanged).

Method, per (model, exporter, runtime, batch):

* onnxruntime: ``onnxrep.bench.session`` settings (graph optimizations ORT_ENABLE_ALL, the
  default; ``--threads`` intra-op threads; sequential execution, one inter-op thread) with thread
  spinning disabled for the intra-op and the inter-op pools (session config
  ``session.intra_op.allow_spinning=0``, ``session.inter_op.allow_spinning=0``);
* OpenVINO: ``core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY",
  "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING":
  False})`` (f32: this machine's CPU has AMX-BF16, on which OpenVINO would otherwise run in bf16;
  ``--ov-precision default`` leaves the plugin's choice; no pinning: on a machine shared with other
  work a pinned thread waits for its core, ``--ov-pinning`` pins), one infer request, inputs shared;
* the same seeded standard-normal input for all graphs; ``--warmup`` runs of each graph; then
  interleaved rounds, each running every graph once, the order changing from round to round: the
  orders of a Williams design (``--order balanced``, the default: for three graphs all six
  orders, so that every graph runs first, second and last, and right after each other graph,
  equally often; as ``onnxrep bench`` does), or rotated by one (``--order rotate``: A B C, B C A,
  C A B; it balances the positions, not the predecessors, and in
  the first full run of this script onnxrep's output of MobileOne, right after the 3x slower
  training graph in two rounds of three, came out 1.05-1.12x the deploy form in those rounds and
  0.99-1.07x in the others, with identical graphs in onnxruntime); the number of rounds adapts to the time budget (``--budget`` for the whole
  run, split evenly over the cases still to run) between ``--min-rounds`` and ``--rounds``;
* per graph the median (and min, max, quartiles) of its times; ratios of medians
  ``onnxrep / deploy``, ``onnxrep / train``, ``deploy / train`` (and ``onnxrep / ts_deploy``);
  the spread of each ratio as the quartiles and min/max of the per-round ratios (the two graphs'
  times of the same round);
* a case whose ``onnxrep / deploy`` or ``onnxrep / ts_deploy`` ratio is above ``--target`` (1.02,
  the noise band) or whose ``onnxrep / train`` ratio is above it too (the target "never slower
  than its input" is 1.00 plus the same noise band) is measured again after all cases (onnxrep
  run afresh; at least ``--min-rounds`` rounds even when the budget is spent), and both
  measurements are reported;
* for onnxruntime at batch 1 the graph onnxruntime actually runs is saved
  (``SessionOptions.optimized_model_filepath``) for each graph, and its node histogram compared:
  the kernels onnxrep's output runs more or fewer of than the deploy form (``ort_kernels``), which
  names a lost fusion (e.g. ``Gelu -27``).

Outputs: ``benchmarks/results/zoo_latency.json`` (every measurement, machine, versions, onnxrep's
commit, date, load averages, the command), ``benchmarks/results/zoo_latency.png`` (onnxrep / deploy
per model, one panel per runtime and batch, with the 1.02 line), and the generated part of the
"Latency of the real-model zoo" section of ``BENCHMARKS.md`` (between its markers).

    python benchmarks/zoo_latency.py --cache /tmp/zoo-cache                    # everything (about 25 min on 2 cores, exports cached)
    python benchmarks/zoo_latency.py --models repvit_m0_9 fastvit_t8 --runtimes ort --batches 1 --no-write
    python benchmarks/zoo_latency.py --models repvgg_a0 --rounds 1 --warmup 0 --no-write   # smoke run
    python benchmarks/zoo_latency.py --render benchmarks/results/zoo_latency.json         # plot and section again, no timing

Needs torch, timm (the ``test`` extra) and matplotlib, openvino (the ``bench`` extra); without
openvino, ``--runtimes ort``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import zoo_models as zm  # noqa: E402

from zoo import DEFAULT_CACHE, environment, log  # noqa: E402

RUNTIMES = ("ort", "openvino")
DEFAULT_EXPORTERS = (zm.TORCHSCRIPT, zm.DYNAMO)
GRAPHS = ("train", "onnxrep", "deploy")
#: models for which onnxrep's output of the dynamo export is also timed against the TorchScript
#: deploy export (the GELU spelling of issue 13)
CROSS_MODELS = ("repvit_m0_9", "fastvit_t8", "fastvit_mci0")
TARGET = 1.02
RATIOS = {  # name -> (numerator, denominator)
    "onnxrep/deploy": ("onnxrep", "deploy"),
    "onnxrep/train": ("onnxrep", "train"),
    "deploy/train": ("deploy", "train"),
    "onnxrep/ts_deploy": ("onnxrep", "ts_deploy"),
}
#: the ratios a case is judged by, with their targets (ratio of medians <= target + noise band)
TARGETS = {"onnxrep/deploy": 1.02, "onnxrep/train": 1.00, "onnxrep/ts_deploy": 1.02}
JSON_PATH = ROOT / "benchmarks" / "results" / "zoo_latency.json"
PLOT_PATH = ROOT / "benchmarks" / "results" / "zoo_latency.png"
MD_PATH = ROOT / "BENCHMARKS.md"
BEGIN, END = "<!-- zoo_latency: begin (generated by benchmarks/zoo_latency.py) -->", "<!-- zoo_latency: end -->"


# --------------------------------------------------------------------------------------------
# exports and onnxrep
# --------------------------------------------------------------------------------------------


def batch_input(name: str, batch: int, seed: int) -> np.ndarray:
    """The seeded standard-normal input of zoo model ``name`` at ``batch`` (batch 1: the zoo's own
    example input)."""
    if batch == 1:
        return zm.example_input(name, seed)
    shape = (batch, *zm.BY_NAME[name].shape[1:])
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def export_paths(builder: zm.Builder, name: str, exporter: str, batch: int) -> tuple[Path, Path]:
    """(training export, deploy export) of ``name`` with ``exporter`` at a static ``batch``: the
    zoo's own (cached) exports at batch 1, else exported here into ``<cache>/<model>/batch<N>/``
    (cached the same way as :meth:`zoo_models.Builder.paths`, the batch in the stamp)."""
    if batch == 1:
        return builder.paths(name, exporter)
    folder = builder.folder / name / f"batch{batch}"
    train, deploy, stamp = folder / f"{exporter}-train.onnx", folder / f"{exporter}-deploy.onnx", folder / f"{exporter}.json"
    key = zm._cache_key(name, exporter, builder.seed)
    key["shape"][0] = batch
    if train.exists() and deploy.exists() and stamp.exists():
        with contextlib.suppress(ValueError, OSError):
            if json.loads(stamp.read_text()) == key:
                return train, deploy
    model, deployed = builder.models(name)
    x = batch_input(name, batch, builder.seed)
    zm.export(model, x, train, exporter)
    zm.export(deployed, x, deploy, exporter)
    stamp.write_text(json.dumps(key, indent=1))
    return train, deploy


def optimize(train: Path, out: Path) -> dict:
    """``onnxrep.optimize(train)`` (defaults) saved to ``out``; its time, rewrites and declines."""
    import onnx

    import onnxrep

    t0 = time.perf_counter()
    optimized, report = onnxrep.optimize(train)
    seconds = time.perf_counter() - t0
    onnx.save(optimized, str(out))
    return {"optimize_s": round(seconds, 3), "rewritten": report.rewritten, "skipped": zm.skipped_by_condition(report),
            "nodes": len(optimized.graph.node)}


def check_exact(paths: dict[str, Path], x: np.ndarray) -> dict:
    """onnxrep's output against the training export's (onnxruntime, graph optimizations off),
    :func:`zoo_models.compare`'s element-wise tolerance; the deploy export's likewise."""
    ref = zm.run_ort(paths["train"], x)
    out = {}
    for g in ("onnxrep", "deploy"):
        ok, err, _ = zm.compare(zm.run_ort(paths[g], x), ref)
        out[g] = {"exact": ok, "max_error_rel": float(err / max(float(np.max(np.abs(ref))), 1e-30))}
    return out


# --------------------------------------------------------------------------------------------
# runtimes
# --------------------------------------------------------------------------------------------


def ort_options(threads: int, optimized_path: Path | None = None):
    """:func:`onnxrep.bench.session_options` (ORT_ENABLE_ALL, ``threads`` intra-op threads,
    sequential, one inter-op thread, no spinning), optionally saving the optimized graph."""
    from onnxrep.bench import session_options

    opts = session_options(threads)
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return opts


def ort_runner(path: Path, x: np.ndarray, threads: int) -> Callable[[], object]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), ort_options(threads), providers=["CPUExecutionProvider"])
    feeds = {sess.get_inputs()[0].name: x}
    return lambda: sess.run(None, feeds)


def ort_kernels(path: Path, threads: int, folder: Path) -> dict[str, int]:
    """Node histogram of the graph onnxruntime runs for ``path`` (its optimized graph, saved with
    ``optimized_model_filepath``); ops of other domains as ``domain:Op``."""
    import onnx
    import onnxruntime as ort

    dump = folder / (path.stem + ".ort.onnx")
    ort.InferenceSession(str(path), ort_options(threads, dump), providers=["CPUExecutionProvider"])
    model = onnx.load(str(dump), load_external_data=False)
    hist: dict[str, int] = {}
    for n in model.graph.node:
        key = f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        hist[key] = hist.get(key, 0) + 1
    with contextlib.suppress(OSError):
        dump.unlink()
    return dict(sorted(hist.items()))


def ov_config(threads: int, precision: str, pinning: bool = False) -> dict:
    cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": pinning}
    if precision != "default":
        cfg["INFERENCE_PRECISION_HINT"] = precision
    return cfg


def ov_runner(core, path: Path, x: np.ndarray, threads: int, precision: str, pinning: bool) -> Callable[[], object]:
    compiled = core.compile_model(core.read_model(str(path)), "CPU", ov_config(threads, precision, pinning))
    request = compiled.create_infer_request()
    feeds = {0: x}
    return lambda: request.infer(feeds, share_inputs=True)


def ov_properties(core, threads: int, precision: str, pinning: bool, path: Path) -> dict:
    """The properties OpenVINO's CPU plugin compiled with (as reported by the compiled model)."""
    compiled = core.compile_model(core.read_model(str(path)), "CPU", ov_config(threads, precision, pinning))
    out = {}
    for key in ("PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "NUM_STREAMS",
                "ENABLE_CPU_PINNING", "ENABLE_HYPER_THREADING", "SCHEDULING_CORE_TYPE"):
        with contextlib.suppress(Exception):
            out[key] = str(compiled.get_property(key))
    return out


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


def interleaved(runners: dict[str, Callable[[], object]], warmup: int, min_rounds: int, max_rounds: int,
                seconds: float, order: str = "balanced") -> dict[str, list[float]]:
    """Per-round times in ms of each runner (:func:`onnxrep.bench.interleaved_times`): as many
    rounds as fit in ``seconds``, within [min_rounds, max_rounds]."""
    from onnxrep.bench import interleaved_times

    return interleaved_times(runners, warmup, min_rounds, max_rounds, seconds, order)


def williams(n: int) -> list[list[int]]:
    """The balanced round orders (:func:`onnxrep.bench.williams`)."""
    from onnxrep.bench import williams as orders

    return orders(n)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def summarize(times: dict[str, list[float]]) -> dict:
    from onnxrep.bench import Timing

    out = {"rounds": len(next(iter(times.values()))), "graphs": {}, "ratios": {}}
    for g, t in times.items():
        d = Timing.of(t).to_dict()
        d["q1_ms"], _, d["q3_ms"] = quartiles(t)
        out["graphs"][g] = {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
    for name, (a, b) in RATIOS.items():
        if a in times and b in times:
            per_round = [x / y for x, y in zip(times[a], times[b])]
            q1, med, q3 = quartiles(per_round)
            out["ratios"][name] = {
                "ratio": round(statistics.median(times[a]) / statistics.median(times[b]), 4),
                "round_median": round(med, 4), "round_q1": round(q1, 4), "round_q3": round(q3, 4),
                "round_min": round(min(per_round), 4), "round_max": round(max(per_round), 4),
            }
    return out


def above_target(summary: dict, target: float) -> list[str]:
    """The judged ratios of a measurement above their target plus the noise band: above
    ``target`` (1.02) for onnxrep/deploy and onnxrep/ts_deploy, and above the same 1.00 + 0.02 for
    onnxrep/train, whose target is 1.00."""
    return [k for k, t in TARGETS.items() if k in summary["ratios"] and summary["ratios"][k]["ratio"] > max(t, target)]


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


class Run:
    def __init__(self, args):
        self.args = args
        self.builder = zm.Builder(args.cache, seed=args.seed)
        self.work = Path(tempfile.mkdtemp(prefix="zoo-latency-"))
        self.core = None
        if "openvino" in args.runtimes:
            import openvino as ov

            self.core = ov.Core()
        self.t_start = time.perf_counter()
        self.deadline = self.t_start + args.budget

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def prepare(self, name: str, exporter: str, batch: int) -> dict:
        """Exports (cached), onnxrep's output of the training export (fresh), the exactness check;
        paths of the graphs to time."""
        train, deploy = export_paths(self.builder, name, exporter, batch)
        out = self.work / name / f"{exporter}-b{batch}-onnxrep.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        info = optimize(train, out)
        paths = {"train": train, "onnxrep": out, "deploy": deploy}
        if exporter == zm.DYNAMO and name in CROSS_MODELS:
            paths["ts_deploy"] = export_paths(self.builder, name, zm.TORCHSCRIPT, batch)[1]
        x = batch_input(name, batch, self.args.seed + 1)
        info["check"] = check_exact(paths, x)
        return {"paths": paths, "x": x, "prep": info}

    def measure(self, prepared: dict, runtime: str, batch: int, seconds: float) -> dict:
        args, paths, x = self.args, prepared["paths"], prepared["x"]
        t0 = time.perf_counter()
        if runtime == "ort":
            runners = {g: ort_runner(p, x, args.threads) for g, p in paths.items()}
        else:
            runners = {g: ov_runner(self.core, p, x, args.threads, args.ov_precision, args.ov_pinning) for g, p in paths.items()}
        setup_s = time.perf_counter() - t0
        max_rounds = args.rounds if args.rounds is not None else (300 if batch == 1 else 40)
        min_rounds = min(args.min_rounds if args.min_rounds is not None else (20 if batch == 1 else 5), max_rounds)
        warmup = args.warmup if args.warmup is not None else (5 if batch == 1 else 1)
        times = interleaved(runners, warmup, min_rounds, max_rounds, max(seconds - setup_s, 0.0), args.order)
        del runners
        gc.collect()
        out = summarize(times)
        out.update(warmup=warmup, setup_s=round(setup_s, 2), seconds=round(time.perf_counter() - t0, 2),
                   loadavg=list(os.getloadavg()), times_ms={g: [round(v, 4) for v in t] for g, t in times.items()})
        return out

    def cases(self):
        a = self.args
        return [(m, e, b, rt) for m in a.models for e in a.exporters for b in a.batches for rt in a.runtimes]


def run_all(args) -> dict:
    run = Run(args)
    results: list[dict] = []
    cases = run.cases()
    n_total = len(cases)
    reserve = args.repeat_share * args.budget if args.repeat else 0.0
    done = 0
    for name in args.models:
        for exporter in args.exporters:
            for batch in args.batches:
                t0 = time.perf_counter()
                try:
                    prepared = run.prepare(name, exporter, batch)
                except Exception as exc:  # a failed export or optimize is a row, not the end
                    for rt in args.runtimes:
                        results.append({"model": name, "exporter": exporter, "batch": batch, "runtime": rt,
                                        "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                                        "traceback": traceback.format_exc(limit=6)})
                        done += 1
                    log(f"{name} {exporter} b{batch}: failed: {results[-1]['error']}")
                    continue
                prep_s = time.perf_counter() - t0
                kernels = None
                if "ort" in args.runtimes and batch == 1:
                    kernels = {g: ort_kernels(p, args.threads, run.work) for g, p in prepared["paths"].items()}
                for rt in args.runtimes:
                    left = n_total - done
                    share = max((run.remaining() - reserve) / max(left, 1), 0.0)
                    row = {"model": name, "exporter": exporter, "batch": batch, "runtime": rt,
                           "prep": prepared["prep"], "prep_s": round(prep_s, 2)}
                    if rt == "ort" and kernels is not None:
                        row["ort_kernels"] = kernels
                    try:
                        row["runs"] = [run.measure(prepared, rt, batch, share)]
                    except Exception as exc:
                        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                        row["traceback"] = traceback.format_exc(limit=6)
                    results.append(row)
                    done += 1
                    log(status_line(row, done, n_total, run))
                prepared_paths = prepared["paths"]
                with contextlib.suppress(OSError):
                    prepared_paths["onnxrep"].unlink()
        run.builder._models.pop(name, None)  # one model in memory at a time

    if args.repeat:
        again = [r for r in results if "runs" in r and above_target(r["runs"][0], args.target)]
        log(f"repeating {len(again)} case(s) above target")
        for i, row in enumerate(again):
            share = max(run.remaining() / max(len(again) - i, 1), 0.0)
            try:
                prepared = run.prepare(row["model"], row["exporter"], row["batch"])  # onnxrep run afresh
                row["runs"].append(run.measure(prepared, row["runtime"], row["batch"], share))
                with contextlib.suppress(OSError):
                    prepared["paths"]["onnxrep"].unlink()
            except Exception as exc:
                row["repeat_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log(status_line(row, i + 1, len(again), run, "repeat"))
    return {"results": results, "elapsed_s": round(time.perf_counter() - run.t_start, 1)}


def status_line(row: dict, i: int, n: int, run: Run, what: str = "") -> str:
    head = f"[{i}/{n}{' ' + what if what else ''} {time.perf_counter() - run.t_start:5.0f}s] " \
           f"{row['model']:16s} {row['exporter']:11s} b{row['batch']:<3d} {row['runtime']:8s}"
    if "error" in row:
        return f"{head} failed: {row['error']}"
    m = row["runs"][-1]
    g, r = m["graphs"], m["ratios"]
    extra = f" onnxrep/ts_deploy {r['onnxrep/ts_deploy']['ratio']:.3f}" if "onnxrep/ts_deploy" in r else ""
    return (f"{head} deploy {g['deploy']['median_ms']:8.2f} ms  onnxrep/deploy {r['onnxrep/deploy']['ratio']:.3f}  "
            f"onnxrep/train {r['onnxrep/train']['ratio']:.3f}{extra}  ({m['rounds']} rounds, {m['seconds']:.1f}s)")


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def kernel_diff(row: dict, a: str = "onnxrep", b: str = "deploy") -> str:
    """The kernels onnxruntime runs for graph ``a`` more (+) or fewer (-) than for ``b``."""
    k = row.get("ort_kernels")
    if not k:
        return ""
    ops = sorted(set(k[a]) | set(k[b]))
    diff = [(op, k[a].get(op, 0) - k[b].get(op, 0)) for op in ops]
    diff = sorted((d for d in diff if d[1]), key=lambda d: (-abs(d[1]), d[0]))
    return ", ".join(f"{op} {n:+d}" for op, n in diff)


def kernels_of(rows: list[dict], name: str, exporter: str) -> dict | None:
    for r in rows:
        if r["model"] == name and r["exporter"] == exporter and r.get("ort_kernels"):
            return r
    return None


def ratio_text(row: dict, key: str) -> str:
    vals = [m["ratios"][key] for m in row.get("runs", []) if key in m["ratios"]]
    if not vals:
        return "-"
    text = " / ".join(f"{v['ratio']:.3f}" for v in vals)
    judged = TARGETS.get(key)
    if judged is not None and all(v["ratio"] > max(judged, TARGET) for v in vals) and key != "deploy/train":
        text = f"**{text}**"
    return text


def spread_text(row: dict, key: str) -> str:
    m = row["runs"][0]["ratios"].get(key)
    return f"{m['round_q1']:.3f}-{m['round_q3']:.3f}" if m else "-"


def markdown(doc: dict) -> str:
    res, s = doc["results"], doc["settings"]
    env = doc["versions"]
    mach = doc["machine"]
    lines = [
        BEGIN,
        "",
        f"`{doc['command']}`",
        "",
        f"- Machine: {mach['cpu_model']}, {mach['cpu_usable']} usable of {mach['cpu_count']} CPUs, {mach['platform']}; "
        f"1-min load average {doc['loadavg_start'][0]:.2f} at start, {doc['loadavg_end'][0]:.2f} at end"
        f" (median over the cases {doc['loadavg_median']:.2f}; this benchmark runs {s['threads']} threads).",
        f"- Versions: Python {env['python']}, torch {env['torch']}, timm {env['timm']}, onnx {env['onnx']}, "
        f"onnxruntime {env['onnxruntime']}, OpenVINO {env.get('openvino', '-')}, numpy {env['numpy']}, "
        f"onnxrep {env['onnxrep']} at `{env['onnxrep_commit']}`.",
        f"- Date: {doc['date']}; {doc['elapsed_s'] / 60:.1f} min (budget {s['budget'] / 60:.0f} min).",
        f"- Settings: onnxruntime CPU provider, ORT_ENABLE_ALL, {s['threads']} intra-op threads, sequential, "
        "intra-op and inter-op spinning off; OpenVINO CPU, `PERFORMANCE_HINT=LATENCY`, "
        f"`INFERENCE_NUM_THREADS={s['threads']}`, `INFERENCE_PRECISION_HINT={s['ov_precision']}`, "
        f"`ENABLE_CPU_PINNING={doc['settings']['openvino_config']['ENABLE_CPU_PINNING']}` "
        f"(compiled with {', '.join(f'{k}={v}' for k, v in doc.get('openvino_properties', {}).items()) or '-'}); "
        f"64x64 input, batches {', '.join(map(str, s['batches']))}; warm-up then interleaved rounds, "
        + ("the orders of a Williams design in turn (every graph first, last and right after each other graph equally often)"
           if s.get("order", "rotate") == "balanced" else "the order rotated by one per round")
        + " (rounds per case in the JSON).",
        "",
        "Columns: **deploy ms**: median latency of the deploy export; **onnxrep / deploy**, **train / deploy**:",
        "ratios of medians (a case measured twice shows both, `first / repeat`; bold where every measurement",
        f"is above {TARGET}); **spread**: quartiles of the per-round ratio onnxrep / deploy; **onnxrep / train**:",
        "onnxrep's output against its own input.",
        "",
    ]
    for rt in s["runtimes"]:
        for batch in s["batches"]:
            rows = [r for r in res if r["runtime"] == rt and r["batch"] == batch]
            if not rows:
                continue
            title = {"ort": f"onnxruntime {env['onnxruntime']} CPU", "openvino": f"OpenVINO {env.get('openvino', '')} CPU"}[rt]
            kern = any(r.get("ort_kernels") for r in rows)
            lines += [f"#### {title}, batch {batch}", "",
                      "| model | exporter | deploy ms | **onnxrep / deploy** | spread | train / deploy | onnxrep / train | rounds |"
                      + (" onnxruntime kernels, onnxrep - deploy |" if kern else ""),
                      "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if kern else "")]
            for r in rows:
                if "error" in r:
                    lines.append(f"| {r['model']} | {r['exporter']} | failed: {r['error'].replace('|', '/')} | | | | | |"
                                 + (" |" if kern else ""))
                    continue
                m = r["runs"][0]
                tr = " / ".join(f"{1 / x['ratios']['deploy/train']['ratio']:.3f}" for x in r["runs"])
                lines.append(f"| {r['model']} | {r['exporter']} | {m['graphs']['deploy']['median_ms']:.2f} | "
                             f"{ratio_text(r, 'onnxrep/deploy')} | {spread_text(r, 'onnxrep/deploy')} | {tr} | "
                             f"{ratio_text(r, 'onnxrep/train')} | {' / '.join(str(x['rounds']) for x in r['runs'])} |"
                             + (f" {kernel_diff(r) or 'same'} |" if kern else ""))
            lines.append("")
    cross = [r for r in res if "runs" in r and "onnxrep/ts_deploy" in r["runs"][0]["ratios"]]
    if cross:
        lines += ["#### onnxrep's output of the dynamo export against the TorchScript deploy export", "",
                  "| model | runtime | batch | TorchScript deploy ms | **onnxrep(dynamo) / deploy(TorchScript)** | spread | "
                  "dynamo deploy / TorchScript deploy | onnxruntime kernels, onnxrep(dynamo) - deploy(TorchScript) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in cross:
            m = r["runs"][0]
            dd = " / ".join(f"{x['graphs']['deploy']['median_ms'] / x['graphs']['ts_deploy']['median_ms']:.3f}" for x in r["runs"])
            lines.append(f"| {r['model']} | {r['runtime']} | {r['batch']} | {m['graphs']['ts_deploy']['median_ms']:.2f} | "
                         f"{ratio_text(r, 'onnxrep/ts_deploy')} | {spread_text(r, 'onnxrep/ts_deploy')} | {dd} | "
                         f"{(kernel_diff(r, 'onnxrep', 'ts_deploy') or 'same') if r.get('ort_kernels') else '-'} |")
        lines.append("")
    lines += ["#### Targets", ""]
    lines += target_lines(res)
    lines += ["", f"![onnxrep / deploy per model]({doc['plot']})", "", END]
    return "\n".join(lines)


def target_lines(res: list[dict]) -> list[str]:
    out = []
    done = [r for r in res if "runs" in r]
    for key, target in TARGETS.items():
        judged = [r for r in done if key in r["runs"][0]["ratios"]]
        if not judged:
            continue
        missed = [r for r in judged if all(m["ratios"][key]["ratio"] > max(target, TARGET) for m in r["runs"])]
        once = [r for r in judged if r not in missed and any(m["ratios"][key]["ratio"] > max(target, TARGET) for m in r["runs"])]
        band = f"{target:.2f}" + (f" (+{TARGET - 1:.2f} noise band)" if target < TARGET else "")
        lines = [f"- `{key}` <= {band}: met in {len(judged) - len(missed)} of {len(judged)} cases"
                 + (f"; {len(once)} above only in one of two measurements (noise)" if once else "") + "."]
        for r in missed:
            vals = ", ".join(f"{m['ratios'][key]['ratio']:.3f} (rounds {m['ratios'][key]['round_q1']:.3f}-{m['ratios'][key]['round_q3']:.3f})" for m in r["runs"])
            k = kernels_of(res, r["model"], r["exporter"])
            other = RATIOS[key][1]
            why = f"; onnxruntime kernels onnxrep - {other} at batch 1: {kernel_diff(k, 'onnxrep', other) or 'none'}" if k else ""
            lines.append(f"  - **missed**: {r['model']} {r['exporter']} {r['runtime']} batch {r['batch']}: {vals}{why}")
        out += lines
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, s = doc["results"], doc["settings"]
    panels = [(rt, b) for rt in s["runtimes"] for b in s["batches"]]
    models = s["models"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(9, 0.75 * len(models) + 3), 3.6 * len(panels)), squeeze=False)
    width = 0.8 / len(s["exporters"])
    colors = plt.get_cmap("tab10")
    for ax, (rt, batch) in zip(axes[:, 0], panels):
        x = np.arange(len(models))
        lo, hi = 0.9, 1.1
        for j, exporter in enumerate(s["exporters"]):
            vals, err = [], [[], []]
            for m in models:
                row = next((r for r in res if r["model"] == m and r["exporter"] == exporter and r["runtime"] == rt
                            and r["batch"] == batch and "runs" in r), None)
                if row is None:
                    vals.append(np.nan)
                    err[0].append(0)
                    err[1].append(0)
                    continue
                q = row["runs"][0]["ratios"]["onnxrep/deploy"]
                vals.append(q["ratio"])
                err[0].append(max(q["ratio"] - q["round_q1"], 0))
                err[1].append(max(q["round_q3"] - q["ratio"], 0))
                for extra in row["runs"][1:]:
                    v = extra["ratios"]["onnxrep/deploy"]["ratio"]
                    ax.plot(x[models.index(m)] - 0.4 + width * (j + 0.5), v, marker="x", color="black", markersize=6, zorder=3)
                    lo, hi = min(lo, v - 0.03), max(hi, v + 0.05)
            vals = np.array(vals, dtype=float)
            ax.bar(x - 0.4 + width * (j + 0.5), vals - 1.0, width, bottom=1.0, yerr=err, capsize=2,
                   label=exporter, color=colors(j), error_kw={"elinewidth": 0.8})
            if np.isfinite(vals).any():
                lo, hi = min(lo, np.nanmin(vals) - 0.03), max(hi, np.nanmax(vals) + 0.05)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(TARGET, color="red", linewidth=1.0, linestyle="--", label=f"target {TARGET}")
        ax.set_xticks(x)
        ax.set_xticklabels(models, rotation=25, ha="right", fontsize=8)
        ax.set_ylim(lo, hi)
        ax.set_ylabel("onnxrep / deploy")
        name = {"ort": "onnxruntime CPU", "openvino": "OpenVINO CPU"}[rt]
        ax.set_title(f"{name}, batch {batch}, {s['threads']} threads (bars: ratio of medians; whiskers: "
                     "per-round quartiles; x: repeat)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"timm zoo exports: onnxrep's output / deploy export latency ({doc['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def update_section(md_path: Path, text: str) -> None:
    """Replace the generated part of BENCHMARKS.md (between the markers); append it when absent."""
    body = md_path.read_text()
    if BEGIN in body and END in body:
        head, rest = body.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        md_path.write_text(head + text + tail)
    else:
        md_path.write_text(body.rstrip("\n") + "\n\n## Latency of the real-model zoo\n\n" + text + "\n")


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--models", nargs="+", default=None, help="zoo model names (default: all)")
    ap.add_argument("--exporters", nargs="+", default=list(DEFAULT_EXPORTERS), choices=zm.EXPORTERS)
    ap.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--rounds", type=int, default=None, help="most interleaved rounds per case (default 300 at batch 1, 40 above)")
    ap.add_argument("--min-rounds", type=int, default=None, help="fewest rounds per case, budget or not (default 20 at batch 1, 5 above)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up runs of each graph (default 5 at batch 1, 1 above)")
    ap.add_argument("--budget", type=float, default=25 * 60, help="seconds for the whole run (default 1500); the rounds adapt")
    ap.add_argument("--repeat-share", type=float, default=0.15, help="part of the budget kept for the repeats (default 0.15)")
    ap.add_argument("--no-repeat", dest="repeat", action="store_false", help="do not measure cases above target again")
    ap.add_argument("--order", choices=("balanced", "rotate"), default="balanced",
                    help="round orders: a Williams design, every graph after every other equally often (default), "
                         "or rotated by one per round")
    ap.add_argument("--target", type=float, default=TARGET)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (onnxruntime), inference threads (OpenVINO)")
    ap.add_argument("--ov-precision", default="f32", help="OpenVINO INFERENCE_PRECISION_HINT (f32, bf16 or default)")
    ap.add_argument("--ov-pinning", action="store_true",
                    help="let OpenVINO pin its threads to cores (off by default: on a shared machine a pinned thread "
                         "waits for its core instead of moving)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"export folder, shared with benchmarks/zoo.py (default {DEFAULT_CACHE})")
    ap.add_argument("--seed", type=int, default=zm.SEED)
    ap.add_argument("--json", type=Path, default=JSON_PATH)
    ap.add_argument("--plot", type=Path, default=PLOT_PATH)
    ap.add_argument("--markdown", type=Path, default=MD_PATH, help="file whose generated section is replaced (default BENCHMARKS.md)")
    ap.add_argument("--no-write", action="store_true", help="print the section, write no files")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="measure nothing: write the plot and the section again from this JSON of an earlier run")
    args = ap.parse_args(argv)
    if args.render is not None:
        doc = json.loads(args.render.read_text())
        if args.no_write:
            print(markdown(doc))
            return 0
        plot(doc, args.plot)
        update_section(args.markdown, markdown(doc))
        log(f"wrote {args.plot}, the section of {args.markdown} from {args.render}")
        return 0

    absent = zm.absent_models()
    args.models = args.models or [m.name for m in zm.ZOO if m.name not in absent]
    unknown = [n for n in args.models if n not in zm.BY_NAME]
    if unknown:
        ap.error(f"not in the zoo: {', '.join(unknown)}; the zoo: {', '.join(zm.BY_NAME)}")
    if "openvino" in args.runtimes:
        try:
            import openvino  # noqa: F401
        except ImportError:
            ap.error("openvino is not installed (pip install 'onnxrep[bench]'), or pass --runtimes ort")

    start = datetime.datetime.now(datetime.timezone.utc)
    env = environment()
    versions = env["versions"]
    if "openvino" in args.runtimes:
        import openvino as ov

        versions["openvino"] = ov.get_version()
    import matplotlib

    versions["matplotlib"] = matplotlib.__version__
    load_start = list(os.getloadavg())
    log(f"{len(args.models)} models x {len(args.exporters)} exporters x {len(args.batches)} batches x "
        f"{len(args.runtimes)} runtimes, budget {args.budget:.0f} s")
    out = run_all(args)
    rel = lambda p: str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)  # noqa: E731
    loads = [m["loadavg"][0] for r in out["results"] for m in r.get("runs", [])]
    doc = {
        "command": "python " + shlex.join(["benchmarks/zoo_latency.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": start.isoformat(timespec="seconds"),
        "elapsed_s": out["elapsed_s"],
        **env,
        "loadavg_start": load_start,
        "loadavg_end": list(os.getloadavg()),
        "loadavg_median": statistics.median(loads) if loads else float("nan"),
        "settings": {"models": args.models, "exporters": args.exporters, "runtimes": args.runtimes,
                     "batches": args.batches, "threads": args.threads, "ov_precision": args.ov_precision,
                     "rounds": args.rounds, "min_rounds": args.min_rounds, "order": args.order, "warmup": args.warmup,
                     "budget": args.budget, "target": args.target, "seed": args.seed, "resolution": zm.RESOLUTION,
                     "torchscript_opset": zm.TORCHSCRIPT_OPSET, "targets": TARGETS, "cross_models": list(CROSS_MODELS),
                     "ort_session_config": {"graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": args.threads,
                                            "inter_op_num_threads": 1, "execution_mode": "ORT_SEQUENTIAL",
                                            "session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"},
                     "openvino_config": ov_config(args.threads, args.ov_precision, args.ov_pinning)},
        "plot": rel(args.plot),
        "json": rel(args.json),
        "results": out["results"],
    }
    if "openvino" in args.runtimes:
        import openvino as ov

        probe = next((r for r in out["results"] if "runs" in r), None)
        if probe is not None:
            train, _ = export_paths(zm.Builder(args.cache, seed=args.seed), probe["model"], probe["exporter"], 1)
            doc["openvino_properties"] = ov_properties(ov.Core(), args.threads, args.ov_precision, args.ov_pinning, train)
    text = markdown(doc)
    if args.no_write:
        print(text)
        return 0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1, default=str))
    plot(doc, args.plot)
    update_section(args.markdown, text)
    log(f"wrote {args.json}, {args.plot}, the section of {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
