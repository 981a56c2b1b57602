"""Where a measurement came from: the commit that benchmark JSON files record."""
from __future__ import annotations

import subprocess


def git_commit() -> str:
    """The checked-out commit, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
