"""Verdicts: is NEW faster, slower, the same as BASE, or can the data not tell?

Every comparison kvmicro makes (``kvmicro compare``, the report's fastest-layout mark, the ADR
rules) goes through this module, so one rule decides everywhere:

- ``ratio`` is ``median(new) / median(base)``; ``ratio_ci`` its 95% confidence interval from a
  percentile bootstrap (:data:`BOOTSTRAP_RESAMPLES` resamples, a fixed seed, so a verdict is
  reproducible). When a side's samples were taken in rounds (interleaved with other cases) the
  interval is widened to cover the drift between rounds too (:func:`drift_halfwidth`: the
  round medians' 95% t-interval), so drift widens the interval instead of hiding in it.
- the test is the two-sided Mann-Whitney U test on the samples (normal approximation with tie and
  continuity corrections), at level ``alpha`` (default 0.01).
- **same**: the ratio CI lies inside ``[1 - threshold, 1 + threshold]``;
- **faster** / **slower**: the test rejects at ``alpha``, the ratio CI (drift included) lies
  entirely beyond the threshold, and so does every pairing of one side's round medians with the
  other's (drift between the times the two records were sampled shows there);
- **unsure**: anything else - in particular whenever either record is not ok, did not converge,
  or is flagged ``noisy`` (its median's 95% CI is wider than the run's noise target),
  ``not-converged``, ``few-samples``, ``host-busy`` or ``rounds-disagree``: such a record never
  yields faster or slower, whatever its numbers. ``wide-spread`` (single samples spread widely
  around a median that is nevertheless well known) does not gate: what a verdict needs is the
  median, and the test and the ratio CI already account for the spread.

**The paired rule** (:func:`compare_paired`) replaces the above when the two records' rounds
were interleaved: both carry the same ``rounds.group`` (one runner chunk of a shape group, or
one calibration sweep: round i of every member was taken in pass i; :class:`~kvmicro.harness.
measure.Sampler`) and share at least :data:`MIN_PAIRED_ROUNDS` round numbers (``rounds.index``).
The host's drift between passes then hits round i of both alike, so it is compared round by
round (a blocked design) instead of being charged to both records:

- ``r_i = median(new round i) / median(base round i)`` over the rounds both kept;
  ``ratio = exp(mean log r_i)``; ``ratio_ci`` the ``1 - alpha`` (99% at the default alpha)
  Student t-interval of ``mean log r_i`` (n - 1 degrees of freedom), mapped back by ``exp``;
  ``p_value`` the paired t-test of ``mean log r_i = 0``. Drift within a pass (the host changing
  speed between the two records' rounds) shows as spread of the ``r_i`` and widens the interval.
  With :data:`MIN_CROSSOVER_ROUNDS` rounds or more of both parities, the mean is the AB/BA
  crossover estimate instead: a runner takes odd passes in reverse order
  (:func:`~kvmicro.harness.measure.interleaved_order`), so whatever running second is worth
  adds to the log ratios of one parity and subtracts from the other's; the mean of the two
  parities' means removes it, and its t-interval has n - 2 degrees of freedom, its error taken
  from the scatter within each parity (:func:`_paired_estimate`).
- **faster** / **slower**: that interval lies entirely beyond ``[1 - threshold, 1 + threshold]``
  (a one-sided t-test at ``alpha / 2`` on each side, so under the test's assumptions a false
  faster or slower is at most ``alpha`` whatever the noise); **same**: it lies inside;
- otherwise, when neither record shows drift (both pass the unpaired gates), the unpaired rule's
  verdict; else **unsure**.
- rounds pair when both records kept at least :data:`MIN_ROUND_SAMPLES` samples in them (a
  one-sample round is one draw of a heavy-tailed distribution, not a median).
- gates: status other than ok (a failed check never yields a timing), ``few-samples``, fewer
  than :data:`MIN_SAMPLES` samples a side, fewer than :data:`MIN_PAIRED_ROUNDS` paired rounds.
  :data:`PAIRED_EXCUSED_FLAGS` do not gate, nor a record that did not converge, because what
  they describe is already in the interval: ``noisy`` and ``not-converged`` say the pooled
  median is not known to the noise target, but the paired interval is not built on the pooled
  median - it is built from the scatter of the ``r_i``, which carries each round median's own
  uncertainty (a noisy round moves its ``r_i``); ``rounds-disagree`` is the drift between
  passes that the pairing removes; ``host-busy`` says the guard dropped many disturbed samples:
  the rounds keep the clean ones, and a neighbour that slowed one record's round and not the
  other's shows as an outlying ``r_i`` that widens the interval (a record with every sample
  disturbed has one round and never pairs). What the t-interval needs in return is that the
  ``r_i`` of identical code scatter symmetrically around 1: the runner's
  :func:`~kvmicro.harness.measure.interleaved_order` (every other pass reversed) makes a
  round's position in its pass - on the development VM the second of two twins ran ~1.7%
  faster, ~5% on 32 MB working sets, ~25% there while the neighbours kept both cores busy -
  alternate in sign instead of favouring one record, and the crossover estimate takes it out
  of the scatter; under
  symmetric heavy tails the t-test errs on the safe side (the tests check A/A with t-noise on
  2 degrees of freedom and flips within passes).

Records of different sweeps or files, of chunks measured apart, or sharing fewer than
:data:`MIN_PAIRED_ROUNDS` rounds get the unpaired rule: across sweeps nothing pairs a round of
one with a round of the other, so no record can tell a code change from the machine's drift
between the two runs. Two things can: a CPU record's host-speed reference
(harness/reference.py: a fixed workload timed after each of its rounds), whose median ratio
over two runs' matched records (:func:`between_runs_host_factor`) is the host's change of
speed between them, divided out of every case that carries one; and the records of *many*
cases, which tell how large the drift left is:
**between two runs** (``kvmicro compare BASE NEW``) identical code still moves each case by a
drift of its own (on the development VM a spread of 0.02-0.23 in log between two sweeps: the
host's speed when each record was taken), and :func:`between_runs_sd` estimates its spread
``tau`` from the matched cases as a random effect: the robust spread of their log median ratios
(1.4826 x MAD around their median) with the cases' own sampling variance taken out. A shift
that moves every case alike (a real regression) does not widen that spread. The unpaired rule
then widens its interval by it (``drift_sd``: each side's log half-width combined with
``1.96 tau`` in quadrature), so faster, slower and same must hold beyond the drift too. With
fewer than :data:`MIN_DRIFT_CASES` usable cases no estimate is made (``None``) and the rule is
applied without it; ``kvmicro compare`` says so.

``threshold`` is the smallest change worth naming (pyperf's ``--min-speed``), a fraction: 0.05
means 5%. docs/methodology.md reports both rules' false-verdict and detection rates measured on
the development machine (``scripts/calibrate_verdicts.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidCase
from .harness.measure import between_rounds_halfwidth

VERDICTS: tuple[str, ...] = ("faster", "slower", "same", "unsure")
#: the smallest change named faster or slower, as a fraction
DEFAULT_THRESHOLD = 0.05
#: the Mann-Whitney U test's level
DEFAULT_ALPHA = 0.01
#: confidence of the ratio's interval
RATIO_CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
#: the bootstrap's seed: the same samples always give the same verdict
BOOTSTRAP_SEED = 0x6B766D
#: fewest samples per side for any verdict but unsure
MIN_SAMPLES = 5
#: record flags that make a record unusable for faster/slower (``wide-spread`` is not one: it
#: describes single samples, not how well the median is known)
UNTRUSTED_FLAGS: tuple[str, ...] = ("noisy", "not-converged", "few-samples", "host-busy",
                                    "rounds-disagree")
#: fewest rounds two interleaved records must share for the paired rule
MIN_PAIRED_ROUNDS = 3
#: fewest paired rounds for the crossover estimate (it spends a degree of freedom on the order
#: effect: with 6 rounds, 4 are left and the 99% t factor is 4.6 instead of 4.0; with 4, 2 are
#: left and it is 9.9 instead of 5.8 - measured, 6 found as many planted slowdowns here as 4 and
#: more of the earlier records')
MIN_CROSSOVER_ROUNDS = 6
#: fewest samples both records must have kept in a round for the paired rule to pair it (a
#: round of one sample is one draw of a heavy-tailed distribution, not a median)
MIN_ROUND_SAMPLES = 2
#: record flags the paired rule does not gate on: what they describe shows in the scatter of
#: the round ratios, which the paired t-interval is computed from (module docstring)
PAIRED_EXCUSED_FLAGS: tuple[str, ...] = ("noisy", "not-converged", "host-busy",
                                         "rounds-disagree")
#: fewest matched cases (both ok, not interleaved) from which :func:`between_runs_sd`
#: estimates the drift between two runs: a MAD of fewer is too loose a scale to widen by
MIN_DRIFT_CASES = 8
#: the normal quantile of a two-sided 95% interval (the ratio CI's level)
Z95 = 1.959963984540054
#: the MAD's factor that makes it estimate a normal distribution's standard deviation
_MAD_TO_SD = 1.482602218505602


@dataclass(frozen=True)
class Verdict:
    """The verdict for ``new`` against ``base``: "faster" means new takes less time."""

    verdict: str
    #: median(new) / median(base); paired: the geometric mean of the round-median ratios
    ratio: float
    #: the CI of that ratio the verdict was decided on, at ``level``
    ratio_ci: tuple[float, float]
    #: two-sided p-value of the test: Mann-Whitney U, or paired: the t-test of mean log r_i = 0
    #: (None when no test ran)
    p_value: float | None
    #: why unsure, or what decided it, in words
    reason: str
    #: rounds paired by the paired rule (0: the unpaired rule decided)
    paired_rounds: int = 0
    #: the confidence level of ``ratio_ci``
    level: float = RATIO_CI_LEVEL

    @property
    def change_pct(self) -> float:
        return (self.ratio - 1.0) * 100.0

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "ratio": self.ratio, "ratio_ci": list(self.ratio_ci),
                "p_value": self.p_value, "reason": self.reason,
                "paired_rounds": self.paired_rounds, "level": self.level}


# ------------------------------------------------------------------------------- the test


def _normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def mann_whitney_u(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """The Mann-Whitney U statistic of ``x`` (the number of pairs with x > y, ties counting one
    half) and its two-sided p-value by the normal approximation with tie and continuity
    corrections. Identical samples give p = 1."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    n1, n2 = a.size, b.size
    if n1 == 0 or n2 == 0:
        raise InvalidCase(f"[verdict] Mann-Whitney U needs samples on both sides (got {n1}, "
                          f"{n2})")
    both = np.concatenate([a, b])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(both.size, dtype=np.float64)
    sorted_ = both[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2.0)
    n = n1 + n2
    tie = float(np.sum(counts.astype(np.float64) ** 3 - counts))
    var = n1 * n2 / 12.0 * ((n + 1) - tie / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        return u, 1.0
    mean = n1 * n2 / 2.0
    z = max(abs(u - mean) - 0.5, 0.0) / math.sqrt(var)
    return u, min(1.0, 2.0 * _normal_sf(z))


def _t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's T with ``df`` (integer >= 1) degrees of freedom, exactly: the
    finite series in theta = atan(t / sqrt(df)) (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, sin = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 0:          # sin(theta) (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2))
        term = total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return min(1.0, sin * total)
    if df == 1:
        return 2.0 * theta / math.pi
    term = total = 1.0       # 2/pi (theta + sin cos (1 + 2/3 c^2 + ... up to c^(df-3)))
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return min(1.0, 2.0 / math.pi * (theta + sin * math.cos(theta) * total))


def t_two_sided_p(t: float, df: int) -> float:
    """The two-sided p-value ``P(|T| >= |t|)`` of Student's t with ``df`` degrees of freedom."""
    return max(0.0, 1.0 - _t_central(t, df))


def t_quantile(level: float, df: int) -> float:
    """The ``t`` with ``P(|T| <= t) = level`` (the half-width factor of a two-sided ``level``
    t-interval), by bisection on the exact distribution."""
    if not 0 < level < 1 or df < 1:
        raise InvalidCase(f"[verdict] t quantile needs 0 < level < 1 and df >= 1 (got {level}, "
                          f"{df})")
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < level:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_central(mid, df) < level:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


# -------------------------------------------------------------------------- the interval


def _split(samples: np.ndarray, rounds: Sequence[int] | None) -> list[np.ndarray]:
    if not rounds:
        return [samples]
    sizes = [int(s) for s in rounds]
    if sum(sizes) != samples.size or any(s < 1 for s in sizes):
        return [samples]   # round sizes that do not describe these samples: one group
    return np.split(samples, np.cumsum(sizes)[:-1])


def _bootstrap_one(x: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Medians of ``resamples`` ordinary bootstrap resamples of ``x``, drawn in O(resamples):
    a resample is ``sorted(x)[floor(n U)]`` for n uniforms U, a monotone map, so its k-th order
    statistic is ``sorted(x)[floor(n U_(k))]`` with ``U_(k) ~ Beta(k, n - k + 1)``; for even n
    the next one is ``U_(k) + (1 - U_(k)) Beta(1, n - k)``."""
    xs = np.sort(x)
    n = xs.size
    k = (n + 1) // 2
    u_k = rng.beta(k, n - k + 1, size=resamples)
    low = xs[np.minimum((u_k * n).astype(np.int64), n - 1)]
    if n % 2:
        return low
    u_next = u_k + (1.0 - u_k) * rng.beta(1, n - k, size=resamples)
    return 0.5 * (low + xs[np.minimum((u_next * n).astype(np.int64), n - 1)])


def drift_halfwidth(samples: np.ndarray, rounds: Sequence[int] | None) -> float:
    """How well the rounds alone pin the median, relative to it: half the 95% t-interval of the
    round medians' mean over the median (0 for one round). It is what drift of the host between
    rounds adds to the uncertainty of a median that pooled samples would hide."""
    groups = _split(samples, rounds)
    if len(groups) < 2:
        return 0.0
    overall = float(np.median(samples))
    half = between_rounds_halfwidth([float(np.median(g)) for g in groups])
    return half / overall if overall > 0 else 0.0


def ratio_interval(new_us: Sequence[float], base_us: Sequence[float], *,
                   new_rounds: Sequence[int] | None = None,
                   base_rounds: Sequence[int] | None = None,
                   level: float = RATIO_CI_LEVEL,
                   resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """The ``level`` CI of ``median(new) / median(base)``: the percentile bootstrap of the
    pooled samples, widened where the rounds say the medians drifted: it also covers
    ``ratio x (1 -/+ sqrt(d_new^2 + d_base^2))`` with ``d`` each side's
    :func:`drift_halfwidth` (95% intervals; for other levels the bootstrap alone)."""
    new_x, base_x = np.asarray(new_us, float), np.asarray(base_us, float)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    new = _bootstrap_one(new_x, rng, resamples)
    base = _bootstrap_one(base_x, rng, resamples)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = new / base
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = (float(v) for v in np.percentile(ratios, [tail, 100.0 - tail]))
    if level == RATIO_CI_LEVEL:
        drift = math.hypot(drift_halfwidth(new_x, new_rounds),
                           drift_halfwidth(base_x, base_rounds))
        if drift > 0:
            ratio = float(np.median(new_x) / np.median(base_x))
            lo, hi = min(lo, ratio * (1.0 - drift)), max(hi, ratio * (1.0 + drift))
    return lo, hi


def widen_by_drift(ratio: float, interval: tuple[float, float],
                   drift_sd: float) -> tuple[float, float]:
    """``interval`` (a 95% CI of ``ratio``) widened by a drift of spread ``drift_sd`` (log)
    between the runs: on each side the log half-width and ``1.96 drift_sd`` are combined in
    quadrature (independent errors add variances)."""
    lo, hi = interval
    if not (drift_sd > 0 and ratio > 0 and lo > 0 and hi > 0):
        return lo, hi
    c, extra = math.log(ratio), Z95 * drift_sd
    down = math.hypot(max(c - math.log(lo), 0.0), extra)
    up = math.hypot(max(math.log(hi) - c, 0.0), extra)
    return math.exp(c - down), math.exp(c + up)


#: a record's statistics that scale with its samples (scaled_record)
_SCALED_STATS = ("min_us", "max_us", "mean_us", "median_us", "trimmed_mean_us", "stdev_us",
                 "mad_us", "p05_us", "p95_us", "ci95_lo_us", "ci95_hi_us")


def scaled_record(rec: Mapping[str, Any], factor: float) -> dict[str, Any]:
    """``rec`` as if every sample had taken ``factor`` times as long: samples, time statistics
    and round medians scaled alike; flags, convergence and everything else kept (spread and
    convergence do not change with the scale)."""
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise InvalidCase(f"[verdict] scale factor {factor!r} must be a positive finite number")
    out = dict(rec)
    out["samples_us"] = [s * factor for s in rec.get("samples_us") or []]
    stats = rec.get("stats")
    if isinstance(stats, Mapping):
        out["stats"] = {k: (v * factor if k in _SCALED_STATS and isinstance(v, (int, float))
                            and not isinstance(v, bool) else v) for k, v in stats.items()}
    rounds = rec.get("rounds")
    if isinstance(rounds, Mapping) and rounds.get("medians_us"):
        out["rounds"] = {**rounds, "medians_us": [m * factor for m in rounds["medians_us"]]}
    return out


def host_reference(rec: Mapping[str, Any]) -> tuple[str, float] | None:
    """The host-speed reference a record was taken beside (harness/reference.py): its probe's
    name and median µs, or None."""
    host = rec.get("host")
    ref = host.get("reference") if isinstance(host, Mapping) else None
    if not isinstance(ref, Mapping):
        return None
    probe, value = ref.get("probe"), ref.get("median_us")
    if not isinstance(probe, str) or not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return (probe, float(value)) if math.isfinite(value) and value > 0 else None


def same_probe(new: Mapping[str, Any], base: Mapping[str, Any]) -> tuple[float, float] | None:
    """The two records' host-speed references (median µs, new's then base's) when both carry
    one of the same probe, else None."""
    ref_new, ref_base = host_reference(new), host_reference(base)
    if ref_new is None or ref_base is None or ref_new[0] != ref_base[0]:
        return None
    return ref_new[1], ref_base[1]


def between_runs_host_factor(pairs: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]]
                             ) -> float | None:
    """How much slower the host ran for one run than for the other, by the host-speed
    references of their matched records ``(new, base)``: ``exp(median log(ref_new / ref_base))``
    over the ok pairs that both carry the same probe (harness/reference.py); None with fewer
    than :data:`MIN_DRIFT_CASES` such pairs. The median over the run, not each pair's own
    ratio: one record's probes are a few milliseconds of the host, as noisy as the record
    (on the development VM a record's probe ratio between two runs correlated ~0.3
    with its case's; the run's median tracked the cases' common shift)."""
    logs = []
    for new, base in pairs:
        refs = same_probe(new, base)
        if refs is None or new.get("status") != "ok" or base.get("status") != "ok":
            continue
        logs.append(math.log(refs[0]) - math.log(refs[1]))
    if len(logs) < MIN_DRIFT_CASES:
        return None
    return math.exp(float(np.median(logs)))


def _relative_halfwidth(rec: Mapping[str, Any]) -> float | None:
    stats = rec.get("stats") or {}
    try:
        median = float(stats["median_us"])
        lo, hi = float(stats["ci95_lo_us"]), float(stats["ci95_hi_us"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (median > 0 and 0 < lo <= hi and math.isfinite(hi)):
        return None
    return 0.5 * (math.log(hi) - math.log(lo))


def between_runs_sd(pairs: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]]
                    ) -> float | None:
    """The spread ``tau`` (log) of the drift between two runs, from their matched records
    ``(new, base)`` of many cases (module docstring): over the pairs with both records ok,
    with a positive median and its 95% CI, and not interleaved with each other, ``tau^2 =
    max(0, (1.4826 MAD(log ratio))^2 - median(se^2))``, ``se^2`` a case's sampling variance of
    its log ratio (from the two medians' CIs). None with fewer than :data:`MIN_DRIFT_CASES`
    such pairs."""
    logs, variances = [], []
    for new, base in pairs:
        if new.get("status") != "ok" or base.get("status") != "ok":
            continue
        if paired_round_numbers(new, base) is not None:
            continue
        h_new, h_base = _relative_halfwidth(new), _relative_halfwidth(base)
        if h_new is None or h_base is None:
            continue
        logs.append(math.log(float(new["stats"]["median_us"]))
                    - math.log(float(base["stats"]["median_us"])))
        variances.append((h_new / Z95) ** 2 + (h_base / Z95) ** 2)
    if len(logs) < MIN_DRIFT_CASES:
        return None
    x = np.asarray(logs)
    spread = _MAD_TO_SD * float(np.median(np.abs(x - np.median(x))))
    return math.sqrt(max(0.0, spread ** 2 - float(np.median(variances))))


# ---------------------------------------------------------------------------- the verdict


def _check_threshold(threshold: float, alpha: float) -> None:
    if not (isinstance(threshold, (int, float)) and 0 <= threshold < 1):
        raise InvalidCase(f"[verdict] threshold {threshold!r} must be a fraction in [0, 1), "
                          "e.g. 0.05 for 5%")
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise InvalidCase(f"[verdict] alpha {alpha!r} must be in (0, 1), e.g. 0.01")


def _clean(samples: Sequence[float], side: str) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size and not np.all(np.isfinite(x) & (x > 0)):
        raise InvalidCase(f"[verdict] {side} samples must be finite positive times (µs)")
    return x


def _round_medians(x: np.ndarray, rounds: Sequence[int] | None) -> list[float]:
    groups = _split(x, rounds)
    return [float(np.median(g)) for g in groups] if len(groups) > 1 else []


def compare_samples(new_us: Sequence[float], base_us: Sequence[float], *,
                    threshold: float = DEFAULT_THRESHOLD, alpha: float = DEFAULT_ALPHA,
                    new_rounds: Sequence[int] | None = None,
                    base_rounds: Sequence[int] | None = None,
                    drift_sd: float = 0.0) -> Verdict:
    """The verdict of two sets of samples (µs). ``new_rounds``/``base_rounds``: the sizes of the
    consecutive rounds the samples were taken in, if any (see the module docstring).
    ``drift_sd``: the spread of the drift between the two runs the samples come from, in log
    (:func:`between_runs_sd`; 0 when they come from one run): the interval is widened by it."""
    _check_threshold(threshold, alpha)
    if not (isinstance(drift_sd, (int, float)) and math.isfinite(drift_sd) and drift_sd >= 0):
        raise InvalidCase(f"[verdict] drift_sd {drift_sd!r} must be a finite spread >= 0 (log)")
    new, base = _clean(new_us, "new"), _clean(base_us, "base")
    if new.size == 0 or base.size == 0:
        return Verdict("unsure", math.nan, (math.nan, math.nan), None,
                       f"no samples to compare (new {new.size}, base {base.size})")
    ratio = float(np.median(new) / np.median(base))
    lo, hi = ratio_interval(new, base, new_rounds=new_rounds, base_rounds=base_rounds)
    _, p = mann_whitney_u(new, base)
    ci = f"ratio {ratio:.3f}, 95% CI [{lo:.3f}, {hi:.3f}]"
    if drift_sd > 0:
        lo, hi = widen_by_drift(ratio, (lo, hi), drift_sd)
        ci = (f"ratio {ratio:.3f}, 95% CI with the drift between the runs "
              f"(tau {drift_sd:.3f}) [{lo:.3f}, {hi:.3f}]")
    band = f"±{threshold * 100:g}%"
    if min(new.size, base.size) < MIN_SAMPLES:
        return Verdict("unsure", ratio, (lo, hi), p,
                       f"too few samples (new {new.size}, base {base.size}; a verdict needs "
                       f"{MIN_SAMPLES} on each side); {ci}")
    if 1.0 - threshold <= lo and hi <= 1.0 + threshold:
        return Verdict("same", ratio, (lo, hi), p, f"{ci} inside {band}")
    beyond = lo > 1.0 + threshold or hi < 1.0 - threshold
    if not beyond:
        return Verdict("unsure", ratio, (lo, hi), p, f"{ci} straddles the {band} band")
    if p >= alpha:
        return Verdict("unsure", ratio, (lo, hi), p,
                       f"{ci} beyond {band} but Mann-Whitney p {p:.3g} >= alpha {alpha:g}")
    # drift the rounds do not show within a record (one record sampled while the host was fast,
    # the other later, while it was slow) still shows between them: every round of one must be
    # beyond the threshold of every round of the other
    new_meds, base_meds = _round_medians(new, new_rounds), _round_medians(base, base_rounds)
    if new_meds or base_meds:
        new_meds = new_meds or [float(np.median(new))]
        base_meds = base_meds or [float(np.median(base))]
        worst_lo = min(new_meds) / max(base_meds)
        worst_hi = max(new_meds) / min(base_meds)
        if not (worst_lo > 1.0 + threshold or worst_hi < 1.0 - threshold):
            return Verdict("unsure", ratio, (lo, hi), p,
                           f"{ci}, but the rounds disagree: round-median ratios span "
                           f"[{worst_lo:.3f}, {worst_hi:.3f}], not all beyond {band}")
    word = "slower" if ratio > 1.0 else "faster"
    return Verdict(word, ratio, (lo, hi), p,
                   f"{ci} beyond {band}; Mann-Whitney p {p:.2g} < {alpha:g}")


def _paired_estimate(logs: np.ndarray, rounds: Sequence[int] | None
                     ) -> tuple[float, float, int, str]:
    """The mean log ratio, its standard error, their degrees of freedom and what was estimated.
    With the round numbers of at least :data:`MIN_CROSSOVER_ROUNDS` rounds of both parities,
    the AB/BA crossover estimate: even and odd passes ran in opposite orders
    (:func:`~kvmicro.harness.measure.interleaved_order`), so a log ratio is ``mu + d`` in one
    and ``mu - d`` in the other, ``d`` the advantage of running second; ``mu`` is the mean of
    the two parities' means, its error from the scatter within each (n - 2 degrees of
    freedom). Otherwise the plain mean and its error (n - 1)."""
    n = int(logs.size)
    if rounds is not None and n >= MIN_CROSSOVER_ROUNDS:
        parity = np.asarray([int(r) % 2 for r in rounds])
        even, odd = logs[parity == 0], logs[parity == 1]
        if even.size and odd.size:
            mean = 0.5 * (float(even.mean()) + float(odd.mean()))
            resid = np.concatenate([even - even.mean(), odd - odd.mean()])
            var = float(np.sum(resid ** 2)) / (n - 2)
            se = math.sqrt(var * (1.0 / even.size + 1.0 / odd.size) / 4.0)
            return mean, se, n - 2, "balanced over both pass orders"
    return float(logs.mean()), float(logs.std(ddof=1)) / math.sqrt(n), n - 1, \
        "geometric mean of the round-median ratios"


def compare_paired(new_round_medians: Sequence[float], base_round_medians: Sequence[float], *,
                   threshold: float = DEFAULT_THRESHOLD, alpha: float = DEFAULT_ALPHA,
                   new_n: int | None = None, base_n: int | None = None,
                   rounds: Sequence[int] | None = None) -> Verdict:
    """The paired rule (module docstring) on the medians of rounds taken in the same passes:
    ``new_round_medians[i]`` and ``base_round_medians[i]`` were taken in the same pass,
    ``rounds[i]`` (when given: the crossover estimate, :func:`_paired_estimate`).
    ``new_n``/``base_n``: the samples behind each side (fewer than :data:`MIN_SAMPLES`:
    unsure). Unsure also with fewer than :data:`MIN_PAIRED_ROUNDS` pairs, or when the interval
    straddles a threshold (the caller may then fall back to the unpaired rule)."""
    _check_threshold(threshold, alpha)
    new = _clean(new_round_medians, "new round-median")
    base = _clean(base_round_medians, "base round-median")
    level = 1.0 - alpha
    nan_ci = (math.nan, math.nan)
    if new.size != base.size or (rounds is not None and len(rounds) != new.size):
        raise InvalidCase(f"[verdict] paired rounds need as many new as base round medians (and "
                          f"round numbers) (got {new.size}, {base.size}"
                          + (f", {len(rounds)})" if rounds is not None else ")"))
    n = int(new.size)
    if n < MIN_PAIRED_ROUNDS:
        return Verdict("unsure", math.nan, nan_ci, None,
                       f"{n} paired rounds (the paired rule needs {MIN_PAIRED_ROUNDS})", n, level)
    logs = np.log(new) - np.log(base)
    mean, se, df, what = _paired_estimate(logs, rounds)
    half = t_quantile(level, df) * se
    ratio, lo, hi = math.exp(mean), math.exp(mean - half), math.exp(mean + half)
    if se > 0:
        p: float | None = t_two_sided_p(mean / se, df)
    else:
        p = 1.0 if mean == 0 else 0.0
    ci = (f"paired over {n} interleaved rounds: ratio {ratio:.3f} ({what}), "
          f"{level * 100:g}% t-interval [{lo:.3f}, {hi:.3f}]")
    band = f"±{threshold * 100:g}%"
    sizes = [v for v in (new_n, base_n) if v is not None]
    if sizes and min(sizes) < MIN_SAMPLES:
        return Verdict("unsure", ratio, (lo, hi), p,
                       f"too few samples (new {new_n}, base {base_n}; a verdict needs "
                       f"{MIN_SAMPLES} on each side); {ci}", n, level)
    if 1.0 - threshold <= lo and hi <= 1.0 + threshold:
        return Verdict("same", ratio, (lo, hi), p, f"{ci} inside {band}", n, level)
    if lo > 1.0 + threshold or hi < 1.0 - threshold:
        word = "slower" if ratio > 1.0 else "faster"
        return Verdict(word, ratio, (lo, hi), p,
                       f"{ci} beyond {band}; paired t p {p:.2g}", n, level)
    return Verdict("unsure", ratio, (lo, hi), p, f"{ci} straddles the {band} band", n, level)


# ------------------------------------------------------------------------------- records


def _converged(rec: Mapping[str, Any]) -> bool | None:
    stats = rec.get("stats") or {}
    value = stats.get("converged") if isinstance(stats, Mapping) else None
    if value is None:
        crit = rec.get("criterion")
        value = crit.get("converged") if isinstance(crit, Mapping) else None
    return value


def untrusted_reason(rec: Mapping[str, Any], *, paired: bool = False) -> str:
    """Why a record may not yield faster or slower ("" when it may). ``paired``: for the paired
    rule, which excuses :data:`PAIRED_EXCUSED_FLAGS` and a record that did not converge (the
    module docstring says why); status and ``few-samples`` still gate."""
    status = rec.get("status")
    if status != "ok":
        return f"status {status}"
    excused: tuple[str, ...] = PAIRED_EXCUSED_FLAGS if paired else ()
    flags = rec.get("flags")
    bad = [f for f in (flags if isinstance(flags, list) else [])
           if f in UNTRUSTED_FLAGS and f not in excused]
    if bad:
        return f"flagged {', '.join(bad)}"
    if _converged(rec) is False and "not-converged" not in excused:
        return "not converged"
    return ""


def record_rounds(rec: Mapping[str, Any]) -> list[int] | None:
    """The sizes of the rounds a record's samples were taken in (None: one round)."""
    rounds = rec.get("rounds")
    sizes = rounds.get("sizes") if isinstance(rounds, Mapping) else None
    return [int(s) for s in sizes] if isinstance(sizes, list) and len(sizes) > 1 else None


def record_round_medians(rec: Mapping[str, Any], min_samples: int = 1) -> dict[int, float]:
    """The median of each round of a record's samples that kept at least ``min_samples``, by
    round number (``rounds.index``); empty when the record does not say which round each run of
    samples was taken in."""
    rounds = rec.get("rounds")
    samples = rec.get("samples_us")
    if not isinstance(rounds, Mapping) or not isinstance(samples, (list, tuple)) or not samples:
        return {}
    sizes, index = rounds.get("sizes"), rounds.get("index")
    if not (isinstance(sizes, (list, tuple)) and isinstance(index, (list, tuple))
            and len(sizes) == len(index) and sizes):
        return {}
    try:
        sizes = [int(s) for s in sizes]
        index = [int(i) for i in index]
        x = np.asarray(samples, dtype=np.float64)
    except (TypeError, ValueError):
        return {}
    if sum(sizes) != x.size or min(sizes) < 1 or len(set(index)) != len(index):
        return {}
    groups = np.split(x, np.cumsum(sizes)[:-1])
    return {i: float(np.median(g)) for i, g in zip(index, groups, strict=True)
            if g.size >= min_samples}


def paired_round_numbers(new: Mapping[str, Any], base: Mapping[str, Any]) -> list[int] | None:
    """The round numbers the two records took in the same passes and both kept at least
    :data:`MIN_ROUND_SAMPLES` samples in, in order; None when their rounds were not
    interleaved: no common ``rounds.group``, or fewer than :data:`MIN_PAIRED_ROUNDS` such
    rounds."""
    groups = [r.get("rounds", {}).get("group") if isinstance(r.get("rounds"), Mapping) else None
              for r in (new, base)]
    if not groups[0] or groups[0] != groups[1]:
        return None
    common = sorted(set(record_round_medians(new, MIN_ROUND_SAMPLES))
                    & set(record_round_medians(base, MIN_ROUND_SAMPLES)))
    return common if len(common) >= MIN_PAIRED_ROUNDS else None


def interleaved_rounds(new: Mapping[str, Any], base: Mapping[str, Any]
                       ) -> tuple[list[float], list[float]] | None:
    """The two records' medians of the rounds of :func:`paired_round_numbers` (new's, base's,
    in round order), or None when their rounds were not interleaved."""
    common = paired_round_numbers(new, base)
    if common is None:
        return None
    new_m = record_round_medians(new, MIN_ROUND_SAMPLES)
    base_m = record_round_medians(base, MIN_ROUND_SAMPLES)
    return [new_m[i] for i in common], [base_m[i] for i in common]


def _median_of(rec: Mapping[str, Any], samples: np.ndarray) -> float | None:
    if samples.size:
        return float(np.median(samples))
    stats = rec.get("stats") or {}
    value = stats.get("median_us") if isinstance(stats, Mapping) else None
    return float(value) if value else None


def _ci_box(new: Mapping[str, Any], base: Mapping[str, Any]) -> tuple[float, float] | None:
    """Without samples: the ratio's interval from the two medians' CIs (conservative)."""
    try:
        n, b = new["stats"], base["stats"]
        return float(n["ci95_lo_us"]) / float(b["ci95_hi_us"]), \
            float(n["ci95_hi_us"]) / float(b["ci95_lo_us"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def compare_records(new: Mapping[str, Any], base: Mapping[str, Any], *,
                    threshold: float = DEFAULT_THRESHOLD,
                    alpha: float = DEFAULT_ALPHA, drift_sd: float = 0.0) -> Verdict:
    """The verdict of two case records (dicts as results files hold them). Records whose rounds
    were interleaved (:func:`interleaved_rounds`) get the paired rule, others the unpaired one
    (module docstring). Unsure whenever either record is not ok, did not converge, or carries a
    flag of :data:`UNTRUSTED_FLAGS` (paired: but for :data:`PAIRED_EXCUSED_FLAGS`);
    records without samples (pytest-benchmark files) can be "same" from their CIs, never
    faster/slower. ``drift_sd``: for records of two runs, the drift between them
    (:func:`between_runs_sd`), which widens the unpaired rule's interval (interleaved records
    come from one run and are not widened)."""
    _check_threshold(threshold, alpha)
    new_x = np.asarray(new.get("samples_us") or [], dtype=np.float64)
    base_x = np.asarray(base.get("samples_us") or [], dtype=np.float64)
    new_m, base_m = _median_of(new, new_x), _median_of(base, base_x)
    ratio = new_m / base_m if new_m and base_m else math.nan
    nan_ci = (math.nan, math.nan)
    pairs = interleaved_rounds(new, base) if new_x.size and base_x.size else None
    if pairs is not None:
        return _compare_interleaved(new, base, new_x, base_x, pairs, ratio, threshold, alpha)
    for side, rec in (("new", new), ("base", base)):
        why = untrusted_reason(rec)
        if why:
            ci = _ci_box(new, base) if math.isfinite(ratio) else None
            if ci and drift_sd > 0:
                ci = widen_by_drift(ratio, ci, drift_sd)
            return Verdict("unsure", ratio, ci or nan_ci, None, f"{side} record {why}")
    if new_x.size == 0 or base_x.size == 0:
        box = _ci_box(new, base)
        if box and drift_sd > 0:
            box = widen_by_drift(ratio, box, drift_sd)
        if box and 1.0 - threshold <= box[0] and box[1] <= 1.0 + threshold:
            return Verdict("same", ratio, box, None,
                           f"no samples; the medians' CIs give ratio [{box[0]:.3f}, "
                           f"{box[1]:.3f}] inside ±{threshold * 100:g}%")
        return Verdict("unsure", ratio, box or nan_ci, None,
                       "no samples in the records: no test can name a difference")
    return compare_samples(new_x, base_x, threshold=threshold, alpha=alpha,
                           new_rounds=record_rounds(new), base_rounds=record_rounds(base),
                           drift_sd=drift_sd)


def _compare_interleaved(new: Mapping[str, Any], base: Mapping[str, Any], new_x: np.ndarray,
                         base_x: np.ndarray, pairs: tuple[list[float], list[float]],
                         ratio: float, threshold: float, alpha: float) -> Verdict:
    """compare_records for two records whose rounds were interleaved: the paired gates, the
    paired rule, and where it cannot decide and neither record shows drift, the unpaired rule."""
    for side, rec in (("new", new), ("base", base)):
        why = untrusted_reason(rec, paired=True)
        if why:
            ci = _ci_box(new, base) if math.isfinite(ratio) else None
            return Verdict("unsure", ratio, ci or (math.nan, math.nan), None,
                           f"{side} record {why}")
    paired = compare_paired(pairs[0], pairs[1], threshold=threshold, alpha=alpha,
                            new_n=int(new_x.size), base_n=int(base_x.size),
                            rounds=paired_round_numbers(new, base))
    if paired.verdict != "unsure" or untrusted_reason(new) or untrusted_reason(base):
        return paired
    unpaired = compare_samples(new_x, base_x, threshold=threshold, alpha=alpha,
                               new_rounds=record_rounds(new), base_rounds=record_rounds(base))
    return Verdict(unpaired.verdict, unpaired.ratio, unpaired.ratio_ci, unpaired.p_value,
                   f"{paired.reason}; unpaired rule (neither record drifted): "
                   f"{unpaired.reason}")


__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "DEFAULT_ALPHA",
    "DEFAULT_THRESHOLD",
    "MIN_CROSSOVER_ROUNDS",
    "MIN_DRIFT_CASES",
    "MIN_PAIRED_ROUNDS",
    "MIN_ROUND_SAMPLES",
    "MIN_SAMPLES",
    "PAIRED_EXCUSED_FLAGS",
    "UNTRUSTED_FLAGS",
    "VERDICTS",
    "Z95",
    "Verdict",
    "between_runs_host_factor",
    "between_runs_sd",
    "compare_paired",
    "compare_records",
    "compare_samples",
    "drift_halfwidth",
    "host_reference",
    "interleaved_rounds",
    "mann_whitney_u",
    "paired_round_numbers",
    "ratio_interval",
    "record_round_medians",
    "record_rounds",
    "same_probe",
    "scaled_record",
    "t_quantile",
    "t_two_sided_p",
    "untrusted_reason",
    "widen_by_drift",
]
