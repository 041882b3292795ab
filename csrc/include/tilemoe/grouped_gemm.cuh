// Grouped GEMM for MoE experts: C_e = A_e @ W_e^T for the row segment of every expert.
//
// Host-only declarations (plain C++ includes this: csrc/bindings.cpp and the example programs).
//
// The layout every variant shares (DESIGN.md):
//   a        [M, K] bf16, row-major: the rows of all experts, sorted by expert
//   w        [E, N, K] bf16, row-major: expert e's weight in nn.Linear layout [out, in]
//   offsets  [E + 1] int32: expert e owns rows offsets[e] .. offsets[e + 1] - 1 of a and c;
//            offsets[0] = 0, non-decreasing. An expert may own no rows.
//   c        [M, N] bf16, row-major, written for rows offsets[0] .. offsets[E] - 1 only
// Accumulation is fp32; each output is rounded to bf16 once. N and K must be multiples of 8
// (rows of 16 bytes, the unit of every vector load); the launchers return cudaErrorInvalidValue
// otherwise. The Python wrapper tilemoe/cuda.py checks every argument with a readable error first.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace tilemoe {

// The tiled kernel keeps every expert's tile prefix sum in shared memory: at most this many experts.
constexpr int kGroupedGemmMaxExperts = 1024;

// The sequential baseline: one launch per non-empty expert of a 32x32 shared-memory tiled kernel
// with fp32 FMAs (no tensor cores). host_offsets are the E + 1 offsets in host memory: the caller
// has read them back from the device, the host synchronization this variant pays for.
cudaError_t launch_grouped_gemm_naive(const __nv_bfloat16* a, const __nv_bfloat16* w,
                                      const int32_t* host_offsets, __nv_bfloat16* c,
                                      int32_t num_experts, int32_t n, int32_t k, cudaStream_t stream);

// One persistent launch for all experts: every CTA builds the prefix sum of the experts' tile
// counts from the device offsets (no host sync, CUDA-graph capturable) and walks tiles
// blockIdx.x, blockIdx.x + gridDim.x, ...; tensor cores (mma.sync m16n8k16 bf16), a multi-stage
// cp.async pipeline, an L2-friendly grouped tile order within each expert. m_total = M (the rows
// of a and c) bounds the grid; rows from offsets[E] to M are not written.
cudaError_t launch_grouped_gemm_tiled(const __nv_bfloat16* a, const __nv_bfloat16* w,
                                      const int32_t* offsets, __nv_bfloat16* c, int64_t m_total,
                                      int32_t num_experts, int32_t n, int32_t k, cudaStream_t stream);

// Lesson 3's first two rungs: the tiled kernel with stages = 1 (load, wait, compute: no overlap)
// or 2 (cp.async double buffering), everything else as launch_grouped_gemm_tiled.
cudaError_t launch_grouped_gemm_pipelined(const __nv_bfloat16* a, const __nv_bfloat16* w,
                                          const int32_t* offsets, __nv_bfloat16* c, int64_t m_total,
                                          int32_t num_experts, int32_t n, int32_t k, int stages,
                                          cudaStream_t stream);

// The Hopper kernels (csrc/grouped_gemm_hopper.cu, sm_90a): TMA loads into an mbarrier ring of
// shared-memory stages, wgmma, 128 x 256 tiles, the tiled kernel's tile order (kTmaRing walks it
// at a fixed stride; the warp-specialized kernels claim tiles from a counter in that order).
enum class HopperKernel {
  kTmaRing,          // two compute warpgroups; one of their threads also issues the copies
  kWarpSpecialized,  // plus a producer warpgroup that only issues copies, running ahead across tiles
  kAsyncStore,       // plus an epilogue through shared memory and TMA stores (the package's kernel)
};
// Same contract as launch_grouped_gemm_tiled, with m_total <= INT32_MAX (TMA coordinates are
// 32-bit) and c 16-byte aligned. Returns cudaErrorNotSupported on a GPU other than compute
// capability 9.0, or when this library was built without the sm_90a target.
// tile_counter: two 64-bit integers on the device, zero at launch, where the warp-specialized
// kernels' CTAs claim their tiles (dynamic scheduling); the kernel leaves them zero again, so
// launches in order on one stream can share a pair. kTmaRing ignores it (nullptr is fine there).
cudaError_t launch_grouped_gemm_hopper(const __nv_bfloat16* a, const __nv_bfloat16* w, const int32_t* offsets,
                                       __nv_bfloat16* c, int64_t m_total, int32_t num_experts, int32_t n,
                                       int32_t k, HopperKernel kernel, unsigned long long* tile_counter,
                                       cudaStream_t stream);

// The MoE layer's up-projection with its memory traffic fused (sm_90a: the kAsyncStore kernel
// with a gathering producer and a SwiGLU epilogue; same scheduler, offsets and limits as above):
//   act[r] = silu(x[gather[r]] @ Wg_e^T) * (x[gather[r]] @ Wu_e^T)
// for every grouped row r of expert e, where Wg_e / Wu_e are rows 0..I-1 / I..2I-1 of
// w_gate_up[e] [2I, K]. x's rows are read through gather ([m_total] int64 token indices in
// [0, num_tokens)): no permuted copy of x. act is [m_total, I], written for rows offsets[0] ..
// offsets[E] - 1. tile_counter as above.
cudaError_t launch_moe_up_hopper(const __nv_bfloat16* x, int64_t num_tokens, const int64_t* gather,
                                 const __nv_bfloat16* w_gate_up, const int32_t* offsets, __nv_bfloat16* act,
                                 int64_t m_total, int32_t num_experts, int32_t ffn, int32_t k,
                                 unsigned long long* tile_counter, cudaStream_t stream);

// cudaSuccess when the current device can run the Hopper kernels above, else the reason.
cudaError_t grouped_gemm_hopper_supported();

// The weight gradients dW[e] = A[rows of e]^T B[rows of e] ([E, N1, N2], rows offsets[e] ..
// offsets[e + 1]) on sm_90a: one operand ("dense", [dense_rows, N], N = N2 if gather_a else N1)
// read in place, the other ("gathered", rows gather[r]) through the permutation; gather_a says
// which side is gathered. N1 and N2 multiples of 8. accumulate: out[e] += ... instead of =.
// csrc/grouped_wgrad_hopper.cu.
cudaError_t launch_grouped_wgrad_hopper(const __nv_bfloat16* dense, int64_t dense_rows, const __nv_bfloat16* gathered,
                                        const int64_t* gather, bool gather_a, const int32_t* offsets,
                                        __nv_bfloat16* out, int32_t num_experts, int32_t n1, int32_t n2,
                                        bool accumulate, cudaStream_t stream);

cudaError_t grouped_wgrad_hopper_supported();

}  // namespace tilemoe
