"""The throttle guard's clock: an NVIDIA GPU's SM clock through NVML (a fake pynvml here; the
real one is read on the GPU machine by tests/test_native_cuda.py)."""

from __future__ import annotations

import sys
import types

import pytest

from kvmicro.backends import nvml


class FakeNvmlError(Exception):
    pass


def fake_pynvml(current_mhz: int, max_mhz: int = 1980, known: str = "00000000:3B:00.0"):
    module = types.ModuleType("pynvml")
    module.NVML_CLOCK_SM = 1
    module.calls = []

    def init():
        module.calls.append("init")

    def handle(bus_id):
        if bus_id != known:
            raise FakeNvmlError(f"Not Found ({bus_id})")
        return ("handle", bus_id)

    def clock(h, kind):
        assert h == ("handle", known) and kind == module.NVML_CLOCK_SM
        return current_mhz

    def max_clock(h, kind):
        assert kind == module.NVML_CLOCK_SM
        return max_mhz

    module.nvmlInit = init
    module.nvmlDeviceGetHandleByPciBusId = handle
    module.nvmlDeviceGetClockInfo = clock
    module.nvmlDeviceGetMaxClockInfo = max_clock
    return module


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(nvml, "_clocks", {})
    monkeypatch.setattr(nvml, "_problems", {})


def test_the_clock_is_the_current_sm_clock_over_the_maximum(monkeypatch):
    fake = fake_pynvml(current_mhz=1485)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    clock = nvml.sm_clock("00000000:3B:00.0")
    assert clock is not None and clock.max_mhz == 1980
    assert clock.fraction() == pytest.approx(0.75)
    assert nvml.sm_clock("00000000:3B:00.0") is clock and fake.calls == ["init"]  # opened once
    assert nvml.sm_clock_status("00000000:3B:00.0") == \
        "NVML SM clock of 00000000:3B:00.0, max 1980 MHz"


def test_no_pynvml_means_no_clock_and_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    assert nvml.sm_clock("00000000:3B:00.0") is None
    assert "no pynvml (install nvidia-ml-py" in nvml.sm_clock_status("00000000:3B:00.0")


def test_a_device_nvml_cannot_find_has_no_clock_and_the_error_is_kept(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(current_mhz=1980))
    assert nvml.sm_clock("00000000:99:00.0") is None
    assert nvml.sm_clock_status("00000000:99:00.0") == \
        "NVML cannot read 00000000:99:00.0: Not Found (00000000:99:00.0)"


def test_a_zero_maximum_clock_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(current_mhz=0, max_mhz=0))
    assert nvml.sm_clock("00000000:3B:00.0") is None
    assert "maximum SM clock of 0 MHz" in nvml.sm_clock_status("00000000:3B:00.0")


def test_a_device_without_a_bus_id_has_no_guard():
    assert nvml.sm_clock("") is None
    assert nvml.sm_clock_status("") == "no PCI bus id for this device: no throttle guard"


def test_torch_properties_give_the_bus_id_nvml_prints():
    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0)
    assert nvml.torch_bus_id(props) == "00000000:3B:00.0"
    assert nvml.torch_bus_id(types.SimpleNamespace()) == ""
