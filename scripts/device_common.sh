# Sourced by the GPU machine's one-call scripts (scripts/device_*.sh): the two steps each of them
# wrote for itself. nvidia-smi is only queried here; no GPU setting is changed.

# gpu_facts [FIELDS]: one CSV line, no header: the GPU's name, driver, SM clock and its maximum,
# then FIELDS (comma-separated nvidia-smi query fields, e.g. clocks.mem,power.draw), temperature
# and P-state.
gpu_facts() {
  nvidia-smi --query-gpu="name,driver_version,clocks.sm,clocks.max.sm,${1:+$1,}temperature.gpu,pstate" \
    --format=csv,noheader 2>&1
}

# build_native DIR LOG [CMAKE_ARGS...]: kvmicro._native with its CUDA kernels for sm_90, built in
# DIR and installed into src/kvmicro (scripts/dev-build.sh), the build's output in LOG. If the
# build fails: the log's last 30 lines, BUILD FAILED, and the calling script exits 1.
build_native() {
  local dir=$1 log=$2
  shift 2
  KVMICRO_CUDA=ON scripts/dev-build.sh "$dir" -DCMAKE_CUDA_ARCHITECTURES=90 "$@" >"$log" 2>&1 ||
    { tail -30 "$log"; echo "BUILD FAILED"; exit 1; }
}
