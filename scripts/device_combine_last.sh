#!/usr/bin/env bash
# On the GPU machine (issue 21: why combine=last is slower), one call:
#   run(command="bash scripts/device_combine_last.sh", carry=[".carry/ab"])
# with .carry/ab/a.tar = `git archive <commit> csrc src scripts tests cmake CMakeLists.txt
# pyproject.toml`. TREES (default "a n") names the builds, side by side:
#   a  that tree as it is;
#   n  merge_splits __noinline__ (scripts/kernel_patches.py noinline), so that the merge's
#      code cannot shape the split kernel's main loop;
#   r  the slice re-derived after the main loop (kernel_patches.py relive), so that no
#      value of it has to live through the loop;
#   l  __launch_bounds__(128, 2) on the combine=last tensor-core kernels (... bounds_last);
#   m  the same on both modes' tensor-core kernels (... bounds).
# Then: the loops of each build's fp16 D128 split kernels, main loops included
# (scripts/sass_loops.py), one sweep per build of
# combine=separate and combine=last (paged_sdpa, graph timer, hot), and with CALIBRATE=1 (the
# default) the verdict calibration on native:cuda with build a. Records and logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
L=/tmp/ab/logs; mkdir -p $L
trees=${TREES:-a n}
echo "=== build: $trees ($(date +%T))"
source scripts/device_trees.sh
for side in $trees; do
  case $side in
    a) patch="" ;;
    n) patch=noinline ;;
    r) patch=relive ;;
    l) patch=bounds_last ;;
    m) patch=bounds ;;
    *) echo "TREES: unknown tree $side (a n r l m)"; exit 2 ;;
  esac
  build_tree /tmp/ab/$side .carry/ab/a.tar "$patch" $L/build-$side.log &
done
wait
pats="mma_kernelI6__halfLi128ELi0E async_kernelI6__halfLi128ELi2E"
for side in $trees; do
  so=$(ls /tmp/ab/$side/src/kvmicro/_native*.so)
  cuobjdump -sass "$so" > /tmp/ab/sass-$side.txt 2>/dev/null
  echo "--- SASS loops, build $side"
  python3 scripts/sass_loops.py /tmp/ab/sass-$side.txt $pats | tee $L/loops-$side.txt
done
echo "=== sweeps: combine=separate and last per build ($(date +%T))"
args="--op paged_sdpa --ctx 1024,4096,16384,32768 --batch 1,4 --heads 32:8 --head-dim 128
  --dtype float16 --layout NSHD --block 16 --placement reverse --timer graph --cache hot
  --max-time 0.2 -q"
for side in $trees; do
  # shellcheck disable=SC2086
  PYTHONPATH=/tmp/ab/$side/src timeout 100 python3 -m kvmicro sweep \
    --backend 'native:cuda,native:cuda[combine=last]' $args \
    --out "$OUT/h200-combine-last-$side.jsonl" > $L/sweep-$side.log 2>&1
  echo "sweep $side rc=$?"
done
python3 scripts/median_table.py $(for side in $trees; do echo "$OUT/h200-combine-last-$side.jsonl=$side"; done)
if [[ ${CALIBRATE:-1} == 1 && " $trees " == *" a "* ]]; then
  echo "=== verdict calibration on native:cuda, current paired rule ($(date +%T))"
  (cd /tmp/ab/a && PYTHONPATH=/tmp/ab/a/src timeout 230 python3 scripts/calibrate_verdicts.py \
    --backend native:cuda --repeats 3 --max-time 0.5 --out /tmp/ab/calib > $L/calibration.log 2>&1)
  echo "calibration rc=$?"; tail -14 $L/calibration.log
fi
(cd /tmp/ab && tar czf $OUT/combine-last-logs.tgz logs calib 2>/dev/null); ls $OUT
