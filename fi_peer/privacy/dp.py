"""Distributed Gaussian noise, its calibration, and RDP accounting.

Theory of operation
-------------------
The querier learns one thing per input: the SUM over the committee of the
members' vectors (secure aggregation), plus Gaussian noise. Seen from one
owner, that is the Gaussian mechanism applied to its own vector ``v(D)``,
whose L2 sensitivity ``Δ = max ||v(D) - v(D')||`` over neighbouring training
sets ``D ~ D'`` each aggregation rule states (fi_peer.models.aggregation).
Releasing ``sum + N(0, σ² I)`` with noise multiplier ``z = σ / Δ`` is
``(α, α / 2z²)``-RDP at every order α; this module never writes that formula
itself: every RDP value and every conversion to (ε, δ) comes from
``dp-accounting``'s :class:`RdpAccountant` (Gaussian event, q = 1).

Distributed noise: nobody may add the whole noise, or it would know it. Each
member adds ``N(0, σ²/t)`` (:func:`add_member_noise`) to its clipped vector
before masking; the sum over ``s >= t`` survivors carries ``N(0, s σ²/t)``,
variance at least σ². The guarantee for one owner holds as long as at least
``t`` of the survivors whose noise is in the sum are not colluding with the
querier (a colluder can subtract its own noise): DESIGN.md's "fewer than
n - t" colluders.

Units: ``calibrate_sigma`` and ``rdp_cost`` are for ONE released vector (one
input). A batch of ``n`` inputs answered together is one release of the
concatenated vectors, whose sensitivity is ``Δ √n``; pass that (RDP adds:
``rdp_cost(σ, Δ√n) = n · rdp_cost(σ, Δ)``).

``ORDERS`` is fixed for the life of the budget ledger, which stores RDP
vectors over it (see :data:`ORDERS`). "No DP" is spelled ``ε = 0`` or
``ε = inf`` in a :class:`PrivacySpec`: no noise, and an RDP cost of ``inf``
(only an owner whose limits are infinite can afford it).

Clipping helpers (``to_simplex``, ``clip_l2``, ``clip_coordinates``) are what
the rules under noise use to keep a member's vector inside the set whose
diameter is the rule's sensitivity; each states its bound.

Pure numpy + dp-accounting; no I/O, no clock, no global RNG (the generator
is passed in). ``dp_accounting`` is imported on first use: importing it costs
~0.7 s (it loads scipy), and the aggregation rules import this module for the
clipping helpers only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "ORDERS",
    "PrivacySpec",
    "add_member_noise",
    "calibrate_sigma",
    "check_rdp",
    "clip_coordinates",
    "clip_l2",
    "epsilon_spent",
    "member_noise_std",
    "noise_multiplier",
    "rdp_cost",
    "to_simplex",
]

Array = npt.NDArray[np.float64]

ORDERS: tuple[float, ...] = (
    1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0,
    12.0, 14.0, 16.0, 20.0, 24.0, 28.0, 32.0, 40.0, 48.0, 64.0, 80.0, 96.0, 128.0, 192.0, 256.0,
)  # fmt: skip
"""The RDP orders α used everywhere (calibration, costs, the ledger).

