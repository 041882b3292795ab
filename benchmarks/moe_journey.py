"""
The MoE optimization journey: one layer, from a Python loop to fused kernels
=============================================================================

What you will learn: what each classic technique buys an MoE layer, measured, and that the answer
changes with the batch size. One layer (a preset's shape) runs at levels 0 to 6, each adding one
technique to the level before; levels 7 and 8 are the chapter's own kernels. Every level is the
whole layer (router, experts, combine), checked against ``tilemoe.reference_moe`` on the same
inputs before it is timed.

    0 naive             a Python loop over tokens and their K experts: two matrix-vector products each
    1 batched           gather every slot's expert weights, one einsum over all slots: no Python loop,
                        but T*K copies of expert weights (above --max-gb it is skipped, with the size)
    2 fused             the activation silu(gate) * up as one Triton kernel instead of three passes
    3 memory-efficient  buffers allocated once and reused, every op writing into them (out=)
    4 grouped           slots sorted by expert, one grouped GEMM per projection (torch grouped_mm):
                        each expert's weights read once per layer, not once per slot
    5 CUDA graphs       level 4 captured once and replayed: no launch or Python overhead. It can be
                        captured because nothing in it waits for the host: level 0's .tolist() or a
                        loop over experts reading offsets on the host would break the capture
    6 torch.compile     level 4 compiled by Inductor, which fuses the work around the GEMMs
    7 tilemoe triton    the chapter's fused Triton kernels (backend "triton")
    8 triton graphed    level 7 in a CUDA graph (tilemoe.graphs.GraphedMoE)

Run it::

    .venv/bin/python benchmarks/moe_journey.py                       # CPU: small preset, 64 tokens
    python benchmarks/moe_journey.py --preset olmoe-1b-7b --record   # GPU: 2K, 8K, 16K, 32K tokens
    python benchmarks/moe_journey.py --levels 4 5 7 8 --tokens 64

Prints, per token count: each level's time, its speedup over level 0 and over the level before,
peak memory, TFLOP/s (6*T*K*H*I) and its error against the reference. Level 0 runs on the first
--naive-tokens tokens only and its time is scaled to the batch: the table says so. A level this
machine cannot run is listed with the reason. --record writes benchmarks/results/<device>/
moe_journey-<date>.json; --plot a PNG of time per level.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate

import tilemoe
from tilemoe import backends, bench
from tilemoe.backends import grouped_mm as grouped_mm_backend
from tilemoe.backends.common import combine, swiglu
from tilemoe.routing import route_tokens

LEVELS = {
    0: "naive", 1: "batched", 2: "fused", 3: "memory-efficient", 4: "grouped", 5: "CUDA graphs",
    6: "torch.compile", 7: "tilemoe triton", 8: "triton graphed",
}
GPU_TOKENS = (2048, 8192, 16384, 32768)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


@dataclass
class Layer:
    """A preset's weights and router options; route() is the router every level uses."""

    cfg: tilemoe.MoEConfig
    w: dict

    def route(self, x: torch.Tensor) -> tilemoe.Routing:
        return route_tokens(x, self.w["router_weight"], self.cfg.top_k, **self.cfg.router_options())


def triton_swiglu():
    """The Triton activation kernel where Triton runs here, else None."""
    if backends.unavailable_reason("triton", DEVICE, DTYPE, 8, 8) is not None:
        return None
    from tilemoe.triton import ops

    return ops.swiglu


# %%
# Level 0: the loop everyone writes first
# ---------------------------------------

