"""Comparing results case by case: is NEW faster, slower, the same as BASE, or unsure?

Two ways: two result files (``compare_files``: the same cases before and after a change), or two
sides of one pool of records (``compare_backends``: a backend against the fastest of its peers on
the same cases, the engine builder's "is our kernel at least as fast as the best one we could
pick instead?").

Records are matched by ``results.record_key`` (the case, options, timer and cache policy). Each
pair's verdict is :func:`kvmicro.verdict.compare_records`'s: faster or slower only when the
Mann-Whitney U test on the samples rejects at alpha 0.01 *and* the bootstrap 95% CI of the median
ratio (and every pairing of the two sides' round medians) lies beyond the threshold; same when
that CI lies inside it; unsure otherwise, and always when either record did not converge or is
flagged noisy, few-samples, host-busy or rounds-disagree. Two records from one sweep whose rounds
were interleaved (``compare_backends`` within one file: the same ``rounds.group``) get the paired
rule instead: the 99% t-interval of their round-by-round ratios beyond or inside the threshold,
with what the round ratios already carry (``noisy``, ``not-converged``, ``host-busy``,
``rounds-disagree``) no longer gating (kvmicro.verdict).

Between two result files each NEW record is first adjusted to its BASE's host speed where both
carry the host-speed reference, by the run's host factor
(:func:`kvmicro.verdict.between_runs_host_factor`), and every verdict also
allows for the drift between the two runs left after that: its
spread is estimated from all the matched cases at once (:func:`kvmicro.verdict.between_runs_sd`:
how much more their median ratios scatter than their own CIs explain; a change that moves every
case alike does not count as scatter) and widens each case's interval, so that a case the host
happened to run 20% faster in one run is not called faster. ``render`` prints the estimate.

A case that was ok in BASE and is an error in NEW is ``broken`` (ok in NEW only: ``fixed``;
neither ok: ``n/a``). The exit status (:attr:`CompareResult.exit_code`) is 2 when nothing matched,
1 when any case is ``slower`` or ``broken``, else 0; a backend named with ``--new-backend`` or
``--base-backend`` that matches no record raises InvalidCase (exit 2). Provenance that differs
(host, device, versions) is reported as a warning: the comparison is then across machines or
software, not only across code.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidCase
from .report import cache_of, ctx_label, fmt_number, stat, timer_of
from .verdict import (
    MIN_DRIFT_CASES,
    Z95,
    Verdict,
    between_runs_host_factor,
    between_runs_sd,
    same_probe,
    scaled_record,
)
from .verdict import compare_records as verdict_of_records

DEFAULT_THRESHOLD_PCT = 5.0
#: the verdicts of verdict.py, then those of a status change
VERDICTS: tuple[str, ...] = ("faster", "slower", "same", "unsure", "broken", "fixed", "n/a")
EXIT_OK, EXIT_SLOWER, EXIT_NOTHING_MATCHED = 0, 1, 2


def noise_pct(rec: dict[str, Any]) -> float:
    """Half-width of the median's 95% CI relative to the median, in percent (inf if unknown)."""
    median, lo, hi = stat(rec, "median_us"), stat(rec, "ci95_lo_us"), stat(rec, "ci95_hi_us")
    if not median or lo is None or hi is None:
        return math.inf
    return 100.0 * (float(hi) - float(lo)) / 2.0 / float(median)


def _label_of(rec: dict[str, Any]) -> str:
    from .record import backend_label

    try:
        return backend_label(rec)
    except Exception:   # a record too damaged to parse still gets a label
        return str(rec.get("backend"))


