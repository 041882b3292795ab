"""
Tune the Triton grouped GEMM's tile configurations on this GPU
==============================================================

What you will learn: which tile shape, pipeline depth and launch style win for each projection
of each model shape, and by how much over the default rule (tilemoe/triton/configs.py).

For every preset and token count it times the up-projection (gather + SwiGLU epilogue) and then
the down-projection (plain stores, in expert order) alone, over a small candidate list per size
bucket (decode: <= 8 rows per expert; wider decode: <= 20; small: <= 48; prefill), each output
checked against torch first, each time the GPU's alone (replays of a CUDA graph: an eager call
of a decode GEMM would time the Python that launches it).
The two GEMMs share one tile schedule, so the down-projection is tuned at the up-projection's
winning BLOCK_M. The winners go to ``--out`` (default tilemoe/triton/tuned/<gpu>.json), which
``configs.pick`` reads: the nearest measured rows-per-expert of the same GEMM shape and bucket.
A run over some presets or token counts replaces those rows of the table and keeps the rest.

With --backward it times the backward's two weight gradients instead (``grouped_wgrad_kernel``:
dW_down reads dY through the permutation, dW_gate_up reads x through it) over tile shapes and
pipeline depths, each checked against torch, beside ``configs.backward_rule``'s choice and, where
it runs (tilemoe._C built for 90a on an H100/H200), the CUDA kernel the backward takes there
(``tilemoe.cuda.grouped_wgrad``); it writes no table (the backward takes a rule), and --record
keeps the sweep as JSON in benchmarks/results/<gpu>/.

Run it (GPU only; a few minutes)::

    python benchmarks/tune_triton.py                        # the four model presets at 1, 64, 4096, 16384 tokens
    python benchmarks/tune_triton.py --preset olmoe-1b-7b --tokens 16384 --out /tmp/t.json
    python benchmarks/tune_triton.py --backward --preset olmoe-1b-7b qwen3-30b-a3b --tokens 16384 --record
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from tabulate import tabulate
from triton.runtime.errors import OutOfResources

import tilemoe
from tilemoe import bench

PRESETS = ("olmoe-1b-7b", "qwen3-30b-a3b", "deepseek-v3", "mixtral-8x7b")
TOKENS = (1, 64, 4096, 16384)


def candidates(bucket_m: int, configs) -> list:
    """The configurations tried for one size bucket (its rule's BLOCK_M): a few tile shapes, each
    of the first ones also persistent, with TMA loads, and both."""
    C = configs.TileConfig
    if bucket_m == 16:
        base = [C(16, 64, 128, 1, 4, 4), C(16, 128, 128, 1, 4, 4), C(16, 32, 256, 1, 4, 3), C(16, 64, 64, 1, 4, 5),
                C(16, 128, 64, 1, 4, 4), C(16, 64, 256, 1, 4, 3), C(16, 32, 128, 1, 4, 6), C(16, 64, 128, 1, 8, 6)]
    elif bucket_m == 32:
        base = [C(32, 128, 128, 1, 4, 4), C(32, 64, 128, 1, 4, 4), C(32, 64, 256, 1, 4, 3), C(32, 128, 64, 1, 4, 5),
                C(32, 128, 128, 1, 4, 3), C(32, 128, 128, 1, 8, 4)]
    elif bucket_m == 64:
        base = [C(64, 64, 64, 4, 4, 4), C(64, 128, 64, 4, 4, 3), C(32, 64, 128, 4, 4, 4), C(64, 128, 64, 4, 8, 4)]
    else:
        base = [C(128, 128, 64, 8, 8, 3), C(128, 256, 64, 8, 8, 3), C(128, 128, 64, 8, 8, 4), C(128, 64, 64, 8, 4, 4),
                C(64, 128, 64, 8, 4, 4), C(128, 128, 64, 16, 8, 3), C(128, 128, 32, 8, 8, 5), C(128, 128, 128, 8, 8, 2)]
    variants = [C(**{**c.as_dict(), **change}) for c in base[:3]
                for change in ({"persistent": True}, {"tma": True}, {"persistent": True, "tma": True})]
    return base + variants


def merged(path: Path, winners: list) -> list:
    """The table at ``path`` (if any) with this run's winners in place of its rows of the same
    (preset, tokens, projection): a run over some presets or token counts keeps the others. Each
    row carries the commit it was measured at; rows without "timing" were timed by eager calls
    (before tune_triton.py timed CUDA-graph replays)."""
    key = lambda row: (row["preset"], row["tokens"], row["projection"])  # noqa: E731
    new = {key(row): row for row in winners}
    kept = json.loads(path.read_text())["configs"] if path.exists() else []
    rows = [new.pop(key(row), row) for row in kept]
    return rows + list(new.values())


def describe(c) -> str:
    return (f"{c.block_m}x{c.block_n}x{c.block_k} g{c.group_m} w{c.num_warps} s{c.num_stages}"
            f"{' P' if c.persistent else ''}{' TMA' if c.tma else ''}")


def time_gemm(ops, case_x, routing, w, cfg, projection, ffn, hidden):
    """Median ms of one projection at cfg, after checking its output against torch."""
    sched = ops.Schedule(routing, cfg.block_m)
    slots = routing.sorted_slots.numel()
    if projection == "up":
        out = case_x.new_empty(slots, ffn)
        run = lambda: ops.grouped_gemm(case_x, w, routing, sched, cfg, n=ffn, gather=routing.sorted_tokens,  # noqa: E731
                                       swiglu=True, out=out)
    else:
        a = torch.randn(slots, ffn, device=case_x.device).to(case_x.dtype)
        out = case_x.new_zeros(slots, hidden)
        run = lambda: ops.grouped_gemm(a, w, routing, sched, cfg, n=hidden, out=out)  # noqa: E731
    run()
    # Check a few experts' rows against torch (the full check lives in tests/test_triton.py).
    offsets = routing.offsets.tolist()
    for e in sorted(range(routing.num_experts), key=lambda e: offsets[e] - offsets[e + 1])[:2]:
        rows = slice(offsets[e], offsets[e + 1])
        if projection == "up":
            h = case_x[routing.sorted_tokens[rows]].float() @ w[e].float().t()
            want, got = torch.nn.functional.silu(h[:, :ffn]) * h[:, ffn:], out[rows]
        else:
            want, got = a[rows].float() @ w[e].float().t(), out[rows]
        err = tilemoe.rel_error(got, want)
        if err > 1e-2:
            raise AssertionError(f"{projection} {cfg}: rel. error {err:.2e} on expert {e}")
    return bench.time_ms(run, cuda_graph=True)  # the GPU's time: a decode GEMM's eager call times the host


def wgrad_candidates(configs) -> list:
    """The weight-gradient tiles tried: square and wide either way, each at a few pipeline depths
    (the gathered operand's indices take one stage of the pipeline)."""
    W = configs.WgradConfig
    shapes = ((128, 128, 64), (128, 256, 64), (256, 128, 64), (128, 256, 32))
    return [W(n1, n2, r, num_warps=8, num_stages=st) for n1, n2, r in shapes for st in (4, 5, 6, 7)]


def describe_wgrad(c) -> str:
    return f"{c.block_n1}x{c.block_n2}x{c.block_r} w{c.num_warps} s{c.num_stages}{' TMA' if c.tma else ''}"


def wgrad_error(out, a, b, routing, *, a_gather=None, b_gather=None) -> float:
    """The largest relative error of dW_e = A_e^T B_e (rows read through the gathers) over every
    expert with rows, against torch in fp32."""
    offsets = routing.offsets.tolist()
    worst = 0.0
    for e in (e for e in range(routing.num_experts) if offsets[e + 1] > offsets[e]):
        rows = torch.arange(offsets[e], offsets[e + 1], device=a.device)
        a_rows = a[a_gather[rows] if a_gather is not None else rows].float()
        b_rows = b[b_gather[rows] if b_gather is not None else rows].float()
        worst = max(worst, tilemoe.rel_error(out[e], a_rows.t() @ b_rows))
    return worst


def tune_backward(args, configs, ops, device) -> int:
    """--backward: every weight-gradient candidate at every preset and token count, checked, timed."""
    rows, table = [], []
    for preset in args.preset:
        cfg = tilemoe.get_preset(preset)
        router_weight = torch.randn(cfg.experts, cfg.hidden, device=device) / cfg.hidden ** 0.5  # no expert weights needed
        for tokens in args.tokens:
            x = torch.randn(tokens, cfg.hidden, device=device).bfloat16()
            routing = tilemoe.route(tilemoe.router_logits(x, router_weight), cfg.top_k, **cfg.router_options())
            slots = routing.sorted_slots.numel()
            m = slots / routing.num_experts
            dy = torch.randn_like(x)
            p_act = torch.randn(slots, cfg.ffn, device=device).bfloat16()
            d_pre = torch.randn(slots, 2 * cfg.ffn, device=device).bfloat16()
            rule = ops.backward_configs(routing, d_pre)  # what the layer's backward takes here
            cases = (("dW_down", dy, p_act, dict(a_gather=routing.sorted_tokens), rule.wgrad_down),
                     ("dW_gate_up", d_pre, x, dict(b_gather=routing.sorted_tokens), rule.wgrad_gate_up))
            for gradient, a, b, gathers, chosen in cases:
                flops = 2 * slots * a.shape[1] * b.shape[1]
                times = {}
                for c in dict.fromkeys([chosen, *wgrad_candidates(configs)]):
                    try:
                        run = lambda: ops.weight_gradient(a, b, routing, c, dtype=a.dtype, kernel="triton", **gathers)  # noqa: E731
                        err = wgrad_error(run(), a, b, routing, **gathers)
                        if err > 1e-2:
                            raise AssertionError(f"{gradient} {c}: rel. error {err:.2e}")
                        times[c] = bench.time_ms(run)
                    except OutOfResources as exc:
                        print(f"  skipped {describe_wgrad(c)}: {str(exc).splitlines()[0]}")
                if not times:
                    print(f"  {preset} T={tokens} {gradient}: no candidate fits this GPU")
                    continue
                best = min(times, key=times.get)
                for c, ms in times.items():
                    rows.append({"preset": preset, "tokens": tokens, "gradient": gradient, "rows_per_expert": m,
                                 "kernel": "triton", "config": dataclasses.asdict(c), "ms": ms,
                                 "tflops": bench.tflops(flops, ms), "rule": c == chosen})
                cuda_ms = None
                if ops.cuda_wgrad_reason(a, b, gathers.get("a_gather"), gathers.get("b_gather"), a.dtype) is None:
                    run = lambda: ops.weight_gradient(a, b, routing, chosen, dtype=a.dtype, kernel="cuda", **gathers)  # noqa: E731
                    err = wgrad_error(run(), a, b, routing, **gathers)
                    if err > 1e-2:
                        raise AssertionError(f"{gradient} cuda: rel. error {err:.2e}")
                    cuda_ms = bench.time_ms(run)
                    rows.append({"preset": preset, "tokens": tokens, "gradient": gradient, "rows_per_expert": m,
                                 "kernel": "cuda", "config": None, "ms": cuda_ms,
                                 "tflops": bench.tflops(flops, cuda_ms), "rule": False})
                table.append([preset, tokens, gradient, describe_wgrad(best), times[best], describe_wgrad(chosen),
                              times.get(chosen), bench.tflops(flops, times[best]), cuda_ms,
                              bench.tflops(flops, cuda_ms) if cuda_ms else None])
                print(f"  {preset} T={tokens} {gradient}: " + ", ".join(
                    f"{describe_wgrad(c)}: {t:.3f}" for c, t in times.items()), flush=True)
    print(tabulate(table, ["preset", "tokens", "gradient", "best config", "ms", "rule's config", "rule ms",
                           "best TFLOP/s", "cuda ms", "cuda TFLOP/s"], floatfmt=".3f"))
    if args.record:
        print(f"recorded: {bench.record('tune_backward', rows, device)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=list(PRESETS), help="presets (default: the four models)")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="token counts (default: 1 64 4096 16384)")
    parser.add_argument("--out", help="tuned table to write (default: tilemoe/triton/tuned/<gpu>.json)")
    parser.add_argument("--backward", action="store_true",
                        help="time the backward's weight-gradient tiles instead (no table is written)")
    parser.add_argument("--record", action="store_true",
                        help="with --backward: record the sweep to benchmarks/results/<gpu>/tune_backward-<date>.json")
    args = parser.parse_args(argv)
    if args.record and not args.backward:
        parser.error("--record: records the --backward sweep (the forward's winners go to --out)")
    if args.out and args.backward:
        parser.error("--out: the --backward sweep writes no table (use --record to keep it)")
    if not torch.cuda.is_available():
        print("tune_triton.py tunes for a GPU: no CUDA GPU here (torch.cuda.is_available() is False).")
        return 0
    from tilemoe.triton import configs, ops

    device = torch.device("cuda")
    if args.backward:
        return tune_backward(args, configs, ops, device)
    slug = bench.slug(torch.cuda.get_device_name(device))
    out_path = Path(args.out) if args.out else configs.TUNED_DIR / f"{slug}.json"
    winners, table = [], []
    for preset in args.preset:
        cfg = tilemoe.get_preset(preset)
        weights = cfg.init_weights(device=device, dtype=torch.bfloat16, shared=False)
        for tokens in args.tokens:
            x = torch.randn(tokens, cfg.hidden, device=device).bfloat16()
            routing = tilemoe.route(tilemoe.router_logits(x, weights["router_weight"]), cfg.top_k, **cfg.router_options())
            m = tokens * cfg.top_k / cfg.experts
            bucket = configs.rule("up", m).block_m
            best_m = None
            for projection, w, n, k in (("up", weights["w_gate_up"], cfg.ffn, cfg.hidden),
                                        ("down", weights["w_down"], cfg.hidden, cfg.ffn)):
                tried = [c for c in candidates(bucket, configs) if best_m is None or c.block_m == best_m]
                times = {}
                for c in tried:
                    try:
                        times[c] = time_gemm(ops, x, routing, w, c, projection, cfg.ffn, cfg.hidden)
                    except OutOfResources as exc:  # e.g. too much shared memory for this GPU: not a candidate here
                        print(f"  skipped {c}: {str(exc).splitlines()[0]}")
                best = min(times, key=times.get)
                best_m = best.block_m
                rule_ms = times.get(configs.rule(projection, m))
                flops = 2 * tokens * cfg.top_k * n * k * (2 if projection == "up" else 1)
                winners.append({"preset": preset, "tokens": tokens, "projection": projection, "n": n, "k": k,
                                "rows_per_expert": m, "config": best.as_dict(), "ms": times[best],
                                "rule_ms": rule_ms, "tflops": bench.tflops(flops, times[best]),
                                "commit": bench.git_commit(), "timing": "cuda graph"})
                table.append([preset, tokens, projection, describe(best), times[best], rule_ms,
                              bench.tflops(flops, times[best])])
                print(f"  {preset} T={tokens} {projection}: " + ", ".join(
                    f"{describe(c)}: {t:.3f}" for c, t in times.items()), flush=True)
        del weights
        torch.cuda.empty_cache()
    print(tabulate(table, ["preset", "tokens", "GEMM", "best config", "ms", "rule ms", "TFLOP/s"], floatfmt=".3f"))
    payload = {**bench.environment(device), "configs": merged(out_path, winners)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
