// Fused CPU kernels of kpos_loss (docs/kpos_loss.md is the contract; docs/cpu_kernel.md the
// design and its measurements). The loss splits into a dense part that needs no labels and a
// sparse part that needs no pass over the queue:
//
//   loss_i = lse_i - q_i . t_i / tau,   t_i = (key_i + sum_{j in S_i} queue_j) / |P_i|
//
// * selection (sparse): the same-class queue entries of each query class are listed once
//   (ascending queue index); for k > 0 each row ranks its candidates with the shared hash and
//   keeps the k smallest (the selected indices are an output: sample_positives' result); for
//   k = -1 the class sums of the queue give t_i with no selection at all.
// * dense pass: tasks of (block of queries x chunk of the queue) walk queue tiles with an online
//   log-sum-exp: one GEMM for the tile of logits, one pass for its row maxima, one for exp and
//   the row sums (csrc/cpu/row_kernels.h), and, when the query needs a gradient, a second GEMM
//   that accumulates the softmax-weighted mean of the keys (FlashAttention's output with V = the
//   keys), so d(query) is elementwise in the backward. No label is compared and no hash is
//   computed in this loop.
// * backward: d(query) and d(key) are elementwise; d(queue) recomputes the probabilities tile by
//   tile (P^T . query, one task per chunk of the queue: each owns its rows of the gradient) and
//   subtracts the sparse positive term in a fixed order.
//
// Nothing of size N x Q is ever allocated. Every task is owned by one thread, runs its GEMMs
// single-threaded, the partition depends on the shapes only, and partial results merge in a fixed
// order, so results do not depend on the thread count. Scratch buffers come from ATen's allocator
// (64-byte aligned): BLAS may pick its kernel, and so the summation order, by the alignment of
// its operands, and a malloc'd buffer's alignment changes from run to run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <unistd.h>
#endif

#include "cpu/blas.h"
#include "cpu/row_kernels.h"
#include "kcl/checks.h"
#include "kcl/kpos_common.h"
#include "kcl/signatures.h"

namespace kcl {
namespace {

using cpu::SingleThreadedBlas;

// The partition (docs/cpu_kernel.md measures the choice). A task's working set is a block of
// kRowBlock queries, its share of the softmax mean, a tile of kTile queue rows and the tile of
// logits: 384 KiB at D = 128 in float32 with 128 queries, which stays in a 512 KiB L2 cache, and
// 640 KiB with 256, for L2 caches of 1 MiB or more. Both GEMMs of a tile then run at the in-cache
// rate, and the queue streams from memory (and BLAS packs each tile) once per row block: 256
// queries, MoCo's batch, make that once. The partition depends on the shapes and this machine
// constant only, so results do not depend on the thread count. The KCL_TUNE_* variables override
// it for measurements (docs/cpu_kernel.md).
int64_t tune(const char* name, int64_t value) {
  const char* s = std::getenv(name);
  return s ? std::atoll(s) : value;
}
int64_t default_row_block() {
#if defined(__linux__) && defined(_SC_LEVEL2_CACHE_SIZE)
  const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (l2 >= (1L << 20)) return 256;
#endif
  return 128;
}
const int64_t kRowBlock = tune("KCL_TUNE_ROWS", default_row_block());   // queries per block
const int64_t kTile = tune("KCL_TUNE_TILE", 256);       // queue entries per tile
const int64_t kMinChunk = tune("KCL_TUNE_CHUNK", 2048);  // queue entries per chunk of the forward's partition, at least
const int64_t kTasks = tune("KCL_TUNE_TASKS", 16);       // tasks the partitions aim at: balanced for up to 16 threads
constexpr int64_t kClassSumColumns = 64;  // feature columns per task of the class sums

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
constexpr T kLog2e = T(1.4426950408889634073599246810018921);
template <typename T>
constexpr T kLn2 = T(0.6931471805599453094172321214581766);

// Runs worker(next) on each of ATen's threads (inline when called from a parallel region), where
// next() hands out the tasks [0, count) one at a time, first come first served, and -1 when none
// is left. A thread that the rest of the machine slows down takes fewer tasks, instead of making
// everyone wait for its fixed share. The results stay independent of the thread count and of
// timing because a task's output depends only on the task: which thread runs it does not matter.
template <typename Worker>
void run_tasks(int64_t count, const Worker& worker) {
  if (count <= 0) return;
  std::atomic<int64_t> taken{0};
  auto next = [&]() -> int64_t {
    const int64_t task = taken.fetch_add(1, std::memory_order_relaxed);
    return task < count ? task : -1;
  };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { worker(next); });
}

// The queue's partition into chunks of whole tiles, from the shapes only: enough chunks that
// row blocks x chunks reaches kTasks, none shorter than kMinChunk (each chunk of each row block
// keeps a partial softmax mean of its own, [block, D]).
struct QueueChunks {
  int64_t size;   // entries per chunk (a multiple of kTile), the last one shorter
  int64_t count;
  QueueChunks(int64_t q, int64_t other_tasks) {
    const int64_t wanted = std::max<int64_t>(1, ceil_div(kTasks, std::max<int64_t>(other_tasks, 1)));
    const int64_t most = std::max<int64_t>(1, q / kMinChunk);
    const int64_t chunks = std::min(wanted, most);
    size = std::max<int64_t>(kTile, ceil_div(ceil_div(q, chunks), kTile) * kTile);
    count = q == 0 ? 0 : ceil_div(q, size);
  }
  int64_t begin(int64_t c) const { return c * size; }
  int64_t end(int64_t c, int64_t q) const { return std::min(q, (c + 1) * size); }
};

// ---------------------------------------------------------------------------------------------
// Row loops in the accumulation dtype: the dispatched vector build for float, plain loops for
// float64 (gradient checks: exact std::exp).
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct RowOps;

template <>
struct RowOps<float> {
  const cpu::RowKernels& k = cpu::row_kernels();
  float max_biased(const float* x, const float* bias, int64_t n) const {
    return k.max_biased(x, bias, n);
  }
  float exp2_sum(float* x, const float* bias, int64_t n, float shift) const {
    return k.exp2_sum(x, bias, n, shift);
  }
};

template <>
struct RowOps<double> {
  double max_biased(const double* x, const double* bias, int64_t n) const {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < n; ++j) m = max_keep_nan(m, bias ? x[j] + bias[j] : x[j]);
    return m;
  }
  double exp2_sum(double* x, const double* bias, int64_t n, double shift) const {
    double sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      x[j] = std::exp2((bias ? x[j] + bias[j] : x[j]) - shift);
      sum += x[j];
    }
    return sum;
  }
};

