"""Stopping criteria: named objects in a registry; when they stop, and what they say when not."""

from __future__ import annotations

import numpy as np
import pytest

from kvmicro.errors import InvalidCase
from kvmicro.harness.criteria import (
    CRITERIA,
    CiMedianCriterion,
    SampleCountCriterion,
    StdRelCriterion,
    make_criterion,
)
from kvmicro.harness.stats import Stats


def feed_until_done(criterion, stream, limit):
    for i, x in enumerate(stream):
        if i >= limit:
            break
        criterion.add(float(x))
        if criterion.done():
            break
    return criterion.n


def test_registry_names_and_defaults_in_plain_sight():
    assert list(CRITERIA) == ["ci-median", "stdrel", "sample-count"]
    c = make_criterion("ci-median")
    assert isinstance(c, CiMedianCriterion)
    assert c.describe() == {"name": "ci-median", "params": {"noise": 0.02, "min_samples": 10}}
    assert make_criterion("stdrel", noise=0.05).params["noise"] == 0.05


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(InvalidCase, match=r"'median'.*ci-median, stdrel, sample-count"):
        make_criterion("median")


def test_unknown_or_bad_parameters_are_refused_by_name():
    with pytest.raises(InvalidCase, match=r"unknown parameter.*bogus.*valid: noise, min_samples"):
        make_criterion("ci-median", bogus=1)
    with pytest.raises(InvalidCase, match="noise 2"):
        make_criterion("ci-median", noise=2)
    with pytest.raises(InvalidCase, match="min_samples 0"):
        make_criterion("stdrel", min_samples=0)
    with pytest.raises(InvalidCase, match="count -3"):
        make_criterion("sample-count", count=-3)


@pytest.mark.parametrize("name", ["ci-median", "stdrel"])
@pytest.mark.parametrize("min_samples", [10, 25])
def test_noiseless_stream_converges_exactly_at_min_samples(name, min_samples):
    c = make_criterion(name, min_samples=min_samples)
    n = feed_until_done(c, iter(lambda: 12.5, None), 10_000)
    assert n == min_samples
    assert c.done() and c.converged() and c.why_not() == ""


def test_ci_median_never_converges_below_six_samples():
    c = make_criterion("ci-median", min_samples=2)
    n = feed_until_done(c, iter(lambda: 3.0, None), 100)
    assert n == 6
    c.reset()
    for _ in range(5):
        c.add(3.0)
    assert not c.done()
    assert "needs at least 6" in c.why_not()


def test_very_noisy_stream_does_not_converge_and_says_why():
    rng = np.random.default_rng(3)
    stream = rng.lognormal(mean=3.0, sigma=1.0, size=500)
    c = make_criterion("ci-median", noise=0.02)
    n = feed_until_done(c, stream, 500)
    assert n == 500 and not c.done() and not c.converged()
    why = c.why_not()
    assert "95% CI of the median" in why and "> noise 2.00%" in why and "n 500" in why
    # the reported half-width is the one Stats computes from the same samples
    s = Stats.from_samples(stream)
    assert f"±{s.ci_halfwidth_pct:.2f}%" in why


def test_ci_median_converges_on_moderate_noise_once_the_ci_is_tight():
    rng = np.random.default_rng(5)
    stream = rng.normal(100.0, 5.0, 5000)
    c = make_criterion("ci-median", noise=0.01, min_samples=10)
    n = feed_until_done(c, stream, 5000)
    assert c.converged() and 10 < n < 5000
    s = Stats.from_samples(stream[:n])
    assert s.ci_halfwidth_pct <= 1.0
    # one sample fewer was not enough
    prev = Stats.from_samples(stream[:n - 1])
    assert prev.ci_halfwidth_pct > 1.0 or n - 1 < 10


def test_why_not_before_min_samples():
    c = make_criterion("ci-median", min_samples=20)
    for _ in range(7):
        c.add(1.0)
    assert c.why_not() == "7 samples < min_samples 20"
    s = make_criterion("sample-count", count=30)
    s.add(1.0)
    assert s.why_not() == "1 samples < count 30"


def test_stdrel_converges_on_low_noise():
    rng = np.random.default_rng(11)
    c = make_criterion("stdrel", noise=0.02, min_samples=10)
    n = feed_until_done(c, rng.normal(50.0, 0.2, 1000), 1000)
    assert n == 10 and c.converged()


def test_stdrel_stops_on_a_noise_plateau_without_claiming_convergence():
    rng = np.random.default_rng(2)
    c = StdRelCriterion(noise=0.02)
    n = feed_until_done(c, rng.normal(100.0, 20.0, 100_000), 100_000)
    assert c.done() and not c.converged()
    # checked every 16 samples once the 64-value window is full
    assert 64 <= n < 5000 and n % 16 == 0
    assert "plateaued" in c.why_not() and "stdev/mean" in c.why_not()


def test_stdrel_min_time():
    c = StdRelCriterion(min_time_s=1e-3, min_samples=2)   # 1000 µs of sampled time
    for _ in range(9):
        c.add(100.0)
    assert not c.done() and "min_time_s" in c.why_not()
    c.add(100.0)
    assert c.done()


def test_sample_count_stops_at_count_and_defaults_to_min_samples():
    c = SampleCountCriterion(count=7)
    assert feed_until_done(c, iter(lambda: 1.0, None), 100) == 7
    d = make_criterion("sample-count", min_samples=4)
    assert feed_until_done(d, iter(lambda: 1.0, None), 100) == 4


@pytest.mark.parametrize("name", list(CRITERIA))
def test_reset_forgets_everything(name):
    c = make_criterion(name, min_samples=10)
    for _ in range(50):
        c.add(5.0)
    assert c.done()
    c.reset()
    assert c.n == 0 and not c.done() and "0 samples" in c.why_not()
