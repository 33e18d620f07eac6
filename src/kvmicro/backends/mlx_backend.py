"""MLX as a backend: ``mlx:cpu`` (any platform with ``mlx[cpu]``) and ``mlx:gpu`` (Apple Metal, or
whatever GPU this MLX build drives).

What an engine written in MLX pays (mlx-lm and vllm-metal keep their KV caches this way):
attention through ``mx.fast.scaled_dot_product_attention`` (GQA natively: K/V are not tiled; a
boolean mask for ragged batches), gather through ``mx.take`` over the physical block ids and a
transpose/reshape to dense ``[B, Hkv, T, D]``, append through an indexed update of the pool.

MLX is lazy and its arrays are values, which shapes what is timed:

- ``run()`` builds the op's graph and hands it to ``mx.async_eval``; ``sync()`` waits for it
  (``mx.synchronize``). So every timed call is evaluated, and the batched timer queues k of them.
- ``append`` is **not in place** by contract, by either route (the case option ``append``):
  ``indexed`` (default) writes ``pool[blocks, slots] = new`` for the whole batch at once,
  ``slice_update`` chains one ``mx.slice_update`` per sequence. Each makes a new pool array; the
  backend rebinds the pool to the result (as an MLX engine does), so MLX may reuse the old buffer
  when nothing else holds it, but a sample can include a copy of the whole pool. The record's
  ``kernel`` names the route and says it is not in place.
- attention goes through ``mx.fast.scaled_dot_product_attention(..., force_fused=True)`` where
  this MLX offers the flag and has a fused kernel for the case (it raises rather than silently
  falling back); otherwise the unfused call, and ``kernel`` says which route ran and why.

MLX has no paged attention op. ``mlx:gpu`` on Metal runs ``paged_sdpa`` through
``mx.fast.metal_kernel`` with kvmicro's own kernel source (metal/decode_attention.h and what it
includes, read from the checkout, never copied); elsewhere ``paged_sdpa`` is refused with the
reason.
"""

from __future__ import annotations

import hashlib
import platform
import re
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import Unsupported
from ..workload import AXES, Case
from .base import Availability, Backend, DeviceInfo, Option, Prepared, host_bandwidth
from .common import host_device_info, require, validate_arrays

MLX_OPS: tuple[str, ...] = ("sdpa_contiguous", "gather", "gather_sdpa", "paged_sdpa", "append")

#: the append routes (case option ``append``): both return a new pool, neither is in place
APPEND_ROUTES: tuple[str, ...] = ("indexed", "slice_update")

#: where the kernel source mlx:gpu's paged_sdpa runs lies: the copy an installed wheel carries
#: (kvmicro/kernels/metal, see CMakeLists.txt), else the checkout's metal/ directory
_INSTALLED_METAL = Path(__file__).resolve().parents[1] / "kernels" / "metal"
METAL_DIR = _INSTALLED_METAL if _INSTALLED_METAL.is_dir() else \
    Path(__file__).resolve().parents[3] / "metal"


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


# ---- paged_sdpa on MLX's Metal backend: kvmicro's kernel source through mx.fast.metal_kernel ----


@cache
def metal_kernel_header() -> str:
    """metal/decode_attention.h with every local ``#include "..."`` inlined (each file once), as
    cmake/metal_embed.cmake does for the native host: the attention template both share."""
    seen: set[Path] = set()

    def inline(path: Path) -> str:
        path = path.resolve()
        if path in seen:
            return ""
        seen.add(path)
        text = path.read_text(encoding="utf-8").replace("#pragma once", "")

        def include(match: re.Match[str]) -> str:
            target = path.parent / match.group(1)
            if not target.exists():
                raise Unsupported(f"[paged_sdpa] {path.name} includes {match.group(1)!r}, not "
                                  f"found beside it")
            return f"// ---- {match.group(1)} (inlined)\n" + inline(target)

        return re.sub(r'#include "([^"]+)"', include, text)

    source = METAL_DIR / "decode_attention.h"
    if not source.exists():
        raise Unsupported(f"[paged_sdpa] mlx:gpu runs kvmicro's Metal kernel source, which is not "
                          f"here ({source} is missing: neither the wheel's kvmicro/kernels/ nor a "
                          f"checkout's metal/)")
    return inline(source)


