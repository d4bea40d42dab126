#!/usr/bin/env bash
# Here (not on the GPU machine): download the wheels bench/gpu_bench.py needs there, for CPython 3.12 manylinux
# x86-64, into wheels/gpu (ignored by git; the device tool carries it). Prints their total size: it must stay well
# under the 64 MiB that may travel (about 12 MiB with bench/gpu_wheels.txt as it is).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
rm -rf wheels/gpu
"$PYTHON" -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --no-deps -d wheels/gpu -r bench/gpu_wheels.txt
du -cb wheels/gpu/*.whl | tail -1 | awk '{printf "wheels/gpu: %.1f MiB\n", $1 / 1048576}'
