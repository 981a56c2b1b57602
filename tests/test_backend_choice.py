"""The backend="auto" rule on CUDA inputs (kcl_ext/_backend_choice.py), exercised on the CPU with
a stand-in timer: which backend wins, that the choice is cached per key and that the environment
variable overrides it. The GPU timing itself is covered by tests/test_cuda.py."""
from __future__ import annotations

import pytest
import torch

import kcl_ext  # noqa: F401  (loads the library)
from kcl_ext import _backend_choice


@pytest.fixture
def both_available(monkeypatch):
    monkeypatch.delenv(_backend_choice.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend_choice, "available_backends", lambda: ["cuda", "triton"])
    _backend_choice.clear()
    yield
    _backend_choice.clear()


def inputs(n=8, q=100, d=16, requires_grad=True):
    query = torch.randn(n, d, requires_grad=requires_grad)
    return (query, torch.randn(n, d), torch.randn(q, d), torch.zeros(n, dtype=torch.long),
            torch.zeros(q, dtype=torch.long), 6, 0.07)


class StandInTimer:
    def __init__(self, times):
        self.times = times
        self.calls = []

    def __call__(self, run, backend, *args):
        self.calls.append(backend)
        if isinstance(self.times[backend], Exception):
            raise self.times[backend]
        return self.times[backend]


def never_run(*args):
    raise AssertionError("the stand-in timer never runs a backend")


@pytest.mark.parametrize("times,expected", [({"cuda": 1.0, "triton": 2.0}, "cuda"),
                                            ({"cuda": 3.0, "triton": 2.0}, "triton"),
                                            ({"cuda": 2.0, "triton": 2.0}, "cuda")])
def test_faster_backend_wins_and_is_cached(both_available, times, expected):
    timer = StandInTimer(times)
    assert _backend_choice.choose(never_run, *inputs(), timer=timer) == expected
    assert sorted(timer.calls) == ["cuda", "triton"]
    # Same key (same buckets: 8 -> 8, 100 -> 128, 16 -> 16): no new timing, same answer.
    assert _backend_choice.choose(never_run, *inputs(q=120), timer=timer) == expected
    assert len(timer.calls) == 2
    assert list(_backend_choice.chosen_backends().values()) == [expected]


def test_new_bucket_or_grad_pattern_is_timed_again(both_available):
    timer = StandInTimer({"cuda": 1.0, "triton": 2.0})
    _backend_choice.choose(never_run, *inputs(), timer=timer)
    _backend_choice.choose(never_run, *inputs(q=129), timer=timer)
    _backend_choice.choose(never_run, *inputs(requires_grad=False), timer=timer)
    assert len(timer.calls) == 6
    assert len(_backend_choice.chosen_backends()) == 3


def test_no_grad_is_its_own_key(both_available):
    timer = StandInTimer({"cuda": 1.0, "triton": 2.0})
    _backend_choice.choose(never_run, *inputs(), timer=timer)
    with torch.no_grad():
        _backend_choice.choose(never_run, *inputs(), timer=timer)
        _backend_choice.choose(never_run, *inputs(requires_grad=False), timer=timer)
    assert len(timer.calls) == 4  # under no_grad a leaf that requires grad gets none
    assert len(_backend_choice.chosen_backends()) == 2


def test_environment_overrides(both_available, monkeypatch):
    timer = StandInTimer({"cuda": 1.0, "triton": 2.0})
    monkeypatch.setenv(_backend_choice.ENV_VAR, "triton")
    assert _backend_choice.choose(never_run, *inputs(), timer=timer) == "triton"
    assert timer.calls == []
    monkeypatch.setenv(_backend_choice.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="KCL_EXT_BACKEND must be"):
        _backend_choice.choose(never_run, *inputs(), timer=timer)


def test_single_backend_needs_no_timing(monkeypatch):
    monkeypatch.delenv(_backend_choice.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend_choice, "available_backends", lambda: ["triton"])
    timer = StandInTimer({})
    assert _backend_choice.choose(never_run, *inputs(), timer=timer) == "triton"
    monkeypatch.setattr(_backend_choice, "available_backends", lambda: [])
    with pytest.raises(ValueError, match="no CUDA backend"):
        _backend_choice.choose(never_run, *inputs(), timer=timer)
    assert timer.calls == []


def test_cpu_inputs_keep_the_cpu_kernel(monkeypatch):
    monkeypatch.setenv(_backend_choice.ENV_VAR, "triton")  # only consulted for CUDA inputs
    from kcl_ext.ops import _resolve_backend
    assert _resolve_backend("auto", torch.device("cpu"), inputs()) == "cpu"


@pytest.mark.parametrize("failing,expected", [("cuda", "triton"), ("triton", "cuda")])
def test_a_failing_backend_falls_back_to_the_other(both_available, failing, expected):
    times = {"cuda": 1.0, "triton": 2.0}
    times[failing] = RuntimeError("ptxas fatal: unsupported target")
    timer = StandInTimer(times)
    with pytest.warns(RuntimeWarning, match=f"backend='{failing}' failed on these inputs "
                                            r"\(RuntimeError: ptxas fatal"):
        assert _backend_choice.choose(never_run, *inputs(), timer=timer) == expected
    # the choice is cached: no new attempt, no new warning
    assert _backend_choice.choose(never_run, *inputs(), timer=timer) == expected
    assert len(timer.calls) == 2


def test_every_backend_failing_raises_with_both_errors(both_available):
    timer = StandInTimer({"cuda": TypeError("no float64 kernel"),
                          "triton": RuntimeError("out of resources")})
    with pytest.raises(RuntimeError, match="no CUDA backend that runs these inputs "
                                           r"\(cuda: TypeError: no float64 kernel; triton: "
                                           "RuntimeError: out of resources"):
        _backend_choice.choose(never_run, *inputs(), timer=timer)
    assert _backend_choice.chosen_backends() == {}
