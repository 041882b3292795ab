"""tilemoe.cuda.grouped_gemm: the CUDA C++ grouped GEMMs (csrc/grouped_gemm_*.cu).

Argument checks run anywhere (they come before any kernel); the kernels run with `pytest -m gpu`:
every element against an fp32 reference, outputs poisoned with NaN first, ragged experts (empty,
one row, one expert with everything, rows not a multiple of the tile), N and K off the tile.
"""

from __future__ import annotations

import pytest
import torch

import tilemoe
from tilemoe import cuda as tcuda

GPU_MARKS = (pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
             pytest.mark.skipif(tcuda._C is None, reason="tilemoe._C is not built"))


def on_gpu(test):
    """The kernel tests: marked gpu, skipped with the reason where they cannot run."""
    for mark in GPU_MARKS:
        test = mark(test)
    return test

VARIANTS = tcuda.GROUPED_GEMM_VARIANTS


def skip_unless_runs(variant: str) -> None:
    """Variant "hopper" runs on compute capability 9.0 only; elsewhere its tests skip, saying why."""
    if variant == "hopper" and (why := tcuda.hopper_unavailable_reason()):
        pytest.skip(f"variant 'hopper': {why}")


def make(counts: list[int], n: int, k: int, device: str = "cuda", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = sum(counts)
    a = torch.randn(rows, k, generator=g).bfloat16().to(device)
    w = (torch.randn(len(counts), n, k, generator=g) / k**0.5).bfloat16().to(device)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return a, w, offsets


def reference(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    ends = offsets.tolist()
    out = torch.zeros(a.shape[0], w.shape[1], dtype=torch.float32, device=a.device)
    for e in range(w.shape[0]):
        out[ends[e]:ends[e + 1]] = a[ends[e]:ends[e + 1]].float() @ w[e].float().T
    return out


def assert_every_element_close(c: torch.Tensor, ref: torch.Tensor) -> None:
    """bf16 output of fp32 sums: each element within bf16 rounding of the fp32 result, plus a
    little for the summation order; NaN anywhere fails."""
    assert not c.isnan().any(), f"{int(c.isnan().sum())} NaN outputs (rows not written?)"
    scale = ref.abs().max().clamp_min(1e-6)
    torch.testing.assert_close(c.float(), ref, rtol=8e-3, atol=2e-3 * float(scale))
    assert tilemoe.rel_error(c, ref) <= tilemoe.TOLERANCE[torch.bfloat16]


# %% Argument checks -----------------------------------------------------------------------------

def _args(**change):
    a, w, offsets = make([3, 0, 5], 16, 24, device="cpu")
    args = dict(a=a, w=w, offsets=offsets)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, exc, message",
    [
        (dict(a=[[1.0]]), TypeError, "a: expected a torch.Tensor, got list"),
        (dict(a=torch.zeros(8, 24, dtype=torch.float32)), TypeError, "a: expected dtype torch.bfloat16, got torch.float32"),
        (dict(w=torch.zeros(3, 16, 24, dtype=torch.float16)), TypeError, "w: expected dtype torch.bfloat16, got torch.float16"),
        (dict(offsets=torch.tensor([0, 3, 3, 8])), TypeError, "offsets: expected dtype torch.int32, got torch.int64"),
        (dict(a=torch.zeros(8, dtype=torch.bfloat16)), ValueError, "a: expected a 2-D tensor, got shape [8]"),
        (dict(w=torch.zeros(16, 24, dtype=torch.bfloat16)), ValueError, "w: expected a 3-D tensor, got shape [16, 24]"),
        (dict(w=torch.zeros(3, 16, 32, dtype=torch.bfloat16)), ValueError, "w: expected shape [E, N, K] with K = 24 (a's columns), got [3, 16, 32]"),
        (dict(offsets=torch.tensor([0, 3, 8], dtype=torch.int32)), ValueError, "offsets: expected shape [E + 1] = [4] (w has E = 3), got [3]"),
        (dict(w=torch.zeros(3, 12, 24, dtype=torch.bfloat16)), ValueError, "w: expected N a positive multiple of 8 (16-byte rows), got N = 12"),
        (dict(a=torch.zeros(8, 20, dtype=torch.bfloat16), w=torch.zeros(3, 16, 20, dtype=torch.bfloat16)), ValueError,
         "w: expected K a positive multiple of 8 (16-byte rows), got K = 20"),
        (dict(w=torch.zeros(1025, 16, 24, dtype=torch.bfloat16), offsets=torch.zeros(1026, dtype=torch.int32)), ValueError,
         "w: expected 1 to 1024 experts (shape [E, N, K]), got E = 1025"),
        (dict(a=torch.zeros(24, 8, dtype=torch.bfloat16).t()), ValueError, "a: expected a contiguous tensor, got strides (1, 8)"),
        ({}, ValueError, "a: expected a CUDA tensor, got device cpu"),
        (dict(variant="fast"), ValueError, "variant: expected one of 'auto', 'naive', 'tiled', 'hopper', got 'fast'"),
    ],
    ids=["a-list", "a-dtype", "w-dtype", "offsets-dtype", "a-1d", "w-2d", "K-mismatch", "offsets-length", "N-not-8",
         "K-not-8", "too-many-experts", "a-strided", "cpu", "variant"],
)
def test_argument_errors(change, exc, message):
    with pytest.raises(exc) as err:
        tcuda.grouped_gemm(**_args(**change))
    assert str(err.value).startswith(message), str(err.value)


def test_naive_column_limit_is_named():
    w = torch.empty(1, 65535 * 32 + 8, 8, dtype=torch.bfloat16, device="meta")  # shape only, no memory
    args = dict(a=torch.empty(4, 8, dtype=torch.bfloat16), w=w, offsets=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"w: expected N <= 2097120 for variant 'naive' \(65535 x 32 columns\), got N = 2097128"):
        tcuda.grouped_gemm(**args, variant="naive")


def test_cuda_backend_names_its_expert_limit():
    from tilemoe.backends import cuda_grouped

    w = make_weights_like(1025)
    with pytest.raises(ValueError, match=r"w_gate_up: expected at most 1024 experts for backend 'cuda', got E = 1025"):
        cuda_grouped.experts(torch.zeros(2, 8), None, w["w_gate_up"], w["w_down"])


def make_weights_like(num_experts: int) -> dict:
    return {"w_gate_up": torch.empty(num_experts, 16, 8, device="meta"), "w_down": torch.empty(num_experts, 8, 8, device="meta")}


def test_limit_matches_the_compiled_kernel():
    if tcuda._C is None:
        pytest.skip("tilemoe._C is not built")
    assert tcuda.MAX_EXPERTS == tcuda._C.grouped_gemm_max_experts()


# %% Results on the GPU --------------------------------------------------------------------------

RAGGED = {  # name: (rows per expert, N, K)
    "one-row": ([1], 64, 64),
    "empty-experts": ([0, 37, 0, 0, 200, 0], 136, 72),            # N and K off the 128/64 tile
    "one-hot-expert": ([0] * 7 + [1000], 256, 128),
    "not-tile-multiple": ([129, 127, 1, 255, 0, 300, 64, 2], 200, 520),
    "narrow": ([5, 131, 9], 8, 8),
    "many-experts": ([3 * (e % 5) for e in range(256)], 64, 96),   # 256 experts, some empty
    # last row tiles of 64 rows (half tiles: the second consumer warpgroup idles) and of 65
    "half-tile-edges": ([64, 65, 192, 193], 512, 256),
}


@on_gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(RAGGED))
def test_every_element_matches_fp32(case, variant):
    skip_unless_runs(variant)
    counts, n, k = RAGGED[case]
    a, w, offsets = make(counts, n, k, seed=len(case))
    out = torch.full((a.shape[0], n), float("nan"), dtype=torch.bfloat16, device="cuda")
    c = tcuda.grouped_gemm(a, w, offsets, variant=variant, out=out)
    assert c.data_ptr() == out.data_ptr()
    assert_every_element_close(c, reference(a, w, offsets))


