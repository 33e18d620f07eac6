"""Reports over result files: Compare-style tables (text or Markdown), CSV, and plots.

Reads records only (``results.read_results``: kvmicro JSONL and pytest-benchmark JSON alike) and
never measures. One table per op and shape group (backend, heads, head_dim, placement, slack,
dtype, timer and cache policy); rows are ctx, batch, block and frag%; columns are the layouts,
and a table wider than 120 columns is split by layout. A cell is the median in µs with the
half-width of its 95% CI (``12.34 ±0.05``), marked ``(! 12%)`` when the sample spread is above
``NOISY_PCT`` and ``?`` when the stopping rule did not converge. The fastest-layout mark comes
from :mod:`kvmicro.verdict` (the paired rule for layouts sampled in the same interleaved rounds,
the unpaired one otherwise): ``*`` fastest (every other layout slower by the test), ``=`` tied,
``~`` cannot tell apart. ``ovh%`` is the overhead against ``sdpa_contiguous`` of the same shape,
with its CI. What the marks mean is said once, under the tables. Skipped and error records are
listed after the tables with their reasons.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import InvalidCase
from .workload import PRESET_LAYOUTS

#: a cell whose spread% is above this is marked ``(! XX%)`` (the record's ``wide-spread`` flag uses
#: the same threshold, results.SPREAD_FLAG_PCT)
NOISY_PCT = 10.0
#: derived figures a column may name, besides every statistic
DERIVED_FIELDS: tuple[str, ...] = ("bytes", "gbps", "pct_of_peak", "overhead_pct")
DEFAULT_COLUMNS: tuple[str, ...] = ("median_us", "overhead_pct")
#: ops whose overhead against sdpa_contiguous means something
OVERHEAD_OPS: tuple[str, ...] = ("gather_sdpa", "paged_sdpa")
OP_ORDER: tuple[str, ...] = ("sdpa_contiguous", "gather", "gather_sdpa", "paged_sdpa", "append")

_LABELS = {"median_us": "µs", "overhead_pct": "ovh%", "gbps": "GB/s", "pct_of_peak": "%peak",
           "bytes": "bytes", "spread_pct": "spread%", "n": "n", "outliers": "outliers"}
#: the case fields every CSV row starts with, in this order
CASE_FIELDS: tuple[str, ...] = ("backend", "device", "op", "layout", "placement", "slack", "batch",
                                "q_heads", "kv_heads", "head_dim", "ctx", "q_len", "block_size",
                                "dtype", "frag_pct", "seed")


def stat_fields() -> tuple[str, ...]:
    from .harness.stats import Stats

    return tuple(Stats.FIELDS)


def valid_columns() -> tuple[str, ...]:
    return (*stat_fields(), *DERIVED_FIELDS)


def parse_columns(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``--columns``: a comma-separated list of statistics and derived figures; an unknown name
    raises InvalidCase listing the valid ones."""
    if text is None:
        return DEFAULT_COLUMNS
    items = [c.strip() for c in (text.split(",") if isinstance(text, str) else text) if c.strip()]
    valid = valid_columns()
    for item in items:
        if item not in valid:
            raise InvalidCase(f"--columns: unknown column {item!r}; expected some of "
                              f"{', '.join(valid)}")
    if not items:
        raise InvalidCase(f"--columns: empty list; expected some of {', '.join(valid)}")
    return tuple(dict.fromkeys(items))


# ------------------------------------------------------------------------------ record access


