"""Worker processes: a sweep measures in child processes, so a backend that segfaults or hangs
costs the case in flight (an error record naming the signal or the timeout) and the sweep goes on
with a fresh worker; every other record is there. Backends that declare different process groups
never share a worker; Ctrl-C stops the workers.

The backends here exist only in this file: the test registers them in the parent's registry, and
the parent hands its registry and sys.path to each worker it starts."""

from __future__ import annotations

import faulthandler
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import assert_stopped_by_ctrl_c, ctrl_c_after_records

from kvmicro import oracle
from kvmicro.backends import registry
from kvmicro.backends.base import Availability, Backend, DeviceInfo, Prepared
from kvmicro.dtypes import carrier
from kvmicro.grid import Grid
from kvmicro.points import expand
from kvmicro.results import read_results, record_key
from kvmicro.sweep import run_sweep
from kvmicro.worker import describe_exit, spawn, stop, worker_jobs
from kvmicro.workload import Case

#: the ctx at which the misbehaving backends misbehave; every other case of theirs is fine
BAD_CTX = 33
#: the op of every run() in this process, in order (to see how cases were interleaved)
RUNS: list[str] = []


class OraclePrepared(Prepared):
    """Returns the oracle's answer; ``misbehave`` runs inside run() (the oracle check's run)."""

    def __init__(self, case: Case, arrays: dict[str, np.ndarray], misbehave: Any,
                 bad_ctx: int) -> None:
        super().__init__(case)
        self._bad_ctx = bad_ctx
        ref = oracle.run(case, arrays)
        dtype = carrier(case.dtype)
        self._out = (tuple(r.astype(dtype) for r in ref) if isinstance(ref, tuple)
                     else ref.astype(dtype))
        self._misbehave = misbehave
        self._work = np.zeros(64)

    def run(self) -> None:
        RUNS.append(self.case.op)
        if self.case.ctx == self._bad_ctx and self.case.op == "gather":
            self._misbehave()
        self._work += 1.0

    def sync(self) -> None:
        pass

    def output(self) -> Any:
        return self._out


class _TestBackend(Backend):
    ops = ("sdpa_contiguous", "gather", "gather_sdpa")
    bad_ctx = BAD_CTX

    def availability(self) -> Availability:
        return Availability(True, "test double")

    def device_info(self) -> DeviceInfo:
        return DeviceInfo("test cpu", "cpu", cache_bytes=1 << 16, memory_bytes=1 << 28)

    def bandwidth(self) -> dict[str, float]:
        return {"read_gbps": 10.0, "copy_gbps": 20.0, "pid": os.getpid()}

    def prepare(self, case: Case, arrays: dict[str, np.ndarray], copies: int = 1) -> Prepared:
        return OraclePrepared(case, arrays, self.misbehave, self.bad_ctx)

    def misbehave(self) -> None:
        pass


class GoodBackend(_TestBackend):
    name = "good:cpu"


class SegfaultBackend(_TestBackend):
    name = "segv:cpu"

    def misbehave(self) -> None:
        faulthandler.disable()          # a plain crash, without a traceback on stderr
        faulthandler._sigsegv()


class HangBackend(_TestBackend):
    name = "hang:cpu"

    def misbehave(self) -> None:
        time.sleep(3600)


class LateHangBackend(HangBackend):
    """Hangs on the second shape of the grid (ctx 70), after the first is written."""

    name = "latehang:cpu"
    bad_ctx = 70


class IsolatedBackend(_TestBackend):
    """A backend that must not share a process with the others."""

    name = "loner:cpu"
    process_group = "loner"


class WarningBackend(_TestBackend):
    """Warns on every prepare, as a framework might."""

    name = "warn:cpu"

    def prepare(self, case: Case, arrays: dict[str, np.ndarray], copies: int = 1) -> Prepared:
        import warnings

        warnings.warn(f"careful with {case.op}", UserWarning, stacklevel=1)
        return super().prepare(case, arrays, copies)


TEST_BACKENDS = {"good:cpu": "GoodBackend", "segv:cpu": "SegfaultBackend",
                 "hang:cpu": "HangBackend", "latehang:cpu": "LateHangBackend",
                 "loner:cpu": "IsolatedBackend",
                 "warn:cpu": "WarningBackend"}


