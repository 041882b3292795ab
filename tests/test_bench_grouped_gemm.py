"""benchmarks/bench_grouped_gemm.py on the CPU: its smoke run, its plot, its README table, its errors.

One subprocess runs the program as a reader would; the rest calls its main() in this process
(importing torch again per call would cost seconds each).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tilemoe
from tilemoe import cuda

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_grouped_gemm.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_grouped_gemm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def exit_status(bench, capsys, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of main(args), whether it returns or exits."""
    try:
        status = bench.main(list(args))
    except SystemExit as exc:
        status = exc.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_cpu_run_checks_and_times_the_torch_variants_and_names_the_cuda_ones_skipped(tmp_path):
    png = tmp_path / "gemm.png"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tokens", "8", "--plot", str(png)], cwd=ROOT,
                          capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "float32 (a CPU: bf16 matmuls are slow here" in out
    for gemm, shape in (("up", "C [M, 1024] = A [M, 256]"), ("down", "C [M, 256] = A [M, 512]")):
        for routing in ("balanced", "skewed"):
            assert f"small {gemm}: {shape} x W_e^T over 8 experts, {routing} routing" in out
    for variant in ("torch loop", "grouped_mm", "dense ceiling"):
        # tokens, variant, then its time: one row per GEMM and routing
        assert len(re.findall(rf"^\s+8\s+{re.escape(variant)}\s+\d", out, re.M)) == 4, variant
    assert out.count("PASS") == 2 * 4 * 2 and "FAIL" not in out  # 2 checked variants x 4 cases, progress + table
    reason = cuda.unavailable_reason()
    assert f"skipped naive: {reason}" in out and f"skipped tiled: {reason}" in out
    assert png.stat().st_size > 0


def test_help(bench, capsys):
    status, out, _ = exit_status(bench, capsys, "--help")
    assert status == 0 and "usage:" in out and "--routing" in out and "--table" in out


def test_offsets_are_seeded_and_the_skewed_routing_leaves_experts_empty(bench):
    cfg, tokens = tilemoe.get_preset("olmoe-1b-7b"), 512
    for routing in ("balanced", "skewed"):
        offsets = bench.expert_offsets(cfg, tokens, routing, seed=3)
        assert offsets.dtype == bench.torch.int32 and offsets.shape == (cfg.experts + 1,)
        assert offsets[0] == 0 and offsets[-1] == tokens * cfg.top_k and bool((offsets.diff() >= 0).all())
        assert offsets.tolist() == bench.expert_offsets(cfg, tokens, routing, seed=3).tolist()
    counts = bench.expert_offsets(cfg, tokens, "skewed", seed=3).diff()
    assert int((counts == 0).sum()) >= cfg.experts // bench.NEVER_CHOSEN
    assert int(counts.max()) > 4 * tokens * cfg.top_k / cfg.experts  # a hot expert, 4x its even share


def test_table_from_a_record(bench, capsys, tmp_path):
    rows = []
    for routing, tiled_ms in (("balanced", 1.0), ("skewed", 1.25)):
        for variant, ms in (("naive", 10.0), ("tiled", tiled_ms), ("torch loop", 2.0), ("grouped_mm", 1.6),
                            ("dense ceiling", 0.8)):
            rows.append({"preset": "small", "gemm": "up", "tokens": 4096, "routing": routing, "variant": variant,
                         "ms": ms, "tflops": 100.0 / ms, "% of ceiling": 100 * 0.8 / ms})
    rows.append({"preset": "small", "gemm": "up", "tokens": 64, "routing": "balanced", "variant": "tiled", "ms": 0.1,
                 "tflops": 1.0, "% of ceiling": 50.0})  # decode: not in the README's table
    record = {"gpu": "Some GPU", "device": "Some GPU", "torch": "2.x", "dtype": "torch.bfloat16", "commit": "0123456789",
              "command": "bench_grouped_gemm.py --record", "date": "2026-01-01T00:00:00", "rows": rows}
    path = tmp_path / "grouped_gemm-x.json"
    path.write_text(json.dumps(record))
    status, out, _ = exit_status(bench, capsys, "--table", str(path))
    assert status == 0
    assert "Some GPU, torch 2.x, bfloat16, commit 0123456, `bench_grouped_gemm.py --record`, 2026-01-01" in out
    assert "**small** (E=8, top-2; up: N=1024, K=256; down: N=256, K=512)" in out
    assert "| gemm | tokens | routing | naive | tiled | torch loop | grouped_mm | dense ceiling | tiled % of ceiling |" in out
    assert "| up | 4096 | balanced | 10 | 100 | 50 | 62.5 | 125 | 80% |" in out
    assert "| up | 4096 | skewed | 10 | 80 | 50 | 62.5 | 125 | 64% |" in out
    assert "| up | 64 |" not in out
    assert out.strip().endswith("<!-- end of generated tables -->")


def test_missing_table_file_and_bad_arguments_exit_2(bench, capsys, tmp_path):
    status, _, err = exit_status(bench, capsys, "--table", str(tmp_path / "nope.json"))
    assert status == 2 and "--table: FileNotFoundError" in err and "nope.json" in err
    status, _, err = exit_status(bench, capsys, "--preset", "gpt-9")
    assert status == 2 and "--preset: invalid choice: 'gpt-9'" in err
    status, _, err = exit_status(bench, capsys, "--tokens", "0")
    assert status == 2 and "--tokens: expected ints >= 1, got [0]" in err
    status, _, err = exit_status(bench, capsys, "--routing", "zipf")
    assert status == 2 and "--routing: invalid choice: 'zipf'" in err


def test_a_wrong_variant_fails_its_check_and_the_run(bench, capsys, monkeypatch):
    # Plant a wrong answer: the torch loop's last expert forgets its rows (they stay NaN).
    def forgetful_loop(a, w, offsets, out):
        bounds = offsets.tolist()
        for e, (start, end) in enumerate(zip(bounds[:-2], bounds[1:-1])):
            out[start:end] = a[start:end] @ w[e].t()
        return out

    monkeypatch.setattr(bench, "torch_loop", forgetful_loop)
    status, out, _ = exit_status(bench, capsys, "--tokens", "64", "--gemm", "up", "--routing", "balanced",
                                 "--variants", "torch loop")
    assert status == 1
    assert "FAIL: small up T=64 balanced torch loop: rel. error inf > 0.0001" in out  # NaN counts as failure
