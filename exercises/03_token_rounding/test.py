"""Grader of exercise 03 (tile-aware token rounding).

    python test.py              grades starter.py (your work)
    python test.py --solution   grades solution.py
    python test.py --file PATH  grades any file defining the four functions

One line per check, then a score; the exit status is 1 unless every check passes. Each check draws
fresh random router logits (the harness seeds torch with 0 before each check), routes them with
``tilemoe.route`` (vanilla top-k), and compares your functions with the library's own rounding,
``tilemoe.rounding.round_routing`` and ``tilemoe.rounding.target_counts``: counts, ranks and the
kept (token, expert) pairs exactly, the weights element by element. The inputs cover T = 1, an
expert no token picks, an expert every token picks, T not a multiple of the tile, a tile larger
than T, tile = 1 and exact ties between router scores. Runs on CUDA when available, else the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

try:
    import tilemoe
except ImportError:  # not installed: use the repository this file lives in
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import tilemoe
from tilemoe import grading, rounding
from tilemoe.routing import tile_utilization

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    # The checks' tensors are tiny: one thread is fastest, and several spin-wait on a busy machine.
    torch.set_num_threads(1)
MODES = ("down", "nearest")
# fp32 scores on both sides, summed in a different order: a few ulps apart, per element.
RTOL, ATOL = 1e-5, 1e-6


# -- inputs ---------------------------------------------------------------------------------------

def cases():
    """(description, logits [T, E] on DEVICE, top_k, tile) of every routing the checks round.

    Drawn on the CPU (the same numbers on every device), then moved.
    """
    out = []

    def add(what, logits, top_k, tile):
        out.append((what, logits.to(DEVICE), top_k, tile))

    add("T=1, E=4, K=2, tile 4", torch.randn(1, 4), 2, 4)
    add("T=50 (not a multiple of the tile), E=6, K=2, tile 8", torch.randn(50, 6), 2, 8)
    logits = torch.randn(40, 5)
    logits[:, 0] -= 20.0  # nobody picks expert 0
    add("T=40, E=5, K=2, tile 8, expert 0 picked by no token", logits, 2, 8)
    logits = torch.randn(37, 4)
    logits[:, 1] += 20.0  # everybody picks expert 1: 37 tokens, nearest multiple of 8 is 40 > T
    add("T=37, E=4, K=2, tile 8, expert 1 picked by every token", logits, 2, 8)
    add("T=20, E=5, K=2, tile 1", torch.randn(20, 5), 2, 1)
    add("T=5, E=3, K=2, tile 8 (larger than T)", torch.randn(5, 3), 2, 8)
    # 40 tokens that are copies of 3 distinct ones (11, 13 and 16 copies, shuffled): their scores tie
    # exactly. The three pick experts {0, 1}, {1, 2} and {2, 3}: 11, 24, 29 and 16 tokens, so the
    # tile boundaries of 8 fall inside groups of tied tokens, both when dropping and when adding.
    rows = 0.1 * torch.randn(3, 4)
    rows[0, :2] += 2.0
    rows[1, 1:3] += 2.0
    rows[2, 2:] += 2.0
    copies = torch.repeat_interleave(torch.arange(3), torch.tensor([11, 13, 16]))
    add("T=40, E=4, K=2, tile 8, exact ties (3 distinct tokens, 11, 13 and 16 copies)", rows[copies[torch.randperm(40)]], 2, 8)
    add("T=256, E=16, K=4, tile 16", torch.randn(256, 16), 4, 16)
    return out


def dense(ids: torch.Tensor, values: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, E] from per-slot (ids [T, K'], values [T, K']); slots with id -1 are ignored."""
    ids = ids.long()
    out = torch.zeros(ids.shape[0], num_experts + 1, dtype=values.dtype, device=values.device)
    out.scatter_(1, torch.where(ids < 0, num_experts, ids), values)
    return out[:, :num_experts]


def reference(logits, top_k, tile, mode):
    """(scores, vanilla Routing, keep [T, E] bool, weights [T, E]) from tilemoe's own rounding."""
    scores = logits.softmax(dim=-1)
    vanilla = tilemoe.route(logits, top_k)
    r = rounding.round_routing(scores, vanilla, tile, mode).routing
    keep = dense(r.topk_ids, torch.ones_like(r.topk_weights, dtype=torch.bool), scores.shape[1])
    return scores, vanilla, keep, dense(r.topk_ids, r.topk_weights, scores.shape[1])


