// The pybind11 module tilemoe._C: a thin, torch-free door from Python to the CUDA launchers.
//
// Arguments are plain integers (device pointers from tensor.data_ptr(), sizes, the stream handle
// from torch.cuda.current_stream().cuda_stream), so this module never includes or links PyTorch:
// it keeps working across torch versions. Input checks (dtype, device, shape, id range) live in
// the Python wrapper tilemoe/cuda.py, which is the only intended caller.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "tilemoe/expert_counts.cuh"
#include "tilemoe/grouped_gemm.cuh"
#include "tilemoe/mma_peak.cuh"

#ifndef TILEMOE_CUDA_ARCHS
#define TILEMOE_CUDA_ARCHS "unknown"  // set by CMakeLists.txt from CMAKE_CUDA_ARCHITECTURES
#endif

namespace py = pybind11;

namespace {

// Turn a CUDA error into a Python RuntimeError that says which call failed.
void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("tilemoe._C.") + what + ": " + cudaGetErrorName(err) +
                             ": " + cudaGetErrorString(err));
  }
}

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tilemoe CUDA kernels (raw pointers in, no PyTorch linkage); use tilemoe.cuda instead";

  m.def(
      "expert_counts",
      [](std::uintptr_t topk_ids_ptr, int64_t num_slots, int32_t num_experts,
         std::uintptr_t counts_ptr, std::uintptr_t offsets_ptr, std::uintptr_t stream,
         int device) {
        // This module carries its own (static) CUDA runtime, whose current device is separate
        // from torch's: select the tensors' device explicitly on every call.
        check(cudaSetDevice(device), "expert_counts: cudaSetDevice");
        check(tilemoe::launch_expert_counts(as_ptr<const int32_t>(topk_ids_ptr), num_slots,
                                            num_experts, as_ptr<int32_t>(counts_ptr),
                                            as_ptr<int32_t>(offsets_ptr),
                                            reinterpret_cast<cudaStream_t>(stream)),
              "expert_counts");
      },
      py::arg("topk_ids_ptr"), py::arg("num_slots"), py::arg("num_experts"),
      py::arg("counts_ptr"), py::arg("offsets_ptr"), py::arg("stream"), py::arg("device"),
      // Launching is asynchronous and brief, but let other Python threads run meanwhile.
      py::call_guard<py::gil_scoped_release>(),
      "Enqueue counts[e] = #(topk_ids == e) and offsets = exclusive cumsum (E + 1 entries) on "
      "`stream`. Raw int32 device pointers; no checks beyond sizes. Raises RuntimeError on a "
      "CUDA error.");

  m.def(
      "grouped_gemm_naive",
      [](std::uintptr_t a_ptr, std::uintptr_t w_ptr, const std::vector<int32_t>& host_offsets,
         std::uintptr_t c_ptr, int32_t n, int32_t k, std::uintptr_t stream, int device) {
        check(cudaSetDevice(device), "grouped_gemm_naive: cudaSetDevice");
        const int32_t num_experts = static_cast<int32_t>(host_offsets.size()) - 1;
        check(tilemoe::launch_grouped_gemm_naive(
                  as_ptr<const __nv_bfloat16>(a_ptr), as_ptr<const __nv_bfloat16>(w_ptr),
                  host_offsets.data(), as_ptr<__nv_bfloat16>(c_ptr), num_experts, n, k,
                  reinterpret_cast<cudaStream_t>(stream)),
              "grouped_gemm_naive");
      },
      py::arg("a_ptr"), py::arg("w_ptr"), py::arg("host_offsets"), py::arg("c_ptr"), py::arg("n"),
      py::arg("k"), py::arg("stream"), py::arg("device"), py::call_guard<py::gil_scoped_release>(),
      "Enqueue one launch per non-empty expert: c[s:t] = a[s:t] @ w[e]^T (bf16, raw pointers), "
      "with s, t = host_offsets[e], host_offsets[e + 1] (a list of E + 1 ints).");

  m.def(
      "grouped_gemm_tiled",
      [](std::uintptr_t a_ptr, std::uintptr_t w_ptr, std::uintptr_t offsets_ptr, std::uintptr_t c_ptr,
         int64_t m_total, int32_t num_experts, int32_t n, int32_t k, std::uintptr_t stream, int device) {
        check(cudaSetDevice(device), "grouped_gemm_tiled: cudaSetDevice");
        check(tilemoe::launch_grouped_gemm_tiled(
                  as_ptr<const __nv_bfloat16>(a_ptr), as_ptr<const __nv_bfloat16>(w_ptr),
                  as_ptr<const int32_t>(offsets_ptr), as_ptr<__nv_bfloat16>(c_ptr), m_total,
                  num_experts, n, k, reinterpret_cast<cudaStream_t>(stream)),
              "grouped_gemm_tiled");
      },
      py::arg("a_ptr"), py::arg("w_ptr"), py::arg("offsets_ptr"), py::arg("c_ptr"), py::arg("m_total"),
      py::arg("num_experts"), py::arg("n"), py::arg("k"), py::arg("stream"), py::arg("device"),
      py::call_guard<py::gil_scoped_release>(),
      "Enqueue the persistent tensor-core grouped GEMM: c[s:t] = a[s:t] @ w[e]^T for every expert, "
      "offsets (E + 1 int32) read on the device; no host sync.");

  m.def(
      "grouped_gemm_hopper",
      [](std::uintptr_t a_ptr, std::uintptr_t w_ptr, std::uintptr_t offsets_ptr, std::uintptr_t c_ptr,
         int64_t m_total, int32_t num_experts, int32_t n, int32_t k, std::uintptr_t tile_counter_ptr,
         std::uintptr_t stream, int device) {
        check(cudaSetDevice(device), "grouped_gemm_hopper: cudaSetDevice");
        check(tilemoe::launch_grouped_gemm_hopper(
                  as_ptr<const __nv_bfloat16>(a_ptr), as_ptr<const __nv_bfloat16>(w_ptr),
                  as_ptr<const int32_t>(offsets_ptr), as_ptr<__nv_bfloat16>(c_ptr), m_total, num_experts, n, k,
                  tilemoe::HopperKernel::kAsyncStore, as_ptr<unsigned long long>(tile_counter_ptr),
                  reinterpret_cast<cudaStream_t>(stream)),
              "grouped_gemm_hopper");
      },
      py::arg("a_ptr"), py::arg("w_ptr"), py::arg("offsets_ptr"), py::arg("c_ptr"), py::arg("m_total"),
      py::arg("num_experts"), py::arg("n"), py::arg("k"), py::arg("tile_counter_ptr"), py::arg("stream"),
      py::arg("device"), py::call_guard<py::gil_scoped_release>(),
      "Enqueue the sm_90a grouped GEMM (TMA, mbarrier ring, wgmma, warp-specialized, TMA-store "
      "epilogue, tiles claimed from tile_counter: two zeroed int64 on the device); same contract as "
      "grouped_gemm_tiled with c 16-byte aligned. Raises RuntimeError (cudaErrorNotSupported) off sm_90a.");

  m.def(
      "moe_up_hopper",
      [](std::uintptr_t x_ptr, int64_t num_tokens, std::uintptr_t gather_ptr, std::uintptr_t w_ptr,
         std::uintptr_t offsets_ptr, std::uintptr_t act_ptr, int64_t m_total, int32_t num_experts, int32_t ffn,
         int32_t k, std::uintptr_t tile_counter_ptr, std::uintptr_t stream, int device) {
        check(cudaSetDevice(device), "moe_up_hopper: cudaSetDevice");
        check(tilemoe::launch_moe_up_hopper(as_ptr<const __nv_bfloat16>(x_ptr), num_tokens,
                                            as_ptr<const int64_t>(gather_ptr), as_ptr<const __nv_bfloat16>(w_ptr),
                                            as_ptr<const int32_t>(offsets_ptr), as_ptr<__nv_bfloat16>(act_ptr),
                                            m_total, num_experts, ffn, k, as_ptr<unsigned long long>(tile_counter_ptr),
                                            reinterpret_cast<cudaStream_t>(stream)),
              "moe_up_hopper");
      },
      py::arg("x_ptr"), py::arg("num_tokens"), py::arg("gather_ptr"), py::arg("w_ptr"), py::arg("offsets_ptr"),
      py::arg("act_ptr"), py::arg("m_total"), py::arg("num_experts"), py::arg("ffn"), py::arg("k"),
      py::arg("tile_counter_ptr"), py::arg("stream"), py::arg("device"), py::call_guard<py::gil_scoped_release>(),
      "Enqueue the sm_90a up-projection: act[r] = silu(x[gather[r]] @ Wg^T) * (x[gather[r]] @ Wu^T) per "
      "expert segment (w [E, 2I, K]: gate rows, then up rows); tile_counter as grouped_gemm_hopper's.");

  m.def(
      "grouped_wgrad_hopper",
      [](std::uintptr_t dense_ptr, int64_t dense_rows, std::uintptr_t gathered_ptr, std::uintptr_t gather_ptr,
         bool gather_a, std::uintptr_t offsets_ptr, std::uintptr_t out_ptr, int32_t num_experts, int32_t n1,
         int32_t n2, bool accumulate, std::uintptr_t stream, int device) {
        check(cudaSetDevice(device), "grouped_wgrad_hopper: cudaSetDevice");
        check(tilemoe::launch_grouped_wgrad_hopper(as_ptr<const __nv_bfloat16>(dense_ptr), dense_rows,
                                                   as_ptr<const __nv_bfloat16>(gathered_ptr),
                                                   as_ptr<const int64_t>(gather_ptr), gather_a,
                                                   as_ptr<const int32_t>(offsets_ptr), as_ptr<__nv_bfloat16>(out_ptr),
                                                   num_experts, n1, n2, accumulate, reinterpret_cast<cudaStream_t>(stream)),
              "grouped_wgrad_hopper");
      },
      py::arg("dense_ptr"), py::arg("dense_rows"), py::arg("gathered_ptr"), py::arg("gather_ptr"), py::arg("gather_a"),
      py::arg("offsets_ptr"), py::arg("out_ptr"), py::arg("num_experts"), py::arg("n1"), py::arg("n2"),
      py::arg("accumulate"), py::arg("stream"), py::arg("device"), py::call_guard<py::gil_scoped_release>(),
      "Enqueue the sm_90a weight gradients: out[e] = A[rows of e]^T B[rows of e] ([E, N1, N2]), one operand "
      "read in place (dense, [dense_rows, N]), the other through gather (A's side if gather_a, else B's); "
      "with accumulate, out[e] += the same.");

  m.def(
      "grouped_gemm_hopper_supported",
      [](int device) {
        check(cudaSetDevice(device), "grouped_gemm_hopper_supported: cudaSetDevice");
        return tilemoe::grouped_gemm_hopper_supported() == cudaSuccess &&
               tilemoe::grouped_wgrad_hopper_supported() == cudaSuccess;
      },
      py::arg("device"),
      "True when `device` can run the Hopper kernels (grouped_gemm_hopper, moe_up_hopper, grouped_wgrad_hopper): "
      "compute capability 9.0 and a build with 90a.");

  m.def("grouped_gemm_max_experts", [] { return tilemoe::kGroupedGemmMaxExperts; },
        "Most experts the tiled grouped GEMM takes (its tile prefix sum lives in shared memory).");

  m.def(
      "mma_peak",
      [](std::uintptr_t sink_ptr, int blocks, int iterations, std::uintptr_t stream, int device) {
        check(cudaSetDevice(device), "mma_peak: cudaSetDevice");
        check(tilemoe::launch_mma_peak(as_ptr<float>(sink_ptr), blocks, iterations,
                                       reinterpret_cast<cudaStream_t>(stream)),
              "mma_peak");
      },
      py::arg("sink_ptr"), py::arg("blocks"), py::arg("iterations"), py::arg("stream"), py::arg("device"),
      py::call_guard<py::gil_scoped_release>(),
      "Enqueue the mma.sync throughput probe (register-only bf16 m16n8k16 chains); sink: a device "
      "float[mma_peak_threads()].");
  m.def("mma_peak_flops", &tilemoe::mma_peak_flops, py::arg("blocks"), py::arg("iterations"),
        "FLOPs of one mma_peak launch.");
  m.def("mma_peak_threads", [] { return tilemoe::kMmaPeakThreads; }, "Threads per block of the probe.");

  m.def(
      "cuda_archs", [] { return std::string(TILEMOE_CUDA_ARCHS); },
      "CMAKE_CUDA_ARCHITECTURES this module was compiled for, e.g. '80;90a;100a'.");
  m.def(
      "cuda_runtime_version", [] { return CUDART_VERSION; },
      "CUDA runtime version linked into this module (CUDART_VERSION, e.g. 13000 for 13.0).");
  m.def(
      "cuda_driver_version",
      [] {
        int version = 0;  // 0 when no driver is installed; needs no GPU and creates no context
        cudaDriverGetVersion(&version);
        return version;
      },
      "CUDA version the installed driver supports (e.g. 12080 for 12.8), 0 without a driver. "
      "The runtime linked here needs a driver of at least the same major version.");
}
