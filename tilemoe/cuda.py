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

import torch

from . import checks

try:
    from tilemoe import _C
except ImportError:  # built without nvcc: the pure-Python install
    _C = None

__all__ = ["available", "unavailable_reason", "expert_counts"]

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


def _version(v: int) -> str:
    """13000 -> '13.0' (the encoding of CUDART_VERSION and cudaDriverGetVersion)."""
    return f"{v // 1000}.{v % 1000 // 10}"
