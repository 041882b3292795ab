"""Backend "sonicmoe" and examples/05_sonicmoe, on the CPU (SonicMoE itself needs a Hopper/Blackwell GPU
and Python >= 3.12).

What runs here: the weight-layout conversion; the backend's reasons when it is unavailable; the
conversion cache; the adapter (routing flattening, dropped slots, both layouts, the gradient mapped
back to tilemoe's layout) against reference_moe, with SonicMoE's function replaced by a torch
stand-in written from its documented contract (sonicmoe/functional/__init__.py,
moe_general_routing_inputs) that also asserts how it is called; and the lesson script, both its
fallback (as a user without SonicMoE sees it) and its SonicMoE walk-through on a stand-in package;
--table on a synthetic record, and the lesson README's generated tables against the recorded H200
runs they name. The GPU test at the end runs the real kernels (pytest -m gpu, with sonic-moe installed; like the
lesson, it honours TILEMOE_EXTRA_SITE).
"""

from __future__ import annotations

import contextlib
import enum
import gc
import importlib.util
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import torch
import torch.nn.functional as F
from torch import nn

import tilemoe
from moe_cases import RAGGED, forced_routing, make_weights
from tilemoe import backends
from tilemoe.backends import sonic
from tilemoe.reference import swiglu_expert

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "05_sonicmoe" / "sonicmoe_example.py"
CPU = torch.device("cpu")
BF16_TOL = tilemoe.TOLERANCE[torch.bfloat16]


# -- The layout conversion --------------------------------------------------------------------------

def test_interleaving_matches_a_hand_built_one():
    num_experts, ffn, hidden = 2, 3, 4
    w = torch.arange(num_experts * 2 * ffn * hidden, dtype=torch.float32).view(num_experts, 2 * ffn, hidden)
    expected = torch.empty_like(w)
    for e in range(num_experts):
        for i in range(ffn):
            expected[e, 2 * i] = w[e, i]             # gate row i
            expected[e, 2 * i + 1] = w[e, ffn + i]   # up row i
    out = sonic.to_sonic_gate_up(w)
    assert torch.equal(out, expected) and out.is_contiguous()
    assert torch.equal(sonic.from_sonic_gate_up(expected), w)
    assert torch.equal(sonic.to_sonic_gate_up(w[0]), expected[0])  # one expert [2I, H] works too


@pytest.mark.parametrize("shape", [(1, 2, 1), (8, 64, 32), (3, 10, 7)])
def test_conversion_round_trips(shape):
    w = torch.randn(shape, dtype=torch.float64)
    assert torch.equal(sonic.from_sonic_gate_up(sonic.to_sonic_gate_up(w)), w)
    assert torch.equal(sonic.to_sonic_gate_up(sonic.from_sonic_gate_up(w)), w)
    strided = torch.randn(shape[0], shape[2], shape[1], dtype=torch.float64).transpose(1, 2)  # not contiguous
    assert torch.equal(sonic.from_sonic_gate_up(sonic.to_sonic_gate_up(strided)), strided)


def test_conversion_rejects_an_odd_row_count():
    with pytest.raises(ValueError, match=r"w_gate_up: expected shape \[\.\.\., 2I, H\]"):
        sonic.to_sonic_gate_up(torch.zeros(2, 5, 4))


def test_swiglu_with_interleaved_weights_the_sonic_way_equals_ours():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 16, generator=g, dtype=torch.float64)
    w_gate_up = torch.randn(2 * 12, 16, generator=g, dtype=torch.float64)
    w_down = torch.randn(16, 12, generator=g, dtype=torch.float64)
    h = x @ sonic.to_sonic_gate_up(w_gate_up).t()
    gate, up = h[:, 0::2], h[:, 1::2]  # SonicMoE: even columns gate, odd columns up
    theirs = (F.silu(gate) * up) @ w_down.t()
    assert torch.allclose(theirs, swiglu_expert(x, w_gate_up, w_down), rtol=1e-12, atol=1e-12)


# -- Availability --------------------------------------------------------------------------------------

def test_unavailable_here_with_a_useful_reason():
    reason = sonic.unavailable_reason(CPU, torch.bfloat16, 64, 32)
    assert reason
    if sys.version_info < (3, 12):
        assert "Python >= 3.12" in reason and "pip install sonic-moe" in reason
    else:
        assert "cpu" in reason
    gpu_reason = sonic.unavailable_reason(torch.device("cuda"), torch.bfloat16, 64, 32)
    if not torch.cuda.is_available():
        assert gpu_reason and any(s in gpu_reason for s in ("Python >= 3.12", "no CUDA GPU", "not importable"))
    if sonic_gpu_reason() is not None:  # this machine lacks something, and says what
        assert sonic.missing()
        assert all("sonic" in r.lower() or "python" in r.lower() for r in sonic.missing())


