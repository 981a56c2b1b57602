"""Python face of the kcl ops: fake kernels, autograd registration and the backend choice.

The schemas and the kernels are registered in C++ (csrc/); see docs/kpos_loss.md for the contract.
"""
from __future__ import annotations

import torch

from . import _library  # noqa: F401  (loads the compiled library: torch.ops.kcl.*)
from . import _amp, _autograd, _backend_choice, _validation
from .reference import draw_seed, kpos_loss_reference

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
              temperature: float | torch.Tensor = 0.07, reduction: str = "mean",
              seed: int | None = None, backend: str = "auto") -> torch.Tensor:
    """k-positive contrastive loss (KCL) of `query` against its own `key` and a labelled `queue`.

    Each query is pulled towards its own key plus `k` same-class queue entries drawn uniformly at
    random without replacement (`k=0`: MoCo's InfoNCE; `k=-1`: every same-class entry), against
    every valid queue entry:
    ``loss_i = logsumexp_j(q_i . x_j / tau) - mean_{p in P_i}(q_i . x_p / tau)`` over the own key
    and the valid queue entries. The full contract is docs/kpos_loss.md.

    Args:
        query: [N, D] float32, float16, bfloat16 or float64 features of the query encoder.
            Features are used as given and are expected L2-normalised (as in MoCo and the paper,
            `torch.nn.functional.normalize(x, dim=1)`); unnormalised features are not rejected,
            they give logits (and a loss) scaled by their norms.
        key: [N, D], query's dtype and device; row i is the other view of query i.
        queue: [Q, D], query's dtype and device: the memory bank (`MemoryBank.keys`). Q may be 0.
        query_labels: [N] integer class labels. A negative label means "no class": the query's
            only positive is its own key.
        queue_labels: [Q] integer labels; a negative label marks an empty slot, which takes no
            part (neither positive nor in the denominator).
        k: positives drawn from the queue per query, >= -1 (-1 = all same-class entries). A query
            with fewer than `k` same-class entries takes all of them.
        temperature: tau, a positive finite float, or a 0-d floating tensor (a learnable
            temperature: it then gets a gradient). A tensor's value is not checked (that would
            synchronise with the device): a non-positive or non-finite one gives a NaN loss.
        reduction: "mean" (default), "sum" or "none" (the [N] vector of per-query losses).
        seed: int seed of the positive selection (same seed, same positives on every backend);
            None draws one from torch's default CPU generator, so `torch.manual_seed` reproduces
            the run and `sample_positives(..., seed=None)` after the same `manual_seed` shows the
            positives this call draws.
        backend: "auto" (default: the CPU kernel on CPU tensors; on CUDA tensors the CUDA
            kernels when built, else Triton, never chosen by timing: `kcl_ext.resolve_backend`
            says which), "cpu", "cuda", "triton" or "reference" (the dense pure-PyTorch loss).

    Returns:
        The loss in query's dtype (float32 under autocast): a 0-d tensor for "mean" and "sum",
        [N] for "none". Differentiable in query, key, queue and a tensor temperature.

    Degenerate cases: an empty queue or one of only empty slots gives loss 0 and zero gradients
    for every row (the own key is the only logit); N = 0 gives NaN for "mean" (the mean of
    nothing), 0 for "sum" and [0] for "none". A NaN or Inf in a query or key row makes that row's
    loss and gradients non-finite; in a queue row (an empty slot included), every row's.

    Raises:
        TypeError: a tensor argument of the wrong type or dtype (e.g. float labels), a non-int k
            or seed, a temperature neither float nor tensor.
        ValueError: wrong shapes or devices, k < -1, a non-positive or non-finite float
            temperature, a temperature tensor that is not 0-d, an unknown reduction or backend,
            a seed outside int64.

    With only the query requiring a gradient (MoCo: the key from the momentum encoder, the
    queue a buffer), the backward keeps no reference to query, key or queue, so the queue may be
    changed in place (`MemoryBank.enqueue`) before `backward()`. When the key or the queue
    requires a gradient, change the queue after `backward()`; otherwise backward raises.
    """
    query, key, queue = _amp.autocast_features(query, key, queue)
    _validation.check_all(query, key, queue, query_labels, queue_labels, k, temperature, reduction,
                          seed)
    query, temperature = _autograd.fold_temperature(query, temperature)
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
                     seed: int | None = None) -> torch.Tensor:
    """The queue indices that `kpos_loss` selects as positives: for inspection and tests.

    Args:
        query_labels: [N] integer labels (negative: no class, no positive from the queue).
        queue_labels: [Q] integer labels (negative: empty slot, never selected).
        k: positives per query, >= -1 (-1 = all same-class entries).
        seed: the seed given to `kpos_loss`; None draws one from torch's default CPU generator
            exactly as `kpos_loss(..., seed=None)` does, so after the same `torch.manual_seed`
            both select the same positives.

    Returns:
        int64 [N, k] on the labels' device (for k=-1: [N, max_i |M_i|], M_i the same-class valid
        entries of query i): the selected queue indices of each row in ascending order, padded
        with -1 where a query has fewer than k same-class entries (all of them are taken).

    Raises:
        TypeError: labels not integer tensors, k or seed not an int.
        ValueError: labels not 1-D or on different devices, k < -1, seed outside int64.
    """
    _validation.check_labels(query_labels, queue_labels, name="sample_positives")
    _validation.check_k(k, "sample_positives")
    _validation.check_seed(seed, "sample_positives")
    if seed is None:
        seed = draw_seed()
    return torch.ops.kcl.sample_positives(query_labels, queue_labels, k, seed)


