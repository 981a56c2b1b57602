"""pytest-benchmark set-up of the kpos_loss suite: options, the grid, ceilings, machine info.

Run it through `python -m benchmarks.run` (or `make bench`); `pytest tests/` never collects it
(pyproject's testpaths is tests/).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os

import pytest
import torch

from benchmarks import grid
from benchmarks.provenance import cpu_model, git_commit, uncommitted_changes
from benchmarks.workload import measure_ceilings

_STATE: dict = {}


def pytest_addoption(parser):
    group = parser.getgroup("kcl benchmarks")
    group.addoption("--bench-device", default="cpu", choices=("cpu", "cuda"),
                    help="device the implementations run on")
    group.addoption("--bench-profile", default=None,
                    help="grid of points: cpu, cuda, cuda-check or smoke (default: the device's)")
    group.addoption("--bench-no-memory", action="store_true",
                    help="skip the peak-memory measurement (quicker, for trying the suite)")
    group.addoption("--bench-results-jsonl", default=None, metavar="PATH",
                    help="append each point to PATH as one JSON line as soon as it is measured "
                         "or skipped (a run cut short keeps what it measured)")


def _profile(config) -> str:
    return config.getoption("--bench-profile") or config.getoption("--bench-device")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        points = grid.cases(_profile(metafunc.config))
        metafunc.parametrize("case", points, ids=[c.id for c in points])


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> str:
    return pytestconfig.getoption("--bench-device")


@pytest.fixture(scope="session")
def measure_memory(pytestconfig) -> bool:
    return not pytestconfig.getoption("--bench-no-memory")


@pytest.fixture(scope="session")
def ceilings(pytestconfig, bench_device) -> dict:
    """Measured once per run, before any benchmark, on the same machine and device."""
    if bench_device == "cuda" and not torch.cuda.is_available():
        return {}
    dtypes = sorted({getattr(torch, c.dtype) for c in grid.cases(_profile(pytestconfig))},
                    key=str)
    _STATE["ceilings"] = measure_ceilings(bench_device, dtypes)
    return _STATE["ceilings"]


def pytest_configure(config):
    # pytest-benchmark asks for the machine info when it saves the JSON, at the end of the run:
    # the load average "at start" is read here, when the run begins.
    _STATE.setdefault("load_average_at_start", list(os.getloadavg()))


def pytest_benchmark_update_machine_info(config, machine_info):
    import kcl_ext
    machine_info.update({
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": _STATE.get("load_average_at_start", list(os.getloadavg())),
        "nice": os.nice(0),   # a shared machine: run at a higher priority (nice < 0) to be heard
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "kcl_ext": kcl_ext.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    })


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["kcl"] = {
        "device": config.getoption("--bench-device"),
        "profile": _profile(config),
        "commit": git_commit(),
        "commit_dirty": uncommitted_changes(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_end": list(os.getloadavg()),
        "ceilings": _STATE.get("ceilings", {}),
        "skipped": grid.SKIPPED,
    }


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Appends the point to --bench-results-jsonl the moment its test ends: pytest-benchmark's
    own JSON is written only when the session ends, which a killed run never reaches."""
    outcome = yield
    path = item.config.getoption("--bench-results-jsonl")
    report = outcome.get_result()
    if not path or "case" not in getattr(item, "funcargs", {}):
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        entry = {"id": item.callspec.id, "outcome": report.outcome,
                 "case": dataclasses.asdict(item.funcargs["case"])}
        fixture = item.funcargs.get("benchmark")
        stats = getattr(fixture, "stats", None)
        if report.passed and stats:
            entry["stats"] = {key: getattr(stats.stats, key) for key in (
                "min", "max", "mean", "median", "stddev", "iqr", "rounds")}
            entry["extra_info"] = dict(stats.extra_info)
        elif report.skipped and isinstance(report.longrepr, tuple):
            entry["reason"] = report.longrepr[2]
        elif report.failed:
            entry["failure"] = "\n".join(str(report.longrepr).splitlines()[-15:])
        with open(path, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
