"""The routing metadata in one or two Triton launches: counts, offsets and the permutation grouping slots by expert.

Given each slot's expert (topk_ids [T, K] flattened: slot s = t*K + k, -1 for a dropped slot),
the grouped GEMMs need

    counts[e]            slots of expert e
    offsets[e]           where expert e's rows start in the grouped order (offsets[E] = kept slots)
    sorted_slots[p]      the slot at grouped row p: expert by expert, slot order inside an expert,
                         dropped slots last
    sorted_tokens[p]     sorted_slots[p] // K, the row of x that grouped row p reads
    slot_position[s]     the inverse: the grouped row of slot s

PyTorch builds these with a radix sort and a handful of small operations (about ten launches);
at a decode batch each launch costs more host time than its GPU work. Here it is a counting sort
over chunks of BLOCK_S slots, one program per chunk:

1. ``expert_histogram_kernel``: each chunk's slots per expert (``tl.histogram``), [chunks, bins];
2. ``scatter_by_expert_kernel``: from those histograms every chunk knows, for each expert, where
   the expert's segment starts (the slots of lower experts) and how many of its slots earlier
   chunks hold. It sorts its own slots by (expert, slot) in registers (``tl.sort``), and the
   i-th slot of the sorted chunk goes to row base[expert] + i: stable, expert by expert.

A batch of at most BLOCK_S slots (every decode batch) is one chunk: then the second kernel counts
for itself and the whole metadata is one launch. Bin E collects the dropped slots (id -1), which
sort after every expert; bin E+1 the lanes past the last slot, which go nowhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_CHUNK = 2048  # slots per program: sorted in registers


@triton.jit
def _bins_of(ids_ptr, s, num_slots, num_experts):
    """The bin of each slot s: its expert, E for a dropped slot, E + 1 past the last slot."""
    ids = tl.load(ids_ptr + s, mask=s < num_slots, other=-1)
    key = tl.where(ids < 0, num_experts, ids)
    return tl.where(s < num_slots, key, num_experts + 1)


@triton.jit
def expert_histogram_kernel(ids_ptr, hist_ptr, num_slots, num_experts, BLOCK_S: tl.constexpr, NUM_BINS: tl.constexpr):
    """hist[c, b] = the slots of chunk c in bin b."""
    c = tl.program_id(0)
    key = _bins_of(ids_ptr, c * BLOCK_S + tl.arange(0, BLOCK_S), num_slots, num_experts)
    tl.store(hist_ptr + c * NUM_BINS + tl.arange(0, NUM_BINS), tl.histogram(key, NUM_BINS))


@triton.jit
def scatter_by_expert_kernel(ids_ptr, hist_ptr, base_ptr, counts_ptr, offsets_ptr,
                             sorted_slots_ptr, sorted_tokens_ptr, slot_position_ptr,
                             num_slots, num_experts, num_chunks,
                             TOP_K: tl.constexpr, BLOCK_S: tl.constexpr, NUM_BINS: tl.constexpr,
                             BLOCK_C: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """Chunk c's slots to their grouped rows; chunk 0 also writes counts and offsets.

    ONE_CHUNK: the batch is one chunk, and its histogram is computed here (no hist_ptr)."""
    c = tl.program_id(0)
    bins = tl.arange(0, NUM_BINS)
    local = tl.arange(0, BLOCK_S)
    key = _bins_of(ids_ptr, c * BLOCK_S + local, num_slots, num_experts)
    if ONE_CHUNK:
        mine = tl.histogram(key, NUM_BINS)
        total = mine
        earlier = tl.zeros((NUM_BINS,), dtype=tl.int32)
    else:
        total = tl.zeros((NUM_BINS,), dtype=tl.int32)
        earlier = tl.zeros((NUM_BINS,), dtype=tl.int32)  # this bin's slots in chunks before c
        mine = tl.zeros((NUM_BINS,), dtype=tl.int32)
        for r0 in range(0, num_chunks, BLOCK_C):
            r = r0 + tl.arange(0, BLOCK_C)
            tile = tl.load(hist_ptr + r[:, None] * NUM_BINS + bins[None, :], mask=r[:, None] < num_chunks, other=0)
            total += tl.sum(tile, axis=0)
            earlier += tl.sum(tl.where(r[:, None] < c, tile, 0), axis=0)
            mine += tl.sum(tl.where(r[:, None] == c, tile, 0), axis=0)
    # Segment starts: bins 0..E-1 are the experts, bin E the dropped slots (last); E+1 is not a row.
    sorted_bins = tl.where(bins <= num_experts, total, 0)
    segment = tl.cumsum(sorted_bins, axis=0) - sorted_bins
    if c == 0:
        tl.store(counts_ptr + bins, total, mask=bins < num_experts)
        tl.store(offsets_ptr + bins, segment, mask=bins <= num_experts)
    # The i-th slot of the chunk sorted by (bin, slot) goes to row base[bin] + i.
    base = segment + earlier - (tl.cumsum(mine, axis=0) - mine)
    tl.store(base_ptr + c * NUM_BINS + bins, base)
    tl.debug_barrier()  # base[] is read back below by other threads of this program
    order = tl.sort(key * BLOCK_S + local, 0)
    sorted_key = order // BLOCK_S
    slot = c * BLOCK_S + order % BLOCK_S
    rows = tl.load(base_ptr + c * NUM_BINS + sorted_key) + local
    real = sorted_key <= num_experts
    tl.store(sorted_slots_ptr + rows, slot.to(tl.int64), mask=real)
    tl.store(sorted_tokens_ptr + rows, (slot // TOP_K).to(tl.int64), mask=real)
    tl.store(slot_position_ptr + slot, rows.to(tl.int64), mask=real)


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int):
    """(counts int32 [E], offsets int32 [E+1], sorted_slots, sorted_tokens, slot_position int64 [T*K])
    of an int32 contiguous topk_ids [T, K] whose entries are -1 or in [0, E): what
    tilemoe.routing.build_routing computes with PyTorch, bit for bit, in one launch (two above
    MAX_CHUNK slots)."""
    num_tokens, top_k = topk_ids.shape
    num_slots = num_tokens * top_k
    device = topk_ids.device
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    perm = torch.empty(3, num_slots, dtype=torch.int64, device=device)  # one allocation for the three
    if num_slots == 0:
        counts.zero_()
        offsets.zero_()
        return counts, offsets, perm[0], perm[1], perm[2]
    block_s = min(MAX_CHUNK, max(64, triton.next_power_of_2(num_slots)))
    chunks = triton.cdiv(num_slots, block_s)
    num_bins = triton.next_power_of_2(num_experts + 2)
    scratch = torch.empty(2, chunks, num_bins, dtype=torch.int32, device=device)  # histograms, row bases
    warps = 4 if block_s <= 512 else 8
    if chunks > 1:
        expert_histogram_kernel[(chunks,)](topk_ids, scratch[0], num_slots, num_experts,
                                           BLOCK_S=block_s, NUM_BINS=num_bins, num_warps=warps)
    scatter_by_expert_kernel[(chunks,)](
        topk_ids, scratch[0], scratch[1], counts, offsets, perm[0], perm[1], perm[2],
        num_slots, num_experts, chunks,
        TOP_K=top_k, BLOCK_S=block_s, NUM_BINS=num_bins, BLOCK_C=max(2, min(32, 8192 // num_bins)),
        ONE_CHUNK=chunks == 1, num_warps=warps,
    )
    return counts, offsets, perm[0], perm[1], perm[2]
