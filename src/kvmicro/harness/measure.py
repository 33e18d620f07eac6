"""Measure one prepared case: warm up, calibrate, sample in rounds until the stopping rule is met.

:class:`Sampler` sees only the :class:`~kvmicro.backends.base.Prepared` object (its run/sync
closures and its device clocks) and never imports a framework. It reads top to bottom:

1. check   - the timer exists for this case and suits the cache policy;
2. warm up - at least ``warmup_count`` samples and at least ``warmup_time_s`` of them (lazy
   initialisation, JIT, graph capture, clocks ramping up);
3. calibrate k - ops per sample for the batched and graph timers;
4. rounds  - each ``round()`` { prepare the cache, take a sample (both inside the timer), apply
   the guards, feed the criterion } for its share of the samples; a runner interleaves the rounds
   of several cases so that slow drift of the host lands in every case alike and shows up as
   disagreement between a case's rounds, not as a difference between cases.

:func:`measure` is the plain loop: one case's rounds back to back.

Guards drop, and count by reason, samples that must not be averaged: non-finite or non-positive
times (a broken clock); throttled samples: the device's SM clock, read right after the sample
(``Prepared.clock_fraction()``; CUDA devices through NVML), below ``throttle_threshold`` of its
maximum, as nvbench's throttle guard does; and samples that other work on the host disturbed
(``preempted``, ``steal``: :mod:`kvmicro.harness.noise`).
"""

from __future__ import annotations

import math
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
from .noise import BUSY_DROP_FRACTION, HostGuard
from .noise import REASONS as HOST_REASONS
from .reference import reference_probe, reference_summary
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
    #: rounds a case's samples are spread over (at least; more when the criterion wants more)
    rounds: int = 3
    #: rounds, at least, for a case whose rounds are interleaved with other cases' (a Sampler
    #: with an ``interleave_group``): a paired verdict between two such records compares them
    #: round by round, and its t-interval has these rounds less one degrees of freedom (3
    #: rounds: a 99% factor of 9.9; 6: 4.0)
    interleaved_rounds: int = 6
    #: interleaved: the fewest kept samples each of those rounds aims at (within its share of
    #: ``max_time_s``), so that a round's median is more than one or two samples
    min_round_samples: int = 4
    #: drop samples that other work on the host disturbed (harness/noise.py)
    host_guard: bool = True
    #: CPU cases: time the host-speed reference after every round (harness/reference.py), so
    #: that a comparison between two runs can tell the host's speed from the code's
    host_reference: bool = True

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
        for name in ("rounds", "interleaved_rounds", "min_round_samples"):
            value = getattr(self, name)
            if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
                raise InvalidCase(f"[measure] {name} {value!r} must be an integer >= 1")
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
    #: the rounds the samples were taken in: count, sizes (consecutive runs of ``samples_us``),
    #: index (the round number, from 0, each of those runs was taken in: rounds that kept no
    #: sample have no run), medians_us, spread_pct (max - min round median over the median),
    #: agree; and group, when the rounds were interleaved with other cases' (the Sampler's
    #: ``interleave_group``: records of one group took round i in the same pass)
    rounds: dict[str, Any] = field(default_factory=dict)
    #: the host-noise guard's view: guard on/off (why_off), usable_cores, loadavg, others_cores,
    #: steal_pct, wait_pct, disturbed (samples it dropped)
    host: dict[str, Any] = field(default_factory=dict)
    #: flags the measurement itself raises: "host-busy", "rounds-disagree"
    flags: list[str] = field(default_factory=list)
    #: samples discarded at the start of each round after the first
    rewarm_samples: int = 0

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


