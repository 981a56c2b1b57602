"""Autograd, fake-kernel and autocast glue shared by the op families (the C++/CUDA ops, the
Triton ops).

Each family has a forward op returning (loss_rows, lse, positives, num_positives, target,
softmax_mean) and a backward op with the schema of `kcl::kpos_backward`; only the forward's
argument order differs. docs/kpos_loss.md, "The registered ops", describes the outputs.
"""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward_fake(query, k: int, query_grad: bool):
    """Outputs of a kpos forward op, shapes and dtypes only."""
    n, d = query.shape
    acc = acc_dtype(query.dtype)
    return (query.new_empty(n, dtype=acc), query.new_empty(n, dtype=acc),
            query.new_empty((n, max(k, 0)), dtype=torch.int64),
            query.new_empty(n, dtype=torch.int64), query.new_empty((n, d), dtype=acc),
            query.new_empty((n if query_grad else 0, d), dtype=acc))


def backward_fake(grad_rows, query, key, queue, query_labels, queue_labels, lse, positives,
                  num_positives, target, softmax_mean, k, temperature, output_mask):
    """Fake kernel of a kpos backward op: a gradient not asked for comes back empty."""
    def grad_like(needed, t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed else t.new_empty(0)

    return (grad_like(output_mask[0], query), grad_like(output_mask[1], key),
            grad_like(output_mask[2], queue))


def register_forward_autograd(forward_op: str, backward_op, k_index: int,
                              temperature_index: int) -> None:
    """register_autograd on `forward_op`, whose first five inputs are query, key, queue,
    query_labels, queue_labels and whose `k_index`-th and `temperature_index`-th inputs are k and
    the temperature; the backward calls `backward_op` with the forward's saved state."""

    def setup_context(ctx, inputs, output):
        query, key, queue, query_labels, queue_labels = inputs[:5]
        _loss_rows, lse, positives, num_positives, target, softmax_mean = output
        ctx.save_for_backward(query, key, queue, query_labels, queue_labels, lse, positives,
                              num_positives, target, softmax_mean)
        ctx.k = inputs[k_index]
        ctx.temperature = inputs[temperature_index]
        ctx.num_inputs = len(inputs)

    def backward(ctx, grad_rows, *_grads_of_state):
        saved = ctx.saved_tensors
        needs = [bool(x) for x in ctx.needs_input_grad[:3]]
        no_grads = (None,) * (ctx.num_inputs - 3)
        if grad_rows is None or not any(needs):
            return (None, None, None) + no_grads
        grads = backward_op(grad_rows, *saved, ctx.k, ctx.temperature, needs)
        return tuple(g if need else None for g, need in zip(grads, needs)) + no_grads

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def query_grad_wanted(query: torch.Tensor) -> bool:
    """Whether the query will get a gradient from this call: then the forward accumulates what the
    query's gradient needs (kpos_forward's `query_grad`)."""
    return torch.is_grad_enabled() and query.requires_grad
