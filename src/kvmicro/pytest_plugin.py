"""pytest plugin for the benches/ suites (entry point ``pytest11: kvmicro``): wiring only.

Options ``--kv-backend`` (default ``auto``) and ``--kv-preset`` (default ``quick``) pick the cases,
the same grid ``kvmicro sweep`` would measure. A test that asks for the ``kv_case`` fixture is
parametrized over them, one per case, with ids like ``paged_sdpa-native:cpu-NSHD-ctx1024-b1-bs16-
float16``. The ``kv_bench`` fixture prepares a case, checks it against the oracle (a mismatch fails
the test; ``Unsupported`` skips it), and fills ``benchmark.group`` and ``benchmark.extra_info`` so
that ``kvmicro report`` can read the pytest-benchmark JSON like a results file.

Nothing here runs unless a test asks for these fixtures, so the plugin is inert in other suites.

Several devices (pytest-xdist, ``pytest benches/ --benchmark-only -n 2``): each xdist worker
``gwN`` is pinned to device N of ``--kv-devices`` (default: every GPU here; ``cpu:0,cpu:1`` pins
CPU cores) before any backend starts: ``CUDA_VISIBLE_DEVICES`` for a GPU, the process's CPU
affinity for a core. pytest-benchmark turns itself off under xdist (parallel timings could
perturb each other); with every worker on a device of its own that reason is gone, so the plugin
turns it back on. More workers than devices is a usage error. Each worker's
``--benchmark-json`` goes to ``PATH`` with ``-gwN`` added, and the controller joins them into
``PATH``; every bench's extra_info names its ``device_index`` and ``pci_bus_id``. Without -n the
plugin pins nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

from .workload import Case

_CASES_KEY = "_kvmicro_cases"


def pytest_addoption(parser: pytest.Parser) -> None:
    from .sweep import DEFAULT_PRESET, PRESETS

    group = parser.getgroup("kvmicro", "kvmicro benchmarks")
    group.addoption("--kv-backend", default="auto", metavar="BACKENDS",
                    help="comma-separated kvmicro backends, or auto (best device here; default) "
                         "or all")
    group.addoption("--kv-preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                    help=f"kvmicro sweep preset whose cases the benches run (default "
                         f"{DEFAULT_PRESET})")
    group.addoption("--kv-budget", default=0.25, type=float, metavar="SECONDS",
                    help="timed seconds per benchmark, which sets its rounds (default 0.25)")
    group.addoption("--kv-devices", default=None, metavar="DEVICES",
                    help="with pytest-xdist (-n N): the devices worker gw0, gw1, ... are pinned "
                         "to, one each: all (every GPU; the default) or a list such as "
                         "cuda:0,cuda:1 or cpu:0,cpu:1")


def pytest_configure(config: pytest.Config) -> None:
    from .backends.registry import split_name
    from .errors import KvmicroError

    config.addinivalue_line("markers", "kvmicro: a benchmark over kvmicro's sweep cases")
    _pin_xdist_worker(config)
    # names are checked now (cheap); `auto` and `all` are resolved only if a bench is collected,
    # since resolving them imports frameworks
    for name in str(config.getoption("kv_backend", "auto") or "").split(","):
        if name.strip() and name.strip() not in ("auto", "all"):
            try:
                split_name(name)
            except KvmicroError as exc:
                raise pytest.UsageError(f"kvmicro: --kv-backend: {exc}") from None


_PIN_KEY = "_kvmicro_pinned_device"
_ONLY_KEY = "_kvmicro_benchmark_only"


def _xdist_worker_number() -> int | None:
    """N of this xdist worker ``gwN``; None outside an xdist worker."""
    import os

    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else None


def _xdist_controller(config: pytest.Config) -> bool:
    return _xdist_worker_number() is None and str(config.getoption("dist", "no") or "no") != "no"


def _pinning_devices(config: pytest.Config) -> list[Any] | None:
    """The ``--kv-devices`` devices, or every GPU here by default; None when the default finds
    no GPU (nothing to pin: pytest-benchmark then stays off under xdist, as it decides)."""
    from .devices import gpu_count, parse_devices
    from .errors import KvmicroError

    spec = config.getoption("kv_devices", None)
    if spec is None and not gpu_count():
        return None
    try:
        return parse_devices(spec or "all")
    except KvmicroError as exc:
        raise pytest.UsageError(f"kvmicro: --kv-devices: {exc}") from None


def _pin_xdist_worker(config: pytest.Config) -> None:
    """Under xdist: pin this worker to its device, and keep pytest-benchmark on (it turns itself
    off under xdist, and refuses --benchmark-only with it, because parallel timings could
    perturb each other; one device per worker removes that reason)."""
    import os

    worker = _xdist_worker_number()
    if worker is None and not _xdist_controller(config):
        return
    devices = _pinning_devices(config)
    if devices is None:
        return
    workers = config.getoption("numprocesses", None)
    if isinstance(workers, int) and workers > len(devices):
        raise pytest.UsageError(f"kvmicro: -n {workers} workers but {len(devices)} device(s) "
                                f"({', '.join(map(str, devices))}): two workers would share a "
                                "device and perturb each other's timings")
    if worker is not None:
        if worker >= len(devices):
            raise pytest.UsageError(f"kvmicro: xdist worker gw{worker} has no device of its "
                                    f"own ({len(devices)} device(s): "
                                    f"{', '.join(map(str, devices))})")
        device = devices[worker]
        if device.cores is not None:
            os.sched_setaffinity(0, device.cores)
        os.environ.update(device.environment())
        setattr(config, _PIN_KEY, device)
        if _asked_dist(config) in (None, "load", "loadgroup"):
            # the controller schedules by group (below); the worker names each bench's group in
            # its node id, which xdist does only when the command line says --dist loadgroup
            config.option.loadgroup = True
    if worker is None and str(config.getoption("dist", "no")) == "load":
        # a shape's benches on one worker (their xdist_group): the overheads are against the
        # sdpa_contiguous bench of the same shape, measured on the same device
        config.option.dist = "loadgroup"
    # pytest-benchmark's session (made in its trylast pytest_configure) refuses --benchmark-only
    # under xdist; it gets the option back in pytest_sessionstart
    if getattr(config.option, "benchmark_only", False):
        setattr(config, _ONLY_KEY, True)
        config.option.benchmark_only = False


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``-n`` with devices pinned, schedule by group whatever ``--dist load`` became by
    now (pytest 9.2 lets xdist settle the mode after this plugin's pytest_configure ran), so a
    shape's benches share one worker and one device."""
    if not _pinning_devices(config) or str(config.getvalue("dist")) not in ("load", "loadgroup"):
        return None
    from xdist.scheduler import LoadGroupScheduling

    if not _nodeid_settable():
        import warnings

        warnings.warn("kvmicro: this pytest no longer lets pytest-xdist name a bench's group "
                      "in its node id, so a shape's benches may run on different devices and "
                      "their overheads against sdpa_contiguous go missing; use pytest < 9.2",
                      stacklevel=1)

    return LoadGroupScheduling(config, log)