// ---------------------------------------------------------------------------------------------
// The queue in the accumulation dtype
// ---------------------------------------------------------------------------------------------

// Rows of the queue as acc_t: the tensor itself when it has that dtype and unit column stride
// (no copy of a [Q, D] input), else converted tile by tile into the caller's buffer. Half
// precision is converted per tile rather than once: no O(Q D) float32 copy, and a tile of
// bfloat16 is half the bytes to stream from memory.
template <typename acc_t>
class QueueRows {
 public:
  QueueRows(const at::Tensor& queue, at::ScalarType acc_type) : d_(queue.size(1)) {
    const bool row_strided = queue.size(0) <= 1 || queue.stride(0) >= std::max<int64_t>(d_, 1);
    keep_ = (queue.size(1) <= 1 || queue.stride(1) == 1) && row_strided ? queue
                                                                        : queue.contiguous();
    dtype_ = keep_.scalar_type();
    row_stride_ = keep_.size(0) <= 1 ? std::max<int64_t>(d_, 1) : keep_.stride(0);
    converts_ = dtype_ != acc_type;
    TORCH_INTERNAL_ASSERT(!converts_ || (std::is_same_v<acc_t, float> &&
                                         (dtype_ == at::kBFloat16 || dtype_ == at::kHalf)));
    data_ = static_cast<const char*>(keep_.data_ptr());
  }

  bool converts() const { return converts_; }

  // Rows from j0 on as the bfloat16 bit patterns they are stored in, leading dimension *ld.
  const uint16_t* bfloat16_rows(int64_t j0, int64_t* ld) const {
    TORCH_INTERNAL_ASSERT(dtype_ == at::kBFloat16);
    *ld = row_stride_;
    return reinterpret_cast<const uint16_t*>(data_) + j0 * row_stride_;
  }

  // Rows [j0, j0 + rows) with leading dimension *ld; `buffer` holds rows x D when converting.
  const acc_t* rows(int64_t j0, int64_t rows, acc_t* buffer, int64_t* ld) const {
    if (!converts_) {
      *ld = row_stride_;
      return reinterpret_cast<const acc_t*>(data_) + j0 * row_stride_;
    }
    if constexpr (std::is_same_v<acc_t, float>) {
      const auto& kernels = cpu::row_kernels();
      auto convert = dtype_ == at::kBFloat16 ? kernels.bfloat16_to_float : kernels.float16_to_float;
      const uint16_t* src = reinterpret_cast<const uint16_t*>(data_);
      if (row_stride_ == d_) {
        convert(src + j0 * d_, buffer, rows * d_);
      } else {
        for (int64_t r = 0; r < rows; ++r) convert(src + (j0 + r) * row_stride_, buffer + r * d_, d_);
      }
    }
    *ld = std::max<int64_t>(d_, 1);
    return buffer;
  }

  // dst[e] += row_j[e] for e in [e0, e0 + width); `scratch` holds `width` values.
  void add_row(int64_t j, int64_t e0, int64_t width, acc_t* dst, acc_t* scratch) const {
    int64_t ld;
    const acc_t* row = converts_ ? nullptr : rows(j, 1, nullptr, &ld);
    if (converts_) {
      if constexpr (std::is_same_v<acc_t, float>) {
        const auto& kernels = cpu::row_kernels();
        auto convert =
            dtype_ == at::kBFloat16 ? kernels.bfloat16_to_float : kernels.float16_to_float;
        convert(reinterpret_cast<const uint16_t*>(data_) + j * row_stride_ + e0, scratch, width);
      }
      row = scratch;
    } else {
      row += e0;
    }
    for (int64_t e = 0; e < width; ++e) dst[e] += row[e];
  }

 private:
  at::Tensor keep_;
  const char* data_ = nullptr;
  int64_t d_;
  int64_t row_stride_ = 0;
  at::ScalarType dtype_;
  bool converts_ = false;
};

// -inf for empty slots, 0 for valid entries: added to the logits of tiles that have an empty
// slot; tiles without one skip the addition.
template <typename acc_t>
struct EmptySlots {
  std::vector<acc_t> bias;            // [Q]
  std::vector<uint8_t> any_in_tile;   // per tile of kTile entries (tiles start at multiples)

  EmptySlots(const int64_t* queue_labels, int64_t q)
      : bias(q, acc_t(0)), any_in_tile(ceil_div(q, kTile), 0) {
    for (int64_t j = 0; j < q; ++j) {
      if (queue_labels[j] < 0) {
        bias[j] = -std::numeric_limits<acc_t>::infinity();
        any_in_tile[j / kTile] = 1;
      }
    }
  }
  const acc_t* tile_bias(int64_t j0) const {
    return any_in_tile[j0 / kTile] ? bias.data() + j0 : nullptr;
  }
};

