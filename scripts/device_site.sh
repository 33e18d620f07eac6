# Sourced by the GPU-machine scripts that need the carried peers (cudnn frontend, FlashInfer, from
# .whl/, see fetch_device_wheels.sh): installs them into $SITE without dependencies or network and
# puts them and src/ on PYTHONPATH. Run from the repository root.
SITE=${SITE:-/tmp/kvmicro-site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || exit 1
tar -C "$SITE" -xJf .whl/flashinfer-trimmed.tar.xz || exit 1
export PYTHONPATH="$SITE:$PWD/src" PYTHONUNBUFFERED=1 FLASHINFER_CUDA_ARCH_LIST=9.0a
