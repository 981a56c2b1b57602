"""Where a measurement came from: the commit and the machine that benchmark JSON files record
(the pytest-benchmark suite, `make demo-loss`, `cpu_speed.py` and the GPU check's report)."""
from __future__ import annotations

import os
import platform
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git(*args) -> str | None:
    """The output of `git ARGS` in this checkout; None outside a git checkout or without git."""
    try:
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str:
    """The checked-out commit, or "unknown" outside a git checkout."""
    return git("rev-parse", "HEAD") or "unknown"


def uncommitted_changes() -> bool | None:
    """Whether tracked files differ from the commit; None when git cannot tell."""
    status = git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what `platform` knows elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
