"""Pool layouts: the Python mirror (kvmicro.workload.Layout) and the one C++ header that owns the
stride math (csrc/common/layout.h, PoolView) are the same rule, on all 24 permutations; both
refuse anything that is not a permutation of N, S, H, D."""

from __future__ import annotations

import numpy as np
import pytest

from kvmicro import _native
from kvmicro.errors import InvalidCase
from kvmicro.workload import ALL_LAYOUTS, AXES, Layout

SIZES = [(5, 3, 2, 7), (1, 1, 1, 1), (512, 16, 8, 128), (3, 64, 7, 80)]


def test_there_are_24_layouts() -> None:
    assert len(set(ALL_LAYOUTS)) == 24
    assert all(sorted(order) == sorted(AXES) for order in ALL_LAYOUTS)


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("order", ALL_LAYOUTS)
def test_pool_view_strides_equal_layout_strides(order: str, sizes: tuple[int, ...]) -> None:
    assert _native.pool_strides(order, *sizes) == Layout(order).strides(*sizes)


@pytest.mark.parametrize("order", ALL_LAYOUTS)
def test_strides_address_the_stored_pool(order: str) -> None:
    # Element [n, s, h, d] of a pool stored by Layout.from_logical sits at the offset the C++
    # strides give, so both sides also agree with numpy's own memory order.
    N, S, H, D = 4, 3, 2, 5
    logical = np.arange(N * S * H * D).reshape(N, S, H, D)
    flat = Layout(order).from_logical(logical).ravel()
    st = _native.pool_strides(order, N, S, H, D)
    n, s, h, d = np.indices((N, S, H, D))
    offsets = n * st["N"] + s * st["S"] + h * st["H"] + d * st["D"]
    np.testing.assert_array_equal(flat[offsets], logical)
    assert sorted(offsets.ravel().tolist()) == list(range(N * S * H * D))  # a bijection


@pytest.mark.parametrize("order", ALL_LAYOUTS)
def test_d_innermost_means_unit_d_stride(order: str) -> None:
    assert (_native.pool_strides(order, 3, 4, 5, 6)["D"] == 1) == Layout(order).d_innermost


BAD_LAYOUTS = ["", "NSH", "NSHDD", "NSHH", "NSHX", "nshd", "N SH", "DDDD", "NSHDN", "ABCD"]


@pytest.mark.parametrize("bad", BAD_LAYOUTS)
def test_both_sides_refuse_a_non_permutation(bad: str) -> None:
    with pytest.raises(InvalidCase, match=f"'{bad}'"):
        Layout(bad)
    with pytest.raises(InvalidCase, match=f"'{bad}' is not a permutation of N, S, H, D"):
        _native.pool_strides(bad, 2, 2, 2, 2)


def test_pool_strides_refuses_a_non_positive_size() -> None:
    with pytest.raises(InvalidCase, match="dimension 0"):
        _native.pool_strides("NSHD", 4, 0, 2, 8)
