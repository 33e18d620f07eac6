#!/usr/bin/env python3
"""How much of the drift between two identical sweeps is the host's common mode? For every pair
of sweeps of a calibration run (scripts/calibrate_verdicts.py) and every case: the log ratio of
the case's medians between the two sweeps, against the median log ratio of the other cases of
the same ctx/batch and of all other cases (what a probe of the host's speed would see). Prints
the false faster/slower calls with those figures, the correlations, and the spread of the log
ratios before and after subtracting the common mode (docs/methodology.md, Calibration).

    python3 scripts/across_common_mode.py results/calibration-paired2 results/calibration-paired3
"""

from __future__ import annotations

import glob
import itertools
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def runs(roots: list[str]) -> list[list[Path]]:
    """The sweeps of each calibration run (quiet and busy apart) under the roots, one level deep."""
    found = []
    for root in roots:
        for d in sorted({root, *glob.glob(f"{root}/*/")}):
            for label in ("quiet", "busy"):
                files = sorted(Path(d).glob(f"{label}-native-cpu-[0-9].jsonl"))
                if len(files) >= 2:
                    found.append(files)
    return found


def main(roots: list[str]) -> int:
    from kvmicro.record import record_key
    from kvmicro.results import read_results
    from kvmicro.verdict import compare_records

    rows = []
    for files in runs(roots):
        sweeps = [{record_key(r): r for r in read_results(f)[1]} for f in files]
        for base, new in itertools.combinations(sweeps, 2):
            keys = [k for k in new if k in base]
            lr = {k: math.log(new[k]["stats"]["median_us"] / base[k]["stats"]["median_us"])
                  for k in keys}
            for k in keys:
                b = base[k]
                same = [lr[o] for o in keys if o != k and base[o]["ctx"] == b["ctx"]
                        and base[o]["batch"] == b["batch"]]
                others = [lr[o] for o in keys if o != k]
                false = compare_records(new[k], base[k]).verdict in ("faster", "slower")
                rows.append((false, lr[k], float(np.median(same)), float(np.median(others)),
                             f"{b['op']} {b['ctx']}/{b['batch']} {b['layout']}"))
    if not rows:
        print("no calibration runs under", " ".join(roots))
        return 2
    print("false calls:", sum(r[0] for r in rows))
    for _, case, same, others, name in (r for r in rows if r[0]):
        print(f"  case log-ratio {case:+.3f}  same-size others {same:+.3f}  "
              f"all others {others:+.3f}  {name}")
    x, y, z = (np.array([r[i] for r in rows]) for i in (1, 2, 3))
    print(f"corr(case, same-size others) over all {len(rows)} pairs: "
          f"{np.corrcoef(x, y)[0, 1]:.3f}  corr(case, all others): {np.corrcoef(x, z)[0, 1]:.3f}")
    print(f"spread of case log-ratios: sd {x.std():.3f}  after subtracting same-size others: "
          f"{(x - y).std():.3f}  all others: {(x - z).std():.3f}")
    return 0


if __name__ == "__main__":
    try:
        import kvmicro  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main(sys.argv[1:] or ["results/calibration-paired2", "results/calibration-paired3"]))
