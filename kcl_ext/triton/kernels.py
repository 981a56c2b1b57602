"""The @triton.jit kernels of kpos_loss and their compile-time constants.

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

launch.py chooses the block sizes and grids and launches these kernels; ops.py registers the ops
that run them.
"""
from __future__ import annotations

import triton
import triton.language as tl

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
# A probe of the interpreter (launch.py runs it once): whether `for` loops with a runtime bound
# run (see "Loops" above)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _runtime_range_probe(out_ptr, n):
    total = 0
    for i in range(0, n):
        total += i
    tl.store(out_ptr, total)
