"""
The full layer, timed: forward, forward + backward and a training step's memory, per backend
===========================================================================================

In this lesson you will learn how to measure a training layer honestly: every backend runs the same
``OptimizedMoELayer`` (same weights, same tokens, same routing options), is checked against
``tilemoe.reference_moe`` first, and is timed beside the torch grouped_mm path in the same run, so
each speedup is a ratio of two numbers taken minutes apart on the same GPU.

Run it::

    .venv/bin/python examples/06_full_moe/benchmark.py                       # CPU: small, seconds
    python examples/06_full_moe/benchmark.py --config olmoe-1b-7b --tokens 16384 --record   # a GPU

What it prints: one row per backend that runs here (grouped_mm, triton, cuda, sonicmoe when
installed, torch on a CPU): the forward's error against the reference, forward ms, forward +
backward ms (the gradients of x, the router and both expert weights, as inside a model, from a
random dy handed down as the layers above would: no loss over y is computed, so none is timed),
both as TFLOP/s (6*T*K*H*I and 18*T*K*H*I, K counting the shared experts too), the speedups over
grouped_mm, and the peak memory a training step adds beyond x, the weights and their gradients (GPU
only), also as a ratio to grouped_mm's.
When SonicMoE runs, a row times SonicMoE as it ships, its own ``MoE`` module holding the
layer's weights (it routes by itself: softmax over the top-k of bf16 logits, checked against the
reference replaying its choice; skipped for a layer with shared experts, which the module does not
have), and every row's times are also divided into the faster SonicMoE row's. The last row, the
dense floor, does the layer's FLOPs with no routing at all (``tilemoe.floors``: its forward as two
cuBLAS GEMMs, its training step as six): its "x grouped_mm" is the most that perfect kernels would
reach when arithmetic bounds them. On a GPU, under
the table: the SM clock each backend's forward and step were timed at (``tilemoe.clocks``), and with
``--energy`` the joules of one forward and of one training step, each run back to back for 1.5 s
(``clocks.energy_per_call``): on a power-capped GPU a step takes at least its energy divided by the
board's power limit.
``--record`` writes the rows to benchmarks/results/<gpu>/full_moe-*.json (with SonicMoE's versions
when it ran); ``--table FILE ...`` prints the README's "Measured results" from such files::

    python examples/06_full_moe/benchmark.py --table benchmarks/results/nvidia-h200/full_moe-*.json

It exits with status 1 if a backend's output is outside the tolerance.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from tabulate import tabulate

import tilemoe
from tilemoe import backends, bench, clocks, floors
from tilemoe.backends import sonic
from tilemoe.layer import train_step

BASELINE = "grouped_mm"
MODULE_ROW = sonic.MODULE_NAME
SONIC_ROWS = (sonic.NAME, MODULE_ROW)
FLOOR_ROW = "dense floor"


# %%
# One backend, measured
# ---------------------
# The same layer object runs every backend (only ``layer.backend`` changes), so the weights, the
# tokens and the routing options are identical; the forward is checked before anything is timed.

def measure(layer: tilemoe.OptimizedMoELayer, x: torch.Tensor, dy: torch.Tensor, ref: torch.Tensor, device,
            energy: bool = False) -> dict:
    """One backend: its error, forward and forward+backward times (the backward from dy), a training
    step's peak memory (and with ``energy``, the joules of each)."""
    layer.eval()
    with torch.no_grad():
        err = tilemoe.rel_error(layer(x), ref)
        forward = time_forward(lambda: layer(x), device, energy)
    layer.train()
    step = functools.partial(train_step, layer, x, dy)
    return {"rel_error": err, **forward, **time_step(step, [*layer.parameters(), x], device, energy)}


def timed(fn, device, what: str, energy: bool) -> dict:
    """fn's time as {what}_ms (fwd_bwd_ms for the step), with the SM clock it ran at
    (``tilemoe.clocks``: {what}_sm_clock_mhz, {what}_power_capped, ... where sampled) and with
    ``energy`` its joules ({what}_energy_j, {what}_power_w, {what}_loop_ms, where NVML counts them)."""
    with clocks.Sampler(device) as sampled:
        ms = bench.time_ms(fn, device=device)
    measured = {**sampled.summary(), **(clocks.energy_per_call(fn, device) if energy else {})}
    return {f"{'fwd_bwd' if what == 'step' else what}_ms": ms, **{f"{what}_{k}": v for k, v in measured.items()}}


