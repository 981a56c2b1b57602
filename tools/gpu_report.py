"""The report and packing of tools/gpu_check.sh.

    python tools/gpu_report.py WORK --environment            # print the versions, write
                                                             # WORK/environment.json
    python tools/gpu_report.py WORK --preflight [--dry-run]  # check the packages the run needs
    python tools/gpu_report.py WORK --out OUT [--total-seconds S]   # pack: see below
    python tools/gpu_report.py WORK --summary                # print the summary in a few lines

WORK is the folder the steps write into: steps.jsonl (each step's status and time),
environment.json, preflight.json, build_fallback.json, NAME.log, NAME.tests.jsonl (one line per
test, tools/gpu_check_pytest.py), NAME.xml (JUnit), warmup.jsonl (tools/triton_warmup.py),
NAME.jsonl (one line per benchmark point, benchmarks/conftest.py) and NAME.json
(pytest-benchmark's), throughput.json. Packing writes two files into OUT, whatever the steps
left: gpu_check.json, the summary (commit, date, environment, the steps, the test counts and
failures, the warm-up, every measured benchmark point with the fused kernels' speed-ups and the
GPU targets, the throughput), and gpu_check.tar.gz, all of WORK. The summary reads the JSON-lines
files, which are written as results come, so a step cut short still counts what it did.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.provenance import git, uncommitted_changes  # noqa: E402  (after the path)

SUMMARY, ARCHIVE = "gpu_check.json", "gpu_check.tar.gz"
MAX_FILES, MAX_DEPTH = 8, 2          # what the lent machine hands back from OUT
MAX_PACKED_FILE = 8 * 2**20          # a larger file in WORK is listed, not packed
FUSED = ("cuda", "triton", "fused_cpu")

# (module, distribution): the test files and the benchmark import these; a missing one stops the
# run before the build. torch.library.opcheck imports expecttest.
REQUIRED = [("torch", "torch"), ("triton", "triton"), ("numpy", "numpy"), ("pytest", "pytest"),
            ("pytest_benchmark", "pytest-benchmark"), ("expecttest", "expecttest"),
            ("scipy", "scipy")]
# The test runner's helpers: without them the tests run serially / without a per-test timeout.
RUNNER = [("xdist", "pytest-xdist", "the tests run in one process"),
          ("pytest_timeout", "pytest-timeout", "no per-test timeout")]
# The benchmark's peers: without one its points are skipped, with the reason.
PEERS = [("inf_cl", "inf-cl"), ("pytorch_metric_learning", "pytorch-metric-learning"),
         ("cut_cross_entropy", "cut-cross-entropy")]

# The GPU targets (docs/benchmarks.md): N=256, Q=65536, D=128, forward+backward of the query.
TARGETS = [
    # (name, other, k, dtype, n, needed speed-up)
    ("bf16 vs dense eager >= 5x", "dense", 6, "bfloat16", 256, 5.0),
    ("bf16 vs dense torch.compile >= 2x", "dense_compiled", 6, "bfloat16", 256, 2.0),
    ("bf16 vs inf-cl (k=0) >= 1.5x", "inf_cl", 0, "bfloat16", 256, 1.5),
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
           "cpus": os.cpu_count()}
    for _, dist in REQUIRED + [(m, d) for m, d, _ in RUNNER] + PEERS:
        env[dist] = _version(dist)
    env.update({"setuptools": _version("setuptools"), "pip": _version("pip")})
    try:
        import torch
        env.update({"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "cudnn": torch.backends.cudnn.version()})
    except Exception as error:  # noqa: BLE001  (report what is there)
        env["torch"] = f"import failed: {error}"
    smi = _run("nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader")
    if smi:
        env["nvidia_smi_gpu"], env["driver"] = (part.strip() for part in
                                                smi.splitlines()[0].split(",", 1))
    nvcc = _run("nvcc", "--version")
    env["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    return env


def preflight(dry_run: bool) -> dict:
    """Which packages are there; 'missing' lists the required ones that do not import."""
    def imports(module):
        try:
            importlib.import_module(module)
            return True
        except Exception:  # noqa: BLE001  (absent or broken: either way the tests cannot use it)
            return False

    def found(module):
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False

    result = {"missing": [dist for module, dist in REQUIRED if not imports(module)],
              "runner": {dist: "found" if found(module) else f"not installed: {consequence}"
                         for module, dist, consequence in RUNNER},
              "peers": {dist: "found" if found(module) else
                        "skipped: not installed (carry its wheel in .whl/: make gpu-wheels)"
                        for module, dist in PEERS}}
    if dry_run:
        result["note"] = "dry run: the runner's helpers and the peers are optional"
    return result


# --- reading what the steps left ---------------------------------------------------------------
def _jsonl(path: str) -> list[dict]:
    """The complete lines of a JSON-lines file; a line cut by a kill is dropped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _json(path: str):
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        return {"error": f"{os.path.basename(path)} unreadable: {error}"}


