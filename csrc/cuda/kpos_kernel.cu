// CUDA kernels of kpos_loss (docs/kpos_loss.md is the contract; csrc/cpu/kpos_kernel.cpp is the
// same algorithm on the CPU; docs/cuda_kernels.md lists the kernels and their grids):
//
//   loss_i = lse_i - q_i . t_i / tau,   t_i = (key_i + sum_{j in S_i} queue_j) / |P_i|
//
// * selection: the queue labels are sorted once, so the same-class entries of a query are one
//   contiguous range; an exact radix select finds each row's rank threshold and the selected
//   indices are emitted in ascending order (k > 0). k = -1 needs only the range sizes.
// * target: t_i sums a list of queue rows per query (the k selected rows, or the class's range
//   of the sorted queue, long ranges through fixed chunk sums), in a fixed order.
// * dense pass (tile_kernel with ForwardPolicy): FlashAttention's forward with the queue as keys
//   and values. Empty slots are an additive -inf; no label and no hash in the loop. The queue is
//   split across blocks; the splits merge in split order (forward_rows_kernel per row, then
//   softmax_mean_kernel over row x column elements).
// * backward: d(query) and d(key) are elementwise per row; d(queue) (tile_kernel with
//   QueueGradPolicy) recomputes P^T . query per queue tile and subtracts the sparse positive
//   term in ascending query order in its epilogue.
//
// No floating-point atomics; every sum has an order fixed by the shapes alone, so results are
// bitwise reproducible. Nothing of size N x Q is allocated. Kernels launch on the current stream
// with a launch check after each; nothing here synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>
#include <mutex>

#include "cuda/kpos_tiles.cuh"
#include "kcl/checks.h"
#include "kcl/kpos_common.h"
#include "kcl/signatures.h"

namespace kcl {
namespace cuda {
namespace {

// Blocks that one queue-split launch aims at (a few waves on current GPUs). A constant, so the
// split, and with it the rounding, depends on the shapes only, never on the GPU.
constexpr int64_t kTargetBlocks = 512;
constexpr int64_t kMinTilesPerSplit = 4;
constexpr int kSelectThreads = 256;
constexpr int kRowWarps = 4;  // rows per block of the one-warp-per-row kernels
constexpr int kElementThreads = 256;
constexpr int64_t kChunkRows = 128;  // rows per precomputed chunk sum of a long list

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
__device__ __forceinline__ T acc_exp(T x);
template <>
__device__ __forceinline__ float acc_exp<float>(float x) { return expf(x); }
template <>
__device__ __forceinline__ double acc_exp<double>(double x) { return exp(x); }
template <typename T>
__device__ __forceinline__ T acc_log(T x);
template <>
__device__ __forceinline__ float acc_log<float>(float x) { return logf(x); }
template <>
__device__ __forceinline__ double acc_log<double>(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// A product that is rounded on its own: never contracted into an FMA with a later add, so that
// the own logit is the same value wherever it is used (forward_rows_kernel, query_key_grad_kernel).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Butterfly reductions: every participating lane ends with the same bits (x + y == y + x).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = max_keep_nan(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}
// Over the 4 lanes that share a row of the accumulator layout.
template <typename T>
__device__ __forceinline__ T quad_sum(T v) {
  v += __shfl_xor_sync(kFullMask, v, 1);
  return v + __shfl_xor_sync(kFullMask, v, 2);
}
template <typename T>
__device__ __forceinline__ T quad_max(T v) {
  v = max_keep_nan(v, __shfl_xor_sync(kFullMask, v, 1));
  return max_keep_nan(v, __shfl_xor_sync(kFullMask, v, 2));
}

template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  const int64_t rs = t.stride(0), cs = t.stride(1);
  const auto address = reinterpret_cast<uintptr_t>(t.data_ptr());
  const bool vec16 = address % 16 == 0 && (cs == 1 || cols <= 1) &&
                     ((rs * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0 || rows <= 1);
  return {t.data_ptr<scalar_t>(), rows, cols, rs, cs, vec16};
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

int element_blocks(int64_t total) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, kElementThreads), 65535)));
}

// ---------------------------------------------------------------------------------------------
// Selection
// ---------------------------------------------------------------------------------------------

struct SortedLabels {
  at::Tensor labels;  // ascending, int64
  at::Tensor index;   // the original index of labels[t]; ascending within a label (stable sort)
};

SortedLabels sort_labels(const at::Tensor& labels_long) {
  auto sorted = at::sort(labels_long, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  return {std::get<0>(sorted).contiguous(), std::get<1>(sorted).contiguous()};
}

// Rank threshold and |P_i| of row blockIdx.x. The k-th smallest rank among the row's same-class
// entries is found 8 bits at a time from the top: count the candidates that share the prefix
// found so far by their next digit (integer histograms), descend into the digit holding the
// k-th. Ranks never tie, so the threshold is exactly the CPU kernel's nth_element result.
__global__ void __launch_bounds__(kSelectThreads)
select_kernel(const int64_t* query_labels, const int64_t* sorted_labels,
              const int64_t* sorted_index, int64_t q, int64_t k, uint32_t seed_k,
              int64_t* thresholds, int64_t* num_positives) {
  __shared__ int histogram[256];
  __shared__ uint32_t shared_prefix;
  __shared__ int64_t shared_remaining;
  const int64_t i = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t label = query_labels[i];
  int64_t begin = 0, end = 0;
  if (label >= 0) label_range(sorted_labels, q, label, &begin, &end);
  int64_t threshold = kThresholdNone, num_selected = 0;
  if (!trivial_selection(label, k, end - begin, &threshold, &num_selected)) {
    const uint32_t rk = row_key(seed_k, i);
    uint32_t prefix = 0, mask = 0;
    int64_t remaining = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += kSelectThreads) histogram[b] = 0;
      __syncthreads();
      for (int64_t t = begin + tid; t < end; t += kSelectThreads) {
        const uint32_t rank = entry_rank(rk, sorted_index[t]);
        if ((rank & mask) == prefix) atomicAdd(&histogram[(rank >> shift) & 0xFFu], 1);
      }
      __syncthreads();
      if (tid == 0) {
        int64_t below = 0;
        int digit = 0;
        for (; digit < 255; ++digit) {
          if (below + histogram[digit] >= remaining) break;
          below += histogram[digit];
        }
        shared_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
        shared_remaining = remaining - below;
      }
      __syncthreads();
      prefix = shared_prefix;
      remaining = shared_remaining;
      mask |= 0xFFu << shift;
    }
    threshold = prefix;
    num_selected = k;
  }
  if (tid == 0) {
    thresholds[i] = threshold;
    num_positives[i] = 1 + num_selected;
  }
}

