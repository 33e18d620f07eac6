"""Throughput under concurrent load on the same device, at each submission priority
(``kvmicro contention``).

K background *load processes* keep the device busy (``copy``: bandwidth-heavy copies of two large
buffers; ``matmul``: back-to-back matrix products), while a *measuring process* per priority times
one case: an op case of any backend (``--target op``: through :class:`kvmicro.runner.Runner`,
checked against the oracle first) or the synthetic decoder's decode step (``--target decode``:
:mod:`kvmicro.decoder`, checked against the float64 reference first). One *repeat* is one value: the
median of ``--samples`` samples of the case. For every repeat the loads are paused (SIGSTOP) and
every priority is measured, then resumed (SIGCONT) and every priority measured again, the order of
the two halves alternating and the priorities shuffled, so drift of the machine spreads over all
cells instead of biasing one. After ``--warmup`` discarded repeats, ``--repeats`` R give each
(load, priority) cell R values: median, 95% CI of the median, spread, trimmed mean, and the
throughput loss under load, ``1 - t_idle / t_loaded``, with its bootstrap 95% CI and the verdict
of :func:`kvmicro.verdict.compare_samples` (never "slower" from noise).

Priorities, per device:

- CUDA: the stream priority. ``native:cuda`` op cases carry the ``priority`` option (the
  extension's stream is created with the device's least / default / greatest priority);
  ``--target decode`` on ``torch:cuda`` runs on a ``torch.cuda.Stream(priority=...)``. CUDA's
  default priority is also its least, so ``low`` and ``normal`` are the same level there; and a
  stream priority orders work *within one process*: against load in other processes the GPU
  time-slices between contexts, and whether priority helps there is what this measures.
- CPU: the OS scheduling priority (nice) of the measuring process is the honest equivalent:
  ``low`` = nice +10, ``normal`` = 0, ``high`` = -10 (lowering nice needs root or CAP_SYS_NICE;
  without it ``high`` is skipped with that reason). The loads run at nice 0.
- Elsewhere (MLX, torch:mps, torch:cuda op cases): no priority control; non-normal priorities are
  skipped with the reason.

Load processes are bounded in time (``--load-duration``), started with
:func:`kvmicro.worker.spawn` (own session, killed by the kernel if this process dies) and always
stopped with :func:`kvmicro.worker.stop`, on success, on an exception, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import PRIORITIES
from .errors import InvalidCase, KvmicroError, Unsupported
from .harness.stats import Stats

SCHEMA_VERSION = 1
LOAD_KINDS: tuple[str, ...] = ("copy", "matmul")
TARGETS: tuple[str, ...] = ("op", "decode")
#: the nice value of the measuring process at each priority on CPU
NICE = {"low": 10, "normal": 0, "high": -10}
#: seconds a child may take to import its framework and answer
STARTUP_TIMEOUT_S = 180.0
#: seconds to let queued device work of paused loads drain, and resumed loads ramp up
PAUSE_SETTLE_S = 0.15
RESUME_SETTLE_S = 0.3


# ------------------------------------------------------------------------------------ children


def _env(cpu_threads: bool | int) -> dict[str, str]:
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
        [here, *[p for p in sys.path if p], *([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                              else [])]))
    if cpu_threads:   # e.g. one thread per load process: K processes load K cores, no spinning
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(int(cpu_threads))
    return env


def _spawn(args: Sequence[str], cpu_threads: bool | int) -> subprocess.Popen[bytes]:
    from .worker import spawn

    return spawn([sys.executable, "-m", "kvmicro.contention", *args], env=_env(cpu_threads))


def _receive(proc: subprocess.Popen[bytes], timeout_s: float, what: str) -> dict[str, Any]:
    """The next JSON line from ``proc`` within ``timeout_s``; raises KvmicroError naming
    ``what`` when it dies or stays silent."""
    from .worker import describe_exit

    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise KvmicroError(f"[contention] {what}: no answer within {timeout_s:g} s")
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
        if not ready:
            if proc.poll() is not None:
                raise KvmicroError(f"[contention] {what}: {describe_exit(proc.returncode)}")
            continue
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=5)
            raise KvmicroError(f"[contention] {what}: {describe_exit(proc.returncode)}")
        if line.strip():
            return json.loads(line)


def _send(proc: subprocess.Popen[bytes], message: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write((json.dumps(message) + "\n").encode())
    proc.stdin.flush()


class LoadProcesses:
    """K background load processes on one device; a context manager that always stops them.

    ``pause()``/``resume()`` stop and continue them (SIGSTOP / SIGCONT) between measurements;
    ``close()`` stops them for good and collects what each achieved (iterations and GB/s or
    TFLOP/s over the time it was running)."""

    def __init__(self, count: int, device: str, kind: str, megabytes: int, duration_s: float,
                 streams: int = 1) -> None:
        if kind not in LOAD_KINDS:
            raise InvalidCase(f"--load-kind {kind!r}; expected one of {', '.join(LOAD_KINDS)}")
        if count < 0:
            raise InvalidCase(f"--load {count} must be >= 0")
        if not megabytes >= 1:
            raise InvalidCase(f"--load-mb {megabytes} must be >= 1")
        if not duration_s > 0:
            raise InvalidCase(f"--load-duration {duration_s} must be > 0 s")
        self.count, self.device, self.kind = count, device, kind
        self.megabytes, self.duration_s, self.streams = megabytes, duration_s, streams
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ready: list[dict[str, Any]] = []
        self.done: list[dict[str, Any]] = []
        self.paused = False

    def __enter__(self) -> LoadProcesses:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        args = ["--load-worker", "--device", self.device, "--kind", self.kind,
                "--mb", str(self.megabytes), "--duration", str(self.duration_s),
                "--streams", str(self.streams)]
        for _ in range(self.count):
            self.procs.append(_spawn(args, cpu_threads=self.device == "cpu"))
        for i, proc in enumerate(self.procs):
            msg = _receive(proc, STARTUP_TIMEOUT_S, f"load process {i} ({self.kind} on "
                           f"{self.device})")
            if msg.get("type") != "ready":
                raise Unsupported(f"load process {i}: {msg.get('reason', msg)}")
            self.ready.append(msg)

    def alive(self) -> int:
        return sum(p.poll() is None for p in self.procs)

    def _signal(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    pass

    def pause(self) -> None:
        if self.procs and not self.paused:
            self._signal(signal.SIGSTOP)
            self.paused = True
            time.sleep(PAUSE_SETTLE_S)

    def resume(self) -> None:
        if self.procs and self.paused:
            self._signal(signal.SIGCONT)
            self.paused = False
            time.sleep(RESUME_SETTLE_S)

    def close(self) -> None:
        """Stop every load process (continued first: a stopped process ignores SIGTERM) and
        read each one's closing report."""
        from .worker import stop

        self._signal(signal.SIGCONT)
        self.paused = False
        self._signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                if proc.stdout is not None and proc.poll() is None:
                    proc.wait(timeout=5)
                if proc.stdout is not None and not proc.stdout.closed:
                    for line in proc.stdout.read().decode(errors="replace").splitlines():
                        if line.strip().startswith("{"):
                            msg = json.loads(line)
                            if msg.get("type") == "done":
                                self.done.append(msg)
            except (subprocess.TimeoutExpired, OSError, ValueError):
                pass
            stop(proc, grace_s=2.0)
        self.procs = []

    def describe(self) -> dict[str, Any]:
        return {"processes": self.count, "device": self.device, "kind": self.kind,
                "megabytes": self.megabytes, "duration_bound_s": self.duration_s,
                "achieved": self.done}