def test_auto_never_picks_it_here_and_asking_for_it_says_why():
    for dtype in (torch.float32, torch.bfloat16):
        assert sonic.NAME not in tilemoe.available_backends(CPU, dtype, 64, 32)
        assert backends.resolve("auto", CPU, dtype, 64, 32).NAME != sonic.NAME
    w = make_weights(64, 32, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"backend: expected a backend that runs torch.bfloat16 on cpu, got 'sonicmoe'"):
        tilemoe.moe_forward(torch.randn(5, 64).bfloat16(), **w, top_k=2, backend="sonicmoe")


def test_it_comes_after_grouped_mm_on_cuda():
    order = backends.AUTO_ORDER["cuda"]
    assert order.index("grouped_mm") < order.index(sonic.NAME)


def test_importing_tilemoe_does_not_import_sonicmoe():
    code = "import sys, tilemoe; assert 'sonicmoe' not in sys.modules; print(tilemoe.BACKENDS['sonicmoe'].NAME)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "sonicmoe", out.stderr


@pytest.fixture
def fresh_import(monkeypatch):
    """The import is attempted anew (as under Python >= 3.12) and forgotten afterwards."""
    monkeypatch.setattr(sonic, "_api_cache", None)
    monkeypatch.setattr(sonic, "_import_failure", None)
    monkeypatch.setattr(sonic, "_python_reason", lambda: None)


def test_a_missing_package_is_a_reason_with_the_install_hint(fresh_import, monkeypatch):
    monkeypatch.setitem(sys.modules, "sonicmoe", None)  # import sonicmoe -> ImportError
    reason = sonic.import_reason()
    assert "sonicmoe is not importable (ModuleNotFoundError" in reason and "pip install sonic-moe" in reason
    with pytest.raises(RuntimeError, match="backend 'sonicmoe' is unavailable: sonicmoe is not importable"):
        sonic.experts(torch.zeros(1, 8).bfloat16(), None, None, None)


def test_a_broken_install_is_a_reason_not_a_crash(fresh_import, monkeypatch):
    pkg, broken = types.ModuleType("sonicmoe"), types.ModuleType("sonicmoe.functional")
    pkg.__path__ = []

    def fail(name):
        raise RuntimeError("libcuda.so.1: cannot open shared object file\nsecond line")

    broken.__getattr__ = fail
    enums = types.ModuleType("sonicmoe.enums")
    enums.ActivationType = None
    for name, module in (("sonicmoe", pkg), ("sonicmoe.enums", enums), ("sonicmoe.functional", broken)):
        monkeypatch.setitem(sys.modules, name, module)
    reason = sonic.import_reason()
    assert reason.startswith("sonicmoe is not importable (RuntimeError: libcuda.so.1: cannot open shared object file)")


# -- A stand-in for SonicMoE, from its documented contract --------------------------------------------

class ActivationType(enum.Enum):
    SWIGLU = "swiglu"


class KernelBackendMoE(enum.Enum):
    sonicmoe = "sonicmoe"


CALLS = []


def fake_general_routing(x, router_scores, token_indices, expert_indices, w1, b1, w2, b2, num_experts, stream_id,
                         activation_type, is_inference_mode_enabled=False, concat_layout=False):
    """moe_general_routing_inputs in torch: o[t] = sum over entries i of token t of
    router_scores[i] * expert_{expert_indices[i]}(x[t]); w1 (2I, H, E), w2 (H, I, E), both the
    permute(1, 2, 0) of contiguous [E, ., .] tensors; gate/up interleaved unless concat_layout."""
    num_tokens, hidden = x.shape
    two_i, h1, e1 = w1.shape
    # The contract (as SonicMoE's source states it) and how the adapter must call it:
    assert activation_type is ActivationType.SWIGLU and b1 is None and b2 is None
    assert x.is_contiguous() and x.dtype == torch.bfloat16 and w1.dtype == w2.dtype == torch.bfloat16
    assert (h1, e1) == (hidden, num_experts) and tuple(w2.shape) == (hidden, two_i // 2, num_experts)
    assert w1.permute(2, 0, 1).is_contiguous() and w2.permute(2, 0, 1).is_contiguous()
    assert token_indices.dtype == expert_indices.dtype == torch.int32 and router_scores.dtype == torch.float32
    assert token_indices.shape == expert_indices.shape == router_scores.shape and token_indices.dim() == 1
    assert bool((token_indices[1:] >= token_indices[:-1]).all()), "token_indices must be sorted"
    assert bool(((expert_indices >= 0) & (expert_indices < num_experts)).all())
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, router_scores, w1, w2))
    assert is_inference_mode_enabled == (not needs_grad)
    CALLS.append({"concat": concat_layout, "inference": is_inference_mode_enabled, "pairs": token_indices.numel()})

    y = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    for e in range(num_experts):
        pos = expert_indices == e
        rows = token_indices[pos].long()
        if rows.numel() == 0:
            continue
        h = x[rows].float() @ w1[:, :, e].float().t()
        gate, up = h.chunk(2, dim=-1) if concat_layout else (h[:, 0::2], h[:, 1::2])
        out = (F.silu(gate) * up) @ w2[:, :, e].float().t()
        y = y.index_add(0, rows, out * router_scores[pos, None])
    return y.to(x.dtype), torch.bincount(expert_indices.long(), minlength=num_experts).int()


