// Tile engines of the kpos_loss CUDA kernels: how a block of 4 warps computes, for its 64
// resident rows (16 per warp) and one tile of streamed rows,
//
//   scores      S[64][BN]  = Resident[64][D] . Tile[BN][D]^T      (fp32, or fp64 for double)
//   accumulate  O[64][DV] += P[64][BN] . Tile[BN][d0 : d0 + DV]      (P computed from S)
//
// The resident rows are queries and the tiles queue entries in the forward (FlashAttention's
// forward with the queue as keys and values); in the backward of the queue they swap roles.
//
// Both engines hold S, P and O in the register layout of the m16n8 accumulator of mma.sync:
// lane (g = lane / 4, t = lane % 4) of warp w owns rows 16 w + g and 16 w + g + 8, columns
// 8 n + 2 t and 8 n + 2 t + 1 of every 8-column block n, as x[n][0..1] (row g) and x[n][2..3]
// (row g + 8). So the code that turns scores into probabilities (kpos_kernel.cu) is written once.
//
// * MmaEngine (float16 / bfloat16, sm_80+, D <= 256): the resident rows and two tiles (double
//   buffered) live in shared memory with their whole D, loaded with 16-byte cp.async; ldmatrix
//   feeds mma.sync.m16n8k16 with fp32 accumulators. P goes from the score registers straight into
//   the A operand of the second product (rounded to the input dtype, as FlashAttention does), and
//   the same tile in shared memory is the B operand of both products.
// * SimtEngine (float32, float64; float16 / bfloat16 where tensor cores cannot be used): FMA in the
//   accumulation dtype over D chunks of KC columns; P goes through shared memory. float32 does not
//   use TF32: 10 mantissa bits would put logits divided by tau = 0.07 about 1e-2 off.
//
// Rows outside [0, rows) and columns outside [0, D) read as zeros, so any shape is valid.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "kcl/tile_engine_choice.h"

namespace kcl {
namespace cuda {

constexpr int kThreads = 128;  // 4 warps, 16 resident rows each
constexpr int kWarps = kThreads / 32;
constexpr int kBlockRows = 16 * kWarps;
constexpr uint32_t kFullMask = 0xFFFFFFFFu;
static_assert(kBlockRows == tiles::kBlockRows, "kcl/tile_engine_choice.h: resident rows per block");

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
__device__ __forceinline__ acc_type_t<scalar_t> to_acc(scalar_t x) {
  return static_cast<acc_type_t<scalar_t>>(x);
}

// A 2-D strided view of a feature tensor. `vec16`: rows may be copied in 16-byte pieces (unit
// column stride, 16-byte aligned base and row stride), which cp.async needs.
template <typename scalar_t>
struct Rows {
  const scalar_t* data;
  int64_t rows, cols, row_stride, col_stride;
  bool vec16;

