"""
Does token rounding hurt model quality? A small MoE language model, trained on the CPU
========================================================================================

In this lesson you will learn:

* how to train through a rounded routing: the rounding decision (which pairs to drop or add) is
  not differentiable, but the combine weights are the router's scores gathered at the kept experts,
  so the router still gets its gradient through them (this script checks that it does);
* how to run a fair quality comparison: the same data, the same initial weights and the same
  batches for every routing, several seeds, the spread reported beside the mean, and the
  difference to vanilla top-k paired by seed;
* what rounding does to a model whose experts see few tokens each (tile 32, 64 pairs per expert
  on average: the same two-tile regime as qwen3-30b-a3b at 4096 tokens with 128-row tiles).

The data is a synthetic language, generated offline and deterministically: 8 hidden topics, each a
sparse Markov chain over 64 symbols (every symbol has 4 possible successors per topic), the topic
switching now and then. Predicting the next symbol well needs the topic, which only the context
reveals (the script prints how far an exact topic filter gets below a bigram table): a mixture of
experts is a natural fit.

Run it (CPU; the defaults take a few minutes on 2 cores, --quick a few seconds)::

    .venv/bin/python examples/04_token_rounding/quality_experiment.py
    .venv/bin/python examples/04_token_rounding/quality_experiment.py --seeds 5
    .venv/bin/python examples/04_token_rounding/quality_experiment.py --quick

What it prints: the language's reference losses (unigram, bigram, and an exact topic filter that
knows the language), one line per training run, then per routing (vanilla top-k and each mode of
``tilemoe.rounding.MODES``): the final validation loss (mean ± std, min, max over seeds, evaluated
with vanilla top-k routing as at inference, and with the training routing), the difference to
top-k paired by seed, and what rounding did during training (tile utilization, pairs dropped and
added, tokens left with no expert). ``--record`` writes every run to benchmarks/results/cpu/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import tilemoe
from tilemoe import bench, rounding

VOCAB = 64          # symbols
TOPICS = 8          # hidden topics, each its own Markov chain
SUCCESSORS = 4      # symbols that may follow a symbol, per topic
SWITCH = 0.05       # probability per symbol that the topic is redrawn
CONTEXT = 8         # symbols the model sees before predicting the next
DATA_SEED = 1234    # the language and its samples: the same in every run
EMBED, HIDDEN, FFN = 16, 64, 64   # per-symbol embedding, model width H, expert width I
ROUTINGS = ("top-k", *rounding.MODES)


# %%
# The language
# ------------
# Topic m has its own transition table P[m, a, b]: from symbol a, one of 4 successors b (drawn once,
# with random probabilities). A stream keeps its topic from symbol to symbol, except that with
# probability SWITCH the topic is redrawn. Training and validation windows (CONTEXT symbols and the
# next one) come from different streams of the same language.

class Language:
    def __init__(self, seed: int = DATA_SEED):
        g = torch.Generator().manual_seed(seed)
        successors = torch.rand(TOPICS, VOCAB, VOCAB, generator=g).argsort(dim=-1)[..., :SUCCESSORS]
        probs = torch.randn(TOPICS, VOCAB, SUCCESSORS, generator=g).softmax(dim=-1)
        self.transitions = torch.zeros(TOPICS, VOCAB, VOCAB).scatter_(2, successors, probs)  # P[m, a, b]
        self.generator = g

    def windows(self, streams: int, length: int) -> torch.Tensor:
        """[N, CONTEXT + 1] windows of `streams` fresh streams, `length` symbols each (all streams step together)."""
        g = self.generator
        topic = torch.randint(TOPICS, (streams,), generator=g)
        symbol = torch.randint(VOCAB, (streams,), generator=g)
        out = torch.empty(streams, length, dtype=torch.long)
        for i in range(length):
            switch = torch.rand(streams, generator=g) < SWITCH
            topic = torch.where(switch, torch.randint(TOPICS, (streams,), generator=g), topic)
            symbol = torch.multinomial(self.transitions[topic, symbol], 1, generator=g).squeeze(1)
            out[:, i] = symbol
        return out.unfold(1, CONTEXT + 1, 1).reshape(-1, CONTEXT + 1)

    def filter_loss(self, windows: torch.Tensor) -> float:
        """Loss of the exact topic filter over the context (it knows the language): the belief over
        topics is updated by each observed transition, then predicts the next symbol."""
        ctx, target = windows[:, :CONTEXT], windows[:, CONTEXT]
        stay = torch.full((TOPICS, TOPICS), SWITCH / TOPICS) + (1 - SWITCH) * torch.eye(TOPICS)
        belief = torch.full((windows.shape[0], TOPICS), 1.0 / TOPICS)
        for i in range(1, CONTEXT):
            belief = (belief @ stay) * self.transitions[:, ctx[:, i - 1], ctx[:, i]].T
            belief = belief / belief.sum(dim=1, keepdim=True)
        predicted = torch.einsum("nm,mnv->nv", belief @ stay, self.transitions[:, ctx[:, -1]])
        return float(-predicted.gather(1, target[:, None]).log().mean())


def ngram_losses(train: torch.Tensor, val: torch.Tensor) -> tuple[float, float]:
    """Validation loss of the training set's unigram and bigram tables (add-0.01 smoothing)."""
    unigram = torch.bincount(train[:, CONTEXT], minlength=VOCAB).double() + 0.01
    bigram = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    bigram.index_put_((train[:, CONTEXT - 1], train[:, CONTEXT]), torch.ones(len(train), dtype=torch.float64),
                      accumulate=True)
    bigram += 0.01
    uni = -(unigram / unigram.sum())[val[:, CONTEXT]].log().mean()
    bi = -(bigram / bigram.sum(dim=1, keepdim=True))[val[:, CONTEXT - 1], val[:, CONTEXT]].log().mean()
    return float(uni), float(bi)


