"""Comparing results case by case: is NEW faster, slower or the same as BASE?

Two ways: two result files (``compare_files``: the same cases before and after a change), or two
sides of one pool of records (``compare_backends``: a backend against the fastest of its peers on
the same cases, the engine builder's "is our kernel at least as fast as the best one we could
pick instead?").

Records are matched by ``results.record_key`` (the case, timer and cache policy). For each pair the
ratio is new median / base median and the verdict is CI-aware, as nvbench's compare is noise-aware:

- ``same`` when the two 95% confidence intervals of the median overlap, or when the change is
  within ``max(threshold, noise of base, noise of new)``; a measurement's noise is the half-width
  of its CI relative to its median, in percent;
- otherwise ``faster`` or ``slower``.

A case that was ok in BASE and is an error in NEW is ``broken``. The exit status is 1 when any case
is ``slower`` or ``broken``, else 0. Provenance that differs (host, device, versions) is reported as
a warning: the comparison is then across machines or software, not only across code.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidCase
from .report import cache_of, ctx_label, fmt_number, stat, timer_of

DEFAULT_THRESHOLD_PCT = 5.0
VERDICTS: tuple[str, ...] = ("faster", "slower", "same", "broken", "fixed", "n/a")


def noise_pct(rec: dict[str, Any]) -> float:
    """Half-width of the median's 95% CI relative to the median, in percent (inf if unknown)."""
    median, lo, hi = stat(rec, "median_us"), stat(rec, "ci95_lo_us"), stat(rec, "ci95_hi_us")
    if not median or lo is None or hi is None:
        return math.inf
    return 100.0 * (float(hi) - float(lo)) / 2.0 / float(median)


@dataclass(frozen=True)
class Comparison:
    key: Any
    base: dict[str, Any]
    new: dict[str, Any]
    ratio: float            # new / base median (nan when either is not ok)
    change_pct: float       # (ratio - 1) * 100
    noise_pct: float        # max of both noises
    verdict: str

    @property
    def label(self) -> str:
        r = self.new
        return (f"{r.get('op')} {r.get('backend')} {r.get('layout')} {r.get('placement')} "
                f"ctx{ctx_label(r.get('ctx'))} b{r.get('batch')} bs{r.get('block_size')} "
                f"{r.get('dtype')} {timer_of(r)}/{cache_of(r)}")


def verdict(base: dict[str, Any], new: dict[str, Any],
            threshold_pct: float = DEFAULT_THRESHOLD_PCT) -> Comparison:
    """The comparison of one matched pair of records."""
    from .results import record_key

    key = record_key(new)
    base_ok, new_ok = base.get("status") == "ok", new.get("status") == "ok"
    if not (base_ok and new_ok):
        v = "broken" if base_ok else ("fixed" if new_ok else "n/a")
        return Comparison(key, base, new, math.nan, math.nan, math.nan, v)
    b, n = float(stat(base, "median_us")), float(stat(new, "median_us"))
    ratio = n / b if b > 0 else math.inf
    change = (ratio - 1.0) * 100.0
    noise = max(noise_pct(base), noise_pct(new))
    overlap = (stat(base, "ci95_lo_us") is not None and stat(new, "ci95_lo_us") is not None
               and float(stat(new, "ci95_lo_us")) <= float(stat(base, "ci95_hi_us"))
               and float(stat(base, "ci95_lo_us")) <= float(stat(new, "ci95_hi_us")))
    bound = max(threshold_pct, noise if math.isfinite(noise) else 0.0)
    if overlap or abs(change) <= bound:
        v = "same"
    else:
        v = "slower" if change > 0 else "faster"
    return Comparison(key, base, new, ratio, change, noise, v)


@dataclass
class CompareResult:
    comparisons: list[Comparison]
    only_base: list[dict[str, Any]]
    only_new: list[dict[str, Any]]
    warnings: list[str]

    @property
    def counts(self) -> Counter[str]:
        return Counter(c.verdict for c in self.comparisons)

    @property
    def exit_code(self) -> int:
        return 1 if any(c.verdict in ("slower", "broken") for c in self.comparisons) else 0


def provenance_warnings(base_runs: Sequence[dict[str, Any]],
                        new_runs: Sequence[dict[str, Any]]) -> list[str]:
    """One line per provenance field (host, CPU, OS, versions, devices) that differs between
    the first run of each side."""
    from .results import provenance_differences

    if not base_runs or not new_runs:
        return []
    return provenance_differences(base_runs[0], new_runs[0])


def compare_records(base_runs: Sequence[dict[str, Any]], base: Sequence[dict[str, Any]],
                    new_runs: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]],
                    threshold_pct: float = DEFAULT_THRESHOLD_PCT) -> CompareResult:
    from .results import record_key

    base_by_key = {record_key(r): r for r in base}
    new_by_key = {record_key(r): r for r in new}
    comparisons = [verdict(base_by_key[k], r, threshold_pct) for k, r in new_by_key.items()
                   if k in base_by_key]
    only_base = [r for k, r in base_by_key.items() if k not in new_by_key]
    only_new = [r for k, r in new_by_key.items() if k not in base_by_key]
    return CompareResult(comparisons, only_base, only_new,
                         provenance_warnings(base_runs, new_runs))


