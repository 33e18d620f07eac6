#!/usr/bin/env bash
# On the GPU machine, one call: two builds of kvmicro side by side and what tells them apart.
#
#   run(command="bash scripts/device_ab.sh .carry/ab/a.tar .carry/ab/b.tar", carry=[".carry/ab"])
#
# A.tar and B.tar are `git archive <commit> csrc src scripts tests cmake CMakeLists.txt
# pyproject.toml` of the base (A) and the candidate (B). Stages, inside one time budget (BUDGET
# seconds, default 560; STAGES to pick some: build sass test ab floor ncu):
#   build  both trees, side by side, into /tmp/ab/{a,b}/src/kvmicro (sm_90);
#   sass   the SASS instruction count and registers of every attention kernel of both builds
#          (cuobjdump), and how many kernels differ;
#   test   the native CUDA tests of B (those matching TEST_FIRST, a pytest -k expression, first
#          when it is set; then the whole files in what is left of the stage's time);
#   ab     scripts/ab_builds.py: alternating A/B `kvmicro sweep` processes over paged_sdpa
#          (graph timer, hot), paired verdicts; AB_CTX, AB_BATCH, AB_CACHE (e.g. hot,cold) and
#          AB_LIMIT (seconds, default 150) replace the defaults;
#   floor  one sweep of build A's paged_sdpa variants at small contexts (one launch, splits, PDL,
#          combine=last) to place the fixed cost per op; FLOOR_SIDE=b sweeps build B instead,
#          FLOOR_SPECS, FLOOR_CTX, FLOOR_BATCH and FLOOR_LIMIT (seconds) replace the defaults;
#   ncu    Nsight Compute (--clock-control none) of combine=separate and combine=last at 1024/1
#          and 32768/4: kernel durations, DRAM throughput, occupancy, stall reasons.
# Records go to $OUT, logs into $OUT/ab-logs.tgz; the last lines printed are the summary.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvmicro-ab}
mkdir -p "$OUT"
A_TAR=$(realpath "$1") B_TAR=$(realpath "$2")
export PYTHONUNBUFFERED=1
stages=${STAGES:-build sass test ab floor ncu}
deadline=$((SECONDS + ${BUDGET:-560}))
want() { [[ " $stages " == *" $1 "* ]]; }
step() { echo "=== $* ($(date +%T), $((deadline - SECONDS)) s left)"; }
limit() { local left=$((deadline - SECONDS - 5)); ((left > $1)) && left=$1; ((left < 15)) && left=0; echo $left; }
AB=/tmp/ab
source scripts/device_trees.sh

if want build; then
  step "build A and B (sm_90), side by side"
  build_tree "$AB/a" "$A_TAR" "" "$OUT/build-a.log" &
  build_tree "$AB/b" "$B_TAR" "" "$OUT/build-b.log" &
  wait
  ls "$AB"/a/src/kvmicro/_native*.so "$AB"/b/src/kvmicro/_native*.so || { echo "BUILD FAILED"; exit 1; }
fi

if want sass; then
  step "SASS of the attention kernels, A against B"
  for side in a b; do
    cuobjdump -sass "$AB/$side"/src/kvmicro/_native*.so >"$AB/sass-$side.txt" 2>/dev/null
    cuobjdump -res-usage "$AB/$side"/src/kvmicro/_native*.so >"$AB/res-$side.txt" 2>/dev/null
  done
  python3 scripts/sass_compare.py "$AB"/sass-{a,b}.txt "$AB"/res-{a,b}.txt >"$OUT/sass.log" 2>&1
  head -1 "$OUT/sass.log"
  grep -E "mma_kernelI6__halfLi128ELi0E|async_kernelI6__halfLi128ELi2E|combine_kernelI6__half" \
    "$OUT/sass.log" | grep -v "Lb1E" | head -6
fi

if want test && (( $(limit 130) > 0 )); then
  step "native CUDA tests of B"
  test_end=$((SECONDS + $(limit 130)))
  b_tests() {  # b_tests LOG LABEL PYTEST-ARGS...: B's tests until the stage's end
    local log=$1 label=$2
    shift 2
    (cd "$AB/b" && PYTHONPATH="$AB/b/src" timeout "$((test_end - SECONDS))" python3 -m pytest -q \
      -p no:cacheprovider -o addopts="" "$@" >"$log" 2>&1; echo "$label rc=$?: $(tail -1 "$log")")
    grep -E "^(FAILED|ERROR)" "$log" | head -8
  }
  [[ -n ${TEST_FIRST:-} ]] && b_tests "$OUT/tests-b-first.log" "B tests -k '$TEST_FIRST'" \
    tests/test_native_cuda.py -k "$TEST_FIRST"
  ((test_end - SECONDS > 15)) && b_tests "$OUT/tests-b.log" "B native tests" \
    tests/test_native_cuda.py tests/test_native_capabilities.py
fi

