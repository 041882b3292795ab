"""The compiled CUDA extension ``tilemoe._C``, behind checked Python functions.

    from tilemoe import cuda
    if cuda.available():
        counts, offsets = cuda.expert_counts(topk_ids, num_experts=8)
    else:
        print(cuda.unavailable_reason())

``tilemoe._C`` is built by CMake when ``pip install`` finds nvcc (see CMakeLists.txt); without it
the package installs as pure Python and this module reports itself unavailable. ``_C`` takes raw
device pointers, sizes and a stream handle as ints, so it does not link PyTorch; every check on
tensors (dtype, device, contiguity, id range) happens here, before anything is launched.
Errors come from tilemoe.checks: ``"<argument>: expected <expected>, got <actual>"``.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import checks

try:
    from tilemoe import _C
except ImportError:  # built without nvcc: the pure-Python install
    _C = None

__all__ = [
    "available", "unavailable_reason", "expert_counts", "grouped_gemm", "GROUPED_GEMM_VARIANTS",
    "hopper_unavailable_reason", "moe_up", "grouped_wgrad", "mma_peak_probe",
]

_INT32_MAX = 2**31 - 1


def unavailable_reason() -> str | None:
    """Why the cuda backend cannot run here, or None when it can."""
    if _C is None:
        return "tilemoe._C is not built (no CUDA compiler at install time; reinstall with nvcc on PATH)"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    # _C carries its own static CUDA runtime; it needs a driver of at least the same major version
    # (e.g. a CUDA 13.x build needs a driver that supports CUDA 13: R580 or newer).
    runtime, driver = _C.cuda_runtime_version(), _C.cuda_driver_version()
    if driver // 1000 < runtime // 1000:
        return (
            f"tilemoe._C was built with CUDA {_version(runtime)} but the driver supports CUDA "
            f"{_version(driver)}; update the driver or reinstall with an older nvcc on PATH"
        )
    return None


def available() -> bool:
    """True when tilemoe._C is built and can run on a CUDA device here."""
    return unavailable_reason() is None


def expert_counts(
    topk_ids: torch.Tensor, num_experts: int, *, validate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens per expert and where each expert's rows start, computed on the GPU.

    Args:
        topk_ids: int32 CUDA tensor of the router's expert ids, any shape (usually [T, K]),
            contiguous. An id of -1 marks a dropped slot (e.g. over capacity) and is not counted.
        num_experts: E, an int >= 1.
        validate: check that every id is in [-1, E) first. This costs one host synchronization
            (reading back the min and max id), so it cannot be used inside CUDA-graph capture;
            pass False on a hot path whose ids are known to be valid. With validate=False an id
            outside [-1, E) is silently not counted.

    Returns:
        ``(counts, offsets)``, int32 on topk_ids' device: ``counts`` [E] with ``counts[e]`` = number
        of slots routed to expert e, and ``offsets`` [E + 1], the exclusive prefix sum:
        ``offsets[0] = 0``, ``offsets[e + 1] = offsets[e] + counts[e]``, so expert e owns rows
        ``offsets[e]:offsets[e + 1]`` of the expert-sorted slots and ``offsets[E]`` is the number of
        slots kept. Equal to ``torch.bincount(ids[ids >= 0], minlength=E)`` and its cumsum.

    The kernels run on the current stream of topk_ids' device; the call does not synchronize
    the host (unless validate=True).
    """
    # Argument checks first, cheapest first, so that most mistakes are reported without a GPU.
    checks.check_tensor("topk_ids", topk_ids)
    checks.check_int("num_experts", num_experts, low=1, high=_INT32_MAX - 1)  # E + 1 int32 offsets
    if topk_ids.dtype != torch.int32:
        checks.fail("topk_ids", "dtype torch.int32", topk_ids.dtype, TypeError)
    checks.check_contiguous("topk_ids", topk_ids)
    num_slots = topk_ids.numel()
    if num_slots > _INT32_MAX:  # counts and offsets are int32
        checks.fail("topk_ids", f"at most {_INT32_MAX} elements", num_slots)
    if topk_ids.device.type != "cuda":
        checks.fail("topk_ids", "a CUDA tensor", f"device {topk_ids.device}")
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"tilemoe.cuda.expert_counts is unavailable: {reason}")
    if validate and num_slots > 0:
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(topk_ids)).tolist())  # one sync
        if lo < -1 or hi >= num_experts:
            bad = lo if lo < -1 else hi
            checks.fail("topk_ids", f"every id in [-1, {num_experts})", bad)

    device = topk_ids.device
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    _C.expert_counts(
        topk_ids.data_ptr(),
        num_slots,
        num_experts,
        counts.data_ptr(),
        offsets.data_ptr(),
        torch.cuda.current_stream(device).cuda_stream,
        device.index,
    )
    return counts, offsets


