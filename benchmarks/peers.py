"""Exact relations between kpos_loss and the peer libraries' losses (docs/benchmarks.md).

Notation, per query row i, with unit-norm features and temperature tau:
  s_i0 = q_i . key_i / tau (own logit), s_ij = q_i . queue_j / tau, V the valid queue entries,
  M_i the same-class valid entries, m_i = |M_i|,
  L_i = logsumexp({s_i0} u {s_ij : j in V})               (kpos_loss's denominator)
  A_i = kpos_loss(k=0)_i  = L_i - s_i0
  B_i = kpos_loss(k=-1)_i = L_i - (s_i0 + sum_{j in M_i} s_ij) / (1 + m_i)

pytorch-metric-learning's SupConLoss(temperature=tau)(query, query_labels, ref_emb=queue,
ref_labels=queue_labels) normalises both sides (cosine similarity), has no own key, puts every
reference entry in the denominator, and averages the log-probabilities over the m_i positives:
  P_i = logsumexp_{j in V} s_ij - mean_{j in M_i} s_ij     (0 when m_i = 0)
and its default reducer (AvgNonZeroReducer) averages P_i over the rows where P_i > 0. From A and B:
  logsumexp_{j in V} s_ij = L_i + log1p(-exp(-A_i))
  mean_{j in M_i} s_ij   = ((1 + m_i)(L_i - B_i) - s_i0) / m_i
so P_i is a function of kpos_loss's own rows, with no approximation.

inf-cl's cal_flash_loss(q, columns, targets, scale=1/tau) row i is
  F_i = logsumexp_c(q_i . columns_c / tau) - q_i . columns_{targets_i} / tau.
With columns = [keys of the batch; queue] and targets_i = i, kpos_loss on the bank [keys; queue]
(all slots valid, k = 0) has the own key once more in its denominator, so
  kpos_loss(query, key, [keys; queue], k=0)_i = log(exp(F_i) + 1) = softplus(F_i).
"""
from __future__ import annotations

import torch


def own_logits(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    return (query.double() * key.double()).sum(1) / temperature


def match_counts(query_labels: torch.Tensor, queue_labels: torch.Tensor) -> torch.Tensor:
    """m_i: valid queue entries of query i's class."""
    query_labels = query_labels.to(torch.int64)
    queue_labels = queue_labels.to(torch.int64)
    same = (query_labels[:, None] == queue_labels[None, :]) & (queue_labels[None, :] >= 0)
    return same.sum(1)


def supcon_rows_from_kpos(rows_k0: torch.Tensor, rows_all: torch.Tensor, own: torch.Tensor,
                          matches: torch.Tensor) -> torch.Tensor:
    """SupConLoss's per-row loss P_i from kpos_loss rows A (k=0), B (k=-1), s_i0 and m_i."""
    a, b, s0 = rows_k0.double(), rows_all.double(), own.double()
    m = matches.double()
    lse_all = a + s0                                     # L_i
    lse_queue = lse_all + torch.log1p(-torch.exp(-a))    # drop the own key's exp(s_i0)
    mean_positive = ((1 + m) * (lse_all - b) - s0) / m.clamp(min=1)
    return torch.where(matches > 0, lse_queue - mean_positive, torch.zeros_like(a))


def supcon_mean(rows: torch.Tensor) -> torch.Tensor:
    """AvgNonZeroReducer: the mean over the rows whose loss is positive (0 if there is none)."""
    positive = rows > 0
    return rows[positive].mean() if positive.any() else rows.new_zeros(())


def inf_cl_rows_from_kpos(kpos_rows_on_keys_and_queue: torch.Tensor) -> torch.Tensor:
    """cal_flash_loss's row F_i from kpos_loss(query, key, [keys; queue], k=0)_i = softplus(F_i)."""
    x = kpos_rows_on_keys_and_queue.double()
    return x + torch.log(-torch.expm1(-x))   # softplus^-1(x) = log(exp(x) - 1)


# ---------------------------------------------------------------------------------------------
# KCL written on cut-cross-entropy
# ---------------------------------------------------------------------------------------------
def cce_kpos_loss(query, key, queue, query_labels, queue_labels, k: int, temperature: float,
                  seed: int, impl: str) -> torch.Tensor:
    """kpos_loss (mean over rows) as a user writes it on cut-cross-entropy 25.1.1.

    The queue is the classifier matrix and the query scaled by 1/tau the embedding, so
    `linear_cross_entropy(query / tau, queue, targets, reduction="none")` gives
    lse_{j in queue}(s_ij) - s_i,t_i without the N x Q logits (impl="cce", its Triton kernels; on
    the CPU impl="torch_compile", the compiled dense form). The target t_i is any column (here
    i mod Q): adding back s_i,t_i = (q_i / tau) . queue_t_i recovers the queue's log-sum-exp,
    `logaddexp` with the own logit s_i0 gives L_i, and the row is L_i minus the mean of s_i0 and
    the logits of the positives that kcl_ext.sample_positives selects for `seed` (the ones
    kpos_loss selects), gathered from the queue: exactly kpos_loss's row.

    Empty queue slots (label < 0) must not enter the log-sum-exp, and cut-cross-entropy has no
    column mask, so when the queue has any, the valid rows are gathered into a smaller classifier
    matrix first (a copy, and a host synchronisation for its size); the benchmark's queue has none.
    """
    from cut_cross_entropy import linear_cross_entropy
    import kcl_ext

    positives = kcl_ext.sample_positives(query_labels, queue_labels, k, seed)    # [N, w], -1 pad
    valid = queue_labels >= 0
    classifier = queue
    if not bool(valid.all()):
        classifier = queue[valid]
        # sample_positives never selects an empty slot: renumber the selected ones into the
        # compacted queue (the padding stays -1).
        new_index = torch.cumsum(valid, 0) - 1
        positives = torch.where(positives >= 0, new_index[positives.clamp(min=0)], positives)
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    scaled = query / temperature
    own = (scaled * key).sum(1).to(acc)                                          # s_i0
    if classifier.size(0) == 0:
        lse = own
    else:
        # Row i's target is column i mod Q: spread over the queue, the target logit's gradient,
        # which cancels the one-hot part of cross-entropy's, loses at most one row's rounding on
        # each queue row (one target column for every row summed N such cancellations into it).
        targets = torch.arange(query.size(0), device=query.device) % classifier.size(0)
        lse_minus_target = linear_cross_entropy(scaled, classifier, targets, reduction="none",
                                                impl=impl)
        target_logit = (scaled * classifier[targets]).sum(1)                     # s_i,t_i
        lse = torch.logaddexp(lse_minus_target.to(acc) + target_logit.to(acc), own)
    selected = positives >= 0
    gathered = classifier[positives.clamp(min=0)] if classifier.size(0) else \
        queue.new_zeros(positives.shape + (queue.size(1),))
    positive_logits = torch.einsum("nd,nwd->nw", scaled, gathered)
    positive_sum = own + torch.where(selected, positive_logits, 0).to(acc).sum(1)
    rows = lse - positive_sum / (1 + selected.sum(1))
    return rows.mean().to(query.dtype)