Why these: the best order for a Gaussian release is about
``1 + z √(2 ln(1/δ))``; at δ = 1e-5 that is ~3 for a single query at ε = 8 and
~130 at ε = 0.1, and a composition of many queries moves it towards 1. The
grid spans 1.25 to 256, spaced ~10-25 % apart, so the (ε, δ) conversion loses
at most 0.6 % against dp-accounting's default 156 orders for any total ε
below 50 (measured for z in [0.3, 32] and 1 to 10,000 compositions), while a
ledger row stays 31 floats. Changing it orphans every stored RDP vector, so
the ledger records it and refuses a file written with other orders.
"""


def _check_finite_nonneg(value: float, what: str) -> float:
    v = float(value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return v


@dataclass(frozen=True, slots=True)
class PrivacySpec:
    """The (ε, δ) an owner spends on ONE query. ``ε = 0`` or ``inf``: no DP.

    With DP on, ``0 < δ < 1`` is required; with DP off δ is ignored (any
    value in [0, 1)).
    """

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if isinstance(self.epsilon, bool) or isinstance(self.delta, bool):
            raise ValueError("epsilon and delta must be numbers")
        eps, delta = float(self.epsilon), float(self.delta)
        if math.isnan(eps) or eps < 0:
            raise ValueError(f"epsilon must be >= 0 (0 or inf: no DP), got {self.epsilon!r}")
        if math.isnan(delta) or not 0 <= delta < 1:
            raise ValueError(f"delta must lie in [0, 1), got {self.delta!r}")
        if self.enabled and delta == 0:
            raise ValueError("the Gaussian mechanism needs delta > 0")

    @property
    def enabled(self) -> bool:
        """False for the "no DP" spellings ε = 0 and ε = inf."""
        return 0 < self.epsilon < math.inf

    def sigma(self, sensitivity: float) -> float:
        """:func:`calibrate_sigma` for this spec (0.0 when DP is off)."""
        return calibrate_sigma(self.epsilon, self.delta, sensitivity)


@functools.cache
def _dp() -> Any:
    import dp_accounting  # type: ignore[import-untyped]

    return dp_accounting


def _accountant() -> Any:
    return _dp().rdp.RdpAccountant(orders=list(ORDERS))


def _epsilon_of_multiplier(z: float, delta: float) -> float:
    acc = _accountant()
    acc.compose(_dp().GaussianDpEvent(z))
    return float(acc.get_epsilon(delta))


_Z_LOW, _Z_HIGH = 1e-4, 1e6
_REL_TOL = 1e-9


@functools.lru_cache(maxsize=512)
def noise_multiplier(epsilon: float, delta: float) -> float:
    """Smallest z = σ/Δ (to a relative 1e-9) whose single Gaussian release is
    (ε, δ)-DP under the RDP accountant over :data:`ORDERS`; never below it.

    Binary search in log space on dp-accounting's own ε(z), which is
    non-increasing in z; the upper end is kept, so ``ε(z) <= epsilon`` always.
    """
    if not (0 < epsilon < math.inf) or not (0 < delta < 1):
        raise ValueError(f"need 0 < epsilon < inf and 0 < delta < 1, got {epsilon}, {delta}")
    lo, hi = _Z_LOW, _Z_HIGH
    if _epsilon_of_multiplier(hi, delta) > epsilon:
        raise ValueError(f"epsilon {epsilon} is below what these RDP orders can reach")
    if _epsilon_of_multiplier(lo, delta) <= epsilon:
        return lo
    while hi / lo - 1 > _REL_TOL:
        mid = math.sqrt(lo * hi)
        if _epsilon_of_multiplier(mid, delta) <= epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def calibrate_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Noise std σ of ONE Gaussian release of the sum (L2 sensitivity ``sensitivity``)
    that is (ε, δ)-DP: ``noise_multiplier(ε, δ) * sensitivity`` (cached).

    ``epsilon`` 0 or inf ("no DP") or ``sensitivity`` 0 give 0.0.
    """
    sens = _check_finite_nonneg(sensitivity, "sensitivity")
    spec = PrivacySpec(float(epsilon), float(delta))
    if not spec.enabled or sens == 0:
        return 0.0
    return noise_multiplier(spec.epsilon, spec.delta) * sens


def rdp_cost(sigma: float, sensitivity: float) -> tuple[float, ...]:
    """RDP (one value per order of :data:`ORDERS`) of one release of a sum with
    this L2 sensitivity and Gaussian noise std ``sigma``.

    ``sensitivity`` 0: all zeros (nothing about the data is released);
    ``sigma`` 0 with positive sensitivity: all ``inf`` (no privacy).
    """
    sig = _check_finite_nonneg(sigma, "sigma")
    sens = _check_finite_nonneg(sensitivity, "sensitivity")
    if sens == 0:
        return tuple(0.0 for _ in ORDERS)
    if sig == 0:
        return tuple(math.inf for _ in ORDERS)
    acc = _accountant()
    acc.compose(_dp().GaussianDpEvent(sig / sens))
    return tuple(float(r) for r in acc.rdp)


def check_rdp(rdp: Sequence[float]) -> tuple[float, ...]:
    """``rdp`` as a validated tuple over :data:`ORDERS` (>= 0, inf allowed, no NaN)."""
    values = tuple(float(r) for r in rdp)
    if len(values) != len(ORDERS):
        raise ValueError(f"an RDP vector has {len(ORDERS)} values (ORDERS), got {len(values)}")
    if any(math.isnan(r) or r < 0 for r in values):
        raise ValueError("RDP values must be >= 0 (inf allowed), never NaN")
    return values


