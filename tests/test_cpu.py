"""What only the fused CPU kernel has: results independent of the thread count, no N x Q
allocation, and its two builds of the row loops (AVX2 and portable) and two GEMM entry points
(MKL called directly and ATen). The contract itself is tests/test_contract.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import kcl_ext
from _backends import assert_close, grad_weights, loss_and_grads, make_inputs, reference_float64

TESTS = os.path.dirname(os.path.abspath(__file__))


def _with_threads(threads, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def _assert_equal_results(first, again):
    assert torch.equal(first[0], again[0])
    assert len(first[1]) == len(again[1])
    for a, b in zip(first[1], again[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("k", [6, -1])
@pytest.mark.parametrize("query_only", [True, False])
@pytest.mark.parametrize("shape", [(100, 40000, 32), (300, 9000, 20)], ids=["N100", "N300"])
def test_bitwise_identical_for_any_thread_count(k, query_only, shape):
    # Q = 40000: many queue chunks of the forward's partition and of the queue gradient's; N = 300:
    # three blocks of queries (the last one short) times several chunks, odd D. The work is split
    # across threads in every pass.
    n, q, d = shape
    x = make_inputs(n, q, d, seed=12, requires_grad=(True, not query_only, not query_only))
    weights = grad_weights(n, torch.float32, "cpu")
    results = [_with_threads(threads, lambda: loss_and_grads(
        kcl_ext.kpos_loss, x, weights, k=k, seed=99, reduction="none", backend="cpu"))
        for threads in (1, 2, 3)]
    for again in results[1:]:
        _assert_equal_results(results[0], again)


_THREADS_AFTER_THE_OP = """
import torch
import kcl_ext
from _backends import loss_and_grads, make_inputs
seen = [torch.get_num_threads()]
for grads in ((False, False, False), (True, False, False), (True, True, True)):
    x = make_inputs(64, 5000, 32, seed=3, requires_grad=grads)
    loss_and_grads(kcl_ext.kpos_loss, x, None, k=4, seed=5, backend="cpu")
    seen.append(torch.get_num_threads())
print(*seen)
"""


def test_the_op_leaves_the_callers_thread_count_alone():
    # MKL's thread-local BLAS setting also lowers the calling thread's OpenMP count, and resetting
    # it does not put that back when the count came from OMP_NUM_THREADS: every later ATen op of
    # the caller, and the kernels' own parallel passes, would then run on one thread. A fresh
    # process, as a user starts one: the thread count from the environment, never set by torch.
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=TESTS)
    out = subprocess.run([sys.executable, "-c", _THREADS_AFTER_THE_OP], env=env, cwd=TESTS,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["2"] * 4, out.stdout


def _thread_cpu_ticks() -> dict[str, int]:
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        ticks[tid] = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_the_dense_pass_runs_on_every_thread():
    # The kernels' parallel passes are at::parallel_for regions, compiled in only with the OpenMP
    # flag of the build: with two threads, two OS threads must do the work (CPU time, not wall
    # time: this does not depend on the machine's speed or load).
    x = make_inputs(256, 65536, 128, seed=4, requires_grad=(False, False, False))

    def run():
        loss_and_grads(kcl_ext.kpos_loss, x, None, k=6, seed=1, backend="cpu")  # warm-up
        before = _thread_cpu_ticks()
        for _ in range(20):
            loss_and_grads(kcl_ext.kpos_loss, x, None, k=6, seed=1, backend="cpu")
        after = _thread_cpu_ticks()
        return sorted((after[t] - before.get(t, 0) for t in after), reverse=True)

    gained = _with_threads(2, run)
    assert gained[1] >= gained[0] // 4, f"CPU ticks per thread during the calls: {gained[:4]}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_queue_is_converted_per_tile_deterministically(dtype):
    # A half-precision queue is up-cast tile by tile (no float32 copy of it): the result does not
    # depend on the thread count, nor on the queue's row stride (a column slice of a wider
    # tensor is read in place).
    n, q, d = 150, 5000, 24
    wide = make_inputs(n, q, 2 * d, dtype=dtype, seed=4, requires_grad=(False, False, False))
    sliced = (wide[0][:, :d].contiguous().requires_grad_(),
              wide[1][:, :d].contiguous().requires_grad_(), wide[2][:, :d].requires_grad_(),
              wide[3], wide[4])
    assert sliced[2].stride() == (2 * d, 1)
    dense = (*sliced[:2], sliced[2].detach().contiguous().requires_grad_(), *sliced[3:])
    weights = grad_weights(n, dtype, "cpu")
    kw = dict(k=-1, seed=5, reduction="none", backend="cpu")
    results = [_with_threads(t, lambda: loss_and_grads(kcl_ext.kpos_loss, sliced, weights, **kw))
               for t in (1, 2, 3)]
    for again in results[1:]:
        _assert_equal_results(results[0], again)
    _assert_equal_results(results[0], loss_and_grads(kcl_ext.kpos_loss, dense, weights, **kw))
    ref = loss_and_grads(reference_float64, dense, weights.double(), k=-1, seed=5,
                         reduction="none")
    assert_close(results[0][0], ref[0], "cpu", dtype, "loss")
    for g, rg in zip(results[0][1], ref[1]):
        assert_close(g, rg, "cpu", dtype, "gradient")


def test_extra_memory_does_not_grow_with_n_times_q():
    # The profiler counts every allocation through ATen's allocator: the peak of one forward and
    # backward (query gradient, the MoCo case) stays far below one N x Q float32 matrix.
    n, q, d = 256, 16384, 64
    x = make_inputs(n, q, d, seed=3, empty_fraction=0.0, classes=100,
                    requires_grad=(True, False, False))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        loss = kcl_ext.kpos_loss(*x, k=6, seed=1, backend="cpu")
        torch.autograd.grad(loss, x[0])
    peak = _peak_bytes(prof)
    logits_bytes = n * q * 4
    assert 0 < peak < logits_bytes // 8, (peak, logits_bytes)


def _peak_bytes(prof) -> int:
    """Peak of the running sum of CPU allocations and frees that the profiler recorded."""
    events = sorted((e.time_range.start, e.cpu_memory_usage) for e in prof.events()
                    if e.cpu_memory_usage != 0)
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


# ----------------------------------------------------------------------------------------------
# The builds of the row loops and the GEMM entry points, each in a fresh process: the choice is
# made once per process, from the CPU and the environment (KCL_CPU_ISA, KCL_CPU_BLAS).
# ----------------------------------------------------------------------------------------------
_CHILD = r"""
import json, sys, warnings
import torch
sys.path.insert(0, {tests!r})
import kcl_ext
from _backends import grad_weights, loss_and_grads, make_inputs
torch.set_num_threads(2)
out = {{}}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for k in (6, -1):
            # Odd sizes: rows of the tiles whose length is no multiple of the vector width,
            # empty slots, a short last block of queries.
            x = make_inputs(131, 2333, 19, dtype=dtype, seed=8, negative_queries=2)
            w = grad_weights(131, dtype, "cpu")
            loss, grads = loss_and_grads(kcl_ext.kpos_loss, x, w, k=k, seed=3,
                                         reduction="none", backend="cpu")
            out[f"{{dtype}} {{k}}"] = [t.double().tolist() for t in [loss, *grads]]
    # The same call at other thread counts: bitwise the same results.
    x = make_inputs(300, 3000, 24, dtype=torch.bfloat16, seed=9)
    w = grad_weights(300, torch.bfloat16, "cpu")
    runs = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        runs.append(loss_and_grads(kcl_ext.kpos_loss, x, w, k=6, seed=3, reduction="none",
                                   backend="cpu"))
    out["thread_independent"] = all(torch.equal(a, b) for a, b in zip(
        [runs[0][0], *runs[0][1]], [runs[1][0], *runs[1][1]]))
