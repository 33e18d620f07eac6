"""A reduced native:cuda matrix for compute-sanitizer (memcheck, racecheck, initcheck, synccheck):
every op over the kernel variants that matter (tensor-core and SIMT attention, 16-byte and strided
paths, 1/4/8 q heads per block, two head tiles, one and many splits with and without programmatic
dependent launch, block sizes 1/7/16/128, three dtypes), each checked against the float64 oracle.
The combine=last variants (one launch, the last split block merges) run with the planner's split
count and with splits forced to 8 and 48, so short sequences leave most splits empty; the
combine=cluster variants (one launch, the splits merge in a thread block cluster through
distributed shared memory) with the planner's count and with 3 and 16 forced; pdl_entry (the
split kernel launched as a programmatic dependent of the kernel before it; the default, auto,
chooses early or off per plan) at exit, early and off,
and early under each one-launch combine mode, gather_sdpa included; spread (the split kernel's
shared memory padded to one even wave) alone, under pdl_entry=early and on the cp.async and SIMT
kernels; the bulk-copy kernel (kernel=bulk, sm_90+) at 2 and 3 stages, with one split and under
pdl_entry=off; schedule=steal (the cp.async kernel's warps claim tiles from a counter per
sequence and head group) with the planner's split count, 48 and 3 (pdl_entry=off). Exit 1 on a
mismatch.

    compute-sanitizer --tool memcheck --error-exitcode 3 python scripts/sanitize_cuda.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python scripts/sanitize_cuda.py \
        --only combine=last      # only the variants with that option (attention ops)
"""

from __future__ import annotations

import argparse
import sys

import kvmicro as kv
from kvmicro.backends.native import NativeCudaBackend
from kvmicro.check import compare
from kvmicro.errors import Unsupported
from kvmicro.workload import OPS, Case

SHAPES = [
    dict(batch=3, q_heads=8, kv_heads=2, head_dim=128, ctx=(37, 300, 5), block_size=16,
         layout="NSHD", placement="random", dtype="float16"),
    dict(batch=2, q_heads=7, kv_heads=1, head_dim=80, ctx=(9, 23), block_size=1,
         layout="HNSD", placement="reverse", dtype="bfloat16"),
    dict(batch=2, q_heads=4, kv_heads=4, head_dim=64, ctx=(130, 65), block_size=7,
         layout="SDNH", placement="fragmented", dtype="float32"),
    dict(batch=1, q_heads=32, kv_heads=2, head_dim=256, ctx=700, block_size=128,
         layout="NHSD", placement="random", dtype="float16"),
    dict(batch=2, q_heads=12, kv_heads=4, head_dim=96, ctx=(2000, 1), block_size=16,
         layout="NSHD", placement="reverse", dtype="bfloat16"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", metavar="KEY=VALUE", default=None,
                        help="run only the variants holding this option (on the attention ops), "
                             "or 'default': only the default options (every op)")
    args = parser.parse_args(argv)
    only = tuple(args.only.split("=", 1)) if args.only else None
    if only is not None and len(only) != 2 and args.only != "default":
        parser.error(f"--only {args.only!r} is not KEY=VALUE or default")
    failures = 0
    skipped = 0
    n = 0
    # Case options of native:cuda (docs/cuda.md): the default first (every op), then each variant
    # on the attention ops. A tensor-core kernel asked of a shape it cannot run is Unsupported.
    variants: tuple[tuple[tuple[str, str], ...], ...] = (
        (), (("pdl", "false"),), (("kernel", "mma"), ("l2_prefetch", "0")), (("kernel", "async"),),
        (("kernel", "async"), ("pdl", "false"), ("stages", "3")), (("kernel", "simt"),),
        (("combine", "last"),), (("combine", "last"), ("kernel", "mma"), ("splits", "8")),
        (("combine", "last"), ("kernel", "async"), ("splits", "48")),
        (("combine", "last"), ("kernel", "simt"), ("splits", "48")),
        (("combine", "cluster"),), (("combine", "cluster"), ("kernel", "mma"), ("splits", "16")),
        (("combine", "cluster"), ("kernel", "async"), ("splits", "3")),
        (("pdl_entry", "early"),), (("pdl_entry", "exit"),), (("pdl_entry", "off"),),
        (("combine", "last"), ("pdl_entry", "early")),
        (("combine", "cluster"), ("pdl_entry", "early")),
        (("spread", "true"),), (("pdl_entry", "early"), ("spread", "true")),
        (("kernel", "async"), ("spread", "true")),
        (("kernel", "simt"), ("splits", "8"), ("spread", "true")),
        (("kernel", "bulk"),), (("kernel", "bulk"), ("splits", "1"), ("stages", "3")),
        (("kernel", "bulk"), ("pdl_entry", "off")),
        (("kernel", "async"), ("schedule", "steal")),
        (("kernel", "async"), ("schedule", "steal"), ("splits", "48")),
        (("kernel", "async"), ("pdl_entry", "off"), ("schedule", "steal"), ("splits", "3")))
    if args.only == "default":
        variants = ((),)
    elif only is not None:
        variants = tuple(v for v in variants if only in v)
        if not variants:
            parser.error(f"--only {args.only}: no variant of this matrix has that option")
    for options in variants:
        for shape in SHAPES:
            for op in OPS:
                # pdl_entry also on gather_sdpa, where the kernel before the split kernel
                # (the gather) writes what it reads.
                attention = ("paged_sdpa", "sdpa_contiguous") + (
                    ("gather_sdpa",) if dict(options).get("pdl_entry") else ())
                if options and op not in attention:
                    continue
                case = Case(op=op, backend="native:cuda", seed=n, options=options, **shape)
                arrays = kv.materialize(case)
                try:
                    prepared = NativeCudaBackend().prepare(case, arrays, copies=2)
                except Unsupported as err:
                    skipped += 1
                    print("skip", op, dict(options), err, flush=True)
                    continue
                prepared.run()
                prepared.graph_times(1, 2)  # the captured path too
                prepared.sync()
                result = compare(case, arrays, prepared.output())
                prepared.release()
                n += 1
                if not result.passed:
                    failures += 1
                    print("MISMATCH", op, dict(options), shape, result, flush=True)
                else:  # progress, so a run cut short by a time limit shows how far it got
                    print("ok", n, op, dict(options), shape["head_dim"], shape["dtype"],
                          flush=True)
    print(f"sanitize_cuda: {n} cases, {failures} mismatches, {skipped} unsupported", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
