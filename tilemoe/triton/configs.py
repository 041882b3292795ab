"""Tile configurations of the Triton grouped GEMM: a tuned table per GPU, a rule everywhere else.

A configuration is the tile shape (BLOCK_M x BLOCK_N x BLOCK_K), GROUP_M (how many row blocks
sweep the N tiles together), the warps per program, the software-pipelining depth and whether the
launch is persistent (a few programs per SM looping over tiles) or one program per tile.

``tma`` loads the weight tiles (and the down-projection's A tiles, which are contiguous rows) with
Hopper's Tensor Memory Accelerator; the gathered rows of x are always loaded by pointer.
``half_tails`` runs an expert's last row block, when it holds at most half a tile, as a half-height
tile (``grouped_gemm_kernel``'s HALF_TAILS).

The rule follows the rows each expert gets, m = T*K/E on average:
- decode (m <= 8): a 16-row tile, the smallest tl.dot takes; the GEMM reads each touched expert's
  weights once and is memory-bound, so many narrow N tiles keep every SM loading;
- decode, wider (m <= 20): a 32-row tile. An expert's rows are random: at m = 16 about half of
  the experts get more than 16, and a second 16-row block of one expert reads the expert's
  weights from HBM a second time (they are far larger than L2). A 32-row tile holds about
  m + 3 standard deviations of them, so each weight tile is read once; the extra rows cost
  tensor-core time that a memory-bound GEMM has to spare;
- small batches (m <= 48): 64-row tiles; the down-projection 64 x 128, its weights loaded by TMA;
- prefill: 128 x 128 tiles, deep pipelines, 8 warps: the tensor-core-bound shape. It starts
  above m = 48, not 64, for the reason of the 32-row decode tiles: at m = 64 about half of the experts
  get more than 64 rows, and a second 64-row block reads the expert's weights again, while a
  128-row tile takes them all (an expert's last block, when short, runs as a half-height tile).

``tuned/<gpu>.json`` (written by benchmarks/tune_triton.py on that GPU) overrides the rule for the
shapes it was measured on: the nearest measured m of the same (projection, N, K).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

TUNED_DIR = Path(__file__).parent / "tuned"
HALF_TAIL_MIN_M = 128  # the smallest BLOCK_M whose expert-tail blocks run as half tiles
_TMA_ON = contextvars.ContextVar("tilemoe_triton_tma", default=True)


@contextlib.contextmanager
def tma_enabled(enabled: bool):
    """Inside the block the kernels use TMA only if ``enabled`` (and their configuration and the GPU
    allow it): ``OptimizedMoELayer(use_io_overlap=False)`` runs them with plain pointer loads."""
    token = _TMA_ON.set(bool(enabled))
    try:
        yield
    finally:
        _TMA_ON.reset(token)


def tma_on() -> bool:
    """False inside ``tma_enabled(False)``."""
    return _TMA_ON.get()


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    persistent: bool = False
    tma: bool = False  # weights (and the down-projection's rows) loaded by TMA descriptors, where allowed
    half_tails: bool = True  # short last row blocks run as half-height tiles, where uses_half_tails allows

    def uses_half_tails(self, rows_full: bool) -> bool:
        """Whether the kernel takes the half-height branch for row blocks of at most block_m / 2 rows:
        - only for tiles of at least HALF_TAIL_MIN_M rows (half of a 128-row tile still fills the
          Hopper tensor cores' 64-row instruction);
        - only in a launch of one program per tile. The GPU starts programs in tile order as SMs
          free up, so the tiles running at once stay neighbours that share weight tiles in L2. A
          persistent program walks a fixed stride of tiles: with tiles of unequal length the
          programs drift apart, and on the H200 that cost more than the half tiles saved
          (DeepSeek-V3's GEMMs were slower in a development A/B, not recorded);
        - never for a routing rounded to the tile (no block is partial)."""
        return (self.half_tails and self.block_m >= HALF_TAIL_MIN_M and not self.persistent
                and not rows_full)

    def as_dict(self) -> dict:
        return asdict(self)


def rule(projection: str, rows_per_expert: float) -> TileConfig:
    """The default configuration for ``projection`` ("up" or "down") at m rows per expert."""
    if rows_per_expert <= 8:
        return TileConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 20:
        return TileConfig(32, 128, 128, group_m=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 48:
        if projection == "up":
            return TileConfig(64, 64, 64, group_m=4, num_warps=4, num_stages=4)
        return TileConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=3, tma=True)
    if projection == "up":  # each stage holds 128 gate and 128 up weight rows: a shallower pipeline
        return TileConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3)
    return TileConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4)


@dataclass(frozen=True)
class WgradConfig:
    """The weight gradients' tiles (``grouped_wgrad_kernel``): BLOCK_N1 x BLOCK_N2 outputs per
    program, summed over the expert's rows BLOCK_R at a time; ``tma`` loads the operand that is
    read in place (not through the permutation) by TMA descriptors, where allowed."""
    block_n1: int = 128
    block_n2: int = 128
    block_r: int = 64
    num_warps: int = 8
    num_stages: int = 4
    tma: bool = True


@dataclass(frozen=True)
class BackwardConfigs:
    """The backward's four kernels: the dY @ W_down GEMM, the dX GEMM, and the two weight gradients
    (dW_down reads dY through the permutation, dW_gate_up reads x through it)."""
    grad: TileConfig
    dx: TileConfig
    wgrad_down: WgradConfig
    wgrad_gate_up: WgradConfig


def backward_rule(rows_per_expert: float, *, wide_wgrad: bool) -> BackwardConfigs:
    """The backward's configurations. Up to 64 rows per expert both GEMMs take the
    down-projection's rule (``rule``) and the weight gradients 128 x 128 tiles. Above, both GEMMs
    are plain GEMMs over transposed weights and take a wide 128 x 256 tile, persistent, the
    weights loaded by TMA.

    With wide_wgrad, the weight gradients at prefill are wide along the operand read in place and
    128 along the one read through the permutation. A gathered row cannot be one TMA copy: the
    kernel loads it by pointers, in a pipeline whose row indices take one stage of it (so more
    stages are asked for), and those loads are what limits it. A 256-wide tile of the in-place
    operand doubles the FLOPs per gathered byte. dW_down = dY^T (p A): dY is gathered, so the tile
    is 128 x 256; dW_gate_up = d pre^T x: x is gathered, so 256 x 128.
    ``benchmarks/tune_triton.py --backward`` sweeps them; on the H200 at 16384 tokens
    (benchmarks/results/nvidia-h200/tune_backward-2026-11-24.json) these took 0.977 and 2.143 ms
    (OLMoE), 0.833 and 1.822 ms (Qwen3), against 1.252, 2.251, 1.071 and 1.961 ms for 128 x 128
    tiles at 4 stages, and were within 2% of the sweep's fastest. Their pipelines take 145 KiB of
    shared memory with 16-bit operands and 289 KiB, more than any GPU has, with fp32 (Triton 3.9's
    sm_90 build); the caller
    (``ops.backward_configs``) asks for them only for 16-bit operands on a Hopper-or-newer GPU,
    where they were measured. Without wide_wgrad the weight gradients keep 128 x 128.
    """
    if rows_per_expert <= 64:
        grad = rule("down", rows_per_expert)
        return BackwardConfigs(grad, grad, WgradConfig(), WgradConfig())
    wide = TileConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3, persistent=True, tma=True)
    if not wide_wgrad:
        return BackwardConfigs(wide, wide, WgradConfig(), WgradConfig())
    return BackwardConfigs(wide, wide, WgradConfig(128, 256, 64, num_warps=8, num_stages=5),
                           WgradConfig(256, 128, 64, num_warps=8, num_stages=6))


@lru_cache(maxsize=None)
def tuned_table(gpu_slug: str) -> tuple[dict, ...]:
    """The rows of tuned/<gpu_slug>.json (empty when this GPU was never tuned)."""
    path = TUNED_DIR / f"{gpu_slug}.json"
    if not path.exists():
        return ()
    return tuple(json.loads(path.read_text())["configs"])


def pick(projection: str, n: int, k: int, rows_per_expert: float, gpu_slug: str | None) -> TileConfig:
    """The tuned configuration of the nearest measured m for this GEMM on this GPU, else ``rule``.

    Only rows of the same bucket as the rule (decode, wider decode, small, prefill) are
    considered, so a table measured at prefill never picks the tiles of a decode batch.
    """
    default = rule(projection, rows_per_expert)
    if gpu_slug is None:
        return default
    same = [r for r in tuned_table(gpu_slug)
            if r["projection"] == projection and r["n"] == n and r["k"] == k
            and rule(projection, r["rows_per_expert"]).block_m == default.block_m]
    if not same:
        return default
    best = min(same, key=lambda r: abs(r["rows_per_expert"] - rows_per_expert))
    return TileConfig(**best["config"])
