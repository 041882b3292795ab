// Lesson 2, step 1: the sequential baseline. One launch per expert of a shared-memory tiled GEMM
// (csrc/grouped_gemm_naive.cu), fp32 FMAs, no tensor cores.
//
//   ./grouped_gemm_naive --experts 64 --tokens 16384 --n 2048 --k 2048 --skew 1.2
//
// Watch two costs that have nothing to do with arithmetic: the host needs every expert's row count
// before launching (here it has them; in a model it must copy them back from the GPU and wait),
// and an expert with few rows launches a grid too small to fill the GPU.
#include "harness.cuh"

int main(int argc, char** argv) {
  return example::run_example(argc, argv, "grouped_gemm_naive: one launch per expert, fp32 FMAs",
                              [](const example::Problem& p, cudaStream_t stream) {
                                return tilemoe::launch_grouped_gemm_naive(p.a, p.w, p.host_offsets.data(), p.c,
                                                                          p.experts, p.n, p.k, stream);
                              });
}