@dataclass(frozen=True)
class Comparison:
    key: Any
    base: dict[str, Any]
    new: dict[str, Any]
    ratio: float            # new / base median (nan when either is not ok)
    change_pct: float       # (ratio - 1) * 100
    noise_pct: float        # the larger of the two medians' CI half-widths, in %
    verdict: str
    #: verdict.py's verdict (None for a status change: broken, fixed, n/a)
    detail: Verdict | None = None
    #: two runs: how much slower the host ran for NEW's run than for BASE's by the runs'
    #: host-speed references, divided out of ``ratio`` (None: no reference, or one run)
    host_factor: float | None = None

    @property
    def label(self) -> str:
        r = self.new
        return (f"{r.get('op')} {_label_of(r)} {r.get('layout')} {r.get('placement')} "
                f"ctx{ctx_label(r.get('ctx'))} b{r.get('batch')} bs{r.get('block_size')} "
                f"{r.get('dtype')} {timer_of(r)}/{cache_of(r)}")

    @property
    def ratio_ci(self) -> tuple[float, float]:
        return self.detail.ratio_ci if self.detail else (math.nan, math.nan)

    @property
    def reason(self) -> str:
        return self.detail.reason if self.detail else ""


def verdict(base: dict[str, Any], new: dict[str, Any],
            threshold_pct: float = DEFAULT_THRESHOLD_PCT,
            drift_sd: float | None = None, host_factor: float | None = None) -> Comparison:
    """The comparison of one matched pair of records. For records of two runs: ``drift_sd``,
    the spread of the drift between them (:func:`kvmicro.verdict.between_runs_sd`), and
    ``host_factor``, how much slower the host ran for ``new``'s run than for ``base``'s (their
    host-speed references: :func:`kvmicro.verdict.between_runs_host_factor`), which the
    verdict divides out."""
    from .results import record_key

    if not 0 <= threshold_pct < 100:
        raise InvalidCase(f"[compare] threshold {threshold_pct}% must be in [0, 100)")
    key = record_key(new)
    base_ok, new_ok = base.get("status") == "ok", new.get("status") == "ok"
    if not (base_ok and new_ok):
        v = "broken" if base_ok else ("fixed" if new_ok else "n/a")
        return Comparison(key, base, new, math.nan, math.nan, math.nan, v)
    judged = scaled_record(new, 1.0 / host_factor) if host_factor else new
    detail = verdict_of_records(judged, base, threshold=threshold_pct / 100.0,
                                drift_sd=drift_sd or 0.0)
    noise = max(noise_pct(base), noise_pct(new))
    return Comparison(key, base, new, detail.ratio, (detail.ratio - 1.0) * 100.0, noise,
                      detail.verdict, detail, host_factor)


@dataclass
class CompareResult:
    comparisons: list[Comparison]
    only_base: list[dict[str, Any]]
    only_new: list[dict[str, Any]]
    warnings: list[str]
    #: the drift between the two runs the verdicts allowed for (log spread; None: not
    #: estimated - one pool of records, or fewer than MIN_DRIFT_CASES usable matched cases)
    run_drift_sd: float | None = None
    #: whether the records came from two runs (compare BASE NEW), so that drift applies
    across_runs: bool = False

    @property
    def counts(self) -> Counter[str]:
        return Counter(c.verdict for c in self.comparisons)

    @property
    def exit_code(self) -> int:
        """2 when nothing matched, 1 on a slower or broken case, else 0."""
        if not self.comparisons:
            return EXIT_NOTHING_MATCHED
        if any(c.verdict in ("slower", "broken") for c in self.comparisons):
            return EXIT_SLOWER
        return EXIT_OK


def provenance_warnings(base_runs: Sequence[dict[str, Any]],
                        new_runs: Sequence[dict[str, Any]]) -> list[str]:
    """One line per provenance field (host, CPU, OS, versions, devices) that differs between
    the first run of each side."""
    from .results import provenance_differences

    if not base_runs or not new_runs:
        return []
    return provenance_differences(base_runs[0], new_runs[0])


def between_runs(matched: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]
                 ) -> tuple[list[float | None], float | None]:
    """What a comparison of two runs allows for, from their matched ``(new, base)`` records:
    per pair the host factor (the run's, :func:`kvmicro.verdict.between_runs_host_factor`, for
    the pairs that carry host-speed references; None for the others, or with too few), and the
    drift between the runs left once it is divided out (:func:`kvmicro.verdict.between_runs_sd`,
    None with too few cases)."""
    host = between_runs_host_factor(matched)
    factors = [host if host is not None and same_probe(n, b) else None for n, b in matched]
    drift = between_runs_sd([(scaled_record(n, 1.0 / f) if f else n, b)
                             for (n, b), f in zip(matched, factors, strict=True)])
    return factors, drift


