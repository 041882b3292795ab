"""tilemoe.cuda.moe_up, the MoE layer's fused Hopper up-projection (csrc/grouped_gemm_hopper.cu),
backend "cuda", which runs it, and tilemoe.cuda.grouped_wgrad, the weight gradients the Triton
backward takes on such a GPU (csrc/grouped_wgrad_hopper.cu).

Argument checks run anywhere (they come before any kernel). The kernels run with `pytest -m gpu` on
a compute capability 9.0 GPU: every element against an fp32 reference, outputs poisoned with NaN
first, ragged experts (empty, one row, one expert with everything, rows not a multiple of the
128-row tile), I and K off the tile, and dropped rows that must stay unwritten.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import tilemoe
from moe_cases import forced_routing, make_weights
from tilemoe import cuda as tcuda
from tilemoe.routing import build_routing


def make(counts: list[int], num_tokens: int, ffn: int, k: int, device: str = "cuda", seed: int = 0):
    """x [T, K], w_gate_up [E, 2I, K], offsets, and a gather of random tokens (repeats allowed)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, k, generator=g).bfloat16().to(device)
    w = (torch.randn(len(counts), 2 * ffn, k, generator=g) / k**0.5).bfloat16().to(device)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=device)
    gather = torch.randint(0, num_tokens, (sum(counts),), generator=g).to(device)
    return x, w, offsets, gather


def up_reference(x, w, offsets, gather) -> torch.Tensor:
    ends, ffn = offsets.tolist(), w.shape[1] // 2
    out = torch.zeros(gather.shape[0], ffn, dtype=torch.float32, device=x.device)
    for e in range(w.shape[0]):
        h = x[gather[ends[e]:ends[e + 1]]].float() @ w[e].float().T
        out[ends[e]:ends[e + 1]] = F.silu(h[:, :ffn]) * h[:, ffn:]
    return out


def assert_every_element_close(c: torch.Tensor, ref: torch.Tensor) -> None:
    """Each element within bf16 rounding of the fp32 result (plus a little for summation order)."""
    assert not c.isnan().any(), f"{int(c.isnan().sum())} NaN outputs (rows not written?)"
    scale = ref.abs().max().clamp_min(1e-6)
    torch.testing.assert_close(c.float(), ref, rtol=8e-3, atol=2e-3 * float(scale))


# %% Argument checks (any machine) --------------------------------------------------------------------

