#!/usr/bin/env bash
# Prepare, on this machine, what the GPU peers need on the device machine, in the git-ignored
# folder .whl/ (carried to the device with `carry: [".whl"]`; see scripts/device_peers.sh):
#
#   .whl/nvidia_cudnn_frontend-*.whl   cuDNN's Python frontend (cp312, the device's Python)
#   .whl/apache_tvm_ffi-*.whl          FlashInfer's FFI runtime (cp312)
#   .whl/flashinfer-trimmed.tar.xz     flashinfer-python, trimmed to the decode/prefill/page path
#
# The flashinfer wheel (62 MB) does not fit a device call: the tarball keeps its Python package
# with flashinfer/__init__.py reduced to the version import (the full root imports every
# subsystem; kvmicro imports flashinfer.decode and flashinfer.page), data/csrc reduced to
# batch_decode*, batch_prefill*, page.cu (+ its binding) and the top-level headers, data/include, data/spdlog and
# data/cccl (FlashInfer's headers need a CCCL newer than CUDA 13.0's: cuda::fast_mod_div).
# Subpackages kvmicro never imports (MoE, GEMM, comm, experimental kernels) are dropped.
#
# With AOT=1 (the default where nvcc is found) the decode, tensor-core prefill and page modules
# are also compiled HERE for sm_90a (no GPU needed) and stored as FlashInfer AOT artifacts
# (data/aot/<module>/<module>.so), so the device loads them instead of JIT-compiling for ~40 s a
# module. AOT_BUILDS lists dtype:head_dim pairs (default: what tests/test_peers.py and the bench
# in scripts/device_peers.sh run); each pair is three modules (decode, prefill, paged prefill),
# about 5-10 minutes a pair on 2 cores. A pair not built is JIT-compiled on the device.
#
# Usage: scripts/fetch_device_wheels.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.whl
FLASHINFER_VERSION=${FLASHINFER_VERSION:-0.7.2.post1}
CUDNN_FRONTEND_VERSION=${CUDNN_FRONTEND_VERSION:-1.32.0}
TVM_FFI_VERSION=${TVM_FFI_VERSION:-0.1.15.post2}
AOT=${AOT:-$(command -v nvcc >/dev/null && echo 1 || echo 0)}
AOT_BUILDS=${AOT_BUILDS:-float16:128 bfloat16:128 float16:64 float16:256}
WORK=${WORK:-/tmp/kvmicro-device-wheels}
mkdir -p "$OUT" "$WORK"

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$OUT" \
    "nvidia-cudnn-frontend==$CUDNN_FRONTEND_VERSION" "apache-tvm-ffi==$TVM_FFI_VERSION"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$WORK/dl" \
    "flashinfer-python==$FLASHINFER_VERSION"

# ---- trim flashinfer ---------------------------------------------------------------------------
rm -rf "$WORK/trim" "$WORK/unpacked" && mkdir -p "$WORK/trim"
python3 -m zipfile -e "$WORK"/dl/flashinfer_python-"$FLASHINFER_VERSION"-*.whl "$WORK/unpacked"
cp -r "$WORK/unpacked/flashinfer" "$WORK/trim/"
FI="$WORK/trim/flashinfer"
cat >"$FI/__init__.py" <<'EOF'
# Trimmed by kvmicro's scripts/fetch_device_wheels.sh: the full root imports every subsystem;
# kvmicro imports flashinfer.decode and flashinfer.page directly.
from .version import __version__ as __version__
from .version import __git_commit__ as __git_commit__
EOF
(cd "$FI/data/csrc" && find . -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} + &&
    for f in *; do
        case "$f" in batch_decode*|batch_prefill*|page.cu|flashinfer_page_binding.cu|*.h|*.cuh) ;;
            *) rm -f "$f" ;;
        esac
    done)
rm -rf "$FI/data/cutlass"

