// One persistent tensor-core kernel for every expert's GEMM.
//
// The five ideas, in the order the code uses them:
//
// 1. A device-side tile scheduler. Expert e's rows form ceil(rows_e / BM) row tiles; each CTA
//    reads the E + 1 offsets, builds the prefix sum of those counts in shared memory (one warp,
//    shuffles), and maps a linear tile number to (expert, row tile, column tile) by binary search.
//    The host never learns the counts: no sync, one launch, capturable in a CUDA graph, and an
//    empty expert simply owns no tiles.
// 2. Persistence. The grid is as large as the GPU holds at once (SMs x CTAs per SM) and each CTA
//    loops over tiles blockIdx.x, blockIdx.x + gridDim.x, ...: a hot expert's many tiles spread
//    over every SM while a cold expert's one tile costs one iteration.
// 3. Tensor cores with a cp.async pipeline. Tiles of A and W stream from global to shared memory
//    with cp.async (no registers in the way), kStages - 1 k-steps ahead of the math; ldmatrix
//    feeds mma.sync m16n8k16 (bf16 in, fp32 accumulate). Rows of 64 bf16 (128 bytes) are stored
//    with their 16-byte chunks XOR-swizzled by row, so neither the cp.async writes nor the
//    ldmatrix reads of 8 rows hit one shared-memory bank twice.
// 4. An L2-friendly order. Within an expert, consecutive tiles walk kGroupM row tiles down a
//    column of tiles before moving right, so CTAs running at the same time share W's and A's
//    tiles through L2 instead of each fetching its own from HBM.
//
// 5. A staged epilogue. The accumulators go to shared memory first, then out in 16-byte row
//    pieces: whole 32-byte sectors per store instead of the fragments' scattered 4-byte pairs.
//
// Ragged rows: a tile's loads of rows past its expert's end are zero-filled (cp.async with a
// source size of 0), so it never computes with the next expert's rows, and its stores are
// predicated on the row, so it never writes them.
#include "tilemoe/grouped_gemm.cuh"
#include "tilemoe/sm80_instructions.cuh"
#include "tilemoe/swizzle.cuh"  // swizzled<cols>(row, col): the pipeline tiles and the epilogue tile
#include "tilemoe/tile_scheduler.cuh"

#include <algorithm>

