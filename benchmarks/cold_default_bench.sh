#!/usr/bin/env bash
# README's main command as a new user runs it: a fresh virtual environment, README's install, no built
# kernel (~/.cache/torch_extensions/*/blockopt_* removed), no token cache, then `blockopt bench` with no
# arguments. Prints the bench's console table and the wall time of the bench command alone (the
# install is timed apart). Deletes the built kernel: the next run rebuilds it.
#
#   bash benchmarks/cold_default_bench.sh            # ~5-6 min on 2 cores, with a warm pip cache
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/blockopt-cold.XXXXXX")
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
t0=$(date +%s)
pip install -q torch==2.13.0 && pip install -q -e "$root[bench]"
t1=$(date +%s)
rm -rf ~/.cache/torch_extensions/*/blockopt_*
cd "$work"  # a fresh out folder and token cache
/usr/bin/time -f "blockopt bench: %e s wall" blockopt bench --progress plain --out "$work/out" --cache-dir "$work/cache"
echo "install: $((t1 - t0)) s"
python -c "import torch; print('torch', torch.__version__)"
grep -m1 "kernel" "$work/out/report.md" || true
