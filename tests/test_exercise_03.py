"""Exercise 03 (token rounding): the grader passes the solution, fails the starter cleanly, and rejects
planted wrong solutions (tests/grader_runs.py runs them), so every grade it gives means something."""

from __future__ import annotations

import pytest

import grader_runs

EXERCISE = "03_token_rounding"

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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return grader_runs.run_all(EXERCISE, MUTATIONS, tmp_path_factory.mktemp("mutations"))


def test_help(runs):
    grader_runs.check_help(runs["help"])


def test_solution_scores_full_marks(runs):
    grader_runs.check_full_marks(runs["solution"], at_least=6)


def test_starter_fails_cleanly(runs):
    grader_runs.check_starter_fails_cleanly(runs["starter"])


@pytest.mark.parametrize("name", MUTATIONS)
def test_planted_wrong_solution_is_rejected(runs, name):
    grader_runs.check_rejected(runs[name], name, MUTATIONS[name])
