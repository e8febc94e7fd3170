"""Distributed Gaussian noise: calibration against dp-accounting, noise shares, clipping."""

from __future__ import annotations

import itertools
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from fi_peer.privacy.dp import (
    ORDERS,
    PrivacySpec,
    add_member_noise,
    calibrate_sigma,
    clip_coordinates,
    clip_l2,
    epsilon_spent,
    member_noise_std,
    noise_multiplier,
    rdp_cost,
    to_simplex,
)

DELTA = 1e-5
EPSILONS = (0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def accountant_epsilon(z: float, delta: float, orders: tuple[float, ...] | None = ORDERS) -> float:
    """dp-accounting's own ε of one Gaussian release with noise multiplier z."""
    acc = RdpAccountant(orders=None if orders is None else list(orders))
    acc.compose(dp_accounting.GaussianDpEvent(z))
    return float(acc.get_epsilon(delta))


# --- ORDERS and PrivacySpec ----------------------------------------------------


def test_orders_are_fixed_sorted_and_above_one() -> None:
    assert len(ORDERS) == 31
    assert list(ORDERS) == sorted(set(ORDERS))
    assert ORDERS[0] > 1 and ORDERS[-1] == 256


@pytest.mark.parametrize("epsilon", [0.0, math.inf])
def test_zero_or_infinite_epsilon_means_no_dp(epsilon: float) -> None:
    spec = PrivacySpec(epsilon, 0.0)
    assert not spec.enabled
    assert spec.sigma(1.0) == 0.0
    assert calibrate_sigma(epsilon, DELTA, 1.0) == 0.0


@pytest.mark.parametrize(
    ("epsilon", "delta"),
    [(-1.0, DELTA), (math.nan, DELTA), (1.0, 0.0), (1.0, 1.0), (1.0, -1e-5), (1.0, math.nan)],
)
def test_privacy_spec_rejects_invalid_values(epsilon: float, delta: float) -> None:
    with pytest.raises(ValueError):
        PrivacySpec(epsilon, delta)


def test_privacy_spec_is_frozen_and_enabled() -> None:
    spec = PrivacySpec(2.0, DELTA)
    assert spec.enabled
    with pytest.raises(AttributeError):
        spec.epsilon = 3.0  # type: ignore[misc]
    assert spec.sigma(math.sqrt(2)) == pytest.approx(calibrate_sigma(2.0, DELTA, math.sqrt(2)))


# --- calibration ---------------------------------------------------------------


@pytest.mark.parametrize("epsilon", EPSILONS)
def test_calibrated_sigma_meets_epsilon_tightly(epsilon: float) -> None:
    sigma = calibrate_sigma(epsilon, DELTA, 1.0)
    # Never above the target, and no more noise than needed (relative 1e-6).
    assert accountant_epsilon(sigma, DELTA) <= epsilon
    assert accountant_epsilon(sigma * (1 - 1e-6), DELTA) > epsilon
    # dp-accounting's default (finer) order grid agrees within 1 %.
    assert accountant_epsilon(sigma, DELTA, orders=None) == pytest.approx(epsilon, rel=0.01)
    # ... and so does its own calibration routine.
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: RdpAccountant(orders=list(ORDERS)),
        dp_accounting.GaussianDpEvent,
        epsilon,
        DELTA,
        dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-9,
    )
    assert sigma == pytest.approx(z, rel=1e-5)


def test_sigma_is_monotone_and_linear_in_sensitivity() -> None:
    sigmas = [calibrate_sigma(e, DELTA, 1.0) for e in EPSILONS]
    assert all(a > b for a, b in itertools.pairwise(sigmas))
    assert calibrate_sigma(2.0, 1e-7, 1.0) > calibrate_sigma(2.0, 1e-5, 1.0)
    assert calibrate_sigma(2.0, DELTA, 3.0) == pytest.approx(3 * calibrate_sigma(2.0, DELTA, 1.0))
    assert calibrate_sigma(2.0, DELTA, 0.0) == 0.0
    # Reference value at the headline setting (sensitivity 1).
    assert calibrate_sigma(2.0, DELTA, 1.0) == pytest.approx(2.1497, abs=1e-3)


