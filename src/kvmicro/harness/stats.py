"""Summary statistics of one case's samples. Every time is in microseconds (µs).

:class:`Stats` is at once the schema of a record's ``stats`` object, the columns a report may show
and the list ``--columns`` validates against: :attr:`Stats.FIELDS`. It is built only by
:meth:`Stats.from_samples` (or read back by :meth:`Stats.from_dict`), so a stored figure always
comes from the same definitions, which docs/methodology.md spells out:

- percentiles (p05, p95, and Tukey's quartiles) interpolate linearly between order statistics
  (numpy's default, Hyndman & Fan type 7);
- ``stdev_us`` is the sample standard deviation (n - 1); 0 for one sample;
- ``mad_us`` is the raw median absolute deviation, ``median(|x - median|)``, not scaled to sigma;
- ``trimmed_mean_us`` drops ``floor(0.1 n)`` samples from each end;
- ``ci95_lo_us``/``ci95_hi_us`` bound a distribution-free 95% confidence interval of the median
  from order statistics: ``[x(j), x(n+1-j)]`` with the largest ``j`` whose binomial coverage is
  still >= 95%. Below 6 samples no such ``j`` exists; the interval is then ``[min, max]``, whose
  coverage ``1 - 2^(1-n)`` is under 95% (the stopping rules never converge there);
- ``spread_pct`` is ``(p95 - p05) / median * 100``: the width of the middle 90% of the samples
  relative to the median. It describes the distribution (run-to-run variation), not the precision
  of the median, which is what the CI says;
- ``outliers`` counts samples outside Tukey's fences ``[Q1 - 1.5 IQR, Q3 + 1.5 IQR]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidCase

#: confidence of the interval of the median
CI_LEVEL = 0.95
#: fraction trimmed from each end for ``trimmed_mean_us``
TRIM_FRACTION = 0.10
#: the fewest samples for which an order-statistic 95% CI of the median exists
MIN_CI_SAMPLES = 6


def _log_binom_pmf(n: int, i: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2.0)


def _binom_half_cdf(n: int, j: int) -> float:
    """P(B <= j) for B ~ Binomial(n, 1/2), summed from j downwards (pmf(i-1) = pmf(i) i/(n-i+1))
    until the terms vanish, so the cost is O(sqrt n) in the tails where the CI ranks sit."""
    if j < 0:
        return 0.0
    if j >= n:
        return 1.0
    term = math.exp(_log_binom_pmf(n, j))
    total = term
    for i in range(j, 0, -1):
        term *= i / (n - i + 1)
        total += term
        if term < total * 1e-16:
            break
    return total


@lru_cache(maxsize=8192)
def median_ci_ranks(n: int, level: float = CI_LEVEL) -> tuple[int, int] | None:
    """1-based ranks ``(j, n + 1 - j)`` of the order statistics bounding a distribution-free
    ``level`` confidence interval of the median of ``n`` samples, or None when ``n`` is too small.

    The number of samples below the true median is Binomial(n, 1/2) for any continuous
    distribution, so ``P(x(j) <= median <= x(n+1-j)) = 1 - 2 P(B <= j - 1)``; ``j`` is the largest
    rank that keeps this >= ``level``.
    """
    if n < 1:
        raise InvalidCase(f"[stats] median CI needs at least one sample, got n={n}")
    tail = (1.0 - level) / 2.0
    # start near the normal approximation and walk to the exact boundary
    j = max(1, int(n / 2.0 - 0.5 * 1.959963984540054 * math.sqrt(n)))
    while j > 1 and _binom_half_cdf(n, j - 1) > tail:
        j -= 1
    while j + 1 <= (n + 1) // 2 and _binom_half_cdf(n, j) <= tail:
        j += 1
    if _binom_half_cdf(n, j - 1) > tail:
        return None
    return j, n + 1 - j


def median_ci_coverage(n: int, j: int) -> float:
    """Exact coverage of ``[x(j), x(n+1-j)]`` as an interval of the median (for docs and tests)."""
    return 1.0 - 2.0 * _binom_half_cdf(n, j - 1)


def _as_samples(samples_us: Sequence[float]) -> np.ndarray:
    arr = np.asarray(samples_us, dtype=np.float64)
    if arr.ndim != 1:
        raise InvalidCase(f"[stats] samples must be a flat sequence, got shape {arr.shape}")
    if arr.size == 0:
        raise InvalidCase("[stats] no samples: cannot summarise an empty measurement")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise InvalidCase(f"[stats] {int(bad.sum())} non-finite samples "
                          f"(first {arr[bad][0]!r} at index {int(np.flatnonzero(bad)[0])})")
    return arr


@dataclass(frozen=True)
class Stats:
    """Summary of one case's samples (µs). Build with :meth:`from_samples`."""

    #: the record's stats keys, the report's columns and what ``--columns`` accepts, in order
    FIELDS: ClassVar[tuple[str, ...]] = (
        "n", "min_us", "max_us", "mean_us", "median_us", "trimmed_mean_us", "stdev_us", "mad_us",
        "p05_us", "p95_us", "ci95_lo_us", "ci95_hi_us", "spread_pct", "outliers",
    )

    n: int
    min_us: float
    max_us: float
    mean_us: float
    median_us: float
    trimmed_mean_us: float
    stdev_us: float
    mad_us: float
    p05_us: float
    p95_us: float
    ci95_lo_us: float
    ci95_hi_us: float
    spread_pct: float
    outliers: int

    @classmethod
    def from_samples(cls, samples_us: Sequence[float]) -> Stats:
        """Summarise ``samples_us`` (finite, at least one); raises InvalidCase otherwise."""
        x = np.sort(_as_samples(samples_us))
        n = int(x.size)
        median = float(np.median(x))
        p05, q1, q3, p95 = (float(v) for v in np.percentile(x, [5, 25, 75, 95]))
        cut = math.floor(TRIM_FRACTION * n)
        trimmed = x[cut:n - cut] if n - 2 * cut > 0 else x
        ranks = median_ci_ranks(n)
        lo, hi = (x[ranks[0] - 1], x[ranks[1] - 1]) if ranks else (x[0], x[-1])
        iqr = q3 - q1
        outliers = int(np.count_nonzero((x < q1 - 1.5 * iqr) | (x > q3 + 1.5 * iqr)))
        spread = (p95 - p05) / median * 100.0 if median > 0 else math.inf if p95 > p05 else 0.0
        return cls(
            n=n,
            min_us=float(x[0]),
            max_us=float(x[-1]),
            mean_us=float(x.mean()),
            median_us=median,
            trimmed_mean_us=float(trimmed.mean()),
            stdev_us=float(x.std(ddof=1)) if n > 1 else 0.0,
            mad_us=float(np.median(np.abs(x - median))),
            p05_us=p05,
            p95_us=p95,
            ci95_lo_us=float(lo),
            ci95_hi_us=float(hi),
            spread_pct=float(spread),
            outliers=outliers,
        )

    # ------------------------------------------------------------------------------- derived
    @property
    def ci_valid(self) -> bool:
        """Whether the interval really has 95% coverage (n >= 6)."""
        return self.n >= MIN_CI_SAMPLES

    @property
    def ci_halfwidth_pct(self) -> float:
        """Half the CI width relative to the median, in percent: the noise of the median itself."""
        half = (self.ci95_hi_us - self.ci95_lo_us) / 2.0
        if self.median_us > 0:
            return half / self.median_us * 100.0
        return 0.0 if half == 0 else math.inf

    # --------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """The stats as JSON-ready values, keyed and ordered by :attr:`FIELDS`."""
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stats:
        """Read a stats object back from a record; extra keys (``converged``) are ignored."""
        missing = [name for name in cls.FIELDS if name not in d]
        if missing:
            raise InvalidCase(f"[stats] record stats lack {', '.join(missing)}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = d[f.name]
            if raw is None:
                # a strict-JSON writer stores a non-finite spread (median 0) as null
                values[f.name] = math.inf if f.name == "spread_pct" else math.nan
            elif f.name in ("n", "outliers"):
                values[f.name] = int(raw)
            else:
                values[f.name] = float(raw)
        return cls(**values)


def check_columns(columns: Sequence[str]) -> tuple[str, ...]:
    """Validate report columns against :attr:`Stats.FIELDS`, naming the valid ones on error."""
    bad = [c for c in columns if c not in Stats.FIELDS]
    if bad:
        raise InvalidCase(f"unknown stats column(s) {', '.join(map(repr, bad))}; "
                          f"expected any of {', '.join(Stats.FIELDS)}")
    return tuple(columns)


__all__ = ["CI_LEVEL", "MIN_CI_SAMPLES", "TRIM_FRACTION", "Stats", "check_columns",
           "median_ci_coverage", "median_ci_ranks"]
