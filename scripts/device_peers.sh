#!/usr/bin/env bash
# On the GPU machine: install the carried peers, run the GPU tests of torch:cuda, cudnn:cuda and
# flashinfer:cuda, then a short bench (graph and device timers) of the three side by side.
#
#   here:    scripts/fetch_device_wheels.sh                 (fills the git-ignored .whl/)
#   device:  run(command="scripts/device_peers.sh", carry=[".whl"])
#
# Usage: scripts/device_peers.sh [all|tests|bench|gqa]   (default all; gqa compares torch:cuda's
# two ways of serving GQA, see torch_backend.py). Logs and bench.json go to
# $OUT (the device tool's folder) or /tmp/kvmicro-peers. PYTEST_K narrows the tests (pytest -k),
# BENCH_ONLY the bench rows (a substring of "backend op"), TEST_TIMEOUT / BENCH_TIMEOUT bound them.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_common.sh  # gpu_facts, build_native
what=${1:-all}
OUT=${OUT:-/tmp/kvmicro-peers}
mkdir -p "$OUT"
source scripts/device_site.sh
gpu_facts clocks.mem
python3 -c "import torch, cudnn, flashinfer.decode as d; from flashinfer.version import \
__version__ as v; print('torch', torch.__version__, 'cudnn', cudnn.backend_version(), \
'frontend', cudnn.__version__, 'flashinfer', v)"

status=0
if [ "$what" = all ] || [ "$what" = tests ]; then
    timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
        --durations=8 -k "${PYTEST_K:-}" tests/test_torch_backend.py tests/test_peers.py -rs 2>&1 | tee "$OUT/tests.log" |
        grep -v -E "^(SKIPPED|tests/.*(PASSED|SKIPPED))" | tail -40
    status=${PIPESTATUS[0]}
fi

if [ "$what" = all ] || [ "$what" = bench ]; then
    timeout "${BENCH_TIMEOUT:-300}" python3 - "$OUT/bench.json" <<'EOF' 2>&1 | tee "$OUT/bench.log"
"""Hq 32, Hkv 8, D 128, float16 decode, block 16, reverse placement over a 2x pool. graph: k=20
calls captured once and replayed, median of 15 replays, time/20; device: one call between CUDA
events from an idle stream, median of 15. hot: the same buffers every call; cold: the graph cycles
through copies whose total exceeds 5x L2 (1024/1 only; at 32768/4 the working set is 10x L2)."""
import json, math, os, statistics, sys, time
import numpy as np
import kvmicro as kv
from kvmicro import oracle
from kvmicro.check import compare
from kvmicro.backends.cudnn_backend import CudnnBackend
from kvmicro.backends.flashinfer_backend import FlashInferBackend
from kvmicro.backends.torch_backend import TorchCudaBackend, cuda_bandwidth
from kvmicro.workload import Layout

torch_cuda, cudnn_b = TorchCudaBackend(), CudnnBackend()
fi_cc, fi_tc = FlashInferBackend(tensor_cores=False), FlashInferBackend(tensor_cores=True)
info = torch_cuda.device_info()
l2 = info.cache_bytes
bw = cuda_bandwidth(0)
print(f"{info.name}: L2 {l2 / 1e6:.0f} MB, {info.extra['sm_count']} SMs; read "
      f"{bw['read_gbps']:.0f} GB/s, copy {bw['copy_gbps']:.0f} GB/s ({bw['method']})")
rows = [
    ("torch:cuda", torch_cuda, "sdpa_contiguous", "NSHD"),
    ("cudnn:cuda", cudnn_b, "sdpa_contiguous", "NSHD"),
    ("cudnn:cuda", cudnn_b, "paged_sdpa", "NSHD"),
    ("cudnn:cuda", cudnn_b, "paged_sdpa", "NHSD"),
    ("flashinfer:cuda cuda-cores", fi_cc, "paged_sdpa", "NSHD"),
    ("flashinfer:cuda cuda-cores", fi_cc, "paged_sdpa", "NHSD"),
    ("flashinfer:cuda tensor-cores", fi_tc, "paged_sdpa", "NSHD"),
    ("flashinfer:cuda tensor-cores", fi_tc, "paged_sdpa", "NHSD"),
    ("torch:cuda", torch_cuda, "gather_sdpa", "NSHD"),
    ("torch:cuda", torch_cuda, "gather", "NSHD"),
    ("torch:cuda", torch_cuda, "append", "NSHD"),
    ("flashinfer:cuda", fi_cc, "append", "NSHD"),
]
only = os.environ.get("BENCH_ONLY", "")
rows = [r for r in rows if only in f"{r[0]} {r[2]}"]
results = {"device": info.name, "l2_bytes": l2, "bandwidth": bw, "rows": [],
           "torch_gqa": info.extra.get("gqa")}