class Sampler:
    """One case's measurement, taken in rounds that other cases' rounds may interleave with.

    ``round()`` takes one round: the first warms up and calibrates k, later ones re-warm with
    ``warmup_count`` discarded samples (other cases ran in between). With R the minimum rounds
    (``rounds``; with an ``interleave_group`` at least ``interleaved_rounds``), each round aims
    at 1/R of the samples the criterion expects (:meth:`Criterion.expected_n`; interleaved, at
    least ``min_round_samples``) within 1/R of ``max_time_s``; round R also ends as soon as the
    criterion is done and it holds its floor of samples (later rounds take their whole share).
    ``done()`` is
    true once R rounds were taken and the criterion is done, or a budget (``max_samples``,
    ``max_time_s`` of sampling, rounds' re-warm and other cases excluded) ran out; while the
    rounds disagree it takes more rounds. ``result()`` summarises; a case whose round medians
    disagree (their 95% t-interval, ``t sd / sqrt(R)``, is wider than ``noise`` either side of
    the median) is not converged.

    ``interleave_group`` names the set of Samplers whose rounds a runner interleaves (one round
    of each in turn, every pass, until each is done): round i of every member is taken in pass
    i. It goes into the record (``rounds.group``, with each kept round's number in
    ``rounds.index``) so that a comparison of two records of one group can pair their rounds
    (kvmicro.verdict's paired rule), whose power grows with the rounds two records share: hence
    the larger minimum for interleaved Samplers. None: the rounds ran back to back, interleaved
    with nothing. :func:`interleaved_order` gives the order a runner takes a pass's rounds in.
    """

    def __init__(self, prepared: Prepared, config: MeasureConfig, cache: CachePolicy, *,
                 host_guard: HostGuard | None = None,
                 interleave_group: str | None = None) -> None:
        self.started = perf_counter()
        self.prepared, self.config, self.cache = prepared, config, cache
        # check, before any work
        self.timer = make_timer(config.timer)
        self.timer.check(prepared, cache)
        self.criterion = config.make_criterion()
        self.guard = host_guard if host_guard is not None else (
            HostGuard() if config.host_guard else None)
        self.samples: list[float] = []
        self.round_sizes: list[int] = []
        #: the round number (0-based) of each entry of round_sizes
        self.round_index: list[int] = []
        self.rounds_taken = 0
        self.interleave_group = interleave_group
        #: the rounds taken at least, and the samples each aims at at least
        self.min_rounds = max(config.rounds, config.interleaved_rounds) if interleave_group \
            else config.rounds
        self.round_floor = config.min_round_samples if interleave_group else 1
        self.k: int | None = None
        self.warmup = 0
        self.rewarm = 0
        self.sampling_s = 0.0
        self._fractions: list[float] = []
        self._dropped: Counter[str] = Counter()
        #: samples the host-noise guard dropped: the figures of last resort when no sample was
        #: clean (a record flagged host-busy beats no record on a saturated machine)
        self._disturbed: list[float] = []
        self._stop = ""
        #: the host-speed reference after each round (CPU cases only: harness/reference.py)
        self.reference_on = config.host_reference and \
            str(getattr(prepared.case, "backend", "")).endswith(":cpu")
        self._reference_us: list[float] = []

    @property
    def n(self) -> int:
        return len(self.samples)

    def done(self) -> bool:
        if self._stop:
            return True
        if self.n >= self.config.max_samples:
            self._stop = f"stopped at max_samples {self.config.max_samples}"
        elif self.sampling_s >= self.config.max_time_s:
            self._stop = (f"stopped at max_time {self.config.max_time_s:g} s after "
                          f"{self.n} samples")
        # rounds that disagree mean the median is not known yet: more rounds, while the budget
        # lasts, narrow the between-round interval (see _rounds_summary)
        return bool(self._stop) or (self.rounds_taken >= self.min_rounds
                                    and self.criterion.done()
                                    and not (self.criterion.targets_precision
                                             and self._rounds_disagree()))

    def _round_medians(self) -> list[float]:
        medians, start = [], 0
        for size in self.round_sizes:
            medians.append(median(self.samples[start:start + size]))
            start += size
        return medians

    def _rounds_disagree(self) -> str:
        """Why the rounds disagree ("" when they agree): the 95% interval of the median from the
        round medians alone, ``t(R-1) sd(medians) / sqrt(R)``, is wider than ``noise`` on either
        side of the median. Drift between rounds makes it wide; more rounds narrow it."""
        medians = self._round_medians()
        if len(medians) < 2:
            return ""
        overall = median(self.samples)
        half = between_rounds_halfwidth(medians) / overall if overall > 0 else 0.0
        if half <= self.config.noise:
            return ""
        return (f"rounds disagree: round medians {', '.join(f'{m:.4g}' for m in medians)} µs "
                f"give the median a between-round 95% interval of ±{half * 100:.1f}% > noise "
                f"{self.config.noise * 100:.2f}%")

    def _sample(self) -> None:
        """Take one sample through the guards; keep it or count why not."""
        guard, timer = self.guard, self.timer
        if timer.guards_window:
            # the Python clocks bracket their own window: a preemption during the cache flush
            # before it does not disturb the sample
            sample = timer.sample(self.prepared, self.cache)
            host_why = timer.disturbed
        else:
            if guard is not None:
                guard.begin()
            sample = timer.sample(self.prepared, self.cache)
            host_why = guard.end() if guard is not None else ""
        why, fraction = _guard(self.prepared, sample, self.config.throttle_threshold)
        why = why or host_why
        if why:
            self._dropped[why] += 1
            if why == host_why and len(self._disturbed) < self.config.max_samples:
                self._disturbed.append(sample)
            return
        self.samples.append(sample)
        if fraction is not None:
            self._fractions.append(fraction)
        self.criterion.add(sample)

    def round(self) -> None:
        """Take one round of samples (nothing once :meth:`done`)."""
        if self.done():
            return
        config = self.config
        if self.k is None:
            # warm up, by count and by time; then calibrate ops per sample
            warm_start = perf_counter()
            while (self.warmup < config.warmup_count
                   or perf_counter() - warm_start < config.warmup_time_s):
                self.timer.sample(self.prepared, self.cache)
                self.warmup += 1
            self.k = self.timer.calibrate(self.prepared, self.cache, config.sample_time_s,
                                          config.max_k)
        else:
            # other cases ran in between: bring caches and clocks back before counting
            for _ in range(config.warmup_count):
                self.timer.sample(self.prepared, self.cache)
                self.rewarm += 1
        if self.guard is not None and self.guard.on:
            self.guard.refresh_threads()
            self.timer.guard = self.guard
        # the last of the minimum rounds may end once the criterion is done; a round beyond the
        # minimum runs only because the rounds disagreed, so it takes its whole quota
        last_minimum = self.rounds_taken + 1 == self.min_rounds
        quota = max(self.round_floor, math.ceil(min(self.criterion.expected_n(),
                                                    config.max_samples) / self.min_rounds))
        slice_s = config.max_time_s / self.min_rounds
        before, round_start = self.n, perf_counter()
        while True:
            elapsed = perf_counter() - round_start
            if (self.n >= config.max_samples
                    or self.sampling_s + elapsed >= config.max_time_s
                    or elapsed >= slice_s or self.n - before >= quota
                    or (last_minimum and self.criterion.done()
                        and self.n - before >= self.round_floor)):
                break
            self._sample()
        self.sampling_s += perf_counter() - round_start
        if self.n > before:
            self.round_sizes.append(self.n - before)
            self.round_index.append(self.rounds_taken)
        self.rounds_taken += 1
        if self.reference_on:   # outside the sampling budget, like the re-warm
            self._reference_us.append(reference_probe())

    def _rounds_summary(self) -> tuple[dict[str, Any], str]:
        """The rounds' sizes, medians and spread, and why they disagree ("" if they agree)."""
        sizes = list(self.round_sizes)
        out: dict[str, Any] = {"count": self.rounds_taken, "sizes": sizes,
                               "index": list(self.round_index)}
        if self.interleave_group:
            out["group"] = self.interleave_group
        if len(sizes) < 2:
            out.update(medians_us=[median(self.samples)], spread_pct=0.0, agree=True)
            return out, ""
        medians = self._round_medians()
        overall = median(self.samples)
        spread = (max(medians) - min(medians)) / overall if overall > 0 else 0.0
        half = between_rounds_halfwidth(medians) / overall if overall > 0 else 0.0
        why = self._rounds_disagree()
        out.update(medians_us=[round(m, 6) for m in medians],
                   spread_pct=round(spread * 100.0, 3),
                   between_rounds_halfwidth_pct=round(half * 100.0, 3), agree=not why)
        return out, why

    def result(self) -> Measurement:
        """The measurement so far (normally called once :meth:`done`)."""
        config = self.config
        guard = self.guard
        host = guard.summary() if guard is not None else {"guard": "off",
                                                           "why_off": "disabled by the config"}
        if guard is not None:
            guard.close()
        disturbed = sum(self._dropped[r] for r in HOST_REASONS)
        taken = self.n + sum(self._dropped.values())
        reasons = ", ".join(f"{why}: {n}" for why, n in sorted(self._dropped.items())) \
            or "none taken"
        last_resort = ""
        if not self.samples:
            if not self._disturbed:
                raise KvmicroError(f"[measure] {self.prepared.case.backend} "
                                   f"{self.prepared.case.op}: no valid sample within max_time "
                                   f"{config.max_time_s:g} s ({reasons})")
            # every sample was disturbed: report them, flagged, rather than nothing
            self.samples = list(self._disturbed)
            self.round_sizes = [len(self.samples)]
            self.round_index = [0]
            last_resort = (f"every sample was disturbed by other work on the host ({reasons}): "
                           "these figures include that work")
        rounds, rounds_why = self._rounds_summary()
        converged = self.criterion.converged() and not rounds_why and not last_resort
        stop = self._stop if not self.criterion.done() or self._stop else ""
        why_not = "" if converged else "; ".join(
            t for t in (last_resort, stop, self.criterion.why_not(), rounds_why) if t)
        flags = []
        if last_resort or (taken and disturbed / taken > BUSY_DROP_FRACTION):
            flags.append("host-busy")
        if rounds_why:
            flags.append("rounds-disagree")
        host["disturbed"] = disturbed
        reference = reference_summary(self._reference_us)
        if reference is not None:
            host["reference"] = reference
        return Measurement(
            samples_us=list(self.samples),
            stats=Stats.from_samples(self.samples),
            timer=self.timer.name,
            cache=self.cache.describe(self.prepared),
            # met: the stopping criterion's own verdict; converged also needs the rounds to
            # agree and a clean sample (a paired comparison excuses disagreeing rounds only)
            criterion={**self.criterion.describe(), "converged": converged,
                       "met": bool(self.criterion.converged() and not last_resort),
                       "why_not": why_not},
            k=self.k or 1,
            dropped=sum(self._dropped.values()),
            elapsed_s=perf_counter() - self.started,
            dropped_why=dict(self._dropped),
            warmup_samples=self.warmup,
            clock=_clock_summary(self._fractions, config.throttle_threshold),
            rounds=rounds,
            host=host,
            flags=flags,
            rewarm_samples=self.rewarm,
        )


