#!/usr/bin/env bash
# Stability: llama-tiny on the default corpus, 300 steps, a learning-rate grid from 1/4x to 4x of
# AdamW's best (3e-3), seeds 0 and 1, with the bench's warmup (30 steps) and with it halved (15).
# AdamW, Adam-mini with the official rules, and a candidate default (the built-in SNR table within a
# 0.55x state budget). Two benches side by side, one thread each (~35 min on 2 cores); then the plot:
#
#   bash benchmarks/stability_grid.sh            # -> docs/stability.png, benchmarks/results/stability/
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/stability}
OPTS=adamw,adam-mini,adam-mini:rules=builtin:state_budget=0.55
COMMON=(--optimizers "$OPTS" --lrs 7.5e-4,1.5e-3,3e-3,6e-3,1.2e-2 --seeds 0,1 --steps 300 --threads 1
        --no-plots --progress plain --checkpoint-every 0)
blockopt bench "${COMMON[@]}" --warmup 30 --out "$OUT/warmup30" "$@" > "$OUT-warmup30.log" 2>&1 &
blockopt bench "${COMMON[@]}" --warmup 15 --out "$OUT/warmup15" "$@" > "$OUT-warmup15.log" 2>&1 &
wait
mkdir -p benchmarks/results/stability
for w in warmup30 warmup15; do cp "$OUT/$w/summary.json" "benchmarks/results/stability/$w.summary.json"; done
python benchmarks/stability_plot.py benchmarks/results/stability --out docs/stability.png
