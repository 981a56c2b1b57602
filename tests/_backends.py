"""The backends of kpos_loss as the contract tests see them: one adapter per backend, one input
factory and one tolerance table.

A backend is unavailable (its tests skip, with the reason) where it cannot run: `cuda` needs a
CUDA GPU and kcl_ext built with its CUDA kernels; `triton` needs Triton, and runs its kernels on a
GPU when there is one, else in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import pytest
import torch

import kcl_ext
from kcl_ext import _backend_choice

BACKENDS = ("cpu", "cuda", "triton")


@functools.lru_cache(maxsize=None)
def unavailable(backend: str) -> str | None:
    """Why `backend` cannot run here, or None."""
    if backend == "cpu":
        return None
    if backend == "cuda":
        if not torch.cuda.is_available():
            return "needs a CUDA GPU"
        if not _backend_choice.cuda_kernels_available():
            return "kcl_ext was built without CUDA kernels (FORCE_CUDA=1)"
        return None
    if backend == "triton":
        # Only a missing Triton skips: a kcl_ext.triton that fails to import fails its tests.
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        return None
    raise ValueError(backend)


def device_of(backend: str) -> str:
    if backend == "cpu":
        return "cpu"
    if backend == "cuda":
        return "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"


def interpreted(backend: str) -> bool:
    """The Triton interpreter: slow, so its tests use small shapes."""
    return backend == "triton" and device_of(backend) == "cpu"


def backend_params(backends=BACKENDS):
    """pytest parameters over the backends, each skipped with its reason where it cannot run."""
    return [pytest.param(b, id=b, marks=pytest.mark.skipif(unavailable(b) is not None,
                                                           reason=str(unavailable(b))))
            for b in backends]


# ----------------------------------------------------------------------------------------------
# Tolerances against the float64 reference on the same (rounded) inputs: (atol, rtol) for the
# loss and every gradient, per (backend, dtype). rtol applies to the largest magnitude of the
# expected tensor, not element by element: a gradient element is a sum of many terms of both
# signs, and where they cancel its relative error says nothing about the kernel (the float32 dense
# reference itself is 1e-5 off there).
# ----------------------------------------------------------------------------------------------
TOLERANCES = {
    # CPU: float64 end to end; float32 products through BLAS in float32; half precision is
    # up-cast to float32 on entry, so its error is the final rounding of the outputs.
    ("cpu", torch.float64): (1e-10, 1e-10),
    ("cpu", torch.float32): (1e-5, 1e-5),
    ("cpu", torch.float16): (2e-3, 2e-3),
    ("cpu", torch.bfloat16): (2e-2, 2e-2),
    # CUDA: float32 FMA products; half precision on tensor cores with float32 accumulation, the
    # probability tile rounded to the input dtype before its product (as FlashAttention does).
    ("cuda", torch.float64): (1e-10, 1e-10),
    ("cuda", torch.float32): (1e-4, 1e-4),
    ("cuda", torch.float16): (5e-3, 5e-3),
    ("cuda", torch.bfloat16): (3e-2, 2e-2),
    # Triton: as CUDA; its float64 kernels take the scalar constants (log2(e)/tau) in float32.
    ("triton", torch.float64): (1e-8, 1e-6),
    ("triton", torch.float32): (2e-5, 1e-5),
    ("triton", torch.float16): (1e-2, 5e-3),
    ("triton", torch.bfloat16): (1e-1, 2e-2),
}


def assert_close(actual, expected, backend: str, dtype: torch.dtype, what: str) -> None:
    atol, rtol = TOLERANCES[(backend, dtype)]
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, atol=atol + rtol * scale, rtol=0.0,
                               msg=lambda m: f"{what} ({backend}, {dtype}, largest expected "
                                             f"magnitude {scale:.3g}): {m}")


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def make_inputs(n, q, d, *, dtype=torch.float32, device="cpu", classes=5, empty_fraction=0.1,
                negative_queries=0, seed=0, requires_grad=(True, True, True)):
    """Fresh random unit-norm features and labels: `empty_fraction` of the queue slots empty
    (label -1), the first `negative_queries` query rows without a class (label -3)."""
    g = torch.Generator().manual_seed(seed)

    def features(rows, grad):
        x = torch.nn.functional.normalize(torch.randn(rows, d, generator=g, dtype=torch.float64),
                                          dim=1)
        return x.to(dtype).to(device).requires_grad_(grad)

    query = features(n, requires_grad[0])
    key = features(n, requires_grad[1])
    queue = features(q, requires_grad[2])
    query_labels = torch.randint(0, classes, (n,), generator=g)
    query_labels[:negative_queries] = -3
    queue_labels = torch.randint(0, classes, (q,), generator=g)
    queue_labels[torch.rand(q, generator=g) < empty_fraction] = -1
    return query, key, queue, query_labels.to(device), queue_labels.to(device)


def grad_weights(n, dtype, device, seed=0):
    """A per-row incoming gradient != 1 (for reduction='none')."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(device)


def loss_and_grads(fn, inputs, weights=None, **kwargs):
    """fn(*inputs, **kwargs) and the gradients of (loss * weights).sum() with respect to the
    features that require grad ([] where none does)."""
    loss = fn(*inputs, **kwargs)
    leaves = [t for t in inputs[:3] if t.requires_grad]
    if not leaves:
        return loss, []
    total = (loss * weights).sum() if weights is not None else loss.sum()
    return loss, list(torch.autograd.grad(total, leaves))


def reference_float64(query, key, queue, query_labels, queue_labels, **kwargs):
    """The dense reference on the same (rounded) inputs, computed in float64; differentiable with
    respect to the original leaves."""
    return kcl_ext.kpos_loss_reference(query.double(), key.double(), queue.double(), query_labels,
                                       queue_labels, **kwargs)


# ----------------------------------------------------------------------------------------------
# The raw ops of each backend family
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ops:
    """The registered forward and backward ops of a backend, with one calling convention."""
    backend: str

    def loss(self, *inputs, **kwargs):
        return kcl_ext.kpos_loss(*inputs, backend=self.backend, **kwargs)

    def forward(self, query, key, queue, query_labels, queue_labels, k, temperature, seed,
                query_grad=False):
        if self.backend == "triton":
            from kcl_ext.triton import seed_tensor
            return torch.ops.kcl.kpos_forward_triton(query, key, queue, query_labels,
                                                     queue_labels, seed_tensor(seed, query), k,
                                                     temperature, query_grad)
        return torch.ops.kcl.kpos_forward(query, key, queue, query_labels, queue_labels, k,
                                          temperature, seed, query_grad)

    @property
    def forward_op(self):
        if self.backend == "triton":
            return torch.ops.kcl.kpos_forward_triton.default
        return torch.ops.kcl.kpos_forward.default

    @property
    def backward_op(self):
        if self.backend == "triton":
            return torch.ops.kcl.kpos_backward_triton.default
        return torch.ops.kcl.kpos_backward.default

    def forward_args(self, inputs, k, temperature, seed, query_grad=False):
        if self.backend == "triton":
            from kcl_ext.triton import seed_tensor
            return (*inputs, seed_tensor(seed, inputs[0]), k, temperature, query_grad)
        return (*inputs, k, temperature, seed, query_grad)
