"""Sweeps over several devices (``--devices``), on CPU with fake devices: two CPU cores stand for
two GPUs. Each device gets its own worker, pinned to it (a core's affinity; CUDA_VISIBLE_DEVICES
for a GPU), the devices measure at the same time, each measures whole shape groups, every record
names its device, shards and merges keep those names, and the agreement check finds a device
made 1.5x slower.

The backends here exist only in this file (registered in the parent's registry, which the workers
inherit), except for the end-to-end runs of native:cpu through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import assert_stopped_by_ctrl_c, ctrl_c_after_records

from kvmicro import oracle
from kvmicro.agreement import agreement_lanes, agreement_points, check_agreement
from kvmicro.backends import registry
from kvmicro.backends.base import Availability, Backend, DeviceInfo, Prepared
from kvmicro.cli import main
from kvmicro.devices import (
    Device,
    check_backends,
    deal,
    groups_of,
    off_device,
    on_device,
    parse_devices,
)
from kvmicro.dtypes import carrier
from kvmicro.errors import InvalidCase
from kvmicro.grid import Grid, make_grid
from kvmicro.points import expand, point_weight, shape_key
from kvmicro.results import read_results, record_key
from kvmicro.sweep import run_sweep

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or
                                len(os.sched_getaffinity(0)) < 2,
                                reason="needs two CPU cores this process may pin workers to")

#: seconds each fake-device run() spins (a time that does not depend on the core's load)
SPIN_S = 300e-6
#: env var naming the file where prepare() logs (core, start, end): to see the devices overlap
LOG_ENV = "KVMICRO_TEST_DEVICE_LOG"


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


class SpinPrepared(Prepared):
    """Returns the oracle's answer; run() spins for ``spin_s``."""

    def __init__(self, case: Any, arrays: dict[str, np.ndarray], spin_s: float) -> None:
        super().__init__(case)
        ref = oracle.run(case, arrays)
        dtype = carrier(case.dtype)
        self._out = (tuple(r.astype(dtype) for r in ref) if isinstance(ref, tuple)
                     else ref.astype(dtype))
        self.spin_s = spin_s

    def run(self) -> None:
        end = time.perf_counter() + self.spin_s
        while time.perf_counter() < end:
            pass

    def sync(self) -> None:
        pass

    def output(self) -> Any:
        return self._out


class CoreBackend(Backend):
    """A CPU 'device' that names the cores its process may run on and logs its prepares."""

    name = "core:cpu"
    ops = ("sdpa_contiguous", "gather", "paged_sdpa")
    slowdown = 1.0

    def availability(self) -> Availability:
        return Availability(True, "test double")

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(f"cores {_cores()}", "cpu", cache_bytes=1 << 16,
                          memory_bytes=1 << 28)

    def bandwidth(self) -> dict[str, float]:
        return {"read_gbps": 10.0, "copy_gbps": 20.0}

    def spin_s(self) -> float:
        return SPIN_S

    def prepare(self, case: Any, arrays: dict[str, np.ndarray], copies: int = 1) -> Prepared:
        log = os.environ.get(LOG_ENV)
        start = time.time()
        if log:
            time.sleep(0.3)   # long enough that two devices' prepares overlap if concurrent
            with open(log, "a") as f:
                f.write(json.dumps({"cores": _cores(), "start": start, "end": time.time()})
                        + "\n")
        return SpinPrepared(case, arrays, self.spin_s())


class SlowCoreBackend(CoreBackend):
    """Planted disagreement: 1.5x slower on the second core, as a throttled card would be."""

    name = "slowcore:cpu"

    def spin_s(self) -> float:
        slow = int(os.environ.get(SLOW_ENV, "-1"))
        return SPIN_S * (1.5 if _cores() == [slow] else 1.0)


#: env var naming the core SlowCoreBackend is slow on (workers inherit it from the test)
SLOW_ENV = "KVMICRO_TEST_SLOW_CORE"
#: the second core of this process: the one SlowCoreBackend is slow on
SLOW_CORE = _cores()[1] if len(_cores()) > 1 else -1


class FakeGpuBackend(CoreBackend):
    """A 'GPU' that names the CUDA_VISIBLE_DEVICES it was started with, and a bus id from it."""

    name = "fakegpu:cuda"

    def device_info(self) -> DeviceInfo:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        return DeviceInfo(f"visible {visible}", "cuda", cache_bytes=1 << 16,
                          memory_bytes=1 << 28,
                          extra={"pci_bus_id": f"0000:{visible}:00.0", "clock_khz": 1000})


