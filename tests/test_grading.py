"""tilemoe.grading: the harness every exercise grader runs on."""

from __future__ import annotations

import math

import pytest
import torch

from tilemoe import grading


def check_double(m):
    assert m.double(3) == 6, f"double(3): expected 6, got {m.double(3)}"


def check_tensor(m):
    grading.assert_close(m.ones(), torch.ones(3), rtol=0, atol=0, what="ones()")


SUBMISSIONS = {
    "right": "import torch\ndef double(x): return 2 * x\ndef ones(): return torch.ones(3)\n",
    "stub": "def double(x): raise NotImplementedError('TODO')\ndef ones(): raise NotImplementedError\n",
    "wrong": "import torch\ndef double(x): return x + 2.5\ndef ones(): return torch.ones(3)\n",
    "crash": "def double(x): return [][1]\ndef ones(): return None\n",
    "syntax": "def double(x) return 2\n",
}


@pytest.mark.parametrize("kind, status, lines", [
    ("right", 0, ["PASS  double", "PASS  tensor", "2/2 passed"]),
    ("stub", 1, ["FAIL  double: not implemented yet", "FAIL  tensor: not implemented yet", "0/2 passed"]),
    ("wrong", 1, ["FAIL  double: double(3): expected 6, got 5.5", "PASS  tensor", "1/2 passed"]),
    ("crash", 1, ["FAIL  double: raised IndexError: list index out of range", "FAIL  tensor: ones(): expected a torch.Tensor, got NoneType"]),
    ("syntax", 1, ["FAIL  import: SyntaxError", "0/2 passed"]),
])
def test_report_lines_and_exit_status(tmp_path, capsys, kind, status, lines):
    path = tmp_path / f"{kind}.py"
    path.write_text(SUBMISSIONS[kind])
    assert grading.main([check_double, check_tensor], str(tmp_path / "test.py"), ["--file", str(path)]) == status
    out = capsys.readouterr().out
    for line in lines:
        assert line in out, out
    assert "Traceback" not in out


def test_default_grades_the_starter_beside_the_grader(tmp_path, capsys):
    (tmp_path / "starter.py").write_text(SUBMISSIONS["stub"])
    (tmp_path / "solution.py").write_text(SUBMISSIONS["right"])
    assert grading.main([check_double], str(tmp_path / "test.py"), []) == 1
    assert grading.main([check_double], str(tmp_path / "test.py"), ["--solution"]) == 0
    assert "solution.py" in capsys.readouterr().out


@pytest.mark.parametrize("actual, message", [
    (torch.tensor([1.0, float("nan"), 3.0]), r"x: expected finite values, got nan at index \[1\]"),
    (torch.tensor([1.0, 2.0]), r"x: expected shape \[3\], got \[2\]"),
    (torch.tensor([1.0, 2.0, 3.5]), r"x: expected 3 at index \[2\], got 3.5 \(1 of 3 elements off"),
    ([1.0, 2.0, 3.0], r"x: expected a torch.Tensor, got list"),
])
def test_assert_close_checks_every_element(actual, message):
    with pytest.raises(AssertionError, match=message):
        grading.assert_close(actual, torch.tensor([1.0, 2.0, 3.0]), rtol=1e-3, atol=1e-3, what="x")


def test_assert_close_passes_within_tolerance():
    grading.assert_close(torch.tensor([1.0, math.pi]), torch.tensor([1.0005, math.pi]), rtol=1e-3, atol=0, what="x")


def test_a_crash_points_into_the_submission(tmp_path, capsys):
    path = tmp_path / "crash.py"
    path.write_text("import torch\ndef double(x):\n    return torch.ones(2) @ torch.ones(3)\n")
    assert grading.main([check_double], str(tmp_path / "test.py"), ["--file", str(path)]) == 1
    assert "(crash.py:3)" in capsys.readouterr().out
