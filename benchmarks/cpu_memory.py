"""Honest peak-memory measurement on the CPU: each implementation runs in a fresh subprocess, and
its peak resident set size (getrusage ru_maxrss) is compared with the same process's peak before
the measured call. CPU tensors have no allocator statistics like torch.cuda's, and the RSS peak
counts every allocation, ATen's, BLAS's and the kernel's own, that was touched.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_isolated(module: str, payload: dict, timeout: float = 600.0) -> dict:
    """Runs `python -m module` with `payload` as JSON on stdin; returns its JSON stdout."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", module], input=json.dumps(payload),
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
