"""What one streaming read of an op's K+V bytes costs per op in the graph timer, on this GPU:
the least any one-kernel paged decode op of that size can cost here (issue 21's byte floor).

The op's K+V bytes (Hq 32 / Hkv 8 / D 128 fp16 unless given: batch x ctx x kv heads x head_dim x
2 bytes x 2) are read by the 16-byte read kernel that measures the device's read ceiling
(cuda_bandwidth.cu), k of them captured in a CUDA graph and replayed between two events, as the
graph timer does with an op (docs/methodology.md). Hot: one buffer, so what fits in the L2 stays
there; cold: buffers totalling at least 5 L2s in rotation, as cold:rotate does.

    python3 scripts/read_floor.py [--shape CTX/BATCH ...] [--kv-heads 8] [--head-dim 128]

Prints per shape: the bytes, the floor at the measured read ceiling (bytes / ceiling), the read
kernel's median µs per op hot and cold (with the spread of the middle half of `--reps` replays),
and the floor + 3 µs target beside it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

SHAPES = ("1024/1", "4096/1", "4096/4", "16384/1", "16384/4", "32768/1", "32768/4")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", default=[], metavar="CTX/BATCH")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=200, help="reads per graph")
    parser.add_argument("--reps", type=int, default=21, help="graph replays per figure")
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)

    from kvmicro.backends.native import load_native

    native = load_native()
    if not native.build_info()["cuda"] or native.cuda_device_count() == 0:
        print("read_floor: needs a CUDA build of kvmicro._native and a GPU", file=sys.stderr)
        return 2
    info = native.cuda_device_info(args.index)
    ceiling = native.cuda_bandwidth(args.index)["read_gbps"]
    l2 = int(info["l2_bytes"])
    print(f"{info['name']}: L2 {l2 / 1e6:.0f} MB, read ceiling {ceiling:.0f} GB/s; graph of "
          f"k={args.k} reads, {args.reps} replays; µs per op, median [quartiles]")
    print(f"{'ctx/B':>8} {'MB':>7} {'floor':>7} {'target':>7} {'read hot':>20} "
          f"{'read cold (copies)':>25}")
    for shape in args.shape or SHAPES:
        ctx, _, batch = shape.partition("/")
        nbytes = int(batch) * int(ctx) * args.kv_heads * args.head_dim * 2 * 2
        floor = nbytes / (ceiling * 1e3)
        cells = []
        for copies in (1, max(2, math.ceil(5 * l2 / nbytes))):
            samples = native.cuda_read_floor(args.index, nbytes, copies, args.k, args.reps)
            q1, med, q3 = statistics.quantiles(samples, n=4)
            note = f" ({copies})" if copies > 1 else ""
            cells.append(f"{med:7.2f} [{q1:.2f}, {q3:.2f}]{note}")
        print(f"{shape:>8} {nbytes / 1e6:7.2f} {floor:7.2f} {floor + 3:7.2f} {cells[0]:>20} "
              f"{cells[1]:>25}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
