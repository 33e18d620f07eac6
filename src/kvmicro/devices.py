"""The devices one sweep spreads over (``kvmicro sweep --devices``): which they are, how a worker
is pinned to one, and how the points are dealt out.

A :class:`Device` is a GPU (``cuda:1``, numbered as this process sees them) or, for tests and
CPU-only hosts, one CPU core (``cpu:0``). Each device gets its own worker processes, which run at
the same time as the other devices' (the processes of one device still run one after another:
two measurements never share a device). The pinning is the worker's environment and affinity, so
the backend inside sees exactly one device and needs no index:

- ``cuda:i``: ``CUDA_VISIBLE_DEVICES`` names GPU ``i`` alone (the parent's own
  ``CUDA_VISIBLE_DEVICES``, when set, is honoured: ``cuda:i`` is its i-th entry);
- ``cpu:c``: the worker calls ``os.sched_setaffinity`` for core ``c`` and its thread pools are
  told to use one thread.

Records name the device as the host numbers it (``device_index``) and, for a GPU, its PCI bus id.

:func:`deal` gives every device whole shape groups (a group is all ops, layouts and backends of a
shape, ``sdpa_contiguous`` first, so an overhead never divides numbers of two devices), balanced
by :func:`~kvmicro.points.point_weight`: largest group first to the least-loaded device. It is
deterministic, and each device keeps the groups in run order (cheapest first).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidCase, Unsupported
from .points import Point, point_weight, shape_key

#: device kinds ``--devices`` accepts
DEVICE_KINDS: tuple[str, ...] = ("cuda", "cpu")


@dataclass(frozen=True, order=True)
class Device:
    """One device of a multi-device sweep: ``kind`` ``"cuda"`` (index as this process numbers
    the GPUs) or ``"cpu"`` (index = a CPU core)."""

    kind: str
    index: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.index}"

    def environment(self, parent: dict[str, str] | None = None) -> dict[str, str]:
        """The variables a worker pinned to this device gets on top of the parent's."""
        env = dict(os.environ if parent is None else parent)
        if self.kind == "cuda":
            visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",")
                       if v.strip()]
            if visible:
                if self.index >= len(visible):
                    raise InvalidCase(f"--devices {self}: CUDA_VISIBLE_DEVICES="
                                      f"{env['CUDA_VISIBLE_DEVICES']} shows {len(visible)} GPU(s)")
                return {"CUDA_VISIBLE_DEVICES": visible[self.index]}
            return {"CUDA_VISIBLE_DEVICES": str(self.index)}
        # one core: thread pools that size themselves from the core count would oversubscribe it
        return {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    @property
    def cores(self) -> list[int] | None:
        """The CPU cores a worker on this device is confined to (None: any)."""
        return [self.index] if self.kind == "cpu" else None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "index": self.index, "cores": self.cores}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Device:
        return cls(str(d["kind"]), int(d["index"]))


def gpu_count() -> int:
    """CUDA GPUs this process can see, found without initialising CUDA (a process whose CUDA is
    initialised no longer honours a CUDA_VISIBLE_DEVICES set later, and pinning sets it): the
    entries of ``CUDA_VISIBLE_DEVICES`` when set, else the driver's ``/proc/driver/nvidia/gpus``
    entries (Linux), else NVML's count (nvidia-ml-py), else 0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"])
    for probe in (_proc_count, _nvml_count):
        count = probe()
        if count:
            return count
    return 0


def _proc_count() -> int:
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:   # not Linux, or no NVIDIA driver
        return 0


def _nvml_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:   # no nvidia-ml-py, or no driver: no GPU to count
        return 0


def parse_devices(text: str) -> list[Device]:
    """``all`` (every visible GPU), or a comma-separated list: ``cuda:0,cuda:1`` or
    ``cpu:0,cpu:1`` (CPU cores: fake devices for tests and CPU-only hosts). One kind per list,
    each device once."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise InvalidCase("--devices is empty; give all, or a list such as cuda:0,cuda:1")
    if items == ["all"]:
        count = gpu_count()
        if not count:
            raise Unsupported("--devices all: no CUDA GPU is visible here (for CPU cores give "
                              "them by name: --devices cpu:0,cpu:1)")
        return [Device("cuda", i) for i in range(count)]
    devices: list[Device] = []
    for item in items:
        kind, sep, index = item.partition(":")
        if not sep or kind not in DEVICE_KINDS or not index.isdigit():
            raise InvalidCase(f"--devices: {item!r} is not a device; expected all, or a list "
                              "such as cuda:0,cuda:1 or cpu:0,cpu:1")
        devices.append(Device(kind, int(index)))
    kinds = {d.kind for d in devices}
    if len(kinds) > 1:
        raise InvalidCase(f"--devices {text}: one kind of device per sweep (got "
                          f"{', '.join(sorted(kinds))})")
    repeated = sorted({str(d) for d in devices if devices.count(d) > 1})
    if repeated:
        raise InvalidCase(f"--devices {text}: {', '.join(repeated)} given twice (two workers "
                          "on one device would perturb each other)")
    kind = devices[0].kind
    if kind == "cpu" and hasattr(os, "sched_getaffinity"):
        allowed = os.sched_getaffinity(0)
        missing = [str(d) for d in devices if d.index not in allowed]
        if missing:
            raise InvalidCase(f"--devices: {', '.join(missing)}: no such core for this process "
                              f"(it may run on cores {', '.join(map(str, sorted(allowed)))})")
    elif kind == "cuda":
        count = gpu_count()
        missing = [str(d) for d in devices if count and d.index >= count]
        if missing:
            raise InvalidCase(f"--devices: {', '.join(missing)}: this host shows {count} GPU(s)")
    return devices


