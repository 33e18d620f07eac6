"""Cliffs on a measured curve: intervals of the x grid where the time jumps above the curve's
trend and (for a bump) comes back down.

:func:`detect` takes the grid ``x`` (increasing) and one list of timings per x, and returns the
anomalous :class:`Interval` s. The method, in order:

1. summarise each point: its median and the distribution-free 95% CI of the median
   (:class:`~kvmicro.harness.stats.Stats`);
2. fit a robust baseline to the medians: a polynomial (degree 2 by default) in x, in log time,
   first as a low quantile (q = 0.25, by iteratively reweighted least squares), which a minority
   of raised points cannot pull up much; then peeled: refit by least squares to the points the
   previous fit calls normal (not raised by more than the ratio, nor by 3 robust sigmas of the
   normal points' residuals), until that set stops changing, so that the baseline runs through
   the normal points and a step cannot drag it up; a short run of normal-looking points between
   a raised stretch and the end of the grid is tested by refitting without it (a step that runs
   to the end bends a polynomial up through its last points). Cliffs sit on a sloped curve: the
   trend is removed, not averaged over;
3. a point is anomalous when its median exceeds the baseline by ``ratio`` (default 1.2) AND its
   CI does not overlap the baseline's: the point's CI low end lies above the baseline times the
   relative CI high end of the nearest normal points (the baseline is as uncertain as the points
   it runs through);
4. anomalous grid neighbours merge into one interval, reported with its inclusive ``start`` and
   ``end`` x values, the peak spike ratio (median over baseline) and that ratio's CI (the point's
   CI over the baseline's, a conservative interval).

:func:`refine` then bisects between an interval's edge and the normal grid point beyond it,
measuring each probe through a callback, to locate each edge to the grid's resolution, and
re-measures the edges and the peak with fresh runs to confirm the interval. A step (a jump that
does not come back) is an interval that ends at the last grid point.

Limits (scripts/bench_detect.py measures them; docs/regimes.md reports the figures): the
baseline needs most points normal, so a raised stretch must cover under about half the grid; the
CI test needs at least 6 runs per point for a 95% interval (fewer give [min, max]).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import InvalidCase
from .harness.stats import Stats

#: default spike ratio: a point this much above the baseline (and outside its CI) is anomalous
DEFAULT_RATIO = 1.2
#: default baseline polynomial degree (in x, on log time)
DEFAULT_DEGREE = 2
#: the quantile of the first, contamination-proof baseline fit
BASELINE_QUANTILE = 0.25
#: the smallest log-residual the peeling excludes from the baseline fit (2%)
MIN_PEEL = 0.02
#: how many of the nearest normal points give the baseline's relative CI
BASELINE_CI_NEIGHBOURS = 4


@dataclass(frozen=True)
class Interval:
    """One anomalous stretch of the grid. ``start``/``end`` are inclusive x values."""

    start: float
    end: float
    #: the largest median / baseline inside the interval, and its 95% CI
    ratio: float
    ratio_ci: tuple[float, float]
    #: the x of that peak
    peak: float
    #: the grid points inside, in order
    points: tuple[float, ...]
    #: set by refine(): whether the edges were bisected, and whether re-measuring confirmed it
    refined: bool = False
    confirmed: bool | None = None
    #: refine()'s probes: {x, median_us, ratio, anomalous, why}
    probes: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio_ci"] = list(self.ratio_ci)
        d["points"] = list(self.points)
        d["probes"] = [dict(p) for p in self.probes]
        return d


@dataclass
class Analysis:
    """Everything :func:`detect` computed: per point median, CI, baseline, ratio, verdict."""

    x: np.ndarray
    stats: list[Stats]
    baseline: np.ndarray
    #: relative CI bounds of the baseline at each point (low, high factors around 1)
    baseline_ci: np.ndarray
    ratio: np.ndarray
    anomalous: np.ndarray
    intervals: list[Interval]
    #: the polynomial on log time, in the normalised x coordinate, and that normalisation
    coef: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(1))
    x_center: float = 0.0
    x_scale: float = 1.0
    ratio_threshold: float = DEFAULT_RATIO

    def baseline_at(self, x: float) -> float:
        """The baseline's value (µs) at any x (between grid points too)."""
        u = (float(x) - self.x_center) / self.x_scale
        return float(math.exp(np.polyval(self.coef, u)))

    def baseline_ci_at(self, x: float) -> tuple[float, float]:
        """The baseline's relative CI factors at any x: those of its nearest normal points."""
        return _neighbour_ci(self.x, self.stats, self.anomalous, float(x))

    def classify(self, x: float, stats: Stats) -> tuple[bool, float, tuple[float, float], str]:
        """Whether a point measured at ``x`` is anomalous against this baseline, its ratio, the
        ratio's CI, and why (in words)."""
        base = self.baseline_at(x)
        lo_f, hi_f = self.baseline_ci_at(x)
        return _verdict(stats, base, lo_f, hi_f, self.ratio_threshold)


