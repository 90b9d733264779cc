#!/usr/bin/env bash
# Declared versions are tested versions (issue 13): the floors of pyproject.toml (torch>= in the
# dependencies, triton>= in the [gpu] extra), each installed in a venv of its own, against the tests.
#  * triton: a venv per version (over the system's torch), then tests/kernels/test_triton_step.py in
#    the Triton interpreter (TRITON_INTERPRET=1, CPU tensors).
#  * torch: PyPI's Linux wheels of torch are CUDA builds (torch 2.6.0: 767 MB, plus several GB of
#    nvidia-* wheels), so the torch floor is installed only from where TORCH_PIP_ARGS says (a CPU
#    wheel index or a folder of wheels); without it the torch floor is reported NOT TESTED, never passed.
#    With it: torch floor + triton floor in one venv, then TORCH_TESTS.
#
#   bash benchmarks/check_floors.sh                                  # the triton floor (a few minutes)
#   TRITON_VERSIONS="3.2.0 3.5.1 3.6.0" bash benchmarks/check_floors.sh   # any list of versions
#   TORCH_PIP_ARGS="--index-url <a CPU wheel index>" bash benchmarks/check_floors.sh
#   TORCH_FLOOR=2.13.0 TORCH_PIP_ARGS="--find-links /opt/wheels" ...  # a dry run of the torch branch
#
# Venvs live in $VENVS (default /tmp/blockopt-floors) and are reused; --system-site-packages, so only
# the version under test is installed in each (the rest, pytest included, comes from the system).
# The summary goes to $RESULTS (default benchmarks/results/floors.txt). Exit status: 1 if a check failed,
# else 3 if one was NOT TESTED, else 0.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$(command -v python3 || command -v python)
VENVS=${VENVS:-/tmp/blockopt-floors}
RESULTS=${RESULTS:-benchmarks/results/floors.txt}
TORCH_TESTS=${TORCH_TESTS:-"tests/kernels tests/optim/test_adam_mini.py"}
floor() {  # the version after NAME>= in pyproject.toml, as pip's NAME==X.Y (= X.Y.0)
  "$PY" - "$1" <<'EOF'
import re, sys, tomllib
proj = tomllib.load(open("pyproject.toml", "rb"))["project"]
specs = proj["dependencies"] + [s for extra in proj["optional-dependencies"].values() for s in extra]
found = {m.group(1) for s in specs if (m := re.fullmatch(re.escape(sys.argv[1]) + r"\s*>=\s*([0-9.]+)", s.strip()))}
assert len(found) == 1, f"{sys.argv[1]}: floors {found} in pyproject.toml"
print(found.pop())
EOF
}
TRITON_FLOOR=${TRITON_FLOOR:-$(floor triton)} || exit 2
TORCH_FLOOR=${TORCH_FLOOR:-$(floor torch)} || exit 2
TRITON_VERSIONS=${TRITON_VERSIONS:-$TRITON_FLOOR}
mkdir -p "$VENVS" "$(dirname "$RESULTS")"
LOG=$(mktemp)
T0=$SECONDS
FAILED=0
UNTESTED=0
summary=()

venv() {  # venv() DIR: create (reused when there)
  [ -x "$1/bin/python" ] || "$PY" -m venv --system-site-packages "$1"
}
versions() {  # what a venv actually imports
  "$1/bin/python" -c "import sys, numpy, torch
try:
    import triton; t = triton.__version__
except ImportError:
    t = 'none'
print(f'torch {torch.__version__}, triton {t}, numpy {numpy.__version__}, python {sys.version.split()[0]}')"
}
run_tests() {  # run_tests LABEL VENV TESTS...: pytest in the venv, this checkout's src first
  local label=$1 venv=$2; shift 2
  local t=$SECONDS out
  out=$(cd "$ROOT" && PYTHONPATH="$ROOT/src" TRITON_INTERPRET=1 "$venv/bin/python" -m pytest -q -p no:randomly \
        -p no:cacheprovider "$@" 2>&1)
  local rc=$?
  printf '%s\n' "$out" >>"$LOG"
  local last
  last=$(printf '%s\n' "$out" | grep -E '(passed|failed|error|no tests ran)' | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  summary+=("$label [$(versions "$venv")]: ${last:-no result (rc $rc)} ($((SECONDS - t)) s)")
  [ "$rc" -eq 0 ] && return
  FAILED=1
  while IFS= read -r line; do summary+=("    $line"); done < <(printf '%s\n' "$out" | grep -E '^(FAILED|ERROR) ')
}

for v in $TRITON_VERSIONS; do
  dir=$VENVS/triton-$v
  echo "== triton $v ($dir)" | tee -a "$LOG"
  venv "$dir"
  if ! "$dir/bin/pip" install -q --disable-pip-version-check "triton==$v" >>"$LOG" 2>&1; then
    summary+=("triton $v: INSTALL FAILED (see the log)"); FAILED=1; continue
  fi
  got=$("$dir/bin/python" -c "import triton; print(triton.__version__)")
  if [ "$got" != "$v" ] && [ "$got" != "$v.0" ]; then
    summary+=("triton $v: the venv imports triton $got"); FAILED=1; continue
  fi
  run_tests "triton $v" "$dir" tests/kernels/test_triton_step.py
done

echo "== torch $TORCH_FLOOR" | tee -a "$LOG"
if [ -z "${TORCH_PIP_ARGS:-}" ]; then
  summary+=("torch $TORCH_FLOOR: NOT TESTED (PyPI has only the CUDA build; set TORCH_PIP_ARGS to a CPU wheel index or folder)")
  UNTESTED=1
else
  dir=$VENVS/torch-$TORCH_FLOOR
  venv "$dir"
  # shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of pip options
  if "$dir/bin/pip" install -q --disable-pip-version-check $TORCH_PIP_ARGS "torch==$TORCH_FLOOR" >>"$LOG" 2>&1 \
     && "$dir/bin/pip" install -q --disable-pip-version-check "triton==$TRITON_FLOOR" >>"$LOG" 2>&1; then
    # shellcheck disable=SC2086
    run_tests "torch $TORCH_FLOOR + triton $TRITON_FLOOR" "$dir" $TORCH_TESTS
  else
    summary+=("torch $TORCH_FLOOR: INSTALL FAILED (see the log)"); FAILED=1
  fi
fi

{
  echo "# benchmarks/check_floors.sh, $(date -u +%Y-%m-%dT%H:%MZ), $(uname -m), $(nproc) cores"
  echo "# declared floors (pyproject.toml): torch>=$(floor torch), triton>=$(floor triton)"
  printf '%s\n' "${summary[@]}"
  echo "# total $((SECONDS - T0)) s; full pytest output: $LOG"
} | tee "$RESULTS"
[ "$FAILED" -eq 0 ] || exit 1
[ "$UNTESTED" -eq 0 ] || exit 3
