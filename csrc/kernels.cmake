# The CUDA kernels as one static library, tilemoe_kernels: included by the top-level
# CMakeLists.txt (for the Python module and the examples) and by an example folder built on its own.
#
# Default targets: A100 (sm_80, plus PTX for newer GPUs), H100/H200 (sm_90a: wgmma/TMA),
# B200 (sm_100a: tcgen05). Must be set before enable_language(CUDA), which otherwise picks the
# compiler's default. Override with -DCMAKE_CUDA_ARCHITECTURES=90a or the CUDAARCHS env variable.
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
  set(CMAKE_CUDA_ARCHITECTURES "80;90a;100a")
endif()
# Release unless told otherwise: optimized host code for a plain `cmake -B build`.
if(NOT CMAKE_BUILD_TYPE AND NOT CMAKE_CONFIGURATION_TYPES)
  set(CMAKE_BUILD_TYPE Release CACHE STRING "Build type" FORCE)
endif()
enable_language(CXX CUDA)
set(CMAKE_CXX_STANDARD 17)
set(CMAKE_CUDA_STANDARD 17)
# Link libcudart_static.a: a program or module then never searches for libcudart.so (torch's copy
# may be another version, or absent); it only needs the driver, libcuda.so.
set(CMAKE_CUDA_RUNTIME_LIBRARY Static)
find_package(CUDAToolkit REQUIRED)

add_library(tilemoe_kernels STATIC
  ${CMAKE_CURRENT_LIST_DIR}/expert_counts.cu
  ${CMAKE_CURRENT_LIST_DIR}/grouped_gemm_hopper.cu
  ${CMAKE_CURRENT_LIST_DIR}/grouped_gemm_naive.cu
  ${CMAKE_CURRENT_LIST_DIR}/grouped_gemm_tiled.cu
  ${CMAKE_CURRENT_LIST_DIR}/grouped_wgrad_hopper.cu
  ${CMAKE_CURRENT_LIST_DIR}/mma_peak.cu)
target_include_directories(tilemoe_kernels PUBLIC ${CMAKE_CURRENT_LIST_DIR}/include)
target_link_libraries(tilemoe_kernels PUBLIC CUDA::cudart_static)
set_target_properties(tilemoe_kernels PROPERTIES POSITION_INDEPENDENT_CODE ON)
# -lineinfo: Nsight Compute can map each SASS instruction back to a source line (no speed cost).
target_compile_options(tilemoe_kernels PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-lineinfo>)
