"""Sweeps: a grid of cases, presets, sharding, resume, and the loop that measures them.

A sweep is the cross product of its axes (backend, op, layout, placement, ctx, batch, block, heads,
head_dim, dtype, slack) times timers times cache policies. Each point becomes one record:

    supports? -> materialize (shared by every op of a shape) -> prepare (copies the cache policy
    needs) -> run once, check against the oracle -> measure -> derive -> write -> release

``Unsupported`` and out-of-memory become skipped records, any other failure an error record; the
sweep goes on. Records are flushed one by one, so a killed sweep leaves a valid file and ``resume``
picks up where it stopped.

Order and shards: points are grouped by *shape* (everything but op, layout and placement), groups
ordered cheapest first, and inside a group ``sdpa_contiguous`` comes first so that the overhead of
the other attention ops can be computed against it in the same run. ``--shard i/n`` keeps the groups
whose index is ``i`` modulo ``n``: a shape's ops stay together on one machine, so an overhead ratio
never divides numbers from two machines.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from . import oracle
from .backends.base import TIMERS
from .backends.registry import get_backend, get_priority, resolve, split_name
from .check import compare
from .dtypes import DTYPES, carrier
from .errors import InvalidCase, KvmicroError, Unsupported
from .workload import ALL_LAYOUTS, ATTENTION_OPS, OPS, PLACEMENTS, PRESET_LAYOUTS, Case, Layout

#: memory for the input copies ``cold:rotate`` uploads per case. 2 GiB holds enough copies to
#: rotate 5x a 60 MB L2 for every op but append, whose working set (one slot per sequence) no
#: affordable number of whole-pool copies can make cold: there more copies only cost uploads.
DEFAULT_ROTATE_BUDGET_BYTES = 2 * 1024 ** 3
#: cache policies a sweep may name (harness/cache.py implements them)
CACHES: tuple[str, ...] = ("hot", "cold", "cold:flush", "cold:rotate")
#: device kinds whose backends have their own clocks; everything else times like a CPU
_GPU_KINDS = ("cuda", "metal", "gpu", "mps")

# ------------------------------------------------------------------------------------------ grid


@dataclass(frozen=True)
class Grid:
    """The axes of a sweep. ``timers`` may hold ``"auto"``: the preset's timers for the backend's
    device kind (``Preset.cpu_timers`` / ``Preset.gpu_timers``)."""

    backends: tuple[str, ...]
    ops: tuple[str, ...] = OPS
    layouts: tuple[str, ...] = ("NSHD",)
    placements: tuple[str, ...] = ("reverse",)
    ctxs: tuple[int | tuple[int, ...], ...] = (1024,)
    batches: tuple[int, ...] = (1,)
    blocks: tuple[int, ...] = (16,)
    heads: tuple[tuple[int, int], ...] = ((32, 8),)
    head_dims: tuple[int, ...] = (128,)
    dtypes: tuple[str, ...] = ("float16",)
    slacks: tuple[float, ...] = (2.0,)
    timers: tuple[str, ...] = ("auto",)
    caches: tuple[str, ...] = ("cold",)
    cpu_timers: tuple[str, ...] = ("host", "batched")
    gpu_timers: tuple[str, ...] = ("device", "graph")
    seed: int = 0


@dataclass(frozen=True)
class Preset:
    """Named axis values plus the measurement settings that fit them (MeasureConfig overrides)."""

    name: str
    description: str
    axes: dict[str, tuple[Any, ...]]
    cpu_timers: tuple[str, ...]
    gpu_timers: tuple[str, ...]
    measure: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        "smoke", "a handful of tiny cases: proves the pipeline end to end in seconds (CI)",
        dict(ops=OPS, layouts=("NSHD", "HNSD"), placements=("reverse",), ctxs=(100,),
             batches=(2,), blocks=(16,), heads=((8, 2),), head_dims=(64,), dtypes=("float32",),
             slacks=(2.0,), caches=("hot",)),
        cpu_timers=("host", "batched"), gpu_timers=("device", "graph"),
        measure=dict(min_samples=5, max_time_s=0.05, warmup_count=1, warmup_time_s=0.005)),
    "quick": Preset(
        "quick", "small contexts on the default shape; under 2 minutes on a 2-core CPU",
        dict(ops=OPS, layouts=("NSHD", "HNSD"), placements=("reverse",), ctxs=(256, 1024, 4096),
             batches=(1, 4), blocks=(16,), heads=((32, 8),), head_dims=(128,),
             dtypes=("float16", "float32"), slacks=(2.0,), caches=("cold",)),
        # host + cold:flush on a CPU: a flush per sample is cheap here, while rotating enough
        # copies of every case past the L3 would cost more preparing than measuring
        cpu_timers=("host",), gpu_timers=("device", "graph"),
        measure=dict(noise=0.05, min_samples=7, max_time_s=0.15, warmup_count=2,
                     warmup_time_s=0.01)),
    "seed": Preset(
        "seed", "the seed study: ctx 1k-32k x batch 1/4 x block 16/32/64, Hq 32 Hkv 8 D 128 fp16",
        dict(ops=OPS, layouts=("NSHD", "HNSD"), placements=("reverse",),
             ctxs=(1024, 4096, 16384, 32768), batches=(1, 4), blocks=(16, 32, 64),
             heads=((32, 8),), head_dims=(128,), dtypes=("float16",), slacks=(2.0,)),
        cpu_timers=("batched",), gpu_timers=("graph", "device")),
    "full": Preset(
        "full", "every preset layout and placement, more contexts, block sizes and dtypes",
        dict(ops=OPS, layouts=PRESET_LAYOUTS, placements=PLACEMENTS,
             ctxs=(256, 1024, 4096, 16384, 32768), batches=(1, 4, 16), blocks=(1, 16, 32, 64),
             heads=((32, 8), (32, 32)), head_dims=(64, 128), dtypes=DTYPES, slacks=(2.0,)),
        cpu_timers=("host", "batched"), gpu_timers=("host", "batched", "device", "graph")),
}
DEFAULT_PRESET = "quick"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InvalidCase(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


# ------------------------------------------------------------------------------- axis parsing

#: the command-line axes, in the order `kvmicro sweep --help` lists them -> Grid field
AXIS_FIELDS: dict[str, str] = {
    "backend": "backends", "op": "ops", "layout": "layouts", "placement": "placements",
    "ctx": "ctxs", "batch": "batches", "block": "blocks", "heads": "heads",
    "head_dim": "head_dims", "dtype": "dtypes", "slack": "slacks", "timer": "timers",
    "cache": "caches",
}


def _items(text: str | Iterable[Any]) -> list[str]:
    raw = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    items = [t.strip() for t in raw if t.strip()]
    return items


def _choice(axis: str, items: list[str], valid: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for item in items:
        if item == "all":
            out.extend(valid)
        elif item in valid:
            out.append(item)
        else:
            raise InvalidCase(f"--{axis}: unknown value {item!r}; expected one of "
                              f"{', '.join(valid)} (or all)")
    return tuple(dict.fromkeys(out))


def _positive_int(axis: str, item: str) -> int:
    try:
        value = int(item)
    except ValueError:
        raise InvalidCase(f"--{axis}: {item!r} is not an integer") from None
    if value <= 0:
        raise InvalidCase(f"--{axis}: {value} must be a positive integer")
    return value


def parse_axis(axis: str, text: str | Iterable[Any]) -> tuple[Any, ...]:
    """Parse a comma-separated command-line value for ``axis``; raise :class:`InvalidCase` naming
    the bad item and the valid ones.

    ``ctx`` items may be ragged (``37+300+5``: one context per sequence, paired with the batch of
    that size). ``heads`` items are ``q:kv``. ``layout`` accepts ``presets`` and ``all``.
    """
    if axis not in AXIS_FIELDS:
        raise InvalidCase(f"unknown sweep axis {axis!r}; expected one of {', '.join(AXIS_FIELDS)}")
    items = _items(text)
    if not items:
        raise InvalidCase(f"--{axis}: empty list")
    if axis == "backend":
        return tuple(resolve(",".join(items)))
    if axis == "op":
        return _choice(axis, items, OPS)
    if axis == "placement":
        return _choice(axis, items, PLACEMENTS)
    if axis == "dtype":
        return _choice(axis, items, DTYPES)
    if axis == "timer":
        return _choice(axis, items, (*TIMERS, "auto"))
    if axis == "cache":
        return _choice(axis, items, CACHES)
    if axis == "layout":
        layouts: list[str] = []
        for item in items:
            if item.lower() == "presets":
                layouts.extend(PRESET_LAYOUTS)
            elif item.lower() == "all":
                layouts.extend(ALL_LAYOUTS)
            else:
                layouts.append(Layout.parse(item).order)
        return tuple(dict.fromkeys(layouts))
    if axis == "ctx":
        ctxs: list[int | tuple[int, ...]] = []
        for item in items:
            parts = [_positive_int(axis, p) for p in item.split("+")]
            ctxs.append(parts[0] if len(parts) == 1 else tuple(parts))
        return tuple(dict.fromkeys(ctxs))
    if axis == "heads":
        heads: list[tuple[int, int]] = []
        for item in items:
            q, sep, kv = item.partition(":")
            if not sep:
                raise InvalidCase(f"--heads: {item!r} is not q:kv (for example 32:8)")
            hq, hkv = _positive_int(axis, q), _positive_int(axis, kv)
            if hq % hkv:
                raise InvalidCase(f"--heads: q_heads {hq} is not a multiple of kv_heads {hkv}")
            heads.append((hq, hkv))
        return tuple(dict.fromkeys(heads))
    if axis == "slack":
        slacks: list[float] = []
        for item in items:
            try:
                value = float(item)
            except ValueError:
                raise InvalidCase(f"--slack: {item!r} is not a number") from None
            if not value >= 1.0 or not math.isfinite(value):
                raise InvalidCase(f"--slack: {value} must be >= 1.0 (pool size over blocks needed)")
            slacks.append(value)
        return tuple(dict.fromkeys(slacks))
    return tuple(dict.fromkeys(_positive_int(axis, item) for item in items))


def make_grid(preset: str = DEFAULT_PRESET, *, backend: str = "auto", seed: int = 0,
              **overrides: str | Iterable[Any] | None) -> Grid:
    """The grid of ``preset`` with command-line style overrides (``op="gather,append"``,
    ``heads="32:8"``, ...); ``None`` leaves the preset's value."""
    p = get_preset(preset)
    values: dict[str, Any] = dict(p.axes)
    for axis, text in overrides.items():
        if text is None:
            continue
        if axis not in AXIS_FIELDS:
            raise InvalidCase(f"unknown sweep axis {axis!r}; expected one of "
                              f"{', '.join(AXIS_FIELDS)}")
        values[AXIS_FIELDS[axis]] = parse_axis(axis, text)
    # last: `auto` asks every backend whether it is available, which imports frameworks
    values["backends"] = parse_axis("backend", backend)
    if not values["backends"]:
        raise InvalidCase(f"--backend {backend}: no backend is available here (kvmicro env says "
                          "why)")
    return Grid(cpu_timers=p.cpu_timers, gpu_timers=p.gpu_timers, seed=seed, **values)


