"""The pytest plugin: --kv-backend/--kv-preset parametrize a bench over the sweep's cases with
readable ids; each bench is checked against the oracle first (a mismatch fails it, a refusal
skips it), grouped by shape, and carries the case and the derived figures in extra_info, so that
`kvmicro report` reads the pytest-benchmark JSON. The plugin is inert for other tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from kvmicro.cli import main
from kvmicro.results import read_results

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

FAKE_BACKEND = '''
import os
import numpy as np
from kvmicro import oracle
from kvmicro.backends.base import Availability, Backend, DeviceInfo, Prepared
from kvmicro.dtypes import carrier


class EchoPrepared(Prepared):
    def __init__(self, case, arrays, copies):
        super().__init__(case)
        self.copies = copies
        ref = oracle.run(case, arrays)
        shift = 0.5 if case.op in os.environ.get("KVMICRO_ECHO_WRONG", "").split(",") else 0.0
        dtype = carrier(case.dtype)
        self._out = (tuple((r + shift).astype(dtype) for r in ref) if isinstance(ref, tuple)
                     else (ref + shift).astype(dtype))
        self._work = np.zeros(16)

    @property
    def kernel(self):
        return f"echo of the oracle ({self.case.op})"

    def run(self):
        self._work += 1.0

    def sync(self):
        pass

    def output(self):
        return self._out


class EchoBackend(Backend):
    name = "fake:cpu"
    ops = ("sdpa_contiguous", "gather", "gather_sdpa", "append")

    def availability(self):
        return Availability(True)

    def device_info(self):
        return DeviceInfo("echo", "cpu", cache_bytes=1 << 16, memory_bytes=1 << 28)

    def bandwidth(self):
        return {"read_gbps": 5.0, "copy_gbps": 10.0}

    def prepare(self, case, arrays, copies=1):
        return EchoPrepared(case, arrays, copies)
'''

CONFTEST = '''
from kvmicro.backends import registry

registry._FACTORIES["fake:cpu"] = ("fakebk", "EchoBackend")
'''

BENCH = '''
def test_op(kv_bench, kv_case):
    kv_bench(kv_case)


def test_plain():
    assert 1 + 1 == 2
'''


def plugin_args() -> list[str]:
    """``-p kvmicro.pytest_plugin`` unless the installed package's entry point loads it."""
    autoload = any(ep.value == "kvmicro.pytest_plugin" for ep in entry_points(group="pytest11"))
    return [] if autoload and not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") else \
        ["-p", "kvmicro.pytest_plugin"]


@pytest.fixture
def bench_dir(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SRC), str(pytester.path)]))
    pytester.makepyfile(fakebk=FAKE_BACKEND, conftest=CONFTEST, test_bench=BENCH)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*plugin_args(), "-p", "no:cacheprovider",
                                         "--kv-backend", "fake:cpu", "--kv-preset", "smoke",
                                         "--kv-budget", "0.005", *args)


