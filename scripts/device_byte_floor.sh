#!/usr/bin/env bash
# On the GPU machine (issue 21: native:cuda paged decode at the byte floor), in one call:
#
#   run(command="scripts/device_byte_floor.sh", carry=[".whl"])
#
# build (sm_90, build/device), tests/test_native_cuda.py (TEST_LIMIT seconds at most, default
# 150; TEST_K: only the tests pytest -k selects), compute-sanitizer memcheck / racecheck / synccheck over scripts/sanitize_cuda.py's
# variants with option VARIANT (default combine=cluster; SANITIZE_ONLY replaces it there, e.g.
# `default`; skipped when the tool is absent), then
# one paged_sdpa sweep of native:cuda (the default: combine=separate), native:cuda[VARIANT],
# cuDNN and FlashInfer: Hq 32 Hkv 8 D 128 fp16, ctx/batch 1024/1,
# 4096/1, 4096/4, 16384/1, 16384/4, 32768/1, 32768/4, NSHD/NHSD x block 16/32/64, reverse
# placement (random placement at block 16 after it when time is left), graph timer, hot and
# cold. Everything stays inside BUDGET seconds (default 550; a device call may run 600): each
# stage gets what is left, the sweep is stopped with SIGINT (its records so far are kept) if
# it would run past. .whl comes from scripts/fetch_device_wheels.sh. Logs and results go to $OUT;
# the last things printed are two `kvmicro compare`s and the short tables (each backend's best
# per shape, then scripts/cuda_table.py's). A dry run on a machine without a GPU: BUILD=0 (use
# the extension already in src/kvmicro) PEERS=0 (do not install the carried wheels); every CUDA
# stage then skips.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_common.sh  # gpu_facts, build_native
OUT=${OUT:-/tmp/kvmicro-byte-floor}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${BUDGET:-550}))
step() { echo "=== $* ($(date +%T), $((deadline - SECONDS)) s left)"; }
# limit MAX [RESERVE]: seconds a stage may take: at most MAX, leaving RESERVE (default 15) for
# what follows; 0 when fewer than 20 would be left (the stage is skipped)
limit() {
  local left=$((deadline - SECONDS - ${2:-15}))
  ((left > $1)) && left=$1
  ((left < 20)) && left=0
  echo "$left"
}

step "gpu"
gpu_facts
if [ "${PEERS:-1}" = 1 ] && [ -d .whl ]; then
  source scripts/device_site.sh  # exits the script if the carried wheels do not install
else
  echo "peers not installed (PEERS=0 or no .whl carried): cudnn:cuda / flashinfer:cuda will skip"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src"

if [ "${BUILD:-1}" = 0 ]; then  # a dry run elsewhere: the extension already in src/kvmicro
  step "build skipped (BUILD=0)"
else
  step "build (sm_90)"
  start=$SECONDS
  build_native "$PWD/build/device" "$OUT/build.log"
  echo "built in $((SECONDS - start)) s"
fi
python3 -c "import kvmicro._native as n; print(n.build_info()['cuda'], 'devices', n.cuda_device_count())"

variant=${VARIANT:-combine=cluster}
t=$(limit "${TEST_LIMIT:-150}" 330)
if ((t > 0)); then
  step "tests/test_native_cuda.py (${t} s at most)"
  timeout "$t" python3 -m pytest -q -p no:cacheprovider -o addopts="" ${TEST_K:+-k "$TEST_K"} \
    tests/test_native_cuda.py tests/test_native_capabilities.py >"$OUT/tests.log" 2>&1
  rc=$?
  echo "native tests rc=$rc$([ $rc = 124 ] && echo ' (TIMED OUT: incomplete)'): $(tail -1 "$OUT/tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -12
else
  echo "tests skipped: not enough of BUDGET left"
fi

sanitize_only=${SANITIZE_ONLY:-$variant}
step "compute-sanitizer over the $sanitize_only variants (scripts/sanitize_cuda.py --only $sanitize_only)"
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer \
  /usr/local/cuda-*/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
  2>/dev/null | head -1)
if [ -n "$sanitizer" ]; then
  for spec in memcheck:45 racecheck:45 synccheck:30; do
    tool=${spec%%:*}
    t=$(limit "${spec##*:}" 230)
    if ((t == 0)); then echo "$tool: skipped, no time left"; continue; fi
    timeout "$t" "$sanitizer" --tool "$tool" --error-exitcode 3 \
      python3 scripts/sanitize_cuda.py --only "$sanitize_only" >"$OUT/sanitize-$tool.log" 2>&1
    rc=$?
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize_cuda:" "$OUT/sanitize-$tool.log" | tr '\n' ' ')
    echo "$tool rc=$rc$([ $rc = 124 ] && echo ' (TIMED OUT: incomplete)'): $summary"
    grep -m3 -E "MISMATCH|Invalid|Race|Barrier|error" "$OUT/sanitize-$tool.log" | cut -c1-200
  done
