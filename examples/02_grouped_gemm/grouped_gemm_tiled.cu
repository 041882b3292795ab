// Lesson 2, step 2: one persistent launch for every expert (csrc/grouped_gemm_tiled.cu): a
// device-side tile scheduler, tensor cores (mma.sync), a cp.async pipeline, an L2-friendly order.
//
//   ./grouped_gemm_tiled --experts 64 --tokens 16384 --n 2048 --k 2048 --skew 1.2
//
// Same arguments and check as grouped_gemm_naive; the offsets stay on the GPU (the kernel reads
// them there), so nothing here waits for the host.
#include "harness.cuh"

int main(int argc, char** argv) {
  return example::run_example(argc, argv, "grouped_gemm_tiled: one persistent tensor-core launch",
                              [](const example::Problem& p, cudaStream_t stream) {
                                return tilemoe::launch_grouped_gemm_tiled(p.a, p.w, p.offsets, p.c, p.rows,
                                                                          p.experts, p.n, p.k, stream);
                              });
}
