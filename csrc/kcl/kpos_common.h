// Math shared by every kpos_loss backend (CPU, CUDA; the Triton kernels
// re-implement the same integer arithmetic in kcl_ext/triton). Keep this file
// free of ATen so that host and device code can both include it.
//
// The selection hash is part of the op's contract (docs/kpos_loss.md): a
// change here changes which positives every backend selects for a seed.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KCL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KCL_HOST_DEVICE inline
#endif

namespace kcl {

// max(a, b) that keeps a NaN of either argument (std::max and fmaxf drop it): the online
// log-sum-exp must carry a NaN logit to the loss (docs/kpos_loss.md, "Non-finite inputs").
template <typename T>
KCL_HOST_DEVICE T max_keep_nan(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// lowbias32 (C. Wellons): a bijection on 32-bit words with good avalanche.
KCL_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// 32-bit key of a 64-bit seed: both halves of the seed matter.
KCL_HOST_DEVICE uint32_t seed_key(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t lo = static_cast<uint32_t>(s);
  const uint32_t hi = static_cast<uint32_t>(s >> 32);
  return mix32(lo ^ mix32(hi + 0x9E3779B9u));
}

// Per-query key: different queries draw independently.
KCL_HOST_DEVICE uint32_t row_key(uint32_t seed_k, int64_t row) {
  return mix32(seed_k ^ mix32(static_cast<uint32_t>(row) + 0x85EBCA6Bu));
}

// Random rank of queue entry j for the query with key row_k. For a fixed row
// this is a bijection of j (j < 2^32), so ranks never tie within a row and
// "the k entries of M_i with the smallest rank" is a uniform k-subset.
KCL_HOST_DEVICE uint32_t entry_rank(uint32_t row_k, int64_t j) {
  return mix32(row_k ^ static_cast<uint32_t>(j));
}

// Rank thresholds stored per row (int64): a same-class entry j is a selected
// positive of row i iff entry_rank(row_key_i, j) <= threshold_i.
constexpr int64_t kThresholdNone = -1;          // k = 0: no queue positives
constexpr int64_t kThresholdAll = 0xFFFFFFFFll;  // all of M_i (k = -1 or |M_i| <= k)

// Columns of the per-row selection state that the forward returns and the
// backward consumes: [N, 3] int64.
constexpr int kSelRowKey = 0;
constexpr int kSelThreshold = 1;
constexpr int kSelNumPositives = 2;  // |P_i| = 1 + selected queue entries

KCL_HOST_DEVICE bool is_selected(uint32_t row_k, int64_t threshold, int64_t j) {
  return static_cast<int64_t>(entry_rank(row_k, j)) <= threshold;
}

// Half-open range [*begin, *end) of `label` in the ascending array
// sorted_labels[0, size): where the same-class queue entries of a query lie
// once the queue labels are sorted (a stable sort keeps each class's queue
// indices ascending). Empty slots (label < 0) sort first and never match a
// query label >= 0.
KCL_HOST_DEVICE void label_range(const int64_t* sorted_labels, int64_t size, int64_t label,
                                 int64_t* begin, int64_t* end) {
  int64_t lo = 0, hi = size;  // first index with sorted_labels[index] >= label
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted_labels[mid] < label) lo = mid + 1; else hi = mid;
  }
  *begin = lo;
  hi = size;  // first index with sorted_labels[index] > label
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted_labels[mid] <= label) lo = mid + 1; else hi = mid;
  }
  *end = lo;
}

// The selection of one row when it needs no rank statistics: returns true and
// sets the threshold and |S_i| for k = 0, a negative query label, k = -1 and
// |M_i| <= k; returns false when the k-th smallest rank of M_i must be found.
KCL_HOST_DEVICE bool trivial_selection(int64_t label, int64_t k, int64_t same_class,
                                       int64_t* threshold, int64_t* num_selected) {
  if (label < 0 || k == 0) {
    *threshold = kThresholdNone;
    *num_selected = 0;
    return true;
  }
  if (k == -1 || same_class <= k) {
    *threshold = kThresholdAll;
    *num_selected = same_class;
    return true;
  }
  return false;
}

// Online log-sum-exp state: value = m + log(s). Merging is associative up to
// rounding; callers merge in a fixed order to stay deterministic.
template <typename acc_t>
struct OnlineLSE {
  acc_t m;  // running max
  acc_t s;  // sum of exp(x - m)
};

template <typename acc_t, typename ExpFn>
KCL_HOST_DEVICE OnlineLSE<acc_t> lse_merge(OnlineLSE<acc_t> a, OnlineLSE<acc_t> b, ExpFn exp_fn) {
  if (b.s == acc_t(0)) return a;
  if (a.s == acc_t(0)) return b;
  if (a.m >= b.m) return {a.m, a.s + b.s * exp_fn(b.m - a.m)};
  return {b.m, b.s + a.s * exp_fn(a.m - b.m)};
}

}  // namespace kcl