  __device__ __forceinline__ scalar_t at(int64_t r, int64_t c) const {
    return data[r * row_stride + c * col_stride];
  }
};

// ---------------------------------------------------------------------------------------------
// cp.async (sm_80+); older GPUs copy synchronously, which the same wait/commit calls then order.
// ---------------------------------------------------------------------------------------------
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define KCL_SM80 1
#else
#define KCL_SM80 0
#endif

// Copies src_bytes (0..16) bytes from global memory and zero-fills the rest of the 16 bytes.
__device__ __forceinline__ void copy16_async(void* smem_dst, const void* global_src, int src_bytes) {
#if KCL_SM80
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global_src),
               "r"(src_bytes)
               : "memory");
#else
  auto* d = static_cast<uint16_t*>(smem_dst);
  const auto* s = static_cast<const uint16_t*>(global_src);
  for (int e = 0; e < 8; ++e) d[e] = 2 * e < src_bytes ? s[e] : uint16_t(0);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if KCL_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `kPending` of this thread's most recent groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if KCL_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Rows [row0, row0 + nrows) x columns [col0, col0 + width) of `src` into `dst` (row pitch
// `pitch` elements), zeros outside `src`. width and pitch are multiples of 16 bytes. Strided or
// unaligned sources are copied element by element into the same layout.
template <typename scalar_t>
__device__ __forceinline__ void load_rows(scalar_t* dst, int pitch, const Rows<scalar_t>& src,
                                          int64_t row0, int nrows, int64_t col0, int width) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int pieces_per_row = width / kVec;
  for (int piece = threadIdx.x; piece < nrows * pieces_per_row; piece += kThreads) {
    const int r = piece / pieces_per_row;
    const int c = (piece - r * pieces_per_row) * kVec;
    const int64_t row = row0 + r, col = col0 + c;
    int64_t valid = row < src.rows ? src.cols - col : 0;
    valid = valid < 0 ? 0 : (valid > kVec ? kVec : valid);
    scalar_t* d = dst + r * pitch + c;
    if (src.vec16) {
      const scalar_t* s = valid > 0 ? src.data + row * src.row_stride + col : src.data;
      copy16_async(d, s, static_cast<int>(valid * sizeof(scalar_t)));
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) d[e] = e < valid ? src.at(row, col + e) : scalar_t(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core engine
// ---------------------------------------------------------------------------------------------
// D[16x8] += A[16x16] . B[16x8] with fp32 accumulators; `type` is the PTX name of the inputs.
#if KCL_SM80
#define KCL_MMA_M16N8K16(type, c, a, b0, b1)                                                    \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." type "." type                          \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                   \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
#else
#define KCL_MMA_M16N8K16(type, c, a, b0, b1) __trap()
#endif

template <typename scalar_t>
struct MmaTraits {
  static constexpr bool kHalf = std::is_same_v<scalar_t, at::Half>;
  static_assert(kHalf || std::is_same_v<scalar_t, at::BFloat16>, "tensor cores: float16 or bfloat16");

  // Two floats rounded to the input dtype, the lower column in the low half.
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    uint32_t bits;
    if constexpr (kHalf) {
      const __half2 h = __floats2half2_rn(lo, hi);
      memcpy(&bits, &h, sizeof(bits));
    } else {
      const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
      memcpy(&bits, &h, sizeof(bits));
    }
    return bits;
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    if constexpr (kHalf) {
      KCL_MMA_M16N8K16("f16", c, a, b0, b1);
    } else {
      KCL_MMA_M16N8K16("bf16", c, a, b0, b1);
    }
  }
};

// Four 8 x 8 matrices of 16-bit elements; lanes 8 m .. 8 m + 7 give the row addresses of
// matrix m. Plain: lane (g, t) receives row g, columns 2t, 2t+1 of matrix m in register m;
// transposed: rows 2t, 2t+1 of column g.
#define KCL_LDMATRIX_X4(variant, r, address)                                                   \
  asm volatile("ldmatrix.sync.aligned.m8n8.x4" variant ".shared.b16 {%0,%1,%2,%3}, [%4];\n"   \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                               \
               : "r"(address)                                                                \
               : "memory")

template <bool kTransposed>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
#if KCL_SM80
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row_address));
  if constexpr (kTransposed) {
    KCL_LDMATRIX_X4(".trans", r, a);
  } else {
    KCL_LDMATRIX_X4("", r, a);
  }
#else
  __trap();
#endif
}

template <typename scalar_t>
struct MmaEngine {
  using acc_t = float;
  static constexpr int NT = 8;   // BN = 64 streamed rows per tile
  static constexpr int NV = 16;  // DV = 128 columns of O per block
  static constexpr int BN = 8 * NT, DV = 8 * NV;
  static constexpr int64_t kMaxD = tiles::kMmaMaxD;
  static constexpr int kPad = tiles::kMmaPad;  // 16 bytes: ldmatrix rows of consecutive tile rows hit distinct banks
  // Shared memory as kcl/tile_engine_choice.h computes it for tensor_cores_usable.
  static_assert(BN == tiles::kMmaTileRows && sizeof(scalar_t) == tiles::kMmaElementBytes,
                "kcl/tile_engine_choice.h must describe MmaEngine");

  static size_t smem_bytes(int64_t d) { return tiles::mma_smem_bytes(d); }

  scalar_t* resident;
  scalar_t* tiles;  // two buffers of BN rows
  int dp, pitch;
  int64_t d;

  __device__ MmaEngine(unsigned char* smem, int64_t d_)
      : dp(static_cast<int>((d_ + 15) / 16 * 16)), pitch(dp + kPad), d(d_) {
    resident = reinterpret_cast<scalar_t*>(smem);
    tiles = resident + kBlockRows * pitch;
  }
  __device__ __forceinline__ scalar_t* tile(int64_t index) { return tiles + (index & 1) * BN * pitch; }