def _nodeid_settable() -> bool:
    """Whether assigning ``item._nodeid`` (how pytest-xdist's loadgroup names groups) still
    changes ``item.nodeid``: true before pytest 9.2, which derives the node id from ``_id``."""
    from _pytest.nodes import Node

    return "_nodeid" in getattr(Node.nodeid, "fget", lambda self: None).__code__.co_names


def _asked_dist(config: pytest.Config) -> str | None:
    """The ``--dist`` mode the command line names, None when it names none."""
    args = list(config.invocation_params.args)
    for i, arg in enumerate(args):
        if arg == "--dist" and i + 1 < len(args):
            return str(args[i + 1])
        if str(arg).startswith("--dist="):
            return str(arg).split("=", 1)[1]
    return None


def pinned_device(config: pytest.Config) -> Any:
    """The device this xdist worker is pinned to (a :class:`kvmicro.devices.Device`), or None."""
    return getattr(config, _PIN_KEY, None)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    bench = getattr(config, "_benchmarksession", None)
    if bench is None:
        return
    if getattr(config, _ONLY_KEY, False):
        config.option.benchmark_only = True
        bench.only = True
        bench.skip = False
    if pinned_device(config) is not None:
        bench.disabled = False
        json_file = getattr(bench, "json", None)
        if json_file is not None:   # each worker writes PATH-gwN; the controller joins them
            worker = _xdist_worker_number() or 0
            if hasattr(json_file, "close"):   # pytest-benchmark < 5.3 opens the file itself
                name = getattr(json_file, "name", None)
                json_file.close()
                bench.json = open(_worker_json(str(name), worker), "wb")
            else:                             # 5.3 and later keep the path and open it at save
                from pathlib import Path

                bench.json = Path(_worker_json(str(json_file), worker))