# ----------------------------------------------------------------------------------- points


@dataclass(frozen=True)
class Point:
    """One record to produce: a case, the timer that samples it and the cache policy around it."""

    case: Case
    timer: str
    cache: str

    @property
    def label(self) -> str:
        c = self.case
        ctx = c.ctx if isinstance(c.ctx, int) else "+".join(map(str, c.ctx_list))
        return (f"{c.op} {c.backend} {c.layout} {c.placement} ctx{ctx} b{c.batch} "
                f"bs{c.block_size} {c.dtype} {self.timer}/{self.cache}")


def device_kind(backend: str) -> str:
    """``"gpu"`` for backends whose device has its own clock, else ``"cpu"``."""
    base, _ = split_name(backend)
    return "gpu" if base.split(":")[1] in _GPU_KINDS else "cpu"


def _timers_for(grid: Grid, backend: str) -> tuple[str, ...]:
    out: list[str] = []
    for timer in grid.timers:
        if timer == "auto":
            out.extend(grid.gpu_timers if device_kind(backend) == "gpu" else grid.cpu_timers)
        else:
            out.append(timer)
    return tuple(dict.fromkeys(out))


def _cache_name(cache: str, timer: str) -> str:
    """``cold`` names a different policy per timer (flush for one-op samples, rotation for
    many-op samples); points and records carry the concrete name."""
    from .harness.cache import resolve_cache_name

    return resolve_cache_name(cache, timer)


