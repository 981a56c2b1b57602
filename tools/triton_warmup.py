"""Compiles the kpos_loss Triton kernels once, in one process, before the parallel tests.

    TRITON_CACHE_DIR=DIR python tools/triton_warmup.py --results DIR/warmup.jsonl

Triton compiles a kernel the first time a process launches it with a new specialisation (feature
dtype, the constexpr block sizes that follow D, k's gather / class-sum paths, which gradients
are wanted, integers and pointers divisible by 16) and keeps the binary in TRITON_CACHE_DIR. Run
over pytest-xdist, every worker would compile the same kernels again; run once here, in the
cache the workers share, they load them instead. The calls cover the contract suite's shapes
(tests/test_contract.py SHAPES, or the interpreter's small shapes without a GPU), every feature
dtype, k in {0, 3, -1}, all three gradients or the query's alone, and a strided queue.

Each call is appended to --results as one JSON line (shape, dtype, k, gradients, seconds, the
number of new cache entries, or the error) as soon as it ends, so a run stopped by its cap keeps
what it did; an error is reported and the next call goes on. Exit status 1 if any call failed.
KCL_GPU_CHECK_STALL_AFTER=N (the CPU rehearsal of tools/gpu_check.sh) makes it hang after N calls
until it is interrupted.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ("float32", "bfloat16", "float16", "float64")
KS = (0, 3, -1)
GRADS = (("query", "key", "queue"), ("query",))


def _cache_entries(cache_dir: str | None) -> int:
    if not cache_dir or not os.path.isdir(cache_dir):
        return 0
    return sum(1 for entry in os.scandir(cache_dir) if entry.is_dir())


def _shapes(on_gpu: bool) -> list[tuple[int, int, int]]:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_contract   # the contract suite's own shapes, so that the two cannot drift apart
    return list(test_contract.SHAPES if on_gpu else test_contract.INTERPRETED_SHAPES)


def _call(shape, dtype_name: str, k: int, grads, strided: bool, device: str):
    import torch
    import kcl_ext
    n, q, d = shape
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(n * 1000 + q + d)

    def features(rows):
        return torch.nn.functional.normalize(torch.randn(rows, d, generator=g), dim=1)

    query, key = features(n), features(n)
    queue = features(2 * q)[::2] if strided else features(q)   # a row stride of 2 * D
    query, key, queue = (t.to(device=device, dtype=dtype) for t in (query, key, queue))
    tensors = {"query": query, "key": key, "queue": queue}
    for name in grads:
        tensors[name].requires_grad_(True)
    query_labels = torch.randint(0, 5, (n,), generator=g).to(device)
    queue_labels = torch.randint(-1, 5, (q,), generator=g).to(device)
    loss = kcl_ext.kpos_loss(query, key, queue, query_labels, queue_labels, k=k,
                             temperature=0.1, reduction="sum", seed=5, backend="triton")
    torch.autograd.grad(loss, [tensors[name] for name in grads])
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", required=True, help="JSON-lines file, appended to")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cpu runs the interpreter (TRITON_INTERPRET=1), for a dry run")
    p.add_argument("--max-calls", type=int, default=None,
                   help="stop after this many calls (the dry run's stand-in)")
    args = p.parse_args(argv)

    import torch
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--device cpu needs TRITON_INTERPRET=1 set before the run (Triton's interpreter)")
    if args.max_calls is not None and args.max_calls < 1:
        p.error(f"--max-calls must be a positive number of calls, got {args.max_calls}")
    cache_dir = os.environ.get("TRITON_CACHE_DIR")
    shapes = _shapes(on_gpu=device == "cuda")
    variants = [(shape, dtype, k, grads, False)
                for shape, dtype, k, grads in itertools.product(shapes, DTYPES, KS, GRADS)]
    variants += [(shape, dtype, 6, GRADS[0], True) for shape, dtype in
                 itertools.product(shapes[-2:], DTYPES)]
    variants = variants[:args.max_calls]
    started, failures = time.perf_counter(), 0
    print(f"triton warm-up: {len(variants)} calls on {device}, cache {cache_dir or '(default)'}",
          flush=True)
    stall_after = os.environ.get("KCL_GPU_CHECK_STALL_AFTER")
    for done, (shape, dtype, k, grads, strided) in enumerate(variants):
        if stall_after is not None and done >= int(stall_after):
            from gpu_check_pytest import stall_until_interrupted   # tools/, beside this file
            stall_until_interrupted("the warm-up")
        before, t0 = _cache_entries(cache_dir), time.perf_counter()
        entry = {"shape": list(shape), "dtype": dtype, "k": k, "grads": list(grads),
                 "strided_queue": strided}
        try:
            _call(shape, dtype, k, grads, strided, device)
        except Exception as error:  # noqa: BLE001  (report it, warm the rest)
            failures += 1
            entry["error"] = f"{type(error).__name__}: {error}"[:2000]
            print(f"  FAILED {entry}", flush=True)
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        entry["new_cache_entries"] = _cache_entries(cache_dir) - before
        with open(args.results, "a") as f:
            f.write(json.dumps(entry) + "\n")
    print(f"triton warm-up: {len(variants)} calls, {failures} failed, "
          f"{_cache_entries(cache_dir)} cache entries, {time.perf_counter() - started:.1f} s",
          flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
