"""Exercise 01 (a simple MoE from scratch): the grader passes the solution, fails the starter cleanly, and rejects
planted wrong solutions (tests/grader_runs.py runs them), so every grade it gives means something."""

from __future__ import annotations

import pytest

import grader_runs

EXERCISE = "01_simple_moe"

# Planted wrong solutions: name -> (exact snippet of solution.py, its replacement, a check that must FAIL).
MUTATIONS = {
    "no_renormalization": (
        "topk_weights = topk_probs / topk_probs.sum(dim=-1, keepdim=True)",
        "topk_weights = topk_probs",
        "weights sum to one",
    ),
    "softmax_over_tokens": (
        "probs = torch.softmax(logits, dim=-1)",
        "probs = torch.softmax(logits, dim=0)",
        "tokens are independent",
    ),
    "routing_weights_ignored": (
        "y.index_add_(0, token_idx, out * weight)",
        "y.index_add_(0, token_idx, out)",
        "matches reference",
    ),
    "gate_and_up_swapped": (
        "hidden = F.silu(x_e @ gate_w.t()) * (x_e @ up_w.t())",
        "hidden = F.silu(x_e @ up_w.t()) * (x_e @ gate_w.t())",
        "matches reference",
    ),
    "top_k_smallest": (
        "torch.topk(probs, self.top_k, dim=-1)",
        "torch.topk(probs, self.top_k, dim=-1, largest=False)",
        "unchosen experts do not contribute",
    ),
    "routing_weights_detached": (
        "return topk_ids, topk_weights",
        "return topk_ids, topk_weights.detach()",
        "gradients match reference",
    ),
    "output_buffer_uninitialized": (
        "y = torch.zeros_like(tokens)",
        "y = torch.empty_like(tokens)",
        "output is finite",
    ),
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
