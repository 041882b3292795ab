"""What the GPU ran at while a benchmark timed it: the SM clock, and whether the power cap held it down.

A Hopper GPU runs dense bf16 tensor-core work into its board power limit (700 W on an H200 SXM).
The driver then lowers the SM clock until the power fits, and reports why in its "clock event
reasons" (the software power cap). So a kernel that keeps the tensor cores busier runs at a lower
clock than one that waits on memory, and a time in milliseconds says nothing about the clock it was
taken at. The benchmarks record, beside each time, the median SM clock and the share of samples in
which the power cap held it (``Sampler``).

The samples come from NVML, the driver's own library (libnvidia-ml.so.1, loaded with ctypes: no
Python package needed), read on a background thread every few milliseconds while the timed code
runs. Where NVML or a CUDA GPU is missing, there are no samples and ``Sampler.summary`` is empty.
NVML's power reading is left out of the samples: on Ampere and newer GPUs it is averaged over a
second, longer than one timed variant.

Energy has a measurement of its own (``energy_per_call``): NVML's counter of the joules the board
has drawn moves only every 100 ms or so on an H200, too coarsely for one do_bench window. So the
code runs back to back for a second and a half, and the counter's steps inside that stretch give
the board's mean power; times the time per call, the energy of one call. Under the power cap the
board draws its limit, so a call cannot take less than its energy divided by the limit: where two
ways of computing the same thing both run into the cap, the one that needs fewer joules is faster.
"""

from __future__ import annotations

import ctypes
import statistics
import threading
import time
from typing import Callable

import torch

SM_CLOCK = 1  # nvmlClockType_t NVML_CLOCK_SM
POWER_CAP = 0x4  # nvmlClocksEventReasonSwPowerCap: the clock is lowered to keep the board under its power limit
INTERVAL_S = 0.005
ENERGY_SECONDS = 1.5  # how long energy_per_call runs the code back to back
SETTLE_S = 0.15  # the counter's first step inside a run may hold energy drawn before it: skip it