# ---- local Python environment to import (and AOT-build) the trimmed package ---------------------
LOCAL="$WORK/localsite"
if [ ! -d "$LOCAL/tvm_ffi" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$WORK/dl-local" \
        "apache-tvm-ffi==$TVM_FFI_VERSION" "nvidia-cudnn-frontend==$CUDNN_FRONTEND_VERSION" \
        tqdm einops nvidia-ml-py tabulate
    python3 -m pip install -q --no-deps --target "$LOCAL" "$WORK"/dl-local/*.whl
fi
# Drop the subpackages that importing flashinfer.decode and flashinfer.page does not load (MoE,
# GEMM, comm, experimental kernels: most of the wheel). jit/, attention/, trace/ and data/ stay:
# plan() and run() reach them lazily.
PYTHONPATH="$WORK/trim:$LOCAL" python3 - "$FI" <<'EOF'
import os, shutil, sys
import flashinfer.decode, flashinfer.page  # noqa: F401
root = sys.argv[1]
loaded = {name.split(".")[1] for name in sys.modules if name.startswith("flashinfer.")}
keep = loaded | {"jit", "attention", "data", "trace"}
for entry in sorted(os.listdir(root)):
    path = os.path.join(root, entry)
    if os.path.isdir(path) and entry not in keep and entry != "__pycache__":
        shutil.rmtree(path)
        print("dropped flashinfer/" + entry)
EOF
PYTHONPATH="$WORK/trim:$LOCAL" python3 -c \
    "import flashinfer.decode, flashinfer.page; print('trimmed flashinfer imports')"

if [ "$AOT" = 1 ]; then
    # flashinfer links its modules with -lcuda; a GPU-less machine has no libcuda, so link against
    # an empty stub with the driver's soname (the device resolves it to the real driver)
    mkdir -p "$WORK/stubs"
    echo "" >"$WORK/stubs/empty.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$WORK/stubs/libcuda.so" "$WORK/stubs/empty.c"
    for home in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc)")")"; do
        if [ -n "$home" ] && [ -e "$home/lib64/libcudart.so" ]; then CUDA_HOME=$home; break; fi
    done
    CUDA_HOME=$CUDA_HOME \
    LIBRARY_PATH="$WORK/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}" \
    FLASHINFER_CUDA_ARCH_LIST=9.0a FLASHINFER_WORKSPACE_BASE="$WORK/jit" \
    PYTHONPATH="$WORK/trim:$LOCAL" python3 - "$FI/data/aot" $AOT_BUILDS <<'EOF'
import os, shutil, sys, time
import torch
import flashinfer.prefill as prefill
from flashinfer.jit.attention import modules
from flashinfer.jit.page import gen_page_module

aot_dir = sys.argv[1]
specs = [gen_page_module()]
for pair in sys.argv[2:]:
    name, hd = pair.split(":")
    dt, hd = getattr(torch, name), int(hd)
    # the exact arguments BatchDecodeWithPagedKVCacheWrapper.plan passes (no RoPE, no window, no
    # soft cap, int32 indices), for the CUDA-core and the tensor-core (fa2) paths
    specs.append(modules.gen_batch_decode_module(dt, dt, dt, torch.int32, hd, hd, 0,
                                                 False, False))
    args = ("fa2", dt, dt, dt, torch.int32, hd, hd, 0, False, False, False)
    specs.append(prefill._gen_batch_prefill_primary_module(*args))
    specs.append(prefill._gen_batch_prefill_independent_paged_module(*args))
for spec in specs:  # one at a time: ninja already uses every core
    t0 = time.time()
    spec.build()
    dest = os.path.join(aot_dir, spec.name)
    os.makedirs(dest, exist_ok=True)
    shutil.copy2(spec.jit_library_path, os.path.join(dest, spec.name + ".so"))
    print(f"AOT {spec.name} {time.time() - t0:.0f} s", flush=True)
EOF
fi

rm -f "$OUT/flashinfer-trimmed.tar.xz"
find "$FI" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$WORK/trim" -cJf "$OUT/flashinfer-trimmed.tar.xz" flashinfer
ls -la "$OUT"
du -sh "$OUT"
