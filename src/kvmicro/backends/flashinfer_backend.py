"""FlashInfer's paged decode as a peer backend: ``flashinfer:cuda``.

The serving engines' kernel (vLLM, SGLang and others call it), reached through
``flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper``: ``plan`` runs in ``prepare`` (it
schedules the split-KV work on the host and uploads it), ``run`` in ``run``. FlashInfer names
two pool layouts: ``kv_layout="NHD"`` is our NSHD (``[pages, slots, heads, dim]``) and ``"HND"``
our NHSD (``[pages, heads, slots, dim]``); every other layout is refused. The block table becomes
FlashInfer's CSR form (``indptr``, ``indices``, ``last_page_len``) once, at prepare.

FlashInfer has two decode paths: the CUDA-core decode kernel and, with ``use_tensor_cores=True``,
its prefill kernel run with one query row per request (``fa2``). Both are this backend; which one
is the case's ``tensor_cores`` option (``flashinfer:cuda[tensor_cores=true]``, part of the record;
the constructor's ``tensor_cores`` is the default a case without the option gets), named by the
prepared case's ``kernel`` and ``variant`` (``cuda-cores`` / ``tensor-cores``).

``append`` goes through ``flashinfer.page.append_paged_kv_cache``, which writes token ``ctx[b]``
of each sequence into its page.

FlashInfer compiles its kernels on first use (JIT, tens of seconds per head_dim x dtype), and
caches them under ``~/.cache/flashinfer``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from ..errors import Unsupported
from ..workload import Case
from .base import Availability, Backend, DeviceInfo, Option, Prepared
from .common import cuda_backend_name, require, validate_arrays
from .torch_backend import (
    TorchPrepared,
    cuda_availability,
    cuda_bandwidth,
    cuda_device_info,
    import_torch,
    index_tensor,
    to_carrier_array,
    to_device,
    torch_dtype,
)

#: our layout -> FlashInfer's kv_layout
KV_LAYOUTS: dict[str, str] = {"NSHD": "NHD", "NHSD": "HND"}
#: head sizes FlashInfer's decode kernels are built and documented for
HEAD_DIMS: tuple[int, ...] = (64, 128, 256)
#: GQA group sizes the CUDA-core decode kernel dispatches on (DISPATCH_GQA_GROUP_SIZE)
CUDA_CORE_GROUPS: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 16)
#: FlashInfer's recommended float workspace for split-KV partial results
WORKSPACE_BYTES = 128 * 1024 * 1024
#: the case option that picks FlashInfer's tensor-core decode path (module docstring)
TENSOR_CORES_OPTION = Option("bool", False, help="FlashInfer's tensor-core decode path (fa2 "
                                                 "prefill, one query row); false: CUDA cores")


def _import_flashinfer() -> tuple[Any, Any]:
    import flashinfer.decode as decode
    import flashinfer.page as page

    return decode, page


def _flashinfer_version() -> str:
    try:
        from flashinfer.version import __version__
    except Exception:  # provenance only
        return "?"
    return str(__version__)


def _csr(case: Case, table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The block table as FlashInfer's paged-KV CSR: ``indptr`` [B+1], ``indices`` (every
    sequence's pages in order), ``last_page_len`` [B] (1..block_size). ``stored_tokens`` counts
    the slot an append writes, so for append these describe the cache after the write, as
    ``append_paged_kv_cache`` requires."""
    blocks = np.asarray(case.blocks_per_seq, dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(blocks)]).astype(np.int32)
    indices = np.concatenate([table[b, :n] for b, n in enumerate(blocks)]).astype(np.int32)
    tokens = np.asarray(case.stored_tokens, dtype=np.int64)
    last = ((tokens - 1) % case.block_size + 1).astype(np.int32)
    return indptr, indices, last


