"""Where the GPU time of one MoE forward (or training step) goes: every kernel it launches, with its share.

The companion of profile_host.py (which says where the *host* time goes). torch.profiler records
a few calls; this prints, per kernel name, how many times one call launches it, its GPU
microseconds per call and its share, plus the call's wall time, so you can see what separates a
layer from its floor (router? metadata? the two GEMMs? the combine? the weight gradients?).

    python tools/profile_kernels.py --preset qwen3-30b-a3b --tokens 16384            # triton
    python tools/profile_kernels.py --preset deepseek-v3 --tokens 16384 --backend grouped_mm
    python tools/profile_kernels.py --preset olmoe-1b-7b --tokens 16384 --train      # a training step
    python tools/profile_kernels.py                          # CPU: small preset, torch ops' CPU time

--train profiles what examples/06_full_moe/benchmark.py times as "fwd+bwd": an OptimizedMoELayer
of the preset (router, aux loss, experts) run forward and backward, x wanting its gradient too.

On a machine without a GPU the "kernels" are the CPU operators, which is only good for checking
the script runs.
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
from tabulate import tabulate

import tilemoe
from tilemoe import bench


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

    def step():
        y, aux = layer(x, return_aux_loss=True)
        (y.float().sum() + aux).backward()

    return step, "training step"


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
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    preset = args.preset or ("qwen3-30b-a3b" if on_gpu else "small")
    tokens = args.tokens or (16384 if on_gpu else 64)
    backend = args.backend or ("triton" if on_gpu else "torch")
    if tokens < 1 or args.calls < 1:
        parser.error(f"--tokens and --calls: expected ints >= 1, got {tokens} and {args.calls}")
    cfg = tilemoe.get_preset(preset)
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

    per_kernel = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        is_kernel = event.device_type == torch.autograd.DeviceType.CUDA if on_gpu else event.cpu_parent is None
        if not is_kernel:
            continue
        time_us = event.device_time if on_gpu else event.cpu_time
        per_kernel[event.name][0] += 1
        per_kernel[event.name][1] += time_us
    total = sum(t for _, t in per_kernel.values())
    rows = sorted(((short(name), n / args.calls, t / args.calls, 100 * t / total if total else 0.0)
                   for name, (n, t) in per_kernel.items()), key=lambda r: -r[2])
    print(f"{cfg.name}, T={tokens}, backend {backend}, {bench.device_name(device)}: "
          f"{total / args.calls / 1e3:.3f} ms of {'kernel' if on_gpu else 'operator'} time and "
          f"{wall_ms:.3f} ms per {what} timed by tilemoe.bench, {len(rows)} distinct "
          f"{'kernels' if on_gpu else 'operators'}")
    print(tabulate(rows, ["kernel" if on_gpu else "operator", "calls/call", "us/call", "%"], floatfmt=".1f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
