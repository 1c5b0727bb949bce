#!/usr/bin/env python
"""Benchmark suite: onnxrep against onnxsim, onnxslim and onnxoptimizer.

1. Latency. For each model family of ``onnxrep.models.BUILDERS`` (224x224, full width by default)
   the training form is built once with a symbolic batch dim ``"N"``, and six variants of it are
   timed together:

   ``train``          the training form as built
   ``onnxsim``        ``onnxsim.simplify(model)[0]`` (defaults)
   ``onnxslim``       ``onnxslim.slim(model)`` (defaults)
   ``onnxoptimizer``  ``onnxoptimizer.optimize(model)`` (its default fuse-and-eliminate passes)
   ``onnxrep``        ``onnxrep.optimize(model)[0]`` (defaults)
   ``deploy``         the hand-built deploy form (the builders' own fusion code, same parameters)

   For every batch size (default 1 and 32) all six run in one
   :func:`onnxrep.bench.interleaved_latency` call (ORT_ENABLE_ALL, ``--threads`` intra-op threads,
   balanced order), ``dims={"N": batch}``. Reported per variant: median ms, ratio of medians to
   deploy, node count, Conv/Gemm/MatMul count, MACs at that batch (:func:`onnxrep.cost.model_cost`
   at batch 1, times the batch) and the largest output difference to deploy at batch 1 relative to
   max|deploy|. A tool that raises, or whose model onnxruntime refuses, gives a cell
   ``failed: <reason>`` and is left out of the timing.

2. Optimize cost. RepVGG-A0 training forms scaled (``width_scale``) to about ``--sizes`` MB are
   saved to a temporary folder; each tool then runs on the file in a fresh process (the CLIs, or
   ``python -c``), under ``/usr/bin/time`` when there is one (else a ``python -c`` wrapper that
   reports its own ``ru_maxrss``), with a time limit: wall time and peak RSS of that process.

    python benchmarks/bench_suite.py --quick                       # smoke run, < 2 minutes
    python benchmarks/bench_suite.py --json r.json --plot r.png --markdown r.md
    python benchmarks/bench_suite.py --skip-cost --batches 1 --families repvgg-a0 mobileone-s0
    python benchmarks/bench_suite.py --skip-latency --sizes 10,100
    python benchmarks/bench_suite.py --ep CUDAExecutionProvider    # onnxruntime-gpu needed
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxrep
from onnxrep.bench import interleaved_latency, session
from onnxrep.cost import model_cost
from onnxrep.equivalence import random_inputs
from onnxrep.io import skeleton
from onnxrep.models import BUILDERS, repvgg_a0

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_parallel import load_average, machine_info, width_for_size  # noqa: E402


#: Families in the order they are reported; any other builder follows, in BUILDERS order.
PREFERRED = ("repvgg-a0", "repvgg-b1g4", "acnet-resnet18", "dbb-resnet18", "mobileone-s0", "replknet",
             "fastvit", "repvit", "resrep")
VARIANTS = ("train", "onnxsim", "onnxslim", "onnxoptimizer", "onnxrep", "deploy")
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
BATCH = "N"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
TOOL_VERSIONS = ("onnx", "onnxruntime", "onnxsim", "onnxslim", "onnxoptimizer", "onnxrep", "numpy", "matplotlib")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def families_available() -> list[str]:
    return [f for f in PREFERRED if f in BUILDERS] + [f for f in BUILDERS if f not in PREFERRED]


def short_error(e: BaseException | str, limit: int = 160) -> str:
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else str(text)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def versions() -> dict:
    out = {}
    for name in TOOL_VERSIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def fmt_macs(macs: int | None) -> str:
    if macs is None:
        return "-"
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if macs >= div:
            return f"{macs / div:.3g} {unit}"
    return str(macs)


def fmt_mb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e6:.1f}"


# --------------------------------------------------------------------------------------------
# 1. latency
# --------------------------------------------------------------------------------------------


def clone(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _onnxsim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    out, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim's own output check failed")
    return out


def _onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def _onnxoptimizer(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxoptimizer

    return onnxoptimizer.optimize(model)


def _onnxrep(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnxrep.optimize(model)[0]


TOOLS = {"onnxsim": _onnxsim, "onnxslim": _onnxslim, "onnxoptimizer": _onnxoptimizer, "onnxrep": _onnxrep}


def batch1_cost(model: onnx.ModelProto):
    """model_cost with the symbolic batch dim set to 1 (every other dim of these models is static)."""
    sk = skeleton(model)
    del sk.graph.value_info[:]
    for vi in list(sk.graph.input) + list(sk.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param == BATCH:
                d.dim_value = 1
    return model_cost(sk)


def describe(model: onnx.ModelProto) -> dict:
    ops = {op: sum(1 for n in model.graph.node if n.op_type == op) for op in COMPUTE_OPS}
    cost = batch1_cost(model)
    return {
        "nodes": len(model.graph.node),
        "ops": ops,
        "macs_batch1": cost.macs,
        "macs_exact": cost.exact,
        "params": cost.params,
        "bytes": model.ByteSize(),
    }


def check_outputs(models: dict[str, onnx.ModelProto], threads: int, provider: str) -> tuple[dict, dict]:
    """Run every model once at batch 1; the ones onnxruntime refuses are returned as failures."""
    feeds = random_inputs(models["deploy"], seed=1, dims={BATCH: 1})
    outs, failures = {}, {}
    for name, m in models.items():
        try:
            outs[name] = session(m, threads, provider).run(None, feeds)[0]
        except Exception as e:  # noqa: BLE001 - reported as a failed cell
            failures[name] = "onnxruntime: " + short_error(e)
    rel = {}
    if "deploy" in outs:
        ref = outs["deploy"]
        scale = float(np.abs(ref).max()) or 1.0
        for name, o in outs.items():
            rel[name] = float(np.abs(o - ref).max()) / scale if o.shape == ref.shape else float("inf")
    return rel, failures


def bench_family(name: str, args) -> dict:
    res: dict = {"family": name, "variants": {v: {} for v in VARIANTS}, "latency": {}}
    build = BUILDERS[name]
    t0 = time.perf_counter()
    try:
        kw = dict(resolution=args.resolution, batch=BATCH, seed=args.seed, width_scale=args.width_scale)
        train = build(deploy=False, **kw)
        deploy = build(deploy=True, **kw)
    except Exception as e:  # noqa: BLE001
        res["error"] = "build: " + short_error(e)
        log(f"  {name}: build failed: {res['error']}")
        return res
    res["build_s"] = time.perf_counter() - t0
    res["model_mb"] = train.ByteSize() / 1e6

    models = {"train": train}
    for tool, fn in TOOLS.items():
        t0 = time.perf_counter()
        try:
            models[tool] = fn(clone(train))
            res["variants"][tool]["tool_s"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            res["variants"][tool]["error"] = short_error(e)
            res["variants"][tool]["tool_s"] = time.perf_counter() - t0
            log(f"  {name}: {tool} failed: {res['variants'][tool]['error']}")
        else:
            log(f"  {name}: {tool} {res['variants'][tool]['tool_s']:.2f} s")
    models["deploy"] = deploy

    for v, m in models.items():
        try:
            res["variants"][v].update(describe(m))
        except Exception as e:  # noqa: BLE001 - counts are informative only
            res["variants"][v]["describe_error"] = short_error(e)

    rel, failures = check_outputs(models, args.threads, args.provider)
    for v, err in failures.items():
        res["variants"][v]["error"] = err
        log(f"  {name}: {v} failed: {err}")
        del models[v]
    for v, r in rel.items():
        res["variants"][v]["rel_err_vs_deploy"] = r

    for batch in args.batches:
        rounds, warmup = args.rounds_for(batch), args.warmup_for(batch)
        t0 = time.perf_counter()
        log(f"  {name}: batch {batch}, {warmup} warm-up + {rounds} rounds of {len(models)} models ...")
        try:
            timings = interleaved_latency(models, rounds=rounds, warmup=warmup, threads=args.threads,
                                          dims={BATCH: batch}, provider=args.provider)
            lat = {v: t.to_dict() for v, t in timings.items()}
            err = None
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large batch
            lat, err = {}, short_error(e)
            log(f"  {name}: batch {batch} timing failed: {err}")
        ref = lat.get("deploy", {}).get("median_ms")
        for v in lat:
            lat[v]["ratio_to_deploy"] = lat[v]["median_ms"] / ref if ref else None
        res["latency"][str(batch)] = {"rounds": rounds, "warmup": warmup, "models": lat, "error": err,
                                      "seconds": time.perf_counter() - t0}
        gc.collect()
    del models, train, deploy
    gc.collect()
    return res


def macs_at(cell: dict, batch: int) -> int | None:
    m = cell.get("macs_batch1")
    return None if m is None else m * batch


def latency_rows(r: dict, batch: int) -> list[dict]:
    """One dict of display strings per variant."""
    rows = []
    lb = r["latency"].get(str(batch), {})
    for v in VARIANTS:
        cell = r["variants"].get(v, {})
        t = lb.get("models", {}).get(v)
        if cell.get("error"):
            ms = ratio = f"failed: {cell['error']}"
        elif t is None:
            ms = ratio = f"failed: {lb.get('error') or r.get('error') or 'not timed'}"
        else:
            ms = f"{t['median_ms']:.2f}"
            ratio = f"{t['ratio_to_deploy']:.3f}" if t.get("ratio_to_deploy") else "-"
        ops = cell.get("ops")
        rows.append({
            "variant": v,
            "ms": ms,
            "min": f"{t['min_ms']:.2f}" if t else "-",
            "ratio": ratio,
            "nodes": str(cell.get("nodes", "-")),
            "cgm": "/".join(str(ops[o]) for o in COMPUTE_OPS) if ops else "-",
            "macs": fmt_macs(macs_at(cell, batch)) + ("" if cell.get("macs_exact", True) else "*"),
            "tool_s": f"{cell['tool_s']:.2f}" if "tool_s" in cell else "-",
            "rel": f"{cell['rel_err_vs_deploy']:.1e}" if "rel_err_vs_deploy" in cell else "-",
        })
    return rows


def latency_header(args, batch: int) -> str:
    return (f"batch {batch}: {args.resolution}x{args.resolution}, width scale {args.width_scale:g}, onnxruntime "
            f"{ort.__version__} {args.provider}, ORT_ENABLE_ALL, {args.threads} intra-op threads, "
            f"{args.warmup_for(batch)} warm-up + {args.rounds_for(batch)} interleaved rounds (balanced order)")


def print_latency(results: list[dict], args) -> None:
    cols = [("family", "family", "<", 15), ("variant", "variant", "<", 14), ("ms", "median ms", ">", 10),
            ("min", "min ms", ">", 9), ("ratio", "/ deploy", ">", 9), ("nodes", "nodes", ">", 6),
            ("cgm", "Conv/Gemm/MM", ">", 13), ("macs", "MACs", ">", 10), ("tool_s", "tool s", ">", 7),
            ("rel", "rel err", ">", 9)]
    for batch in args.batches:
        print()
        print("Latency, " + latency_header(args, batch))
        head = " ".join(f"{label:{al}{w}}" for _, label, al, w in cols)
        print(head)
        print("-" * len(head))
        for r in results:
            if r.get("error"):
                print(f"{r['family']:<15} failed: {r['error']}")
                continue
            for i, row in enumerate(latency_rows(r, batch)):
                row["family"] = r["family"] if i == 0 else ""
                failed = row["ms"].startswith("failed")
                cells = []
                for key, _, al, w in cols:
                    if failed and key == "ms":
                        cells.append(row["ms"])
                        break
                    cells.append(f"{row[key]:{al}{w}}")
                line = " ".join(cells)
                if failed:
                    line += f"  (nodes {row['nodes']}, Conv/Gemm/MM {row['cgm']}, MACs {row['macs']})"
                print(line)
            print()
    print("'/ deploy' = ratio of medians to the deploy form in the same interleaved run; MACs at that batch "
          "(* = some shape unknown, counted as 1); 'tool s' = time the tool took on the training form; "
          "'rel err' = max|variant - deploy| / max|deploy| at batch 1.")
    print()
    print("Ratio to deploy (median / median):")
    head = f"{'family':<15}{'batch':>6}" + "".join(f"{v:>14}" for v in VARIANTS[:-1])
    print(head)
    print("-" * len(head))
    for r in results:
        for batch in args.batches:
            ratios = summary_ratios(r, batch)
            print(f"{r['family']:<15}{batch:>6}" + "".join(f"{ratios[v]:>14}" for v in VARIANTS[:-1]))


def summary_ratios(r: dict, batch: int) -> dict[str, str]:
    lb = r["latency"].get(str(batch), {}).get("models", {})
    out = {}
    for v in VARIANTS:
        if r.get("error") or r["variants"].get(v, {}).get("error") or v not in lb:
            out[v] = "failed"
        else:
            ratio = lb[v].get("ratio_to_deploy")
            out[v] = f"{ratio:.3f}" if ratio else "-"
    return out


# --------------------------------------------------------------------------------------------
# 2. optimize cost: wall time and peak RSS of each tool in its own process
# --------------------------------------------------------------------------------------------

COST_TOOLS = {
    "onnx.load + onnx.save": [sys.executable, "-c",
                              "import sys, onnx; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])", "{IN}", "{OUT}"],
    "onnxrep (CLI, --no-verify)": [sys.executable, "-m", "onnxrep.cli", "optimize", "{IN}", "-o", "{OUT}",
                                   "--no-verify", "-q"],
    # the command's own steps (io.load, engine.run, io.check, io.save) with the weights read lazily
    "onnxrep (lazy load)": [sys.executable, "-c",
                            "import sys; from onnxrep import engine, io; m, ext = io.load(sys.argv[1], lazy=True); "
                            "out, _ = engine.run(m); io.check(out); io.save(out, sys.argv[2], external=ext)", "{IN}", "{OUT}"],
    "onnxsim (CLI)": [sys.executable, "-m", "onnxsim", "{IN}", "{OUT}"],
    "onnxslim (CLI)": [sys.executable, "-m", "onnxslim", "{IN}", "{OUT}"],
    "onnxoptimizer (API)": [sys.executable, "-c",
                            "import sys, onnx, onnxoptimizer; "
                            "onnx.save(onnxoptimizer.optimize(onnx.load(sys.argv[1])), sys.argv[2])", "{IN}", "{OUT}"],
}

#: Used when /usr/bin/time is missing: a small python process runs the tool as its child and prints the
#: child's peak RSS. (A process forked from this big one and then exec'ed would report this one's RSS
#: as its own ru_maxrss on Linux; a child of the small wrapper starts from the wrapper's.)
RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[1:])\n"
    "print('__MAXRSS_KB__', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr, flush=True)\n"
    "sys.exit(rc if rc >= 0 else 128 - rc)\n"
)

GNU_TIME = "/usr/bin/time"


def gnu_time_ok() -> bool:
    if not os.access(GNU_TIME, os.X_OK):
        return False
    try:
        with tempfile.NamedTemporaryFile("r") as f:
            subprocess.run([GNU_TIME, "-f", "%M", "-o", f.name, "true"], check=True, capture_output=True, timeout=30)
            return f.read().strip().isdigit()
    except (OSError, subprocess.SubprocessError):
        return False


def run_measured(cmd: list[str], timeout: float, use_time: bool) -> dict:
    """Run ``cmd`` in its own process group; wall time, peak RSS (KB), exit code, stderr tail."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        if use_time:
            full = [GNU_TIME, "-f", "%M", "-o", tf.name] + cmd
        else:
            full = [sys.executable, "-c", RSS_WRAPPER, *cmd]
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            timed_out = True
        wall = time.perf_counter() - t0
        rss_kb = None
        if use_time:
            text = tf.read().strip().splitlines()
            if text and text[-1].strip().isdigit():
                rss_kb = int(text[-1])
        else:
            for line in err.splitlines():
                if line.startswith("__MAXRSS_KB__"):
                    rss_kb = int(line.split()[1])
            err = "\n".join(ln for ln in err.splitlines() if not ln.startswith("__MAXRSS_KB__"))
    return {"wall_s": wall, "peak_rss_kb": rss_kb, "returncode": proc.returncode, "timed_out": timed_out,
            "stdout_tail": out[-2000:], "stderr_tail": err[-2000:]}


