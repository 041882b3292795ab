"""The profiling tools under tools/ run on a CPU (their GPU numbers come from a GPU machine)."""

from __future__ import annotations

import json
import runpy
import sys

import pytest
import torch


@pytest.mark.parametrize("tool, args", [
    ("profile_kernels.py", ["--preset", "small", "--tokens", "8", "--backend", "torch", "--calls", "1"]),
    ("profile_kernels.py", ["--preset", "small", "--tokens", "8", "--backend", "torch", "--calls", "1", "--train"]),
    ("profile_host.py", ["--preset", "small", "--tokens", "8", "--backend", "torch", "--calls", "2", "--top", "3"]),
])
def test_profiling_tools_run_and_print_their_table(tool, args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [tool, *args])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(f"tools/{tool}", run_name="__main__")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "small, T=8, backend torch" in out or "forwards of small, T=8, backend torch" in out
    if "--train" in args:  # the backward's operators are in the profile
        assert "per training step" in out and "Backward" in out


def run_profile_kernels(args, monkeypatch) -> int:
    """profile_kernels.py's exit status on this CPU (a GPU, when there is one, is hidden from it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["profile_kernels.py", *args])
    with pytest.raises(SystemExit) as done:
        runpy.run_path("tools/profile_kernels.py", run_name="__main__")
    return done.value.code


def test_profile_kernels_names_a_backend_that_cannot_run(capsys, monkeypatch):
    import tilemoe

    monkeypatch.setattr(tilemoe.backends.grouped_mm, "grouped_mm_op", None)
    args = ["--backend", "grouped_mm", "--preset", "small", "--tokens", "4", "--calls", "1"]
    assert run_profile_kernels(args, monkeypatch) == 2
    assert "--backend grouped_mm: torch" in capsys.readouterr().err


def test_profile_kernels_records_its_table(tmp_path, monkeypatch, capsys):
    args = ["--preset", "small", "--tokens", "8", "--backend", "torch", "--calls", "2", "--record", "--out", str(tmp_path)]
    assert run_profile_kernels(args, monkeypatch) == 0
    (path,) = tmp_path.glob("profile_kernels-*.json")
    run = json.loads(path.read_text())
    assert (run["preset"], run["tokens"], run["backend"], run["what"], run["calls"]) == ("small", 8, "torch", "forward", 2)
    assert run["command"].startswith("profile_kernels.py --preset small")
    times = [r["us_per_call"] for r in run["rows"]]
    assert times == sorted(times, reverse=True) and times[0] > 0
    assert sum(r["percent"] for r in run["rows"]) == pytest.approx(100.0)
    assert any(r["kernel"] == "aten::matmul" for r in run["rows"])
    assert f"recorded: {path}" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--out", "somewhere"], "--out: only with --record"),
    (["--module", "--backend", "torch"], "--module: SonicMoE's module runs its own kernels, not --backend torch"),
    (["--module"], "--module: "),
])
def test_profile_kernels_refuses_what_cannot_run(args, message, monkeypatch, capsys):
    if args == ["--module"]:  # the module needs a GPU (and Python >= 3.12, and sonicmoe)
        from tilemoe.backends import sonic

        monkeypatch.setattr(sonic, "_python_reason", lambda: None)
    assert run_profile_kernels(["--preset", "small", "--tokens", "4", *args], monkeypatch) == 2
    err = capsys.readouterr().err
    assert message in err
    if args == ["--module"]:
        assert "SonicMoE runs on NVIDIA GPUs (CUDA), not on cpu" in err


def test_profile_kernels_timeline_lists_one_call_in_launch_order(monkeypatch, capsys, tmp_path):
    args = ["--preset", "small", "--tokens", "8", "--backend", "torch", "--calls", "2", "--timeline",
            "--record", "--out", str(tmp_path)]
    assert run_profile_kernels(args, monkeypatch) == 0
    assert "launches in order" in capsys.readouterr().out
    (path,) = tmp_path.glob("profile_kernels-*.json")
    run = json.loads(path.read_text())
    assert run["view"] == "timeline"
    assert [r["position"] for r in run["rows"]] == list(range(1, len(run["rows"]) + 1))
    kernels = [r["kernel"] for r in run["rows"]]
    # In the order they ran: the reshape of x, the router's cast of x to fp32 (an inference
    # forward's logits take no autograd node), its GEMM.
    assert kernels[:2] == ["aten::reshape", "aten::to"] and kernels.index("aten::matmul") > 1, kernels[:6]
    assert sum(r["percent"] for r in run["rows"]) == pytest.approx(100.0)


def test_timeline_rows_refuses_calls_that_differ():
    profile_kernels = runpy.run_path("tools/profile_kernels.py")
    same = [(0, "a", 1.0), (1, "b", 3.0), (2, "a", 3.0), (3, "b", 1.0)]
    assert profile_kernels["timeline_rows"](same, 2, 8.0) == [
        {"position": 1, "kernel": "a", "us": 2.0, "percent": 50.0},
        {"position": 2, "kernel": "b", "us": 2.0, "percent": 50.0}]
    assert profile_kernels["timeline_rows"](same[:3], 2, 5.0) is None
    assert profile_kernels["timeline_rows"]([*same[:2], (2, "b", 1.0), (3, "a", 1.0)], 2, 6.0) is None
