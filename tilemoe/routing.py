"""Top-k routing, the routing metadata every backend consumes, capacity, aux loss, load statistics.

The pipeline of one MoE layer's router:

    logits = router_logits(x, router_weight)          # [T, E], fp32 (fp64 for fp64 inputs)
    routing = route(logits, top_k, scoring="softmax")  # -> Routing: who goes where, and the permutation

``Routing`` is computed once per forward and handed to a backend; no backend recomputes it.
Everything here runs on any device with no host synchronization, except what is documented
as a statistic (those return Python numbers).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from . import checks

SCORINGS = ("softmax", "sigmoid")


def router_logits(x: torch.Tensor, router_weight: torch.Tensor, *, fused: bool = False) -> torch.Tensor:
    """x [T, H] @ router_weight[E, H]^T in fp32 (fp64 when x is fp64), whatever x's dtype.

    The router decides which expert each token meets, so it is computed in full precision:
    bf16 logits would flip near-tied top-k choices. For autograd it keeps x as it came, not its
    full-precision copy (``_RouterLogits``).
    fused: compute them with the chapter's Triton kernels where they take these inputs
    (``tilemoe.triton.router.takes``): from ``MIN_TOKENS`` bf16/fp16 tokens up, fp32's accuracy
    from the tensor cores (``router_logits_kernel``), where PyTorch's fp32 GEMM runs on the CUDA
    cores; for a bf16 x their backward runs on the tensor cores too (``_RouterLogits``); a decode
    batch of at most ``MAX_DECODE_TOKENS`` in one launch (``decode_logits_kernel``). Otherwise
    PyTorch's GEMM and its fp32 backward (what the baselines measure).
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if torch.is_grad_enabled() and (x.requires_grad or router_weight.requires_grad):
        return _RouterLogits.apply(x, router_weight, dtype, fused)
    # No gradient wanted: no autograd node either (at a decode batch it costs more than the GEMM).
    return _logits(x, router_weight, dtype, _logits_kernel(x, router_weight) if fused else None)


def _logits(x: torch.Tensor, router_weight: torch.Tensor, dtype: torch.dtype, kernel) -> torch.Tensor:
    """The logits in ``dtype``, by the Triton kernel module ``kernel`` when given, else by PyTorch."""
    if kernel is not None:
        return kernel.logits(x, router_weight)
    return x.to(dtype) @ router_weight.to(dtype).t()


def _logits_kernel(x: torch.Tensor, router_weight: torch.Tensor):
    """tilemoe.triton.router when one of its logits kernels takes these inputs (``router.takes``),
    else None."""
    if not x.is_cuda or not _triton_available(x.device):
        return None
    from .triton import router

    return router if router.takes(x, router_weight) else None