else
  echo "compute-sanitizer not found (PATH, /usr/local/cuda*): skipped"
fi

# One file for every record; the second and third commands resume into it.
backends="native:cuda,native:cuda[$variant],cudnn:cuda,flashinfer:cuda"
common=(--preset cuda-table --op paged_sdpa --heads 32:8 --head-dim 128 --dtype float16
        --layout NSHD,NHSD --timer graph --cache hot,cold --backend "$backends"
        --out "$OUT/h200-byte-floor.jsonl" -q)
sweep() {  # sweep SECONDS ARGS...: stopped by SIGINT (records so far kept) at SECONDS
  local t=$1
  shift
  timeout -s INT -k 15 "$t" python3 -m kvmicro sweep "${common[@]}" "$@"
  local rc=$?
  echo "sweep rc=$rc$([ $rc = 124 ] || [ $rc = 130 ] && echo ' (stopped by the time limit)')"
}
t=$(limit 200 25)
if ((t > 0)); then
  step "sweep: ${backends}, reverse placement, blocks 16/32/64 (${t} s at most)"
  sweep "$((t * 1 / 5))" --placement reverse --block 16,32,64 --ctx 1024 --batch 1 --max-time 0.2
  t=$(limit 200 25)
  ((t > 0)) && sweep "$t" --placement reverse --block 16,32,64 --ctx 4096,16384,32768 \
    --batch 1,4 --max-time 0.2 --resume
fi
t=$(limit 90 25)
if ((t >= 40)); then
  step "sweep: the same at block 16, random placement (${t} s at most)"
  sweep "$t" --placement random --block 16 --ctx 4096,16384,32768 --batch 1,4 --max-time 0.15 \
    --resume
fi

step "summary"
python3 - "$OUT/h200-byte-floor.jsonl" <<'PY'
import collections, sys
from kvmicro.results import read_results
try:
    _, cases = read_results(sys.argv[1])
except Exception as err:  # no file: the sweep never started
    sys.exit(f"no records: {err}")
def spec(c):
    options = ",".join(f"{k}={v}" for k, v in sorted(dict(c.get("options") or {}).items()))
    return c["backend"] + (f"[{options}]" if options else "")
count = collections.Counter((spec(c), c["status"]) for c in cases)
print(" ".join(f"{s} {st} {n};" for (s, st), n in sorted(count.items())))
# The issue's table: per ctx/B and cache, each backend's best median over layouts x blocks x
# placements (where it was measured), µs, and where that best was.
best = {}
for c in cases:
    if c["status"] != "ok" or c["op"] != "paged_sdpa":
        continue
    key = (c["ctx"], c["batch"], c["cache"].split(":")[0], spec(c))
    m = c["stats"]["median_us"]
    if key not in best or m < best[key][0]:
        best[key] = (m, f'{c["layout"]}/{c["block_size"]}/{c["placement"][:3]}')
specs = sorted({k[3] for k in best}, key=lambda s: (not s.startswith("native"), s))
print("best paged_sdpa median, µs (layout/block/placement):")
print("ctx/B cache  " + "  ".join(f"{s:>21}" for s in specs))
for shape in sorted({k[:3] for k in best}):
    cells = [best.get((*shape, s)) for s in specs]
    print(f"{shape[0]}/{shape[1]} {shape[2]:4} " + "  ".join(
        f"{c[0]:7.2f} {c[1]:>13}" if c else f"{'-':>21}" for c in cells))
PY
python3 scripts/cuda_table.py "$OUT/h200-byte-floor.jsonl" >"$OUT/cuda-table.txt" 2>&1
python3 -m kvmicro compare "$OUT/h200-byte-floor.jsonl" --new-backend "native:cuda[$variant]" \
  --base-backend "native:cuda[]" >"$OUT/variant-vs-default.txt" 2>&1
echo "$variant vs the default (rc=$?): $(grep -m1 -i matched "$OUT/variant-vs-default.txt")"
python3 -m kvmicro compare "$OUT/h200-byte-floor.jsonl" --new-backend "native:cuda[]" \
  --base-backend cudnn:cuda,flashinfer:cuda >"$OUT/default-vs-peers.txt" 2>&1
echo "the default vs the fastest peer (rc=$?): $(grep -m1 -i matched "$OUT/default-vs-peers.txt")"
cat "$OUT/cuda-table.txt"
echo "done in $((SECONDS)) s; files in $OUT"
