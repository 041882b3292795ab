"""The exercises' grading harness: one contract for every exercises/*/test.py.

    python test.py              grades starter.py (beside test.py)
    python test.py --solution   grades solution.py
    python test.py --file PATH  grades any file

A grader is a list of checks, each a function (named test_<what> or check_<what>; the report
shows <what>) taking the loaded submission module and raising
AssertionError (with a message saying what was expected and what came) when it fails. The
harness prints one line per check and a final "N/M passed", and exits 0 only when all pass.
A stub's NotImplementedError reads "not implemented yet"; any other exception is reported in one
line, never as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import traceback
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

Check = Callable[[ModuleType], None]


def load_submission(path: Path | str) -> ModuleType:
    """Import the file at ``path`` as a fresh module (a new name each time, so files never clash)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"--file: expected an existing Python file, got {path}")
    name = f"submission_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_check(check: Check, module: ModuleType) -> tuple[bool, str]:
    """(passed, one-line detail) of one check."""
    try:
        check(module)
    except NotImplementedError:
        return False, "not implemented yet"
    except AssertionError as e:
        return False, str(e) or "assertion failed"
    except Exception as e:  # a crash: one line, at the deepest line of the submission's own file
        frames = traceback.extract_tb(e.__traceback__)
        mine = [f for f in frames if f.filename == getattr(module, "__file__", None)] or frames
        return False, f"raised {type(e).__name__}: {e} ({Path(mine[-1].filename).name}:{mine[-1].lineno})"
    return True, ""


def main(checks: list[Check], grader_file: str, argv: list[str] | None = None) -> int:
    """Parse the grader's command line, grade the chosen file, print the report, return the exit status."""
    here = Path(grader_file).resolve().parent
    parser = argparse.ArgumentParser(description=f"Grade an implementation of {here.name}: one line per test and a score.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--solution", action="store_true", help="grade solution.py instead of starter.py")
    which.add_argument("--file", metavar="PATH", help="grade this file instead of starter.py")
    args = parser.parse_args(argv)
    path = Path(args.file) if args.file else here / ("solution.py" if args.solution else "starter.py")

    if not torch.cuda.is_available():
        # The checks' tensors are tiny: one thread is fastest, and several spin-wait on a busy machine.
        torch.set_num_threads(1)
    print(f"Grading {path}")
    try:
        module = load_submission(path)
    except Exception as e:
        print(f"FAIL  import: {type(e).__name__}: {e}")
        print(f"0/{len(checks)} passed")
        return 1
    passed = 0
    for check in checks:
        torch.manual_seed(0)
        ok, detail = run_check(check, module)
        passed += ok
        name = check.__name__.removeprefix("test_").removeprefix("check_").replace("_", " ")
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + ("" if ok else f": {detail}"))
    print(f"{passed}/{len(checks)} passed")
    return 0 if passed == len(checks) else 1


def assert_close(actual: object, expected: torch.Tensor, *, rtol: float, atol: float, what: str) -> None:
    """Every element of ``actual`` within atol + rtol*|expected|; NaN/Inf never pass; shapes must match.

    The message names ``what``, the worst element, what was expected there and what came.
    """
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{what}: expected a torch.Tensor, got {type(actual).__name__}")
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: expected shape {list(expected.shape)}, got {list(actual.shape)}")
    a, e = actual.detach().to(torch.float64).cpu(), expected.detach().to(torch.float64).cpu()
    if not torch.isfinite(a).all():
        bad = tuple(int(i) for i in (~torch.isfinite(a)).nonzero()[0])
        raise AssertionError(f"{what}: expected finite values, got {a[bad].item()} at index {list(bad)}")
    excess = (a - e).abs() - (atol + rtol * e.abs())
    if excess.numel() and excess.max() > 0:
        worst = tuple(int(i) for i in torch.nonzero(excess == excess.max())[0])
        raise AssertionError(f"{what}: expected {e[worst].item():.6g} at index {list(worst)}, got {a[worst].item():.6g} "
                             f"({int((excess > 0).sum())} of {excess.numel()} elements off; rtol={rtol:g}, atol={atol:g})")


@contextlib.contextmanager
def poisoned_memory():
    """Inside: every torch.empty / empty_like / new_empty is filled with NaN, so an output buffer that is
    read before being fully written shows up as NaN instead of as whatever the memory held."""
    # torch.use_deterministic_algorithms would do, but it also imports torch._inductor (seconds on a
    # small CPU) to set a flag only compiled code reads; the grader runs eager code: set the eager flag.
    set_deterministic = getattr(torch._C, "_set_deterministic_algorithms", None) or torch.use_deterministic_algorithms
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    try:
        set_deterministic(True, warn_only=True)  # warn_only: nondeterministic CUDA ops still run
        torch.utils.deterministic.fill_uninitialized_memory = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        set_deterministic(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill_before
