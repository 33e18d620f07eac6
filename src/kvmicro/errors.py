"""The two exceptions every layer of kvmicro raises.

``InvalidCase`` is bad input (a shape, layout, block id or dtype that cannot be right anywhere);
``Unsupported`` is a valid request that one backend, device or build cannot serve. The sweep records
an ``Unsupported`` as a skipped case and an ``InvalidCase`` as an error, never as a crash.
"""

from __future__ import annotations


class KvmicroError(Exception):
    """Base class of kvmicro's own exceptions."""


class InvalidCase(KvmicroError, ValueError):
    """A case, array or argument is malformed; the message names the bad value."""


class Unsupported(KvmicroError):
    """A valid request that this backend, device or build cannot serve; the message says why."""
