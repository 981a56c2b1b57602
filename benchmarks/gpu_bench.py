"""kpos_loss forward + backward on one GPU: the fused kernels against the dense reference.

Default problem: the paper's MoCo setting, N=256 queries, a Q=65536 queue, D=128, bfloat16, k=6,
tau=0.07, 1000 classes drawn uniformly (query and queue labels), gradient of the query (the key
and the queue come from the momentum encoder). Implementations (pluggable, see IMPLEMENTATIONS):

    triton      kcl_ext.kpos_loss(..., backend="triton")     the fused Triton kernels
    cuda        kcl_ext.kpos_loss(..., backend="cuda")       the CUDA kernels, where built
    reference   kcl_ext.kpos_loss_reference                  dense eager PyTorch (N x Q logits)
    compiled    torch.compile(kcl_ext.kpos_loss_reference)   the same, compiled by Inductor

Every implementation is first checked against the eager reference (loss and gradients, within
the dtype's tolerance), then timed: the median of --repeats CUDA-event timings of one
forward + backward, after --warmup runs. Peak extra memory = torch.cuda.max_memory_allocated
during one step minus the memory allocated before it (inputs excluded, gradients included).
Without a GPU it runs on the CPU (wall-clock timings, no memory figure); that mode exists to
test this script with tiny shapes under TRITON_INTERPRET=1.

    python -m benchmarks.gpu_bench --json results.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from typing import Callable, Dict

import torch

import kcl_ext
from benchmarks.provenance import git_commit

# Agreement with the eager reference before timing: (atol, rtol) per dtype, as in
# tests/test_triton.py.
TOLERANCES = {
    torch.float32: (2e-5, 1e-5),
    torch.float16: (1e-2, 5e-3),
    torch.bfloat16: (1e-1, 2e-2),
}


def _fused(backend: str) -> Callable:
    def loss(query, key, queue, query_labels, queue_labels, k, temperature, seed):
        return kcl_ext.kpos_loss(query, key, queue, query_labels, queue_labels, k=k,
                                 temperature=temperature, seed=seed, backend=backend)
    return loss


def _reference(query, key, queue, query_labels, queue_labels, k, temperature, seed):
    return kcl_ext.kpos_loss_reference(query, key, queue, query_labels, queue_labels, k=k,
                                       temperature=temperature, seed=seed)


_compiled_reference = None


def _compiled(*args):
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(_reference)
    return _compiled_reference(*args)


IMPLEMENTATIONS: Dict[str, Callable] = {
    "triton": _fused("triton"),
    "cuda": _fused("cuda"),
    "reference": _reference,
    "compiled": _compiled,
}


def make_inputs(n, q, d, dtype, classes, device, grads, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def features(rows, name):
        x = torch.nn.functional.normalize(torch.randn(rows, d, generator=gen), dim=1)
        return x.to(device=device, dtype=dtype).requires_grad_(name in grads)

    return (features(n, "query"), features(n, "key"), features(q, "queue"),
            torch.randint(0, classes, (n,), generator=gen).to(device),
            torch.randint(0, classes, (q,), generator=gen).to(device))


def run_step(impl, inputs, args):
    for t in inputs[:3]:
        t.grad = None
    loss = impl(*inputs, args.k, args.temperature, 1)
    loss.backward()
    return loss


def outputs_of(impl, inputs, args):
    loss = run_step(impl, inputs, args)
    return [loss.detach()] + [t.grad for t in inputs[:3] if t.requires_grad]


def time_ms(impl, inputs, args, cuda: bool):
    for _ in range(args.warmup):
        run_step(impl, inputs, args)
    times = []
    for _ in range(args.repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run_step(impl, inputs, args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run_step(impl, inputs, args)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(impl, inputs, args, cuda: bool):
    if not cuda:
        return None
    for t in inputs[:3]:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    run_step(impl, inputs, args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline



def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--q", type=int, default=65536)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--grads", nargs="+", default=["query"], choices=["query", "key", "queue"])
    p.add_argument("--impls", nargs="+", default=["triton", "cuda", "reference", "compiled"],
                   choices=list(IMPLEMENTATIONS))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(args.n, args.q, args.d, dtype, args.classes, device, args.grads)
    machine = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    print(f"kpos_loss forward+backward on {machine}: N={args.n} Q={args.q} D={args.d} "
          f"{args.dtype} k={args.k} tau={args.temperature}, grad of {', '.join(args.grads)}",
          flush=True)

    report = {
        "benchmark": "kpos_loss forward+backward",
        "machine": machine,
        "device": str(device),
        "commit": git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "shapes": {"n": args.n, "q": args.q, "d": args.d},
        "dtype": args.dtype, "k": args.k, "temperature": args.temperature,
        "classes": args.classes, "grads": args.grads,
        "timing": f"median of {args.repeats} after {args.warmup} warm-up runs",
        "results": [],
        "speedups": {},
    }
    expected = outputs_of(_reference, inputs, args)
    atol, rtol = TOLERANCES[dtype]
    for name in args.impls:
        # The report is rewritten after every implementation, so that a run cut short (e.g. by a
        # slow torch.compile) keeps what it measured.
        report["results"].append(measure(name, inputs, expected, args, cuda, atol, rtol))
        report["speedups"] = speedups(report["results"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    for key, value in report["speedups"].items():
        print(f"speed-up {key}: {value:.2f}x")
    return report


def measure(name, inputs, expected, args, cuda, atol, rtol):
    impl = IMPLEMENTATIONS[name]
    row = {"impl": name}
    try:
        got = outputs_of(impl, inputs, args)
    except (RuntimeError, NotImplementedError, ValueError) as error:
        row["skipped"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        print(f"{name:>10}  skipped ({row['skipped']})")
        return row
    row["max_abs_diff"] = [float((a.float() - b.float()).abs().max()) for a, b in
                           zip(got, expected)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"{name} disagrees with the reference: {m}")
    row["median_ms"] = time_ms(impl, inputs, args, cuda)
    row["peak_extra_bytes"] = peak_extra_bytes(impl, inputs, args, cuda)
    mib = (f"{row['peak_extra_bytes'] / 2**20:10.1f}" if row["peak_extra_bytes"] is not None
           else "       n/a")
    print(f"{name:>10}  {row['median_ms']:10.3f} ms  peak extra {mib} MiB  "
          f"max |diff| {max(row['max_abs_diff']):.2e}", flush=True)
    return row


def speedups(results):
    timed = {r["impl"]: r["median_ms"] for r in results if "median_ms" in r}
    return {f"{fused}_vs_{base}": timed[base] / timed[fused]
            for fused in ("triton", "cuda") for base in ("reference", "compiled")
            if fused in timed and base in timed}


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
