// Fused CPU kernels of kpos_loss. Work is split into blocks of queries (forward,
// d query/key) or tiles of the queue (d queue); each block walks the other side
// tile by tile, so nothing of size N x Q is ever allocated. Logit tiles are
// products through ATen's BLAS; the online log-sum-exp and the positive masking
// run on the tile while it is hot in cache. Every block is owned by one thread
// and reduces in a fixed order, so results do not depend on the thread count.
// Tile buffers come from ATen's allocator (64-byte aligned): BLAS may pick its
// kernel, and so the summation order, by the alignment of its operands, and a
// malloc'd buffer's alignment changes from run to run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kcl/checks.h"
#include "kcl/kpos_common.h"

// MKL's thread-local thread count (exported by libtorch_cpu on x86-64 builds;
// null elsewhere). A multi-threaded GEMM may split its reduction dimension
// across threads, and then its summation order depends on the thread count
// and on timing: the kernels run their tile products single-threaded inside
// their own parallel loop instead, so results are bitwise reproducible.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace kcl {
namespace {

class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

constexpr int64_t kQueryBlock = 64;   // queries per block
constexpr int64_t kQueueTile = 1024;  // queue entries per tile: a 64 x 1024 fp32 tile is 256 KiB

// Valid queue entries grouped by label, ascending queue index within a label.
struct LabelIndex {
  std::vector<int64_t> labels;  // sorted
  std::vector<int64_t> index;   // queue index of labels[t]

  explicit LabelIndex(const int64_t* queue_labels, int64_t q) {
    for (int64_t j = 0; j < q; ++j)
      if (queue_labels[j] >= 0) index.push_back(j);
    std::stable_sort(index.begin(), index.end(),
                     [&](int64_t a, int64_t b) { return queue_labels[a] < queue_labels[b]; });
    labels.reserve(index.size());
    for (int64_t j : index) labels.push_back(queue_labels[j]);
  }

  std::pair<int64_t, int64_t> range(int64_t label) const {
    auto lo = std::lower_bound(labels.begin(), labels.end(), label);
    auto hi = std::upper_bound(lo, labels.end(), label);
    return {lo - labels.begin(), hi - labels.begin()};
  }
};

struct RowSelection {
  uint32_t row_key;
  int64_t threshold;
  int64_t num_selected;
};

// S_i as a rank threshold (docs/kpos_loss.md, "Selection"). O(|M_i|) per row.
RowSelection select_row(const LabelIndex& label_index, int64_t label, int64_t k, uint32_t seed_k,
                        int64_t row, std::vector<uint32_t>& scratch) {
  const uint32_t rk = row_key(seed_k, row);
  const auto [begin, end] =
      label >= 0 ? label_index.range(label) : std::pair<int64_t, int64_t>{0, 0};
  const int64_t same_class = end - begin;
  int64_t threshold = kThresholdNone, num_selected = 0;
  if (trivial_selection(label, k, same_class, &threshold, &num_selected))
    return {rk, threshold, num_selected};
  scratch.resize(same_class);
  for (int64_t t = 0; t < same_class; ++t)
    scratch[t] = entry_rank(rk, label_index.index[begin + t]);
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end());
  return {rk, static_cast<int64_t>(scratch[k - 1]), k};
}

struct QueueTiles {
  int64_t q;
  int64_t count;
  std::vector<uint8_t> has_empty_slot;  // per tile

  QueueTiles(const int64_t* queue_labels, int64_t q) : q(q), count((q + kQueueTile - 1) / kQueueTile) {
    has_empty_slot.assign(count, 0);
    for (int64_t j = 0; j < q; ++j)
      if (queue_labels[j] < 0) has_empty_slot[j / kQueueTile] = 1;
  }
  int64_t begin(int64_t t) const { return t * kQueueTile; }
  int64_t width(int64_t t) const { return std::min(kQueueTile, q - t * kQueueTile); }
};

// Scratch for one tile of logits, [kQueryBlock, kQueueTile] at most.
template <typename acc_t>
struct TileBuffer {
  at::Tensor storage;
  explicit TileBuffer(at::ScalarType acc_type)
      : storage(at::empty({kQueryBlock * kQueueTile}, at::TensorOptions().dtype(acc_type))) {}
  acc_t* data() { return storage.data_ptr<acc_t>(); }
};

