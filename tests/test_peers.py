"""The GPU peers cudnn:cuda and flashinfer:cuda: what they refuse (checked everywhere), and on a
machine with an NVIDIA GPU and the packages, every op they claim against the float64 oracle."""

from __future__ import annotations

import importlib.util

import pytest

import kvmicro as kv
from kvmicro.backends.cudnn_backend import CudnnBackend
from kvmicro.backends.flashinfer_backend import FlashInferBackend
from kvmicro.backends.registry import get_backend
from kvmicro.check import check_matrix, compare


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


HAS_CUDA = _has_cuda()
HAS_CUDNN = HAS_CUDA and importlib.util.find_spec("cudnn") is not None
HAS_FLASHINFER = HAS_CUDA and importlib.util.find_spec("flashinfer") is not None
needs_cudnn = pytest.mark.skipif(not HAS_CUDNN, reason="needs a CUDA GPU and nvidia-cudnn-frontend")
needs_flashinfer = pytest.mark.skipif(not HAS_FLASHINFER,
                                      reason="needs a CUDA GPU and flashinfer-python")
FLASHINFER_VARIANTS = [False, True]


def _id(case: kv.Case) -> str:
    return (f"{case.op}-{case.dtype}-{case.layout}-{case.placement}-D{case.head_dim}-"
            f"{case.q_heads}:{case.kv_heads}-bs{case.block_size}-ctx{case.ctx}")


def _check(backend, case: kv.Case, copies: int = 1) -> None:
    arrays = kv.materialize(case)
    prepared = backend.prepare(case, arrays, copies=copies)
    try:
        for i in range(copies):
            prepared.select(i)
            prepared.run()
            prepared.sync()
            result = compare(case, arrays, prepared.output())
            assert result.passed, (case, result)
    finally:
        prepared.release()


# --------------------------------------------------------------------- refusals (no GPU needed)


@pytest.mark.parametrize("layout", ["HSDN", "SDNH", "DHSN"])
def test_cudnn_refuses_a_paged_pool_without_the_head_dim_innermost(layout: str) -> None:
    case = kv.Case(op="paged_sdpa", backend="cudnn:cuda", layout=layout, ctx=64)
    with pytest.raises(kv.Unsupported, match=f"layout {layout} stores {layout[-1]} innermost"):
        CudnnBackend().supports(case)


def test_cudnn_refuses_float32_gather_and_append() -> None:
    backend = CudnnBackend()
    with pytest.raises(kv.Unsupported, match="dtype float32"):
        backend.supports(kv.Case(op="paged_sdpa", backend="cudnn:cuda", dtype="float32"))
    for op in ("gather", "gather_sdpa", "append"):
        with pytest.raises(kv.Unsupported, match=f"does not implement {op}"):
            backend.supports(kv.Case(op=op, backend="cudnn:cuda"))


@pytest.mark.parametrize("layout", ["HNSD", "SDNH", "NSDH"])
def test_flashinfer_refuses_layouts_it_has_no_name_for(layout: str) -> None:
    case = kv.Case(op="paged_sdpa", backend="flashinfer:cuda", layout=layout, ctx=64)
    with pytest.raises(kv.Unsupported, match=f"layout {layout} has no FlashInfer equivalent"):
        FlashInferBackend().supports(case)


def test_flashinfer_refuses_head_dims_and_groups_its_kernels_lack() -> None:
    with pytest.raises(kv.Unsupported, match="got 80"):
        FlashInferBackend().supports(kv.Case(op="paged_sdpa", backend="flashinfer:cuda",
                                             head_dim=80))
    group7 = kv.Case(op="paged_sdpa", backend="flashinfer:cuda", q_heads=28, kv_heads=4,
                     head_dim=128)
    with pytest.raises(kv.Unsupported, match="group 7 needs the tensor-core path"):
        FlashInferBackend(tensor_cores=False).supports(group7)
    FlashInferBackend(tensor_cores=True).supports(group7)


