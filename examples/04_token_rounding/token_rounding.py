"""
Tile-aware token rounding, one routing decision at a time
=========================================================

In this lesson you will learn:

* why a grouped GEMM wastes work: it runs each expert's rows in tiles of, say, 128 rows, so an
  expert with 142 tokens pays for 256 rows;
* the rule of token rounding (SonicMoE, Guo et al., arXiv 2512.14080): round every expert's token
  count to a multiple of the tile, dropping the expert's lowest-scored tokens ("down") or adding
  the best-scored tokens that did not pick it ("up"), and the four modes of ``tilemoe.rounding``;
* what each mode costs on a real model's router: tile utilization before and after, the padded
  rows that disappear, the (token, expert) pairs dropped or added, and the tokens left with no
  expert at all.

Run it (CPU, a few seconds; only the router is built: tokens x [T, H] and a router weight [E, H])::

    .venv/bin/python examples/04_token_rounding/token_rounding.py
    .venv/bin/python examples/04_token_rounding/token_rounding.py --preset deepseek-v3 --tokens 4096
    .venv/bin/python examples/04_token_rounding/token_rounding.py --skew 1 --plot rounding.png

What it prints: (a) the rounding rule on a few example counts (``tilemoe.rounding.target_counts``),
(b) the load statistics of vanilla top-k routing, (c) one row per mode of
``tilemoe.rounding.MODES`` (``RoundingStats.as_row()`` plus the tile rows a grouped GEMM runs),
(d) a few experts' token counts before and after each mode. ``--plot PATH`` draws every expert's
count before and after each mode (needs matplotlib).
"""

from __future__ import annotations

import argparse
import sys

import torch
from tabulate import tabulate

import tilemoe
from tilemoe.routing import tile_rows
from tilemoe import rounding

# Counts for the rule table (a): empty, a partial tile, exact tiles, the README's worked example.
EXAMPLE_COUNTS = (0, 37, 100, 128, 142, 200, 256)


# %%
# The router
# ----------
# Rounding needs only the router: its scores rank every (token, expert) pair. We draw random tokens
# and an nn.Linear-like router weight (std 1/sqrt(H)) of the preset's shape, instead of
# cfg.init_weights, which would also allocate every expert's weights. --skew adds the Zipf-like
# logit bias of examples/01 (-skew * log(e + 1) for expert e): trained routers are uneven, and
# rounding has more to do when they are.

def make_logits(cfg: tilemoe.MoEConfig, tokens: int, skew: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cfg.hidden, generator=g)
    router_weight = torch.randn(cfg.experts, cfg.hidden, generator=g) / cfg.hidden**0.5
    logits = tilemoe.router_logits(x, router_weight)
    return logits - skew * torch.arange(1, cfg.experts + 1, dtype=logits.dtype).log()


def router_scores(cfg: tilemoe.MoEConfig, logits: torch.Tensor) -> torch.Tensor:
    """The scores rounding ranks by and weights with: the router's own (softmax or sigmoid)."""
    return logits.softmax(dim=-1) if cfg.scoring == "softmax" else logits.sigmoid()


# %%
# (a) The rule on one count
# -------------------------
# target_counts rounds a count to a multiple of the tile: down, up (never past T: an expert takes
# each token at most once), nearest (a remainder of half a tile or more goes up), adaptive (the
# closer multiple, up on a tie; round_routing later also rounds up any expert whose dropping would
# leave a token with no expert).

