"""`kvmicro contention`: load processes that always go away, the table, priorities on CPU.

docs/regimes.md states these bounds: a load process exits by itself within its
``--load-duration`` (plus one burst of ~20 ms and interpreter exit); every load and measuring
process is gone when the command returns, raises, is interrupted (Ctrl-C / SIGTERM) or its parent
is killed.
"""

from __future__ import annotations

import importlib.util
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmicro.cli import main
from kvmicro.contention import Cell, LoadProcesses, Target, render, rows
from kvmicro.errors import InvalidCase

HAS_TORCH = importlib.util.find_spec("torch") is not None
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(") ")[-1].startswith("Z"):   # a zombie has exited
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def _with_token(token: str) -> list[int]:
    """Pids of processes whose command line carries ``token`` (one this test chose)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if token.encode() in fh.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return [p for p in pids if p != os.getpid() and not _gone(p, 0)]


def test_load_processes_run_pause_and_always_stop():
    with LoadProcesses(2, "cpu", "copy", 4, duration_s=60) as load:
        pids = [p.pid for p in load.procs]
        assert load.alive() == 2 and all(m["type"] == "ready" for m in load.ready)
        load.pause()
        assert all(open(f"/proc/{p}/stat").read().split(") ")[-1][0] == "T" for p in pids)
        load.resume()
        time.sleep(0.3)
    assert all(_gone(p) for p in pids)
    assert len(load.done) == 2 and all(d["steps"] > 0 and d["gbps"] > 0 for d in load.done)


def test_load_processes_stop_when_the_body_raises():
    pids = []
    with pytest.raises(RuntimeError), LoadProcesses(1, "cpu", "matmul", 1, 60) as load:
        pids = [p.pid for p in load.procs]
        load.pause()                     # even a stopped process is cleaned up
        raise RuntimeError("boom")
    assert pids and all(_gone(p) for p in pids)


def test_a_load_process_ends_by_itself_at_its_duration():
    load = LoadProcesses(1, "cpu", "copy", 1, duration_s=0.5)
    load.start()
    try:
        proc = load.procs[0]
        proc.wait(timeout=15)            # duration + one burst + exit, on a busy machine
        assert proc.returncode == 0
    finally:
        load.close()


def test_load_processes_die_with_a_killed_parent():
    token = "61.25"
    script = ("import sys, time; from kvmicro.contention import LoadProcesses; "
              "l = LoadProcesses(2, 'cpu', 'copy', 2, 61.25); l.start(); "
              "print('started', flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert parent.stdout.readline().strip() == b"started"
        children = [p for p in _with_token(token) if _parent(p) == parent.pid]
        assert len(children) == 2
        parent.kill()                    # no finally, no atexit: the kernel's death signal
        parent.wait()
        assert all(_gone(p) for p in children)
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.skipif(not HAS_TORCH, reason="the measured case runs on torch:cpu")
def test_ctrl_c_stops_the_command_and_its_processes(tmp_path):
    token = "62.5"
    cmd = [sys.executable, "-m", "kvmicro", "contention", "--backend", "torch:cpu", "--op",
           "gather_sdpa", "--dtype", "float32", "--ctx", "64", "--batch", "1", "--heads", "4:1",
           "--head-dim", "64", "--samples", "6",
           "--load", "1", "--load-mb", "2", "--load-duration", token, "--repeats", "500",
           "--warmup", "0", "--priorities", "normal", "--out", str(tmp_path / "c.jsonl")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": SRC})
    try:
        seen, deadline = b"", time.monotonic() + 120
        while b"repeat 1/500" not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            ready, _, _ = select.select([proc.stderr], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stderr.fileno(), 4096)
                assert chunk, f"the command ended early: {seen.decode(errors='replace')}"
                seen += chunk
        children = _with_token("--load-worker") + _with_token("--serve")
        children = [p for p in children if _parent(p) == proc.pid]
        assert len(children) == 2        # one load process, one measuring process
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        assert all(_gone(p) for p in children)
    finally:
        if proc.poll() is None:
            proc.kill()


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().split(") ")[-1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


@pytest.mark.skipif(not HAS_TORCH, reason="the measured case runs on torch:cpu")
def test_contention_on_cpu_measures_each_priority_as_nice(tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    rc = main(["contention", "--backend", "torch:cpu", "--op", "gather_sdpa", "--dtype",
               "float32", "--ctx", "64", "--batch", "1",
               "--heads", "4:1", "--head-dim", "64", "--samples", "6", "--load", "1",
               "--load-mb", "2", "--repeats", "3", "--warmup", "0", "--priorities",
               "low,normal", "--out", str(out), "-q"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| torch:cpu | 1 | low | 3 |" in text and "| torch:cpu | 0 | normal | 3 |" in text
    import json

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    run, table = lines[0], lines[1:]
    assert run["command"] == "contention"
    assert run["priorities"]["low"]["detail"].startswith("nice 10")
    assert run["priorities"]["low"]["check"]["passed"]
    assert len(table) == 4 and all(r["status"] == "ok" for r in table)
    loaded = [r for r in table if r["load"] == 1]
    assert all("loss_pct" in r and r["verdict"] in ("faster", "slower", "same", "unsure")
               for r in loaded)
    assert run["load"]["achieved"] and run["load"]["achieved"][0]["steps"] > 0


def test_rows_compute_the_loss_against_the_same_priority_idle():
    target = Target("op", "native:cpu", case={"op": "paged_sdpa"})
    cells = {"normal/0": Cell("normal", 0, [100.0 + i % 3 for i in range(15)]),
             "normal/4": Cell("normal", 4, [125.0 + i % 3 for i in range(15)]),
             "high/0": Cell("high", 0, skipped="needs CAP_SYS_NICE"),
             "high/4": Cell("high", 4, skipped="needs CAP_SYS_NICE")}
    table = rows(cells, target, 4)
    loaded = next(r for r in table if r["priority"] == "normal" and r["load"] == 4)
    # 1 - 101/126 = 19.8% of throughput lost
    assert loaded["loss_pct"] == pytest.approx(100 * (1 - 101 / 126), abs=0.1)
    assert loaded["loss_ci_pct"][0] <= loaded["loss_pct"] <= loaded["loss_ci_pct"][1]
    assert loaded["verdict"] == "slower"
    text = render(table)
    assert "skipped: needs CAP_SYS_NICE" in text
    assert "| native:cpu | 4 | normal | 15 | 126 |" in text


def test_bad_contention_input_is_named(tmp_path, capsys):
    assert main(["contention", "--load", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--load 0" in capsys.readouterr().err
    assert main(["contention", "--priorities", "urgent", "--out", str(tmp_path / "b")]) == 2
    assert "urgent" in capsys.readouterr().err
    assert main(["contention", "--heads", "32", "--out", str(tmp_path / "c")]) == 2
    with pytest.raises(InvalidCase, match="--load-kind"):
        LoadProcesses(1, "cpu", "fft", 1, 1)
