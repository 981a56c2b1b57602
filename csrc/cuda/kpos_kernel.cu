// Fused CUDA kernels of kpos_loss (docs/kpos_loss.md is the contract; csrc/cpu/kpos_kernel.cpp
// is the same algorithm on the CPU). Nothing of size N x Q is ever allocated:
//
//   selection   select_kernel: one block per query row finds the rank threshold t_i, the
//               k-th smallest rank among the row's same-class queue entries, by an exact
//               radix select over the 32-bit ranks (the queue labels are sorted once so a
//               row's candidates are contiguous). Ranks never tie, so t_i is exactly the
//               CPU kernel's nth_element result.
//   forward     forward_partial_kernel: blocks of BM queries x a split of the queue walk
//               queue tiles of BN entries, keeping an online log-sum-exp and the sum of
//               positive logits per row; forward_combine_kernel adds the own key and merges
//               the splits of a row in split order (deterministic, no atomics).
//   backward    dquery_partial_kernel (blocks of queries x queue splits x D slices, partial
//               sums per split) + dquery_dkey_kernel (fixed-order sum over splits, own-key
//               term, dkey); dqueue_kernel (blocks of queue entries x D slices walking all
//               queries) runs only when the queue needs a gradient.
//
// The tile products run on tensor cores for float16/bfloat16 (sm_80+) and as FMA in the
// accumulation dtype otherwise (see kpos_tiles.cuh for why float32 does not use TF32).
// How the queue is split depends on the shapes only, never on the GPU, so results are
// bitwise reproducible run to run.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cuda/kpos_tiles.cuh"
#include "kcl/checks.h"
#include "kcl/kpos_common.h"

