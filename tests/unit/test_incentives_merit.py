"""Merit scores from opened audit answers (fi_peer.incentives.merit)."""

from __future__ import annotations

import math
from itertools import permutations

import numpy as np
import pytest

from fi_peer.incentives import (
    CoalitionAccuracy,
    exact_shapley,
    merit_shares,
    monte_carlo_shapley,
)
from fi_peer.incentives.merit import (
    CoalitionLogLikelihood,
    IndividualAccuracy,
    LabelledCoverage,
    accuracy_merit,
    audit_hits,
    binomial_critical,
    merit_scores,
    prior_corrected,
    solo_correct,
)
from fi_peer.models.aggregation import RULES

SOFT = RULES["soft"]


def decide(sums: np.ndarray) -> np.ndarray:
    return SOFT.decide_batch(sums)[0]


def proba(sums: np.ndarray) -> np.ndarray:
    return SOFT.decide_batch(sums)[1]


def binom_cdf(c: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(c + 1))


def specialists(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, n, C) soft vectors of 4 members that each know 2-4 of ``classes``
    classes (right, fairly confident, on those; a confident wrong class
    elsewhere), and (n,) labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(classes, size=n)
    known = [{0, 1}, {2, 3}, {4, 5, 6}, {0, 2, 4, 7}]
    out = []
    for k in known:
        v = np.full((n, classes), 0.02)
        for t, y in enumerate(labels):
            guess = y if y in k else sorted(k)[t % len(k)]
            v[t, guess] += 1.0 - 0.02 * classes
        # Seeded jitter: no exact ties between coalition sums (float addition order
        # would break them arbitrarily).
        v += rng.uniform(0.0, 1e-3, size=v.shape)
        out.append(v / v.sum(axis=1, keepdims=True))
    return np.stack(out), labels


@pytest.mark.parametrize(("n", "p", "level"), [(20, 0.1, 0.95), (90, 0.1, 0.95), (40, 1 / 3, 0.9)])
def test_binomial_critical_is_the_least_quantile(n: int, p: float, level: float) -> None:
    c = binomial_critical(n, p, level)
    assert binom_cdf(c, n, p) >= level > binom_cdf(c - 1, n, p)
    assert binomial_critical(0, p, level) == 0


def test_accuracy_merit_tracks_accuracy_and_gates_guessers() -> None:
    # 10 classes, 90 audits: a guesser expects 9 hits; the 95 % critical value is 14.
    hits = np.array([60, 30, 17, 9])
    scores = accuracy_merit(hits, 90, n_classes=10, shrinkage=0.0)
    np.testing.assert_allclose(scores, [60 / 90, 30 / 90, 17 / 90, 0.0])
    # A positive Shapley value in the collective rescues a member the test cannot tell
    # from a guesser (it adds something the others lack).
    rescued = accuracy_merit(hits, 90, n_classes=10, shrinkage=0.0, shapley=[0.1, 0, 0, 0.02])
    assert rescued[3] == pytest.approx(9 / 90)
    # Shrinkage pulls towards the mean accuracy; more audits, less pull.
    shrunk = accuracy_merit(hits[:3], 90, n_classes=10, shrinkage=10.0)
    mean = hits[:3].mean() / 90
    np.testing.assert_allclose(shrunk, (hits[:3] + 10 * mean) / 100)
    # Per-member audit counts (committees vary); a member never audited scores 0.
    per = accuracy_merit([7, 0, 3], [10, 0, 10], n_classes=2, shrinkage=0.0, level=0.6)
    assert per.tolist() == [0.7, 0.0, 0.0]  # 3/10 is not above chance 1/2
    assert accuracy_merit([0, 0], 0, n_classes=10).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        accuracy_merit([11], 10, n_classes=10)
    with pytest.raises(ValueError):
        accuracy_merit([1], 10, n_classes=1)


def test_two_level_gate_catches_a_lucky_guesser_by_its_harm() -> None:
    # 100 audits, 10 classes: the 95 % critical value is 15, the 99.9 % one 20.
    assert (binomial_critical(100, 0.1, 0.95), binomial_critical(100, 0.1, 0.999)) == (15, 20)
    hits = np.array([17, 17, 17, 12, 25, 40])
    phi = np.array([-0.05, -0.01, 0.01, 0.03, -0.2, 0.1])
    scores = accuracy_merit(
        hits, 100, n_classes=10, shrinkage=0.0, shapley=phi, strict_level=0.999, harm=0.02
    )
    # 0: lucky guesser (clears 95 %, not 99.9 %, clearly harms) -> 0; 1: weak but
    # harmless -> paid; 2, 3: adds to the collective -> paid; 4: far above chance
    # (beats 99.9 %) -> paid whatever its Shapley value.
    np.testing.assert_allclose(scores, [0.0, 0.17, 0.17, 0.12, 0.25, 0.40])
    # One level only (the default): the lucky guesser would be paid.
    assert accuracy_merit(hits, 100, n_classes=10, shrinkage=0.0, shapley=phi)[0] == 0.17
    with pytest.raises(ValueError):
        accuracy_merit(hits, 100, n_classes=10, shapley=phi, strict_level=0.9)
    with pytest.raises(ValueError):
        accuracy_merit(hits, 100, n_classes=10, shapley=phi, strict_level=0.999, harm=-1.0)


