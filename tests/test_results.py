"""Results files: the case record, its round trip through JSONL, append-only writing, resume after a
killed writer, schema versions, pytest-benchmark JSON, merge, provenance and the environment."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from kvmicro.backends.base import Availability, Backend, DeviceInfo, Prepared
from kvmicro.check import CheckResult
from kvmicro.derived import derive
from kvmicro.environment import VECTOR_FLAGS, framework_versions, host_info
from kvmicro.errors import InvalidCase
from kvmicro.harness import ColdRotate, HotCache, MeasureConfig, Stats, measure
from kvmicro.results import (
    SCHEMA_VERSION,
    ResultsWriter,
    case_key,
    case_record,
    dumps,
    merge,
    provenance,
    provenance_differences,
    read_results,
    record_key,
)
from kvmicro.workload import Case

SRC = Path(__file__).resolve().parents[1] / "src"
CASE = Case(op="paged_sdpa", backend="native:cpu", batch=2, q_heads=28, kv_heads=4, head_dim=80,
            ctx=(37, 300), block_size=16, layout="HNSD", placement="random", dtype="float16",
            seed=3)


class Scripted(Prepared):
    """A prepared case whose device clock returns scripted samples."""

    timers = ("host", "device")

    def __init__(self, case: Case, values, copies: int = 1) -> None:
        super().__init__(case)
        self.values = iter(values)
        self.copies = copies

    def run(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def output(self):
        return None

    def device_times(self, reps: int, flush_bytes: int = 0) -> list[float]:
        return [float(next(self.values)) for _ in range(reps)]


def measured(case: Case = CASE, values=None, **config):
    values = values if values is not None else np.random.default_rng(0).normal(50, 0.5, 10_000)
    cfg = MeasureConfig(**{"timer": "device", "cache": "hot", "warmup_count": 1,
                           "warmup_time_s": 0.0, **config})
    return measure(Scripted(case, values), cfg, HotCache(1 << 20))


def ok_record(case: Case = CASE, **kw):
    m = kw.pop("measurement", None) or measured(case)
    return case_record(case, status="ok", measurement=m,
                       check=CheckResult(1e-3, 4e-3, True), derived=derive(case, m.stats, 20.0),
                       device="fake cpu", **kw)


def provenance_for(host: str = "box-a") -> dict:
    return {"type": "run", "schema_version": SCHEMA_VERSION, "kvmicro_version": "0.1.0",
            "host": {"hostname": host, "cpu": {"model": "EPYC"}}, "argv": ["kvmicro", "sweep"]}


# ------------------------------------------------------------------------------ the record


def test_case_record_has_the_issue_fields():
    rec = ok_record()
    for field in ("backend", "device", "op", "layout", "placement", "slack", "batch", "q_heads",
                  "kv_heads", "head_dim", "ctx", "block_size", "dtype", "frag_pct", "timer",
                  "cache", "cache_bytes", "cache_pools", "criterion", "samples_us", "stats",
                  "derived", "check", "status", "reason", "flags"):
        assert field in rec, field
    assert rec["type"] == "case" and rec["schema_version"] == SCHEMA_VERSION
    assert rec["ctx"] == [37, 300] and rec["frag_pct"] == pytest.approx(CASE.frag_pct, abs=1e-3)
    assert set(Stats.FIELDS) | {"converged"} == set(rec["stats"])
    assert set(rec["derived"]) >= {"bytes", "gbps", "pct_of_peak", "overhead_pct"}
    assert rec["check"] == {"max_abs_err": 1e-3, "tolerance": 4e-3, "passed": True,
                            "detail": ""}
    assert rec["timer"] == "device" and rec["cache"] == "hot" and rec["status"] == "ok"
    assert rec["criterion"]["name"] == "ci-median" and rec["stats"]["converged"] is True


def test_record_round_trips_through_the_file(tmp_path):
    rec = ok_record()
    path = tmp_path / "r.jsonl"
    with ResultsWriter(path, provenance_for()) as w:
        w.write(rec)
    runs, cases = read_results(path)
    assert len(runs) == 1 and runs[0]["type"] == "run"
    assert cases == [json.loads(json.dumps(rec))]
    back = cases[0]
    assert Stats.from_dict(back["stats"]) == Stats.from_samples(rec["samples_us"])
    assert Case.from_flat(back) == CASE
    assert record_key(back) == record_key(rec)


def test_lines_are_strict_json():
    rec = case_record(CASE, status="error", reason="shape mismatch", timer="host",
                      cache="cold:flush", check=CheckResult(float("inf"), 4e-3, False, "NaN"))
    line = dumps(rec)

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    assert json.loads(line, parse_constant=refuse)["check"]["max_abs_err"] is None
    assert dumps({"x": np.float32(1.5), "n": np.int64(3), "a": np.arange(2)}) == \
        '{"x": 1.5, "n": 3, "a": [0, 1]}'


def test_skipped_and_error_records_carry_the_timer_and_cache_they_were_meant_for():
    skipped = case_record(CASE, status="skipped", reason="no GPU",
                          extra={"timer": "graph", "cache": "cold:rotate"})
    assert skipped["timer"] == "graph" and skipped["cache"] == "cold:rotate"
    assert skipped["stats"] is None and skipped["samples_us"] == [] and skipped["flags"] == []
    assert record_key(skipped) == case_key(CASE, "graph", "cold:rotate")
    assert record_key(skipped) != case_key(CASE, "graph", "hot")
    error = case_record(CASE, status="error", reason="oracle mismatch", timer="host",
                        cache="cold:flush", check={"max_abs_err": 0.5, "tolerance": 0.004,
                                                   "passed": False})
    assert error["check"]["passed"] is False


def test_record_key_identifies_the_case():
    rec = ok_record()
    assert record_key(rec) == case_key(CASE, "device", "hot")
    # an int ctx and the same ctx spelled per sequence are one case
    uniform = Case(op="gather", batch=2, ctx=64)
    assert case_key(uniform, "host", "hot") == case_key(uniform.with_(ctx=(64, 64)), "host", "hot")
    for change in ({"layout": "NSHD"}, {"placement": "reverse"}, {"seed": 4}, {"slack": 1.5},
                   {"dtype": "float32"}, {"block_size": 32}, {"backend": "torch:cpu"}):
        assert case_key(CASE.with_(**change), "device", "hot") != record_key(rec), change


@pytest.mark.parametrize("kwargs,text", [
    ({"status": "fine"}, "status 'fine'"),
    ({"status": "ok"}, "needs its measurement"),
    ({"status": "skipped"}, "needs a reason"),
    ({"status": "skipped", "reason": "x", "extra": {"stats": 1}}, "extra fields stats"),
    ({"status": "skipped", "reason": "x", "extra": {"op": "gather"}}, "extra fields op"),
])
def test_bad_records_are_refused(kwargs, text):
    with pytest.raises(InvalidCase, match=text):
        case_record(CASE, **kwargs)


def test_extra_fields_land_at_the_top_level():
    rec = ok_record(extra={"path": "tensor-cores", "priority": "high"})
    assert rec["path"] == "tensor-cores" and rec["priority"] == "high"


def test_flags():
    quiet = ok_record()
    assert quiet["flags"] == []
    noisy_values = np.random.default_rng(1).lognormal(3.0, 1.0, 10_000)
    noisy = ok_record(measurement=measured(values=noisy_values, max_samples=100))
    # 100 lognormal samples: the median's CI is wider than the 2% noise target, and the samples
    # spread over more than 10% of it
    assert {"noisy", "wide-spread", "not-converged"} <= set(noisy["flags"])
    assert noisy["stats"]["spread_pct"] > 10
    # the spread threshold moves wide-spread only; noisy is about the median's CI
    relaxed = ok_record(measurement=measured(values=noisy_values, max_samples=100),
                        spread_threshold_pct=1e9)["flags"]
    assert "wide-spread" not in relaxed and "noisy" in relaxed
    few = ok_record(measurement=measured(criterion="sample-count", min_samples=3))
    assert "few-samples" in few["flags"]


def test_flags_for_dropped_samples_and_a_short_rotation():
    m = measured()
    m.dropped, m.dropped_why = 4, {"throttled": 4}
    rotate = ColdRotate(cache_bytes=1 << 40)
    m.cache = rotate.describe(Scripted(CASE, [], copies=2))
    rec = ok_record(measurement=m)
    assert {"dropped", "cache-not-cold"} <= set(rec["flags"])
    assert rec["dropped_why"] == {"throttled": 4} and rec["cache_pools"] == 2


# ------------------------------------------------------------------------------- writing


def test_writer_never_overwrites(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResultsWriter(path, provenance_for()) as w:
        w.write(ok_record())
    before = path.read_bytes()
    with pytest.raises(InvalidCase, match=r"never overwritten.*--resume"):
        ResultsWriter(path, provenance_for())
    assert path.read_bytes() == before


def test_writer_appends_one_durable_line_per_record(tmp_path):
    path = tmp_path / "r.jsonl"
    w = ResultsWriter(path, provenance_for())
    w.write(ok_record())
    # visible to a reader while the writer is still open (flushed, not buffered)
    assert len(path.read_text().splitlines()) == 2
    w.write(ok_record(CASE.with_(layout="NSHD")))
    w.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["run", "case", "case"]
    with pytest.raises(InvalidCase, match="takes case records"):
        ResultsWriter(tmp_path / "other.jsonl", provenance_for()).write(provenance_for())


def test_resume_after_a_killed_writer(tmp_path):
    path = tmp_path / "sweep.jsonl"
    cases = [CASE.with_(layout=lay) for lay in ("NSHD", "HNSD", "NHSD")]
    with ResultsWriter(path, provenance_for()) as w:
        for c in cases:
            w.write(ok_record(c))
    # the writer was killed halfway through its last line
    data = path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[:last_start + (len(data) - last_start) // 2])

    with pytest.warns(UserWarning, match="truncated or damaged last line"):
        runs, found = read_results(path)
    assert len(runs) == 1 and [r["layout"] for r in found] == ["NSHD", "HNSD"]

    with pytest.warns(UserWarning, match="dropping a truncated or damaged last line"):
        w = ResultsWriter(path, provenance_for(), resume=True)
    with w:
        assert w.done_keys == {case_key(c, "device", "hot") for c in cases[:2]}
        todo = [c for c in cases if case_key(c, "device", "hot") not in w.done_keys]
        assert todo == [cases[2]]
        w.write(ok_record(todo[0]))
        assert case_key(cases[2], "device", "hot") in w.done_keys
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the file is whole again: no truncation warning
        runs, found = read_results(path)
    assert [r.get("resumed", False) for r in runs] == [False, True]
    assert [r["layout"] for r in found] == ["NSHD", "HNSD", "NHSD"]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_resume_keeps_a_complete_last_line_that_lost_its_newline(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResultsWriter(path, provenance_for()) as w:
        w.write(ok_record())
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    with ResultsWriter(path, provenance_for(), resume=True) as w:
        assert len(w.done_keys) == 1
    assert len(read_results(path)[1]) == 1


def test_resume_of_a_missing_file_starts_it(tmp_path):
    with ResultsWriter(tmp_path / "new.jsonl", provenance_for(), resume=True) as w:
        assert w.done_keys == set()
    assert read_results(tmp_path / "new.jsonl")[0][0].get("resumed") is None


def test_resume_warns_on_different_provenance(tmp_path):
    path = tmp_path / "r.jsonl"
    ResultsWriter(path, provenance_for("box-a")).close()
    with pytest.warns(UserWarning, match="host.hostname: 'box-a' vs 'box-b'"):
        ResultsWriter(path, provenance_for("box-b"), resume=True).close()


def test_a_last_line_that_is_not_utf8_is_one_damaged_line_to_report_and_to_resume(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResultsWriter(path, provenance_for()) as w:
        w.write(ok_record(CASE.with_(layout="NSHD")))
        w.write(ok_record(CASE.with_(layout="HNSD")))
    data = path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    # a killed writer (or a disk) left bytes that are not UTF-8 in the last line, newline and all
    path.write_bytes(data[:last_start] + b'{"type": "case", "lay\xff\xfe' + b"\n")

    with pytest.warns(UserWarning, match=r"r.jsonl:3: ignoring a truncated or damaged last line "
                                         r"\(not valid UTF-8 at byte \d+"):
        runs, found = read_results(path)       # what `kvmicro report` reads
    assert [r["layout"] for r in found] == ["NSHD"]

    with pytest.warns(UserWarning, match="dropping a truncated or damaged last line"):
        w = ResultsWriter(path, provenance_for(), resume=True)
    with w:
        assert w.done_keys == {case_key(CASE.with_(layout="NSHD"), "device", "hot")}
        w.write(ok_record(CASE.with_(layout="HNSD")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runs, found = read_results(path)
    assert [r["layout"] for r in found] == ["NSHD", "HNSD"] and len(runs) == 2


def test_a_damaged_line_before_the_last_is_an_error_naming_it(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResultsWriter(path, provenance_for()) as w:
        w.write(ok_record())
        w.write(ok_record())
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][:30] + b"\xff" + lines[1][30:]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(InvalidCase, match=r"r.jsonl:2: not valid UTF-8 at byte 30; the file is "
                                          r"corrupt before its last line"):
        read_results(path)
    with pytest.raises(InvalidCase, match=r"r.jsonl:2: not valid UTF-8"):
        ResultsWriter(path, provenance_for(), resume=True)


def test_a_results_file_has_one_writer_at_a_time(tmp_path):
    path = tmp_path / "r.jsonl"
    first = ResultsWriter(path, provenance_for())
    with pytest.raises(InvalidCase, match=r"r.jsonl is being written by another kvmicro process"):
        ResultsWriter(path, provenance_for(), resume=True)
    first.write(ok_record())
    first.close()
    # the refused writer wrote nothing: one run line and one case
    assert len(path.read_text().splitlines()) == 2
    with ResultsWriter(path, provenance_for(), resume=True) as again:
        assert len(again.done_keys) == 1


def test_a_second_process_cannot_resume_a_file_being_written(tmp_path):
    path = tmp_path / "r.jsonl"
    script = textwrap.dedent(f"""
        import sys
        from kvmicro.errors import InvalidCase
        from kvmicro.results import ResultsWriter
        try:
            ResultsWriter({str(path)!r}, {{"argv": []}}, resume=True)
        except InvalidCase as exc:
            print(exc)
            sys.exit(3)
    """)
    env = {**__import__("os").environ,
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    with ResultsWriter(path, provenance_for()) as w:
        w.write(ok_record())
        held = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env=env, timeout=120)
    assert held.returncode == 3 and "being written by another kvmicro process" in held.stdout
    free = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert free.returncode == 0, free.stdout + free.stderr


# ------------------------------------------------------------------------------- reading


def test_corruption_before_the_last_line_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResultsWriter(path, provenance_for()) as w:
        w.write(ok_record())
        w.write(ok_record())
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:40]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidCase, match=r"r.jsonl:2: not a JSON line"):
        read_results(path)


@pytest.mark.parametrize("version,ok", [(1, True), ("1.4", True), (2, True), ("2.0", True),
                                        (3, False), ("3.1", False), (None, False)])
def test_schema_versions(tmp_path, version, ok):
    path = tmp_path / "r.jsonl"
    rec = {**ok_record(), "schema_version": version}
    path.write_text(json.dumps(rec) + "\n")
    if ok:
        assert len(read_results(path)[1]) == 1
    elif version is None:
        with pytest.raises(InvalidCase, match="no usable schema_version"):
            read_results(path)
    else:
        with pytest.raises(InvalidCase, match=f"schema_version {version} is not readable by this "
                           "kvmicro"):
            read_results(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(InvalidCase, match=r"nope\.jsonl does not exist"):
        read_results(tmp_path / "nope.jsonl")


BENCH_FILE = '''
import pytest

CASE = {case!r}
RECORD = {record!r}

def test_plugin_style(benchmark):
    benchmark.group = "paged_sdpa ctx=37,300"
    benchmark.extra_info.update({{
        "kvmicro": 1, "case": CASE, "device": "fake cpu", "timer": "host", "cache": "hot",
        "check": {{"max_abs_err": 0.001, "tolerance": 0.004, "passed": True}},
        "derived": {{"bytes": 1000000, "gbps": 2.0, "pct_of_peak": 10.0, "overhead_pct": 5.0}},
        "device_timer": {{"timer": "device", "cache": {{"name": "cold:flush", "bytes": 64}},
                          "stats": RECORD["stats"], "samples_us": RECORD["samples_us"],
                          "criterion": RECORD["criterion"]}},
    }})
    benchmark.pedantic(lambda: sum(range(100)), rounds=7, iterations=3)

def test_whole_record(benchmark):
    benchmark.extra_info.update(RECORD)
    benchmark.pedantic(lambda: None, rounds=3)

def test_not_kvmicro(benchmark):
    benchmark.pedantic(lambda: None, rounds=2)
'''


def test_reads_pytest_benchmark_json(tmp_path):
    record = ok_record()
    (tmp_path / "test_b.py").write_text(textwrap.dedent(BENCH_FILE.format(case=CASE.flat(),
                                                                          record=record)))
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:kvmicro",
         f"--benchmark-json={out}", str(tmp_path / "test_b.py")],
        cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(SRC)}, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    with pytest.warns(UserWarning, match="1 benchmark.*without kvmicro case fields"):
        runs, cases = read_results(out)
    assert runs[0]["type"] == "run" and runs[0]["source"] == "pytest-benchmark"
    assert runs[0]["host"]["hostname"] and runs[0]["schema_version"] == SCHEMA_VERSION
    host, device, whole = cases
    # the benchmark's own timing: 7 rounds of 3 iterations, per iteration, in µs
    assert host["timer"] == "host" and host["cache"] == "hot" and host["stats"]["n"] == 7
    assert len(host["samples_us"]) == 7 and host["stats"]["median_us"] > 0
    assert Case.from_flat(host) == CASE and host["device"] == "fake cpu"
    assert host["derived"]["overhead_pct"] == 5.0 and host["check"]["passed"] is True
    assert host["benchmark"].endswith("test_plugin_style") and host["status"] == "ok"
    # kvmicro's device timer, carried alongside
    assert device["timer"] == "device" and device["cache"] == "cold:flush"
    assert device["stats"] == record["stats"] and device["samples_us"] == record["samples_us"]
    assert device["derived"]["gbps"] == pytest.approx(1e6 / record["stats"]["median_us"] / 1e3)
    assert device["derived"]["overhead_pct"] is None
    assert record_key(device) == case_key(CASE, "device", "cold:flush")
    # a whole kvmicro record in extra_info comes back as itself
    assert {k: whole[k] for k in record} == record


# ------------------------------------------------------------------------------- merging


def _shard(path: Path, host: str, cases: list[Case]) -> None:
    with ResultsWriter(path, provenance_for(host)) as w:
        for c in cases:
            w.write(ok_record(c))


def test_merge_joins_shards_and_warns_on_provenance(tmp_path):
    a, b, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "all.jsonl"
    _shard(a, "box-a", [CASE.with_(layout="NSHD"), CASE.with_(layout="HNSD")])
    _shard(b, "box-b", [CASE.with_(layout="NHSD")])
    with pytest.warns(UserWarning, match="provenance of .*b.jsonl differs.*box-a.*box-b"):
        n = merge([a, b], out)
    assert n == 3
    runs, cases = read_results(out)
    assert [r["host"]["hostname"] for r in runs] == ["box-a", "box-b"]
    assert [c["layout"] for c in cases] == ["NSHD", "HNSD", "NHSD"]
    with pytest.raises(InvalidCase, match="never overwrites"):
        merge([a], out)


def test_merge_of_compatible_shards_is_quiet_and_flags_repeats(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _shard(a, "box", [CASE])
    _shard(b, "box", [CASE.with_(seed=9)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert merge([a, b], tmp_path / "ok.jsonl") == 2
    with pytest.warns(UserWarning, match="1 case.*more than once"):
        assert merge([a, a.with_name("a.jsonl")], tmp_path / "dup.jsonl") == 2


def test_provenance_differences_compare_what_matters():
    a = {"host": {"hostname": "x", "cpu": {"model": "EPYC"}}, "frameworks": {"torch": "2.13",
         "mlx": None}, "devices": {"torch:cpu": {"name": "cpu0", "cache_bytes": 1}}}
    b = {"host": {"hostname": "x", "cpu": {"model": "EPYC"}}, "frameworks": {"torch": "2.11",
         "mlx": "0.3"}, "devices": {"torch:cpu": {"name": "cpu0", "cache_bytes": 2},
                                     "native:cpu": {"name": "cpu0"}}}
    assert provenance_differences(a, b) == ["frameworks.torch: 2.13 vs 2.11"]
    assert provenance_differences(a, a) == []


# ------------------------------------------------------------------- provenance, environment


class FakeBackend(Backend):
    name = "fake:cpu"
    ops = ("paged_sdpa",)

    def availability(self) -> Availability:
        return Availability(True, "always")

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(name="fake cpu", kind="cpu", cache_bytes=32 << 20,
                          extra={"threads": np.int64(2)})

    def prepare(self, case, arrays, copies=1):
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        return {"fake": "1.0"}


class BrokenBackend(FakeBackend):
    def device_info(self) -> DeviceInfo:
        raise RuntimeError("driver went away")


@pytest.fixture
def fake_backends(monkeypatch):
    from kvmicro.backends import registry

    module = types.ModuleType("kvmicro_fake_backends")
    module.FakeBackend, module.BrokenBackend = FakeBackend, BrokenBackend
    monkeypatch.setitem(sys.modules, "kvmicro_fake_backends", module)
    monkeypatch.setitem(registry._FACTORIES, "fake:cpu", ("kvmicro_fake_backends", "FakeBackend"))
    monkeypatch.setitem(registry._FACTORIES, "broken:cpu",
                        ("kvmicro_fake_backends", "BrokenBackend"))
    registry.get_backend.cache_clear()
    yield
    registry.get_backend.cache_clear()


def test_provenance_line(fake_backends):
    bw = {"fake:cpu": {"read_gbps": 16.0, "copy_gbps": 20.0, "method": "numpy"}}
    prov = provenance(["kvmicro", "sweep", "--preset", "quick"], ["fake:cpu", "broken:cpu"], bw)
    json.loads(dumps(prov))
    assert prov["type"] == "run" and prov["schema_version"] == SCHEMA_VERSION
    assert prov["argv"] == ["kvmicro", "sweep", "--preset", "quick"]
    assert prov["kvmicro_version"] and prov["started_at"].endswith("+00:00")
    assert prov["bandwidth"] == bw
    dev = prov["devices"]["fake:cpu"]
    assert dev["name"] == "fake cpu" and dev["cache_bytes"] == 32 << 20
    assert dev["extra"] == {"threads": 2} and dev["versions"] == {"fake": "1.0"}
    assert prov["devices"]["broken:cpu"] == {"available": False,
                                             "error": "RuntimeError: driver went away"}
    assert prov["host"]["cpu"]["model"] and "numpy" in prov["frameworks"]


def test_host_info():
    info = host_info()
    for key in ("hostname", "os", "kernel", "python", "cpu", "memory_bytes", "frameworks",
                "git"):
        assert key in info
    assert set(info["cpu"]["vector_flags"]) <= set(VECTOR_FLAGS)
    assert info["cpu"]["cores"] >= info["cpu"]["usable_cores"] >= 1
    assert info["frameworks"]["numpy"] == np.__version__
    json.dumps(info)
    if sys.platform.startswith("linux") and "avx2" in Path("/proc/cpuinfo").read_text():
        assert "avx2" in info["cpu"]["vector_flags"]


def test_framework_versions_never_import(monkeypatch):
    import kvmicro.environment as env

    monkeypatch.setattr(env, "FRAMEWORKS", {"numpy": "numpy", "no-such-dist-kvmicro": "ghost"})
    assert framework_versions() == {"numpy": np.__version__, "ghost": None}


def test_kvmicro_report_reads_a_file_whose_last_line_is_not_utf8(tmp_path, capsys):
    from kvmicro.cli import main

    path = tmp_path / "r.jsonl"
    with ResultsWriter(path, provenance_for()) as w:
        w.write(ok_record())
    path.write_bytes(path.read_bytes() + b'{"type": "case", "\xff\xfe')
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["report", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "paged_sdpa" in out
    assert "r.jsonl:3: ignoring a truncated or damaged last line (not valid UTF-8" in err
