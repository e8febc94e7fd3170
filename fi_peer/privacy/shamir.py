"""Shamir secret sharing over a prime field (Shamir, CACM 1979).

A secret ``s`` becomes the constant term of a random polynomial ``f`` of
degree ``t - 1`` over GF(p); share ``i`` is the point ``(x_i, f(x_i))``. Any
``t`` points give ``s = f(0)`` by Lagrange interpolation; any ``t - 1`` points
are uniformly distributed whatever ``s`` is (for a fixed ``s`` the map from
the ``t - 1`` random coefficients to the ``t - 1`` share values is a bijection,
a Vandermonde system), so they say nothing about it.

Field: ``p = 2**521 - 1`` by default, the Mersenne prime of NIST P-521's base
field. It is larger than every 32-byte secret secure aggregation shares (a
self-mask seed, an X25519 secret key), so a secret is ONE field element and
there is no splitting into limbs; a share is 66 bytes. The functions take
``prime`` so tests can run the same code exhaustively over a tiny field.

Randomness is a parameter (``random_bytes(n) -> n bytes``; the default is
libsodium's CSPRNG), so tests are deterministic. Field elements are drawn by
rejection sampling, uniform for any prime. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import nacl.utils

__all__ = [
    "PRIME",
    "SECRET_LEN",
    "SHARE_LEN",
    "RandomBytes",
    "combine",
    "element_from_bytes",
    "element_to_bytes",
    "lagrange_at_zero",
    "random_element",
    "split",
]

RandomBytes = Callable[[int], bytes]

PRIME = (1 << 521) - 1
SHARE_LEN = (PRIME.bit_length() + 7) // 8  # 66 bytes, big-endian
SECRET_LEN = 32


def random_element(prime: int, random_bytes: RandomBytes = nacl.utils.random) -> int:
    """A uniform element of GF(prime), by rejection sampling on ``bit_length`` bits."""
    bits = prime.bit_length()
    n_bytes = (bits + 7) // 8
    mask = (1 << bits) - 1
    while True:
        value = int.from_bytes(random_bytes(n_bytes), "big") & mask
        if value < prime:
            return value


def split(
    secret: int,
    xs: Sequence[int],
    threshold: int,
    random_bytes: RandomBytes = nacl.utils.random,
    *,
    prime: int = PRIME,
) -> list[int]:
    """Share values ``f(x)`` for each ``x`` in ``xs`` of a random degree ``threshold - 1``
    polynomial with ``f(0) = secret``."""
    if not 0 <= secret < prime:
        raise ValueError("secret must be a field element")
    if not 1 <= threshold <= len(xs):
        raise ValueError("threshold must be between 1 and the number of shares")
    if len(set(xs)) != len(xs) or any(not 0 < x < prime for x in xs):
        raise ValueError("share x-coordinates must be distinct non-zero field elements")
    coefficients = [secret, *_random_elements(threshold - 1, prime, random_bytes)]
    top = coefficients[::-1]
    shares = []
    for x in xs:
        acc = 0
        if x < 1 << 16:
            # Horner with one reduction at the end: small x (committee indices) grow
            # acc by at most 16 bits per step, cheaper than a reduction per step.
            for c in top:
                acc = acc * x + c
            shares.append(acc % prime)
            continue
        for c in top:  # Horner
            acc = (acc * x + c) % prime
        shares.append(acc)
    return shares


def _random_elements(n: int, prime: int, random_bytes: RandomBytes) -> list[int]:
    """``n`` uniform elements of GF(prime) from one call to ``random_bytes``
    (rejection sampling per element, as :func:`random_element`)."""
    if n <= 0:
        return []
    bits = prime.bit_length()
    n_bytes = (bits + 7) // 8
    mask = (1 << bits) - 1
    pool = random_bytes(n * n_bytes)
    out = []
    for i in range(n):
        value = int.from_bytes(pool[i * n_bytes : (i + 1) * n_bytes], "big") & mask
        out.append(value if value < prime else random_element(prime, random_bytes))
    return out


def lagrange_at_zero(xs: Sequence[int], *, prime: int = PRIME) -> list[int]:
    """Weights ``w_i`` with ``f(0) = sum w_i f(x_i)`` for any polynomial of degree < len(xs).

    One modular inversion for all weights (the products are inverted together).
    """
    if len(set(xs)) != len(xs) or any(not 0 < x < prime for x in xs):
        raise ValueError("x-coordinates must be distinct non-zero field elements")
    numerators, denominators = [], []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % prime
                den = den * (xj - xi) % prime
        numerators.append(num)
        denominators.append(den)
    total = 1
    for den in denominators:
        total = total * den % prime
    inverse_total = pow(total, -1, prime)
    weights = []
    for i, num in enumerate(numerators):
        others = 1
        for j, den in enumerate(denominators):
            if i != j:
                others = others * den % prime
        weights.append(num * others % prime * inverse_total % prime)
    return weights


def combine(
    points: Sequence[tuple[int, int]],
    *,
    prime: int = PRIME,
    weights: Sequence[int] | None = None,
) -> int:
    """The secret from ``(x, f(x))`` points (at least ``threshold`` of them).

    ``weights`` may be passed when many secrets share the same x-coordinates
    (see :func:`lagrange_at_zero`): then combining is ``len(points)`` products.
    """
    if weights is None:
        weights = lagrange_at_zero([x for x, _ in points], prime=prime)
    if len(weights) != len(points):
        raise ValueError("one weight per point")
    acc = 0
    for (_, y), w in zip(points, weights, strict=True):
        if not 0 <= y < prime:
            raise ValueError("share value is not a field element")
        acc = (acc + y * w) % prime
    return acc


def element_to_bytes(value: int, *, prime: int = PRIME) -> bytes:
    if not 0 <= value < prime:
        raise ValueError("not a field element")
    return value.to_bytes((prime.bit_length() + 7) // 8, "big")


def element_from_bytes(data: bytes, *, prime: int = PRIME) -> int:
    """Strict: exactly the field's byte length and a value below the prime."""
    if len(data) != (prime.bit_length() + 7) // 8:
        raise ValueError("a share is exactly the field's byte length")
    value = int.from_bytes(data, "big")
    if value >= prime:
        raise ValueError("share value is not a field element")
    return value
