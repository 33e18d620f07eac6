"""The float64 reference for every op: the one source of truth every backend is checked against.

Deliberately plain and independent of every backend: it reads the pool by walking the block table
token by token, computes softmax in float64 with an explicit max subtraction and shares no code with
any kernel. Inputs are the host arrays of :func:`kvmicro.workload.materialize`.

Result conventions (also those of ``kvmicro.execute``):
attention ops -> ``[B, Hq, q_len, D]``; ``gather`` -> ``(k_dense, v_dense)`` as
``[B, Hkv, max_ctx_pad, D]``; ``append`` -> ``(k_pool, v_pool)`` after the write, in the case's
layout.

With ``q_len > 1`` the queries are the last ``q_len`` positions of each sequence, causally masked.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .workload import Case

_AXES = "NSHD"


def _logical(pool: np.ndarray, layout: str) -> np.ndarray:
    """Pool in ``layout`` -> ``[N, S, H, D]`` view (no copy, no conversion)."""
    return np.transpose(pool, [layout.index(a) for a in _AXES])


def _attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """float64 attention of queries [G, L, D] over keys/values [n, D]; query i of L sees the
    first n - L + i + 1 keys."""
    _G, L, _ = q.shape
    n = keys.shape[0]
    logits = np.einsum("gld,nd->gln", q, keys) * scale
    visible = np.arange(n)[None, :] <= (n - L + np.arange(L))[:, None]   # [L, n]
    logits = np.where(visible[None], logits, -np.inf)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return np.einsum("gln,nd->gld", weights, values) / weights.sum(axis=-1)[..., None]


def sdpa(q: np.ndarray, k: np.ndarray, v: np.ndarray, ctx: np.ndarray, scale: float) -> np.ndarray:
    """Attention of ``q`` [B, Hq, L, D] over dense ``k``/``v`` [B, Hkv, T, D]; sequence b attends
    to its first ``ctx[b]`` positions (causal over the last L of them)."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    out = np.empty((B, Hq, L, D), dtype=np.float64)
    for b in range(B):
        n = int(ctx[b])
        for kv_head in range(Hkv):
            heads = slice(kv_head * group, (kv_head + 1) * group)
            out[b, heads] = _attend(q[b, heads].astype(np.float64),
                                    k[b, kv_head, :n].astype(np.float64),
                                    v[b, kv_head, :n].astype(np.float64), scale)
    return out


def gather(k_pool: np.ndarray, v_pool: np.ndarray, table: np.ndarray, ctx: np.ndarray,
           layout: str, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Copy each sequence's blocks, in table order, into dense [B, Hkv, max_blocks*block_size, D];
    positions past a sequence's last block stay zero."""
    k_log, v_log = _logical(k_pool, layout), _logical(v_pool, layout)
    B, max_blocks = table.shape
    Hkv, D = k_log.shape[2], k_log.shape[3]
    k_out = np.zeros((B, Hkv, max_blocks * block_size, D))
    v_out = np.zeros_like(k_out)
    for b in range(B):
        for logical_block in range(max_blocks):
            phys = int(table[b, logical_block])
            if phys < 0:
                break
            first = logical_block * block_size
            k_out[b, :, first:first + block_size] = np.swapaxes(k_log[phys], 0, 1)  # SHD->HSD
            v_out[b, :, first:first + block_size] = np.swapaxes(v_log[phys], 0, 1)
    return k_out, v_out


def paged_sdpa(q: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray, table: np.ndarray,
               ctx: np.ndarray, layout: str, block_size: int, scale: float) -> np.ndarray:
    """Attention that reads K/V token by token through the block table (no dense copy kept)."""
    k_log, v_log = _logical(k_pool, layout), _logical(v_pool, layout)
    B, Hq, L, D = q.shape
    Hkv = k_log.shape[2]
    group = Hq // Hkv
    out = np.empty((B, Hq, L, D))
    for b in range(B):
        n = int(ctx[b])
        phys = np.array([int(table[b, t // block_size]) for t in range(n)])
        slot = np.arange(n) % block_size
        for kv_head in range(Hkv):
            heads = slice(kv_head * group, (kv_head + 1) * group)
            keys = k_log[phys, slot, kv_head].astype(np.float64)      # [n, D]
            values = v_log[phys, slot, kv_head].astype(np.float64)
            out[b, heads] = _attend(q[b, heads].astype(np.float64), keys, values, scale)
    return out


def append(k_pool: np.ndarray, v_pool: np.ndarray, table: np.ndarray, ctx: np.ndarray,
           k_new: np.ndarray, v_new: np.ndarray, layout: str,
           block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Write token ``ctx[b]`` of every sequence: block ``table[b][ctx[b] // block_size]``,
    slot ``ctx[b] % block_size``. Returns new float64 pools in ``layout``."""
    k_out, v_out = k_pool.astype(np.float64), v_pool.astype(np.float64)
    k_view = np.transpose(k_out, [layout.index(a) for a in _AXES])  # views: writes land in k_out
    v_view = np.transpose(v_out, [layout.index(a) for a in _AXES])
    for b in range(table.shape[0]):
        pos = int(ctx[b])
        phys = int(table[b, pos // block_size])
        k_view[phys, pos % block_size] = k_new[b]
        v_view[phys, pos % block_size] = v_new[b]
    return k_out, v_out


def run(case: Case, arrays: dict[str, np.ndarray]) -> Any:
    """The float64 result of ``case.op`` on ``arrays`` (see the module's result conventions)."""
    a = arrays
    if case.op == "sdpa_contiguous":
        return sdpa(a["q"], a["k_dense"], a["v_dense"], a["ctx"], case.softmax_scale)
    if case.op == "gather":
        return gather(a["k_pool"], a["v_pool"], a["block_table"], a["ctx"], case.layout,
                      case.block_size)
    if case.op == "gather_sdpa":
        k, v = gather(a["k_pool"], a["v_pool"], a["block_table"], a["ctx"], case.layout,
                      case.block_size)
        return sdpa(a["q"], k, v, a["ctx"], case.softmax_scale)
    if case.op == "paged_sdpa":
        return paged_sdpa(a["q"], a["k_pool"], a["v_pool"], a["block_table"], a["ctx"],
                          case.layout, case.block_size, case.softmax_scale)
    if case.op == "append":
        return append(a["k_pool"], a["v_pool"], a["block_table"], a["ctx"], a["k_new"],
                      a["v_new"], case.layout, case.block_size)
    raise AssertionError(case.op)  # Case validated op already