class _RouterLogits(torch.autograd.Function):
    """x.to(dtype) @ w.to(dtype)^T (or, fused, the Triton kernel's logits), saving x and w in their
    own dtypes. PyTorch's autograd of that expression would save the fp32 copy of a bf16 x until
    the backward: 134 MB at 16384 tokens of H = 2048, held through the whole training step.

    When the Triton kernel computed the logits of a bf16 x, the backward runs on the tensor cores
    in bf16: the logits' gradient and w are rounded to bf16 (relative error up to 2^-8 each, as
    every other GEMM of a bf16 layer's backward reads its operands), the products are summed in
    fp32, and w's gradient is returned in fp32 (``_mm_fp32``). tests/test_layer.py holds a training
    step's gradients to the bf16 tolerance on a GPU. An fp16 x keeps the fp32 backward: fp16's
    range would flush the aux loss's tiny logit gradients to zero without loss scaling. The fp32
    backward runs on the CUDA cores and needs an fp32 copy of x, made for the moment its product
    needs it; PyTorch's logits (the baselines') always take it."""

    @staticmethod
    def forward(ctx, x, w, dtype, fused):
        ctx.save_for_backward(x, w)
        ctx.dtype = dtype
        kernel = _logits_kernel(x, w) if fused else None
        ctx.bf16_backward = kernel is not None and x.dtype == torch.bfloat16
        return _logits(x, w, dtype, kernel)

    @staticmethod
    def backward(ctx, d_logits):
        x, w = ctx.saved_tensors
        dx = dw = None
        x2d = x.reshape(-1, w.shape[1])
        if ctx.bf16_backward:
            d16 = d_logits.to(torch.bfloat16)
            if ctx.needs_input_grad[0]:
                dx = d16 @ w.to(torch.bfloat16)
            if ctx.needs_input_grad[1]:
                dw = _mm_fp32(d16.reshape(-1, w.shape[0]).t(), x2d).to(w.dtype)
            return dx, dw, None, None
        if ctx.needs_input_grad[0]:
            dx = (d_logits @ w.to(ctx.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (d_logits.reshape(-1, w.shape[0]).t() @ x2d.to(ctx.dtype)).to(w.dtype)
        return dx, dw, None, None


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 16-bit a and b, summed and returned in fp32: one tensor-core GEMM on a GPU
    (``out_dtype``); on the CPU, which has no such GEMM, a GEMM of fp32 copies (the same exact
    products, summed in fp32, perhaps in another order)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


@dataclass(frozen=True, eq=False)
class Routing:
    """Where every token-slot goes. T tokens, K slots each, E experts; a slot is (token t, choice k),
    flattened as s = t*K + k.

    topk_ids      [T, K] int32   expert of each slot; -1 marks a slot dropped by capacity
    topk_weights  [T, K] float   combine weight of each slot (0 on dropped slots)
    topk_scores   [T, K] float   the router's raw score of each selected slot (softmax probability
                                 or sigmoid score, before renormalization and scaling)
    counts        [E] int32      kept slots per expert
    offsets       [E+1] int32    offsets[0] = 0, offsets[e+1] = offsets[e] + counts[e]
    sorted_slots  [T*K] int64    slot ids grouped by expert (token order inside an expert);
                                 the first offsets[E] are kept slots, dropped ones come last
    sorted_tokens [T*K] int64    sorted_slots // K: the row of x each grouped row reads
    slot_position [T*K] int64    the inverse permutation: sorted_slots[slot_position[s]] == s
    capacity      int or None    per-expert capacity that was applied, if any
    has_empty_slots bool         some slots may hold -1 (dropped by capacity, or padding after
                                 token rounding): combines must mask them
    row_multiple  int            every count is a multiple of this (token rounding sets its tile
                                 when every expert came out aligned, from counts it already read on
                                 the host); kernels whose row tile divides it skip row masks
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    topk_scores: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    sorted_slots: torch.Tensor
    sorted_tokens: torch.Tensor
    slot_position: torch.Tensor
    capacity: int | None = None
    has_empty_slots: bool = False
    row_multiple: int = 1

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts.numel()

    @property
    def dropped(self) -> torch.Tensor:
        """[T, K] bool: slots dropped by capacity."""
        return self.topk_ids < 0


def select_experts(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    score_bias: torch.Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    routed_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose top_k experts per token. Returns (ids int64 [T,K], weights [T,K], scores [T,K]).

    softmax: scores = softmax(logits) over the E experts (Mixtral, Qwen3, OLMoE).
    sigmoid: scores = sigmoid(logits) (DeepSeek-V3).
    score_bias [E] is added for *selection only*: it steers which experts win (DeepSeek-V3's
    auxiliary-loss-free balancing) but the weights come from the unbiased scores.
    num_groups / topk_groups: group-limited routing. Experts form num_groups equal groups; a
    group's score is the sum of its two best biased scores; only the topk_groups best groups
    may be chosen from (DeepSeek-V3: 8 groups, 4 kept).
    weights = scores of the chosen experts, divided by their sum when renormalize (OLMoE uses
    renormalize=False), times routed_scaling (DeepSeek-V3: 2.5).
    Ties go to the lower expert index (a stable sort, so every backend agrees).
    """
    checks.check_int("top_k", top_k, low=1, high=logits.shape[-1])
    scoring = checks.check_choice("scoring", scoring, SCORINGS)
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    selection = scores if score_bias is None else scores + score_bias.to(scores.dtype)

    if num_groups is not None:
        num_tokens, num_experts = selection.shape
        grouped = selection.view(num_tokens, num_groups, num_experts // num_groups)
        best_two = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        group_order = best_two.sort(dim=-1, descending=True, stable=True).indices
        keep = torch.zeros_like(best_two, dtype=torch.bool)
        keep.scatter_(1, group_order[:, :topk_groups], True)
        selection = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)

    ids = selection.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    return (ids, *chosen_weights(scores, ids, renormalize=renormalize, routed_scaling=routed_scaling))


def chosen_weights(scores: torch.Tensor, ids: torch.Tensor, *, renormalize: bool,
                   routed_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, chosen scores) [T, K] of the experts ``ids`` (int64 [T, K]) from the scores [T, E]:
    ``select_experts``' weights, differentiable with respect to the scores."""
    chosen = scores.gather(1, ids)
    weights = chosen
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    if routed_scaling != 1.0:
        weights = weights * routed_scaling
    return weights, chosen


def slot_counts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [E]: slots per expert, ignoring dropped slots (-1). No host sync (unlike bincount on CUDA)."""
    flat = topk_ids.reshape(-1).long()
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, torch.where(flat < 0, num_experts, flat), torch.ones_like(flat))
    return counts[:num_experts]


def capacity_for(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Per-expert capacity ceil(capacity_factor * T * K / E): the slots an expert may keep."""
    return math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 9))


