"""Stopping rules: when has a case been sampled enough?

A criterion is a named object with its parameters and defaults in plain sight (``PARAMS``). The
measure loop feeds it one sample at a time (:meth:`Criterion.add`) and asks :meth:`Criterion.done`;
when sampling ends for another reason (time or sample budget) :meth:`Criterion.why_not` says which
condition was not met, and that text goes into the record.

``done()`` means "stop sampling"; ``converged()`` means "the precision target was met". They differ
only for ``stdrel``, which also stops when its noise has plateaued above the target (so an
inherently noisy case still ends) without claiming convergence.

Registry: :data:`CRITERIA`; build one with :func:`make_criterion`.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, ClassVar

from ..errors import InvalidCase
from .stats import MIN_CI_SAMPLES, median_ci_ranks


class Criterion(ABC):
    """A stopping rule over a stream of samples (µs)."""

    #: the registry name, stored in records
    name: ClassVar[str] = ""
    #: every parameter this criterion takes, with its default
    PARAMS: ClassVar[dict[str, Any]] = {}
    #: whether it aims at a precision of the median: the measure loop then also keeps taking
    #: rounds while they disagree; a fixed budget (sample-count) stops at its count
    targets_precision: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            raise InvalidCase(f"[criterion {self.name}] unknown parameter(s) {', '.join(unknown)}; "
                              f"valid: {', '.join(self.PARAMS)}")
        self.params: dict[str, Any] = {**self.PARAMS, **params}
        self._validate()
        self.reset()

    def _validate(self) -> None:
        min_samples = self.params.get("min_samples")
        if min_samples is not None and not (isinstance(min_samples, int) and min_samples >= 1):
            raise InvalidCase(f"[criterion {self.name}] min_samples {min_samples!r} must be an "
                              "integer >= 1")
        noise = self.params.get("noise")
        if noise is not None and not (isinstance(noise, (int, float)) and 0 < noise < 1):
            raise InvalidCase(f"[criterion {self.name}] noise {noise!r} must be a fraction in "
                              "(0, 1), e.g. 0.02 for 2%")

    @abstractmethod
    def reset(self) -> None:
        """Forget every sample (a new case or a restarted measurement)."""

    @abstractmethod
    def add(self, sample_us: float) -> None:
        """Take one sample into account."""

    @abstractmethod
    def done(self) -> bool:
        """Whether sampling may stop now."""

    def converged(self) -> bool:
        """Whether the precision target is met (a record's ``converged``)."""
        return self.done()

    @abstractmethod
    def why_not(self) -> str:
        """Which condition is not met yet, in words; "" once converged."""

    @property
    @abstractmethod
    def n(self) -> int:
        """Samples taken so far."""

    def expected_n(self) -> int:
        """A guess of the samples this criterion will want in all: the measure loop spreads that
        many over its rounds. The base guess is ``min_samples``; criteria that can extrapolate
        from their current noise do."""
        return max(int(self.params.get("min_samples") or 1), self.n)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}


