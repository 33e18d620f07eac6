#!/usr/bin/env bash
# On the GPU machine (issue 21: where the split kernel's time beyond a read of its bytes goes),
# in one call:
#
#   run(command="bash scripts/device_timeline.sh")
#
# builds the timeline probe (-DKVMICRO_TIMELINE=ON, sm_90, into build/timeline; a diagnostic
# build, never timed for a record), runs the native CUDA tests that name the timeline, then
# scripts/timeline.py over SHAPES (default: the issue's seven) x SPECS (default native:cuda),
# hot and cold. The read floor beside it: scripts/read_floor.py (any build). Output and logs
# go to $OUT (timeline.txt, build and test logs in timeline-logs.tgz).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_common.sh  # gpu_facts, build_native
OUT=${OUT:-/tmp/kvmicro-timeline}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
gpu_facts
start=$SECONDS
build_native "$PWD/build/timeline" "$OUT/logs/build.log" -DKVMICRO_TIMELINE=ON
echo "built in $((SECONDS - start)) s"
timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" -k timeline \
  tests/test_native_cuda.py >"$OUT/logs/tests.log" 2>&1
echo "timeline tests rc=$?: $(tail -1 "$OUT/logs/tests.log")"
grep -E "^(FAILED|ERROR)" "$OUT/logs/tests.log" | head
args=(--cache hot,cold --raw "$OUT/timeline-rows.jsonl")
for shape in ${SHAPES:-1024/1 4096/1 4096/4 16384/1 16384/4 32768/1 32768/4}; do
  args+=(--shape "$shape")
done
IFS=';' read -ra specs <<<"${SPECS:-native:cuda}"
for spec in "${specs[@]}"; do args+=(--spec "$spec"); done
timeout 300 python3 scripts/timeline.py "${args[@]}" 2>&1 | tee "$OUT/timeline.txt"
(cd "$OUT" && tar czf timeline-logs.tgz logs && rm -rf logs)
echo "done in $SECONDS s"