def test_flashinfer_variant_comes_from_the_case_option_or_the_constructor(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMICRO_FLASHINFER_TENSOR_CORES", "1")  # no longer read
    assert FlashInferBackend().variant == "cuda-cores"
    assert FlashInferBackend(tensor_cores=True).variant == "tensor-cores"
    case = kv.Case(op="paged_sdpa", backend="flashinfer:cuda", q_heads=7, kv_heads=1,
                   head_dim=128)
    assert not FlashInferBackend().uses_tensor_cores(case)
    tc = case.with_(options=(("tensor_cores", "true"),))
    assert FlashInferBackend().uses_tensor_cores(tc)
    assert not FlashInferBackend(tensor_cores=True).uses_tensor_cores(
        case.with_(options=(("tensor_cores", "false"),)))
    FlashInferBackend().supports(tc)  # group 7 takes the tensor-core path
    with pytest.raises(kv.InvalidCase, match="option tensor_cores value 'maybe'"):
        FlashInferBackend().supports(case.with_(options=(("tensor_cores", "maybe"),)))


def test_bad_device_indices_are_named() -> None:
    with pytest.raises(kv.InvalidCase, match="-2"):
        CudnnBackend(index=-2)
    with pytest.raises(kv.InvalidCase, match="-2"):
        FlashInferBackend(index=-2)


@pytest.mark.skipif(HAS_CUDNN, reason="cudnn:cuda can run here")
def test_cudnn_says_why_it_is_unavailable() -> None:
    availability = get_backend("cudnn:cuda").availability()
    assert not availability
    assert any(word in availability.reason for word in ("not installed", "CUDA", "cuDNN"))
    with pytest.raises(kv.Unsupported, match="not available here"):
        kv.execute(kv.Case(op="paged_sdpa", backend="cudnn:cuda", ctx=32))


@pytest.mark.skipif(HAS_FLASHINFER, reason="flashinfer:cuda can run here")
def test_flashinfer_says_why_it_is_unavailable() -> None:
    availability = get_backend("flashinfer:cuda").availability()
    assert not availability
    assert any(word in availability.reason for word in ("not installed", "CUDA", "failed"))


# ---------------------------------------------------------------------------------- cudnn (GPU)

CUDNN_MATRIX = list(check_matrix(ops=("sdpa_contiguous", "paged_sdpa"), quick=True))
CORE_SHAPES = [dict(layout=layout, dtype=dtype, block_size=bs, head_dim=hd)
               for layout in ("NSHD", "NHSD") for dtype in ("float16", "bfloat16")
               for bs, hd in ((16, 128), (64, 64))]


@needs_cudnn
@pytest.mark.gpu
@pytest.mark.parametrize("case", CUDNN_MATRIX, ids=_id)
def test_cudnn_matches_the_oracle_or_says_why_not(case: kv.Case) -> None:
    case = case.with_(backend="cudnn:cuda")
    backend = get_backend("cudnn:cuda")
    try:
        backend.supports(case)
        _check(backend, case)
    except kv.Unsupported as exc:
        pytest.skip(f"refused: {exc}")


@needs_cudnn
@pytest.mark.gpu
@pytest.mark.parametrize("shape", CORE_SHAPES, ids=lambda s: "-".join(map(str, s.values())))
def test_cudnn_paged_decode_serves_the_engine_layouts(shape: dict) -> None:
    case = kv.Case(op="paged_sdpa", backend="cudnn:cuda", batch=3, q_heads=32, kv_heads=8,
                   ctx=(1000, 37, 300), placement="fragmented", seed=9, **shape)
    _check(get_backend("cudnn:cuda"), case, copies=2)


# ----------------------------------------------------------------------------- flashinfer (GPU)


def _flashinfer_matrix() -> list[kv.Case]:
    # the matrix's base head_dim (80) is not a FlashInfer size: move those cases to 128
    out = []
    for case in check_matrix(ops=("paged_sdpa", "append"), quick=True):
        case = case.with_(backend="flashinfer:cuda",
                          head_dim=128 if case.head_dim == 80 else case.head_dim)
        if case.layout in ("NSHD", "NHSD") and case.dtype != "float32" and case not in out:
            out.append(case)
    return out


@needs_flashinfer
@pytest.mark.gpu
@pytest.mark.parametrize("tensor_cores", FLASHINFER_VARIANTS, ids=["cuda-cores", "tensor-cores"])
@pytest.mark.parametrize("case", _flashinfer_matrix(), ids=_id)
def test_flashinfer_matches_the_oracle(case: kv.Case, tensor_cores: bool) -> None:
    backend = FlashInferBackend(tensor_cores=tensor_cores)
    if case.op == "append" and tensor_cores:
        pytest.skip("append does not depend on the decode variant")
    try:
        backend.supports(case)
    except kv.Unsupported as exc:
        pytest.skip(f"refused: {exc}")
    _check(backend, case)


@needs_flashinfer
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NSHD", "NHSD"])
def test_flashinfer_paged_decode_over_many_copies(layout: str) -> None:
    case = kv.Case(op="paged_sdpa", backend="flashinfer:cuda", batch=4, q_heads=32, kv_heads=8,
                   head_dim=128, ctx=(2000, 17, 513, 64), block_size=16, layout=layout,
                   placement="random", seed=3)
    _check(FlashInferBackend(), case, copies=3)


# ------------------------------------------------------------------------------ shared (GPU)


def _peers() -> list[tuple[str, object]]:
    out = []
    if HAS_CUDNN:
        out.append(("cudnn", CudnnBackend()))
    if HAS_FLASHINFER:
        out += [("flashinfer-cc", FlashInferBackend(tensor_cores=False)),
                ("flashinfer-tc", FlashInferBackend(tensor_cores=True))]
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDNN or HAS_FLASHINFER), reason="no GPU peer here")
@pytest.mark.parametrize("name,backend", _peers() or [("none", None)])
def test_a_table_pointing_into_unused_blocks_gives_a_wrong_answer(name: str, backend) -> None:
    # negative control (a permuted table would not do: attention is order-invariant)
    case = kv.Case(op="paged_sdpa", backend="x", batch=2, q_heads=32, kv_heads=8, head_dim=128,
                   ctx=(100, 200), block_size=16, layout="NHSD", placement="contiguous", seed=1)
    arrays = kv.materialize(case)
    used = set(arrays["block_table"][arrays["block_table"] >= 0].tolist())
    spare = [i for i in range(arrays["k_pool"].shape[0]) if i not in used]
    bad = dict(arrays, block_table=arrays["block_table"].copy())
    bad["block_table"][1, :4] = spare[:4]
    prepared = backend.prepare(case, bad)
    prepared.run()
    prepared.sync()
    assert not compare(case, arrays, prepared.output()).passed
    prepared.release()


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDNN or HAS_FLASHINFER), reason="no GPU peer here")
@pytest.mark.parametrize("name,backend", _peers() or [("none", None)])
def test_peer_device_and_graph_timers_sample_real_time(name: str, backend) -> None:
    case = kv.Case(op="paged_sdpa", backend="x", batch=2, q_heads=32, kv_heads=8, head_dim=128,
                   ctx=(4096, 1000), block_size=16, layout="NSHD", placement="reverse")
    arrays = kv.materialize(case)
    prepared = backend.prepare(case, arrays, copies=2)
    assert prepared.timers == ("host", "batched", "device", "graph")
    device = prepared.device_times(5, flush_bytes=1 << 20)
    graph = prepared.graph_times(5, 4)
    assert len(device) == 5 and len(graph) == 5 and min(device + graph) > 0
    prepared.sync()
    assert compare(case, arrays, prepared.output()).passed
    prepared.release()


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDNN or HAS_FLASHINFER), reason="no GPU peer here")
def test_peers_describe_their_device() -> None:
    for _, backend in _peers():
        info = backend.device_info()
        assert info.kind == "cuda" and info.cache_bytes > 0
        assert backend.availability()
    if HAS_FLASHINFER:
        assert FlashInferBackend(tensor_cores=True).device_info().extra["variant"] == \
            "tensor-cores"


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDNN or HAS_FLASHINFER), reason="no GPU peer here")
@pytest.mark.parametrize("name,backend", _peers() or [("none", None)])
def test_a_peer_names_the_path_it_runs(name: str, backend) -> None:
    case = kv.Case(op="paged_sdpa", backend="x", batch=2, q_heads=32, kv_heads=8, head_dim=128,
                   ctx=(300, 100), block_size=16, layout="NHSD", placement="reverse")
    prepared = backend.prepare(case, kv.materialize(case))
    try:
        kernel = prepared.kernel
    finally:
        prepared.release()
    expected = {"cudnn": "cudnn sdpa graph (cuDNN 9", "flashinfer-cc": "(cuda-cores, HND)",
                "flashinfer-tc": "(tensor-cores, HND)"}[name]
    assert expected in kernel