namespace tilemoe {
namespace {

using namespace sm80;  // cp_async_16, ldmatrix_x4, mma_bf16, ...

constexpr int kBK = 64;      // k-step: 64 bf16 = one 128-byte row of a tile per k-step
constexpr int kChunks = kBK / 8;  // 16-byte chunks per tile row

// A CTA tile of kBM x kBN outputs, computed by kWarpsM x kWarpsN warps, kStages k-steps in flight.
template <int BM, int BN, int WarpsM, int WarpsN, int Stages, int MinBlocks>
struct Config {
  static constexpr int kBM = BM, kBN = BN, kStages = Stages, kMinBlocks = MinBlocks;
  static constexpr int kWarpsN = WarpsN, kThreads = 32 * WarpsM * WarpsN;
  static constexpr int kWM = BM / WarpsM, kWN = BN / WarpsN;  // each warp's piece of the tile
  static constexpr int kMmaM = kWM / 16, kMmaN = kWN / 8;      // m16n8k16 instructions per warp per k16
  // The pipeline's tiles, and the epilogue's C tile staged in the same bytes afterwards.
  static constexpr int kSmemTiles =
      (Stages * (BM + BN) * kBK > BM * BN ? Stages * (BM + BN) * kBK : BM * BN) * static_cast<int>(sizeof(__nv_bfloat16));
  static constexpr int kSmemBytes = kSmemTiles + kTilePrefixBytes;
  static_assert(BM * kChunks % kThreads == 0 && BN * kChunks % kThreads == 0, "loads split evenly");
  static_assert(kMmaN % 2 == 0, "B fragments are loaded two n8 tiles at a time");
};


template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    grouped_gemm_tiled_kernel(const __nv_bfloat16* __restrict__ a, const __nv_bfloat16* __restrict__ w,
                              const int32_t* __restrict__ offsets, __nv_bfloat16* __restrict__ c,
                              int64_t m_total, int num_experts, int n, int k) {
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kStages = Cfg::kStages, kThreads = Cfg::kThreads;
  constexpr int kWarpsN = Cfg::kWarpsN, kWM = Cfg::kWM, kWN = Cfg::kWN, kMmaM = Cfg::kMmaM, kMmaN = Cfg::kMmaN;
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* a_tiles = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* w_tiles = a_tiles + kStages * kBM * kBK;
  int* tile_start = reinterpret_cast<int*>(smem + Cfg::kSmemTiles);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  if (warp == 0) build_tile_prefix<kBM>(offsets, num_experts, tile_start);
  __syncthreads();

  const int col_tiles = (n + kBN - 1) / kBN;
  const int64_t num_tiles = static_cast<int64_t>(tile_start[num_experts]) * col_tiles;
  const int k_steps = (k + kBK - 1) / kBK;

  // This thread's share of every tile load: one 16-byte chunk column of rows ld_row, ld_row + 32, ...
  // Its shared-memory offset is the same in every pass (32 rows keep row % 8, so the swizzle).
  constexpr int kRowsPerPass = kThreads / kChunks;
  constexpr int kRowBytes = kBK * static_cast<int>(sizeof(__nv_bfloat16));
  const int ld_row = tid / kChunks, ld_chunk = tid % kChunks;
  const uint32_t ld_smem = swizzled<kBK>(ld_row, ld_chunk * 8) * sizeof(__nv_bfloat16);
  const uint32_t a_smem = shared_address(a_tiles) + ld_smem, w_smem = shared_address(w_tiles) + ld_smem;
  const int64_t pass_stride = static_cast<int64_t>(kRowsPerPass) * k;  // elements between passes

  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const Tile t = locate<kBM, kBN>(tile, col_tiles, tile_start, num_experts, offsets, m_total);

    // Addresses and row checks once per tile; a k-step only adds its column offset.
    const __nv_bfloat16* a_src = a + (t.row_start + ld_row) * k + ld_chunk * 8;
    const __nv_bfloat16* w_src =
        w + (static_cast<int64_t>(t.expert) * n + t.col_start + ld_row) * k + ld_chunk * 8;
    uint32_t a_rows_ok = 0, w_rows_ok = 0;  // bit i: pass i's row is inside the expert / inside N
#pragma unroll
    for (int i = 0; i < kBM / kRowsPerPass; ++i) {
      a_rows_ok |= static_cast<uint32_t>(t.row_start + ld_row + i * kRowsPerPass < t.row_end) << i;
    }
#pragma unroll
    for (int i = 0; i < kBN / kRowsPerPass; ++i) {
      w_rows_ok |= static_cast<uint32_t>(t.col_start + ld_row + i * kRowsPerPass < n) << i;
    }

    // Issue the cp.asyncs of one k-step into one stage; rows past the expert's end or N, and
    // columns past K, are zero-filled (nothing is read for them).
    auto load_stage = [&](int stage, int step) {
      const int k0 = step * kBK;
      const bool k_ok = ld_chunk * 8 + k0 < k;
      const uint32_t sa = a_smem + stage * kBM * kRowBytes, sw = w_smem + stage * kBN * kRowBytes;
#pragma unroll
      for (int i = 0; i < kBM / kRowsPerPass; ++i) {
        const bool ok = k_ok && ((a_rows_ok >> i) & 1u);
        cp_async_16(sa + i * kRowsPerPass * kRowBytes, ok ? a_src + i * pass_stride + k0 : a, ok);
      }
#pragma unroll
      for (int i = 0; i < kBN / kRowsPerPass; ++i) {
        const bool ok = k_ok && ((w_rows_ok >> i) & 1u);
        cp_async_16(sw + i * kRowsPerPass * kRowBytes, ok ? w_src + i * pass_stride + k0 : w, ok);
      }
    };

    float acc[kMmaM][kMmaN][4] = {};

    // Prologue: the first kStages - 1 k-steps in flight (a commit per stage, even an empty one,
    // keeps the group count that cp_async_wait relies on).
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_steps) load_stage(s, s);
      cp_async_commit();
    }

