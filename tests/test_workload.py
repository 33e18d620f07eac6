"""The workload model: cases validate once, layouts are permutations, placements are honest,
and materialize() is deterministic, random (never zeros) and self-consistent."""

from __future__ import annotations

import numpy as np
import pytest

from kvmicro import InvalidCase
from kvmicro.dtypes import from_bits16, round_to_bfloat16, to_bits16
from kvmicro.workload import ALL_LAYOUTS, PLACEMENTS, Case, Layout, materialize, place_blocks


def small_case(**changes) -> Case:
    base = dict(op="paged_sdpa", backend="native:cpu", batch=3, q_heads=28, kv_heads=4,
                head_dim=80, ctx=(37, 300, 16), block_size=16, layout="HNSD",
                placement="random", dtype="float16", seed=3)
    return Case(**{**base, **changes})


def test_the_issue_example_case_materializes_with_the_documented_keys_and_shapes():
    case = Case(op="paged_sdpa", backend="native:cpu", batch=2, q_heads=28, kv_heads=4,
                head_dim=80, ctx=[37, 300], block_size=16, layout="HNSD",
                placement="random", dtype="float16", seed=3)
    a = materialize(case)
    assert a["q"].shape == (2, 28, 1, 80)
    assert a["block_table"].dtype == np.int32 and a["block_table"].shape == (2, 19)
    assert a["ctx"].tolist() == [37, 300]
    assert a["k_dense"].shape == (2, 4, 19 * 16, 80)
    assert a["k_new"].shape == (2, 4, 80)
    num_blocks = a["k_pool"].shape[1]   # HNSD: [H, N, S, D]
    assert a["k_pool"].shape == (4, num_blocks, 16, 80)
    assert num_blocks == 2 * (3 + 19)   # slack 2 over the blocks needed


def test_materialize_is_deterministic_for_a_seed_and_differs_across_seeds():
    case = small_case()
    a, b, c = materialize(case), materialize(case), materialize(case, seed=4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["k_pool"], c["k_pool"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_values_are_random_normals_in_the_dtype_never_zeros(dtype):
    a = materialize(small_case(dtype=dtype))
    for key in ("q", "k_pool", "v_pool", "k_new", "v_new"):
        values = a[key].astype(np.float64)
        assert np.count_nonzero(values) > 0.99 * values.size, key
        assert 0.9 < values.std() < 1.1, key
    if dtype == "bfloat16":
        np.testing.assert_array_equal(a["k_pool"], round_to_bfloat16(a["k_pool"]))


def test_dense_tensors_hold_each_sequences_blocks_in_table_order_and_zeros_after():
    case = small_case(layout="NSHD")
    a = materialize(case)
    pool = a["k_pool"]  # [N, S, H, D]
    for b, ctx in enumerate(case.ctx_list):
        for t in range(ctx):
            block = a["block_table"][b, t // 16]
            np.testing.assert_array_equal(a["k_dense"][b, :, t], pool[block, t % 16])
        blocks = -(-ctx // 16)
        assert not a["k_dense"][b, :, blocks * 16:].any()


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_every_permutation_is_a_layout_whose_strides_address_the_stored_array(layout):
    lay = Layout(layout)
    logical = np.arange(5 * 3 * 2 * 4).reshape(5, 3, 2, 4)
    stored = lay.from_logical(logical)
    assert stored.shape == lay.physical_shape(5, 3, 2, 4)
    strides = lay.strides(5, 3, 2, 4)
    flat = stored.ravel()
    for n, s, h, d in [(0, 0, 0, 0), (4, 2, 1, 3), (2, 1, 0, 2), (3, 0, 1, 1)]:
        assert flat[lay.elem_offset(strides, n, s, h, d)] == logical[n, s, h, d]
    np.testing.assert_array_equal(lay.to_logical(stored), logical)


@pytest.mark.parametrize("bad, words", [("NSH", "3 letters"), ("NSHX", "'X'"),
                                        ("NNHD", "repeated letters 'N'"), ("", "0 letters")])
def test_bad_layouts_are_rejected_naming_the_value(bad, words):
    with pytest.raises(InvalidCase, match="not a permutation") as err:
        Layout(bad)
    assert words in str(err.value) and repr(bad) in str(err.value)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("slack", [1.0, 1.3, 2.0])
def test_placements_give_distinct_ids_inside_the_pool(placement, slack):
    blocks = [3, 19, 1, 7]
    num_blocks, ids = place_blocks(placement, blocks, slack, np.random.default_rng(0))
    flat = [i for row in ids for i in row]
    assert [len(r) for r in ids] == blocks
    assert len(set(flat)) == len(flat) == sum(blocks)
    assert all(0 <= i < num_blocks for i in flat)
    assert num_blocks == max(sum(blocks), int(np.ceil(sum(blocks) * slack)))


def test_placement_shapes_are_what_their_names_say():
    rng = np.random.default_rng(1)
    _, contiguous = place_blocks("contiguous", [4, 4], 2.0, rng)
    assert contiguous == [[0, 1, 2, 3], [4, 5, 6, 7]]
    _, reverse = place_blocks("reverse", [4, 4], 2.0, rng)
    assert reverse == [[15, 14, 13, 12], [11, 10, 9, 8]]
    _, fragmented = place_blocks("fragmented", [40, 40], 2.0, np.random.default_rng(2))
    steps = np.diff(fragmented[0])
    assert (steps != 1).sum() > 5, "churn should leave the sequence scattered"


@pytest.mark.parametrize("changes, message", [
    ({"q_heads": 30, "kv_heads": 4}, "q_heads 30 is not a multiple of kv_heads 4"),
    ({"ctx": (37, 0, 5)}, "ctx 0"),
    ({"ctx": (37, 300)}, "ctx has 2 entries"),
    ({"dtype": "float64"}, "unknown dtype 'float64'"),
    ({"op": "decode"}, "unknown op 'decode'"),
    ({"placement": "scattered"}, "unknown placement 'scattered'"),
    ({"slack": 0.5}, "slack 0.5"),
    ({"head_dim": 0}, "head_dim 0"),
    ({"block_size": -16}, "block_size -16"),
])
def test_invalid_cases_raise_naming_the_bad_value(changes, message):
    with pytest.raises(InvalidCase, match=message.replace("(", r"\(")):
        small_case(**changes)


def test_derived_shape_quantities():
    case = small_case(ctx=(37, 300, 16))
    assert case.ctx_pad == (48, 304, 16)
    assert case.max_ctx_pad == 304
    assert case.frag_pct == pytest.approx(100 * (368 - 353) / 368)
    assert case.group == 7
    assert case.with_(op="append").blocks_per_seq == (3, 19, 2)  # room for token ctx


def test_flat_round_trip():
    case = small_case()
    assert Case.from_flat(case.flat()) == case


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_patterns_round_trip(dtype):
    x = round_to_bfloat16(np.random.default_rng(0).standard_normal(1000).astype(np.float32))
    x = x.astype(np.float16) if dtype == "float16" else x
    np.testing.assert_array_equal(from_bits16(to_bits16(x, dtype), dtype), x)


def test_bfloat16_rounding_is_to_nearest_even():
    # 1 + 2^-8 lies halfway between two bfloat16 values: ties go to the even mantissa (1.0)
    halfway = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)], dtype=np.float32)
    np.testing.assert_array_equal(round_to_bfloat16(halfway), [1.0, 1 + 2**-6, -1.0])
