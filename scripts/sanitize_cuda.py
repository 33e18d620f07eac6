"""A reduced native:cuda matrix for compute-sanitizer (memcheck, racecheck, initcheck, synccheck):
every op over the kernel variants that matter (tensor-core and SIMT attention, 16-byte and strided
paths, 1/4/8 q heads per block, two head tiles, one and many splits with and without programmatic
dependent launch, block sizes 1/7/16/128, three dtypes), each checked against the float64 oracle.
Exit 1 on a mismatch.

    compute-sanitizer --tool memcheck --error-exitcode 3 python scripts/sanitize_cuda.py
"""

from __future__ import annotations

import os
import sys

import kvmicro as kv
from kvmicro.backends.native import NativeCudaBackend
from kvmicro.check import compare
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


def main() -> int:
    failures = 0
    n = 0
    # (PDL, kernel, stages, L2 prefetch): the default first (every op), then each variant on
    # the attention ops.
    variants = (("1", "", "2", "128"), ("0", "", "2", "128"), ("1", "mma", "2", "0"),
                ("1", "async", "2", "128"), ("0", "async", "3", "128"), ("1", "simt", "2", "128"))
    for pdl, kernel, stages, prefetch in variants:
        os.environ["KVMICRO_CUDA_PDL"] = pdl
        os.environ["KVMICRO_CUDA_KERNEL"] = kernel
        os.environ["KVMICRO_CUDA_STAGES"] = stages
        os.environ["KVMICRO_CUDA_L2_PREFETCH"] = prefetch
        for shape in SHAPES:
            for op in OPS:
                if (pdl, kernel, stages, prefetch) != variants[0] and op not in (
                        "paged_sdpa", "sdpa_contiguous"):
                    continue
                case = Case(op=op, backend="native:cuda", seed=n, **shape)
                arrays = kv.materialize(case)
                prepared = NativeCudaBackend().prepare(case, arrays, copies=2)
                prepared.run()
                prepared.graph_times(1, 2)  # the captured path too
                prepared.sync()
                result = compare(case, arrays, prepared.output())
                prepared.release()
                n += 1
                if not result.passed:
                    failures += 1
                    print("MISMATCH", op, shape, result, flush=True)
    print(f"sanitize_cuda: {n} cases, {failures} mismatches", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