@on_gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_real_shape(variant):
    skip_unless_runs(variant)
    # OLMoE's up-projection at 2000 tokens, top-8 over 64 experts, routed for real
    cfg = tilemoe.get_preset("olmoe-1b-7b")
    x = torch.randn(2000, cfg.hidden, device="cuda").bfloat16()
    routing = tilemoe.route(torch.randn(2000, cfg.experts, device="cuda"), cfg.top_k)
    a = x[routing.sorted_tokens].contiguous()
    w = (torch.randn(cfg.experts, 2 * cfg.ffn, cfg.hidden, device="cuda") / cfg.hidden**0.5).bfloat16()
    c = tcuda.grouped_gemm(a, w, routing.offsets, variant=variant)
    assert_every_element_close(c, reference(a, w, routing.offsets))


@on_gpu
@pytest.mark.parametrize("variant", ["tiled", "hopper"])
def test_rows_past_the_last_offset_are_not_written(variant):
    skip_unless_runs(variant)
    a, w, offsets = make([10, 0, 20], 64, 64)
    short = offsets.clone()
    short[-1] = 25  # the last expert keeps 15 of its 20 rows; rows 25..29 are "dropped slots"
    out = torch.full((30, 64), float("nan"), dtype=torch.bfloat16, device="cuda")
    tcuda.grouped_gemm(a, w, short, out=out, validate=False, variant=variant)
    assert out[25:].isnan().all() and not out[:25].isnan().any()
    assert_every_element_close(out[:25], reference(a[:25], w, short))


