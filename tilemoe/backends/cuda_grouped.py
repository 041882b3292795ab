"""Backend "cuda": the chapter's CUDA C++ grouped GEMMs behind moe_forward: on a compute capability
9.0 GPU the Hopper kernel (csrc/grouped_gemm_hopper.cu: TMA, wgmma, warp specialization), elsewhere
the persistent mma.sync kernel (csrc/grouped_gemm_tiled.cu); ``tilemoe.cuda.grouped_gemm``'s
variant "auto" picks.

The same pipeline as "grouped_mm", with the chapter's persistent tensor-core kernels in place of
torch's: gather each slot's row of x in expert order, one grouped GEMM for the up-projection,
SwiGLU (PyTorch), one grouped GEMM for the down-projection, the weighted combine. The kernel reads
routing.offsets on the device: no host synchronization, capturable in a CUDA graph.

Gradients: the kernels are forward-only; the backward recomputes through the PyTorch path
(``common.recompute_backward``), so backend="auto" trains with another backend.

Runs bfloat16 on NVIDIA GPUs of compute capability 8.0 or newer, with tilemoe._C built.
"""

from __future__ import annotations

import torch

from .. import checks, cuda
from ..routing import Routing
from .common import combine, recompute_backward, swiglu

NAME = "cuda"
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


def _forward(x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
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
