"""benchmarks/bench_io_overlap.py: it reads lesson 3's program's table right, fails a run whose
check fails, and makes the README's table from a recorded file. The program itself runs on a GPU
(tools/gpu_check.sh); here a planted stand-in prints its tables."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_io_overlap as bio  # noqa: E402

TABLE = """rung kernel                                             ms   TFLOP/s   removed (ms)  check
a    load, then compute (1 stage, mma.sync)         0.6595     208.4              -  PASS
b    double buffering (2 cp.async stages)           0.4447     309.1         0.2148  {b_check}
b4   4 cp.async stages (lesson 2's tiled)           0.4458     308.3        -0.0011  PASS
c    TMA ring + wgmma (4 stages)                         -         -              -  skipped: needs an sm_90a build
"""


def fake_program(tmp_path: Path, b_check: str) -> Path:
    """A stand-in for io_overlap that prints a check line (which must not parse) and the table."""
    path = tmp_path / "io_overlap"
    text = "a   load, then compute (1 stage, mma.sync): check: all 8 outputs match the fp32 reference\n\n"
    text += TABLE.format(b_check=b_check)
    path.write_text(f"#!{sys.executable}\nimport sys\nprint({text!r})\nsys.exit({int(b_check == 'FAIL')})\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_parse_reads_every_rung_and_skips_check_lines():
    rows = bio.parse("a   x: check: all 8 outputs match\n" + TABLE.format(b_check="PASS"))
    assert [r["rung"] for r in rows] == ["a", "b", "b4", "c"]
    assert rows[0] == {"rung": "a", "kernel": "load, then compute (1 stage, mma.sync)", "ms": 0.6595,
                       "tflops": 208.4, "removed_ms": None, "check": "PASS"}
    assert rows[2]["removed_ms"] == -0.0011 and rows[2]["kernel"] == "4 cp.async stages (lesson 2's tiled)"
    assert rows[3]["ms"] is None and rows[3]["check"] == "skipped: needs an sm_90a build"


@pytest.mark.parametrize("b_check, code", [("PASS", 0), ("FAIL", 1)])
def test_a_failed_rung_fails_the_run(tmp_path, monkeypatch, capsys, b_check, code):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    program = fake_program(tmp_path, b_check)
    assert bio.main(["--preset", "small", "--gemm", "up", "--program", str(program)]) == code
    out = capsys.readouterr().out
    assert "--experts 8 --tokens 32768 --n 1024 --k 256" in out  # small: E=8, top-2, I=512, H=256


def test_without_gpu_or_program_it_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bio.main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bio.main(["--program", str(tmp_path / "missing")]) == 0
    assert "is not built" in capsys.readouterr().out


def test_table_from_a_recorded_file(tmp_path):
    rows = [{"preset": "olmoe-1b-7b", "gemm": "up", "tokens": 16384, "rows": 131072, "experts": 64, "N": 2048,
             "K": 2048, "exit_code": 0, **r} for r in bio.parse(TABLE.format(b_check="PASS"))]
    path = tmp_path / "io_overlap-2026-11-23.json"
    path.write_text(json.dumps({"gpu": "NVIDIA H200", "device": "cuda", "commit": "abcdef1234", "command": "x",
                                "date": "2026-11-23T00:00:00", "rows": rows}))
    md = bio.table_markdown([path])
    assert "**olmoe-1b-7b up** (16384 tokens: M=131072, E=64, N=2048, K=2048)" in md
    assert "| b | double buffering (2 cp.async stages) | 0.445 | 309 | +0.215 | PASS |" in md
    assert "| c | TMA ring + wgmma (4 stages) | - | - | - | skipped: needs an sm_90a build |" in md
