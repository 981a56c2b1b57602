"""pytest-benchmark set-up of the kpos_loss suite: options, the grid, ceilings, machine info.

Run it through `python -m benchmarks.run` (or `make bench`); `pytest tests/` never collects it
(pyproject's testpaths is tests/).
"""
from __future__ import annotations

import datetime
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


def pytest_benchmark_update_machine_info(config, machine_info):
    import kcl_ext
    machine_info.update({
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
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