def _worker_json(path: str, worker: int) -> str:
    from pathlib import Path

    p = Path(path)
    return str(p.with_name(f"{p.stem}-gw{worker}{p.suffix}"))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """In the xdist controller: join the workers' pytest-benchmark JSON files into the
    ``--benchmark-json`` file (the controller measured nothing itself)."""
    import json
    from pathlib import Path

    config = session.config
    bench = getattr(config, "_benchmarksession", None)
    if bench is None or not _xdist_controller(config) or getattr(bench, "json", None) is None:
        return
    if not getattr(config, _ONLY_KEY, False) and not _pinning_devices(config):
        return
    # pytest-benchmark < 5.3 holds an open file, 5.3 and later its path
    path = str(bench.json if isinstance(bench.json, Path) else bench.json.name)
    parts = sorted(Path(path).parent.glob(f"{Path(path).stem}-gw*{Path(path).suffix}"))
    docs = [json.loads(p.read_text()) for p in parts if p.stat().st_size]
    if not docs:
        return
    joined = {**docs[0], "benchmarks": [b for d in docs for b in d.get("benchmarks", [])]}
    data = json.dumps(joined, indent=4).encode()
    if hasattr(bench.json, "write"):
        bench.json.write(data)
        bench.json.close()
    else:
        Path(path).write_bytes(data)
    bench.json = None   # written: pytest-benchmark must not write its empty report over it
    for p in parts:
        p.unlink()


def bench_cases(config: pytest.Config) -> list[Case]:
    """The preset's distinct cases for the selected backends, in sweep order (sdpa_contiguous
    first within a shape, so the overhead of the others can be derived in the same session)."""
    cached = getattr(config, _CASES_KEY, None)
    if cached is None:
        from .errors import KvmicroError
        from .sweep import expand, make_grid

        try:
            grid = make_grid(config.getoption("kv_preset"),
                             backend=config.getoption("kv_backend"))
        except KvmicroError as exc:
            raise pytest.UsageError(f"kvmicro: {exc}") from None
        cached = list(dict.fromkeys(p.case for p in expand(grid)))
        setattr(config, _CASES_KEY, cached)
    return cached


def case_id(case: Case, varying: frozenset[str] = frozenset()) -> str:
    """``op-backend-layout-ctxN-bB-bsS-dtype``, plus the axes in ``varying`` that the base id
    leaves out (placement, heads, head_dim, slack) when the preset varies them."""
    ctx = case.ctx if isinstance(case.ctx, int) else "+".join(map(str, case.ctx_list))
    parts = [case.op, case.backend, case.layout, f"ctx{ctx}", f"b{case.batch}",
             f"bs{case.block_size}", case.dtype]
    if "placement" in varying:
        parts.append(case.placement)
    if "heads" in varying:
        parts.append(f"h{case.q_heads}:{case.kv_heads}")
    if "head_dim" in varying:
        parts.append(f"d{case.head_dim}")
    if "slack" in varying:
        parts.append(f"slack{case.slack:g}")
    return "-".join(parts)


def case_ids(cases: list[Case]) -> list[str]:
    varying = frozenset(
        axis for axis, get in (("placement", lambda c: c.placement),
                               ("heads", lambda c: (c.q_heads, c.kv_heads)),
                               ("head_dim", lambda c: c.head_dim),
                               ("slack", lambda c: c.slack))
        if len({get(c) for c in cases}) > 1)
    return [case_id(c, varying) for c in cases]


def group_key(case: Case) -> str:
    """The benchmark group: one op on one shape, so that a table (and its ratios) sets only like
    against like: the backends and layouts of that op, never an append against an attention."""
    ctx = case.ctx if isinstance(case.ctx, int) else "+".join(map(str, case.ctx_list))
    return (f"{case.op} ctx{ctx} b{case.batch} bs{case.block_size} Hq{case.q_heads}:Hkv"
            f"{case.kv_heads} D{case.head_dim} {case.dtype} {case.placement} slack{case.slack:g}")