template <typename acc_t>
at::Tensor empty_slot_bias(const int64_t* queue_labels, int64_t q, at::ScalarType acc_type) {
  auto bias = at::empty({q}, at::TensorOptions().dtype(acc_type));
  acc_t* b = bias.data_ptr<acc_t>();
  for (int64_t j = 0; j < q; ++j)
    b[j] = queue_labels[j] < 0 ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);
  return bias;
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Up-cast to the accumulation dtype; a no-op (no copy) when it already is, contiguous.
at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

template <typename acc_t>
void forward_cpu_impl(const at::Tensor& scaled_query, const at::Tensor& own_logit,
                      const at::Tensor& bank, const int64_t* qlab, const int64_t* klab, int64_t k,
                      int64_t seed, at::Tensor& loss_rows, at::Tensor& lse, at::Tensor& selection) {
  const int64_t n = scaled_query.size(0), q = bank.size(0);
  const auto acc_type = scaled_query.scalar_type();
  const LabelIndex label_index(klab, q);
  const QueueTiles tiles(klab, q);
  const at::Tensor bias = empty_slot_bias<acc_t>(klab, q, acc_type);
  const uint32_t seed_k = seed_key(seed);
  const int64_t num_blocks = (n + kQueryBlock - 1) / kQueryBlock;

  const acc_t* own = own_logit.data_ptr<acc_t>();
  acc_t* loss_out = loss_rows.data_ptr<acc_t>();
  acc_t* lse_out = lse.data_ptr<acc_t>();
  int64_t* sel_out = selection.data_ptr<int64_t>();

  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<uint32_t> scratch;
    SingleThreadedBlas single_threaded_blas;
    TileBuffer<acc_t> tile_buffer(acc_type);
    std::vector<acc_t> run_max(kQueryBlock), run_sum(kQueryBlock), pos_sum(kQueryBlock);
    std::vector<RowSelection> sel(kQueryBlock);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t r0 = block * kQueryBlock, rows = std::min(kQueryBlock, n - r0);
      const at::Tensor q_blk = scaled_query.narrow(0, r0, rows);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = r0 + r;
        sel[r] = select_row(label_index, qlab[i], k, seed_k, i, scratch);
        run_max[r] = own[i];  // the own key opens every row: exp(0) = 1
        run_sum[r] = acc_t(1);
        pos_sum[r] = own[i];
      }
      for (int64_t t = 0; t < tiles.count; ++t) {
        const int64_t j0 = tiles.begin(t), width = tiles.width(t);
        at::Tensor logits = at::from_blob(tile_buffer.data(), {rows, width},
                                          at::TensorOptions().dtype(acc_type));
        at::mm_out(logits, q_blk, bank.narrow(0, j0, width).t());
        acc_t* s = tile_buffer.data();
        // Positive masking on the raw logits of this tile.
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t label = qlab[r0 + r];
          if (sel[r].num_selected == 0) continue;
          const acc_t* srow = s + r * width;
          acc_t acc = 0;
          for (int64_t c = 0; c < width; ++c) {
            const int64_t j = j0 + c;
            if (klab[j] == label && is_selected(sel[r].row_key, sel[r].threshold, j)) acc += srow[c];
          }
          pos_sum[r] += acc;
        }
        if (tiles.has_empty_slot[t]) logits.add_(bias.narrow(0, j0, width));
        // Online log-sum-exp: rescale the running sum to the new row max.
        const at::Tensor tile_max = std::get<0>(logits.max(1));
        const acc_t* tmax = tile_max.data_ptr<acc_t>();
        for (int64_t r = 0; r < rows; ++r) {
          const acc_t new_max = std::max(run_max[r], tmax[r]);
          run_sum[r] *= std::exp(run_max[r] - new_max);
          run_max[r] = new_max;
        }
        at::Tensor max_col = at::from_blob(run_max.data(), {rows, 1}, at::TensorOptions().dtype(acc_type));
        logits.sub_(max_col).exp_();
        const at::Tensor tile_sum = logits.sum(1);
        const acc_t* tsum = tile_sum.data_ptr<acc_t>();
        for (int64_t r = 0; r < rows; ++r) run_sum[r] += tsum[r];
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = r0 + r;
        const int64_t num_positives = 1 + sel[r].num_selected;
        lse_out[i] = run_max[r] + std::log(run_sum[r]);
        loss_out[i] = lse_out[i] - pos_sum[r] / static_cast<acc_t>(num_positives);
        sel_out[i * 3 + kSelRowKey] = sel[r].row_key;
        sel_out[i * 3 + kSelThreshold] = sel[r].threshold;
        sel_out[i * 3 + kSelNumPositives] = num_positives;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kpos_forward_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& queue,
    const at::Tensor& query_labels, const at::Tensor& queue_labels, int64_t k, double temperature,
    std::optional<int64_t> seed) {
  check_inputs(query, key, queue, query_labels, queue_labels);
  check_k(k);
  check_temperature(temperature);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n = query.size(0);
  const auto acc_type = acc_type_of(query.scalar_type());
  const auto acc_opts = query.options().dtype(acc_type);
  at::Tensor loss_rows = at::empty({n}, acc_opts);
  at::Tensor lse = at::empty({n}, acc_opts);
  at::Tensor selection = at::empty({n, 3}, query.options().dtype(at::kLong));
  const int64_t resolved_seed = resolve_seed(seed);
  if (n == 0) return {loss_rows, lse, selection};

  const at::Tensor scaled_query = to_acc(query, acc_type).mul(1.0 / temperature);  // q / tau
  const at::Tensor key_acc = to_acc(key, acc_type);
  const at::Tensor own_logit = (scaled_query * key_acc).sum(1);
  const at::Tensor bank = to_acc(queue, acc_type);
  const at::Tensor qlab = query_labels.to(at::kLong).contiguous();
  const at::Tensor klab = queue_labels.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc_type, "kpos_forward_cpu", [&] {
    forward_cpu_impl<scalar_t>(scaled_query, own_logit, bank, qlab.data_ptr<int64_t>(),
                               klab.data_ptr<int64_t>(), k, resolved_seed, loss_rows, lse,
                               selection);
  });
  return {loss_rows, lse, selection};
}