// ---------------------------------------------------------------------------------------------
// Selection (docs/kpos_loss.md, "Selection")
// ---------------------------------------------------------------------------------------------

// The valid queue entries of every class that occurs among the queries, ascending queue index
// within a class (CSR). Classes that no query has are never listed. A label is looked up in a
// table when the labels are small integers (O(Q)), else by binary search (O(Q log C)).
struct QueryClasses {
  std::vector<int64_t> labels;    // distinct query labels >= 0, ascending
  std::vector<int64_t> class_of;  // per query row: index into labels, -1 for a negative label
  std::vector<int64_t> offsets;   // members of class c: members[offsets[c], offsets[c + 1])
  std::vector<int64_t> members;   // queue indices

  QueryClasses(const int64_t* query_labels, int64_t n, const int64_t* queue_labels, int64_t q) {
    for (int64_t i = 0; i < n; ++i)
      if (query_labels[i] >= 0) labels.push_back(query_labels[i]);
    std::sort(labels.begin(), labels.end());
    labels.erase(std::unique(labels.begin(), labels.end()), labels.end());
    if (!labels.empty() && labels.back() < 4 * (n + q) + 4096) {
      table_.assign(labels.back() + 1, -1);
      for (size_t c = 0; c < labels.size(); ++c) table_[labels[c]] = static_cast<int32_t>(c);
    }
    class_of.resize(n);
    for (int64_t i = 0; i < n; ++i) class_of[i] = find(query_labels[i]);
    std::vector<int32_t> queue_class(q);
    offsets.assign(labels.size() + 1, 0);
    for (int64_t j = 0; j < q; ++j) {
      queue_class[j] = static_cast<int32_t>(find(queue_labels[j]));
      if (queue_class[j] >= 0) ++offsets[queue_class[j] + 1];
    }
    for (size_t c = 0; c < labels.size(); ++c) offsets[c + 1] += offsets[c];
    members.resize(offsets.back());
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t j = 0; j < q; ++j)
      if (queue_class[j] >= 0) members[fill[queue_class[j]]++] = j;
  }

  // Index of `label` in labels, or -1 (negative labels, empty slots and absent classes).
  int64_t find(int64_t label) const {
    if (label < 0) return -1;
    if (!table_.empty()) return label < static_cast<int64_t>(table_.size()) ? table_[label] : -1;
    auto it = std::lower_bound(labels.begin(), labels.end(), label);
    return it != labels.end() && *it == label ? it - labels.begin() : -1;
  }
  int64_t num_classes() const { return static_cast<int64_t>(labels.size()); }
  int64_t size(int64_t c) const { return c < 0 ? 0 : offsets[c + 1] - offsets[c]; }
  const int64_t* begin(int64_t c) const { return members.data() + offsets[c]; }

 private:
  std::vector<int32_t> table_;  // label -> class index or -1, when the labels are small
};

// k up to this keeps its smallest ranks in a sorted array while the candidates stream by (most
// ranks lose one comparison); larger k selects with nth_element.
constexpr int64_t kInsertionSelectMax = 64;

// Writes the selected queue indices of row i, ascending, into out[0, width) (-1 padded) and
// returns |S_i|. k > 0: the min(k, |M_i|) candidates with the smallest rank(seed, i, j), which
// never tie; k = -1: every candidate.
int64_t select_row(const QueryClasses& classes, int64_t i, int64_t k, uint32_t seed_k,
                   int64_t width, int64_t* out, std::vector<uint64_t>& scratch) {
  const int64_t c = classes.class_of[i];
  const int64_t same_class = classes.size(c);
  int64_t count = 0;
  if (k != 0 && same_class > 0) {
    const int64_t* candidates = classes.begin(c);
    if (k == -1 || same_class <= k) {
      count = same_class;
      for (int64_t t = 0; t < std::min(same_class, width); ++t) out[t] = candidates[t];
    } else {
      // (rank << 32 | position): ranks are distinct, so ordering by the key orders by rank.
      const uint32_t rk = row_key(seed_k, i);
      auto key_of = [&](int64_t t) {
        return (static_cast<uint64_t>(entry_rank(rk, candidates[t])) << 32) |
               static_cast<uint64_t>(t);
      };
      if (k <= kInsertionSelectMax) {
        scratch.resize(k);
        for (int64_t t = 0; t < k; ++t) scratch[t] = key_of(t);
        std::sort(scratch.begin(), scratch.end());
        for (int64_t t = k; t < same_class; ++t) {
          const uint64_t key = key_of(t);
          if (key >= scratch[k - 1]) continue;
          int64_t at = k - 1;
          for (; at > 0 && scratch[at - 1] > key; --at) scratch[at] = scratch[at - 1];
          scratch[at] = key;
        }
      } else {
        scratch.resize(same_class);
        for (int64_t t = 0; t < same_class; ++t) scratch[t] = key_of(t);
        std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end());
        scratch.resize(k);
      }
      // Ascending queue index = ascending position among the candidates.
      for (auto& key : scratch) key &= 0xFFFFFFFFull;
      std::sort(scratch.begin(), scratch.end());
      count = k;
      for (int64_t t = 0; t < std::min(k, width); ++t) out[t] = candidates[scratch[t]];
    }
  }
  for (int64_t t = std::min(count, width); t < width; ++t) out[t] = -1;
  return count;
}

struct Selection {
  at::Tensor positives;      // int64 [N, width]
  at::Tensor num_positives;  // int64 [N]: |P_i| = 1 + |S_i|
};

