"""native:cpu — kvmicro's C++ kernels on the host CPU.

Every op in every dtype matches the float64 oracle over the odd-shape matrix, on the AVX2/F16C path
and on the portable path; the kernel really reads through the block table; every bad input is
refused at prepare with an InvalidCase (or Unsupported) that names the op and the bad value.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import numpy as np
import pytest
from helpers import case_id, table_on_unused_blocks

import kvmicro as kv
from kvmicro import _native
from kvmicro.backends.native import (
    NativeCpuBackend,
    NativeCudaBackend,
    NativeMetalBackend,
    to_native,
)
from kvmicro.check import check_matrix, compare
from kvmicro.errors import InvalidCase, Unsupported
from kvmicro.workload import ARRAY_KEYS, ATTENTION_OPS, Case, Layout

MATRIX = [case.with_(backend="native:cpu") for case in check_matrix()]
ATTENTION_MATRIX = [case for case in MATRIX if case.op in ATTENTION_OPS]
HAS_SIMD = _native.cpu_features()["simd"] != "portable"


def run_case(case: Case, arrays: dict[str, np.ndarray], **backend_kw: Any) -> Any:
    prepared = NativeCpuBackend(**backend_kw).prepare(case, arrays)
    prepared.run()
    prepared.sync()
    return prepared.output()


def native_args(case: Case, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {key: to_native(arrays[key], case.dtype, key) for key in ARRAY_KEYS}


def native_prepare(case: Case, args: dict[str, Any], *, device: str = "cpu",
                   layout: str | None = None, dtype: str | None = None,
                   block_size: int | None = None, scale: float | None = None,
                   **kw: Any) -> Any:
    """_native.prepare with the case's parameters unless overridden (the bad-input tests)."""
    return _native.prepare(
        device, case.op, layout or case.layout, dtype or case.dtype,
        block_size or case.block_size, case.softmax_scale if scale is None else scale,
        *(args[key] for key in ARRAY_KEYS), **kw)


# ---- correctness against the oracle -----------------------------------------------------------


@pytest.mark.parametrize("case", MATRIX, ids=case_id)
def test_matches_the_oracle(case: Case) -> None:
    arrays = kv.materialize(case)
    result = compare(case, arrays, kv.execute(case, arrays))
    assert result.passed, result


@pytest.mark.skipif(not HAS_SIMD, reason="the default path is already the portable one")
@pytest.mark.parametrize("case", ATTENTION_MATRIX, ids=case_id)
def test_portable_path_matches_the_oracle(case: Case) -> None:
    case = case.with_(options=(("simd", "false"),))
    arrays = kv.materialize(case)
    prepared = NativeCpuBackend().prepare(case, arrays)
    assert prepared.kernel.startswith(f"{case.op}: ")
    assert "portable (option simd=0)" in prepared.kernel
    prepared.run()
    result = compare(case, arrays, prepared.output())
    assert result.passed, result


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("threads", [1, 3, 5])
def test_split_contexts_combine_to_the_oracle(dtype: str, threads: int) -> None:
    # One sequence and one kv head cannot keep several threads busy: the context is split across
    # tasks and their partial softmax states are combined.
    case = Case(op="paged_sdpa", batch=1, q_heads=7, kv_heads=1, head_dim=64, ctx=3001,
                block_size=16, layout="NSHD", placement="random", dtype=dtype, seed=5)
    arrays = kv.materialize(case)
    prepared = NativeCpuBackend(threads=threads).prepare(case, arrays)
    assert ("1 split)" in prepared.kernel) == (threads == 1), prepared.kernel
    prepared.run()
    result = compare(case, arrays, prepared.output())
    assert result.passed, result


@pytest.mark.parametrize("layout", ["NSHD", "HNSD"])
def test_ragged_splits_some_empty_combine_to_the_oracle(layout: str) -> None:
    # With 4 threads every sequence is split several ways, the 1-token one too: most of its
    # splits hold no key at all and must weigh nothing when the partial states are combined.
    case = Case(op="paged_sdpa", batch=3, q_heads=6, kv_heads=2, head_dim=80,
                ctx=(1, 700, 2000), block_size=16, layout=layout, placement="fragmented",
                dtype="float32", seed=8)
    arrays = kv.materialize(case)
    prepared = NativeCpuBackend(threads=4).prepare(case, arrays)
    assert re.search(r"x [2-9] splits\)", prepared.kernel), prepared.kernel
    prepared.run()
    result = compare(case, arrays, prepared.output())
    assert result.passed, result


