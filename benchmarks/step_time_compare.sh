#!/usr/bin/env bash
# Step time of two versions of blockopt, alternating, each with its own fused-AdamW baseline
# measured in the same invocation: a refactor shows no slowdown when the ratios agree within the
# noise of the rounds. REF (a commit) is checked out in a temporary git worktree.
#
#   REF=26b93f6 bash benchmarks/step_time_compare.sh > benchmarks/results/step_time_compare.txt
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${REF:?set REF to the commit to compare with}
ROUNDS=${ROUNDS:-2}
ARGS=${ARGS:-"--models gpt2-20m,gpt2-160m --impls adamw-fused,adam-mini-foreach,adam-mini --rounds 5"}
WT=$(mktemp -d)/ref
git worktree add -q "$WT" "$REF"
trap 'git worktree remove --force "$WT"' EXIT
echo "# $(python -c 'import torch, platform; print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads")'), nproc $(nproc); ARGS: $ARGS"
for i in $(seq "$ROUNDS"); do
  echo "== $REF, round $i"
  (cd "$WT" && PYTHONPATH="$WT/src" python benchmarks/step_time.py $ARGS | grep -E "^gpt|^  [a-z]")
  echo "== $(git rev-parse --short HEAD) (working tree), round $i"
  python benchmarks/step_time.py $ARGS | grep -E "^gpt|^  [a-z]"
done