# ---------------------------------------------------------------------------- the load worker


def _load_main(argv: Sequence[str]) -> int:
    """``python -m kvmicro.contention --load-worker ...``: one load process."""
    p = argparse.ArgumentParser(prog="kvmicro.contention --load-worker")
    p.add_argument("--load-worker", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kind", default="copy", choices=LOAD_KINDS)
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--duration", type=float, default=300.0)
    p.add_argument("--streams", type=int, default=1)
    a = p.parse_args(argv)
    stopping = {"now": False}

    def on_term(signum: int, frame: Any) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent decides
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def answer(msg: dict[str, Any]) -> None:
        answers.write(json.dumps(msg) + "\n")
        answers.flush()

    try:
        step, sync, unit, per_step = _load_step(a.device, a.kind, a.mb, a.streams)
    except Exception as exc:
        answer({"type": "failed", "reason": f"{type(exc).__name__}: {exc}"})
        return 1
    # calibrate a burst of ~20 ms so a paused process leaves little queued work behind
    t0 = time.perf_counter()
    step()
    sync()
    one = max(time.perf_counter() - t0, 1e-6)
    burst = max(1, int(0.02 / one))
    answer({"type": "ready", "pid": os.getpid(), "burst": burst, "step_s": one})
    started = time.monotonic()
    busy, count = 0.0, 0
    while not stopping["now"] and time.monotonic() - started < a.duration:
        t0 = time.perf_counter()
        for _ in range(burst):
            step()
        sync()
        dt = time.perf_counter() - t0
        if dt < 10 * burst * one:      # a burst that spans a pause is not counted as busy time
            busy += dt
            count += burst
    answer({"type": "done", "pid": os.getpid(), "steps": count, "busy_s": round(busy, 3),
            unit: round(count * per_step / busy / 1e9, 2) if busy > 0 else None,
            "wall_s": round(time.monotonic() - started, 1)})
    return 0


def _load_step(device: str, kind: str, megabytes: int, streams: int) -> tuple[Any, Any, str, float]:
    """(step, sync, unit, amount per step) of one load kind: a copy moves 2 x MB (bytes read
    plus written; reported in GB/s), a matmul does 2 n^3 flops (reported in GFLOP/s)."""
    nbytes = megabytes * 1_000_000
    if device == "cpu":
        if kind == "copy":
            src = np.ones(nbytes // 4, dtype=np.float32)
            dst = np.empty_like(src)
            return (lambda: np.copyto(dst, src)), (lambda: None), "gbps", 2.0 * src.nbytes
        n = 512
        x = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        out = np.empty_like(x)
        return (lambda: np.matmul(x, x, out=out)), (lambda: None), "gflops", 2.0 * n ** 3
    import torch

    if not torch.cuda.is_available():
        raise Unsupported(f"load on {device} needs torch with CUDA (torch {torch.__version__} "
                          "sees no CUDA device)")
    dev = torch.device(device)
    side = [torch.cuda.Stream(device=dev) for _ in range(max(1, streams))]
    turn = {"i": 0}

    def on_next_stream() -> Any:
        turn["i"] = (turn["i"] + 1) % len(side)
        return torch.cuda.stream(side[turn["i"]])

    if kind == "copy":
        src = torch.ones(nbytes // 2, dtype=torch.float16, device=dev)
        dst = torch.empty_like(src)

        def step() -> None:
            with on_next_stream():
                dst.copy_(src)
        return step, (lambda: torch.cuda.synchronize(dev)), "gbps", 2.0 * src.numel() * 2
    n = 8192
    x = torch.randn(n, n, dtype=torch.float16, device=dev)
    out = torch.empty_like(x)

    def mm() -> None:
        with on_next_stream():
            torch.matmul(x, x, out=out)
    return mm, (lambda: torch.cuda.synchronize(dev)), "gflops", 2.0 * n ** 3


# ------------------------------------------------------------------------- the measuring side


@dataclass
class Target:
    """What one measuring process times (JSON-able: it travels to the child)."""

    kind: str                          # "op" or "decode"
    backend: str                       # a backend spec (op) or a decoder backend (decode)
    case: dict[str, Any] = field(default_factory=dict)      # op: Case fields
    model: str = "gpt2"                # decode: model, prompt, steps, scaling
    prompt: int = 128
    steps: int = 32
    layers: int | None = None
    vocab: int | None = None
    dtype: str | None = None
    samples: int = 20                  # samples per repeat (op); decode: steps per repeat
    timer: str | None = None
    threads: int | None = None         # CPU threads of the measuring process (OMP_NUM_THREADS)

    @property
    def device_kind(self) -> str:
        name = self.backend.split("[")[0]
        return "cpu" if name.endswith(":cpu") else name.split(":")[1]

    def label(self) -> str:
        if self.kind == "decode":
            return (f"decode step {self.model} prompt {self.prompt} on {self.backend}"
                    + (f" ({self.layers} layers)" if self.layers else ""))
        fields = ", ".join(f"{k}={v}" for k, v in self.case.items())
        return f"{self.case.get('op', 'op')} on {self.backend} ({fields})"


class _Measurer:
    """Inside the measuring process: the prepared target at one priority."""

    def __init__(self, target: Target, priority: str) -> None:
        self.target, self.priority = target, priority
        self.detail = ""
        if target.device_kind == "cpu":
            self._nice(priority)
        if target.kind == "op":
            self._prepare_op()
        else:
            self._prepare_decode()

    def _nice(self, priority: str) -> None:
        want = NICE[priority]
        now = os.getpriority(os.PRIO_PROCESS, 0)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, want)
        except PermissionError:
            raise Unsupported(f"priority {priority}: lowering this process's nice from {now} to "
                              f"{want} needs root or CAP_SYS_NICE") from None
        self.detail = f"nice {want} (load at nice 0)"

    # -- op cases through the one measurement path -----------------------------------------
    def _prepare_op(self) -> None:
        from .backends.registry import backend_class, parse_spec, with_priority
        from .harness.cache import make_cache_policy
        from .harness.measure import MeasureConfig
        from .runner import Runner
        from .workload import Case

        t = self.target
        spec = t.backend
        name, _ = parse_spec(spec)
        if t.device_kind != "cpu":
            if "priority" not in backend_class(name).OPTIONS:
                if self.priority != "normal":
                    raise Unsupported(f"{name} has no stream or queue priority option (for "
                                      "torch:cuda, --target decode runs on a prioritised "
                                      "stream)")
            else:
                spec = with_priority(spec, self.priority)
                self.detail = f"stream priority option {self.priority}"
        name, options = parse_spec(spec)
        case = Case(backend=name, options=options, **t.case)
        self.runner = Runner()
        self.prepared, check = self.runner.prepare_checked(case)
        if not check.passed:
            self.prepared.release()
            raise KvmicroError(f"[contention] {case.op} on {spec} disagrees with the oracle: "
                               f"max |err| {check.max_abs_err:.3g} > {check.tolerance:.3g}")
        self.check = check.to_dict()
        timer = t.timer or ("device" if "device" in self.prepared.timers else "host")
        if timer not in self.prepared.timers:
            raise Unsupported(f"timer {timer} not available on {name} (it has "
                              f"{', '.join(self.prepared.timers)})")
        from .backends.registry import get_backend

        info = get_backend(name).device_info()
        self.timer = timer
        self.cache = make_cache_policy("hot", info, timer)
        # one repeat is exactly `samples` samples taken now: no rounds spread over time and no
        # waiting for a quiet host (the load is the point), where the harness has those knobs
        from dataclasses import fields as dc_fields

        knobs = {f.name for f in dc_fields(MeasureConfig)}
        extra = {k: v for k, v in (("rounds", 1), ("host_guard", False)) if k in knobs}
        self.config = MeasureConfig(timer=timer, cache="hot", criterion="sample-count",
                                    criterion_params={"count": t.samples},
                                    min_samples=t.samples, max_time_s=60.0, warmup_count=2,
                                    **extra)

    # -- the decoder's decode step ---------------------------------------------------------
    def _prepare_decode(self) -> None:
        from .decoder import Decoder, get_config, make_ops, make_weights, random_prompt
        from .regimes import check_decoder

        t = self.target
        cfg = get_config(t.model, layers=t.layers, vocab=t.vocab)
        cfg.check_length(t.prompt + t.steps + 1)
        ops = make_ops(t.backend, t.dtype)
        self.stream_ctx: Any = None
        if t.backend == "torch:cuda":
            torch = ops.torch
            least, greatest = torch.cuda.Stream.priority_range()
            level = {"low": least, "normal": 0, "high": greatest}[self.priority]
            self.stream = torch.cuda.Stream(priority=level)
            self.stream_ctx = lambda: torch.cuda.stream(self.stream)
            self.detail = (f"torch.cuda.Stream(priority={level}) (range {least} least .. "
                           f"{greatest} greatest)")
        elif t.device_kind != "cpu" and self.priority != "normal":
            raise Unsupported(f"{t.backend} has no stream or queue priority control here")
        self.decoder = Decoder(cfg, make_weights(cfg), ops)
        self.check = check_decoder(cfg, t.backend, t.dtype, 0, self.decoder)
        self.prompt = random_prompt(cfg, t.prompt)
        self.timer = "host"

    def repeat(self) -> list[float]:
        """One repeat's samples (µs)."""
        t = self.target
        if t.kind == "op":
            from .harness.measure import measure

            return list(measure(self.prepared, self.config, self.cache).samples_us)
        from contextlib import nullcontext

        from .regimes import time_run

        with self.stream_ctx() if self.stream_ctx else nullcontext():
            _, steps = time_run(self.decoder, self.prompt, t.steps + 1, True)
        return steps


def _serve_main() -> int:
    """``python -m kvmicro.contention --serve``: one measuring process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(msg: dict[str, Any]) -> None:
        from .results import dumps

        answers.write(dumps(msg) + "\n")
        answers.flush()

    measurer: _Measurer | None = None
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        try:
            if msg["cmd"] == "setup":
                measurer = _Measurer(Target(**msg["target"]), msg["priority"])
                answer({"type": "ready", "pid": os.getpid(), "detail": measurer.detail,
                        "timer": measurer.timer, "check": measurer.check})
            elif msg["cmd"] == "repeat":
                assert measurer is not None
                samples = measurer.repeat()
                answer({"type": "repeat", "value_us": float(np.median(samples)),
                        "n": len(samples)})
            elif msg["cmd"] == "exit":
                return 0
        except Unsupported as exc:
            answer({"type": "skipped", "reason": str(exc)})
        except Exception as exc:   # reach the parent as words, never a hang
            answer({"type": "failed", "reason": f"{type(exc).__name__}: {exc}"})
    return 0


# ---------------------------------------------------------------------------- the orchestrator


@dataclass
class Cell:
    """One (load, priority) cell: its repeats' values (µs)."""

    priority: str
    load: int
    values: list[float] = field(default_factory=list)
    skipped: str = ""


def _device_of(target: Target) -> str:
    if target.device_kind == "cpu":
        return "cpu"
    name = target.backend.split("[")[0]
    parts = name.split(":")
    return f"cuda:{parts[2]}" if len(parts) == 3 else "cuda:0"


def run_contention(target: Target, *, loads: int, load_kind: str, load_mb: int,
                   priorities: Sequence[str], repeats: int, warmup: int,
                   load_duration_s: float, load_streams: int = 1, seed: int = 0,
                   progress: Any = None) -> tuple[dict[str, Cell], dict[str, Any], dict[str, Any]]:
    """Measure ``target`` at each priority with and without ``loads`` load processes.
    Returns (cells keyed "priority/load", per-priority setup details, load description)."""
    for p in priorities:
        if p not in PRIORITIES:
            raise InvalidCase(f"--priorities: unknown {p!r}; expected any of "
                              f"{', '.join(PRIORITIES)}")
    if repeats < 1 or warmup < 0:
        raise InvalidCase(f"--repeats {repeats} must be >= 1 and --warmup {warmup} >= 0")
    if loads < 1:
        raise InvalidCase(f"--load {loads} must be >= 1 (the idle cells are measured anyway)")
    say = progress or (lambda text: None)
    cells = {f"{p}/{k}": Cell(p, k) for p in priorities for k in (0, loads)}
    measurers: dict[str, subprocess.Popen[bytes]] = {}
    details: dict[str, Any] = {}
    from .worker import stop

    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    load = LoadProcesses(loads, _device_of(target), load_kind, load_mb, load_duration_s,
                         load_streams)
    try:
        for p in priorities:        # start them all; each prepares and checks in parallel
            measurers[p] = _spawn(["--serve"], cpu_threads=target.threads or False)
            _send(measurers[p], {"cmd": "setup", "target": target.__dict__, "priority": p})
        for p in list(measurers):
            msg = _receive(measurers[p], STARTUP_TIMEOUT_S, f"measuring process ({p})")
            if msg["type"] == "ready":
                details[p] = {k: v for k, v in msg.items() if k != "type"}
                say(f"priority {p}: ready ({msg.get('detail') or 'no priority control'})")
            else:
                reason = msg.get("reason", "?")
                if msg["type"] == "failed":
                    raise KvmicroError(f"[contention] measuring process ({p}): {reason}")
                for k in (0, loads):
                    cells[f"{p}/{k}"].skipped = reason
                details[p] = {"skipped": reason}
                say(f"priority {p}: skipped: {reason}")
                stop(measurers.pop(p))
        if not measurers:
            return cells, details, load.describe()
        load.start()
        say(f"{loads} {load_kind} load processes running on {load.device}")
        rng = np.random.default_rng(seed)
        started = time.monotonic()
        for r in range(warmup + repeats):
            halves = (0, loads) if r % 2 == 0 else (loads, 0)
            for k in halves:
                if k:
                    load.resume()
                    if load.alive() < loads:
                        raise KvmicroError(f"[contention] only {load.alive()} of {loads} load "
                                           "processes are running (--load-duration too short?)")
                else:
                    load.pause()
                for i in rng.permutation(len(measurers)):
                    p = list(measurers)[i]
                    _send(measurers[p], {"cmd": "repeat"})
                    msg = _receive(measurers[p], 600.0, f"measuring process ({p})")
                    if msg["type"] != "repeat":
                        raise KvmicroError(f"[contention] measuring process ({p}): "
                                           f"{msg.get('reason', msg)}")
                    if r >= warmup:
                        cells[f"{p}/{k}"].values.append(msg["value_us"])
            say(f"{'warm-up ' if r < warmup else ''}repeat "
                f"{r + 1 if r < warmup else r - warmup + 1}/{warmup if r < warmup else repeats}"
                f" ({time.monotonic() - started:.0f} s)")
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in measurers.values():
            stop(proc, grace_s=2.0)
        load.close()
    return cells, details, load.describe()


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def rows(cells: dict[str, Cell], target: Target, loads: int) -> list[dict[str, Any]]:
    """One row per cell: statistics of its repeats and, under load, the loss against the same
    priority idle."""
    from .verdict import compare_samples

    out = []
    for cell in cells.values():
        row: dict[str, Any] = {"type": "contention_row", "schema_version": SCHEMA_VERSION,
                               "backend": target.backend, "target": target.label(),
                               "load": cell.load, "priority": cell.priority,
                               "repeats": len(cell.values), "values_us": cell.values}
        if cell.skipped or not cell.values:
            row.update(status="skipped", reason=cell.skipped or "no repeats")
            out.append(row)
            continue
        st = Stats.from_samples(cell.values)
        row.update(status="ok", stats=st.to_dict())
        idle = cells.get(f"{cell.priority}/0")
        if cell.load and idle and idle.values:
            v = compare_samples(cell.values, idle.values)
            # throughput loss 1 - t_idle / t_loaded = 1 - 1 / ratio (monotone in the ratio)
            loss = lambda ratio: (1.0 - 1.0 / ratio) * 100.0  # noqa: E731
            row["loss_pct"] = loss(v.ratio)
            row["loss_ci_pct"] = [loss(v.ratio_ci[0]), loss(v.ratio_ci[1])]
            row["verdict"] = v.verdict
            row["verdict_reason"] = v.reason
        out.append(row)
    return out


def render(table: Sequence[dict[str, Any]]) -> str:
    """The Markdown table: backend, load, priority, median, 95% CI, spread, loss %."""
    lines = ["| backend | load | priority | repeats | median µs | 95% CI µs | spread % | "
             "trimmed mean µs | loss % (95% CI) | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = {p: i for i, p in enumerate(PRIORITIES)}
    for r in sorted(table, key=lambda r: (order.get(r["priority"], 9), r["load"])):
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | {r['load']} | {r['priority']} | - | skipped: "
                         f"{r['reason']} | | | | | |")
            continue
        s = r["stats"]
        loss = ("-" if "loss_pct" not in r else
                f"{r['loss_pct']:.1f} ({r['loss_ci_pct'][0]:.1f} .. {r['loss_ci_pct'][1]:.1f})")
        lines.append(f"| {r['backend']} | {r['load']} | {r['priority']} | {r['repeats']} | "
                     f"{_fmt(s['median_us'])} | {_fmt(s['ci95_lo_us'])} - "
                     f"{_fmt(s['ci95_hi_us'])} | {s['spread_pct']:.1f} | "
                     f"{_fmt(s['trimmed_mean_us'])} | {loss} | {r.get('verdict', '-')} |")
    return "\n".join(lines)


def _fmt(us: float) -> str:
    return f"{us:.3g}" if us < 100 else f"{us:.0f}"


# ----------------------------------------------------------------------------------- the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``kvmicro contention`` options (cli.py calls this and :func:`cmd_contention`)."""
    p.add_argument("--backend", default="native:cpu",
                   help="op target: a backend spec (native:cuda, torch:cuda, native:cpu, ...); "
                   "decode target: torch:cpu, torch:cuda, torch:mps, mlx:cpu, mlx:gpu")
    p.add_argument("--target", default="op", choices=TARGETS,
                   help="op: one kvmicro op case (default); decode: the synthetic decoder's "
                   "decode step")
    p.add_argument("--op", default="paged_sdpa", help="op target: the op (default paged_sdpa)")
    p.add_argument("--ctx", type=int, default=4096, help="op target: tokens (default 4096)")
    p.add_argument("--batch", type=int, default=4, help="op target: sequences (default 4)")
    p.add_argument("--heads", default="32:8", help="op target: q:kv heads (default 32:8)")
    p.add_argument("--head-dim", dest="head_dim", type=int, default=128)
    p.add_argument("--block", type=int, default=16, help="op target: block size (default 16)")
    p.add_argument("--layout", default="NSHD")
    p.add_argument("--dtype", help="default float16 (op), the decoder's default (decode)")
    p.add_argument("--timer", help="op target: the timer (default device where the backend has "
                   "it, else host)")
    p.add_argument("--samples", type=int, default=20,
                   help="samples per repeat (op) or decode steps per repeat (decode); default 20")
    p.add_argument("--threads", type=int, help="CPU threads of each measuring process "
                   "(OMP_NUM_THREADS; 1 avoids spinning thread pools on a shared machine)")
    p.add_argument("--model", default="gpt2", help="decode target: gpt2, opt-125m, bloom-560m")
    p.add_argument("--prompt", type=int, default=128, help="decode target: prompt tokens")
    p.add_argument("--layers", type=int, help="decode target: override the layer count")
    p.add_argument("--vocab", type=int, help="decode target: override the vocabulary")
    p.add_argument("--load", type=int, default=4, help="background load processes K (default 4)")
    p.add_argument("--load-kind", dest="load_kind", default="copy", choices=LOAD_KINDS)
    p.add_argument("--load-mb", dest="load_mb", type=int, default=256,
                   help="MB per load buffer (default 256; copy moves 2x this per step)")
    p.add_argument("--load-streams", dest="load_streams", type=int, default=1,
                   help="CUDA streams per load process (queues per process; default 1)")
    p.add_argument("--load-duration", dest="load_duration", type=float, default=900.0,
                   help="seconds after which a load process exits by itself (default 900)")
    p.add_argument("--priorities", default="low,normal,high",
                   help="comma-separated (default low,normal,high)")
    p.add_argument("--repeats", type=int, default=15, help="repeats R (default 15)")
    p.add_argument("--warmup", type=int, default=2, help="discarded repeats first (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results JSONL (default results/contention-<timestamp>.jsonl)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``contention`` to the ``kvmicro`` subcommands (``sub``: argparse's subparsers)."""
    p = sub.add_parser("contention", help="a case at each priority with and without K "
                       "background load processes on the same device",
                       description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=cmd_contention)
    return p


def target_from_args(a: argparse.Namespace) -> Target:
    if a.samples < 1:
        raise InvalidCase(f"--samples {a.samples} must be >= 1")
    if a.threads is not None and a.threads < 1:
        raise InvalidCase(f"--threads {a.threads} must be >= 1")
    if a.target == "decode":
        return Target("decode", a.backend, model=a.model, prompt=a.prompt, steps=a.samples,
                      layers=a.layers, vocab=a.vocab, dtype=a.dtype, samples=a.samples,
                      threads=a.threads)
    try:
        q, kv = (int(v) for v in a.heads.split(":"))
    except ValueError:
        raise InvalidCase(f"--heads {a.heads!r}: expected q:kv, e.g. 32:8") from None
    case = {"op": a.op, "ctx": a.ctx, "batch": a.batch, "q_heads": q, "kv_heads": kv,
            "head_dim": a.head_dim, "block_size": a.block, "layout": a.layout,
            "dtype": a.dtype or "float16"}
    from .workload import Case

    Case(**case)      # a bad shape fails here, before any process starts
    return Target("op", a.backend, case=case, samples=a.samples, timer=a.timer,
                  threads=a.threads)


def cmd_contention(args: argparse.Namespace) -> int:
    """The ``kvmicro contention`` command."""
    from .results import dumps, provenance

    target = target_from_args(args)
    priorities = [p.strip() for p in args.priorities.split(",") if p.strip()]
    out = Path(args.out) if args.out else Path("results") / time.strftime(
        "contention-%Y%m%d-%H%M%S.jsonl")
    if out.exists():
        raise InvalidCase(f"{out} exists; choose another --out")

    def say(text: str) -> None:
        if not args.quiet:
            print(f"kvmicro contention: {text}", file=sys.stderr, flush=True)

    say(f"{target.label()}; {args.load} x {args.load_kind} load; priorities "
        f"{', '.join(priorities)}; {args.repeats} repeats after {args.warmup} warm-up")
    cells, details, load = run_contention(
        target, loads=args.load, load_kind=args.load_kind, load_mb=args.load_mb,
        priorities=priorities, repeats=args.repeats, warmup=args.warmup,
        load_duration_s=args.load_duration, load_streams=args.load_streams, seed=args.seed,
        progress=say)
    table = rows(cells, target, args.load)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_line = provenance(["kvmicro", *getattr(args, "argv", [])], [], {})
    run_line.update(command="contention", target=target.__dict__, load=load,
                    priorities=details, repeats=args.repeats, warmup=args.warmup)
    with out.open("w") as fh:
        for rec in (run_line, *table):
            fh.write(dumps(rec) + "\n")
    print(render(table), flush=True)
    for d in load.get("achieved", []):
        unit = "gbps" if "gbps" in d else "gflops"
        say(f"load pid {d['pid']}: {d['steps']} steps in {d['busy_s']} s busy "
            f"({d.get(unit)} {unit.replace('gbps', 'GB/s').replace('gflops', 'GFLOP/s')})")
    say(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--load-worker" in argv:
        return _load_main(argv)
    if "--serve" in argv:
        return _serve_main()
    from .cli import main as cli_main

    return cli_main(["contention", *argv])


__all__ = ["LOAD_KINDS", "NICE", "Cell", "LoadProcesses", "Target", "add_arguments", "add_parser",
           "cmd_contention", "render", "rows", "run_contention", "target_from_args"]

if __name__ == "__main__":
    raise SystemExit(main())
