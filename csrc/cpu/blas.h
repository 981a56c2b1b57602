// Single-threaded matrix products for the CPU kernels (csrc/cpu/kpos_kernel.cpp).
//
// The kernels run their tile products inside their own parallel loop, one product per thread at a
// time, so that every product's summation order is fixed: a multi-threaded GEMM may split its
// reduction dimension across threads, and then its result depends on the thread count.
#pragma once

#include <cstdint>

namespace kcl {
namespace cpu {

// Row-major C[m, n] = alpha * op(A)[m, k] . op(B)[k, n] + beta * C, on the calling thread.
// op(A) = A ([m, k], leading dimension lda) or, with trans_a, A^T of an A stored [k, m]; the
// same for B. With beta == 0, C's previous content is ignored (NaN included).
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
          int64_t ldc);

// Row-major C[m, n] = alpha * op(A) . op(B) + beta * C with bfloat16 A and B (their bit
// patterns) and float32 C, products and sums in float32: MKL's gemm_bf16bf16f32, which runs on
// the CPU's bfloat16 matrix units (AMX) where it finds them. Only callable when
// bf16_gemm_enabled().
void gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
               const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta,
               float* c, int64_t ldc);

// Whether the kernels multiply bfloat16 features as bfloat16: MKL is called directly (see
// gemm_backend) and exports its bfloat16 GEMM, and the CPU has bfloat16 matrix units that this
// process may use (AMX-BF16: CPUID, the operating system's tile state in XCR0 and, on Linux,
// the permission to use it, which is requested here). Elsewhere a bfloat16 GEMM is a slower
// path than converting the tiles to float32 and running float32 GEMMs, which the kernels do
// instead. KCL_CPU_BF16_GEMM=1 takes the bfloat16 path on any CPU (for tests: MKL computes the
// same products there, in float32 kernels), KCL_CPU_BF16_GEMM=0 never takes it. Chosen once per
// process; a warning says when the environment forced it.
bool bf16_gemm_enabled();

// Which implementation gemm() calls: "mkl" (MKL's sgemm_/dgemm_, exported by libtorch_cpu on
// x86-64 builds, called directly) or "aten" (at::addmm_ on views of the operands: portable, a few
// microseconds more per call). KCL_CPU_BLAS=aten forces the second.
const char* gemm_backend();

// Makes BLAS calls of the current thread single-threaded for the object's lifetime (MKL's
// thread-local thread count; a no-op where libtorch does not export it), leaving the thread's
// OpenMP thread count (at::get_num_threads()) as it was.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas();
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int openmp_threads_;  // the caller's OpenMP thread count (0 without OpenMP)
  int previous_;
};

}  // namespace cpu
}  // namespace kcl