def folder_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def failure_reason(r: dict) -> str:
    for text in (r["stderr_tail"], r["stdout_tail"]):
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        errs = [ln for ln in lines if "Error" in ln or "error" in ln or "Killed" in ln]
        if errs:
            return short_error(errs[-1])
        if lines:
            return short_error(lines[-1])
    if r["returncode"] in (-9, 137):
        return "killed (SIGKILL; out of memory?)"
    return f"exit code {r['returncode']}"


def bench_cost(args) -> list[dict]:
    use_time = gnu_time_ok()
    args.rss_method = "/usr/bin/time -f %M" if use_time else "RUSAGE_CHILDREN ru_maxrss of a small python wrapper"
    log(f"optimize cost: peak RSS via {args.rss_method}")
    results = []
    for target in args.sizes:
        ws = width_for_size(target, args.seed)
        log(f"building the ~{target:g} MB RepVGG-A0 training form (width_scale {ws:.3f}) ...")
        t0 = time.perf_counter()
        model = repvgg_a0(width_scale=ws, seed=args.seed)
        nodes_in = len(model.graph.node)
        with tempfile.TemporaryDirectory(prefix="bench_suite-") as tmp:
            src = os.path.join(tmp, "train.onnx")
            onnx.save(model, src)
            del model
            gc.collect()
            entry = {"target_mb": target, "width_scale": ws, "file_mb": os.path.getsize(src) / 1e6,
                     "nodes_in": nodes_in, "build_s": time.perf_counter() - t0, "tools": {}}
            log(f"  {entry['file_mb']:.1f} MB file, built and saved in {entry['build_s']:.1f} s")
            tools = [t for t in COST_TOOLS if not args.cost_tools or t in args.cost_tools]
            runs: dict[str, list[dict]] = {tool: [] for tool in tools}
            for rep in range(args.cost_repeats):  # round by round, so that drift falls on every tool alike
                for tool in tools:
                    r = run_cost_tool(tool, src, tmp, args, use_time)
                    rss = f"{r['peak_rss_kb'] / 1024:.0f} MB" if r["peak_rss_kb"] else "?"
                    log(f"  [{rep + 1}/{args.cost_repeats}] {tool}: {r['status']}, {r['wall_s']:.1f} s, peak RSS {rss}")
                    runs[tool].append(r)
            for tool, rs in runs.items():
                entry["tools"][tool] = summarize_runs(rs)
            results.append(entry)
    return results


