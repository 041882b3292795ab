"""Pieces every expert backend shares: the SwiGLU activation and the weighted combine."""

from __future__ import annotations

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
