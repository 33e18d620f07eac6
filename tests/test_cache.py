"""Cache claims that hold: a record's cache policy says what ran (copies replayed, reuse distance,
bytes rotated) and calls a rotation cold only from that; the graph timer replays every prepared
copy when its bound allows; a cold record faster than the device's memory is flagged."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmicro.backends.base import Prepared
from kvmicro.derived import derive, exceeds_ceiling, working_set_bytes
from kvmicro.harness.cache import ColdFlush, ColdRotate, HotCache
from kvmicro.harness.measure import MeasureConfig, measure
from kvmicro.harness.timers import GRAPH_MAX_K, GraphTimer
from kvmicro.results import case_record
from kvmicro.workload import Case

CASE = Case(op="paged_sdpa", backend="native:cuda", batch=1, q_heads=8, kv_heads=2, head_dim=64,
            ctx=256, block_size=16, dtype="float16")
WS = working_set_bytes(CASE)


class Replay(Prepared):
    """A device whose graph replays op i on copy i % copies (the graph_times contract) and logs
    the copy of every op it runs, in order; ``per_op_us`` per op on its clock."""

    def __init__(self, copies: int, per_op_us: float = 10.0) -> None:
        super().__init__(CASE)
        self.timers = ("host", "batched", "device", "graph")
        self.copies = copies
        self.per_op_us = per_op_us
        self.current = 0
        self.ran: list[int] = []

    def run(self) -> None:
        self.ran.append(self.current)

    def sync(self) -> None:
        pass

    def output(self):
        return None

    def select(self, copy: int) -> None:
        super().select(copy)
        self.current = copy

    def device_times(self, reps: int, flush_bytes: int = 0) -> list[float]:
        self.ran.extend([self.current] * reps)
        return [self.per_op_us] * reps

    def graph_times(self, reps: int, k: int, rotate: bool = True) -> list[float]:
        for _ in range(reps):
            self.ran.extend(i % self.copies if rotate else self.current for i in range(k))
        return [self.per_op_us] * reps


def config(timer: str, **kw) -> MeasureConfig:
    return MeasureConfig(**{"timer": timer, "cache": "cold:rotate", "warmup_count": 1,
                            "warmup_time_s": 0.0, "max_time_s": 0.5, "min_samples": 5,
                            "max_samples": 5, "criterion": "sample-count",
                            "criterion_params": {"count": 5}, "host_guard": False, **kw})


def min_reuse(sequence: list[int]) -> int:
    """The fewest ops between two uses of one copy in ``sequence`` (len(sequence) when none is
    reused)."""
    last: dict[int, int] = {}
    best = len(sequence)
    for i, copy in enumerate(sequence):
        if copy in last:
            best = min(best, i - last[copy])
        last[copy] = i
    return best


# ------------------------------------------------------------------------- the probe

def probe_policy() -> ColdRotate:
    # the probe: a 4 MB working set against a 50 MB L2 -> 5 x 50 / 4 = 62.5 -> 63 copies
    policy = ColdRotate(cache_bytes=math.ceil(12.5 * WS), budget_bytes=1 << 40)
    assert policy.copies_needed(WS) == 63
    return policy


def test_the_graph_timer_replays_every_copy_when_its_bound_allows():
    policy, device = probe_policy(), Replay(copies=63)
    m = measure(device, config("graph"), policy)
    assert m.k % 63 == 0 and m.k <= GRAPH_MAX_K
    assert m.cache["copies_prepared"] == m.cache["copies_replayed"] == m.cache["pools"] == 63
    assert m.cache["reuse_distance"] == 63 and m.cache["bytes"] == 63 * WS
    assert m.cache["cold_enough"] is True
    # what the device ran in its last replay uses every copy once
    assert sorted(device.ran[-m.k:][:63]) == list(range(63))


def test_a_graph_bounded_below_the_copies_says_it_replayed_only_k_and_is_not_cold():
    policy, device = probe_policy(), Replay(copies=63)
    m = measure(device, config("graph", max_k=56), policy)
    assert m.k == 56
    assert m.cache["copies_prepared"] == 63
    assert m.cache["copies_replayed"] == m.cache["pools"] == 56
    assert m.cache["reuse_distance"] == 56 == min_reuse(device.ran[-2 * 56:])
    assert m.cache["bytes"] == 56 * WS < m.cache["target_bytes"]
    assert m.cache["cold_enough"] is False
    rec = case_record(CASE, status="ok", measurement=m)
    assert "cache-not-cold" in rec["flags"] and rec["cache_pools"] == 56
    assert rec["cache_bytes"] == 56 * WS


def test_k_between_cycles_rounds_to_whole_cycles_so_no_copy_comes_back_early():
    timer, device = GraphTimer(), Replay(copies=10, per_op_us=100.0)
    policy = ColdRotate(cache_bytes=2 * WS)
    # 1 ms at 100 us per op wants k of about 11: 20 (two cycles) rather than 11 (copy 0 twice in
    # a row across replays)
    k = timer.calibrate(device, policy, target_s=1e-3)
    assert k % 10 == 0
    assert timer.calibrate(device, policy, target_s=1e-3, max_k=15) == 10


@settings(max_examples=300, deadline=None)
@given(copies=st.integers(1, 40), k=st.integers(1, 120))
def test_a_graph_rotation_reports_exactly_the_copies_and_reuse_that_ran(copies, k):
    device, policy = Replay(copies=copies), ColdRotate(cache_bytes=WS)
    policy.graph_schedule(device, k)
    device.graph_times(3, k, rotate=True)     # three replays back to back
    described = policy.describe(device)
    assert described["copies_replayed"] == len(set(device.ran))
    assert described["reuse_distance"] == min_reuse(device.ran)
    assert described["bytes"] == described["reuse_distance"] * WS
    assert described["cold_enough"] == (described["bytes"] >= 5 * WS)


@settings(max_examples=100, deadline=None)
@given(copies=st.integers(1, 30), timer=st.sampled_from(["host", "batched", "device"]))
def test_the_other_timers_cycle_through_every_copy(copies, timer):
    device, policy = Replay(copies=copies), ColdRotate(cache_bytes=WS)
    m = measure(device, config(timer, max_k=7, sample_time_s=1e-6), policy)
    ran = device.ran
    # a copy comes back only after all the others (or never, when fewer ops ran than copies)
    assert m.cache["reuse_distance"] == copies
    assert min_reuse(ran) == copies or len(set(ran)) == len(ran)
    assert m.cache["copies_replayed"] == len(set(ran))
    assert m.cache["cold_enough"] == (copies * WS >= 5 * WS)


def test_rotation_state_is_kept_per_prepared_case():
    policy = ColdRotate(cache_bytes=WS)
    a, b = Replay(copies=8), Replay(copies=3)
    policy.graph_schedule(a, 4)
    policy.rotate(b)
    policy.rotate(b)
    assert policy.describe(a)["copies_replayed"] == 4
    assert policy.describe(b)["copies_replayed"] == 2 and policy.describe(b)["reuse_distance"] == 3
    # before anything ran, the description is the plan
    assert policy.describe(Replay(copies=6))["copies_replayed"] == 6


def test_policies_that_do_not_rotate_claim_one_copy_whatever_was_prepared():
    device = Replay(copies=12)
    assert HotCache(WS).describe(device)["pools"] == 1
    assert ColdFlush(WS).describe(device)["pools"] == 1
    m = measure(device, config("graph", cache="hot"), HotCache(WS))
    assert m.cache["pools"] == 1 and set(device.ran) == {0}


# ------------------------------------------------------------------------ cache-hit-suspected

def record_at(median_us: float, cache: dict, copy_gbps: float, read_gbps: float | None) -> dict:
    from kvmicro.harness.measure import Measurement
    from kvmicro.harness.stats import Stats

    samples = [median_us] * 10
    m = Measurement(samples_us=samples, stats=Stats.from_samples(samples), timer="graph",
                    cache=cache, criterion={"name": "sample-count", "params": {},
                                            "converged": True, "why_not": ""},
                    k=8, dropped=0, elapsed_s=0.1)
    return case_record(CASE, status="ok", measurement=m,
                       derived=derive(CASE, median_us, copy_gbps, read_gbps=read_gbps))


COLD = {"name": "cold:rotate", "bytes": 10 * WS, "pools": 10, "cache_bytes": WS,
        "target_bytes": 5 * WS, "cold_enough": True}
HOT = {"name": "hot", "bytes": 0, "pools": 1, "cache_bytes": WS}


def test_a_cold_record_faster_than_memory_is_flagged_cache_hit_suspected():
    gbps_at = WS / 1e3      # GB/s at a 1 us median
    fast = record_at(1.0, COLD, copy_gbps=gbps_at / 2, read_gbps=gbps_at / 1.5)
    assert fast["derived"]["pct_of_peak"] == pytest.approx(200.0)
    assert "cache-hit-suspected" in fast["flags"]
    assert "cache-hit-suspected" not in record_at(3.0, COLD, gbps_at / 2, gbps_at / 1.5)["flags"]
    # hot claims nothing about memory
    assert "cache-hit-suspected" not in record_at(1.0, HOT, gbps_at / 2, None)["flags"]
    # above the copy ceiling but within the read ceiling: a read-heavy op may do that
    within_read = record_at(1.0, COLD, copy_gbps=gbps_at / 2, read_gbps=gbps_at * 2)
    assert "cache-hit-suspected" not in within_read["flags"]
    # without a measured ceiling there is nothing to compare with
    assert "cache-hit-suspected" not in record_at(1.0, COLD, None, None)["flags"]  # type: ignore


def test_exceeds_ceiling_reads_the_derived_percentages():
    assert exceeds_ceiling({"pct_of_peak": 101.0})
    assert exceeds_ceiling({"pct_of_peak": 101.0, "pct_of_read": 100.5})
    assert not exceeds_ceiling({"pct_of_peak": 101.0, "pct_of_read": 99.0})
    assert not exceeds_ceiling({"pct_of_peak": 100.0})
    assert not exceeds_ceiling({"pct_of_peak": None}) and not exceeds_ceiling(None)
