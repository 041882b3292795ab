"""
The complete optimized MoE layer: train it a few steps, then serve it
=====================================================================

In this lesson you will learn:

* how ``tilemoe.OptimizedMoELayer`` puts the chapter together in one nn.Module: the router (fp32
  logits, softmax or DeepSeek-V3's sigmoid with a selection bias), the routing metadata, the fused
  expert kernels of the backend you pick, the shared experts;
* what training adds: the load-balancing loss (``return_aux_loss=True``), DeepSeek-V3's bias
  balancing, token rounding to the tile, capacity, and the memory-lean backward (the Triton one
  keeps only x and the pre-activation);
* how to watch the experts' load while training (``layer.expert_usage``: counts and their Gini);
* what inference changes: ``eval()`` and ``no_grad``, the router fused with the kernels.

Run it::

    .venv/bin/python examples/06_full_moe/full_moe.py                   # CPU: the small preset, seconds
    python examples/06_full_moe/full_moe.py --preset olmoe-1b-7b --tokens 16384 --backend triton   # a GPU

What it prints: the layer; one line per training step (the task loss, the aux loss, the Gini of the
step's expert loads, the step's time); the expert usage over training; then the inference output's
error against ``tilemoe.reference_moe`` on the trained weights, its time, and the peak memory of a
training step and of an inference forward (GPU only). The task is a toy regression (match a fixed
random linear map), enough to make the router's weights move.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import tilemoe
from tilemoe import bench
from tilemoe.layer import train_step

# %%
# Build the layer for a preset.
# ``from_preset`` copies the model's shape and router (OLMoE's softmax without renormalization,
# DeepSeek-V3's sigmoid with groups and a shared expert); every training option is a keyword.


def build(args, device, dtype) -> tilemoe.OptimizedMoELayer:
    cfg = tilemoe.get_preset(args.preset)
    torch.manual_seed(0)  # the layer's initial weights
    layer = tilemoe.OptimizedMoELayer.from_preset(cfg, backend=args.backend, rounding=args.rounding,
                                                  tile_size=args.tile_size,
                                                  capacity_factor=args.capacity_factor,
                                                  load_balance_weight=args.aux_weight,
                                                  gradient_checkpointing=args.checkpointing,
                                                  device=device, dtype=dtype)  # the router stays fp32
    return layer


# %%
# Train a few steps.
# The aux loss is added to the task loss; with the sigmoid router the bias also takes one balancing
# step per forward in training mode. Watch the Gini of each step's loads.


def train(layer, x, target, steps: int, lr: float, device) -> list[list]:
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
    rows = []
    for step in range(steps):
        before = layer.expert_counts.clone()
        start = time.perf_counter()
        y, aux = layer(x, return_aux_loss=True)
        task = torch.nn.functional.mse_loss(y.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        (task + aux).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ms = (time.perf_counter() - start) * 1e3
        loads = (layer.expert_counts - before).tolist()
        rows.append([step, task.item(), aux.item(), tilemoe.routing.gini(loads), ms])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip().splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(tilemoe.PRESETS), help="model shape (default: small)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per step (default: 256)")
    parser.add_argument("--steps", type=int, default=10, help="training steps (default: 10)")
    parser.add_argument("--lr", type=float, default=1.0, help="SGD learning rate (default: 1.0)")
    parser.add_argument("--backend", default="auto", choices=["auto", *tilemoe.BACKENDS], help="expert backend (default: auto)")
    parser.add_argument("--rounding", default=None, choices=tilemoe.rounding.MODES, help="token rounding mode (default: none)")
    parser.add_argument("--tile-size", type=int, default=128, help="the tile rounding rounds to (default: 128)")
    parser.add_argument("--capacity-factor", type=float, default=None, help="per-expert capacity factor (default: none)")
    parser.add_argument("--aux-weight", type=float, default=0.01, help="load-balancing loss weight (default: 0.01)")
    parser.add_argument("--checkpointing", action="store_true", help="recompute the router's logits in the backward")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.steps < 1:
        parser.error(f"--tokens and --steps: expected ints >= 1, got {args.tokens} and {args.steps}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        layer = build(args, device, dtype)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"{args.preset} on {bench.device_name(device)}, {dtype}, {args.tokens} tokens per step")
    print(layer)

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.tokens, layer.hidden_dim, generator=g, device=device).to(dtype)
    target = x @ (torch.randn(layer.hidden_dim, layer.hidden_dim, generator=g, device=device).to(dtype)
                  / layer.hidden_dim**0.5)

    from tabulate import tabulate

    layer.train()
    rows = train(layer, x, target, args.steps, args.lr, device)
    print("\nTraining (task loss: MSE against a fixed linear map; aux: weight x Switch load-balancing loss)")
    print(tabulate(rows, ["step", "task loss", "aux loss", "Gini of loads", "ms"], floatfmt=".4g"))
    usage = layer.expert_usage
    print(f"\nExpert usage over training: Gini {usage.gini:.3f}; slots per expert {usage.counts}")

    # Serve it.
    # eval() stops the bias balancing and the token rounding (a served token's experts must not
    # depend on the rest of its batch); no_grad lets the backend fuse the router with its kernels.
    layer.eval()
    with torch.no_grad():
        y = layer(x)
        weights = {n: getattr(layer, n) for n in ("router_weight", "w_gate_up", "w_down", "shared_gate_up", "shared_down")
                   if getattr(layer, n) is not None}
        options = layer.router_options()
        ref = tilemoe.reference_moe(x.float(), **{k: v.float() for k, v in weights.items()}, top_k=layer.top_k,
                                    capacity_factor=layer.capacity_factor, **options)
        ms = bench.time_ms(lambda: layer(x), device=device)
    err = tilemoe.rel_error(y, ref)
    ok = err <= tilemoe.TOLERANCE[dtype]
    print(f"\nInference: rel. error {err:.2e} against tilemoe.reference_moe ({'PASS' if ok else 'FAIL'} at "
          f"{tilemoe.TOLERANCE[dtype]:g}), {ms:.3f} ms per forward")
    if device.type == "cuda":
        layer.train()
        dy = torch.randn_like(x)  # y's gradient, as the layers above would hand it down
        train_peak = bench.peak_bytes(lambda: train_step(layer, x, dy), device)
        layer.eval()
        with torch.no_grad():
            infer_peak = bench.peak_bytes(lambda: layer(x), device)
        print(f"Peak memory beyond the weights: training step {train_peak / 1e9:.3f} GB, inference {infer_peak / 1e9:.3f} GB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
