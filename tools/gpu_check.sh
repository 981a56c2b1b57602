#!/usr/bin/env bash
# The GPU check of kcl_ext: one short script for a lent machine with one CUDA GPU (written for an
# H100 / H200 with Python 3.12, torch 2.11, triton 3.6 and nvcc preinstalled, and no network).
#
#   tools/gpu_check.sh OUT_DIR
#
# Steps, most valuable first (docs/benchmarks.md, "The GPU check"):
#   environment  GPU, driver and package versions; carried wheels (.whl/*.whl) installed offline;
#                the packages the tests import checked (a missing one stops the run here, loudly)
#   build        the package with the CUDA kernels for sm_90, in place; on failure CPU + Triton
#   warmup       every Triton kernel specialisation the tests meet compiled once, in one process,
#                into the TRITON_CACHE_DIR that the parallel test workers share
#   contract     the contract suite on the cuda and triton backends (pytest-xdist)
#   headline     the benchmark's headline points (N=256, Q=65536, D=128, bf16, forward+backward,
#                k = 6 and 0: the fused kernels, the dense loss eager and compiled, inf-cl)
#   tests_rest   tests/test_cuda.py, tests/test_triton.py, tests/test_triton_gpu.py
#   bench_rest   the other points of the cuda-check profile
#   throughput   references/kcl/throughput.py: synthetic-image throughput, ResNet-50, bf16
#
# What a cut keeps: each step runs under `timeout -s INT` with a kill grace (pytest and
# pytest-benchmark write partial reports on SIGINT); every test result and every benchmark point
# is appended to a JSON-lines file the moment it is known; tests have a per-test timeout. After
# EVERY step all that the run produced is packed into OUT_DIR as two files, gpu_check.json (the
# summary) and gpu_check.tar.gz (logs and raw results): the machine hands back at most 8.
# Caps are cut to what is left of BUDGET_S (default 480 s) minus a reserve for the packing.
#
# KCL_GPU_DRY_RUN=1 runs the same steps on a machine without a GPU with small stand-ins (the
# existing CPU build, the Triton interpreter, the smoke benchmark profile on the CPU, a two-step
# throughput run of the small ResNet). KCL_GPU_CHECK_STALL=all|STEP[,STEP...] (the CPU rehearsal,
# tests/test_gpu_check.py) makes those steps hang after their first result until their cap,
# KCL_GPU_CHECK_STALL_CAP seconds, interrupts them.
set -uo pipefail

OUT=${1:?usage: tools/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
DRY=${KCL_GPU_DRY_RUN:-0}
BUDGET_S=${BUDGET_S:-480}
RESERVE_S=15          # the last packing
GRACE_S=${KCL_GPU_KILL_GRACE_S:-15}   # after SIGINT, time to write partial reports before SIGKILL
STALL=${KCL_GPU_CHECK_STALL:-}
STALL_CAP=${KCL_GPU_CHECK_STALL_CAP:-60}
START=$SECONDS
# Everything the run writes lives in WORK and is packed from there; the caches stay apart.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kcl_gpu_check.XXXXXX")
CACHE=$(mktemp -d "${TMPDIR:-/tmp}/kcl_gpu_cache.XXXXXX")
trap 'rm -rf "$WORK" "$CACHE"' EXIT    # all of WORK is in OUT/gpu_check.tar.gz by then
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT:$ROOT/tools${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR=$CACHE/triton TORCHINDUCTOR_CACHE_DIR=$CACHE/inductor
: >"$WORK/steps.jsonl"

say() { echo "$*" | tee -a "$WORK/console.log"; }

PACKS=0
pack() {  # pack [STEP]; KCL_GPU_CHECK_SNAPSHOTS=DIR (the rehearsal) keeps a copy of each packing
  "$PY" "$ROOT/tools/gpu_report.py" "$WORK" --out "$OUT" --total-seconds $((SECONDS - START)) \
    >>"$WORK/console.log" 2>&1 || say "(the report could not be written: see console.log)"
  PACKS=$((PACKS + 1))
  if [[ -n ${KCL_GPU_CHECK_SNAPSHOTS:-} ]]; then
    mkdir -p "$KCL_GPU_CHECK_SNAPSHOTS" &&
      cp -r "$OUT" "$KCL_GPU_CHECK_SNAPSHOTS/$(printf %02d $PACKS)-${1:-end}"
  fi
}

stalled() { [[ ",$STALL," == *",$1,"* || $STALL == all ]]; }
# The rehearsal's stand-in for a step that is not pytest: the command, then a hang until the cap.
STALL_WRAP=$CACHE/stall_after.sh
printf '%s\n' '#!/usr/bin/env bash' '"$@"; rc=$?' \
  '[[ -n ${KCL_GPU_CHECK_STALL_AFTER:-} ]] && "$KCL_GPU_CHECK_PYTHON" -m gpu_check_pytest stall' \
  'exit $rc' >"$STALL_WRAP"
chmod +x "$STALL_WRAP"
export KCL_GPU_CHECK_PYTHON=$PY

# run NAME CAP_S CMD...: runs CMD under `timeout -s INT` with a limit of min(CAP_S, what is left
# of the budget minus the reserve), logs to WORK/NAME.log, prints failures as they come, appends
# the step's status to WORK/steps.jsonl and packs OUT.
run() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START) - RESERVE_S))
  local limit=$((cap < left ? cap : left))
  local stall_env=()
  if stalled "$name"; then
    limit=$STALL_CAP
    stall_env=(KCL_GPU_CHECK_STALL_AFTER=1)
  fi
  if ((limit < 10)); then
    say "[$name] skipped: out of time"
    printf '{"step": "%s", "status": "skipped: out of time", "seconds": 0}\n' "$name" \
      >>"$WORK/steps.jsonl"
    LAST_STATUS=skipped
    pack "$name"
    return 0
  fi
  say "[$name] (limit ${limit}s) $*"
  local t0=$SECONDS
  # timeout puts the command in its own process group and signals the whole group (the xdist
  # workers too); tee and grep stay outside it and end with the command's output.
  env ${stall_env[@]+"${stall_env[@]}"} timeout -s INT --kill-after="$GRACE_S" "$limit" "$@" 2>&1 |
    tee "$WORK/$name.log" | grep --line-buffered -E '^(FAILED|ERROR) ' | sed 's/^/    /' |
    tee -a "$WORK/console.log"
  local rc=${PIPESTATUS[0]}
  local status="failed (exit $rc)"
  ((rc == 0)) && status=passed
  ((rc == 124)) && status="timed out: interrupted at its limit"
  ((rc == 137)) && status="timed out: killed $GRACE_S s after the interrupt at its limit"
  LAST_STATUS=$status
  say "[$name] $status in $((SECONDS - t0))s; last lines of $name.log:"
  tail -n 4 "$WORK/$name.log" | cut -c1-200 | sed 's/^/    /' | tee -a "$WORK/console.log"
  printf '{"step": "%s", "status": "%s", "seconds": %d, "limit": %d, "exit": %d}\n' "$name" \
    "$status" $((SECONDS - t0)) "$limit" "$rc" >>"$WORK/steps.jsonl"
  pack "$name"
}

