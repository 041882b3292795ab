"""The one timing harness and results recorder of the chapter.

    ms = time_ms(lambda: layer(x))                   # median milliseconds, on GPU or CPU
    path = record("moe_variants", rows, device)      # benchmarks/results/<gpu>/moe_variants-<date>.json

On a CUDA device, time_ms is triton.testing.do_bench's median (CUDA events, an L2 flush between
runs, warm-up first); ``cuda_graph=True`` times replays of a CUDA graph of the call instead, the
GPU's time without the host's. On the CPU it is the median of perf_counter over repeated calls.
Every recorded file carries its provenance: the device's name, library versions, the git commit,
the command that produced it and the date; README tables are generated from these files.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from . import checks

REPO_ROOT = Path(__file__).resolve().parents[1]


def time_ms(fn: Callable[[], object], *, device: torch.device | str | None = None,
            warmup_ms: float = 25.0, rep_ms: float = 100.0, cuda_graph: bool = False) -> float:
    """Median wall time of fn() in milliseconds.

    device: where fn's work runs (default: CUDA when available, else CPU). The time budgets
    are in milliseconds, as do_bench takes them; on the CPU at least 3 timed calls run.
    cuda_graph: time replays of fn recorded once in a CUDA graph (``tilemoe.graphs.record``):
    the GPU's time alone. An eager call of a small kernel measures the host that launches it
    (the Python of every launch), not the kernel. GPU only; fn must be
    capturable (no host synchronization).
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cuda_graph and device.type != "cuda":
        checks.fail("cuda_graph", "False on a device other than a CUDA GPU", f"True on {device}")
    if device.type == "cuda":
        import triton.testing

        with torch.cuda.device(device):
            if cuda_graph:
                from .graphs import record

                graph, _ = record(fn, device)
                fn = graph.replay
            return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # the first call pays for lazy initialisation; never time it
    deadline = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < deadline:
        fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Bytes one call of fn allocates beyond what was allocated before it (CUDA only, else None)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def tflops(flops: float, ms: float) -> float:
    """Achieved TFLOP/s of ``flops`` floating-point operations done in ``ms`` milliseconds."""
    return flops / (ms * 1e-3) / 1e12


def device_name(device: torch.device | str) -> str:
    """'NVIDIA H200' for a GPU; the processor's model name for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': a name fit for a folder."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    """The TILEMOE_COMMIT environment variable when set (a tree copied to a GPU machine: its .git,
    if any, may not be the tree's), else HEAD's hash with '+dirty' when tracked files differ from
    it, else 'unknown'."""
    if os.environ.get("TILEMOE_COMMIT"):
        return os.environ["TILEMOE_COMMIT"]

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device | str) -> dict:
    """Provenance of a measurement: what ran, where, with which versions."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "gpu": device_name(device) if device.type == "cuda" else None,
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": git_commit(),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["sm_count"] = props.multi_processor_count
        env["capability"] = f"{props.major}.{props.minor}"
    return env


def results_dir(device: torch.device | str) -> Path:
    """benchmarks/results/<device slug>/ in the repository."""
    name = device_name(device)
    return REPO_ROOT / "benchmarks" / "results" / slug(name if torch.device(device).type == "cuda" else "cpu")


def record(name: str, rows: list[dict], device: torch.device | str, *, out_dir: Path | str | None = None,
           extra: dict | None = None) -> Path:
    """Write rows with their provenance to <out_dir or results_dir(device)>/<name>-<UTC date>.json.

    A later run of the same name on the same day never overwrites an earlier one: it gets -2, -3, ...
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
        checks.fail("name", "a file-name stem of letters, digits, '.', '_' or '-'", repr(name))
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        checks.fail("rows", "a list of dicts", type(rows).__name__, TypeError)
    env = environment(device)
    payload = {**env, **(extra or {}), "rows": rows}
    folder = Path(out_dir) if out_dir is not None else results_dir(device)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{env['date'][:10]}"
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


# -- README tables generated from recorded runs ----------------------------------------------------

GENERATED_END = "<!-- end of generated tables -->"


def repo_path(path: Path | str) -> str:
    """The path as a README names it: relative to the repository when inside it."""
    path = Path(path).resolve()
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def link_from(folder: Path | str, path: Path | str) -> str:
    """A markdown link target to ``path`` from a README in ``folder``."""
    return Path(os.path.relpath(Path(path).resolve(), Path(folder).resolve())).as_posix()


def generated_block(script: str, files: list, body: str) -> str:
    """A README block generated by ``python <script> --table <files>``: the command in a marker
    comment first, then the markdown, then GENERATED_END. Tests compare a README's block with it."""
    command = " ".join(["python", script, "--table", *(repo_path(f) for f in files)])
    return "\n\n".join([f"<!-- generated by: {command} -->", body, GENERATED_END])


def add_output_options(parser, *, plot: str | None = None) -> None:
    """The options every benchmark script shares: --record, --table and, where ``plot`` says what
    the picture shows, --plot."""
    parser.add_argument("--record", action="store_true", help="write the rows to benchmarks/results/<device>/")
    if plot:
        parser.add_argument("--plot", metavar="PNG", help=f"write {plot} to this PNG")
    parser.add_argument("--table", nargs="+", metavar="JSON",
                        help="print the README's markdown tables from files --record wrote, and exit (runs nothing)")


def print_tables(parser, markdown, files: list) -> int:
    """``--table FILE ...`` of a benchmark script: print ``markdown(files)``; a missing or foreign
    file is a usage error naming it (argparse's exit status 2), never a traceback."""
    try:
        print(markdown(files))
    except (OSError, ValueError, KeyError) as exc:
        parser.error(f"--table: {type(exc).__name__}: {exc}")
    return 0
