"""Verdicts: faster/slower need the Mann-Whitney test to reject and the bootstrap CI of the median
ratio to lie beyond the threshold; same needs that CI inside it; untrusted records are unsure."""

from __future__ import annotations

import numpy as np
import pytest

from kvmicro.errors import InvalidCase
from kvmicro.harness.stats import Stats
from kvmicro.results import flags_for, median_halfwidth
from kvmicro.verdict import (
    VERDICTS,
    compare_records,
    compare_samples,
    mann_whitney_u,
    ratio_interval,
    record_rounds,
)


def timings(rng: np.random.Generator, n: int, median: float = 100.0,
            sigma: float = 0.04) -> np.ndarray:
    """Right-skewed positive times, as kernels give: log-normal around ``median``."""
    return rng.lognormal(np.log(median), sigma, n)


def record(samples, *, flags=(), status="ok", converged=True, rounds=None) -> dict:
    x = np.asarray(samples, float)
    lo, hi = np.percentile(x, [40, 60]) if x.size else (0.0, 0.0)
    rec = {"status": status, "flags": list(flags), "samples_us": x.tolist(),
           "stats": {"median_us": float(np.median(x)) if x.size else None, "ci95_lo_us": lo,
                     "ci95_hi_us": hi, "converged": converged}}
    if rounds is not None:
        rec["rounds"] = {"sizes": list(rounds)}
    return rec


def test_identical_distributions_are_never_called_faster_or_slower():
    rng = np.random.default_rng(7)
    verdicts = [compare_samples(timings(rng, 40), timings(rng, 40)).verdict for _ in range(300)]
    assert set(verdicts) <= {"same", "unsure"}
    assert verdicts.count("same") > 250   # 40 clean samples a side pin the ratio within 5%


def test_a_planted_1_3x_slowdown_on_clean_samples_is_slower():
    rng = np.random.default_rng(8)
    verdicts = [compare_samples(timings(rng, 30) * 1.3, timings(rng, 30)).verdict
                for _ in range(200)]
    assert verdicts.count("slower") == 200


def test_a_speedup_is_faster_and_the_ratio_is_new_over_base():
    rng = np.random.default_rng(9)
    v = compare_samples(timings(rng, 50, 70.0), timings(rng, 50, 100.0))
    assert v.verdict == "faster"
    assert v.ratio == pytest.approx(0.7, rel=0.03)
    assert v.ratio_ci[0] < v.ratio < v.ratio_ci[1] < 0.95
    assert v.p_value is not None and v.p_value < 1e-6
    assert "Mann-Whitney" in v.reason


def test_a_change_below_the_threshold_is_same_and_above_a_smaller_one_is_slower():
    rng = np.random.default_rng(10)
    new, base = timings(rng, 400, 102.0, 0.01), timings(rng, 400, 100.0, 0.01)
    assert compare_samples(new, base, threshold=0.05).verdict == "same"
    assert compare_samples(new, base, threshold=0.01).verdict == "slower"


def test_a_ci_that_straddles_the_threshold_is_unsure():
    rng = np.random.default_rng(11)
    v = compare_samples(timings(rng, 8, 105.0, 0.15), timings(rng, 8, 100.0, 0.15))
    assert v.verdict == "unsure" and "straddles" in v.reason


def test_too_few_samples_or_none_is_unsure():
    assert compare_samples([100.0] * 4, [200.0] * 4).verdict == "unsure"
    v = compare_samples([], [1.0, 2.0])
    assert v.verdict == "unsure" and "no samples" in v.reason


def test_rounds_that_disagree_keep_a_difference_from_being_named():
    rng = np.random.default_rng(12)
    base = timings(rng, 60, 100.0, 0.01)
    # new is 30% slower in two rounds, but one of its rounds ran at base speed
    new = np.concatenate([timings(rng, 20, 130.0, 0.01), timings(rng, 20, 100.0, 0.01),
                          timings(rng, 20, 130.0, 0.01)])
    pooled = compare_samples(new, base)
    assert pooled.verdict == "slower"   # pooled samples hide the disagreement...
    split = compare_samples(new, base, new_rounds=[20, 20, 20], base_rounds=[20, 20, 20])
    assert split.verdict == "unsure"    # ...the rounds do not
    assert split.ratio_ci[1] - split.ratio_ci[0] > pooled.ratio_ci[1] - pooled.ratio_ci[0]


def test_the_ratio_interval_covers_the_true_ratio_about_95_percent_of_the_time():
    rng = np.random.default_rng(13)
    hits = 0
    for _ in range(200):
        lo, hi = ratio_interval(timings(rng, 31, 120.0, 0.1), timings(rng, 31, 100.0, 0.1))
        hits += lo <= 1.2 <= hi
    assert 0.88 <= hits / 200 <= 0.995


def test_the_bootstrap_is_seeded_so_a_verdict_is_reproducible():
    rng = np.random.default_rng(14)
    a, b = timings(rng, 25), timings(rng, 25)
    assert compare_samples(a, b) == compare_samples(a, b)


