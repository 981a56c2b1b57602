// Tile engines of the kpos_loss CUDA kernels: how a thread block computes one
// tile of logits and the two gradient products.
//
//   logits_tile   S[BM][BN]  = Qblk[BM][D] . QueueTile[BN][D]^T  (raw dot products, fp32/fp64)
//   mma_dq        C[BM][DV] += G[BM][BN] . V[BN][DV]           (V: queue rows, a D slice)
//   mma_dqueue    C[BN][DV] += G[BM][BN]^T . V[BM][DV]         (V: query rows, a D slice)
//
// Two engines share that interface (and say how many threads a block has, kThreads), so the
// kernels in kpos_kernel.cu are written once:
//
// * WmmaEngine (float16 / bfloat16 on sm_80+): tensor-core m16n16k16 products through
//   nvcuda::wmma with fp32 accumulators. The gradient tile G is rounded to the input
//   dtype before it is multiplied (as flash-attention does with its probabilities); the
//   sums stay in fp32.
// * SimtEngine (float32, float64, and float16 / bfloat16 on older GPUs): register-tiled
//   FMA in the accumulation dtype. float32 deliberately does not use TF32 tensor cores:
//   TF32 keeps 10 mantissa bits, and logits divided by tau = 0.07 would then be off by
//   ~1e-2, far outside float32's tolerance against the reference (and against
//   torch.matmul, which defaults to allow_tf32=False). float64 uses plain FMA, for gradcheck.
//
// Every tile is padded with zeros outside [0, N) x [0, Q) x [0, D), so any shape and any
// strides are valid; callers mask padded rows and columns out of the results.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

namespace kcl {
namespace cuda {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A 2-D strided view of a feature tensor (query, key or queue).
template <typename scalar_t>
struct Matrix {
  const scalar_t* data;
  int64_t rows, cols;
  int64_t row_stride, col_stride;

  __device__ __forceinline__ bool contains(int64_t r, int64_t c) const {
    return r < rows && c < cols;
  }
  __device__ __forceinline__ scalar_t at(int64_t r, int64_t c) const {
    return data[r * row_stride + c * col_stride];
  }
};

// ---------------------------------------------------------------------------------------------
// SIMT engine: register tiles in the accumulation dtype. Thread t owns rows ty + 8 a and
// columns tx + 16 b of each output tile (ty = t / 16, tx = t % 16); the odd row pitch of the
// shared tiles keeps the column reads free of bank conflicts.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct SimtEngine {
  static constexpr int kThreads = 128;  // a 8 x 16 grid of threads
  using acc_t = acc_type_t<scalar_t>;
  using smem_t = acc_t;  // element type of the shared tiles
  static constexpr bool kDouble = std::is_same_v<acc_t, double>;
  static constexpr int BM = kDouble ? 32 : 64;  // query rows per tile
  static constexpr int BN = 64;                 // queue entries per tile
  static constexpr int KC = kDouble ? 8 : 16;   // D chunk of the logits product
  static constexpr int DV = kDouble ? 32 : 64;  // D slice of a gradient tile
  static constexpr int VR = BM > BN ? BM : BN;  // rows of the V tile

  struct Smem {
    union {
      struct {
        acc_t a[BM][KC + 1];
        acc_t b[BN][KC + 1];
      } chunk;
      acc_t v[VR][DV + 1];
    } u;
    acc_t s[BM][BN + 1];  // logits, then G in place
  };

  // Output accumulators of the two gradient products.
  struct AccDq {
    acc_t c[BM / 8][DV / 16];
  };
  struct AccDqueue {
    acc_t c[BN / 8][DV / 16];
  };

  static __device__ __forceinline__ smem_t to_smem(scalar_t x) { return static_cast<acc_t>(x); }
  static __device__ __forceinline__ smem_t smem_zero() { return acc_t(0); }

