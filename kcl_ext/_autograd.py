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
        ctx.k = inputs[k_index]
        ctx.temperature = inputs[temperature_index]
        ctx.num_inputs = len(inputs)
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        ctx.rows_only = needs == (True, False, False) and softmax_mean.size(0) == query.size(0)
        if ctx.rows_only:
            # Only the query's gradient, and the forward accumulated the softmax mean: the
            # backward is elementwise in per-row state (d query_i = g_i / tau (m_i - t_i)), so
            # query, key and queue are not kept. MoCo's order (loss, enqueue into the queue in
            # place, backward) then works.
            ctx.query_dtype = query.dtype
            ctx.save_for_backward(target, softmax_mean)
            return
        ctx.save_for_backward(query, key, queue, query_labels, queue_labels, lse, positives,
                              num_positives, target, softmax_mean)

    def backward(ctx, grad_rows, *_grads_of_state):
        needs = [bool(x) for x in ctx.needs_input_grad[:3]]
        no_grads = (None,) * (ctx.num_inputs - 3)
        if grad_rows is None or not any(needs):
            return (None, None, None) + no_grads
        if ctx.rows_only:
            target, softmax_mean = ctx.saved_tensors
            return (query_grad_from_rows(grad_rows, target, softmax_mean, ctx.temperature,
                                         ctx.query_dtype), None, None) + no_grads
        saved = saved_or_explain(ctx)
        grads = backward_op(grad_rows, *saved, ctx.k, ctx.temperature, needs)
        return tuple(g if need else None for g, need in zip(grads, needs)) + no_grads

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def query_grad_from_rows(grad_rows, target, softmax_mean, temperature: float, dtype):
    """d query = g_i / tau * (m_i - t_i), as the kernels compute it (kcl::kpos_backward)."""
    scale = grad_rows.to(target.dtype) * (1.0 / temperature)
    return ((softmax_mean - target) * scale[:, None]).to(dtype)


IN_PLACE_MESSAGE = (
    "kpos_loss: the queue (or the query or key) was changed in place between the loss and "
    "backward(), and the gradient of the key or the queue needs its values at the time of the "
    "loss. With kcl_ext.MemoryBank, call MemoryBank.enqueue after loss.backward(), or let only "
    "the query require grad (key from the momentum encoder, queue a buffer: MoCo's own order, "
    "loss, enqueue, backward, then works).")


def saved_or_explain(ctx):
    """ctx.saved_tensors, with autograd's in-place error explained in the terms of kpos_loss."""
    try:
        return ctx.saved_tensors
    except RuntimeError as error:
        if "modified by an inplace operation" in str(error):
            raise RuntimeError(f"{IN_PLACE_MESSAGE} (autograd: {error})") from None
        raise


def query_grad_wanted(query: torch.Tensor) -> bool:
    """Whether the query will get a gradient from this call: then the forward accumulates what the
    query's gradient needs (kpos_forward's `query_grad`)."""
    return torch.is_grad_enabled() and query.requires_grad


def fold_temperature(query: torch.Tensor, temperature) -> tuple[torch.Tensor, float]:
    """(query, float temperature) for the kernels. A tensor temperature is folded into the query:
    loss(q, tau) = loss(q / tau, 1), so the kernels run at tau = 1 on the scaled query and
    autograd of the division gives d loss / d tau = -sum_i g_i q_i . (m_i - t_i) / tau^2 from
    the query's per-row gradient (docs/kpos_loss.md, "A learnable temperature"). A tau that is
    not positive and finite becomes NaN on the device (checked without a host synchronisation),
    so the loss is NaN. The division is rounded to query's dtype."""
    if not isinstance(temperature, torch.Tensor):
        return query, float(temperature)
    usable = torch.isfinite(temperature) & (temperature > 0)
    tau = torch.where(usable, temperature, torch.full_like(temperature, float("nan")))
    return (query / tau).to(query.dtype), 1.0