// The selected queue indices of row blockIdx.x in ascending order into out[i][0, width) (which
// the caller filled with -1): the row's candidates are visited in sorted-label order (ascending
// queue index within a label) and compacted with a block-wide prefix count.
__global__ void __launch_bounds__(kSelectThreads)
emit_positives_kernel(const int64_t* query_labels, const int64_t* sorted_labels,
                      const int64_t* sorted_index, int64_t q, uint32_t seed_k,
                      const int64_t* thresholds, const int64_t* num_positives, int64_t width,
                      int64_t* out) {
  constexpr int kSelectWarps = kSelectThreads / 32;
  __shared__ int warp_counts[kSelectWarps];
  const int64_t i = blockIdx.x;
  if (num_positives[i] <= 1) return;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const uint32_t rk = row_key(seed_k, i);
  const int64_t threshold = thresholds[i];
  int64_t begin = 0, end = 0;
  label_range(sorted_labels, q, query_labels[i], &begin, &end);
  int64_t written = 0;
  for (int64_t t0 = begin; t0 < end; t0 += kSelectThreads) {
    const int64_t t = t0 + tid;
    const int64_t j = t < end ? sorted_index[t] : -1;
    const bool chosen = t < end && is_selected(rk, threshold, j);
    const uint32_t ballot = __ballot_sync(kFullMask, chosen);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int64_t before = 0, total = 0;
    for (int w = 0; w < kSelectWarps; ++w) {
      before += w < warp ? warp_counts[w] : 0;
      total += warp_counts[w];
    }
    const int64_t slot = written + before + __popc(ballot & ((1u << lane) - 1u));
    if (chosen && slot < width) out[i * width + slot] = j;
    written += total;
    __syncthreads();
  }
}

struct Selection {
  at::Tensor thresholds;     // int64 [N]
  at::Tensor num_positives;  // int64 [N]
};

