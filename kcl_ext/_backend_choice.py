"""backend="auto": which backend `kpos_loss` runs, decided from the inputs alone.

The rule (docs/cuda_kernels.md, "Choosing the backend"):

1. CPU tensors: the C++ CPU kernel ("cpu").
2. CUDA tensors: `KCL_EXT_BACKEND=cuda|triton|reference` in the environment, if set (an explicit
   `backend=` argument always wins over it); else the CUDA kernels when the library was built with
   them; else the Triton kernels when `kcl_ext.triton` imports; else a ValueError that says how to
   get one.

Nothing is timed, cached or synchronised: the same inputs pick the same backend in every run, on
every DDP rank, inside a CUDA-graph capture and while torch.compile traces. `resolve_backend`
says which backend a call would run; to choose by speed, measure (the benchmark suite times the
CUDA and the Triton kernels side by side) and pass `backend=` explicitly.
"""
from __future__ import annotations

import os

import torch

ENV_VAR = "KCL_EXT_BACKEND"
PREFERENCE = ("cuda", "triton")
CHOICES = ("auto", "cpu", "cuda", "triton", "reference")


def cuda_kernels_available() -> bool:
    """True when the compiled library has CUDA kernels for the kpos ops."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("kcl::kpos_forward", "CUDA")


def triton_available() -> bool:
    try:
        from .triton import kpos_loss_triton  # noqa: F401
    except Exception:  # Triton missing, or kcl_ext.triton not part of this build
        return False
    return True


def available_backends() -> list[str]:
    """The CUDA-device backends of this installation, in the order "auto" prefers them."""
    found = {"cuda": cuda_kernels_available(), "triton": triton_available()}
    return [b for b in PREFERENCE if found[b]]


def check_name(backend, caller: str) -> str:
    if backend not in CHOICES:
        raise ValueError(f"{caller}: backend must be one of {CHOICES}, got {backend!r}")
    return backend


def _resolve(backend: str, device: torch.device, caller: str) -> str:
    check_name(backend, caller)
    if backend != "auto":
        if backend in ("cpu", "cuda") and device.type != backend:
            raise ValueError(f"{caller}: backend={backend!r} needs inputs on a {backend} device, "
                             f"got {device}")
        return backend
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise ValueError(f"{caller}: no kpos_loss backend for device type {device.type!r}")
    forced = os.environ.get(ENV_VAR)
    if forced:
        if forced not in ("cuda", "triton", "reference"):
            raise ValueError(f"{caller}: the environment variable {ENV_VAR} must be 'cuda', "
                             f"'triton' or 'reference', got {forced!r}")
        return forced
    candidates = available_backends()
    if not candidates:
        raise ValueError(f"{caller}: no CUDA backend is available: build kcl_ext with CUDA "
                         "(FORCE_CUDA=1 pip install .) or install Triton")
    return candidates[0]


def resolve_backend(query: torch.Tensor | torch.device | str, backend: str = "auto") -> str:
    """The backend that `kpos_loss(query, ..., backend=backend)` runs on.

    Args:
        query: the query tensor of the call (or its device).
        backend: the `backend=` argument of the call ("auto" by default).

    Returns:
        "cpu", "cuda", "triton" or "reference". For `backend="auto"`: "cpu" on CPU tensors; on
        CUDA tensors `$KCL_EXT_BACKEND` if set, else "cuda" when the CUDA kernels are built, else
        "triton". The answer depends only on the device, the installation and the environment,
        never on timing, so it is the same in every run and on every rank.

    Raises:
        ValueError: an unknown backend, a backend for another device type, or no backend for
            the device.
    """
    device = query.device if isinstance(query, torch.Tensor) else torch.device(query)
    return _resolve(backend, device, "resolve_backend")
