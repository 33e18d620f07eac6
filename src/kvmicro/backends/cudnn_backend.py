"""cuDNN's scaled-dot-product attention as a peer backend: ``cudnn:cuda``.

The vendor's kernel an engine builder would otherwise pick, reached through the cuDNN Python
frontend (package ``nvidia-cudnn-frontend``, imported as ``cudnn``). ``prepare`` builds one cuDNN
graph for the case and allocates its workspace; ``run`` executes it on torch's current stream.

- ``paged_sdpa``: SDPA with paged K/V containers. cuDNN reads a container as
  ``[blocks, kv_heads, slots, head_dim]`` through strides, so the pool is handed over as a strided
  view: NHSD is that order already, NSHD is a transposed view, and any other layout that keeps the
  head dim innermost is offered to cuDNN the same way (it refuses what it cannot read, and the
  refusal becomes ``Unsupported`` carrying cuDNN's message). The block table goes in as
  ``[B, 1, max_blocks, 1]`` int32 (padding entries pointed at block 0: cuDNN stops at
  ``seq_len_kv`` and never attends them), the per-sequence contexts as ``seq_len_kv`` with the
  padding mask, GQA as fewer kv heads than query heads.
- ``sdpa_contiguous``: the same graph over dense ``[B, Hkv, T, D]`` K/V with ``seq_len_kv``.

float16 and bfloat16 only (cuDNN's flash attention has no float32 path); decode only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import Unsupported
from ..workload import Case
from .base import Availability, Backend, DeviceInfo, Prepared
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
)

#: first cuDNN with paged K/V caches in its SDPA graph
MIN_CUDNN = 90500

# errors that mean kvmicro itself is wrong (a bad keyword, a missing attribute): never a refusal
_PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, AssertionError)


def _import_cudnn() -> Any:
    import cudnn

    return cudnn


class _CudnnPrepared(TorchPrepared):
    def __init__(self, backend: CudnnBackend, case: Case, arrays: dict[str, np.ndarray],
                 copies: int) -> None:
        torch = import_torch()
        super().__init__(case, torch.device("cuda", backend.index), "cuda", copies)
        self._cudnn = _import_cudnn()
        self._handle = backend.handle()
        self._graph: Any = None
        self._uids: dict[str, Any] = {}
        self._workspace: Any = None
        with torch.cuda.device(self.device):
            self._build(arrays)

    @property
    def kernel(self) -> str:
        what = f"paged K/V containers ({self.case.layout} as strides)" \
            if self.case.op == "paged_sdpa" else "dense K/V"
        return f"cudnn sdpa graph (cuDNN {self._cudnn.backend_version()}, {what})"

    # one input set ---------------------------------------------------------------------------
    def _make_set(self, arrays: dict[str, np.ndarray],
                  copy: int) -> tuple[Callable[[], None], Callable[[], Any]]:
        torch = import_torch()
        case, dev, dt = self.case, self.device, self.case.dtype
        B = case.batch
        data: dict[str, Any] = {"q": to_device(arrays["q"], dt, dev)}
        data["o"] = torch.empty_like(data["q"])
        ctx = np.asarray(arrays["ctx"], dtype=np.int32)
        data["seq_q"] = index_tensor(np.ones(B), dev, torch.int32).view(B, 1, 1, 1)
        data["seq_kv"] = index_tensor(ctx, dev, torch.int32).view(B, 1, 1, 1)
        if case.op == "paged_sdpa":
            order = [case.layout.index(a) for a in "NHSD"]
            # keep the pools alive: the containers are views of them
            data["k_pool"] = to_device(arrays["k_pool"], dt, dev)
            data["v_pool"] = to_device(arrays["v_pool"], dt, dev)
            data["k"] = data["k_pool"].permute(order)
            data["v"] = data["v_pool"].permute(order)
            table = np.maximum(np.asarray(arrays["block_table"]), 0)
            data["table"] = index_tensor(table, dev, torch.int32).view(B, 1, table.shape[1], 1)
        else:
            data["k"] = to_device(arrays["k_dense"], dt, dev)
            data["v"] = to_device(arrays["v_dense"], dt, dev)
        if self._graph is None:
            self._plan(data)
        pack = {self._uids[name]: data[name] for name in self._uids if name in data}
        if case.op == "paged_sdpa":
            pack[self._uids["table_k"]] = data["table"]
            pack[self._uids["table_v"]] = data["table"]
        graph, workspace, handle = self._graph, self._workspace, self._handle

        def call() -> None:
            graph.execute(pack, workspace, handle=handle)

        out = data["o"]
        return call, lambda: to_carrier_array(out)

    def _plan(self, data: dict[str, Any]) -> None:
        """Build the cuDNN graph for this case (once; every copy shares it)."""
        cudnn, case = self._cudnn, self.case
        io_type = {"float16": cudnn.data_type.HALF,
                   "bfloat16": cudnn.data_type.BFLOAT16}[case.dtype]
        graph = cudnn.pygraph(io_data_type=io_type, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=self._handle)
        uids = {name: graph.tensor_like(data[name]) for name in ("q", "k", "v", "seq_q", "seq_kv")}
        paged: dict[str, Any] = {}
        if case.op == "paged_sdpa":
            uids["table_k"] = graph.tensor_like(data["table"])
            uids["table_v"] = graph.tensor_like(data["table"])
            paged = {"paged_attention_k_table": uids["table_k"],
                     "paged_attention_v_table": uids["table_v"],
                     "paged_attention_max_seq_len_kv": case.max_blocks * case.block_size}
        try:
            o, _ = graph.sdpa(name=f"kvmicro_{case.op}", q=uids["q"], k=uids["k"], v=uids["v"],
                              generate_stats=False, attn_scale=case.softmax_scale,
                              use_causal_mask=False, use_padding_mask=True,
                              seq_len_q=uids["seq_q"], seq_len_kv=uids["seq_kv"], **paged)
            o.set_output(True).set_dim(list(data["o"].shape)).set_stride(list(data["o"].stride()))
            graph.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        except _PROGRAMMING_ERRORS:
            raise
        except Exception as exc:  # cuDNN's refusal (not supported, no engine): its own words
            raise Unsupported(f"cuDNN refused {case.op} ({case.dtype}, layout {case.layout}, "
                              f"head_dim {case.head_dim}, block_size {case.block_size}): "
                              f"{str(exc).strip() or type(exc).__name__}") from exc
        uids["o"] = o
        self._graph, self._uids = graph, uids
        self._workspace = import_torch().empty(max(int(graph.get_workspace_size()), 1),
                                               dtype=import_torch().uint8, device=self.device)

    def _bind_stream(self) -> None:
        torch = import_torch()
        self._cudnn.set_stream(self._handle, torch.cuda.current_stream(self.device).cuda_stream)

    def release(self) -> None:
        super().release()
        self._graph, self._workspace = None, None

    def graph_times(self, reps: int, k: int, rotate: bool = True) -> list[float]:
        try:
            return super().graph_times(reps, k, rotate)
        except _PROGRAMMING_ERRORS:
            raise
        except RuntimeError as exc:
            raise Unsupported(f"cuDNN's execute could not be captured in a CUDA graph: {exc}"
                              ) from exc


class CudnnBackend(Backend):
    """``cudnn:cuda``: cuDNN's SDPA graph (paged and dense) through the Python frontend."""

    ops = ("sdpa_contiguous", "paged_sdpa")
    dtypes = ("float16", "bfloat16")

    def __init__(self, index: int = 0) -> None:
        self.name = cuda_backend_name("cudnn", index)
        self.index = index
        self._handle: Any = None

    def availability(self) -> Availability:
        try:
            torch = import_torch()
        except ImportError as exc:
            return Availability(False, f"torch is not installed ({exc}); cudnn:cuda moves its "
                                       "tensors with torch")
        try:
            cudnn = _import_cudnn()
        except ImportError as exc:
            return Availability(False, "the cuDNN Python frontend is not installed (package "
                                       "nvidia-cudnn-frontend, pip install 'kvmicro[cudnn]'): "
                                       f"{exc}")
        except Exception as exc:  # a broken install: say what broke
            return Availability(False, f"import cudnn failed: {type(exc).__name__}: {exc}")
        cuda = cuda_availability(torch, self.index, self.name)
        if not cuda:
            return cuda
        try:
            version = int(cudnn.backend_version())
        except Exception as exc:
            return Availability(False, f"the cuDNN library could not be loaded: {exc}")
        if version < MIN_CUDNN:
            return Availability(False, f"cuDNN {_version_string(version)} is older than 9.5.0, "
                                       "the first with paged K/V caches in SDPA")
        return Availability(True, f"cudnn-frontend {getattr(cudnn, '__version__', '?')}, cuDNN "
                                  f"{_version_string(version)}, {cuda.reason}")

    def supports(self, case: Case) -> None:
        super().supports(case)
        if case.op == "paged_sdpa" and case.layout[-1] != "D":
            raise Unsupported(f"cuDNN reads a paged container as [blocks, heads, slots, dim] "
                              f"through strides with the head dim innermost; layout "
                              f"{case.layout} stores {case.layout[-1]} innermost")
        if case.head_dim % 8:
            raise Unsupported(f"cuDNN's SDPA needs head_dim a multiple of 8, got {case.head_dim}")

    def handle(self) -> Any:
        """One cuDNN handle per backend object, created on its device at first use."""
        if self._handle is None:
            torch = import_torch()
            with torch.cuda.device(self.index):
                self._handle = _import_cudnn().create_handle()
        return self._handle

    def device_info(self) -> DeviceInfo:
        return cuda_device_info(self.index, self.versions())

    def versions(self) -> dict[str, str]:
        out: dict[str, str] = {}
        try:
            cudnn = _import_cudnn()
            out["cudnn_frontend"] = str(getattr(cudnn, "__version__", "?"))
            out["cudnn"] = _version_string(int(cudnn.backend_version()))
        except Exception:  # provenance only: availability() explains a broken install
            pass
        return out

    def bandwidth(self) -> dict[str, Any]:
        return cuda_bandwidth(self.index)

    def prepare(self, case: Case, arrays: dict[str, np.ndarray], copies: int = 1) -> Prepared:
        require(self, case)
        validate_arrays(case, arrays)
        return _CudnnPrepared(self, case, arrays, copies)


def _version_string(version: int) -> str:
    """cuDNN's integer version (91900) as 9.19.0."""
    return f"{version // 10000}.{version % 10000 // 100}.{version % 100}"


__all__ = ["MIN_CUDNN", "CudnnBackend"]