def attention_threadgroup_floats(head_dim: int) -> int:
    """Floats of an attention threadgroup's scratch: metal/kernel_abi.h attn_threadgroup_bytes
    (a test checks the two agree), declared as a fixed array in the metal_kernel body."""
    simdgroups, max_tile = 4, 8
    floats = simdgroups * max_tile * 2 + simdgroups * head_dim
    return (floats * 4 + 15) // 16 * 4


def _params_literal(case: Case, pool_shape: tuple[int, ...], table_width: int,
                    max_ctx: int) -> str:
    """The program-scope ``constant`` OpParams / PartitionParams of one case, field by field in
    csrc/common/params.h's order (the kernel template reads them from constant memory)."""
    elem = np.empty(pool_shape, dtype=np.int8).strides  # element strides of the physical pool
    stride = {a: elem[case.layout.index(a)] for a in AXES}
    num_blocks = pool_shape[case.layout.index("N")]
    dtype_id = {"float16": 0, "bfloat16": 1, "float32": 2}[case.dtype]
    pool = (f"{{{stride['N']}, {stride['S']}, {stride['H']}, {stride['D']}, {num_blocks}, "
            f"{case.block_size}, {case.kv_heads}, {case.head_dim}}}")
    return (f"constant kvmicro::OpParams kv_mlx_params = {{{pool}, {case.batch}, {case.q_heads}, "
            f"{case.q_heads // case.kv_heads}, 1, {table_width}, {table_width * case.block_size}, "
            f"{max_ctx}, {float(case.softmax_scale)!r}f, {dtype_id}}};\n"
            f"constant kvmicro::PartitionParams kv_mlx_part = {{{max(max_ctx, 1)}, 1}};\n")


_PAGED_BODY = """
  threadgroup float scratch[{floats}];
  const int b = (int)threadgroup_position_in_grid.z;
  kvmicro::mtl::PagedRows rows;
  rows.kv = kvmicro::make_paged_kv(kv_mlx_params.pool, table, ctx, kv_mlx_params.batch,
                                   kv_mlx_params.max_blocks);
  rows.b = b;
  rows.h = (int)threadgroup_position_in_grid.y / kvmicro::mtl::query_tiles(kv_mlx_params.group);
  kvmicro::mtl::attend<T, {head_dim}, {d_inner}>(
      kv_mlx_params, kv_mlx_part, q, k_pool, v_pool, rows, rows.kv.pool.stride_d, ctx[b], out,
      part_out, part_ml, scratch, threadgroup_position_in_grid, simdgroup_index_in_threadgroup,
      thread_index_in_simdgroup);
"""


def _paged_kernel(case: Case, arrays: dict[str, np.ndarray]) -> Any:
    """The mx.fast.metal_kernel for one case: kvmicro's attention template (the header) plus the
    ~10-line body of metal/paged_sdpa.metal's kernel, with the case's params as constants. Named
    by a hash of its source, since MLX caches kernels by name."""
    mx = import_mlx()
    pool_shape = tuple(int(n) for n in arrays["k_pool"].shape)
    table_width = int(np.asarray(arrays["block_table"]).shape[1])
    max_ctx = int(np.asarray(arrays["ctx"]).max())
    header = metal_kernel_header() + "\n" + _params_literal(case, pool_shape, table_width,
                                                              max_ctx)
    d_inner = "true" if case.layout.endswith("D") else "false"
    body = _PAGED_BODY.format(floats=attention_threadgroup_floats(case.head_dim),
                              head_dim=case.head_dim, d_inner=d_inner)
    digest = hashlib.sha1((header + body).encode()).hexdigest()[:12]
    return mx.fast.metal_kernel(name=f"kvmicro_paged_sdpa_{digest}",
                                input_names=["q", "k_pool", "v_pool", "table", "ctx"],
                                output_names=["out", "part_out", "part_ml"], header=header,
                                source=body, ensure_row_contiguous=False)


