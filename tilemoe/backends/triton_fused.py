"""Backend "triton": the chapter's fused Triton kernels (tilemoe/triton/).

The gather of x's rows is fused into the up-projection's loads, SwiGLU into its epilogue, and the
routing weights into the combine: one weighted sum over each token's K rows of the
down-projection. Four kernel launches after routing (schedule, two GEMMs, combine); no host
synchronization.

Gradients: the backward runs in Triton too (``ops.backward_down`` and ``ops.backward_up``, one
autograd node each), memory-lean like SonicMoE's: the forward saves only x, the pre-activation
[gate | up] and the routing metadata; the backward recomputes the activation after its first GEMM
and returns gradients for x, the routing weights (so the router, through PyTorch's autograd of
the routing) and both weight tensors. One backward per forward: it reuses the saved
pre-activation's memory (``retain_graph=True`` and a second backward raise a RuntimeError).
Where a weight's .grad already holds a gradient that this backward adds to (gradient
accumulation, or any step that keeps .grad allocated), the weight-gradient kernels add into it in
place instead of returning a new tensor for autograd to add (``_grad_to_add_into``).
On an H100/H200 with tilemoe._C built for 90a, the two weight gradients run on the chapter's CUDA
kernel instead (csrc/grouped_wgrad_hopper.cu; ``ops.weight_gradient(kernel="auto")``).
``backend="auto"`` trains with it (FAST_BACKWARD). Its speed and peak memory against the
grouped_mm path and SonicMoE, measured on an H200, are in examples/06_full_moe/README.md
("Measured results", generated from benchmarks/results/nvidia-h200/full_moe-*.json).

Runs on NVIDIA GPUs in bfloat16, float16 or float32 (float32 without TF32: exact fp32 products),
and on the CPU under TRITON_INTERPRET=1 (float16/float32; Triton must be imported after the
variable is set). Triton is imported on first use, so that setting the variable late still works.
"""

from __future__ import annotations

import torch

from .. import checks
from ..routing import Routing

NAME = "triton"
# moe_forward routes for this backend with the Triton router kernels (tilemoe/triton/router.py, metadata.py).
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


def _grad_to_add_into(w: torch.Tensor) -> torch.Tensor | None:
    """w.grad, when this backward will add w's gradient into it and nothing needs the increment
    alone; else None.

    PyTorch's autograd adds a leaf's new gradient into its existing .grad in a separate pass: for
    the expert weights that reads two tensors of the weights' size and writes one, after the
    weight-gradient kernel wrote the new one. Instead the kernel adds into .grad in its epilogue
    (``ops.weight_gradient``'s accumulate_into), and the backward returns that tensor as w's
    gradient after setting w.grad to None: autograd finds no gradient to add to and keeps the
    returned one as it is. Hooks registered to run after accumulation (what DDP's reducer uses)
    still run once, and see .grad holding the sum, as they would have.
    The normal path runs instead under torch.autograd.grad (the gradient is returned, never added:
    the engine says so by refusing the question), with a tensor hook on w (it must see the
    increment), a non-leaf w, or a .grad of another dtype, shape or layout. The engine is asked
    through torch._C._will_engine_execute_node, a private PyTorch function (its FSDP asks it the
    same); a PyTorch without it takes the normal path."""
    if not w.is_leaf or w._backward_hooks:
        return None
    grad = w.grad
    if (grad is None or grad.requires_grad or grad.dtype != w.dtype or grad.shape != w.shape
            or not grad.is_contiguous()):
        return None
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    if will_execute is None:
        return None
    try:
        adds = will_execute(torch.autograd.graph.get_gradient_edge(w).node)
    except RuntimeError:  # torch.autograd.grad: the engine will not accumulate into .grad
        return None
    return grad if adds else None


class _UpProjection(torch.autograd.Function):
    """x -> (pre, A): the up-projection, SwiGLU fused. Saves x (the weights are the caller's).

    The experts are two autograd nodes, not one, so that where the weight gradients are new
    tensors (no .grad held: ``_grad_to_add_into``), autograd adds w_down's into .grad (and frees
    it) before the up-projection's backward allocates w_gate_up's: the step never holds both.
    A is not differentiable here: the down node recomputes it from pre, and its gradient arrives
    as pre's."""

    @staticmethod
    def forward(ctx, x, w_gate_up, routing, schedule, config):
        act, pre = ops().up_projection(x, routing, w_gate_up, schedule, config, store_pre=True)
        ctx.save_for_backward(x, w_gate_up)
        ctx.routing = routing
        ctx.mark_non_differentiable(act)
        ctx.set_materialize_grads(False)  # else autograd hands backward a [T*K, I] tensor of zeros for A
        return pre, act

    @staticmethod
    def backward(ctx, d_pre, _):
        if d_pre is None:  # no gradient reached pre
            return None, None, None, None, None
        x, w_gate_up = ctx.saved_tensors
        into = _grad_to_add_into(w_gate_up) if ctx.needs_input_grad[1] else None
        dx, d_gate_up = ops().backward_up(d_pre, x, ctx.routing, w_gate_up, needs=ctx.needs_input_grad[:2],
                                          consume_d_pre=True, grad_into=into)
        if into is not None:
            w_gate_up.grad = None  # autograd takes the sum back as the gradient, with nothing to add it to
        return dx, d_gate_up, None, None, None


class _DownProjection(torch.autograd.Function):
    """(pre, A) -> y: the down-projection, scaled by the routing weights and combined. Saves pre
    (A is recomputed from it in the backward, never saved).

    The backward consumes pre: pre's gradient is written over it, and the up node releases that
    memory once dW_gate_up is done, so the step never holds two [T*K, 2I] buffers. The price: one
    backward per forward (``retain_graph=True`` and a second backward raise a RuntimeError)."""

    @staticmethod
    def forward(ctx, pre, act, topk_weights, w_down, routing, schedule, config):
        y = ops().down_projection(act, routing, w_down, schedule, config)
        ctx.save_for_backward(pre, w_down)
        ctx.routing = routing
        return y

    @staticmethod
    def backward(ctx, dy):
        pre, w_down = ctx.saved_tensors
        if pre.untyped_storage().nbytes() == 0 and pre.numel():
            raise RuntimeError("backend 'triton': a second backward through the same forward (retain_graph=True) "
                               "is not supported, because the first one reused the saved pre-activation's memory; "
                               "run the forward again, or use backend='grouped_mm' to backward twice")
        needs = ctx.needs_input_grad
        into = _grad_to_add_into(w_down) if needs[3] else None
        d_pre, d_weights, d_down = ops().backward_down(dy, pre, ctx.routing, w_down, needs=(needs[0], needs[2], needs[3]),
                                                       consume_pre=True, grad_into=into)
        if into is not None:
            w_down.grad = None  # as in _UpProjection.backward
        return d_pre, None, d_weights, d_down, None, None, None


def experts(x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    check_inputs(x, routing, w_gate_up, w_down)
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    inputs = (x, routing.topk_weights, w_gate_up, w_down)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        return ops().moe_experts(x, routing, w_gate_up, w_down)[0]  # no autograd Function: decode counts microseconds
    up_cfg, down_cfg = ops().pick_configs(routing, x.shape[1], w_down.shape[2], x.device)
    schedule = ops().Schedule(routing, up_cfg.block_m)
    pre, act = _UpProjection.apply(x, w_gate_up, routing, schedule, up_cfg)
    return _DownProjection.apply(pre, act, routing.topk_weights, w_down, routing, schedule, down_cfg)
