"""tilemoe._C and its wrapper tilemoe.cuda: the build, an nvcc compile check, input checks, GPU results.

On a CPU machine the build, nvcc and input-check tests run; the GPU tests run with `pytest -m gpu`
on a machine with a CUDA device (they skip, with a reason, elsewhere).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tilemoe import cuda as tcuda

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
DEFAULT_ARCHS = ("80", "90a", "100a")
GENCODES = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in DEFAULT_ARCHS]

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


# %% The build ---------------------------------------------------------------------------------

@needs_nvcc
def test_module_built_for_default_archs():
    try:
        from tilemoe import _C
    except ImportError as e:
        pytest.fail(f"nvcc is on PATH but tilemoe._C does not import ({e}); build it: pip install -e .")
    archs = _C.cuda_archs().split(";")
    for arch in DEFAULT_ARCHS:
        assert arch in archs, f"tilemoe._C.cuda_archs() = {_C.cuda_archs()!r} lacks {arch}"
    assert _C.cuda_runtime_version() >= 12000


@pytest.mark.nvcc
@needs_nvcc
@pytest.mark.parametrize("source", sorted([*CSRC.glob("*.cu"), *ROOT.glob("examples/*/*.cu")]),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_nvcc_compiles(source: Path, tmp_path: Path):
    """Every kernel and example program compiles for A100, H100/H200 and B200: the CPU-only guard on
    the CUDA code."""
    cmd = [NVCC, "-std=c++17", f"-I{CSRC / 'include'}", *GENCODES, "-c", str(source), "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"


# %% Input checks (before any kernel; most need no GPU) ----------------------------------------

@pytest.mark.parametrize(
    "topk_ids, num_experts, exc, message",
    [
        ([[0, 1]], 8, TypeError, "topk_ids: expected a torch.Tensor, got list"),
        (torch.zeros(4, 2, dtype=torch.int32), True, TypeError, "num_experts: expected an int, got bool"),
        (torch.zeros(4, 2, dtype=torch.int32), 8.0, TypeError, "num_experts: expected an int, got float"),
        (torch.zeros(4, 2, dtype=torch.int32), 0, ValueError, "num_experts: expected an int >= 1, got 0"),
        (torch.zeros(4, 2, dtype=torch.int64), 8, TypeError, "topk_ids: expected dtype torch.int32, got torch.int64"),
        (torch.zeros(2, 4, dtype=torch.int32).t(), 8, ValueError, "topk_ids: expected a contiguous tensor, got strides (1, 4)"),
        (torch.zeros(4, 2, dtype=torch.int32), 8, ValueError, "topk_ids: expected a CUDA tensor, got device cpu"),
        # a meta tensor has a shape but no memory: the size limit is checked without allocating 8 GiB
        (torch.empty(2**31, dtype=torch.int32, device="meta"), 8, ValueError,
         "topk_ids: expected at most 2147483647 elements, got 2147483648"),
    ],
    ids=["not-tensor", "E-bool", "E-float", "E-zero", "dtype", "strided", "cpu", "too-many-slots"],
)
def test_input_errors(topk_ids, num_experts, exc, message):
    with pytest.raises(exc) as info:
        tcuda.expert_counts(topk_ids, num_experts)
    assert str(info.value) == message


def test_reason_when_not_built(monkeypatch):
    monkeypatch.setattr(tcuda, "_C", None)
    assert not tcuda.available()
    assert tcuda.unavailable_reason() == (
        "tilemoe._C is not built (no CUDA compiler at install time; reinstall with nvcc on PATH)"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_unavailable_without_gpu():
    reason = tcuda.unavailable_reason()
    assert isinstance(reason, str) and reason
    assert not tcuda.available()


# %% Results on the GPU ------------------------------------------------------------------------

def reference(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """counts = bincount of the ids in [0, E) (dropped -1 and out-of-range ids ignored), on CPU."""
    flat = ids.reshape(-1).long().cpu()
    flat = flat[(flat >= 0) & (flat < num_experts)]
    counts = torch.bincount(flat, minlength=num_experts).to(torch.int32)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    return counts, offsets


def make_ids(case: str, num_tokens: int, top_k: int, num_experts: int, seed: int) -> torch.Tensor:
    """Fresh random ids [T, K] on the CPU for one routing pattern."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=g, dtype=torch.int32)
    if case == "one-expert":       # every slot to the last expert; all others empty
        ids.fill_(num_experts - 1)
    elif case == "empty-experts":  # only even experts receive tokens
        ids = ids - ids % 2
    elif case == "dropped":        # about 30% of the slots dropped (-1)
        ids[torch.rand(ids.shape, generator=g) < 0.3] = -1
    elif case == "all-dropped":
        ids.fill_(-1)
    return ids


