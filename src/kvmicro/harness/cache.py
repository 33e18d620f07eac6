"""Cache policies: what the last-level cache (L2 on CUDA, SLC on Apple, L3 on CPU) holds when a
sample starts. One class per policy; the record names the policy, its bytes and its pool count.

- :class:`HotCache` (``hot``): the same input set every time; whatever the previous op left in the
  cache helps the next one. A decode step never sees this for its KV (other layers run between),
  so it flatters memory-bound ops on small working sets; it is the right policy only for
  like-for-like comparisons with published hot-cache figures.
- :class:`ColdFlush` (``cold:flush``): before each sample, outside the timed window, write a scratch
  buffer of twice the cache size on the device, then sync; the sample's start marker comes after
  that sync. Right for timers whose sample is one op (host, device).
- :class:`ColdRotate` (``cold:rotate``): the backend uploads ``copies`` independent input sets
  (pools, tables, q) whose total working set is at least 5x the cache, and consecutive ops use
  consecutive copies, so each op finds its inputs evicted by the others. The only cold policy for
  timers that run many ops per sample (batched, graph): a flush cannot reach between them.

A rotation is only as cold as what actually ran. The host, device and batched timers cycle through
every copy, one op after another, across samples; the graph timer replays a captured graph of
``k`` ops whose op ``i`` uses copy ``i % copies``, so with ``k`` below the copies only the first
``k`` ever run. The policy is told what each timer ran (:meth:`ColdRotate.rotate`,
:meth:`~ColdRotate.schedule`, :meth:`~ColdRotate.graph_schedule`) and :meth:`~ColdRotate.describe`
reports it: ``copies_replayed`` (distinct copies the ops used), ``reuse_distance`` (the fewest ops
between two uses of one copy), ``bytes`` = reuse distance x working set (what passes through the
cache between two uses of one input set) and ``cold_enough`` from those bytes, never from the
copies merely prepared.

``cold`` picks by timer: ``cold:flush`` for host and device, ``cold:rotate`` for batched and
graph (:func:`resolve_cache_name`).
"""

from __future__ import annotations

import math
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import DeviceInfo, Prepared
from ..derived import working_set_bytes
from ..environment import llc_bytes
from ..errors import InvalidCase

CACHE_POLICIES: tuple[str, ...] = ("hot", "cold", "cold:flush", "cold:rotate")
#: timers whose sample is many ops: a flush before the sample leaves ops 2..k hot
MULTI_OP_TIMERS: tuple[str, ...] = ("batched", "graph")
#: flush this many times the cache size (FlashInfer's bench_gpu_time does the same)
FLUSH_FACTOR = 2
#: rotate until the rotated working set is this many times the cache size
ROTATE_FACTOR = 5
#: an upper bound on rotated copies, however small the working set
MAX_COPIES = 1024
#: cache size assumed when a device does not report one (larger than any current L2/SLC/L3
#: we know of, so the flush errs on the side of too much)
FALLBACK_CACHE_BYTES = 256 * 1024 * 1024
#: memory for rotated copies when a device does not report its memory
FALLBACK_BUDGET_BYTES = 2 * 1024 ** 3


def resolve_cache_name(name: str, timer: str | None = None) -> str:
    """The concrete policy name for a ``--cache`` value: ``cold`` becomes ``cold:flush`` for
    the host and device timers (and when no timer is given) and ``cold:rotate`` for batched and
    graph. Unknown names raise InvalidCase listing the valid ones."""
    if name not in CACHE_POLICIES:
        raise InvalidCase(f"unknown cache policy {name!r}; expected one of "
                          f"{', '.join(CACHE_POLICIES)}")
    if name == "cold":
        return "cold:rotate" if timer in MULTI_OP_TIMERS else "cold:flush"
    return name


