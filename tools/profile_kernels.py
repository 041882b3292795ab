"""Where the GPU time of one MoE forward (or training step) goes: every kernel it launches, with its share.

The companion of profile_host.py (which says where the *host* time goes). torch.profiler records
a few calls; this prints, per kernel name, how many times one call launches it, its GPU
microseconds per call and its share, plus the call's wall time, so you can see what separates a
layer from its floor (router? metadata? the two GEMMs? the combine? the weight gradients?).

    python tools/profile_kernels.py --preset qwen3-30b-a3b --tokens 16384            # triton
    python tools/profile_kernels.py --preset deepseek-v3 --tokens 16384 --backend grouped_mm
    python tools/profile_kernels.py --preset olmoe-1b-7b --tokens 16384 --train      # a training step
    python tools/profile_kernels.py --preset olmoe-1b-7b --tokens 16384 --train --module --record
    python tools/profile_kernels.py                          # CPU: small preset, torch ops' CPU time

--train profiles what examples/06_full_moe/benchmark.py times as "fwd+bwd": an OptimizedMoELayer
of the preset (router, aux loss, experts) run forward and backward, x wanting its gradient too
(``tilemoe.layer.train_step``). --timeline lists one call's launches in order, so that the four
launches of one grouped GEMM kernel in a training step are told apart. --module profiles SonicMoE's
own ``MoE`` module holding the same weights instead (it routes by itself: softmax over the top-k of
bf16 logits, whatever the preset's router), the row lesson 6 and the variants benchmark compare
with. --record writes the table to benchmarks/results/<gpu>/profile_kernels-<date>.json, so that a
claim about where time goes can cite it.

On a machine without a GPU the "kernels" are the CPU operators, which is only good for checking
the script runs.
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys

import torch
from tabulate import tabulate

import tilemoe
from tilemoe import bench
from tilemoe.backends import sonic
from tilemoe.layer import train_step


def short(name: str, width: int = 64) -> str:
    """A kernel's name without its template arguments' tail, cut to ``width`` characters."""
    return name if len(name) <= width else name[: width - 3] + "..."


def forward_call(cfg, tokens: int, backend: str, device, dtype):
    """(one inference forward of moe_forward, "forward"): no autograd."""
    w = cfg.init_weights(device=device, dtype=dtype, shared=False)
    x = torch.randn(tokens, cfg.hidden, device=device).to(dtype)

    @torch.no_grad()
    def forward():
        return tilemoe.moe_forward(x, **w, top_k=cfg.top_k, backend=backend, **cfg.router_options())

    return forward, "forward"


def training_step(cfg, tokens: int, backend: str, device, dtype):
    """(one training step of the preset's OptimizedMoELayer, "training step"): the forward with its
    aux loss, then the backward into x and every weight, as lesson 6's benchmark times it."""
    layer = tilemoe.OptimizedMoELayer.from_preset(cfg, device=device, dtype=dtype, backend=backend)
    x = torch.randn(tokens, cfg.hidden, device=device).to(dtype).requires_grad_()
    dy = torch.randn(tokens, cfg.hidden, device=device).to(dtype)
    return functools.partial(train_step, layer, x, dy), "training step"


def module_call(cfg, tokens: int, train: bool, device):
    """(SonicMoE's MoE module with the preset's weights: one inference forward or one training step,
    what): as lesson 6 builds and times it (its aux loss scaled by the layer's weight)."""
    layer = tilemoe.OptimizedMoELayer.from_preset(cfg, device=device, dtype=torch.bfloat16)
    module = sonic.module_with_weights(layer.router_weight, layer.w_gate_up, layer.w_down, layer.top_k)
    x = torch.randn(tokens, cfg.hidden, device=device).to(torch.bfloat16)
    if train:
        dy = torch.randn(tokens, cfg.hidden, device=device).to(torch.bfloat16)
        return functools.partial(sonic.module_train_step, module, x.requires_grad_(), dy, layer.load_balance_weight), \
            "training step"
    return functools.partial(sonic.module_forward, module, x), "forward"


def timeline_rows(launches: list, calls: int, total_us: float) -> list[dict] | None:
    """One row per launch of one call, in launch order, each time the mean over the calls; None when
    the calls did not launch the same kernels in the same order. launches: (start, name, us), sorted."""
    per_call, extra = divmod(len(launches), calls)
    if extra:
        return None
    names = [name for _, name, _ in launches[:per_call]]
    if any(launches[c * per_call + i][1] != names[i] for c in range(calls) for i in range(per_call)):
        return None
    rows = []
    for i, name in enumerate(names):
        us = sum(launches[c * per_call + i][2] for c in range(calls)) / calls
        rows.append({"position": i + 1, "kernel": name, "us": us, "percent": 100 * us * calls / total_us if total_us else 0.0})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, choices=sorted(tilemoe.PRESETS),
                        help="model shape (default: qwen3-30b-a3b on a GPU, small on a CPU)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens (default: 16384 on a GPU, 64 on a CPU)")
    parser.add_argument("--backend", default=None, choices=sorted(tilemoe.BACKENDS),
                        help="default: triton on a GPU, torch on a CPU")
    parser.add_argument("--calls", type=int, default=5, help="calls recorded (default: 5)")
    parser.add_argument("--train", action="store_true",
                        help="profile a training step of OptimizedMoELayer (forward with the aux loss, backward)")
    parser.add_argument("--module", action="store_true",
                        help="profile SonicMoE's own MoE module with the preset's weights instead of a tilemoe backend")
    parser.add_argument("--timeline", action="store_true",
                        help="list every launch of one call in launch order (its time averaged over the calls) "
                             "instead of one row per kernel name: tells apart the launches of one kernel")
    parser.add_argument("--record", action="store_true",
                        help="write the table to benchmarks/results/<gpu>/profile_kernels-<date>.json")
    parser.add_argument("--out", default=None, help="with --record: write into this folder instead")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    preset = args.preset or ("qwen3-30b-a3b" if on_gpu else "small")
    tokens = args.tokens or (16384 if on_gpu else 64)
    if tokens < 1 or args.calls < 1:
        parser.error(f"--tokens and --calls: expected ints >= 1, got {tokens} and {args.calls}")
    if args.out is not None and not args.record:
        parser.error("--out: only with --record (it names where the recorded table goes)")
    cfg = tilemoe.get_preset(preset)
    if args.module:
        if args.backend is not None:
            parser.error(f"--module: SonicMoE's module runs its own kernels, not --backend {args.backend}")
        if why := sonic.unavailable_reason(device, torch.bfloat16, cfg.hidden, cfg.ffn):
            parser.error(f"--module: {why}")
        backend = sonic.MODULE_NAME
        call, what = module_call(cfg, tokens, args.train, device)
    else:
        backend = args.backend or ("triton" if on_gpu else "torch")
        if (why := tilemoe.backends.unavailable_reason(backend, device, dtype, cfg.hidden, cfg.ffn)) is not None:
            parser.error(f"--backend {backend}: {why}")
        call, what = (training_step if args.train else forward_call)(cfg, tokens, backend, device, dtype)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for _ in range(3):  # compile and warm up outside the profile
        call()
    if on_gpu:
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.calls):
            call()
        if on_gpu:
            torch.cuda.synchronize()
    wall_ms = bench.time_ms(call, device=device)  # unprofiled: the profiler slows the host

    launches = sorted(((event.time_range.start, event.name, event.device_time if on_gpu else event.cpu_time)
                       for event in prof.events()
                       if (event.device_type == torch.autograd.DeviceType.CUDA if on_gpu else event.cpu_parent is None)))
    total = sum(t for _, _, t in launches)
    if args.timeline:
        rows = timeline_rows(launches, args.calls, total)
        if rows is None:
            parser.exit(1, f"--timeline: the {args.calls} calls did not launch the same kernels in the same order\n")
    else:
        per_kernel = collections.defaultdict(lambda: [0, 0.0])
        for _, name, time_us in launches:
            per_kernel[name][0] += 1
            per_kernel[name][1] += time_us
        rows = sorted(({"kernel": name, "launches_per_call": n / args.calls, "us_per_call": t / args.calls,
                        "percent": 100 * t / total if total else 0.0}
                       for name, (n, t) in per_kernel.items()), key=lambda r: -r["us_per_call"])
    summary = {"preset": cfg.name, "tokens": tokens, "backend": backend, "what": what, "calls": args.calls,
               "view": "timeline" if args.timeline else "by kernel",
               "kernel_ms": total / args.calls / 1e3, "wall_ms": wall_ms,
               "times": "GPU kernel time" if on_gpu else "CPU operator time"}
    print(f"{cfg.name}, T={tokens}, backend {backend}, {bench.device_name(device)}: "
          f"{summary['kernel_ms']:.3f} ms of {'kernel' if on_gpu else 'operator'} time and "
          f"{wall_ms:.3f} ms per {what} timed by tilemoe.bench, {len(rows)} "
          f"{'launches in order' if args.timeline else 'distinct ' + ('kernels' if on_gpu else 'operators')}")
    kind = "kernel" if on_gpu else "operator"
    if args.timeline:
        print(tabulate([[r["position"], short(r["kernel"]), r["us"], r["percent"]] for r in rows],
                       ["#", kind, "us", "%"], floatfmt=".1f"))
    else:
        print(tabulate([[short(r["kernel"]), r["launches_per_call"], r["us_per_call"], r["percent"]] for r in rows],
                       [kind, "calls/call", "us/call", "%"], floatfmt=".1f"))
    if args.record:
        path = bench.record("profile_kernels", rows, device, out_dir=args.out, extra=summary)
        print(f"recorded: {bench.repo_path(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
