"""Fused Triton kernels of kpos_loss: jit kernels, host launchers, torch.library registration.

The op's contract is docs/kpos_loss.md; docs/triton.md explains the design. In short:

* ``_select_kernel`` (one program per query row on the GPU) turns the seed into the per-row
  selection state ``(row_key, rank threshold, |P_i|)``. A row's same-class queue entries are a
  contiguous segment of the label-sorted queue, so the threshold (the min(k, |M_i|)-th smallest
  rank) is found by k passes of "smallest rank above the previous one" over that segment
  (k <= 16) or by a 32-step bisection of the rank range (larger k). Both are exact, so the
  selected positives are those of the C++ backend.
* ``_forward_kernel`` (grid: query blocks x queue splits) walks its queue tiles once: logits by
  ``tl.dot`` in base 2 (log2(e)/tau folded into one scale), an online log-sum-exp in fp32, and the
  positive logits summed in the same pass through the shared hash. ``_forward_merge_kernel`` adds
  the own-key logit and merges the per-split partials in split order, so the result is the same on
  every run.
* ``_backward_dq_kernel`` recomputes the logits of its tiles and accumulates
  ``G @ queue`` for d(query) per split (no atomics); ``_backward_finish_kernel`` sums the splits in
  order and adds the own-key terms of d(query) and d(key). ``_backward_dqueue_kernel`` (one program
  per queue tile, all queries) runs only when the queue needs a gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import _autograd, _validation

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# k up to this bound: the threshold is found by k "next smallest rank" passes over the row's
# same-class segment; above it by bisection of the 32-bit rank range (32 counting passes).
MAX_EXTRACT_PASSES = 16

# Selection state columns and thresholds, as in csrc/kcl/kpos_common.h.
SEL_ROW_KEY = tl.constexpr(0)
SEL_THRESHOLD = tl.constexpr(1)
SEL_NUM_POSITIVES = tl.constexpr(2)
THRESHOLD_NONE = tl.constexpr(-1)
THRESHOLD_ALL = tl.constexpr(0xFFFFFFFF)


# ----------------------------------------------------------------------------------------------
# The selection hash (docs/kpos_loss.md, "Selection"). Operands are tl.uint32: multiplication
# wraps modulo 2^32 on the GPU and in the interpreter (numpy uint32) alike. The literals
# 0x846CA68B, 0x9E3779B9 and 0x85EBCA6B are >= 2^31, which Triton types as uint32.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _mix32_tail(x):
    """mix32 without its first xorshift; see _selected."""
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _row_key(seed_ptr, rows):
    """row_key(seed, i) as uint32, for a block of rows (int32 or int64)."""
    seed = tl.load(seed_ptr)                    # int64
    lo = seed.to(tl.uint32)                     # low word (truncation)
    hi = (seed >> 32).to(tl.uint32)             # high word (either shift kind keeps it)
    seed_key = _mix32(lo ^ _mix32(hi + 0x9E3779B9))
    return _mix32(seed_key ^ _mix32(rows.to(tl.uint32) + 0x85EBCA6B))


@triton.jit
def _selected(same_class, row_key_mixed, threshold, cols):
    """[rows, cols] mask of selected positives.

    The first xorshift of mix32 distributes over the xor of row key and j, so
    `row_key_mixed = row_key ^ (row_key >> 16)` is computed once per row and only the rest of the
    hash runs per entry. `threshold` is the uint32 rank threshold; rows with no queue positive
    are already excluded from `same_class`.
    """
    j = cols.to(tl.uint32)
    rank = _mix32_tail(row_key_mixed[:, None] ^ (j ^ (j >> 16))[None, :])
    return same_class & (rank <= threshold[:, None])


# ----------------------------------------------------------------------------------------------
# Selection pre-pass: ROWS query rows per program (one on the GPU; a block in the interpreter,
# where every program and every helper call costs milliseconds).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _select_kernel(query_labels_ptr, order_ptr, seg_start_ptr, seg_end_ptr, seed_ptr, sel_ptr, n, k,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr, MAX_EXTRACT: tl.constexpr):
    block_rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_keys = _row_key(seed_ptr, block_rows)
    tl.store(sel_ptr + block_rows * 3 + SEL_ROW_KEY, row_keys.to(tl.int64) & 0xFFFFFFFF,
             mask=block_rows < n)
    offs = tl.arange(0, BLOCK)
    for r in range(0, ROWS):
        row = tl.program_id(0) * ROWS + r
        row_ok = row < n
        row_key = tl.max(tl.where(tl.arange(0, ROWS) == r, row_keys, 0), 0)
        label = tl.load(query_labels_ptr + row, mask=row_ok, other=-1)
        start = tl.load(seg_start_ptr + row, mask=row_ok, other=0)
        end = tl.load(seg_end_ptr + row, mask=row_ok, other=0)
        same_class = tl.where(label >= 0, end - start, 0)   # |M_i|
        threshold = tl.where((label < 0) | (k == 0), THRESHOLD_NONE,
                             tl.full([], THRESHOLD_ALL, tl.int64))
        num_selected = tl.where(k == 0, 0, tl.where((k < 0) | (same_class <= k), same_class, k))
        if (label >= 0) & (k > 0) & (same_class > k):
            # The first chunk's ranks stay in registers (most segments fit in one chunk); the
            # other chunks, if any, are re-hashed on every pass.
            first = start + offs
            first_ok = first < end
            first_j = tl.load(order_ptr + first, mask=first_ok, other=0).to(tl.uint32)
            first_rank = _mix32(row_key ^ first_j).to(tl.int64) & 0xFFFFFFFF
            if k <= MAX_EXTRACT:
                # k passes, each taking the smallest rank above the previous pass's. Ranks are
                # distinct within a row, so pass k yields the k-th smallest.
                kth = tl.full([], -1, tl.int64)
                for _ in range(0, k):
                    best = tl.min(tl.where(first_ok & (first_rank > kth), first_rank, 1 << 32), 0)
                    for c0 in range(start + BLOCK, end, BLOCK):
                        idx = c0 + offs
                        inside = idx < end
                        j = tl.load(order_ptr + idx, mask=inside, other=0).to(tl.uint32)
                        rank = _mix32(row_key ^ j).to(tl.int64) & 0xFFFFFFFF
                        best = tl.minimum(
                            best, tl.min(tl.where(inside & (rank > kth), rank, 1 << 32), 0))
                    kth = best
            else:
                # Bisection of the rank range: the smallest t with #{rank <= t} >= k.
                lo = tl.full([], 0, tl.int64)
                kth = tl.full([], THRESHOLD_ALL, tl.int64)
                for _ in range(0, 32):
                    mid = (lo + kth) >> 1
                    count = tl.sum((first_ok & (first_rank <= mid)).to(tl.int64), 0)
                    for c0 in range(start + BLOCK, end, BLOCK):
                        idx = c0 + offs
                        inside = idx < end
                        j = tl.load(order_ptr + idx, mask=inside, other=0).to(tl.uint32)
                        rank = _mix32(row_key ^ j).to(tl.int64) & 0xFFFFFFFF
                        count += tl.sum((inside & (rank <= mid)).to(tl.int64), 0)
                    enough = count >= k
                    kth = tl.where(enough, mid, kth)
                    lo = tl.where(enough, lo, mid + 1)
            threshold = kth
        tl.store(sel_ptr + row * 3 + SEL_THRESHOLD, threshold, mask=row_ok)
        tl.store(sel_ptr + row * 3 + SEL_NUM_POSITIVES, num_selected.to(tl.int64) + 1, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Shared per-row / per-tile loads.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_rows_selection(sel_ptr, query_labels_ptr, rows, row_ok):
    """Per-row label, hashed row key, uint32 threshold, |P_i| and 'has queue positives'."""
    label = tl.load(query_labels_ptr + rows, mask=row_ok, other=-1)
    row_key = tl.load(sel_ptr + rows * 3 + SEL_ROW_KEY, mask=row_ok, other=0).to(tl.uint32)
    threshold = tl.load(sel_ptr + rows * 3 + SEL_THRESHOLD, mask=row_ok, other=0).to(tl.uint32)
    num_positives = tl.load(sel_ptr + rows * 3 + SEL_NUM_POSITIVES, mask=row_ok, other=1)
    has_queue_positives = num_positives > 1
    return label, row_key ^ (row_key >> 16), threshold, num_positives, has_queue_positives


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST (set only under the interpreter, whose dot multiplies the bit patterns
    of bfloat16 operands) computes in fp32, which is exact for products of bfloat16 values."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _load_block(ptr, idx, idx_ok, stride_row, stride_col, dim, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    ptrs = ptr + idx.to(tl.int64)[:, None] * stride_row + d[None, :] * stride_col
    return tl.load(ptrs, mask=idx_ok[:, None] & (d < dim)[None, :], other=0.0)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _forward_kernel(query_ptr, queue_ptr, query_labels_ptr, queue_labels_ptr, sel_ptr,
                    part_max_ptr, part_sum_ptr, part_pos_ptr,
                    n, num_queue, dim, stride_qn, stride_qd, stride_kn, stride_kd,
                    tiles_per_split, scale2,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    acc_ty = tl.float64 if query_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    label, row_key_mixed, threshold, _, has_pos = _load_rows_selection(
        sel_ptr, query_labels_ptr, rows, row_ok)
    q = _load_block(query_ptr, rows, row_ok, stride_qn, stride_qd, dim, BLOCK_D)

    run_max = tl.full([BLOCK_M], float("-inf"), acc_ty)
    run_sum = tl.zeros([BLOCK_M], acc_ty)
    pos_sum = tl.zeros([BLOCK_M], acc_ty)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, tl.cdiv(num_queue, BLOCK_N))
    for t in range(tile_begin, tile_end):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < num_queue
        queue_labels = tl.load(queue_labels_ptr + cols, mask=col_ok, other=-1)
        valid = queue_labels >= 0                  # empty slots and padding take no part
        kt = _load_block(queue_ptr, cols, col_ok, stride_kn, stride_kd, dim, BLOCK_D)
        s = _dot(q, tl.trans(kt), tl.zeros([BLOCK_M, BLOCK_N], acc_ty), DOT_PRECISION, UPCAST)
        s = tl.where(valid[None, :], s * scale2, float("-inf"))  # base-2 logits
        same = (label[:, None] == queue_labels[None, :]) & valid[None, :] & has_pos[:, None]
        if tl.max(same.to(tl.int32)) > 0:          # skip the hash on tiles without candidates
            pos = _selected(same, row_key_mixed, threshold, cols)
            pos_sum += tl.sum(tl.where(pos, s, 0.0), 1)
        new_max = tl.maximum(run_max, tl.max(s, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # all-empty so far
        run_sum = run_sum * tl.exp2(run_max - safe_max) + tl.sum(tl.exp2(s - safe_max[:, None]), 1)
        run_max = new_max
    out = split * n + rows
    tl.store(part_max_ptr + out, run_max, mask=row_ok)
    tl.store(part_sum_ptr + out, run_sum, mask=row_ok)
    tl.store(part_pos_ptr + out, pos_sum, mask=row_ok)


@triton.jit
def _forward_merge_kernel(query_ptr, key_ptr, sel_ptr, part_max_ptr, part_sum_ptr, part_pos_ptr,
                          loss_ptr, lse_ptr, n, dim, num_splits,
                          stride_qn, stride_qd, stride_kn, stride_kd, inv_tau,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    acc_ty = tl.float64 if query_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    q = _load_block(query_ptr, rows, row_ok, stride_qn, stride_qd, dim, BLOCK_D).to(acc_ty)
    key = _load_block(key_ptr, rows, row_ok, stride_kn, stride_kd, dim, BLOCK_D).to(acc_ty)
    own = tl.sum(q * key, 1) * inv_tau                # natural units
    own2 = own * LOG2E                                 # the own key opens every row: exp2(0) = 1
    run_max = own2
    run_sum = tl.full([BLOCK_M], 1.0, acc_ty)
    queue_pos_sum = tl.zeros([BLOCK_M], acc_ty)
    for split in range(0, num_splits):             # fixed order: deterministic
        idx = split * n + rows
        part_max = tl.load(part_max_ptr + idx, mask=row_ok, other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + idx, mask=row_ok, other=0.0)
        new_max = tl.maximum(run_max, part_max)    # finite: run_max starts at the own logit
        run_sum = run_sum * tl.exp2(run_max - new_max) + part_sum * tl.exp2(part_max - new_max)
        run_max = new_max
        queue_pos_sum += tl.load(part_pos_ptr + idx, mask=row_ok, other=0.0)
    num_positives = tl.load(sel_ptr + rows * 3 + SEL_NUM_POSITIVES, mask=row_ok, other=1)
    # lse as the own logit plus a correction, so that a row with no valid queue entry gets
    # lse == own exactly: loss 0 and, in the backward, an own-key probability of exactly 1.
    lse = own + (run_max - own2 + tl.log2(run_sum)) * LN2
    loss = lse - (own + queue_pos_sum * LN2) / num_positives.to(acc_ty)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, loss, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Backward: dL/ds_ij = g_i * (softmax_ij - [j in S_i] / |P_i|), s_ij = q_i . queue_j / tau.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _backward_dq_kernel(query_ptr, queue_ptr, query_labels_ptr, queue_labels_ptr, sel_ptr, lse_ptr,
                        grad_ptr, dq_part_ptr, n, num_queue, dim,
                        stride_qn, stride_qd, stride_kn, stride_kd, tiles_per_split, scale2,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    acc_ty = tl.float64 if query_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    label, row_key_mixed, threshold, num_positives, has_pos = _load_rows_selection(
        sel_ptr, query_labels_ptr, rows, row_ok)
    lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
    grad = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    share = grad / num_positives.to(acc_ty)
    q = _load_block(query_ptr, rows, row_ok, stride_qn, stride_qd, dim, BLOCK_D)

    dq = tl.zeros([BLOCK_M, BLOCK_D], acc_ty)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, tl.cdiv(num_queue, BLOCK_N))
    for t in range(tile_begin, tile_end):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < num_queue
        queue_labels = tl.load(queue_labels_ptr + cols, mask=col_ok, other=-1)
        valid = queue_labels >= 0
        kt = _load_block(queue_ptr, cols, col_ok, stride_kn, stride_kd, dim, BLOCK_D)
        s = _dot(q, tl.trans(kt), tl.zeros([BLOCK_M, BLOCK_N], acc_ty), DOT_PRECISION, UPCAST)
        prob = tl.where(valid[None, :], tl.exp2(s * scale2 - lse2[:, None]), 0.0)
        g = grad[:, None] * prob
        same = (label[:, None] == queue_labels[None, :]) & valid[None, :] & has_pos[:, None]
        if tl.max(same.to(tl.int32)) > 0:
            pos = _selected(same, row_key_mixed, threshold, cols)
            g -= tl.where(pos, share[:, None], 0.0)
        dq = _dot(g.to(kt.dtype), kt, dq, DOT_PRECISION, UPCAST)
    d = tl.arange(0, BLOCK_D)
    out = (split * n + rows).to(tl.int64)[:, None] * dim + d[None, :]
    tl.store(dq_part_ptr + out, dq, mask=row_ok[:, None] & (d < dim)[None, :])


@triton.jit
def _backward_finish_kernel(query_ptr, key_ptr, sel_ptr, lse_ptr, grad_ptr, dq_part_ptr,
                            dq_ptr, dkey_ptr, n, dim, num_splits,
                            stride_qn, stride_qd, stride_kn, stride_kd, inv_tau,
                            NEED_QUERY: tl.constexpr, NEED_KEY: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    acc_ty = tl.float64 if query_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (d < dim)[None, :]
    q = _load_block(query_ptr, rows, row_ok, stride_qn, stride_qd, dim, BLOCK_D).to(acc_ty)
    key = _load_block(key_ptr, rows, row_ok, stride_kn, stride_kd, dim, BLOCK_D).to(acc_ty)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    num_positives = tl.load(sel_ptr + rows * 3 + SEL_NUM_POSITIVES, mask=row_ok, other=1)
    own = tl.sum(q * key, 1) * inv_tau                 # as in _forward_merge_kernel
    own_prob = tl.exp2((own - lse) * LOG2E)            # exactly 1 when the queue adds nothing
    own_coef = grad * (own_prob - 1.0 / num_positives.to(acc_ty))   # dL/ds_i0
    out = rows.to(tl.int64)[:, None] * dim + d[None, :]
    if NEED_QUERY:
        dq = own_coef[:, None] * key
        for split in range(0, num_splits):         # fixed order: deterministic
            dq += tl.load(dq_part_ptr + split * n * dim + out, mask=mask, other=0.0)
        tl.store(dq_ptr + out, (dq * inv_tau).to(dq_ptr.dtype.element_ty), mask=mask)
    if NEED_KEY:
        dkey = own_coef[:, None] * q * inv_tau
        tl.store(dkey_ptr + out, dkey.to(dkey_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_dqueue_kernel(query_ptr, queue_ptr, query_labels_ptr, queue_labels_ptr, sel_ptr,
                            lse_ptr, grad_ptr, dqueue_ptr, n, num_queue, dim,
                            stride_qn, stride_qd, stride_kn, stride_kd, scale2, inv_tau,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    acc_ty = tl.float64 if query_ptr.dtype.element_ty == tl.float64 else tl.float32
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < num_queue
    queue_labels = tl.load(queue_labels_ptr + cols, mask=col_ok, other=-1)
    valid = queue_labels >= 0
    kt = _load_block(queue_ptr, cols, col_ok, stride_kn, stride_kd, dim, BLOCK_D)
    dqueue = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
    for r0 in range(0, n, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n
        label, row_key_mixed, threshold, num_positives, has_pos = _load_rows_selection(
            sel_ptr, query_labels_ptr, rows, row_ok)
        lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
        grad = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
        q = _load_block(query_ptr, rows, row_ok, stride_qn, stride_qd, dim, BLOCK_D)
        s = _dot(q, tl.trans(kt), tl.zeros([BLOCK_M, BLOCK_N], acc_ty), DOT_PRECISION, UPCAST)
        prob = tl.where(valid[None, :], tl.exp2(s * scale2 - lse2[:, None]), 0.0)
        g = grad[:, None] * prob
        same = (label[:, None] == queue_labels[None, :]) & valid[None, :] & has_pos[:, None]
        if tl.max(same.to(tl.int32)) > 0:
            pos = _selected(same, row_key_mixed, threshold, cols)
            g -= tl.where(pos, (grad / num_positives.to(acc_ty))[:, None], 0.0)
        dqueue = _dot(tl.trans(g.to(q.dtype)), q, dqueue, DOT_PRECISION, UPCAST)
    d = tl.arange(0, BLOCK_D)
    out = cols.to(tl.int64)[:, None] * dim + d[None, :]
    tl.store(dqueue_ptr + out, (dqueue * inv_tau).to(dqueue_ptr.dtype.element_ty),
             mask=col_ok[:, None] & (d < dim)[None, :])


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
# Under TRITON_INTERPRET=1, triton.jit returns an InterpretedFunction that runs on CPU tensors.
INTERPRETED = not isinstance(_forward_kernel, triton.runtime.jit.JITFunction)
if INTERPRETED and isinstance(tl.max, triton.runtime.jit.JITFunction):
    raise ImportError("kcl_ext.triton: TRITON_INTERPRET=1 was set after triton was imported, so "
                      "Triton's own helpers are not interpreted; set it before importing triton")


def _kernel(fn):
    """wrap_triton(fn), so that torch.compile traces the launch; interpreted kernels run as is."""
    return fn if INTERPRETED else wrap_triton(fn)


class LaunchConfig:
    """Block sizes, warps and the number of programs a grid should reach, per device and dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype, dim: int):
        if device.type == "cuda" and not INTERPRETED:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            self._set_gpu(dtype, dim, sms)
        else:
            self._set_interpreter(dtype, dim)

    @classmethod
    def for_gpu(cls, dtype: torch.dtype, dim: int, multi_processor_count: int) -> "LaunchConfig":
        cfg = cls.__new__(cls)
        cfg._set_gpu(dtype, dim, multi_processor_count)
        return cfg

    def _set_common(self, dtype: torch.dtype, dim: int) -> None:
        self.block_d = max(16, triton.next_power_of_2(dim))
        # fp32 and fp64 dots are exact ("ieee"), not tf32: at tau = 0.07 tf32's 10-bit mantissa
        # moves the loss by ~1e-2. Half-precision inputs use tensor cores with fp32 accumulation.
        self.dot_precision = "ieee"
        self.upcast_dot = INTERPRETED and dtype == torch.bfloat16

    def _set_gpu(self, dtype: torch.dtype, dim: int, multi_processor_count: int) -> None:
        self._set_common(dtype, dim)
        elem = torch.empty((), dtype=dtype).element_size()

        def fits(rows: int, cols: int) -> bool:
            # A query block and two stages of queue tiles within 128 KiB of shared memory.
            return (rows + 2 * cols) * self.block_d * elem <= 128 * 1024

        block_m, backward_block_n = 64, 64
        while not fits(block_m, backward_block_n) and max(block_m, backward_block_n) > 16:
            if backward_block_n >= block_m:
                backward_block_n //= 2
            else:
                block_m //= 2
        block_n = 128 if dtype in (torch.float16, torch.bfloat16) else 64
        while not fits(block_m, block_n) and block_n > 16:
            block_n //= 2
        self.block_m, self.block_n, self.backward_block_n = block_m, block_n, backward_block_n
        self.num_warps, self.num_stages = (8 if self.block_d >= 256 else 4), 2
        self.select_rows, self.select_block = 1, 128
        # Two waves of programs: with N = 256 the query blocks alone would be 4 programs.
        self.target_programs = 2 * multi_processor_count

    def _set_interpreter(self, dtype: torch.dtype, dim: int) -> None:
        # The interpreter runs programs one after another with numpy: small blocks and few
        # programs, yet enough of both that tests cover partial blocks and several queue splits.
        self._set_common(dtype, dim)
        self.block_m, self.block_n, self.backward_block_n = 16, 32, 32
        self.num_warps, self.num_stages, self.target_programs = 1, 1, 8
        self.select_rows, self.select_block = 32, 32


