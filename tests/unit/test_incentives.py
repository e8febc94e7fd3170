"""Contribution scores (leave-one-out, Shapley) and reward rules (fi_peer.incentives)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from fi_peer.incentives import (
    CoalitionAccuracy,
    ValueFunction,
    agreement_shares,
    allocate,
    entropy_shares,
    equal_shares,
    exact_shapley,
    fairness,
    leave_one_out,
    merit_from_accuracy,
    merit_shares,
    monte_carlo_shapley,
)
from fi_peer.models.aggregation import RULES


class TableGame(ValueFunction):
    """A game given by a Python function of the coalition (a frozenset)."""

    def __init__(
        self, n: int, fn: Callable[[frozenset[int]], float], empty_value: float = 0.0
    ) -> None:
        super().__init__(n, empty_value)
        self.fn = fn

    def _value(self, members: tuple[int, ...]) -> float:
        return self.fn(frozenset(members))


def glove_game() -> TableGame:
    # Players 0 and 1 hold left gloves, player 2 a right glove; a pair is worth 1.
    def value(s: frozenset[int]) -> float:
        return float(min(len(s & {0, 1}), len(s & {2})))

    return TableGame(3, value)


def voting_game() -> TableGame:
    # Weighted majority [quota 4; weights 3, 2, 1, 1] plus a null player 4 (weight 0).
    weights = [3, 2, 1, 1, 0]
    return TableGame(5, lambda s: float(sum(weights[i] for i in s) >= 4))


# --- Shapley and leave-one-out ---------------------------------------------------


def test_exact_shapley_of_the_glove_game() -> None:
    np.testing.assert_allclose(exact_shapley(glove_game()), [1 / 6, 1 / 6, 2 / 3])


def test_leave_one_out_exact_on_a_toy_game() -> None:
    # v(N) = 1; without 0 or 1 the pair survives; without 2 it is gone.
    np.testing.assert_allclose(leave_one_out(glove_game()), [0.0, 0.0, 1.0])
    # v(N)=1; N-{0} = {1,2,3} weighs 4 (still wins); N-{1}: 5; N-{2}: 6; N-{3}: 6.
    np.testing.assert_allclose(leave_one_out(voting_game()), [0.0, 0.0, 0.0, 0.0, 0.0])
    additive = TableGame(3, lambda s: sum([0.5, 0.25, 0.0][i] for i in s))
    np.testing.assert_allclose(leave_one_out(additive), [0.5, 0.25, 0.0])


@pytest.mark.parametrize("game", [glove_game(), voting_game()])
def test_shapley_efficiency(game: TableGame) -> None:
    total = game.grand_value() - game.empty_value
    assert math.isclose(exact_shapley(game).sum(), total, abs_tol=1e-12)
    # Without truncation, every permutation's marginals sum to v(N) - v(empty).
    mc = monte_carlo_shapley(game, permutations=7, seed=3)
    assert math.isclose(mc.sum(), total, abs_tol=1e-12)


def test_shapley_symmetry_and_null_player() -> None:
    game = voting_game()
    phi = exact_shapley(game)
    assert phi[2] == pytest.approx(phi[3])  # equal weights: interchangeable
    assert phi[4] == pytest.approx(0.0, abs=1e-12)  # never pivotal
    mc = monte_carlo_shapley(game, permutations=400, seed=0)
    assert mc[4] == 0.0  # a null player's marginal is exactly 0 in every order
    np.testing.assert_allclose(mc, phi, atol=0.05)
    glove = monte_carlo_shapley(glove_game(), permutations=200, seed=1)
    assert glove[0] == pytest.approx(glove[1], abs=0.05)


def test_monte_carlo_is_deterministic_and_truncation_bounded() -> None:
    game = voting_game()
    a = monte_carlo_shapley(game, permutations=50, tolerance=0.0, seed=[7, 1])
    b = monte_carlo_shapley(voting_game(), permutations=50, tolerance=0.0, seed=[7, 1])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, monte_carlo_shapley(game, permutations=50, seed=[7, 2]))
    tol = 0.25
    truncated = monte_carlo_shapley(game, permutations=50, tolerance=tol, seed=0)
    total = game.grand_value() - game.empty_value
    assert abs(truncated.sum() - total) <= tol + 1e-12


def test_score_argument_checks() -> None:
    with pytest.raises(ValueError):
        monte_carlo_shapley(glove_game(), permutations=0)
    with pytest.raises(ValueError):
        monte_carlo_shapley(glove_game(), tolerance=-1.0)
    with pytest.raises(ValueError):
        glove_game()([5])
    with pytest.raises(ValueError):
        CoalitionAccuracy(np.zeros((2, 3)), [0, 1, 0], lambda s: s.argmax(1), n_classes=2)


def _audit_game(lazy: bool, seed: int = 0, n: int = 60) -> tuple[CoalitionAccuracy, int]:
    """Three complementary honest members (classes {0,1}, {2,3}, {4,5}) on the evidence rule,
    plus optionally a lazy one answering a random one-hot."""
    rng = np.random.default_rng(seed)
    n_classes = 6
    labels = rng.integers(n_classes, size=n)
    vectors = []
    for owned in ({0, 1}, {2, 3}, {4, 5}):
        v = rng.uniform(0.0, 0.01, size=(n, n_classes))  # no ties on uncovered inputs
        for t, y in enumerate(labels):
            if y in owned:
                v[t, y] += 3.0
        vectors.append(v)
    if lazy:
        vectors.append(3.0 * np.eye(n_classes)[rng.integers(n_classes, size=n)])
    rule = RULES["evidence"]
    game = CoalitionAccuracy(
        np.stack(vectors), labels, lambda s: rule.decide_batch(s)[0], n_classes=n_classes
    )
    return game, len(vectors)


def test_coalition_accuracy_and_honest_scores() -> None:
    game, k = _audit_game(lazy=False)
    assert game.empty_value == pytest.approx(1 / 6)
    assert game.grand_value() == 1.0
    phi = exact_shapley(game)
    assert phi.sum() == pytest.approx(1.0 - 1 / 6)
    assert np.all(phi > 0.15)  # each owns a third of the classes
    assert game.evaluations == 2**k


def test_lazy_member_scores_about_zero_or_less() -> None:
    game, k = _audit_game(lazy=True)
    phi = monte_carlo_shapley(game, permutations=200, tolerance=0.01, seed=0)
    honest = phi[: k - 1]
    assert phi[k - 1] <= 0.02
    assert phi[k - 1] < 0.1 * honest.mean()
    assert leave_one_out(game)[k - 1] <= 0.0
    shares = merit_shares(phi)
    assert shares[k - 1] == 0.0
    assert shares.sum() == pytest.approx(1.0)


def test_soft_value_uses_the_distribution() -> None:
    rule = RULES["evidence"]
    vectors = np.array([[[3.0, 1.0]], [[0.0, 0.0]]])
    game = CoalitionAccuracy(
        vectors,
        [0],
        lambda s: rule.decide_batch(s)[0],
        n_classes=2,
        proba=lambda s: rule.decide_batch(s)[1],
    )
    assert game([0]) == pytest.approx(0.75)
    assert exact_shapley(game)[1] == pytest.approx(0.0)


# --- reward rules -----------------------------------------------------------------


def test_equal_and_merit_shares() -> None:
    np.testing.assert_allclose(equal_shares(n_members=4), [0.25] * 4)
    np.testing.assert_allclose(equal_shares([1, 3]), [0.25, 0.75])
    np.testing.assert_allclose(merit_shares([0.2, -0.1, 0.6]), [0.25, 0.0, 0.75])
    np.testing.assert_allclose(merit_shares([0.2, 0.2], delivered=[1, 3]), [0.25, 0.75])
    np.testing.assert_allclose(merit_shares([-1.0, 0.0]), [0.5, 0.5])  # no merit yet: equal


def test_fi_paper_label_free_rules() -> None:
    probs = np.array(
        [
            [[0.9, 0.1], [0.8, 0.2]],  # agrees on both queries
            [[0.6, 0.4], [0.3, 0.7]],  # agrees on the first only
            [[0.5, 0.5], [0.5, 0.5]],  # argmax 0 (lowest index) both times: agrees on first
        ]
    )
    answers = np.array([0, 0])
    # Query 0: three agree (1/3 each); query 1: member 0 and 2 agree (1/2 each).
    np.testing.assert_allclose(
        agreement_shares(probs, answers), np.array([1 / 3 + 1 / 2, 1 / 3, 1 / 3 + 1 / 2]) / 2
    )
    shares = entropy_shares(probs)
    assert shares.sum() == pytest.approx(1.0)
    assert shares[0] > shares[1] > shares[2]  # most confident first
    liar = np.array([[[1.0, 0.0]], [[0.6, 0.4]]])
    assert entropy_shares(liar)[0] > 0.5  # a confident guess is paid most


def test_fairness_and_merit() -> None:
    p = merit_from_accuracy([0.5, 0.25, 0.25, -0.1])
    np.testing.assert_allclose(p, [0.5, 0.25, 0.25, 0.0])
    assert fairness(p, p) == pytest.approx(1.0)
    assert fairness([1, 0], [0, 1]) == 0.0
    assert fairness(p, [0.25] * 4) == pytest.approx(1 - 0.5 * (0.25 + 0 + 0 + 0.25))


@pytest.mark.parametrize(
    ("budget", "weights"),
    [
        (10**18, [1, 1, 1]),
        (7, [0.1, 0.2, 0.3, 0.4]),
        (10**18 + 1, [1 / 3, 1 / 3, 1 / 3]),
        (0, [1, 2]),
        (5, [0, 0, 1]),
        (123456789, np.array([0.05, 0.0, 0.9, 0.05])),
    ],
)
def test_allocate_is_integer_and_exact(budget: int, weights: object) -> None:
    amounts = allocate(budget, weights)  # type: ignore[arg-type]
    assert all(isinstance(a, int) and a >= 0 for a in amounts)
    assert sum(amounts) == budget
    w = np.asarray(weights, dtype=float)
    ideal = budget * w / w.sum()
    assert np.all(np.abs(np.array(amounts, dtype=float) - ideal) <= 1.0 + 1e-6 * budget)
    assert all(a == 0 for a, x in zip(amounts, w, strict=True) if x == 0)


def test_allocate_remainder_is_deterministic() -> None:
    third = 333333333333333333
    assert allocate(10**18, [1, 1, 1]) == [third + 1, third, third]
    assert allocate(2, [1, 1, 1]) == [1, 1, 0]  # ties: lowest index first
    assert allocate(1, [1, 2]) == [0, 1]  # largest remainder first
    numpy_ints = allocate(np.int64(10), [np.int64(1), 2.5])
    assert numpy_ints == [3, 7] and all(type(a) is int for a in numpy_ints)
    with pytest.raises(ValueError):
        allocate(10, [0, 0])
    with pytest.raises(ValueError):
        allocate(-1, [1])
    with pytest.raises(ValueError):
        allocate(10, [1, -1])
    with pytest.raises(ValueError):
        allocate(10, [float("nan")])