Selection select_positives(const QueryClasses& classes, int64_t n, int64_t k, int64_t width,
                           int64_t seed, const at::TensorOptions& long_opts) {
  Selection sel{at::empty({n, width}, long_opts), at::empty({n}, long_opts)};
  int64_t* pos = sel.positives.data_ptr<int64_t>();
  int64_t* num = sel.num_positives.data_ptr<int64_t>();
  const uint32_t seed_k = seed_key(seed);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> scratch;
    for (int64_t i = begin; i < end; ++i) {
      // k = -1 lists nothing here (its target comes from class sums): only count.
      num[i] = 1 + (k == -1 ? classes.size(classes.class_of[i])
                            : select_row(classes, i, k, seed_k, width, pos + i * width, scratch));
    }
  });
  return sel;
}

// t_i = (key_i + sum_{j in S_i} queue_j) / |P_i| in the accumulation dtype. Sums run in
// ascending queue index.
template <typename acc_t>
at::Tensor positive_target(const at::Tensor& key_acc, const QueueRows<acc_t>& queue,
                           const QueryClasses& classes, const Selection& sel, int64_t k) {
  const int64_t n = key_acc.size(0), d = key_acc.size(1);
  at::Tensor target = key_acc.clone();
  acc_t* t = target.data_ptr<acc_t>();
  const int64_t* num = sel.num_positives.data_ptr<int64_t>();
  if (k == -1) {
    // Class sums of the queue, once per query class; tasks of (class, block of feature
    // columns), so that a queue of one or two classes still spreads over the threads.
    const int64_t num_classes = classes.num_classes();
    const int64_t column_blocks = ceil_div(d, kClassSumColumns);
    std::vector<acc_t> sums(num_classes * d, acc_t(0));
    at::parallel_for(0, num_classes * column_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(kClassSumColumns);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task / column_blocks, e0 = (task % column_blocks) * kClassSumColumns;
        const int64_t width = std::min(kClassSumColumns, d - e0);
        acc_t* s = sums.data() + c * d + e0;
        const int64_t* members = classes.begin(c);
        for (int64_t m = 0; m < classes.size(c); ++m)
          queue.add_row(members[m], e0, width, s, scratch.data());
      }
    });
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t c = classes.class_of[i];
        if (c < 0) continue;
        const acc_t* s = sums.data() + c * d;
        for (int64_t e = 0; e < d; ++e) t[i * d + e] += s[e];
      }
    });
  } else if (k > 0) {
    const int64_t* pos = sel.positives.data_ptr<int64_t>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(d);
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t c = 0; c < k; ++c) {
          const int64_t j = pos[i * k + c];
          if (j < 0) break;
          queue.add_row(j, 0, d, t + i * d, scratch.data());
        }
      }
    });
  }
  for (int64_t i = 0; i < n; ++i) {
    const acc_t inv = acc_t(1) / static_cast<acc_t>(num[i]);
    for (int64_t e = 0; e < d; ++e) t[i * d + e] *= inv;
  }
  return target;
}

// ---------------------------------------------------------------------------------------------
// Dense pass
// ---------------------------------------------------------------------------------------------

// What the dense passes read: the queries scaled by 1/tau, the keys and the queue, all in the
// accumulation dtype (the queue converted per tile where it is not). The tiles of logits are
// computed from the queries scaled by log2(e)/tau instead: in base 2, which is what the row
// loops exponentiate (2^x is cheaper than e^x, and the GEMM applies the factor).
template <typename acc_t>
struct Problem {
  int64_t n, q, d;
  const acc_t* query;       // [N, D] contiguous, scaled by 1/tau
  const acc_t* query_log2;  // [N, D] contiguous, scaled by log2(e)/tau
  const acc_t* key;         // [N, D] contiguous
  const QueueRows<acc_t>& queue;
  const EmptySlots<acc_t>& empty;
  // The bfloat16 path (cpu::bf16_gemm_enabled() and bfloat16 features): the tiles of logits are
  // products of the bfloat16 query as given ([N, D] contiguous) and the queue as given, scaled
  // by logit_scale = log2(e)/tau in float32.
  bool bf16 = false;
  const uint16_t* query_bf16 = nullptr;
  float logit_scale = 1;
};

// Per-thread scratch of the dense passes: a tile of logits [kRowBlock, kTile], for a queue that
// is converted one tile of it, and on the bfloat16 path the tile of probabilities as bfloat16.
template <typename acc_t>
struct Scratch {
  at::Tensor storage, probs_storage;
  acc_t* logits;
  acc_t* queue_tile;
  uint16_t* probs_bf16 = nullptr;
  Scratch(const Problem<acc_t>& p)
      : storage(at::empty({kRowBlock * kTile +
                           (p.queue.converts() ? kTile * std::max<int64_t>(p.d, 1) : 0)},
                          at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value))) {
    logits = storage.data_ptr<acc_t>();
    queue_tile = p.queue.converts() ? logits + kRowBlock * kTile : nullptr;
    if (p.bf16) {
      probs_storage = at::empty({kRowBlock * kTile}, at::TensorOptions().dtype(at::kBFloat16));
      probs_bf16 = reinterpret_cast<uint16_t*>(probs_storage.data_ptr());
    }
  }
};

// The products of one queue tile [t0, t0 + width) with blocks of queries: on float32 (or
// float64) tiles, the queue converted where needed, or, on the bfloat16 path, on the bfloat16
// features as given with the probabilities rounded to bfloat16 (as FlashAttention rounds them
// for its second product), float32 sums either way.
template <typename acc_t>
class TileProducts {
 public:
  TileProducts(const Problem<acc_t>& p, Scratch<acc_t>& scratch, int64_t t0, int64_t width)
      : p_(p), scratch_(scratch), t0_(t0), width_(width) {
    if (p.bf16) {
      bf16_tile_ = p.queue.bfloat16_rows(t0, &ld_);
    } else {
      tile_ = p.queue.rows(t0, width, scratch.queue_tile, &ld_);
    }
  }

