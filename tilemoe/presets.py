"""Model shapes the chapter measures, in one place. FLOPs of a SwiGLU MoE: 6*T*K*H*I forward.

Sources: each model's public config.json (Mixtral-8x7B-v0.1, DeepSeek-V3, Qwen3-30B-A3B,
OLMoE-1B-7B-0924): hidden_size, moe_intermediate_size (intermediate_size for Mixtral), the expert
counts, and num_hidden_layers (DeepSeek-V3: 61, of which first_k_dense_replace = 3 are dense).
``small`` is sized to run in seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from . import checks


@dataclass(frozen=True)
class MoEConfig:
    name: str
    hidden: int          # H, the model dimension
    ffn: int             # I, each expert's intermediate size
    experts: int         # E, routed experts
    top_k: int           # K, experts per token
    scoring: str = "softmax"
    renormalize: bool = True
    num_groups: int | None = None
    topk_groups: int | None = None
    routed_scaling: float = 1.0
    shared_experts: int = 0  # each of intermediate size ffn
    moe_layers: int = 1      # transformer layers whose FFN is this MoE (config.json; DeepSeek-V3's first 3 are dense)

    def router_options(self) -> dict:
        """The keyword arguments of tilemoe.routing.route / moe_forward for this model's router."""
        return dict(scoring=self.scoring, renormalize=self.renormalize, num_groups=self.num_groups,
                    topk_groups=self.topk_groups, routed_scaling=self.routed_scaling)

    def flops(self, tokens: int, *, include_shared: bool = False) -> int:
        """Forward FLOPs of the routed experts: 2 GEMMs of 2*T*K*H*(2I) and 2*T*K*I*H -> 6*T*K*H*I.

        include_shared adds the shared experts every token meets: 6*T*S*H*I.
        """
        experts_per_token = self.top_k + (self.shared_experts if include_shared else 0)
        return 6 * tokens * experts_per_token * self.hidden * self.ffn

    def weight_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of all routed experts' weights (3*H*I per expert)."""
        return 3 * self.experts * self.hidden * self.ffn * torch.empty(0, dtype=dtype).element_size()

    def as_dict(self) -> dict:
        return asdict(self)

    def init_weights(self, *, device="cpu", dtype=torch.float32, seed: int = 0, shared: bool = True) -> dict:
        """Random weights with nn.Linear-like scale (std 1/sqrt(fan_in)), drawn from ``seed`` directly
        on ``device`` in ``dtype`` (deepseek-v3's experts are 11 G numbers: no CPU detour). The same
        seed gives the same weights on the same device type; CPU and GPU draw different numbers.

        Returns router_weight [E, H] (fp32), w_gate_up [E, 2I, H], w_down [E, H, I] and, for models
        with shared experts (when ``shared``), shared_gate_up [S, 2I, H] and shared_down [S, H, I].
        """
        device = torch.device(device)
        g = torch.Generator(device=device).manual_seed(seed)
        h, i, e = self.hidden, self.ffn, self.experts

        def randn(*shape, fan_in, dt=dtype):
            return torch.randn(*shape, generator=g, device=device, dtype=dt).mul_(fan_in**-0.5)

        weights = {
            "router_weight": randn(e, h, fan_in=h, dt=torch.float32),
            "w_gate_up": randn(e, 2 * i, h, fan_in=h),
            "w_down": randn(e, h, i, fan_in=i),
        }
        if shared and self.shared_experts:
            weights["shared_gate_up"] = randn(self.shared_experts, 2 * i, h, fan_in=h)
            weights["shared_down"] = randn(self.shared_experts, h, i, fan_in=i)
        return weights


PRESETS = {
    c.name: c
    for c in (
        MoEConfig("small", hidden=256, ffn=512, experts=8, top_k=2, moe_layers=4),
        MoEConfig("mixtral-8x7b", hidden=4096, ffn=14336, experts=8, top_k=2, moe_layers=32),
        MoEConfig("deepseek-v3", hidden=7168, ffn=2048, experts=256, top_k=8, scoring="sigmoid",
                  num_groups=8, topk_groups=4, routed_scaling=2.5, shared_experts=1, moe_layers=58),
        MoEConfig("qwen3-30b-a3b", hidden=2048, ffn=768, experts=128, top_k=8, moe_layers=48),
        MoEConfig("olmoe-1b-7b", hidden=2048, ffn=1024, experts=64, top_k=8, renormalize=False, moe_layers=16),
    )
}


def get_preset(name: str) -> MoEConfig:
    checks.check_choice("preset", name, tuple(PRESETS))
    return PRESETS[name]
