#!/usr/bin/env python3
"""The medians (µs) of the ok case records of results files as one table: a row per shape, a
column per backend spec, prefixed with a file's tag when given as FILE=TAG (two builds measured
under the same specs). The summary the GPU-machine scripts print last (device_ab.sh,
device_combine_last.sh); `kvmicro report` gives the full tables with CIs.

    python3 scripts/median_table.py floor.jsonl
    python3 scripts/median_table.py a.jsonl=a n.jsonl=n
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table(args: list[str]) -> list[str]:
    from kvmicro.record import backend_label
    from kvmicro.results import read_results

    cells: dict[str, dict[str, float]] = {}
    columns: list[str] = []
    for arg in args:
        path, _, tag = arg.partition("=")
        for rec in read_results(path)[1]:
            if rec.get("status") != "ok":
                continue
            column = f"{tag} {backend_label(rec)}" if tag else backend_label(rec)
            if column not in columns:
                columns.append(column)
            row = (f"{rec['op']} {rec['ctx']}/{rec['batch']} {rec['layout']} "
                   f"bs{rec['block_size']} {rec['cache']}")
            cells.setdefault(row, {})[column] = float(rec["stats"]["median_us"])
    if not cells:
        return ["no ok records in " + " ".join(args)]
    width = max(len(r) for r in cells)
    lines = [f"{'median µs':<{width}}  " + "  ".join(f"{c:>{max(len(c), 8)}}" for c in columns)]
    for row, values in cells.items():
        lines.append(f"{row:<{width}}  " + "  ".join(
            f"{values[c]:>{max(len(c), 8)}.2f}" if c in values else f"{'-':>{max(len(c), 8)}}"
            for c in columns))
    return lines


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    try:
        import kvmicro  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))
    print("\n".join(table(sys.argv[1:])))
