"""Backend "torch": the classic loop, one matmul pair per expert over its contiguous segment.

Tokens are gathered into expert order once (routing.sorted_tokens), so each expert's rows are a
contiguous slice; then E small GEMM pairs run one after another. It runs on any device and dtype,
and reading each expert's segment bounds costs one host synchronization per forward.
"""

from __future__ import annotations

import torch

from ..routing import Routing
from .common import combine, swiglu

NAME = "torch"


def unavailable_reason(device: torch.device, dtype: torch.dtype, hidden: int, ffn: int) -> str | None:
    return None


def experts(x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    offsets = routing.offsets.tolist()  # the host sync: the loop needs the segment bounds
    rows = x[routing.sorted_tokens[: offsets[-1]]]
    out = x.new_empty(routing.sorted_slots.numel(), x.shape[1])
    for e in range(routing.num_experts):
        start, end = offsets[e], offsets[e + 1]
        if start == end:
            continue  # an empty expert launches nothing
        out[start:end] = swiglu(rows[start:end] @ w_gate_up[e].t()) @ w_down[e].t()
    return combine(out, routing)
