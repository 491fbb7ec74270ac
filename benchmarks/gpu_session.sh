#!/usr/bin/env bash
# One prepared run on a lent GPU (issues 12.6 and 15), within one device call of under 10 minutes:
# 1. the invariants on CUDA (tests/test_device.py: no forgetting bit for bit in fp32 and bf16 autocast,
#    mixed-domain batches, export, the service routing images);
# 2. bf16 training throughput vs the bare backbone's forward+backward, and inference (bench_gpu.py).
# Needs the wheels of benchmarks/gpu_wheels.sh carried as .whl; results and the log go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-session}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$OUT/test_device.log"
timeout 300 python3 benchmarks/bench_gpu.py --repeats 5 --out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
