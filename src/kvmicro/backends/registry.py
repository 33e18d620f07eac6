"""Backend names -> backend objects, imported lazily: ``import kvmicro`` imports no framework.

A name is ``family:device`` with an optional device index (``native:cuda:1``, ``torch:cuda:0``).
A *spec* is a name with the backend's options in brackets: ``native:cuda[kernel=mma,splits=8]``,
``native:cuda:1[priority=high]``. :func:`parse_spec` splits a spec into the name and its canonical
options (validated against ``Backend.OPTIONS``, sorted, defaults dropped), which is what
``Case.backend`` and ``Case.options`` hold.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

from ..errors import InvalidCase
from ..workload import format_backend_spec, parse_backend_spec
from .base import PRIORITIES, Backend

# family:device -> (module, class). The order is the order of preference for `--backend auto`.
_FACTORIES: dict[str, tuple[str, str]] = {
    "native:cuda": ("kvmicro.backends.native", "NativeCudaBackend"),
    "cudnn:cuda": ("kvmicro.backends.cudnn_backend", "CudnnBackend"),
    "flashinfer:cuda": ("kvmicro.backends.flashinfer_backend", "FlashInferBackend"),
    "torch:cuda": ("kvmicro.backends.torch_backend", "TorchCudaBackend"),
    "native:metal": ("kvmicro.backends.native_metal", "NativeMetalBackend"),
    "mlx:gpu": ("kvmicro.backends.mlx_backend", "MlxGpuBackend"),
    "torch:mps": ("kvmicro.backends.torch_backend", "TorchMpsBackend"),
    "native:cpu": ("kvmicro.backends.native", "NativeCpuBackend"),
    "torch:cpu": ("kvmicro.backends.torch_backend", "TorchCpuBackend"),
    "mlx:cpu": ("kvmicro.backends.mlx_backend", "MlxCpuBackend"),
}

BACKEND_NAMES: tuple[str, ...] = tuple(_FACTORIES)
#: device kinds `auto` prefers, best first; within one, native kernels then frameworks
_AUTO_DEVICES = ("cuda", "metal", "gpu", "mps", "cpu")


def split_name(name: str) -> tuple[str, int | None]:
    """``"native:cuda:1"`` -> (``"native:cuda"``, 1); ``"torch:cpu"`` -> (``"torch:cpu"``, None).
    Options in a spec (``native:cuda[splits=8]``) are ignored here."""
    parts = parse_backend_spec(name)[0].split(":")
    index: int | None = None
    if len(parts) == 3:
        if not parts[2].isdigit():
            raise InvalidCase(f"backend {name!r}: device index {parts[2]!r} is not a number")
        index = int(parts[2])
        parts = parts[:2]
    base = ":".join(parts)
    if base not in _FACTORIES:
        raise InvalidCase(f"unknown backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}"
                          " (optionally with a device index, e.g. native:cuda:1)")
    return base, index


def backend_class(name: str) -> type[Backend]:
    """The Backend class of a name or spec (imports its module)."""
    base, _ = split_name(parse_backend_spec(name)[0])
    module_name, class_name = _FACTORIES[base]
    return getattr(importlib.import_module(module_name), class_name)  # type: ignore[no-any-return]


def parse_spec(spec: str, options: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None
               ) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``"native:cuda[kernel=mma,splits=8]"`` -> (``"native:cuda"``, canonical options): the plain
    name (with its device index, if any) and the options validated against the backend's
    ``OPTIONS``, sorted by key, values canonical, defaults dropped. ``options`` given beside the
    spec are merged in (a key in both must agree). An unknown backend, option key or value
    raises InvalidCase naming it and listing the valid ones."""
    name, written = parse_backend_spec(spec)
    split_name(name)
    merged = dict(written)
    for key, value in (options.items() if isinstance(options, Mapping) else options or ()):
        if key in merged and str(merged[key]) != str(value):
            raise InvalidCase(f"backend {spec!r}: option {key} is {merged[key]} in the spec and "
                              f"{value} beside it")
        merged[key] = value
    return name, backend_class(name).canonical_options(merged)


def format_spec(name: str, options: Any = ()) -> str:
    """The spec string of a name and options: the inverse of :func:`parse_spec`."""
    return format_backend_spec(name, options)