class _MlxPrepared(Prepared):
    def __init__(self, case: Case, arrays: dict[str, np.ndarray], device: Any,
                 copies: int, append_route: str = "indexed") -> None:
        super().__init__(case)
        mx = import_mlx()
        self._mx = mx
        self._device = device
        self.copies = copies
        self._append_route = append_route
        self._fused = False          # attention: force_fused=True accepted for this case
        self._route = ""             # what ran, in words (the record's kernel)
        self._paged_kernel: Any = None
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
            mx.eval([v for s in self._sets for v in s.get("updates", ())])
        self._ops: dict[str, Callable[[dict[str, Any]], list[Any]]] = {
            "sdpa_contiguous": self._sdpa_contiguous, "gather": self._gather,
            "gather_sdpa": self._gather_sdpa, "append": self._append,
            "paged_sdpa": self._paged_sdpa}
        self._op = self._ops[case.op]
        with mx.stream(device):
            self._plan(arrays)

    def _plan(self, arrays: dict[str, np.ndarray]) -> None:
        """Pick the route once (plan once, run many) and say in words what will run."""
        mx, case = self._mx, self.case
        if case.op == "append":
            how = ("pool[blocks, slots] = new (indexed assignment, the whole batch at once)"
                   if self._append_route == "indexed" else
                   f"mx.slice_update, one per sequence ({case.batch} chained)")
            self._route = (f"mlx append via {how}; not in place: each returns a new pool "
                           "array, rebound as the next run's input")
            return
        if case.op == "gather":
            self._route = "mlx gather: mx.take over block ids, transpose/reshape to [B,Hkv,T,D]"
            return
        if case.op == "paged_sdpa":
            self._paged_kernel = _paged_kernel(case, arrays)
            self._route = ("kvmicro metal/decode_attention.h attend<> through "
                           "mx.fast.metal_kernel (one partition, no split-KV; params as "
                           "program-scope constants)")
            return
        # attention: force_fused=True where this MLX has the flag and a fused kernel for it
        self._fused = True
        why = ""
        try:
            mx.eval(self._op(self._sets[0]))
        except TypeError as err:
            why = f"this mlx has no force_fused ({err})"
        except (ValueError, RuntimeError) as err:
            why = f"force_fused=True raised: {err}"
        if why:
            self._fused = False
            mx.eval(self._op(self._sets[0]))
        path = "gather (mx.take) + " if case.op == "gather_sdpa" else ""
        self._route = (f"mlx {path}mx.fast.scaled_dot_product_attention "
                       + ("force_fused=True (fused kernel)" if self._fused else
                          f"unfused route ({why})"))

    @property
    def kernel(self) -> str:
        return self._route

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
        if case.op == "paged_sdpa":
            s["q"] = _to_mx(arrays["q"], dt)
            s["table"] = mx.array(table.astype(np.int32))
            s["ctx"] = mx.array(np.asarray(arrays["ctx"]).astype(np.int32))
        elif case.op == "append":
            ctx = np.asarray(arrays["ctx"], dtype=np.int64)
            blocks = table[np.arange(case.batch), ctx // case.block_size]
            s["blocks"] = mx.array(blocks.astype(np.int32))
            s["slots"] = mx.array((ctx % case.block_size).astype(np.int32))
            s["k_new"] = _to_mx(arrays["k_new"], dt)
            s["v_new"] = _to_mx(arrays["v_new"], dt)
            if self._append_route == "slice_update":
                # per sequence: the start (block, slot) on the pool's N and S axes, and the new
                # row as a [1, 1, H, D] block in the pool's own axis order
                to_physical = [AXES.index(a) for a in case.layout]
                s["starts"] = [mx.array(np.array([blocks[b], ctx[b] % case.block_size],
                                                 dtype=np.int32)) for b in range(case.batch)]
                s["updates"] = [mx.transpose(s[new][b].reshape(1, 1, case.kv_heads,
                                                               case.head_dim), to_physical)
                                for new in ("k_new", "v_new") for b in range(case.batch)]
        else:
            s["ids"] = mx.array(np.maximum(table, 0).reshape(-1).astype(np.int32))
            s["blocks_per_row"] = table.shape[1]
        return s

    # ops: each returns the arrays to evaluate -----------------------------------------------
    def _attend(self, q: Any, k: Any, v: Any) -> Any:
        mx, case = self._mx, self.case
        if self._mask is None:
            k, v = k[:, :, :self._span], v[:, :, :self._span]
        if self._fused:
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=case.softmax_scale,
                                                        mask=self._mask, force_fused=True)
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

    def _paged_sdpa(self, s: dict[str, Any]) -> list[Any]:
        mx, case = self._mx, self.case
        dtype = s["q"].dtype
        tiles = -(-(case.q_heads // case.kv_heads) // 8)
        out, _, _ = self._paged_kernel(
            inputs=[s["q"], s["k_pool"], s["v_pool"], s["table"], s["ctx"]],
            template=[("T", dtype)], grid=(128, case.kv_heads * tiles, case.batch),
            threadgroup=(128, 1, 1),
            output_shapes=[(case.batch, case.q_heads, 1, case.head_dim), (1,), (2,)],
            output_dtypes=[dtype, mx.float32, mx.float32])
        return [out]

    def _append(self, s: dict[str, Any]) -> list[Any]:
        mx, case = self._mx, self.case
        if self._append_route == "slice_update":
            axes = (case.layout.index("N"), case.layout.index("S"))
            for i, pool in enumerate(("k_pool", "v_pool")):
                for b in range(case.batch):
                    s[pool] = mx.slice_update(s[pool], s["updates"][i * case.batch + b],
                                              s["starts"][b], axes)
            return [s["k_pool"], s["v_pool"]]
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

    OPTIONS: ClassVar[dict[str, Option]] = {
        "append": Option("choice", "indexed", APPEND_ROUTES,
                         help="append route: indexed assignment (the batch at once) or one "
                              "mx.slice_update per sequence; neither is in place"),
    }

    def supports(self, case: Case) -> None:
        if case.op == "paged_sdpa":
            self._supports_paged(case)
        options = self.parse_options(case.options)
        if options["append"] != "indexed" and case.op != "append":
            raise Unsupported(f"{self.name}: option append={options['append']} applies to the "
                              f"append op only (this case is {case.op})")
        super().supports(case)

    def _supports_paged(self, case: Case) -> None:
        mx = import_mlx()
        metal = getattr(mx, "metal", None)
        on_metal = self.kind == "gpu" and metal is not None and metal.is_available()
        if not on_metal:
            raise Unsupported(f"mlx has no fused paged attention kernel on {self.kind}: "
                              "kvmicro's Metal kernel runs through mx.fast.metal_kernel only on "
                              "mlx:gpu with MLX on Metal")
        if case.dtype == "bfloat16":
            raise Unsupported("[paged_sdpa] mlx:gpu through mx.fast.metal_kernel: float16 and "
                              "float32 only (MLX's bfloat16_t is not the kernels' bfloat)")
        if case.head_dim not in (64, 80, 96, 112, 128, 256):
            raise Unsupported(f"[paged_sdpa] head_dim {case.head_dim} has no Metal kernel")

    def versions(self) -> dict[str, str]:
        try:
            return {"mlx": import_mlx().__version__}
        except ImportError:
            return {}

    def prepare(self, case: Case, arrays: dict[str, np.ndarray], copies: int = 1) -> Prepared:
        require(self, case)
        validate_arrays(case, arrays)
        route = self.parse_options(case.options)["append"]
        return _MlxPrepared(case, arrays, self._device(), copies, append_route=route)


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


__all__ = ["APPEND_ROUTES", "MLX_OPS", "MlxCpuBackend", "MlxGpuBackend",
           "attention_threadgroup_floats", "host_bandwidth", "metal_kernel_header"]
