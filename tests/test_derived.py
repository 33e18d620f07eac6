"""Derived figures: the bytes each op must move (recomputed here from the materialized arrays, a
second route to the same number), GB/s, % of peak and overhead against sdpa_contiguous."""

from __future__ import annotations

import numpy as np
import pytest

from kvmicro.derived import bytes_moved, contiguous_twin, derive, footprint_bytes, working_set_bytes
from kvmicro.dtypes import ITEMSIZE
from kvmicro.errors import InvalidCase
from kvmicro.harness.stats import Stats
from kvmicro.workload import OPS, Case, materialize

SHAPES = [
    dict(batch=3, q_heads=8, kv_heads=2, head_dim=80, ctx=(37, 130, 5), block_size=16,
         dtype="float16"),
    dict(batch=1, q_heads=7, kv_heads=1, head_dim=128, ctx=300, block_size=64, dtype="float32"),
    dict(batch=2, q_heads=4, kv_heads=4, head_dim=64, ctx=(9, 23), block_size=1,
         dtype="bfloat16"),
]


def counted_from_arrays(case: Case) -> int:
    """What the op must move, counted on the arrays materialize() builds for it."""
    a = materialize(case)
    e = ITEMSIZE[case.dtype]   # device bytes per element (bfloat16's numpy carrier is wider)
    ctx = a["ctx"]
    _, hkv, _, d = a["k_dense"].shape
    kv_ctx = 2 * int(ctx.sum()) * hkv * d * e                  # K and V of the live tokens
    q_out = 2 * a["q"].size * e
    index = (a["block_table"].size + ctx.size) * 4
    used_blocks = [int((row[row >= 0]).size) for row in a["block_table"]]
    if case.op == "append":
        return 2 * (a["k_new"].size + a["v_new"].size) * e + 2 * ctx.size * 4
    blocks = sum(-(-int(c) // case.block_size) for c in ctx)
    assert blocks <= sum(used_blocks)
    gather = 2 * 2 * blocks * case.block_size * hkv * d * e + index
    return {"sdpa_contiguous": kv_ctx + q_out, "gather": gather,
            "gather_sdpa": gather + kv_ctx + q_out, "paged_sdpa": kv_ctx + q_out + index}[case.op]


@pytest.mark.parametrize("shape", SHAPES, ids=["ragged-f16", "gqa7-f32", "block1-bf16"])
@pytest.mark.parametrize("op", OPS)
def test_bytes_moved_matches_a_count_on_the_arrays(op, shape):
    case = Case(op=op, backend="native:cpu", **shape)
    assert bytes_moved(case) == counted_from_arrays(case)
    assert working_set_bytes(case) == bytes_moved(case)


@pytest.mark.parametrize("ctx,batch,mb", [(1024, 1, 4.2), (4096, 4, 67), (16384, 4, 268),
                                          (32768, 1, 134), (32768, 4, 537)])
def test_field_anchor_sizes(ctx, batch, mb):
    """FIELD.md's K+V megabytes for Hq 32, Hkv 8, D 128, float16."""
    case = Case(op="sdpa_contiguous", batch=batch, q_heads=32, kv_heads=8, head_dim=128, ctx=ctx)
    q_out = 2 * batch * 32 * 128 * 2
    assert (bytes_moved(case) - q_out) / 1e6 == pytest.approx(mb, rel=0.01)


def test_paged_ops_move_the_same_kv_as_contiguous_plus_the_table():
    case = Case(op="paged_sdpa", batch=2, q_heads=8, kv_heads=2, head_dim=64, ctx=(100, 33))
    table = 4 * (2 * case.max_blocks + 2)
    assert bytes_moved(case) == bytes_moved(contiguous_twin(case)) + table
    assert contiguous_twin(case).op == "sdpa_contiguous"
    gs = case.with_(op="gather_sdpa")
    assert bytes_moved(gs) == bytes_moved(case.with_(op="gather")) + bytes_moved(
        contiguous_twin(case))


@pytest.mark.parametrize("op", OPS)
def test_footprint_holds_at_least_what_the_op_touches_of_its_inputs(op):
    case = Case(op=op, batch=2, q_heads=8, kv_heads=2, head_dim=64, ctx=(100, 33), slack=2.0)
    # every copy stores the whole pool (slack included) or dense K/V, never less than it reads
    a = materialize(case)
    e = ITEMSIZE[case.dtype]
    if op == "sdpa_contiguous":
        assert footprint_bytes(case) >= (a["k_dense"].size * 2 + a["q"].size * 2) * e
    else:
        assert footprint_bytes(case) >= (a["k_pool"].size + a["v_pool"].size) * e


def test_derive_figures():
    case = Case(op="gather_sdpa", batch=1, q_heads=8, kv_heads=2, head_dim=64, ctx=1000)
    stats = Stats.from_samples([10.0, 12.0, 11.0])            # median 11 µs
    d = derive(case, stats, copy_gbps=50.0, contiguous_median_us=4.0, read_gbps=25.0)
    nbytes = bytes_moved(case)
    assert d["bytes"] == nbytes
    assert d["gbps"] == pytest.approx(nbytes / 11e-6 / 1e9)
    assert d["pct_of_peak"] == pytest.approx(d["gbps"] / 50.0 * 100)
    assert d["pct_of_read"] == pytest.approx(d["gbps"] / 25.0 * 100)
    assert d["overhead_pct"] == pytest.approx((11.0 / 4.0 - 1) * 100)


def test_derive_unknowns_and_non_attention_ops():
    case = Case(op="paged_sdpa", ctx=64, batch=1)
    d = derive(case, 5.0)
    assert d["pct_of_peak"] is None and d["overhead_pct"] is None and "pct_of_read" not in d
    assert derive(case.with_(op="sdpa_contiguous"), 5.0, 10.0, 99.0)["overhead_pct"] == 0.0
    for op in ("gather", "append"):
        assert derive(case.with_(op=op), 5.0, 10.0, 4.0)["overhead_pct"] is None


@pytest.mark.parametrize("median", [0.0, -1.0, float("nan"), float("inf")])
def test_derive_refuses_a_meaningless_median(median):
    with pytest.raises(InvalidCase, match="median"):
        derive(Case(op="paged_sdpa", ctx=64), median)


def test_derive_refuses_a_meaningless_bandwidth():
    with pytest.raises(InvalidCase, match="copy bandwidth 0"):
        derive(Case(op="paged_sdpa", ctx=64), 3.0, copy_gbps=0.0)
    with pytest.raises(InvalidCase, match="median 0"):
        derive(Case(op="paged_sdpa", ctx=64), 3.0, contiguous_median_us=0.0)


def test_values_are_plain_json_numbers():
    d = derive(Case(op="append", ctx=64), np.float64(2.0), 10.0)
    assert type(d["bytes"]) is int and type(d["gbps"]) is float
