"""Python face of the kcl ops: fake kernels, autograd registration and the backend choice.

The schemas and the kernels are registered in C++ (csrc/); see docs/kpos_loss.md for the contract.
"""
from __future__ import annotations

import torch

from . import _library  # noqa: F401  (loads the compiled library: torch.ops.kcl.*)
from . import _amp, _autograd, _backend_choice, _validation
from .reference import kpos_loss_reference

BACKENDS = _backend_choice.CHOICES


# ----------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes and dtypes only, so torch.compile and FakeTensor can trace the ops.
# ----------------------------------------------------------------------------------------------
@torch.library.register_fake("kcl::kpos_forward")
def _kpos_forward_fake(query, key, queue, query_labels, queue_labels, k, temperature, seed,
                       query_grad=False):
    _validation.check_inputs(query, key, queue, query_labels, queue_labels)
    _validation.check_k(k)
    _validation.check_temperature(temperature)
    return _autograd.forward_fake(query, k, query_grad)


torch.library.register_fake("kcl::kpos_backward")(_autograd.backward_fake)


@torch.library.register_fake("kcl::sample_positives")
def _sample_positives_fake(query_labels, queue_labels, k, seed):
    _validation.check_labels(query_labels, queue_labels, name="sample_positives")
    _validation.check_k(k, "sample_positives")
    width = k if k >= 0 else torch.library.get_ctx().new_dynamic_size()
    return query_labels.new_empty(query_labels.size(0), width, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# Autograd of kpos_forward (kpos_loss is composite over it, so it inherits this).
# ----------------------------------------------------------------------------------------------
# Inputs: query, key, queue, query_labels, queue_labels, k, temperature, seed, query_grad.
_autograd.register_forward_autograd("kcl::kpos_forward", torch.ops.kcl.kpos_backward,
                                   k_index=5, temperature_index=6)


def _kpos_backward_backward(ctx, *grads):
    raise RuntimeError("kpos_loss: double backward (a gradient of the gradient, create_graph=True) "
                       "is not supported")


torch.library.register_autograd("kcl::kpos_backward", _kpos_backward_backward)

# Under torch.autocast the op runs in float32, as PyTorch's own losses do (kcl_ext/_amp.py).
_amp.register("kcl::kpos_loss")
_amp.register("kcl::kpos_forward")


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _resolve_backend(backend: str, device: torch.device) -> str:
    # backend="auto" is decided from the device, the installation and KCL_EXT_BACKEND alone:
    # no timing, no synchronisation (kcl_ext/_backend_choice.py).
    return _backend_choice._resolve(backend, device, "kpos_loss")


def kpos_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor,
              query_labels: torch.Tensor, queue_labels: torch.Tensor, *, k: int = 6,
              temperature: float = 0.07, reduction: str = "mean", seed: int | None = None,
              backend: str = "auto") -> torch.Tensor:
    """k-positive contrastive loss (KCL) of `query` against its own `key` and a labelled `queue`.

    Each query is pulled towards its own key plus `k` same-class queue entries drawn uniformly at
    random (`k=0`: MoCo's InfoNCE, `k=-1`: all same-class entries), against every valid queue
    entry. Entries with a negative label are empty slots. See docs/kpos_loss.md for the contract.

    Args:
        query, key: [N, D] features (row i of key is the other view of query i).
        queue: [Q, D] memory-bank keys, same dtype and device.
        query_labels, queue_labels: integer class labels [N] and [Q].
        k: positives drawn from the queue per query (-1 = all same-class entries).
        temperature: softmax temperature tau > 0.
        reduction: "mean", "sum" or "none".
        seed: int seed of the positive selection; None draws one from torch's default generator.
        backend: "auto", "cpu", "cuda", "triton" or "reference".
    """
    query, key, queue = _amp.autocast_features(query, key, queue)
    _validation.check_all(query, key, queue, query_labels, queue_labels, k, temperature, reduction,
                          seed)
    temperature = float(temperature)
    chosen = _resolve_backend(backend, query.device)
    if chosen == "reference":
        return kpos_loss_reference(query, key, queue, query_labels, queue_labels, k=k,
                                   temperature=temperature, reduction=reduction, seed=seed)
    if chosen == "triton":
        from .triton import kpos_loss_triton  # imported lazily: Triton is optional
        return kpos_loss_triton(query, key, queue, query_labels, queue_labels, k=k,
                                temperature=temperature, reduction=reduction, seed=seed)
    return torch.ops.kcl.kpos_loss(query, key, queue, query_labels, queue_labels, k, temperature,
                                   reduction, seed)


def sample_positives(query_labels: torch.Tensor, queue_labels: torch.Tensor, k: int,
                     seed: int) -> torch.Tensor:
    """The queue indices that kpos_loss selects as positives for `seed`.

    Returns int64 [N, k] (for k=-1: [N, max_i |M_i|]), ascending per row, padded with -1.
    """
    _validation.check_labels(query_labels, queue_labels, name="sample_positives")
    _validation.check_k(k, "sample_positives")
    _validation.check_seed(seed, "sample_positives", allow_none=False)
    return torch.ops.kcl.sample_positives(query_labels, queue_labels, k, seed)


class KPositiveContrastiveLoss(torch.nn.Module):
    """`kpos_loss` as a module: `loss = criterion(query, key, queue, query_labels, queue_labels)`."""

    def __init__(self, k: int = 6, temperature: float = 0.07, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        self.k = _validation.check_k(k)
        self.temperature = _validation.check_temperature(temperature)
        self.reduction = _validation.check_reduction(reduction)
        if backend not in BACKENDS:
            raise ValueError(f"KPositiveContrastiveLoss: backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def forward(self, query, key, queue, query_labels, queue_labels, seed: int | None = None):
        return kpos_loss(query, key, queue, query_labels, queue_labels, k=self.k,
                         temperature=self.temperature, reduction=self.reduction, seed=seed,
                         backend=self.backend)

    def extra_repr(self) -> str:
        return f"k={self.k}, temperature={self.temperature}, reduction={self.reduction!r}"
