#!/usr/bin/env bash
# The one prepared script for a GPU machine: environment, GPU tests, kernel timings, the
# end-to-end anchors, the plot.  Every step has its own time limit and a failing step is
# logged and skipped, never fatal, so the whole script ends in about 8 minutes with whatever
# it measured.  Run from anywhere:
#
#     DPKERNELS_GIT_SHA=$(git rev-parse --short=12 HEAD) bash bench/gpu_check.sh
#
# Results go to $OUT (default bench/results/gpu-check/), at most 8 files:
#   env.txt  gpu-tests.txt  kernels.log  e2e.log  summary.txt
#   <date>-<gpu>.csv  <date>-<gpu>-kernels.csv  <date>-<gpu>.png
# The two CSVs are copies of bench/results/ on that machine (rows from the checkout plus
# this run's); copy them back into bench/results/.  No network is needed: dpkernels runs
# from the checkout (PYTHONPATH), Opacus is installed from bench/wheels/*.whl when present
# (its Opacus modes are skipped otherwise).  Step limits can be changed through the
# variables below, e.g. E2E_S=300 bash bench/gpu_check.sh (E2E_CASES=cpu-small for a dry
# run of the script itself on a CPU).

set -u
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/bench/results/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
ENV_S=${ENV_S:-60}
GPU_TESTS_S=${GPU_TESTS_S:-80}
TRITON_TESTS_S=${TRITON_TESTS_S:-80}
KERNELS_S=${KERNELS_S:-90}
E2E_S=${E2E_S:-240}
PLOT_S=${PLOT_S:-30}
E2E_CASES=${E2E_CASES:-anchors}
# dpkernels_lowmem runs last (after Opacus), so the time budget cuts it first
E2E_MODES=${E2E_MODES:-nonprivate,dpkernels,opacus_hooks,opacus_ghost,dpkernels_lowmem}

unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
# Autotuning results kept on disk, so the one-process-per-case e2e runs tune once.
export TRITON_CACHE_AUTOTUNING=1
START=$(date +%s)
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

# step NAME LIMIT_S LOGFILE CMD...: run CMD with a time limit, output appended to LOGFILE,
# one line per step in summary.txt.  Never exits the script.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local t0 rc
    t0=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    local msg="ok"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then msg="TIMED OUT"; elif [ "$rc" != 0 ]; then msg="FAILED"; fi
    echo "$name: $msg (rc=$rc, $(( $(date +%s) - t0 ))s; log $(basename "$log"))" | tee -a "$SUMMARY"
    echo "=== $name: rc=$rc" >>"$log"
}

# --- environment, Opacus ---------------------------------------------------------------
ENVF=$OUT/env.txt
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: ${DPKERNELS_GIT_SHA:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi 2>&1
    echo
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")' 2>&1
    "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
} >"$ENVF"
shopt -s nullglob
wheels=("$REPO"/bench/wheels/opacus-*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    step "install opacus" "$ENV_S" "$ENVF" "$PY" -m pip install -q --no-index --no-deps \
        --no-compile --no-cache-dir --target /tmp/bench-site "${wheels[@]}"
    export PYTHONPATH=$PYTHONPATH:/tmp/bench-site
else
    echo "no bench/wheels/opacus-*.whl: Opacus modes will be skipped" | tee -a "$ENVF" "$SUMMARY"
fi
"$PY" -c 'import opacus; print("opacus", opacus.__version__)' >>"$ENVF" 2>&1
"$PY" -c 'import matplotlib; print("matplotlib", matplotlib.__version__)' >>"$ENVF" 2>&1
# csrc/ (secure noise) compiled in place with its CUDA kernel, for the GPU test of
# tests/test_secure.py and the secure_noise rows of kernels.py
BUILD_S=${BUILD_S:-180}
step "build csrc" "$BUILD_S" "$ENVF" env DPKERNELS_BUILD_CUDA=1 MAX_JOBS=8 "$PY" setup.py \
    build_ext --inplace
step "dpkernels.info" "$ENV_S" "$ENVF" "$PY" -m dpkernels.info

# --- tests -------------------------------------------------------------------------------
TESTS=$OUT/gpu-tests.txt
: >"$TESTS"
step "pytest -m gpu" "$GPU_TESTS_S" "$TESTS" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
triton_tests=(tests/test_triton_*.py)
if [ ${#triton_tests[@]} -gt 0 ]; then
    step "pytest triton on cuda" "$TRITON_TESTS_S" "$TESTS" "$PY" -m pytest -q \
        -p no:cacheprovider "${triton_tests[@]}"
fi

# --- benchmarks --------------------------------------------------------------------------
MARK=$(mktemp)
step "kernels.py" "$KERNELS_S" "$OUT/kernels.log" "$PY" bench/kernels.py \
    --time-budget $(( KERNELS_S - 25 ))
# Each (case, mode) in its own process, killed after 60 s; no new one once the budget
# is spent, so the last one (<= 60 s) still ends inside the step's limit and the table prints.
step "e2e.py $E2E_CASES" "$E2E_S" "$OUT/e2e.log" "$PY" bench/e2e.py --cases "$E2E_CASES" \
    --modes "$E2E_MODES" \
    --log "$OUT/e2e.log" --case-timeout 60 --time-budget $(( E2E_S - 70 ))
for f in $(find bench/results -maxdepth 1 -name '*.csv' -newer "$MARK"); do
    cp "$f" "$OUT/"
done
e2e_csv=$(find bench/results -maxdepth 1 -name '*.csv' ! -name '*-kernels.csv' -newer "$MARK" | head -n 1)
if [ -n "$e2e_csv" ]; then
    step "plot.py" "$PLOT_S" "$OUT/e2e.log" "$PY" bench/plot.py "$e2e_csv" \
        --out "$OUT/$(basename "${e2e_csv%.csv}").png"
else
    echo "plot.py: no e2e CSV written, nothing to plot" | tee -a "$SUMMARY"
fi
rm -f "$MARK"

echo "total: $(( $(date +%s) - START ))s" | tee -a "$SUMMARY"
# the reply shows the end of the output: the summary and the e2e table
tail -n 45 "$OUT/e2e.log" | grep -v '^=== ' || true
cat "$SUMMARY"
exit 0
