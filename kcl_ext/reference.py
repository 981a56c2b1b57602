"""The dense pure-PyTorch kpos_loss: the ground truth every backend is tested against.

It materialises the N x Q logits and the N x Q selection, and reads like docs/kpos_loss.md.
Use it for tests and small problems; `kcl_ext.kpos_loss` is the fused op.
"""
from __future__ import annotations

import torch

from . import _amp, _validation

MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2^32 for x in [0, 2^32), without overflowing int64."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def mix32(x):
    """lowbias32 on uint32 values held in Python ints or int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def seed_key(seed: int) -> int:
    s = seed & 0xFFFFFFFFFFFFFFFF  # two's-complement 64-bit word
    lo, hi = s & MASK32, s >> 32
    return mix32(lo ^ mix32((hi + 0x9E3779B9) & MASK32))


def row_keys(seed: int, n: int, device=None) -> torch.Tensor:
    """row_key(seed, i) for i in [0, n), as int64 [n]."""
    i = torch.arange(n, dtype=torch.int64, device=device)
    return mix32(seed_key(seed) ^ mix32((i + 0x85EBCA6B) & MASK32))


def ranks(seed: int, n: int, q: int, device=None) -> torch.Tensor:
    """rank(seed, i, j) for every query row i and queue index j, as int64 [n, q]."""
    j = torch.arange(q, dtype=torch.int64, device=device)
    return mix32(row_keys(seed, n, device)[:, None] ^ (j[None, :] & MASK32))


def same_class_mask(query_labels: torch.Tensor, queue_labels: torch.Tensor) -> torch.Tensor:
    """M: [N, Q] bool, queue entry j is valid (label >= 0) and has query i's label."""
    ql = query_labels.to(torch.int64)
    kl = queue_labels.to(torch.int64)
    return (ql[:, None] == kl[None, :]) & (kl[None, :] >= 0)


def selection_mask(query_labels, queue_labels, k: int, seed: int) -> torch.Tensor:
    """S: [N, Q] bool, the min(k, |M_i|) entries of M_i with the smallest rank."""
    match = same_class_mask(query_labels, queue_labels)
    n, q = match.shape
    if k == -1:
        return match
    if k == 0 or q == 0:
        return torch.zeros_like(match)
    not_a_candidate = 2**32  # larger than every rank
    candidate_rank = torch.where(match, ranks(seed, n, q, match.device), not_a_candidate)
    kth = candidate_rank.topk(min(k, q), dim=1, largest=False).values[:, -1:]
    return match & (candidate_rank <= kth)


def sample_positives_reference(query_labels, queue_labels, k: int, seed: int) -> torch.Tensor:
    """The selected queue indices, ascending, -1 padded: [N, k] ([N, max |M_i|] for k = -1)."""
    _validation.check_labels(query_labels, queue_labels, name="sample_positives")
    _validation.check_k(k, "sample_positives")
    _validation.check_seed(seed, "sample_positives", allow_none=False)
    sel = selection_mask(query_labels, queue_labels, k, seed)
    n, q = sel.shape
    width = k if k >= 0 else int(sel.sum(1).max()) if n > 0 else 0
    out = torch.full((n, width), -1, dtype=torch.int64, device=sel.device)
    for i in range(n):
        idx = sel[i].nonzero().flatten()
        out[i, : idx.numel()] = idx
    return out


def kpos_loss_reference(query, key, queue, query_labels, queue_labels, *, k: int = 6,
                        temperature: float = 0.07, reduction: str = "mean", seed=None):
    """Dense kpos_loss. Differentiable by autograd in query, key and queue."""
    query, key, queue = _amp.autocast_features(query, key, queue)
    _validation.check_all(query, key, queue, query_labels, queue_labels, k, temperature, reduction,
                          seed, name="kpos_loss_reference")
    if seed is None:
        seed = draw_seed()
    if query.device.type in _amp.DEVICE_TYPES:
        # The products in the accumulation dtype, not autocast's lower one.
        with torch.autocast(query.device.type, enabled=False):
            return _dense_loss(query, key, queue, query_labels, queue_labels, k, temperature,
                               reduction, seed)
    return _dense_loss(query, key, queue, query_labels, queue_labels, k, temperature, reduction,
                       seed)


def _dense_loss(query, key, queue, query_labels, queue_labels, k, temperature, reduction, seed):
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    # A private copy of the queue: the products below keep it for the backward, and the queue of
    # a memory bank is changed in place between the loss and backward() in MoCo's order.
    q, kk, bank = query.to(acc), key.to(acc), queue.to(acc, copy=True)

    own_logit = (q * kk).sum(1) / temperature                     # s_i0, [N]
    queue_logits = q @ bank.t() / temperature                     # s_ij, [N, Q]
    # Empty slots take no part: an additive -inf, as in the kernels (so a NaN stored in an empty
    # slot still reaches the loss, docs/kpos_loss.md "Non-finite inputs").
    empty_bias = torch.where(queue_labels >= 0, 0.0, float("-inf")).to(acc)[None, :]
    all_logits = torch.cat([own_logit[:, None], queue_logits + empty_bias], 1)
    lse = torch.logsumexp(all_logits, dim=1)

    positives = selection_mask(query_labels, queue_labels, k, seed)                  # S_i
    positive_sum = own_logit + torch.where(positives, queue_logits, 0.0).sum(1)
    num_positives = 1 + positives.sum(1)                                             # |P_i|
    loss = lse - positive_sum / num_positives

    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(query.dtype)


def moco_infonce(query, key, queue, temperature: float = 0.07):
    """MoCo's InfoNCE as its authors write it: the k = 0 special case, for tests."""
    l_pos = (query * key).sum(1, keepdim=True)
    l_neg = query @ queue.t()
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(logits.size(0), dtype=torch.long, device=logits.device)
    return torch.nn.functional.cross_entropy(logits, labels)


def draw_seed() -> int:
    """A seed from torch's default CPU generator, so torch.manual_seed reproduces it."""
    return int(torch.randint(_validation.INT64_MIN, _validation.INT64_MAX, (), dtype=torch.int64))
