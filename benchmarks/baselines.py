"""What users write instead of kpos_loss: the yardsticks of the speed claims.

* `dense_loss`: the loss as the official KCL code writes it: the N x (1 + Q) logits, a same-class
  mask, k random same-class picks by `topk` on random priorities, `log_softmax`, the masked mean.
  Eager, or under `torch.compile` (`compiled_dense_loss`).
* `supcon_mask_loss` (k = -1): SupCon's form: logits minus their row max, `exp` under a validity
  mask, the log of the row sum, the mean log-probability of the positives.
* `ChunkedKPos`: a careful user's chunked eager PyTorch version of kpos_loss's own algorithm
  (docs/kpos_loss.md, "How the backends compute it"): queue tiles with an online log-sum-exp,
  k = -1 through class sums, and the query's gradient accumulated in the forward (so the backward
  is elementwise when only the query needs a gradient).

The dense forms draw their own random positives; `priorities` lets a check hand them the ranks of
kpos_loss's hash instead, so that both select the same entries and the results can be compared.
"""
from __future__ import annotations

import functools

import torch

import kcl_ext
from kcl_ext import reference


def selection_priorities(query_labels, queue_labels, seed: int) -> torch.Tensor:
    """int64 [N, Q] priorities under which `topk` picks kpos_loss's positives for `seed` (the
    k highest are the k smallest ranks of the hash)."""
    n, q = query_labels.size(0), queue_labels.size(0)
    return -reference.ranks(seed, n, q, query_labels.device)


def _positive_mask(query_labels, queue_labels, k: int, priorities=None) -> torch.Tensor:
    same = (query_labels[:, None] == queue_labels[None, :]) & (queue_labels >= 0)[None, :]
    if k == -1:
        return same
    if k == 0 or queue_labels.numel() == 0:
        return torch.zeros_like(same)
    if priorities is None:
        priorities = torch.rand(same.shape, device=same.device)
    lowest = torch.iinfo(priorities.dtype).min if not priorities.is_floating_point() else -1.0
    scores = priorities.masked_fill(~same, lowest)
    picked = scores.topk(min(k, same.size(1)), dim=1).indices
    return torch.zeros_like(same).scatter_(1, picked, True) & same


def dense_loss(query, key, queue, query_labels, queue_labels, k: int, temperature: float,
               priorities=None) -> torch.Tensor:
    """The official KCL code's form (BalFeat kcl_builder + the mean over positives)."""
    own = (query * key).sum(1, keepdim=True)
    logits = torch.cat([own, query @ queue.t()], dim=1) / temperature
    valid = torch.cat([torch.ones_like(queue_labels[:1], dtype=torch.bool).expand(1),
                       queue_labels >= 0])
    logits = logits.masked_fill(~valid[None, :], float("-inf"))
    chosen = _positive_mask(query_labels, queue_labels, k, priorities)
    positives = torch.cat([torch.ones_like(chosen[:, :1]), chosen], dim=1)
    log_prob = torch.log_softmax(logits, dim=1)
    per_row = -torch.where(positives, log_prob, 0.0).sum(1) / positives.sum(1)
    return per_row.mean()


def supcon_mask_loss(query, key, queue, query_labels, queue_labels, temperature: float
                     ) -> torch.Tensor:
    """SupCon's mask form for k = -1 (every same-class entry is a positive)."""
    own = (query * key).sum(1, keepdim=True)
    anchor_dot_contrast = torch.cat([own, query @ queue.t()], dim=1) / temperature
    logits_max = anchor_dot_contrast.max(dim=1, keepdim=True).values.detach()
    logits = anchor_dot_contrast - logits_max
    valid = torch.cat([torch.ones(1, dtype=torch.bool, device=queue.device), queue_labels >= 0])
    exp_logits = torch.exp(logits) * valid[None, :]
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    same = (query_labels[:, None] == queue_labels[None, :]) & (queue_labels >= 0)[None, :]
    mask = torch.cat([torch.ones_like(same[:, :1]), same], dim=1).to(log_prob.dtype)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return -mean_log_prob_pos.mean()


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """torch.compile(fn, dynamic=True): one graph for every N and Q of a sweep."""
    return torch.compile(fn, dynamic=True)


