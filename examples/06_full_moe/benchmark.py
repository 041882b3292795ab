"""
The full layer, timed: forward, forward + backward and a training step's memory, per backend
===========================================================================================

In this lesson you will learn how to measure a training layer honestly: every backend runs the same
``OptimizedMoELayer`` (same weights, same tokens, same routing options), is checked against
``tilemoe.reference_moe`` first, and is timed beside the torch grouped_mm path in the same run, so
each speedup is a ratio of two numbers taken minutes apart on the same GPU.

Run it::

    .venv/bin/python examples/06_full_moe/benchmark.py                       # CPU: small, seconds
    python examples/06_full_moe/benchmark.py --config olmoe-1b-7b --tokens 16384 --record   # a GPU

What it prints: one row per backend that runs here (grouped_mm, triton, cuda, sonicmoe when
installed, torch on a CPU): the forward's error against the reference, forward ms, forward +
backward ms, both as TFLOP/s (6*T*K*H*I and 18*T*K*H*I), the speedups over grouped_mm, and the
peak memory a training step adds beyond the weights and their gradients (GPU only), also as a
ratio to grouped_mm's. ``--record`` writes the rows to benchmarks/results/<gpu>/full_moe-*.json.
It exits with status 1 if a backend's output is outside the tolerance.
"""

from __future__ import annotations

import argparse
import sys

import torch
from tabulate import tabulate

import tilemoe
from tilemoe import backends, bench

BASELINE = "grouped_mm"


def measure(layer: tilemoe.OptimizedMoELayer, x: torch.Tensor, ref: torch.Tensor, device) -> dict:
    """One backend: its error, forward and forward+backward times, a training step's peak memory."""
    layer.eval()
    with torch.no_grad():
        err = tilemoe.rel_error(layer(x), ref)
        forward_ms = bench.time_ms(lambda: layer(x), device=device)
    layer.train()
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)  # held before the step is measured, as an optimizer holds them

    def step():
        y, aux = layer(x, return_aux_loss=True)
        (y.float().sum() + aux).backward()

    train_ms = bench.time_ms(step, device=device)
    peak = bench.peak_bytes(step, device)
    return {"rel_error": err, "forward_ms": forward_ms, "fwd_bwd_ms": train_ms, "train_peak_bytes": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", default="small", choices=sorted(tilemoe.PRESETS), help="model shape (default: small)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens (default: 256)")
    parser.add_argument("--backends", nargs="+", default=None, choices=list(backends.BACKENDS),
                        help="backends to run (default: every one that runs here)")
    parser.add_argument("--record", action="store_true", help="write the rows to benchmarks/results/<device>/")
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error(f"--tokens: expected an int >= 1, got {args.tokens}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = tilemoe.get_preset(args.config)
    runnable = backends.available_backends(device, dtype, cfg.hidden, cfg.ffn)
    names = args.backends or [n for n in runnable if n != "torch" or device.type == "cpu"]
    for name in names:
        if name not in runnable:
            parser.error(f"--backends: {name} cannot run here: "
                         f"{backends.unavailable_reason(name, device, dtype, cfg.hidden, cfg.ffn)}")

    torch.manual_seed(0)
    layer = tilemoe.OptimizedMoELayer.from_preset(cfg, device=device, dtype=dtype)
    x = torch.randn(args.tokens, cfg.hidden, device=device).to(dtype)
    with torch.no_grad():
        weights = {n: getattr(layer, n).float() for n in ("router_weight", "w_gate_up", "w_down", "shared_gate_up",
                                                           "shared_down") if getattr(layer, n) is not None}
        ref = tilemoe.reference_moe(x.float(), **weights, top_k=cfg.top_k, **layer.router_options())
    flops = cfg.flops(args.tokens)
    rows = []
    for name in names:
        print(f"{name}: checking and timing (a first call compiles its kernels)", flush=True)
        layer.backend = name
        row = {"config": cfg.name, "tokens": args.tokens, "backend": name, **measure(layer, x, ref, device)}
        row["forward_tflops"] = bench.tflops(flops, row["forward_ms"])
        row["fwd_bwd_tflops"] = bench.tflops(3 * flops, row["fwd_bwd_ms"])
        rows.append(row)
    base = next((r for r in rows if r["backend"] == BASELINE), None)
    for r in rows:
        r["forward_speedup"] = base["forward_ms"] / r["forward_ms"] if base else None
        r["fwd_bwd_speedup"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"] if base else None
        peak, base_peak = r["train_peak_bytes"], base and base["train_peak_bytes"]
        r["train_peak_ratio"] = peak / base_peak if peak is not None and base_peak else None

    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)

    print(f"{cfg.name}, T={args.tokens}, {dtype}, {bench.device_name(device)}; speedups over {BASELINE} in this run")
    print(tabulate([[r["backend"], f"{r['rel_error']:.2e}", f"{r['forward_ms']:.3f}", cell(r["forward_speedup"], ".2f"),
                     f"{r['fwd_bwd_ms']:.3f}", cell(r["fwd_bwd_speedup"], ".2f"), f"{r['fwd_bwd_tflops']:.1f}",
                     cell(r["train_peak_bytes"] and r["train_peak_bytes"] / 1e9, ".3f"), cell(r["train_peak_ratio"], ".2f")]
                    for r in rows],
                   ["backend", "rel. error", "fwd ms", "fwd x", "fwd+bwd ms", "fwd+bwd x", "fwd+bwd TFLOP/s",
                    "train peak GB", "peak / base"]))
    failed = [r["backend"] for r in rows if not r["rel_error"] <= tilemoe.TOLERANCE[dtype]]
    if failed:
        print(f"FAIL: outside the {dtype} tolerance {tilemoe.TOLERANCE[dtype]:g}: {failed}")
    if args.record:
        print(f"recorded: {bench.record('full_moe', rows, device)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
