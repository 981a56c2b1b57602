"""The Triton backend's ops: argument checks, registration, the seed and kpos_loss_triton.

kcl::kpos_forward_triton and kcl::kpos_backward_triton are registered here (triton_op, or
custom_op with fake kernels under TRITON_INTERPRET=1), with their autograd (kcl_ext/_autograd.py)
and autocast (kcl_ext/_amp.py) rules; their bodies call the host launchers of launch.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from .. import _amp, _autograd, _validation
from ..reference import draw_seed
from .launch import INTERPRETED, LaunchConfig, _acc_dtype, _backward, _forward, _on_device


# ----------------------------------------------------------------------------------------------
# Argument checks (the messages of csrc/kcl/checks.h) and the registered ops
# ----------------------------------------------------------------------------------------------
FORWARD_OP = "kcl::kpos_forward_triton"
BACKWARD_OP = "kcl::kpos_backward_triton"


def _check_device(query: torch.Tensor, name: str) -> None:
    if query.device.type == "cuda" or (INTERPRETED and query.device.type == "cpu"):
        return
    raise ValueError(
        f"{name}: the Triton backend needs CUDA tensors (CPU tensors only under "
        f"TRITON_INTERPRET=1, set before triton is imported), got {query.device}")


def _check_seed_tensor(seed: torch.Tensor, query: torch.Tensor, name: str) -> None:
    if (not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1
            or seed.device != query.device):
        got = (f"{seed.dtype} {list(seed.shape)} on {seed.device}"
               if isinstance(seed, torch.Tensor) else type(seed).__name__)
        raise ValueError(f"{name}: seed must be an int64 tensor of one element on "
                         f"{query.device}, got {got}")


def _check_backward_state(grad_rows, lse, positives, num_positives, target, softmax_mean, n, d,
                          k, acc, device, name: str) -> None:
    width = max(k, 0)

    def fail(what: str, t: torch.Tensor, extra: str = "") -> None:
        raise ValueError(f"{name}: {what}, got {list(t.shape)}{extra}")

    if grad_rows.dim() != 1 or grad_rows.size(0) != n:
        fail(f"grad_rows must be [N] = [{n}]", grad_rows)
    if lse.dim() != 1 or lse.size(0) != n or lse.dtype != acc:
        fail(f"lse must be [N] = [{n}] of dtype {acc}", lse, f" {lse.dtype}")
    if (positives.dim() != 2 or tuple(positives.shape) != (n, width)
            or positives.dtype != torch.int64):
        fail(f"positives must be int64 [N, max(k, 0)] = [{n}, {width}]", positives,
             f" {positives.dtype}")
    if num_positives.dim() != 1 or num_positives.size(0) != n or num_positives.dtype != torch.int64:
        fail(f"num_positives must be int64 [N] = [{n}]", num_positives, f" {num_positives.dtype}")
    if target.dim() != 2 or tuple(target.shape) != (n, d) or target.dtype != acc:
        fail(f"target must be [N, D] = [{n}, {d}] of dtype {acc}", target, f" {target.dtype}")
    if (softmax_mean.dim() != 2 or softmax_mean.size(0) not in (n, 0) or softmax_mean.size(1) != d
            or softmax_mean.dtype != acc):
        fail(f"softmax_mean must be [N, D] = [{n}, {d}] or [0, {d}] of dtype {acc}", softmax_mean,
             f" {softmax_mean.dtype}")
    for arg, t in (("grad_rows", grad_rows), ("lse", lse), ("positives", positives),
                   ("num_positives", num_positives), ("target", target),
                   ("softmax_mean", softmax_mean)):
        if t.device != device:
            raise ValueError(f"{name}: {arg} must be on query's device {device}, got {t.device}")


def _kpos_forward_impl(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor,
                       query_labels: torch.Tensor, queue_labels: torch.Tensor, seed: torch.Tensor,
                       k: int, temperature: float, query_grad: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor, torch.Tensor]:
    name = "kpos_forward_triton"
    _validation.check_inputs(query, key, queue, query_labels, queue_labels, name)
    _validation.check_k(k, name)
    _validation.check_temperature(temperature, name)
    _check_device(query, name)
    _check_seed_tensor(seed, query, name)
    n, dim = query.shape
    if n == 0:
        return _autograd.forward_fake(query, k, query_grad)
    cfg = LaunchConfig(query.device, query.dtype, dim)
    with _on_device(query.device):
        return _forward(query, key, queue, query_labels, queue_labels, seed, k,
                        float(temperature), query_grad, cfg)


def _kpos_backward_impl(grad_rows: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                        queue: torch.Tensor, query_labels: torch.Tensor, queue_labels: torch.Tensor,
                        lse: torch.Tensor, positives: torch.Tensor, num_positives: torch.Tensor,
                        target: torch.Tensor, softmax_mean: torch.Tensor, k: int,
                        temperature: float, output_mask: list[bool]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    name = "kpos_backward_triton"
    _validation.check_inputs(query, key, queue, query_labels, queue_labels, name)
    _validation.check_k(k, name)
    _validation.check_temperature(temperature, name)
    _check_device(query, name)
    n, dim = query.shape
    _check_backward_state(grad_rows, lse, positives, num_positives, target, softmax_mean, n, dim,
                          k, _acc_dtype(query.dtype), query.device, name)
    cfg = LaunchConfig(query.device, query.dtype, dim)
    with _on_device(query.device):
        return _backward(grad_rows, query, key, queue, query_labels, queue_labels, lse,
                         positives, num_positives, target, softmax_mean, k, float(temperature),
                         output_mask, cfg)


if not INTERPRETED:
    # triton_op: torch.compile traces into the launchers and sees the kernels (wrap_triton).
    triton_op(FORWARD_OP, _kpos_forward_impl, mutates_args=())
    triton_op(BACKWARD_OP, _kpos_backward_impl, mutates_args=())
else:
    # Interpreted kernels cannot be captured in a graph (wrap_triton passes them through), so under
    # TRITON_INTERPRET=1 the same launchers are registered as opaque custom ops with shape-only
    # fake kernels: torch.compile still traces calls to them without a graph break.
    torch.library.custom_op(FORWARD_OP, _kpos_forward_impl, mutates_args=())
    torch.library.custom_op(BACKWARD_OP, _kpos_backward_impl, mutates_args=())

    @torch.library.register_fake(FORWARD_OP)
    def _kpos_forward_fake(query, key, queue, query_labels, queue_labels, seed, k, temperature,
                           query_grad=False):
        name = "kpos_forward_triton"
        _validation.check_inputs(query, key, queue, query_labels, queue_labels, name)
        _validation.check_k(k, name)
        _validation.check_temperature(temperature, name)
        _check_seed_tensor(seed, query, name)
        return _autograd.forward_fake(query, k, query_grad)

    torch.library.register_fake(BACKWARD_OP)(_autograd.backward_fake)

# Inputs: query, key, queue, query_labels, queue_labels, seed, k, temperature, query_grad.
_autograd.register_forward_autograd(FORWARD_OP, torch.ops.kcl.kpos_backward_triton,
                                   k_index=6, temperature_index=7)


def _kpos_backward_backward(ctx, *grads):
    raise RuntimeError("kpos_loss: double backward (a gradient of the gradient, create_graph=True) "
                       "is not supported")


torch.library.register_autograd(BACKWARD_OP, _kpos_backward_backward)
# Under torch.autocast the op runs in float32, as the C++ ops do (kcl_ext/_amp.py).
_amp.register(FORWARD_OP)


# ----------------------------------------------------------------------------------------------
# The seed, and the public entry point (kcl_ext.kpos_loss(..., backend="triton") lands here)
# ----------------------------------------------------------------------------------------------
def _seed_on(value: int, device: torch.device) -> torch.Tensor:
    """int64 [1] holding `value` on `device`: a fill kernel with the value as its argument, so no
    host-to-device copy (which would synchronise with the host and block CUDA-graph capture)."""
    return torch.full((1,), value, dtype=torch.int64, device=device)


def _draw_seed_impl(like: torch.Tensor) -> torch.Tensor:
    return _seed_on(draw_seed(), like.device)


# An opaque op, so that torch.compile runs this very draw at run time instead of lowering it to
# its own random-number generator: compiled and eager runs select alike after torch.manual_seed.
_draw_seed = torch.library.custom_op("kcl::triton_seed", _draw_seed_impl, mutates_args=())


@_draw_seed.register_fake
def _draw_seed_fake(like):
    return like.new_empty(1, dtype=torch.int64)


def seed_tensor(seed: Optional[int], like: torch.Tensor) -> torch.Tensor:
    """The selection seed as an int64 [1] tensor on like's device, which the selection kernel reads.

    seed=None draws it on the host from torch's default CPU generator, as
    kcl_ext.reference.draw_seed does, so torch.manual_seed reproduces a run. A tensor, rather than
    a kernel argument, means no graph break under torch.compile and no recompilation per seed.
    """
    if seed is None:
        return _draw_seed(like)
    return _seed_on(seed, like.device)


def kpos_loss_triton(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor,
                     query_labels: torch.Tensor, queue_labels: torch.Tensor, *, k: int = 6,
                     temperature: "float | torch.Tensor" = 0.07, reduction: str = "mean",
                     seed: Optional[int] = None) -> torch.Tensor:
    """kcl_ext.kpos_loss on the Triton kernels (see kcl_ext.kpos_loss for the arguments)."""
    query, key, queue = _amp.autocast_features(query, key, queue)
    _validation.check_all(query, key, queue, query_labels, queue_labels, k, temperature, reduction,
                          seed)
    _check_device(query, "kpos_loss")
    query, temperature = _autograd.fold_temperature(query, temperature)
    loss_rows = torch.ops.kcl.kpos_forward_triton(
        query, key, queue, query_labels, queue_labels, seed_tensor(seed, query), k,
        temperature, _autograd.query_grad_wanted(query))[0]
    if reduction == "sum":
        loss_rows = loss_rows.sum()
    elif reduction == "mean":
        loss_rows = loss_rows.mean()
    return loss_rows.to(query.dtype)