  // scratch.logits[r, j] = s_(r0 + r),(t0 + j) in base 2 (log2(e) q . key / tau).
  void logits(int64_t r0, int64_t rows) const {
    const int64_t d = p_.d;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (p_.bf16) {
        cpu::gemm_bf16(false, true, rows, width_, d, p_.logit_scale, p_.query_bf16 + r0 * d, d,
                       bf16_tile_, ld_, 0.0f, scratch_.logits, kTile);
        return;
      }
    }
    cpu::gemm(false, true, rows, width_, d, acc_t(1), p_.query_log2 + r0 * d, d, tile_, ld_,
              acc_t(0), scratch_.logits, kTile);
  }

  // out[rows, D] = beta out + P queue_tile, with P the tile of probabilities in scratch.logits.
  void add_weighted_keys(int64_t rows, acc_t beta, acc_t* out) const {
    const int64_t d = p_.d;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (p_.bf16) {
        cpu::gemm_bf16(false, false, rows, d, width_, 1.0f, probs_bf16(rows), kTile, bf16_tile_,
                       ld_, beta, out, d);
        return;
      }
    }
    cpu::gemm(false, false, rows, d, width_, acc_t(1), scratch_.logits, kTile, tile_, ld_, beta,
              out, d);
  }

  // out[width, D] = beta out + P^T rhs, rhs [rows, D] (as bfloat16 on the bfloat16 path).
  void add_transposed(int64_t rows, const acc_t* rhs, const uint16_t* rhs_bf16, acc_t beta,
                      acc_t* out) const {
    const int64_t d = p_.d;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (p_.bf16) {
        cpu::gemm_bf16(true, false, width_, d, rows, 1.0f, probs_bf16(rows), kTile, rhs_bf16, d,
                       beta, out, d);
        return;
      }
    }
    cpu::gemm(true, false, width_, d, rows, acc_t(1), scratch_.logits, kTile, rhs, d, beta, out,
              d);
  }

 private:
  const uint16_t* probs_bf16(int64_t rows) const {
    if constexpr (std::is_same_v<acc_t, float>) {
      const auto& kernels = cpu::row_kernels();
      for (int64_t r = 0; r < rows; ++r)
        kernels.float_to_bfloat16(scratch_.logits + r * kTile, scratch_.probs_bf16 + r * kTile,
                                  width_);
    }
    return scratch_.probs_bf16;
  }

  const Problem<acc_t>& p_;
  Scratch<acc_t>& scratch_;
  int64_t t0_, width_, ld_ = 0;
  const acc_t* tile_ = nullptr;
  const uint16_t* bf16_tile_ = nullptr;
};

// Online log-sum-exp, in base 2, of the query rows [r0, r0 + rows) over the queue entries
// [j0, j1), from an empty state (max -inf, sum 0), and, with `weighted`, the exp-weighted sum of
// the queue rows ([rows, D], overwritten).
template <typename acc_t>
void dense_chunk(const Problem<acc_t>& p, int64_t r0, int64_t rows, int64_t j0, int64_t j1,
                 Scratch<acc_t>& scratch, acc_t* run_max, acc_t* run_sum, acc_t* weighted) {
  const RowOps<acc_t> ops;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t d = p.d;
  for (int64_t r = 0; r < rows; ++r) {
    run_max[r] = neg_inf;
    run_sum[r] = acc_t(0);
  }
  if (weighted) std::fill(weighted, weighted + rows * d, acc_t(0));
  acc_t* logits = scratch.logits;
  for (int64_t t0 = j0; t0 < j1; t0 += kTile) {
    const int64_t width = std::min(kTile, j1 - t0);
    const TileProducts<acc_t> products(p, scratch, t0, width);
    products.logits(r0, rows);
    const acc_t* bias = p.empty.tile_bias(t0);
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* row = logits + r * kTile;
      const acc_t new_max = max_keep_nan(run_max[r], ops.max_biased(row, bias, width));
      if (new_max == neg_inf) {  // every entry so far empty: nothing to add, nothing to rescale
        std::fill(row, row + width, acc_t(0));
        continue;
      }
      const acc_t rescale = std::exp2(run_max[r] - new_max);  // 0 for the first entries
      run_sum[r] = run_sum[r] * rescale + ops.exp2_sum(row, bias, width, new_max);
      run_max[r] = new_max;
      if (weighted && rescale != acc_t(1)) {
        acc_t* w = weighted + r * d;
        for (int64_t e = 0; e < d; ++e) w[e] *= rescale;
      }
    }
    if (weighted) products.add_weighted_keys(rows, acc_t(1), weighted);
  }
}

