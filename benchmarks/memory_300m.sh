#!/usr/bin/env bash
# The README's memory table: llama-300m (299M parameters), batch 1 x 64 tokens, 3 steps, every setup in
# its own process, on CPU; then AdamW and the leanest setup again with glibc's default heap.
#   bash benchmarks/memory_300m.sh     # ~20 min on 2 cores, ~5 GB of memory for the AdamW process
set -euo pipefail
cd "$(dirname "$0")/.."
RES=benchmarks/results/memory
mkdir -p "$RES"
SETUPS=adamw,adamw-autocast,adamw8bit-bnb,adamw8bit-torchao,adam-mini-official,adam-mini,adam-mini:momentum=int8
SETUPS=$SETUPS,adam-mini:weights=bf16-sr,adam-mini:step_in_backward=true,lean
blockopt memory --model llama-300m --setups "$SETUPS" --json > "$RES/llama-300m.json" || true
blockopt memory --model llama-300m --setups adamw,lean --allocator heap --json > "$RES/llama-300m-heap.json" || true
python benchmarks/memory_table.py "$RES/llama-300m.json"
python benchmarks/memory_table.py "$RES/llama-300m-heap.json"