out["warnings"] = [str(w.message) for w in caught]
json.dump(out, sys.stdout)
"""


def _run_child(env_overrides):
    env = {**os.environ, **env_overrides}
    done = subprocess.run([sys.executable, "-c", _CHILD.format(tests=TESTS)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


_UNSET = {"KCL_CPU_ISA": "", "KCL_CPU_BLAS": "", "KCL_CPU_BF16_GEMM": ""}


@pytest.fixture(scope="module")
def default_build():
    return _run_child(_UNSET)


def _cpu_has_amx_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read().split()
    except OSError:
        return False


@pytest.mark.parametrize("env", [{"KCL_CPU_ISA": "generic"}, {"KCL_CPU_BLAS": "aten"},
                                 {"KCL_CPU_ISA": "generic", "KCL_CPU_BLAS": "aten"},
                                 {"KCL_CPU_BF16_GEMM": "1"}],
                         ids=["generic-rows", "aten-gemm", "generic-rows+aten-gemm",
                              "bf16-gemm"])
def test_every_build_matches_the_reference(env, default_build):
    got = _run_child({**_UNSET, **env})
    for variable, value in (("KCL_CPU_ISA", "generic"), ("KCL_CPU_BLAS", "aten"),
                            ("KCL_CPU_BF16_GEMM", "1")):
        forced = env.get(variable) == value
        assert any(f"{variable}={value}" in w for w in got["warnings"]) == forced
    assert got["thread_independent"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for k in (6, -1):
            x = make_inputs(131, 2333, 19, dtype=dtype, seed=8, negative_queries=2)
            w = grad_weights(131, dtype, "cpu")
            ref_loss, ref_grads = loss_and_grads(reference_float64, x, w.double(), k=k, seed=3,
                                                 reduction="none")
            key = f"{dtype} {k}"
            for what, value, expected in zip(("loss", "query", "key", "queue"), got[key],
                                             [ref_loss, *ref_grads]):
                assert_close(torch.tensor(value, dtype=torch.float64), expected, "cpu", dtype,
                             f"{what} ({env}, {key})")
            # Another build is another summation order (FMA or not, another GEMM kernel) but the
            # same algorithm: within the tolerance of the default build's results too.
            for value, default in zip(got[key], default_build[key]):
                assert_close(torch.tensor(value, dtype=torch.float64),
                             torch.tensor(default, dtype=torch.float64), "cpu", dtype,
                             f"against the default build ({env}, {key})")


@pytest.mark.skipif(_cpu_has_amx_bf16(), reason="this CPU has bfloat16 matrix units (AMX-BF16)")
def test_without_bf16_matrix_units_bfloat16_takes_the_float32_path(default_build):
    # A CPU without bfloat16 matrix units converts bfloat16 tiles to float32 (its bfloat16 GEMMs
    # would be slower): the default results are those of KCL_CPU_BF16_GEMM=0, bit for bit.
    assert default_build["thread_independent"]
    float32_path = _run_child({**_UNSET, "KCL_CPU_BF16_GEMM": "0"})
    for k in (6, -1):
        assert default_build[f"{torch.bfloat16} {k}"] == float32_path[f"{torch.bfloat16} {k}"]