@pytest.fixture
def fake_devices(monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, cls in {"core:cpu": "CoreBackend", "slowcore:cpu": "SlowCoreBackend",
                      "fakegpu:cuda": "FakeGpuBackend"}.items():
        monkeypatch.setitem(registry._FACTORIES, name, (__name__, cls))
    monkeypatch.setenv(SLOW_ENV, str(SLOW_CORE))
    registry.get_backend.cache_clear()
    yield
    registry.get_backend.cache_clear()


FAST = dict(min_samples=5, max_time_s=0.02, warmup_count=1, warmup_time_s=0.0)
#: enough samples for a verdict; the host-noise guard off (this host is shared: its busy flag
#: would make every comparison unsure)
STEADY = dict(min_samples=40, max_time_s=0.4, warmup_count=3, warmup_time_s=0.0, noise=0.03,
              host_guard=False)


def grid(*backends: str, ctxs: tuple[int, ...] = (40, 70, 100, 130)) -> Grid:
    return Grid(backends=backends, ops=("sdpa_contiguous", "gather", "paged_sdpa"),
                layouts=("NSHD", "HNSD"), placements=("reverse",), ctxs=ctxs, batches=(1,),
                blocks=(16,), heads=((4, 2),), head_dims=(16,), dtypes=("float32",),
                slacks=(2.0,), timers=("host",), caches=("hot",))


def two_cores() -> list[Device]:
    return [Device("cpu", c) for c in _cores()[:2]]


# ------------------------------------------------------------------------------ parsing


def test_devices_are_named_by_kind_and_index_and_bad_lists_are_refused() -> None:
    cores = _cores()
    assert parse_devices(f"cpu:{cores[0]},cpu:{cores[1]}") == [Device("cpu", cores[0]),
                                                               Device("cpu", cores[1])]
    for bad, words in (("", "empty"), ("gpu:0", "not a device"), ("cuda:x", "not a device"),
                       ("cpu:0,cpu:0", "given twice"), ("cpu:0,cuda:1", "one kind"),
                       ("cpu:4096", "no such core")):
        with pytest.raises(InvalidCase, match=words):
            parse_devices(bad)


def test_a_gpu_worker_sees_only_its_gpu_and_the_parents_numbering_is_kept() -> None:
    assert Device("cuda", 1).environment({}) == {"CUDA_VISIBLE_DEVICES": "1"}
    # cuda:i is the i-th GPU this process sees, so a parent limited to 4,5 gives cuda:1 GPU 5
    assert Device("cuda", 1).environment({"CUDA_VISIBLE_DEVICES": "4,5"}) == {
        "CUDA_VISIBLE_DEVICES": "5"}
    with pytest.raises(InvalidCase, match="shows 1 GPU"):
        Device("cuda", 1).environment({"CUDA_VISIBLE_DEVICES": "4"})
    assert Device("cpu", 0).environment({})["OMP_NUM_THREADS"] == "1"
    assert Device("cpu", 3).cores == [3] and Device("cuda", 3).cores is None


def test_gpus_are_counted_without_starting_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys as _sys

    from kvmicro.devices import gpu_count
    from kvmicro.errors import Unsupported

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert gpu_count() == 2
    assert parse_devices("all") == [Device("cuda", 0), Device("cuda", 1)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_count() == 0
    with pytest.raises(Unsupported, match="no CUDA GPU is visible"):
        parse_devices("all")
    # counting never imports a framework that would start CUDA in this process (a process whose
    # CUDA started ignores the CUDA_VISIBLE_DEVICES that pinning sets afterwards)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setitem(_sys.modules, "torch", None)
    monkeypatch.setitem(_sys.modules, "kvmicro._native", None)
    assert gpu_count() >= 0


def test_backends_must_match_the_devices_kind_and_name_no_index(fake_devices: Any) -> None:
    cpu = two_cores()
    check_backends(expand(grid("core:cpu")), cpu)
    with pytest.raises(InvalidCase, match="does not run on a cpu device"):
        check_backends(expand(grid("fakegpu:cuda")), cpu)
    with pytest.raises(InvalidCase, match="give backend core:cpu, not core:cpu:1"):
        check_backends(expand(grid("core:cpu:1")), cpu)


# ------------------------------------------------------------------------------ dealing


def test_dealing_gives_each_device_whole_shape_groups_balanced_by_weight() -> None:
    points = expand(grid("native:cpu", "torch:cpu", ctxs=(40, 1000, 3000, 5000, 9000)))
    devices = [Device("cpu", 0), Device("cpu", 1)]
    lanes = deal(points, devices)
    # every point once, nothing lost or doubled
    assert sorted(map(record_key_of, points)) == sorted(
        record_key_of(p) for lane in lanes.values() for p in lane)
    # a shape lives on one device only, with its sdpa_contiguous first: overheads never divide
    # numbers of two devices
    owner: dict[Any, Device] = {}
    for device, lane in lanes.items():
        for group in groups_of(lane):
            assert group[0].case.op == "sdpa_contiguous"
            key = shape_key(group[0].case)[1:]
            assert owner.setdefault(key, device) == device
    assert len(set(owner.values())) == 2
    # each device keeps the run order (cheapest shape first)
    for lane in lanes.values():
        assert lane == [p for p in points if p in set(lane)]
    # balance: the heavier device carries no more than the lighter one plus the largest group
    loads = sorted(sum(point_weight(p) for p in lane) for lane in lanes.values())
    largest = max(sum(point_weight(p) for p in g) for g in groups_of(points))
    assert loads[1] - loads[0] <= largest
    # deterministic
    assert deal(points, devices) == lanes


def record_key_of(point: Any) -> tuple[Any, ...]:
    return record_key({**point.case.flat(), "timer": point.timer, "cache": point.cache})


def test_one_device_gets_everything_and_more_devices_than_groups_leave_some_idle() -> None:
    points = expand(grid("native:cpu", ctxs=(40, 70)))
    assert deal(points, [Device("cpu", 0)]) == {Device("cpu", 0): points}
    lanes = deal(points, [Device("cpu", i) for i in range(3)])
    assert sorted(len(lane) for lane in lanes.values())[0] == 0


def test_an_agreement_case_names_its_device_and_so_is_a_record_of_its_own() -> None:
    points = expand(grid("native:cpu"))
    chosen = agreement_points(points)
    assert {p.case.op for p in chosen} == {"sdpa_contiguous", "paged_sdpa"}
    assert len({p.case for p in chosen}) == 2 and len({p.case.ctx for p in chosen}) == 1
    assert chosen[0].case.ctx == max(p.case.ctx for p in points)   # the largest shape
    lanes = agreement_lanes(points, two_cores())
    a, b = (lanes[d][0] for d in two_cores())
    assert a.case.backend == f"native:cpu:{two_cores()[0].index}"
    assert record_key_of(a) != record_key_of(b)
    assert off_device(a) == off_device(b) == chosen[0]
    assert off_device(on_device(chosen[0], Device("cuda", 1))) == chosen[0]


# ------------------------------------------------------------------ pinning, concurrency


def test_each_device_gets_a_pinned_worker_and_the_devices_measure_at_once(
        fake_devices: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "prepares.jsonl"
    monkeypatch.setenv(LOG_ENV, str(log))
    points = expand(grid("core:cpu", ctxs=(40, 70)))
    devices = two_cores()
    lanes = deal(points, devices)
    out = tmp_path / "r.jsonl"
    outcome = run_sweep([], out, argv=["test"], measure=FAST, progress=False, lanes=lanes)
    assert not outcome.interrupted
    runs, records = read_results(out)
    assert len(records) == len(points) and all(r["status"] == "ok" for r in records)
    # pinned: the backend inside each worker saw one core, the record names it
    for r in records:
        assert r["device"] == f"cores [{r['device_index']}]"
        assert r["device_kind"] == "cpu" and r["pci_bus_id"] is None
    # the device named in each record is the one its shape was dealt to
    dealt = {record_key_of(p): d.index for d, lane in lanes.items() for p in lane}
    assert {record_key(r): r["device_index"] for r in records} == dealt
    # concurrent: some prepare on one core overlapped one on the other
    spans = [json.loads(line) for line in log.read_text().splitlines()]
    by_core = {c: [s for s in spans if s["cores"] == [c]] for c in (d.index for d in devices)}
    assert all(by_core.values()), by_core
    a, b = by_core.values()
    assert any(x["start"] < y["end"] and y["start"] < x["end"] for x in a for y in b)
    # provenance: every device with its name, memory and bandwidth
    pinned = runs[0]["pinned_devices"]
    assert [e["device"] for e in pinned] == [str(d) for d in devices]
    assert all(e["bandwidth"]["core:cpu"]["copy_gbps"] == 20.0 for e in pinned)
    assert [e["name"] for e in pinned] == [f"cores [{d.index}]" for d in devices]


def test_a_gpu_worker_is_started_with_its_gpu_alone_and_records_its_bus_id(
        fake_devices: Any, tmp_path: Path) -> None:
    points = expand(grid("fakegpu:cuda", ctxs=(40, 70)))
    devices = [Device("cuda", 0), Device("cuda", 1)]
    out = tmp_path / "r.jsonl"
    run_sweep([], out, argv=["test"], measure=FAST, progress=False,
              lanes=deal(points, devices))
    runs, records = read_results(out)
    assert {r["device_index"] for r in records} == {0, 1}
    for r in records:
        assert r["device"] == f"visible {r['device_index']}"
        assert r["pci_bus_id"] == f"0000:{r['device_index']}:00.0"
    pinned = runs[0]["pinned_devices"]
    assert [(e["index"], e["pci_bus_id"], e["memory_bytes"], e["clock_khz"]) for e in pinned] \
        == [(0, "0000:0:00.0", 1 << 28, 1000), (1, "0000:1:00.0", 1 << 28, 1000)]


# ------------------------------------------------------------------------ agreement


def _agreement(backend: str, tmp_path: Path) -> Any:
    points = expand(grid(backend, ctxs=(100,)))
    out = tmp_path / f"{backend.split(':')[0]}.jsonl"
    run_sweep([], out, argv=["test"], measure=STEADY, progress=False,
              lanes=agreement_lanes(points, two_cores()))
    return out, check_agreement(read_results(out)[1])


def test_a_device_made_1_5x_slower_is_reported_and_agree_exits_1(fake_devices: Any,
                                                                  tmp_path: Path) -> None:
    out, report = _agreement("slowcore:cpu", tmp_path)
    slow = f"cpu:{SLOW_CORE}"
    assert report.disagreements, report.render()
    assert set(report.suspects) == {slow}
    for p in report.disagreements:
        assert 1.3 < (p.ratio if p.device == slow else 1 / p.ratio) < 1.7
    assert "DISAGREE: " + slow in report.render()
    assert main(["agree", str(out)]) == 1


def test_like_devices_never_disagree_and_unsure_is_said_plainly(fake_devices: Any,
                                                                 tmp_path: Path) -> None:
    out, report = _agreement("core:cpu", tmp_path)
    assert report.pairs and not report.disagreements, report.render()
    text = report.render()
    assert ("AGREE" in text) if not report.unsure else ("cannot tell on" in text)
    assert main(["agree", str(out)]) == 0


def test_agree_on_a_file_without_agreement_records_compares_nothing(tmp_path: Path) -> None:
    lines = [{"type": "run", "schema_version": 2},
             {"type": "case", "schema_version": 2, "backend": "native:cpu", "op": "gather",
              "batch": 1, "ctx": 10, "status": "ok"}]
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = check_agreement(read_results(path)[1])
    assert report.exit_code == 2 and "CANNOT TELL" in report.render()
    assert main(["agree", str(path)]) == 2


# -------------------------------------------------------- the command line, end to end


def _cli_sweep(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    argv = ["sweep", "--preset", "smoke", "--backend", "native:cpu", "--ctx", "64,100",
            "--out", str(out), "-q", *extra]
    assert main(argv) == 0
    return out


def _keys(path: Path) -> list[tuple[Any, ...]]:
    return sorted(record_key(r) for r in read_results(path)[1])


def test_shards_of_a_two_device_sweep_merge_into_the_cases_of_a_one_device_sweep(
        fake_devices: Any, tmp_path: Path) -> None:
    full = grid("core:cpu")
    one = tmp_path / "one.jsonl"
    run_sweep(expand(full), one, argv=["test"], measure=FAST, progress=False)
    for i in range(2):
        shard = expand(full, (i, 2))
        run_sweep([], tmp_path / f"s{i}.jsonl", argv=["test"], measure=FAST, progress=False,
                  lanes=deal(shard, two_cores()))
    merged = tmp_path / "merged.jsonl"
    assert main(["merge", str(tmp_path / "s0.jsonl"), str(tmp_path / "s1.jsonl"), "--out",
                 str(merged)]) == 0
    # equal in cases: the device is not part of a dealt record's identity
    assert _keys(merged) == _keys(one)
    records = read_results(merged)[1]
    assert {r["device_index"] for r in records} == {d.index for d in two_cores()}
    assert all(r["device"] == f"cores [{r['device_index']}]" for r in records)
    runs = read_results(merged)[0]
    assert len(runs) == 2 and all("pinned_devices" in run for run in runs)
    # and every gather_sdpa-like overhead was taken on its own device's sdpa_contiguous
    assert all(r["derived"]["overhead_pct"] is not None for r in records
               if r["op"] == "paged_sdpa")


def test_native_cpu_on_two_cores_through_the_command_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not registry.get_backend("native:cpu").availability():
        pytest.skip("native:cpu is not built here")
    cores = ",".join(f"cpu:{c}" for c in _cores()[:2])
    two = _cli_sweep(tmp_path, "two.jsonl", "--devices", cores)
    planned = expand(make_grid("smoke", backend="native:cpu", ctx="64,100"))
    assert _keys(two) == sorted(map(record_key_of, planned))   # the one-device sweep's cases
    records = read_results(two)[1]
    assert {r["device_index"] for r in records} == set(_cores()[:2])
    assert all(r["status"] == "ok" for r in records)
    capsys.readouterr()
    # the dry run shows the dealing
    assert main(["sweep", "--preset", "smoke", "--backend", "native:cpu", "--ctx", "64,100",
                 "--devices", cores, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert all(f"cpu:{c}: 18 measurements" in text for c in _cores()[:2])


def test_the_command_line_refuses_agreement_without_devices(tmp_path: Path) -> None:
    assert main(["sweep", "--preset", "smoke", "--backend", "native:cpu", "--agreement",
                 str(tmp_path / "a.jsonl"), "--dry-run"]) == 2
    assert main(["sweep", "--preset", "smoke", "--backend", "native:cpu", "--devices",
                 f"cpu:{_cores()[0]}", "--agreement", str(tmp_path / "a.jsonl"),
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    assert main(["sweep", "--preset", "smoke", "--backend", "native:cpu", "--devices",
                 "cuda:0,cpu:1", "--dry-run"]) == 2
    assert main(["sweep", "--preset", "smoke", "--backend", "native:cpu", "--devices",
                 "cpu:0,cpu:1", "--agreement-threshold", "-1", "--dry-run"]) == 2
    assert main(["agree", str(tmp_path / "missing.jsonl")]) == 2


def test_without_devices_records_name_no_device(tmp_path: Path) -> None:
    points = expand(make_grid("smoke", backend="native:cpu"))[:2]
    out = tmp_path / "r.jsonl"
    run_sweep(points, out, argv=["test"], measure=FAST, progress=False)
    runs, records = read_results(out)
    assert "pinned_devices" not in runs[0]
    assert all("device_index" not in r for r in records)


def test_ctrl_c_stops_every_devices_workers_and_keeps_the_finished_records(
        tmp_path: Path) -> None:
    here = Path(__file__).resolve().parent
    out = tmp_path / "r.jsonl"
    code = (f"import sys; sys.path[:0] = [{str(here)!r}, {str(here.parent / 'src')!r}]; "
            "from kvmicro.backends import registry; "
            "registry._FACTORIES['core:cpu'] = ('test_devices', 'CoreBackend'); "
            "from kvmicro.cli import main; raise SystemExit(main(sys.argv[1:]))")
    cores = ",".join(f"cpu:{c}" for c in _cores()[:2])
    argv = [sys.executable, "-c", code, "sweep", "--backend", "core:cpu", "--preset", "smoke",
            "--ctx", "40,70,100,130,160,190", "--batch", "1", "--op", "sdpa_contiguous,gather",
            "--layout", "NSHD", "--timer", "host", "--cache", "hot", "--min-samples", "5",
            "--max-time", "0.01", "--devices", cores, "--out", str(out), "-q"]
    env = {**os.environ, LOG_ENV: str(tmp_path / "log.jsonl")}   # 0.3 s per prepare
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    workers, err = ctrl_c_after_records(proc, out, 2)
    assert len(workers) == 2, "one worker per device"
    assert_stopped_by_ctrl_c(proc, err, workers)
    records = read_results(out)[1]
    assert 2 <= len(records) < 12 and all(r["status"] == "ok" for r in records)


def test_a_devices_sweep_file_fits_the_results_schema(fake_devices: Any, tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from importlib.resources import files

    schema = json.loads(files("kvmicro").joinpath("schema/results-v2.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    out = tmp_path / "r.jsonl"
    run_sweep([], out, argv=["test"], measure=FAST, progress=False,
              lanes=deal(expand(grid("fakegpu:cuda", ctxs=(40, 70))),
                         [Device("cuda", 0), Device("cuda", 1)]))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert "pinned_devices" in lines[0] and "pci_bus_id" in lines[1]
    for line in lines:
        assert not list(validator.iter_errors(line)), line
    assert list(validator.iter_errors({**lines[1], "device_index": -1}))