def games(vectors: np.ndarray, labels: np.ndarray, classes: int) -> dict[str, object]:
    correct = solo_correct(vectors, labels, decide)
    return {
        "collective_accuracy": CoalitionAccuracy(vectors, labels, decide, n_classes=classes),
        "true_label_probability": CoalitionAccuracy(
            vectors, labels, decide, n_classes=classes, proba=proba
        ),
        "log_likelihood": CoalitionLogLikelihood(vectors, labels, proba, n_classes=classes),
        "labelled_coverage": LabelledCoverage(correct),
        "individual_accuracy": IndividualAccuracy(correct),
    }


@pytest.mark.parametrize(
    "name",
    [
        "collective_accuracy",
        "true_label_probability",
        "log_likelihood",
        "labelled_coverage",
        "individual_accuracy",
    ],
)
def test_shapley_is_efficient_for_every_game(name: str) -> None:
    vectors, labels = specialists(60, 8, seed=1)
    game = games(vectors, labels, 8)[name]
    assert isinstance(game, CoalitionAccuracy | LabelledCoverage | IndividualAccuracy)
    gain = game.grand_value() - game.empty_value
    assert abs(gain) > 1e-3  # the game is not trivial
    assert exact_shapley(game).sum() == pytest.approx(gain, abs=1e-12)
    # Untruncated Monte-Carlo: every permutation's marginals telescope to the gain.
    assert monte_carlo_shapley(game, permutations=7, seed=3).sum() == pytest.approx(gain, abs=1e-12)


def test_the_games_span_marginal_contribution_to_individual_accuracy() -> None:
    vectors, labels = specialists(80, 8, seed=2)
    correct = solo_correct(vectors, labels, decide)
    accuracy = correct.mean(axis=1)
    # Additive game: Shapley = each member's own accuracy, exactly (the FI merit).
    np.testing.assert_allclose(exact_shapley(IndividualAccuracy(correct)), accuracy, atol=1e-12)
    # Coverage: each audit split among the members right on it (agreement, with labels).
    right = correct.sum(axis=0)
    split = np.divide(correct, right, out=np.zeros(correct.shape), where=right > 0).sum(axis=1)
    np.testing.assert_allclose(exact_shapley(LabelledCoverage(correct)), split / 80, atol=1e-12)


def test_a_duplicate_member_gets_equal_credit() -> None:
    vectors, labels = specialists(200, 8, seed=4)
    twin = np.concatenate([vectors, vectors[1:2]])  # member 4 = a copy of member 1
    for name, game in games(twin, labels, 8).items():
        assert isinstance(game, CoalitionAccuracy | LabelledCoverage | IndividualAccuracy)
        phi = exact_shapley(game)
        assert phi[1] == pytest.approx(phi[4], abs=1e-12), name
    scores = merit_scores(twin, labels, decide, n_classes=8, permutations=200, tolerance=0.0)
    assert scores.scores[1] == scores.scores[4] > 0
    assert scores.hits[1] == scores.hits[4]


