"""backend="auto" on a CUDA device: the CUDA kernels or the Triton kernels, whichever is faster.

The rule (docs/cuda_kernels.md, "Choosing the backend"):

1. `KCL_EXT_BACKEND=cuda|triton|reference` in the environment fixes the choice for CUDA inputs
   (an explicit `backend=` argument always wins over it).
2. If only one of the two is available (the CUDA kernels are compiled in, `kcl_ext.triton`
   imports), that one is used.
3. Otherwise the first call for a (device, dtype, shape bucket, which inputs get a gradient) key
   times both, forward plus the backward that the call will need, with a fixed seed (the
   default generator is not touched), one warm-up and the median of three timed runs, and caches
   the faster; a tie goes to "cuda". Shape buckets round N, Q and D up to powers of two. Every
   later call with that key reuses the cached choice, so the choice is fixed for the rest of the
   process.
4. A backend that raises while it is timed (a kernel that does not compile on this GPU or
   toolkit, a dtype it cannot take) is left out of that key's choice with a warning that says
   why, and the other one is used; if both raise, the call fails with both errors.
5. While torch.compile traces (no real tensors to time), a key without a cached choice takes the
   preference order ("cuda", then "triton").
"""
from __future__ import annotations

import os
import statistics
import warnings

import torch

ENV_VAR = "KCL_EXT_BACKEND"
PREFERENCE = ("cuda", "triton")
TIMED_REPEATS = 3
_TIMING_SEED = 0

_choices: dict[tuple, str] = {}


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
    found = {"cuda": cuda_kernels_available(), "triton": triton_available()}
    return [b for b in PREFERENCE if found[b]]


def _bucket(size: int) -> int:
    return 1 << max(int(size) - 1, 0).bit_length()


def choice_key(query, key, queue) -> tuple:
    n, d = query.shape
    return (query.device.type, query.device.index, query.dtype, _bucket(n), _bucket(queue.size(0)),
            _bucket(d), _needs_grad(query, key, queue))


def _needs_grad(query, key, queue) -> tuple:
    """Which of the three will get a gradient in this call (none under torch.no_grad)."""
    enabled = torch.is_grad_enabled()
    return tuple(enabled and bool(t.requires_grad) for t in (query, key, queue))


def chosen_backends() -> dict:
    """The cached choices of this process, {key: backend}."""
    return dict(_choices)


def clear() -> None:
    _choices.clear()


def time_backend(run, backend: str, query, key, queue, query_labels, queue_labels, k: int,
                 temperature: float) -> float:
    """Median milliseconds of forward (+ backward where an input needs a gradient) on `backend`.

    `run(backend, query, key, queue, query_labels, queue_labels, k, temperature, seed)` computes
    the summed loss. Works on detached copies of the leaves, so the caller's graph is untouched.
    """
    needs = _needs_grad(query, key, queue)
    leaves = [t.detach().requires_grad_(need) for t, need in zip((query, key, queue), needs)]
    wants_grad = [t for t in leaves if t.requires_grad]

    def step():
        with torch.enable_grad():
            loss = run(backend, *leaves, query_labels, queue_labels, k, temperature, _TIMING_SEED)
            if wants_grad:
                torch.autograd.grad(loss, wants_grad)

    step()  # warm-up: compiles Triton kernels, loads modules
    times = []
    for _ in range(TIMED_REPEATS):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def choose(run, query, key, queue, query_labels, queue_labels, k: int, temperature: float,
           timer=time_backend) -> str:
    """The backend that backend="auto" uses for these CUDA inputs (see the module docstring)."""
    forced = os.environ.get(ENV_VAR)
    if forced:
        if forced not in ("cuda", "triton", "reference"):
            raise ValueError(f"kpos_loss: {ENV_VAR} must be 'cuda', 'triton' or 'reference', "
                             f"got {forced!r}")
        return forced
    candidates = available_backends()
    if not candidates:
        raise ValueError("kpos_loss: no CUDA backend is available: build kcl_ext with CUDA "
                         "(FORCE_CUDA=1 pip install .) or install Triton")
    if len(candidates) == 1:
        return candidates[0]
    cache_key = choice_key(query, key, queue)
    if cache_key in _choices:
        return _choices[cache_key]
    if torch.compiler.is_compiling():
        return candidates[0]
    times, failures = {}, {}
    for backend in candidates:
        try:
            times[backend] = timer(run, backend, query, key, queue, query_labels, queue_labels, k,
                                   temperature)
        except Exception as error:  # noqa: BLE001  (any failure of one backend: try the other)
            failures[backend] = error
    if not times:
        details = "; ".join(f"{b}: {type(e).__name__}: {e}" for b, e in failures.items())
        raise RuntimeError(f"kpos_loss: backend='auto' found no CUDA backend that runs these "
                           f"inputs ({details})") from next(iter(failures.values()))
    best = min(times, key=lambda b: (times[b], candidates.index(b)))
    for backend, error in failures.items():
        warnings.warn(f"kpos_loss: backend={backend!r} failed on these inputs "
                      f"({type(error).__name__}: {error}); backend='auto' uses {best!r} for "
                      f"them (device {query.device}, {query.dtype})", RuntimeWarning,
                      stacklevel=3)
    _choices[cache_key] = best
    return best
