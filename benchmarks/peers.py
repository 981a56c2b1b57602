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
