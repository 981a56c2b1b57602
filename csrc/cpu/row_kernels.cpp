// The row loops of the CPU kernels (csrc/cpu/row_kernels.h) in two builds: portable C++ and AVX2
// + FMA + F16C. This file is compiled with the baseline flags of the rest of the library; only
// the functions marked KCL_TARGET_AVX2 contain AVX2 instructions, and they run only after the CPU
// said it has them. Compiling the whole file with -mavx2 instead would also emit AVX2 copies of
// the inline functions of the headers it includes, which the linker may then pick for callers
// that run on any CPU.
//
// The exponential is base 2 (the kernels scale their logits by log2(e) beforehand, in the
// query, so the GEMM does that multiplication for free): 2^x = 2^n 2^f with n = round(x) and
// f = x - n in [-1/2, 1/2], exact; 2^f by a degree-6 polynomial (its coefficients fitted here for
// the relative error, 1.3 ulp at most in float32), 2^n assembled in the exponent bits. Inputs
// are clamped to [-127, 127] first: n = -127 makes the exponent bits 0 and the result exactly 0,
// so every input below -127, -inf included, gives 0 with no separate test; a NaN stays NaN.
#include "cpu/row_kernels.h"

#include <c10/util/Exception.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KCL_HAVE_AVX2_BUILD 1
#include <immintrin.h>
#define KCL_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define KCL_HAVE_AVX2_BUILD 0
#endif

