"""Exercise 03 — tile-aware token rounding.

Read problem.md first: it has the math, the four tasks and hints. Fill in the four functions
marked TODO, in task order:

    1. round_counts       each expert's token count -> a multiple of the tile ("down" or "nearest")
    2. expert_ranking     each expert's candidate order: its own tokens first, then the others, by score
    3. round_assignment   keep each expert's first target_e candidates: the new (token, expert) pairs
    4. rounded_weights    each token's scores over the experts it kept, renormalized

Grade your work with ``python test.py`` (it grades this file). Plain PyTorch is all you need:
no Python loops over tokens or experts are required, and the grader also runs on a GPU.
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
    # TODO (task 1):
    #   - down = the multiple of tile at or below each count (integer division floors);
    #   - "down": return it;
    #   - up = the multiple at or above each count, capped at num_tokens (torch.clamp);
    #   - "nearest": up where the remainder count - down is at least half a tile, else down
    #     (compare 2 * remainder >= tile: integers, no float rounding; torch.where).
    raise NotImplementedError("TODO (task 1): round_counts")


# -- Task 2: the expert-wise ranking ----------------------------------------------------------------

def expert_ranking(selected: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """rank[t, e]: the position (0, 1, ..., T-1) of token t in expert e's candidate order. int64 [T, E].

    selected [T, E] bool: token t chose expert e (vanilla top-k). scores [T, E]: router scores.
    Expert e's candidates are all T tokens: first those that selected e, then the others; inside
    each group by score, highest first; equal scores keep the lower token index first.
    """
    # TODO (task 2):
    #   - sort each column's tokens by score, highest first, with a *stable* sort
    #     (torch.argsort(..., dim=0, descending=True, stable=True));
    #   - in that order, stably sort again by the selected flag, selected first (cast it to an
    #     integer type first), and compose the two permutations (gather): order[i, e] = the token
    #     at position i of expert e's list;
    #   - invert: rank[order[i, e], e] = i (scatter_ along dim 0).
    raise NotImplementedError("TODO (task 2): expert_ranking")


# -- Task 3: the new assignment ---------------------------------------------------------------------

def round_assignment(scores: torch.Tensor, topk_ids: torch.Tensor, tile: int, mode: str) -> torch.Tensor:
    """keep [T, E] bool: the (token, expert) pairs after rounding every expert's count to the tile.

    scores [T, E]: router scores of every pair. topk_ids [T, K]: the vanilla top-k choice (valid
    expert ids). Expert e keeps the first round_counts(...)[e] tokens of its candidate order.
    """
    # TODO (task 3):
    #   - selected [T, E] bool from topk_ids (scatter_ True along dim 1);
    #   - counts [E] = selected tokens per expert; target = round_counts(counts, tile, mode, T);
    #   - rank = expert_ranking(selected, scores);
    #   - keep the pairs whose rank is below their expert's target (broadcast target over tokens).
    raise NotImplementedError("TODO (task 3): round_assignment")


# -- Task 4: the new weights ------------------------------------------------------------------------

def rounded_weights(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """weights [T, E]: token t's scores over the experts it keeps, divided by their sum; 0 elsewhere.

    A token may keep fewer or more than K experts after rounding; its weights still sum to 1. A
    token that keeps no expert gets all-zero weights (the residual connection carries it).
    """
    # TODO (task 4):
    #   - zero the scores of the pairs not kept;
    #   - divide each row by its sum, except rows that sum to 0: they stay all 0 (not NaN).
    raise NotImplementedError("TODO (task 4): rounded_weights")
