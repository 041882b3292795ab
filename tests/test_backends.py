"""Every backend against tilemoe.reference_moe on ragged routing, on the CPU.

Uninitialized memory is poisoned: with deterministic algorithms on, torch fills every
torch.empty with NaN, so a row a backend forgets to write (or a dropped row it multiplies by
its zero weight) turns into NaN and fails the comparison.
"""

from __future__ import annotations

import os

import pytest
import torch

import tilemoe
from moe_cases import RAGGED, forced_routing, make_weights
from tilemoe import backends

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")
CPU = torch.device("cpu")
CPU_BACKENDS = [n for n in backends.BACKENDS if backends.unavailable_reason(n, CPU, torch.float32, 8, 8) is None]


def test_poisoning_is_on():
    assert torch.isnan(torch.empty(4)).all()


def test_every_cpu_backend_is_tested():
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest.py on machines without a GPU
    assert set(CPU_BACKENDS) == {"torch", "grouped_mm"} | ({"triton"} if interpreted else set())


@pytest.mark.parametrize("case", list(RAGGED))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_matches_reference_on_ragged_routing(backend, case):
    num_tokens, top_k, num_experts, ids = RAGGED[case]
    w = make_weights(32, 24, num_experts, seed=hash(case) % 1000)
    x = torch.randn(num_tokens, 32, generator=torch.Generator().manual_seed(7))
    routing = forced_routing(ids(), num_experts, seed=3)
    y = tilemoe.moe_forward(x, **w, top_k=top_k, backend=backend, routing=routing)
    ref = tilemoe.reference_moe(x, **w, top_k=top_k, routing=routing)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert tilemoe.rel_error(y, ref) <= tilemoe.TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_dtypes_within_tolerance(backend, dtype):
    if backends.unavailable_reason(backend, CPU, dtype, 64, 32) is not None:
        pytest.skip(backends.unavailable_reason(backend, CPU, dtype, 64, 32))
    w = make_weights(64, 32, 8, dtype=dtype, seed=1)
    x = torch.randn(45, 64).to(dtype)
    y = tilemoe.moe_forward(x, **w, top_k=2, backend=backend)
    ref = tilemoe.reference_moe(x.double(), **{k: v.double() for k, v in w.items()}, top_k=2)
    assert y.dtype == dtype
    assert tilemoe.rel_error(y, ref) <= tilemoe.TOLERANCE[dtype]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batched_noncontiguous_input_keeps_its_shape(backend):
    w = make_weights(16, 8, 6, seed=2)
    x = torch.randn(3, 16, 7).transpose(1, 2)  # [B, S, H], not contiguous
    y = tilemoe.moe_forward(x, **w, top_k=3, backend=backend)
    assert y.shape == (3, 7, 16)
    assert tilemoe.rel_error(y, tilemoe.reference_moe(x, **w, top_k=3)) <= 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_capacity_dropping_and_router_options(backend):
    w = make_weights(16, 8, 8, seed=4, shared=2)
    x = torch.randn(64, 16)
    opts = dict(scoring="sigmoid", num_groups=4, topk_groups=2, routed_scaling=2.5, capacity_factor=0.5,
                score_bias=torch.linspace(-0.1, 0.1, 8))
    y = tilemoe.moe_forward(x, **w, top_k=4, backend=backend, **opts)
    ref = tilemoe.reference_moe(x, **w, top_k=4, **opts)
    assert tilemoe.rel_error(y, ref) <= 1e-5
    routing = tilemoe.route(tilemoe.router_logits(x, w["router_weight"]), 4, **opts)
    assert routing.dropped.any(), "capacity 0.5 must drop slots, or this test tests nothing"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_tokens(backend):
    w = make_weights(16, 8, 4)
    y = tilemoe.moe_forward(torch.empty(0, 16), **w, top_k=2, backend=backend)
    assert y.shape == (0, 16)


def test_auto_resolves_to_the_fastest_available():
    interpreted = ["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []
    assert backends.available_backends(CPU, torch.float32, 16, 8) == ["torch", "grouped_mm", *interpreted]
    assert backends.available_backends(CPU, torch.float64, 16, 8) == ["torch"]
    w = make_weights(16, 8, 4, dtype=torch.float64)
    y = tilemoe.moe_forward(torch.randn(5, 16, dtype=torch.float64), **w, top_k=2)  # auto -> torch
    assert y.dtype == torch.float64


def test_auto_trains_with_a_backend_whose_backward_is_its_own(monkeypatch):
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("triton", "torch"))
    if backends.unavailable_reason("triton", CPU, torch.float32, 16, 8) is not None:
        pytest.skip("triton does not run here")
    # The Triton backward is measured faster than grouped_mm's (examples/06_full_moe): auto trains with it.
    assert backends.resolve("auto", CPU, torch.float32, 16, 8, needs_grad=True).NAME == "triton"
    monkeypatch.setattr(backends.BACKENDS["triton"], "FAST_BACKWARD", False)  # as the cuda backend's is
    assert backends.resolve("auto", CPU, torch.float32, 16, 8).NAME == "triton"
    assert backends.resolve("auto", CPU, torch.float32, 16, 8, needs_grad=True).NAME == "torch"
    assert backends.resolve("triton", CPU, torch.float32, 16, 8, needs_grad=True).NAME == "triton"  # asked for: given


def test_grouped_mm_falls_back_to_the_private_op_of_older_torch(monkeypatch):
    import importlib

    import torch.nn.functional as F

    from tilemoe.backends import grouped_mm

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no torch._grouped_mm to fall back to")
    monkeypatch.delattr(F, "grouped_mm", raising=False)  # what torch < 2.9 looks like
    try:
        assert importlib.reload(grouped_mm).grouped_mm_op is torch._grouped_mm
    finally:
        monkeypatch.undo()
        importlib.reload(grouped_mm)