namespace kcl {
namespace cpu {
namespace {

constexpr float kExp2Low = -127.0f;
constexpr float kExp2High = 127.0f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: x + magic rounds x to an integer,
constexpr uint32_t kMagicBits = 0x4B400000u;  // whose bits are then kMagicBits + round(x)
constexpr float kC1 = 0.6931471824645996f, kC2 = 0.24022647738456726f,
                kC3 = 0.055503323674201965f, kC4 = 0.00961843691766262f,
                kC5 = 0.0013398875016719103f, kC6 = 0.00015353360504377633f;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kLanes = 8;  // both builds sum in 8 interleaved partial sums

// max(a, b) keeping a NaN of either argument, so a NaN logit reaches the loss (std::max drops
// it). Local rather than kcl/kpos_common.h's: see the note on inline header functions above.
inline float max_keep_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// ---------------------------------------------------------------------------------------------
// Portable build: loops over blocks of 8 that compilers vectorise with the baseline ISA.
// ---------------------------------------------------------------------------------------------
inline int32_t float_bits(float x) {
  int32_t i;
  std::memcpy(&i, &x, sizeof i);
  return i;
}

inline float bits_float(int32_t i) {
  float x;
  std::memcpy(&x, &i, sizeof x);
  return x;
}

inline float exp2_generic(float x) {
  x = std::min(std::max(x, kExp2Low), kExp2High);
  const float rounded = x + kRoundMagic;
  const float f = x - (rounded - kRoundMagic);
  float p = kC6;
  p = p * f + kC5;
  p = p * f + kC4;
  p = p * f + kC3;
  p = p * f + kC2;
  p = p * f + kC1;
  p = p * f + 1.0f;
  const uint32_t scale = (static_cast<uint32_t>(float_bits(rounded)) + (127u - kMagicBits)) << 23;
  return p * bits_float(static_cast<int32_t>(scale));
}

float max_biased_generic(const float* x, const float* bias, int64_t n) {
  float lane[kLanes];
  for (int l = 0; l < kLanes; ++l) lane[l] = -kInf;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l)
      lane[l] = max_keep_nan(lane[l], bias ? x[j + l] + bias[j + l] : x[j + l]);
  for (int l = 0; j < n; ++j, ++l) lane[l] = max_keep_nan(lane[l], bias ? x[j] + bias[j] : x[j]);
  float m = lane[0];
  for (int l = 1; l < kLanes; ++l) m = max_keep_nan(m, lane[l]);
  return m;
}

// One block of 8 (the tail: fewer, the rest padded with -inf, whose exp is 0): the shape of the
// AVX2 build's loop, so that both sum in the same order.
inline void exp_block_generic(float* x, const float* bias, int count, float shift, float* lane) {
  float v[kLanes];
  for (int l = 0; l < kLanes; ++l) v[l] = l < count ? x[l] : -kInf;
  if (bias)
    for (int l = 0; l < count; ++l) v[l] += bias[l];
  for (int l = 0; l < kLanes; ++l) v[l] = exp2_generic(v[l] - shift);
  for (int l = 0; l < kLanes; ++l) lane[l] += v[l];
  for (int l = 0; l < count; ++l) x[l] = v[l];
}

float exp2_sum_generic(float* x, const float* bias, int64_t n, float shift) {
  float lane[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t j = 0; j < n; j += kLanes) {
    const int count = static_cast<int>(std::min<int64_t>(kLanes, n - j));
    exp_block_generic(x + j, bias ? bias + j : nullptr, count, shift, lane);
  }
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

void bfloat16_to_float_generic(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = bits_float(static_cast<int32_t>(src[j]) << 16);
}

inline float float16_value(uint16_t bits) {
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

void float16_to_float_generic(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = float16_value(src[j]);
}

inline uint16_t bfloat16_bits(float x) { return c10::BFloat16(x).x; }

void float_to_bfloat16_generic(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = bfloat16_bits(src[j]);
}

const RowKernels kGeneric = {"generic", max_biased_generic, exp2_sum_generic,
                             bfloat16_to_float_generic, float16_to_float_generic,
                             float_to_bfloat16_generic};

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C build. A row's tail (n not a multiple of 8) goes through the same vector code
// on a copy padded with -inf, so every element sees one sequence of operations.
// ---------------------------------------------------------------------------------------------
#if KCL_HAVE_AVX2_BUILD
KCL_TARGET_AVX2 inline __m256 exp2_avx2(__m256 x) {
  // maxps / minps return their second operand when one is NaN: x second, so a NaN stays NaN.
  x = _mm256_min_ps(_mm256_set1_ps(kExp2High), _mm256_max_ps(_mm256_set1_ps(kExp2Low), x));
  const __m256 magic = _mm256_set1_ps(kRoundMagic);
  const __m256 rounded = _mm256_add_ps(x, magic);
  const __m256 f = _mm256_sub_ps(x, _mm256_sub_ps(rounded, magic));
  __m256 p = _mm256_set1_ps(kC6);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC5));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i scale = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_castps_si256(rounded),
                       _mm256_set1_epi32(static_cast<int32_t>(127u - kMagicBits))),
      23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

KCL_TARGET_AVX2 inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), as the generic build sums its lanes.
KCL_TARGET_AVX2 inline float horizontal_sum(__m256 v) {
  alignas(32) float lane[kLanes];
  _mm256_store_ps(lane, v);
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

KCL_TARGET_AVX2 inline __m256 load_biased(const float* x, const float* bias) {
  const __m256 v = _mm256_loadu_ps(x);
  return bias ? _mm256_add_ps(v, _mm256_loadu_ps(bias)) : v;
}

KCL_TARGET_AVX2 float max_biased_avx2(const float* x, const float* bias, int64_t n) {
  // maxps drops a NaN operand: `unordered` collects the NaN lanes, which the result keeps.
  __m256 m0 = _mm256_set1_ps(-kInf), m1 = m0, unordered = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    const __m256 v0 = load_biased(x + j, bias ? bias + j : nullptr);
    const __m256 v1 = load_biased(x + j + kLanes, bias ? bias + j + kLanes : nullptr);
    m0 = _mm256_max_ps(m0, v0);
    m1 = _mm256_max_ps(m1, v1);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v0, v1, _CMP_UNORD_Q));
  }
  if (j < n) {
    alignas(32) float tail[2 * kLanes];
    for (int l = 0; l < 2 * kLanes; ++l)
      tail[l] = j + l < n ? (bias ? x[j + l] + bias[j + l] : x[j + l]) : -kInf;
    const __m256 v0 = _mm256_load_ps(tail), v1 = _mm256_load_ps(tail + kLanes);
    m0 = _mm256_max_ps(m0, v0);
    m1 = _mm256_max_ps(m1, v1);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v0, v1, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(unordered) != 0) return std::numeric_limits<float>::quiet_NaN();
  return horizontal_max(_mm256_max_ps(m0, m1));
}

