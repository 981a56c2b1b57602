// The elementwise loops of the CPU kernels over one row of a logits tile (max, exp2, sum) and the
// conversions of feature rows to and from half precision, in two builds chosen once at run time: AVX2 + FMA +
// F16C where the CPU has them, portable C++ elsewhere (csrc/cpu/row_kernels.cpp).
//
// Results are deterministic on a machine: each call runs one fixed sequence of operations, which
// depends on the row length only, never on the thread or the position of the row.
#pragma once

#include <cstdint>

namespace kcl {
namespace cpu {

struct RowKernels {
  const char* isa;  // "avx2" or "generic"
  // max_j (x[j] + bias[j]) over j < n, with bias (0 or -inf per entry) optional (null): -inf for
  // n = 0 or a row of -inf.
  float (*max_biased)(const float* x, const float* bias, int64_t n);
  // x[j] = 2^(x[j] + bias[j] - shift) in place (bias optional), and returns the sum of the new
  // x. Within 2 ulp of exp2f; exactly 0 where x[j] + bias[j] - shift < -127 (so for every -inf
  // entry); shift must be finite.
  float (*exp2_sum)(float* x, const float* bias, int64_t n, float shift);
  // dst[j] = float(src[j]) for bfloat16 and float16 bit patterns.
  void (*bfloat16_to_float)(const uint16_t* src, float* dst, int64_t n);
  void (*float16_to_float)(const uint16_t* src, float* dst, int64_t n);
  // dst[j] = bfloat16(src[j]), rounded to nearest even (NaN stays NaN).
  void (*float_to_bfloat16)(const float* src, uint16_t* dst, int64_t n);
};

// The build chosen for this process: AVX2 where the CPU supports AVX2, FMA and F16C, unless the
// environment variable KCL_CPU_ISA=generic asks for the portable one (checked once, at the first
// call; a warning says when it was forced).
const RowKernels& row_kernels();

// Both builds, for tests of the choice: the generic one always, the AVX2 one or null.
const RowKernels& generic_row_kernels();
const RowKernels* avx2_row_kernels();

}  // namespace cpu
}  // namespace kcl
