"""Detection rate and false-positive rate of kvmicro.cliffs.detect on synthetic curves.

Each trial draws a sloped curve (linear or quadratic, 1.5x to 4x across the grid), takes
``--runs`` samples per grid point with multiplicative log-normal noise (``--noise`` sigma) and
heavy-tailed outliers (2% of samples 1.5-3x slower, as a shared machine produces), and plants one
anomaly: a bump of 1.5x, 2x or 21x over 1-3 neighbouring grid points that recovers after, or a
step of 6x that does not (the last 15-40% of the grid). Controls plant nothing: smooth noisy
slopes, and pure noise (a flat curve).

A planted anomaly counts as detected when an interval overlaps it, and as exact when an interval
has exactly its start and end; a false positive is an interval that overlaps nothing planted.
Prints a Markdown table and, with --json, writes the figures that docs/regimes.md quotes and
tests/test_regimes.py bounds.

    python scripts/bench_detect.py --trials 400 --json docs/regimes/bench_detect.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kvmicro.cliffs import DEFAULT_RATIO, detect

SCENARIOS = ("bump 1.5x", "bump 2x", "bump 21x", "step 6x", "smooth slope", "pure noise")


def make_curve(rng: np.random.Generator, grid: np.ndarray, scenario: str
               ) -> tuple[np.ndarray, tuple[int, int] | None]:
    """True medians at each grid point and the planted interval (index range) if any."""
    u = (grid - grid[0]) / (grid[-1] - grid[0])
    if scenario == "pure noise":
        truth = np.full(grid.size, 1000.0)
    else:
        rise = rng.uniform(0.5, 3.0)
        shape = u if rng.random() < 0.5 else u ** 2
        truth = 1000.0 * (1.0 + rise * shape)
    planted = None
    if scenario.startswith("bump"):
        factor = float(scenario.split()[1].rstrip("x"))
        width = int(rng.integers(1, 4))
        start = int(rng.integers(0, grid.size - width + 1))
        planted = (start, start + width - 1)
        truth[start:start + width] *= factor
    elif scenario.startswith("step"):
        start = round(grid.size * rng.uniform(0.6, 0.85))
        planted = (start, grid.size - 1)
        truth[start:] *= 6.0
    return truth, planted


def sample(rng: np.random.Generator, truth: np.ndarray, runs: int,
           noise: float) -> list[list[float]]:
    out = []
    for t in truth:
        s = t * np.exp(rng.normal(0.0, noise, runs))
        slow = rng.random(runs) < 0.02
        s[slow] *= rng.uniform(1.5, 3.0, int(slow.sum()))
        out.append(s.tolist())
    return out


def trial(rng: np.random.Generator, grid: np.ndarray, scenario: str, runs: int, noise: float,
          ratio: float) -> dict[str, bool]:
    truth, planted = make_curve(rng, grid, scenario)
    intervals = detect(grid, sample(rng, truth, runs, noise), ratio=ratio)
    hit = exact = False
    false_pos = False
    for iv in intervals:
        i0 = int(np.searchsorted(grid, iv.start))
        i1 = int(np.searchsorted(grid, iv.end))
        if planted and i0 <= planted[1] and i1 >= planted[0]:
            hit = True
            exact |= (i0, i1) == planted
        else:
            false_pos = True
    return {"detected": hit, "exact": exact, "false_positive": false_pos}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=400, help="trials per scenario and noise")
    ap.add_argument("--points", type=int, default=32, help="grid points")
    ap.add_argument("--runs", type=int, default=10, help="samples per point")
    ap.add_argument("--noise", default="0.05,0.15", help="log-normal sigmas, comma-separated")
    ap.add_argument("--ratio", type=float, default=DEFAULT_RATIO)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    grid = np.arange(1, args.points + 1, dtype=float) * 8
    noises = [float(v) for v in args.noise.split(",")]
    started = time.time()
    rows = []
    for noise in noises:
        for scenario in SCENARIOS:
            rng = np.random.default_rng([args.seed, int(noise * 1000), SCENARIOS.index(scenario)])
            res = [trial(rng, grid, scenario, args.runs, noise, args.ratio)
                   for _ in range(args.trials)]
            n = len(res)
            rows.append({"scenario": scenario, "noise": noise, "trials": n,
                         "detected": sum(r["detected"] for r in res) / n,
                         "exact": sum(r["exact"] for r in res) / n,
                         "false_positive": sum(r["false_positive"] for r in res) / n})
    print(f"detect(ratio={args.ratio:g}), {args.points} points x {args.runs} runs, "
          f"{args.trials} trials per row ({time.time() - started:.0f} s)\n")
    print("| scenario | noise sigma | detected | exact edges | trials with a false positive |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        planted = not r["scenario"].startswith(("smooth", "pure"))
        det = f"{r['detected']:.1%}" if planted else "-"
        ex = f"{r['exact']:.1%}" if planted else "-"
        print(f"| {r['scenario']} | {r['noise']:g} | {det} | {ex} | {r['false_positive']:.1%} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "command": "python scripts/bench_detect.py " + " ".join(argv or sys.argv[1:]),
            "ratio": args.ratio, "points": args.points, "runs": args.runs,
            "trials": args.trials, "seed": args.seed, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