def _queue_splits(row_blocks: int, num_tiles: int, target_programs: int):
    """(splits, tiles per split): split the queue so that row_blocks x splits ~ target_programs.
    It depends on shapes and the device only, so a run's reduction order is fixed."""
    if num_tiles == 0:
        return 0, 0
    splits = max(1, min(num_tiles, target_programs // max(row_blocks, 1)))
    tiles_per_split = triton.cdiv(num_tiles, splits)
    return triton.cdiv(num_tiles, tiles_per_split), tiles_per_split


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_device(query: torch.Tensor, name: str) -> None:
    if query.device.type == "cuda" or (INTERPRETED and query.device.type == "cpu"):
        return
    raise ValueError(
        f"{name}: the Triton backend needs CUDA tensors (CPU tensors only under "
        f"TRITON_INTERPRET=1, set before triton is imported), got {query.device}")


def _int64(labels: torch.Tensor) -> torch.Tensor:
    return labels.to(torch.int64).contiguous()


def _select(query_labels, queue_labels, seed, k: int, cfg: LaunchConfig) -> torch.Tensor:
    """Selection state [N, 3] int64 (row_key, threshold, |P_i|) from int64 labels."""
    n = query_labels.size(0)
    selection = query_labels.new_empty((n, 3))
    # Same-class entries form one segment of the label-sorted queue (empty slots sort first and
    # never match: a query with a negative label has no candidates).
    sorted_labels, order = torch.sort(queue_labels, stable=True)
    seg_start = torch.searchsorted(sorted_labels, query_labels, side="left")
    seg_end = torch.searchsorted(sorted_labels, query_labels, side="right")
    _kernel(_select_kernel)[(triton.cdiv(n, cfg.select_rows),)](
        query_labels, order, seg_start, seg_end, seed, selection, n, k, ROWS=cfg.select_rows,
        BLOCK=cfg.select_block, MAX_EXTRACT=MAX_EXTRACT_PASSES, num_warps=cfg.num_warps)
    return selection


def _kpos_forward_impl(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor,
                       query_labels: torch.Tensor, queue_labels: torch.Tensor, seed: torch.Tensor,
                       k: int, temperature: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    name = "kpos_forward_triton"
    _validation.check_inputs(query, key, queue, query_labels, queue_labels, name)
    _validation.check_k(k, name)
    _validation.check_temperature(temperature, name)
    _check_device(query, name)
    if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != query.device:
        raise ValueError(f"{name}: seed must be an int64 tensor of one element on {query.device}, "
                         f"got {seed.dtype} {list(seed.shape)} on {seed.device}")
    n, dim = query.shape
    num_queue = queue.size(0)
    acc = _acc_dtype(query.dtype)
    loss_rows = query.new_empty(n, dtype=acc)
    lse = query.new_empty(n, dtype=acc)
    if n == 0:
        return loss_rows, lse, query.new_empty((0, 3), dtype=torch.int64)
    cfg = LaunchConfig(query.device, query.dtype, dim)
    query_labels, queue_labels = _int64(query_labels), _int64(queue_labels)
    selection = _select(query_labels, queue_labels, seed, k, cfg)

    scale2 = LOG2E.value / temperature                 # log2(e) / tau: logits in base 2
    row_blocks = triton.cdiv(n, cfg.block_m)
    splits, tiles_per_split = _queue_splits(row_blocks, triton.cdiv(num_queue, cfg.block_n),
                                            cfg.target_programs)
    part_max = query.new_empty((max(splits, 1), n), dtype=acc)
    part_sum = query.new_empty((max(splits, 1), n), dtype=acc)
    part_pos = query.new_empty((max(splits, 1), n), dtype=acc)
    if splits > 0:
        _kernel(_forward_kernel)[(row_blocks, splits)](
            query, queue, query_labels, queue_labels, selection, part_max, part_sum, part_pos,
            n, num_queue, dim, query.stride(0), query.stride(1), queue.stride(0), queue.stride(1),
            tiles_per_split, scale2, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_D=cfg.block_d, DOT_PRECISION=cfg.dot_precision, UPCAST=cfg.upcast_dot,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
    _kernel(_forward_merge_kernel)[(row_blocks,)](
        query, key, selection, part_max, part_sum, part_pos, loss_rows, lse, n, dim, splits,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), 1.0 / temperature,
        BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)
    return loss_rows, lse, selection


def _kpos_backward_impl(grad_rows: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                        queue: torch.Tensor, query_labels: torch.Tensor, queue_labels: torch.Tensor,
                        lse: torch.Tensor, selection: torch.Tensor, temperature: float,
                        output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    name = "kpos_backward_triton"
    _validation.check_inputs(query, key, queue, query_labels, queue_labels, name)
    _validation.check_temperature(temperature, name)
    _check_device(query, name)
    n, dim = query.shape
    num_queue = queue.size(0)
    acc = _acc_dtype(query.dtype)
    if grad_rows.shape != (n,) or lse.shape != (n,) or lse.dtype != acc:
        raise ValueError(f"{name}: grad_rows and lse must be [N] = [{n}] (lse of dtype {acc}), got "
                         f"{list(grad_rows.shape)} and {list(lse.shape)} {lse.dtype}")
    if selection.shape != (n, 3) or selection.dtype != torch.int64:
        raise ValueError(f"{name}: selection must be int64 [N, 3] = [{n}, 3], got "
                         f"{list(selection.shape)} {selection.dtype}")
    need_query, need_key, need_queue = (bool(x) for x in output_mask)

    def grad_like(needed: bool, t: torch.Tensor) -> torch.Tensor:
        if not needed:
            return t.new_empty(0)
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    grad_query, grad_key, grad_queue = (grad_like(need_query, query), grad_like(need_key, key),
                                        grad_like(need_queue, queue))
    if not (need_query or need_key or need_queue):
        return grad_query, grad_key, grad_queue
    cfg = LaunchConfig(query.device, query.dtype, dim)
    query_labels, queue_labels = _int64(query_labels), _int64(queue_labels)
    grad_rows = grad_rows.to(acc).contiguous()
    lse, selection = lse.contiguous(), selection.contiguous()
    scale2 = LOG2E.value / temperature
    inv_tau = 1.0 / temperature
    strides = (query.stride(0), query.stride(1))

    if (need_query or need_key) and n > 0:
        row_blocks = triton.cdiv(n, cfg.block_m)
        splits, tiles_per_split = 0, 0
        if need_query:
            splits, tiles_per_split = _queue_splits(
                row_blocks, triton.cdiv(num_queue, cfg.backward_block_n), cfg.target_programs)
        dq_part = query.new_empty((splits, n, dim) if splits else (1,), dtype=acc)
        if splits > 0:
            _kernel(_backward_dq_kernel)[(row_blocks, splits)](
                query, queue, query_labels, queue_labels, selection, lse, grad_rows, dq_part,
                n, num_queue, dim, *strides, queue.stride(0), queue.stride(1), tiles_per_split,
                scale2, BLOCK_M=cfg.block_m, BLOCK_N=cfg.backward_block_n, BLOCK_D=cfg.block_d,
                DOT_PRECISION=cfg.dot_precision, UPCAST=cfg.upcast_dot,
            num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
        _kernel(_backward_finish_kernel)[(row_blocks,)](
            query, key, selection, lse, grad_rows, dq_part,
            grad_query if need_query else dq_part, grad_key if need_key else dq_part,
            n, dim, splits, *strides, key.stride(0), key.stride(1), inv_tau,
            NEED_QUERY=need_query, NEED_KEY=need_key, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps)
    if need_queue and num_queue > 0:
        _kernel(_backward_dqueue_kernel)[(triton.cdiv(num_queue, cfg.backward_block_n),)](
            query, queue, query_labels, queue_labels, selection, lse, grad_rows, grad_queue,
            n, num_queue, dim, *strides, queue.stride(0), queue.stride(1), scale2, inv_tau,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.backward_block_n, BLOCK_D=cfg.block_d,
            DOT_PRECISION=cfg.dot_precision, UPCAST=cfg.upcast_dot, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
    return grad_query, grad_key, grad_queue


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------
FORWARD_OP = "kcl::kpos_forward_triton"
BACKWARD_OP = "kcl::kpos_backward_triton"

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
    def _kpos_forward_fake(query, key, queue, query_labels, queue_labels, seed, k, temperature):
        name = "kpos_forward_triton"
        _validation.check_inputs(query, key, queue, query_labels, queue_labels, name)
        _validation.check_k(k, name)
        _validation.check_temperature(temperature, name)
        n, acc = query.size(0), _acc_dtype(query.dtype)
        return (query.new_empty(n, dtype=acc), query.new_empty(n, dtype=acc),
                query.new_empty((n, 3), dtype=torch.int64))

    torch.library.register_fake(BACKWARD_OP)(_autograd.backward_fake)


# Inputs: query, key, queue, query_labels, queue_labels, seed, k, temperature.
_autograd.register_forward_autograd(FORWARD_OP, torch.ops.kcl.kpos_backward_triton,
                                   temperature_index=7)


# ----------------------------------------------------------------------------------------------
# Public entry point (kcl_ext.kpos_loss(..., backend="triton") lands here)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("kcl::triton_seed", mutates_args=())
def _draw_seed(like: torch.Tensor) -> torch.Tensor:
    """A fresh seed from torch's default CPU generator (as the reference draws it), as int64 [1]
    on like's device. An opaque op, so that torch.compile runs this very draw at run time
    instead of lowering it to its own random-number generator."""
    drawn = torch.randint(_validation.INT64_MIN, _validation.INT64_MAX, (1,), dtype=torch.int64)
    return drawn.to(like.device)


@_draw_seed.register_fake
def _draw_seed_fake(like):
    return like.new_empty(1, dtype=torch.int64)


def seed_tensor(seed: Optional[int], like: torch.Tensor) -> torch.Tensor:
    """The selection seed as an int64 [1] tensor on like's device, which the selection kernel reads.

    seed=None draws it from torch's default CPU generator, so torch.manual_seed reproduces a run
    (the same draw as kcl_ext.kpos_loss_reference). A tensor, rather than a kernel argument, means
    no host sync, no graph break under torch.compile, and no recompilation per seed value.
    """
    if seed is None:
        return _draw_seed(like)
    return torch.tensor([seed], dtype=torch.int64, device=like.device)


def kpos_loss_triton(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor,
                     query_labels: torch.Tensor, queue_labels: torch.Tensor, *, k: int = 6,
                     temperature: float = 0.07, reduction: str = "mean",
                     seed: Optional[int] = None) -> torch.Tensor:
    """kcl_ext.kpos_loss on the fused Triton kernels (see kcl_ext.kpos_loss for the arguments)."""
    _validation.check_all(query, key, queue, query_labels, queue_labels, k, temperature, reduction,
                          seed)
    _check_device(query, "kpos_loss")
    loss_rows, _lse, _selection = torch.ops.kcl.kpos_forward_triton(
        query, key, queue, query_labels, queue_labels, seed_tensor(seed, query), k,
        float(temperature))
    if reduction == "sum":
        loss_rows = loss_rows.sum()
    elif reduction == "mean":
        loss_rows = loss_rows.mean()
    return loss_rows.to(query.dtype)
