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
