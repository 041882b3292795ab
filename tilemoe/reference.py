"""The readable ground truth: a Mixture-of-Experts forward in plain PyTorch.

Every backend and every kernel in the chapter is checked against ``reference_moe``. It is written
to be read, not to be fast: one expert at a time, with boolean masks instead of permutations.
It runs on any device and in float64 when given float64 tensors.

    y = reference_moe(x, router_weight, w_gate_up, w_down, top_k)

    router:  logits = x @ router_weight^T  (fp32 or fp64)     -> top_k experts and weights per token
    expert e: down_e( silu(gate_e(x)) * up_e(x) ),  gate = w_gate_up[e, :I], up = w_gate_up[e, I:]
    output:  y[t] = sum over t's chosen experts e of weight[t, e] * expert_e(x[t])  (+ shared experts)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import checks
from .routing import Routing, route, router_logits


def swiglu_expert(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert on rows x [n, H]: w_gate_up [2I, H], w_down [H, I] (nn.Linear layout)."""
    ffn = w_down.shape[1]
    gate = x @ w_gate_up[:ffn].t()
    up = x @ w_gate_up[ffn:].t()
    return (F.silu(gate) * up) @ w_down.t()


def reference_moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    score_bias: torch.Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    routed_scaling: float = 1.0,
    capacity_factor: float | None = None,
    shared_gate_up: torch.Tensor | None = None,
    shared_down: torch.Tensor | None = None,
    routing: Routing | None = None,
) -> torch.Tensor:
    """MoE forward of DESIGN.md's core contract, computed in fp32 (fp64 for fp64 inputs).

    Returns y with x's shape in the compute dtype (at least fp32): the ground truth keeps its
    precision; compare a backend's output to it with ``rel_error``.
    routing: a precomputed ``Routing`` (then the router options are not used), so a backend and
    the reference can be compared on the very same routing decision.
    Router options: see ``tilemoe.routing.select_experts``. Shared experts: shared_gate_up
    [S, 2Is, H] and shared_down [S, H, Is] run on every token and are added unweighted.
    """
    hidden, _, num_experts, _ = checks.check_moe_weights(x, router_weight, w_gate_up, w_down, top_k)
    checks.check_shared_experts(x, shared_gate_up, shared_down)
    compute = torch.promote_types(x.dtype, torch.float32)
    tokens = x.reshape(-1, hidden).to(compute)

    if routing is None:
        routing = route(
            router_logits(tokens, router_weight), top_k, scoring=scoring, renormalize=renormalize,
            score_bias=score_bias, num_groups=num_groups, topk_groups=topk_groups,
            routed_scaling=routed_scaling, capacity_factor=capacity_factor,
        )
    ids = routing.topk_ids.long()
    weights = routing.topk_weights.to(compute)

    y = torch.zeros_like(tokens)
    for e in range(num_experts):
        token_idx, slot_idx = torch.where(ids == e)
        if token_idx.numel() == 0:
            continue  # an expert nobody chose does no work
        out = swiglu_expert(tokens[token_idx], w_gate_up[e].to(compute), w_down[e].to(compute))
        y.index_add_(0, token_idx, out * weights[token_idx, slot_idx].unsqueeze(1))

    if shared_gate_up is not None:
        for s in range(shared_gate_up.shape[0]):
            y += swiglu_expert(tokens, shared_gate_up[s].to(compute), shared_down[s].to(compute))
    return y.reshape(x.shape)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN/Inf anywhere in out gives inf (never a pass).

    Tolerances (DESIGN.md): bf16 <= 1e-2, fp16 <= 5e-3, fp32 <= 1e-4.
    """
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    if out64.shape != ref64.shape:
        checks.fail("out", f"shape {list(ref64.shape)} (the reference's)", list(out64.shape))
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm()
    diff = (out64 - ref64).norm()
    return float(diff / denom) if denom > 0 else float(diff)


TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4, torch.float64: 1e-10}
