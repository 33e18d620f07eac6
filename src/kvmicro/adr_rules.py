"""Evidence rules: each turns case records into the Markdown of one ADR fill region.

A rule is a small pure function ``rule(evidence, params) -> Finding`` over the records (and run
lines) that ``kvmicro.adr`` selected for a region, with the region's ``key=value`` parameters as
strings. It returns the region's text and the records it used (their runs become the region's
provenance line). Every comparison goes through :mod:`kvmicro.verdict`, so a tie is written
``same``, and a comparison the data cannot settle (noisy, unconverged, too few samples, a CI
straddling the threshold) is written ``unsure``: never faster or slower from noise.

A rule refuses with :class:`MissingEvidence`, naming what is missing, when the records cannot
answer its question: no ok record of an op it needs, two arms of a comparison measured on
different shape sets (a layout lacking a ctx another has), several timers or cache policies
mixed without a parameter choosing one. docs/adr/README.md documents every rule and parameter;
:data:`RULES` is the registry by region key.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import KvmicroError
from .verdict import Verdict, compare_records

Record = Mapping[str, Any]
Params = Mapping[str, str]


class MissingEvidence(KvmicroError):
    """The records cannot fill a region: missing, mismatched or ambiguous evidence."""


@dataclass(frozen=True)
class Evidence:
    """What a rule reads: case records and the run lines they came from."""

    records: Sequence[Record]
    runs: Sequence[Record] = ()


@dataclass(frozen=True)
class Finding:
    """A rule's answer: the region's Markdown and the records that produced it."""

    text: str
    used: Sequence[Record] = field(default_factory=tuple)


@dataclass(frozen=True)
class Rule:
    key: str
    func: Callable[[Evidence, Params], Finding]
    summary: str
    #: the rule's own parameters and their defaults (besides FILTERS)
    params: Mapping[str, str]


# ---------------------------------------------------------------------------------- filters

#: parameters every rule accepts: keep only records whose field matches (comma = any of)
FILTERS: dict[str, str] = {
    "backend": "backend", "layout": "layout", "placement": "placement", "dtype": "dtype",
    "timer": "timer", "cache": "cache", "batch": "batch", "ctx": "ctx", "block": "block_size",
    "head_dim": "head_dim", "heads": "heads", "device": "device",
}


def backend_of(rec: Record) -> str:
    """The backend a rule groups by, options included (``flashinfer:cuda[tensor_cores=true]``):
    two variants of one backend are two arms, never one arm with two records per shape."""
    from .record import backend_label

    try:
        return backend_label(rec)
    except KvmicroError:   # a synthetic or damaged record still has its backend field
        return str(rec.get("backend"))


def _backend_matches(rec: Record, wanted: set[str]) -> bool:
    """``backend=`` filter: a plain name matches every variant, a spec with options only
    itself."""
    return str(rec.get("backend")) in wanted or backend_of(rec) in wanted


def _field_text(rec: Record, name: str) -> str:
    if name == "heads":
        return f"{rec.get('q_heads')}:{rec.get('kv_heads')}"
    value = rec.get(name)
    if isinstance(value, Mapping):
        value = value.get("name")
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    return str(value)


def select(records: Iterable[Record], params: Params) -> list[Record]:
    """The records that pass every filter parameter in ``params``."""
    out = list(records)
    for param, name in FILTERS.items():
        if param in params:
            wanted = {v.strip() for v in params[param].split(",") if v.strip()}
            if param == "backend":
                out = [r for r in out if _backend_matches(r, wanted)]
            else:
                out = [r for r in out if _field_text(r, name) in wanted]
    return out


def check_params(rule: Rule, params: Params) -> None:
    unknown = sorted(set(params) - set(FILTERS) - set(rule.params))
    if unknown:
        valid = ", ".join(sorted(set(FILTERS) | set(rule.params)))
        raise MissingEvidence(f"rule {rule.key} has no parameter {', '.join(unknown)}; "
                              f"valid: {valid}")


def _param(params: Params, name: str, default: str) -> str:
    return params.get(name, default)


def _threshold(params: Params, default: str) -> float:
    text = _param(params, "threshold", default)
    try:
        value = float(text)
    except ValueError:
        raise MissingEvidence(f"threshold={text!r} is not a number of percent") from None
    if not 0 <= value < 100:
        raise MissingEvidence(f"threshold={text} must be a percentage in [0, 100)")
    return value / 100.0


def _ops(params: Params, default: str) -> list[str]:
    return [o.strip() for o in _param(params, "op", default).split(",") if o.strip()]


# ----------------------------------------------------------------------------------- shapes

def policy_name(value: Any) -> str:
    """A timer or cache field as its name (records may hold the name or an object with one)."""
    return str(value.get("name", "")) if isinstance(value, Mapping) else str(value or "")


def _ctx(rec: Record) -> tuple[int, ...]:
    ctx = rec.get("ctx")
    if isinstance(ctx, (list, tuple)):
        return tuple(int(c) for c in ctx)
    return (int(ctx),) * int(rec.get("batch", 1))


def ctx_text(rec: Record) -> str:
    ctx = rec.get("ctx")
    return "+".join(str(c) for c in ctx) if isinstance(ctx, (list, tuple)) else str(ctx)


def problem_key(rec: Record) -> tuple[Any, ...]:
    """What two records must share to be timings of the same decode problem: batch, per-sequence
    ctx, heads, head_dim, q_len, dtype, seed, timer and cache (not layout, block or backend)."""
    return (int(rec.get("batch", 1)), _ctx(rec), rec.get("q_heads"), rec.get("kv_heads"),
            rec.get("head_dim"), int(rec.get("q_len", 1)), rec.get("dtype"),
            int(rec.get("seed", 0)), policy_name(rec.get("timer")), policy_name(rec.get("cache")))


def pool_key(rec: Record) -> tuple[Any, ...]:
    """:func:`problem_key` plus the pool's layout, block size, placement and slack."""
    slack = rec.get("slack")
    return (*problem_key(rec), rec.get("layout"), rec.get("block_size"), rec.get("placement"),
            round(float(slack), 6) if slack is not None else None)