def selected_of(vanilla, num_experts):
    return dense(vanilla.topk_ids, torch.ones(vanilla.topk_ids.shape, dtype=torch.bool, device=DEVICE), num_experts)


# -- comparisons ----------------------------------------------------------------------------------

def expect_tensor(actual, shape, dtype, what):
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{what}: expected a torch.Tensor, got {type(actual).__name__}")
    if tuple(actual.shape) != tuple(shape):
        raise AssertionError(f"{what}: expected shape {list(shape)}, got {list(actual.shape)}")
    if actual.dtype != dtype:
        raise AssertionError(f"{what}: expected dtype {dtype}, got {actual.dtype}")


def expect_equal(actual, expected, what):
    """Same shape, same dtype, every element equal; the message names the first differing element."""
    expect_tensor(actual, expected.shape, expected.dtype, what)
    a, e = actual.cpu(), expected.cpu()
    differ = a != e
    if differ.any():
        where = [int(i) for i in differ.nonzero()[0]]
        raise AssertionError(f"{what}: expected {e[tuple(where)].item()} at index {where}, got {a[tuple(where)].item()} "
                             f"({int(differ.sum())} of {e.numel()} elements differ)")


def expect_same_pairs(keep, ref_keep, selected, what):
    """keep == ref_keep; on a mismatch, say which pair and what it means for its expert."""
    expect_tensor(keep, ref_keep.shape, torch.bool, what)
    keep, ref_keep, selected = keep.cpu(), ref_keep.cpu(), selected.cpu()
    differ = keep != ref_keep
    if differ.any():
        t, e = (int(i) for i in differ.nonzero()[0])
        status = lambda kept: "kept" if kept else "not kept"  # noqa: E731
        chose = "chose" if selected[t, e] else "did not choose"
        raise AssertionError(f"{what}: pair (token {t}, expert {e}) expected {status(ref_keep[t, e])}, got {status(keep[t, e])} "
                             f"(token {t} {chose} expert {e}; expert {e}'s token count {int(selected[:, e].sum())} before rounding, expected "
                             f"{int(ref_keep[:, e].sum())} after, got {int(keep[:, e].sum())}; "
                             f"{int(differ.sum())} pairs differ in all)")


def brute_force_order(selected, scores, e):
    """Expert e's candidate order, by the definition: selected first, then score descending, then token."""
    return sorted(range(scores.shape[0]), key=lambda t: (not bool(selected[t, e]), -float(scores[t, e]), t))


def explain_order(selected, scores, e, got_order, want_order):
    """Which rule of the ranking a wrong order breaks, at its first wrong position."""
    i = next(i for i, (a, b) in enumerate(zip(got_order, want_order)) if a != b)
    a, b = got_order[i], want_order[i]
    if bool(selected[b, e]) and not bool(selected[a, e]):
        rule = f"token {b} selected expert {e} and token {a} did not: selected tokens come first"
    elif float(scores[b, e]) > float(scores[a, e]):
        rule = f"token {b} scores {float(scores[b, e]):.4g} > token {a}'s {float(scores[a, e]):.4g}: higher score first"
    else:
        rule = f"tokens {a} and {b} are tied (score {float(scores[a, e]):.4g}): the lower token first"
    return f"position {i} of expert {e}'s order: expected token {b}, got token {a} ({rule})"


# -- checks ---------------------------------------------------------------------------------------

def test_round_counts_by_hand(m):
    """round_counts on counts worked out by hand: floor, nearest (half a tile rounds up), capped at T, tile 1."""
    table = [
        # counts, tile, num_tokens, expected "down", expected "nearest"
        ([0, 1, 3, 4, 5, 6, 8, 142], 4, 1000, [0, 0, 0, 4, 4, 4, 8, 140], [0, 0, 4, 4, 4, 8, 8, 144]),
        ([0, 63, 64, 127, 128, 142, 200, 256], 128, 4096, [0, 0, 0, 0, 128, 128, 128, 256], [0, 0, 128, 128, 128, 128, 256, 256]),
        ([7, 5, 3, 0], 4, 7, [4, 4, 0, 0], [7, 4, 4, 0]),  # 7 rounds up to 8 > T = 7: capped at 7
        ([3, 0, 5, 1], 8, 5, [0, 0, 0, 0], [0, 0, 5, 0]),  # tile larger than T
        ([0, 2, 9, 17], 1, 17, [0, 2, 9, 17], [0, 2, 9, 17]),  # tile 1: nothing to round
    ]
    for counts, tile, num_tokens, down, nearest in table:
        for mode, expected in (("down", down), ("nearest", nearest)):
            got = m.round_counts(torch.tensor(counts, device=DEVICE), tile, mode, num_tokens)
            what = f"round_counts({counts}, tile={tile}, mode={mode!r}, num_tokens={num_tokens})"
            expect_tensor(got, (len(counts),), torch.int64, what)
            if got.tolist() != expected:
                raise AssertionError(f"{what}: expected {expected}, got {got.tolist()}")


