"""Merit scores from opened audit answers: each member's share of the accuracy mass.

Theory of operation
-------------------
The FI paper's merit is ``p_i = acc_i / sum_j acc_j``: each member's share of
the test accuracy mass, where ``acc_i`` is the accuracy of the member's OWN
answers. That is what a fair reward should track, and it is not what the
Shapley value of the collective measures: Shapley splits ``v(N) - v(empty)``
(the collective's gain) by marginal contribution, so on non-IID data a
member holding a class nobody else holds takes a large share and members
with overlapping classes take little, whatever their own accuracy (measured
in benchmarks/fairness.py: F of exact Shapley against the FI merit is well
below the agreement rule's, before any estimation noise).

The querier cannot see a member's answers on ordinary queries (secure
aggregation), but it sees the opened vectors of audit queries, whose labels
it knows. :func:`accuracy_merit` scores each member by the accuracy of its
opened vector decided ALONE (``decide(v_i(x_t)) == y_t``) on those audits.
This is the Shapley value of the additive game ``v(S) = sum_{i in S} acc_i``
(so it is efficient, symmetric and null-player-free like any Shapley value),
estimated from ``a`` audits. Two corrections keep it useful on few audits:

* shrinkage: ``(hits_i + m * mean_acc) / (a + m)``, an empirical-Bayes pull
  towards the committee's mean accuracy (``m`` pseudo-audits, default 10):
  with few audits the rule pays close to equal, and it moves towards the
  measured shares as audits accumulate;
* a chance gate: a member whose audit hits are not above what guessing
  gives (one-sided binomial test at ``level``, chance ``1 / n_classes``)
  scores 0, unless its Shapley value in the collective (``shapley``, when
  given) is positive. A lazy peer answering at random fails both; an honest
  member that covers few classes usually passes one of them.

Pure numpy and integer arithmetic; no I/O, no clock, no randomness.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from fi_peer.incentives.scores import Decider

__all__ = ["accuracy_merit", "audit_hits", "binomial_critical"]

Array = npt.NDArray[np.float64]


def audit_hits(
    vectors: npt.ArrayLike, labels: npt.ArrayLike, decide: Decider
) -> npt.NDArray[np.int64]:
    """(K, n, L) opened vectors, (n,) labels -> (K,) audits each member got right alone."""
    arr = np.asarray(vectors, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if arr.ndim != 3 or y.shape != (arr.shape[1],):
        raise ValueError(f"vectors must be (K, n, L) and labels (n,), got {arr.shape}, {y.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("vectors contain NaN or infinity")
    if arr.shape[1] == 0:
        return np.zeros(arr.shape[0], dtype=np.int64)
    k, n, length = arr.shape
    labels_hat = np.asarray(decide(arr.reshape(k * n, length)), dtype=np.int64).reshape(k, n)
    out: npt.NDArray[np.int64] = (labels_hat == y[None, :]).sum(axis=1).astype(np.int64)
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
) -> Array:
    """Merit scores (non-negative, not normalised) from per-member audit ``hits``
    out of ``audits`` (one count for all, or one per member: committees vary);
    see the module docs. A member with no audits scores 0 (no audits at all:
    the reward rule then pays equal per share)."""
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
        passed |= seen & (s > 0)
    out: Array = np.where(passed, estimate, 0.0)
    return out
