"""Hugging Face MoE blocks in the chapter's layout: weights and router options, converted once, at load.

Supported blocks: Mixtral (``MixtralSparseMoeBlock``), Qwen3-MoE (``Qwen3MoeSparseMoeBlock``),
OLMoE (``OlmoeSparseMoeBlock``) and DeepSeek-V3 (``DeepseekV3MoE``). A block's state dict comes
in one of two namings (keys relative to the block; ``prefix`` strips the path in front, e.g.
``"model.layers.3.mlp."``, or Mixtral's ``"model.layers.3.block_sparse_moe."``):

- transformers 5 modules: ``experts.gate_up_proj`` [E, 2I, H] (gate rows, then up rows) and
  ``experts.down_proj`` [E, H, I]: already the chapter's layout;
- checkpoint files (and transformers 4): one Linear per expert and projection, ``experts.{e}.w1``
  (gate), ``w3`` (up), ``w2`` (down) in Mixtral, ``experts.{e}.gate_proj`` / ``up_proj`` /
  ``down_proj`` in the others; stacked here into the two tensors above.

Both have ``gate.weight`` [E, H] (the router), and DeepSeek-V3 also ``gate.e_score_correction_bias``
[E] (its selection-only bias) and ``shared_experts.{gate,up,down}_proj.weight``: one MLP of
intermediate size S*I, which is exactly S shared experts of size I (its intermediate units are
independent), so it is split into S of them.
"""

from __future__ import annotations

import re

import torch

from . import checks

# config.model_type -> (attribute of the expert count, of the expert's intermediate size)
MODEL_TYPES = {
    "mixtral": ("num_local_experts", "intermediate_size"),
    "qwen3_moe": ("num_experts", "moe_intermediate_size"),
    "olmoe": ("num_experts", "intermediate_size"),
    "deepseek_v3": ("n_routed_experts", "moe_intermediate_size"),
}
# per-expert checkpoint names of (gate, up, down)
PER_EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


def layer_options(config) -> dict:
    """The ``tilemoe.layer.OptimizedMoELayer`` arguments of a transformers config (MixtralConfig,
    Qwen3MoeConfig, OlmoeConfig, DeepseekV3Config): sizes and the router the model uses."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        checks.fail("config", f"the config of one of {sorted(MODEL_TYPES)} (its model_type)", model_type)
    experts_attr, ffn_attr = MODEL_TYPES[model_type]
    options = dict(hidden_dim=config.hidden_size, ffn_dim=getattr(config, ffn_attr),
                   num_experts=getattr(config, experts_attr), top_k=config.num_experts_per_tok,
                   renormalize=bool(getattr(config, "norm_topk_prob", True)))
    if model_type == "deepseek_v3":
        options.update(router="sigmoid_bias", num_groups=config.n_group, topk_groups=config.topk_group,
                       routed_scaling=float(config.routed_scaling_factor),
                       num_shared_experts=config.n_shared_experts)
    return options


def convert_state_dict(state_dict: dict, *, prefix: str = "") -> dict:
    """A block's state dict -> {"router_weight", "w_gate_up", "w_down"} and, when present,
    "score_bias" and "shared_gate_up" / "shared_down" (the shared MLP split into experts of the
    routed experts' size). Tensors keep their dtype and device; shapes are checked by the layer.
    KeyError names a missing key; ValueError a key this converter does not know (nothing is
    silently dropped)."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not sd:
        checks.fail("state_dict", f"keys starting with prefix {prefix!r}", sorted(state_dict)[:5])
    used = set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise KeyError(f"state_dict: expected the key {prefix + key!r}; keys given: {sorted(sd)[:8]}")
        used.add(key)
        return sd[key]

    out = {"router_weight": take("gate.weight")}
    if "experts.gate_up_proj" in sd:
        out["w_gate_up"] = take("experts.gate_up_proj")
        out["w_down"] = take("experts.down_proj")
    else:
        experts = sorted({int(m.group(1)) for k in sd if (m := re.match(r"experts\.(\d+)\.", k))})
        if experts != list(range(len(experts))) or not experts:
            checks.fail("state_dict", "experts.gate_up_proj, or per-expert keys experts.0. ... experts.{E-1}.",
                        f"expert indices {experts}")
        names = next((n for n in PER_EXPERT_NAMES if f"experts.0.{n[0]}.weight" in sd), PER_EXPERT_NAMES[1])
        gate, up, down = ([take(f"experts.{e}.{n}.weight") for e in experts] for n in names)
        out["w_gate_up"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
        out["w_down"] = torch.stack(down)
    if "gate.e_score_correction_bias" in sd:
        out["score_bias"] = take("gate.e_score_correction_bias")
    if "shared_experts.gate_proj.weight" in sd:
        ffn = out["w_down"].shape[2]
        gate, up = take("shared_experts.gate_proj.weight"), take("shared_experts.up_proj.weight")
        down = take("shared_experts.down_proj.weight")
        if gate.shape[0] % ffn:
            checks.fail("state_dict", f"a shared MLP whose intermediate size is a multiple of I = {ffn}",
                        gate.shape[0])
        out["shared_gate_up"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate.split(ffn), up.split(ffn))])
        out["shared_down"] = torch.stack(down.split(ffn, dim=1))
    unknown = sorted(set(sd) - used)
    if unknown:
        checks.fail("state_dict", "only the keys of a Mixtral, Qwen3-MoE, OLMoE or DeepSeek-V3 MoE block",
                    f"also {[prefix + k for k in unknown][:8]}")
    return out
