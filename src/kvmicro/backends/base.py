"""The backend contract: what every implementation of the ops provides, and nothing more.

A :class:`Backend` says whether it can run here (and why not), what device it is on, which cases it
supports, and prepares a case: it uploads the host arrays once, validates, picks its kernel, and
returns a :class:`Prepared` whose ``run()`` only dispatches. The harness times ``Prepared`` objects
through ``run``/``sync`` (host and batched timers) or through the backend's own device clocks
(``device_times``/``graph_times``), and never imports a framework.

Backends never compute statistics and never compare against the oracle themselves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidCase, Unsupported
from ..workload import Case

#: every timer kind a record may name (docs/methodology.md says what one sample of each is)
TIMERS: tuple[str, ...] = ("host", "batched", "device", "graph")

#: submission priorities a backend may offer (`--priority`): the stream / queue priority class
PRIORITIES: tuple[str, ...] = ("low", "normal", "high")

OPTION_KINDS: tuple[str, ...] = ("choice", "int", "bool")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Option:
    """One variant knob of a backend: what a case spec ``native:cuda[splits=8]`` may set.

    Every knob that changes what runs is an option, so that it is part of the case's identity
    (records, ``--resume``, merge, compare, report). ``kind`` is ``choice`` (one of ``choices``),
    ``int`` (within ``minimum``/``maximum`` where given) or ``bool``. Values arrive as strings
    (from a spec or a record) or typed; :meth:`parse` returns the typed value and
    :meth:`canonical` the one string a record stores for it.
    """

    kind: str
    default: Any
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    help: str = ""

    def __post_init__(self) -> None:
        if self.kind not in OPTION_KINDS:
            raise InvalidCase(f"[options] kind {self.kind!r} is not one of "
                              f"{', '.join(OPTION_KINDS)}")
        if self.kind == "choice" and self.default not in self.choices:
            raise InvalidCase(f"[options] default {self.default!r} is not one of the choices "
                              f"{', '.join(self.choices)}")

    def valid(self) -> str:
        """The valid values, in words (for error messages and ``--help``)."""
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "bool":
            return "true or false"
        low = "" if self.minimum is None else f" >= {self.minimum}"
        high = "" if self.maximum is None else f" <= {self.maximum}"
        return "an integer" + (low + (" and" if low and high else "") + high)

    def parse(self, value: Any, *, where: str = "option") -> Any:
        """The typed value of ``value``; InvalidCase naming it and the valid values otherwise."""
        def bad() -> InvalidCase:
            return InvalidCase(f"{where} value {value!r} is not valid; expected {self.valid()}")

        if self.kind == "choice":
            if not isinstance(value, str) or value.strip() not in self.choices:
                raise bad()
            return value.strip()
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            text = value.strip().lower() if isinstance(value, str) else None
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise bad()
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, np.integer)):
            number = int(value)
        elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            number = int(value.strip())
        else:
            raise bad()
        if (self.minimum is not None and number < self.minimum) or \
                (self.maximum is not None and number > self.maximum):
            raise bad()
        return number

    def canonical(self, value: Any) -> str:
        """The string a record stores for a valid (typed or string) value."""
        typed = self.parse(value)
        if self.kind == "bool":
            return "true" if typed else "false"
        return str(typed)


#: the submission priority, an option of the backends whose stream or queue has one
PRIORITY_OPTION = Option("choice", "normal", PRIORITIES,
                         help="stream / queue priority class the op is submitted with")


def _option_pairs(options: Mapping[str, Any] | Iterable[tuple[str, Any]] | None,
                  where: str) -> list[tuple[str, Any]]:
    if options is None:
        return []
    if isinstance(options, Mapping):
        return [(k, v) for k, v in options.items()]
    if isinstance(options, (str, bytes)):
        raise InvalidCase(f"{where}: options {options!r} must be key=value pairs, not a string")
    pairs: list[tuple[str, Any]] = []
    for pair in options:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InvalidCase(f"{where}: option {pair!r} is not a (key, value) pair")
        pairs.append((pair[0], pair[1]))
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise InvalidCase(f"{where}: option {', '.join(repeated)} given more than once")
    return pairs


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""  # why not, when not available; a short note (versions) otherwise

    def __bool__(self) -> bool:
        return self.available


@dataclass
class DeviceInfo:
    """What a backend knows of its device; goes into the run's provenance."""

    name: str                      # "NVIDIA H100 80GB HBM3", "AMD EPYC 7B13 (2 threads)"
    kind: str                      # "cpu", "cuda", "mps", "metal", "gpu"
    cache_bytes: int = 0           # last-level cache the cold policy must defeat (L2 / SLC / L3)
    memory_bytes: int = 0          # device memory (0 if unknown or shared with the host)
    extra: dict[str, Any] = field(default_factory=dict)  # versions, SM count, clocks, flags


