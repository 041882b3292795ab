"""Backend "triton": the chapter's fused Triton kernels (tilemoe/triton/).

The gather of x's rows is fused into the up-projection's loads, SwiGLU into its epilogue, the
routing weights into the down-projection's epilogue, and the combine is one sum over each token's
K rows. Four kernel launches after routing (schedule, two GEMMs, combine); no host synchronization.

Gradients: the backward runs in Triton too (``ops.moe_experts_backward``), memory-lean like
SonicMoE's: the forward saves only x, the pre-activation [gate | up] and the routing metadata; the
backward recomputes the activation in its first GEMM's epilogue and returns gradients for x, the
routing weights (so the router, through PyTorch's autograd of the routing) and both weight tensors.
``backend="auto"`` trains with it (FAST_BACKWARD): on the H200, forward + backward at 16384 tokens
is 1.11x (OLMoE) and 1.17x (Qwen3) the grouped_mm path's speed, with 0.73x and 0.78x its training
peak memory (examples/06_full_moe/README.md, recorded in benchmarks/results/nvidia-h200/full_moe-*).

Runs on NVIDIA GPUs in bfloat16, float16 or float32 (float32 without TF32: exact fp32 products),
and on the CPU under TRITON_INTERPRET=1 (float16/float32; Triton must be imported after the
variable is set). Triton is imported on first use, so that setting the variable late still works.
"""

from __future__ import annotations

import torch

from .. import checks
from ..routing import Routing

NAME = "triton"
# moe_forward routes for this backend with the one-launch Triton router (tilemoe/triton/router.py).
FUSED_ROUTING = True
# Measured faster than grouped_mm's backward (see above): backend="auto" trains with it.
FAST_BACKWARD = True


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


class _TritonExperts(torch.autograd.Function):
    """The experts, forward and backward in Triton. Saved for the backward: x, the pre-activation
    [T*K, 2I] and the routing (the weights are the caller's); the activation is recomputed."""

    @staticmethod
    def forward(ctx, x, topk_weights, w_gate_up, w_down, routing):
        y, saved = ops().moe_experts(x, routing, w_gate_up, w_down, store_pre=True)
        ctx.save_for_backward(x, w_gate_up, w_down, saved["pre"])
        ctx.routing = routing
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_gate_up, w_down, pre = ctx.saved_tensors
        grads = ops().moe_experts_backward(dy, x, pre, ctx.routing, w_gate_up, w_down, needs=ctx.needs_input_grad[:4])
        return (*grads, None)


def experts(x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    check_inputs(x, routing, w_gate_up, w_down)
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    inputs = (x, routing.topk_weights, w_gate_up, w_down)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _TritonExperts.apply(*inputs, routing)
    return ops().moe_experts(x, routing, w_gate_up, w_down)[0]  # no autograd Function: decode counts microseconds
