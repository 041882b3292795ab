"""Exercise 02 (load balancing): the grader passes the solution, fails the starter cleanly, and
rejects planted wrong solutions (each a one-snippet text mutation of solution.py).

The grader runs are subprocesses (as a learner runs them), two at a time: each takes a few
seconds, most of it the training check.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXERCISE = ROOT / "exercises" / "02_load_balancing"
GRADER = EXERCISE / "test.py"
TIMEOUT_S = 120

# name -> (exact snippet of solution.py, its replacement). Each snippet must occur exactly once.
MUTATIONS = {
    "loss without the factor E": (
        "return num_experts * (fraction * mean_prob).sum()",
        "return (fraction * mean_prob).sum()"),
    "loss with P detached (no gradient)": (
        "mean_prob = probs.mean(dim=0)",
        "mean_prob = probs.detach().mean(dim=0)"),
    "loss counts dropped slots for expert 0": (
        "flat = torch.where(flat < 0, num_experts, flat)",
        "flat = flat.clamp_min(0)"),
    "capacity with floor instead of ceil": (
        "return math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 9))",
        "return math.floor(round(capacity_factor * num_tokens * top_k / num_experts, 9))"),
    "capacity plus one (rank > cap)": (
        "dropped = (rank >= cap).view(num_tokens, top_k)",
        "dropped = (rank > cap).view(num_tokens, top_k)"),
    "drops the highest-scored slots": (
        "by_score = torch.argsort(scores.reshape(-1), descending=True, stable=True)",
        "by_score = torch.argsort(scores.reshape(-1), descending=False, stable=True)"),
    "reroute may give a token the same expert twice": (
        "if load[e] < cap and e not in held:",
        "if load[e] < cap:"),
    "reroute serves dropped slots in slot order": (
        "waiting.sort(key=lambda slot: -ranked_probs[slot[0]][slot[1]])",
        "pass"),
    "reroute does not renormalize weights": (
        "new_weights[t, ~new_dropped[t]] = p / p.sum()",
        "new_weights[t, ~new_dropped[t]] = p"),
    "gini on loads sorted descending": (
        "x = loads.detach().to(torch.float64).reshape(-1).sort().values  # ascending",
        "x = loads.detach().to(torch.float64).reshape(-1).sort(descending=True).values"),
    "CV with the sample std": (
        "return float(x.std(correction=0) / x.mean())",
        "return float(x.std() / x.mean())"),
    "update_bias with the sign flipped": (
        "return bias + gamma * torch.sign(x.mean() - x)",
        "return bias + gamma * torch.sign(x - x.mean())"),
}


def grade(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GRADER), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every grader run at once (two at a time); each test waits for its own."""
    solution = (EXERCISE / "solution.py").read_text()
    jobs = {"solution": ["--solution"], "starter": []}
    folder = tmp_path_factory.mktemp("mutants")
    for i, (name, (snippet, replacement)) in enumerate(MUTATIONS.items()):
        assert solution.count(snippet) == 1, f"mutation {name!r}: its snippet occurs {solution.count(snippet)} times in solution.py"
        path = folder / f"mutant_{i}.py"
        path.write_text(solution.replace(snippet, replacement))
        jobs[name] = ["--file", str(path)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(grade, args) for name, args in jobs.items()}
        yield futures


def result_of(runs, name):
    proc = runs[name].result()
    return proc, proc.stdout + proc.stderr


def test_solution_scores_full_marks(runs):
    proc, out = result_of(runs, "solution")
    assert proc.returncode == 0, out
    assert re.search(r"^(\d+)/\1 passed$", proc.stdout, re.M), out
    assert "FAIL" not in out and "Traceback" not in out, out


def test_starter_fails_cleanly(runs):
    proc, out = result_of(runs, "starter")
    assert proc.returncode == 1, out
    fails = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert fails and all(line.endswith("not implemented yet") for line in fails), out
    assert "PASS" not in out and "Traceback" not in out, out
    assert re.search(r"^0/\d+ passed$", proc.stdout, re.M), out


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_planted_wrong_solution_is_rejected(runs, name):
    proc, out = result_of(runs, name)
    assert proc.returncode == 1, f"the grader passed the planted bug {name!r}:\n{out}"
    assert "FAIL" in proc.stdout and "Traceback" not in out, out


def test_training_without_the_loss_stays_skewed():
    """The grader's training check runs only the condition with the learner's loss; the condition
    without it (independent of the learner) must stay above the threshold, or the check means nothing."""
    spec = importlib.util.spec_from_file_location("exercise_02_grader", GRADER)
    grader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grader)
    gini = grader.train_and_measure(None, 0.0, seed=0)
    assert gini > grader.GINI_THRESHOLD + 0.1, f"without the loss the Gini is {gini:.3f}, threshold {grader.GINI_THRESHOLD}"
