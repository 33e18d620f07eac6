"""The points of a sweep: what to measure, in which order, and which share of it a shard runs.

A :class:`Point` is one record to produce (a case, a timer, a cache policy). :func:`expand` turns a
:class:`~kvmicro.grid.Grid` into points in run order: grouped by *shape* (everything but op, layout
and placement), groups ordered cheapest first, and inside a group ``sdpa_contiguous`` first, so
that the overhead of the other attention ops can be computed against it in the same run.
``--shard i/n`` keeps the groups whose index is ``i`` modulo ``n``: a shape's ops stay together on
one machine, so an overhead ratio never divides numbers from two machines.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .backends.registry import split_name
from .errors import InvalidCase
from .grid import Grid
from .workload import Case

#: device kinds whose backends have their own clocks; everything else times like a CPU
_GPU_KINDS = ("cuda", "metal", "gpu", "mps")


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
        return (f"{c.op} {getattr(c, 'spec', c.backend)} {c.layout} {c.placement} ctx{ctx} "
                f"b{c.batch} bs{c.block_size} {c.dtype} {self.timer}/{self.cache}")


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


def _caches_for(grid: Grid, backend: str) -> tuple[str, ...]:
    """The preset's CPU policies for a CPU backend where it names some, else the caches axis."""
    if grid.cpu_caches and device_kind(backend) == "cpu":
        return grid.cpu_caches
    return grid.caches


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
                                  for t in _timers_for(grid, backend)
                                  for c in _caches_for(grid, backend)))

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


def by_case(points: list[Point]) -> Iterator[list[Point]]:
    """Consecutive points of the same case (they share one prepare)."""
    run: list[Point] = []
    for p in points:
        if run and p.case != run[0].case:
            yield run
            run = []
        run.append(p)
    if run:
        yield run


def point_key(point: Point) -> tuple[Any, ...]:
    """The :func:`~kvmicro.results.record_key` of the record ``point`` becomes (for resume)."""
    from .results import case_key

    return case_key(point.case, point.timer, point.cache)


def contiguous_key(point: Point) -> tuple[Any, ...]:
    """Which ``sdpa_contiguous`` record a point's overhead is against: same shape, backend
    options, timer, cache (:func:`kvmicro.record.shape_key`, the one definition)."""
    from .record import shape_key as record_shape_key

    return record_shape_key(point.case, point.timer, point.cache)


def point_weight(point: Point) -> float:
    """Relative cost of a point for the ETA: a fixed part (sampling is bounded by time) plus
    one for every 256 MB the case puts on the device (materialize, upload, check scale so)."""
    from .derived import footprint_bytes

    return 1.0 + footprint_bytes(point.case) / 2.56e8


def plan_summary(points: list[Point]) -> str:
    """One line describing what a sweep will do (printed before it starts)."""
    cases = {p.case for p in points}
    backends = sorted({getattr(p.case, "spec", p.case.backend) for p in points})
    timers = sorted({p.timer for p in points})
    caches = sorted({p.cache for p in points})
    return (f"{len(points)} measurements of {len(cases)} cases on {', '.join(backends)}; "
            f"timers {', '.join(timers)}; cache {', '.join(caches)}")


__all__ = ["Point", "by_case", "contiguous_key", "device_kind", "expand", "parse_shard",
           "plan_summary", "point_key", "point_weight", "shape_groups", "shape_key"]
