"""``native:metal``: kvmicro's Metal kernels (metal/*.metal) through the Objective-C++ host in
csrc/metal, on Apple GPUs only. Elsewhere every entry point raises :class:`Unsupported` with the
reason; nothing here has run on Apple hardware yet (docs/backends.md, "what ran where").

The case options are the submission axes that change behaviour under contention, each part of a
record's identity (``native:metal[storage=private,per_buffer=8]``):

=========== ====================== ============================================================
option      values (default)       what it sets
=========== ====================== ============================================================
priority    low, normal, high      the QoS class of the thread that encodes and commits:
                                   UTILITY, USER_INITIATED, USER_INTERACTIVE. Not a GPU
                                   priority: macOS has no public one for a compute queue.
storage     shared, private        MTLStorageModeShared, or Private (uploads through a blit)
queue       shared, per_stream     one MTLCommandQueue per (QoS class, in_flight) for the whole
                                   process, or one of its own per prepared case (stream)
per_buffer  1..4096 (1)            ``run()`` calls encoded into one command buffer before its
                                   commit (host and batched timers; ``sync`` commits the rest)
in_flight   1..64 (64)             the queue's maxCommandBufferCount: command buffers that may
                                   be outstanding before ``commandBuffer`` blocks
=========== ====================== ============================================================

Timers: ``host`` and ``batched`` as everywhere; ``device`` = GPUEndTime - GPUStartTime of a
command buffer holding one op; ``graph`` = k ops in one compute encoder of one command buffer,
GPU time minus an empty-buffer baseline, over k (Metal has no graphs; this is its batched GPU
timer). docs/metal-host.md says what each contains under contention.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import numpy as np

from ..errors import Unsupported
from ..workload import OPS, Case
from .base import PRIORITY_OPTION, Availability, Backend, DeviceInfo, Option, Prepared
from .common import require
from .native import _ARRAY_ARGS, _READS, NativePrepared, load_native, to_native

#: priority -> the submitting thread's QoS class (what csrc/metal/metal_context.mm sets)
QOS_CLASSES: dict[str, str] = {
    "low": "QOS_CLASS_UTILITY",
    "normal": "QOS_CLASS_USER_INITIATED",
    "high": "QOS_CLASS_USER_INTERACTIVE",
}

#: the extension's priority argument
_PRIORITY_LEVEL = {"low": -1, "normal": 0, "high": 1}

#: Metal reports no system-level-cache size; the cold policies are sized for this upper bound
#: (larger than the SLC of any Apple-silicon chip described publicly), and the device info says
#: it is assumed, not queried.
ASSUMED_SLC_BYTES = 128 * 1024 * 1024

#: what each native:metal axis controls, and what it does not (``kvmicro env`` on macOS,
#: docs/metal-host.md)
METAL_AXES: dict[str, str] = {
    "priority": "the QoS class of the thread that encodes and commits (low UTILITY, normal "
                "USER_INITIATED, high USER_INTERACTIVE): CPU scheduling of submission only. "
                "macOS has no public GPU priority for compute queues; GPU scheduling between "
                "queues and processes is not controlled",
    "queue": "shared: one MTLCommandQueue per (QoS class, in_flight) for the process; "
             "per_stream: one per prepared case. Decides which command buffers are ordered "
             "behind which; not how the GPU interleaves queues",
    "per_buffer": "run() calls encoded into one command buffer before its commit: fewer, larger "
                  "buffers (each boundary costs GPU time); not the order of dispatches inside one",
    "in_flight": "the queue's maxCommandBufferCount: command buffers outstanding before "
                 "commandBuffer blocks the submitting thread; not how many the GPU runs at once",
    "storage": "MTLStorageModeShared or Private for every buffer of a case (Private uploads "
               "through a blit); not residency (no MTLResidencySet) and not hazard tracking",
}

#: the submission options passed to C++ as text (priority travels as its own argument)
SUBMIT_KEYS: tuple[str, ...] = ("storage", "queue", "per_buffer", "in_flight")


def _not_here() -> str | None:
    """Why native:metal cannot run in this process, or None."""
    if sys.platform != "darwin":
        return f"native:metal needs macOS with Metal (this is {sys.platform})"
    try:
        native = load_native()
    except ImportError as err:
        return f"kvmicro._native is not built or does not load ({err})"
    if not native.build_info().get("metal"):
        return ("kvmicro._native was built without Metal (KVMICRO_METAL=OFF, or CMake found no "
                "Objective-C++ compiler)")
    count_fn = getattr(native, "metal_device_count", None)
    if count_fn is None:
        return "kvmicro._native has Metal but no metal_device_count()"
    if int(count_fn()) == 0:
        return "no Metal device is visible"
    return None


class NativeMetalPrepared(NativePrepared):
    """A case prepared by the Metal host. ``kernel`` (the host's describe()) names the kernels,
    the grid, storage, queue, QoS class, dispatches per command buffer and where the library
    came from (metallib or run-time compiled source)."""


class NativeMetalBackend(Backend):
    """kvmicro's Metal kernels on an Apple GPU."""

    name = "native:metal"
    ops = OPS
    timers: tuple[str, ...] = ("host", "batched", "device", "graph")
    OPTIONS: ClassVar[dict[str, Option]] = {
        "priority": Option("choice", "normal", PRIORITY_OPTION.choices,
                           help="QoS class of the submitting thread (low UTILITY, normal "
                                "USER_INITIATED, high USER_INTERACTIVE); not a GPU priority: "
                                "Metal has no public one for compute queues"),
        "storage": Option("choice", "shared", ("shared", "private"),
                          help="buffer storage mode: MTLStorageModeShared or Private"),
        "queue": Option("choice", "shared", ("shared", "per_stream"),
                        help="one command queue for the process (per QoS class) or one per "
                             "prepared case"),
        "per_buffer": Option("int", 1, minimum=1, maximum=4096,
                             help="run() calls encoded into one command buffer before commit"),
        "in_flight": Option("int", 64, minimum=1, maximum=64,
                            help="the queue's maxCommandBufferCount (command buffers in flight)"),
    }

    def __init__(self, index: int = 0) -> None:
        self.index = index

    def availability(self) -> Availability:
        problem = _not_here()
        if problem:
            return Availability(False, problem)
        count = int(load_native().metal_device_count())
        if self.index >= count:
            return Availability(False, f"Metal device {self.index} requested, {count} visible")
        return Availability(True, f"{count} Metal device(s)")

    def submit_options(self, case: Case) -> dict[str, str]:
        """What the C++ host is told for ``case``: every submission option, defaults filled in,
        as text (validated again in C++: csrc/metal/metal_device.mm parse_submit_options)."""
        typed = self.parse_options(case.options)
        return {key: str(typed[key]) for key in SUBMIT_KEYS}

    def qos_class(self, case: Case) -> str:
        """The QoS class ``case`` is submitted with."""
        return QOS_CLASSES[self.submission_priority(case)]

    def prepare(self, case: Case, arrays: dict[str, np.ndarray], copies: int = 1) -> Prepared:
        require(self, case)
        submit = self.submit_options(case)
        priority = self.submission_priority(case)
        reads = _READS[case.op]
        args = [to_native(arrays[k], case.dtype, k) if k in reads else None for k in _ARRAY_ARGS]
        op = load_native().prepare(
            "metal", case.op, case.layout, case.dtype, case.block_size, case.softmax_scale,
            *args, copies=copies, threads=0, index=self.index,
            priority=_PRIORITY_LEVEL[priority], options=submit)
        return NativeMetalPrepared(case, op, self.timers)

    def device_info(self) -> DeviceInfo:
        if _not_here() or not self.availability():
            return DeviceInfo(name="unavailable", kind="metal",
                              extra={"index": self.index, "reason": self.availability().reason})
        info: dict[str, Any] = dict(load_native().metal_device_info(self.index))
        name = str(info.pop("name", f"Metal device {self.index}"))
        info["slc_bytes"] = {"value": ASSUMED_SLC_BYTES, "source": "assumed upper bound; Metal "
                             "reports no system-level-cache size"}
        info["priority"] = "QoS class of the submitting thread; no GPU priority (none is public)"
        memory = int(info.get("working_set_bytes", 0) or 0)
        return DeviceInfo(name=name, kind="metal", cache_bytes=ASSUMED_SLC_BYTES,
                          memory_bytes=memory, extra=info)

    def versions(self) -> dict[str, str]:
        if _not_here():
            return {}
        build = load_native().build_info()
        return {"kvmicro._native": str(build["version"]), "compiler": str(build["compiler"])}

    def bandwidth(self) -> dict[str, Any]:
        problem = _not_here()
        if problem:
            raise Unsupported(problem)
        return dict(load_native().metal_bandwidth(self.index))


__all__ = ["ASSUMED_SLC_BYTES", "METAL_AXES", "QOS_CLASSES", "SUBMIT_KEYS", "NativeMetalBackend",
           "NativeMetalPrepared"]
