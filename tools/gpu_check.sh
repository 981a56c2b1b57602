#!/usr/bin/env bash
# The GPU check of kcl_ext: one short script for a lent machine with one CUDA GPU (written for an
# H200 with Python 3.12, torch 2.11, triton 3.6 and nvcc 13.0 preinstalled, and no network).
#
#   tools/gpu_check.sh OUT_DIR
#
# Steps, most valuable first; each writes its results into OUT_DIR before the next starts, and
# OUT_DIR/gpu_check.json (GPU, driver, versions, commit, date, every step's status and time, the
# benchmark's headline numbers) is rewritten after every step, so a run cut short still reports:
#   0. environment: GPU, driver, python / torch / triton / CUDA / setuptools / pip versions,
#      printed before anything is built;
#   1. build: the package with the CUDA kernels for sm_90 (FORCE_CUDA=1), in place, with the
#      Python and torch already installed (no downloads); if that fails, the CPU + Triton build,
#      and the report says so;
#   2. tests: the contract suite on the cuda and triton backends and the GPU-only test files,
#      spread over pytest-xdist workers where installed, JUnit XML into OUT_DIR;
#   3. benchmark: `python -m benchmarks.run --device cuda --profile cuda-check` (N=256, Q=65536,
#      D=128, bf16 and fp32, k in {0, 6, -1}: the fused CUDA and Triton kernels, the dense loss
#      users write eager and compiled, inf-cl at k=0; then N=4096; peak memory of each);
#   4. training throughput: `kcl-train throughput` on synthetic images, the ImageNet-LT recipe's
#      ResNet-50 in bf16, batch 256 (images/s and the data-wait fraction).
# Each step has a cap, and the caps are cut to what is left of BUDGET_S (default 480 s) minus a
# reserve for the report. Missing peers (inf-cl, pytorch-metric-learning) are skipped by the
# benchmark with the reason; carry them as wheels (docs/benchmarks.md, "The GPU check").
#
# KCL_GPU_DRY_RUN=1 runs the same steps on a machine without a GPU with tiny stand-ins: the
# existing CPU build, two Triton interpreter tests, the smoke benchmark profile on the CPU, a
# two-step throughput run of the small ResNet. CI runs it (tests/test_gpu_check.py) so that the
# script cannot rot between GPU loans.
set -uo pipefail

OUT=${1:?usage: tools/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
DRY=${KCL_GPU_DRY_RUN:-0}
BUDGET_S=${BUDGET_S:-480}
RESERVE_S=20
START=$SECONDS
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: >"$OUT/steps.jsonl"

report() {
  "$PY" "$ROOT/tools/gpu_report.py" "$OUT" --total-seconds $((SECONDS - START)) >/dev/null ||
    echo "(the report could not be written)"
}

# run NAME CAP_S CMD...: runs CMD with a limit of min(CAP_S, what is left of the budget minus the
# reserve), logs to OUT/NAME.log, appends its status to OUT/steps.jsonl, rewrites the report.
run() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START) - RESERVE_S))
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    echo "[$name] skipped: out of time"
    printf '{"step": "%s", "status": "skipped: out of time", "seconds": 0}\n' "$name" \
      >>"$OUT/steps.jsonl"
    LAST_STATUS=skipped
    report
    return 0
  fi
  echo "[$name] (limit ${limit}s) $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local status="failed (exit $rc)"
  ((rc == 0)) && status=passed
  ((rc == 124 || rc == 137)) && status="timed out after ${limit}s"
  LAST_STATUS=$status
  echo "[$name] $status in $((SECONDS - t0))s; last lines of $OUT/$name.log:"
  tail -n 5 "$OUT/$name.log" | sed 's/^/    /'
  printf '{"step": "%s", "status": "%s", "seconds": %d}\n' "$name" "$status" \
    $((SECONDS - t0)) >>"$OUT/steps.jsonl"
  report
}

# --- 0. environment ---------------------------------------------------------------------------
{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
} >"$OUT/environment.log" 2>&1
"$PY" "$ROOT/tools/gpu_report.py" "$OUT" --environment >>"$OUT/environment.log" 2>&1
cat "$OUT/environment.log"
report

# --- 1. build ---------------------------------------------------------------------------------
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
build_with_pip() {  # in place (editable), against the torch installed here, no downloads
  "$PY" -m pip install --no-build-isolation --no-deps -e . ||
    "$PY" setup.py build_ext --inplace    # an environment without pip
}
if [[ $DRY == 1 ]]; then
  run build 120 "$PY" -c "import kcl_ext; print('dry run: the existing build', \
kcl_ext._library.LIBRARY_PATH)"
else
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  run build 200 bash -c "$(declare -f build_with_pip); build_with_pip"
  if [[ $LAST_STATUS != passed ]]; then
    echo "[build] the CUDA build failed: building CPU + Triton only (the cuda backend is skipped)"
    echo '{"fallback": "CUDA build failed; CPU + Triton build"}' >"$OUT/build_fallback.json"
    export FORCE_CUDA=0
    run build_cpu_triton 120 bash -c "$(declare -f build_with_pip); build_with_pip"
  fi
fi

# --- 2. tests ---------------------------------------------------------------------------------
PARALLEL=()
if [[ $DRY != 1 ]] && "$PY" -c "import xdist" >/dev/null 2>&1; then
  PARALLEL=(-n 8)   # most of the time is Triton compiling kernels, one at a time per process
fi
if [[ $DRY == 1 ]]; then
  run tests 120 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" \
    tests/test_contract.py -k "triton and (k0_is_moco or module_matches)"
else
  run tests 150 "$PY" -m pytest -q -p no:cacheprovider ${PARALLEL[@]+"${PARALLEL[@]}"} \
    --junitxml="$OUT/tests.xml" tests/test_contract.py tests/test_cuda.py tests/test_triton.py \
    tests/test_triton_gpu.py -k "cuda or triton or gpu"
fi

# --- 3. benchmark -----------------------------------------------------------------------------
if [[ $DRY == 1 ]]; then
  run benchmark 150 "$PY" -m benchmarks.run --device cpu --profile smoke --no-memory \
    --out "$OUT" -k "fused_cpu or dense"
else
  run benchmark 170 "$PY" -m benchmarks.run --device cuda --profile cuda-check --out "$OUT"
fi

# --- 4. training throughput -------------------------------------------------------------------
if [[ $DRY == 1 ]]; then
  run throughput 60 "$PY" -m kcl_ext.train throughput --config configs/fmnist_lt_kcl.yaml \
    --synthetic --device cpu --batch-size 16 --steps 2 --warmup 1 --num-workers 0 \
    --json "$OUT/throughput.json"
else
  # ResNet-50, bf16, global batch 256, split-BN in 8 groups, queue 65536 (the recipe's config)
  run throughput 90 "$PY" -m kcl_ext.train throughput --config configs/imagenet_lt_kcl_r50.yaml \
    --synthetic --device cuda --amp bf16 --batch-size 256 --steps 40 --warmup 10 \
    --num-workers "$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))" --json "$OUT/throughput.json"
fi

report
echo "results: $OUT/gpu_check.json (total $((SECONDS - START))s)"