class ChunkedKPos(torch.autograd.Function):
    """kpos_loss's algorithm in chunked eager PyTorch (reduction 'mean'); `tile` queue rows at a
    time. The positives of k > 0 come from kcl_ext.sample_positives (the same hash)."""

    @staticmethod
    def forward(ctx, query, key, queue, query_labels, queue_labels, k, temperature, seed, tile):
        acc = torch.float64 if query.dtype == torch.float64 else torch.float32
        q, kk, bank = query.to(acc) / temperature, key.to(acc), queue.to(acc)
        valid = queue_labels >= 0
        if k > 0:
            picked = kcl_ext.sample_positives(query_labels, queue_labels, k, seed)
            rows = bank[picked.clamp(min=0)] * (picked >= 0)[..., None]
            target, count = kk + rows.sum(1), 1 + (picked >= 0).sum(1)
        elif k == -1:
            classes, inverse = torch.unique(torch.cat([query_labels, queue_labels]),
                                            return_inverse=True)
            sums = torch.zeros(classes.numel(), bank.size(1), dtype=acc, device=bank.device)
            sums.index_add_(0, inverse[query.size(0):][valid], bank[valid])
            counts = torch.zeros(classes.numel(), dtype=torch.int64, device=bank.device)
            counts.index_add_(0, inverse[query.size(0):][valid], torch.ones_like(inverse[:1])
                              .expand(int(valid.sum())))
            mine = inverse[:query.size(0)]
            has = query_labels >= 0
            target = kk + torch.where(has[:, None], sums[mine], 0.0)
            count = 1 + torch.where(has, counts[mine], 0)
        else:
            target, count = kk, torch.ones(query.size(0), dtype=torch.int64, device=query.device)
        target = target / count[:, None]
        own = (q * kk).sum(1)
        run_max, run_sum = own.clone(), torch.ones_like(own)
        mean = kk.clone() if ctx.needs_input_grad[0] else None
        for start in range(0, bank.size(0), tile):
            chunk = bank[start:start + tile]
            logits = (q @ chunk.t()).masked_fill_(~valid[start:start + tile], float("-inf"))
            new_max = torch.maximum(run_max, logits.max(1).values)
            scale = torch.exp(run_max - new_max)
            probs = torch.exp(logits - new_max[:, None])
            run_sum = run_sum * scale + probs.sum(1)
            if mean is not None:
                mean = torch.addmm(mean * scale[:, None], probs, chunk)
            run_max = new_max
        lse = run_max + torch.log(run_sum)
        rows = lse - (q * target).sum(1)
        ctx.save_for_backward(q, kk, bank, valid, lse, target, count,
                              mean / run_sum[:, None] if mean is not None else lse.new_empty(0))
        ctx.temperature, ctx.tile = temperature, tile
        return rows.mean().to(query.dtype)

    @staticmethod
    def backward(ctx, grad):
        q, kk, bank, valid, lse, target, count, mean = ctx.saved_tensors
        g = grad / q.size(0) / ctx.temperature
        grad_query = grad_key = grad_queue = None
        if ctx.needs_input_grad[0]:
            grad_query = g * (mean - target)
        own_prob = torch.exp((q * kk).sum(1) - lse)
        if ctx.needs_input_grad[1]:
            grad_key = g * (own_prob - 1.0 / count)[:, None] * q * ctx.temperature
        if ctx.needs_input_grad[2]:
            raise NotImplementedError("the chunked baseline times the query's gradient only")
        return grad_query, grad_key, grad_queue, None, None, None, None, None, None


def chunked_loss(query, key, queue, query_labels, queue_labels, k: int, temperature: float,
                 seed: int, tile: int = 2048) -> torch.Tensor:
    return ChunkedKPos.apply(query, key, queue, query_labels, queue_labels, k, temperature,
                             seed, tile)
