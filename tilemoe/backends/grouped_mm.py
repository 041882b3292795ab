"""Backend "grouped_mm": PyTorch's grouped GEMM, one launch for all experts per projection.

torch.nn.functional.grouped_mm (torch._grouped_mm before it was public) multiplies each expert's
row segment of a row-sorted matrix by that expert's weight in one call; on sm90/sm100 it is a
CUTLASS kernel. The segment ends come from routing.offsets on the device: no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..routing import Routing
from .common import combine, swiglu

NAME = "grouped_mm"

grouped_mm_op = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def unavailable_reason(device: torch.device, dtype: torch.dtype, hidden: int, ffn: int) -> str | None:
    if grouped_mm_op is None:
        return f"torch {torch.__version__} has no grouped_mm (it needs torch >= 2.8)"
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return "torch grouped_mm on CUDA takes bfloat16 only"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "torch grouped_mm on CUDA needs compute capability >= 8.0"
        if hidden % 8 or ffn % 8:
            return f"torch grouped_mm on CUDA needs H and I multiples of 8 (16-byte rows), got H={hidden}, I={ffn}"
        return None
    if device.type == "cpu":
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"torch grouped_mm takes float16, bfloat16 or float32, not {dtype}"
        return None
    return f"torch grouped_mm does not run on {device.type}"


def experts(x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    ends = routing.offsets[1:]
    # Every slot's row, expert-sorted; dropped slots sit past ends[-1] and are not computed.
    rows = x[routing.sorted_tokens]
    # grouped_mm computes rows_e @ b_e with b [E, K, N]: the transposed view of our [E, N, K] weights.
    h = grouped_mm_op(rows, w_gate_up.transpose(1, 2), offs=ends)
    out = grouped_mm_op(swiglu(h), w_down.transpose(1, 2), offs=ends)
    return combine(out, routing)
