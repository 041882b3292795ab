"""
Vanilla top-k against token rounding: tile utilization, output change, and the expert GEMMs' time
==================================================================================================

In this lesson you will learn:

* how tile utilization falls as the experts multiply at a fixed top-k (E = 64, 128, 256 with K = 8:
  fewer tokens per expert, so the half-empty last tile of each expert weighs more), and what each
  rounding mode of ``tilemoe.rounding`` gives back;
* how much rounding changes the layer's output: ||y_mode - y_topk|| / ||y_topk|| through
  ``tilemoe.moe_forward`` with the same weights;
* what a tile-based grouped GEMM computes (every expert's rows padded to whole tiles), and how to
  time the expert GEMMs honestly: the padded top-k input, the unpadded one, and each rounded
  routing, through torch's grouped_mm in bf16, every output checked before it is timed.

Run it (CPU, a few seconds: the timing is replaced by a FLOP model, and the output change is
computed at a reduced size; both are said in the output)::

    .venv/bin/python examples/04_token_rounding/routing_comparison.py
    .venv/bin/python examples/04_token_rounding/routing_comparison.py --experts 32 256 --skew 1

On a GPU (H=2048, I=1024 and all tokens by default; ``--record`` writes the rows to
benchmarks/results/<gpu>/token_rounding_gemm-<date>.json)::

    python examples/04_token_rounding/routing_comparison.py --record

What it prints: (a) per E and routing, the tile utilization, the pairs dropped and added, the
tokens left with no expert and the output's relative change; (b) the FLOP model: the rows a
tile-based grouped GEMM runs and the speedup it predicts (modelled, not measured); (c) on a GPU,
or with ``--measure``: per E and GEMM input, the measured median time of up-projection + SwiGLU +
down-projection, TFLOP/s of the useful FLOPs and the speedups over vanilla top-k, padded and
unpadded.
"""

from __future__ import annotations

import argparse
import sys

import torch
from tabulate import tabulate

import tilemoe
from tilemoe import bench, rounding
from tilemoe.backends.common import swiglu
from tilemoe.backends.grouped_mm import grouped_mm_op  # the very function the grouped_mm backend calls
from tilemoe.grading import poisoned_memory
from tilemoe.reference import swiglu_expert
from tilemoe.routing import Routing, build_routing, tile_rows

PAPER = ("The paper reports a 1.16x kernel speedup from token rounding over vanilla top-k routing at high MoE "
         "sparsity (Guo, Mishra, Cheng, Stoica, Dao, SonicMoE, arXiv 2512.14080, 2025): the paper's number, "
         "not measured here.")
GEMM_DTYPE = torch.bfloat16  # the dtype of the timed GEMMs, on every device: one code path


# %%
# One routing decision per E
# --------------------------
# The tokens and the router are random (the router nn.Linear-like, std 1/sqrt(H)), drawn on the
# device from the seed; --skew adds examples/01's Zipf-like logit bias -skew * log(e + 1). Every
# mode rounds the same vanilla decision, ranking by the same softmax scores.

def route_all(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, tile: int, skew: float) -> dict:
    logits = tilemoe.router_logits(x, router_weight)
    logits = logits - skew * torch.arange(1, logits.shape[1] + 1, device=logits.device, dtype=logits.dtype).log()
    vanilla = tilemoe.route(logits, top_k)
    scores = logits.softmax(dim=-1)
    routings = {"top-k": (vanilla, None)}
    for mode in rounding.MODES:
        out = rounding.round_routing(scores, vanilla, tile, mode)
        routings[mode] = (out.routing, out.stats)
    return routings


def first_tokens(routing: Routing, n: int) -> Routing:
    """The routing of the batch's first n tokens, as decided in the whole batch (rounding is a batch
    decision: rounding only n tokens would round differently)."""
    return build_routing(routing.topk_ids[:n], routing.topk_weights[:n], routing.topk_scores[:n],
                         routing.num_experts, has_empty_slots=routing.has_empty_slots)


# %%
# (a) What rounding changes
# -------------------------
# The output change is measured in fp32 on the same weights (moe_forward, backend "auto"): only the
# routing differs. A dropped pair removes one expert's contribution from a token; an added pair adds
# one, with its router score as weight (renormalized over the token's experts).

