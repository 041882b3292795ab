"""Top-k selection in one Triton launch: (logits,) scores, bias, groups, top-k, renormalization, scaling.

The PyTorch router (tilemoe.routing.select_experts) is about ten small operations: softmax, a
sort of every token's E scores, a gather, a sum, a division... At a decode batch each costs more
in launch and Python overhead than in arithmetic. This kernel does the same per token in
registers: BLOCK_T tokens per program, each token's E logits in one row of a [BLOCK_T, BLOCK_E]
tile, and top-k as K rounds of "take the largest, lowest index on a tie, then mask it out": the
same experts, in the same order, as the stable descending sort of the PyTorch router.

Given x and the router weight instead of logits, the same kernel first computes the logits as a
small GEMM in registers (3xTF32 tensor-core products, about fp32's accuracy): the [T, E] logits
never reach memory and x is never copied to fp32.

DeepSeek-V3's group-limited routing (num_groups / topk_groups) runs here when E is a power of two
and divisible by num_groups (the tile is reshaped to [BLOCK_T, groups, E / groups]); ``supports``
says when, and tilemoe.routing falls back to PyTorch otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _argmax_lowest(values, index, BIG: tl.constexpr):
    """Per row: the largest value and its lowest column index (ties -> lower index, like a stable sort)."""
    best = tl.max(values, axis=1)
    where = tl.min(tl.where(values == best[:, None], index, BIG), axis=1)
    return best, where


@triton.jit
def topk_router_kernel(
    logits_ptr, router_w_ptr, bias_ptr, ids_ptr, weights_ptr, scores_ptr,
    num_tokens, num_experts, hidden, stride_t, routed_scaling,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
    FROM_TOKENS: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """FROM_TOKENS: logits_ptr is x [T, H] and the logits x @ router_w^T [T, E] are computed here,
    in fp32 registers, never stored; else logits_ptr holds them."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    t_ok = t < num_tokens
    e_ok = e < num_experts
    if FROM_TOKENS:
        # x arrives in bf16/fp16: exact in fp32, and in TF32's 10-bit mantissa too, so 3xTF32
        # products (hi*hi + hi*lo + lo*hi) of x and the fp32 weights keep about fp32's accuracy.
        h = tl.arange(0, BLOCK_H)
        rows = logits_ptr + t[:, None].to(tl.int64) * stride_t
        cols = router_w_ptr + e[None, :].to(tl.int64) * hidden
        acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            h_ok = h0 + h < hidden
            xs = tl.load(rows + (h0 + h)[None, :], mask=t_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
            ws = tl.load(cols + (h0 + h)[:, None], mask=e_ok[None, :] & h_ok[:, None], other=0.0)
            acc = tl.dot(xs, ws, acc, input_precision=DOT_PRECISION)
        logits = tl.where(t_ok[:, None] & e_ok[None, :], acc, float("-inf"))
    else:
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


MAX_EXPERTS = 1024  # one token's E scores live in registers


def supports(logits: torch.Tensor, num_groups: int | None) -> bool:
    """Whether the kernel selects from these logits: fp32, and with groups E a power of two."""
    return logits.dtype == torch.float32 and _experts_fit(logits.shape[1], num_groups)


# Computing the logits in the kernel pays only when its programs fill the GPU: each program runs
# its BLOCK_T tokens over all of H alone, so one token (one program) would read the whole router
# weight on one SM, where cuBLAS spreads the same GEMM over all of them. Measured on an H200 (bench
# rows at a94b278): slower at 1 to 4096 tokens, as fast or faster at 16384. Tests set it to 0.
MIN_WAVES = 1.0


def supports_tokens(x: torch.Tensor, router_weight: torch.Tensor, num_groups: int | None) -> bool:
    """Whether the kernel computes the logits from x itself: contiguous x, fp32 router weights, and
    enough tokens for a full wave of programs (MIN_WAVES) on x's GPU."""
    if not (x.dtype in (torch.bfloat16, torch.float16, torch.float32) and router_weight.dtype == torch.float32
            and x.is_contiguous() and router_weight.is_contiguous() and _experts_fit(router_weight.shape[0], num_groups)):
        return False
    programs = triton.cdiv(x.shape[0], _tokens_per_program(x.shape[0], router_weight.shape[0]))
    from .ops import num_sms

    sms = num_sms(x.device) if x.is_cuda else 1
    return programs >= MIN_WAVES * sms


def _block_e(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


def _tokens_per_program(num_tokens: int, num_experts: int) -> int:
    """A tl.dot tile: at least 16 tokens; up to 64 while the [T, E] fp32 tile stays small."""
    return 16 if num_tokens <= 16 else max(16, min(64, 8192 // _block_e(num_experts)))


def _logits_steps(num_experts: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps) of the logits loop: H in steps of 64 with 4 warps up to E = 128 (faster
    than steps of 32 with 8 warps on an H200 at 16384 tokens, timed beside each other on Qwen3's
    router); at E = 256 that weight tile spills, so steps of 32 with 8 warps."""
    return (64, 4) if _block_e(num_experts) <= 128 else (32, 8)


def _experts_fit(num_experts: int, num_groups: int | None) -> bool:
    if num_experts > MAX_EXPERTS:
        return False
    if num_groups is not None and num_groups > 1:  # the tile is reshaped to [T, groups, E / groups]: no padding
        return 16 <= num_experts == triton.next_power_of_2(num_experts) and num_experts % num_groups == 0
    return True


def select_experts(logits: torch.Tensor | None, top_k: int, *, scoring: str, renormalize: bool,
                   score_bias: torch.Tensor | None, num_groups: int | None, topk_groups: int | None,
                   routed_scaling: float, x: torch.Tensor | None = None,
                   router_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids int32 [T, K], weights fp32 [T, K], scores fp32 [T, K]): tilemoe.routing.select_experts
    in one launch, from ``logits`` [T, E], or from ``x`` [T, H] and ``router_weight`` [E, H] (the
    logits computed in the kernel). The caller has validated the options and checked ``supports``."""
    from_tokens = logits is None
    source = x if from_tokens else logits
    num_tokens = source.shape[0]
    num_experts = router_weight.shape[0] if from_tokens else logits.shape[1]
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=source.device)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=source.device)
    scores = torch.empty_like(weights)
    if num_tokens == 0:
        return ids, weights, scores
    block_e = _block_e(num_experts)
    block_t = _tokens_per_program(num_tokens, num_experts) if from_tokens else max(1, min(16, 4096 // block_e))
    block_h, warps = _logits_steps(num_experts)
    grouped = num_groups is not None and num_groups > 1
    bias = score_bias.to(torch.float32).contiguous() if score_bias is not None else None
    topk_router_kernel[(triton.cdiv(num_tokens, block_t),)](
        source, router_weight if from_tokens else source, bias if bias is not None else source, ids, weights, scores,
        num_tokens, num_experts, x.shape[1] if from_tokens else 0, source.stride(0), float(routed_scaling),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK_T=block_t, BLOCK_E=block_e,
        SIGMOID=scoring == "sigmoid", HAS_BIAS=score_bias is not None, RENORMALIZE=renormalize,
        NUM_GROUPS=num_groups if grouped else 1, TOPK_GROUPS=topk_groups if grouped else 1,
        FROM_TOKENS=from_tokens, BLOCK_H=block_h, DOT_PRECISION="tf32x3",
        num_warps=warps if from_tokens else 4,
    )
    return ids, weights, scores
