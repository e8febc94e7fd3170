"""Fixed-point encoding of contribution vectors into 64-bit words.

A real value v becomes round(v * 2**FRAC_BITS) as a two's-complement int64,
carried on the wire as little-endian uint64. Sums are taken mod 2**64 (numpy
uint64 arithmetic wraps), which is what masking in secure aggregation needs.
The decoded sum is exact as long as the true sum stays inside
+/- 2**(63 - FRAC_BITS) = +/- 2**39 ~ 5.5e11: members' values are bounded by
MAX_ABS_VALUE and at most 64 members contribute, far inside that range.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FRAC_BITS = 24
SCALE = float(1 << FRAC_BITS)
MAX_ABS_VALUE = float(1 << 32)

Words = npt.NDArray[np.uint64]


def encode(values: npt.ArrayLike) -> Words:
    """Floats -> uint64 words; ValueError for non-finite or out-of-range values."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError("a contribution is a 1-d vector")
    if not np.all(np.isfinite(arr)):
        raise ValueError("contribution has NaN or infinite values")
    if np.any(np.abs(arr) > MAX_ABS_VALUE):
        raise ValueError(f"contribution values must be within +/-{MAX_ABS_VALUE:g}")
    return np.rint(arr * SCALE).astype(np.int64).view(np.uint64)


def decode(words: Words) -> npt.NDArray[np.float64]:
    """uint64 words (a value or a mod-2**64 sum) -> floats."""
    return np.asarray(words, dtype=np.uint64).view(np.int64).astype(np.float64) / SCALE


def to_bytes(words: Words) -> bytes:
    return np.asarray(words, dtype="<u8").tobytes()


def from_bytes(data: bytes) -> Words:
    if len(data) % 8:
        raise ValueError("not whole 64-bit words")
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


def add(a: Words, b: Words) -> Words:
    """Sum mod 2**64."""
    return np.add(a, b, dtype=np.uint64)
