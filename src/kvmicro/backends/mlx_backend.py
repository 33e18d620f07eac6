"""MLX as a backend: ``mlx:cpu`` (any platform with ``mlx[cpu]``) and ``mlx:gpu`` (Apple Metal, or
whatever GPU this MLX build drives).

What an engine written in MLX pays (mlx-lm and vllm-metal keep their KV caches this way):
attention through ``mx.fast.scaled_dot_product_attention`` (GQA natively: K/V are not tiled; a
boolean mask for ragged batches), gather through ``mx.take`` over the physical block ids and a
transpose/reshape to dense ``[B, Hkv, T, D]``, append through an indexed update of the pool.

MLX is lazy and its arrays are values, which shapes what is timed:

- ``run()`` builds the op's graph and hands it to ``mx.async_eval``; ``sync()`` waits for it
  (``mx.synchronize``). So every timed call is evaluated, and the batched timer queues k of them.
- ``append`` is **not in place** by contract: ``pool[blocks, slots] = new`` makes a new pool array.
  The backend rebinds the pool to the result (as an MLX engine does), so MLX may reuse the old
  buffer when nothing else holds it, but a sample can include a copy of the whole pool.

MLX has no fused paged attention op, so ``paged_sdpa`` is refused.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import Unsupported
from ..workload import AXES, Case
from .base import Availability, Backend, DeviceInfo, Prepared, host_bandwidth
from .common import host_device_info, require, validate_arrays

MLX_OPS: tuple[str, ...] = ("sdpa_contiguous", "gather", "gather_sdpa", "append")


def import_mlx() -> Any:
    import mlx.core as mx

    return mx


def _to_mx(x: np.ndarray, dtype: str) -> Any:
    mx = import_mlx()
    a = mx.array(np.ascontiguousarray(x))
    return a.astype(mx.bfloat16) if dtype == "bfloat16" else a


def _to_carrier(a: Any) -> np.ndarray:
    mx = import_mlx()
    if a.dtype == mx.bfloat16:
        a = a.astype(mx.float32)
    return np.ascontiguousarray(np.array(a))


class _MlxPrepared(Prepared):
    def __init__(self, case: Case, arrays: dict[str, np.ndarray], device: Any,
                 copies: int) -> None:
        super().__init__(case)
        mx = import_mlx()
        self._mx = mx
        self._device = device
        self.copies = copies
        self._sets: list[dict[str, Any]] = []
        self._current = 0
        self._last: list[Any] = []
        with mx.stream(device):
            self._mask = None
            ctx = np.asarray(arrays["ctx"], dtype=np.int64)
            self._span = int(ctx.max())
            if case.ragged and case.op in ("sdpa_contiguous", "gather_sdpa"):
                span = arrays["k_dense"].shape[2] if case.op == "sdpa_contiguous" \
                    else case.max_ctx_pad
                self._span = span
                self._mask = mx.array(np.arange(span)[None, :] < ctx[:, None]).reshape(
                    case.batch, 1, 1, span)
            for _ in range(copies):
                self._sets.append(self._upload(arrays))
            mx.eval([v for s in self._sets for v in s.values() if isinstance(v, mx.array)])
        self._ops: dict[str, Callable[[dict[str, Any]], list[Any]]] = {
            "sdpa_contiguous": self._sdpa_contiguous, "gather": self._gather,
            "gather_sdpa": self._gather_sdpa, "append": self._append}
        self._op = self._ops[case.op]

    def _upload(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        mx, case = self._mx, self.case
        dt = case.dtype
        s: dict[str, Any] = {}
        if case.op in ("sdpa_contiguous", "gather_sdpa"):
            s["q"] = _to_mx(arrays["q"], dt)
        if case.op == "sdpa_contiguous":
            s["k"] = _to_mx(arrays["k_dense"], dt)[:, :, :self._span]
            s["v"] = _to_mx(arrays["v_dense"], dt)[:, :, :self._span]
            return s
        s["k_pool"] = _to_mx(arrays["k_pool"], dt)
        s["v_pool"] = _to_mx(arrays["v_pool"], dt)
        table = np.asarray(arrays["block_table"])
        if case.op == "append":
            ctx = np.asarray(arrays["ctx"], dtype=np.int64)
            s["blocks"] = mx.array(table[np.arange(case.batch), ctx // case.block_size]
                                   .astype(np.int32))
            s["slots"] = mx.array((ctx % case.block_size).astype(np.int32))
            s["k_new"] = _to_mx(arrays["k_new"], dt)
            s["v_new"] = _to_mx(arrays["v_new"], dt)
        else:
            s["ids"] = mx.array(np.maximum(table, 0).reshape(-1).astype(np.int32))
            s["blocks_per_row"] = table.shape[1]
        return s

    # ops: each returns the arrays to evaluate -----------------------------------------------
    def _attend(self, q: Any, k: Any, v: Any) -> Any:
        mx, case = self._mx, self.case
        if self._mask is None:
            k, v = k[:, :, :self._span], v[:, :, :self._span]
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=case.softmax_scale,
                                                    mask=self._mask)

    def _dense(self, pool: Any, s: dict[str, Any]) -> Any:
        mx, case = self._mx, self.case
        B, MB, S = case.batch, s["blocks_per_row"], case.block_size
        picked = mx.take(pool, s["ids"], axis=case.layout.index("N"))
        logical = mx.transpose(picked, [case.layout.index(a) for a in AXES])  # [B*MB,S,H,D]
        five = logical.reshape(B, MB, S, case.kv_heads, case.head_dim)
        return mx.transpose(five, (0, 3, 1, 2, 4)).reshape(B, case.kv_heads, MB * S,
                                                           case.head_dim)

    def _sdpa_contiguous(self, s: dict[str, Any]) -> list[Any]:
        return [self._attend(s["q"], s["k"], s["v"])]

    def _gather(self, s: dict[str, Any]) -> list[Any]:
        return [self._dense(s["k_pool"], s), self._dense(s["v_pool"], s)]

    def _gather_sdpa(self, s: dict[str, Any]) -> list[Any]:
        return [self._attend(s["q"], self._dense(s["k_pool"], s), self._dense(s["v_pool"], s))]

    def _append(self, s: dict[str, Any]) -> list[Any]:
        mx, case = self._mx, self.case
        to_logical = [case.layout.index(a) for a in AXES]
        to_physical = [AXES.index(a) for a in case.layout]
        for pool, new in (("k_pool", "k_new"), ("v_pool", "v_new")):
            logical = mx.transpose(s[pool], to_logical)
            logical[s["blocks"], s["slots"]] = s[new]
            s[pool] = mx.transpose(logical, to_physical)  # rebind: the next run starts here
        return [s["k_pool"], s["v_pool"]]

    # the contract --------------------------------------------------------------------------
    def run(self) -> None:
        with self._mx.stream(self._device):
            self._last = self._op(self._sets[self._current])
            self._mx.async_eval(self._last)

    def sync(self) -> None:
        self._mx.eval(self._last)
        self._mx.synchronize()

    def output(self) -> Any:
        if not self._last:
            raise RuntimeError(f"[{self.case.op}] output() before run()")
        self._mx.eval(self._last)
        if self.case.op in ("gather", "append"):
            return tuple(_to_carrier(a) for a in self._last)
        case = self.case
        return _to_carrier(self._last[0]).reshape(case.batch, case.q_heads, 1, case.head_dim)

    def select(self, copy: int) -> None:
        super().select(copy)
        self._current = copy

    def flush_cache(self, nbytes: int) -> None:
        if self._device == self._mx.cpu:
            super().flush_cache(nbytes)
            return
        with self._mx.stream(self._device):
            self._mx.eval(self._mx.zeros((max(nbytes, 1),), dtype=self._mx.uint8) + 1)

    def release(self) -> None:
        self._sets.clear()
        self._last = []


class _MlxBackend(Backend):
    kind = "cpu"
    ops = MLX_OPS
    # MLX's CUDA build and torch cannot share a process ("cuDNN version incompatibility:
    # PyTorch was compiled against (9, 19, 0) but found runtime version (9, 14, 0)")
    process_group = "mlx"

    def _device(self) -> Any:
        mx = import_mlx()
        return mx.cpu if self.kind == "cpu" else mx.gpu

    def availability(self) -> Availability:
        try:
            mx = import_mlx()
        except ImportError as exc:
            return Availability(False, f"mlx is not installed ({exc}); pip install "
                                       "'kvmicro[mlx]' (mlx[cpu] on Linux)")
        if not mx.is_available(self._device()):
            return Availability(False, f"mlx {mx.__version__} has no {self.kind} device here "
                                       "(mlx:gpu needs Apple silicon with Metal, or an MLX CUDA "
                                       "build)")
        return Availability(True, f"mlx {mx.__version__}")

    def supports(self, case: Case) -> None:
        if case.op == "paged_sdpa":
            raise Unsupported(f"mlx has no fused paged attention kernel on {self.kind}")
        super().supports(case)

    def versions(self) -> dict[str, str]:
        try:
            return {"mlx": import_mlx().__version__}
        except ImportError:
            return {}

    def prepare(self, case: Case, arrays: dict[str, np.ndarray], copies: int = 1) -> Prepared:
        require(self, case)
        validate_arrays(case, arrays)
        return _MlxPrepared(case, arrays, self._device(), copies)


class MlxCpuBackend(_MlxBackend):
    name = "mlx:cpu"
    kind = "cpu"

    def device_info(self) -> DeviceInfo:
        info = host_device_info()
        info.extra.update(self.versions())
        return info


class MlxGpuBackend(_MlxBackend):
    name = "mlx:gpu"
    kind = "gpu"

    def device_info(self) -> DeviceInfo:
        mx = import_mlx()
        extra: dict[str, Any] = dict(self.versions())
        name, memory = f"MLX GPU ({platform.machine()})", 0
        metal = getattr(mx, "metal", None)
        if metal is not None and metal.is_available():
            details = metal.device_info()
            name = f"Apple GPU {details.get('architecture', '')}".strip()
            memory = int(details.get("memory_size", 0))
            extra.update({k: v for k, v in details.items() if isinstance(v, (int, str))})
        return DeviceInfo(name=name, kind="gpu", memory_bytes=memory, extra=extra)

    def bandwidth(self) -> dict[str, Any]:
        """Host clock around ``mx.eval`` of a float16 sum (read) and a copy (read + write)."""
        mx = import_mlx()
        nbytes, reps = 1 << 30, 5
        with mx.stream(mx.gpu):
            x = mx.random.uniform(shape=(nbytes // 2,)).astype(mx.float16)
            mx.eval(x)

            def best(fn: Callable[[], Any]) -> float:
                mx.eval(fn())
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    mx.eval(fn())
                    times.append(time.perf_counter() - t0)
                return min(times)

            read = nbytes / best(lambda: x.sum()) / 1e9
            copy = 2 * nbytes / best(lambda: x + 0) / 1e9  # one read, one write
        return {"read_gbps": read, "copy_gbps": copy,
                "method": f"mlx float16 sum / copy, {nbytes / 1e9:.2f} GB, host clock around "
                          f"eval, best of {reps}"}


__all__ = ["MLX_OPS", "MlxCpuBackend", "MlxGpuBackend", "host_bandwidth"]
