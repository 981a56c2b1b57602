"""One implementation of kpos_loss (or a peer), memory-measured and timed in this (fresh) process.

Reads a JSON payload on stdin: impl (a name from benchmarks/impls.py), n, q, d, k, dtype, mode ("forward" | "forward+backward"), grads (which of
query/key/queue require grad; default: the query, as in MoCo), repeats (timed calls after the
measured one; 0 for memory only), threads. Prints one JSON line: the peak extra resident memory of
one call over the inputs, the loss, and the median time of the repeats.

The peak is taken after one warm-up call where Linux lets the peak be reset (see cpu_memory.py),
else over the first call.
"""
from __future__ import annotations

import gc
import json
import statistics
import sys
import time

import torch

from benchmarks.cpu_memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss

def make_inputs(n, q, d, dtype, classes=1000, seed=0, grads=("query",), device="cpu"):
    """Unit-norm random features and uniform labels over `classes` (all queue slots valid)."""
    g = torch.Generator().manual_seed(seed)

    def features(rows, name):
        x = torch.nn.functional.normalize(torch.randn(rows, d, generator=g), dim=1)
        return x.to(device=device, dtype=dtype).requires_grad_(name in grads)

    query, key, queue = features(n, "query"), features(n, "key"), features(q, "queue")
    query_labels = torch.randint(0, classes, (n,), generator=g).to(device)
    queue_labels = torch.randint(0, classes, (q,), generator=g).to(device)
    return query, key, queue, query_labels, queue_labels


def make_step(loss_fn, inputs, mode: str):
    """The timed unit: a forward (no autograd graph) or a forward and backward."""
    leaves = [t for t in inputs[:3] if t.requires_grad]
    if mode == "forward":
        def step():
            with torch.no_grad():
                return loss_fn(*inputs)
    elif mode == "forward+backward":
        if not leaves:
            raise ValueError("forward+backward needs at least one input that requires grad")

        def step():
            loss = loss_fn(*inputs)
            torch.autograd.grad(loss, leaves)
            return loss.detach()
    else:
        raise ValueError(f"mode must be 'forward' or 'forward+backward', got {mode!r}")
    return step


def measure(cfg: dict) -> dict:
    """Makes the inputs, measures one call's peak extra memory, then times `repeats` calls."""
    torch.set_num_threads(cfg.get("threads", torch.get_num_threads()))
    from benchmarks.impls import IMPLS

    impl = IMPLS[cfg["impl"]]
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    inputs = make_inputs(cfg["n"], cfg["q"], cfg["d"], dtype, cfg.get("classes", 1000),
                         grads=tuple(cfg.get("grads", ["query"])))
    step = make_step(impl.build(cfg["k"], "cpu"), inputs, cfg.get("mode", "forward+backward"))

    gc.collect()
    if reset_peak_rss():
        step()                 # warm-up: compilation, thread pools, first-touch of the inputs
        gc.collect()
        reset_peak_rss()
        method = "peak reset after one warm-up call"
        before = current_rss_bytes()
    else:
        method = "first call"
        before = peak_rss_bytes()
    loss = step()
    # The kernel batches RSS counters per thread, so the difference has a resolution of a few
    # hundred KiB and can come out slightly negative for a call that allocates next to nothing.
    peak_extra = max(0, peak_rss_bytes() - before)
    times = []
    for _ in range(cfg.get("repeats", 5)):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"impl": cfg["impl"], "loss": float(loss), "peak_extra_bytes": peak_extra,
            "memory_method": method,
            "median_s": statistics.median(times) if times else None,
            "min_s": min(times) if times else None, "times_s": times,
            "threads": torch.get_num_threads()}


def main():
    print(json.dumps(measure(json.loads(sys.stdin.read()))))


if __name__ == "__main__":
    main()