def _up_args(**change):
    x, w, offsets, gather = make([3, 0, 5], 6, 16, 24, device="cpu")
    args = dict(x=x, w_gate_up=w, offsets=offsets, gather=gather)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, exc, message",
    [
        (dict(x=torch.zeros(6, 24)), TypeError, "x: expected dtype torch.bfloat16, got torch.float32"),
        (dict(gather=torch.zeros(8, dtype=torch.int32)), TypeError, "gather: expected dtype torch.int64, got torch.int32"),
        (dict(offsets=torch.tensor([0, 3, 3, 8])), TypeError, "offsets: expected dtype torch.int32, got torch.int64"),
        (dict(w_gate_up=torch.zeros(32, 24, dtype=torch.bfloat16)), ValueError,
         "w_gate_up: expected a 3-D tensor, got shape [32, 24]"),
        ({}, ValueError, "x: expected a CUDA tensor, got device cpu"),
    ],
    ids=["x-dtype", "gather-int32", "offsets-int64", "w-2d", "cpu"],
)
def test_up_argument_errors(change, exc, message):
    with pytest.raises(exc, match="^" + message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        tcuda.moe_up(**_up_args(**change))


# %% The kernels (a compute capability 9.0 GPU) -----------------------------------------------------

GPU_MARKS = (pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
             pytest.mark.skipif(tcuda._C is None, reason="tilemoe._C is not built"))


def on_hopper(test):
    """Marked gpu; skipped with the reason where the Hopper kernels cannot run."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        if why := tcuda.hopper_unavailable_reason():
            pytest.skip(f"the fused Hopper GEMMs: {why}")
        return test(*args, **kwargs)

    for mark in GPU_MARKS:
        run = mark(run)
    return run


# name -> (rows per expert, tokens, I, K): empty experts, one row, one expert with everything, rows
# not a multiple of the 128-row tile, I not a multiple of the 128-column tile, K not a multiple of 64.
RAGGED = {
    "tile-multiples": ([128, 256, 0, 128], 300, 256, 128),
    "not-tile-multiples": ([129, 127, 1, 255, 0, 300, 64, 2], 500, 136, 200),
    "one-expert-takes-all": ([0, 0, 517, 0], 517, 128, 64),
    "single-row": ([0, 1], 1, 64, 64),
    "narrow": ([5, 131, 9], 40, 8, 8),
    "many-experts": ([3 * (e % 5) for e in range(256)], 200, 64, 96),
    # last row tiles of 64 rows (half tiles: neither the producer's copies nor the second
    # consumer's wgmmas run for rows 64..127) and of 65
    "half-tile-edges": ([64, 65, 192, 193], 400, 256, 192),
}


@on_hopper
@pytest.mark.parametrize("case", list(RAGGED))
def test_up_matches_fp32_on_every_element(case):
    counts, num_tokens, ffn, k = RAGGED[case]
    x, w, offsets, gather = make(counts, num_tokens, ffn, k, seed=len(case))
    out = torch.full((gather.shape[0], ffn), float("nan"), dtype=torch.bfloat16, device="cuda")
    act = tcuda.moe_up(x, w, offsets, gather, out=out)
    assert act.data_ptr() == out.data_ptr()
    assert_every_element_close(act, up_reference(x, w, offsets, gather))


@on_hopper
def test_rows_past_the_last_offset_are_neither_read_nor_written():
    """Dropped slots sit past offsets[E]: act's rows there stay NaN, and a gather entry there may
    point anywhere (it is never read)."""
    x, w, offsets, gather = make([10, 0, 20], 40, 64, 64)
    short = offsets.clone()
    short[-1] = 25
    gather[25:] = 10**6  # out of range: reading it would fault
    act = torch.full((30, 64), float("nan"), dtype=torch.bfloat16, device="cuda")
    tcuda.moe_up(x, w, short, gather, out=act, validate=False)
    assert act[25:].isnan().all()
    assert_every_element_close(act[:25], up_reference(x, w, short, gather[:25]))


@on_hopper
def test_validation_names_out_of_range_indices():
    x, w, offsets, gather = make([3, 4], 8, 64, 64)
    gather[5] = 8
    with pytest.raises(ValueError, match=r"^gather: expected entries in \[0, 8\) for the rows offsets cover, got 8$"):
        tcuda.moe_up(x, w, offsets, gather)


@on_hopper
def test_no_host_sync_and_a_cuda_graph_replays_it():
    x, w, offsets, gather = make([40, 0, 300, 7], 100, 128, 64)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        act = tcuda.moe_up(x, w, offsets, gather, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out = torch.empty_like(act)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tcuda.moe_up(x, w, offsets, gather, out=out, validate=False)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, act)


@on_hopper
@pytest.mark.parametrize("preset", ["olmoe-1b-7b", "qwen3-30b-a3b"])
def test_backend_cuda_runs_the_fused_kernels_at_a_real_shape(preset, monkeypatch):
    """moe_forward(backend="cuda") at a model's sizes (1000 tokens: not a multiple of the tile),
    through the fused up-projection, against reference_moe."""
    cfg = tilemoe.get_preset(preset)
    w = cfg.init_weights(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1000, cfg.hidden, device="cuda").bfloat16()
    routing = tilemoe.route(tilemoe.router_logits(x, w["router_weight"]), cfg.top_k, **cfg.router_options())
    calls = []
    moe_up = tcuda.moe_up
    monkeypatch.setattr(tcuda, "moe_up", lambda *args, **kwargs: calls.append(1) or moe_up(*args, **kwargs))
    y = tilemoe.moe_forward(x, **w, top_k=cfg.top_k, routing=routing, backend="cuda")
    assert calls == [1]
    ref = tilemoe.reference_moe(x.float(), **{k: v.float() for k, v in w.items()}, top_k=cfg.top_k, routing=routing)
    assert tilemoe.rel_error(y, ref) <= tilemoe.TOLERANCE[torch.bfloat16]


@on_hopper
def test_backend_cuda_replays_as_a_cuda_graph():
    """GraphedMoE(backend="cuda"): no host sync anywhere in the forward, fresh inputs replayed right."""
    cfg = tilemoe.get_preset("olmoe-1b-7b")
    w = cfg.init_weights(device="cuda", dtype=torch.bfloat16, shared=False)
    moe = tilemoe.graphs.GraphedMoE(w, cfg.top_k, backend="cuda", **cfg.router_options())
    for seed in range(3):  # capture on the first, replay on the others: each output is the new input's
        x = torch.randn(64, cfg.hidden, generator=torch.Generator().manual_seed(seed)).bfloat16().cuda()
        y = moe(x).clone()
        ref = tilemoe.reference_moe(x.float(), **{k: v.float() for k, v in w.items()}, top_k=cfg.top_k,
                                    **cfg.router_options())
        assert tilemoe.rel_error(y, ref) <= tilemoe.TOLERANCE[torch.bfloat16], seed


@on_hopper
def test_backend_cuda_leaves_out_capacity_drops():
    """Slots over capacity are never computed or summed (their rows stay unwritten)."""
    w = make_weights(128, 64, 4, dtype=torch.bfloat16, device="cuda", seed=3)
    x = torch.randn(50, 128, device="cuda").bfloat16()
    ids = torch.zeros(50, 2, dtype=torch.int64)
    ids[:, 1] = torch.arange(50) % 3 + 1
    full = forced_routing(ids.cuda(), 4, seed=1)
    kept_ids = full.topk_ids.clone()
    kept_ids[30:, 0] = -1  # expert 0 keeps its first 30 tokens
    routing = build_routing(kept_ids.long(), full.topk_weights.masked_fill(kept_ids < 0, 0), full.topk_weights, 4,
                            has_empty_slots=True)
    assert routing.has_empty_slots
    y = tilemoe.moe_forward(x, **w, top_k=2, backend="cuda", routing=routing)
    ref = tilemoe.reference_moe(x.double(), **{k: v.double() for k, v in w.items()}, top_k=2, routing=routing)
    assert tilemoe.rel_error(y, ref) <= tilemoe.TOLERANCE[torch.bfloat16]


@on_hopper
def test_one_tile_counter_serves_launches_in_order(monkeypatch):
    """The warp-specialized kernels claim tiles from a counter and leave it zero when they finish,
    so one pair serves launches in order on a stream (the C++ harness relies on it; the Python
    wrapper takes a fresh pair per launch). Here every launch shares one pair."""
    counter = torch.zeros(2, dtype=torch.int64, device="cuda")
    monkeypatch.setattr(tcuda, "_tile_counter", lambda device: counter)
    x, w, offsets, gather = make([300, 64, 0, 193, 1], 400, 256, 192, seed=5)
    up_ref = up_reference(x, w, offsets, gather)
    a = x[gather]
    w_down = (torch.randn(5, 128, 192, generator=torch.Generator().manual_seed(6)) / 192**0.5).bfloat16().cuda()
    down_ref = torch.cat([a[s:e].float() @ w_down[i].float().T
                          for i, (s, e) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist()))])
    for _ in range(3):
        act = tcuda.moe_up(x, w, offsets, gather, out=torch.full_like(up_ref, float("nan"), dtype=torch.bfloat16))
        out = tcuda.grouped_gemm(a, w_down, offsets, variant="hopper",
                                 out=torch.full((a.shape[0], 128), float("nan"), dtype=torch.bfloat16, device="cuda"))
        torch.cuda.synchronize()
        assert_every_element_close(act, up_ref)
        assert_every_element_close(out, down_ref)
        assert counter.eq(0).all(), counter.tolist()


# %% The weight gradients (csrc/grouped_wgrad_hopper.cu) -------------------------------------------

def make_wgrad(counts: list[int], num_tokens: int, n1: int, n2: int, gather_side: str, seed: int = 0):
    """(a, b, offsets, gathers): the in-place operand has one row per grouped row, the gathered
    one a row per token, gather entries random tokens (repeats allowed)."""
    g = torch.Generator().manual_seed(seed)
    rows = sum(counts)
    gather = torch.randint(0, max(num_tokens, 1), (rows,), generator=g).cuda()
    a_rows, b_rows = (num_tokens, rows) if gather_side == "a" else (rows, num_tokens)
    a = torch.randn(a_rows, n1, generator=g).bfloat16().cuda()
    b = torch.randn(b_rows, n2, generator=g).bfloat16().cuda()
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return a, b, offsets, {f"{gather_side}_gather": gather}


def wgrad_reference(a, b, offsets, a_gather=None, b_gather=None) -> torch.Tensor:
    ends = offsets.tolist()
    out = torch.zeros(len(ends) - 1, a.shape[1], b.shape[1], device=a.device)
    for e in range(len(ends) - 1):
        rows = torch.arange(ends[e], ends[e + 1], device=a.device)
        out[e] = (a[a_gather[rows] if a_gather is not None else rows].float().T
                  @ b[b_gather[rows] if b_gather is not None else rows].float())
    return out


def _wgrad_args(**change):
    a, b = torch.zeros(6, 16, dtype=torch.bfloat16), torch.zeros(8, 24, dtype=torch.bfloat16)
    args = dict(a=a, b=b, offsets=torch.tensor([0, 3, 8], dtype=torch.int32), b_gather=torch.zeros(8, dtype=torch.int64))
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, exc, message",
    [
        (dict(a_gather=torch.zeros(8, dtype=torch.int64)), ValueError,
         "a_gather: expected exactly one of a_gather and b_gather (the operand read through the permutation), got both"),
        (dict(b_gather=None), ValueError,
         "a_gather: expected exactly one of a_gather and b_gather (the operand read through the permutation), got neither"),
        (dict(b=torch.zeros(8, 24)), TypeError, "b: expected dtype torch.bfloat16, got torch.float32"),
        ({}, ValueError, "a: expected a CUDA tensor, got device cpu"),
        (dict(accumulate=True), ValueError, "out: expected the [E, N1, N2] tensor to add into (accumulate=True), got None"),
    ],
    ids=["both-gathered", "none-gathered", "b-dtype", "cpu", "accumulate-without-out"],
)
def test_wgrad_argument_errors(change, exc, message):
    with pytest.raises(exc) as info:
        tcuda.grouped_wgrad(**_wgrad_args(**change))
    assert str(info.value) == message


def test_weight_gradient_kernel_choice_is_checked():
    from tilemoe.triton import configs, ops

    a = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="^kernel: expected \"auto\", \"triton\" or \"cuda\", got 'cutlass'$"):
        ops.weight_gradient(a, a, None, configs.WgradConfig(), dtype=a.dtype, kernel="cutlass")
    with pytest.raises(RuntimeError, match=r"^weight_gradient\(kernel='cuda'\) cannot run here: the operands are not on a CUDA device$"):
        ops.weight_gradient(a, a, None, configs.WgradConfig(), a_gather=torch.zeros(4, dtype=torch.int64),
                            dtype=a.dtype, kernel="cuda")
    routing = mock_routing(torch.tensor([0, 1, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^accumulate_into: expected shape \[E, N1, N2\] = \[2, 8, 8\], got \[2, 8, 4\]$"):
        ops.weight_gradient(a, a, routing, configs.WgradConfig(), dtype=a.dtype, accumulate_into=torch.zeros(2, 8, 4))
    with pytest.raises(TypeError, match=r"^accumulate_into: expected a torch.float32 tensor on cpu, got torch.float16 on cpu$"):
        ops.weight_gradient(a, a, routing, configs.WgradConfig(), dtype=a.dtype,
                            accumulate_into=torch.zeros(2, 8, 8, dtype=torch.float16))


# name -> (rows per expert, tokens, N1, N2): empty experts, one row, one expert with everything,
# rows not a multiple of the 64-row k-step, N1 and N2 off the 128 x 256 tile.
WGRAD_CASES = {
    "tile-multiples": ([128, 256, 0, 64], 300, 128, 256),
    "not-tile-multiples": ([129, 127, 1, 255, 0, 300, 63, 2], 500, 136, 200),
    "one-expert-takes-all": ([0, 0, 517, 0], 517, 256, 512),
    "single-row": ([0, 1], 1, 64, 64),
    "narrow": ([5, 131, 9], 40, 8, 8),
    "many-experts": ([3 * (e % 5) for e in range(256)], 200, 64, 96),
}


@on_hopper
@pytest.mark.parametrize("gather_side", ["a", "b"])
@pytest.mark.parametrize("case", list(WGRAD_CASES))
def test_wgrad_matches_fp32_on_every_element(case, gather_side):
    counts, num_tokens, n1, n2 = WGRAD_CASES[case]
    a, b, offsets, gathers = make_wgrad(counts, num_tokens, n1, n2, gather_side, seed=len(case))
    out = torch.full((len(counts), n1, n2), float("nan"), dtype=torch.bfloat16, device="cuda")
    dw = tcuda.grouped_wgrad(a, b, offsets, out=out, **gathers)
    assert dw.data_ptr() == out.data_ptr()
    assert_every_element_close(dw, wgrad_reference(a, b, offsets, **gathers))


@on_hopper
@pytest.mark.parametrize("gather_side", ["a", "b"])
@pytest.mark.parametrize("case", ["not-tile-multiples", "one-expert-takes-all", "many-experts"])
def test_wgrad_accumulate_adds_into_out(case, gather_side):
    """accumulate=True: out[e] += A_e^T B_e in place (TMA reduce-adds); experts without rows keep
    their values. Through ops.weight_gradient the Triton kernel adds the same."""
    from tilemoe.triton import configs, ops

    counts, num_tokens, n1, n2 = WGRAD_CASES[case]
    a, b, offsets, gathers = make_wgrad(counts, num_tokens, n1, n2, gather_side, seed=len(case) + 1)
    held = torch.randn(len(counts), n1, n2, generator=torch.Generator().manual_seed(3)).bfloat16().cuda()
    want = held.float() + wgrad_reference(a, b, offsets, **gathers)
    out = held.clone()
    dw = tcuda.grouped_wgrad(a, b, offsets, out=out, accumulate=True, **gathers)
    assert dw.data_ptr() == out.data_ptr()
    assert_every_element_close(dw, want)
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert torch.equal(dw[empty], held[empty])
    for kernel in ("cuda", "triton"):
        out = held.clone()
        dw = ops.weight_gradient(a, b, mock_routing(offsets), configs.WgradConfig(), dtype=torch.bfloat16, kernel=kernel,
                                 accumulate_into=out, **gathers)
        assert dw.data_ptr() == out.data_ptr(), kernel
        assert_every_element_close(dw, want)


@on_hopper
@pytest.mark.parametrize("gather_side", ["a", "b"])
def test_wgrad_ignores_rows_past_the_last_offset(gather_side):
    """Dropped slots sit past offsets[E]: the in-place operand's rows there may hold anything (here
    NaN) and their gather entries may point anywhere; neither is read."""
    a, b, offsets, gathers = make_wgrad([70, 0, 20], 40, 128, 256, gather_side, seed=4)
    short = offsets.clone()
    short[-1] = 85  # the last expert keeps 15 of its 20 rows
    gather = next(iter(gathers.values()))
    gather[85:] = 10**6
    (b if gather_side == "a" else a)[85:] = float("nan")
    dw = tcuda.grouped_wgrad(a, b, short, validate=False, **gathers)
    gather[85:] = 0
    assert_every_element_close(dw, wgrad_reference(a, b, short, **gathers))
    assert dw[1].eq(0).all()  # an expert without rows gets zeros


@on_hopper
def test_weight_gradient_auto_takes_the_cuda_kernel_and_triton_agrees():
    from tilemoe.triton import configs, ops

    a, b, offsets, gathers = make_wgrad([300, 5, 0, 128], 200, 256, 384, "b", seed=9)
    routing = mock_routing(offsets)
    ref = wgrad_reference(a, b, offsets, **gathers)
    for kernel in ("auto", "cuda", "triton"):
        dw = ops.weight_gradient(a, b, routing, configs.WgradConfig(), dtype=torch.bfloat16, kernel=kernel, **gathers)
        assert_every_element_close(dw, ref)
    with mock.patch.object(tcuda, "grouped_wgrad", wraps=tcuda.grouped_wgrad) as cuda_wgrad:
        ops.weight_gradient(a, b, routing, configs.WgradConfig(), dtype=torch.bfloat16, **gathers)
    assert cuda_wgrad.call_count == 1


def mock_routing(offsets: torch.Tensor):
    """What weight_gradient reads of a Routing: its offsets and expert count."""
    return SimpleNamespace(offsets=offsets, num_experts=offsets.numel() - 1)
