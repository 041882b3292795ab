"""Backend "triton" and its kernels against the reference, on ragged routing, memory poisoned.

On a machine without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before tilemoe is imported,
so the kernels run in Triton's interpreter (float16/float32, small shapes). On a GPU the same
checks run compiled, in bfloat16 too (pytest -m gpu).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import tilemoe
from moe_cases import RAGGED, distinct_ids, forced_routing, make_weights
from tilemoe import backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# On a GPU machine every test here runs on the GPU, so `pytest -m gpu` selects them all.
pytestmark = [pytest.mark.usefixtures("poison_uninitialized_memory"), *([pytest.mark.gpu] if DEVICE.type == "cuda" else [])]
REASON = backends.unavailable_reason("triton", DEVICE, torch.float32, 64, 32)
needs_triton = pytest.mark.skipif(REASON is not None, reason=str(REASON))
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def ops():
    from tilemoe.triton import configs, ops

    return ops, configs


def check(x, w, top_k, routing, *, tile_configs=None, store_pre=False):
    """Run the kernels, compare y (and the saved activations) with the float64 reference."""
    ops_mod, _ = ops()
    y, saved = ops_mod.moe_experts(x, routing, w["w_gate_up"], w["w_down"], tile_configs=tile_configs, store_pre=store_pre)
    ref = tilemoe.reference_moe(x.double(), **{k: v.double() for k, v in w.items()}, top_k=top_k, routing=routing)
    assert y.dtype == x.dtype and y.shape == x.shape
    err = tilemoe.rel_error(y, ref)
    assert err <= tilemoe.TOLERANCE[x.dtype], err
    return y, saved


@needs_triton
@pytest.mark.parametrize("case", list(RAGGED))
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_reference_on_ragged_routing(case, dtype):
    num_tokens, top_k, num_experts, ids = RAGGED[case]
    w = make_weights(64, 48, num_experts, dtype=dtype, device=DEVICE, seed=11)
    x = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    routing = forced_routing(ids().to(DEVICE), num_experts, seed=4)
    y = tilemoe.moe_forward(x, **w, top_k=top_k, backend="triton", routing=routing)
    ref = tilemoe.reference_moe(x.double(), **{k: v.double() for k, v in w.items()}, top_k=top_k, routing=routing)
    assert tilemoe.rel_error(y, ref) <= tilemoe.TOLERANCE[dtype]


def tile(block_m, block_n, block_k, persistent=False, tma=False):
    _, configs = ops()
    return configs.TileConfig(block_m, block_n, block_k, group_m=2, num_warps=4, num_stages=2, persistent=persistent,
                              tma=tma)


@needs_triton
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("block_m", [16, 32])
def test_every_tile_shape_and_launch_on_ragged_shapes(block_m, persistent, tma):
    # H = 40 and I = 24 are not multiples of BLOCK_K = 32 / BLOCK_N = 16: the masked (or, with TMA,
    # zero-filled) K tail, and column tiles that reach into the next expert's rows.
    num_experts, top_k = 6, 2
    w = make_weights(40, 24, num_experts, device=DEVICE, seed=2)
    x = torch.randn(71, 40, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ids = distinct_ids(71, top_k, [0, 2, 3, 5], seed=6, first=3)  # empty experts 1 and 4, expert 3 in every token
    routing = forced_routing(ids.to(DEVICE), num_experts, seed=1)
    cfg = tile(block_m, 16, 32, persistent, tma)
    ops_mod, _ = ops()
    assert ops_mod.tma_allowed(w["w_down"]) == tma_possible(), "TMA must run where the test expects it"
    check(x, w, top_k, routing, tile_configs=(cfg, cfg))


@needs_triton
@pytest.mark.parametrize("tma", [False, True])
def test_half_height_tiles_take_the_small_expert_tails(tma):
    # 128-row tiles: expert 0's 158 rows end in a 30-row block and expert 3's 64 rows are one block
    # of exactly half a tile (half-height tiles); expert 1's 228 rows end in 100 rows and expert 4's
    # 65 rows are one block of just over half (full tiles); expert 2 is empty.
    counts = [158, 228, 0, 64, 65]
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(4))][:, None]
    w = make_weights(40, 24, len(counts), device=DEVICE, seed=5)
    x = torch.randn(ids.shape[0], 40, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    routing = forced_routing(ids.to(DEVICE), len(counts), seed=2)
    cfg = tile(128, 16, 32, False, tma)
    ops_mod, _ = ops()
    real = ops_mod.grouped_gemm_kernel
    half = []

    loads_by_tma = []

    class Spy:  # records the HALF_TAILS and W_TMA flags of each launch, then launches the real kernel
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                half.append(kwargs["HALF_TAILS"])
                loads_by_tma.append(kwargs["W_TMA"])
                return real[grid](*args, **kwargs)
            return launch

    off = type(cfg)(**{**cfg.as_dict(), "half_tails": False})
    persistent = tile(128, 16, 32, True, tma)  # a persistent launch keeps whole tiles (configs.uses_half_tails)
    with mock.patch.object(ops_mod, "grouped_gemm_kernel", Spy()):
        _, saved = check(x, w, 1, routing, tile_configs=(cfg, cfg), store_pre=True)
        check(x, w, 1, routing, tile_configs=(off, off))
        check(x, w, 1, routing, tile_configs=(persistent, persistent))
    assert half == [True, True, False, False, False, False]
    assert loads_by_tma == [tma and tma_possible()] * 6, "the spy must not change which loads the kernels take"
    # The half branch stores the pre-activation too: every kept row's [gate | up], rows past the
    # experts' ends untouched (poisoned memory would show a missing row as NaN).
    end = int(routing.offsets[-1])
    rows = x[routing.sorted_tokens[:end]].double()
    expert = torch.repeat_interleave(torch.arange(len(counts), device=DEVICE), routing.counts.long())
    pre = torch.einsum("rh,rnh->rn", rows, w["w_gate_up"].double()[expert])
    assert tilemoe.rel_error(saved["pre"][:end], pre) <= 1e-5


def tma_possible() -> bool:
    ops_mod, _ = ops()
    return ops_mod.interpreted() or torch.cuda.get_device_capability()[0] >= 9


@needs_triton
def test_dropped_slots_by_capacity_and_rounding_are_never_summed():
    w = make_weights(64, 32, 8, device=DEVICE, seed=3)
    x = torch.randn(90, 64, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    logits = tilemoe.router_logits(x, w["router_weight"])
    dropped = tilemoe.route(logits, 2, capacity_factor=0.5)
    assert bool(dropped.dropped.any())
    check(x, w, 2, dropped)
    rounded = tilemoe.round_routing(logits.softmax(-1), tilemoe.route(logits, 2), 16, "down").routing
    assert rounded.has_empty_slots
    check(x, w, rounded.top_k, rounded, tile_configs=(tile(16, 16, 32), tile(16, 16, 32)))


@needs_triton
@pytest.mark.parametrize("persistent", [False, True])
def test_tile_aligned_routing_takes_the_unmasked_path(persistent, poison_uninitialized_memory):
    # Rounded to 16-row tiles, every 16-row block is full: both GEMMs store without masks (and
    # poisoned memory shows that nothing is missed); the top-k routing keeps its masks.
    w = make_weights(64, 32, 8, device=DEVICE, seed=3)
    x = torch.randn(90, 64, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    logits = tilemoe.router_logits(x, w["router_weight"])
    rounded = tilemoe.round_routing(logits.softmax(-1), tilemoe.route(logits, 2), 16, "nearest").routing
    assert rounded.row_multiple == 16 and bool((rounded.counts % 16 == 0).all())
    cfg = tile(16, 16, 32, persistent)
    ops_mod, _ = ops()
    real = ops_mod.grouped_gemm_kernel
    flags = []

    class Spy:  # records what each launch was told, then launches the real kernel
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                flags.append((kwargs["ROWS_FULL"], kwargs["EVEN_N"]))
                return real[grid](*args, **kwargs)
            return launch

    with mock.patch.object(ops_mod, "grouped_gemm_kernel", Spy()):
        check(x, w, rounded.top_k, rounded, tile_configs=(cfg, cfg), store_pre=True)
        check(x, w, 2, tilemoe.route(logits, 2), tile_configs=(cfg, cfg))
    assert flags == [(True, True), (True, True), (False, True), (False, True)]


@needs_triton
def test_saved_pre_activation_and_activation_are_the_expert_products():
    num_experts, top_k = 4, 2
    w = make_weights(32, 16, num_experts, device=DEVICE, seed=7)
    x = torch.randn(23, 32, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    routing = forced_routing(distinct_ids(23, top_k, [0, 1, 3], seed=2).to(DEVICE), num_experts)
    _, saved = check(x, w, top_k, routing, store_pre=True)
    end = int(routing.offsets[-1])
    rows = x[routing.sorted_tokens[:end]].double()
    expert = torch.repeat_interleave(torch.arange(num_experts, device=DEVICE), routing.counts.long())
    pre = torch.einsum("rh,rnh->rn", rows, w["w_gate_up"].double()[expert])
    gate, up = pre.chunk(2, dim=1)
    assert tilemoe.rel_error(saved["pre"][:end], pre) <= 1e-5
    assert tilemoe.rel_error(saved["act"][:end], torch.nn.functional.silu(gate) * up) <= 1e-5


@needs_triton
@pytest.mark.parametrize("block_m", [16, 64])
def test_schedule_lists_every_expert_block_once(block_m):
    ops_mod, _ = ops()
    counts = [0, 5, 64, 0, 65, 1, 0, 130]
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])[torch.randperm(sum(counts))]
    routing = forced_routing(ids.view(-1, 1).to(DEVICE), len(counts))
    sched = ops_mod.Schedule(routing, block_m)
    want = [(e, start) for e, c in enumerate(counts) for start in range(sum(counts[:e]), sum(counts[:e]) + c, block_m)]
    n = int(sched.num_blocks)
    assert n == len(want) and sched.max_blocks >= n
    assert list(zip(sched.expert[:n].tolist(), sched.row[:n].tolist())) == want
    assert bool((sched.expert[n:] == -1).all())


def test_configs_rule_and_table_lookup():
    _, configs = ops()
    assert configs.rule("up", 1).block_m == 16 and configs.rule("down", 8).block_m == 16
    assert configs.rule("up", 16).block_m == 32 and configs.rule("down", 20).block_m == 32
    assert configs.rule("down", 40).block_m == 64 and configs.rule("up", 48).block_m == 64
    assert configs.rule("up", 49).block_m == 128 and configs.rule("down", 64).block_m == 128
    assert configs.rule("up", 4096).block_m == 128
    assert configs.pick("up", 1024, 2048, 4096, None) == configs.rule("up", 4096)
    assert configs.pick("up", 1024, 2048, 4096, "a-gpu-never-tuned") == configs.rule("up", 4096)


def test_unavailable_reasons_name_the_problem():
    reason = backends.unavailable_reason("triton", torch.device("cpu"), torch.bfloat16, 64, 32)
    assert reason is not None and ("bf16" in reason or "interpreter" in reason)
    ops_mod, _ = ops()
    if ops_mod.interpreted():
        assert "TRITON_INTERPRET" in ops_mod.unavailable_reason(torch.device("cuda"), torch.bfloat16)
    else:
        assert "interpreter" in ops_mod.unavailable_reason(torch.device("cpu"), torch.float32)


@needs_triton
def test_noncontiguous_weight_is_refused_before_any_kernel():
    w = make_weights(32, 16, 4, device=DEVICE)
    w["w_down"] = w["w_down"].transpose(1, 2).contiguous().transpose(1, 2)
    x = torch.randn(5, 32, device=DEVICE)
    with pytest.raises(ValueError, match="w_down: expected a contiguous tensor"):
        tilemoe.moe_forward(x, **w, top_k=2, backend="triton")


# -- GPU only -------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, tokens", [
    *((p, t) for p in ("olmoe-1b-7b", "qwen3-30b-a3b", "deepseek-v3") for t in (1, 64, 1000)),
    ("olmoe-1b-7b", 128), ("mixtral-8x7b", 64),  # 16 rows per expert: the 32-row decode tiles
    ("qwen3-30b-a3b", 512), ("deepseek-v3", 2048),  # 32 and 64 rows per expert: 64- and 128-row tiles
])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_triton_at_real_shapes_bf16(preset, tokens):
    cfg = tilemoe.get_preset(preset)
    w = cfg.init_weights(device="cuda", dtype=torch.bfloat16, shared=False)
    x = torch.randn(tokens, cfg.hidden, device="cuda").bfloat16()  # 1000: not a multiple of any tile
    routing = tilemoe.route(tilemoe.router_logits(x, w["router_weight"]), cfg.top_k, **cfg.router_options())
    y = tilemoe.moe_forward(x, **w, top_k=cfg.top_k, backend="triton", routing=routing)
    ref = tilemoe.reference_moe(x.float(), **{k: v.float() for k, v in w.items()}, top_k=cfg.top_k, routing=routing)
    assert tilemoe.rel_error(y, ref) <= tilemoe.TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_triton_forward_has_no_host_sync():
    cfg = tilemoe.get_preset("olmoe-1b-7b")
    w = cfg.init_weights(device="cuda", dtype=torch.bfloat16, shared=False)
    x = torch.randn(4096, cfg.hidden, device="cuda").bfloat16()
    tilemoe.moe_forward(x, **w, top_k=cfg.top_k, backend="triton", **cfg.router_options())  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tilemoe.moe_forward(x, **w, top_k=cfg.top_k, backend="triton", **cfg.router_options())
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_triton
def test_gradients_flow_to_x_the_router_and_both_weights():
    w = make_weights(32, 16, 4, device=DEVICE, seed=12)
    x = torch.randn(37, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ours = {k: v.clone().requires_grad_() for k, v in w.items()}
    ref_w = {k: v.double().requires_grad_() for k, v in w.items()}
    xs, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    dy = torch.randn(37, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    tilemoe.moe_forward(xs, **ours, top_k=2, backend="triton").backward(dy)
    tilemoe.reference_moe(x64, **ref_w, top_k=2).backward(dy.double())
    assert tilemoe.rel_error(xs.grad, x64.grad) <= 1e-4
    for name in ours:
        assert tilemoe.rel_error(ours[name].grad, ref_w[name].grad) <= 1e-4, name


ROUTERS = {
    "softmax": dict(),
    "softmax, not renormalized": dict(renormalize=False),
    "sigmoid, bias, groups, scaling": dict(scoring="sigmoid", num_groups=8, topk_groups=4, routed_scaling=2.5, bias=True),
    "sigmoid, groups of one": dict(scoring="sigmoid", num_groups=64, topk_groups=16),
}


@needs_triton
@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(1, 64, 8), (3, 64, 8), (37, 64, 6), (130, 64, 1)])
def test_fused_router_selects_what_the_pytorch_router_selects(router, num_tokens, num_experts, top_k):
    opts = dict(ROUTERS[router])
    g = torch.Generator().manual_seed(num_tokens)
    if opts.pop("bias", False):
        opts["score_bias"] = (torch.randn(num_experts, generator=g) * 0.1).to(DEVICE)
    logits = torch.randn(num_tokens, num_experts, generator=g).to(DEVICE)
    logits[0, 5] = logits[0, 9] = logits[0].max() + 1  # an exact tie: the lower expert goes first
    want = tilemoe.route(logits, top_k, **opts)
    from tilemoe.triton import router as triton_router

    with mock.patch.object(triton_router, "select_experts", wraps=triton_router.select_experts) as kernel:
        got = tilemoe.route(logits, top_k, fused=True, **opts)
    assert kernel.call_count == 1, "the Triton router did not run"
    assert torch.equal(got.topk_ids, want.topk_ids)
    torch.testing.assert_close(got.topk_weights, want.topk_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.topk_scores, want.topk_scores, rtol=1e-5, atol=1e-6)
    for field in ("counts", "offsets", "sorted_slots", "slot_position", "sorted_tokens"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


@needs_triton
def test_fused_router_is_skipped_where_it_cannot_run():
    logits = torch.randn(5, 48, device=DEVICE)  # 48 experts in 3 groups: not a power of two
    grouped = tilemoe.route(logits, 2, scoring="sigmoid", num_groups=3, topk_groups=2, fused=True)
    assert grouped.topk_ids.dtype == torch.int32 and torch.equal(
        grouped.topk_ids, tilemoe.route(logits, 2, scoring="sigmoid", num_groups=3, topk_groups=2).topk_ids)


@needs_triton
@pytest.mark.parametrize("router", list(ROUTERS))
def test_fused_router_in_training_chooses_with_the_kernel_and_keeps_the_gradient(router):
    """Logits that want a gradient: the kernel still chooses (no [T, E] sort), and the weights and
    the logits' gradient are those of the PyTorch router's autograd."""
    opts = dict(ROUTERS[router])
    g = torch.Generator().manual_seed(7)
    if opts.pop("bias", False):
        opts["score_bias"] = (torch.randn(64, generator=g) * 0.1).to(DEVICE)
    logits = torch.randn(37, 64, generator=g).to(DEVICE)
    d_weights = torch.randn(37, 6, generator=g).to(DEVICE)
    want_leaf, got_leaf = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    want = tilemoe.route(want_leaf, 6, capacity_factor=0.8, **opts)
    from tilemoe.triton import router as triton_router

    with mock.patch.object(triton_router, "select_experts", wraps=triton_router.select_experts) as kernel, \
            mock.patch.object(torch.Tensor, "sort", side_effect=AssertionError("the PyTorch sort ran")):
        got = tilemoe.route(got_leaf, 6, capacity_factor=0.8, fused=True, **opts)
    assert kernel.call_count == 1, "the Triton router did not run"
    assert torch.equal(got.topk_ids, want.topk_ids) and got.dropped.any()
    torch.testing.assert_close(got.topk_weights, want.topk_weights, rtol=1e-5, atol=1e-6)
    (want.topk_weights * d_weights).sum().backward()
    (got.topk_weights * d_weights).sum().backward()
    assert got_leaf.grad.abs().sum() > 0
    torch.testing.assert_close(got_leaf.grad, want_leaf.grad, rtol=1e-5, atol=1e-6)


def test_graphed_moe_refuses_cpu_weights_and_loops_that_sync():
    from tilemoe.graphs import GraphedMoE

    w = make_weights(16, 8, 4)
    with pytest.raises(ValueError, match="router_weight: expected a CUDA tensor"):
        GraphedMoE(w, 2)
    with pytest.raises(ValueError, match="backend: expected one of 'triton', 'grouped_mm', 'cuda', got 'torch'"):
        GraphedMoE(w, 2, backend="torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
@pytest.mark.parametrize("tokens", [1, 64])
def test_graphed_decode_replays_fresh_inputs_correctly(backend, tokens):
    from tilemoe.graphs import GraphedMoE

    cfg = tilemoe.get_preset("deepseek-v3" if tokens == 1 else "qwen3-30b-a3b")
    w = cfg.init_weights(device="cuda", dtype=torch.bfloat16, shared=False)
    moe = GraphedMoE(w, cfg.top_k, backend=backend, **cfg.router_options())
    for seed in range(3):  # capture on the first, replay on the others: each output is the new input's
        x = torch.randn(tokens, cfg.hidden, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)).bfloat16()
        y = moe(x).clone()
        ref = tilemoe.reference_moe(x.float(), **{k: v.float() for k, v in w.items()}, top_k=cfg.top_k, **cfg.router_options())
        assert tilemoe.rel_error(y, ref) <= tilemoe.TOLERANCE[torch.bfloat16], seed


def logits_error(logits, x, router_weight):
    """Largest error of fp32 logits against x @ router_weight^T in fp64, relative to the largest logit."""
    exact = x.double() @ router_weight.double().t()
    return ((logits.double() - exact).abs().max() / exact.abs().max()).item()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else []))
@pytest.mark.parametrize("num_tokens, hidden, num_experts", [(1, 40, 64), (37, 64, 48), (130, 100, 8), (200, 72, 256)])
def test_router_logits_kernel_matches_fp64(dtype, num_tokens, hidden, num_experts):
    """Partial tiles everywhere (T, E and H not multiples of 128, 64, 64); poisoned output memory."""
    from tilemoe.triton import router as triton_router

    g = torch.Generator().manual_seed(num_tokens + num_experts)
    x = torch.randn(num_tokens, hidden, generator=g).to(DEVICE, dtype)
    router_weight = torch.randn(num_experts, hidden, generator=g).to(DEVICE)
    logits = triton_router.logits(x, router_weight)
    assert logits.shape == (num_tokens, num_experts) and logits.dtype == torch.float32
    assert logits_error(logits, x, router_weight) <= 1e-6


@needs_triton
@pytest.mark.parametrize("bf16", [True, False])
def test_split_weight_pieces_sum_to_the_weight_exactly(bf16):
    """hi + mid + lo == w for every element, each piece exact in the type the tensor cores multiply
    it in: bf16, or TF32 (13 low mantissa bits clear) kept in fp32. Tiny, huge and negative
    weights, and more elements than one block."""
    import triton

    from tilemoe.triton import router as triton_router

    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 700, generator=g) * torch.logspace(-30, 30, 700)
    w[0, :3] = torch.tensor([0.0, -1.0, 1 + 2.0 ** -23])
    w = w.to(DEVICE)
    pieces = torch.full((3, 5, 700), float("nan"), dtype=torch.bfloat16 if bf16 else torch.float32, device=DEVICE)
    triton_router.split_weight_kernel[(triton.cdiv(w.numel(), triton_router.SPLIT_BLOCK),)](
        w, pieces, w.numel(), BF16=bf16, BLOCK=triton_router.SPLIT_BLOCK)
    assert torch.equal(pieces.double().sum(0), w.double())
    if not bf16:
        low_bits = pieces.view(torch.int32) & 0x1FFF
        assert torch.equal(low_bits[:2], torch.zeros_like(low_bits[:2]))  # hi and mid are TF32; lo keeps 13 bits
    assert (pieces[0].double().abs() >= pieces[1].double().abs()).all()


@pytest.mark.parametrize("tokens, experts, want", [
    (16384, 128, (128, 128)),  # Qwen3 at prefill: 128 programs, one per SM
    (16384, 256, (128, 128)),  # DeepSeek-V3
    (16384, 64, (128, 64)),    # OLMoE
    (4096, 256, (128, 64)),    # 32 x 2 programs would idle half the SMs: 32 x 4
    (4096, 128, (64, 64)),     # 32 x 1, then 32 x 2: still too few
    (16384, 8, (128, 16)),     # Mixtral: the narrowest tile tl.dot takes
])
def test_logits_tile_keeps_the_sms_busy(tokens, experts, want):
    pytest.importorskip("triton")
    from tilemoe.triton.router import logits_tile

    tile = logits_tile(tokens, experts, True, 132)
    assert (tile["BLOCK_T"], tile["BLOCK_E"]) == want
    assert logits_tile(tokens, experts, False, 132)["BLOCK_E"] <= 64  # fp16 x: fp32 pieces


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, hidden, num_experts", [(1, 40, 64), (3, 100, 48), (8, 2100, 5)])
def test_decode_logits_kernel_matches_fp64(dtype, num_tokens, hidden, num_experts):
    """A decode batch's logits, one launch: tokens short of a power of two, H past one chunk
    (8 tokens take 1024 columns a step: 2100 is two and a partial one)."""
    from tilemoe.triton import router as triton_router

    g = torch.Generator().manual_seed(num_tokens + hidden)
    x = torch.randn(num_tokens, hidden, generator=g).to(DEVICE, dtype)
    router_weight = torch.randn(num_experts, hidden, generator=g).to(DEVICE)
    with mock.patch.object(triton_router, "router_logits_kernel") as tensor_cores:
        logits = triton_router.logits(x, router_weight)
    assert tensor_cores.__getitem__.call_count == 0
    assert logits.shape == (num_tokens, num_experts) and logits.dtype == torch.float32
    assert logits_error(logits, x, router_weight) <= 1e-6


@pytest.mark.skipif(DEVICE.type != "cuda" or REASON is not None, reason="the compiled kernel's tensor cores: a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", ["olmoe-1b-7b", "deepseek-v3", "mixtral-8x7b"])
@pytest.mark.parametrize("kernel_tokens", ["MIN_TOKENS", "MAX_DECODE_TOKENS"])
def test_router_logits_kernel_is_as_accurate_as_cublas_fp32(dtype, preset, kernel_tokens):
    """bf16 products summed over all of H in the tensor cores' accumulator (no fp32 add per slice)
    missed this bound at every one of these presets while the kernel was written. The decode
    kernel (at MAX_DECODE_TOKENS) sums fp32 products as cuBLAS does."""
    from tilemoe.triton import router as triton_router

    cfg = tilemoe.get_preset(preset)
    g = torch.Generator(device=DEVICE).manual_seed(7)
    router_weight = torch.randn(cfg.experts, cfg.hidden, device=DEVICE, generator=g) / cfg.hidden ** 0.5
    x = torch.randn(getattr(triton_router, kernel_tokens), cfg.hidden, device=DEVICE, generator=g).to(dtype)
    kernel = logits_error(triton_router.logits(x, router_weight), x, router_weight)
    cublas = logits_error(x.float() @ router_weight.t(), x, router_weight)
    assert kernel <= 2 * cublas, (kernel, cublas)


@needs_triton
def test_router_logits_takes_the_kernel_from_min_tokens_on_a_gpu():
    from tilemoe.triton import router as triton_router

    w = torch.randn(64, 32, device=DEVICE)
    few, many = (torch.randn(t, 32, device=DEVICE).half() for t in (triton_router.MIN_TOKENS - 1, triton_router.MIN_TOKENS))
    assert not triton_router.takes(few, w)
    on_gpu = DEVICE.type == "cuda"
    for tokens, taken in ((0, False), (1, on_gpu), (triton_router.MAX_DECODE_TOKENS, on_gpu),
                          (triton_router.MAX_DECODE_TOKENS + 1, False)):
        decode = torch.randn(tokens, 32, device=DEVICE)
        assert triton_router.takes(decode, w) == taken and triton_router.takes(decode.bfloat16(), w) == taken
    assert triton_router.takes(many, w) == (DEVICE.type == "cuda")
    assert not triton_router.takes(many.float(), w) and not triton_router.takes(many, w.half())
    assert not triton_router.takes(many.t().contiguous().t(), w)  # rows not contiguous
    assert not triton_router.takes(many, torch.randn(64, 48, device=DEVICE))  # H does not match
    with mock.patch.object(triton_router, "logits", wraps=triton_router.logits) as kernel:
        tilemoe.router_logits(few, w, fused=True)
        tilemoe.router_logits(many, w)  # not fused: PyTorch's GEMM, as the baselines run it
        assert kernel.call_count == 0
        tilemoe.router_logits(many, w, fused=True)
        assert kernel.call_count == (DEVICE.type == "cuda")


@pytest.mark.skipif(DEVICE.type != "cuda" or REASON is not None, reason="the kernel's path runs on a CUDA GPU")
@pytest.mark.parametrize("router", list(ROUTERS))
def test_fused_routing_from_tokens_agrees_with_pytorch_routing(router):
    """route_tokens(fused=True) at MIN_TOKENS: the kernel's logits, the Triton top-k and metadata,
    with capacity. A near-tie (within fp32's error) may fall either way: at most 0.1% of tokens."""
    from tilemoe.triton import router as triton_router

    opts = dict(ROUTERS[router])
    g = torch.Generator(device=DEVICE).manual_seed(5)
    if opts.pop("bias", False):
        opts["score_bias"] = torch.randn(64, device=DEVICE, generator=g) * 0.1
    x = torch.randn(triton_router.MIN_TOKENS, 512, device=DEVICE, generator=g).bfloat16()
    w = torch.randn(64, 512, device=DEVICE, generator=g) / 512 ** 0.5
    want = tilemoe.route(x.float() @ w.t(), 6, capacity_factor=1.0, **opts)
    with mock.patch.object(triton_router, "logits", wraps=triton_router.logits) as kernel:
        got = tilemoe.routing.route_tokens(x, w, 6, capacity_factor=1.0, fused=True, **opts)
    assert kernel.call_count == 1 and got.capacity == want.capacity
    differ = (got.topk_ids != want.topk_ids).any(dim=1)
    assert differ.sum().item() <= x.shape[0] // 1000, differ.sum().item()
    same = ~differ
    torch.testing.assert_close(got.topk_weights[same], want.topk_weights[same], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(DEVICE.type != "cuda" or REASON is not None, reason="the kernel's path runs on a CUDA GPU")
def test_router_logits_gradients_through_the_kernel_path():
    from tilemoe.triton import router as triton_router

    g = torch.Generator(device=DEVICE).manual_seed(3)
    x = torch.randn(triton_router.MIN_TOKENS, 256, device=DEVICE, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(64, 256, device=DEVICE, generator=g) / 16).requires_grad_()
    d_logits = torch.randn(x.shape[0], 64, device=DEVICE, generator=g)
    with mock.patch.object(triton_router, "logits", wraps=triton_router.logits) as kernel:
        tilemoe.router_logits(x, w, fused=True).backward(d_logits)
    assert kernel.call_count == 1
    # The backward ran on the tensor cores in bf16, w's gradient summed and returned in fp32.
    d16 = d_logits.bfloat16()
    torch.testing.assert_close(w.grad, torch.mm(d16.t(), x.detach(), out_dtype=torch.float32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, d16 @ w.detach().bfloat16(), rtol=0, atol=0)
    x_ref, w_ref = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (x_ref @ w_ref.t()).backward(d_logits.double())
    assert tilemoe.rel_error(x.grad, x_ref.grad) <= tilemoe.TOLERANCE[torch.bfloat16]
    assert tilemoe.rel_error(w.grad, w_ref.grad) <= tilemoe.TOLERANCE[torch.bfloat16]


@needs_triton
@pytest.mark.parametrize("rows, ffn", [(0, 8), (1, 24), (37, 1100)])
def test_swiglu_kernel_is_silu_gate_times_up(rows, ffn):
    ops_mod, _ = ops()
    h = torch.randn(rows, 2 * ffn, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
    out = ops_mod.swiglu(h)
    want = torch.nn.functional.silu(h[:, :ffn].double()) * h[:, ffn:].double()
    assert out.shape == (rows, ffn) and (rows == 0 or tilemoe.rel_error(out, want) <= 1e-6)
    buffer = torch.empty(rows, ffn, device=DEVICE)
    assert ops_mod.swiglu(h, out=buffer) is buffer and torch.equal(buffer, out)


@needs_triton
@pytest.mark.parametrize("case", [*RAGGED, "dropped-slots"])
def test_grouped_combine_weights_each_slot_read_through_the_permutation(case):
    """combine(grouped=True) on a plain grouped GEMM's output (expert order, unweighted) is the
    PyTorch combine; rows of dropped slots hold NaN and must not reach y."""
    ops_mod, _ = ops()
    if case == "dropped-slots":
        logits = torch.randn(40, 8, generator=torch.Generator().manual_seed(4)).to(DEVICE)
        routing = tilemoe.route(logits, 2, capacity_factor=0.5)
        assert bool(routing.dropped.any())
    else:
        num_tokens, _, num_experts, ids = RAGGED[case]
        routing = forced_routing(ids().to(DEVICE), num_experts, seed=6)
    rows = torch.randn(routing.sorted_slots.numel(), 24, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    rows[int(routing.offsets[-1]):] = float("nan")  # the rows a grouped GEMM leaves unwritten
    y = ops_mod.combine(rows, routing, grouped=True)
    want = backends.common.combine(rows.double(), routing)
    assert not y.isnan().any() and tilemoe.rel_error(y, want) <= 1e-6


METADATA_FIELDS = ("counts", "offsets", "sorted_slots", "sorted_tokens", "slot_position", "topk_ids")


@needs_triton
@pytest.mark.parametrize("chunk", [None, 64], ids=["one-launch", "chunks-of-64"])
@pytest.mark.parametrize("case", [*RAGGED, "dropped-slots", "no-slots", "one-expert"])
def test_metadata_kernel_is_the_pytorch_sort_bit_for_bit(case, chunk, monkeypatch):
    """tilemoe/triton/metadata.py against build_routing's PyTorch ops: every field, every bit.
    chunks-of-64 forces the two-launch path (several chunks) at test sizes."""
    from tilemoe.triton import metadata

    if chunk:
        monkeypatch.setattr(metadata, "MAX_CHUNK", chunk)
    if case == "dropped-slots":  # capacity drops: -1 ids, which sort after every expert
        num_tokens, top_k, num_experts = 45, 3, 6
        ids = distinct_ids(num_tokens, top_k, list(range(num_experts)), seed=5)
        ids[torch.rand(ids.shape, generator=torch.Generator().manual_seed(6)) < 0.3] = -1
    elif case == "no-slots":
        num_tokens, top_k, num_experts, ids = 0, 2, 4, torch.empty(0, 2, dtype=torch.int64)
    elif case == "one-expert":
        num_tokens, top_k, num_experts, ids = 70, 1, 1, torch.zeros(70, 1, dtype=torch.int64)
    else:
        num_tokens, top_k, num_experts, ids = RAGGED[case]
        ids = ids()
    ids = ids.to(DEVICE)
    weights = torch.rand(ids.shape, device=DEVICE)
    want = tilemoe.routing.build_routing(ids, weights, weights, num_experts, has_empty_slots=case == "dropped-slots")
    got = tilemoe.routing.build_routing(ids, weights, weights, num_experts, has_empty_slots=case == "dropped-slots",
                                        fused=True)
    for field in METADATA_FIELDS:
        a, b = getattr(want, field), getattr(got, field)
        assert a.dtype == b.dtype and torch.equal(a, b), f"{field}: {b.tolist()} != {a.tolist()}"


@needs_triton
def test_moe_forward_builds_the_metadata_with_the_kernel():
    """backend triton routes with fused=True: the metadata kernel runs (the PyTorch sort does not)."""
    from tilemoe.triton import metadata

    w = make_weights(32, 16, 8, dtype=torch.float32, device=DEVICE, seed=2)
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with mock.patch.object(metadata, "sort_by_expert", wraps=metadata.sort_by_expert) as kernel, \
            mock.patch.object(torch, "argsort", side_effect=AssertionError("the PyTorch sort ran")):
        y = tilemoe.moe_forward(x, **w, top_k=2, backend="triton")
    assert kernel.call_count == 1
    ref = tilemoe.reference_moe(x.double(), **{k: v.double() for k, v in w.items()}, top_k=2)
    assert tilemoe.rel_error(y, ref) <= tilemoe.TOLERANCE[torch.float32]
