#!/usr/bin/env bash
# Does MoFO forget less than full fine-tuning at the same fine-tuning quality? llama-tiny pre-trained on
# the default corpus (A) with AdamW, then fine-tuned 150 steps on tinyshakespeare (B) by AdamW and by MoFO
# (10 % of entries per step) at five peak lrs each; 3 seeds, each with its own pre-training. The held-out
# loss on A is compared where both reach the same held-out loss on B (benchmarks/finetune_forgetting.py).
# One thread, ~30 min.
#   bash benchmarks/mofo_matched.sh     # -> benchmarks/results/mofo_matched.json, the table on stdout
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 python benchmarks/finetune_forgetting.py --optimizers adamw,mofo --sweep 1e-4,3e-4,1e-3,3e-3,1e-2 \
  --seeds 0,1,2 --out benchmarks/results/mofo_matched.json "$@"
