#!/usr/bin/env python
"""Optimize a training-time model of several GB saved with external data, in a fresh process.

1. Build. A child process builds the RepVGG-A0 training form (``onnxrep.models``) at the width
   scale whose file is about ``--size-gb`` GB (quadratic fit of the serialized size at small
   widths, as the cost table of ``bench_suite.py`` does), and saves it with external data
   (``train.onnx`` + ``train.onnx.data``); with ``--check deploy`` also the builder's own fused
   deploy form of the same parameters. (The builders run ``onnx.checker.check_model``, which cannot
   serialize a model above 2 GB: there it checks ``onnxrep.io.skeleton(model)`` instead.)
2. Measure. Each command runs in its own process under ``/usr/bin/time -f %M`` (peak RSS; a small
   Python wrapper reporting ``RUSAGE_CHILDREN`` when there is no GNU time), ``--repeats`` times in
   turn; median wall time and peak RSS are reported, with their ratios to the time of
   ``onnx.load`` + ``onnx.save_model`` (external data) of the same model and to the size of the
   weights:

   ``onnx.load + onnx.save``   the baseline
   ``onnxrep optimize``        ``python -m onnxrep.cli optimize train.onnx -o out/out.onnx --no-verify -q``
   ``lazy load + optimize``    the same steps as the command (``io.load``, ``engine.run``, ``io.check``,
                               ``io.save``), with ``io.load(..., lazy=True)``: what ``optimize
                               --no-verify`` costs when it loads the weights lazily

3. Check. The output of ``onnxrep optimize`` is run in onnxruntime (CPU, each model in a process of
   its own) on one random batch-1 input together with the training form (and the deploy form with
   ``--check deploy``); the largest difference relative to the largest output magnitude must be
   below 1e-5.

    python benchmarks/large_model.py                       # about 3 GB, 2 repeats
    python benchmarks/large_model.py --size-gb 0.2 --repeats 1 --keep /tmp/large
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BUILD = r"""
import sys, onnx
from onnxrep import io
from onnxrep.models import BUILDERS
# the builders check the whole model, which protobuf cannot serialize above 2 GB: check its skeleton
_check = onnx.checker.check_model
onnx.checker.check_model = lambda model, *a, **k: _check(io.skeleton(model), *a, **k)
family, form, ws, res, path = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
model = BUILDERS[family](deploy=form == "deploy", width_scale=ws, resolution=res, seed=0)
onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                location=path.rsplit("/", 1)[-1] + ".data", size_threshold=1024)
"""

RUN = r"""
import sys, numpy as np, onnxruntime as ort
opts = ort.SessionOptions()
opts.intra_op_num_threads = 2
sess = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
inp = sess.get_inputs()[0]
shape = [d if isinstance(d, int) else 1 for d in inp.shape]
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
np.save(sys.argv[2], sess.run(None, {inp.name: x})[0])
"""

LAZY = r"""
import sys
from onnxrep import engine, io
model, external = io.load(sys.argv[1], lazy=True)
out, report = engine.run(model)
io.check(out)
io.save(out, sys.argv[2], external=True)
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def commands(src: str, dst: str) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "onnx.load + onnx.save": [py, "-c", "import sys, onnx; onnx.save_model(onnx.load(sys.argv[1]), sys.argv[2], "
                                  "save_as_external_data=True, location='out.onnx.data')", src, dst],
        "onnxrep optimize": [py, "-m", "onnxrep.cli", "optimize", src, "-o", dst, "--no-verify", "-q"],
        "lazy load + optimize": [py, "-c", LAZY, src, dst],
    }


def weights_bytes(path: str) -> int:
    return os.path.getsize(path + ".data")


