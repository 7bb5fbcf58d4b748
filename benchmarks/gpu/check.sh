#!/usr/bin/env bash
# embkern GPU check: build with CUDA, run the cuda + triton tests on the GPU,
# time every GPU kernel against its anchor, write benchmarks/results/<device>.md.
#
# For a machine with an NVIDIA GPU and no network whose python3 already has
# torch, triton, numpy, pytest, pybind11, scikit-build-core, cmake, ninja and
# nvcc. Nothing is downloaded: pip runs with --no-index --no-deps
# --no-build-isolation and installs into build/gpu-site (put first on
# PYTHONPATH), so the system site-packages are left alone.
#
#   bash benchmarks/gpu/check.sh            # whole check, < 8 minutes
#   SKIP_BUILD=1 bash benchmarks/gpu/check.sh   # reuse build/gpu-site from a previous run
#
# Environment: PYTHON (default python3), CHECK_BUDGET_S (default 450: the
# whole script), CUDA_ARCHS (default "native": only the GPU present, the
# fastest build), RESULTS_DIR (default benchmarks/results), ONLY (steps to
# run, default "env build import tests timing"; the others are recorded as
# skipped), TESTS_MAX_S (default 180), TEST_WORKERS (default 4, with xdist),
# TIMING_ONLY (timing.py --only: e.g. "relative_attention,bit_cipher").
#
# Budget (450 s): build <= 200 s and leaves >= 200 s; tests <= 180 s and leave
# >= 90 s for the timings; timing.py stops starting new cases 40 s before its
# limit. Typical: build 1-2 min on 16 cores (CUDA_ARCHS=native), tests 1-2 min.
#
# Every step runs under `timeout` with what is left of the budget; a failed
# step is recorded and the script goes on. Exit status: 0 when every step
# passed, 1 otherwise. Timings are reported, never asserted.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
BUDGET="${CHECK_BUDGET_S:-450}"
RESULTS_DIR="${RESULTS_DIR:-$ROOT/benchmarks/results}"
SITE="$ROOT/build/gpu-site"
LOGS="$ROOT/build/gpu-check"
STEPS="$LOGS/steps.tsv"
T0=$(date +%s)
mkdir -p "$LOGS" "$RESULTS_DIR"
: > "$STEPS"
FAILED=0

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# step NAME MAX_SECONDS RESERVE_SECONDS CMD...: run CMD with a timeout of
# min(MAX, time left - RESERVE), log to build/gpu-check/NAME.log, record the outcome.
step() {
  local name="$1" max="$2" reserve="$3"; shift 3
  if [[ " ${ONLY:-env build import tests timing} " != *" $name "* ]]; then
    printf '%s\tskipped\t0\tnot in ONLY\n' "$name" >> "$STEPS"
    echo "== $name: skipped (ONLY)"; return 0
  fi
  # reserves are written for the default 450 s budget; scale them with CHECK_BUDGET_S
  local lim; lim=$(( $(left) - reserve * BUDGET / 450 ))
  (( lim > max )) && lim=$max
  if (( lim < 5 )); then
    printf '%s\tskipped\t0\tno time left in the %ss budget\n' "$name" "$BUDGET" >> "$STEPS"
    echo "== $name: skipped (budget)"; FAILED=1; return 1
  fi
  echo "== $name (limit ${lim}s) -> $LOGS/$name.log"
  local s rc; s=$(date +%s)
  timeout --kill-after=10 "$lim" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  local secs=$(( $(date +%s) - s )) status note
  if (( rc == 0 )); then status=ok; elif (( rc == 124 || rc == 137 )); then status="timeout (${lim}s)"; else status="failed (rc $rc)"; fi
  note="$(grep -E '(passed|failed|error|skipped|deselected).* in [0-9.]+s' "$LOGS/$name.log" | tail -1 | tr -d '=' | sed 's/^ *//;s/ *$//')"
  if [[ -z "$note" && $rc -ne 0 ]]; then
    note="$(grep -v '^\s*$' "$LOGS/$name.log" | tail -1 | cut -c1-160)"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "${note//$'\t'/ }" >> "$STEPS"
  echo "   $status in ${secs}s${note:+: $note}"
  (( rc == 0 )) || { FAILED=1; tail -n 25 "$LOGS/$name.log" | sed 's/^/   | /'; }
  return $rc
}