def test_round_counts_match_tilemoe(m):
    """round_counts equals tilemoe.rounding.target_counts on random counts, tiles 1 to 128, both modes."""
    for num_experts, num_tokens, tile in [(8, 64, 4), (16, 300, 8), (64, 4096, 128), (5, 3, 4), (12, 100, 1), (32, 500, 16)]:
        counts = torch.randint(0, num_tokens + 1, (num_experts,))
        counts[0], counts[1] = 0, num_tokens  # an idle expert and one that takes every token
        counts = counts.to(DEVICE)
        for mode in MODES:
            expected = rounding.target_counts(counts, tile, mode, num_tokens)
            got = m.round_counts(counts.clone(), tile, mode, num_tokens)
            expect_equal(got, expected, f"round_counts(counts={counts.tolist()}, tile={tile}, mode={mode!r}, num_tokens={num_tokens})")


def test_expert_ranking_order(m):
    """expert_ranking: every column a permutation; selected before unselected, higher score first, ties to the lower token."""
    problems = [("by hand", torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0]], dtype=torch.bool),
                 torch.tensor([[0.2, 0.5], [0.9, 0.5], [0.2, 0.1], [0.2, 0.5], [0.7, 0.3]]))]
    for num_tokens, num_experts in [(1, 3), (7, 4), (30, 5), (64, 8)]:
        selected = torch.rand(num_tokens, num_experts) < 0.4
        scores = torch.randint(0, 4, (num_tokens, num_experts)) / 4.0  # four values: many exact ties
        problems.append((f"random T={num_tokens}, E={num_experts}, scores in {{0, .25, .5, .75}}", selected, scores))
    for what, selected, scores in problems:
        num_tokens, num_experts = scores.shape
        rank = m.expert_ranking(selected.to(DEVICE), scores.to(DEVICE))
        label = f"expert_ranking ({what})"
        expect_tensor(rank, (num_tokens, num_experts), torch.int64, label)
        rank = rank.cpu()
        for e in range(num_experts):
            if sorted(rank[:, e].tolist()) != list(range(num_tokens)):
                raise AssertionError(f"{label}: expected column {e} to hold each position 0..{num_tokens - 1} once, "
                                     f"got {rank[:, e].tolist()}")
            got_order = rank[:, e].argsort().tolist()  # position -> token
            want_order = brute_force_order(selected, scores, e)
            if got_order != want_order:
                raise AssertionError(f"{label}: {explain_order(selected, scores, e, got_order, want_order)}")


def _check_assignment(m, mode):
    for what, logits, top_k, tile in cases():
        scores, vanilla, ref_keep, _ = reference(logits, top_k, tile, mode)
        keep = m.round_assignment(scores, vanilla.topk_ids.long(), tile, mode)
        expect_same_pairs(keep, ref_keep, selected_of(vanilla, scores.shape[1]),
                          f"round_assignment(mode={mode!r}) for {what}")


def test_round_assignment_down(m):
    """round_assignment(mode="down") keeps exactly the pairs tilemoe.rounding.round_routing keeps, on every input."""
    _check_assignment(m, "down")


def test_round_assignment_nearest(m):
    """round_assignment(mode="nearest") keeps exactly the pairs tilemoe.rounding.round_routing keeps, on every input."""
    _check_assignment(m, "nearest")


