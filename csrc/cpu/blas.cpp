// Single-threaded GEMM for the CPU kernels: MKL's Fortran entry points called directly where
// libtorch exports them, at::addmm_ on views of the operands elsewhere (csrc/cpu/blas.h).
//
// A tile product of the kernels takes 50-500 microseconds; ATen's dispatch, the tensor views and
// the output checks around a product cost a few microseconds, a few percent of the kernel, which
// the direct call saves.
#include "cpu/blas.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <dlfcn.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

// Exported (weakly linked here) by libtorch_cpu on x86-64 builds, which link MKL statically; null
// where libtorch has no MKL. The integer arguments are MKL_INT: 32-bit in MKL's LP64 interface,
// 64-bit in its ILP64 one. They are passed as pointers to int64_t holding values below 2^31, which
// read the same through either interface on a little-endian machine (the low word comes first).
extern "C" {
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
void sgemm_(const char* transa, const char* transb, const int64_t* m, const int64_t* n,
            const int64_t* k, const float* alpha, const float* a, const int64_t* lda,
            const float* b, const int64_t* ldb, const float* beta, float* c,
            const int64_t* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int64_t* m, const int64_t* n,
            const int64_t* k, const double* alpha, const double* a, const int64_t* lda,
            const double* b, const int64_t* ldb, const double* beta, double* c,
            const int64_t* ldc) __attribute__((weak));
void gemm_bf16bf16f32_(const char* transa, const char* transb, const int64_t* m,
                       const int64_t* n, const int64_t* k, const float* alpha, const uint16_t* a,
                       const int64_t* lda, const uint16_t* b, const int64_t* ldb,
                       const float* beta, float* c, const int64_t* ldc) __attribute__((weak));
}

namespace kcl {
namespace cpu {
namespace {

#if defined(__linux__) && defined(__x86_64__)
// The symbols must come from the library that also exports MKL_Set_Num_Threads_Local: an sgemm_
// of another BLAS loaded earlier into the process (a system libblas, a multi-threaded OpenBLAS)
// would neither be made single-threaded nor necessarily take 64-bit integers.
bool same_library(const void* a, const void* b) {
  Dl_info ia, ib;
  if (!dladdr(a, &ia) || !dladdr(b, &ib) || !ia.dli_fname || !ib.dli_fname) return false;
  return std::strcmp(ia.dli_fname, ib.dli_fname) == 0;
}

bool mkl_usable() {
  if (!MKL_Set_Num_Threads_Local || !sgemm_ || !dgemm_) return false;
  if (!same_library(reinterpret_cast<const void*>(&sgemm_),
                    reinterpret_cast<const void*>(&MKL_Set_Num_Threads_Local)) ||
      !same_library(reinterpret_cast<const void*>(&dgemm_),
                    reinterpret_cast<const void*>(&MKL_Set_Num_Threads_Local))) {
    return false;
  }
  // A 2 x 2 product with a known answer: guards against an interface this file does not expect.
  const float a[4] = {1, 2, 3, 4}, b[4] = {5, 6, 7, 8};
  float c[4] = {0, 0, 0, 0};
  const int64_t two = 2;
  const float one = 1, zero = 0;
  sgemm_("N", "N", &two, &two, &two, &one, a, &two, b, &two, &zero, c, &two);
  // Column-major: C = A B with A = [[1, 3], [2, 4]], B = [[5, 7], [6, 8]].
  return c[0] == 23 && c[1] == 34 && c[2] == 31 && c[3] == 46;
}
#else
bool same_library(const void*, const void*) { return false; }
bool mkl_usable() { return false; }
#endif

bool choose_mkl() {
  const char* forced = std::getenv("KCL_CPU_BLAS");
  if (forced && std::strcmp(forced, "aten") == 0) {
    TORCH_WARN("kcl_ext: KCL_CPU_BLAS=aten: the CPU kernels call their GEMMs through ATen");
    return false;
  }
  return mkl_usable();
}

bool use_mkl() {
  static const bool chosen = choose_mkl();
  return chosen;
}

template <typename T>
at::Tensor matrix_view(const T* data, bool trans, int64_t rows, int64_t cols, int64_t ld) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  T* p = const_cast<T*>(data);  // read only: an operand of addmm_
  if (trans) return at::from_blob(p, {cols, rows}, {ld, 1}, opts).t();
  return at::from_blob(p, {rows, cols}, {ld, 1}, opts);
}

template <typename T>
void gemm_aten(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  at::Tensor out = matrix_view<T>(c, false, m, n, ldc);
  out.addmm_(matrix_view<T>(a, trans_a, m, k, lda), matrix_view<T>(b, trans_b, k, n, ldb), beta,
             alpha);
}

// k == 0 (D = 0 features): C = beta * C, which BLAS does too, but some BLAS reject the
// leading dimensions of empty operands.
template <typename T>
void scale_only(int64_t m, int64_t n, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : c[i * ldc + j] * beta;
}

}  // namespace

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the Fortran call swaps the
// operands and the m, n sizes, and keeps each operand's own transposition flag.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_only(m, n, beta, c, ldc);
  if (!use_mkl()) return gemm_aten<float>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta,
                                          c, ldc);
  sgemm_(trans_b ? "T" : "N", trans_a ? "T" : "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta,
         c, &ldc);
}

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
          int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_only(m, n, beta, c, ldc);
  if (!use_mkl()) return gemm_aten<double>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta,
                                           c, ldc);
  dgemm_(trans_b ? "T" : "N", trans_a ? "T" : "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta,
         c, &ldc);
}

