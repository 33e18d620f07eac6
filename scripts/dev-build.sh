#!/usr/bin/env bash
# Build kvmicro._native in place for development: the extension lands in src/kvmicro/, so
# `PYTHONPATH=src python -m pytest` sees every source edit at once. Usage:
#   scripts/dev-build.sh [BUILD_DIR] [extra cmake args...]   (KVMICRO_CUDA=OFF to skip CUDA)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build/dev}
shift || true
pybind11_dir=$(python3 -c 'import pybind11; print(pybind11.get_cmake_dir())')
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$pybind11_dir" -DPython_EXECUTABLE="$(command -v python3)" \
  -DKVMICRO_CUDA="${KVMICRO_CUDA:-AUTO}" "$@" >/dev/null
cmake --build "$build" -j "$(nproc)"
# Install by rename, never by overwriting: a running process that has the old library mapped would
# crash if its pages changed under it.
for so in "$build"/_native*.so; do
  cp "$so" "$root/src/kvmicro/.$(basename "$so").tmp"
  mv -f "$root/src/kvmicro/.$(basename "$so").tmp" "$root/src/kvmicro/$(basename "$so")"
done
