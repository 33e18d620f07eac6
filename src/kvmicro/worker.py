"""Worker processes: a sweep measures in child processes, one per device and process group, so that
a crash or a hang costs one case and backends that cannot share a process never meet.

The parent (:func:`kvmicro.sweep.run_sweep`) plans; :func:`worker_jobs` splits the points by
:func:`worker_key` — the backend's device and its ``process_group`` (a class attribute of the
backend: MLX's CUDA build and torch load incompatible cuDNN libraries, so MLX backends declare a
group of their own). Jobs run one after another, so a device is never measured by two processes
at once. Under ``--devices`` (:mod:`kvmicro.devices`) each device has its own jobs, and its
workers are pinned to it (:class:`Pin`: ``CUDA_VISIBLE_DEVICES`` set by the parent, a CPU core's
affinity set in the worker); their records are stamped with the device's index and PCI bus id,
and a backend name carrying the device's index (an agreement case, ``native:cuda:1``) is run as
the one device the worker sees. Each job gets a :class:`Worker`: ``python -m kvmicro.worker``,
which reads commands on stdin and answers on its stdout, one JSON object per line:

    parent -> worker   {"cmd": "setup", ...}        sys.path, backend factories, sampling settings
                       {"cmd": "describe", "backends": [...]}   -> {"type": "described", ...}
                       {"cmd": "points", "points": ..., "baselines": [...], "interleave": b}
                                                    -> {"type": "record", "record": {...}} per point
    worker -> parent   {"type": "ready"} after setup; {"type": "failed", "reason"} on a bug;
                       {"type": "warning", ...} whenever a warning is raised (shown once per kind)

The parent sends a shape group at a time; the worker measures it with
:meth:`kvmicro.runner.Runner.run_group` (the one measurement path: cases that fit in memory
together are measured in interleaved rounds) and sends each record as soon as it exists; the
parent writes it. When the worker dies (a signal, an exit) or sends nothing for
``case_timeout_s``, the parent kills it and starts a fresh one. Which case of an interleaved group
took it down is unknown, so the group's unfinished cases are then measured one by one, each in
its own command: the case that crashes again (or hangs again) is recorded as an error naming the
signal or the timeout, and the rest are measured. The
``sdpa_contiguous`` medians that overheads are computed against travel with each case, so a fresh
worker derives the same figures.

:func:`spawn` and :func:`stop` are the process helpers (a child that dies with its parent on
Linux, and a terminate-then-kill stop), for any module that needs a background process.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from .devices import Device, off_device
from .points import Point

#: seconds a worker may go without sending a record before it is presumed hung (``--case-timeout``)
DEFAULT_CASE_TIMEOUT_S = 600.0
#: seconds a fresh worker may take to import kvmicro and its frameworks and answer the setup
STARTUP_TIMEOUT_S = 120.0


# ------------------------------------------------------------------------------ process helpers


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when the parent dies (a SIGKILLed sweep
    must not leave a worker measuring, or hung, behind). Elsewhere a worker notices at its next
    read of stdin."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def spawn(argv: Sequence[str], *, env: dict[str, str] | None = None,
          stdin: Any = subprocess.PIPE, stdout: Any = subprocess.PIPE,
          stderr: Any = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` as a child in its own session (a Ctrl-C at the terminal reaches the parent
    only, which then stops its children) that is killed when the parent dies."""
    return subprocess.Popen(list(argv), stdin=stdin, stdout=stdout, stderr=stderr, env=env,
                            start_new_session=True, preexec_fn=_die_with_parent)


def stop(proc: subprocess.Popen[bytes], grace_s: float = 2.0) -> int | None:
    """Stop ``proc``: close its stdin (a worker's cue to exit), then SIGTERM, then SIGKILL, waiting
    ``grace_s`` at each step. Returns its exit status."""
    for step in ("close", "terminate", "kill"):
        if proc.poll() is not None:
            break
        try:
            if step == "close":
                if proc.stdin is not None and not proc.stdin.closed:
                    proc.stdin.close()
            elif step == "terminate":
                proc.terminate()
            else:
                proc.kill()
        except (OSError, ValueError):
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
    for stream in (proc.stdin, proc.stdout):
        if stream is not None and not stream.closed:
            try:
                stream.close()
            except OSError:
                pass
    return proc.poll()


