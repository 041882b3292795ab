"""Host side of the Triton fast path: build the tile schedule, launch the grouped GEMMs, combine.

    y = moe_experts(x, routing, w_gate_up, w_down)      # [T, H], what backend "triton" returns

Four launches after routing, none waiting for the host:
1. ``schedule_kernel``: per-expert counts -> the list of row blocks (expert, first row);
2. up-projection: gather x's rows through the permutation, both halves of w_gate_up, SwiGLU in
   the epilogue -> A [T*K, I] in expert order;
3. down-projection: A @ w_down[e]^T, rows in expert order, plain stores -> [T*K, H];
4. combine: y[t] = the sum over k of each slot's row, read through the inverse permutation and
   multiplied by its routing weight (one pass, fp32 accumulation, deterministic; unkept slots
   skipped). Backend "cuda" combines its Hopper down-projection's rows the same way.

    dx, d_weights, d_gate_up, d_down = moe_experts_backward(dy, x, pre, routing, w_gate_up, w_down)

The backward, from x and the pre-activation the forward saved (store_pre=True), in two halves
(the two autograd nodes of backend "triton"): ``backward_down``, a grouped GEMM dY @ W_down, one
elementwise pass that recomputes the activation and applies SwiGLU's derivative, and dW_down;
``backward_up``, dX as a grouped GEMM scattered to the slots and combined like y, and dW_gate_up.
Each weight gradient is a sum over an expert's rows. No atomics: every gradient is deterministic.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import checks
from ..routing import Routing
from . import configs
from .kernels import (combine_kernel, grouped_gemm_kernel, grouped_wgrad_kernel, schedule_kernel,
                      swiglu_backward_kernel, swiglu_kernel)

GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Triton's interpreter multiplies bf16 as raw bit patterns in tl.dot (triton-lang/triton#11584).
INTERPRETER_DTYPES = (torch.float16, torch.float32)
FP32_MAX_BLOCK_K = 64  # the deepest K slice an fp32 grouped GEMM takes (see grouped_gemm)
# Read once, at import: a test that wraps a kernel to watch its launches must not change the answer.
_INTERPRETED = type(grouped_gemm_kernel).__name__ == "InterpretedFunction"


def interpreted() -> bool:
    """True when the kernels were built by TRITON_INTERPRET=1: they run on the CPU, in numpy."""
    return _INTERPRETED


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
        block_b = min(64, triton.next_power_of_2(self.max_blocks))  # a decode batch has a few blocks
        schedule_kernel[(triton.cdiv(self.max_blocks, block_b),)](
            routing.counts, routing.offsets, self.expert, self.row, self.num_blocks,
            num_experts, self.max_blocks,
            BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_B=block_b,
        )


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, routing: Routing, schedule: Schedule, config: configs.TileConfig,
                 *, n: int, gather: torch.Tensor | None = None, swiglu: bool = False, pre: torch.Tensor | None = None,
                 scatter: bool = False, out: torch.Tensor) -> torch.Tensor:
    """out[rows of e] = epilogue(a[rows] @ w[e, :n]^T) for every expert (grouped_gemm_kernel's flags).

    w [E, N, K] may be the transposed view of a contiguous [E, K, N] (the backward's): its TMA
    descriptor is then 3-D over that tensor (``W_KN``); SwiGLU's paired gate/up rows need [E, 2N, K].
    scatter: write row r to its slot's row (``routing.sorted_slots``). The caller has checked
    shapes, dtypes and contiguity (``tilemoe.backends.triton_fused``).
    """
    if a.element_size() == 4 and config.block_k > FP32_MAX_BLOCK_K:
        # The rule and the tuned tables are sized for 16-bit operands. fp32 doubles every pipeline
        # stage, and a 128-deep K slice of a tall tile (32 x 128 x 128, SwiGLU's weight tile twice
        # that wide) no longer fits in an H200's shared memory.
        config = dataclasses.replace(config, block_k=FP32_MAX_BLOCK_K)
    k = a.shape[1]
    tiles_n = triton.cdiv(n, config.block_n)
    max_tiles = schedule.max_blocks * tiles_n
    programs = min(max_tiles, 2 * num_sms(a.device)) if config.persistent else max_tiles
    dummy = schedule.row  # stands in for unused pointers (never read)
    w_kn = w.stride(1) == 1 and w.stride(2) != 1
    if w_kn and swiglu:
        checks.fail("w", "[E, 2N, K] weights with K contiguous for the SwiGLU up-projection",
                    f"a transposed view of strides {tuple(w.stride())}")
    w_stored = w.transpose(1, 2) if w_kn else w  # the contiguous tensor behind w
    w_tma = config.tma and configs.tma_on() and tma_allowed(w_stored)
    a_tma = w_tma and gather is None and tma_allowed(a)
    rows_full = routing.row_multiple % config.block_m == 0
    half_tails = config.uses_half_tails(rows_full)
    a_arg = TensorDescriptor.from_tensor(a, [config.block_m, config.block_k]) if a_tma else a
    a_half = TensorDescriptor.from_tensor(a, [config.block_m // 2, config.block_k]) if a_tma and half_tails else a_arg
    if not w_tma:
        w_arg = w
    elif swiglu:  # [2E, N, K]: one box holds a tile's gate rows and the same columns' up rows
        w_arg = TensorDescriptor.from_tensor(w.view(-1, n, k), [2, config.block_n, config.block_k])
    elif w_kn:
        w_arg = TensorDescriptor.from_tensor(w_stored, [1, config.block_k, config.block_n])
    else:
        w_arg = TensorDescriptor.from_tensor(w.view(-1, k), [config.block_n, config.block_k])
    grouped_gemm_kernel[(programs,)](
        a_arg, a_half, w_arg, out, pre if pre is not None else out,
        gather if gather is not None else dummy, routing.sorted_slots,
        schedule.expert, schedule.row, routing.offsets, schedule.num_blocks,
        n, k,
        a.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0), pre.stride(0) if pre is not None else 0,
        programs,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        GATHER_A=gather is not None, SWIGLU=swiglu, STORE_PRE=swiglu and pre is not None, SCATTER_C=scatter,
        EVEN_K=k % config.block_k == 0, DOT_PRECISION=dot_precision(a.dtype),
        A_TMA=a_tma, W_TMA=w_tma, FLATTEN=config.persistent and not interpreted(),
        ROWS_FULL=rows_full, EVEN_N=n % config.block_n == 0, W_KN=w_kn, HALF_TAILS=half_tails,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def slot_weights(routing: Routing) -> torch.Tensor:
    """[T*K] fp32: each slot's routing weight, as ``swiglu_backward_kernel`` reads it."""
    return routing.topk_weights.reshape(-1).to(torch.float32)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands multiply exactly ("ieee", no TF32); 16-bit ones are exact in any precision."""
    return "ieee" if dtype == torch.float32 else "tf32"


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


def up_projection(x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor, schedule: Schedule,
                  config: configs.TileConfig, *, store_pre: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(A, pre): A = silu(gate) * up [T*K, I] in expert order, x's rows gathered through the
    permutation; with store_pre the pre-activation [gate | up] [T*K, 2I] too (else None)."""
    slots, ffn = routing.sorted_slots.numel(), w_gate_up.shape[1] // 2
    act = x.new_empty(slots, ffn)
    pre = x.new_empty(slots, 2 * ffn) if store_pre else None
    grouped_gemm(x, w_gate_up, routing, schedule, config, n=ffn, gather=routing.sorted_tokens, swiglu=True,
                 pre=pre, out=act)
    return act, pre


def down_projection(act: torch.Tensor, routing: Routing, w_down: torch.Tensor, schedule: Schedule,
                    config: configs.TileConfig) -> torch.Tensor:
    """y [T, H]: the rows A @ W_down[e]^T in expert order, then each token's K rows weighted and
    summed (``combine(grouped=True)``)."""
    rows = act.new_empty(act.shape[0], w_down.shape[1])  # dropped slots' rows stay unwritten: the combine skips them
    grouped_gemm(act, w_down, routing, schedule, config, n=w_down.shape[1], out=rows)
    return combine(rows, routing, grouped=True)


def moe_experts(x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                *, store_pre: bool = False, tile_configs: tuple | None = None) -> tuple[torch.Tensor, dict]:
    """The routed experts of ``routing``, combined: (y [T, H], saved) with x's dtype.

    saved holds what a backward pass needs: the activation A [T*K, I] in expert order, the schedule,
    and with store_pre the pre-activation [gate | up] [T*K, 2I].
    tile_configs: (up, down) TileConfigs to use instead of the tuned/rule choice (for tuning).
    """
    up_cfg, down_cfg = tile_configs or pick_configs(routing, x.shape[1], w_down.shape[2], x.device)
    schedule = Schedule(routing, up_cfg.block_m)
    act, pre = up_projection(x, routing, w_gate_up, schedule, up_cfg, store_pre=store_pre)
    y = down_projection(act, routing, w_down, schedule, down_cfg)
    return y, {"act": act, "pre": pre, "schedule": schedule, "configs": (up_cfg, down_cfg)}


def backward_configs(routing: Routing, operand: torch.Tensor) -> configs.BackwardConfigs:
    """``configs.backward_rule`` for this routing's rows per expert, with the wide weight-gradient
    tiles where they fit and were measured: 16-bit operands (``operand``: pre or its gradient) on a
    Hopper-or-newer GPU, or under the interpreter (which has no shared memory to outgrow)."""
    fits = operand.element_size() == 2 and (
        interpreted() or (operand.is_cuda and _capability_major(operand.device) >= 9))
    return configs.backward_rule(operand.shape[0] / routing.num_experts, wide_wgrad=fits)


def backward_down(dy: torch.Tensor, pre: torch.Tensor, routing: Routing, w_down: torch.Tensor, *,
                  needs: tuple = (True, True, True), consume_pre: bool = False,
                  tile_configs: configs.BackwardConfigs | None = None, grad_into: torch.Tensor | None = None) -> tuple:
    """The down-projection's half of the backward: gradients of y with respect to (pre,
    routing.topk_weights, w_down), None where ``needs`` says not wanted. With slot s = (t, k) of
    expert e, weight p and grouped row r, and A_r = silu(gate_r) * up_r recomputed from pre:
      g_r       = dy[t] @ W_down[e]               a grouped GEMM, dY read through the permutation;
      dp_s      = g_r . A_r                       then one elementwise pass (swiglu_backward_kernel)
      d pre_r   = SwiGLU's derivative of p * g_r  that also leaves p * A_r where g_r was;
      dW_down_e = sum_r dy[t]^T (p * A_r)         a reduction over the expert's rows.
    consume_pre: pre is not needed after this call (an autograd Function's saved tensor, one backward
    only): its gradient is written over it, each element where it was read, and returned in its
    place. Otherwise d pre gets a new buffer.
    tile_configs: a configs.BackwardConfigs to use instead of ``backward_configs``' (its grad and
    wgrad_down).
    grad_into: w_down's existing gradient: dW_down is added into it (``weight_gradient``'s
    accumulate_into) and it is returned in dW_down's place.
    """
    slots, ffn = pre.shape[0], w_down.shape[2]
    num_tokens, top_k = routing.topk_ids.shape
    chosen = tile_configs or backward_configs(routing, pre)
    grad_cfg, wgrad_cfg = chosen.grad, chosen.wgrad_down
    need_pre, need_weights, need_down = needs
    dy = dy.contiguous()
    g = dy.new_empty(slots, ffn)  # g, then p * A in its place
    grouped_gemm(dy, w_down.transpose(1, 2), routing, Schedule(routing, grad_cfg.block_m), grad_cfg, n=ffn,
                 gather=routing.sorted_tokens, out=g)
    d_pre = pre if consume_pre else pre.clone()
    dscale = torch.empty(slots, dtype=torch.float32, device=dy.device)
    swiglu_backward(g, d_pre, routing, dscale)
    d_weights = d_down = None
    if need_weights:  # rows of dropped slots were never computed: their gradient is zero
        dp = dscale[routing.slot_position].view(num_tokens, top_k)
        d_weights = torch.where(routing.dropped, 0.0, dp).to(routing.topk_weights.dtype)
    if need_down:
        d_down = weight_gradient(dy, g, routing, wgrad_cfg, a_gather=routing.sorted_tokens, dtype=w_down.dtype,
                                 accumulate_into=grad_into)
    return (d_pre if need_pre else None), d_weights, d_down


def backward_up(d_pre: torch.Tensor, x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor, *,
                needs: tuple = (True, True), consume_d_pre: bool = False,
                tile_configs: configs.BackwardConfigs | None = None, grad_into: torch.Tensor | None = None) -> tuple:
    """The up-projection's half of the backward: gradients with respect to (x, w_gate_up) from the
    pre-activation's gradient d_pre [T*K, 2I], None where ``needs`` says not wanted:
      dW_gu_e = sum_r d_pre_r^T x[t]              a reduction over the expert's rows;
      dx[t]   = sum_k d_pre_r @ W_gu[e]           a grouped GEMM, scattered to slots, then summed.
    The [T*K, H] rows of dx live and die first, so that dW_gate_up is allocated with nothing else
    of that size held. consume_d_pre: release d_pre's memory once its last reader is done.
    tile_configs: a configs.BackwardConfigs to use instead of ``backward_configs``' (its dx and
    wgrad_gate_up).
    grad_into: w_gate_up's existing gradient, to add dW_gate_up into (as ``backward_down``'s).
    """
    hidden = x.shape[1]
    chosen = tile_configs or backward_configs(routing, d_pre)
    dx_cfg, wgrad_cfg = chosen.dx, chosen.wgrad_gate_up
    need_x, need_gate_up = needs
    dx = d_gate_up = None
    if need_x:
        rows = x.new_empty(d_pre.shape[0], hidden)
        grouped_gemm(d_pre, w_gate_up.transpose(1, 2), routing, Schedule(routing, dx_cfg.block_m), dx_cfg, n=hidden,
                     scatter=True, out=rows)
        dx = combine(rows, routing)
        del rows
    if need_gate_up:
        d_gate_up = weight_gradient(d_pre, x, routing, wgrad_cfg, b_gather=routing.sorted_tokens,
                                    dtype=w_gate_up.dtype, accumulate_into=grad_into)
    if consume_d_pre:  # the caller holds d_pre too: release the memory itself, not a reference
        d_pre.untyped_storage().resize_(0)
    return dx, d_gate_up


def moe_experts_backward(dy: torch.Tensor, x: torch.Tensor, pre: torch.Tensor, routing: Routing,
                         w_gate_up: torch.Tensor, w_down: torch.Tensor, *, needs: tuple = (True, True, True, True),
                         consume_pre: bool = False, tile_configs: configs.BackwardConfigs | None = None) -> tuple:
    """Gradients of ``moe_experts``' y with respect to (x, routing.topk_weights, w_gate_up, w_down):
    ``backward_down`` then ``backward_up`` (their docstrings have the math).

    dy [T, H]; pre [T*K, 2I], the pre-activation the forward saved (store_pre=True). The activation
    A = silu(gate) * up is recomputed from it, never saved. needs: which of the four to compute
    (None in their place otherwise). consume_pre: pre is not needed after this call; its memory
    becomes d pre's and is released at the end (pre is then an empty tensor). Otherwise pre is
    left as it was.
    tile_configs: a configs.BackwardConfigs to use instead of ``backward_configs``'.
    """
    need_x, need_weights, need_gate_up, need_down = needs
    d_pre, d_weights, d_down = backward_down(dy, pre, routing, w_down, needs=(True, need_weights, need_down),
                                             consume_pre=consume_pre, tile_configs=tile_configs)
    dx, d_gate_up = backward_up(d_pre, x, routing, w_gate_up, needs=(need_x, need_gate_up), consume_d_pre=True,
                                tile_configs=tile_configs)
    return dx, d_weights, d_gate_up, d_down


def cuda_wgrad_reason(a: torch.Tensor, b: torch.Tensor, a_gather: torch.Tensor | None,
                      b_gather: torch.Tensor | None, dtype: torch.dtype) -> str | None:
    """Why ``weight_gradient`` cannot take the CUDA Hopper kernel (``tilemoe.cuda.grouped_wgrad``)
    for these operands, or None: it needs bfloat16 on a GPU of compute capability 9.0 with
    tilemoe._C built for 90a, exactly one operand gathered, and 16-byte aligned rows."""
    from .. import cuda

    if not a.is_cuda:
        return "the operands are not on a CUDA device"
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16 or dtype != torch.bfloat16:
        return f"the CUDA weight gradient takes bfloat16, not {a.dtype} / {b.dtype} -> {dtype}"
    if (a_gather is None) == (b_gather is None):
        return "the CUDA weight gradient reads exactly one operand through the permutation"
    if a.shape[1] % 8 or b.shape[1] % 8 or not (a.is_contiguous() and b.is_contiguous()):
        return "the CUDA weight gradient needs contiguous operands with a multiple of 8 columns"
    if a.data_ptr() % 16 or b.data_ptr() % 16:
        return "the CUDA weight gradient needs 16-byte aligned operands"
    return cuda.hopper_unavailable_reason(a.device)


def weight_gradient(a: torch.Tensor, b: torch.Tensor, routing: Routing, config: configs.WgradConfig, *,
                    a_gather: torch.Tensor | None = None, b_gather: torch.Tensor | None = None,
                    dtype: torch.dtype, kernel: str = "auto", accumulate_into: torch.Tensor | None = None) -> torch.Tensor:
    """dW [E, N1, N2]: for every expert e, the sum over its grouped rows r of a[r]^T b[r] (a row
    read through a_gather / b_gather when given). Experts with no rows get zeros.

    accumulate_into: a contiguous [E, N1, N2] tensor of ``dtype`` (a weight's existing .grad) that
    the sums are added into, in the kernel's epilogue, instead of a new tensor; it is returned.

    kernel: "triton", ``grouped_wgrad_kernel`` with config's tiles (an operand read in place loads
    through a TMA descriptor where config.tma allows); "cuda", the warp-specialized Hopper kernel
    (``tilemoe.cuda.grouped_wgrad``, csrc/grouped_wgrad_hopper.cu; RuntimeError where it cannot
    run, with ``cuda_wgrad_reason``'s reason); "auto", cuda where it runs, else triton.
    ``benchmarks/tune_triton.py --backward`` times both."""
    if kernel not in ("auto", "triton", "cuda"):
        checks.fail("kernel", '"auto", "triton" or "cuda"', repr(kernel))
    n1, n2 = a.shape[1], b.shape[1]
    accumulate = accumulate_into is not None
    if accumulate:
        num_experts = routing.num_experts
        checks.check_shape("accumulate_into", accumulate_into, (num_experts, n1, n2), f"[E, N1, N2] = [{num_experts}, {n1}, {n2}]")
        checks.check_contiguous("accumulate_into", accumulate_into)
        if accumulate_into.dtype != dtype or accumulate_into.device != a.device:
            checks.fail("accumulate_into", f"a {dtype} tensor on {a.device}",
                        f"{accumulate_into.dtype} on {accumulate_into.device}", TypeError)
    if kernel != "triton":
        why = cuda_wgrad_reason(a, b, a_gather, b_gather, dtype)
        if why is None:
            from .. import cuda

            return cuda.grouped_wgrad(a, b, routing.offsets, a_gather=a_gather, b_gather=b_gather, out=accumulate_into,
                                      accumulate=accumulate, validate=False)
        if kernel == "cuda":
            raise RuntimeError(f"weight_gradient(kernel='cuda') cannot run here: {why}")
    num_experts = routing.num_experts
    out = accumulate_into if accumulate else torch.empty(num_experts, n1, n2, dtype=dtype, device=a.device)
    dummy = routing.offsets
    tma = config.tma and configs.tma_on()
    a_tma = tma and a_gather is None and tma_allowed(a)
    b_tma = tma and b_gather is None and tma_allowed(b)
    a_arg = TensorDescriptor.from_tensor(a, [config.block_r, config.block_n1]) if a_tma else a
    b_arg = TensorDescriptor.from_tensor(b, [config.block_r, config.block_n2]) if b_tma else b
    grid = (triton.cdiv(n1, config.block_n1) * triton.cdiv(n2, config.block_n2), num_experts)
    grouped_wgrad_kernel[grid](
        a_arg, b_arg, out, a_gather if a_gather is not None else dummy, b_gather if b_gather is not None else dummy,
        routing.offsets, n1, n2, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
        BLOCK_N1=config.block_n1, BLOCK_N2=config.block_n2, BLOCK_R=config.block_r,
        GATHER_A=a_gather is not None, GATHER_B=b_gather is not None, A_TMA=a_tma, B_TMA=b_tma,
        EVEN_N1=n1 % config.block_n1 == 0, EVEN_N2=n2 % config.block_n2 == 0, DOT_PRECISION=dot_precision(a.dtype),
        ACCUMULATE=accumulate, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def swiglu_backward(g: torch.Tensor, pre: torch.Tensor, routing: Routing, dscale: torch.Tensor) -> None:
    """``swiglu_backward_kernel`` over every kept grouped row: g [T*K, I] (dY @ W_down per row) becomes
    p * A, pre [T*K, 2I] becomes its own gradient, dscale [T*K] fp32 gets each row's dp."""
    slots, ffn = g.shape
    if not slots:
        return
    block_i = min(256, triton.next_power_of_2(ffn))
    block_r = 8
    swiglu_backward_kernel[(triton.cdiv(slots, block_r),)](
        g, pre, routing.sorted_slots, slot_weights(routing), dscale, routing.offsets, routing.num_experts, ffn,
        BLOCK_R=block_r, BLOCK_I=block_i, num_warps=4,
    )


def combine(rows: torch.Tensor, routing: Routing, *, grouped: bool = False) -> torch.Tensor:
    """y [T, H] = the sum of each token's K expert outputs, in fp32, leaving out dropped slots
    (their rows were never written): ``combine_kernel``.

    rows [T*K, H]: grouped, the unweighted outputs in expert order (the down-projection's), read
    through ``routing.slot_position`` and weighted by ``topk_weights``; or each slot's row in slot
    order (the backward's dX, scattered), so that a token's K rows are consecutive and simply summed.
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