def time_forward(fn, device, energy: bool = False) -> dict:
    """The forward's time, clock and (with ``energy``) joules: ``timed``'s forward_* fields."""
    return timed(fn, device, "forward", energy)


def time_step(step, leaves: list, device, energy: bool = False) -> dict:
    """A training step's time, clock, (with ``energy``) joules and peak memory, with every leaf's
    gradient held before it runs, as an optimizer holds them: ``timed``'s step_* fields."""
    for p in leaves:
        p.grad = torch.zeros_like(p)
    return {**timed(step, device, "step", energy), "train_peak_bytes": bench.peak_bytes(step, device)}


def module_unavailable(layer: tilemoe.OptimizedMoELayer) -> str | None:
    """Why SonicMoE's MoE module cannot stand in for this layer, or None."""
    if layer.shared_gate_up is not None:
        return "the layer has shared experts, SonicMoE's MoE module has none"
    return None


def measure_module(layer: tilemoe.OptimizedMoELayer, x: torch.Tensor, dy: torch.Tensor, device,
                   energy: bool = False) -> dict:
    """SonicMoE's own MoE module with the layer's weights: its error against the reference replaying
    its routing, forward and forward+backward times (its aux loss scaled like the layer's), peak."""
    module = sonic.module_with_weights(layer.router_weight, layer.w_gate_up, layer.w_down, layer.top_k)
    routing, _, _ = sonic.module_routing(module, x)
    with torch.no_grad():
        weights = {n: getattr(layer, n).float() for n in ("router_weight", "w_gate_up", "w_down")}
        ref = tilemoe.reference_moe(x.float(), **weights, top_k=layer.top_k, routing=routing)
        err = tilemoe.rel_error(sonic.module_forward(module, x)[0], ref)
        forward = time_forward(lambda: sonic.module_forward(module, x), device, energy)
    step = functools.partial(sonic.module_train_step, module, x, dy, layer.load_balance_weight)
    return {"rel_error": err, **forward, **time_step(step, [*module.parameters(), x], device, energy)}


def measure_floor(layer: tilemoe.OptimizedMoELayer, tokens: int, device, dtype: torch.dtype,
                  energy: bool = False) -> dict:
    """The dense floor (``tilemoe.floors``): the layer's FLOPs with no routing, its forward as two
    cuBLAS GEMMs and its training step as six, timed like a backend. No error, no peak memory."""
    rows = tokens * (layer.top_k + (0 if layer.shared_down is None else len(layer.shared_down)))
    shape = (rows, layer.hidden_dim, layer.ffn_dim)
    return {"rel_error": None,
            **time_forward(floors.forward_gemms(*shape, device=device, dtype=dtype), device, energy),
            **timed(floors.training_gemms(*shape, device=device, dtype=dtype), device, "step", energy),
            "train_peak_bytes": None}


def with_tflops(row: dict, flops: float) -> dict:
    """The row with its forward (6*T*K*H*I) and forward+backward (3x that) rates added."""
    return {**row, "forward_tflops": bench.tflops(flops, row["forward_ms"]),
            "fwd_bwd_tflops": bench.tflops(3 * flops, row["fwd_bwd_ms"])}


# %%
# Ratios, measured in one run
# ---------------------------
# Every ratio divides two times (or peaks) from the same run: the baseline's over the backend's for
# speed, the backend's over the baseline's for memory. SonicMoE, when it ran, is the second yardstick:
# "x SonicMoE" is the faster SonicMoE row's time over the backend's (above 1: faster than SonicMoE).
# Runs recorded before the module row have only the backend's row.

HEADERS = ["backend", "rel. error", "fwd ms", f"fwd x {BASELINE}", "fwd x SonicMoE", "fwd+bwd ms",
           f"fwd+bwd x {BASELINE}", "fwd+bwd x SonicMoE", "fwd+bwd TFLOP/s", "train peak GB", "peak / base"]


