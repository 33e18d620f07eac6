"""Verdicts between two runs allow for the drift between them: identical code measured in two
sweeps moves each case by a drift of its own, which no record shows; its spread is estimated
from all the matched cases at once (between_runs_sd) and widens every unpaired interval, while a
shift that moves every case alike (a real regression) does not count as drift."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvmicro.compare import compare_records as compare_runs
from kvmicro.compare import render
from kvmicro.errors import InvalidCase
from kvmicro.verdict import (
    MIN_DRIFT_CASES,
    between_runs_sd,
    compare_records,
    compare_samples,
    widen_by_drift,
)


def run_record(median: float, rng: np.random.Generator, n: int = 60, sigma: float = 0.01,
               ctx: int = 0, group: str | None = None) -> dict:
    """A clean, converged record of ``n`` log-normal samples around ``median`` (µs), its
    median's 95% CI from the samples' order statistics, keyed by ``ctx``."""
    x = np.sort(rng.lognormal(math.log(median), sigma, n))
    half = round(1.96 * math.sqrt(n) / 2)
    mid = n // 2
    rec = {"status": "ok", "flags": [], "samples_us": x.tolist(), "op": "gather", "ctx": ctx,
           "backend": "native:cpu", "batch": 1,
           "stats": {"median_us": float(np.median(x)), "ci95_lo_us": float(x[mid - half]),
                     "ci95_hi_us": float(x[min(n - 1, mid + half)]), "converged": True}}
    if group is not None:
        rec["rounds"] = {"group": group, "sizes": [n // 3] * 3, "index": [0, 1, 2]}
    return rec


def two_runs(cases: int, drift: float, shift: float = 1.0, seed: int = 0
             ) -> list[tuple[dict, dict]]:
    """(new, base) record pairs of ``cases`` cases measured in two runs: each case's true time
    moves by its own log-normal drift of spread ``drift`` between the runs, and NEW is
    ``shift`` times slower everywhere."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(cases):
        true = 100.0 * (1 + i)
        moved = true * math.exp(drift * rng.standard_normal()) * shift
        pairs.append((run_record(moved, rng, ctx=i), run_record(true, rng, ctx=i)))
    return pairs


def test_the_drift_between_runs_is_estimated_from_the_cases_spread():
    tau = between_runs_sd(two_runs(60, drift=0.10))
    assert tau == pytest.approx(0.10, rel=0.3)


def test_a_shift_of_every_case_alike_is_not_drift():
    assert between_runs_sd(two_runs(60, drift=0.10, shift=1.3)) == \
        pytest.approx(between_runs_sd(two_runs(60, drift=0.10)), rel=1e-9)


def test_without_drift_the_estimate_is_about_zero_sampling_noise_taken_out():
    tau = between_runs_sd(two_runs(60, drift=0.0))
    assert tau is not None and tau < 0.004    # the samples' own 1% spread is not drift


def test_too_few_cases_give_no_estimate():
    assert between_runs_sd(two_runs(MIN_DRIFT_CASES - 1, drift=0.1)) is None
    assert between_runs_sd(two_runs(MIN_DRIFT_CASES, drift=0.1)) is not None


def test_records_not_ok_or_interleaved_do_not_count():
    pairs = two_runs(MIN_DRIFT_CASES, drift=0.1)
    pairs[0] = ({**pairs[0][0], "status": "error"}, pairs[0][1])
    assert between_runs_sd(pairs) is None
    rng = np.random.default_rng(3)
    twins = [(run_record(100.0, rng, group="g"), run_record(100.0, rng, group="g"))
             for _ in range(MIN_DRIFT_CASES)]
    assert between_runs_sd(twins) is None     # one sweep's interleaved arms: no run drift


def test_identical_code_across_drifting_runs_is_not_called_faster_or_slower():
    pairs = two_runs(200, drift=0.12, seed=5)
    plain = [compare_records(n, b).verdict for n, b in pairs]
    tau = between_runs_sd(pairs)
    allowed = [compare_records(n, b, drift_sd=tau).verdict for n, b in pairs]
    # without the drift most cases are "decided" by the host; with it only the drift's tail
    # beyond the 95% interval and the threshold (~2% of normal drift of this spread)
    assert sum(v in ("faster", "slower") for v in plain) > 100
    assert sum(v in ("faster", "slower") for v in allowed) <= 10
    assert set(allowed) <= {"faster", "slower", "same", "unsure"}


def test_a_real_slowdown_beyond_the_drift_is_still_found():
    pairs = two_runs(100, drift=0.03, shift=1.3, seed=6)
    tau = between_runs_sd(pairs)
    verdicts = [compare_records(n, b, drift_sd=tau).verdict for n, b in pairs]
    assert verdicts.count("slower") >= 98


def test_the_drift_widens_the_interval_in_quadrature_in_log():
    lo, hi = widen_by_drift(1.3, (1.25, 1.35), 0.05)
    c = math.log(1.3)
    assert c - math.log(lo) == pytest.approx(math.hypot(c - math.log(1.25), 1.96 * 0.05),
                                             rel=1e-4)
    assert math.log(hi) - c == pytest.approx(math.hypot(math.log(1.35) - c, 1.96 * 0.05),
                                             rel=1e-4)
    assert widen_by_drift(1.3, (1.25, 1.35), 0.0) == (1.25, 1.35)


def test_a_bad_drift_spread_is_refused_naming_it():
    rng = np.random.default_rng(1)
    for bad in (-0.1, math.nan, math.inf, "0.1"):
        with pytest.raises(InvalidCase, match="drift_sd"):
            compare_samples(rng.lognormal(4, 0.01, 20), rng.lognormal(4, 0.01, 20),
                            drift_sd=bad)


def test_compare_of_two_runs_allows_for_their_drift_and_says_how_large():
    pairs = two_runs(40, drift=0.12, seed=7)
    result = compare_runs([], [b for _, b in pairs], [], [n for n, _ in pairs])
    assert result.run_drift_sd == pytest.approx(between_runs_sd(pairs))
    false = sum(c.verdict in ("faster", "slower") for c in result.comparisons)
    assert false <= 2
    text = render(result)
    assert "drift between the two runs" in text and "tau" in text


def test_compare_of_few_cases_estimates_no_drift_and_prints_none():
    pairs = two_runs(3, drift=0.12, seed=8)
    result = compare_runs([], [b for _, b in pairs], [], [n for n, _ in pairs])
    assert result.run_drift_sd is None
    assert "drift between the two runs" not in render(result)