# "naive": one launch per expert of a shared-memory tiled kernel with fp32 FMAs (the sequential
# baseline; it reads the offsets on the host). "tiled": one persistent launch over every
# expert's tiles, tensor cores (mma.sync), a cp.async pipeline; no host sync. "hopper": the same
# scheduler on sm_90a, TMA copies into an mbarrier ring, wgmma, a warp-specialized producer.
# "auto": "hopper" where it runs (hopper_unavailable_reason), else "tiled".
GROUPED_GEMM_VARIANTS = ("auto", "naive", "tiled", "hopper")
# The tiled kernel keeps every expert's tile prefix sum in shared memory.
MAX_EXPERTS = 1024
# The naive kernel puts its 32-column tiles in gridDim.y (at most 65535).
_NAIVE_MAX_N = 65535 * 32


def grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    *,
    variant: str = "auto",
    out: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """``C[s:t] = A[s:t] @ W[e]^T`` for every expert e, with ``s, t = offsets[e], offsets[e + 1]``.

    Args:
        a: [M, K] bfloat16 CUDA tensor, contiguous: the rows of every expert, sorted by expert.
        w: [E, N, K] bfloat16 on a's device, contiguous: the experts' weights in nn.Linear layout
            (DESIGN.md's [E, N, K]). N and K must be multiples of 8 (16-byte rows).
        offsets: [E + 1] int32 on a's device, contiguous: ``offsets[0] = 0``, non-decreasing,
            ``offsets[E] = M`` (a Routing's ``offsets``). An expert may have no rows.
        variant: one of GROUPED_GEMM_VARIANTS. "naive" copies the offsets to the host (one sync)
            to size its per-expert launches; "tiled" and "hopper" read them on the device.
            "hopper" needs a compute capability 9.0 GPU and a build with the 90a target; "auto"
            takes it there and "tiled" elsewhere.
        out: [M, N] bfloat16 to write into (contiguous, a's device), or None for a new tensor.
        validate: check the offsets' values first (one host sync). With validate=False "tiled"
            and "hopper" trust them (a hot path, CUDA-graph capture): ``offsets[E]`` may then be below M, and
            rows from offsets[E] on are left unwritten, as torch grouped_mm does. "naive" reads
            and checks them on the host either way.

    Returns:
        C, [M, N] bfloat16 (``out`` when given): fp32 accumulation, rounded once to bf16.
        The kernels run on the current stream of a's device.
    """
    checks.check_choice("variant", variant, GROUPED_GEMM_VARIANTS)
    for name, t, dims in (("a", a, 2), ("w", w, 3), ("offsets", offsets, 1)):
        checks.check_tensor(name, t)
        if t.dim() != dims:
            checks.fail(name, f"a {dims}-D tensor", f"shape {list(t.shape)}")
    for name, t in (("a", a), ("w", w)):
        if t.dtype != torch.bfloat16:
            checks.fail(name, "dtype torch.bfloat16", t.dtype, TypeError)
    if offsets.dtype != torch.int32:
        checks.fail("offsets", "dtype torch.int32", offsets.dtype, TypeError)
    rows, k = a.shape
    num_experts, n, w_k = w.shape
    if w_k != k:
        checks.fail("w", f"shape [E, N, K] with K = {k} (a's columns)", list(w.shape))
    if offsets.shape[0] != num_experts + 1:
        checks.fail("offsets", f"shape [E + 1] = [{num_experts + 1}] (w has E = {num_experts})", list(offsets.shape))
    if not 1 <= num_experts <= MAX_EXPERTS:
        checks.fail("w", f"1 to {MAX_EXPERTS} experts (shape [E, N, K])", f"E = {num_experts}")
    for name, value in (("N", n), ("K", k)):
        if value == 0 or value % 8:
            checks.fail("w", f"{name} a positive multiple of 8 (16-byte rows)", f"{name} = {value} (shape {list(w.shape)})")
    if rows > _INT32_MAX:
        checks.fail("a", f"at most {_INT32_MAX} rows", rows)
    limit = _NAIVE_MAX_N if variant == "naive" else _INT32_MAX // 8
    if n > limit:
        checks.fail("w", f"N <= {limit}" + (" for variant 'naive' (65535 x 32 columns)" if variant == "naive" else ""),
                    f"N = {n} (shape {list(w.shape)})")
    for name, t in (("a", a), ("w", w), ("offsets", offsets)):
        checks.check_contiguous(name, t)
        if t.device.type != "cuda":
            checks.fail(name, "a CUDA tensor", f"device {t.device}")
        if name != "a" and t.device != a.device:
            checks.fail(name, f"device {a.device} (the device of a)", t.device)
    for name, t in (("a", a), ("w", w)):  # cp.async moves 16-byte chunks
        if t.data_ptr() % 16:
            checks.fail(name, "a 16-byte aligned start (a fresh tensor, or a view at a multiple of 8 elements)",
                        f"address {t.data_ptr():#x}")
    out = _out(out, (rows, n), a, shape_text=f"[M, N] = [{rows}, {n}]",
               device_text=f"device {a.device} (the device of a)")
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"tilemoe.cuda.grouped_gemm is unavailable: {reason}")
    capability = torch.cuda.get_device_capability(a.device)
    if capability < (8, 0):
        checks.fail("a", "a tensor on a GPU of compute capability >= 8.0 (mma.sync bf16, cp.async)",
                    f"{a.device}, compute capability {capability[0]}.{capability[1]}")
    if variant == "auto":
        variant = "tiled" if hopper_unavailable_reason(a.device) else "hopper"
    elif variant == "hopper" and (why := hopper_unavailable_reason(a.device)):
        checks.fail("variant", "a variant this GPU runs ('hopper' needs sm_90a)", f"'hopper': {why}")
    host_offsets = offsets.tolist() if (validate or variant == "naive") else None  # the one sync
    if host_offsets is not None:  # read anyway: checking costs nothing more
        _check_offsets(host_offsets, rows)
    stream = torch.cuda.current_stream(a.device).cuda_stream
    if variant == "naive":
        _C.grouped_gemm_naive(a.data_ptr(), w.data_ptr(), host_offsets, out.data_ptr(), n, k, stream, a.device.index)
    elif variant == "hopper":
        _C.grouped_gemm_hopper(a.data_ptr(), w.data_ptr(), offsets.data_ptr(), out.data_ptr(), rows, num_experts,
                               n, k, _tile_counter(a.device).data_ptr(), stream, a.device.index)
    else:
        _C.grouped_gemm_tiled(a.data_ptr(), w.data_ptr(), offsets.data_ptr(), out.data_ptr(), rows, num_experts,
                              n, k, stream, a.device.index)
    return out


