"""A case record, typed: what one measured (or skipped, or failed) point of a sweep says.

:class:`Record` is the one reading of a results-file case line. It is built by
``results.case_record`` (which returns its JSON), read back by :meth:`Record.from_json` (version-1
and version-2 lines alike), and written by :meth:`Record.to_json`, which gives back every field it
was read with, so a reader that only looks never changes a file. Three keys are defined here and
nowhere else:

- :func:`record_key`: a record's identity (:data:`KEY_FIELDS`): the case with its backend options,
  timer and cache policy. ``--resume``, ``merge`` and ``compare`` match records by it.
- :func:`shape_key`: what ``sdpa_contiguous`` of the same shape shares with an op, measured alike:
  everything but op, layout and placement. The overhead of an attention op is taken against the
  contiguous record of the same shape key.
- :func:`peer_key`: the identity without the backend: the same case on another backend.

Derived figures (bytes, GB/s, % of the measured ceilings, overhead) come from ``derived.py``;
:meth:`Record.overhead_pct` and :meth:`Record.gbps` read them through it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .derived import overhead_pct
from .errors import InvalidCase
from .workload import Case, canonical_pairs, format_backend_spec, parse_backend_spec

#: the version written; version-1 lines (no ``options``) are still read
SCHEMA_VERSION = 2
READABLE_VERSIONS: tuple[int, ...] = (1, 2)
STATUSES: tuple[str, ...] = ("ok", "skipped", "error")

#: the record fields a case's identity is made of, in the order of :func:`record_key`'s tuple
KEY_FIELDS: tuple[str, ...] = ("backend", "op", "batch", "q_heads", "kv_heads", "head_dim", "ctx",
                               "q_len", "block_size", "layout", "placement", "slack", "dtype",
                               "timer", "cache", "seed", "scale", "options")
#: the fields :func:`shape_key` keeps: an op's sdpa_contiguous twin shares all of them
SHAPE_FIELDS: tuple[str, ...] = ("backend", "options", "batch", "q_heads", "kv_heads", "head_dim",
                                 "ctx", "block_size", "dtype", "slack", "q_len", "seed", "scale",
                                 "timer", "cache")


def _name(value: Any) -> Any:
    return value.get("name") if isinstance(value, Mapping) else value


def _backend_and_options(record: Mapping[str, Any]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The plain backend and canonical options of a record: ``options`` (version 2), or options
    written into the backend as a spec, or, in a version-1 record, the process-wide ``priority``
    field it carried."""
    backend, spec_options = parse_backend_spec(str(record.get("backend", "")))
    options = dict(spec_options)
    stored = record.get("options")
    if stored:
        options.update(dict(canonical_pairs(stored)))
    elif "options" not in record and record.get("priority") not in (None, "", "normal"):
        options["priority"] = str(record["priority"])
    return backend, canonical_pairs(options)


def _ctx_key(record: Mapping[str, Any]) -> tuple[int, ...]:
    ctx = record["ctx"]
    if isinstance(ctx, (list, tuple)):
        return tuple(int(c) for c in ctx)
    return (int(ctx),) * int(record["batch"])


def _scale_key(record: Mapping[str, Any]) -> float | None:
    scale, head_dim = record.get("scale"), record.get("head_dim")
    if scale is None and isinstance(head_dim, int) and head_dim > 0:
        scale = 1.0 / math.sqrt(head_dim)
    return None if scale is None else float(f"{float(scale):.12g}")


def _field_key(record: Mapping[str, Any], name: str) -> Any:
    """One field of a key, normalised so that equal cases give equal keys whatever wrote them."""
    if name == "backend":
        return _backend_and_options(record)[0]
    if name == "options":
        return _backend_and_options(record)[1]
    if name == "ctx":
        return _ctx_key(record)
    if name == "batch":
        return int(record["batch"])
    if name == "q_len":
        return int(record.get("q_len", 1))
    if name == "seed":
        return int(record.get("seed", 0))
    if name == "slack":
        slack = record.get("slack")
        return round(float(slack), 6) if slack is not None else None
    if name == "scale":
        return _scale_key(record)
    if name in ("timer", "cache"):
        return _name(record.get(name, "")) or ""
    return record.get(name)


def _require_case_fields(record: Mapping[str, Any]) -> None:
    missing = [f for f in ("backend", "op", "batch", "ctx") if f not in record]
    if missing:
        raise InvalidCase(f"[results] record lacks {', '.join(missing)}: not a case record")


