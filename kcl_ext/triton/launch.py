"""Launch configuration and host launchers of the kpos_loss Triton kernels.

`LaunchConfig` fixes block sizes, warps and grid sizes per device and dtype; `_forward` and
`_backward` prepare the inputs (label sorting, segments, the empty-slot bias), allocate the
outputs and launch the kernels of kernels.py through `_launch` in a fixed order. ops.py checks
the arguments and registers the ops that call them.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import _autograd
from .kernels import (LOG2E, MAX_EXTRACT_PASSES, SPARSE_CLASSES, SPARSE_NONE, SPARSE_PAIRS,
                      _backward_dqueue_kernel, _backward_rows_kernel, _forward_kernel,
                      _forward_merge_kernel, _runtime_range_probe, _segment_piece_kernel,
                      _select_kernel, _target_kernel)

# Under TRITON_INTERPRET=1, triton.jit returns an InterpretedFunction that runs on CPU tensors.
INTERPRETED = not isinstance(_forward_kernel, triton.runtime.jit.JITFunction)
if INTERPRETED and isinstance(tl.max, triton.runtime.jit.JITFunction):
    raise ImportError("kcl_ext.triton: TRITON_INTERPRET=1 was set after triton was imported, so "
                      "Triton's own helpers are not interpreted; set it before importing triton")


def _launch(fn, grid, *args, **kwargs):
    """fn[grid](*args, **kwargs) through wrap_triton, so that torch.compile traces the launch;
    interpreted kernels run as they are. tools/triton_compile_check.py swaps this function
    to record launches."""
    (fn if INTERPRETED else wrap_triton(fn))[grid](*args, **kwargs)


_for_loops_cache: list[bool] = []


def _for_loops_work() -> bool:
    """Whether `for` loops with runtime bounds run: always when compiled; in the interpreter not
    with Triton 3.6 and numpy >= 2.4 (see "Loops" in kernels.py)."""
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
        # sm_90a (tools/triton_compile_check.py --check-spills).
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
        # Triton 3.6's layout pass rejects its other tile shapes and forms
        # (tools/triton_compile_check.py).
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
    and contiguous inputs bitwise alike, as the contract requires (tools/triton_compile_check.py
    compares the layouts)."""
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