def run_cost_tool(tool: str, src: str, tmp: str, args, use_time: bool) -> dict:
    outdir = os.path.join(tmp, "out")
    os.makedirs(outdir)
    dst = os.path.join(outdir, "out.onnx")
    cmd = [a.replace("{IN}", src).replace("{OUT}", dst) for a in COST_TOOLS[tool]]
    r = run_measured(cmd, args.cost_timeout, use_time)
    r["command"] = shlex.join(["python"] + cmd[1:]).replace(tmp, "$TMP")
    if r["timed_out"]:
        r["status"] = f"timeout (> {args.cost_timeout:g} s)"
    elif r["returncode"] != 0:
        r["status"] = "failed: " + failure_reason(r)
    elif not os.path.exists(dst):
        r["status"] = "failed: no output file written"
    else:
        r["status"] = "ok"
        r["out_mb"] = folder_bytes(outdir) / 1e6
        try:
            r["nodes_out"] = len(onnx.load(dst, load_external_data=False).graph.node)
        except Exception as e:  # noqa: BLE001
            r["nodes_out"] = None
            r["status"] = "ok (output unreadable: " + short_error(e) + ")"
    shutil.rmtree(outdir, ignore_errors=True)
    return r


def summarize_runs(rs: list[dict]) -> dict:
    """One tool's repeated runs: the last run's fields, with the median wall time and peak RSS of the
    successful runs (all runs are kept under ``runs``)."""
    ok = [r for r in rs if r["status"].startswith("ok")]
    out = dict(ok[-1] if ok else rs[-1])
    if ok:
        out["wall_s"] = statistics.median(r["wall_s"] for r in ok)
        rss = [r["peak_rss_kb"] for r in ok if r["peak_rss_kb"]]
        out["peak_rss_kb"] = statistics.median(rss) if rss else None
        out["wall_s_all"] = [r["wall_s"] for r in ok]
        out["peak_rss_kb_all"] = rss
    out["runs"] = len(rs)
    out["failed_runs"] = len(rs) - len(ok)
    return out


