"""The kernel-experiment scripts: the SASS loop scan, and the kernel patches still fit the
sources they patch (a source change that breaks a patch fails here, not on the GPU machine)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LISTING = """
        Function : _Z3fooPagedSrc_mma
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   HMMA.16816.F32 R8, R2, R4, R8 ;
        /*0030*/                   HMMA.16816.F32 R12, R2, R4, R12 ;
        /*0040*/              @P0 BRA 0x10 ;
        /*0050*/                   FFMA R3, R3, R3, R3 ;
        /*0060*/              @P1 BRA 0x0 ;
        /*0070*/                   EXIT ;
        Function : _Z3barDenseSrc_mma
        /*0000*/                   EXIT ;
"""


def test_the_main_loop_is_the_smallest_range_holding_every_hmma(tmp_path: Path) -> None:
    sass = load("sass_loops")
    path = tmp_path / "k.sass"
    path.write_text(LISTING)
    kernels = sass.paged_kernels(str(path), ["mma"])
    assert list(kernels) == ["_Z3fooPagedSrc_mma"]  # DenseSrc kernels are left out
    listing = kernels["_Z3fooPagedSrc_mma"]
    assert sass.main_loop(listing) == (4, "0x10", "0x40")
    assert sass.loops(listing) == [(7, 1, 2, 1), (4, 1, 2, 0)]


@pytest.mark.parametrize("mode", ["pad_args", "noinline", "relive", "bounds_last", "bounds"])
def test_the_combine_last_patches_apply_to_the_current_sources(tmp_path: Path, mode: str) -> None:
    patch = load("kernel_patches")
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    before = {p: p.read_text() for p in (tmp_path / "csrc" / "cuda").glob("*.[ch]*")}
    patch.PATCHES[mode](str(tmp_path))
    changed = [p.name for p, text in before.items() if p.read_text() != text]
    expected = {"pad_args": ["kernels.h"],
                "noinline": ["attention_common.cuh"],
                "relive": ["attention_async.cuh", "attention_common.cuh", "attention_mma.cuh"],
                "bounds_last": ["attention_async.cuh", "attention_mma.cuh"],
                "bounds": ["attention_async.cuh", "attention_mma.cuh"]}
    assert sorted(changed) == expected[mode]
    common = (tmp_path / "csrc" / "cuda" / "attention_common.cuh").read_text()
    async_kernel = (tmp_path / "csrc" / "cuda" / "attention_async.cuh").read_text()
    if mode == "pad_args":
        assert "OpParams unused_p;" in (tmp_path / "csrc" / "cuda" / "kernels.h").read_text()
    elif mode == "noinline":
        assert "__device__ __noinline__ void merge_splits" in common
    elif mode == "relive":
        assert "slice_after_loop" in common
        assert "slice_after_loop<kMmaHeads>(a)" in async_kernel
    else:
        minimum = "C == AttnCombine::kLast ? 2 : 0" if mode == "bounds_last" else "2"
        assert f"__launch_bounds__(kAttnThreads, {minimum})" in async_kernel
