"""Exercise 02, reference solution: keep the experts evenly loaded.

Plain PyTorch only (no tilemoe): a solution stands on its own. Read problem.md for the math; the
comments here say why each step is written the way it is.

Shapes: T tokens, E experts, K = top_k slots per token. A *slot* is one (token, choice) pair,
numbered s = t*K + k.
"""

from __future__ import annotations

import math

import torch


# %%
# 1. The auxiliary load-balancing loss (Switch Transformer / GShard)
# -------------------------------------------------------------------

def load_balancing_loss(router_logits: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """E * sum_i f_i * P_i: 1.0 when routing is perfectly uniform, up to E when one expert takes all.

    router_logits [T, E] float   the router's raw outputs (the gradient flows back through them)
    topk_ids      [T, K] int     each slot's expert; -1 marks a dropped slot (counted for no expert)
    returns       0-dim float tensor (the caller multiplies it by alpha)
    """
    probs = router_logits.float().softmax(dim=-1)  # [T, E], fp32 so the sum is accurate

    # f_i: the fraction of all T*K slots that went to expert i. It is a count, so it carries no
    # gradient. A dropped slot (-1) is sent to an extra "bin" E that we then throw away.
    flat = topk_ids.reshape(-1).long()
    flat = torch.where(flat < 0, num_experts, flat)
    counts = torch.zeros(num_experts + 1, dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=probs.dtype))
    fraction = counts[:num_experts] / topk_ids.numel()

    # P_i: the mean router probability of expert i. This is the differentiable half: its gradient
    # pushes probability away from experts whose f is large.
    mean_prob = probs.mean(dim=0)

    # The factor E makes the uniform case (f_i = P_i = 1/E) equal exactly 1, whatever E is.
    return num_experts * (fraction * mean_prob).sum()


# %%
# 2. Top-k routing with a capacity per expert
# -------------------------------------------

def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """ceil(cf * T * K / E): the slots one expert may keep. (round(.., 9) guards against float fuzz
    such as 1.1 * 10 = 11.000000000000002, whose ceil would be 12.)"""
    return math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 9))


def route_with_capacity(router_logits: torch.Tensor, top_k: int, capacity_factor: float):
    """Softmax, top-k, renormalized weights, then drop every expert's lowest-scored overflow.

    router_logits [T, E] float
    returns (topk_ids [T, K] int64, topk_weights [T, K] float, dropped_mask [T, K] bool)
      each token's experts best first; a dropped slot has id -1 and weight 0; the kept weights are
      NOT renormalized again after dropping (Switch/GShard: the token's residual carries the rest).
    """
    num_tokens, num_experts = router_logits.shape
    probs = router_logits.float().softmax(dim=-1)

    # Top-k with ties going to the lower expert index: a stable descending sort does exactly that.
    ids = probs.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    scores = probs.gather(1, ids)  # [T, K] the softmax probability of each chosen slot
    weights = scores / scores.sum(dim=-1, keepdim=True)

    # Rank the slots inside each expert, best score first. Two stable sorts: first by score
    # (descending; equal scores keep slot order, i.e. the lower token first), then by expert id.
    # After that, the slots of expert 0 come first, best first, then expert 1's, and so on.
    cap = capacity(num_tokens, top_k, num_experts, capacity_factor)
    flat_ids = ids.reshape(-1)
    by_score = torch.argsort(scores.reshape(-1), descending=True, stable=True)
    order = by_score[torch.argsort(flat_ids[by_score], stable=True)]

    # A slot's rank inside its expert = its position in `order` minus where its expert starts.
    counts = torch.bincount(flat_ids, minlength=num_experts)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(flat_ids)
    rank[order] = torch.arange(flat_ids.numel(), device=flat_ids.device) - starts[flat_ids[order]]

    dropped = (rank >= cap).view(num_tokens, top_k)  # ranks 0..cap-1 stay, the rest overflow
    return ids.masked_fill(dropped, -1), weights.masked_fill(dropped, 0.0), dropped


# %%
# 3. Give dropped slots a second chance
# -------------------------------------