def cost_rows(entry: dict) -> list[dict]:
    base = entry["tools"].get("onnx.load + onnx.save", {})
    base_s = base.get("wall_s") if base.get("status") == "ok" else None
    rows = []
    for tool, r in entry["tools"].items():
        ok = r["status"].startswith("ok")
        rows.append({
            "tool": tool,
            "wall": f"{r['wall_s']:.1f}" if ok else r["status"],
            "ratio": f"{r['wall_s'] / base_s:.2f}" if ok and base_s else "-",
            "rss": f"{r['peak_rss_kb'] / 1024:.0f}" if r.get("peak_rss_kb") else "-",
            "rss_ratio": f"{r['peak_rss_kb'] * 1024 / (entry['file_mb'] * 1e6):.2f}" if r.get("peak_rss_kb") else "-",
            "nodes": f"{entry['nodes_in']} -> {r['nodes_out']}" if ok and r.get("nodes_out") is not None else "-",
            "out": fmt_mb(r["out_mb"] * 1e6) if ok and "out_mb" in r else "-",
        })
    return rows


def cost_header(entry: dict, args) -> str:
    reps = getattr(args, "cost_repeats", 1)
    median = f", median of {reps} runs (in turn)" if reps > 1 else ""
    return (f"RepVGG-A0 training form, width scale {entry['width_scale']:.3f}, {entry['file_mb']:.1f} MB file "
            f"(target {entry['target_mb']:g} MB), each tool in a fresh process{median}, limit {args.cost_timeout:g} s")


