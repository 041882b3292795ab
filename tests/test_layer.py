"""tilemoe.layer.OptimizedMoELayer: output and gradients against the float64 reference (with
rounding and capacity on and off, through the Triton backward under the interpreter), the aux loss,
expert usage, the bias balancing, its argument errors, and loading Hugging Face MoE blocks."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import tilemoe
from tilemoe import backends
from tilemoe.layer import OptimizedMoELayer, train_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_REASON = backends.unavailable_reason("triton", DEVICE, torch.float32, 32, 16)
PARAMS = ("router_weight", "w_gate_up", "w_down", "shared_gate_up", "shared_down")
# On a GPU machine every test here runs on the GPU (the Hugging Face ones on the CPU), so `pytest -m gpu` selects them.
pytestmark = [pytest.mark.usefixtures("poison_uninitialized_memory"), *([pytest.mark.gpu] if DEVICE.type == "cuda" else [])]


def make_layer(**options):
    torch.manual_seed(0)
    return OptimizedMoELayer(32, 16, 8, 2, **options).to(DEVICE)


def reference_layer(layer: OptimizedMoELayer, x: torch.Tensor):
    """The layer's math in float64 from its parameters: routing by tilemoe.route (and
    round_routing), experts and combine by tilemoe.reference_moe. Returns (y, aux, leaves)."""
    leaves = {n: getattr(layer, n).detach().double().requires_grad_() for n in PARAMS if getattr(layer, n) is not None}
    x64 = x.detach().double().requires_grad_()
    tokens = x64.reshape(-1, layer.hidden_dim)
    logits = tilemoe.router_logits(tokens, leaves["router_weight"])
    options = layer.router_options()
    if options["score_bias"] is not None:
        options["score_bias"] = options["score_bias"].double()
    routing = tilemoe.route(logits, layer.top_k, capacity_factor=layer.capacity_factor, **options)
    if layer.rounding:
        scores = logits.sigmoid() if layer.router == "sigmoid_bias" else logits.softmax(-1)
        routing = tilemoe.round_routing(scores, routing, layer.tile_size, layer.rounding,
                                        renormalize=layer.renormalize, routed_scaling=layer.routed_scaling).routing
    y = tilemoe.reference_moe(tokens, leaves["router_weight"], leaves["w_gate_up"], leaves["w_down"], routing.top_k,
                              shared_gate_up=leaves.get("shared_gate_up"), shared_down=leaves.get("shared_down"),
                              routing=routing)
    aux = layer.load_balance_weight * tilemoe.load_balancing_loss(logits, routing.topk_ids, layer.num_experts)
    return y.reshape(x.shape), aux, {"x": x64, **leaves}


@pytest.mark.parametrize("router", ["softmax", "sigmoid_bias"])
def test_output_and_aux_loss_match_the_reference(router):
    options = dict(num_groups=4, topk_groups=2, routed_scaling=2.5, num_shared_experts=2) if router == "sigmoid_bias" else {}
    layer = make_layer(router=router, backend="torch", **options)
    x = torch.randn(3, 7, 32, device=DEVICE)  # [B, S, H]
    y, aux = layer(x, return_aux_loss=True)
    ref_y, ref_aux, _ = reference_layer(layer, x)
    assert y.shape == x.shape and tilemoe.rel_error(y, ref_y) <= 1e-4
    assert abs(float(aux) - float(ref_aux)) <= 1e-6 and aux.requires_grad


@pytest.mark.skipif(TRITON_REASON is not None, reason=str(TRITON_REASON))
@pytest.mark.parametrize("rounding", [None, "nearest"])
@pytest.mark.parametrize("capacity_factor", [None, 0.6])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_triton_gradients_match_the_reference_autograd(rounding, capacity_factor, checkpointing):
    # The Triton backward (interpreted on a CPU), with the router's gradient flowing through the
    # routing weights and the aux loss, against float64 autograd of the same math.
    layer = make_layer(backend="triton", rounding=rounding, tile_size=8, capacity_factor=capacity_factor,
                       gradient_checkpointing=checkpointing, num_shared_experts=1)
    x = torch.randn(45, 32, device=DEVICE, requires_grad=True)
    dy = torch.randn(45, 32, device=DEVICE)
    with mock.patch.object(backends.BACKENDS["triton"], "ops", wraps=backends.BACKENDS["triton"].ops) as used:
        y, aux = layer(x, return_aux_loss=True)
        ((y * dy).sum() + aux).backward()
    assert used.called, "the Triton backend did not run"
    ref_y, ref_aux, leaves = reference_layer(layer, x)
    ((ref_y * dy.double()).sum() + ref_aux).backward()
    assert tilemoe.rel_error(y, ref_y) <= 1e-4
    assert tilemoe.rel_error(x.grad, leaves["x"].grad) <= 1e-4
    for name in PARAMS:
        assert tilemoe.rel_error(getattr(layer, name).grad, leaves[name].grad) <= 1e-4, name


@pytest.mark.skipif(DEVICE.type != "cuda" or TRITON_REASON is not None, reason="the router's logits kernel runs on a CUDA GPU")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_at_prefill_size_routes_with_the_logits_kernel(checkpointing):
    """From router.MIN_TOKENS tokens the layer's training path (aux loss, optionally the router
    checkpointed) takes the Triton logits kernel and the Triton metadata; gradients in bf16
    against float64 autograd."""
    from tilemoe.triton import metadata, router

    torch.manual_seed(0)
    layer = OptimizedMoELayer(256, 128, 16, 2, backend="triton", gradient_checkpointing=checkpointing, device=DEVICE,
                              dtype=torch.bfloat16)
    assert layer.router_weight.dtype == torch.float32
    x = torch.randn(router.MIN_TOKENS, 256, device=DEVICE).bfloat16().requires_grad_()
    dy = torch.randn_like(x)
    with mock.patch.object(router, "logits", wraps=router.logits) as kernel, \
            mock.patch.object(metadata, "sort_by_expert", wraps=metadata.sort_by_expert) as sort:
        y, aux = layer(x, return_aux_loss=True)
        ((y.float() * dy.float()).sum() + aux).backward()
    assert kernel.call_count == 1 + checkpointing and sort.call_count == 1
    ref_y, ref_aux, leaves = reference_layer(layer, x)
    ((ref_y * dy.double()).sum() + ref_aux).backward()
    assert tilemoe.rel_error(y, ref_y) <= tilemoe.TOLERANCE[torch.bfloat16]
    assert tilemoe.rel_error(x.grad, leaves["x"].grad) <= tilemoe.TOLERANCE[torch.bfloat16]
    for name in ("router_weight", "w_gate_up", "w_down"):
        assert tilemoe.rel_error(getattr(layer, name).grad, leaves[name].grad) <= tilemoe.TOLERANCE[torch.bfloat16], name


def test_expert_usage_counts_every_kept_slot_until_reset():
    layer = make_layer(backend="torch", capacity_factor=0.5)
    assert layer.expert_usage.counts == [0] * 8 and layer.expert_usage.gini == 0.0
    x = torch.randn(40, 32, device=DEVICE)
    with torch.no_grad():
        layer(x)
        layer(x)
    routing = tilemoe.route(tilemoe.router_logits(x, layer.router_weight), 2, capacity_factor=0.5)
    usage = layer.expert_usage
    assert usage.counts == (2 * routing.counts).tolist() and sum(usage.counts) < 2 * 80  # drops not counted
    assert abs(sum(usage.fractions) - 1) < 1e-9 and usage.gini == tilemoe.routing.gini(usage.counts)
    layer.reset_expert_usage()
    assert layer.expert_usage.counts == [0] * 8


def test_sigmoid_bias_takes_a_balancing_step_only_in_training():
    layer = make_layer(backend="torch", router="sigmoid_bias", bias_update_rate=0.01)
    with torch.no_grad():
        layer.router_weight[3] += 0.5  # expert 3 wins most tokens
    x = torch.randn(64, 32, device=DEVICE)
    layer.eval()
    layer(x)
    assert bool((layer.score_bias == 0).all()), "eval mode must not move the bias"
    layer.train()
    counts = tilemoe.route(tilemoe.router_logits(x, layer.router_weight), 2, scoring="sigmoid").counts
    layer(x)
    expected = 0.01 * torch.sign(counts.double().mean() - counts.double())
    assert torch.allclose(layer.score_bias.double(), expected) and float(layer.score_bias[3]) < 0


def test_use_io_overlap_false_turns_tma_off_in_the_triton_kernels():
    from tilemoe.triton import configs

    assert configs.tma_on()
    with configs.tma_enabled(False):
        assert not configs.tma_on()
    assert configs.tma_on()
    layer = make_layer(use_io_overlap=False, backend="torch")
    seen = []
    with mock.patch("tilemoe.layer.moe_forward", side_effect=lambda *a, **k: seen.append(configs.tma_on()) or a[0]):
        layer(torch.randn(4, 32, device=DEVICE))
    assert seen == [False] and configs.tma_on()


@pytest.mark.parametrize("change, message", [
    (dict(top_k=9), "top_k: expected an int <= 8, got 9"),
    (dict(rounding="sideways"), "rounding: expected one of"),
    (dict(router="argmax"), "router: expected one of"),
    (dict(backend="fast"), "backend: expected one of"),
    (dict(capacity_factor=0.0), "capacity_factor: expected a finite number > 0, got 0.0"),
    (dict(load_balance_weight=-1), "load_balance_weight: expected a number >= 0, got -1"),
])
def test_bad_arguments_name_themselves(change, message):
    args = dict(hidden_dim=32, ffn_dim=16, num_experts=8, top_k=2) | change
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        OptimizedMoELayer(**args)


def test_x_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match=r"x: expected shape \[..., H\] with H = 32, got \[4, 31\]"):
        make_layer()(torch.randn(4, 31, device=DEVICE))


def test_train_step_backpropagates_dy_and_the_aux_loss():
    # train_step (what lesson 6 times) is the backward of sum(y * dy) + aux: dy arrives as y's gradient.
    layer = make_layer(backend="torch")
    x = torch.randn(5, 32, device=DEVICE, requires_grad=True)
    dy = torch.randn(5, 32, device=DEVICE)
    train_step(layer, x, dy)
    ref_y, ref_aux, leaves = reference_layer(layer, x)
    expected = torch.autograd.grad((ref_y * dy.double()).sum() + ref_aux, [leaves["x"], leaves["router_weight"]])
    assert tilemoe.rel_error(x.grad, expected[0]) <= 1e-4
    assert tilemoe.rel_error(layer.router_weight.grad, expected[1]) <= 1e-4
    with pytest.raises(ValueError, match=r"dy: expected shape \[5, 32\] \(the shape of x and of y\), got \[5, 31\]"):
        train_step(layer, x, dy[:, :31])


# -- Hugging Face blocks --------------------------------------------------------------------------

transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")

HF_BLOCKS = {
    "mixtral": ("MixtralConfig", "mixtral.modeling_mixtral", "MixtralSparseMoeBlock",
                dict(num_local_experts=6, intermediate_size=16)),
    "qwen3_moe": ("Qwen3MoeConfig", "qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock",
                  dict(num_experts=6, moe_intermediate_size=16, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "olmoe.modeling_olmoe", "OlmoeSparseMoeBlock",
              dict(num_experts=6, intermediate_size=16, norm_topk_prob=False)),
    "deepseek_v3": ("DeepseekV3Config", "deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE",
                    dict(n_routed_experts=8, moe_intermediate_size=16, n_group=4, topk_group=2, n_shared_experts=2,
                         routed_scaling_factor=2.5, norm_topk_prob=True)),
}


def hf_block(model_type: str):
    """A tiny random block of transformers' own implementation, in fp32 (nothing downloaded)."""
    import importlib

    config_name, module, block_name, sizes = HF_BLOCKS[model_type]
    config = getattr(transformers, config_name)(hidden_size=24, num_experts_per_tok=2, **sizes)
    torch.manual_seed(1)
    block = getattr(importlib.import_module(f"transformers.models.{module}"), block_name)(config).eval()
    with torch.no_grad():
        for p in block.parameters():  # transformers leaves some of them uninitialized
            p.normal_(0.0, 0.2)
        for name, b in block.named_buffers():
            if "bias" in name:
                b.normal_(0.0, 0.1)
    return config, block


