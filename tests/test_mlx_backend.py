"""mlx:cpu computes every op it claims exactly as the float64 oracle does (skipped where MLX is not
installed), refuses paged attention with a reason, and says why mlx:gpu is missing."""

from __future__ import annotations

import numpy as np
import pytest

import kvmicro as kv
from kvmicro.backends.registry import get_backend
from kvmicro.check import check_matrix, compare

mx = pytest.importorskip("mlx.core")

MLX_OPS = ("sdpa_contiguous", "gather", "gather_sdpa", "append")


def _id(case: kv.Case) -> str:
    return (f"{case.op}-{case.dtype}-{case.layout}-{case.placement}-D{case.head_dim}-"
            f"{case.q_heads}:{case.kv_heads}-bs{case.block_size}")


@pytest.mark.parametrize("case", list(check_matrix(ops=MLX_OPS)), ids=_id)
def test_mlx_cpu_matches_the_oracle_on_the_odd_shape_matrix(case: kv.Case) -> None:
    case = case.with_(backend="mlx:cpu")
    arrays = kv.materialize(case)
    result = compare(case, arrays, kv.execute(case, arrays))
    assert result.passed, result
    if case.op in ("gather", "append"):
        assert result.max_abs_err == 0.0


def test_append_rebinds_the_pool_and_repeats_to_the_same_state() -> None:
    case = kv.Case(op="append", backend="mlx:cpu", batch=2, q_heads=4, kv_heads=2, head_dim=64,
                   ctx=(15, 40), block_size=16, layout="SDNH", seed=8)
    arrays = kv.materialize(case)
    before = arrays["k_pool"].copy()
    prepared = get_backend("mlx:cpu").prepare(case, arrays, copies=2)
    for copy in (0, 1, 1):
        prepared.select(copy)
        prepared.run()
        prepared.sync()
        assert compare(case, arrays, prepared.output()).passed
    np.testing.assert_array_equal(arrays["k_pool"], before)  # the host arrays are untouched


def test_a_wrong_block_table_gives_a_wrong_answer() -> None:
    case = kv.Case(op="gather_sdpa", backend="mlx:cpu", batch=2, q_heads=8, kv_heads=2,
                   head_dim=64, ctx=(40, 70), block_size=16, placement="contiguous", seed=2)
    arrays = kv.materialize(case)
    bad = dict(arrays, block_table=arrays["block_table"].copy())
    bad["block_table"][0, 0] = arrays["k_pool"].shape[0] - 1  # an unused block (slack 2)
    assert not compare(case, arrays, kv.execute(case, bad)).passed


def test_paged_sdpa_is_refused_and_gpu_absence_is_explained() -> None:
    with pytest.raises(kv.Unsupported, match="mlx has no fused paged attention kernel on cpu"):
        kv.execute(kv.Case(op="paged_sdpa", backend="mlx:cpu", ctx=32, q_heads=8, kv_heads=2))
    gpu = get_backend("mlx:gpu").availability()
    if not mx.is_available(mx.gpu):
        assert not gpu and "no gpu device" in gpu.reason


def test_a_block_id_outside_the_pool_is_rejected() -> None:
    case = kv.Case(op="gather", backend="mlx:cpu", batch=2, ctx=(20, 40), q_heads=8,
                   kv_heads=2, head_dim=64)
    arrays = kv.materialize(case)
    arrays["block_table"][0, 1] = -3
    with pytest.raises(kv.InvalidCase, match=r"\[gather\] block id -3 at table\[0\]\[1\]"):
        kv.execute(case, arrays)


def test_mlx_cpu_offers_host_clocks_only_and_describes_its_device() -> None:
    backend = get_backend("mlx:cpu")
    case = kv.Case(op="gather", backend="mlx:cpu", ctx=64, q_heads=8, kv_heads=2)
    prepared = backend.prepare(case, kv.materialize(case))
    assert prepared.timers == ("host", "batched")
    with pytest.raises(kv.Unsupported):
        prepared.graph_times(3, 2)
    info = backend.device_info()
    assert info.kind == "cpu" and info.extra["mlx"] == mx.__version__