# %%
# The model
# ---------
# The context's symbol embeddings, concatenated (so position is kept), go through one linear map to
# width H; then one MoE layer (tilemoe.moe_forward, backend "torch": differentiable, any dtype), with
# a residual connection; then the output logits. The router is an nn.Linear; moe_forward takes its
# weight [E, H]. Without the MoE layer the model is log-linear in the context's one-hot symbols.

class TinyMoELM(nn.Module):
    def __init__(self, experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.inp = nn.Linear(CONTEXT * EMBED, HIDDEN)
        self.router = nn.Linear(HIDDEN, experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.randn(experts, 2 * FFN, HIDDEN) * HIDDEN**-0.5)
        self.w_down = nn.Parameter(torch.randn(experts, HIDDEN, FFN) * FFN**-0.5)
        self.out = nn.Linear(HIDDEN, VOCAB)

    def forward(self, ctx: torch.Tensor, routing_name: str, tile: int):
        """Logits [B, VOCAB], the aux loss, the tile utilization of the router's top-k choice, and the
        RoundingStats of this batch (None for top-k)."""
        h = self.inp(self.embed(ctx).flatten(1))
        z = F.rms_norm(h, (HIDDEN,))
        logits = tilemoe.router_logits(z, self.router.weight)
        routing = tilemoe.route(logits, self.top_k)
        # The Switch load-balancing loss on the router's own choice (before rounding): rounding is
        # a kernel-side decision; the router is still trained to balance what it chose.
        aux = tilemoe.load_balancing_loss(logits, routing.topk_ids, logits.shape[1])
        utilization = tilemoe.routing.tile_utilization(routing.counts, tile)
        stats = None
        if routing_name != "top-k":
            # round_routing ranks by these scores (no gradient in a ranking) and builds the combine
            # weights from them (autograd follows those): the router learns through the weights.
            rounded = rounding.round_routing(logits.softmax(dim=-1), routing, tile, routing_name)
            routing, stats = rounded.routing, rounded.stats
        # A rounded token may keep more or fewer than K experts: top_k is the routing's width.
        y = tilemoe.moe_forward(z, self.router.weight, self.w_gate_up, self.w_down, routing.top_k,
                                routing=routing, backend="torch")
        return self.out(F.rms_norm(h + y, (HIDDEN,))), aux, utilization, stats


# %%
# One training run
# ----------------
# Everything random in a run comes from its seed: the initial weights and the batches. Every routing
# sees the same ones, so the runs of one seed differ only in the routing.

@dataclass
class Run:
    routing: str
    seed: int
    val_topk: float      # validation loss, evaluated with vanilla top-k routing (as at inference)
    val_same: float      # validation loss, evaluated with the training routing
    util_before: float   # mean over training steps of the tile utilization before / after rounding
    util_after: float
    dropped: float       # pairs dropped / added per step, as a fraction of the T*K pairs
    added: float
    orphans: float       # tokens left with no expert per step, as a fraction of the batch
    seconds: float


def evaluate(model: TinyMoELM, windows: torch.Tensor, routing_name: str, batch: int, tile: int) -> float:
    """Mean cross-entropy (nats) over the windows, in batches of the training batch size (a rounded
    routing is decided per batch)."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            w = windows[i:i + batch]
            logits, _, _, _ = model(w[:, :CONTEXT], routing_name, tile)
            total += float(F.cross_entropy(logits, w[:, CONTEXT], reduction="sum"))
    return total / len(windows)


def check_router_gradient(model: TinyMoELM, windows: torch.Tensor, routing_name: str, tile: int) -> None:
    """The task loss alone (no aux loss) must reach the router's weight, through the combine weights."""
    model.zero_grad()
    logits, _, _, _ = model(windows[:, :CONTEXT], routing_name, tile)
    F.cross_entropy(logits, windows[:, CONTEXT]).backward()
    grad = model.router.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0, f"{routing_name}: no gradient reaches the router"
    model.zero_grad()


def train(routing_name: str, seed: int, train_windows, val_windows, args) -> Run:
    torch.manual_seed(seed)  # the initial weights
    model = TinyMoELM(args.experts, args.top_k)
    batches = torch.Generator().manual_seed(seed)
    check_router_gradient(model, train_windows[: args.batch], routing_name, args.tile)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)  # a quiet end: less noise in the final loss
    pairs = args.batch * args.top_k
    sums = dict(util_before=0.0, util_after=0.0, dropped=0.0, added=0.0, orphans=0.0)
    start = time.perf_counter()
    for _ in range(args.steps):
        w = train_windows[torch.randint(len(train_windows), (args.batch,), generator=batches)]
        logits, aux, utilization, stats = model(w[:, :CONTEXT], routing_name, args.tile)
        loss = F.cross_entropy(logits, w[:, CONTEXT]) + args.aux * aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        sums["util_before"] += utilization
        sums["util_after"] += utilization if stats is None else stats.utilization_after
        if stats is not None:
            sums["dropped"] += stats.pairs_dropped / pairs
            sums["added"] += stats.pairs_added / pairs
            sums["orphans"] += stats.tokens_without_expert / args.batch
    seconds = time.perf_counter() - start
    mean = {k: v / args.steps for k, v in sums.items()}
    return Run(routing_name, seed, evaluate(model, val_windows, "top-k", args.batch, args.tile),
               evaluate(model, val_windows, routing_name, args.batch, args.tile), seconds=seconds, **mean)


