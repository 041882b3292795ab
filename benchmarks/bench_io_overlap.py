"""
IO overlap, measured: lesson 3's ladder over the presets' expert GEMMs
======================================================================

What you will learn: how much time each overlap step removes from a grouped GEMM at real MoE
sizes. The program ``examples/03_io_overlap/io_overlap`` (built by CMake) runs six kernels on one
problem, checks each against an fp32 reference and times it; this script runs it on the up- and
down-projection of each preset and records the rungs:

- ``a``  load, then compute (one shared-memory stage, mma.sync);
- ``b``  double buffering (two cp.async stages); ``b4`` four stages (lesson 2's tiled kernel);
- ``c``  TMA copies into a 4-stage mbarrier ring, wgmma; a compute thread issues the copies;
- ``d``  warp specialization: a producer warp issues them, two consumer warpgroups compute;
- ``e``  the epilogue through shared memory and TMA stores (3 stages): the package's kernel.

Run it (on a GPU, after ``cmake -S examples/03_io_overlap -B build/03 && cmake --build build/03``)::

    python benchmarks/bench_io_overlap.py --record          # the four model presets at 16384 tokens
    python benchmarks/bench_io_overlap.py --preset olmoe-1b-7b --tokens 4096
    python benchmarks/bench_io_overlap.py --table results/nvidia-h200/io_overlap-<date>.json

Rows are routed tokens x top-k, split over the experts at random (balanced: every expert about
M/E rows, ragged). Prints each run's table; ``--record`` writes every rung's time, TFLOP/s, the
time it removed from the rung above it and its check to benchmarks/results/<gpu>/io_overlap-<date>.json;
``--table`` prints the README's markdown from recorded files. Exits 1 if any rung's check fails.
Without a GPU or the built program it says so and exits 0 (there is nothing to measure).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

import tilemoe
from bench_grouped_gemm import GEMMS, gemm_shape  # the presets' two expert GEMMs, as lesson 2's benchmark has them
from tilemoe import bench

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROGRAM = REPO / "build" / "03" / "io_overlap"
PRESETS = ("mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b", "olmoe-1b-7b")
RUNGS = ("a", "b", "b4", "c", "d", "e")
# One line of the program's table: rung, what it is, ms, TFLOP/s, ms removed (or -), check.
ROW = re.compile(r"^(a|b|b4|c|d|e)\s+(.+?)\s+([0-9.]+)\s+([0-9.]+)\s+(-|-?[0-9.]+)\s+(PASS|FAIL)\s*$")
SKIPPED = re.compile(r"^(a|b|b4|c|d|e)\s+(.+?)\s+-\s+-\s+-\s+(skipped: .*)$")


def parse(output: str) -> list[dict]:
    """The rungs of one io_overlap run, from its printed table."""
    rows = []
    for line in output.splitlines():
        if m := ROW.match(line):
            rung, what, ms, tflops, removed, check = m.groups()
            rows.append({"rung": rung, "kernel": what, "ms": float(ms), "tflops": float(tflops),
                         "removed_ms": None if removed == "-" else float(removed), "check": check})
        elif m := SKIPPED.match(line):
            rows.append({"rung": m[1], "kernel": m[2], "ms": None, "tflops": None, "removed_ms": None, "check": m[3]})
    return rows


def run(program: Path, cfg: tilemoe.MoEConfig, gemm: str, tokens: int, reps: int) -> tuple[list[str], str, int]:
    n, k = gemm_shape(cfg, gemm)
    cmd = [str(program), "--experts", str(cfg.experts), "--tokens", str(tokens * cfg.top_k), "--n", str(n),
           "--k", str(k), "--reps", str(reps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return cmd, proc.stdout + proc.stderr, proc.returncode


def table_markdown(files: list) -> str:
    """Per recorded run: one table per preset and GEMM, a row per rung (ms, TFLOP/s, removed)."""
    parts = []
    for path in map(Path, files):
        run_ = json.loads(path.read_text())
        link = bench.link_from(Path(__file__).parent, path)
        parts.append(f"{run_['gpu'] or run_['device']}, commit {run_['commit'][:7]}, `{run_['command']}`, "
                     f"{run_['date'][:10]}; [{path.name}]({link}). Each table is one run of the program on one "
                     "problem: every rung checked against the fp32 reference, median of its timed runs; "
                     "\"removed\" is the time it took off the rung above it.")
        rows = run_["rows"]
        for key in dict.fromkeys((r["preset"], r["gemm"]) for r in rows):
            same = [r for r in rows if (r["preset"], r["gemm"]) == key]
            first = same[0]
            lines = [f"**{key[0]} {key[1]}** ({first['tokens']} tokens: M={first['rows']}, E={first['experts']}, "
                     f"N={first['N']}, K={first['K']})", "",
                     "| rung | kernel | ms | TFLOP/s | removed (ms) | check |", "|---|---|---|---|---|---|"]
            for r in same:
                ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
                tf = "-" if r["tflops"] is None else f"{r['tflops']:.0f}"
                removed = "-" if r["removed_ms"] is None else f"{r['removed_ms']:+.3f}"
                lines.append(f"| {r['rung']} | {r['kernel']} | {ms} | {tf} | {removed} | {r['check']} |")
            parts.append("\n".join(lines))
    return bench.generated_block("benchmarks/bench_io_overlap.py", files, "\n\n".join(parts))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", choices=list(tilemoe.PRESETS), default=list(PRESETS),
                        metavar="PRESET", help=f"presets (default: {' '.join(PRESETS)})")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens; the GEMMs have tokens x top-k rows (default 16384)")
    parser.add_argument("--gemm", nargs="+", choices=GEMMS, default=list(GEMMS), help="which GEMMs (default: both)")
    parser.add_argument("--reps", type=int, default=20, help="timed runs per rung, the median reported (default 20)")
    parser.add_argument("--program", type=Path, default=DEFAULT_PROGRAM,
                        help=f"the built io_overlap program (default: {bench.repo_path(DEFAULT_PROGRAM)})")
    bench.add_output_options(parser)
    args = parser.parse_args(argv)
    if args.table:
        return bench.print_tables(parser, table_markdown, args.table)
    if args.tokens < 1:
        parser.error(f"--tokens: expected an int >= 1, got {args.tokens}")
    if args.reps < 1:
        parser.error(f"--reps: expected an int >= 1, got {args.reps}")
    if not torch.cuda.is_available():
        print("bench_io_overlap: needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure")
        return 0
    if not args.program.is_file():
        print(f"bench_io_overlap: {args.program} is not built; build it with "
              "`cmake -S examples/03_io_overlap -B build/03 && cmake --build build/03`")
        return 0

    rows, failed = [], False
    for preset in args.preset:
        cfg = tilemoe.get_preset(preset)
        for gemm in args.gemm:
            cmd, output, code = run(args.program, cfg, gemm, args.tokens, args.reps)
            print(f"$ {' '.join(cmd)}\n{output}")
            rungs = parse(output)
            if code != 0 or not rungs:
                failed = True
            n, k = gemm_shape(cfg, gemm)
            for r in rungs:
                failed = failed or r["check"] == "FAIL"
                rows.append({"preset": preset, "gemm": gemm, "tokens": args.tokens, "rows": args.tokens * cfg.top_k,
                             "experts": cfg.experts, "N": n, "K": k, **r, "exit_code": code})
    if args.record:
        path = bench.record("io_overlap", rows, "cuda", extra={"program": bench.repo_path(args.program),
                                                              "reps": args.reps})
        print(f"recorded: {bench.repo_path(path)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
