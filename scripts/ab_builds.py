#!/usr/bin/env python3
"""A/B two builds of kvmicro on one machine: is build B faster, slower or the same as build A?

Records of two separate sweeps carry the machine's drift between them, which no test on their
samples can tell from a code change (docs/methodology.md, "Calibration"). This script takes the
drift out the way the paired rule does within one sweep: it alternates whole ``kvmicro sweep``
processes between the two builds, in pairs whose order flips every pair (A B, B A, A B, ...),
and compares each case pair by pair with :func:`kvmicro.verdict.compare_paired`: the ratio of
B's median to A's in each pair, their geometric mean, a t-interval, and with 6 pairs or more the
AB/BA crossover estimate, which cancels whatever running second is worth.

A build is a directory that holds an importable ``kvmicro`` package with its extension built
(``src/`` of a checkout after ``scripts/dev-build.sh``). Every record of every process is kept
under ``--out`` (``a-<i>.jsonl``, ``b-<i>.jsonl``), checked against the oracle before it was
timed, as any sweep's.

    python3 scripts/ab_builds.py --a /tmp/ab/a/src --b /tmp/ab/b/src --pairs 6 --out ab \\
        --threshold 2 -- --backend native:cuda --op paged_sdpa --ctx 1024 --batch 1 \\
        --timer graph --cache hot --max-time 0.3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_sweep(build: Path, sweep_args: list[str], out: Path) -> int:
    """One ``kvmicro sweep`` process importing kvmicro from ``build``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(build)] + [p for p in
                                         env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", "kvmicro", "sweep", *sweep_args, "--out", str(out), "-q"]
    return subprocess.run(cmd, env=env, check=False).returncode


def order(pairs: int) -> list[tuple[int, str]]:
    """(pair, side) in running order: A B, B A, A B, ... (pair i runs B first when i is odd)."""
    steps: list[tuple[int, str]] = []
    for i in range(pairs):
        steps += [(i, "a"), (i, "b")] if i % 2 == 0 else [(i, "b"), (i, "a")]
    return steps


def analyse(out: Path, pairs: int, threshold: float, plant: float = 1.0) -> list[dict[str, Any]]:
    """Per case, the paired verdict of B against A over the process pairs; ``plant``: B's medians
    multiplied by it first (a planted slowdown, to calibrate the rule on an A/A run)."""
    from kvmicro.record import record_key
    from kvmicro.results import read_results
    from kvmicro.verdict import compare_paired

    medians: dict[Any, dict[str, dict[int, float]]] = defaultdict(lambda: {"a": {}, "b": {}})
    names: dict[Any, str] = {}
    for i in range(pairs):
        for side in ("a", "b"):
            path = out / f"{side}-{i}.jsonl"
            if not path.exists():
                continue
            for rec in read_results(path)[1]:
                if rec.get("status") != "ok":
                    continue
                key = record_key(rec)
                medians[key][side][i] = float(rec["stats"]["median_us"])
                names[key] = (f"{rec['op']} {rec['ctx']}/{rec['batch']} {rec['layout']} "
                              f"bs{rec['block_size']} {rec['placement']} {rec['cache']}")
    rows = []
    for key, sides in medians.items():
        both = sorted(set(sides["a"]) & set(sides["b"]))
        a = [sides["a"][i] for i in both]
        b = [sides["b"][i] * plant for i in both]
        verdict = compare_paired(b, a, threshold=threshold, rounds=both)
        rows.append({"case": names[key], "a_us": a, "b_us": b, "verdict": verdict})
    return sorted(rows, key=lambda r: r["case"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="build A (the base)")
    parser.add_argument("--b", type=Path, required=True, help="build B (the new one)")
    parser.add_argument("--pairs", type=int, default=6, help="A/B process pairs (default 6)")
    parser.add_argument("--out", type=Path, default=Path("ab"), help="directory for the records")
    parser.add_argument("--threshold", type=float, default=5.0, help="percent (default 5)")
    parser.add_argument("--analyse-only", action="store_true",
                        help="re-read the records under --out instead of running")
    parser.add_argument("--plant", type=float, default=1.0, metavar="FACTOR",
                        help="calibration: analyse B's medians multiplied by FACTOR (e.g. 1.3 on "
                        "an A/A run: a planted slowdown that 'slower' should find)")
    parser.add_argument("sweep_args", nargs=argparse.REMAINDER,
                        help="-- then the arguments of `kvmicro sweep` (not --out)")
    args = parser.parse_args(argv)
    sweep_args = args.sweep_args[1:] if args.sweep_args[:1] == ["--"] else args.sweep_args
    if args.pairs < 3:
        parser.error(f"--pairs {args.pairs}: the paired rule needs at least 3 pairs")
    if not 0 <= args.threshold < 100:
        parser.error(f"--threshold {args.threshold}: a percentage in [0, 100)")
    builds = {"a": args.a.resolve(), "b": args.b.resolve()}
    for side, build in builds.items():
        if not (build / "kvmicro" / "__init__.py").exists():
            parser.error(f"--{side} {build}: no kvmicro package there")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.analyse_only:
        for i, side in order(args.pairs):
            path = args.out / f"{side}-{i}.jsonl"
            path.unlink(missing_ok=True)
            rc = run_sweep(builds[side], sweep_args, path)
            print(f"pair {i} build {side.upper()}: rc {rc}", flush=True)
    if args.plant <= 0:
        parser.error(f"--plant {args.plant}: a positive factor")
    rows = analyse(args.out, args.pairs, args.threshold / 100.0, args.plant)
    if not rows:
        print("no ok records to compare")
        return 2
    planted = f", B's medians x {args.plant:g} (planted)" if args.plant != 1.0 else ""
    print(f"B against A over {args.pairs} process pairs (order A B, B A, ...), "
          f"threshold {args.threshold:g}%{planted}: median of each process, µs")
    for row in rows:
        v = row["verdict"]
        lo, hi = v.ratio_ci
        print(f"  {row['case']:<46} A {min(row['a_us']):8.2f}-{max(row['a_us']):8.2f}  "
              f"B {min(row['b_us']):8.2f}-{max(row['b_us']):8.2f}  B/A {v.ratio:.4f} "
              f"[{lo:.4f}, {hi:.4f}] {v.verdict}")
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["verdict"].verdict] += 1
    print(f"{len(rows)} cases: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())))
    return 1 if counts.get("slower") else 0


if __name__ == "__main__":
    # the analysis reads records with this checkout's kvmicro (pure Python; no extension needed)
    # unless one is importable already
    try:
        import kvmicro  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