# pytest_step NAME CAP_S WORKERS -- PYTEST_ARGS...: a test step whose every result is appended to
# WORK/NAME.tests.jsonl as it is known (tools/gpu_check_pytest.py), with JUnit XML (partial when
# interrupted), a per-test timeout, and the failures listed as they happen (-rfE at the end).
pytest_step() {
  local name=$1 cap=$2 workers=$3
  shift 4
  local parallel=() per_test=()
  if ((workers > 1)) && [[ $HAVE_XDIST == 1 ]]; then
    # Few OpenMP threads per worker: 16 cores, not workers x 16 threads.
    parallel=(-n "$workers")
  fi
  # The thread method also ends a test hung inside a CUDA call (it ends the process: under xdist
  # the worker is replaced and the test reported as crashed; the started-not-finished test in
  # NAME.tests.jsonl names it either way).
  [[ $HAVE_TIMEOUT == 1 ]] && per_test=(--timeout "$PER_TEST_S" --timeout-method=thread)
  KCL_TEST_RESULTS="$WORK/$name.tests.jsonl" OMP_NUM_THREADS=$TEST_THREADS \
    run "$name" "$cap" "$PY" -m pytest -p gpu_check_pytest -p no:cacheprovider -rfE \
    ${parallel[@]+"${parallel[@]}"} ${per_test[@]+"${per_test[@]}"} \
    --junitxml="$WORK/$name.xml" "$@"
}

# --- environment ------------------------------------------------------------------------------
say "kcl_ext GPU check: $(git rev-parse HEAD 2>/dev/null) dry_run=$DRY budget=${BUDGET_S}s"
{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
} >"$WORK/environment.log" 2>&1
# The wheels carried with the tree (make gpu-wheels): installed offline, into a folder of their own.
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$CACHE/site" "$ROOT"/.whl/*.whl >>"$WORK/environment.log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$CACHE/site"
    say "installed the carried wheels: $(cd "$ROOT/.whl" && echo *.whl)"
  else
    say "!! the carried wheels did not install (environment.log)"
  fi
else
  say "no wheels carried (.whl/ is empty or absent)"
fi
"$PY" "$ROOT/tools/gpu_report.py" "$WORK" --environment >>"$WORK/environment.log" 2>&1
PREFLIGHT=(--preflight)
[[ $DRY == 1 ]] && PREFLIGHT+=(--dry-run)
"$PY" "$ROOT/tools/gpu_report.py" "$WORK" "${PREFLIGHT[@]}" 2>&1 | tee -a "$WORK/console.log"
PREFLIGHT_RC=${PIPESTATUS[0]}
pack environment
if ((PREFLIGHT_RC != 0)) && [[ ${KCL_GPU_ALLOW_MISSING:-0} != 1 ]]; then
  say "!! STOPPED: a package the tests import is missing (above). Carry its wheel in .whl/"
  say "!! (make gpu-wheels; docs/benchmarks.md, 'The GPU check') or set KCL_GPU_ALLOW_MISSING=1."
  exit 3
