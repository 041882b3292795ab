"""Exercise 01 — a Mixture-of-Experts forward pass from scratch: the solution.

Read problem.md first. This file is starter.py with every TODO done; it stands alone (plain
PyTorch, no tilemoe), so you can read it top to bottom as the answer to the four tasks:

    1. route            router logits -> softmax over experts -> top-k -> renormalized weights
    2. forward          expert assignment: which tokens (a variable number) go to each expert
    3. expert_forward   one SwiGLU expert on the tokens it received
    4. forward          output aggregation: add each expert's output, times its weight, to its tokens

Grade it with ``python test.py --solution``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SimpleMoE(nn.Module):
    """A top-k MoE layer with SwiGLU experts: y = MoE(x) for x of shape [..., hidden_dim].

    Weights (nn.Linear's [out, in] layout, experts stacked along dim 0):
        router.weight  [E, H]       one row of scores per expert
        w_gate_up      [E, 2I, H]   rows 0..I-1: the gate projection; rows I..2I-1: the up projection
        w_down         [E, H, I]    the down projection
    with H = hidden_dim, I = ffn_dim, E = num_experts.
    """

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
        # The logits decide which expert a token meets, so compute them in at least fp32:
        # bf16 rounding would flip choices between nearly tied experts.
        dtype = torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(x.to(dtype), self.router.weight.to(dtype))  # [T, E] = x @ W_r^T

        # A probability distribution over the E experts of each token: softmax along the expert axis.
        probs = torch.softmax(logits, dim=-1)  # [T, E]

        # The K most probable experts of each token (largest first).
        topk_probs, topk_ids = torch.topk(probs, self.top_k, dim=-1)  # [T, K] each

        # Renormalize: the K chosen probabilities sum to less than 1; dividing by their sum makes the
        # output a weighted *average* of the chosen experts, at the same scale whatever K is.
        topk_weights = topk_probs / topk_probs.sum(dim=-1, keepdim=True)
        return topk_ids, topk_weights

    # -- Task 3: one expert -----------------------------------------------------------------------

    def expert_forward(self, e: int, x_e: torch.Tensor) -> torch.Tensor:
        """Expert e on the n tokens routed to it: x_e [n, H] -> [n, H] (n may be 0).

        SwiGLU: down( silu(gate(x)) * up(x) ), each projection an nn.Linear-style x @ W^T.
        """
        gate_w = self.w_gate_up[e, : self.ffn_dim]  # [I, H]: rows 0..I-1
        up_w = self.w_gate_up[e, self.ffn_dim :]    # [I, H]: rows I..2I-1
        hidden = F.silu(x_e @ gate_w.t()) * (x_e @ up_w.t())  # [n, I]
        return hidden @ self.w_down[e].t()                     # [n, H]

    # -- Tasks 2 and 4: assignment and aggregation ----------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., H] (any number of leading dims) -> y: the same shape and dtype."""
        tokens = x.reshape(-1, self.hidden_dim)  # [T, H]: every leading dim is just more tokens
        topk_ids, topk_weights = self.route(tokens)

        y = torch.zeros_like(tokens)  # zeros, not empty: outputs are *added* into it below
        # Loop over the E experts, not the T tokens: each expert then runs one matrix product on
        # all of its tokens at once, and E is small while T can be huge.
        for e in range(self.num_experts):
            # Task 2 — assignment: the (token, slot) pairs whose choice is expert e. A token picks
            # an expert at most once, so token_idx has no repeats; its length varies per expert.
            token_idx, slot_idx = torch.where(topk_ids == e)
            if token_idx.numel() == 0:
                continue  # nobody chose expert e: it does no work

            # Task 3 — gather those tokens' rows and run the expert on them.
            out = self.expert_forward(e, tokens[token_idx])  # [n, H]

            # Task 4 — aggregation: scale by each token's weight for e, add into the tokens' rows.
            weight = topk_weights[token_idx, slot_idx].unsqueeze(1).to(out.dtype)  # [n, 1]
            y.index_add_(0, token_idx, out * weight)

        return y.reshape(x.shape)
