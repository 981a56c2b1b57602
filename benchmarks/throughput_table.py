"""The committed stage-1 throughput measurements: one flat CSV, benchmarks/results/throughput.csv.

  python -m benchmarks.throughput_table RUN.json... [--table benchmarks/results/throughput.csv]

Each `references/kcl/throughput.py --json RUN.json` result becomes one row, named after its file
(without `.json`); a row of the same name is replaced, the others are kept. The numbers are copied
as the JSON holds them: the summary (images/s, data-wait fraction and medians), the configuration,
the provenance (commit, versions, device, the command) and the per-step times as space-separated
lists. docs/training.md's "Stage-1 throughput on the CPU" table and its hour estimate are read from
these rows.
"""
from __future__ import annotations

import argparse
import csv
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "benchmarks", "results", "throughput.csv")
SUMMARY = ["images_per_s", "data_wait_fraction", "data_wait_ms_median", "step_ms_median_host",
           "wall_s", "steps", "warmup_steps", "global_batch", "processes"]
CONFIG = ["arch", "loss", "k", "queue_size", "image_size", "data", "num_workers", "amp",
          "channels_last", "compile", "bn_splits", "backend", "device"]
PROVENANCE = ["commit", "date", "load_average_1min", "host", "platform", "device_name",
              "device_type", "threads", "cpus", "python", "torch", "numpy", "cuda", "cudnn",
              "torchvision", "kcl_ext", "argv"]
PER_STEP = ["per_step_data_wait_ms", "per_step_host_ms"]
COLUMNS = ["run"] + SUMMARY + [f"config_{name}" for name in CONFIG] + PROVENANCE + PER_STEP


def _text(value) -> str:
    # json.load's values as JSON writes them, so that the table keeps the numbers exactly.
    return "" if value is None else json.dumps(value) if isinstance(value, bool) else str(value)


def row_from_json(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    missing = [name for name in SUMMARY + ["per_step", "config", "provenance"] if name not in data]
    if missing:
        raise ValueError(f"{path}: not a `throughput.py --json` result (missing {missing})")
    provenance = data["provenance"]
    device = provenance.get("device", {})
    versions = provenance.get("versions", {})
    row = {"run": os.path.splitext(os.path.basename(path))[0]}
    row.update({name: _text(data[name]) for name in SUMMARY})
    row.update({f"config_{name}": _text(data["config"].get(name)) for name in CONFIG})
    row.update({
        "commit": provenance.get("commit", ""), "date": provenance.get("date", ""),
        "load_average_1min": _text(provenance.get("load_average_1min")),
        "host": provenance.get("host", ""), "platform": provenance.get("platform", ""),
        "device_name": device.get("name", ""), "device_type": device.get("type", ""),
        "threads": _text(device.get("threads")), "cpus": _text(device.get("cpus")),
        "argv": " ".join(provenance.get("argv", []))})
    row.update({name: _text(versions.get(name)) for name in
                ("python", "torch", "numpy", "cuda", "cudnn", "torchvision", "kcl_ext")})
    row["per_step_data_wait_ms"] = " ".join(_text(s["data_wait_ms"]) for s in data["per_step"])
    row["per_step_host_ms"] = " ".join(_text(s["host_ms"]) for s in data["per_step"])
    return row


def read(table: str = TABLE) -> dict[str, dict]:
    """The rows by run name, as text (convert what you use: float(row["images_per_s"]))."""
    with open(table, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            raise ValueError(f"{table}: columns {reader.fieldnames} are not the expected {COLUMNS}")
        return {row["run"]: row for row in reader}


def write(rows: dict[str, dict], table: str = TABLE):
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, lineterminator="\n")
        writer.writeheader()
        for name in sorted(rows):
            writer.writerow(rows[name])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="JSON files of `references/kcl/throughput.py --json`")
    p.add_argument("--table", default=TABLE)
    args = p.parse_args(argv)
    rows = read(args.table) if os.path.exists(args.table) else {}
    for path in args.runs:
        row = row_from_json(path)
        rows[row["run"]] = row
    write(rows, args.table)
    print(f"{len(args.runs)} run(s) into {args.table} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