_hopper_reasons: dict[int, str | None] = {}


def hopper_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why variant "hopper" cannot run on this CUDA device (default: the current one), or None.

    It needs tilemoe._C, a GPU of compute capability 9.0 (H100/H200: wgmma and setmaxnreg exist
    only there, not on Blackwell) and a build that includes the 90a target. Cached per device."""
    if why := unavailable_reason():
        return why
    device = torch.device("cuda") if device is None else torch.device(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _hopper_reasons:
        capability = torch.cuda.get_device_capability(index)
        archs = _C.cuda_archs().split(";")
        if capability != (9, 0):
            why = f"compute capability {capability[0]}.{capability[1]}, and the Hopper kernel needs 9.0"
        elif "90a" not in archs:
            why = f"tilemoe._C was built for {';'.join(archs)}, without 90a (set CUDAARCHS=90a and reinstall)"
        elif not _C.grouped_gemm_hopper_supported(index):
            why = "the CUDA runtime reports no sm_90a kernel image for this device"
        else:
            why = None
        _hopper_reasons[index] = why
    return _hopper_reasons[index]


# %% The MoE layer's fused Hopper up-projection ------------------------------------------------

def _check_operands(function: str, operands: dict, device_of: torch.Tensor) -> None:
    """Every operand: a contiguous CUDA tensor of its dtype and dimensions on device_of's device,
    bf16 ones 16-byte aligned (TMA and cp.async move 16-byte pieces). operands: name -> (tensor,
    dims, dtype). Then the Hopper kernels must run there."""
    for name, (t, dims, dtype) in operands.items():
        checks.check_tensor(name, t)
        if t.dtype != dtype:
            checks.fail(name, f"dtype {dtype}", t.dtype, TypeError)
        if t.dim() != dims:
            checks.fail(name, f"a {dims}-D tensor", f"shape {list(t.shape)}")
    for name, (t, _, dtype) in operands.items():
        checks.check_contiguous(name, t)
        if t.device.type != "cuda":
            checks.fail(name, "a CUDA tensor", f"device {t.device}")
        if t.device != device_of.device:
            checks.fail(name, f"device {device_of.device}", t.device)
        if dtype == torch.bfloat16 and t.data_ptr() % 16:
            checks.fail(name, "a 16-byte aligned start (a fresh tensor, or a view at a multiple of 8 elements)",
                        f"address {t.data_ptr():#x}")
    if why := hopper_unavailable_reason(device_of.device):
        raise RuntimeError(f"tilemoe.cuda.{function} is unavailable: {why}")


def _check_weight(name: str, w: torch.Tensor, k: int, what: str) -> tuple[int, int]:
    """(E, rows) of a weight [E, rows, K] after checking its sizes against the kernels' limits."""
    num_experts, w_rows, w_k = w.shape
    if w_k != k:
        checks.fail(name, f"shape {what}", list(w.shape))
    if not 1 <= num_experts <= MAX_EXPERTS:
        checks.fail(name, f"1 to {MAX_EXPERTS} experts", f"E = {num_experts}")
    for label, value in (("rows", w_rows), ("K", k)):
        if value == 0 or value % 8 or value > _INT32_MAX // 8:
            checks.fail(name, f"{label} a positive multiple of 8 (16-byte rows)", f"{label} = {value} (shape {list(w.shape)})")
    return num_experts, w_rows