class Prepared(ABC):
    """One case, uploaded and planned on a device. ``run()`` dispatches one op and returns without
    waiting; nothing on the timed path allocates, validates or converts."""

    #: the timers this prepared case can take samples with (a subset of TIMERS)
    timers: tuple[str, ...] = ("host", "batched")
    #: independent input sets uploaded (for cache rotation); ``select`` picks the current one
    copies: int = 1
    #: the device's SM clock for the throttle guard (a :class:`~kvmicro.backends.nvml.SmClock`,
    #: set by GPU backends where NVML reads it); None: no clock, no throttle guard
    sm_clock: Any = None

    def __init__(self, case: Case) -> None:
        self.case = case

    @property
    def kernel(self) -> str:
        """What runs this case: the kernel or framework path chosen at prepare, in words ("" where
        the backend does not say). Records carry it, so two numbers name what produced them."""
        return ""

    @abstractmethod
    def run(self) -> None:
        """Dispatch the op once on the current copy; do not wait for it."""

    @abstractmethod
    def sync(self) -> None:
        """Wait until every dispatched op has completed."""

    @abstractmethod
    def output(self) -> Any:
        """The result of the last run as numpy carrier arrays, by the oracle's conventions:
        attention -> [B, Hq, q_len, D]; gather -> (k_dense, v_dense); append -> (k_pool, v_pool)."""

    def select(self, copy: int) -> None:
        """Make input set ``copy`` (0 <= copy < copies) current."""
        if not 0 <= copy < self.copies:
            raise IndexError(f"copy {copy} outside [0, {self.copies})")

    def flush_cache(self, nbytes: int) -> None:
        """Evict the working set from the last-level cache by writing ``nbytes`` of scratch on the
        device. Devices with their own memory override this; the default writes host memory."""
        scratch = getattr(self, "_flush_scratch", None)
        if scratch is None or scratch.nbytes < nbytes:
            scratch = np.empty(max(nbytes, 1), dtype=np.uint8)
            self._flush_scratch = scratch
        scratch[:nbytes] += 1

    def clock_fraction(self) -> float | None:
        """The device's SM clock now as a fraction of its maximum (read by the throttle guard
        right after each sample), or None where this device's clock is not read."""
        return None if self.sm_clock is None else self.sm_clock.fraction()

    def device_times(self, reps: int, flush_bytes: int = 0) -> list[float]:
        """``reps`` samples of one op each, in µs, between device-side timestamps; before each,
        flush ``flush_bytes`` of cache outside the timed window. Only where ``device`` in timers."""
        raise Unsupported(f"{self.case.backend} has no device timer")

    def graph_times(self, reps: int, k: int, rotate: bool = True) -> list[float]:
        """``reps`` samples of the per-op time of ``k`` ops captured once and replayed, in µs:
        cycling through the copies when ``rotate`` (cold:rotate), else all ``k`` on the current
        copy (hot). Only where ``graph`` in timers."""
        raise Unsupported(f"{self.case.backend} has no graph timer")

    def release(self) -> None:  # noqa: B027 (optional: a no-op unless the backend holds buffers)
        """Free device buffers now rather than at garbage collection."""


