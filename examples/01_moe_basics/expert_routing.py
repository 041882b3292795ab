"""
Top-k routing, load statistics and capacity
===========================================

In this lesson you will learn:

* the routing math of one token, step by step: router logits -> softmax -> top-k ->
  renormalized combine weights, and that ``tilemoe.route`` computes exactly that;
* how to measure how unevenly a router loads its experts (entropy, Gini, coefficient of
  variation, min/max, tile utilization, the Switch auxiliary loss), on a balanced and on a
  skewed router;
* what a capacity factor does: each expert keeps at most ceil(cf * T * K / E) token-slots and
  drops the rest, and how many tokens that costs when the router is skewed.

Run it (CPU, a few seconds)::

    .venv/bin/python examples/01_moe_basics/expert_routing.py
    .venv/bin/python examples/01_moe_basics/expert_routing.py --experts 64 --top-k 8 --skew 2
    .venv/bin/python examples/01_moe_basics/expert_routing.py --plot loads.png

``--plot`` needs matplotlib: ``pip install -e ".[plot]"`` (``setup.sh`` installs it).

What it prints: (a) one token's walk through the router, (b) the load statistics of both
routers and their per-expert loads as text bar charts, (c) per capacity factor and router: the
capacity per expert, the slots dropped and the tokens that lost every expert.
"""

from __future__ import annotations

import argparse
import sys

import torch
from tabulate import tabulate

import tilemoe
from tilemoe.routing import capacity_for

from moe_layer import load_bars  # the text bar chart of moe_layer.py, beside this file

CAPACITY_FACTORS = (None, 1.0, 1.25, 2.0)


# %%
# Two routers on the same tokens
# ------------------------------
# The balanced router is a random nn.Linear-like router (weights of std 1/sqrt(H)), as at the
# start of training: every expert is equally likely in expectation. The skewed router is the same
# one plus a fixed logit bias of -skew * log(e + 1) for expert e. Under softmax, adding a bias
# multiplies each probability by exp(bias) = (e + 1) ** -skew: a Zipf-like popularity, the shape a
# router drifts towards when nothing balances it (a few experts win, they get better, they win
# more). skew = 0 gives back the balanced router.

