// Per-expert token counts and offsets: the first step of every grouped MoE kernel.
//
// Host-only declarations: this header is included by plain C++ (csrc/bindings.cpp, compiled by the
// host compiler), so it needs nothing but the CUDA runtime types.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace tilemoe {

// Count how many token-slots each expert received and where each expert's rows start.
//
//   topk_ids  device, num_slots int32: the router's choices flattened from [T, K]. An id of -1 is
//             a dropped slot (e.g. over capacity) and is not counted; ids outside [-1, num_experts)
//             are not counted either (the Python wrapper rejects them before launching).
//   counts    device, num_experts int32, written: counts[e] = #slots with id e.
//   offsets   device, num_experts + 1 int32, written: offsets[0] = 0,
//             offsets[e + 1] = offsets[e] + counts[e] (so offsets[num_experts] = #counted slots).
//             Expert e's rows in the expert-sorted layout are offsets[e] .. offsets[e + 1] - 1.
//
// Everything is enqueued on `stream`; no host synchronization, so it is CUDA-graph capturable.
// Valid for 0 <= num_slots <= 2^31 - 1 and num_experts >= 1 (any size; up to ~12k experts the
// histogram lives in shared memory). The caller must have made the pointers' device current.
// Returns cudaErrorInvalidValue for out-of-range sizes, otherwise the launch status.
cudaError_t launch_expert_counts(const int32_t* topk_ids, int64_t num_slots, int32_t num_experts,
                                 int32_t* counts, int32_t* offsets, cudaStream_t stream);

}  // namespace tilemoe
