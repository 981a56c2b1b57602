#!/usr/bin/env bash
# The GPU check of kcl_ext, prepared for a machine with one CUDA GPU (written for an H200 with
# Python 3.12, torch 2.11, triton 3.6 and nvcc 13.0 preinstalled, and no network):
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# 1. installs the package into the current Python (no downloads: --no-build-isolation --no-deps;
#    the CUDA kernels are compiled when csrc/cuda has sources, for sm_90 unless
#    TORCH_CUDA_ARCH_LIST says otherwise);
# 2. runs the benchmark (benchmarks/gpu_bench.py: N=256, Q=65536, D=128, bf16, forward+backward;
#    fused kernels against the eager and the compiled reference);
# 3. runs the GPU tests: tests/test_triton_gpu.py, tests/test_triton.py (on the GPU), and every
#    other test marked `gpu`;
# 4. writes OUT_DIR/gpu_check.json: GPU, commit, date, each step's status and time, and the
#    benchmark's results; logs of every step lie beside it.
# Each step has a time limit, and the whole script stays inside 8 minutes (BUDGET_S=480).
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-480}
START=$SECONDS
STEPS=()
LAST_STATUS=

# run NAME CAP_S CMD...: runs CMD with a limit of min(CAP_S, what is left of the budget minus a
# reserve for the steps after it), logs to OUT/NAME.log, records status and seconds.
run() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START) - 15))
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    echo "[$name] skipped: out of time"
    STEPS+=("{\"step\": \"$name\", \"status\": \"skipped: out of time\", \"seconds\": 0}")
    LAST_STATUS=skipped
    return 0
  fi
  echo "[$name] (limit ${limit}s) $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local status="failed (exit $rc)"
  ((rc == 0)) && status=passed
  ((rc == 124 || rc == 137)) && status="timed out after ${limit}s"
  [[ $name == test_* ]] && ((rc == 5)) && status="no tests collected"
  LAST_STATUS=$status
  echo "[$name] $status in $((SECONDS - t0))s; last lines of $OUT/$name.log:"
  tail -n 5 "$OUT/$name.log" | sed 's/^/    /'
  STEPS+=("{\"step\": \"$name\", \"status\": \"$status\", \"seconds\": $((SECONDS - t0))}")
}

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if compgen -G "csrc/cuda/*.cu" >/dev/null; then
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi

{
  nvidia-smi || true
  "$PY" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
  command -v nvcc && nvcc --version | tail -n 2
} >"$OUT/environment.log" 2>&1

run install 150 "$PY" -m pip install --no-build-isolation --no-deps -e .
if [[ $LAST_STATUS != passed ]]; then
  # pip could not install (e.g. no pip in the environment): build in place instead.
  run build_inplace 150 "$PY" setup.py build_ext --inplace
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# GPU_BENCH_ARGS: extra arguments (e.g. smaller shapes for a dry run of this script).
run benchmark 120 "$PY" -m benchmarks.gpu_bench --json "$OUT/gpu_bench.json" ${GPU_BENCH_ARGS:-}
# Most of the tests' time is Triton compiling kernels (one process compiles one at a time):
# spread them over 4 processes when pytest-xdist is there.
PARALLEL=()
"$PY" -c "import xdist" >/dev/null 2>&1 && PARALLEL=(-n 4)
run test_triton 240 "$PY" -m pytest -q -p no:cacheprovider ${PARALLEL[@]+"${PARALLEL[@]}"} \
  tests/test_triton_gpu.py tests/test_triton.py
run test_gpu_marked 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests \
  --ignore=tests/test_triton.py --ignore=tests/test_triton_gpu.py

COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
DIRTY=$(git status --porcelain 2>/dev/null | grep -qv '^??' && echo true || echo false)
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null || echo unknown)
STEPS_JSON=$(IFS=,; echo "[${STEPS[*]}]")
OUT="$OUT" COMMIT="$COMMIT" DIRTY="$DIRTY" GPU="$GPU" STEPS_JSON="$STEPS_JSON" \
  TOTAL=$((SECONDS - START)) "$PY" - <<'EOF'
import datetime, json, os
out = os.environ["OUT"]
bench_path = os.path.join(out, "gpu_bench.json")
bench = json.load(open(bench_path)) if os.path.exists(bench_path) else None
report = {
    "gpu": os.environ["GPU"],
    "commit": os.environ["COMMIT"],
    "uncommitted_changes": os.environ["DIRTY"] == "true",
    "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "total_seconds": int(os.environ["TOTAL"]),
    "steps": json.loads(os.environ["STEPS_JSON"]),
    "benchmark": bench,
}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=2)
print(json.dumps({k: report[k] for k in ("gpu", "commit", "total_seconds", "steps")}, indent=2))
EOF
echo "results: $OUT/gpu_check.json (total $((SECONDS - START))s)"
