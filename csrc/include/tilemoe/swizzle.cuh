// The XOR swizzle the chapter's shared-memory tiles use (device code, nvcc).
#pragma once

#include <cuda_bf16.h>

namespace tilemoe {

// Element offset of (row, col) in a row-major [rows][kCols] bf16 tile whose 16-byte chunks are
// XOR-swizzled by row % 8: the 8 rows an ldmatrix or a fragment store touches land in 8 different
// bank groups. With kCols = 64 (128-byte rows) it is the layout TMA's 128-byte swizzle writes and
// reads, and wgmma's descriptors describe.
template <int kCols>
__device__ __forceinline__ int swizzled(int row, int col) {
  return row * kCols + (((col >> 3) ^ (row & 7)) << 3) + (col & 7);
}

// A staged epilogue's store of one piece of a wgmma accumulator fragment: columns 8 j + col and
// col + 1 of rows row and row + 8 (v0, v1 and v2, v3, rounded to bf16) into 64-column boxes of
// 64 rows (box j / 8 of `boxes`, 128-byte swizzled rows, as a TMA store reads them).
__device__ __forceinline__ void stage_fragment(__nv_bfloat16* boxes, int j, int row, int col, float v0, float v1,
                                               float v2, float v3) {
  __nv_bfloat16* box = boxes + (j / 8) * 64 * 64;
  const int box_col = (j % 8) * 8 + col;
  *reinterpret_cast<__nv_bfloat162*>(box + swizzled<64>(row, box_col)) = __floats2bfloat162_rn(v0, v1);
  *reinterpret_cast<__nv_bfloat162*>(box + swizzled<64>(row + 8, box_col)) = __floats2bfloat162_rn(v2, v3);
}

}  // namespace tilemoe