ab_limit=${AB_LIMIT:-150}
if want ab && (( $(limit "$ab_limit") > 0 )); then
  step "A/B: alternating sweep processes, paged_sdpa graph/${AB_CACHE:-hot}"
  timeout "$(limit "$ab_limit")" python3 scripts/ab_builds.py --a "$AB/a/src" --b "$AB/b/src" \
    --pairs "${PAIRS:-6}" --threshold 2 --out "$OUT/ab" -- --backend native:cuda \
    --op paged_sdpa --ctx "${AB_CTX:-1024,4096,16384}" --batch "${AB_BATCH:-1,4}" --heads 32:8 \
    --head-dim 128 --dtype float16 --layout NSHD --block 16 --placement reverse --timer graph \
    --cache "${AB_CACHE:-hot}" --max-time 0.2 >"$OUT/ab.log" 2>&1
  echo "ab rc=$?"; grep -A12 "^B against A" "$OUT/ab.log"
fi

floor_limit=${FLOOR_LIMIT:-60}
if want floor && (( $(limit "$floor_limit") > 0 )); then
  side=${FLOOR_SIDE:-a}
  step "the fixed cost: build ${side^^}'s paged_sdpa variants"
  specs="native:cuda,native:cuda[pdl=false],native:cuda[combine=last],native:cuda[splits=1]"
  specs="$specs,native:cuda[splits=4],native:cuda[splits=8],native:cuda[splits=32]"
  specs=${FLOOR_SPECS:-$specs}
  PYTHONPATH="$AB/$side/src" timeout "$(limit "$floor_limit")" python3 -m kvmicro sweep \
    --backend "$specs" --op paged_sdpa --ctx "${FLOOR_CTX:-16,256,1024,4096}" \
    --batch "${FLOOR_BATCH:-1}" --heads 32:8 --head-dim 128 \
    --dtype float16 --layout NSHD --block 16 --placement reverse --timer graph --cache hot \
    --max-time 0.2 --out "$OUT/floor.jsonl" -q >"$OUT/floor.log" 2>&1
  echo "floor rc=$?"
  PYTHONPATH="$AB/$side/src" python3 -m kvmicro report "$OUT/floor.jsonl" >>"$OUT/floor.log" 2>&1
  PYTHONPATH="$AB/$side/src" python3 scripts/median_table.py "$OUT/floor.jsonl"
fi

if want ncu && (( $(limit 150) > 0 )); then
  step "ncu: combine=separate against combine=last"
  metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum
  metrics=$metrics,launch__grid_size,launch__registers_per_thread,launch__occupancy_limit_registers
  metrics=$metrics,sm__warps_active.avg.pct_of_peak_sustained_active,sm__cycles_active.avg
  for shape in "1024 1" "32768 4"; do
    for spec in "native:cuda" "native:cuda[combine=last]"; do
      t=$(limit 40); ((t > 0)) || continue
      tag="${shape// /-}-$( [[ $spec == *last* ]] && echo last || echo separate)"
      PYTHONPATH="$AB/a/src" timeout "$t" ncu --clock-control none --kernel-name regex:attention \
        --launch-skip 2 --launch-count 4 --metrics "$metrics" \
        python3 scripts/ncu_case.py $shape "$spec" >"$OUT/ncu-$tag.log" 2>&1
      echo "--- ncu $tag rc=$?"
      grep -E "attention_|gpu__time_duration|dram__throughput|warps_active|grid_size|registers_per|passed" \
        "$OUT/ncu-$tag.log" | sed -E 's/\(int, int, int\)x\(int, int, int\)//; s/  +/ /g' | cut -c1-150 | head -24
    done
  done
  t=$(limit 60)
  if ((t > 0)); then
    PYTHONPATH="$AB/a/src" timeout "$t" ncu --clock-control none --kernel-name regex:attention_split \
      --launch-skip 1 --launch-count 1 --section SpeedOfLight --section Occupancy \
      --section WarpStateStats python3 scripts/ncu_case.py 32768 4 "native:cuda[combine=last]" \
      >"$OUT/ncu-32768-4-last-sections.log" 2>&1
    PYTHONPATH="$AB/a/src" timeout "$t" ncu --clock-control none --kernel-name regex:attention_split \
      --launch-skip 1 --launch-count 1 --section SpeedOfLight --section Occupancy \
      --section WarpStateStats python3 scripts/ncu_case.py 32768 4 "native:cuda" \
      >"$OUT/ncu-32768-4-separate-sections.log" 2>&1
    for f in separate last; do
      echo "--- sections 32768/4 $f"
      grep -E "Duration|DRAM Throughput|Achieved Occupancy|Warp Cycles Per Issued|Theoretical Occ" \
        "$OUT/ncu-32768-4-$f-sections.log" | sed -E 's/  +/ /g' | head -8
    done
  fi
fi
# The device tool brings back only a few files from $OUT: everything but the results files and
# the caller's own log goes into one tarball.
(cd "$OUT" && keep=$(ls | grep -v -e '\.jsonl$' -e '^device_ab\.log$' -e '^ab-logs\.tgz$') \
  && [[ -n $keep ]] && tar czf ab-logs.tgz --remove-files $keep)
echo "done, $((deadline - SECONDS)) s of the budget left"
