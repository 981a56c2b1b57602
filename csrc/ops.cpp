// The kcl operator library: every schema, in one TORCH_LIBRARY block, and the
// device-independent composite `kpos_loss`. Kernels live in cpu/ and cuda/;
// fake kernels and autograd are registered from Python (kcl_ext/ops.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "kcl/checks.h"

namespace kcl {

// kpos_loss = reduce(kpos_forward(...).loss_rows). Registered as
// CompositeImplicitAutograd so that autograd and torch.compile see
// kpos_forward, whose autograd formula and fake kernel are registered in Python.
at::Tensor kpos_loss(const at::Tensor& query, const at::Tensor& key, const at::Tensor& queue,
                     const at::Tensor& query_labels, const at::Tensor& queue_labels, int64_t k,
                     double temperature, c10::string_view reduction, std::optional<int64_t> seed) {
  check_reduction(reduction);
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("kcl::kpos_forward", "")
                            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, int64_t, double,
                                std::optional<int64_t>)>();
  auto rows = std::get<0>(forward.call(query, key, queue, query_labels, queue_labels, k,
                                       temperature, seed));
  if (reduction == "none") return rows.to(query.scalar_type());
  if (reduction == "sum") return rows.sum().to(query.scalar_type());
  return rows.mean().to(query.scalar_type());
}

TORCH_LIBRARY(kcl, m) {
  m.def(
      "kpos_loss(Tensor query, Tensor key, Tensor queue, Tensor query_labels, "
      "Tensor queue_labels, int k=6, float temperature=0.07, str reduction=\"mean\", "
      "int? seed=None) -> Tensor");
  // Per-row loss [N] and log-sum-exp [N] in the accumulation dtype, and the
  // selection state [N, 3] int64 (row_key, rank threshold, |P_i|).
  m.def(
      "kpos_forward(Tensor query, Tensor key, Tensor queue, Tensor query_labels, "
      "Tensor queue_labels, int k, float temperature, int? seed) -> (Tensor, Tensor, Tensor)");
  // Gradients of query, key, queue; one not asked for in output_mask comes back empty.
  m.def(
      "kpos_backward(Tensor grad_rows, Tensor query, Tensor key, Tensor queue, "
      "Tensor query_labels, Tensor queue_labels, Tensor lse, Tensor selection, "
      "float temperature, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("sample_positives(Tensor query_labels, Tensor queue_labels, int k, int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(kcl, CompositeImplicitAutograd, m) { m.impl("kpos_loss", &kpos_loss); }

}  // namespace kcl
