"""Exercise 03 — tile-aware token rounding: the solution.

Read problem.md first. This file is starter.py with every TODO done; it stands alone (plain
PyTorch, no tilemoe), so you can read it top to bottom as the answer to the four tasks:

    1. round_counts       each expert's token count -> a multiple of the tile ("down" or "nearest")
    2. expert_ranking     each expert's candidate order: its own tokens first, then the others, by score
    3. round_assignment   keep each expert's first target_e candidates: the new (token, expert) pairs
    4. rounded_weights    each token's scores over the experts it kept, renormalized

Grade it with ``python test.py --solution``.
"""

from __future__ import annotations

import torch

MODES = ("down", "nearest")


# -- Task 1: how many tokens each expert keeps ------------------------------------------------------

def round_counts(counts: torch.Tensor, tile: int, mode: str, num_tokens: int) -> torch.Tensor:
    """Each expert's token count rounded to a multiple of ``tile``: int64 [E].

    counts [E]: tokens per expert of the vanilla top-k routing (0 <= counts[e] <= num_tokens).
    mode "down": the multiple at or below the count. mode "nearest": the nearer multiple; a
    remainder of half a tile or more rounds up. Rounding up is capped at num_tokens: an expert
    can take each of the T tokens at most once, so when the next multiple is above T it takes all T.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    counts = counts.long()

    # Integer division floors: 142 // 128 * 128 = 128. This is the "down" target.
    down = counts // tile * tile
    if mode == "down":
        return down

    # The next multiple at or above the count (ceil division written with floors), capped at T.
    up = torch.clamp((counts + tile - 1) // tile * tile, max=num_tokens)

    # "nearest": the remainder decides. 2 * remainder >= tile means "at least half a tile", in
    # integers (no float rounding, and ties, remainder == tile / 2, go up).
    remainder = counts - down
    return torch.where(2 * remainder >= tile, up, down)


# -- Task 2: the expert-wise ranking ----------------------------------------------------------------

def expert_ranking(selected: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """rank[t, e]: the position (0, 1, ..., T-1) of token t in expert e's candidate order. int64 [T, E].

    selected [T, E] bool: token t chose expert e (vanilla top-k). scores [T, E]: router scores.
    Expert e's candidates are all T tokens: first those that selected e, then the others; inside
    each group by score, highest first; equal scores keep the lower token index first.
    """
    num_tokens = scores.shape[0]

    # A composite sort key (selected, then score, then token) from two *stable* sorts, secondary
    # key first: a stable sort keeps the order of equal elements, so the second sort (by the
    # primary key) leaves each group in the order the first sort gave it.
    #
    # Sort 1, the secondary key: token indices of each column (dim 0) by score, highest first.
    # Stability keeps tied scores in token order: ties go to the lower token.
    by_score = torch.argsort(scores, dim=0, descending=True, stable=True)          # [T, E]

    # Sort 2, the primary key: selected (1) before unselected (0). Read the flags in by_score's
    # order, sort them stably, and compose the two permutations.
    flags_in_score_order = selected.gather(0, by_score).to(torch.int8)            # bool cannot be sorted everywhere
    by_flag = torch.argsort(flags_in_score_order, dim=0, descending=True, stable=True)
    order = by_score.gather(0, by_flag)   # order[i, e]: the token at position i of expert e's list

    # order maps position -> token; we want the inverse, token -> position. Scatter each
    # position i to the row order[i, e] of its column.
    positions = torch.arange(num_tokens, device=scores.device).unsqueeze(1).expand_as(order)
    rank = torch.empty_like(order)
    rank.scatter_(0, order, positions)
    return rank


# -- Task 3: the new assignment ---------------------------------------------------------------------

def round_assignment(scores: torch.Tensor, topk_ids: torch.Tensor, tile: int, mode: str) -> torch.Tensor:
    """keep [T, E] bool: the (token, expert) pairs after rounding every expert's count to the tile.

    scores [T, E]: router scores of every pair. topk_ids [T, K]: the vanilla top-k choice (valid
    expert ids). Expert e keeps the first round_counts(...)[e] tokens of its candidate order.
    """
    num_tokens, num_experts = scores.shape

    # The vanilla assignment as a [T, E] mask: row t has True at the K experts token t chose.
    selected = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=scores.device)
    selected.scatter_(1, topk_ids.long(), True)

    counts = selected.sum(dim=0)                                  # [E] tokens per expert
    target = round_counts(counts, tile, mode, num_tokens)         # [E] tokens per expert after rounding
    rank = expert_ranking(selected, scores)                       # [T, E]

    # Expert e keeps the candidates at positions 0 .. target[e]-1. Because the selected tokens
    # come first, target < count drops the lowest-scored selected tokens, and target > count
    # adds the best-scored tokens that did not choose e. Broadcast target over the tokens.
    return rank < target.unsqueeze(0)


# -- Task 4: the new weights ------------------------------------------------------------------------

def rounded_weights(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """weights [T, E]: token t's scores over the experts it keeps, divided by their sum; 0 elsewhere.

    A token may keep fewer or more than K experts after rounding; its weights still sum to 1. A
    token that keeps no expert gets all-zero weights (the residual connection carries it).
    """
    # Zero the experts the token does not keep, then divide by what is left.
    kept = torch.where(keep, scores, torch.zeros_like(scores))
    total = kept.sum(dim=1, keepdim=True)
    # A row with nothing kept sums to 0: divide by 1 there instead (0 / 1 = 0), never 0 / 0 = NaN.
    return kept / torch.where(total > 0, total, torch.ones_like(total))
