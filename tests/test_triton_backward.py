"""The Triton backward (``ops.moe_experts_backward``, behind backend "triton") against the reference's
autograd: gradients of x, the routing weights and both weight tensors, on ragged routing, memory
poisoned (a gradient row the kernels forget to write is NaN and fails).

Without a GPU the kernels run in Triton's interpreter (float32/float16, small shapes); on a GPU the
same checks run compiled, bfloat16 included (pytest -m gpu).
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch

import tilemoe
from moe_cases import RAGGED, distinct_ids, forced_routing, make_weights
from tilemoe import backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [pytest.mark.usefixtures("poison_uninitialized_memory"), *([pytest.mark.gpu] if DEVICE.type == "cuda" else [])]
REASON = backends.unavailable_reason("triton", DEVICE, torch.float32, 64, 32)
needs_triton = pytest.mark.skipif(REASON is not None, reason=str(REASON))
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
NAMES = ("x", "topk_weights", "w_gate_up", "w_down")


def ops():
    from tilemoe.triton import configs, ops

    return ops, configs


def reference_grads(x, w, routing, dy):
    """The four gradients of the float64 reference on the same routing."""
    leaves = [x.double(), routing.topk_weights.double(), w["w_gate_up"].double(), w["w_down"].double()]
    leaves = [t.detach().requires_grad_() for t in leaves]
    routed = dataclasses.replace(routing, topk_weights=leaves[1])
    y = tilemoe.reference_moe(leaves[0], w["router_weight"].double(), leaves[2], leaves[3], routing.top_k,
                              routing=routed)
    y.backward(dy.double())
    return dict(zip(NAMES, (t.grad for t in leaves)))


def triton_grads(x, w, routing, dy):
    """The four gradients through moe_forward(backend="triton"), which runs the Triton backward."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, routing.topk_weights, w["w_gate_up"], w["w_down"])]
    routed = dataclasses.replace(routing, topk_weights=leaves[1])
    y = tilemoe.moe_forward(leaves[0], w["router_weight"], leaves[2], leaves[3], routing.top_k, backend="triton",
                            routing=routed)
    y.backward(dy)
    for name, leaf in zip(NAMES, leaves):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, f"{name}: {leaf.grad}"
    return dict(zip(NAMES, (t.grad for t in leaves)))


def assert_close(ours, ref, dtype, routing):
    for name in NAMES:
        assert ours[name].shape == ref[name].shape, name
        err = tilemoe.rel_error(ours[name], ref[name])
        assert err <= tilemoe.TOLERANCE[dtype], f"{name}: rel. error {err:.2e}"
    assert bool((ours["topk_weights"][routing.dropped] == 0).all()), "a dropped slot got a gradient"


@needs_triton
@pytest.mark.parametrize("case", list(RAGGED))
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_reference_autograd_on_ragged_routing(case, dtype):
    num_tokens, top_k, num_experts, ids = RAGGED[case]
    w = make_weights(64, 48, num_experts, dtype=dtype, device=DEVICE, seed=21)
    x = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    dy = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    routing = forced_routing(ids().to(DEVICE), num_experts, seed=6)
    assert_close(triton_grads(x, w, routing, dy), reference_grads(x, w, routing, dy), dtype, routing)