Selection select_rows(const at::Tensor& query_labels, const SortedLabels& sorted_queue, int64_t k,
                      uint32_t seed_k, cudaStream_t stream) {
  const int64_t n = query_labels.size(0);
  Selection sel{at::empty({n}, query_labels.options()), at::empty({n}, query_labels.options())};
  if (n == 0) return sel;
  select_kernel<<<n, kSelectThreads, 0, stream>>>(
      query_labels.data_ptr<int64_t>(), sorted_queue.labels.data_ptr<int64_t>(),
      sorted_queue.index.data_ptr<int64_t>(), sorted_queue.labels.size(0), k, seed_k,
      sel.thresholds.data_ptr<int64_t>(), sel.num_positives.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sel;
}

at::Tensor emit_positives(const at::Tensor& query_labels, const SortedLabels& sorted_queue,
                          const Selection& sel, uint32_t seed_k, int64_t width,
                          cudaStream_t stream) {
  const int64_t n = query_labels.size(0);
  at::Tensor out = at::full({n, width}, -1, query_labels.options());
  if (n > 0 && width > 0) {
    emit_positives_kernel<<<n, kSelectThreads, 0, stream>>>(
        query_labels.data_ptr<int64_t>(), sorted_queue.labels.data_ptr<int64_t>(),
        sorted_queue.index.data_ptr<int64_t>(), sorted_queue.labels.size(0), seed_k,
        sel.thresholds.data_ptr<int64_t>(), sel.num_positives.data_ptr<int64_t>(), width,
        out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Lists of rows summed in a fixed order: the positive target (the k selected queue rows, or
// the class's range of the sorted queue for k = -1) and, for k = -1, the class sums of the
// query rows' shares of the queue's gradient.
// ---------------------------------------------------------------------------------------------

// Where row r's list lies in `index`: [r k, r k + |P_r| - 1) of the selected positives, or the
// range of label[r] among `sorted_keys`.
struct ListRanges {
  enum Mode { kEmpty, kPositives, kLabel } mode;
  int64_t k;
  const int64_t* num_positives;  // kPositives
  const int64_t* labels;         // kLabel: the row's label
  const int64_t* sorted_keys;    // kLabel: ascending labels, `size` of them
  int64_t size;

  __device__ void of(int64_t r, int64_t* begin, int64_t* end) const {
    *begin = *end = 0;
    if (mode == kPositives) {
      *begin = r * k;
      *end = *begin + num_positives[r] - 1;
    } else if (mode == kLabel && labels[r] >= 0) {
      label_range(sorted_keys, size, labels[r], begin, end);
    }
  }
};

// A list of rows of `source` named by `index` (negative entries are padding: skipped), with the
// sums of its consecutive chunks of kChunkRows entries (chunk_sums, [chunks, D], or null when
// no list is that long).
template <typename source_t, typename acc_t>
struct RowList {
  Rows<source_t> source;
  const int64_t* index;
  int64_t size;
  const acc_t* chunk_sums;

  // acc + sum of the rows index[begin, end) in column c: entries one by one up to a chunk
  // boundary, whole chunks, then the tail; the same order for every row with the same range.
  __device__ acc_t add_range(acc_t acc, int64_t begin, int64_t end, int64_t c) const {
    int64_t t = begin;
    for (; t < end && t % kChunkRows != 0; ++t)
      if (index[t] >= 0) acc += static_cast<acc_t>(source.at(index[t], c));
    if (chunk_sums != nullptr)
      for (; t + kChunkRows <= end; t += kChunkRows) acc += chunk_sums[(t / kChunkRows) * source.cols + c];
    for (; t < end; ++t)
      if (index[t] >= 0) acc += static_cast<acc_t>(source.at(index[t], c));
    return acc;
  }
};

template <typename source_t, typename acc_t>
__global__ void __launch_bounds__(kElementThreads)
chunk_sums_kernel(RowList<source_t, acc_t> list, acc_t* out) {
  const int64_t d = list.source.cols, chunks = (list.size + kChunkRows - 1) / kChunkRows;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < chunks * d;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t chunk = e / d, c = e % d;
    const int64_t begin = chunk * kChunkRows;
    const int64_t end = begin + kChunkRows < list.size ? begin + kChunkRows : list.size;
    acc_t acc = acc_t(0);
    for (int64_t t = begin; t < end; ++t)
      if (list.index[t] >= 0) acc += static_cast<acc_t>(list.source.at(list.index[t], c));
    out[e] = acc;
  }
}

// out[r][c] = (base[r][c] + sum of row r's list in column c) / |P_r|, where base and the
// division are optional (base.rows == 0, num_positives == nullptr).
template <typename base_t, typename source_t, typename acc_t>
__global__ void __launch_bounds__(kElementThreads)
list_sum_kernel(Rows<base_t> base, RowList<source_t, acc_t> list, ListRanges ranges,
                const int64_t* num_positives, int64_t rows, acc_t* out) {
  const int64_t d = list.source.cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < rows * d;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / d, c = e % d;
    int64_t begin, end;
    ranges.of(r, &begin, &end);
    acc_t acc = base.rows > 0 ? static_cast<acc_t>(base.at(r, c)) : acc_t(0);
    acc = list.add_range(acc, begin, end, c);
    if (num_positives != nullptr) acc *= acc_t(1) / static_cast<acc_t>(num_positives[r]);
    out[e] = acc;
  }
}

// The chunk sums of `list` (when some range may hold a whole chunk), then list_sum_kernel.
template <typename base_t, typename source_t, typename acc_t>
void launch_list_sum(const Rows<base_t>& base, RowList<source_t, acc_t> list,
                     const ListRanges& ranges, bool long_ranges, const int64_t* num_positives,
                     int64_t rows, acc_t* out, const at::TensorOptions& acc_opts,
                     cudaStream_t stream) {
  const int64_t d = list.source.cols;
  at::Tensor chunk_sums;
  list.chunk_sums = nullptr;
  if (long_ranges && list.size >= kChunkRows && d > 0) {
    chunk_sums = at::empty({ceil_div(list.size, kChunkRows), d}, acc_opts);
    chunk_sums_kernel<source_t, acc_t><<<element_blocks(chunk_sums.numel()), kElementThreads, 0,
                                         stream>>>(list, chunk_sums.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    list.chunk_sums = chunk_sums.data_ptr<acc_t>();
  }
  if (rows * d == 0) return;
  list_sum_kernel<base_t, source_t, acc_t><<<element_blocks(rows * d), kElementThreads, 0, stream>>>(
      base, list, ranges, num_positives, rows, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// The tile kernel: a block's 64 resident rows against a range of streamed tiles (kpos_tiles.cuh),
// with the policy turning scores into the P of the second product and writing the results.
// ---------------------------------------------------------------------------------------------

// Forward: resident = query rows (blockIdx.x), streamed = the queue tiles of split blockIdx.y,
// O = the exp-weighted sum of the queue rows for the D slice blockIdx.z (only with_mean).
// Writes the split's (running max, sum of exponentials) per row and the unnormalised O.
template <typename scalar_t, typename acc_t, int NT, int NV>
struct ForwardPolicy {
  struct Params {
    Rows<scalar_t> query, queue;
    const float* bias;  // [Q]: 0 for a valid entry, -inf for an empty slot
    acc_t inv_tau;
    int64_t tiles_per_split, num_tiles;
    bool with_mean;
    acc_t *part_max, *part_sum, *part_mean;  // [splits, N], [splits, N], [splits, N, D]
  };
  static constexpr int kColumnVectors = 1;
  static constexpr bool kRescale = true;
  static constexpr int BN = 8 * NT, DV = 8 * NV;

  const Params p;  // a copy: a reference to a kernel parameter can force a local copy
  int64_t row0, tile_begin, tile_end, d0;
  bool with_values;
  acc_t run_max[2], run_sum[2];

  __device__ explicit ForwardPolicy(const Params& params) : p(params) {
    row0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
    tile_begin = static_cast<int64_t>(blockIdx.y) * p.tiles_per_split;
    tile_end = tile_begin + p.tiles_per_split < p.num_tiles ? tile_begin + p.tiles_per_split
                                                              : p.num_tiles;
    d0 = static_cast<int64_t>(blockIdx.z) * DV;
    with_values = p.with_mean;
    run_max[0] = run_max[1] = neg_inf<acc_t>();
    run_sum[0] = run_sum[1] = acc_t(0);
  }
  __device__ const Rows<scalar_t>& resident() const { return p.query; }
  __device__ const Rows<scalar_t>& streamed() const { return p.queue; }

  __device__ void load_columns(acc_t (*columns)[BN], int64_t col0) const {
    for (int c = threadIdx.x; c < BN; c += kThreads)
      columns[0][c] = col0 + c < p.queue.rows ? static_cast<acc_t>(p.bias[col0 + c]) : neg_inf<acc_t>();
  }

  // Online log-sum-exp over the tile; s becomes exp(s - running max), scale the factor that
  // rescales what was accumulated before.
  __device__ void transform(acc_t (&s)[NT][4], const acc_t (*columns)[BN], acc_t (&scale)[2]) {
    const int t = threadIdx.x % 4;
    acc_t tile_max[2] = {neg_inf<acc_t>(), neg_inf<acc_t>()};
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const acc_t bias = columns[0][8 * n + 2 * t + e];
        s[n][e] = s[n][e] * p.inv_tau + bias;
        s[n][2 + e] = s[n][2 + e] * p.inv_tau + bias;
        tile_max[0] = max_keep_nan(tile_max[0], s[n][e]);  // a NaN logit reaches the loss
        tile_max[1] = max_keep_nan(tile_max[1], s[n][2 + e]);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const acc_t new_max = max_keep_nan(run_max[h], quad_max(tile_max[h]));
      const bool none = new_max == neg_inf<acc_t>();  // nothing valid yet: no -inf - -inf
      scale[h] = none ? acc_t(1) : acc_exp(run_max[h] - new_max);
      acc_t sum = acc_t(0);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          acc_t& x = s[n][2 * h + e];
          x = none ? acc_t(0) : acc_exp(x - new_max);
          sum += x;
        }
      }
      run_sum[h] = run_sum[h] * scale[h] + sum;
      run_max[h] = new_max;
    }
  }

  __device__ void finish(const acc_t (&o)[NV][4]) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int64_t n = p.query.rows, d = p.query.cols, split = blockIdx.y;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const acc_t sum = quad_sum(run_sum[h]);
      const int64_t i = row0 + 16 * warp + g + 8 * h;
      if (i >= n) continue;
      if (t == 0 && blockIdx.z == 0) {
        p.part_max[split * n + i] = run_max[h];
        p.part_sum[split * n + i] = sum;
      }
      if (!with_values) continue;
#pragma unroll
      for (int v = 0; v < NV; ++v) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t col = d0 + 8 * v + 2 * t + e;
          if (col < d) p.part_mean[(split * n + i) * d + col] = o[v][2 * h + e];
        }
      }
    }
  }
};

