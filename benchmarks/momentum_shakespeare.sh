#!/usr/bin/env bash
# Low-precision momentum on tinyshakespeare: AdamMini with fp32, bf16 (stochastic rounding) and
# int8 first moments, at the lr where fp32 Adam-mini is best in the tinyshakespeare sweeps of docs/results.md (4e-3), seeds
# 0 to 4 (one seed cannot separate a 1 % difference from trajectory noise).
# llama-tiny, bytes, 300 steps x 16 x 128 tokens, warmup 30, cosine, clip 1.0, wd 0.1.
# The exact command behind benchmarks/results/momentum_shakespeare/ and its table in docs/results.md.
#
#   bash benchmarks/momentum_shakespeare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/tinyshakespeare.txt}
[ -f "$DATA" ] || DATA=/work/shared/data/tinyshakespeare.txt
OUT=${OUT:-runs/momentum-shakespeare}
RES=benchmarks/results/momentum_shakespeare
blockopt bench --data "$DATA" \
  --optimizers adam-mini,adam-mini:momentum_dtype=bf16,adam-mini:momentum_dtype=int8 \
  --lrs 4e-3 --seeds 0,1,2,3,4 --steps 300 --no-plots --progress plain --checkpoint-every 0 --out "$OUT" "$@"
mkdir -p "$RES"
cp "$OUT/summary.json" "$OUT/report.md" "$RES/"
