"""Fixed-point contribution vectors, summed mod 2**64 (fixedpoint.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fi_peer.protocol import fixedpoint as fp

S = 1 << fp.FRAC_BITS
M64 = 1 << 64

values = st.floats(-fp.MAX_ABS_VALUE, fp.MAX_ABS_VALUE, allow_nan=False, allow_infinity=False)
vectors = st.lists(values, min_size=1, max_size=16)
# |v| < 2**29: v * 2**24 < 2**53, so the decoded float is exact
exact_values = st.floats(-(2.0**29), 2.0**29, allow_nan=False, allow_infinity=False)


def test_known_encodings() -> None:
    words = fp.encode([0.0, 1.0, -1.0, 0.5, -0.5, 2.0**-24, -(2.0**-24), fp.MAX_ABS_VALUE,
                       -fp.MAX_ABS_VALUE])
    assert words.dtype == np.uint64
    assert [int(w) for w in words] == [
        0, S, M64 - S, S // 2, M64 - S // 2, 1, M64 - 1, 1 << 56, M64 - (1 << 56)
    ]


def test_rounding_is_to_nearest_even() -> None:
    half_ulp = 2.0**-25
    assert [int(w) for w in fp.encode([half_ulp, 3 * half_ulp, -half_ulp, 0.4 * 2.0**-24])] == [
        0, 2, 0, 0
    ]


def test_wire_bytes_are_little_endian_uint64() -> None:
    data = fp.to_bytes(fp.encode([1.0, -1.0]))
    assert data == S.to_bytes(8, "little") + (M64 - S).to_bytes(8, "little")
    assert [int(w) for w in fp.from_bytes(data)] == [S, M64 - S]
    assert fp.from_bytes(b"").shape == (0,)


@pytest.mark.parametrize("n", [1, 7, 9, 15])
def test_from_bytes_needs_whole_words(n: int) -> None:
    with pytest.raises(ValueError):
        fp.from_bytes(b"\x00" * n)


@pytest.mark.parametrize(
    "bad",
    [[float("nan")], [1.0, float("inf")], [-float("inf")], [fp.MAX_ABS_VALUE * 1.0000001],
     [-(2.0**33)], [[1.0, 2.0]], 3.0],
    ids=["nan", "inf", "-inf", "just over", "-2**33", "2-d", "scalar"],
)
def test_encode_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        fp.encode(bad)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(vectors)
def test_roundtrip_through_bytes(vec: list[float]) -> None:
    words = fp.encode(vec)
    back = fp.from_bytes(fp.to_bytes(words))
    assert np.array_equal(back, words)
    decoded = fp.decode(back)
    arr = np.asarray(vec)
    # rounding to 2**-24, plus float64's own rounding of a 57-bit integer
    assert np.all(np.abs(decoded - arr) <= 2.0**-25 + np.abs(arr) * 2.0**-52)


@settings(max_examples=200, deadline=None)
@given(st.lists(exact_values, min_size=1, max_size=16))
def test_decode_is_exact_for_moderate_values(vec: list[float]) -> None:
    arr = np.asarray(vec)
    assert np.array_equal(fp.decode(fp.encode(arr)), np.rint(arr * S) / S)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(-(2**40), 2**40), min_size=4, max_size=4),
                min_size=1, max_size=64))
def test_sum_mod_2_64_is_exact(rows: list[list[int]]) -> None:
    """Sums of up to 64 contributions, negative ones included, decode exactly."""
    floats = [np.asarray(r, dtype=np.float64) / S for r in rows]  # exactly representable
    total = np.zeros(4, dtype=np.uint64)
    for f in floats:
        total = fp.add(total, fp.encode(f))
    expected = np.sum(np.asarray(rows, dtype=object), axis=0)
    assert [int(v) for v in total.view(np.int64)] == list(expected)
    assert np.array_equal(fp.decode(total), np.asarray([float(e) / S for e in expected]))


def test_extreme_sums_stay_in_range() -> None:
    top = np.full(3, fp.MAX_ABS_VALUE)
    total = np.zeros(3, dtype=np.uint64)
    for _ in range(64):
        total = fp.add(total, fp.encode(-top))
    assert np.array_equal(fp.decode(total), -64 * top)
    for _ in range(128):
        total = fp.add(total, fp.encode(top))
    assert np.array_equal(fp.decode(total), 64 * top)


@settings(max_examples=100, deadline=None)
@given(vectors, st.integers(0, 2**32 - 1))
def test_masks_cancel(vec: list[float], seed: int) -> None:
    """Adding a uniform uint64 mask and then its negation gives the word back exactly."""
    words = fp.encode(vec)
    mask = np.random.default_rng(seed).integers(0, M64, size=len(vec), dtype=np.uint64,
                                                endpoint=False)
    neg = (np.uint64(0) - mask).astype(np.uint64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # wrapping must not warn
        masked = fp.add(words, mask)
        assert np.array_equal(fp.add(masked, neg), words)


def test_add_wraps_without_warning() -> None:
    a = np.array([M64 - 1, M64 - S], dtype=np.uint64)
    b = np.array([1, 2 * S], dtype=np.uint64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fp.add(a, b)
    assert out.dtype == np.uint64
    assert [int(v) for v in out] == [0, S]
    assert np.array_equal(fp.decode(out), [0.0, 1.0])