def shape_key(case: Case) -> tuple[Any, ...]:
    """What ``sdpa_contiguous`` of the same shape shares with an op: everything but op, layout and
    placement (the dense K/V it reads do not depend on them)."""
    return (case.backend, case.batch, case.q_heads, case.kv_heads, case.head_dim, case.ctx_list,
            case.block_size, case.dtype, float(case.slack), case.q_len, case.seed)


def shape_groups(grid: Grid) -> list[list[Point]]:
    """The grid's points, grouped by shape (all backends of a shape together), cheapest shape first;
    inside a group ``sdpa_contiguous`` first, then each layout and placement with the other ops.

    ``sdpa_contiguous`` reads dense K/V, so it is measured once per shape (with the first layout and
    placement) rather than once per layout. A ragged ctx pairs only with the batch of its length.
    """
    shapes = []
    for dtype in grid.dtypes:
        for hq, hkv in grid.heads:
            for head_dim in grid.head_dims:
                for slack in grid.slacks:
                    for ctx in grid.ctxs:
                        for batch in grid.batches:
                            if isinstance(ctx, tuple) and len(ctx) != batch:
                                continue
                            for block in grid.blocks:
                                shapes.append(dict(dtype=dtype, q_heads=hq, kv_heads=hkv,
                                                   head_dim=head_dim, slack=slack, ctx=ctx,
                                                   batch=batch, block_size=block))
    if not shapes:
        ragged = [c for c in grid.ctxs if isinstance(c, tuple)]
        raise InvalidCase(f"no shape in the grid: ragged ctx {'+'.join(map(str, ragged[0]))} "
                          f"has {len(ragged[0])} sequences but --batch is "
                          f"{','.join(map(str, grid.batches))}" if ragged else "empty grid")

    def cost(s: dict[str, Any]) -> tuple[Any, ...]:
        ctx = s["ctx"] if isinstance(s["ctx"], tuple) else (s["ctx"],) * s["batch"]
        return (sum(ctx) * s["kv_heads"] * s["head_dim"], s["block_size"])

    shapes.sort(key=cost)   # stable: equal costs keep the axes' order

    def points(shape: dict[str, Any], op: str, backend: str, layout: str,
               placement: str) -> list[Point]:
        case = Case(op=op, backend=backend, layout=layout, placement=placement, seed=grid.seed,
                    **shape)
        return list(dict.fromkeys(Point(case, t, _cache_name(c, t))
                                  for t in _timers_for(grid, backend) for c in grid.caches))

    groups = []
    for shape in shapes:
        group: list[Point] = []
        if "sdpa_contiguous" in grid.ops:
            for backend in grid.backends:
                group += points(shape, "sdpa_contiguous", backend, grid.layouts[0],
                                grid.placements[0])
        for layout in grid.layouts:
            for placement in grid.placements:
                for backend in grid.backends:
                    for op in grid.ops:
                        if op != "sdpa_contiguous":
                            group += points(shape, op, backend, layout, placement)
        groups.append(group)
    return groups


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise InvalidCase(f"--shard {text!r} is not i/n (for example 0/4)") from None
    if not sep or n < 1 or not 0 <= i < n:
        raise InvalidCase(f"--shard {text!r}: need 0 <= i < n (for example 0/4)")
    return i, n


