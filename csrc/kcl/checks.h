// Argument checks of the kpos ops, shared by the CPU and CUDA kernels. The
// messages match kcl_ext/_validation.py: they name the argument and what was
// expected.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace kcl {

inline bool is_integer_dtype(at::ScalarType t) {
  return at::isIntegralType(t, /*includeBool=*/false);
}

inline void check_reduction(c10::string_view reduction) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum" || reduction == "none",
                    "kpos_loss: reduction must be one of ('mean', 'sum', 'none'), got '",
                    std::string(reduction), "'");
}

inline void check_k(int64_t k) {
  TORCH_CHECK_VALUE(k >= -1, "kpos_loss: k must be >= -1 (-1 = all same-class entries), got ", k);
}

inline void check_temperature(double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "kpos_loss: temperature must be a positive finite float, got ", temperature);
}

inline void check_labels(const at::Tensor& query_labels, const at::Tensor& queue_labels) {
  TORCH_CHECK_TYPE(is_integer_dtype(query_labels.scalar_type()),
                   "kpos_loss: query_labels must have an integer dtype (e.g. torch.int64), got ",
                   query_labels.scalar_type());
  TORCH_CHECK_TYPE(is_integer_dtype(queue_labels.scalar_type()),
                   "kpos_loss: queue_labels must have an integer dtype (e.g. torch.int64), got ",
                   queue_labels.scalar_type());
  TORCH_CHECK_VALUE(query_labels.dim() == 1, "kpos_loss: query_labels must be 1-D, got shape ",
                    query_labels.sizes());
  TORCH_CHECK_VALUE(queue_labels.dim() == 1, "kpos_loss: queue_labels must be 1-D, got shape ",
                    queue_labels.sizes());
  TORCH_CHECK_VALUE(query_labels.device() == queue_labels.device(),
                    "kpos_loss: query_labels and queue_labels must be on one device, got ",
                    query_labels.device(), " and ", queue_labels.device());
}

inline void check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& queue,
                         const at::Tensor& query_labels, const at::Tensor& queue_labels) {
  TORCH_CHECK_VALUE(query.dim() == 2, "kpos_loss: query must be 2-D [N, D], got shape ",
                    query.sizes());
  const int64_t n = query.size(0), d = query.size(1);
  TORCH_CHECK_VALUE(key.dim() == 2 && key.size(0) == n && key.size(1) == d,
                    "kpos_loss: key must be 2-D [N, D] = [", n, ", ", d, "] like query, got ",
                    key.sizes());
  TORCH_CHECK_VALUE(queue.dim() == 2 && queue.size(1) == d,
                    "kpos_loss: queue must be 2-D [Q, D] with D = query.size(1) = ", d, ", got ",
                    queue.sizes());
  const auto dtype = query.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                       dtype == at::kDouble,
                   "kpos_loss: query must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK_TYPE(key.scalar_type() == dtype, "kpos_loss: key must have query's dtype ", dtype,
                   ", got ", key.scalar_type());
  TORCH_CHECK_TYPE(queue.scalar_type() == dtype, "kpos_loss: queue must have query's dtype ",
                   dtype, ", got ", queue.scalar_type());
  check_labels(query_labels, queue_labels);
  TORCH_CHECK_VALUE(query_labels.size(0) == n,
                    "kpos_loss: query_labels must be 1-D [N] with N = query.size(0) = ", n,
                    ", got ", query_labels.sizes());
  TORCH_CHECK_VALUE(queue_labels.size(0) == queue.size(0),
                    "kpos_loss: queue_labels must be 1-D [Q] with Q = queue.size(0) = ",
                    queue.size(0), ", got ", queue_labels.sizes());
  for (const auto& pair : {std::make_pair("key", &key), std::make_pair("queue", &queue),
                           std::make_pair("query_labels", &query_labels),
                           std::make_pair("queue_labels", &queue_labels)}) {
    TORCH_CHECK_VALUE(pair.second->device() == query.device(), "kpos_loss: ", pair.first,
                      " must be on query's device ", query.device(), ", got ",
                      pair.second->device());
  }
}

