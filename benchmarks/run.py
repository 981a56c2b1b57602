"""Runs the kpos_loss benchmark suite and writes its JSON: `python -m benchmarks.run --device cpu`.

  python -m benchmarks.run --device cpu  --out runs/bench            # make bench (CPU subset)
  python -m benchmarks.run --device cuda --out DIR                   # the whole GPU grid
  python -m benchmarks.run --device cuda --profile cuda-check --out DIR   # tools/gpu_check.sh's
  python -m benchmarks.run --profile smoke --no-memory               # the suite itself, in seconds

The JSON (pytest-benchmark's, plus a "kcl" section with device, commit, date, the ceilings and the
skipped points) goes to OUT/<name>.json (the name defaults to the profile; default OUT:
runs/bench, ignored by git), written when the run ends. With --jsonl each point is also appended
to OUT/<name>.jsonl (one JSON line: the case, its statistics and extra_info, or the reason it was
skipped) the moment it is measured, so a run cut short keeps the points it finished
(tools/gpu_check.sh). `python -m benchmarks.publish OUT/<profile>.json` turns a run into the
committed table benchmarks/results/<profile>.csv and renders the README and plots. Extra
arguments go to pytest (e.g. `-k fused`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--profile", choices=("cpu", "cuda", "cuda-check", "smoke"), default=None,
                   help="grid of points (default: the device's; see benchmarks/grid.py)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench"),
                   help="folder of the JSON result")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--name", default=None,
                   help="base name of the result files OUT/NAME.json and OUT/NAME.jsonl "
                        "(default: the profile)")
    p.add_argument("--jsonl", action="store_true",
                   help="also append each point to OUT/NAME.jsonl as soon as it is measured")
    args, pytest_args = p.parse_known_args(argv)
    profile = args.profile or args.device
    name = args.name or profile
    if not name or os.sep in name or name.startswith("."):
        p.error(f"--name must be a plain file name without '{os.sep}', got {name!r}")
    os.makedirs(args.out, exist_ok=True)
    out_json = os.path.join(os.path.abspath(args.out), f"{name}.json")
    command = [
        os.path.join(ROOT, "benchmarks", "test_bench_kpos.py"),
        "--rootdir", ROOT, "-p", "no:cacheprovider", "-q", "-rs",
        "--bench-device", args.device, "--bench-profile", profile,
        "--benchmark-json", out_json, "--benchmark-sort", "name",
        "--benchmark-columns", "median,min,max,rounds",
    ]
    if args.no_memory:
        command.append("--bench-no-memory")
    written = out_json
    if args.jsonl:
        out_jsonl = os.path.join(os.path.abspath(args.out), f"{name}.jsonl")
        open(out_jsonl, "w").close()    # this run's points only
        command += ["--bench-results-jsonl", out_jsonl]
        written += f" and {out_jsonl}"
    started = time.perf_counter()
    code = pytest.main(command + pytest_args)
    print(f"benchmarks: {profile} on {args.device} took {time.perf_counter() - started:.0f} s; "
          f"results in {written}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
