"""Backend names -> backend objects, imported lazily: ``import kvmicro`` imports no framework.

A name is ``family:device`` with an optional device index (``native:cuda:1``, ``torch:cuda:0``).
"""

from __future__ import annotations

import importlib
from functools import cache

from ..errors import InvalidCase
from .base import PRIORITIES, Backend

# family:device -> (module, class). The order is the order of preference for `--backend auto`.
_FACTORIES: dict[str, tuple[str, str]] = {
    "native:cuda": ("kvmicro.backends.native", "NativeCudaBackend"),
    "cudnn:cuda": ("kvmicro.backends.cudnn_backend", "CudnnBackend"),
    "flashinfer:cuda": ("kvmicro.backends.flashinfer_backend", "FlashInferBackend"),
    "torch:cuda": ("kvmicro.backends.torch_backend", "TorchCudaBackend"),
    "native:metal": ("kvmicro.backends.native", "NativeMetalBackend"),
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
    """``"native:cuda:1"`` -> (``"native:cuda"``, 1); ``"torch:cpu"`` -> (``"torch:cpu"``, None)."""
    parts = name.strip().split(":")
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


_priority = "normal"


def set_priority(priority: str) -> None:
    """Submission priority for every backend this process creates from now on (`--priority`)."""
    global _priority
    if priority not in PRIORITIES:
        raise InvalidCase(f"unknown priority {priority!r}; expected one of {', '.join(PRIORITIES)}")
    if priority != _priority:
        _priority = priority
        get_backend.cache_clear()


def get_priority() -> str:
    return _priority


@cache
def get_backend(name: str) -> Backend:
    """The backend object for ``name`` (whether or not it is available here), with the process's
    submission priority."""
    base, index = split_name(name)
    module_name, class_name = _FACTORIES[base]
    cls = getattr(importlib.import_module(module_name), class_name)
    backend = cls() if index is None else cls(index=index)
    backend.priority = _priority
    return backend


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
    """Expand a comma-separated backend list (``auto``, ``all`` or names) into names."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
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
            split_name(name)
            expanded = [name]
        out.extend(n for n in expanded if n not in out)
    return out