// The saved forward state that kpos_backward consumes (any backend): see the schema of
// kpos_forward in csrc/ops.cpp.
inline void check_backward_state(const at::Tensor& grad_rows, const at::Tensor& lse,
                                 const at::Tensor& positives, const at::Tensor& num_positives,
                                 const at::Tensor& target, const at::Tensor& softmax_mean,
                                 int64_t n, int64_t d, int64_t k, at::ScalarType acc_type,
                                 const at::Device& device) {
  TORCH_CHECK_VALUE(grad_rows.dim() == 1 && grad_rows.size(0) == n,
                    "kpos_backward: grad_rows must be [N] = [", n, "], got ", grad_rows.sizes());
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == n && lse.scalar_type() == acc_type,
                    "kpos_backward: lse must be [N] = [", n, "] of dtype ", acc_type, ", got ",
                    lse.sizes(), " ", lse.scalar_type());
  const int64_t width = k > 0 ? k : 0;
  TORCH_CHECK_VALUE(positives.dim() == 2 && positives.size(0) == n &&
                        positives.size(1) == width && positives.scalar_type() == at::kLong,
                    "kpos_backward: positives must be int64 [N, max(k, 0)] = [", n, ", ", width,
                    "], got ", positives.sizes(), " ", positives.scalar_type());
  TORCH_CHECK_VALUE(num_positives.dim() == 1 && num_positives.size(0) == n &&
                        num_positives.scalar_type() == at::kLong,
                    "kpos_backward: num_positives must be int64 [N] = [", n, "], got ",
                    num_positives.sizes(), " ", num_positives.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == n && target.size(1) == d &&
                        target.scalar_type() == acc_type,
                    "kpos_backward: target must be [N, D] = [", n, ", ", d, "] of dtype ",
                    acc_type, ", got ", target.sizes(), " ", target.scalar_type());
  TORCH_CHECK_VALUE(softmax_mean.dim() == 2 && (softmax_mean.size(0) == n || softmax_mean.size(0) == 0) &&
                        softmax_mean.size(1) == d && softmax_mean.scalar_type() == acc_type,
                    "kpos_backward: softmax_mean must be [N, D] = [", n, ", ", d, "] or [0, ", d,
                    "] of dtype ", acc_type, ", got ", softmax_mean.sizes(), " ",
                    softmax_mean.scalar_type());
  for (const auto& pair : {std::make_pair("grad_rows", &grad_rows), std::make_pair("lse", &lse),
                           std::make_pair("positives", &positives),
                           std::make_pair("num_positives", &num_positives),
                           std::make_pair("target", &target),
                           std::make_pair("softmax_mean", &softmax_mean)}) {
    TORCH_CHECK_VALUE(pair.second->device() == device, "kpos_backward: ", pair.first,
                      " must be on query's device ", device, ", got ", pair.second->device());
  }
}

// The accumulation dtype of every backend: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// What every kernel of an op checks before it starts (CPU and CUDA entry points): one place for
// the argument checks of each op's signature.
inline void check_forward_args(const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& queue, const at::Tensor& query_labels,
                               const at::Tensor& queue_labels, int64_t k, double temperature) {
  check_inputs(query, key, queue, query_labels, queue_labels);
  check_k(k);
  check_temperature(temperature);
}

inline void check_backward_args(const at::Tensor& grad_rows, const at::Tensor& query,
                                const at::Tensor& key, const at::Tensor& queue,
                                const at::Tensor& query_labels, const at::Tensor& queue_labels,
                                const at::Tensor& lse, const at::Tensor& positives,
                                const at::Tensor& num_positives, const at::Tensor& target,
                                const at::Tensor& softmax_mean, int64_t k, double temperature) {
  check_forward_args(query, key, queue, query_labels, queue_labels, k, temperature);
  check_backward_state(grad_rows, lse, positives, num_positives, target, softmax_mean,
                       query.size(0), query.size(1), k, acc_type_of(query.scalar_type()),
                       query.device());
}

inline void check_sample_positives_args(const at::Tensor& query_labels,
                                        const at::Tensor& queue_labels, int64_t k) {
  check_labels(query_labels, queue_labels);
  check_k(k);
}

}  // namespace kcl

#include <ATen/CPUGeneratorImpl.h>

#include <mutex>

namespace kcl {

// seed=None: draw from torch's default CPU generator, so torch.manual_seed
// reproduces a run on every device. The draw is the one of
// torch.randint(-2**63, 2**63 - 1, ()) (kcl_ext.reference.draw_seed and the
// Triton backend), so every backend selects the same positives after the same
// torch.manual_seed.
inline int64_t resolve_seed(std::optional<int64_t> seed) {
  if (seed.has_value()) return *seed;
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  const uint64_t drawn = at::check_generator<at::CPUGeneratorImpl>(gen)->random64();
  const uint64_t range = ~uint64_t(0);  // (2^63 - 1) - (-2^63)
  return static_cast<int64_t>(drawn % range + static_cast<uint64_t>(INT64_MIN));
}

}  // namespace kcl
