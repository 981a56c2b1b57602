"""backend="auto": which backend `kpos_loss` runs, decided from the inputs alone.

The rule (docs/cuda_kernels.md, "Choosing the backend"):

1. CPU tensors: the C++ CPU kernel ("cpu").
2. CUDA tensors: `KCL_EXT_BACKEND=cuda|triton|reference` in the environment, if set (an explicit
   `backend=` argument always wins over it); else the CUDA kernels when the library was built with
   them; else the Triton kernels when `kcl_ext.triton` imports; else a ValueError that says how to
   get one.

Nothing is timed, cached or synchronised: the same inputs pick the same backend in every run, on
every DDP rank, inside a CUDA-graph capture and while torch.compile traces. `resolve_backend`
says which backend a call would run; `time_backends` measures the candidates on the caller's
inputs, an explicit opt-in whose winner is then passed as `backend=`.
"""
from __future__ import annotations

import os
import statistics
import time

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


def _resolve(backend: str, device: torch.device, caller: str) -> str:
    if backend not in CHOICES:
        raise ValueError(f"{caller}: backend must be one of {CHOICES}, got {backend!r}")
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


def time_backends(query, key, queue, query_labels, queue_labels, *, k: int = 6,
                  temperature: float = 0.07, backends=None, repeats: int = 3,
                  seed: int = 0) -> dict:
    """Median milliseconds of `kpos_loss` on each backend for these inputs: an explicit opt-in
    for choosing `backend=` by measurement ("auto" never times).

    Each backend runs the forward and the backward that these inputs need (the gradients of those
    of query, key and queue that require grad), on detached copies, so the caller's graph is
    untouched; one warm-up run (it compiles Triton kernels), then `repeats` timed runs. On CUDA
    the runs are timed with events on the current stream of the inputs' device, inside
    `torch.cuda.device(query.device)`; this synchronises, so do not call it during a CUDA-graph
    capture or under torch.compile.

    Args:
        query, key, queue, query_labels, queue_labels, k, temperature: as `kpos_loss`.
        backends: the backends to time; default: those `available_backends()` lists for CUDA
            inputs, ("cpu",) for CPU inputs.
        repeats: timed runs per backend (the median is returned).
        seed: the seed of the positive selection in every run (torch's generator is untouched).

    Returns:
        {backend: median milliseconds}, fastest first. A backend that raises is left out with
        a RuntimeWarning that says why.

    Raises:
        RuntimeError: every backend raised (the message holds each error).
    """
    import warnings

    from .ops import kpos_loss

    device = query.device
    if backends is None:
        backends = available_backends() if device.type == "cuda" else ["cpu"]
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"time_backends: repeats must be a positive int, got {repeats!r}")
    enabled = torch.is_grad_enabled()
    leaves = [t.detach().requires_grad_(enabled and t.requires_grad) for t in (query, key, queue)]
    wanted = [t for t in leaves if t.requires_grad]

    def step(backend):
        with torch.enable_grad():
            loss = kpos_loss(*leaves, query_labels, queue_labels, k=k, temperature=temperature,
                             reduction="sum", seed=seed, backend=backend)
            if wanted:
                torch.autograd.grad(loss, wanted)

    def timed(backend) -> float:
        if device.type != "cuda":
            step(backend)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                step(backend)
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        with torch.cuda.device(device):
            step(backend)
            times = []
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                step(backend)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)

    results, failures = {}, {}
    for backend in backends:
        try:
            results[backend] = timed(backend)
        except Exception as error:  # noqa: BLE001  (report it, time the others)
            failures[backend] = error
    if not results:
        details = "; ".join(f"{b}: {type(e).__name__}: {e}" for b, e in failures.items())
        raise RuntimeError(f"time_backends: no backend ran these inputs ({details})") from (
            next(iter(failures.values())) if failures else None)
    for backend, error in failures.items():
        warnings.warn(f"time_backends: backend={backend!r} failed on these inputs "
                      f"({type(error).__name__}: {error})", RuntimeWarning, stacklevel=2)
    return dict(sorted(results.items(), key=lambda item: item[1]))