def test_calibration_is_cached() -> None:
    noise_multiplier.cache_clear()
    calibrate_sigma(1.5, DELTA, 1.0)
    calibrate_sigma(1.5, DELTA, 2.0)
    info = noise_multiplier.cache_info()
    assert (info.misses, info.hits) == (1, 1)


@pytest.mark.parametrize("sensitivity", [-1.0, math.nan, math.inf])
def test_calibration_rejects_bad_sensitivity(sensitivity: float) -> None:
    with pytest.raises(ValueError):
        calibrate_sigma(1.0, DELTA, sensitivity)


# --- RDP costs -----------------------------------------------------------------


def test_rdp_cost_matches_the_accountant_and_composes() -> None:
    sigma, sens = 3.0, math.sqrt(2)
    cost = rdp_cost(sigma, sens)
    assert len(cost) == len(ORDERS)
    acc = RdpAccountant(orders=list(ORDERS))
    acc.compose(dp_accounting.GaussianDpEvent(sigma / sens), 5)
    np.testing.assert_allclose(5 * np.array(cost), acc.rdp, rtol=1e-12)
    five = tuple(5 * r for r in cost)
    assert epsilon_spent(five, DELTA) == pytest.approx(acc.get_epsilon(DELTA))
    # A batch of n inputs is one release with sensitivity Δ√n: n times the cost.
    np.testing.assert_allclose(rdp_cost(sigma, sens * math.sqrt(7)), 7 * np.array(cost))


@pytest.mark.parametrize("epsilon", EPSILONS)
def test_one_calibrated_release_costs_at_most_its_epsilon(epsilon: float) -> None:
    sigma = calibrate_sigma(epsilon, DELTA, 1.0)
    spent = epsilon_spent(rdp_cost(sigma, 1.0), DELTA)
    assert spent <= epsilon
    assert spent == pytest.approx(epsilon, rel=1e-6)


def test_rdp_cost_edge_cases() -> None:
    assert rdp_cost(2.0, 0.0) == (0.0,) * len(ORDERS)
    assert all(math.isinf(r) for r in rdp_cost(0.0, 1.0))
    assert epsilon_spent((0.0,) * len(ORDERS), DELTA) == 0.0
    assert epsilon_spent(rdp_cost(0.0, 1.0), DELTA) == math.inf
    with pytest.raises(ValueError):
        rdp_cost(-1.0, 1.0)
    with pytest.raises(ValueError, match="31 values"):
        epsilon_spent([0.1, 0.2], DELTA)
    with pytest.raises(ValueError, match=">= 0"):
        epsilon_spent([-0.1] * len(ORDERS), DELTA)
    with pytest.raises(ValueError, match="delta"):
        epsilon_spent(rdp_cost(1.0, 1.0), 0.0)


# --- distributed noise ---------------------------------------------------------


def test_member_noise_std() -> None:
    assert member_noise_std(3.0, 9) == pytest.approx(1.0)
    assert member_noise_std(0.0, 4) == 0.0
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            member_noise_std(1.0, bad)  # type: ignore[arg-type]


def test_sum_of_t_member_noises_has_variance_sigma_squared() -> None:
    sigma, t, n = 2.5, 7, 40_000
    rng = np.random.default_rng(12345)
    total = sum(add_member_noise(np.zeros(n), sigma, t, rng) for _ in range(t))
    # (n - 1) s² / σ² ~ chi-square(n - 1): two-sided 99.9 % acceptance region.
    statistic = (n - 1) * float(np.var(total, ddof=1)) / sigma**2
    low, high = stats.chi2.ppf([0.0005, 0.9995], n - 1)
    assert low < statistic < high
    assert abs(float(np.mean(total))) < 4 * sigma / math.sqrt(n)
    assert stats.kstest(total / sigma, "norm").pvalue > 1e-3
    # More survivors than t: more noise (s/t σ²), never less.
    extra = total + add_member_noise(np.zeros(n), sigma, t, rng)
    assert float(np.var(extra)) > float(np.var(total))


