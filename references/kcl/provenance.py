"""Where a result comes from: commit, versions, device, host, date (for report.json and the
throughput JSON)."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

import torch


def git_commit() -> str | None:
    """The commit of the git checkout that holds this recipe (`-dirty` when tracked files differ
    from it); None for a copy outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict:
    import numpy
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "numpy": numpy.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
           else None}
    try:
        import torchvision
        out["torchvision"] = torchvision.__version__
    except ImportError:
        out["torchvision"] = None
    import kcl_ext
    out["kcl_ext"] = kcl_ext.__version__
    return out


def device_info(device: torch.device, world_size: int = 1) -> dict:
    info = {"type": device.type, "processes": world_size}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
    else:
        info.update(name=_cpu_name(), threads=torch.get_num_threads(), cpus=os.cpu_count())
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device, world_size: int = 1) -> dict:
    out = {"commit": git_commit(), "versions": versions(),
           "device": device_info(device, world_size), "host": platform.node(),
           "platform": platform.platform(), "argv": sys.argv,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        out["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        out["load_average_1min"] = None
    return out