def lazy_world(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """4 honest specialists + a lazy 5th member (uniformly random one-hot)."""
    vectors, labels = specialists(200, 8, seed=seed)
    rng = np.random.default_rng(seed + 100)
    lazy = np.eye(8)[rng.integers(8, size=labels.size)]
    return np.concatenate([vectors, lazy[None]]), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_lazy_member_gets_nothing(seed: int) -> None:
    vectors, labels = lazy_world(seed)
    out = merit_scores(vectors, labels, decide, n_classes=8, seed=seed)
    assert out.audits == 200
    assert out.scores[4] == 0.0 and np.all(out.scores[:4] > 0)
    assert out.shapley[4] < 0  # its random vector only flips right answers
    assert merit_shares(out.scores)[4] == 0.0
    # Its own hits are at chance (1/8 of 200 = 25), far below an honest member's.
    assert out.hits[4] < 40 < out.hits[:4].min()


def test_truncated_monte_carlo_error_is_bounded_on_an_exact_game() -> None:
    vectors, labels = specialists(60, 8, seed=5)
    game = CoalitionAccuracy(vectors, labels, decide, n_classes=8)
    exact = exact_shapley(game)
    gain = game.grand_value() - game.empty_value
    # 4 players: enumerate every order by hand, the Shapley value by definition.
    by_definition = np.zeros(4)
    for order in permutations(range(4)):
        done: list[int] = []
        for i in order:
            by_definition[i] += game([*done, i]) - game(done)
            done.append(i)
    np.testing.assert_allclose(exact, by_definition / 24, atol=1e-12)
    for tolerance in (0.0, 0.02, 0.05, 0.2):
        tmc = monte_carlo_shapley(game, permutations=400, tolerance=tolerance, seed=1)
        # Each permutation stops once the prefix is within `tolerance` of v(N), so the
        # estimate's efficiency error is at most `tolerance`...
        assert abs(tmc.sum() - gain) <= tolerance + 1e-12
        # ... and every player's error stays within tolerance + Monte-Carlo noise.
        assert np.abs(tmc - exact).max() <= tolerance + 0.03
    with pytest.raises(ValueError):
        monte_carlo_shapley(game, tolerance=-0.1)


def test_prior_correction_decides_evidence_under_the_collectives_prior() -> None:
    # Member 0 holds 20 examples of class 0 and 2 of class 1: its raw evidence for a
    # class-1 input (2 close points, 0.5 each) loses to 20 far class-0 points (0.1 each).
    # Member 1 holds the rest of class 1 (18 points); the collective gets it right.
    labels = np.array([0, 0, 1, 1])
    m0 = np.array([[8.0, 0.1], [8.0, 0.1], [2.0, 1.0], [2.0, 1.0]])
    m1 = np.array([[0.0, 0.9], [0.0, 0.9], [1.0, 9.0], [1.0, 9.0]])
    vectors = np.stack([m0, m1])
    assert solo_correct(vectors, labels, decide)[0].tolist() == [True, True, False, False]
    fixed = prior_corrected(vectors, 0.1)
    assert solo_correct(fixed, labels, decide)[0].tolist() == [True, True, True, True]
    assert solo_correct(fixed, labels, decide)[1].tolist()[2:] == [True, True]
    # Equal class shares (every member holds every class alike): a no-op on the argmax.
    iid = np.stack([m0 * [1.0, 8.0], m0 * [1.0, 8.0]])
    np.testing.assert_array_equal(
        np.argmax(prior_corrected(iid, 0.1), axis=2), np.argmax(iid, axis=2)
    )
    with pytest.raises(ValueError):
        prior_corrected(vectors, 0.0)
    with pytest.raises(ValueError):
        prior_corrected(vectors[0], 0.1)


def test_merit_scores_edge_cases() -> None:
    vectors, labels = specialists(10, 8, seed=6)
    empty = merit_scores(vectors[:, :0], labels[:0], decide, n_classes=8)
    assert empty.audits == 0 and empty.scores.tolist() == [0.0] * 4
    assert merit_shares(empty.scores).tolist() == [0.25] * 4  # no audits: equal pay
    with pytest.raises(ValueError):
        merit_scores(vectors, labels[:5], decide, n_classes=8)
    with pytest.raises(ValueError):
        merit_scores(vectors * np.nan, labels, decide, n_classes=8)
    with pytest.raises(ValueError):
        CoalitionLogLikelihood(vectors, labels, proba, n_classes=8, eps=0.0)
    with pytest.raises(ValueError):
        IndividualAccuracy(np.zeros((3, 0), dtype=bool))


def test_merit_pays_by_accuracy_where_shapley_pays_by_uniqueness() -> None:
    # Three members, three classes, 30 audits (10 per class). A and B know classes 0
    # and 1 (right there, wrong on 2); C knows only class 2. FI merit (accuracy share)
    # is 2:2:1; Shapley of the collective gives C, the only one for class 2,
    # as much as A or B (1/3 each): it measures a different thing.
    labels = np.repeat(np.arange(3), 10)
    eye = np.eye(3)
    knows_01 = np.where(labels[:, None] < 2, eye[labels], eye[0])
    knows_2 = np.where(labels[:, None] == 2, 3 * eye[labels], 0.1 * eye[2])
    vectors = np.stack([knows_01, knows_01, knows_2])
    hits = audit_hits(vectors, labels, decide)
    assert hits.tolist() == [20, 20, 10]
    phi = exact_shapley(CoalitionAccuracy(vectors, labels, decide, n_classes=3))
    np.testing.assert_allclose(merit_shares(phi), [1 / 3, 1 / 3, 1 / 3])
    # C answers at chance (10 of 30, 3 classes): alone, the gate takes it for a
    # guesser; its positive Shapley value (it adds class 2) shows it is not.
    gated = merit_shares(accuracy_merit(hits, 30, n_classes=3, shrinkage=0.0))
    np.testing.assert_allclose(gated, [0.5, 0.5, 0.0])
    merit = merit_shares(accuracy_merit(hits, 30, n_classes=3, shrinkage=0.0, shapley=phi))
    np.testing.assert_allclose(merit, [0.4, 0.4, 0.2])
