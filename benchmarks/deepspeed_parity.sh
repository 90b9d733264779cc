#!/usr/bin/env bash
# Every row of benchmarks/results/deepspeed_parity.txt: AdamMini and torch's AdamW under DeepSpeed ZeRO
# stages 1-3 at world sizes 2-4 (gloo on CPU), each against one process (benchmarks/deepspeed_parity.py).
#
#   bash benchmarks/deepspeed_parity.sh        # writes benchmarks/results/deepspeed_parity.txt
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/deepspeed_parity.txt
ver() { python -c "import $1; print($1.__version__)" 2>/dev/null | tail -1; }
cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
{
  echo "# bash benchmarks/deepspeed_parity.sh; $(nproc) cores (${cpu:-unknown CPU}), torch $(ver torch), deepspeed $(ver deepspeed), gloo; columns: optimizer, stage, world, largest relative difference from one process after 6 steps"
  for world in 2 3 4; do
    for stage in 1 2 3; do
      for which in mini adamw; do
        DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node "$world" \
          --master-port "$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
          benchmarks/deepspeed_parity.py "$stage" "$which" 2>/dev/null | grep '^WORST'
      done
    done
  done
} > "$out.tmp"
mv "$out.tmp" "$out"
cat "$out"
