"""Exercise 03 (tile-aware token rounding): the grader passes the solution, fails the starter
cleanly, and rejects planted wrong solutions, so every grade it gives means something.

Each grader run is a subprocess (about 2 s, most of it importing torch). They are started all at
once by one module-scoped fixture, a few at a time, so the file costs a few grader runs of wall time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXERCISE = ROOT / "exercises" / "03_token_rounding"
GRADER = EXERCISE / "test.py"
SOLUTION = EXERCISE / "solution.py"

# Planted wrong solutions: name -> (exact snippet of solution.py, its replacement, a check that must FAIL).
MUTATIONS = {
    "down_rounds_up": (
        'if mode == "down":\n        return down',
        'if mode == "down":\n        return (counts + tile - 1) // tile * tile',
        "round assignment down",
    ),
    "nearest_half_rounds_down": (
        "torch.where(2 * remainder >= tile, up, down)",
        "torch.where(2 * remainder > tile, up, down)",
        "round counts match tilemoe",
    ),
    "up_not_capped_at_T": (
        "torch.clamp((counts + tile - 1) // tile * tile, max=num_tokens)",
        "(counts + tile - 1) // tile * tile",
        "round counts by hand",
    ),
    "unselected_ranked_first": (
        "by_flag = torch.argsort(flags_in_score_order, dim=0, descending=True, stable=True)",
        "by_flag = torch.argsort(flags_in_score_order, dim=0, descending=False, stable=True)",
        "round assignment nearest",
    ),
    "ascending_score": (
        "by_score = torch.argsort(scores, dim=0, descending=True, stable=True)",
        "by_score = torch.argsort(scores, dim=0, descending=False, stable=True)",
        "round assignment down",
    ),
    "ties_to_higher_token": (
        "by_score = torch.argsort(scores, dim=0, descending=True, stable=True)",
        "by_score = num_tokens - 1 - torch.argsort(scores.flip(0), dim=0, descending=True, stable=True)",
        "round assignment down",
    ),
    "keeps_one_too_many": (
        "return rank < target.unsqueeze(0)",
        "return rank <= target.unsqueeze(0)",
        "rounding fills whole tiles",
    ),
    "no_renormalization": (
        "return kept / torch.where(total > 0, total, torch.ones_like(total))",
        "return kept",
        "rounded weights match tilemoe",
    ),
    "zero_over_zero": (
        "return kept / torch.where(total > 0, total, torch.ones_like(total))",
        "return kept / total",
        "rounded weights by hand",
    ),
}

TIMEOUT_S = 120


def grade(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GRADER), *args], cwd=ROOT, capture_output=True, text=True,
                          encoding="utf-8", timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every grader run this file needs, keyed by name, run concurrently."""
    solution = SOLUTION.read_text(encoding="utf-8")
    folder = tmp_path_factory.mktemp("mutations")
    jobs = {"help": ("--help",), "solution": ("--solution",), "starter": ()}
    for name, (snippet, replacement, _) in MUTATIONS.items():
        count = solution.count(snippet)
        assert count == 1, f"mutation {name}: its snippet occurs {count} times in solution.py, expected once: {snippet!r}"
        path = folder / f"{name}.py"
        path.write_text(solution.replace(snippet, replacement), encoding="utf-8")
        jobs[name] = ("--file", str(path))
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        futures = {name: pool.submit(grade, *args) for name, args in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def report(result: subprocess.CompletedProcess) -> str:
    return f"exit status {result.returncode}\n--- stdout\n{result.stdout}--- stderr\n{result.stderr}"


def test_help(runs):
    result = runs["help"]
    assert result.returncode == 0, report(result)
    for option in ("--solution", "--file"):
        assert option in result.stdout, report(result)


def test_solution_scores_full_marks(runs):
    result = runs["solution"]
    assert result.returncode == 0, report(result)
    score = re.search(r"^(\d+)/(\d+) passed$", result.stdout, re.MULTILINE)
    assert score, report(result)
    passed, total = int(score[1]), int(score[2])
    assert passed == total >= 6, report(result)
    assert "FAIL" not in result.stdout, report(result)
    assert len(re.findall(r"^PASS  ", result.stdout, re.MULTILINE)) == total, report(result)


def test_starter_fails_cleanly(runs):
    result = runs["starter"]
    assert result.returncode == 1, report(result)
    assert "Traceback" not in result.stdout + result.stderr, report(result)
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert fails, report(result)
    assert all(line.endswith(": not implemented yet") for line in fails), report(result)
    assert re.search(rf"^0/{len(fails)} passed$", result.stdout, re.MULTILINE), report(result)


@pytest.mark.parametrize("name", MUTATIONS)
def test_planted_mutation_is_rejected(runs, name):
    result = runs[name]
    assert result.returncode == 1, report(result)
    assert "Traceback" not in result.stdout + result.stderr, report(result)
    assert re.search(r"^FAIL  ", result.stdout, re.MULTILINE), report(result)
    check = MUTATIONS[name][2]
    assert re.search(rf"^FAIL  {check}: ", result.stdout, re.MULTILINE), \
        f"mutation {name}: expected the check '{check}' to fail\n" + report(result)
