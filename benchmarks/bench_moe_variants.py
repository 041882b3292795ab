"""
Every way of running an MoE layer, side by side
===============================================

What you will learn: how far each way of running the experts is from the floor, at decode (1 and
64 tokens) and prefill (4096 and 16384 tokens), on the chapter's model shapes. Every variant is
checked against ``tilemoe.reference_moe`` on the same inputs before it is timed, and every ratio is
against baselines measured in the same run.

Run it::

    .venv/bin/python benchmarks/bench_moe_variants.py                  # CPU: small preset, seconds
    python benchmarks/bench_moe_variants.py --preset all --record      # GPU: 4 models x 1/64/4096/16384 tokens
    python benchmarks/bench_moe_variants.py --preset olmoe-1b-7b --tokens 16384 --variants grouped_mm triton

Variants (those this machine cannot run are listed with the reason and skipped):

- ``torch``: the classic loop, one matmul pair per expert (a host sync per forward);
- ``grouped_mm``: PyTorch's grouped GEMM (CUTLASS on Hopper): **the baseline of every speedup**;
- ``triton``: the chapter's fused Triton kernels (tilemoe/triton/);
- ``triton+rounding``: the same kernels on a routing rounded to the 128-row tile ("nearest",
  tilemoe.rounding); rounding changes which tokens meet which expert, so it is checked against
  the reference run on that same rounded routing, and its routing is made before timing (it reads
  statistics on the host): its time is the experts only, next to ``triton experts`` (the experts
  only, on the top-k routing);
- ``grouped_mm graphed`` / ``triton graphed`` / ``cuda graphed``: the same layer captured in a CUDA
  graph and replayed (tilemoe.graphs.GraphedMoE): the decode path, without launch and Python
  overhead. Every backend is graphed, so the graph's gain is not credited to the kernels;
- ``cuda``: the chapter's CUDA C++ kernels (csrc/), when tilemoe._C is built: on an H100/H200 the
  fused Hopper up-projection (gather + SwiGLU) and the Hopper grouped GEMM, elsewhere lesson 2's
  tiled kernel in the grouped_mm pipeline;
- ``sonicmoe``: SonicMoE's kernels (arXiv 2512.14080) on tilemoe's routing, when installed;
- ``sonicmoe module``: SonicMoE as its authors ship it, its ``MoE`` module holding the same weights:
  it routes by itself (softmax over the top-k of bf16 logits, whatever the preset's router), so it
  is checked against the reference run on its own choice of experts. For olmoe-1b-7b that choice
  is mostly the preset's (bf16 logits pick another top-8 for a few percent of the tokens, and the
  weights are renormalized); for deepseek-v3 it is not (no sigmoid, no groups), with the same
  FLOPs. The row records the bf16 ties at the top-k boundary;
- ``dense floor``: two cuBLAS GEMMs with the layer's FLOPs and no routing ([T*K, H] x [H, 2I]
  and [T*K, I] x [I, H], ``tilemoe.floors.forward_gemms``): what perfect grouped kernels approach
  when arithmetic bounds them;
- ``weights read``: the bytes of every expert the batch touches, read once at the copy bandwidth
  measured in the same run (a model, not a kernel): what bounds a decode batch.

"% of floor" compares with the larger of the two floors. "vs sonicmoe" compares with the faster of
the two SonicMoE rows in the same run: the chapter's kernels against SonicMoE at its best.

Every layer variant's time is the whole forward through ``tilemoe.moe_forward``: router logits,
top-k, routing metadata, experts, combine. FLOPs: 6*T*K*H*I. Peak memory: what one forward
allocates beyond the inputs and weights. On a GPU, the median SM clock while each variant was
timed, and the share of samples in which the power cap held it down (``tilemoe.clocks``: a time
says nothing about the clock it was taken at). With ``--energy``, each variant's joules per forward
too, and the board's mean power, from 1.5 s of back-to-back forwards (``clocks.energy_per_call``): on
a power-capped GPU a forward takes at least its energy divided by the power limit. Prints one table
per preset; ``--record`` writes the rows to benchmarks/results/<gpu>/moe_variants-<date>.json,
``--plot`` a PNG of TFLOP/s against tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tabulate import tabulate

import tilemoe
from tilemoe import backends, bench, clocks, floors
from tilemoe.graphs import GraphedMoE

LAYER_VARIANTS = ("torch", "grouped_mm", "triton", "cuda", "sonicmoe")
MODULE_VARIANT = backends.sonic.MODULE_NAME  # SonicMoE's own MoE module
SONIC_VARIANTS = ("sonicmoe", MODULE_VARIANT)
GRAPHED_VARIANTS = ("grouped_mm graphed", "triton graphed", "cuda graphed")
EXPERT_VARIANTS = ("triton experts", "triton+rounding")
FLOORS = ("dense floor", "weights read")
VARIANTS = (*LAYER_VARIANTS, MODULE_VARIANT, *GRAPHED_VARIANTS, *EXPERT_VARIANTS, *FLOORS)
BASELINE = "grouped_mm"
GPU_PRESETS = ("olmoe-1b-7b", "qwen3-30b-a3b", "deepseek-v3", "mixtral-8x7b")
GPU_TOKENS = (1, 64, 4096, 16384)
ROUNDING_TILE = 128


@dataclass
class Case:
    """One preset at one token count: inputs, weights, the routing, and the reference output."""

    cfg: tilemoe.MoEConfig
    tokens: int
    x: torch.Tensor
    weights: dict
    routing: tilemoe.Routing

    def forward(self, backend: str, routing: tilemoe.Routing | None = None) -> torch.Tensor:
        return tilemoe.moe_forward(self.x, **self.weights, top_k=self.cfg.top_k, backend=backend,
                                   routing=routing, **self.cfg.router_options())

    def experts(self, backend: str, routing: tilemoe.Routing) -> torch.Tensor:
        """The backend's experts alone on a routing made beforehand (any width K')."""
        return backends.BACKENDS[backend].experts(self.x, routing, self.weights["w_gate_up"], self.weights["w_down"])

    def reference(self, routing: tilemoe.Routing) -> torch.Tensor:
        compute = torch.promote_types(self.x.dtype, torch.float32)
        return tilemoe.reference_moe(self.x.to(compute), **{k: v.to(compute) for k, v in self.weights.items()},
                                     top_k=self.cfg.top_k, routing=routing)


def make_case(cfg: tilemoe.MoEConfig, tokens: int, device: torch.device, dtype: torch.dtype, seed: int) -> Case:
    weights = cfg.init_weights(device=device, dtype=dtype, seed=seed, shared=False)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(tokens, cfg.hidden, generator=gen, device=device).to(dtype)
    routing = tilemoe.route(tilemoe.router_logits(x, weights["router_weight"]), cfg.top_k, **cfg.router_options())
    return Case(cfg, tokens, x, weights, routing)


def rounded_routing(case: Case) -> tilemoe.Routing:
    logits = tilemoe.router_logits(case.x, case.weights["router_weight"])
    scores = logits.softmax(-1) if case.cfg.scoring == "softmax" else logits.sigmoid()
    return tilemoe.round_routing(scores, case.routing, ROUNDING_TILE, "nearest", renormalize=case.cfg.renormalize,
                                 routed_scaling=case.cfg.routed_scaling).routing


def dense_floor(case: Case) -> Callable[[], object]:
    """``tilemoe.floors.forward_gemms`` for the case: the layer's FLOPs as two GEMMs, no routing."""
    return floors.forward_gemms(case.tokens * case.cfg.top_k, case.cfg.hidden, case.cfg.ffn,
                                device=case.x.device, dtype=case.x.dtype)


