"""Honest peak-memory measurement on the CPU: each implementation runs in a fresh subprocess, and
its peak resident set size (getrusage ru_maxrss) is compared with the same process's resident set
just before the measured call. CPU tensors have no allocator statistics like torch.cuda's, and the
RSS peak counts every allocation, ATen's, BLAS's and the kernel's own, that was touched.

Where Linux allows it (/proc/self/clear_refs, since Linux 4.0), the peak is reset after a warm-up
call, so that one-time costs (torch.compile's compilation, thread-pool start-up) are not charged to
the call. The subprocess runs with a fixed glibc mmap threshold, so that large blocks freed by the
warm-up go back to the system instead of staying resident and hiding the measured call's peak.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

# Fixed (not adaptive) glibc thresholds: blocks above 128 KiB are mmap'ed and unmapped on free.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def current_rss_bytes() -> int:
    """The resident set size now (VmRSS), or the peak where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Resets the peak RSS (and so ru_maxrss) to the current RSS; False where Linux refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_isolated(module: str, payload: dict, timeout: float = 600.0) -> dict:
    """Runs `python -m module` with `payload` as JSON on stdin; returns its JSON stdout."""
    env = dict(os.environ, **MALLOC_ENV)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", module], input=json.dumps(payload),
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