    for (int step = 0; step < k_steps; ++step) {
      if constexpr (kStages == 1) {
        // One buffer: load, wait, compute. Nothing overlaps (lesson 3's first rung). Everyone
        // must be done with the previous step's math before its only buffer is overwritten.
        __syncthreads();
        load_stage(0, step);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
      } else {
        cp_async_wait<kStages - 2>();  // this step's stage has landed (for this thread's copies) ...
        __syncthreads();               // ... and for everyone's; everyone is done with step - 1's stage
        const int next = step + kStages - 1;
        if (next < k_steps) load_stage(next % kStages, next);  // refill the stage step - 1 used
        cp_async_commit();
      }

      const __nv_bfloat16* sa = a_tiles + (step % kStages) * kBM * kBK;
      const __nv_bfloat16* sw = w_tiles + (step % kStages) * kBN * kBK;
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk) {
        uint32_t af[kMmaM][4], bf[kMmaN][2];
#pragma unroll
        for (int mi = 0; mi < kMmaM; ++mi) {
          // lanes 0-15: rows 0-15 at k 0-7; lanes 16-31: rows 0-15 at k 8-15 -> a0..a3 of the mma
          const int row = warp_m * kWM + mi * 16 + lane % 16;
          ldmatrix_x4(af[mi], shared_address(sa + swizzled<kBK>(row, (kk * 2 + lane / 16) * 8)));
        }
#pragma unroll
        for (int nj = 0; nj < kMmaN / 2; ++nj) {
          // W is [n][k] in shared memory: rows are B's columns. Matrices: (n 0-7, k 0-7),
          // (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) = b0, b1 of two n8 tiles.
          const int row = warp_n * kWN + nj * 16 + lane % 8 + (lane / 16) * 8;
          uint32_t r[4];
          ldmatrix_x4(r, shared_address(sw + swizzled<kBK>(row, (kk * 2 + (lane / 8) % 2) * 8)));
          bf[2 * nj][0] = r[0];
          bf[2 * nj][1] = r[1];
          bf[2 * nj + 1][0] = r[2];
          bf[2 * nj + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < kMmaM; ++mi)
#pragma unroll
          for (int ni = 0; ni < kMmaN; ++ni) mma_bf16(acc[mi][ni], af[mi], bf[ni]);
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done reading shared memory before the next tile's prologue

    // Epilogue in two moves, so that global stores fill whole 32-byte sectors. First each thread's
    // fragments go to shared memory (the pipeline's buffers are idle now): (row, col..col+1) and
    // (row + 8, col..col+1) of every mma tile, into a [kBM][kBN] tile whose 16-byte chunks are
    // XOR-swizzled by row, so the 8 rows one store instruction touches hit 8 different banks.
    __nv_bfloat16* staged = a_tiles;
#pragma unroll
    for (int mi = 0; mi < kMmaM; ++mi) {
#pragma unroll
      for (int ni = 0; ni < kMmaN; ++ni) {
        const int row = warp_m * kWM + mi * 16 + lane / 4;
        const int col = warp_n * kWN + ni * 8 + (lane % 4) * 2;
        *reinterpret_cast<__nv_bfloat162*>(staged + swizzled<kBN>(row, col)) =
            __floats2bfloat162_rn(acc[mi][ni][0], acc[mi][ni][1]);
        *reinterpret_cast<__nv_bfloat162*>(staged + swizzled<kBN>(row + 8, col)) =
            __floats2bfloat162_rn(acc[mi][ni][2], acc[mi][ni][3]);
      }
    }
    __syncthreads();
    // Then whole 16-byte pieces of rows: a warp stores 512 contiguous bytes of one row. N is a
    // multiple of 8, so a piece is either wholly inside N or wholly out.
#pragma unroll 4
    for (int idx = tid; idx < kBM * kBN / 8; idx += kThreads) {
      const int row = idx / (kBN / 8), col = idx % (kBN / 8) * 8;
      const int64_t g_row = t.row_start + row;
      const int g_col = t.col_start + col;
      if (g_row < t.row_end && g_col < n) {
        *reinterpret_cast<uint4*>(c + g_row * n + g_col) =
            *reinterpret_cast<const uint4*>(staged + swizzled<kBN>(row, col));
      }
    }
    __syncthreads();  // everyone has read the staged tile before the next tile's loads overwrite it
  }
}

// CTAs that fit on the device at once, found once per device and config.
template <class Cfg>
cudaError_t persistent_grid(int* ctas) {
  static int cache[kMaxCachedDevices] = {};
  return cached_per_device(cache, ctas, [](int device, int* found) {
    cudaError_t err = cudaFuncSetAttribute(grouped_gemm_tiled_kernel<Cfg>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
    if (err != cudaSuccess) return err;
    int sms = 0, per_sm = 0;
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, grouped_gemm_tiled_kernel<Cfg>, Cfg::kThreads,
                                                        Cfg::kSmemBytes);
    if (err != cudaSuccess) return err;
    *found = sms * std::max(per_sm, 1);
    return cudaSuccess;
  });
}

template <class Cfg>
cudaError_t launch(const __nv_bfloat16* a, const __nv_bfloat16* w, const int32_t* offsets, __nv_bfloat16* c,
                   int64_t m_total, int32_t num_experts, int32_t n, int32_t k, cudaStream_t stream) {
  int ctas = 0;
  const cudaError_t err = persistent_grid<Cfg>(&ctas);
  if (err != cudaSuccess) return err;
  // No CTA more than there can be tiles: every expert wastes at most one partial row tile.
  const int64_t col_tiles = (n + Cfg::kBN - 1) / Cfg::kBN;
  const int64_t max_tiles = (m_total / Cfg::kBM + num_experts) * col_tiles;
  const int grid = static_cast<int>(std::min<int64_t>(ctas, max_tiles));
  grouped_gemm_tiled_kernel<Cfg><<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(a, w, offsets, c, m_total, num_experts, n, k);
  return cudaGetLastError();
}

// Hopper and Blackwell (227 KB of shared memory per CTA): 192 KB of tiles in flight.
using Large = Config<128, 256, 2, 4, 4, 1>;
// A100 (163 KB).
using LargeFewerStages = Config<128, 256, 2, 4, 3, 1>;
// GPUs with about 100 KB per CTA (sm_86, sm_89).
using Small = Config<128, 128, 2, 4, 2, 1>;
// Lesson 3's first rungs: Large's tile with one stage (no overlap) and with two (double buffering).
using OneStage = Config<128, 256, 2, 4, 1, 1>;
using TwoStages = Config<128, 256, 2, 4, 2, 1>;

}  // namespace

