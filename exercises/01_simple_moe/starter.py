"""Exercise 01 — a Mixture-of-Experts forward pass from scratch.

Read problem.md first: it has the math, the four tasks and hints. ``__init__`` is given; fill in
the three methods marked TODO, in task order:

    1. route            router logits -> softmax over experts -> top-k -> renormalized weights
    2. forward          expert assignment: which tokens (a variable number) go to each expert
    3. expert_forward   one SwiGLU expert on the tokens it received
    4. forward          output aggregation: add each expert's output, times its weight, to its tokens

Grade your work with ``python test.py`` (it grades this file). Plain PyTorch is all you need.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: F401  (you will want F.silu, F.linear, ...)
from torch import nn


class SimpleMoE(nn.Module):
    """A top-k MoE layer with SwiGLU experts: y = MoE(x) for x of shape [..., hidden_dim].

    Weights (nn.Linear's [out, in] layout, experts stacked along dim 0):
        router.weight  [E, H]       one row of scores per expert
        w_gate_up      [E, 2I, H]   rows 0..I-1: the gate projection; rows I..2I-1: the up projection
        w_down         [E, H, I]    the down projection
    with H = hidden_dim, I = ffn_dim, E = num_experts.
    """

    # Given: do not change the parameters' names or shapes, the grader reads them.
    def __init__(self, hidden_dim: int, ffn_dim: int, num_experts: int, top_k: int):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected 1 <= top_k <= num_experts = {num_experts}, got {top_k}")
        self.hidden_dim = hidden_dim
        self.ffn_dim = ffn_dim
        self.num_experts = num_experts
        self.top_k = top_k

        self.router = nn.Linear(hidden_dim, num_experts, bias=False)
        # std 1/sqrt(fan_in) keeps every projection's output at about the scale of its input.
        self.w_gate_up = nn.Parameter(torch.randn(num_experts, 2 * ffn_dim, hidden_dim) / math.sqrt(hidden_dim))
        self.w_down = nn.Parameter(torch.randn(num_experts, hidden_dim, ffn_dim) / math.sqrt(ffn_dim))
        with torch.no_grad():
            self.router.weight.normal_(0.0, 1.0 / math.sqrt(hidden_dim))

    # -- Task 1: the router ---------------------------------------------------------------------

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose top_k experts for each of T tokens.

        x: [T, H]. Returns (topk_ids [T, K] int64, topk_weights [T, K]): the chosen experts of each
        token, best first, and their weights, which sum to 1 over each token's K experts.
        """
        # TODO (task 1):
        #   - logits [T, E] = x @ router.weight^T, computed in float32 (at least): cast both first;
        #   - probabilities: softmax over the *experts* axis;
        #   - the top_k largest probabilities of each token and their expert ids;
        #   - renormalize the chosen probabilities so that they sum to 1 per token.
        raise NotImplementedError("TODO (task 1): route")

    # -- Task 3: one expert -----------------------------------------------------------------------

    def expert_forward(self, e: int, x_e: torch.Tensor) -> torch.Tensor:
        """Expert e on the n tokens routed to it: x_e [n, H] -> [n, H] (n may be 0).

        SwiGLU: down( silu(gate(x)) * up(x) ), each projection an nn.Linear-style x @ W^T.
        """
        # TODO (task 3): gate = rows 0..I-1 of w_gate_up[e], up = rows I..2I-1, down = w_down[e].
        raise NotImplementedError("TODO (task 3): expert_forward")

    # -- Tasks 2 and 4: assignment and aggregation ----------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., H] (any number of leading dims) -> y: the same shape and dtype."""
        # TODO (tasks 2 and 4):
        #   - flatten x to tokens [T, H] and route them (self.route);
        #   - task 2: for each expert e, find the tokens that chose it, and in which slot
        #     (their number varies per expert, and may be 0);
        #   - run the expert on those tokens (self.expert_forward);
        #   - task 4: add each output row, times that token's weight for e, into the token's row of y;
        #   - return y in x's shape.
        raise NotImplementedError("TODO (tasks 2 and 4): forward")
