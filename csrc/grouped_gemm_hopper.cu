// The Hopper grouped GEMM (sm_90a): TMA loads into a ring of shared-memory stages guarded by
// mbarriers, wgmma on the tensor cores, and, in the warp-specialized kernels, a producer warp
// that only moves data while two consumer warpgroups only compute.
//
// The tile is 128 x 256 outputs, k-steps of 64. Each stage holds A's 128 x 64 slice (16 KB) and
// W's 256 x 64 slice (32 KB). The tile order is the tiled kernel's
// (tilemoe/tile_scheduler.cuh): persistent CTAs, a device-side prefix sum of the experts' row
// tiles, a grouped L2 order; the warp-specialized kernels take their tiles in that order from a
// queue (below). Three kernels, lesson 3's last three rungs:
//
//   kTmaRing:         two warpgroups compute; thread 0 also issues the TMA copies, kStages k-steps
//                     ahead (4 stages, 192 KB). It refills a stage once every warp has finished
//                     reading it, so the copy issue sits inside the compute warps, and a tile's
//                     first copies wait for the previous tile's epilogue.
//   kWarpSpecialized: a third warpgroup produces (one thread issues the copies, the rest give
//                     their registers to the consumers with setmaxnreg). It waits only on "stage
//                     free" barriers, so it runs ahead across tiles: while the consumers store one
//                     tile, the next tile's first stages are already landing.
//   kAsyncStore:      kWarpSpecialized whose consumers do not store C themselves: they write the
//                     tile to shared memory and one thread hands it to the copy engine (TMA
//                     store), then they go straight on to the next tile's wgmmas. The 64 KB of
//                     staging cost a stage: 3 stages.
//
// The MoE layer's up-projection (launch_moe_up_hopper) is kAsyncStore with two changes (Fusion):
// A's rows are tokens of x read through the routing's permutation, which TMA cannot gather on
// Hopper, so the whole producer warpgroup copies them with cp.async; and the 256 rows of W in a
// stage are 128 gate rows and their 128 up rows, so each thread's accumulators hold gate and up
// of the same outputs and the epilogue writes silu(gate) * up. No permuted copy of x, and the
// [M, 2I] pre-activation never reaches memory.
//
// Half tiles (warp-specialized kernels). When an expert's last row tile holds at most 64 of its
// rows, the second consumer warpgroup's 64 rows are all padding: it hands each stage straight
// back without a wgmma, and the tensor cores spend that tile on the first consumer's work alone
// (the up-projection's producer also skips copying those rows). With random routing about half
// of the experts end in such a tile, so on average the padded rows computed and thrown away halve.
//
// A tile queue (warp-specialized kernels). kTmaRing's CTAs walk tiles at a fixed stride (CTA i:
// tiles i, i + gridDim.x, ...), which keeps them in step only while every tile costs the same.
// With half tiles they drift apart, the tiles running at once stop being neighbours in the
// grouped L2 order, and W's tiles are fetched from HBM again and again (DeepSeek-V3's
// up-projection read far more bytes in a development Nsight Compute profile, not recorded). So
// the producer's thread 0 claims each next tile from a global counter (atomicAdd: whichever CTA
// is free takes the next tile in order) and posts the number in a shared-memory slot; the
// consumers (and, gathering, the producer warps) take it from there, guarded by a full and an
// empty mbarrier per slot like the stages. A number past the last tile ends the kernel; the last
// CTA to finish zeroes the counter for the next launch.
//
// Ragged rows. A's tensor map covers all M rows, so the last row tile of an expert also loads
// the first rows of the next expert (or zeros past M). Row i of C depends only on row i of A,
// so those rows produce outputs of their own that the epilogue discards: a tile never writes
// outside its expert's rows, and no output it writes mixes in another expert's rows. The
// alternative, one tensor map per expert bounded at its last row, would need the offsets on the
// host (a sync, and no CUDA graphs) or rewriting maps on the device, and would still spend the
// same MMA work on zero rows. W's map is 3-D [E, N, K], so a column tile past N reads zeros
// rather than the next expert's weights; K past the end reads zeros in both. A TMA store writes
// its whole box (clipped only at the tensor's edges), so kAsyncStore uses it only for row blocks
// wholly inside the expert; an expert's last, partial block goes out by masked 16-byte stores.
#include "tilemoe/grouped_gemm.cuh"
#include "tilemoe/sm80_instructions.cuh"  // cp.async: the gathered rows of x
#include "tilemoe/sm90_instructions.cuh"
#include "tilemoe/swizzle.cuh"  // stage_fragment, swizzled<64>: the staged C boxes, in TMA's 128-byte swizzle
#include "tilemoe/tensor_map.cuh"
#include "tilemoe/tile_scheduler.cuh"

