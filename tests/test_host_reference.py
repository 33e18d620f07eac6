"""The host-speed reference: a fixed numpy workload timed after every round of a CPU case, kept
in the record (host.reference), so that a comparison of two runs can divide the host's speed
out of each case's ratio; GPU cases take none, and records of one run are never adjusted."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from test_measure import Fake, FakeDevice
from test_verdict_drift import run_record

from kvmicro.compare import between_runs, render
from kvmicro.compare import compare_records as compare_runs
from kvmicro.errors import InvalidCase
from kvmicro.harness.cache import HotCache
from kvmicro.harness.measure import MeasureConfig, Sampler
from kvmicro.harness.reference import PROBE, reference_probe, reference_summary
from kvmicro.verdict import (
    MIN_DRIFT_CASES,
    between_runs_host_factor,
    host_reference,
    scaled_record,
)


def config(**kw) -> MeasureConfig:
    return MeasureConfig(**{"warmup_count": 1, "warmup_time_s": 0.0, "max_time_s": 0.2,
                            "host_guard": False, "criterion": "sample-count",
                            "criterion_params": {"count": 12}, "min_samples": 3, **kw})


def test_a_probe_times_the_fixed_workload_in_microseconds():
    times = [reference_probe() for _ in range(3)]
    assert all(10.0 < t < 1e6 for t in times)
    assert reference_summary([]) is None
    summary = reference_summary([300.0, 310.0, 900.0])
    assert summary == {"probe": PROBE, "median_us": 310.0, "rounds_us": [300.0, 310.0, 900.0]}


def test_a_cpu_case_records_one_probe_per_round():
    s = Sampler(Fake(op_s=0.0), config(), HotCache())
    while not s.done():
        s.round()
    ref = s.result().host["reference"]
    assert ref["probe"] == PROBE and len(ref["rounds_us"]) == s.rounds_taken >= 3
    assert ref["median_us"] == pytest.approx(float(np.median(ref["rounds_us"])), rel=1e-6)


def test_no_probe_for_a_gpu_case_or_when_switched_off():
    off = Sampler(Fake(), config(host_reference=False), HotCache())
    while not off.done():
        off.round()
    assert "reference" not in off.result().host
    gpu = FakeDevice(per_op_us=5.0)
    gpu.case = dataclasses.replace(gpu.case, backend="native:cuda")
    s = Sampler(gpu, config(timer="device"), HotCache())
    while not s.done():
        s.round()
    assert not s.reference_on and "reference" not in s.result().host


def with_reference(rec: dict, median_us: float, probe: str = PROBE) -> dict:
    return {**rec, "host": {"guard": "off", "reference": {"probe": probe, "median_us": median_us,
                                                          "rounds_us": [median_us]}}}


def two_runs_with_references(cases: int, host: float, code: float = 1.0, seed: int = 0,
                              probe_noise: float = 0.1) -> tuple[list[dict], list[dict]]:
    """BASE and NEW records of ``cases`` cases: NEW's run on a host ``host`` times slower (its
    probes too, each record's with noise of spread ``probe_noise`` in log) and its code
    ``code`` times slower (the probes not)."""
    rng = np.random.default_rng(seed)
    base, new = [], []
    for i in range(cases):
        b = run_record(100.0 * (i + 1), rng, ctx=i)
        n = run_record(100.0 * (i + 1) * host * code, rng, ctx=i)
        base.append(with_reference(b, 400.0 * math.exp(probe_noise * rng.standard_normal())))
        new.append(with_reference(n, 400.0 * host * math.exp(probe_noise * rng.standard_normal())))
    return base, new


def test_the_runs_host_factor_is_the_median_of_the_records_reference_ratios():
    base, new = two_runs_with_references(41, host=1.4, seed=0)
    factor = between_runs_host_factor(list(zip(new, base, strict=True)))
    assert factor == pytest.approx(1.4, rel=0.06)
    # one wild probe does not move a median
    new[0] = with_reference(new[0], 1e6)
    assert between_runs_host_factor(list(zip(new, base, strict=True))) == \
        pytest.approx(factor, rel=0.03)


def test_no_host_factor_without_enough_references_or_across_probes():
    base, new = two_runs_with_references(MIN_DRIFT_CASES, host=1.2)
    assert between_runs_host_factor(list(zip(new, base, strict=True))) is not None
    assert between_runs_host_factor(list(zip(new[1:], base[1:], strict=True))) is None
    other = [with_reference(r, 500.0, "other-probe") for r in new]
    assert between_runs_host_factor(list(zip(other, base, strict=True))) is None
    plain = [{**r, "host": {}} for r in new]
    assert between_runs_host_factor(list(zip(plain, base, strict=True))) is None
    bad = with_reference(new[0], 500.0)
    bad["host"]["reference"]["median_us"] = math.nan
    assert host_reference(bad) is None


def test_scaling_a_record_refuses_a_bad_factor_naming_it():
    rec = run_record(100.0, np.random.default_rng(2))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(InvalidCase, match="scale factor"):
            scaled_record(rec, bad)


def test_two_runs_a_host_slowdown_of_every_case_is_not_called_slower():
    """Identical code, the second run on a host 1.35x slower for every case (the references saw
    it): without them every case would be "slower"; with them none is."""
    base, new = two_runs_with_references(24, host=1.35, seed=3)
    result = compare_runs([], base, [], new)
    assert not [c for c in result.comparisons if c.verdict in ("faster", "slower")]
    assert all(c.host_factor == pytest.approx(1.35, rel=0.08) for c in result.comparisons)
    assert "host speed between the runs" in render(result)
    plain = compare_runs([], [{**r, "host": {}} for r in base], [],
                         [{**r, "host": {}} for r in new])
    assert sum(c.verdict == "slower" for c in plain.comparisons) == 24


def test_two_runs_a_real_slowdown_on_a_steady_host_is_still_found():
    base, new = two_runs_with_references(24, host=1.0, code=1.3, seed=4, probe_noise=0.02)
    result = compare_runs([], base, [], new)
    assert sum(c.verdict == "slower" for c in result.comparisons) == 24
    factors, drift = between_runs(list(zip(new, base, strict=True)))
    assert all(f == pytest.approx(1.0, abs=0.02) for f in factors) and drift is not None


def test_a_real_slowdown_on_a_slower_host_is_found_as_the_codes_share():
    base, new = two_runs_with_references(24, host=1.3, code=1.3, seed=5)
    result = compare_runs([], base, [], new)
    assert sum(c.verdict == "slower" for c in result.comparisons) == 24
    assert all(c.ratio == pytest.approx(1.3, rel=0.08) for c in result.comparisons)