def capacity_drop_mask(topk_ids: torch.Tensor, topk_scores: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """[T, K] bool: the slots past their expert's capacity, lowest router score dropped first.

    Inside an expert, slots are ranked by score (ties: lower token first); the first `capacity`
    stay. A dropped slot contributes nothing: the residual connection carries its token.
    """
    flat_ids = topk_ids.reshape(-1).long()
    by_score = torch.argsort(topk_scores.reshape(-1), descending=True, stable=True)
    order = by_score[torch.argsort(flat_ids[by_score], stable=True)]
    counts = slot_counts(flat_ids, num_experts)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(flat_ids)
    rank[order] = torch.arange(flat_ids.numel(), device=flat_ids.device) - starts[flat_ids[order]]
    return (rank >= capacity).view(topk_ids.shape)


def expert_counts_and_offsets(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """counts [E] int32 and offsets [E+1] int32 of the kept slots (ids of -1 are not counted).

    On a CUDA device with the compiled extension this is one small kernel (csrc/expert_counts.cu);
    elsewhere, torch ops. Neither synchronizes with the host. Under torch.compile the torch ops run
    too: the extension takes a raw stream pointer, which a traced stream does not have.
    """
    from . import cuda

    if topk_ids.is_cuda and cuda.available() and not torch.compiler.is_compiling():
        return cuda.expert_counts(topk_ids.to(torch.int32).contiguous(), num_experts, validate=False)
    counts = slot_counts(topk_ids, num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=counts.device)
    offsets[1:] = counts.cumsum(0)
    return counts.to(torch.int32), offsets.to(torch.int32)


def build_routing(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_scores: torch.Tensor,
    num_experts: int,
    *,
    capacity: int | None = None,
    has_empty_slots: bool | None = None,
    fused: bool = False,
) -> Routing:
    """The metadata of a routing decision: counts, offsets and the permutation grouping slots by expert.

    Slots with id -1 are empty (dropped); has_empty_slots says whether there may be any
    (default: when a capacity was applied), so that no one has to look (a host sync).
    fused: build it with one Triton launch (tilemoe/triton/metadata.py, the same result bit for
    bit) where Triton runs on the ids' device; elsewhere with the PyTorch ops below.
    """
    num_tokens, top_k = topk_ids.shape
    if has_empty_slots is None:
        has_empty_slots = capacity is not None
    ids32 = topk_ids.to(torch.int32)
    if fused and _triton_available(topk_ids.device):
        from .triton.metadata import sort_by_expert

        counts, offsets, sorted_slots, sorted_tokens, slot_position = sort_by_expert(ids32.contiguous(), num_experts)
    else:
        flat = topk_ids.reshape(-1)
        # Dropped slots (-1) sort after every expert, so the kept ones form the prefix [0, offsets[E]).
        keys = torch.where(flat < 0, num_experts, flat) if has_empty_slots else flat
        sorted_slots = torch.argsort(keys, stable=True)
        slot_position = torch.empty_like(sorted_slots)
        slot_position[sorted_slots] = torch.arange(flat.numel(), device=flat.device)
        sorted_tokens = torch.div(sorted_slots, top_k, rounding_mode="floor")
        counts, offsets = expert_counts_and_offsets(topk_ids, num_experts)
    return Routing(
        topk_ids=ids32,
        topk_weights=topk_weights,
        topk_scores=topk_scores,
        counts=counts,
        offsets=offsets,
        sorted_slots=sorted_slots,
        sorted_tokens=sorted_tokens,
        slot_position=slot_position,
        capacity=capacity,
        has_empty_slots=has_empty_slots,
    )


def check_router_options(
    num_experts: int,
    top_k: int,
    *,
    scoring: str,
    score_bias: torch.Tensor | None,
    num_groups: int | None,
    topk_groups: int | None,
    routed_scaling: float,
    capacity_factor: float | None,
    device: torch.device,
) -> None:
    """Validate the router options against E and top_k (the same rules for every entry point)."""
    checks.check_int("top_k", top_k, low=1, high=num_experts)
    checks.check_choice("scoring", scoring, SCORINGS)
    if score_bias is not None:
        checks.check_float_tensor("score_bias", score_bias)
        checks.check_shape("score_bias", score_bias, (num_experts,), f"[E] = [{num_experts}]")
        checks.check_same_device("score_bias", score_bias, device)
    if (num_groups is None) != (topk_groups is None):
        missing = "topk_groups" if topk_groups is None else "num_groups"
        checks.fail(missing, "an int (num_groups and topk_groups come together)", None, TypeError)
    if num_groups is not None:
        checks.check_int("num_groups", num_groups, low=1, high=num_experts)
        if num_experts % num_groups:
            checks.fail("num_groups", f"a divisor of num_experts = {num_experts}", num_groups)
        checks.check_int("topk_groups", topk_groups, low=1, high=num_groups)
        reachable = topk_groups * (num_experts // num_groups)
        if top_k > reachable:
            checks.fail("top_k", f"<= topk_groups * experts per group = {reachable}", top_k)
    checks.check_positive_float("routed_scaling", routed_scaling)
    if capacity_factor is not None:
        checks.check_positive_float("capacity_factor", capacity_factor)


@functools.lru_cache(maxsize=None)
def _triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device`` (a GPU, or the CPU under TRITON_INTERPRET=1);
    fixed for the process once Triton is imported, so asked once per device."""
    from .backends import triton_fused

    return triton_fused.unavailable_reason(device, torch.float32, 1, 1) is None


def _triton_router(logits: torch.Tensor):
    """tilemoe.triton.router where Triton is compiled for the logits' device, else None. The caller
    still asks it whether it ``supports`` them."""
    if not _triton_available(logits.device):
        return None
    from .triton import router

    return router


def route(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    score_bias: torch.Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    routed_scaling: float = 1.0,
    capacity_factor: float | None = None,
    fused: bool = False,
) -> Routing:
    """Route T tokens given their router logits [T, E]: select_experts, optional capacity, metadata.

    capacity_factor: each expert keeps at most ceil(cf * T * K / E) slots; the lowest-scored
    overflow is dropped (topk_ids = -1, weight 0; kept weights are not renormalized, as in
    Switch/GShard). ``Routing.dropped`` reports which.
    fused: select the experts with one Triton kernel (tilemoe/triton/router.py: the same experts
    in the same order, weights equal to rounding) where it runs these logits (fp32 on a GPU, or
    under TRITON_INTERPRET=1), and build the metadata with another (tilemoe/triton/metadata.py,
    bit for bit the PyTorch result); elsewhere the PyTorch ops. When the logits want a gradient,
    the kernel still chooses the experts and the weights are recomputed from the logits by
    ``chosen_weights``, so that the gradient flows through PyTorch's autograd.
    """
    checks.check_float_tensor("logits", logits)
    if logits.dim() != 2 or logits.shape[1] == 0:
        checks.fail("logits", "shape [T, E] with E >= 1", list(logits.shape))
    num_experts = logits.shape[1]
    check_router_options(
        num_experts, top_k, scoring=scoring, score_bias=score_bias, num_groups=num_groups,
        topk_groups=topk_groups, routed_scaling=routed_scaling, capacity_factor=capacity_factor,
        device=logits.device,
    )
    options = dict(scoring=scoring, renormalize=renormalize, score_bias=score_bias, num_groups=num_groups,
                   topk_groups=topk_groups, routed_scaling=routed_scaling)
    return _route_checked(logits, top_k, options, capacity_factor, fused)


def _route_checked(logits: torch.Tensor, top_k: int, options: dict, capacity_factor: float | None,
                   fused: bool) -> Routing:
    """``route`` once its arguments are checked: select the experts, apply the capacity, build the metadata."""
    router = _triton_router(logits) if fused else None
    if router is not None and router.supports(logits, options["num_groups"]):
        ids, weights, scores = router.select_experts(logits.detach(), top_k, **options)
        if torch.is_grad_enabled() and logits.requires_grad:
            # Training: the kernel chose the experts (no [T, E] sort); the weights carry the gradient
            # back to the logits, so they are recomputed through autograd, by select_experts' formula.
            probs = logits.softmax(dim=-1) if options["scoring"] == "softmax" else logits.sigmoid()
            weights, scores = chosen_weights(probs, ids.long(), renormalize=options["renormalize"],
                                             routed_scaling=options["routed_scaling"])
    else:
        ids, weights, scores = select_experts(logits, top_k, **options)
    return _with_capacity(ids, weights, scores, logits.shape[1], capacity_factor, fused)


def _with_capacity(ids: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor, num_experts: int,
                   capacity_factor: float | None, fused: bool) -> Routing:
    """Drop each expert's overflow past capacity (if a factor is given), then build the metadata
    (``build_routing``, fused or not)."""
    num_tokens, top_k = ids.shape
    capacity = None
    if capacity_factor is not None:
        capacity = capacity_for(num_tokens, top_k, num_experts, capacity_factor)
        drop = capacity_drop_mask(ids, scores, num_experts, capacity)
        ids = ids.masked_fill(drop, -1)
        weights = weights.masked_fill(drop, 0.0)
    return build_routing(ids, weights, scores, num_experts, capacity=capacity, fused=fused)


def route_tokens(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    score_bias: torch.Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    routed_scaling: float = 1.0,
    capacity_factor: float | None = None,
    fused: bool = False,
) -> Routing:
    """``route(router_logits(x, router_weight), top_k, ...)``: the whole router of one MoE layer.

    fused: compute the logits, select the experts and build the metadata with the Triton kernels
    where they take the inputs (``router_logits``' and ``route``'s fused). The router options are
    checked before the logits are computed.
    """
    if router_weight.dim() != 2:
        checks.fail("router_weight", "shape [E, H]", list(router_weight.shape))
    check_router_options(router_weight.shape[0], top_k, scoring=scoring, score_bias=score_bias, num_groups=num_groups,
                         topk_groups=topk_groups, routed_scaling=routed_scaling, capacity_factor=capacity_factor,
                         device=x.device)
    options = dict(scoring=scoring, renormalize=renormalize, score_bias=score_bias, num_groups=num_groups,
                   topk_groups=topk_groups, routed_scaling=routed_scaling)
    return _route_checked(router_logits(x, router_weight, fused=fused), top_k, options, capacity_factor, fused)


def load_balancing_loss(logits: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, *,
                        counts: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/GShard auxiliary loss E * sum_i f_i * P_i (the caller multiplies by alpha).

    f_i: fraction of the T*K slots routed to expert i (not differentiable: it is a count);
    P_i: mean router probability of expert i over the tokens (carries the gradient).
    Perfectly uniform routing gives 1.0; imbalance raises it, up to E.
    Dropped slots (id -1) are not counted in f.
    counts: the slots per expert [E] when already counted (``Routing.counts``: the layer passes
    them, which saves counting topk_ids again); else counted from topk_ids.
    """
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
    if counts is None:
        counts = slot_counts(topk_ids, num_experts)
    else:
        checks.check_shape("counts", counts, (num_experts,), f"[E] = [{num_experts}]")
    fraction = counts.to(probs.dtype) / topk_ids.numel()
    # sum_i f_i * mean_t probs[t, i] as one matrix-vector product over the tokens' rows. PyTorch's
    # mean over dim 0 reads [T, E] across its rows: 22.1 us for Qwen3's 16384 x 128 on an H200,
    # against 4.0 us for the product and 3.8 us for its sum (profile_kernels-2026-11-24-22, -23).
    return num_experts / probs.shape[0] * (probs @ fraction).sum()


def update_score_bias(score_bias: torch.Tensor, loads: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing, one step, in place and without a host sync:
    score_bias[e] += rate for every expert loaded below the mean, -= rate above it (unchanged at
    exactly the mean). The bias only steers selection (``select_experts``), so the combine weights,
    and what the layer computes for a chosen expert, do not change."""
    checks.check_positive_float("rate", rate)
    x = loads.to(score_bias.dtype)
    score_bias.add_(rate * torch.sign(x.mean() - x))


# -- Load statistics: how unevenly the experts are loaded. Each takes per-expert token counts. --

def _loads(loads) -> torch.Tensor:
    t = torch.as_tensor(loads).detach().to("cpu", torch.float64).reshape(-1)
    if t.numel() == 0:
        checks.fail("loads", "at least one expert", "an empty sequence")
    if (t < 0).any() or not torch.isfinite(t).all():
        checks.fail("loads", "finite counts >= 0", t.tolist())
    if t.sum() == 0:
        checks.fail("loads", "at least one routed token", "all zeros")
    return t


def entropy(loads) -> float:
    """Shannon entropy (nats) of the load distribution p_i = n_i / sum n: log(E) when uniform, 0 when one expert takes all."""
    p = _loads(loads)
    p = p / p.sum()
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum())


def gini(loads) -> float:
    """Gini coefficient: 0 for equal loads, (E-1)/E when one expert takes everything.

    With loads sorted ascending x_1..x_n: G = sum_i (2i - n - 1) x_i / (n * sum x).
    """
    x = _loads(loads).sort().values
    n = x.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * i - n - 1) * x).sum() / (n * x.sum()))


def coefficient_of_variation(loads) -> float:
    """Population standard deviation over mean: 0 for equal loads."""
    x = _loads(loads)
    return float(x.std(unbiased=False) / x.mean())


def min_max_ratio(loads) -> float:
    """Least-loaded over most-loaded expert: 1 for equal loads, 0 when some expert is idle."""
    x = _loads(loads)
    return float(x.min() / x.max())


def tile_rows(loads, tile_size: int) -> int:
    """Rows a tile-based grouped GEMM runs: every expert's count rounded up to whole tiles."""
    checks.check_int("tile_size", tile_size, low=1)
    x = torch.as_tensor(loads).detach().to("cpu", torch.int64).reshape(-1)
    return int((-(-x // tile_size) * tile_size).sum())


def tile_utilization(loads, tile_size: int) -> float:
    """Real rows over the rows of the tiles a grouped GEMM runs: sum n_i / (tile * sum ceil(n_i / tile)).

    An expert with 142 tokens and 128-row tiles runs two tiles (256 rows) for 142 real rows.
    No rows at all run no tile and waste nothing: 1.0.
    """
    checks.check_int("tile_size", tile_size, low=1)
    x = torch.as_tensor(loads).detach().to("cpu", torch.float64).reshape(-1)
    if (x < 0).any() or not torch.isfinite(x).all():
        checks.fail("loads", "finite counts >= 0", x.tolist())
    tiles = torch.ceil(x / tile_size).sum()
    return float(x.sum() / (tiles * tile_size)) if tiles > 0 else 1.0


@dataclass(frozen=True)
class LoadStats:
    """Summary of one routing decision's per-expert loads (see the functions above)."""

    loads: list[int]
    entropy: float
    normalized_entropy: float
    gini: float
    coefficient_of_variation: float
    min_max_ratio: float
    tile_size: int
    tile_utilization: float

    def as_row(self) -> dict:
        return {
            "entropy": self.entropy, "entropy / log E": self.normalized_entropy, "Gini": self.gini,
            "CV": self.coefficient_of_variation, "min/max": self.min_max_ratio,
            f"tile util ({self.tile_size})": self.tile_utilization,
        }


def load_stats(loads, tile_size: int = 128) -> LoadStats:
    """All the statistics of per-expert loads (a Routing's ``counts``, a list, an array)."""
    x = _loads(loads)
    num_experts = x.numel()
    h = entropy(x)
    return LoadStats(
        loads=[int(v) for v in x.tolist()],
        entropy=h,
        normalized_entropy=h / math.log(num_experts) if num_experts > 1 else 1.0,
        gini=gini(x),
        coefficient_of_variation=coefficient_of_variation(x),
        min_max_ratio=min_max_ratio(x),
        tile_size=tile_size,
        tile_utilization=tile_utilization(x, tile_size),
    )