#include <algorithm>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "grouped_gemm_hopper.cu needs the sm_90a target (CMAKE_CUDA_ARCHITECTURES 90a), not plain 90: wgmma is sm_90a-only"
#endif

namespace tilemoe {
namespace {

using namespace sm90;

constexpr int kBM = 128, kBN = 256, kBK = 64;
constexpr int kConsumers = 2;  // consumer warpgroups, 64 of the tile's rows each
constexpr int kATileBytes = kBM * kBK * 2, kWTileBytes = kBN * kBK * 2;
constexpr int kStageBytes = kATileBytes + kWTileBytes;  // what one k-step's copies deliver
constexpr int kStoreBox = 64;                           // TMA store boxes of 64 x 64 (128-byte rows)
constexpr int kTileSlots = 2;                           // the tile queue's slots (dynamic scheduling)

// What the kernel does around the GEMM (the MoE layer's fusions; kAsyncStore kernels only):
//   kNone:          C = A @ W^T, A's rows contiguous (the lesson's grouped GEMM).
//   kGatherSwiglu:  the up-projection. Row r of A is x[gather[r]]: the whole producer warpgroup
//                   copies those rows with cp.async (TMA cannot gather rows on Hopper). W's 256
//                   rows of a stage are 128 gate rows and the 128 matching up rows, so the
//                   epilogue holds gate and up of the same column in one thread and writes
//                   silu(gate) * up: a tile has 128 output columns.
enum class Fusion { kNone, kGatherSwiglu };

struct FusionOperands {
  const __nv_bfloat16* x = nullptr;  // kGatherSwiglu: [T, K] tokens
  const int64_t* gather = nullptr;   // kGatherSwiglu: [M] grouped row -> token
  int32_t up_row = 0;                // kGatherSwiglu: w's first up row (I)
};

__host__ __device__ constexpr bool warp_specialized(HopperKernel kernel) { return kernel != HopperKernel::kTmaRing; }
__host__ __device__ constexpr bool async_store(HopperKernel kernel) { return kernel == HopperKernel::kAsyncStore; }
// The warp-specialized kernels take their tiles from a global counter (dynamic scheduling) and
// run an expert's short last row tile as a half tile; kTmaRing walks a fixed stride of tiles.
__host__ __device__ constexpr bool dynamic_tiles(HopperKernel kernel) { return warp_specialized(kernel); }
__host__ __device__ constexpr int stages(HopperKernel kernel) { return async_store(kernel) ? 3 : 4; }
// Output columns of a tile: SwiGLU turns W's 256 rows (gate and up) into 128 outputs.
__host__ __device__ constexpr int out_columns(Fusion fusion) { return fusion == Fusion::kGatherSwiglu ? kBN / 2 : kBN; }
__host__ __device__ constexpr int staging_bytes(HopperKernel kernel, Fusion fusion) {
  return async_store(kernel) ? kBM * out_columns(fusion) * 2 : 0;
}
// 1024 bytes of slack to align the tiles (the 128-byte swizzle repeats every 1024 bytes).
constexpr int smem_bytes(HopperKernel kernel, Fusion fusion) {
  return 1024 + stages(kernel) * kStageBytes + staging_bytes(kernel, fusion) + 2 * stages(kernel) * 8 +
         3 * kTileSlots * 8 + kTilePrefixBytes;
}
constexpr int threads(HopperKernel kernel) { return 128 * (kConsumers + (warp_specialized(kernel) ? 1 : 0)); }

#ifdef TILEMOE_SM90A  // the kernel's device helpers; other targets compile an empty kernel, never launched
// The pieces of dynamic shared memory.
template <HopperKernel kKernel, Fusion kFusion>
struct Shared {
  static constexpr int kStages = stages(kKernel);
  __nv_bfloat16* a;        // [kStages][kBM][kBK], 128-byte swizzled rows (as TMA writes them)
  __nv_bfloat16* w;        // [kStages][kBN][kBK]
  __nv_bfloat16* staging;  // kAsyncStore: per consumer, [out columns / 64][64][64] swizzled boxes
  uint64_t* full;          // [kStages]: the stage's bytes have landed
  uint64_t* empty;         // [kStages]: every consumer warp is done reading the stage
  uint64_t* tile_full;     // [kTileSlots]: the producer posted a tile number in the slot
  uint64_t* tile_empty;    // [kTileSlots]: every reader warp has taken it
  int64_t* tile_slot;      // [kTileSlots]: the posted tile numbers
  int* tile_start;         // [E + 1]: the scheduler's prefix sum