class _FlashInferPrepared(TorchPrepared):
    def __init__(self, backend: FlashInferBackend, case: Case, arrays: dict[str, np.ndarray],
                 copies: int, tensor_cores: bool) -> None:
        torch = import_torch()
        super().__init__(case, torch.device("cuda", backend.index), "cuda", copies)
        self._decode, self._page = _import_flashinfer()
        self._tensor_cores = tensor_cores
        self._kv_layout = KV_LAYOUTS[case.layout]
        self._workspace: Any = None
        self._wrappers: list[Any] = []  # each holds the plan (and int workspace) run() reads
        with torch.cuda.device(self.device):
            self._build(arrays)

    def _make_set(self, arrays: dict[str, np.ndarray],
                  copy: int) -> tuple[Callable[[], None], Callable[[], Any]]:
        torch = import_torch()
        case, dev, dt = self.case, self.device, self.case.dtype
        table = np.asarray(arrays["block_table"])
        indptr, indices, last = _csr(case, table)
        indptr_t = index_tensor(indptr, dev, torch.int32)
        indices_t = index_tensor(indices, dev, torch.int32)
        last_t = index_tensor(last, dev, torch.int32)
        k_pool = to_device(arrays["k_pool"], dt, dev)
        v_pool = to_device(arrays["v_pool"], dt, dev)
        kv_layout = self._kv_layout
        if case.op == "append":
            k_new = to_device(arrays["k_new"], dt, dev)
            v_new = to_device(arrays["v_new"], dt, dev)
            ctx = np.asarray(arrays["ctx"], dtype=np.int32)
            batch_indices = index_tensor(np.arange(case.batch), dev, torch.int32)
            positions = index_tensor(ctx, dev, torch.int32)
            append = self._page.append_paged_kv_cache

            def call_append() -> None:
                append(k_new, v_new, batch_indices, positions, (k_pool, v_pool), indices_t,
                       indptr_t, last_t, kv_layout=kv_layout)

            return call_append, lambda: (to_carrier_array(k_pool), to_carrier_array(v_pool))

        if self._workspace is None:  # split-KV scratch: runs are serial, so copies share it
            self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
        wrapper = self._decode.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, kv_layout=kv_layout, use_tensor_cores=self._tensor_cores)
        try:
            wrapper.plan(indptr_t, indices_t, last_t, case.q_heads, case.kv_heads,
                         case.head_dim, case.block_size, pos_encoding_mode="NONE",
                         q_data_type=torch_dtype(dt), kv_data_type=torch_dtype(dt),
                         sm_scale=case.softmax_scale)
        except (TypeError, AttributeError, NameError):
            raise
        except Exception as exc:  # FlashInfer's own refusal (shape, group size, build)
            raise Unsupported(f"FlashInfer refused paged_sdpa ({self.variant}, {case.dtype}, "
                              f"head_dim {case.head_dim}, group {case.group}): {exc}") from exc
        q = to_device(arrays["q"], dt, dev).view(case.batch, case.q_heads, case.head_dim)
        out = torch.empty_like(q)
        run = wrapper.run

        def call() -> None:
            run(q, (k_pool, v_pool), out=out)

        self._wrappers.append(wrapper)
        return call, lambda: to_carrier_array(out.view(case.batch, case.q_heads, 1,
                                                       case.head_dim))

    @property
    def variant(self) -> str:
        return "tensor-cores" if self._tensor_cores else "cuda-cores"

    @property
    def kernel(self) -> str:
        if self.case.op == "append":
            return f"flashinfer append_paged_kv_cache ({self._kv_layout})"
        return f"flashinfer BatchDecodeWithPagedKVCacheWrapper ({self.variant}, {self._kv_layout})"

    def release(self) -> None:
        super().release()
        self._wrappers.clear()
        self._workspace = None


class FlashInferBackend(Backend):
    """``flashinfer:cuda``: FlashInfer's paged decode (and paged append)."""

    ops = ("paged_sdpa", "append")
    dtypes = ("float16", "bfloat16")
    OPTIONS: ClassVar[dict[str, Option]] = {"tensor_cores": TENSOR_CORES_OPTION}

    def __init__(self, index: int = 0, tensor_cores: bool = False) -> None:
        self.name = cuda_backend_name("flashinfer", index)
        self.index = index
        self.tensor_cores = bool(tensor_cores)

    def uses_tensor_cores(self, case: Case) -> bool:
        """The decode path ``case`` runs: its ``tensor_cores`` option, else the constructor's."""
        if "tensor_cores" in dict(case.options):
            return bool(self.parse_options(case.options)["tensor_cores"])
        return self.tensor_cores

    @property
    def variant(self) -> str:
        """Which FlashInfer decode path this backend runs: ``cuda-cores`` or ``tensor-cores``."""
        return "tensor-cores" if self.tensor_cores else "cuda-cores"

    def availability(self) -> Availability:
        try:
            torch = import_torch()
        except ImportError as exc:
            return Availability(False, f"torch is not installed ({exc}); flashinfer needs it")
        try:
            _import_flashinfer()
        except ImportError as exc:
            return Availability(False, "flashinfer is not installed (package flashinfer-python,"
                                       f" pip install 'kvmicro[flashinfer]'): {exc}")
        except Exception as exc:  # a broken install: say what broke
            return Availability(False, f"import flashinfer.decode failed: "
                                       f"{type(exc).__name__}: {exc}")
        cuda = cuda_availability(torch, self.index, self.name)
        if not cuda:
            return cuda
        return Availability(True, f"flashinfer {_flashinfer_version()} ({self.variant}), "
                                  f"{cuda.reason}")

    def supports(self, case: Case) -> None:
        super().supports(case)
        if case.layout not in KV_LAYOUTS:
            raise Unsupported(f"FlashInfer's paged KV cache is NHD (our NSHD) or HND (our NHSD); "
                              f"layout {case.layout} has no FlashInfer equivalent")
        if case.head_dim not in HEAD_DIMS:
            raise Unsupported(f"FlashInfer's decode kernels take head_dim "
                              f"{', '.join(map(str, HEAD_DIMS))}; got {case.head_dim}")
        if case.op == "paged_sdpa" and not self.uses_tensor_cores(case) and \
                case.group not in CUDA_CORE_GROUPS:
            raise Unsupported(f"FlashInfer's CUDA-core decode kernel dispatches GQA groups "
                              f"{', '.join(map(str, CUDA_CORE_GROUPS))}; group {case.group} needs "
                              f"the tensor-core path (flashinfer:cuda[tensor_cores=true])")

    def device_info(self) -> DeviceInfo:
        return cuda_device_info(self.index, {"variant": self.variant, **self.versions()})

    def versions(self) -> dict[str, str]:
        return {"flashinfer": _flashinfer_version()}

    def bandwidth(self) -> dict[str, Any]:
        return cuda_bandwidth(self.index)

    def prepare(self, case: Case, arrays: dict[str, np.ndarray], copies: int = 1) -> Prepared:
        require(self, case)
        validate_arrays(case, arrays)
        return _FlashInferPrepared(self, case, arrays, copies, self.uses_tensor_cores(case))


__all__ = ["HEAD_DIMS", "KV_LAYOUTS", "TENSOR_CORES_OPTION", "FlashInferBackend"]
