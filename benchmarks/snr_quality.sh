#!/usr/bin/env bash
# Quality of the SNR plan (issue: blocks from data): AdamW, Adam-mini (official rules), Adam-mini with
# in-run SNR calibration (adam-mini-snr: AdamW's per-element v for the first 20 % of the run, then the
# SNR plan) and adam-mini-snr+blr. Each optimizer gets its own 3-point lr grid, seeds 0, 1, 2; the
# bench protocol (300 steps x 16 x 128 bytes, warmup 30, cosine to 0.1 x lr, clip 1, wd 0.1, betas
# 0.9,0.95, fp32, CPU). Three settings: llama-tiny on the default corpus (the standard library),
# llama-tiny on tinyshakespeare, gpt2-tiny on the default corpus.
# For the +blr optimizer the swept lr is the base (norm) rate (embedding 10x, QK 8x, FFN 6x, VO 4x).
# Losses are deterministic for a given --threads; wall times are not. The two llama settings run side
# by side with one thread each (~45 min on 2 cores), then gpt2-tiny (~40 min, one thread; benchmarks/token_budget.sh can share the cores with it).
#
#   bash benchmarks/snr_quality.sh             # then: python benchmarks/snr_quality_table.py
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/tinyshakespeare.txt}
[ -f "$DATA" ] || DATA=/work/shared/data/tinyshakespeare.txt
OUT=${OUT:-runs/snr-quality}
OPTS=adamw,adam-mini,adam-mini-snr,adam-mini-snr+blr
COMMON=(--optimizers "$OPTS" --seeds 0,1,2 --steps 300 --no-plots --progress plain --checkpoint-every 0
        --threads 1)
STD_LRS='adamw=2e-3,3e-3,4.5e-3;adam-mini=2e-3,3e-3,4.5e-3;adam-mini-snr=2e-3,3e-3,4.5e-3;adam-mini-snr+blr=2.5e-4,5e-4,1e-3'
SHK_LRS='adamw=2e-3,4e-3,8e-3;adam-mini=2e-3,4e-3,8e-3;adam-mini-snr=2e-3,4e-3,8e-3;adam-mini-snr+blr=2.5e-4,5e-4,1e-3'

nice -n 10 blockopt bench "${COMMON[@]}" --lrs "$STD_LRS" --out "$OUT/llama-stdlib" "$@" > "$OUT-llama-stdlib.log" 2>&1 &
nice -n 10 blockopt bench "${COMMON[@]}" --lrs "$SHK_LRS" --data "$DATA" --out "$OUT/llama-shakespeare" "$@" \
  > "$OUT-llama-shakespeare.log" 2>&1 &
wait
nice -n 10 blockopt bench "${COMMON[@]}" --model gpt2-tiny --lrs "$STD_LRS" --out "$OUT/gpt2-stdlib" "$@" \
  > "$OUT-gpt2-stdlib.log" 2>&1
python benchmarks/snr_quality_table.py "$OUT" > benchmarks/results/snr_quality.md
cat benchmarks/results/snr_quality.md
mkdir -p benchmarks/results/snr_quality
for d in llama-stdlib llama-shakespeare gpt2-stdlib; do cp "$OUT/$d/summary.json" "benchmarks/results/snr_quality/$d.summary.json"; done
