"""Where a native:cuda paged decode op's time goes, block by block (issue 21), from the timeline
probe: a diagnostic build whose split and combine blocks stamp the GPU's global timer and their
SM's cycle counter at fixed points (csrc/cuda/timeline.cuh). Never time with that build: its
stamps cost a little, so native:cuda is unavailable to sweeps there (build_info() says
`timeline: True`); only this script's backend instance reads it.

    KVMICRO_CUDA=ON scripts/dev-build.sh "$PWD/build/timeline" -DKVMICRO_TIMELINE=ON \\
        -DCMAKE_CUDA_ARCHITECTURES=90
    python3 scripts/timeline.py [--shape CTX/BATCH ...] [--spec SPEC ...] [--cache hot,cold] \
        [--raw ROWS.jsonl]
    python3 scripts/timeline.py --from-rows ROWS.jsonl[.gz]   # the same report, no GPU

Each case (Hq 32 / Hkv 8 / D 128 fp16, NSHD block 16, reverse placement unless given) is checked
against the float64 oracle, then timed as the graph timer does (k ops in a CUDA graph, `--reps`
replays; cold: the copies cold:rotate would take, at least one op per copy), and the table read
after the last replay holds the last op's stamps. Printed per case, in µs from the first split
block's entry: when the split blocks entered (dispatch), how long a block took from entry to its
slice (the context length read), to warp 0's first tile, through its main loop and to its exit
(median and max over blocks), when the last split block ended, when the combine blocks entered
and were released (after griddepcontrol.wait: the split grid complete and flushed), how long
they took from there to their statistics, their weighted sum and their exit, and when the last
one ended; beside them the graph timer's µs per op, whose excess over the span is the gap
between ops.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import re
import statistics
import sys
from typing import Any

POINTS = ("entry", "sliced", "first", "loop_end", "exit")
#: the rows of cuda_timeline(): the slot, the points in the global timer (ns), the SM, the points
#: in the SM's cycle counter
FIELDS = ("slot", *POINTS, "sm", *(f"{p}_cycles" for p in POINTS))


def _us(ns: float) -> float:
    return ns / 1000.0


def summarize(split: list[tuple[int, ...]], combine: list[tuple[int, ...]],
              splits: int = 1) -> dict[str, Any]:
    """The phases of one op from the probe's rows (FIELDS order; 0 where a point was not
    stamped); ``splits``: the split grid's x extent, so that rows with one slot // splits belong
    to one (batch entry, kv head x head tile). Positions (when blocks entered and ended) are µs
    of the global timer from the earliest split entry; phase lengths are per block, from its SM's
    cycle counter at the clock both counters agree on over the blocks that ran to their exit
    (median and max over the blocks that reached both ends of the phase)."""
    if not split:
        raise ValueError("no split block stamped: is this a KVMICRO_TIMELINE build, and "
                         "native:cuda?")
    col = {name: i for i, name in enumerate(FIELDS)}
    t0 = min(r[col["entry"]] for r in split)

    def spread(values: list[float]) -> dict[str, float] | None:
        if not values:
            return None
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}

    whole = [r for r in split if r[col["exit"]]]
    timer_ns = sum(r[col["exit"]] - r[col["entry"]] for r in whole)
    cycles = sum(r[col["exit_cycles"]] - r[col["entry_cycles"]] for r in whole)
    per_ns = cycles / timer_ns if timer_ns > 0 else math.nan

    def phase(rows: list[tuple[int, ...]], start: str, end: str) -> dict[str, float] | None:
        return spread([_us((r[col[f"{end}_cycles"]] - r[col[f"{start}_cycles"]]) / per_ns)
                       for r in rows if r[col[start]] and r[col[end]]])

    def at(rows: list[tuple[int, ...]], field: str) -> dict[str, float] | None:
        return spread([_us(r[col[field]] - t0) for r in rows if r[col[field]]])

    working = [r for r in split if r[col["sliced"]]]
    per_sm: dict[int, int] = {}
    for r in split:
        per_sm[r[col["sm"]]] = per_sm.get(r[col["sm"]], 0) + 1
    stamps = sorted({r[col[p]] for r in split + combine for p in POINTS if r[col[p]]})
    ticks = [b - a for a, b in itertools.pairwise(stamps)]
    out: dict[str, Any] = {
        "split_blocks": len(split),
        "working_blocks": len(working),
        "sms": len(per_sm),
        "most_blocks_per_sm": max(per_sm.values()),
        "clock_ghz": per_ns,  # SM cycles per ns
        "timer_step_ns": min(ticks) if ticks else math.nan,  # the finest step the stamps show
        "entry": at(split, "entry"),
        "to_slice": phase(working, "entry", "sliced"),
        "to_first_tile": phase(working, "sliced", "first"),
        "main_loop": phase(working, "first", "loop_end"),
        "to_exit": phase(working, "loop_end", "exit"),
        "split_exit": at(split, "exit"),
        "combine_blocks": len(combine),
    }
    # The tail: how much earlier the last split block would end if the blocks' work were
    # balanced within each (batch entry, kv head x head tile) (the latest unit mean of exits),
    # and across the whole grid (the mean exit).
    # Means of offsets from t0, not of the timer's values: those are ns since an epoch, past the
    # 2**53 a float holds exactly, and their mean would be off by a few hundred ns.
    units: dict[int, list[int]] = {}
    for r in whole:
        units.setdefault(r[col["slot"]] // max(splits, 1), []).append(r[col["exit"]] - t0)
    if whole:
        out["balanced_in_unit_exit"] = _us(max(statistics.fmean(v) for v in units.values()))
        out["balanced_exit"] = _us(statistics.fmean(r[col["exit"]] - t0 for r in whole))
    # A block's speed is its SM's: the blocks of one SM end close together (the median over SMs
    # of each SM's latest minus earliest exit), while the SMs' mean exits spread.
    by_sm: dict[int, list[int]] = {}
    for r in whole:
        by_sm.setdefault(r[col["sm"]], []).append(r[col["exit"]] - t0)
    gaps = [max(v) - min(v) for v in by_sm.values() if len(v) > 1]
    means = [statistics.fmean(v) for v in by_sm.values()]
    out["sm_exit_gap"] = _us(statistics.median(gaps)) if gaps else math.nan
    out["sm_mean_exit_spread"] = _us(max(means) - min(means)) if means else math.nan
    ends = [r[col["exit"]] for r in whole]
    if combine:
        out["combine_entry"] = at(combine, "entry")
        # The combine rows carry `released` (after griddepcontrol.wait) in the `sliced` field.
        out["combine_released"] = at(combine, "sliced")
        out["combine_exit"] = at(combine, "exit")
        # ... and `stats` (the splits' max and sum reduced) and `summed` (the weighted rows summed)
        # in `first` and `loop_end`: phase lengths in its SM's cycles, as the split blocks'
        out["combine_to_stats"] = phase(combine, "sliced", "first")
        out["combine_to_sum"] = phase(combine, "first", "loop_end")
        out["combine_to_exit"] = phase(combine, "loop_end", "exit")
        ends += [r[col["exit"]] for r in combine if r[col["exit"]]]
    out["span"] = _us(max(ends) - t0) if ends else math.nan
    return out


def summarize_case(split: list[tuple[int, ...]], combine: list[tuple[int, ...]],
                   kernel: str) -> dict[str, Any]:
    """summarize() with the split count the kernel's description (PreparedOp.kernel) names."""
    found = re.search(r"splits (\d+) x", kernel)
    return summarize(split, combine, int(found.group(1)) if found else 1)


