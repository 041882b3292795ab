// The sequential baseline of the grouped GEMM: a loop over experts on the host, one launch each.
//
// What it shows: the textbook shared-memory tiled GEMM (each 32x32 tile of A and W staged in
// shared memory once, reused 32 times from there) is correct on ragged experts, but the MoE
// structure costs it twice: the host must know every expert's row count before it can size a
// launch (a device-to-host copy and a synchronization per forward), and E small launches leave
// most of the GPU idle when an expert has few rows. It uses fp32 FMAs, no tensor cores.
#include "tilemoe/grouped_gemm.cuh"

namespace tilemoe {
namespace {

constexpr int kTile = 32;        // a 32x32 output tile per block
constexpr int kRowsPerPass = 8;  // 32x8 threads: each thread computes 4 rows of one column

__global__ void __launch_bounds__(kTile * kRowsPerPass)
    naive_expert_gemm(const __nv_bfloat16* __restrict__ a, const __nv_bfloat16* __restrict__ w,
                      __nv_bfloat16* __restrict__ c, int rows, int n, int k) {
  // +1 column: thread tx reads w_tile[tx][kk], 32 different rows at one column; without the
  // padding they would all hit the same shared-memory bank.
  __shared__ float a_tile[kTile][kTile + 1];
  __shared__ float w_tile[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int row0 = blockIdx.x * kTile, col0 = blockIdx.y * kTile;
  float acc[kTile / kRowsPerPass] = {};

  for (int k0 = 0; k0 < k; k0 += kTile) {
    // Stage both tiles, converting bf16 to fp32 once; zeros pad the edges.
    for (int i = ty; i < kTile; i += kRowsPerPass) {
      const int kk = k0 + tx;
      const int r = row0 + i, col = col0 + i;
      a_tile[i][tx] = (r < rows && kk < k) ? __bfloat162float(a[static_cast<int64_t>(r) * k + kk]) : 0.f;
      w_tile[i][tx] = (col < n && kk < k) ? __bfloat162float(w[static_cast<int64_t>(col) * k + kk]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTile; ++kk) {
      const float b = w_tile[tx][kk];
#pragma unroll
      for (int j = 0; j < kTile / kRowsPerPass; ++j) acc[j] += a_tile[ty + j * kRowsPerPass][kk] * b;
    }
    __syncthreads();  // the next pass overwrites the tiles
  }
  const int col = col0 + tx;
  if (col >= n) return;
#pragma unroll
  for (int j = 0; j < kTile / kRowsPerPass; ++j) {
    const int r = row0 + ty + j * kRowsPerPass;
    if (r < rows) c[static_cast<int64_t>(r) * n + col] = __float2bfloat16(acc[j]);
  }
}

}  // namespace

cudaError_t launch_grouped_gemm_naive(const __nv_bfloat16* a, const __nv_bfloat16* w,
                                      const int32_t* host_offsets, __nv_bfloat16* c,
                                      int32_t num_experts, int32_t n, int32_t k, cudaStream_t stream) {
  if (num_experts < 1 || n <= 0 || k <= 0 || n % 8 || k % 8 || host_offsets == nullptr) {
    return cudaErrorInvalidValue;
  }
  const dim3 block(kTile, kRowsPerPass);
  for (int e = 0; e < num_experts; ++e) {
    const int64_t start = host_offsets[e], rows = host_offsets[e + 1] - start;
    if (rows < 0) return cudaErrorInvalidValue;
    if (rows == 0) continue;  // an empty expert costs nothing but this check
    // Rows go in grid.x (up to 2^31 - 1 blocks), columns in grid.y (up to 65535 * 32 = 2M).
    const dim3 grid(static_cast<unsigned>((rows + kTile - 1) / kTile), (n + kTile - 1) / kTile);
    naive_expert_gemm<<<grid, block, 0, stream>>>(a + start * k, w + static_cast<int64_t>(e) * n * k,
                                                   c + start * n, static_cast<int>(rows), n, k);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace tilemoe
