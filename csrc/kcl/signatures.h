// C++ signatures of the kcl ops (the schemas are in csrc/ops.cpp), for the kernels that
// implement them and for the composite kpos_loss that calls kpos_forward.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace kcl {

// (loss_rows, lse, positives, num_positives, target, softmax_mean)
using KposForwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using KposForwardSignature = KposForwardResult(const at::Tensor& query, const at::Tensor& key,
                                               const at::Tensor& queue,
                                               const at::Tensor& query_labels,
                                               const at::Tensor& queue_labels, int64_t k,
                                               double temperature, std::optional<int64_t> seed,
                                               bool query_grad);

// (grad_query, grad_key, grad_queue)
using KposBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

}  // namespace kcl
