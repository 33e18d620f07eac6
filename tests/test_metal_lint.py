"""The .metal kernels stay inside the Metal subset the MSL shim compiles faithfully.

The rules (tests/msl_shim/lint.py) each guard a construct g++ would accept under the shim and run
differently from a GPU; every rule is shown to fire on a bad snippet, so none can pass vacuously.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from msl_shim import lint, shim

FILES = sorted([*shim.METAL.glob("*.metal"), *shim.METAL.glob("*.h")])


def test_there_are_kernels_to_lint() -> None:
    names = {f.name for f in FILES}
    assert {"paged_sdpa.metal", "sdpa_contiguous.metal", "combine.metal", "gather.metal",
            "append.metal", "decode_attention.h", "kernel_abi.h"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_kernel_sources_are_in_the_shim_subset(path: Path) -> None:
    assert lint.check_source(path.name, path.read_text(),
                             is_abi=path.name == "kernel_abi.h") == []


KERNEL = ("kernel void k(device float* o [[buffer(kBufOut)]], "
          "uint i [[thread_index_in_simdgroup]]) {{\n{body}\n}}\n"
          "KV_INSTANTIATE(\"k\", k, float)\n")


@pytest.mark.parametrize(("body", "message"), [
    ("threadgroup float tile[32];", "threadgroup storage"),
    ("threadgroup float4* p = nullptr;", "non-scalar"),
    ("half x = 1.0h;", "`h` literal"),
    ("float2 v = a.xy;", "swizzle"),
    ("float3 c = q.rgb;", "swizzle"),
    ("float m = std::max(a, b);", "std::"),
    ("static float cache = 0;", "static storage"),
    ("bfloat x = 0;", "bfloat outside"),
])
def test_each_rule_fires(body: str, message: str) -> None:
    problems = lint.check_source("bad.metal", KERNEL.format(body=body))
    assert any(message in p for p in problems), problems


def test_includes_host_name_and_bindings_are_checked() -> None:
    assert any("include" in p for p in lint.check_source("bad.metal", "#include <vector>\n"))
    assert any("host_name" in p for p in lint.check_source(
        "bad.h", "template [[host_name(\"k\")]] [[kernel]] void k<float>();"))
    unbound = "kernel void k(device float* o) {}\nKV_INSTANTIATE(\"k\", k, float)\n"
    assert any("binding" in p for p in lint.check_source("bad.metal", unbound))
    assert any("no instantiation" in p
               for p in lint.check_source("bad.metal", KERNEL.split("KV_INSTANTIATE")[0]))


def test_bfloat_inside_its_guard_is_fine() -> None:
    ok = KERNEL.format(body="") + "#if KV_HAS_BFLOAT\nKV_INSTANTIATE(\"kb\", k, bfloat)\n#endif\n"
    assert lint.check_source("ok.metal", ok) == []


def test_kvmicro_env_says_what_was_done_with_the_kernels() -> None:
    from kvmicro.environment import host_info

    line = host_info()["metal_kernels"]
    assert "emulated on Linux through the MSL shim" in line
    assert "not compiled by Apple's compiler" in line and "not run on an Apple GPU" in line
