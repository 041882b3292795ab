// The harness the grouped-GEMM programs share (lesson 2's two, lesson 3's ladder): arguments,
// ragged expert sizes, random data, an fp32 reference on the GPU, an every-element check and
// CUDA-event timing. A lesson 2 program is its kernel's launch and one call to run_example();
// lesson 3's checks and times several launches on one problem (make_problem, check, time_ms).
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "tilemoe/grouped_gemm.cuh"

namespace example {

#define CUDA_CHECK(call)                                                                     \
  do {                                                                                       \
    const cudaError_t err_ = (call);                                                         \
    if (err_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(2);                                                                          \
    }                                                                                        \
  } while (0)

struct Options {
  int experts = 64, tokens = 16384, n = 2048, k = 2048;  // OLMoE's up-projection at 2048 tokens x top-8
  double skew = 0.0;
  int reps = 20;
  unsigned seed = 0;
};

// The problem as the kernels see it (DESIGN.md's layout), plus the host's copy of the offsets.
struct Problem {
  int experts, n, k;
  int64_t rows;
  std::vector<int32_t> host_offsets;  // E + 1
  const __nv_bfloat16* a;             // [rows, k]
  const __nv_bfloat16* w;             // [experts, n, k]
  const int32_t* offsets;             // device copy of host_offsets
  __nv_bfloat16* c;                   // [rows, n]
  unsigned long long* tile_counter;   // [2], zeroed: the Hopper kernels' dynamic tile scheduler
};

using Launch = std::function<cudaError_t(const Problem&, cudaStream_t)>;

// A program's own option: its name, its value's placeholder, its help line and where its value goes.
struct ExtraOption {
  const char* name;
  const char* metavar;
  const char* help;
  std::string* value;
};

inline void usage(const char* program, const char* what, const ExtraOption* extra) {
  std::string extra_usage, extra_help;
  if (extra != nullptr) {
    extra_usage = std::string(" [") + extra->name + " " + extra->metavar + "]";
    extra_help = std::string("  ") + extra->name + " " + extra->metavar + "  " + extra->help + "\n";
  }
  std::printf(
      "%s: %s\n\n"
      "usage: %s [--experts E] [--tokens M] [--n N] [--k K] [--skew S] [--reps R] [--seed X]%s\n"
      "  --experts E  experts (default 64)\n"
      "  --tokens M   rows of A: routed token-expert pairs, tokens x top-k (default 16384)\n"
      "  --n N        output columns, a multiple of 8 (default 2048)\n"
      "  --k K        reduction length, a multiple of 8 (default 2048)\n"
      "  --skew S     expert e gets a share of rows proportional to (e + 1)^-S: 0 is balanced\n"
      "               (rows still drawn at random, so sizes are ragged), 1.5 leaves most experts\n"
      "               nearly empty and some empty (default 0)\n"
      "  --reps R     timed runs, the median reported (default 20; after 3, it stops once 1 s is spent)\n"
      "  --seed X     random seed (default 0)\n"
      "%s"
      "Checks every element against an fp32 reference; exits 1 on a wrong result.\n",
      program, what, program, extra_usage.c_str(), extra_help.c_str());
}

inline Options parse(int argc, char** argv, const char* what, const ExtraOption* extra = nullptr) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      usage(argv[0], what, extra);
      std::exit(0);
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "%s: %s needs a value (see --help)\n", argv[0], arg.c_str());
      std::exit(2);
    }
    const char* value = argv[++i];
    // The whole value must be a number: "--tokens 1e5" or "--tokens abc" is an error, not 1 or 0.
    auto integer = [&]() {
      char* end = nullptr;
      const long v = std::strtol(value, &end, 10);
      if (end == value || *end != '\0' || v < INT32_MIN || v > INT32_MAX) {
        std::fprintf(stderr, "%s: %s: expected an integer, got %s\n", argv[0], arg.c_str(), value);
        std::exit(2);
      }
      return static_cast<int>(v);
    };
    if (arg == "--experts") o.experts = integer();
    else if (arg == "--tokens") o.tokens = integer();
    else if (arg == "--n") o.n = integer();
    else if (arg == "--k") o.k = integer();
    else if (arg == "--reps") o.reps = integer();
    else if (arg == "--seed") o.seed = static_cast<unsigned>(integer());
    else if (extra && arg == extra->name) *extra->value = value;
    else if (arg == "--skew") {
      char* end = nullptr;
      o.skew = std::strtod(value, &end);
      if (end == value || *end != '\0') {
        std::fprintf(stderr, "%s: --skew: expected a number, got %s\n", argv[0], value);
        std::exit(2);
      }
    } else {
      std::fprintf(stderr, "%s: unknown argument %s (see --help)\n", argv[0], arg.c_str());
      std::exit(2);
    }
  }
  auto bad = [&](const char* name, const char* expected, double got) {
    std::fprintf(stderr, "%s: %s: expected %s, got %g\n", argv[0], name, expected, got);
    std::exit(2);
  };
  if (o.experts < 1 || o.experts > tilemoe::kGroupedGemmMaxExperts) bad("--experts", "1 to 1024", o.experts);
  if (o.tokens < 0) bad("--tokens", "an int >= 0", o.tokens);
  if (o.n <= 0 || o.n % 8) bad("--n", "a positive multiple of 8", o.n);
  if (o.k <= 0 || o.k % 8) bad("--k", "a positive multiple of 8", o.k);
  if (!(o.skew >= 0)) bad("--skew", "a number >= 0", o.skew);
  if (o.reps < 1) bad("--reps", "an int >= 1", o.reps);
  return o;
}

