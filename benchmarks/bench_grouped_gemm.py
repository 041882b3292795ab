"""
Grouped GEMMs: the chapter's CUDA kernels against cuBLAS, CUTLASS and the dense ceiling
======================================================================================

What you will learn: the GEMM at the heart of every MoE layer, measured on its own. After routing,
the M = tokens x top-k token-slots are sorted by expert, so expert e owns the row segment
``A[offsets[e]:offsets[e+1]]`` of one [M, K] matrix and multiplies it by its own weight
``W[e]`` ([N, K], nn.Linear layout): ``C_e = A_e @ W_e^T``, bf16 in, fp32 accumulate, bf16 out.
How fast that goes depends on how the work of E ragged segments reaches the GPU:

- ``naive``: ``tilemoe.cuda.grouped_gemm(variant="naive")``, one launch per expert of a plain
  shared-memory kernel with fp32 FMAs; it reads the offsets on the host (a sync) to size them;
- ``tiled``: ``tilemoe.cuda.grouped_gemm(variant="tiled")``, one persistent launch over every
  expert's tiles, tensor cores, a cp.async pipeline; the offsets stay on the device;
- ``hopper``: ``tilemoe.cuda.grouped_gemm(variant="hopper")``, the same scheduler on sm_90a with
  TMA copies into an mbarrier ring, wgmma and a warp-specialized producer (lesson 3; H100/H200);
- ``torch loop``: a Python loop of cuBLAS matmuls, one per expert (the offsets read on the host
  once per call): what most MoE code did before grouped GEMMs;
- ``grouped_mm``: PyTorch's grouped GEMM (CUTLASS on Hopper), one call for every expert;
- ``dense ceiling``: one cuBLAS GEMM [M, K] x [K, N] with the same FLOPs and no routing at all:
  what a grouped GEMM approaches when every segment is large. "% of ceiling" = ceiling ms /
  variant ms x 100.

Each preset (tilemoe.presets) gives two GEMMs: ``up`` (N = 2I, K = H: the gate and up projections
of the experts) and ``down`` (N = H, K = I). Two routings give the segments, from tilemoe.route on
seeded random router logits: ``balanced`` (the logits alone: every expert about M/E rows) and
``skewed`` (a Zipf-like popularity in a seeded random expert order, and a quarter of the experts
never chosen: one hot expert, a long tail, empty segments). Decode (1, 8, 64 tokens) leaves most
experts with a row or none: there launches and weight reads matter, not FLOPs. The ceiling reads
one expert's weights; a grouped GEMM reads every touched expert's, so at decode no variant comes
near it (and a skewed routing, touching fewer experts, runs faster than a balanced one).

Run it::

    .venv/bin/python benchmarks/bench_grouped_gemm.py                     # CPU: small preset, seconds
    python benchmarks/bench_grouped_gemm.py --record --plot gemm.png      # GPU: all presets, 1 to 16384 tokens
    python benchmarks/bench_grouped_gemm.py --preset deepseek-v3 --gemm up --tokens 16384 --routing skewed
    python benchmarks/bench_grouped_gemm.py --table results/nvidia-h200/grouped_gemm-<date>.json

Every variant is checked against an fp32 computation per segment (fp64 on a CPU) before it is
timed: outputs that take ``out=`` are filled with NaN first, so a row a kernel forgets to write
fails; rel. error within the bf16 tolerance 1e-2, else the row says FAIL and the run exits 1.
Variants this machine cannot run are listed with the reason. On a CPU the torch variants run in
float32 (bf16 matmuls are slow there) and the CUDA kernels are skipped.

Prints one table per preset, GEMM and routing: per token count and variant, ms, TFLOP/s
(2*M*N*K), % of ceiling, the speedup over ``torch loop``, ``grouped_mm`` and ``naive`` measured in
the same run, and the rel. error; then the naive -> tiled speedup over all cases. ``--record``
writes the rows to benchmarks/results/<gpu>/grouped_gemm-<date>.json, ``--plot`` a PNG of TFLOP/s
against tokens, ``--table`` the README's markdown from recorded files.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tabulate import tabulate

import tilemoe
from tilemoe import backends, bench, cuda
from tilemoe.backends.grouped_mm import grouped_mm_op

VARIANTS = ("naive", "tiled", "hopper", "torch loop", "grouped_mm", "dense ceiling")
CUDA_VARIANTS = ("naive", "tiled", "hopper")
CEILING = "dense ceiling"
BASELINES = ("torch loop", "grouped_mm", "naive")   # every row's speedup over each, same run
GEMMS = ("up", "down")
ROUTINGS = ("balanced", "skewed")
ALL_PRESETS = tuple(tilemoe.PRESETS)  # small, mixtral-8x7b, deepseek-v3, qwen3-30b-a3b, olmoe-1b-7b
GPU_TOKENS = (1, 8, 64, 4096, 16384)
CPU_TOKENS = (1, 8, 64)
TABLE_TOKENS = (16384, 4096)  # the README's table: prefill, where FLOP rates mean something
ZIPF = 1.0                    # skewed routing: expert of popularity rank r gets a logit bias -ZIPF*log(r+1)
NEVER_CHOSEN = 4              # skewed routing: 1/NEVER_CHOSEN of the experts get no rows at all


# %%
# The problem: ragged row segments of one matrix, one weight per segment
# ----------------------------------------------------------------------

def gemm_shape(cfg: tilemoe.MoEConfig, gemm: str) -> tuple[int, int]:
    """(N, K) of the experts' ``up`` (gate and up together: [2I, H]) or ``down`` ([H, I]) weights."""
    return (2 * cfg.ffn, cfg.hidden) if gemm == "up" else (cfg.hidden, cfg.ffn)


