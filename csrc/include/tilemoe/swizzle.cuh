// The XOR swizzle the chapter's shared-memory tiles use (device code, nvcc).
#pragma once

namespace tilemoe {

// Element offset of (row, col) in a row-major [rows][kCols] bf16 tile whose 16-byte chunks are
// XOR-swizzled by row % 8: the 8 rows an ldmatrix or a fragment store touches land in 8 different
// bank groups. With kCols = 64 (128-byte rows) it is the layout TMA's 128-byte swizzle writes and
// reads, and wgmma's descriptors describe.
template <int kCols>
__device__ __forceinline__ int swizzled(int row, int col) {
  return row * kCols + (((col >> 3) ^ (row & 7)) << 3) + (col & 7);
}

}  // namespace tilemoe