def copy_gbps(device: torch.device) -> float:
    """Device memory bandwidth in GB/s, bytes read plus bytes written by a 1 GB copy."""
    src = torch.empty(2**29, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = bench.time_ms(lambda: dst.copy_(src), device=device)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def weights_read_ms(case: Case, gbps: float) -> float:
    """Reading every touched expert's weights once (3*H*I each) at gbps."""
    touched = int((case.routing.counts > 0).sum())
    return touched * 3 * case.cfg.hidden * case.cfg.ffn * case.x.element_size() / (gbps * 1e9) * 1e3


def why_not(name: str, device: torch.device, dtype: torch.dtype, cfg: tilemoe.MoEConfig) -> str | None:
    backend = {"triton experts": "triton", "triton+rounding": "triton", MODULE_VARIANT: "sonicmoe"}.get(
        name, name.removesuffix(" graphed"))
    if backend in FLOORS:
        return None
    if name in GRAPHED_VARIANTS and device.type != "cuda":
        return "CUDA graphs need a CUDA GPU"
    return backends.unavailable_reason(backend, device, dtype, cfg.hidden, cfg.ffn)


def measure(case: Case, name: str, device: torch.device, tolerance: float, quick: bool, gbps: float,
            energy: bool = False) -> dict:
    """Check one variant against the reference, then time it (and with ``energy``, measure its joules
    per forward). Returns its row."""
    row = {"preset": case.cfg.name, "tokens": case.tokens, "variant": name}
    if name == "weights read":
        ms = weights_read_ms(case, gbps)
        row.update(ms=ms, tflops=bench.tflops(case.cfg.flops(case.tokens), ms), rel_error=None, check=None,
                   peak_gb=None, modelled=True)
        return row
    if name == "dense floor":
        fn, err = dense_floor(case), None
    elif name in LAYER_VARIANTS:
        fn = lambda: case.forward(name)  # noqa: E731
        err = tilemoe.rel_error(fn(), case.reference(case.routing)) if not quick else None
    elif name == MODULE_VARIANT:
        w = case.weights
        module = backends.sonic.module_with_weights(w["router_weight"], w["w_gate_up"], w["w_down"], case.cfg.top_k)
        fn = lambda: backends.sonic.module_forward(module, case.x)[0]  # noqa: E731
        err = None
        if not quick:
            routing, row["module routing"], row["bf16 ties"] = backends.sonic.module_routing(module, case.x)
            err = tilemoe.rel_error(fn(), case.reference(routing))
    elif name in GRAPHED_VARIANTS:
        graphed = GraphedMoE(case.weights, case.cfg.top_k, backend=name.removesuffix(" graphed"), **case.cfg.router_options())
        fn = lambda: graphed(case.x)  # noqa: E731
        err = tilemoe.rel_error(fn(), case.reference(case.routing)) if not quick else None
    else:
        routing = rounded_routing(case) if name == "triton+rounding" else case.routing
        fn = lambda: case.experts("triton", routing)  # noqa: E731
        err = tilemoe.rel_error(fn(), case.reference(routing)) if not quick else None
        if name == "triton+rounding":
            counts = routing.counts.tolist()
            row["rows computed"] = tilemoe.routing.tile_rows(counts, ROUNDING_TILE)
    with torch.no_grad():
        with clocks.Sampler(device) as sampled:
            ms = bench.time_ms(fn, device=device)
        # A graph allocated its memory once, at capture, in a pool of its own: a replay allocates nothing.
        peak = bench.peak_bytes(fn, device) if name not in GRAPHED_VARIANTS else None
        if energy:
            row.update(clocks.energy_per_call(fn, device))
    row.update(ms=ms, tflops=bench.tflops(case.cfg.flops(case.tokens), ms), rel_error=err,
               check=None if err is None else ("PASS" if err <= tolerance else "FAIL"),
               peak_gb=None if peak is None else peak / 1e9, **sampled.summary())
    return row


def add_ratios(rows: list[dict]) -> None:
    """Speedup over the grouped_mm baseline, % of the dense floor and the ratio to SonicMoE's faster
    row, within each (preset, tokens)."""
    for row in rows:
        same = {r["variant"]: r for r in rows if r["preset"] == row["preset"] and r["tokens"] == row["tokens"]}
        base, sonic_ms = same.get(BASELINE), best_sonic_ms(same)
        floor = max((same[f]["ms"] for f in FLOORS if f in same), default=None)
        row["vs grouped_mm"] = base["ms"] / row["ms"] if base else None
        row["% of floor"] = 100 * floor / row["ms"] if floor else None
        row["vs sonicmoe"] = sonic_ms / row["ms"] if sonic_ms else None


def best_sonic_ms(same: dict) -> float | None:
    """The faster of SonicMoE's rows among one (preset, tokens)'s rows by variant, or None."""
    return min((same[v]["ms"] for v in SONIC_VARIANTS if v in same), default=None)


def print_table(rows: list[dict]) -> None:
    cols = ["tokens", "variant", "ms", "tflops", "vs grouped_mm", "vs sonicmoe", "% of floor", "peak_gb", "rel_error", "check",
            "sm_clock_mhz", "power_capped", "energy_j", "power_w"]
    heads = ["tokens", "variant", "ms", "TFLOP/s", f"vs {BASELINE}", "vs sonicmoe", "% of floor", "peak GB", "rel. error", "check",
             "SM MHz", "power-capped", "J", "W"]
    for preset in dict.fromkeys(r["preset"] for r in rows):
        cfg = tilemoe.get_preset(preset)
        print(f"\n{preset}: H={cfg.hidden}, I={cfg.ffn}, E={cfg.experts}, K={cfg.top_k}")
        table = [[r.get(c) for c in cols] for r in rows if r["preset"] == preset]
        print(tabulate(table, heads, floatfmt=".3g", missingval="-"))


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(1, len(presets), figsize=(4.5 * len(presets), 3.8), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        for variant in dict.fromkeys(r["variant"] for r in rows):
            pts = sorted((r["tokens"], r["tflops"]) for r in rows if r["preset"] == preset and r["variant"] == variant)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=variant)
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="TFLOP/s", title=preset)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def table_markdown(files: list) -> str:
    """The README's tables for recorded runs: per preset, one row per token count, one column per
    variant (ms and the speedup over grouped_mm in the same run); where SonicMoE ran, the speed of
    the chapter's triton and cuda layers relative to its faster row, in the same run (above 1: faster)."""
    parts = []
    for path in map(Path, files):
        run = json.loads(path.read_text())
        rows = run["rows"]
        link = bench.link_from(Path(__file__).parent, path)
        variants = [v for v in VARIANTS if v not in FLOORS and any(r["variant"] == v for r in rows)]
        versus_sonic = [v for v in ("triton", "cuda") if v in variants and any(s in variants for s in SONIC_VARIANTS)]
        parts.append(f"{run['gpu'] or run['device']}, torch {run['torch']}, triton {run['triton']}, "
                     f"{run['dtype'].removeprefix('torch.')}, commit {run['commit'][:7]}, `{run['command']}`, "
                     f"{run['date'][:10]}; copy bandwidth {run['copy_gbps']:.0f} GB/s; [{path.name}]({link}). "
                     f"Cells: ms, and in parentheses the speedup over `{run['baseline']}` in the same run; "
                     "floor = the larger of the dense GEMM pair and the weights read."
                     + (" 'vs sonicmoe': the faster SonicMoE row's ms over the layer's (above 1: ours is faster)."
                        if MODULE_VARIANT in variants else ""))
        for preset in dict.fromkeys(r["preset"] for r in rows):
            cfg = tilemoe.get_preset(preset)
            lines = [f"**{preset}** (H={cfg.hidden}, I={cfg.ffn}, E={cfg.experts}, K={cfg.top_k})", "",
                     "| tokens | " + " | ".join(variants + [f"{v} vs sonicmoe" for v in versus_sonic])
                     + " | floor ms | triton % of floor |",
                     "|---" * (len(variants) + len(versus_sonic) + 3) + "|"]
            for tokens in dict.fromkeys(r["tokens"] for r in rows if r["preset"] == preset):
                same = {r["variant"]: r for r in rows if r["preset"] == preset and r["tokens"] == tokens}
                cells = [f"{same[v]['ms']:.3f} ({same[v]['vs grouped_mm']:.2f}x)" if v in same else "-" for v in variants]
                sonic_ms = best_sonic_ms(same)
                cells += [f"{sonic_ms / same[v]['ms']:.2f}x" if v in same and sonic_ms else "-" for v in versus_sonic]
                floor = max((same[f]["ms"] for f in FLOORS if f in same), default=None)
                pct = f"{same['triton']['% of floor']:.0f}%" if "triton" in same and floor else "-"
                lines.append(f"| {tokens} | " + " | ".join(cells) + f" | {floor:.3f} | {pct} |" if floor else
                             f"| {tokens} | " + " | ".join(cells) + " | - | - |")
            same_preset = [r for r in rows if r["preset"] == preset]
            parts.append("\n".join(lines + clock_lines(same_preset) + energy_lines(same_preset)))
    return bench.generated_block("benchmarks/bench_moe_variants.py", files, "\n\n".join(parts))


