"""tools/gpu_check.sh on a machine without a GPU, with CPU stand-ins for its GPU commands
(KCL_GPU_DRY_RUN=1), so that the script, its cut-short behaviour and its report cannot rot
between GPU loans.

- The dry run: every step passes and the two packed files hold the whole report.
- The rehearsal (KCL_GPU_CHECK_STALL=all): every step hangs after its first result until its
  cap interrupts it (SIGINT through `timeout`, as on the GPU machine); the packing taken right
  after each step must hold that step's partial results, in at most 8 files, at most 2 folders
  down (what the lent machine hands back).
- The preflight: a package the tests import that is missing stops the run before the build.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
STEPS = ["build", "warmup", "contract", "headline", "tests_rest", "bench_rest", "throughput"]


def _run_script(out, timeout=400, **env):
    env = dict(os.environ, KCL_GPU_DRY_RUN="1", PYTHON=sys.executable, BUDGET_S="400", **env)
    return subprocess.run(["bash", SCRIPT, str(out)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _what_comes_back(out) -> list[str]:
    """The files of OUT, checked against the lent machine's limits (8 files, 2 folders down)."""
    files = [os.path.relpath(os.path.join(folder, name), out)
             for folder, _, names in os.walk(out) for name in names]
    assert len(files) <= 8, files
    assert all(f.count(os.sep) <= 2 for f in files), files
    return sorted(files)


def _packed(out) -> dict[str, bytes]:
    with tarfile.open(os.path.join(out, "gpu_check.tar.gz")) as tar:
        return {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()
                if m.isfile()}


def _lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def test_gpu_check_dry_run_writes_a_complete_report(tmp_path):
    out = tmp_path / "out"
    proc = _run_script(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _what_comes_back(out) == ["gpu_check.json", "gpu_check.tar.gz"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert [s["step"] for s in report["steps"]] == STEPS
    assert all(s["status"] == "passed" for s in report["steps"]), report["steps"]
    assert report["dry_run"] is True and len(report["commit"]) == 40
    assert report["out_problems"] == [] and report["packed"]["left_out"] == []
    environment = report["environment"]
    assert environment["torch"] and environment["triton"] and environment["setuptools"]
    assert report["preflight"]["missing"] == []
    assert report["warmup"]["calls"] == 3 and report["warmup"]["failed"] == 0
    for step, at_least in (("contract", 3), ("tests_rest", 20)):
        tests = report["tests"][step]
        assert tests["passed"] >= at_least and tests["failed"] == 0, tests
        assert tests["unfinished"] == [] and tests["junit"]["tests"] == tests["results"]
    bench = report["benchmark"]
    assert {p["mode"] for p in bench["points"]} == {"forward", "forward+backward"}
    assert bench["speedups"] and all(s["fused"] == "fused_cpu" and "dense" in s["speedup"]
                                     for s in bench["speedups"])
    assert report["throughput"]["images_per_s"] > 0
    packed = _packed(out)
    for name in ("console.log", "contract.xml", "headline.json", "headline.jsonl",
                 "bench_rest.jsonl", "warmup.jsonl", "throughput.json", "steps.jsonl"):
        assert name in packed, sorted(packed)
    assert "results:" in proc.stdout


def test_gpu_check_keeps_each_steps_partial_results_when_its_cap_interrupts_it(tmp_path):
    out, snapshots = tmp_path / "out", tmp_path / "snapshots"
    proc = _run_script(out, KCL_GPU_CHECK_STALL="all", KCL_GPU_CHECK_SNAPSHOTS=str(snapshots),
                       KCL_GPU_CHECK_STALL_CAP="90", KCL_GPU_KILL_GRACE_S="20")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert [s["step"] for s in report["steps"]] == STEPS
    # Every step was stopped by its cap's SIGINT (exit 124), not killed, and not finished.
    assert all(s["status"] == "timed out: interrupted at its limit" and s["exit"] == 124
               for s in report["steps"]), report["steps"]

    taken = sorted(os.listdir(snapshots))
    for step in STEPS:
        # The packing made right after the step, before the next one started.
        (name,) = [t for t in taken if t.endswith(f"-{step}")]
        snapshot = snapshots / name
        assert _what_comes_back(snapshot) == ["gpu_check.json", "gpu_check.tar.gz"]
        summary = json.loads((snapshot / "gpu_check.json").read_text())
        assert summary["steps"][-1]["step"] == step and summary["out_problems"] == []
        packed = _packed(snapshot)
        log = packed[f"{step}.log"].decode()
        # Interrupted in the stand-in's hang (tools/gpu_check_pytest.py), not elsewhere.
        assert "KeyboardInterrupt" in log and "gpu_check_pytest.py" in log, log[-2000:]
        if step == "build":
            assert "dry run: the existing build" in log
        elif step == "warmup":
            assert summary["warmup"]["calls"] == 1 and len(_lines(packed["warmup.jsonl"])) == 1
        elif step in ("contract", "tests_rest"):
            tests = summary["tests"][step]
            assert tests["passed"] >= 1 and tests["failed"] == 0, tests
            assert len(tests["unfinished"]) == 1, tests     # the test that hung
            junit = ElementTree.fromstring(packed[f"{step}.xml"])   # pytest's partial report
            assert any(case.get("name") for case in junit.iter("testcase")), packed[f"{step}.xml"]
        elif step in ("headline", "bench_rest"):
            points = _lines(packed[f"{step}.jsonl"])
            assert len(points) >= 1 and all(p["outcome"] == "passed" for p in points), points
            assert len(summary["benchmark"]["points"]) >= len(points)
        elif step == "throughput":
            assert summary["throughput"]["images_per_s"] > 0
    assert taken[-1].endswith("-end")


def test_gpu_check_stops_before_the_build_when_a_test_import_is_missing(tmp_path):
    # A site folder whose sitecustomize makes `import expecttest` fail, as on an image without it.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoExpecttest:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'expecttest':\n"
        "            raise ModuleNotFoundError(\"No module named 'expecttest'\")\n"
        "sys.meta_path.insert(0, _NoExpecttest())\n")
    out = tmp_path / "out"
    proc = _run_script(out, timeout=120,
                       PYTHONPATH=os.pathsep.join(filter(None, [str(site),
                                                                os.environ.get("PYTHONPATH")])))
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "expecttest is MISSING" in proc.stdout and "STOPPED" in proc.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["preflight"]["missing"] == ["expecttest"] and report["steps"] == []


def _gpu_report():
    spec = importlib.util.spec_from_file_location("gpu_report",
                                                  os.path.join(ROOT, "tools", "gpu_report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("layout,problem", [
    ([f"f{i}" for i in range(8)], None),
    ([f"f{i}" for i in range(9)], "9 files in OUT, at most 8 come back"),
    (["a/b/c"], None),
    (["a/b/c/d"], "more than 2 folders down"),
])
def test_out_problems_names_what_the_machine_would_not_hand_back(tmp_path, layout, problem):
    for relative in layout:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    problems = _gpu_report().out_problems(str(tmp_path))
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0], problems
