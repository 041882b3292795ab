"""Tile-aware token rounding (SonicMoE: Guo, Mishra, Cheng, Stoica, Dao, arXiv 2512.14080).

A grouped GEMM runs each expert's rows in tiles of ``tile_size`` rows: an expert with 142 tokens
pays for two 128-row tiles, 256 rows of work for 142 real ones. Token rounding changes the
routing so that every expert's token count is a multiple of the tile, and then every tile is full:

    rounded = round_routing(router_scores, routing, tile_size=128, mode="nearest")
    y = tilemoe.moe_forward(x, ..., routing=rounded.routing)

Per expert, the count is rounded to a multiple of the tile ("down", "up" or "nearest"); the
expert's candidate tokens are ranked with the tokens that selected it above those that did not,
each group by router score (ties: lower token first); the expert keeps the first ``target`` of
them. Rounding down drops the expert's lowest-scored tokens; rounding up adds the best-scored
tokens that did not pick it. "adaptive" picks up or down per expert, whichever changes fewer
tokens, and rounds up every expert whose dropping would leave a token with no expert at all.

A token may end with fewer or more than K experts; its weights are its router scores over the
experts it keeps, renormalized (when ``renormalize``) and scaled by ``routed_scaling``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import checks
from .routing import Routing, build_routing, tile_rows, tile_utilization

MODES = ("down", "up", "nearest", "adaptive")


@dataclass(frozen=True)
class RoundingStats:
    """What rounding did to one routing decision."""

    mode: str
    tile_size: int
    counts_before: list[int]
    counts_after: list[int]
    utilization_before: float   # real rows / rows of the tiles run, before and after
    utilization_after: float
    padded_rows_before: int      # rows of partly filled tiles that hold no token
    padded_rows_after: int
    pairs_dropped: int           # (token, expert) pairs removed by rounding down
    pairs_added: int             # pairs added by rounding up
    tokens_without_expert: int   # tokens that had an expert before and have none after

    def as_row(self) -> dict:
        return {
            "mode": self.mode, "util before": self.utilization_before, "util after": self.utilization_after,
            "padded rows before": self.padded_rows_before, "padded rows after": self.padded_rows_after,
            "pairs dropped": self.pairs_dropped, "pairs added": self.pairs_added,
            "tokens w/o expert": self.tokens_without_expert,
        }


@dataclass(frozen=True)
class Rounded:
    routing: Routing
    stats: RoundingStats


def target_counts(counts: torch.Tensor, tile_size: int, mode: str, num_tokens: int) -> torch.Tensor:
    """Each expert's token count rounded to a multiple of tile_size (int64 [E]).

    "up" never exceeds num_tokens (an expert takes each token at most once): when the next
    multiple of the tile is larger than T, the expert takes every token. "nearest" rounds a
    remainder of half a tile or more up. "adaptive" rounds to whichever multiple is fewer tokens
    away (up on a tie, so that no token is dropped for nothing).
    """
    checks.check_choice("mode", mode, MODES)
    counts = counts.long()
    down = counts // tile_size * tile_size
    up = torch.clamp(-(-counts // tile_size) * tile_size, max=num_tokens)
    if mode == "down":
        return down
    if mode == "up":
        return up
    if mode == "nearest":
        return torch.where(2 * (counts - down) >= tile_size, up, down)
    return torch.where(counts - down < up - counts, down, up)


def rank_candidates(selected: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """rank[t, e]: position of token t in expert e's candidate order (0 = first kept).

    Order: tokens that selected e first, then the others; inside each group, higher score first;
    ties to the lower token. Two stable sorts build this composite order without assuming a
    score range.
    """
    by_score = torch.argsort(scores, dim=0, descending=True, stable=True)
    by_selected = torch.argsort(selected.gather(0, by_score).to(torch.int8), dim=0, descending=True, stable=True)
    order = by_score.gather(0, by_selected)
    rank = torch.empty_like(order)
    positions = torch.arange(order.shape[0], device=order.device).unsqueeze(1).expand_as(order)
    rank.scatter_(0, order, positions)
    return rank


def round_routing(
    router_scores: torch.Tensor,
    routing: Routing,
    tile_size: int = 128,
    mode: str = "nearest",
    *,
    renormalize: bool = True,
    routed_scaling: float = 1.0,
) -> Rounded:
    """Round every expert's token count to a multiple of ``tile_size``; see the module docstring.

    router_scores [T, E]: the router's scores of every (token, expert) pair (softmax probabilities
    or sigmoid scores), used to rank candidates and as the new weights. routing: the vanilla
    top-k decision being rounded. Returns the new Routing (width K' = the most experts any token
    keeps, padded with -1) and its RoundingStats. Reading K' and the statistics costs host syncs.
    """
    checks.check_float_tensor("router_scores", router_scores)
    if not isinstance(routing, Routing):
        checks.fail("routing", "a tilemoe.routing.Routing", type(routing).__name__, TypeError)
    num_tokens, num_experts = routing.num_tokens, routing.num_experts
    checks.check_shape("router_scores", router_scores, (num_tokens, num_experts),
                       f"[T, E] = [{num_tokens}, {num_experts}] (the routing's)")
    if router_scores.device != routing.topk_ids.device:
        checks.fail("router_scores", f"device {routing.topk_ids.device} (the routing's)", router_scores.device)
    checks.check_int("tile_size", tile_size, low=1)
    checks.check_choice("mode", mode, MODES)
    checks.check_positive_float("routed_scaling", routed_scaling)

    ids = routing.topk_ids.long()
    selected = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool, device=ids.device)
    selected.scatter_(1, torch.where(ids < 0, num_experts, ids), True)
    selected = selected[:, :num_experts]
    counts = selected.sum(dim=0)
    rank = rank_candidates(selected, router_scores)
    target = target_counts(counts, tile_size, mode, num_tokens)
    keep = rank < target.unsqueeze(0)

    if mode == "adaptive":
        # A token every one of whose experts rounded down would vanish from the layer: round
        # those experts up instead. Rounding up never removes a token, so one pass suffices.
        orphans = selected.any(dim=1) & ~keep.any(dim=1)
        if bool(orphans.any()):
            rescue = (selected & ~keep & orphans.unsqueeze(1)).any(dim=0)
            target = torch.where(rescue, target_counts(counts, tile_size, "up", num_tokens), target)
            keep = rank < target.unsqueeze(0)

    width = max(1, int(keep.sum(dim=1).max())) if num_tokens else 1
    kept_scores = router_scores.masked_fill(~keep, float("-inf"))
    values, new_ids = kept_scores.sort(dim=1, descending=True, stable=True)
    values, new_ids = values[:, :width], new_ids[:, :width]
    valid = torch.isfinite(values)
    scores = torch.where(valid, values, torch.zeros_like(values))
    weights = scores
    if renormalize:
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    weights = weights * routed_scaling
    after = keep.sum(dim=0)
    counts_after = after.tolist()
    # Every expert on a tile boundary (the usual case; "up" capped at T tokens, or "adaptive", can
    # leave one off): tell the kernels, which then skip their row masks.
    aligned = all(c % tile_size == 0 for c in counts_after)
    new_routing = build_routing(torch.where(valid, new_ids, -1), weights, scores, num_experts, has_empty_slots=True)
    new_routing = replace(new_routing, row_multiple=tile_size if aligned else 1)

    stats = RoundingStats(
        mode=mode, tile_size=tile_size,
        counts_before=counts.tolist(), counts_after=counts_after,
        utilization_before=tile_utilization(counts, tile_size), utilization_after=tile_utilization(after, tile_size),
        padded_rows_before=tile_rows(counts, tile_size) - int(counts.sum()),
        padded_rows_after=tile_rows(after, tile_size) - int(after.sum()),
        pairs_dropped=int((selected & ~keep).sum()), pairs_added=int((keep & ~selected).sum()),
        tokens_without_expert=int((selected.any(dim=1) & ~keep.any(dim=1)).sum()),
    )
    return Rounded(new_routing, stats)
