"""tilemoe.floors: the dense-GEMM floors do exactly the FLOPs they stand for, and lesson 6 sizes its floor
by the rows the layer's experts compute."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tilemoe
from tilemoe import floors

ROOT = Path(__file__).resolve().parents[1]


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("rows, hidden, ffn", [(48, 32, 16), (7, 24, 40)])
def test_the_floors_do_the_forward_and_the_training_steps_flops(rows, hidden, ffn):
    forward = floors.forward_gemms(rows, hidden, ffn, device="cpu", dtype=torch.float32)
    step = floors.training_gemms(rows, hidden, ffn, device="cpu", dtype=torch.float32)
    assert counted_flops(forward) == 6 * rows * hidden * ffn
    assert counted_flops(step) == 18 * rows * hidden * ffn
    # The forward pair is the step's first two GEMMs, its outputs shaped as the layer's pre and rows.
    pre, out = forward()
    assert pre.shape == (rows, 2 * ffn) and out.shape == (rows, hidden)
    shapes = [tuple(t.shape) for t in step()]
    assert shapes == [(rows, 2 * ffn), (rows, hidden), (rows, ffn), (hidden, ffn), (rows, hidden), (2 * ffn, hidden)]


def test_bad_sizes_name_themselves():
    with pytest.raises(ValueError, match=r"rows, hidden, ffn: expected ints >= 1, got \(0, 32, 16\)"):
        floors.training_gemms(0, 32, 16, device="cpu", dtype=torch.float32)


def test_lesson_6_floor_counts_the_shared_experts_rows(monkeypatch):
    spec = importlib.util.spec_from_file_location("full_moe_benchmark", ROOT / "examples" / "06_full_moe" / "benchmark.py")
    lesson6 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lesson6)
    layer = tilemoe.OptimizedMoELayer(32, 16, 8, 2, num_shared_experts=1)
    row = lesson6.measure_floor(layer, 12, torch.device("cpu"), torch.float32)
    assert row["rel_error"] is None and row["train_peak_bytes"] is None
    assert row["forward_ms"] > 0 and row["fwd_bwd_ms"] > 0
    seen = []
    monkeypatch.setattr(lesson6.floors, "training_gemms", lambda *shape, **kw: seen.append(shape) or (lambda: None))
    monkeypatch.setattr(lesson6.floors, "forward_gemms", lambda *shape, **kw: seen.append(shape) or (lambda: None))
    lesson6.measure_floor(layer, 12, torch.device("cpu"), torch.float32)
    assert seen == [(12 * 3, 32, 16)] * 2  # T * (K + shared experts) rows
