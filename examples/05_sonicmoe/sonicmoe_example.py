"""
SonicMoE beside tilemoe: one layer, checked to the gradient and timed
====================================================================

In this lesson you will learn:

* what SonicMoE is (Wentao Guo, Mayank Mishra, Xinle Cheng, Ion Stoica, Tri Dao, "SonicMoE:
  Accelerating MoE with IO and Tile-aware Optimizations", arXiv 2512.14080, 2025; code
  Dao-AILab/sonic-moe) and how its ``MoE`` module's weights map onto the chapter's layout: the same
  tensors, with the gate and up rows of w_gate_up interleaved;
* how to check a fast MoE kernel properly: its output *and* its gradients (input, router weight,
  both expert weights) against ``tilemoe.reference_moe`` in fp32, on the same weights and the same
  routing decision;
* how tilemoe's backend ``"sonicmoe"`` runs SonicMoE's expert kernels on tilemoe's own routing, so
  any router works (OLMoE's without renormalization, DeepSeek-V3's sigmoid), in SonicMoE's
  interleaved weight layout (converted once, cached) or reading tilemoe's layout in place;
* how fast SonicMoE is next to tilemoe's PyTorch path, forward and forward + backward.

Run it::

    .venv/bin/python examples/05_sonicmoe/sonicmoe_example.py          # anywhere: says what is missing
    python examples/05_sonicmoe/sonicmoe_example.py --preset qwen3-30b-a3b --tokens 16384 --record
    python examples/05_sonicmoe/sonicmoe_example.py --table benchmarks/results/nvidia-h200/sonicmoe-*.json

The second needs ``pip install sonic-moe`` (Python >= 3.12) and a Hopper or Blackwell GPU (H100,
H200, B200, ...). Without them the script prints what is missing and how to install it, then runs
the same walk-through with tilemoe's own backends on a small preset, and exits 0. The third prints
the README's "Measured" tables from recorded runs (markdown; it runs nothing and needs no GPU).
Environment: TILEMOE_EXTRA_SITE, an extra site directory to search for sonicmoe (the script calls
``site.addsitedir`` on it before importing sonicmoe; use it when sonic-moe was installed with
``pip install --target DIR``).

What it prints: the preset and the versions; (a) the correctness table: one row per way of running
the layer, the relative error ||out - ref|| / ||ref|| of the output (without and with autograd) and
of every gradient, PASS/FAIL at the bf16 tolerance 1e-2; (b) the timing table: forward and forward
+ backward in ms and TFLOP/s (6*T*K*H*I and 18*T*K*H*I FLOPs), the speedup over tilemoe's best
PyTorch backend measured in the same run, and the peak memory a training step adds. The first
SonicMoE call JIT-compiles its kernels (up to ~90 s); everything is warmed up before it is timed.
It exits with status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
import pathlib
from typing import Callable

import torch
from tabulate import tabulate

import tilemoe
from tilemoe import bench
from tilemoe.backends import sonic
from tilemoe.routing import build_routing, route_tokens

# An extra site directory for sonicmoe (a `pip install --target DIR` installation), added before the
# walk-through imports it: TILEMOE_EXTRA_SITE, read in one place, the sonicmoe backend.
sonic.add_extra_site()

GRAD_NAMES = ("x", "router_weight", "w_gate_up", "w_down")
ERROR_COLUMNS = ("y (no grad)", "y", "dx", "d router_weight", "d w_gate_up", "d w_down")


def say(*args) -> None:
    print(*args, flush=True)  # flushed: the first SonicMoE calls take a while; show progress


# %%
# Ways of running one layer
# -------------------------
# A Path runs the layer on its own leaf tensors, with autograd (a training step) or without (an
# inference forward), and hands back its gradients in tilemoe's layout, so that every path is
# compared with the same reference in the same terms.

@dataclass
class Path:
    name: str
    router: str                                  # whose routing decision it runs
    run: Callable[[bool], torch.Tensor]          # run(train) -> y [T, H]
    grads: Callable[[], dict]                    # x, router_weight, w_gate_up, w_down (our layout)
    leaves: list = field(default_factory=list)   # tensors whose .grad a step resets
    reference: str = "tilemoe"                   # which reference checks it


def tilemoe_path(name: str, backend: str, leaves: dict, x_leaf: torch.Tensor, x: torch.Tensor,
                 cfg: tilemoe.MoEConfig, layout: str | None = None) -> Path:
    """tilemoe.moe_forward with ``backend``: tilemoe routes (the preset's router), the backend runs
    the experts. ``layout`` picks the sonicmoe backend's weight layout."""
    def run(train: bool) -> torch.Tensor:
        chosen = sonic.weight_layout(layout) if layout else contextlib.nullcontext()
        with chosen, torch.set_grad_enabled(train):
            return tilemoe.moe_forward(x_leaf if train else x, leaves["router_weight"], leaves["w_gate_up"],
                                       leaves["w_down"], cfg.top_k, backend=backend, **cfg.router_options())

    return Path(name, "tilemoe", run, lambda: {"x": x_leaf.grad, **{k: v.grad for k, v in leaves.items()}},
                [x_leaf, *leaves.values()])


# %%
# The reference, on the same weights and the same routing decision
# ----------------------------------------------------------------
# reference_moe in fp32 (fp64 on the CPU), differentiated by autograd. route_fn makes the routing
# decision from the reference's own leaves, so that the router weight's gradient flows through the
# combine weights exactly as in the path under test. When fp32 copies of the weights and their
# gradients would not fit next to the bf16 ones, the reference keeps bf16 leaves: it still computes
# in fp32 (reference_moe upcasts), only its gradients are stored rounded to bf16 (~1e-3, a tenth of
# the tolerance).

def run_reference(x, weights: dict, top_k: int, dy, route_fn, storage: torch.dtype):
    leaves = {"x": x.detach().to(storage).requires_grad_()}
    leaves.update({k: v.detach().to(storage).requires_grad_() for k, v in weights.items()})
    routing = route_fn(leaves["x"], leaves["router_weight"])
    y = tilemoe.reference_moe(leaves["x"], leaves["router_weight"], leaves["w_gate_up"], leaves["w_down"],
                              top_k, routing=routing)
    y.backward(dy.to(y.dtype))
    return y.detach(), {k: v.grad for k, v in leaves.items()}, routing


def reference_storage(weights: dict, device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return torch.float64
    fp32_bytes = 2 * 4 * sum(w.numel() for w in weights.values())  # fp32 copies + their gradients
    return torch.float32 if fp32_bytes < 0.5 * torch.cuda.mem_get_info(device)[0] else torch.bfloat16


def tilemoe_route_fn(cfg: tilemoe.MoEConfig):
    return lambda x, router_weight: tilemoe.route(tilemoe.router_logits(x, router_weight), cfg.top_k,
                                                  **cfg.router_options())


# %%
# Checking a path: output and every gradient
# ------------------------------------------

def reset_grads(path: Path) -> None:
    for t in path.leaves:
        t.grad = None


def check(path: Path, ref_y, ref_grads: dict, dy) -> dict:
    """Relative errors of the output (an inference forward and a training forward) and of every
    gradient, against the reference. The first calls of a SonicMoE path compile its kernels."""
    errors = {"y (no grad)": tilemoe.rel_error(path.run(False), ref_y)}
    reset_grads(path)
    y = path.run(True)
    y.backward(dy)
    errors["y"] = tilemoe.rel_error(y, ref_y)
    grads = path.grads()
    for name in GRAD_NAMES:  # a gradient that never arrived counts as an infinite error
        got = grads[name]
        errors[f"d {name}" if name != "x" else "dx"] = float("inf") if got is None else tilemoe.rel_error(got, ref_grads[name])
    reset_grads(path)
    return errors


def check_all(paths: list, references: dict, dy, tolerance: float) -> tuple[list, dict, bool]:
    rows, results, all_ok = [], {}, True
    for path in paths:
        start = time.perf_counter()
        try:
            errors = check(path, *references[path.reference], dy)
            ok = all(e <= tolerance for e in errors.values())
            verdict = "PASS" if ok else "FAIL"
        except Exception as exc:  # noqa: BLE001 - one broken path must not hide the others' results
            traceback.print_exc()
            errors, ok, verdict = {}, False, f"ERROR: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
            reset_grads(path)
        all_ok &= ok
        results[path.name] = {"errors": errors, "check": verdict}
        detail = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
        say(f"  checked {path.name}: {verdict} in {time.perf_counter() - start:.1f} s (first calls included): {detail}")
        rows.append([path.name, path.router, *(errors.get(c, float("nan")) for c in ERROR_COLUMNS), verdict])
    return rows, results, all_ok


def print_checks(rows: list, tolerance: float) -> None:
    say(f"\n(a) Correctness: rel. error ||out - ref|| / ||ref|| against tilemoe.reference_moe (tolerance {tolerance:g})")
    say(tabulate(rows, headers=["path", "routing", *ERROR_COLUMNS, "check"], floatfmt=".2e"))
    say("y (no grad): forward without autograd (inference kernels); y: the training step's forward;\n"
        "dx: gradient of the input (through the experts and the router); d router_weight: gradient of the\n"
        "router weight [E, H] (through the combine weights); d w_gate_up, d w_down: the expert weights'\n"
        "gradients, in tilemoe's layout (SonicMoE's interleaved gradient de-interleaved first).")


# %%
# Timing: forward, and forward + backward
# ---------------------------------------
# The forward is timed without autograd (SonicMoE then skips storing what the backward needs). A
# training step resets the gradients, runs the forward and the backward with the same upstream
# gradient. FLOPs: 6*T*K*H*I forward, 18*T*K*H*I forward + backward (the routed experts only).

def step_peak_gb(path: Path, dy) -> float:
    """Peak memory a training step adds over what is held before it (weights, input, gradients)."""
    path.run(True).backward(dy)  # the gradients exist; the measured step accumulates into them
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    path.run(True).backward(dy)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def time_all(paths: list, results: dict, dy, flops: int, device: torch.device, baseline: str) -> list:
    def step(path):
        reset_grads(path)
        path.run(True).backward(dy)

    for path in paths:
        res = results[path.name]
        if not res["check"].startswith(("PASS", "FAIL")):
            continue  # it crashed: nothing to time
        res["fwd_ms"] = bench.time_ms(lambda: path.run(False), device=device)
        res["fwdbwd_ms"] = bench.time_ms(lambda: step(path), device=device)
        if device.type == "cuda":
            res["fwdbwd_peak_gb"] = step_peak_gb(path, dy)
        reset_grads(path)
        say(f"  timed {path.name}: forward {res['fwd_ms']:.3f} ms, forward + backward {res['fwdbwd_ms']:.3f} ms")
    rows = []
    base = results.get(baseline, {})
    for path in paths:
        res = results[path.name]
        if "fwd_ms" not in res:
            rows.append([path.name] + [None] * 7)
            continue
        res["fwd_tflops"] = bench.tflops(flops, res["fwd_ms"])
        res["fwdbwd_tflops"] = bench.tflops(3 * flops, res["fwdbwd_ms"])
        if "fwd_ms" in base:
            res["fwd_speedup"] = base["fwd_ms"] / res["fwd_ms"]
            res["fwdbwd_speedup"] = base["fwdbwd_ms"] / res["fwdbwd_ms"]
        rows.append([path.name, res["fwd_ms"], res["fwd_tflops"], res["fwdbwd_ms"], res["fwdbwd_tflops"],
                     res.get("fwd_speedup"), res.get("fwdbwd_speedup"), res.get("fwdbwd_peak_gb")])
    return rows


def print_times(rows: list, baseline: str, tokens: int, cfg: tilemoe.MoEConfig) -> None:
    say(f"\n(b) Time of the whole layer (router + experts + combine) on {tokens} tokens; median of "
        f"tilemoe.bench.time_ms")
    say(tabulate(rows, missingval="-", floatfmt=("", ".3f", ".3g", ".3f", ".3g", ".2f", ".2f", ".2f"),
                 headers=["path", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
                          f"fwd vs {baseline}", f"fwd+bwd vs {baseline}", "step peak GB"]))
    say(f"TFLOP/s: 6*T*K*H*I = {cfg.flops(tokens) / 1e12:.3g} TFLOP forward, 18*T*K*H*I with the backward; "
        f"'vs {baseline}': its time over the row's (above 1: faster).")


# %%
# SonicMoE's MoE module and the chapter's layout
# ----------------------------------------------
# sonicmoe.MoE(E, K, H, I, activation, add_bias, std) holds router.weight [E, H], c_fc.weight
# [E, 2I, H] and c_proj.weight [E, H, I]: the chapter's router_weight, w_gate_up and w_down, except
# that c_fc interleaves gate and up rows (row 2i = gate i, row 2i+1 = up i). Its router takes the
# softmax over the top-k logits, which equals softmax over all E, top-k, renormalize: Mixtral's and
# Qwen3's router. OLMoE does not renormalize and DeepSeek-V3 uses sigmoid scores with groups, so for
# those presets only tilemoe's backend (which takes any routing) runs SonicMoE's kernels.

def module_router_mismatch(cfg: tilemoe.MoEConfig) -> str | None:
    if cfg.scoring != "softmax":
        return f"{cfg.name} scores experts with a {cfg.scoring}, SonicMoE's MoE module with a softmax"
    if not cfg.renormalize:
        return (f"{cfg.name}'s router does not renormalize its top-k weights; SonicMoE's MoE module takes the "
                f"softmax over the top-k logits, which always sums to 1")
    if cfg.num_groups or cfg.routed_scaling != 1.0:
        return f"{cfg.name} uses group-limited routing or a routed scaling, SonicMoE's MoE module neither"
    return None


def build_sonic_module(cfg: tilemoe.MoEConfig, device: torch.device, seed: int):
    from sonicmoe import MoE
    from sonicmoe.enums import ActivationType

    torch.manual_seed(seed)
    with torch.device(device):  # initialized on the GPU: no detour through host memory
        module = MoE(cfg.experts, cfg.top_k, cfg.hidden, cfg.ffn, ActivationType.SWIGLU, False, 0.02)
    return module.to(torch.bfloat16)


def chapter_weights(module) -> dict:
    """The module's weights in the chapter's layout (copies: separate leaves, separate gradients)."""
    with torch.no_grad():
        return {
            "router_weight": module.router.weight.detach().clone(),
            "w_gate_up": sonic.from_sonic_gate_up(module.c_fc.weight),  # de-interleave
            "w_down": module.c_proj.weight.detach().clone(),            # same layout [E, H, I]
        }


def sonic_module_path(module, x: torch.Tensor) -> Path:
    x_leaf = x.detach().clone().requires_grad_()

    def run(train: bool) -> torch.Tensor:
        if train:
            return sonic.module_forward(module, x_leaf, train=True)[0]
        return sonic.module_forward(module, x)[0]  # inference: no autograd

    def grads() -> dict:
        gate_up = module.c_fc.weight.grad
        return {"x": x_leaf.grad, "router_weight": module.router.weight.grad,
                "w_gate_up": None if gate_up is None else sonic.from_sonic_gate_up(gate_up),
                "w_down": module.c_proj.weight.grad}

    return Path("SonicMoE MoE module", "SonicMoE", run, grads, [x_leaf, *module.parameters()], reference="sonicmoe")


def replay_route_fn(ids: torch.Tensor, num_experts: int):
    """The reference's routing: SonicMoE's choice of experts, weights = softmax over the chosen
    logits (computed from the reference's own leaves, so that the router gradient flows)."""
    def route_fn(x, router_weight):
        logits = tilemoe.router_logits(x, router_weight)
        chosen = logits.gather(1, ids)
        weights = chosen.softmax(dim=-1)
        return build_routing(ids, weights, logits.softmax(dim=-1).gather(1, ids).detach(), num_experts)
    return route_fn


# %%
# The walk-through with SonicMoE
# ------------------------------
# The speedups are over tilemoe's fastest plain-PyTorch path here (grouped_mm on a Hopper GPU, the
# torch loop on a CPU), chosen among the PyTorch backends only: whatever else backend="auto" may
# prefer (tilemoe's own kernels, SonicMoE), the baseline stays PyTorch.

PYTORCH_BACKENDS = ("grouped_mm", "torch")


def pytorch_baseline(device: torch.device, dtype: torch.dtype, cfg: tilemoe.MoEConfig) -> str:
    available = tilemoe.available_backends(device, dtype, cfg.hidden, cfg.ffn)  # fastest first
    return next(n for n in available if n in PYTORCH_BACKENDS)  # "torch" runs anywhere


def run_with_sonic(cfg: tilemoe.MoEConfig, tokens: int, seed: int, device: torch.device) -> tuple[list, dict, bool, dict]:
    say(f"SonicMoE {sonic.version()} ({', '.join(f'{k} {v}' for k, v in sonic.versions().items())})")
    dtype, tolerance = torch.bfloat16, tilemoe.TOLERANCE[torch.bfloat16]
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(tokens, cfg.hidden, generator=gen, device=device).to(dtype)
    dy = torch.randn(tokens, cfg.hidden, generator=gen, device=device).to(dtype)
    extra = {}

    mismatch = module_router_mismatch(cfg)
    module = None
    if mismatch is None:
        module = build_sonic_module(cfg, device, seed)
        weights = chapter_weights(module)
        say("Weights: SonicMoE's MoE module's own (std 0.02 experts, nn.Linear router), copied into the "
            "chapter's layout (c_fc de-interleaved).")
    else:
        say(f"SonicMoE's MoE module is skipped: {mismatch}. tilemoe's sonicmoe backend runs SonicMoE's "
            f"kernels on {cfg.name}'s own routing instead.")
        weights = cfg.init_weights(device=device, dtype=dtype, seed=seed, shared=False)
    if cfg.shared_experts:
        say(f"{cfg.name}'s shared expert is left out: every path and the reference compute the routed experts only.")
    storage = reference_storage(weights, device)
    compute = str(torch.promote_types(storage, torch.float32)).removeprefix("torch.")
    say(f"Reference: reference_moe computing in {compute}, its leaves and gradients stored in "
        f"{str(storage).removeprefix('torch.')}.")
    references, paths, rows, results, ok = {}, [], [], {}, True

    if module is not None:
        say("SonicMoE: the first calls JIT-compile and autotune its kernels (the forward's, then the training "
            "step's: minutes at a real model's shapes) ...")
        ids, how, ties = sonic.module_choice(module, x)
        say(f"SonicMoE's routing decision, replayed by its reference: {how}; {ties} of {tokens} tokens have an "
            f"exact bf16 tie at the top-{cfg.top_k} boundary (tilemoe's fp32 router logits avoid that).")
        references["sonicmoe"] = run_reference(x, weights, cfg.top_k, dy, replay_route_fn(ids, cfg.experts), storage)[:2]
        paths.append(sonic_module_path(module, x))
        rows, results, ok = check_all(paths, references, dy, tolerance)
        references.pop("sonicmoe")  # free the reference's gradients before the next reference

    # tilemoe's paths share one set of leaves (weights as given, no copy): one set of gradients at a time.
    leaves = {k: v.detach().requires_grad_() for k, v in weights.items()}
    del weights
    x_leaf = x.detach().clone().requires_grad_()
    y_ref, ref_grads, ref_routing = run_reference(x, leaves, cfg.top_k, dy, tilemoe_route_fn(cfg), storage)
    references["tilemoe"] = (y_ref, ref_grads)
    with torch.no_grad():
        ours = tilemoe_route_fn(cfg)(x, leaves["router_weight"])
    differ = int((ours.topk_ids != ref_routing.topk_ids).any(dim=1).sum())
    say(f"tilemoe's routing decision (fp32 router logits, {cfg.name}'s router) is the reference's for "
        f"{tokens - differ} of {tokens} tokens.")
    extra["tokens_routed_differently_from_reference"] = differ

    baseline = pytorch_baseline(device, dtype, cfg)
    tilemoe_paths = [tilemoe_path(f"tilemoe {baseline}", baseline, leaves, x_leaf, x, cfg)]
    for layout in sonic.LAYOUTS:
        tilemoe_paths.append(tilemoe_path(f"tilemoe sonicmoe ({layout})", sonic.NAME, leaves, x_leaf, x, cfg, layout))
    say("tilemoe's sonicmoe backend: its first calls compile what SonicMoE's MoE module did not use "
        "(arbitrary routing, the concat layout) ...")
    sonic.clear_cache()
    more_rows, more_results, more_ok = check_all(tilemoe_paths, references, dy, tolerance)
    rows, ok = rows + more_rows, ok and more_ok
    results.update(more_results)
    paths += tilemoe_paths
    print_checks(rows, tolerance)
    del references, y_ref, ref_grads

    say("\nTiming (every path is warmed up: its kernels compiled during the check) ...")
    base_name = f"tilemoe {baseline}"
    time_rows = time_all(paths, results, dy, cfg.flops(tokens), device, base_name)
    print_times(time_rows, base_name, tokens, cfg)
    with torch.no_grad():
        route_ms = bench.time_ms(lambda: tilemoe_route_fn(cfg)(x, leaves["router_weight"]), device=device)
        fused_route_ms = bench.time_ms(lambda: route_tokens(x, leaves["router_weight"], cfg.top_k, fused=True,
                                                            **cfg.router_options()), device=device)
    info = sonic.cache_info()
    say(f"tilemoe's routing alone (fp32 logits, top-k, metadata): {route_ms:.3f} ms with PyTorch's ops (the "
        f"{baseline} row's), {fused_route_ms:.3f} ms with the chapter's Triton router (the sonicmoe rows').\n"
        f"The interleaved layout converted w_gate_up {info['conversions']} time(s) and reused the copy "
        f"{info['hits']} times (the cached copy, {leaves['w_gate_up'].numel() * 2 / 1e9:.2f} GB, is held like the weights and not "
        f"counted in the step peak).")
    extra.update(baseline=base_name, dtype="bfloat16", tolerance=tolerance, tilemoe_route_ms=route_ms,
                 tilemoe_fused_route_ms=fused_route_ms, sonic_cache=info, sonicmoe=sonic.versions(),
                 reference_storage=str(storage), module_skipped=mismatch)
    return paths, results, ok, extra


# %%
# The walk-through without SonicMoE
# ---------------------------------
# The same checks and timings with every backend tilemoe has here, on a small preset: what this
# lesson measures, minus SonicMoE.

def run_without_sonic(cfg: tilemoe.MoEConfig, tokens: int, seed: int, device: torch.device) -> tuple[list, dict, bool, dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tolerance = tilemoe.TOLERANCE[dtype]
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(tokens, cfg.hidden, generator=gen, device=device).to(dtype)
    dy = torch.randn(tokens, cfg.hidden, generator=gen, device=device).to(dtype)
    weights = cfg.init_weights(device=device, dtype=dtype, seed=seed, shared=False)
    storage = reference_storage(weights, device)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in weights.items()}
    x_leaf = x.detach().clone().requires_grad_()
    y_ref, ref_grads, _ = run_reference(x, leaves, cfg.top_k, dy, tilemoe_route_fn(cfg), storage)
    say(f"{str(dtype).removeprefix('torch.')} on {device.type}; reference_moe in {str(storage).removeprefix('torch.')}")
    names = [n for n in tilemoe.available_backends(device, dtype, cfg.hidden, cfg.ffn) if n != sonic.NAME]
    baseline = "torch" if "torch" in names else names[0]
    names.sort(key=lambda n: n != baseline)
    paths = [tilemoe_path(f"tilemoe {n}", n, leaves, x_leaf, x, cfg) for n in names]
    rows, results, ok = check_all(paths, {"tilemoe": (y_ref, ref_grads)}, dy, tolerance)
    print_checks(rows, tolerance)
    time_rows = time_all(paths, results, dy, cfg.flops(tokens), device, f"tilemoe {baseline}")
    print_times(time_rows, f"tilemoe {baseline}", tokens, cfg)
    return paths, results, ok, {"baseline": f"tilemoe {baseline}", "dtype": str(dtype).removeprefix("torch."),
                                "tolerance": tolerance, "reference_storage": str(storage)}


# %%
# The README's tables, from recorded runs
# ---------------------------------------
# `--table FILE.json ...` prints the markdown of the README's "Measured" section from the files
# `--record` wrote: numbers are never typed by hand, and the section can be regenerated (and is
# checked against these files by tests/test_sonic.py). It needs no GPU and runs nothing.

LESSON_DIR = pathlib.Path(__file__).resolve().parent
def _fmt(value, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, str) and not value):
        return "-"
    if isinstance(value, str):
        return value
    if value != value or value in (float("inf"), float("-inf")):  # NaN, inf: a check that never ran or never arrived
        return str(value)
    return format(value, spec) + suffix


def _tflops(value) -> str:
    return _fmt(value, ".0f" if value is not None and value >= 100 else ".3g")


def _baseline_of(run: dict) -> str | None:
    """The row the speedups are relative to: named by the run, else the one whose speedup is 1."""
    if run.get("baseline"):
        return run["baseline"]
    ones = [r["path"] for r in run["rows"] if r.get("fwd_speedup") == 1.0 and "sonicmoe" not in r["path"].lower()]
    return ones[0] if ones else None


def run_markdown(path: pathlib.Path) -> str:
    """One recorded run as markdown: its provenance, the correctness table, the timing table."""
    run = json.loads(path.read_text())
    cfg, rows = run["preset"], run["rows"]
    router = cfg["scoring"] + (", renormalized" if cfg.get("renormalize", True) else ", not renormalized")
    if cfg.get("num_groups"):
        router += f", {cfg.get('topk_groups')} of {cfg['num_groups']} groups"
    if cfg.get("routed_scaling", 1.0) != 1.0:
        router += f", scaled by {cfg['routed_scaling']:g}"
    hardware = run["device"] + (f" ({run['sm_count']} SMs)" if run.get("sm_count") else "")
    software = [f"torch {run['torch']}"] + [f"{k} {run[k]}" for k in ("triton",) if run.get(k)]
    software += [f"CUDA {run['cuda']}"] if run.get("cuda") else []
    software += [f"Python {run['python']}"]
    software += [f"{k} {v}" for k, v in (run.get("sonicmoe") or {}).items()]
    shown = bench.repo_path(path)
    link = bench.link_from(LESSON_DIR, path)
    commit = str(run.get("commit", "unknown"))
    commit = commit[:10] + commit[40:] if len(commit) >= 40 else commit  # keep a "+dirty"
    storage = str(run.get("reference_storage", "")).removeprefix("torch.")
    compute = "float64" if storage == "float64" else "float32"
    lines = [
        f"**{cfg['name']}**: H = {cfg['hidden']}, I = {cfg['ffn']}, E = {cfg['experts']}, K = {cfg['top_k']} "
        f"({router}), T = {run['tokens']} tokens, {run.get('dtype', 'bfloat16')}. "
        f"{hardware}; {', '.join(software)}. Commit `{commit}`, {run['date'][:10]}, `{run['command']}`; "
        f"recorded in [`{shown}`]({link}).",
        "",
    ]
    if run.get("module_skipped"):
        lines += [f"SonicMoE's `MoE` module is not run for this preset: {run['module_skipped']}.", ""]
    tolerance = run.get("tolerance")
    lines += [f"Correctness: rel. error ‖out − ref‖ / ‖ref‖ against `reference_moe` computing in {compute}"
              + (f" (leaves stored in {storage})" if storage and storage != compute else "")
              + (f"; tolerance {tolerance:g}." if tolerance else "."), "",
              "| path | routing | " + " | ".join(ERROR_COLUMNS) + " | check |",
              "|---|---|" + "---|" * len(ERROR_COLUMNS) + "---|"]
    for r in rows:
        errors = [_fmt(r.get(f"err {c}"), ".2e") for c in ERROR_COLUMNS]
        lines.append(f"| {r['path']} | {r.get('routing', '-')} | " + " | ".join(errors) + f" | {r.get('check', '-')} |")
    base = _baseline_of(run) or "the baseline"
    lines += ["", f"Time of the whole layer (router + experts + combine), median of `tilemoe.bench.time_ms`; "
                  f"TFLOP/s from 6·T·K·H·I (forward) and 18·T·K·H·I (forward + backward); speedup = {base}'s "
                  f"time over the row's, in the same run; step peak = memory a training step adds.", "",
              f"| path | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd vs {base} | "
              f"fwd+bwd vs {base} | step peak GB |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {_fmt(r.get('fwd_ms'), '.3f')} | {_tflops(r.get('fwd_tflops'))} | "
                     f"{_fmt(r.get('fwdbwd_ms'), '.3f')} | {_tflops(r.get('fwdbwd_tflops'))} | "
                     f"{_fmt(r.get('fwd_speedup'), '.2f', 'x')} | {_fmt(r.get('fwdbwd_speedup'), '.2f', 'x')} | "
                     f"{_fmt(r.get('fwdbwd_peak_gb'), '.2f')} |")
    notes = []
    if run.get("tilemoe_fused_route_ms") is not None:
        notes.append(f"tilemoe's routing alone (fp32 logits, top-k, metadata) takes {run['tilemoe_route_ms']:.3f} ms "
                     f"with PyTorch's ops (the {run['baseline'].removeprefix('tilemoe ')} row's) and "
                     f"{run['tilemoe_fused_route_ms']:.3f} ms with the chapter's Triton router (the sonicmoe rows')")
    elif run.get("tilemoe_route_ms") is not None:  # recorded before the sonicmoe backend used the Triton router
        notes.append(f"tilemoe's routing alone (fp32 logits, top-k, metadata) takes {run['tilemoe_route_ms']:.3f} ms "
                     f"of every tilemoe row's forward")
    cache = run.get("sonic_cache") or {}
    if "conversions" in cache:
        notes.append(f"{'the' if notes else 'The'} interleaved layout converted w_gate_up {cache['conversions']} "
                     f"time(s) and reused the copy {cache.get('hits', 0)} times")
    if notes:
        lines += ["", "; ".join(notes) + "."]
    return "\n".join(lines)


def tables_markdown(files: list) -> str:
    """The README's generated block for these recorded runs, between its two marker comments."""
    paths = [pathlib.Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
    body = "\n\n".join(run_markdown(p) for p in paths)
    return bench.generated_block("examples/05_sonicmoe/sonicmoe_example.py", paths, body)


# %%
# Run it
# ------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="SonicMoE (arXiv 2512.14080) beside tilemoe: output and gradients checked against "
                    "tilemoe.reference_moe, forward and forward+backward timed. Without sonic-moe, Python "
                    ">= 3.12 or a Hopper/Blackwell GPU: says what is missing and runs tilemoe's own backends.",
        epilog="Environment: TILEMOE_EXTRA_SITE = an extra site directory to search for sonicmoe "
               "(added with site.addsitedir before sonicmoe is imported, .pth files included).")
    parser.add_argument("--preset", choices=sorted(tilemoe.PRESETS),
                        help="model shape (default: qwen3-30b-a3b with SonicMoE, small without)")
    parser.add_argument("--tokens", type=int, help="tokens in the batch (default: 16384 with SonicMoE, 512 without)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, inputs and upstream gradient (default: 0)")
    parser.add_argument("--record", action="store_true",
                        help="write every path's errors and timings with their provenance to benchmarks/results/<device>/")
    parser.add_argument("--table", nargs="+", metavar="JSON",
                        help="print the README's markdown tables from files --record wrote, and exit (runs nothing)")
    args = parser.parse_args(argv)
    if args.table:
        return bench.print_tables(parser, tables_markdown, args.table)
    if args.tokens is not None and args.tokens < 1:
        parser.error(f"--tokens: expected an int >= 1, got {args.tokens}")

    missing = sonic.missing()
    with_sonic = not missing
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if with_sonic:
        cfg = tilemoe.get_preset(args.preset or "qwen3-30b-a3b")
        tokens = args.tokens or 16384
    else:
        say("SonicMoE cannot run here:")
        for reason in missing:
            say(f"  - {reason}")
        say("To run it: an NVIDIA Hopper (H100, H200) or Blackwell (B200, GB200, B300) GPU, Python >= 3.12, "
            "a CUDA build of PyTorch, and\n    pip install sonic-moe\n"
            "sonic-moe 0.1.2.post1 declares torch<=2.9.1, so pip may replace your torch. To keep a newer one (it was\n"
            "seen working with torch 2.11), install it and its dependencies without dependency resolution:\n"
            "    pip install --no-deps sonic-moe quack-kernels nvidia-cutlass-dsl nvidia-cutlass-dsl-libs-base "
            "cuda-python apache-tvm-ffi torch-c-dlpack-ext\n"
            "Meanwhile, the same walk-through with tilemoe's own backends:\n")
        cfg = tilemoe.get_preset(args.preset or "small")
        tokens = args.tokens or 512

    say(f"Device: {bench.device_name(device)}; preset {cfg.name}: H={cfg.hidden}, I={cfg.ffn}, E={cfg.experts}, "
        f"K={cfg.top_k}, {cfg.scoring}{'' if cfg.renormalize else ', not renormalized'}; T={tokens}")
    walk = run_with_sonic if with_sonic else run_without_sonic
    paths, results, ok, extra = walk(cfg, tokens, args.seed, device)

    if args.record:
        rows = [{"path": p.name, "routing": p.router, **{k: v for k, v in results[p.name].items() if k != "errors"},
                 **{f"err {k}": v for k, v in results[p.name]["errors"].items()}} for p in paths]
        path = bench.record(f"sonicmoe-{cfg.name}-T{tokens}", rows, device,
                            extra={"preset": cfg.as_dict(), "tokens": tokens, "seed": args.seed,
                                   "with_sonicmoe": with_sonic, "missing": missing, **extra})
        say(f"\nrecorded: {path}")
    if not with_sonic:
        say("\n(SonicMoE itself was not run: see above for what it needs.)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
