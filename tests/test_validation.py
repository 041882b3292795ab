"""Bad input gets a TypeError/ValueError naming the argument, the expected and the actual value,
before any expert runs."""

from __future__ import annotations

import pytest
import torch

import tilemoe
from moe_cases import forced_routing, make_weights
from tilemoe import backends

H, I, E = 16, 8, 4


def good():
    return dict(x=torch.randn(5, H), **make_weights(H, I, E), top_k=2)


def with_(**change):
    kw = good()
    kw.update(change)
    return kw


W = make_weights(H, I, E)
BAD = {
    "x not a tensor": (with_(x=[[1.0] * H]), TypeError, r"x: expected a torch.Tensor, got list"),
    "x integer": (with_(x=torch.ones(5, H, dtype=torch.int64)), TypeError, r"x: expected a floating dtype"),
    "x scalar": (with_(x=torch.tensor(1.0)), ValueError, r"x: expected shape \[\.\.\., H\]"),
    "router H": (with_(router_weight=torch.randn(E, H + 1)), ValueError, r"router_weight: expected shape \[E, H\] with E >= 1 and H = 16, got \[4, 17\]"),
    "router device": (with_(router_weight=torch.randn(E, H, device="meta")), ValueError, r"router_weight: expected device cpu"),
    "w_gate_up dtype": (with_(w_gate_up=W["w_gate_up"].double()), TypeError, r"w_gate_up: expected dtype torch.float32 \(the dtype of x\), got torch.float64"),
    "w_gate_up odd 2I": (with_(w_gate_up=torch.randn(E, 2 * I + 1, H)), ValueError, r"w_gate_up: expected shape \[E, 2I, H\]"),
    "w_gate_up E": (with_(w_gate_up=torch.randn(E + 1, 2 * I, H)), ValueError, r"w_gate_up: expected shape \[E, 2I, H\] = \[4, 16, 16\], got \[5, 16, 16\]"),
    "w_down I": (with_(w_down=torch.randn(E, H, I + 1)), ValueError, r"w_down: expected shape \[E, H, I\] = \[4, 16, 8\], got \[4, 16, 9\]"),
    "w_down not contiguous": (with_(w_down=torch.randn(E, I, H).transpose(1, 2)), ValueError, r"w_down: expected a contiguous tensor"),
    "top_k zero": (with_(top_k=0), ValueError, r"top_k: expected an int >= 1, got 0"),
    "top_k > E": (with_(top_k=E + 1), ValueError, r"top_k: expected an int <= 4, got 5"),
    "top_k float": (with_(top_k=2.0), TypeError, r"top_k: expected an int, got float"),
    "top_k bool": (with_(top_k=True), TypeError, r"top_k: expected an int, got bool"),
    "scoring": (with_(scoring="relu"), ValueError, r"scoring: expected one of 'softmax', 'sigmoid', got 'relu'"),
    "score_bias shape": (with_(score_bias=torch.zeros(E + 1)), ValueError, r"score_bias: expected shape \[E\] = \[4\], got \[5\]"),
    "groups alone": (with_(num_groups=2), TypeError, r"topk_groups: expected an int \(num_groups and topk_groups come together\), got None"),
    "groups not dividing E": (with_(num_groups=3, topk_groups=1), ValueError, r"num_groups: expected a divisor of num_experts = 4, got 3"),
    "topk_groups > groups": (with_(num_groups=2, topk_groups=3), ValueError, r"topk_groups: expected an int <= 2, got 3"),
    "top_k unreachable by groups": (with_(num_groups=4, topk_groups=1), ValueError, r"top_k: expected <= topk_groups \* experts per group = 1, got 2"),
    "routed_scaling zero": (with_(routed_scaling=0.0), ValueError, r"routed_scaling: expected a finite number > 0, got 0.0"),
    "capacity negative": (with_(capacity_factor=-1.0), ValueError, r"capacity_factor: expected a finite number > 0, got -1.0"),
    "capacity nan": (with_(capacity_factor=float("nan")), ValueError, r"capacity_factor: expected a finite number > 0, got nan"),
    "backend unknown": (with_(backend="cutlass"), ValueError, r"backend: expected one of 'auto', 'torch', 'grouped_mm', 'triton', 'cuda', 'sonicmoe', got 'cutlass'"),
    "backend cannot run dtype": (
        dict(x=torch.randn(5, H, dtype=torch.float64), **make_weights(H, I, E, dtype=torch.float64), top_k=2, backend="grouped_mm"),
        ValueError, r"backend: expected a backend that runs torch.float64 on cpu, got 'grouped_mm', which cannot: .*float64"),
    "routing type": (with_(routing="topk"), TypeError, r"routing: expected a tilemoe.routing.Routing, got str"),
    "routing T": (with_(routing=forced_routing(torch.zeros(6, 2, dtype=torch.long), E)), ValueError, r"routing: expected topk_ids of shape \[T, K\] = \[5, 2\], got \[6, 2\]"),
    "routing E": (with_(routing=forced_routing(torch.zeros(5, 2, dtype=torch.long), E + 1)), ValueError, r"routing: expected num_experts = 4, got 5"),
    "shared half given": (with_(shared_gate_up=torch.randn(1, 2 * I, H)), TypeError, r"shared_down: expected a tensor \(shared_gate_up and shared_down come together\), got None"),
    "shared shape": (with_(shared_gate_up=torch.randn(1, 2 * I, H), shared_down=torch.randn(1, H, I + 2)), ValueError, r"shared_down: expected shape \[S, H, Is\] = \[1, 16, 8\], got \[1, 16, 10\]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_named_before_any_expert_runs(case, monkeypatch):
    kwargs, exc, match = BAD[case]
    ran = []
    for module in backends.BACKENDS.values():
        monkeypatch.setattr(module, "experts", lambda *a, **k: ran.append(a))
    with pytest.raises(exc, match=match):
        tilemoe.moe_forward(**kwargs)
    assert not ran


@pytest.mark.parametrize("case", ["w_down I", "top_k > E", "scoring", "groups not dividing E", "shared shape"])
def test_reference_rejects_the_same_input(case):
    kwargs, exc, match = BAD[case]
    kwargs = {k: v for k, v in kwargs.items() if k != "backend"}
    with pytest.raises(exc, match=match):
        tilemoe.reference_moe(**kwargs)


def test_route_rejects_bad_logits():
    with pytest.raises(ValueError, match=r"logits: expected shape \[T, E\]"):
        tilemoe.route(torch.zeros(4), 1)
    with pytest.raises(TypeError, match=r"logits: expected a floating dtype"):
        tilemoe.route(torch.zeros(4, 4, dtype=torch.int32), 1)


def test_the_good_case_is_good():
    assert tilemoe.moe_forward(**good()).shape == (5, H)
