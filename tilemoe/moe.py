"""tilemoe.moe_forward: the one entry point every backend sits behind (DESIGN.md's core contract)."""

from __future__ import annotations

import torch

from . import backends, checks
from .reference import swiglu_expert
from .routing import Routing, route_tokens


def check_routing(routing: object, num_tokens: int, num_experts: int, top_k: int, device: torch.device) -> Routing:
    """A precomputed Routing must describe these T tokens, E experts and top_k, on x's device."""
    if not isinstance(routing, Routing):
        checks.fail("routing", "a tilemoe.routing.Routing", type(routing).__name__, TypeError)
    if tuple(routing.topk_ids.shape) != (num_tokens, top_k):
        checks.fail("routing", f"topk_ids of shape [T, K] = [{num_tokens}, {top_k}]", list(routing.topk_ids.shape))
    if routing.num_experts != num_experts:
        checks.fail("routing", f"num_experts = {num_experts}", routing.num_experts)
    if routing.topk_ids.device != device:
        checks.fail("routing", f"tensors on {device} (the device of x)", routing.topk_ids.device)
    return routing


def moe_forward(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    *,
    backend: str = "auto",
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
    """y = MoE(x): route every token to top_k experts, run them with ``backend``, combine.

    x [..., H], router_weight [E, H], w_gate_up [E, 2I, H] (gate rows first, then up),
    w_down [E, H, I]  ->  y with x's shape and dtype.
    backend: "auto" (fastest available for x's device and dtype; when gradients are needed, the
    fastest with a backward of its own), or one of
    ``tilemoe.backends.BACKENDS``. Router options: ``tilemoe.routing.route``. Pass ``routing``
    to reuse a decision already made (the router options are then not used).
    Every argument is checked before any kernel runs; errors name the argument.
    """
    hidden, ffn, num_experts, _ = checks.check_moe_weights(x, router_weight, w_gate_up, w_down, top_k)
    checks.check_shared_experts(x, shared_gate_up, shared_down)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, router_weight, w_gate_up, w_down))
    impl = backends.resolve(backend, x.device, x.dtype, hidden, ffn, needs_grad=needs_grad)
    tokens = x.reshape(-1, hidden).contiguous()
    if routing is None:  # route_tokens() checks the router options before it computes anything
        routing = route_tokens(
            tokens, router_weight, top_k, scoring=scoring, renormalize=renormalize,
            score_bias=score_bias, num_groups=num_groups, topk_groups=topk_groups,
            routed_scaling=routed_scaling, capacity_factor=capacity_factor,
            fused=getattr(impl, "FUSED_ROUTING", False),
        )
    else:
        check_routing(routing, tokens.shape[0], num_experts, top_k, x.device)
    y = impl.experts(tokens, routing, w_gate_up, w_down)
    if shared_gate_up is not None:
        for s in range(shared_gate_up.shape[0]):
            y = y + swiglu_expert(tokens, shared_gate_up[s], shared_down[s])
    return y.reshape(x.shape)