def _junit(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        return {"error": f"unreadable: {error}"}
    suites = [root] if root.tag == "testsuite" else list(root)
    return {key: sum(int(s.get(key, 0)) for s in suites)
            for key in ("tests", "failures", "errors", "skipped")}


def _tests(work: str) -> dict:
    steps = {}
    for path in sorted(glob.glob(os.path.join(work, "*.tests.jsonl"))):
        name = os.path.basename(path)[:-len(".tests.jsonl")]
        lines = _jsonl(path)
        rows = [r for r in lines if r["outcome"] != "started"]
        done = {r["nodeid"] for r in rows}
        # Started and never reported: the test that hung (interrupted) or crashed its process.
        unfinished = [r["nodeid"] for r in lines if r["outcome"] == "started"
                      and r["nodeid"] not in done]
        counts = {outcome: sum(1 for r in rows if r["outcome"] == outcome)
                  for outcome in ("passed", "failed", "skipped")}
        failed = [{"test": r["nodeid"], "when": r["when"], "failure": r.get("failure", "")}
                  for r in rows if r["outcome"] == "failed"]
        skip_reasons: dict[str, int] = {}
        for r in rows:
            if r["outcome"] == "skipped":
                reason = r.get("reason", "")
                skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
        steps[name] = {"results": len(rows), **counts, "failed_tests": failed[:60],
                       "unfinished": unfinished,
                       "skip_reasons": skip_reasons, "junit": _junit(os.path.join(work,
                                                                                  f"{name}.xml"))}
    return steps


def _warmup(work: str) -> dict | None:
    rows = _jsonl(os.path.join(work, "warmup.jsonl"))
    if not rows:
        return None
    errors = [r for r in rows if "error" in r]
    return {"calls": len(rows), "failed": len(errors), "seconds": round(sum(r["seconds"]
                                                                            for r in rows), 1),
            "new_cache_entries": sum(r.get("new_cache_entries", 0) for r in rows),
            "errors": errors[:10]}


def _point(row: dict) -> dict:
    info = row.get("extra_info", {})
    point = {key: row["case"][key] for key in ("impl", "mode", "grads", "k", "n", "q", "d",
                                               "dtype")}
    point["median_s"] = row["stats"]["median"]
    for key in ("first_call_s", "timer_median_s", "peak_extra_bytes", "gflops",
                "fraction_of_matmul_ceiling", "matmul_ceiling_gflops"):
        if key in info:
            point[key] = info[key]
    return point


def _benchmark(work: str) -> dict | None:
    rows = []
    for name in ("headline", "bench_rest"):
        rows += [dict(r, file=f"{name}.jsonl")
                 for r in _jsonl(os.path.join(work, f"{name}.jsonl"))]
    if not rows:
        return None
    points = [_point(r) for r in rows if r["outcome"] == "passed" and "stats" in r]
    by_key: dict[tuple, dict[str, dict]] = {}
    for p in points:
        key = (p["mode"], p["grads"], p["k"], p["n"], p["q"], p["d"], p["dtype"])
        by_key.setdefault(key, {})[p["impl"]] = p
    speedups = []
    for key, impls in by_key.items():
        for fused in FUSED:
            if fused not in impls:
                continue
            others = {name: other["median_s"] / impls[fused]["median_s"]
                      for name, other in impls.items() if name not in FUSED}
            if others:
                mode, grads, k, n, q, d, dtype = key
                speedups.append({"fused": fused, "mode": mode, "grads": grads, "k": k, "n": n,
                                 "q": q, "d": d, "dtype": dtype,
                                 "time_s": impls[fused]["median_s"], "speedup": others})
    return {"points": points, "speedups": speedups, "targets": _targets(points, speedups),
            "skipped": [{"id": r["id"], "reason": r.get("reason", "")} for r in rows
                        if r["outcome"] == "skipped"],
            "failed": [{"id": r["id"], "failure": r.get("failure", "")} for r in rows
                       if r["outcome"] == "failed"]}


def _targets(points: list[dict], speedups: list[dict]) -> list[dict]:
    found = []
    for name, other, k, dtype, n, needed in TARGETS:
        for s in speedups:
            if (s["fused"] in ("cuda", "triton") and s["k"] == k and s["dtype"] == dtype
                    and s["n"] == n and s["mode"] == "forward+backward" and s["grads"] == "query"
                    and other in s["speedup"]):
                value = s["speedup"][other]
                found.append({"target": name, "fused": s["fused"], "value": value,
                              "met": value >= needed})
    for p in points:
        if (p["impl"] in ("cuda", "triton") and p["n"] == 4096 and p["dtype"] == "bfloat16"
                and p["mode"] == "forward+backward" and "fraction_of_matmul_ceiling" in p):
            fraction = p["fraction_of_matmul_ceiling"]
            found.append({"target": "N=4096 bf16 >= 40% of the bf16 matmul rate",
                          "fused": p["impl"], "value": fraction,
                          "met": fraction >= MATMUL_TARGET})
    return found


def report(work: str, total_seconds: int | None) -> dict:
    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": uncommitted_changes(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": os.environ.get("KCL_GPU_DRY_RUN") == "1",
        "total_seconds": total_seconds,
        "environment": _json(os.path.join(work, "environment.json")),
        "preflight": _json(os.path.join(work, "preflight.json")),
        "steps": _jsonl(os.path.join(work, "steps.jsonl")),
        "build_fallback": _json(os.path.join(work, "build_fallback.json")),
        "warmup": _warmup(work),
        "tests": _tests(work),
        "benchmark": _benchmark(work),
        "throughput": _json(os.path.join(work, "throughput.json")),
    }


