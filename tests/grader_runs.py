"""Grading the graders: run an exercise's test.py as a learner does, on its solution, its starter
and planted wrong solutions, and check what it reports.

A planted wrong solution is a text mutation of solution.py: name -> (exact snippet, replacement)
or (snippet, replacement, the check that must FAIL). A snippet must occur exactly once, so a
mutation can never silently fail to apply. Grader runs are subprocesses (about 2 s each, mostly
importing torch), started together a few at a time by run_all.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


def grade(exercise: str, *args: str) -> subprocess.CompletedProcess:
    grader = ROOT / "exercises" / exercise / "test.py"
    return subprocess.run([sys.executable, str(grader), *args], cwd=ROOT, capture_output=True, text=True,
                          encoding="utf-8", timeout=TIMEOUT_S)


def run_all(exercise: str, mutations: dict, folder: Path) -> dict[str, subprocess.CompletedProcess]:
    """Grader runs keyed "help", "solution", "starter" and each mutation's name."""
    solution = (ROOT / "exercises" / exercise / "solution.py").read_text(encoding="utf-8")
    jobs = {"help": ("--help",), "solution": ("--solution",), "starter": ()}
    for name, (snippet, replacement, *_) in mutations.items():
        count = solution.count(snippet)
        assert count == 1, f"mutation {name}: its snippet occurs {count} times in solution.py, expected once: {snippet!r}"
        path = folder / f"{name}.py"
        path.write_text(solution.replace(snippet, replacement), encoding="utf-8")
        jobs[name] = ("--file", str(path))
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        futures = {name: pool.submit(grade, exercise, *args) for name, args in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def report(result: subprocess.CompletedProcess) -> str:
    return f"exit status {result.returncode}\n--- stdout\n{result.stdout}--- stderr\n{result.stderr}"


def check_help(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, report(result)
    for option in ("--solution", "--file"):
        assert option in result.stdout, report(result)


def check_full_marks(result: subprocess.CompletedProcess, at_least: int) -> None:
    assert result.returncode == 0, report(result)
    score = re.search(r"^(\d+)/(\d+) passed$", result.stdout, re.MULTILINE)
    assert score, report(result)
    passed, total = int(score[1]), int(score[2])
    assert passed == total >= at_least, report(result)
    assert "FAIL" not in result.stdout and "Traceback" not in result.stderr, report(result)
    assert len(re.findall(r"^PASS  ", result.stdout, re.MULTILINE)) == total, report(result)


def check_starter_fails_cleanly(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 1, report(result)
    assert "Traceback" not in result.stdout + result.stderr, report(result)
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert fails and all(line.endswith(": not implemented yet") for line in fails), report(result)
    assert re.search(rf"^0/{len(fails)} passed$", result.stdout, re.MULTILINE), report(result)


def check_rejected(result: subprocess.CompletedProcess, name: str, mutation: tuple) -> None:
    assert result.returncode == 1, f"the grader passed the planted bug {name!r}\n" + report(result)
    assert "Traceback" not in result.stdout + result.stderr, report(result)
    assert re.search(r"^FAIL  ", result.stdout, re.MULTILINE), report(result)
    if len(mutation) > 2:
        assert re.search(rf"^FAIL  {mutation[2]}: ", result.stdout, re.MULTILINE), \
            f"mutation {name}: expected the check '{mutation[2]}' to fail\n" + report(result)
