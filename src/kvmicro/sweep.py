"""A sweep: measure a grid's points in worker processes and append their records to a file.

The parts live by noun: :mod:`kvmicro.grid` (axes, presets, axis parsing), :mod:`kvmicro.points`
(points, shape groups, shards), :mod:`kvmicro.runner` (measuring one case), :mod:`kvmicro.worker`
(the processes that run it), :mod:`kvmicro.progress` (the progress line). This module is the
loop that joins them, and re-exports their names so ``from kvmicro.sweep import ...`` keeps
working.

:func:`run_sweep` plans the workers (one per device and process group, run one after another),
has each measure its device's bandwidth for the run line, then sends it the points case by case
and writes each record as it arrives: append-only, flushed per record, so a killed sweep leaves a
valid file and ``--resume`` picks up where it stopped. A worker that crashes or hangs costs the
case in flight (an error record naming the signal or the timeout) and is replaced.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

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


def run_sweep(points: list[Point], out: str | Path, *, argv: list[str] | None = None,
              resume: bool = False, measure: dict[str, Any] | None = None,
              progress: bool | None = None, stream: TextIO | None = None,
              rotate_budget_bytes: int = DEFAULT_ROTATE_BUDGET_BYTES,
              case_timeout_s: float = DEFAULT_CASE_TIMEOUT_S) -> Outcome:
    """Measure ``points`` into the JSONL file ``out`` (appended, flushed per record).

    With ``resume``, points whose record is already in ``out`` are skipped. A worker that dies or
    sends nothing for ``case_timeout_s`` costs the case in flight (error records) and is replaced.
    Ctrl-C stops the workers and keeps every finished record; the file stays valid and
    ``Outcome.interrupted`` is set.
    """
    from .results import ResultsWriter, provenance

    stream = stream if stream is not None else sys.stderr
    start = time.monotonic()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    outcome = Outcome(path=path, total=len(points))
    jobs = worker_jobs(points)
    workers: dict[Any, Worker | None] = {}
    devices: dict[str, Any] = {}
    bandwidth: dict[str, Any] = {}
    lost_at_start: dict[Any, str] = {}
    warned: set[str] = set()   # kinds of worker warning already shown

    def setup() -> dict[str, Any]:
        return setup_message(measure=measure, rotate_budget_bytes=rotate_budget_bytes,
                             bandwidth=bandwidth)

    try:
        if progress is not False:
            print("kvmicro sweep: measuring each device's memory bandwidth", file=stream,
                  flush=True)
        for job in jobs:
            try:
                worker = Worker(setup(), warned=warned)
                workers[job.key] = worker
                described = worker.describe(job.backends, case_timeout_s)
                devices.update(described["devices"])
                bandwidth.update(described["bandwidth"])
            except WorkerLost as lost:
                lost_at_start[job.key] = lost.reason
                workers.pop(job.key, None)
                devices.update({b: {"available": False, "error": lost.reason}
                                for b in job.backends})
        run = provenance(argv or sys.argv, [], bandwidth)
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
                writer.write(record)
                outcome.records.append(record)
                if (point.case.op == "sdpa_contiguous" and record.get("status") == "ok"
                        and record.get("stats")):
                    baselines[contiguous_key(point)] = float(record["stats"]["median_us"])
                bar.update(point.label, status=record.get("status", "?"), weight=weights[point])

            try:
                for job in jobs:
                    worker = workers.get(job.key)
                    # (points, interleave): shape groups first; a group's cases one by one after
                    # a worker was lost on it
                    pending = deque((group, True) for group in
                                    shape_runs([p for p in job.points if p in todo_set]))
                    while pending:
                        unit, interleave = pending.popleft()
                        device = str(devices.get(unit[0].case.backend, {}).get("name", ""))
                        bar.update(unit[0].label)
                        if worker is None and job.key in lost_at_start:
                            for p in unit:
                                write(p, _lost_record(p, f"the worker for {job.key} could not "
                                                      f"start: {lost_at_start[job.key]}", device))
                            continue
                        sent = 0
                        try:
                            if worker is None:
                                worker = Worker(setup(), warned=warned)
                                workers[job.key] = worker
                            for point, record in zip(unit, worker.run_points(
                                    unit, [baselines.get(contiguous_key(p)) for p in unit],
                                    case_timeout_s, interleave), strict=False):
                                write(point, record)
                                sent += 1
                        except WorkerLost as lost:
                            if worker is not None:
                                worker.close()
                            worker = None
                            workers[job.key] = None
                            cases = list(by_case(unit[sent:]))
                            if len(cases) > 1:
                                # which case took the worker down is unknown: one at a time now
                                pending.extendleft((c, False) for c in reversed(cases))
                                continue
                            for p in unit[sent:]:
                                write(p, _lost_record(p, f"{lost.reason} (this case was in "
                                                      "flight)", device))
                    if worker is not None:
                        worker.close()
                        workers[job.key] = None
            finally:
                bar.close()
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        for worker in workers.values():
            if worker is not None:
                worker.close()
        outcome.elapsed_s = time.monotonic() - start
    return outcome


__all__ = [
    "AXIS_FIELDS", "CACHES", "DEFAULT_CASE_TIMEOUT_S", "DEFAULT_PRESET",
    "DEFAULT_ROTATE_BUDGET_BYTES", "PRESETS", "ArrayCache", "Grid", "Outcome", "Point", "Preset",
    "Progress", "Runner", "by_case", "contiguous_key", "device_kind", "exact_check", "expand",
    "get_preset", "is_out_of_memory", "make_grid", "parse_axis", "parse_shard", "plan_summary",
    "point_key", "point_weight", "run_sweep", "shape_groups", "shape_key", "shape_runs",
]
