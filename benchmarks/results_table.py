"""The committed form of a benchmark run: one flat CSV and a small metadata JSON.

  benchmarks/results/<profile>.csv        one row per point and implementation (COLUMNS)
  benchmarks/results/<profile>.meta.json  commit, date, machine, torch, profile, ceilings (and
                                          the publisher's note on the conditions, if any)

`from_pytest_benchmark` builds both from the JSON that `python -m benchmarks.run` writes
(pytest-benchmark's, which stays in the run's ignored output folder); `write` and `read` are the
only code that knows the file layout (`benchmarks.publish` writes, `benchmarks.render` reads).
A point the run skipped is a row too: `status` is "skipped", `skip_reason` says why, and its
timing columns are empty.
"""
from __future__ import annotations

import csv
import json
import os

# Identify the point, then what was measured, then the work and rates, then the agreement check.
POINT = ["impl", "k", "mode", "grads", "n", "q", "d", "dtype", "classes", "device", "status",
         "skip_reason"]
TIMING = ["median_s", "iqr_s", "mean_s", "stddev_s", "min_s", "max_s", "rounds", "first_call_s",
          "timer_median_s", "peak_extra_bytes", "memory_method", "threads"]
WORK = ["logits_per_row", "counted_flops", "counted_bytes", "gflops", "gbps",
        "fraction_of_matmul_ceiling", "fraction_of_copy_ceiling", "gemm_bound_s"]
AGREEMENT = ["compared_with", "check_rows", "check_tolerance", "check_loss_error",
             "check_grad_error"]
COLUMNS = POINT + TIMING + WORK + AGREEMENT
INTEGER = {"k", "n", "q", "d", "classes", "rounds", "peak_extra_bytes", "threads",
           "logits_per_row", "counted_flops", "counted_bytes", "check_rows"}
FLOAT = {"median_s", "iqr_s", "mean_s", "stddev_s", "min_s", "max_s", "first_call_s",
         "timer_median_s", "gflops", "gbps", "fraction_of_matmul_ceiling",
         "fraction_of_copy_ceiling", "gemm_bound_s", "check_tolerance", "check_loss_error",
         "check_grad_error"}
# What the metadata keeps of pytest-benchmark's machine_info (its py-cpuinfo dump is left out).
MACHINE_KEYS = ("cpu_model", "cpu_count", "torch_threads", "memory_bytes", "gpu", "torch",
                "kcl_ext", "python_implementation", "python_version", "system", "release",
                "machine", "nice", "omp_wait_policy", "load_average_at_start")
STATS = {"median_s": "median", "iqr_s": "iqr", "mean_s": "mean", "stddev_s": "stddev",
         "min_s": "min", "max_s": "max", "rounds": "rounds"}


def paths(results_dir: str, profile: str) -> tuple[str, str]:
    return (os.path.join(results_dir, f"{profile}.csv"),
            os.path.join(results_dir, f"{profile}.meta.json"))


def from_pytest_benchmark(data: dict) -> tuple[list[dict], dict]:
    """(rows, metadata) of one run's pytest-benchmark JSON (with its "kcl" section)."""
    kcl = data.get("kcl", {})
    device = kcl.get("device")
    rows, descriptions = [], {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        row = {name: info.get(name) for name in COLUMNS}
        row.update({name: bench["stats"][stat] for name, stat in STATS.items()})
        row["status"] = "measured"
        row["device"] = info.get("device", device)
        rows.append(row)
        if info.get("description"):
            descriptions[info["impl"]] = info["description"]
    for skipped in kcl.get("skipped", []):
        row = {name: skipped.get(name) if name in POINT else None for name in COLUMNS}
        row.update({"device": device, "status": "skipped", "skip_reason": skipped["reason"]})
        rows.append(row)
    machine = data.get("machine_info", {})
    meta = {"profile": kcl.get("profile"), "device": device, "commit": kcl.get("commit"),
            "commit_dirty": kcl.get("commit_dirty"),
            "date_utc": kcl.get("date_utc", data.get("datetime")),
            "machine": {key: machine[key] for key in MACHINE_KEYS if key in machine},
            "load_average_at_end": kcl.get("load_average_at_end"),
            "ceilings": kcl.get("ceilings", {}),
            "pytest_benchmark": data.get("version"),
            "implementations": dict(sorted(descriptions.items()))}
    return rows, meta


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)          # shortest text that reads back to the same float
    return str(value)


def write(results_dir: str, rows: list[dict], meta: dict) -> tuple[str, str]:
    """Writes <profile>.csv and <profile>.meta.json into `results_dir`; returns their paths."""
    if not meta.get("profile"):
        raise ValueError("results_table.write: meta must name the run's profile, got "
                         f"{meta.get('profile')!r}")
    unknown = sorted({name for row in rows for name in row} - set(COLUMNS))
    if unknown:
        raise ValueError(f"results_table.write: rows have columns outside COLUMNS: {unknown}")
    os.makedirs(results_dir, exist_ok=True)
    csv_path, meta_path = paths(results_dir, meta["profile"])
    rows = sorted(rows, key=lambda r: (r["status"] != "measured", r["impl"], r["k"], r["mode"],
                                       r.get("grads") or "", r["n"], r["q"], r["dtype"]))
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_cell(row.get(name)) for name in COLUMNS])
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    return csv_path, meta_path


def _parse(name: str, text: str):
    if text == "":
        return None
    if name in INTEGER:
        return int(text)
    if name in FLOAT:
        return float(text)
    return text


def read(csv_path: str) -> tuple[list[dict], dict]:
    """(rows, metadata) of a committed run: the CSV and the .meta.json beside it."""
    meta_path = csv_path[: -len(".csv")] + ".meta.json"
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{csv_path} has no metadata file beside it ({meta_path})")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            raise ValueError(f"{csv_path}: columns {reader.fieldnames} are not the expected "
                             f"{COLUMNS}")
        rows = [{name: _parse(name, text) for name, text in row.items()} for row in reader]
    with open(meta_path) as f:
        meta = json.load(f)
    return rows, meta