@pytest.fixture
def test_backends(monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, cls in TEST_BACKENDS.items():
        monkeypatch.setitem(registry._FACTORIES, name, (__name__, cls))
    registry.get_backend.cache_clear()
    yield
    registry.get_backend.cache_clear()


FAST = dict(min_samples=5, max_time_s=0.01, warmup_count=1, warmup_time_s=0.0,
            sample_time_s=2e-4)


def grid(*backends: str) -> Grid:
    return Grid(backends=backends, ops=("sdpa_contiguous", "gather", "gather_sdpa"),
                layouts=("NSHD",), placements=("reverse",), ctxs=(BAD_CTX, 70), batches=(1,),
                blocks=(16,), heads=((4, 2),), head_dims=(16,), dtypes=("float32",),
                slacks=(2.0,), timers=("host",), caches=("hot",))


def keys(points: Any) -> set[tuple[Any, ...]]:
    return {record_key({**p.case.flat(), "timer": p.timer, "cache": p.cache}) for p in points}


def test_a_segfault_and_a_hang_cost_one_case_each_and_the_sweep_finishes(
        test_backends: Any, tmp_path: Path) -> None:
    points = expand(grid("good:cpu", "segv:cpu", "hang:cpu"))
    out = tmp_path / "r.jsonl"
    started = time.monotonic()
    outcome = run_sweep(points, out, argv=["test"], measure=FAST, progress=False,
                        case_timeout_s=3.0)
    assert not outcome.interrupted
    assert time.monotonic() - started < 60
    runs, records = read_results(out)
    assert {record_key(r) for r in records} == keys(points)     # every record is there, once
    assert len(records) == len(points)
    bad = {(r["backend"], r["op"], r["ctx"]): r for r in records if r["status"] != "ok"}
    assert set(bad) == {("segv:cpu", "gather", BAD_CTX), ("hang:cpu", "gather", BAD_CTX)}
    segv, hang = bad[("segv:cpu", "gather", BAD_CTX)], bad[("hang:cpu", "gather", BAD_CTX)]
    assert segv["status"] == "error" and "SIGSEGV" in segv["reason"]
    assert hang["status"] == "error" and "no result within 3 s" in hang["reason"]
    assert "case timeout" in hang["reason"]
    # the cases after a crash ran in a fresh worker and derive the same figures: the overhead of
    # gather_sdpa is against the sdpa_contiguous measured by the worker that died
    for r in records:
        if r["op"] == "gather_sdpa":
            assert r["derived"]["overhead_pct"] is not None, r["backend"]
    # the run line's devices and bandwidth came from the workers, not from this process
    assert runs[0]["bandwidth"]["good:cpu"]["pid"] != os.getpid()
    assert runs[0]["devices"]["segv:cpu"]["name"] == "test cpu"


def test_backends_of_another_process_group_get_their_own_worker(test_backends: Any,
                                                                 tmp_path: Path) -> None:
    points = expand(grid("good:cpu", "loner:cpu"))
    jobs = worker_jobs(points)
    assert [(str(j.key), j.backends) for j in jobs] == [("cpu", ["good:cpu"]),
                                                         ("cpu (loner)", ["loner:cpu"])]
    out = tmp_path / "r.jsonl"
    run_sweep(points, out, argv=["test"], measure=FAST, progress=False)
    runs, records = read_results(out)
    assert all(r["status"] == "ok" for r in records)
    pids = {name: runs[0]["bandwidth"][name]["pid"] for name in ("good:cpu", "loner:cpu")}
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()


def test_a_backend_group_from_mlx_never_shares_a_worker_with_torch() -> None:
    from kvmicro.worker import process_group, worker_key

    assert process_group("mlx:gpu") == process_group("mlx:cpu") == "mlx"
    assert process_group("torch:cuda") == process_group("native:cuda") == ""
    assert worker_key("mlx:gpu") != worker_key("torch:cuda")
    assert worker_key("native:cuda:1").device == "cuda:1"
    assert worker_key("native:cuda") == worker_key("cudnn:cuda") == worker_key("torch:cuda:0")


def test_exit_statuses_are_described_in_words() -> None:
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert describe_exit(-signal.SIGABRT) == "killed by SIGABRT"
    assert describe_exit(3) == "exited with status 3"


def test_stop_ends_a_child_that_ignores_its_stdin_and_sigterm() -> None:
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('up', flush=True); time.sleep(60)")
    proc = spawn([sys.executable, "-c", code])
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    started = time.monotonic()
    assert stop(proc, grace_s=0.3) == -signal.SIGKILL
    assert time.monotonic() - started < 5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_the_workers_and_keeps_every_finished_record(tmp_path: Path) -> None:
    here = Path(__file__).resolve().parent
    out = tmp_path / "r.jsonl"
    code = (f"import sys; sys.path[:0] = [{str(here)!r}, {str(here.parent / 'src')!r}]; "
            "import test_worker; from kvmicro.backends import registry; "
            "registry._FACTORIES.update({n: ('test_worker', c) for n, c in "
            "test_worker.TEST_BACKENDS.items()}); from kvmicro.cli import main; "
            "raise SystemExit(main(sys.argv[1:]))")
    argv = [sys.executable, "-c", code, "sweep", "--backend", "good:cpu,latehang:cpu", "--preset",
            "smoke", "--ctx", f"70,{BAD_CTX}", "--batch", "1", "--op", "sdpa_contiguous,gather",
            "--layout", "NSHD", "--timer", "host", "--cache", "hot", "--min-samples", "5",
            "--max-time", "0.01", "--out", str(out), "-q"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # ctx 33 comes first (4 records), then ctx 70, where latehang:cpu's gather hangs: Ctrl-C
    # lands 0.5 s into the hang
    workers, err = ctrl_c_after_records(proc, out, 4, wait_s=0.5)
    assert workers, "the sweep has no worker process"
    assert_stopped_by_ctrl_c(proc, err, workers)
    records = read_results(out)[1]
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    assert {r["ctx"] for r in records} == {BAD_CTX}


def test_the_case_timeout_must_be_positive(capsys: Any) -> None:
    from kvmicro.cli import main

    assert main(["sweep", "--backend", "torch:cpu", "--case-timeout", "0", "--dry-run"]) == 2
    assert "--case-timeout 0.0 must be a positive number of seconds" in capsys.readouterr().err


def test_a_workers_warnings_are_shown_by_the_parent_once_per_kind(test_backends: Any,
                                                                  tmp_path: Path) -> None:
    from kvmicro.worker import WorkerWarning

    points = expand(grid("warn:cpu"))
    with pytest.warns(WorkerWarning) as caught:
        run_sweep(points, tmp_path / "r.jsonl", argv=["test"], measure=FAST, progress=False)
    shown = [str(w.message) for w in caught if w.category is WorkerWarning]
    assert len(points) > 1 and shown == ["careful with sdpa_contiguous"]


def _spans(ops: list[str]) -> dict[str, tuple[int, int]]:
    """First and last position of each op in the run log."""
    return {op: (ops.index(op), len(ops) - 1 - ops[::-1].index(op)) for op in set(ops)}


def test_a_shape_groups_cases_are_measured_in_interleaved_rounds(test_backends: Any) -> None:
    from kvmicro.runner import Runner

    points = [p for p in expand(grid("good:cpu")) if p.case.ctx == 70]
    runner = Runner(FAST)
    assert [len(chunk) for chunk in runner.chunks(points)] == [3]   # all three fit together
    RUNS.clear()
    records = list(runner.run_group(points))
    assert [r["op"] for r in records] == [p.case.op for p in points]   # in point order
    assert all(r["status"] == "ok" for r in records)
    assert all(r["interleaved_cases"] == 3 and r["rounds"]["count"] >= 3 for r in records)
    # one chunk, one interleave group: a verdict between two of them pairs their rounds
    assert len({r["rounds"]["group"] for r in records}) == 1
    spans = _spans(RUNS)
    # every case was still being sampled after the others had started: the spans overlap
    assert max(lo for lo, _ in spans.values()) < min(hi for _, hi in spans.values())
    # the overhead is against the sdpa_contiguous measured in the same rounds
    assert records[-1]["op"] == "gather_sdpa" and records[-1]["derived"]["overhead_pct"] \
        is not None

    RUNS.clear()
    records = list(runner.run_group(points, interleave=False))
    assert all(r["status"] == "ok" and "interleaved_cases" not in r for r in records)
    assert all("group" not in r["rounds"] for r in records)
    spans = sorted(_spans(RUNS).values())
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))   # one after another


