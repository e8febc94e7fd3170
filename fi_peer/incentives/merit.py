"""Merit scores from opened audit answers: Shapley values of an accuracy game.

Theory of operation
-------------------
The FI paper's merit is ``p_i = acc_i / sum_j acc_j``: each member's share of
the test accuracy mass, where ``acc_i`` is the accuracy of the member's OWN
answers. The querier cannot see a member's answers on ordinary queries
(secure aggregation), but it sees the opened vectors of audit queries, whose
labels it knows (a labelled split of its own, disjoint from whatever a
reward is later judged on). Every score below is the Shapley value of a game
played on those audits; what differs is the characteristic function v(S):

* collective accuracy (:class:`fi_peer.incentives.scores.CoalitionAccuracy`):
  accuracy of the coalition's SUMMED vectors, decided by the aggregation
  rule. Shapley = marginal contribution to the collective: the only holder
  of a class takes a large share, members whose classes others also hold
  take ~0 however accurate they are (redundancy is worth nothing).
* log-likelihood of the true label (:class:`CoalitionLogLikelihood`): the
  coalition's mean ``log q_S(y|x)``; smoother than accuracy (it moves with
  every vector, not only when an argmax flips), but it charges dilution: on
  non-IID data a member that is confidently wrong off its own classes lowers
  the coalition's likelihood and often scores below 0.
* labelled coverage (:class:`LabelledCoverage`): v(S) = share of audits on
  which SOME member of S is right alone. Shapley = ``sum_t 1[i right alone]
  / #{j right alone on t}``: each audit is split among the members right on
  it (the FI agreement rule, with the true label instead of the collective's
  answer).
* individual accuracy (:class:`IndividualAccuracy`): v(S) = sum of the
  members' own accuracies. An additive game's Shapley value is each
  player's own worth, so Shapley = ``acc_i``: exactly the FI merit.

The four lie on one axis, from "marginal contribution to the collective" to
"individual accuracy" (coverage splits each audit among the members right on
it; the additive game splits nothing). Since the FI merit IS individual
accuracy, the additive game is the one whose Shapley value is an unbiased
estimate of it; every game further along the axis adds a bias towards
uniqueness that more audits do not remove (benchmarks/fairness.py measures
all four with exact Shapley values on 200 audits, see its ``games`` table).
Marginal contribution still has a job: telling a specialist that looks like
a guesser from a guesser.

:func:`accuracy_merit` (the rule used at settlement) pays each member its
individual accuracy on the audits (its opened vector decided ALONE,
``decide(v_i(x_t)) == y_t``), with two corrections for few audits:

* shrinkage, the floor for new members: ``(hits_i + m * mean_acc) / (a + m)``,
  an empirical-Bayes pull towards the committee's mean accuracy (``m``
  pseudo-audits, default 10): a member with few audits is paid close to the
  committee mean and moves to its measured accuracy as audits accrue;
* a chance gate, clipping to 0: a member whose audit hits are not above what
  guessing gives (one-sided binomial test, chance ``1 / n_classes``) scores
  0, unless its Shapley value in the COLLECTIVE accuracy game (``shapley``,
  when given) is positive: then it is no guesser but a specialist adding
  what nobody else has. A lazy peer answering at random fails both (a random
  vector only flips some of a coalition's right answers, so its collective
  Shapley value is negative). Two levels (``level``, ``strict_level``) and
  a harm margin keep honest members near chance paid while a lucky guesser
  that clears the lenient test is still caught by its negative Shapley
  value (:func:`accuracy_merit`).

"Decided alone" needs care for evidence rules: an ``evidence`` vector is a
joint ``n_i(y) q_i(x|y)``, so decided alone it answers with the member's own
class prior, which the collective never uses (the others' evidence supplies
it). :func:`prior_corrected` decides it under the collective's prior instead
(label-free class shares from the openings); a ``soft`` vector is the
member's answer and is decided as is.

:func:`merit_scores` runs the whole pipeline on opened audit vectors: hits,
truncated Monte-Carlo Shapley of the collective-accuracy game for the gate,
then :func:`accuracy_merit`.

Pure numpy and integer arithmetic; no I/O, no clock; randomness only from
the caller's seed (Monte-Carlo permutations).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fi_peer.incentives.scores import (
    CoalitionAccuracy,
    Decider,
    Distribution,
    ValueFunction,
    monte_carlo_shapley,
)

__all__ = [
    "CoalitionLogLikelihood",
    "IndividualAccuracy",
    "LabelledCoverage",
    "MeritScores",
    "accuracy_merit",
    "audit_hits",
    "binomial_critical",
    "merit_scores",
    "prior_corrected",
    "solo_correct",
]

Array = npt.NDArray[np.float64]


def _opened(vectors: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[Array, npt.NDArray[np.int64]]:
    arr = np.asarray(vectors, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if arr.ndim != 3 or y.shape != (arr.shape[1],):
        raise ValueError(f"vectors must be (K, n, L) and labels (n,), got {arr.shape}, {y.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("vectors contain NaN or infinity")
    return arr, y


def solo_correct(
    vectors: npt.ArrayLike, labels: npt.ArrayLike, decide: Decider
) -> npt.NDArray[np.bool_]:
    """(K, n, L) opened vectors, (n,) labels -> (K, n): member k's vector decided
    alone is right on audit t."""
    arr, y = _opened(vectors, labels)
    k, n, length = arr.shape
    if n == 0:
        return np.zeros((k, 0), dtype=bool)
    labels_hat = np.asarray(decide(arr.reshape(k * n, length)), dtype=np.int64).reshape(k, n)
    out: npt.NDArray[np.bool_] = labels_hat == y[None, :]
    return out


def prior_corrected(vectors: npt.ArrayLike, eps: float) -> Array:
    """Per-class evidence vectors (K, n, C) -> each member's vectors divided by
    ``share_i(y) + eps``, its estimated share of class y's evidence.

    A per-class evidence vector is a JOINT, ``E_i(x, y) ~ n_i(y) q_i(x|y)``:
    decided alone it answers with the member's own class prior ``n_i(y)``, so
    on a non-IID split a member that holds 200 examples of one class and 10 of
    another calls nearly everything the first class, although its data tells
    both apart (the collective does not have that problem: the others'
    evidence supplies the prior). ``share_i(y) = sum_t E_i(x_t, y) / sum_t
    sum_j E_j(x_t, y)`` over the opened audits is label-free and estimates
    ``n_i(y) / N(y)``; dividing by it gives ``~ N(y) q_i(x|y)``: the member's
    own class-conditional evidence under the COLLECTIVE's class prior.
    ``eps`` (a share, e.g. 0.1) keeps a class the member barely holds from
    being blown up by a share near 0. Negative (noisy) coordinates count as
    0 in the shares."""
    arr = np.asarray(vectors, dtype=np.float64)
    if arr.ndim != 3 or not np.all(np.isfinite(arr)):
        raise ValueError(f"vectors must be a finite (K, n, C) array, got shape {arr.shape}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    mass = np.maximum(arr, 0.0).sum(axis=1)  # (K, C)
    total = mass.sum(axis=0, keepdims=True)
    share = np.divide(mass, total, out=np.zeros_like(mass), where=total > 0)
    out: Array = arr / (share[:, None, :] + eps)
    return out


def audit_hits(
    vectors: npt.ArrayLike, labels: npt.ArrayLike, decide: Decider
) -> npt.NDArray[np.int64]:
    """(K, n, L) opened vectors, (n,) labels -> (K,) audits each member got right alone."""
    out: npt.NDArray[np.int64] = solo_correct(vectors, labels, decide).sum(axis=1).astype(np.int64)
    return out


def binomial_critical(trials: int, chance: float, level: float) -> int:
    """The least c with P(Bin(trials, chance) <= c) >= level: more than c hits
    out of ``trials`` is unlikely (probability < 1 - level) for a guesser."""
    if trials < 0 or not 0.0 < chance < 1.0 or not 0.0 < level < 1.0:
        raise ValueError("need trials >= 0, 0 < chance < 1 and 0 < level < 1")
    cdf = 0.0
    for c in range(trials + 1):
        cdf += math.comb(trials, c) * chance**c * (1.0 - chance) ** (trials - c)
        if cdf >= level:
            return c
    return trials


def accuracy_merit(
    hits: npt.ArrayLike,
    audits: int | npt.ArrayLike,
    *,
    n_classes: int,
    shrinkage: float = 10.0,
    level: float = 0.95,
    shapley: npt.ArrayLike | None = None,
    strict_level: float | None = None,
    harm: float = 0.02,
) -> Array:
    """Merit scores (non-negative, not normalised) from per-member audit ``hits``
    out of ``audits`` (one count for all, or one per member: committees vary);
    see the module docs. A member with no audits scores 0 (no audits at all:
    the reward rule then pays equal per share).

    The chance gate: without ``strict_level``, a member passes when its hits
    beat chance at ``level`` or its collective Shapley value is positive.
    With ``strict_level`` (and ``shapley``) it passes when its hits beat
    chance at ``strict_level``, or its Shapley value is positive, or its hits
    beat chance at ``level`` AND its Shapley value is not below ``-harm``:
    a lucky guesser clears the lenient test now and then (5 % of the time at
    0.95) but its random answers flip right answers of the collective, so it
    shows a clearly negative Shapley value; an honest weak member near chance
    does not, and keeps its pay."""
    h = np.asarray(hits, dtype=np.float64)
    a = np.broadcast_to(np.asarray(audits, dtype=np.int64), h.shape)
    if h.ndim != 1 or h.size == 0 or np.any(h < 0) or np.any(h > a):
        raise ValueError("hits must be a non-empty 1-D array in [0, audits]")
    if n_classes < 2 or not (math.isfinite(shrinkage) and shrinkage >= 0):
        raise ValueError("need n_classes >= 2 and a finite shrinkage >= 0")
    seen = a > 0
    if not seen.any():
        return np.zeros(h.size)
    acc = np.divide(h, a, out=np.zeros(h.size), where=seen)
    prior = float(acc[seen].mean())
    estimate = np.divide(h + shrinkage * prior, a + shrinkage, out=np.zeros(h.size), where=seen)
    critical = np.array([binomial_critical(int(n), 1.0 / n_classes, level) for n in a])
    passed = seen & (h > critical)
    if shapley is not None:
        s = np.asarray(shapley, dtype=np.float64)
        if s.shape != h.shape:
            raise ValueError(f"shapley must have shape {h.shape}, got {s.shape}")
        if strict_level is not None:
            if not (level <= strict_level < 1.0 and math.isfinite(harm) and harm >= 0):
                raise ValueError("need level <= strict_level < 1 and a finite harm >= 0")
            strict = np.array([binomial_critical(int(n), 1.0 / n_classes, strict_level) for n in a])
            passed = seen & ((h > strict) | (passed & (s >= -harm)))
        passed |= seen & (s > 0)
    out: Array = np.where(passed, estimate, 0.0)
    return out


class IndividualAccuracy(ValueFunction):
    """The additive game v(S) = sum_{i in S} acc_i, v(empty) = 0, with ``acc_i``
    the share of audits member i gets right alone (``correct``: (K, n) bools).
    Its Shapley value is ``acc_i`` itself: the FI merit."""

    def __init__(self, correct: npt.ArrayLike) -> None:
        c = np.asarray(correct, dtype=np.float64)
        if c.ndim != 2 or c.shape[1] == 0:
            raise ValueError(f"correct must be (K, n) with n >= 1, got shape {c.shape}")
        super().__init__(c.shape[0], 0.0)
        self.accuracy: Array = c.mean(axis=1)

    def _value(self, members: tuple[int, ...]) -> float:
        return float(self.accuracy[list(members)].sum())


class LabelledCoverage(ValueFunction):
    """v(S) = share of audits on which some member of S is right alone;
    v(empty) = 0. Shapley: each audit split among the members right on it."""

    def __init__(self, correct: npt.ArrayLike) -> None:
        c = np.asarray(correct, dtype=bool)
        if c.ndim != 2 or c.shape[1] == 0:
            raise ValueError(f"correct must be (K, n) with n >= 1, got shape {c.shape}")
        super().__init__(c.shape[0], 0.0)
        self.correct = c

    def _value(self, members: tuple[int, ...]) -> float:
        return float(self.correct[list(members)].any(axis=0).mean())


class CoalitionLogLikelihood(CoalitionAccuracy):
    """v(S) = mean over audits of ``log((1 - eps) q_S(y|x) + eps / C)``, with
    ``q_S`` the decided distribution of S's summed vectors (``proba``);
    v(empty) = log(1 / C) (a committee that says nothing is uniform). ``eps``
    mixes in the uniform distribution so a coalition sure of a wrong class
    costs ``log(eps / C)``, not minus infinity."""

    def __init__(
        self,
        vectors: npt.ArrayLike,
        labels: npt.ArrayLike,
        proba: Distribution,
        *,
        n_classes: int,
        eps: float = 1e-3,
    ) -> None:
        if not 0.0 < eps <= 1.0:
            raise ValueError(f"eps must be in (0, 1], got {eps}")

        def argmax(sums: Array) -> npt.NDArray[np.int64]:
            out: npt.NDArray[np.int64] = np.argmax(proba(sums), axis=1).astype(np.int64)
            return out

        super().__init__(
            vectors,
            labels,
            argmax,
            n_classes=n_classes,
            empty_value=math.log(1.0 / n_classes),
            proba=proba,
        )
        self.eps = float(eps)
        self.n_classes = n_classes

    def _value(self, members: tuple[int, ...]) -> float:
        assert self.proba is not None
        dist = np.asarray(self.proba(self.vectors[list(members)].sum(axis=0)), dtype=np.float64)
        truth = dist[np.arange(self.labels.size), self.labels]
        return float(np.mean(np.log((1.0 - self.eps) * truth + self.eps / self.n_classes)))


@dataclass(frozen=True, slots=True)
class MeritScores:
    """:func:`merit_scores` output: the settlement scores and what they came from."""

    scores: Array
    """Non-negative merit per member (:func:`accuracy_merit`)."""
    hits: npt.NDArray[np.int64]
    """Audits each member got right alone."""
    shapley: Array
    """Truncated Monte-Carlo Shapley value in the collective-accuracy game (the gate)."""
    audits: int


def merit_scores(
    vectors: npt.ArrayLike,
    labels: npt.ArrayLike,
    decide: Decider,
    *,
    n_classes: int,
    shrinkage: float = 10.0,
    level: float = 0.95,
    strict_level: float | None = 0.999,
    harm: float = 0.02,
    permutations: int = 100,
    tolerance: float = 0.01,
    seed: int | Sequence[int] = 0,
    prior_eps: float | None = None,
) -> MeritScores:
    """Merit scores of K members from their opened vectors on n audits.

    ``vectors`` (K, n, L), ``labels`` (n,); ``decide`` the aggregation rule's
    summed vectors -> labels. ``level``, ``strict_level``, ``harm``: the
    chance gate (:func:`accuracy_merit`). The strict level matters because a
    querier tests at every settlement and a guesser that passes once is paid
    its (shrunk) accuracy; the defaults were chosen on development seeds of
    benchmarks/fairness.py (see its ``hyperparameters``). The gate's Shapley values are truncated
    Monte-Carlo estimates (``permutations``, ``tolerance``, ``seed``: see
    :func:`fi_peer.incentives.scores.monte_carlo_shapley`). ``prior_eps``:
    decide each member's vector alone after :func:`prior_corrected` (for
    rules whose vector is per-class evidence, a joint; not for rules whose
    vector is the member's answer, such as ``soft``). No audits: all zeros
    (the reward rule then pays equal per share).
    """
    arr, y = _opened(vectors, labels)
    k = arr.shape[0]
    if k == 0:
        raise ValueError("need at least one member")
    if y.size == 0:
        zeros = np.zeros(k)
        return MeritScores(zeros, np.zeros(k, dtype=np.int64), zeros.copy(), 0)
    solo = arr if prior_eps is None else prior_corrected(arr, prior_eps)
    hits = audit_hits(solo, y, decide)
    game = CoalitionAccuracy(arr, y, decide, n_classes=n_classes)
    phi = monte_carlo_shapley(game, permutations=permutations, tolerance=tolerance, seed=seed)
    scores = accuracy_merit(
        hits,
        int(y.size),
        n_classes=n_classes,
        shrinkage=shrinkage,
        level=level,
        shapley=phi,
        strict_level=strict_level,
        harm=harm,
    )
    return MeritScores(scores, hits, phi, int(y.size))
