#!/usr/bin/env bash
# Stability: llama-tiny on the default corpus, 300 steps, a learning-rate grid from 1/4x to 4x of
# AdamW's best (3e-3), seeds 0 and 1, with the bench's warmup (30 steps) and with it halved (15).
# AdamW, Adam-mini with the official rules, AdamMini's default without factoring (rules=blocks), then
# the default itself in its own benches. Two benches side by side, one thread each (~35 min on 2 cores
# for the first three, ~15 min for the default); then the plot:
#
#   bash benchmarks/stability_grid.sh            # -> docs/stability.png, benchmarks/results/stability/
#   bash benchmarks/stability_grid.sh default    # only the default's benches, then the plot
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/stability}
COMMON=(--lrs 7.5e-4,1.5e-3,3e-3,6e-3,1.2e-2 --seeds 0,1 --steps 300 --threads 1
        --no-plots --progress plain --checkpoint-every 0)
mkdir -p benchmarks/results/stability "$OUT"
grid() {  # grid NAME OPTIMIZERS: one bench per warmup, side by side
  for w in 30 15; do
    blockopt bench "${COMMON[@]}" --optimizers "$2" --warmup $w --out "$OUT/warmup$w$1" > "$OUT-warmup$w$1.log" 2>&1 &
  done
  wait
  for w in 30 15; do cp "$OUT/warmup$w$1/summary.json" "benchmarks/results/stability/warmup$w$1.summary.json"; done
}
[ "${1:-}" = default ] || grid "" adamw,adam-mini,adam-mini-default:rules=blocks
grid -default adam-mini-default
python benchmarks/stability_plot.py benchmarks/results/stability --out docs/stability.png
