"""Merit scores from opened audit answers (fi_peer.incentives.merit)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fi_peer.incentives import (
    CoalitionAccuracy,
    accuracy_merit,
    audit_hits,
    binomial_critical,
    exact_shapley,
    merit_shares,
)
from fi_peer.models.aggregation import RULES


def binom_cdf(c: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(c + 1))


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
    decide = lambda s: RULES["soft"].decide_batch(s)[0]  # noqa: E731
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