def record_key(record: Mapping[str, Any] | Record) -> tuple[Any, ...]:
    """The identity of a case record (:data:`KEY_FIELDS`), for resume, merge and compare: backend
    and its options, op, shape (batch, heads, head_dim, per-sequence ctx, q_len, block_size),
    layout, placement, slack, dtype, softmax scale, timer, cache and seed."""
    if isinstance(record, Record):
        record = record.to_json()
    _require_case_fields(record)
    return tuple(_field_key(record, name) for name in KEY_FIELDS)


def case_key(case: Case, timer: str, cache: str) -> tuple[Any, ...]:
    """:func:`record_key` of the record ``case`` would get under ``timer`` and the concrete
    ``cache`` policy name, without building it."""
    return record_key({**case.flat(), "timer": timer, "cache": cache})


def shape_key(item: Mapping[str, Any] | Record | Case, timer: str | None = None,
              cache: str | None = None) -> tuple[Any, ...]:
    """What ``sdpa_contiguous`` of the same shape shares with an op (:data:`SHAPE_FIELDS`):
    everything but op, layout and placement (the dense K/V it reads do not depend on them), with
    the timer and cache policy, so that overheads compare like with like. A record brings its
    own timer and cache; a :class:`Case` takes them from the arguments."""
    if isinstance(item, Case):
        record: Mapping[str, Any] = {**item.flat(), "timer": timer or "", "cache": cache or ""}
    else:
        record = item.to_json() if isinstance(item, Record) else item
        if timer is not None or cache is not None:
            record = {**record, "timer": timer or record.get("timer", ""),
                      "cache": cache or record.get("cache", "")}
    _require_case_fields(record)
    return tuple(_field_key(record, name) for name in SHAPE_FIELDS)


def peer_key(record: Mapping[str, Any] | Record) -> tuple[Any, ...]:
    """:func:`record_key` without backend and options: the same case, timer and cache on any
    backend (``compare --new-backend/--base-backend``)."""
    key = record_key(record)
    return tuple(v for name, v in zip(KEY_FIELDS, key, strict=True)
                 if name not in ("backend", "options"))


def backend_label(record: Mapping[str, Any] | Record) -> str:
    """The backend as a user writes it, options included: ``native:cuda[splits=8]``."""
    if isinstance(record, Record):
        return record.case.spec
    backend, options = _backend_and_options(record)
    return format_backend_spec(backend, options)


# ------------------------------------------------------------------------------- the record

