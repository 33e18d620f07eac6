"""A sweep: measure a grid's points in worker processes and append their records to a file.

The parts live by noun: :mod:`kvmicro.grid` (axes, presets, axis parsing), :mod:`kvmicro.points`
(points, shape groups, shards), :mod:`kvmicro.runner` (measuring one case), :mod:`kvmicro.worker`
(the processes that run it), :mod:`kvmicro.progress` (the progress line). This module is the
loop that joins them, and re-exports their names so ``from kvmicro.sweep import ...`` keeps
working.

:func:`run_sweep` plans the workers (one per device and process group, run one after another),
or, with ``lanes`` (``--devices``, :mod:`kvmicro.devices`), one set of pinned workers per device,
the devices measuring at once, each in a thread of its own; has each measure its device's
bandwidth for the run line, then sends it the points case by case
and writes each record as it arrives: append-only, flushed per record, so a killed sweep leaves a
valid file and ``--resume`` picks up where it stopped. A worker that crashes or hangs costs the
case in flight (an error record naming the signal or the timeout) and is replaced.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .devices import Device
from .grid import (
    AXIS_FIELDS,
    CACHES,
    DEFAULT_PRESET,
    PRESETS,
    Grid,
    Preset,
    get_preset,
    make_grid,
    parse_axis,
)
from .points import (
    Point,
    by_case,
    contiguous_key,
    device_kind,
    expand,
    parse_shard,
    plan_summary,
    point_key,
    point_weight,
    shape_groups,
    shape_key,
)
from .progress import Progress
from .runner import (
    DEFAULT_ROTATE_BUDGET_BYTES,
    ArrayCache,
    Runner,
    exact_check,
    is_out_of_memory,
)
from .worker import DEFAULT_CASE_TIMEOUT_S, Worker, WorkerLost, setup_message, worker_jobs


@dataclass
class Outcome:
    """What a sweep did: the file, the records it wrote this time, and counts."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    resumed: int = 0
    interrupted: bool = False
    elapsed_s: float = 0.0

    @property
    def counts(self) -> Counter[str]:
        return Counter(r.get("status", "?") for r in self.records)


def shape_runs(points: list[Point]) -> Iterator[list[Point]]:
    """Consecutive points of one shape (all backends, ops, layouts and placements of it): what
    a worker measures in one command, interleaving its cases where memory allows."""
    run: list[Point] = []
    for p in points:
        if run and shape_key(p.case)[1:] != shape_key(run[0].case)[1:]:
            yield run
            run = []
        run.append(p)
    if run:
        yield run


def _lost_record(point: Point, reason: str, device: str) -> dict[str, Any]:
    from .results import case_record

    return case_record(point.case, status="error", reason=reason, device=device,
                       extra={"timer": point.timer, "cache": point.cache})


def _baselines_in(path: Path) -> dict[tuple[Any, ...], float]:
    """The sdpa_contiguous medians already in a file being resumed (overheads of the points still
    to measure are against them)."""
    from .results import read_results
    from .workload import Case

    out: dict[tuple[Any, ...], float] = {}
    for r in read_results(path)[1]:
        if r.get("op") == "sdpa_contiguous" and r.get("status") == "ok":
            try:
                point = Point(Case.from_flat(r), r["timer"], r["cache"])
                out[contiguous_key(point)] = float(r["stats"]["median_us"])
            except Exception:   # a record this version cannot rebuild gives no baseline
                continue
    return out


class _Stopping(Exception):
    """Raised in a device's thread when the sweep is being stopped (Ctrl-C in the parent)."""


