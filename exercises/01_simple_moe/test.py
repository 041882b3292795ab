"""Grader of exercise 01 (a Mixture-of-Experts forward from scratch).

    python test.py              grades starter.py (your work)
    python test.py --solution   grades solution.py
    python test.py --file PATH  grades any file defining SimpleMoE

One line per check, then a score; the exit status is 1 unless every check passes. Each check
builds ``SimpleMoE`` with small sizes and fresh random inputs (the harness seeds torch with 0
before each check), in float32 on CUDA when available, else on the CPU, and compares it with
``tilemoe.reference_moe`` run on the very same weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import tilemoe
except ImportError:  # not installed: use the repository this file lives in
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import tilemoe
from tilemoe import grading

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# fp32 on both sides, the same operations in a different order: DESIGN.md's fp32 tolerance, per element.
RTOL, ATOL = 1e-4, 1e-5
HIDDEN, FFN, EXPERTS, TOP_K = 32, 16, 8, 2


# -- helpers --------------------------------------------------------------------------------------

def make_model(m, hidden=HIDDEN, ffn=FFN, experts=EXPERTS, top_k=TOP_K):
    """The submission's SimpleMoE, built on the CPU (same weights on every device), then moved."""
    return m.SimpleMoE(hidden, ffn, experts, top_k).to(DEVICE)


def randn(*shape, dtype=torch.float32):
    """Random inputs drawn on the CPU (so the same on every device), then moved."""
    return torch.randn(*shape, dtype=dtype).to(DEVICE)


def reference(model, x, top_k):
    return tilemoe.reference_moe(x, model.router.weight, model.w_gate_up, model.w_down, top_k)


def reference_ids(model, x, top_k):
    """[T, K] int64: the experts tilemoe's router gives each token of x [..., H]."""
    tokens = x.reshape(-1, x.shape[-1])
    return tilemoe.route(tilemoe.router_logits(tokens, model.router.weight), top_k).topk_ids.long()


def run(model, x):
    with torch.no_grad():
        y = model(x)
    if not isinstance(y, torch.Tensor):
        raise AssertionError(f"model(x): expected a torch.Tensor, got {type(y).__name__}")
    return y


def expect_close(model, x, top_k, what):
    grading.assert_close(run(model, x), reference(model, x, top_k), rtol=RTOL, atol=ATOL, what=what)


def token_change(y_new, y_old):
    """Per-token max |y_new - y_old| for outputs [T, H] (after checking y_new's shape and values)."""
    if tuple(y_new.shape) != tuple(y_old.shape) or not torch.isfinite(y_new).all():
        raise AssertionError(f"model(x): expected finite values of shape {list(y_old.shape)}, "
                             f"got shape {list(y_new.shape)} with {int((~torch.isfinite(y_new)).sum())} NaN/Inf")
    return (y_new - y_old).abs().amax(dim=-1)


def perturbed_outputs(model, x):
    """(y, [y with expert e's weights perturbed, for each e]), the weights restored afterwards."""
    y = run(model, x)
    changed = []
    for e in range(model.w_gate_up.shape[0]):
        gate_up, down = model.w_gate_up.data[e].clone(), model.w_down.data[e].clone()
        with torch.no_grad():
            model.w_gate_up[e] += 0.5 * torch.randn_like(gate_up)
            model.w_down[e] += 0.5 * torch.randn_like(down)
        changed.append(run(model, x))
        with torch.no_grad():
            model.w_gate_up[e] = gate_up
            model.w_down[e] = down
    return y, changed


# -- checks ---------------------------------------------------------------------------------------