fi
HAVE_XDIST=$("$PY" -c "import xdist" >/dev/null 2>&1 && echo 1 || echo 0)
HAVE_TIMEOUT=$("$PY" -c "import pytest_timeout" >/dev/null 2>&1 && echo 1 || echo 0)
NPROC=$(nproc)
WORKERS=${KCL_GPU_TEST_WORKERS:-$((NPROC >= 8 ? 6 : 1))}
TEST_THREADS=$((NPROC / WORKERS / 2 > 1 ? NPROC / WORKERS / 2 : 1))   # OpenMP, per worker
PER_TEST_S=${KCL_GPU_PER_TEST_S:-90}

# --- build ------------------------------------------------------------------------------------
export MAX_JOBS=${MAX_JOBS:-$NPROC}
build_with_pip() {  # in place (editable), against the torch installed here, no downloads
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . ||
    "$PY" setup.py build_ext --inplace    # an environment without pip
}
if [[ $DRY == 1 ]]; then
  run build 120 "$STALL_WRAP" "$PY" -c "import kcl_ext; \
print('dry run: the existing build', kcl_ext._library.LIBRARY_PATH)"
else
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  run build 200 bash -c "$(declare -f build_with_pip); build_with_pip"
  if [[ $LAST_STATUS != passed ]]; then
    say "[build] the CUDA build failed: building CPU + Triton only (the cuda backend is skipped)"
    echo '{"fallback": "CUDA build failed; CPU + Triton build"}' >"$WORK/build_fallback.json"
    export FORCE_CUDA=0
    run build_cpu_triton 120 bash -c "$(declare -f build_with_pip); build_with_pip"
  fi
fi

# --- warmup: the Triton kernels, compiled once -------------------------------------------------
if [[ $DRY == 1 ]]; then
  TRITON_INTERPRET=1 run warmup 60 "$PY" tools/triton_warmup.py --device cpu --max-calls 3 \
    --results "$WORK/warmup.jsonl"
else
  run warmup 75 "$PY" tools/triton_warmup.py --device cuda --results "$WORK/warmup.jsonl"
fi

# --- contract: the contract suite on cuda and triton --------------------------------------------
if [[ $DRY == 1 ]]; then
  pytest_step contract 120 "$WORKERS" -- tests/test_contract.py \
    -k "triton and (k0_is_moco or module_matches or double_backward)"
else
  pytest_step contract 120 "$WORKERS" -- tests/test_contract.py -k "cuda or triton"
fi

# --- the benchmark: headline points, then the rest ----------------------------------------------
if [[ $DRY == 1 ]]; then
  BENCH=(--device cpu --profile smoke --no-memory)
  HEADLINE="Q64 and forward+backward and not compiled and (fused_cpu or dense)"
  REST="Q64 and not forward+backward and not compiled and (fused_cpu or dense)"
else
  BENCH=(--device cuda --profile cuda-check)
  HEADLINE="N256-Q65536-D128-bfloat16 and forward+backward and not k-1"
  REST="not (${HEADLINE})"
fi
run headline 110 "$PY" -m benchmarks.run "${BENCH[@]}" --out "$WORK" --name headline --jsonl \
  -p gpu_check_pytest -k "$HEADLINE"

# --- the other test files ------------------------------------------------------------------------
if [[ $DRY == 1 ]]; then
  pytest_step tests_rest 90 "$WORKERS" -- tests/test_triton.py \
    -k "queue_splits_cover or no_queue_means_no_split or gpu_launch_configuration"
else
  pytest_step tests_rest 90 "$WORKERS" -- tests/test_cuda.py tests/test_triton.py \
    tests/test_triton_gpu.py
fi

run bench_rest 100 "$PY" -m benchmarks.run "${BENCH[@]}" --out "$WORK" --name bench_rest --jsonl \
  -p gpu_check_pytest -k "$REST"

# --- training throughput -------------------------------------------------------------------------
if [[ $DRY == 1 ]]; then
  run throughput 60 "$STALL_WRAP" "$PY" references/kcl/throughput.py \
    --config configs/fmnist_lt_kcl.yaml --synthetic --device cpu --batch-size 16 --steps 2 \
    --warmup 1 --num-workers 0 --json "$WORK/throughput.json"
else
  # ResNet-50, bf16, global batch 256, split-BN in 8 groups, queue 65536 (the recipe's config)
  run throughput 60 "$PY" references/kcl/throughput.py --config configs/imagenet_lt_kcl_r50.yaml \
    --synthetic --device cuda --amp bf16 --batch-size 256 --steps 30 --warmup 10 \
    --num-workers "$((NPROC > 2 ? NPROC - 2 : 1))" --json "$WORK/throughput.json"
fi

pack
say "results: $OUT/gpu_check.json and $OUT/gpu_check.tar.gz (total $((SECONDS - START))s)"
"$PY" "$ROOT/tools/gpu_report.py" "$WORK" --summary | tee -a "$WORK/console.log"
pack
