// A probe of the tensor cores' mma.sync rate: every warp issues chains of independent
// m16n8k16 bf16 multiplies on registers, no memory traffic at all. Its TFLOP/s is the most any
// kernel built on mma.sync (csrc/grouped_gemm_tiled.cu) can reach on this GPU, measured rather
// than read from a datasheet; on Hopper, wgmma (lesson 3) is the faster path.
#include "tilemoe/mma_peak.cuh"
#include "tilemoe/sm80_instructions.cuh"

namespace tilemoe {
namespace {

constexpr int kChains = 8;  // independent accumulators per warp: enough to cover the mma latency

__global__ void __launch_bounds__(kMmaPeakThreads) mma_peak_kernel(float* sink, int iterations) {
  // Operand bits from the thread index: nothing the compiler can fold away.
  const uint32_t seed = 0x3c003c00u ^ threadIdx.x;
  const uint32_t a[4] = {seed, seed ^ 1u, seed ^ 2u, seed ^ 3u};
  const uint32_t b[2] = {seed ^ 4u, seed ^ 5u};
  float acc[kChains][4];
#pragma unroll
  for (int c = 0; c < kChains; ++c) {  // a different start per chain: no two chains can be merged
    for (int q = 0; q < 4; ++q) acc[c][q] = static_cast<float>(c * 4 + q + threadIdx.x);
  }
  for (int i = 0; i < iterations; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) sm80::mma_bf16(acc[c], a, b);
  }
  float sum = 0.f;
#pragma unroll
  for (int c = 0; c < kChains; ++c) sum += acc[c][0] + acc[c][1] + acc[c][2] + acc[c][3];
  if (sum == -1.2345f) sink[threadIdx.x] = sum;  // never true in practice; keeps the work alive
}

}  // namespace

double mma_peak_flops(int blocks, int iterations) {
  return 2.0 * 16 * 8 * 16 * kChains * static_cast<double>(iterations) * blocks * (kMmaPeakThreads / 32);
}

cudaError_t launch_mma_peak(float* sink, int blocks, int iterations, cudaStream_t stream) {
  if (blocks < 1 || iterations < 1 || sink == nullptr) return cudaErrorInvalidValue;
  mma_peak_kernel<<<blocks, kMmaPeakThreads, 0, stream>>>(sink, iterations);
  return cudaGetLastError();
}

}  // namespace tilemoe
