"""kpos_loss benchmarks: every implementation of benchmarks/impls.py over the grid of grid.py.

Each point: build the inputs (unit-norm features, 1000 classes, seed 0), check that the
implementation agrees with its counterpart on them (agreement.py), time it with pytest-benchmark
(a GPU call ends with a device synchronisation), measure its peak memory (CPU: a fresh process,
ru_maxrss; GPU: torch.cuda.max_memory_allocated over the call), and record the counted FLOPs and
bytes, the achieved rates and the run's ceilings in extra_info.
"""
from __future__ import annotations

import dataclasses
import gc
import time

import pytest
import torch

from benchmarks import grid
from benchmarks.agreement import check_agreement
from benchmarks import loss_run
from benchmarks.cpu_memory import run_in_fresh_process
from benchmarks.impls import IMPLS
from benchmarks.loss_run import make_inputs, make_step
from benchmarks.workload import counted_bytes, counted_flops

TARGET_SECONDS = {"cpu": 1.0, "cuda": 0.5}     # timed per point, roughly
ROUNDS = {"cpu": (3, 10), "cuda": (10, 200)}   # at least, at most


def _skip(case, reason: str):
    grid.SKIPPED.append({**dataclasses.asdict(case), "reason": reason})
    pytest.skip(reason)


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_memory(case, device: str, step) -> dict:
    if device == "cuda":
        _sync(device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        _sync(device)
        return {"peak_extra_bytes": torch.cuda.max_memory_allocated() - before,
                "memory_method": "torch.cuda.max_memory_allocated over one call"}
    result = run_in_fresh_process(loss_run.measure, {
        "impl": case.impl, "n": case.n, "q": case.q, "d": case.d, "k": case.k,
        "dtype": case.dtype, "mode": case.mode, "classes": case.classes, "repeats": 0,
        "grads": list(case.grad_inputs), "threads": torch.get_num_threads()}, timeout=900)
    return {"peak_extra_bytes": result["peak_extra_bytes"],
            "memory_method": "fresh forked process, ru_maxrss, " + result["memory_method"]}


def test_kpos_loss(benchmark, case, bench_device, ceilings, measure_memory):
    impl = IMPLS[case.impl]
    reason = case.skip or impl.unavailable(bench_device)
    if reason is None and not impl.supports_k(case.k):
        reason = f"{impl.name} computes only k in {impl.ks}"
    grads = case.grad_inputs if case.mode == "forward+backward" else ()
    if reason is None and not set(grads) <= set(impl.grads):
        reason = f"{impl.name} differentiates only {', '.join(impl.grads)}"
    if reason:
        _skip(case, reason)

    benchmark.group = f"{case.mode} N={case.n} Q={case.q} D={case.d} {case.dtype}"
    dtype = getattr(torch, case.dtype)
    inputs = make_inputs(case.n, case.q, case.d, dtype, case.classes, device=bench_device,
                         grads=grads or ("query",))
    agreement = check_agreement(impl, inputs, case.k, grads, bench_device)

    step = make_step(impl.build(case.k, bench_device), inputs, case.mode)

    def timed():
        step()
        _sync(bench_device)

    t0 = time.perf_counter()
    timed()                         # first call: compilation, caches
    first_call = time.perf_counter() - t0
    t0 = time.perf_counter()
    timed()
    estimate = time.perf_counter() - t0
    low, high = ROUNDS[bench_device]
    rounds = max(low, min(high, int(TARGET_SECONDS[bench_device] / max(estimate, 1e-6))))
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)

    median = benchmark.stats.stats.median
    logits = impl.logits_per_row(case.n, case.q)
    flops = counted_flops(logits, case.n, case.d, case.mode, grads)
    nbytes = counted_bytes(logits, case.n, case.q, case.d, dtype, case.mode, grads)
    info = {**dataclasses.asdict(case), "device": bench_device, "description": impl.description,
            "logits_per_row": logits, "first_call_s": first_call, "median_s": median,
            "counted_flops": flops, "counted_bytes": nbytes,
            "gflops": flops / median / 1e9, "gbps": nbytes / median / 1e9,
            "threads": torch.get_num_threads(), **agreement}
    matmul_ceiling = ceilings.get(f"matmul_gflops_{case.dtype}")
    if matmul_ceiling:
        info["matmul_ceiling_gflops"] = matmul_ceiling
        info["fraction_of_matmul_ceiling"] = info["gflops"] / matmul_ceiling
    gemm_rate = ceilings.get(f"in_cache_gemm_gflops_{case.dtype}")
    if gemm_rate:
        # The problem's GEMMs at the in-cache rate: the time no implementation can beat.
        info["gemm_bound_s"] = flops / (gemm_rate * 1e9)
    if ceilings.get("copy_gbps"):
        info["copy_ceiling_gbps"] = ceilings["copy_gbps"]
        info["fraction_of_copy_ceiling"] = info["gbps"] / ceilings["copy_gbps"]
    if bench_device == "cuda":
        from torch.utils.benchmark import Timer   # synchronises CUDA around its measurements
        info["timer_median_s"] = Timer("step()", globals={"step": step}).blocked_autorange(
            min_run_time=0.2).median
    if measure_memory:
        info.update(_peak_memory(case, bench_device, step))
    benchmark.extra_info.update(info)