def level0(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    routing = layer.route(x)
    ids, weights = routing.topk_ids.tolist(), routing.topk_weights.tolist()  # a host sync: fine here
    w1, w2, ffn = layer.w["w_gate_up"], layer.w["w_down"], layer.cfg.ffn
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, weight in zip(ids[t], weights[t]):
            h = w1[e] @ x[t]                            # [2I]: one matrix-vector product
            y[t] += weight * (w2[e] @ (F.silu(h[:ffn]) * h[ffn:]))
    return y


# %%
# Level 1: batch it, by copying every slot's weights
# --------------------------------------------------

def batched_bytes(layer: Layer, tokens: int) -> int:
    """Level 1's gathered weights: T*K copies of an expert's 3*H*I numbers."""
    return tokens * layer.cfg.top_k * 3 * layer.cfg.hidden * layer.cfg.ffn * torch.empty(0, dtype=DTYPE).element_size()


def level1(layer: Layer, x: torch.Tensor, activation=swiglu) -> torch.Tensor:
    routing = layer.route(x)
    ids = routing.topk_ids.long()                                   # [T, K]
    h = torch.einsum("tkoh,th->tko", layer.w["w_gate_up"][ids], x)  # [T, K, 2I]
    a = activation(h.reshape(-1, h.shape[-1])).view(*ids.shape, -1)
    out = torch.einsum("tkhi,tki->tkh", layer.w["w_down"][ids], a)  # [T, K, H]
    return (out * routing.topk_weights.to(out.dtype).unsqueeze(-1)).sum(dim=1)


# %%
# Level 3: the same work, into buffers allocated once
# ---------------------------------------------------

class Level3:
    """Level 2 with every intermediate in a buffer kept between calls (for one batch shape)."""

    def __init__(self, layer: Layer, tokens: int, activation):
        cfg, slots = layer.cfg, tokens * layer.cfg.top_k
        new = lambda *shape: torch.empty(*shape, device=DEVICE, dtype=DTYPE)  # noqa: E731
        self.layer, self.activation = layer, activation
        self.w1, self.xs = new(slots, 2 * cfg.ffn, cfg.hidden), new(slots, cfg.hidden)
        self.h, self.a = new(slots, 2 * cfg.ffn, 1), new(slots, cfg.ffn)
        self.w2, self.out, self.y = new(slots, cfg.hidden, cfg.ffn), new(slots, cfg.hidden, 1), new(tokens, 1, cfg.hidden)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.layer.route(x)
        ids = routing.topk_ids.reshape(-1)
        token_of_slot = torch.arange(x.shape[0], device=x.device).repeat_interleave(routing.top_k)
        torch.index_select(self.layer.w["w_gate_up"], 0, ids, out=self.w1)
        torch.index_select(x, 0, token_of_slot, out=self.xs)
        torch.bmm(self.w1, self.xs.unsqueeze(-1), out=self.h)
        self.activation(self.h.view(self.h.shape[0], -1), out=self.a)
        torch.index_select(self.layer.w["w_down"], 0, ids, out=self.w2)
        torch.bmm(self.w2, self.a.unsqueeze(-1), out=self.out)
        weights = routing.topk_weights.to(DTYPE).unsqueeze(1)          # [T, 1, K]
        torch.bmm(weights, self.out.view(x.shape[0], routing.top_k, -1), out=self.y)
        return self.y.view(x.shape[0], -1)


# %%
# Level 4: sort by expert, one grouped GEMM per projection
# --------------------------------------------------------

def level4(layer: Layer, x: torch.Tensor, activation=swiglu) -> torch.Tensor:
    routing = layer.route(x)
    rows = x[routing.sorted_tokens]                           # every slot's row, grouped by expert
    ends = routing.offsets[1:]                                # segment ends, on the device: no host sync
    h = grouped_mm_backend.grouped_mm_op(rows, layer.w["w_gate_up"].transpose(1, 2), offs=ends)
    out = grouped_mm_backend.grouped_mm_op(activation(h), layer.w["w_down"].transpose(1, 2), offs=ends)
    return combine(out, routing)


# %%
# Measuring every level
# ---------------------

def build(level: int, layer: Layer, x: torch.Tensor, max_gb: float) -> tuple[Callable[[], torch.Tensor] | None, str]:
    """(the level's forward on x, a note), or (None, why it cannot run here)."""
    cfg, tokens = layer.cfg, x.shape[0]
    fused = triton_swiglu()
    grouped_reason = backends.unavailable_reason("grouped_mm", DEVICE, DTYPE, cfg.hidden, cfg.ffn)
    if level == 0:
        return (lambda: level0(layer, x)), ""
    if level in (1, 2, 3):
        need = batched_bytes(layer, tokens) / 1e9
        if need > max_gb:
            return None, f"would need {need:.1f} GB of gathered weights (over --max-gb {max_gb:g})"
        if level == 1:
            return (lambda: level1(layer, x)), ""
        if fused is None:
            return None, "the Triton activation kernel needs a GPU or TRITON_INTERPRET=1"
        if level == 2:
            return (lambda: level1(layer, x, fused)), ""
        buffers = Level3(layer, tokens, fused)
        return (lambda: buffers(x)), ""
    if level in (4, 5, 6) and grouped_reason is not None:
        return None, grouped_reason
    activation = fused or swiglu
    note = "" if fused else "activation in PyTorch (no Triton here)"
    if level == 4:
        return (lambda: level4(layer, x, activation)), note
    if level == 5:
        if DEVICE.type != "cuda":
            return None, "CUDA graphs need a CUDA GPU"
        graph, _, static_y = tilemoe.graphs.capture(lambda inp: level4(layer, inp, activation), x)

        def replay():
            graph.replay()
            return static_y
        return replay, note
    if level == 6:
        if DTYPE != torch.bfloat16:  # seen with torch 2.13 on a CPU: "Expected inputs of BF16 type"
            return None, "torch.compile traces grouped_mm for bfloat16 only (its fake-tensor check), so this level runs on a GPU"
        compiled = torch.compile(lambda inp: level4(layer, inp, swiglu))
        return (lambda: compiled(x)), "Inductor fuses the activation itself"
    reason = backends.unavailable_reason("triton", DEVICE, DTYPE, cfg.hidden, cfg.ffn)
    if reason is not None:
        return None, reason
    if level == 7:
        return (lambda: tilemoe.moe_forward(x, **layer.w, top_k=cfg.top_k, backend="triton", **cfg.router_options())), ""
    if DEVICE.type != "cuda":
        return None, "CUDA graphs need a CUDA GPU"
    moe = tilemoe.graphs.GraphedMoE(layer.w, cfg.top_k, backend="triton", **cfg.router_options())
    return (lambda: moe(x)), ""


def measure(layer: Layer, tokens: int, levels: list[int], naive_tokens: int, max_gb: float, seed: int) -> tuple[list, dict]:
    cfg = layer.cfg
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(tokens, cfg.hidden, generator=gen, device=DEVICE).to(DTYPE)
    compute = torch.float64 if DEVICE.type == "cpu" else torch.float32  # the ground truth in higher precision
    ref = tilemoe.reference_moe(x.to(compute), **{k: v.to(compute) for k, v in layer.w.items()}, top_k=cfg.top_k,
                                **cfg.router_options())
    rows, skipped = [], {}
    for level in levels:
        subset = min(tokens, naive_tokens) if level == 0 else tokens
        fn, note = build(level, layer, x[:subset], max_gb)
        if fn is None:
            skipped[f"{level} {LEVELS[level]} at T={tokens}"] = note
            continue
        with torch.no_grad():
            try:
                out = fn()  # compiles level 6 (not timed)
            except Exception as exc:  # noqa: BLE001 - only torch.compile's failures are a result
                if level != 6:
                    raise
                skipped[f"{level} {LEVELS[level]} at T={tokens}"] = f"torch.compile failed: {type(exc).__name__}: {exc}"[:300]
                continue
            err = tilemoe.rel_error(out, ref[:subset])
            ms = bench.time_ms(fn, device=DEVICE) * tokens / subset
            peak = bench.peak_bytes(fn, DEVICE) if level not in (5, 8) else None  # a graph's memory was taken at capture
        if subset < tokens:
            note = f"timed on {subset} tokens, scaled to {tokens}"
        rows.append({"preset": cfg.name, "tokens": tokens, "level": level, "technique": LEVELS[level], "ms": ms,
                     "tflops": bench.tflops(cfg.flops(tokens), ms), "peak_gb": None if peak is None else peak / 1e9, "rel_error": err,
                     "check": "PASS" if err <= tilemoe.TOLERANCE[DTYPE] else "FAIL", "note": note})
        print(f"  T={tokens} level {level} {LEVELS[level]}: {ms:.3f} ms {rows[-1]['check']}", flush=True)
    for i, row in enumerate(rows):
        row["vs level 0"] = rows[0]["ms"] / row["ms"] if rows[0]["level"] == 0 else None
        row["vs previous"] = rows[i - 1]["ms"] / row["ms"] if i else None
    return rows, skipped


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for tokens in dict.fromkeys(r["tokens"] for r in rows):
        pts = [(r["level"], r["ms"]) for r in rows if r["tokens"] == tokens]
        ax.plot(*zip(*pts), marker="o", label=f"{tokens} tokens")
    ax.set(yscale="log", xlabel="level", ylabel="ms per forward", title=rows[0]["preset"])
    ax.set_xticks(sorted(LEVELS), [f"{k}\n{v}" for k, v in sorted(LEVELS.items())], fontsize=6)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def table_markdown(files: list) -> str:
    """The README's tables for recorded journeys: one per token count, one row per level."""
    parts = []
    for path in map(Path, files):
        run = json.loads(path.read_text())
        link = bench.link_from(Path(__file__).parent, path)
        preset = run["preset"]
        parts.append(f"{run['gpu'] or run['device']}, torch {run['torch']}, triton {run['triton']}, "
                     f"{run['dtype'].removeprefix('torch.')}, commit {run['commit'][:7]}, `{run['command']}`, "
                     f"{run['date'][:10]}; {preset['name']} (H={preset['hidden']}, I={preset['ffn']}, "
                     f"E={preset['experts']}, K={preset['top_k']}); [{path.name}]({link}).")
        for tokens in run["tokens"]:
            lines = [f"**{tokens} tokens**", "", "| level | technique | ms | vs level 0 | vs previous | TFLOP/s | peak GB | note |",
                     "|---|---|---|---|---|---|---|---|"]
            for r in (r for r in run["rows"] if r["tokens"] == tokens):
                fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
                lines.append(f"| {r['level']} | {r['technique']} | {r['ms']:.3f} | {fmt(r['vs level 0'], '.2f')} | "
                             f"{fmt(r['vs previous'], '.2f')} | {r['tflops']:.3g} | {fmt(r['peak_gb'], '.2f')} | {r['note']} |")
            skipped = [f"level {what.split(' at ')[0]}: {why}" for what, why in run["skipped"].items()
                       if what.endswith(f"T={tokens}")]
            parts.append("\n".join(lines + ([""] + [f"Skipped {s}." for s in skipped] if skipped else [])))
    return bench.generated_block("benchmarks/moe_journey.py", files, "\n\n".join(parts))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, choices=sorted(tilemoe.PRESETS),
                        help="model shape (default: olmoe-1b-7b on a GPU, small on a CPU)")
    parser.add_argument("--tokens", type=int, nargs="+",
                        help=f"token counts (default: {' '.join(map(str, GPU_TOKENS))} on a GPU, 64 on a CPU)")
    parser.add_argument("--levels", type=int, nargs="+", default=sorted(LEVELS), choices=sorted(LEVELS),
                        help="levels to run (default: all)")
    parser.add_argument("--naive-tokens", type=int, default=64, help="tokens level 0 really runs (default: 64)")
    parser.add_argument("--max-gb", type=float, default=None,
                        help="largest gathered-weight buffer levels 1-3 may allocate (default: 20 on a GPU, 2 on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    bench.add_output_options(parser, plot="time per level")
    args = parser.parse_args(argv)
    if args.table:
        return bench.print_tables(parser, table_markdown, args.table)
    on_gpu = DEVICE.type == "cuda"
    tokens = args.tokens or (list(GPU_TOKENS) if on_gpu else [64])
    if any(t < 1 for t in tokens) or args.naive_tokens < 1:
        parser.error(f"--tokens and --naive-tokens: expected ints >= 1, got {tokens} and {args.naive_tokens}")
    max_gb = args.max_gb if args.max_gb is not None else (20.0 if on_gpu else 2.0)
    cfg = tilemoe.get_preset(args.preset or ("olmoe-1b-7b" if on_gpu else "small"))
    layer = Layer(cfg, cfg.init_weights(device=DEVICE, dtype=DTYPE, seed=args.seed, shared=False))
    print(f"{bench.device_name(DEVICE)}, {str(DTYPE).removeprefix('torch.')}, torch {torch.__version__}; {cfg.name}: "
          f"H={cfg.hidden}, I={cfg.ffn}, E={cfg.experts}, K={cfg.top_k}")

    rows, skipped = [], {}
    for t in tokens:
        more_rows, more_skipped = measure(layer, t, args.levels, args.naive_tokens, max_gb, args.seed)
        rows += more_rows
        skipped.update(more_skipped)
    cols = ["level", "technique", "ms", "vs level 0", "vs previous", "peak_gb", "tflops", "rel_error", "check", "note"]
    for t in tokens:
        print(f"\n{cfg.name}, {t} tokens")
        print(tabulate([[r[c] for c in cols] for r in rows if r["tokens"] == t],
                       ["level", "technique", "ms", "vs level 0", "vs previous", "peak GB", "TFLOP/s", "rel. error",
                        "check", "note"], floatfmt=".3g", missingval="-"))
    for what, reason in skipped.items():
        print(f"skipped level {what}: {reason}")
    if args.record:
        path = bench.record("moe_journey", rows, DEVICE, extra={"preset": cfg.as_dict(), "dtype": str(DTYPE),
                                                                 "tokens": tokens, "skipped": skipped,
                                                                 "naive_tokens": args.naive_tokens, "max_gb": max_gb})
        print(f"recorded: {path}")
    if args.plot and rows:
        plot(rows, args.plot)
    return 1 if any(r["check"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