def run_model(path: str, out_npy: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", RUN, path, out_npy], check=True)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    from bench_parallel import load_average, machine_info, width_for_size
    from bench_suite import gnu_time_ok, run_measured

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=3.0, help="target model size in GB (default 3)")
    p.add_argument("--family", default="repvgg-a0", help="onnxrep.models builder (default repvgg-a0)")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--repeats", type=int, default=2, help="runs of each command, in turn (default 2)")
    p.add_argument("--commands", default=None, help="comma-separated subset of the commands to run")
    p.add_argument("--check", choices=["train", "deploy", "none"], default="train",
                   help="compare the output with the training form (default), also with the deploy form, or not at all")
    p.add_argument("--keep", help="build in (and keep) this folder instead of a temporary one")
    p.add_argument("--timeout", type=float, default=1800.0, help="time limit per command in seconds")
    p.add_argument("--json", help="write the results as JSON here")
    args = p.parse_args(argv)

    info = machine_info()
    command = "python " + shlex.join(sys.argv if argv is None else [sys.argv[0], *argv])
    print(f"machine: {info['cpu_model']}, {info['cpu_usable']} usable of {info['cpu_count']} CPUs, {info['platform']}")
    print(f"versions: python {info['python']}, onnx {info['onnx']}, onnxruntime {info['onnxruntime']}, "
          f"numpy {info['numpy']}, onnxrep {info['onnxrep']}; {info['date']}")
    print(f"command: {command}")
    if args.family != "repvgg-a0":
        p.error("only repvgg-a0 has a size fit; pass --family repvgg-a0")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="large_model-"))
    work.mkdir(parents=True, exist_ok=True)
    use_time = gnu_time_ok()
    results: dict = {"command": command, "machine": info, "loadavg_start": load_average(), "runs": {}}
    try:
        ws = width_for_size(args.size_gb * 1000, 0)
        src = str(work / "train.onnx")
        forms = ["train"] + (["deploy"] if args.check == "deploy" else [])
        for form in forms:
            path = str(work / f"{form}.onnx")
            if os.path.exists(path) and os.path.exists(path + ".data"):
                log(f"{form}: reusing {path}")
                continue
            log(f"building the {form} form at width scale {ws:.3f} ...")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", BUILD, args.family, form, str(ws), str(args.resolution), path], check=True)
            log(f"  built and saved in {time.perf_counter() - t0:.0f} s")
        size = weights_bytes(src)
        results.update(width_scale=ws, weights_bytes=size, model_file_bytes=os.path.getsize(src))
        print(f"model: {args.family} training form, width scale {ws:.3f}, {os.path.getsize(src) / 1e6:.1f} MB graph "
              f"+ {size / 1e9:.3f} GB external data")
        outdir = work / "out"
        dst = str(outdir / "out.onnx")
        cmds = commands(src, dst)
        chosen = [c.strip() for c in args.commands.split(",")] if args.commands else list(cmds)
        runs = {name: [] for name in chosen}
        for i in range(args.repeats):
            for name in chosen:
                shutil.rmtree(outdir, ignore_errors=True)
                outdir.mkdir()
                r = run_measured(cmds[name], args.timeout, use_time)
                r["command"] = shlex.join(["python"] + cmds[name][1:]).replace(str(work), "$WORK")
                r["out_bytes"] = sum(f.stat().st_size for f in outdir.iterdir())
                runs[name].append(r)
                rss = r["peak_rss_kb"] * 1024 if r["peak_rss_kb"] else None
                log(f"  [{i + 1}/{args.repeats}] {name}: exit {r['returncode']}, {r['wall_s']:.1f} s, "
                    f"peak RSS {rss / 1e9 if rss else float('nan'):.2f} GB")
                if r["returncode"] != 0:
                    log(r["stderr_tail"])
                if name == "onnxrep optimize" and i == args.repeats - 1 and r["returncode"] == 0:
                    keep = work / "optimized"
                    shutil.rmtree(keep, ignore_errors=True)
                    outdir.rename(keep)
        results["runs"] = runs
        base = statistics.median(r["wall_s"] for r in runs["onnx.load + onnx.save"]) if "onnx.load + onnx.save" in runs else None
        print()
        print("| command | wall s (median) | / load+save | peak RSS GB (median) | / weights | output GB |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, rs in runs.items():
            ok = [r for r in rs if r["returncode"] == 0]
            if not ok:
                print(f"| {name} | failed | - | - | - | - |")
                continue
            wall = statistics.median(r["wall_s"] for r in ok)
            rss = statistics.median(r["peak_rss_kb"] for r in ok) * 1024
            ratio = f"{wall / base:.2f}" if base else "-"
            print(f"| {name} | {wall:.1f} | {ratio} | {rss / 1e9:.2f} | {rss / size:.2f} | {ok[-1]['out_bytes'] / 1e9:.3f} |")
        print()
        for name in runs:
            print(f"- {name}: `{runs[name][0]['command']}`")
        if args.check != "none" and (work / "optimized" / "out.onnx").exists():
            print()
            ref = str(work / "train_out.npy")
            got = str(work / "optimized_out.npy")
            t_train = run_model(src, ref)
            t_opt = run_model(str(work / "optimized" / "out.onnx"), got)
            import numpy as np

            a, b = np.load(ref), np.load(got)
            err = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30))
            results["check"] = {"rel_error_vs_train": err, "train_s": t_train, "optimized_s": t_opt}
            print(f"check: batch-1 output of the optimized model vs the training form in onnxruntime: "
                  f"max rel. error {err:.1e} ({'ok' if err < 1e-5 else 'MISMATCH'}); "
                  f"onnxruntime load + run {t_train:.0f} s and {t_opt:.0f} s")
            if args.check == "deploy":
                dep = str(work / "deploy_out.npy")
                run_model(str(work / "deploy.onnx"), dep)
                c = np.load(dep)
                err_d = float(np.max(np.abs(c - b)) / max(float(np.max(np.abs(c))), 1e-30))
                results["check"]["rel_error_vs_deploy"] = err_d
                print(f"check: vs the builder's deploy form: max rel. error {err_d:.1e}")
            if err >= 1e-5:
                return 1
        results["loadavg_end"] = load_average()
        results["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
            print(f"JSON written to {args.json}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
