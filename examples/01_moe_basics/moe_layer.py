"""
A Mixture-of-Experts layer, end to end
======================================

In this lesson you will learn:

* what an MoE layer is made of: a router (one linear map to E expert scores), E SwiGLU experts
  stored as two stacked weight tensors, and an optional shared expert every token meets;
* how a forward runs through ``tilemoe``: ``router_logits`` -> ``route`` -> ``moe_forward``,
  with the routing decision made once and handed to whichever backend runs the experts;
* why the work is irregular: every expert receives a different, data-dependent number of
  tokens, which the per-expert load chart makes visible;
* how to time every backend the device offers and check each one against the reference.

Run it (CPU, a few seconds)::

    .venv/bin/python examples/01_moe_basics/moe_layer.py
    .venv/bin/python examples/01_moe_basics/moe_layer.py --tokens 1 --dtype float64

Real sizes, on a GPU (bfloat16 by default there)::

    .venv/bin/python examples/01_moe_basics/moe_layer.py --preset olmoe-1b-7b --tokens 4096
    .venv/bin/python examples/01_moe_basics/moe_layer.py --preset deepseek-v3 --tokens 4096

What it prints: the model configuration, the output's shape, the per-expert load as a text bar
chart with its load statistics, and one row per backend: median time, TFLOP/s, speedup over the
``torch`` loop and the relative error against ``tilemoe.reference_moe`` (PASS/FAIL at the dtype's
tolerance). It exits with status 1 if any backend fails its tolerance.
"""

from __future__ import annotations

import argparse
import sys

import torch
from tabulate import tabulate
from torch import nn

import tilemoe
from tilemoe import bench

# The reference loops over experts in fp32; on a handful of tokens that stays cheap at any size.
CHECK_TOKENS = 256


# %%
# The layer
# ---------
# The router is an ordinary nn.Linear, kept in fp32 whatever the experts' dtype: its logits decide
# which expert a token meets, and bf16 rounding would flip near-tied choices. The experts are not
# E separate nn.Linear pairs but two stacked tensors, so that a grouped GEMM can take all experts
# in one launch: w_gate_up [E, 2I, H] (gate rows first, then up) and w_down [E, H, I].

