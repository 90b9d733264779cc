#!/usr/bin/env bash
# What each memory piece of issue 20 costs in quality, and the leanest setup against AdamW fp32:
# llama-tiny, default corpus, 1,200 steps, 3 seeds, each setup with its own 3-point lr sweep, winners by
# final held-out loss (the bench's rule). Setups:
#   L1 adamw                   AdamW, fp32 weights (the reference)
#   L2 default                 AdamMini(model), fp32 weights and momentum
#   L3 int8                    + int8 momentum alone
#   L4 sr                      + bf16 weights with stochastic rounding alone
#   L5 backward                + step in backward alone (clipping by the previous step's norm)
#   L6 lean                    int8 momentum + bf16-sr weights + step in backward
#   L7 remainder               + bf16 weights with an int8 remainder alone
# Two lanes, one thread each (~6 min a run, 9 runs a part):
#   bash benchmarks/lean_quality.sh            # -> runs/lq/*, benchmarks/results/lean_quality/
#   bash benchmarks/lean_quality.sh L6 L1      # some parts (an interrupted part resumes)
#   SEEDS=0,1 SUFFIX=_a bash benchmarks/lean_quality.sh L7   # a part's seeds split over lanes (the table
#   SEEDS=2 SUFFIX=_b bash benchmarks/lean_quality.sh L7      # reads every summary of a part together)
#   python benchmarks/lean_quality_table.py benchmarks/results/lean_quality
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/lq}
RES=benchmarks/results/lean_quality
mkdir -p "$OUT" "$RES"
LRS="2e-3,3e-3,4.5e-3"
SEEDS=${SEEDS:-0,1,2}
SUFFIX=${SUFFIX:-}
COMMON=(--steps 1200 --seeds "$SEEDS" --threads 1 --no-plots --progress plain --checkpoint-every 100 --lrs "$LRS")
part() {
  local name=$1$SUFFIX; shift
  local resume=(); [ -d "$OUT/$name" ] && resume=(--resume)
  blockopt bench "${COMMON[@]}" "${resume[@]}" --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  cp "$OUT/$name/summary.json" "$RES/$name.summary.json"
}
D=adam-mini-default
L1() { part L1_adamw --optimizers adamw; }
L2() { part L2_default --optimizers $D; }
L3() { part L3_int8 --optimizers $D:momentum_dtype=int8; }
L4() { part L4_sr --optimizers $D:weights=bf16-sr; }
L5() { part L5_backward --optimizers $D:step_in_backward=true; }
L6() { part L6_lean --optimizers $D:momentum_dtype=int8:weights=bf16-sr:step_in_backward=true; }
L7() { part L7_remainder --optimizers $D:weights=bf16+int8; }
if [ $# -gt 0 ]; then for p in "$@"; do "$p"; done; exit 0; fi
export -f part L1 L2 L3 L4 L5 L6 L7; export OUT RES LRS D; export COMMON_STR="${COMMON[*]}"
printf '%s\n' L6 L1 L4 L3 L5 L2 L7 | xargs -P 2 -I{} bash -c 'COMMON=($COMMON_STR); {}'
python benchmarks/lean_quality_table.py "$RES"