def add_ratios(rows: list[dict]) -> None:
    """Add each row's speedups over the baseline and SonicMoE, and its peak memory over the baseline's."""
    by_name = {r["backend"]: r for r in rows}
    base = by_name.get(BASELINE)
    sonic_rows = [by_name[n] for n in SONIC_ROWS if n in by_name]
    for r in rows:
        for key in ("forward", "fwd_bwd"):
            ms = r[f"{key}_ms"]
            r[f"{key}_speedup"] = base[f"{key}_ms"] / ms if base else None
            r[f"{key}_vs_sonicmoe"] = min(s[f"{key}_ms"] for s in sonic_rows) / ms if sonic_rows else None
        peak, base_peak = r["train_peak_bytes"], base and base["train_peak_bytes"]
        r["train_peak_ratio"] = peak / base_peak if peak is not None and base_peak else None


def table_cells(rows: list[dict]) -> list[list[str]]:
    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)

    return [[r["backend"], cell(r["rel_error"], ".2e"), f"{r['forward_ms']:.3f}", cell(r["forward_speedup"], ".2f"),
             cell(r["forward_vs_sonicmoe"], ".2f"), f"{r['fwd_bwd_ms']:.3f}", cell(r["fwd_bwd_speedup"], ".2f"),
             cell(r["fwd_bwd_vs_sonicmoe"], ".2f"), f"{r['fwd_bwd_tflops']:.1f}",
             cell(r["train_peak_bytes"] and r["train_peak_bytes"] / 1e9, ".3f"), cell(r["train_peak_ratio"], ".2f")]
            for r in rows]


def table_markdown(files: list) -> str:
    """The README's "Measured results": per recorded run, its provenance and one row per backend."""
    parts = []
    for path in map(Path, files):
        run = json.loads(path.read_text())
        rows = run["rows"]
        add_ratios(rows)
        first = rows[0]
        link = bench.link_from(Path(__file__).parent, path)
        sonic_versions = ", ".join(f"{k} {v}" for k, v in (run.get("sonicmoe") or {}).items())
        backward = "the backward computes dX" if run.get("x_grad") else "x wanted no gradient (no dX; recorded before it did)"
        backward += (", starting from a random dy" if run.get("backward_from") == "dy"
                     else ", starting from the loss sum(y) in fp32 (its kernels timed too; recorded before dy)")
        parts.append(f"**{first['config']}**, {first['tokens']} tokens: {run['gpu'] or run['device']}, torch "
                     f"{run['torch']}, triton {run['triton']}{', ' + sonic_versions if sonic_versions else ''}; "
                     f"commit {run['commit'][:7]}, `{run['command']}`, {run['date'][:10]}; {backward}; "
                     f"[{path.name}]({link})")
        lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
        lines += ["| " + " | ".join(cells) + " |" for cells in table_cells(rows)]
        parts.append("\n\n".join(["\n".join(lines), *under_table(rows)]))
    return bench.generated_block("examples/06_full_moe/benchmark.py", files, "\n\n".join(parts))


def under_table(rows: list[dict]) -> list[str]:
    """What a run measured beside its times, one block each: the clocks, then the energy."""
    return ["\n".join(block) for block in (clock_lines(rows), energy_lines(rows)) if block]


def clock_lines(rows: list[dict]) -> list[str]:
    """For runs that sampled the clock (``tilemoe.clocks``): each backend's median SM clock while its
    forward and its training step were timed, and the share of samples the power cap held it down."""
    sampled = [r for r in rows if r.get("step_sm_clock_mhz") is not None]
    if not sampled:
        return []
    first = sampled[0]
    return [clocks.caption(first["step_max_sm_clock_mhz"], first["step_power_limit_w"], ", forward / training step")] + [
        f"- {r['backend']}: {clocks.cell(r['forward_sm_clock_mhz'], r['forward_power_capped'])} / "
        f"{clocks.cell(r['step_sm_clock_mhz'], r['step_power_capped'])}" for r in sampled]


def energy_lines(rows: list[dict]) -> list[str]:
    """For runs with ``--energy``: each backend's joules per forward and per training step, the
    board's mean power and the time per call, run back to back (``clocks.energy_per_call``)."""
    measured = [r for r in rows if r.get("step_energy_j") is not None]
    if not measured:
        return []
    limit = measured[0]["step_power_limit_w"]

    def cell(r, what):
        return clocks.energy_cell(r[f"{what}_energy_j"], r[f"{what}_power_w"], r[f"{what}_loop_ms"]) if r.get(f"{what}_energy_j") else "-"

    return [clocks.energy_caption(limit, "per forward / per training step")] + [
        f"- {r['backend']}: {cell(r, 'forward')} / {cell(r, 'step')}" for r in measured]


