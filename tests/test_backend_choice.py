"""backend="auto" (kcl_ext/_backend_choice.py): decided from the device, the installation and
KCL_EXT_BACKEND alone, never by timing, so every run and every rank picks the same backend and
a CUDA-graph capture or a torch.compile trace meets no synchronisation. CUDA devices are
exercised on the CPU with stand-ins; tests/test_cuda.py runs "auto" on a GPU."""
from __future__ import annotations

import pytest
import torch

import kcl_ext
from kcl_ext import _backend_choice, ops

CUDA = torch.device("cuda", 0)


@pytest.fixture
def both_available(monkeypatch):
    monkeypatch.delenv(_backend_choice.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend_choice, "available_backends", lambda: ["cuda", "triton"])


@pytest.fixture
def no_cuda_timing(monkeypatch):
    """Any event, synchronisation or stream query fails the test: what breaks a CUDA-graph
    capture and makes a choice depend on timing."""
    def forbidden(*args, **kwargs):
        raise AssertionError("backend='auto' must not time or synchronise")

    for name in ("Event", "synchronize", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, forbidden)


def inputs(n=8, q=100, d=16, requires_grad=True):
    query = torch.randn(n, d, requires_grad=requires_grad)
    return (query, torch.randn(n, d), torch.randn(q, d), torch.randint(0, 3, (n,)),
            torch.randint(0, 3, (q,)))


@pytest.mark.parametrize("available,expected", [(["cuda", "triton"], "cuda"),
                                                (["triton"], "triton"), (["cuda"], "cuda")])
def test_auto_on_cuda_is_the_preference_order_without_timing(monkeypatch, no_cuda_timing,
                                                             available, expected):
    monkeypatch.delenv(_backend_choice.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend_choice, "available_backends", lambda: available)
    for _ in range(3):  # every call, every rank: the same answer
        assert kcl_ext.resolve_backend(CUDA) == expected
        assert ops._resolve_backend("auto", CUDA) == expected
    with torch.no_grad():  # the gradients wanted do not change it either
        assert kcl_ext.resolve_backend(CUDA) == expected


def test_auto_on_cuda_is_the_same_while_compiling(both_available, no_cuda_timing, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert kcl_ext.resolve_backend(CUDA) == "cuda"


def test_kpos_loss_routes_through_the_rule(monkeypatch):
    seen = []
    real = _backend_choice._resolve

    def spy(backend, device, caller):
        seen.append((backend, device.type, caller))
        return real(backend, device, caller)

    monkeypatch.setattr(_backend_choice, "_resolve", spy)
    kcl_ext.kpos_loss(*inputs(), k=2, seed=0)
    assert seen == [("auto", "cpu", "kpos_loss")]


def test_environment_overrides(both_available, no_cuda_timing, monkeypatch):
    monkeypatch.setenv(_backend_choice.ENV_VAR, "triton")
    assert kcl_ext.resolve_backend(CUDA) == "triton"
    assert kcl_ext.resolve_backend(CUDA, "cuda") == "cuda"  # an explicit backend= wins
    monkeypatch.setenv(_backend_choice.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="environment variable KCL_EXT_BACKEND must be 'cuda', "
                                         "'triton' or 'reference', got 'tpu'"):
        kcl_ext.resolve_backend(CUDA)


def test_no_cuda_backend_says_how_to_get_one(monkeypatch):
    monkeypatch.delenv(_backend_choice.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend_choice, "available_backends", lambda: [])
    with pytest.raises(ValueError, match=r"kpos_loss: no CUDA backend is available: build kcl_ext "
                                         r"with CUDA \(FORCE_CUDA=1"):
        ops._resolve_backend("auto", CUDA)


def test_cpu_inputs_keep_the_cpu_kernel(monkeypatch):
    monkeypatch.setenv(_backend_choice.ENV_VAR, "triton")  # only consulted for CUDA inputs
    assert kcl_ext.resolve_backend(inputs()[0]) == "cpu"
    assert kcl_ext.resolve_backend("cpu", "reference") == "reference"


@pytest.mark.parametrize("backend,device,message", [
    ("tpu", "cpu", r"resolve_backend: backend must be one of \('auto', 'cpu', 'cuda', 'triton', "
                   r"'reference'\), got 'tpu'"),
    ("cuda", "cpu", "resolve_backend: backend='cuda' needs inputs on a cuda device, got cpu"),
    ("cpu", "cuda", "resolve_backend: backend='cpu' needs inputs on a cpu device, got cuda"),
    ("auto", "meta", "resolve_backend: no kpos_loss backend for device type 'meta'"),
])
def test_bad_backend_names_the_argument(backend, device, message):
    with pytest.raises(ValueError, match=message):
        kcl_ext.resolve_backend(device, backend)
