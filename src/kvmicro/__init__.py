"""kvmicro: op-by-op measurements of what a paged KV cache costs during LLM decode.

    import kvmicro as kv
    case = kv.Case(op="paged_sdpa", backend="native:cpu", ctx=[37, 300], batch=2, ...)
    arrays = kv.materialize(case)
    out = kv.execute(case, arrays)
    ref = kv.oracle.run(case, arrays)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import oracle
from .backends.base import run_once
from .backends.registry import BACKEND_NAMES, available_backends, get_backend
from .errors import InvalidCase, KvmicroError, Unsupported
from .workload import ALL_LAYOUTS, OPS, PLACEMENTS, PRESET_LAYOUTS, Case, Layout, materialize

__version__ = "0.1.0"


def execute(case: Case, arrays: dict[str, np.ndarray] | None = None) -> Any:
    """Run ``case`` once on its backend and return the result as numpy (oracle conventions)."""
    if arrays is None:
        arrays = materialize(case)
    backend = get_backend(case.backend)
    availability = backend.availability()
    if not availability:
        raise Unsupported(f"backend {case.backend} is not available here: {availability.reason}")
    backend.supports(case)
    return run_once(backend.prepare(case, arrays))


__all__ = [
    "ALL_LAYOUTS",
    "BACKEND_NAMES",
    "OPS",
    "PLACEMENTS",
    "PRESET_LAYOUTS",
    "Case",
    "InvalidCase",
    "KvmicroError",
    "Layout",
    "Unsupported",
    "__version__",
    "available_backends",
    "execute",
    "get_backend",
    "materialize",
    "oracle",
]
