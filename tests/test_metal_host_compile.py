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