def test_benches_are_parametrized_checked_grouped_and_readable_by_report(
        bench_dir: pytest.Pytester, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "bench.json"
    result = run(bench_dir, "-v", f"--benchmark-json={out}")
    # smoke: sdpa_contiguous once + 4 ops x 2 layouts, fake:cpu refuses paged_sdpa; + test_plain
    result.assert_outcomes(passed=1 + 3 * 2 + 1, skipped=2)
    result.stdout.fnmatch_lines([
        "*test_op?sdpa_contiguous-fake:cpu-NSHD-ctx100-b2-bs16-float32? PASSED*",
        "*test_op?paged_sdpa-fake:cpu-NSHD-ctx100-b2-bs16-float32? SKIPPED*",
        "*test_op?gather_sdpa-fake:cpu-HNSD-ctx100-b2-bs16-float32? PASSED*",
    ])
    doc = json.loads(out.read_text())
    benches = doc["benchmarks"]
    assert len(benches) == 7
    shape = "ctx100 b2 bs16 Hq8:Hkv2 D64 float32 reverse slack2"
    assert {b["group"] for b in benches} == {f"{op} {shape}" for op in
                                            ("sdpa_contiguous", "gather", "gather_sdpa", "append")}
    assert all(b["group"].startswith(b["extra_info"]["case"]["op"] + " ") for b in benches)
    by_name = {b["extra_info"]["case"]["op"] + "-" + b["extra_info"]["case"]["layout"]: b
               for b in benches}
    gs = by_name["gather_sdpa-NSHD"]["extra_info"]
    assert gs["check"]["passed"] and gs["timer"] == "host" and gs["cache"] == "hot"
    assert gs["kernel"] == "echo of the oracle (gather_sdpa)"
    assert {r["kernel"] for r in read_results(out)[1]} >= {"echo of the oracle (append)"}
    assert gs["derived"]["bytes"] > 0 and gs["derived"]["overhead_pct"] is not None
    assert by_name["gather-HNSD"]["stats"]["rounds"] >= 5
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "fake:cpu (echo)" in table and "host/hot" in table
    assert "gather_sdpa" in table and "append" in table


def test_a_wrong_answer_fails_the_bench_before_it_is_timed(bench_dir: pytest.Pytester,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMICRO_ECHO_WRONG", "gather")
    result = run(bench_dir, "-k", "gather and not sdpa")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*gather on fake:cpu disagrees with the float64 oracle*"])


def test_the_plugin_leaves_other_tests_alone(bench_dir: pytest.Pytester) -> None:
    result = run(bench_dir, "-k", "plain", "--benchmark-disable")
    result.assert_outcomes(passed=1)


def test_an_unknown_backend_is_a_usage_error(bench_dir: pytest.Pytester) -> None:
    result = bench_dir.runpytest_subprocess(*plugin_args(), "--kv-backend", "cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*kvmicro: --kv-backend: unknown backend 'cuda'*"])


def test_the_repository_benches_collect_with_ids_from_the_preset() -> None:
    pytest.importorskip("torch")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "benches"), "-q",
                           "--collect-only", "--kv-backend", "torch:cpu", "--kv-preset",
                           "smoke", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bench_ops.py::test_op[paged_sdpa-torch:cpu-NSHD-ctx100-b2-bs16-float32]" \
        in proc.stdout
    assert "9 tests collected" in proc.stdout


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("test_op[")]


def test_tables_are_in_microseconds_one_op_per_group_with_few_columns(
        bench_dir: pytest.Pytester) -> None:
    result = run(bench_dir, "-k", "test_op")
    text = result.stdout.str()
    # one table per op and shape: its ratios set backends and layouts of one op side by side
    headers = [line for line in text.splitlines() if "benchmark '" in line]
    assert len(headers) == 4 and all("slack2" in h for h in headers)
    assert any("benchmark 'append ctx100" in h for h in headers)
    names = [line for line in text.splitlines() if line.startswith("Name (time in")]
    assert names and all(line.startswith("Name (time in us)") for line in names)
    assert all("Median" in line and "Max" not in line and "OPS" not in line for line in names)
    assert max(len(line) for line in _table_lines(text) + names) <= 140   # was 283 wide
    # the user's own choice of unit and columns wins
    result = run(bench_dir, "-k", "test_op", "--benchmark-time-unit=ns",
                 "--benchmark-columns=min,max")
    names = [line for line in result.stdout.str().splitlines() if line.startswith("Name (time")]
    assert all(line.startswith("Name (time in ns)") and "Max" in line for line in names)


