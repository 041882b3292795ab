"""tilemoe.bench (timing + recorded results) and tilemoe.presets."""

from __future__ import annotations

import json

import pytest
import torch

import tilemoe
from tilemoe import bench, presets
from tilemoe.routing import check_router_options


def test_time_ms_on_cpu_is_a_median_of_several_calls():
    calls = []
    ms = bench.time_ms(lambda: calls.append(1), device="cpu", warmup_ms=1, rep_ms=1)
    assert ms >= 0 and len(calls) >= 1 + 3  # one untimed first call, at least 3 timed


def test_time_ms_graph_timing_is_for_a_gpu():
    with pytest.raises(ValueError, match="cuda_graph: expected False on a device other than a CUDA GPU"):
        bench.time_ms(lambda: None, device="cpu", cuda_graph=True)


@pytest.mark.gpu
def test_time_ms_of_a_graph_replays_the_recorded_work():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.zeros(1024, device="cuda")
    ms = bench.time_ms(lambda: x.add_(1.0), device="cuda", cuda_graph=True, warmup_ms=1, rep_ms=1)
    torch.cuda.synchronize()
    # Two eager warm-up calls, one recorded, then every timed replay added 1 more.
    assert ms > 0 and x[0].item() > 3 and bool((x == x[0]).all())


def test_tflops():
    assert bench.tflops(2e12, 1000.0) == pytest.approx(2.0)


def test_record_writes_rows_with_provenance(tmp_path):
    rows = [{"backend": "torch", "ms": 1.5}]
    path = bench.record("unit-test", rows, "cpu", out_dir=tmp_path, extra={"preset": "small"})
    data = json.loads(path.read_text())
    assert path.parent == tmp_path and path.name.startswith("unit-test-")
    for key in ("gpu", "device", "torch", "triton", "commit", "command", "date"):
        assert key in data
    assert data["rows"] == rows and data["preset"] == "small" and data["torch"] == torch.__version__
    assert data["device"].startswith("CPU")


def test_record_never_overwrites_a_run_of_the_same_day(tmp_path):
    first = bench.record("same", [{"run": 1}], "cpu", out_dir=tmp_path)
    second = bench.record("same", [{"run": 2}], "cpu", out_dir=tmp_path)
    assert first != second and second.name.endswith("-2.json")
    assert json.loads(first.read_text())["rows"] == [{"run": 1}]


@pytest.mark.parametrize("name, rows, exc", [("../escape", [], ValueError), ("ok", {"a": 1}, TypeError)])
def test_record_rejects_bad_arguments(tmp_path, name, rows, exc):
    with pytest.raises(exc):
        bench.record(name, rows, "cpu", out_dir=tmp_path)


def test_results_dir_is_per_device():
    assert bench.results_dir("cpu").parts[-3:] == ("benchmarks", "results", "cpu")
    assert bench.slug("NVIDIA H200") == "nvidia-h200"


def test_presets_are_the_published_shapes():
    p = presets.PRESETS
    assert set(p) == {"small", "mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b", "olmoe-1b-7b"}
    shape = {n: (c.hidden, c.ffn, c.experts, c.top_k) for n, c in p.items()}
    assert shape["mixtral-8x7b"] == (4096, 14336, 8, 2)
    assert shape["deepseek-v3"] == (7168, 2048, 256, 8)
    assert shape["qwen3-30b-a3b"] == (2048, 768, 128, 8)
    assert shape["olmoe-1b-7b"] == (2048, 1024, 64, 8)
    ds = p["deepseek-v3"]
    assert (ds.scoring, ds.num_groups, ds.topk_groups, ds.routed_scaling, ds.shared_experts) == ("sigmoid", 8, 4, 2.5, 1)
    assert p["olmoe-1b-7b"].renormalize is False
    for c in p.values():  # every preset's router options are valid for its shape
        check_router_options(c.experts, c.top_k, score_bias=None, capacity_factor=None, device=torch.device("cpu"),
                             **{k: v for k, v in c.router_options().items() if k != "renormalize"})


def test_flops_and_weights():
    c = tilemoe.get_preset("small")
    assert c.flops(10) == 6 * 10 * c.top_k * c.hidden * c.ffn
    ds = tilemoe.get_preset("deepseek-v3")
    assert ds.flops(3, include_shared=True) == 6 * 3 * (8 + 1) * 7168 * 2048
    w = c.init_weights(seed=3)
    assert w["w_gate_up"].shape == (c.experts, 2 * c.ffn, c.hidden) and w["w_down"].shape == (c.experts, c.hidden, c.ffn)
    assert torch.equal(w["w_down"], c.init_weights(seed=3)["w_down"])
    assert c.weight_bytes(torch.bfloat16) == 3 * c.experts * c.hidden * c.ffn * 2
    with pytest.raises(ValueError, match="preset: expected one of"):
        tilemoe.get_preset("gpt-5")


def test_small_preset_runs_through_moe_forward():
    c = tilemoe.get_preset("small")
    w = c.init_weights()
    x = torch.randn(9, c.hidden)
    y = tilemoe.moe_forward(x, **w, top_k=c.top_k, **c.router_options())
    assert tilemoe.rel_error(y, tilemoe.reference_moe(x, **w, top_k=c.top_k, **c.router_options())) < 1e-5


def test_commit_from_the_environment_wins_over_a_stale_checkout(monkeypatch):
    monkeypatch.setenv("TILEMOE_COMMIT", "abc1234")
    assert bench.git_commit() == "abc1234"
    monkeypatch.delenv("TILEMOE_COMMIT")
    assert bench.git_commit() != "abc1234"
