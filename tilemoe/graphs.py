"""The decode path: a whole MoE forward captured once in a CUDA graph, replayed per batch.

At 1 to 64 tokens an MoE forward does almost no arithmetic; what it costs is ~20 launches (router
GEMM, top-k, metadata, schedule, two grouped GEMMs, combine) and the Python that issues them.
A CUDA graph records those launches once and replays them with one call: the GPU runs the same
kernels back to back, with no CPU in between. That only works for code that never waits for the
host (no ``.item()``, no ``.tolist()``, no data-dependent shapes): the "triton", "grouped_mm" and
"cuda" backends qualify, the "torch" loop (which reads the segment bounds on the host) does not.

    moe = GraphedMoE(weights, top_k=8, backend="triton", **cfg.router_options())
    y = moe(x)        # first call per token count: warm up and capture; then: copy x in, replay

``y`` is the graph's own output buffer: the next call with the same token count overwrites it
(``y.clone()`` to keep it). The graph reads the weight tensors' memory as it was at capture:
update weights in place (``copy_``), never by binding new tensors. Inference only: no gradients
flow through a replay.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import checks
from .moe import moe_forward

CAPTURABLE = ("triton", "grouped_mm", "cuda")


def record(fn: Callable[[], object], device: torch.device, *, warmup: int = 2):
    """fn() recorded in a CUDA graph: (graph, what fn returned). graph.replay() runs the same
    kernels again, on the same memory. fn runs ``warmup`` times first, on a side stream, so that
    compilation, autotuning and first allocations stay out of the graph."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = fn()
    return graph, out


def capture(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, warmup: int = 2):
    """fn(x) recorded in a CUDA graph (``record``): (graph, static_x, static_y). Copy new inputs
    into static_x, call graph.replay(), read static_y."""
    static_x = x.clone()
    graph, static_y = record(lambda: fn(static_x), x.device, warmup=warmup)
    return graph, static_x, static_y


class GraphedMoE:
    """``moe_forward`` with fixed weights and router options, one CUDA graph per token count."""

    def __init__(self, weights: dict, top_k: int, *, backend: str = "triton", warmup: int = 2, **router_options):
        checks.check_choice("backend", backend, CAPTURABLE)
        for name in ("router_weight", "w_gate_up", "w_down"):
            if name not in weights:
                checks.fail("weights", f"a dict with {name!r}", sorted(weights), TypeError)
            if not weights[name].is_cuda:
                checks.fail(name, "a CUDA tensor (CUDA graphs need a GPU)", weights[name].device)
        self.weights, self.top_k, self.backend = weights, top_k, backend
        self.router_options, self.warmup = router_options, warmup
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return moe_forward(x, **self.weights, top_k=self.top_k, backend=self.backend, **self.router_options)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        checks.check_tensor("x", x)
        if not x.is_cuda:
            checks.fail("x", "a CUDA tensor", x.device)
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._graphs:
            self._graphs[key] = capture(self._forward, x, warmup=self.warmup)
        graph, static_x, static_y = self._graphs[key]
        static_x.copy_(x)
        graph.replay()
        return static_y

    def clear(self) -> None:
        """Drop every captured graph and the memory its pool holds."""
        self._graphs.clear()