  static __device__ __forceinline__ acc_t logit(const Smem& sm, int r, int c) { return sm.s[r][c]; }
  static __device__ __forceinline__ void store_g(Smem& sm, int r, int c, acc_t g) { sm.s[r][c] = g; }
  static __device__ __forceinline__ smem_t* v_row(Smem& sm, int r) { return sm.u.v[r]; }

  // sm.s = Qblk . QueueTile^T over the full D, then __syncthreads().
  static __device__ void logits_tile(Smem& sm, const Matrix<scalar_t>& query, int64_t row0,
                                     const Matrix<scalar_t>& queue, int64_t col0) {
    const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
    acc_t acc[BM / 8][BN / 16];
#pragma unroll
    for (int a = 0; a < BM / 8; ++a)
#pragma unroll
      for (int b = 0; b < BN / 16; ++b) acc[a][b] = acc_t(0);
    const int64_t d = query.cols;
    for (int64_t d0 = 0; d0 < d; d0 += KC) {
#pragma unroll 4
      for (int e = tid; e < BM * KC; e += kThreads) {
        const int r = e / KC, kk = e % KC;
        sm.u.chunk.a[r][kk] = query.contains(row0 + r, d0 + kk)
                                  ? to_smem(query.at(row0 + r, d0 + kk)) : acc_t(0);
      }
#pragma unroll 4
      for (int e = tid; e < BN * KC; e += kThreads) {
        const int r = e / KC, kk = e % KC;
        sm.u.chunk.b[r][kk] = queue.contains(col0 + r, d0 + kk)
                                  ? to_smem(queue.at(col0 + r, d0 + kk)) : acc_t(0);
      }
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < KC; ++kk) {
        acc_t bv[BN / 16];
#pragma unroll
        for (int b = 0; b < BN / 16; ++b) bv[b] = sm.u.chunk.b[tx + 16 * b][kk];
#pragma unroll
        for (int a = 0; a < BM / 8; ++a) {
          const acc_t av = sm.u.chunk.a[ty + 8 * a][kk];
#pragma unroll
          for (int b = 0; b < BN / 16; ++b) acc[a][b] += av * bv[b];
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int a = 0; a < BM / 8; ++a)
#pragma unroll
      for (int b = 0; b < BN / 16; ++b) sm.s[ty + 8 * a][tx + 16 * b] = acc[a][b];
    __syncthreads();
  }

  static __device__ __forceinline__ void zero(AccDq& acc) {
#pragma unroll
    for (int a = 0; a < BM / 8; ++a)
#pragma unroll
      for (int b = 0; b < DV / 16; ++b) acc.c[a][b] = acc_t(0);
  }
  static __device__ __forceinline__ void zero(AccDqueue& acc) {
#pragma unroll
    for (int a = 0; a < BN / 8; ++a)
#pragma unroll
      for (int b = 0; b < DV / 16; ++b) acc.c[a][b] = acc_t(0);
  }

  // acc += G[BM][BN] . v[BN][DV]
  static __device__ void mma_dq(AccDq& acc, const Smem& sm) {
    const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
#pragma unroll 4
    for (int kk = 0; kk < BN; ++kk) {
      acc_t vv[DV / 16];
#pragma unroll
      for (int b = 0; b < DV / 16; ++b) vv[b] = sm.u.v[kk][tx + 16 * b];
#pragma unroll
      for (int a = 0; a < BM / 8; ++a) {
        const acc_t g = sm.s[ty + 8 * a][kk];
#pragma unroll
        for (int b = 0; b < DV / 16; ++b) acc.c[a][b] += g * vv[b];
      }
    }
  }

  // acc += G[BM][BN]^T . v[BM][DV]
  static __device__ void mma_dqueue(AccDqueue& acc, const Smem& sm) {
    const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
#pragma unroll 4
    for (int kk = 0; kk < BM; ++kk) {
      acc_t vv[DV / 16];
#pragma unroll
      for (int b = 0; b < DV / 16; ++b) vv[b] = sm.u.v[kk][tx + 16 * b];
#pragma unroll
      for (int a = 0; a < BN / 8; ++a) {
        const acc_t g = sm.s[kk][ty + 8 * a];
#pragma unroll
        for (int b = 0; b < DV / 16; ++b) acc.c[a][b] += g * vv[b];
      }
    }
  }

  // fn(row, col, value) for every element of the tile this thread holds.
  template <typename Acc, typename Fn>
  static __device__ void for_each(const Acc& acc, Smem&, Fn fn) {
    constexpr int kRowGroups = std::extent_v<decltype(Acc::c), 0>;
    const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
#pragma unroll
    for (int a = 0; a < kRowGroups; ++a)
#pragma unroll
      for (int b = 0; b < DV / 16; ++b) fn(ty + 8 * a, tx + 16 * b, acc.c[a][b]);
  }
};

// ---------------------------------------------------------------------------------------------
// Tensor-core engine (float16 / bfloat16, sm_80+), 256 threads: each of the 8 warps owns two
// 16 x 16 blocks of every 64 x 64 output tile, so a thread holds 16 fp32 accumulators of the
// logits tile and 16 of a gradient tile (with 4 warps it would be 32 + 32, and ptxas spilled).
// Row pitches are padded by 8 halves (16 bytes) so that wmma fragment pointers stay 32-byte
// aligned and rows do not collide on the same banks.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct NativeHalf;
template <>
struct NativeHalf<at::Half> {
  using type = __half;
  static __device__ __forceinline__ type from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ type from_scalar(at::Half x) { return __ushort_as_half(x.x); }
};
template <>
struct NativeHalf<at::BFloat16> {
  using type = __nv_bfloat16;
  static __device__ __forceinline__ type from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ type from_scalar(at::BFloat16 x) {
    return __ushort_as_bfloat16(x.x);
  }
};

template <typename scalar_t>
struct WmmaEngine {
  static constexpr int kThreads = 256;  // 8 warps
  static constexpr int kWarps = kThreads / 32;
  using acc_t = float;
  using smem_t = typename NativeHalf<scalar_t>::type;
  static constexpr int BM = 64, BN = 64, KC = 32, DV = 64, VR = 64;
  static constexpr int kPad = 8;     // halves of padding per row
  static constexpr int kAccPad = 4;  // floats of padding per row
  static constexpr int kTilesPerWarp = 2;  // 16 x 16 output blocks per warp
  static_assert(BM == 64 && BN == 64 && DV == 64 && kWarps == 8,
                "warp layout: 4 row blocks x 2 column halves of a 64 x 64 tile");

