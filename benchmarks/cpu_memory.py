"""Honest peak-memory measurement on the CPU: each implementation runs in a fresh subprocess, and
its peak resident set size (getrusage ru_maxrss) is compared with the same process's resident set
just before the measured call. CPU tensors have no allocator statistics like torch.cuda's, and the
RSS peak counts every allocation, ATen's, BLAS's and the kernel's own, that was touched.

`run_in_fresh_process` forks each measurement from a fork server that has only imported torch,
kcl_ext and the benchmark modules and computed nothing: a new process with a clean heap, without
paying torch's import once per measurement. `run_isolated` starts a whole new interpreter.

Where Linux allows it (/proc/self/clear_refs, since Linux 4.0), the peak is reset after a warm-up
call, so that one-time costs (torch.compile's compilation, thread-pool start-up) are not charged to
the call. The subprocess runs with a fixed glibc mmap threshold, so that large blocks freed by the
warm-up go back to the system instead of staying resident and hiding the measured call's peak.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import resource
import subprocess
import sys
import traceback

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


_FORK_SERVER = {}
# Imported once by the server (an ImportError, e.g. of a peer not installed, is ignored).
PRELOAD = ["torch", "kcl_ext", "benchmarks.impls", "benchmarks.loss_run",
           "pytorch_metric_learning.losses"]


def _fork_server():
    if "context" not in _FORK_SERVER:
        # The server (and so every measurement forked from it) starts with these glibc settings.
        os.environ.update(MALLOC_ENV)
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _FORK_SERVER["context"] = context
    return _FORK_SERVER["context"]


def _child(function, payload, connection):
    try:
        connection.send(("ok", function(payload)))
    except BaseException:  # noqa: BLE001  (reported to the parent, which raises)
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


def run_in_fresh_process(function, payload: dict, timeout: float = 600.0) -> dict:
    """`function(payload)` in a new process forked from the fork server; returns its result."""
    context = _fork_server()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(function, payload, sender), daemon=True)
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            raise TimeoutError(f"{function.__name__}({payload}) took more than {timeout} s")
        status, result = receiver.recv()
    except EOFError:
        status, result = "error", f"the process died (exit code {process.exitcode})"
    finally:
        if process.is_alive():
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
    if status != "ok":
        raise RuntimeError(f"{function.__name__}({payload}) failed:\n{result}")
    return result
