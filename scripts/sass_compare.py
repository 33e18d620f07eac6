#!/usr/bin/env python3
"""Two builds' attention kernels side by side: SASS instruction count and registers of every
kernel whose name holds "attention", from `cuobjdump -sass` and `cuobjdump -res-usage` of each
build's extension (scripts/device_ab.sh). Prints how many kernels keep their count and their
registers, then every kernel where either changed.

    python3 scripts/sass_compare.py A.sass B.sass A.res B.res
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sass_loops import kernels


def registers(path: str) -> dict[str, int]:
    """Registers per function from a `cuobjdump -res-usage` listing."""
    out: dict[str, int] = {}
    name = None
    with open(path, errors="replace") as listing:
        for line in listing:
            m = re.search(r"Function (\S+):", line)
            if m:
                name = m.group(1)
            m = re.search(r"REG:(\d+)", line)
            if m and name:
                out[name] = int(m.group(1))
    return out


def attention(name: str) -> bool:
    return "attention" in name


def canonical(name: str) -> str:
    """The kernel's name with the combine mode spelled as before it became an enum (the split
    kernels' last template argument was bool kLast, mangled Lb0E / Lb1E; now AttnCombine, mangled
    LNS_11AttnCombineE0E / 1E / 2E): builds on either side of that change then match by name."""
    return re.sub(r"LNS_11AttnCombineE([01])E", r"Lb\1E", name)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__)
        return 2
    a, b = ({canonical(k): v for k, v in kernels(p, attention).items()} for p in argv[:2])
    ra, rb = ({canonical(k): v for k, v in registers(p).items()} for p in argv[2:])
    same_count = sum(1 for k in a if k in b and len(b[k]) == len(a[k]))
    same_regs = sum(1 for k in ra if attention(k) and rb.get(k) == ra[k])
    print(f"attention kernels: A {len(a)}, B {len(b)}; same SASS instruction count: "
          f"{same_count}; same registers: {same_regs}")
    for k in sorted(a):
        nb = len(b[k]) if k in b else -1
        if nb != len(a[k]) or rb.get(k) != ra.get(k):
            print(f"  {len(a[k]):6d} -> {nb:6d} instr, {ra.get(k)} -> {rb.get(k)} regs  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