// The power of two c = 2^(15 - e) with max|g| < 2^e, so that every c |g_i| p_ij < 2^15 (p_ij <= 1)
// stays well inside float16's range (65504) and above its subnormals, which a gradient tile
// g_i p_ij of a mean over N = 256 rows and a queue of 65536 would reach (about 1e-7); 1 if max|g|
// is 0 or not finite. Clamped so that c and 1/c are normal floats. With `inverse`, 1/c, made
// exactly (ldexpf), not by a division that --use_fast_math would approximate.
template <typename acc_t>
__device__ __forceinline__ acc_t grad_tile_scale(acc_t grad_abs_max, bool inverse) {
  const float m = static_cast<float>(grad_abs_max);
  if (!(m > 0.0f) || !isfinite(m)) return acc_t(1);
  int e;
  frexpf(m, &e);  // m = f 2^e, 0.5 <= f < 1
  const int exponent = max(-126, min(126, 15 - e));
  return static_cast<acc_t>(ldexpf(1.0f, inverse ? -exponent : exponent));
}

// Backward of the queue: resident = queue rows (blockIdx.x), streamed = every block of query
// rows, O = sum_i g_i p_ij query_i for the D slice blockIdx.y. The epilogue scales by 1/tau,
// subtracts the sparse positive term of each queue row in ascending query order, and writes
// grad_queue in the input dtype.
template <typename scalar_t, typename acc_t, int NT, int NV>
struct QueueGradPolicy {
  struct Params {
    Rows<scalar_t> queue, query;
    const float* bias;  // [Q]
    const acc_t* lse;   // [N]
    const acc_t* grad_rows;  // [N]
    acc_t inv_tau;
    // Sparse term of queue row j: - sum over t in its range of share[rows[t] / row_divisor].
    // k > 0: the range of j among the sorted selected indices (keys); k = -1: the first entry of
    // queue_labels[j] among the sorted query labels (share = the class sums). None for k = 0.
    int mode;  // 0: none, 1: by queue index, 2: by queue label
    const int64_t* keys;
    int64_t num_keys;
    const int64_t* key_rows;
    int64_t row_divisor;
    const int64_t* queue_labels;
    const acc_t* share;  // [rows, D]
    scalar_t* grad_queue;  // [Q, D], contiguous
    // float16 tensor cores: max_i |g_i| on the device (a 0-dim tensor), for the power-of-two
    // scale of G before it is rounded to float16 (grad_tile_scale); null: no scale.
    const acc_t* grad_abs_max;
  };
  static constexpr int kColumnVectors = 2;
  static constexpr bool kRescale = false;
  static constexpr int BN = 8 * NT, DV = 8 * NV;

  const Params p;
  int64_t row0, tile_begin, tile_end, d0;
  bool with_values = true;
  acc_t bias[2];
  int64_t sparse_begin[2], sparse_end[2];
  acc_t grad_scale;  // c: a power of two; O accumulates c G^T query, finish divides by c

  __device__ explicit QueueGradPolicy(const Params& params) : p(params) {
    grad_scale = p.grad_abs_max != nullptr ? grad_tile_scale(*p.grad_abs_max, false) : acc_t(1);
    row0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
    tile_begin = 0;
    tile_end = (p.query.rows + BN - 1) / BN;
    d0 = static_cast<int64_t>(blockIdx.y) * DV;
    const int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t j = row0 + 16 * warp + g + 8 * h;
      const bool live = j < p.queue.rows;
      bias[h] = live ? static_cast<acc_t>(p.bias[j]) : neg_inf<acc_t>();
      sparse_begin[h] = sparse_end[h] = 0;
      if (live && p.mode == 1) {
        label_range(p.keys, p.num_keys, j, &sparse_begin[h], &sparse_end[h]);
      } else if (live && p.mode == 2 && p.queue_labels[j] >= 0) {
        label_range(p.keys, p.num_keys, p.queue_labels[j], &sparse_begin[h], &sparse_end[h]);
        if (sparse_end[h] > sparse_begin[h] + 1) sparse_end[h] = sparse_begin[h] + 1;
      }
    }
  }
  __device__ const Rows<scalar_t>& resident() const { return p.queue; }
  __device__ const Rows<scalar_t>& streamed() const { return p.query; }

  __device__ void load_columns(acc_t (*columns)[BN], int64_t col0) const {
    for (int c = threadIdx.x; c < BN; c += kThreads) {
      const bool live = col0 + c < p.query.rows;  // padding rows: g = 0
      columns[0][c] = live ? p.grad_rows[col0 + c] * grad_scale : acc_t(0);
      columns[1][c] = live ? p.lse[col0 + c] : acc_t(0);
    }
  }

  // s becomes c g_i exp(s_ij - lse_i), zero for an empty slot (c g_i comes with the columns).
  __device__ void transform(acc_t (&s)[NT][4], const acc_t (*columns)[BN], acc_t (&)[2]) const {
    const int t = threadIdx.x % 4;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = 8 * n + 2 * t + e;
        const acc_t grad = columns[0][c], lse = columns[1][c];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          acc_t& x = s[n][2 * h + e];
          x = grad * acc_exp(x * p.inv_tau + bias[h] - lse);
        }
      }
    }
  }

  __device__ void finish(const acc_t (&o)[NV][4]) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int64_t q = p.queue.rows, d = p.queue.cols;
    const acc_t inv_scale =  // 1/c, exact: a power of two
        p.grad_abs_max != nullptr ? grad_tile_scale(*p.grad_abs_max, true) : acc_t(1);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t j = row0 + 16 * warp + g + 8 * h;
      if (j >= q) continue;
#pragma unroll
      for (int v = 0; v < NV; ++v) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t col = d0 + 8 * v + 2 * t + e;
          if (col >= d) continue;
          acc_t value = (o[v][2 * h + e] * inv_scale) * p.inv_tau;
          for (int64_t s = sparse_begin[h]; s < sparse_end[h]; ++s)
            value -= p.share[(p.key_rows[s] / p.row_divisor) * d + col];
          p.grad_queue[j * d + col] = static_cast<scalar_t>(value);
        }
      }
    }
  }
};

