"""An NVIDIA GPU's SM clock, read through NVML, for the throttle guard.

A GPU that hits its power or thermal limit lowers its SM clock, and a sample taken then measures
the throttled device, not the code. Like nvbench's throttle guard, the harness drops a sample when
the SM clock read right after it is below a fraction (``MeasureConfig.throttle_threshold``,
0.75 by default) of the device's maximum SM clock. This module only reads the clock; the harness
decides (:func:`kvmicro.harness.measure.measure`).

NVML comes from the optional ``nvidia-ml-py`` package (imported as ``pynvml``). Where it is not
installed, or NVML cannot reach the device, there is no clock: :func:`sm_clock` returns None,
:func:`sm_clock_status` says why, and no sample is dropped as throttled. Devices are found by PCI
bus id, which CUDA and NVML number alike (their device indices can differ).
"""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_clocks: dict[str, SmClock | None] = {}
_problems: dict[str, str] = {}


class SmClock:
    """The current SM clock of one GPU as a fraction of its maximum."""

    def __init__(self, nvml: Any, handle: Any, bus_id: str) -> None:
        self._nvml = nvml
        self._handle = handle
        self.bus_id = bus_id
        self.max_mhz = int(nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM))
        if self.max_mhz <= 0:
            raise ValueError(f"NVML reports a maximum SM clock of {self.max_mhz} MHz")

    def mhz(self) -> int:
        return int(self._nvml.nvmlDeviceGetClockInfo(self._handle, self._nvml.NVML_CLOCK_SM))

    def fraction(self) -> float:
        """Current SM clock / maximum SM clock, read now (tens of µs: outside any timed window)."""
        return self.mhz() / self.max_mhz

    def describe(self) -> str:
        return f"NVML SM clock of {self.bus_id}, max {self.max_mhz} MHz"


def _open(bus_id: str) -> SmClock:
    import pynvml  # the nvidia-ml-py package

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
    return SmClock(pynvml, handle, bus_id)


def sm_clock(bus_id: str) -> SmClock | None:
    """The SM clock of the GPU at PCI ``bus_id`` ("0000:3B:00.0"), opened once per process, or
    None where NVML cannot read it (:func:`sm_clock_status` says why)."""
    if not bus_id:
        return None
    with _lock:
        if bus_id not in _clocks:
            try:
                _clocks[bus_id] = _open(bus_id)
            except ImportError:
                _clocks[bus_id] = None
                _problems[bus_id] = "no pynvml (install nvidia-ml-py for the throttle guard)"
            except Exception as err:  # NVMLError and friends: any failure means "no clock"
                _clocks[bus_id] = None
                _problems[bus_id] = f"NVML cannot read {bus_id}: {err}"
        return _clocks[bus_id]


def sm_clock_status(bus_id: str) -> str:
    """What the throttle guard reads for the GPU at ``bus_id``, or why it reads nothing."""
    if not bus_id:
        return "no PCI bus id for this device: no throttle guard"
    clock = sm_clock(bus_id)
    return clock.describe() if clock is not None else _problems.get(bus_id, "unavailable")


def torch_bus_id(props: Any) -> str:
    """The PCI bus id of a ``torch.cuda.get_device_properties`` result ("" if torch lacks it)."""
    try:
        return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    except AttributeError:
        return ""


__all__ = ["SmClock", "sm_clock", "sm_clock_status", "torch_bus_id"]
