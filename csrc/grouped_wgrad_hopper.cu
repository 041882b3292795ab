// The MoE layer's weight gradients on Hopper (sm_90a): for every expert e,
//
//     dW[e] = A[rows of e]^T @ B[rows of e]        [N1, N2], a sum over the expert's grouped rows
//
// dW_down = dY^T (p * A) and dW_gate_up = d pre^T x: one operand is read in place (rows in expert
// order), the other through the routing's permutation (row r is token gather[r] of x or dY).
//
// It is the warp-specialized GEMM of grouped_gemm_hopper.cu turned on its side. The reduction runs
// over rows, so both operands arrive with M (or N) contiguous: a k-step is 64 rows of a row-major
// tensor. TMA writes each 64 x 64 box of them in the 128-byte swizzle as before (a 128-byte row
// now holds 64 output rows, or columns, of one k), and wgmma reads both operands "MN-major"
// (its transpose bits; mn_major_descriptor). The tile is 128 x 256 outputs of one expert; two
// consumer warpgroups take 64 of its rows each, a producer warpgroup fills a 3-stage ring:
//   - the operand read in place by TMA (2 or 4 boxes per k-step);
//   - the gathered operand by the whole producer warpgroup with cp.async (Hopper's TMA cannot
//     gather rows), 16-byte pieces written in the same swizzled layout, unmasked in whole k-steps
//     (the producer's instruction issue is what limits this kernel: copy_whole_rows);
//   - an expert's last, partial k-step by cp.async for both operands, rows past the expert's end
//     zero-filled. (TMA would read the next expert's rows there, or rows no kernel wrote.)
// The epilogue stages the tile in shared memory and stores it with TMA through a 3-D map
// [E, N1, N2] (clipped at N1 and N2, never into the next expert's gradient), while the producer is
// already filling the next tile's first stages. An expert with no rows gets zeros. To accumulate
// (dW[e] += ..., a gradient added into the one a training step already holds), the same boxes
// go out as TMA reduce-adds: the memory system adds them to the bf16 values in place, so the SM
// never reads the old gradient and no separate add pass runs. Every output element belongs to one
// tile, so each is added to exactly once: deterministic.
//
// Tiles go out at a fixed stride (CTA i: tiles i, i + gridDim.x, ...), an expert's tiles
// consecutive: the tiles running at once read the same expert's rows, which stay in L2.
#include "tilemoe/grouped_gemm.cuh"
#include "tilemoe/sm80_instructions.cuh"  // cp.async: the gathered rows and the last k-step
#include "tilemoe/sm90_instructions.cuh"
#include "tilemoe/swizzle.cuh"
#include "tilemoe/tensor_map.cuh"
#include "tilemoe/tile_scheduler.cuh"  // sm90a_persistent_ctas

#include <algorithm>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "grouped_wgrad_hopper.cu needs the sm_90a target (CMAKE_CUDA_ARCHITECTURES 90a), not plain 90: wgmma is sm_90a-only"
#endif

namespace tilemoe {
namespace {

using namespace sm90;

constexpr int kBN1 = 128, kBN2 = 256, kBR = 64;  // a tile of 128 x 256 outputs; k-steps of 64 rows
constexpr int kBox = 64;                         // columns of a TMA box (one 128-byte row)
constexpr int kABytes = kBR * kBN1 * 2, kBBytes = kBR * kBN2 * 2;
constexpr int kStages = 3;
constexpr int kConsumers = 2;  // consumer warpgroups, 64 of the tile's rows each
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kStagingBytes = kBN1 * kBN2 * 2;  // the epilogue's tile, as 64 x 64 boxes
// 1024 bytes of slack to align the tiles (the 128-byte swizzle repeats every 1024 bytes).
constexpr int kSmemBytes = 1024 + kStages * (kABytes + kBBytes) + kStagingBytes + 2 * kStages * 8;

#ifdef TILEMOE_SM90A
constexpr int kBoxBytes = kBR * kBox * 2;  // 8 KB: one TMA box, 64 rows of 128 bytes

struct WgradShared {
  __nv_bfloat16* a;        // [kStages][kBN1 / 64 boxes][64 rows][64 columns], swizzled
  __nv_bfloat16* b;        // [kStages][kBN2 / 64 boxes][64][64]
  __nv_bfloat16* staging;  // per consumer, [kBN2 / 64 boxes][64][64]
  uint64_t* full;          // [kStages]: the stage's bytes have landed (TMA bytes + 128 cp.async arrivals)
  uint64_t* empty;         // [kStages]: every consumer warp is done reading the stage