def _faster(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    """Whether record ``a`` should replace ``b`` as the representative of a case: ok beats not
    ok, then the lower median."""
    if b is None:
        return True
    if (a.get("status") == "ok") != (b.get("status") == "ok"):
        return a.get("status") == "ok"
    if a.get("status") != "ok":
        return False
    return float(stat(a, "median_us")) < float(stat(b, "median_us"))


def compare_backends(records: Sequence[dict[str, Any]], base_backends: Sequence[str],
                     new_backend: str,
                     threshold_pct: float = DEFAULT_THRESHOLD_PCT) -> CompareResult:
    """Each case of ``new_backend`` against the fastest of ``base_backends`` on the same case (op,
    shape, layout, placement, dtype, timer, cache and seed equal; only the backend differs).
    Several records of one side for a case (two files, two variants of a backend) count as their
    fastest ok one. The verdicts are ``verdict``'s: ``slower`` means slower than the best base
    beyond noise and threshold."""
    from .results import record_key

    if new_backend in base_backends:
        raise InvalidCase(f"[compare] backend {new_backend} is on both sides")

    def shape_key(r: dict[str, Any]) -> Any:
        return record_key({**r, "backend": ""})

    bases: dict[Any, dict[str, Any]] = {}
    news: dict[Any, dict[str, Any]] = {}
    for r in records:
        side = news if r.get("backend") == new_backend else \
            bases if r.get("backend") in base_backends else None
        if side is not None:
            k = shape_key(r)
            if _faster(r, side.get(k)):
                side[k] = r
    comparisons = [verdict(bases[k], r, threshold_pct) for k, r in news.items() if k in bases]
    only_base = [r for k, r in bases.items() if k not in news]
    only_new = [r for k, r in news.items() if k not in bases]
    return CompareResult(comparisons, only_base, only_new, [])


def compare_files(base: str | Path, new: str | Path,
                  threshold_pct: float = DEFAULT_THRESHOLD_PCT) -> CompareResult:
    from .results import read_results

    base_runs, base_recs = read_results(base)
    new_runs, new_recs = read_results(new)
    return compare_records(base_runs, base_recs, new_runs, new_recs, threshold_pct)


def render(result: CompareResult, threshold_pct: float = DEFAULT_THRESHOLD_PCT,
           show_same: bool = True) -> str:
    """A table of the matched cases (slowest change first), then counts."""
    rows = sorted(result.comparisons,
                  key=lambda c: (-c.change_pct if math.isfinite(c.change_pct) else -math.inf))
    # across backends: name the base that each case was compared with
    across = any(c.base.get("backend") != c.new.get("backend") for c in rows)
    header = ["case", "base µs", "new µs", "ratio", "change", "noise", "verdict"]
    if across:
        header.insert(1, "base")
    table = []
    for c in rows:
        if c.verdict == "same" and not show_same:
            continue
        ok = math.isfinite(c.ratio)
        table.append([
            c.label,
            *([str(c.base.get("backend"))] if across else []),
            fmt_number(stat(c.base, "median_us")) if c.base.get("status") == "ok"
            else str(c.base.get("status")),
            fmt_number(stat(c.new, "median_us")) if c.new.get("status") == "ok"
            else str(c.new.get("status")),
            f"{c.ratio:.3f}" if ok else "",
            f"{c.change_pct:+.1f}%" if ok else "",
            f"{c.noise_pct:.1f}%" if ok and math.isfinite(c.noise_pct) else "",
            c.verdict.upper() if c.verdict in ("slower", "broken") else c.verdict,
        ])
    lines = []
    if table:
        widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(header)]

        def line(cells: list[str]) -> str:
            return "  ".join([cells[0].ljust(widths[0])]
                             + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)])

        lines.append(line(header))
        lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
        lines += [line(r) for r in table]
    counts = result.counts
    summary = ", ".join(f"{v} {counts[v]}" for v in VERDICTS if counts[v])
    lines.append(f"{len(result.comparisons)} matched cases: {summary or 'none'} "
                 f"(threshold {threshold_pct:g}%, or the larger noise)")
    if result.only_base:
        lines.append(f"{len(result.only_base)} cases only in BASE")
    if result.only_new:
        lines.append(f"{len(result.only_new)} cases only in NEW")
    return "\n".join(lines) + "\n"


__all__ = ["DEFAULT_THRESHOLD_PCT", "CompareResult", "Comparison", "compare_backends",
           "compare_files", "compare_records", "noise_pct", "provenance_warnings", "render",
           "verdict"]
