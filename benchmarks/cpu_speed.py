"""The fused CPU op side by side with what users write instead, in one process:
`python -m benchmarks.cpu_speed`.

For every point (N, Q, k, dtype, which gradients), D = 128, forward + backward, round-robin over
the implementations so that a change of the machine's load hits all of them alike; the median of
`--repeats` rounds:

  fused            kcl_ext.kpos_loss(backend="cpu")
  dense_eager      benchmarks.baselines.dense_loss (the official KCL code's form), eager
  dense_compiled   the same under torch.compile(dynamic=True)
  supcon_eager / supcon_compiled   SupCon's mask form (k = -1 only)
  chunked_<tile>   baselines.chunked_loss, the algorithm in chunked eager PyTorch (query
                   gradient only: it has no queue gradient)
  gemm_bound       the GEMM work the algorithm needs at the in-cache single-thread rate of a
                   128 x 1024 x 128 sgemm (measured in every round) times the thread count: two
                   products of the logits' shape when only the query needs a gradient, four with
                   all three gradients (the forward's two, the backward's recomputed logits and
                   P^T . query)

Before timing, the fused op, the dense loss (handed the fused op's positives) and the chunked
loss are checked to agree on the first 64 query rows. Dense implementations in bfloat16 are not
timed (ATen's bfloat16 matmul on a CPU without bfloat16 units is a fallback, not what a user
would keep); the bfloat16 points compare the fused op with its own float32 run.

The JSON (`--out`) records the machine, the commit, torch, the thread count, OMP_WAIT_POLICY and
the 1-minute load average before and after each point.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch

import kcl_ext
from benchmarks import baselines
from benchmarks.loss_run import make_inputs
from benchmarks.provenance import cpu_model, git_commit

TEMPERATURE = 0.07
SEED = 1234
D = 128
CHECK_ROWS = 64
GEMM_SHAPE = (128, 1024, 128)   # M, N, K of the rate probe


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores"


def gemm_rate_per_thread(seconds: float = 0.05) -> float:
    """FLOP/s of one thread on a small sgemm whose operands stay in cache (ATen -> MKL)."""
    m, n, k = GEMM_SHAPE
    a, b = torch.randn(m, k), torch.randn(k, n)
    c = torch.empty(m, n)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(3):
            torch.mm(a, b, out=c)
        reps, best = 0, float("inf")
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end or reps < 5:
            t0 = time.perf_counter()
            for _ in range(10):
                torch.mm(a, b, out=c)
            best = min(best, (time.perf_counter() - t0) / 10)
            reps += 1
    finally:
        torch.set_num_threads(threads)
    return 2 * m * n * k / best


def step(fn, inputs):
    for t in inputs[:3]:
        t.grad = None
    loss = fn(*inputs)
    loss.backward()
    return loss


def implementations(k: int, grads: str, dtype: torch.dtype, tiles, compiled: bool):
    impls = {"fused": lambda *x: kcl_ext.kpos_loss(*x, k=k, temperature=TEMPERATURE, seed=SEED,
                                                   backend="cpu")}
    if dtype != torch.float32:
        return impls
    impls["dense_eager"] = lambda *x: baselines.dense_loss(*x, k, TEMPERATURE)
    if compiled:
        dense_c = baselines.compiled(baselines.dense_loss)
        impls["dense_compiled"] = lambda *x: dense_c(*x, k, TEMPERATURE)
    if k == -1:
        impls["supcon_eager"] = lambda *x: baselines.supcon_mask_loss(*x, TEMPERATURE)
        if compiled:
            supcon_c = baselines.compiled(baselines.supcon_mask_loss)
            impls["supcon_compiled"] = lambda *x: supcon_c(*x, TEMPERATURE)
    if grads == "query":
        for tile in tiles:
            impls[f"chunked_{tile}"] = (lambda t: lambda *x: baselines.chunked_loss(
                *x, k, TEMPERATURE, SEED, tile=t))(tile)
    return impls


def check_agreement(impls, inputs, k: int, grads: str):
    """The fused op, the dense loss on the fused op's positives and the chunked loss agree on the
    first CHECK_ROWS queries (the loss is a sum of independent rows)."""
    query, key, queue, query_labels, queue_labels = inputs
    rows = min(CHECK_ROWS, query.size(0))
    want_grad = [grads == "all" and i > 0 or i == 0 for i in range(3)]
    part = (query[:rows].detach().float().requires_grad_(),
            key[:rows].detach().float().requires_grad_(want_grad[1]),
            queue.detach().float().requires_grad_(want_grad[2]),
            query_labels[:rows], queue_labels)
    leaves = [t for t in part[:3] if t.requires_grad]

    def run(fn):
        loss = fn(*part)
        return [loss.detach()] + [g.detach() for g in torch.autograd.grad(loss, leaves)]

    fused = run(lambda *x: kcl_ext.kpos_loss(*x, k=k, temperature=TEMPERATURE, seed=SEED,
                                             backend="cpu"))
    priorities = baselines.selection_priorities(part[3], part[4], SEED)
    checks = {"dense": run(lambda *x: baselines.dense_loss(*x, k, TEMPERATURE, priorities))}
    for name in impls:
        if name.startswith("chunked_"):
            checks[name] = run(impls[name])
            break
    errors = {}
    for name, got in checks.items():
        worst = 0.0
        for a, b in zip(fused, got):
            scale = float(b.abs().max().clamp(min=1e-12))
            worst = max(worst, float((a.double() - b.double()).abs().max()) / scale)
        tol = 1e-4 if query.dtype == torch.float32 else 3e-2
        assert worst <= tol, f"fused vs {name}: relative error {worst:.3g} above {tol}"
        errors[name] = worst
    return errors


def measure_point(n, q, k, dtype, grads, args):
    requires = ("query",) if grads == "query" else ("query", "key", "queue")
    inputs = make_inputs(n, q, D, dtype, classes=args.classes, grads=requires)
    impls = implementations(k, grads, dtype, args.tiles, not args.no_compiled)
    if n * q > 2 ** args.dense_budget:
        impls = {name: fn for name, fn in impls.items()
                 if not name.startswith(("dense", "supcon"))}
    errors = check_agreement(impls, inputs, k, grads) if dtype == torch.float32 else {}
    load_before = os.getloadavg()[0]
    for fn in impls.values():   # warm-up (and compilation)
        step(fn, inputs)
    times = {name: [] for name in impls}
    rates = []
    for _ in range(args.repeats):
        rates.append(gemm_rate_per_thread())
        for name, fn in impls.items():
            t0 = time.perf_counter()
            step(fn, inputs)
            times[name].append(time.perf_counter() - t0)
    gemms = 2 if grads == "query" else 4
    flops = gemms * 2 * n * q * D
    rate = statistics.median(rates) * torch.get_num_threads()
    medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    medians["gemm_bound"] = flops / rate * 1e3
    return {"n": n, "q": q, "d": D, "k": k, "dtype": str(dtype).removeprefix("torch."),
            "grads": grads, "repeats": args.repeats, "median_ms": medians,
            "all_ms": {name: [t * 1e3 for t in ts] for name, ts in times.items()},
            "gemm_rate_gflops_per_thread": statistics.median(rates) / 1e9,
            "gemms_in_bound": gemms, "agreement_relative_error": errors,
            "load_average_1min": [load_before, os.getloadavg()[0]]}


def ratios(point) -> dict:
    m = point["median_ms"]
    fused = m["fused"]
    out = {}
    for name, value in m.items():
        if name != "fused":
            out[f"{name}/fused"] = value / fused
    chunked = [v for name, v in m.items() if name.startswith("chunked_")]
    if chunked:
        out["best_chunked/fused"] = min(chunked) / fused
    compiled = [v for name, v in m.items() if name.endswith("_compiled")]
    if compiled:
        out["best_compiled/fused"] = min(compiled) / fused
    out["fused/gemm_bound"] = fused / m["gemm_bound"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[256])
    p.add_argument("--q", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--k", type=int, nargs="+", default=[6, -1])
    p.add_argument("--dtype", nargs="+", default=["float32"],
                   choices=["float32", "bfloat16", "float16"])
    p.add_argument("--grads", nargs="+", default=["query"], choices=["query", "all"])
    p.add_argument("--tiles", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dense-budget", type=int, default=26,
                   help="log2 of the largest N*Q the dense losses are run at")
    p.add_argument("--no-compiled", action="store_true")
    p.add_argument("--out", help="JSON file of the results")
    args = p.parse_args(argv)

    header = {"benchmark": "kpos_loss forward+backward on the CPU, side by side in one process",
              "machine": machine(), "commit": git_commit(), "torch": torch.__version__,
              "threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
              "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "temperature": TEMPERATURE, "classes": args.classes, "points": []}
    print(f"{header['machine']}; torch {header['torch']}, {header['threads']} threads, "
          f"commit {header['commit'][:10]}")
    for grads in args.grads:
        for dtype_name in args.dtype:
            dtype = getattr(torch, dtype_name)
            for n in args.n:
                for k in args.k:
                    for q in args.q:
                        point = measure_point(n, q, k, dtype, grads, args)
                        point["ratios"] = ratios(point)
                        header["points"].append(point)
                        m = point["median_ms"]
                        print(f"\nN={n} Q={q} k={k} {dtype_name} grads={grads} "
                              f"load {point['load_average_1min'][0]:.2f}->"
                              f"{point['load_average_1min'][1]:.2f}")
                        for name, value in m.items():
                            print(f"  {name:>16} {value:9.2f} ms  "
                                  f"{value / m['fused']:6.2f}x of fused")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(header, f, indent=1)
        print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