def _verdict(stats: Stats, base: float, lo_f: float, hi_f: float,
             threshold: float) -> tuple[bool, float, tuple[float, float], str]:
    ratio = stats.median_us / base
    ratio_ci = (stats.ci95_lo_us / (base * hi_f), stats.ci95_hi_us / (base * lo_f))
    high = ratio > threshold
    apart = stats.ci95_lo_us > base * hi_f
    if high and apart:
        why = f"median {ratio:.3g}x the baseline, CIs apart"
    elif high:
        why = f"median {ratio:.3g}x the baseline but the CIs overlap"
    else:
        why = f"median {ratio:.3g}x the baseline (threshold {threshold:g}x)"
    return high and apart, ratio, ratio_ci, why


def _neighbour_ci(x: np.ndarray, stats: Sequence[Stats], anomalous: np.ndarray,
                  at: float) -> tuple[float, float]:
    normal = np.flatnonzero(~anomalous)
    if normal.size == 0:
        normal = np.arange(len(stats))
    nearest = normal[np.argsort(np.abs(x[normal] - at), kind="stable")[:BASELINE_CI_NEIGHBOURS]]
    lo = [stats[i].ci95_lo_us / stats[i].median_us for i in nearest if stats[i].median_us > 0]
    hi = [stats[i].ci95_hi_us / stats[i].median_us for i in nearest if stats[i].median_us > 0]
    if not lo:
        return 1.0, 1.0
    return float(np.median(lo)), float(np.median(hi))


def _fit(u: np.ndarray, y: np.ndarray, degree: int, weights: np.ndarray) -> np.ndarray:
    sw = np.sqrt(weights)
    design = np.vander(u, degree + 1)
    coef, *_ = np.linalg.lstsq(design * sw[:, None], y * sw, rcond=None)
    return coef


def _quantile_fit(u: np.ndarray, y: np.ndarray, degree: int, q: float,
                  iterations: int = 50) -> np.ndarray:
    """Polynomial quantile regression by iteratively reweighted least squares."""
    coef = _fit(u, y, degree, np.ones_like(y))
    scale = max(float(np.median(np.abs(y - np.median(y)))), 1e-6)
    for _ in range(iterations):
        r = y - np.polyval(coef, u)
        w = np.where(r > 0, q, 1.0 - q) / np.maximum(np.abs(r), 1e-4 * scale)
        new = _fit(u, y, degree, w)
        if np.allclose(new, coef, rtol=1e-9, atol=1e-12):
            break
        coef = new
    return coef