# %%
# Run it
# ------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", default="small", choices=sorted(tilemoe.PRESETS), help="model shape (default: small)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens (default: 256)")
    parser.add_argument("--backends", nargs="+", default=None, choices=list(backends.BACKENDS),
                        help="backends to run (default: every one that runs here)")
    parser.add_argument("--energy", action="store_true",
                        help="also measure each backend's joules per forward and per training step, and the board's "
                             f"mean power ({clocks.ENERGY_SECONDS:g} s of back-to-back calls each; a GPU with NVML)")
    bench.add_output_options(parser)
    args = parser.parse_args(argv)
    if args.table:
        return bench.print_tables(parser, table_markdown, args.table)
    if args.tokens < 1:
        parser.error(f"--tokens: expected an int >= 1, got {args.tokens}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = tilemoe.get_preset(args.config)
    runnable = backends.available_backends(device, dtype, cfg.hidden, cfg.ffn)
    names = args.backends or [n for n in runnable if n != "torch" or device.type == "cpu"]
    for name in names:
        if name not in runnable:
            parser.error(f"--backends: {name} cannot run here: "
                         f"{backends.unavailable_reason(name, device, dtype, cfg.hidden, cfg.ffn)}")

    torch.manual_seed(0)
    layer = tilemoe.OptimizedMoELayer.from_preset(cfg, device=device, dtype=dtype)
    # x wants its gradient, as the output of the layer below would in a model: the backward computes dX.
    x = torch.randn(args.tokens, cfg.hidden, device=device).to(dtype).requires_grad_()
    dy = torch.randn(args.tokens, cfg.hidden, device=device).to(dtype)  # y's gradient, from the layers above
    with torch.no_grad():
        weights = {n: getattr(layer, n).float() for n in ("router_weight", "w_gate_up", "w_down", "shared_gate_up",
                                                           "shared_down") if getattr(layer, n) is not None}
        ref = tilemoe.reference_moe(x.float(), **weights, top_k=cfg.top_k, **layer.router_options())
    flops = cfg.flops(args.tokens, include_shared=True)  # the layer's shared experts (DeepSeek-V3's) compute too
    rows = []
    for name in names:
        print(f"{name}: checking and timing (a first call compiles its kernels)", flush=True)
        layer.backend = name
        rows.append(with_tflops({"config": cfg.name, "tokens": args.tokens, "backend": name,
                                 **measure(layer, x, dy, ref, device, args.energy)}, flops))
    if sonic.NAME in names:
        if (why := module_unavailable(layer)) is not None:
            print(f"{MODULE_ROW}: skipped: {why}")
        else:
            print(f"{MODULE_ROW}: checking and timing SonicMoE's own MoE module", flush=True)
            rows.append(with_tflops({"config": cfg.name, "tokens": args.tokens, "backend": MODULE_ROW,
                                     **measure_module(layer, x, dy, device, args.energy)}, flops))
    print(f"{FLOOR_ROW}: timing the layer's FLOPs as dense GEMMs (tilemoe.floors)", flush=True)
    rows.append(with_tflops({"config": cfg.name, "tokens": args.tokens, "backend": FLOOR_ROW,
                             **measure_floor(layer, args.tokens, device, dtype, args.energy)}, flops))
    add_ratios(rows)
    print(f"{cfg.name}, T={args.tokens}, {dtype}, {bench.device_name(device)}; speedups over {BASELINE} in this run")
    print(tabulate(table_cells(rows), HEADERS))
    for block in under_table(rows):
        print(block)
    failed = [r["backend"] for r in rows if r["backend"] != FLOOR_ROW and not r["rel_error"] <= tilemoe.TOLERANCE[dtype]]
    if failed:
        print(f"FAIL: outside the {dtype} tolerance {tilemoe.TOLERANCE[dtype]:g}: {failed}")
    if args.record:
        extra = {"x_grad": True, "backward_from": "dy", **({"sonicmoe": sonic.versions()} if sonic.NAME in names else {})}
        print(f"recorded: {bench.record('full_moe', rows, device, extra=extra)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
