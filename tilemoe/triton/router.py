"""The router in Triton: the logits GEMM on the tensor cores, then top-k selection in one launch.

The PyTorch router (tilemoe.routing.select_experts) is about ten small operations: softmax, a
sort of every token's E scores, a gather, a sum, a division... At a decode batch each costs more
in launch and Python overhead than in arithmetic. ``topk_router_kernel`` does the same per token in
registers: BLOCK_T tokens per program, each token's E logits in one row of a [BLOCK_T, BLOCK_E]
tile, and top-k as K rounds of "take the largest, lowest index on a tie, then mask it out": the
same experts, in the same order, as the stable descending sort of the PyTorch router.

The logits themselves are computed in fp32 (DESIGN.md): an fp32 GEMM runs on the CUDA cores, not
the tensor cores, which makes DeepSeek-V3's router GEMM (H = 7168, E = 256) cost milliseconds at
prefill sizes. ``router_logits_kernel`` gets fp32's accuracy from bf16 (or TF32) tensor-core
products instead (its docstring says how); ``tilemoe.routing.router_logits`` uses it on a GPU from
``MIN_TOKENS`` tokens up, where it is faster than cuBLAS's fp32 GEMM. A decode batch (up to
``MAX_DECODE_TOKENS`` tokens) takes ``decode_logits_kernel``: plain fp32 on the CUDA cores, in one
launch where PyTorch makes two or three.

DeepSeek-V3's group-limited routing (num_groups / topk_groups) runs here when E is a power of two
and divisible by num_groups (the tile is reshaped to [BLOCK_T, groups, E / groups]); ``supports``
says when, and tilemoe.routing falls back to PyTorch otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ops import num_sms


@triton.jit
def _argmax_lowest(values, index, BIG: tl.constexpr):
    """Per row: the largest value and its lowest column index (ties -> lower index, like a stable sort)."""
    best = tl.max(values, axis=1)
    where = tl.min(tl.where(values == best[:, None], index, BIG), axis=1)
    return best, where


@triton.jit
def topk_router_kernel(
    logits_ptr, bias_ptr, ids_ptr, weights_ptr, scores_ptr,
    num_tokens, num_experts, stride_t, routed_scaling,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
):
    """ids, weights and scores [T, K] of the top-k experts of each token's logits [T, E]."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    t_ok = t < num_tokens
    e_ok = e < num_experts
    logits = tl.load(logits_ptr + t[:, None].to(tl.int64) * stride_t + e[None, :],
                     mask=t_ok[:, None] & e_ok[None, :], other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        scores = shifted / tl.sum(shifted, axis=1)[:, None]
    scores = tl.where(e_ok[None, :], scores, 0.0)
    selection = scores
    if HAS_BIAS:  # steers the choice only; the weights come from the unbiased scores
        selection = selection + tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    selection = tl.where(e_ok[None, :], selection, float("-inf"))

    if NUM_GROUPS > 1:
        # A group's score is the sum of its two best selection scores; keep the TOPK_GROUPS best groups.
        GROUP: tl.constexpr = BLOCK_E // NUM_GROUPS
        grouped = tl.reshape(selection, (BLOCK_T, NUM_GROUPS, GROUP))
        inner = tl.arange(0, GROUP)[None, None, :]
        first = tl.max(grouped, axis=2)
        first_at = tl.min(tl.where(grouped == first[:, :, None], inner, GROUP), axis=2)
        if GROUP > 1:
            second = tl.max(tl.where(inner == first_at[:, :, None], float("-inf"), grouped), axis=2)
            group_score = first + second
        else:
            group_score = first
        g = tl.arange(0, NUM_GROUPS)[None, :]
        keep = tl.zeros((BLOCK_T, NUM_GROUPS), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUPS):
            _, best_g = _argmax_lowest(group_score, g, NUM_GROUPS)
            chosen = g == best_g[:, None]
            keep = keep | chosen
            group_score = tl.where(chosen, float("-inf"), group_score)
        grouped = tl.where(keep[:, :, None], grouped, float("-inf"))
        selection = tl.reshape(grouped, (BLOCK_T, BLOCK_E))

    kk = tl.arange(0, K_PAD)[None, :]
    chosen_ids = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    chosen_scores = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        _, best_e = _argmax_lowest(selection, e[None, :], BLOCK_E)
        hit = e[None, :] == best_e[:, None]
        score = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        chosen_ids = tl.where(kk == k, best_e[:, None], chosen_ids)
        chosen_scores = tl.where(kk == k, score[:, None], chosen_scores)
        selection = tl.where(hit, float("-inf"), selection)

    weights = chosen_scores
    if RENORMALIZE:
        weights = weights / tl.maximum(tl.sum(weights, axis=1), 1.1754943508222875e-38)[:, None]
    weights = weights * routed_scaling
    out = t[:, None].to(tl.int64) * TOP_K + kk
    ok = t_ok[:, None] & (kk < TOP_K)
    tl.store(ids_ptr + out, chosen_ids, mask=ok)
    tl.store(weights_ptr + out, weights, mask=ok)
    tl.store(scores_ptr + out, chosen_scores, mask=ok)


@triton.jit
def _tf32(v):
    """v rounded down to TF32 (10 mantissa bits: the 13 low bits of the fp32 mantissa cleared)."""
    return (v.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def split_weight_kernel(w_ptr, pieces_ptr, numel, BF16: tl.constexpr, BLOCK: tl.constexpr):
    """pieces [3, E, H] = (hi, mid, lo) of the fp32 router weight w [E, H], w = hi + mid + lo exactly:
    bf16 pieces (8 significant bits each: together fp32's 24) for a bf16 x, TF32 values kept in
    fp32 for an fp16 x (11 bits each; an fp16 number is exact in TF32)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < numel
    w = tl.load(w_ptr + i, mask=ok, other=0.0)
    if BF16:
        hi = w.to(tl.bfloat16)
        rest = w - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    else:
        hi = _tf32(w)
        rest = w - hi
        mid = _tf32(rest)
        lo = rest - mid  # at most 13 significant bits; the tensor cores keep 11 of them
    tl.store(pieces_ptr + i, hi, mask=ok)
    tl.store(pieces_ptr + numel + i, mid, mask=ok)
    tl.store(pieces_ptr + 2 * numel + i, lo, mask=ok)


@triton.jit
def router_logits_kernel(x_ptr, pieces_ptr, out_ptr, num_tokens, num_experts, hidden, stride_x,
                         BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):
    """logits [T, E] fp32 = x [T, H] @ w [E, H]^T on the tensor cores, at fp32's accuracy.

    The fp32 weight comes split in three pieces, w = hi + mid + lo, each exact in the type the
    tensor cores multiply x in (``split_weight_kernel``, once per call: split inside this kernel,
    every program of the T axis would split the same weight tile again on the CUDA cores and
    write the pieces to shared memory itself). x meets each piece in one product, and each product
    is exact in fp32: nothing is lost before the sum.

    The sum needs care too. The tensor cores add products into their fp32 accumulator without
    rounding to nearest (they cut the low bits), and over H = 7168 those small one-sided errors
    add up to well above an fp32 GEMM's error on the CUDA cores. So each BLOCK_H slice is summed by
    the tensor cores into a fresh accumulator (``part``), and the slices join the running total by
    ordinary fp32 additions, which round to nearest (DeepSeek-V3 promotes its FP8 GEMMs' partial
    sums the same way). tests/test_triton.py holds the result to cuBLAS's fp32 error against fp64.
    (Triton rewrites ``acc + tl.dot(a, b)`` into ``tl.dot(a, b, acc)``, which would undo this; a
    chain of dots whose first starts from zero is left alone.)
    The expert blocks of one token block are neighbours in the launch (axis 0), so x's rows are
    read from HBM once and from L2 by the others.
    """
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_H)
    # Rows past T and experts past E repeat the last one: the loads need no row mask; never stored.
    x_ptrs = x_ptr + tl.minimum(t, num_tokens - 1).to(tl.int64)[:, None] * stride_x + h[None, :]
    w_ptrs = pieces_ptr + tl.minimum(e, num_experts - 1).to(tl.int64)[None, :] * hidden + h[:, None]  # w^T tiles
    piece = num_experts * hidden
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        h_ok = h0 + h < hidden
        xs = tl.load(x_ptrs, mask=h_ok[None, :], other=0.0)
        if xs.dtype != tl.bfloat16:
            xs = xs.to(tl.float32)  # fp16 meets TF32 pieces
        lo = tl.load(w_ptrs + 2 * piece, mask=h_ok[:, None], other=0.0)
        mid = tl.load(w_ptrs + piece, mask=h_ok[:, None], other=0.0)
        hi = tl.load(w_ptrs, mask=h_ok[:, None], other=0.0)
        part = tl.dot(xs, lo, input_precision="tf32")  # the smallest terms first
        part = tl.dot(xs, mid, part, input_precision="tf32")
        part = tl.dot(xs, hi, part, input_precision="tf32")
        acc += part  # rounded to nearest: the slice's sum joins the total
        x_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    ok = (t < num_tokens)[:, None] & (e < num_experts)[None, :]
    tl.store(out_ptr + t.to(tl.int64)[:, None] * num_experts + e[None, :], acc, mask=ok)


@triton.jit
def decode_logits_kernel(x_ptr, w_ptr, out_ptr, num_tokens, num_experts, hidden, stride_x,
                         BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """logits [T, E] fp32 = x [T, H] @ w [E, H]^T for a decode batch (T <= MAX_DECODE_TOKENS):
    products and sums in fp32 on the CUDA cores, as PyTorch's fp32 GEMM computes them.

    One program per expert takes every token of the batch. A decode batch's router does almost no
    arithmetic; what it costs is reading w and the launches. PyTorch takes two for a bf16 x (a
    cast of x to fp32, then cuBLAS's GEMV, itself often two kernels); this is one, and its E
    programs keep many SMs reading w at once.
    """
    e = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_H)
    t_ok = t < num_tokens
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        h_ok = h0 + h < hidden
        w = tl.load(w_ptr + e.to(tl.int64) * hidden + h0 + h, mask=h_ok, other=0.0)
        xs = tl.load(x_ptr + t.to(tl.int64)[:, None] * stride_x + (h0 + h)[None, :],
                     mask=t_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xs * w[None, :], axis=1)
    tl.store(out_ptr + t.to(tl.int64) * num_experts + e, acc, mask=t_ok)


# With few tokens the tensor-core kernel launches few programs even with its narrowest tile (a
# 256-token OLMoE batch: 4 of 64 x 64), and cuBLAS's fp32 GEMM (split over H) is faster.
# Graph-timed on an H200 at commit 6a7132f (development runs, not recorded), on all four presets:
# cuBLAS was faster at 16 to 256 tokens, the kernel from 512 tokens up (the margin growing with
# the batch). tools/profile_kernels.py recorded both paths in OLMoE and DeepSeek-V3
# forwards at 1024 and 2048 tokens: benchmarks/results/nvidia-h200/profile_kernels-2026-11-24-24
# to -27 (cuBLAS) and -28 to -31 (the kernel); tilemoe/triton/README.md has the times.
MIN_TOKENS = 512
MAX_DECODE_TOKENS = 8
SPLIT_BLOCK = 1024  # weights per program of split_weight_kernel


def takes(x: torch.Tensor, router_weight: torch.Tensor) -> bool:
    """Whether ``tilemoe.routing.router_logits`` computes these logits with ``logits``: a CUDA GPU
    (not the interpreter: there only tests call the kernels), x [T, H] with contiguous rows, in bf16
    or fp16 with T >= MIN_TOKENS (the tensor-core kernel) or in bf16, fp16 or fp32 with
    1 <= T <= MAX_DECODE_TOKENS (the decode kernel), and a contiguous fp32 router weight [E, H] on
    the same device. Anything else (a shape mismatch included) goes to PyTorch's GEMM, which
    reports it."""
    if not (x.is_cuda and x.dim() == 2 and x.stride(1) == 1 and router_weight.dtype == torch.float32
            and router_weight.dim() == 2 and router_weight.shape[1] == x.shape[1] and router_weight.is_contiguous()
            and router_weight.device == x.device):
        return False
    if 1 <= x.shape[0] <= MAX_DECODE_TOKENS:
        return x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    return x.shape[0] >= MIN_TOKENS and x.dtype in (torch.bfloat16, torch.float16)


def logits(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """x [T, H] (contiguous rows) @ router_weight [E, H]^T (fp32, contiguous): the fp32 logits
    [T, E], by ``decode_logits_kernel`` for T <= MAX_DECODE_TOKENS, else by
    ``router_logits_kernel`` (bf16 or fp16 x). The caller has checked the shapes (``takes``)."""
    num_tokens, hidden = x.shape
    num_experts = router_weight.shape[0]
    out = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return out
    if num_tokens <= MAX_DECODE_TOKENS:
        block_t = triton.next_power_of_2(num_tokens)
        decode_logits_kernel[(num_experts,)](
            x, router_weight, out, num_tokens, num_experts, hidden, x.stride(0),
            BLOCK_T=block_t, BLOCK_H=min(triton.next_power_of_2(hidden), 8192 // block_t), num_warps=4,
        )
        return out
    bf16 = x.dtype == torch.bfloat16
    pieces = torch.empty(3, num_experts, hidden, dtype=torch.bfloat16 if bf16 else torch.float32, device=x.device)
    split_weight_kernel[(triton.cdiv(router_weight.numel(), SPLIT_BLOCK),)](
        router_weight, pieces, router_weight.numel(), BF16=bf16, BLOCK=SPLIT_BLOCK, num_warps=4)
    tile = logits_tile(num_tokens, num_experts, bf16, num_sms(x.device))
    router_logits_kernel[(triton.cdiv(num_experts, tile["BLOCK_E"]), triton.cdiv(num_tokens, tile["BLOCK_T"]))](
        x, pieces, out, num_tokens, num_experts, hidden, x.stride(0), **tile)
    return out


def logits_tile(num_tokens: int, num_experts: int, bf16: bool, sms: int) -> dict:
    """``router_logits_kernel``'s tile and launch options: the largest tile (128 tokens by up to
    128 experts for a bf16 x; an fp16 x meets fp32 TF32 pieces, twice the bytes a stage, so up to
    64) that still launches programs for at least 3/4 of the SMs, narrowed to 64 experts and then
    to 64 tokens (4 warps) until it does. A wider tile reads x fewer times and does more products
    per byte loaded, but at 4096 tokens a 128 x 128 tile leaves most SMs idle. Timed on an H200
    while writing it (development runs, not recorded), for OLMoE, Qwen3, DeepSeek-V3 and Mixtral
    at 4096 and 16384 tokens: the tile this picks was the fastest of those tried or close to it,
    except OLMoE at 4096 tokens, where a narrower 64 x 16 tile was faster. Below 4096 tokens (the
    kernel's range since ``MIN_TOKENS`` went to 512) the rule was not tuned: only the whole kernel
    was timed, against cuBLAS. There the step from 128- to 64-token tiles is abrupt (at 3072
    DeepSeek-V3 tokens the kernel was slower than at 4096 in that run, still faster than cuBLAS)."""
    block_t, block_e = 128, min(128 if bf16 else 64, max(16, triton.next_power_of_2(num_experts)))
    enough = 3 * sms // 4
    if block_e > 64 and triton.cdiv(num_tokens, block_t) * triton.cdiv(num_experts, block_e) < enough:
        block_e = 64
    if triton.cdiv(num_tokens, block_t) * triton.cdiv(num_experts, block_e) < enough:
        block_t = 64
    return dict(BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_H=64, num_warps=8 if block_t == 128 else 4,
                num_stages=3 if block_e * (2 if bf16 else 4) > 128 else 4)


MAX_EXPERTS = 1024  # one token's E scores live in registers


def supports(logits: torch.Tensor, num_groups: int | None) -> bool:
    """Whether the kernel selects from these logits: fp32 with contiguous rows, and with groups E a power of two."""
    return logits.dtype == torch.float32 and logits.stride(1) == 1 and _experts_fit(logits.shape[1], num_groups)


def _experts_fit(num_experts: int, num_groups: int | None) -> bool:
    if num_experts > MAX_EXPERTS:
        return False
    if num_groups is not None and num_groups > 1:  # the tile is reshaped to [T, groups, E / groups]: no padding
        return 16 <= num_experts == triton.next_power_of_2(num_experts) and num_experts % num_groups == 0
    return True


def select_experts(logits: torch.Tensor, top_k: int, *, scoring: str, renormalize: bool,
                   score_bias: torch.Tensor | None, num_groups: int | None, topk_groups: int | None,
                   routed_scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids int32 [T, K], weights fp32 [T, K], scores fp32 [T, K]): tilemoe.routing.select_experts
    in one launch, from ``logits`` [T, E]. The caller has validated the options and checked ``supports``."""
    num_tokens, num_experts = logits.shape
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    scores = torch.empty_like(weights)
    if num_tokens == 0:
        return ids, weights, scores
    block_e = max(16, triton.next_power_of_2(num_experts))
    # A decode batch gets a tile of its own height, and one warp while the tile is small: each of
    # the top-k rounds is a chain of reductions along E, and a reduction that spans warps goes
    # through shared memory and a barrier. On the H200 DeepSeek-V3's one-token selection took
    # 18.4 us as a 16-row tile over 4 warps, 3.1 us as one row in one warp (tools/profile_kernels.py,
    # benchmarks/results/nvidia-h200/profile_kernels-2026-11-24-15 and -17).
    block_t = max(1, min(16, 4096 // block_e, triton.next_power_of_2(num_tokens)))
    warps = max(1, min(4, block_t * block_e // 256))
    grouped = num_groups is not None and num_groups > 1
    bias = score_bias.to(torch.float32).contiguous() if score_bias is not None else None
    topk_router_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits, bias if bias is not None else logits, ids, weights, scores,
        num_tokens, num_experts, logits.stride(0), float(routed_scaling),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK_T=block_t, BLOCK_E=block_e,
        SIGMOID=scoring == "sigmoid", HAS_BIAS=score_bias is not None, RENORMALIZE=renormalize,
        NUM_GROUPS=num_groups if grouped else 1, TOPK_GROUPS=topk_groups if grouped else 1,
        num_warps=warps,
    )
    return ids, weights, scores