class CachePolicy(ABC):
    """What the cache holds when a sample starts. ``before_sample`` runs outside the timed
    window and leaves the device idle (synced)."""

    name: str = ""
    #: whether consecutive ops should run on consecutive input copies
    rotates: bool = False

    def __init__(self, cache_bytes: int = 0, *, cache_assumed: bool = False) -> None:
        if not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise InvalidCase(f"[cache {self.name}] cache size {cache_bytes!r} must be an "
                              "integer >= 0 bytes")
        self.cache_bytes = cache_bytes
        #: True when the device did not report its cache and the fallback size is used
        self.cache_assumed = cache_assumed

    @property
    def flush_bytes(self) -> int:
        """Scratch bytes written before each sample (0 if the policy does not flush)."""
        return 0

    def copies_needed(self, working_set_bytes: int, footprint_bytes: int | None = None) -> int:
        """How many independent input sets a backend should upload (``prepare(copies=...)``)."""
        _check_bytes(working_set_bytes)
        return 1

    def rotate(self, prepared: Prepared) -> None:  # noqa: B027 (a no-op unless rotating)
        """Make the next input copy current (only rotating policies do anything)."""

    def graph_schedule(self, prepared: Prepared, k: int) -> list[int]:
        """The copies a graph of ``k`` ops replays under this policy, and the policy's note of
        it: every op on the current copy unless the policy rotates."""
        return [0] * k

    @abstractmethod
    def before_sample(self, prepared: Prepared) -> None:
        """Bring the cache into the policy's state, outside the timed window."""

    def describe(self, prepared: Prepared | None = None) -> dict[str, Any]:
        """``name``, ``bytes`` (flushed, or rotated in total), ``pools`` (input copies in use)
        and the device ``cache_bytes`` the policy was sized from."""
        # a policy that does not rotate runs every op on the current copy, however many exist
        out = {"name": self.name, "bytes": 0, "pools": 1, "cache_bytes": self.cache_bytes}
        if self.cache_assumed:
            out["cache_bytes_assumed"] = True
        return out


def _check_bytes(nbytes: int) -> None:
    if not isinstance(nbytes, int) or nbytes <= 0:
        raise InvalidCase(f"[cache] working set {nbytes!r} must be a positive number of bytes")


class HotCache(CachePolicy):
    """Reuse one input set; nothing happens between samples."""

    name = "hot"

    def before_sample(self, prepared: Prepared) -> None:
        return None


class ColdFlush(CachePolicy):
    """Write ``2 x cache_bytes`` of device scratch before each sample, then sync."""

    name = "cold:flush"

    @property
    def flush_bytes(self) -> int:
        return FLUSH_FACTOR * self.cache_bytes

    def before_sample(self, prepared: Prepared) -> None:
        prepared.flush_cache(self.flush_bytes)
        # the flush is device work: it must be over before the clock starts
        prepared.sync()

    def describe(self, prepared: Prepared | None = None) -> dict[str, Any]:
        return {**super().describe(prepared), "bytes": self.flush_bytes}


@dataclass
class _Rotation:
    """A rotation's state for one prepared case."""

    cursor: int = -1
    #: copies the ops have used
    used: set[int] = field(default_factory=set)
    #: the fewest ops between two uses of one copy in what ran last (0: nothing ran yet)
    reuse: int = 0


