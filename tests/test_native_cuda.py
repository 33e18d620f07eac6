"""native:cuda — kvmicro's CUDA kernels.

On a machine with a GPU: every op in every dtype matches the float64 oracle over the odd-shape
matrix and beyond it (head_dim 96, GQA groups wider than one thread block, block sizes 1/7/128,
many splits, every layout); the kernels really read through the block table; the split count, the
combine mode (a second kernel, with or without PDL, the last split block, or a thread block
cluster) and the stream
priority never change the answer; the device and graph timers return per-op samples. Without a
GPU (CI) only the module-level checks run: a CUDA build must load and say "no device" rather than
fail.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
from helpers import case_id, table_on_unused_blocks

import kvmicro as kv
from kvmicro.backends.base import run_once
from kvmicro.backends.native import NativeCudaBackend, load_native
from kvmicro.backends.nvml import sm_clock
from kvmicro.check import check_matrix, compare
from kvmicro.errors import InvalidCase, Unsupported
from kvmicro.workload import ATTENTION_OPS, OPS, Case, Layout


def _native_or_none() -> Any:
    try:
        return load_native()
    except ImportError:
        return None


NATIVE = _native_or_none()
HAS_CUDA_BUILD = bool(NATIVE is not None and NATIVE.build_info()["cuda"])
DEVICES = int(NATIVE.cuda_device_count()) if HAS_CUDA_BUILD else 0

needs_gpu = pytest.mark.skipif(DEVICES == 0,
                               reason="needs a CUDA build of kvmicro._native and a GPU")

MATRIX = [case.with_(backend="native:cuda") for case in check_matrix()]


def run_case(case: Case, arrays: dict[str, np.ndarray] | None = None, copies: int = 1,
             **backend_kw: Any) -> Any:
    arrays = kv.materialize(case) if arrays is None else arrays
    return run_once(NativeCudaBackend(**backend_kw).prepare(case, arrays, copies=copies))


def assert_matches(case: Case, arrays: dict[str, np.ndarray] | None = None, **kw: Any) -> Any:
    arrays = kv.materialize(case) if arrays is None else arrays
    out = run_case(case, arrays, **kw)
    result = compare(case, arrays, out)
    assert result.passed, f"{case_id(case)}: {result}"
    return out


# ---- without a GPU ------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA_BUILD, reason="this kvmicro._native was built without CUDA")
def test_cuda_build_loads_and_counts_devices() -> None:
    assert DEVICES >= 0  # a build with CUDA loads and answers, GPU or not
    if DEVICES == 0:
        with pytest.raises(Unsupported, match="no CUDA device"):
            NATIVE.cuda_device_info(0)
        availability = NativeCudaBackend().availability()
        assert not availability and "no CUDA device" in availability.reason


@pytest.mark.skipif(not HAS_CUDA_BUILD, reason="this kvmicro._native was built without CUDA")
def test_the_timeline_probe_is_off_in_a_default_build_and_says_how_to_turn_it_on() -> None:
    if NATIVE.build_info()["timeline"]:
        pytest.skip("this is a KVMICRO_TIMELINE build (scripts/timeline.py)")
    for call in (NATIVE.cuda_timeline, NATIVE.cuda_timeline_reset):
        with pytest.raises(Unsupported,
                           match=r"built without the timeline probe .*KVMICRO_TIMELINE=ON"):
            call(0)


def test_a_timeline_probe_build_is_unavailable_to_sweeps(monkeypatch: pytest.MonkeyPatch) -> None:
    class ProbeBuild:
        @staticmethod
        def build_info() -> dict[str, Any]:
            return {"cuda": True, "timeline": True}

        @staticmethod
        def cuda_device_count() -> int:
            return 1

    monkeypatch.setattr("kvmicro.backends.native._import_problem", lambda: None)
    monkeypatch.setattr("kvmicro.backends.native.load_native", lambda: ProbeBuild)
    refused = NativeCudaBackend().availability()
    assert not refused and "timeline probe's build" in refused.reason
    reader = NativeCudaBackend()
    reader.timeline_probe = True  # scripts/timeline.py
    assert reader.availability()


# ---- against the oracle --------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("case", MATRIX, ids=case_id)
def test_matches_the_oracle(case: Case) -> None:
    assert_matches(case)


# Shapes the shared matrix does not reach: head_dim 96; GQA groups of 2, 3, 5, 8 and 16 (two
# head tiles); block sizes 7 and 128; contexts long enough for many splits, ragged around them.
EXTRA = [
    Case(op=op, backend="native:cuda", batch=b, q_heads=hq, kv_heads=hkv, head_dim=d, ctx=ctx,
         block_size=bs, layout=layout, placement=placement, dtype=dtype, seed=seed)
    for op in ATTENTION_OPS
    for (b, hq, hkv, d, ctx, bs, layout, placement, dtype, seed) in [
        (2, 6, 3, 96, (77, 513), 16, "NSHD", "random", "float16", 1),
        (3, 6, 2, 96, (1, 40, 300), 7, "HNSD", "fragmented", "bfloat16", 2),
        (2, 10, 2, 64, (1500, 33), 32, "NHSD", "reverse", "float16", 3),
        (1, 16, 2, 128, 2049, 128, "NSHD", "random", "float32", 4),
        (2, 32, 2, 80, (700, 4099), 16, "NSHD", "fragmented", "float16", 5),
        (5, 8, 8, 256, (1, 2, 3, 500, 9000), 64, "HNSD", "reverse", "bfloat16", 6),
        (1, 4, 1, 128, 20000, 16, "NHSD", "random", "float16", 7),
        (2, 8, 4, 128, (3000, 17), 1, "SHND", "random", "float32", 8),
    ]
]


@needs_gpu
@pytest.mark.parametrize("case", EXTRA, ids=case_id)
def test_odd_shapes_match_the_oracle(case: Case) -> None:
    assert_matches(case)


@needs_gpu
@pytest.mark.parametrize("layout", ["NSHD", "HNSD", "NHSD", "SNHD", "DNSH", "SDHN"])
@pytest.mark.parametrize("op", ["gather", "append", "paged_sdpa"])
def test_every_layout(layout: str, op: str) -> None:
    case = Case(op=op, backend="native:cuda", batch=3, q_heads=12, kv_heads=3, head_dim=80,
                ctx=(19, 250, 64), block_size=16, layout=layout, placement="random",
                dtype="bfloat16", seed=21)
    assert_matches(case)


@needs_gpu
@pytest.mark.parametrize("splits", ["1", "3", "64"])
@pytest.mark.parametrize("pdl", ["false", "true"])
@pytest.mark.parametrize("min_chunk", ["64", "16"])
def test_split_count_and_combine_mode_do_not_change_the_answer(
        splits: str, pdl: str, min_chunk: str) -> None:
    case = Case(op="paged_sdpa", backend="native:cuda", batch=3, q_heads=28, kv_heads=4,
                head_dim=128, ctx=(1000, 3, 2500), block_size=16, placement="reverse",
                dtype="float32", seed=12,
                options=(("min_chunk", min_chunk), ("pdl", pdl), ("splits", splits)))
    kernel = kernel_of(case)
    assert f"splits {splits} x" in kernel or splits == "64"
    assert ("combine with PDL" in kernel) == (pdl == "true" and splits != "1")
    assert_matches(case)


@needs_gpu
@pytest.mark.parametrize("min_chunk", ["16", "64", "4096"])
@pytest.mark.parametrize("blocks_per_sm", ["1", "2", "4"])
def test_split_rule_knobs_do_not_change_the_answer(min_chunk: str, blocks_per_sm: str) -> None:
    case = Case(op="paged_sdpa", backend="native:cuda", batch=2, q_heads=16, kv_heads=2,
                head_dim=128, ctx=(9000, 300), block_size=16, placement="random",
                dtype="float16", seed=14,
                options=(("blocks_per_sm", blocks_per_sm), ("min_chunk", min_chunk)))
    assert_matches(case)
    simt = case.with_(dtype="float32")  # the SIMT rule reads min_chunk too
    assert_matches(simt)


@needs_gpu
def test_wrong_block_ids_give_a_wrong_answer() -> None:
    # Negative control: the kernels read through the table. Pointing it at other valid blocks
    # (the pool's unused ones) must change every op's result.
    for op in ("paged_sdpa", "gather", "gather_sdpa"):
        case = Case(op=op, backend="native:cuda", batch=2, q_heads=8, kv_heads=2, head_dim=64,
                    ctx=(64, 40), block_size=16, placement="contiguous", dtype="float32", seed=4)
        arrays = kv.materialize(case)
        wrong = table_on_unused_blocks(case, arrays)
        assert not compare(case, arrays, run_case(case, wrong)).passed
        assert compare(case, arrays, run_case(case, arrays)).passed


@needs_gpu
def test_results_are_bitwise_repeatable() -> None:
    # A moving result on the same inputs would be a race between threads or blocks.
    case = Case(op="paged_sdpa", backend="native:cuda", batch=4, q_heads=32, kv_heads=8,
                head_dim=128, ctx=(4096, 1, 333, 2048), block_size=16, placement="random",
                dtype="float16", seed=5)
    arrays = kv.materialize(case)
    prepared = NativeCudaBackend().prepare(case, arrays)
    outputs = []
    for _ in range(3):
        prepared.run()
        prepared.sync()
        outputs.append(prepared.output())
    prepared.release()
    for out in outputs[1:]:
        np.testing.assert_array_equal(out, outputs[0])
    assert compare(case, arrays, outputs[0]).passed


@needs_gpu
def test_gather_copies_whole_blocks() -> None:
    case = Case(op="gather", backend="native:cuda", batch=3, q_heads=4, kv_heads=2, head_dim=64,
                ctx=(5, 70, 33), block_size=16, layout="HNSD", placement="reverse",
                dtype="float16", seed=9)
    arrays = kv.materialize(case)
    k_dense, v_dense = run_case(case, arrays)
    for b, ctx in enumerate(case.ctx_list):
        copied = -(-ctx // case.block_size) * case.block_size
        np.testing.assert_array_equal(k_dense[b, :, :copied], arrays["k_dense"][b, :, :copied])
        np.testing.assert_array_equal(v_dense[b, :, :copied], arrays["v_dense"][b, :, :copied])


@needs_gpu
@pytest.mark.parametrize("layout", ["NSHD", "DHSN"])
def test_append_is_idempotent_and_touches_one_slot(layout: str) -> None:
    case = Case(op="append", backend="native:cuda", batch=3, q_heads=6, kv_heads=3, head_dim=64,
                ctx=(15, 16, 1), block_size=16, layout=layout, placement="random",
                dtype="float16", seed=1)
    arrays = kv.materialize(case)
    prepared = NativeCudaBackend().prepare(case, arrays)
    for _ in range(3):
        prepared.run()
    prepared.sync()
    k_pool, v_pool = prepared.output()
    prepared.release()
    assert compare(case, arrays, (k_pool, v_pool)).passed
    changed = Layout(layout).to_logical(k_pool != arrays["k_pool"]).any(axis=(2, 3))
    assert changed.sum() == case.batch  # one slot (all heads) per sequence, nothing else


# ---- host code: copies, priority, timers, device queries -----------------------------------------


@needs_gpu
@pytest.mark.parametrize("op", OPS)
def test_copies_timers_and_graphs_keep_the_answer(op: str) -> None:
    case = Case(op=op, backend="native:cuda", batch=2, q_heads=8, kv_heads=2, head_dim=128,
                ctx=(300, 129), block_size=16, placement="reverse", dtype="float16", seed=3)
    arrays = kv.materialize(case)
    prepared = NativeCudaBackend().prepare(case, arrays, copies=3)
    assert prepared.copies == 3 and prepared.timers == ("host", "batched", "device", "graph")
    device = prepared.device_times(5, flush_bytes=8 << 20)
    graph = prepared.graph_times(4, 7)  # 7 ops over 3 copies: not a multiple
    assert len(device) == 5 and all(0 < s < 1e5 for s in device)
    assert len(graph) == 4 and all(0 < s < 1e5 for s in graph)
    for copy in (2, 0, 1):
        prepared.select(copy)
        prepared.run()
        assert compare(case, arrays, prepared.output()).passed
    prepared.flush_cache(1 << 20)
    with pytest.raises(IndexError, match="copy 3 outside"):
        prepared.select(3)
    with pytest.raises(InvalidCase, match="reps 0"):
        prepared.device_times(0)
    with pytest.raises(InvalidCase, match="k 0"):
        prepared.graph_times(3, 0)
    prepared.release()


@needs_gpu
@pytest.mark.parametrize("priority", ["low", "normal", "high"])
def test_stream_priority_does_not_change_the_answer(priority: str) -> None:
    case = Case(op="paged_sdpa", backend="native:cuda", batch=2, q_heads=8, kv_heads=2,
                head_dim=64, ctx=(100, 900), dtype="bfloat16", seed=2)
    assert_matches(case.with_(options=(("priority", priority),)))


def kernel_of(case: Case) -> str:
    """What prepare says it chose for ``case`` (its options included)."""
    prepared = NativeCudaBackend().prepare(case, kv.materialize(case))
    try:
        return prepared.kernel
    finally:
        prepared.release()


@needs_gpu
def test_kernel_description_names_the_path() -> None:
    fast = Case(op="paged_sdpa", backend="native:cuda", batch=1, q_heads=32, kv_heads=8,
                head_dim=128, ctx=4096, layout="NSHD")
    kernel = kernel_of(fast)  # 2 tiles per warp per split: too few for the pipeline
    assert "tensor cores (register loads, L2 prefetch 128 B), 16-byte path" in kernel
    assert "8 q heads/block" in kernel
    long = kernel_of(fast.with_(ctx=32768))  # 16 tiles per warp per split
    assert "tensor cores (cp.async, 2 stages, L2 prefetch 128 B), 16-byte path" in long
    assert "SIMT, strided path" in kernel_of(fast.with_(layout="SDNH"))
    assert "SIMT, 16-byte path" in kernel_of(fast.with_(dtype="float32"))
    assert "SIMT" in kernel_of(fast.with_(head_dim=80))
    simt = fast.with_(options=(("kernel", "simt"),))
    assert "SIMT, 16-byte path" in kernel_of(simt) and "4 q heads/block" in kernel_of(simt)


# Tensor-core-eligible shapes, run on both attention kernels: each must match the oracle.
BOTH_KERNELS = [
    Case(op=op, backend="native:cuda", batch=b, q_heads=hq, kv_heads=hkv, head_dim=d, ctx=ctx,
         block_size=bs, layout=layout, placement="random", dtype=dtype, seed=13)
    for op in ATTENTION_OPS
    for (b, hq, hkv, d, ctx, bs, layout, dtype) in [
        (3, 32, 8, 128, (1000, 17, 4000), 16, "NSHD", "float16"),
        (2, 4, 4, 64, (63, 129), 1, "HNSD", "bfloat16"),
        (2, 48, 3, 96, (300, 2222), 32, "NHSD", "float16"),
        (1, 7, 1, 128, 4097, 64, "NSHD", "bfloat16"),
    ]
]


# The attention kernel variants (case options, docs/cuda.md) and what describe() says of each.
KERNEL_VARIANTS: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {
    "auto": ((), "tensor cores ("),
    "mma": ((("kernel", "mma"),), "tensor cores (register loads, L2 prefetch 128 B)"),
    "mma-no-prefetch": ((("kernel", "mma"), ("l2_prefetch", "0")),
                        "tensor cores (register loads), "),
    "async": ((("kernel", "async"),), "tensor cores (cp.async, 2 stages, L2 prefetch"),
    "async3": ((("kernel", "async"), ("stages", "3")),
               "tensor cores (cp.async, 3 stages, L2 prefetch"),
    "bulk": ((("kernel", "bulk"),), "tensor cores (bulk copies, 2 stages), "),
    "bulk3": ((("kernel", "bulk"), ("stages", "3")), "tensor cores (bulk copies, 3 stages), "),
    "simt": ((("kernel", "simt"),), "SIMT"),
}


def assert_runs_and_a_graph_keep_the_answer(case: Case, arrays: Any, prepared: Any,
                                            runs: int) -> None:
    """``runs`` runs in a row, then a graph of 7 ops over ``prepared``'s 2 copies: each output
    poisoned first and checked against the oracle after."""
    for repeat in range(runs):
        prepared.poison_outputs()
        prepared.run()
        assert compare(case, arrays, prepared.output()).passed, f"run {repeat}"
    for copy in (0, 1):
        prepared.select(copy)
        prepared.poison_outputs()
    assert len(prepared.graph_times(3, 7)) == 3
    for copy in (0, 1):
        prepared.select(copy)
        assert compare(case, arrays, prepared.output()).passed, f"graph, copy {copy}"


def with_variant(case: Case, variant: str, *extra: tuple[str, str]) -> tuple[Case, str]:
    """``case`` with the options of ``variant`` (plus ``extra``), and what describe() must say."""
    options, described = KERNEL_VARIANTS[variant]
    return case.with_(options=tuple(sorted(options + extra))), described


@needs_gpu
@pytest.mark.parametrize("variant", list(KERNEL_VARIANTS))
@pytest.mark.parametrize("case", BOTH_KERNELS, ids=case_id)
def test_every_attention_kernel_matches_the_oracle(case: Case, variant: str) -> None:
    case, described = with_variant(case, variant)
    assert described in kernel_of(case)
    assert_matches(case)


@needs_gpu
@pytest.mark.parametrize("kernel", ["mma", "async", "bulk"])
def test_a_tensor_core_kernel_is_never_silently_replaced(kernel: str) -> None:
    # float32, a strided layout, head_dim 80: the tensor-core kernels cannot run these; asking
    # for one is refused rather than recorded under a kernel that did not run.
    case = Case(op="paged_sdpa", backend="native:cuda", batch=1, q_heads=8, kv_heads=1,
                head_dim=128, ctx=100, dtype="float16", options=(("kernel", kernel),))
    for bad, why in ((case.with_(dtype="float32"), "this case is float32"),
                     (case.with_(layout="SDNH"), "D not innermost"),
                     (case.with_(head_dim=80), "head_dim 80")):
        with pytest.raises(Unsupported, match=f"option kernel={kernel} needs tensor cores.*{why}"):
            kernel_of(bad)


@needs_gpu
@pytest.mark.parametrize(("variant", "combine"), [
    (variant, combine) for variant in ("mma", "async", "simt", "bulk")
    for combine in ("separate", "last") if (variant, combine) != ("bulk", "last")])
@pytest.mark.parametrize("splits", ["0", "3", "64"])
def test_every_run_writes_the_whole_output(variant: str, splits: str, combine: str) -> None:
    # Poisoning the output before each run makes a result left over from an earlier run (a
    # split that wrote nothing, a combine that skipped a head) fail the check.
    case = Case(op="paged_sdpa", backend="native:cuda", batch=3, q_heads=16, kv_heads=2,
                head_dim=128, ctx=(2000, 33, 700), block_size=16, placement="random",
                dtype="float16", seed=21)
    case, _ = with_variant(case, variant, ("combine", combine), ("splits", splits))
    arrays = kv.materialize(case)
    prepared = NativeCudaBackend().prepare(case, arrays, copies=2)
    try:
        for repeat in range(3):
            prepared.graph_times(1, 3) if repeat == 1 else prepared.run()
            prepared.sync()
            prepared.poison_outputs()
            assert np.isnan(prepared.output()).all()
            prepared.run()
            assert compare(case, arrays, prepared.output()).passed, f"repeat {repeat}"
    finally:
        prepared.release()


@needs_gpu
def test_a_graph_without_rotation_runs_on_the_current_copy_only() -> None:
    case = Case(op="paged_sdpa", backend="native:cuda", batch=2, q_heads=8, kv_heads=2,
                head_dim=128, ctx=(300, 129), dtype="float16", seed=5)
    arrays = kv.materialize(case)
    prepared = NativeCudaBackend().prepare(case, arrays, copies=3)
    try:
        for copy in (0, 1, 2):
            prepared.select(copy)
            prepared.poison_outputs()
        prepared.select(1)
        prepared.graph_times(2, 5, rotate=False)
        for copy, written in ((0, False), (1, True), (2, False)):
            prepared.select(copy)
            out = prepared.output()
            assert compare(case, arrays, out).passed if written else np.isnan(out).all()
        prepared.graph_times(1, 3, rotate=True)  # cycles: every copy's output written
        for copy in (0, 2):
            prepared.select(copy)
            assert compare(case, arrays, prepared.output()).passed
    finally:
        prepared.release()


@needs_gpu
@pytest.mark.parametrize(("variant", "combine"), [
    (variant, combine) for variant in ("auto", "simt", "mma", "async", "bulk")
    for combine in ("separate", "last", "cluster")
    if (variant, combine) not in (("simt", "cluster"), ("bulk", "last"), ("bulk", "cluster"))])
@pytest.mark.parametrize("op", ["paged_sdpa", "sdpa_contiguous"])
def test_a_nan_in_one_key_row_poisons_exactly_the_heads_that_read_it(op: str, variant: str,
                                                                     combine: str) -> None:
    # As in the float64 oracle (docs/backends.md, the scale / NaN contract): the q heads of the kv
    # head whose row holds the NaN are NaN in that sequence; every other output matches.
    case = Case(op=op, backend="native:cuda", batch=2, q_heads=16, kv_heads=2, head_dim=128,
                ctx=(700, 90), block_size=16, dtype="float16", seed=11)
    case, _ = with_variant(case, variant, ("combine", combine), ("splits", "4"))
    arrays = kv.materialize(case)
    b, h, t = 0, 1, 333
    if op == "sdpa_contiguous":
        arrays["k_dense"] = arrays["k_dense"].copy()
        arrays["k_dense"][b, h, t, 5] = np.nan
    else:
        layout = Layout(case.layout)
        logical = layout.to_logical(arrays["k_pool"]).copy()
        logical[arrays["block_table"][b, t // case.block_size], t % case.block_size, h, 5] = np.nan
        arrays["k_pool"] = np.ascontiguousarray(layout.from_logical(logical))
    expected = kv.oracle.run(case, arrays)
    out = np.asarray(run_case(case, arrays), dtype=np.float64)
    assert np.isnan(expected[b, 8:16]).all()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    finite = ~np.isnan(expected)
    np.testing.assert_allclose(out[finite], expected[finite], rtol=2e-2, atol=2e-3)


@needs_gpu
def test_bad_kernel_options_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    case = Case(op="paged_sdpa", backend="native:cuda", batch=1, q_heads=8, kv_heads=1,
                head_dim=64, ctx=100, dtype="float16")
    for options, message in (((("l2_prefetch", "64"),), "option l2_prefetch value '64'"),
                             ((("kernel", "async"), ("stages", "5")), "option stages value '5'"),
                             ((("kernel", "fast"),), "option kernel value 'fast'")):
        with pytest.raises(InvalidCase, match=message):
            kernel_of(case.with_(options=options))
    # The environment variables of earlier versions choose nothing any more.
    monkeypatch.setenv("KVMICRO_CUDA_KERNEL", "simt")
    monkeypatch.setenv("KVMICRO_CUDA_SPLITS", "7")
    kernel = kernel_of(case)
    assert "tensor cores" in kernel and "splits 7 x" not in kernel


@needs_gpu
def test_unsupported_head_dim_and_decode_only() -> None:
    case = Case(op="paged_sdpa", backend="native:cuda", batch=1, q_heads=4, kv_heads=2,
                head_dim=72, ctx=64)
    with pytest.raises(Unsupported, match=r"\[paged_sdpa\] head_dim 72 .*64, 80, 96, 128, 256"):
        run_case(case)
    with pytest.raises(Unsupported, match="q_len"):
        kv.execute(case.with_(head_dim=64, q_len=2))
    # gather and append move bytes: any head_dim works
    assert_matches(case.with_(op="gather"))
    assert_matches(case.with_(op="append"))


@needs_gpu
def test_device_info_and_bandwidth() -> None:
    info = NATIVE.cuda_device_info(0)
    for key in ("name", "sm_count", "l2_bytes", "memory_bytes", "clock_khz", "mem_clock_khz",
                "bus_width", "cc_major", "cc_minor", "driver_version", "runtime_version",
                "priority_least", "priority_greatest", "pci_bus_id"):
        assert key in info
    assert info["sm_count"] > 0 and info["l2_bytes"] > 0 and info["cc_major"] >= 8
    assert info["priority_greatest"] <= info["priority_least"]
    with pytest.raises(InvalidCase, match=f"index {DEVICES} outside"):
        NATIVE.cuda_device_info(DEVICES)
    backend = NativeCudaBackend()
    device = backend.device_info()
    assert device.kind == "cuda" and device.cache_bytes == info["l2_bytes"]
    bw = backend.bandwidth()
    assert 100 < bw["read_gbps"] < 20000 and 100 < bw["copy_gbps"] < 20000


@needs_gpu
def test_the_throttle_guard_reads_this_gpus_sm_clock() -> None:
    pytest.importorskip("pynvml", reason="the throttle guard needs nvidia-ml-py")
    bus_id = NATIVE.cuda_device_info(0)["pci_bus_id"]
    assert NativeCudaBackend().device_info().extra["throttle_guard"] == \
        f"NVML SM clock of {bus_id}, max {sm_clock(bus_id).max_mhz} MHz"
    case = Case(op="paged_sdpa", backend="native:cuda", batch=4, q_heads=32, kv_heads=8,
                head_dim=128, ctx=8192, block_size=16, dtype="float16")
    prepared = NativeCudaBackend().prepare(case, kv.materialize(case))
    try:
        prepared.graph_times(3, 200)  # busy long enough for the clock to leave idle
        assert 0.3 < prepared.clock_fraction() <= 1.0
    finally:
        prepared.release()


@needs_gpu
def test_bad_block_id_is_refused_before_launch() -> None:
    case = Case(op="paged_sdpa", backend="native:cuda", batch=2, q_heads=4, kv_heads=2,
                head_dim=64, ctx=(40, 20), block_size=16)
    arrays = kv.materialize(case)
    arrays["block_table"] = arrays["block_table"].copy()
    arrays["block_table"][1, 0] = 9000
    with pytest.raises(InvalidCase, match=r"block id 9000 at table\[1\]\[0\]"):
        run_case(case, arrays)


# ---- combine=last: one launch, the last split block of a sequence merges ------------------------
#
# Every attention case of the shared odd-shape matrix (head_dim 64/80/128/256, GQA 1/4/7, ragged
# contexts that do not fill their last block, block size 1) and the extra shapes above, with the
# split count forced to 8 and 48: most splits of the short sequences hold no tokens (ctx 5 at
# 48 splits: one), so the arrival target differs per sequence and a wrong count either leaves an
# output unwritten (NaN: outputs are poisoned) or merges a partial that was never written.
COMBINE_LAST = [
    case.with_(options=(("combine", "last"), ("splits", splits)))
    for case in MATRIX if case.op in ATTENTION_OPS
    for splits in ("8", "48")
] + [case.with_(options=(("combine", "last"),)) for case in EXTRA]


def combine_last_id(case: Case) -> str:
    return f"{case_id(case)}-{dict(case.options).get('splits', 'auto')}"


@needs_gpu
@pytest.mark.parametrize("case", COMBINE_LAST, ids=combine_last_id)
def test_combine_by_the_last_block_matches_the_oracle(case: Case) -> None:
    assert_matches(case)


@needs_gpu
@pytest.mark.parametrize("variant", ["mma", "async", "simt"])
@pytest.mark.parametrize("case", BOTH_KERNELS, ids=case_id)
def test_combine_by_the_last_block_on_every_kernel(case: Case, variant: str) -> None:
    case, described = with_variant(case, variant, ("combine", "last"), ("splits", "48"))
    kernel = kernel_of(case)
    assert described in kernel and "combine by the last block (one launch)" in kernel
    assert "PDL" not in kernel  # nothing to overlap: one launch
    assert_matches(case)


# The two one-launch combine modes, the kernels each runs on, and the split counts to force.
ONE_LAUNCH = [("last", variant, splits) for variant in ("mma", "async", "simt")
              for splits in ("0", "2", "8", "48")] + [
    ("cluster", variant, splits) for variant in ("mma", "async") for splits in ("0", "2", "16")]


@needs_gpu
@pytest.mark.parametrize(("combine", "variant", "splits"), ONE_LAUNCH)
def test_one_launch_combine_writes_every_output_on_every_run(combine: str, variant: str,
                                                             splits: str) -> None:
    # Three runs in a row, then a graph of 7 ops over 2 copies, then a run after it, each checked
    # against the oracle after the output was poisoned, and bitwise equal run to run (the merge
    # order is fixed). combine=last: the arrival counters are zeroed once, at prepare, and the
    # last block of each launch resets its own: a counter left short or past its target makes
    # the next launch merge too early or never, so some output stays NaN or goes wrong.
    # combine=cluster: a block whose split holds no tokens must still join its cluster's barriers.
    case = Case(op="paged_sdpa", backend="native:cuda", batch=4, q_heads=28, kv_heads=4,
                head_dim=128, ctx=(2000, 33, 700, 1), block_size=16, placement="random",
                dtype="float16", seed=31)
    case, _ = with_variant(case, variant, ("combine", combine), ("splits", splits))
    arrays = kv.materialize(case)
    prepared = NativeCudaBackend().prepare(case, arrays, copies=2)
    try:
        outputs = []
        for repeat in range(3):
            prepared.poison_outputs()
            prepared.run()
            out = prepared.output()
            assert compare(case, arrays, out).passed, f"run {repeat}"
            outputs.append(out)
        for out in outputs[1:]:
            np.testing.assert_array_equal(out, outputs[0])  # which block is last never matters
        for copy in (0, 1):
            prepared.select(copy)
            prepared.poison_outputs()
        graph = prepared.graph_times(3, 7)  # replays of one captured graph, 7 ops over 2 copies
        assert len(graph) == 3 and all(0 < t < 1e5 for t in graph)
        for copy in (0, 1):
            prepared.select(copy)
            assert compare(case, arrays, prepared.output()).passed, f"graph, copy {copy}"
        prepared.select(0)
        prepared.poison_outputs()
        prepared.run()  # after the graph (combine=last: the counters are still at 0)
        np.testing.assert_array_equal(prepared.output(), outputs[0])
    finally:
        prepared.release()


@needs_gpu
@pytest.mark.parametrize(("entry", "combine"), [
    ("exit", "separate"), ("early", "separate"), ("early", "last"), ("early", "cluster")])
@pytest.mark.parametrize("op", ["paged_sdpa", "sdpa_contiguous", "gather_sdpa"])
def test_split_kernel_launched_under_pdl_after_the_previous_kernel_keeps_every_answer(
        op: str, entry: str, combine: str) -> None:
    # pdl_entry: the split kernel's blocks may be scheduled before the kernel ahead of it in the
    # stream ends (the gather of gather_sdpa, the previous op's combine or split in a graph), and
    # must wait for it before their first read. The first run after prepare reads a gather
    # buffer nothing has written yet; a graph of 7 ops over 2 copies chains split after combine.
    case = Case(op=op, backend="native:cuda", batch=3, q_heads=28, kv_heads=4, head_dim=128,
                ctx=(2000, 33, 700), block_size=16, placement="random", dtype="float16",
                seed=37, options=(("combine", combine), ("pdl_entry", entry)))
    described = "early" if entry == "early" else "at its exit"
    assert f"split kernel under PDL after the previous kernel (waits for it; {described})" \
        in kernel_of(case)
    off = kernel_of(case.with_(options=(("combine", combine), ("pdl_entry", "off"))))
    assert "split kernel under PDL" not in off
    arrays = kv.materialize(case)
    prepared = NativeCudaBackend().prepare(case, arrays, copies=2)
    try:
        assert_runs_and_a_graph_keep_the_answer(case, arrays, prepared, runs=3)
    finally:
        prepared.release()


@needs_gpu
def test_pdl_entry_auto_is_early_where_the_wave_cannot_be_unbalanced_and_off_elsewhere() -> None:
    # pdl_entry=auto: early where the split grid has no more blocks than SMs, or for the cp.async
    # kernel with its shared memory padded to one even wave; off for a wider register-load grid
    # and for the one-launch combine modes; off everywhere before sm_90 (no PDL).
    info = NATIVE.cuda_device_info(0)
    sms, pdl = info["sm_count"], info["cc_major"] >= 9
    wide = sms // 8 + 1  # splits x 8 kv heads: more blocks than SMs
    base = Case(op="paged_sdpa", backend="native:cuda", batch=1, q_heads=32, kv_heads=8,
                head_dim=128, ctx=wide * 256, block_size=16, dtype="float16", seed=43)
    early, padded = "split kernel under PDL after the previous kernel (waits for it; early)", \
        "(shared memory padded to"

    def described(**options: str) -> str:
        options.setdefault("pdl_entry", "auto")
        return kernel_of(base.with_(options=tuple(sorted(options.items()))))

    narrow = described(kernel="mma", splits="4")
    assert (early in narrow) == pdl and padded not in narrow
    register_loads = described(kernel="mma", splits=str(wide))
    assert "split kernel under PDL" not in register_loads and padded not in register_loads
    cp_async = described(kernel="async", splits=str(wide))
    assert (early in cp_async) == pdl and (padded in cp_async) == pdl
    assert "split kernel under PDL" not in described(combine="last")
    forced = described(kernel="mma", splits=str(wide), pdl_entry="early")
    assert (early in forced) == pdl and padded not in forced  # spread is not implied


@needs_gpu
@pytest.mark.parametrize(("kernel", "dtype"), [
    ("mma", "float16"), ("async", "bfloat16"), ("simt", "float32")])
@pytest.mark.parametrize("entry", ["off", "early"])
def test_spread_caps_the_split_blocks_per_sm_at_one_even_wave_and_keeps_every_answer(
        kernel: str, dtype: str, entry: str) -> None:
    # spread=true pads the split kernel's dynamic shared memory until no more than
    # ceil(blocks / SMs) of its blocks fit on an SM; the splits and the answers stay the same.
    # 8 splits x 4 kv heads x 2 sequences: one block per SM at most on any GPU this runs on.
    case = Case(op="paged_sdpa", backend="native:cuda", batch=2, q_heads=16, kv_heads=4,
                head_dim=128, ctx=(3000, 77), block_size=16, placement="random", dtype=dtype,
                seed=41, options=(("kernel", kernel), ("pdl_entry", entry), ("splits", "8")))
    plain = kernel_of(case)
    spread_case = case.with_(options=tuple(sorted((*case.options, ("spread", "true")))))
    spread = kernel_of(spread_case)
    shape = r"x (\d+) tile\(s\).*splits (\d+) x \d+ tokens \(tile \d+\), (\d+) blocks/SM"
    tiles, splits, per_sm = map(int, re.search(shape, plain).groups())
    padded = re.search(shape + r" \(shared memory padded to (\d+) B: one even wave\)", spread)
    assert padded, spread
    assert (int(padded[1]), int(padded[2])) == (tiles, splits)
    blocks = splits * case.kv_heads * tiles * case.batch
    wave = -(-blocks // NATIVE.cuda_device_info(0)["sm_count"])
    assert per_sm > wave, "the case must leave the plain plan more slots than one wave"
    assert int(padded[3]) == wave
    arrays = kv.materialize(spread_case)
    prepared = NativeCudaBackend().prepare(spread_case, arrays, copies=2)
    # A plain plan of the same kernel prepared after the padded one (as a sweep interleaves
    # them) must leave the kernel's shared-memory limit where the padded plan can still launch.
    NativeCudaBackend().prepare(case, kv.materialize(case)).release()
    try:
        assert_runs_and_a_graph_keep_the_answer(spread_case, arrays, prepared, runs=2)
    finally:
        prepared.release()


@needs_gpu
@pytest.mark.parametrize(("variant", "head_dim", "dtype"), [
    ("mma", 64, "float16"), ("simt", 80, "float32"), ("async", 64, "bfloat16")])
def test_combine_by_the_last_block_over_more_splits_than_one_weight_pass(
        variant: str, head_dim: int, dtype: str) -> None:
    # The last block stages the splits' weights in its merge buffer, 4 x head_dim per head at a
    # time (256 at head_dim 64, 320 for the SIMT kernel at 80): 300+ splits take two passes.
    case = Case(op="paged_sdpa", backend="native:cuda", batch=2, q_heads=8, kv_heads=1,
                head_dim=head_dim, ctx=(20000, 300), block_size=16, placement="random",
                dtype=dtype, seed=35)
    case, _ = with_variant(case, variant, ("combine", "last"), ("splits", "512"))
    kernel = kernel_of(case)
    splits = int(kernel.split("splits ")[1].split(" x")[0])
    assert splits > 4 * head_dim, kernel
    assert_matches(case)


@needs_gpu
@pytest.mark.parametrize(("combine", "described"), [("last", "combine by the last block"),
                                                    ("cluster", "combine in a cluster of ")])
@pytest.mark.parametrize("op", ["sdpa_contiguous", "gather_sdpa"])
def test_one_launch_combine_on_the_dense_ops(op: str, combine: str, described: str) -> None:
    case = Case(op=op, backend="native:cuda", batch=3, q_heads=32, kv_heads=8, head_dim=128,
                ctx=(4096, 17, 1500), block_size=16, placement="reverse", dtype="bfloat16",
                seed=33, options=(("combine", combine),))
    assert described in kernel_of(case)
    arrays = kv.materialize(case)
    prepared = NativeCudaBackend().prepare(case, arrays, copies=3)
    try:
        assert len(prepared.graph_times(2, 5)) == 2
        for copy in (0, 1, 2):
            prepared.select(copy)
            assert compare(case, arrays, prepared.output()).passed
    finally:
        prepared.release()


@needs_gpu
def test_combine_is_separate_unless_asked() -> None:
    case = Case(op="paged_sdpa", backend="native:cuda", batch=1, q_heads=32, kv_heads=8,
                head_dim=128, ctx=4096, block_size=16, dtype="float16")
    assert "combine with PDL" in kernel_of(case)
    assert "combine with PDL" in kernel_of(case.with_(options=(("combine", "separate"),)))
    last = kernel_of(case.with_(options=(("combine", "last"),)))
    assert "combine by the last block (one launch)" in last and "PDL" not in last
    cluster = kernel_of(case.with_(options=(("combine", "cluster"),)))
    assert "combine in a cluster of 16 blocks (one launch)" in cluster and "PDL" not in cluster
    with pytest.raises(InvalidCase, match="option combine value 'foo'"):
        kernel_of(case.with_(options=(("combine", "foo"),)))


# ---- combine=cluster: one launch, the splits of a sequence merge in a thread block cluster -------
#
# The tensor-core cases of the odd-shape matrix and of the extra shapes (head_dim 64/96/128, GQA
# 1-16, ragged contexts that do not fill their last block, block sizes 1/7/16/32/128), with the
# planner's split count and with 3 and 16 forced: at 16 most splits of the short sequences hold
# no tokens, and those blocks must still take part in their cluster's barriers and contribute
# nothing (a wrong empty state is NaN or a wrong weight; an unwritten output stays NaN).
def tensor_core_case(case: Case) -> bool:
    return (case.dtype in ("float16", "bfloat16") and case.head_dim in (64, 96, 128)
            and case.layout.endswith("D"))


COMBINE_CLUSTER = [
    case.with_(options=(("combine", "cluster"), ("splits", splits)))
    for case in MATRIX + EXTRA if case.op in ATTENTION_OPS and tensor_core_case(case)
    for splits in ("0", "3", "16")
]


@needs_gpu
@pytest.mark.parametrize("case", COMBINE_CLUSTER, ids=combine_last_id)
def test_combine_in_a_cluster_matches_the_oracle(case: Case) -> None:
    assert_matches(case)


@needs_gpu
@pytest.mark.parametrize("variant", ["mma", "async"])
@pytest.mark.parametrize("case", BOTH_KERNELS, ids=case_id)
def test_combine_in_a_cluster_on_both_tensor_core_kernels(case: Case, variant: str) -> None:
    case, described = with_variant(case, variant, ("combine", "cluster"), ("splits", "16"))
    kernel = kernel_of(case)
    assert described in kernel and "combine in a cluster of " in kernel
    assert "PDL" not in kernel  # nothing to overlap: one launch
    assert_matches(case)


@needs_gpu
def test_combine_in_a_cluster_is_refused_where_it_cannot_run() -> None:
    # The SIMT kernel has no cluster merge, and a cluster holds at most 16 blocks: asking for
    # either is refused by name, never run as something else.
    cluster = (("combine", "cluster"),)
    case = Case(op="paged_sdpa", backend="native:cuda", batch=1, q_heads=8, kv_heads=1,
                head_dim=128, ctx=4096, dtype="float16", options=cluster)
    assert "combine in a cluster of 16 blocks (one launch)" in kernel_of(case)
    for bad, why in ((case.with_(dtype="float32"), "this case is float32"),
                     (case.with_(layout="SDNH"), "D not innermost"),
                     (case.with_(head_dim=80), "head_dim 80"),
                     (case.with_(options=(("combine", "cluster"), ("kernel", "simt"))),
                      "kernel=simt")):
        only = "option combine=cluster runs on the tensor-core kernels only"
        with pytest.raises(Unsupported, match=f"{only}.*{why}"):
            kernel_of(bad)
    with pytest.raises(Unsupported, match="option splits=17 exceeds the 16 blocks a cluster holds"):
        kernel_of(case.with_(options=(("combine", "cluster"), ("splits", "17"))))


@needs_gpu
@pytest.mark.parametrize("variant", ["bulk", "bulk3"])
@pytest.mark.parametrize("splits", ["1", "0", "5"])
def test_the_bulk_pipeline_keeps_the_answer_through_many_barrier_phases(variant: str,
                                                                        splits: str) -> None:
    # Each warp's stage barriers complete one phase per tile: one split of 5000 tokens gives a
    # warp 79 tiles, so every barrier's parity flips dozens of times within a launch, and the
    # graph replays reuse the barriers of the launches before (initialised per launch). Ragged
    # contexts end mid-tile and mid-block; the 1-token sequence has one partial tile.
    case = Case(op="paged_sdpa", backend="native:cuda", batch=3, q_heads=12, kv_heads=3,
                head_dim=128, ctx=(5000, 1, 777), block_size=16, placement="random",
                dtype="bfloat16", seed=43)
    case, described = with_variant(case, variant, ("splits", splits))
    arrays = kv.materialize(case)
    prepared = NativeCudaBackend().prepare(case, arrays, copies=2)
    try:
        assert described in prepared.kernel
        assert_runs_and_a_graph_keep_the_answer(case, arrays, prepared, runs=3)
    finally:
        prepared.release()


@needs_gpu
def test_the_bulk_kernel_is_refused_under_a_one_launch_combine() -> None:
    case = Case(op="paged_sdpa", backend="native:cuda", batch=1, q_heads=8, kv_heads=1,
                head_dim=128, ctx=4096, dtype="float16")
    for combine in ("last", "cluster"):
        bad = case.with_(options=(("combine", combine), ("kernel", "bulk")))
        with pytest.raises(Unsupported, match=f"option kernel=bulk runs under combine=separate "
                                              f"only, not combine={combine}"):
            kernel_of(bad)


# ---- schedule=steal: the cp.async kernel's warps claim tiles past their first ------------------
#
# Head dims 64/96/128, GQA 1/4/7/16 (two head tiles), ragged contexts that do not fill their last
# block, a sequence of 1 and of 9 tokens beside longer ones (a unit whose blocks all get only
# fixed tiles), block size 1, three layouts and both 16-bit dtypes, at the planner's split count
# and 2, 8 and 48 forced: a tile claimed twice or never, or a key past the end read as real,
# gives a wrong answer.
STEAL = [
    Case(op=op, backend="native:cuda", batch=b, q_heads=hq, kv_heads=hkv, head_dim=d, ctx=ctx,
         block_size=bs, layout=layout, placement=placement, dtype=dtype, seed=seed,
         options=(("kernel", "async"), ("schedule", "steal"), ("splits", splits)))
    for op in ATTENTION_OPS
    for (b, hq, hkv, d, ctx, bs, layout, placement, dtype, seed) in [
        (3, 8, 2, 128, (37, 130, 5), 16, "NSHD", "random", "float16", 41),
        (3, 4, 4, 64, (9, 230, 1), 1, "HNSD", "fragmented", "bfloat16", 42),
        (2, 28, 4, 128, (2000, 333), 16, "NHSD", "reverse", "float16", 43),
        (2, 48, 3, 96, (300, 2222), 32, "NSHD", "random", "bfloat16", 44),
        (1, 7, 1, 128, 20000, 64, "NSHD", "random", "float16", 45),
    ]
    for splits in ("0", "2", "8", "48")
]


def steal_id(case: Case) -> str:
    return f"{case_id(case)}-{dict(case.options)['splits']}"


@needs_gpu
@pytest.mark.parametrize("case", STEAL, ids=steal_id)
def test_tiles_claimed_from_a_counter_match_the_oracle(case: Case) -> None:
    assert "(schedule=steal)" in kernel_of(case)
    assert_matches(case)


@needs_gpu
@pytest.mark.parametrize("pdl_entry", ["off", "exit", "early", "auto"])
@pytest.mark.parametrize("splits", ["0", "3", "48"])
def test_claim_counters_are_back_at_zero_for_every_run_and_graph_replay(pdl_entry: str,
                                                                         splits: str) -> None:
    # The counters are zeroed once at prepare and by each op's combine kernel after: one left
    # past zero makes the next op's warps skip tiles (a wrong answer), whether the next op
    # follows in stream order or under PDL, in a run or a graph over two copies.
    case = Case(op="paged_sdpa", backend="native:cuda", batch=4, q_heads=28, kv_heads=4,
                head_dim=128, ctx=(2000, 33, 700, 1), block_size=16, placement="random",
                dtype="float16", seed=51,
                options=(("kernel", "async"), ("pdl_entry", pdl_entry), ("schedule", "steal"),
                         ("splits", splits)))
    arrays = kv.materialize(case)
    prepared = NativeCudaBackend().prepare(case, arrays, copies=2)
    try:
        assert "(schedule=steal)" in prepared.kernel
        assert_runs_and_a_graph_keep_the_answer(case, arrays, prepared, runs=4)
        prepared.select(0)
        prepared.poison_outputs()
        prepared.run()  # after the graph
        assert compare(case, arrays, prepared.output()).passed
    finally:
        prepared.release()


@needs_gpu
def test_schedule_steal_runs_by_default_plan_at_long_contexts_and_is_refused_elsewhere() -> None:
    case = Case(op="paged_sdpa", backend="native:cuda", batch=1, q_heads=32, kv_heads=8,
                head_dim=128, ctx=16384, dtype="float16", options=(("schedule", "steal"),))
    described = kernel_of(case)  # kernel=auto picks the cp.async kernel here
    assert "tensor cores (cp.async, 2 stages" in described and "(schedule=steal)" in described
    assert "schedule=steal" not in kernel_of(case.with_(options=()))
    refused = [
        (case.with_(ctx=1024), "runs on the cp.async kernel only.*the register-load kernel"),
        (case.with_(options=(("kernel", "simt"), ("schedule", "steal"))),
         "runs on the cp.async kernel only.*the SIMT kernel"),
        (case.with_(options=(("kernel", "bulk"), ("schedule", "steal"))),
         "runs on the cp.async kernel only.*the bulk-copy kernel"),
        (case.with_(options=(("combine", "last"), ("schedule", "steal"))),
         "runs under combine=separate only .*not combine=last"),
        (case.with_(options=(("combine", "cluster"), ("schedule", "steal"))),
         "runs under combine=separate only .*not combine=cluster"),
        (case.with_(options=(("schedule", "steal"), ("stages", "3"))),
         "runs with stages=2 only, not stages=3"),
        (case.with_(options=(("kernel", "async"), ("schedule", "steal"), ("splits", "1"))),
         "needs more than one split"),
    ]
    for bad, why in refused:
        with pytest.raises(Unsupported, match=f"option schedule=steal {why}"):
            kernel_of(bad)


@needs_gpu
@pytest.mark.parametrize("ctx", [1024, 16384])
def test_the_timeline_probe_stamps_every_block_of_the_last_op_in_order(ctx: int) -> None:
    # scripts/timeline.py, on a build with -DKVMICRO_TIMELINE=ON.
    if not NATIVE.build_info()["timeline"]:
        pytest.skip("built without the timeline probe (-DKVMICRO_TIMELINE=ON)")
    case = Case(op="paged_sdpa", backend="native:cuda", batch=2, q_heads=32, kv_heads=8,
                head_dim=128, ctx=ctx, block_size=16, layout="NSHD", placement="reverse",
                dtype="float16")
    data = kv.materialize(case)
    backend = NativeCudaBackend()
    assert not backend.availability()  # no sweep times the stamped kernels
    backend.timeline_probe = True
    prepared = backend.prepare(case, data)
    try:
        NATIVE.cuda_timeline_reset(0)
        prepared.graph_times(2, 5, rotate=False)
        table = NATIVE.cuda_timeline(0)
        assert compare(case, data, prepared.output()).passed
    finally:
        prepared.release()
    split, combine = table["split"], table["combine"]
    points = ("entry", "sliced", "first", "loop_end", "exit")
    assert table["fields"] == ("slot", *points, "sm", *(f"{p}_cycles" for p in points))
    assert split and len(combine) == case.batch * case.q_heads  # one combine block per head
    for slot, entry, sliced, first, loop_end, exit_, sm, *cycles in split:
        if sliced == 0:  # a split past its sequence's end returns after reading the length
            assert entry > 0 and first == loop_end == exit_ == 0, slot
        else:  # both clocks see the points in order
            assert 0 < entry <= sliced <= first <= loop_end <= exit_, slot
            assert cycles == sorted(cycles) and cycles[0] < cycles[-1], slot
        assert 0 <= sm < NATIVE.cuda_device_info(0)["sm_count"]
    assert any(r[2] for r in split)
    last_split = max(r[5] for r in split)
    for slot, _entry, released, stats, summed, exit_, _sm, *cycles in combine:
        # griddepcontrol.wait returns once the whole split grid has completed; then the
        # statistics, the weighted sum and the exit, in order on both clocks
        assert released >= last_split and released <= stats <= summed <= exit_, slot
        assert cycles == sorted(cycles) and cycles[0] < cycles[-1], slot


@needs_gpu
def test_the_read_floor_times_one_streaming_read_per_op() -> None:
    # scripts/read_floor.py: what one kernel that reads an op's bytes costs in the graph timer.
    small = NATIVE.cuda_read_floor(0, 1 << 20, 1, 50, 5)
    large = NATIVE.cuda_read_floor(0, 256 << 20, 2, 20, 5)
    assert len(small) == len(large) == 5 and min(small) > 0
    ceiling = NATIVE.cuda_bandwidth(0)["read_gbps"]
    # 256 MB cannot be read faster than the measured ceiling allows (5% slack for its rounding),
    # and costs more than 1 MB does.
    assert min(large) > 0.95 * (256 << 20) / (ceiling * 1e3) > max(small)
    for args, message in (((0, 15, 1, 1, 1), "bytes 15 must be a positive multiple of 16"),
                          ((0, 1 << 20, 0, 1, 1), "copies 0 must be >= 1"),
                          ((0, 1 << 20, 1, 0, 1), "k 0 must be >= 1"),
                          ((0, 1 << 20, 1, 1, 0), "reps 0 must be >= 1")):
        with pytest.raises(InvalidCase, match=re.escape(f"[cuda_read_floor] {message}")):
            NATIVE.cuda_read_floor(*args)