def output_change(x, weights, routings, diff_tokens) -> dict[str, float]:
    ys = {}
    for name, (routing, _) in routings.items():
        sub = first_tokens(routing, diff_tokens)
        ys[name] = tilemoe.moe_forward(x[:diff_tokens], weights["router_weight"], weights["w_gate_up"],
                                       weights["w_down"], sub.top_k, routing=sub)
    return {name: tilemoe.rel_error(y, ys["top-k"]) for name, y in ys.items()}


# %%
# (c) The expert GEMMs, measured
# ------------------------------
# What is timed: up-projection (grouped_mm), SwiGLU, down-projection (grouped_mm) on rows already
# gathered in expert order, bf16, the weights converted once before. grouped_mm takes int32
# offsets of the segment ENDS (offsets[1:]); rows past the last end are not computed.
#   top-k padded:   every expert's rows followed by random rows up to whole tiles, the work a
#                   tile-based kernel does (the padding is random data like the real rows, never
#                   zeros: a GPU's power draw, and so its clock, depends on the data);
#   top-k unpadded: grouped_mm as is on the ragged segments (its kernel still computes each
#                   expert's last, partial tile whole);
#   rounded modes:  already whole tiles (a count is only off a multiple when capped at T).

def expert_gemms(rows: torch.Tensor, ends: torch.Tensor, w_gate_up_t: torch.Tensor, w_down_t: torch.Tensor):
    h = grouped_mm_op(rows, w_gate_up_t, offs=ends)
    return grouped_mm_op(swiglu(h), w_down_t, offs=ends)


def gemm_inputs(x: torch.Tensor, routings: dict, tile: int) -> dict:
    """name -> (rows [M, H], ends int32 [E], segment starts [E], real counts [E]) for every GEMM input.

    The starts and real counts say where each expert's real rows sit in rows (and in the output), so
    that the check compares exactly those rows and ignores padding.
    """
    vanilla = routings["top-k"][0]
    counts, offsets = vanilla.counts.long(), vanilla.offsets.long()
    real = x[vanilla.sorted_tokens[: int(offsets[-1])]]

    padded = -(-counts // tile) * tile
    pad_offsets = torch.zeros_like(offsets)
    pad_offsets[1:] = padded.cumsum(0)
    expert_of_row = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts)
    dest = torch.arange(real.shape[0], device=x.device) - offsets[expert_of_row] + pad_offsets[expert_of_row]
    g = torch.Generator(device=x.device).manual_seed(1234)
    padded_rows = torch.randn(int(pad_offsets[-1]), x.shape[1], generator=g, device=x.device, dtype=x.dtype)
    padded_rows[dest] = real

    inputs = {
        "top-k padded": (padded_rows, pad_offsets[1:].to(torch.int32), pad_offsets[:-1], counts),
        "top-k unpadded": (real, vanilla.offsets[1:], offsets[:-1], counts),
    }
    for name, (routing, _) in routings.items():
        if name != "top-k":
            n = int(routing.offsets[-1])
            inputs[name] = (x[routing.sorted_tokens[:n]], routing.offsets[1:], routing.offsets[:-1].long(),
                            routing.counts.long())
    return inputs


def check_gemms(name, rows, ends, starts, real, w_gate_up, w_down, w_gate_up_t, w_down_t) -> float:
    """Relative error of the grouped GEMM output on every real row against a per-expert fp32 matmul
    (the same bf16 inputs and weights); AssertionError past the bf16 tolerance. Fresh allocations are
    NaN while the GEMMs run, so a row they forget to write fails here instead of passing on stale memory."""
    with poisoned_memory():
        out = expert_gemms(rows, ends, w_gate_up_t, w_down_t)
    got, want = [], []
    for e, (start, count) in enumerate(zip(starts.tolist(), real.tolist())):
        if count:
            segment = slice(start, start + count)
            got.append(out[segment])
            want.append(swiglu_expert(rows[segment].float(), w_gate_up[e].float(), w_down[e].float()))
    error = tilemoe.rel_error(torch.cat(got), torch.cat(want))
    tolerance = tilemoe.TOLERANCE[GEMM_DTYPE]
    if not error <= tolerance:  # an explicit raise: `python -O` would skip an assert
        raise AssertionError(f"{name}: grouped GEMM output differs from per-expert matmuls: {error:.2e} > {tolerance}")
    return error


