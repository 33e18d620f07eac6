"""PyTorch as a backend: ``torch:cpu``, ``torch:cuda`` and ``torch:mps``.

What an engine that stays inside a framework pays: attention through
``torch.nn.functional.scaled_dot_product_attention`` (torch picks its own kernel), gather through
``index_select`` over the physical block ids, append through indexed assignment. torch has no fused
paged attention, so ``paged_sdpa`` is refused.

Everything shape-dependent is decided in ``prepare``: the layout permutation (a view of the pool as
logical ``[N, S, H, D]``), the index tensors, the padding mask, the output buffers. ``run()`` only
dispatches torch ops. The CUDA plumbing here (events, CUDA graphs, L2 flush, bandwidth, device
properties) is shared with the peers ``cudnn:cuda`` and ``flashinfer:cuda``, which subclass
:class:`TorchPrepared`.

GQA in decode, two ways (case option ``gqa`` = ``native`` | ``fold`` | ``auto``, the default, e.g.
``torch:cpu[gqa=fold]``):

- ``fold``: the ``group`` query heads sharing a kv head become the query-length axis
  (``q [B, Hkv, group, D]`` against ``K [B, Hkv, T, D]``): the same computation with one query
  position and no causal mask, each K/V element read once. On the CPU it is 3x faster than
  ``native`` (torch 2.13, 2 cores, ctx 16384), so ``auto`` takes it on cpu and mps. On an
  H100 (torch 2.11) it read at half the bandwidth: 16.8 µs at ctx 1024 and 372 µs at 32768 x 4
  (graph timer), against cuDNN's 7.1 and 181 µs on the same dense tensors.
- ``native``: ``enable_gqa=True`` (torch >= 2.5) on ``q [B, Hq, 1, D]``, torch picks its kernel.
  ``auto`` takes it on CUDA for unmasked (equal-length) batches, where the project's reference
  figures (FIELD.md) have torch's own SDPA at 6.8 / 179.8 µs for those shapes. A ragged batch
  needs a mask, and torch's masked kernel (memory-efficient attention) does not take
  ``enable_gqa``, so torch would fall back to its math path; ``auto`` folds there. Timed on the
  H100 (graph timer, docs/peers.md): 6.5 µs at ctx 1024 and 180.5 µs at 32768 x 4, FIELD's figures.
  ``scripts/device_peers.sh gqa`` compares the two paths on the same data.

Expanding K/V to ``Hq`` heads is never used: it copies them ``group`` times.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidCase, Unsupported
from ..workload import AXES, Case
from .base import Availability, Backend, DeviceInfo, Option, Prepared, host_bandwidth
from .common import cuda_backend_name, host_device_info, require, validate_arrays
from .nvml import sm_clock, sm_clock_status, torch_bus_id

#: the ops torch serves; ``paged_sdpa`` is refused with a reason in ``supports``
TORCH_OPS: tuple[str, ...] = ("sdpa_contiguous", "gather", "gather_sdpa", "append")

#: why torch:mps offers only host clocks: a sample of its batched timer is k ops then one
#: ``torch.mps.synchronize()``, wall time / k
MPS_NO_DEVICE_TIMER = (
    "torch:mps has no device timer: torch.mps.Event times when a CPU-side listener fires, not "
    "the GPU, and recording one breaks MPS's kernel coalescing; use the batched timer (k ops, "
    "one torch.mps.synchronize()) or host")

#: dtypes MPS may lack, and what it needs for them (checked on the device in supports())
MPS_DTYPE_NEEDS: dict[str, str] = {"bfloat16": "macOS 14 or newer"}

#: what ``output()`` returns for one run: an array (attention) or a (k, v) pair
Output = Any
GQA_MODES: tuple[str, ...] = ("auto", "native", "fold")
#: the case option that picks the GQA path (module docstring)
GQA_OPTION = Option("choice", "auto", GQA_MODES,
                    help="decode GQA: native (enable_gqa), fold (heads into q_len), or auto")


def gqa_mode(kind: str, masked: bool = False, mode: str = "auto") -> str:
    """How decode attention serves GQA on device ``kind`` (module docstring): ``native`` or
    ``fold``, as the case's ``gqa`` option ``mode`` asks or, for ``auto``, from the device and
    whether the batch needs a padding mask."""
    if mode not in GQA_MODES:
        raise InvalidCase(f"gqa {mode!r}; expected one of {', '.join(GQA_MODES)}")
    # a builtin has no inspectable signature; its docstring lists the keyword (torch >= 2.5)
    has_native = "enable_gqa" in (
        import_torch().nn.functional.scaled_dot_product_attention.__doc__ or "")
    if mode == "auto":
        mode = "native" if kind == "cuda" and not masked else "fold"
    return mode if has_native else "fold"


def gqa_policy(kind: str) -> str:
    """The GQA choice for provenance: one mode, or the unmasked / masked pair ``auto`` makes."""
    unmasked, masked = gqa_mode(kind), gqa_mode(kind, masked=True)
    return unmasked if unmasked == masked else f"{unmasked} (unmasked), {masked} (ragged)"


def import_torch() -> Any:
    """``import torch``, deferred so that ``import kvmicro`` never imports a framework."""
    import torch

    return torch


def torch_dtype(dtype: str) -> Any:
    torch = import_torch()
    return {"float16": torch.float16, "bfloat16": torch.bfloat16,
            "float32": torch.float32}[dtype]


def to_device(x: np.ndarray, dtype: str, device: Any) -> Any:
    """A host carrier array as a torch tensor of ``dtype`` on ``device``, always a copy (on the
    CPU ``from_numpy`` would share the caller's memory, and append would write into it). The
    bfloat16 carrier is float32 holding bfloat16 values, so ``.to(torch.bfloat16)`` is exact."""
    torch = import_torch()
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device=device, dtype=torch_dtype(dtype), copy=True)


def to_carrier_array(t: Any) -> np.ndarray:
    """A torch tensor back to its numpy carrier (bfloat16 -> float32), C-contiguous."""
    torch = import_torch()
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return np.ascontiguousarray(t.cpu().numpy())


def index_tensor(x: np.ndarray, device: Any, dtype: Any = None) -> Any:
    """An index array as a fresh torch tensor (int64 unless ``dtype`` says otherwise)."""
    torch = import_torch()
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))
    return t.to(device=device, dtype=dtype or torch.int64, copy=True)


# --------------------------------------------------------------------------------- CUDA device info


def cuda_device_info(index: int, extra: dict[str, Any] | None = None) -> DeviceInfo:
    torch = import_torch()
    props = torch.cuda.get_device_properties(index)
    bus_id = torch_bus_id(props)
    info = {"index": index, "sm_count": props.multi_processor_count,
            "compute_capability": f"{props.major}.{props.minor}",
            "torch": torch.__version__, "cuda_runtime": torch.version.cuda or "",
            "cudnn": str(torch.backends.cudnn.version() or ""),
            "pci_bus_id": bus_id, "throttle_guard": sm_clock_status(bus_id)}
    info.update(extra or {})
    return DeviceInfo(name=props.name, kind="cuda", cache_bytes=int(props.L2_cache_size),
                      memory_bytes=int(props.total_memory), extra=info)


def read_and_copy_gbps(device: Any, nbytes: int, reps: int,
                       seconds: Callable[[Callable[[], Any]], float]) -> tuple[float, float]:
    """Read (a float16 ``sum`` over ``nbytes``) and copy (``copy_``, bytes read plus written)
    bandwidth on a torch device in decimal GB/s: after one warm call, the best of ``reps`` times
    that ``seconds(fn)`` takes of ``fn``; ``seconds`` is the device's own way to time work."""
    torch = import_torch()
    x = torch.empty(nbytes // 2, dtype=torch.float16, device=device).uniform_()
    y = torch.empty_like(x)

    def best(fn: Callable[[], Any]) -> float:
        fn()
        return min(seconds(fn) for _ in range(reps))

    return nbytes / best(x.sum) / 1e9, 2 * nbytes / best(lambda: y.copy_(x)) / 1e9


def cuda_bandwidth(index: int, nbytes: int = 1 << 31, reps: int = 5) -> dict[str, Any]:
    """The read ceiling and copy bandwidth of CUDA device ``index``, timed between CUDA events."""
    torch = import_torch()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def seconds(fn: Callable[[], Any]) -> float:
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    with torch.cuda.device(index):
        read, copy = read_and_copy_gbps(torch.device("cuda", index), nbytes, reps, seconds)
    return {"read_gbps": read, "copy_gbps": copy,
            "method": f"torch float16 sum / copy_, {nbytes / 1e9:.2f} GB, CUDA events, "
                      f"best of {reps}"}


# ---------------------------------------------------------------------------------- the prepared


class TorchPrepared(Prepared):
    """A case prepared on a torch device: ``copies`` independent input sets, each with a
    dispatch-only closure. Subclasses (the peers) override :meth:`_make_set`, and
    :meth:`_bind_stream` when their library must be told which CUDA stream torch is on."""

    def __init__(self, case: Case, device: Any, kind: str, copies: int) -> None:
        super().__init__(case)
        if copies < 1:
            raise InvalidCase(f"[{case.op}] copies {copies} must be >= 1")
        self.device = device
        self.kind = kind
        self.copies = copies
        self.timers = ("host", "batched", "device", "graph") if kind == "cuda" \
            else ("host", "batched")
        self._calls: list[Callable[[], None]] = []
        self._outputs: list[Callable[[], Output]] = []
        self._current = 0
        self._call: Callable[[], None] = lambda: None
        self._scratch: Any = None
        self._graphs: dict[tuple[int, int], Any] = {}  # (k, copy or -1 for cycling)
        if kind == "cuda":
            props = import_torch().cuda.get_device_properties(device)
            self.sm_clock = sm_clock(torch_bus_id(props))

    def _build(self, arrays: dict[str, np.ndarray]) -> None:
        for i in range(self.copies):
            call, out = self._make_set(arrays, i)
            self._calls.append(call)
            self._outputs.append(out)
        self._call = self._calls[0]
        self._bind_stream()

    def _make_set(self, arrays: dict[str, np.ndarray],
                  copy: int) -> tuple[Callable[[], None], Callable[[], Output]]:
        raise NotImplementedError

    def _bind_stream(self) -> None:
        """Point the library at torch's current stream (torch's own ops follow it already)."""

    # the contract --------------------------------------------------------------------------
    def run(self) -> None:
        self._call()

    def sync(self) -> None:
        torch = import_torch()
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.kind == "mps":
            torch.mps.synchronize()

    def output(self) -> Output:
        return self._outputs[self._current]()

    def select(self, copy: int) -> None:
        super().select(copy)
        self._current = copy
        self._call = self._calls[copy]

    def flush_cache(self, nbytes: int) -> None:
        if self.kind == "cpu":
            super().flush_cache(nbytes)
            return
        torch = import_torch()
        if self._scratch is None or self._scratch.numel() < nbytes:
            self._scratch = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
        self._scratch[:nbytes].zero_()

    def device_times(self, reps: int, flush_bytes: int = 0) -> list[float]:
        """One op per sample between CUDA events on torch's current stream. Each sample starts
        from an idle stream (flush, then synchronize, then the start event), so a small op's
        sample includes its launch: that is what a synchronous caller waits for."""
        if self.kind == "mps":
            raise Unsupported(MPS_NO_DEVICE_TIMER)
        if self.kind != "cuda":
            raise Unsupported(f"{self.case.backend} has no device timer on {self.kind} "
                              "(timers here: host, batched)")
        torch = import_torch()
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream()
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for start, end in zip(starts, ends, strict=True):
                if flush_bytes:
                    self.flush_cache(flush_bytes)
                stream.synchronize()
                start.record(stream)
                self._call()
                end.record(stream)
            stream.synchronize()
            return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True)]

    def graph_times(self, reps: int, k: int, rotate: bool = True) -> list[float]:
        """``k`` calls captured once in a CUDA graph (cycling through the copies when ``rotate``,
        else all on the current copy), replayed between CUDA events; each sample is replay time /
        k."""
        if self.kind != "cuda":
            raise Unsupported(f"{self.case.backend} has no graph timer on {self.kind} "
                              "(timers here: host, batched)")
        if k < 1:
            raise InvalidCase(f"[{self.case.op}] graph timer needs k >= 1, got {k}")
        torch = import_torch()
        with torch.cuda.device(self.device):
            key = (k, -1 if rotate else self._current)
            graph = self._graphs.get(key) or self._capture(k, key[1])
            stream = torch.cuda.current_stream()
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            graph.replay()
            for start, end in zip(starts, ends, strict=True):
                start.record(stream)
                graph.replay()
                end.record(stream)
            stream.synchronize()
            return [s.elapsed_time(e) * 1e3 / k for s, e in zip(starts, ends, strict=True)]

    def _capture(self, k: int, copy: int) -> Any:
        """Capture ``k`` calls: on copy ``copy``, or cycling through the copies when it is -1."""
        torch = import_torch()
        keep = self._current
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        # torch requires warm-up on a side stream before capture (lazy init, autotuning, workspace
        # allocation must not happen inside the graph)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self._bind_stream()
            for i in range(max(3, min(k, self.copies))):
                self.select(i % self.copies)
                self.run()
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._bind_stream()
                for i in range(k):
                    self.select(i % self.copies if copy < 0 else copy)
                    self.run()
        finally:
            self._bind_stream()
            self.select(keep)
        self._graphs[(k, copy)] = graph
        return graph

    def release(self) -> None:
        self._graphs.clear()
        self._calls.clear()
        self._outputs.clear()
        self._call = lambda: None
        self._scratch = None
        if self.kind == "cuda":
            import_torch().cuda.empty_cache()