  __device__ __forceinline__ explicit Shared(unsigned char* raw) {
    unsigned char* aligned = raw + (1024 - shared_address(raw) % 1024) % 1024;
    a = reinterpret_cast<__nv_bfloat16*>(aligned);
    w = reinterpret_cast<__nv_bfloat16*>(aligned + kStages * kATileBytes);
    staging = reinterpret_cast<__nv_bfloat16*>(aligned + kStages * kStageBytes);
    full = reinterpret_cast<uint64_t*>(aligned + kStages * kStageBytes + staging_bytes(kKernel, kFusion));
    empty = full + kStages;
    tile_full = empty + kStages;
    tile_empty = tile_full + kTileSlots;
    tile_slot = reinterpret_cast<int64_t*>(tile_empty + kTileSlots);
    tile_start = reinterpret_cast<int*>(tile_slot + kTileSlots);
  }
};

__device__ __forceinline__ float silu(float v) { return v / (1.0f + __expf(-v)); }

// A tile holding at most 64 of its expert's rows (an expert's last, short row tile): the second
// consumer's rows, and in kGatherSwiglu the copies of them, are all padding and are skipped.
__device__ __forceinline__ bool half_tile(const Tile& t) { return t.row_end - t.row_start <= kBM / kConsumers; }
#endif  // TILEMOE_SM90A

template <HopperKernel kKernel, Fusion kFusion>
__global__ void __launch_bounds__(threads(kKernel), 1)
    grouped_gemm_hopper_kernel(const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap w_map,
                               const __grid_constant__ CUtensorMap c_map, const int32_t* __restrict__ offsets,
                               __nv_bfloat16* __restrict__ c, int64_t m_total, int num_experts, int n, int k,
                               const FusionOperands fused, unsigned long long* __restrict__ tile_counter) {
  static_assert(kFusion == Fusion::kNone || async_store(kKernel), "the fusions stage their epilogue (kAsyncStore)");
#ifdef TILEMOE_SM90A
  constexpr int kStages = stages(kKernel);
  constexpr bool kWarpSpecialized = warp_specialized(kKernel), kAsyncStore = async_store(kKernel);
  constexpr bool kGather = kFusion == Fusion::kGatherSwiglu;
  constexpr bool kDynamic = dynamic_tiles(kKernel);
  // Who takes each posted tile number: every consumer warp, and in kGather every producer warp.
  constexpr int kTileReaders = kConsumers * 4 + (kGather ? 4 : 0);
  constexpr int kOutBN = out_columns(kFusion);
  using Ring = RingPosition<kStages>;
  extern __shared__ unsigned char raw[];
  const Shared<kKernel, kFusion> s(raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warpgroup = threadIdx.x / 128;
  const int wg_thread = threadIdx.x % 128;

  if (threadIdx.x == 0) {
    for (int i = 0; i < kStages; ++i) {
      // kGather: thread 0's arrive with W's bytes, plus one per producer thread once its A row landed.
      mbarrier_init(&s.full[i], kGather ? 1 + 128 : 1);
      mbarrier_init(&s.empty[i], kConsumers * 4);  // one arrive per consumer warp
    }
    for (int i = 0; i < kTileSlots; ++i) {
      mbarrier_init(&s.tile_full[i], 1);
      mbarrier_init(&s.tile_empty[i], kTileReaders);
    }
    fence_barrier_init();
  }
  if (warp == 0) build_tile_prefix<kBM>(offsets, num_experts, s.tile_start);
  __syncthreads();

  // n is the output's columns; kGather's W has 2 n rows (gate, then up from fused.up_row).
  const int col_tiles = (n + kOutBN - 1) / kOutBN;
  const int64_t num_tiles = static_cast<int64_t>(s.tile_start[num_experts]) * col_tiles;
  const int k_steps = (k + kBK - 1) / kBK;

  // Fill one stage with k-step `step` of tile t: wait until the stage's previous k-step is
  // consumed, announce the bytes, then two TMA copies.
  auto load = [&](const Tile& t, int step, Ring& fill) {
    mbarrier_wait(&s.empty[fill.stage], fill.phase ^ 1);
    mbarrier_arrive_expect_tx(&s.full[fill.stage], kStageBytes);
    tma_load_2d(s.a + fill.stage * kBM * kBK, &a_map, &s.full[fill.stage], step * kBK, static_cast<int>(t.row_start));
    tma_load_3d(s.w + fill.stage * kBN * kBK, &w_map, &s.full[fill.stage], step * kBK, t.col_start, t.expert);
    fill.advance();
  };

  // The tile queue (kDynamic). The producer's thread 0 claims tile numbers from the global
  // counter (its first is blockIdx.x) and posts each in a slot; every reader warp takes it from
  // there. A number past the last tile tells everyone to stop.
  RingPosition<kTileSlots> posted, taken;
  auto claim = [&] { return static_cast<int64_t>(atomicAdd(&tile_counter[0], 1ull)) + gridDim.x; };
  auto post = [&](int64_t tile) {
    mbarrier_wait(&s.tile_empty[posted.stage], posted.phase ^ 1);
    s.tile_slot[posted.stage] = tile;
    mbarrier_arrive(&s.tile_full[posted.stage]);  // a release: the slot's write is seen by the takers
    posted.advance();
  };
  auto take = [&] {  // called by every thread of a reader warp
    mbarrier_wait(&s.tile_full[taken.stage], taken.phase);
    const int64_t tile = s.tile_slot[taken.stage];
    __syncwarp();
    if (lane == 0) mbarrier_arrive(&s.tile_empty[taken.stage]);
    taken.advance();
    return tile;
  };
  // After its last claim, thread 0 counts its CTA out; the last CTA out zeroes the counter for
  // the next launch (every claim has been made by then).
  auto retire = [&] {
    __threadfence();
    if (atomicAdd(&tile_counter[1], 1ull) == gridDim.x - 1) {
      __threadfence();  // every other CTA's claims (fenced before its count) come before the reset
      atomicExch(&tile_counter[0], 0ull);
      atomicExch(&tile_counter[1], 0ull);
    }
  };

  if constexpr (kWarpSpecialized) {
    if (warpgroup == 0) {  // the producer
      setmaxnreg_dec<40>();
      if constexpr (kGather) {
        // The warpgroup copies each A tile with cp.async in 16-byte pieces: thread t takes piece
        // t % 8 of rows t / 8, t / 8 + 16, ..., so each warp instruction reads four whole
        // 128-byte rows, and writes them in the 128-byte swizzled layout wgmma reads. Each thread
        // then has the barrier count its arrival when its copies land (no waiting here); the
        // consumers fence before their wgmmas read what the generic proxy wrote.
        constexpr int kRowsPerThread = kBM / 16;
        const int piece = wg_thread % 8, first_row = wg_thread / 8;
        Ring fill;
        int64_t next = blockIdx.x;  // thread 0's: the next tile number to post
        for (;;) {
          if (wg_thread == 0) post(next);
          const int64_t tile = take();
          if (tile >= num_tiles) break;
          if (wg_thread == 0) next = claim();
          const Tile t = locate<kBM, kOutBN>(tile, col_tiles, s.tile_start, num_experts, offsets, m_total);
          int32_t token[kRowsPerThread];  // rows past the expert's end repeat its last row: never stored
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i) {
            token[i] = static_cast<int32_t>(fused.gather[min(t.row_start + first_row + 16 * i, t.row_end - 1)]);
          }
          const int copied_rows = half_tile(t) ? kRowsPerThread / kConsumers : kRowsPerThread;
          for (int step = 0; step < k_steps; ++step) {
            mbarrier_wait(&s.empty[fill.stage], fill.phase ^ 1);
            if (wg_thread == 0) {
              __nv_bfloat16* w_stage = s.w + fill.stage * kBN * kBK;
              mbarrier_arrive_expect_tx(&s.full[fill.stage], kWTileBytes);
              tma_load_3d(w_stage, &w_map, &s.full[fill.stage], step * kBK, t.col_start, t.expert);
              tma_load_3d(w_stage + kOutBN * kBK, &w_map, &s.full[fill.stage], step * kBK, fused.up_row + t.col_start,
                          t.expert);
            }
            const __nv_bfloat16* a_stage = s.a + fill.stage * kBM * kBK;
            const int col = step * kBK + piece * 8;  // K is a multiple of 8: a piece is all in or all out
            const bool in_k = col < k;
#pragma unroll
            for (int i = 0; i < kRowsPerThread; ++i) {
              const int r = first_row + 16 * i;
              if (i < copied_rows) {
                sm80::cp_async_16(shared_address(a_stage + swizzled<kBK>(r, piece * 8)),
                                  fused.x + static_cast<int64_t>(token[i]) * k + (in_k ? col : 0), in_k);
              }
            }
            cp_async_mbarrier_arrive_noinc(&s.full[fill.stage]);
            fill.advance();
          }
        }
        sm80::cp_async_wait<0>();  // leave no copy in flight behind an exited thread
        if (wg_thread == 0) retire();
      } else if (threadIdx.x == 0) {
        Ring fill;
        for (int64_t tile = blockIdx.x;;) {
          post(tile);
          if (tile >= num_tiles) break;
          const int64_t next = claim();  // claimed now, so its latency hides behind this tile's copies
          const Tile t = locate<kBM, kOutBN>(tile, col_tiles, s.tile_start, num_experts, offsets, m_total);
          for (int step = 0; step < k_steps; ++step) load(t, step, fill);
          tile = next;
        }
        retire();
      }
      return;
    }
    setmaxnreg_inc<232>();
  }

  const int consumer = kWarpSpecialized ? warpgroup - 1 : warpgroup;  // rows 64 * consumer ... + 63
  Ring read, fill;  // fill: thread 0's copies (kTmaRing only)
  for (int64_t tile = kDynamic ? take() : blockIdx.x; tile < num_tiles; tile = kDynamic ? take() : tile + gridDim.x) {
    const Tile t = locate<kBM, kOutBN>(tile, col_tiles, s.tile_start, num_experts, offsets, m_total);
    if constexpr (!kWarpSpecialized) {
      if (threadIdx.x == 0) {
        for (int step = 0; step < min(kStages, k_steps); ++step) load(t, step, fill);
      }
    }
    if (kDynamic && consumer == 1 && half_tile(t)) {
      // All 64 of this consumer's rows are past the expert's end: it only hands each stage back,
      // so the tensor cores spend the tile on the first consumer's wgmmas alone.
      for (int step = 0; step < k_steps; ++step) {
        mbarrier_wait(&s.full[read.stage], read.phase);
        __syncwarp();
        if (lane == 0) mbarrier_arrive(&s.empty[read.stage]);
        read.advance();
      }
      continue;
    }

    float acc[128];
    int previous = 0;  // the stage of the k-step before this one
    for (int step = 0; step < k_steps; ++step) {
      mbarrier_wait(&s.full[read.stage], read.phase);
      if constexpr (kGather) fence_proxy_async_shared();  // cp.async's writes, visible to wgmma
      const uint64_t a_desc = tile_descriptor(s.a + read.stage * kBM * kBK + consumer * 64 * kBK);
      const uint64_t w_desc = tile_descriptor(s.w + read.stage * kBN * kBK);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk) {  // four k16 slices: +32 bytes each
        wgmma_m64n256k16(acc, a_desc + 2 * kk, w_desc + 2 * kk, step > 0 || kk > 0);
      }
      wgmma_commit();
      if constexpr (kWarpSpecialized) {
        // Keep this k-step's wgmmas running; wait only for the previous k-step's, whose stage
        // is then free for the producer.
        wgmma_wait<1>();
        if (step > 0 && lane == 0) mbarrier_arrive(&s.empty[previous]);
      } else {
        wgmma_wait<0>();
        if (lane == 0) mbarrier_arrive(&s.empty[read.stage]);
        // Thread 0 refills this stage once all eight warps are done with it.
        if (threadIdx.x == 0 && step + kStages < k_steps) load(t, step + kStages, fill);
      }
      previous = read.stage;
      read.advance();
    }
    if constexpr (kWarpSpecialized) {
      wgmma_wait<0>();
      if (lane == 0) mbarrier_arrive(&s.empty[previous]);
    }
    fence_accumulators(acc);

    // Each thread's accumulators are pairs of adjacent columns in two rows of this consumer's
    // 64: register 4 j + {0, 1} at (row, 8 j + col), 4 j + {2, 3} at (row + 8, 8 j + col).
    const int row = (warp % 4) * 16 + lane / 4, col = 2 * (lane % 4);
    const int64_t block_row = t.row_start + consumer * 64;  // this consumer's first row
    if constexpr (kAsyncStore) {
      // Into shared memory as 64 x 64 boxes, then out through the copy engine.
      __nv_bfloat16* staging = s.staging + consumer * 64 * kOutBN;
      if (wg_thread == 0) bulk_wait_read<0>();  // the previous tile's stores have read the buffer
      named_barrier_sync(1 + consumer, 128);
#pragma unroll
      for (int j = 0; j < kOutBN / 8; ++j) {
        float v0 = acc[4 * j], v1 = acc[4 * j + 1], v2 = acc[4 * j + 2], v3 = acc[4 * j + 3];
        if constexpr (kGather) {  // up at W rows 128..255: accumulator columns 128 further on
          constexpr int kUp = 4 * (kBN / 2 / 8);
          v0 = silu(v0) * acc[kUp + 4 * j];
          v1 = silu(v1) * acc[kUp + 4 * j + 1];
          v2 = silu(v2) * acc[kUp + 4 * j + 2];
          v3 = silu(v3) * acc[kUp + 4 * j + 3];
        }
        stage_fragment(staging, j, row, col, v0, v1, v2, v3);
      }
      fence_proxy_async_shared();             // the writes above, visible to the copy engine ...
      named_barrier_sync(1 + consumer, 128);  // ... from every thread of this warpgroup
      if (block_row + 64 <= t.row_end) {
        // All 64 rows are the expert's: one thread issues the stores (columns past N are clipped).
        if (wg_thread == 0) {
          for (int b = 0; b < kOutBN / kStoreBox && t.col_start + b * kStoreBox < n; ++b) {
            tma_store_2d(&c_map, staging + b * 64 * kStoreBox, t.col_start + b * kStoreBox, static_cast<int>(block_row));
          }
          bulk_commit();
        }
      } else {
        // The expert's last rows: 16-byte pieces, masked by row (and by N: a multiple of 8).
        for (int piece = wg_thread; piece < 64 * kOutBN / 8; piece += 128) {
          const int r = piece / (kOutBN / 8), cc = piece % (kOutBN / 8) * 8;
          if (block_row + r < t.row_end && t.col_start + cc < n) {
            *reinterpret_cast<uint4*>(c + (block_row + r) * n + t.col_start + cc) = *reinterpret_cast<const uint4*>(
                staging + (cc / kStoreBox) * 64 * kStoreBox + swizzled<kStoreBox>(r, cc % kStoreBox));
          }
        }
      }
    } else {
      // Straight from registers: bf16 pairs, masked to the expert's rows and to N.
      const int64_t row0 = block_row + row, row1 = row0 + 8;
      const bool ok0 = row0 < t.row_end, ok1 = row1 < t.row_end;
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j) {
        const int cj = t.col_start + 8 * j + col;
        if (cj < n) {
          if (ok0) *reinterpret_cast<__nv_bfloat162*>(c + row0 * n + cj) = __floats2bfloat162_rn(acc[4 * j], acc[4 * j + 1]);
          if (ok1) {
            *reinterpret_cast<__nv_bfloat162*>(c + row1 * n + cj) = __floats2bfloat162_rn(acc[4 * j + 2], acc[4 * j + 3]);
          }
        }
      }
    }
  }
  if constexpr (kAsyncStore) {
    if (wg_thread == 0) bulk_wait<0>();  // the last stores have finished before the CTA exits
  }
#endif  // TILEMOE_SM90A
}