// lse [N] and, with `mean` ([N, D]), the softmax mean m_i = p_i0 key_i + sum_j p_ij queue_j.
// Tasks are (row block, queue chunk) pairs; per row, the own key opens the log-sum-exp (its
// logit, weight 2^0 = 1) and the chunks merge in order, in base 2. A row with no valid queue
// entry gets lse = its own logit exactly, so its loss and gradients are exactly 0.
template <typename acc_t>
void dense_forward(const Problem<acc_t>& p, acc_t* lse, acc_t* mean) {
  const int64_t n = p.n, q = p.q, d = p.d;
  const int64_t row_blocks = ceil_div(n, kRowBlock);
  const QueueChunks chunks(q, row_blocks);
  std::vector<acc_t> part_max(chunks.count * n), part_sum(chunks.count * n);
  std::vector<acc_t> part_weighted(mean ? chunks.count * n * d : 0);

  run_tasks(row_blocks * chunks.count, [&](const auto& next) {
    SingleThreadedBlas single_threaded_blas;
    Scratch<acc_t> scratch(p);
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t block = task / chunks.count, chunk = task % chunks.count;
      const int64_t r0 = block * kRowBlock, rows = std::min(kRowBlock, n - r0);
      const int64_t at = chunk * n + r0;
      dense_chunk<acc_t>(p, r0, rows, chunks.begin(chunk), chunks.end(chunk, q), scratch,
                         part_max.data() + at, part_sum.data() + at,
                         mean ? part_weighted.data() + at * d : nullptr);
    }
  });

  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* qi = p.query + i * d;
      const acc_t* ki = p.key + i * d;
      acc_t own = 0;
      for (int64_t e = 0; e < d; ++e) own += qi[e] * ki[e];
      acc_t m = own * kLog2e<acc_t>, s = acc_t(1);
      bool any = false;
      acc_t* mi = mean ? mean + i * d : nullptr;
      if (mi) std::copy(ki, ki + d, mi);
      for (int64_t c = 0; c < chunks.count; ++c) {
        const acc_t cm = part_max[c * n + i], cs = part_sum[c * n + i];
        if (cs == acc_t(0)) continue;
        any = true;
        const acc_t new_m = max_keep_nan(m, cm);
        const acc_t a = std::exp2(m - new_m), b = std::exp2(cm - new_m);
        s = s * a + cs * b;
        if (mi) {
          const acc_t* w = part_weighted.data() + (c * n + i) * d;
          for (int64_t e = 0; e < d; ++e) mi[e] = mi[e] * a + w[e] * b;
        }
        m = new_m;
      }
      lse[i] = any ? (m + std::log2(s)) * kLn2<acc_t> : own;
      if (mi) {
        const acc_t inv = acc_t(1) / s;
        for (int64_t e = 0; e < d; ++e) mi[e] *= inv;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------
// The row-kernel build and the GEMM entry point are chosen at their first use; making that use
// here, on the calling thread, lets a warning about a forced choice reach Python's warnings
// rather than a worker thread's stderr.
void choose_implementations() {
  cpu::row_kernels();
  cpu::gemm_backend();
  cpu::bf16_gemm_enabled();
}

struct Inputs {
  at::Tensor scaled_query, log2_query, key_acc, qlab, klab;
  at::Tensor query_bf16;  // defined on the bfloat16 path: the query as given, contiguous
  double temperature;
};

Inputs prepare(const at::Tensor& query, const at::Tensor& key, const at::Tensor& query_labels,
               const at::Tensor& queue_labels, double temperature) {
  const auto acc_type = acc_type_of(query.scalar_type());
  const at::Tensor query_acc = query.to(acc_type);
  const bool bf16 = query.scalar_type() == at::kBFloat16 && cpu::bf16_gemm_enabled();
  return {query_acc.mul(1.0 / temperature).contiguous(),  // q / tau
          query_acc.mul(kLog2e<double> / temperature).contiguous(),  // q log2(e) / tau
          key.to(acc_type).contiguous(), query_labels.to(at::kLong).contiguous(),
          queue_labels.to(at::kLong).contiguous(), bf16 ? query.contiguous() : at::Tensor(),
          temperature};
}

template <typename acc_t>
Problem<acc_t> make_problem(const Inputs& in, const QueueRows<acc_t>& queue_rows,
                            const EmptySlots<acc_t>& empty, int64_t q) {
  Problem<acc_t> p{in.scaled_query.size(0), q, in.scaled_query.size(1),
                   in.scaled_query.data_ptr<acc_t>(), in.log2_query.data_ptr<acc_t>(),
                   in.key_acc.data_ptr<acc_t>(), queue_rows, empty};
  if (in.query_bf16.defined()) {
    p.bf16 = true;
    p.query_bf16 = reinterpret_cast<const uint16_t*>(in.query_bf16.data_ptr());
    p.logit_scale = static_cast<float>(kLog2e<double> / in.temperature);
  }
  return p;
}

KposForwardResult kpos_forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& queue, const at::Tensor& query_labels,
                                   const at::Tensor& queue_labels, int64_t k, double temperature,
                                   std::optional<int64_t> seed, bool query_grad) {
  check_forward_args(query, key, queue, query_labels, queue_labels, k, temperature);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n = query.size(0), q = queue.size(0), d = query.size(1);
  const auto acc_type = acc_type_of(query.scalar_type());
  const auto acc_opts = query.options().dtype(acc_type);
  const auto long_opts = query.options().dtype(at::kLong);
  const int64_t resolved_seed = resolve_seed(seed);
  at::Tensor loss_rows = at::empty({n}, acc_opts);
  at::Tensor lse = at::empty({n}, acc_opts);
  at::Tensor softmax_mean = at::empty({query_grad ? n : 0, d}, acc_opts);
  const int64_t width = k > 0 ? k : 0;
  if (n == 0) {
    return {loss_rows, lse, at::empty({0, width}, long_opts), at::empty({0}, long_opts),
            at::empty({0, d}, acc_opts), softmax_mean};
  }
  choose_implementations();
  SingleThreadedBlas single_threaded_blas;
  const Inputs in = prepare(query, key, query_labels, queue_labels, temperature);
  const QueryClasses classes(in.qlab.data_ptr<int64_t>(), n, in.klab.data_ptr<int64_t>(), q);
  const Selection sel = select_positives(classes, n, k, width, resolved_seed, long_opts);
  at::Tensor target;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "kpos_forward_cpu", [&] {
    const QueueRows<scalar_t> queue_rows(queue, acc_type);
    const EmptySlots<scalar_t> empty(in.klab.data_ptr<int64_t>(), q);
    target = positive_target<scalar_t>(in.key_acc, queue_rows, classes, sel, k);
    const Problem<scalar_t> p = make_problem<scalar_t>(in, queue_rows, empty, q);
    scalar_t* lse_p = lse.data_ptr<scalar_t>();
    dense_forward<scalar_t>(p, lse_p, query_grad ? softmax_mean.data_ptr<scalar_t>() : nullptr);
    const scalar_t* qs = p.query;
    const scalar_t* t = target.data_ptr<scalar_t>();
    scalar_t* loss = loss_rows.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      scalar_t positive = 0;
      for (int64_t e = 0; e < d; ++e) positive += qs[i * d + e] * t[i * d + e];
      loss[i] = lse_p[i] - positive;
    }
  });
  return {loss_rows, lse, sel.positives, sel.num_positives, target, softmax_mean};
}