@pytest.mark.parametrize("op", ["sdpa_contiguous", "gather", "gather_sdpa", "paged_sdpa"])
def test_thread_count_does_not_change_the_answer(op: str) -> None:
    case = Case(op=op, batch=3, q_heads=12, kv_heads=3, head_dim=128, ctx=(700, 33, 1200),
                block_size=32, layout="NHSD", placement="fragmented", dtype="float16", seed=2)
    arrays = kv.materialize(case)
    outputs = [run_case(case, arrays, threads=t) for t in (1, 2, 4)]
    for out in outputs:
        assert compare(case, arrays, out).passed
    if op == "gather":  # moved bits: identical whatever the threads
        for out in outputs[1:]:
            np.testing.assert_array_equal(out[0], outputs[0][0])


def test_wrong_block_ids_give_a_wrong_answer() -> None:
    # Negative control: the kernel reads through the table. Pointing it at other, valid blocks
    # (a bijection onto the pool's unused blocks) must change the result.
    case = Case(op="paged_sdpa", batch=2, q_heads=8, kv_heads=2, head_dim=64, ctx=(64, 40),
                block_size=16, placement="contiguous", dtype="float32", seed=4)
    arrays = kv.materialize(case)
    wrong = table_on_unused_blocks(case, arrays)
    assert not compare(case, arrays, run_case(case, wrong)).passed
    assert compare(case, arrays, run_case(case, arrays)).passed


@pytest.mark.parametrize("layout", ["NSHD", "HNSD", "SDNH"])
def test_gather_leaves_zeros_past_each_sequence(layout: str) -> None:
    case = Case(op="gather", batch=3, q_heads=4, kv_heads=2, head_dim=16, ctx=(5, 70, 33),
                block_size=16, layout=layout, placement="reverse", dtype="bfloat16", seed=9)
    arrays = kv.materialize(case)
    k_dense, v_dense = run_case(case, arrays)
    for b, ctx in enumerate(case.ctx_list):
        copied = -(-ctx // case.block_size) * case.block_size  # whole blocks
        np.testing.assert_array_equal(k_dense[b, :, :copied], arrays["k_dense"][b, :, :copied])
        np.testing.assert_array_equal(v_dense[b, :, :copied], arrays["v_dense"][b, :, :copied])
        assert not k_dense[b, :, copied:].any() and not v_dense[b, :, copied:].any()


@pytest.mark.parametrize("layout", ["NSHD", "DHSN"])
def test_append_is_idempotent_and_touches_one_slot(layout: str) -> None:
    case = Case(op="append", batch=3, q_heads=6, kv_heads=3, head_dim=24, ctx=(15, 16, 1),
                block_size=16, layout=layout, placement="random", dtype="float16", seed=1)
    arrays = kv.materialize(case)
    prepared = NativeCpuBackend().prepare(case, arrays)
    for _ in range(3):
        prepared.run()
    k_pool, v_pool = prepared.output()
    assert compare(case, arrays, (k_pool, v_pool)).passed
    changed = Layout(layout).to_logical(k_pool != arrays["k_pool"]).any(axis=(2, 3))
    assert changed.sum() <= case.batch  # one slot (all heads) per sequence, nothing else


def test_copies_are_independent_inputs() -> None:
    case = Case(op="paged_sdpa", batch=2, q_heads=4, kv_heads=2, head_dim=64, ctx=(50, 20),
                dtype="float16", seed=3)
    arrays = kv.materialize(case)
    prepared = NativeCpuBackend().prepare(case, arrays, copies=3)
    assert prepared.copies == 3
    for copy in (2, 0, 1):
        prepared.select(copy)
        prepared.run()
        assert compare(case, arrays, prepared.output()).passed
    with pytest.raises(IndexError, match="copy 3 outside"):
        prepared.select(3)


# ---- timers and the backend contract ----------------------------------------------------------


def test_timers() -> None:
    case = Case(op="paged_sdpa", batch=1, q_heads=8, kv_heads=2, head_dim=64, ctx=256)
    prepared = NativeCpuBackend().prepare(case, kv.materialize(case))
    assert prepared.timers == ("host", "batched", "device")
    samples = prepared.device_times(4, flush_bytes=1 << 20)
    assert len(samples) == 4 and all(s > 0 for s in samples)
    prepared.flush_cache(1 << 16)
    with pytest.raises(Unsupported, match="no graph timer"):
        prepared.graph_times(2, 4)
    with pytest.raises(InvalidCase, match="reps 0"):
        prepared.device_times(0)
    prepared.release()
    with pytest.raises(RuntimeError, match="released"):
        prepared.run()


def test_backend_availability_and_device() -> None:
    backend = NativeCpuBackend()
    assert backend.availability()
    info = backend.device_info()
    assert info.kind == "cpu" and info.name
    if sys.platform == "linux":
        assert info.cache_bytes > 0
    metal = NativeMetalBackend().availability()
    assert not metal and "macOS" in metal.reason
    cuda = NativeCudaBackend().availability()
    if not _native.build_info()["cuda"]:
        assert not cuda and "without CUDA" in cuda.reason


def test_cpu_features_and_build_info() -> None:
    features = _native.cpu_features()
    assert {"arch", "compiled", "avx2", "f16c", "fma", "simd", "threads"} <= set(features)
    assert features["threads"] >= 1
    if features["simd"] != "portable":
        assert features["avx2"] and features["f16c"] and features["fma"]
    build = _native.build_info()
    assert {"compiler", "cuda", "metal", "version"} <= set(build)
    assert build["version"] == kv.__version__


# ---- float16 / bfloat16 conversion (common/half.h) ---------------------------------------------


def _awkward_floats() -> np.ndarray:
    rng = np.random.default_rng(0)
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.unique(halves[np.isfinite(halves)].astype(np.float64))
    mid = ((finite[1:] + finite[:-1]) / 2).astype(np.float32)  # every tie, subnormals included
    return np.concatenate([
        mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf)),
        rng.standard_normal(20000).astype(np.float32) * np.float32(300),
        rng.standard_normal(20000).astype(np.float32) * np.float32(1e-6),
        np.array([65504, 65519.996, 65520, 1e9, -1e9, np.inf, -np.inf, 0.0, -0.0, 1e-45],
                 dtype=np.float32),
    ])


