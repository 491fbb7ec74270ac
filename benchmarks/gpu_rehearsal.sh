#!/usr/bin/env bash
# A rehearsal of gpu_session.sh here, before a GPU session spends its 15 minutes: the same script and
# stages on the CPU (REHEARSAL=1: small sizes), in a virtual environment like the lent H200's image
# (Python 3.12, torch 2.11 with torchvision 0.26, huggingface_hub 1.33 and accelerate 1.15, as the device
# tool's KINDS.md lists them), with the carried wheels installed as the session installs them. Its first
# run found three failures the GPU run would have met: the serving benchmarks' servers lost the wheels'
# PYTHONPATH, and bench_gpu.py still unpacked bench_training's old tuples.
#   bash benchmarks/gpu_wheels.sh && bash benchmarks/gpu_rehearsal.sh   # ~6 min the first time, 3 after
set -euo pipefail
cd "$(dirname "$0")/.."
for candidate in "${PY312:-}" python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do  # the image's Python
    if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        PY312=$candidate
        break
    fi
done
[ -n "${PY312:-}" ] || { echo "no Python 3.12 found (the image's): set PY312=/path/to/python3.12" >&2; exit 1; }
VENV="${REHEARSAL_VENV:-/tmp/adapterkit-gpu-rehearsal}"
if [ ! -x "$VENV/bin/python3" ]; then
    "$PY312" -m venv "$VENV"
    "$VENV/bin/python3" -m pip install -q torch==2.11.0 torchvision==0.26.0 huggingface_hub==1.33.0 \
        accelerate==1.15.0 safetensors==0.8.0 "numpy<2.6" pillow pyyaml tqdm typer rich anyio httpx hf-xet \
        prometheus-client pytest h11 click jinja2 psutil pandas pyarrow xxhash fsspec filelock peft
fi
OUT="${OUT:-/tmp/gpu-rehearsal}"
rm -rf "$OUT"
PATH="$VENV/bin:$PATH" OUT="$OUT" REHEARSAL=1 bash benchmarks/gpu_session.sh
if grep -q "^== exit [1-9]" "$OUT/session.log"; then
    echo "a stage failed: see $OUT/session.log" >&2
    exit 1
fi
