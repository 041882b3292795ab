"""tilemoe.clocks: the SM clock and power-cap samples the benchmarks record beside their times."""

from __future__ import annotations

import time

import pytest
import torch

from tilemoe import clocks


def test_summary_is_the_median_clock_and_the_share_of_power_capped_samples():
    samples = [(1980, 0x0), (1500, clocks.POWER_CAP), (1600, clocks.POWER_CAP | 0x1)] + [(1700, 0x1)] * 17
    reads = []

    def read():
        reads.append(None)
        return samples[min(len(reads), len(samples)) - 1]

    with clocks.Sampler("cpu", read=read, power_limit_w=700, max_sm_clock_mhz=1980, interval_s=0.001) as s:
        deadline = time.monotonic() + 10
        while len(reads) < len(samples) and time.monotonic() < deadline:
            time.sleep(0.001)
    summary = s.summary()
    n = len(reads)
    assert n >= len(samples), "the sampler read fewer than 20 samples in 10 s"
    assert summary["sm_clock_mhz"] == 1700
    assert summary["power_capped"] == pytest.approx(2 / n)
    assert summary["power_limit_w"] == 700 and summary["max_sm_clock_mhz"] == 1980


def test_every_sample_capped_and_one_sample_at_least():
    with clocks.Sampler("cpu", read=lambda: (1425, clocks.POWER_CAP), power_limit_w=700, max_sm_clock_mhz=1980) as s:
        pass  # the block may end before the thread's second read: its first still counts
    assert s.summary() == {"sm_clock_mhz": 1425, "power_capped": 1.0, "power_limit_w": 700, "max_sm_clock_mhz": 1980}


def test_nothing_sampled_on_a_cpu():
    with clocks.Sampler("cpu") as s:
        time.sleep(0.01)
    assert s.summary() == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_nvml_samples_the_gpu_while_it_computes():
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    with clocks.Sampler("cuda") as s:
        for _ in range(50):
            a @ a
        torch.cuda.synchronize()
    summary = s.summary()
    assert summary, "NVML was not found: libnvidia-ml.so.1 ships with the driver"
    assert 100 < summary["sm_clock_mhz"] <= summary["max_sm_clock_mhz"]
    assert 0 <= summary["power_capped"] <= 1 and summary["power_limit_w"] > 0


def test_mean_power_between_the_counters_steps_inside_the_run():
    # (s, mJ): a step every 100 ms at 500 W; the first step after the start holds energy drawn before it.
    steps = [(0.05 + 0.1 * i, 1_000_000 + 50_000 * i) for i in range(12)]
    assert clocks.mean_power_w(steps, start=0.0, end=1.2) == pytest.approx(500.0)
    # Only steps from start + settle_s up to end count: a jump before the settle time is left out.
    jumped = [(0.05, 0)] + steps[1:]
    assert clocks.mean_power_w(jumped, start=0.0, end=1.2, settle_s=0.1) == pytest.approx(500.0)
    assert clocks.mean_power_w(jumped, start=0.0, end=1.2, settle_s=0.0) != pytest.approx(500.0)
    assert clocks.mean_power_w(steps, start=0.0, end=0.2) is None  # fewer than two steps inside


def test_energy_per_call_from_a_planted_counter():
    # A counter that moves every 20 ms as a 300 W board's would; each call takes 5 ms.
    t0 = time.perf_counter()

    def read_energy():
        elapsed = time.perf_counter() - t0
        return int(300 * 1e3 * (elapsed // 0.02) * 0.02)

    got = clocks.energy_per_call(lambda: time.sleep(0.005), "cpu", seconds=0.6, read_energy=read_energy)
    assert got["power_w"] == pytest.approx(300, rel=0.1)
    assert got["loop_ms"] == pytest.approx(5, rel=0.5)
    assert got["energy_j"] == pytest.approx(got["power_w"] * got["loop_ms"] / 1e3)
    # A counter that never moves gives nothing rather than a power of zero.
    assert clocks.energy_per_call(lambda: None, "cpu", seconds=0.3, read_energy=lambda: 7) == {}


def test_no_energy_on_a_cpu():
    assert clocks.energy_per_call(lambda: None, "cpu", seconds=0.01) == {}


def test_energy_cells_and_their_caption():
    assert clocks.energy_cell(2.1249, 693.2, 3.0652) == "2.12 J at 693 W, 3.065 ms"
    caption = clocks.energy_caption(700, "per forward")
    assert caption.startswith("Run back to back for 1.5 s (no cache flush between calls; NVML's energy counter): "
                              "the joules per forward,")
    assert caption.endswith("At the 700 W limit a call takes at least its joules over 700 W:")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_nvml_energy_of_a_gemm():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    got = clocks.energy_per_call(lambda: a @ a, "cuda", seconds=1.0)
    assert got, "NVML's energy counter was not found or did not move"
    assert 50 < got["power_w"] < 1500  # a board under load, below any GPU's limit
    assert got["loop_ms"] > 0 and got["energy_j"] == pytest.approx(got["power_w"] * got["loop_ms"] / 1e3)
