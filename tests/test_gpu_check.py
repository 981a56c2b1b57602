"""tools/gpu_check.sh in its dry run (KCL_GPU_DRY_RUN=1): every step of the GPU check runs with
CPU stand-ins, so the script and its report cannot rot between GPU loans."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_writes_a_complete_report(tmp_path):
    env = dict(os.environ, KCL_GPU_DRY_RUN="1", PYTHON=sys.executable, BUDGET_S="300")
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["build", "tests", "benchmark", "throughput"]
    assert all(s["status"] == "passed" for s in report["steps"]), report["steps"]
    assert report["dry_run"] is True and len(report["commit"]) == 40
    environment = report["environment"]
    assert environment["torch"] and environment["triton"] and environment["setuptools"]
    assert report["tests"]["tests"] >= 2 and report["tests"]["failures"] == 0
    points = report["benchmark"]["points"]
    assert points and all(p["fused"] == "fused_cpu" and "dense" in p["speedup"] for p in points)
    assert report["throughput"]["images_per_s"] > 0
    assert "results:" in proc.stdout
