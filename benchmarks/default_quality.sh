#!/usr/bin/env bash
# The quality of AdamMini's default (the built-in SNR table within a 0.55x state budget) and of the
# in-budget calibration (adam-mini-snr) against AdamW: 3 seeds, each optimizer with its own 3-point lr
# sweep, winners by final held-out loss (the bench's rule), peak state recorded by the bench.
#
#   A. llama-tiny, default corpus, 300 steps: adamw, adam-mini-default, adam-mini-default:rules=blocks
#      (the default without factored matrices), adam-mini-snr (in-budget window)
#   B. llama-tiny, tinyshakespeare, 300 steps: adamw, adam-mini-default, adam-mini-default:rules=blocks
#   C. gpt2-tiny, default corpus, 300 steps: adamw, adam-mini-default, adam-mini-default:rules=blocks
#   D. llama-tiny, default corpus, 1,200 steps, lr 3e-3: adamw, adam-mini-default, adam-mini-default:rules=blocks
#
# Two lanes side by side, one thread each (~1.5-2 h on 2 cores):
#   bash benchmarks/default_quality.sh                 # -> runs/dq/*, benchmarks/results/default_quality/
#   bash benchmarks/default_quality.sh A               # one part
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/tinyshakespeare.txt}
[ -f "$DATA" ] || DATA=/work/shared/data/tinyshakespeare.txt
OUT=${OUT:-runs/dq}
RES=benchmarks/results/default_quality
mkdir -p "$OUT" "$RES"
LRS="2e-3,3e-3,4.5e-3"
COMMON=(--seeds 0,1,2 --threads 1 --no-plots --progress plain --checkpoint-every 0)
part() {
  local name=$1; shift
  local resume=(); [ -d "$OUT/$name" ] && resume=(--resume)
  blockopt bench "${COMMON[@]}" "${resume[@]}" --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  cp "$OUT/$name/summary.json" "$RES/$name.summary.json"
}
BLOCKS=adam-mini-default:rules=blocks
A1() { part A1_llama_default --optimizers adamw,$BLOCKS --lrs "$LRS"; }
A2() { part A2_llama_default_snr --optimizers adam-mini-snr --lrs "$LRS"; }
A3() { part A3_llama_default_factored --optimizers adam-mini-default --lrs "$LRS"; }
B() { part B_llama_shakespeare --data "$DATA" --optimizers adamw,$BLOCKS --lrs "$LRS"; }
B2() { part B2_llama_shakespeare_factored --data "$DATA" --optimizers adam-mini-default --lrs "$LRS"; }
C() { part C_gpt2_default --model gpt2-tiny --optimizers adamw,$BLOCKS --lrs "$LRS"; }
C2() { part C2_gpt2_default_factored --model gpt2-tiny --optimizers adam-mini-default --lrs "$LRS"; }
D1() { part D1_llama_1200_adamw --steps 1200 --optimizers adamw --lrs 3e-3; }
D2() { part D2_llama_1200_blocks --steps 1200 --optimizers $BLOCKS --lrs 3e-3; }
D3() { part D3_llama_1200_default --steps 1200 --optimizers adam-mini-default --lrs 3e-3; }
if [ $# -gt 0 ]; then for p in "$@"; do "$p"; done; exit 0; fi
export -f part A1 A2 A3 B B2 C C2 D1 D2 D3; export OUT RES DATA LRS BLOCKS; export COMMON_STR="${COMMON[*]}"
# two lanes, longest parts first
printf '%s\n' B A1 C D1 D2 A2 D3 A3 B2 C2 | xargs -P 2 -I{} bash -c 'COMMON=($COMMON_STR); {}'
python benchmarks/default_quality_table.py "$RES"
