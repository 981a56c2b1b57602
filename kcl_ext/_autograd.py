"""Autograd and fake-kernel glue shared by the op families (the C++/CUDA ops, the Triton ops).

Each family has a forward op returning (loss_rows, lse, selection) and a backward op with the
schema of `kcl::kpos_backward`; only the forward's argument order differs.
"""
from __future__ import annotations

import torch


def backward_fake(grad_rows, query, key, queue, query_labels, queue_labels, lse, selection,
                  temperature, output_mask):
    """Fake kernel of a kpos backward op: a gradient not asked for comes back empty."""
    def grad_like(needed, t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed else t.new_empty(0)

    return (grad_like(output_mask[0], query), grad_like(output_mask[1], key),
            grad_like(output_mask[2], queue))


def register_forward_autograd(forward_op: str, backward_op, temperature_index: int) -> None:
    """register_autograd on `forward_op`, whose first five inputs are query, key, queue,
    query_labels, queue_labels and whose `temperature_index`-th input is the temperature; the
    backward calls `backward_op` with the saved per-row log-sum-exp and selection state."""

    def setup_context(ctx, inputs, output):
        query, key, queue, query_labels, queue_labels = inputs[:5]
        _loss_rows, lse, selection = output
        ctx.save_for_backward(query, key, queue, query_labels, queue_labels, lse, selection)
        ctx.temperature = inputs[temperature_index]
        ctx.num_inputs = len(inputs)

    def backward(ctx, grad_rows, _grad_lse, _grad_selection):
        query, key, queue, query_labels, queue_labels, lse, selection = ctx.saved_tensors
        needs = [bool(x) for x in ctx.needs_input_grad[:3]]
        no_grads = (None,) * (ctx.num_inputs - 3)
        if grad_rows is None or not any(needs):
            return (None, None, None) + no_grads
        grads = backward_op(grad_rows, query, key, queue, query_labels, queue_labels, lse,
                            selection, ctx.temperature, needs)
        return tuple(g if need else None for g, need in zip(grads, needs)) + no_grads

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