template <typename Engine>
struct EngineSupported {
  static constexpr bool value = true;
};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
template <typename scalar_t>
struct EngineSupported<MmaEngine<scalar_t>> {  // never launched there (tensor_cores_usable)
  static constexpr bool value = false;
};
#endif

// minBlocksPerMultiprocessor = 1: left to its occupancy heuristic, ptxas caps these at 128
// registers and the float64 forward spills its accumulators.
template <typename Engine, typename Policy>
__global__ void __launch_bounds__(kThreads, 1)
tile_kernel(const typename Policy::Params params) {
  if constexpr (!EngineSupported<Engine>::value) {
    __trap();
  } else {
    using acc_t = typename Engine::acc_t;
    constexpr int NT = Engine::NT, NV = Engine::NV, BN = Engine::BN;
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ acc_t columns[Policy::kColumnVectors][BN];
    // The static shared memory that tensor_cores_usable counts (kcl/tile_engine_choice.h).
    static_assert(Policy::kColumnVectors <= tiles::kMaxColumnVectors &&
                      sizeof(columns) <= tiles::kTileStaticSmemBytes,
                  "tile_kernel: static shared memory beyond tiles::kTileStaticSmemBytes");
    Policy policy(params);
    const auto& resident = policy.resident();
    const auto& streamed = policy.streamed();
    Engine engine(smem, resident.cols);
    acc_t o[NV][4];
#pragma unroll
    for (int v = 0; v < NV; ++v) o[v][0] = o[v][1] = o[v][2] = o[v][3] = acc_t(0);
    const int64_t begin = policy.tile_begin, end = policy.tile_end;
    if (begin < end) engine.prologue(resident, policy.row0, streamed, begin * BN);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t index = tile - begin;
      // Safe to overwrite: the previous tile's readers passed the barrier at the loop's end.
      policy.load_columns(columns, tile * BN);
      if (tile + 1 < end) engine.prefetch(streamed, (tile + 1) * BN, index + 1);
      cp_async_commit();
      acc_t s[NT][4];
      engine.scores(s, resident, policy.row0, streamed, tile * BN, index);  // starts with a barrier
      acc_t scale[2];
      policy.transform(s, columns, scale);
      if (policy.with_values) {
        if constexpr (Policy::kRescale) {
#pragma unroll
          for (int v = 0; v < NV; ++v) {
            o[v][0] *= scale[0];
            o[v][1] *= scale[0];
            o[v][2] *= scale[1];
            o[v][3] *= scale[1];
          }
        }
        engine.accumulate(o, s, streamed, tile * BN, index, policy.d0);
      }
      __syncthreads();  // the tile buffer and the columns are free again
    }
    policy.finish(o);
  }
}

template <typename Engine, typename Policy>
void launch_tiles(dim3 grid, const typename Policy::Params& params, int64_t d, cudaStream_t stream) {
  auto kernel = tile_kernel<Engine, Policy>;
  const size_t smem = Engine::smem_bytes(d);
  if (smem > 48 * 1024) {
    // The opt-in above 48 KiB, once per kernel and device: the largest size set so far is kept,
    // and only a larger one calls cudaFuncSetAttribute again.
    static std::array<std::atomic<size_t>, C10_COMPILE_TIME_MAX_GPUS> opted_in{};
    static std::mutex mutex;
    const c10::DeviceIndex device = c10::cuda::current_device();
    TORCH_INTERNAL_ASSERT(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS);
    std::atomic<size_t>& set = opted_in[device];
    if (smem > set.load(std::memory_order_acquire)) {
      std::lock_guard<std::mutex> lock(mutex);
      if (smem > set.load(std::memory_order_relaxed)) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
        set.store(smem, std::memory_order_release);
      }
    }
  }
  kernel<<<grid, kThreads, smem, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// The own-key logit q_i . key_i and q_i . t_i (before 1/tau), one warp per row, summed in the
// same order: a row whose target is its key gets bitwise equal values, so its loss is exactly 0.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void row_dots(const Rows<scalar_t>& query, const Rows<scalar_t>& key,
                                         const acc_t* target, int64_t i, int lane, acc_t* own,
                                         acc_t* positive) {
  const int64_t d = query.cols;
  acc_t a = acc_t(0), b = acc_t(0);
  for (int64_t c = lane; c < d; c += 32) {
    const acc_t x = to_acc(query.at(i, c));
    a = fma(x, to_acc(key.at(i, c)), a);  // explicit FMAs: both sums round alike, whatever
    b = fma(x, target[i * d + c], b);     // the compiler's contraction choices
  }
  *own = warp_sum(a);
  *positive = warp_sum(b);
}

// Per row: the own key opens the row, the splits merge in split order. Writes lse and the loss
// and, with weights, the factor of each split's O (and of the own key) in the softmax mean.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(32 * kRowWarps)
forward_rows_kernel(Rows<scalar_t> query, Rows<scalar_t> key, const acc_t* target,
                    const acc_t* part_max, const acc_t* part_sum, int64_t splits, acc_t inv_tau,
                    acc_t* lse, acc_t* loss_rows, acc_t* weights) {
  const int lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  const int64_t n = query.rows;
  if (i >= n) return;
  acc_t own, positive;
  row_dots(query, key, target, i, lane, &own, &positive);
  own = mul_rn(own, inv_tau);
  positive = mul_rn(positive, inv_tau);
  acc_t row_max = own;
  for (int64_t s = lane; s < splits; s += 32)
    // != 0 rather than > 0: a NaN split (a NaN logit) is merged, not dropped.
    if (part_sum[s * n + i] != acc_t(0)) row_max = max_keep_nan(row_max, part_max[s * n + i]);
  row_max = warp_max(row_max);
  acc_t sum = acc_t(0);
  for (int64_t s = lane; s < splits; s += 32)
    if (part_sum[s * n + i] != acc_t(0)) sum += part_sum[s * n + i] * acc_exp(part_max[s * n + i] - row_max);
  sum = warp_sum(sum) + acc_exp(own - row_max);
  const acc_t row_lse = row_max + acc_log(sum);
  if (lane == 0) {
    lse[i] = row_lse;
    loss_rows[i] = row_lse - positive;
  }
  if (weights != nullptr) {
    const acc_t inv_sum = acc_t(1) / sum;
    if (lane == 0) weights[i] = acc_exp(own - row_max) * inv_sum;
    for (int64_t s = lane; s < splits; s += 32) {
      weights[(s + 1) * n + i] =
          part_sum[s * n + i] != acc_t(0) ? acc_exp(part_max[s * n + i] - row_max) * inv_sum : acc_t(0);
    }
  }
}