@on_gpu
@pytest.mark.parametrize("variant", ["tiled", "hopper"])
def test_without_validation_never_syncs_and_captures_in_a_graph(variant):
    skip_unless_runs(variant)
    a, w, offsets = make([40, 0, 300, 7], 128, 64)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        c = tcuda.grouped_gemm(a, w, offsets, validate=False, variant=variant)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out = torch.empty_like(c)
    tcuda.grouped_gemm(a, w, offsets, out=out, validate=False, variant=variant)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tcuda.grouped_gemm(a, w, offsets, out=out, validate=False, variant=variant)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, c)


@on_gpu
@pytest.mark.parametrize("shift", [1, 2, 4])
@pytest.mark.parametrize("name", ["a", "w", "out"])
def test_misaligned_views_are_named(name, shift):
    a, w, offsets = make([3, 5], 16, 16)
    args = dict(a=a, w=w, offsets=offsets, out=torch.empty(8, 16, dtype=torch.bfloat16, device="cuda"))
    storage = torch.empty(args[name].numel() + shift, dtype=torch.bfloat16, device="cuda")
    args[name] = storage[shift:].view(args[name].shape)  # contiguous, but 2 * shift bytes into its storage
    with pytest.raises(ValueError, match=rf"{name}: expected a 16-byte aligned start"):
        tcuda.grouped_gemm(**args)


@on_gpu
@pytest.mark.parametrize(
    "values, message",
    [
        ([1, 3, 8], "offsets: expected offsets[0] = 0, got offsets[0] = 1"),
        ([0, 5, 3], "offsets: expected non-decreasing values, got offsets[1] = 5 > offsets[2] = 3"),
        ([0, 3, 7], "offsets: expected offsets[E] = M = 8 (a's rows), got offsets[2] = 7"),
    ],
    ids=["start", "decreasing", "end"],
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_bad_offsets_are_named(values, message, variant):
    skip_unless_runs(variant)
    a, w, _ = make([3, 5], 16, 16)
    with pytest.raises(ValueError) as err:
        tcuda.grouped_gemm(a, w, torch.tensor(values, dtype=torch.int32, device="cuda"), variant=variant)
    assert str(err.value) == message


@on_gpu
def test_hopper_at_real_sizes_with_many_tiles_per_cta():
    # 64 experts x ~2000 rows, N = 2048, K = 2048: ~1100 tiles over 132 CTAs, 32 k-steps through
    # a ring of 4 stages, so every barrier changes phase many times within a tile and across tiles.
    skip_unless_runs("hopper")
    counts = [int(c) for c in torch.randint(1500, 2500, (64,), generator=torch.Generator().manual_seed(3))]
    counts[5] = 0
    counts[9] = 1
    a, w, offsets = make(counts, 2048, 2048, seed=4)
    out = torch.full((a.shape[0], 2048), float("nan"), dtype=torch.bfloat16, device="cuda")
    tcuda.grouped_gemm(a, w, offsets, variant="hopper", out=out)
    assert_every_element_close(out, reference(a, w, offsets))


@on_gpu
def test_auto_is_hopper_on_sm90_and_tiled_elsewhere(monkeypatch):
    a, w, offsets = make([40, 0, 300, 7], 128, 64)
    expected = "tiled" if tcuda.hopper_unavailable_reason() else "hopper"
    assert torch.equal(tcuda.grouped_gemm(a, w, offsets), tcuda.grouped_gemm(a, w, offsets, variant=expected))
    monkeypatch.setattr(tcuda, "hopper_unavailable_reason", lambda device=None: "compute capability 8.0, planted")
    assert torch.equal(tcuda.grouped_gemm(a, w, offsets), tcuda.grouped_gemm(a, w, offsets, variant="tiled"))
    with pytest.raises(ValueError, match=r"variant: expected a variant this GPU runs \('hopper' needs sm_90a\), "
                                         r"got 'hopper': compute capability 8.0, planted"):
        tcuda.grouped_gemm(a, w, offsets, variant="hopper")


# %% The mma.sync probe ---------------------------------------------------------------------------

def test_probe_says_why_it_cannot_run():
    if tcuda.available():
        pytest.skip("the probe can run here")
    with pytest.raises(RuntimeError, match="mma_peak_probe is unavailable: "):
        tcuda.mma_peak_probe()


@on_gpu
@pytest.mark.parametrize("device", [None, "cuda", "cuda:0", torch.device("cuda")])
def test_probe_runs_and_counts_its_flops(device):
    launch, flops = tcuda.mma_peak_probe(device, iterations=16)
    launch()
    torch.cuda.synchronize()
    props = torch.cuda.get_device_properties(0)
    blocks = props.multi_processor_count * (props.max_threads_per_multi_processor // tcuda._C.mma_peak_threads())
    warps = blocks * tcuda._C.mma_peak_threads() // 32
    assert flops == 2 * 16 * 8 * 16 * 8 * 16 * warps  # m16n8k16, 8 chains, 16 iterations per warp
