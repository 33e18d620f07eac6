"""Reports: one Compare-style table per op and shape group with ctx and batch rows and layout
columns, at most 120 characters wide; medians with their CI half-width; noisy and unconverged
cells marked and explained once; the fastest layout marked by the verdict (* fastest, = tie,
~ cannot tell apart); overhead against sdpa_contiguous with its CI; skipped and failed cases
listed with their reasons; CSV with every record; plots behind an optional import."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvmicro import InvalidCase
from kvmicro.cli import main
from kvmicro.derived import derive
from kvmicro.harness.measure import Measurement
from kvmicro.harness.stats import Stats
from kvmicro.report import build_tables, parse_columns, plot, render, render_csv
from kvmicro.results import ResultsWriter, case_record
from kvmicro.workload import Case


def measurement(samples: list[float], timer: str = "batched", cache: str = "cold:rotate",
                converged: bool = True) -> Measurement:
    return Measurement(samples_us=samples, stats=Stats.from_samples(samples), timer=timer,
                       cache={"name": cache, "bytes": 1 << 20, "pools": 4},
                       criterion={"name": "ci-median", "params": {}, "converged": converged,
                                  "why_not": "" if converged else "CI too wide"},
                       k=8, dropped=0, elapsed_s=0.1)


def around(median: float, spread: float = 0.01, n: int = 41, seed: int = 0) -> list[float]:
    """Samples whose median is ``median`` and whose p05..p95 span ~``spread`` of it."""
    rng = np.random.default_rng(seed)
    x = median * (1 + spread / 3.3 * rng.standard_normal(n))
    x[n // 2] = median
    return sorted(float(v) for v in np.sort(x) - np.median(x) + median)


def record(op: str, layout: str = "NSHD", ctx: int = 1024, batch: int = 1, median: float = 100.0,
           contiguous: float | None = None, spread: float = 0.01, converged: bool = True,
           backend: str = "torch:cpu", status: str = "ok", reason: str = "",
           dtype: str = "float32") -> dict[str, Any]:
    c = Case(op=op, backend=backend, layout=layout, ctx=ctx, batch=batch, q_heads=8, kv_heads=2,
             head_dim=64, placement="reverse", dtype=dtype)
    if status != "ok":
        return case_record(c, status=status, reason=reason, device="cpu0",
                           extra={"timer": "batched", "cache": "cold:rotate"})
    m = measurement(around(median, spread), converged=converged)
    return case_record(c, status="ok", measurement=m, check={"max_abs_err": 0.0,
                       "tolerance": 1e-4, "passed": True}, device="cpu0",
                       derived=derive(c, m.stats, 20.0, contiguous))


def sample_records() -> list[dict[str, Any]]:
    return [
        record("sdpa_contiguous", ctx=1024, median=50.0),
        record("gather_sdpa", "NSHD", ctx=1024, median=75.0, contiguous=50.0),
        record("gather_sdpa", "HNSD", ctx=1024, median=150.0, contiguous=50.0, spread=0.4),
        record("sdpa_contiguous", ctx=256, median=20.0),
        record("gather_sdpa", "NSHD", ctx=256, median=30.0, contiguous=20.0, converged=False),
        record("gather_sdpa", "HNSD", ctx=256, median=25.0, contiguous=20.0),
        record("paged_sdpa", ctx=256, status="skipped",
               reason="torch has no fused paged attention kernel on cpu"),
        record("paged_sdpa", ctx=1024, status="skipped",
               reason="torch has no fused paged attention kernel on cpu"),
        record("append", ctx=256, status="error", reason="append disagrees with the oracle"),
    ]


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    with ResultsWriter(path, {"host": {"hostname": "test"}, "argv": ["test"]}) as w:
        for r in records:
            w.write(r)
    return path


def test_one_table_per_op_with_shape_rows_layout_columns_and_marks() -> None:
    text = render(sample_records(), "table")
    blocks = text.split("\n\n")
    contiguous, gather = blocks[0].splitlines(), blocks[1].splitlines()
    assert contiguous[0].startswith("[") and "sdpa_contiguous · torch:cpu (cpu0)" in contiguous[0]
    title, top, sub, rule, row256, row1024 = gather
    assert "gather_sdpa · torch:cpu" in title and "Hq 8 Hkv 2 D 64" in title
    assert "float32" in title and "batched/cold:rotate" in title and "block 16" in title
    assert top.split() == ["ctx", "batch", "NSHD", "NSHD", "HNSD", "HNSD"]
    assert sub.split() == ["µs", "±CI", "ovh%", "±CI", "µs", "±CI", "ovh%", "±CI"]
    assert set(rule) == {"-"}
    assert row256.split()[:2] == ["256", "1"]   # rows sorted by ctx
    # ctx 256: NSHD (30) did not converge: "?", and it cannot be told apart from HNSD (25)
    norm = " ".join(row256.split())
    assert "30.00 ±0.03 ~ ? +50.0 ±0.2" in norm and "25.00 ±0.03 ~ +25.0 ±0.2" in norm
    # ctx 1024: HNSD (150) is noisy, so no star for NSHD (75) either
    norm = " ".join(row1024.split())
    assert "75.00 ±0.09 ~ +50.0 ±" in norm and "~ (! 31%) +200.0 ±" in norm
    assert "Skipped and failed cases:" in text
    assert "skipped torch:cpu x2 paged_sdpa: torch has no fused paged attention kernel on cpu" \
        in " ".join(text.split())
    assert "error torch:cpu x1 append: append disagrees with the oracle" in " ".join(text.split())


def test_the_fastest_layout_is_starred_only_when_the_test_says_so_and_ties_are_ties() -> None:
    records = [record("gather", "NSHD", median=50.0), record("gather", "HNSD", median=80.0),
               record("gather", "NHSD", median=50.5),
               record("gather", "NSHD", ctx=2048, median=50.0),
               record("gather", "HNSD", ctx=2048, median=80.0)]
    rows = render(records, "table").split("\n\n")[0].splitlines()[4:]
    tie, star = (" ".join(r.split()) for r in rows)
    # NSHD and NHSD are within 1% of each other: a tie; HNSD is slower than both: no mark
    assert "50.00 ±0.06 = 80.00 ±0.09 50.50 ±0.06 =" in tie
    assert star.endswith("50.00 ±0.06 * 80.00 ±0.09")


def test_every_table_fits_120_columns_and_a_wide_one_is_split_by_layout() -> None:
    layouts = ("NSHD", "HNSD", "NHSD", "SNHD", "HSND", "DNSH")
    records = [record("sdpa_contiguous", ctx=ctx, median=40.0) for ctx in (256, 4096)]
    records += [record("paged_sdpa", layout, ctx=ctx, median=1000.0 + i, contiguous=40.0,
                       spread=0.5, converged=False)
                for ctx in (256, 4096) for i, layout in enumerate(layouts)]
    text = render(records, "table")
    assert max(len(line) for line in text.splitlines()) <= 120
    titles = [t.title for t in build_tables(records)]
    parts = [t for t in titles if t.startswith("paged_sdpa")]
    assert len(parts) >= 2 and parts[0].endswith(f"(1/{len(parts)})")
    assert parts[-1].endswith(f"({len(parts)}/{len(parts)})")


def test_noisy_and_unconverged_cells_are_explained_once_with_what_to_do() -> None:
    records = [*sample_records(), record("gather", "NSHD", median=9.0, spread=0.5),
               record("gather", "HNSD", median=9.0, dtype="float16", spread=0.5)]
    text = render(records, "table")
    assert text.count("(! XX%)") == 1 and "3 cells" in text
    assert "--timer batched" in text and "stop other work" in text
    assert text.count("the stopping rule did not converge") == 1


def test_overhead_is_shown_with_its_ci_even_when_negative() -> None:
    records = [record("sdpa_contiguous", median=100.0, spread=0.05),
               record("paged_sdpa", median=5.3, contiguous=100.0, spread=0.05)]
    row = render(records, "table").split("\n\n")[1].splitlines()[4]
    value, half = row.split()[-2:]
    assert value == "-94.7" and half.startswith("±") and 0 <= float(half[1:]) < 1


def test_one_table_per_backend_dtype_timer_and_cache() -> None:
    records = [*sample_records(), record("sdpa_contiguous", backend="native:cpu", median=5.0),
               record("gather", median=9.0, dtype="float16")]
    titles = [t.title for t in build_tables(records)]
    assert len(titles) == 4
    assert titles[0].startswith("sdpa_contiguous · native:cpu") and "float32" in titles[0]
    assert titles[1].startswith("gather · torch:cpu") and "float16" in titles[1]
    assert titles[2].startswith("sdpa_contiguous · torch:cpu") and "float32" in titles[2]
    assert titles[3].startswith("gather_sdpa · torch:cpu")


def test_overhead_is_computed_from_the_contiguous_record_when_a_record_lacks_it() -> None:
    # records from different shards or a pytest-benchmark file may carry no overhead
    records = [record("sdpa_contiguous", median=40.0), record("gather_sdpa", median=60.0)]
    records[1]["derived"]["overhead_pct"] = None
    row = render(records, "table").split("\n\n")[1].splitlines()[4]
    assert row.split()[-2] == "+50.0"


def test_markdown_is_a_pipe_table_per_group() -> None:
    text = render(sample_records(), "markdown")
    lines = text.splitlines()
    assert lines[0].startswith("#### sdpa_contiguous · torch:cpu")
    header = lines[2]
    assert header == "| ctx | batch | sdpa_contiguous µs ±CI |"
    assert lines[3].startswith("|---:|")
    assert lines[4].startswith("| 256 | 1 | 20.00 ±")
    assert "| ctx | batch | gather_sdpa NSHD µs ±CI | gather_sdpa NSHD ovh% ±CI |" in text
    assert "_* fastest layout of the op in its row" in text
    assert "#### Skipped and failed cases" in text
    assert "| skipped | torch:cpu | 2 | paged_sdpa |" in text


def test_csv_has_one_row_per_record_with_every_field_or_the_chosen_columns() -> None:
    records = sample_records()
    rows = list(csv.DictReader(io.StringIO(render_csv(records))))
    assert len(rows) == len(records)
    first = rows[0]
    assert first["op"] == "sdpa_contiguous" and first["status"] == "ok"
    assert float(first["median_us"]) == pytest.approx(50.0)
    assert first["timer"] == "batched" and first["cache"] == "cold:rotate"
    assert first["cache_pools"] == "4" and first["converged"] == "True"
    for name in Stats.FIELDS:
        assert name in first
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert skipped and skipped[0]["median_us"] == "" and "no fused paged" in skipped[0]["reason"]
    assert float(rows[1]["overhead_pct"]) == pytest.approx(50.0)
    narrow = list(csv.DictReader(io.StringIO(render(records, "csv", ("median_us", "gbps")))))
    assert "median_us" in narrow[0] and "gbps" in narrow[0] and "p95_us" not in narrow[0]


def test_columns_are_validated_against_stats_fields_and_derived_figures() -> None:
    assert parse_columns("median_us,p95_us,gbps") == ("median_us", "p95_us", "gbps")
    with pytest.raises(InvalidCase, match=r"unknown column 'median'.*median_us.*gbps"):
        parse_columns("median")
    text = render(sample_records(), "table", parse_columns("min_us,gbps"))
    assert ["min_us", "GB/s"] in [line.split() for line in text.splitlines()]


def test_report_command_reads_several_files_and_writes_each_format(tmp_path: Path,
                                                                   capsys: Any) -> None:
    records = sample_records()
    a = write(tmp_path / "a.jsonl", records[:3])
    b = write(tmp_path / "b.jsonl", records[3:])
    assert main(["report", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert out.count("[") >= 1 and "gather_sdpa" in out and "Skipped and failed" in out
    assert main(["report", str(a), "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 3
    assert main(["report", str(a), "--columns", "median"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvmicro: error: --columns: unknown column")
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_plot_needs_matplotlib_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    with pytest.raises(InvalidCase, match=r"needs matplotlib.*kvmicro\[plot\]"):
        plot(sample_records(), tmp_path / "p.png")


def test_plot_draws_latency_and_overhead_vs_ctx(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = plot(sample_records(), tmp_path / "p.png")
    assert paths == [tmp_path / "p.png"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_legend_names_the_rule_behind_the_fastest_mark():
    """Layouts of one sweep are compared by the paired rule, others by the unpaired one: the
    legend says both, with their intervals and the threshold."""
    from kvmicro.report import legend

    text = " ".join(legend([]))
    assert "paired rule" in text and "99% t-interval" in text and "round-by-round" in text
    assert "Mann-Whitney p < 0.01" in text and "95% CI beyond 5%" in text
    assert "straddles 5%" in text