# --- packing -----------------------------------------------------------------------------------
def _write_atomically(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _archive(work: str) -> tuple[bytes, list[str], list[str]]:
    packed, left_out = [], []
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for folder, _, files in os.walk(work):
            for name in sorted(files):
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, work)
                try:
                    size = os.path.getsize(path)
                    if size > MAX_PACKED_FILE:
                        left_out.append(f"{relative} ({size} bytes)")
                        continue
                    tar.add(path, arcname=os.path.join("gpu_check", relative))
                except OSError as error:   # a file that vanished or is being replaced
                    left_out.append(f"{relative} ({error})")
                    continue
                packed.append(relative)
    return buffer.getvalue(), packed, left_out


def out_problems(out: str) -> list[str]:
    """What the lent machine would not hand back from OUT: over 8 files, or too deep."""
    files, problems = [], []
    for folder, _, names in os.walk(out):
        for name in names:
            relative = os.path.relpath(os.path.join(folder, name), out)
            files.append(relative)
            if relative.count(os.sep) > MAX_DEPTH:
                problems.append(f"{relative} is more than {MAX_DEPTH} folders down")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files in OUT, at most {MAX_FILES} come back: "
                        f"{sorted(files)}")
    return problems


def pack(work: str, out: str, total_seconds: int | None) -> dict:
    os.makedirs(out, exist_ok=True)
    result = report(work, total_seconds)
    data, packed, left_out = _archive(work)
    _write_atomically(os.path.join(out, ARCHIVE), data)
    result["packed"] = {"archive": ARCHIVE, "files": packed, "left_out": left_out}
    result["out_problems"] = out_problems(out)
    _write_atomically(os.path.join(out, SUMMARY), json.dumps(result, indent=2).encode())
    for problem in result["out_problems"]:
        print(f"!! {problem}", file=sys.stderr)
    return result


def summary_lines(result: dict) -> list[str]:
    lines = [f"commit {result['commit']}  {result['date_utc']}  "
             f"gpu {(result['environment'] or {}).get('gpu')}"]
    for step in result["steps"]:
        lines.append(f"  {step['step']:<18} {step['status']} ({step['seconds']} s)")
    for name, tests in result["tests"].items():
        lines.append(f"  tests {name}: {tests['passed']} passed, {tests['failed']} failed, "
                     f"{tests['skipped']} skipped")
        lines += [f"    FAILED {f['test']}" for f in tests["failed_tests"][:20]]
        lines += [f"    UNFINISHED {test}" for test in tests["unfinished"]]
    bench = result["benchmark"] or {}
    for s in bench.get("speedups", []):
        ratios = ", ".join(f"{o} {v:.2f}x" for o, v in sorted(s["speedup"].items()))
        lines.append(f"  {s['fused']} {s['mode']} k={s['k']} N={s['n']} Q={s['q']} {s['dtype']}: "
                     f"{s['time_s'] * 1e3:.3f} ms; {ratios}")
    for t in bench.get("targets", []):
        lines.append(f"  target {t['target']} [{t['fused']}]: {t['value']:.2f} "
                     f"{'met' if t['met'] else 'NOT met'}")
    if result.get("throughput"):
        lines.append(f"  throughput: {result['throughput'].get('images_per_s')} images/s")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", help="the folder the steps write into")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--environment", action="store_true",
                      help="print the versions and write WORK/environment.json")
    what.add_argument("--preflight", action="store_true",
                      help="write WORK/preflight.json; exit status 1 if a required package "
                           "is missing")
    what.add_argument("--out", help="pack: write OUT/gpu_check.json and OUT/gpu_check.tar.gz")
    what.add_argument("--summary", action="store_true", help="print the summary")
    p.add_argument("--dry-run", action="store_true", help="with --preflight: the CPU dry run")
    p.add_argument("--total-seconds", type=int, default=None)
    args = p.parse_args(argv)
    if not os.path.isdir(args.work):
        p.error(f"WORK must be an existing folder, got {args.work!r}")
    if args.environment:
        env = environment()
        with open(os.path.join(args.work, "environment.json"), "w") as f:
            json.dump(env, f, indent=2)
        for key, value in env.items():
            print(f"{key:>24}: {value}")
        return 0
    if args.preflight:
        result = preflight(args.dry_run)
        with open(os.path.join(args.work, "preflight.json"), "w") as f:
            json.dump(result, f, indent=2)
        for dist, state in {**result["runner"], **result["peers"]}.items():
            print(f"preflight: {dist}: {state}")
        for dist in result["missing"]:
            print(f"!! preflight: {dist} is MISSING: the tests import it")
        return 1 if result["missing"] else 0
    if args.out:
        pack(args.work, args.out, args.total_seconds)
        return 0
    print("\n".join(summary_lines(report(args.work, None))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