def canonical_spec(spec: str) -> str:
    """A spec written canonically (``native:cuda[splits=8,kernel=mma]`` ->
    ``native:cuda[kernel=mma,splits=8]``; ``[priority=normal]`` dropped)."""
    return format_spec(*parse_spec(spec))


def with_priority(spec: str, priority: str) -> str:
    """``spec`` (canonical) with its ``priority`` option set to ``priority`` where the backend has
    one and the spec does not already choose one (`--priority` fills every case this way; a spec's
    own ``[priority=...]`` is more specific and wins). A backend without the option is returned
    unchanged."""
    if priority not in PRIORITIES:
        raise InvalidCase(f"unknown priority {priority!r}; expected one of {', '.join(PRIORITIES)}")
    name, options = parse_spec(spec)
    written = dict(parse_backend_spec(spec)[1])
    if "priority" not in backend_class(name).OPTIONS or "priority" in written:
        return format_spec(name, options)
    return format_spec(*parse_spec(name, {**dict(options), "priority": priority}))


def split_specs(text: str) -> list[str]:
    """A comma-separated list of specs, commas inside ``[...]`` kept: ``"native:cuda[kernel=mma,
    splits=8],torch:cpu"`` -> two specs."""
    out: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise InvalidCase(f"backend list {text!r}: ']' without '['")
        elif ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    if depth:
        raise InvalidCase(f"backend list {text!r}: '[' without ']'")
    out.append(text[start:])
    return [item.strip() for item in out if item.strip()]


_priority = "normal"


def set_priority(priority: str) -> None:
    """Deprecated: the process-wide submission priority (the old `--priority`). Cases now carry
    their own ``priority`` option (:func:`with_priority`); this remains for backends that still
    read ``Backend.priority`` and is read through ``Backend.submission_priority(case)``."""
    global _priority
    if priority not in PRIORITIES:
        raise InvalidCase(f"unknown priority {priority!r}; expected one of {', '.join(PRIORITIES)}")
    if priority != _priority:
        _priority = priority
        _get_backend.cache_clear()


def get_priority() -> str:
    """Deprecated: the process-wide priority of :func:`set_priority`; read a case's ``priority``
    option instead (``backend.parse_options(case.options)["priority"]``)."""
    warnings.warn("registry.get_priority() is deprecated: the priority is the per-case "
                  "'priority' option (Backend.parse_options(case.options))", DeprecationWarning,
                  stacklevel=2)
    return _priority


def get_backend(name: str) -> Backend:
    """The backend object for a name or spec (whether or not it is available here); options in a
    spec are validated here but belong to the case (``Case.options``), not to the object."""
    plain, options = parse_backend_spec(name)
    if options:
        parse_spec(name)
    return _get_backend(plain)


@cache
def _get_backend(name: str) -> Backend:
    base, index = split_name(name)
    cls = backend_class(base)
    backend = cls() if index is None else cls(index=index)
    backend.priority = _priority
    return backend


# callers that cleared the old cached get_backend keep working
get_backend.cache_clear = _get_backend.cache_clear  # type: ignore[attr-defined]


def available_backends() -> list[str]:
    """Names of the backends that can run here, in order of preference."""
    return [name for name in BACKEND_NAMES if _is_available(name)]


def _is_available(name: str) -> bool:
    try:
        return bool(get_backend(name).availability())
    except ImportError:
        return False


def auto_backends() -> list[str]:
    """`--backend auto`: every available backend on the best device kind found here."""
    available = available_backends()
    for kind in _AUTO_DEVICES:
        on_kind = [n for n in available if n.split(":")[1] == kind]
        if on_kind:
            return on_kind
    return available


def resolve(spec: str | list[str]) -> list[str]:
    """Expand a comma-separated backend list (``auto``, ``all``, names or specs with options)
    into names and canonical specs (``native:cuda[kernel=mma]``)."""
    names = split_specs(spec) if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name == "auto":
            expanded = auto_backends()
        elif name == "all":
            expanded = available_backends()
        else:
            expanded = [canonical_spec(name)]
        out.extend(n for n in expanded if n not in out)
    return out