def reroute_dropped(router_logits, topk_ids, topk_weights, dropped_mask, capacity_factor):
    """Move each dropped slot to the token's next-best expert that still has room.

    Inputs: as returned by route_with_capacity (ids -1 / weight 0 on dropped slots, each token's
    experts best first). Returns new (topk_ids, topk_weights, dropped_mask); the inputs are not
    modified. The rules (problem.md, part 3):
      * dropped slots are served in order of decreasing score; the score of dropped slot (t, k) is
        the probability of the expert it was dropped from, which is token t's k-th largest
        probability (ties: lower slot index t*K + k first);
      * a slot goes to the expert with the highest probability for that token (ties: lower expert
        index) that has fewer than `capacity` slots and that the token does not already hold;
        if there is none, it stays dropped;
      * every token that received a slot gets its weights recomputed over its kept slots:
        w = p[t, e] / sum of p[t, e'] over the token's kept experts e'. Other tokens are untouched.
    """
    num_tokens, num_experts = router_logits.shape
    top_k = topk_ids.shape[1]
    device = topk_ids.device
    probs = router_logits.detach().float().softmax(dim=-1)
    cap = capacity(num_tokens, top_k, num_experts, capacity_factor)

    # The bookkeeping is sequential (each placement changes the room left), so it is plain Python
    # on small lists. T*K is at most a few thousand in a lesson; a production router would do this
    # with a parallel prefix sum per expert instead.
    ids = topk_ids.long().tolist()
    dropped = dropped_mask.tolist()
    load = [0] * num_experts
    for row in ids:
        for e in row:
            if e >= 0:
                load[e] += 1

    # Score of each dropped slot = the token's k-th largest probability (the expert it lost).
    ranked_probs = probs.sort(dim=-1, descending=True, stable=True).values[:, :top_k].tolist()
    waiting = [(t, k) for t in range(num_tokens) for k in range(top_k) if dropped[t][k]]
    waiting.sort(key=lambda slot: -ranked_probs[slot[0]][slot[1]])  # Python's sort is stable

    # Each token's experts from most to least likely: the order a dropped slot tries them in.
    preference = probs.sort(dim=-1, descending=True, stable=True).indices.tolist()
    touched = set()
    for t, k in waiting:
        held = set(ids[t])  # a token never meets the same expert twice
        for e in preference[t]:
            if load[e] < cap and e not in held:
                ids[t][k], dropped[t][k] = e, False
                load[e] += 1
                touched.add(t)
                break

    new_ids = torch.tensor(ids, dtype=torch.long, device=device)
    new_dropped = torch.tensor(dropped, dtype=torch.bool, device=device)
    new_weights = topk_weights.clone()
    for t in sorted(touched):
        kept = new_ids[t][~new_dropped[t]]
        p = probs[t, kept].to(new_weights.dtype)
        new_weights[t] = 0.0
        new_weights[t, ~new_dropped[t]] = p / p.sum()
    return new_ids, new_weights, new_dropped


# %%
# 4. How uneven is the load? Three numbers from per-expert counts
# ---------------------------------------------------------------

def gini(loads: torch.Tensor) -> float:
    """Gini coefficient: 0 when all loads are equal, (E-1)/E when one expert takes everything.

    With the loads sorted ascending x_1 <= ... <= x_n:  G = sum_i (2i - n - 1) x_i / (n * sum_i x_i).
    """
    x = loads.detach().to(torch.float64).reshape(-1).sort().values  # ascending
    n = x.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    return float(((2 * i - n - 1) * x).sum() / (n * x.sum()))


def coefficient_of_variation(loads: torch.Tensor) -> float:
    """Population standard deviation over mean (divide by n, not n-1: the E experts are the whole
    population, not a sample of it)."""
    x = loads.detach().to(torch.float64).reshape(-1)
    return float(x.std(correction=0) / x.mean())


def min_max_ratio(loads: torch.Tensor) -> float:
    """Least-loaded over most-loaded expert: 1 when equal, 0 when some expert is idle."""
    x = loads.detach().to(torch.float64).reshape(-1)
    return float(x.min() / x.max())


# %%
# 5. Stretch: auxiliary-loss-free balancing (DeepSeek-V3)
# -------------------------------------------------------

def update_bias(bias: torch.Tensor, loads: torch.Tensor, gamma: float) -> torch.Tensor:
    """One bias step: +gamma for every under-loaded expert (load < mean), -gamma for every
    over-loaded one (load > mean), unchanged at exactly the mean. Returns a new tensor.

    The bias is added to the scores for *selection only*; the combine weights still come from
    the unbiased scores, so the bias steers traffic without distorting what the model computes.
    """
    x = loads.to(bias.dtype)
    return bias + gamma * torch.sign(x.mean() - x)