def _shape_label(rec: Record) -> str:
    return f"b{rec.get('batch')} ctx{ctx_text(rec)}"


def _median(rec: Record) -> float:
    return float((rec.get("stats") or {})["median_us"])


def _ok(records: Iterable[Record], ops: Sequence[str]) -> list[Record]:
    return [r for r in records if r.get("status") == "ok" and r.get("op") in ops
            and (r.get("stats") or {}).get("median_us")]


def _single(records: Sequence[Record], name: str) -> str:
    """The one timer (or cache policy) of ``records``; several is ambiguous."""
    values = sorted({policy_name(r.get(name)) for r in records})
    if len(values) > 1:
        raise MissingEvidence(f"records of several {name}s ({', '.join(values)}): name one with "
                              f"{name}=")
    return values[0] if values else ""


def _need(records: Sequence[Record], what: str) -> None:
    if not records:
        raise MissingEvidence(f"no ok {what} records in the selected evidence")


def _selected(ev: Evidence, params: Params, ops: Sequence[str]) -> list[Record]:
    """The region's ok records of ``ops``: at least one, all of one timer and one cache policy."""
    records = _ok(select(ev.records, params), ops)
    _need(records, "/".join(ops))
    _single(records, "timer")
    _single(records, "cache")
    return records


def _by_backend(records: Iterable[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        out[backend_of(r)].append(r)
    return dict(sorted(out.items()))


def _skip_reasons(records: Iterable[Record], backend: str, op: str) -> str:
    reasons = sorted({str(r.get("reason") or r.get("status")) for r in records
                      if backend_of(r) == backend and r.get("op") == op
                      and r.get("status") != "ok"})
    return "; ".join(reasons)


# ------------------------------------------------------------------------------- formatting

def fmt_us(x: float) -> str:
    """A time with about three significant figures and its unit."""
    if not math.isfinite(x):
        return "n/a"
    if x >= 10_000:
        return f"{x / 1000:.1f} ms"
    if x >= 1000:
        return f"{x / 1000:.2f} ms"
    if x >= 100:
        return f"{x:.0f} µs"
    if x >= 10:
        return f"{x:.1f} µs"
    return f"{x:.2f} µs"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if math.isfinite(x) else "n/a"


def _fmt_interval(ci: tuple[float, float], fmt_end: Callable[[float], str]) -> str:
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "[n/a]"
    return f"[{fmt_end(lo)}, {fmt_end(hi)}]"


def fmt_ci(ci: tuple[float, float]) -> str:
    return _fmt_interval(ci, lambda x: f"{x:.2f}")


def fmt_pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.0f}%" if math.isfinite(ratio) else "n/a"


def fmt_pct_ci(ci: tuple[float, float]) -> str:
    return _fmt_interval(ci, fmt_pct)


def geomean(values: Iterable[float]) -> float:
    vals = [v for v in values if v > 0 and math.isfinite(v)]
    if not vals:
        return math.nan
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A Markdown table; ``align`` has one letter per column (l or r, default l)."""
    marks = ["---:" if (align[i:i + 1] == "r") else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- verdicts

#: how a set of per-shape verdicts reads as one
TALLY_ORDER: tuple[str, ...] = ("faster", "same", "slower", "unsure")


@dataclass(frozen=True)
class Tally:
    """Per-shape verdicts of A against B, summed up."""

    verdicts: tuple[Verdict, ...]

    @property
    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(TALLY_ORDER, 0)
        for v in self.verdicts:
            out[v.verdict] += 1
        return out

    @property
    def overall(self) -> str:
        """``faster`` / ``slower``: more than half the shapes say so and none the opposite;
        ``same``: more than half same and none faster or slower; ``mixed``: some shapes faster
        and some slower (the answer depends on the shape); else ``unsure``."""
        c, n = self.counts, len(self.verdicts)
        if c["faster"] and c["slower"]:
            return "mixed"
        for word in ("faster", "slower", "same"):
            others = [w for w in ("faster", "slower") if w != word]
            if c[word] * 2 > n and not any(c[w] for w in others):
                return word
        return "unsure"

    @property
    def ratio(self) -> float:
        """The geometric mean of the per-shape ratios."""
        return geomean(v.ratio for v in self.verdicts)

    @property
    def ratio_range(self) -> tuple[float, float]:
        ratios = [v.ratio for v in self.verdicts if math.isfinite(v.ratio)]
        return (min(ratios), max(ratios)) if ratios else (math.nan, math.nan)

    @property
    def ci_hull(self) -> tuple[float, float]:
        """The geometric means of the per-shape CI bounds: where the geometric-mean ratio lies
        when every per-shape interval holds."""
        return (geomean(v.ratio_ci[0] for v in self.verdicts),
                geomean(v.ratio_ci[1] for v in self.verdicts))

    def counts_text(self) -> str:
        c = self.counts
        return ", ".join(f"{w} {c[w]}" for w in TALLY_ORDER if c[w]) + f" of {len(self.verdicts)}"


#: how an unsure verdict's reason is named in a summary: (marker in the reason, short name;
#: empty: the reason from the marker on, e.g. "flagged noisy, not-converged")
_UNSURE_KINDS: tuple[tuple[str, str], ...] = (
    ("flagged", ""), ("status", ""), ("not converged", "not converged"),
    ("too few samples", "too few samples"), ("straddles", "the ratio's CI straddles the band"),
    ("Mann-Whitney", "beyond the band but the test is not significant"),
    ("rounds disagree", "the rounds disagree"),
)


def _unsure_reasons(verdicts: Iterable[Verdict]) -> str:
    """The distinct reasons of unsure verdicts, shortened to their kind, with counts."""
    kinds: dict[str, int] = defaultdict(int)
    for v in verdicts:
        if v.verdict == "unsure":
            reason = v.reason
            for marker, short in _UNSURE_KINDS:
                if marker in reason:
                    reason = reason[reason.index(marker):] if not short else short
                    break
            kinds[reason] += 1
    return "; ".join(f"{k} ({n})" for k, n in sorted(kinds.items()))


# ------------------------------------------------------------------------------ arm matching

def _arms(records: Sequence[Record], arm_of: Callable[[Record], Any],
          key_of: Callable[[Record], Any], what: str) -> dict[Any, dict[Any, Record]]:
    """Records grouped into comparison arms, each a {shape key: record} map; refuses when the
    arms do not cover the same shapes (a mismatched shape set)."""
    arms: dict[Any, dict[Any, Record]] = defaultdict(dict)
    for r in records:
        arms[arm_of(r)][key_of(r)] = r
    keys = [set(a) for a in arms.values()]
    if keys and any(k != keys[0] for k in keys):
        union = set().union(*keys)
        gaps = []
        for arm, shapes in sorted(arms.items(), key=lambda kv: str(kv[0])):
            missing = union - set(shapes)
            if missing:
                sample = next(iter(sorted(missing, key=str)))
                example = next(r for a in arms.values() for k, r in a.items() if k == sample)
                gaps.append(f"{arm} lacks {len(missing)} (e.g. {_shape_label(example)} "
                            f"bs{example.get('block_size')})")
        raise MissingEvidence(f"{what}: the arms were measured on different shape sets: "
                              + "; ".join(gaps))
    return dict(arms)


# ----------------------------------------------------------------------------- the rules

def hardware(ev: Evidence, params: Params) -> Finding:
    """Host, CPU, each backend's device and framework versions, measured bandwidth, timers and
    cache policies, and how many records are ok, skipped, failed, noisy or unconverged."""
    records = select(ev.records, params)
    if not records:
        raise MissingEvidence("no case records in the selected evidence")
    if not ev.runs:
        raise MissingEvidence("no run lines (provenance) in the selected evidence")
    run = ev.runs[0]
    host = run.get("host") or {}
    cpu = host.get("cpu") or {}
    backends = sorted({str(r.get("backend")) for r in records})
    lines = [f"- host: {host.get('hostname', '?')}, {host.get('os_release') or host.get('os')}, "
             f"kernel {host.get('kernel', '?')}, CPU {cpu.get('model', '?')} "
             f"({cpu.get('cores', '?')} cores)"]
    devices = {}
    for r in ev.runs:
        for name, entry in (r.get("devices") or {}).items():
            if name in backends and isinstance(entry, Mapping):
                devices.setdefault(name, entry)
    rows = []
    for name in backends:
        entry = devices.get(name, {})
        versions = ", ".join(f"{k} {v}" for k, v in sorted((entry.get("versions") or {}).items()))
        reads = [((r.get("bandwidth") or {}).get(name) or {}).get("read_gbps") for r in ev.runs]
        read = " / ".join(f"{x:.1f}" for x in reads if isinstance(x, (int, float))) or "n/a"
        rows.append([name, str(entry.get("name", _device_of(records, name))), versions, read])
    lines.append("")
    lines.append(_table(["backend", "device", "versions", "read GB/s (measured, per run)"],
                        rows, "lllr"))
    frameworks = run.get("frameworks") or {}
    if frameworks:
        lines.append("")
        lines.append("- frameworks: " + ", ".join(f"{k} {v}" for k, v in sorted(frameworks.items())
                                                   if v))
    status: dict[str, int] = defaultdict(int)
    flags: dict[str, int] = defaultdict(int)
    for r in records:
        status[str(r.get("status"))] += 1
        for f in r.get("flags") or []:
            flags[str(f)] += 1
    timers = sorted({f"{policy_name(r.get('timer'))}/{policy_name(r.get('cache'))}" for r in records
                     if r.get("status") == "ok"})
    lines.append(f"- timers/caches: {', '.join(timers) or 'none'}")
    lines.append("- records: " + ", ".join(f"{k} {v}" for k, v in sorted(status.items()))
                 + ("; flags: " + ", ".join(f"{k} {v}" for k, v in sorted(flags.items()))
                    if flags else ""))
    commands = list(dict.fromkeys(" ".join(str(a) for a in r["argv"]) for r in ev.runs
                                  if r.get("argv")))
    for i, command in enumerate(commands):
        label = "command" if len(commands) == 1 else f"command {i + 1} of {len(commands)}"
        lines.append(f"- {label}: `{command}`")
    return Finding("\n".join(lines), records)


def _device_of(records: Sequence[Record], backend: str) -> str:
    return next((str(r.get("device")) for r in records if r.get("backend") == backend), "?")


def results_table(ev: Evidence, params: Params) -> Finding:
    """The Compare-style Markdown tables of ``kvmicro report --format markdown`` over the
    selected records (``op=`` narrows them), then the skipped and failed cases."""
    from .report import parse_columns, render

    records = select(ev.records, params)
    if "op" in params:
        records = [r for r in records if r.get("op") in _ops(params, "")]
    if not any(r.get("status") == "ok" for r in records):
        raise MissingEvidence("no ok records to tabulate in the selected evidence")
    columns = parse_columns(params.get("columns"))
    text = render([dict(r) for r in records], "markdown", columns).strip()
    return Finding(text, records)


def _layout_comparison(records: Sequence[Record], threshold: float, what: str) -> list[str]:
    """Per backend: each layout's geometric-mean median over the shapes, and its per-shape
    verdicts against the layout with the lowest geometric mean."""
    rows: list[list[str]] = []
    decisions: list[str] = []
    for backend, recs in _by_backend(records).items():
        arms = _arms(recs, lambda r: str(r.get("layout")),
                     lambda r: (*problem_key(r), r.get("block_size"), r.get("placement")),
                     f"{what} on {backend}")
        if len(arms) < 2:
            only = next(iter(arms))
            decisions.append(f"- **{backend}**: only layout {only} measured; no choice to make")
            continue
        means = {layout: geomean(_median(r) for r in arm.values()) for layout, arm in arms.items()}
        best = min(sorted(means), key=lambda k: means[k])
        others: list[tuple[str, Tally]] = []
        for layout in sorted(means, key=lambda k: (means[k], k)):
            if layout == best:
                rows.append([backend, f"**{layout}**", fmt_us(means[layout]), "1 (best)", "", "",
                             ""])
                continue
            # the best layout as `new` against this one as `base`: "faster" = best is faster
            tally = Tally(tuple(compare_records(arms[best][k], arms[layout][k],
                                                threshold=threshold)
                                for k in sorted(arms[best], key=str)))
            inverse = 1.0 / tally.ratio
            lo, hi = tally.ratio_range
            hull = tally.ci_hull
            rows.append([backend, layout, fmt_us(means[layout]),
                         f"{fmt_ratio(inverse)} slower",
                         f"{fmt_ratio(1 / hi)}-{fmt_ratio(1 / lo)}",
                         fmt_ci((1 / hull[1], 1 / hull[0])),
                         f"{best} {tally.overall} ({tally.counts_text()})"])
            others.append((layout, tally))
        decided = [layout for layout, t in others if t.overall == "faster"]
        if all(t.overall == "same" for _, t in others):
            word = (f"**tie**: every layout within ±{threshold * 100:g}% of {best} on most "
                    "shapes (" + ", ".join(f"{layout} {t.counts_text()}" for layout, t in others)
                    + ")")
        elif len(decided) == len(others):
            word = f"**{best}**: faster than " + ", ".join(
                f"{layout} by {fmt_ratio(1 / t.ratio)} (geometric mean)" for layout, t in others)
        else:
            undecided = [f"{layout} ({t.overall}: {t.counts_text()})" for layout, t in others
                         if t.overall != "faster"]
            reasons = _unsure_reasons(v for _, t in others for v in t.verdicts)
            word = (f"**no layout decided**: {best} has the lowest geometric mean, but against "
                    + ", ".join(undecided) + " the data do not settle it"
                    + (f" (unsure because: {reasons})" if reasons else ""))
            if decided:
                word += f"; {best} is faster than " + ", ".join(decided)
        decisions.append(f"- {backend}: {word}")
    table = _table(["backend", "layout", "geomean median", "vs best (geomean)",
                    "per-shape range", "95% CI (geomean of bounds)", "verdict"],
                   rows, "llrrrrl")
    return [table, "", *decisions]


def layout_choice(ev: Evidence, params: Params) -> Finding:
    """Which pool layout makes an op fastest, per backend: the geometric mean of each layout's
    medians over the shapes measured (batch x ctx x block x placement), the others' ratio to the
    best (geometric mean, per-shape range, CI), and the per-shape verdicts summed up."""
    ops = _ops(params, "gather_sdpa")
    records = _selected(ev, params, ops)
    threshold = _threshold(params, "5")
    lines = [f"Op {', '.join(ops)}; verdicts at ±{threshold * 100:g}% "
             f"(kvmicro.verdict), ratios of medians."]
    lines += ["", *_layout_comparison(records, threshold, "layout-choice")]
    return Finding("\n".join(lines), records)


def _contiguous_for(records: Sequence[Record]) -> dict[tuple[Any, ...], Record]:
    """sdpa_contiguous records by (backend, problem_key); ``sdpa_contiguous`` does not depend on
    layout or block, so the first one in a stable order stands for its problem."""
    out: dict[tuple[Any, ...], Record] = {}
    for r in sorted(records, key=lambda r: (str(r.get("layout")), r.get("block_size") or 0)):
        out.setdefault((backend_of(r), problem_key(r)), r)
    return out


#: the ops whose overhead over sdpa_contiguous the crossover rule measures
_CROSSOVER_OPS: tuple[str, ...] = ("gather_sdpa", "paged_sdpa")


def crossover(ev: Evidence, params: Params) -> Finding:
    """A paged path's overhead over contiguous SDPA by ctx, per backend, layout, block and
    batch, and the crossover: the smallest ctx whose overhead exceeds ``threshold`` (percent)
    with a verdict of slower (the ratio's CI wholly beyond it). Shapes whose verdict is unsure
    are said to be, and bound the crossover instead of moving it. The paged path is ``op``:
    gather-then-SDPA by default, or ``paged_sdpa`` for what a fused kernel pays over the
    contiguous lower bound. The base is the backend's own sdpa_contiguous (``base=own``) or,
    with ``base=fastest``, the fastest ok sdpa_contiguous of any backend on the same problem
    (for a backend without a contiguous op of its own, and for the device's lower bound)."""
    op = _param(params, "op", "gather_sdpa")
    if op not in _CROSSOVER_OPS:
        raise MissingEvidence(f"crossover: op={op} is not a paged attention op "
                              f"({', '.join(_CROSSOVER_OPS)})")
    base_mode = _param(params, "base", "own")
    if base_mode not in ("own", "fastest"):
        raise MissingEvidence(f"crossover: base={base_mode} is neither own nor fastest")
    ignored = ("layout", "block") + (("backend",) if base_mode == "fastest" else ())
    selected = select(ev.records, {k: v for k, v in params.items() if k not in ignored})
    contiguous = _contiguous_for(_ok(selected, ["sdpa_contiguous"]))
    fastest: dict[tuple[Any, ...], Record] = {}
    for (_, problem), r in sorted(contiguous.items(), key=lambda kv: str(kv[0][0])):
        if problem not in fastest or _median(r) < _median(fastest[problem]):
            fastest[problem] = r
    gathered = _ok(select(ev.records, params), [op])
    _need(gathered, op)
    _need(list(contiguous.values()), "sdpa_contiguous")
    _single(gathered, "timer")
    _single(gathered, "cache")
    threshold = _threshold(params, "15")
    groups: dict[tuple[Any, ...], list[Record]] = defaultdict(list)
    for r in gathered:
        groups[(backend_of(r), r.get("layout"), r.get("block_size"),
                int(r.get("batch", 1)))].append(r)
    ctxs = sorted({ctx_text(r) for r in gathered}, key=lambda c: [int(x) for x in c.split("+")])
    rows, used = [], list(gathered)
    bases: dict[str, int] = {}
    for (backend, layout, block, batch), recs in sorted(groups.items(), key=str):
        cells = dict.fromkeys(ctxs, "")
        verdicts: list[tuple[str, Verdict]] = []
        for r in sorted(recs, key=lambda r: sum(_ctx(r))):
            base = fastest.get(problem_key(r)) if base_mode == "fastest" else \
                contiguous.get((backend, problem_key(r)))
            if base is None:
                where = "any backend" if base_mode == "fastest" else backend
                raise MissingEvidence(f"crossover: no ok sdpa_contiguous on {where} for "
                                      f"{_shape_label(r)} ({op} has one)")
            used.append(base)
            bases[backend_of(base)] = bases.get(backend_of(base), 0) + 1
            v = compare_records(r, base, threshold=threshold)
            mark = {"slower": "over", "same": "under", "faster": "below contiguous"}.get(
                v.verdict, "unsure")
            cells[ctx_text(r)] = f"{fmt_pct(v.ratio)} {fmt_pct_ci(v.ratio_ci)} {mark}"
            verdicts.append((ctx_text(r), v))
        rows.append([backend, str(layout), str(block), str(batch), *(cells[c] for c in ctxs),
                     _crossover_text(verdicts, threshold)])
    table = _table(["backend", "layout", "block", "batch", *(f"ctx {c}" for c in ctxs),
                    f"crossover (> +{threshold * 100:g}%)"], rows, "lrrr" + "r" * len(ctxs) + "l")
    base_text = "sdpa_contiguous of the same shape" if base_mode == "own" else (
        "the fastest sdpa_contiguous of any backend on the same shape ("
        + ", ".join(f"{b} on {n}" for b, n in sorted(bases.items())) + " comparisons)")
    head = (f"Overhead of {op} over {base_text} (ratio of medians - 1, 95% CI); over/under: "
            f"the CI lies wholly beyond/inside ±{threshold * 100:g}%.")
    return Finding(head + "\n\n" + table, used)


def _crossover_text(verdicts: Sequence[tuple[str, Verdict]], threshold: float) -> str:
    over = [i for i, (_, v) in enumerate(verdicts) if v.verdict == "slower"]
    if not over:
        if all(v.verdict in ("same", "faster") for _, v in verdicts):
            return f"none up to ctx {verdicts[-1][0]} (all under)"
        unsure = [c for c, v in verdicts if v.verdict == "unsure"]
        return f"undecided (unsure at ctx {', '.join(unsure)})"
    first = over[0]
    ctx = verdicts[first][0]
    before = [c for c, v in verdicts[:first] if v.verdict == "unsure"]
    if first == 0:
        return f"ctx <= {ctx} (over at the smallest ctx measured)"
    if before:
        return f"ctx <= {ctx} (unsure at {', '.join(before)})"
    return f"ctx {ctx} (under at {verdicts[first - 1][0]})"


def fused_vs_gather(ev: Evidence, params: Params) -> Finding:
    """Fused paged attention against gather-then-SDPA on the same pool: paged_sdpa / gather_sdpa
    by ctx, per backend, layout, block and batch, with verdicts; a backend without a fused
    kernel is named with the reason it skipped."""
    selected = select(ev.records, params)
    pairs = _ok(selected, ["paged_sdpa", "gather_sdpa"])
    _single(pairs, "timer")
    _single(pairs, "cache")
    threshold = _threshold(params, "5")
    rows, notes, used = [], [], []
    summary = []
    ctxs = sorted({ctx_text(r) for r in pairs}, key=lambda c: [int(x) for x in c.split("+")])
    for backend, recs in _by_backend(pairs).items():
        fused = {pool_key(r): r for r in recs if r.get("op") == "paged_sdpa"}
        gather = {pool_key(r): r for r in recs if r.get("op") == "gather_sdpa"}
        if not fused or not gather:
            missing = "paged_sdpa" if not fused else "gather_sdpa"
            why = _skip_reasons(selected, backend, missing)
            notes.append(f"- {backend}: no ok {missing}" + (f" ({why})" if why else ""))
            continue
        arms = _arms([*fused.values(), *gather.values()], lambda r: r.get("op"), pool_key,
                     f"fused-vs-gather on {backend}")
        keys = sorted(arms["paged_sdpa"], key=str)
        verdicts = {k: compare_records(arms["paged_sdpa"][k], arms["gather_sdpa"][k],
                                       threshold=threshold) for k in keys}
        used += [*arms["paged_sdpa"].values(), *arms["gather_sdpa"].values()]
        groups: dict[tuple[Any, ...], dict[str, Verdict]] = defaultdict(dict)
        for k in keys:
            r = arms["paged_sdpa"][k]
            groups[(r.get("layout"), r.get("block_size"), int(r.get("batch", 1)))][ctx_text(r)] \
                = verdicts[k]
        for (layout, block, batch), cells in sorted(groups.items(), key=str):
            rows.append([backend, str(layout), str(block), str(batch),
                         *(f"{fmt_ratio(cells[c].ratio)} {fmt_ci(cells[c].ratio_ci)} "
                           f"{cells[c].verdict}" if c in cells else "" for c in ctxs)])
        tally = Tally(tuple(verdicts.values()))
        lo, hi = tally.ratio_range
        summary.append(f"- {backend}: fused/gather {fmt_ratio(tally.ratio)} (geometric mean; "
                       f"per-shape {fmt_ratio(lo)}-{fmt_ratio(hi)}, CI "
                       f"{fmt_ci(tally.ci_hull)}); fused is {tally.overall} "
                       f"({tally.counts_text()})")
    if not rows:
        raise MissingEvidence("fused-vs-gather: no backend has both paged_sdpa and gather_sdpa "
                              "ok records" + (": " + " ".join(notes) if notes else ""))
    table = _table(["backend", "layout", "block", "batch", *(f"ctx {c}" for c in ctxs)], rows,
                   "lrrr" + "r" * len(ctxs))
    head = (f"paged_sdpa / gather_sdpa on the same pool (ratio of medians, 95% CI, verdict at "
            f"±{threshold * 100:g}%); below 1 the fused kernel is faster.")
    return Finding("\n".join([head, "", table, "", *summary, *notes]), used)


def block_size(ev: Evidence, params: Params) -> Finding:
    """How much the block size matters: for each backend, op and layout, every block size's
    median against the smallest block's on the same shape, with verdicts summed up."""
    ops = _ops(params, "gather_sdpa,paged_sdpa")
    records = _selected(ev, params, ops)
    threshold = _threshold(params, "5")
    groups: dict[tuple[Any, ...], list[Record]] = defaultdict(list)
    for r in records:
        groups[(backend_of(r), str(r.get("op")), str(r.get("layout")))].append(r)
    rows, decisions = [], []
    for (backend, op, layout), recs in sorted(groups.items()):
        arms = _arms(recs, lambda r: int(r.get("block_size")),
                     lambda r: (*problem_key(r), r.get("placement")),
                     f"block-size on {backend} {op} {layout}")
        blocks = sorted(arms)
        if len(blocks) < 2:
            continue
        base = blocks[0]
        for block in blocks[1:]:
            tally = Tally(tuple(compare_records(arms[block][k], arms[base][k],
                                                threshold=threshold)
                                for k in sorted(arms[base], key=str)))
            lo, hi = tally.ratio_range
            rows.append([backend, op, layout, f"{block} vs {base}", fmt_ratio(tally.ratio),
                         f"{fmt_ratio(lo)}-{fmt_ratio(hi)}", fmt_ci(tally.ci_hull),
                         f"{tally.overall} ({tally.counts_text()})"])
            decisions.append((backend, op, tally.overall))
    if not rows:
        raise MissingEvidence("block-size: fewer than two block sizes measured for every "
                              "backend, op and layout")
    table = _table(["backend", "op", "layout", "block", "ratio (geomean)", "per-shape range",
                    "95% CI (geomean of bounds)", f"verdict at ±{threshold * 100:g}%"],
                   rows, "llllrrrl")
    words = defaultdict(set)
    for backend, op, overall in decisions:
        words[(backend, op)].add(overall)
    lines = [f"- {backend} {op}: the larger block is "
             + ("/".join(sorted(ws)) + " across layouts" if len(ws) > 1 else next(iter(ws)))
             for (backend, op), ws in sorted(words.items())]
    head = "Median at each block size over the smallest block's, same shape and layout."
    return Finding("\n".join([head, "", table, "", *lines]), records)


def append_cost(ev: Evidence, params: Params) -> Finding:
    """The per-step cost of appending each sequence's next token to the pool, per backend and
    layout: geometric-mean median, the others against the cheapest layout with verdicts, and the
    median per batch and block size."""
    records = _selected(ev, params, ["append"])
    threshold = _threshold(params, "5")
    cells: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    columns = sorted({(int(r.get("batch", 1)), int(r.get("block_size") or 0)) for r in records})
    for r in records:
        cells[(backend_of(r), str(r.get("layout")))][
            f"b{r.get('batch')} bs{r.get('block_size')}"].append(_median(r))
    names = [f"b{b} bs{s}" for b, s in columns]
    rows = [[backend, layout, *(fmt_us(geomean(per[n])) if per.get(n) else "" for n in names)]
            for (backend, layout), per in sorted(cells.items())]
    table = _table(["backend", "layout", *names], rows, "ll" + "r" * len(names))
    lines = [f"Append one token per sequence; verdicts at ±{threshold * 100:g}%.", "",
             *_layout_comparison(records, threshold, "append-cost"), "",
             "Median per batch and block size (geometric mean over ctx):", "", table]
    return Finding("\n".join(lines), records)


def native_vs_peer(ev: Evidence, params: Params) -> Finding:
    """kvmicro's own kernel against the fastest peer on each case: ``op`` of the native backend
    against the fastest ok ``peer_op`` (default the same op) record of any peer on the same
    pool and problem; verdicts summed up, and which peer was fastest how often."""
    selected = select(ev.records, params)
    op = _param(params, "op", "paged_sdpa")
    peer_op = _param(params, "peer_op", op)
    backends = sorted({backend_of(r) for r in selected})
    natives = [b.strip() for b in _param(params, "native", ",".join(
        b for b in backends if b.startswith("native:"))).split(",") if b.strip()]
    peers = [b.strip() for b in _param(params, "peers", ",".join(
        b for b in backends if b not in natives)).split(",") if b.strip()]
    if not natives:
        raise MissingEvidence("native-vs-peer: no native backend in the selected evidence")
    threshold = _threshold(params, "5")
    native_recs = [r for r in _ok(selected, [op]) if backend_of(r) in natives]
    peer_recs = [r for r in _ok(selected, [peer_op]) if backend_of(r) in peers]
    _need(native_recs, f"{op} of {', '.join(natives)}")
    if not peer_recs:
        why = "; ".join(f"{p}: {_skip_reasons(selected, p, peer_op)}" for p in peers
                        if _skip_reasons(selected, p, peer_op))
        raise MissingEvidence(f"native-vs-peer: no ok {peer_op} records of the peers "
                              f"({', '.join(peers) or 'none'})" + (f"; {why}" if why else ""))
    _single([*native_recs, *peer_recs], "timer")
    _single([*native_recs, *peer_recs], "cache")
    fastest: dict[tuple[Any, ...], Record] = {}
    for r in sorted(peer_recs, key=backend_of):
        k = pool_key(r)
        if k not in fastest or _median(r) < _median(fastest[k]):
            fastest[k] = r
    lines = [f"{op} of the native backend against the fastest peer's {peer_op} on the same pool "
             f"and problem (ratio native / peer; verdict at ±{threshold * 100:g}%).", ""]
    rows, used = [], []
    for native in natives:
        mine = {pool_key(r): r for r in native_recs if backend_of(r) == native}
        missing = sorted(set(mine) - set(fastest), key=str)
        if missing:
            example = mine[missing[0]]
            raise MissingEvidence(f"native-vs-peer: no peer {peer_op} for {len(missing)} "
                                  f"{native} cases (e.g. {_shape_label(example)} "
                                  f"{example.get('layout')} bs{example.get('block_size')})")
        keys = sorted(mine, key=str)
        verdicts = [compare_records(mine[k], fastest[k], threshold=threshold) for k in keys]
        used += [mine[k] for k in keys] + [fastest[k] for k in keys]
        tally = Tally(tuple(verdicts))
        wins: dict[str, int] = defaultdict(int)
        for k in keys:
            wins[backend_of(fastest[k])] += 1
        lo, hi = tally.ratio_range
        lines.append(f"- **{native}** is {tally.overall} ({tally.counts_text()}): "
                     f"{fmt_ratio(tally.ratio)} of the fastest peer (geometric mean; per-case "
                     f"{fmt_ratio(lo)}-{fmt_ratio(hi)}, CI {fmt_ci(tally.ci_hull)}); fastest "
                     "peer: " + ", ".join(f"{p} on {n}" for p, n in sorted(wins.items())))
        for k, v in zip(keys, verdicts, strict=True):
            r, p = mine[k], fastest[k]
            rows.append([native, str(r.get("layout")), str(r.get("block_size")),
                         _shape_label(r), fmt_us(_median(r)), backend_of(p),
                         fmt_us(_median(p)), f"{fmt_ratio(v.ratio)} {fmt_ci(v.ratio_ci)}",
                         v.verdict])
    lines += ["", "<details><summary>per case</summary>", "",
              _table(["native", "layout", "block", "shape", "native", "fastest peer", "peer",
                      "ratio [CI]", "verdict"], rows, "lllrrlrrl"), "", "</details>"]
    return Finding("\n".join(lines), used)


RULES: dict[str, Rule] = {rule.key: rule for rule in (
    Rule("hardware", hardware, "host, devices, versions, bandwidth, record counts", {}),
    Rule("results-table", results_table, "the report's Markdown tables",
         {"op": "all", "columns": "median_us,overhead_pct"}),
    Rule("layout-choice", layout_choice, "fastest pool layout per backend",
         {"op": "gather_sdpa", "threshold": "5"}),
    Rule("crossover", crossover, "paged overhead over contiguous SDPA by ctx, and the "
         "crossover ctx per batch", {"op": "gather_sdpa", "base": "own", "threshold": "15"}),
    Rule("fused-vs-gather", fused_vs_gather, "paged_sdpa / gather_sdpa by ctx and batch",
         {"threshold": "5"}),
    Rule("block-size", block_size, "each block size against the smallest",
         {"op": "gather_sdpa,paged_sdpa", "threshold": "5"}),
    Rule("append-cost", append_cost, "append cost per layout", {"threshold": "5"}),
    Rule("native-vs-peer", native_vs_peer, "the native backend against the fastest peer",
         {"op": "paged_sdpa", "peer_op": "same as op", "native": "native:*",
          "peers": "every other backend", "threshold": "5"}),
)}


def get_rule(key: str) -> Rule:
    if key not in RULES:
        raise MissingEvidence(f"no evidence rule {key!r}; rules: {', '.join(RULES)}")
    return RULES[key]


__all__ = ["FILTERS", "RULES", "Evidence", "Finding", "MissingEvidence", "Rule", "Tally",
           "backend_of", "check_params", "geomean", "get_rule", "policy_name", "pool_key",
           "problem_key", "select"]
