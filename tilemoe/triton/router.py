"""Top-k selection in one Triton launch: scores, bias, groups, top-k, renormalization, scaling.

The PyTorch router (tilemoe.routing.select_experts) is about ten small operations: softmax, a
sort of every token's E scores, a gather, a sum, a division... At a decode batch each costs more
in launch and Python overhead than in arithmetic. This kernel does the same per token in
registers: BLOCK_T tokens per program, each token's E logits in one row of a [BLOCK_T, BLOCK_E]
tile, and top-k as K rounds of "take the largest, lowest index on a tie, then mask it out": the
same experts, in the same order, as the stable descending sort of the PyTorch router.

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
    logits_ptr, bias_ptr, ids_ptr, weights_ptr, scores_ptr,
    num_tokens, num_experts, stride_t, routed_scaling,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
):
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


def supports(logits: torch.Tensor, num_groups: int | None) -> bool:
    """Whether the kernel runs this selection: fp32 logits and, with groups, E a power of two."""
    if logits.dtype != torch.float32 or logits.shape[1] > 4096:
        return False
    if num_groups is not None and num_groups > 1:
        num_experts = logits.shape[1]
        return num_experts == triton.next_power_of_2(num_experts) and num_experts % num_groups == 0
    return True


def select_experts(logits: torch.Tensor, top_k: int, *, scoring: str, renormalize: bool,
                   score_bias: torch.Tensor | None, num_groups: int | None, topk_groups: int | None,
                   routed_scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids int32 [T, K], weights fp32 [T, K], scores fp32 [T, K]): tilemoe.routing.select_experts
    in one launch. The caller has validated the options and checked ``supports``."""
    num_tokens, num_experts = logits.shape
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    scores = torch.empty_like(weights)
    if num_tokens == 0:
        return ids, weights, scores
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(16, 4096 // block_e))
    grouped = num_groups is not None and num_groups > 1
    topk_router_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits, score_bias if score_bias is not None else logits, ids, weights, scores,
        num_tokens, num_experts, logits.stride(0), float(routed_scaling),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK_T=block_t, BLOCK_E=block_e,
        SIGMOID=scoring == "sigmoid", HAS_BIAS=score_bias is not None, RENORMALIZE=renormalize,
        NUM_GROUPS=num_groups if grouped else 1, TOPK_GROUPS=topk_groups if grouped else 1,
        num_warps=4,
    )
    return ids, weights, scores
