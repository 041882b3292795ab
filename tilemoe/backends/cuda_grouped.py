"""Backend "cuda": the chapter's CUDA C++ grouped GEMMs behind moe_forward.

On a compute capability 9.0 GPU (a build with the 90a target) it runs the Hopper kernels
(csrc/grouped_gemm_hopper.cu: TMA, wgmma, warp specialization, a staged epilogue):

1. ``tilemoe.cuda.moe_up``: x's rows read through the permutation by the producer warpgroup
   (cp.async), gate and up in one 128 x 256 wgmma tile, SwiGLU in the epilogue -> act [T*K, I];
2. ``tilemoe.cuda.grouped_gemm`` (variant "hopper", TMA-store epilogue): act @ w_down[e]^T in
   expert order -> [T*K, H];
3. the combine: each slot's row read through the inverse permutation, weighted and summed per
   token in fp32 (tilemoe.triton.ops.combine(grouped=True); the PyTorch combine without Triton).

Routing comes from the Triton router and metadata kernels (FUSED_ROUTING), like backend
"triton": no host synchronization anywhere, capturable in a CUDA graph.

Elsewhere (sm_80 and up) it runs the unfused pipeline of "grouped_mm" with the persistent
mma.sync kernel (csrc/grouped_gemm_tiled.cu) in place of torch's: gather each slot's row of x in
expert order, one grouped GEMM for the up-projection, SwiGLU (PyTorch), one for the
down-projection, the weighted combine.

Gradients: the kernels are forward-only; the backward recomputes through the PyTorch path
(``common.recompute_backward``), so backend="auto" trains with another backend.

Runs bfloat16 on NVIDIA GPUs of compute capability 8.0 or newer, with tilemoe._C built.
"""

from __future__ import annotations

import torch

from .. import checks, cuda
from ..routing import Routing
from . import triton_fused
from .common import combine, recompute_backward, swiglu

NAME = "cuda"
# moe_forward routes for this backend with the Triton router kernels (logits, top-k, metadata), where Triton runs.
FUSED_ROUTING = True
FAST_BACKWARD = False


def unavailable_reason(device: torch.device, dtype: torch.dtype, hidden: int, ffn: int) -> str | None:
    if device.type != "cuda":
        return f"the CUDA kernels run on a CUDA device, not {device.type}"
    if why := cuda.unavailable_reason():
        return why
    if dtype != torch.bfloat16:
        return f"the CUDA grouped GEMM takes bfloat16 only, not {dtype}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "the CUDA grouped GEMM needs compute capability >= 8.0 (mma.sync bf16, cp.async)"
    if hidden % 8 or ffn % 8:
        return f"the CUDA grouped GEMM needs H and I multiples of 8 (16-byte rows), got H={hidden}, I={ffn}"
    return None


def _fused_forward(x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    if x.data_ptr() % 16:  # the producer copies 16-byte pieces of x's rows
        x = x.clone()
    # validate=False: the offsets and indices stay on the device (a Routing is consistent by construction).
    act = cuda.moe_up(x, w_gate_up, routing.offsets, routing.sorted_tokens, validate=False)
    out = cuda.grouped_gemm(act, w_down, routing.offsets, variant="hopper", validate=False)
    if triton_fused.unavailable_reason(out.device, out.dtype, 0, 0) is None:
        return triton_fused.ops().combine(out, routing, grouped=True)
    return combine(out, routing)


def _forward(x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    if cuda.hopper_unavailable_reason(x.device) is None:
        return _fused_forward(x, routing, w_gate_up, w_down)
    # Every slot's row, expert-sorted; dropped slots sit past offsets[E] and are neither computed
    # nor written by the kernel (validate=False: the offsets stay on the device).
    rows = x[routing.sorted_tokens]
    h = cuda.grouped_gemm(rows, w_gate_up, routing.offsets, validate=False)
    out = cuda.grouped_gemm(swiglu(h), w_down, routing.offsets, validate=False)
    return combine(out, routing)


def experts(x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        checks.check_contiguous(name, w, " (call .contiguous() once, at load)")
    if w_gate_up.shape[0] > cuda.MAX_EXPERTS:
        checks.fail("w_gate_up", f"at most {cuda.MAX_EXPERTS} experts for backend 'cuda'", f"E = {w_gate_up.shape[0]}")
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    return recompute_backward(_forward, x.contiguous(), routing, w_gate_up, w_down)
