"""tilemoe.rounding: tile-aware token rounding invariants (hypothesis) and its use in moe_forward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tilemoe
from moe_cases import check_metadata, make_weights
from tilemoe import rounding


@st.composite
def problems(draw):
    num_experts = draw(st.integers(1, 10))
    top_k = draw(st.integers(1, num_experts))
    num_tokens = draw(st.integers(1, 60))
    tile = draw(st.sampled_from([1, 2, 4, 8, 16]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    if draw(st.booleans()):  # coarse logits: many exact ties
        logits = logits.round()
    return logits, top_k, tile


def rounded(logits, top_k, tile, mode):
    scores = logits.softmax(dim=-1)
    vanilla = tilemoe.route(logits, top_k)
    return vanilla, scores, rounding.round_routing(scores, vanilla, tile, mode)


def pair_sets(routing):
    ids = routing.topk_ids.long()
    return {(t, int(e)) for t, row in enumerate(ids) for e in row if e >= 0}


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from(rounding.MODES))
def test_rounding_invariants(problem, mode):
    logits, top_k, tile = problem
    num_tokens, num_experts = logits.shape
    vanilla, scores, out = rounded(logits, top_k, tile, mode)
    r, s = out.routing, out.stats
    check_metadata(r, num_tokens, r.top_k, num_experts)
    counts = r.counts.long()
    assert counts.tolist() == s.counts_after
    before = vanilla.counts.long()
    down = before // tile * tile
    up = torch.clamp(-(-before // tile) * tile, max=num_tokens)
    if mode == "adaptive":
        assert bool(((counts == down) | (counts == up)).all())
        assert s.tokens_without_expert == 0  # adaptive promises every token keeps an expert
    else:
        assert bool(((counts % tile == 0) | (counts == num_tokens)).all())  # full tiles, or every token
    if mode == "down":
        assert s.pairs_added == 0 and s.utilization_after == 1.0
    if mode == "up":
        assert s.pairs_dropped == 0 and s.tokens_without_expert == 0

    old, new = pair_sets(vanilla), pair_sets(r)
    assert len(old - new) == s.pairs_dropped and len(new - old) == s.pairs_added
    for e in range(num_experts):
        kept_sel = [float(scores[t, e]) for (t, x) in old & new if x == e]
        dropped = [float(scores[t, e]) for (t, x) in old - new if x == e]
        added = [float(scores[t, e]) for (t, x) in new - old if x == e]
        unchosen = [float(scores[t, e]) for t in range(num_tokens) if (t, e) not in old | new]
        if dropped:   # the dropped are the expert's lowest-scored selected tokens
            assert not added and max(dropped) <= min(kept_sel, default=float("inf"))
        if added:     # the added are its best-scored unselected tokens
            assert min(added) >= max(unchosen, default=float("-inf"))
    # weights: the token's scores over the experts it keeps, renormalized
    ids, w = r.topk_ids.long(), r.topk_weights
    for t in range(num_tokens):
        mine = ids[t][ids[t] >= 0]
        if mine.numel():
            expect = scores[t, mine] / scores[t, mine].sum()
            assert torch.allclose(w[t][ids[t] >= 0], expect, atol=1e-6)
        assert bool((w[t][ids[t] < 0] == 0).all())


def test_counts_by_hand():
    counts = torch.tensor([0, 1, 3, 4, 5, 6, 8, 142])
    assert rounding.target_counts(counts, 4, "down", 1000).tolist() == [0, 0, 0, 4, 4, 4, 8, 140]
    assert rounding.target_counts(counts, 4, "up", 1000).tolist() == [0, 4, 4, 4, 8, 8, 8, 144]
    assert rounding.target_counts(counts, 4, "nearest", 1000).tolist() == [0, 0, 4, 4, 4, 8, 8, 144]
    assert rounding.target_counts(counts, 4, "adaptive", 1000).tolist() == [0, 0, 4, 4, 4, 8, 8, 144]  # ties go up
    assert rounding.target_counts(torch.tensor([5]), 4, "up", 6).tolist() == [6]  # capped at T


def test_tile_utilization_reaches_one_at_real_shape():
    logits = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    vanilla, scores, out = rounded(logits, 8, 128, "nearest")
    assert out.stats.utilization_before < 0.95 and out.stats.utilization_after == 1.0
    assert out.stats.padded_rows_after == 0 and out.stats.padded_rows_before > 0


def test_row_multiple_says_whether_every_expert_is_aligned():
    logits = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    assert tilemoe.route(logits, 8).row_multiple == 1
    _, _, out = rounded(logits, 8, 128, "nearest")
    assert out.routing.row_multiple == 128 and all(c % 128 == 0 for c in out.stats.counts_after)
    # "up" is capped at T tokens: with 6 tokens and a tile of 4, a busy expert keeps all 6
    _, _, capped = rounded(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), 3, 4, "up")
    assert any(c % 4 for c in capped.stats.counts_after) and capped.routing.row_multiple == 1


@pytest.mark.parametrize("mode", rounding.MODES)
@pytest.mark.parametrize("backend", ["torch", "grouped_mm"])
def test_rounded_routing_runs_through_every_backend(mode, backend, poison_uninitialized_memory):
    w = make_weights(32, 16, 8, seed=1)
    x = torch.randn(70, 32)
    logits = tilemoe.router_logits(x, w["router_weight"])
    vanilla, scores, out = rounded(logits, 2, 8, mode)
    y = tilemoe.moe_forward(x, **w, top_k=out.routing.top_k, backend=backend, routing=out.routing)
    ref = tilemoe.reference_moe(x, **w, top_k=out.routing.top_k, routing=out.routing)
    assert tilemoe.rel_error(y, ref) <= 1e-5


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(tile_size=0), ValueError, r"tile_size: expected an int >= 1, got 0"),
    (dict(mode="ceil"), ValueError, r"mode: expected one of 'down', 'up', 'nearest', 'adaptive', got 'ceil'"),
    (dict(router_scores=torch.rand(5, 4)), ValueError, r"router_scores: expected shape \[T, E\] = \[6, 4\] \(the routing's\), got \[5, 4\]"),
    (dict(routing="topk"), TypeError, r"routing: expected a tilemoe.routing.Routing, got str"),
])
def test_bad_input(kwargs, exc, match):
    logits = torch.randn(6, 4)
    args = dict(router_scores=logits.softmax(-1), routing=tilemoe.route(logits, 2), tile_size=4, mode="up")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        rounding.round_routing(**args)


def test_adaptive_rounds_up_an_expert_that_would_orphan_a_token():
    # 9 tokens, top-1, tile 4: expert 0 has 5 tokens (nearest multiple: 4, dropping its weakest
    # token, whose only expert it is); expert 1 has 4 (a full tile: it changes nothing).
    logits = torch.tensor([[3.0, 0.0]] * 4 + [[1.0, 0.0]] + [[0.0, 2.0]] * 4)
    vanilla, scores, out = rounded(logits, 1, 4, "adaptive")
    assert vanilla.counts.tolist() == [5, 4]
    assert out.stats.tokens_without_expert == 0
    assert out.stats.counts_after == [8, 4]  # expert 0 rounded up to keep token 4
    _, _, down = rounded(logits, 1, 4, "down")
    assert down.stats.tokens_without_expert == 1  # what adaptive avoided


def test_target_counts_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match=r"mode: expected one of 'down', 'up', 'nearest', 'adaptive', got 'ceil'"):
        rounding.target_counts(torch.tensor([3]), 4, "ceil", 10)
