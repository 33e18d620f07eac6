"""The CUDA table of docs/cuda.md, read from `kvmicro sweep` results files (it measures nothing).

    kvmicro sweep --preset cuda-table --backend native:cuda,torch:cuda --out cuda.jsonl
    python scripts/cuda_table.py cuda.jsonl [more.jsonl ...] [--backend native:cuda]

One row per (ctx, batch) of the files; cells are medians in µs with the half-width of their 95%
CI (`5.91±0.03`), `!` after a cell whose record is flagged (noisy, not converged, host busy, ...),
`-` where the files hold no ok record. `floor` is the K/V bytes over the device's measured read
ceiling (the run line's bandwidth); `%copy` is gather's GB/s against the measured copy ceiling.
Columns for other backends (torch:cuda, cudnn:cuda, flashinfer:cuda, variants such as
`native:cuda[kernel=mma]`) appear when the files hold their records. Every figure comes from a
record of the files, so the command that produced them (each run line's argv) reproduces them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from kvmicro.harness.cache import resolve_cache_name
from kvmicro.results import read_results

#: (column title, op, timer, cache) for the backend the table is about; "main" is --timer
MAIN_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("paged hot", "paged_sdpa", "main", "hot"),
    ("paged cold", "paged_sdpa", "main", "cold"),
    ("paged dev", "paged_sdpa", "device", "cold"),
    ("contig", "sdpa_contiguous", "main", "hot"),
    ("gather", "gather", "main", "hot"),
    ("g+sdpa", "gather_sdpa", "main", "hot"),
    ("append", "append", "main", "hot"),
)
#: what a peer backend contributes: its best attention figure of the same shape
PEER_OPS: tuple[str, ...] = ("paged_sdpa", "sdpa_contiguous")


def spec_of(record: Mapping[str, Any]) -> str:
    """``native:cuda[kernel=mma,splits=8]``: the backend with the record's options."""
    options = record.get("options") or ()
    pairs = options.items() if isinstance(options, Mapping) else (tuple(p) for p in options)
    text = ",".join(f"{k}={v}" for k, v in sorted(pairs))
    return f"{record['backend']}[{text}]" if text else str(record["backend"])


def _ctx(record: Mapping[str, Any]) -> Any:
    ctx = record["ctx"]
    return tuple(ctx) if isinstance(ctx, list) else ctx


def index(records: Iterable[Mapping[str, Any]]) -> dict[tuple[Any, ...], Mapping[str, Any]]:
    """ok records by (spec, op, ctx, batch, timer, cache); NSHD, block 16, the first shape."""
    out: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    for r in records:
        if r.get("status") != "ok" or not r.get("stats"):
            continue
        out.setdefault((spec_of(r), r["op"], _ctx(r), int(r["batch"]), r["timer"], r["cache"]), r)
    return out


def cell(record: Mapping[str, Any] | None) -> str:
    if record is None:
        return "-"
    stats = record["stats"]
    median, lo, hi = stats["median_us"], stats.get("ci_low_us"), stats.get("ci_high_us")
    half = (hi - lo) / 2 if lo is not None and hi is not None else None
    text = f"{median:.2f}" + (f"±{half:.2f}" if half is not None else "")
    return text + ("!" if record.get("flags") else "")


def table(paths: list[Path], backend: str, timer: str = "graph") -> str:
    runs, records = [], []
    for path in paths:
        r, c = read_results(path)
        runs += r
        records += c
    by = index(records)
    shapes = sorted({(k[2], k[3]) for k in by if k[0] == backend},
                    key=lambda s: (s[0] if isinstance(s[0], int) else sum(s[0]), s[1]))
    peers = sorted({k[0] for k in by if k[0] != backend})
    bandwidth: dict[str, Any] = {}
    for run in runs:
        bandwidth.update((run.get("bandwidth") or {}).get(backend.split("[")[0], {}) or {})
    read, copy = bandwidth.get("read_gbps"), bandwidth.get("copy_gbps")

    titles = ["ctx/B", "floor", *(c[0] for c in MAIN_COLUMNS), "%copy",
              *(f"{p} {op.split('_')[0]}" for p in peers for op in PEER_OPS)]
    rows = []
    for ctx, batch in shapes:
        row = [f"{ctx}/{batch}"]
        paged = by.get((backend, "paged_sdpa", ctx, batch, timer, "hot"))
        nbytes = (paged or {}).get("derived", {}).get("bytes") if paged else None
        row.append(f"{nbytes / (read * 1e9) * 1e6:.2f}" if nbytes and read else "-")
        for _, op, which, cache in MAIN_COLUMNS:
            t = timer if which == "main" else which
            row.append(cell(by.get((backend, op, ctx, batch, t, resolve_cache_name(cache, t)))))
        gather = by.get((backend, "gather", ctx, batch, timer, "hot"))
        gbps = (gather or {}).get("derived", {}).get("gbps") if gather else None
        row.append(f"{gbps / copy * 100:.0f}" if gbps and copy else "-")
        for peer in peers:
            for op in PEER_OPS:
                row.append(cell(by.get((peer, op, ctx, batch, timer, "hot"))))
        rows.append(row)
    widths = [max(len(r[i]) for r in [titles, *rows]) for i in range(len(titles))]
    lines = ["  ".join(t.rjust(w) for t, w in zip(r, widths, strict=True)) for r in [titles, *rows]]
    device = next((run.get("devices", {}).get(backend.split("[")[0], {}).get("name")
                   for run in runs if run.get("devices")), None)
    head = [f"{backend} on {device or '?'}: µs, median±CI half-width ({timer} timer unless "
            "`dev`: device, cold:flush);"
            + (f" read {read:.0f} GB/s, copy {copy:.0f} GB/s" if read and copy else "")]
    argv = {" ".join(map(str, run.get("argv") or [])) for run in runs}
    return "\n".join([*head, *lines, *(f"from: {a}" for a in sorted(argv) if a)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="kvmicro sweep results (JSONL)")
    parser.add_argument("--backend", default="native:cuda",
                        help="the backend of the main columns (default native:cuda)")
    parser.add_argument("--timer", default="graph",
                        help="the timer of the main columns (default graph)")
    args = parser.parse_args(argv)
    print(table(args.files, args.backend, args.timer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