class TC_Softmax_Topk_Router_Function:  # noqa: N801 - SonicMoE's name
    """SonicMoE's softmax-over-top-k router: (scores fp32 [T, K], ids int32 [T, K])."""

    @staticmethod
    def apply(logits, num_experts, top_k, is_softmax_over_topk, norm_topk_probs):
        values, ids = logits.topk(top_k, dim=-1)
        return values.float().softmax(dim=-1), ids.int()


class FakeMoE(nn.Module):
    """sonicmoe.MoE's parameters and forward: router.weight [E, H], c_fc.weight [E, 2I, H] (interleaved),
    c_proj.weight [E, H, I]; routing = softmax over the top-k of the (input-dtype) router logits."""

    def __init__(self, num_experts, top_k, hidden, ffn, activation, add_bias, std):
        super().__init__()
        assert activation is ActivationType.SWIGLU and not add_bias
        self.num_experts, self.top_k, self.hidden_size = num_experts, top_k, hidden
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.c_fc, self.c_proj = nn.Module(), nn.Module()
        self.c_fc.weight = nn.Parameter(torch.randn(num_experts, 2 * ffn, hidden) * std)
        self.c_proj.weight = nn.Parameter(torch.randn(num_experts, hidden, ffn) * std)

    def forward(self, hidden_states, kernel_backend_moe=KernelBackendMoE.sonicmoe, is_inference_mode=False):
        x = hidden_states.view(-1, self.hidden_size)
        logits = F.linear(x, self.router.weight)
        scores, ids = TC_Softmax_Topk_Router_Function.apply(logits, self.num_experts, self.top_k, True, False)
        tokens = torch.arange(x.shape[0], dtype=torch.int32, device=x.device).repeat_interleave(self.top_k)
        y, _ = fake_general_routing(x, scores.reshape(-1), tokens, ids.reshape(-1), self.c_fc.weight.permute(1, 2, 0),
                                    None, self.c_proj.weight.permute(1, 2, 0), None, self.num_experts, None,
                                    ActivationType.SWIGLU, is_inference_mode or not self.training)
        return y.view(hidden_states.shape), (None if is_inference_mode else logits.sum() * 0)


def fake_sonicmoe_modules() -> dict:
    pkg = types.ModuleType("sonicmoe")
    pkg.__path__ = []
    pkg.__version__ = "0.0-stand-in"
    enums = types.ModuleType("sonicmoe.enums")
    enums.ActivationType, enums.KernelBackendMoE = ActivationType, KernelBackendMoE
    functional = types.ModuleType("sonicmoe.functional")
    functional.moe_general_routing_inputs = fake_general_routing
    functional.TC_Softmax_Topk_Router_Function = TC_Softmax_Topk_Router_Function
    pkg.MoE, pkg.KernelBackendMoE, pkg.enums, pkg.functional = FakeMoE, KernelBackendMoE, enums, functional
    pkg.moe_general_routing_inputs = fake_general_routing
    return {"sonicmoe": pkg, "sonicmoe.enums": enums, "sonicmoe.functional": functional}


@pytest.fixture
def stand_in(fresh_import, monkeypatch):
    """sonicmoe imports (the stand-in) and the backend accepts this CPU; the cache starts empty."""
    for name, module in fake_sonicmoe_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(sonic, "_gpu_reason", lambda device: None)
    monkeypatch.setattr(sonic, "unavailable_reason", lambda *args: None)
    sonic.clear_cache()
    CALLS.clear()
    yield
    sonic.clear_cache()


def test_the_stand_in_is_imported_through_the_real_import(stand_in):
    assert sonic.import_reason() is None and sonic._api().version == "0.0-stand-in"


# -- The adapter against the reference -----------------------------------------------------------------

def leaves_of(w: dict) -> dict:
    return {k: v.detach().clone().requires_grad_() for k, v in w.items()}


@pytest.mark.parametrize("layout", sonic.LAYOUTS)
@pytest.mark.parametrize("case", list(RAGGED))
def test_adapter_matches_reference_forward_and_gradients(stand_in, case, layout):
    num_tokens, top_k, num_experts, ids = RAGGED[case]
    w = make_weights(32, 24, num_experts, dtype=torch.bfloat16, seed=3)
    x = torch.randn(num_tokens, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    routing = forced_routing(ids(), num_experts, seed=2)
    weights = routing.topk_weights.clone().requires_grad_()
    routing = type(routing)(**{**routing.__dict__, "topk_weights": weights})
    ours, xl = leaves_of(w), x.clone().requires_grad_()
    y = sonic.experts(xl, routing, ours["w_gate_up"], ours["w_down"], layout=layout)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).bfloat16()
    y.backward(dy)

    ref_w, x64 = {k: v.double().requires_grad_() for k, v in w.items()}, x.double().requires_grad_()
    ref_weights = routing.topk_weights.detach().double().requires_grad_()
    ref_routing = type(routing)(**{**routing.__dict__, "topk_weights": ref_weights})
    ref = tilemoe.reference_moe(x64, ref_w["router_weight"], ref_w["w_gate_up"], ref_w["w_down"], top_k, routing=ref_routing)
    ref.backward(dy.double())
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    for out, expected in ((y, ref), (xl.grad, x64.grad), (weights.grad, ref_weights.grad),
                          (ours["w_gate_up"].grad, ref_w["w_gate_up"].grad), (ours["w_down"].grad, ref_w["w_down"].grad)):
        assert tilemoe.rel_error(out, expected) <= BF16_TOL
    assert CALLS[-1]["concat"] == (layout == "concat") and not CALLS[-1]["inference"]


