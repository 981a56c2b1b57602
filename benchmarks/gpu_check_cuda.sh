#!/usr/bin/env bash
# GPU check of the CUDA backend, on a machine with a CUDA GPU and nvcc (no network needed):
#   1. build kcl_ext in place with the CUDA kernels for this GPU's architecture,
#   2. run the GPU tests (tests/test_cuda.py) and the backend-choice tests,
#   3. benchmark N=256, Q=65536, D=128, bfloat16, forward+backward: CUDA kernels vs the eager
#      reference, torch.compile(reference) and Triton (where it imports); results JSON under
#      benchmarks/results/.
# The steps are written to be merged into benchmarks/gpu_check.sh (shared with the Triton
# backend); each can also run alone: STEPS="build test bench" (default: all three).
#   PY=python TORCH_CUDA_ARCH_LIST=9.0 benchmarks/gpu_check_cuda.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
STEPS=${STEPS:-"build test bench"}
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
RESULTS=${RESULTS:-benchmarks/results/gpu_cuda_$(date -u +%Y%m%dT%H%M%SZ).json}

for step in $STEPS; do
  case $step in
    build)
      echo "== build (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=$ARCH)"
      start=$(date +%s)
      FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=${MAX_JOBS:-8} \
        "$PY" setup.py build_ext --inplace 2>&1 | \
        sed -n '/kcl_ext build configuration/,/^=====/p;/error/Ip'
      test "${PIPESTATUS[0]}" -eq 0
      echo "built in $(( $(date +%s) - start )) s"
      "$PY" -c "import kcl_ext, torch; from kcl_ext import _backend_choice as b; \
assert b.cuda_kernels_available(), 'no CUDA kernels in ' + kcl_ext._library.LIBRARY_PATH; \
print('loaded', kcl_ext._library.LIBRARY_PATH, 'on', torch.cuda.get_device_name())"
      ;;
    test)
      echo "== GPU tests"
      "$PY" -m pytest -q -x tests/test_cuda.py tests/test_backend_choice.py
      ;;
    bench)
      echo "== benchmark -> $RESULTS"
      "$PY" -m benchmarks.gpu_bench_cuda --json "$RESULTS"
      ;;
    *)
      echo "gpu_check_cuda.sh: unknown step '$step' (build, test, bench)" >&2
      exit 2
      ;;
  esac
done