  struct Smem {
    union {
      struct {
        smem_t a[BM][KC + kPad];
        smem_t b[BN][KC + kPad];
      } chunk;
      smem_t v[VR][DV + kPad];
    } u;
    float s[BM][BN + kAccPad];  // logits; staging of the gradient accumulators
    smem_t g[BM][BN + kPad];    // G rounded to the input dtype, the A operand of the products
  };

  using FragAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  struct AccDq {
    FragAcc c[kTilesPerWarp];
  };
  using AccDqueue = AccDq;

  // Warp w owns rows 16 (w % 4) .. +16 and columns 32 (w / 4) .. +32 of every 64 x 64 tile.
  static __device__ __forceinline__ int warp_row() { return 16 * ((threadIdx.x / 32) % 4); }
  static __device__ __forceinline__ int warp_col(int t) { return 32 * ((threadIdx.x / 32) / 4) + 16 * t; }

  // The same 16 bits, no round trip through float.
  static __device__ __forceinline__ smem_t to_smem(scalar_t x) {
    return NativeHalf<scalar_t>::from_scalar(x);
  }
  static __device__ __forceinline__ smem_t smem_zero() { return NativeHalf<scalar_t>::from_float(0.0f); }
  static __device__ __forceinline__ acc_t logit(const Smem& sm, int r, int c) { return sm.s[r][c]; }
  static __device__ __forceinline__ void store_g(Smem& sm, int r, int c, acc_t g) {
    sm.g[r][c] = NativeHalf<scalar_t>::from_float(g);
  }
  static __device__ __forceinline__ smem_t* v_row(Smem& sm, int r) { return sm.u.v[r]; }