// Rows per expert: each row picks an expert with probability proportional to (e + 1)^-skew.
inline std::vector<int32_t> expert_offsets(const Options& o) {
  std::vector<double> cdf(o.experts);
  double total = 0;
  for (int e = 0; e < o.experts; ++e) cdf[e] = (total += std::pow(e + 1.0, -o.skew));
  std::vector<int32_t> counts(o.experts, 0);
  uint64_t state = 0x9E3779B97F4A7C15ull ^ o.seed;
  for (int r = 0; r < o.tokens; ++r) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;  // a 64-bit LCG
    const double u = static_cast<double>(state >> 11) / 9007199254740992.0 * total;
    const int e = static_cast<int>(std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
    ++counts[std::min(e, o.experts - 1)];
  }
  std::vector<int32_t> offsets(o.experts + 1, 0);
  for (int e = 0; e < o.experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
  return offsets;
}

// Uniform values in [-scale, scale) from a hash of the index: reproducible, no RNG state.
__global__ void fill_uniform(__nv_bfloat16* x, int64_t count, float scale, unsigned seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ static_cast<uint32_t>(i >> 32) ^ (seed * 40503u);
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
    x[i] = __float2bfloat16((static_cast<float>(h) / 4294967296.0f * 2.0f - 1.0f) * scale);
  }
}

// The fp32 reference: one thread per output element, its expert found by binary search.
__global__ void reference_gemm(const __nv_bfloat16* a, const __nv_bfloat16* w, const int32_t* offsets,
                               int experts, int64_t rows, int n, int k, float* ref) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= rows * n) return;
  const int64_t row = idx / n;
  const int col = static_cast<int>(idx % n);
  int lo = 0, hi = experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (offsets[mid + 1] > row) hi = mid; else lo = mid + 1;
  }
  const __nv_bfloat16* ar = a + row * k;
  const __nv_bfloat16* wr = w + (static_cast<int64_t>(lo) * n + col) * k;
  float sum = 0.f;
  for (int i = 0; i < k; ++i) sum += __bfloat162float(ar[i]) * __bfloat162float(wr[i]);
  ref[idx] = sum;
}

// |c - ref| <= 8e-3 |ref| + 2e-3 max|ref| for every element (bf16 rounding of an fp32 sum, plus
// summation order); NaN fails. Counts the failures and keeps the first one's index.
__global__ void count_mismatches(const __nv_bfloat16* c, const float* ref, int64_t count, float max_ref,
                                 unsigned long long* bad, unsigned long long* first) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float got = __bfloat162float(c[i]), want = ref[i];
    if (!(fabsf(got - want) <= 8e-3f * fabsf(want) + 2e-3f * max_ref)) {
      atomicAdd(bad, 1ull);
      atomicMin(first, static_cast<unsigned long long>(i));
    }
  }
}

