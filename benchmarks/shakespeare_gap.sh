#!/usr/bin/env bash
# Where does the AdamW / Adam-mini gap on tinyshakespeare come from?
# The exact commands behind benchmarks/results/shakespeare_gap.md (llama-tiny, byte
# tokenizer unless said, 300 steps x 16 x 128 tokens = 614,400 tokens per run, warmup 30,
# cosine to 0.1 x lr, clip 1.0, weight decay 0.1, betas 0.9,0.95, seed 0, fp32, CPU).
# Losses are deterministic; wall times are not (2 shared CPU cores).
#
#   bash benchmarks/shakespeare_gap.sh            # all factors, ~40-60 min on 2 CPU cores
#   python benchmarks/shakespeare_gap_table.py runs/sg/A_lr   # table of one factor
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/tinyshakespeare.txt}
[ -f "$DATA" ] || DATA=/work/shared/data/tinyshakespeare.txt
COMMON=(--data "$DATA" --steps 300 --no-plots --progress plain --checkpoint-every 0)
RES=benchmarks/results/shakespeare_gap
mkdir -p runs/sg "$RES"

# A. the tinyshakespeare comparison: AdamW vs Adam-mini, an LR sweep each (the lr rows of its table in docs/results.md)
blockopt bench --data "$DATA" --optimizers adamw,adam-mini --lrs 1e-3,2e-3,4e-3,8e-3 --steps 300 \
  --no-plots --progress plain --checkpoint-every 0 --out runs/sg/A_lr

# B. partition of the embedding and of the value projection (Adam-mini variants only;
#    compare with A's AdamW and Adam-mini rows at the same LRs). The variant syntax has no
#    `overrides`, so the embedding variants come from a wrapper that registers them
#    in-process (hence --isolate none; --threads 1 because it ran beside A).
python benchmarks/shakespeare_variants.py bench "${COMMON[@]}" \
  --optimizers adam-mini-embelem,adam-mini:value_single_block=true,adam-mini-embtensor \
  --lrs 2e-3,4e-3 --isolate none --threads 1 --out runs/sg/B_blocks

# C. beta2 0.99 and 0.999 for both (0.95 is A), at lr 4e-3 for both
blockopt bench "${COMMON[@]}" \
  --optimizers adamw:beta2=0.99,adam-mini:beta2=0.99,adamw:beta2=0.999,adam-mini:beta2=0.999 \
  --lrs 'adamw=4e-3;adam-mini=4e-3' --out runs/sg/C_beta2

# D. BPE (4096 tokens, trained on the corpus and cached) instead of bytes, lr 4e-3 for both
blockopt bench "${COMMON[@]}" --tokenizer bpe --optimizers adamw,adam-mini \
  --lrs 'adamw=4e-3;adam-mini=4e-3' --out runs/sg/D_bpe

# E. more partition variants: both changes together; the one-block embedding at 1e-3 and 3e-3
python benchmarks/shakespeare_variants.py bench "${COMMON[@]}" \
  --optimizers adam-mini-embelem:value_single_block=true,adam-mini-embtensor \
  --lrs 'adam-mini-embelem=4e-3;adam-mini-embtensor=1e-3,3e-3' --isolate none --out runs/sg/E_blocks2

# F. run length: 600 steps (2x the tokens), lr 4e-3 for both
blockopt bench --data "$DATA" --optimizers adamw,adam-mini --lrs 'adamw=4e-3;adam-mini=4e-3' --steps 600 \
  --no-plots --progress plain --checkpoint-every 0 --out runs/sg/F_600

# G. warmup 90 steps (30%) instead of 30, lr 4e-3 for both
blockopt bench "${COMMON[@]}" --warmup 90 --optimizers adamw,adam-mini \
  --lrs 'adamw=4e-3;adam-mini=4e-3' --out runs/sg/G_warmup90

for d in runs/sg/*/; do
  n=$(basename "$d")
  [ -f "$d/summary.json" ] && cp "$d/summary.json" "$RES/$n.json"
  python benchmarks/shakespeare_gap_table.py "$d"
done