def test_benchmark_compare_sets_two_saved_runs_side_by_side(bench_dir: pytest.Pytester,
                                                            tmp_path: Path) -> None:
    storage = f"--benchmark-storage=file://{tmp_path / 'store'}"
    for name in ("first", "second"):
        run(bench_dir, "-k", "test_op", storage, f"--benchmark-save={name}").assert_outcomes(
            passed=7, skipped=2)
    saved = sorted(p.name for p in (tmp_path / "store").rglob("*.json"))
    assert saved == ["0001_first.json", "0002_second.json"]
    result = run(bench_dir, "-k", "test_op", storage, "--benchmark-compare=0001",
                 "--benchmark-compare-fail=median:1000%")
    result.assert_outcomes(passed=7, skipped=2)
    rows = _table_lines(result.stdout.str())
    now = [r for r in rows if "(NOW)" in r]
    saved_rows = [r for r in rows if "(0001_first)" in r]
    assert len(now) == len(saved_rows) == 7
    # each saved bench lands in the group of its op, beside this run's bench of the same id
    text = result.stdout.str()
    block = text.split("benchmark 'append ")[1].split("benchmark '")[0]
    assert sum("append-fake:cpu" in r for r in _table_lines(block)) == 4
    compared = run(bench_dir, "--benchmark-compare=0002", "-k", "test_op", storage,
                   "--benchmark-compare-fail=median:1000%")
    assert compared.ret == 0


PIN_BACKEND = '''
import os
from fakebk import EchoBackend
from kvmicro.backends.base import DeviceInfo


class PinBackend(EchoBackend):
    name = "pin:cpu"

    def device_info(self):
        return DeviceInfo(f"cores {sorted(os.sched_getaffinity(0))}", "cpu", cache_bytes=1 << 16,
                          memory_bytes=1 << 28)
'''


def _two_cores() -> list[int]:
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < 2:
        pytest.skip("needs two CPU cores to pin two xdist workers to")
    return cores[:2]


def test_xdist_workers_are_pinned_one_device_each_and_their_json_is_joined(
        bench_dir: pytest.Pytester, tmp_path: Path) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is not installed (pip install pytest-xdist)")
    cores = _two_cores()
    bench_dir.makepyfile(pinbk=PIN_BACKEND, conftest=CONFTEST + '''
registry._FACTORIES["pin:cpu"] = ("pinbk", "PinBackend")
''')
    out = tmp_path / "bench.json"
    result = bench_dir.runpytest_subprocess(
        *plugin_args(), "-p", "no:cacheprovider", "--kv-backend", "pin:cpu", "--kv-preset",
        "smoke", "--kv-budget", "0.005", "-n", "2", "--benchmark-only",
        "--kv-devices", ",".join(f"cpu:{c}" for c in cores), f"--benchmark-json={out}", "-v")
    # pytest-benchmark alone turns benchmarks off under xdist and refuses --benchmark-only;
    # with a device per worker they run: sdpa_contiguous + 3 ops x 2 layouts; paged_sdpa (x2,
    # refused by the backend) and test_plain (not a benchmark) skipped
    result.assert_outcomes(passed=7, skipped=3)
    doc = json.loads(out.read_text())
    benches = doc["benchmarks"]
    assert len(benches) == 7 and not list(tmp_path.glob("bench-gw*.json"))
    for b in benches:
        extra = b["extra_info"]
        assert extra["device_index"] in cores and extra["device_kind"] == "cpu"
        assert extra["device"] == f"cores [{extra['device_index']}]"   # pinned to its core
    # one shape in smoke: its benches stay on one worker, so every overhead has its baseline
    assert len({b["extra_info"]["device_index"] for b in benches}) == 1
    assert all(b["extra_info"]["derived"]["overhead_pct"] is not None for b in benches
               if b["extra_info"]["case"]["op"] == "gather_sdpa")
    assert len(read_results(out)[1]) == 7


def test_more_xdist_workers_than_devices_is_a_usage_error(bench_dir: pytest.Pytester) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is not installed (pip install pytest-xdist)")
    cores = _two_cores()
    result = bench_dir.runpytest_subprocess(
        *plugin_args(), "-p", "no:cacheprovider", "--kv-backend", "fake:cpu", "--kv-preset",
        "smoke", "-n", "3", "--benchmark-only", "--kv-devices",
        ",".join(f"cpu:{c}" for c in cores))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*-n 3 workers but 2 device(s)*share a device*"])
