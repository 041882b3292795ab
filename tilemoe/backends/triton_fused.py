"""Backend "triton": the chapter's fused Triton kernels (tilemoe/triton/).

The gather of x's rows is fused into the up-projection's loads, SwiGLU into its epilogue, the
routing weights into the down-projection's epilogue, and the combine is one sum over each token's
K rows. Four kernel launches after routing (schedule, two GEMMs, combine); no host synchronization.

Gradients: the backward pass is not written in Triton yet (issue #9). It recomputes the forward
through the PyTorch path ("grouped_mm" where it runs these inputs, else the "torch" loop) and
differentiates that: correct gradients for x, the routing weights (so the router) and both weight
tensors, at the PyTorch path's speed plus one extra forward.

Runs on NVIDIA GPUs in bfloat16, float16 or float32 (float32 without TF32: exact fp32 products),
and on the CPU under TRITON_INTERPRET=1 (float16/float32; Triton must be imported after the
variable is set). Triton is imported on first use, so that setting the variable late still works.
"""

from __future__ import annotations

import torch

from .. import checks
from ..routing import Routing
from .common import recompute_backward

NAME = "triton"
# moe_forward routes for this backend with the one-launch Triton router (tilemoe/triton/router.py).
FUSED_ROUTING = True
# The backward recomputes through the PyTorch path: backend="auto" trains with grouped_mm instead.
FAST_BACKWARD = False


def ops():
    from ..triton import ops

    return ops


def _import_reason() -> str | None:
    try:
        ops()
    except ImportError as exc:
        return f"triton is not importable ({exc}); install it with: pip install triton"
    return None


def unavailable_reason(device: torch.device, dtype: torch.dtype, hidden: int, ffn: int) -> str | None:
    if why := _import_reason():
        return why
    return ops().unavailable_reason(device, dtype)


def check_inputs(x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> None:
    """What the kernels rely on (moe_forward checked the rest): 2-D contiguous x, contiguous weights."""
    if x.dim() != 2:
        checks.fail("x", "shape [T, H]", list(x.shape))
    checks.check_contiguous("x", x)
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        checks.check_contiguous(name, w, " (call .contiguous() once, at load)")
        if w.dtype != x.dtype:
            checks.fail(name, f"dtype {x.dtype} (the dtype of x)", w.dtype, TypeError)
    if routing.num_tokens != x.shape[0] or routing.num_experts != w_gate_up.shape[0]:
        checks.fail("routing", f"a routing of T = {x.shape[0]} tokens over E = {w_gate_up.shape[0]} experts",
                    f"T = {routing.num_tokens}, E = {routing.num_experts}")


def _forward(x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return ops().moe_experts(x, routing, w_gate_up, w_down)[0]


def experts(x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    check_inputs(x, routing, w_gate_up, w_down)
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    return recompute_backward(_forward, x, routing, w_gate_up, w_down)