def _absorbed_ends(u: np.ndarray, y: np.ndarray, coef: np.ndarray, deg: int,
                   ratio: float) -> np.ndarray:
    """A step that runs to the end of the grid can bend a polynomial baseline up through its
    last few points, which then look normal. For the short run of normal points (at most a
    quarter of the grid) between a raised point and either end of the grid: refit without it,
    and when every point of the run is raised against that fit, keep that fit."""
    cut = math.log(ratio)
    for _ in range(2):
        raised = (y - np.polyval(coef, u)) > cut
        if not raised.any():
            return coef
        changed = False
        first, last = int(np.flatnonzero(raised)[0]), int(np.flatnonzero(raised)[-1])
        for run in (np.arange(last + 1, u.size), np.arange(0, first)):
            if run.size == 0 or run.size > max(2, u.size // 4):
                continue
            keep = ~raised
            keep[run] = False
            if keep.sum() <= deg + 1:
                continue
            trial = _fit(u[keep], y[keep], deg, np.ones(int(keep.sum())))
            if np.all(y[run] - np.polyval(trial, u[run]) > cut):
                coef, changed = trial, True
        if not changed:
            return coef
    return coef


def analyse(x: Sequence[float], samples: Sequence[Sequence[float]], *,
            ratio: float = DEFAULT_RATIO, degree: int = DEFAULT_DEGREE) -> Analysis:
    """:func:`detect`, returning the whole analysis (baseline, per-point ratios) as well."""
    xs = np.asarray([float(v) for v in x], dtype=np.float64)
    if xs.ndim != 1 or xs.size == 0:
        raise InvalidCase("[detect] x must be a non-empty flat sequence")
    if len(samples) != xs.size:
        raise InvalidCase(f"[detect] {xs.size} x values but {len(samples)} lists of samples")
    if np.any(np.diff(xs) <= 0):
        raise InvalidCase("[detect] x must be strictly increasing")
    if not ratio > 1.0:
        raise InvalidCase(f"[detect] ratio {ratio!r} must be > 1 (e.g. 1.2)")
    if not isinstance(degree, int) or degree < 0:
        raise InvalidCase(f"[detect] degree {degree!r} must be an integer >= 0")
    stats = []
    for xv, s in zip(xs, samples, strict=True):
        try:
            stats.append(Stats.from_samples(s))
        except InvalidCase as exc:
            raise InvalidCase(f"[detect] at x={xv:g}: {exc}") from exc
    med = np.asarray([s.median_us for s in stats])
    if np.any(med <= 0):
        raise InvalidCase(f"[detect] medians must be positive (x={xs[np.argmax(med <= 0)]:g})")
    y = np.log(med)
    center = float(xs.mean())
    scale = float(np.ptp(xs)) / 2.0 or 1.0
    u = (xs - center) / scale
    deg = min(degree, max(0, xs.size - 2))   # a fit needs more points than coefficients

    coef = _quantile_fit(u, y, deg, BASELINE_QUANTILE)
    # peel: refit to the points the current baseline calls normal, excluding any point raised
    # by more than the ratio or by 3 robust sigmas of the normal points' residuals, until the
    # normal set stops changing (a step pulls a first fit up; each refit exposes more of it)
    normal = np.ones(xs.size, dtype=bool)
    for _ in range(20):
        r = y - np.polyval(coef, u)
        sigma = 1.4826 * float(np.median(np.abs(r[normal] - np.median(r[normal]))))
        cut = min(math.log(ratio), max(3.0 * sigma, MIN_PEEL))
        new_normal = r <= cut
        if new_normal.sum() <= deg or np.array_equal(new_normal, normal):
            break
        normal = new_normal
        coef = _fit(u[normal], y[normal], deg, np.ones(int(normal.sum())))
    coef = _absorbed_ends(u, y, coef, deg, ratio)
    base = np.exp(np.polyval(coef, u))
    anomalous = med > ratio * base
    ci = np.asarray([_neighbour_ci(xs, stats, anomalous, v) for v in xs])
    verdicts = [_verdict(s, b, lo, hi, ratio) for s, b, (lo, hi) in zip(stats, base, ci,
                                                                         strict=True)]
    flagged = np.asarray([v[0] for v in verdicts])
    ratios = np.asarray([v[1] for v in verdicts])

    intervals: list[Interval] = []
    i = 0
    while i < xs.size:
        if not flagged[i]:
            i += 1
            continue
        j = i
        while j + 1 < xs.size and flagged[j + 1]:
            j += 1
        peak = i + int(np.argmax(ratios[i:j + 1]))
        intervals.append(Interval(start=float(xs[i]), end=float(xs[j]),
                                  ratio=float(ratios[peak]),
                                  ratio_ci=tuple(float(v) for v in verdicts[peak][2]),
                                  peak=float(xs[peak]),
                                  points=tuple(float(v) for v in xs[i:j + 1])))
        i = j + 1
    return Analysis(x=xs, stats=stats, baseline=base, baseline_ci=ci, ratio=ratios,
                    anomalous=flagged, intervals=intervals, coef=coef, x_center=center,
                    x_scale=scale, ratio_threshold=ratio)


def detect(x: Sequence[float], samples: Sequence[Sequence[float]], *,
           ratio: float = DEFAULT_RATIO, degree: int = DEFAULT_DEGREE) -> list[Interval]:
    """Anomalous intervals of a curve measured at ``x`` (one list of timings per x); see the
    module docstring for the method. Returns them in x order; an empty list: flat."""
    return analyse(x, samples, ratio=ratio, degree=degree).intervals


def refine(analysis: Analysis, measure: Callable[[float], Sequence[float]], *,
           resolution: float = 1.0, max_probes: int = 16) -> list[Interval]:
    """Locate each interval's edges between grid points by bisection, then confirm.

    ``measure(x)`` takes fresh samples at any x (rounded to ``resolution``, e.g. 1 for integer
    decoding budgets). For the left edge, bisection runs between the last normal grid point and
    the interval's first point; for the right edge, between its last point and the next normal
    one; each probe is classified against the baseline as :func:`detect` classifies grid points.
    Then the (new) start, end and peak are measured again; the interval is ``confirmed`` when all
    three are still anomalous. At most ``max_probes`` probes per edge.
    """
    if not resolution > 0:
        raise InvalidCase(f"[refine] resolution {resolution!r} must be > 0")
    xs = analysis.x
    out: list[Interval] = []

    def probe(at: float, log: list[dict[str, Any]], why: str) -> bool:
        st = Stats.from_samples(measure(at))
        bad, r, r_ci, words = analysis.classify(at, st)
        log.append({"x": at, "median_us": st.median_us, "ratio": r, "ratio_ci": list(r_ci),
                    "anomalous": bad, "why": f"{why}: {words}"})
        return bad

    def snap(v: float) -> float:
        return round(v / resolution) * resolution

    def edge(normal: float, anomalous: float, log: list[dict[str, Any]], why: str) -> float:
        """Bisect between a normal and an anomalous x (either may be the smaller); returns the
        anomalous x nearest the normal one."""
        for _ in range(max_probes):
            mid = snap((normal + anomalous) / 2)
            if mid <= min(normal, anomalous) or mid >= max(normal, anomalous):
                break
            if probe(mid, log, why):
                anomalous = mid
            else:
                normal = mid
        return anomalous

    for iv in analysis.intervals:
        log: list[dict[str, Any]] = []
        i0 = int(np.flatnonzero(xs == iv.start)[0])
        i1 = int(np.flatnonzero(xs == iv.end)[0])
        start, end = iv.start, iv.end
        if i0 > 0:
            start = edge(float(xs[i0 - 1]), iv.start, log, "left edge")
        if i1 + 1 < xs.size:
            end = edge(float(xs[i1 + 1]), iv.end, log, "right edge")
        checks = [probe(at, log, "confirm") for at in dict.fromkeys((start, iv.peak, end))]
        out.append(Interval(start=start, end=end, ratio=iv.ratio, ratio_ci=iv.ratio_ci,
                            peak=iv.peak, points=iv.points, refined=True,
                            confirmed=all(checks), probes=tuple(log)))
    return out


__all__ = ["BASELINE_QUANTILE", "DEFAULT_DEGREE", "DEFAULT_RATIO", "Analysis", "Interval",
           "analyse", "detect", "refine"]