def run_sweep(points: list[Point], out: str | Path, *, argv: list[str] | None = None,
              resume: bool = False, measure: dict[str, Any] | None = None,
              progress: bool | None = None, stream: TextIO | None = None,
              rotate_budget_bytes: int = DEFAULT_ROTATE_BUDGET_BYTES,
              case_timeout_s: float = DEFAULT_CASE_TIMEOUT_S,
              lanes: Mapping[Device, list[Point]] | None = None) -> Outcome:
    """Measure ``points`` into the JSONL file ``out`` (appended, flushed per record).

    With ``resume``, points whose record is already in ``out`` are skipped. A worker that dies or
    sends nothing for ``case_timeout_s`` costs the case in flight (error records) and is replaced.
    Ctrl-C stops the workers and keeps every finished record; the file stays valid and
    ``Outcome.interrupted`` is set.

    ``lanes`` (``--devices``; :func:`kvmicro.devices.deal`) gives each device its points: every
    device gets its own workers, pinned to it, and the devices measure at the same time (the
    workers of one device still run one after another). ``points`` is then every lane's points.
    Without it, one lane of unpinned workers measures ``points``, as before.
    """
    from .results import ResultsWriter, provenance

    stream = stream if stream is not None else sys.stderr
    start = time.monotonic()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    plan: dict[Device | None, list[Point]] = dict(lanes) if lanes else {None: list(points)}
    if lanes:
        points = [p for lane in plan.values() for p in lane]
    outcome = Outcome(path=path, total=len(points))
    jobs = {device: worker_jobs(lane) for device, lane in plan.items()}
    workers: dict[tuple[Device | None, Any], Worker | None] = {}
    devices: dict[str, Any] = {}
    pinned: list[dict[str, Any]] = []
    described_on: dict[Device | None, dict[str, Any]] = {}
    bandwidth: dict[Device | None, dict[str, Any]] = {device: {} for device in plan}
    lost_at_start: dict[tuple[Device | None, Any], str] = {}
    warned: set[str] = set()   # kinds of worker warning already shown
    lock = threading.Lock()
    stopping = threading.Event()

    def setup(device: Device | None) -> dict[str, Any]:
        return setup_message(measure=measure, rotate_budget_bytes=rotate_budget_bytes,
                             bandwidth=bandwidth[device])

    def start_lane(device: Device | None) -> None:
        described: dict[str, Any] = {}
        for job in jobs[device]:
            key = (device, job.key)
            try:
                worker = Worker(setup(device), warned=warned, device=device)
                with lock:
                    workers[key] = worker
                answer = worker.describe(job.backends, case_timeout_s)
                described.update(answer["devices"])
                bandwidth[device].update(answer["bandwidth"])
            except WorkerLost as lost:
                if stopping.is_set():
                    return
                lost_at_start[key] = lost.reason
                with lock:
                    workers.pop(key, None)
                described.update({b: {"available": False, "error": lost.reason}
                                  for b in job.backends})
        with lock:
            described_on[device] = described
            if device is not None:
                pinned.append(_pinned_entry(device, described, bandwidth[device]))

    try:
        if progress is not False:
            print("kvmicro sweep: measuring each device's memory bandwidth", file=stream,
                  flush=True)
        _in_lanes(list(plan), start_lane, stopping, lock)
        for device in plan:   # one device per backend name: the first in the plan's order
            for name, entry in described_on.get(device, {}).items():
                devices.setdefault(name, entry)
        run = provenance(argv or sys.argv, [], bandwidth.get(None) or next(
            iter(bandwidth.values()), {}))
        if lanes:
            run["bandwidth"] = {}
            for device in plan:   # one entry per backend name: the first device's
                for name, values in bandwidth[device].items():
                    run["bandwidth"].setdefault(name, values)
            run["pinned_devices"] = sorted(pinned, key=lambda e: e["index"])
        run["backends"] = list(dict.fromkeys(getattr(p.case, "spec", p.case.backend)
                                             for p in points))
        run["devices"] = devices
        with ResultsWriter(path, run, resume=resume) as writer:
            done = set(writer.done_keys) if resume else set()
            baselines = _baselines_in(path) if resume else {}
            todo = [p for p in points if not done or point_key(p) not in done]
            outcome.resumed = len(points) - len(todo)
            weights = {p: point_weight(p) for p in todo}
            bar = Progress(len(todo), stream=stream, enabled=progress,
                           total_weight=sum(weights.values()))
            todo_set = set(todo)

            def write(point: Point, record: dict[str, Any]) -> None:
                with lock:
                    if stopping.is_set():
                        raise _Stopping
                    writer.write(record)
                    outcome.records.append(record)
                    if (point.case.op == "sdpa_contiguous" and record.get("status") == "ok"
                            and record.get("stats")):
                        baselines[contiguous_key(point)] = float(record["stats"]["median_us"])
                    bar.update(point.label, status=record.get("status", "?"),
                               weight=weights[point])

            def measure_lane(device: Device | None) -> None:
                for job in jobs[device]:
                    _measure_job(job, device, [p for p in job.points if p in todo_set],
                                 workers, lost_at_start, write, lambda p: baselines.get(
                                     contiguous_key(p)), lambda: setup(device), warned,
                                 case_timeout_s, devices, bar, lock, stopping)

            try:
                _in_lanes(list(plan), measure_lane, stopping, lock)
            finally:
                bar.close()
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        stopping.set()
        with lock:
            left = list(workers.values())
        for worker in left:
            if worker is not None:
                worker.close()
        outcome.elapsed_s = time.monotonic() - start
    return outcome