def load(paths: Iterable[str | Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run headers and case records of every file, in order."""
    from .results import read_results

    runs: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    for path in paths:
        r, c = read_results(path)
        runs.extend(r)
        records.extend(c)
    return runs, records


def timer_of(rec: dict[str, Any]) -> str:
    timer = rec.get("timer", "")
    return timer.get("name", "") if isinstance(timer, dict) else str(timer or "")


def cache_of(rec: dict[str, Any]) -> str:
    cache = rec.get("cache", "")
    return cache.get("name", "") if isinstance(cache, dict) else str(cache or "")


def stat(rec: dict[str, Any], name: str) -> Any:
    stats = rec.get("stats") or {}
    return stats.get(name)


def derived(rec: dict[str, Any], name: str) -> Any:
    return (rec.get("derived") or {}).get(name)


def converged(rec: dict[str, Any]) -> bool | None:
    value = stat(rec, "converged")
    if value is None:
        crit = rec.get("criterion")
        value = crit.get("converged") if isinstance(crit, dict) else None
    return value


def is_noisy(rec: dict[str, Any]) -> bool:
    """Whether the cell gets the spread mark ``(! XX%)``: the record's ``wide-spread`` flag (files
    written before that flag existed called it ``noisy``); for records without flags, its spread
    against NOISY_PCT."""
    spread = stat(rec, "spread_pct")
    flags = rec.get("flags")
    if isinstance(flags, list):
        return "wide-spread" in flags or ("noisy" in flags and spread is not None
                                          and spread > NOISY_PCT)
    return spread is not None and spread > NOISY_PCT


def ctx_label(ctx: Any) -> str:
    return "+".join(str(c) for c in ctx) if isinstance(ctx, (list, tuple)) else str(ctx)


def _ctx_sort(ctx: Any) -> tuple[int, ...]:
    return (sum(ctx), len(ctx)) if isinstance(ctx, (list, tuple)) else (int(ctx), 1)


def shape_key(rec: dict[str, Any]) -> tuple[Any, ...]:
    """What ``sdpa_contiguous`` of the same shape shares with an op, with the backend's options,
    timer and cache policy: overheads compare like with like (:func:`kvmicro.record.shape_key`,
    the one definition)."""
    from .record import shape_key as record_shape_key

    return record_shape_key(rec)


def overhead(rec: dict[str, Any], contiguous: dict[tuple[Any, ...], float]) -> float | None:
    """The record's overhead% against sdpa_contiguous: as recorded, else computed from the
    sdpa_contiguous record of the same shape among those loaded (merged shards, benches)."""
    if rec.get("op") not in OVERHEAD_OPS:
        return None
    value = derived(rec, "overhead_pct")
    if value is not None:
        return float(value)
    base = contiguous.get(shape_key(rec))
    median = stat(rec, "median_us")
    if base and median:
        from .derived import overhead_pct

        return overhead_pct(str(rec.get("op")), float(median), base)
    return None


def contiguous_medians(records: Iterable[dict[str, Any]]) -> dict[tuple[Any, ...], float]:
    out: dict[tuple[Any, ...], float] = {}
    for rec in records:
        if rec.get("status") == "ok" and rec.get("op") == "sdpa_contiguous":
            median = stat(rec, "median_us")
            if median:
                out[shape_key(rec)] = float(median)
    return out


def value(rec: dict[str, Any], column: str, contiguous: dict[tuple[Any, ...], float]) -> Any:
    if column == "overhead_pct":
        return overhead(rec, contiguous)
    if column in DERIVED_FIELDS:
        return derived(rec, column)
    return stat(rec, column)


# ------------------------------------------------------------------------------------- tables


def fmt_number(x: Any) -> str:
    """About four significant figures, no exponent for the magnitudes timings have."""
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    a = abs(x)
    if a >= 1000:
        return f"{x:.0f}"
    if a >= 100:
        return f"{x:.1f}"
    if a >= 10:
        return f"{x:.2f}"
    if a >= 0.01 or a == 0:
        return f"{x:.3f}"
    return f"{x:.2e}"


def table_key(rec: dict[str, Any]) -> tuple[Any, ...]:
    from .record import backend_label

    # one table per backend variant: native:cuda[splits=8] is not native:cuda
    return (backend_label(rec), rec.get("q_heads"), rec.get("kv_heads"), rec.get("head_dim"),
            rec.get("q_len", 1), rec.get("placement"), rec.get("slack"), rec.get("dtype"),
            timer_of(rec), cache_of(rec))


def table_title(key: tuple[Any, ...], device: str = "", op: str = "") -> str:
    backend, hq, hkv, d, q_len, placement, slack, dtype, timer, cache = key
    parts = ([op] if op else []) + [str(backend) + (f" ({device})" if device else ""),
                                    f"Hq {hq} Hkv {hkv} D {d}"]
    if q_len != 1:
        parts.append(f"q_len {q_len}")
    parts += [str(dtype), f"{placement}, slack {float(slack or 0):g}", f"{timer}/{cache}"]
    return " · ".join(parts)


class Table:
    """One Compare-style table: header cells and rows of strings, plus notes."""

    def __init__(self, title: str, header: list[tuple[str, str, str]], rows: list[list[str]],
                 notes: list[str]) -> None:
        # header cells: (first line, second line, full name for one-line formats)
        self.title, self.header, self.rows, self.notes = title, header, rows, notes

    def widths(self) -> list[int]:
        return [max(len(h[0]), len(h[1]), *(len(r[i]) for r in self.rows))
                for i, h in enumerate(self.header)]

    @property
    def width(self) -> int:
        widths = self.widths()
        return sum(widths) + 2 * (len(widths) - 1)

    def text(self) -> str:
        top = [h[0] for h in self.header]
        sub = [h[1] for h in self.header]
        widths = self.widths()
        total = sum(widths) + 2 * (len(widths) - 1)
        title = f" {self.title} "
        inner = max(total - 2, len(title) + 4)   # the title line is as wide as the table
        if inner + 2 <= MAX_WIDTH:
            pad = inner - len(title)
            lines = ["[" + "-" * (pad // 2) + title + "-" * (pad - pad // 2) + "]"]
        else:   # a long title wraps at its " · " separators
            lines, current = [], ""
            for piece in self.title.split(" · "):
                if current and len(current) + len(piece) + 3 > MAX_WIDTH - 8:
                    lines.append(current + " ·")
                    current = piece
                else:
                    current = f"{current} · {piece}" if current else piece
            lines.append(current)
            lines = ["[-- " + lines[0]] + ["    " + t for t in lines[1:]]
            lines[-1] += " --]"

        def line(cells: list[str]) -> str:
            out = [c.rjust(w) for c, w in zip(cells, widths, strict=True)]
            return "  ".join(out).rstrip()

        lines.append(line(top))
        lines.append(line(sub))
        lines.append("-" * total)
        lines += [line(r) for r in self.rows]
        lines += self.notes
        return "\n".join(lines)

    def markdown(self) -> str:
        names = [h[2] for h in self.header]
        lines = [f"#### {self.title}", "", "| " + " | ".join(names) + " |",
                 "|" + "|".join("---:" for _ in names) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in self.rows]
        if self.notes:
            lines += [""] + [f"_{n.strip()}_" for n in self.notes]
        return "\n".join(lines)


#: the default table width: a table wider than this is split by layout
MAX_WIDTH = 120
#: marks of the fastest-layout comparison (see :func:`layout_marks`)
MARK_FASTEST, MARK_TIE, MARK_UNSURE = "*", "=", "~"


def build_tables(records: Sequence[dict[str, Any]], columns: Sequence[str] = DEFAULT_COLUMNS,
                 width: int = MAX_WIDTH) -> list[Table]:
    """The Compare-style tables of the ``ok`` records: one per op and shape group (backend,
    heads, head_dim, q_len, placement, slack, dtype, timer, cache), rows ctx x batch x block,
    columns the layouts; a table wider than ``width`` is split into several by layout."""
    ok = [r for r in records if r.get("status") == "ok" and stat(r, "median_us") is not None]
    contiguous = contiguous_records(ok)
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for rec in ok:
        groups[(table_key(rec), rec.get("op", "?"))].append(rec)

    def order(k: tuple[Any, ...]) -> tuple[Any, ...]:
        key, op = k
        return (tuple(str(x) for x in key), OP_ORDER.index(op) if op in OP_ORDER else 99, op)

    tables: list[Table] = []
    for key, op in sorted(groups, key=order):
        tables += _op_tables(key, op, groups[(key, op)], columns, contiguous, width)
    return tables


def _layout_order(layout: str) -> tuple[int, str]:
    """Preset layouts in their documented order (NSHD, HNSD, NHSD), then the others."""
    return (PRESET_LAYOUTS.index(layout) if layout in PRESET_LAYOUTS else len(PRESET_LAYOUTS),
            layout)


def contiguous_records(records: Iterable[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The ok sdpa_contiguous record of each shape (:func:`shape_key`)."""
    return {shape_key(r): r for r in records
            if r.get("status") == "ok" and r.get("op") == "sdpa_contiguous"
            and stat(r, "median_us")}


def overhead_ci(rec: dict[str, Any], base: dict[str, Any] | None) -> tuple[float, float] | None:
    """The 95% CI of a record's overhead% against its sdpa_contiguous record: the bootstrap CI of
    the median ratio over both records' samples (rounds-aware, verdict.ratio_interval), or, for
    records without samples, the conservative box from the two medians' CIs."""
    from .verdict import ratio_interval, record_rounds

    if base is None:
        return None
    new_x, base_x = rec.get("samples_us") or [], base.get("samples_us") or []
    try:
        if new_x and base_x:
            lo, hi = ratio_interval(new_x, base_x, new_rounds=record_rounds(rec),
                                    base_rounds=record_rounds(base), resamples=1000)
        else:
            lo = float(stat(rec, "ci95_lo_us")) / float(stat(base, "ci95_hi_us"))
            hi = float(stat(rec, "ci95_hi_us")) / float(stat(base, "ci95_lo_us"))
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return (lo - 1.0) * 100.0, (hi - 1.0) * 100.0


def layout_marks(by_layout: dict[str, dict[str, Any]],
                 threshold: float | None = None) -> dict[str, str]:
    """The fastest-layout marks of one op in one row, from verdict.py: the layout with the lowest
    median gets ``*`` when every other layout is slower by the test, ``=`` when the others that
    are not slower are the same (a tie: they get ``=`` too), ``~`` when some cannot be told
    apart from it (unsure: those get ``~`` too). One layout alone gets no mark."""
    from .verdict import DEFAULT_THRESHOLD, compare_records

    if len(by_layout) < 2:
        return {}
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    best = min(by_layout, key=lambda lay: float(stat(by_layout[lay], "median_us")))
    marks: dict[str, str] = {}
    for layout, rec in by_layout.items():
        if layout == best:
            continue
        v = compare_records(rec, by_layout[best], threshold=threshold).verdict
        if v == "same":
            marks[layout] = MARK_TIE
        elif v != "slower":
            marks[layout] = MARK_UNSURE
    if MARK_UNSURE in marks.values():
        marks[best] = MARK_UNSURE
    elif marks:
        marks[best] = MARK_TIE
    else:
        marks[best] = MARK_FASTEST
    return marks


def _fmt_pm(median: float, half: float) -> str:
    """``median ±half`` with the half-width at the median's precision."""
    text = fmt_number(median)
    decimals = len(text.split(".")[1]) if "." in text and "e" not in text else 0
    return f"{text} ±{half:.{decimals}f}" if "e" not in text else f"{text} ±{half:.1e}"


def _median_cell(rec: dict[str, Any], mark: str) -> tuple[str, bool, bool]:
    """The median with its CI half-width, the mark, ``(! XX%)`` and ``?``; and whether the cell
    is noisy and unconverged."""
    median, lo, hi = stat(rec, "median_us"), stat(rec, "ci95_lo_us"), stat(rec, "ci95_hi_us")
    if lo is not None and hi is not None:
        text = _fmt_pm(float(median), (float(hi) - float(lo)) / 2.0)
    else:
        text = fmt_number(median)
    if mark:
        text += f" {mark}"
    noisy = is_noisy(rec)
    if noisy:
        text += f" (! {stat(rec, 'spread_pct'):.0f}%)"
    unconverged = converged(rec) is False
    if unconverged:
        text += " ?"
    return text, noisy, unconverged


def _overhead_cell(rec: dict[str, Any], contiguous: dict[tuple[Any, ...], dict[str, Any]]) -> str:
    medians = {k: float(stat(r, "median_us")) for k, r in contiguous.items()}
    value_ = overhead(rec, medians)
    if value_ is None:
        return ""
    ci = overhead_ci(rec, contiguous.get(shape_key(rec)))
    if ci is None:
        return f"{value_:+.1f}"
    return f"{value_:+.1f} ±{(ci[1] - ci[0]) / 2.0:.1f}"


def _op_tables(key: tuple[Any, ...], op: str, recs: list[dict[str, Any]],
               columns: Sequence[str], contiguous: dict[tuple[Any, ...], dict[str, Any]],
               width: int) -> list[Table]:
    layouts = sorted({str(r.get("layout", "?")) for r in recs}, key=_layout_order)
    shown = [c for c in columns if not (c == "overhead_pct" and op not in OVERHEAD_OPS)]
    medians = {k: float(stat(r, "median_us")) for k, r in contiguous.items()}
    cells: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = defaultdict(dict)
    for rec in recs:
        ctx = rec.get("ctx")
        row = (_ctx_sort(ctx), ctx_label(ctx), rec.get("batch"), rec.get("block_size"),
               rec.get("frag_pct"))
        cells[row][str(rec.get("layout", "?"))] = rec
    row_keys = sorted(cells, key=lambda r: (r[0], r[2] or 0, r[3] or 0))
    # one column group per layout: its cells, row by row
    groups: list[tuple[list[tuple[str, str, str]], list[list[str]]]] = []
    counts = {"noisy": 0, "unconverged": 0}
    marks = {row: layout_marks(cells[row]) for row in row_keys}
    single = op == "sdpa_contiguous" and len(layouts) == 1
    for layout in layouts:
        header, body = [], []
        for column in shown:
            label = _LABELS.get(column, column)
            sub = f"{label} ±CI" if column in ("median_us", "overhead_pct") else label
            top = "" if single else layout
            header.append((top, sub, f"{op} {top} {sub}".replace("  ", " ")))
        for row in row_keys:
            rec = cells[row].get(layout)
            out = []
            for column in shown:
                if rec is None:
                    out.append("")
                elif column == "median_us":
                    text, noisy, unconverged = _median_cell(rec, marks[row].get(layout, ""))
                    counts["noisy"] += noisy
                    counts["unconverged"] += unconverged
                    out.append(text)
                elif column == "overhead_pct":
                    out.append(_overhead_cell(rec, contiguous))
                else:
                    out.append(fmt_number(value(rec, column, medians)))
            body.append(out)
        groups.append((header, body))
    # block and frag% columns only where they vary; a constant one goes into the title
    row_header: list[tuple[str, str, str]] = [("ctx", "", "ctx"), ("batch", "", "batch")]
    row_cells = [[r[1], str(r[2])] for r in row_keys]
    constant = []
    for index, name, fmt in ((3, "block", str), (4, "frag%", fmt_number)):
        values = {r[index] for r in row_keys}
        if len(values) == 1:
            if name == "block" or next(iter(values)):
                constant.append(f"{name} {fmt(next(iter(values)))}")
            continue
        row_header.append((name, "", name))
        for out, r in zip(row_cells, row_keys, strict=True):
            out.append(fmt(r[index]))
    device = next((r.get("device") for r in recs if r.get("device")), "")
    title = " · ".join([table_title(key, device, op), *constant])

    def assemble(chunk: list[int], part: str) -> Table:
        header = list(row_header)
        rows = [list(r) for r in row_cells]
        for g in chunk:
            header += groups[g][0]
            for out, extra in zip(rows, groups[g][1], strict=True):
                out += extra
        return Table(title + part, header, rows, [])

    # as many layouts per table as fit the width
    chunks: list[list[int]] = [[]]
    for g in range(len(groups)):
        if chunks[-1] and assemble([*chunks[-1], g], "").width > width:
            chunks.append([])
        chunks[-1].append(g)
    tables = []
    for i, chunk in enumerate(chunks):
        part = f" ({i + 1}/{len(chunks)})" if len(chunks) > 1 else ""
        tables.append(assemble(chunk, part))
    tables[-1].counts = counts  # type: ignore[attr-defined]
    return tables


def legend(tables: Sequence[Table], columns: Sequence[str] = DEFAULT_COLUMNS) -> list[str]:
    """What the cells and marks mean, said once under all the tables, with what to do about
    noisy and unconverged cells."""
    from .verdict import DEFAULT_THRESHOLD

    noisy = sum(getattr(t, "counts", {}).get("noisy", 0) for t in tables)
    unconverged = sum(getattr(t, "counts", {}).get("unconverged", 0) for t in tables)
    pct = f"{DEFAULT_THRESHOLD * 100:g}%"
    lines = ["times in µs: the median of the samples ± half the width of its 95% CI"]
    if "overhead_pct" in columns:
        lines.append("ovh% = median over sdpa_contiguous of the same shape, minus 1, in %, "
                     "± half its 95% CI (bootstrap of the median ratio)")
    lines += [
        f"{MARK_FASTEST} fastest layout of the op in its row: every other layout is slower by "
        f"the verdict's test - layouts sampled in the same interleaved rounds (one sweep): the "
        f"paired rule, the 99% t-interval of their round-by-round time ratio beyond {pct}; "
        f"otherwise Mann-Whitney p < 0.01 and the median ratio's 95% CI beyond {pct}",
        f"{MARK_TIE} tied for fastest: the same within {pct}   "
        f"{MARK_UNSURE} cannot tell apart from the fastest (the interval straddles {pct}, too "
        "few samples or rounds, or - records not paired - a noisy or unconverged record)",
    ]
    if noisy:
        lines.append(
            f"(! XX%) {noisy} cells: the middle 90% of their samples spans XX% of the median "
            f"(over {NOISY_PCT:g}%): jitter from other work on the host or from the op itself. "
            "Their ± says how well the median is known; a wide spread alone does not make a "
            "comparison unsure. To narrow it: stop other work (the sweep says when the host was "
            "busy), time ops under ~10 µs with --timer batched, or sample longer (--max-time).")
    if unconverged:
        lines.append(f"? {unconverged} cells: the stopping rule did not converge (the record's "
                     "criterion.why_not says why): raise --max-time or loosen --noise.")
    return lines


def problems(records: Sequence[dict[str, Any]]) -> list[tuple[str, str, str, int, list[str]]]:
    """Skipped and error records grouped by (status, backend, reason): with a count and the ops."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        status = rec.get("status")
        if status != "ok":
            groups[(str(status), str(rec.get("backend")), str(rec.get("reason", "")))].append(rec)
    out = []
    for (status, backend, reason), recs in sorted(groups.items()):
        ops = sorted({str(r.get("op")) for r in recs})
        out.append((status, backend, reason, len(recs), ops))
    return out


def render_problems(records: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    rows = problems(records)
    if not rows:
        return ""
    lines = ["#### Skipped and failed cases" if markdown else "Skipped and failed cases:"]
    if markdown:
        lines += ["", "| status | backend | count | ops | reason |", "|---|---|---:|---|---|"]
        lines += [f"| {s} | {b} | {n} | {', '.join(ops)} | {r.replace('|', '/')} |"
                  for s, b, r, n, ops in rows]
    else:
        lines += [f"  {s:<7} {b:<16} x{n:<4} {','.join(ops)}: {r}" for s, b, r, n, ops in rows]
    return "\n".join(lines)


def render(records: Sequence[dict[str, Any]], fmt: str = "table",
           columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """The whole report in ``fmt`` (``table``, ``markdown`` or ``csv``)."""
    if fmt == "csv":
        return render_csv(records, None if columns == DEFAULT_COLUMNS else columns)
    if fmt not in ("table", "markdown"):
        raise InvalidCase(f"--format: unknown format {fmt!r}; expected one of table, markdown, csv")
    tables = build_tables(records, columns)
    parts = [t.markdown() if fmt == "markdown" else t.text() for t in tables]
    if not tables:
        parts.append("no ok records to tabulate")
    else:
        notes = legend(tables, columns)
        parts.append("\n\n".join(f"_{n}_" for n in notes) if fmt == "markdown"
                     else "\n".join(_wrap(n, MAX_WIDTH) for n in notes))
    extra = render_problems(records, markdown=fmt == "markdown")
    if extra:
        parts.append(extra)
    return "\n\n".join(parts) + "\n"


def _wrap(text: str, width: int) -> str:
    """A legend line wrapped to ``width``, continuation lines indented."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width, initial_indent="  ",
                                    subsequent_indent="      "))