// The SMs of the device, once per device and kernel (with the shared-memory limit raised), or
// cudaErrorNotSupported when this GPU cannot run the kernel.
template <HopperKernel kKernel, Fusion kFusion>
cudaError_t persistent_ctas(int* ctas) {
  static int cache[kMaxCachedDevices] = {};
  return sm90a_persistent_ctas(cache, grouped_gemm_hopper_kernel<kKernel, kFusion>, smem_bytes(kKernel, kFusion), ctas);
}

// A row-major bf16 [rows, cols] as a 2-D tensor map with boxes of box_rows x 64.
cudaError_t encode_2d(CUtensorMap* map, const void* base, int64_t rows, int64_t cols, int box_rows) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * 2};
  const cuuint32_t box[2] = {kBK, static_cast<cuuint32_t>(box_rows)};
  return encode(map, base, 2, dims, strides, box);
}

// The experts' weights [E, rows, K] as a 3-D tensor map with boxes of box_rows x 64 (x 1 expert).
cudaError_t encode_weights(CUtensorMap* map, const void* w, int32_t num_experts, int64_t rows, int64_t k,
                           int box_rows) {
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(num_experts)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(k) * 2, static_cast<cuuint64_t>(rows * k) * 2};
  const cuuint32_t box[3] = {kBK, static_cast<cuuint32_t>(box_rows), 1};
  return encode(map, w, 3, dims, strides, box);
}

