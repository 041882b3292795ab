"""Pieces every expert backend shares: the SwiGLU activation, the weighted combine, and the
backward of the backends whose kernels are forward-only (recompute through PyTorch)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from ..routing import Routing


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h = [gate | up] along the last dim (w_gate_up's row order) -> silu(gate) * up."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def combine(expert_rows: torch.Tensor, routing: Routing) -> torch.Tensor:
    """y[t] = sum_k weight[t, k] * expert_rows[position of slot (t, k)]  ->  [T, H].

    expert_rows [T*K, H] holds each slot's expert output in grouped (sorted) order; rows of
    dropped slots may hold anything (grouped GEMMs leave rows past offsets[E] unwritten), so
    they are masked rather than multiplied by their zero weight (0 * NaN is NaN).
    Deterministic: a gather and a batched [1, K] x [K, H] product per token, no atomics.
    """
    num_tokens, top_k = routing.topk_ids.shape
    rows = expert_rows[routing.slot_position].view(num_tokens, top_k, expert_rows.shape[1])
    if routing.has_empty_slots:
        rows = rows.masked_fill(routing.dropped.unsqueeze(-1), 0)
    weights = routing.topk_weights.to(rows.dtype).unsqueeze(1)
    return torch.bmm(weights, rows).squeeze(1)


class _RecomputeBackward(torch.autograd.Function):
    """Forward: a backend's kernels. Backward: recompute through the PyTorch path, differentiate it."""

    @staticmethod
    def forward(ctx, forward, x, topk_weights, w_gate_up, w_down, routing):
        ctx.save_for_backward(x, topk_weights, w_gate_up, w_down)
        ctx.routing = routing
        return forward(x, routing, w_gate_up, w_down)

    @staticmethod
    def backward(ctx, dy):
        from . import grouped_mm, torch_loop

        inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:5]
        x = inputs[0]
        fast = grouped_mm.unavailable_reason(x.device, x.dtype, x.shape[1], inputs[3].shape[2]) is None
        fallback = grouped_mm if fast else torch_loop
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) for t, need in zip(inputs, needs)]
            routing = dataclasses.replace(ctx.routing, topk_weights=leaves[1])
            y = fallback.experts(leaves[0], routing, leaves[2], leaves[3])
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            grads = iter(torch.autograd.grad(y, wanted, dy))
        return (None, *(next(grads) if need else None for need in needs), None)


def recompute_backward(forward: Callable, x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor,
                       w_down: torch.Tensor) -> torch.Tensor:
    """``forward(x, routing, w_gate_up, w_down)``, a backend's forward-only kernels, made
    differentiable: its backward recomputes the experts through the PyTorch path ("grouped_mm"
    where it runs these inputs, else the "torch" loop) and differentiates that. Correct gradients
    for x, the routing weights (so the router) and both weight tensors, at the PyTorch path's
    speed plus one extra forward. Without any gradient wanted it is just ``forward`` (an autograd
    Function costs host time that a decode batch notices)."""
    inputs = (x, routing.topk_weights, w_gate_up, w_down)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        return forward(x, routing, w_gate_up, w_down)
    return _RecomputeBackward.apply(forward, *inputs, routing)