# ---------------------------------------------------------------------------------------- csv


def csv_columns(records: Sequence[dict[str, Any]],
                columns: Sequence[str] | None = None) -> list[str]:
    stats = list(columns) if columns else [*stat_fields(), *DERIVED_FIELDS]
    stats = [c for c in stats if c in stat_fields() or c in DERIVED_FIELDS]
    head = [*CASE_FIELDS, "timer", "cache", "cache_bytes", "cache_pools", "status", "reason"]
    tail = ["converged", "criterion", "check_max_abs_err", "check_tolerance", "check_passed"]
    return head + stats + tail


def csv_row(rec: dict[str, Any], names: Sequence[str],
            contiguous: dict[tuple[Any, ...], float]) -> dict[str, Any]:
    cache = rec.get("cache")
    cache = cache if isinstance(cache, dict) else {}
    check = rec.get("check") or {}
    crit = rec.get("criterion")
    out: dict[str, Any] = {}
    for name in names:
        if name == "ctx":
            out[name] = ctx_label(rec.get("ctx"))
        elif name in CASE_FIELDS or name in ("status", "reason"):
            out[name] = rec.get(name, "")
        elif name == "timer":
            out[name] = timer_of(rec)
        elif name == "cache":
            out[name] = cache_of(rec)
        elif name in ("cache_bytes", "cache_pools"):
            value_ = rec.get(name)
            out[name] = value_ if value_ is not None else cache.get(name.split("_", 1)[1], "")
        elif name == "converged":
            c = converged(rec)
            out[name] = "" if c is None else c
        elif name == "criterion":
            out[name] = crit.get("name", "") if isinstance(crit, dict) else (crit or "")
        elif name.startswith("check_"):
            out[name] = check.get(name[len("check_"):], "")
        else:
            v = value(rec, name, contiguous)
            out[name] = "" if v is None else v
    return out