def hf_output(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("model_type", list(HF_BLOCKS))
def test_a_hugging_face_block_loads_and_reproduces_its_output(model_type):
    config, block = hf_block(model_type)
    layer = OptimizedMoELayer.from_hf(config, block.state_dict(), backend="torch")
    x = torch.randn(2, 9, 24)
    with torch.no_grad():
        assert tilemoe.rel_error(layer(x), hf_output(block, x)) <= 1e-5


def per_expert_checkpoint(state_dict: dict, names: tuple[str, str, str]) -> dict:
    """The same weights under a checkpoint file's naming: one Linear per expert and projection."""
    out = {k: v for k, v in state_dict.items() if not k.startswith("experts.")}
    gate_up, down = state_dict["experts.gate_up_proj"], state_dict["experts.down_proj"]
    for e in range(gate_up.shape[0]):
        gate, up = gate_up[e].chunk(2)
        out |= {f"experts.{e}.{names[0]}.weight": gate, f"experts.{e}.{names[1]}.weight": up,
                f"experts.{e}.{names[2]}.weight": down[e]}
    return out


@pytest.mark.parametrize("names", [("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")])
def test_checkpoint_naming_per_expert_loads_the_same_weights(names):
    config, block = hf_block("mixtral")
    fused = block.state_dict()
    if "experts.gate_up_proj" not in fused:
        pytest.skip("this transformers stores experts per expert already (the other naming)")
    prefixed = {f"model.layers.0.block_sparse_moe.{k}": v for k, v in per_expert_checkpoint(fused, names).items()}
    a = OptimizedMoELayer.from_hf(config, fused)
    b = OptimizedMoELayer.from_hf(config, prefixed, prefix="model.layers.0.block_sparse_moe.")
    for name in ("router_weight", "w_gate_up", "w_down"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_bad_state_dicts_are_refused_by_name():
    config, block = hf_block("qwen3_moe")
    sd = block.state_dict()
    missing = {k: v for k, v in sd.items() if k != "gate.weight"}
    with pytest.raises(KeyError, match="expected the key 'gate.weight'"):
        OptimizedMoELayer.from_hf(config, missing)
    with pytest.raises(ValueError, match=r"also \['experts.lora_a'\]"):
        OptimizedMoELayer.from_hf(config, sd | {"experts.lora_a": torch.zeros(1)})
    layer = OptimizedMoELayer(24, 8, 6, 2)
    with pytest.raises(ValueError, match=r"state_dict \(w_gate_up\): expected shape \[6, 16, 24\], got \[6, 32, 24\]"):
        layer.load_hf_state_dict(sd)
    with pytest.raises(ValueError, match="config: expected the config of one of"):
        OptimizedMoELayer.from_hf(transformers.LlamaConfig(), sd)


def test_rounding_applies_in_training_mode_only():
    layer = make_layer(backend="torch", rounding="nearest", tile_size=8)
    x = torch.randn(45, 32, device=DEVICE)
    trained, _, _ = reference_layer(layer, x)
    assert tilemoe.rel_error(layer(x), trained) <= 1e-4
    layer.eval()
    plain = tilemoe.reference_moe(x, layer.router_weight, layer.w_gate_up, layer.w_down, 2)
    with torch.no_grad():
        assert tilemoe.rel_error(layer(x), plain) <= 1e-4 and tilemoe.rel_error(plain, trained) > 1e-2