@pytest.mark.parametrize("layout", sonic.LAYOUTS)
def test_dropped_slots_are_left_out_and_any_router_works(stand_in, layout):
    # DeepSeek-V3-style sigmoid routing with groups and scaling, and a capacity that drops slots.
    w = make_weights(32, 16, 16, dtype=torch.bfloat16, seed=5)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(6)).bfloat16()
    opts = dict(scoring="sigmoid", num_groups=4, topk_groups=2, routed_scaling=2.5, capacity_factor=1.0)
    with sonic.weight_layout(layout):
        y = tilemoe.moe_forward(x, **w, top_k=4, backend="sonicmoe", **opts)
    ref = tilemoe.reference_moe(x.double(), **{k: v.double() for k, v in w.items()}, top_k=4, **opts)
    assert tilemoe.rel_error(y, ref) <= BF16_TOL
    routing = tilemoe.route(tilemoe.router_logits(x, w["router_weight"]), 4, **opts)
    assert routing.dropped.any() and CALLS[-1]["pairs"] == int((~routing.dropped).sum())
    assert CALLS[-1]["inference"]  # nothing needed a gradient: SonicMoE may skip its backward state


def test_every_slot_dropped_gives_zeros(stand_in):
    w = make_weights(16, 8, 4, dtype=torch.bfloat16)
    routing = forced_routing(torch.full((3, 2), -1), 4)
    routing = type(routing)(**{**routing.__dict__, "has_empty_slots": True})
    y = sonic.experts(torch.randn(3, 16).bfloat16(), routing, w["w_gate_up"], w["w_down"])
    assert torch.equal(y, torch.zeros(3, 16, dtype=torch.bfloat16)) and not CALLS


def test_bad_inputs_are_named(stand_in):
    w = make_weights(16, 8, 4, dtype=torch.bfloat16)
    routing = forced_routing(torch.zeros(3, 1, dtype=torch.long), 4)
    with pytest.raises(TypeError, match=r"x: expected dtype torch.bfloat16"):
        sonic.experts(torch.randn(3, 16), routing, w["w_gate_up"], w["w_down"])
    with pytest.raises(ValueError, match=r"routing: expected a routing of T = 2 tokens"):
        sonic.experts(torch.randn(2, 16).bfloat16(), routing, w["w_gate_up"], w["w_down"])
    with pytest.raises(ValueError, match=r"layout: expected one of 'interleaved', 'concat'"):
        sonic.experts(torch.randn(3, 16).bfloat16(), routing, w["w_gate_up"], w["w_down"], layout="split")


# -- The conversion cache ------------------------------------------------------------------------------

@pytest.fixture
def counted(monkeypatch):
    """to_sonic_gate_up replaced by a counting wrapper (the cache looks it up at call time)."""
    seen = []
    real = sonic.to_sonic_gate_up

    def counting(w):
        seen.append(w.shape)
        return real(w)

    monkeypatch.setattr(sonic, "to_sonic_gate_up", counting)
    sonic.clear_cache()
    yield seen
    sonic.clear_cache()


def test_cache_converts_once_and_again_after_an_in_place_update(counted):
    w = torch.randn(4, 16, 8)
    first = sonic.sonic_gate_up(w)
    assert sonic.sonic_gate_up(w) is first and sonic.sonic_gate_up(w.detach()) is first  # an alias hits
    assert len(counted) == 1 and sonic.cache_info() == {"entries": 1, "conversions": 1, "hits": 2}
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step: bumps w._version
    second = sonic.sonic_gate_up(w)
    assert len(counted) == 2 and torch.equal(sonic.from_sonic_gate_up(second), w)  # the updated values
    assert sonic.sonic_gate_up(w.clone()) is not second and len(counted) == 3  # other memory, same values
    assert sonic.cache_info()["entries"] <= 2  # the update replaced its entry; the clone died with its memory


def test_cache_forgets_freed_weights(counted):
    w = torch.randn(2, 8, 4)
    sonic.sonic_gate_up(w)
    assert sonic.cache_info()["entries"] == 1
    del w
    gc.collect()
    assert sonic.cache_info()["entries"] == 0