# nvcc is often installed but not on PATH
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

echo "embkern GPU check in $ROOT (budget ${BUDGET}s)"
step env 30 420 bash -c "nvidia-smi -L; nvcc --version | tail -2; cmake --version | head -1; \
  $PY -c 'import sys, torch, triton; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"gpu\", torch.cuda.get_device_name(0))'"

# 1. Build + install with the CUDA extension required (EMBKERN_CUDA=ON fails loudly without nvcc).
if [[ "${SKIP_BUILD:-0}" != "1" ]]; then
  rm -rf "$SITE"
  step build 200 200 env EMBKERN_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-native}" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PY" -m pip install --no-index --no-deps --no-build-isolation -v \
      --config-settings=build-dir=build/gpu --target "$SITE" .
else
  printf 'build\tskipped\t0\tSKIP_BUILD=1 (reusing %s)\n' "$SITE" >> "$STEPS"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# 2. The installed package sees the GPU through both paths (CUDA extension and torch).
step import 60 180 bash -c "cd /tmp && $PY -m embkern info && $PY -c '
import embkern, embkern._C_cuda as c, torch
n, err = c.device_count()
assert n >= 1, err
assert embkern.__file__.startswith(\"$SITE\"), embkern.__file__
print(\"embkern\", embkern.__file__, \"CUDA devices\", n, c.device_info(0))'"

# 3. GPU tests: Triton compiled for the GPU, not interpreted (TRITON_INTERPRET unset).
# Triton compiles every kernel specialisation on first use (CPU-bound, ~1-3 s
# each): with pytest-xdist installed the tests run in TEST_WORKERS processes.
XDIST=""
if "$PY" -c 'import xdist' >/dev/null 2>&1; then XDIST="-n ${TEST_WORKERS:-4}"; fi
step tests "${TESTS_MAX_S:-180}" 90 env -u TRITON_INTERPRET bash -c \
  "cd tests && $PY -m pytest -c ../pyproject.toml --rootdir=.. . -m 'cuda or triton' -q -p no:cacheprovider -rfEs --tb=short $XDIST"

# 4. Timings (do_bench) -> markdown; the budget left, minus a margin for writing the file.
SLUG="$($PY -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))' 2>/dev/null || echo unknown-gpu)"
OUT_MD="$RESULTS_DIR/$SLUG.md"
TL=$(( $(left) - 15 ))
step timing 300 10 env -u TRITON_INTERPRET "$PY" benchmarks/gpu/timing.py --out "$OUT_MD" --steps "$STEPS" \
  --budget "$(( TL > 60 ? TL - 40 : 20 ))" ${TIMING_ONLY:+--only "$TIMING_ONLY"}

# timing.py writes the report (steps included); if it could not, write the steps alone.
if [[ ! -s "$OUT_MD" ]]; then
  {
    echo "# embkern GPU check: $SLUG"; echo
    echo "timing.py did not write a report; see build/gpu-check/timing.log"; echo
    echo "| step | status | seconds | note |"; echo "|---|---|---|---|"
    awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$STEPS"
  } > "$OUT_MD"
else
  # the timing step finished after timing.py copied the steps table: append its outcome
  tail -n 1 "$STEPS" | awk -F'\t' '{printf "\n_check.sh step %s: %s in %ss_\n", $1, $2, $3}' >> "$OUT_MD"
fi

# failing tests: their names and error lines go into the report itself, so the one file carries them
if [[ -s "$LOGS/tests.log" ]] && grep -qE '^(FAILED|ERROR) ' "$LOGS/tests.log"; then
  {
    echo; echo "## Failing GPU tests (from build/gpu-check/tests.log, --tb=short)"; echo; echo '```'
    grep -E '^(FAILED|ERROR) |^E   |^[^ ]+\.py:[0-9]+: ' "$LOGS/tests.log" | cut -c1-220 | head -n 150
    echo '```'
  } >> "$OUT_MD"
fi

echo
cat "$OUT_MD"
echo
echo "== steps"; column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"
echo "report: $OUT_MD  logs: $LOGS  total $(( $(date +%s) - T0 ))s"
exit $FAILED