  // Starts the copies of the resident rows and the first tile (one cp.async group).
  __device__ void prologue(const Rows<scalar_t>& resident_rows, int64_t row0,
                           const Rows<scalar_t>& streamed, int64_t tile_row0) {
    load_rows(resident, pitch, resident_rows, row0, kBlockRows, 0, dp);
    load_rows(tile(0), pitch, streamed, tile_row0, BN, 0, dp);
    cp_async_commit();
  }
  // Starts the copy of tile `index` (relative to the block's first) into the other buffer; the
  // caller commits one group per tile, even an empty one, so that wait<1> below is exact.
  __device__ void prefetch(const Rows<scalar_t>& streamed, int64_t tile_row0, int64_t index) {
    load_rows(tile(index), pitch, streamed, tile_row0, BN, 0, dp);
  }

  // Begins with a block barrier (after which tile `index` and everything stored to shared
  // memory before it are visible to every thread).
  __device__ void scores(float (&s)[NT][4], const Rows<scalar_t>&, int64_t,
                         const Rows<scalar_t>&, int64_t, int64_t index) {
    cp_async_wait<1>();
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    // A (rows of this warp, row-major): matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15).
    const scalar_t* a_row = resident + (16 * warp + lane % 16) * pitch + 8 * (lane / 16);
    // B (tile rows are the n index, k contiguous): matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
    // (n 8-15, k 0-7), (n 8-15, k 8-15) of each 16-row pair of 8-column blocks.
    const scalar_t* b_row = tile(index) + (lane % 8 + 8 * (lane / 16)) * pitch + 8 * ((lane / 8) % 2);
    for (int k0 = 0; k0 < dp; k0 += 16) {
      uint32_t a[4];
      ldmatrix_x4<false>(a, a_row + k0);
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4<false>(b, b_row + 16 * np * pitch + k0);
        MmaTraits<scalar_t>::mma(s[2 * np], a, b[0], b[1]);
        MmaTraits<scalar_t>::mma(s[2 * np + 1], a, b[2], b[3]);
      }
    }
  }

  // O += P . tile[:, d0 : d0 + DV]; 8-column blocks at or beyond D are skipped.
  __device__ void accumulate(float (&o)[NV][4], const float (&p)[NT][4], const Rows<scalar_t>&,
                             int64_t, int64_t index, int64_t d0) {
    const int lane = threadIdx.x % 32;
    // The accumulator layout of P is the A-operand layout of 16 x 16 blocks of P.
    uint32_t pa[NT / 2][4];
#pragma unroll
    for (int kb = 0; kb < NT / 2; ++kb) {
      pa[kb][0] = MmaTraits<scalar_t>::pack(p[2 * kb][0], p[2 * kb][1]);
      pa[kb][1] = MmaTraits<scalar_t>::pack(p[2 * kb][2], p[2 * kb][3]);
      pa[kb][2] = MmaTraits<scalar_t>::pack(p[2 * kb + 1][0], p[2 * kb + 1][1]);
      pa[kb][3] = MmaTraits<scalar_t>::pack(p[2 * kb + 1][2], p[2 * kb + 1][3]);
    }
    // B (tile rows are the k index, columns of D the n index), transposed: matrices
    // (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
    const scalar_t* v_row = tile(index) + (lane % 8 + 8 * ((lane / 8) % 2)) * pitch + d0 + 8 * (lane / 16);
#pragma unroll
    for (int np = 0; np < NV / 2; ++np) {
      if (d0 + 16 * np < d) {
#pragma unroll
        for (int kb = 0; kb < NT / 2; ++kb) {
          uint32_t b[4];
          ldmatrix_x4<true>(b, v_row + 16 * kb * pitch + 16 * np);
          MmaTraits<scalar_t>::mma(o[2 * np], pa[kb], b[0], b[1]);
          MmaTraits<scalar_t>::mma(o[2 * np + 1], pa[kb], b[2], b[3]);
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// SIMT engine
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct SimtEngine {
  using acc_t = acc_type_t<scalar_t>;
  static constexpr bool kDouble = std::is_same_v<acc_t, double>;
  static constexpr int NT = kDouble ? 4 : 8;  // BN = 32 | 64
  static constexpr int NV = kDouble ? 4 : 8;  // DV = 32 | 64
  static constexpr int BN = 8 * NT, DV = 8 * NV;
  static constexpr int kVec = 16 / sizeof(scalar_t);
  static constexpr int KC = kDouble ? 16 : 32;  // D columns per chunk of the scores
  static constexpr int kChunkPitch = KC + kVec, kValuePitch = DV + kVec, kProbPitch = BN + 1;
  static constexpr int kChunkElems = (kBlockRows + BN) * kChunkPitch;
  static constexpr int kValueElems = BN * kValuePitch;
  static constexpr int kUnionElems = kChunkElems > kValueElems ? kChunkElems : kValueElems;
  static constexpr size_t kUnionBytes = (kUnionElems * sizeof(scalar_t) + 15) / 16 * 16;
  static_assert(kChunkPitch * sizeof(scalar_t) % 16 == 0 && kValuePitch * sizeof(scalar_t) % 16 == 0,
                "cp.async destinations must stay 16-byte aligned");

  static size_t smem_bytes(int64_t) {
    return kUnionBytes + sizeof(acc_t) * kWarps * 16 * kProbPitch;
  }

  scalar_t* chunk_a;  // resident rows x KC     } one region: the chunks while scoring,
  scalar_t* chunk_b;  // tile rows x KC         }   the value tile while accumulating
  scalar_t* values;   // tile rows x DV         }
  acc_t* probs;       // per warp: 16 x BN, P of the warp's rows
  int64_t d;

  __device__ SimtEngine(unsigned char* smem, int64_t d_) : d(d_) {
    chunk_a = reinterpret_cast<scalar_t*>(smem);
    chunk_b = chunk_a + kBlockRows * kChunkPitch;
    values = chunk_a;
    probs = reinterpret_cast<acc_t*>(smem + kUnionBytes);
  }

  __device__ void prologue(const Rows<scalar_t>&, int64_t, const Rows<scalar_t>&, int64_t) {}
  __device__ void prefetch(const Rows<scalar_t>&, int64_t, int64_t) {}

  __device__ void scores(acc_t (&s)[NT][4], const Rows<scalar_t>& resident, int64_t row0,
                         const Rows<scalar_t>& streamed, int64_t tile_row0, int64_t) {
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = acc_t(0);
    const scalar_t* a0 = chunk_a + (16 * warp + g) * kChunkPitch;
    const scalar_t* a1 = a0 + 8 * kChunkPitch;
    const scalar_t* b = chunk_b + 2 * t * kChunkPitch;
    for (int64_t k0 = 0; k0 < d; k0 += KC) {
      load_rows(chunk_a, kChunkPitch, resident, row0, kBlockRows, k0, KC);
      load_rows(chunk_b, kChunkPitch, streamed, tile_row0, BN, k0, KC);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
#pragma unroll 4
      for (int k = 0; k < KC; ++k) {
        const acc_t x0 = to_acc(a0[k]), x1 = to_acc(a1[k]);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const acc_t y = to_acc(b[(8 * n + e) * kChunkPitch + k]);
            s[n][e] += x0 * y;
            s[n][2 + e] += x1 * y;
          }
        }
      }
      __syncthreads();
    }
  }

  __device__ void accumulate(acc_t (&o)[NV][4], const acc_t (&p)[NT][4],
                             const Rows<scalar_t>& streamed, int64_t tile_row0, int64_t,
                             int64_t d0) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    acc_t* p0 = probs + (warp * 16 + g) * kProbPitch;
    acc_t* p1 = p0 + 8 * kProbPitch;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        p0[8 * n + 2 * t + e] = p[n][e];
        p1[8 * n + 2 * t + e] = p[n][2 + e];
      }
    }
    // The chunks are dead: scores() ended with a barrier.
    load_rows(values, kValuePitch, streamed, tile_row0, BN, d0, DV);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    const scalar_t* v = values + 2 * t;
#pragma unroll 4
    for (int j = 0; j < BN; ++j) {
      const acc_t x0 = p0[j], x1 = p1[j];
#pragma unroll
      for (int n = 0; n < NV; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const acc_t y = to_acc(v[j * kValuePitch + 8 * n + e]);
          o[n][e] += x0 * y;
          o[n][2 + e] += x1 * y;
        }
      }
    }
  }
};

}  // namespace cuda
}  // namespace kcl