namespace kcl {
namespace cuda {
namespace {

// Thread blocks a launch aims for when it splits the queue (a few waves on current GPUs). A
// constant, so that the split, and with it the rounding, depends on the shapes only.
constexpr int64_t kTargetBlocks = 512;
constexpr int64_t kMinTilesPerSplit = 4;
constexpr int kSelectThreads = 256;
constexpr int kRowThreads = 128;  // one warp per row in the per-row kernels
constexpr int kRowsPerBlock = kRowThreads / 32;
constexpr uint32_t kFullMask = 0xFFFFFFFFu;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Split {
  int64_t count = 0;           // splits of the queue tiles
  int64_t tiles_per_split = 0;
};

// Splits `num_tiles` queue tiles so that about kTargetBlocks blocks run, with at least
// kMinTilesPerSplit tiles in each split.
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

struct DeviceExp {
  template <typename T>
  __device__ T operator()(T x) const { return acc_exp<T>(x); }
};

// Butterfly reductions: every lane ends with the same, bitwise identical value.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

template <typename scalar_t>
Matrix<scalar_t> matrix_of(const at::Tensor& t) {
  return {t.data_ptr<scalar_t>(), t.size(0), t.size(1), t.stride(0), t.stride(1)};
}

// Tensor-core kernels are built for sm_80+ only; an older GPU takes the SIMT engine.
bool tensor_cores_available() { return at::cuda::getCurrentDeviceProperties()->major >= 8; }

template <typename Engine>
struct EngineGuard {
  static constexpr bool kTensorCores = !std::is_same_v<typename Engine::smem_t, typename Engine::acc_t>;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define KCL_ENGINE_UNSUPPORTED(Engine) (EngineGuard<Engine>::kTensorCores)
#else
#define KCL_ENGINE_UNSUPPORTED(Engine) false
#endif

// ---------------------------------------------------------------------------------------------
// Selection
// ---------------------------------------------------------------------------------------------

// Writes the selection state (row_key, threshold, |P_i|) of row blockIdx.x.
__global__ void __launch_bounds__(kSelectThreads)
select_kernel(const int64_t* query_labels, const int64_t* sorted_labels,
              const int64_t* sorted_index, int64_t q, int64_t k, uint32_t seed_k,
              int64_t* selection) {
  __shared__ int histogram[256];
  __shared__ uint32_t shared_prefix;
  __shared__ int64_t shared_remaining;
  const int64_t i = blockIdx.x;
  const int tid = threadIdx.x;
  const uint32_t rk = row_key(seed_k, i);
  const int64_t label = query_labels[i];
  int64_t begin = 0, end = 0;
  if (label >= 0) label_range(sorted_labels, q, label, &begin, &end);
  int64_t threshold = kThresholdNone, num_selected = 0;
  if (!trivial_selection(label, k, end - begin, &threshold, &num_selected)) {
    // The k-th smallest rank, 8 bits at a time from the top: count the candidates that
    // share the prefix found so far by their next digit, and descend into the digit
    // holding the k-th. Integer counts, so the result is exact.
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
    selection[i * 3 + kSelRowKey] = rk;
    selection[i * 3 + kSelThreshold] = threshold;
    selection[i * 3 + kSelNumPositives] = 1 + num_selected;
  }
}

// The selected queue indices of row blockIdx.x in ascending order: the row's candidates are
// visited in sorted-label order (ascending queue index within a label, the sort being stable)
// and compacted with a block-wide prefix count.
__global__ void __launch_bounds__(kSelectThreads)
emit_positives_kernel(const int64_t* query_labels, const int64_t* sorted_labels,
                      const int64_t* sorted_index, int64_t q, const int64_t* selection,
                      int64_t width, int64_t* out) {
  constexpr int kWarps = kSelectThreads / 32;
  __shared__ int warp_counts[kWarps];
  const int64_t i = blockIdx.x;
  if (selection[i * 3 + kSelNumPositives] <= 1) return;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const uint32_t rk = static_cast<uint32_t>(selection[i * 3 + kSelRowKey]);
  const int64_t threshold = selection[i * 3 + kSelThreshold];
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
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_counts[w] : 0;
      total += warp_counts[w];
    }
    const int64_t slot = written + before + __popc(ballot & ((1u << lane) - 1u));
    if (chosen && slot < width) out[i * width + slot] = j;
    written += total;
    __syncthreads();
  }
}

struct SortedQueue {
  at::Tensor labels;  // ascending, int64
  at::Tensor index;   // queue index of labels[t]; ascending within a label (stable sort)
};

SortedQueue sort_queue(const at::Tensor& queue_labels_long) {
  auto sorted = at::sort(queue_labels_long, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  return {std::get<0>(sorted).contiguous(), std::get<1>(sorted).contiguous()};
}

void launch_select(const at::Tensor& query_labels_long, const SortedQueue& sorted, int64_t k,
                   int64_t seed, at::Tensor& selection, cudaStream_t stream) {
  const int64_t n = query_labels_long.size(0);
  if (n == 0) return;
  select_kernel<<<n, kSelectThreads, 0, stream>>>(
      query_labels_long.data_ptr<int64_t>(), sorted.labels.data_ptr<int64_t>(),
      sorted.index.data_ptr<int64_t>(), sorted.labels.size(0), k, seed_key(seed),
      selection.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// partial[split][i] = (max, sum of exp(s - max), sum of positive logits) of row i over the
// queue tiles of `split`.
template <typename Engine, typename scalar_t>
__global__ void __launch_bounds__(Engine::kThreads)
forward_partial_kernel(Matrix<scalar_t> query, Matrix<scalar_t> queue,
                       const int64_t* query_labels, const int64_t* queue_labels,
                       const int64_t* selection, typename Engine::acc_t inv_tau,
                       int64_t tiles_per_split, int64_t num_tiles,
                       typename Engine::acc_t* partial) {
  using acc_t = typename Engine::acc_t;
  constexpr int BM = Engine::BM, BN = Engine::BN;
  if constexpr (KCL_ENGINE_UNSUPPORTED(Engine)) {
    __trap();
  } else {
    __shared__ __align__(128) unsigned char smem_bytes[sizeof(typename Engine::Smem)];
    auto& sm = *reinterpret_cast<typename Engine::Smem*>(smem_bytes);
    __shared__ int64_t row_label[BM], row_threshold[BM], col_label[BN];
    __shared__ uint32_t row_keys[BM];
    __shared__ acc_t run_max[BM], run_sum[BM], pos_sum[BM];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int64_t n = query.rows, q = queue.rows;
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
    const int64_t split = blockIdx.y;
    const int64_t tile_begin = split * tiles_per_split;
    const int64_t tile_end =
        tile_begin + tiles_per_split < num_tiles ? tile_begin + tiles_per_split : num_tiles;
    for (int r = tid; r < BM; r += Engine::kThreads) {
      const int64_t i = row0 + r;
      row_label[r] = i < n ? query_labels[i] : -1;
      row_keys[r] = i < n ? static_cast<uint32_t>(selection[i * 3 + kSelRowKey]) : 0u;
      row_threshold[r] = i < n ? selection[i * 3 + kSelThreshold] : kThresholdNone;
      run_max[r] = -std::numeric_limits<acc_t>::infinity();
      run_sum[r] = acc_t(0);
      pos_sum[r] = acc_t(0);
    }
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t col0 = tile * BN;
      for (int c = tid; c < BN; c += Engine::kThreads)
        col_label[c] = col0 + c < q ? queue_labels[col0 + c] : -1;
      Engine::logits_tile(sm, query, row0, queue, col0);  // ends with __syncthreads()
      // One warp per row: a tile max, the rescaled sum and the positive logits.
      for (int r = warp; r < BM; r += Engine::kThreads / 32) {
        if (row0 + r >= n) break;
        acc_t logits[BN / 32];
        acc_t tile_max = -std::numeric_limits<acc_t>::infinity();
        acc_t positive = acc_t(0);
#pragma unroll
        for (int u = 0; u < BN / 32; ++u) {
          const int c = lane + 32 * u;
          const acc_t s = Engine::logit(sm, r, c) * inv_tau;
          const bool valid = col_label[c] >= 0;  // empty slots and padding take no part
          logits[u] = valid ? s : -std::numeric_limits<acc_t>::infinity();
          tile_max = max(tile_max, logits[u]);
          if (valid && col_label[c] == row_label[r] &&
              is_selected(row_keys[r], row_threshold[r], col0 + c)) {
            positive += s;
          }
        }
        tile_max = warp_max(tile_max);
        positive = warp_sum(positive);
        if (tile_max == -std::numeric_limits<acc_t>::infinity()) continue;
        const acc_t old_max = run_max[r];
        const acc_t new_max = max(old_max, tile_max);
        acc_t tile_sum = acc_t(0);
#pragma unroll
        for (int u = 0; u < BN / 32; ++u) tile_sum += acc_exp(logits[u] - new_max);
        tile_sum = warp_sum(tile_sum);
        const acc_t rescaled = run_sum[r] * acc_exp(old_max - new_max);
        __syncwarp();
        if (lane == 0) {
          run_sum[r] = rescaled + tile_sum;
          run_max[r] = new_max;
          pos_sum[r] += positive;
        }
      }
      __syncthreads();
    }
    for (int r = tid; r < BM; r += Engine::kThreads) {
      const int64_t i = row0 + r;
      if (i >= n) continue;
      acc_t* out = partial + (split * n + i) * 3;
      out[0] = run_max[r];
      out[1] = run_sum[r];
      out[2] = pos_sum[r];
    }
  }
}

// Own-key logit s_i0 = q_i . key_i / tau, one warp per row.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t own_logit(const Matrix<scalar_t>& query,
                                           const Matrix<scalar_t>& key, int64_t i, int lane,
                                           acc_t inv_tau) {
  acc_t dot = acc_t(0);
  for (int64_t d = lane; d < query.cols; d += 32)
    dot += static_cast<acc_t>(query.at(i, d)) * static_cast<acc_t>(key.at(i, d));
  return warp_sum(dot) * inv_tau;
}

// loss_i and lse_i: the own key opens the row, then the splits merge in split order.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
forward_combine_kernel(Matrix<scalar_t> query, Matrix<scalar_t> key, const int64_t* selection,
                       const acc_type_t<scalar_t>* partial, int64_t num_splits,
                       acc_type_t<scalar_t> inv_tau, acc_type_t<scalar_t>* loss_rows,
                       acc_type_t<scalar_t>* lse) {
  using acc_t = acc_type_t<scalar_t>;
  const int lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int64_t n = query.rows;
  if (i >= n) return;
  const acc_t own = own_logit(query, key, i, lane, inv_tau);
  if (lane != 0) return;
  OnlineLSE<acc_t> state{own, acc_t(1)};
  acc_t positive = own;
  for (int64_t split = 0; split < num_splits; ++split) {
    const acc_t* p = partial + (split * n + i) * 3;
    state = lse_merge(state, OnlineLSE<acc_t>{p[0], p[1]}, DeviceExp{});
    positive += p[2];
  }
  const acc_t row_lse = state.m + acc_log(state.s);
  lse[i] = row_lse;
  loss_rows[i] = row_lse - positive / static_cast<acc_t>(selection[i * 3 + kSelNumPositives]);
}

template <typename Engine, typename scalar_t>
void run_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& queue,
                 const at::Tensor& query_labels, const at::Tensor& queue_labels,
                 const at::Tensor& selection, double temperature, at::Tensor& loss_rows,
                 at::Tensor& lse, cudaStream_t stream) {
  using acc_t = typename Engine::acc_t;
  const int64_t n = query.size(0), q = queue.size(0);
  const acc_t inv_tau = static_cast<acc_t>(1.0 / temperature);
  const int64_t row_blocks = ceil_div(n, Engine::BM);
  const Split split = split_queue(ceil_div(q, Engine::BN), row_blocks);
  at::Tensor partial = at::empty({split.count, n, 3}, loss_rows.options());
  const auto q_mat = matrix_of<scalar_t>(query), k_mat = matrix_of<scalar_t>(key);
  if (split.count > 0) {
    const dim3 grid(row_blocks, split.count);
    forward_partial_kernel<Engine, scalar_t><<<grid, Engine::kThreads, 0, stream>>>(
        q_mat, matrix_of<scalar_t>(queue), query_labels.data_ptr<int64_t>(),
        queue_labels.data_ptr<int64_t>(), selection.data_ptr<int64_t>(), inv_tau,
        split.tiles_per_split, ceil_div(q, Engine::BN), partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  forward_combine_kernel<scalar_t><<<ceil_div(n, kRowsPerBlock), kRowThreads, 0, stream>>>(
      q_mat, k_mat, selection.data_ptr<int64_t>(), partial.data_ptr<acc_t>(), split.count,
      inv_tau, loss_rows.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Per-row constants of the gradient tile G_ij = g_i exp(s_ij - lse_i) - [j in S_i] g_i / |P_i|.
template <int BM, typename acc_t>
struct RowGrad {
  int64_t label[BM], threshold[BM];
  uint32_t key[BM];
  acc_t lse[BM], grad[BM], share[BM];

  __device__ void load(int64_t row0, int64_t n, const int64_t* query_labels,
                       const int64_t* selection, const acc_t* row_lse, const acc_t* grad_rows) {
    for (int r = threadIdx.x; r < BM; r += blockDim.x) {
      const int64_t i = row0 + r;
      const bool live = i < n;
      label[r] = live ? query_labels[i] : -1;
      key[r] = live ? static_cast<uint32_t>(selection[i * 3 + kSelRowKey]) : 0u;
      threshold[r] = live ? selection[i * 3 + kSelThreshold] : kThresholdNone;
      lse[r] = live ? row_lse[i] : acc_t(0);
      grad[r] = live ? grad_rows[i] : acc_t(0);
      share[r] = live ? grad_rows[i] / static_cast<acc_t>(selection[i * 3 + kSelNumPositives])
                      : acc_t(0);
    }
  }
};

// Turns the logits tile into the gradient tile (zero outside the valid rows and entries).
template <typename Engine, int BM>
__device__ __forceinline__ void logits_to_grad(typename Engine::Smem& sm,
                                               const RowGrad<BM, typename Engine::acc_t>& rows,
                                               const int64_t* col_label, int64_t row0, int64_t n,
                                               int64_t col0, typename Engine::acc_t inv_tau) {
  using acc_t = typename Engine::acc_t;
  constexpr int BN = Engine::BN;
#pragma unroll 4
  for (int e = threadIdx.x; e < BM * BN; e += Engine::kThreads) {
    const int r = e / BN, c = e % BN;
    acc_t g = acc_t(0);
    if (row0 + r < n && col_label[c] >= 0) {
      const acc_t s = Engine::logit(sm, r, c) * inv_tau;
      g = rows.grad[r] * acc_exp(s - rows.lse[r]);
      if (col_label[c] == rows.label[r] && is_selected(rows.key[r], rows.threshold[r], col0 + c))
        g -= rows.share[r];
    }
    Engine::store_g(sm, r, c, g);
  }
}

// Rows [0, rows) of `source`, columns [d0, d0 + DV), into the engine's V tile.
template <typename Engine, typename scalar_t>
__device__ __forceinline__ void load_v_tile(typename Engine::Smem& sm,
                                            const Matrix<scalar_t>& source, int64_t first_row,
                                            int rows, int64_t d0) {
  constexpr int DV = Engine::DV;
#pragma unroll 4
  for (int e = threadIdx.x; e < rows * DV; e += Engine::kThreads) {
    const int r = e / DV, c = e % DV;
    Engine::v_row(sm, r)[c] = source.contains(first_row + r, d0 + c)
                                  ? Engine::to_smem(source.at(first_row + r, d0 + c))
                                  : Engine::smem_zero();
  }
}

// partial[split][i][d] = sum over the split's queue entries j of G_ij queue_jd.
// minBlocksPerMultiprocessor = 1: without it ptxas aims at two 256-thread blocks per SM (128
// registers) and spills a few values of the tile loop for float16 (docs/cuda_resources.md).
template <typename Engine, typename scalar_t>
__global__ void __launch_bounds__(Engine::kThreads, 1)
dquery_partial_kernel(Matrix<scalar_t> query, Matrix<scalar_t> queue,
                      const int64_t* query_labels, const int64_t* queue_labels,
                      const int64_t* selection, const typename Engine::acc_t* row_lse,
                      const typename Engine::acc_t* grad_rows, typename Engine::acc_t inv_tau,
                      int64_t tiles_per_split, int64_t num_tiles,
                      typename Engine::acc_t* partial) {
  using acc_t = typename Engine::acc_t;
  constexpr int BM = Engine::BM, BN = Engine::BN, DV = Engine::DV;
  if constexpr (KCL_ENGINE_UNSUPPORTED(Engine)) {
    __trap();
  } else {
    __shared__ __align__(128) unsigned char smem_bytes[sizeof(typename Engine::Smem)];
    auto& sm = *reinterpret_cast<typename Engine::Smem*>(smem_bytes);
    __shared__ RowGrad<BM, acc_t> rows;
    __shared__ int64_t col_label[BN];
    const int64_t n = query.rows, q = queue.rows, d = query.cols;
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
    const int64_t split = blockIdx.y;
    const int64_t d0 = static_cast<int64_t>(blockIdx.z) * DV;
    const int64_t tile_begin = split * tiles_per_split;
    const int64_t tile_end =
        tile_begin + tiles_per_split < num_tiles ? tile_begin + tiles_per_split : num_tiles;
    rows.load(row0, n, query_labels, selection, row_lse, grad_rows);
    typename Engine::AccDq acc;
    Engine::zero(acc);
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t col0 = tile * BN;
      for (int c = threadIdx.x; c < BN; c += Engine::kThreads)
        col_label[c] = col0 + c < q ? queue_labels[col0 + c] : -1;
      Engine::logits_tile(sm, query, row0, queue, col0);
      logits_to_grad<Engine, BM>(sm, rows, col_label, row0, n, col0, inv_tau);
      load_v_tile<Engine>(sm, queue, col0, BN, d0);
      __syncthreads();
      Engine::mma_dq(acc, sm);
      __syncthreads();
    }
    Engine::for_each(acc, sm, [&](int r, int c, acc_t value) {
      const int64_t i = row0 + r, col = d0 + c;
      if (r < BM && i < n && col < d) partial[(split * n + i) * d + col] = value;
    });
  }
}

// coef_i = g_i (p_i0 - 1 / |P_i|): the gradient of loss_i with respect to its own-key logit.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
own_key_coef_kernel(Matrix<scalar_t> query, Matrix<scalar_t> key, const int64_t* selection,
                    const acc_type_t<scalar_t>* row_lse, const acc_type_t<scalar_t>* grad_rows,
                    acc_type_t<scalar_t> inv_tau, acc_type_t<scalar_t>* coef) {
  using acc_t = acc_type_t<scalar_t>;
  const int lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (i >= query.rows) return;
  const acc_t own = own_logit(query, key, i, lane, inv_tau);
  if (lane == 0) {
    const acc_t num_positives = static_cast<acc_t>(selection[i * 3 + kSelNumPositives]);
    coef[i] = grad_rows[i] * (acc_exp(own - row_lse[i]) - acc_t(1) / num_positives);
  }
}

// grad_query = (sum over splits of partial + coef * key) / tau, grad_key = coef * query / tau.
template <typename scalar_t>
__global__ void dquery_dkey_kernel(Matrix<scalar_t> query, Matrix<scalar_t> key,
                                   const acc_type_t<scalar_t>* partial, int64_t num_splits,
                                   const acc_type_t<scalar_t>* coef, acc_type_t<scalar_t> inv_tau,
                                   scalar_t* grad_query, scalar_t* grad_key) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t n = query.rows, d = query.cols, total = n * d;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / d, col = e % d;
    if (grad_query != nullptr) {
      acc_t sum = acc_t(0);
      for (int64_t split = 0; split < num_splits; ++split) sum += partial[split * total + e];
      sum += coef[i] * static_cast<acc_t>(key.at(i, col));
      grad_query[e] = static_cast<scalar_t>(sum * inv_tau);
    }
    if (grad_key != nullptr)
      grad_key[e] = static_cast<scalar_t>(coef[i] * static_cast<acc_t>(query.at(i, col)) * inv_tau);
  }
}

// grad_queue[j][d] = sum over all queries i of G_ij query_id / tau; one block per queue tile
// and D slice, so every element is written once.
template <typename Engine, typename scalar_t>
__global__ void __launch_bounds__(Engine::kThreads)
dqueue_kernel(Matrix<scalar_t> query, Matrix<scalar_t> queue, const int64_t* query_labels,
              const int64_t* queue_labels, const int64_t* selection,
              const typename Engine::acc_t* row_lse, const typename Engine::acc_t* grad_rows,
              typename Engine::acc_t inv_tau, scalar_t* grad_queue) {
  using acc_t = typename Engine::acc_t;
  constexpr int BM = Engine::BM, BN = Engine::BN, DV = Engine::DV;
  if constexpr (KCL_ENGINE_UNSUPPORTED(Engine)) {
    __trap();
  } else {
    __shared__ __align__(128) unsigned char smem_bytes[sizeof(typename Engine::Smem)];
    auto& sm = *reinterpret_cast<typename Engine::Smem*>(smem_bytes);
    __shared__ RowGrad<BM, acc_t> rows;
    __shared__ int64_t col_label[BN];
    const int64_t n = query.rows, q = queue.rows, d = query.cols;
    const int64_t col0 = static_cast<int64_t>(blockIdx.x) * BN;
    const int64_t d0 = static_cast<int64_t>(blockIdx.y) * DV;
    for (int c = threadIdx.x; c < BN; c += Engine::kThreads)
      col_label[c] = col0 + c < q ? queue_labels[col0 + c] : -1;
    typename Engine::AccDqueue acc;
    Engine::zero(acc);
    for (int64_t row0 = 0; row0 < n; row0 += BM) {
      rows.load(row0, n, query_labels, selection, row_lse, grad_rows);
      Engine::logits_tile(sm, query, row0, queue, col0);
      logits_to_grad<Engine, BM>(sm, rows, col_label, row0, n, col0, inv_tau);
      load_v_tile<Engine>(sm, query, row0, BM, d0);
      __syncthreads();
      Engine::mma_dqueue(acc, sm);
      __syncthreads();
    }
    Engine::for_each(acc, sm, [&](int r, int c, acc_t value) {
      const int64_t j = col0 + r, col = d0 + c;
      if (r < BN && j < q && col < d) grad_queue[j * d + col] = static_cast<scalar_t>(value * inv_tau);
    });
  }
}

template <typename Engine, typename scalar_t>
void run_backward(const at::Tensor& grad_rows, const at::Tensor& query, const at::Tensor& key,
                  const at::Tensor& queue, const at::Tensor& query_labels,
                  const at::Tensor& queue_labels, const at::Tensor& lse,
                  const at::Tensor& selection, double temperature, at::Tensor* grad_query,
                  at::Tensor* grad_key, at::Tensor* grad_queue, cudaStream_t stream) {
  using acc_t = typename Engine::acc_t;
  const int64_t n = query.size(0), q = queue.size(0), d = query.size(1);
  const acc_t inv_tau = static_cast<acc_t>(1.0 / temperature);
  const auto q_mat = matrix_of<scalar_t>(query), k_mat = matrix_of<scalar_t>(key);
  const auto queue_mat = matrix_of<scalar_t>(queue);
  const int64_t num_tiles = ceil_div(q, Engine::BN);
  const int64_t d_slices = ceil_div(d, Engine::DV);
  const int64_t* qlab = query_labels.data_ptr<int64_t>();
  const int64_t* klab = queue_labels.data_ptr<int64_t>();
  const int64_t* sel = selection.data_ptr<int64_t>();
  const acc_t* lse_p = lse.data_ptr<acc_t>();
  const acc_t* grad_p = grad_rows.data_ptr<acc_t>();

  if ((grad_query || grad_key) && d > 0) {
    at::Tensor coef = at::empty({n}, lse.options());
    own_key_coef_kernel<scalar_t><<<ceil_div(n, kRowsPerBlock), kRowThreads, 0, stream>>>(
        q_mat, k_mat, sel, lse_p, grad_p, inv_tau, coef.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t row_blocks = ceil_div(n, Engine::BM);
    const Split split = grad_query ? split_queue(num_tiles, row_blocks * d_slices) : Split{};
    at::Tensor partial = at::empty({split.count, n, d}, lse.options());
    if (split.count > 0) {
      const dim3 grid(row_blocks, split.count, d_slices);
      dquery_partial_kernel<Engine, scalar_t><<<grid, Engine::kThreads, 0, stream>>>(
          q_mat, queue_mat, qlab, klab, sel, lse_p, grad_p, inv_tau, split.tiles_per_split,
          num_tiles, partial.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t blocks = std::min<int64_t>(ceil_div(n * d, 256), 65536);
    dquery_dkey_kernel<scalar_t><<<blocks, 256, 0, stream>>>(
        q_mat, k_mat, partial.data_ptr<acc_t>(), split.count, coef.data_ptr<acc_t>(), inv_tau,
        grad_query ? grad_query->data_ptr<scalar_t>() : nullptr,
        grad_key ? grad_key->data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (grad_queue && q > 0 && d > 0) {
    const dim3 grid(num_tiles, d_slices);
    dqueue_kernel<Engine, scalar_t><<<grid, Engine::kThreads, 0, stream>>>(
        q_mat, queue_mat, qlab, klab, sel, lse_p, grad_p, inv_tau,
        grad_queue->data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Runs `body` with the tile engine for scalar_t: tensor cores for float16/bfloat16 on sm_80+,
// FMA otherwise.
template <typename scalar_t, typename Body>
void with_engine(Body&& body) {
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    if (tensor_cores_available()) {
      body(WmmaEngine<scalar_t>{});
      return;
    }
  }
  body(SimtEngine<scalar_t>{});
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ---------------------------------------------------------------------------------------------
// Registered ops
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> kpos_forward_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& queue,
    const at::Tensor& query_labels, const at::Tensor& queue_labels, int64_t k, double temperature,
    std::optional<int64_t> seed) {
  check_inputs(query, key, queue, query_labels, queue_labels);
  check_k(k);
  check_temperature(temperature);
  c10::cuda::CUDAGuard device_guard(query.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n = query.size(0);
  const auto acc_opts = query.options().dtype(acc_type_of(query.scalar_type()));
  at::Tensor loss_rows = at::empty({n}, acc_opts);
  at::Tensor lse = at::empty({n}, acc_opts);
  at::Tensor selection = at::empty({n, 3}, query.options().dtype(at::kLong));
  const int64_t resolved_seed = resolve_seed(seed);  // drawn even for N = 0, like the CPU op
  if (n == 0) return {loss_rows, lse, selection};

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor qlab = query_labels.to(at::kLong).contiguous();
  const at::Tensor klab = queue_labels.to(at::kLong).contiguous();
  launch_select(qlab, sort_queue(klab), k, resolved_seed, selection, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(),
                                  "kpos_forward_cuda", [&] {
    with_engine<scalar_t>([&](auto engine) {
      run_forward<decltype(engine), scalar_t>(query, key, queue, qlab, klab, selection,
                                              temperature, loss_rows, lse, stream);
    });
  });
  return {loss_rows, lse, selection};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kpos_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& queue, const at::Tensor& query_labels, const at::Tensor& queue_labels,
    const at::Tensor& lse, const at::Tensor& selection, double temperature,
    std::array<bool, 3> output_mask) {
  check_inputs(query, key, queue, query_labels, queue_labels);
  check_temperature(temperature);
  const int64_t n = query.size(0), q = queue.size(0), d = query.size(1);
  const auto acc_type = acc_type_of(query.scalar_type());
  check_backward_state(grad_rows, lse, selection, n, acc_type);
  for (const auto& pair : {std::make_pair("grad_rows", &grad_rows), std::make_pair("lse", &lse),
                           std::make_pair("selection", &selection)}) {
    TORCH_CHECK_VALUE(pair.second->device() == query.device(), "kpos_backward: ", pair.first,
                      " must be on query's device ", query.device(), ", got ",
                      pair.second->device());
  }
  c10::cuda::CUDAGuard device_guard(query.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto gradient = [&](bool needed, const at::Tensor& like, int64_t rows) {
    return needed ? at::empty({rows, d}, like.options()) : at::empty({0}, like.options());
  };
  at::Tensor grad_query = gradient(output_mask[0], query, n);
  at::Tensor grad_key = gradient(output_mask[1], key, n);
  at::Tensor grad_queue = gradient(output_mask[2], queue, q);
  if (n == 0 || d == 0) {
    // Nothing to compute; with N = 0 no loss depends on the queue, so its gradient is 0.
    if (output_mask[2]) grad_queue.zero_();
    return {grad_query, grad_key, grad_queue};
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor qlab = query_labels.to(at::kLong).contiguous();
  const at::Tensor klab = queue_labels.to(at::kLong).contiguous();
  const at::Tensor grad_acc = grad_rows.to(acc_type).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor sel_c = selection.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(),
                                  "kpos_backward_cuda", [&] {
    with_engine<scalar_t>([&](auto engine) {
      run_backward<decltype(engine), scalar_t>(
          grad_acc, query, key, queue, qlab, klab, lse_c, sel_c, temperature,
          output_mask[0] ? &grad_query : nullptr, output_mask[1] ? &grad_key : nullptr,
          output_mask[2] ? &grad_queue : nullptr, stream);
    });
  });
  return {grad_query, grad_key, grad_queue};
}

at::Tensor sample_positives_cuda(const at::Tensor& query_labels, const at::Tensor& queue_labels,
                                 int64_t k, int64_t seed) {
  check_labels(query_labels, queue_labels);
  check_k(k);
  c10::cuda::CUDAGuard device_guard(query_labels.device());
  const at::Tensor qlab = query_labels.to(at::kLong).contiguous();
  const at::Tensor klab = queue_labels.to(at::kLong).contiguous();
  const int64_t n = qlab.size(0);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const SortedQueue sorted = sort_queue(klab);
  at::Tensor selection = at::empty({n, 3}, qlab.options());
  launch_select(qlab, sorted, k, seed, selection, stream);
  int64_t width = k;
  if (k == -1) {  // the widest row sets the width: the one host sync of this op
    width = n > 0 ? selection.select(1, kSelNumPositives).max().item<int64_t>() - 1 : 0;
  }
  at::Tensor out = at::full({n, width}, -1, qlab.options());
  if (n > 0 && width > 0) {
    emit_positives_kernel<<<n, kSelectThreads, 0, stream>>>(
        qlab.data_ptr<int64_t>(), sorted.labels.data_ptr<int64_t>(),
        sorted.index.data_ptr<int64_t>(), sorted.labels.size(0), selection.data_ptr<int64_t>(),
        width, out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(kcl, CUDA, m) {
  m.impl("kpos_forward", &cuda::kpos_forward_cuda);
  m.impl("kpos_backward", &cuda::kpos_backward_cuda);
  m.impl("sample_positives", &cuda::sample_positives_cuda);
}

}  // namespace kcl