// Gradient of loss_i with respect to its logits, in place on one tile of
// logits: g_i * (softmax_ij - [j in S_i] / |P_i|). `transposed` tiles are
// [queue entries, queries].
template <typename acc_t>
void logits_to_grad(at::Tensor& logits, bool transposed, int64_t r0, int64_t rows, int64_t j0,
                    int64_t width, const acc_t* lse, const acc_t* grad, const int64_t* sel,
                    const int64_t* qlab, const int64_t* klab, const at::Tensor& lse_t,
                    const at::Tensor& grad_t, const at::Tensor* bias) {
  if (bias) logits.add_(transposed ? bias->narrow(0, j0, width).unsqueeze(1)
                                   : bias->narrow(0, j0, width));
  if (transposed) {
    logits.sub_(lse_t.narrow(0, r0, rows)).exp_().mul_(grad_t.narrow(0, r0, rows));
  } else {
    logits.sub_(lse_t.narrow(0, r0, rows).unsqueeze(1)).exp_().mul_(grad_t.narrow(0, r0, rows).unsqueeze(1));
  }
  acc_t* s = logits.data_ptr<acc_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r0 + r;
    const int64_t* row_sel = sel + i * 3;
    if (row_sel[kSelNumPositives] == 1) continue;
    const uint32_t rk = static_cast<uint32_t>(row_sel[kSelRowKey]);
    const int64_t threshold = row_sel[kSelThreshold];
    const acc_t share = grad[i] / static_cast<acc_t>(row_sel[kSelNumPositives]);
    const int64_t label = qlab[i];
    for (int64_t c = 0; c < width; ++c) {
      const int64_t j = j0 + c;
      if (klab[j] == label && is_selected(rk, threshold, j)) {
        s[transposed ? c * rows + r : r * width + c] -= share;
      }
    }
  }
  (void)lse;
}

