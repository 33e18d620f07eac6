"""torch:cpu (and torch:cuda where a GPU is visible) computes every op it claims exactly as the
float64 oracle does, refuses what it cannot do with a reason, and rejects bad input by name."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

import kvmicro as kv
from kvmicro.backends import torch_backend
from kvmicro.backends.registry import get_backend
from kvmicro.check import check_matrix, compare

torch = pytest.importorskip("torch")

TORCH_OPS = ("sdpa_contiguous", "gather", "gather_sdpa", "append")
MATRIX = list(check_matrix(ops=TORCH_OPS))
HAS_CUDA = torch.cuda.is_available()


def _id(case: kv.Case) -> str:
    return (f"{case.op}-{case.dtype}-{case.layout}-{case.placement}-D{case.head_dim}-"
            f"{case.q_heads}:{case.kv_heads}-bs{case.block_size}-ctx{case.ctx}")


def _run(case: kv.Case, arrays: dict[str, np.ndarray] | None = None):
    arrays = kv.materialize(case) if arrays is None else arrays
    return arrays, kv.execute(case, arrays)


# ------------------------------------------------------------------------------- against oracle


@pytest.mark.parametrize("case", MATRIX, ids=_id)
def test_torch_cpu_matches_the_oracle_on_the_odd_shape_matrix(case: kv.Case) -> None:
    case = case.with_(backend="torch:cpu")
    arrays, out = _run(case)
    result = compare(case, arrays, out)
    assert result.passed, result
    if case.op in ("gather", "append"):
        assert result.max_abs_err == 0.0  # data movement is bit-exact


def test_attention_error_is_far_below_tolerance_in_half_precision() -> None:
    # torch CPU SDPA accumulates half inputs in float32: the error is the output rounding only
    for dtype, bound in (("float16", 2e-3), ("bfloat16", 1.6e-2)):
        case = kv.Case(op="sdpa_contiguous", backend="torch:cpu", batch=2, q_heads=16,
                       kv_heads=2, head_dim=128, ctx=(700, 1000), dtype=dtype, seed=5)
        arrays, out = _run(case)
        assert compare(case, arrays, out).max_abs_err < bound


def test_a_wrong_block_table_gives_a_wrong_answer() -> None:
    # negative control: the check must be able to fail. Point sequence 0 at blocks it does not own.
    case = kv.Case(op="gather_sdpa", backend="torch:cpu", batch=2, q_heads=8, kv_heads=2,
                   head_dim=64, ctx=(40, 70), block_size=16, placement="contiguous", seed=2)
    arrays = kv.materialize(case)
    used = set(arrays["block_table"][arrays["block_table"] >= 0].tolist())
    spare = [i for i in range(arrays["k_pool"].shape[0]) if i not in used]
    bad = dict(arrays, block_table=arrays["block_table"].copy())
    bad["block_table"][0, :3] = spare[:3]
    out = kv.execute(case, bad)
    assert not compare(case, arrays, out).passed


def test_append_writes_only_the_next_slot_and_is_idempotent() -> None:
    case = kv.Case(op="append", backend="torch:cpu", batch=3, q_heads=4, kv_heads=2,
                   head_dim=64, ctx=(15, 16, 33), block_size=16, layout="HNSD",
                   placement="random", seed=4)
    arrays = kv.materialize(case)
    prepared = get_backend("torch:cpu").prepare(case, arrays)
    for _ in range(3):
        prepared.run()
    prepared.sync()
    k_pool, v_pool = prepared.output()
    assert compare(case, arrays, (k_pool, v_pool)).passed
    changed = np.argwhere(np.any(k_pool != arrays["k_pool"], axis=(0, 2, 3)))  # HNSD: axis 1 = N
    assert sorted(changed.ravel().tolist()) == sorted(
        int(arrays["block_table"][b, c // 16]) for b, c in enumerate(case.ctx_list))


def test_every_copy_holds_its_own_inputs_and_select_switches_between_them() -> None:
    case = kv.Case(op="gather_sdpa", backend="torch:cpu", batch=2, q_heads=8, kv_heads=2,
                   head_dim=64, ctx=(50, 20), block_size=16, layout="NHSD", seed=6)
    arrays = kv.materialize(case)
    prepared = get_backend("torch:cpu").prepare(case, arrays, copies=3)
    assert prepared.copies == 3
    for i in range(3):
        prepared.select(i)
        prepared.run()
        prepared.sync()
        assert compare(case, arrays, prepared.output()).passed
    with pytest.raises(IndexError):
        prepared.select(3)


# ------------------------------------------------------------------------------------- refusals


def test_paged_sdpa_is_refused_with_the_reason() -> None:
    case = kv.Case(op="paged_sdpa", backend="torch:cpu", ctx=64, q_heads=8, kv_heads=2)
    with pytest.raises(kv.Unsupported, match="torch has no fused paged attention kernel on cpu"):
        kv.execute(case)


def test_cpu_offers_only_host_clocks() -> None:
    case = kv.Case(op="gather", backend="torch:cpu", ctx=64, q_heads=8, kv_heads=2)
    prepared = get_backend("torch:cpu").prepare(case, kv.materialize(case))
    assert prepared.timers == ("host", "batched")
    with pytest.raises(kv.Unsupported, match="no device timer"):
        prepared.device_times(3)
    with pytest.raises(kv.Unsupported, match="no graph timer"):
        prepared.graph_times(3, 4)


def test_unknown_dtype_and_unknown_device_are_named() -> None:
    with pytest.raises(kv.InvalidCase, match="int8"):
        kv.Case(op="gather", backend="torch:cpu", dtype="int8")
    with pytest.raises(kv.InvalidCase, match="torch:tpu"):
        get_backend("torch:tpu")
    with pytest.raises(kv.InvalidCase, match="-1"):
        torch_backend.TorchCudaBackend(index=-1)


def test_arrays_of_the_wrong_carrier_dtype_are_rejected() -> None:
    case = kv.Case(op="sdpa_contiguous", backend="torch:cpu", ctx=64, q_heads=8, kv_heads=2,
                   dtype="float16")
    arrays = kv.materialize(case)
    arrays["q"] = arrays["q"].astype(np.float32)
    with pytest.raises(kv.InvalidCase, match=r"\[sdpa_contiguous\] q has dtype float32"):
        kv.execute(case, arrays)


@pytest.mark.parametrize("op", ["gather", "gather_sdpa", "append"])
def test_a_block_id_outside_the_pool_is_rejected_before_any_read(op: str) -> None:
    case = kv.Case(op=op, backend="torch:cpu", batch=2, ctx=(20, 40), q_heads=8, kv_heads=2,
                   head_dim=64, block_size=16)
    arrays = kv.materialize(case)
    arrays["block_table"][1, 0] = 9000
    with pytest.raises(kv.InvalidCase, match=rf"\[{op}\] block id 9000 at table\[1\]\[0\] "
                                             r"outside the pool \[0, \d+\)"):
        kv.execute(case, arrays)


def test_a_context_beyond_the_table_is_rejected() -> None:
    case = kv.Case(op="gather", backend="torch:cpu", batch=1, ctx=40, q_heads=8, kv_heads=2,
                   head_dim=64, block_size=16)
    arrays = kv.materialize(case)
    arrays["block_table"] = arrays["block_table"][:, :2]
    with pytest.raises(kv.InvalidCase, match="needs 3 blocks"):
        kv.execute(case, arrays)


# ---------------------------------------------------------------------------------- availability


def test_torch_cpu_is_available_and_describes_its_device() -> None:
    backend = get_backend("torch:cpu")
    assert backend.availability()
    info = backend.device_info()
    assert info.kind == "cpu" and info.name
    if sys.platform == "linux":  # the cold policy needs the last-level cache it must defeat
        assert info.cache_bytes > 0
    assert backend.versions()["torch"] == torch.__version__


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is visible")
def test_torch_cuda_says_why_it_is_unavailable() -> None:
    availability = get_backend("torch:cuda").availability()
    assert not availability and "no CUDA device" in availability.reason
    case = kv.Case(op="gather", backend="torch:cuda", ctx=32, q_heads=8, kv_heads=2)
    with pytest.raises(kv.Unsupported, match="not available here"):
        kv.execute(case)


@pytest.mark.skipif(bool(getattr(torch.backends, "mps", None) and
                         torch.backends.mps.is_available()), reason="MPS is available")
def test_torch_mps_says_why_it_is_unavailable() -> None:
    availability = get_backend("torch:mps").availability()
    assert not availability and "MPS" in availability.reason


def test_torch_mps_refuses_a_dtype_its_macos_lacks_with_the_reason() -> None:
    def no_bfloat(dtype: str) -> None:
        raise TypeError(f"MPS BFloat16 is only supported on MacOS 14 or newer ({dtype})")

    problem = torch_backend.mps_dtype_problem("bfloat16", no_bfloat)
    assert problem is not None
    assert "torch:mps has no bfloat16 here (it needs macOS 14 or newer)" in problem
    assert torch_backend.mps_dtype_problem("bfloat16", lambda dtype: None) is None


def test_torch_mps_supports_raises_the_probed_dtype_problem(
        monkeypatch: pytest.MonkeyPatch) -> None:
    backend = torch_backend.TorchMpsBackend()
    monkeypatch.setattr(torch_backend.TorchMpsBackend, "_dtype_problems",
                        {"bfloat16": "torch:mps has no bfloat16 here (it needs macOS 14)"})
    case = kv.Case(op="gather", backend="torch:mps", ctx=32, q_heads=8, kv_heads=2,
                   dtype="bfloat16")
    with pytest.raises(kv.Unsupported, match="no bfloat16 here"):
        backend.supports(case)
    backend.supports(case.with_(dtype="float16"))  # float16 is never probed: MPS always has it


def test_torch_mps_has_no_device_timer_and_says_why() -> None:
    case = kv.Case(op="gather", backend="torch:mps", ctx=32, q_heads=8, kv_heads=2)
    prepared = torch_backend.TorchPrepared(case, device="mps", kind="mps", copies=1)
    assert prepared.timers == ("host", "batched")
    with pytest.raises(kv.Unsupported, match=r"torch\.mps\.Event .* breaks MPS's kernel"):
        prepared.device_times(1)


def test_a_missing_torch_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise ImportError("No module named 'torch'")

    monkeypatch.setattr(torch_backend, "import_torch", missing)
    availability = torch_backend.TorchCpuBackend().availability()
    assert not availability and "torch is not installed" in availability.reason


# ------------------------------------------------------------------------------------------ CUDA

cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("case", MATRIX, ids=_id)
def test_torch_cuda_matches_the_oracle_on_the_odd_shape_matrix(case: kv.Case) -> None:
    case = case.with_(backend="torch:cuda")
    arrays, out = _run(case)
    result = compare(case, arrays, out)
    assert result.passed, result


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("op", TORCH_OPS)
def test_torch_cuda_device_and_graph_timers_sample_real_time(op: str) -> None:
    case = kv.Case(op=op, backend="torch:cuda", batch=2, ctx=(300, 1000), q_heads=16,
                   kv_heads=4, head_dim=128, block_size=16, placement="reverse")
    arrays = kv.materialize(case)
    prepared = get_backend("torch:cuda").prepare(case, arrays, copies=2)
    assert prepared.timers == ("host", "batched", "device", "graph")
    device = prepared.device_times(5, flush_bytes=1 << 20)
    graph = prepared.graph_times(5, 4)
    assert len(device) == 5 and len(graph) == 5
    assert all(t > 0 for t in device + graph)
    # the graph replays the captured work: the output is still right afterwards
    prepared.sync()
    assert compare(case, arrays, prepared.output()).passed
    prepared.release()


@cuda
@pytest.mark.gpu
def test_torch_cuda_reports_l2_and_bandwidth() -> None:
    backend = get_backend("torch:cuda")
    info = backend.device_info()
    assert info.kind == "cuda" and info.cache_bytes > 0 and info.extra["sm_count"] > 0
    bw = backend.bandwidth()
    assert 0 < bw["read_gbps"] and 0 < bw["copy_gbps"]


@pytest.mark.parametrize("mode", ["fold", "native"])
def test_both_gqa_strategies_compute_the_same_attention(mode: str) -> None:
    for ctx in ((37, 130, 5), 90):  # masked (ragged) and sliced
        case = kv.Case(op="gather_sdpa", backend="torch:cpu", batch=3, q_heads=28, kv_heads=4,
                       head_dim=64, ctx=ctx, layout="HNSD", seed=3, options=(("gqa", mode),))
        arrays, out = _run(case)
        assert compare(case, arrays, out).passed


@pytest.mark.parametrize("mode,ctx,named", [
    ("fold", 90, "(heads folded into q_len)"), ("native", 90, "(enable_gqa)"),
    ("native", (37, 90), "(enable_gqa, masked)")])
def test_the_record_names_the_gqa_path(mode: str, ctx: Any, named: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMICRO_TORCH_GQA", "fold" if mode == "native" else "native")  # ignored
    case = kv.Case(op="sdpa_contiguous", backend="torch:cpu", batch=2, q_heads=8, kv_heads=2,
                   head_dim=64, ctx=ctx, options=(("gqa", mode),))
    prepared = get_backend("torch:cpu").prepare(case, kv.materialize(case))
    assert prepared.kernel == f"torch scaled_dot_product_attention {named}"
    prepared.release()


def test_an_unknown_gqa_strategy_is_named() -> None:
    case = kv.Case(op="sdpa_contiguous", backend="torch:cpu", ctx=32, q_heads=8, kv_heads=2,
                   options=(("gqa", "tile"),))
    with pytest.raises(kv.InvalidCase, match="option gqa value 'tile' is not valid; expected one "
                                             "of auto, native, fold"):
        kv.execute(case)


def test_bandwidth_is_bytes_over_the_best_time_the_device_clock_gives() -> None:
    timed: list[Any] = []
    times = iter([4e-3, 2e-3, 3e-3, 8e-3, 5e-3, 6e-3])  # read: best 2 ms; copy: best 5 ms

    def seconds(fn):
        timed.append(fn)
        fn()
        return next(times)

    read, copy = torch_backend.read_and_copy_gbps("cpu", 1 << 20, 3, seconds)
    assert len(timed) == 6  # the warm calls are not timed
    assert read == pytest.approx((1 << 20) / 2e-3 / 1e9)
    assert copy == pytest.approx(2 * (1 << 20) / 5e-3 / 1e9)
