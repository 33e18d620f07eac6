"""The axes of a sweep: the ``Grid``, the named presets, and parsing command-line axis values.

A grid is the cross product of its axes (backend, op, layout, placement, ctx, batch, block, heads,
head_dim, dtype, slack) times timers times cache policies; :mod:`kvmicro.points` turns it into the
points a sweep measures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .backends.base import TIMERS
from .backends.registry import resolve
from .dtypes import DTYPES
from .errors import InvalidCase
from .workload import ALL_LAYOUTS, OPS, PLACEMENTS, PRESET_LAYOUTS, Layout

#: cache policies a sweep may name (harness/cache.py implements them)
CACHES: tuple[str, ...] = ("hot", "cold", "cold:flush", "cold:rotate")

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
    #: when not empty: the cache policies of CPU backends instead of ``caches`` (a preset's
    #: choice; a --cache on the command line empties it)
    cpu_caches: tuple[str, ...] = ()
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
    #: the cache policies of CPU backends, when they differ from ``axes["caches"]``
    cpu_caches: tuple[str, ...] = ()


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        "smoke", "a handful of tiny cases: proves the pipeline end to end in seconds (CI)",
        dict(ops=OPS, layouts=("NSHD", "HNSD"), placements=("reverse",), ctxs=(100,),
             batches=(2,), blocks=(16,), heads=((8, 2),), head_dims=(64,), dtypes=("float32",),
             slacks=(2.0,), caches=("hot",)),
        cpu_timers=("host", "batched"), gpu_timers=("device", "graph"),
        measure=dict(min_samples=5, max_time_s=0.05, warmup_count=1, warmup_time_s=0.005)),
    "quick": Preset(
        "quick", "small contexts on the default shape, CPU backends with a hot cache; under 2 "
        "minutes on a 2-core CPU",
        dict(ops=OPS, layouts=("NSHD", "HNSD"), placements=("reverse",), ctxs=(256, 1024, 4096),
             batches=(1, 4), blocks=(16,), heads=((32, 8),), head_dims=(128,),
             dtypes=("float16", "float32"), slacks=(2.0,), caches=("cold",)),
        # CPU backends hot: a cold flush writes 2x the L3 before every sample (600 MB on a
        # 300 MiB L3), and rotating copies past it costs more preparing than measuring; both
        # break the two minutes. The records say `cache: hot`; --cache cold measures them cold.
        cpu_timers=("host",), gpu_timers=("device", "graph"), cpu_caches=("hot",),
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
    "cuda-table": Preset(
        "cuda-table", "the CUDA figures of docs/cuda.md: ctx 1k-32k x batch 1/4, NSHD block 16, "
        "Hq 32 Hkv 8 D 128 fp16, graph and device timers, hot and cold (scripts/cuda_table.py)",
        dict(ops=OPS, layouts=("NSHD",), placements=("reverse",),
             ctxs=(1024, 4096, 16384, 32768), batches=(1, 4), blocks=(16,), heads=((32, 8),),
             head_dims=(128,), dtypes=("float16",), slacks=(2.0,), caches=("hot", "cold")),
        cpu_timers=("batched",), gpu_timers=("graph", "device")),
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
    cpu_caches = p.cpu_caches if overrides.get("cache") is None else ()
    return Grid(cpu_timers=p.cpu_timers, gpu_timers=p.gpu_timers, cpu_caches=cpu_caches,
                seed=seed, **values)


__all__ = ["AXIS_FIELDS", "CACHES", "DEFAULT_PRESET", "PRESETS", "Grid", "Preset", "get_preset",
           "make_grid", "parse_axis"]
