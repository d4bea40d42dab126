#!/usr/bin/env bash
# The one command the GPU machine runs (bench/README.md): install the carried wheels (wheels/gpu, downloaded here
# with bench/gpu_fetch_wheels.sh), then run bench/gpu_bench.py, its JSON lines into $OUT/results.jsonl and its
# output into $OUT/log. Extra arguments go to gpu_bench.py (e.g. --steps a,b,c --budget-s 400).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-bench-out}"
mkdir -p "$OUT"
if ! ls wheels/gpu/*.whl >/dev/null 2>&1; then
    echo "gpu_run.sh: no wheels in wheels/gpu: run bench/gpu_fetch_wheels.sh here and carry wheels/gpu" >&2
    exit 3
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pydeps \
    wheels/gpu/*.whl || exit 4
export PYTHONPATH="/tmp/pydeps:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/log"
python3 -m bench.gpu_bench --out "$OUT/results.jsonl" "$@" 2>&1 | tee -a "$OUT/log"
