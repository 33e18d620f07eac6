"""The float64 oracle agrees with itself three ways and with a naive softmax; it sees bad input."""

from __future__ import annotations

import numpy as np
import pytest

from kvmicro import oracle
from kvmicro.check import compare, score_rounding_bound, tolerance
from kvmicro.workload import ALL_LAYOUTS, PLACEMENTS, Case, materialize


def case_for(**changes) -> Case:
    base = dict(op="paged_sdpa", batch=3, q_heads=28, kv_heads=4, head_dim=80,
                ctx=(37, 130, 5), block_size=16, layout="NSHD", placement="random",
                dtype="float32", seed=5)
    return Case(**{**base, **changes})


@pytest.mark.parametrize("layout", ["NSHD", "HNSD", "NHSD", "SDNH", "DHSN"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_paged_equals_gather_then_sdpa_equals_sdpa_on_the_dense_tensors(layout, placement):
    case = case_for(layout=layout, placement=placement)
    a = materialize(case)
    paged = oracle.run(case, a)
    gathered = oracle.run(case.with_(op="gather_sdpa"), a)
    dense = oracle.run(case.with_(op="sdpa_contiguous"), a)
    np.testing.assert_allclose(paged, gathered, rtol=0, atol=1e-12)
    np.testing.assert_allclose(paged, dense, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_gather_reproduces_the_dense_tensors_for_every_layout(layout):
    case = case_for(op="gather", layout=layout, block_size=4, ctx=(9, 3, 16))
    a = materialize(case)
    k, v = oracle.run(case, a)
    np.testing.assert_array_equal(k, a["k_dense"])
    np.testing.assert_array_equal(v, a["v_dense"])


def naive_attention(q, k, v, ctx, scale):
    """Textbook softmax(q k^T * scale) v per (sequence, query head), no streaming, no grouping."""
    B, Hq, _, D = q.shape
    group = Hq // k.shape[1]
    out = np.zeros((B, Hq, 1, D))
    for b in range(B):
        for h in range(Hq):
            scores = [float(np.dot(q[b, h, 0], k[b, h // group, t])) * scale for t in range(ctx[b])]
            weights = np.exp(np.array(scores) - max(scores))
            weights /= weights.sum()
            out[b, h, 0] = sum(w * v[b, h // group, t] for t, w in enumerate(weights))
    return out


def test_attention_matches_a_naive_softmax_with_gqa_ratio_7_and_ragged_contexts():
    case = case_for(op="sdpa_contiguous", q_heads=14, kv_heads=2, head_dim=64, ctx=(1, 20, 33))
    a = materialize(case)
    expected = naive_attention(a["q"].astype(np.float64), a["k_dense"].astype(np.float64),
                               a["v_dense"].astype(np.float64), a["ctx"], case.softmax_scale)
    np.testing.assert_allclose(oracle.run(case, a), expected, rtol=1e-10, atol=1e-12)


def test_padded_slots_past_ctx_are_never_attended():
    case = case_for(ctx=(37, 130, 5))
    a = materialize(case)
    before = oracle.run(case, a)
    k_pool = a["k_pool"].copy()
    for b, ctx in enumerate(case.ctx_list):   # poison every slot after ctx in the last block
        block = a["block_table"][b, (ctx - 1) // 16]
        k_pool[block, ctx % 16 or 16:] = 1e4
    after = oracle.run(case, {**a, "k_pool": k_pool})
    np.testing.assert_array_equal(before, after)


def test_append_writes_position_ctx_and_nothing_else():
    case = case_for(op="append", layout="HNSD", block_size=4, ctx=(3, 4, 9))
    a = materialize(case)
    k, _v = oracle.run(case, a)
    logical_k = np.transpose(k, (1, 2, 0, 3))       # HNSD -> NSHD
    original = np.transpose(a["k_pool"], (1, 2, 0, 3)).astype(np.float64)
    changed = np.argwhere((logical_k != original).any(axis=(2, 3)))
    expected = sorted((int(a["block_table"][b, c // 4]), c % 4)
                      for b, c in enumerate(case.ctx_list))
    assert sorted(map(tuple, changed.tolist())) == expected
    for b, c in enumerate(case.ctx_list):
        np.testing.assert_array_equal(logical_k[a["block_table"][b, c // 4], c % 4], a["k_new"][b])


def test_a_table_pointing_at_unused_blocks_changes_the_answer():
    """Negative control: attention is order-invariant, so permuting ids proves nothing, but ids
    of blocks the sequence does not own must give a visibly wrong result."""
    case = case_for(placement="contiguous")
    a = materialize(case)
    good = oracle.run(case, a)
    wrong_table = a["block_table"].copy()
    used = wrong_table >= 0
    wrong_table[used] = wrong_table[used] + used.sum()   # shift into the unused half of the pool
    result = compare(case, {**a, "block_table": wrong_table}, good)
    assert not result.passed and result.max_abs_err > 100 * tolerance(case)


def test_compare_passes_the_oracle_against_itself_and_fails_a_perturbed_output():
    case = case_for(dtype="float16")
    a = materialize(case)
    ref = oracle.run(case, a)
    assert compare(case, a, ref.astype(np.float16), ref).passed
    bad = ref.copy()
    bad[1, 3, 0, 7] += 0.05
    result = compare(case, a, bad, ref)
    assert not result.passed and result.max_abs_err == pytest.approx(0.05)


def test_compare_gather_ignores_padding_but_not_held_positions():
    case = case_for(op="gather")
    a = materialize(case)
    k, v = oracle.run(case, a)
    k_pad = k.copy()
    k_pad[2, :, 5:] = 7.0            # sequence 2 holds 5 tokens: the rest is padding
    assert compare(case, a, (k_pad, v)).passed
    k_pad[2, 0, 4, 0] += 1.0         # the last held token
    assert not compare(case, a, (k_pad, v)).passed


def test_compare_reports_nan_and_shape_mismatch():
    case = case_for()
    a = materialize(case)
    ref = oracle.run(case, a)
    nan = ref.copy()
    nan[0, 0, 0, 0] = np.nan
    assert "NaN" in compare(case, a, nan, ref).detail
    assert "shape" in compare(case, a, ref[:, :4], ref).detail


def test_the_tolerance_widens_only_where_float32_scores_are_coarser_than_it():
    # At the default scale the dtype's tolerance applies; at a scale whose scores run into the
    # thousands, float32 rounding of one score can move an output by more than 1e-4, so the
    # tolerance is the score-rounding bound, which grows with |scale|. A wrong key block still
    # fails there by far.
    case = case_for(placement="contiguous")
    a = materialize(case)
    assert tolerance(case, a) == tolerance(case) == 1e-4
    assert score_rounding_bound(case, a) < 1e-4
    large = case.with_(scale=48.0)
    assert tolerance(large, a) == score_rounding_bound(large, a) > 1e-4
    assert score_rounding_bound(large.with_(scale=-96.0), a) == pytest.approx(
        2 * score_rounding_bound(large, a))
    good = oracle.run(large, a)
    assert compare(large, a, good).passed
    wrong = a["block_table"].copy()
    used = wrong >= 0
    wrong[used] = wrong[used] + used.sum()
    result = compare(large, {**a, "block_table": wrong}, good)
    assert not result.passed and result.max_abs_err > 10 * result.tolerance
    inf_keys = {**a, "k_pool": np.full_like(a["k_pool"], np.inf)}
    assert score_rounding_bound(large, inf_keys) == 0.0  # no tolerance from non-finite inputs
