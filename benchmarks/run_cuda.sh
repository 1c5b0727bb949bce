#!/usr/bin/env bash
# Runs the benchmark suite with onnxruntime's CUDA provider on a GPU machine that has no package
# registry. Before: onnxruntime-gpu installed under /var/tmp/ortsite (../shared/gpu/ort-gpu-parts.sh
# prepares it, with the onnx-graphsurgeon wheel), and, for the comparison columns, wheels of
# onnxsim, onnxslim and onnxoptimizer for the machine's Python in .whl/ (pip download
# --only-binary=:all: --python-version 3.12 ...). Results go to $OUT (or bench-out/).
# Usage: bash benchmarks/run_cuda.sh [bench_suite.py options, e.g. --families repvgg-a0]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
repo=$PWD
site=/tmp/onnxrep-site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" .
export PYTHONPATH="/var/tmp/ortsite:$site:${PYTHONPATH:-}"
python3 -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 'no CUDA provider: install onnxruntime-gpu first')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
cd /tmp  # import the installed onnxrep, not the source tree
python3 "$repo/benchmarks/bench_suite.py" --ep cuda --skip-cost \
  --json "$out/suite_cuda.json" --plot "$out/suite_cuda.png" --markdown "$out/suite_cuda.md" "$@"