def measure(x, weights, routings, tile, device, modelled: dict[str, float]) -> list[dict]:
    hidden, ffn = weights["w_down"].shape[1:]
    w_gate_up, w_down = weights["w_gate_up"].to(GEMM_DTYPE), weights["w_down"].to(GEMM_DTYPE)
    # grouped_mm multiplies rows_e @ b_e with b [E, K, N]: the transposed views of our [E, N, K]
    # weights, exactly as the grouped_mm backend passes them (views: nothing is copied per call).
    w_gate_up_t, w_down_t = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)
    inputs = gemm_inputs(x.to(GEMM_DTYPE), routings, tile)
    errors, times = {}, {}
    for name, (rows, ends, starts, real) in inputs.items():
        errors[name] = check_gemms(name, rows, ends, starts, real, w_gate_up, w_down, w_gate_up_t, w_down_t)
        times[name] = bench.time_ms(lambda: expert_gemms(rows, ends, w_gate_up_t, w_down_t), device=device)
    out = []
    for name, (rows, _, _, real) in inputs.items():
        ms, real_rows = times[name], int(real.sum())
        out.append({"GEMM input": name, "rows computed": rows.shape[0], "real rows": real_rows, "ms": ms,
                    "TFLOP/s (useful)": bench.tflops(6 * real_rows * hidden * ffn, ms),
                    "vs top-k padded": times["top-k padded"] / ms, "vs top-k unpadded": times["top-k unpadded"] / ms,
                    "modelled speedup": modelled[name.removesuffix(" padded").removesuffix(" unpadded")],
                    "check rel. error": errors[name]})
    return out


# %%
# Run it
# ------

