// The tile scheduler every persistent grouped-GEMM kernel shares (nvcc): device code, and the
// host-side cache of each kernel's grid size.
//
// Expert e's rows form ceil(rows_e / BM) row tiles. Each CTA reads the E + 1 offsets, builds the
// prefix sum of those counts in shared memory (one warp, shuffles), and maps a linear tile number
// to (expert, row tile, column tile) by binary search. The host never learns the counts: no sync,
// one launch, capturable in a CUDA graph, and an empty expert simply owns no tiles.
//
// Within an expert, consecutive tile numbers walk kGroupM row tiles down a column of tiles before
// moving right (a grouped order), so CTAs running at the same time share W's and A's tiles
// through L2 instead of each fetching its own from HBM.
#pragma once

#include <cstdint>

#include "tilemoe/grouped_gemm.cuh"

namespace tilemoe {

constexpr int kGroupM = 8;  // row tiles per L2 group
// Bytes of shared memory the prefix sum needs: kGroupedGemmMaxExperts + 1 ints.
constexpr int kTilePrefixBytes = (kGroupedGemmMaxExperts + 1) * static_cast<int>(sizeof(int));

// Where a linear tile number lands.
struct Tile {
  int expert;
  int64_t row_start, row_end;  // the tile's first row and its expert's end (exclusive)
  int col_start;
};

// tile_start[e] = row tiles of experts 0..e-1 (so tile_start[E] = all row tiles); one warp.
template <int kBM>
__device__ void build_tile_prefix(const int32_t* __restrict__ offsets, int num_experts, int* tile_start) {
  const int lane = threadIdx.x % 32;
  int carry = 0;
  for (int base = 0; base < num_experts; base += 32) {
    const int e = base + lane;
    int tiles = 0;
    if (e < num_experts) {
      const int rows = offsets[e + 1] - offsets[e];
      tiles = rows / kBM + (rows % kBM != 0);  // not (rows + kBM - 1) / kBM: that overflows near 2^31
    }
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {  // inclusive scan across the warp
      const int up = __shfl_up_sync(0xffffffffu, tiles, d);
      if (lane >= d) tiles += up;
    }
    if (e < num_experts) tile_start[e + 1] = carry + tiles;
    carry += __shfl_sync(0xffffffffu, tiles, 31);
  }
  if (lane == 0) tile_start[0] = 0;
}

template <int kBM, int kBN>
__device__ __forceinline__ Tile locate(int64_t tile, int col_tiles, const int* tile_start, int num_experts,
                                       const int32_t* __restrict__ offsets, int64_t m_total) {
  // The expert: the first e whose row tiles end after this tile's row tile (empty experts own
  // no tiles, so they are skipped by the strict comparison).
  const int row_tile = static_cast<int>(tile / col_tiles);
  int lo = 0, hi = num_experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (tile_start[mid + 1] > row_tile) hi = mid; else lo = mid + 1;
  }
  const int e = lo;
  // Grouped order inside the expert: kGroupM row tiles x every column tile, column-major.
  const int64_t local = tile - static_cast<int64_t>(tile_start[e]) * col_tiles;
  const int row_tiles = tile_start[e + 1] - tile_start[e];
  const int64_t group_width = static_cast<int64_t>(kGroupM) * col_tiles;
  const int first_row = static_cast<int>(local / group_width) * kGroupM;
  const int group_rows = min(row_tiles - first_row, kGroupM);
  const int in_group = static_cast<int>(local % group_width);
  Tile t;
  t.expert = e;
  t.row_start = offsets[e] + static_cast<int64_t>(first_row + in_group % group_rows) * kBM;
  t.row_end = min(static_cast<int64_t>(offsets[e + 1]), m_total);  // never past a's rows, whatever the offsets say
  t.col_start = (in_group / group_rows) * kBN;
  return t;
}

// A persistent kernel's grid is sized once per device: attribute calls and occupancy queries
// cost microseconds, and a layer launches twice. find(device, &ctas) runs on the first call for
// a device; its result is kept in `cache` (one array per kernel configuration).
constexpr int kMaxCachedDevices = 64;

template <class Find>
cudaError_t cached_per_device(int (&cache)[kMaxCachedDevices], int* ctas, Find find) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < kMaxCachedDevices && cache[device] > 0) {
    *ctas = cache[device];
    return cudaSuccess;
  }
  err = find(device, ctas);
  if (err == cudaSuccess && device < kMaxCachedDevices) cache[device] = *ctas;
  return err;
}

// The SMs of the device for an sm_90a kernel of one CTA per SM (with its dynamic shared memory
// raised to smem bytes), cached per device; cudaErrorNotSupported when this GPU cannot run it:
// not compute capability 9.0, or this library was built without the sm_90a target.
template <class Kernel>
cudaError_t sm90a_persistent_ctas(int (&cache)[kMaxCachedDevices], Kernel* kernel, int smem, int* ctas) {
  return cached_per_device(cache, ctas, [kernel, smem](int device, int* found) {
    int major = 0, minor = 0, sms = 0;
    cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    if (major != 9 || minor != 0) return cudaErrorNotSupported;
    cudaFuncAttributes attributes;
    err = cudaFuncGetAttributes(&attributes, kernel);
    if (err == cudaErrorInvalidDeviceFunction || err == cudaErrorNoKernelImageForDevice) {
      (void)cudaGetLastError();  // not built for this GPU: clear the error, report "not supported"
      return cudaErrorNotSupported;
    }
    if (err != cudaSuccess) return err;
    if (attributes.binaryVersion != 90) return cudaErrorNotSupported;  // e.g. sm_80 code JIT-compiled
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    *found = sms;  // about 200 KB of shared memory: one CTA per SM
    return cudaSuccess;
  });
}

}  // namespace tilemoe