// ---------------------------------------------------------------------------------------------
// Backward: dL/ds_ij = g_i (p_ij - [j in P_i] / |P_i|), s_ij = q_i . key_j / tau.
// ---------------------------------------------------------------------------------------------

// d queue_j = sum_i g_i p_ij q_i / tau over the queue tiles of each task: a task owns a chunk of
// the queue's rows of the gradient, so nothing merges; within a tile the row blocks add up in
// order. `weighted_query` is g_i q_i / tau [N, D]; grad_queue is written, not accumulated.
template <typename acc_t>
void dense_queue_grad(const Problem<acc_t>& p, const acc_t* lse, const acc_t* weighted_query,
                      acc_t* grad_queue) {
  const int64_t n = p.n, q = p.q, d = p.d;
  const QueueChunks chunks(q, 1);
  const RowOps<acc_t> ops;
  std::vector<acc_t> lse_log2(n);
  for (int64_t i = 0; i < n; ++i) lse_log2[i] = lse[i] * kLog2e<acc_t>;
  std::vector<uint16_t> weighted_bf16(p.bf16 ? n * d : 0);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (p.bf16) cpu::row_kernels().float_to_bfloat16(weighted_query, weighted_bf16.data(), n * d);
  }
  run_tasks(chunks.count, [&](const auto& next) {
    SingleThreadedBlas single_threaded_blas;
    Scratch<acc_t> scratch(p);
    for (int64_t chunk = next(); chunk >= 0; chunk = next()) {
      const int64_t j1 = chunks.end(chunk, q);
      for (int64_t t0 = chunks.begin(chunk); t0 < j1; t0 += kTile) {
        const int64_t width = std::min(kTile, j1 - t0);
        const TileProducts<acc_t> products(p, scratch, t0, width);
        const acc_t* bias = p.empty.tile_bias(t0);
        for (int64_t r0 = 0; r0 < n; r0 += kRowBlock) {
          const int64_t rows = std::min(kRowBlock, n - r0);
          products.logits(r0, rows);
          for (int64_t r = 0; r < rows; ++r)
            ops.exp2_sum(scratch.logits + r * kTile, bias, width, lse_log2[r0 + r]);
          products.add_transposed(rows, weighted_query + r0 * d,
                                  p.bf16 ? weighted_bf16.data() + r0 * d : nullptr,
                                  r0 == 0 ? acc_t(0) : acc_t(1), grad_queue + t0 * d);
        }
      }
    }
  });
}

template <typename acc_t>
void backward_cpu_impl(const at::Tensor& grad_rows, const Inputs& in, const at::Tensor& queue,
                       const at::Tensor& lse, const at::Tensor& positives,
                       const at::Tensor& num_positives, const at::Tensor& target,
                       const at::Tensor& softmax_mean, int64_t k, double temperature,
                       std::array<bool, 3> mask, at::Tensor& grad_query, at::Tensor& grad_key,
                       at::Tensor& grad_queue) {
  const int64_t n = in.scaled_query.size(0), q = queue.size(0), d = in.scaled_query.size(1);
  const auto acc_type = in.scaled_query.scalar_type();
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const QueueRows<acc_t> queue_rows(queue, acc_type);
  const EmptySlots<acc_t> empty(in.klab.data_ptr<int64_t>(), q);
  const Problem<acc_t> p = make_problem<acc_t>(in, queue_rows, empty, q);
  const acc_t* g = grad_rows.data_ptr<acc_t>();
  const acc_t* lse_p = lse.data_ptr<acc_t>();
  const int64_t* num = num_positives.data_ptr<int64_t>();

  if (mask[0]) {
    at::Tensor mean = softmax_mean;
    if (mean.size(0) != n) {  // the forward did not accumulate it: one pass over the queue
      mean = at::empty({n, d}, in.scaled_query.options());
      std::vector<acc_t> lse_again(n);
      dense_forward<acc_t>(p, lse_again.data(), mean.data_ptr<acc_t>());
    }
    const acc_t* m = mean.data_ptr<acc_t>();
    const acc_t* t = target.data_ptr<acc_t>();
    acc_t* out = grad_query.data_ptr<acc_t>();
    for (int64_t i = 0; i < n; ++i) {
      const acc_t scale = g[i] * inv_t;
      for (int64_t e = 0; e < d; ++e) out[i * d + e] = (m[i * d + e] - t[i * d + e]) * scale;
    }
  }
  if (mask[1]) {  // d s_i0 / d key_i = q_i / tau
    acc_t* out = grad_key.data_ptr<acc_t>();
    for (int64_t i = 0; i < n; ++i) {
      const acc_t* qi = p.query + i * d;
      const acc_t* ki = p.key + i * d;
      acc_t own = 0;
      for (int64_t e = 0; e < d; ++e) own += qi[e] * ki[e];
      const acc_t scale = g[i] * (std::exp(own - lse_p[i]) - acc_t(1) / static_cast<acc_t>(num[i]));
      for (int64_t e = 0; e < d; ++e) out[i * d + e] = qi[e] * scale;
    }
  }
  if (mask[2] && q > 0) {
    // g_i q_i / tau, the rows that d(queue) sums: densely with weights p_ij, sparsely with
    // weights 1 / |P_i| over the positives.
    std::vector<acc_t> weighted(n * d);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t e = 0; e < d; ++e) weighted[i * d + e] = p.query[i * d + e] * g[i];
    acc_t* dv = grad_queue.data_ptr<acc_t>();
    dense_queue_grad<acc_t>(p, lse_p, weighted.data(), dv);
    // Sparse part: - sum_{i: j in S_i} g_i q_i / (|P_i| tau), in ascending i.
    std::vector<acc_t> share(n * d);
    for (int64_t i = 0; i < n; ++i) {
      const acc_t inv = acc_t(1) / static_cast<acc_t>(num[i]);
      for (int64_t e = 0; e < d; ++e) share[i * d + e] = weighted[i * d + e] * inv;
    }
    if (k > 0) {
      const int64_t* pos = positives.data_ptr<int64_t>();
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t c = 0; c < k; ++c) {
          const int64_t j = pos[i * k + c];
          if (j < 0) break;
          for (int64_t e = 0; e < d; ++e) dv[j * d + e] -= share[i * d + e];
        }
      }
    } else if (k == -1) {
      const QueryClasses classes(in.qlab.data_ptr<int64_t>(), n, in.klab.data_ptr<int64_t>(), q);
      const int64_t num_classes = classes.num_classes();
      std::vector<acc_t> class_share(num_classes * d, acc_t(0));
      for (int64_t i = 0; i < n; ++i) {
        const int64_t c = classes.class_of[i];
        if (c < 0) continue;
        for (int64_t e = 0; e < d; ++e) class_share[c * d + e] += share[i * d + e];
      }
      at::parallel_for(0, num_classes, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          const acc_t* s = class_share.data() + c * d;
          const int64_t* members = classes.begin(c);
          for (int64_t m = 0; m < classes.size(c); ++m)
            for (int64_t e = 0; e < d; ++e) dv[members[m] * d + e] -= s[e];
        }
      });
    }
  }
}