def main(argv=None) -> int:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        description="Vanilla top-k vs every token-rounding mode: tile utilization, output change, expert GEMM time.")
    parser.add_argument("--experts", type=int, nargs="+", default=[64, 128, 256],
                        help="numbers of experts E to compare (default: 64 128 256)")
    parser.add_argument("--top-k", type=int, default=8, help="K, experts per token (default: 8)")
    parser.add_argument("--tokens", type=int, default=16384, help="T, tokens routed together (default: 16384)")
    parser.add_argument("--tile", type=int, default=128, help="rows per tile of the grouped GEMM (default: 128)")
    parser.add_argument("--hidden", type=int, help="H (default: 2048 on a GPU, 256 on a CPU)")
    parser.add_argument("--ffn", type=int, help="I, each expert's intermediate size (default: 1024 on a GPU, 128 on a CPU)")
    parser.add_argument("--diff-tokens", type=int,
                        help="tokens whose output change is computed (default: all on a GPU, 1024 on a CPU)")
    parser.add_argument("--skew", type=float, default=0.0,
                        help="Zipf exponent of a logit bias -skew*log(e+1) making the router uneven (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tokens and weights (default: 0)")
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu",
                        help="cpu or cuda (default: cuda if available, else cpu)")
    parser.add_argument("--measure", action="store_true",
                        help="time the expert GEMMs on a CPU too (slow, and CPU times say nothing about a GPU; "
                             "it runs and checks the GPU's code path)")
    parser.add_argument("--record", action="store_true",
                        help="write every row with its provenance to benchmarks/results/<device>/")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not on_gpu:
        parser.error("--device cuda: this PyTorch sees no CUDA GPU")
    small = device.type == "cpu"
    hidden = args.hidden or (256 if small else 2048)
    ffn = args.ffn or (128 if small else 1024)
    diff_tokens = min(args.diff_tokens or (1024 if small else args.tokens), args.tokens)
    for name, value in (("tokens", args.tokens), ("tile", args.tile), ("hidden", hidden), ("ffn", ffn),
                        ("diff-tokens", diff_tokens), *(("experts", e) for e in args.experts)):
        if value < 1:
            parser.error(f"--{name}: expected an int >= 1, got {value}")
    if not 1 <= args.top_k <= min(args.experts):
        parser.error(f"--top-k: expected an int in [1, min(--experts) = {min(args.experts)}], got {args.top_k}")
    measured = device.type == "cuda" or args.measure

    print(f"T = {args.tokens} tokens, top-{args.top_k}, H = {hidden}, I = {ffn}, tile = {args.tile} rows, "
          f"skew = {args.skew:g}, device: {bench.device_name(device)}")
    if small:
        print(f"(CPU: H and I reduced from the GPU's 2048 and 1024; routing and the FLOP model do not depend on them)")

    routing_rows, model_rows, measured_rows = [], [], []
    for experts in args.experts:
        cfg = tilemoe.MoEConfig(f"E{experts}", hidden=hidden, ffn=ffn, experts=experts, top_k=args.top_k)
        weights = cfg.init_weights(device=device, dtype=torch.float32, seed=args.seed)
        g = torch.Generator(device=device).manual_seed(args.seed + 1)
        x = torch.randn(args.tokens, hidden, generator=g, device=device)
        routings = route_all(x, weights["router_weight"], args.top_k, args.tile, args.skew)
        change = output_change(x, weights, routings, diff_tokens)
        vanilla_counts = routings["top-k"][0].counts.tolist()
        vanilla_rows = tile_rows(vanilla_counts, args.tile)
        for name, (routing, stats) in routings.items():
            counts = routing.counts.tolist()
            run = tile_rows(counts, args.tile)
            routing_rows.append({
                "E": experts, "routing": name, "pairs / expert": sum(counts) / experts,
                "tile util": tilemoe.routing.tile_utilization(counts, args.tile),
                "pairs dropped": stats.pairs_dropped if stats else 0, "pairs added": stats.pairs_added if stats else 0,
                "tokens w/o expert": stats.tokens_without_expert if stats else 0, "output rel. change": change[name]})
            model_rows.append({"E": experts, "routing": name, "real rows": sum(counts), "tile rows run": run,
                               "padding rows": run - sum(counts), "modelled speedup": vanilla_rows / run})
        if measured:
            modelled = {m["routing"]: m["modelled speedup"] for m in model_rows[-len(routings):]}
            measured_rows += [{"E": experts, **row} for row in measure(x, weights, routings, args.tile, device, modelled)]
        del weights, x, routings  # the next E's weights take their place

    where = "all" if diff_tokens == args.tokens else f"the first {diff_tokens}"
    print(f"\n(a) Routing: tile utilization, what rounding changed, and the output's relative change "
          f"||y - y_top-k|| / ||y_top-k|| (fp32, {where} of the {args.tokens} tokens)")
    print(tabulate(routing_rows, headers="keys", floatfmt=".3f"))
    print(f"\n(b) FLOP model (modelled, not measured): a tile-based grouped GEMM runs every expert's rows rounded "
          f"up to whole tiles of {args.tile};\n    the predicted speedup is top-k's tile rows over the mode's, "
          f"as if time were proportional to the rows run (6 * rows * H * I FLOPs)")
    print(tabulate(model_rows, headers="keys", floatfmt=".3f"))
    if measured:
        print(f"\n(c) Measured on {bench.device_name(device)}: up-projection + SwiGLU + down-projection, torch "
              f"grouped_mm, {str(GEMM_DTYPE).removeprefix('torch.')}, median ms (tilemoe.bench.time_ms); every "
              f"output checked first against per-expert matmuls; TFLOP/s counts 6 * real rows * H * I")
        if small:
            print("    (CPU times: they check the code path and say nothing about a GPU)")
        print(tabulate(measured_rows, headers="keys", floatfmt=".3f"))
    print(f"\n{PAPER}")
    if args.record:
        rows = ([{"table": "routing", **r} for r in routing_rows] + [{"table": "model", **r} for r in model_rows]
                + [{"table": "measured", **r} for r in measured_rows])
        path = bench.record("token_rounding_gemm", rows, device, extra={
            "tokens": args.tokens, "top_k": args.top_k, "hidden": hidden, "ffn": ffn, "tile": args.tile,
            "skew": args.skew, "seed": args.seed, "diff_tokens": diff_tokens, "gemm_dtype": str(GEMM_DTYPE),
            "measured": measured})
        print(f"\nrecorded: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