def clock_lines(rows: list[dict]) -> list[str]:
    """Under a preset's table, for runs that sampled the clock (``tilemoe.clocks``): per token count,
    each variant's median SM clock while it was timed and the share of samples the power cap held it."""
    sampled = [r for r in rows if r.get("sm_clock_mhz") is not None]
    if not sampled:
        return []
    return lines_by_tokens(sampled, clocks.caption(sampled[0]["max_sm_clock_mhz"], sampled[0]["power_limit_w"]),
                           lambda r: clocks.cell(r["sm_clock_mhz"], r["power_capped"]))


def energy_lines(rows: list[dict]) -> list[str]:
    """Under a preset's table, for runs with ``--energy``: per token count, each variant's joules per
    forward, the board's mean power and its time per call, run back to back (``clocks.energy_per_call``)."""
    measured = [r for r in rows if r.get("energy_j") is not None]
    if not measured:
        return []
    return lines_by_tokens(measured, clocks.energy_caption(measured[0]["power_limit_w"], "per forward"),
                           lambda r: clocks.energy_cell(r["energy_j"], r["power_w"], r["loop_ms"]))


def lines_by_tokens(rows: list[dict], caption: str, cell: Callable[[dict], str]) -> list[str]:
    """A blank line, the caption, then one line per token count: each row's variant and its cell."""
    lines = ["", caption]
    for tokens in dict.fromkeys(r["tokens"] for r in rows):
        lines.append(f"- {tokens} tokens: " + ", ".join(f"{r['variant']} {cell(r)}" for r in rows if r["tokens"] == tokens))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=None,
                        help=f"presets, or 'all' = {' '.join(GPU_PRESETS)} (default: small on a CPU, all on a GPU)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help=f"token counts (default: 64 on a CPU, {' '.join(map(str, GPU_TOKENS))} on a GPU)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="what to run (default: all)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", action="store_true", help="skip the reference checks (timing only)")
    parser.add_argument("--energy", action="store_true",
                        help="also measure each variant's joules per forward and the board's mean power "
                             f"({clocks.ENERGY_SECONDS:g} s of back-to-back forwards each; a GPU with NVML)")
    bench.add_output_options(parser, plot="TFLOP/s against tokens")
    args = parser.parse_args(argv)
    if args.table:
        return bench.print_tables(parser, table_markdown, args.table)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    presets = args.preset or (list(GPU_PRESETS) if on_gpu else ["small"])
    if presets == ["all"]:
        presets = list(GPU_PRESETS)
    for p in presets:
        try:
            tilemoe.get_preset(p)
        except ValueError as exc:
            parser.error(f"--{exc}")
    tokens = args.tokens or (list(GPU_TOKENS) if on_gpu else [64])
    if any(t < 1 for t in tokens):
        parser.error(f"--tokens: expected ints >= 1, got {tokens}")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    tolerance = tilemoe.TOLERANCE[dtype]
    print(f"{bench.device_name(device)}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}")

    gbps = copy_gbps(device)
    print(f"copy bandwidth {gbps:.0f} GB/s (read + write)")
    rows, skipped, failed = [], {}, False
    for preset in presets:
        cfg = tilemoe.get_preset(preset)
        for t in tokens:
            case = make_case(cfg, t, device, dtype, args.seed)
            for name in args.variants:
                if (reason := why_not(name, device, dtype, cfg)) is not None:
                    skipped[name] = reason
                    continue
                if name == "triton+rounding" and t * cfg.top_k < ROUNDING_TILE * cfg.experts:
                    skipped[f"{name} at {preset} T={t}"] = (f"{t * cfg.top_k / cfg.experts:.3g} rows per expert, fewer than "
                                                            f"the {ROUNDING_TILE}-row tile: rounding would drop or pad most of them")
                    continue
                row = measure(case, name, device, tolerance, args.no_check, gbps, args.energy)
                failed |= row["check"] == "FAIL"
                rows.append(row)
                print(f"  {preset} T={t} {name}: {row['ms']:.3f} ms {row['check'] or ''}", flush=True)
            del case
            if on_gpu:
                torch.cuda.empty_cache()
    add_ratios(rows)
    print_table(rows)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    if args.record:
        path = bench.record("moe_variants", rows, device, extra={
            "dtype": str(dtype), "presets": presets, "tokens": tokens, "baseline": BASELINE,
            "rounding": {"tile": ROUNDING_TILE, "mode": "nearest"}, "skipped": skipped, "copy_gbps": gbps,
            "sonicmoe": backends.sonic.versions(),
        })
        print(f"recorded: {path}")
    if args.plot:
        plot(rows, args.plot)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
