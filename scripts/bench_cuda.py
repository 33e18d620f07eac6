"""native:cuda benchmark for the device machine: ceilings, the issue-10 target shapes, layout /
block size / placement sweeps, split-count and combine-launch variants, append.

Every time is the C++ graph timer (k ops captured once, replayed; median of `--reps` samples of
replay/k) unless a column says `device` (per-call CUDA events). `hot` reuses one input set; `cold`
rotates input copies whose K/V total at least 5x the L2 inside the graph. Bytes are decimal
(1 GB = 1e9 B). Prints short tables last; `--json` writes every figure.

    PYTHONPATH=src python scripts/bench_cuda.py --json $OUT/bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

import kvmicro as kv
from kvmicro.backends.native import NativeCudaBackend, load_native
from kvmicro.backends.registry import get_backend
from kvmicro.dtypes import to_carrier
from kvmicro.workload import Case, Layout, block_table

# Issue 10's targets and FIELD.md's peer figures were measured on an H100: the table shows them
# only on an H100 (another chip has other floors; run scripts/device_sweep_peers.sh for peers).
TARGETS = {  # (ctx, batch) -> issue-10 target for native:cuda paged_sdpa, µs (graph, hot)
    (1024, 1): 6.0, (4096, 4): 27.0, (16384, 4): 93.0, (32768, 1): 48.0, (32768, 4): 180.0,
}
PEERS = {  # FIELD.md, same H100: (torch SDPA, cuDNN paged, FlashInfer paged), µs
    (1024, 1): (6.8, 7.9, 8.4), (4096, 4): (29.4, 30.7, 30.8), (16384, 4): (94.1, 95.2, 97.2),
    (32768, 1): (51.4, 52.9, 53.5), (32768, 4): (179.8, 181.5, 184.2),
}
# Attention kernel variants compared in the "kernels" section (environment knobs, docs/cuda.md).
KERNEL_VARIANTS = {
    "default": {},
    "mma": {"KVMICRO_CUDA_KERNEL": "mma"},
    "mma-no-prefetch": {"KVMICRO_CUDA_KERNEL": "mma", "KVMICRO_CUDA_L2_PREFETCH": "0"},
    "async2": {"KVMICRO_CUDA_KERNEL": "async"},
    "async3": {"KVMICRO_CUDA_KERNEL": "async", "KVMICRO_CUDA_STAGES": "3"},
    "simt": {"KVMICRO_CUDA_KERNEL": "simt"},
}
SHAPE = dict(q_heads=32, kv_heads=8, head_dim=128, dtype="float16", slack=2.0)


def log(*parts: Any) -> None:
    print(*parts, flush=True)


def kv_bytes(case: Case) -> int:
    return 2 * sum(case.ctx_list) * case.kv_heads * case.head_dim * case.itemsize


def fast_arrays(case: Case) -> dict[str, np.ndarray]:
    """Arrays shaped exactly like kv.materialize(case) with the same block table, but filled by
    tiling 1M random normals (non-zero, rounded to the dtype): timing needs real-looking data, not
    a fresh draw per element, and the large shapes would otherwise spend seconds in the RNG."""
    rng = np.random.default_rng(case.seed)
    B, Hq, Hkv, D, bs = case.batch, case.q_heads, case.kv_heads, case.head_dim, case.block_size
    num_blocks, _, table = block_table(case, rng)
    base = to_carrier(rng.standard_normal(1 << 20, dtype=np.float32), case.dtype)

    def filled(*shape: int) -> np.ndarray:
        return np.resize(base, math.prod(shape)).reshape(shape)

    pool_shape = Layout(case.layout).physical_shape(num_blocks, bs, Hkv, D)
    arrays = {
        "q": filled(B, Hq, 1, D), "k_pool": filled(*pool_shape), "v_pool": filled(*pool_shape),
        "block_table": table, "ctx": np.asarray(case.ctx_list, dtype=np.int32),
        "k_new": filled(B, Hkv, D), "v_new": filled(B, Hkv, D),
        "k_dense": None, "v_dense": None,
    }
    if case.op == "sdpa_contiguous":
        arrays["k_dense"] = filled(B, Hkv, case.max_ctx_pad, D)
        arrays["v_dense"] = filled(B, Hkv, case.max_ctx_pad, D)
    return arrays  # type: ignore[return-value]


@contextmanager
def env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Bench:
    def __init__(self, reps: int, k: int, l2_bytes: int) -> None:
        self.reps, self.k, self.l2 = reps, k, l2_bytes
        self.records: list[dict[str, Any]] = []

    def measure(self, case: Case, *, cache: str = "hot", timer: str = "graph",
                arrays: dict[str, np.ndarray] | None = None, label: str = "",
                backend: Any = None) -> dict[str, Any]:
        backend = backend or NativeCudaBackend()
        copies = 1
        if cache == "cold":
            copies = max(2, min(64, math.ceil(5 * self.l2 / max(kv_bytes(case), 1))))
        arrays = arrays if arrays is not None else fast_arrays(case)
        rec: dict[str, Any] = {"label": label, "backend": backend.name, **case.flat(),
                               "cache": cache, "timer": timer, "copies": copies}
        t0 = time.perf_counter()
        try:
            prepared = backend.prepare(case, arrays, copies=copies)
        except Exception as err:  # record and go on: one bad case must not end the run
            rec.update(status="error", reason=f"{type(err).__name__}: {err}")
            self.records.append(rec)
            log("  !", label, case.op, rec["reason"][:200])
            return rec
        try:
            if timer == "graph":
                k = max(self.k, copies)
                samples = prepared.graph_times(self.reps, k)
                rec["k"] = k
            else:
                prepared.run()
                prepared.sync()
                samples = prepared.device_times(self.reps, 2 * self.l2 if cache == "cold" else 0)
            rec["kernel"] = prepared.kernel
        except Exception as err:
            rec.update(status="error", reason=f"{type(err).__name__}: {err}")
            self.records.append(rec)
            log("  !", label, case.op, rec["reason"][:200])
            return rec
        finally:
            prepared.release()
        med = statistics.median(samples)
        rec.update(status="ok", samples_us=samples, median_us=med, min_us=min(samples),
                   max_us=max(samples), kv_bytes=kv_bytes(case),
                   gbps=kv_bytes(case) / (med * 1e-6) / 1e9,
                   prepare_s=round(time.perf_counter() - t0, 2))
        self.records.append(rec)
        log(f"  {label:<28} {case.op:<15} {case.layout} bs{case.block_size:<3} {case.placement:<10}"
            f" ctx {case.ctx!s:>6} B{case.batch} {cache:<4} {timer:<6} median {med:9.2f} us"
            f"  [{min(samples):.2f}, {max(samples):.2f}]  {rec['gbps']:7.0f} GB/s")
        return rec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--json", default="")
    parser.add_argument("--quick", action="store_true", help="targets only")
    parser.add_argument("--sections", default="targets,kernels,sweep,splits,other",
                        help="comma-separated: targets, kernels, sweep, splits, other")
    parser.add_argument("--budget", type=float, default=0.0,
                        help="seconds; later sections are skipped once it is spent (0 = none)")
    args = parser.parse_args()
    began = time.perf_counter()

    def time_left() -> bool:
        return not args.budget or time.perf_counter() - began < args.budget

    sections = set(args.sections.split(","))

    def want(section: str) -> bool:
        return section in sections and (section == "targets" or not args.quick) and time_left()

    native = load_native()
    info = native.cuda_device_info(0)
    log("device:", {k: info[k] for k in ("name", "sm_count", "l2_bytes", "clock_khz",
                                         "mem_clock_khz", "cc_major", "cc_minor",
                                         "driver_version", "runtime_version",
                                         "priority_least", "priority_greatest")})
    bw = dict(native.cuda_bandwidth(0))
    log("ceilings:", bw)
    bench = Bench(args.reps, args.k, int(info["l2_bytes"]))
    results: dict[str, Any] = {"device": info, "bandwidth": bw}

    def case(op: str, ctx: int, batch: int, **kw: Any) -> Case:
        fields = dict(SHAPE, op=op, backend="native:cuda", ctx=ctx, batch=batch,
                      block_size=16, layout="NSHD", placement="reverse", seed=1)
        fields.update(kw)
        return Case(**fields)

    table: list[dict[str, Any]] = []
    if want("targets"):
        # ---- the target shapes -------------------------------------------------------------------
        log("\n== targets (NSHD, block 16, reverse, slack 2)")
        torch_backend = None
        try:
            torch_backend = get_backend("torch:cuda")
            if not torch_backend.availability():
                torch_backend = None
        except Exception as err:
            log("  torch:cuda unavailable:", err)
        on_h100 = "H100" in str(info["name"])
        for (ctx, batch), target in TARGETS.items():
            row: dict[str, Any] = {"ctx": ctx, "batch": batch,
                                   "target": target if on_h100 else None}
            c = case("paged_sdpa", ctx, batch)
            arrays = fast_arrays(c)
            row["floor"] = kv_bytes(c) / (bw["read_gbps"] * 1e9) * 1e6
            row["paged_hot"] = bench.measure(c, arrays=arrays, label="paged hot").get("median_us")
            row["paged_cold"] = bench.measure(c, cache="cold", label="paged cold").get("median_us")
            row["paged_device"] = bench.measure(c, arrays=arrays, timer="device",
                                                label="paged device-timer").get("median_us")
            rec = bench.measure(c.with_(op="gather"), arrays=arrays, label="gather hot")
            row["gather"] = rec.get("median_us")
            # gather moves whole blocks: read + write of ctx_pad tokens
            moved = 2 * 2 * sum(c.ctx_pad) * c.kv_heads * c.head_dim * c.itemsize
            gbps = moved / (rec["median_us"] * 1e-6) / 1e9 if rec.get("median_us") else None
            row["gather_pct_copy"] = gbps / bw["copy_gbps"] * 100 if gbps else None
            row["gather_sdpa"] = bench.measure(c.with_(op="gather_sdpa"), arrays=arrays,
                                               label="gather_sdpa hot").get("median_us")
            del arrays
            cd = c.with_(op="sdpa_contiguous")
            row["contig"] = bench.measure(cd, label="sdpa_contiguous hot").get("median_us")
            if torch_backend is not None:
                ta = kv.materialize(cd) if ctx * batch <= 4096 else fast_arrays(cd)
                row["torch_sdpa"] = bench.measure(cd.with_(backend="torch:cuda"), arrays=ta,
                                                  backend=torch_backend,
                                                  label="torch sdpa hot").get("median_us")
                if (ctx, batch) == (32768, 4):
                    tg = c.with_(op="gather_sdpa", backend="torch:cuda")
                    row["torch_gather_sdpa"] = bench.measure(
                        tg, arrays=fast_arrays(tg), backend=torch_backend,
                        label="torch gather_sdpa hot").get("median_us")
            table.append(row)
        results["targets"] = table

    for batch in (1, 4) if "targets" in sections else ():
        c = case("append", 4096, batch)
        rec = bench.measure(c, label="append hot")
        results[f"append_b{batch}"] = rec.get("median_us")

    if want("kernels"):
        log("\n== attention kernel variants (docs/cuda.md knobs), paged_sdpa NSHD bs16 hot")
        kernels = []
        for ctx, batch, placement in ((1024, 1, "reverse"), (4096, 4, "reverse"),
                                      (16384, 4, "reverse"), (32768, 1, "reverse"),
                                      (32768, 4, "reverse"), (32768, 4, "random")):
            if not time_left():
                break
            c = case("paged_sdpa", ctx, batch, placement=placement)
            arrays = fast_arrays(c)
            for name, variant in KERNEL_VARIANTS.items():
                if name == "simt" and ctx * batch < 32768 * 4:
                    continue
                with env(**variant):
                    rec = bench.measure(c, arrays=arrays, label=f"kernel {name}")
                kernels.append({"ctx": ctx, "batch": batch, "placement": placement,
                                "kernel": name, "median_us": rec.get("median_us"),
                                "description": rec.get("kernel", "")})
        results["kernels"] = kernels

    if want("sweep"):
        # ---- layout x block size, and placement, at long contexts --------------------------
        log("\n== layouts x block size (reverse) and placements (NSHD, block 16)")
        sweep = []
        for ctx, batch in ((16384, 4), (32768, 4)):
            if not time_left():
                break
            for layout in ("NSHD", "HNSD", "NHSD"):
                for bs in (16, 32, 64):
                    rec = bench.measure(case("paged_sdpa", ctx, batch, layout=layout,
                                             block_size=bs), label=f"{layout} bs{bs}")
                    sweep.append(rec)
            for placement in ("contiguous", "random", "fragmented"):
                rec = bench.measure(case("paged_sdpa", ctx, batch, placement=placement),
                                    label=f"placement {placement}")
                sweep.append(rec)
        results["sweep"] = [{k: r.get(k) for k in ("ctx", "batch", "layout", "block_size",
                                                   "placement", "median_us", "gbps")}
                            for r in sweep]

    if want("splits"):
        # ---- split count and combine launch ------------------------------------------------
        log("\n== split count (forced) and PDL, paged_sdpa NSHD bs16 reverse hot")
        splits_rows = []
        for ctx, batch, options in ((1024, 1, (0, 2, 4, 8, 32)), (4096, 4, (0, 4, 8, 16)),
                                    (16384, 4, (0, 4, 8, 16)), (32768, 1, (0, 16, 32, 66)),
                                    (32768, 4, (0, 4, 8, 16))):
            if not time_left():
                break
            c = case("paged_sdpa", ctx, batch)
            arrays = fast_arrays(c)
            for splits in options:
                for pdl in ("1",):
                    with env(KVMICRO_CUDA_SPLITS=str(splits), KVMICRO_CUDA_PDL=pdl):
                        rec = bench.measure(c, arrays=arrays, label=f"splits {splits} pdl {pdl}")
                    splits_rows.append({"ctx": ctx, "batch": batch, "splits": splits,
                                        "pdl": pdl, "median_us": rec.get("median_us"),
                                        "kernel": rec.get("kernel", "")})
        results["splits"] = splits_rows

    if want("other"):
        # ---- other dtypes / head dims at one long shape --------------------------------------
        log("\n== dtypes and head dims (16384/4, NSHD, bs16)")
        other = []
        for dtype in ("bfloat16", "float32"):
            other.append(bench.measure(case("paged_sdpa", 16384, 4, dtype=dtype),
                                       label=dtype))
        for d, hq, hkv in ((64, 32, 8), (256, 16, 4), (128, 28, 4), (128, 32, 32)):
            other.append(bench.measure(case("paged_sdpa", 16384, 4, head_dim=d, q_heads=hq,
                                            kv_heads=hkv), label=f"D{d} {hq}:{hkv}"))
        other.append(bench.measure(case("paged_sdpa", 16384, 4, layout="SDNH"),
                                   label="strided SDNH"))
        results["other"] = [{k: r.get(k) for k in ("label", "dtype", "head_dim", "q_heads",
                                                   "kv_heads", "layout", "median_us", "gbps")}
                            for r in other]

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"results": results, "records": bench.records}, f, indent=1, default=str)

    # ---- short tables last (the device tool returns the tail) ----------------------------------
    read, copy = bw["read_gbps"], bw["copy_gbps"]
    log(f"\nceilings: read {read:.0f} GB/s, copy {copy:.0f} GB/s (memcpy {bw['memcpy_gbps']:.0f},"
        f" kernel {bw['copy_kernel_gbps']:.0f})")
    if results.get("sweep"):
        log("\nlayout x block / placement (paged_sdpa, µs)")
        for r in results["sweep"]:
            log(f"  {r['ctx']:>6}/{r['batch']} {r['layout']} bs{r['block_size']:<3} "
                f"{r['placement']:<10} {r['median_us'] or float('nan'):8.2f}")
    if results.get("splits"):
        log("\nsplits (µs): " + "; ".join(
            f"{r['ctx']}/{r['batch']} s{r['splits']} p{r['pdl']} "
            f"{r['median_us'] or float('nan'):.2f}"
            for r in results["splits"]))
    if results.get("kernels"):
        log("\nkernels (µs): " + "; ".join(
            f"{r['ctx']}/{r['batch']} {r['placement'][:4]} {r['kernel']} "
            f"{r['median_us'] or float('nan'):.2f}" for r in results["kernels"]))
    log(f"\nappend: B=1 {results.get('append_b1') or float('nan'):.2f} us, "
        f"B=4 {results.get('append_b4') or float('nan'):.2f} us (graph, hot)")

    def f(x: Any) -> str:
        return f"{x:7.1f}" if isinstance(x, (int, float)) else "    n/a"

    log("\nctx/B    floor  paged  cold  device target | contig torchSDPA cuDNN* FI*  | gather %copy"
        " g+sdpa torch g+s")
    for r in table:
        peers = PEERS[(r["ctx"], r["batch"])] if r["target"] is not None else (None,) * 3
        log(f"{r['ctx']:>5}/{r['batch']} {f(r['floor'])}{f(r['paged_hot'])}{f(r['paged_cold'])}"
            f"{f(r['paged_device'])}{f(r['target'])} |{f(r['contig'])}{f(r.get('torch_sdpa'))}"
            f"{f(peers[1])}{f(peers[2])} |{f(r['gather'])}{f(r['gather_pct_copy'])}"
            f"{f(r['gather_sdpa'])}{f(r.get('torch_gather_sdpa'))}")
    log("(* cuDNN / FlashInfer: FIELD.md figures from an earlier run on an H100, not this run; "
        "target and * columns are shown on an H100 only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
