#!/usr/bin/env bash
# On the GPU machine: verify the native CUDA code and the sweep pipeline in two calls to the same
# warm machine, and keep the results files the docs cite.
#
#   stage 1: run(command="scripts/device_verify.sh 1", carry=[".whl", ".carry/mlx1"])
#            build (sm_90), the native CUDA tests, one sweep of the four CUDA backends
#            (paged + dense attention, graph timer, hot and cold), peers' oracle tests last;
#            stashes the first part of MLX's CUDA build in /tmp.
#   stage 2: run(command="scripts/device_verify.sh 2", carry=[".carry/mlx2"])   (within ~30 s)
#            joins and unpacks MLX's CUDA build (mlx 0.32.4 + mlx-cuda-13 0.32.4, repacked as one
#            tar.xz and split in three because one call carries at most 64 MiB), then one sweep of
#            every op on all five GPU backends (mlx:gpu measured in its own worker process: MLX's
#            CUDA build and torch cannot share one) with the batched timer, every backend's records
#            in one file.
#   stage 3: run(command="scripts/device_verify.sh 3")   (within ~30 s of stage 2)
#            native:cuda under contention, the verdict calibration on native:cuda, regimes on
#            mlx:gpu.
#
# .whl comes from scripts/fetch_device_wheels.sh; .carry/mlx1 holds mlxpart.aa, .carry/mlx2
# mlxpart.ab and mlxpart.ac (split -b 26000000 of the tarball). Logs and results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_common.sh  # gpu_facts, build_native
OUT=${OUT:-/tmp/kvmicro-verify}
mkdir -p "$OUT"
stage=${1:-1}
export PYTHONUNBUFFERED=1
step() { echo "=== $* ($(date +%T))"; }

if [ "$stage" = 1 ]; then
  cp .carry/mlx1/* /tmp/ 2>/dev/null
  source scripts/device_site.sh
  step "gpu"
  gpu_facts
  step "build (sm_90)"
  build_native "$PWD/build/device" "$OUT/build.log"
  step "native CUDA tests"
  timeout 170 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_native_cuda.py tests/test_native_capabilities.py >"$OUT/tests.log" 2>&1
  echo "native tests rc=$?: $(tail -1 "$OUT/tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -8
  step "sweep: four CUDA backends, paged + dense, graph timer, hot and cold"
  backends="native:cuda,cudnn:cuda,flashinfer:cuda,flashinfer:cuda[tensor_cores=true],torch:cuda"
  common=(--preset seed --op sdpa_contiguous,paged_sdpa --layout NSHD,NHSD --block 16,64
          --timer graph --cache hot,cold --max-time 0.3 --out "$OUT/h200-cuda.jsonl" -q
          --backend "$backends")
  timeout 150 python3 -m kvmicro sweep "${common[@]}" --ctx 1024,32768 --batch 1
  timeout 150 python3 -m kvmicro sweep "${common[@]}" --ctx 4096,16384,32768 --batch 4 --resume
  python3 scripts/cuda_table.py "$OUT/h200-cuda.jsonl" >"$OUT/cuda-table.txt" 2>&1
  python3 -m kvmicro compare "$OUT/h200-cuda.jsonl" --new-backend native:cuda \
    --base-backend cudnn:cuda,flashinfer:cuda >"$OUT/vs_peers.txt" 2>&1
  echo "native:cuda vs the fastest peer (rc=$?): $(grep -i 'matched' "$OUT/vs_peers.txt" | head -2)"
  step "peers' and torch's GPU tests (FlashInfer JIT-compiles shapes not built ahead)"
  timeout "${PEER_TIMEOUT:-100}" python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
    tests/test_peers.py tests/test_torch_backend.py >"$OUT/peers_tests.log" 2>&1
  echo "peers tests rc=$?: $(tail -1 "$OUT/peers_tests.log")"
  cat "$OUT/cuda-table.txt" | head -40
elif [ "$stage" = 3 ]; then
  # after stage 2, on the same warm machine: build/device, /tmp/kvmicro-site and MLX's CUDA build
  # in /tmp/kvmicro-mlx are still there
  source scripts/device_site.sh
  step "contention: native:cuda, low/normal/high stream priority, 0 and 4 copy loads"
  timeout 150 python3 -m kvmicro contention --backend native:cuda --load 4 --load-kind copy \
    --repeats 15 --warmup 2 --out "$OUT/h200-contention-native-cuda-copy.jsonl" \
    >"$OUT/contention.log" 2>&1
  echo "contention rc=$?"; tail -12 "$OUT/contention.log"
  step "verdict calibration: native:cuda, device timer, 3 identical sweeps"
  timeout 200 python3 scripts/calibrate_verdicts.py --backend native:cuda --repeats 3 \
    --max-time 0.5 --out "$OUT/calibration" >"$OUT/calibration.log" 2>&1
  echo "calibration rc=$?"; tail -8 "$OUT/calibration.log"
  step "regimes: mlx:gpu (MLX's CUDA build, a process without torch)"
  PYTHONPATH="$PYTHONPATH:/tmp/kvmicro-mlx" timeout 170 python3 -m kvmicro regimes \
    --backend mlx:gpu --model gpt2 --budgets 8:128:8 --runs 6 --warmup 1 \
    --out "$OUT/h200-regimes-gpt2-mlx-gpu.jsonl" >"$OUT/regimes-mlx.log" 2>&1
  echo "regimes rc=$?"; tail -12 "$OUT/regimes-mlx.log"
else
  cp .carry/mlx2/* /tmp/ 2>/dev/null
  source scripts/device_site.sh
  step "MLX's CUDA build"
  MLX_SITE=/tmp/kvmicro-mlx
  mkdir -p "$MLX_SITE"
  cat /tmp/mlxpart.aa /tmp/mlxpart.ab /tmp/mlxpart.ac | tar -C "$MLX_SITE" -xJf - \
    || { echo "MLX UNPACK FAILED"; ls -la /tmp/mlxpart.*; exit 1; }
  export PYTHONPATH="$PYTHONPATH:$MLX_SITE"
  python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())" 2>&1 | tail -1
  step "sweep: every op, five GPU backends, batched timer, hot, one file"
  timeout 420 python3 -m kvmicro sweep --backend native:cuda,cudnn:cuda,flashinfer:cuda,torch:cuda,mlx:gpu \
    --op all --layout NSHD,HNSD,NHSD --block 16 --ctx 1024,4096,16384,32768 --batch 1,4 \
    --heads 32:8 --head-dim 128 --dtype float16 --timer batched --cache hot --max-time 0.15 \
    --out "$OUT/h200-all.jsonl" -q
  echo "sweep rc=$?"
  python3 - "$OUT/h200-all.jsonl" <<'PY'
import collections, sys
from kvmicro.results import read_results
runs, cases = read_results(sys.argv[1])
count = collections.Counter((c["backend"], c["status"]) for c in cases)
for (backend, status), n in sorted(count.items()):
    print(f"{backend:18s} {status:8s} {n}")
PY
  python3 -m kvmicro report "$OUT/h200-all.jsonl" >"$OUT/report-all.txt" 2>&1
  grep -E "error|mlx" "$OUT/report-all.txt" | head -5
fi