def shape_group_name(case: Case) -> str:
    """The shape a bench belongs to (every op, layout and backend of it): its xdist group."""
    ctx = case.ctx if isinstance(case.ctx, int) else "+".join(map(str, case.ctx_list))
    return (f"ctx{ctx}-b{case.batch}-bs{case.block_size}-Hq{case.q_heads}:Hkv{case.kv_heads}-"
            f"D{case.head_dim}-{case.dtype}-slack{case.slack:g}-q{case.q_len}-seed{case.seed}")


#: the columns a kvmicro bench table shows unless --benchmark-columns says otherwise (the
#: median first: it is the figure kvmicro reports; the IQR and outliers say how far to trust it)
BENCH_COLUMNS: list[str] = ["median", "iqr", "min", "outliers", "rounds"]
#: pytest-benchmark's own default columns, which BENCH_COLUMNS replaces
_DEFAULT_COLUMNS = ["min", "max", "mean", "stddev", "median", "iqr", "outliers", "ops", "rounds",
                    "iterations"]


def _is_kvmicro_bench(bench: Any) -> bool:
    extra = bench.get("extra_info") if isinstance(bench, dict) else None
    return isinstance(extra, dict) and isinstance(extra.get("case"), dict)


@pytest.hookimpl(tryfirst=True)
def pytest_benchmark_scale_unit(config: pytest.Config, unit: str, benchmarks: list[Any],
                                best: Any, worst: Any, sort: str) -> tuple[str, float] | None:
    """Tables of kvmicro benches in µs, the unit of every kvmicro record (pytest-benchmark would
    pick ns for the fastest op), unless ``--benchmark-time-unit`` names one."""
    if unit != "seconds" or config.getoption("benchmark_time_unit", "auto") not in ("auto", None):
        return None
    if benchmarks and all(_is_kvmicro_bench(b) for b in benchmarks):
        return "u", 1e6
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """When kvmicro benches are collected and ``--benchmark-columns`` is left at its default,
    their tables show :data:`BENCH_COLUMNS`. Each bench of a case is in the ``xdist_group`` of
    its shape, so that ``--dist loadgroup`` (what ``-n`` becomes here) keeps a shape's benches,
    sdpa_contiguous included, on one worker and so on one device."""
    if not any("kv_bench" in getattr(item, "fixturenames", ()) for item in items):
        return
    for item in items:
        case = getattr(getattr(item, "callspec", None), "params", {}).get("kv_case")
        if isinstance(case, Case):
            item.add_marker(pytest.mark.xdist_group(shape_group_name(case)))
    bench_session = getattr(config, "_benchmarksession", None)
    if bench_session is not None and list(getattr(bench_session, "columns", [])) == \
            _DEFAULT_COLUMNS:
        bench_session.columns = list(BENCH_COLUMNS)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kv_case" in metafunc.fixturenames:
        cases = bench_cases(metafunc.config)
        metafunc.parametrize("kv_case", cases, ids=case_ids(cases))


@pytest.fixture(scope="session")
def kv_cases(request: pytest.FixtureRequest) -> list[Case]:
    """Every case of ``--kv-preset`` on ``--kv-backend``."""
    return bench_cases(request.config)


