#!/usr/bin/env bash
# One prepared run on a lent GPU, within one device call of under 10 minutes (each stage bounded by
# `timeout`; what each prints goes to $OUT/session.log, results to $OUT/*.json):
# 1. the invariants on CUDA (tests/test_device.py: no forgetting bit for bit in fp32 and bf16 autocast,
#    mixed-domain batches, export, the service routing images);
# 2. issue 15.7 on the GPU in bf16 (bench_serve.py): batching vs off vs the bare backbone's server at 1, 8
#    and 32 clients over 1 and 4 domains, ResNet-50 at 224 px and the CIFAR ResNet-56, hot-add under load;
# 3. issue 15.8 on the GPU in bf16 (bench_many_domains.py): ResNet-50 at 224 px with 200 domains loaded:
#    device memory, batches of 32 over 1 to 200 domains in process, 32 HTTP clients;
# 4. with the time left, bf16 training and inference throughput (bench_gpu.py, issue 12.6).
# Before it, here: bash benchmarks/gpu_wheels.sh (the wheels the image lacks, and wrk), then a rehearsal
# on the CPU in an environment like the image's (bash benchmarks/gpu_rehearsal.sh), then
# run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-session}"
mkdir -p "$OUT"
LOG="$OUT/session.log"
END=570  # seconds: the stages' budget inside the call's 600
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
LOAD=python  # wrk where the carried binary runs there (its luajit beside it), else asyncio + httpx
if { LD_LIBRARY_PATH="$PWD/.whl/bin" .whl/bin/wrk -v 2>&1 || true; } | grep -q "^wrk "; then  # (-v exits 1)
    export PATH="$PWD/.whl/bin:$PATH" LD_LIBRARY_PATH="$PWD/.whl/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    LOAD=wrk
fi

stage() {  # stage SECONDS COMMAND...: run it for at most SECONDS, its output into the log
    local budget=$1
    shift
    echo "== at ${SECONDS}s, at most ${budget}s: $*" | tee -a "$LOG"
    timeout "$budget" "$@" 2>&1 | tee -a "$LOG"
    echo "== exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}
left() { echo $((END - SECONDS)); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
echo "load generator: $LOAD" | tee -a "$LOG"
if [ -z "${REHEARSAL:-}" ]; then  # the sizes of the GPU run
    DEVICE=cuda
    SERVE=(--models r50,r56 --clients 1,8,32 --window r50=2,r56=2)
    MANY=(--models r50 --r50-px 224 --domains 200 --repeats 3 --window r50=3)
    TRAIN=(--repeats 3)
else  # gpu_rehearsal.sh: the same stages on the CPU, small and short
    DEVICE=cpu
    SERVE=(--models r56 --clients 1,8 --window r56=1)
    MANY=(--models r56 --domains 12 --repeats 1 --window r56=1)
    TRAIN=(--repeats 1 --steps 1 --train-batches 4 --train-size 32 --models resnet26_decathlon --batches 1)
fi
export ADAPTERKIT_TEST_DEVICE="$DEVICE"
stage 120 python3 -m pytest -q -p no:cacheprovider tests/test_device.py
stage 240 python3 benchmarks/bench_serve.py --device "$DEVICE" --mixed-precision bf16 --px r50=224 \
    "${SERVE[@]}" --domains 1,4 --repeats 1 --threads 8 --load "$LOAD" --out "$OUT/serve_gpu.json"
stage "$(left)" python3 benchmarks/bench_many_domains.py --device "$DEVICE" --mixed-precision bf16 --calls 10 \
    "${MANY[@]}" --load "$LOAD" --out "$OUT/many_domains_gpu.json"
if (($(left) > 90)); then
    stage "$(left)" python3 benchmarks/bench_gpu.py --device "$DEVICE" "${TRAIN[@]}" --out "$OUT/gpu.json"
fi
echo "== done at ${SECONDS}s" | tee -a "$LOG"