CASES = [
    # (case, T, K, E)
    ("uniform", 1000, 2, 8),
    ("uniform", 1, 1, 8),           # a single slot
    ("uniform", 0, 2, 8),           # no slots at all: counts and offsets all zero
    ("one-expert", 4096, 8, 8),
    ("one-expert", 333, 3, 4096),
    ("empty-experts", 2000, 4, 257),
    ("dropped", 777, 8, 64),
    ("all-dropped", 100, 2, 8),
    *[("dropped", 1531, 4, e) for e in (1, 8, 257, 4096)],
    ("uniform", 5000, 8, 20000),    # too many experts for the shared-memory histogram
    ("dropped", 375_000, 8, 256),   # 3 million slots
    ("one-expert", 375_000, 8, 128),
]


def check(counts, offsets, ids, num_experts):
    ref_counts, ref_offsets = reference(ids, num_experts)
    assert counts.dtype == offsets.dtype == torch.int32
    assert counts.shape == (num_experts,) and offsets.shape == (num_experts + 1,)
    assert torch.equal(counts.cpu(), ref_counts)
    assert torch.equal(offsets.cpu(), ref_offsets)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case, T, K, E", CASES, ids=[f"{c}-T{t}-K{k}-E{e}" for c, t, k, e in CASES])
def test_expert_counts_match_torch(case, T, K, E):
    ids = make_ids(case, T, K, E, seed=T * 31 + E).cuda()
    counts, offsets = tcuda.expert_counts(ids, E)
    assert counts.device == ids.device and offsets.device == ids.device
    check(counts, offsets, ids, E)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case, T, K, E", CASES, ids=[f"{c}-T{t}-K{k}-E{e}" for c, t, k, e in CASES])
def test_raw_module_overwrites_poison_on_side_stream(case, T, K, E):
    """Every output element is written (no stale -7 survives), on a non-default stream."""
    from tilemoe import _C

    ids = make_ids(case, T, K, E, seed=T * 17 + E + 1).cuda()
    counts = torch.full((E,), -7, dtype=torch.int32, device="cuda")
    offsets = torch.full((E + 1,), -7, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # inputs were written on the default stream
    with torch.cuda.stream(side):
        _C.expert_counts(ids.data_ptr(), ids.numel(), E, counts.data_ptr(), offsets.data_ptr(),
                         side.cuda_stream, ids.device.index)
        w_counts, w_offsets = tcuda.expert_counts(ids, E, validate=False)  # the wrapper uses `side`
    side.synchronize()
    check(counts, offsets, ids, E)
    check(w_counts, w_offsets, ids, E)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bad", [8, 1000, -2])
def test_out_of_range_ids(bad):
    ids = make_ids("uniform", 64, 2, 8, seed=3).cuda()
    ids[5, 1] = bad
    with pytest.raises(ValueError) as info:
        tcuda.expert_counts(ids, 8)
    assert str(info.value) == f"topk_ids: expected every id in [-1, 8), got {bad}"
    # validate=False skips the check (no host sync); such ids are then simply not counted
    counts, offsets = tcuda.expert_counts(ids, 8, validate=False)
    check(counts, offsets, ids, 8)


@pytest.mark.gpu
@gpu
def test_no_host_sync_without_validation():
    ids = make_ids("dropped", 512, 4, 32, seed=5).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        counts, offsets = tcuda.expert_counts(ids, 32, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check(counts, offsets, ids, 32)


@pytest.mark.gpu
@gpu
def test_cuda_graph_capture():
    ids = make_ids("dropped", 300, 4, 16, seed=7).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside capture (module loading, allocator)
        tcuda.expert_counts(ids, 16, validate=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        counts, offsets = tcuda.expert_counts(ids, 16, validate=False)
    ids.copy_(make_ids("uniform", 300, 4, 16, seed=8).cuda())  # new routing, same buffers
    graph.replay()
    torch.cuda.synchronize()
    check(counts, offsets, ids, 16)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_second_device():
    ids = make_ids("dropped", 1000, 8, 64, seed=9).to("cuda:1")
    with torch.cuda.device(0):  # the current device differs from the tensors' device
        counts, offsets = tcuda.expert_counts(ids, 64)
    assert counts.device == ids.device
    torch.cuda.synchronize(1)
    check(counts, offsets, ids, 64)


@pytest.mark.gpu
@gpu
def test_not_built_raises_with_reason(monkeypatch):
    monkeypatch.setattr(tcuda, "_C", None)
    with pytest.raises(RuntimeError, match="tilemoe._C is not built"):
        tcuda.expert_counts(torch.zeros(4, 2, dtype=torch.int32, device="cuda"), 8)