def epsilon_spent(rdp: Sequence[float], delta: float) -> float:
    """ε at ``delta`` of an accumulated RDP vector over :data:`ORDERS` (dp-accounting's
    conversion); 0.0 for a zero vector, inf if every order is inf."""
    values = check_rdp(rdp)
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
    if all(r == 0 for r in values):
        return 0.0
    if all(math.isinf(r) for r in values):
        return math.inf
    eps, _order = _dp().rdp.compute_epsilon(list(ORDERS), values, delta)
    return float(eps)


def member_noise_std(sigma: float, threshold: int) -> float:
    """Std of ONE member's noise share: σ/√t, so any t shares sum to variance σ²."""
    sig = _check_finite_nonneg(sigma, "sigma")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"threshold must be an int >= 1, got {threshold!r}")
    return sig / math.sqrt(threshold)


def add_member_noise(
    vector: npt.ArrayLike, sigma: float, threshold: int, rng: np.random.Generator
) -> Array:
    """``vector`` + N(0, σ²/t) per coordinate, drawn from ``rng`` (a new float64 array)."""
    std = member_noise_std(sigma, threshold)
    arr = np.asarray(vector, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("vector contains NaN or infinity")
    if std == 0:
        return arr.copy()
    noisy: Array = arr + rng.normal(0.0, std, size=arr.shape)
    return noisy


# --- clipping ------------------------------------------------------------------
# A projection onto a convex set is 1-Lipschitz: clipping never INCREASES a
# sensitivity that holds before it. What clipping adds is a bound that holds
# whatever the input: the diameter of the set it maps into (an owner-level
# bound, true for ANY two training sets of the owner).


def _rows(values: npt.ArrayLike, what: str) -> Array:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim not in (1, 2):
        raise ValueError(f"{what} must be 1-D or 2-D, got shape {arr.shape}")
    if np.any(np.isnan(arr)):
        raise ValueError(f"{what} contains NaN")
    return arr


def to_simplex(probs: npt.ArrayLike) -> Array:
    """Each row mapped onto the probability simplex: negatives and +inf rows
    handled, then divided by the row sum (uniform where nothing positive is left).

    Sensitivity: any two points of the simplex are at most √2 apart in L2
    (two different one-hots), so a vector built from a simplex row alone has
    owner-level sensitivity √2, whatever produced it.
    """
    arr = _rows(probs, "probs")
    two_d = np.atleast_2d(arr)
    if two_d.shape[-1] < 1:
        raise ValueError("probs must have at least one column")
    inf_rows = np.isinf(two_d).any(axis=1, keepdims=True)
    # A row holding +inf: mass shared equally by its +inf entries.
    finite = np.where(inf_rows, np.where(np.isposinf(two_d), 1.0, 0.0), two_d)
    pos = np.clip(finite, 0.0, None)
    totals = pos.sum(axis=1, keepdims=True)
    uniform = np.full_like(pos, 1.0 / pos.shape[1])
    out: Array = np.where(totals > 0, pos / np.where(totals > 0, totals, 1.0), uniform)
    return out.reshape(arr.shape)


def clip_l2(vectors: npt.ArrayLike, bound: float) -> Array:
    """Each row scaled down (never up) to L2 norm <= ``bound``.

    Sensitivity: two clipped rows differ by at most ``2 * bound``, and by at
    most ``√2 * bound`` when both are non-negative (their inner product is
    >= 0). Rows with inf are mapped onto the ball along their inf directions.
    """
    b = _check_finite_nonneg(bound, "bound")
    arr = _rows(vectors, "vectors")
    two_d = np.atleast_2d(arr)
    inf_rows = np.isinf(two_d).any(axis=1, keepdims=True)
    direction = np.where(inf_rows, np.where(np.isinf(two_d), np.sign(two_d), 0.0), two_d)
    norms = np.linalg.norm(direction, axis=1, keepdims=True)
    # An infinite row is longer than any bound: it lands on the sphere.
    too_long = inf_rows | (norms > b)
    scale = np.where(too_long, b / np.where(norms > 0, norms, 1.0), 1.0)
    out: Array = direction * scale
    return out.reshape(arr.shape)


def clip_coordinates(vectors: npt.ArrayLike, low: float, high: float) -> Array:
    """Every coordinate clipped into [low, high].

    Sensitivity: a vector of length L inside [low, high]^L moves by at most
    ``(high - low) * √L``; a change confined to k coordinates (say one record's
    kernel in one class) by at most ``(high - low) * √k``.
    """
    lo, hi = float(low), float(high)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"need finite low <= high, got {low!r}, {high!r}")
    out: Array = np.clip(_rows(vectors, "vectors"), lo, hi)
    return out