def _check_grouping(offsets: torch.Tensor, num_experts: int, rows: int, index: torch.Tensor, index_name: str,
                    bound: int, validate: bool) -> None:
    if offsets.shape[0] != num_experts + 1:
        checks.fail("offsets", f"shape [E + 1] = [{num_experts + 1}]", list(offsets.shape))
    if index.shape[0] != rows:
        checks.fail(index_name, f"shape [M] = [{rows}] (one entry per grouped row)", list(index.shape))
    if rows > _INT32_MAX:
        checks.fail(index_name, f"at most {_INT32_MAX} grouped rows", rows)
    if validate and rows:  # one host sync: the offsets and the index range
        values = offsets.tolist()
        _check_offsets(values, rows, exact=False)
        used = index[: values[-1]]
        if used.numel():
            lo, hi = (int(v) for v in torch.stack(torch.aminmax(used)).tolist())
            if lo < 0 or hi >= bound:
                checks.fail(index_name, f"entries in [0, {bound}) for the rows offsets cover", lo if lo < 0 else hi)


def _out(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor, *, shape_text: str | None = None,
         device_text: str | None = None) -> torch.Tensor:
    """out after checking it (bf16, shape, contiguous, like's device, 16-byte aligned: the epilogues
    store 16-byte pieces and TMA boxes), or a new tensor. *_text: how the expectation is worded."""
    if out is None:
        return torch.empty(shape, dtype=torch.bfloat16, device=like.device)
    checks.check_tensor("out", out)
    if out.dtype != torch.bfloat16:
        checks.fail("out", "dtype torch.bfloat16", out.dtype, TypeError)
    checks.check_shape("out", out, shape, shape_text or f"[{', '.join(map(str, shape))}]")
    checks.check_contiguous("out", out)
    if out.device != like.device:
        checks.fail("out", device_text or f"device {like.device}", out.device)
    if out.data_ptr() % 16:
        checks.fail("out", "a 16-byte aligned start (a fresh tensor, or a view at a multiple of 8 elements)",
                    f"address {out.data_ptr():#x}")
    return out