def backend_kind(backend: str) -> str:
    """The device kind of a backend name: ``native:cuda`` -> ``cuda``."""
    from .backends.registry import split_name

    return split_name(backend)[0].split(":")[1]


def check_backends(points: Sequence[Point], devices: Sequence[Device]) -> None:
    """Every point's backend must measure the devices' kind and name no device index itself
    (``--devices`` picks the device)."""
    from .backends.registry import split_name

    kind = devices[0].kind
    for backend in dict.fromkeys(p.case.backend for p in points):
        base, index = split_name(backend)
        if index is not None:
            raise InvalidCase(f"--devices picks the devices: give backend {base}, not {backend}")
        if backend_kind(backend) != kind:
            raise InvalidCase(f"--devices {kind}:...: backend {backend} does not run on a "
                              f"{kind} device; sweep it separately, without --devices")


def groups_of(points: Sequence[Point]) -> list[list[Point]]:
    """Consecutive points of one shape (all backends, ops, layouts and placements of it): the
    unit that is never split between devices."""
    out: list[list[Point]] = []
    for p in points:
        if out and shape_key(p.case)[1:] == shape_key(out[-1][0].case)[1:]:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def deal(points: Sequence[Point], devices: Sequence[Device]) -> dict[Device, list[Point]]:
    """``points`` dealt to ``devices`` in whole shape groups, balanced by weight: the heaviest
    group first goes to the device with the least weight so far (ties: the first device); each
    device's groups stay in run order."""
    if not devices:
        raise InvalidCase("deal: no device")
    groups = groups_of(points)
    weights = [sum(point_weight(p) for p in g) for g in groups]
    load = {d: 0.0 for d in devices}
    owner: dict[int, Device] = {}
    for g in sorted(range(len(groups)), key=lambda i: (-weights[i], i)):
        device = min(devices, key=lambda d: (load[d], devices.index(d)))
        owner[g] = device
        load[device] += weights[g]
    return {d: [p for g, group in enumerate(groups) if owner[g] == d for p in group]
            for d in devices}


def on_device(point: Point, device: Device) -> Point:
    """``point`` with its backend naming ``device``'s index (``native:cuda`` ->
    ``native:cuda:1``): the same case asked of one device in particular, a different record
    identity from the same case on another device (agreement checks)."""
    from dataclasses import replace

    case = point.case.with_(backend=f"{point.case.backend}:{device.index}")
    return replace(point, case=case)


def off_device(point: Point) -> Point:
    """The inverse of :func:`on_device`: the backend without its index (inside a worker pinned
    to the device, the only device it sees)."""
    from dataclasses import replace

    from .backends.registry import split_name

    base, index = split_name(point.case.backend)
    if index is None:
        return point
    return replace(point, case=point.case.with_(backend=base))


__all__ = ["DEVICE_KINDS", "Device", "backend_kind", "check_backends", "deal", "gpu_count",
           "groups_of", "off_device", "on_device", "parse_devices"]