__global__ void max_abs(const float* x, int64_t count, unsigned* out_bits) {
  float m = 0.f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) m = fmaxf(m, fabsf(x[i]));
  atomicMax(out_bits, __float_as_uint(m));  // non-negative floats order like their bit patterns
}

// The problem on the GPU: ragged offsets from the options, random A and W, C and the reference.
struct Setup {
  Problem p;
  float* ref = nullptr;  // the fp32 reference, filled by the first check
  bool ref_ready = false;
  cudaStream_t stream = nullptr;
};

inline Setup make_problem(const Options& o, const char* what) {
  Setup s;
  Problem& p = s.p;
  p.experts = o.experts;
  p.n = o.n;
  p.k = o.k;
  p.rows = o.tokens;
  p.host_offsets = expert_offsets(o);

  int empty = 0, largest = 0, smallest = o.tokens;
  for (int e = 0; e < o.experts; ++e) {
    const int rows = p.host_offsets[e + 1] - p.host_offsets[e];
    empty += rows == 0;
    largest = std::max(largest, rows);
    smallest = std::min(smallest, rows);
  }
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s\n%s: %d experts, %d rows (min %d, max %d per expert, %d empty), N=%d, K=%d, skew %g\n",
              what, prop.name, o.experts, o.tokens, smallest, largest, empty, o.n, o.k, o.skew);

  __nv_bfloat16 *a, *w, *c;
  int32_t* offsets;
  const int64_t a_count = p.rows * o.k, w_count = static_cast<int64_t>(o.experts) * o.n * o.k;
  const int64_t c_count = p.rows * o.n;
  CUDA_CHECK(cudaMalloc(&a, std::max<int64_t>(a_count, 1) * sizeof(__nv_bfloat16)));
  CUDA_CHECK(cudaMalloc(&w, w_count * sizeof(__nv_bfloat16)));
  CUDA_CHECK(cudaMalloc(&c, std::max<int64_t>(c_count, 1) * sizeof(__nv_bfloat16)));
  CUDA_CHECK(cudaMalloc(&s.ref, std::max<int64_t>(c_count, 1) * sizeof(float)));
  CUDA_CHECK(cudaMalloc(&offsets, (o.experts + 1) * sizeof(int32_t)));
  CUDA_CHECK(cudaMemcpy(offsets, p.host_offsets.data(), (o.experts + 1) * sizeof(int32_t), cudaMemcpyHostToDevice));
  // The kernels leave the counter zero when they finish, so one pair serves every launch here.
  CUDA_CHECK(cudaMalloc(&p.tile_counter, 2 * sizeof(unsigned long long)));
  CUDA_CHECK(cudaMemset(p.tile_counter, 0, 2 * sizeof(unsigned long long)));
  fill_uniform<<<1024, 256>>>(a, a_count, 1.0f, o.seed * 2 + 1);
  fill_uniform<<<1024, 256>>>(w, w_count, 1.0f / std::sqrt(static_cast<float>(o.k)), o.seed * 2 + 2);
  CUDA_CHECK(cudaGetLastError());
  p.a = a;
  p.w = w;
  p.offsets = offsets;
  p.c = c;
  CUDA_CHECK(cudaStreamCreate(&s.stream));
  return s;
}