def moe_up(x: torch.Tensor, w_gate_up: torch.Tensor, offsets: torch.Tensor, gather: torch.Tensor, *,
           out: torch.Tensor | None = None, validate: bool = True) -> torch.Tensor:
    """The up-projection with the gather and SwiGLU fused:
    ``act[r] = silu(x[gather[r]] @ Wg[e]^T) * (x[gather[r]] @ Wu[e]^T)`` for every grouped row r of
    expert e (``offsets[e] <= r < offsets[e + 1]``), Wg / Wu rows 0..I-1 / I..2I-1 of w_gate_up[e].

    Args:
        x: [T, K] bfloat16 CUDA tensor, contiguous: the tokens (read in place: no permuted copy).
        w_gate_up: [E, 2I, K] bfloat16, contiguous (DESIGN.md's layout); 2I and K multiples of 8.
        offsets: [E + 1] int32: a Routing's offsets; offsets[E] <= M.
        gather: [M] int64: the token of each grouped row (a Routing's ``sorted_tokens``).
        out: [M, I] bfloat16 to write into, or None for a new tensor.
        validate: check the offsets and the token indices first (one host sync). With False
            nothing is read back (a hot path, CUDA-graph capture).

    Returns:
        act [M, I] bfloat16, written for rows 0 .. offsets[E] - 1 (fp32 accumulation and SwiGLU,
        rounded once). Runs on a compute capability 9.0 GPU (a build with the 90a target) on the
        current stream; RuntimeError with the reason elsewhere.
    """
    _check_operands("moe_up", {"x": (x, 2, torch.bfloat16), "w_gate_up": (w_gate_up, 3, torch.bfloat16),
                               "offsets": (offsets, 1, torch.int32), "gather": (gather, 1, torch.int64)}, x)
    num_tokens, k = x.shape
    num_experts, two_i = _check_weight("w_gate_up", w_gate_up, k, f"[E, 2I, K] with K = {k} (x's columns)")
    if two_i % 16:
        checks.fail("w_gate_up", "2I a multiple of 16 (I a multiple of 8)", f"2I = {two_i}")
    ffn, rows = two_i // 2, gather.shape[0]
    _check_grouping(offsets, num_experts, rows, gather, "gather", num_tokens, validate)
    act = _out(out, (rows, ffn), x)
    if rows and num_tokens:
        _C.moe_up_hopper(x.data_ptr(), num_tokens, gather.data_ptr(), w_gate_up.data_ptr(), offsets.data_ptr(),
                         act.data_ptr(), rows, num_experts, ffn, k, _tile_counter(x.device).data_ptr(),
                         torch.cuda.current_stream(x.device).cuda_stream, x.device.index)
    return act


def grouped_wgrad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, *, a_gather: torch.Tensor | None = None,
                  b_gather: torch.Tensor | None = None, out: torch.Tensor | None = None,
                  accumulate: bool = False, validate: bool = True) -> torch.Tensor:
    """The weight gradients of a grouped GEMM: ``out[e] = A_e^T @ B_e`` summed over expert e's
    grouped rows r (``offsets[e] <= r < offsets[e + 1]``), where row r of A is ``a[a_gather[r]]``
    (or ``a[r]`` without a_gather) and likewise for B. Exactly one operand is gathered: dW_down =
    dY^T (p * A) reads dY through the permutation (a_gather), dW_gate_up = d pre^T x reads x
    (b_gather); the other is read in place by TMA. (csrc/grouped_wgrad_hopper.cu)

    Args:
        a: [Ra, N1] bfloat16 CUDA tensor, contiguous; N1 a multiple of 8.
        b: [Rb, N2] bfloat16, contiguous; N2 a multiple of 8.
        offsets: [E + 1] int32: a Routing's offsets; offsets[E] <= the in-place operand's rows.
        a_gather / b_gather: [M] int64, the gathered operand's row of each grouped row (a Routing's
            ``sorted_tokens``); exactly one of them.
        out: [E, N1, N2] bfloat16 to write into, or None for a new tensor.
        accumulate: add the gradients into out (which must then be given) instead of overwriting
            it: ``out[e] += A_e^T @ B_e``, each element added once by a TMA reduce-add (in bf16,
            deterministic), without a separate pass over out.
        validate: check the offsets and the gathered indices first (one host sync). With False
            nothing is read back (a hot path, CUDA-graph capture).

    Returns:
        out [E, N1, N2] bfloat16 (fp32 accumulation, rounded once); experts without rows get
        zeros (with accumulate, keep their values). Runs on a compute capability 9.0 GPU (a build
        with the 90a target) on the current stream; RuntimeError with the reason elsewhere.
    """
    if (a_gather is None) == (b_gather is None):
        checks.fail("a_gather", "exactly one of a_gather and b_gather (the operand read through the permutation)",
                    "both" if a_gather is not None else "neither")
    if accumulate and out is None:
        checks.fail("out", "the [E, N1, N2] tensor to add into (accumulate=True)", None)
    gather_a = a_gather is not None
    gather, gather_name = (a_gather, "a_gather") if gather_a else (b_gather, "b_gather")
    _check_operands("grouped_wgrad", {"a": (a, 2, torch.bfloat16), "b": (b, 2, torch.bfloat16),
                                      "offsets": (offsets, 1, torch.int32), gather_name: (gather, 1, torch.int64)}, a)
    dense, gathered = (b, a) if gather_a else (a, b)
    n1, n2 = a.shape[1], b.shape[1]
    for name, n in (("a", n1), ("b", n2)):
        if n == 0 or n % 8 or n > _INT32_MAX // 8:
            checks.fail(name, "columns a positive multiple of 8 (16-byte rows)", f"{n} (shape {list((a if name == 'a' else b).shape)})")
    num_experts = offsets.shape[0] - 1
    if not 1 <= num_experts <= MAX_EXPERTS:
        checks.fail("offsets", f"shape [E + 1] with 1 <= E <= {MAX_EXPERTS}", list(offsets.shape))
    rows = dense.shape[0]
    _check_grouping(offsets, num_experts, rows, gather, gather_name, gathered.shape[0], validate)
    out = _out(out, (num_experts, n1, n2), a, shape_text=f"[E, N1, N2] = [{num_experts}, {n1}, {n2}]")
    if rows == 0 or gathered.shape[0] == 0:  # no grouped rows at all: every expert's gradient is zero
        return out if accumulate else out.zero_()
    _C.grouped_wgrad_hopper(dense.data_ptr(), rows, gathered.data_ptr(), gather.data_ptr(), gather_a,
                            offsets.data_ptr(), out.data_ptr(), num_experts, n1, n2, accumulate,
                            torch.cuda.current_stream(a.device).cuda_stream, a.device.index)
    return out


