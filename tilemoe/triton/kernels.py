"""The Triton kernels of the fast path: a tile schedule, and one grouped GEMM used three ways.

An MoE layer's experts are two grouped GEMMs over the token-slots sorted by expert
(``Routing.sorted_slots``): row r of the grouped matrix belongs to expert e when
offsets[e] <= r < offsets[e+1]. Each kernel program computes one BLOCK_M x BLOCK_N output tile, and
a tile never mixes experts: every expert's rows are cut into ceil(count_e / BLOCK_M) row blocks.

``schedule_kernel`` turns the per-expert counts into that list of row blocks on the GPU (no host
sync): for block b, the expert it belongs to and the grouped row it starts at. The number of
blocks is data-dependent, so the GEMM is launched for an upper bound and the surplus programs
return at once (or, persistent, never pick up a tile past the real count).

``grouped_gemm_kernel`` then computes C_e = A_e @ W_e^T for every expert segment, W in the
nn.Linear [E, N, K] layout, with three optional fusions chosen by constexpr flags:

- GATHER_A: row r of A is x[sorted_tokens[r]]: the up-projection reads tokens through the
  permutation, so no permuted copy of x is ever written.
- SWIGLU: two accumulators, gate (W rows 0..N-1) and up (rows N..2N-1); the epilogue writes
  silu(gate) * up, and the pre-activation [gate | up] too when STORE_PRE (what a backward needs).
- SCATTER_C: the down-projection multiplies row r by its slot's routing weight and writes it to
  the slot's own row, sorted_slots[r], of a [T*K, N] output: the combine is then a plain sum of
  each token's K consecutive rows (deterministic, no atomics).

``combine_kernel`` is that sum. Slots that no expert kept (capacity drops, the -1 padding of token
rounding) were never written: it skips them by their id instead of reading zeros someone wrote.
It also takes rows in expert order, unweighted (backend "cuda"'s plain down-projection): it then
reads each slot's row through the inverse permutation and weights it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def schedule_kernel(counts_ptr, offsets_ptr, block_expert_ptr, block_row_ptr, num_blocks_ptr,
                    num_experts, max_blocks,
                    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    """Row blocks of every expert, in expert order: block b -> (expert, first grouped row).

    Blocks past the real number (which is written to num_blocks_ptr) get expert -1. Each
    program recomputes the tiny prefix sum over the E experts and fills BLOCK_B entries.
    """
    e = tl.arange(0, BLOCK_E)
    in_range = e < num_experts
    counts = tl.load(counts_ptr + e, mask=in_range, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    tile_start = tile_end - tiles
    total = tl.sum(tiles, 0)
    # Grouped row of each expert's block 0, shifted so that block b's row is base[e] + b * BLOCK_M.
    base = tl.load(offsets_ptr + e, mask=in_range, other=0) - tile_start * BLOCK_M

    pid = tl.program_id(0)
    if pid == 0:
        tl.store(num_blocks_ptr, total)
    b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    # expert of block b = how many experts end at or before b (empty experts end where they start)
    ends_before = (tile_end[None, :] <= b[:, None]) & in_range[None, :]
    expert = tl.sum(ends_before.to(tl.int32), axis=1)
    mine = e[None, :] == expert[:, None]
    row = tl.sum(tl.where(mine, base[None, :], 0), axis=1) + b * BLOCK_M
    active = b < total
    tl.store(block_expert_ptr + b, tl.where(active, expert, -1), mask=b < max_blocks)
    tl.store(block_row_ptr + b, tl.where(active, row, 0), mask=b < max_blocks)


@triton.jit
def grouped_gemm_kernel(
    a_ptr, w_ptr, c_ptr, pre_ptr,
    gather_ptr, scatter_ptr, scale_ptr,
    block_expert_ptr, block_row_ptr, offsets_ptr, num_blocks_ptr,
    N, K,
    stride_am, stride_we, stride_wn, stride_cm, stride_pm,
    NUM_PROGRAMS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GATHER_A: tl.constexpr, SWIGLU: tl.constexpr, STORE_PRE: tl.constexpr, SCATTER_C: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, A_TMA: tl.constexpr, W_TMA: tl.constexpr,
    FLATTEN: tl.constexpr, ROWS_FULL: tl.constexpr, EVEN_N: tl.constexpr,
):
    """C[rows of expert e] = epilogue(A[rows] @ W[e]^T) over the row blocks of schedule_kernel.

    a: [R, K] (or x [T, K] read through gather_ptr when GATHER_A), w: [E, N or 2N, K] with K
    contiguous, c: [R, N] (or [T*K, N] written through scatter_ptr when SCATTER_C).
    Programs walk tiles pid, pid + NUM_PROGRAMS, ...: a launch of one program per tile visits
    each once; a persistent launch of a few programs per SM loops (FLATTEN lets the software
    pipeline start the next tile's loads during this tile's epilogue).

    W_TMA / A_TMA: w_ptr / a_ptr are TMA tensor descriptors (Hopper's Tensor Memory Accelerator
    copies whole tiles, zero-filling past the tensor's end) over w viewed as [E*rows, K] / over a.
    A tile may then read rows of the next expert, or columns past N: they only feed outputs that
    are never stored, so no mask is needed.

    ROWS_FULL: every expert's row count is a multiple of BLOCK_M (a routing rounded to the tile),
    so every row block is full; with EVEN_N (N a multiple of BLOCK_N) too, the stores need no mask.
    """
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_blocks = tl.load(num_blocks_ptr)
    num_tiles = num_blocks * num_pid_n
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=FLATTEN):
        # L2-friendly order: GROUP_M consecutive row blocks (mostly one expert's) sweep the N
        # tiles together, so each weight tile is fetched from HBM once and reused from L2.
        tiles_per_group = GROUP_M * num_pid_n
        first_m = (tile // tiles_per_group) * GROUP_M
        group_rows = tl.minimum(num_blocks - first_m, GROUP_M)
        pid_m = first_m + (tile % tiles_per_group) % group_rows
        pid_n = (tile % tiles_per_group) // group_rows

        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        row_start = tl.load(block_row_ptr + pid_m)
        row_end = tl.load(offsets_ptr + expert + 1)
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        if ROWS_FULL:
            rows_in = rows
        else:
            # Rows past the expert's segment repeat its last row: every load stays in bounds and
            # unmasked; those rows are simply not stored.
            rows_in = tl.minimum(rows, row_end - 1)
        if GATHER_A:
            a_rows = tl.load(gather_ptr + rows_in).to(tl.int64)
        else:
            a_rows = rows_in.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_in = tl.minimum(cols, N - 1).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)

        if not A_TMA:
            a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :]
        if W_TMA:
            w_row = (expert * (stride_we // stride_wn) + pid_n * BLOCK_N).to(tl.int32)  # first row in w as [E*rows, K]
        else:
            w_ptrs = w_ptr + expert * stride_we + cols_in[None, :] * stride_wn + ks[:, None]  # W^T tile [BK, BN]
            if SWIGLU:
                up_ptrs = w_ptrs + N * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SWIGLU:
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = ks < K - k * BLOCK_K
            if A_TMA:
                a = a_ptr.load([row_start, k * BLOCK_K])
            elif EVEN_K:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            if W_TMA:
                w = w_ptr.load([w_row, k * BLOCK_K]).T
            elif EVEN_K:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
            if SWIGLU:
                if W_TMA:
                    u = w_ptr.load([w_row + N, k * BLOCK_K]).T
                elif EVEN_K:
                    u = tl.load(up_ptrs)
                else:
                    u = tl.load(up_ptrs, mask=k_ok[:, None], other=0.0)
                acc_up = tl.dot(a, u, acc_up, input_precision=DOT_PRECISION)
                if not W_TMA:
                    up_ptrs += BLOCK_K
            if not A_TMA:
                a_ptrs += BLOCK_K
            if not W_TMA:
                w_ptrs += BLOCK_K

        store_ok = row_ok[:, None] & (cols < N)[None, :]
        rows64 = rows.to(tl.int64)
        if SWIGLU:
            if STORE_PRE:
                pre = pre_ptr + rows64[:, None] * stride_pm + cols[None, :]
                if ROWS_FULL and EVEN_N:
                    tl.store(pre, acc.to(pre_ptr.dtype.element_ty))
                    tl.store(pre + N, acc_up.to(pre_ptr.dtype.element_ty))
                else:
                    tl.store(pre, acc.to(pre_ptr.dtype.element_ty), mask=store_ok)
                    tl.store(pre + N, acc_up.to(pre_ptr.dtype.element_ty), mask=store_ok)
            acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up, in fp32
        if SCATTER_C:
            slots = tl.load(scatter_ptr + rows_in)
            acc = acc * tl.load(scale_ptr + slots)[:, None].to(tl.float32)
            out_rows = slots.to(tl.int64)
        else:
            out_rows = rows64
        c_ptrs = c_ptr + out_rows[:, None] * stride_cm + cols[None, :]
        if ROWS_FULL and EVEN_N:  # a tile-aligned routing: every row and column of the tile is real
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty))
        else:
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=store_ok)


@triton.jit
def combine_kernel(rows_ptr, ids_ptr, position_ptr, weight_ptr, y_ptr, hidden, TOP_K: tl.constexpr,
                   BLOCK_H: tl.constexpr, HAS_EMPTY: tl.constexpr, GROUPED: tl.constexpr):
    """y[t] = sum over k of rows[t*K + k] in fp32, leaving out slots whose id is -1 (HAS_EMPTY).

    GROUPED: rows are in expert order and unweighted (a plain grouped GEMM's output): slot s's row
    is rows[position[s]], multiplied by weight[s] in fp32.
    """
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < hidden
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        slot = t * TOP_K + k
        ok = col_ok
        if HAS_EMPTY:  # the slot's id, loaded once per lane (one cached address) to mask the row
            ok = ok & (tl.load(ids_ptr + slot + tl.zeros_like(cols)) >= 0)
        if GROUPED:
            row = tl.load(position_ptr + slot).to(tl.int64)
            part = tl.load(rows_ptr + row * hidden + cols, mask=ok, other=0.0).to(tl.float32)
            acc += part * tl.load(weight_ptr + slot).to(tl.float32)
        else:
            acc += tl.load(rows_ptr + slot * hidden + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * hidden + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def swiglu_kernel(h_ptr, out_ptr, ffn, BLOCK: tl.constexpr):
    """out[r] = silu(h[r, :I]) * h[r, I:] in fp32 registers: one read of h, one write of out, where
    PyTorch's chunk + silu + multiply makes three passes and a temporary."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < ffn
    gate = tl.load(h_ptr + r * 2 * ffn + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + r * 2 * ffn + ffn + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + r * ffn + cols, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=ok)
