"""measure(), timers and cache policies, driven by fake Prepared objects (no native build, no
framework): what each timer puts inside its window, how the cache is prepared between samples,
calibration, guards and the stopping rule's verdict."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import numpy as np
import pytest

from kvmicro.backends.base import TIMERS, DeviceInfo, Prepared
from kvmicro.derived import working_set_bytes
from kvmicro.errors import InvalidCase, KvmicroError, Unsupported
from kvmicro.harness import (
    TIMER_CLASSES,
    ColdFlush,
    ColdRotate,
    HotCache,
    MeasureConfig,
    make_cache_policy,
    make_timer,
    measure,
    resolve_cache_name,
)
from kvmicro.harness.cache import FALLBACK_CACHE_BYTES, MAX_COPIES
from kvmicro.harness.measure import Sampler, interleaved_order
from kvmicro.harness.timers import GRAPH_MAX_K
from kvmicro.workload import Case

CASE = Case(op="paged_sdpa", backend="fake:cpu", batch=2, q_heads=8, kv_heads=2, head_dim=64,
            ctx=(37, 130), block_size=16)
CPU = DeviceInfo(name="fake cpu", kind="cpu", cache_bytes=1 << 20, memory_bytes=1 << 30)


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Clock:
    """A fake clock that only moves when a fake op runs: timing tests that do not depend on how
    busy this machine is."""

    def __init__(self) -> None:
        self.ns = 0

    def advance(self, seconds: float) -> None:
        self.ns += round(seconds * 1e9)


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    # by module object: the package re-exports the function measure() under the module's name
    monkeypatch.setattr(sys.modules["kvmicro.harness.timers"], "perf_counter_ns", lambda: c.ns)
    monkeypatch.setattr(sys.modules["kvmicro.harness.measure"], "perf_counter",
                        lambda: c.ns / 1e9)
    return c


class Fake(Prepared):
    """Logs every call; run() spins ``op_s``; flush and select sleep ``slow_s`` so that a timer
    that put them inside its window would be caught."""

    def __init__(self, timers=("host", "batched"), copies=1, op_s=0.0, slow_s=0.0, clock=None):
        super().__init__(CASE)
        self.clock = clock
        self.timers = tuple(timers)
        self.copies = copies
        self.op_s = op_s
        self.slow_s = slow_s
        self.log: list[tuple[str, object]] = []
        self.current = 0
        self.runs_on: list[int] = []

    def run(self) -> None:
        self.log.append(("run", self.current))
        self.runs_on.append(self.current)
        if self.clock is not None:
            self.clock.advance(self.op_s)
        elif self.op_s:
            spin(self.op_s)

    def sync(self) -> None:
        self.log.append(("sync", None))

    def output(self):
        return None

    def select(self, copy: int) -> None:
        super().select(copy)
        self.log.append(("select", copy))
        self.current = copy
        if self.slow_s:
            time.sleep(self.slow_s)

    def flush_cache(self, nbytes: int) -> None:
        self.log.append(("flush", nbytes))
        if self.slow_s:
            time.sleep(self.slow_s)


class FakeDevice(Fake):
    """A backend with device clocks: device_times/graph_times return scripted values."""

    def __init__(self, values=None, per_op_us=10.0, throttle_every=0, **kw):
        super().__init__(timers=("host", "batched", "device", "graph"), **kw)
        self.values = iter(values) if values is not None else None
        self.per_op_us = per_op_us
        self.calls: list[tuple] = []
        self.throttle_every = throttle_every
        self._last_throttled = False
        self._count = 0

    def _next(self) -> float:
        self._count += 1
        self._last_throttled = bool(self.throttle_every and self._count % self.throttle_every == 0)
        if self._last_throttled:
            return 999.0
        return float(next(self.values)) if self.values is not None else self.per_op_us

    def device_times(self, reps: int, flush_bytes: int = 0) -> list[float]:
        self.calls.append(("device", reps, flush_bytes, self.current))
        return [self._next() for _ in range(reps)]

    def graph_times(self, reps: int, k: int, rotate: bool = True) -> list[float]:
        self.calls.append(("graph", reps, k) if rotate else ("graph-one-copy", reps, k))
        return [self._next() for _ in range(reps)]

    def clock_fraction(self) -> float:
        """A GPU at 1200 of 1980 MHz after a throttled sample, at its maximum otherwise."""
        return 1200 / 1980 if self._last_throttled else 1.0


def quick(**kw) -> MeasureConfig:
    # the host-noise guard reads this (shared, busy) machine and the host-speed reference costs
    # ~1 ms a round: both off unless a test is about them
    return MeasureConfig(**{"warmup_count": 2, "warmup_time_s": 0.0, "max_time_s": 2.0,
                            "host_guard": False, "host_reference": False, **kw})


# ----------------------------------------------------------------------------- registries


def test_one_timer_class_per_timer_kind():
    assert tuple(TIMER_CLASSES) == TIMERS == ("host", "batched", "device", "graph")
    for name in TIMERS:
        assert make_timer(name).name == name
    with pytest.raises(InvalidCase, match=r"'wall'.*host, batched, device, graph"):
        make_timer("wall")


def test_cold_resolves_per_timer():
    assert resolve_cache_name("cold", "host") == "cold:flush"
    assert resolve_cache_name("cold", "device") == "cold:flush"
    assert resolve_cache_name("cold", "batched") == "cold:rotate"
    assert resolve_cache_name("cold", "graph") == "cold:rotate"
    assert resolve_cache_name("cold") == "cold:flush"
    assert resolve_cache_name("hot", "graph") == "hot"
    with pytest.raises(InvalidCase, match=r"'warm'.*hot, cold, cold:flush, cold:rotate"):
        resolve_cache_name("warm")


def test_make_cache_policy_sizes_from_the_device():
    flush = make_cache_policy("cold", CPU, "host")
    assert isinstance(flush, ColdFlush) and flush.flush_bytes == 2 << 20
    rotate = make_cache_policy("cold", CPU, "batched")
    assert isinstance(rotate, ColdRotate) and rotate.target_bytes == 5 << 20
    assert rotate.budget_bytes == (1 << 30) // 4
    hot = make_cache_policy("hot", CPU)
    assert isinstance(hot, HotCache) and hot.flush_bytes == 0
    assert hot.describe() == {"name": "hot", "bytes": 0, "pools": 1, "cache_bytes": 1 << 20}


def test_unknown_cache_size_falls_back_and_says_so(monkeypatch):
    policy = make_cache_policy("cold:flush", DeviceInfo(name="?", kind="gpu"))
    assert policy.flush_bytes == 2 * FALLBACK_CACHE_BYTES
    assert policy.describe()["cache_bytes_assumed"] is True
    # a CPU device that does not say is sized from the host's last-level cache
    monkeypatch.setattr(sys.modules["kvmicro.harness.cache"], "llc_bytes", lambda: 3 << 20)
    cpu = make_cache_policy("cold:flush", DeviceInfo(name="cpu", kind="cpu"))
    assert cpu.flush_bytes == 6 << 20 and "cache_bytes_assumed" not in cpu.describe()
    monkeypatch.setattr(sys.modules["kvmicro.harness.cache"], "llc_bytes", lambda: 0)
    unknown = make_cache_policy("cold:flush", DeviceInfo(name="cpu", kind="cpu"))
    assert unknown.describe()["cache_bytes_assumed"] is True


def test_rotation_copies_cover_five_times_the_cache_within_budget():
    policy = ColdRotate(cache_bytes=32 << 20, budget_bytes=1 << 40)
    assert policy.copies_needed(1 << 20) == 160           # 160 x 1 MiB = 5 x 32 MiB
    assert policy.copies_needed(3 << 20) == math.ceil(160 / 3)
    assert policy.copies_needed(200 << 20) == 1           # already 5x on its own
    assert policy.copies_needed(1) == MAX_COPIES
    # the budget counts each copy's whole footprint (pools with slack), not only what it touches
    tight = ColdRotate(cache_bytes=32 << 20, budget_bytes=10 << 20)
    assert tight.copies_needed(1 << 20, footprint_bytes=2 << 20) == 5
    assert HotCache(1 << 20).copies_needed(1 << 10) == 1
    with pytest.raises(InvalidCase, match="working set 0"):
        policy.copies_needed(0)


def test_rotation_describe_says_whether_it_is_cold_enough():
    ws = working_set_bytes(CASE)
    policy = ColdRotate(cache_bytes=ws)
    enough, short = Fake(copies=5), Fake(copies=4)
    assert policy.describe(enough) == {"name": "cold:rotate", "bytes": 5 * ws, "pools": 5,
                                       "cache_bytes": ws, "target_bytes": 5 * ws,
                                       "cold_enough": True, "copies_prepared": 5,
                                       "copies_replayed": 5, "reuse_distance": 5,
                                       "working_set_bytes": ws}
    assert policy.describe(short)["cold_enough"] is False


# ------------------------------------------------------------------- what is in the window


def test_host_timer_flushes_outside_the_timed_window():
    slow = 0.02
    p = Fake(slow_s=slow)
    m = measure(p, quick(timer="host", max_samples=15, min_samples=15), ColdFlush(1 << 16))
    # every sample is far below the flush's 20 ms: the flush was not timed
    assert m.stats.max_us < slow * 1e6 / 4
    flushes = [e for e in p.log if e[0] == "flush"]
    assert len(flushes) == m.warmup_samples + m.rewarm_samples + m.stats.n
    assert all(nbytes == 2 << 16 for _, nbytes in flushes)
    # the flush's sync comes before the op runs: the device is idle when the clock starts
    events = [e[0] for e in p.log]
    assert events == ["flush", "sync", "run", "sync"] * len(flushes)
    assert m.cache == {"name": "cold:flush", "bytes": 2 << 16, "pools": 1,
                       "cache_bytes": 1 << 16}


def test_host_timer_rotates_outside_the_window_and_cycles_every_copy():
    p = Fake(copies=3, slow_s=0.02)
    m = measure(p, quick(timer="host", criterion="sample-count", min_samples=7),
                ColdRotate(cache_bytes=1))
    assert m.stats.max_us < 5000
    assert p.runs_on == [i % 3 for i in range(len(p.runs_on))]
    assert m.cache["pools"] == 3


def test_batched_timer_spreads_its_k_ops_over_consecutive_copies():
    p = Fake(copies=4)
    m = measure(p, quick(timer="batched", criterion="sample-count", min_samples=5,
                         sample_time_s=2e-4), ColdRotate(cache_bytes=1))
    assert m.k > 1
    # one continuous rotation across warm-up, calibration and samples: no copy used twice in a row
    assert p.runs_on == [i % 4 for i in range(len(p.runs_on))]


def test_batched_timer_calibrates_k_to_the_sample_time(clock):
    p = Fake(op_s=20e-6, clock=clock)
    m = measure(p, quick(timer="batched", cache="hot", criterion="sample-count", min_samples=5,
                         sample_time_s=2e-3), HotCache())
    # 20 µs per op -> at least 100 ops make a 2 ms sample; calibration overshoots by <= 10%
    assert 100 <= m.k <= 111
    assert m.samples_us == [pytest.approx(20.0)] * 5
    assert not [e for e in p.log if e[0] in ("flush", "select")]


def test_batched_timer_k_is_bounded():
    m = measure(Fake(), quick(timer="batched", criterion="sample-count", min_samples=3,
                              max_k=64), HotCache())
    assert m.k == 64


def test_batched_timer_refuses_a_flush_policy():
    with pytest.raises(InvalidCase, match="cold:flush cannot keep the batched"):
        measure(Fake(), quick(timer="batched"), ColdFlush(1 << 10))


def test_device_timer_passes_the_flush_to_the_backend_clock():
    p = FakeDevice(per_op_us=7.0)
    m = measure(p, quick(timer="device"), ColdFlush(1 << 12))
    assert m.stats.median_us == 7.0 and m.k == 1 and m.timer == "device"
    assert {c[:3] for c in p.calls} == {("device", 1, 2 << 12)}
    # the flush happened on the device clock's side, not through Python's flush_cache
    assert not [e for e in p.log if e[0] == "flush"]
    assert m.criterion["converged"] and m.stats.n == 10


def test_device_timer_rotates_copies():
    p = FakeDevice(copies=3)
    measure(p, quick(timer="device", criterion="sample-count", min_samples=6),
            ColdRotate(cache_bytes=1))
    used = [c[3] for c in p.calls]
    assert used == [i % 3 for i in range(len(used))]
    assert all(c[2] == 0 for c in p.calls)


def test_graph_timer_calibrates_k_and_records_it():
    p = FakeDevice(per_op_us=10.0)
    m = measure(p, quick(timer="graph", cache="cold:rotate"), ColdRotate(cache_bytes=1))
    assert 100 <= m.k <= 200 and m.k * 10.0 >= 1e3
    assert p.calls[-1] == ("graph", 1, m.k)
    m = measure(FakeDevice(per_op_us=0.5), quick(timer="graph", cache="hot"), HotCache())
    assert m.k == GRAPH_MAX_K


def test_graph_timer_rotates_copies_only_under_a_rotating_policy():
    # one prepared case serves hot and cold records (the sweep uploads the cold copies once):
    # hot must replay on one copy, or it would measure cold
    hot, cold = FakeDevice(copies=8), FakeDevice(copies=8)
    measure(hot, quick(timer="graph", cache="hot"), HotCache())
    measure(cold, quick(timer="graph", cache="cold:rotate"), ColdRotate(cache_bytes=1))
    assert {c[0] for c in hot.calls} == {"graph-one-copy"}
    assert {c[0] for c in cold.calls} == {"graph"}


def test_graph_timer_refuses_a_flush_policy():
    with pytest.raises(InvalidCase, match="graph"):
        measure(FakeDevice(), quick(timer="graph"), ColdFlush(1 << 10))


@pytest.mark.parametrize("timer", ["device", "graph"])
def test_a_timer_the_backend_lacks_is_unsupported(timer):
    with pytest.raises(Unsupported, match=f"no '{timer}' timer.*host, batched"):
        measure(Fake(), quick(timer=timer), HotCache())


# ------------------------------------------------------------------ stopping and guards


def test_noiseless_device_samples_converge_at_min_samples():
    m = measure(FakeDevice(per_op_us=5.0), quick(timer="device", min_samples=12), HotCache())
    assert m.stats.n == 12 and m.criterion == {
        "name": "ci-median", "params": {"noise": 0.02, "min_samples": 12}, "converged": True,
        "met": True, "why_not": ""}


def test_noisy_samples_stop_at_max_samples_and_say_which_condition_failed():
    values = np.random.default_rng(0).lognormal(3.0, 1.0, 10_000)
    m = measure(FakeDevice(values=values), quick(timer="device", max_samples=200), HotCache())
    assert m.stats.n == 200 and not m.converged
    why = m.criterion["why_not"]
    assert why.startswith("stopped at max_samples 200; 95% CI of the median")
    assert "> noise 2.00%" in why


def test_max_time_bounds_sampling(clock):
    values = iter(np.random.default_rng(1).lognormal(3.0, 1.0, 1_000_000))
    p = FakeDevice()

    def device_times(reps: int, flush_bytes: int = 0) -> list[float]:
        clock.advance(2e-3)   # each sample costs 2 ms of (fake) wall time
        return [float(next(values))]

    p.device_times = device_times  # type: ignore[method-assign]
    m = measure(p, quick(timer="device", max_time_s=0.1), HotCache())
    assert not m.converged
    # 0.1 s of 2 ms samples (the float clock may need one more to pass the limit)
    assert m.stats.n in (50, 51)
    assert m.criterion["why_not"].startswith(f"stopped at max_time 0.1 s after {m.stats.n} "
                                             "samples; 95% CI of the median")


def test_throttled_samples_are_dropped_and_counted():
    p = FakeDevice(per_op_us=4.0, throttle_every=3)
    m = measure(p, quick(timer="device", criterion="sample-count", min_samples=20), HotCache())
    assert m.stats.n == 20 and 999.0 not in m.samples_us
    assert m.dropped == m.dropped_why["throttled"] >= 9
    assert m.clock == {"threshold": 0.75, "min_fraction": 1.0, "median_fraction": 1.0}


def test_the_throttle_threshold_decides_what_counts_as_throttled():
    # 1200/1980 = 0.61: throttled under the default 0.75, kept under 0.5 and with the guard off
    for threshold, dropped in ((0.75, True), (0.5, False), (0.0, False)):
        p = FakeDevice(per_op_us=4.0, throttle_every=3)
        config = quick(timer="device", criterion="sample-count", min_samples=20,
                       throttle_threshold=threshold)
        m = measure(p, config, HotCache())
        assert bool(m.dropped) is dropped, threshold
        if not dropped:
            assert 999.0 in m.samples_us and m.clock["min_fraction"] == round(1200 / 1980, 4)


def test_a_device_without_a_clock_is_never_called_throttled():
    m = measure(Fake(), quick(criterion="sample-count", min_samples=5), HotCache())
    assert m.dropped == 0 and m.clock == {}


def test_invalid_samples_are_dropped_and_counted():
    values = [5.0, float("nan"), 5.0, 0.0, -1.0, *[5.0] * 50]
    m = measure(FakeDevice(values=values), quick(timer="device", warmup_count=0),
                HotCache())
    assert m.dropped_why == {"invalid": 3} and m.stats.n == 10


def test_no_valid_sample_is_an_error_not_a_number():
    p = FakeDevice(values=iter(lambda: float("nan"), None))
    with pytest.raises(KvmicroError, match=r"no valid sample.*invalid: "):
        measure(p, quick(timer="device", max_time_s=0.05), HotCache())


def test_warmup_by_count_and_by_time(clock):
    p = FakeDevice()
    m = measure(p, quick(timer="device", warmup_count=5), HotCache())
    assert m.warmup_samples == 5
    slow = Fake(op_s=1e-3, clock=clock)
    m = measure(slow, quick(timer="host", cache="hot", warmup_count=1, warmup_time_s=0.05,
                            criterion="sample-count", min_samples=3), HotCache())
    # 50 ms of 1 ms ops, whatever the count said
    assert m.warmup_samples == 50
    m = measure(slow, quick(timer="host", cache="hot", warmup_count=80, warmup_time_s=0.05,
                            criterion="sample-count", min_samples=3), HotCache())
    assert m.warmup_samples == 80


def test_criterion_params_reach_the_criterion():
    m = measure(FakeDevice(), quick(timer="device", criterion="sample-count",
                                    criterion_params={"count": 17}), HotCache())
    assert m.stats.n == 17 and m.criterion["params"] == {"count": 17, "min_samples": 10}


@pytest.mark.parametrize("field,value,text", [
    ("timer", "wall", "unknown timer 'wall'"),
    ("cache", "lukewarm", "unknown cache policy 'lukewarm'"),
    ("criterion", "vibes", "unknown stopping criterion 'vibes'"),
    ("min_samples", 0, "min_samples 0"),
    ("max_samples", 5, "max_samples 5 < min_samples 10"),
    ("max_time_s", 0, "max_time_s 0"),
    ("noise", 1.5, "noise 1.5"),
    ("warmup_count", -1, "warmup_count -1"),
    ("max_k", 0, "max_k 0"),
    ("throttle_threshold", 1.0, "throttle_threshold 1.0"),
    ("throttle_threshold", -0.1, "throttle_threshold -0.1"),
])
def test_config_is_validated(field, value, text):
    with pytest.raises(InvalidCase, match=text):
        MeasureConfig(**{field: value})


def test_measure_imports_no_framework():
    code = ("import sys; import kvmicro.harness.measure, kvmicro.results; "
            "bad = [m for m in ('torch', 'mlx', 'cudnn', 'flashinfer') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={"PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1] / "src")})


# ------------------------------------------------------------------------- rounds (Sampler)


class ScriptedGuard:
    """A host-noise guard that calls every ``every``-th sample preempted."""

    on = True
    why_off = ""

    def __init__(self, every: int = 0, always: bool = False) -> None:
        self.every, self.always, self.count = every, always, 0

    def refresh_threads(self) -> None:
        pass

    def begin(self) -> None:
        pass

    def end(self) -> str:
        self.count += 1
        if self.always or (self.every and self.count % self.every == 0):
            return "preempted"
        return ""

    def summary(self) -> dict:
        return {"guard": "on", "scripted": True}

    def close(self) -> None:
        pass


def test_measure_spreads_the_samples_over_at_least_three_rounds():
    m = measure(FakeDevice(per_op_us=5.0), quick(timer="device", min_samples=12), HotCache())
    assert m.rounds["count"] == 3 and m.rounds["sizes"] == [4, 4, 4]
    assert sum(m.rounds["sizes"]) == m.stats.n and m.rounds["agree"] is True
    assert m.rounds["medians_us"] == [5.0, 5.0, 5.0] and m.rounds["spread_pct"] == 0.0
    # warmup_count (2) discarded samples at the start of rounds 2 and 3
    assert m.rewarm_samples == 4


def test_one_round_is_the_old_single_loop():
    m = measure(FakeDevice(per_op_us=5.0), quick(timer="device", min_samples=12, rounds=1),
                HotCache())
    assert m.rounds["sizes"] == [12] and m.rewarm_samples == 0


def test_samplers_of_several_cases_interleave_their_rounds():
    a, b = FakeDevice(per_op_us=5.0), FakeDevice(per_op_us=7.0)
    config = quick(timer="device", criterion="sample-count", min_samples=9)
    samplers = [Sampler(a, config, HotCache()), Sampler(b, config, HotCache())]
    order = []
    while not all(s.done() for s in samplers):
        for s in samplers:
            if not s.done():
                before = s.n
                s.round()
                order.append((s is samplers[1], s.n - before))
    # a, b, a, b, a, b: three rounds each of a third of the samples, taken in turn
    assert order == [(False, 3), (True, 3)] * 3
    ma, mb = (s.result() for s in samplers)
    assert ma.stats.median_us == 5.0 and mb.stats.median_us == 7.0 and ma.converged


def test_an_interleaved_sampler_takes_more_and_fuller_rounds():
    """With an interleave group (a runner's chunk) a case spreads over at least
    ``interleaved_rounds`` rounds (6) of at least ``min_round_samples`` (4) each, so a paired
    verdict has 5 degrees of freedom and round medians of 4 samples; back to back it keeps
    ``rounds`` (3) rounds of a third of the criterion's samples."""
    config = quick(timer="device", criterion="sample-count", min_samples=9)
    assert (config.interleaved_rounds, config.min_round_samples) == (6, 4)
    grouped = Sampler(FakeDevice(per_op_us=5.0), config, HotCache(), interleave_group="g")
    plain = Sampler(FakeDevice(per_op_us=5.0), config, HotCache())
    for s in (grouped, plain):
        while not s.done():
            s.round()
    assert grouped.result().rounds["sizes"] == [4] * 6
    assert plain.result().rounds["sizes"] == [3, 3, 3]
    # rounds above interleaved_rounds win; 1 and 1 give the plain behaviour back
    wide = Sampler(FakeDevice(per_op_us=5.0), quick(timer="device", criterion="sample-count",
                                                    min_samples=9, rounds=8),
                   HotCache(), interleave_group="g")
    old = Sampler(FakeDevice(per_op_us=5.0), quick(timer="device", criterion="sample-count",
                                                   min_samples=9, interleaved_rounds=1,
                                                   min_round_samples=1),
                  HotCache(), interleave_group="g")
    for s in (wide, old):
        while not s.done():
            s.round()
    assert wide.result().rounds["count"] == 8 and min(wide.result().rounds["sizes"]) >= 4
    assert old.result().rounds["sizes"] == [3, 3, 3]
    for bad in (0, 2.5, True):
        with pytest.raises(InvalidCase, match="interleaved_rounds"):
            quick(interleaved_rounds=bad)
        with pytest.raises(InvalidCase, match="min_round_samples"):
            quick(min_round_samples=bad)


def test_an_interleaved_sampler_keeps_the_time_budget():
    """The floor of samples per round does not stretch max_time: a case whose samples take a
    third of its budget gets one sample a round (the round's slice of the budget is spent) and
    stops when the budget is, after three rounds instead of six."""
    config = quick(timer="host", criterion="sample-count", min_samples=9, max_time_s=0.06)
    s = Sampler(Fake(op_s=0.02), config, HotCache(), interleave_group="g")
    while not s.done():
        s.round()
    m = s.result()
    assert s.sampling_s < 0.2 and m.rounds["count"] < 6 and set(m.rounds["sizes"]) == {1}
    assert "max_time" in m.criterion["why_not"]


def test_every_other_pass_runs_in_reverse():
    assert interleaved_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert interleaved_order(["a", "b", "c"], 1) == ["c", "b", "a"]
    assert interleaved_order(["a", "b", "c"], 6) == ["a", "b", "c"]


def test_rounds_that_disagree_are_not_converged_and_say_so():
    p = FakeDevice(per_op_us=10.0)
    s = Sampler(p, quick(timer="device", min_samples=30), HotCache())
    for speed in (10.0, 13.0, 10.0):   # a neighbour slowed the second round by 30%
        p.per_op_us = speed
        s.round()
    # the pooled CI is met, but the rounds do not pin the median: the sampler wants more rounds
    assert s.criterion.done() and not s.done()
    m = s.result()
    assert not m.converged and "rounds-disagree" in m.flags
    assert m.rounds["agree"] is False and m.rounds["spread_pct"] == pytest.approx(30.0)
    # t(2) 4.303 x sd 1.732 / sqrt(3) = 4.3 µs: +-43% of the 10 µs median
    assert m.rounds["between_rounds_halfwidth_pct"] == pytest.approx(43.03, abs=0.01)
    assert "rounds disagree: round medians 10, 13, 10 µs" in m.criterion["why_not"]


def test_more_rounds_narrow_a_drifting_median_until_the_rounds_agree():
    p = FakeDevice(per_op_us=10.0)
    s = Sampler(p, quick(timer="device", min_samples=30, noise=0.05), HotCache())
    speeds = iter([10.0, 10.4] * 50)   # the host alternates between two states, 4% apart
    while not s.done():
        p.per_op_us = next(speeds)
        s.round()
    m = s.result()
    # three rounds give +-6.7% (> 5%); the sampler went on until the t-interval fitted
    assert m.rounds["count"] > 3 and m.rounds["agree"] and m.converged
    assert m.rounds["between_rounds_halfwidth_pct"] <= 5.0


def test_rounds_within_their_noise_agree():
    values = np.random.default_rng(3).lognormal(np.log(10.0), 0.3, 10_000)
    m = measure(FakeDevice(values=values), quick(timer="device", noise=0.05), HotCache())
    assert m.rounds["count"] >= 3 and m.rounds["agree"] and m.converged


def test_host_disturbed_samples_are_dropped_counted_and_flag_a_busy_host():
    m = measure(FakeDevice(per_op_us=5.0),
                quick(timer="device", criterion="sample-count", min_samples=20), HotCache())
    assert "host-busy" not in m.flags
    s = Sampler(FakeDevice(per_op_us=5.0),
                quick(timer="device", criterion="sample-count", min_samples=20),
                HotCache(), host_guard=ScriptedGuard(every=2))
    while not s.done():
        s.round()
    m = s.result()
    assert m.stats.n == 20 and m.dropped_why["preempted"] >= 19
    assert "host-busy" in m.flags and m.host["disturbed"] == m.dropped_why["preempted"]


def test_a_host_timer_guards_its_own_window_not_the_flush():
    guard = ScriptedGuard()
    s = Sampler(Fake(slow_s=0.001), quick(timer="host", criterion="sample-count",
                                          min_samples=6), ColdFlush(1 << 16), host_guard=guard)
    while not s.done():
        s.round()
    assert s.timer.guard is guard and guard.count >= 6
    assert s.result().stats.n == 6


def test_when_every_sample_was_disturbed_the_record_says_so_instead_of_failing():
    s = Sampler(FakeDevice(per_op_us=5.0),
                quick(timer="device", criterion="sample-count", min_samples=5,
                      max_time_s=0.05, max_samples=40),
                HotCache(), host_guard=ScriptedGuard(always=True))
    while not s.done():
        s.round()
    m = s.result()
    assert m.stats.median_us == 5.0 and not m.converged and "host-busy" in m.flags
    assert m.criterion["why_not"].startswith("every sample was disturbed by other work")


def test_rounds_are_validated():
    with pytest.raises(InvalidCase, match="rounds 0"):
        MeasureConfig(rounds=0)
