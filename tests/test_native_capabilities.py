"""The native kernels' capability table (csrc/common/capabilities.h, ``_native.capabilities()``).

It is the one list of what the native kernels support: the native backends' ``supports()`` read
it, and the CUDA kernels' instantiation lists (the planners' pickers, probed without a device
through ``_native.cuda_instantiations()``) must hold exactly what it declares, no more, no less.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvmicro import _native
from kvmicro.backends.native import NativeCpuBackend, NativeCudaBackend, capabilities
from kvmicro.errors import Unsupported
from kvmicro.workload import ATTENTION_OPS, DTYPES, OPS, Case

TABLE = capabilities()
HAS_CUDA_BUILD = bool(_native.build_info()["cuda"])


def test_the_table_covers_every_op_on_both_devices() -> None:
    assert set(TABLE) == {"cpu", "cuda"}
    for device in TABLE:
        assert set(TABLE[device]) == set(OPS)
        for op, entry in TABLE[device].items():
            assert set(entry["dtypes"]) <= set(DTYPES) and entry["dtypes"], (device, op)
    for op in OPS:
        assert TABLE["cpu"][op]["head_dims"] is None  # any head_dim on the CPU
    for op in ("gather", "append"):
        assert TABLE["cuda"][op]["head_dims"] is None  # byte movers
    for op in ATTENTION_OPS:
        entry = TABLE["cuda"][op]
        assert entry["head_dims"] == [64, 80, 96, 128, 256]
        assert entry["variants"] == ["simt", "mma", "async", "bulk"] == list(entry["kernels"])
        for kernel in ("mma", "async", "bulk"):
            assert entry["kernels"][kernel]["dtypes"] == ["float16", "bfloat16"]
            assert set(entry["kernels"][kernel]["head_dims"]) <= set(entry["head_dims"])


def _expected_instances(op: str) -> set[tuple[str, str, int, str]]:
    """What the table says the pickers must instantiate for ``op``'s row source."""
    kernels: dict[str, Any] = TABLE["cuda"][op]["kernels"]
    paths = ("16-byte", "strided") if op == "paged_sdpa" else ("16-byte",)
    expected = {("simt", dtype, d, f"gt{gt}/{path}")
                for dtype in kernels["simt"]["dtypes"] for d in kernels["simt"]["head_dims"]
                for gt in (1, 4, 8) for path in paths}
    for kernel, variants in (("mma", ("prefetch0", "prefetch128")),
                             ("async", ("stages2", "stages3")), ("bulk", ("stages2", "stages3"))):
        expected |= {(kernel, dtype, d, variant)
                     for dtype in kernels[kernel]["dtypes"] for d in kernels[kernel]["head_dims"]
                     for variant in variants}
    return expected


@pytest.mark.skipif(not HAS_CUDA_BUILD, reason="this kvmicro._native was built without CUDA")
@pytest.mark.parametrize("op", ["paged_sdpa", "sdpa_contiguous"])
def test_the_cuda_instantiations_are_exactly_the_table(op: str) -> None:
    # No device needed: a picker returns a kernel's host-side address, or null.
    instantiated = [tuple(item) for item in _native.cuda_instantiations()[op]]
    assert len(instantiated) == len(set(instantiated))
    expected = _expected_instances(op)
    assert set(instantiated) - expected == set(), "instantiated but not in the table"
    assert expected - set(instantiated) == set(), "in the table but not instantiated"
    # gather_sdpa's attention half is sdpa_contiguous's kernels: the same table row
    assert TABLE["cuda"]["gather_sdpa"] == TABLE["cuda"]["sdpa_contiguous"]


def test_cuda_supports_reads_the_table() -> None:
    # supports() needs no device: it answers from the table alone.
    backend = NativeCudaBackend()
    case = Case(op="paged_sdpa", backend="native:cuda", batch=1, q_heads=4, kv_heads=2,
                head_dim=72, ctx=64, dtype="float16")
    with pytest.raises(Unsupported, match=r"\[paged_sdpa\] head_dim 72 is not supported by "
                                          r"native:cuda \(supported: 64, 80, 96, 128, 256\)"):
        backend.supports(case)
    backend.supports(case.with_(op="gather"))  # any head_dim
    backend.supports(case.with_(head_dim=80))
    mma = case.with_(head_dim=80, options=(("kernel", "mma"),))
    with pytest.raises(Unsupported, match=r"option kernel=mma needs tensor cores: "
                                          r"float16/bfloat16, D innermost, head_dim 64, 96, 128; "
                                          r"this case is float16, D innermost, head_dim 80"):
        backend.supports(mma)
    with pytest.raises(Unsupported, match="D not innermost"):
        backend.supports(mma.with_(head_dim=128, layout="SDNH"))
    with pytest.raises(Unsupported, match="this case is float32"):
        backend.supports(mma.with_(head_dim=128, dtype="float32", options=(("kernel", "async"),)))
    backend.supports(mma.with_(head_dim=128))
    backend.supports(mma.with_(op="sdpa_contiguous", head_dim=96, layout="SDNH"))  # dense rows


@pytest.mark.parametrize("head_dim", [1, 20, 72, 200, 512])
def test_cpu_supports_any_head_dim(head_dim: int) -> None:
    case = Case(op="paged_sdpa", backend="native:cpu", batch=1, q_heads=2, kv_heads=1,
                head_dim=head_dim, ctx=10, dtype="bfloat16")
    NativeCpuBackend().supports(case)
