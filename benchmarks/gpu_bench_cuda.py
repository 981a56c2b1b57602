"""GPU benchmark of kpos_loss: the CUDA kernels beside the eager reference, torch.compile(reference)
and (where it imports) the Triton kernels.

Default: N=256 queries, a Q=65536 queue, D=128, k=6, bfloat16, 1000 classes, forward + backward
(gradient of the query, as in MoCo/KCL training), on the current CUDA device. For each
implementation: median milliseconds over `--repeats` timed steps (CUDA events, after warm-up) and
the peak extra GPU memory of one step over the inputs (torch.cuda.max_memory_allocated). Every
implementation is checked against the eager reference on the same inputs and seed before timing.

    python -m benchmarks.gpu_bench_cuda --json benchmarks/results/gpu_cuda.json

IMPLEMENTATIONS is a plain name -> factory table, so a shared GPU benchmark can import it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch

SEED = 1234


def make_inputs(n, q, d, dtype, classes, device, grads, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def features(rows, name):
        x = torch.nn.functional.normalize(torch.randn(rows, d, generator=g), dim=1)
        return x.to(device=device, dtype=dtype).requires_grad_(name in grads)

    query, key, queue = features(n, "query"), features(n, "key"), features(q, "queue")
    query_labels = torch.randint(0, classes, (n,), generator=g).to(device)
    queue_labels = torch.randint(0, classes, (q,), generator=g).to(device)
    return query, key, queue, query_labels, queue_labels


def _kcl_backend(backend):
    def factory(k, temperature):
        import kcl_ext

        def loss_fn(query, key, queue, query_labels, queue_labels):
            return kcl_ext.kpos_loss(query, key, queue, query_labels, queue_labels, k=k,
                                     temperature=temperature, seed=SEED, backend=backend)
        return loss_fn
    return factory


def _reference(compiled):
    def factory(k, temperature):
        from kcl_ext.reference import kpos_loss_reference

        def loss_fn(query, key, queue, query_labels, queue_labels):
            return kpos_loss_reference(query, key, queue, query_labels, queue_labels, k=k,
                                       temperature=temperature, seed=SEED)
        return torch.compile(loss_fn) if compiled else loss_fn
    return factory


# name -> factory(k, temperature) -> loss_fn(query, key, queue, query_labels, queue_labels)
IMPLEMENTATIONS = {
    "reference": _reference(compiled=False),
    "reference_compiled": _reference(compiled=True),
    "cuda": _kcl_backend("cuda"),
    "triton": _kcl_backend("triton"),
}


def available(name) -> bool:
    if name == "cuda":
        from kcl_ext import _backend_choice
        return _backend_choice.cuda_kernels_available()
    if name == "triton":
        from kcl_ext import _backend_choice
        return _backend_choice.triton_available()
    return True


def run_step(loss_fn, inputs):
    leaves = [t for t in inputs[:3] if t.requires_grad]
    loss = loss_fn(*inputs)
    grads = torch.autograd.grad(loss, leaves) if leaves else ()
    return loss, grads


def measure(loss_fn, inputs, warmup, repeats):
    """CUDA: event timing and allocator peak. CPU (a dry run of this script's logic only):
    wall-clock timing, no memory figure."""
    cuda = inputs[0].is_cuda
    for _ in range(warmup):
        run_step(loss_fn, inputs)
    peak_extra = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, grads = run_step(loss_fn, inputs)
        torch.cuda.synchronize()
        peak_extra = int(torch.cuda.max_memory_allocated() - base)
        del loss, grads
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run_step(loss_fn, inputs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run_step(loss_fn, inputs)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "times_ms": times,
            "peak_extra_bytes": peak_extra}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--q", type=int, default=65536)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--grads", nargs="+", default=["query"], choices=["query", "key", "queue"])
    p.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--device", default="cuda",
                   help="cuda (the benchmark); cpu only dry-runs this script with small shapes")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench_cuda: needs a CUDA GPU")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (dry run)"

    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(args.n, args.q, args.d, dtype, args.classes, args.device, args.grads)
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    want_loss, want_grads = run_step(IMPLEMENTATIONS["reference"](args.k, args.temperature), inputs)
    results = {}
    print(f"kpos_loss forward+backward on {device_name} (torch {torch.__version__}): "
          f"N={args.n} Q={args.q} D={args.d} k={args.k} {args.dtype}, grad of {', '.join(args.grads)}")
    print(f"{'impl':>20} {'median ms':>10} {'peak extra MiB':>15} {'loss':>10}")
    for name in args.impls:
        needs_gpu = name in ("cuda", "triton")
        if (needs_gpu and args.device != "cuda") or not available(name):
            print(f"{name:>20} (not available {'on ' + args.device if needs_gpu and args.device != 'cuda' else 'in this build'})")
            results[name] = {"available": False}
            continue
        loss_fn = IMPLEMENTATIONS[name](args.k, args.temperature)
        loss, grads = run_step(loss_fn, inputs)
        torch.testing.assert_close(loss.float(), want_loss.float(), atol=tol, rtol=tol)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
        r = measure(loss_fn, inputs, args.warmup, args.repeats)
        r.update(available=True, loss=float(loss.detach()))
        results[name] = r
        mib = "n/a" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.1f}"
        print(f"{name:>20} {r['median_ms']:>10.3f} {mib:>15} {r['loss']:>10.5f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__,
                       "cuda": torch.version.cuda, "python": platform.python_version(),
                       "commit": git_commit(),
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       "config": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