class _TorchOpPrepared(TorchPrepared):
    """The four ops in plain torch."""

    def __init__(self, case: Case, arrays: dict[str, np.ndarray], device: Any, kind: str,
                 copies: int, gqa: str = "auto") -> None:
        super().__init__(case, device, kind, copies)
        torch = import_torch()
        B = case.batch
        ctx = np.asarray(arrays["ctx"], dtype=np.int64)
        # Shared by every copy: derived from the case, not data the op streams through.
        self._mask = None
        self._ctx_slice = int(ctx.max())
        if case.ragged and case.op in ("sdpa_contiguous", "gather_sdpa"):
            span = arrays["k_dense"].shape[2] if case.op == "sdpa_contiguous" \
                else case.max_ctx_pad
            positions = torch.arange(span, device=device)
            mask = positions[None, :] < torch.from_numpy(ctx).to(device)[:, None]
            self._mask = mask.view(B, 1, 1, span)
        self.gqa = gqa_mode(kind, masked=self._mask is not None, mode=gqa)
        self._build(arrays)

    @property
    def _enable_gqa(self) -> bool:
        """Whether attention passes ``enable_gqa=True`` (else GQA is folded, or there is none)."""
        return self.gqa == "native" and self.case.group > 1

    @property
    def kernel(self) -> str:
        if self.case.op not in ("sdpa_contiguous", "gather_sdpa"):
            return f"torch indexing ({self.case.op})"
        gqa = "enable_gqa" if self._enable_gqa else \
            "heads folded into q_len" if self.case.group > 1 else "MHA"
        return f"torch scaled_dot_product_attention ({gqa}" + \
            (", masked)" if self._mask is not None else ")")

    # attention -----------------------------------------------------------------------------
    def _attend(self, q: Any, k: Any, v: Any, out: list[Any]) -> Callable[[], None]:
        """Decode attention, GQA served natively or folded (module docstring)."""
        torch = import_torch()
        sdpa = torch.nn.functional.scaled_dot_product_attention
        case = self.case
        B, Hkv, D = case.batch, case.kv_heads, case.head_dim
        mask, scale = self._mask, case.softmax_scale
        if mask is None:
            k, v = k[:, :, :self._ctx_slice], v[:, :, :self._ctx_slice]
        else:
            k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
        if self._enable_gqa:
            def call() -> None:
                out[0] = sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

            return call
        qf = q.view(B, Hkv, case.group, D)

        def call_folded() -> None:
            out[0] = sdpa(qf, k, v, attn_mask=mask, scale=scale)

        return call_folded

    def _attention_output(self, out: list[Any]) -> Callable[[], Output]:
        case = self.case

        def read() -> Output:
            if out[0] is None:
                raise RuntimeError(f"[{case.op}] output() before run()")
            return to_carrier_array(out[0].reshape(case.batch, case.q_heads, 1, case.head_dim))

        return read

    # gather --------------------------------------------------------------------------------
    def _gatherer(self, pool: Any, table: np.ndarray) -> tuple[Callable[[], None], Any]:
        """``index_select`` over the physical N axis into a buffer allocated here, then a view
        of it as dense ``[B, Hkv, T, D]`` — or, where the layout does not keep a block's slots
        next to each other in N-major order, one more copy into a dense buffer."""
        torch = import_torch()
        case = self.case
        layout = case.layout
        B, MB, S = case.batch, table.shape[1], case.block_size
        n_axis = layout.index("N")
        ids = index_tensor(np.maximum(table, 0).reshape(-1), self.device)  # padding -> block 0
        shape = list(pool.shape)
        shape[n_axis] = B * MB
        selected = torch.empty(shape, dtype=pool.dtype, device=self.device)
        logical = selected.permute([layout.index(a) for a in AXES])        # [B*MB, S, H, D]
        five = logical.unflatten(0, (B, MB)).permute(0, 3, 1, 2, 4)        # [B, H, MB, S, D]
        try:
            dense = five.view(B, case.kv_heads, MB * S, case.head_dim)

            def call() -> None:
                torch.index_select(pool, n_axis, ids, out=selected)
        except RuntimeError:
            dense = torch.empty((B, case.kv_heads, MB * S, case.head_dim), dtype=pool.dtype,
                                device=self.device)
            dense5 = dense.view(B, case.kv_heads, MB, S, case.head_dim)

            def call() -> None:
                torch.index_select(pool, n_axis, ids, out=selected)
                dense5.copy_(five)
        return call, dense

    # one copy ------------------------------------------------------------------------------
    def _make_set(self, arrays: dict[str, np.ndarray],
                  copy: int) -> tuple[Callable[[], None], Callable[[], Output]]:
        case, dev, dt = self.case, self.device, self.case.dtype
        op = case.op
        out: list[Any] = [None]
        if op == "sdpa_contiguous":
            q = to_device(arrays["q"], dt, dev)
            k = to_device(arrays["k_dense"], dt, dev)
            v = to_device(arrays["v_dense"], dt, dev)
            return self._attend(q, k, v, out), self._attention_output(out)
        table = np.asarray(arrays["block_table"])
        k_pool = to_device(arrays["k_pool"], dt, dev)
        v_pool = to_device(arrays["v_pool"], dt, dev)
        if op in ("gather", "gather_sdpa"):
            gather_k, k_dense = self._gatherer(k_pool, table)
            gather_v, v_dense = self._gatherer(v_pool, table)
            if op == "gather":
                def call() -> None:
                    gather_k()
                    gather_v()

                return call, lambda: (to_carrier_array(k_dense), to_carrier_array(v_dense))
            attend = self._attend(to_device(arrays["q"], dt, dev), k_dense, v_dense, out)

            def call_sdpa() -> None:
                gather_k()
                gather_v()
                attend()

            return call_sdpa, self._attention_output(out)
        if op == "append":
            ctx = np.asarray(arrays["ctx"], dtype=np.int64)
            rows = np.arange(case.batch)
            blocks = index_tensor(table[rows, ctx // case.block_size], dev)
            slots = index_tensor(ctx % case.block_size, dev)
            perm = [case.layout.index(a) for a in AXES]
            k_log, v_log = k_pool.permute(perm), v_pool.permute(perm)  # views: writes land
            k_new = to_device(arrays["k_new"], dt, dev)
            v_new = to_device(arrays["v_new"], dt, dev)

            def call_append() -> None:
                k_log.index_put_((blocks, slots), k_new)
                v_log.index_put_((blocks, slots), v_new)

            return call_append, lambda: (to_carrier_array(k_pool), to_carrier_array(v_pool))
        raise Unsupported(f"torch has no fused paged attention kernel on {self.kind}")


# ----------------------------------------------------------------------------------- the backends


class _TorchBackend(Backend):
    kind = "cpu"
    OPTIONS: ClassVar[dict[str, Option]] = {"gqa": GQA_OPTION}
    ops = TORCH_OPS

    def _device(self) -> Any:
        return import_torch().device(self.kind)

    def _availability(self, torch: Any) -> Availability:
        return Availability(True, f"torch {torch.__version__}")

    def availability(self) -> Availability:
        try:
            torch = import_torch()
        except ImportError as exc:
            return Availability(False, f"torch is not installed ({exc}); "
                                       "pip install 'kvmicro[torch]'")
        return self._availability(torch)

    def supports(self, case: Case) -> None:
        if case.op == "paged_sdpa":
            raise Unsupported(f"torch has no fused paged attention kernel on {self.kind}")
        super().supports(case)

    def versions(self) -> dict[str, str]:
        try:
            torch = import_torch()
        except ImportError:
            return {}
        return {"torch": torch.__version__}

    def prepare(self, case: Case, arrays: dict[str, np.ndarray],
                copies: int = 1) -> Prepared:
        require(self, case)
        validate_arrays(case, arrays)
        gqa = self.parse_options(case.options)["gqa"]
        return _TorchOpPrepared(case, arrays, self._device(), self.kind, copies, gqa)


class TorchCpuBackend(_TorchBackend):
    name = "torch:cpu"
    kind = "cpu"

    def _availability(self, torch: Any) -> Availability:
        return Availability(True, f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    def device_info(self) -> DeviceInfo:
        torch = import_torch()
        info = host_device_info(torch.get_num_threads())
        info.extra.update({"torch": torch.__version__, "gqa": gqa_policy(self.kind)})
        return info


class TorchCudaBackend(_TorchBackend):
    kind = "cuda"

    def __init__(self, index: int = 0) -> None:
        self.name = cuda_backend_name("torch", index)
        self.index = index

    def _device(self) -> Any:
        return import_torch().device("cuda", self.index)

    def _availability(self, torch: Any) -> Availability:
        return cuda_availability(torch, self.index, self.name)

    def device_info(self) -> DeviceInfo:
        return cuda_device_info(self.index, {"gqa": gqa_policy(self.kind)})

    def versions(self) -> dict[str, str]:
        out = super().versions()
        if out:
            torch = import_torch()
            out["cuda_runtime"] = torch.version.cuda or ""
            out["cudnn"] = str(torch.backends.cudnn.version() or "")
        return out

    def bandwidth(self) -> dict[str, Any]:
        return cuda_bandwidth(self.index)


def cuda_availability(torch: Any, index: int, name: str) -> Availability:
    if not torch.cuda.is_available():
        built = torch.version.cuda
        return Availability(False, f"no CUDA device visible to torch {torch.__version__} ("
                            + (f"built for CUDA {built})" if built else "a CPU-only build)"))
    count = torch.cuda.device_count()
    if index >= count:
        return Availability(False, f"{name} asks for CUDA device {index}, torch sees {count}")
    return Availability(True, f"torch {torch.__version__}, "
                              f"{torch.cuda.get_device_name(index)}")


def mps_dtype_problem(dtype: str, probe: Callable[[str], None]) -> str | None:
    """Why MPS cannot run ``dtype`` here, or None: ``probe`` makes a tensor of it on the device
    and does arithmetic with it (torch raises TypeError / RuntimeError where MPS lacks it)."""
    try:
        probe(dtype)
    except (TypeError, RuntimeError) as err:
        needs = MPS_DTYPE_NEEDS.get(dtype, "a newer macOS or torch")
        return f"torch:mps has no {dtype} here (it needs {needs}): {err}"
    return None


def _probe_mps_dtype(dtype: str) -> None:
    torch = import_torch()
    x = torch.ones(8, dtype=torch_dtype(dtype), device="mps")
    float((x * x).sum().float().cpu())


class TorchMpsBackend(_TorchBackend):
    """torch on Apple GPUs through MPS. Timers: host and batched only (MPS_NO_DEVICE_TIMER);
    ``sync`` is ``torch.mps.synchronize()``; a dtype this macOS' MPS lacks raises Unsupported."""

    name = "torch:mps"
    kind = "mps"
    #: one probe per dtype per process (the answer depends on the macOS, not the case)
    _dtype_problems: ClassVar[dict[str, str | None]] = {}

    def supports(self, case: Case) -> None:
        super().supports(case)
        if case.dtype in MPS_DTYPE_NEEDS:
            if case.dtype not in self._dtype_problems:
                self._dtype_problems[case.dtype] = mps_dtype_problem(case.dtype,
                                                                     _probe_mps_dtype)
            problem = self._dtype_problems[case.dtype]
            if problem:
                raise Unsupported(problem)

    def _availability(self, torch: Any) -> Availability:
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            built = bool(mps and mps.is_built())
            return Availability(False, f"torch {torch.__version__} has no MPS device here (needs "
                                       "Apple silicon and macOS 12.3+; this torch is "
                                       + ("built with MPS)" if built else "built without MPS)"))
        return Availability(True, f"torch {torch.__version__}, MPS")

    def device_info(self) -> DeviceInfo:
        torch = import_torch()
        memory = 0
        if hasattr(torch.mps, "recommended_max_memory"):
            memory = int(torch.mps.recommended_max_memory())
        return DeviceInfo(name=f"Apple GPU through MPS ({platform.machine()})", kind="mps",
                          memory_bytes=memory,
                          extra={"torch": torch.__version__, "gqa": gqa_policy(self.kind)})

    def bandwidth(self) -> dict[str, Any]:
        """Host-clock timing around ``torch.mps.synchronize()``: MPS exposes no device timer
        through torch that this backend uses, so the figure includes one sync per rep."""
        torch = import_torch()
        nbytes, reps = 1 << 30, 5

        def seconds(fn: Callable[[], Any]) -> float:
            torch.mps.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.mps.synchronize()
            return time.perf_counter() - t0

        read, copy = read_and_copy_gbps("mps", nbytes, reps, seconds)
        return {"read_gbps": read, "copy_gbps": copy,
                "method": f"torch float16 sum / copy_ on mps, {nbytes / 1e9:.2f} GB, host clock "
                          f"around synchronize, best of {reps}"}


__all__ = [
    "GQA_OPTION",
    "MPS_DTYPE_NEEDS",
    "MPS_NO_DEVICE_TIMER",
    "TORCH_OPS",
    "TorchCpuBackend",
    "TorchCudaBackend",
    "TorchMpsBackend",
    "TorchPrepared",
    "cuda_availability",
    "cuda_bandwidth",
    "cuda_device_info",
    "gqa_mode",
    "gqa_policy",
    "host_bandwidth",
    "host_device_info",
    "import_torch",
    "index_tensor",
    "mps_dtype_problem",
    "to_carrier_array",
    "to_device",
    "torch_dtype",
    "validate_arrays",
]
