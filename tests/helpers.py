"""Helpers that several test modules share (tests/ is on sys.path under pytest's default
import mode, so a test module imports this as ``helpers``)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from kvmicro.workload import Case, Layout


def case_id(case: Case) -> str:
    return (f"{case.op}-{case.dtype}-{case.layout}-D{case.head_dim}-{case.q_heads}:{case.kv_heads}"
            f"-bs{case.block_size}-{case.placement}-ctx{'/'.join(map(str, case.ctx_list))}")


def table_on_unused_blocks(case: Case, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` with the block table pointed at other, valid blocks (a bijection onto the pool's
    unused ones): a negative control that a kernel really reads through the table."""
    used = arrays["block_table"][arrays["block_table"] >= 0]
    unused = np.setdiff1d(np.arange(Layout(case.layout).to_logical(arrays["k_pool"]).shape[0]),
                          used)
    wrong = dict(arrays)
    table = arrays["block_table"].copy()
    table[table >= 0] = unused[: used.size]
    wrong["block_table"] = table
    return wrong


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (read from /proc: Linux only)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def ctrl_c_after_records(proc: subprocess.Popen[bytes], out: Path, cases: int, *,
                         wait_s: float = 0.0) -> tuple[list[int], str]:
    """Ctrl-C a running ``kvmicro sweep`` once its results file ``out`` holds ``cases`` case
    records (and ``wait_s`` more seconds have passed); returns the sweep's child processes just
    before the signal and its stderr. The sweep is killed if it is still running afterwards."""
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_text().count('"type": "case"') >= cases):
            assert proc.poll() is None and time.monotonic() < deadline, "no records appeared"
            time.sleep(0.05)
        time.sleep(wait_s)
        children = child_pids(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return children, err.decode()


def assert_stopped_by_ctrl_c(proc: subprocess.Popen[bytes], err: str, workers: list[int]) -> None:
    """The sweep exited as Ctrl-C asks (status 130) and none of ``workers`` is still running
    (gone, or a zombie waiting to be reaped)."""
    assert proc.returncode == 130, err
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or \
            "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], f"worker {pid} survived"