def expand(grid: Grid, shard: tuple[int, int] = (0, 1)) -> list[Point]:
    """The points of ``grid`` in run order; with ``shard=(i, n)`` only the shape groups whose
    index is ``i`` modulo ``n``."""
    i, n = shard
    return [p for g, group in enumerate(shape_groups(grid)) if g % n == i for p in group]


# ----------------------------------------------------------------------- arrays and references


def _arrays_key(case: Case) -> tuple[Any, ...]:
    # materialize draws the same numbers for every layout (the layout only permutes the pools at
    # the end), so arrays are shared across layouts and ops; append stores one more token, which
    # can change the table and the pool, so it gets its own arrays
    return (shape_key(case)[1:], case.placement, case.op == "append")


class ArrayCache:
    """Host arrays and oracle results, computed once per shape and shared by every op, layout and
    backend of that shape. Holds the last ``size`` shapes (the run order keeps a shape's points
    together, so two slots, plain and append, suffice)."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()

    def _entry(self, case: Case) -> dict[str, Any]:
        from .workload import materialize

        key = _arrays_key(case)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        while len(self._entries) >= self.size:
            self._entries.popitem(last=False)
        logical = materialize(case.with_(layout="NSHD"))
        entry: dict[str, Any] = {"logical": logical, "layouts": {}, "refs": {}}
        self._entries[key] = entry
        return entry

    def arrays(self, case: Case) -> dict[str, np.ndarray]:
        """``materialize(case)``, exactly."""
        entry = self._entry(case)
        if case.layout not in entry["layouts"]:
            logical, layout = entry["logical"], Layout(case.layout)
            entry["layouts"] = {case.layout: {
                **logical,
                "k_pool": layout.from_logical(logical["k_pool"]),
                "v_pool": layout.from_logical(logical["v_pool"])}}
        return entry["layouts"][case.layout]

    def reference(self, case: Case) -> Any:
        """``oracle.run(case, arrays)`` in float64. Attention results do not depend on the layout
        (the logical pool is the same), so they are computed once per shape; gather and append
        are recomputed on each call (see :meth:`expected` for the cheap exact check)."""
        if case.op not in ATTENTION_OPS:
            return oracle.run(case, self.arrays(case))
        entry = self._entry(case)
        if "attention" not in entry["refs"]:
            base = case.with_(layout="NSHD", op="sdpa_contiguous")
            entry["refs"]["attention"] = oracle.run(base, entry["logical"])
        return entry["refs"]["attention"]

    def expected(self, case: Case) -> tuple[np.ndarray, np.ndarray]:
        """The oracle's (k, v) result of gather or append, converted to the dtype's carrier: the
        values are copies of carrier values, so the conversion is exact and an exact op can be
        checked with a plain equality instead of a float64 difference of pool-sized arrays.
        Computed once per shape (append on the NSHD pool, then permuted into the layout)."""
        entry = self._entry(case)
        refs = entry["refs"]
        if case.op not in refs:
            dtype = carrier(case.dtype)
            ref = oracle.run(case.with_(layout="NSHD"), entry["logical"])
            refs[case.op] = tuple(np.asarray(r).astype(dtype) for r in ref)
            del ref
        ref = refs[case.op]
        if case.op == "append" and case.layout != "NSHD":
            if refs.get("append_layout", (None,))[0] != case.layout:
                layout = Layout(case.layout)
                refs["append_layout"] = (case.layout,
                                         tuple(layout.from_logical(pool) for pool in ref))
            return refs["append_layout"][1]
        return ref

    def clear(self) -> None:
        self._entries.clear()


# ------------------------------------------------------------------------------------ running


def exact_check(case: Case, out: Any, expected: tuple[np.ndarray, np.ndarray]) -> Any:
    """``CheckResult`` of a gather or append output that equals ``expected`` exactly (gather on
    the positions each sequence holds, as check.compare does), else None: the caller then asks
    check.compare, which measures and explains the difference."""
    from .check import CheckResult

    if not isinstance(out, (tuple, list)) or len(out) != 2:
        return None
    for got, want in zip(out, expected, strict=True):
        got = np.asarray(got)
        if got.shape != want.shape or got.dtype != want.dtype:
            return None
        if case.op == "gather":
            if not all(np.array_equal(got[b, :, :n], want[b, :, :n])
                       for b, n in enumerate(case.ctx_list)):
                return None
        elif not np.array_equal(got, want):
            return None
    return CheckResult(0.0, 0.0, True, "")


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError, or a CUDA/Metal allocation failure by its message."""
    if isinstance(exc, MemoryError):
        return True
    if "OutOfMemory" in type(exc).__name__:
        return True
    text = str(exc).lower()
    return "out of memory" in text or "cudaerrormemoryallocation" in text


