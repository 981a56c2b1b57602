"""pytest plugin of the GPU check (tools/gpu_check.sh): results that survive a run cut short.

    python -m pytest -p gpu_check_pytest ...      # with tools/ on PYTHONPATH

- KCL_TEST_RESULTS=PATH: every test's start and result (node id, outcome, phase, seconds, the
  failure's last lines) are appended to PATH as JSON lines the moment they are known, and a
  failure is printed at once (`FAILED <id>`), so that a run stopped by its cap (SIGINT), killed,
  or losing its end-of-run summary still leaves the results it had, and a test that started and
  has no result is the one that hung or crashed. Under pytest-xdist only the controller writes
  (it receives every worker's reports).
- KCL_GPU_CHECK_STALL_AFTER=N (the CPU rehearsal of tools/gpu_check.sh only): after N tests have
  finished in this process, the next test hangs until the process is interrupted: a stand-in
  for a hung GPU kernel, so that the rehearsal can check what a cut keeps (stall_until_interrupted).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

_finished = 0     # tests finished in this process (the rehearsal's stall counts them)
_config = None


def _is_xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")


def _short_failure(report) -> str:
    text = str(report.longrepr) if report.longrepr is not None else ""
    return "\n".join(text.splitlines()[-15:])


def _append(path: str, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _results_path() -> str | None:
    path = os.environ.get("KCL_TEST_RESULTS")
    return None if not path or _config is None or _is_xdist_worker(_config) else path


def pytest_configure(config):
    global _config
    _config = config


def pytest_runtest_logstart(nodeid, location):
    path = _results_path()
    if path:
        _append(path, {"nodeid": nodeid, "outcome": "started"})


# First, before the terminal reporter: at a cut, the step's process group gets SIGINT (twice for
# the process that `timeout` runs), and a report that arrives while pytest shuts down may be
# printed and then lost if the second interrupt lands between the two hooks.
@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report):
    global _finished
    if report.when == "teardown":
        _finished += 1
    path = _results_path()
    if not path:
        return
    # One line per test: the call phase, or the phase that failed or skipped it.
    if report.when != "call" and report.passed:
        return
    entry = {"nodeid": report.nodeid, "outcome": report.outcome, "when": report.when,
             "seconds": round(report.duration, 4)}
    worker = getattr(getattr(report, "node", None), "gateway", None)   # set by pytest-xdist
    if worker is not None:
        entry["worker"] = worker.id
    if report.failed:
        entry["failure"] = _short_failure(report)
    elif report.skipped and isinstance(report.longrepr, tuple):
        entry["reason"] = report.longrepr[2]
    _append(path, entry)
    if report.failed:
        reporter = _config.pluginmanager.get_plugin("terminalreporter")
        line = f"FAILED {report.nodeid} ({report.when})"
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line, flush=True)


def stall_until_interrupted(what: str) -> None:
    """The rehearsal's hung step: hangs until interrupted, after telling the step's cap to end.

    tools/gpu_check.sh runs each step under `timeout`, which leads the step's process group and
    treats a SIGALRM as its limit reached: it sends SIGINT to the group, then SIGKILL after the
    grace. Sending it that SIGALRM makes the cap fire now rather than after its full length,
    which keeps the rehearsal short; if the group's leader is not `timeout`, the cap fires in
    its own time."""
    print(f"\n[rehearsal] {what} stalls until the step is interrupted", flush=True)
    leader = os.getpgid(0)
    try:
        with open(f"/proc/{leader}/comm") as f:
            leader_is_timeout = f.read().strip() == "timeout"
    except OSError:
        leader_is_timeout = False
    if leader_is_timeout and leader != os.getpid():
        os.kill(leader, signal.SIGALRM)
    while True:
        time.sleep(0.2)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    stall_after = os.environ.get("KCL_GPU_CHECK_STALL_AFTER")
    if stall_after is not None and _finished >= int(stall_after):
        stall_until_interrupted(item.nodeid)


if __name__ == "__main__":   # `python -m gpu_check_pytest stall`: the rehearsal's non-pytest hang
    if sys.argv[1:] != ["stall"]:
        sys.exit("usage: python -m gpu_check_pytest stall")
    stall_until_interrupted("the step")
