#!/usr/bin/env bash
# On the GPU machine, one call (issue 15: what passing OpParams to the kernels costs; issue 21:
# what combine=last executes):
#   run(command="bash scripts/device_ab_padded.sh", carry=[".carry/ab"])
# with .carry/ab/a.tar as for device_combine_last.sh. Builds A and B' = A with two members that
# no kernel reads appended to AttnArgs (an OpParams and a PartitionParams: B's argument size
# without B's code change; scripts/kernel_patches.py pad_args), A/B of the two (scripts/ab_builds.py), then ncu's instruction and
# stall counts of A's split kernel under combine=separate and combine=last at 32768/4.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
L=/tmp/ab/logs; mkdir -p $L
source scripts/device_trees.sh
for side in a bp; do  # a warm machine keeps what an earlier call built
  [[ -f /tmp/ab/$side/src/kvmicro/_native.cpython-312-x86_64-linux-gnu.so ]] && continue
  patch=""; [[ $side == bp ]] && patch=pad_args
  build_tree /tmp/ab/$side .carry/ab/a.tar "$patch" $L/build-$side.log &
done
wait
echo "=== A/B: A against B' ($(date +%T))"
timeout 200 python3 scripts/ab_builds.py --a /tmp/ab/a/src --b /tmp/ab/bp/src --pairs 6 --threshold 2 --out /tmp/ab/abp -- \
  --backend native:cuda --op paged_sdpa --ctx 1024,4096 --batch 1,4 --heads 32:8 --head-dim 128 --dtype float16 \
  --layout NSHD --block 16 --placement reverse --timer graph --cache hot --max-time 0.2 > $L/abp.log 2>&1
echo "abp rc=$?"; grep -v "^kvmicro sweep\|^pair" $L/abp.log | tail -8
echo "=== ncu instructions, 32768/4, separate vs last ($(date +%T))"
m=gpu__time_duration.sum,smsp__inst_executed.sum,smsp__sass_inst_executed_op_global_ld.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct,smsp__warp_issue_stalled_no_instruction_per_warp_active.pct,smsp__warp_issue_stalled_barrier_per_warp_active.pct
for spec in "native:cuda" "native:cuda[combine=last]"; do
  PYTHONPATH=/tmp/ab/a/src timeout 60 ncu --clock-control none --kernel-name regex:attention_split \
    --launch-skip 1 --launch-count 1 --metrics $m python3 scripts/ncu_case.py 32768 4 "$spec" > $L/ncu-$spec.log 2>&1
  echo "--- $spec rc=$?"; grep -E "gpu__|smsp__|dram__" "$L/ncu-$spec.log" | sed -E 's/  +/ /g'
done
(cd /tmp/ab && tar czf $OUT/step3-logs.tgz logs abp 2>/dev/null); ls $OUT