def interleaved_order(members: list[Any], pass_number: int) -> list[Any]:
    """The order a runner takes one pass's rounds of interleaved ``members`` in: as given in
    even passes, reversed in odd ones. A round's position in its pass matters on a real host:
    on the 2-core development VM the second of two identical arms measured back to back (the
    same data, still in the cache) ran 1.7% faster on average, 4-6% on 32 MB working sets,
    and one A/A pair 25% in every round (docs/methodology.md, the paired rule's calibration).
    Reversing every other pass puts each member before and after its neighbours equally often,
    so such an effect alternates in sign between a pair's round ratios and widens the paired
    verdict's interval instead of shifting its mean."""
    return list(members) if pass_number % 2 == 0 else list(reversed(members))


def measure(prepared: Prepared, config: MeasureConfig, cache: CachePolicy) -> Measurement:
    """Sample ``prepared`` under ``cache`` as ``config`` says, its rounds back to back; see the
    module docstring and :class:`Sampler`."""
    sampler = Sampler(prepared, config, cache)
    while not sampler.done():
        sampler.round()
    return sampler.result()


#: two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (beyond: 1.96)
_T975: tuple[float, ...] = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042)


def between_rounds_halfwidth(medians: list[float]) -> float:
    """Half the width of the 95% t-interval of the mean of the round medians (µs): how well the
    rounds alone pin the case's time when the host drifts between them."""
    r = len(medians)
    if r < 2:
        return 0.0
    mean = sum(medians) / r
    sd = math.sqrt(sum((m - mean) ** 2 for m in medians) / (r - 1))
    t = _T975[r - 2] if r - 1 <= len(_T975) else 1.96
    return t * sd / math.sqrt(r)


def _clock_summary(fractions: list[float], threshold: float) -> dict[str, Any]:
    if not fractions:
        return {}
    return {"threshold": threshold, "min_fraction": round(min(fractions), 4),
            "median_fraction": round(median(fractions), 4)}


__all__ = ["MeasureConfig", "Measurement", "Sampler", "between_rounds_halfwidth",
           "footprint_bytes", "interleaved_order", "measure", "working_set_bytes"]