def test_the_runner_takes_every_other_pass_in_reverse(test_backends: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """No case always follows the same neighbour (kvmicro.harness.measure.interleaved_order):
    pass 0 in point order, pass 1 reversed, and so on."""
    from kvmicro.harness.measure import Sampler
    from kvmicro.runner import Runner

    points = [p for p in expand(grid("good:cpu")) if p.case.ctx == 70]
    taken: list[tuple[int, str]] = []
    real_round = Sampler.round

    def logged(self: Sampler) -> None:
        if not self.done():
            taken.append((self.rounds_taken, self.prepared.case.op))
        real_round(self)

    monkeypatch.setattr(Sampler, "round", logged)
    records = list(Runner(FAST).run_group(points))
    assert all(r["status"] == "ok" for r in records)
    ops = [p.case.op for p in points]
    by_pass = [[op for i, op in taken if i == n] for n in range(2)]
    assert by_pass == [ops, ops[::-1]]


def test_cases_that_do_not_fit_in_memory_together_are_measured_one_by_one(
        test_backends: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmicro.derived import footprint_bytes
    from kvmicro.runner import Runner

    points = [p for p in expand(grid("good:cpu")) if p.case.ctx == 70]
    runner = Runner(FAST)
    sizes = [footprint_bytes(p.case) for p in points]   # one copy each: hot cache
    monkeypatch.setattr(runner, "memory_budget", lambda backend: min(
        a + b for a, b in itertools.pairwise(sizes)) - 1)
    assert [len(chunk) for chunk in runner.chunks(points)] == [1, 1, 1]
    monkeypatch.setattr(runner, "memory_budget", lambda backend: sizes[0] + sizes[1])
    assert [len(chunk) for chunk in runner.chunks(points)] == [2, 1]
