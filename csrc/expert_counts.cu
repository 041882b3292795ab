// Per-expert counts and offsets (see include/tilemoe/expert_counts.cuh for the contract).
//
// Three steps on one stream, no host synchronization:
//   1. cudaMemsetAsync(counts, 0)   the histogram kernel only adds, so it needs a zeroed start;
//   2. histogram kernel             each block counts its share of the slots, then adds to counts;
//   3. one-block scan kernel        offsets = exclusive prefix sum of counts.
// A grouped GEMM reads offsets to find each expert's rows, so these few microseconds sit on the
// critical path of every MoE layer: they must not stall the host or serialize on global atomics.
#include "tilemoe/expert_counts.cuh"

#include <algorithm>
#include <climits>

namespace tilemoe {
namespace {

constexpr int kHistThreads = 256;
constexpr int kHistBlocksPerSM = 4;  // enough resident warps to hide load latency
constexpr int kMinSlotsPerThread = 4;  // below this, a block's flush costs as much as its counting
constexpr int kScanThreads = 1024;   // one block: 32 warps, 1024 experts per chunk
constexpr int kWarp = 32;
// Default dynamic shared memory limit without an opt-in attribute: 48 KiB = 12288 experts.
constexpr size_t kMaxSharedHistBytes = 48 * 1024;

// Step 2. Why a per-block histogram in shared memory: with E = 8 experts, millions of global
// atomicAdds would all land on 8 addresses and serialize in L2. Shared-memory atomics are
// block-local and fast, and each block then issues at most E global atomics.
// kSharedHist = false (more experts than fit in shared memory) counts straight into global memory;
// with that many experts the addresses are spread out, so contention is low anyway.
template <bool kSharedHist>
__global__ void __launch_bounds__(kHistThreads)
    expert_histogram_kernel(const int32_t* __restrict__ ids, int64_t num_slots,
                            int32_t num_experts, int32_t* __restrict__ counts) {
  extern __shared__ int32_t smem_hist[];
  int32_t* hist = kSharedHist ? smem_hist : counts;
  if constexpr (kSharedHist) {
    for (int32_t e = threadIdx.x; e < num_experts; e += blockDim.x) hist[e] = 0;
    __syncthreads();
  }
  // Grid-stride loop with 64-bit indices: a fixed-size grid (sized to the GPU, not the input)
  // covers any num_slots, and neighbouring threads read neighbouring ids (coalesced loads).
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < num_slots; i += stride) {
    const int32_t id = ids[i];
    // One unsigned compare skips dropped slots (-1 becomes 0xFFFFFFFF) and any id >= num_experts.
    if (static_cast<uint32_t>(id) < static_cast<uint32_t>(num_experts)) atomicAdd(&hist[id], 1);
  }
  if constexpr (kSharedHist) {
    __syncthreads();
    // Flush: skip zeros, so a block that saw few experts issues few global atomics.
    for (int32_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
      if (hist[e] != 0) atomicAdd(&counts[e], hist[e]);
    }
  }
}

// Inclusive scan of one value per lane across a warp: log2(32) = 5 shuffle steps, no shared memory.
__device__ __forceinline__ int32_t warp_inclusive_scan(int32_t v, int lane) {
#pragma unroll
  for (int d = 1; d < kWarp; d *= 2) {
    const int32_t up = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += up;
  }
  return v;
}

// Step 3. One block is plenty: E is at most a few thousand, and the launch latency dominates.
// The block walks counts in chunks of kScanThreads; within a chunk it runs a two-level scan
// (warps, then the warp totals), and `carry` holds the total of all earlier chunks.
// Sums fit int32 because the launcher caps num_slots at 2^31 - 1.
__global__ void __launch_bounds__(kScanThreads)
    exclusive_offsets_kernel(const int32_t* __restrict__ counts, int32_t num_experts,
                             int32_t* __restrict__ offsets) {
  constexpr int kWarps = kScanThreads / kWarp;
  __shared__ int32_t warp_totals[kWarps];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;

  if (threadIdx.x == 0) offsets[0] = 0;
  int32_t carry = 0;  // identical in every thread
  for (int64_t base = 0; base < num_experts; base += kScanThreads) {  // 64-bit: no wrap near 2^31
    const int64_t e = base + threadIdx.x;
    int32_t v = e < num_experts ? counts[e] : 0;
    v = warp_inclusive_scan(v, lane);
    if (lane == kWarp - 1) warp_totals[warp] = v;
    __syncthreads();
    if (warp == 0) warp_totals[lane] = warp_inclusive_scan(warp_totals[lane], lane);  // kWarps == 32
    __syncthreads();
    if (warp > 0) v += warp_totals[warp - 1];
    // The inclusive sum up to expert e is where expert e + 1 starts: write it one slot to the right.
    if (e < num_experts) offsets[e + 1] = carry + v;
    carry += warp_totals[kWarps - 1];
    __syncthreads();  // everyone has read warp_totals before the next chunk overwrites it
  }
}
static_assert(kScanThreads / kWarp == kWarp, "the second scan level uses exactly one warp");

}  // namespace

cudaError_t launch_expert_counts(const int32_t* topk_ids, int64_t num_slots, int32_t num_experts,
                                 int32_t* counts, int32_t* offsets, cudaStream_t stream) {
  // counts and offsets are int32, so more than 2^31 - 1 slots could overflow them.
  if (num_slots < 0 || num_slots > INT32_MAX || num_experts < 1 || num_experts == INT32_MAX ||
      counts == nullptr || offsets == nullptr || (num_slots > 0 && topk_ids == nullptr)) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaMemsetAsync(counts, 0, size_t(num_experts) * sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;

  if (num_slots > 0) {  // a grid of 0 blocks is a launch error; nothing to count anyway
    // Size the grid to the GPU (a host-side attribute query, no synchronization).
    int device = 0, num_sms = 0;
    if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device)) !=
        cudaSuccess) {
      return err;
    }
    // Few slots: fewer blocks, each counting several slots per thread, so the global atomics
    // of the flush (up to E per block) stay well below the number of slots.
    constexpr int64_t kSlotsPerBlock = int64_t(kHistThreads) * kMinSlotsPerThread;
    const int64_t needed = (num_slots + kSlotsPerBlock - 1) / kSlotsPerBlock;
    const int blocks = int(std::min<int64_t>(needed, int64_t(num_sms) * kHistBlocksPerSM));
    const size_t smem = size_t(num_experts) * sizeof(int32_t);
    if (smem <= kMaxSharedHistBytes) {
      expert_histogram_kernel<true>
          <<<blocks, kHistThreads, smem, stream>>>(topk_ids, num_slots, num_experts, counts);
    } else {
      expert_histogram_kernel<false>
          <<<blocks, kHistThreads, 0, stream>>>(topk_ids, num_slots, num_experts, counts);
    }
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  // Runs even when num_slots == 0: offsets must still be written (all zeros).
  exclusive_offsets_kernel<<<1, kScanThreads, 0, stream>>>(counts, num_experts, offsets);
  return cudaGetLastError();
}

}  // namespace tilemoe