KCL_TARGET_AVX2 float exp2_sum_avx2(float* x, const float* bias, int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 sum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const __m256 p = exp2_avx2(_mm256_sub_ps(load_biased(x + j, bias ? bias + j : nullptr), s));
    _mm256_storeu_ps(x + j, p);
    sum = _mm256_add_ps(sum, p);
  }
  if (j < n) {
    alignas(32) float tail[kLanes];
    for (int l = 0; l < kLanes; ++l)
      tail[l] = j + l < n ? (bias ? x[j + l] + bias[j + l] : x[j + l]) : -kInf;
    const __m256 p = exp2_avx2(_mm256_sub_ps(_mm256_load_ps(tail), s));
    _mm256_store_ps(tail, p);
    sum = _mm256_add_ps(sum, p);
    for (int l = 0; j + l < n; ++l) x[j + l] = tail[l];
  }
  return horizontal_sum(sum);
}

KCL_TARGET_AVX2 void bfloat16_to_float_avx2(const uint16_t* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const __m256i wide =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)));
    _mm256_storeu_ps(dst + j, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
  }
  for (; j < n; ++j) dst[j] = bits_float(static_cast<int32_t>(src[j]) << 16);
}

KCL_TARGET_AVX2 void float16_to_float_avx2(const uint16_t* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    _mm256_storeu_ps(dst + j,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  for (; j < n; ++j) dst[j] = float16_value(src[j]);
}

// Round to nearest even: add 0x7FFF plus the lowest kept bit, keep the high half; NaN becomes
// the quiet NaN 0x7FC0 (as c10::BFloat16 does) instead of whatever the addition made of it.
KCL_TARGET_AVX2 void float_to_bfloat16_avx2(const float* src, uint16_t* dst, int64_t n) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const __m256 x = _mm256_loadu_ps(src + j);
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i lowest_kept = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(bits, _mm256_add_epi32(lowest_kept, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded),
                                            _mm256_extracti128_si256(rounded, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), packed);
  }
  for (; j < n; ++j) dst[j] = bfloat16_bits(src[j]);
}

const RowKernels kAvx2 = {"avx2", max_biased_avx2, exp2_sum_avx2, bfloat16_to_float_avx2,
                          float16_to_float_avx2, float_to_bfloat16_avx2};

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#endif  // KCL_HAVE_AVX2_BUILD

const RowKernels& choose() {
  const char* forced = std::getenv("KCL_CPU_ISA");
  const bool generic = forced && std::strcmp(forced, "generic") == 0;
  if (generic) {
    TORCH_WARN("kcl_ext: KCL_CPU_ISA=generic: the CPU kernels use their portable row loops");
    return kGeneric;
  }
  const RowKernels* avx2 = avx2_row_kernels();
  return avx2 ? *avx2 : kGeneric;
}

}  // namespace

const RowKernels& generic_row_kernels() { return kGeneric; }

const RowKernels* avx2_row_kernels() {
#if KCL_HAVE_AVX2_BUILD
  static const bool has = cpu_has_avx2();
  return has ? &kAvx2 : nullptr;
#else
  return nullptr;
#endif
}

const RowKernels& row_kernels() {
  static const RowKernels& chosen = choose();
  return chosen;
}

}  // namespace cpu
}  // namespace kcl