def describe_exit(returncode: int | None) -> str:
    """``"killed by SIGSEGV"``, ``"exited with status 3"``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


# ---------------------------------------------------------------------------------- planning


def process_group(backend: str) -> str:
    """The backend class's ``process_group``: backends of different groups never share a process
    ("" is the common group)."""
    import importlib

    from .backends.registry import _FACTORIES, split_name

    module_name, class_name = _FACTORIES[split_name(backend)[0]]
    # the class attribute, without importing the module's framework (modules import lazily)
    cls = getattr(importlib.import_module(module_name), class_name)
    return str(getattr(cls, "process_group", "") or "")


def device_key(backend: str) -> str:
    """Which device ``backend`` measures, from its name: ``cpu``, ``cuda:0``, ``cuda:1``."""
    from .backends.registry import split_name

    base, index = split_name(backend)
    kind = base.split(":")[1]
    return "cpu" if kind == "cpu" else f"{kind}:{index or 0}"


@dataclass(frozen=True)
class WorkerKey:
    device: str
    group: str

    def __str__(self) -> str:
        return f"{self.device}" + (f" ({self.group})" if self.group else "")


def worker_key(backend: str) -> WorkerKey:
    return WorkerKey(device_key(backend), process_group(backend))


@dataclass
class Job:
    """The points one worker measures, in run order, and the backends they name."""

    key: WorkerKey
    points: list[Point] = field(default_factory=list)

    @property
    def backends(self) -> list[str]:
        return list(dict.fromkeys(p.case.backend for p in self.points))


def worker_jobs(points: Sequence[Point]) -> list[Job]:
    """``points`` split by :func:`worker_key`, each job keeping the points' order (shape groups,
    ``sdpa_contiguous`` first), jobs in the order their first point appears."""
    keys: dict[str, WorkerKey] = {}
    jobs: dict[WorkerKey, Job] = {}
    for p in points:
        backend = p.case.backend
        if backend not in keys:
            keys[backend] = worker_key(backend)
        key = keys[backend]
        jobs.setdefault(key, Job(key)).points.append(p)
    return list(jobs.values())


# ------------------------------------------------------------------------------ parent's side


class WorkerWarning(UserWarning):
    """A warning raised in a worker, shown by the parent."""


class WorkerLost(Exception):
    """The worker died or went silent; ``reason`` says which, in words for a record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode_points(points: Sequence[Point]) -> str:
    # parent and worker run the same kvmicro, so a pickle carries every Case field exactly
    return base64.b64encode(pickle.dumps(list(points))).decode("ascii")


def decode_points(text: str) -> list[Point]:
    return pickle.loads(base64.b64decode(text))


