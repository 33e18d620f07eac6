"""native:metal kernels (metal/*.metal), run on Linux through the MSL shim (tests/msl_shim).

Every kernel matches the float64 oracle over the odd-shape matrix - head_dim 64/80/96/128/256,
GQA 1/4/7/16, ragged contexts whose last block is partly filled, block size 1, D-innermost and
strided layouts, one partition and many, half, float and bfloat - compiled with AddressSanitizer
and UBSan. The shim itself is tested: SIMD functions, round-to-nearest-even conversions,
NaN-filled threadgroup memory, shuffled threadgroup order, and the failures it must report rather
than hang on. Planted kernel bugs (a divergent barrier, an off-by-one in the table walk) are caught.

This is emulation: nothing here was compiled by Apple's compiler or ran on an Apple GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import case_id, table_on_unused_blocks
from msl_shim import bindgen, shim

import kvmicro as kv
from kvmicro import oracle
from kvmicro.check import CheckResult, compare
from kvmicro.dtypes import to_bits16
from kvmicro.workload import Case, Layout

pytestmark = pytest.mark.skipif(not shim.have_compiler(), reason=f"{shim.CXX} not found")

BASE: dict[str, Any] = dict(backend="native:metal", batch=3, q_heads=8, kv_heads=2, head_dim=80,
                            ctx=(37, 130, 5), block_size=16, layout="NSHD", placement="random",
                            dtype="float16", seed=11)


def case(op: str, **changes: Any) -> Case:
    return Case(op=op, **{**BASE, **changes})


# (changes, partition_tokens): each axis varied around BASE; None = one partition.
ATTENTION_VARIANTS: list[tuple[dict[str, Any], int | None]] = [
    ({}, None),
    ({}, 16),                                      # 9 partitions, ragged: 1, 3 and 9 used
    ({"head_dim": 64}, None),
    ({"head_dim": 96}, 48),
    ({"head_dim": 128}, None),
    ({"head_dim": 256}, 40),
    ({"q_heads": 2, "kv_heads": 2}, None),        # GQA 1
    ({"q_heads": 28, "kv_heads": 4, "ctx": (19, 50, 3)}, 7),   # GQA 7, partitions cut blocks
    ({"q_heads": 14, "kv_heads": 2, "head_dim": 64}, None),    # GQA 7, two rows per simdgroup
    ({"q_heads": 32, "kv_heads": 2, "ctx": (21, 40, 9)}, 16),  # GQA 16: two query tiles
    ({"batch": 1, "q_heads": 7, "kv_heads": 1, "head_dim": 128, "ctx": 300}, 64),
    ({"block_size": 1, "ctx": (9, 23, 1)}, None),
    ({"block_size": 1, "ctx": (9, 23, 1)}, 5),
    ({"block_size": 64, "ctx": (65, 200, 3)}, None),
    ({"layout": "HNSD"}, None),
    ({"layout": "NHSD"}, 32),
    ({"layout": "SDNH"}, None),                   # D not innermost: strided loads
    ({"layout": "DHSN", "head_dim": 64}, 24),
    ({"placement": "reverse"}, None),
    ({"placement": "fragmented"}, 32),
    ({"dtype": "float32"}, None),
    ({"dtype": "float32", "layout": "HNSD", "head_dim": 128}, 16),
    ({"dtype": "bfloat16"}, None),
    ({"dtype": "bfloat16", "layout": "SDNH", "head_dim": 64}, 48),
]
CONTIGUOUS_VARIANTS = [v for i, v in enumerate(ATTENTION_VARIANTS)
                       if i in (0, 1, 2, 4, 5, 6, 7, 9, 12, 20, 23)]
COPY_VARIANTS: list[dict[str, Any]] = [
    {}, {"layout": "HNSD"}, {"layout": "NHSD"}, {"layout": "SDNH"}, {"layout": "DHSN"},
    {"block_size": 1, "ctx": (9, 23, 1)}, {"block_size": 64, "ctx": (65, 200, 3)},
    {"head_dim": 256, "dtype": "float32"}, {"dtype": "bfloat16", "layout": "HSDN"},
    {"placement": "fragmented", "head_dim": 64},
]


PLANTED = ("KV_PLANT_DIVERGENT_BARRIER", "KV_PLANT_TABLE_OFF_BY_ONE")
NO_BFLOAT = ("KV_SHIM_METAL_VERSION=300",)


@pytest.fixture(scope="module")
def builds() -> dict[Any, Path]:
    """Every executable this file runs, built two at a time (cached by source hash)."""
    wanted = [(n, ()) for n in ("paged_sdpa", "sdpa_contiguous", "combine", "gather", "append",
                                "selftest")]
    wanted += [("paged_sdpa", (d,)) for d in PLANTED] + [("combine", NO_BFLOAT)]
    return shim.build_many(wanted)


@pytest.fixture(scope="module")
def exes(builds: dict[Any, Path]) -> dict[str, Path]:
    return {n: builds[(n, ())] for n in ("paged_sdpa", "sdpa_contiguous", "combine", "gather",
                                         "append")}


def check(c: Case, exes: dict[str, Path], partition_tokens: int | None = None,
          arrays: dict[str, np.ndarray] | None = None, seed: int = 0) -> CheckResult:
    arrays = kv.materialize(c) if arrays is None else arrays
    out = shim.run_case(c, arrays, exes, partition_tokens=partition_tokens, seed=seed)
    return compare(c, arrays, out)


def _ids(variants: list[tuple[dict[str, Any], int | None]], op: str) -> list[str]:
    return [f"{case_id(case(op, **v))}-parts{p or 'one'}" for v, p in variants]


# ---- kernels against the oracle ----------------------------------------------------------------


@pytest.mark.parametrize(("changes", "partition_tokens"), ATTENTION_VARIANTS,
                         ids=_ids(ATTENTION_VARIANTS, "paged_sdpa"))
def test_paged_sdpa_matches_the_oracle(changes: dict[str, Any], partition_tokens: int | None,
                                       exes: dict[str, Path]) -> None:
    result = check(case("paged_sdpa", **changes), exes, partition_tokens)
    assert result.passed, result


@pytest.mark.parametrize(("changes", "partition_tokens"), CONTIGUOUS_VARIANTS,
                         ids=_ids(CONTIGUOUS_VARIANTS, "sdpa_contiguous"))
def test_sdpa_contiguous_matches_the_oracle(changes: dict[str, Any],
                                            partition_tokens: int | None,
                                            exes: dict[str, Path]) -> None:
    result = check(case("sdpa_contiguous", **changes), exes, partition_tokens)
    assert result.passed, result


@pytest.mark.parametrize("op", ["gather", "append"])
@pytest.mark.parametrize("changes", COPY_VARIANTS, ids=lambda v: case_id(case("gather", **v)))
def test_copy_kernels_match_the_oracle_bit_for_bit(op: str, changes: dict[str, Any],
                                                   exes: dict[str, Path]) -> None:
    result = check(case(op, **changes), exes)
    assert result.passed and result.max_abs_err == 0.0, result


def test_the_result_does_not_depend_on_the_threadgroup_order(exes: dict[str, Path]) -> None:
    c = case("paged_sdpa")
    arrays = kv.materialize(c)
    outs = [shim.run_case(c, arrays, exes, partition_tokens=32, seed=s) for s in (1, 2)]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_paged_sdpa_reads_through_the_block_table(exes: dict[str, Path]) -> None:
    c = case("paged_sdpa")
    arrays = kv.materialize(c)
    wrong = shim.run_case(c, table_on_unused_blocks(c, arrays), exes)
    assert not compare(c, arrays, wrong).passed


def _poison_padding(c: Case, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """NaN in every pool slot of a used block past ctx, and in dense K/V past ctx."""
    out = {k: v.copy() for k, v in arrays.items()}
    layout = Layout(c.layout)
    for key in ("k_pool", "v_pool"):
        logical = layout.to_logical(out[key]).copy()
        for b, n in enumerate(c.ctx_list):
            last = int(arrays["block_table"][b, (n - 1) // c.block_size])
            logical[last, n % c.block_size or c.block_size:] = np.nan
        out[key] = layout.from_logical(logical)
    for key in ("k_dense", "v_dense"):
        for b, n in enumerate(c.ctx_list):
            out[key][b, :, n:] = np.nan
    return out


@pytest.mark.parametrize("op", ["paged_sdpa", "sdpa_contiguous"])
@pytest.mark.parametrize("partition_tokens", [None, 16])
def test_padded_tokens_are_never_attended(op: str, partition_tokens: int | None,
                                          exes: dict[str, Path]) -> None:
    c = case(op, dtype="float32", ctx=(37, 130, 5))
    arrays = _poison_padding(c, kv.materialize(c))
    out = shim.run_case(c, arrays, exes, partition_tokens=partition_tokens)
    assert np.isfinite(out).all()
    assert compare(c, arrays, out).passed


def test_append_refuses_a_bad_block_id_without_writing(exes: dict[str, Path]) -> None:
    """The one kernel that writes reaches the pool only through checked_row_offset."""
    c = case("append", dtype="float32")
    arrays = kv.materialize(c)
    logical_block, slot = divmod(c.ctx_list[0], c.block_size)
    bad = dict(arrays, block_table=arrays["block_table"].copy())
    bad["block_table"][0, logical_block] = 1 << 30  # far outside the pool
    k_pool, _ = shim.run_case(c, bad, exes)
    expected_k, _ = oracle.append(arrays["k_pool"], arrays["v_pool"], arrays["block_table"],
                                  arrays["ctx"], arrays["k_new"], arrays["v_new"], c.layout,
                                  c.block_size)
    layout = Layout(c.layout)
    written, expected = layout.to_logical(k_pool), layout.to_logical(expected_k).copy()
    before = layout.to_logical(arrays["k_pool"])
    phys = int(arrays["block_table"][0, logical_block])
    # sequence 0's token went nowhere: its slot keeps what it held; every other write happened
    expected[phys, slot] = before[phys, slot]
    np.testing.assert_array_equal(written, expected)


# ---- planted bugs ------------------------------------------------------------------------------


def test_a_divergent_barrier_is_reported_with_its_line(builds: dict[Any, Path]) -> None:
    exe = builds[("paged_sdpa", ("KV_PLANT_DIVERGENT_BARRIER",))]
    with pytest.raises(shim.ShimError, match=r"non-uniform barrier at \S*decode_attention\.h:\d+"):
        shim.run_case(case("paged_sdpa"), kv.materialize(case("paged_sdpa")),
                      {"paged_sdpa": exe})


def test_an_off_by_one_in_the_table_walk_is_caught(builds: dict[Any, Path]) -> None:
    exe = builds[("paged_sdpa", ("KV_PLANT_TABLE_OFF_BY_ONE",))]
    c = case("paged_sdpa", dtype="float32")
    arrays = kv.materialize(c)
    try:
        out = shim.run_case(c, arrays, {"paged_sdpa": exe})
    except shim.ShimError as err:  # reading table[-1]-relative garbage: a sanitizer report
        assert re.search(r"AddressSanitizer|runtime error", str(err)), err
    else:
        assert not compare(c, arrays, out).passed


# ---- the support matrix and the binding table ----------------------------------------------------


def test_instantiation_lists_are_the_support_matrix(exes: dict[str, Path]) -> None:
    dims = (64, 80, 96, 112, 128, 256)
    names = {n for op in ("paged_sdpa", "sdpa_contiguous", "gather", "append", "combine")
             for n in shim.kernel_names(exes[op])}
    want = {f"{op}_{t}_d{d}" for op in ("paged_sdpa", "sdpa_contiguous")
            for t in ("f16", "f32", "bf16") for d in dims}
    want |= {f"gather_{t}{s}" for t in ("f16", "f32", "bf16") for s in ("", "_strided")}
    want |= {f"{op}_{t}" for op in ("append", "combine") for t in ("f16", "f32", "bf16")}
    assert names == want


def test_below_msl_3_1_there_is_no_bfloat(builds: dict[Any, Path]) -> None:
    exe = builds[("combine", NO_BFLOAT)]
    assert set(shim.kernel_names(exe)) == {"combine_f16", "combine_f32"}


def test_bindings_name_only_slots_of_params_h() -> None:
    slots = bindgen.buffer_indices()
    assert slots["kBufQ"] == 0 and slots["kBufParams"] == slots["kBufCount"]
    good = ("kernel void k(device float* o [[buffer(kBufOut)]], "
            "uint i [[thread_index_in_simdgroup]])")
    (k,) = bindgen.parse_kernels(good)
    assert [(p.kind, p.value) for p in k.params] == [("buffer", "kBufOut"),
                                                     ("builtin", "thread_index_in_simdgroup")]
    with pytest.raises(ValueError, match="kBufNope"):
        bindgen.parse_kernels("kernel void k(device float* o [[buffer(kBufNope)]])")
    with pytest.raises(ValueError, match="exactly one binding"):
        bindgen.parse_kernels("kernel void k(device float* o)")
    with pytest.raises(ValueError, match="twice"):
        bindgen.parse_kernels("kernel void k(device float* a [[buffer(kBufQ)]], "
                              "device float* b [[buffer(kBufQ)]])")


def test_params_struct_matches_the_host_layout() -> None:
    c = case("paged_sdpa")
    blob = shim.op_params(c, kv.materialize(c))
    assert len(blob) == 88
    strides = struct.unpack_from("<4q", blob)
    assert strides[3] == 1 and strides[1] == c.kv_heads * c.head_dim  # NSHD
    assert struct.unpack_from("<7i", blob, 48)[:3] == (c.batch, c.q_heads, c.group)


# ---- the shim itself ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def selftest(builds: dict[Any, Path]) -> Path:
    return builds[("selftest", ())]


def _launch(exe: Path, kernel: str, threads: int = 64, grid: tuple[int, int, int] = (1, 1, 1),
            **kw: Any) -> dict[int, bytes]:
    return shim.run(shim.Job(exe, kernel, grid, (threads, 1, 1), **kw), timeout=60)


def test_simd_functions(selftest: Path) -> None:
    out = _launch(selftest, "simd_ops", buffers={9: 64 * 8 * 4}, outputs=(9,))[9]
    got = np.frombuffer(out, np.float32).reshape(64, 8)
    for t in range(64):
        lane, sg = t % 32, t // 32
        x = np.arange(32.0) ** 2 + 100 * sg
        want = [x.sum(), x.max(), x.min(), x[(lane + 5) % 32], x[3], x[lane ^ 6],
                x[lane + 4] if lane + 4 < 32 else x[lane], x[lane ^ 1]]
        np.testing.assert_array_equal(got[t], np.asarray(want, np.float32), err_msg=f"thread {t}")


def test_half_and_bfloat_round_to_nearest_even(selftest: Path) -> None:
    rng = np.random.default_rng(3)
    ties = [1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 65520.0, 6e-8, -0.0,
            1e-40, 3.0e38, np.inf, -np.inf]
    x = np.concatenate([np.asarray(ties, np.float32),
                        rng.standard_normal(64 - len(ties)).astype(np.float32) * 1000])
    out = _launch(selftest, "conversions", buffers={0: x.tobytes(), 5: 128, 6: 128, 9: 512},
                  outputs=(5, 6, 9))
    with np.errstate(over="ignore"):  # 3e38 -> inf in half, as intended
        x16 = x.astype(np.float16)
    np.testing.assert_array_equal(np.frombuffer(out[5], np.uint16), x16.view(np.uint16))
    np.testing.assert_array_equal(np.frombuffer(out[6], np.uint16), to_bits16(x, "bfloat16"))
    back = np.frombuffer(out[9], np.float32).reshape(64, 2)
    np.testing.assert_array_equal(back[:, 0], x16.astype(np.float32))


def test_threadgroup_memory_starts_as_nan_and_groups_run_shuffled(selftest: Path) -> None:
    out = _launch(selftest, "order_and_fill", grid=(16, 1, 1), tg_bytes=(16,), seed=5,
                  buffers={9: 16 * 2 * 4, 4: np.zeros(1, np.int32).tobytes()}, outputs=(9,))[9]
    seen = np.frombuffer(out, np.float32).reshape(16, 2)
    assert np.isnan(seen[:, 0]).all()                   # refilled before every threadgroup
    order = seen[:, 1].astype(int)
    assert sorted(order) == list(range(16)) and list(order) != list(range(16))


@pytest.mark.parametrize(("kernel", "message"), [
    ("divergent_barrier", r"non-uniform barrier at \S*selftest\.metal:\d+: other threads"),
    ("early_return", r"non-uniform barrier at \S*selftest\.metal:\d+: .*returned"),
    ("partial_simd", r"non-uniform barrier at \S*selftest\.metal:\d+: .*returned"),
])
def test_non_uniform_control_flow_is_reported(selftest: Path, kernel: str, message: str) -> None:
    with pytest.raises(shim.ShimError, match=message):
        _launch(selftest, kernel, buffers={9: 64 * 4})


def test_a_barrier_that_never_completes_trips_the_watchdog(selftest: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setenv("KV_SHIM_WATCHDOG_MS", "300")
    with pytest.raises(shim.ShimError,
                       match=r"non-uniform barrier at \S*selftest\.metal:\d+: 63 of 64 threads"):
        _launch(selftest, "stuck", buffers={4: np.zeros(1, np.int32).tobytes()})


def test_the_build_is_cached_by_source_hash(selftest: Path) -> None:
    assert shim.build("selftest") == selftest
    assert selftest.name.startswith("selftest-") and os.access(selftest, os.X_OK)


def test_the_host_side_abi_is_what_the_shim_ran(tmp_path: Path) -> None:
    """kernel_abi.h compiled as host C++: the threadgroup memory the host will set is the size
    these tests allocated exactly (so ASan would have seen an overrun), and the partition rule
    cuts long contexts of small grids into 512-token partitions."""
    src = tmp_path / "abi.cpp"
    src.write_text('#include <cstdio>\n#include <initializer_list>\n'
                   '#include "metal/kernel_abi.h"\nint main() {\n'
                   '  for (int d : {64, 80, 96, 112, 128, 256})\n'
                   '    std::printf("%d ", kvmicro::mtl::attn_threadgroup_bytes(d));\n'
                   '  auto a = kvmicro::mtl::choose_partitions(1, 8, 4, 8192, 38);\n'
                   '  auto b = kvmicro::mtl::choose_partitions(64, 8, 4, 8192, 38);\n'
                   '  std::printf("%d %d %d %d\\n", a.partition_tokens, a.partitions,\n'
                   '              b.partition_tokens, b.partitions);\n}\n')
    exe = tmp_path / "abi"
    subprocess.run([shim.CXX, "-std=c++17", f"-I{shim.ROOT}", str(src), "-o", str(exe)],
                   check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    dims = (64, 80, 96, 112, 128, 256)
    assert [int(x) for x in out[:6]] == [shim.attn_threadgroup_bytes(d) for d in dims]
    assert [int(x) for x in out[6:]] == [512, 16, 8192, 1]


# ---- the shared page math ----------------------------------------------------------------------

_PAGED_KV_PROGRAM = r"""
#include <cstdio>
#include "csrc/common/paged_kv.h"
int main() {
  int32_t table[2 * 3] = {4, 0, -1, 2, 5, 7};
  int32_t ctx[2] = {20, 32};  // sequence 1 holds blocks 2 and 5; entry 7 is outside the pool
  const char* layouts[] = {LAYOUTS};
  for (const char* layout : layouts) {
    kvmicro::PoolView pool;
    if (!kvmicro::make_pool_view(layout, 6, 16, 3, 8, &pool)) return 2;
    const kvmicro::PagedKV kv = kvmicro::make_paged_kv(pool, table, ctx, 2, 3);
    for (int b = 0; b < 2; ++b)
      for (int t = 0; t < kv.seq_len(b); t += 3)
        std::printf("%s %d %d %lld %lld\n", layout, b, t, (long long)kv.elem_offset(b, t, 2, 5),
                    (long long)kv.checked_elem_offset(b, t, 2, 5));
    // past the table row, past the batch, a -1 entry, an id outside the pool, d and h outside
    std::printf("%s checked %lld %lld %lld %lld %lld %lld\n", layout,
                (long long)kv.checked_row_offset(0, 48, 0),
                (long long)kv.checked_row_offset(2, 0, 0),
                (long long)kv.checked_row_offset(0, 32, 0),
                (long long)kv.checked_row_offset(1, 40, 0),
                (long long)kv.checked_elem_offset(0, 0, 0, 8),
                (long long)kv.checked_row_offset(0, 0, 3));
  }
}
"""


def test_paged_kv_offsets_agree_with_the_python_layout_on_all_24_layouts(tmp_path: Path) -> None:
    from kvmicro.workload import ALL_LAYOUTS

    src = tmp_path / "paged_kv.cpp"
    src.write_text(_PAGED_KV_PROGRAM.replace("LAYOUTS", ", ".join(f'"{x}"' for x in ALL_LAYOUTS)))
    exe = tmp_path / "paged_kv"
    subprocess.run([shim.CXX, "-std=c++17", "-Wall", "-Werror", f"-I{shim.ROOT}", str(src), "-o",
                    str(exe)], check=True)
    table = [[4, 0, -1], [2, 5, 7]]
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    seen = set()
    for line in out.splitlines():
        layout, *rest = line.split()
        if rest[0] == "checked":
            assert [int(x) for x in rest[1:]] == [-1] * 6, line
            continue
        b, t, offset, checked = map(int, rest)
        lay = Layout(layout)
        strides = lay.strides(6, 16, 3, 8)
        want = lay.elem_offset(strides, table[b][t // 16], t % 16, 2, 5)
        assert offset == checked == want, line
        seen.add(layout)
    assert len(seen) == 24


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_paged_kv_compiles_as_cuda(tmp_path: Path) -> None:
    src = tmp_path / "paged_kv.cu"
    src.write_text('#include "csrc/common/paged_kv.h"\n'
                   "__global__ void k(kvmicro::PagedKV kv, long long* out) {\n"
                   "  out[0] = kv.elem_offset(0, 5, 1, 3) + kv.checked_row_offset(0, 1, 1);\n}\n")
    subprocess.run(["nvcc", "-std=c++17", "-x", "cu", "-c", f"-I{shim.ROOT}", str(src), "-o",
                    str(tmp_path / "paged_kv.o")], check=True)
