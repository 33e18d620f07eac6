"""The kvmicro command: bad input is one line on stderr and exit 2; check exits 1 on a mismatch;
env lists every backend; sweep writes to results/ by default and never overwrites a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvmicro import oracle
from kvmicro.backends import registry
from kvmicro.backends.base import Availability, Backend, DeviceInfo, Prepared
from kvmicro.cli import main
from kvmicro.dtypes import carrier
from kvmicro.results import read_results
from kvmicro.workload import Case

SRC = Path(__file__).resolve().parent.parent / "src"


class EchoPrepared(Prepared):
    """Returns the oracle's answer, shifted by 1e-2 for the ops in KVMICRO_ECHO_WRONG."""

    def __init__(self, case: Case, arrays: dict[str, np.ndarray], copies: int) -> None:
        super().__init__(case)
        self.copies = copies
        ref = oracle.run(case, arrays)
        shift = 1e-2 if case.op in os.environ.get("KVMICRO_ECHO_WRONG", "").split(",") else 0.0
        dtype = carrier(case.dtype)
        self._out = (tuple((r + shift).astype(dtype) for r in ref) if isinstance(ref, tuple)
                     else (ref + shift).astype(dtype))

    def run(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def output(self) -> Any:
        return self._out


class EchoBackend(Backend):
    name = "fake:cpu"
    ops = ("sdpa_contiguous", "gather", "gather_sdpa", "append")

    def availability(self) -> Availability:
        return Availability(True)

    def device_info(self) -> DeviceInfo:
        return DeviceInfo("echo", "cpu", cache_bytes=1 << 16, memory_bytes=1 << 28)

    def bandwidth(self) -> dict[str, float]:
        return {"read_gbps": 1.0, "copy_gbps": 1.0}

    def prepare(self, case: Case, arrays: dict[str, np.ndarray], copies: int = 1) -> Prepared:
        return EchoPrepared(case, arrays, copies)


@pytest.fixture
def echo(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setitem(registry._FACTORIES, "fake:cpu", (__name__, "EchoBackend"))
    registry.get_backend.cache_clear()
    yield
    registry.get_backend.cache_clear()


def one_error_line(capsys: Any) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("kvmicro: error: ")
    return err[0]


@pytest.mark.parametrize(("argv", "names"), [
    (["sweep", "--layout", "NSHD,NSHQ"], ["'NSHQ'", "NSHD, HNSD, NHSD"]),
    (["sweep", "--backend", "cuda"], ["unknown backend 'cuda'", "torch:cpu"]),
    (["sweep", "--heads", "32:5"], ["q_heads 32 is not a multiple of kv_heads 5"]),
    (["sweep", "--op", "attention"], ["'attention'", "paged_sdpa"]),
    (["sweep", "--timer", "wall"], ["'wall'", "host, batched, device, graph"]),
    (["sweep", "--ctx", "0"], ["0 must be a positive integer"]),
    (["sweep", "--shard", "4/4"], ["--shard '4/4'"]),
    (["sweep", "--preset", "huge"], ["invalid choice: 'huge'", "quick"]),
    (["sweep", "--criterion", "eyeball"], ["'eyeball'", "ci-median"]),
    (["sweep", "--noise", "5"], ["--noise 5.0 must be a fraction"]),
    (["sweep", "--throttle-threshold", "75"], ["--throttle-threshold 75.0 must be a fraction",
                                                "0 turns the throttle guard off"]),
    (["sweep", "--min-samples", "0"], ["min_samples 0 must be an integer >= 1"]),
    (["sweep", "--max-time", "-1"], ["max_time_s -1.0 must be a positive finite time"]),
    (["sweep", "--resume"], ["--resume needs --out"]),
    (["sweep", "--batch", "two"], ["'two' is not an integer"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    (["report"], ["the following arguments are required: FILE"]),
    (["check", "--backend", "native:metal"], ["native:metal is not available"]),
])
def test_bad_input_prints_one_line_naming_it_and_exits_2(argv: list[str], names: list[str],
                                                          capsys: Any) -> None:
    assert main(argv) == 2
    line = one_error_line(capsys)
    for name in names:
        assert name in line, line


def test_python_dash_m_runs_the_same_command() -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "kvmicro", "sweep", "--layout", "NSHQ"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("kvmicro: error: layout 'NSHQ'")
    assert proc.stdout == ""


def test_env_lists_every_backend_as_available_or_why_not(capsys: Any) -> None:
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["backends"]) == set(registry.BACKEND_NAMES)
    for name, entry in info["backends"].items():
        assert entry["available"] or entry["reason"], name
        if entry["available"]:
            assert entry["device"]["name"] and entry["device"]["kind"], name
    assert info["host"]
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    for name in registry.BACKEND_NAMES:
        assert f"  {name} " in text


def test_check_passes_reports_skips_and_worst_errors(echo: Any, capsys: Any) -> None:
    assert main(["check", "--backend", "fake:cpu", "--quick", "--op", "gather,paged_sdpa"]) == 0
    out = capsys.readouterr().out
    summary = next(line for line in out.splitlines() if line.startswith("fake:cpu:"))
    cases, passed = (int(summary.split()[i]) for i in (1, 3))
    assert cases > 20 and passed == cases // 2 and "0 failed" in summary
    assert f"skipped x{cases // 2}: fake:cpu does not implement paged_sdpa" in out
    assert "float32   exact     max |err| 0 (tolerance 0) ok" in out
    assert out.rstrip().splitlines()[-1].startswith("check passed")


def test_check_exits_1_and_names_each_mismatch(echo: Any, capsys: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMICRO_ECHO_WRONG", "gather_sdpa")
    assert main(["check", "--backend", "fake:cpu", "--quick", "--op", "gather_sdpa"]) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.startswith("FAIL ")]
    assert fails and all("gather_sdpa fake:cpu" in f and "> tolerance" in f for f in fails)
    assert "MISMATCH" in out and out.rstrip().splitlines()[-1].startswith("check FAILED")


def test_sweep_writes_under_results_by_default_and_never_overwrites(
        echo: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["sweep", "--backend", "fake:cpu", "--preset", "smoke", "--op", "gather",
            "--layout", "NSHD", "--timer", "host", "--cache", "hot", "--min-samples", "3",
            "--max-time", "0.01"]
    assert main(argv) == 0
    files = list((tmp_path / "results").glob("kvmicro-*.jsonl"))
    assert len(files) == 1
    runs, records = read_results(files[0])
    assert runs[0]["argv"] == ["kvmicro", *argv] and [r["status"] for r in records] == ["ok"]
    captured = capsys.readouterr()
    assert "gather" in captured.out and f"wrote 1 records to {files[0].relative_to(tmp_path)}" \
        in captured.err
    assert main([*argv, "--out", str(files[0])]) == 2
    assert "exists; add --resume" in one_error_line(capsys)


def test_sweep_dry_run_lists_the_plan(capsys: Any) -> None:
    assert main(["sweep", "--backend", "torch:cpu", "--preset", "seed", "--dry-run",
                 "--op", "gather", "--layout", "NSHD"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("24 measurements of 24 cases on torch:cpu")
    assert len(lines) == 1 + 24 and lines[1].startswith("gather torch:cpu NSHD reverse ctx1024")


def test_sweep_rejects_an_unknown_priority_in_one_line(capsys):
    from kvmicro.cli import main

    assert main(["sweep", "--priority", "urgent", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown priority 'urgent'" in err[0] and "low, normal, high" in err[0]


def test_a_backend_without_priority_control_skips_non_normal_priorities(tmp_path):
    from kvmicro.backends import registry
    from kvmicro.errors import Unsupported
    from kvmicro.workload import Case

    registry.set_priority("high")
    try:
        backend = registry.get_backend("torch:cpu")
        assert backend.priority == "high" and not backend.has_priority
        with pytest.raises(Unsupported, match="no stream or queue priority control"):
            backend.supports(Case(op="gather", backend="torch:cpu"))
    finally:
        registry.set_priority("normal")
    assert registry.get_backend("torch:cpu").priority == "normal"


def test_version_prints_the_package_version(capsys: Any) -> None:
    from kvmicro import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvmicro {__version__}"


def test_a_sweep_with_no_ok_record_exits_1(tmp_path: Path, capsys: Any) -> None:
    # native:cuda has no GPU here (the test is moot where it has one)
    if registry.get_backend("native:cuda").availability():
        pytest.skip("a CUDA device is present")
    out = tmp_path / "r.jsonl"
    assert main(["sweep", "--backend", "native:cuda", "--preset", "smoke", "--op", "gather",
                 "--layout", "NSHD", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no record is ok" in err
    assert {r["status"] for r in read_results(out)[1]} == {"skipped"}
