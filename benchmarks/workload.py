"""Counted work of one benchmark call, and the machine's ceilings measured in the same run.

The counting is the problem's, not an implementation's (docs/benchmarks.md): every implementation
of the same problem is credited the same FLOPs and bytes, so GFLOP/s and GB/s compare them, and
the ratio to the ceilings shows how far each is from the machine's limits.

  L = logits per query row (kpos_loss: Q + 1, SupConLoss: Q, inf-cl: N + Q)
  forward FLOPs           = 2 N L D                  (the logits; exp, log and sums not counted)
  forward+backward FLOPs  = 2 N L D + 2 N L D        (the query gradient: one more N x L x D
                                                      product, P . keys)
    with all three gradients: + 2 N L D              (the keys' gradient, P^T . query)
  forward bytes           = (N + C) D s + (N + Q) b  (query and the C = L columns' features, once,
                                                      labels of b bytes each)
  forward+backward bytes  = 2 x forward bytes + N D s (read again, write the query gradient)
    with all three gradients: + (N + Q) D s          (write the key and queue gradients)
with s the feature dtype's size. This is the traffic of an ideal two-pass implementation that reads
each input once per pass and writes nothing of size N x L.

The in-cache GEMM rate (CPU) is the rate of a small product (float32; bfloat16 for bfloat16 points) whose operands stay in cache
(256 x 128 by 128 x 1024, one thread, repeated) times the number of threads: the rate a tiled
kernel's products reach at best. The counted FLOPs at that rate are the `gemm_bound_s` of a point.
"""
from __future__ import annotations

import time

import torch


def counted_flops(logits_per_row: int, n: int, d: int, mode: str,
                  grads=("query",)) -> int:
    product = 2 * n * logits_per_row * d
    if mode == "forward":
        return product
    return product * (2 + (1 if set(grads) - {"query"} else 0))


def counted_bytes(logits_per_row: int, n: int, q: int, d: int, dtype: torch.dtype, mode: str,
                  grads=("query",), label_bytes: int = 8) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    forward = (n + logits_per_row) * d * size + (n + q) * label_bytes
    if mode == "forward":
        return forward
    written = n * d * size + ((n + q) * d * size if set(grads) - {"query"} else 0)
    return 2 * forward + written


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _best_time(fn, device: str, repeats: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_in_cache_gemm(dtypes=(torch.float32,), repeats: int = 200) -> dict:
    """The in-cache GEMM rate (see the module docstring) per dtype: float32 products for float32
    (and float16, which the CPU kernel computes in float32), bfloat16 products for bfloat16 (the
    CPU kernel's bfloat16 path multiplies bfloat16 tiles with float32 accumulation, on the
    matrix units where the CPU has them)."""
    threads = torch.get_num_threads()
    result = {"in_cache_gemm_shape": "256x128 @ 128x1024 in the dtype, 1 thread, times the threads",
              "in_cache_gemm_threads": threads}
    rates = {}
    for dtype in dtypes:
        gemm_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        if gemm_dtype not in rates:
            a = torch.randn(256, 128).to(gemm_dtype)
            b = torch.randn(128, 1024).to(gemm_dtype)
            out = torch.empty(256, 1024, dtype=gemm_dtype)
            torch.set_num_threads(1)
            try:
                seconds = _best_time(lambda: [torch.mm(a, b, out=out) for _ in range(repeats)],
                                     "cpu", 5)
            finally:
                torch.set_num_threads(threads)
            rates[gemm_dtype] = 2 * 256 * 128 * 1024 * repeats / seconds / 1e9 * threads
        result[f"in_cache_gemm_gflops_{str(dtype).removeprefix('torch.')}"] = rates[gemm_dtype]
    return result


def measure_ceilings(device: str, dtypes=(torch.float32,)) -> dict:
    """A large matrix product's rate per dtype and a large copy's bandwidth, best of a few."""
    n = 2048 if device == "cpu" else 8192
    result = {"matmul_size": n}
    for dtype in dtypes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        seconds = _best_time(lambda: torch.mm(a, b), device, 3 if device == "cpu" else 10)
        result[f"matmul_gflops_{str(dtype).removeprefix('torch.')}"] = 2 * n**3 / seconds / 1e9
        if device == "cuda" and dtype == torch.float32:
            # Triton's tl.dot takes float32 through TF32 tensor cores by default: its ceiling too.
            allowed = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                seconds = _best_time(lambda: torch.mm(a, b), device, 10)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = allowed
            result["matmul_gflops_tf32"] = 2 * n**3 / seconds / 1e9
        del a, b
    if device == "cpu":
        result.update(measure_in_cache_gemm(dtypes))
    copy_bytes = (256 if device == "cpu" else 2048) * 2**20
    src = torch.ones(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = _best_time(lambda: dst.copy_(src), device, 3 if device == "cpu" else 10)
    result["copy_bytes"] = copy_bytes
    result["copy_gbps"] = 2 * copy_bytes / seconds / 1e9   # read + write
    return result