def test_mann_whitney_u_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(15)
    a, b = np.round(timings(rng, 23), 0), np.round(timings(rng, 31, 103.0), 0)   # with ties
    u, p = mann_whitney_u(a, b)
    ref = stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic")
    assert u == pytest.approx(ref.statistic)
    assert p == pytest.approx(ref.pvalue, rel=1e-9)
    assert mann_whitney_u([5.0] * 6, [5.0] * 6)[1] == 1.0


@pytest.mark.parametrize("kw", [dict(flags=["noisy"]), dict(flags=["not-converged"]),
                                dict(flags=["host-busy"]), dict(flags=["rounds-disagree"]),
                                dict(converged=False), dict(status="error")])
def test_an_untrusted_record_never_yields_faster_or_slower(kw):
    rng = np.random.default_rng(16)
    clean = record(timings(rng, 50))
    bad = record(timings(rng, 50, 200.0), **kw)
    for new, base in ((bad, clean), (clean, bad)):
        v = compare_records(new, base)
        assert v.verdict == "unsure"
        assert ("record" in v.reason)


def measured_record(samples, noise: float = 0.02) -> dict:
    """A record as the sweep flags it: stats from the samples, a converged ci-median criterion
    with the run's ``noise`` target, and the flags :func:`kvmicro.results.flags_for` gives."""
    stats = Stats.from_samples(samples).to_dict()
    criterion = {"name": "ci-median", "params": {"noise": noise}, "converged": True}
    return {"status": "ok", "samples_us": list(map(float, samples)),
            "stats": {**stats, "converged": True}, "flags": flags_for(stats, criterion, 0, None)}


def test_a_wide_spread_around_a_well_known_median_still_decides():
    rng = np.random.default_rng(21)
    # sigma 0.3: the middle 90% of the samples spans ~100% of the median, yet 2,000 of them pin
    # the median within ~1.6%
    base = measured_record(timings(rng, 2000, sigma=0.3))
    assert "wide-spread" in base["flags"] and "noisy" not in base["flags"]
    slower = compare_records(measured_record(timings(rng, 2000, sigma=0.3) * 1.3), base)
    assert slower.verdict == "slower" and slower.ratio == pytest.approx(1.3, rel=0.03)
    for _ in range(30):
        twin = measured_record(timings(rng, 2000, sigma=0.3))
        assert compare_records(twin, base).verdict in ("same", "unsure")


def test_noisy_means_the_median_is_not_known_to_the_runs_noise_target():
    rng = np.random.default_rng(22)
    samples = timings(rng, 40, sigma=0.05)   # the median's CI is about ±3%
    assert 0.02 < median_halfwidth(Stats.from_samples(samples).to_dict()) < 0.05
    at_2pct, at_5pct = measured_record(samples, noise=0.02), measured_record(samples, noise=0.05)
    assert "noisy" in at_2pct["flags"] and "noisy" not in at_5pct["flags"]
    # a noisy record is unsure even against a 1.5x difference
    other = measured_record(timings(rng, 40, 150.0, sigma=0.05), noise=0.02)
    v = compare_records(other, at_2pct)
    assert v.verdict == "unsure" and "flagged noisy" in v.reason
    assert compare_records(measured_record(timings(rng, 40, 150.0, sigma=0.05), noise=0.05),
                           at_5pct).verdict == "slower"


def test_clean_records_are_compared_on_their_samples_and_rounds():
    rng = np.random.default_rng(17)
    base = record(timings(rng, 60), rounds=[20, 20, 20])
    assert record_rounds(base) == [20, 20, 20]
    assert compare_records(record(timings(rng, 60, 140.0)), base).verdict == "slower"
    assert compare_records(record(timings(rng, 60)), base).verdict == "same"


def test_records_without_samples_can_be_same_from_their_cis_but_never_different():
    same = {"status": "ok", "flags": [], "samples_us": [],
            "stats": {"median_us": 100.0, "ci95_lo_us": 99.0, "ci95_hi_us": 101.0}}
    slow = {**same, "stats": {"median_us": 200.0, "ci95_lo_us": 199.0, "ci95_hi_us": 201.0}}
    assert compare_records(same, same).verdict == "same"
    v = compare_records(slow, same)
    assert v.verdict == "unsure" and v.ratio == pytest.approx(2.0)


def test_bad_parameters_and_samples_name_the_value():
    with pytest.raises(InvalidCase, match="threshold 5"):
        compare_samples([1.0] * 9, [1.0] * 9, threshold=5)
    with pytest.raises(InvalidCase, match="alpha"):
        compare_samples([1.0] * 9, [1.0] * 9, alpha=0)
    with pytest.raises(InvalidCase, match="finite positive"):
        compare_samples([1.0, float("nan")] * 5, [1.0] * 9)
    assert VERDICTS == ("faster", "slower", "same", "unsure")
