#!/usr/bin/env bash
# The one script native:cuda runs on the device machine (GPU): build, tests, the cuda-table sweep,
# compute-sanitizer on a reduced matrix, and an ncu look at the main kernel, inside one time
# budget (BUDGET seconds, default 540: a device call may run 600). Logs go to $OUT.
#   scripts/device_cuda.sh [all|test|bench|sanitize|ncu]...   (default: all; the build always runs)
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_common.sh  # gpu_facts, build_native
OUT=${OUT:-/tmp/kvmicro-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
stages=${*:-all}
deadline=$((SECONDS + ${BUDGET:-540}))
want() { [[ " $stages " == *" all "* || " $stages " == *" $1 "* ]]; }
step() { echo; echo "=== $* ($(date +%T), $((deadline - SECONDS)) s left)"; }
# limit STAGE_MAX: seconds a stage may take, never past the deadline (0 = skip it)
limit() { local left=$((deadline - SECONDS - 5)); ((left > $1)) && left=$1; ((left < 20)) && left=0; echo $left; }

step "gpu"
gpu_facts clocks.mem,power.draw

step "build (sm_90 only here)"
start=$SECONDS
build_native "$PWD/build/device" "$OUT/build.log"
echo "built in $((SECONDS - start)) s"
python3 -c "import kvmicro._native as n; print(n.build_info(), n.cuda_device_count())"

step "link diagnostics (static archives, exported std:: symbols, a CPU bad-input call)"
ninja -C build/device -t commands | grep -- "-shared" | tail -1 | tr ' ' '\n' \
  | grep -E "^-l|\.a$|^-Wl|^-static|^-flto" | tr '\n' ' '; echo
echo "exported std:: symbols: $(nm -D --defined-only src/kvmicro/_native*.so | c++filt | grep -c 'std::')"
nm -D --defined-only src/kvmicro/_native*.so | c++filt | grep -E "codecvt|_M_insert|locale" | head -5
env | grep -E "^(LDFLAGS|CFLAGS|CXXFLAGS|CPPFLAGS|CUDAFLAGS)=" || true
grep -E "CUDAToolkit_LIBRARY_DIR|CMAKE_CUDA_COMPILER:|CMAKE_CXX_COMPILER:" build/device/CMakeCache.txt
python3 - <<'PY'; echo "cpu bad-input rc=$?"
import kvmicro as kv
from kvmicro.backends.native import NativeCpuBackend
case = kv.Case(op="paged_sdpa", backend="native:cpu", batch=2, q_heads=4, kv_heads=2, head_dim=64,
               ctx=(40, 20), block_size=16)
arrays = kv.materialize(case)
arrays["block_table"] = arrays["block_table"].copy()
arrays["block_table"][1, 0] = 9000
try:
    NativeCpuBackend().prepare(case, arrays)
except Exception as err:
    print(type(err).__name__, err)
PY

if want test && (( $(limit 200) > 0 )); then
  step "tests"
  timeout "$(limit 200)" python3 -m pytest -q -p no:cacheprovider tests/test_native_cuda.py 2>&1 \
    | tee "$OUT/tests.log" | tail -25
  if grep -q "Segmentation fault" "$OUT/tests.log" && (( $(limit 60) > 0 )); then
    step "host backtrace of the crashing test (cuda-gdb)"
    crashed=$(grep -o "in test_[a-z_0-9]*" "$OUT/tests.log" | head -1 | cut -c4-)
    timeout "$(limit 60)" cuda-gdb -batch -ex run -ex bt --args python3 -m pytest -q \
      -p no:cacheprovider tests/test_native_cuda.py -k "$crashed" 2>&1 | grep -E "^#|SIG|signal" \
      | head -30 | tee -a "$OUT/tests.log"
  fi
fi

if want bench && (( $(limit 260) > 0 )); then
  # the figures of docs/cuda.md: kvmicro sweeps (oracle-checked, stopping rule, CIs) into results
  # files, then scripts/cuda_table.py over them; VARIANTS=0 skips the kernel-variant sweep
  step "bench: kvmicro sweep --preset cuda-table"
  timeout "$(limit 200)" python3 -m kvmicro sweep --preset cuda-table \
    --backend "${BACKENDS:-native:cuda,torch:cuda}" --out "$OUT/cuda-table.jsonl" -q \
    2>&1 | tail -5
  if [[ ${VARIANTS:-1} != 0 ]] && (( $(limit 120) > 0 )); then
    step "bench: native:cuda kernel variants (paged_sdpa, graph/hot)"
    timeout "$(limit 120)" python3 -m kvmicro sweep --preset cuda-table --op paged_sdpa \
      --timer graph --cache hot --out "$OUT/cuda-variants.jsonl" -q \
      --backend "native:cuda,native:cuda[kernel=mma],native:cuda[kernel=mma,l2_prefetch=0],native:cuda[kernel=async],native:cuda[kernel=async,stages=3],native:cuda[kernel=simt]" \
      2>&1 | tail -5
  fi
  python3 scripts/cuda_table.py "$OUT"/cuda-table.jsonl $( [[ -f "$OUT/cuda-variants.jsonl" ]] \
    && echo "$OUT/cuda-variants.jsonl") | tee "$OUT/cuda-table.txt"
fi

if want sanitize; then
  for tool in memcheck racecheck initcheck synccheck; do
    t=$(limit 120)
    ((t > 0)) || { echo "no time left for $tool"; continue; }
    step "compute-sanitizer $tool"
    echo "=== $tool" >>"$OUT/sanitize.log"
    timeout "$t" compute-sanitizer --tool "$tool" --error-exitcode 3 \
      python3 scripts/sanitize_cuda.py >"$OUT/sanitize_one.log" 2>&1
    rc=$?
    cat "$OUT/sanitize_one.log" >>"$OUT/sanitize.log"; echo "rc=$rc" >>"$OUT/sanitize.log"
    echo "rc=$rc"; tail -4 "$OUT/sanitize_one.log"; rm -f "$OUT/sanitize_one.log"
  done
fi

if want ncu && (( $(limit 90) > 0 )); then
  step "ncu paged_sdpa 32768/4 NSHD bs16 (one split-kernel launch)"
  timeout "$(limit 90)" ncu --clock-control none --kernel-name regex:attention_split \
    --launch-skip 2 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --section LaunchStats --section WarpStateStats python3 scripts/ncu_case.py >"$OUT/ncu.log" 2>&1
  echo "rc=$?"
  grep -E "DRAM Throughput|Duration|Achieved Occupancy|Registers Per|Block Limit Reg|Stall|Warp Cycles Per Issued" \
    "$OUT/ncu.log" | head -20
fi
echo "done, $((deadline - SECONDS)) s of the budget left"