KposBackwardResult kpos_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& query,
                                     const at::Tensor& key, const at::Tensor& queue,
                                     const at::Tensor& query_labels,
                                     const at::Tensor& queue_labels, const at::Tensor& lse,
                                     const at::Tensor& positives, const at::Tensor& num_positives,
                                     const at::Tensor& target, const at::Tensor& softmax_mean,
                                     int64_t k, double temperature,
                                     std::array<bool, 3> output_mask) {
  check_backward_args(grad_rows, query, key, queue, query_labels, queue_labels, lse, positives,
                      num_positives, target, softmax_mean, k, temperature);
  const int64_t n = query.size(0), q = queue.size(0), d = query.size(1);
  const auto acc_type = acc_type_of(query.scalar_type());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc_opts = query.options().dtype(acc_type);
  const bool work = n > 0;
  at::Tensor grad_query = at::zeros({n, d}, acc_opts);
  at::Tensor grad_key = at::zeros({n, d}, acc_opts);
  // Allocated only when asked for: a [Q, D] buffer would make the extra memory grow with Q.
  // The dense pass writes every row of it when there are queries.
  at::Tensor grad_queue;
  if (output_mask[2]) grad_queue = work && q > 0 ? at::empty({q, d}, acc_opts) : at::zeros({q, d}, acc_opts);
  if (work && (output_mask[0] || output_mask[1] || output_mask[2])) {
    choose_implementations();
    SingleThreadedBlas single_threaded_blas;
    const Inputs in = prepare(query, key, query_labels, queue_labels, temperature);
    AT_DISPATCH_FLOATING_TYPES(acc_type, "kpos_backward_cpu", [&] {
      backward_cpu_impl<scalar_t>(grad_rows.to(acc_type).contiguous(), in, queue,
                                  lse.contiguous(), positives.contiguous(),
                                  num_positives.contiguous(), target.contiguous(),
                                  softmax_mean.contiguous(), k, temperature, output_mask,
                                  grad_query, grad_key, grad_queue);
    });
  }
  auto finish = [&](bool needed, const at::Tensor& g, const at::Tensor& like) {
    return needed ? g.to(like.scalar_type()) : at::empty({0}, like.options());
  };
  return {finish(output_mask[0], grad_query, query), finish(output_mask[1], grad_key, key),
          finish(output_mask[2], grad_queue, queue)};
}

at::Tensor sample_positives_cpu(const at::Tensor& query_labels, const at::Tensor& queue_labels,
                                int64_t k, int64_t seed) {
  check_sample_positives_args(query_labels, queue_labels, k);
  const at::Tensor qlab = query_labels.to(at::kLong).contiguous();
  const at::Tensor klab = queue_labels.to(at::kLong).contiguous();
  const int64_t n = qlab.size(0), q = klab.size(0);
  const QueryClasses classes(qlab.data_ptr<int64_t>(), n, klab.data_ptr<int64_t>(), q);
  int64_t width = std::max<int64_t>(k, 0);
  if (k == -1) {
    width = 0;
    for (int64_t i = 0; i < n; ++i) width = std::max(width, classes.size(classes.class_of[i]));
  }
  at::Tensor out = at::empty({n, width}, qlab.options());
  int64_t* o = out.data_ptr<int64_t>();
  const uint32_t seed_k = seed_key(seed);
  std::vector<uint64_t> scratch;
  for (int64_t i = 0; i < n; ++i) select_row(classes, i, k, seed_k, width, o + i * width, scratch);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kcl, CPU, m) {
  m.impl("kpos_forward", &kpos_forward_cpu);
  m.impl("kpos_backward", &kpos_backward_cpu);
  m.impl("sample_positives", &sample_positives_cpu);
}

}  // namespace kcl