print("torch:cuda GQA:", info.extra.get("gqa"))
for ctx, batch in ((1024, 1), (32768, 4)):
    base = kv.Case(op="paged_sdpa", backend="x", batch=batch, q_heads=32, kv_heads=8,
                   head_dim=128, ctx=ctx, block_size=16, layout="NSHD", placement="reverse",
                   dtype="float16", seed=1)
    t0 = time.time()
    nshd = kv.materialize(base)
    nhsd = dict(nshd)
    for key in ("k_pool", "v_pool"):
        nhsd[key] = Layout("NHSD").from_logical(Layout("NSHD").to_logical(nshd[key]))
    ref = oracle.run(base.with_(op="sdpa_contiguous"), nshd)
    print(f"\nctx {ctx} / batch {batch}: K+V {2 * batch * ctx * 8 * 128 * 2 / 1e6:.1f} MB "
          f"(inputs + reference in {time.time() - t0:.0f} s)")
    print(f"{'backend':30s} {'op':16s} {'layout':6s} {'graph hot':>10s} {'graph cold':>10s} "
          f"{'device':>9s} {'max err':>9s}")
    for label, backend, op, layout in rows:
        case = base.with_(op=op, layout=layout, backend=backend.name)
        arrays = nshd if layout == "NSHD" else nhsd
        if op == "append":
            arrays = kv.materialize(case)
        row = {"backend": label, "op": op, "layout": layout, "ctx": ctx, "batch": batch}
        try:
            backend.supports(case)
            prepared = backend.prepare(case, arrays)
            prepared.run()
            prepared.sync()
            out = prepared.output()
            if op in ("sdpa_contiguous", "gather_sdpa", "paged_sdpa"):
                row["max_err"] = float(np.abs(out.astype(np.float64) - ref).max())
            else:
                got = compare(case, arrays, out) if ctx <= 1024 else None
                row["max_err"] = got.max_abs_err if got else float("nan")
            row["graph_hot_us"] = statistics.median(prepared.graph_times(15, 20))
            row["device_us"] = statistics.median(prepared.device_times(15))
            prepared.release()
            if ctx <= 1024:  # cold: rotate copies past 5x L2 inside the graph
                touched = 2 * batch * ctx * 8 * 128 * 2  # K+V bytes one call reads
                copies = min(64, max(2, math.ceil(5 * l2 / touched)))
                cold = backend.prepare(case, arrays, copies=copies)
                row["graph_cold_us"] = statistics.median(cold.graph_times(15, copies))
                row["cold_copies"] = copies
                cold.release()
        except kv.Unsupported as exc:
            row["skipped"] = str(exc)
        except Exception as exc:  # report and go on: one failing row must not lose the rest
            row["error"] = f"{type(exc).__name__}: {exc}"
        results["rows"].append(row)
        fmt = lambda key: f"{row[key]:10.1f}" if key in row else f"{'-':>10s}"
        note = row.get("skipped") or row.get("error") or ""
        print(f"{label:30s} {op:16s} {layout:6s} {fmt('graph_hot_us')} {fmt('graph_cold_us')} "
              f"{fmt('device_us')[1:]} {row.get('max_err', float('nan')):9.2e} {note[:80]}")
json.dump(results, open(sys.argv[1], "w"), indent=1)
EOF
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "$what" = gqa ]; then  # torch:cuda decode GQA: enable_gqa vs folded heads, same data
    timeout "${BENCH_TIMEOUT:-300}" python3 - <<'EOF' 2>&1 | tee "$OUT/gqa.log"
import statistics, numpy as np, kvmicro as kv
from kvmicro.check import compare
from kvmicro.backends.torch_backend import TorchCudaBackend
backend, outs = TorchCudaBackend(), {}
for mode in ("native", "fold"):
    options = (("gqa", mode),)  # the case option (torch_backend.py), part of the record
    for op in ("sdpa_contiguous", "gather_sdpa"):  # ragged (masked), GQA group 7
        case = kv.Case(op=op, backend="torch:cuda", batch=3, q_heads=28, kv_heads=4,
                       head_dim=128, ctx=(37, 1300, 5), seed=3, options=options)
        arrays = kv.materialize(case)
        prepared = backend.prepare(case, arrays)
        prepared.run()
        prepared.sync()
        graph = statistics.median(prepared.graph_times(15, 20))
        print(mode, op, f"ragged: graph {graph:.1f} us,", compare(case, arrays, prepared.output()))
    for ctx, batch in ((1024, 1), (32768, 4)):
        rng = np.random.default_rng(0)
        normal = lambda *s: rng.standard_normal(s, dtype=np.float32).astype(np.float16)
        case = kv.Case(op="sdpa_contiguous", backend="torch:cuda", batch=batch, q_heads=32,
                       kv_heads=8, head_dim=128, ctx=ctx, options=options)
        arrays = dict(q=normal(batch, 32, 1, 128), k_dense=normal(batch, 8, ctx, 128),
                      v_dense=normal(batch, 8, ctx, 128), ctx=np.full(batch, ctx, np.int32))
        prepared = backend.prepare(case, arrays)
        prepared.run()
        prepared.sync()
        outs[mode, ctx] = prepared.output().astype(np.float32)
        graph = statistics.median(prepared.graph_times(15, 20))
        device = statistics.median(prepared.device_times(15))
        print(f"{mode} ctx {ctx} batch {batch}: graph {graph:.1f} us, device {device:.1f} us")
        prepared.release()
for ctx in (1024, 32768):
    print(ctx, "native vs fold max |diff|:",
          float(np.abs(outs["native", ctx] - outs["fold", ctx]).max()))
EOF
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
exit "$status"
