"""Backend "sonicmoe": SonicMoE's expert kernels running tilemoe's routing decision.

SonicMoE: Wentao Guo, Mayank Mishra, Xinle Cheng, Ion Stoica, Tri Dao, "SonicMoE: Accelerating MoE
with IO and Tile-aware Optimizations", arXiv 2512.14080 (2025); code Dao-AILab/sonic-moe
(Apache-2.0); ``pip install sonic-moe`` (Python >= 3.12, an NVIDIA Hopper or Blackwell GPU). It is
optional: without it this backend reports itself unavailable, and nothing here imports it until
it is about to be used.

What it calls
-------------
SonicMoE's ``MoE`` module routes by itself (softmax over the top-k logits). The backend contract is
that tilemoe routes once and every backend consumes that decision, so this adapter calls SonicMoE's
functional entry point for a routing made elsewhere (sonic-moe 0.1.2.post1,
``sonicmoe/functional/__init__.py``, ``moe_general_routing_inputs``)::

    y, expert_frequency = moe_general_routing_inputs(
        x [T, H], router_scores [TK] fp32, token_indices [TK] int32 (sorted), expert_indices [TK] int32,
        w1 [2I, H, E], b1, w2 [H, I, E], b2, E, stream_id, ActivationType.SWIGLU,
        is_inference_mode_enabled, concat_layout=...)

one entry per kept (token, expert) pair, in token order. That is exactly a ``Routing``: slot
s = t*K + k gives token t, expert topk_ids[t, k] and weight topk_weights[t, k]. Any router tilemoe
offers is therefore honoured as is: softmax with or without renormalization, DeepSeek-V3's
sigmoid with groups and scaling, capacity drops, token rounding. Gradients flow to x, to the
combine weights (so to the router, through tilemoe's own routing ops) and to both weight tensors.

Weight layout, converted once
-----------------------------
``w1`` and ``w2`` are the [E, ., .] weights permuted to (1, 2, 0): zero-copy views of tilemoe's
``w_gate_up`` [E, 2I, H] and ``w_down`` [E, H, I]. SonicMoE's SwiGLU pairs gate and up rows in one
of two layouts (``LAYOUTS``):

- ``"interleaved"`` (SonicMoE's default, the layout of its ``MoE`` module): rows 0, 2, 4, ... are
  gate, rows 1, 3, 5, ... are up. tilemoe's layout (gate rows, then up rows) is converted once by
  ``to_sonic_gate_up`` and the copy cached (``sonic_gate_up``): keyed by the tensor's address,
  shape, strides, dtype and device, valid while the tensor's storage is alive and its
  ``_version`` (bumped by every in-place update: optimizer steps, ``copy_``, ``load_state_dict``)
  is unchanged. An updated weight is converted again on its next use (once per optimizer step in
  training); a freed one drops out of the cache. The cache holds one extra copy of every
  ``w_gate_up`` it has seen alive. Writes through ``.data`` bump no version: call ``clear_cache()``
  after them. The weight gradient SonicMoE computes in its layout is mapped back to ours in the
  backward pass (one copy of the gradient).
- ``"concat"`` (``concat_layout=True``): SonicMoE reads [gate rows; up rows], tilemoe's own layout,
  directly: no conversion, no cache, no extra memory.

``DEFAULT_LAYOUT`` is what ``moe_forward(backend="sonicmoe")`` uses; ``weight_layout("concat")``
switches it for a block, ``experts(..., layout=...)`` for one call.

Limits
------
bfloat16 only; H and I multiples of 8 (16-byte rows for TMA); E <= 32768. SonicMoE JIT-compiles its
kernels on first use (the CuTe DSL) and its GEMMs autotune once per new combination of tensor
shapes: every new T (and, with dropped slots, every new number of kept pairs) pays a compile and
autotuning pass, minutes at a real model's shapes for the first forward and training step. Routings
with dropped slots (capacity, token rounding) cost one host synchronization to compact the kept
pairs. sonic-moe 0.1.2.post1 declares torch<=2.9.1; it runs with torch 2.11 (install it with
--no-deps to keep your torch).

Run on a GPU
------------
On an NVIDIA H200 (torch 2.11.0+cu130, sonic-moe 0.1.2.post1), output and every gradient matched
reference_moe within the bf16 tolerance in both layouts, at qwen3-30b-a3b's and olmoe-1b-7b's shapes
(examples/05_sonicmoe/README.md, generated from benchmarks/results/nvidia-h200/sonicmoe-*.json), and
on 15 of the 16 ragged-routing cases of tests/test_sonic.py's GPU test (the 16th, capacity drops
with the concat layout, was cut off by the run's time limit before it finished).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import site
import sys
import weakref
from types import SimpleNamespace

import torch

from .. import checks
from ..routing import Routing, build_routing, router_logits

NAME = "sonicmoe"
# moe_forward routes for this backend with the chapter's Triton router kernels, as for "triton" and
# "cuda": the experts are SonicMoE's, the routing is tilemoe's in every case, so it is the fast one.
FUSED_ROUTING = True

INSTALL_HINT = "pip install sonic-moe (needs Python >= 3.12 and an NVIDIA Hopper or Blackwell GPU)"
MIN_PYTHON = (3, 12)
GPU_MAJORS = {9: "Hopper (sm_90)", 10: "Blackwell (sm_100)"}
MAX_EXPERTS = 32768  # SonicMoE's own bound for its kernel path (sonicmoe/moe.py); ids are packed in 16 bits
LAYOUTS = ("interleaved", "concat")
DEFAULT_LAYOUT = "interleaved"

# -- Importing SonicMoE, lazily ------------------------------------------------------------------

_api_cache: SimpleNamespace | None = None
_import_failure: str | None = None


def _python_reason() -> str | None:
    if sys.version_info < MIN_PYTHON:
        return (f"SonicMoE needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}, this is Python "
                f"{platform.python_version()}; under a newer Python: {INSTALL_HINT}")
    return None


EXTRA_SITE_ENV = "TILEMOE_EXTRA_SITE"


def add_extra_site() -> None:
    """Add ``$TILEMOE_EXTRA_SITE`` (a ``pip install --target DIR`` holding sonic-moe) to sys.path.
    ``site.addsitedir``, unlike PYTHONPATH, also reads the directory's .pth files, which the CUTLASS
    DSL needs. Idempotent; call it before anything imports sonicmoe."""
    extra = os.environ.get(EXTRA_SITE_ENV)
    if extra and extra not in sys.path:
        site.addsitedir(extra)


def _api() -> SimpleNamespace:
    """SonicMoE's functions, imported on first use (after ``add_extra_site``). RuntimeError with the
    reason when it cannot be: any failure of the import (not installed, a broken install, missing CUDA
    libraries) becomes that reason, never an exception escaping from tilemoe's import or from
    ``unavailable_reason``."""
    global _api_cache, _import_failure
    if _api_cache is None and _import_failure is None:
        _import_failure = _python_reason()
        if _import_failure is None:
            add_extra_site()
            try:
                import sonicmoe
                from sonicmoe.enums import ActivationType
                from sonicmoe.functional import moe_general_routing_inputs

                _api_cache = SimpleNamespace(
                    moe_general_routing_inputs=moe_general_routing_inputs,
                    ActivationType=ActivationType,
                    version=getattr(sonicmoe, "__version__", "unknown"),
                )
            except Exception as exc:  # noqa: BLE001 - whatever broke, it is a reason, not a crash
                detail = (str(exc).strip().splitlines() or [""])[0][:200]
                _import_failure = (f"sonicmoe is not importable ({type(exc).__name__}: {detail}); "
                                   f"install it with: {INSTALL_HINT}")
    if _api_cache is None:
        raise RuntimeError(f"backend {NAME!r} is unavailable: {_import_failure}")
    return _api_cache


def import_reason() -> str | None:
    """None when sonicmoe imports here, else why not (Python version, or the import's error)."""
    try:
        _api()
    except RuntimeError:
        return _import_failure
    return None


def version() -> str:
    """sonicmoe.__version__ (imports it; RuntimeError with the reason when it cannot be imported)."""
    return _api().version


def versions() -> dict[str, str]:
    """Installed versions of sonic-moe and the packages it runs on (those that are installed)."""
    add_extra_site()
    found = {}
    for dist in ("sonic-moe", "quack-kernels", "nvidia-cutlass-dsl", "apache-tvm-ffi"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def _gpu_reason(device: torch.device) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False); SonicMoE needs an NVIDIA Hopper or Blackwell GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in GPU_MAJORS:
        return (f"SonicMoE needs a Hopper (sm_90) or Blackwell (sm_100) GPU; "
                f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}")
    return None


def missing(device: torch.device | str | None = None) -> list[str]:
    """Everything this machine lacks to run SonicMoE ([] when nothing): the Python version, the
    package, a suitable GPU (``device``, default the current CUDA device)."""
    device = torch.device(device if device is not None else "cuda")
    reasons = [r for r in (_python_reason(),) if r]
    if not reasons and (why := import_reason()):
        reasons.append(why)
    if device.type != "cuda":
        reasons.append(f"SonicMoE runs on NVIDIA GPUs, not on {device.type}")
    elif why := _gpu_reason(device):
        reasons.append(why)
    return reasons


def unavailable_reason(device: torch.device, dtype: torch.dtype, hidden: int, ffn: int) -> str | None:
    """Why SonicMoE cannot run these inputs here, or None. The cheap checks come first, so that a
    CPU or a float32 call never imports sonicmoe; the import is the last check."""
    if why := _python_reason():
        return why
    if device.type != "cuda":
        return f"SonicMoE runs on NVIDIA GPUs (CUDA), not on {device.type}"
    if dtype != torch.bfloat16:
        return f"the sonicmoe backend takes bfloat16 only, not {dtype}"
    if why := _gpu_reason(device):
        return why
    if hidden % 8 or ffn % 8:
        return f"SonicMoE needs H and I multiples of 8 (16-byte rows), got H={hidden}, I={ffn}"
    return import_reason()


# -- The weight layout -----------------------------------------------------------------------------

def _halves(w: torch.Tensor, name: str) -> int:
    checks.check_float_tensor(name, w)
    if w.dim() < 2 or w.shape[-2] % 2 or w.shape[-2] == 0:
        checks.fail(name, "shape [..., 2I, H] with I >= 1", list(w.shape))
    return w.shape[-2] // 2


def to_sonic_gate_up(w_gate_up: torch.Tensor) -> torch.Tensor:
    """tilemoe's [..., 2I, H] (gate rows 0..I-1, then up rows I..2I-1) -> SonicMoE's interleaved
    [..., 2I, H] (row 2i = gate row i, row 2i+1 = up row i). A new contiguous tensor."""
    ffn = _halves(w_gate_up, "w_gate_up")
    return w_gate_up.unflatten(-2, (2, ffn)).transpose(-3, -2).flatten(-3, -2).contiguous()


def from_sonic_gate_up(w_interleaved: torch.Tensor) -> torch.Tensor:
    """SonicMoE's interleaved [..., 2I, H] -> tilemoe's [..., 2I, H] (gate rows, then up rows);
    the inverse of ``to_sonic_gate_up``. Also maps a gradient computed in SonicMoE's layout."""
    ffn = _halves(w_interleaved, "w_interleaved")
    return w_interleaved.unflatten(-2, (ffn, 2)).transpose(-3, -2).flatten(-3, -2).contiguous()


# -- The conversion cache --------------------------------------------------------------------------

class _Entry:
    __slots__ = ("alive", "version", "converted")

    def __init__(self, alive, version: int, converted: torch.Tensor):
        self.alive, self.version, self.converted = alive, version, converted


_cache: dict[tuple, _Entry] = {}
_stats = {"conversions": 0, "hits": 0}


def _key(w: torch.Tensor) -> tuple:
    return (w.data_ptr(), tuple(w.shape), w.stride(), w.dtype, str(w.device))


def _liveness(w: torch.Tensor, key: tuple):
    """A weak reference that dies with w's memory (its storage: shared by every view and detach of
    w), dropping the cache entry; a weak reference to w itself where storages take none."""
    def drop(ref, key=key, cache=_cache):  # the dict bound now: still there at interpreter exit
        entry = cache.get(key)
        if entry is not None and entry.alive is ref:
            del cache[key]

    try:
        return weakref.ref(w.untyped_storage(), drop)
    except TypeError:
        return weakref.ref(w, drop)


def sonic_gate_up(w_gate_up: torch.Tensor) -> torch.Tensor:
    """SonicMoE's interleaved copy of ``w_gate_up``: converted on first use, then served from the
    cache while the tensor's memory is alive and unmodified (see the module docstring)."""
    key = _key(w_gate_up)
    entry = _cache.get(key)
    if entry is not None:
        source = entry.alive()
        same_memory = source is not None and (source is w_gate_up or source is w_gate_up.untyped_storage())
        if same_memory and entry.version == w_gate_up._version:
            _stats["hits"] += 1
            return entry.converted
    with torch.no_grad():
        converted = to_sonic_gate_up(w_gate_up.detach())
    _stats["conversions"] += 1
    _cache[key] = _Entry(_liveness(w_gate_up, key), w_gate_up._version, converted)
    return converted


def cache_info() -> dict[str, int]:
    """entries: interleaved copies held now; conversions / hits: since the last clear_cache()."""
    return {"entries": len(_cache), **_stats}


def clear_cache() -> None:
    """Forget every converted weight (after writes the version counter does not see: ``.data``)."""
    _cache.clear()
    _stats.update(conversions=0, hits=0)


class _ThroughInterleaved(torch.autograd.Function):
    """Hands SonicMoE the cached interleaved copy while the gradient flows to tilemoe's w_gate_up:
    the gradient SonicMoE computes for the copy is mapped back to our layout."""

    @staticmethod
    def forward(ctx, w_gate_up: torch.Tensor, interleaved: torch.Tensor) -> torch.Tensor:
        return interleaved.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return from_sonic_gate_up(grad), None


@contextlib.contextmanager
def weight_layout(layout: str):
    """Within the block, backend "sonicmoe" hands SonicMoE its weights in ``layout`` (``LAYOUTS``)."""
    global DEFAULT_LAYOUT
    layout = checks.check_choice("layout", layout, LAYOUTS)
    before, DEFAULT_LAYOUT = DEFAULT_LAYOUT, layout
    try:
        yield
    finally:
        DEFAULT_LAYOUT = before


# -- SonicMoE's own MoE module ------------------------------------------------------------------------
# The backend above runs SonicMoE's kernels on tilemoe's routing. SonicMoE as its authors ship it is
# its ``MoE`` module, whose forward routes by itself (bf16 router logits, softmax over the top-k)
# and runs the same kernels through its fixed-K path. Benchmarks time it too: it is the speed a user
# of SonicMoE gets, and what the chapter's kernels are compared with.

MODULE_NAME = "sonicmoe module"  # how benchmarks name the row of SonicMoE's own module


def _check_module_weights(router_weight, w_gate_up, w_down, top_k: int) -> None:
    checks.check_float_tensor("w_gate_up", w_gate_up)
    if w_gate_up.dim() != 3 or w_gate_up.shape[1] % 2 or 0 in w_gate_up.shape:
        checks.fail("w_gate_up", "shape [E, 2I, H] with E, I, H >= 1", list(w_gate_up.shape))
    num_experts, two_ffn, hidden = w_gate_up.shape
    checks.check_float_tensor("router_weight", router_weight)
    checks.check_shape("router_weight", router_weight, (num_experts, hidden), f"[E, H] = [{num_experts}, {hidden}]")
    checks.check_float_tensor("w_down", w_down)
    checks.check_shape("w_down", w_down, (num_experts, hidden, two_ffn // 2),
                       f"[E, H, I] = [{num_experts}, {hidden}, {two_ffn // 2}]")
    checks.check_int("top_k", top_k, low=1, high=num_experts)


def module_with_weights(router_weight: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, top_k: int):
    """SonicMoE's ``MoE`` module holding copies of tilemoe weights (router_weight [E, H], w_gate_up
    [E, 2I, H], w_down [E, H, I]): c_fc interleaved (``to_sonic_gate_up``), all in bfloat16. The
    module routes by itself: softmax over the top-k of its bf16 logits, whatever router made the
    weights. It is built on the meta device and allocated once, in bfloat16, on w_gate_up's device
    (no float32 copy of the experts, which for deepseek-v3 would be 45 GB). RuntimeError with the
    reason when SonicMoE cannot be imported."""
    api = _api()
    from sonicmoe import MoE

    _check_module_weights(router_weight, w_gate_up, w_down, top_k)
    num_experts, two_ffn, hidden = w_gate_up.shape
    device = w_gate_up.device
    # MoE.__init__ records the current CUDA stream: make it the weights' device's.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext(), torch.device("meta"):
        module = MoE(num_experts, top_k, hidden, two_ffn // 2, api.ActivationType.SWIGLU, False, 0.02)
    module = module.to(torch.bfloat16).to_empty(device=device)
    with torch.no_grad():  # every parameter is written: to_empty left them uninitialized
        module.router.weight.copy_(router_weight)
        module.c_fc.weight.copy_(to_sonic_gate_up(w_gate_up))
        module.c_proj.weight.copy_(w_down)
    return module


def module_forward(module, x: torch.Tensor, *, train: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, aux_loss) = module(x) through SonicMoE's own kernels (``KernelBackendMoE.sonicmoe``).
    Inference (no autograd, nothing kept for a backward, aux_loss None) unless ``train``; in
    training aux_loss is the module's load-balancing loss, unscaled."""
    from sonicmoe import KernelBackendMoE

    with contextlib.nullcontext() if train else torch.no_grad():
        return module(x, kernel_backend_moe=KernelBackendMoE.sonicmoe, is_inference_mode=not train)


def module_train_step(module, x: torch.Tensor, dy: torch.Tensor, aux_weight: float) -> None:
    """``tilemoe.layer.train_step`` for SonicMoE's module: the forward with its load-balancing loss
    scaled by aux_weight (the layer's ``load_balance_weight``), then the backward from dy (y's
    gradient) and that loss."""
    y, aux = module_forward(module, x, train=True)
    torch.autograd.backward((y, aux_weight * aux), (dy, None))


def module_choice(module, x: torch.Tensor) -> tuple[torch.Tensor, str, int]:
    """The experts SonicMoE's module picks for x, so that a reference can replay its routing. The
    module rounds its router logits to bf16, where near-tied experts become exactly tied and its
    top-k kernel's tie-break decides. Returns (ids [T, K] int64, how they were obtained, the number
    of tokens with an exact bf16 tie at the top-k boundary). RuntimeError if the ids are not a
    top-k of those logits (the check a replay cannot make: it takes the ids as given)."""
    with torch.no_grad():
        logits = torch.nn.functional.linear(x, module.router.weight)  # what MoE.forward computes, bit for bit
        top = logits.topk(min(module.top_k + 1, module.num_experts), dim=-1).values
        ties = int((top[:, module.top_k] == top[:, module.top_k - 1]).sum()) if module.top_k < module.num_experts else 0
        try:
            from sonicmoe.functional import TC_Softmax_Topk_Router_Function

            _, ids = TC_Softmax_Topk_Router_Function.apply(logits, module.num_experts, module.top_k, True, False)
            how = "SonicMoE's top-k kernel on its bf16 logits"
        except ImportError as exc:  # an internal name may move between versions
            ids = logits.topk(module.top_k, dim=-1).indices
            how = f"torch.topk on SonicMoE's bf16 logits (its top-k kernel: {type(exc).__name__})"
        ids = ids.long()
        distinct = bool((ids.sort(dim=-1).values.diff(dim=-1) != 0).all()) if module.top_k > 1 else True
        if not distinct or bool((logits.gather(1, ids) < top[:, module.top_k - 1 : module.top_k]).any()):
            raise RuntimeError(f"SonicMoE's choice of experts ({how}) is not a top-{module.top_k} of its logits")
    return ids, how, ties


def module_routing(module, x: torch.Tensor) -> tuple[Routing, str, int]:
    """The routing SonicMoE's module computes for x, for a reference to replay (no autograd): its
    experts (``module_choice``) and weights = the softmax over the chosen logits, here from fp32
    logits of its bf16 router weight. Returns (routing, how the experts were obtained, the bf16 ties
    at the top-k boundary)."""
    ids, how, ties = module_choice(module, x)
    with torch.no_grad():
        logits = router_logits(x, module.router.weight)
        weights = logits.gather(1, ids).softmax(dim=-1)
        routing = build_routing(ids, weights, logits.softmax(dim=-1).gather(1, ids), module.num_experts)
    return routing, how, ties


# -- The experts -----------------------------------------------------------------------------------

def _check(x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> None:
    for name, t in (("x", x), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        checks.check_tensor(name, t)
        if t.dtype != torch.bfloat16:
            checks.fail(name, "dtype torch.bfloat16 (the sonicmoe backend takes bfloat16 only)", t.dtype, TypeError)
        checks.check_contiguous(name, t)
    if x.dim() != 2:
        checks.fail("x", "shape [T, H]", list(x.shape))
    num_tokens, hidden = x.shape
    if w_gate_up.dim() != 3 or w_gate_up.shape[1] % 2 or w_gate_up.shape[2] != hidden:
        checks.fail("w_gate_up", f"shape [E, 2I, H] with H = {hidden}", list(w_gate_up.shape))
    num_experts, ffn = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    checks.check_shape("w_down", w_down, (num_experts, hidden, ffn), f"[E, H, I] = [{num_experts}, {hidden}, {ffn}]")
    if num_experts > MAX_EXPERTS:
        checks.fail("w_gate_up", f"at most {MAX_EXPERTS} experts (SonicMoE's bound)", num_experts)
    if not isinstance(routing, Routing):
        checks.fail("routing", "a tilemoe.routing.Routing", type(routing).__name__, TypeError)
    if routing.num_tokens != num_tokens or routing.num_experts != num_experts:
        checks.fail("routing", f"a routing of T = {num_tokens} tokens over E = {num_experts} experts",
                    f"T = {routing.num_tokens}, E = {routing.num_experts}")


def experts(x: torch.Tensor, routing: Routing, w_gate_up: torch.Tensor, w_down: torch.Tensor,
            *, layout: str | None = None) -> torch.Tensor:
    """The routed experts of ``routing``, combined, by SonicMoE's kernels: y [T, H] in bfloat16.

    layout: how SonicMoE reads w_gate_up, "interleaved" (a cached converted copy) or "concat"
    (ours, read in place); default ``DEFAULT_LAYOUT``. Differentiable in x, routing.topk_weights,
    w_gate_up and w_down; SonicMoE stores its backward state only when a gradient is needed.
    """
    api = _api()
    layout = checks.check_choice("layout", DEFAULT_LAYOUT if layout is None else layout, LAYOUTS)
    _check(x, routing, w_gate_up, w_down)
    num_tokens, hidden = x.shape
    num_experts = w_gate_up.shape[0]

    # One entry per (token, expert) pair in slot order t*K + k: the token indices are sorted, as
    # SonicMoE requires. Dropped slots (id -1) are left out, which needs their count: a host sync.
    expert_ids = routing.topk_ids.reshape(-1).to(torch.int32)
    scores = routing.topk_weights.reshape(-1).to(torch.float32)
    token_ids = torch.arange(num_tokens, device=x.device, dtype=torch.int32).repeat_interleave(routing.top_k)
    if routing.has_empty_slots:
        kept = expert_ids >= 0
        expert_ids, scores, token_ids = expert_ids[kept], scores[kept], token_ids[kept]
    if expert_ids.numel() == 0:  # no token meets any expert (T = 0, or every slot dropped)
        return x.new_zeros(num_tokens, hidden)

    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, scores, w_gate_up, w_down))
    if layout == "concat":
        w1 = w_gate_up
    else:
        w1 = sonic_gate_up(w_gate_up)
        if needs_grad and w_gate_up.requires_grad:
            w1 = _ThroughInterleaved.apply(w_gate_up, w1)
    stream = torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else None
    y, _ = api.moe_general_routing_inputs(
        x, scores, token_ids, expert_ids.contiguous(),
        w1.permute(1, 2, 0), None, w_down.permute(1, 2, 0), None,
        num_experts, stream, api.ActivationType.SWIGLU, not needs_grad,
        concat_layout=layout == "concat",
    )
    return y
