#!/usr/bin/env python
"""Benchmark the parallel-merge pass: inference latency and optimize time.

1. Latency. For each model family (``onnxrep.models.BUILDERS``) at batch 1, full width: build the
   training and deploy forms (same seed, so the same parameters), optimize the training form with
   ``onnxrep.optimize`` (verify=False), and time all three in onnxruntime on CPU
   (ORT_ENABLE_ALL, ``--threads`` intra-op threads, no thread spinning) with
   :func:`onnxrep.bench.interleaved_latency`: a warm-up, then interleaved rounds in the orders of
   a Williams design (each model in each position and after each other model equally often), one
   inference each.
   Reported: median and min per model, and the median ratios train/deploy and optimized/deploy
   (target: optimized/deploy <= 1.02).
2. Optimize time. A RepVGG-A0-style model whose training form is about ``--big-mb`` MB on disk is
   saved to a temporary folder; ``onnx.load`` + ``onnx.save`` of that file and
   ``onnxrep.optimize(path)`` (verify=False) are each timed ``--repeats`` times (median); target
   ratio optimize / (load + save) <= 1.5. Above target, one optimize is profiled (cProfile, top 15
   by cumulative time) unless ``--no-profile``.

    python benchmarks/bench_parallel.py                      # full run (a few minutes on 2 cores)
    python benchmarks/bench_parallel.py --quick              # smoke run, well under a minute
    python benchmarks/bench_parallel.py --out /tmp/bench_parallel.json
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxrep  # noqa: E402
from onnxrep.bench import interleaved_latency  # noqa: E402
from onnxrep.equivalence import run_model  # noqa: E402
from onnxrep.models import BUILDERS, repvgg_a0  # noqa: E402

LATENCY_TARGET = 1.02
OPTIMIZE_TARGET = 1.5
MODELS = ("train", "optimized", "deploy")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def op_count(model: onnx.ModelProto, op: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op)


def machine_info() -> dict:
    cpu_model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "onnxrep": onnxrep.__version__,
        "onnxrep_path": str(Path(onnxrep.__file__).parent),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other processes on the machine skew the latencies)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# --------------------------------------------------------------------------------------------
# 1. latency
# --------------------------------------------------------------------------------------------


def bench_family(name: str, args) -> dict:
    build = BUILDERS[name]
    t0 = time.perf_counter()
    train = build(deploy=False, resolution=args.resolution, batch=1, seed=args.seed)
    deploy = build(deploy=True, resolution=args.resolution, batch=1, seed=args.seed)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    optimized, report = onnxrep.optimize(train, verify=False)
    t_opt = time.perf_counter() - t0
    rep = report.to_dict()
    skips = [s for p in rep["passes"] for s in p["skips"]]

    models = {"train": train, "optimized": optimized, "deploy": deploy}
    feed = {"input": np.random.default_rng(args.seed + 1).standard_normal((1, 3, args.resolution, args.resolution)).astype(np.float32)}
    outputs = {k: run_model(m, feed)[0] for k, m in models.items()}
    scale = float(np.abs(outputs["deploy"]).max())
    rel = {k: float(np.abs(outputs[k] - outputs["deploy"]).max()) / scale for k in ("train", "optimized")}
    timings = interleaved_latency(models, rounds=args.rounds, warmup=args.warmup, threads=args.threads)
    lat = {k: t.to_dict() for k, t in timings.items()}
    med = {k: lat[k]["median_ms"] for k in MODELS}
    mins = {k: lat[k]["min_ms"] for k in MODELS}
    return {
        "family": name,
        "resolution": args.resolution,
        "build_s": t_build,
        "optimize_s": t_opt,
        "model_mb": train.ByteSize() / 1e6,
        "ops": {k: {"Conv": op_count(m, "Conv"), "BatchNormalization": op_count(m, "BatchNormalization"),
                    "Add": op_count(m, "Add"), "nodes": len(m.graph.node)} for k, m in models.items()},
        "rewritten": rep["rewritten"],
        "skips": skips,
        "max_rel_error_vs_deploy": rel,
        "latency": lat,
        "ratio_train_deploy": med["train"] / med["deploy"],
        "ratio_optimized_deploy": med["optimized"] / med["deploy"],
        "ratio_train_deploy_min": mins["train"] / mins["deploy"],
        "ratio_optimized_deploy_min": mins["optimized"] / mins["deploy"],
    }


def print_latency(results: list[dict], args) -> None:
    print()
    print(
        f"Latency: onnxruntime {ort.__version__} CPU, ORT_ENABLE_ALL, {args.threads} intra-op threads, "
        f"{args.resolution}x{args.resolution} batch 1, {args.warmup} warm-up + {args.rounds} interleaved rounds (balanced order)"
    )
    head = (
        f"{'family':<14}{'Conv t/o/d':>13}{'train ms':>18}{'optimized ms':>18}{'deploy ms':>18}"
        f"{'train/dep':>15}{'opt/dep':>16}{'':>5}{'opt s':>5}  {'rel err':>8}"
    )
    print(head)
    print(f"{'':<14}{'':>13}{'median / min':>18}{'median / min':>18}{'median / min':>18}"
          f"{'med (min)':>15}{'med (min)':>16}")
    print("-" * len(head))
    for r in results:
        c = r["ops"]
        convs = f"{c['train']['Conv']}/{c['optimized']['Conv']}/{c['deploy']['Conv']}"
        cells = "".join(
            f"{r['latency'][k]['median_ms']:>10.2f} /{r['latency'][k]['min_ms']:>6.2f}" for k in MODELS
        )
        ok = "ok" if r["ratio_optimized_deploy"] <= LATENCY_TARGET else "HIGH"
        td = f"{r['ratio_train_deploy']:.3f} ({r['ratio_train_deploy_min']:.2f})"
        od = f"{r['ratio_optimized_deploy']:.3f} ({r['ratio_optimized_deploy_min']:.3f})"
        print(
            f"{r['family']:<14}{convs:>13}{cells}{td:>15}{od:>16} {ok:<4}"
            f"{r['optimize_s']:>5.2f}  {r['max_rel_error_vs_deploy']['optimized']:>8.1e}"
        )
    print(f"(ratios of medians, ratios of minima in parentheses; target optimized/deploy <= {LATENCY_TARGET} "
          f"on medians; 'opt s' = onnxrep.optimize time; 'rel err' = max|opt - deploy| / max|deploy|)")
    for r in results:
        if r["skips"]:
            print(f"  {r['family']}: {len(r['skips'])} candidate(s) skipped: {r['skips'][0]['reason']}")
        bn = r["ops"]["optimized"]["BatchNormalization"]
        if bn:
            print(f"  {r['family']}: {bn} BatchNormalization node(s) left in the optimized graph")


# --------------------------------------------------------------------------------------------
# 2. optimize time vs load + save
# --------------------------------------------------------------------------------------------


def width_for_size(target_mb: float, seed: int) -> float:
    """width_scale at which the RepVGG-A0 training form is about ``target_mb`` MB (quadratic fit of
    the serialized size at three small widths)."""
    scales = np.array([0.25, 0.5, 1.0])
    sizes = np.array([repvgg_a0(width_scale=s, seed=seed).ByteSize() / 1e6 for s in scales])
    a, b, c = np.polyfit(scales, sizes, 2)
    roots = np.roots([a, b, c - target_mb])
    real = [float(r.real) for r in roots if abs(r.imag) < 1e-9 and r.real > 0]
    return max(real) if real else 1.0


def bench_optimize_time(args) -> dict:
    ws = width_for_size(args.big_mb, args.seed)
    log(f"building the ~{args.big_mb:g} MB RepVGG-style model (width_scale {ws:.3f}) ...")
    model = repvgg_a0(width_scale=ws, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_parallel-") as tmp:
        path = os.path.join(tmp, "repvgg_big_train.onnx")
        copy = os.path.join(tmp, "copy.onnx")
        onnx.save(model, path)
        del model
        size_mb = os.path.getsize(path) / 1e6
        load_save, load_only, optimize, optimize_save = [], [], [], []
        for i in range(args.repeats):
            log(f"  repeat {i + 1}/{args.repeats}: load+save, optimize")
            t0 = time.perf_counter()
            m = onnx.load(path)
            t1 = time.perf_counter()
            onnx.save(m, copy)
            t2 = time.perf_counter()
            load_only.append(t1 - t0)
            load_save.append(t2 - t0)
            del m
            t0 = time.perf_counter()
            out, report = onnxrep.optimize(path, verify=False)
            t1 = time.perf_counter()
            onnx.save(out, copy)
            t2 = time.perf_counter()
            optimize.append(t1 - t0)
            optimize_save.append(t2 - t0)
            rewritten = report.rewritten
            del out, report
        res = {
            "width_scale": ws,
            "file_mb": size_mb,
            "repeats": args.repeats,
            "load_save_s": load_save,
            "load_s": load_only,
            "optimize_s": optimize,
            "optimize_save_s": optimize_save,
            "rewritten": rewritten,
        }
        res["load_save_median_s"] = statistics.median(load_save)
        res["optimize_median_s"] = statistics.median(optimize)
        res["optimize_save_median_s"] = statistics.median(optimize_save)
        res["ratio"] = res["optimize_median_s"] / res["load_save_median_s"]
        res["profile"] = None
        if res["ratio"] > OPTIMIZE_TARGET and not args.no_profile:
            log("  profiling one onnxrep.optimize(path) ...")
            prof = cProfile.Profile()
            prof.enable()
            onnxrep.optimize(path, verify=False)
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(15)
            res["profile"] = buf.getvalue()
    return res


def print_optimize_time(r: dict) -> None:
    print()
    print(
        f"Optimize time: RepVGG-A0-style training model, width_scale {r['width_scale']:.3f}, "
        f"{r['file_mb']:.1f} MB file, {r['rewritten']} blocks merged, median of {r['repeats']}"
    )
    rows = [
        ("onnx.load + onnx.save", r["load_save_s"]),
        ("  (onnx.load alone)", r["load_s"]),
        ("onnxrep.optimize(path)", r["optimize_s"]),
        ("  (optimize + onnx.save)", r["optimize_save_s"]),
    ]
    print(f"{'':<26}{'median s':>10}{'min s':>9}")
    for label, v in rows:
        print(f"{label:<26}{statistics.median(v):>10.3f}{min(v):>9.3f}")
    ok = "ok" if r["ratio"] <= OPTIMIZE_TARGET else "ABOVE TARGET"
    print(f"ratio optimize / (load + save) = {r['ratio']:.2f}  (target <= {OPTIMIZE_TARGET}: {ok})")
    if r["profile"]:
        print()
        print("cProfile of one onnxrep.optimize(path), top 15 by cumulative time:")
        print(r["profile"].rstrip())


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(BUILDERS), choices=list(BUILDERS), metavar="FAMILY",
                   help=f"model families (default: all of {', '.join(BUILDERS)})")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 600; quick: 20)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs per model (default 20; quick: 3)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("--resolution", type=int, default=None, help="input resolution (default 224; quick: 64)")
    p.add_argument("--big-mb", type=float, default=None, help="size of the optimize-time model in MB (default 150; quick: 15)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of load+save and optimize (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-latency", action="store_true", help="only measure optimize time")
    p.add_argument("--skip-optimize-time", action="store_true", help="only measure latency")
    p.add_argument("--no-profile", action="store_true", help="do not profile optimize when above target")
    p.add_argument("--quick", action="store_true", help="smoke run: resolution 64, 20 rounds, 15 MB model")
    p.add_argument("--out", help="write the results as JSON to this path")
    args = p.parse_args(argv)
    quick = args.quick
    if args.rounds is None:
        args.rounds = 20 if quick else 600
    if args.warmup is None:
        args.warmup = 3 if quick else 20
    if args.resolution is None:
        args.resolution = 64 if quick else 224
    if args.big_mb is None:
        args.big_mb = 15.0 if quick else 150.0

    info = machine_info()
    print(f"machine: {info['cpu_model'] or info['machine']}, {info['cpu_usable']} usable of {info['cpu_count']} CPUs, "
          f"{info['platform']}")
    print(f"python {info['python']}, onnx {info['onnx']}, onnxruntime {info['onnxruntime']}, numpy {info['numpy']}, "
          f"onnxrep {info['onnxrep']}; {info['date']}")
    load_start = load_average()
    if load_start is not None:
        print(f"load average at start: {load_start[0]:.2f} (1 min)")
    t_start = time.perf_counter()

    results = []
    if not args.skip_latency:
        for name in args.families:
            log(f"{name}: build, optimize, {args.rounds} rounds ...")
            results.append(bench_family(name, args))
        print_latency(results, args)

    opt_time = None
    if not args.skip_optimize_time:
        opt_time = bench_optimize_time(args)
        print_optimize_time(opt_time)

    elapsed = time.perf_counter() - t_start
    load_end = load_average()
    print(f"\ntotal benchmark time {elapsed:.0f} s" + (f"; load average at end {load_end[0]:.2f} (1 min)" if load_end else ""))
    info["loadavg_start"], info["loadavg_end"] = load_start, load_end
    if args.out:
        doc = {
            "machine": info,
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "targets": {"optimized_over_deploy": LATENCY_TARGET, "optimize_over_load_save": OPTIMIZE_TARGET},
            "latency": results,
            "optimize_time": opt_time,
            "elapsed_s": elapsed,
        }
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