// softmax_mean[i][c] = w_own key[i][c] + sum over splits in order of w_s O_s[i][c].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kElementThreads)
softmax_mean_kernel(Rows<scalar_t> key, const acc_t* part_mean, const acc_t* weights,
                    int64_t splits, acc_t* out) {
  const int64_t n = key.rows, d = key.cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n * d;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / d, c = e % d;
    acc_t acc = weights[i] * to_acc(key.at(i, c));
    for (int64_t s = 0; s < splits; ++s) acc += weights[(s + 1) * n + i] * part_mean[s * n * d + e];
    out[e] = acc;
  }
}

struct Split {
  int64_t count = 0, tiles_per_split = 0;
};

// About kTargetBlocks blocks in all, at least kMinTilesPerSplit tiles per split.
Split split_queue(int64_t num_tiles, int64_t other_blocks) {
  Split split;
  if (num_tiles == 0) return split;
  int64_t want = ceil_div(kTargetBlocks, std::max<int64_t>(other_blocks, 1));
  want = std::min(want, std::max<int64_t>(num_tiles / kMinTilesPerSplit, 1));
  want = std::max<int64_t>(std::min(want, num_tiles), 1);
  split.tiles_per_split = ceil_div(num_tiles, want);
  split.count = ceil_div(num_tiles, split.tiles_per_split);
  return split;
}