def make_logits(tokens: int, hidden: int, experts: int, skew: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    router_weight = torch.randn(experts, hidden, generator=g) / hidden**0.5
    balanced = tilemoe.router_logits(x, router_weight)
    popularity_bias = -skew * torch.arange(1, experts + 1, dtype=balanced.dtype).log()
    return balanced, balanced + popularity_bias


# %%
# (a) One token through the router
# --------------------------------
# softmax turns logits into probabilities over all E experts; top-k keeps the K largest; the kept
# probabilities are divided by their sum so the combine weights add up to 1 (Mixtral, Qwen3).

def walk_one_token(logits: torch.Tensor, top_k: int) -> None:
    row = logits[0]
    probs = row.softmax(dim=-1)
    order = probs.sort(descending=True, stable=True).indices  # ties go to the lower expert index
    chosen = order[:top_k]
    weights = probs[chosen] / probs[chosen].sum()
    rank = {int(e): r + 1 for r, e in enumerate(order)}
    weight_of = {int(e): float(w) for e, w in zip(chosen, weights)}
    # With many experts, list the best-ranked few: the rest only dilute the probabilities.
    shown = range(row.numel()) if row.numel() <= 16 else order[: max(2 * top_k, 8)].tolist()
    rows = [[e, float(row[e]), float(probs[e]), rank[e], "top-k" if e in weight_of else "", weight_of.get(e)]
            for e in shown]
    print(f"(a) Token 0: logits -> softmax -> top-{top_k} -> renormalized weights")
    print(tabulate(rows, headers=["expert", "logit", "softmax p", "rank", "chosen", "weight"],
                   floatfmt=".4f", missingval=""))
    if len(rows) < row.numel():
        print(f"... and {row.numel() - len(rows)} experts of lower probability")
    kept = float(probs[chosen].sum())
    print(f"The chosen experts hold {kept:.1%} of the probability; dividing by it makes the weights sum to 1.")

    routing = tilemoe.route(logits[:1], top_k)
    print(f"tilemoe.route agrees: topk_ids {routing.topk_ids[0].tolist()}, "
          f"topk_weights {[round(w, 4) for w in routing.topk_weights[0].tolist()]}")


# %%
# (b) Load statistics
# -------------------
# Each statistic summarizes the per-expert loads n_1..n_E (token-slots per expert) in one number;
# README.md gives the formulas. Tile utilization is the one the GPU feels: real rows over the rows
# of the 128-row tiles a grouped GEMM runs. The aux loss is Switch Transformer's E * sum f_i P_i,
# 1.0 when balanced, the term training adds to push a router back towards balance.

def compare_loads(routers: dict[str, torch.Tensor], top_k: int) -> dict[str, list[int]]:
    rows, loads = [], {}
    for name, logits in routers.items():
        routing = tilemoe.route(logits, top_k)
        loads[name] = routing.counts.tolist()
        aux = float(tilemoe.load_balancing_loss(logits, routing.topk_ids, logits.shape[1]))
        rows.append({"router": name, **tilemoe.load_stats(loads[name]).as_row(), "aux loss": aux})
    print("\n(b) Load statistics (entropy in nats; balanced loads give Gini = CV = 0, min/max = 1)")
    print(tabulate(rows, headers="keys", floatfmt=".3f"))
    for name, counts in loads.items():
        print(f"\nTokens per expert, {name} router:")
        print(load_bars(counts))
    return loads


# %%
# (c) Capacity factor
# -------------------
# An expert's capacity is ceil(cf * T * K / E) slots; the lowest-scored overflow is dropped (the
# token then skips that expert: the residual connection carries it). Fixed capacity gives every
# expert a static shape, which is why early MoE systems used it; the cost is the dropped tokens.

def capacity_table(routers: dict[str, torch.Tensor], top_k: int) -> None:
    rows = []
    for name, logits in routers.items():
        tokens, experts = logits.shape
        for cf in CAPACITY_FACTORS:
            routing = tilemoe.route(logits, top_k, capacity_factor=cf)
            dropped = int(routing.dropped.sum())
            rows.append([name, "none" if cf is None else cf,
                         "-" if cf is None else capacity_for(tokens, top_k, experts, cf),
                         dropped, 100 * dropped / (tokens * top_k), int(routing.dropped.all(dim=1).sum())])
    tokens, experts = next(iter(routers.values())).shape
    print(f"\n(c) Capacity: ceil(cf * T * K / E) slots per expert, T*K = {tokens * top_k} slots, E = {experts}")
    print(tabulate(rows, headers=["router", "capacity factor", "capacity / expert", "dropped slots", "% dropped",
                                  "tokens with no expert"], floatfmt=".1f"))


# %%
# The picture
# -----------

def plot_loads(loads: dict[str, list[int]], tokens: int, top_k: int, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        sys.exit('--plot needs matplotlib: pip install -e ".[plot]"')
    matplotlib.use("Agg")  # write a file; no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(loads), figsize=(5 * len(loads), 3.5), sharey=True)
    for ax, (name, counts) in zip(axes, loads.items()):
        experts = len(counts)
        ax.bar(range(experts), counts, color="tab:blue" if name == "balanced" else "tab:red")
        ax.axhline(tokens * top_k / experts, color="black", linestyle="--", label="balanced: T*K/E")
        ax.axhline(capacity_for(tokens, top_k, experts, 1.25), color="tab:orange", label="capacity, cf = 1.25")
        ax.set_title(f"{name} router")
        ax.set_xlabel("expert")
    axes[0].set_ylabel("token-slots")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nWrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Top-k routing of one token, load statistics of a balanced and a skewed router, capacity and drops.")
    parser.add_argument("--experts", type=int, default=8, help="E, routed experts (default: 8)")
    parser.add_argument("--top-k", type=int, default=2, help="K, experts per token (default: 2)")
    parser.add_argument("--tokens", type=int, default=4096, help="T, tokens routed (default: 4096)")
    parser.add_argument("--hidden", type=int, default=64, help="H, the router's input size (default: 64)")
    parser.add_argument("--skew", type=float, default=1.0,
                        help="Zipf exponent of the skewed router's logit bias -skew*log(e+1) (default: 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tokens and the router (default: 0)")
    parser.add_argument("--plot", metavar="PATH", help="also write both load histograms to this PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    for name in ("experts", "tokens", "hidden"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected an int >= 1, got {getattr(args, name)}")
    if not 1 <= args.top_k <= args.experts:
        parser.error(f"--top-k: expected an int in [1, --experts = {args.experts}], got {args.top_k}")

    balanced, skewed = make_logits(args.tokens, args.hidden, args.experts, args.skew, args.seed)
    routers = {"balanced": balanced, f"skewed ({args.skew:g})": skewed}
    print(f"T = {args.tokens} tokens, E = {args.experts} experts, top-{args.top_k}, H = {args.hidden}\n")
    walk_one_token(balanced, args.top_k)
    loads = compare_loads(routers, args.top_k)
    capacity_table(routers, args.top_k)
    if args.plot:
        plot_loads(loads, args.tokens, args.top_k, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
