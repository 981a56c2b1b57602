"""One implementation of kpos_loss, timed and memory-measured in this (fresh) process.

Reads a JSON payload on stdin: impl ("fused" | "reference"), n, q, d, k, dtype, grads (which of
query/key/queue require grad), repeats, threads. Prints one JSON line: the median forward+backward
time, the loss, and the peak extra resident memory of the first call over the inputs.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from benchmarks.cpu_memory import peak_rss_bytes


def make_inputs(n, q, d, dtype, classes=1000, seed=0, grads=("query",)):
    g = torch.Generator().manual_seed(seed)

    def features(rows, name):
        x = torch.nn.functional.normalize(torch.randn(rows, d, generator=g), dim=1).to(dtype)
        return x.requires_grad_(name in grads)

    query, key, queue = features(n, "query"), features(n, "key"), features(q, "queue")
    query_labels = torch.randint(0, classes, (n,), generator=g)
    queue_labels = torch.randint(0, classes, (q,), generator=g)
    return query, key, queue, query_labels, queue_labels


def main():
    cfg = json.loads(sys.stdin.read())
    torch.set_num_threads(cfg.get("threads", torch.get_num_threads()))
    import kcl_ext

    dtype = getattr(torch, cfg.get("dtype", "float32"))
    inputs = make_inputs(cfg["n"], cfg["q"], cfg["d"], dtype, cfg.get("classes", 1000),
                         grads=tuple(cfg.get("grads", ["query"])))
    leaves = [t for t in inputs[:3] if t.requires_grad]
    backend = {"fused": "cpu", "reference": "reference"}[cfg["impl"]]

    def step():
        loss = kcl_ext.kpos_loss(*inputs, k=cfg["k"], seed=1234, backend=backend)
        grads = torch.autograd.grad(loss, leaves) if leaves else ()
        return loss, grads

    before = peak_rss_bytes()
    loss, _ = step()
    peak_extra = peak_rss_bytes() - before
    times = []
    for _ in range(cfg.get("repeats", 5)):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"impl": cfg["impl"], "loss": float(loss), "median_s": statistics.median(times),
                      "min_s": min(times), "times_s": times, "peak_extra_bytes": peak_extra,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
