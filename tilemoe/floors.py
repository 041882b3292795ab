"""The dense-GEMM floors: an MoE layer's FLOPs as plain GEMMs, with no routing at all.

A routed layer does its arithmetic in ragged, gathered, scattered pieces; the same FLOPs as a few
large dense GEMMs (cuBLAS on a GPU) are what perfect grouped kernels approach when arithmetic bounds
them. Timed beside a layer in the same run, a floor says how much of the gap to it is left:
- ``forward_gemms``: the forward's two projections, 6*R*H*I FLOPs;
- ``training_gemms``: those two and the backward's four, 18*R*H*I FLOPs (the FLOPs of lesson 6's
  forward + backward).

R is the number of rows the experts compute: T*K token-slots for the routed experts, plus T per
shared expert. The floors multiply by one expert's worth of weights (a floor has no routing), all
operands random: what they return is of no interest, only their time.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import checks


def _operands(rows: int, hidden: int, ffn: int, device, dtype) -> dict:
    if rows < 1 or hidden < 1 or ffn < 1:
        checks.fail("rows, hidden, ffn", "ints >= 1", (rows, hidden, ffn))
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    return {"x": randn(rows, hidden), "act": randn(rows, ffn), "w_gate_up": randn(2 * ffn, hidden),
            "w_down": randn(hidden, ffn)}


def forward_gemms(rows: int, hidden: int, ffn: int, *, device, dtype: torch.dtype) -> Callable[[], object]:
    """The forward's two GEMMs: [R, H] x [H, 2I] (gate and up), then [R, I] x [I, H] (down)."""
    t = _operands(rows, hidden, ffn, device, dtype)
    return lambda: (torch.mm(t["x"], t["w_gate_up"].t()), torch.mm(t["act"], t["w_down"].t()))


def training_gemms(rows: int, hidden: int, ffn: int, *, device, dtype: torch.dtype) -> Callable[[], object]:
    """The six GEMMs of a forward + backward, in the order a training step runs them:
      pre = x W_gu^T          [R, H] x [H, 2I]       the forward's up-projection
      y   = A W_down^T        [R, I] x [I, H]        its down-projection
      g   = dY W_down         [R, H] x [H, I]        the activation's gradient
      dW_down = dY^T A        [H, R] x [R, I]
      dx  = d pre W_gu        [R, 2I] x [2I, H]
      dW_gu   = d pre^T x     [2I, R] x [R, H]
    (dY and d pre reuse the forward's y and pre buffers' shapes: random values, same FLOPs.)"""
    t = _operands(rows, hidden, ffn, device, dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    dy = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
    d_pre = torch.randn(rows, 2 * ffn, generator=gen, device=device).to(dtype)
    x, act, w_gate_up, w_down = t["x"], t["act"], t["w_gate_up"], t["w_down"]

    def step():
        return (torch.mm(x, w_gate_up.t()), torch.mm(act, w_down.t()), torch.mm(dy, w_down),
                torch.mm(dy.t(), act), torch.mm(d_pre, w_gate_up), torch.mm(d_pre.t(), x))

    return step