def expert_offsets(cfg: tilemoe.MoEConfig, tokens: int, routing: str, seed: int) -> torch.Tensor:
    """int32 [E+1] offsets of a seeded routing of ``tokens`` tokens, top-k of E (offsets[E] = tokens*K).

    Routed on the CPU with tilemoe.route, so a GPU and a CPU see the same segments. Top-k picks
    K distinct experts per token, so even the hottest expert gets at most one row per token.
    """
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, cfg.experts, generator=gen)
    if routing == "skewed":
        # Popularity by a random rank, not by expert index: the hot expert is not always expert 0,
        # whose segment a kernel happens to schedule first.
        rank = torch.randperm(cfg.experts, generator=gen).float()
        bias = -ZIPF * torch.log1p(rank)
        never = min(cfg.experts // NEVER_CHOSEN, cfg.experts - cfg.top_k)
        bias[rank >= cfg.experts - never] = -math.inf
        logits += bias
    return tilemoe.route(logits, cfg.top_k).offsets


@dataclass
class Case:
    """One GEMM of one preset at one token count and routing: the operands and the fp32 answer."""

    cfg: tilemoe.MoEConfig
    gemm: str
    tokens: int
    routing: str
    a: torch.Tensor        # [M, K], rows sorted by expert
    w: torch.Tensor        # [E, N, K]
    offsets: torch.Tensor  # [E+1] int32, on a's device
    bounds: list[int]      # the same offsets on the host (for the reference and the load report)

    @property
    def flops(self) -> int:
        m, k = self.a.shape
        return 2 * m * self.w.shape[1] * k

    def reference(self) -> torch.Tensor:
        """C_e = A_e @ W_e^T per segment, in fp32 (fp64 for fp32 inputs: a check needs more precision
        than what it checks). One expert's weights at a time: deepseek-v3's in fp32 would be 30 GB."""
        compute = torch.float64 if self.a.dtype == torch.float32 else torch.float32
        ref = torch.zeros(self.a.shape[0], self.w.shape[1], dtype=compute, device=self.a.device)
        for e, (start, end) in enumerate(zip(self.bounds, self.bounds[1:])):
            if end > start:
                ref[start:end] = self.a[start:end].to(compute) @ self.w[e].to(compute).t()
        return ref

    def load(self) -> tuple[int, int]:
        """(rows of the busiest expert, experts with no rows)."""
        counts = [end - start for start, end in zip(self.bounds, self.bounds[1:])]
        return max(counts), counts.count(0)


def make_case(cfg: tilemoe.MoEConfig, weights: dict, gemm: str, tokens: int, routing: str, seed: int) -> Case:
    w = weights["w_gate_up" if gemm == "up" else "w_down"]  # already [E, N, K]: nn.Linear layout
    offsets = expert_offsets(cfg, tokens, routing, seed)
    gen = torch.Generator(device=w.device).manual_seed(seed + 1)
    a = torch.randn(tokens * cfg.top_k, w.shape[2], generator=gen, device=w.device).to(w.dtype)
    return Case(cfg, gemm, tokens, routing, a, w, offsets.to(w.device), offsets.tolist())


# %%
# The variants
# ------------

def torch_loop(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One matmul per expert (cuBLAS on a GPU). Slicing needs the offsets as Python ints: a host sync
    per call, and one launch per non-empty expert however few rows it has."""
    bounds = offsets.tolist()
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            torch.mm(a[start:end], w[e].t(), out=out[start:end])
    return out


def variant_fn(name: str, case: Case) -> Callable[[torch.Tensor | None], torch.Tensor]:
    """The variant as fn(out): every variant but grouped_mm (which has no out=) writes into out."""
    a, w, offsets = case.a, case.w, case.offsets
    if name in CUDA_VARIANTS:
        # validate=False: tiled and hopper then trust the offsets (no sync); naive reads and checks them anyway.
        return lambda out: cuda.grouped_gemm(a, w, offsets, variant=name, out=out, validate=False)
    if name == "torch loop":
        return lambda out: torch_loop(a, w, offsets, out)
    if name == "grouped_mm":
        # grouped_mm multiplies by b [E, K, N]: the transposed view of [E, N, K], no copy; it takes
        # the segment ends, offsets[1:], and reads them on the device.
        return lambda out: grouped_mm_op(a, w.transpose(1, 2), offs=offsets[1:])
    b = w[0].t()  # one expert's weight for all M rows: the same FLOPs, no routing
    return lambda out: torch.mm(a, b, out=out)


def why_not(name: str, device: torch.device, dtype: torch.dtype, cfg: tilemoe.MoEConfig) -> str | None:
    """Why this machine cannot run the variant, or None."""
    if name == "hopper":
        return cuda.hopper_unavailable_reason(device) if device.type == "cuda" else cuda.unavailable_reason()
    if name in CUDA_VARIANTS:
        return cuda.unavailable_reason()
    if name == "grouped_mm":
        return backends.unavailable_reason("grouped_mm", device, dtype, cfg.hidden, cfg.ffn)
    return None


# %%
# Measuring: check first, then time
# ---------------------------------

def measure(case: Case, name: str, ref: torch.Tensor, tolerance: float) -> dict:
    """Check one variant against the reference (the ceiling computes another product: no check), then time it."""
    fn = variant_fn(name, case)
    out = None if name == "grouped_mm" else torch.empty(case.a.shape[0], case.w.shape[1], dtype=case.a.dtype,
                                                        device=case.a.device)
    err = None
    if name != CEILING:
        if out is not None:
            out.fill_(math.nan)  # a row the variant forgets to write stays NaN and fails the check
        err = tilemoe.rel_error(fn(out), ref)
    ms = bench.time_ms(lambda: fn(out), device=case.a.device)
    (m, k), n = case.a.shape, case.w.shape[1]
    busiest, empty = case.load()
    return {"preset": case.cfg.name, "gemm": case.gemm, "N": n, "K": k, "experts": case.cfg.experts,
            "tokens": case.tokens, "rows": m, "routing": case.routing, "busiest": busiest, "empty experts": empty,
            "variant": name, "ms": ms, "tflops": bench.tflops(case.flops, ms), "rel_error": err,
            "check": None if err is None else ("PASS" if err <= tolerance else "FAIL")}


def same_case(rows: list[dict], row: dict) -> dict[str, dict]:
    """The rows measured on the same GEMM, tokens and routing as row, by variant."""
    key = ("preset", "gemm", "tokens", "routing")
    return {r["variant"]: r for r in rows if all(r[k] == row[k] for k in key)}


def add_ratios(rows: list[dict]) -> None:
    """% of the dense ceiling and the speedups over the baselines, each measured in the same case."""
    for row in rows:
        same = same_case(rows, row)
        row["% of ceiling"] = 100 * same[CEILING]["ms"] / row["ms"] if CEILING in same else None
        for base in BASELINES:
            row[f"vs {base}"] = same[base]["ms"] / row["ms"] if base in same else None


def print_tables(rows: list[dict]) -> None:
    cols = ["tokens", "variant", "ms", "tflops", "% of ceiling", *(f"vs {b}" for b in BASELINES), "rel_error", "check"]
    heads = ["tokens", "variant", "ms", "TFLOP/s", "% of ceiling", *(f"vs {b}" for b in BASELINES), "rel. error", "check"]
    for key in dict.fromkeys((r["preset"], r["gemm"], r["routing"]) for r in rows):
        mine = [r for r in rows if (r["preset"], r["gemm"], r["routing"]) == key]
        first = mine[0]
        print(f"\n{key[0]} {key[1]}: C [M, {first['N']}] = A [M, {first['K']}] x W_e^T over {first['experts']} "
              f"experts, {key[2]} routing")
        print(tabulate([[r[c] for c in cols] for r in mine], heads, floatfmt=".3g", missingval="-"))


def speedup_summary(rows: list[dict]) -> str | None:
    """One line: tiled over naive, across every case that ran both."""
    ratios = sorted(r["vs naive"] for r in rows if r["variant"] == "tiled" and r["vs naive"] is not None)
    if not ratios:
        return None
    return (f"naive -> tiled: {statistics.median(ratios):.1f}x median speedup over {len(ratios)} cases "
            f"({ratios[0]:.1f}x to {ratios[-1]:.1f}x)")


# %%
# Pictures and README tables
# --------------------------

def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    gemms = list(dict.fromkeys(r["gemm"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(len(presets), len(gemms), figsize=(5 * len(gemms), 3.6 * len(presets)), squeeze=False)
    for ax_row, preset in zip(axes, presets):
        for ax, gemm in zip(ax_row, gemms):
            for color, variant in enumerate(variants):
                for routing, style in zip(ROUTINGS, ("-", "--")):
                    pts = sorted((r["tokens"], r["tflops"]) for r in rows if (r["preset"], r["gemm"], r["variant"],
                                                                              r["routing"]) == (preset, gemm, variant, routing))
                    if pts:
                        ax.plot(*zip(*pts), style, marker="o", color=f"C{color}", label=f"{variant}, {routing}")
            ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="TFLOP/s", title=f"{preset} {gemm}")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def mma_peak_tflops(device: torch.device) -> float | None:
    """The mma.sync instruction's bf16 rate on this GPU (tilemoe.cuda.mma_peak_probe), the ceiling of
    the tiled kernel's math; None where the CUDA kernels do not run."""
    if device.type != "cuda" or cuda.unavailable_reason() is not None:
        return None
    launch, flops = cuda.mma_peak_probe(device)
    return bench.tflops(flops, bench.time_ms(launch, device=device))


def table_markdown(files: list) -> str:
    """The README's tables for recorded runs: per preset, one row per GEMM, prefill token count and
    routing; TFLOP/s per variant and the chapter's kernels' % of the dense ceiling."""
    parts = []
    for path in map(Path, files):
        run = json.loads(path.read_text())
        rows = run["rows"]
        link = bench.link_from(Path(__file__).parent, path)
        parts.append(f"{run['gpu'] or run['device']}, torch {run['torch']}, {run['dtype'].removeprefix('torch.')}, "
                     f"commit {run['commit'][:7]}, `{run['command']}`, {run['date'][:10]}; [{path.name}]({link}). "
                     "Cells: TFLOP/s (2*M*N*K, M = tokens x top-k rows); the dense ceiling is one cuBLAS GEMM "
                     "[M, K] x [K, N] of the same FLOPs, measured in the same run."
                     + (f" The mma.sync instruction's own peak on this GPU, measured in the same run with "
                        f"registers only (csrc/mma_peak.cu): {run['mma_sync_peak_tflops']:.0f} TFLOP/s."
                        if run.get("mma_sync_peak_tflops") else ""))
        variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
        ours = [v for v in ("tiled", "hopper") if v in variants]  # their % of the ceiling gets a column
        recorded = list(dict.fromkeys(r["tokens"] for r in rows))
        tokens = [t for t in TABLE_TOKENS if t in recorded] or recorded
        for preset in dict.fromkeys(r["preset"] for r in rows):
            cfg = tilemoe.get_preset(preset)
            shapes = "; ".join("{}: N={}, K={}".format(g, *gemm_shape(cfg, g)) for g in GEMMS)
            lines = [f"**{preset}** (E={cfg.experts}, top-{cfg.top_k}; {shapes})", "",
                     "| gemm | tokens | routing | " + " | ".join(variants)
                     + "".join(f" | {v} % of ceiling" for v in ours) + " |",
                     "|---" * (len(variants) + len(ours) + 3) + "|"]
            for gemm in GEMMS:
                for t in tokens:
                    for routing in ROUTINGS:
                        same = {r["variant"]: r for r in rows if (r["preset"], r["gemm"], r["tokens"], r["routing"])
                                == (preset, gemm, t, routing)}
                        if not same:
                            continue
                        cells = [f"{same[v]['tflops']:.3g}" if v in same else "-" for v in variants]
                        for v in ours:
                            pct = same.get(v, {}).get("% of ceiling")
                            cells.append("-" if pct is None else f"{pct:.0f}%")
                        lines.append(f"| {gemm} | {t} | {routing} | " + " | ".join(cells) + " |")
            parts.append("\n".join(lines))
    return bench.generated_block("benchmarks/bench_grouped_gemm.py", files, "\n\n".join(parts))


# %%
# The program
# -----------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", choices=[*ALL_PRESETS, "all"], metavar="PRESET",
                        help=f"presets ({', '.join(ALL_PRESETS)}) or 'all' (default: small on a CPU, all on a GPU)")
    parser.add_argument("--tokens", type=int, nargs="+",
                        help=f"token counts (default: {' '.join(map(str, CPU_TOKENS))} on a CPU, "
                             f"{' '.join(map(str, GPU_TOKENS))} on a GPU)")
    parser.add_argument("--gemm", nargs="+", choices=GEMMS, default=list(GEMMS), help="which GEMMs (default: both)")
    parser.add_argument("--routing", nargs="+", choices=ROUTINGS, default=list(ROUTINGS), help="which routings (default: both)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="what to run (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    bench.add_output_options(parser, plot="TFLOP/s against tokens")
    args = parser.parse_args(argv)
    if args.table:
        return bench.print_tables(parser, table_markdown, args.table)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    presets = args.preset or (list(ALL_PRESETS) if on_gpu else ["small"])
    if "all" in presets:
        presets = list(ALL_PRESETS)
    tokens = args.tokens or list(GPU_TOKENS if on_gpu else CPU_TOKENS)
    if any(t < 1 for t in tokens):
        parser.error(f"--tokens: expected ints >= 1, got {tokens}")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    tolerance = tilemoe.TOLERANCE[dtype]
    print(f"{bench.device_name(device)}, torch {torch.__version__}, "
          + ("bfloat16" if on_gpu else "float32 (a CPU: bf16 matmuls are slow here; a GPU runs bfloat16)"))

    rows, skipped = [], {}
    for preset in presets:
        cfg = tilemoe.get_preset(preset)
        runnable = []
        for name in args.variants:
            if (reason := why_not(name, device, dtype, cfg)) is None:
                runnable.append(name)
            else:
                skipped[name] = reason
        # Both GEMMs' weights, made once per preset: deepseek-v3's are 22 GB in bf16.
        weights = cfg.init_weights(device=device, dtype=dtype, seed=args.seed, shared=False)
        for gemm in args.gemm:
            for t in tokens:
                for routing in args.routing:
                    case = make_case(cfg, weights, gemm, t, routing, args.seed)
                    ref = case.reference()
                    busiest, empty = case.load()
                    print(f"  {preset} {gemm} T={t} {routing}: M={case.a.shape[0]} rows, busiest expert "
                          f"{busiest}, {empty} of {cfg.experts} empty", flush=True)
                    for name in runnable:
                        rows.append(measure(case, name, ref, tolerance))
                        print(f"    {name}: {rows[-1]['ms']:.3f} ms {rows[-1]['check'] or '(not checked)'}", flush=True)
                    del case, ref
        del weights
        if on_gpu:
            torch.cuda.empty_cache()
    add_ratios(rows)
    print_tables(rows)
    peak = mma_peak_tflops(device) if "tiled" in args.variants else None
    if peak is not None:
        print(f"\nmma.sync peak on this GPU (csrc/mma_peak.cu, registers only): {peak:.0f} TFLOP/s; "
              f"the tiled kernel's best row reached {max(r['tflops'] for r in rows if r['variant'] == 'tiled'):.0f}")
    if (summary := speedup_summary(rows)) is not None:
        print(f"\n{summary}")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    if args.record:
        path = bench.record("grouped_gemm", rows, device, extra={
            "dtype": str(dtype), "presets": presets, "tokens": tokens, "gemms": args.gemm, "routings": args.routing,
            "seed": args.seed, "skew": {"zipf": ZIPF, "never_chosen_share": 1 / NEVER_CHOSEN},
            "tolerance": tolerance, "skipped": skipped, "mma_sync_peak_tflops": peak,
        })
        print(f"recorded: {path}")
    if args.plot:
        plot(rows, args.plot)
    failed = [r for r in rows if r["check"] == "FAIL"]
    for r in failed:
        print(f"FAIL: {r['preset']} {r['gemm']} T={r['tokens']} {r['routing']} {r['variant']}: "
              f"rel. error {r['rel_error']:.3g} > {tolerance:g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
