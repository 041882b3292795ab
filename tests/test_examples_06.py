"""Smoke runs of examples/06_full_moe on the CPU: --help, the training-then-inference lesson, the benchmark."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSON = ROOT / "examples" / "06_full_moe"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LESSON / script), *args], cwd=ROOT, capture_output=True, text=True,
                          encoding="utf-8", timeout=300)


@pytest.mark.parametrize("script", ["full_moe.py", "benchmark.py"])
def test_help(script):
    result = run(script, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


def test_full_moe_trains_then_serves_within_the_tolerance():
    result = run("full_moe.py", "--steps", "3", "--rounding", "nearest", "--tile-size", "16", "--capacity-factor", "1.5")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Training" in out and "Expert usage over training: Gini" in out
    assert "PASS" in out and "rel. error" in out


def test_benchmark_runs_every_cpu_backend_beside_grouped_mm():
    # The Triton backend under the interpreter takes tens of seconds here; its forward and backward
    # are checked in tests/test_triton_backward.py and tests/test_layer.py.
    result = run("benchmark.py", "--tokens", "16", "--backends", "torch", "grouped_mm")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[3:] if line.strip()}
    assert set(rows) == {"torch", "grouped_mm"} and rows["grouped_mm"][3] == "1"


def test_a_backend_that_cannot_run_is_a_usage_error():
    result = run("benchmark.py", "--backends", "sonicmoe")
    assert result.returncode == 2 and "--backends: sonicmoe cannot run here" in result.stderr


def test_bad_tokens_are_a_usage_error():
    result = run("full_moe.py", "--tokens", "0")
    assert result.returncode == 2 and "--tokens and --steps: expected ints >= 1, got 0 and 10" in result.stderr
