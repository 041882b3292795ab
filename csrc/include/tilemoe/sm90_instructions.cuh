// The Hopper (sm_90a) instructions lesson 3's kernels are built from, each a short PTX wrapper:
// mbarriers (a shared-memory barrier whose phase completes when its arrivals and its expected
// bytes are in), TMA (cp.async.bulk.tensor: the copy engine moves a whole tile, described by a
// tensor map, and reports the bytes to an mbarrier), wgmma (a warpgroup's asynchronous matrix
// multiply-accumulate reading its operands from shared memory) and setmaxnreg.
//
// Device code only (nvcc). wgmma and setmaxnreg exist only in the sm_90a target: call these from
// code compiled under TILEMOE_SM90A (below), and launch it only on a compute capability 9.0 GPU.
#pragma once

#include <cstdint>

#include <cuda.h>  // CUtensorMap

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TILEMOE_SM90A 1
#endif

namespace tilemoe {
namespace sm90 {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarrier ------------------------------------------------------------------------------
// A phase completes when `count` threads have arrived and every byte announced with expect_tx
// has landed; waiters name the phase by its parity (0, 1, 0, ...).

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)), "r"(count) : "memory");
}

// Make the initialized barriers visible to the copy engine (the async proxy) before first use.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// Arrive, and announce that `bytes` more will land on this barrier in this phase (TMA's count).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(bar)) : "memory");
}

// Arrive on bar once every cp.async this thread has issued so far has landed (noinc: the arrival
// counts against the barrier's expected count, so init it to include one per such thread).
__device__ __forceinline__ void cp_async_mbarrier_arrive_noinc(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(shared_address(bar)) : "memory");
}

// Spin until the phase of this parity has completed. A fresh barrier is in phase 0, and waiting
// for parity 1 (the phase "before" it) returns at once: how a producer finds every slot free.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(shared_address(bar)),
      "r"(parity)
      : "memory");
}

// A position in a ring of kStages shared-memory stages guarded by mbarriers: which stage, and the
// parity of its current lap (what mbarrier_wait waits for).
template <int kStages>
struct RingPosition {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// ---- TMA -----------------------------------------------------------------------------------
// One instruction copies a box of the tensor (the box shape and the swizzle live in the tensor
// map) into shared memory; elements outside the tensor arrive as zeros; the bytes complete on bar.
// Coordinates are in elements, innermost dimension first.

__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int x, int y) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
          shared_address(dst)),
      "l"(map), "r"(shared_address(bar)), "r"(x), "r"(y)
      : "memory");
}

__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int x, int y, int z) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(
          shared_address(dst)),
      "l"(map), "r"(shared_address(bar)), "r"(x), "r"(y), "r"(z)
      : "memory");
}

// Shared memory -> global through the copy engine: the box at (x, y) of the map, from a tile laid
// out (and swizzled) as the map says; parts of the box outside the tensor are not written. The
// copy joins this thread's current bulk group (bulk_commit closes it).
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, const void* src, int x, int y) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(map),
               "r"(shared_address(src)), "r"(x), "r"(y)
               : "memory");
}
// The same through a 3-D map: the box at (x, y, z).
__device__ __forceinline__ void tma_store_3d(const CUtensorMap* map, const void* src, int x, int y, int z) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(map),
               "r"(shared_address(src)), "r"(x), "r"(y), "r"(z)
               : "memory");
}
// The same copy, added into global memory (an element-wise reduction in the map's type, done by
// the memory system): what an accumulating store needs, with no read of the old values by the SM.
__device__ __forceinline__ void tma_reduce_add_3d(const CUtensorMap* map, const void* src, int x, int y, int z) {
  asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(map),
               "r"(shared_address(src)), "r"(x), "r"(y), "r"(z)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Wait until this thread's bulk groups, all but kPending, have read their shared memory (the
// buffer may be rewritten); the global writes may still be in flight.
template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}
// Wait until this thread's bulk groups, all but kPending, are complete.
template <int kPending>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(kPending) : "memory");
}
// Make this thread's ordinary shared-memory writes visible to the copy engine (before a barrier
// and the TMA store that reads them).
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// A barrier for `threads` threads (a multiple of 32) under the id (1-15; 0 is __syncthreads).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- wgmma ---------------------------------------------------------------------------------

// The shared-memory matrix descriptor of a K-major tile written by TMA with the 128-byte swizzle:
// rows of 64 bf16 (128 bytes), 8-row groups 1024 bytes apart (the stride byte offset), base
// 1024-byte aligned. Adding 2 (32 bytes >> 4) moves it 16 elements along K: the hardware applies
// the swizzle to the final address, so the k16 slices of one swizzled row need no other change.
__device__ __forceinline__ uint64_t tile_descriptor(const void* tile) {
  uint64_t desc = (shared_address(tile) & 0x3FFFF) >> 4;  // start address, 16-byte units
  desc |= static_cast<uint64_t>(1) << 16;                  // leading byte offset: unused for this layout
  desc |= static_cast<uint64_t>(1024 >> 4) << 32;          // stride byte offset: 8 rows x 128 bytes
  desc |= static_cast<uint64_t>(1) << 62;                  // layout: 128-byte swizzle
  return desc;
}

// Order this warpgroup's earlier register accesses before the wgmma that follows.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Wait until at most kPending committed groups of this warp are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// The compiler does not know a wgmma writes its accumulators later: after wgmma_wait, pass them
// through this so that no read of them is moved above the wait.
template <int kCount>
__device__ __forceinline__ void fence_accumulators(float (&d)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The descriptor of an MN-major tile (the weight gradients' operands: a k-step is 64 rows of a
// row-major [rows, N] tensor, so M or N is the contiguous direction), stored as TMA's 128-byte
// swizzle writes a box of 64 rows x 64 columns: each 128-byte row holds 64 M (or N) values of one
// k, 8 rows make a 1024-byte swizzle atom. The stride byte offset steps 8 k (one atom, 1024
// bytes); the leading byte offset steps 64 M or N values (the next box, box_bytes on).
__device__ __forceinline__ uint64_t mn_major_descriptor(const void* tile, uint32_t box_bytes) {
  uint64_t desc = (shared_address(tile) & 0x3FFFF) >> 4;
  desc |= static_cast<uint64_t>(box_bytes >> 4) << 16;  // leading byte offset: the next 64 columns
  desc |= static_cast<uint64_t>(1024 >> 4) << 32;       // stride byte offset: the next 8 k
  desc |= static_cast<uint64_t>(1) << 62;               // layout: 128-byte swizzle
  return desc;
}

// d[64 x 256] (+)= A[64 x 16] * B[16 x 256]: A and B from shared memory (descriptors), bf16 in,
// fp32 accumulate. kMNMajor = 0: both K-major (a row of A and a row of W are contiguous along K,
// tile_descriptor); 1: both MN-major (mn_major_descriptor). Issued by a whole warpgroup; thread
// t of it holds rows 16 * (t / 32) + (t % 32) / 4 (+ 8) of d: register 4 j + {0, 1} at columns
// 8 j + 2 (t % 4) + {0, 1}, 4 j + {2, 3} the same columns 8 rows down.
// accumulate = 0 overwrites d (the first k-step of a tile).
template <int kMNMajor = 0>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t a_desc, uint64_t b_desc, int accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p, 1, 1, %131, %131;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(a_desc), "l"(b_desc), "r"(accumulate), "n"(kMNMajor));
}

// Give registers back (the producer warpgroup) or take them (the consumers): the kernel's cap is
// set at launch for all warps alike; these move the budget to the warpgroups that need it.
template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

}  // namespace sm90
}  // namespace tilemoe
