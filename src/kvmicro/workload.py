"""What to measure: shapes, pool layouts, block placements, cases, and the host arrays of a case.

Everything here is pure numpy and deterministic for a seed. ``materialize(case)`` is the only source
of input data for backends and for the oracle, so every backend sees exactly the same numbers.

The pool's *logical* axes are N (physical block), S (slot in the block), H (kv head), D (head dim).
A :class:`Layout` is the order in which those axes are stored, outermost first: ``NSHD`` stores
``pool[n, s, h, d]``, ``HNSD`` stores ``pool[h, n, s, d]``. ``csrc/common/layout.h`` mirrors it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from itertools import permutations
from typing import Any

import numpy as np

from .dtypes import DTYPES, ITEMSIZE, check_dtype, to_carrier
from .errors import InvalidCase

OPS: tuple[str, ...] = ("sdpa_contiguous", "gather", "gather_sdpa", "paged_sdpa", "append")
ATTENTION_OPS: tuple[str, ...] = ("sdpa_contiguous", "gather_sdpa", "paged_sdpa")
AXES = "NSHD"
PRESET_LAYOUTS: tuple[str, ...] = ("NSHD", "HNSD", "NHSD")
ALL_LAYOUTS: tuple[str, ...] = tuple("".join(p) for p in permutations(AXES))
PLACEMENTS: tuple[str, ...] = ("contiguous", "reverse", "random", "fragmented")
DEFAULT_SLACK = 2.0


# ----------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """A pool's axis order: a permutation of the letters N, S, H, D, outermost first."""

    order: str

    def __post_init__(self) -> None:
        order = self.order
        if not isinstance(order, str) or len(order) != 4 or sorted(order) != sorted(AXES):
            bad = [c for c in str(order) if c not in AXES]
            repeated = sorted({c for c in str(order) if str(order).count(c) > 1})
            detail = []
            if bad:
                detail.append(f"unknown letters {''.join(bad)!r}")
            if repeated:
                detail.append(f"repeated letters {''.join(repeated)!r}")
            if len(str(order)) != 4:
                detail.append(f"{len(str(order))} letters instead of 4")
            raise InvalidCase(
                f"layout {order!r} is not a permutation of N, S, H, D"
                + (f" ({'; '.join(detail)})" if detail else "")
                + f"; presets: {', '.join(PRESET_LAYOUTS)}"
            )

    @classmethod
    def parse(cls, value: str | Layout) -> Layout:
        """A layout from its letters, in either case; anything but a string is refused."""
        if isinstance(value, Layout):
            return value
        if not isinstance(value, str):
            raise InvalidCase(f"layout {value!r} must be a string of the letters N, S, H, D; "
                              f"presets: {', '.join(PRESET_LAYOUTS)}")
        return cls(value.upper())

    def __str__(self) -> str:
        return self.order

    @property
    def is_preset(self) -> bool:
        return self.order in PRESET_LAYOUTS

    @property
    def d_innermost(self) -> bool:
        return self.order[-1] == "D"

    def physical_shape(self, num_blocks: int, block_size: int, kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        sizes = {"N": num_blocks, "S": block_size, "H": kv_heads, "D": head_dim}
        return tuple(sizes[a] for a in self.order)

    def strides(self, num_blocks: int, block_size: int, kv_heads: int,
                head_dim: int) -> dict[str, int]:
        """Element stride of each logical axis (N, S, H, D) in a contiguous pool of this layout."""
        sizes = {"N": num_blocks, "S": block_size, "H": kv_heads, "D": head_dim}
        strides: dict[str, int] = {}
        step = 1
        for axis in reversed(self.order):
            strides[axis] = step
            step *= sizes[axis]
        return {a: strides[a] for a in AXES}

    def elem_offset(self, strides: dict[str, int], n: int, s: int, h: int, d: int) -> int:
        return n * strides["N"] + s * strides["S"] + h * strides["H"] + d * strides["D"]

    def from_logical(self, pool_nshd: np.ndarray) -> np.ndarray:
        """A logical ``[N, S, H, D]`` array stored in this layout (C-contiguous copy)."""
        return np.ascontiguousarray(np.transpose(pool_nshd, [AXES.index(a) for a in self.order]))

    def to_logical(self, pool: np.ndarray) -> np.ndarray:
        """A pool in this layout viewed as logical ``[N, S, H, D]`` (a view, no copy)."""
        return np.transpose(pool, [self.order.index(a) for a in AXES])


# -------------------------------------------------------------------------------------- placement


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def place_blocks(placement: str, blocks_per_seq: list[int], slack: float,
                 rng: np.random.Generator) -> tuple[int, list[list[int]]]:
    """Physical block ids for every sequence's logical blocks.

    Returns ``(num_blocks, ids)``: the pool size ``max(needed, ceil(needed * slack))`` and, per
    sequence, its physical block ids in logical order. Ids are distinct across the whole batch.
    """
    if placement not in PLACEMENTS:
        raise InvalidCase(
            f"unknown placement {placement!r}; expected one of {', '.join(PLACEMENTS)}")
    if not slack >= 1.0:
        raise InvalidCase(f"slack {slack!r} must be >= 1.0 (pool size over blocks needed)")
    needed = sum(blocks_per_seq)
    num_blocks = max(needed, math.ceil(needed * slack))
    if placement == "contiguous":
        flat = list(range(needed))
    elif placement == "reverse":
        flat = list(range(num_blocks - 1, num_blocks - 1 - needed, -1))
    elif placement == "random":
        flat = [int(i) for i in rng.permutation(num_blocks)[:needed]]
    else:
        return num_blocks, _fragmented(blocks_per_seq, num_blocks, rng)
    ids, start = [], 0
    for n in blocks_per_seq:
        ids.append(flat[start:start + n])
        start += n
    return num_blocks, ids


def _fragmented(blocks_per_seq: list[int], num_blocks: int,
                rng: np.random.Generator) -> list[list[int]]:
    """A LIFO free-list allocator with churn: filler sequences grow and finish while the measured
    sequences grow one block at a time, interleaved, as in a running engine. What filler frees
    leaves holes that later allocations reuse in a scattered order."""
    free = list(range(num_blocks - 1, -1, -1))  # pop() hands out the lowest id first
    fillers: list[list[int]] = []
    ids: list[list[int]] = [[] for _ in blocks_per_seq]
    spare = num_blocks - sum(blocks_per_seq)
    pending = [(b, i) for i in range(max(blocks_per_seq, default=0))
               for b, n in enumerate(blocks_per_seq) if i < n]
    for b, _ in pending:
        # churn: sometimes start filler work, sometimes finish some (its blocks return to the list)
        if spare > 0 and rng.random() < 0.5:
            grab = int(rng.integers(1, max(2, min(spare, 8)) + 1))
            grab = min(grab, spare, len(free))
            fillers.append([free.pop() for _ in range(grab)])
            spare -= grab
        if fillers and rng.random() < 0.4:
            done = fillers.pop(int(rng.integers(len(fillers))))
            order = rng.permutation(len(done))
            free.extend(done[i] for i in order)
            spare += len(done)
        ids[b].append(free.pop())
    return ids


# ------------------------------------------------------------------------------------------- case


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and \
        not isinstance(value, (bool, np.bool_))


def _ctx_tuple(ctx: Any, batch: int) -> tuple[int, ...]:
    """ctx as one int per sequence. An int (every sequence) or a sequence of ints, one per
    sequence; anything else (None, a string, floats, bools, a nested list) is refused by value."""
    if isinstance(ctx, np.ndarray) and ctx.ndim == 0:
        ctx = ctx.item()
    if _is_int(ctx):
        values: tuple[int, ...] = (int(ctx),) * batch
    else:
        if isinstance(ctx, np.ndarray):
            items = list(ctx.tolist()) if ctx.ndim == 1 else None
        elif isinstance(ctx, (list, tuple)):
            items = list(ctx)
        else:
            items = None
        if items is None:
            raise InvalidCase(f"ctx {ctx!r} must be an integer or a list of integers (one per "
                              "sequence)")
        bad = [c for c in items if not _is_int(c)]
        if bad:
            raise InvalidCase(f"ctx {ctx!r} holds {bad[0]!r}, not an integer number of tokens")
        values = tuple(int(c) for c in items)
        if len(values) != batch:
            raise InvalidCase(f"ctx has {len(values)} entries {list(values)} but batch is {batch}")
    for c in values:
        if c <= 0:
            raise InvalidCase(f"ctx {c} must be a positive number of tokens")
    return values


_OPTION_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


def _option_text(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if _is_int(value):
        return str(int(value))
    if isinstance(value, str):
        return value.strip()
    raise InvalidCase(f"option value {value!r} must be a string, an integer or a bool")


def canonical_pairs(options: Any) -> tuple[tuple[str, str], ...]:
    """Options as ``Case.options`` holds them: (key, string value) pairs sorted by key, each key
    once. Only the syntax is checked here; which keys and values a backend takes is the
    registry's and the backend's to check (``Backend.canonical_options``)."""
    if options is None:
        return ()
    if isinstance(options, dict):
        pairs = list(options.items())
    elif isinstance(options, (list, tuple)):
        pairs = []
        for pair in options:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise InvalidCase(f"option {pair!r} is not a (key, value) pair")
            pairs.append((pair[0], pair[1]))
    else:
        raise InvalidCase(f"options {options!r} must be key=value pairs (a dict or a list of "
                          "pairs)")
    out: dict[str, str] = {}
    for key, value in pairs:
        if not isinstance(key, str) or not key or not set(key) <= _OPTION_KEY_CHARS \
                or key[0].isdigit():
            raise InvalidCase(f"option name {key!r} must be lower-case letters, digits and _")
        if key in out:
            raise InvalidCase(f"option {key} given more than once")
        text = _option_text(value)
        if not text or any(c in text for c in "[],=") or not text.isprintable():
            raise InvalidCase(f"option {key} value {value!r} must be a non-empty word (no "
                              "brackets, commas, '=' or control characters)")
        out[key] = text
    return tuple(sorted(out.items()))


def parse_backend_spec(spec: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``"native:cuda[kernel=mma,splits=8]"`` -> (``"native:cuda"``, (("kernel", "mma"),
    ("splits", "8"))): the plain backend name and its options as written (syntax only)."""
    if not isinstance(spec, str):
        raise InvalidCase(f"backend {spec!r} must be a string such as native:cpu")
    text = spec.strip()
    if "[" not in text and "]" not in text:
        return text, ()
    if text.count("[") != 1 or not text.endswith("]") or text.index("]") != len(text) - 1:
        raise InvalidCase(f"backend {spec!r}: options go in one trailing [key=value,...]")
    name, body = text[:-1].split("[")
    pairs = []
    for item in (body.split(",") if body.strip() else []):
        key, eq, value = item.partition("=")
        if not eq:
            raise InvalidCase(f"backend {spec!r}: option {item.strip()!r} is not key=value")
        pairs.append((key.strip(), value.strip()))
    return name.strip(), canonical_pairs(pairs)


def format_backend_spec(backend: str, options: Any = ()) -> str:
    """The spec form of a backend and its options: ``native:cuda[kernel=mma,splits=8]``."""
    pairs = canonical_pairs(options)
    if not pairs:
        return backend
    return f"{backend}[{','.join(f'{k}={v}' for k, v in pairs)}]"


@dataclass(frozen=True)
class Case:
    """One point to compute: an op on a backend for a shape, layout, placement and dtype.

    ``ctx`` is an int (every sequence) or one int per sequence (ragged). ``scale`` defaults to
    ``1/sqrt(head_dim)`` (a scale equal to that default is stored as None, so that the two spell
    one case). ``backend`` is the plain backend name; ``options`` are the backend's variant knobs
    as sorted (key, string) pairs, and a spec such as ``native:cuda[splits=8]`` given as the
    backend is split into the two. The registry validates options against the backend and drops
    defaults (``registry.parse_spec``). Validation happens here, once; an invalid case raises
    :class:`InvalidCase` naming the bad value.
    """

    op: str = "paged_sdpa"
    backend: str = "native:cpu"
    batch: int = 1
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    ctx: int | tuple[int, ...] = 1024
    block_size: int = 16
    layout: str = "NSHD"
    placement: str = "contiguous"
    slack: float = DEFAULT_SLACK
    dtype: str = "float16"
    q_len: int = 1
    scale: float | None = None
    seed: int = 0
    options: tuple[tuple[str, str], ...] = ()
    ctx_list: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.op, str) or self.op not in OPS:
            raise InvalidCase(f"unknown op {self.op!r}; expected one of {', '.join(OPS)}")
        backend, spec_options = parse_backend_spec(self.backend)
        if not backend:
            raise InvalidCase(f"backend {self.backend!r} is empty; e.g. native:cpu")
        options = canonical_pairs(self.options)
        if spec_options:
            if options and dict(options) != dict(spec_options):
                raise InvalidCase(f"backend {self.backend!r} and options {list(options)} "
                                  "disagree; give the options once")
            options = spec_options
        object.__setattr__(self, "backend", backend)
        object.__setattr__(self, "options", options)
        for name in ("batch", "q_heads", "kv_heads", "head_dim", "block_size", "q_len"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise InvalidCase(f"{name} {value!r} must be a positive integer")
            object.__setattr__(self, name, int(value))
        if not _is_int(self.seed) or self.seed < 0:
            raise InvalidCase(f"seed {self.seed!r} must be an integer >= 0")
        object.__setattr__(self, "seed", int(self.seed))
        if self.q_heads % self.kv_heads:
            raise InvalidCase(
                f"q_heads {self.q_heads} is not a multiple of kv_heads {self.kv_heads}")
        check_dtype(self.dtype)
        layout = Layout.parse(self.layout)
        object.__setattr__(self, "layout", layout.order)
        if not isinstance(self.placement, str) or self.placement not in PLACEMENTS:
            raise InvalidCase(
                f"unknown placement {self.placement!r}; expected one of {', '.join(PLACEMENTS)}")
        if not _is_real(self.slack) or not float(self.slack) >= 1.0 \
                or not math.isfinite(float(self.slack)):
            raise InvalidCase(f"slack {self.slack!r} must be a number >= 1.0 (pool size over "
                              "blocks needed)")
        object.__setattr__(self, "slack", float(self.slack))
        raw = self.ctx.item() if isinstance(self.ctx, np.ndarray) and self.ctx.ndim == 0 \
            else self.ctx
        ctx = _ctx_tuple(raw, self.batch)
        object.__setattr__(self, "ctx", int(raw) if _is_int(raw) else ctx)
        object.__setattr__(self, "ctx_list", ctx)
        if self.q_len > min(ctx):
            raise InvalidCase(f"q_len {self.q_len} exceeds the shortest ctx {min(ctx)}")
        if self.scale is not None:
            if not _is_real(self.scale) or not math.isfinite(float(self.scale)):
                raise InvalidCase(f"scale {self.scale!r} must be a finite number")
            scale = float(self.scale)
            object.__setattr__(self, "scale",
                               None if scale == 1.0 / math.sqrt(self.head_dim) else scale)

    # derived quantities ----------------------------------------------------------------------
    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def ragged(self) -> bool:
        return len(set(self.ctx_list)) > 1

    @property
    def stored_tokens(self) -> tuple[int, ...]:
        """Tokens each sequence's blocks must hold: ctx, plus the slot an append writes."""
        extra = 1 if self.op == "append" else 0
        return tuple(c + extra for c in self.ctx_list)

    @property
    def blocks_per_seq(self) -> tuple[int, ...]:
        return tuple(blocks_for(t, self.block_size) for t in self.stored_tokens)

    @property
    def max_blocks(self) -> int:
        return max(self.blocks_per_seq)

    @property
    def ctx_pad(self) -> tuple[int, ...]:
        return tuple(blocks_for(c, self.block_size) * self.block_size for c in self.ctx_list)

    @property
    def max_ctx_pad(self) -> int:
        return self.max_blocks * self.block_size

    @property
    def frag_pct(self) -> float:
        """Internal fragmentation: padded slots over allocated slots, in percent."""
        pad = sum(self.ctx_pad)
        return 100.0 * (pad - sum(self.ctx_list)) / pad

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def spec(self) -> str:
        """The backend with its options, as a user writes it: ``native:cuda[splits=8]``."""
        return format_backend_spec(self.backend, self.options)

    @property
    def label(self) -> str:
        """How tables and progress lines name the case's backend: :attr:`spec`."""
        return self.spec

    def with_(self, **changes: Any) -> Case:
        return replace(self, **changes)

    def flat(self) -> dict[str, Any]:
        """The case as flat JSON-ready fields (for records and pytest extra_info).
        :meth:`from_flat` inverts it for every field."""
        return {
            "backend": self.backend, "options": dict(self.options), "op": self.op,
            "batch": self.batch, "q_heads": self.q_heads, "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "ctx": self.ctx if isinstance(self.ctx, int) else list(self.ctx_list),
            "q_len": self.q_len, "block_size": self.block_size, "layout": self.layout,
            "placement": self.placement, "slack": float(self.slack), "dtype": self.dtype,
            "scale": self.softmax_scale, "seed": self.seed, "frag_pct": round(self.frag_pct, 3),
        }

    @classmethod
    def from_flat(cls, fields: dict[str, Any]) -> Case:
        """The case of flat fields (a record, or :meth:`flat`). Missing optional fields take
        their defaults (version-1 records have no ``options``); a missing required one raises
        InvalidCase naming it."""
        missing = [f for f in ("op", "backend", "batch", "q_heads", "kv_heads", "head_dim",
                               "ctx", "block_size", "layout", "placement", "dtype")
                   if f not in fields]
        if missing:
            raise InvalidCase(f"case fields lack {', '.join(missing)}")
        ctx = fields["ctx"]
        return cls(
            op=fields["op"], backend=fields["backend"], batch=fields["batch"],
            q_heads=fields["q_heads"], kv_heads=fields["kv_heads"],
            head_dim=fields["head_dim"], ctx=tuple(ctx) if isinstance(ctx, list) else ctx,
            block_size=fields["block_size"], layout=fields["layout"],
            placement=fields["placement"], slack=fields.get("slack", DEFAULT_SLACK),
            dtype=fields["dtype"], q_len=fields.get("q_len", 1),
            scale=fields.get("scale"), seed=fields.get("seed", 0),
            options=fields.get("options") or (),
        )


# ------------------------------------------------------------------------------------ materialize


def block_table(case: Case, rng: np.random.Generator
                ) -> tuple[int, list[list[int]], np.ndarray]:
    """Place the case's blocks: ``(num_blocks, ids per sequence, block_table)``, the table int32
    ``[B, max_blocks]`` padded with -1. Draws from ``rng`` first, as materialize() does."""
    num_blocks, ids = place_blocks(case.placement, list(case.blocks_per_seq), float(case.slack),
                                   rng)
    table = np.full((case.batch, case.max_blocks), -1, dtype=np.int32)
    for b, row in enumerate(ids):
        table[b, :len(row)] = row
    return num_blocks, ids, table


ARRAY_KEYS: tuple[str, ...] = ("q", "k_pool", "v_pool", "block_table", "ctx", "k_dense",
                               "v_dense", "k_new", "v_new")


def materialize(case: Case, seed: int | None = None) -> dict[str, np.ndarray]:
    """Host arrays for ``case``, deterministic for ``seed`` (default ``case.seed``).

    Keys: ``q`` [B, Hq, q_len, D]; ``k_pool``/``v_pool`` in the case's layout; ``block_table``
    int32 [B, max_blocks] padded with -1; ``ctx`` int32 [B]; ``k_dense``/``v_dense``
    [B, Hkv, max_ctx_pad, D] (what gather produces: whole blocks, zeros past a sequence's last
    block); ``k_new``/``v_new`` [B, Hkv, D] (what append writes). Values are standard normal,
    rounded to the dtype (bfloat16 in its float32 carrier); every pool slot, used or not, is
    filled, so a wrong block id changes the answer.
    """
    rng = np.random.default_rng(case.seed if seed is None else seed)
    B, Hq, Hkv, D, bs = case.batch, case.q_heads, case.kv_heads, case.head_dim, case.block_size
    num_blocks, ids, table = block_table(case, rng)

    def normal(*shape: int) -> np.ndarray:
        return to_carrier(rng.standard_normal(shape, dtype=np.float32), case.dtype)

    q = normal(B, Hq, case.q_len, D)
    k_logical = normal(num_blocks, bs, Hkv, D)
    v_logical = normal(num_blocks, bs, Hkv, D)
    layout = Layout(case.layout)
    k_dense = np.zeros((B, Hkv, case.max_ctx_pad, D), dtype=k_logical.dtype)
    v_dense = np.zeros_like(k_dense)
    for b, row in enumerate(ids):
        # [n_blocks, S, H, D] -> [H, n_blocks * S, D]
        span = len(row) * bs
        k_dense[b, :, :span] = k_logical[row].reshape(span, Hkv, D).transpose(1, 0, 2)
        v_dense[b, :, :span] = v_logical[row].reshape(span, Hkv, D).transpose(1, 0, 2)
    return {
        "q": q,
        "k_pool": layout.from_logical(k_logical),
        "v_pool": layout.from_logical(v_logical),
        "block_table": table,
        "ctx": np.asarray(case.ctx_list, dtype=np.int32),
        "k_dense": k_dense,
        "v_dense": v_dense,
        "k_new": normal(B, Hkv, D),
        "v_new": normal(B, Hkv, D),
    }


def pool_bytes(case: Case) -> int:
    """Bytes of one K pool plus one V pool on a device."""
    num_blocks = max(sum(case.blocks_per_seq), math.ceil(sum(case.blocks_per_seq) * case.slack))
    return 2 * num_blocks * case.block_size * case.kv_heads * case.head_dim * case.itemsize


__all__ = [
    "ALL_LAYOUTS",
    "ARRAY_KEYS",
    "ATTENTION_OPS",
    "AXES",
    "DTYPES",
    "OPS",
    "PLACEMENTS",
    "PRESET_LAYOUTS",
    "Case",
    "Layout",
    "block_table",
    "blocks_for",
    "canonical_pairs",
    "format_backend_spec",
    "materialize",
    "parse_backend_spec",
    "place_blocks",
    "pool_bytes",
]