class MoELayer(nn.Module):
    """y = MoE(x) for x [..., H]: route every token to top_k of E experts, run them with ``backend``.

    Weights come from ``cfg.init_weights`` (the preset's shapes, seeded). ``last_routing`` holds
    the routing decision of the last forward.
    """

    def __init__(self, cfg: tilemoe.MoEConfig, *, backend: str = "auto", device="cpu",
                 dtype=torch.float32, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        w = cfg.init_weights(device=device, dtype=dtype, seed=seed)
        self.router = nn.Linear(cfg.hidden, cfg.experts, bias=False, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.router.weight.copy_(w["router_weight"])
        self.w_gate_up = nn.Parameter(w["w_gate_up"])
        self.w_down = nn.Parameter(w["w_down"])
        # DeepSeek-V3's shared expert sees every token, unweighted, beside the routed ones.
        self.shared_gate_up = nn.Parameter(w["shared_gate_up"]) if cfg.shared_experts else None
        self.shared_down = nn.Parameter(w["shared_down"]) if cfg.shared_experts else None
        self.last_routing: tilemoe.Routing | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, self.cfg.hidden)
        logits = tilemoe.router_logits(tokens, self.router.weight)
        # Route once; the backend consumes this decision and never recomputes it. Keeping it lets
        # the caller inspect the loads and lets the reference replay the very same choices.
        self.last_routing = tilemoe.route(logits, self.cfg.top_k, **self.cfg.router_options())
        return tilemoe.moe_forward(
            x, self.router.weight, self.w_gate_up, self.w_down, self.cfg.top_k,
            routing=self.last_routing, backend=self.backend,
            shared_gate_up=self.shared_gate_up, shared_down=self.shared_down,
        )


# %%
# Text bar chart of per-expert loads
# ----------------------------------
# Each bar is one expert's token count. The tile column is what a grouped GEMM with 128-row tiles
# actually runs for that expert: 142 tokens cost two tiles, 256 rows of work for 142 real ones.

def load_bars(loads: list[int], *, width: int = 40, tile: int = 128, max_lines: int = 16) -> str:
    """One line per expert; with more than max_lines experts, the most and least loaded only."""
    mean = sum(loads) / len(loads)
    peak = max(max(loads), 1)
    experts = list(range(len(loads)))
    if len(loads) > max_lines:
        by_load = sorted(experts, key=lambda e: (-loads[e], e))
        experts = by_load[: max_lines // 2] + [None] + by_load[-(max_lines // 2):]
    lines = []
    for e in experts:
        if e is None:
            lines.append(f"  ... {len(loads) - max_lines} experts in between ...")
            continue
        n = loads[e]
        bar = "█" * round(width * n / peak)
        tiles = -(-n // tile)
        lines.append(f"{e:>5} │{bar:<{width}}│ {n:>6}  {n / mean:5.2f}x mean  {tiles:>3} tile{'s' * (tiles != 1)}")
    return "\n".join(lines)


# %%
# Every backend, timed and checked
# --------------------------------
# Timing runs the whole layer on the full batch. The check runs the first few tokens through the
# same layer and replays the layer's own routing through the reference, so a mismatch can only
# come from the experts, never from a different top-k choice; and the reference stays cheap at
# real sizes.

def compare_backends(layer: MoELayer, x: torch.Tensor) -> tuple[list[list], bool]:
    cfg, device, dtype = layer.cfg, x.device, x.dtype
    check_x = x[:CHECK_TOKENS]
    flops = cfg.flops(x.shape[0], include_shared=True)
    rows, all_ok = [], True
    names = tilemoe.available_backends(device, dtype, cfg.hidden, cfg.ffn)
    for name in sorted(names, key=lambda n: n != "torch"):  # the baseline first
        layer.backend = name
        ms = bench.time_ms(lambda: layer(x), device=device)
        out = layer(check_x)
        ref = tilemoe.reference_moe(
            check_x, layer.router.weight, layer.w_gate_up, layer.w_down, cfg.top_k,
            shared_gate_up=layer.shared_gate_up, shared_down=layer.shared_down,
            routing=layer.last_routing,
        )
        err = tilemoe.rel_error(out, ref)
        ok = err <= tilemoe.TOLERANCE[dtype]
        all_ok &= ok
        speedup = rows[0][1] / ms if rows else 1.0
        rows.append([name, ms, bench.tflops(flops, ms), f"{speedup:.2f}x", err, "PASS" if ok else "FAIL"])
    return rows, all_ok


# %%
# Run it
# ------

def main(argv=None) -> int:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        description="An MoE layer built on tilemoe: its config, per-expert load, and every backend timed and checked.")
    parser.add_argument("--preset", default="small", choices=sorted(tilemoe.PRESETS),
                        help="model shape (default: small, which runs in seconds on a CPU)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens in the batch (default: 512)")
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu",
                        help="cpu or cuda (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"),
                        help="dtype of the experts and activations (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the inputs (default: 0)")
    parser.add_argument("--record", action="store_true",
                        help="write the backend rows with their provenance to benchmarks/results/<device>/")
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error(f"--tokens: expected an int >= 1, got {args.tokens}")

    device = torch.device(args.device)
    if device.type == "cuda" and not on_gpu:
        parser.error("--device cuda: this PyTorch sees no CUDA GPU")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    cfg = tilemoe.get_preset(args.preset)
    layer = MoELayer(cfg, device=device, dtype=dtype, seed=args.seed)
    x = torch.randn(args.tokens, cfg.hidden, generator=torch.Generator().manual_seed(args.seed + 1)).to(device, dtype)

    print(f"Device: {bench.device_name(device)}, dtype: {str(dtype).removeprefix('torch.')}\n")
    config = [(k, v) for k, v in cfg.as_dict().items() if k != "name"]
    print(tabulate([*config, ("expert weights", f"{cfg.weight_bytes(dtype) / 2**30:.3f} GiB")],
                   headers=["preset", args.preset], missingval="-"))

    with torch.inference_mode():
        y = layer(x)
        print(f"\nx {list(x.shape)} -> y {list(y.shape)}, {str(y.dtype).removeprefix('torch.')}")

        loads = layer.last_routing.counts.tolist()
        print(f"\nTokens per expert: {args.tokens} tokens x top-{cfg.top_k} = {sum(loads)} slots over "
              f"{cfg.experts} experts, {sum(loads) / cfg.experts:.1f} each if balanced")
        print(load_bars(loads))
        print()
        print(tabulate([tilemoe.load_stats(loads).as_row()], headers="keys", floatfmt=".3f"))

        rows, all_ok = compare_backends(layer, x)
    print(f"\nBackends: median time of the layer on {args.tokens} tokens; rel. error of the first "
          f"{min(args.tokens, CHECK_TOKENS)} tokens vs reference_moe (tolerance {tilemoe.TOLERANCE[dtype]:g})")
    headers = ["backend", "ms", "TFLOP/s", "vs torch", "rel. error", "check"]
    print(tabulate(rows, headers=headers, floatfmt=("", ".3f", ".3f", "", ".2e", "")))
    if args.record:
        path = bench.record(f"moe_layer-{args.preset}-T{args.tokens}", [dict(zip(headers, r)) for r in rows], device,
                            extra={"preset": cfg.as_dict(), "tokens": args.tokens, "dtype": str(dtype)})
        print(f"\nrecorded: {path}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
