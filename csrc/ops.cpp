// The kcl operator library: every schema, in one TORCH_LIBRARY block, and the
// device-independent composite `kpos_loss`. Kernels live in cpu/ and cuda/;
// fake kernels and autograd are registered from Python (kcl_ext/ops.py).
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <string>

#include "kcl/checks.h"
#include "kcl/signatures.h"

namespace kcl {

// kpos_loss = reduce(kpos_forward(...).loss_rows). Registered as
// CompositeImplicitAutograd so that autograd and torch.compile see
// kpos_forward, whose autograd formula and fake kernel are registered in Python.
// When the query will get a gradient, the forward also accumulates the softmax-
// weighted mean of the keys (FlashAttention's output with V = [key; queue]), so the
// query's gradient needs no second pass over the queue (docs/kpos_loss.md).
at::Tensor kpos_loss(const at::Tensor& query, const at::Tensor& key, const at::Tensor& queue,
                     const at::Tensor& query_labels, const at::Tensor& queue_labels, int64_t k,
                     double temperature, c10::string_view reduction, std::optional<int64_t> seed) {
  check_reduction(reduction);
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("kcl::kpos_forward", "")
                            .typed<KposForwardSignature>();
  const bool query_grad = at::GradMode::is_enabled() && query.requires_grad();
  auto rows = std::get<0>(forward.call(query, key, queue, query_labels, queue_labels, k,
                                       temperature, seed, query_grad));
  if (reduction == "none") return rows.to(query.scalar_type());
  if (reduction == "sum") return rows.sum().to(query.scalar_type());
  return rows.mean().to(query.scalar_type());
}

TORCH_LIBRARY(kcl, m) {
  m.def(
      "kpos_loss(Tensor query, Tensor key, Tensor queue, Tensor query_labels, "
      "Tensor queue_labels, int k=6, float temperature=0.07, str reduction=\"mean\", "
      "int? seed=None) -> Tensor");
  // loss_rows [N], lse [N] (accumulation dtype); positives [N, max(k, 0)] int64 (the selected
  // queue indices, ascending, -1 padded: sample_positives' result for k > 0; width 0 for k <= 0);
  // num_positives [N] int64 (|P_i|); target [N, D] (the mean of the positive keys t_i);
  // softmax_mean [N, D] (sum_j p_ij key_j over the own key and the queue) when query_grad,
  // else [0, D].
  m.def(
      "kpos_forward(Tensor query, Tensor key, Tensor queue, Tensor query_labels, "
      "Tensor queue_labels, int k, float temperature, int? seed, bool query_grad=False) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of query, key, queue from the per-row gradient and the forward's state; one not
  // asked for in output_mask comes back empty.
  m.def(
      "kpos_backward(Tensor grad_rows, Tensor query, Tensor key, Tensor queue, "
      "Tensor query_labels, Tensor queue_labels, Tensor lse, Tensor positives, "
      "Tensor num_positives, Tensor target, Tensor softmax_mean, int k, float temperature, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("sample_positives(Tensor query_labels, Tensor queue_labels, int k, int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(kcl, CompositeImplicitAutograd, m) { m.impl("kpos_loss", &kpos_loss); }

}  // namespace kcl