def _pinned_entry(device: Device, described: Mapping[str, Any],
                  bandwidth: Mapping[str, Any]) -> dict[str, Any]:
    """The run line's entry of one ``--devices`` device: index, bus id, name, memory, clocks
    (what its backends' device entries report) and its measured bandwidth per backend."""
    entry: dict[str, Any] = {"device": str(device), "kind": device.kind, "index": device.index,
                             "pci_bus_id": None, "backends": sorted(described)}
    for name in sorted(described):
        info = described[name]
        if not isinstance(info, Mapping) or not info.get("available", True):
            continue
        extra = info.get("extra") if isinstance(info.get("extra"), Mapping) else {}
        for key in ("pci_bus_id", "name", "memory_bytes", "cache_bytes"):
            if entry.get(key) is None and (info.get(key) or extra.get(key)):
                entry[key] = info.get(key) or extra.get(key)
        for key in ("clock_khz", "mem_clock_khz", "sm_count", "compute_capability",
                    "driver_version"):
            if key in extra and key not in entry:
                entry[key] = extra[key]
    entry["bandwidth"] = {name: dict(values) for name, values in bandwidth.items()}
    return entry


def _in_lanes(lanes: list[Device | None], work: Callable[[Device | None], None],
              stopping: threading.Event, lock: threading.Lock | None = None) -> None:
    """``work(lane)`` for every lane: inline for one lane, else one thread per lane, all at once.
    The main thread keeps Ctrl-C: it sets ``stopping`` (the lanes then stop writing) and the
    caller stops the workers, which ends the lanes' waits."""
    if len(lanes) == 1:
        try:
            work(lanes[0])
        except _Stopping:
            pass
        return
    errors: list[BaseException] = []

    def run(lane: Device | None) -> None:
        try:
            work(lane)
        except _Stopping:
            pass
        except BaseException as exc:   # re-raised in the main thread
            if not stopping.is_set():
                errors.append(exc)
            stopping.set()

    threads = [threading.Thread(target=run, args=(lane,), name=f"kvmicro-{lane}", daemon=True)
               for lane in lanes]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except KeyboardInterrupt:
        stopping.set()
        if lock is not None:
            with lock:   # a record being written is finished before the file closes
                pass
        raise
    if errors:
        raise errors[0]


def _measure_job(job: Any, device: Device | None, points: list[Point],
                 workers: dict[tuple[Device | None, Any], Worker | None],
                 lost_at_start: Mapping[tuple[Device | None, Any], str],
                 write: Callable[[Point, dict[str, Any]], None],
                 baseline: Callable[[Point], float | None], setup: Callable[[], dict[str, Any]],
                 warned: set[str], case_timeout_s: float, devices: Mapping[str, Any],
                 bar: Progress, lock: threading.Lock, stopping: threading.Event) -> None:
    """One job's points (one device, one process group), shape group by shape group, in its
    worker; a lost worker is replaced and the group it was on measured case by case."""
    key = (device, job.key)
    worker = workers.get(key)
    # (points, interleave): shape groups first; a group's cases one by one after a worker was
    # lost on it
    pending = deque((group, True) for group in shape_runs(points))
    while pending:
        if stopping.is_set():
            raise _Stopping
        unit, interleave = pending.popleft()
        name = str(devices.get(unit[0].case.backend, {}).get("name", ""))
        with lock:
            bar.update(unit[0].label)
        if worker is None and key in lost_at_start:
            for p in unit:
                write(p, _lost_record(p, f"the worker for {_lane_name(job, device)} could not "
                                      f"start: {lost_at_start[key]}", name))
            continue
        sent = 0
        try:
            if worker is None:
                worker = Worker(setup(), warned=warned, device=device)
                with lock:
                    workers[key] = worker
            for point, record in zip(unit, worker.run_points(
                    unit, [baseline(p) for p in unit], case_timeout_s, interleave),
                    strict=False):
                write(point, record)
                sent += 1
        except (WorkerLost, OSError, ValueError) as lost:
            if stopping.is_set():
                raise _Stopping from None
            if not isinstance(lost, WorkerLost):
                raise
            if worker is not None:
                worker.close()
            worker = None
            with lock:
                workers[key] = None
            cases = list(by_case(unit[sent:]))
            if len(cases) > 1:
                # which case took the worker down is unknown: one at a time now
                pending.extendleft((c, False) for c in reversed(cases))
                continue
            for p in unit[sent:]:
                write(p, _lost_record(p, f"{lost.reason} (this case was in flight)", name))
    if worker is not None:
        worker.close()
        with lock:
            workers[key] = None


def _lane_name(job: Any, device: Device | None) -> str:
    return str(job.key) if device is None else f"{device}" + (
        f" ({job.key.group})" if job.key.group else "")


__all__ = [
    "AXIS_FIELDS", "CACHES", "DEFAULT_CASE_TIMEOUT_S", "DEFAULT_PRESET",
    "DEFAULT_ROTATE_BUDGET_BYTES", "PRESETS", "ArrayCache", "Grid", "Outcome", "Point", "Preset",
    "Progress", "Runner", "by_case", "contiguous_key", "device_kind", "exact_check", "expand",
    "get_preset", "is_out_of_memory", "make_grid", "parse_axis", "parse_shard", "plan_summary",
    "point_key", "point_weight", "run_sweep", "shape_groups", "shape_key", "shape_runs",
]
