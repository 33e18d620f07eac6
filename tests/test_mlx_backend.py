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


# ---- append routes, the attention route, paged_sdpa through kvmicro's Metal source ----------

@pytest.mark.parametrize("layout", ["NSHD", "HNSD", "SDNH"])
@pytest.mark.parametrize("route", ["indexed", "slice_update"])
def test_both_append_routes_match_the_oracle_and_say_they_are_not_in_place(
        layout: str, route: str) -> None:
    options = () if route == "indexed" else (("append", route),)
    case = kv.Case(op="append", backend="mlx:cpu", batch=3, q_heads=4, kv_heads=2, head_dim=80,
                   ctx=(15, 40, 1), block_size=16, layout=layout, seed=5, options=options)
    arrays = kv.materialize(case)
    prepared = get_backend("mlx:cpu").prepare(case, arrays)
    prepared.run()
    prepared.sync()
    result = compare(case, arrays, prepared.output())
    assert result.passed and result.max_abs_err == 0.0, result
    assert route in prepared.kernel.replace("pool[blocks, slots] = new (indexed", "indexed")
    assert "not in place" in prepared.kernel
    if route == "slice_update":
        assert "mx.slice_update, one per sequence (3 chained)" in prepared.kernel


def test_the_append_route_is_refused_on_other_ops() -> None:
    case = kv.Case(op="gather", backend="mlx:cpu", ctx=32, q_heads=8, kv_heads=2,
                   options=(("append", "slice_update"),))
    with pytest.raises(kv.Unsupported, match="append=slice_update applies to the append op"):
        get_backend("mlx:cpu").prepare(case, kv.materialize(case))


def test_a_bad_append_route_names_the_valid_ones() -> None:
    from kvmicro.backends.registry import parse_spec

    with pytest.raises(kv.InvalidCase, match="inplace"):
        parse_spec("mlx:cpu[append=inplace]")
    assert parse_spec("mlx:gpu[append=slice_update]") == ("mlx:gpu", (("append", "slice_update"),))
    assert parse_spec("mlx:gpu[append=indexed]") == ("mlx:gpu", ())


@pytest.mark.parametrize("op", ["sdpa_contiguous", "gather_sdpa"])
def test_attention_records_the_route_that_ran(op: str) -> None:
    case = kv.Case(op=op, backend="mlx:cpu", batch=2, q_heads=8, kv_heads=2, head_dim=64,
                   ctx=(33, 70), block_size=16)
    arrays = kv.materialize(case)
    prepared = get_backend("mlx:cpu").prepare(case, arrays)
    prepared.run()
    prepared.sync()
    assert compare(case, arrays, prepared.output()).passed
    assert "mx.fast.scaled_dot_product_attention" in prepared.kernel
    # MLX's CPU backend has no fused kernel: force_fused raises, and the record says so
    assert "unfused route (force_fused=True raised" in prepared.kernel
    assert ("gather (mx.take)" in prepared.kernel) == (op == "gather_sdpa")


def test_paged_sdpa_on_mlx_gpu_is_refused_without_metal_with_the_reason() -> None:
    case = kv.Case(op="paged_sdpa", backend="mlx:gpu", ctx=32, q_heads=8, kv_heads=2)
    if mx.metal.is_available():
        pytest.skip("MLX is on Metal here")
    with pytest.raises(kv.Unsupported, match=r"mx\.fast\.metal_kernel only on mlx:gpu with MLX on"):
        get_backend("mlx:gpu").supports(case)


def test_the_metal_kernel_header_is_the_checkouts_kernel_source_inlined() -> None:
    from kvmicro.backends.mlx_backend import METAL_DIR, metal_kernel_header

    header = metal_kernel_header()
    assert '#include "' not in header
    for name in ("decode_attention.h", "kernel_abi.h"):
        lines = (METAL_DIR / name).read_text().replace("#pragma once", "").splitlines()
        # the files' own text, every line of it, not a copy kept in Python
        assert all(line in header for line in lines if not line.startswith('#include "'))
    assert "inline void attend(" in header and "struct PagedKV" in header


