#!/usr/bin/env python
"""Run every property test of the suite with many more random cases than CI does.

The property tests (hypothesis) build random graphs of linear blocks - branch sums with kernels,
pads, strides, groups, dilations, BN/Mul/Sub mixes; affine chains; conv chains; constant
subgraphs; linear sums - and check that the optimized graph computes what the original computes in
onnxruntime, or that each skip names its condition. CI runs a few hundred cases; this runs
``--scale`` times as many (default 25: about 10,000 cases) and prints the count.

    python benchmarks/fuzz.py [--scale 70] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROPERTY_TESTS = "random or sum_of_placed"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=25.0, help="multiplier of each test's CI example count")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    args = p.parse_args(argv)
    env = dict(os.environ, ONNXREP_FUZZ_SCALE=str(args.scale))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", PROPERTY_TESTS,
           "--hypothesis-show-statistics", "tests"]
    if args.seed is not None:
        cmd.append(f"--hypothesis-seed={args.seed}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    print(proc.stdout[-4000:])
    cases = sum(int(n) for n in re.findall(r"- (\d+) passing examples", proc.stdout))
    print(f"fuzz: {cases} passing generated cases in {elapsed:.0f} s (scale {args.scale:g}), exit {proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
