"""Smoke runs of examples/04_token_rounding on the CPU: --help, small runs of every script, --plot."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSON = ROOT / "examples" / "04_token_rounding"
MODES = ("down", "up", "nearest", "adaptive")


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LESSON / script), *args], cwd=ROOT, capture_output=True,
                          text=True, encoding="utf-8", timeout=120)


def ok(script: str, *args: str) -> str:
    result = run(script, *args)
    assert result.returncode == 0, f"{script} {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def rows_of(out: str, section: str) -> dict[str, list[str]]:
    """The lines of the first table after `section`, keyed by their routing or mode name (in the
    first or second column)."""
    rows = {}
    for line in out.split(section, 1)[1].splitlines()[1:]:
        cells = line.split()
        if not cells or line.startswith(("(", "The paper")):
            if rows:
                break
            continue
        name = next((c for c in cells[:2] if c in ("top-k", *MODES)), None)
        if name:
            rows.setdefault(name, []).append(line)
    return rows


@pytest.mark.parametrize("script, options", [
    ("token_rounding.py", ["--preset", "--tokens", "--tile", "--skew", "--experts-shown", "--seed", "--plot"]),
    ("routing_comparison.py", ["--experts", "--top-k", "--tokens", "--tile", "--hidden", "--ffn", "--diff-tokens",
                               "--skew", "--device", "--measure", "--record"]),
    ("quality_experiment.py", ["--seeds", "--steps", "--batch", "--experts", "--top-k", "--tile", "--lr", "--aux",
                               "--quick", "--record"]),
])
def test_help_lists_every_option(script, options):
    out = ok(script, "--help")
    for option in options:
        assert option in out


def test_token_rounding_small_run():
    out = ok("token_rounding.py", "--preset", "qwen3-30b-a3b", "--tokens", "1024", "--tile", "32")
    for expected in ("(a) The rule", "(b) Vanilla top-8 routing", "(c) Rounding", "(d)", "pairs dropped",
                     "tokens w/o expert", "tile rows"):
        assert expected in out
    modes = rows_of(out, "(c) Rounding")
    assert sorted(modes) == sorted(MODES)
    # Columns: mode, util before, util after, padded before, padded after, dropped, added, ...
    down, up = modes["down"][0].split(), modes["up"][0].split()
    assert down[2] == "1.000" and down[4] == "0" and down[6] == "0"   # full tiles, nothing added
    assert up[2] == "1.000" and up[5] == "0"                           # full tiles, nothing dropped


def test_token_rounding_rejects_bad_tile():
    result = run("token_rounding.py", "--tile", "0")
    assert result.returncode == 2 and "--tile" in result.stderr


def test_routing_comparison_cpu_prints_the_model_not_a_measurement():
    out = ok("routing_comparison.py", "--device", "cpu", "--experts", "16", "64", "--tokens", "1024", "--tile", "32",
             "--hidden", "64", "--ffn", "32", "--diff-tokens", "256")
    assert "modelled, not measured" in out and "(c) Measured" not in out
    assert "the first 256 of the 1024 tokens" in out and "1.16x" in out and "the paper's number" in out
    routings = rows_of(out, "(a) Routing")
    assert sorted(routings) == sorted(("top-k", *MODES)) and all(len(v) == 2 for v in routings.values())
    assert all(float(line.split()[-1]) == 0.0 for line in routings["top-k"])  # top-k vs itself
    assert all(float(line.split()[-1]) > 0.0 for line in routings["down"])    # rounding changes the output


def test_routing_comparison_measure_checks_every_gemm_input_on_cpu():
    # The GPU's code path on the CPU: padded, unpadded and rounded inputs through grouped_mm, each
    # checked against per-expert matmuls (an AssertionError would exit non-zero).
    out = ok("routing_comparison.py", "--measure", "--experts", "12", "--top-k", "3", "--tokens", "200",
             "--tile", "16", "--hidden", "32", "--ffn", "16", "--skew", "1")
    table = out.split("(c) Measured", 1)[1]
    for name in ("top-k padded", "top-k unpadded", *MODES):
        assert name in table
    errors = [float(line.split()[-1]) for line in table.splitlines() if line.split()[:1] == ["12"]]
    assert len(errors) == 6 and all(e <= 1e-2 for e in errors)


def test_quality_experiment_quick():
    out = ok("quality_experiment.py", "--quick")
    assert "exact topic filter" in out
    summary = rows_of(out, "Final validation loss")
    assert sorted(summary) == sorted(("top-k", *MODES))
    for lines in summary.values():
        loss = float(lines[0].split()[1])
        assert 0.0 < loss < 10.0


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed (the plot extra)")
def test_token_rounding_plot(tmp_path):
    png = tmp_path / "rounding.png"
    ok("token_rounding.py", "--tokens", "1024", "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