# %%
# The summary
# -----------
# Mean ± standard deviation (n - 1) over seeds, min and max; "vs top-k" is the mean over seeds of
# (this routing's loss - top-k's loss with the same seed): the paired difference cancels most of the
# seed-to-seed spread, so it is the column to read when the others overlap.

def spread(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def summarize(runs: list[Run]) -> list[dict]:
    topk = {r.seed: r.val_topk for r in runs if r.routing == "top-k"}
    rows = []
    for name in ROUTINGS:
        mine = [r for r in runs if r.routing == name]
        losses = [r.val_topk for r in mine]

        def mean(field: str) -> float:
            return statistics.mean(getattr(r, field) for r in mine)

        rows.append({
            "routing": name, "val loss (top-k eval)": spread(losses), "min - max": f"{min(losses):.4f} - {max(losses):.4f}",
            "vs top-k (paired)": spread([r.val_topk - topk[r.seed] for r in mine]),
            "val loss (same routing)": spread([r.val_same for r in mine]),
            "tile util before -> after": f"{mean('util_before'):.3f} -> {mean('util_after'):.3f}",
            "% pairs dropped / added": f"{100 * mean('dropped'):.1f} / {100 * mean('added'):.1f}",
            "% tokens w/o expert": 100 * mean("orphans"), "s / run": mean("seconds"),
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a small MoE language model with vanilla top-k and with each token-rounding mode; "
                    "compare validation losses over seeds.")
    parser.add_argument("--seeds", type=int, default=3, help="training runs per routing, seeds 0.. (default: 3)")
    parser.add_argument("--steps", type=int, default=1000, help="Adam steps per run (default: 1000)")
    parser.add_argument("--batch", type=int, default=512, help="tokens per step, T (default: 512)")
    parser.add_argument("--experts", type=int, default=16, help="E (default: 16)")
    parser.add_argument("--top-k", type=int, default=2, help="K (default: 2)")
    parser.add_argument("--tile", type=int, default=32,
                        help="rows per tile that counts are rounded to (default: 32, two tiles per expert on average)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's peak learning rate, cosine decay (default: 3e-3)")
    parser.add_argument("--aux", type=float, default=0.01, help="weight of the load-balancing loss (default: 0.01)")
    parser.add_argument("--quick", action="store_true", help="a few seconds: 1 seed, 25 steps, less data (for tests)")
    parser.add_argument("--record", action="store_true", help="write every run to benchmarks/results/cpu/")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 1, 25
    for name in ("seeds", "steps", "batch", "experts", "tile"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected an int >= 1, got {getattr(args, name)}")
    if not 1 <= args.top_k <= args.experts:
        parser.error(f"--top-k: expected an int in [1, --experts = {args.experts}], got {args.top_k}")
    # The tensors are tiny (a batch of 512 x 64): one thread is as fast, and several threads
    # spin-wait against each other and against anything else running on a small machine.
    torch.set_num_threads(1)

    language = Language()
    streams, length = (32, 256) if args.quick else (256, 1024)
    train_windows = language.windows(streams, length)
    # Validation: windows spread over many streams (neighbouring windows of one stream overlap).
    val_count = 2 * args.batch if args.quick else 16 * args.batch
    val_windows = language.windows(streams // 4, length)
    val_windows = val_windows[:: max(1, len(val_windows) // val_count)][:val_count]
    unigram, bigram = ngram_losses(train_windows, val_windows)
    pairs_per_expert = args.batch * args.top_k / args.experts
    print(f"Language: {VOCAB} symbols, {TOPICS} hidden topics (a sparse Markov chain each, {SUCCESSORS} successors "
          f"per symbol), topic redrawn with probability {SWITCH}; {len(train_windows)} training windows, "
          f"{len(val_windows)} validation windows of {CONTEXT} symbols + the next")
    print(f"Reference validation losses (nats): unigram {unigram:.3f}, bigram {bigram:.3f}, "
          f"exact topic filter (knows the language) {language.filter_loss(val_windows):.3f}")
    print(f"Model: {CONTEXT} x {EMBED} embeddings -> H = {HIDDEN} -> MoE (E = {args.experts}, top-{args.top_k}, "
          f"I = {FFN}, SwiGLU) -> {VOCAB} logits; Adam lr {args.lr:g} cosine, {args.steps} steps of "
          f"{args.batch} tokens, aux loss {args.aux:g}")
    print(f"Rounding to tiles of {args.tile}: {pairs_per_expert:.0f} pairs per expert on average = "
          f"{pairs_per_expert / args.tile:.1f} tiles; {args.seeds} seed(s); CPU, one thread\n")

    runs = []
    for seed in range(args.seeds):
        for name in ROUTINGS:
            run = train(name, seed, train_windows, val_windows, args)
            runs.append(run)
            print(f"seed {seed}  {name:<9} val loss {run.val_topk:.4f} (top-k eval), {run.val_same:.4f} "
                  f"(same routing)  {run.seconds:5.1f} s", flush=True)

    print(f"\nFinal validation loss (nats) over {args.seeds} seed(s), {args.steps} steps each")
    print(tabulate(summarize(runs), headers="keys", floatfmt=".2f"))
    if args.record:
        path = bench.record("token_rounding_quality", [vars(r) for r in runs], "cpu", extra={
            "steps": args.steps, "batch": args.batch, "experts": args.experts, "top_k": args.top_k,
            "tile": args.tile, "lr": args.lr, "aux": args.aux, "hidden": HIDDEN, "ffn": FFN, "vocab": VOCAB,
            "topics": TOPICS, "context": CONTEXT, "quick": args.quick})
        print(f"\nrecorded: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