def test_member_noise_is_reproducible_and_keeps_the_input() -> None:
    vector = np.array([1.0, 2.0, 3.0])
    a = add_member_noise(vector, 1.0, 3, np.random.default_rng(7))
    b = add_member_noise(vector, 1.0, 3, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(vector, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(
        add_member_noise(vector, 0.0, 3, np.random.default_rng(0)), vector
    )
    with pytest.raises(ValueError, match="NaN"):
        add_member_noise([np.nan], 1.0, 1, np.random.default_rng(0))


# --- clipping ------------------------------------------------------------------

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
rows = hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 8)), elements=finite)


@settings(max_examples=80, deadline=None)
# Bounds below ~1e-150 would make np.linalg.norm square into subnormals and lose
# precision in the *check*; clipping bounds in use are O(1).
@given(vectors=rows, bound=st.just(0.0) | st.floats(1e-150, 100.0))
def test_clip_l2_bounds_norm_and_keeps_short_rows(vectors: np.ndarray, bound: float) -> None:
    clipped = clip_l2(vectors, bound)
    norms = np.linalg.norm(clipped, axis=1)
    assert np.all(norms <= bound * (1 + 1e-12) + 1e-300)
    inside = np.linalg.norm(vectors, axis=1) <= bound
    np.testing.assert_array_equal(clipped[inside], vectors[inside])


@settings(max_examples=80, deadline=None)
@given(a=rows, data=st.data(), bound=st.floats(0.01, 10.0))
def test_clipping_never_increases_distances(
    a: np.ndarray, data: st.DataObject, bound: float
) -> None:
    b = data.draw(hnp.arrays(np.float64, a.shape, elements=finite))
    before = np.linalg.norm(a - b, axis=1)
    after_l2 = np.linalg.norm(clip_l2(a, bound) - clip_l2(b, bound), axis=1)
    after_box = np.linalg.norm(
        clip_coordinates(a, -bound, bound) - clip_coordinates(b, -bound, bound), axis=1
    )
    assert np.all(after_l2 <= before * (1 + 1e-9) + 1e-9)
    assert np.all(after_box <= before * (1 + 1e-9) + 1e-9)
    # Non-negative rows clipped to the ball are at most √2·bound apart.
    pa, pb = clip_l2(np.abs(a), bound), clip_l2(np.abs(b), bound)
    assert np.all(np.linalg.norm(pa - pb, axis=1) <= math.sqrt(2) * bound * (1 + 1e-9))


@settings(max_examples=80, deadline=None)
@given(vectors=rows)
def test_to_simplex_rows_are_distributions(vectors: np.ndarray) -> None:
    out = to_simplex(vectors)
    assert out.shape == vectors.shape
    assert np.all(out >= 0)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-12)


def test_clipping_edge_cases() -> None:
    np.testing.assert_allclose(to_simplex([[0.0, 0.0], [2.0, 6.0]]), [[0.5, 0.5], [0.25, 0.75]])
    np.testing.assert_allclose(to_simplex([np.inf, 1.0, np.inf]), [0.5, 0.0, 0.5])
    np.testing.assert_allclose(clip_l2([3.0, 4.0], 1.0), [0.6, 0.8])
    np.testing.assert_allclose(clip_l2([[np.inf, 1.0]], 2.0), [[2.0, 0.0]])
    np.testing.assert_array_equal(clip_coordinates([-2.0, 0.5, 9.0], 0.0, 1.0), [0.0, 0.5, 1.0])
    with pytest.raises(ValueError):
        clip_coordinates([1.0], 1.0, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        clip_l2([np.nan], 1.0)
    with pytest.raises(ValueError):
        clip_l2([1.0], -1.0)