class BenchSession:
    """State shared by the benchmarks of one session: a :class:`~kvmicro.runner.Runner` (the one
    measurement path: arrays, oracle results, bandwidth, and the sdpa_contiguous baselines of
    the overheads, kept per timer)."""

    def __init__(self, preset: str, budget_s: float, config: Any = None) -> None:
        from .runner import Runner
        from .sweep import get_preset

        self.config = config
        self.preset = get_preset(preset)
        self.budget_s = budget_s
        self.runner = Runner(self.preset.measure)

    def prepare(self, case: Case) -> tuple[Any, Any]:
        """Prepared case and its check against the oracle; skips the test when the backend is not
        available or refuses the case."""
        from .errors import Unsupported

        reason = self.runner.availability_reason(case.backend)
        if reason:
            pytest.skip(reason)
        try:
            return self.runner.prepare_checked(case)
        except Unsupported as exc:
            pytest.skip(str(exc))

    def rounds(self, prepared: Any) -> int:
        """Rounds that fill the time budget, from one timed call (at least 5, at most 1000)."""
        import time

        t0 = time.perf_counter()
        prepared.run()
        prepared.sync()
        once = max(time.perf_counter() - t0, 1e-7)
        return max(5, min(1000, int(self.budget_s / once)))

    def device_stats(self, case: Case, prepared: Any, check: Any) -> dict[str, Any] | None:
        """kvmicro's own ``device`` timer (cold cache) on the prepared case, where the backend
        has one: the record :meth:`Runner.measure_prepared` makes, as extra_info carries it."""
        from .harness.cache import resolve_cache_name
        from .points import Point

        if "device" not in prepared.timers:
            return None
        point = Point(case, "device", resolve_cache_name("cold", "device"))
        record = self.runner.measure_prepared(point, prepared, check)
        if record.get("status") != "ok":
            return {"timer": "device", "cache": point.cache, "status": record.get("status"),
                    "reason": record.get("reason")}
        stats = dict(record["stats"])
        crit = record.get("criterion") or {}
        if isinstance(crit, dict) and "converged" in crit:
            stats["converged"] = crit["converged"]
        return {"timer": record.get("timer", "device"),
                "cache": record.get("cache_policy") or record.get("cache"), "stats": stats,
                "samples_us": list(record.get("samples_us") or []), "criterion": crit}

    def finish(self, case: Case, benchmark: Any, extra: dict[str, Any]) -> None:
        """Derived figures of pytest-benchmark's own median (host timer, hot cache), through the
        runner: the overhead is against the sdpa_contiguous bench of the same shape."""
        from .points import Point

        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        median = getattr(stats, "median", None)
        if not median or not math.isfinite(median):
            return   # --benchmark-disable: nothing was timed
        point = Point(case, "host", "hot")
        median_us = median * 1e6
        if case.op == "sdpa_contiguous":
            self.runner.set_baseline(point, median_us)
        extra["derived"] = self.runner.derive(point, median_us)
        benchmark.extra_info.update(extra)


@pytest.fixture(scope="session")
def kv_session(request: pytest.FixtureRequest) -> Iterator[BenchSession]:
    session = BenchSession(request.config.getoption("kv_preset"),
                           request.config.getoption("kv_budget"), request.config)
    yield session
    session.runner.cache.clear()


@pytest.fixture
def kv_bench(kv_session: BenchSession, benchmark: Any) -> Any:
    """``kv_bench(case)``: prepare, check against the oracle (fails the test on a mismatch), time
    ``run + sync`` with pytest-benchmark, and record the case, the check, the derived figures and
    (where the backend has one) kvmicro's device-timer statistics in ``extra_info``."""
    held: list[Any] = []

    def bench(case: Case) -> Any:
        prepared, check = kv_session.prepare(case)
        held.append(prepared)
        assert check.passed, (
            f"{case.op} on {case.backend} disagrees with the float64 oracle: max |err| "
            f"{check.max_abs_err:.3g} > tolerance {check.tolerance:.3g} {check.detail}")
        device = kv_session.runner.device_name(case.backend)
        benchmark.group = group_key(case)
        extra: dict[str, Any] = {"case": case.flat(), "device": device, "kernel": prepared.kernel,
                                 "timer": "host", "cache": "hot", "check": check.to_dict()}
        pin = pinned_device(kv_session.config)
        if pin is not None:
            extra.update(device_index=pin.index, device_kind=pin.kind,
                         pci_bus_id=_bus_id(case.backend) if pin.kind == "cuda" else None)
        device_stats = kv_session.device_stats(case, prepared, check)
        if device_stats is not None:
            extra["device_timer"] = device_stats
        benchmark.extra_info.update(extra)

        def once() -> None:
            prepared.run()
            prepared.sync()

        result = benchmark.pedantic(once, rounds=kv_session.rounds(prepared), warmup_rounds=2,
                                    iterations=1)
        kv_session.finish(case, benchmark, extra)
        return result

    yield bench
    for prepared in held:
        prepared.release()


def _bus_id(backend: str) -> str | None:
    from .backends.registry import get_backend

    try:
        return get_backend(backend).device_info().extra.get("pci_bus_id") or None
    except Exception:   # a device that cannot describe itself has no bus id here
        return None


__all__ = ["BENCH_COLUMNS", "BenchSession", "bench_cases", "case_id", "case_ids", "group_key",
           "pinned_device"]
