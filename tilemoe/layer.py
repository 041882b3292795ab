"""``OptimizedMoELayer``: the nn.Module users put in a model, for training and for inference.

    layer = OptimizedMoELayer(2048, 1024, num_experts=64, top_k=8).to("cuda", torch.bfloat16)
    y, aux_loss = layer(x, return_aux_loss=True)      # training: add aux_loss to the model's loss
    layer.expert_usage                                  # running counts, fractions and their Gini
    train_step(layer, x, dy)                            # what lesson 6 times as one training step

It owns the router weight [E, H] (fp32: logits in fp32, DESIGN.md), the experts' w_gate_up
[E, 2I, H] and w_down [E, H, I], and the shared experts, and runs them through
``tilemoe.moe_forward`` with the backend of your choice. What it adds on top:

- Routing it decides itself, so it can count what every expert received (``expert_usage``), add
  the load-balancing loss, round the counts to the tile (``rounding``, SonicMoE's token rounding)
  and drop past a capacity. Rounding applies in training mode only: it makes a token's experts
  depend on the rest of the batch, which a served model should not do, so ``eval()`` routes by
  plain top-k.
- ``router="sigmoid_bias"``: DeepSeek-V3's router (sigmoid scores, a selection-only bias, group-
  limited top-k, routed scaling). In training mode the bias takes one auxiliary-loss-free balancing
  step per forward (``bias_update_rate``).
- ``gradient_checkpointing``: the router's logits GEMM is run again in the backward instead of
  keeping anything for it. ``router_logits`` already keeps only x in its own dtype (not an fp32
  copy), so this saves little now; it is there for models that checkpoint every module.
- ``use_io_overlap=False``: the Triton kernels load without TMA descriptors (lesson 3's
  comparison); the default lets them use TMA where the GPU has it.
- ``load_hf_state_dict``: a Hugging Face Mixtral, Qwen3-MoE, OLMoE or DeepSeek-V3 block's weights
  (``tilemoe.hf``), converted once.

Training: ``backend="auto"`` picks the fastest backend with its own backward (on a GPU the Triton
backward: it saves only x and the pre-activation, and is measured faster than grouped_mm's; one
backward per forward, as it reuses the pre-activation's memory);
keep ``load_balance_weight`` around 0.01, or the bias balancing of "sigmoid_bias". Inference: ``layer.eval()`` and
``torch.no_grad()``; for decode batches wrap the weights in ``tilemoe.graphs.GraphedMoE``.

The router runs on the backend's own kernels where it has them (backends "triton" and "cuda": the
Triton logits GEMM, top-k and metadata kernels), else on PyTorch's ops. In training the top-k
kernel still chooses the experts, and the routing weights are recomputed from the logits by
PyTorch's ops (``tilemoe.routing.chosen_weights``), whose autograd carries their gradient to the
router.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from . import backends, checks, hf
from .moe import moe_forward
from .rounding import MODES as ROUNDING_MODES
from .rounding import round_routing
from .routing import Routing, gini, load_balancing_loss, route, route_tokens, router_logits, update_score_bias
from .triton.configs import tma_enabled

ROUTERS = ("softmax", "sigmoid_bias")


@dataclass(frozen=True)
class ExpertUsage:
    """What the experts received since the last reset: kept token-slots per expert."""

    counts: list[int]
    fractions: list[float]  # counts / their sum (zeros before any token)
    gini: float             # 0: equal loads; (E-1)/E: one expert takes everything


class OptimizedMoELayer(nn.Module):
    """A SwiGLU MoE layer on the chapter's kernels; see the module docstring for every option."""

    def __init__(self, hidden_dim: int, ffn_dim: int, num_experts: int, top_k: int, *, tile_size: int = 128,
                 rounding: str | None = None, capacity_factor: float | None = None, use_io_overlap: bool = True,
                 load_balance_weight: float = 0.01, router: str = "softmax", num_shared_experts: int = 0,
                 gradient_checkpointing: bool = False, backend: str = "auto", renormalize: bool = True,
                 num_groups: int | None = None, topk_groups: int | None = None, routed_scaling: float = 1.0,
                 bias_update_rate: float = 1e-3, device=None, dtype: torch.dtype | None = None):
        super().__init__()
        checks.check_int("hidden_dim", hidden_dim, low=1)
        checks.check_int("ffn_dim", ffn_dim, low=1)
        checks.check_int("num_experts", num_experts, low=1)
        checks.check_int("top_k", top_k, low=1, high=num_experts)
        checks.check_int("tile_size", tile_size, low=1)
        checks.check_int("num_shared_experts", num_shared_experts, low=0)
        if rounding is not None:
            checks.check_choice("rounding", rounding, ROUNDING_MODES)
        if capacity_factor is not None:
            checks.check_positive_float("capacity_factor", capacity_factor)
        if not (isinstance(load_balance_weight, (int, float)) and load_balance_weight >= 0):
            checks.fail("load_balance_weight", "a number >= 0", load_balance_weight)
        checks.check_choice("router", router, ROUTERS)
        checks.check_choice("backend", backend, ("auto", *backends.BACKENDS))
        checks.check_positive_float("routed_scaling", routed_scaling)
        checks.check_positive_float("bias_update_rate", bias_update_rate)
        self.hidden_dim, self.ffn_dim, self.num_experts, self.top_k = hidden_dim, ffn_dim, num_experts, top_k
        self.tile_size, self.rounding, self.capacity_factor = tile_size, rounding, capacity_factor
        self.use_io_overlap, self.load_balance_weight = use_io_overlap, float(load_balance_weight)
        self.router, self.gradient_checkpointing, self.backend = router, gradient_checkpointing, backend
        self.renormalize, self.num_groups, self.topk_groups = renormalize, num_groups, topk_groups
        self.routed_scaling, self.bias_update_rate = float(routed_scaling), float(bias_update_rate)

        def empty(*shape, dt=dtype):
            return nn.Parameter(torch.empty(*shape, device=device, dtype=dt))

        self.router_weight = empty(num_experts, hidden_dim, dt=torch.float32)
        self.w_gate_up = empty(num_experts, 2 * ffn_dim, hidden_dim)
        self.w_down = empty(num_experts, hidden_dim, ffn_dim)
        self.shared_gate_up = empty(num_shared_experts, 2 * ffn_dim, hidden_dim) if num_shared_experts else None
        self.shared_down = empty(num_shared_experts, hidden_dim, ffn_dim) if num_shared_experts else None
        bias = torch.zeros(num_experts, device=device) if router == "sigmoid_bias" else None
        self.register_buffer("score_bias", bias)
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.int64, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear-like scale: normal with std 1/sqrt(fan_in); the selection bias at zero."""
        with torch.no_grad():
            for w in (self.router_weight, self.w_gate_up, self.shared_gate_up):
                if w is not None:
                    w.normal_(0.0, self.hidden_dim**-0.5)
            for w in (self.w_down, self.shared_down):
                if w is not None:
                    w.normal_(0.0, self.ffn_dim**-0.5)
            if self.score_bias is not None:
                self.score_bias.zero_()

    def router_options(self) -> dict:
        """The keyword arguments of ``tilemoe.routing.route`` for this layer's router."""
        return dict(scoring="sigmoid" if self.router == "sigmoid_bias" else "softmax", renormalize=self.renormalize,
                    score_bias=self.score_bias, num_groups=self.num_groups, topk_groups=self.topk_groups,
                    routed_scaling=self.routed_scaling)

    def forward(self, x: torch.Tensor, return_aux_loss: bool = False):
        """y = MoE(x) with x's shape and dtype; with return_aux_loss, (y, load_balance_weight * the
        Switch load-balancing loss of this batch's routing)."""
        checks.check_float_tensor("x", x)
        if x.shape[-1:] != (self.hidden_dim,):
            checks.fail("x", f"shape [..., H] with H = {self.hidden_dim}", list(x.shape))
        tokens = x.reshape(-1, self.hidden_dim)
        routing, logits = self._route(tokens, need_logits=return_aux_loss)
        with torch.no_grad():
            self.expert_counts += routing.counts
            if self.training and self.score_bias is not None:
                update_score_bias(self.score_bias, routing.counts, self.bias_update_rate)
        with tma_enabled(self.use_io_overlap):
            y = moe_forward(tokens, self.router_weight, self.w_gate_up, self.w_down, routing.top_k, backend=self.backend,
                            shared_gate_up=self.shared_gate_up, shared_down=self.shared_down, routing=routing)
        y = y.reshape(x.shape)
        if not return_aux_loss:
            return y
        aux = load_balancing_loss(logits, routing.topk_ids, self.num_experts, counts=routing.counts)
        return y, self.load_balance_weight * aux

    def _route(self, tokens: torch.Tensor, *, need_logits: bool) -> tuple[Routing, torch.Tensor | None]:
        """The routing of these tokens and, when the aux loss or rounding needs them, the logits."""
        options = self.router_options()
        rounding = self.rounding if self.training else None
        impl = backends.resolve(self.backend, tokens.device, tokens.dtype, self.hidden_dim, self.ffn_dim,
                                needs_grad=torch.is_grad_enabled())
        fused = getattr(impl, "FUSED_ROUTING", False)  # the backend's own router kernels, or PyTorch's ops
        if not (need_logits or rounding or self.gradient_checkpointing):
            return route_tokens(tokens, self.router_weight, self.top_k, capacity_factor=self.capacity_factor,
                                fused=fused, **options), None
        if self.gradient_checkpointing and torch.is_grad_enabled():
            logits = checkpoint(router_logits, tokens, self.router_weight, fused=fused, use_reentrant=False)
        else:
            logits = router_logits(tokens, self.router_weight, fused=fused)
        routing = route(logits, self.top_k, capacity_factor=self.capacity_factor, fused=fused, **options)
        if rounding:
            scores = logits.sigmoid() if self.router == "sigmoid_bias" else logits.softmax(dim=-1)
            routing = round_routing(scores, routing, self.tile_size, rounding, renormalize=self.renormalize,
                                    routed_scaling=self.routed_scaling).routing
        return routing, logits

    @property
    def expert_usage(self) -> ExpertUsage:
        """Kept token-slots per expert since construction or ``reset_expert_usage`` (a host sync)."""
        counts = self.expert_counts.tolist()
        total = sum(counts)
        return ExpertUsage(counts=counts, fractions=[c / total if total else 0.0 for c in counts],
                           gini=gini(counts) if total else 0.0)

    def reset_expert_usage(self) -> None:
        self.expert_counts.zero_()

    def load_hf_state_dict(self, state_dict: dict, *, prefix: str = "") -> None:
        """Load a Hugging Face MoE block's weights (``tilemoe.hf.convert_state_dict``), each checked
        against this layer's shape and cast to its parameter's dtype and device."""
        converted = hf.convert_state_dict(state_dict, prefix=prefix)
        for name, value in converted.items():
            target = getattr(self, name)
            if target is None:
                checks.fail("state_dict", f"no {name} (this layer has none: num_shared_experts / router)",
                            f"{name} of shape {list(value.shape)}")
            checks.check_shape(f"state_dict ({name})", value, tuple(target.shape), str(list(target.shape)))
        for name in ("shared_gate_up", "score_bias"):
            if getattr(self, name) is not None and name not in converted:
                checks.fail("state_dict", f"the weights of {name} (this layer has them)", "none")
        with torch.no_grad():
            for name, value in converted.items():
                getattr(self, name).copy_(value)

    @classmethod
    def from_hf(cls, config, state_dict: dict, *, prefix: str = "", **options) -> "OptimizedMoELayer":
        """A layer shaped and routed like a transformers MoE config (``tilemoe.hf.layer_options``),
        holding that block's weights. ``options`` (backend, rounding, device, dtype, ...) pass on."""
        layer = cls(**{**hf.layer_options(config), **options})
        layer.load_hf_state_dict(state_dict, prefix=prefix)
        return layer

    @classmethod
    def from_preset(cls, cfg, **options) -> "OptimizedMoELayer":
        """A layer of a ``tilemoe.presets.MoEConfig``'s shape and router."""
        router = "sigmoid_bias" if cfg.scoring == "sigmoid" else "softmax"
        return cls(cfg.hidden, cfg.ffn, cfg.experts, cfg.top_k, router=router, renormalize=cfg.renormalize,
                   num_groups=cfg.num_groups, topk_groups=cfg.topk_groups, routed_scaling=cfg.routed_scaling,
                   num_shared_experts=cfg.shared_experts, **options)

    def extra_repr(self) -> str:
        return (f"hidden_dim={self.hidden_dim}, ffn_dim={self.ffn_dim}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, router={self.router!r}, backend={self.backend!r}, rounding={self.rounding!r}, "
                f"capacity_factor={self.capacity_factor}, shared={0 if self.shared_down is None else len(self.shared_down)}")


def train_step(layer: OptimizedMoELayer, x: torch.Tensor, dy: torch.Tensor) -> None:
    """One training step as lesson 6's benchmark times it and tools/profile_kernels.py profiles it:
    the forward with its aux loss, then the backward into x (when it wants a gradient) and every
    weight, from dy, y's gradient as the layers above would hand it down, plus the aux loss's.
    No loss over y is computed: its kernels would be timed as the layer's. An optimizer's update is
    left out: it is the same for every backend."""
    checks.check_shape("dy", dy, tuple(x.shape), f"{list(x.shape)} (the shape of x and of y)")
    y, aux = layer(x, return_aux_loss=True)
    torch.autograd.backward((y, aux), (dy, None))
