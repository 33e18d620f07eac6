"""One native:cuda paged_sdpa shape, checked, then run a few times for `ncu` to profile
(scripts/device_cuda.sh ncu, scripts/device_ab.sh):

    python3 scripts/ncu_case.py [CTX BATCH [SPEC]]

CTX/BATCH default to 32768/4; SPEC to native:cuda (a variant such as
'native:cuda[combine=last]' profiles that variant). Hq 32, Hkv 8, D 128, fp16, NSHD, block 16,
reverse placement. The output is checked against the float64 oracle before the profiled runs."""

from __future__ import annotations

import sys

from kvmicro.backends.registry import get_backend
from kvmicro.check import compare
from kvmicro.workload import Case, materialize

ctx, batch = (int(x) for x in (sys.argv[1:3] if len(sys.argv) > 2 else (32768, 4)))
spec = sys.argv[3] if len(sys.argv) > 3 else "native:cuda"
case = Case(op="paged_sdpa", backend=spec, batch=batch, q_heads=32, kv_heads=8,
            head_dim=128, ctx=ctx, block_size=16, layout="NSHD", placement="reverse",
            dtype="float16")
data = materialize(case)
prepared = get_backend(spec).prepare(case, data)
print(prepared.kernel)
prepared.run()
prepared.sync()
checked = compare(case, data, prepared.output())
print(checked)
if not checked.passed:
    sys.exit(f"{spec} {ctx}/{batch}: the oracle check failed, nothing to profile")
for _ in range(4):
    prepared.run()
prepared.sync()
