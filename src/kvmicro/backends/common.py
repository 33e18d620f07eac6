"""What several backends share: checking a case before prepare, the host CPU as a device, and
the name of a backend on one CUDA device. Framework-free: nothing here imports torch or mlx."""

from __future__ import annotations

import os
import platform

import numpy as np

from ..dtypes import carrier
from ..errors import InvalidCase, Unsupported
from ..workload import Case, Layout
from .base import Backend, DeviceInfo


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which a pinned sweep worker narrows),
    else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def require(backend: Backend, case: Case) -> None:
    """What every ``prepare`` checks first: ``backend`` can run here (else :class:`Unsupported`
    with the reason) and supports ``case``."""
    available = backend.availability()
    if not available:
        raise Unsupported(f"{backend.name} is not available here: {available.reason}")
    backend.supports(case)


def cuda_backend_name(family: str, index: int) -> str:
    """The name of ``family``'s backend on CUDA device ``index`` (``torch:cuda``,
    ``torch:cuda:1``), after checking the index."""
    if not isinstance(index, int) or index < 0:
        raise InvalidCase(f"{family}:cuda device index {index!r} must be an integer >= 0")
    return f"{family}:cuda" if index == 0 else f"{family}:cuda:{index}"


# ------------------------------------------------------------------------------------ validation


def validate_arrays(case: Case, arrays: dict[str, np.ndarray]) -> None:
    """Check the host arrays against ``case`` before anything reads through them: shapes, carrier
    dtypes, contexts that fit the table, and every block id an op will touch inside the pool.
    Raises :class:`InvalidCase` naming the op and the bad value; after it passes, no index a
    framework kernel reads can be out of bounds."""
    op = case.op
    B, Hq, Hkv, D, bs = case.batch, case.q_heads, case.kv_heads, case.head_dim, case.block_size
    want = carrier(case.dtype)

    def need(key: str) -> np.ndarray:
        if key not in arrays:
            raise InvalidCase(f"[{op}] array {key!r} is missing")
        return np.asarray(arrays[key])

    def check_float(key: str, shape: tuple[int, ...] | None) -> np.ndarray:
        a = need(key)
        if a.dtype != want:
            raise InvalidCase(f"[{op}] {key} has dtype {a.dtype}; a {case.dtype} case carries "
                              f"{np.dtype(want).name}")
        if shape is not None and a.shape != shape:
            raise InvalidCase(f"[{op}] {key} has shape {a.shape}, expected {shape}")
        return a

    ctx = need("ctx")
    if ctx.shape != (B,) or [int(c) for c in ctx] != list(case.ctx_list):
        raise InvalidCase(f"[{op}] ctx array {ctx.tolist()} does not match the case's ctx "
                          f"{list(case.ctx_list)}")
    if op in ("sdpa_contiguous", "gather_sdpa", "paged_sdpa"):
        check_float("q", (B, Hq, case.q_len, D))
    if op == "sdpa_contiguous":
        for key in ("k_dense", "v_dense"):
            a = check_float(key, None)
            if a.ndim != 4 or a.shape[:2] != (B, Hkv) or a.shape[3] != D or \
                    a.shape[2] < max(case.ctx_list):
                raise InvalidCase(f"[{op}] {key} has shape {a.shape}, expected "
                                  f"({B}, {Hkv}, >= {max(case.ctx_list)}, {D})")
        return
    layout = Layout(case.layout)
    pool = check_float("k_pool", None)
    if pool.ndim != 4:
        raise InvalidCase(f"[{op}] k_pool has {pool.ndim} dimensions, expected 4 ({layout})")
    num_blocks = pool.shape[layout.order.index("N")]
    expected = layout.physical_shape(num_blocks, bs, Hkv, D)
    for key in ("k_pool", "v_pool"):
        check_float(key, expected)
    if op == "append":
        for key in ("k_new", "v_new"):
            check_float(key, (B, Hkv, D))
    table = need("block_table")
    if table.ndim != 2 or table.shape[0] != B or not np.issubdtype(table.dtype, np.integer):
        raise InvalidCase(f"[{op}] block_table must be an integer [{B}, max_blocks] array, got "
                          f"{table.dtype} {table.shape}")
    for b, blocks in enumerate(case.blocks_per_seq):
        if blocks > table.shape[1]:
            raise InvalidCase(f"[{op}] sequence {b} needs {blocks} blocks (ctx {case.ctx_list[b]},"
                              f" block_size {bs}) but the table has {table.shape[1]} columns")
        row = table[b, :blocks]
        bad = np.flatnonzero((row < 0) | (row >= num_blocks))
        if bad.size:
            j = int(bad[0])
            raise InvalidCase(f"[{op}] block id {int(row[j])} at table[{b}][{j}] outside the "
                              f"pool [0, {num_blocks})")


# ------------------------------------------------------------------------------------- host info


def host_device_info(threads: int | None = None) -> DeviceInfo:
    """The host CPU as a device: model name, threads, L3 (the cache a cold policy must defeat)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = threads or usable_cores()

    def sysconf(key: str) -> int:
        try:
            return max(int(os.sysconf(key)), 0)
        except (ValueError, OSError, AttributeError):
            return 0

    cache = sysconf("SC_LEVEL3_CACHE_SIZE") or _sysfs_last_level_cache() or \
        sysconf("SC_LEVEL2_CACHE_SIZE")
    memory = sysconf("SC_PAGE_SIZE") * sysconf("SC_PHYS_PAGES")
    return DeviceInfo(name=f"{name} ({threads} threads)", kind="cpu", cache_bytes=cache,
                      memory_bytes=memory, extra={"threads": threads})


def _sysfs_last_level_cache() -> int:
    """Bytes of the highest-level cache Linux lists for cpu0 (containers often hide sysconf's)."""
    best = (0, 0)
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(root)
    except OSError:
        return 0
    for entry in entries:
        try:
            with open(f"{root}/{entry}/level") as f:
                level = int(f.read())
            with open(f"{root}/{entry}/size") as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, (level, int(digits) * scale))
    return best[1]


__all__ = ["cuda_backend_name", "host_device_info", "require", "validate_arrays"]
