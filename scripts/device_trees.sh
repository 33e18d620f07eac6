# Sourced by the GPU-machine scripts that build several trees side by side (device_ab.sh,
# device_ab_padded.sh, device_combine_last.sh); run them from the repository root.
#
#   build_tree DEST TARBALL [PATCH [LOG]]
#
# extracts TARBALL (`git archive <commit> csrc src scripts tests cmake CMakeLists.txt
# pyproject.toml`) into DEST, applies `scripts/kernel_patches.py PATCH` when PATCH is given,
# builds it (sm_90; KVMICRO_CUDA=ON unless set) into DEST/src/kvmicro with its log in LOG
# (default DEST.build.log) and prints "build NAME rc=N". Start several with & and `wait`.
build_tree() {
  local dest=$1 tarball=$2 patch=${3:-} log=${4:-$1.build.log} name
  name=$(basename "$dest")
  rm -rf "$dest" && mkdir -p "$dest" && tar -xf "$tarball" -C "$dest" \
    || { echo "build $name: cannot extract $tarball"; return 1; }
  if [[ -n $patch ]]; then
    python3 scripts/kernel_patches.py "$patch" "$dest" >/dev/null \
      || { echo "build $name: patch $patch failed"; return 1; }
  fi
  (cd "$dest" && KVMICRO_CUDA=${KVMICRO_CUDA:-ON} scripts/dev-build.sh "$dest/build" \
    -DCMAKE_CUDA_ARCHITECTURES=90 >"$log" 2>&1)
  echo "build $name rc=$?"
}