@pytest.mark.parametrize("simd", [False, True])
def test_float16_rounding_matches_numpy(simd: bool) -> None:
    x = _awkward_floats()
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(_native.round_to("float16", x, simd), expected)
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    widened = _native.widen("float16", every, simd)
    reference = every.view(np.float16).astype(np.float32)
    finite = ~np.isnan(reference)
    np.testing.assert_array_equal(widened[finite], reference[finite])
    assert np.isnan(widened[~finite]).all()


def test_bfloat16_rounding_matches_the_carrier() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([_awkward_floats(),
                        rng.integers(0, 2**32, 50000, dtype=np.uint64).astype(np.uint32)
                        .view(np.float32)])
    x = x[~np.isnan(x)]
    expected = (kv.dtypes.round_to_bfloat16(x).view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(_native.round_to("bfloat16", x), expected)
    np.testing.assert_array_equal(_native.widen("bfloat16", expected),
                                  kv.dtypes.round_to_bfloat16(x))


# ---- bad input: refused at prepare, by name ----------------------------------------------------

BASE = Case(op="paged_sdpa", batch=2, q_heads=4, kv_heads=2, head_dim=16, ctx=(40, 9),
            block_size=16, layout="NSHD", placement="random", dtype="float16", seed=7)


@pytest.fixture
def base() -> tuple[Case, dict[str, np.ndarray], dict[str, Any]]:
    arrays = kv.materialize(BASE)
    return BASE, arrays, native_args(BASE, arrays)


def test_block_id_outside_the_pool(base: Any) -> None:
    case, _, args = base
    num_blocks = args["k_pool"].shape[0]
    args["block_table"] = args["block_table"].copy()
    args["block_table"][1, 0] = 9000
    with pytest.raises(InvalidCase, match=re.escape(
            f"[paged_sdpa] block id 9000 at table[1][0] outside the pool [0, {num_blocks})")):
        native_prepare(case, args)


def test_negative_block_id_and_missing_block(base: Any) -> None:
    case, _, args = base
    table = args["block_table"].copy()
    table[0, 1] = -1  # sequence 0 (ctx 40) needs blocks 0..2
    with pytest.raises(InvalidCase, match=re.escape("table[0][1] = -1 (padding)")):
        native_prepare(case, {**args, "block_table": table})
    table = args["block_table"].copy()
    table[1, 2] = -7  # past sequence 1's blocks, yet not padding
    with pytest.raises(InvalidCase, match=re.escape("block id -7 at table[1][2]")):
        native_prepare(case, {**args, "block_table": table})


def test_ctx_beyond_the_table(base: Any) -> None:
    case, _, args = base
    capacity = args["block_table"].shape[1] * case.block_size
    ctx = np.array([capacity + 1, 9], dtype=np.int32)
    with pytest.raises(InvalidCase, match=re.escape(
            f"[paged_sdpa] ctx[0] = {capacity + 1} exceeds the table's {capacity} positions")):
        native_prepare(case, {**args, "ctx": ctx})


def test_ctx_below_one(base: Any) -> None:
    case, _, args = base
    with pytest.raises(InvalidCase, match=re.escape("ctx[1] = 0 must be >= 1")):
        native_prepare(case, {**args, "ctx": np.array([40, 0], dtype=np.int32)})


def test_append_needs_a_free_slot() -> None:
    case = BASE.with_(op="append", ctx=(47, 9))  # 47 + 1 positions: exactly 3 blocks of 16
    arrays = kv.materialize(case)
    args = native_args(case, arrays)
    capacity = args["block_table"].shape[1] * case.block_size
    assert capacity == 48
    full = np.array([48, 9], dtype=np.int32)
    with pytest.raises(InvalidCase, match=re.escape("[append] ctx[0] = 48 leaves no slot")):
        native_prepare(case, {**args, "ctx": full})


def test_q_heads_not_a_multiple_of_kv_heads(base: Any) -> None:
    case, _, args = base
    q = np.zeros((2, 5, 1, 16), dtype=np.uint16)
    with pytest.raises(InvalidCase, match="q_heads 5 is not a multiple of kv_heads 2"):
        native_prepare(case, {**args, "q": q})


def test_wrong_dtypes(base: Any) -> None:
    case, arrays, args = base
    with pytest.raises(InvalidCase, match=r"\[paged_sdpa\] q has dtype float16; expected uint16"):
        native_prepare(case, {**args, "q": arrays["q"]})  # the carrier, not the bits
    with pytest.raises(InvalidCase, match="q has dtype uint16; expected float32"):
        native_prepare(case, args, dtype="float32")
    with pytest.raises(InvalidCase, match="block_table has dtype int64; expected int32"):
        native_prepare(case, {**args, "block_table": args["block_table"].astype(np.int64)})
    with pytest.raises(InvalidCase, match="unknown dtype 'float8'"):
        native_prepare(case, args, dtype="float8")
    with pytest.raises(InvalidCase, match="ctx must be a numpy array, got list"):
        native_prepare(case, {**args, "ctx": [40, 9]})


def test_unknown_layout_and_layout_shape_mismatch(base: Any) -> None:
    case, _, args = base
    with pytest.raises(InvalidCase, match="layout 'NSHX' is not a permutation"):
        native_prepare(case, args, layout="NSHX")
    # A valid permutation that does not describe these arrays: the S axis is not block_size.
    with pytest.raises(InvalidCase, match="block_size 16 does not match the pool's S axis 2"):
        native_prepare(case, args, layout="NHSD")


@pytest.mark.parametrize("key, shape, message", [
    ("v_pool", None, "v_pool shape"),
    ("q", (2, 4, 1, 8), "q has shape (2, 4, 1, 8)"),
    ("ctx", (3,), "ctx has shape (3,)"),
    ("k_dense", (2, 2, 7, 16), "k_dense has shape (2, 2, 7, 16)"),
    ("k_new", (2, 3, 16), "k_new has shape (2, 3, 16)"),
    ("block_table", (6,), "block_table has shape (6,)"),
])
def test_mismatched_shapes(base: Any, key: str, shape: tuple[int, ...] | None,
                           message: str) -> None:
    case, _, args = base
    if shape is None:
        bad = args[key][:-1]  # one block fewer than k_pool
    else:
        bad = np.zeros(shape, dtype=args[key].dtype)
    with pytest.raises(InvalidCase, match=re.escape(message)):
        native_prepare(case, {**args, key: np.ascontiguousarray(bad)})


def test_missing_and_non_contiguous_arrays(base: Any) -> None:
    case, _, args = base
    with pytest.raises(InvalidCase, match=re.escape("[paged_sdpa] q is required")):
        native_prepare(case, {**args, "q": None})
    strided = np.zeros((4, 2, 1, 16), dtype=np.uint16)[::2]
    with pytest.raises(InvalidCase, match="q must be C-contiguous"):
        native_prepare(case, {**args, "q": strided})


def test_bad_scalars(base: Any) -> None:
    case, _, args = base
    with pytest.raises(InvalidCase, match="scale nan must be finite"):
        native_prepare(case, args, scale=float("nan"))
    with pytest.raises(InvalidCase, match="copies 0"):
        native_prepare(case, args, copies=0)
    with pytest.raises(InvalidCase, match=re.escape("threads -1 must be in [0, 1024]")):
        native_prepare(case, args, threads=-1)
    with pytest.raises(InvalidCase, match="priority 5"):
        native_prepare(case, args, priority=5)
    with pytest.raises(InvalidCase, match="priority value 'urgent' is not valid"):
        NativeCudaBackend.parse_options({"priority": "urgent"})
    with pytest.raises(InvalidCase, match="unknown op 'paged'"):
        _native.prepare("cpu", "paged", "NSHD", "float16", 16, 0.25,
                        *(args[key] for key in ARRAY_KEYS))
    with pytest.raises(InvalidCase, match="unknown device 'tpu'"):
        native_prepare(case, args, device="tpu")


# ---- variant options: arguments of prepare, never the environment ------------------------------


@pytest.mark.parametrize(("device", "options", "message"), [
    ("cpu", {"simd": "maybe"}, "option simd='maybe' is not a boolean"),
    ("cpu", {"kernel": "mma"}, "unknown option 'kernel' for device cpu; expected one of simd"),
    ("cuda", {"kernel": "fast"}, "option kernel='fast' is not one of auto, simt, mma, async, bulk"),
    ("cuda", {"stages": "5"}, "option stages=5 is not one of 2, 3"),
    ("cuda", {"l2_prefetch": "64"}, "option l2_prefetch=64 is not one of 0, 128"),
    ("cuda", {"splits": "513"}, "option splits=513 is outside 0..512"),
    ("cuda", {"splits": "8x"}, "option splits='8x' is not an integer"),
    ("cuda", {"min_chunk": "0"}, "option min_chunk=0 is outside 1..2147483647"),
    ("cuda", {"blocks_per_sm": ""}, "option blocks_per_sm='' is not an integer"),
    ("cuda", {"pdl": "yes please"}, "option pdl='yes please' is not a boolean"),
    ("cuda", {"combine": "foo"},
     "option combine='foo' is not one of separate, last, cluster"),
    ("cuda", {"pdl_entry": "true"}, "option pdl_entry='true' is not one of off, exit, early, auto"),
    ("cuda", {"spread": "even"}, "option spread='even' is not a boolean"),
    ("cuda", {"schedule": "dynamic"}, "option schedule='dynamic' is not one of static, steal"),
    ("cuda", {"simd": "1"}, "unknown option 'simd' for device cuda; expected one of kernel, "
                            "splits, min_chunk, blocks_per_sm, stages, l2_prefetch, pdl, "
                            "pdl_entry, spread, combine, schedule"),
])
def test_bad_variant_options_are_refused_naming_the_value(base: Any, device: str,
                                                          options: dict[str, str],
                                                          message: str) -> None:
    # Parsed before any device is opened: the same message with or without a GPU or CUDA build.
    case, _, args = base
    with pytest.raises(InvalidCase, match=re.escape(f"[paged_sdpa] {message}")):
        native_prepare(case, args, device=device, options=options)


def test_the_environment_does_not_choose_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # The old switch is gone: only the case's options choose a variant.
    monkeypatch.setenv("KVMICRO_NO_SIMD", "1")
    case = BASE.with_(backend="native:cpu", head_dim=64)
    prepared = NativeCpuBackend().prepare(case, kv.materialize(case))
    expected = "avx2+f16c+fma" if HAS_SIMD else "portable"
    assert prepared.kernel.startswith(f"paged_sdpa: {expected}")


def test_options_of_the_native_backends() -> None:
    assert NativeCpuBackend.parse_options(()) == {"simd": True}
    cuda = NativeCudaBackend.parse_options({"kernel": "mma", "splits": "8", "pdl": "false"})
    assert cuda == {"priority": "normal", "kernel": "mma", "splits": 8, "min_chunk": 64,
                    "blocks_per_sm": 2, "stages": 2, "l2_prefetch": "128", "pdl": False,
                    "pdl_entry": "auto", "spread": False, "combine": "separate",
                    "schedule": "static"}
    assert NativeCudaBackend.parse_options({"combine": "last"})["combine"] == "last"
    with pytest.raises(InvalidCase, match="unknown option 'kernel'; valid options: simd"):
        NativeCpuBackend.parse_options({"kernel": "simt"})
    with pytest.raises(InvalidCase, match="option stages value '4' is not valid"):
        NativeCudaBackend.parse_options({"stages": "4"})
    with pytest.raises(InvalidCase,
                       match="option combine value 'first' is not valid; expected one of "
                             "separate, last, cluster"):
        NativeCudaBackend.parse_options({"combine": "first"})


@pytest.mark.skipif(_native.build_info()["cuda"], reason="this build has CUDA")
def test_cuda_without_cuda_is_unsupported(base: Any) -> None:
    case, _, args = base
    with pytest.raises(Unsupported, match="built without CUDA"):
        native_prepare(case, args, device="cuda")


def test_decode_only(base: Any) -> None:
    case = BASE.with_(q_len=2)
    with pytest.raises(Unsupported, match="decode only"):
        NativeCpuBackend().prepare(case, kv.materialize(case))
    _, _, args = base
    q = np.zeros((2, 4, 2, 16), dtype=np.uint16)
    with pytest.raises(Unsupported, match=re.escape("decode only (q_len 1); got q_len 2")):
        native_prepare(case, {**args, "q": q})
    q = np.zeros((2, 4, 10, 16), dtype=np.uint16)  # ctx[1] is 9
    with pytest.raises(InvalidCase, match=re.escape("q_len 10 exceeds ctx[1] = 9")):
        native_prepare(case, {**args, "q": q})


def test_bad_table_through_execute() -> None:
    case = BASE.with_(backend="native:cpu")
    arrays = kv.materialize(case)
    arrays["block_table"] = arrays["block_table"].copy()
    arrays["block_table"][0, 2] = 9000
    with pytest.raises(InvalidCase, match=re.escape("block id 9000 at table[0][2]")):
        kv.execute(case, arrays)


# ---- bad input that used to slip through (each now refused by value, or answered right) -------


@pytest.mark.parametrize(("key", "value", "message"), [
    ("block_table", lambda a: a.astype(np.float64) + 0.25, "block_table has dtype float64 (e.g. "),
    ("block_table", lambda a: a >= 0, "block_table has dtype bool (e.g. True)"),
    ("block_table", lambda a: np.where(a >= 0, np.nan, -1.0), "block_table has dtype float64 "
                                                               "(e.g. nan)"),
    ("ctx", lambda a: np.array([20.7, 9.0]), "ctx has dtype float64 (e.g. 20.7)"),
    ("ctx", lambda a: a.astype(str), "ctx has dtype <U"),
    ("k_pool", lambda a: a.astype(np.int32), "k_pool has dtype int32 (e.g. "),
    ("k_pool", lambda a: a.astype(object), "k_pool has dtype object (e.g. "),
    ("q", lambda a: a.astype(str), "q has dtype <U"),
    ("v_pool", lambda a: a.tolist(), "v_pool must be a numpy array, got list"),
])
def test_arrays_of_the_wrong_kind_are_refused_not_coerced(key: str, value: Any,
                                                          message: str) -> None:
    case = BASE.with_(backend="native:cpu")
    arrays = kv.materialize(case)
    arrays[key] = value(arrays[key])
    with pytest.raises(InvalidCase, match=re.escape(message)):
        NativeCpuBackend().prepare(case, arrays)


@pytest.mark.parametrize("bad", ["NSHD\x00junk", "NSHD\x00", "NS\x00D"])
def test_a_layout_with_an_embedded_nul_is_refused(base: Any, bad: str) -> None:
    case, _, args = base
    shown = bad.replace("\x00", "\\x00")
    with pytest.raises(InvalidCase, match=re.escape(f"layout '{shown}' is not a permutation")):
        native_prepare(case, args, layout=bad)
    with pytest.raises(InvalidCase, match=re.escape(f"layout '{shown}' is not a permutation")):
        _native.pool_strides(bad, 2, 2, 2, 2)


def test_pool_strides_that_would_overflow_int64_are_refused() -> None:
    big = 2**31 - 1
    with pytest.raises(InvalidCase, match="overflows the int64 offsets"):
        _native.pool_strides("NSHD", big, big, big, 8)
    assert _native.pool_strides("NSHD", big, 2, 2, 8)["N"] == 32  # large but representable


def test_a_scale_past_float32_range_is_refused_naming_it(base: Any) -> None:
    case, _, args = base
    with pytest.raises(InvalidCase, match=re.escape("scale 1e+39 is outside the float32 range")):
        native_prepare(case, args, scale=1e39)
    with pytest.raises(InvalidCase, match=re.escape("[paged_sdpa] scale 1e+38 is too large for "
                                                    "these inputs: scores may reach ")):
        native_prepare(case, args, scale=1e38)


@pytest.mark.parametrize("scale", [-3.0, 1e-30, 0.0, 1e3, -1e4])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_unusual_finite_scales_match_the_oracle(scale: float, dtype: str) -> None:
    case = Case(op="paged_sdpa", backend="native:cpu", batch=2, q_heads=8, kv_heads=2,
                head_dim=64, ctx=(70, 33), block_size=16, dtype=dtype, seed=3, scale=scale)
    arrays = kv.materialize(case)
    result = compare(case, arrays, kv.execute(case, arrays))
    assert result.passed, result


@pytest.mark.parametrize("simd", ["true", "false"])
@pytest.mark.parametrize(("op", "head_dim"), [("paged_sdpa", 64), ("paged_sdpa", 80),
                                              ("sdpa_contiguous", 128), ("paged_sdpa", 20)])
def test_a_nan_in_one_key_row_poisons_exactly_the_heads_that_read_it(op: str, head_dim: int,
                                                                     simd: str) -> None:
    # The float64 oracle's answer: the q heads of the kv head whose row holds the NaN are NaN in
    # that sequence, every other output is finite and matches.
    case = Case(op=op, backend="native:cpu", batch=2, q_heads=4, kv_heads=2, head_dim=head_dim,
                ctx=(40, 9), block_size=16, dtype="float32", seed=11,
                options=(("simd", simd),))
    arrays = kv.materialize(case)
    b, h, t = 0, 1, 21
    layout = Layout(case.layout)
    if op == "sdpa_contiguous":
        arrays["k_dense"] = arrays["k_dense"].copy()
        arrays["k_dense"][b, h, t, 5] = np.nan
    else:
        logical = layout.to_logical(arrays["k_pool"]).copy()  # [N, S, H, D]
        block = arrays["block_table"][b, t // case.block_size]
        logical[block, t % case.block_size, h, 5] = np.nan
        arrays["k_pool"] = np.ascontiguousarray(layout.from_logical(logical))
    expected = kv.oracle.run(case, arrays)
    out = kv.execute(case, arrays)
    assert np.isnan(expected[b, 2:4]).all() and not np.isnan(np.delete(expected, 0, 0)).any()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    finite = ~np.isnan(expected)
    np.testing.assert_allclose(out[finite], expected[finite], rtol=1e-4, atol=1e-5)


def test_threads_the_system_cannot_start_are_refused_not_hung() -> None:
    # Under an address-space limit thread stacks cannot be mapped: prepare must say so and
    # return, never hang on the workers it did start. In a child process (the limit is global).
    import os
    import subprocess
    import textwrap
    if "asan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("AddressSanitizer reserves terabytes of address space: no RLIMIT_AS here")
    code = textwrap.dedent("""
        import resource, sys
        import kvmicro as kv
        from kvmicro.backends.native import NativeCpuBackend
        from kvmicro.errors import Unsupported
        case = kv.Case(op="paged_sdpa", backend="native:cpu", batch=1, q_heads=2, kv_heads=1,
                       head_dim=16, ctx=20, block_size=16, dtype="float32")
        arrays = kv.materialize(case)
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        limit = used + (512 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            NativeCpuBackend(threads=1024).prepare(case, arrays)
        except Unsupported as err:
            print("REFUSED", err)
            sys.exit(0)
        print("STARTED")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    if "STARTED" in done.stdout:
        pytest.skip("this machine started 1024 threads within the limit")
    assert "[native:cpu] could not start thread" in done.stdout
    assert "of 1024" in done.stdout and "ask for fewer threads" in done.stdout
