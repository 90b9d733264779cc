#!/usr/bin/env bash
# The GPU point of the speed issue (issue 4) in one device call: Triton kernels on the GPU against the
# reference loop, the GPU's bandwidth, and the step time of a 1.1B Llama (AdamMini vs fused AdamW).
# Acceptance: AdamMini at most 0.75x fused AdamW, and its "/ bound" at most 1.25x (>= 80 % of the bandwidth).
# The device machine has torch and triton installed; nothing is installed here (PYTHONPATH=src).
#
#   bash benchmarks/gpu_check.sh                          # writes to $OUT (device tool) or runs/gpu-check
#   DEVICE=cpu MODELS=gpt2-20m IMPLS=adamw-fused,adam-mini bash benchmarks/gpu_check.sh   # a dry run on CPU
# (the *-graph implementations replay the step as a CUDA graph: AdamMini(capturable=True), lr on the device)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS:-llama-1b}
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
PY=$(command -v python3 || command -v python)
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  "$PY" -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"; } | tee "$OUT/device.txt"
"$PY" -m pytest tests/kernels/test_triton_step.py -q -p no:cacheprovider 2>&1 | tee "$OUT/triton_tests.txt"
"$PY" benchmarks/bandwidth.py --device "$DEVICE" 2>&1 | tee "$OUT/bandwidth.txt"
"$PY" benchmarks/step_time.py --device "$DEVICE" --models "$MODELS" \
  --impls "${IMPLS:-adamw-foreach,adamw-fused,adamw-fused-graph,adam-mini-foreach,adam-mini,adam-mini-per-segment,adam-mini-graph,adam-mini-bf16,adam-mini-int8}" --rounds 5 \
  --json "$OUT/step_time_$DEVICE.json" 2>&1 | tee "$OUT/step_time.txt"
