#!/usr/bin/env bash
# Blockwise LR on tinyshakespeare: does adam-mini+blr reach AdamW's final held-out loss in
# fewer steps? The exact command behind benchmarks/results/blr_shakespeare/ and the
# "Blockwise LR" table of docs/results.md (llama-tiny, bytes, 300 steps x 16 x 128 tokens, warmup 30, cosine
# to 0.1 x lr, clip 1.0, weight decay 0.1, betas 0.9,0.95, seed 0, fp32, CPU).
# Held-out loss every 10 steps, so "steps to AdamW's final loss" has a 10-step resolution.
# For the +blr optimizers the swept lr is the base (norm) rate: the embedding gets 10x it,
# QK 8x, FFN 6x, VO 4x. AdamW and Adam-mini keep grids around their optimum (4e-3, docs/results.md).
# Losses are deterministic; wall times are not (2 shared CPU cores). ~25-35 min on 2 cores.
#
#   bash benchmarks/blr_shakespeare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/tinyshakespeare.txt}
[ -f "$DATA" ] || DATA=/work/shared/data/tinyshakespeare.txt
OUT=${OUT:-runs/blr-shakespeare}
RES=benchmarks/results/blr_shakespeare

nice -n 10 blockopt bench --data "$DATA" --optimizers adamw,adam-mini,adam-mini+blr,adamw+blr \
  --lrs 'adamw=2e-3,4e-3,8e-3;adam-mini=2e-3,4e-3,8e-3;adam-mini+blr=5e-4,1e-3,2e-3;adamw+blr=5e-4,1e-3,2e-3' \
  --steps 300 --eval-every 10 --no-plots --progress plain --checkpoint-every 0 --out "$OUT" "$@"

mkdir -p "$RES"
cp "$OUT/summary.json" "$OUT/report.md" "$RES/"

# Both +blr optimizers were best at the lowest base lr of the grid above (5e-4): one more base
# lr below it, with AdamW at its best lr (4e-3) again as the reference for "steps to AdamW loss".
OUT2=${OUT2:-runs/blr-shakespeare-low}
nice -n 10 blockopt bench --data "$DATA" --optimizers adamw,adam-mini+blr,adamw+blr \
  --lrs 'adamw=4e-3;adam-mini+blr=2.5e-4;adamw+blr=2.5e-4' \
  --steps 300 --eval-every 10 --no-plots --progress plain --checkpoint-every 0 --out "$OUT2" "$@"
mkdir -p "$RES/low_lr"
cp "$OUT2/summary.json" "$OUT2/report.md" "$RES/low_lr/"
