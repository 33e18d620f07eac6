"""Stats: the summary of a case's samples, checked against hand-computed values and against known
distributions (the median CI must cover the true median about 95% of the time)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from kvmicro.errors import InvalidCase
from kvmicro.harness.stats import (
    MIN_CI_SAMPLES,
    Stats,
    check_columns,
    median_ci_coverage,
    median_ci_ranks,
)


def test_fields_are_the_dict_keys_in_order():
    s = Stats.from_samples([3.0, 1.0, 2.0])
    assert tuple(s.to_dict()) == Stats.FIELDS
    assert Stats.FIELDS == ("n", "min_us", "max_us", "mean_us", "median_us", "trimmed_mean_us",
                            "stdev_us", "mad_us", "p05_us", "p95_us", "ci95_lo_us", "ci95_hi_us",
                            "spread_pct", "outliers")


def test_known_array_one_to_ten():
    s = Stats.from_samples([7, 1, 10, 4, 2, 9, 3, 8, 6, 5])  # order must not matter
    assert s.n == 10
    assert (s.min_us, s.max_us) == (1.0, 10.0)
    assert s.mean_us == pytest.approx(5.5)
    assert s.median_us == pytest.approx(5.5)
    # linear interpolation between order statistics: p = 1 + q (n - 1)
    assert s.p05_us == pytest.approx(1.45)
    assert s.p95_us == pytest.approx(9.55)
    # 10% trimmed: drop 1 and 10
    assert s.trimmed_mean_us == pytest.approx(5.5)
    # |x - 5.5| = 4.5, 3.5, 2.5, 1.5, 0.5, 0.5, 1.5, 2.5, 3.5, 4.5 -> median 2.5
    assert s.mad_us == pytest.approx(2.5)
    assert s.stdev_us == pytest.approx(math.sqrt(sum((x - 5.5) ** 2 for x in range(1, 11)) / 9))
    # n = 10: the 95% order-statistic interval is [x(2), x(9)]
    assert (s.ci95_lo_us, s.ci95_hi_us) == (2.0, 9.0)
    assert s.spread_pct == pytest.approx((9.55 - 1.45) / 5.5 * 100)
    assert s.outliers == 0


def test_trimmed_mean_and_mad_resist_one_wild_sample():
    s = Stats.from_samples([1, 2, 3, 4, 5, 6, 7, 8, 9, 1000])
    assert s.mean_us == pytest.approx(104.5)
    assert s.trimmed_mean_us == pytest.approx(5.5)
    assert s.median_us == pytest.approx(5.5)
    assert s.mad_us == pytest.approx(2.5)


def test_tukey_outliers_counted_outside_the_fences():
    base = [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0]
    # Q1 = 11.75, Q3 = 15.25, IQR = 3.5 -> fences [6.5, 20.5]
    assert Stats.from_samples(base).outliers == 0
    assert Stats.from_samples([*base, 20.4]).outliers == 0
    wild = Stats.from_samples([*base, 40.0, 0.5])
    q1, q3 = np.percentile([*base, 40.0, 0.5], [25, 75])
    expected = sum(1 for x in [*base, 40.0, 0.5] if x < q1 - 1.5 * (q3 - q1)
                   or x > q3 + 1.5 * (q3 - q1))
    assert wild.outliers == expected == 2


def test_single_sample_and_constant_samples():
    one = Stats.from_samples([4.0])
    assert one.n == 1 and one.stdev_us == 0.0 and one.mad_us == 0.0
    assert (one.ci95_lo_us, one.ci95_hi_us) == (4.0, 4.0)
    assert not one.ci_valid
    flat = Stats.from_samples([2.5] * 50)
    assert flat.spread_pct == 0.0 and flat.ci_halfwidth_pct == 0.0 and flat.outliers == 0


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")], [[1.0, 2.0]]])
def test_bad_samples_are_refused_by_name(bad):
    with pytest.raises(InvalidCase, match=r"\[stats\]"):
        Stats.from_samples(bad)


def _exact_rank(n: int) -> int | None:
    """Largest j with P(j <= B <= n - j) >= 0.95, B ~ Bin(n, 1/2), in exact arithmetic."""
    best, below = None, 0  # below: the count of outcomes with B < j
    for j in range(1, (n + 1) // 2 + 1):
        below += math.comb(n, j - 1)
        if Fraction(2 ** n - 2 * below, 2 ** n) >= Fraction(95, 100):
            best = j
    return best


@pytest.mark.parametrize("n", [*range(1, 40), 57, 100, 101, 250, 999])
def test_median_ci_ranks_are_exact(n):
    ranks = median_ci_ranks(n)
    expected = _exact_rank(n)
    if expected is None:
        assert ranks is None and n < MIN_CI_SAMPLES
    else:
        assert ranks == (expected, n + 1 - expected)
        assert median_ci_coverage(n, expected) >= 0.95
        if expected + 1 <= n + 1 - (expected + 1):
            assert median_ci_coverage(n, expected + 1) < 0.95


def test_median_ci_ranks_large_n_follow_the_normal_approximation():
    for n in (2000, 10_000):
        j, k = median_ci_ranks(n)
        approx = n / 2 - 1.96 * math.sqrt(n) / 2
        assert abs(j - approx) <= 2 and k == n + 1 - j
        assert 0.95 <= median_ci_coverage(n, j) < 0.955


@pytest.mark.parametrize("name,draw,true_median", [
    ("normal", lambda rng, n: rng.normal(100.0, 5.0, n), 100.0),
    ("uniform", lambda rng, n: rng.uniform(10.0, 20.0, n), 15.0),
    ("exponential", lambda rng, n: rng.exponential(3.0, n), 3.0 * math.log(2.0)),
])
@pytest.mark.parametrize("n", [15, 60])
def test_median_ci_covers_the_true_median_about_95_percent(name, draw, true_median, n):
    rng = np.random.default_rng(1234)
    trials = 400
    covered = 0
    for _ in range(trials):
        s = Stats.from_samples(draw(rng, n))
        covered += s.ci95_lo_us <= true_median <= s.ci95_hi_us
    rate = covered / trials
    # the exact coverage of the chosen ranks is >= 95%; sampling error over 400 trials ~ ±2%
    assert 0.90 <= rate <= 0.99, f"{name} n={n}: coverage {rate:.3f}"
    # and it is near the rank's exact coverage, not just anywhere in the band
    j, _ = median_ci_ranks(n)
    assert abs(rate - median_ci_coverage(n, j)) < 0.035


def test_percentiles_and_mad_of_a_known_distribution():
    rng = np.random.default_rng(7)
    x = rng.normal(50.0, 2.0, 20_000)
    s = Stats.from_samples(x)
    assert s.median_us == pytest.approx(50.0, abs=0.05)
    assert s.p05_us == pytest.approx(50.0 - 1.6449 * 2.0, abs=0.08)
    assert s.p95_us == pytest.approx(50.0 + 1.6449 * 2.0, abs=0.08)
    # raw MAD of a normal is 0.6745 sigma
    assert s.mad_us == pytest.approx(0.6745 * 2.0, rel=0.03)
    assert s.stdev_us == pytest.approx(2.0, rel=0.03)
    # Tukey's fences sit at +-2.698 sigma: 0.70% of a normal lies outside
    assert 0.003 < s.outliers / s.n < 0.011


def test_dict_round_trip_ignores_extra_keys():
    s = Stats.from_samples(np.random.default_rng(0).exponential(2.0, 101))
    d = {**s.to_dict(), "converged": True}
    assert Stats.from_dict(d) == s


def test_from_dict_names_missing_fields():
    d = Stats.from_samples([1.0, 2.0]).to_dict()
    del d["mad_us"], d["p95_us"]
    with pytest.raises(InvalidCase, match="mad_us, p95_us"):
        Stats.from_dict(d)


def test_columns_are_validated_against_fields():
    assert check_columns(["median_us", "spread_pct"]) == ("median_us", "spread_pct")
    with pytest.raises(InvalidCase, match=r"'median'.*expected any of n, min_us"):
        check_columns(["median"])
