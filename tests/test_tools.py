"""The profiling tools under tools/ run on a CPU (their GPU numbers come from a GPU machine)."""

from __future__ import annotations

import runpy
import sys

import pytest


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


def test_profile_kernels_names_a_backend_that_cannot_run(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["profile_kernels.py", "--backend", "grouped_mm", "--preset", "small",
                                      "--tokens", "4", "--calls", "1"])
    import tilemoe

    monkeypatch.setattr(tilemoe.backends.grouped_mm, "grouped_mm_op", None)
    with pytest.raises(SystemExit) as done:
        runpy.run_path("tools/profile_kernels.py", run_name="__main__")
    assert done.value.code == 2
    assert "--backend grouped_mm: torch" in capsys.readouterr().err
