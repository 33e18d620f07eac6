"""Measure one prepared case: warm up, calibrate, sample until the stopping rule is met.

:func:`measure` sees only the :class:`~kvmicro.backends.base.Prepared` object (its run/sync
closures and its device clocks) and never imports a framework. It reads top to bottom:

1. check   — the timer exists for this case and suits the cache policy;
2. warm up — at least ``warmup_count`` samples and at least ``warmup_time_s`` of them (lazy
   initialisation, JIT, graph capture, clocks ramping up);
3. calibrate k — ops per sample for the batched and graph timers;
4. loop    — { prepare the cache, take a sample (both inside the timer), apply the guards, feed
   the criterion } until the criterion is done, or ``max_samples`` or ``max_time_s`` is reached.

Guards drop, and count by reason, samples that must not be averaged: non-finite or non-positive
times (a broken clock), and throttled samples: the device's SM clock, read right after the sample
(``Prepared.clock_fraction()``; CUDA devices through NVML), below ``throttle_threshold`` of its
maximum, as nvbench's throttle guard does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from numbers import Integral, Real
from statistics import median
from time import perf_counter
from typing import Any

from ..backends.base import TIMERS, Prepared
from ..derived import footprint_bytes, working_set_bytes
from ..errors import InvalidCase, KvmicroError
from .cache import CACHE_POLICIES, CachePolicy
from .criteria import CRITERIA, Criterion, make_criterion
from .stats import Stats
from .timers import make_timer


@dataclass
class MeasureConfig:
    """How to sample one case. Times in seconds, noise as a fraction (0.02 = 2%)."""

    timer: str = "host"
    cache: str = "cold"
    criterion: str = "ci-median"
    noise: float = 0.02
    min_samples: int = 10
    max_samples: int = 10_000
    max_time_s: float = 2.0
    warmup_count: int = 3
    warmup_time_s: float = 0.05
    #: batched/graph: ops per sample are calibrated so that one sample lasts this long
    sample_time_s: float = 1e-3
    #: batched/graph: an upper bound on ops per sample (None: the timer's own bound)
    max_k: int | None = None
    #: extra parameters of the criterion (e.g. {"count": 50} for sample-count)
    criterion_params: dict[str, Any] = field(default_factory=dict)
    #: drop a sample when the SM clock after it is below this fraction of the maximum (0: never)
    throttle_threshold: float = 0.75

    def __post_init__(self) -> None:
        if self.timer not in TIMERS:
            raise InvalidCase(f"unknown timer {self.timer!r}; expected one of {', '.join(TIMERS)}")
        if self.cache not in CACHE_POLICIES:
            raise InvalidCase(f"unknown cache policy {self.cache!r}; expected one of "
                              f"{', '.join(CACHE_POLICIES)}")
        if self.criterion not in CRITERIA:
            raise InvalidCase(f"unknown stopping criterion {self.criterion!r}; expected one of "
                              f"{', '.join(CRITERIA)}")
        for name in ("min_samples", "max_samples"):
            value = getattr(self, name)
            if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
                raise InvalidCase(f"[measure] {name} {value!r} must be an integer >= 1")
        if self.max_samples < self.min_samples:
            raise InvalidCase(f"[measure] max_samples {self.max_samples} < min_samples "
                              f"{self.min_samples}")
        if not isinstance(self.warmup_count, Integral) or self.warmup_count < 0:
            raise InvalidCase(f"[measure] warmup_count {self.warmup_count!r} must be >= 0")
        for name in ("max_time_s", "sample_time_s"):
            value = getattr(self, name)
            if not isinstance(value, Real) or not 0 < value < float("inf"):
                raise InvalidCase(f"[measure] {name} {value!r} must be a positive finite time")
        if not isinstance(self.warmup_time_s, Real) or not 0 <= self.warmup_time_s < float("inf"):
            raise InvalidCase(f"[measure] warmup_time_s {self.warmup_time_s!r} must be >= 0")
        if not isinstance(self.noise, Real) or not 0 < self.noise < 1:
            raise InvalidCase(f"[measure] noise {self.noise!r} must be a fraction in (0, 1)")
        if not isinstance(self.throttle_threshold, Real) or not 0 <= self.throttle_threshold < 1:
            raise InvalidCase(f"[measure] throttle_threshold {self.throttle_threshold!r} must be "
                              "a fraction in [0, 1)")
        if self.max_k is not None and (not isinstance(self.max_k, Integral) or self.max_k < 1):
            raise InvalidCase(f"[measure] max_k {self.max_k!r} must be an integer >= 1")

    def make_criterion(self) -> Criterion:
        """The configured criterion, with ``noise`` and ``min_samples`` passed to those that take
        them and ``criterion_params`` on top."""
        accepted = CRITERIA[self.criterion].PARAMS
        params = {key: value for key, value in
                  (("noise", float(self.noise)), ("min_samples", int(self.min_samples)))
                  if key in accepted}
        params.update(self.criterion_params)
        return make_criterion(self.criterion, **params)


@dataclass
class Measurement:
    """What :func:`measure` found. ``samples_us`` are the kept samples, in the order taken."""

    samples_us: list[float]
    stats: Stats
    timer: str
    #: the cache policy's describe(): name, bytes, pools, cache_bytes (+ target_bytes, cold_enough)
    cache: dict[str, Any]
    #: name, params, converged, why_not
    criterion: dict[str, Any]
    #: ops per sample
    k: int
    #: samples taken but discarded by the guards
    dropped: int
    elapsed_s: float
    #: dropped samples by reason ("throttled", "invalid")
    dropped_why: dict[str, int] = field(default_factory=dict)
    #: warm-up samples taken before calibration
    warmup_samples: int = 0
    #: the throttle guard's view of the device clock: threshold, and the lowest and median SM
    #: clock fraction read after the kept samples; empty where the backend reads no clock
    clock: dict[str, Any] = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return bool(self.criterion.get("converged"))


def _guard(prepared: Prepared, sample_us: float, threshold: float) -> tuple[str, float | None]:
    """Why a sample must be dropped ("" to keep it), and the clock fraction read after it."""
    if not (sample_us == sample_us and 0 < sample_us < float("inf")):
        return "invalid", None
    fraction = prepared.clock_fraction()
    if fraction is not None and fraction < threshold:
        return "throttled", fraction
    return "", fraction


def measure(prepared: Prepared, config: MeasureConfig, cache: CachePolicy) -> Measurement:
    """Sample ``prepared`` under ``cache`` as ``config`` says; see the module docstring."""
    started = perf_counter()

    # 1. check, before any work
    timer = make_timer(config.timer)
    timer.check(prepared, cache)
    criterion = config.make_criterion()

    # 2. warm up, by count and by time
    warmup, warm_start = 0, perf_counter()
    while warmup < config.warmup_count or perf_counter() - warm_start < config.warmup_time_s:
        timer.sample(prepared, cache)
        warmup += 1

    # 3. calibrate ops per sample
    k = timer.calibrate(prepared, cache, config.sample_time_s, config.max_k)

    # 4. sample until the criterion is done or a budget runs out
    samples: list[float] = []
    fractions: list[float] = []
    dropped: Counter[str] = Counter()
    stop = ""
    loop_start = perf_counter()
    while not criterion.done():
        if len(samples) >= config.max_samples:
            stop = f"stopped at max_samples {config.max_samples}"
            break
        if perf_counter() - loop_start >= config.max_time_s:
            stop = f"stopped at max_time {config.max_time_s:g} s after {len(samples)} samples"
            break
        sample = timer.sample(prepared, cache)
        why, fraction = _guard(prepared, sample, config.throttle_threshold)
        if why:
            dropped[why] += 1
            continue
        samples.append(sample)
        if fraction is not None:
            fractions.append(fraction)
        criterion.add(sample)

    if not samples:
        reasons = ", ".join(f"{why}: {n}" for why, n in sorted(dropped.items())) or "none taken"
        raise KvmicroError(f"[measure] {prepared.case.backend} {prepared.case.op}: no valid "
                           f"sample within max_time {config.max_time_s:g} s ({reasons})")
    converged = criterion.converged()
    why_not = "" if converged else "; ".join(t for t in (stop, criterion.why_not()) if t)
    return Measurement(
        samples_us=samples,
        stats=Stats.from_samples(samples),
        timer=timer.name,
        cache=cache.describe(prepared),
        criterion={**criterion.describe(), "converged": converged, "why_not": why_not},
        k=k,
        dropped=sum(dropped.values()),
        elapsed_s=perf_counter() - started,
        dropped_why=dict(dropped),
        warmup_samples=warmup,
        clock=_clock_summary(fractions, config.throttle_threshold),
    )


def _clock_summary(fractions: list[float], threshold: float) -> dict[str, Any]:
    if not fractions:
        return {}
    return {"threshold": threshold, "min_fraction": round(min(fractions), 4),
            "median_fraction": round(median(fractions), 4)}


__all__ = ["MeasureConfig", "Measurement", "footprint_bytes", "measure", "working_set_bytes"]
