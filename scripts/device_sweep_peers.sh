#!/usr/bin/env bash
# On the GPU machine: the four CUDA backends side by side in one kvmicro sweep (issue 10 item 7),
# after building native:cuda and running the peers' oracle tests. Carry .whl (fetch_device_wheels.sh).
#   run(command="scripts/device_sweep_peers.sh", carry=[".whl"])
# Writes $OUT/peers.jsonl (every record), $OUT/peers_tests.log, $OUT/vs_peers.txt (kvmicro compare
# --new-backend native:cuda against the fastest peer per case) and prints the report last.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_common.sh  # gpu_facts, build_native
OUT=${OUT:-/tmp/kvmicro-sweep}
mkdir -p "$OUT"
source scripts/device_site.sh
build_native "$PWD/build/device" "$OUT/build.log"

if [ "${PEER_TESTS:-1}" = 1 ]; then
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
      tests/test_peers.py tests/test_torch_backend.py -rs >"$OUT/peers_tests.log" 2>&1
  echo "peers tests rc=$?: $(tail -1 "$OUT/peers_tests.log")"
fi

# The issue's table: Hq 32, Hkv 8, D 128, float16, reverse placement over a 2x pool, graph timer,
# hot and cold. Two sweeps because ctx x batch is a cross product; both append to one file.
# FULL=1: the whole seed grid instead (ctx 1k-32k x batch 1/4 x NSHD/HNSD/NHSD x block 16/32/64),
# hot only, for "never slower than the faster peer at any seed-preset shape". PEER_TESTS=0 skips
# the peers' oracle tests (every sweep record is checked against the oracle all the same).
backends=native:cuda,cudnn:cuda,flashinfer:cuda,torch:cuda
start=$SECONDS
if [ "${FULL:-0}" = 1 ]; then
  common=(--preset seed --op paged_sdpa --layout NSHD,HNSD,NHSD --block 16,32,64
          --timer graph --cache hot --max-time 0.3 --out "$OUT/peers.jsonl" -q)
  timeout "${SWEEP_TIMEOUT:-330}" python3 -m kvmicro sweep "${common[@]}" --backend "$backends"
  # the contiguous lower bound does not depend on the pool: one layout, one block size
  timeout 90 python3 -m kvmicro sweep --preset seed --op sdpa_contiguous --layout NSHD --block 16 \
      --timer graph --cache hot --max-time 0.3 --out "$OUT/peers.jsonl" -q --backend "$backends" \
      --resume
  fi_shapes=(--ctx 1024,4096,16384,32768 --batch 1,4)
else
  common=(--preset seed --op sdpa_contiguous,paged_sdpa --layout NSHD,NHSD --block "${BLOCKS:-16}"
          --timer graph --cache hot,cold --max-time 0.5 --out "$OUT/peers.jsonl" -q)
  timeout "${SWEEP_TIMEOUT:-200}" python3 -m kvmicro sweep "${common[@]}" --backend "$backends" \
      --ctx 1024,32768 --batch 1
  timeout "${SWEEP_TIMEOUT:-200}" python3 -m kvmicro sweep "${common[@]}" --backend "$backends" \
      --ctx 4096,16384,32768 --batch 4 --resume
  fi_shapes=(--ctx 1024,4096,16384,32768 --batch 1,4)
fi
# FlashInfer's second decode path (tensor cores) as its own records
timeout 120 python3 -m kvmicro sweep "${common[@]}" \
    --backend 'flashinfer:cuda[tensor_cores=true]' --op paged_sdpa "${fi_shapes[@]}" \
    --out "$OUT/peers_fi_tc.jsonl"
echo "sweeps took $((SECONDS - start)) s"
python3 -m kvmicro report "$OUT/peers.jsonl" "$OUT/peers_fi_tc.jsonl" --columns median_us \
    >"$OUT/report.txt" 2>&1
python3 -m kvmicro compare "$OUT/peers.jsonl" "$OUT/peers_fi_tc.jsonl" --new-backend native:cuda \
    --base-backend cudnn:cuda,flashinfer:cuda --threshold 0 >"$OUT/vs_peers.txt" 2>&1
echo "native:cuda vs the fastest peer (rc=$?): $(grep 'matched cases' "$OUT/vs_peers.txt")"
grep -E "SLOWER|BROKEN" "$OUT/vs_peers.txt" | head -20
tail -60 "$OUT/report.txt"