class Worker:
    """One worker process, seen from the parent: send a command, receive its answers."""

    def __init__(self, setup: dict[str, Any], *, stderr: IO[Any] | None = None,
                 python: str | None = None, warned: set[str] | None = None,
                 device: Device | None = None) -> None:
        self.setup = {**setup, "device": device.to_json() if device is not None else None}
        #: the device this worker is pinned to (``--devices``), None when it sees them all
        self.device = device
        #: kinds of warning already shown (shared by the workers of one sweep)
        self.warned = warned if warned is not None else set()
        env = _child_env(setup.get("sys_path", []))
        if device is not None:
            env.update(device.environment(env))
        self.proc = spawn([python or sys.executable, "-m", "kvmicro.worker"], env=env,
                          stderr=stderr)
        self._buffer = b""
        self.send(self.setup)
        answer = self.receive(STARTUP_TIMEOUT_S, doing="starting")
        if answer.get("type") != "ready":
            raise WorkerLost(f"worker did not start: {answer.get('reason', answer)}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerLost(f"worker {self._exit()}") from None

    def receive(self, timeout_s: float, doing: str = "measuring") -> dict[str, Any]:
        """The next message (warnings are shown on the way); :class:`WorkerLost` when the worker
        dies first or ``timeout_s`` passes without one (then the worker is killed)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while True:
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    stop(self.proc, grace_s=0.5)
                    raise WorkerLost(f"no result within {timeout_s:g} s while {doing} (the "
                                     "case timeout); the worker was killed")
                ready, _, _ = select.select([fd], [], [], min(left, 1.0))
                if not ready:
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise WorkerLost(f"worker {self._exit()} while {doing}")
                self._buffer += chunk
            line, _, self._buffer = self._buffer.partition(b"\n")
            message = json.loads(line)
            if message.get("type") != "warning":
                return message
            self._warn(message)

    def _warn(self, message: dict[str, Any]) -> None:
        """A warning the worker raised, shown here once per kind (every worker would repeat a
        busy-host announcement)."""
        kind = str(message.get("category", "Warning"))
        if kind not in self.warned:
            self.warned.add(kind)
            warnings.warn(WorkerWarning(str(message.get("message", ""))), stacklevel=1)

    def _exit(self) -> str:
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            stop(self.proc, grace_s=0.5)
        return describe_exit(self.proc.returncode)

    def describe(self, backends: Sequence[str], timeout_s: float) -> dict[str, Any]:
        """``{"devices": {...}, "bandwidth": {...}}`` for ``backends``, measured in the worker."""
        self.send({"cmd": "describe", "backends": list(backends)})
        answer = self.receive(timeout_s, doing="measuring the device's bandwidth")
        if answer.get("type") != "described":
            raise WorkerLost(f"worker failed to describe its devices: {answer.get('reason')}")
        return answer

    def run_points(self, points: Sequence[Point], baselines: Sequence[float | None],
                   timeout_s: float, interleave: bool = True) -> Iterator[dict[str, Any]]:
        """Records of ``points`` (a shape group, or one case), in their order, as the worker
        sends them (:meth:`kvmicro.runner.Runner.run_group`). Raises :class:`WorkerLost` (after
        the records already sent) when the worker dies or hangs."""
        self.send({"cmd": "points", "points": encode_points(points),
                   "baselines": list(baselines), "interleave": bool(interleave)})
        for _ in points:
            answer = self.receive(timeout_s)
            if answer.get("type") == "failed":
                raise WorkerLost(f"the worker failed: {answer.get('reason')}")
            yield answer["record"]

    def close(self) -> None:
        stop(self.proc)


def _child_env(sys_path: Sequence[str]) -> dict[str, str]:
    env = dict(os.environ)
    # the worker must import this kvmicro (a source tree on sys.path, not an installed copy)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [here, *[p for p in sys_path if p]]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def setup_message(*, measure: dict[str, Any] | None, rotate_budget_bytes: int,
                  bandwidth: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a fresh worker needs to measure exactly as this process would: its sys.path and
    backend factories (backends registered here, e.g. by tests, exist there too), the submission
    priority, the sampling settings and the bandwidth already measured."""
    from .backends import registry

    return {"cmd": "setup", "sys_path": [p for p in sys.path if p],
            "factories": {k: list(v) for k, v in registry._FACTORIES.items()},
            "priority": getattr(registry, "_priority", "normal"), "measure": dict(measure or {}),
            "rotate_budget_bytes": int(rotate_budget_bytes), "bandwidth": bandwidth or {}}


# ------------------------------------------------------------------------------ worker's side


def _serve(commands: IO[str], answers: IO[str]) -> int:
    from .results import dumps

    runner = None
    pin: Pin | None = None

    def answer(message: dict[str, Any]) -> None:
        answers.write(dumps(message) + "\n")
        answers.flush()

    def warn(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        answer({"type": "warning", "category": category.__name__, "message": str(message)})

    warnings.showwarning = warn   # the parent shows them, once per kind for the whole sweep
    for line in commands:
        if not line.strip():
            continue
        message = json.loads(line)
        cmd = message.get("cmd")
        try:
            if cmd == "setup":
                runner = _setup(message)
                pin = Pin.start(message.get("device"))
                answer({"type": "ready", "pid": os.getpid(),
                        "cores": sorted(os.sched_getaffinity(0))
                        if hasattr(os, "sched_getaffinity") else None})
            elif cmd == "describe":
                answer({"type": "described", **_describe(runner, message["backends"], pin)})
            elif cmd == "points":
                asked = decode_points(message["points"])
                points = [off_device(p) for p in asked] if pin is not None else asked
                for point, median in zip(points, message.get("baselines", []), strict=False):
                    if median is not None:
                        runner.set_baseline(point, median)
                for point, record in zip(asked, runner.run_group(
                        points, bool(message.get("interleave", True))), strict=False):
                    if pin is not None:
                        record = pin.stamp(record, point, runner)
                    answer({"type": "record", "record": record})
            elif cmd == "exit":
                return 0
            else:
                answer({"type": "failed", "reason": f"unknown command {cmd!r}"})
        except Exception as exc:   # a bug here must reach the parent as words, not a hang
            answer({"type": "failed", "reason": f"{type(exc).__name__}: {exc}"})
    return 0


def _setup(message: dict[str, Any]) -> Any:
    from .backends import registry
    from .runner import Runner

    for path in reversed(message.get("sys_path", [])):
        if path not in sys.path:
            sys.path.insert(0, path)
    registry._FACTORIES.update({k: tuple(v) for k, v in message.get("factories", {}).items()})
    registry.set_priority(message.get("priority", "normal"))
    registry.get_backend.cache_clear()
    return Runner(message.get("measure"), message["rotate_budget_bytes"],
                  bandwidth=message.get("bandwidth"))


def _describe(runner: Any, backends: list[str], pin: Pin | None = None) -> dict[str, Any]:
    """The devices of ``backends`` (provenance entries) and their measured bandwidth. A pinned
    worker describes its one device under the names it was asked (``native:cuda`` or
    ``native:cuda:1``), each entry naming the device's index and bus id."""
    from .results import provenance

    local = {name: _local_name(name) if pin is not None else name for name in backends}
    entries = provenance([], list(dict.fromkeys(local.values())), {})["devices"]
    devices = {name: dict(entries[local[name]]) for name in backends}
    bandwidth = {name: runner.bandwidth(local[name]) for name in backends
                 if not runner.availability_reason(local[name])}
    if pin is not None:
        for name, entry in devices.items():
            entry.update(pin.fields(runner, local[name]))
    return {"devices": devices, "bandwidth": bandwidth}


def _local_name(backend: str) -> str:
    from .backends.registry import split_name

    return split_name(backend)[0]


@dataclass
class Pin:
    """A worker's device under ``--devices``: the process is confined to it (CUDA_VISIBLE_DEVICES
    was set by the parent; CPU cores are set here) and every record names it."""

    device: Device
    bus_ids: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def start(cls, spec: dict[str, Any] | None) -> Pin | None:
        if not spec:
            return None
        device = Device.from_json(spec)
        if device.cores is not None:
            if not hasattr(os, "sched_setaffinity"):
                raise OSError("this platform cannot pin a process to a core "
                              "(no os.sched_setaffinity)")
            os.sched_setaffinity(0, device.cores)
        return cls(device)

    def bus_id(self, runner: Any, backend: str) -> str | None:
        """The PCI bus id of the GPU ``backend`` sees (None on a CPU)."""
        if backend not in self.bus_ids:
            bus = None
            if self.device.kind == "cuda" and not runner.availability_reason(backend):
                from .backends.registry import get_backend

                try:
                    bus = get_backend(backend).device_info().extra.get("pci_bus_id") or None
                except Exception:   # a device that cannot describe itself has no bus id here
                    bus = None
            self.bus_ids[backend] = bus
        return self.bus_ids[backend]

    def fields(self, runner: Any, backend: str) -> dict[str, Any]:
        return {"device_index": self.device.index, "device_kind": self.device.kind,
                "pci_bus_id": self.bus_id(runner, backend)}

    def stamp(self, record: dict[str, Any], asked: Point, runner: Any) -> dict[str, Any]:
        """``record`` as the parent asked for it: the backend name it gave (with its device
        index, for an agreement case), and the device's index and bus id."""
        local = record.get("backend", asked.case.backend)
        return {**record, "backend": asked.case.backend, **self.fields(runner, local)}


def main() -> int:
    """``python -m kvmicro.worker``: serve commands from stdin until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent decides when a sweep stops
    # answers go to the original stdout; anything a library prints goes to stderr instead
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return _serve(sys.stdin, answers)


__all__ = ["DEFAULT_CASE_TIMEOUT_S", "Job", "Pin", "Worker", "WorkerKey", "WorkerLost",
           "describe_exit", "device_key", "process_group", "setup_message", "spawn", "stop",
           "worker_jobs", "worker_key"]

if __name__ == "__main__":
    raise SystemExit(main())
