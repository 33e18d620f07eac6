"""One native:cuda paged_sdpa shape (32768/4, Hq 32, Hkv 8, D 128, fp16, NSHD, block 16, reverse)
run a few times, for `ncu` to profile one launch of (scripts/device_cuda.sh ncu)."""

from __future__ import annotations

import sys

from kvmicro.backends.native import NativeCudaBackend
from kvmicro.workload import Case, materialize

ctx, batch = (int(x) for x in (sys.argv[1:3] if len(sys.argv) > 2 else (32768, 4)))
case = Case(op="paged_sdpa", backend="native:cuda", batch=batch, q_heads=32, kv_heads=8,
            head_dim=128, ctx=ctx, block_size=16, layout="NSHD", placement="reverse",
            dtype="float16")
prepared = NativeCudaBackend().prepare(case, materialize(case))
print(prepared.kernel)
for _ in range(4):
    prepared.run()
prepared.sync()
