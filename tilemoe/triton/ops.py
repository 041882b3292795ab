"""Host side of the Triton fast path: build the tile schedule, launch the grouped GEMMs, combine.

    y = moe_experts(x, routing, w_gate_up, w_down)      # [T, H], what backend "triton" returns

Four launches after routing, none waiting for the host:
1. ``schedule_kernel``: per-expert counts -> the list of row blocks (expert, first row);
2. up-projection: gather x's rows through the permutation, both halves of w_gate_up, SwiGLU in
   the epilogue -> A [T*K, I] in expert order;
3. down-projection: A @ w_down[e]^T, each row scaled by its routing weight and written to its
   slot's row -> [T, K, H];
4. combine: y = the sum over K (one pass, fp32 accumulation, deterministic; unkept slots skipped).
   ``combine(grouped=True)`` is how backend "cuda" combines its plain Hopper down-projection.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from ..routing import Routing
from . import configs
from .kernels import combine_kernel, grouped_gemm_kernel, schedule_kernel, swiglu_kernel

GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Triton's interpreter multiplies bf16 as raw bit patterns in tl.dot (triton-lang/triton#11584).
INTERPRETER_DTYPES = (torch.float16, torch.float32)


def interpreted() -> bool:
    """True when the kernels were built by TRITON_INTERPRET=1: they run on the CPU, in numpy."""
    return type(grouped_gemm_kernel).__name__ == "InterpretedFunction"


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type == "cuda":
        if interpreted():
            return "Triton was imported with TRITON_INTERPRET=1: its kernels run on the CPU only"
        if dtype not in GPU_DTYPES:
            return f"the Triton kernels take bfloat16, float16 or float32 on a GPU, not {dtype}"
        return None
    if device.type == "cpu":
        if not interpreted():
            return "on the CPU the Triton kernels run only under the interpreter: set TRITON_INTERPRET=1 before importing tilemoe"
        if dtype not in INTERPRETER_DTYPES:
            return f"under TRITON_INTERPRET=1 the kernels take float16 or float32 (the interpreter cannot do bf16 tl.dot), not {dtype}"
        return None
    return f"the Triton kernels run on NVIDIA GPUs (or the CPU interpreter), not on {device.type}"


# Device facts are read once per device: at decode sizes every microsecond of Python counts.

@functools.lru_cache(maxsize=None)
def _capability_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def tma_allowed(t: torch.Tensor) -> bool:
    """TMA descriptors need a Hopper-or-newer GPU (or the interpreter, which emulates them), a
    16-byte aligned base and a 16-byte row pitch."""
    if not interpreted() and (not t.is_cuda or _capability_major(t.device) < 9):
        return False
    return t.data_ptr() % 16 == 0 and (t.stride(-2) * t.element_size()) % 16 == 0 and t.stride(-1) == 1


@functools.lru_cache(maxsize=None)
def _gpu_slug(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    from ..bench import slug

    return slug(torch.cuda.get_device_name(device))


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (4 stand-ins for the interpreter's CPU)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


class Schedule:
    """The row blocks of one routing at one BLOCK_M (see ``schedule_kernel``), on the device."""

    def __init__(self, routing: Routing, block_m: int):
        num_experts = routing.num_experts
        slots = routing.sorted_slots.numel()
        # At most ceil(slots / BLOCK_M) full blocks plus one partial block per non-empty expert.
        self.max_blocks = max(1, triton.cdiv(slots, block_m) + min(num_experts, slots))
        device = routing.counts.device
        self.block_m = block_m
        table = torch.empty(2 * self.max_blocks + 1, dtype=torch.int32, device=device)  # one allocation
        self.expert, self.row, self.num_blocks = table.split([self.max_blocks, self.max_blocks, 1])
        block_b = 64
        schedule_kernel[(triton.cdiv(self.max_blocks, block_b),)](
            routing.counts, routing.offsets, self.expert, self.row, self.num_blocks,
            num_experts, self.max_blocks,
            BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_B=block_b,
        )


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, routing: Routing, schedule: Schedule, config: configs.TileConfig,
                 *, n: int, gather: torch.Tensor | None = None, swiglu: bool = False, pre: torch.Tensor | None = None,
                 scatter: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 out: torch.Tensor) -> torch.Tensor:
    """out[rows of e] = epilogue(a[rows] @ w[e, :n]^T) for every expert (grouped_gemm_kernel's flags).

    The caller has checked shapes, dtypes and contiguity (``tilemoe.backends.triton_fused``).
    """
    k = a.shape[1]
    tiles_n = triton.cdiv(n, config.block_n)
    max_tiles = schedule.max_blocks * tiles_n
    programs = min(max_tiles, 2 * num_sms(a.device)) if config.persistent else max_tiles
    dummy = schedule.row  # stands in for unused pointers (never read)
    w_tma = config.tma and tma_allowed(w)
    a_tma = w_tma and gather is None and tma_allowed(a)
    a_arg = TensorDescriptor.from_tensor(a, [config.block_m, config.block_k]) if a_tma else a
    w_arg = TensorDescriptor.from_tensor(w.view(-1, k), [config.block_n, config.block_k]) if w_tma else w
    grouped_gemm_kernel[(programs,)](
        a_arg, w_arg, out, pre if pre is not None else out,
        gather if gather is not None else dummy, scatter if scatter is not None else dummy,
        scale if scale is not None else dummy,
        schedule.expert, schedule.row, routing.offsets, schedule.num_blocks,
        n, k,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0), pre.stride(0) if pre is not None else 0,
        programs,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        GATHER_A=gather is not None, SWIGLU=swiglu, STORE_PRE=pre is not None, SCATTER_C=scatter is not None,
        EVEN_K=k % config.block_k == 0, DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        A_TMA=a_tma, W_TMA=w_tma, FLATTEN=config.persistent and not interpreted(),
        ROWS_FULL=routing.row_multiple % config.block_m == 0, EVEN_N=n % config.block_n == 0,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def pick_configs(routing: Routing, hidden: int, ffn: int, device: torch.device) -> tuple[configs.TileConfig, configs.TileConfig]:
    """(up, down) configurations for this routing's average rows per expert, on this GPU."""
    return _pick_configs(routing.sorted_slots.numel() / routing.num_experts, hidden, ffn, _gpu_slug(device))


@functools.lru_cache(maxsize=4096)  # one entry per (batch size, shape, GPU) seen: decode reuses a few
def _pick_configs(rows_per_expert: float, hidden: int, ffn: int, slug: str | None):
    up = configs.pick("up", ffn, hidden, rows_per_expert, slug)
    down = configs.pick("down", hidden, ffn, rows_per_expert, slug)
    if down.block_m != up.block_m:  # one schedule serves both GEMMs
        down = configs.rule("down", rows_per_expert)
    return up, down


def moe_experts(x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                *, store_pre: bool = False, tile_configs: tuple | None = None) -> tuple[torch.Tensor, dict]:
    """The routed experts of ``routing``, combined: (y [T, H], saved) with x's dtype.

    saved holds what a backward pass needs: the activation A [T*K, I] in expert order, the schedule,
    and with store_pre the pre-activation [gate | up] [T*K, 2I].
    tile_configs: (up, down) TileConfigs to use instead of the tuned/rule choice (for tuning).
    """
    num_tokens, hidden = x.shape
    top_k, ffn = routing.top_k, w_down.shape[2]
    up_cfg, down_cfg = tile_configs or pick_configs(routing, hidden, ffn, x.device)
    schedule = Schedule(routing, up_cfg.block_m)
    slots = num_tokens * top_k
    act = x.new_empty(slots, ffn)
    pre = x.new_empty(slots, 2 * ffn) if store_pre else None
    grouped_gemm(x, w_gate_up, routing, schedule, up_cfg, n=ffn, gather=routing.sorted_tokens, swiglu=True,
                 pre=pre, out=act)
    rows = x.new_empty(slots, hidden)  # dropped slots' rows stay unwritten: the combine skips them
    weights = routing.topk_weights.reshape(-1).to(torch.float32)
    grouped_gemm(act, w_down, routing, schedule, down_cfg, n=hidden, scatter=routing.sorted_slots, scale=weights,
                 out=rows)
    return combine(rows, routing), {"act": act, "pre": pre, "schedule": schedule, "configs": (up_cfg, down_cfg)}


def combine(rows: torch.Tensor, routing: Routing, *, grouped: bool = False) -> torch.Tensor:
    """y [T, H] = the sum of each token's K expert outputs, in fp32, leaving out dropped slots
    (their rows were never written): ``combine_kernel``.

    rows [T*K, H]: each slot's weighted output in slot order (the fused down-projection), so a
    token's K rows are consecutive; or, grouped, the unweighted outputs in expert order (a plain
    grouped GEMM's), read through ``routing.slot_position`` and weighted by ``topk_weights``.
    """
    num_tokens, top_k = routing.topk_ids.shape
    hidden = rows.shape[1]
    y = rows.new_empty(num_tokens, hidden)
    block_h = min(1024, triton.next_power_of_2(hidden))
    combine_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        rows, routing.topk_ids, routing.slot_position, routing.topk_weights, y, hidden,
        TOP_K=top_k, BLOCK_H=block_h, HAS_EMPTY=routing.has_empty_slots, GROUPED=grouped, num_warps=4,
    )
    return y


def swiglu(h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(h[:, :I]) * h[:, I:] for a contiguous h [R, 2I] in one pass (``swiglu_kernel``), into
    ``out`` [R, I] when given (a preallocated buffer) or a new tensor."""
    rows, two_i = h.shape
    ffn = two_i // 2
    out = h.new_empty(rows, ffn) if out is None else out
    if rows:
        block = min(1024, triton.next_power_of_2(ffn))
        swiglu_kernel[(rows, triton.cdiv(ffn, block))](h, out, ffn, BLOCK=block)
    return out
