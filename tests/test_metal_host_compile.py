"""The Metal host (csrc/metal/*.mm) compiles on Linux against declaration-only Metal headers.

tests/metal_decl holds exactly the Foundation / Metal / pthread-QoS API the host calls, each
declaration as Apple's reference gives it. clang -fsyntax-only (Objective-C++, ARC, Apple's
Objective-C runtime ABI) then catches a misspelt selector, a wrong argument or return type, a
missing cast, a C++ error in the plans. It proves nothing about Metal's behaviour at run time, nor
that the declarations match the SDK beyond our copying: that is the macOS workflow's job
(docs/metal-host.md).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DECL = ROOT / "tests" / "metal_decl"
HOST = sorted((ROOT / "csrc" / "metal").glob("*.mm"))
CLANG = shutil.which("clang++")

pytestmark = pytest.mark.skipif(
    CLANG is None, reason="clang++ is not installed (Debian: apt-get install -y clang); the Linux "
    "compile check of the Metal host needs it")

OBJCXX_FLAGS = ["-fsyntax-only", "-x", "objective-c++", "-std=c++17",
                "-fobjc-runtime=macosx-14.0", "-fobjc-arc", "-fblocks", "-Wall", "-Wextra",
                "-Wno-unused-parameter", "-Werror", f"-I{ROOT / 'csrc'}", f"-I{DECL}"]


def _compile(args: list[str], source: Path) -> subprocess.CompletedProcess[str]:
    assert CLANG is not None
    return subprocess.run([CLANG, *args, str(source)], capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.fixture(scope="module")
def embedded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cmake/metal_embed.cmake's output for the real metal/*.metal, as the Apple build makes it."""
    out = tmp_path_factory.mktemp("metal_gen")
    kernels = sorted((ROOT / "metal").glob("*.metal"))
    cmake = shutil.which("cmake")
    if not kernels or cmake is None:
        pytest.skip("no metal/*.metal kernels or no cmake: nothing to embed")
    done = subprocess.run(
        [cmake, f"-DROOT={ROOT}", f"-DOUT={out / 'metal_embedded_source.inc'}",
         "-DSOURCES=" + ";".join(str(k) for k in kernels), "-P",
         str(ROOT / "cmake" / "metal_embed.cmake")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    text = (out / "metal_embedded_source.inc").read_text()
    assert f"kEmbeddedMetalCount = {len(kernels)};" in text
    assert '#include "' not in text, "every local include must be inlined for run-time compiles"
    return out


@pytest.mark.parametrize("source", HOST, ids=[p.name for p in HOST])
def test_host_file_compiles_against_the_declared_metal_api(source: Path,
                                                           embedded_dir: Path) -> None:
    done = _compile([*OBJCXX_FLAGS, f"-I{embedded_dir}"], source)
    assert done.returncode == 0, done.stderr


def test_host_without_embedded_source_still_compiles() -> None:
    # the branch a build without metal/*.metal takes: no kernels, a clear Unsupported at run time
    done = _compile(OBJCXX_FLAGS, ROOT / "csrc" / "metal" / "metal_library.mm")
    assert done.returncode == 0, done.stderr


def test_metal_bindings_compile_as_cpp() -> None:
    pybind11 = pytest.importorskip("pybind11")
    done = _compile(["-fsyntax-only", "-std=c++17", "-Wall", "-Wextra", "-Werror",
                     "-Wno-unused-parameter", f"-I{ROOT / 'csrc'}",
                     f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}"],
                    ROOT / "csrc" / "metal" / "metal_bindings.cpp")
    assert done.returncode == 0, done.stderr


def test_the_module_compiles_with_the_metal_hook() -> None:
    # bindings.cpp's guarded native:metal branch is compiled only on Apple; check it here. g++:
    # clang 14 crashes on the file's __builtin_cpu_supports("f16c") (a clang bug, not ours).
    pybind11 = pytest.importorskip("pybind11")
    cxx = shutil.which("g++") or CLANG
    assert cxx is not None
    done = subprocess.run(
        [cxx, "-fsyntax-only", "-std=c++17", "-Wall", "-Wextra", "-Werror",
         "-Wno-unused-parameter", "-DKVMICRO_WITH_METAL=1", f"-I{ROOT / 'csrc'}",
         f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}",
         str(ROOT / "csrc" / "bindings.cpp")], capture_output=True, text=True, timeout=300,
        check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("body, expected", [
    ("[device newBufferWithLenght:16 options:MTLResourceStorageModeShared];",
     "newBufferWithLenght"),  # a misspelt selector
    ("int n = [device newCommandQueueWithMaxCommandBufferCount:4];", "id<MTLCommandQueue>"),
    ("[queue commandBuffer].GPUStartTime = 1.0;", "GPUStartTime"),  # a read-only property
])
def test_the_check_fails_on_a_wrong_metal_call(tmp_path: Path, body: str, expected: str) -> None:
    source = tmp_path / "wrong.mm"
    source.write_text("#import <Metal/Metal.h>\n"
                      "void f(id<MTLDevice> device, id<MTLCommandQueue> queue) {\n"
                      f"  {body}\n  (void)device; (void)queue;\n}}\n")
    done = _compile(OBJCXX_FLAGS, source)
    assert done.returncode != 0
    assert expected in done.stderr


def _declared_selectors() -> set[str]:
    """First selector piece of every method and the name of every property the decl headers
    declare (Foundation's NSObject basics excepted)."""
    names: set[str] = set()
    for header in (DECL / "Metal" / "Metal.h", DECL / "Foundation" / "Foundation.h"):
        text = header.read_text()
        names.update(re.findall(r"^\s*[-+]\s*\([^)]*\)\s*\(?([A-Za-z_]\w*)", text, re.M))
        names.update(re.findall(r"^\s*-\s*\([^)]*\)\s*\n?\s*([A-Za-z_]\w*)", text, re.M))
        names.update(re.findall(r"@property\([^)]*\)\s*[\w<>* ]*?\b(\w+)\s*(?:NS_\w+)?;", text))
    return names - {"new", "alloc", "init", "isEqual", "respondsToSelector"}


def test_the_declarations_are_exactly_what_the_host_uses() -> None:
    used = "\n".join(p.read_text() for p in HOST)
    unused = sorted(name for name in _declared_selectors()
                    if not re.search(rf"\b{name}\b", used))
    assert not unused, f"declared but not used by csrc/metal (drop them): {unused}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# ---- the host's plans, compiled as C++ and run here ----------------------------------------------

_PLAN_DRIVER = r"""
#include <cstdio>
#include "common/validate.h"
#include "metal/metal_kernels.h"
using namespace kvmicro;
int main() {
  metal::DeviceProps dev;
  dev.bfloat = true;
  dev.threadgroup_memory = 32768;
  const char* layouts[] = {"NSHD", "HDNS"};
  const int dims[] = {64, 80, 96, 112, 128, 256, 72};
  for (int dtype = 0; dtype < 3; ++dtype)
    for (const char* layout : layouts)
      for (int D : dims)
        for (int ctx : {100, 8000}) {
          OpParams p{};
          make_pool_view(layout, 64, 16, 2, D, &p.pool);
          p.batch = 1; p.q_heads = 8; p.group = 4; p.q_len = 1; p.max_blocks = 8;
          p.max_ctx_pad = 128; p.max_ctx = ctx; p.scale = 0.1f; p.dtype = dtype;
          const char* ops[] = {"sdpa_contiguous", "paged_sdpa", "gather", "gather_sdpa", "append"};
          for (const char* op : ops) {
            try {
              metal::MetalPlan plan;
              std::string o = op;
              if (o == "sdpa_contiguous") plan = metal::plan_sdpa_contiguous(op, p, dev);
              else if (o == "paged_sdpa") plan = metal::plan_paged_sdpa(op, p, dev);
              else if (o == "append") plan = metal::plan_append(op, p, dev);
              else plan = metal::plan_gather(op, p, dev);
              for (const auto& d : plan.dispatches)
                std::printf("%s %s %u %u %u %u\n", op, d.function.c_str(), d.grid.x, d.grid.y,
                            d.grid.z, d.threads.x);
            } catch (const UnsupportedError& e) {
              std::printf("unsupported %s\n", e.what());
            }
          }
        }
  return 0;
}
"""


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Every dispatch the host plans over dtypes x head dims x layouts x contexts x ops."""
    gxx = shutil.which("g++") or CLANG
    out = tmp_path_factory.mktemp("metal_plans")
    driver = out / "driver.cpp"
    driver.write_text(_PLAN_DRIVER)
    plans = [ROOT / "csrc" / "metal" / f"{name}.mm"
             for name in ("paged_sdpa", "sdpa_contiguous", "gather", "append")]
    exe = out / "plans"
    done = subprocess.run([gxx, "-std=c++17", "-O0", f"-I{ROOT / 'csrc'}", "-x", "c++",
                           *map(str, plans), str(driver), "-o", str(exe)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    return run.stdout.splitlines()


def _instantiated(tmp: Path) -> set[str]:
    """Kernel names the .metal instantiation lists define: each file through the C preprocessor
    as MSL 3.1 would see it (bf16 included), every KV_INSTANTIATE turned into a marker."""
    for header in {name for path in (ROOT / "metal").iterdir() if path.suffix in (".metal", ".h")
                   for name in re.findall(r"#include <(metal_\w+)>", path.read_text())}:
        (tmp / header).write_text("")  # Metal's own headers: nothing the names depend on
    cpp = shutil.which("g++") or CLANG
    names: set[str] = set()
    for path in sorted((ROOT / "metal").glob("*.metal")):
        done = subprocess.run(
            [cpp, "-E", "-P", "-x", "c++", "-nostdinc", f"-I{tmp}", "-DKVMICRO_MSL_SHIM",
             "-D__METAL_VERSION__=310", "-DKVMICRO_SHIM_REGISTER(name,func,...)=@@KV name@@",
             str(path)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        for literal in re.findall(r"@@KV (.*?)@@", done.stdout):
            names.add("".join(re.findall(r'"([^"]*)"', literal)))  # adjacent literals join
    return names


def test_every_planned_kernel_is_instantiated(planned: list[str], tmp_path: Path) -> None:
    names = _instantiated(tmp_path)
    assert "paged_sdpa_f16_d128" in names and "combine_f32" in names, sorted(names)[:20]
    missing = sorted({line.split()[1] for line in planned if not line.startswith("unsupported")}
                     - names)
    assert not missing, f"the host asks for kernels metal/*.metal does not instantiate: {missing}"


def test_plans_refuse_what_has_no_kernel_and_split_long_contexts(planned: list[str]) -> None:
    refused = [line for line in planned if line.startswith("unsupported")]
    assert refused and all("head_dim 72" in line for line in refused)
    # a long context at batch 1 splits into partitions and adds the combine pass
    long_paged = [line.split() for line in planned if line.startswith("paged_sdpa ")]
    assert any(int(f[2]) > 1 for f in long_paged)
    assert any(f[1].startswith("combine_") for f in long_paged)
    assert all(f[5] == "128" for f in long_paged if f[1].startswith("paged_sdpa_"))
