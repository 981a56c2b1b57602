// C++ test of the kcl operator library built by CMake: loads it like torch.ops.load_library
// (dlopen), then checks kpos_loss, its backward and sample_positives against a dense ATen
// computation written here from docs/kpos_loss.md, with libtorch's autograd for the gradients.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "kcl/kpos_common.h"
#include "kcl/signatures.h"
#include "kcl/tile_engine_choice.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("[%s] %s\n", ok ? "PASS" : "FAIL", what.c_str());
  if (!ok) ++failures;
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).norm().item<double>() / std::max(b.norm().item<double>(), 1e-30);
}

// Dense selection, brute force over every (i, j): the k same-class entries of smallest rank.
at::Tensor dense_selection(const at::Tensor& qlab, const at::Tensor& klab, int64_t k, int64_t seed) {
  const int64_t n = qlab.size(0), q = klab.size(0);
  auto sel = at::zeros({n, q}, at::kBool);
  const uint32_t sk = kcl::seed_key(seed);
  for (int64_t i = 0; i < n; ++i) {
    std::vector<std::pair<uint32_t, int64_t>> cands;
    const int64_t li = qlab[i].item<int64_t>();
    for (int64_t j = 0; j < q; ++j) {
      const int64_t lj = klab[j].item<int64_t>();
      if (lj >= 0 && lj == li) cands.push_back({kcl::entry_rank(kcl::row_key(sk, i), j), j});
    }
    std::sort(cands.begin(), cands.end());
    const int64_t take = k < 0 ? static_cast<int64_t>(cands.size())
                               : std::min<int64_t>(k, static_cast<int64_t>(cands.size()));
    for (int64_t t = 0; t < take; ++t) sel[i][cands[t].second] = true;
  }
  return sel;
}

