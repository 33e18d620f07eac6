#!/usr/bin/env python3
"""The loops of paged attention kernels in a `cuobjdump -sass` listing (scripts/device_ab.sh and
device_combine_last.sh run it on the GPU machine). A backward branch at address X to T < X
closes a loop of (X - T) / 16 + 1 instructions; for the three largest of each kernel it counts
global loads (LDG, LDGSTS), tensor-core mmas (HMMA) and float ops (FFMA, FMUL, MUFU) in that
address range. The range can also hold code that runs once (the compiler lays blocks out as it
likes), so these are counts of the listing, not of what runs: ncu's instruction counts say that.
The main loop of a tensor-core kernel is the smallest such range that holds all its HMMA.

    python3 scripts/sass_loops.py SASS.txt PATTERN...   (kernels naming a PATTERN and PagedSrc)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

FUNCTION = re.compile(r"\s*Function : (\S+)")
INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")
BRANCH_TARGET = re.compile(r"BRA\S*\s.*?0x([0-9a-f]+)")


def main_loop(listing: list[tuple[int, str]]) -> tuple[int, str, str] | None:
    """(instructions, from, to) of the smallest backward-branch range holding every HMMA of the
    kernel: a tensor-core kernel's main loop (None without HMMA)."""
    hmma = sum("HMMA" in x for _, x in listing)
    best = None
    for addr, text in listing:
        target = BRANCH_TARGET.search(text)
        if not hmma or not target or int(target.group(1), 16) >= addr:
            continue
        start = int(target.group(1), 16)
        if sum("HMMA" in x for a, x in listing if start <= a <= addr) == hmma:
            span = (addr - start) // 16 + 1
            if best is None or span < best[0]:
                best = (span, hex(start), hex(addr))
    return best


def loops(listing: list[tuple[int, str]]) -> list[tuple[int, int, int, int]]:
    """(instructions, global loads, HMMA, float ops) of each backward branch's range."""
    found = []
    for addr, text in listing:
        target = BRANCH_TARGET.search(text)
        if not target or int(target.group(1), 16) >= addr:
            continue
        start = int(target.group(1), 16)
        body = [x for a, x in listing if start <= a <= addr]
        found.append(((addr - start) // 16 + 1,
                      sum("LDG" in x for x in body),  # LDG and LDGSTS
                      sum("HMMA" in x for x in body),
                      sum(any(op in x for op in ("FFMA", "FMUL", "MUFU")) for x in body)))
    return sorted(found, reverse=True)[:3]


def kernels(path: str, keep: Callable[[str], bool]) -> dict[str, list[tuple[int, str]]]:
    """The (address, instruction) listing of every function of a `cuobjdump -sass` file whose
    name ``keep`` accepts."""
    out: dict[str, list[tuple[int, str]]] = {}
    name = None
    with open(path, errors="replace") as listing:
        for line in listing:
            m = FUNCTION.match(line)
            if m:
                name = m.group(1) if keep(m.group(1)) else None
                if name:
                    out[name] = []
                continue
            m = INSTRUCTION.match(line)
            if m and name:
                out[name].append((int(m.group(1), 16), m.group(2)))
    return out


def paged_kernels(path: str, patterns: list[str]) -> dict[str, list[tuple[int, str]]]:
    """The paged (PagedSrc) kernels whose name holds one of ``patterns``."""
    return kernels(path, lambda n: "PagedSrc" in n and any(p in n for p in patterns))


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    for name, listing in sorted(paged_kernels(argv[0], argv[1:]).items()):
        print(f"{len(listing):6d} instr; largest loops (instr, loads, HMMA, fp): "
              f"{loops(listing)}; main loop (instr, from, to): {main_loop(listing)}  "
              f"{name[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