cudaError_t launch_grouped_gemm_tiled(const __nv_bfloat16* a, const __nv_bfloat16* w,
                                      const int32_t* offsets, __nv_bfloat16* c, int64_t m_total,
                                      int32_t num_experts, int32_t n, int32_t k, cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kGroupedGemmMaxExperts || n <= 0 || k <= 0 || n % 8 || k % 8 ||
      m_total < 0) {
    return cudaErrorInvalidValue;
  }
  if (m_total == 0) return cudaSuccess;
  // The largest tile this GPU's shared memory holds: a bigger tile reuses each loaded byte more
  // often, and each warp's 64 x 64 piece issues 32 mma per 8 ldmatrix (64 x 32: 16 per 6).
  int device = 0, smem = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (smem >= Large::kSmemBytes) return launch<Large>(a, w, offsets, c, m_total, num_experts, n, k, stream);
  if (smem >= LargeFewerStages::kSmemBytes) {
    return launch<LargeFewerStages>(a, w, offsets, c, m_total, num_experts, n, k, stream);
  }
  return launch<Small>(a, w, offsets, c, m_total, num_experts, n, k, stream);
}

cudaError_t launch_grouped_gemm_pipelined(const __nv_bfloat16* a, const __nv_bfloat16* w,
                                          const int32_t* offsets, __nv_bfloat16* c, int64_t m_total,
                                          int32_t num_experts, int32_t n, int32_t k, int stages,
                                          cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kGroupedGemmMaxExperts || n <= 0 || k <= 0 || n % 8 || k % 8 ||
      m_total < 0 || (stages != 1 && stages != 2)) {
    return cudaErrorInvalidValue;
  }
  if (m_total == 0) return cudaSuccess;
  if (stages == 1) return launch<OneStage>(a, w, offsets, c, m_total, num_experts, n, k, stream);
  return launch<TwoStages>(a, w, offsets, c, m_total, num_experts, n, k, stream);
}

}  // namespace tilemoe
