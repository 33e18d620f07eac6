#!/usr/bin/env bash
# On the GPU machine, in one call: where each native:cuda paged_sdpa op's time goes, kernel by
# kernel, from Nsight Compute (issue 21: the byte floor):
#
#   run(command="scripts/device_ncu_table.sh")
#
# build (sm_90, build/device; BUILD=0 uses the extension in src/kvmicro), then one ncu run
# (--clock-control none; ncu flushes the caches before every profiled kernel, so these are cold
# durations, one kernel at a time: no launch overlaps another, PDL included) over
# scripts/ncu_case.py's SHAPES (default the issue's table: 1024/1 4096/1 4096/4 16384/1 16384/4
# 32768/1 32768/4) x SPECS (';'-separated, default the planner's choice and the pipelined kernels:
# native:cuda;native:cuda[kernel=async];native:cuda[kernel=bulk]), RUNS profiled runs per case
# after its checked run (default 2). Then the same for SECTIONS_SHAPE (default 32768/4) with the
# SpeedOfLight, Occupancy and WarpStateStats sections, one split launch per spec. Prints a table:
# per case the split and combine kernels' median duration, the split kernel's DRAM throughput
# (% of peak) and its read rate. Everything stays inside BUDGET seconds (default 540). Logs and
# the raw CSV go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_common.sh  # gpu_facts, build_native
OUT=${OUT:-/tmp/kvmicro-ncu-table}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${BUDGET:-540}))
step() { echo "=== $* ($(date +%T), $((deadline - SECONDS)) s left)"; }
left() { echo $((deadline - SECONDS - ${1:-10})); }

step "gpu"
gpu_facts
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src"
if [ "${BUILD:-1}" = 1 ]; then
  step "build (sm_90)"
  build_native "$PWD/build/device" "$OUT/build.log"
fi
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /usr/local/cuda-*/bin/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "ncu not found"; exit 1; }

shapes=${SHAPES:-1024/1 4096/1 4096/4 16384/1 16384/4 32768/1 32768/4}
IFS=';' read -r -a specs <<<"${SPECS:-native:cuda;native:cuda[kernel=async];native:cuda[kernel=bulk]}"
case_args=()
for s in $shapes; do case_args+=(--shape "$s"); done
for s in "${specs[@]}"; do case_args+=(--spec "$s"); done
metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
metrics=$metrics,dram__bytes_read.sum,launch__grid_size,launch__registers_per_thread
metrics=$metrics,sm__warps_active.avg.pct_of_peak_sustained_active

step "ncu: ${shapes} x ${specs[*]}"
timeout "$(left 120)" "$ncu" --clock-control none --kernel-name regex:attention_ --csv \
  --page raw --print-units base --metrics "$metrics" --log-file "$OUT/ncu-table.csv" \
  python3 scripts/ncu_case.py "${case_args[@]}" --runs "${RUNS:-2}" >"$OUT/ncu-table.log" 2>&1
echo "ncu rc=$?; $(grep -c '^profile:' "$OUT/ncu-table.log") cases profiled"
grep -m3 -iE "error|fail" "$OUT/ncu-table.log"

sections_shape=${SECTIONS_SHAPE:-32768/4}
for spec in "${specs[@]}"; do
  t=$(left 40)
  ((t > 20)) || { echo "sections: no time left"; break; }
  tag=$(echo "$spec" | tr -c 'A-Za-z0-9=\n' '-')
  timeout "$t" "$ncu" --clock-control none --kernel-name regex:attention_split --launch-skip 1 \
    --launch-count 1 --section SpeedOfLight --section Occupancy --section WarpStateStats \
    python3 scripts/ncu_case.py --shape "$sections_shape" --spec "$spec" --runs 1 \
    >"$OUT/ncu-sections-$tag.log" 2>&1
  echo "--- sections $sections_shape $spec (rc=$?)"
  grep -E "^  +(Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued Instruction|Registers Per Thread|Dynamic Shared Memory Per Block)" \
    "$OUT/ncu-sections-$tag.log" | sed -E 's/  +/ /g' | head -10
done

step "summary"
python3 - "$OUT/ncu-table.csv" "$OUT/ncu-table.log" <<'PY' | tee "$OUT/ncu-table.txt"
import csv, statistics, sys
rows = list(csv.reader(open(sys.argv[1])))
head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
cols = rows[head]
launches = [dict(zip(cols, r)) for r in rows[head + 1:] if len(r) == len(cols) and r[0].isdigit()]
cases = [line.split(" ", 4)[1:] for line in open(sys.argv[2]) if line.startswith("profile:")]
per_case = [1 + int(runs) for _, _, runs, _ in cases]
# Each run launches one split kernel, then a combine kernel where it has splits to merge.
runs = []
for launch in launches:
    if "attention_split" in launch["Kernel Name"] or not runs:
        runs.append({"split": launch})
    else:
        runs[-1]["combine"] = launch
def num(launch, metric):
    return float(launch[metric].replace(",", ""))
print("ncu --clock-control none, caches flushed before each kernel (cold), one kernel at a time;")
print("medians over each case's runs; split read = dram__bytes_read / duration")
print(f"{'spec':34} {'ctx/B':>8} {'grid':>5} {'regs':>4} {'split us':>8} {'comb us':>7} "
      f"{'sum us':>7} {'DRAM %':>6} {'read GB/s':>9} {'MB read':>8}")
start = 0
for (spec, shape, _, _), n in zip(cases, per_case):
    mine = runs[start:start + n]
    start += n
    if not mine:
        continue
    split = [num(r["split"], "gpu__time_duration.sum") / 1e3 for r in mine]
    comb = [num(r["combine"], "gpu__time_duration.sum") / 1e3 for r in mine if "combine" in r]
    dram = [num(r["split"], "dram__throughput.avg.pct_of_peak_sustained_elapsed") for r in mine]
    read = [num(r["split"], "dram__bytes_read.sum") for r in mine]
    s, c = statistics.median(split), statistics.median(comb) if comb else 0.0
    gbps = statistics.median(b / (t * 1e3) for b, t in zip(read, split))
    first = mine[0]["split"]
    print(f"{spec:34} {shape:>8} {first['launch__grid_size']:>5} "
          f"{first['launch__registers_per_thread']:>4} {s:8.2f} {c:7.2f} {s + c:7.2f} "
          f"{statistics.median(dram):6.1f} {gbps:9.0f} {statistics.median(read) / 1e6:8.2f}")
PY
echo "done in $SECONDS s; files in $OUT"