// Launch over a's m_total grouped rows with n output columns; the tensor maps are built on the
// host for every call (a few microseconds, no sync) and passed by value as __grid_constant__.
template <HopperKernel kKernel, Fusion kFusion>
cudaError_t launch(const CUtensorMap& a_map, const CUtensorMap& w_map, const CUtensorMap& c_map,
                   const int32_t* offsets, __nv_bfloat16* c, int64_t m_total, int32_t num_experts, int32_t n,
                   int32_t k, const FusionOperands& fused, unsigned long long* tile_counter, cudaStream_t stream) {
  if (dynamic_tiles(kKernel) && tile_counter == nullptr) return cudaErrorInvalidValue;
  int ctas = 0;
  const cudaError_t err = persistent_ctas<kKernel, kFusion>(&ctas);
  if (err != cudaSuccess) return err;
  const int64_t col_tiles = (n + out_columns(kFusion) - 1) / out_columns(kFusion);
  const int64_t max_tiles = (m_total / kBM + num_experts) * col_tiles;
  const int grid = static_cast<int>(std::min<int64_t>(ctas, max_tiles));
  grouped_gemm_hopper_kernel<kKernel, kFusion><<<grid, threads(kKernel), smem_bytes(kKernel, kFusion), stream>>>(
      a_map, w_map, c_map, offsets, c, m_total, num_experts, n, k, fused, tile_counter);
  return cudaGetLastError();
}

