"""Smoke runs of examples/01_moe_basics on the CPU: --help, the default run, a few options."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSON = ROOT / "examples" / "01_moe_basics"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LESSON / script), *args], cwd=ROOT, capture_output=True,
                          text=True, encoding="utf-8", timeout=120)


def ok(script: str, *args: str) -> str:
    result = run(script, *args)
    assert result.returncode == 0, f"{script} {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("script, options", [
    ("moe_layer.py", ["--preset", "--tokens", "--device", "--dtype", "--seed"]),
    ("expert_routing.py", ["--experts", "--top-k", "--tokens", "--hidden", "--skew", "--seed", "--plot"]),
])
def test_help_lists_every_option(script, options):
    out = ok(script, "--help")
    for option in options:
        assert option in out


def backend_rows(out: str) -> list[str]:
    table = out.split("Backends:", 1)[1].splitlines()
    return [line for line in table if line.split() and line.split()[0] in ("torch", "grouped_mm")]


def test_moe_layer_default_run_checks_every_backend():
    out = ok("moe_layer.py")
    for expected in ("hidden", "x [512, 256] -> y [512, 256]", "Tokens per expert", "Gini",
                     "tile util (128)", "TFLOP/s"):
        assert expected in out
    rows = backend_rows(out)
    assert [r.split()[0] for r in rows] == ["torch", "grouped_mm"]
    assert all(r.split()[-1] == "PASS" for r in rows)


def test_moe_layer_one_token_float64():
    out = ok("moe_layer.py", "--preset", "small", "--tokens", "1", "--dtype", "float64", "--device", "cpu")
    assert "x [1, 256] -> y [1, 256], float64" in out
    rows = backend_rows(out)
    assert rows and all(r.split()[-1] == "PASS" for r in rows)


def test_moe_layer_rejects_zero_tokens():
    result = run("moe_layer.py", "--tokens", "0")
    assert result.returncode == 2 and "--tokens" in result.stderr


def test_expert_routing_default_run():
    out = ok("expert_routing.py")
    for expected in ("(a) Token 0", "tilemoe.route agrees", "(b) Load statistics", "Gini", "CV", "min/max",
                     "tile util (128)", "aux loss", "skewed (1)", "(c) Capacity", "tokens with no expert"):
        assert expected in out
    # The uncapped rows drop nothing; the skewed router at cf = 1.0 must drop something.
    capacity = out.split("(c) Capacity", 1)[1].splitlines()
    # Columns from the right: dropped slots, % dropped, tokens with no expert.
    assert [r.split()[-3] for r in capacity if " none " in r] == ["0", "0"]
    skewed_cf1 = next(r for r in capacity if r.startswith("skewed") and r.split()[2] == "1.0")
    assert int(skewed_cf1.split()[-3]) > 0


def test_expert_routing_many_experts_is_compact():
    out = ok("expert_routing.py", "--experts", "64", "--top-k", "8", "--tokens", "256", "--skew", "2")
    assert "experts of lower probability" in out and "experts in between" in out
    assert run("expert_routing.py", "--experts", "4", "--top-k", "5").returncode == 2


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed (the plot extra)")
def test_expert_routing_plot(tmp_path):
    png = tmp_path / "x.png"
    ok("expert_routing.py", "--tokens", "512", "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