template <typename acc_t>
void backward_cpu_impl(const at::Tensor& grad_rows, const at::Tensor& scaled_query,
                       const at::Tensor& key_acc, const at::Tensor& bank, const int64_t* qlab,
                       const int64_t* klab, const at::Tensor& lse, const at::Tensor& selection,
                       double temperature, bool need_query_key, bool need_queue,
                       at::Tensor& grad_query_acc, at::Tensor& grad_key_acc,
                       at::Tensor& grad_queue_acc) {
  const int64_t n = scaled_query.size(0), q = bank.size(0);
  const auto acc_type = scaled_query.scalar_type();
  const auto acc_opts = at::TensorOptions().dtype(acc_type);
  const QueueTiles tiles(klab, q);
  const at::Tensor bias = empty_slot_bias<acc_t>(klab, q, acc_type);
  const acc_t* lse_p = lse.data_ptr<acc_t>();
  const acc_t* grad_p = grad_rows.data_ptr<acc_t>();
  const int64_t* sel = selection.data_ptr<int64_t>();
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);

  if (need_query_key) {
    // Own-key term: coef_i = g_i * (p_i0 - 1/|P_i|).
    const at::Tensor own_logit = (scaled_query * key_acc).sum(1);
    const at::Tensor num_pos = selection.select(1, kSelNumPositives).to(acc_type);
    const at::Tensor own_coef = grad_rows * ((own_logit - lse).exp() - num_pos.reciprocal());
    grad_key_acc = scaled_query * own_coef.unsqueeze(1);  // d s_i0 / d key_i = q_i / tau
    grad_query_acc = key_acc * own_coef.unsqueeze(1);     // scaled by 1/tau below
    const int64_t num_blocks = (n + kQueryBlock - 1) / kQueryBlock;
    at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      SingleThreadedBlas single_threaded_blas;
    TileBuffer<acc_t> tile_buffer(acc_type);
      for (int64_t block = block_begin; block < block_end; ++block) {
        const int64_t r0 = block * kQueryBlock, rows = std::min(kQueryBlock, n - r0);
        const at::Tensor q_blk = scaled_query.narrow(0, r0, rows);
        at::Tensor dq_blk = grad_query_acc.narrow(0, r0, rows);
        for (int64_t t = 0; t < tiles.count; ++t) {
          const int64_t j0 = tiles.begin(t), width = tiles.width(t);
          const at::Tensor bank_tile = bank.narrow(0, j0, width);
          at::Tensor logits = at::from_blob(tile_buffer.data(), {rows, width}, acc_opts);
          at::mm_out(logits, q_blk, bank_tile.t());
          logits_to_grad<acc_t>(logits, false, r0, rows, j0, width, lse_p, grad_p, sel, qlab, klab,
                                lse, grad_rows, tiles.has_empty_slot[t] ? &bias : nullptr);
          dq_blk.addmm_(logits, bank_tile);
        }
        dq_blk.mul_(inv_t);
      }
    });
  }

  if (need_queue) {
    // grad_queue_acc: zeros [Q, D], allocated by the caller.
    at::parallel_for(0, tiles.count, 1, [&](int64_t tile_begin, int64_t tile_end) {
      SingleThreadedBlas single_threaded_blas;
    TileBuffer<acc_t> tile_buffer(acc_type);
      for (int64_t t = tile_begin; t < tile_end; ++t) {
        const int64_t j0 = tiles.begin(t), width = tiles.width(t);
        const at::Tensor bank_tile = bank.narrow(0, j0, width);
        at::Tensor dqueue_tile = grad_queue_acc.narrow(0, j0, width);
        for (int64_t r0 = 0; r0 < n; r0 += kQueryBlock) {
          const int64_t rows = std::min(kQueryBlock, n - r0);
          const at::Tensor q_blk = scaled_query.narrow(0, r0, rows);
          at::Tensor logits_t = at::from_blob(tile_buffer.data(), {width, rows}, acc_opts);
          at::mm_out(logits_t, bank_tile, q_blk.t());
          logits_to_grad<acc_t>(logits_t, true, r0, rows, j0, width, lse_p, grad_p, sel, qlab,
                                klab, lse, grad_rows, tiles.has_empty_slot[t] ? &bias : nullptr);
          dqueue_tile.addmm_(logits_t, q_blk);  // d s_ij / d queue_j = q_i / tau
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kpos_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& queue, const at::Tensor& query_labels, const at::Tensor& queue_labels,
    const at::Tensor& lse, const at::Tensor& selection, double temperature,
    std::array<bool, 3> output_mask) {
  check_inputs(query, key, queue, query_labels, queue_labels);
  check_temperature(temperature);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n = query.size(0), q = queue.size(0);
  const auto acc_type = acc_type_of(query.scalar_type());
  check_backward_state(grad_rows, lse, selection, n, acc_type);
  const bool need_query_key = output_mask[0] || output_mask[1];
  const bool need_queue = output_mask[2];
  at::Tensor grad_query_acc = at::zeros({n, query.size(1)}, query.options().dtype(acc_type));
  at::Tensor grad_key_acc = at::zeros_like(grad_query_acc);
  // Allocated only when asked for: a [Q, D] buffer would make the extra memory grow with Q.
  at::Tensor grad_queue_acc =
      need_queue ? at::zeros({q, queue.size(1)}, query.options().dtype(acc_type)) : at::Tensor();
  if (n > 0 && (need_query_key || need_queue)) {
    const at::Tensor scaled_query = to_acc(query, acc_type).mul(1.0 / temperature);
    const at::Tensor key_acc = to_acc(key, acc_type);
    const at::Tensor bank = to_acc(queue, acc_type);
    const at::Tensor qlab = query_labels.to(at::kLong).contiguous();
    const at::Tensor klab = queue_labels.to(at::kLong).contiguous();
    const at::Tensor grad_acc = grad_rows.to(acc_type).contiguous();
    const at::Tensor lse_c = lse.contiguous();
    const at::Tensor sel_c = selection.contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc_type, "kpos_backward_cpu", [&] {
      backward_cpu_impl<scalar_t>(grad_acc, scaled_query, key_acc, bank, qlab.data_ptr<int64_t>(),
                                  klab.data_ptr<int64_t>(), lse_c, sel_c, temperature,
                                  need_query_key, need_queue, grad_query_acc, grad_key_acc,
                                  grad_queue_acc);
    });
  }
  auto finish = [&](bool needed, const at::Tensor& g, const at::Tensor& like) {
    return needed ? g.to(like.scalar_type()) : at::empty({0}, like.options());
  };
  return {finish(output_mask[0], grad_query_acc, query), finish(output_mask[1], grad_key_acc, key),
          finish(output_mask[2], grad_queue_acc, queue)};
}

at::Tensor sample_positives_cpu(const at::Tensor& query_labels, const at::Tensor& queue_labels,
                                int64_t k, int64_t seed) {
  check_labels(query_labels, queue_labels);
  check_k(k);
  const at::Tensor qlab_t = query_labels.to(at::kLong).contiguous();
  const at::Tensor klab_t = queue_labels.to(at::kLong).contiguous();
  const int64_t n = qlab_t.size(0), q = klab_t.size(0);
  const int64_t* qlab = qlab_t.data_ptr<int64_t>();
  const int64_t* klab = klab_t.data_ptr<int64_t>();
  const LabelIndex label_index(klab, q);
  const uint32_t seed_k = seed_key(seed);
  std::vector<RowSelection> sel(n);
  std::vector<uint32_t> scratch;
  int64_t width = k;
  for (int64_t i = 0; i < n; ++i) {
    sel[i] = select_row(label_index, qlab[i], k, seed_k, i, scratch);
    if (k == -1) width = std::max(width, sel[i].num_selected);
  }
  width = std::max<int64_t>(width, 0);
  at::Tensor out = at::full({n, width}, -1, qlab_t.options());
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (sel[i].num_selected == 0) continue;
    const auto [begin, end] = label_index.range(qlab[i]);
    int64_t c = 0;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = label_index.index[t];
      if (is_selected(sel[i].row_key, sel[i].threshold, j)) o[i * width + c++] = j;
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kcl, CPU, m) {
  m.impl("kpos_forward", &kpos_forward_cpu);
  m.impl("kpos_backward", &kpos_backward_cpu);
  m.impl("sample_positives", &sample_positives_cpu);
}

}  // namespace kcl