def test_output_shape_and_dtype(m):
    """[B, S, H] and [T, H] inputs give outputs of the same shape and dtype (float32, and float64)."""
    model = make_model(m)
    for shape in [(2, 5, HIDDEN), (7, HIDDEN), (1, 1, HIDDEN)]:
        y = run(model, randn(*shape))
        if tuple(y.shape) != shape:
            raise AssertionError(f"model(x) for x of shape {list(shape)}: expected that shape, got {list(y.shape)}")
        if y.dtype != torch.float32:
            raise AssertionError(f"model(x) for float32 x: expected a float32 output, got {y.dtype}")
    model = model.double()
    y = run(model, randn(3, 4, HIDDEN, dtype=torch.float64))
    if y.dtype != torch.float64 or tuple(y.shape) != (3, 4, HIDDEN):
        raise AssertionError(f"model.double()(x) for float64 x [3, 4, {HIDDEN}]: expected float64 [3, 4, {HIDDEN}], "
                             f"got {y.dtype} {list(y.shape)}")


def test_output_is_finite(m):
    """No NaN/Inf: with uninitialized memory poisoned (torch.empty gives NaN) and with large inputs."""
    model = make_model(m)
    cases = [
        (1.0, "torch.empty reads NaN here: is a buffer read before every element is written?"),
        (100.0, "router logits ~ 100 here: exp() overflows fp32 above 88 (torch.softmax does not), "
                "and the renormalizing sum of the chosen probabilities must not be 0"),
    ]
    for scale, hint in cases:
        x = scale * randn(64, HIDDEN)
        with grading.poisoned_memory():
            y = run(model, x)
        if not torch.isfinite(y).all():
            nan, inf = int(y.isnan().sum()), int(y.isinf().sum())
            raise AssertionError(f"y for inputs x{scale:g}: expected finite values, got {nan} NaN and {inf} Inf "
                                 f"of {y.numel()} ({hint})")


def test_matches_reference(m):
    """The output equals tilemoe.reference_moe on the same weights, element by element (two model sizes)."""
    model = make_model(m)
    expect_close(model, randn(4, 16, HIDDEN), TOP_K, f"y for x [4, 16, {HIDDEN}], E={EXPERTS}, K={TOP_K}")
    model = make_model(m, hidden=48, ffn=24, experts=6, top_k=3)
    expect_close(model, randn(50, 48), 3, "y for x [50, 48], H=48, I=24, E=6, K=3")