def _tile_counter(device: torch.device) -> torch.Tensor:
    """Two zeroed int64 on the device, where a Hopper kernel's CTAs claim their tiles (its dynamic
    scheduler). A fresh pair per launch: PyTorch's stream-ordered allocator hands the memory to a
    later launch only after this one, so launches on different streams never share a counter."""
    return torch.zeros(2, dtype=torch.int64, device=device)


def _check_offsets(values: list[int], rows: int, *, exact: bool = True) -> None:
    """offsets start at 0, never decrease and end at M (exact) or at most at M (dropped rows)."""
    if values[0] != 0:
        checks.fail("offsets", "offsets[0] = 0", f"offsets[0] = {values[0]}")
    for e, (lo, hi) in enumerate(zip(values, values[1:])):
        if hi < lo:
            checks.fail("offsets", "non-decreasing values", f"offsets[{e}] = {lo} > offsets[{e + 1}] = {hi}")
    if values[-1] != rows if exact else values[-1] > rows:
        expected = f"offsets[E] = M = {rows} (a's rows)" if exact else f"offsets[E] <= M = {rows}"
        checks.fail("offsets", expected, f"offsets[{len(values) - 1}] = {values[-1]}")


def mma_peak_probe(device: torch.device | str | None = None, *, iterations: int = 2048) -> tuple[Callable[[], None], float]:
    """``(launch, flops)``: a launch of the mma.sync throughput probe (csrc/mma_peak.cu) on a CUDA
    device, and the FLOPs one launch performs. Time ``launch`` (``tilemoe.bench.time_ms``):
    flops / time is the bf16 rate of the mma.sync instruction on this GPU, with every SM full of
    warps and no memory traffic, the ceiling of any kernel built on it (the "tiled" grouped GEMM)."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"tilemoe.cuda.mma_peak_probe is unavailable: {reason}")
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        checks.fail("device", "a CUDA device", device)
    if device.index is None:  # "cuda" means the current device; _C needs its number
        device = torch.device("cuda", torch.cuda.current_device())
    checks.check_int("iterations", iterations, low=1, high=_INT32_MAX)
    threads = _C.mma_peak_threads()
    # Enough blocks to fill every SM with warps, and no more (no partial last wave).
    props = torch.cuda.get_device_properties(device)
    blocks = props.multi_processor_count * (props.max_threads_per_multi_processor // threads)
    sink = torch.zeros(threads, dtype=torch.float32, device=device)

    def launch() -> None:
        _C.mma_peak(sink.data_ptr(), blocks, iterations, torch.cuda.current_stream(device).cuda_stream, device.index)

    return launch, _C.mma_peak_flops(blocks, iterations)


def _version(v: int) -> str:
    """13000 -> '13.0' (the encoding of CUDART_VERSION and cudaDriverGetVersion)."""
    return f"{v // 1000}.{v % 1000 // 10}"
