"""The host-noise guard: was this sample disturbed by other work on the machine?

A CPU timing taken while another process held the core, or while the hypervisor ran someone
else's vCPU, measures the neighbour, not the code. The guard looks at each sample from outside
its timed window (it reads before and after the timer's whole sample) and names what disturbed
it, so that the measure loop drops and counts the sample like a throttled one:

- ``preempted``: this process's threads waited on a run queue (runnable, no CPU) for more than
  ``wait_fraction`` of the sample's wall time and at least ``min_wait_us``. Read from
  ``/proc/self/task/*/schedstat`` (nanoseconds of run-queue wait per thread): the direct
  evidence that a competing process took our CPU during the sample.
- ``steal``: the hypervisor reported stolen time (the ``steal`` column of ``/proc/stat``) during
  the sample. Stolen time looks like run time to the guest, so no per-thread figure shows it.

Beside the per-sample verdict the guard keeps a view of the host for the record: CPU time used
by other processes (``/proc/stat`` busy time minus this process's ``/proc/self/stat``), steal,
and the load average against the cores this process may use (``os.sched_getaffinity``).
:func:`host_load` probes the same for a run's provenance and :func:`announce_if_busy` says,
once per process, that the host is busy and what to do.

Where ``/proc`` is missing (macOS, Windows) the guard is off and says so (``why_off``); samples
are then never called disturbed. The thresholds were calibrated on the 2-core development VM
while other work ran (docs/methodology.md): they keep samples that a busy neighbour did not touch,
so measuring on such a machine stays possible.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

#: a sample is ``preempted`` when run-queue wait exceeds this fraction of its wall time...
WAIT_FRACTION = 0.05
#: ...and this many µs (wake-up latency of a pool's idle threads stays below it)
MIN_WAIT_US = 20.0
#: a measurement is flagged ``host-busy`` when more than this fraction of its samples was dropped
#: by the guard
BUSY_DROP_FRACTION = 0.25
#: the host is called busy when other processes use more than this many cores...
BUSY_OTHERS_CORES = 0.5
#: ...or the 1-minute load average exceeds the usable cores by this much
BUSY_LOAD_MARGIN = 0.5
#: steal is read at most this often (a /proc/stat read costs ~10 µs, and the kernel counts steal
#: in clock ticks of 10 ms anyway): samples that start sooner after the last read skip the check
STEAL_EVERY_S = 1e-3
#: the reasons the guard drops samples for
REASONS: tuple[str, ...] = ("preempted", "steal")

_PROC = "/proc"
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), or all of them where the OS has
    no affinity call."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def guard_off_reason() -> str:
    """Why the guard cannot run here ("" when it can)."""
    if not os.path.exists(f"{_PROC}/stat"):
        return f"no /proc on this platform ({sys.platform}): the host-noise guard is off"
    if not os.path.exists(f"{_PROC}/self/schedstat"):
        return "the kernel has no schedstat (CONFIG_SCHED_INFO): the host-noise guard is off"
    return ""


def _read(fd: int, size: int = 4096) -> bytes:
    return os.pread(fd, size, 0)


@dataclass
class _Cpu:
    """One reading of the machine's and this process's CPU time (clock ticks)."""

    busy: int
    steal: int
    own: int
    wall: float


def _cpu(stat_fd: int, self_fd: int) -> _Cpu:
    line = _read(stat_fd).split(b"\n", 1)[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in line[1:9])
    raw = _read(self_fd)
    fields = raw[raw.rindex(b")") + 2:].split()   # the command name may contain spaces
    own = int(fields[11]) + int(fields[12])        # utime + stime, all threads
    return _Cpu(user + nice + system + irq + softirq, steal, own, time.perf_counter())


def _others_cores(a: _Cpu, b: _Cpu) -> tuple[float, float]:
    """Cores' worth of CPU used by other processes, and steal in % of the machine's CPU time."""
    wall = b.wall - a.wall
    if wall <= 0:
        return 0.0, 0.0
    others = max(0, (b.busy - a.busy) - (b.own - a.own)) / _CLK_TCK / wall
    steal = (b.steal - a.steal) / _CLK_TCK / wall / os.cpu_count() * 100.0 if os.cpu_count() \
        else 0.0
    return others, steal


@dataclass
class HostGuard:
    """Per-sample disturbance checks; see the module docstring. ``begin()`` before a sample,
    ``end()`` after it returns the reason to drop it ("" to keep it)."""

    wait_fraction: float = WAIT_FRACTION
    min_wait_us: float = MIN_WAIT_US
    why_off: str = field(default_factory=guard_off_reason)

    def __post_init__(self) -> None:
        self._stat_fd = self._self_fd = -1
        self._task_fds: list[int] = []
        self._start: _Cpu | None = None
        self._last: _Cpu | None = None
        self._before: tuple[int, int, float] = (0, -1, 0.0)
        self._steal_read_at = -1.0
        self.checked = 0
        self.wait_us = 0.0
        self.wall_us = 0.0
        if not self.why_off:
            try:
                self._stat_fd = os.open(f"{_PROC}/stat", os.O_RDONLY)
                self._self_fd = os.open(f"{_PROC}/self/stat", os.O_RDONLY)
                self.refresh_threads()
                self._start = _cpu(self._stat_fd, self._self_fd)
            except OSError as exc:
                self.close()
                self.why_off = f"cannot read /proc ({exc}): the host-noise guard is off"

    @property
    def on(self) -> bool:
        return not self.why_off

    def refresh_threads(self) -> None:
        """Track every thread of this process (a backend's thread pool may have grown)."""
        for fd in self._task_fds:
            os.close(fd)
        self._task_fds = []
        for tid in os.listdir(f"{_PROC}/self/task"):
            try:
                self._task_fds.append(os.open(f"{_PROC}/self/task/{tid}/schedstat", os.O_RDONLY))
            except OSError:   # the thread ended between the listing and the open
                pass

    def _wait_ns(self) -> int:
        total = 0
        for fd in self._task_fds:
            try:
                total += int(_read(fd, 96).split()[1])
            except (OSError, IndexError, ValueError):
                continue   # an exited thread waits no more
        return total

    def _steal(self) -> int:
        line = _read(self._stat_fd).split(b"\n", 1)[0].split()
        return int(line[8])

    def begin(self) -> None:
        if self.on:
            now = time.perf_counter()
            steal = -1
            if now - self._steal_read_at >= STEAL_EVERY_S:
                steal, self._steal_read_at = self._steal(), now
            self._before = (self._wait_ns(), steal, time.perf_counter())

    def end(self) -> str:
        if not self.on:
            return ""
        wait, wall = self._wait_ns(), time.perf_counter()
        stolen = self._before[1] >= 0 and self._steal() > self._before[1]
        wait_us = (wait - self._before[0]) / 1e3
        wall_us = (wall - self._before[2]) * 1e6
        self.checked += 1
        self.wait_us += max(0.0, wait_us)
        self.wall_us += max(0.0, wall_us)
        if stolen:
            return "steal"
        if wait_us > self.min_wait_us and wait_us > self.wait_fraction * wall_us:
            return "preempted"
        return ""

    def summary(self) -> dict[str, Any]:
        """The host as this guard saw it since it started: for the record's ``host``."""
        out: dict[str, Any] = {"guard": "on" if self.on else "off"}
        if not self.on:
            out["why_off"] = self.why_off
            return out
        now = _cpu(self._stat_fd, self._self_fd)
        others, steal = _others_cores(self._start, now) if self._start else (0.0, 0.0)
        out.update({
            "usable_cores": usable_cores(),
            "loadavg": loadavg(),
            "others_cores": round(others, 3),
            "steal_pct": round(steal, 3),
            "wait_pct": round(100.0 * self.wait_us / self.wall_us, 3) if self.wall_us else 0.0,
            "wait_fraction": self.wait_fraction,
            "min_wait_us": self.min_wait_us,
        })
        return out

    def close(self) -> None:
        for fd in (self._stat_fd, self._self_fd, *self._task_fds):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._stat_fd = self._self_fd = -1
        self._task_fds = []

    def __del__(self) -> None:
        self.close()


# --------------------------------------------------------------------- the host, for a run

_probe_cache: tuple[float, dict[str, Any]] | None = None


def host_load(probe_s: float = 0.25, max_age_s: float = 5.0) -> dict[str, Any]:
    """The host's load now, for a run's provenance: usable cores, load average, cores' worth of
    CPU that other processes used over a ``probe_s`` sleep, steal %, and ``busy``. A probe taken
    less than ``max_age_s`` ago is reused."""
    global _probe_cache
    if _probe_cache is not None and time.monotonic() - _probe_cache[0] < max_age_s:
        return dict(_probe_cache[1])
    out: dict[str, Any] = {"guard": "on", "usable_cores": usable_cores(), "loadavg": loadavg()}
    why = guard_off_reason()
    if why:
        out.update(guard="off", why_off=why)
    else:
        stat_fd = os.open(f"{_PROC}/stat", os.O_RDONLY)
        self_fd = os.open(f"{_PROC}/self/stat", os.O_RDONLY)
        try:
            a = _cpu(stat_fd, self_fd)
            time.sleep(probe_s)
            others, steal = _others_cores(a, _cpu(stat_fd, self_fd))
        finally:
            os.close(stat_fd)
            os.close(self_fd)
        out.update(others_cores=round(others, 3), steal_pct=round(steal, 3),
                   probe_s=probe_s)
    out["busy"] = is_busy(out)
    _probe_cache = (time.monotonic(), out)
    return dict(out)


def is_busy(load: dict[str, Any]) -> bool:
    """Whether a :func:`host_load` reading shows other work competing for the CPU."""
    others = load.get("others_cores") or 0.0
    avg = load.get("loadavg")
    cores = load.get("usable_cores") or 1
    return bool(others > BUSY_OTHERS_CORES
                or (avg and avg[0] > cores + BUSY_LOAD_MARGIN))


def busy_message(load: dict[str, Any]) -> str:
    avg = load.get("loadavg")
    parts = []
    if load.get("others_cores") is not None:
        parts.append(f"other processes used {load['others_cores']:.1f} of "
                     f"{load.get('usable_cores')} usable cores")
    if avg:
        parts.append(f"load average {avg[0]:.1f}")
    return ("the host is busy (" + ", ".join(parts) + "). kvmicro drops and counts the samples "
            "that other work disturbed (dropped_why: preempted, steal) and flags records where "
            "many were (host-busy; compare calls them unsure). For numbers fit for a decision "
            "record, stop other work or measure on a quiet machine; pinning kvmicro to a free "
            "core (taskset -c N) also helps.")


class HostBusyWarning(UserWarning):
    """The host had competing load while kvmicro measured."""


_announced = False


def announce_if_busy(load: dict[str, Any]) -> bool:
    """Warn once per process, plainly, when ``load`` shows a busy host; True if it warned now."""
    global _announced
    if _announced or not load.get("busy"):
        return False
    _announced = True
    warnings.warn(HostBusyWarning(busy_message(load)), stacklevel=2)
    return True


def announce_guard_off(why: str) -> bool:
    """Say once per process that the guard is off, and why."""
    global _announced
    if _announced or not why:
        return False
    _announced = True
    warnings.warn(HostBusyWarning(f"{why}; samples disturbed by other work cannot be told "
                                  "apart: measure on a quiet machine"), stacklevel=2)
    return True


__all__ = ["BUSY_DROP_FRACTION", "MIN_WAIT_US", "REASONS", "STEAL_EVERY_S", "WAIT_FRACTION",
           "HostBusyWarning", "HostGuard", "announce_guard_off", "announce_if_busy",
           "busy_message", "guard_off_reason", "host_load", "is_busy", "loadavg", "usable_cores"]