def test_route_picks_the_reference_experts(m):
    """route(x): int64 ids [T, K], distinct per token, the same experts and weights as tilemoe.route; weights sum to 1."""
    model = make_model(m)
    tokens = 64
    x = randn(tokens, HIDDEN)
    with torch.no_grad():
        result = model.route(x)
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise AssertionError(f"route(x): expected a pair (topk_ids, topk_weights), got {type(result).__name__}")
    ids, weights = result
    for name, t in (("topk_ids", ids), ("topk_weights", weights)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (tokens, TOP_K):
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise AssertionError(f"route(x) for x [{tokens}, {HIDDEN}]: expected {name} of shape [{tokens}, {TOP_K}], "
                                 f"got {got}")
    if ids.dtype != torch.int64:
        raise AssertionError(f"route(x): expected topk_ids of dtype torch.int64, got {ids.dtype}")
    if ids.min() < 0 or ids.max() >= EXPERTS:
        raise AssertionError(f"route(x): expected expert ids in [0, {EXPERTS}), "
                             f"got values from {int(ids.min())} to {int(ids.max())}")
    repeated = (ids.sort(dim=1).values.diff(dim=1) == 0).any(dim=1)
    if repeated.any():
        t = int(repeated.nonzero()[0])
        raise AssertionError(f"route(x): expected {TOP_K} distinct experts per token, got {ids[t].tolist()} for token {t}")
    grading.assert_close(weights.sum(dim=-1), torch.ones(tokens), rtol=0, atol=1e-5,
                         what="route(x): the sum of each token's topk_weights")

    ref = tilemoe.route(tilemoe.router_logits(x, model.router.weight), TOP_K)
    ref_ids = ref.topk_ids.long()
    order, ref_order = ids.argsort(dim=1), ref_ids.argsort(dim=1)  # compare as sets: sort by expert id
    ids_sorted, ref_sorted = ids.gather(1, order), ref_ids.gather(1, ref_order)
    differ = (ids_sorted != ref_sorted).any(dim=1)
    if differ.any():
        t = int(differ.nonzero()[0])
        raise AssertionError(f"route(x): token {t} expected experts {sorted(ref_ids[t].tolist())} "
                             f"(the {TOP_K} most probable), got {sorted(ids[t].tolist())} "
                             f"({int(differ.sum())} of {tokens} tokens differ)")
    grading.assert_close(weights.gather(1, order), ref.topk_weights.gather(1, ref_order), rtol=RTOL, atol=ATOL,
                         what="route(x): topk_weights (softmax over the experts, renormalized over the chosen)")


def test_weights_sum_to_one(m):
    """With every expert a copy of expert 0, the output must be expert 0's output: the weights sum to 1."""
    model = make_model(m)
    with torch.no_grad():
        model.w_gate_up.copy_(model.w_gate_up[0].expand_as(model.w_gate_up).clone())
        model.w_down.copy_(model.w_down[0].expand_as(model.w_down).clone())
    x = randn(64, HIDDEN)
    w_gate_up, w_down = model.w_gate_up[0].detach(), model.w_down[0].detach()
    expected = (F.silu(x @ w_gate_up[:FFN].t()) * (x @ w_gate_up[FFN:].t())) @ w_down.t()
    grading.assert_close(run(model, x), expected, rtol=RTOL, atol=ATOL,
                         what="with all experts identical, y must be that one expert's output "
                              "(each token's weights sum to 1)")


def test_unchosen_experts_do_not_contribute(m):
    """Perturbing an expert's weights leaves the output of every token that did not choose it unchanged."""
    model = make_model(m)
    x = randn(64, HIDDEN)
    ids = reference_ids(model, x, TOP_K)
    y, changed = perturbed_outputs(model, x)
    for e, y_e in enumerate(changed):
        delta = token_change(y_e, y)
        bad = ~(ids == e).any(dim=1) & (delta > ATOL + RTOL * y.abs().amax(dim=-1))
        if bad.any():
            t = int(bad.nonzero()[0])
            raise AssertionError(f"perturbing expert {e}'s weights changed token {t}'s output by {float(delta[t]):.3g}, "
                                 f"but token {t} chose experts {ids[t].tolist()} (tilemoe.route): expected no change "
                                 f"({int(bad.sum())} such tokens); only the top {TOP_K} experts may contribute")


def test_every_chosen_expert_contributes(m):
    """On a balanced input every expert is used: perturbing expert e changes every token that chose e."""
    model = make_model(m)
    x = randn(64, HIDDEN)
    ids = reference_ids(model, x, TOP_K)
    counts = torch.bincount(ids.flatten().cpu(), minlength=EXPERTS)
    assert (counts > 0).all(), f"grader's input is not balanced: tokens per expert {counts.tolist()}"
    y, changed = perturbed_outputs(model, x)
    for e, y_e in enumerate(changed):
        delta = token_change(y_e, y)
        bad = (ids == e).any(dim=1) & (delta <= 1e-3)
        if bad.any():
            t = int(bad.nonzero()[0])
            raise AssertionError(f"perturbing expert {e}'s weights left token {t}'s output unchanged "
                                 f"(max change {float(delta[t]):.3g}), "
                                 f"but token {t} chose experts {ids[t].tolist()} (tilemoe.route): expected it to change "
                                 f"({int(bad.sum())} of {int(counts[e])} tokens of expert {e} unaffected)")


def test_one_expert_takes_every_token(m):
    """A router forced to put every token on expert 3 (plus one other each) still gives the reference's output."""
    model = make_model(m)
    x = randn(64, HIDDEN)
    with torch.no_grad():
        x[:, 0] = 8.0  # a large constant feature ...
        model.router.weight[:, 0] = 0.0
        model.router.weight[3, 0] = 1.0  # ... that only expert 3's router row reads: logit ~ 8 + noise
    ids = reference_ids(model, x, TOP_K)
    assert (ids[:, 0] == 3).all(), "grader's forced router did not put every token on expert 3 first"
    expect_close(model, x, TOP_K, "y when expert 3 takes all 64 tokens")


def test_gradients_match_reference(m):
    """After backward of a random projection of y: grads of x, router.weight, w_gate_up, w_down equal the reference's."""
    model = make_model(m)
    x = randn(2, 24, HIDDEN).requires_grad_()
    y = model(x)
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape):
        got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise AssertionError(f"model(x): expected a tensor of shape {list(x.shape)}, got {got}")
    if not y.requires_grad:
        raise AssertionError("model(x): expected an output that requires grad, got one that does not "
                             "(is something run under torch.no_grad?)")
    projection = randn(*x.shape)
    (y * projection).sum().backward()

    leaves = {"x": x, "router.weight": model.router.weight, "w_gate_up": model.w_gate_up, "w_down": model.w_down}
    ref_leaves = {name: t.detach().clone().requires_grad_() for name, t in leaves.items()}
    ref_y = tilemoe.reference_moe(ref_leaves["x"], ref_leaves["router.weight"], ref_leaves["w_gate_up"],
                                  ref_leaves["w_down"], TOP_K)
    (ref_y * projection).sum().backward()
    for name, t in leaves.items():
        if t.grad is None:
            raise AssertionError(f"{name}.grad: expected a gradient after backward, got None "
                                 f"(is it used through .detach(), .data or torch.no_grad?)")
        grading.assert_close(t.grad, ref_leaves[name].grad, rtol=RTOL, atol=ATOL, what=f"{name}.grad")