def test_rounding_fills_whole_tiles(m):
    """After rounding every expert's count is a multiple of the tile (or T, where rounding up is capped), tile
    utilization is 1.0, "down" only drops pairs, and "nearest" only drops or only adds per expert."""
    for what, logits, top_k, tile in cases():
        num_tokens, num_experts = logits.shape
        scores = logits.softmax(dim=-1)
        vanilla = tilemoe.route(logits, top_k)
        selected = selected_of(vanilla, num_experts).cpu()
        for mode in MODES:
            label = f"round_assignment(mode={mode!r}) for {what}"
            keep = m.round_assignment(scores, vanilla.topk_ids.long(), tile, mode)
            expect_tensor(keep, (num_tokens, num_experts), torch.bool, label)
            keep = keep.cpu()
            counts = keep.sum(dim=0)
            bad = (counts % tile != 0) & (counts != num_tokens)
            if bad.any():
                raise AssertionError(f"{label}: expected every expert's token count to be a multiple of {tile} (or T = {num_tokens}), "
                                     f"got {counts.tolist()}")
            if bool((counts % tile == 0).all()) and counts.sum() > 0:
                util = tile_utilization(counts, tile)
                if util != 1.0:
                    raise AssertionError(f"{label}: expected tile utilization 1.0 for counts {counts.tolist()}, got {util}")
            dropped = (selected & ~keep).sum(dim=0)
            added = (keep & ~selected).sum(dim=0)
            if mode == "down" and added.any():
                e = int(added.nonzero()[0])
                raise AssertionError(f"{label}: rounding down must only drop pairs, got {int(added[e])} token(s) added to expert {e} "
                                     f"(count {int(selected[:, e].sum())} -> {int(counts[e])})")
            both = (dropped > 0) & (added > 0)
            if both.any():
                e = int(both.nonzero()[0])
                raise AssertionError(f"{label}: expert {e} both dropped {int(dropped[e])} of its tokens and added {int(added[e])} "
                                     f"others; rounding keeps a prefix of the ranking (selected tokens first), so it only drops or only adds")


def test_rounded_weights_by_hand(m):
    """rounded_weights on a 3-token example: renormalized over the kept experts, 0 elsewhere, a token with nothing kept all 0."""
    scores = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.0, 0.25, 0.75]]
    keep = [[1, 1, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0]]  # token 1 keeps no expert
    expected = torch.tensor([[0.625, 0.375, 0.0], [0.0, 0.0, 0.0], [0.2, 0.2, 0.6], [0.0, 1.0, 0.0]])
    what = f"rounded_weights(scores={scores}, keep={keep})"
    got = m.rounded_weights(torch.tensor(scores, device=DEVICE), torch.tensor(keep, dtype=torch.bool, device=DEVICE))
    expect_tensor(got, expected.shape, torch.float32, what)
    grading.assert_close(got, expected, rtol=RTOL, atol=ATOL, what=what)


def test_rounded_weights_match_tilemoe(m):
    """rounded_weights on tilemoe's rounded pairs: sum 1 over each token's kept experts, exactly 0 elsewhere,
    and equal to round_routing's weights, element by element (both modes, every input)."""
    empty_rows = 0
    for what, logits, top_k, tile in cases():
        for mode in MODES:
            scores, _, keep, ref_weights = reference(logits, top_k, tile, mode)
            label = f"rounded_weights for {what}, mode={mode!r}"
            got = m.rounded_weights(scores, keep)
            expect_tensor(got, scores.shape, scores.dtype, label)
            grading.assert_close(got, ref_weights, rtol=0, atol=float("inf"), what=label)  # finite, no NaN from 0/0
            got, keep = got.cpu(), keep.cpu()
            outside = got.masked_fill(keep, 0.0)
            if outside.any():
                t, e = (int(i) for i in outside.nonzero()[0])
                raise AssertionError(f"{label}: expected 0 for the pair (token {t}, expert {e}), which is not kept, got {float(got[t, e]):.6g}")
            has_expert = keep.any(dim=1)
            empty_rows += int((~has_expert).sum())
            grading.assert_close(got.sum(dim=1), has_expert.to(got.dtype), rtol=0, atol=1e-5,
                                 what=f"{label}: the sum of each token's weights (1, or 0 for a token that keeps no expert)")
            grading.assert_close(got, ref_weights, rtol=RTOL, atol=ATOL, what=f"{label}: the weights vs round_routing's")
    assert empty_rows > 0, "grader's inputs left no token without an expert (expected some with mode='down')"


CHECKS = [
    test_round_counts_by_hand,
    test_round_counts_match_tilemoe,
    test_expert_ranking_order,
    test_round_assignment_down,
    test_round_assignment_nearest,
    test_rounding_fills_whole_tiles,
    test_rounded_weights_by_hand,
    test_rounded_weights_match_tilemoe,
]

if __name__ == "__main__":
    sys.exit(grading.main(CHECKS, __file__))
