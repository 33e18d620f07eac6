"""Figures derived from a case's shape and its median: bytes moved, GB/s, % of peak, overhead.

Bytes are decimal (1 GB = 1e9 bytes) and count the fewest bytes each op must move on the device,
from the shape alone (never from what a kernel happens to do). With ``E`` the dtype's size on the
device (2 for float16/bfloat16, 4 for float32), ``T = sum(ctx)`` tokens, ``P = sum(ctx_pad)``
tokens in whole blocks, ``KV = 2 * Hkv * D * E`` bytes of K plus V per token,
``Q = B * Hq * q_len * D * E`` and ``I = 4`` bytes per int32 index:

- sdpa_contiguous: ``KV * T + 2 Q`` (read K and V for the ctx tokens, read q, write out);
- gather: ``2 KV * P + I * (B * max_blocks + B)`` (read the sequences' blocks, write them dense,
  read the table and the lengths);
- gather_sdpa: gather + sdpa_contiguous (the dense copy is written, then read back);
- paged_sdpa: ``KV * T + 2 Q + I * (B * max_blocks + B)`` (K and V through the table, q, out);
- append: ``2 B KV + I * 2B`` (read the new K/V token, write one slot per sequence and head,
  read one table entry and one length per sequence).

docs/methodology.md repeats this table; a test recomputes each row from the materialized arrays.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .errors import InvalidCase
from .workload import ATTENTION_OPS, Case, pool_bytes

if TYPE_CHECKING:
    from .harness.stats import Stats

INDEX_BYTES = 4  # int32 block ids and lengths


def _kv_token_bytes(case: Case) -> int:
    return 2 * case.kv_heads * case.head_dim * case.itemsize


def _q_bytes(case: Case) -> int:
    return case.batch * case.q_heads * case.q_len * case.head_dim * case.itemsize


def _table_bytes(case: Case) -> int:
    return INDEX_BYTES * (case.batch * case.max_blocks + case.batch)


def bytes_moved(case: Case) -> int:
    """The fewest bytes ``case.op`` must read plus write (decimal bytes; see the module table)."""
    kv = _kv_token_bytes(case)
    sdpa = kv * sum(case.ctx_list) + 2 * _q_bytes(case)
    gather = 2 * kv * sum(case.ctx_pad) + _table_bytes(case)
    if case.op == "sdpa_contiguous":
        return sdpa
    if case.op == "gather":
        return gather
    if case.op == "gather_sdpa":
        return gather + sdpa
    if case.op == "paged_sdpa":
        return sdpa + _table_bytes(case)
    if case.op == "append":
        return 2 * case.batch * kv + INDEX_BYTES * 2 * case.batch
    raise InvalidCase(f"[derived] no byte count for op {case.op!r}")


def working_set_bytes(case: Case) -> int:
    """Bytes one run of the op touches: what cache rotation must multiply past the cache size.
    It is :func:`bytes_moved`, since the fewest bytes moved are exactly the bytes touched."""
    return bytes_moved(case)


def footprint_bytes(case: Case) -> int:
    """Bytes of one independent input set as a backend uploads it (what each rotated copy costs
    in memory): the dense K/V for sdpa_contiguous, the whole pools (slack included) plus q, table
    and lengths for the paged ops, and the gathered dense K/V where the op produces them."""
    dense = 2 * case.batch * case.kv_heads * case.max_ctx_pad * case.head_dim * case.itemsize
    q_out = 2 * _q_bytes(case)
    index = _table_bytes(case)
    if case.op == "sdpa_contiguous":
        return dense + q_out
    pools = pool_bytes(case)
    if case.op == "gather":
        return pools + index + dense
    if case.op == "gather_sdpa":
        return pools + index + dense + q_out
    if case.op == "paged_sdpa":
        return pools + index + q_out
    if case.op == "append":
        return pools + index + _kv_token_bytes(case) * case.batch
    raise InvalidCase(f"[derived] no footprint for op {case.op!r}")


def _median(stats: Stats | float) -> float:
    # duck-typed so that this module never imports the harness (which imports it)
    median = float(getattr(stats, "median_us", stats))
    if not (math.isfinite(median) and median > 0):
        raise InvalidCase(f"[derived] median {median!r} µs must be a positive finite time")
    return median


def overhead_pct(op: str, median_us: float, contiguous_median_us: float | None) -> float | None:
    """``(median / contiguous_median - 1) * 100`` for attention ops against sdpa_contiguous of the
    same shape (same backend, options, timer and cache); 0 for sdpa_contiguous itself; None when
    the baseline is unknown or the op is not an attention op."""
    if op == "sdpa_contiguous":
        return 0.0
    if op not in ATTENTION_OPS or contiguous_median_us is None:
        return None
    return (_median(median_us) / _median(contiguous_median_us) - 1.0) * 100.0


def _ceiling(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    if not (math.isfinite(value) and value > 0):
        raise InvalidCase(f"[derived] {what} bandwidth {value!r} GB/s must be positive")
    return float(value)


def figures(op: str, nbytes: int, median_us: float, copy_gbps: float | None = None,
            contiguous_median_us: float | None = None, *,
            read_gbps: float | None = None) -> dict[str, Any]:
    """The derived figures of a record from its byte count and median: the one place they are
    computed (``derive`` for a case; readers rescaling a record to another median).

    - ``bytes``: ``nbytes`` (:func:`bytes_moved`);
    - ``gbps``: ``bytes / median_us / 1e3`` (decimal GB/s);
    - ``pct_of_peak``: ``gbps / copy_gbps * 100``, the device's copy bandwidth (read + write)
      measured at the start of the run; None when unknown;
    - ``pct_of_read``: the same against the measured read ceiling, when ``read_gbps`` is given;
    - ``overhead_pct``: :func:`overhead_pct`.
    """
    median = _median(median_us)
    gbps = nbytes / median / 1e3
    copy = _ceiling(copy_gbps, "copy")
    read = _ceiling(read_gbps, "read")
    out: dict[str, Any] = {"bytes": nbytes, "gbps": gbps,
                           "pct_of_peak": gbps / copy * 100.0 if copy else None,
                           "overhead_pct": overhead_pct(op, median, contiguous_median_us)}
    if read is not None:
        out["pct_of_read"] = gbps / read * 100.0
    return out


def derive(case: Case, stats: Stats | float, copy_gbps: float | None = None,
           contiguous_median_us: float | None = None, *,
           read_gbps: float | None = None) -> dict[str, Any]:
    """Derived figures of one measured case: :func:`figures` with ``bytes`` =
    :func:`bytes_moved`. ``stats`` may be a :class:`Stats` or a median in µs."""
    return figures(case.op, bytes_moved(case), _median(stats), copy_gbps, contiguous_median_us,
                   read_gbps=read_gbps)


def exceeds_ceiling(derived: dict[str, Any] | None) -> bool:
    """Whether a record's GB/s is above the device's measured copy ceiling (``pct_of_peak`` over
    100) and, where the run measured it, above its read ceiling too (``pct_of_read`` over 100):
    more than memory delivered to the run's own probes, so some bytes came from a cache. Both
    ceilings must be beaten so that a read-only op on a device whose reads outrun its copies is
    never flagged for being fast."""
    derived = derived or {}
    copy, read = derived.get("pct_of_peak"), derived.get("pct_of_read")
    return copy is not None and float(copy) > 100.0 and (read is None or float(read) > 100.0)


def contiguous_twin(case: Case) -> Case:
    """The sdpa_contiguous case of the same shape, whose median is an attention op's baseline.
    Layout, placement and slack do not change contiguous attention, so they are left as they are
    and callers match twins on the shape fields."""
    return case.with_(op="sdpa_contiguous")


__all__ = ["INDEX_BYTES", "bytes_moved", "contiguous_twin", "derive", "exceeds_ceiling",
           "figures", "footprint_bytes", "overhead_pct", "working_set_bytes"]