  static __device__ __forceinline__ void zero(AccDq& acc) {
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t) nvcuda::wmma::fill_fragment(acc.c[t], 0.0f);
  }

  static __device__ void logits_tile(Smem& sm, const Matrix<scalar_t>& query, int64_t row0,
                                     const Matrix<scalar_t>& queue, int64_t col0) {
    using namespace nvcuda;
    const int tid = threadIdx.x;
    AccDq acc;
    zero(acc);
    const int64_t d = query.cols;
    const smem_t zero_h = smem_zero();
    for (int64_t d0 = 0; d0 < d; d0 += KC) {
#pragma unroll 4
      for (int e = tid; e < BM * KC; e += kThreads) {
        const int r = e / KC, kk = e % KC;
        sm.u.chunk.a[r][kk] = query.contains(row0 + r, d0 + kk)
                                  ? to_smem(query.at(row0 + r, d0 + kk)) : zero_h;
      }
#pragma unroll 4
      for (int e = tid; e < BN * KC; e += kThreads) {
        const int r = e / KC, kk = e % KC;
        sm.u.chunk.b[r][kk] = queue.contains(col0 + r, d0 + kk)
                                  ? to_smem(queue.at(col0 + r, d0 + kk)) : zero_h;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < KC; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, smem_t, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, &sm.u.chunk.a[warp_row()][kk], KC + kPad);
#pragma unroll
        for (int t = 0; t < kTilesPerWarp; ++t) {
          // QueueTile^T as a column-major K x N operand: element (k, n) = b[n][k].
          wmma::fragment<wmma::matrix_b, 16, 16, 16, smem_t, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, &sm.u.chunk.b[warp_col(t)][kk], KC + kPad);
          wmma::mma_sync(acc.c[t], fa, fb, acc.c[t]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t)
      wmma::store_matrix_sync(&sm.s[warp_row()][warp_col(t)], acc.c[t], BN + kAccPad,
                              wmma::mem_row_major);
    __syncthreads();
  }

  // acc += G[BM][BN] . v[BN][DV]
  static __device__ void mma_dq(AccDq& acc, const Smem& sm) {
    using namespace nvcuda;
#pragma unroll
    for (int kk = 0; kk < BN; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, smem_t, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, &sm.g[warp_row()][kk], BN + kPad);
#pragma unroll
      for (int t = 0; t < kTilesPerWarp; ++t) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, smem_t, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, &sm.u.v[kk][warp_col(t)], DV + kPad);
        wmma::mma_sync(acc.c[t], fa, fb, acc.c[t]);
      }
    }
  }

  // acc += G[BM][BN]^T . v[BM][DV]: G^T is G read as a column-major operand.
  static __device__ void mma_dqueue(AccDqueue& acc, const Smem& sm) {
    using namespace nvcuda;
#pragma unroll
    for (int kk = 0; kk < BM; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, smem_t, wmma::col_major> fa;
      wmma::load_matrix_sync(fa, &sm.g[kk][warp_row()], BN + kPad);
#pragma unroll
      for (int t = 0; t < kTilesPerWarp; ++t) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, smem_t, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, &sm.u.v[kk][warp_col(t)], DV + kPad);
        wmma::mma_sync(acc.c[t], fa, fb, acc.c[t]);
      }
    }
  }

  // Fragment element order is opaque: stage the 64 x 64 tile through sm.s.
  template <typename Fn>
  static __device__ void for_each(const AccDq& acc, Smem& sm, Fn fn) {
    using namespace nvcuda;
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t)
      wmma::store_matrix_sync(&sm.s[warp_row()][warp_col(t)], acc.c[t], BN + kAccPad,
                              wmma::mem_row_major);
    __syncthreads();
    for (int e = threadIdx.x; e < 64 * DV; e += kThreads) fn(e / DV, e % DV, sm.s[e / DV][e % DV]);
  }
};

}  // namespace cuda
}  // namespace kcl