// The dense pass: lse and loss per row and, with softmax_mean defined ([N, D]), the softmax
// mean m_i = p_i0 key_i + sum_j p_ij queue_j.
template <typename Engine, typename scalar_t>
void dense_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& queue,
                   const at::Tensor& bias, const at::Tensor& target, double temperature,
                   at::Tensor& lse, at::Tensor& loss_rows, at::Tensor* softmax_mean,
                   cudaStream_t stream) {
  using acc_t = typename Engine::acc_t;
  using Policy = ForwardPolicy<scalar_t, acc_t, Engine::NT, Engine::NV>;
  const int64_t n = query.size(0), q = queue.size(0), d = query.size(1);
  const auto acc_opts = lse.options();
  const bool with_mean = softmax_mean != nullptr;
  const int64_t row_blocks = ceil_div(n, kBlockRows);
  const int64_t value_slices = std::max<int64_t>(1, ceil_div(d, Engine::DV));
  const int64_t num_tiles = ceil_div(q, Engine::BN);
  // Without the softmax mean there is one value slice (no second product), so the queue is split
  // across the row blocks alone; with it, across row blocks x value slices. The split depends on
  // the shapes and with_mean only (never on the GPU); for D > DV, lse and the loss with and
  // without the query's gradient can differ in the last bits (another grouping of the sums).
  const int64_t d_slices = with_mean ? value_slices : 1;
  const Split split = split_queue(num_tiles, row_blocks * d_slices);
  at::Tensor part_max = at::empty({split.count, n}, acc_opts);
  at::Tensor part_sum = at::empty({split.count, n}, acc_opts);
  at::Tensor part_mean = at::empty({with_mean ? split.count : 0, n, d}, acc_opts);
  const acc_t inv_tau = static_cast<acc_t>(1.0 / temperature);
  if (split.count > 0) {
    typename Policy::Params params{rows_of<scalar_t>(query), rows_of<scalar_t>(queue),
                                   bias.data_ptr<float>(), inv_tau, split.tiles_per_split,
                                   num_tiles, with_mean, part_max.data_ptr<acc_t>(),
                                   part_sum.data_ptr<acc_t>(), ptr_or_null<acc_t>(part_mean)};
    const dim3 grid(row_blocks, split.count, d_slices);
    launch_tiles<Engine, Policy>(grid, params, d, stream);
  }
  at::Tensor weights = with_mean ? at::empty({split.count + 1, n}, acc_opts) : at::Tensor();
  forward_rows_kernel<scalar_t, acc_t><<<ceil_div(n, kRowWarps), 32 * kRowWarps, 0, stream>>>(
      rows_of<scalar_t>(query), rows_of<scalar_t>(key), target.data_ptr<acc_t>(),
      ptr_or_null<acc_t>(part_max), ptr_or_null<acc_t>(part_sum), split.count, inv_tau,
      lse.data_ptr<acc_t>(), loss_rows.data_ptr<acc_t>(), ptr_or_null<acc_t>(weights));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (with_mean && n * d > 0) {
    softmax_mean_kernel<scalar_t, acc_t><<<element_blocks(n * d), kElementThreads, 0, stream>>>(
        rows_of<scalar_t>(key), ptr_or_null<acc_t>(part_mean), weights.data_ptr<acc_t>(),
        split.count, softmax_mean->data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Per row i, one warp: d key_i = g_i (p_i0 - 1/|P_i|) q_i / tau and d query_i = g_i (m_i - t_i)
// / tau. The own logit is summed exactly as in the forward, so p_i0 = exp(0) = 1 for a row
// whose lse is its own logit.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(32 * kRowWarps)
query_key_grad_kernel(Rows<scalar_t> query, Rows<scalar_t> key, const acc_t* target,
                      const acc_t* softmax_mean, const acc_t* lse, const acc_t* grad_rows,
                      const int64_t* num_positives, acc_t inv_tau, scalar_t* grad_query,
                      scalar_t* grad_key) {
  const int lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  const int64_t n = query.rows, d = query.cols;
  if (i >= n) return;
  acc_t own, positive;
  row_dots(query, key, target, i, lane, &own, &positive);
  const acc_t grad = grad_rows[i];
  // The forward's own logit, bit for bit: p_i0 = exp(0) = 1 where lse_i is the own logit.
  const acc_t own_logit = mul_rn(own, inv_tau);
  const acc_t key_coef =
      grad * (acc_exp(own_logit - lse[i]) - acc_t(1) / static_cast<acc_t>(num_positives[i])) * inv_tau;
  const acc_t query_coef = grad * inv_tau;
  for (int64_t c = lane; c < d; c += 32) {
    if (grad_key != nullptr) grad_key[i * d + c] = static_cast<scalar_t>(to_acc(query.at(i, c)) * key_coef);
    if (grad_query != nullptr)
      grad_query[i * d + c] =
          static_cast<scalar_t>((softmax_mean[i * d + c] - target[i * d + c]) * query_coef);
  }
}

// sm_80+, D <= 256, and the kernel's dynamic plus static shared memory within the device's
// opt-in limit per block (sm_86 / sm_89 have 99 KiB: not enough for 240 < D <= 256).
bool tensor_cores_usable(int64_t d) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return tiles::tensor_cores_usable(d, prop->major, prop->sharedMemPerBlockOptin);
}

template <typename Engine>
struct Tag {
  using type = Engine;
};

// body(Tag<Engine>{}) with the tile engine for scalar_t and D: tensor cores for float16 and
// bfloat16 where tensor_cores_usable (sm_80+, D <= 256, shared memory fits), FMA otherwise.
template <typename scalar_t, typename Body>
void with_engine(int64_t d, Body&& body) {
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    if (tensor_cores_usable(d)) {
      body(Tag<MmaEngine<scalar_t>>{});
      return;
    }
  }
  body(Tag<SimtEngine<scalar_t>>{});
}

at::Tensor empty_slot_bias(const at::Tensor& queue_labels_long) {
  return at::zeros(queue_labels_long.sizes(), queue_labels_long.options().dtype(at::kFloat))
      .masked_fill_(queue_labels_long < 0, -std::numeric_limits<float>::infinity());
}

// ---------------------------------------------------------------------------------------------
// Registered ops
// ---------------------------------------------------------------------------------------------

KposForwardResult kpos_forward_cuda(const at::Tensor& query, const at::Tensor& key,
                                    const at::Tensor& queue, const at::Tensor& query_labels,
                                    const at::Tensor& queue_labels, int64_t k, double temperature,
                                    std::optional<int64_t> seed, bool query_grad) {
  check_forward_args(query, key, queue, query_labels, queue_labels, k, temperature);
  c10::cuda::CUDAGuard device_guard(query.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n = query.size(0), q = queue.size(0), d = query.size(1);
  const auto acc_type = acc_type_of(query.scalar_type());
  const auto acc_opts = query.options().dtype(acc_type);
  const auto long_opts = query.options().dtype(at::kLong);
  const int64_t resolved_seed = resolve_seed(seed);  // drawn even for N = 0, like the CPU op
  const int64_t width = k > 0 ? k : 0;
  at::Tensor loss_rows = at::empty({n}, acc_opts);
  at::Tensor lse = at::empty({n}, acc_opts);
  at::Tensor softmax_mean = at::empty({query_grad ? n : 0, d}, acc_opts);
  if (n == 0) {
    return {loss_rows, lse, at::empty({0, width}, long_opts), at::empty({0}, long_opts),
            at::empty({0, d}, acc_opts), softmax_mean};
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor qlab = query_labels.to(at::kLong).contiguous();
  const at::Tensor klab = queue_labels.to(at::kLong).contiguous();
  const SortedLabels sorted_queue = sort_labels(klab);
  const uint32_t seed_k = seed_key(resolved_seed);
  const Selection sel = select_rows(qlab, sorted_queue, k, seed_k, stream);
  at::Tensor positives = k > 0 ? emit_positives(qlab, sorted_queue, sel, seed_k, width, stream)
                               : at::empty({n, 0}, long_opts);
  const at::Tensor bias = empty_slot_bias(klab);
  at::Tensor target = at::empty({n, d}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(),
                                  "kpos_forward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    // t_i = (key_i + the listed queue rows) / |P_i|.
    ListRanges ranges{ListRanges::kEmpty, k, nullptr, nullptr, nullptr, 0};
    RowList<scalar_t, acc_t> list{rows_of<scalar_t>(queue), nullptr, 0, nullptr};
    if (k > 0) {
      ranges.mode = ListRanges::kPositives;
      ranges.num_positives = sel.num_positives.data_ptr<int64_t>();
      list.index = positives.data_ptr<int64_t>();
      list.size = n * k;
    } else if (k == -1) {
      ranges = {ListRanges::kLabel, k, nullptr, qlab.data_ptr<int64_t>(),
                sorted_queue.labels.data_ptr<int64_t>(), q};
      list.index = ptr_or_null<int64_t>(sorted_queue.index);
      list.size = q;
    }
    launch_list_sum<scalar_t, scalar_t, acc_t>(rows_of<scalar_t>(key), list, ranges,
                                               /*long_ranges=*/k == -1 || k >= kChunkRows,
                                               sel.num_positives.data_ptr<int64_t>(), n,
                                               target.data_ptr<acc_t>(), acc_opts, stream);
    with_engine<scalar_t>(d, [&](auto tag) {
      using Engine = typename decltype(tag)::type;
      dense_forward<Engine, scalar_t>(query, key, queue, bias, target, temperature, lse, loss_rows,
                                      query_grad ? &softmax_mean : nullptr, stream);
    });
  });
  return {loss_rows, lse, positives, sel.num_positives, target, softmax_mean};
}

KposBackwardResult kpos_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& query,
                                      const at::Tensor& key, const at::Tensor& queue,
                                      const at::Tensor& query_labels,
                                      const at::Tensor& queue_labels, const at::Tensor& lse,
                                      const at::Tensor& positives,
                                      const at::Tensor& num_positives, const at::Tensor& target,
                                      const at::Tensor& softmax_mean, int64_t k,
                                      double temperature, std::array<bool, 3> output_mask) {
  check_backward_args(grad_rows, query, key, queue, query_labels, queue_labels, lse, positives,
                      num_positives, target, softmax_mean, k, temperature);
  const int64_t n = query.size(0), q = queue.size(0), d = query.size(1);
  const auto acc_type = acc_type_of(query.scalar_type());
  c10::cuda::CUDAGuard device_guard(query.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto gradient = [&](bool needed, const at::Tensor& like, int64_t rows) {
    return needed ? at::empty({rows, d}, like.options()) : at::empty({0}, like.options());
  };
  at::Tensor grad_query = gradient(output_mask[0], query, n);
  at::Tensor grad_key = gradient(output_mask[1], key, n);
  at::Tensor grad_queue = gradient(output_mask[2], queue, q);
  if (n == 0 || d == 0) {
    // No loss depends on the queue (N = 0) or nothing to write (D = 0).
    if (output_mask[2]) grad_queue.zero_();
    return {grad_query, grad_key, grad_queue};
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto acc_opts = query.options().dtype(acc_type);
  const at::Tensor qlab = query_labels.to(at::kLong).contiguous();
  const at::Tensor klab = queue_labels.to(at::kLong).contiguous();
  const at::Tensor grad_acc = grad_rows.to(acc_type).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor target_c = target.contiguous();
  const at::Tensor num_c = num_positives.contiguous();
  const at::Tensor bias = empty_slot_bias(klab);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(),
                                  "kpos_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const acc_t inv_tau = static_cast<acc_t>(1.0 / temperature);
    with_engine<scalar_t>(d, [&](auto tag) {
      using Engine = typename decltype(tag)::type;
      if (output_mask[0] || output_mask[1]) {
        at::Tensor mean = softmax_mean.contiguous();
        if (output_mask[0] && mean.size(0) != n) {
          // The forward did not accumulate it: one pass over the queue.
          at::Tensor scratch_lse = at::empty({n}, acc_opts), scratch_loss = at::empty({n}, acc_opts);
          mean = at::empty({n, d}, acc_opts);
          dense_forward<Engine, scalar_t>(query, key, queue, bias, target_c, temperature,
                                          scratch_lse, scratch_loss, &mean, stream);
        }
        query_key_grad_kernel<scalar_t, acc_t><<<ceil_div(n, kRowWarps), 32 * kRowWarps, 0, stream>>>(
            rows_of<scalar_t>(query), rows_of<scalar_t>(key), target_c.data_ptr<acc_t>(),
            output_mask[0] ? mean.data_ptr<acc_t>() : nullptr, lse_c.data_ptr<acc_t>(),
            grad_acc.data_ptr<acc_t>(), num_c.data_ptr<int64_t>(), inv_tau,
            output_mask[0] ? grad_query.data_ptr<scalar_t>() : nullptr,
            output_mask[1] ? grad_key.data_ptr<scalar_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (output_mask[2] && q > 0) {
        using Policy = QueueGradPolicy<scalar_t, acc_t, Engine::NT, Engine::NV>;
        // share_i = g_i q_i / (tau |P_i|): what each selected entry of row i loses.
        const at::Tensor share =
            (query.to(acc_type) * inv_tau * (grad_acc / num_c.to(acc_type)).unsqueeze(1)).contiguous();
        at::Tensor keys, key_rows, class_share;
        typename Policy::Params params{rows_of<scalar_t>(queue), rows_of<scalar_t>(query),
                                       bias.data_ptr<float>(), lse_c.data_ptr<acc_t>(),
                                       grad_acc.data_ptr<acc_t>(), inv_tau, 0, nullptr, 0,
                                       nullptr, 1, klab.data_ptr<int64_t>(),
                                       share.data_ptr<acc_t>(),
                                       grad_queue.data_ptr<scalar_t>(), nullptr};
        at::Tensor grad_abs_max;
        if constexpr (std::is_same_v<Engine, MmaEngine<at::Half>>) {
          // G = g p is rounded to float16 for the tensor cores: scale it by a power of two from
          // max|g| (on the device: no host synchronisation), divided out in the epilogue.
          grad_abs_max = grad_acc.abs().max();
          params.grad_abs_max = grad_abs_max.data_ptr<acc_t>();
        }
        if (k > 0) {
          // (queue index, query row) pairs sorted by queue index; the stable sort keeps the
          // query rows of one index ascending.
          auto sorted = at::sort(positives.contiguous().view({-1}), /*stable=*/true, 0, false);
          keys = std::get<0>(sorted).contiguous();
          key_rows = std::get<1>(sorted).contiguous();
          params.mode = 1;
          params.keys = keys.data_ptr<int64_t>();
          params.num_keys = keys.numel();
          params.key_rows = key_rows.data_ptr<int64_t>();
          params.row_divisor = k;
        } else if (k == -1) {
          // Class sums of the shares over the query rows of each class; queue row j takes the
          // one of its label.
          const SortedLabels sorted_queries = sort_labels(qlab);
          class_share = at::empty({n, d}, acc_opts);
          ListRanges ranges{ListRanges::kLabel, k, nullptr, qlab.data_ptr<int64_t>(),
                            sorted_queries.labels.data_ptr<int64_t>(), n};
          RowList<acc_t, acc_t> list{rows_of<acc_t>(share), sorted_queries.index.data_ptr<int64_t>(),
                                     n, nullptr};
          launch_list_sum<acc_t, acc_t, acc_t>(Rows<acc_t>{nullptr, 0, d, d, 1, false}, list,
                                               ranges, /*long_ranges=*/true, nullptr, n,
                                               class_share.data_ptr<acc_t>(), acc_opts, stream);
          keys = sorted_queries.labels;
          key_rows = sorted_queries.index;
          params.mode = 2;
          params.keys = keys.data_ptr<int64_t>();
          params.num_keys = n;
          params.key_rows = key_rows.data_ptr<int64_t>();
          params.share = class_share.data_ptr<acc_t>();
        }
        const dim3 grid(ceil_div(q, kBlockRows), ceil_div(d, Engine::DV));
        launch_tiles<Engine, Policy>(grid, params, d, stream);
      }
    });
  });
  return {grad_query, grad_key, grad_queue};
}

at::Tensor sample_positives_cuda(const at::Tensor& query_labels, const at::Tensor& queue_labels,
                                 int64_t k, int64_t seed) {
  check_sample_positives_args(query_labels, queue_labels, k);
  c10::cuda::CUDAGuard device_guard(query_labels.device());
  const at::Tensor qlab = query_labels.to(at::kLong).contiguous();
  const at::Tensor klab = queue_labels.to(at::kLong).contiguous();
  const int64_t n = qlab.size(0);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const SortedLabels sorted = sort_labels(klab);
  const uint32_t seed_k = seed_key(seed);
  const Selection sel = select_rows(qlab, sorted, k, seed_k, stream);
  int64_t width = std::max<int64_t>(k, 0);
  if (k == -1) {  // the widest row sets the width: the one host sync of this op (not of the loss)
    width = n > 0 ? sel.num_positives.max().item<int64_t>() - 1 : 0;
  }
  return emit_positives(qlab, sorted, sel, seed_k, width, stream);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(kcl, CUDA, m) {
  m.impl("kpos_forward", &cuda::kpos_forward_cuda);
  m.impl("kpos_backward", &cuda::kpos_backward_cuda);
  m.impl("sample_positives", &cuda::sample_positives_cuda);
}

}  // namespace kcl
