"""
Throughput and cost: what an MoE layer's speed means in tokens per day and dollars
==================================================================================

What you will learn: how a layer time turns into a model's tokens/s, tokens per day, the GPUs a
target needs and the cost of a number of tokens; and how far those figures move with the kernels.

On a GPU it measures one MoE layer's forward (router, experts, combine) at --tokens tokens with the
fastest backend here and with the torch grouped_mm path, both checked against the reference. On
a machine without one it models the layer from the roofline of --hardware: the larger of FLOPs
over the datasheet's dense bf16 rate and bytes over its memory bandwidth, an upper bound on
speed that no kernel reaches; every such figure is labelled "modelled".

    python benchmarks/throughput.py                                  # GPU: measured, every preset
    .venv/bin/python benchmarks/throughput.py --hardware h200        # anywhere: modelled
    python benchmarks/throughput.py --preset large --num-gpus 64 --usd-per-gpu-hour 3.5

What the figures include: the model's MoE layers only (layers x the layer's time). Attention, the
dense and shared-expert FFNs, embeddings and the LM head are left out, so a whole model is slower
than these figures say. Forward only (prefill or inference). More than one GPU is a model, not a
measurement: data-parallel copies at --scaling-efficiency until an expert-parallel run exists.
Presets: the chapter's, plus "medium" (olmoe-1b-7b, 64 experts) and "large" (deepseek-v3, 256).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tabulate import tabulate

import tilemoe
from tilemoe import backends, bench

# Datasheet peaks (dense, no sparsity), SXM parts: leads for the model, not measurements.
HARDWARE = {
    "h100": {"name": "NVIDIA H100 SXM", "bf16_tflops": 989, "hbm_tbps": 3.35,
             "source": "NVIDIA H100 Tensor Core GPU datasheet: 989 TFLOP/s dense BF16, 3.35 TB/s HBM3"},
    "h200": {"name": "NVIDIA H200 SXM", "bf16_tflops": 989, "hbm_tbps": 4.8,
             "source": "NVIDIA H200 Tensor Core GPU datasheet: 989 TFLOP/s dense BF16, 4.8 TB/s HBM3e"},
    "b200": {"name": "NVIDIA B200 (HGX, 1000 W)", "bf16_tflops": 2250, "hbm_tbps": 8.0,
             "source": "NVIDIA HGX B200 datasheet: 2.25 PFLOP/s dense BF16 per GPU, 8 TB/s HBM3e"},
}
ALIASES = {"medium": "olmoe-1b-7b", "large": "deepseek-v3"}
DEFAULT_PRESETS = ("small", "medium", "qwen3-30b-a3b", "mixtral-8x7b", "large")
SECONDS_PER_DAY = 86400


def modelled_layer_ms(cfg: tilemoe.MoEConfig, tokens: int, hardware: dict) -> float:
    """The roofline of one MoE layer's forward in bf16: max(FLOPs / peak, bytes / bandwidth).

    Bytes: the weights of every expert the batch can touch (min(E, T*K) of them, 3*H*I each), x read
    and y written (T*H each), and the intermediate activation written and read (T*K*I twice).
    """
    flops = cfg.flops(tokens)
    touched = min(cfg.experts, tokens * cfg.top_k)
    elems = touched * 3 * cfg.hidden * cfg.ffn + 2 * tokens * cfg.hidden + 2 * tokens * cfg.top_k * cfg.ffn
    return max(flops / (hardware["bf16_tflops"] * 1e12), elems * 2 / (hardware["hbm_tbps"] * 1e12)) * 1e3


def measured_layer_ms(cfg: tilemoe.MoEConfig, tokens: int, backend: str, seed: int) -> tuple[float, float]:
    """(ms, rel. error) of moe_forward on this GPU in bf16, checked against the reference first."""
    device = torch.device("cuda")
    w = cfg.init_weights(device=device, dtype=torch.bfloat16, seed=seed, shared=False)
    x = torch.randn(tokens, cfg.hidden, device=device, generator=torch.Generator(device).manual_seed(seed)).bfloat16()

    def forward():
        return tilemoe.moe_forward(x, **w, top_k=cfg.top_k, backend=backend, **cfg.router_options())

    with torch.no_grad():
        ref = tilemoe.reference_moe(x.float(), **{k: v.float() for k, v in w.items()}, top_k=cfg.top_k,
                                    **cfg.router_options())
        err = tilemoe.rel_error(forward(), ref)
        del ref
        return bench.time_ms(forward, device=device), err


def economics(layer_ms: float, cfg: tilemoe.MoEConfig, tokens: int, args) -> dict:
    """From one layer's time to the model's tokens/s, tokens/day, GPUs for a target, and cost."""
    model_s = cfg.moe_layers * layer_ms / 1e3               # one forward of every MoE layer
    per_gpu_day = tokens / model_s * SECONDS_PER_DAY          # one GPU, all day
    fleet_eff = args.scaling_efficiency if args.num_gpus > 1 else 1.0
    gpus = math.ceil(args.target_tokens_per_day / per_gpu_day)
    if gpus > 1:  # a fleet scales at the assumed efficiency
        gpus = math.ceil(args.target_tokens_per_day / (per_gpu_day * args.scaling_efficiency))
    gpu_hours = args.cost_tokens / (per_gpu_day * fleet_eff) * 24  # the fleet's GPU-hours, whatever its size
    return {
        "layer ms": layer_ms, "model MoE ms": model_s * 1e3, "tokens/s per GPU": per_gpu_day / SECONDS_PER_DAY,
        f"tokens/day on {args.num_gpus} GPU(s)": per_gpu_day * args.num_gpus * fleet_eff,
        "GPUs for target": gpus, "GPU-hours for N tokens": gpu_hours, "USD for N tokens": gpu_hours * args.usd_per_gpu_hour,
    }


COLUMNS = ["preset", "model", "how", "moe layers", "layer ms", "tokens/s per GPU", "tokens/day on {n} GPU(s)",
           "GPUs for target", "GPU-hours for N tokens", "USD for N tokens"]


def table_markdown(files: list) -> str:
    """The README's table for recorded runs: one row per preset and way of running it."""
    parts = []
    for path in map(Path, files):
        run = json.loads(path.read_text())
        link = bench.link_from(Path(__file__).parent, path)
        how = (f"measured on {run['gpu']}" if run["measured"]
               else f"modelled from {run['hardware']['name']} ({run['hardware']['source']})")
        cols = [c.format(n=run["num_gpus"]) for c in COLUMNS]
        lines = [f"{how}; torch {run['torch']}, commit {run['commit'][:7]}, `{run['command']}`, {run['date'][:10]}; "
                 f"{run['tokens']} tokens per forward, MoE layers only; N = {run['cost_tokens']:.3g} tokens at "
                 f"{run['usd_per_gpu_hour']} USD/GPU-hour; [{path.name}]({link}).", "",
                 "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
        for r in run["rows"]:
            lines.append("| " + " | ".join(v if isinstance(v := r[c], str) else f"{v:.4g}" for c in cols) + " |")
        parts.append("\n".join(lines))
    return bench.generated_block("benchmarks/throughput.py", files, "\n\n".join(parts))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    names = sorted([*tilemoe.PRESETS, *ALIASES])
    parser.add_argument("--preset", nargs="+", choices=names, default=list(DEFAULT_PRESETS), metavar="PRESET",
                        help=f"models (default: {' '.join(DEFAULT_PRESETS)}); choices: {', '.join(names)}")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per forward (default: 16384)")
    parser.add_argument("--hardware", choices=sorted(HARDWARE),
                        help="model this GPU from its datasheet instead of measuring (the default without a GPU: h200)")
    parser.add_argument("--num-gpus", type=int, default=1, help="GPUs in the fleet (default: 1)")
    parser.add_argument("--scaling-efficiency", type=float, default=0.9,
                        help="fraction of linear data-parallel scaling assumed beyond one GPU (default: 0.9)")
    parser.add_argument("--target-tokens-per-day", type=float, default=1e11, help="for 'GPUs for target' (default: 1e11)")
    parser.add_argument("--cost-tokens", type=float, default=1e12, help="N of 'USD for N tokens' (default: 1e12)")
    parser.add_argument("--usd-per-gpu-hour", type=float, default=2.0,
                        help="your price of one GPU-hour (default: 2.0, an input, not a quote)")
    parser.add_argument("--seed", type=int, default=0)
    bench.add_output_options(parser)
    args = parser.parse_args(argv)
    if args.table:
        return bench.print_tables(parser, table_markdown, args.table)
    for name, value, low in (("--tokens", args.tokens, 1), ("--num-gpus", args.num_gpus, 1)):
        if value < low:
            parser.error(f"{name}: expected an int >= {low}, got {value}")
    for name, value in (("--target-tokens-per-day", args.target_tokens_per_day), ("--cost-tokens", args.cost_tokens),
                        ("--usd-per-gpu-hour", args.usd_per_gpu_hour)):
        if not value > 0:
            parser.error(f"{name}: expected a number > 0, got {value}")
    if not 0 < args.scaling_efficiency <= 1:
        parser.error(f"--scaling-efficiency: expected a number in (0, 1], got {args.scaling_efficiency}")

    measure = args.hardware is None and torch.cuda.is_available()
    hardware = HARDWARE[args.hardware or "h200"]
    device = torch.device("cuda" if measure else "cpu")
    if measure:
        print(f"measured on {bench.device_name(device)}, bf16, torch {torch.__version__}")
    else:
        print(f"modelled (roofline, an upper bound): {hardware['name']}. Source: {hardware['source']}")
    print(f"{args.tokens} tokens per forward; MoE layers only (attention, dense FFNs, embeddings left out); "
          f"{args.num_gpus} GPU(s){' (data-parallel model, efficiency ' + str(args.scaling_efficiency) + ')' if args.num_gpus > 1 else ''}; "
          f"N = {args.cost_tokens:.3g} tokens at {args.usd_per_gpu_hour} USD/GPU-hour")

    rows = []
    for name in args.preset:
        cfg = tilemoe.get_preset(ALIASES.get(name, name))
        base = {"preset": name, "model": cfg.name, "moe layers": cfg.moe_layers}
        if not measure:
            rows.append({**base, "how": "modelled", **economics(modelled_layer_ms(cfg, args.tokens, hardware), cfg, args.tokens, args)})
            continue
        fastest = backends.available_backends(device, torch.bfloat16, cfg.hidden, cfg.ffn)[0]
        for backend in dict.fromkeys([fastest, "grouped_mm"]):
            ms, err = measured_layer_ms(cfg, args.tokens, backend, args.seed)
            if err > tilemoe.TOLERANCE[torch.bfloat16]:
                print(f"{name} {backend}: rel. error {err:.2e} over the bf16 tolerance: not reported")
                return 1
            rows.append({**base, "how": f"measured, {backend}", "rel_error": err, **economics(ms, cfg, args.tokens, args)})
        torch.cuda.empty_cache()
    cols = [c.format(n=args.num_gpus) for c in COLUMNS]
    print(tabulate([[r.get(c) for c in cols] for r in rows], cols, floatfmt=".4g"))
    if args.record:
        extra = {"tokens": args.tokens, "num_gpus": args.num_gpus, "scaling_efficiency": args.scaling_efficiency,
                 "target_tokens_per_day": args.target_tokens_per_day, "cost_tokens": args.cost_tokens,
                 "usd_per_gpu_hour": args.usd_per_gpu_hour, "measured": measure,
                 "hardware": None if measure else hardware}
        print(f"recorded: {bench.record('throughput', rows, device, extra=extra)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