def test_adapter_converts_once_across_calls(stand_in, counted):
    w = leaves_of(make_weights(16, 8, 4, dtype=torch.bfloat16))
    x = torch.randn(6, 16).bfloat16()
    for _ in range(3):
        tilemoe.moe_forward(x, **w, top_k=2, backend="sonicmoe").sum().backward()
    assert len(counted) == 1
    with torch.no_grad():
        w["w_gate_up"].mul_(0.5)
    y = tilemoe.moe_forward(x, **w, top_k=2, backend="sonicmoe")
    assert len(counted) == 2
    ref = tilemoe.reference_moe(x.double(), **{k: v.detach().double() for k, v in w.items()}, top_k=2)
    assert tilemoe.rel_error(y, ref) <= BF16_TOL  # the updated weights, not the stale copy
    with sonic.weight_layout("concat"):
        tilemoe.moe_forward(x, **w, top_k=2, backend="sonicmoe")
    assert len(counted) == 2  # the concat layout reads w_gate_up in place


# -- SonicMoE's own module, as the benchmarks time it ---------------------------------------------------

def import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_bench_variants():
    return import_file(ROOT / "benchmarks" / "bench_moe_variants.py", "bench_moe_variants")


def test_module_holds_the_weights_in_its_layout_and_replays_against_the_reference(stand_in):
    w = make_weights(32, 24, 6, dtype=torch.bfloat16, seed=3)
    module = sonic.module_with_weights(w["router_weight"], w["w_gate_up"], w["w_down"], top_k=2)
    assert torch.equal(module.c_fc.weight, sonic.to_sonic_gate_up(w["w_gate_up"]))
    assert torch.equal(module.c_proj.weight, w["w_down"])
    assert torch.equal(module.router.weight, w["router_weight"].bfloat16())
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    routing, how, ties = sonic.module_routing(module, x)
    ids = routing.topk_ids
    assert how == "SonicMoE's top-k kernel on its bf16 logits" and ids.shape == (40, 2)
    assert isinstance(ties, int)
    y, aux_loss = sonic.module_forward(module, x)
    assert aux_loss is None
    assert CALLS[-1]["inference"] and y.dtype == torch.bfloat16 and y.shape == x.shape
    logits = x.double() @ module.router.weight.double().t()
    assert torch.equal(ids.sort(dim=-1).values, logits.topk(2, dim=-1).indices.sort(dim=-1).values)
    assert torch.allclose(routing.topk_weights.double(), logits.gather(1, ids).softmax(dim=-1), atol=1e-6)
    ref = tilemoe.reference_moe(x.double(), **{k: v.double() for k, v in w.items()}, top_k=2, routing=routing)
    assert tilemoe.rel_error(y, ref) <= BF16_TOL
    y_train, aux_loss = sonic.module_forward(module, x.clone().requires_grad_(), train=True)
    assert aux_loss is not None and y_train.requires_grad
    assert not CALLS[-1]["inference"] and torch.equal(y_train.detach(), y)


def test_a_choice_of_experts_that_is_no_top_k_is_refused(stand_in, monkeypatch):
    w = make_weights(32, 24, 6, dtype=torch.bfloat16, seed=3)
    module = sonic.module_with_weights(w["router_weight"], w["w_gate_up"], w["w_down"], top_k=2)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    real = TC_Softmax_Topk_Router_Function.apply
    monkeypatch.setattr(TC_Softmax_Topk_Router_Function, "apply",
                        lambda *args: (lambda scores, ids: (scores, (ids + 1) % 6))(*real(*args)))
    with pytest.raises(RuntimeError, match="is not a top-2 of its logits"):
        sonic.module_routing(module, x)


