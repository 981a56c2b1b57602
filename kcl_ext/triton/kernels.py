"""Triton kernels of kpos_loss: jit kernels, host launchers, torch.library registration.

The op's contract is docs/kpos_loss.md; docs/triton.md explains the design. The loss splits into
a dense part that needs no labels and a sparse part that needs no pass over the queue:

    loss_i = lse_i - q_i . t_i / tau,   t_i = (key_i + sum_{j in S_i} queue_j) / |P_i|

* ``_select_kernel`` visits only a row's same-class segment of the label-sorted queue: it finds
  the rank threshold of the k-th selected entry and emits the selected indices ([N, k],
  ascending, -1 padded) and |P_i|.
* ``_target_kernel`` forms t_i: a gather of the k selected rows, or for k = -1 the class sum of
  the queue, which ``_segment_piece_kernel`` computes once in pieces of a fixed length.
* ``_forward_kernel`` (query blocks x queue splits) is FlashAttention's forward with the queue as
  keys and values: logits, an online log-sum-exp and, when the query needs a gradient, the
  softmax-weighted sum of the queue rows. No label and no hash in its loop: empty slots are an
  additive -inf. ``_forward_merge_kernel`` (query blocks x D chunks) merges the splits in a fixed
  order and writes lse, loss and the softmax mean m_i.
* Backward: ``_backward_rows_kernel`` writes d(query) = g (m - t) / tau and
  d(key) = g (p_i0 - 1/|P_i|) q / tau elementwise; ``_backward_dqueue_kernel`` (one program per
  queue tile) recomputes P^T . q tile by tile and subtracts the sparse positive term in a fixed
  order. No floating-point atomics anywhere.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import _amp, _autograd, _validation
from ..reference import draw_seed

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# k up to this bound: the threshold is found by k "next smallest rank" passes over the row's
# same-class segment; above it by bisection of the 32-bit rank range (32 counting passes).
MAX_EXTRACT_PASSES = 16
THRESHOLD_ALL = tl.constexpr(0xFFFFFFFF)

# How the d(queue) kernel subtracts the positive term (a runtime argument, so that the kernel
# compiles once for every k).
SPARSE_NONE, SPARSE_PAIRS, SPARSE_CLASSES = 0, 1, 2

# Loops: kernels whose trip count is a runtime value use `while` loops, except the two hot loops
# (the forward's queue tiles, the d(queue) kernel's query blocks), which the compiler pipelines
# only as `for` loops. Triton 3.6's interpreter converts a runtime loop bound to a Python int with
# int() of a one-element array, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be
# converted to Python scalars"); there the hot loops take the `while` form too (FOR_LOOPS=False).


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
def _row_keys(seed_ptr, rows):
    """row_key(seed, i) as uint32 for a block of rows."""
    seed = tl.load(seed_ptr)                    # int64
    lo = seed.to(tl.uint32)                     # low word (truncation)
    hi = (seed >> 32).to(tl.uint32)             # high word (either shift kind keeps it)
    seed_key = _mix32(lo ^ _mix32(hi + 0x9E3779B9))
    return _mix32(seed_key ^ _mix32(rows.to(tl.uint32) + 0x85EBCA6B))


@triton.jit
def _rank(row_key, j):
    """rank(seed, i, j) = mix32(row_key ^ j) as int64 in [0, 2^32). mix32 is written out here:
    the interpreter pays for every nested call, and this one runs once per candidate chunk."""
    x = row_key ^ j.to(tl.uint32)
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x.to(tl.int64) & 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# Selection pre-pass: ROWS query rows per program (one on the GPU; a block in the interpreter,
# where every program costs milliseconds).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _kth_smallest_rank(order_ptr, start, end, row_key, k, BLOCK: tl.constexpr,
                       MAX_EXTRACT: tl.constexpr):
    """The k-th smallest rank of the segment order[start:end] (k < end - start). Ranks are
    distinct within a row (the hash is a bijection of j), so the answer is exact."""
    offs = tl.arange(0, BLOCK)
    # The first chunk's ranks stay in registers (most segments fit in one chunk); the other
    # chunks, if any, are hashed again on every pass.
    first_ok = start + offs < end
    first_rank = _rank(row_key, tl.load(order_ptr + start + offs, mask=first_ok, other=0))
    if k <= MAX_EXTRACT:
        # k passes, each taking the smallest rank above the previous pass's.
        kth = tl.full([], -1, tl.int64)
        done = tl.full([], 0, tl.int64)
        while done < k:
            best = tl.min(tl.where(first_ok & (first_rank > kth), first_rank, 1 << 32), 0)
            chunk = start + BLOCK
            while chunk < end:
                inside = chunk + offs < end
                rank = _rank(row_key, tl.load(order_ptr + chunk + offs, mask=inside, other=0))
                best = tl.minimum(best, tl.min(tl.where(inside & (rank > kth), rank, 1 << 32), 0))
                chunk += BLOCK
            kth = best
            done += 1
    else:
        # Bisection of the rank range: the smallest t with #{rank <= t} >= k.
        lo = tl.full([], 0, tl.int64)
        kth = tl.full([], THRESHOLD_ALL, tl.int64)
        for _ in range(32):
            mid = (lo + kth) >> 1
            count = tl.sum((first_ok & (first_rank <= mid)).to(tl.int64), 0)
            chunk = start + BLOCK
            while chunk < end:
                inside = chunk + offs < end
                rank = _rank(row_key, tl.load(order_ptr + chunk + offs, mask=inside, other=0))
                count += tl.sum((inside & (rank <= mid)).to(tl.int64), 0)
                chunk += BLOCK
            enough = count >= k
            kth = tl.where(enough, mid, kth)
            lo = tl.where(enough, lo, mid + 1)
    return kth


@triton.jit(do_not_specialize=["k"])
def _select_kernel(query_labels_ptr, order_ptr, seg_start_ptr, seg_end_ptr, seed_ptr,
                   positives_ptr, num_positives_ptr, n, k,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr, MAX_EXTRACT: tl.constexpr):
    """|P_i| for every k; for k > 0 also the selected queue indices, ascending (the label-sorted
    queue keeps each class's indices ascending), into positives [N, k] pre-filled with -1."""
    offs = tl.arange(0, BLOCK)
    block_rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_keys = _row_keys(seed_ptr, block_rows)              # one hash pass for the block
    # Scalar index arithmetic in int64: the interpreter checks every narrower integer add and
    # multiply for overflow, at a cost that dominates this kernel there.
    for r in tl.static_range(ROWS):
        row = tl.program_id(0).to(tl.int64) * ROWS + r
        if row < n:
            label = tl.load(query_labels_ptr + row)
            start = tl.load(seg_start_ptr + row)
            end = tl.load(seg_end_ptr + row)
            same_class = tl.where(label >= 0, end - start, 0)          # |M_i|
            num_selected = tl.where(k == 0, 0, tl.where((k < 0) | (same_class <= k),
                                                        same_class, k))
            tl.store(num_positives_ptr + row, num_selected + 1)
            if (k > 0) & (same_class > 0):
                row_key = tl.max(tl.where(tl.arange(0, ROWS) == r, row_keys, 0), 0)
                threshold = tl.full([], THRESHOLD_ALL, tl.int64)
                if same_class > k:
                    threshold = _kth_smallest_rank(order_ptr, start, end, row_key, k, BLOCK,
                                                   MAX_EXTRACT)
                out = positives_ptr + row * k
                count = tl.full([], 0, tl.int64)
                chunk = start
                while chunk < end:
                    inside = chunk + offs < end
                    j = tl.load(order_ptr + chunk + offs, mask=inside, other=0)
                    chosen = inside & (_rank(row_key, j) <= threshold)
                    slot = count + tl.cumsum(chosen.to(tl.int64), 0) - 1
                    tl.store(out + slot, j, mask=chosen)
                    count += tl.sum(chosen.to(tl.int64), 0)
                    chunk += BLOCK


# ----------------------------------------------------------------------------------------------
# Positive target t_i, and the class sums it needs for k = -1.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _segment_piece_kernel(src_ptr, stride_sn, stride_sd, order_ptr, weight_ptr, seg_start_ptr,
                          seg_end_ptr, part_first_ptr, piece_owner_ptr, part_ptr, num_owners, dim,
                          WEIGHTED: tl.constexpr, PIECE: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """Program (g, d-chunk) sums piece g of its owner's segment: rows order[r] (times
    weight[order[r]]) for r in [start + p * PIECE, start + (p + 1) * PIECE) of the owner's
    [start, end). Every piece has one program, so the pieces of a long segment run in parallel
    and their sums are combined later in piece order: deterministic, no atomics."""
    g = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    d64 = d.to(tl.int64)                    # offsets that span the tensor are int64
    acc_ty = tl.float64 if src_ptr.dtype.element_ty == tl.float64 else tl.float32
    owner = tl.load(piece_owner_ptr + g)
    if owner < num_owners:
        start = tl.load(seg_start_ptr + owner) + (g - tl.load(part_first_ptr + owner)) * PIECE
        end = tl.minimum(start + PIECE, tl.load(seg_end_ptr + owner))
        acc = tl.zeros([BLOCK_D], acc_ty)
        offs = tl.arange(0, BLOCK_R)
        r = start
        while r < end:
            inside = r + offs < end
            src_row = tl.load(order_ptr + r + offs, mask=inside, other=0)
            x = tl.load(src_ptr + src_row[:, None] * stride_sn + d64[None, :] * stride_sd,
                        mask=inside[:, None] & d_ok[None, :], other=0.0).to(acc_ty)
            if WEIGHTED:
                x = x * tl.load(weight_ptr + src_row, mask=inside, other=0.0)[:, None]
            acc += tl.sum(x, 0)
            r += BLOCK_R
        tl.store(part_ptr + g.to(tl.int64) * dim + d, acc, mask=d_ok)


@triton.jit
def _add_class_pieces(acc, owner, part_first_ptr, part_count_ptr, part_ptr, d, d_ok, dim, scale,
                      SIGN: tl.constexpr, NARROW: tl.constexpr):
    """acc[r] + SIGN * scale * (the pieces of owner[r], in piece order); owner -1: nothing.
    scale is a power of two (exact). NARROW: offsets into the pieces fit in int32 (int64 offset
    tensors cost registers)."""
    has = owner >= 0
    first = tl.load(part_first_ptr + owner, mask=has, other=0)
    count = tl.load(part_count_ptr + owner, mask=has, other=0)
    if NARROW:
        first = first.to(tl.int32)
    piece = tl.full([], 0, tl.int64)
    most = tl.max(count, 0)
    while piece < most:
        take = has & (piece < count)
        at = first + piece
        if NARROW:
            at = first + piece.to(tl.int32)
        x = tl.load(part_ptr + at[:, None] * dim + d[None, :],
                    mask=take[:, None] & d_ok[None, :], other=0.0)
        acc += SIGN * (x * scale)
        piece += 1
    return acc


@triton.jit(do_not_specialize=["k"])
def _target_kernel(key_ptr, queue_ptr, positives_ptr, num_positives_ptr, row_owner_ptr,
                   part_first_ptr, part_count_ptr, part_ptr, target_ptr, n, dim, k,
                   stride_kn, stride_kd, stride_vn, stride_vd,
                   GATHER: tl.constexpr, CLASS_SUMS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """t_i = (key_i + sum of its selected queue rows, ascending index) / |P_i|."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    mask = row_ok[:, None] & d_ok[None, :]
    rows64, d64 = rows.to(tl.int64), d.to(tl.int64)     # offsets that span a tensor: int64
    acc_ty = tl.float64 if key_ptr.dtype.element_ty == tl.float64 else tl.float32
    target = tl.load(key_ptr + rows64[:, None] * stride_kn + d64[None, :] * stride_kd, mask=mask,
                     other=0.0).to(acc_ty)
    if GATHER:
        column = tl.full([], 0, tl.int64)
        while column < k:
            j = tl.load(positives_ptr + rows.to(tl.int64) * k + column, mask=row_ok, other=-1)
            picked = j >= 0
            target += tl.load(queue_ptr + j[:, None] * stride_vn + d64[None, :] * stride_vd,
                              mask=picked[:, None] & d_ok[None, :], other=0.0).to(acc_ty)
            column += 1
    if CLASS_SUMS:
        owner = tl.load(row_owner_ptr + rows, mask=row_ok, other=-1)
        target = _add_class_pieces(target, owner, part_first_ptr, part_count_ptr, part_ptr, d,
                                   d_ok, dim, 1.0, 1.0, False)
    num_positives = tl.load(num_positives_ptr + rows, mask=row_ok, other=1)
    target = target * (1.0 / num_positives.to(acc_ty))[:, None]
    tl.store(target_ptr + rows.to(tl.int64)[:, None] * dim + d[None, :], target, mask=mask)


# ----------------------------------------------------------------------------------------------
# Dense forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, accumulated in acc's dtype (passed as out_dtype: Triton 3.6 otherwise takes
    float32 and rejects a float64 accumulator). UPCAST (set only under the interpreter, whose dot
    multiplies the bit patterns of bfloat16 operands) computes in fp32, which is exact for
    products of bfloat16 values."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def _load_tile(ptr, row0, num_rows, stride_row, stride_col, dim, BLOCK_R: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Rows [row0, row0 + BLOCK_R) of a [num_rows, dim] matrix, zero-padded: one int64 scalar
    base pointer and int32 offsets inside the tile (int64 offset tensors cost registers)."""
    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    base = ptr + tl.cast(row0, tl.int64) * stride_row
    return tl.load(base + r[:, None] * stride_row + d[None, :] * stride_col,
                   mask=(row0 + r < num_rows)[:, None] & (d < dim)[None, :], other=0.0)


@triton.jit
def _forward_tile(q, queue_ptr, bias_ptr, tile, num_queue, dim, stride_vn, stride_vd, scale2,
                  run_max, run_sum, weighted, QUERY_GRAD: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    col0 = tile * BLOCK_N
    values = _load_tile(queue_ptr, col0, num_queue, stride_vn, stride_vd, dim, BLOCK_N, BLOCK_D)
    bias = tl.load(bias_ptr + col0 + tl.arange(0, BLOCK_N), mask=col0 + tl.arange(0, BLOCK_N) <
                   num_queue, other=float("-inf"))
    logits = _dot(q, tl.trans(values), tl.zeros([q.shape[0], BLOCK_N], run_sum.dtype),
                  DOT_PRECISION, UPCAST)
    logits = logits * scale2 + bias[None, :]             # base 2; empty slots -inf
    new_max = tl.maximum(run_max, tl.max(logits, 1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)   # every entry empty so far
    rescale = tl.exp2(run_max - safe_max)
    probs = tl.exp2(logits - safe_max[:, None])
    run_sum = run_sum * rescale + tl.sum(probs, 1)
    if QUERY_GRAD:
        weighted = _dot(probs.to(values.dtype), values, weighted * rescale[:, None],
                        DOT_PRECISION, UPCAST)
    return new_max, run_sum, weighted


@triton.jit
def _forward_kernel(query_ptr, queue_ptr, bias_ptr, part_max_ptr, part_sum_ptr, part_weighted_ptr,
                    n, num_queue, dim, stride_qn, stride_qd, stride_vn, stride_vd,
                    tiles_per_split, scale2,
                    QUERY_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    FOR_LOOPS: tl.constexpr):
    """Online log-sum-exp (and, with QUERY_GRAD, the exp-weighted sum of the queue rows) of a
    query block over the queue tiles of one split, from an empty state (max -inf, sum 0)."""
    row0 = tl.program_id(0) * BLOCK_M
    split = tl.program_id(1)
    acc_ty = tl.float64 if query_ptr.dtype.element_ty == tl.float64 else tl.float32
    q = _load_tile(query_ptr, row0, n, stride_qn, stride_qd, dim, BLOCK_M, BLOCK_D)
    run_max = tl.full([BLOCK_M], float("-inf"), acc_ty)
    run_sum = tl.zeros([BLOCK_M], acc_ty)
    if QUERY_GRAD:
        weighted = tl.zeros([BLOCK_M, BLOCK_D], acc_ty)
    else:
        weighted = tl.zeros([1, 1], acc_ty)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, tl.cdiv(num_queue, BLOCK_N))
    if FOR_LOOPS:
        for tile in range(tile_begin, tile_end):
            run_max, run_sum, weighted = _forward_tile(
                q, queue_ptr, bias_ptr, tile, num_queue, dim, stride_vn, stride_vd, scale2,
                run_max, run_sum, weighted, QUERY_GRAD, BLOCK_N, BLOCK_D, DOT_PRECISION, UPCAST)
    else:
        tile = tile_begin
        while tile < tile_end:
            run_max, run_sum, weighted = _forward_tile(
                q, queue_ptr, bias_ptr, tile, num_queue, dim, stride_vn, stride_vd, scale2,
                run_max, run_sum, weighted, QUERY_GRAD, BLOCK_N, BLOCK_D, DOT_PRECISION, UPCAST)
            tile += 1
    r = tl.arange(0, BLOCK_M)
    out = split.to(tl.int64) * n + row0
    tl.store(part_max_ptr + out + r, run_max, mask=row0 + r < n)
    tl.store(part_sum_ptr + out + r, run_sum, mask=row0 + r < n)
    if QUERY_GRAD:
        d = tl.arange(0, BLOCK_D)
        tl.store(part_weighted_ptr + out * dim + r[:, None] * dim + d[None, :], weighted,
                 mask=(row0 + r < n)[:, None] & (d < dim)[None, :])


@triton.jit
def _row_dots(a_ptr, stride_an, stride_ad, b_ptr, stride_bn, stride_bd, rows, row_ok, dim,
              acc_ty: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum_d a[r, d] * b[r, d] in acc_ty, over D in chunks of BLOCK_D. The own-key logit is
    formed by this one function with one block shape in the forward merge and in the backward,
    so both get the same bits: a row with no valid queue entry has lse == own logit exactly,
    hence loss 0 and an own-key probability of exactly 1."""
    total = tl.zeros([rows.shape[0]], acc_ty)
    rows64 = rows.to(tl.int64)                      # row offsets span the tensor: int64
    d0 = tl.full([], 0, tl.int64)
    while d0 < dim:
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (d < dim)[None, :]
        a = tl.load(a_ptr + rows64[:, None] * stride_an + d[None, :] * stride_ad, mask=mask,
                    other=0.0).to(acc_ty)
        b = tl.load(b_ptr + rows64[:, None] * stride_bn + d[None, :] * stride_bd, mask=mask,
                    other=0.0).to(acc_ty)
        total += tl.sum(a * b, 1)
        d0 += BLOCK_D
    return total


@triton.jit
def _forward_merge_kernel(query_ptr, key_ptr, target_ptr, part_max_ptr, part_sum_ptr,
                          part_weighted_ptr, loss_ptr, lse_ptr, mean_ptr, n, dim, num_splits,
                          stride_qn, stride_qd, stride_kn, stride_kd, inv_tau,
                          QUERY_GRAD: tl.constexpr, WRITE_LOSS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (query block, D chunk): the own key opens every row (exp2(0) = 1), then the splits
    are merged in split order (deterministic). D chunk 0 writes lse and the loss; every chunk
    writes its columns of the softmax mean m_i."""
    acc_ty = tl.float64 if query_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (d < dim)[None, :]
    own = _row_dots(query_ptr, stride_qn, stride_qd, key_ptr, stride_kn, stride_kd, rows, row_ok,
                    dim, acc_ty, BLOCK_D) * inv_tau
    own2 = own * LOG2E
    run_max = own2
    run_sum = tl.full([BLOCK_M], 1.0, acc_ty)
    if QUERY_GRAD:
        mean = tl.load(key_ptr + rows.to(tl.int64)[:, None] * stride_kn
                       + d.to(tl.int64)[None, :] * stride_kd, mask=mask, other=0.0).to(acc_ty)
    split = tl.full([], 0, tl.int64)
    while split < num_splits:
        at = split * n + rows
        part_max = tl.load(part_max_ptr + at, mask=row_ok, other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + at, mask=row_ok, other=0.0)
        new_max = tl.maximum(run_max, part_max)      # finite: run_max starts at the own logit
        old_scale = tl.exp2(run_max - new_max)
        part_scale = tl.exp2(part_max - new_max)
        run_sum = run_sum * old_scale + part_sum * part_scale
        if QUERY_GRAD:
            part = tl.load(part_weighted_ptr + at[:, None] * dim + d[None, :], mask=mask,
                           other=0.0)
            mean = mean * old_scale[:, None] + part * part_scale[:, None]
        run_max = new_max
        split += 1
    # lse as the own logit plus a correction: exactly the own logit when the queue adds nothing.
    lse = own + (run_max - own2 + tl.log2(run_sum)) * LN2
    if WRITE_LOSS:
        if tl.program_id(1) == 0:
            positive = _row_dots(query_ptr, stride_qn, stride_qd, target_ptr, dim, 1, rows,
                                 row_ok, dim, acc_ty, BLOCK_D) * inv_tau
            tl.store(lse_ptr + rows, lse, mask=row_ok)
            tl.store(loss_ptr + rows, lse - positive, mask=row_ok)
    if QUERY_GRAD:
        mean = mean * (1.0 / run_sum)[:, None]
        tl.store(mean_ptr + rows.to(tl.int64)[:, None] * dim + d[None, :], mean, mask=mask)


# ----------------------------------------------------------------------------------------------
# Backward: dL/ds_ij = g_i (p_ij - [j in P_i] / |P_i|), s_ij = q_i . v_j / tau.
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["need_query", "need_key"])
def _backward_rows_kernel(query_ptr, key_ptr, lse_ptr, grad_ptr, num_positives_ptr, mean_ptr,
                          target_ptr, dquery_ptr, dkey_ptr, n, dim, stride_qn, stride_qd,
                          stride_kn, stride_kd, inv_tau, need_query, need_key,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """d query_i = g_i (m_i - t_i) / tau and d key_i = g_i (p_i0 - 1/|P_i|) q_i / tau."""
    acc_ty = tl.float64 if query_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (d < dim)[None, :]
    out = rows.to(tl.int64)[:, None] * dim + d[None, :]
    scale = tl.load(grad_ptr + rows, mask=row_ok, other=0.0) * inv_tau
    if need_query:
        mean = tl.load(mean_ptr + out, mask=mask, other=0.0)
        target = tl.load(target_ptr + out, mask=mask, other=0.0)
        tl.store(dquery_ptr + out, ((mean - target) * scale[:, None]).to(
            dquery_ptr.dtype.element_ty), mask=mask)
    if need_key:
        own = _row_dots(query_ptr, stride_qn, stride_qd, key_ptr, stride_kn, stride_kd, rows,
                        row_ok, dim, acc_ty, BLOCK_D) * inv_tau     # as in _forward_merge_kernel
        own_prob = tl.exp2((own - tl.load(lse_ptr + rows, mask=row_ok, other=0.0)) * LOG2E)
        num_positives = tl.load(num_positives_ptr + rows, mask=row_ok, other=1)
        coef = scale * (own_prob - 1.0 / num_positives.to(acc_ty))
        q = tl.load(query_ptr + rows.to(tl.int64)[:, None] * stride_qn
                    + d.to(tl.int64)[None, :] * stride_qd, mask=mask, other=0.0).to(acc_ty)
        tl.store(dkey_ptr + out, (q * coef[:, None]).to(dkey_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_tile_scale(grad_abs_max):
    """(c, 1/c) with c = 2^(15 - e), max|g| < 2^e, clamped to 2^+-126; (1, 1) when max|g| is 0
    or not finite: every c |g_i| p_ij < 2^15 (p_ij <= 1) stays inside float16's range and far
    above its subnormals (csrc/cuda/kpos_kernel.cu, grad_tile_scale). Both are made from their
    exponent bits, so both are exact."""
    m = grad_abs_max.to(tl.float32)
    biased = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF     # m = 1.f 2^(biased - 127)
    exponent = tl.minimum(tl.maximum(15 - (biased - 126), -126), 126)
    exponent = tl.where((m > 0.0) & (biased < 255), exponent, 0)
    scale = ((exponent + 127) << 23).to(tl.float32, bitcast=True)
    unscale = ((127 - exponent) << 23).to(tl.float32, bitcast=True)
    return scale, unscale


@triton.jit
def _dqueue_block(values, bias, query_ptr, lse_ptr, grad_ptr, row0, n, dim, stride_qn, stride_qd,
                  scale2, grad_scale, acc, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TILE_FIRST: tl.constexpr):
    q = _load_tile(query_ptr, row0, n, stride_qn, stride_qd, dim, BLOCK_M, BLOCK_D)
    r = tl.arange(0, BLOCK_M)
    lse2 = tl.load(lse_ptr + row0 + r, mask=row0 + r < n, other=0.0) * LOG2E
    grad = tl.load(grad_ptr + row0 + r, mask=row0 + r < n, other=0.0) * grad_scale
    if TILE_FIRST:
        # Logits transposed, [BLOCK_N, BLOCK_M]: the queue tile is the first operand of the
        # logits product. Triton 3.6 fails to compile the other form for fp64 (its layout pass
        # rejects the transposed fp64 probability tile).
        logits_t = _dot(values, tl.trans(q), tl.zeros([values.shape[0], BLOCK_M], acc.dtype),
                        DOT_PRECISION, UPCAST)
        probs_t = tl.exp2(logits_t * scale2 + bias[:, None] - lse2[None, :])   # empty slots: 0
        return _dot((probs_t * grad[None, :]).to(q.dtype), q, acc, DOT_PRECISION, UPCAST)
    else:
        # The queue tile is the second operand of both products: it stays in shared memory,
        # where the tensor cores read it. As the first operand it would be kept in registers
        # across the loop, [BLOCK_N, BLOCK_D] per warp group, and spill at large D.
        logits = _dot(q, tl.trans(values), tl.zeros([BLOCK_M, values.shape[0]], acc.dtype),
                      DOT_PRECISION, UPCAST)                                 # [BLOCK_M, BLOCK_N]
        probs = tl.exp2(logits * scale2 + bias[None, :] - lse2[:, None])     # empty slots: 0
        return _dot(tl.trans((probs * grad[:, None]).to(q.dtype)), q, acc, DOT_PRECISION, UPCAST)


@triton.jit(do_not_specialize=["sparse"])
def _backward_dqueue_kernel(query_ptr, queue_ptr, bias_ptr, lse_ptr, grad_ptr, share_ptr,
                            pair_start_ptr, pair_end_ptr, pair_row_ptr, queue_owner_ptr,
                            part_first_ptr, part_count_ptr, part_ptr, grad_abs_max_ptr,
                            dqueue_ptr, n, num_queue, dim, stride_qn, stride_qd, stride_vn,
                            stride_vd, scale2, inv_tau, sparse,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                            FOR_LOOPS: tl.constexpr, NARROW: tl.constexpr,
                            TILE_FIRST: tl.constexpr, SCALE_GRAD: tl.constexpr):
    """d queue_j = (sum_i g_i p_ij q_i - sum_{i: j in S_i} g_i q_i / |P_i|) / tau for one queue
    tile. The positive term comes first, in a fixed order, before the queue tile is loaded (so
    its gathered rows and the tile are never live together); then the dense sum over every query
    block (P^T . q). Every element of d(queue) is written by one program. NARROW: offsets of the
    gathered rows fit in int32. SCALE_GRAD (float16): the gradient tile g_i p_ij, rounded to
    float16 for its product, is scaled by a power of two c from max|g| (grad_abs_max_ptr), so that
    it stays out of float16's subnormals; both terms accumulate c times d(queue), and the store
    multiplies by 1/c, exactly."""
    col0 = tl.program_id(0) * BLOCK_N
    acc_ty = tl.float64 if query_ptr.dtype.element_ty == tl.float64 else tl.float32
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < num_queue
    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    acc = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
    if SCALE_GRAD:
        grad_scale, grad_unscale = _grad_tile_scale(tl.load(grad_abs_max_ptr))
    else:
        grad_scale, grad_unscale = 1.0, 1.0
    if sparse == 1:
        # k > 0: the (j, i) pairs sorted by j, ascending i within a j; pairs [start_j, end_j).
        start = tl.load(pair_start_ptr + cols, mask=col_ok, other=0)
        count = tl.load(pair_end_ptr + cols, mask=col_ok, other=0) - start
        most = tl.max(count, 0)
        pair = tl.full([], 0, tl.int64)
        while pair < most:
            take = pair < count
            row = tl.load(pair_row_ptr + start + pair, mask=take, other=0)
            share = tl.load(share_ptr + row, mask=take, other=0.0)
            if NARROW:
                row = row.to(tl.int32)
            q = tl.load(query_ptr + row[:, None] * stride_qn + d[None, :] * stride_qd,
                        mask=take[:, None] & d_ok[None, :], other=0.0).to(acc_ty)
            acc -= q * (share * grad_scale)[:, None]
            pair += 1
    if sparse == 2:
        # k = -1: the class sum of g_i q_i / |P_i| over the batch, gathered by queue label.
        owner = tl.load(queue_owner_ptr + cols, mask=col_ok, other=-1)
        acc = _add_class_pieces(acc, owner, part_first_ptr, part_count_ptr, part_ptr, d, d_ok,
                                dim, grad_scale, -1.0, NARROW)
    values = _load_tile(queue_ptr, col0, num_queue, stride_vn, stride_vd, dim, BLOCK_N, BLOCK_D)
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=float("-inf"))
    if FOR_LOOPS:
        for row0 in range(0, n, BLOCK_M):
            acc = _dqueue_block(values, bias, query_ptr, lse_ptr, grad_ptr, row0, n, dim,
                                stride_qn, stride_qd, scale2, grad_scale, acc, BLOCK_M,
                                BLOCK_D, DOT_PRECISION, UPCAST, TILE_FIRST)
    else:
        row0 = tl.full([], 0, tl.int32)
        while row0 < n:
            acc = _dqueue_block(values, bias, query_ptr, lse_ptr, grad_ptr, row0, n, dim,
                                stride_qn, stride_qd, scale2, grad_scale, acc, BLOCK_M,
                                BLOCK_D, DOT_PRECISION, UPCAST, TILE_FIRST)
            row0 += BLOCK_M
    tl.store(dqueue_ptr + col0.to(tl.int64) * dim + tl.arange(0, BLOCK_N)[:, None] * dim
             + d[None, :], (acc * grad_unscale * inv_tau).to(dqueue_ptr.dtype.element_ty),
             mask=col_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
# Under TRITON_INTERPRET=1, triton.jit returns an InterpretedFunction that runs on CPU tensors.
INTERPRETED = not isinstance(_forward_kernel, triton.runtime.jit.JITFunction)
if INTERPRETED and isinstance(tl.max, triton.runtime.jit.JITFunction):
    raise ImportError("kcl_ext.triton: TRITON_INTERPRET=1 was set after triton was imported, so "
                      "Triton's own helpers are not interpreted; set it before importing triton")


def _launch(fn, grid, *args, **kwargs):
    """fn[grid](*args, **kwargs) through wrap_triton, so that torch.compile traces the launch;
    interpreted kernels run as they are. compile_check swaps this function to record launches."""
    (fn if INTERPRETED else wrap_triton(fn))[grid](*args, **kwargs)


@triton.jit
def _runtime_range_probe(out_ptr, n):
    total = 0
    for i in range(0, n):
        total += i
    tl.store(out_ptr, total)


_for_loops_cache: list[bool] = []


def _for_loops_work() -> bool:
    """Whether `for` loops with runtime bounds run: always when compiled; in the interpreter not
    with Triton 3.6 and numpy >= 2.4 (see the note at the top)."""
    if not INTERPRETED:
        return True
    if not _for_loops_cache:
        out = torch.zeros(1, dtype=torch.int32)
        try:
            _runtime_range_probe[(1,)](out, 3)
            _for_loops_cache.append(int(out) == 3)
        except Exception:  # the interpreter's TypeError, wrapped in its InterpreterError
            _for_loops_cache.append(False)
    return _for_loops_cache[0]


class LaunchConfig:
    """Block sizes, warps and the number of programs a grid should reach, per device and dtype.

    Not autotuned: fixed sizes keep the split count, and so the results, reproducible."""

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

    def _set_common(self, dtype: torch.dtype, dim: int, interpreted: bool) -> None:
        self.block_d = max(16, triton.next_power_of_2(dim))
        # fp32 and fp64 dots are exact ("ieee"): not tf32, whose 10-bit mantissa moves the loss
        # by ~1e-3 at tau = 0.07, and not tf32x3, which would keep the fp32 tolerance but spills
        # on sm_90a (docs/triton.md, "Dot precision"). Half-precision inputs use tensor cores
        # with fp32 accumulation.
        self.dot_precision = "ieee"
        self.upcast_dot = interpreted and dtype == torch.bfloat16
        self.for_loops = not interpreted or _for_loops_work()

    def _set_gpu(self, dtype: torch.dtype, dim: int, multi_processor_count: int) -> None:
        self._set_common(dtype, dim, interpreted=False)
        half = dtype in (torch.float16, torch.bfloat16)
        block_d = self.block_d
        # Forward: a query block, the fp32 accumulator of the softmax mean [BLOCK_M, BLOCK_D] and
        # a logits tile live in registers together; the sizes below compile without spills on
        # sm_90a (python -m kcl_ext.triton.compile_check --check-spills).
        wide = block_d > 128
        if half:
            self.block_m, self.block_n = (64, 32) if wide else (64, 64)
        elif dtype == torch.float32:
            self.block_m, self.block_n = (16, 32) if wide else (32, 32)
        else:
            self.block_m, self.block_n = 16, 16
        # d(queue): a queue tile of dqueue_block_n rows and its [dqueue_block_n, BLOCK_D]
        # gradient accumulator, against query blocks of dqueue_block_m rows. 64 x 64 lets the
        # half-precision products use wgmma (64 rows per warp group); beyond D = 128 the query
        # block as wgmma's register operand would spill, so smaller tiles take mma.sync.
        if half:
            self.dqueue_block_n, self.dqueue_block_m = (32, 16 if block_d > 256 else 32) if wide \
                else (64, 64)
        else:
            self.dqueue_block_n, self.dqueue_block_m = self.block_n, self.block_m
        # fp64 (for gradient checks) takes 16 x 16 tiles and the transposed logits in d(queue):
        # Triton 3.6's layout pass rejects its other tile shapes and forms (compile_check).
        # fp32's FMA products hold both operand tiles in registers: with 4 warps Triton 3.6 spills
        # the forward's accumulator at D = 128.
        self.num_warps = 8 if wide or dtype == torch.float32 else 4
        self.dqueue_warps = 8
        self.dqueue_tile_first = dtype == torch.float64
        self.num_stages = 2
        # Row-wise kernels (merge, target, backward rows): fp64 blocks are halved to stay within
        # the registers.
        self.rows_m = 16 if dtype == torch.float64 else 32
        self.chunk_d, self.small_warps = 64, 4
        self.select_rows, self.select_block = 1, 128
        self.piece, self.piece_block = 1024, 64
        # Two waves of programs: with N = 256 the query blocks alone would be few programs.
        self.target_programs = 2 * multi_processor_count

    def _set_interpreter(self, dtype: torch.dtype, dim: int) -> None:
        # The interpreter runs programs one after another with numpy: small blocks and few
        # programs, yet enough of both that tests cover partial blocks, several queue splits,
        # D chunks and segment pieces.
        self._set_common(dtype, dim, interpreted=True)
        self.block_m, self.block_n = 16, 32
        self.dqueue_block_m, self.dqueue_block_n = 16, 32
        self.num_warps, self.num_stages, self.target_programs = 1, 1, 8
        self.dqueue_warps = 1
        self.dqueue_tile_first = dtype == torch.float64
        self.rows_m, self.chunk_d, self.small_warps = 16, 16, 1
        self.select_rows, self.select_block = 16, 32
        self.piece, self.piece_block = 32, 16


def _queue_splits(row_blocks: int, num_tiles: int, target_programs: int):
    """(splits, tiles per split): split the queue so that row_blocks x splits ~ target_programs.
    It depends on shapes and the device only, so a run's reduction order is fixed."""
    if num_tiles == 0:
        return 0, 0
    splits = max(1, min(num_tiles, target_programs // max(row_blocks, 1)))
    tiles_per_split = triton.cdiv(num_tiles, splits)
    return triton.cdiv(num_tiles, tiles_per_split), tiles_per_split


def _tileable(t: torch.Tensor, max_rows: int, block_d: int) -> torch.Tensor:
    """t itself, or a contiguous copy where an offset inside one tile would not fit in int32
    (the kernels address a tile from an int64 base with int32 offsets)."""
    if max_rows * t.stride(0) + block_d * t.stride(1) < 2**31:
        return t
    return t.contiguous()


def _extent(t: torch.Tensor) -> int:
    """One past the largest element offset of a 2-D tensor."""
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1


class _Labels:
    """Labels as int64 and the label-sorted queue: a class's valid queue entries are one segment
    [start, end) of `order` (a stable sort keeps their indices ascending; empty slots sort first
    and never match a query label >= 0)."""

    def __init__(self, query_labels: torch.Tensor, queue_labels: torch.Tensor):
        self.query = query_labels.to(torch.int64).contiguous()
        self.queue = queue_labels.to(torch.int64).contiguous()
        self.sorted_queue, self.order = torch.sort(self.queue, stable=True)
        self.seg_start = torch.searchsorted(self.sorted_queue, self.query, side="left")
        self.seg_end = torch.searchsorted(self.sorted_queue, self.query, side="right")
        self._query_classes = None

    def query_classes(self):
        """The query batch sorted by label, as (sorted labels, order, row_owner, class_end): each
        class is represented by its *owner*, the sorted position of its first row; row_owner[i]
        is the owner of row i's class (-1 for a negative label); class_end[p] is the end of the
        class's rows in sorted order for an owner p, and p itself for every other position, so
        that only owners carry a segment."""
        if self._query_classes is None:
            sorted_query, query_order = torch.sort(self.query, stable=True)
            first = torch.searchsorted(sorted_query, sorted_query, side="left")
            positions = torch.arange(sorted_query.numel(), device=sorted_query.device)
            is_owner = (first == positions) & (sorted_query >= 0)
            class_end = torch.where(
                is_owner, torch.searchsorted(sorted_query, sorted_query, side="right"), positions)
            row_owner = torch.searchsorted(sorted_query, self.query, side="left")
            row_owner = torch.where(self.query >= 0, row_owner, -1)
            self._query_classes = (sorted_query, query_order, row_owner, class_end)
        return self._query_classes


def _segment_sums(src, order, weights, seg_start, seg_end, max_rows: int, cfg: LaunchConfig):
    """Sums of the rows src[order[r]] (times weights[order[r]]) over each owner's segment
    [seg_start[o], seg_end[o]) (empty for non-owners), in pieces of cfg.piece rows: returns
    (pieces [P, D] in the accumulation dtype, first piece [O], piece count [O]); owner o's sum is
    pieces[first[o]] + ... + pieces[first[o] + count[o] - 1], added in that order."""
    owners, dim = seg_start.numel(), src.size(1)
    counts = torch.div(seg_end - seg_start + cfg.piece - 1, cfg.piece, rounding_mode="floor")
    ends = torch.cumsum(counts, 0)
    first = ends - counts
    # sum_o ceil(len_o / piece) <= owners + ceil(sum_o len_o / piece): a static grid, no sync.
    slots = owners + triton.cdiv(max_rows, cfg.piece)
    piece_owner = torch.searchsorted(ends, torch.arange(slots, device=src.device), right=True)
    pieces = src.new_empty((slots, dim), dtype=_acc_dtype(src.dtype))
    _launch(_segment_piece_kernel, (slots, triton.cdiv(dim, cfg.chunk_d)),
            src, src.stride(0), src.stride(1), order, weights if weights is not None else counts,
            seg_start, seg_end, first, piece_owner, pieces, owners, dim,
            WEIGHTED=weights is not None, PIECE=cfg.piece, BLOCK_R=cfg.piece_block,
            BLOCK_D=cfg.chunk_d, num_warps=cfg.small_warps)
    return pieces, first, counts


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return _autograd.acc_dtype(dtype)


def _on_device(device: torch.device):
    """torch.cuda.device(device) for CUDA tensors: Triton launches on the current device and its
    current stream, not on the tensors' device, so inputs on cuda:1 while cuda:0 is current would
    run on the wrong device (an illegal address) or the wrong stream. A no-op on CPU tensors (the
    interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _check_device(query: torch.Tensor, name: str) -> None:
    if query.device.type == "cuda" or (INTERPRETED and query.device.type == "cpu"):
        return
    raise ValueError(
        f"{name}: the Triton backend needs CUDA tensors (CPU tensors only under "
        f"TRITON_INTERPRET=1, set before triton is imported), got {query.device}")


def _select(labels: _Labels, seed: torch.Tensor, k: int, cfg: LaunchConfig):
    """(positives int64 [N, max(k, 0)], num_positives int64 [N])."""
    n = labels.query.numel()
    positives = torch.full((n, max(k, 0)), -1, dtype=torch.int64, device=labels.query.device)
    num_positives = torch.empty(n, dtype=torch.int64, device=labels.query.device)
    _launch(_select_kernel, (triton.cdiv(n, cfg.select_rows),),
            labels.query, labels.order, labels.seg_start, labels.seg_end, seed, positives,
            num_positives, n, k, ROWS=cfg.select_rows, BLOCK=cfg.select_block,
            MAX_EXTRACT=MAX_EXTRACT_PASSES, num_warps=cfg.small_warps)
    return positives, num_positives


def _target(key, queue, labels: _Labels, positives, num_positives, k: int, cfg: LaunchConfig):
    n, dim = key.shape
    target = key.new_empty((n, dim), dtype=_acc_dtype(key.dtype))
    class_sums = k == -1 and queue.size(0) > 0
    pieces = first = counts = row_owner = num_positives      # placeholders, never read
    if class_sums:
        # Each query class's owner sums the class's segment of the label-sorted queue.
        sorted_query, _, row_owner, class_end = labels.query_classes()
        is_owner = class_end > torch.arange(n, device=key.device)
        seg_start = torch.searchsorted(labels.sorted_queue, sorted_query, side="left")
        seg_end = torch.where(is_owner, torch.searchsorted(labels.sorted_queue, sorted_query,
                                                           side="right"), seg_start)
        pieces, first, counts = _segment_sums(queue, labels.order, None, seg_start, seg_end,
                                              queue.size(0), cfg)
    _launch(_target_kernel, (triton.cdiv(n, cfg.rows_m), triton.cdiv(dim, cfg.chunk_d)),
            key, queue, positives, num_positives, row_owner, first, counts, pieces, target, n, dim,
            max(k, 0), key.stride(0), key.stride(1), queue.stride(0), queue.stride(1),
            GATHER=k > 0, CLASS_SUMS=class_sums, BLOCK_M=cfg.rows_m, BLOCK_D=cfg.chunk_d,
            num_warps=cfg.small_warps)
    return target


def _dense_forward(query, key, queue, bias, target, temperature: float, query_grad: bool,
                   write_loss: bool, cfg: LaunchConfig):
    """(loss_rows, lse, softmax_mean) from the dense pass and the merge."""
    n, dim = query.shape
    num_queue = queue.size(0)
    acc = _acc_dtype(query.dtype)
    loss_rows = query.new_empty(n, dtype=acc)
    lse = query.new_empty(n, dtype=acc)
    mean = query.new_empty((n if query_grad else 0, dim), dtype=acc)
    row_blocks = triton.cdiv(n, cfg.block_m)
    splits, tiles_per_split = _queue_splits(row_blocks, triton.cdiv(num_queue, cfg.block_n),
                                            cfg.target_programs)
    part_max = query.new_empty((splits, n), dtype=acc)
    part_sum = query.new_empty((splits, n), dtype=acc)
    part_weighted = query.new_empty((splits if query_grad else 0, n, dim), dtype=acc)
    if splits > 0:
        _launch(_forward_kernel, (row_blocks, splits),
                query, queue, bias, part_max, part_sum, part_weighted, n, num_queue, dim,
                query.stride(0), query.stride(1), queue.stride(0), queue.stride(1),
                tiles_per_split, LOG2E.value / temperature, QUERY_GRAD=query_grad,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                DOT_PRECISION=cfg.dot_precision, UPCAST=cfg.upcast_dot, FOR_LOOPS=cfg.for_loops,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _launch(_forward_merge_kernel, (triton.cdiv(n, cfg.rows_m), triton.cdiv(dim, cfg.chunk_d)),
            query, key, target, part_max, part_sum, part_weighted, loss_rows, lse, mean, n, dim,
            splits, query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            1.0 / temperature, QUERY_GRAD=query_grad, WRITE_LOSS=write_loss,
            BLOCK_M=cfg.rows_m, BLOCK_D=cfg.chunk_d, num_warps=cfg.small_warps)
    return loss_rows, lse, mean


def _empty_slot_bias(labels: _Labels, dtype: torch.dtype) -> torch.Tensor:
    """0 for valid queue entries, -inf for empty slots: added to the logits, so the hot loops
    compare no label."""
    return torch.where(labels.queue >= 0, 0.0, float("-inf")).to(dtype)


def _dense(*features: torch.Tensor) -> tuple:
    """The features as contiguous tensors (a copy only of a strided one). On a GPU, Triton picks
    the layout of a load, and with it the lanes and warps that a tl.sum reduces over, from what it
    knows of the strides (a stride of 1 is a constant); a strided input would be summed in
    another order and round differently. One specialisation for every input layout keeps strided
    and contiguous inputs bitwise alike, as the contract requires (compile_check compares the
    layouts)."""
    return tuple(t.contiguous() for t in features)


def _forward(query, key, queue, query_labels, queue_labels, seed, k: int, temperature: float,
             query_grad: bool, cfg: LaunchConfig):
    n, dim = query.shape
    query, key, queue = _dense(query, key, queue)
    queue = _tileable(queue, cfg.block_n, cfg.block_d)
    query = _tileable(query, cfg.block_m, cfg.block_d)
    labels = _Labels(query_labels, queue_labels)
    positives, num_positives = _select(labels, seed, k, cfg)
    target = _target(key, queue, labels, positives, num_positives, k, cfg)
    bias = _empty_slot_bias(labels, _acc_dtype(query.dtype))
    loss_rows, lse, mean = _dense_forward(query, key, queue, bias, target, temperature,
                                          query_grad, True, cfg)
    return loss_rows, lse, positives, num_positives, target, mean


def _backward(grad_rows, query, key, queue, query_labels, queue_labels, lse, positives,
              num_positives, target, softmax_mean, k: int, temperature: float, output_mask,
              cfg: LaunchConfig):
    n, dim = query.shape
    num_queue = queue.size(0)
    acc = _acc_dtype(query.dtype)
    need_query, need_key, need_queue = (bool(x) for x in output_mask)

    def grad_like(needed: bool, t: torch.Tensor) -> torch.Tensor:
        if not needed:
            return t.new_empty(0)
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    grad_query, grad_key = grad_like(need_query, query), grad_like(need_key, key)
    grad_queue = grad_like(need_queue, queue)
    if n == 0 or not (need_query or need_key or need_queue):
        if need_queue:
            grad_queue.zero_()
        return grad_query, grad_key, grad_queue
    query, key, queue = _dense(query, key, queue)
    queue = _tileable(queue, max(cfg.block_n, cfg.dqueue_block_n), cfg.block_d)
    query = _tileable(query, max(cfg.block_m, cfg.dqueue_block_m), cfg.block_d)
    grad_rows = grad_rows.to(acc).contiguous()
    lse, num_positives = lse.contiguous(), num_positives.contiguous()
    target, softmax_mean = target.contiguous(), softmax_mean.contiguous()
    labels = _Labels(query_labels, queue_labels)
    bias = _empty_slot_bias(labels, acc)
    inv_tau = 1.0 / temperature

    if need_query or need_key:
        if need_query and softmax_mean.size(0) != n:
            # The forward did not accumulate the softmax mean: one pass over the queue.
            _, _, softmax_mean = _dense_forward(query, key, queue, bias, target, temperature,
                                                True, False, cfg)
        _launch(_backward_rows_kernel, (triton.cdiv(n, cfg.rows_m), triton.cdiv(dim, cfg.chunk_d)),
                query, key, lse, grad_rows, num_positives, softmax_mean, target,
                grad_query if need_query else grad_rows, grad_key if need_key else grad_rows,
                n, dim, query.stride(0), query.stride(1), key.stride(0), key.stride(1), inv_tau,
                int(need_query), int(need_key), BLOCK_M=cfg.rows_m, BLOCK_D=cfg.chunk_d,
                num_warps=cfg.small_warps)

    if need_queue and num_queue > 0:
        share = grad_rows / num_positives.to(acc)                      # g_i / |P_i|
        sparse = SPARSE_NONE
        pair_start = pair_end = pair_row = queue_owner = first = counts = pieces = num_positives
        if k > 0:
            sparse = SPARSE_PAIRS
            sorted_j, pair_order = torch.sort(positives.reshape(-1), stable=True)
            pair_row = torch.div(pair_order, k, rounding_mode="floor")
            columns = torch.arange(num_queue, device=query.device)
            pair_start = torch.searchsorted(sorted_j, columns, side="left")
            pair_end = torch.searchsorted(sorted_j, columns, side="right")
        elif k == -1:
            sparse = SPARSE_CLASSES
            sorted_query, query_order, _, class_end = labels.query_classes()
            # Each class's owner sums g_i q_i / |P_i| over the class's rows of the batch.
            seg_start = torch.arange(n, device=query.device)
            pieces, first, counts = _segment_sums(query, query_order, share, seg_start,
                                                  class_end, n, cfg)
            where = torch.searchsorted(sorted_query, labels.queue).clamp(max=n - 1)
            queue_owner = torch.where((labels.queue >= 0) & (sorted_query[where] == labels.queue),
                                      where, -1)
        narrow = (max(_extent(query), pieces.numel() if sparse == SPARSE_CLASSES else 0)
                  < 2**31)
        # float16's gradient tile needs a scale (the kernel's SCALE_GRAD): max|g| as a 0-dim
        # tensor on the device, read by the kernel, so no host synchronisation. bfloat16 has
        # float32's exponent range.
        scale_grad = query.dtype == torch.float16
        grad_abs_max = grad_rows.abs().amax() if scale_grad else grad_rows
        _launch(_backward_dqueue_kernel, (triton.cdiv(num_queue, cfg.dqueue_block_n),),
                query, queue, bias, lse, grad_rows, share, pair_start, pair_end, pair_row,
                queue_owner, first, counts, pieces, grad_abs_max, grad_queue, n, num_queue, dim,
                query.stride(0), query.stride(1), queue.stride(0), queue.stride(1),
                LOG2E.value / temperature, inv_tau, sparse,
                BLOCK_M=cfg.dqueue_block_m, BLOCK_N=cfg.dqueue_block_n, BLOCK_D=cfg.block_d,
                DOT_PRECISION=cfg.dot_precision, UPCAST=cfg.upcast_dot, FOR_LOOPS=cfg.for_loops,
                NARROW=narrow, TILE_FIRST=cfg.dqueue_tile_first, SCALE_GRAD=scale_grad,
                num_warps=cfg.dqueue_warps,
                num_stages=cfg.num_stages)
    return grad_query, grad_key, grad_queue


# ----------------------------------------------------------------------------------------------
# Argument checks (the messages of csrc/kcl/checks.h) and the registered ops
# ----------------------------------------------------------------------------------------------
FORWARD_OP = "kcl::kpos_forward_triton"
BACKWARD_OP = "kcl::kpos_backward_triton"


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
                     temperature: float = 0.07, reduction: str = "mean",
                     seed: Optional[int] = None) -> torch.Tensor:
    """kcl_ext.kpos_loss on the Triton kernels (see kcl_ext.kpos_loss for the arguments)."""
    query, key, queue = _amp.autocast_features(query, key, queue)
    _validation.check_all(query, key, queue, query_labels, queue_labels, k, temperature, reduction,
                          seed)
    _check_device(query, "kpos_loss")
    loss_rows = torch.ops.kcl.kpos_forward_triton(
        query, key, queue, query_labels, queue_labels, seed_tensor(seed, query), k,
        float(temperature), _autograd.query_grad_wanted(query))[0]
    if reduction == "sum":
        loss_rows = loss_rows.sum()
    elif reduction == "mean":
        loss_rows = loss_rows.mean()
    return loss_rows.to(query.dtype)
