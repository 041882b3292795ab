"""The backends and the routing metadata on a CUDA GPU (run: pytest -m gpu). bf16, ragged routing,
uninitialized memory poisoned with NaN (torch's deterministic mode fills torch.empty)."""

from __future__ import annotations

import pytest
import torch

import tilemoe
from moe_cases import RAGGED, forced_routing, make_weights
from tilemoe import backends

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
              pytest.mark.usefixtures("poison_uninitialized_memory")]
CUDA = torch.device("cuda")


def gpu_backends(dtype, hidden=64, ffn=32):
    return [n for n in backends.BACKENDS if backends.unavailable_reason(n, CUDA, dtype, hidden, ffn) is None]


def test_grouped_mm_runs_bf16_on_this_gpu():
    assert "grouped_mm" in gpu_backends(torch.bfloat16), backends.unavailable_reason("grouped_mm", CUDA, torch.bfloat16, 64, 32)


@pytest.mark.parametrize("case", list(RAGGED))
@pytest.mark.parametrize("backend", ["torch", "grouped_mm", "triton", "cuda"])
def test_backend_matches_reference_bf16_ragged(backend, case):
    num_tokens, top_k, num_experts, ids = RAGGED[case]
    w = make_weights(64, 32, num_experts, dtype=torch.bfloat16, device="cuda", seed=5)
    x = torch.randn(num_tokens, 64, device="cuda").bfloat16()
    routing = forced_routing(ids().cuda(), num_experts, seed=2)
    y = tilemoe.moe_forward(x, **w, top_k=top_k, backend=backend, routing=routing)
    ref = tilemoe.reference_moe(x.double(), **{k: v.double() for k, v in w.items()}, top_k=top_k, routing=routing)
    assert y.dtype == torch.bfloat16 and y.is_cuda
    assert tilemoe.rel_error(y, ref) <= tilemoe.TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("preset", ["olmoe-1b-7b", "qwen3-30b-a3b"])
def test_auto_backend_at_a_real_shape(preset):
    cfg = tilemoe.get_preset(preset)
    w = cfg.init_weights(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1000, cfg.hidden, device="cuda").bfloat16()  # 1000: not a multiple of any tile
    routing = tilemoe.route(tilemoe.router_logits(x, w["router_weight"]), cfg.top_k, **cfg.router_options())
    y = tilemoe.moe_forward(x, **w, top_k=cfg.top_k, routing=routing)
    ref = tilemoe.reference_moe(x.float(), **{k: v.float() for k, v in w.items()}, top_k=cfg.top_k, routing=routing)
    assert tilemoe.rel_error(y, ref) <= tilemoe.TOLERANCE[torch.bfloat16]


def test_capacity_and_deepseek_routing_on_gpu_match_cpu():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(300, 64, generator=g)
    opts = dict(scoring="sigmoid", num_groups=8, topk_groups=4, routed_scaling=2.5,
                score_bias=torch.randn(64, generator=g) * 0.1, capacity_factor=1.0)
    cpu = tilemoe.route(logits, 8, **opts)
    gpu = tilemoe.route(logits.cuda(), 8, **{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in opts.items()})
    for field in ("topk_ids", "counts", "offsets", "sorted_slots", "slot_position"):
        assert torch.equal(getattr(cpu, field), getattr(gpu, field).cpu()), field
    assert torch.allclose(cpu.topk_weights, gpu.topk_weights.cpu(), rtol=1e-5, atol=1e-6)
    assert cpu.dropped.any()


def test_routing_builds_without_a_host_sync():
    logits = torch.randn(4096, 128, device="cuda")
    tilemoe.route(logits, 8)  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tilemoe.route(logits, 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