def rule_table(tile: int, tokens: int) -> None:
    counts = torch.tensor([c * tile // 128 for c in EXAMPLE_COUNTS])  # scaled to the tile
    rows = [[int(c), int(c) % tile] for c in counts]
    for mode in rounding.MODES:
        for row, target in zip(rows, rounding.target_counts(counts, tile, mode, tokens).tolist()):
            row.append(target)
    print(f"(a) The rule: an expert's count rounded to a multiple of the tile ({tile} rows)")
    print(tabulate(rows, headers=["count", f"count % {tile}", *rounding.MODES]))
    print("(adaptive before its orphan rescue; see (c))")


# %%
# (c) Every mode on the same routing decision
# -------------------------------------------
# RoundingStats counts what rounding did. "tile rows" is what a grouped GEMM with this tile runs
# (every expert's count rounded up to whole tiles): the work, in rows. Rounding "down" makes every
# tile full and runs the fewest rows, at the price of dropped pairs; "up" keeps every pair and runs
# more rows than vanilla, but each of them is a real token; "nearest" and "adaptive" split the
# difference, one expert at a time.

def compare_modes(cfg: tilemoe.MoEConfig, logits: torch.Tensor, tile: int) -> tuple[list[int], dict]:
    vanilla = tilemoe.route(logits, cfg.top_k, **cfg.router_options())
    scores = router_scores(cfg, logits)
    before = vanilla.counts.tolist()
    print(f"\n(b) Vanilla top-{cfg.top_k} routing: {sum(before)} (token, expert) pairs over {cfg.experts} experts, "
          f"{sum(before) / cfg.experts:.1f} each on average = {sum(before) / cfg.experts / tile:.2f} tiles of {tile}")
    print(tabulate([tilemoe.load_stats(before, tile).as_row()], headers="keys", floatfmt=".3f"))

    results, rows = {}, []
    vanilla_rows = tile_rows(before, tile)
    for mode in rounding.MODES:
        out = rounding.round_routing(scores, vanilla, tile, mode, renormalize=cfg.renormalize,
                                     routed_scaling=cfg.routed_scaling)
        results[mode] = out
        run = tile_rows(out.stats.counts_after, tile)
        rows.append({**out.stats.as_row(), "tile rows": run, "rows vs vanilla": run / vanilla_rows,
                     "max experts / token": out.routing.top_k})
    print(f"\n(c) Rounding every expert's count to a multiple of {tile}; vanilla runs {vanilla_rows} tile rows")
    print(tabulate(rows, headers="keys", floatfmt=".3f"))
    return before, results


# %%
# (d) A few experts up close
# --------------------------
# Experts spread over the range of remainders (count % tile): a small remainder is cheap to drop, a
# large one cheap to fill up. "nearest" and "adaptive" follow the remainder; "adaptive" may round
# up where "nearest" rounds down, to keep a token that would otherwise lose every expert.

def expert_view(before: list[int], results: dict, tile: int, shown: int) -> None:
    by_remainder = sorted(range(len(before)), key=lambda e: (before[e] % tile, e))
    step = max(1, len(before) // shown)
    experts = by_remainder[::step][:shown]
    rows = [[e, before[e], before[e] % tile, *(results[m].stats.counts_after[e] for m in rounding.MODES)]
            for e in experts]
    print(f"\n(d) {len(experts)} experts, from the smallest remainder to the largest: tokens before -> after")
    print(tabulate(rows, headers=["expert", "before", f"before % {tile}", *rounding.MODES]))


# %%
# The picture
# -----------

def plot_counts(before: list[int], results: dict, tile: int, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        sys.exit('--plot needs matplotlib: pip install -e ".[plot]"')
    matplotlib.use("Agg")  # write a file; no display needed
    import matplotlib.pyplot as plt

    order = sorted(range(len(before)), key=lambda e: -before[e])  # experts by vanilla load
    columns = 2
    rows = -(-len(results) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.5 * rows), sharex=True, sharey=True,
                             squeeze=False)
    for ax, (mode, out) in zip(axes.flat, results.items()):
        ax.bar(range(len(order)), [before[e] for e in order], color="lightgray", label="vanilla top-k")
        ax.plot(range(len(order)), [out.stats.counts_after[e] for e in order], "o", markersize=3,
                color="tab:red", label="rounded")
        for level in range(tile, max(before + out.stats.counts_after) + tile, tile):
            ax.axhline(level, color="black", linewidth=0.3)  # tile boundaries
        ax.set_title(f"{mode}: util {out.stats.utilization_before:.3f} -> {out.stats.utilization_after:.3f}")
    for ax in axes[-1]:
        ax.set_xlabel("expert, by vanilla load")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"tokens (lines: every {tile})")
    axes[0, 0].legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nWrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Tile-aware token rounding on one routing decision of a preset's router: every mode compared.")
    parser.add_argument("--preset", default="olmoe-1b-7b", choices=sorted(tilemoe.PRESETS),
                        help="router shape and options: E, K, H, scoring (default: olmoe-1b-7b)")
    parser.add_argument("--tokens", type=int, default=16384, help="T, tokens routed together (default: 16384)")
    parser.add_argument("--tile", type=int, default=128, help="rows per tile of the grouped GEMM (default: 128)")
    parser.add_argument("--skew", type=float, default=0.0,
                        help="Zipf exponent of a logit bias -skew*log(e+1) making the router uneven (default: 0)")
    parser.add_argument("--experts-shown", type=int, default=8, help="experts in the close-up (d) (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tokens and the router (default: 0)")
    parser.add_argument("--plot", metavar="PATH", help="also write every expert's count before/after to this PNG")
    args = parser.parse_args(argv)
    for name in ("tokens", "tile", "experts_shown"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")

    cfg = tilemoe.get_preset(args.preset)
    print(f"{args.preset}: E = {cfg.experts} experts, top-{cfg.top_k}, H = {cfg.hidden}, {cfg.scoring} scores"
          f"{'' if cfg.renormalize else ', weights not renormalized'}; T = {args.tokens} tokens, "
          f"tile = {args.tile} rows, skew = {args.skew:g}\n")
    rule_table(args.tile, args.tokens)
    logits = make_logits(cfg, args.tokens, args.skew, args.seed)
    before, results = compare_modes(cfg, logits, args.tile)
    expert_view(before, results, args.tile, args.experts_shown)
    if args.plot:
        plot_counts(before, results, args.tile, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