  __device__ __forceinline__ explicit WgradShared(unsigned char* raw) {
    unsigned char* aligned = raw + (1024 - shared_address(raw) % 1024) % 1024;
    a = reinterpret_cast<__nv_bfloat16*>(aligned);
    b = reinterpret_cast<__nv_bfloat16*>(aligned + kStages * kABytes);
    staging = reinterpret_cast<__nv_bfloat16*>(aligned + kStages * (kABytes + kBBytes));
    full = reinterpret_cast<uint64_t*>(aligned + kStages * (kABytes + kBBytes) + kStagingBytes);
    empty = full + kStages;
  }
};

using Ring = RingPosition<kStages>;

// Tile number -> its expert and first output row / column: an expert's tiles are consecutive,
// columns (N2) fastest.
struct WgradTile {
  int expert, n1_start, n2_start;
  int64_t row_start, row_end;
  int steps;
};

__device__ __forceinline__ WgradTile locate_wgrad(int64_t tile, int tiles_n2, int per_expert,
                                                  const int32_t* __restrict__ offsets) {
  WgradTile t;
  t.expert = static_cast<int>(tile / per_expert);
  const int in_expert = static_cast<int>(tile % per_expert);
  t.n1_start = (in_expert / tiles_n2) * kBN1;
  t.n2_start = (in_expert % tiles_n2) * kBN2;
  t.row_start = offsets[t.expert];
  t.row_end = offsets[t.expert + 1];
  t.steps = static_cast<int>((t.row_end - t.row_start + kBR - 1) / kBR);
  return t;
}

// The producer warpgroup's share of one k-step's rows r0 .. r0 + 63: thread t copies rows
// t / 8, t / 8 + 16, ... (piece t % 8 of each, below). Their source rows (gather[r], or r itself
// without a gather; row 0 for rows at or past row_end, which are zero-filled) are read before the
// producer waits for a free stage, so that the index loads' latency hides behind the wait.
struct SourceRows {
  int64_t row[kBR / 16];
  bool valid[kBR / 16];
};

__device__ __forceinline__ SourceRows source_rows(const int64_t* __restrict__ gather, int64_t r0, int64_t row_end,
                                                  int wg_thread) {
  SourceRows rows;
#pragma unroll
  for (int i = 0; i < kBR / 16; ++i) {
    const int64_t r = r0 + wg_thread / 8 + 16 * i;
    rows.valid[i] = r < row_end;
    rows.row[i] = rows.valid[i] ? (gather != nullptr ? gather[r] : r) : 0;
  }
  return rows;
}

// The cp.async copy of one k-step of an operand: kBoxes boxes of 64 columns from column col0 of
// the source rows; invalid rows and columns at or past n arrive as zeros. Each thread copies 16-byte
// piece t % 8 of its rows, so a warp instruction reads four whole 128-byte rows.
template <int kBoxes>
__device__ __forceinline__ void copy_rows(__nv_bfloat16* tile, const __nv_bfloat16* __restrict__ src,
                                          const SourceRows& rows, int col0, int n, int wg_thread) {
  const int piece = wg_thread % 8, first_row = wg_thread / 8;
#pragma unroll
  for (int i = 0; i < kBR / 16; ++i) {
#pragma unroll
    for (int box = 0; box < kBoxes; ++box) {
      const int col = col0 + box * kBox + piece * 8;  // n is a multiple of 8: a piece is all in or all out
      const bool ok = rows.valid[i] && col < n;
      sm80::cp_async_16(shared_address(tile + box * kBR * kBox + swizzled<kBox>(first_row + 16 * i, piece * 8)),
                        src + rows.row[i] * n + (ok ? col : 0), ok);
    }
  }
}

// copy_rows for a whole k-step whose boxes all lie inside the n columns: nothing to mask, so each
// row's address is computed once and its boxes are constant offsets from it. The producer issues
// these copies for every k-step, and it is the kernel's critical path: the masked form's per-copy
// selects and 64-bit address arithmetic took most of its instruction issue (Nsight Compute, H200).
// It stays a function of its own: one template for both forms, the masks under `if constexpr`,
// compiled to a slower producer (dW_gate_up slower in a development A/B on the H200, not recorded).
template <int kBoxes>
__device__ __forceinline__ void copy_whole_rows(__nv_bfloat16* tile, const __nv_bfloat16* __restrict__ src,
                                                const SourceRows& rows, int col0, int n, int wg_thread) {
  const int piece = wg_thread % 8, first_row = wg_thread / 8;
#pragma unroll
  for (int i = 0; i < kBR / 16; ++i) {
    const __nv_bfloat16* row = src + rows.row[i] * n + col0 + piece * 8;
#pragma unroll
    for (int box = 0; box < kBoxes; ++box) {
      sm80::cp_async_16(shared_address(tile + box * kBR * kBox + swizzled<kBox>(first_row + 16 * i, piece * 8)),
                        row + box * kBox);
    }
  }
}
#endif  // TILEMOE_SM90A

// kGatherA: A (the N1 side) is the gathered operand (dW_down: dY's rows); else B (dW_gate_up: x's).
template <bool kGatherA>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_wgrad_hopper_kernel(const __grid_constant__ CUtensorMap dense_map, const __grid_constant__ CUtensorMap out_map,
                                const __nv_bfloat16* __restrict__ dense, const __nv_bfloat16* __restrict__ gathered,
                                const int64_t* __restrict__ gather, const int32_t* __restrict__ offsets,
                                int num_experts, int n1, int n2, bool accumulate) {
#ifdef TILEMOE_SM90A
  constexpr int kDenseBoxes = (kGatherA ? kBN2 : kBN1) / kBox, kGatherBoxes = (kGatherA ? kBN1 : kBN2) / kBox;
  extern __shared__ unsigned char raw[];
  const WgradShared s(raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warpgroup = threadIdx.x / 128;
  const int wg_thread = threadIdx.x % 128;

  if (threadIdx.x == 0) {
    for (int i = 0; i < kStages; ++i) {
      mbarrier_init(&s.full[i], 1 + 128);         // thread 0's arrive (with the TMA bytes), one per producer thread
      mbarrier_init(&s.empty[i], kConsumers * 4);  // one arrive per consumer warp
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int tiles_n2 = (n2 + kBN2 - 1) / kBN2;
  const int per_expert = ((n1 + kBN1 - 1) / kBN1) * tiles_n2;
  const int64_t num_tiles = static_cast<int64_t>(per_expert) * num_experts;
  const int dense_n = kGatherA ? n2 : n1, gathered_n = kGatherA ? n1 : n2;

  if (warpgroup == 0) {  // the producer
    setmaxnreg_dec<56>();
    Ring fill;
    for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
      const WgradTile t = locate_wgrad(tile, tiles_n2, per_expert, offsets);
      const int dense_col = kGatherA ? t.n2_start : t.n1_start, gathered_col = kGatherA ? t.n1_start : t.n2_start;
      for (int step = 0; step < t.steps; ++step) {
        const int64_t r0 = t.row_start + static_cast<int64_t>(step) * kBR;
        __nv_bfloat16* a_stage = s.a + fill.stage * (kABytes / 2);
        __nv_bfloat16* b_stage = s.b + fill.stage * (kBBytes / 2);
        __nv_bfloat16* dense_stage = kGatherA ? b_stage : a_stage;
        const SourceRows gathered_rows = source_rows(gather, r0, t.row_end, wg_thread);  // in flight during the wait
        mbarrier_wait(&s.empty[fill.stage], fill.phase ^ 1);
        const bool whole_step = r0 + kBR <= t.row_end;
        if (whole_step) {  // a whole k-step of the expert's rows: TMA
          if (wg_thread == 0) {
            mbarrier_arrive_expect_tx(&s.full[fill.stage], kDenseBoxes * kBoxBytes);
#pragma unroll
            for (int box = 0; box < kDenseBoxes; ++box) {
              tma_load_2d(dense_stage + box * kBR * kBox, &dense_map, &s.full[fill.stage], dense_col + box * kBox,
                          static_cast<int>(r0));
            }
          }
        } else {  // the expert's last rows: masked copies
          if (wg_thread == 0) mbarrier_arrive(&s.full[fill.stage]);
          copy_rows<kDenseBoxes>(dense_stage, dense, source_rows(nullptr, r0, t.row_end, wg_thread), dense_col,
                                 dense_n, wg_thread);
        }
        __nv_bfloat16* gathered_stage = kGatherA ? a_stage : b_stage;
        if (whole_step && gathered_col + kGatherBoxes * kBox <= gathered_n) {
          copy_whole_rows<kGatherBoxes>(gathered_stage, gathered, gathered_rows, gathered_col, gathered_n, wg_thread);
        } else {
          copy_rows<kGatherBoxes>(gathered_stage, gathered, gathered_rows, gathered_col, gathered_n, wg_thread);
        }
        cp_async_mbarrier_arrive_noinc(&s.full[fill.stage]);
        fill.advance();
      }
    }
    sm80::cp_async_wait<0>();  // leave no copy in flight behind an exited thread
    return;
  }
  setmaxnreg_inc<224>();

  const int consumer = warpgroup - 1;  // output rows 64 * consumer ... + 63 of the tile
  Ring read;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const WgradTile t = locate_wgrad(tile, tiles_n2, per_expert, offsets);
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
    int previous = 0;  // the stage of the k-step before this one
    for (int step = 0; step < t.steps; ++step) {
      mbarrier_wait(&s.full[read.stage], read.phase);
      fence_proxy_async_shared();  // cp.async's writes, visible to wgmma
      // This consumer's 64 output rows are box `consumer` of A's stage; B's four boxes lie kBoxBytes apart.
      const uint64_t a_desc = mn_major_descriptor(s.a + read.stage * (kABytes / 2) + consumer * kBR * kBox, kBoxBytes);
      const uint64_t b_desc = mn_major_descriptor(s.b + read.stage * (kBBytes / 2), kBoxBytes);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBR / 16; ++kk) {  // four k16 slices: 16 rows of 128 bytes each
        wgmma_m64n256k16<1>(acc, a_desc + kk * (16 * 128 >> 4), b_desc + kk * (16 * 128 >> 4), 1);
      }
      wgmma_commit();
      wgmma_wait<1>();  // the previous k-step's wgmmas are done: its stage goes back
      if (step > 0 && lane == 0) mbarrier_arrive(&s.empty[previous]);
      previous = read.stage;
      read.advance();
    }
    wgmma_wait<0>();
    if (t.steps > 0 && lane == 0) mbarrier_arrive(&s.empty[previous]);
    fence_accumulators(acc);

    // Into shared memory as 64 x 64 boxes (registers 4 j + {0, 1} at (row, 8 j + col), 4 j + {2, 3}
    // eight rows down), then out through the copy engine.
    const int row = (warp % 4) * 16 + lane / 4, col = 2 * (lane % 4);
    __nv_bfloat16* staging = s.staging + consumer * 64 * kBN2;
    if (wg_thread == 0) bulk_wait_read<0>();  // the previous tile's stores have read the buffer
    named_barrier_sync(1 + consumer, 128);
#pragma unroll
    for (int j = 0; j < kBN2 / 8; ++j) {
      stage_fragment(staging, j, row, col, acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]);
    }
    fence_proxy_async_shared();             // the writes above, visible to the copy engine ...
    named_barrier_sync(1 + consumer, 128);  // ... from every thread of this warpgroup
    const int out_row = t.n1_start + consumer * 64;
    if (wg_thread == 0 && out_row < n1) {
      for (int box = 0; box < kBN2 / kBox && t.n2_start + box * kBox < n2; ++box) {
        if (accumulate) {
          tma_reduce_add_3d(&out_map, staging + box * 64 * kBox, t.n2_start + box * kBox, out_row, t.expert);
        } else {
          tma_store_3d(&out_map, staging + box * 64 * kBox, t.n2_start + box * kBox, out_row, t.expert);
        }
      }
      bulk_commit();
    }
  }
  if (wg_thread == 0) bulk_wait<0>();  // the last stores have finished before the CTA exits
#endif  // TILEMOE_SM90A
}

template <bool kGatherA>
cudaError_t persistent_ctas(int* ctas) {
  static int cache[kMaxCachedDevices] = {};
  return sm90a_persistent_ctas(cache, grouped_wgrad_hopper_kernel<kGatherA>, kSmemBytes, ctas);
}

template <bool kGatherA>
cudaError_t launch(const __nv_bfloat16* dense, int64_t dense_rows, const __nv_bfloat16* gathered,
                   const int64_t* gather, const int32_t* offsets, __nv_bfloat16* out, int32_t num_experts, int32_t n1,
                   int32_t n2, bool accumulate, cudaStream_t stream) {
  int ctas = 0;
  cudaError_t err = persistent_ctas<kGatherA>(&ctas);
  if (err != cudaSuccess) return err;
  const int64_t dense_n = kGatherA ? n2 : n1;
  CUtensorMap dense_map, out_map;
  const cuuint64_t dense_dims[2] = {static_cast<cuuint64_t>(dense_n), static_cast<cuuint64_t>(dense_rows)};
  const cuuint64_t dense_strides[1] = {static_cast<cuuint64_t>(dense_n) * 2};
  const cuuint32_t dense_box[2] = {kBox, kBR};
  err = encode(&dense_map, dense, 2, dense_dims, dense_strides, dense_box);
  const cuuint64_t out_dims[3] = {static_cast<cuuint64_t>(n2), static_cast<cuuint64_t>(n1),
                                  static_cast<cuuint64_t>(num_experts)};
  const cuuint64_t out_strides[2] = {static_cast<cuuint64_t>(n2) * 2, static_cast<cuuint64_t>(n1) * n2 * 2};
  const cuuint32_t out_box[3] = {kBox, 64, 1};
  if (err == cudaSuccess) err = encode(&out_map, out, 3, out_dims, out_strides, out_box);
  if (err != cudaSuccess) return err;
  const int64_t tiles = static_cast<int64_t>((n1 + kBN1 - 1) / kBN1) * ((n2 + kBN2 - 1) / kBN2) * num_experts;
  const int grid = static_cast<int>(std::min<int64_t>(ctas, tiles));
  grouped_wgrad_hopper_kernel<kGatherA><<<grid, kThreads, kSmemBytes, stream>>>(
      dense_map, out_map, dense, gathered, gather, offsets, num_experts, n1, n2, accumulate);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_grouped_wgrad_hopper(const __nv_bfloat16* dense, int64_t dense_rows, const __nv_bfloat16* gathered,
                                        const int64_t* gather, bool gather_a, const int32_t* offsets,
                                        __nv_bfloat16* out, int32_t num_experts, int32_t n1, int32_t n2,
                                        bool accumulate, cudaStream_t stream) {
  if (num_experts < 1 || n1 <= 0 || n2 <= 0 || n1 % 8 || n2 % 8 || dense_rows < 1 || dense_rows > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  return gather_a ? launch<true>(dense, dense_rows, gathered, gather, offsets, out, num_experts, n1, n2, accumulate, stream)
                  : launch<false>(dense, dense_rows, gathered, gather, offsets, out, num_experts, n1, n2, accumulate, stream);
}

cudaError_t grouped_wgrad_hopper_supported() {
  int ctas = 0;
  cudaError_t err = persistent_ctas<true>(&ctas);
  if (err == cudaSuccess) err = persistent_ctas<false>(&ctas);
  return err;
}

}  // namespace tilemoe
