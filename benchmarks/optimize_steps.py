#!/usr/bin/env python
"""Time and memory of each step of ``onnxrep optimize --no-verify``, in this process.

Runs the command's steps on MODEL (``io.load``, ``io.tensor_bytes``, ``engine.run``, ``io.check``,
``io.tensor_bytes``, ``io.save``) and prints, after each, its wall time, the process's RSS and the
peak RSS *during that step* (``VmHWM`` from ``/proc/self/status``, reset between steps by writing 5
to ``/proc/self/clear_refs``; Linux only), with user and system CPU time and minor page faults.
``--lazy`` loads with ``io.load(..., lazy=True)``; ``--passes`` shows each pass of ``engine.run``.

    python benchmarks/optimize_steps.py model.onnx out.onnx [--lazy] [--passes]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

T0 = time.perf_counter()


def status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) // 1024
    return out


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Steps:
    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.r = resource.getrusage(resource.RUSAGE_SELF)
        print(f"{'step':32}{'s':>8}{'user s':>8}{'sys s':>8}{'faults':>9}{'RSS MB':>9}{'peak MB':>9}")

    def __call__(self, name: str) -> None:
        t, r, s = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF), status()
        print(f"{name:32}{t - self.t:8.2f}{r.ru_utime - self.r.ru_utime:8.2f}{r.ru_stime - self.r.ru_stime:8.2f}"
              f"{r.ru_minflt - self.r.ru_minflt:9d}{s['VmRSS']:9d}{s['VmHWM']:9d}", flush=True)
        reset_peak()
        self.t, self.r = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("output")
    p.add_argument("--lazy", action="store_true", help="io.load(..., lazy=True)")
    p.add_argument("--passes", action="store_true", help="one line per pass and round of engine.run")
    p.add_argument("--external-data", action="store_true", help="save with external data")
    args = p.parse_args()

    step = Steps()
    from onnxrep import engine, io
    from onnxrep.rewrite import Options

    step("imports (onnxrep)")
    model, external = io.load(args.model, lazy=args.lazy)
    step("io.load" + (" (lazy)" if args.lazy else ""))
    io.tensor_bytes(model)
    step("io.tensor_bytes")
    progress = (lambda rnd, name: step(f"  round {rnd} {name}")) if args.passes else None
    out, _ = engine.run(model, None, (), Options(), progress)
    step("engine.run")
    io.check(out)
    step("io.check")
    io.tensor_bytes(out)
    step("io.tensor_bytes")
    io.save(out, args.output, external=args.external_data or external)
    step("io.save")
    r = resource.getrusage(resource.RUSAGE_SELF)
    print(f"total {time.perf_counter() - T0:.2f} s (since start of the script), user {r.ru_utime:.2f} s, "
          f"sys {r.ru_stime:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
