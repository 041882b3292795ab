// Lesson 3: IO overlap on Hopper. One grouped GEMM problem, six kernels, each a rung that hides
// more of the memory traffic behind the math; every rung is checked against the fp32 reference
// and timed, and the table says how much time each step removed.
//
//   ./io_overlap                                   # every rung, OLMoE's up-projection at 2048 tokens
//   ./io_overlap --experts 8 --tokens 32768 --n 28672 --k 4096      # Mixtral's, at 16384 tokens
//   ./io_overlap --variant d                       # one rung
//
// The rungs (csrc/grouped_gemm_tiled.cu and csrc/grouped_gemm_hopper.cu; 128 x 256 tiles and the
// same persistent tile scheduler throughout):
//   a  load, then compute: one shared-memory stage; cp.async, wait, mma.sync, repeat (sm_80+)
//   b  double buffering: two stages, the next k-step's copies in flight during this one's math
//   b4 four stages: lesson 2's tiled kernel
//   c  TMA ring + wgmma: the copy engine fills 4 stages, mbarriers say when a stage is full or
//      free, the tensor cores read shared memory directly (sm_90a); the copies are issued by a
//      compute thread
//   d  warp specialization: a producer warp issues the copies, two consumer warpgroups compute
//   e  async store: d, with the epilogue through shared memory and TMA stores (3 stages)
// On a GPU without sm_90a, c-e are listed as skipped.
#include "../02_grouped_gemm/harness.cuh"  // lesson 2's harness: problem, check, timing

#include <cstdio>
#include <string>
#include <vector>

namespace {

struct Rung {
  const char* name;
  const char* what;
  bool needs_hopper;  // sm_90a kernels: skipped elsewhere
  example::Launch launch;
};

example::Launch hopper(tilemoe::HopperKernel kernel) {
  return [kernel](const example::Problem& p, cudaStream_t stream) {
    return tilemoe::launch_grouped_gemm_hopper(p.a, p.w, p.offsets, p.c, p.rows, p.experts, p.n, p.k, kernel,
                                               p.tile_counter, stream);
  };
}

example::Launch pipelined(int stages) {
  return [stages](const example::Problem& p, cudaStream_t stream) {
    return tilemoe::launch_grouped_gemm_pipelined(p.a, p.w, p.offsets, p.c, p.rows, p.experts, p.n, p.k, stages,
                                                  stream);
  };
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<Rung> rungs = {
      {"a", "load, then compute (1 stage, mma.sync)", false, pipelined(1)},
      {"b", "double buffering (2 cp.async stages)", false, pipelined(2)},
      {"b4", "4 cp.async stages (lesson 2's tiled)", false,
       [](const example::Problem& p, cudaStream_t stream) {
         return tilemoe::launch_grouped_gemm_tiled(p.a, p.w, p.offsets, p.c, p.rows, p.experts, p.n, p.k, stream);
       }},
      {"c", "TMA ring + wgmma (4 stages)", true, hopper(tilemoe::HopperKernel::kTmaRing)},
      {"d", "+ warp specialization", true, hopper(tilemoe::HopperKernel::kWarpSpecialized)},
      {"e", "+ async TMA-store epilogue (3 stages)", true, hopper(tilemoe::HopperKernel::kAsyncStore)},
  };
  std::string variant = "all";
  const example::ExtraOption option = {"--variant", "V", "a, b, b4, c, d, e or all (default all): which rungs to run",
                                       &variant};
  const char* what = "io_overlap: the grouped GEMM, one overlap step at a time";
  const example::Options o = example::parse(argc, argv, what, &option);
  bool known = variant == "all";
  for (const Rung& r : rungs) known = known || variant == r.name;
  if (!known) {
    std::fprintf(stderr, "%s: --variant: expected a, b, b4, c, d, e or all, got %s\n", argv[0], variant.c_str());
    return 2;
  }

  example::Setup s = example::make_problem(o, what);
  const bool hopper_ok = tilemoe::grouped_gemm_hopper_supported() == cudaSuccess;
  (void)cudaGetLastError();
  bool all_ok = true;
  struct Row {
    std::string name, what, result;
    bool ran;
    float ms;
  };
  std::vector<Row> rows;
  for (const Rung& r : rungs) {
    if (variant != "all" && variant != r.name) continue;
    if (r.needs_hopper && !hopper_ok) {
      rows.push_back({r.name, r.what, "skipped: needs an sm_90a build on compute capability 9.0", false, 0.f});
      continue;
    }
    std::printf("%-3s %s: ", r.name, r.what);
    const bool ok = example::check(s, r.launch);
    all_ok = all_ok && ok;
    const example::Timing t = example::time_ms(s, r.launch, o.reps);
    rows.push_back({r.name, r.what, ok ? "PASS" : "FAIL", true, t.median_ms});
  }

  // The table: each rung's time, its rate, and what it removed from the rung above it.
  std::printf("\n%-4s %-42s %10s %9s %14s  %s\n", "rung", "kernel", "ms", "TFLOP/s", "removed (ms)", "check");
  const Row* above = nullptr;
  for (const Row& r : rows) {
    if (!r.ran) {
      std::printf("%-4s %-42s %10s %9s %14s  %s\n", r.name.c_str(), r.what.c_str(), "-", "-", "-", r.result.c_str());
      continue;
    }
    char removed[32] = "-";
    if (above != nullptr) std::snprintf(removed, sizeof(removed), "%.4f", above->ms - r.ms);
    std::printf("%-4s %-42s %10.4f %9.1f %14s  %s\n", r.name.c_str(), r.what.c_str(), r.ms, example::tflops(s.p, r.ms),
                removed, r.result.c_str());
    above = &r;
  }
  example::release(s);
  return all_ok ? 0 : 1;
}
