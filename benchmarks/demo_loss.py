"""`make demo-loss`: kpos_loss on a MoCo-sized batch, the fused CPU op beside the dense loss users
write (benchmarks/baselines.py: logits, same-class mask, topk on random priorities, log_softmax).

N=256 queries, a Q=65536 queue, D=128, k=6, float32, forward + backward (gradient of the query,
as in MoCo). Each implementation runs in its own process so that its peak memory is its own.
`make bench` has the whole comparison (the compiled dense loss, the chunked algorithm, k = -1).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import torch

from benchmarks.cpu_memory import run_isolated
from benchmarks.provenance import git_commit


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--q", type=int, nargs="+", default=[65536])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--grads", nargs="+", default=["query"], choices=["query", "key", "queue"])
    p.add_argument("--json", help="write the results to this JSON file too")
    args = p.parse_args(argv)

    rows = []
    print(f"kpos_loss forward+backward on the CPU ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}): N={args.n}, D={args.d}, "
          f"k={args.k}, float32, grad of {', '.join(args.grads)}")
    print(f"{'Q':>8} {'impl':>10} {'median ms':>10} {'peak extra MiB':>15} {'loss':>10}")
    for q in args.q:
        results = {}
        for impl in ("fused_cpu", "dense"):
            r = run_isolated("benchmarks.loss_run", {"impl": impl, "n": args.n, "q": q, "d": args.d,
                                                     "k": args.k, "repeats": args.repeats,
                                                     "grads": args.grads})
            results[impl] = r
            rows.append({"q": q, **r})
            print(f"{q:>8} {impl:>10} {r['median_s'] * 1e3:>10.1f} "
                  f"{r['peak_extra_bytes'] / 2**20:>15.1f} {r['loss']:>10.5f}")
        speedup = results["dense"]["median_s"] / results["fused_cpu"]["median_s"]
        mem = results["dense"]["peak_extra_bytes"] / max(results["fused_cpu"]["peak_extra_bytes"], 1)
        print(f"{q:>8} {'ratio':>10} {speedup:>9.1f}x {mem:>14.1f}x  (dense / fused)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "kpos_loss forward+backward, fused CPU op vs the dense loss "
                                    "users write",
                       "machine": f"{platform.processor() or platform.machine()}, "
                                  f"{os.cpu_count()} cores, torch {torch.__version__}",
                       "commit": git_commit(), "date_utc": datetime.datetime.now(
                           datetime.timezone.utc).isoformat(timespec="seconds"),
                       "load_average_1min": os.getloadavg()[0], "dtype": "float32",
                       "n": args.n, "d": args.d, "k": args.k, "grads": args.grads, "rows": rows},
                      f, indent=2)



if __name__ == "__main__":
    main()
