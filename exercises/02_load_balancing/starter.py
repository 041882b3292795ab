"""Exercise 02: keep the experts evenly loaded. Your work goes here.

Fill in every function marked TODO (problem.md has the math and the exact rules), then grade it:

    python test.py              # grades this file: one line per check and a score

Plain PyTorch only: do not import tilemoe here (the grader compares you against it).

Shapes: T tokens, E experts, K = top_k slots per token. A *slot* is one (token, choice) pair,
numbered s = t*K + k.
"""

from __future__ import annotations

import math

import torch


# 1. The auxiliary load-balancing loss (Switch Transformer / GShard)

def load_balancing_loss(router_logits: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """E * sum_i f_i * P_i (the caller multiplies it by alpha).

    router_logits [T, E] float   the router's raw outputs; the loss must be differentiable in them
    topk_ids      [T, K] int     each slot's expert (any integer dtype); -1 marks a dropped slot,
                                 which counts for no expert (but still counts in the T*K total)
    num_experts   E
    returns       a 0-dim float tensor: 1.0 for perfectly uniform routing, larger when unbalanced

    f_i = (slots whose id is i) / (T*K)     a count: no gradient
    P_i = mean over tokens of softmax(router_logits)[:, i]     carries the gradient
    """
    # TODO: softmax the logits, count the slots per expert (mind the -1s), combine as above.
    raise NotImplementedError("TODO: load_balancing_loss")


# 2. Top-k routing with a capacity per expert

def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """The slots one expert may keep: ceil(capacity_factor * T * K / E), as an int.

    Round the quotient to 9 decimals before the ceil, so float fuzz such as
    1.1 * 10 = 11.000000000000002 gives 11, not 12.
    """
    # TODO: one line with math.ceil and round(..., 9).
    raise NotImplementedError("TODO: capacity")


def route_with_capacity(router_logits: torch.Tensor, top_k: int, capacity_factor: float):
    """Softmax, top-k, renormalized weights; then each expert keeps only its `capacity` best slots.

    router_logits [T, E] float
    returns (topk_ids, topk_weights, dropped_mask):
      topk_ids     [T, K] int64   each token's experts, best first (ties: lower expert index);
                                  -1 on a dropped slot
      topk_weights [T, K] float   probabilities of the chosen experts divided by their sum over the
                                  token's K choices (computed BEFORE dropping); 0 on a dropped slot;
                                  the kept weights are not renormalized again after dropping
      dropped_mask [T, K] bool    True exactly where topk_ids == -1
    Inside an expert, slots are ranked by score (the softmax probability of that expert for that
    token), highest first, ties to the lower token index; ranks 0..capacity-1 stay, the rest drop.
    """
    # TODO: softmax; a stable descending sort for the top-k; then rank the slots inside each expert.
    raise NotImplementedError("TODO: route_with_capacity")


# 3. Give dropped slots a second chance

def reroute_dropped(router_logits, topk_ids, topk_weights, dropped_mask, capacity_factor):
    """Move each dropped slot to the token's next-best expert that still has room.

    router_logits [T, E] float; topk_ids [T, K] int64; topk_weights [T, K] float;
    dropped_mask [T, K] bool: as returned by route_with_capacity (each token's experts best first).
    returns new (topk_ids, topk_weights, dropped_mask), same shapes and dtypes; do not modify the inputs.

    Rules (problem.md, part 3):
      * serve the dropped slots in order of decreasing score: the score of dropped slot (t, k) is
        token t's k-th largest probability (the expert it was dropped from); ties: lower t*K + k first;
      * give the slot to the expert with the highest probability for token t (ties: lower expert
        index) that has fewer than `capacity` slots and that token t does not already hold;
        if there is none, the slot stays dropped (id -1, weight 0);
      * every token that received a slot gets its weights recomputed over its kept slots:
        w = p[t, e] / (sum of p[t, e'] over the experts e' the token now holds); other tokens keep
        their weights exactly.
    """
    # TODO: count the load per expert, sort the dropped slots, place them one at a time.
    raise NotImplementedError("TODO: reroute_dropped")


# 4. How uneven is the load? Three numbers from per-expert counts (a 1-D tensor, often int64)

def gini(loads: torch.Tensor) -> float:
    """Gini coefficient, a Python float: with the loads sorted ascending x_1 <= ... <= x_n,
    G = sum_i (2i - n - 1) x_i / (n * sum_i x_i)   (i counts from 1)."""
    # TODO
    raise NotImplementedError("TODO: gini")


def coefficient_of_variation(loads: torch.Tensor) -> float:
    """Population standard deviation (divide by n) over the mean, a Python float."""
    # TODO
    raise NotImplementedError("TODO: coefficient_of_variation")


def min_max_ratio(loads: torch.Tensor) -> float:
    """Smallest load over largest load, a Python float."""
    # TODO
    raise NotImplementedError("TODO: min_max_ratio")


# 5. Stretch: auxiliary-loss-free balancing (DeepSeek-V3)

def update_bias(bias: torch.Tensor, loads: torch.Tensor, gamma: float) -> torch.Tensor:
    """One bias step. bias [E] float, loads [E] (counts), gamma > 0 -> a NEW bias tensor [E]:
    +gamma where load < mean load (under-loaded), -gamma where load > mean, unchanged at the mean."""
    # TODO: one line with torch.sign.
    raise NotImplementedError("TODO: update_bias")