const char* gemm_backend() { return use_mkl() ? "mkl" : "aten"; }

namespace {

#if defined(__linux__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// AMX-BF16 usable by this process: the CPU has it (CPUID leaf 7: AMX-TILE, AMX-BF16), the
// operating system saves the tile state (XCR0 bits 17 and 18, read with XGETBV once CPUID says
// OSXSAVE), and Linux grants this process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA; granted once, asking again is harmless).
bool cpu_has_usable_amx_bf16() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = (edx >> 22) & 1u, amx_tile = (edx >> 24) & 1u;
  if (!amx_bf16 || !amx_tile) return false;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !((ecx >> 27) & 1u)) return false;  // OSXSAVE
  uint32_t xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if (((xcr0_lo >> 17) & 3u) != 3u) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#else
bool cpu_has_usable_amx_bf16() { return false; }
#endif

bool choose_bf16_gemm() {
  if (!use_mkl() || !gemm_bf16bf16f32_ ||
      !same_library(reinterpret_cast<const void*>(&gemm_bf16bf16f32_),
                    reinterpret_cast<const void*>(&MKL_Set_Num_Threads_Local))) {
    return false;
  }
  // [[1, 2], [3, 4]] [[5, 6], [7, 8]] (bfloat16 bit patterns of small integers): the interface
  // works as this file expects.
  const uint16_t a[4] = {0x3F80, 0x4040, 0x4000, 0x4080}, b[4] = {0x40A0, 0x40E0, 0x40C0, 0x4100};
  float c[4] = {0, 0, 0, 0};
  const int64_t two = 2;
  const float one = 1, zero = 0;
  gemm_bf16bf16f32_("N", "N", &two, &two, &two, &one, a, &two, b, &two, &zero, c, &two);
  if (!(c[0] == 19 && c[1] == 43 && c[2] == 22 && c[3] == 50)) return false;
  const char* forced = std::getenv("KCL_CPU_BF16_GEMM");
  if (forced && (std::strcmp(forced, "0") == 0 || std::strcmp(forced, "1") == 0)) {
    TORCH_WARN("kcl_ext: KCL_CPU_BF16_GEMM=", forced, ": the CPU kernels ",
               forced[0] == '1' ? "multiply bfloat16 features as bfloat16"
                                : "convert bfloat16 features to float32 for their GEMMs");
    return forced[0] == '1';
  }
  return cpu_has_usable_amx_bf16();
}

}  // namespace

bool bf16_gemm_enabled() {
  static const bool chosen = choose_bf16_gemm();
  return chosen;
}

void gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
               const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta,
               float* c, int64_t ldc) {
  TORCH_INTERNAL_ASSERT(bf16_gemm_enabled());
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_only(m, n, beta, c, ldc);
  gemm_bf16bf16f32_(trans_b ? "T" : "N", trans_a ? "T" : "N", &n, &m, &k, &alpha, b, &ldb, a,
                    &lda, &beta, c, &ldc);
}

namespace {

int openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 0;
#endif
}

void restore_openmp_threads(int threads) {
#ifdef _OPENMP
  if (threads > 0 && omp_get_max_threads() != threads) omp_set_num_threads(threads);
#else
  (void)threads;
#endif
}

}  // namespace

// MKL's OpenMP threading layer implements its thread-local count by also setting the calling
// thread's OpenMP thread count (omp_get_max_threads(), which is at::get_num_threads()), and does
// not put it back when the local count is reset: the kernels' own parallel regions would then run
// on one thread, and so would every ATen op the caller runs afterwards. Both are restored here.
SingleThreadedBlas::SingleThreadedBlas()
    : openmp_threads_(openmp_max_threads()),
      previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {
  restore_openmp_threads(openmp_threads_);
}

SingleThreadedBlas::~SingleThreadedBlas() {
  if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  restore_openmp_threads(openmp_threads_);
}

}  // namespace cpu
}  // namespace kcl