at::Tensor dense_loss_rows(const at::Tensor& query, const at::Tensor& key, const at::Tensor& queue,
                           const at::Tensor& klab, const at::Tensor& sel, double tau) {
  auto own = (query * key).sum(1) / tau;
  auto logits = at::matmul(query, queue.t()) / tau;
  auto valid = (klab >= 0).unsqueeze(0).expand_as(logits);
  auto all = at::cat({own.unsqueeze(1), logits.masked_fill(valid.logical_not(), -INFINITY)}, 1);
  auto lse = at::logsumexp(all, 1);
  auto pos = own + at::where(sel, logits, at::zeros_like(logits)).sum(1);
  auto count = sel.sum(1).to(query.scalar_type()) + 1;
  return lse - pos / count;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s path/to/libkcl_ops.so\n", argv[0]);
    return 2;
  }
  if (!dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL)) {
    std::fprintf(stderr, "dlopen failed: %s\n", dlerror());
    return 2;
  }
  torch::manual_seed(0);
  auto& dispatcher = c10::Dispatcher::singleton();
  auto loss_op = dispatcher.findSchemaOrThrow("kcl::kpos_loss", "")
                     .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, int64_t, double,
                                       c10::string_view, std::optional<int64_t>)>();
  // The schemas of csrc/ops.cpp (csrc/kcl/signatures.h).
  auto forward_op = dispatcher.findSchemaOrThrow("kcl::kpos_forward", "")
                        .typed<kcl::KposForwardSignature>();
  auto backward_op = dispatcher.findSchemaOrThrow("kcl::kpos_backward", "")
                         .typed<kcl::KposBackwardResult(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, int64_t, double,
                             std::array<bool, 3>)>();
  auto sample_op = dispatcher.findSchemaOrThrow("kcl::sample_positives", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();

  const int64_t n = 37, q = 1100, d = 24, seed = 12345;
  const double tau = 0.2;
  for (int64_t k : {0, 1, 6, -1}) {
    auto query = torch::randn({n, d}, torch::kDouble);
    auto key = torch::randn({n, d}, torch::kDouble);
    auto queue = torch::randn({q, d}, torch::kDouble);
    auto qlab = torch::randint(0, 5, {n}, torch::kLong);
    auto klab = torch::randint(-1, 5, {q}, torch::kLong);  // -1: empty slots
    auto sel = dense_selection(qlab, klab, k, seed);
    const std::string tag = "k=" + std::to_string(k) + ": ";

    // Forward, all reductions.
    auto rows = dense_loss_rows(query, key, queue, klab, sel, tau);
    expect(rel_err(loss_op.call(query, key, queue, qlab, klab, k, tau, "none", seed), rows) < 1e-10,
           tag + "loss (none) matches the dense computation");
    expect(rel_err(loss_op.call(query, key, queue, qlab, klab, k, tau, "mean", seed), rows.mean()) < 1e-10,
           tag + "loss (mean) matches");

    // Selection.
    auto picked = sample_op.call(qlab, klab, k, seed);
    auto picked_mask = at::zeros({n, q}, at::kBool);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < picked.size(1); ++c)
        if (picked[i][c].item<int64_t>() >= 0) picked_mask[i][picked[i][c].item<int64_t>()] = true;
    expect(at::equal(picked_mask, sel), tag + "sample_positives selects the dense selection");

    // Backward against libtorch autograd of the dense computation.
    auto qv = query.clone().requires_grad_(true), kv = key.clone().requires_grad_(true),
         bv = queue.clone().requires_grad_(true);
    auto grad_rows = torch::rand({n}, torch::kDouble) + 0.5;
    auto dense = dense_loss_rows(qv, kv, bv, klab, sel, tau);
    auto grads = torch::autograd::grad({dense}, {qv, kv, bv}, {grad_rows});
    auto fwd = forward_op.call(query, key, queue, qlab, klab, k, tau, seed, /*query_grad=*/true);
    auto bwd = backward_op.call(grad_rows, query, key, queue, qlab, klab, std::get<1>(fwd),
                                std::get<2>(fwd), std::get<3>(fwd), std::get<4>(fwd),
                                std::get<5>(fwd), k, tau, {true, true, true});
    expect(rel_err(std::get<0>(bwd), grads[0]) < 1e-10, tag + "grad query matches autograd");
    expect(rel_err(std::get<1>(bwd), grads[1]) < 1e-10, tag + "grad key matches autograd");
    expect(rel_err(std::get<2>(bwd), grads[2]) < 1e-10, tag + "grad queue matches autograd");
  }

  // Bad input raises, naming the argument.
  bool threw = false;
  try {
    loss_op.call(torch::randn({4, 8}), torch::randn({4, 8}), torch::randn({10, 7}),
                 torch::zeros({4}, torch::kLong), torch::zeros({10}, torch::kLong), 6, 0.07,
                 "mean", 1);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("queue must be 2-D [Q, D] with D = query.size(1) = 8") !=
            std::string::npos;
  }
  expect(threw, "a queue of the wrong width raises an error naming queue");

  // The CUDA kernels' engine choice (pure, no GPU needed): the tensor-core kernel's dynamic plus
  // static shared memory must fit the device's opt-in limit per block.
  {
    using namespace kcl::tiles;
    constexpr size_t sm80 = 166912, sm86 = 101376, sm90 = 232448;  // sharedMemPerBlockOptin
    expect(kTileStaticSmemBytes == 512 && mma_smem_bytes(128) == 52224 &&
               mma_smem_bytes(240) == 95232 && mma_smem_bytes(256) == 101376,
           "tensor-core shared memory: 512 static, 51 KiB dynamic at D = 128, 99 KiB at D = 256");
    expect(tensor_cores_usable(256, 8, sm80) && tensor_cores_usable(256, 9, sm90) &&
               tensor_cores_usable(1, 8, sm86) && tensor_cores_usable(240, 8, sm86),
           "tensor cores up to D = 256 on sm_80 / sm_90, up to D = 240 on sm_86 / sm_89");
    expect(!tensor_cores_usable(241, 8, sm86) && !tensor_cores_usable(256, 8, sm86),
           "sm_86 / sm_89 with 240 < D <= 256 take the FMA engine (99 KiB + 512 B do not fit)");
    expect(!tensor_cores_usable(257, 9, sm90) && !tensor_cores_usable(0, 9, sm90) &&
               !tensor_cores_usable(128, 7, 1 << 20),
           "no tensor cores for D > 256, D = 0 or before sm_80");
  }

  std::printf("%d passed, %d failed\n", 4 * 6 + 1 + 4 - failures, failures);
  return failures == 0 ? 0 : 1;
}
