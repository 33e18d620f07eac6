"""native:cpu over random shapes, layouts, placements and tables (hypothesis).

Properties: every op matches the float64 oracle; the fused paged op does the contiguous op's
arithmetic bit for bit (paging changes where a row is read, never what is computed — as long as
both split the context alike, which contexts of at most 300 keys, never split, guarantee);
relabelling the pool's physical blocks (permuting them and the table with them) changes nothing,
bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmicro as kv
from kvmicro.backends.native import NativeCpuBackend
from kvmicro.check import compare
from kvmicro.workload import ALL_LAYOUTS, DTYPES, OPS, PLACEMENTS, Case, Layout

# head_dim: vector widths (64/80/128) and the odd ones the portable kernel takes (20, 36)
HEAD_DIMS = [8, 16, 20, 36, 64, 72, 80, 128]
SETTINGS = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw: Any, ops: tuple[str, ...] = OPS) -> tuple[Case, int]:
    batch = draw(st.integers(1, 4))
    kv_heads = draw(st.integers(1, 3))
    return Case(
        op=draw(st.sampled_from(ops)),
        backend="native:cpu",
        batch=batch,
        q_heads=kv_heads * draw(st.integers(1, 6)),
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from(HEAD_DIMS)),
        ctx=tuple(draw(st.lists(st.integers(1, 300), min_size=batch, max_size=batch))),
        block_size=draw(st.sampled_from([1, 2, 3, 5, 8, 16, 17, 32, 64])),
        layout=draw(st.sampled_from(ALL_LAYOUTS)),
        placement=draw(st.sampled_from(PLACEMENTS)),
        slack=draw(st.sampled_from([1.0, 1.3, 2.0, 3.0])),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**16)),
    ), draw(st.integers(1, 4))


def run(case: Case, arrays: dict[str, np.ndarray], threads: int) -> Any:
    prepared = NativeCpuBackend(threads=threads).prepare(case, arrays)
    prepared.run()
    return prepared.output()


@SETTINGS
@given(cases())
def test_every_op_matches_the_oracle(drawn: tuple[Case, int]) -> None:
    case, threads = drawn
    arrays = kv.materialize(case)
    result = compare(case, arrays, run(case, arrays, threads))
    assert result.passed, result


@SETTINGS
@given(cases(ops=("paged_sdpa",)))
def test_paged_is_contiguous_arithmetic_bit_for_bit(drawn: tuple[Case, int]) -> None:
    case, threads = drawn
    arrays = kv.materialize(case)
    paged = run(case, arrays, threads)
    contiguous = run(case.with_(op="sdpa_contiguous"), arrays, threads)
    gathered = run(case.with_(op="gather_sdpa"), arrays, threads)
    np.testing.assert_array_equal(paged, contiguous)
    np.testing.assert_array_equal(paged, gathered)


@SETTINGS
@given(cases(ops=("paged_sdpa", "gather")), st.randoms(use_true_random=False))
def test_relabelling_physical_blocks_changes_nothing(drawn: tuple[Case, int], rnd: Any) -> None:
    case, threads = drawn
    arrays = kv.materialize(case)
    layout = Layout(case.layout)
    num_blocks = layout.to_logical(arrays["k_pool"]).shape[0]
    perm = np.array(rnd.sample(range(num_blocks), num_blocks))  # old id -> new id
    relabelled = dict(arrays)
    for key in ("k_pool", "v_pool"):
        logical = layout.to_logical(arrays[key])
        moved = np.empty_like(logical)
        moved[perm] = logical
        relabelled[key] = layout.from_logical(moved)
    table = arrays["block_table"]
    relabelled["block_table"] = np.where(table >= 0, perm[np.maximum(table, 0)], -1).astype(
        np.int32)
    before, after = run(case, arrays, threads), run(case, relabelled, threads)
    if case.op == "paged_sdpa":
        before, after = (before,), (after,)
    for x, y in zip(before, after, strict=True):
        np.testing.assert_array_equal(x, y)


# ---- bad input: whatever is drawn, the native path refuses it by value or answers right --------


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=6))
def test_a_layout_string_is_accepted_exactly_when_it_is_a_permutation(text: str) -> None:
    from kvmicro import _native
    from kvmicro.errors import InvalidCase
    if text in ALL_LAYOUTS:
        assert _native.pool_strides(text, 2, 3, 4, 5) == Layout(text).strides(2, 3, 4, 5)
        return
    try:
        _native.pool_strides(text, 2, 3, 4, 5)
    except InvalidCase as err:
        assert "is not a permutation of N, S, H, D" in str(err)
    else:
        raise AssertionError(f"layout {text!r} was accepted")


NOT_INTEGERS = [np.float64, np.float32, np.float16, np.bool_, np.complex64, object, np.str_]


@SETTINGS
@given(st.sampled_from(["block_table", "ctx"]), st.sampled_from(NOT_INTEGERS),
       st.floats(0, 0.99))
def test_tables_and_contexts_must_be_integers(key: str, dtype: Any, frac: float) -> None:
    from kvmicro.errors import InvalidCase
    case = Case(op="paged_sdpa", backend="native:cpu", batch=2, q_heads=4, kv_heads=2,
                head_dim=16, ctx=(40, 9), block_size=16, seed=1)
    arrays = kv.materialize(case)
    bad = arrays[key] + frac if np.dtype(dtype).kind in "fc" else arrays[key]
    arrays[key] = np.asarray(bad).astype(dtype)
    try:
        NativeCpuBackend().prepare(case, arrays)
    except InvalidCase as err:
        assert f"{key} has dtype" in str(err) and "must be integers" in str(err)
    else:
        raise AssertionError(f"{key} of dtype {np.dtype(dtype)} was accepted")


@SETTINGS
@given(st.sampled_from(["q", "k_pool", "v_pool"]),
       st.sampled_from([np.int8, np.int32, np.int64, np.uint16, np.bool_, object, np.str_]))
def test_data_arrays_must_be_floating_point(key: str, dtype: Any) -> None:
    from kvmicro.errors import InvalidCase
    case = Case(op="paged_sdpa", backend="native:cpu", batch=2, q_heads=4, kv_heads=2,
                head_dim=16, ctx=(40, 9), block_size=16, dtype="float32", seed=2)
    arrays = kv.materialize(case)
    arrays[key] = arrays[key].astype(dtype)
    try:
        NativeCpuBackend().prepare(case, arrays)
    except InvalidCase as err:
        assert f"{key} has dtype" in str(err) and "floating-point" in str(err)
    else:
        raise AssertionError(f"{key} of dtype {np.dtype(dtype)} was accepted")


@SETTINGS
@given(cases(ops=("paged_sdpa", "sdpa_contiguous", "gather_sdpa")),
       st.floats(-64.0, 64.0, allow_nan=False).filter(lambda s: abs(s) > 1e-3))
def test_any_moderate_scale_matches_the_oracle(drawn: tuple[Case, int], scale: float) -> None:
    case, threads = drawn
    case = case.with_(scale=scale)
    arrays = kv.materialize(case)
    result = compare(case, arrays, run(case, arrays, threads))
    assert result.passed, result