def test_the_metal_kernel_scratch_size_is_kernel_abis(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil
    import subprocess
    from pathlib import Path

    from kvmicro.backends.mlx_backend import attention_threadgroup_floats

    gxx = shutil.which("g++") or shutil.which("clang++")
    if gxx is None:
        pytest.skip("no C++ compiler")
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "abi.cpp"
    src.write_text('#include <cstdio>\n#include <initializer_list>\n'
                   '#include "metal/kernel_abi.h"\nint main() {\n'
                   '  for (int d : {64, 80, 96, 112, 128, 256})\n'
                   '    std::printf("%d %d\\n", d, kvmicro::mtl::attn_threadgroup_bytes(d));\n}\n')
    exe = tmp_path / "abi"
    subprocess.run([gxx, "-std=c++17", f"-I{root}", str(src), "-o", str(exe)], check=True)
    for line in subprocess.run([str(exe)], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        dim, nbytes = map(int, line.split())
        assert attention_threadgroup_floats(dim) * 4 == nbytes


@pytest.mark.parametrize("layout", ["NSHD", "HDNS"])
def test_the_metal_kernel_params_are_the_native_pool_strides(layout: str) -> None:
    import re

    from kvmicro.backends.mlx_backend import _params_literal

    native = pytest.importorskip("kvmicro._native")
    case = kv.Case(op="paged_sdpa", backend="mlx:gpu", batch=2, q_heads=8, kv_heads=2,
                   head_dim=64, ctx=(33, 70), block_size=16, layout=layout)
    arrays = kv.materialize(case)
    shape = arrays["k_pool"].shape
    n = shape[layout.index("N")]
    text = _params_literal(case, shape, arrays["block_table"].shape[1], 70)
    strides = native.pool_strides(layout, n, 16, 2, 64)
    pool = re.search(r"kv_mlx_params = \{\{([^}]*)\}", text).group(1)  # type: ignore[union-attr]
    assert [int(x) for x in pool.split(",")] == [strides["N"], strides["S"], strides["H"],
                                                 strides["D"], n, 16, 2, 64]
    assert "kv_mlx_part = {70, 1};" in text


@pytest.mark.parametrize("layout, head_dim", [("NSHD", 80), ("HDNS", 128)])
def test_the_metal_kernel_source_compiles_under_the_msl_shim(tmp_path, layout: str,  # type: ignore[no-untyped-def]
                                                             head_dim: int) -> None:
    """What mlx:gpu hands mx.fast.metal_kernel (header, params, body), wrapped in the signature
    MLX generates for it, compiled as C++ against tests/msl_shim: it proves the body and the
    params literal fit the kernel template's types, not that Apple's compiler or MLX accept it."""
    import shutil
    import subprocess
    from pathlib import Path

    from kvmicro.backends import mlx_backend as m

    root = Path(__file__).resolve().parents[1]
    shim = root / "tests" / "msl_shim" / "include"
    gxx = shutil.which("g++")
    if gxx is None or not shim.exists():
        pytest.skip("needs g++ and tests/msl_shim")
    case = kv.Case(op="paged_sdpa", backend="mlx:gpu", batch=2, q_heads=8, kv_heads=2,
                   head_dim=head_dim, ctx=(33, 70), block_size=16, layout=layout)
    arrays = kv.materialize(case)
    header = m.metal_kernel_header() + m._params_literal(
        case, arrays["k_pool"].shape, arrays["block_table"].shape[1], 70)
    body = m._PAGED_BODY.format(floats=m.attention_threadgroup_floats(head_dim),
                                head_dim=head_dim, d_inner=str(layout.endswith("D")).lower())
    args = ("const device {T}* q, const device {T}* k_pool, const device {T}* v_pool, "
            "const device int32_t* table, const device int32_t* ctx, device {T}* out, "
            "device float* part_out, device float* part_ml, uint3 threadgroup_position_in_grid, "
            "uint simdgroup_index_in_threadgroup, uint thread_index_in_simdgroup")
    source = tmp_path / "mlx_paged.cpp"
    source.write_text(
        "#include <metal_stdlib>\n" + header + "template <typename T>\n[[kernel]] void "
        f"kv_mlx_paged({args.format(T='T')}) {{{body}}}\n"
        + "".join(f"template void kv_mlx_paged<{t}>({args.format(T=t)});\n"
                  for t in ("half", "float")))
    done = subprocess.run([gxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wno-attributes",
                           "-Werror", "-DKVMICRO_MSL_SHIM", f"-I{shim}", "-x", "c++",
                           str(source)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
