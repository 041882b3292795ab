"""tilemoe.routing: selection, metadata invariants, capacity dropping, statistics, aux loss."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_cases import check_metadata
import tilemoe
from tilemoe import routing as R


@st.composite
def routing_problems(draw):
    num_experts = draw(st.integers(1, 12))
    top_k = draw(st.integers(1, num_experts))
    num_tokens = draw(st.integers(0, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    # Coarse logits make exact ties common, so tie-breaking is exercised too.
    logits = torch.randint(-3, 4, (num_tokens, num_experts), generator=torch.Generator().manual_seed(seed)).float()
    return logits, top_k


@settings(max_examples=60, deadline=None)
@given(routing_problems())
def test_metadata_invariants(problem):
    logits, top_k = problem
    r = R.route(logits, top_k)
    num_tokens, num_experts = logits.shape
    check_metadata(r, num_tokens, top_k, num_experts)
    assert int(r.counts.sum()) == num_tokens * top_k
    # each token's K experts are distinct, and its weights are positive and sum to 1
    for row in r.topk_ids.tolist():
        assert len(set(row)) == top_k
    if num_tokens:
        assert torch.allclose(r.topk_weights.sum(1), torch.ones(num_tokens))


@settings(max_examples=60, deadline=None)
@given(routing_problems(), st.sampled_from([0.25, 0.5, 1.0, 1.25, 2.0]))
def test_capacity_drops_exactly_the_lowest_scored_overflow(problem, capacity_factor):
    logits, top_k = problem
    num_tokens, num_experts = logits.shape
    plain = R.route(logits, top_k)
    r = R.route(logits, top_k, capacity_factor=capacity_factor)
    capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
    assert r.capacity == capacity
    check_metadata(r, num_tokens, top_k, num_experts)
    orig, scores = plain.topk_ids.reshape(-1).long(), plain.topk_scores.reshape(-1)
    dropped = r.dropped.reshape(-1)
    for e in range(num_experts):
        mine = (orig == e).nonzero().flatten().tolist()
        # the kept are the `capacity` best by score; ties go to the lower token (slot) first
        ranked = sorted(mine, key=lambda s: (-float(scores[s]), s))
        assert sorted(s for s in mine if not dropped[s]) == sorted(ranked[:capacity])
        assert int(r.counts[e]) == min(len(mine), capacity)
    assert bool((r.topk_weights.reshape(-1)[dropped] == 0).all())
    assert torch.equal(r.topk_weights.reshape(-1)[~dropped], plain.topk_weights.reshape(-1)[~dropped])


def test_ties_go_to_the_lower_expert_index():
    r = R.route(torch.zeros(3, 6), 4)
    assert r.topk_ids.tolist() == [[0, 1, 2, 3]] * 3
    r = R.route(torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]]), 2)
    assert r.topk_ids.tolist() == [[1, 2]]


def test_sigmoid_bias_steers_selection_but_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    r = R.route(logits, 2, scoring="sigmoid", score_bias=bias, renormalize=False)
    assert r.topk_ids.tolist() == [[3, 0]]
    assert torch.allclose(r.topk_weights, torch.sigmoid(torch.tensor([[-1.0, 2.0]])))


def test_group_limited_selection_only_picks_from_the_best_groups():
    # 4 groups of 2; group scores (sum of top-2): g0 = 0.9+0.8, g1 = 1.0+0.0, g2 = 0.7+0.7, g3 = 0.1+0.1
    scores = torch.tensor([[0.9, 0.8, 1.0, 0.0, 0.7, 0.7, 0.1, 0.1]])
    logits = torch.logit(scores)
    r = R.route(logits, 3, scoring="sigmoid", num_groups=4, topk_groups=2)
    assert r.topk_ids.tolist() == [[0, 1, 4]]  # expert 2 (score 1.0) is in a dropped group


def test_routed_scaling_multiplies_weights():
    logits = torch.randn(5, 8)
    a, b = R.route(logits, 2), R.route(logits, 2, routed_scaling=2.5)
    assert torch.allclose(b.topk_weights, 2.5 * a.topk_weights)


# -- statistics, on loads computed by hand --

@pytest.mark.parametrize("loads, want", [
    ([5, 5, 5, 5], dict(gini=0.0, cv=0.0, mm=1.0, ent=math.log(4))),
    ([0, 0, 0, 4], dict(gini=0.75, cv=math.sqrt(3), mm=0.0, ent=0.0)),
    ([1, 2, 3, 4], dict(gini=0.25, cv=math.sqrt(1.25) / 2.5, mm=0.25,
                        ent=-sum(p * math.log(p) for p in (0.1, 0.2, 0.3, 0.4)))),
])
def test_statistics_by_hand(loads, want):
    assert R.gini(loads) == pytest.approx(want["gini"], abs=1e-12)
    assert R.coefficient_of_variation(loads) == pytest.approx(want["cv"], abs=1e-12)
    assert R.min_max_ratio(loads) == pytest.approx(want["mm"], abs=1e-12)
    assert R.entropy(loads) == pytest.approx(want["ent"], abs=1e-12)
    s = R.load_stats(torch.tensor(loads, dtype=torch.int32))
    assert s.gini == pytest.approx(want["gini"]) and s.normalized_entropy == pytest.approx(want["ent"] / math.log(4))


def test_tile_utilization_by_hand():
    # 142 rows -> 2 tiles, 128 -> 1 tile, 0 -> none: 270 real rows in 384
    assert R.tile_utilization([142, 128, 0], 128) == pytest.approx(270 / 384)
    assert R.tile_utilization([128, 256], 128) == 1.0
    assert R.tile_utilization([1], 64) == pytest.approx(1 / 64)
    assert R.tile_utilization([0, 0], 128) == 1.0  # no rows, no tiles, no waste
    assert R.tile_rows([142, 128, 0], 128) == 384


@pytest.mark.parametrize("bad, match", [([], "loads: expected at least one expert"),
                                        ([0, 0], "loads: expected at least one routed token"),
                                        ([1, -1], "loads: expected finite counts >= 0")])
def test_statistics_reject_meaningless_loads(bad, match):
    with pytest.raises(ValueError, match=match):
        R.gini(bad)


# -- the Switch/GShard auxiliary loss --

def test_load_balancing_loss_is_one_when_uniform_and_grows_with_imbalance():
    num_experts, num_tokens = 4, 8
    uniform_ids = torch.arange(num_tokens * 2).remainder(num_experts).view(num_tokens, 2)
    assert R.load_balancing_loss(torch.zeros(num_tokens, num_experts), uniform_ids, num_experts).item() == pytest.approx(1.0)
    skewed_logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]]).repeat(num_tokens, 1)
    skewed_ids = torch.tensor([[0, 1]]).repeat(num_tokens, 1)
    worse = R.load_balancing_loss(skewed_logits, skewed_ids, num_experts).item()
    one_hot = R.load_balancing_loss(torch.tensor([[50.0, 0, 0, 0]]).repeat(num_tokens, 1),
                                    torch.zeros(num_tokens, 1, dtype=torch.long), num_experts).item()
    assert 1.0 < worse < one_hot <= num_experts + 1e-6


def test_load_balancing_loss_takes_the_routing_counts():
    logits = torch.randn(10, 6, generator=torch.Generator().manual_seed(3))
    routing = R.route(logits, 2, capacity_factor=0.5)  # some slots dropped: id -1, not counted
    assert routing.dropped.any()
    want = R.load_balancing_loss(logits, routing.topk_ids, 6)
    assert R.load_balancing_loss(logits, routing.topk_ids, 6, counts=routing.counts).item() == pytest.approx(want.item())
    # the counts given are the ones used (twice the counts, twice the loss), not recounted from topk_ids
    doubled = R.load_balancing_loss(logits, routing.topk_ids, 6, counts=2 * routing.counts)
    assert doubled.item() == pytest.approx(2 * want.item())
    with pytest.raises(ValueError, match=r"counts: expected shape \[E\] = \[6\], got \[5\]"):
        R.load_balancing_loss(logits, routing.topk_ids, 6, counts=routing.counts[:5])


def test_load_balancing_loss_gradient_reaches_the_router():
    x = torch.randn(16, 8)
    router = torch.nn.Linear(8, 4, bias=False)
    logits = router(x)
    ids = R.route(logits.detach(), 2).topk_ids
    R.load_balancing_loss(logits, ids, 4).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_router_logits_gradients_and_what_they_keep(dtype):
    # The logits and both gradients are those of PyTorch's autograd of x.to(fp32) @ w.to(fp32)^T
    # (fp64 for fp64 x), for x of any leading shape; but the backward keeps x in its own dtype,
    # not the full-precision copy (128 MiB at 16384 tokens of H = 2048 in bf16).
    full = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(4, 16, generator=gen).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = R.router_logits(x, w)
    assert logits.dtype == full and saved == [dtype, torch.float32]
    d_logits = torch.randn(logits.shape, generator=gen, dtype=full)
    logits.backward(d_logits)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expected = x2.to(full) @ w2.to(full).t()
    expected.backward(d_logits)
    assert torch.equal(logits, expected)
    assert torch.allclose(x.grad.float(), x2.grad.float()) and torch.allclose(w.grad, w2.grad)
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_router_logits_backward_runs_in_bf16(dtype, monkeypatch):
    # Where the Triton logits kernel computed the logits of a bf16 x (a GPU; a stand-in here), the
    # backward's two GEMMs read the logits' gradient and w rounded to bf16 and sum in fp32; w's
    # gradient comes back in fp32, near the fp32 backward's. An fp16 x keeps the fp32 backward
    # (fp16 would flush tiny gradients to zero), exactly PyTorch's.
    class StandIn:
        @staticmethod
        def logits(x, w):
            return x.float() @ w.t()

    monkeypatch.setattr(R, "_logits_kernel", lambda x, w: StandIn)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 32, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(8, 32, generator=gen).requires_grad_()
    d_logits = torch.randn(64, 8, generator=gen)
    R.router_logits(x, w, fused=True).backward(d_logits)
    exact_x, exact_w = (d_logits @ w.detach()).to(dtype), d_logits.t() @ x.detach().float()
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32
    if dtype == torch.float16:
        assert torch.equal(x.grad, exact_x) and torch.equal(w.grad, exact_w)
        return
    d16 = d_logits.bfloat16()
    assert torch.equal(x.grad, d16 @ w.detach().bfloat16())
    assert torch.equal(w.grad, d16.t().float() @ x.detach().float())
    assert 0 < tilemoe.rel_error(w.grad, exact_w) <= tilemoe.TOLERANCE[torch.bfloat16]
    assert tilemoe.rel_error(x.grad, exact_x) <= tilemoe.TOLERANCE[torch.bfloat16]
    x.grad = w.grad = None
    R.router_logits(x, w).backward(d_logits)  # unfused: PyTorch's fp32 backward
    assert torch.equal(w.grad, exact_w)


def test_router_logits_are_twice_differentiable():
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(R.router_logits, (x, w))
    assert torch.autograd.gradgradcheck(R.router_logits, (x, w))
