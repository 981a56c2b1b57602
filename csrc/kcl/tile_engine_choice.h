// Which tile engine the CUDA kernels use (docs/cuda_kernels.md, "Tile engines"), as pure
// functions of D and the device's limits. Free of CUDA and ATen, so that the CPU build's C++ test
// (tests/cpp/test_kpos.cpp) checks the choice on a machine without a GPU; csrc/cuda/kpos_tiles.cuh
// builds its tensor-core engine from these constants (static_asserts keep them in step).
#pragma once

#include <cstddef>
#include <cstdint>

namespace kcl {
namespace tiles {

constexpr int kBlockRows = 64;       // resident rows per block of the tile kernel (4 warps x 16)
constexpr int kMmaTileRows = 64;     // BN of the tensor-core engine: streamed rows per tile
constexpr int64_t kMmaMaxD = 256;    // the widest D the tensor-core engine takes
constexpr int kMmaPad = 8;           // elements of padding per shared-memory row (16 bytes)
constexpr int kMmaElementBytes = 2;  // float16, bfloat16

// Static shared memory of a tile kernel: its per-tile column vectors (`columns` in tile_kernel),
// at most kMaxColumnVectors vectors of one tile's rows in the accumulation dtype (the forward has
// one, the bias; the queue's gradient two, g and lse): 2 * 64 * 4 = 512 bytes for the tensor-core
// engine (and for every SimtEngine: 2 * 64 * 4, 2 * 32 * 8), what ptxas reports for
// tile_kernel<*, QueueGradPolicy> (docs/cuda_resources.md). tile_kernel static_asserts its
// `columns` fit, and tools/cuda_resources.py --check fails if ptxas reports more for a tile kernel.
constexpr int kMaxColumnVectors = 2;
constexpr size_t kTileStaticSmemBytes = kMaxColumnVectors * kMmaTileRows * sizeof(float);

constexpr int64_t mma_padded_d(int64_t d) { return (d + 15) / 16 * 16; }

// Dynamic shared memory of the tensor-core engine: the block's resident rows and two streamed
// tiles (double buffered), each row D padded to 16 plus kMmaPad elements.
constexpr size_t mma_smem_bytes(int64_t d) {
  return static_cast<size_t>(kBlockRows + 2 * kMmaTileRows) *
         static_cast<size_t>(mma_padded_d(d) + kMmaPad) * kMmaElementBytes;
}

// Tensor cores (MmaEngine) for float16 / bfloat16: sm_80+, 1 <= D <= 256, and the block's dynamic
// plus static shared memory within what a block may opt in to (cudaDeviceProp::
// sharedMemPerBlockOptin). At D = 256 the kernel needs 101376 + 512 bytes: more than the
// 101376 bytes (99 KiB) of sm_86 / sm_89, which then take the FMA engine for 240 < D <= 256.
constexpr bool tensor_cores_usable(int64_t d, int compute_major, size_t smem_per_block_optin) {
  return d >= 1 && d <= kMmaMaxD && compute_major >= 8 &&
         mma_smem_bytes(d) + kTileStaticSmemBytes <= smem_per_block_optin;
}

}  // namespace tiles
}  // namespace kcl
