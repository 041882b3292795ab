"""Ways of running the experts. Each backend module provides

    NAME: str
    unavailable_reason(device, dtype, hidden, ffn) -> str | None   (None: it can run these inputs)
    experts(x [T, H], routing, w_gate_up, w_down) -> y [T, H]       (the routed experts, combined)
    FUSED_ROUTING: bool (optional)  moe_forward routes with route(..., fused=True) for it
    FAST_BACKWARD: bool (optional, default True)  False: "auto" passes it over when gradients are needed

All consume the same ``tilemoe.routing.Routing``; none recomputes it.
"""

from __future__ import annotations

import torch

from .. import checks
from . import cuda_grouped, grouped_mm, sonic, torch_loop, triton_fused

BACKENDS = {m.NAME: m for m in (torch_loop, grouped_mm, triton_fused, cuda_grouped, sonic)}

# Fastest first: what backend="auto" tries, per device type.
AUTO_ORDER = {"cuda": ("triton", "grouped_mm", "cuda", "sonicmoe", "torch"), "cpu": ("torch", "grouped_mm", "triton")}


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype, hidden: int, ffn: int) -> str | None:
    return BACKENDS[name].unavailable_reason(device, dtype, hidden, ffn)


def available_backends(device: torch.device, dtype: torch.dtype, hidden: int, ffn: int) -> list[str]:
    """Names of the backends that can run these inputs, fastest first."""
    order = AUTO_ORDER.get(device.type, ("torch",))
    names = list(order) + [n for n in BACKENDS if n not in order]
    return [n for n in names if unavailable_reason(n, device, dtype, hidden, ffn) is None]


def resolve(name: str, device: torch.device, dtype: torch.dtype, hidden: int, ffn: int, *, needs_grad: bool = False):
    """The backend module for ``name``; ValueError says why not. "auto" = the fastest available, and
    when gradients are needed the fastest whose backward is its own (FAST_BACKWARD)."""
    checks.check_choice("backend", name, ("auto", *BACKENDS))
    if name == "auto":
        names = available_backends(device, dtype, hidden, ffn)  # "torch" runs anywhere
        if needs_grad:
            names = [n for n in names if getattr(BACKENDS[n], "FAST_BACKWARD", True)] or names
        name = names[0]
    reason = unavailable_reason(name, device, dtype, hidden, ffn)
    if reason is not None:
        checks.fail("backend", f"a backend that runs {dtype} on {device.type}", f"{name!r}, which cannot: {reason}")
    return BACKENDS[name]
