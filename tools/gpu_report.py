"""The report of tools/gpu_check.sh: OUT/gpu_check.json, rewritten after every step.

    python tools/gpu_report.py OUT [--total-seconds S]     # (re)write OUT/gpu_check.json
    python tools/gpu_report.py OUT --environment           # print the versions, write
                                                           # OUT/environment.json

It gathers what the steps left in OUT: the environment (GPU, driver, Python, torch, triton, CUDA,
setuptools, pip), each step's status and time (steps.jsonl), whether the CUDA build fell back to
CPU + Triton, the test counts (tests.xml), the benchmark's JSON (<profile>.json from
benchmarks.run) with the fused kernels' speed-ups at each measured point and the GPU targets, and
the training throughput (throughput.json); plus the commit and the date.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.provenance import git, uncommitted_changes  # noqa: E402  (after the path)

# The H200 targets (docs/benchmarks.md): N=256, Q=65536, D=128, forward+backward of the query.
TARGETS = [
    # (name, fused, other, k, dtype, n, needed speed-up)
    ("bf16 vs dense eager >= 5x", ("cuda", "triton"), "dense", 6, "bfloat16", 256, 5.0),
    ("bf16 vs dense torch.compile >= 2x", ("cuda", "triton"), "dense_compiled", 6, "bfloat16",
     256, 2.0),
    ("bf16 vs inf-cl (k=0) >= 1.5x", ("cuda", "triton"), "inf_cl", 0, "bfloat16", 256, 1.5),
]
MATMUL_TARGET = 0.40   # at N=4096, of the bf16 matmul rate measured in the same run


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(*command) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    env = {"python": sys.version.split()[0], "platform": platform.platform(),
           "setuptools": _version("setuptools"), "pip": _version("pip"),
           "pytest_xdist": _version("pytest-xdist"), "inf_cl": _version("inf-cl"),
           "pytorch_metric_learning": _version("pytorch-metric-learning")}
    try:
        import torch
        env.update({"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "cudnn": torch.backends.cudnn.version()})
    except Exception as error:  # noqa: BLE001  (report what is there)
        env["torch"] = f"import failed: {error}"
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as error:  # noqa: BLE001
        env["triton"] = f"import failed: {error}"
    smi = _run("nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader")
    if smi:
        env["nvidia_smi_gpu"], env["driver"] = (part.strip() for part in
                                                smi.splitlines()[0].split(",", 1))
    nvcc = _run("nvcc", "--version")
    env["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    return env


def _steps(out: str) -> list[dict]:
    path = os.path.join(out, "steps.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _tests(out: str) -> dict | None:
    path = os.path.join(out, "tests.xml")
    if not os.path.exists(path):
        return None
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        return {"error": f"tests.xml unreadable: {error}"}
    suites = [root] if root.tag == "testsuite" else list(root)
    totals = {key: sum(int(s.get(key, 0)) for s in suites)
              for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for s in suites
              for case in s.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    totals["failed"] = failed[:50]
    return totals


def _benchmark(out: str) -> dict | None:
    from benchmarks import render
    paths = [p for p in glob.glob(os.path.join(out, "*.json"))
             if os.path.basename(p) not in ("gpu_check.json", "throughput.json",
                                            "environment.json", "build_fallback.json")]
    runs = []
    for path in paths:
        try:
            run = render.load(path)
        except (OSError, KeyError, ValueError):
            continue
        if run["rows"]:
            runs.append(run)
    if not runs:
        return None
    run = runs[0]
    points = [{key: entry[key] for key in ("fused", "k", "mode", "grads", "n", "q", "dtype",
                                           "time_s", "gemm_bound")}
              | {"speedup": {o: v["speedup"] for o, v in entry["others"].items()}}
              for entry in render.ratios(run)]
    return {"file": os.path.basename(run["path"]), "profile": run["kcl"].get("profile"),
            "ceilings": run["kcl"].get("ceilings"), "points": points,
            "targets": _targets(run, points), "skipped": len(run["kcl"].get("skipped", []))}


def _targets(run, points) -> list[dict]:
    found = []
    for name, fused_names, other, k, dtype, n, needed in TARGETS:
        for point in points:
            if (point["fused"] in fused_names and point["k"] == k and point["dtype"] == dtype
                    and point["n"] == n and point["mode"] == "forward+backward"
                    and point["grads"] == "query" and other in point["speedup"]):
                value = point["speedup"][other]
                found.append({"target": name, "fused": point["fused"], "value": value,
                              "met": value >= needed})
    rate = (run["kcl"].get("ceilings") or {}).get("matmul_gflops_bfloat16")
    for row in run["rows"]:
        if (row["impl"] in ("cuda", "triton") and row["n"] == 4096 and row["dtype"] == "bfloat16"
                and row["mode"] == "forward+backward" and rate):
            fraction = row["gflops"] / rate
            found.append({"target": "N=4096 bf16 >= 40% of the bf16 matmul rate",
                          "fused": row["impl"], "value": fraction,
                          "met": fraction >= MATMUL_TARGET})
    return found


def _json(out: str, name: str):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        return {"error": f"{name} unreadable: {error}"}


def report(out: str, total_seconds: int | None) -> dict:
    result = {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": uncommitted_changes(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": os.environ.get("KCL_GPU_DRY_RUN") == "1",
        "total_seconds": total_seconds,
        "environment": _json(out, "environment.json"),
        "steps": _steps(out),
        "build_fallback": _json(out, "build_fallback.json"),
        "tests": _tests(out),
        "benchmark": _benchmark(out),
        "throughput": _json(out, "throughput.json"),
    }
    tmp = os.path.join(out, "gpu_check.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, os.path.join(out, "gpu_check.json"))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--environment", action="store_true",
                   help="print the versions and write OUT/environment.json")
    p.add_argument("--total-seconds", type=int, default=None)
    args = p.parse_args(argv)
    if args.environment:
        env = environment()
        with open(os.path.join(args.out, "environment.json"), "w") as f:
            json.dump(env, f, indent=2)
        for key, value in env.items():
            print(f"{key:>24}: {value}")
        return 0
    result = report(args.out, args.total_seconds)
    print(json.dumps({key: result[key] for key in ("commit", "total_seconds", "steps")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