// Run the kernel once on an output poisoned with NaN (0xFFFF: a row the kernel forgets stays
// NaN) and compare every element with the fp32 reference. Prints the verdict; true when right.
inline bool check(Setup& s, const Launch& launch) {
  const Problem& p = s.p;
  const int64_t c_count = p.rows * p.n;
  CUDA_CHECK(cudaMemsetAsync(p.c, 0xFF, std::max<int64_t>(c_count, 1) * sizeof(__nv_bfloat16), s.stream));
  CUDA_CHECK(launch(p, s.stream));
  if (!s.ref_ready && c_count > 0) {
    reference_gemm<<<static_cast<unsigned>((c_count + 255) / 256), 256, 0, s.stream>>>(p.a, p.w, p.offsets, p.experts,
                                                                                      p.rows, p.n, p.k, s.ref);
    s.ref_ready = true;
  }
  unsigned* max_bits;
  unsigned long long* counters;  // [0]: mismatches, [1]: first mismatch
  CUDA_CHECK(cudaMalloc(&max_bits, sizeof(unsigned)));
  CUDA_CHECK(cudaMalloc(&counters, 2 * sizeof(unsigned long long)));
  CUDA_CHECK(cudaMemsetAsync(max_bits, 0, sizeof(unsigned), s.stream));
  CUDA_CHECK(cudaMemsetAsync(counters, 0, sizeof(unsigned long long), s.stream));
  CUDA_CHECK(cudaMemsetAsync(counters + 1, 0xFF, sizeof(unsigned long long), s.stream));
  max_abs<<<1024, 256, 0, s.stream>>>(s.ref, c_count, max_bits);
  unsigned host_bits = 0;
  CUDA_CHECK(cudaMemcpyAsync(&host_bits, max_bits, sizeof(unsigned), cudaMemcpyDeviceToHost, s.stream));
  CUDA_CHECK(cudaStreamSynchronize(s.stream));
  float max_ref;
  std::memcpy(&max_ref, &host_bits, sizeof(float));
  count_mismatches<<<1024, 256, 0, s.stream>>>(p.c, s.ref, c_count, max_ref, counters, counters + 1);
  unsigned long long host_counters[2];
  CUDA_CHECK(cudaMemcpyAsync(host_counters, counters, sizeof(host_counters), cudaMemcpyDeviceToHost, s.stream));
  CUDA_CHECK(cudaStreamSynchronize(s.stream));
  CUDA_CHECK(cudaGetLastError());
  const bool ok = host_counters[0] == 0;
  if (ok) {
    std::printf("check: all %lld outputs match the fp32 reference\n", static_cast<long long>(c_count));
  } else {
    const unsigned long long i = host_counters[1];
    float want;
    __nv_bfloat16 got;
    CUDA_CHECK(cudaMemcpy(&want, s.ref + i, sizeof(float), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(&got, p.c + i, sizeof(got), cudaMemcpyDeviceToHost));
    std::printf("check: FAILED, %llu of %lld outputs differ; first at row %llu col %llu: got %g, want %g\n",
                host_counters[0], static_cast<long long>(c_count), i / p.n, i % p.n, __bfloat162float(got), want);
  }
  CUDA_CHECK(cudaFree(max_bits));
  CUDA_CHECK(cudaFree(counters));
  return ok;
}

// A warm-up, then up to `reps` runs, each between two events (after 3, stop once 1 s is spent).
struct Timing {
  float median_ms;
  size_t runs;
};

inline Timing time_ms(Setup& s, const Launch& launch, int reps) {
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  CUDA_CHECK(launch(s.p, s.stream));
  std::vector<float> times;
  float spent = 0.f;
  for (int r = 0; r < reps && (r < 3 || spent < 1000.f); ++r) {
    CUDA_CHECK(cudaEventRecord(start, s.stream));
    CUDA_CHECK(launch(s.p, s.stream));
    CUDA_CHECK(cudaEventRecord(stop, s.stream));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
    spent += ms;
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(times.begin(), times.end());
  return {times[times.size() / 2], times.size()};
}

inline double tflops(const Problem& p, float ms) { return 2.0 * static_cast<double>(p.rows) * p.n * p.k / (ms * 1e-3) / 1e12; }

inline void release(Setup& s) {
  for (const void* ptr : {static_cast<const void*>(s.p.a), static_cast<const void*>(s.p.w),
                          static_cast<const void*>(s.p.c), static_cast<const void*>(s.ref),
                          static_cast<const void*>(s.p.offsets), static_cast<const void*>(s.p.tile_counter)}) {
    CUDA_CHECK(cudaFree(const_cast<void*>(ptr)));
  }
  CUDA_CHECK(cudaStreamDestroy(s.stream));
}

// Lesson 2's programs: one kernel, checked then timed.
inline int run_example(int argc, char** argv, const char* what, const Launch& launch) {
  const Options o = parse(argc, argv, what);
  Setup s = make_problem(o, what);
  const bool ok = check(s, launch);
  const Timing t = time_ms(s, launch, o.reps);
  std::printf("time: %.4f ms (median of %zu runs), %.1f TFLOP/s\n", t.median_ms, t.runs, tflops(s.p, t.median_ms));
  release(s);
  return ok ? 0 : 1;
}

}  // namespace example
