#!/usr/bin/env bash
# Does Blockwise LR reach AdamW's final held-out loss in fewer steps (the sharpness-disparity paper
# claims about 2x)? llama-tiny, default corpus, 3 seeds, each optimizer with its own 3-point lr sweep,
# two budgets. Held-out loss every steps/10 (the bench's default), so steps-to-target has a 10 %
# resolution. For the +blr optimizers the swept lr is the base (norm) rate: embedding 10x, QK 8x,
# FFN 6x, VO 4x.
#   S300   adamw, adamw+blr, adam-mini-default, adam-mini-default+blr at 300 steps, in two sweeps
#          (S300a: the AdamW pair, S300b: the AdamMini pair; two lanes: S300a in one, S300b in another)
#   S1200  adamw+blr (S1200a) and adam-mini-default+blr (S1200b) at 1,200 steps, one lane each; AdamW
#          and the default at 1,200 steps are lean_quality.sh's L1 and L2 sweeps (same protocol), run here
#          if absent
#   S1200c adam-mini-default+blr at 1,200 steps and base lr 1.25e-4: S1200b's best lr was its grid's
#          lowest, so the grid goes one point further down (the table reads the four points as one sweep)
#   S600   adamw+blr (S600a, lr 5e-4 and 1e-3) and adam-mini-default+blr (S600b, 2.5e-4 and 5e-4) at
#          600 steps: does Blockwise LR reach in half the steps what AdamW reaches at 1,200 (the 2x claim,
#          run against run)? Two lrs each: the 1,200-step best and the next one up. S600c and S600d:
#          AdamW at 600 steps (its 3-point grid), the same budget without BLR; S600e: one lr higher
#          (6.75e-3), as its best fell on the grid's top
# One lane per part (one thread each):
#   bash benchmarks/blr_speedup.sh S300 S1200        # one lane: -> runs/blr/*, benchmarks/results/blr_speedup/
#   bash benchmarks/blr_speedup.sh S300a S1200a & bash benchmarks/blr_speedup.sh S300b S1200b   # two lanes
#   python benchmarks/blr_speedup_table.py           # the table of docs/findings.md
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/blr}
LQ=${LQ:-runs/lq}
RES=benchmarks/results/blr_speedup
mkdir -p "$OUT" "$RES"
declare -A LR=([adamw]=2e-3,3e-3,4.5e-3 [adam-mini-default]=2e-3,3e-3,4.5e-3 [adamw+blr]=2.5e-4,5e-4,1e-3
               [adam-mini-default+blr]=2.5e-4,5e-4,1e-3)
COMMON=(--seeds 0,1,2 --threads "${THREADS:-1}" --no-plots --progress plain)
sweep() {  # name steps optimizers (each with its lr grid above)
  local name=$1 steps=$2 opts=$3 lrs="" o
  for o in ${opts//,/ }; do lrs+="${lrs:+;}$o=${LR[$o]}"; done
  local resume=(); [ -d "$OUT/$name" ] && resume=(--resume)
  blockopt bench "${COMMON[@]}" "${resume[@]}" --lrs "$lrs" --steps "$steps" --checkpoint-every $((steps / 12)) \
    --optimizers "$opts" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
}
S300a() { sweep S300_a 300 adamw,adamw+blr; }                       # two halves: one lane each
S300b() { sweep S300_b 300 adam-mini-default,adam-mini-default+blr; }
S300() { S300a; S300b; }
S1200a() {
  sweep S1200_a 1200 adamw+blr
  [ -f "$LQ/L1_adamw/summary.json" ] || OUT=$LQ sweep L1_adamw 1200 adamw
}
S1200b() {
  sweep S1200_b 1200 adam-mini-default+blr
  [ -f "$LQ/L2_default/summary.json" ] || OUT=$LQ sweep L2_default 1200 adam-mini-default
}
S1200c() { lr_sweep S1200_c 1200 adam-mini-default+blr 1.25e-4; }
S1200() { S1200a; S1200b; S1200c; }
lr_sweep() {  # name steps optimizer lrs: one sweep with its own lr grid
  local keep=${LR[$3]}
  LR[$3]=$4
  sweep "$1" "$2" "$3"
  LR[$3]=$keep
}
S600a() { lr_sweep S600_a 600 adamw+blr 5e-4,1e-3; }
S600b() { lr_sweep S600_b 600 adam-mini-default+blr 2.5e-4,5e-4; }
S600c() { lr_sweep S600_c 600 adamw 2e-3,3e-3; }  # AdamW at 600 steps, its usual grid in two lanes
S600d() { lr_sweep S600_d 600 adamw 4.5e-3; }
S600e() { lr_sweep S600_e 600 adamw 6.75e-3; }  # AdamW's best 600-step lr was its grid's top: one more
S600() { S600a; S600b; S600c; S600d; S600e; }
for p in "${@:-S300}"; do "$p"; done
python benchmarks/blr_speedup_table.py --write