class Backend(ABC):
    """An implementation of the ops on one device. Instances are cheap; frameworks are imported
    lazily, so that ``availability()`` can say why an import failed."""

    #: "torch:cpu", "native:cuda", ...
    name: str = ""
    ops: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32")
    #: the variant knobs a case may set (``native:cuda[kernel=mma]``); prepare() reads them
    #: only through ``self.parse_options(case.options)``
    OPTIONS: ClassVar[dict[str, Option]] = {}
    #: whether prepare() honours the ``priority`` option (a CUDA stream / Metal queue priority
    #: class). A class that says True and does not declare the option gets it (see
    #: __init_subclass__); new code declares ``OPTIONS = {"priority": PRIORITY_OPTION, ...}``.
    has_priority: bool = False
    #: backends of different process groups never share a sweep worker process ("" is the common
    #: group): a framework whose native libraries clash with another's (MLX's CUDA build loads a
    #: cuDNN that torch refuses) names its own group (kvmicro.worker reads it)
    process_group: ClassVar[str] = ""
    #: deprecated: the process-wide ``--priority`` (registry.set_priority), kept until every
    #: backend reads the per-case ``priority`` option (:meth:`submission_priority`)
    priority: str = "normal"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.has_priority and "priority" not in cls.OPTIONS:
            cls.OPTIONS = {**cls.OPTIONS, "priority": PRIORITY_OPTION}
        if "priority" in cls.OPTIONS:
            cls.has_priority = True

    @classmethod
    def parse_options(cls, options: Mapping[str, Any] | Iterable[tuple[str, Any]] | None
                      ) -> dict[str, Any]:
        """Every option of this backend as a typed value, defaults filled in. An unknown key or
        a bad value raises InvalidCase naming it and listing the valid ones."""
        name = cls.name or cls.__name__
        typed = {key: option.default for key, option in cls.OPTIONS.items()}
        for key, value in _option_pairs(options, name):
            option = cls.OPTIONS.get(key) if isinstance(key, str) else None
            if option is None:
                valid = (f"valid options: {', '.join(sorted(cls.OPTIONS))}" if cls.OPTIONS
                         else "it has no options")
                raise InvalidCase(f"{name}: unknown option {key!r}; {valid}")
            typed[key] = option.parse(value, where=f"{name}: option {key}")
        return typed

    @classmethod
    def canonical_options(cls, options: Mapping[str, Any] | Iterable[tuple[str, Any]] | None
                          ) -> tuple[tuple[str, str], ...]:
        """``Case.options`` for these options: validated, sorted by key, string values, and
        the options left at their defaults dropped (so ``[priority=normal]`` is no variant)."""
        typed = cls.parse_options(options)
        return tuple((key, cls.OPTIONS[key].canonical(value))
                     for key, value in sorted(typed.items())
                     if value != cls.OPTIONS[key].default)

    def submission_priority(self, case: Case) -> str:
        """The priority ``case`` is to be submitted with: its ``priority`` option, else the
        deprecated process-wide one (registry.set_priority), for backends not yet reading
        options."""
        if "priority" not in self.OPTIONS:
            return "normal"
        chosen = self.parse_options(case.options)["priority"]
        return chosen if dict(case.options).get("priority") else self.priority

    @abstractmethod
    def availability(self) -> Availability:
        """Whether this backend can run here; when not, the reason."""

    @abstractmethod
    def device_info(self) -> DeviceInfo:
        ...

    def supports(self, case: Case) -> None:
        """Raise :class:`Unsupported` naming the reason unless this backend can run ``case``."""
        if case.op not in self.ops:
            raise Unsupported(f"{self.name} does not implement {case.op}")
        if case.dtype not in self.dtypes:
            raise Unsupported(f"{self.name} does not support dtype {case.dtype}")
        if case.q_len != 1:
            raise Unsupported(f"{self.name} implements decode only (q_len 1, got {case.q_len})")
        if self.priority != "normal" and not self.has_priority:
            raise Unsupported(f"{self.name} has no stream or queue priority control "
                              f"(asked for priority {self.priority!r})")
        self.parse_options(case.options)

    @abstractmethod
    def prepare(self, case: Case, arrays: dict[str, np.ndarray], copies: int = 1) -> Prepared:
        """Upload ``arrays`` (``copies`` independent sets), validate and plan; the result's
        ``run()`` is ready to be timed."""

    def versions(self) -> dict[str, str]:
        """Framework and library versions for provenance."""
        return {}

    def bandwidth(self) -> dict[str, float]:
        """The device's measured memory ceilings in decimal GB/s: ``read_gbps`` (a large reduction)
        and ``copy_gbps`` (a large copy, bytes read plus bytes written). Measured once per run; the
        default measures host memory with numpy, which is right for CPU backends."""
        return host_bandwidth()


def run_once(prepared: Prepared) -> Any:
    """Run ``prepared`` once, wait for it and return its output; release it whatever happens."""
    try:
        prepared.run()
        prepared.sync()
        return prepared.output()
    finally:
        prepared.release()


def host_bandwidth(nbytes: int = 256 * 1024 * 1024, reps: int = 5) -> dict[str, float]:
    """Host memory read and copy bandwidth, best of ``reps``, over buffers far larger than any
    L3."""
    import time

    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    read, copy = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        src.sum(dtype=np.float32)
        t1 = time.perf_counter()
        np.copyto(dst, src)
        t2 = time.perf_counter()
        read.append(nbytes / (t1 - t0) / 1e9)
        copy.append(2 * nbytes / (t2 - t1) / 1e9)
    return {"read_gbps": max(read), "copy_gbps": max(copy), "method": "numpy sum / copyto, "
            f"{nbytes / 1e6:.0f} MB, best of {reps}"}
