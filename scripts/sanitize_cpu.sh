#!/usr/bin/env bash
# Build kvmicro._native (CPU only) with AddressSanitizer + UndefinedBehaviorSanitizer and run the
# native CPU tests (oracle matrix, bad input, hypothesis properties) against it.
# Usage: scripts/sanitize_cpu.sh [pytest args...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${SANITIZE_BUILD:-/tmp/kvmicro-asan-build}
site=${SANITIZE_SITE:-/tmp/kvmicro-asan-src}
flags="-fsanitize=address,undefined -fno-omit-frame-pointer"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVMICRO_CUDA=OFF \
  -Dpybind11_DIR="$(python3 -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_MODULE_LINKER_FLAGS="$flags" >/dev/null
cmake --build "$build" -j "$(nproc)"
rm -rf "$site" && mkdir -p "$site"
cp -r "$root/src/kvmicro" "$site/" && rm -f "$site"/kvmicro/_native*.so
cp "$build"/_native*.so "$site/kvmicro/"
cd "$root"
# Python itself is not instrumented: preload the runtimes, and ignore leaks of the interpreter.
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
PYTHONPATH="$site" python3 -m pytest -q -p no:cacheprovider \
  tests/test_native_cpu.py tests/test_native_properties.py tests/test_layout.py "$@"