def compare_records(base_runs: Sequence[dict[str, Any]], base: Sequence[dict[str, Any]],
                    new_runs: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]],
                    threshold_pct: float = DEFAULT_THRESHOLD_PCT) -> CompareResult:
    from .results import record_key

    base_by_key = {record_key(r): r for r in base}
    new_by_key = {record_key(r): r for r in new}
    matched = [(r, base_by_key[k]) for k, r in new_by_key.items() if k in base_by_key]
    factors, drift = between_runs(matched)
    comparisons = [verdict(b, r, threshold_pct, drift, f)
                   for (r, b), f in zip(matched, factors, strict=True)]
    only_base = [r for k, r in base_by_key.items() if k not in new_by_key]
    only_new = [r for k, r in new_by_key.items() if k not in base_by_key]
    return CompareResult(comparisons, only_base, only_new,
                         provenance_warnings(base_runs, new_runs), drift, across_runs=True)


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


def _matches(rec: dict[str, Any], name: str) -> bool:
    """A backend named plainly (``native:cuda``) matches every variant of it; a spec with options
    (``native:cuda[splits=8]``) matches that variant only, and empty brackets (``native:cuda[]``)
    the backend's default options only."""
    if name.endswith("[]"):
        return _label_of(rec) == name[:-2]
    return _label_of(rec) == name if "[" in name else rec.get("backend") == name


def _check_named(records: Sequence[dict[str, Any]], names: Sequence[str], option: str) -> None:
    present = sorted({_label_of(r) for r in records})
    for name in names:
        if not any(_matches(r, name) for r in records):
            raise InvalidCase(f"[compare] {option} {name} matches no record; the files hold "
                              f"{', '.join(present) or 'no records'}")


def compare_backends(records: Sequence[dict[str, Any]], base_backends: Sequence[str],
                     new_backend: str,
                     threshold_pct: float = DEFAULT_THRESHOLD_PCT) -> CompareResult:
    """Each case of ``new_backend`` against the fastest of ``base_backends`` on the same case (op,
    shape, layout, placement, dtype, timer, cache and seed equal; only the backend and its options
    differ). Several records of one side for a case (two files, two variants of a backend) count
    as their fastest ok one. The verdicts are :func:`verdict`'s: ``slower`` means slower than the
    best base beyond the threshold, by the test. A named backend that matches no record raises
    InvalidCase naming the backends the records hold."""
    from .record import peer_key

    if not base_backends:
        raise InvalidCase("[compare] --base-backend names no backend")
    if new_backend in base_backends:
        raise InvalidCase(f"[compare] backend {new_backend} is on both sides")
    _check_named(records, [new_backend], "--new-backend")
    _check_named(records, base_backends, "--base-backend")
    bases: dict[Any, dict[str, Any]] = {}
    news: dict[Any, dict[str, Any]] = {}
    for r in records:
        side = news if _matches(r, new_backend) else \
            bases if any(_matches(r, b) for b in base_backends) else None
        if side is not None:
            k = peer_key(r)
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
    result = compare_records(base_runs, base_recs, new_runs, new_recs, threshold_pct)
    decided = sum(1 for c in result.comparisons if c.verdict in ("faster", "slower")
                  and not (c.detail is not None and c.detail.paired_rounds))
    if decided and result.run_drift_sd is None:
        result.warnings.append(
            f"{decided} faster/slower verdict(s) compare two runs, and with fewer than "
            f"{MIN_DRIFT_CASES} matched ok cases the drift between the runs could not be "
            "estimated: they include whatever the machine did between the runs, which no "
            "record shows. Before acting on one, alternate the two builds "
            "(scripts/ab_builds.py) or measure both in one sweep")
    return result


def _ratio_text(c: Comparison) -> str:
    lo, hi = c.ratio_ci
    if not math.isfinite(c.ratio):
        return ""
    if math.isfinite(lo) and math.isfinite(hi):
        return f"{c.ratio:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{c.ratio:.3f}"


