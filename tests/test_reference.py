"""tilemoe.reference_moe against an independent float64 implementation, one token at a time."""

from __future__ import annotations

import math

import pytest
import torch

import tilemoe
from moe_cases import make_weights


def token_by_token(x, router_weight, w_gate_up, w_down, top_k, *, scoring="softmax", renormalize=True,
                   score_bias=None, num_groups=None, topk_groups=None, routed_scaling=1.0,
                   shared_gate_up=None, shared_down=None):
    """The MoE of DESIGN.md written from its definition in float64 Python loops; shares no code with tilemoe."""
    x = x.double().reshape(-1, x.shape[-1])
    num_experts, ffn = w_gate_up.shape[0], w_down.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = [float(v) for v in (router_weight.double() @ x[t])]
        if scoring == "softmax":
            m = max(logits)
            ex = [math.exp(v - m) for v in logits]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in logits]
        sel = [s + (float(score_bias[e]) if score_bias is not None else 0.0) for e, s in enumerate(scores)]
        allowed = set(range(num_experts))
        if num_groups:
            size = num_experts // num_groups
            gscore = [sum(sorted(sel[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(num_groups)]
            best = sorted(range(num_groups), key=lambda g: (-gscore[g], g))[:topk_groups]
            allowed = {e for g in best for e in range(g * size, (g + 1) * size)}
        chosen = sorted(allowed, key=lambda e: (-sel[e], e))[:top_k]
        w = [scores[e] for e in chosen]
        if renormalize:
            w = [v / sum(w) for v in w]
        w = [v * routed_scaling for v in w]
        for e, we in zip(chosen, w):
            gu = w_gate_up[e].double()
            gate, up = gu[:ffn] @ x[t], gu[ffn:] @ x[t]
            act = gate / (1 + torch.exp(-gate)) * up
            out[t] += we * (w_down[e].double() @ act)
        if shared_gate_up is not None:
            for s in range(shared_gate_up.shape[0]):
                gu = shared_gate_up[s].double()
                gate, up = gu[:ffn] @ x[t], gu[ffn:] @ x[t]
                out[t] += shared_down[s].double() @ (gate / (1 + torch.exp(-gate)) * up)
    return out


CASES = {
    "mixtral-like softmax renormalized": dict(top_k=2),
    "olmoe-like no renormalization": dict(top_k=4, renormalize=False),
    "top_k = E": dict(top_k=8),
    "top_k = 1": dict(top_k=1),
    "deepseek-like sigmoid+bias+groups+scaling+shared": dict(
        top_k=3, scoring="sigmoid", num_groups=4, topk_groups=2, routed_scaling=2.5, bias=True, shared=1),
    "sigmoid no groups": dict(top_k=2, scoring="sigmoid", renormalize=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_token_by_token_float64(case):
    opts = dict(CASES[case])
    top_k = opts.pop("top_k")
    shared = opts.pop("shared", 0)
    w = make_weights(24, 16, 8, dtype=torch.float64, seed=11, shared=shared)
    if opts.pop("bias", False):
        opts["score_bias"] = torch.randn(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.2
    x = torch.randn(2, 13, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref = tilemoe.reference_moe(x, **w, top_k=top_k, **opts)
    expect = token_by_token(x, **w, top_k=top_k, **opts).reshape(x.shape)
    assert ref.shape == x.shape and ref.dtype == torch.float64
    assert tilemoe.rel_error(ref, expect) < 1e-12


def test_reference_upcasts_half_inputs_to_fp32():
    w = make_weights(16, 8, 4, dtype=torch.float16)
    x = torch.randn(5, 16).half()
    assert tilemoe.reference_moe(x, **w, top_k=2).dtype == torch.float32


def test_rel_error_never_passes_nan():
    ref = torch.ones(4)
    out = ref.clone()
    out[2] = float("nan")
    assert tilemoe.rel_error(out, ref) == float("inf")
    assert tilemoe.rel_error(ref, ref) == 0.0