def _nvml(device: torch.device) -> tuple[ctypes.CDLL, ctypes.c_void_p] | None:
    """(the NVML library, the handle of ``device``), or None where NVML cannot be loaded or the
    device is not found."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    handle = ctypes.c_void_p()
    props = torch.cuda.get_device_properties(device)
    uuid = str(getattr(props, "uuid", ""))
    uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    if nvml.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(handle)) != 0:
        return None
    return nvml, handle


def _nvml_reader(device: torch.device) -> tuple[Callable[[], tuple[int, int]], int, int] | None:
    """(read, power limit in W, highest SM clock in MHz) for ``device``: read() returns (SM clock
    in MHz, clock event reasons bitmask). None where NVML cannot be loaded or the device not found."""
    if (found := _nvml(device)) is None:
        return None
    nvml, handle = found
    reasons_fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    clock, reasons, limit, top = ctypes.c_uint(), ctypes.c_ulonglong(), ctypes.c_uint(), ctypes.c_uint()
    if (nvml.nvmlDeviceGetEnforcedPowerLimit(handle, ctypes.byref(limit)) != 0
            or nvml.nvmlDeviceGetMaxClockInfo(handle, SM_CLOCK, ctypes.byref(top)) != 0):
        return None

    def read() -> tuple[int, int]:
        nvml.nvmlDeviceGetClockInfo(handle, SM_CLOCK, ctypes.byref(clock))
        reasons_fn(handle, ctypes.byref(reasons))
        return clock.value, reasons.value

    return read, round(limit.value / 1000), top.value


class _Polling:
    """``with _Polling(read, interval_s) as p: ...`` calls read() on a background thread, first at
    once and then every interval_s, until the block ends; ``p.samples`` holds (time.perf_counter(),
    what read() returned) for every call."""

    def __init__(self, read: Callable[[], object], interval_s: float):
        self._read, self._interval = read, interval_s
        self.samples: list[tuple[float, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.perf_counter(), self._read()))
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> "_Polling":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Sampler:
    """``with Sampler(device) as s: ...`` samples the GPU's SM clock and clock event reasons while
    the block runs; ``s.summary()`` then gives {"sm_clock_mhz": the median clock, "power_capped":
    the share of samples (0 to 1) in which the power cap held the clock, "power_limit_w": the
    board's limit, "max_sm_clock_mhz": the highest SM clock it can run at}, or {} where nothing
    was sampled (a CPU, no NVML).

    read: a function returning (SM clock in MHz, reasons bitmask) to sample instead of NVML's
    (tests pass one); power_limit_w and max_sm_clock_mhz then describe its GPU."""

    def __init__(self, device: torch.device | str, *, read: Callable[[], tuple[int, int]] | None = None,
                 power_limit_w: int | None = None, max_sm_clock_mhz: int | None = None,
                 interval_s: float = INTERVAL_S):
        device = torch.device(device)
        if read is None and device.type == "cuda":
            found = _nvml_reader(device)
            if found is not None:
                read, power_limit_w, max_sm_clock_mhz = found
        self._gpu = {"power_limit_w": power_limit_w, "max_sm_clock_mhz": max_sm_clock_mhz}
        self._polling = _Polling(read, interval_s) if read is not None else None

    def __enter__(self) -> "Sampler":
        if self._polling is not None:
            self._polling.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._polling is not None:
            self._polling.__exit__(*exc)

    def summary(self) -> dict:
        samples = [value for _, value in self._polling.samples] if self._polling is not None else []
        if not samples:
            return {}
        return {"sm_clock_mhz": statistics.median(c for c, _ in samples),
                "power_capped": sum(1 for _, r in samples if r & POWER_CAP) / len(samples),
                **self._gpu}


def caption(max_sm_clock_mhz: int, power_limit_w: int, what: str = "") -> str:
    """The line above recorded clock cells (``cell``): what they mean, on which GPU."""
    return (f"SM clock while timed, MHz (at most {max_sm_clock_mhz}){what}, and in parentheses the share of "
            f"samples in which the {power_limit_w} W power cap held it down:")


def cell(sm_clock_mhz: float, power_capped: float) -> str:
    """One summary as a table shows it: '1560 (93%)'."""
    return f"{sm_clock_mhz:.0f} ({100 * power_capped:.0f}%)"


def _nvml_energy_reader(device: torch.device) -> Callable[[], int] | None:
    """read() -> the joules the board of ``device`` has drawn since the driver loaded, in mJ; None
    where NVML cannot be loaded, the device is not found or it does not count energy."""
    if (found := _nvml(device)) is None:
        return None
    nvml, handle = found
    total = ctypes.c_ulonglong()

    def read() -> int:
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle, ctypes.byref(total))
        return total.value

    return read if nvml.nvmlDeviceGetTotalEnergyConsumption(handle, ctypes.byref(total)) == 0 else None


def mean_power_w(steps: list[tuple[float, int]], start: float, end: float, settle_s: float = SETTLE_S) -> float | None:
    """The mean power in W between the energy counter's first step at least ``settle_s`` after
    ``start`` and its last step by ``end``; steps are (time in s, counter in mJ) where the counter
    moved. None when fewer than two steps fall there."""
    inside = [(t, mj) for t, mj in steps if start + settle_s <= t <= end]
    if len(inside) < 2 or inside[-1][0] == inside[0][0]:
        return None
    return (inside[-1][1] - inside[0][1]) / 1e3 / (inside[-1][0] - inside[0][0])


def energy_per_call(fn: Callable[[], object], device: torch.device | str, *, seconds: float = ENERGY_SECONDS,
                    read_energy: Callable[[], int] | None = None, poll_s: float = 0.001) -> dict:
    """{"energy_j": joules per call of fn, "power_w": the board's mean power, "loop_ms": ms per
    call}, with fn run back to back for ``seconds`` (no cache flush between calls, unlike
    ``tilemoe.bench.time_ms``) while a thread polls the energy counter; {} where there is no counter
    (a CPU, no NVML) or it did not move twice in the run.

    The power is taken between two of the counter's steps inside the run (``mean_power_w``), the
    time per call from the whole run, which ends when the GPU has finished every call.
    read_energy: a function returning the counter in mJ to poll instead of NVML's (tests pass one).
    """
    device = torch.device(device)
    if read_energy is None:
        read_energy = _nvml_energy_reader(device) if device.type == "cuda" else None
        if read_energy is None:
            return {}

    def finish() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    finish()
    with _Polling(read_energy, poll_s) as polled:
        start, calls = time.perf_counter(), 0
        while calls == 0 or time.perf_counter() - start < seconds:
            fn()
            calls += 1
        finish()
        end = time.perf_counter()
    # The counter's steps: the first reading of each new value.
    readings = polled.samples
    steps = [(t, mj) for i, (t, mj) in enumerate(readings) if i == 0 or mj != readings[i - 1][1]]
    watts = mean_power_w(steps, start, end)
    if watts is None:
        return {}
    ms = (end - start) / calls * 1e3
    return {"energy_j": watts * ms / 1e3, "power_w": watts, "loop_ms": ms}


def energy_caption(power_limit_w: int, what: str = "per call") -> str:
    """The line above recorded energy cells (``energy_cell``)."""
    return (f"Run back to back for {ENERGY_SECONDS:g} s (no cache flush between calls; NVML's energy counter): the "
            f"joules {what}, the board's mean power and the time per call. At the {power_limit_w} W limit a call "
            f"takes at least its joules over {power_limit_w} W:")


def energy_cell(energy_j: float, power_w: float, loop_ms: float) -> str:
    """One energy measurement as a table shows it: '2.12 J at 693 W, 3.065 ms'."""
    return f"{energy_j:.3g} J at {power_w:.0f} W, {loop_ms:.3f} ms"
