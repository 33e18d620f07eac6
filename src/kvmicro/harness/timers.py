"""Timers: what one sample is. One class per kind; each owns its clock and its sync, and its name
goes into the record (compare only like with like).

========= ==========================================================================================
timer     one sample
========= ==========================================================================================
host      wall time from ``run()`` to the end of ``sync()``, one op: what a synchronous caller pays
batched   ``k`` ``run()`` back-to-back, one ``sync()``, wall / k: a decode loop's steady state with
          dispatch amortised; ``k`` is calibrated so that a sample lasts >= ~1 ms
device    one op between device-side markers, from the backend's own clock (CUDA events, Metal GPU
          timestamps, a C++ steady clock): no Python in the window
graph     ``k`` ops captured once and replayed, time / k: device time without launch gaps
========= ==========================================================================================

Python clocks are ``time.perf_counter_ns`` (monotonic, ns resolution). The cache policy's
``before_sample`` runs before the clock starts; under ``cold:rotate`` the batched timer switches
copies between its ``k`` ops (``select``), which is inside its window by necessity: a backend's
``select`` must be a pointer swap.

Under ``cold:rotate`` the graph timer's graph replays op ``i`` on copy ``i % copies``. So that
every prepared copy runs and no copy comes back early across the end of a replay, its calibrated
``k`` is rounded to a whole number of cycles through the copies when that fits its bound (up, or
down to one cycle at least); when the copies outnumber the bound, only ``k`` of them run, and the
record's cache policy says so (``copies_replayed``, ``reuse_distance``, ``cold_enough``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from itertools import repeat
from time import perf_counter_ns
from typing import TYPE_CHECKING, ClassVar

from ..backends.base import Prepared
from ..errors import InvalidCase, Unsupported
from .cache import MULTI_OP_TIMERS, CachePolicy

if TYPE_CHECKING:
    from .noise import HostGuard

#: upper bounds on ops per sample (a batched run of an empty closure needs ~15k for 1 ms)
BATCHED_MAX_K = 1 << 16
GRAPH_MAX_K = 512


class Timer(ABC):
    """Takes one sample of a prepared case, in µs per op."""

    name: ClassVar[str] = ""
    #: whether ``k`` (ops per sample) is calibrated; single-op timers keep k = 1
    calibrated: ClassVar[bool] = False
    default_max_k: ClassVar[int] = 1

    #: whether sample() brackets its own timed window with ``guard`` (the Python clocks); the
    #: device clocks' windows are inside the backend, so the measure loop brackets the whole call
    guards_window: ClassVar[bool] = False

    def __init__(self) -> None:
        #: ops per sample
        self.k = 1
        #: the host-noise guard (harness/noise.py) to bracket the timed window with, if any
        self.guard: HostGuard | None = None
        #: why the guard called the last sample disturbed ("" when it did not)
        self.disturbed = ""

    def _window_begin(self) -> None:
        if self.guard is not None:
            self.guard.begin()

    def _window_end(self) -> None:
        self.disturbed = self.guard.end() if self.guard is not None else ""

    def check(self, prepared: Prepared, cache: CachePolicy) -> None:
        """Refuse, before any work, a prepared case or cache policy this timer cannot serve."""
        if self.name not in prepared.timers:
            raise Unsupported(f"[measure] backend {prepared.case.backend} has no {self.name!r} "
                              f"timer (it has {', '.join(prepared.timers) or 'none'})")
        if self.name in MULTI_OP_TIMERS and cache.flush_bytes and not cache.rotates:
            raise InvalidCase(
                f"[measure] cache {cache.name} cannot keep the {self.name} timer's back-to-back "
                "ops cold (a flush reaches only the first); use cache cold:rotate, or cold with "
                "the timer given to make_cache_policy")

    def calibrate(self, prepared: Prepared, cache: CachePolicy, target_s: float,
                  max_k: int | None = None) -> int:
        """Set and return ``k`` so that one sample lasts at least ``target_s`` (bounded by
        ``max_k``). Each step times samples at the current k and scales k by what is missing."""
        self.k = 1
        if not self.calibrated:
            return 1
        limit = max(1, min(max_k or self.default_max_k, self.default_max_k))
        for _ in range(64):
            # the fastest of three: one preempted sample must not make k too small
            per_op_us = min(self.sample(prepared, cache) for _ in range(3))
            total_s = per_op_us * self.k * 1e-6
            if total_s >= target_s or self.k >= limit:
                break
            # one sync's latency dominates small k: grow at least 2x so k escapes it quickly
            wanted = math.ceil(self.k * target_s / max(total_s, 1e-9) * 1.1)
            self.k = min(limit, max(2 * self.k, wanted))
        return self.k

    @abstractmethod
    def sample(self, prepared: Prepared, cache: CachePolicy) -> float:
        """One sample in µs per op. Prepares the cache outside the timed window."""


class HostTimer(Timer):
    """perf_counter around ``run(); sync()`` of one op."""

    name = "host"
    guards_window = True

    def sample(self, prepared: Prepared, cache: CachePolicy) -> float:
        cache.before_sample(prepared)
        run, sync = prepared.run, prepared.sync
        self._window_begin()
        t0 = perf_counter_ns()
        run()
        sync()
        t1 = perf_counter_ns()
        self._window_end()
        return (t1 - t0) / 1e3


class BatchedTimer(Timer):
    """perf_counter around ``k`` runs and one sync, divided by ``k``."""

    name = "batched"
    calibrated = True
    default_max_k = BATCHED_MAX_K
    guards_window = True

    def sample(self, prepared: Prepared, cache: CachePolicy) -> float:
        run, sync, k = prepared.run, prepared.sync, self.k
        if cache.rotates and prepared.copies > 1:
            order = cache.schedule(prepared, k)  # type: ignore[attr-defined]
            select = prepared.select
            self._window_begin()
            t0 = perf_counter_ns()
            for copy in order:
                select(copy)
                run()
            sync()
            t1 = perf_counter_ns()
        else:
            cache.before_sample(prepared)
            self._window_begin()
            t0 = perf_counter_ns()
            for _ in repeat(None, k):
                run()
            sync()
            t1 = perf_counter_ns()
        self._window_end()
        return (t1 - t0) / 1e3 / k


class DeviceTimer(Timer):
    """The backend's device clock around one op; a flush happens on the device, in C++, before
    the start marker (``device_times(1, flush_bytes)``)."""

    name = "device"

    def sample(self, prepared: Prepared, cache: CachePolicy) -> float:
        cache.rotate(prepared)
        times = prepared.device_times(1, cache.flush_bytes)
        if len(times) != 1:
            raise InvalidCase(f"[measure] {prepared.case.backend} device_times(1) returned "
                              f"{len(times)} samples")
        return float(times[0])


class GraphTimer(Timer):
    """``k`` ops captured once and replayed on the device clock, per op. Under a rotating policy
    the replay cycles through the prepared copies itself (op ``i`` on copy ``i % copies``,
    nothing from Python); otherwise all ``k`` ops use the current copy, so a case prepared with
    copies for a cold policy still measures hot under ``hot``."""

    name = "graph"
    calibrated = True
    default_max_k = GRAPH_MAX_K

    def calibrate(self, prepared: Prepared, cache: CachePolicy, target_s: float,
                  max_k: int | None = None) -> int:
        """The base calibration, then, under a rotating policy, ``k`` rounded to whole cycles
        through the copies (see the module docstring)."""
        k = super().calibrate(prepared, cache, target_s, max_k)
        copies = prepared.copies
        if cache.rotates and copies > 1 and k % copies:
            limit = max(1, min(max_k or self.default_max_k, self.default_max_k))
            up = -(-k // copies) * copies
            if up <= limit:
                k = up
            elif k > copies:
                k = k // copies * copies
            self.k = k
        return self.k

    def sample(self, prepared: Prepared, cache: CachePolicy) -> float:
        # tell the policy what this replay runs, so that its record claims only that
        cache.graph_schedule(prepared, self.k)
        times = prepared.graph_times(1, self.k, rotate=cache.rotates)
        if len(times) != 1:
            raise InvalidCase(f"[measure] {prepared.case.backend} graph_times(1, {self.k}) "
                              f"returned {len(times)} samples")
        return float(times[0])


TIMER_CLASSES: dict[str, type[Timer]] = {
    "host": HostTimer,
    "batched": BatchedTimer,
    "device": DeviceTimer,
    "graph": GraphTimer,
}


def make_timer(name: str) -> Timer:
    """A fresh timer of kind ``name`` (timers hold their calibrated k)."""
    cls = TIMER_CLASSES.get(name)
    if cls is None:
        raise InvalidCase(f"unknown timer {name!r}; expected one of {', '.join(TIMER_CLASSES)}")
    return cls()


__all__ = [
    "BATCHED_MAX_K",
    "GRAPH_MAX_K",
    "TIMER_CLASSES",
    "BatchedTimer",
    "DeviceTimer",
    "GraphTimer",
    "HostTimer",
    "Timer",
    "make_timer",
]