def test_module_weights_are_checked_and_named(stand_in):
    w = make_weights(32, 24, 6, dtype=torch.bfloat16, seed=3)
    with pytest.raises(ValueError, match="w_down"):
        sonic.module_with_weights(w["router_weight"], w["w_gate_up"], w["w_down"][:, :, :-1], top_k=2)
    with pytest.raises(ValueError, match="router_weight"):
        sonic.module_with_weights(w["router_weight"][:-1], w["w_gate_up"], w["w_down"], top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        sonic.module_with_weights(w["router_weight"], w["w_gate_up"], w["w_down"], top_k=7)


def test_benchmark_checks_the_module_on_its_own_routing_and_can_fail(stand_in, monkeypatch):
    bench_variants = load_bench_variants()
    case = bench_variants.make_case(tilemoe.get_preset("small"), 24, CPU, torch.bfloat16, seed=0)
    row = bench_variants.measure(case, "sonicmoe module", CPU, BF16_TOL, quick=False, gbps=1.0)
    assert row["check"] == "PASS" and row["ms"] > 0 and row["module routing"] == "SonicMoE's top-k kernel on its bf16 logits"
    # A reference replaying other experts than the module ran must fail the check.
    real_choice = sonic.module_choice
    monkeypatch.setattr(sonic, "module_choice", lambda module, x: (lambda ids, how, ties: (
        (ids + 1) % module.num_experts, how, ties))(*real_choice(module, x)))
    assert bench_variants.measure(case, "sonicmoe module", CPU, BF16_TOL, quick=False, gbps=1.0)["check"] == "FAIL"


def test_lesson_6_times_the_module_with_the_layers_weights_and_its_ratio_takes_the_faster_row(stand_in, monkeypatch):
    lesson6 = import_file(ROOT / "examples" / "06_full_moe" / "benchmark.py", "full_moe_benchmark")
    torch.manual_seed(0)
    layer = tilemoe.OptimizedMoELayer(32, 24, 6, 2, dtype=torch.bfloat16)
    x = torch.randn(20, 32).bfloat16().requires_grad_()
    dy = torch.randn(20, 32).bfloat16()
    row = lesson6.measure_module(layer, x, dy, CPU)
    assert row["rel_error"] <= BF16_TOL and row["forward_ms"] > 0 and row["fwd_bwd_ms"] > 0
    assert x.grad is not None and x.grad.abs().sum() > 0  # the step reached x
    rows = [{"backend": "grouped_mm", "forward_ms": 4.0, "fwd_bwd_ms": 8.0, "train_peak_bytes": None},
            {"backend": "sonicmoe", "forward_ms": 2.0, "fwd_bwd_ms": 5.0, "train_peak_bytes": None},
            {"backend": "sonicmoe module", "forward_ms": 2.5, "fwd_bwd_ms": 4.0, "train_peak_bytes": None}]
    lesson6.add_ratios(rows)
    assert rows[0]["forward_vs_sonicmoe"] == 0.5 and rows[0]["fwd_bwd_vs_sonicmoe"] == 0.5
    assert lesson6.module_unavailable(tilemoe.OptimizedMoELayer(32, 24, 6, 2, num_shared_experts=1)) is not None
    # A reference replaying other experts than the module ran is far off.
    real_choice = sonic.module_choice
    monkeypatch.setattr(sonic, "module_choice", lambda module, x: (lambda ids, how, ties: (
        (ids + 1) % module.num_experts, how, ties))(*real_choice(module, x)))
    assert lesson6.measure_module(layer, x.detach().requires_grad_(), dy, CPU)["rel_error"] > BF16_TOL


# -- The lesson script ---------------------------------------------------------------------------------

def run_script(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          encoding="utf-8", timeout=180, env=env)


def test_script_help():
    out = run_script("--help")
    assert out.returncode == 0, out.stderr
    for option in ("--preset", "--tokens", "--seed", "--record", "TILEMOE_EXTRA_SITE"):
        assert option in out.stdout


def test_script_fallback_explains_and_runs_tilemoe():
    # As a user without a suitable GPU sees it, whatever this machine has: no GPU visible, no extra site.
    # Without TRITON_INTERPRET too: the interpreted Triton backend would take a minute here, and its
    # kernels are checked in test_triton*.py.
    env = {k: v for k, v in os.environ.items() if k not in ("TILEMOE_EXTRA_SITE", "TRITON_INTERPRET")}
    out = run_script("--tokens", "96", env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "SonicMoE cannot run here:" in text and "pip install sonic-moe" in text and "Python >= 3.12" in text
    assert "(a) Correctness" in text and "(b) Time" in text
    checks = [line for line in text.splitlines() if line.startswith("tilemoe ") and line.rstrip().endswith(("PASS", "FAIL"))]
    assert len(checks) >= 2 and all(line.rstrip().endswith("PASS") for line in checks)


def load_script(monkeypatch, extra_site=None):
    if extra_site is not None:
        monkeypatch.setenv("TILEMOE_EXTRA_SITE", str(extra_site))
    monkeypatch.setattr(sys, "path", list(sys.path))  # restored afterwards
    spec = importlib.util.spec_from_file_location("sonicmoe_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_script_honours_tilemoe_extra_site(monkeypatch, tmp_path):
    (tmp_path / "extra.pth").write_text(str(tmp_path / "from_pth") + "\n")
    (tmp_path / "from_pth").mkdir()
    load_script(monkeypatch, tmp_path)
    assert str(tmp_path) in sys.path and str(tmp_path / "from_pth") in sys.path  # .pth files read too


def run_walkthrough(monkeypatch, *args) -> tuple[int, str, list]:
    """The script's SonicMoE walk-through, on the CPU even where a GPU exists (the stand-in is torch)."""
    script = load_script(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recorded = []
    monkeypatch.setattr(tilemoe.bench, "record", lambda name, rows, device, **kw: recorded.append((name, rows, kw)) or "x.json")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = script.main(list(args))
    return code, buffer.getvalue(), recorded


def test_script_sonicmoe_walkthrough_on_a_stand_in(stand_in, monkeypatch):
    code, text, recorded = run_walkthrough(monkeypatch, "--preset", "small", "--tokens", "96", "--record")
    assert code == 0, text
    assert "SonicMoE 0.0-stand-in" in text and "SonicMoE's routing decision, replayed" in text
    for name in ("SonicMoE MoE module", "tilemoe torch", "tilemoe sonicmoe (interleaved)", "tilemoe sonicmoe (concat)"):
        rows = [line for line in text.split("(a) Correctness")[1].splitlines() if line.startswith(name)]
        assert rows and rows[0].rstrip().endswith("PASS"), text
        assert any(line.startswith(name) for line in text.split("(b) Time")[1].splitlines())
    assert "converted w_gate_up 1 time(s) and reused the copy" in text
    (name, rows, kw), = recorded
    assert name == "sonicmoe-small-T96" and len(rows) == 4 and kw["extra"]["with_sonicmoe"]
    assert all(r["check"] == "PASS" and r["fwd_ms"] > 0 and "err d w_gate_up" in r for r in rows)


def test_script_skips_the_module_for_a_router_it_does_not_have(stand_in, monkeypatch):
    tiny_olmoe = tilemoe.MoEConfig("tiny-olmoe", hidden=64, ffn=32, experts=8, top_k=3, renormalize=False)
    monkeypatch.setitem(tilemoe.PRESETS, tiny_olmoe.name, tiny_olmoe)
    code, text, _ = run_walkthrough(monkeypatch, "--preset", "tiny-olmoe", "--tokens", "50")
    assert code == 0, text
    assert "SonicMoE's MoE module is skipped" in text and "does not renormalize" in text
    table = text.split("(a) Correctness")[1].split("(b) Time")[0]
    assert "SonicMoE MoE module" not in table and table.count("PASS") == 3


# -- The README's tables, from recorded runs (--table) ------------------------------------------------

SCRIPT_ERRORS = ("y (no grad)", "y", "dx", "d router_weight", "d w_gate_up", "d w_down")  # the error columns


def synthetic_record(path: Path) -> Path:
    """A file shaped like what --record writes, with numbers chosen to be recognizable."""
    import json

    rows = [
        {"path": "SonicMoE MoE module", "routing": "SonicMoE", "check": "PASS", "fwd_ms": 2.0, "fwdbwd_ms": 6.0,
         "fwdbwd_peak_gb": 1.25, "fwd_tflops": 600.0, "fwdbwd_tflops": 612.345, "fwd_speedup": 2.0,
         "fwdbwd_speedup": 1.5, **{f"err {c}": 1.234e-3 for c in SCRIPT_ERRORS}},
        {"path": "tilemoe grouped_mm", "routing": "tilemoe", "check": "PASS", "fwd_ms": 4.0, "fwdbwd_ms": 9.0,
         "fwdbwd_peak_gb": 2.5, "fwd_tflops": 300.0, "fwdbwd_tflops": 408.0, "fwd_speedup": 1.0,
         "fwdbwd_speedup": 1.0, **{f"err {c}": 4.5e-3 for c in SCRIPT_ERRORS}},
        {"path": "tilemoe sonicmoe (concat)", "routing": "tilemoe", "check": "FAIL", "fwd_ms": 8.0,
         "fwd_tflops": 0.0421, "fwd_speedup": 0.5, **{f"err {c}": 2e-2 for c in SCRIPT_ERRORS},
         "err d w_down": float("inf")},  # a gradient that never arrived; no training-step timing
    ]
    payload = {"gpu": "NVIDIA H200", "device": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0",
               "cuda": "13.0", "python": "3.12.3", "commit": "0123456789abcdef0123456789abcdef01234567",
               "command": "sonicmoe_example.py --preset qwen3-30b-a3b --record", "date": "2026-11-23T03:00:00+00:00",
               "sm_count": 132, "capability": "9.0", "preset": tilemoe.get_preset("qwen3-30b-a3b").as_dict(),
               "tokens": 16384, "seed": 0, "with_sonicmoe": True, "baseline": "tilemoe grouped_mm",
               "dtype": "bfloat16", "tolerance": 0.01, "tilemoe_route_ms": 0.5, "reference_storage": "torch.float32",
               "sonic_cache": {"entries": 1, "conversions": 1, "hits": 7}, "module_skipped": None,
               "sonicmoe": {"sonic-moe": "9.9.9"}, "rows": rows}
    path.write_text(json.dumps(payload, indent=1))
    return path


def table_lines(text: str, first_cell: str) -> list:
    return [line.split(" | ") for line in text.splitlines() if line.startswith(f"| {first_cell} |")]


def test_table_prints_the_readme_markdown_of_a_record(tmp_path):
    record = synthetic_record(tmp_path / "sonicmoe-qwen3-30b-a3b-T16384-2026-11-23.json")
    out = run_script("--table", str(record))
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    lines = text.strip().splitlines()
    assert lines[0].startswith("<!-- generated by: python examples/05_sonicmoe/sonicmoe_example.py --table ")
    assert lines[0].endswith(f"{record.as_posix()} -->") and lines[-1] == "<!-- end of generated tables -->"
    # provenance: the shape, the GPU, the versions, the commit, the command, the file
    for piece in ("**qwen3-30b-a3b**: H = 2048, I = 768, E = 128, K = 8 (softmax, renormalized), T = 16384",
                  "NVIDIA H200 (132 SMs)", "torch 2.11.0+cu130", "sonic-moe 9.9.9", "Commit `0123456789`",
                  "`sonicmoe_example.py --preset qwen3-30b-a3b --record`", f"[`{record.as_posix()}`]",
                  "tolerance 0.01", "computing in float32"):
        assert piece in text, piece
    # correctness: one row per path, every error column, the verdict; inf for a missing gradient
    (module_errors, module_timing), = [table_lines(text, "SonicMoE MoE module")]
    assert module_errors[2:] == ["1.23e-03"] * 6 + ["PASS |"]
    (concat_errors, concat_timing) = table_lines(text, "tilemoe sonicmoe (concat)")
    assert concat_errors[-2:] == ["inf", "FAIL |"] and concat_errors[2] == "2.00e-02"
    # timing: ms, TFLOP/s, the speedup over the baseline the run names, the step peak; "-" where not measured
    assert "| path | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd vs tilemoe grouped_mm |" in text
    assert module_timing[1:] == ["2.000", "600", "6.000", "612", "2.00x", "1.50x", "1.25 |"]
    assert concat_timing[1:] == ["8.000", "0.0421", "-", "-", "0.50x", "-", "- |"]
    assert "takes 0.500 ms of every tilemoe row's forward" in text and "reused the copy 7 times" in text
    # A record that timed both routers says which row each belongs to.
    payload = json.loads(record.read_text())
    record.write_text(json.dumps({**payload, "tilemoe_fused_route_ms": 0.25}))
    text = run_script("--table", str(record)).stdout
    assert ("takes 0.500 ms with PyTorch's ops (the grouped_mm row's) and 0.250 ms with the chapter's Triton router "
            "(the sonicmoe rows')") in text


def test_table_of_a_missing_file_is_a_usage_error(tmp_path):
    out = run_script("--table", str(tmp_path / "nothing.json"))
    assert out.returncode == 2 and "no such file" in out.stderr and "Traceback" not in out.stderr


def test_readme_tables_are_generated_from_the_recorded_runs():
    # The README's "Measured" section holds exactly what --table prints for the files it names.
    readme = (SCRIPT.parent / "README.md").read_text(encoding="utf-8")
    begin = "<!-- generated by: python examples/05_sonicmoe/sonicmoe_example.py --table "
    assert begin in readme, "the README's generated block is missing"
    files = readme.split(begin, 1)[1].split(" -->", 1)[0].split()
    assert files and all((ROOT / f).is_file() for f in files), files
    out = run_script("--table", *files)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in readme, "README tables differ from --table's output: regenerate them"


# -- On a GPU, with SonicMoE installed ------------------------------------------------------------------

def sonic_gpu_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return sonic.unavailable_reason(torch.device("cuda"), torch.bfloat16, 64, 32)


@pytest.mark.gpu
@pytest.mark.skipif(sonic_gpu_reason() is not None, reason=str(sonic_gpu_reason()))
@pytest.mark.parametrize("layout", sonic.LAYOUTS)
@pytest.mark.parametrize("case", [*RAGGED, "capacity"])
def test_real_sonicmoe_matches_reference_on_ragged_routing(case, layout):
    if case == "capacity":
        num_tokens, top_k, num_experts = 300, 4, 16
        w = make_weights(64, 32, num_experts, dtype=torch.bfloat16, device="cuda", seed=8)
        x = torch.randn(num_tokens, 64, device="cuda").bfloat16()
        routing = tilemoe.route(tilemoe.router_logits(x, w["router_weight"]), top_k, capacity_factor=1.0)
        assert routing.dropped.any()
    else:
        num_tokens, top_k, num_experts, ids = RAGGED[case]
        w = make_weights(64, 32, num_experts, dtype=torch.bfloat16, device="cuda", seed=5)
        x = torch.randn(num_tokens, 64, device="cuda").bfloat16()
        routing = forced_routing(ids().cuda(), num_experts, seed=2)
    ours, xl = leaves_of(w), x.clone().requires_grad_()
    with sonic.weight_layout(layout):
        y = tilemoe.moe_forward(xl, **ours, top_k=top_k, backend="sonicmoe", routing=routing)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_w, x64 = {k: v.double().requires_grad_() for k, v in w.items()}, x.double().requires_grad_()
    ref = tilemoe.reference_moe(x64, **ref_w, top_k=top_k, routing=routing)
    ref.backward(dy.double())
    assert tilemoe.rel_error(y, ref) <= BF16_TOL
    for name in ("w_gate_up", "w_down"):
        assert tilemoe.rel_error(ours[name].grad, ref_w[name].grad) <= BF16_TOL, name
    assert tilemoe.rel_error(xl.grad, x64.grad) <= BF16_TOL


@pytest.mark.gpu
@pytest.mark.skipif(sonic_gpu_reason() is not None, reason=str(sonic_gpu_reason()))
def test_real_sonicmoe_module_passes_the_benchmarks_check():
    bench_variants = load_bench_variants()
    cuda = torch.device("cuda")
    case = bench_variants.make_case(tilemoe.get_preset("small"), 300, cuda, torch.bfloat16, seed=0)
    row = bench_variants.measure(case, "sonicmoe module", cuda, BF16_TOL, quick=False, gbps=1.0)
    assert row["check"] == "PASS", row
