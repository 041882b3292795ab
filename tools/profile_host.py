"""Where the host (Python + launch) time of eager MoE forwards goes: cProfile over repeated calls.

At decode sizes the GPU finishes each kernel in microseconds and the forward's time is what the
CPU spends issuing ~20 launches; this prints which calls cost it (cumulative time, top entries).

    python tools/profile_host.py                                   # qwen3-30b-a3b, 1 token, triton
    python tools/profile_host.py --preset olmoe-1b-7b --tokens 64 --backend grouped_mm
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys

import torch

import tilemoe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(tilemoe.PRESETS))
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--backend", default="triton", choices=sorted(tilemoe.BACKENDS))
    parser.add_argument("--calls", type=int, default=200, help="forwards profiled (default: 200)")
    parser.add_argument("--top", type=int, default=30, help="entries printed (default: 30)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = tilemoe.get_preset(args.preset)
    w = cfg.init_weights(device=device, dtype=dtype, shared=False)
    x = torch.randn(args.tokens, cfg.hidden, device=device).to(dtype)

    def forward():
        return tilemoe.moe_forward(x, **w, top_k=cfg.top_k, backend=args.backend, **cfg.router_options())

    with torch.no_grad():
        for _ in range(5):  # compile and warm up outside the profile
            forward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            forward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        profile.disable()
    stats = pstats.Stats(profile)
    print(f"{args.calls} forwards of {cfg.name}, T={args.tokens}, backend {args.backend} on {device.type}: "
          f"{stats.total_tt / args.calls * 1e3:.3f} ms of host time each")
    stats.sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