template <HopperKernel kKernel>
cudaError_t launch_plain(const __nv_bfloat16* a, const __nv_bfloat16* w, const int32_t* offsets, __nv_bfloat16* c,
                         int64_t m_total, int32_t num_experts, int32_t n, int32_t k,
                         unsigned long long* tile_counter, cudaStream_t stream) {
  CUtensorMap a_map, w_map, c_map;  // c_map: kAsyncStore's stores, [M, N] in 64 x 64 boxes
  cudaError_t err = encode_2d(&a_map, a, m_total, k, kBM);
  if (err == cudaSuccess) err = encode_weights(&w_map, w, num_experts, n, k, kBN);
  if (err == cudaSuccess) err = encode_2d(&c_map, c, m_total, n, kStoreBox);
  if (err != cudaSuccess) return err;
  return launch<kKernel, Fusion::kNone>(a_map, w_map, c_map, offsets, c, m_total, num_experts, n, k, {}, tile_counter,
                                        stream);
}

bool bad_sizes(int64_t m_total, int32_t num_experts, int32_t n, int32_t k) {
  return num_experts < 1 || num_experts > kGroupedGemmMaxExperts || n <= 0 || k <= 0 || n % 8 || k % 8 ||
         m_total < 0 || m_total > INT32_MAX;
}

}  // namespace

