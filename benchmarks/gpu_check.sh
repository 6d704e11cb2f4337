#!/usr/bin/env bash
# The GPU check (budgeted at under 11 minutes on one H200; not yet timed on a GPU): the gpu-marked tests (fp32 on CUDA
# gives the CPU's predictions; bf16 vs fp32 agreement printed), then benchmarks/gpu_speed.py (letter
# and option scoring vs lm-eval's way, MFU, LoRA training on the 1B config), then
# benchmarks/serve_batching.py (clinqa serve on the GPU: requests/s with local batching on vs off).
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # writes OUT_DIR/gpu_tests.log, gpu_speed.*, serve_batching.*
#
# Run from the repository root of an installed clinqa (make setup, or pip install -e .) on a CUDA machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check.sh needs CUDA (torch.cuda.is_available() is False)")'
"$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "x", torch.cuda.device_count(), "| torch", torch.__version__)' | tee "$OUT/device.txt"
start=$(date +%s)
timeout 150 "$PY" -m pytest -q -s -m gpu -p no:cacheprovider tests/models/test_device_gpu.py tests/serve/test_batching.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout 330 "$PY" benchmarks/gpu_speed.py --json "$OUT/gpu_speed.json" 2>&1 | tee "$OUT/gpu_speed.log"
timeout 180 "$PY" benchmarks/serve_batching.py --device cuda --clients 16 --max-batch 16 --rounds 2 --duration 10 \
    --json "$OUT/serve_batching.json" 2>&1 | tee "$OUT/serve_batching.log"
echo "gpu_check.sh: done in $(( $(date +%s) - start )) s; results in $OUT/"
