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
NVML's power reading is left out: on Ampere and newer GPUs it is averaged over a second, longer
than one timed variant.
"""

from __future__ import annotations

import ctypes
import statistics
import threading
from typing import Callable

import torch

SM_CLOCK = 1  # nvmlClockType_t NVML_CLOCK_SM
POWER_CAP = 0x4  # nvmlClocksEventReasonSwPowerCap: the clock is lowered to keep the board under its power limit
INTERVAL_S = 0.005


def _nvml_reader(device: torch.device) -> tuple[Callable[[], tuple[int, int]], int, int] | None:
    """(read, power limit in W, highest SM clock in MHz) for ``device``: read() returns (SM clock
    in MHz, clock event reasons bitmask). None where NVML cannot be loaded or the device not found."""
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
        self._read, self._interval = read, interval_s
        self._gpu = {"power_limit_w": power_limit_w, "max_sm_clock_mhz": max_sm_clock_mhz}
        self._samples: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while True:
            self._samples.append(self._read())
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> "Sampler":
        if self._read is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict:
        if not self._samples:
            return {}
        return {"sm_clock_mhz": statistics.median(c for c, _ in self._samples),
                "power_capped": sum(1 for _, r in self._samples if r & POWER_CAP) / len(self._samples),
                **self._gpu}


def caption(max_sm_clock_mhz: int, power_limit_w: int, what: str = "") -> str:
    """The line above recorded clock cells (``cell``): what they mean, on which GPU."""
    return (f"SM clock while timed, MHz (at most {max_sm_clock_mhz}){what}, and in parentheses the share of "
            f"samples in which the {power_limit_w} W power cap held it down:")


def cell(sm_clock_mhz: float, power_capped: float) -> str:
    """One summary as a table shows it: '1560 (93%)'."""
    return f"{sm_clock_mhz:.0f} ({100 * power_capped:.0f}%)"