class CiMedianCriterion(Criterion):
    """Done when ``n >= min_samples`` and the distribution-free 95% CI of the median is within
    ``noise`` of the median: ``(ci95_hi - ci95_lo) / 2 <= noise * median``. The default."""

    name = "ci-median"
    PARAMS: ClassVar[dict[str, Any]] = {"noise": 0.02, "min_samples": 10}

    def reset(self) -> None:
        self._sorted: list[float] = []

    def add(self, sample_us: float) -> None:
        # kept sorted so that each check is O(1) order-statistic lookups, not a sort
        bisect.insort(self._sorted, float(sample_us))

    @property
    def n(self) -> int:
        return len(self._sorted)

    def median(self) -> float:
        x, n = self._sorted, len(self._sorted)
        return x[n // 2] if n % 2 else 0.5 * (x[n // 2 - 1] + x[n // 2])

    def halfwidth(self) -> float:
        """Half the 95% CI width of the median relative to it; inf while it does not exist."""
        ranks = median_ci_ranks(self.n) if self.n else None
        if ranks is None:
            return math.inf
        half = (self._sorted[ranks[1] - 1] - self._sorted[ranks[0] - 1]) / 2.0
        median = self.median()
        if median > 0:
            return half / median
        return 0.0 if half == 0 else math.inf

    def done(self) -> bool:
        return (self.n >= max(self.params["min_samples"], MIN_CI_SAMPLES)
                and self.halfwidth() <= self.params["noise"])

    def expected_n(self) -> int:
        base = max(self.params["min_samples"], MIN_CI_SAMPLES)
        half = self.halfwidth()
        if self.n < MIN_CI_SAMPLES or not math.isfinite(half):
            return max(base, self.n)
        # the CI's width shrinks as 1/sqrt(n)
        return max(base, self.n, math.ceil(self.n * (half / self.params["noise"]) ** 2))

    def why_not(self) -> str:
        n, min_samples, noise = self.n, self.params["min_samples"], self.params["noise"]
        if n < min_samples:
            return f"{n} samples < min_samples {min_samples}"
        if n < MIN_CI_SAMPLES:
            return f"{n} samples: a 95% CI of the median needs at least {MIN_CI_SAMPLES}"
        half = self.halfwidth()
        if half > noise:
            return (f"95% CI of the median ±{half * 100:.2f}% > noise {noise * 100:.2f}% "
                    f"(median {self.median():.4g} µs, n {n})")
        return ""


class StdRelCriterion(Criterion):
    """Done when ``stdev / mean <= noise`` (after ``min_samples`` and ``min_time_s`` of sampled
    time), or when that relative noise has plateaued: every ``check_every`` samples, once the last
    ``window`` noise values are known, their spread around the current value is below
    ``plateau_tolerance`` of it. A plateau stops sampling but is not convergence."""

    name = "stdrel"
    PARAMS: ClassVar[dict[str, Any]] = {"noise": 0.02, "min_samples": 10, "min_time_s": 0.0,
                                        "window": 64, "check_every": 16,
                                        "plateau_tolerance": 0.05}

    def _validate(self) -> None:
        super()._validate()
        p = self.params
        for key in ("window", "check_every"):
            if not (isinstance(p[key], int) and p[key] >= 2):
                raise InvalidCase(f"[criterion stdrel] {key} {p[key]!r} must be an integer >= 2")
        if not (isinstance(p["min_time_s"], (int, float)) and p["min_time_s"] >= 0):
            raise InvalidCase(f"[criterion stdrel] min_time_s {p['min_time_s']!r} must be >= 0")
        if not (isinstance(p["plateau_tolerance"], (int, float)) and p["plateau_tolerance"] > 0):
            raise InvalidCase(f"[criterion stdrel] plateau_tolerance {p['plateau_tolerance']!r} "
                              "must be > 0")

    def reset(self) -> None:
        self._n = 0
        self._mean = 0.0
        self._m2 = 0.0
        self._total_us = 0.0
        self._history: deque[float] = deque(maxlen=self.params["window"])
        self._plateau = False

    @property
    def n(self) -> int:
        return self._n

    def relative_noise(self) -> float:
        if self._n < 2:
            return math.inf
        stdev = math.sqrt(self._m2 / (self._n - 1))
        if self._mean > 0:
            return stdev / self._mean
        return 0.0 if stdev == 0 else math.inf

    def add(self, sample_us: float) -> None:
        x = float(sample_us)
        # Welford: a running variance with no catastrophic cancellation
        self._n += 1
        self._total_us += x
        delta = x - self._mean
        self._mean += delta / self._n
        self._m2 += delta * (x - self._mean)
        noise = self.relative_noise()
        if math.isfinite(noise):
            self._history.append(noise)
        p = self.params
        if (not self._plateau and len(self._history) == p["window"]
                and self._n % p["check_every"] == 0 and noise > 0):
            spread = math.sqrt(sum((h - noise) ** 2 for h in self._history) / len(self._history))
            self._plateau = spread / noise < p["plateau_tolerance"]

    def _minimums_met(self) -> bool:
        return (self._n >= self.params["min_samples"]
                and self._total_us * 1e-6 >= self.params["min_time_s"])

    def converged(self) -> bool:
        return self._minimums_met() and self.relative_noise() <= self.params["noise"]

    def done(self) -> bool:
        return self.converged() or (self._minimums_met() and self._plateau)

    def why_not(self) -> str:
        p = self.params
        if self._n < p["min_samples"]:
            return f"{self._n} samples < min_samples {p['min_samples']}"
        if self._total_us * 1e-6 < p["min_time_s"]:
            return f"sampled time {self._total_us * 1e-6:.3g} s < min_time_s {p['min_time_s']}"
        noise = self.relative_noise()
        if noise <= p["noise"]:
            return ""
        text = f"stdev/mean {noise * 100:.2f}% > noise {p['noise'] * 100:.2f}% (n {self._n})"
        if self._plateau:
            text += "; the noise plateaued, so sampling stopped"
        return text


class SampleCountCriterion(Criterion):
    """Done after ``count`` samples (``min_samples`` when ``count`` is not given): a fixed budget,
    for quick looks and for tests; it says nothing about precision."""

    name = "sample-count"
    PARAMS: ClassVar[dict[str, Any]] = {"count": None, "min_samples": 10}
    targets_precision: ClassVar[bool] = False

    def _validate(self) -> None:
        super()._validate()
        count = self.params["count"]
        if count is not None and not (isinstance(count, int) and count >= 1):
            raise InvalidCase(f"[criterion sample-count] count {count!r} must be an integer >= 1")

    @property
    def target(self) -> int:
        count = self.params["count"]
        return self.params["min_samples"] if count is None else count

    def reset(self) -> None:
        self._n = 0

    @property
    def n(self) -> int:
        return self._n

    def add(self, sample_us: float) -> None:
        self._n += 1

    def done(self) -> bool:
        return self._n >= self.target

    def expected_n(self) -> int:
        return max(self.target, self._n)

    def why_not(self) -> str:
        return "" if self.done() else f"{self._n} samples < count {self.target}"


CRITERIA: dict[str, type[Criterion]] = {
    "ci-median": CiMedianCriterion,
    "stdrel": StdRelCriterion,
    "sample-count": SampleCountCriterion,
}


def make_criterion(name: str, **params: Any) -> Criterion:
    """The criterion registered as ``name`` with ``params`` (the rest at their defaults)."""
    cls = CRITERIA.get(name)
    if cls is None:
        raise InvalidCase(f"unknown stopping criterion {name!r}; expected one of "
                          f"{', '.join(CRITERIA)}")
    return cls(**params)


__all__ = ["CRITERIA", "CiMedianCriterion", "Criterion", "SampleCountCriterion",
           "StdRelCriterion", "make_criterion"]