def render_csv(records: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Every record (ok, skipped and error) as one CSV row with all fields but the raw samples."""
    names = csv_columns(records, columns)
    contiguous = contiguous_medians(records)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow(csv_row(rec, names, contiguous))
    return buf.getvalue()


# -------------------------------------------------------------------------------------- plots


def plot(records: Sequence[dict[str, Any]], path: str | Path, max_rows: int = 8) -> list[Path]:
    """Latency vs ctx (median with its 95% CI as error bars) per op and layout, and overhead% vs
    ctx, one row of two panels per table and (batch, block). More than ``max_rows`` rows spill
    into ``NAME-2.png``, ``NAME-3.png``... Returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InvalidCase("--plot needs matplotlib, which is not installed "
                          "(pip install 'kvmicro[plot]')") from exc
    ok = [r for r in records if r.get("status") == "ok" and stat(r, "median_us") is not None]
    contiguous = contiguous_medians(ok)
    panels: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for rec in ok:
        panels[(*table_key(rec), rec.get("batch"), rec.get("block_size"))].append(rec)
    if not panels:
        raise InvalidCase("--plot: no ok records to plot")
    keys = sorted(panels, key=lambda k: tuple(str(x) for x in k))
    path = Path(path)
    written = []
    for page, first in enumerate(range(0, len(keys), max_rows)):
        chunk = keys[first:first + max_rows]
        fig, axes = plt.subplots(len(chunk), 2, figsize=(13, 3.6 * len(chunk)), squeeze=False)
        for (lat_ax, ovh_ax), key in zip(axes, chunk, strict=True):
            _plot_panel(lat_ax, ovh_ax, key, panels[key], contiguous)
        fig.tight_layout()
        target = path if page == 0 else path.with_name(f"{path.stem}-{page + 1}{path.suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written


def _plot_panel(lat_ax: Any, ovh_ax: Any, key: tuple[Any, ...], recs: list[dict[str, Any]],
                contiguous: dict[tuple[Any, ...], float]) -> None:
    lines: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for rec in recs:
        if isinstance(rec.get("ctx"), (int, float)):   # ragged contexts have no x position
            lines[(rec.get("op", "?"), rec.get("layout", "?"))].append(rec)
    for (op, layout), pts in sorted(lines.items()):
        pts.sort(key=lambda r: r["ctx"])
        x = [r["ctx"] for r in pts]
        y = [stat(r, "median_us") for r in pts]
        lo = [max(0.0, m - (stat(r, "ci95_lo_us") or m)) for r, m in zip(pts, y, strict=True)]
        hi = [max(0.0, (stat(r, "ci95_hi_us") or m) - m) for r, m in zip(pts, y, strict=True)]
        label = op if op == "sdpa_contiguous" else f"{op} {layout}"
        lat_ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=label)
        ovh = [(r["ctx"], overhead(r, contiguous)) for r in pts]
        ovh = [(c, v) for c, v in ovh if v is not None]
        if ovh:
            ovh_ax.plot([c for c, _ in ovh], [v for _, v in ovh], marker="o", label=label)
    title = f"{table_title(key[:-2])}\nbatch {key[-2]}, block {key[-1]}"
    ctxs = sorted({r["ctx"] for pts in lines.values() for r in pts})
    lat_ax.set(xscale="log", yscale="log", xlabel="ctx (tokens)", ylabel="median µs (95% CI)",
               title=title)
    lat_ax.title.set_fontsize(8)
    lat_ax.grid(True, which="both", alpha=0.3)
    lat_ax.legend(fontsize=7)
    ovh_ax.set(xscale="log", xlabel="ctx (tokens)", ylabel="overhead vs sdpa_contiguous (%)",
               title="overhead%")
    ovh_ax.axhline(0.0, color="gray", linewidth=0.8)
    for ax in (lat_ax, ovh_ax):
        # label the measured contexts themselves, not powers of ten
        ax.set_xticks(ctxs, [str(c) for c in ctxs])
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    ovh_ax.grid(True, which="both", alpha=0.3)
    if ovh_ax.get_legend_handles_labels()[0]:
        ovh_ax.legend(fontsize=7)


# ------------------------------------------------------------------------------------ summary


def summary(records: Sequence[dict[str, Any]]) -> str:
    """The end-of-sweep summary: counts by status, then the tables and the problems."""
    counts: dict[str, int] = defaultdict(int)
    for rec in records:
        counts[str(rec.get("status"))] += 1
    head = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no records"
    return f"{len(records)} records: {head}\n\n" + render(records)


__all__ = [
    "DEFAULT_COLUMNS", "DERIVED_FIELDS", "NOISY_PCT", "Table", "build_tables", "load",
    "parse_columns", "plot", "problems", "render", "render_csv", "render_problems", "summary",
    "valid_columns",
]