def render(result: CompareResult, threshold_pct: float = DEFAULT_THRESHOLD_PCT,
           show_same: bool = True, explain: bool = True) -> str:
    """A table of the matched cases (slowest change first), then counts and, for unsure cases,
    why (grouped)."""
    rows = sorted(result.comparisons,
                  key=lambda c: (-c.change_pct if math.isfinite(c.change_pct) else -math.inf))
    # across backends: name the base that each case was compared with
    across = any(_label_of(c.base) != _label_of(c.new) for c in rows)
    paired = any(c.detail is not None and c.detail.paired_rounds for c in rows)
    header = ["case", "base µs", "new µs", "ratio [CI]" if paired else "ratio [95% CI]",
              "change", "p", "verdict"]
    if across:
        header.insert(1, "base")
    table = []
    for c in rows:
        if c.verdict == "same" and not show_same:
            continue
        ok = math.isfinite(c.ratio)
        p = c.detail.p_value if c.detail else None
        table.append([
            c.label,
            *([_label_of(c.base)] if across else []),
            fmt_number(stat(c.base, "median_us")) if c.base.get("status") == "ok"
            else str(c.base.get("status")),
            fmt_number(stat(c.new, "median_us")) if c.new.get("status") == "ok"
            else str(c.new.get("status")),
            _ratio_text(c),
            f"{c.change_pct:+.1f}%" if ok else "",
            f"{p:.2g}" if p is not None else "",
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
                 f"(threshold {threshold_pct:g}%: faster/slower need Mann-Whitney p < 0.01 and "
                 "the ratio's 95% CI beyond it"
                 + ("; records of one sweep's interleaved rounds: the 99% t-interval of their "
                    "round-by-round ratios beyond it" if paired else "") + ")")
    factors = [c.host_factor for c in result.comparisons if c.host_factor]
    if result.across_runs and factors:
        lines.append(f"host speed between the runs (host-speed reference, NEW's run over "
                     f"BASE's): {factors[0]:.3f}, divided out of the ratios of the "
                     f"{len(factors)} cases that carry the reference")
    if result.across_runs and result.run_drift_sd is not None:
        pct = (math.exp(Z95 * result.run_drift_sd) - 1.0) * 100.0
        lines.append(f"drift between the two runs: identical cases would differ by up to "
                     f"±{pct:.1f}% (95%; tau {result.run_drift_sd:.3f} in log, from the "
                     "matched cases' median ratios); every interval above includes it")
    if explain and counts["unsure"]:
        why: Counter[str] = Counter(_reason_kind(c.reason) for c in result.comparisons
                                    if c.verdict == "unsure")
        text = " ".join(why)
        advice = ["re-measure them on a quiet host"]
        if "noisy" in text or "host-busy" in text:
            advice.append("time small ops with --timer batched (or graph on a GPU)")
        if "converged" in text or "rounds" in text or "straddl" in text or "few" in text:
            advice.append("sample longer (--max-time)")
        lines.append("unsure: " + "; ".join(f"{n} {kind}" for kind, n in why.most_common())
                     + ". To get a verdict: " + ", ".join(advice) + ".")
    if result.only_base:
        lines.append(f"{len(result.only_base)} cases only in BASE")
    if result.only_new:
        lines.append(f"{len(result.only_new)} cases only in NEW")
    if not result.comparisons:
        lines.append("nothing to compare: no case is in both BASE and NEW (exit status 2)")
    return "\n".join(lines) + "\n"


def _reason_kind(reason: str) -> str:
    """An unsure verdict's reason without its numbers: what to group by."""
    for kind in ("flagged", "not converged", "status", "rounds disagree", "straddles",
                 "Mann-Whitney", "too few samples", "no samples"):
        if kind in reason:
            if kind == "flagged":
                return reason[reason.index("flagged"):]
            return {"straddles": "with a ratio CI straddling the threshold",
                    "Mann-Whitney": "where the test did not reject",
                    "rounds disagree": "whose rounds disagree"}.get(kind, kind)
    return reason


__all__ = ["DEFAULT_THRESHOLD_PCT", "EXIT_NOTHING_MATCHED", "EXIT_OK", "EXIT_SLOWER", "VERDICTS",
           "CompareResult", "Comparison", "between_runs", "compare_backends",
           "compare_files", "compare_records", "noise_pct", "provenance_warnings", "render",
           "verdict"]