cudaError_t launch_grouped_gemm_hopper(const __nv_bfloat16* a, const __nv_bfloat16* w, const int32_t* offsets,
                                       __nv_bfloat16* c, int64_t m_total, int32_t num_experts, int32_t n,
                                       int32_t k, HopperKernel kernel, unsigned long long* tile_counter,
                                       cudaStream_t stream) {
  if (bad_sizes(m_total, num_experts, n, k)) return cudaErrorInvalidValue;
  if (m_total == 0) return cudaSuccess;
  switch (kernel) {
    case HopperKernel::kTmaRing:
      return launch_plain<HopperKernel::kTmaRing>(a, w, offsets, c, m_total, num_experts, n, k, tile_counter,
                                                 stream);
    case HopperKernel::kWarpSpecialized:
      return launch_plain<HopperKernel::kWarpSpecialized>(a, w, offsets, c, m_total, num_experts, n, k, tile_counter,
                                                 stream);
    case HopperKernel::kAsyncStore:
      return launch_plain<HopperKernel::kAsyncStore>(a, w, offsets, c, m_total, num_experts, n, k, tile_counter,
                                                 stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_moe_up_hopper(const __nv_bfloat16* x, int64_t num_tokens, const int64_t* gather,
                                 const __nv_bfloat16* w_gate_up, const int32_t* offsets, __nv_bfloat16* act,
                                 int64_t m_total, int32_t num_experts, int32_t ffn, int32_t k,
                                 unsigned long long* tile_counter, cudaStream_t stream) {
  if (bad_sizes(m_total, num_experts, ffn, k) || num_tokens < 1) return cudaErrorInvalidValue;
  if (m_total == 0) return cudaSuccess;
  CUtensorMap a_map{}, w_map, c_map;  // A is gathered by cp.async: no map
  cudaError_t err = encode_weights(&w_map, w_gate_up, num_experts, 2 * static_cast<int64_t>(ffn), k, kBN / 2);
  if (err == cudaSuccess) err = encode_2d(&c_map, act, m_total, ffn, kStoreBox);
  if (err != cudaSuccess) return err;
  FusionOperands fused;
  fused.x = x;
  fused.gather = gather;
  fused.up_row = ffn;
  return launch<HopperKernel::kAsyncStore, Fusion::kGatherSwiglu>(a_map, w_map, c_map, offsets, act, m_total,
                                                                   num_experts, ffn, k, fused, tile_counter, stream);
}

cudaError_t grouped_gemm_hopper_supported() {
  int ctas = 0;
  cudaError_t err = persistent_ctas<HopperKernel::kAsyncStore, Fusion::kNone>(&ctas);
  if (err == cudaSuccess) err = persistent_ctas<HopperKernel::kAsyncStore, Fusion::kGatherSwiglu>(&ctas);
  return err;
}

}  // namespace tilemoe