@dataclass
class Outcome:
    """What a sweep did: the file, the records it wrote this time, and counts."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    resumed: int = 0
    interrupted: bool = False
    elapsed_s: float = 0.0

    @property
    def counts(self) -> Counter[str]:
        return Counter(r.get("status", "?") for r in self.records)


class Progress:
    """A one-line progress bar with an ETA on a terminal; on a pipe, a plain line every
    ``every_s`` seconds. The ETA weighs each record by its expected cost (``weight``: large
    shapes take longer to materialize, upload and check), so it does not run late on sweeps that
    end with the largest contexts."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool | None = None,
                 every_s: float = 10.0, width: int = 24, total_weight: float | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.width, self.every_s = total, 0, width, every_s
        self.total_weight = float(total if total_weight is None else total_weight)
        self.done_weight = 0.0
        self.counts: Counter[str] = Counter()
        self.start = self._last = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = self.total > 0 if enabled is None else enabled

    def _eta(self) -> str:
        elapsed = time.monotonic() - self.start
        if not self.done_weight:
            return f"{_clock(elapsed)} elapsed"
        left = elapsed / self.done_weight * max(0.0, self.total_weight - self.done_weight)
        return f"{_clock(elapsed)} elapsed, ETA {_clock(left)}"

    def _line(self, label: str) -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        counts = " ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return (f"[{bar}] {self.done}/{self.total} {100 * frac:3.0f}% {counts} | {self._eta()}"
                + (f" | {label}" if label else ""))

    def update(self, label: str = "", status: str | None = None, weight: float = 1.0) -> None:
        """Show ``label`` as in flight; with ``status``, count one finished record first."""
        if status is not None:
            self.done += 1
            self.done_weight += weight
            self.counts[status] += 1
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            cols = shutil.get_terminal_size((120, 24)).columns - 1
            self.stream.write("\r\033[K" + self._line(label)[:cols])
            self.stream.flush()
        elif status and (now - self._last >= self.every_s or self.done == self.total):
            self._last = now
            self.stream.write(self._line(label) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\033[K" + self._line("") + "\n")
            self.stream.flush()


def point_weight(point: Point) -> float:
    """Relative cost of a point for the ETA: a fixed part (sampling is bounded by time) plus
    one for every 256 MB the case puts on the device (materialize, upload, check scale so)."""
    from .derived import footprint_bytes

    return 1.0 + footprint_bytes(point.case) / 2.56e8


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def _point_key(point: Point) -> Any:
    from .results import case_key

    return case_key(point.case, point.timer, point.cache)


def _contiguous_key(point: Point) -> tuple[Any, ...]:
    return (*shape_key(point.case), point.timer, point.cache)


class Runner:
    """Measures points one by one and writes their records. Reusable by the pytest plugin: the
    parts (``prepare_checked``, ``bandwidth``, ``arrays``) are methods."""

    def __init__(self, measure: dict[str, Any] | None = None,
                 rotate_budget_bytes: int = DEFAULT_ROTATE_BUDGET_BYTES) -> None:
        self.measure_overrides = dict(measure or {})
        self.rotate_budget_bytes = int(rotate_budget_bytes)
        self.cache = ArrayCache()
        self._bandwidth: dict[str, dict[str, Any]] = {}
        self._bandwidth_by_device: dict[tuple[str, str], dict[str, Any]] = {}
        self._device: dict[str, str] = {}
        self._contiguous: dict[tuple[Any, ...], float] = {}
        #: seconds the last prepare_checked spent preparing and checking (go into the records)
        self.timings: dict[str, float] = {}

    # -- per backend, once ------------------------------------------------------------------
    def availability_reason(self, backend: str) -> str:
        """Empty when ``backend`` can run here, else why not."""
        try:
            avail = get_backend(backend).availability()
        except ImportError as exc:
            return f"backend {backend} is not available here: {exc}"
        return "" if avail else f"backend {backend} is not available here: {avail.reason}"

    def device_name(self, backend: str) -> str:
        if backend not in self._device:
            try:
                self._device[backend] = get_backend(backend).device_info().name
            except Exception as exc:  # device_info of an unavailable backend may fail; not fatal
                self._device[backend] = f"? ({exc})"
        return self._device[backend]

    def bandwidth(self, backend: str) -> dict[str, Any]:
        """The backend's device copy/read ceilings, measured once per device per run."""
        if backend not in self._bandwidth:
            b = get_backend(backend)
            info = b.device_info()
            key = (info.kind, info.name)
            if key not in self._bandwidth_by_device:
                self._bandwidth_by_device[key] = dict(b.bandwidth())
            self._bandwidth[backend] = self._bandwidth_by_device[key]
        return self._bandwidth[backend]

    # -- per case ---------------------------------------------------------------------------
    def config(self, point: Point) -> Any:
        from .harness.measure import MeasureConfig

        return MeasureConfig(timer=point.timer, cache=point.cache, **self.measure_overrides)

    def cache_policy(self, point: Point) -> Any:
        from .harness.cache import make_cache_policy

        info = get_backend(point.case.backend).device_info()
        # the policy's own budget is a quarter of the device's memory; a sweep caps it, since
        # every rotated copy is uploaded per case and copies past the target buy nothing
        budget = min(info.memory_bytes // 4 if info.memory_bytes else self.rotate_budget_bytes,
                     self.rotate_budget_bytes)
        return make_cache_policy(point.cache, info, point.timer, budget_bytes=max(1, budget))

    def prepare_checked(self, case: Case, copies: int = 1) -> tuple[Any, Any]:
        """Prepare ``case`` with ``copies`` input sets, run it once and check it against the oracle.
        Returns ``(prepared, check_result)``; the caller releases ``prepared``. Raises
        ``Unsupported`` when the backend refuses the case."""
        backend = get_backend(case.backend)
        backend.supports(case)
        arrays = self.cache.arrays(case)
        if case.op == "append" and backend.device_info().kind == "cpu":
            # append writes into its pools; a CPU backend that wraps host memory must not change
            # the arrays the next backend sees (a device backend uploads a copy anyway)
            arrays = {**arrays, "k_pool": arrays["k_pool"].copy(),
                      "v_pool": arrays["v_pool"].copy()}
        t0 = time.perf_counter()
        prepared = backend.prepare(case, arrays, copies)
        t1 = time.perf_counter()
        try:
            prepared.select(0)
            prepared.run()
            prepared.sync()
            out = prepared.output()
            result = None
            if case.op not in ATTENTION_OPS:
                result = exact_check(case, out, self.cache.expected(case))
            if result is None:   # a mismatch (or an odd result): the oracle's full account
                result = compare(case, arrays, out, self.cache.reference(case))
        except BaseException:
            prepared.release()
            raise
        self.timings = {"prepare_s": round(t1 - t0, 4),
                        "check_s": round(time.perf_counter() - t1, 4)}
        return prepared, result

    def derive(self, point: Point, stats: Any) -> dict[str, Any]:
        from .derived import derive

        bandwidth = self.bandwidth(point.case.backend)
        contiguous = self._contiguous.get(_contiguous_key(point))
        return derive(point.case, stats, bandwidth.get("copy_gbps"), contiguous,
                      read_gbps=bandwidth.get("read_gbps"))

    def run_case(self, points: list[Point]) -> Iterator[dict[str, Any]]:
        """Records for the points of one case (its timers and cache policies; prepared once,
        with as many input copies as the most demanding policy needs)."""
        from .derived import footprint_bytes, working_set_bytes
        from .harness.measure import measure
        from .results import case_record

        case = points[0].case
        device = self.device_name(case.backend)

        # the submission priority is process-wide (set_priority); records say which was in force
        timings: dict[str, Any] = {"priority": get_priority()}

        def record(point: Point, status: str, reason: str = "", **kw: Any) -> dict[str, Any]:
            extra = {"timer": point.timer, "cache": point.cache, **timings}
            return case_record(point.case, status=status, reason=reason, device=device,
                               extra=extra, **kw)

        reason = self.availability_reason(case.backend)
        if reason:
            for p in points:
                yield record(p, "skipped", reason)
            return
        prepared = None
        try:
            policies = [self.cache_policy(p) for p in points]
            copies = max(max(1, int(pol.copies_needed(working_set_bytes(case),
                                                      footprint_bytes(case))))
                         for pol in policies)
            prepared, check = self.prepare_checked(case, copies)
            timings.update(self.timings, kernel=prepared.kernel)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            status, why = _failure(exc)
            for p in points:
                yield record(p, status, why)
            return
        try:
            if not check.passed:
                why = (f"{case.op} on {case.backend} disagrees with the oracle: max |err| "
                       f"{check.max_abs_err:.3g} > tolerance {check.tolerance:.3g}"
                       + (f" ({check.detail})" if check.detail else ""))
                for p in points:
                    yield record(p, "error", why, check=check.to_dict())
                return
            for p, policy in zip(points, policies, strict=True):
                if p.timer not in prepared.timers:
                    yield record(p, "skipped", f"timer {p.timer} not available on "
                                 f"{case.backend} (it has {', '.join(prepared.timers)})",
                                 check=check.to_dict())
                    continue
                try:
                    m = measure(prepared, self.config(p), policy)
                    derived = self.derive(p, m.stats)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:
                    status, why = _failure(exc)
                    yield record(p, status, why, check=check.to_dict())
                    continue
                if case.op == "sdpa_contiguous":
                    self._contiguous[_contiguous_key(p)] = m.stats.median_us
                yield case_record(p.case, status="ok", measurement=m, check=check.to_dict(),
                                  derived=derived, device=device, extra=timings)
        finally:
            prepared.release()


def _failure(exc: BaseException) -> tuple[str, str]:
    """The status and reason a failed case is recorded with: a refusal or an exhausted device is
    a skip, anything else an error."""
    if isinstance(exc, Unsupported):
        return "skipped", str(exc)
    if is_out_of_memory(exc):
        return "skipped", f"out of memory: {exc}"
    return "error", _describe(exc)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, KvmicroError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _by_case(points: list[Point]) -> Iterator[list[Point]]:
    """Consecutive points of the same case (they share one prepare)."""
    run: list[Point] = []
    for p in points:
        if run and p.case != run[0].case:
            yield run
            run = []
        run.append(p)
    if run:
        yield run


def run_sweep(points: list[Point], out: str | Path, *, argv: list[str] | None = None,
              resume: bool = False, measure: dict[str, Any] | None = None,
              progress: bool | None = None, stream: TextIO | None = None,
              rotate_budget_bytes: int = DEFAULT_ROTATE_BUDGET_BYTES) -> Outcome:
    """Measure ``points`` into the JSONL file ``out`` (appended, flushed per record).

    With ``resume``, points whose record is already in ``out`` are skipped. Ctrl-C stops after the
    record in flight is dropped; the file stays valid and ``Outcome.interrupted`` is set.
    """
    from .results import ResultsWriter, provenance

    stream = stream if stream is not None else sys.stderr
    start = time.monotonic()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    runner = Runner(measure, rotate_budget_bytes)
    outcome = Outcome(path=path, total=len(points))
    backends = list(dict.fromkeys(p.case.backend for p in points))
    bandwidth: dict[str, Any] = {}
    try:
        if progress is not False:
            print("kvmicro sweep: measuring each device's memory bandwidth", file=stream,
                  flush=True)
        for name in backends:
            if not runner.availability_reason(name):
                bandwidth[name] = runner.bandwidth(name)
        with ResultsWriter(path, provenance(argv or sys.argv, backends, bandwidth),
                           resume=resume) as writer:
            done = set(writer.done_keys) if resume else set()
            todo = [p for p in points if not done or _point_key(p) not in done]
            outcome.resumed = len(points) - len(todo)
            weights = {p: point_weight(p) for p in todo}
            bar = Progress(len(todo), stream=stream, enabled=progress,
                           total_weight=sum(weights.values()))
            try:
                for group in _by_case(todo):
                    bar.update(group[0].label)
                    records = runner.run_case(group)
                    try:
                        for point, rec in zip(group, records, strict=False):
                            writer.write(rec)
                            outcome.records.append(rec)
                            bar.update(group[0].label, status=rec.get("status", "?"),
                                       weight=weights[point])
                    finally:
                        records.close()   # releases the prepared case now, even on Ctrl-C
            finally:
                bar.close()
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        runner.cache.clear()
        outcome.elapsed_s = time.monotonic() - start
    return outcome


def plan_summary(points: list[Point]) -> str:
    """One line describing what a sweep will do (printed before it starts)."""
    cases = {p.case for p in points}
    backends = sorted({p.case.backend for p in points})
    timers = sorted({p.timer for p in points})
    caches = sorted({p.cache for p in points})
    return (f"{len(points)} measurements of {len(cases)} cases on {', '.join(backends)}; "
            f"timers {', '.join(timers)}; cache {', '.join(caches)}")


__all__ = [
    "AXIS_FIELDS", "CACHES", "DEFAULT_PRESET", "DEFAULT_ROTATE_BUDGET_BYTES", "PRESETS",
    "ArrayCache", "Grid", "Outcome", "Point", "Preset", "Progress", "Runner", "device_kind",
    "exact_check", "expand", "get_preset", "make_grid", "parse_axis", "parse_shard",
    "plan_summary", "point_weight", "run_sweep", "shape_groups", "shape_key",
]
