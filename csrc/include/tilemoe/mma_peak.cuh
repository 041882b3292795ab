// The mma.sync throughput probe (csrc/mma_peak.cu): host declarations.
#pragma once

#include <cuda_runtime.h>

namespace tilemoe {

constexpr int kMmaPeakThreads = 256;

// FLOPs one launch of `blocks` blocks and `iterations` iterations performs.
double mma_peak_flops(int blocks, int iterations);

// Enqueue the probe; `sink` is a device float[kMmaPeakThreads] it (almost surely) never writes.
cudaError_t launch_mma_peak(float* sink, int blocks, int iterations, cudaStream_t stream);

}  // namespace tilemoe
