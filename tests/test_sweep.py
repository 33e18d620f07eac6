"""Sweeps: the grid is what the axes say, in an order that serves the overhead figure; shards
partition it; every point becomes exactly one record (ok, skipped or error, never a crash); a
killed or interrupted sweep leaves a valid file that --resume completes without duplicates.

The sweeps here run on ``fake:cpu``, a backend defined in this file: it returns the oracle's answer
(or a wrong one, or raises, on request) after a few microseconds of numpy work, so the machinery
is tested in seconds and independently of any real backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvmicro import InvalidCase, oracle
from kvmicro.backends import registry
from kvmicro.backends.base import Availability, Backend, DeviceInfo, Prepared
from kvmicro.dtypes import carrier
from kvmicro.results import read_results, record_key
from kvmicro.sweep import (
    PRESETS,
    ArrayCache,
    Grid,
    Progress,
    exact_check,
    expand,
    make_grid,
    parse_axis,
    parse_shard,
    run_sweep,
    shape_groups,
)
from kvmicro.workload import OPS, Case, materialize

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

# --------------------------------------------------------------------------- the fake backend


class FakePrepared(Prepared):
    timers = ("host", "batched")

    def __init__(self, case: Case, arrays: dict[str, np.ndarray], copies: int) -> None:
        super().__init__(case)
        self.copies = copies
        ref = oracle.run(case, arrays)
        dtype = carrier(case.dtype)
        self._out = (tuple(r.astype(dtype) for r in ref) if isinstance(ref, tuple)
                     else ref.astype(dtype))
        if case.op in os.environ.get("KVMICRO_FAKE_WRONG", "").split(","):
            self._out = self._out + 1.0 if not isinstance(self._out, tuple) else \
                tuple(o + 1.0 for o in self._out)
        self._sleep = float(os.environ.get("KVMICRO_FAKE_SLEEP_S", "0"))
        self._work = np.zeros(64)

    def run(self) -> None:
        self._work += 1.0
        if self._sleep:
            time.sleep(self._sleep)

    def sync(self) -> None:
        pass

    def output(self) -> Any:
        return self._out


class FakeBackend(Backend):
    """Implements every op but paged_sdpa (refused: a skipped record)."""

    name = "fake:cpu"
    ops = ("sdpa_contiguous", "gather", "gather_sdpa", "append")

    def availability(self) -> Availability:
        return Availability(True, "test double")

    def device_info(self) -> DeviceInfo:
        return DeviceInfo("fake cpu", "cpu", cache_bytes=1 << 16, memory_bytes=1 << 28)

    def bandwidth(self) -> dict[str, float]:
        return {"read_gbps": 10.0, "copy_gbps": 20.0}

    def prepare(self, case: Case, arrays: dict[str, np.ndarray], copies: int = 1) -> Prepared:
        if case.op in os.environ.get("KVMICRO_FAKE_OOM", "").split(","):
            raise MemoryError(f"cannot allocate {copies} copies")
        if case.op in os.environ.get("KVMICRO_FAKE_RAISE", "").split(","):
            raise RuntimeError("kernel exploded")
        return FakePrepared(case, arrays, copies)


def install_fake() -> None:
    """Register fake:cpu (also used by the subprocesses below)."""
    registry._FACTORIES["fake:cpu"] = (__name__, "FakeBackend")
    registry.get_backend.cache_clear()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setitem(registry._FACTORIES, "fake:cpu", (__name__, "FakeBackend"))
    registry.get_backend.cache_clear()
    yield
    registry.get_backend.cache_clear()


#: sampling settings that make a measurement take milliseconds
FAST = dict(min_samples=5, max_time_s=0.01, warmup_count=1, warmup_time_s=0.0,
            sample_time_s=2e-4)


def tiny_grid(**changes: Any) -> Grid:
    base = dict(backends=("fake:cpu",), ops=OPS, layouts=("NSHD", "HNSD"),
                placements=("reverse",), ctxs=(33, 70), batches=(1, 2), blocks=(16,),
                heads=((4, 2),), head_dims=(16,), dtypes=("float32",), slacks=(2.0,),
                timers=("host", "batched"), caches=("hot",))
    return Grid(**{**base, **changes})


def keys_in(path: Path) -> list[tuple[Any, ...]]:
    return [record_key(r) for r in read_results(path)[1]]


# ------------------------------------------------------------------------------ axes, presets


def test_axes_parse_lists_and_reject_bad_values_naming_them_and_the_valid_ones() -> None:
    assert parse_axis("layout", "nshd,HNSD,nshd") == ("NSHD", "HNSD")
    assert parse_axis("layout", "presets") == ("NSHD", "HNSD", "NHSD")
    assert len(parse_axis("layout", "all")) == 24
    assert parse_axis("ctx", "1024, 37+300") == (1024, (37, 300))
    assert parse_axis("heads", "32:8,28:4") == ((32, 8), (28, 4))
    assert parse_axis("op", "all") == OPS
    assert parse_axis("slack", "1,2.5") == (1.0, 2.5)
    with pytest.raises(InvalidCase, match=r"'NSHQ'.*presets: NSHD, HNSD, NHSD"):
        parse_axis("layout", "NSHD,NSHQ")
    with pytest.raises(InvalidCase, match=r"'attn'.*sdpa_contiguous, gather"):
        parse_axis("op", "attn")
    with pytest.raises(InvalidCase, match="q_heads 32 is not a multiple of kv_heads 5"):
        parse_axis("heads", "32:5")
    with pytest.raises(InvalidCase, match="'32x8' is not q:kv"):
        parse_axis("heads", "32x8")
    with pytest.raises(InvalidCase, match="-4 must be a positive integer"):
        parse_axis("batch", "1,-4")
    with pytest.raises(InvalidCase, match=r"'warm'.*hot, cold, cold:flush, cold:rotate"):
        parse_axis("cache", "warm")
    with pytest.raises(InvalidCase, match="unknown backend 'cuda'"):
        parse_axis("backend", "cuda")
    with pytest.raises(InvalidCase, match=r"slack.*>= 1\.0"):
        parse_axis("slack", "0.5")


def test_presets_hold_the_issue_grids_and_overrides_replace_an_axis() -> None:
    seed = make_grid("seed", backend="torch:cpu")
    assert seed.ctxs == (1024, 4096, 16384, 32768) and seed.batches == (1, 4)
    assert seed.blocks == (16, 32, 64) and seed.heads == ((32, 8),) and seed.head_dims == (128,)
    assert seed.dtypes == ("float16",) and seed.layouts == ("NSHD", "HNSD")
    assert seed.placements == ("reverse",) and seed.slacks == (2.0,) and seed.ops == OPS
    assert seed.gpu_timers == ("graph", "device")
    quick = make_grid("quick", backend="torch:cpu", ctx="512", layout="NHSD")
    assert quick.ctxs == (512,) and quick.layouts == ("NHSD",)
    assert quick.batches == PRESETS["quick"].axes["batches"]
    with pytest.raises(InvalidCase, match=r"unknown preset 'fast'.*smoke, quick, seed, full"):
        make_grid("fast")


def test_each_shape_group_starts_with_sdpa_contiguous_measured_once_per_shape() -> None:
    grid = tiny_grid(backends=("fake:cpu", "torch:cpu"), timers=("batched",))
    groups = shape_groups(grid)
    assert len(groups) == 4                                   # 2 ctx x 2 batch
    for group in groups:
        ops = [p.case.op for p in group]
        n_contig = ops.count("sdpa_contiguous")
        assert n_contig == 2                                  # once per backend, not per layout
        assert set(ops[:n_contig]) == {"sdpa_contiguous"}
        assert len(group) == 2 + 2 * 2 * 4                    # + backends x layouts x other ops
        assert len({(p.case.batch, p.case.ctx) for p in group}) == 1
    # cheapest shape first: tokens x heads x dim
    tokens = [g[0].case.batch * g[0].case.ctx for g in groups]
    assert tokens == sorted(tokens)


def test_cold_names_the_concrete_policy_per_timer() -> None:
    points = expand(tiny_grid(ops=("gather",), layouts=("NSHD",), ctxs=(33,), batches=(1,),
                              caches=("cold",)))
    assert {(p.timer, p.cache) for p in points} == {("host", "cold:flush"),
                                                    ("batched", "cold:rotate")}


def test_a_ragged_ctx_pairs_only_with_its_batch() -> None:
    points = expand(tiny_grid(ctxs=((37, 300), 64), batches=(1, 2), ops=("gather",),
                              layouts=("NSHD",), timers=("host",)))
    shapes = sorted((p.case.batch, str(p.case.ctx)) for p in points)
    assert shapes == [(1, "64"), (2, "(37, 300)"), (2, "64")]
    with pytest.raises(InvalidCase, match="ragged ctx 37\\+300 has 2 sequences"):
        expand(tiny_grid(ctxs=((37, 300),), batches=(1, 4)))


def test_shards_partition_the_grid_deterministically_and_keep_shapes_whole() -> None:
    grid = tiny_grid(ctxs=(33, 70, 150), batches=(1, 2, 3))
    everything = expand(grid)
    shards = [expand(grid, (i, 3)) for i in range(3)]
    assert sorted(map(repr, everything)) == sorted(repr(p) for s in shards for p in s)
    assert sum(len(s) for s in shards) == len(everything)
    assert all(shards[i] == expand(grid, (i, 3)) for i in range(3))
    for shard in shards:
        shapes = {(p.case.batch, p.case.ctx) for p in shard}
        for other in shards:
            if other is not shard:
                assert not shapes & {(p.case.batch, p.case.ctx) for p in other}
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(InvalidCase, match="--shard"):
            parse_shard(bad)


# -------------------------------------------------------------------------- shared arrays


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["NSHD", "HNSD", "SDNH"])
def test_shared_arrays_and_references_equal_materialize_and_the_oracle(op: str,
                                                                       layout: str) -> None:
    cache = ArrayCache()
    case = Case(op=op, backend="fake:cpu", batch=2, q_heads=6, kv_heads=2, head_dim=8,
                ctx=(16, 41), block_size=8, layout=layout, placement="random", seed=7)
    cache.arrays(case.with_(layout="NHSD"))   # another layout first: must not leak into this one
    arrays, expected = cache.arrays(case), materialize(case)
    assert arrays.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(arrays[key], expected[key], err_msg=key)
    ref, want = cache.reference(case), oracle.run(case, expected)
    for got, exp in zip(ref if isinstance(ref, tuple) else (ref,),
                        want if isinstance(want, tuple) else (want,), strict=True):
        np.testing.assert_allclose(got, exp, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", ["NSHD", "HNSD"])
@pytest.mark.parametrize("op", ["gather", "append"])
def test_the_exact_check_passes_the_oracles_answer_and_nothing_else(op: str,
                                                                    layout: str) -> None:
    cache = ArrayCache()
    case = Case(op=op, backend="fake:cpu", batch=3, q_heads=4, kv_heads=2, head_dim=8,
                ctx=(5, 40, 17), block_size=8, layout=layout, placement="random", dtype="float16")
    expected = cache.expected(case)
    want = oracle.run(case, materialize(case))
    for e, w in zip(expected, want, strict=True):
        assert e.dtype == np.float16
        np.testing.assert_array_equal(e.astype(np.float64), w)
    out = tuple(e.copy() for e in expected)
    assert exact_check(case, out, expected).passed
    if op == "gather":   # what lies past a sequence's ctx is unspecified
        out[0][0, :, 5:] = 7.0
        assert exact_check(case, out, expected).passed
    out[1][(1,) * out[1].ndim] += 1.0
    assert exact_check(case, out, expected) is None
    assert exact_check(case, (out[0], out[1].astype(np.float32)), expected) is None


# ----------------------------------------------------------------------------------- running


def test_every_point_becomes_one_record_and_failures_do_not_stop_the_sweep(
        fake: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMICRO_FAKE_WRONG", "gather")
    monkeypatch.setenv("KVMICRO_FAKE_OOM", "append")
    grid = tiny_grid(ctxs=(33,), batches=(1, 2))
    points = expand(grid)
    out = tmp_path / "r.jsonl"
    outcome = run_sweep(points, out, argv=["test"], measure=FAST, progress=False)
    assert not outcome.interrupted
    runs, records = read_results(out)
    assert len(runs) == 1 and runs[0]["bandwidth"]["fake:cpu"]["copy_gbps"] == 20.0
    assert sorted(keys_in(out)) == sorted(
        record_key({**p.case.flat(), "timer": p.timer, "cache": p.cache}) for p in points)
    by = {(r["op"], r["layout"], r["batch"], r["timer"]): r for r in records}
    for r in records:
        if r["op"] == "paged_sdpa":
            assert r["status"] == "skipped" and "does not implement paged_sdpa" in r["reason"]
        elif r["op"] == "gather":       # the fake returns a wrong answer: an error, never a time
            assert r["status"] == "error" and "disagrees with the oracle" in r["reason"]
            assert r["stats"] is None and r["samples_us"] == [] and not r["check"]["passed"]
        elif r["op"] == "append":
            assert r["status"] == "skipped" and r["reason"].startswith("out of memory")
        else:
            assert r["status"] == "ok", r["reason"]
            assert r["stats"]["n"] >= 1 and len(r["samples_us"]) == r["stats"]["n"]
            assert r["check"]["passed"] and r["derived"]["bytes"] > 0
    # the overhead is against sdpa_contiguous of the same shape, timer and cache
    for (op, _, batch, timer), r in by.items():
        if op == "gather_sdpa":
            base = by[("sdpa_contiguous", "NSHD", batch, timer)]
            want = 100 * (r["stats"]["median_us"] / base["stats"]["median_us"] - 1)
            assert r["derived"]["overhead_pct"] == pytest.approx(want)


def test_records_name_the_kernel_that_ran(tmp_path: Path) -> None:
    grid = tiny_grid(backends=("native:cpu",), ops=("paged_sdpa",), layouts=("NSHD",),
                     ctxs=(33,), batches=(1,), timers=("host",))
    out = tmp_path / "r.jsonl"
    run_sweep(expand(grid), out, argv=["test"], measure=FAST, progress=False)
    (record,) = read_results(out)[1]
    assert record["status"] == "ok", record["reason"]
    assert record["kernel"].startswith("paged_sdpa: ") and "float32" in record["kernel"]


def test_an_exception_is_an_error_record_with_its_reason(fake: Any, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMICRO_FAKE_RAISE", "gather_sdpa")
    points = expand(tiny_grid(ctxs=(33,), batches=(1,), ops=("gather_sdpa", "gather"),
                              timers=("host",)))
    run_sweep(points, tmp_path / "r.jsonl", measure=FAST, progress=False)
    records = read_results(tmp_path / "r.jsonl")[1]
    assert {r["op"]: r["status"] for r in records} == {"gather_sdpa": "error", "gather": "ok"}
    assert all(r["reason"] == "RuntimeError: kernel exploded"
               for r in records if r["op"] == "gather_sdpa")


def test_an_unavailable_backend_gives_skipped_records(tmp_path: Path) -> None:
    points = expand(tiny_grid(backends=("native:metal",), ctxs=(33,), batches=(1,),
                              ops=("gather",), timers=("host",)))
    outcome = run_sweep(points, tmp_path / "r.jsonl", measure=FAST, progress=False)
    assert [r["status"] for r in outcome.records] == ["skipped"] * len(points)
    assert all("native:metal is not available" in r["reason"] for r in outcome.records)


def _sweep_cmd(out: Path, *extra: str) -> list[str]:
    code = (f"import sys; sys.path[:0] = [{str(HERE)!r}, {str(SRC)!r}]; import test_sweep; "
            "test_sweep.install_fake(); from kvmicro.cli import main; "
            "raise SystemExit(main(sys.argv[1:]))")
    return [sys.executable, "-c", code, "sweep", "--backend", "fake:cpu", "--preset", "smoke",
            "--ctx", "33,70", "--batch", "1,2", "--timer", "host", "--cache", "hot",
            "--min-samples", "5", "--max-time", "0.01", "--out", str(out), "-q", *extra]


def _wait_for_records(proc: subprocess.Popen[bytes], path: Path, n: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count('"type": "case"') >= n:
            return
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError("no records appeared")


@pytest.mark.parametrize("how", ["kill", "interrupt"])
def test_a_killed_or_interrupted_sweep_resumes_without_duplicates(fake: Any, tmp_path: Path,
                                                                  how: str) -> None:
    out = tmp_path / "r.jsonl"
    env = {**os.environ, "KVMICRO_FAKE_SLEEP_S": "0.002"}
    proc = subprocess.Popen(_sweep_cmd(out), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        _wait_for_records(proc, out, 3)
        proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    if how == "interrupt":
        assert proc.returncode == 130, err.decode()
        assert b"--resume" in err
    first = keys_in(out)
    assert 3 <= len(first)
    # resume in this process: completes the grid, never repeats a record
    from kvmicro.cli import main

    assert main(_sweep_cmd(out, "--resume")[3:]) == 0
    runs, records = read_results(out)
    keys = [record_key(r) for r in records]
    assert len(keys) == len(set(keys)), "a resumed sweep repeated a record"
    grid = make_grid("smoke", backend="fake:cpu", ctx="33,70", batch="1,2", timer="host",
                     cache="hot")
    assert set(keys) == {record_key({**p.case.flat(), "timer": p.timer, "cache": p.cache})
                         for p in expand(grid)}
    assert set(first) < set(keys)
    assert runs[-1].get("resumed") is True
    # overheads measured after the resume are against the sdpa_contiguous already in the file
    assert all(r["derived"]["overhead_pct"] is not None
               for r in records if r["op"] == "gather_sdpa" and r["status"] == "ok")
    for line in out.read_text().splitlines():
        json.loads(line)                                  # every line is whole


def test_a_resumed_sweep_derives_overheads_from_the_baselines_in_the_file(
        fake: Any, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    grid = tiny_grid(ctxs=(33,), batches=(1,), ops=("sdpa_contiguous", "gather_sdpa"),
                     timers=("host",))
    everything = expand(grid)
    contiguous = [p for p in everything if p.case.op == "sdpa_contiguous"]
    run_sweep(contiguous, out, measure=FAST, progress=False)
    outcome = run_sweep(everything, out, measure=FAST, progress=False, resume=True)
    assert outcome.resumed == len(contiguous)
    assert {r["op"] for r in outcome.records} == {"gather_sdpa"}
    base = next(r for r in read_results(out)[1] if r["op"] == "sdpa_contiguous")
    for r in outcome.records:
        want = 100 * (r["stats"]["median_us"] / base["stats"]["median_us"] - 1)
        assert r["derived"]["overhead_pct"] == pytest.approx(want)


def test_shards_merged_equal_the_unsharded_sweep(fake: Any, tmp_path: Path) -> None:
    from kvmicro.cli import main

    common = ["sweep", "--backend", "fake:cpu", "--preset", "smoke", "--ctx", "33,70",
              "--batch", "1,2", "--op", "gather,gather_sdpa,sdpa_contiguous", "--timer", "host",
              "--cache", "hot", "--min-samples", "5", "--max-time", "0.01", "-q"]
    assert main([*common, "--out", str(tmp_path / "all.jsonl")]) == 0
    for i in range(3):
        assert main([*common, "--shard", f"{i}/3", "--out", str(tmp_path / f"s{i}.jsonl")]) == 0
    shard_keys = [set(keys_in(tmp_path / f"s{i}.jsonl")) for i in range(3)]
    assert sum(map(len, shard_keys)) == len(set().union(*shard_keys))     # disjoint
    assert main(["merge", *(str(tmp_path / f"s{i}.jsonl") for i in range(3)),
                 "--out", str(tmp_path / "merged.jsonl")]) == 0
    merged = keys_in(tmp_path / "merged.jsonl")
    assert sorted(merged) == sorted(keys_in(tmp_path / "all.jsonl"))
    # each shard measured its own sdpa_contiguous, so every gather_sdpa has its overhead
    records = read_results(tmp_path / "merged.jsonl")[1]
    assert all(r["derived"]["overhead_pct"] is not None
               for r in records if r["op"] == "gather_sdpa")


def test_the_quick_preset_stays_small_enough_for_two_minutes_on_a_cpu() -> None:
    # the budget is checked by running it (docs/cli.md); this guards the grid from growing
    points = expand(make_grid("quick", backend="torch:cpu,native:cpu"))
    assert len(points) <= 2 * 2 * 3 * 2 * (1 + 4 * 2)   # backends x dtypes x ctx x batch x ops
    # CPU backends hot: a cold flush of 2x a 300 MiB L3 per sample does not fit the budget
    # (docs/methodology.md, "Huge last-level caches"); --cache still wins over the preset
    assert {(p.timer, p.cache) for p in points} == {("host", "hot")}
    cold = expand(make_grid("quick", backend="native:cpu", cache="cold"))
    assert {(p.timer, p.cache) for p in cold} == {("host", "cold:flush")}



def test_progress_reports_counts_and_an_eta_weighted_by_cost() -> None:
    import io

    stream = io.StringIO()
    bar = Progress(3, stream=stream, enabled=True, every_s=0.0, total_weight=10.0)
    bar.update("first", status="ok", weight=1.0)
    bar.update("second", status="skipped", weight=1.0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[-1].startswith("[################........] 2/3  67% ok 1 skipped 1 |")
    assert "ETA" in lines[-1] and lines[-1].endswith("| second")
    # 2 of 10 cost units done: the ETA is four times the elapsed time, not half of it
    bar.start -= 20.0
    assert bar._eta().startswith("0:20 elapsed, ETA 1:20")


def test_the_rotation_budget_caps_the_copies_a_case_uploads(fake: Any) -> None:
    from kvmicro.derived import footprint_bytes, working_set_bytes
    from kvmicro.sweep import Point, Runner

    case = Case(op="append", backend="fake:cpu", batch=2, q_heads=4, kv_heads=2, head_dim=16,
                ctx=64, block_size=16)
    point = Point(case, "batched", "cold:rotate")
    ws, each = working_set_bytes(case), footprint_bytes(case)
    wide = Runner().cache_policy(point).copies_needed(ws, each)
    narrow = Runner(rotate_budget_bytes=4 * each).cache_policy(point).copies_needed(ws, each)
    assert wide > 4 and narrow == 4
