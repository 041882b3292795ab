"""Inputs shared by the tests: random MoE weights and routing decisions forced into ragged shapes."""

from __future__ import annotations

import torch

from tilemoe.routing import Routing, build_routing


def make_weights(hidden: int, ffn: int, experts: int, *, dtype=torch.float32, device="cpu", seed: int = 0, shared: int = 0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, fan_in, dt=dtype):
        return (torch.randn(*shape, generator=g) / fan_in**0.5).to(device=device, dtype=dt)

    w = {
        "router_weight": randn(experts, hidden, fan_in=hidden, dt=torch.float32),
        "w_gate_up": randn(experts, 2 * ffn, hidden, fan_in=hidden),
        "w_down": randn(experts, hidden, ffn, fan_in=ffn),
    }
    if shared:
        w["shared_gate_up"] = randn(shared, 2 * ffn, hidden, fan_in=hidden)
        w["shared_down"] = randn(shared, hidden, ffn, fan_in=ffn)
    return w


def forced_routing(ids: torch.Tensor, num_experts: int, *, seed: int = 0) -> Routing:
    """A Routing with the given expert ids [T, K] and random positive weights summing to 1 per token."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(ids.shape, generator=g).to(ids.device) + 0.05
    weights = scores / scores.sum(dim=1, keepdim=True)
    return build_routing(ids, weights, scores, num_experts)


def distinct_ids(num_tokens: int, top_k: int, pool: list[int], *, seed: int = 0, first: int | None = None) -> torch.Tensor:
    """[T, K] ids, each row K distinct experts drawn from ``pool``; column 0 fixed to ``first`` if given."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_tokens):
        rest = [e for e in pool if e != first]
        pick = [rest[i] for i in torch.randperm(len(rest), generator=g)[: top_k - (first is not None)].tolist()]
        rows.append(([first] if first is not None else []) + pick)
    return torch.tensor(rows, dtype=torch.int64).reshape(num_tokens, top_k)


# name -> (T, K, E, ids builder): empty experts, one hot expert, T=1, top_k=E, T not a multiple of a tile.
RAGGED = {
    "random": (37, 2, 8, lambda: distinct_ids(37, 2, list(range(8)), seed=1)),
    "empty-experts": (40, 2, 8, lambda: distinct_ids(40, 2, [1, 4, 6], seed=2)),
    "one-expert-takes-all": (33, 1, 8, lambda: torch.full((33, 1), 5)),
    "hot-expert-in-every-token": (29, 3, 8, lambda: distinct_ids(29, 3, list(range(8)), seed=3, first=7)),
    "single-token": (1, 2, 8, lambda: torch.tensor([[6, 2]])),
    "top_k-equals-E": (19, 4, 4, lambda: distinct_ids(19, 4, list(range(4)), seed=4)),
    "tile-plus-one-rows": (129, 1, 2, lambda: torch.cat([torch.zeros(129, 1, dtype=torch.int64)])),
}


def check_metadata(r: Routing, num_tokens: int, top_k: int, num_experts: int):
    n = num_tokens * top_k
    ids = r.topk_ids.reshape(-1).long()
    kept = ids >= 0
    # the permutation is a bijection of the T*K slots, and slot_position is its inverse
    assert sorted(r.sorted_slots.tolist()) == list(range(n))
    assert torch.equal(r.sorted_slots[r.slot_position], torch.arange(n))
    # counts are the kept slots per expert; offsets are their exclusive prefix sum
    assert r.counts.dtype == torch.int32 and r.offsets.dtype == torch.int32
    assert r.counts.tolist() == [int((ids == e).sum()) for e in range(num_experts)]
    assert r.offsets[0] == 0 and int(r.offsets[-1]) == int(kept.sum())
    assert bool((r.offsets[1:] >= r.offsets[:-1]).all())
    # each expert's segment holds exactly its slots, in token order; dropped slots come last
    for e in range(num_experts):
        seg = r.sorted_slots[r.offsets[e]:r.offsets[e + 1]]
        assert bool((ids[seg] == e).all()) and seg.tolist() == sorted(seg.tolist())
    assert bool((ids[r.sorted_slots[int(r.offsets[-1]):]] == -1).all())
    assert torch.equal(r.sorted_tokens, r.sorted_slots // max(top_k, 1))
