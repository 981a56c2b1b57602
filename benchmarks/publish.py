"""Publishes a run: `python -m benchmarks.publish runs/bench/cpu.json` (make bench-publish).

Running the suite (`make bench`, `python -m benchmarks.run`) writes only into its output folder,
which git ignores. This step turns that run's pytest-benchmark JSON into the committed flat table
benchmarks/results/<profile>.csv and its metadata <profile>.meta.json (benchmarks/results_table.py),
then renders the README's benchmark section and the plots from every table in benchmarks/results/
(`python -m benchmarks.render`). A GPU run's JSON (cuda.json, cuda-check.json) is published the
same way. The raw JSON is not copied.
"""
from __future__ import annotations

import argparse
import json
import os

from benchmarks import render, results_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def publish(run_json: str, results_dir: str, note: str | None = None) -> tuple[str, str]:
    with open(run_json) as f:
        data = json.load(f)
    if not data.get("benchmarks"):
        raise SystemExit(f"publish: {run_json} has no measured benchmark (nothing to publish)")
    rows, meta = results_table.from_pytest_benchmark(data)
    if note:
        meta["note"] = note
    if not meta.get("profile"):
        raise SystemExit(f"publish: {run_json} has no 'kcl' section with the run's profile; "
                         "expected the JSON that `python -m benchmarks.run` writes")
    return results_table.write(results_dir, rows, meta)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="pytest-benchmark JSON of `python -m benchmarks.run`")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"),
                   help="folder of the committed tables (default: benchmarks/results)")
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--no-render", action="store_true", help="write the tables only")
    p.add_argument("--note", help="the conditions of the run, in words (kept in the metadata, "
                   "shown under the machine line): e.g. what else ran on the machine")
    args = p.parse_args(argv)
    for run_json in args.runs:
        for path in publish(run_json, args.results, args.note):
            print(f"published {path}")
    if not args.no_render:
        render.main(["--results", args.results, "--readme", args.readme])


if __name__ == "__main__":
    main()
