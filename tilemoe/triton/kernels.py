"""The Triton kernels of the fast path: a tile schedule, one grouped GEMM used four ways (the
forward's two projections, the backward's two), and the weight gradients' grouped GEMM.

An MoE layer's experts are two grouped GEMMs over the token-slots sorted by expert
(``Routing.sorted_slots``): row r of the grouped matrix belongs to expert e when
offsets[e] <= r < offsets[e+1]. Each kernel program computes one BLOCK_M x BLOCK_N output tile, and
a tile never mixes experts: every expert's rows are cut into ceil(count_e / BLOCK_M) row blocks.

``schedule_kernel`` turns the per-expert counts into that list of row blocks on the GPU (no host
sync): for block b, the expert it belongs to and the grouped row it starts at. The number of
blocks is data-dependent, so the GEMM is launched for an upper bound and the surplus programs
return at once (or, persistent, never pick up a tile past the real count).

``grouped_gemm_kernel`` then computes C_e = A_e @ W_e^T for every expert segment, W in the
nn.Linear [E, N, K] layout (or, in the backward, the same weights read transposed), with optional
fusions chosen by constexpr flags:

- GATHER_A: row r of A is x[sorted_tokens[r]]: the up-projection reads tokens through the
  permutation, so no permuted copy of x is ever written (the backward reads dY the same way).
- SWIGLU: W holds 2N rows, gate (rows 0..N-1) then up (rows N..2N-1). Each k-step loads the
  tile's N columns of both halves as one [2 * BLOCK_N, BLOCK_K] weight tile and runs one dot of
  twice the width: on Hopper one 64 x 256 wgmma per warpgroup where two of 64 x 128 would read A's
  tile from shared memory twice. The epilogue splits the accumulator into gate and up and writes
  silu(gate) * up, and the pre-activation [gate | up] too when STORE_PRE (what a backward needs).
- SCATTER_C: write row r to its slot's own row, sorted_slots[r], of a [T*K, N] output (the
  backward's dX): summing each token's K consecutive rows then gives its gradient.

The down-projection writes its rows in expert order, unweighted: plain stores of whole tiles.
``combine_kernel`` then reads each slot's row through the inverse permutation, multiplies it by
the slot's routing weight and sums each token's K rows in fp32 (deterministic, no atomics). On
the H200 that pair ran faster than weighting and scattering rows in the GEMM's epilogue (a
development A/B on the four presets at 16384 tokens, not recorded). Storing whole row blocks by
TMA (one asynchronous copy of the tile from shared memory) was tried as well: an expert's last,
partial block still needs masked pointer stores, Triton 3.6 cannot flatten the persistent loop
around that branch, and without the flattening the GEMMs were slower (level on Qwen3); with a
routing rounded to the tile (no branch) the result was mixed across the four presets (development
A/B at 16384 tokens, not recorded). The combine also sums rows already in slot order (dX). Slots
that no expert kept (capacity drops, the -1 padding of token rounding) were never written: it
skips them by their id instead of reading zeros someone wrote.

The backward's first GEMM, dY @ W_down, is a plain one (dY read through the permutation); then
``swiglu_backward_kernel`` recomputes the activation from the saved pre-activation and applies
SwiGLU's derivative in one elementwise pass, in place. (In the GEMM's epilogue that work held five
fp32 tiles at once, which forced 128 x 64 tiles where the plain GEMM takes 128 x 256. An epilogue
that keeps the wide tile and works through it in parts of 64 columns, the routing weight's
gradient summed per column tile, was tried too: it spilled registers, and in a development A/B on
the H200 (Qwen3 and OLMoE at 16384 tokens, not recorded) the GEMM with it was slower than the GEMM
and this pass together in every tile shape tried, 128 x 256, 128 x 128 and 64 x 256.)

``grouped_wgrad_kernel`` computes the weight gradients, dW_e = A_e^T @ B_e: a GEMM whose reduction
runs over the expert's own rows, so its length is the expert's token count.
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
def _gemm_tile(
    a_ptr, w_ptr, c_ptr, pre_ptr, gather_ptr, slot_ptr,
    expert, row_start, row_end, pid_n, N, K,
    stride_am, stride_we, stride_wn, stride_wk, stride_cm, stride_pm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GATHER_A: tl.constexpr, SWIGLU: tl.constexpr, STORE_PRE: tl.constexpr, SCATTER_C: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, A_TMA: tl.constexpr, W_TMA: tl.constexpr,
    ROWS_FULL: tl.constexpr, EVEN_N: tl.constexpr, W_KN: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N output tile of ``grouped_gemm_kernel``: rows row_start.. of expert
    ``expert`` (those at or past row_end are computed from a repeated row and not stored)."""
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
    if EVEN_N:
        cols_in = cols.to(tl.int64)  # unclamped, so the compiler sees contiguous columns (W_KN)
    else:
        cols_in = tl.minimum(cols, N - 1).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)

    if not A_TMA:
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :]
    # SwiGLU multiplies A by one [BLOCK_K, 2 * BLOCK_N] weight tile per k-step, the tile's gate
    # columns then their up columns: one dot of twice the width (see the kernel's docstring).
    W_COLS: tl.constexpr = 2 * BLOCK_N if SWIGLU else BLOCK_N
    if W_TMA and W_KN:
        w_expert = expert.to(tl.int32)
    elif W_TMA and SWIGLU:
        w_pair = (2 * expert).to(tl.int32)  # w viewed as [2E, N, K]: expert e's gate rows, then its up rows
    elif W_TMA:
        w_row = (expert * (stride_we // stride_wn) + pid_n * BLOCK_N).to(tl.int32)  # first row in w as [E*rows, K]
    else:
        if SWIGLU:
            pair = tl.arange(0, W_COLS)  # gate rows of the tile's columns, then the same columns' up rows
            w_cols = (pair // BLOCK_N) * N + tl.minimum(pid_n * BLOCK_N + pair % BLOCK_N, N - 1)
        else:
            w_cols = cols_in
        w_ptrs = w_ptr + expert * stride_we + w_cols[None, :] * stride_wn + ks[:, None] * stride_wk  # W^T tile [BK, W_COLS]
    acc = tl.zeros((BLOCK_M, W_COLS), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = ks < K - k * BLOCK_K
        if A_TMA:
            a = a_ptr.load([row_start, k * BLOCK_K])
        elif EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        if W_TMA and W_KN:
            w = w_ptr.load([w_expert, k * BLOCK_K, pid_n * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
        elif W_TMA and SWIGLU:
            w = w_ptr.load([w_pair, pid_n * BLOCK_N, k * BLOCK_K]).reshape(W_COLS, BLOCK_K).T
        elif W_TMA:
            w = w_ptr.load([w_row, k * BLOCK_K]).T
        elif EVEN_K:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if not A_TMA:
            a_ptrs += BLOCK_K
        if not W_TMA:
            w_ptrs += BLOCK_K * stride_wk

    store_ok = row_ok[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)
    if SWIGLU:
        # Column j of the gate half and column j of the up half sit in the same thread's registers
        # (the tensor-core accumulator layout repeats along N), so this split moves no data.
        gate, up = acc.reshape(BLOCK_M, 2, BLOCK_N).permute(0, 2, 1).split()
        if STORE_PRE:
            pre = pre_ptr + rows64[:, None] * stride_pm + cols[None, :]
            if ROWS_FULL and EVEN_N:
                tl.store(pre, gate.to(pre_ptr.dtype.element_ty))
                tl.store(pre + N, up.to(pre_ptr.dtype.element_ty))
            else:
                tl.store(pre, gate.to(pre_ptr.dtype.element_ty), mask=store_ok)
                tl.store(pre + N, up.to(pre_ptr.dtype.element_ty), mask=store_ok)
        acc = gate * tl.sigmoid(gate) * up  # silu(gate) * up, in fp32
    if SCATTER_C:
        out_rows = tl.load(slot_ptr + rows_in).to(tl.int64)
    else:
        out_rows = rows64
    c_ptrs = c_ptr + out_rows[:, None] * stride_cm + cols[None, :]
    if ROWS_FULL and EVEN_N:  # a tile-aligned routing: every row and column of the tile is real
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty))
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=store_ok)


@triton.jit
def grouped_gemm_kernel(
    a_ptr, a_half_ptr, w_ptr, c_ptr, pre_ptr,
    gather_ptr, slot_ptr,
    block_expert_ptr, block_row_ptr, offsets_ptr, num_blocks_ptr,
    N, K,
    stride_am, stride_we, stride_wn, stride_wk, stride_cm, stride_pm,
    NUM_PROGRAMS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GATHER_A: tl.constexpr, SWIGLU: tl.constexpr, STORE_PRE: tl.constexpr, SCATTER_C: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, A_TMA: tl.constexpr, W_TMA: tl.constexpr,
    FLATTEN: tl.constexpr, ROWS_FULL: tl.constexpr, EVEN_N: tl.constexpr, W_KN: tl.constexpr,
    HALF_TAILS: tl.constexpr,
):
    """C[rows of expert e] = epilogue(A[rows] @ W[e]^T) over the row blocks of schedule_kernel.

    a: [R, K] (or x [T, K] read through gather_ptr when GATHER_A), w: [E, N or 2N, K] at strides
    (stride_we, stride_wn, stride_wk) (the forward's weights have stride_wk = 1; the backward reads
    them transposed), c: [R, N] (or [T*K, N] written through slot_ptr when SCATTER_C).
    Programs walk tiles pid, pid + NUM_PROGRAMS, ...: a launch of one program per tile visits
    each once; a persistent launch of a few programs per SM loops (FLATTEN lets the software
    pipeline start the next tile's loads during this tile's epilogue).

    W_TMA / A_TMA: w_ptr / a_ptr are TMA tensor descriptors (Hopper's Tensor Memory Accelerator
    copies whole tiles, zero-filling past the tensor's end) over w viewed as [E*rows, K] (with
    SWIGLU, as [2E, N, K]: one box of [2, BLOCK_N, BLOCK_K] is a tile's gate and up rows) / over a.
    A tile may then read rows of the next expert, or columns past N: they only feed outputs that
    are never stored, so no mask is needed.
    W_KN: w is the transpose of a contiguous [E, K, N] (the backward's weights: stride_wn = 1). The
    pointer loads then run along N, and with W_TMA the descriptor is 3-D over [E, K, N]: a tile
    past an expert's K rows must read zeros, not the next expert's rows (they would meet A's
    zero-filled columns, but 0 * inf is NaN).

    ROWS_FULL: every expert's row count is a multiple of BLOCK_M (a routing rounded to the tile),
    so every row block is full; with EVEN_N (N a multiple of BLOCK_N) too, the stores need no mask.

    HALF_TAILS: a row block of at most BLOCK_M / 2 rows (an expert's last, when its count leaves a
    small remainder) runs as a BLOCK_M / 2-row tile. With random routing about half of the experts
    end in such a block, so on average the padded rows that are computed and thrown away halve.
    Both tile heights are compiled into the kernel; each tile takes one branch.
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
        if HALF_TAILS and row_end - row_start <= BLOCK_M // 2:
            # The expert's last row block holds at most half a tile: a half-height tile does it
            # with half the MMA work (a_half_ptr: A's descriptor with half-height boxes, or A).
            _gemm_tile(a_half_ptr, w_ptr, c_ptr, pre_ptr, gather_ptr, slot_ptr,
                       expert, row_start, row_end, pid_n, N, K,
                       stride_am, stride_we, stride_wn, stride_wk, stride_cm, stride_pm,
                       BLOCK_M // 2, BLOCK_N, BLOCK_K, GATHER_A, SWIGLU, STORE_PRE, SCATTER_C,
                       EVEN_K, DOT_PRECISION, A_TMA, W_TMA, ROWS_FULL, EVEN_N, W_KN)
        else:
            _gemm_tile(a_ptr, w_ptr, c_ptr, pre_ptr, gather_ptr, slot_ptr,
                       expert, row_start, row_end, pid_n, N, K,
                       stride_am, stride_we, stride_wn, stride_wk, stride_cm, stride_pm,
                       BLOCK_M, BLOCK_N, BLOCK_K, GATHER_A, SWIGLU, STORE_PRE, SCATTER_C,
                       EVEN_K, DOT_PRECISION, A_TMA, W_TMA, ROWS_FULL, EVEN_N, W_KN)


@triton.jit
def _wgrad_rows(ptr, gather_ptr, rows, cols, stride, row_ok, col_ok,
                GATHER: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """One [BLOCK_R, BLOCK_N] chunk of an operand of grouped_wgrad_kernel, by pointers: the rows
    read through gather_ptr when GATHER, masked only where the caller says a mask is needed."""
    if GATHER:
        if MASK_ROWS:
            rows = tl.load(gather_ptr + rows, mask=row_ok, other=0)
        else:
            rows = tl.load(gather_ptr + rows)
    ptrs = ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :]
    if MASK_ROWS and MASK_COLS:
        return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if MASK_ROWS:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    if MASK_COLS:
        return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    return tl.load(ptrs)


@triton.jit
def grouped_wgrad_kernel(a_ptr, b_ptr, c_ptr, a_gather_ptr, b_gather_ptr, offsets_ptr,
                         N1, N2, stride_am, stride_bm, stride_ce, stride_cn,
                         BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_R: tl.constexpr,
                         GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, A_TMA: tl.constexpr, B_TMA: tl.constexpr,
                         EVEN_N1: tl.constexpr, EVEN_N2: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         ACCUMULATE: tl.constexpr):
    """C[e] = A[rows of e]^T @ B[rows of e] for expert e = program_id(1): [N1, N2] per expert.

    a: [R, N1] (or read through a_gather_ptr: row r is a[a_gather[r]]), b: [R, N2] likewise,
    c: [E, N1, N2]. The reduction runs over the expert's grouped rows offsets[e] .. offsets[e+1]:
    first every full chunk of BLOCK_R rows with no row mask (the loads the software pipeline
    streams), then the one partial chunk, masked. An expert with no rows gets zeros.
    A_TMA / B_TMA: that operand is a TMA descriptor over the [R, N] rows in place (an operand read
    through a permutation cannot be: a TMA copies a rectangle). It zero-fills columns past N, but
    the rows past the expert's end are the next expert's, or past the last expert's the rows of
    dropped slots, never written (NaN times the other operand's masked zeros is still NaN): the
    partial chunk masks them itself.
    EVEN_N1 / EVEN_N2: N is a multiple of its tile, so the pointer loads need no column mask.
    ACCUMULATE: C[e] += the sum instead of =: the tile's old values are read and added in fp32
    (each output element belongs to one program, so the read and the write are its own).
    """
    expert = tl.program_id(1)
    tiles_n2 = tl.cdiv(N2, BLOCK_N2)
    first_n1 = (tl.program_id(0) // tiles_n2) * BLOCK_N1
    first_n2 = (tl.program_id(0) % tiles_n2) * BLOCK_N2
    n1 = first_n1 + tl.arange(0, BLOCK_N1)
    n2 = first_n2 + tl.arange(0, BLOCK_N2)
    n1_ok, n2_ok = n1 < N1, n2 < N2
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    full_end = start + (end - start) // BLOCK_R * BLOCK_R
    acc = tl.zeros((BLOCK_N1, BLOCK_N2), dtype=tl.float32)
    for r0 in range(start, full_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        if A_TMA:
            a = a_ptr.load([r0, first_n1])
        else:
            a = _wgrad_rows(a_ptr, a_gather_ptr, rows, n1, stride_am, rows < end, n1_ok,
                            GATHER_A, False, not EVEN_N1)
        if B_TMA:
            b = b_ptr.load([r0, first_n2])
        else:
            b = _wgrad_rows(b_ptr, b_gather_ptr, rows, n2, stride_bm, rows < end, n2_ok,
                            GATHER_B, False, not EVEN_N2)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)
    if full_end < end:
        rows = full_end + tl.arange(0, BLOCK_R)
        row_ok = rows < end
        if A_TMA:
            a = tl.where(row_ok[:, None], a_ptr.load([full_end, first_n1]), 0.0)
        else:
            a = _wgrad_rows(a_ptr, a_gather_ptr, rows, n1, stride_am, row_ok, n1_ok, GATHER_A, True, not EVEN_N1)
        if B_TMA:
            b = tl.where(row_ok[:, None], b_ptr.load([full_end, first_n2]), 0.0)
        else:
            b = _wgrad_rows(b_ptr, b_gather_ptr, rows, n2, stride_bm, row_ok, n2_ok, GATHER_B, True, not EVEN_N2)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)
    c = c_ptr + expert.to(tl.int64) * stride_ce + n1[:, None].to(tl.int64) * stride_cn + n2[None, :]
    c_ok = n1_ok[:, None] & n2_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=c_ok)


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


@triton.jit
def swiglu_backward_kernel(g_ptr, pre_ptr, slot_ptr, scale_ptr, dscale_ptr, offsets_ptr, num_experts, ffn,
                           BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """SwiGLU's backward for BLOCK_R grouped rows, in place. With g = dY[t] @ W_down[e] (the row
    the first backward GEMM wrote), [gate | up] the saved pre-activation, p the slot's routing
    weight and A = silu(gate) * up recomputed here:

        dscale[r]     = sum_i g_i * A_i                the routing weight's gradient (one per row)
        g_ptr row    <- p * A                          what dW_down's reduction multiplies dY by
        pre_ptr row  <- [dA * up * silu'(gate) | dA * silu(gate)],  dA = p * g

    Every element is read and then written by the same program, so both buffers are overwritten
    where they are read: no new memory. Rows past offsets[E] (dropped slots) are left alone.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < tl.load(offsets_ptr + num_experts)
    p = tl.load(scale_ptr + tl.load(slot_ptr + r, mask=row_ok, other=0), mask=row_ok, other=0.0)
    p = p.to(tl.float32)[:, None]
    rows = r.to(tl.int64)[:, None]
    dscale = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, ffn, BLOCK_I):
        cols = c0 + tl.arange(0, BLOCK_I)[None, :]
        ok = row_ok[:, None] & (cols < ffn)
        g_ptrs = g_ptr + rows * ffn + cols
        gate_ptrs = pre_ptr + rows * (2 * ffn) + cols
        g = tl.load(g_ptrs, mask=ok, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptrs, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(gate_ptrs + ffn, mask=ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu_gate = gate * sig
        act = silu_gate * up
        dscale += tl.sum(g * act, axis=1)
        tl.store(g_ptrs, (p * act).to(g_ptr.dtype.element_ty), mask=ok)
        d_act = p * g
        tl.store(gate_ptrs + ffn, (d_act * silu_gate).to(pre_ptr.dtype.element_ty), mask=ok)
        # silu'(gate) = sig * (1 + gate * (1 - sig)) = sig + silu_gate * (1 - sig)
        tl.store(gate_ptrs, (d_act * up * (sig + silu_gate * (1.0 - sig))).to(pre_ptr.dtype.element_ty), mask=ok)
    tl.store(dscale_ptr + r, dscale, mask=row_ok)
