"""Element types and their numpy carriers.

numpy has no bfloat16, so kvmicro carries bfloat16 data as **float32 arrays whose values are already
rounded to bfloat16** (round to nearest, ties to even). Every bfloat16 value is a float32, so
the carrier loses nothing, the oracle reads it as it reads float32, and a backend converts it to its
own bfloat16 exactly (the top 16 bits of the float32 pattern). float16 is carried as numpy float16,
float32 as float32.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidCase

DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32")

#: bytes one element occupies on a device (not in the carrier)
ITEMSIZE: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4}

_CARRIER = {"float16": np.float16, "bfloat16": np.float32, "float32": np.float32}


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise InvalidCase(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return dtype


def carrier(dtype: str) -> type:
    """The numpy type that carries values of ``dtype``."""
    return _CARRIER[check_dtype(dtype)]


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """Round float values to the nearest bfloat16 (ties to even); returns float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounding = 0x7FFF + ((bits >> 16) & 1)
    rounded = ((bits + rounding) >> 16) << 16
    nan = np.isnan(x)
    out = rounded.astype(np.uint32).view(np.float32).reshape(np.shape(x))
    if nan.any():
        out = np.where(nan, np.float32(np.nan), out)
    return out


def to_carrier(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round ``x`` to ``dtype`` and return it in the carrier type."""
    check_dtype(dtype)
    if dtype == "bfloat16":
        return round_to_bfloat16(np.asarray(x, dtype=np.float32))
    return np.asarray(x).astype(_CARRIER[dtype])


def to_bits16(x: np.ndarray, dtype: str) -> np.ndarray:
    """The 16-bit patterns of a float16 or bfloat16 carrier array (uint16, C-contiguous)."""
    x = np.ascontiguousarray(x)
    if dtype == "float16":
        return x.astype(np.float16).view(np.uint16)
    if dtype == "bfloat16":
        return (round_to_bfloat16(x).view(np.uint32) >> 16).astype(np.uint16)
    raise InvalidCase(f"dtype {dtype!r} has no 16-bit pattern")


def from_bits16(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Inverse of :func:`to_bits16`: 16-bit patterns back to the carrier type."""
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    if dtype == "float16":
        return bits.view(np.float16)
    if dtype == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    raise InvalidCase(f"dtype {dtype!r} has no 16-bit pattern")
