"""Where the GPU time of one MoE forward goes: every kernel it launches, with its share of the time.

The companion of profile_host.py (which says where the *host* time goes). torch.profiler records
a few forwards; this prints, per kernel name, how many times one forward launches it, its GPU
microseconds per forward and its share, plus the forward's wall time, so you can see what
separates a layer from its floor (router? metadata? the two GEMMs? the combine?).

    python tools/profile_kernels.py --preset qwen3-30b-a3b --tokens 16384            # triton
    python tools/profile_kernels.py --preset deepseek-v3 --tokens 16384 --backend grouped_mm
    python tools/profile_kernels.py                          # CPU: small preset, torch ops' CPU time

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, choices=sorted(tilemoe.PRESETS),
                        help="model shape (default: qwen3-30b-a3b on a GPU, small on a CPU)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens (default: 16384 on a GPU, 64 on a CPU)")
    parser.add_argument("--backend", default=None, choices=sorted(tilemoe.BACKENDS),
                        help="default: triton on a GPU, torch on a CPU")
    parser.add_argument("--calls", type=int, default=5, help="forwards recorded (default: 5)")
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
    w = cfg.init_weights(device=device, dtype=dtype, shared=False)
    x = torch.randn(tokens, cfg.hidden, device=device).to(dtype)

    def forward():
        return tilemoe.moe_forward(x, **w, top_k=cfg.top_k, backend=backend, **cfg.router_options())

    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.no_grad():
        for _ in range(3):  # compile and warm up outside the profile
            forward()
        if on_gpu:
            torch.cuda.synchronize()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.calls):
                forward()
            if on_gpu:
                torch.cuda.synchronize()
        wall_ms = bench.time_ms(forward, device=device)  # unprofiled: the profiler slows the host

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
          f"{wall_ms:.3f} ms per forward timed by tilemoe.bench, {len(rows)} distinct "
          f"{'kernels' if on_gpu else 'operators'}")
    print(tabulate(rows, ["kernel" if on_gpu else "operator", "calls/fwd", "us/fwd", "%"], floatfmt=".1f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