class ColdRotate(CachePolicy):
    """Cycle through independent input copies whose working sets total >= 5x the cache."""

    name = "cold:rotate"
    rotates = True

    def __init__(self, cache_bytes: int = 0, budget_bytes: int = FALLBACK_BUDGET_BYTES,
                 max_copies: int = MAX_COPIES, *, cache_assumed: bool = False) -> None:
        super().__init__(cache_bytes, cache_assumed=cache_assumed)
        if not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise InvalidCase(f"[cache cold:rotate] memory budget {budget_bytes!r} must be a "
                              "positive number of bytes")
        if not isinstance(max_copies, int) or max_copies < 1:
            raise InvalidCase(f"[cache cold:rotate] max_copies {max_copies!r} must be >= 1")
        self.budget_bytes = budget_bytes
        self.max_copies = max_copies
        #: per prepared case (cases may be interleaved): where the rotation is and what ran
        self._runs: weakref.WeakKeyDictionary[Prepared, _Rotation] = weakref.WeakKeyDictionary()

    @property
    def target_bytes(self) -> int:
        return ROTATE_FACTOR * self.cache_bytes

    def copies_needed(self, working_set_bytes: int, footprint_bytes: int | None = None) -> int:
        """``ceil(5 x cache / working_set)`` copies, at least 1, at most ``max_copies`` and at
        most what fits the memory budget at ``footprint_bytes`` (default: the working set) each.
        ``describe`` then says whether the target was reached."""
        _check_bytes(working_set_bytes)
        each = footprint_bytes if footprint_bytes is not None else working_set_bytes
        _check_bytes(each)
        wanted = max(1, math.ceil(self.target_bytes / working_set_bytes))
        affordable = max(1, self.budget_bytes // each)
        return min(wanted, affordable, self.max_copies)

    def _run(self, prepared: Prepared) -> _Rotation:
        run = self._runs.get(prepared)
        if run is None:
            # a new prepared case starts at its first copy, with nothing run yet
            run = self._runs[prepared] = _Rotation()
        return run

    def _advance(self, prepared: Prepared, steps: int) -> int:
        run = self._run(prepared)
        run.cursor = (run.cursor + steps) % max(1, prepared.copies)
        return run.cursor

    def _ran(self, prepared: Prepared, copies: list[int], reuse: int) -> None:
        run = self._run(prepared)
        run.used.update(copies)
        run.reuse = reuse

    def rotate(self, prepared: Prepared) -> None:
        """Make the next copy current: one op per call, cycling through all of them."""
        copy = self._advance(prepared, 1)
        if prepared.copies > 1:
            prepared.select(copy)
        self._ran(prepared, [copy], max(1, prepared.copies))

    def schedule(self, prepared: Prepared, k: int) -> list[int]:
        """The copies the next ``k`` back-to-back ops should use, continuing the rotation."""
        if prepared.copies <= 1:
            self._ran(prepared, [0], 1)
            return [0] * k
        first = self._advance(prepared, 1)
        self._advance(prepared, k - 1)
        order = [(first + i) % prepared.copies for i in range(k)]
        self._ran(prepared, order, prepared.copies)
        return order

    def graph_schedule(self, prepared: Prepared, k: int) -> list[int]:
        """A captured graph of ``k`` ops replays op ``i`` on copy ``i % copies``, the same copies
        every replay (the ``Prepared.graph_times`` contract): only ``min(k, copies)`` copies run,
        and across the end of one replay and the start of the next a copy comes back after
        ``k % copies`` ops (``copies`` when ``k`` is a whole number of cycles)."""
        copies = max(1, prepared.copies)
        order = [i % copies for i in range(k)]
        self._ran(prepared, order, (k % copies) or copies)
        return order

    def before_sample(self, prepared: Prepared) -> None:
        self.rotate(prepared)

    def describe(self, prepared: Prepared | None = None) -> dict[str, Any]:
        """What the rotation was, as run: ``pools`` / ``copies_replayed`` the copies the timed
        ops used, ``copies_prepared`` those uploaded, ``reuse_distance`` the fewest ops between
        two uses of one copy, ``bytes`` = reuse distance x ``working_set_bytes``, and
        ``cold_enough`` = bytes >= ``target_bytes``. Before anything ran it describes the plan
        (every copy, reused after all of them)."""
        out = super().describe(prepared)
        out["target_bytes"] = self.target_bytes
        if prepared is not None:
            prepared_copies = max(1, prepared.copies)
            run = self._runs.get(prepared)
            ran = run is not None and bool(run.used)
            replayed = len(run.used) if run is not None and ran else prepared_copies
            reuse = run.reuse if run is not None and ran else prepared_copies
            working_set = working_set_bytes(prepared.case)
            out.update({"pools": replayed, "copies_prepared": prepared_copies,
                        "copies_replayed": replayed, "reuse_distance": reuse,
                        "working_set_bytes": working_set, "bytes": reuse * working_set})
            out["cold_enough"] = out["bytes"] >= self.target_bytes
        return out


def make_cache_policy(name: str, device: DeviceInfo, timer: str | None = None, *,
                      budget_bytes: int | None = None) -> CachePolicy:
    """The policy for a ``--cache`` value on ``device``, sized from its ``cache_bytes`` (for a CPU
    device that reports none, the host's last-level cache; otherwise
    :data:`FALLBACK_CACHE_BYTES`, which ``describe`` shows). Pass ``timer``
    so that ``cold`` resolves as documented in :func:`resolve_cache_name`. The rotation budget
    defaults to a quarter of the device's memory (2 GiB when unknown)."""
    concrete = resolve_cache_name(name, timer)
    cache_bytes = int(device.cache_bytes or 0)
    if not cache_bytes and device.kind == "cpu":
        # a CPU backend that did not say: the host's own last-level cache is the one to defeat
        cache_bytes = llc_bytes()
    assumed = not cache_bytes
    if assumed:
        cache_bytes = FALLBACK_CACHE_BYTES
    if concrete == "hot":
        return HotCache(cache_bytes, cache_assumed=assumed)
    if concrete == "cold:flush":
        return ColdFlush(cache_bytes, cache_assumed=assumed)
    if budget_bytes is None:
        budget_bytes = (int(device.memory_bytes) // 4 if device.memory_bytes
                        else FALLBACK_BUDGET_BYTES)
    return ColdRotate(cache_bytes, budget_bytes=max(1, int(budget_bytes)), cache_assumed=assumed)


__all__ = ["CACHE_POLICIES", "FALLBACK_CACHE_BYTES", "FLUSH_FACTOR", "MAX_COPIES",
           "MULTI_OP_TIMERS", "ROTATE_FACTOR", "CachePolicy", "ColdFlush", "ColdRotate",
           "HotCache", "make_cache_policy", "resolve_cache_name"]
