"""Exercise 02 (load balancing): the grader passes the solution, fails the starter cleanly, and rejects
planted wrong solutions (tests/grader_runs.py runs them), so every grade it gives means something."""

from __future__ import annotations

import importlib.util

import pytest

import grader_runs

EXERCISE = "02_load_balancing"

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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return grader_runs.run_all(EXERCISE, MUTATIONS, tmp_path_factory.mktemp("mutations"))


def test_help(runs):
    grader_runs.check_help(runs["help"])


def test_solution_scores_full_marks(runs):
    grader_runs.check_full_marks(runs["solution"], at_least=7)


def test_starter_fails_cleanly(runs):
    grader_runs.check_starter_fails_cleanly(runs["starter"])


@pytest.mark.parametrize("name", MUTATIONS)
def test_planted_wrong_solution_is_rejected(runs, name):
    grader_runs.check_rejected(runs[name], name, MUTATIONS[name])


def test_training_without_the_loss_stays_skewed():
    """The grader's training check runs only the condition with the learner's loss; the condition
    without it (independent of the learner) must stay above the threshold, or the check means nothing."""
    spec = importlib.util.spec_from_file_location("exercise_02_grader", grader_runs.ROOT / "exercises" / EXERCISE / "test.py")
    grader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grader)
    gini = grader.train_and_measure(None, 0.0, seed=0)
    assert gini > grader.GINI_THRESHOLD + 0.1, f"without the loss the Gini is {gini:.3f}, threshold {grader.GINI_THRESHOLD}"