def _cell(s: dict[str, float] | None, keys: tuple[str, ...] = ("median", "max")) -> str:
    return "-" if s is None else " / ".join(f"{s[k]:.2f}" for k in keys)


def report(title: str, graph_us: float, s: dict[str, Any]) -> str:
    lines = [f"{title}: graph timer {graph_us:.2f} µs/op; span of the last op {s['span']:.2f} µs "
             f"(the rest, {graph_us - s['span']:.2f} µs, lies between ops); "
             f"{s['split_blocks']} split blocks ({s['working_blocks']} with tokens) on "
             f"{s['sms']} SMs, at most {s['most_blocks_per_sm']} per SM; "
             f"{s['combine_blocks']} combine blocks; phases at {s['clock_ghz']:.3f} GHz (SM "
             f"cycles per global-timer ns), the timer's finest step here "
             f"{s['timer_step_ns']:.0f} ns",
             "  split blocks entered (min / median / max)   " +
             _cell(s["entry"], ("min", "median", "max")),
             "  entry -> slice (context length read)       " + _cell(s["to_slice"]),
             "  slice -> warp 0's first tile               " + _cell(s["to_first_tile"]),
             "  first tile -> main loop's end (all warps)  " + _cell(s["main_loop"]),
             "  loop end -> exit (merge, partial written)  " + _cell(s["to_exit"]),
             "  split blocks ended (min / median / max)    " +
             _cell(s["split_exit"], ("min", "median", "max"))]
    if "balanced_exit" in s:
        lines.append("  last split end if balanced in each unit / in the grid   "
                     f"{s['balanced_in_unit_exit']:.2f} / {s['balanced_exit']:.2f}")
    lines.append(f"  split blocks of one SM end {s['sm_exit_gap']:.2f} µs apart (median over SMs); "
                 f"the SMs' mean ends spread over {s['sm_mean_exit_spread']:.2f} µs")
    if s["combine_blocks"]:
        lines += ["  combine blocks entered (min / max)         " +
                  _cell(s["combine_entry"], ("min", "max")),
                  "  combine blocks released (min / max)        " +
                  _cell(s["combine_released"], ("min", "max")),
                  "  released -> statistics reduced             " + _cell(s["combine_to_stats"]),
                  "  statistics -> weighted rows summed         " + _cell(s["combine_to_sum"]),
                  "  summed -> exit (output written)            " + _cell(s["combine_to_exit"]),
                  "  combine blocks ended (min / max)           " +
                  _cell(s["combine_exit"], ("min", "max"))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", default=[], metavar="CTX/BATCH")
    parser.add_argument("--spec", action="append", default=[], metavar="SPEC")
    parser.add_argument("--cache", default="hot", help="hot, cold or hot,cold")
    parser.add_argument("--layout", default="NSHD")
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--placement", default="reverse")
    parser.add_argument("--k", type=int, default=50, help="ops per graph")
    parser.add_argument("--reps", type=int, default=5, help="graph replays")
    parser.add_argument("--raw", metavar="PATH",
                        help="also write each case's rows (FIELDS order) here, one JSON line each")
    parser.add_argument("--from-rows", metavar="PATH",
                        help="no GPU: summarize the rows a --raw run wrote (.jsonl or .jsonl.gz)")
    args = parser.parse_args(argv)
    if args.from_rows:
        opener = gzip.open if args.from_rows.endswith(".gz") else open
        with opener(args.from_rows, "rt") as f:
            for line in f:
                d = json.loads(line)
                s = summarize_case([tuple(r) for r in d["split"]],
                                   [tuple(r) for r in d["combine"]], d["kernel"])
                print(report(f"{d['spec']} {d['shape']} {d['cache']} ({d['kernel']})",
                             statistics.median(d["graph_us"]), s))
        return 0

    from kvmicro.backends.native import load_native
    from kvmicro.backends.registry import get_backend
    from kvmicro.derived import footprint_bytes, working_set_bytes
    from kvmicro.points import Point
    from kvmicro.runner import Runner
    from kvmicro.workload import Case

    native = load_native()
    info = native.build_info()
    if not info.get("cuda") or not info.get("timeline") or native.cuda_device_count() == 0:
        print("timeline: needs a CUDA GPU and an extension built with -DKVMICRO_TIMELINE=ON "
              f"(this one: cuda={info.get('cuda')}, timeline={info.get('timeline')})",
              file=sys.stderr)
        return 2
    runner = Runner()  # the sweep's cache policies and its checked prepare
    caches = [c.strip() for c in args.cache.split(",") if c.strip()]
    for c in caches:
        if c not in ("hot", "cold"):
            parser.error(f"--cache {c!r}: hot or cold")
    for shape in args.shape or ["1024/1", "16384/1", "32768/4"]:
        ctx, sep, batch = shape.partition("/")
        if not sep or not ctx.isdigit() or not batch.isdigit():
            parser.error(f"--shape {shape!r} is not CTX/BATCH")
        for spec in args.spec or ["native:cuda"]:
            case = Case(op="paged_sdpa", backend=spec, batch=int(batch), q_heads=32, kv_heads=8,
                        head_dim=128, ctx=int(ctx), block_size=args.block, layout=args.layout,
                        placement=args.placement, dtype="float16")
            get_backend(spec).timeline_probe = True  # unavailable to everything else
            for cache in caches:
                policy = runner.cache_policy(Point(case, "graph", cache))  # cold: cold:rotate
                copies = max(1, policy.copies_needed(working_set_bytes(case),
                                                     footprint_bytes(case)))
                # a graph of k ops replays copies 0 .. k-1: k >= copies keeps every op cold
                k = max(args.k, copies)
                prepared, checked = runner.prepare_checked(case, copies)
                try:
                    if not checked.passed:
                        sys.exit(f"{spec} {shape}: the oracle check failed ({checked})")
                    kernel = prepared.kernel
                    native.cuda_timeline_reset(0)
                    times = prepared.graph_times(args.reps, k, rotate=cache == "cold")
                    table = native.cuda_timeline(0)
                finally:
                    prepared.release()
                s = summarize_case(table["split"], table["combine"], kernel)
                if args.raw:
                    with open(args.raw, "a") as f:
                        f.write(json.dumps({"spec": spec, "shape": shape, "cache": cache,
                                            "kernel": kernel, "graph_us": times,
                                            "fields": FIELDS, "split": table["split"],
                                            "combine": table["combine"]}) + "\n")
                print(report(f"{spec} {shape} {case.layout} block {case.block_size} {cache} "
                             f"({kernel})", statistics.median(times), s), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