def test_top_k_1_and_all_experts(m):
    """top_k = 1 and top_k = E (every expert, weights = the full softmax) both match the reference."""
    for top_k in (1, EXPERTS):
        model = make_model(m, top_k=top_k)
        expect_close(model, randn(40, HIDDEN), top_k, f"y with top_k={top_k} of E={EXPERTS}")


def test_tokens_are_independent(m):
    """Each token's output is the same alone as in a batch: nothing mixes tokens."""
    model = make_model(m)
    tokens = 12
    x = randn(tokens, HIDDEN)
    y = run(model, x)
    for t in range(tokens):
        grading.assert_close(run(model, x[t : t + 1])[0], y[t], rtol=RTOL, atol=ATOL,
                             what=f"token {t} run alone vs. in a batch of {tokens}")


def test_ragged_batches(m):
    """T = 1, T = 13, and experts that receive no token all match the reference."""
    model = make_model(m)
    x = randn(1, HIDDEN)  # one token: only 2 of the 8 experts get any work
    expect_close(model, x, TOP_K, f"y for a single token x [1, {HIDDEN}]")
    x = randn(13, HIDDEN)
    with torch.no_grad():
        x[:, 0] = 8.0
        model.router.weight[:, 0] = 0.0
        model.router.weight[5:, 0] = -1.0  # experts 5, 6, 7 score ~ -8: nobody picks them
    counts = torch.bincount(reference_ids(model, x, TOP_K).flatten().cpu(), minlength=EXPERTS)
    assert (counts[5:] == 0).all(), f"grader's input did not starve experts 5-7: tokens per expert {counts.tolist()}"
    expect_close(model, x, TOP_K, f"y for x [13, {HIDDEN}] with experts 5, 6, 7 receiving no token "
                                  f"(tokens per expert {counts.tolist()})")


CHECKS = [
    test_output_shape_and_dtype,
    test_output_is_finite,
    test_matches_reference,
    test_route_picks_the_reference_experts,
    test_weights_sum_to_one,
    test_unchosen_experts_do_not_contribute,
    test_every_chosen_expert_contributes,
    test_one_expert_takes_every_token,
    test_gradients_match_reference,
    test_top_k_1_and_all_experts,
    test_tokens_are_independent,
    test_ragged_batches,
]

if __name__ == "__main__":
    sys.exit(grading.main(CHECKS, __file__))