class KPositiveContrastiveLoss(torch.nn.Module):
    """`kpos_loss` as a module: `loss = criterion(query, key, queue, query_labels, queue_labels)`.

    Args:
        k: positives drawn from the queue per query, >= -1 (-1 = all same-class entries).
        temperature: a positive finite float, or a 0-d floating tensor; pass a
            `torch.nn.Parameter` to learn it (it is then a parameter of this module).
        reduction: "mean", "sum" or "none".
        backend: "auto", "cpu", "cuda", "triton" or "reference".

    Raises:
        TypeError, ValueError: as `kpos_loss` for a bad k, temperature, reduction or backend.

    Example::

        criterion = KPositiveContrastiveLoss(k=6, temperature=0.07)
        loss = criterion(q, k, bank.keys, labels, bank.labels)
    """

    def __init__(self, k: int = 6, temperature: float | torch.Tensor = 0.07,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.k = _validation.check_k(k, "KPositiveContrastiveLoss")
        self.temperature = _validation.check_temperature(temperature, "KPositiveContrastiveLoss",
                                                         allow_tensor=True)
        self.reduction = _validation.check_reduction(reduction, "KPositiveContrastiveLoss")
        self.backend = _backend_choice.check_name(backend, "KPositiveContrastiveLoss")

    def forward(self, query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor,
                query_labels: torch.Tensor, queue_labels: torch.Tensor,
                seed: int | None = None) -> torch.Tensor:
        """The loss of `query` against `key` and the labelled `queue`.

        Args:
            query, key: [N, D] L2-normalised features (one dtype and device).
            queue: [Q, D] memory-bank keys; queue_labels [Q] (negative = empty slot).
            query_labels: [N] integer labels (negative = no class).
            seed: selection seed; None draws one from torch's default CPU generator.

        Returns:
            As `kpos_loss` with this module's k, temperature, reduction and backend: 0-d for
            "mean"/"sum", [N] for "none". Raises as `kpos_loss` does for bad inputs.
        """
        return kpos_loss(query, key, queue, query_labels, queue_labels, k=self.k,
                         temperature=self.temperature, reduction=self.reduction, seed=seed,
                         backend=self.backend)

    def extra_repr(self) -> str:
        temperature = (f"tensor({self.temperature.detach().cpu().item():g})"
                       if isinstance(self.temperature, torch.Tensor) else self.temperature)
        return f"k={self.k}, temperature={temperature}, reduction={self.reduction!r}"