#: case fields of a line (Case.flat()); ``frag_pct`` is derived from the others
_CASE_FIELDS: tuple[str, ...] = ("backend", "options", "op", "batch", "q_heads", "kv_heads",
                                 "head_dim", "ctx", "q_len", "block_size", "layout", "placement",
                                 "slack", "dtype", "scale", "seed", "frag_pct")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class Record:
    """One case line. ``case`` holds the case fields typed; the measurement fields are those
    docs/schema.md lists; ``extra`` keeps every other top-level field as it was read (``kernel``,
    ``priority``, a pytest-benchmark line's ``source``...), so :meth:`to_json` loses nothing."""

    case: Case
    status: str = "ok"
    reason: str = ""
    device: str = ""
    timer: str = ""
    cache: str = ""
    cache_bytes: int | None = None
    cache_pools: int | None = None
    cache_policy: dict[str, Any] | None = None
    criterion: dict[str, Any] | None = None
    k: int | None = None
    dropped: int = 0
    dropped_why: dict[str, int] = field(default_factory=dict)
    clock: dict[str, Any] = field(default_factory=dict)
    warmup_samples: int = 0
    elapsed_s: float | None = None
    samples_us: tuple[float, ...] = ()
    stats: dict[str, Any] | None = None
    derived: dict[str, Any] | None = None
    check: dict[str, Any] | None = None
    flags: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    #: the schema version the line was read with (SCHEMA_VERSION for new records)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise InvalidCase(f"[results] status {self.status!r} is not one of "
                              f"{', '.join(STATUSES)}")
        object.__setattr__(self, "samples_us", tuple(float(s) for s in self.samples_us))
        object.__setattr__(self, "flags", tuple(str(f) for f in self.flags))
        clash = sorted(set(self.extra) & _RESERVED)
        if clash:
            raise InvalidCase(f"[results] extra fields {', '.join(clash)} would replace record "
                              "fields")

    # -------------------------------------------------------------------------- JSON
    @classmethod
    def from_json(cls, line: Mapping[str, Any]) -> Record:
        """A record from a case line of either schema version (a dict from ``read_results``)."""
        if line.get("type", "case") != "case":
            raise InvalidCase(f"[results] a {line.get('type')!r} line is not a case record")
        _require_case_fields(line)
        backend, options = _backend_and_options(line)
        case = Case.from_flat({**line, "backend": backend, "options": options})
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in ("case", "extra", "schema_version") or f.name not in line:
                continue
            value = line[f.name]
            if f.name in ("timer", "cache"):
                value = _name(value) or ""
            if f.name in ("reason", "device") and value is None:
                value = ""
            if f.name in ("samples_us", "flags"):
                value = tuple(value or ())
            if f.name in ("dropped_why", "clock"):
                value = dict(value or {})
            if f.name in ("dropped", "warmup_samples"):
                value = int(value or 0)
            values[f.name] = value
        extra = {k: v for k, v in line.items() if k not in _RESERVED}
        version = line.get("schema_version", SCHEMA_VERSION)
        return cls(case=case, extra=extra, schema_version=int(str(version).split(".")[0]),
                   **values)

    def to_json(self) -> dict[str, Any]:
        """The case line (schema version 2): the case's flat fields, then the measurement, then
        ``extra``, in the order ``results.case_record`` writes them."""
        out: dict[str, Any] = {"type": "case", "schema_version": SCHEMA_VERSION,
                               **self.case.flat(), "device": self.device}
        for f in fields(self):
            if f.name in ("case", "extra", "schema_version", "device"):
                continue
            out[f.name] = _jsonable(getattr(self, f.name))
        out.update(self.extra)
        return out

    # -------------------------------------------------------------------------- keys
    @property
    def key(self) -> tuple[Any, ...]:
        """:func:`record_key`."""
        return record_key(self.to_json())

    @property
    def shape_key(self) -> tuple[Any, ...]:
        """:func:`shape_key`."""
        return shape_key(self.to_json())

    @property
    def label(self) -> str:
        """The backend as a spec: ``native:cuda[splits=8]``."""
        return self.case.spec

    # -------------------------------------------------------------------------- figures
    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def median_us(self) -> float | None:
        value = (self.stats or {}).get("median_us")
        return None if value is None else float(value)

    @property
    def converged(self) -> bool | None:
        if self.stats and "converged" in self.stats:
            return bool(self.stats["converged"])
        if self.criterion and "converged" in self.criterion:
            return bool(self.criterion["converged"])
        return None

    @property
    def kernel(self) -> str | None:
        value = self.extra.get("kernel")
        return None if value is None else str(value)

    def gbps(self) -> float | None:
        """Decimal GB/s as recorded."""
        value = (self.derived or {}).get("gbps")
        return None if value is None else float(value)

    def overhead_pct(self, contiguous_median_us: float | None = None) -> float | None:
        """Overhead versus sdpa_contiguous of the same shape: as recorded, else against
        ``contiguous_median_us`` (from the contiguous record of the same :attr:`shape_key`);
        None for ops without one or when unknown."""
        recorded = (self.derived or {}).get("overhead_pct")
        if recorded is not None:
            return float(recorded)
        if self.median_us is None or contiguous_median_us is None:
            return None
        return overhead_pct(self.case.op, self.median_us, contiguous_median_us)


#: top-level names that are Record fields or case fields (``extra`` may not reuse them)
_RESERVED: frozenset[str] = frozenset(
    {f.name for f in fields(Record)} - {"case", "extra"} | set(_CASE_FIELDS) | {"type"})


def results_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one results line, shipped with the package as
    ``kvmicro/schema/results-v2.schema.json``; version-1 lines validate against it too."""
    from importlib.resources import files

    text = files("kvmicro").joinpath("schema", "results-v2.schema.json").read_text("utf-8")
    return json.loads(text)  # type: ignore[no-any-return]


__all__ = ["KEY_FIELDS", "READABLE_VERSIONS", "SCHEMA_VERSION", "SHAPE_FIELDS", "STATUSES",
           "Record", "backend_label", "case_key", "peer_key", "record_key", "results_schema",
           "shape_key"]
