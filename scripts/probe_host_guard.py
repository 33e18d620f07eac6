#!/usr/bin/env python3
"""How the host-noise guard (src/kvmicro/harness/noise.py) treats busy-wait samples on this host:
for samples of 50 µs, 500 µs and 5 ms, one second each, how many it keeps and drops (by reason),
and the sample times' p50/p95/max among all samples and among the kept ones.

    python scripts/probe_host_guard.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kvmicro.harness.noise import HostGuard, host_load


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per sample length (1 s)")
    args = parser.parse_args()
    guard = HostGuard()
    if not guard.on:
        print(guard.why_off)
        return 1
    print("host:", host_load())
    for length in (50e-6, 500e-6, 5e-3):
        reasons: Counter[str] = Counter()
        every, kept = [], []
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            guard.begin()
            t0 = time.perf_counter()
            spin(length)
            took = (time.perf_counter() - t0) * 1e6
            why = guard.end()
            reasons[why or "kept"] += 1
            every.append(took)
            if not why:
                kept.append(took)
        a = np.array(every)
        line = (f"{length * 1e6:6.0f} µs: {dict(reasons)}; all p50 {np.median(a):.1f} "
                f"p95 {np.percentile(a, 95):.1f} max {a.max():.0f} µs")
        if kept:
            k = np.array(kept)
            line += f"; kept p95 {np.percentile(k, 95):.1f} max {k.max():.0f} µs"
        print(line)
    print("guard:", guard.summary())
    guard.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