@needs_triton
def test_dropped_slots_by_capacity_and_rounding_get_no_gradient():
    # The grouped rows past the last expert's belong to dropped slots and are never written (NaN
    # under the poison): the weight gradients' TMA loads of their last partial chunk must mask them.
    w = make_weights(64, 32, 8, device=DEVICE, seed=3)
    x = torch.randn(90, 64, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    dy = torch.randn(90, 64, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    logits = tilemoe.router_logits(x, w["router_weight"])
    dropped = tilemoe.route(logits, 2, capacity_factor=0.5)
    assert bool(dropped.dropped.any())
    assert_close(triton_grads(x, w, dropped, dy), reference_grads(x, w, dropped, dy), torch.float32, dropped)
    rounded = tilemoe.round_routing(logits.softmax(-1), tilemoe.route(logits, 2), 16, "down").routing
    assert rounded.has_empty_slots
    assert_close(triton_grads(x, w, rounded, dy), reference_grads(x, w, rounded, dy), torch.float32, rounded)


@needs_triton
@pytest.mark.parametrize("block_m,tma", [(16, False), (32, True), (128, False), (128, True)])
def test_every_backward_tile_shape_on_ragged_shapes(block_m, tma):
    # H = 40 and I = 24 are not multiples of the 16-column tiles or of BLOCK_K = 32, and expert 3's
    # 71 rows are not a multiple of BLOCK_R = 16: every mask of the backward kernels is used.
    # With tma, the transposed weights are read through 3-D descriptors: past an expert's K rows they
    # read zeros, not the next expert's rows (0 * inf would be NaN); and the weight gradients read
    # their in-place operand by TMA. At block_m = 128, experts 0, 2 and 5 (fewer than 64 rows) take
    # the half-height tiles and expert 3 (71 rows) a full one.
    ops_mod, configs = ops()
    num_experts, top_k = 6, 2
    w = make_weights(40, 24, num_experts, device=DEVICE, seed=2)
    x = torch.randn(71, 40, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    dy = torch.randn(71, 40, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    ids = distinct_ids(71, top_k, [0, 2, 3, 5], seed=6, first=3)  # empty experts 1 and 4
    for name in ("w_gate_up", "w_down"):  # a tile that strays into an empty neighbour's weights reads inf
        w[name][[1, 4]] = float("inf")
    routing = forced_routing(ids.to(DEVICE), num_experts, seed=1)
    tile = configs.TileConfig(block_m, 16, 32, group_m=2, num_warps=4, num_stages=2, tma=tma)
    wgrad = configs.WgradConfig(16, 16, 16, num_warps=4, num_stages=2, tma=tma)
    _, saved = ops_mod.moe_experts(x, routing, w["w_gate_up"], w["w_down"], store_pre=True)
    grads = ops_mod.moe_experts_backward(dy, x, saved["pre"], routing, w["w_gate_up"], w["w_down"],
                                         tile_configs=configs.BackwardConfigs(tile, tile, wgrad, wgrad))
    ref = reference_grads(x, w, routing, dy)
    for name, ours in zip(NAMES, grads):
        assert tilemoe.rel_error(ours, ref[name]) <= 1e-4, name
    assert bool((grads[2][[1, 4]] == 0).all()) and bool((grads[3][[1, 4]] == 0).all()), "empty experts: zero dW"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_prefill_rule_on_ragged_shapes(dtype):
    # More than 64 rows per expert: the backward takes configs.backward_rule's prefill tiles, the
    # persistent 128 x 256 GEMMs and, for 16-bit operands, the weight gradients 128 x 256 (dW_down)
    # and 256 x 128 (dW_gate_up); fp32's keep 128 x 128 (the wide pipelines outgrow shared memory
    # on a GPU). All far wider than H = 40 and I = 24, over experts of 150, 69 and 0 rows (69: a
    # partial last chunk of the reduction). The kernels must receive the rule's configurations.
    ops_mod, configs = ops()
    w = make_weights(40, 24, 3, dtype=dtype, device=DEVICE, seed=4)
    x = torch.randn(219, 40, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    dy = torch.randn(219, 40, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    ids = torch.tensor([0] * 150 + [1] * 69).view(219, 1)
    routing = forced_routing(ids.to(DEVICE), 3, seed=5)
    hopper_or_interpreter = DEVICE.type == "cpu" or torch.cuda.get_device_capability(DEVICE)[0] >= 9
    rule = configs.backward_rule(73.0, wide_wgrad=dtype == torch.float16 and hopper_or_interpreter)
    assert ops_mod.backward_configs(routing, x.new_empty(219, 48)) == rule
    wide = [(128, 256), (256, 128)] if dtype == torch.float16 and hopper_or_interpreter else [(128, 128)] * 2
    assert [(c.block_n1, c.block_n2) for c in (rule.wgrad_down, rule.wgrad_gate_up)] == wide
    assert rule.grad.persistent and rule.grad.block_n == 256
    with mock.patch.object(ops_mod, "weight_gradient", wraps=ops_mod.weight_gradient) as wgrad, \
            mock.patch.object(ops_mod, "grouped_gemm", wraps=ops_mod.grouped_gemm) as gemm:
        grads = triton_grads(x, w, routing, dy)
    assert [c.args[3] for c in wgrad.call_args_list] == [rule.wgrad_down, rule.wgrad_gate_up]
    assert [c.args[4] for c in gemm.call_args_list[-2:]] == [rule.grad, rule.dx]
    assert_close(grads, reference_grads(x, w, routing, dy), dtype, routing)


@needs_triton
def test_only_the_wanted_gradients_are_computed():
    ops_mod, _ = ops()
    w = make_weights(32, 16, 4, device=DEVICE, seed=7)
    x = torch.randn(23, 32, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    routing = forced_routing(distinct_ids(23, 2, [0, 1, 3], seed=2).to(DEVICE), 4)
    _, saved = ops_mod.moe_experts(x, routing, w["w_gate_up"], w["w_down"], store_pre=True)
    grads = ops_mod.moe_experts_backward(x, x, saved["pre"], routing, w["w_gate_up"], w["w_down"],
                                         needs=(False, True, False, True))
    assert grads[0] is None and grads[2] is None and grads[1] is not None and grads[3] is not None


@needs_triton
def test_the_forward_saves_only_x_the_pre_activation_and_the_weights():
    # Memory-lean like SonicMoE: the activation [T*K, I] and the expert outputs are not kept for the
    # backward (the activation is recomputed there from the pre-activation).
    num_tokens, hidden, ffn, top_k = 29, 32, 16, 2
    w = make_weights(hidden, ffn, 4, device=DEVICE, seed=1)
    x = torch.randn(num_tokens, hidden, device=DEVICE, requires_grad=True)
    routing = forced_routing(distinct_ids(num_tokens, top_k, [0, 1, 2, 3], seed=3).to(DEVICE), 4)
    w_gate_up = w["w_gate_up"].clone().requires_grad_()
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tilemoe.moe_forward(x, w["router_weight"], w_gate_up, w["w_down"], top_k, backend="triton", routing=routing)
    assert sorted(saved) == sorted([(num_tokens, hidden), tuple(w_gate_up.shape), tuple(w["w_down"].shape),
                                    (num_tokens * top_k, 2 * ffn)])


@needs_triton
def test_the_backward_consumes_the_saved_pre_activation():
    # consume_pre writes [d gate | d up] over the pre-activation and then releases its memory; the
    # gradients are those of a backward that leaves pre alone. Through autograd that makes a second
    # backward impossible: it must say so, not read the freed buffer.
    ops_mod, _ = ops()
    w = make_weights(32, 16, 4, device=DEVICE, seed=7)
    x = torch.randn(23, 32, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    dy = torch.randn(23, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    routing = forced_routing(distinct_ids(23, 2, [0, 1, 3], seed=2).to(DEVICE), 4)
    _, saved = ops_mod.moe_experts(x, routing, w["w_gate_up"], w["w_down"], store_pre=True)
    kept = ops_mod.moe_experts_backward(dy, x, saved["pre"], routing, w["w_gate_up"], w["w_down"])
    assert saved["pre"].untyped_storage().nbytes() > 0
    consumed = ops_mod.moe_experts_backward(dy, x, saved["pre"], routing, w["w_gate_up"], w["w_down"],
                                            consume_pre=True)
    assert saved["pre"].untyped_storage().nbytes() == 0, "consume_pre kept the pre-activation's memory"
    for name, a, b in zip(NAMES, consumed, kept):
        assert torch.equal(a, b), name

    leaf = x.clone().requires_grad_()
    y = tilemoe.moe_forward(leaf, w["router_weight"], w["w_gate_up"], w["w_down"], 2, backend="triton",
                            routing=routing)
    y.backward(dy, retain_graph=True)
    with pytest.raises(RuntimeError, match="backend 'triton': a second backward through the same forward"):
        y.backward(dy)


def accumulation_case(dtype):
    """Weights as leaves that already hold a gradient (random, as from earlier micro-batches)."""
    w = make_weights(64, 48, 5, dtype=dtype, device=DEVICE, seed=11)
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(12)).to(DEVICE, dtype)
    dy = torch.randn(37, 64, generator=torch.Generator().manual_seed(13)).to(DEVICE, dtype)
    routing = forced_routing(distinct_ids(37, 2, [0, 2, 3, 4], seed=14).to(DEVICE), 5)  # expert 1 empty
    leaves = {n: w[n].clone().requires_grad_() for n in ("w_gate_up", "w_down")}
    held = {n: torch.randn(t.shape, generator=torch.Generator().manual_seed(15)).to(DEVICE, dtype)
            for n, t in leaves.items()}
    for n, leaf in leaves.items():
        leaf.grad = held[n].clone()

    def forward():
        return tilemoe.moe_forward(x, w["router_weight"], leaves["w_gate_up"], leaves["w_down"], 2,
                                   backend="triton", routing=routing)

    return leaves, held, forward, dy, reference_grads(x, w, routing, dy)


def adds_in_place(ops_mod):
    """Patches ops.weight_gradient to record, per call, whether it was asked to add into a held
    gradient (a bool: holding the tensor itself would keep autograd from reusing it)."""
    calls = []
    real = ops_mod.weight_gradient

    def record(*args, **kwargs):
        calls.append(kwargs.get("accumulate_into") is not None)
        return real(*args, **kwargs)

    return calls, mock.patch.object(ops_mod, "weight_gradient", record)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_adds_into_gradients_already_held_in_place(dtype):
    # loss.backward() with .grad kept from an earlier step: the weight-gradient kernels add into
    # .grad where it lies (the same memory afterwards), and the sum is the held gradient plus the
    # reference's, with expert 1 (no rows) keeping its held values.
    leaves, held, forward, dy, ref = accumulation_case(dtype)
    where = {n: leaf.grad.data_ptr() for n, leaf in leaves.items()}
    after = {n: [] for n in leaves}  # what hooks that run after accumulation (DDP's kind) see
    for n, leaf in leaves.items():
        leaf.register_post_accumulate_grad_hook(lambda p, n=n: after[n].append(p.grad.clone()))
    calls, patch = adds_in_place(ops()[0])
    with patch:
        forward().backward(dy)
    assert calls == [True, True]
    for n, leaf in leaves.items():
        assert len(after[n]) == 1 and torch.equal(after[n][0], leaf.grad), f"{n}: post-accumulate hook"
    for n, leaf in leaves.items():  # autograd kept the tensor the kernel added into (no copy)
        assert leaf.grad.data_ptr() == where[n], f"{n}: the gradient moved instead of being added in place"
        want = held[n].double() + ref[n]
        assert tilemoe.rel_error(leaf.grad, want) <= tilemoe.TOLERANCE[dtype], n
        assert torch.equal(leaf.grad[1], held[n][1]), f"{n}: the empty expert's held gradient changed"


@needs_triton
def test_gradients_that_must_be_seen_alone_are_not_added_in_place():
    # torch.autograd.grad returns the gradient without touching .grad; a tensor hook sees the
    # increment; a first step has no .grad to add into. All take the normal path, and .grad ends
    # as autograd defines it.
    dtype = torch.float32
    leaves, held, forward, dy, ref = accumulation_case(dtype)
    calls, patch = adds_in_place(ops()[0])
    with patch:
        grads = torch.autograd.grad(forward(), list(leaves.values()), dy)
        for n, g in zip(leaves, grads):
            assert tilemoe.rel_error(g, ref[n]) <= tilemoe.TOLERANCE[dtype], n
            assert torch.equal(leaves[n].grad, held[n]), f"{n}: autograd.grad changed .grad"
        seen = []
        hook = leaves["w_down"].register_hook(lambda g: seen.append(g.clone()))
        forward().backward(dy)
        hook.remove()
        assert len(seen) == 1 and tilemoe.rel_error(seen[0], ref["w_down"]) <= tilemoe.TOLERANCE[dtype]
        for leaf in leaves.values():
            leaf.grad = None
        forward().backward(dy)
    # w_down's backward runs first: under the hook only w_gate_up's gradient is added in place
    assert calls == [False, False, False, True, False, False]
    for n, leaf in leaves.items():
        assert tilemoe.rel_error(leaf.grad, ref[n]) <= tilemoe.TOLERANCE[dtype], n


@needs_triton
def test_swiglu_up_projection_refuses_transposed_weights():
    ops_mod, configs = ops()
    w = make_weights(32, 16, 4, device=DEVICE, seed=7)
    x = torch.randn(5, 32, device=DEVICE)
    routing = forced_routing(distinct_ids(5, 2, [0, 1], seed=2).to(DEVICE), 4)
    tile = configs.TileConfig(16, 16, 32)
    transposed = w["w_gate_up"].transpose(1, 2).contiguous().transpose(1, 2)  # [E, 2I, H], 2I contiguous
    with pytest.raises(ValueError, match=r"w: expected \[E, 2N, K\] weights with K contiguous .* got a transposed view"):
        ops_mod.grouped_gemm(x, transposed, routing, ops_mod.Schedule(routing, 16), tile, n=16,
                             gather=routing.sorted_tokens, swiglu=True, out=x.new_empty(10, 16))


# -- GPU only -------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b"])
@pytest.mark.parametrize("tokens", [1, 1000])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_backward_at_real_shapes_bf16(preset, tokens):
    cfg = tilemoe.get_preset(preset)
    w = cfg.init_weights(device="cuda", dtype=torch.bfloat16, shared=False)
    # Seeded: at one token the routing weights' gradient has only K entries, and its relative
    # error over so few has a long tail (dY @ W_down and [gate | up] are each rounded to bf16 once):
    # unseeded, one draw in about 25 failed on the H200. A fixed draw cannot flake.
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, cfg.hidden, generator=g).cuda().bfloat16()  # 1000: not a multiple of any tile
    dy = torch.randn(tokens, cfg.hidden, generator=g).cuda().bfloat16()
    routing = tilemoe.route(tilemoe.router_logits(x, w["router_weight"]), cfg.top_k, **cfg.router_options())
    ours = triton_grads(x, w, routing, dy)
    ref = reference_grads(x.float(), {k: v.float() for k, v in w.items()}, routing, dy.float())
    assert_close(ours, ref, torch.bfloat16, routing)


def olmoe_backward_case():
    """OLMoE's shapes at 4096 tokens, forward run and the backward compiled: (cfg, w, x, routing,
    ops module, the forward's saved tensors)."""
    cfg = tilemoe.get_preset("olmoe-1b-7b")
    w = cfg.init_weights(device="cuda", dtype=torch.bfloat16, shared=False)
    x = torch.randn(4096, cfg.hidden, device="cuda").bfloat16()
    routing = tilemoe.route(tilemoe.router_logits(x, w["router_weight"]), cfg.top_k, **cfg.router_options())
    ops_mod, _ = ops()
    _, saved = ops_mod.moe_experts(x, routing, w["w_gate_up"], w["w_down"], store_pre=True)
    ops_mod.moe_experts_backward(x, x, saved["pre"], routing, w["w_gate_up"], w["w_down"])  # compile first
    torch.cuda.synchronize()
    return cfg, w, x, routing, ops_mod, saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_backward_has_no_host_sync():
    cfg, w, x, routing, ops_mod, saved = olmoe_backward_case()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops_mod.moe_experts_backward(x, x, saved["pre"], routing, w["w_gate_up"], w["w_down"])
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_backward_peak_memory_follows_the_buffer_order():
    # A training step's backward, OLMoE's shapes at 4096 tokens, weight gradients held beforehand
    # (as an optimizer holds them). The down node runs first: g [T*K, I] and dW_down, pre's
    # gradient written over pre; autograd adds dW_down into .grad and frees it; then the up node:
    # the [T*K, H] rows of dx with dx, then dx and dW_gate_up. The peak is the largest of those
    # stages. One autograd node holding both weight gradients would add dW_down (256 MiB), a new
    # buffer for pre's gradient 128 MiB, a zero-filled gradient for A 64 MiB, against a slack
    # under 45.
    cfg, w, x, routing, _, _ = olmoe_backward_case()
    slots, two = 4096 * cfg.top_k, 2  # bf16 bytes
    g, rows, dx = slots * cfg.ffn * two, slots * cfg.hidden * two, x.numel() * two
    d_gate_up, d_down = w["w_gate_up"].numel() * two, w["w_down"].numel() * two
    stages = max(g + d_down, rows + dx, dx + d_gate_up)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w["w_gate_up"], w["w_down"])]
    for leaf in leaves:
        leaf.grad = torch.zeros_like(leaf)
    routed = dataclasses.replace(routing, topk_weights=routing.topk_weights.clone().requires_grad_())
    y = tilemoe.moe_forward(leaves[0], w["router_weight"], leaves[1], leaves[2], cfg.top_k, backend="triton",
                            routing=routed)
    dy = torch.randn_like(y)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y.backward(dy)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= 1.05 * stages + 16 * 2**20, f"peak {peak / 2**20:.0f} MiB, stages {stages / 2**20:.0f} MiB"
