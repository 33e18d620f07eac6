"""native:cuda paged_sdpa shapes, each checked, then run a few times for `ncu` to profile
(scripts/device_cuda.sh ncu, scripts/device_ab.sh, scripts/device_ncu_table.sh):

    python3 scripts/ncu_case.py [CTX BATCH [SPEC]]
    python3 scripts/ncu_case.py --shape 1024/1 --shape 32768/4 --spec native:cuda \
        --spec 'native:cuda[kernel=bulk]' [--runs 4]

CTX/BATCH default to 32768/4; SPEC to native:cuda (a variant such as
'native:cuda[combine=last]' profiles that variant). With --shape/--spec every spec runs at every
shape, shapes outermost. Hq 32, Hkv 8, D 128, fp16, NSHD, block 16, reverse placement. Each
output is checked against the float64 oracle before its profiled runs; before them the script
prints `profile: SPEC CTX/BATCH RUNS KERNEL`, so a profile's launches can be matched to their
case in order (each run launches the split kernel, then the combine kernel where there are
splits to merge)."""

from __future__ import annotations

import argparse
import sys

from kvmicro.runner import Runner
from kvmicro.workload import Case


def profile(runner: Runner, spec: str, ctx: int, batch: int, runs: int) -> None:
    case = Case(op="paged_sdpa", backend=spec, batch=batch, q_heads=32, kv_heads=8,
                head_dim=128, ctx=ctx, block_size=16, layout="NSHD", placement="reverse",
                dtype="float16")
    prepared, checked = runner.prepare_checked(case)  # the sweep's prepare, run and oracle check
    try:
        if not checked.passed:
            sys.exit(f"{spec} {ctx}/{batch}: the oracle check failed ({checked}), nothing to "
                     f"profile")
        print(f"profile: {spec} {ctx}/{batch} {runs} {prepared.kernel}", flush=True)
        for _ in range(runs):
            prepared.run()
        prepared.sync()
    finally:
        prepared.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("legacy", nargs="*", help="CTX BATCH [SPEC] (one case)")
    parser.add_argument("--shape", action="append", default=[], metavar="CTX/BATCH")
    parser.add_argument("--spec", action="append", default=[], metavar="SPEC")
    parser.add_argument("--runs", type=int, default=4, help="profiled runs per case")
    args = parser.parse_args(argv)
    if args.legacy and (args.shape or args.spec):
        parser.error("give CTX BATCH [SPEC] or --shape/--spec, not both")
    if args.legacy:
        if len(args.legacy) not in (2, 3):
            parser.error("positional arguments are CTX BATCH [SPEC]")
        args.shape = [f"{args.legacy[0]}/{args.legacy[1]}"]
        args.spec = args.legacy[2:]
    shapes = []
    for shape in args.shape or ["32768/4"]:
        ctx, sep, batch = shape.partition("/")
        if not sep or not ctx.isdigit() or not batch.isdigit():
            parser.error(f"--shape {shape!r} is not CTX/BATCH")
        shapes.append((int(ctx), int(batch)))
    runner = Runner()
    for ctx, batch in shapes:
        for spec in args.spec or ["native:cuda"]:
            profile(runner, spec, ctx, batch, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