def print_cost(results: list[dict], args) -> None:
    print()
    print(f"Optimize cost: wall time (process start to exit, imports included) and peak RSS "
          f"({args.rss_method})")
    for entry in results:
        print()
        print(cost_header(entry, args))
        head = f"{'tool':<28}{'wall s':>10}{'/ load+save':>13}{'peak RSS MB':>13}{'/ size':>8}{'nodes':>14}{'out MB':>9}"
        print(head)
        print("-" * len(head))
        for row in cost_rows(entry):
            if row["wall"][:1].isdigit():
                print(f"{row['tool']:<28}{row['wall']:>10}{row['ratio']:>13}{row['rss']:>13}{row['rss_ratio']:>8}"
                      f"{row['nodes']:>14}{row['out']:>9}")
            else:
                print(f"{row['tool']:<28}  {row['wall']}  (peak RSS {row['rss']} MB)")


# --------------------------------------------------------------------------------------------
# output: markdown and plot
# --------------------------------------------------------------------------------------------


def md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def markdown(doc: dict, results: list[dict], cost: list[dict] | None, args) -> str:
    info = doc["machine"]
    v = doc["versions"]
    lines = ["## onnxrep against onnxsim, onnxslim and onnxoptimizer", "",
             f"`{doc['command']}`", "",
             f"- Machine: {info.get('cpu_model') or info.get('machine')}, {info.get('cpu_usable')} usable CPUs, "
             f"{info.get('platform')}; load average {doc.get('loadavg_start')} at start, {doc.get('loadavg_end')} at end.",
             f"- Versions: Python {v['python']}, onnx {v['onnx']}, onnxruntime {v['onnxruntime']}, onnxsim "
             f"{v['onnxsim']}, onnxslim {v['onnxslim']}, onnxoptimizer {v['onnxoptimizer']}, numpy {v['numpy']}, "
             f"onnxrep {v['onnxrep']}.",
             f"- Date: {info.get('date')}; total time {doc['elapsed_s']:.0f} s."]
    loads = [r["loadavg_after"][0] for r in results if r.get("loadavg_after")]
    if loads:
        lines.append(f"- 1-min load average after each family: {', '.join(f'{x:.2f}' for x in loads)} "
                     f"(this benchmark runs {args.threads} threads on {info.get('cpu_usable')} CPUs; values well above "
                     f"{args.threads} mean other work competed for them).")
    lines.append("")
    if results:
        lines += [
            f"Models: `onnxrep.models` builders at {args.resolution}x{args.resolution}, width scale "
            f"{args.width_scale:g}, training form with a symbolic batch dim `N`; variants: `train` (as built), "
            "`onnxsim.simplify(m)[0]`, `onnxslim.slim(m)`, `onnxoptimizer.optimize(m)` (default passes), "
            "`onnxrep.optimize(m)[0]`, and `deploy` (the builders' own fused form, same parameters). Latency: "
            f"onnxruntime {args.provider}, ORT_ENABLE_ALL, {args.threads} intra-op threads, all six variants in "
            "one `onnxrep.bench.interleaved_latency` run per batch size (balanced order). MACs: "
            "`onnxrep.cost.model_cost` at that batch.", ""]
        lines += ["### Latency ratio to deploy (median / median)", "",
                  "| family | batch | " + " | ".join(VARIANTS[:-1]) + " |",
                  "| --- | --- |" + " --- |" * (len(VARIANTS) - 1)]
        for r in results:
            for batch in args.batches:
                ratios = summary_ratios(r, batch)
                lines.append(f"| {r['family']} | {batch} | " + " | ".join(ratios[x] for x in VARIANTS[:-1]) + " |")
        lines.append("")
        for batch in args.batches:
            lines += [f"### Batch {batch}", "", latency_header(args, batch) + ".", "",
                      "| family | variant | median ms | / deploy | nodes | Conv/Gemm/MatMul | MACs | tool s | rel. err vs deploy |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for r in results:
                if r.get("error"):
                    lines.append(f"| {r['family']} | all | failed: {md_escape(r['error'])} | | | | | | |")
                    continue
                for i, row in enumerate(latency_rows(r, batch)):
                    fam = r["family"] if i == 0 else ""
                    ratio = row["ratio"] if not row["ratio"].startswith("failed") else ""
                    lines.append(f"| {fam} | {row['variant']} | {md_escape(row['ms'])} | {ratio} | {row['nodes']} | "
                                 f"{row['cgm']} | {row['macs']} | {row['tool_s']} | {row['rel']} |")
            lines.append("")
        lines += ["'tool s': time the tool took on the training form (onnxrep with its default settings, which "
                  "do not verify); 'rel. err': max\\|variant - deploy\\| / max\\|deploy\\| at batch 1; "
                  "MACs marked * had a shape the counter could not infer.", ""]
    if cost:
        lines += ["### Time and memory to optimize", "",
                  "Each tool runs on the saved file in a fresh process (interpreter start and imports "
                  f"included); peak RSS from {args.rss_method}; time limit {args.cost_timeout:g} s.", ""]
        for entry in cost:
            lines += [cost_header(entry, args) + ":", "",
                      "| tool | wall s | / load+save | peak RSS MB | / file size | nodes | output MB |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for row in cost_rows(entry):
                lines.append(f"| {row['tool']} | {md_escape(row['wall'])} | {row['ratio']} | {row['rss']} | "
                             f"{row['rss_ratio']} | {row['nodes']} | {row['out']} |")
            lines.append("")
        cmds = next(iter(cost))["tools"]
        lines += ["Commands:", ""] + [f"- {t}: `{r['command']}`" for t, r in cmds.items()] + [""]
    return "\n".join(lines)


def plot(results: list[dict], args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [r for r in results if not r.get("error")]
    shown = VARIANTS[:-1]
    n = len(args.batches)
    fig, axes = plt.subplots(n, 1, figsize=(max(8, 1.4 * len(fams) + 2), 4.2 * n), squeeze=False)
    width = 0.8 / len(shown)
    colors = plt.get_cmap("tab10")
    for ax, batch in zip(axes[:, 0], args.batches):
        x = np.arange(len(fams))
        top = 1.0
        for j, v in enumerate(shown):
            vals = []
            for r in fams:
                t = r["latency"].get(str(batch), {}).get("models", {}).get(v)
                ok = t and t.get("ratio_to_deploy") and not r["variants"][v].get("error")
                vals.append(t["ratio_to_deploy"] if ok else np.nan)
            vals = np.array(vals, dtype=float)
            pos = x - 0.4 + width * (j + 0.5)
            ax.bar(pos, np.nan_to_num(vals, nan=0.0), width, label=v, color=colors(j))
            for p, val in zip(pos, vals):
                if np.isnan(val):
                    ax.text(p, 0.05, "failed", rotation=90, ha="center", va="bottom", fontsize=7)
            if np.isfinite(vals).any():
                top = max(top, float(np.nanmax(vals)))
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="deploy = 1")
        ax.set_xticks(x)
        ax.set_xticklabels([r["family"] for r in fams], rotation=20, ha="right")
        ax.set_ylabel("latency / deploy (medians)")
        ax.set_ylim(0, top * 1.15)
        ax.set_title(f"batch {batch}: {args.resolution}x{args.resolution}, {args.provider}, {args.threads} threads, "
                     f"{args.rounds_for(batch)} rounds")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(ncol=6, fontsize=8, loc="upper right")
    fig.suptitle(f"onnxruntime {ort.__version__} latency relative to the hand-built deploy form")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------


def parse_list(text: str, kind=int) -> list:
    return [kind(x) for x in text.replace(" ", "").split(",") if x]


def main(argv=None) -> int:
    avail = families_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=None, metavar="FAMILY",
                   help=f"model families (default: all of {', '.join(avail)})")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,32; quick: 1)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timing rounds (default: 30 at batch 1, max(12, 30 / batch) above; quick: 3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up runs per model (default: 5 at batch <= 4, else 2; quick: 1)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("--ep", default="CPUExecutionProvider",
                   help="execution provider: CPUExecutionProvider (cpu) or CUDAExecutionProvider (cuda)")
    p.add_argument("--resolution", type=int, default=None, help="input resolution (default 224; quick: 64)")
    p.add_argument("--width-scale", type=float, default=None, help="width scale of the families (default 1; quick: 0.25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", default=None, help="optimize-cost model sizes in MB (default 10,100,1000; quick: 10)")
    p.add_argument("--cost-timeout", type=float, default=600.0, help="time limit per tool run in seconds (default 600)")
    p.add_argument("--cost-repeats", type=int, default=1,
                   help="runs of each tool per size, round by round; wall time and peak RSS are medians (default 1)")
    p.add_argument("--cost-tools", nargs="+", default=None, metavar="TOOL",
                   help=f"only these optimize-cost tools (default: all of {', '.join(repr(t) for t in COST_TOOLS)})")
    p.add_argument("--skip-cost", action="store_true", help="only the latency table")
    p.add_argument("--skip-latency", action="store_true", help="only the optimize-cost table")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: resolution 64, width scale 0.25, 3 rounds, batch 1, cost at 10 MB")
    p.add_argument("--json", help="write all results as JSON here")
    p.add_argument("--plot", help="write a PNG bar chart of latency / deploy here")
    p.add_argument("--markdown", help="write the tables as Markdown here")
    args = p.parse_args(argv)

    q = args.quick
    args.provider = PROVIDERS.get(args.ep.lower(), args.ep)
    if args.provider not in PROVIDERS.values():
        p.error(f"--ep must be CPUExecutionProvider or CUDAExecutionProvider, not {args.ep!r}")
    if args.provider not in ort.get_available_providers():
        print(f"error: {args.provider} is not available in this onnxruntime {ort.__version__} "
              f"(available: {', '.join(ort.get_available_providers())})", file=sys.stderr)
        return 2
    args.families = args.families or avail
    bad_tools = [t for t in args.cost_tools or () if t not in COST_TOOLS]
    if bad_tools:
        p.error(f"unknown cost tools {', '.join(bad_tools)} (available: {', '.join(COST_TOOLS)})")
    unknown = [f for f in args.families if f not in BUILDERS]
    if unknown:
        p.error(f"unknown families {', '.join(unknown)} (available: {', '.join(avail)})")
    args.batches = parse_list(args.batches) if args.batches else ([1] if q else [1, 32])
    args.sizes = parse_list(args.sizes, float) if args.sizes else ([10.0] if q else [10.0, 100.0, 1000.0])
    args.resolution = args.resolution or (64 if q else 224)
    args.width_scale = args.width_scale or (0.25 if q else 1.0)
    rounds, warmup = args.rounds, args.warmup
    args.rounds_for = lambda b: rounds if rounds is not None else (3 if q else (30 if b == 1 else max(12, round(30 / b))))
    args.warmup_for = lambda b: warmup if warmup is not None else (1 if q else (5 if b <= 4 else 2))
    args.rss_method = None

    command = "python " + shlex.join(sys.argv if argv is None else [sys.argv[0], *argv])
    info = machine_info()
    vers = versions()
    print(f"machine: {info.get('cpu_model') or info.get('machine')}, {info.get('cpu_usable')} usable of "
          f"{info.get('cpu_count')} CPUs, {info.get('platform')}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v) + f"; {info.get('date')}")
    print(f"command: {command}")
    load_start = load_average()
    if load_start:
        print(f"load average at start: {load_start[0]:.2f} (1 min)")
    t_start = time.perf_counter()

    results: list[dict] = []
    if not args.skip_latency:
        for mod in ("onnxsim", "onnxslim", "onnxoptimizer"):  # so that 'tool s' leaves out the import
            try:
                __import__(mod)
            except Exception as e:  # noqa: BLE001 - the variant then fails with this reason
                log(f"cannot import {mod}: {short_error(e)}")
        log("latency: " + ", ".join(f"batch {b}: {args.warmup_for(b)} warm-up + {args.rounds_for(b)} rounds"
                                    for b in args.batches))
        for name in args.families:
            t0 = time.perf_counter()
            log(f"{name}: build and optimize ...")
            results.append(bench_family(name, args))
            results[-1]["seconds"] = time.perf_counter() - t0
            results[-1]["loadavg_after"] = load_average()
            log(f"{name}: done in {results[-1]['seconds']:.0f} s (total {time.perf_counter() - t_start:.0f} s)")
        print_latency(results, args)
        loads = [r["loadavg_after"][0] for r in results if r.get("loadavg_after")]
        if loads:
            print(f"1-min load average after each family: {', '.join(f'{x:.2f}' for x in loads)} "
                  f"(values well above {args.threads}, the threads this benchmark runs, mean other work competed for the CPUs)")
    t_latency = time.perf_counter() - t_start

    cost = None
    if not args.skip_cost:
        cost = bench_cost(args)
        print_cost(cost, args)

    elapsed = time.perf_counter() - t_start
    load_end = load_average()
    print(f"\ntotal time {elapsed:.0f} s (latency {t_latency:.0f} s, optimize cost {elapsed - t_latency:.0f} s)"
          + (f"; load average at end {load_end[0]:.2f} (1 min)" if load_end else ""))
    settings = {k: v for k, v in vars(args).items() if not callable(v) and k not in ("json", "plot", "markdown")}
    settings["rounds_per_batch"] = {str(b): args.rounds_for(b) for b in args.batches}
    settings["warmup_per_batch"] = {str(b): args.warmup_for(b) for b in args.batches}
    doc = {
        "command": command,
        "argv": sys.argv if argv is None else [sys.argv[0], *argv],
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": info,
        "versions": vers,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "settings": settings,
        "variants": {"train": "as built", "onnxsim": "onnxsim.simplify(model)[0]", "onnxslim": "onnxslim.slim(model)",
                     "onnxoptimizer": "onnxoptimizer.optimize(model)", "onnxrep": "onnxrep.optimize(model)[0]",
                     "deploy": "builder's deploy form"},
        "latency": results,
        "optimize_cost": cost,
        "elapsed_s": elapsed,
        "latency_s": t_latency,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"JSON written to {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(doc, results, cost, args))
        print(f"Markdown written to {args.markdown}")
    if args.plot:
        if results:
            plot(results, args, args.plot)
            print(f"plot written to {args.plot}")
        else:
            print("no latency results: no plot written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
