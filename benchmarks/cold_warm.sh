#!/usr/bin/env bash
# Cold vs warm kernel cache: Adam-mini alone, twice (a fresh --cache-dir and no built kernel, then the same
# again warm). Prints tokens/s, optimizer step and forward+backward ms, and the kernel build time (outside
# the clock). Deletes ~/.cache/torch_extensions (the kernel is rebuilt). ~6 min on 2 cores.
#
#   bash benchmarks/cold_warm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
for i in 1 2; do
  rm -rf ~/.cache/torch_extensions /tmp/cw-cache-$i runs/cw-cold-$i runs/cw-warm-$i
  blockopt bench --optimizers adam-mini --out runs/cw-cold-$i --cache-dir /tmp/cw-cache-$i --progress none --no-plots > runs/cw-cold-$i.log 2>&1
  blockopt bench --optimizers adam-mini --out runs/cw-warm-$i --cache-dir /tmp/cw-cache-$i --progress none --no-plots > runs/cw-warm-$i.log 2>&1
done
for d in cw-cold-1 cw-warm-1 cw-cold-2 cw-warm-2; do
  python -c "
import json; r=json.load(open('runs/$d/summary.json'))['runs'][0]
print('$d', round(r['tokens_per_s']), 'step', round(r['step_ms'],2), 'fwdbwd', round(r['fwd_bwd_ms'],1), 'kernel_load_s', r['kernel_load_s'])"
done
