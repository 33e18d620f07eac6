"""pytest plugin for the benches/ suites (entry point ``pytest11: kvmicro``): wiring only.

Options ``--kv-backend`` (default ``auto``) and ``--kv-preset`` (default ``quick``) pick the cases,
the same grid ``kvmicro sweep`` would measure. A test that asks for the ``kv_case`` fixture is
parametrized over them, one per case, with ids like ``paged_sdpa-native:cpu-NSHD-ctx1024-b1-bs16-
float16``. The ``kv_bench`` fixture prepares a case, checks it against the oracle (a mismatch fails
the test; ``Unsupported`` skips it), and fills ``benchmark.group`` and ``benchmark.extra_info`` so
that ``kvmicro report`` can read the pytest-benchmark JSON like a results file.

Nothing here runs unless a test asks for these fixtures, so the plugin is inert in other suites.
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


def pytest_configure(config: pytest.Config) -> None:
    from .backends.registry import split_name
    from .errors import KvmicroError

    config.addinivalue_line("markers", "kvmicro: a benchmark over kvmicro's sweep cases")
    # names are checked now (cheap); `auto` and `all` are resolved only if a bench is collected,
    # since resolving them imports frameworks
    for name in str(config.getoption("kv_backend", "auto") or "").split(","):
        if name.strip() and name.strip() not in ("auto", "all"):
            try:
                split_name(name)
            except KvmicroError as exc:
                raise pytest.UsageError(f"kvmicro: --kv-backend: {exc}") from None


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


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """When kvmicro benches are collected and ``--benchmark-columns`` is left at its default,
    their tables show :data:`BENCH_COLUMNS`."""
    if not any("kv_bench" in getattr(item, "fixturenames", ()) for item in items):
        return
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

    def __init__(self, preset: str, budget_s: float) -> None:
        from .runner import Runner
        from .sweep import get_preset

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
                           request.config.getoption("kv_budget"))
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


__all__ = ["BENCH_COLUMNS", "BenchSession", "bench_cases", "case_id", "case_ids", "group_key"]
