"""Reward rules used at settlement, the FI paper's label-free rules, and fairness.

Every rule returns per-member reward SHARES (float64, non-negative, summing
to 1); :func:`allocate` turns shares or integer weights into amounts in wei
that sum EXACTLY to the budget.

* :func:`equal_shares`: equal per delivered share (``delivered[i]`` = shares
  member i delivered in the window; all ones = plain equal split).
* :func:`merit_shares`: merit-weighted, ``delivered[i] * max(score_i, 0)``
  with ``score`` a contribution score (the accuracy merit of :mod:`.merit`,
  or a Shapley value of :mod:`.scores`). Negative
  scores earn nothing. When no member has a positive score (no audit yet, or
  nobody helps), it falls back to :func:`equal_shares` (a stated prior).
* :func:`agreement_shares` (FI paper, rule 2, label-free): with ``answers``
  the collective answer per query, ``r_k = sum_t 1[argmax p_kt = y_t] /
  |{j: argmax p_jt = y_t}|``; a query nobody agrees with pays nobody.
* :func:`entropy_shares` (FI paper, rule 3, label-free): ``r_k = sum_t
  w_kt`` with ``w_kt = exp(-H(p_kt)) / sum_j exp(-H(p_jt))``. Confidence is
  not accuracy: a member that answers with one-hot guesses gets the largest
  weight.

:func:`fairness` is the FI paper's ex-post score ``F = 1 - ||p - q||_1 / 2``
(1 - total variation) between merit ``p`` (:func:`merit_from_accuracy`: each
member's test accuracy over the sum of all) and reward shares ``q``.

Pure numpy and integer arithmetic: no I/O, no clock, no randomness.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from numbers import Rational

import numpy as np
import numpy.typing as npt

__all__ = [
    "REWARD_RULES",
    "agreement_shares",
    "allocate",
    "audit_rule_shares",
    "entropy_shares",
    "entropy_weights",
    "equal_shares",
    "fairness",
    "merit_from_accuracy",
    "merit_shares",
    "normalize",
    "settlement_amounts",
]

Array = npt.NDArray[np.float64]

REWARD_RULES = ("equal", "merit", "agreement", "entropy")
"""Rules a querier may select for settlement (agreement / entropy: for comparison)."""

_ENTROPY_EPS = 1e-12  # as the FI paper's reference code


def normalize(weights: npt.ArrayLike) -> Array:
    """Non-negative finite weights -> shares summing to 1 (ValueError if all zero)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must be a non-empty 1-D array, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    total = float(w.sum())
    if total <= 0:
        raise ValueError("weights sum to zero: no member to pay")
    out: Array = w / total
    return out


def _delivered(delivered: npt.ArrayLike | None, n: int | None) -> Array:
    if delivered is None:
        if n is None:
            raise ValueError("give delivered counts or the number of members")
        return np.ones(n)
    d = np.asarray(delivered, dtype=np.float64)
    if d.ndim != 1 or (n is not None and d.shape != (n,)):
        raise ValueError(f"delivered must be 1-D of length {n}, got shape {d.shape}")
    return d


def equal_shares(delivered: npt.ArrayLike | None = None, n_members: int | None = None) -> Array:
    """Equal pay per delivered share: shares proportional to ``delivered``."""
    return normalize(_delivered(delivered, n_members))


def merit_shares(scores: npt.ArrayLike, delivered: npt.ArrayLike | None = None) -> Array:
    """Pay proportional to ``delivered * max(score, 0)``; equal per delivered share
    when no member has a positive score."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError("scores must be a non-empty 1-D array of finite values")
    d = _delivered(delivered, s.size)
    w = d * np.maximum(s, 0.0)
    if float(w.sum()) <= 0:
        return equal_shares(d)
    return normalize(w)


def _probs(probs: npt.ArrayLike) -> Array:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 3 or p.shape[0] < 1 or p.shape[1] < 1 or p.shape[2] < 2:
        raise ValueError(f"probs must be (K, n, C) with C >= 2, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("probs must be finite and non-negative")
    return p


def agreement_shares(probs: npt.ArrayLike, answers: npt.ArrayLike) -> Array:
    """FI paper rule 2: each query's unit split among the members whose argmax
    equals the collective answer. (K, n, C) probs, (n,) answers -> (K,) shares;
    equal shares when no member ever agrees."""
    p = _probs(probs)
    y = np.asarray(answers, dtype=np.int64)
    if y.shape != (p.shape[1],):
        raise ValueError(f"answers must be ({p.shape[1]},), got {y.shape}")
    agree = (p.argmax(axis=2) == y[None, :]).astype(np.float64)  # (K, n)
    count = agree.sum(axis=0)
    per_query = np.divide(agree, count[None, :], out=np.zeros_like(agree), where=count > 0)
    total = per_query.sum(axis=1)
    if float(total.sum()) <= 0:
        return equal_shares(n_members=p.shape[0])
    return normalize(total)


def entropy_weights(probs: npt.ArrayLike) -> Array:
    """(K, n, C) -> (K, n): w_kt = exp(-H_kt) / (sum_j exp(-H_jt) + 1e-12)."""
    p = _probs(probs)
    entropy = -(p * np.log(p + _ENTROPY_EPS)).sum(axis=2)
    e = np.exp(-entropy)
    out: Array = e / (e.sum(axis=0, keepdims=True) + _ENTROPY_EPS)
    return out


def entropy_shares(probs: npt.ArrayLike) -> Array:
    """FI paper rule 3: r_k = sum_t w_kt (entropy weights), normalised."""
    return normalize(entropy_weights(probs).sum(axis=1))


def merit_from_accuracy(accuracy: npt.ArrayLike) -> Array:
    """FI paper merit: p_i = acc_i / sum_j acc_j, accuracies clipped at 0."""
    a = np.asarray(accuracy, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)):
        raise ValueError("accuracy must be a non-empty 1-D array of finite values")
    return normalize(np.maximum(a, 0.0))


def fairness(merit: npt.ArrayLike, shares: npt.ArrayLike) -> float:
    """F = 1 - ||p - q||_1 / 2 in [0, 1], both sides normalised to sum 1."""
    p, q = normalize(merit), normalize(shares)
    if p.shape != q.shape:
        raise ValueError(f"merit and shares differ in length: {p.shape} vs {q.shape}")
    return float(min(1.0, max(0.0, 1.0 - 0.5 * float(np.abs(p - q).sum()))))


def _exact(value: object) -> Fraction:
    if isinstance(value, bool):
        raise ValueError("weights must be numbers, not booleans")
    if isinstance(value, Rational):
        return Fraction(int(value.numerator), int(value.denominator))
    if isinstance(value, float | np.floating):
        f = float(value)
        if not np.isfinite(f):
            raise ValueError("weights must be finite")
        return Fraction(f)
    if isinstance(value, np.integer):
        return Fraction(int(value))
    raise ValueError(f"weight {value!r} is not a number")


def allocate(budget: int, weights: Sequence[object] | npt.ArrayLike) -> list[int]:
    """Split ``budget`` (wei, int >= 0) in proportion to ``weights``, exactly.

    Each member gets ``floor(budget * w_i / W)``; the remaining wei (fewer
    than the number of members) go one each to the largest fractional parts,
    ties to the lowest index (largest-remainder method). Floats are taken at
    their exact binary value (``Fraction(float)``), so the result is a pure
    function of the inputs. The amounts sum to ``budget``; a zero weight gets 0.
    """
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < 0:
        raise ValueError(f"budget must be an int >= 0 (wei), got {budget!r}")
    items = list(np.asarray(weights, dtype=object).reshape(-1))
    if not items:
        raise ValueError("need at least one weight")
    exact = [_exact(w) for w in items]
    if any(w < 0 for w in exact):
        raise ValueError("weights must be non-negative")
    total = sum(exact, Fraction(0))
    if total == 0:
        raise ValueError("weights sum to zero: no member to pay")
    b = int(budget)
    amounts: list[int] = []
    remainders: list[Fraction] = []
    for w in exact:
        share = b * w / total
        whole = share.numerator // share.denominator
        amounts.append(whole)
        remainders.append(share - whole)
    left = b - sum(amounts)
    order = sorted(range(len(exact)), key=lambda i: (-remainders[i], i))
    for i in order[:left]:
        amounts[i] += 1
    out = [int(a) for a in amounts]
    assert sum(out) == b
    return out


def settlement_amounts(
    price_wei: int,
    delivered: Sequence[bool],
    weights: Sequence[object] | npt.ArrayLike,
    *,
    min_share_wei: int,
) -> list[int]:
    """Per-seat pay of one query settled by a reward rule (``settleWeighted``).

    The delivered shares' money, ``n_delivered * price_wei``, is split exactly:
    every seat that delivered gets ``min_share_wei`` (the contract's floor),
    and the rest is :func:`allocate`-d in proportion to the weights of the
    seats that delivered; a seat that did not deliver gets 0 (its weight is
    ignored). When no delivered seat has a positive weight the split is equal
    (``price_wei`` each). The result passes the contract's checks by
    construction: floor, zeros and an exact sum.
    """
    if isinstance(price_wei, bool) or not isinstance(price_wei, int) or price_wei <= 0:
        raise ValueError(f"price_wei must be a positive int, got {price_wei!r}")
    if not 0 <= min_share_wei <= price_wei:
        raise ValueError("min_share_wei must be in 0..price_wei")
    w = list(np.asarray(weights, dtype=object).reshape(-1))
    if len(w) != len(delivered):
        raise ValueError(f"{len(w)} weights for {len(delivered)} seats")
    seats = [i for i, d in enumerate(delivered) if d]
    out = [0] * len(delivered)
    if not seats:
        return out
    exact = [_exact(w[i]) for i in seats]
    if any(x < 0 for x in exact):
        raise ValueError("weights must be non-negative")
    if sum(exact, Fraction(0)) == 0:
        exact = [Fraction(1)] * len(seats)
    rest = len(seats) * (price_wei - min_share_wei)
    for i, extra in zip(seats, allocate(rest, exact), strict=True):
        out[i] = min_share_wei + extra
    return out


def audit_rule_shares(
    rule: str, distributions: Mapping[str, npt.ArrayLike], collective: int
) -> dict[str, float]:
    """One opened audit's reward shares under a label-free rule, per member.

    ``distributions``: each member's own decided distribution over the classes
    (from its opened vector); ``collective``: the committee's answer.
    ``agreement``: the query's unit split among the members whose argmax is the
    collective answer (:func:`agreement_shares` on one query; nobody agrees:
    nobody scores); ``entropy``: the entropy weights of :func:`entropy_weights`.
    A querier sums (or averages) these per member over its audits.
    """
    members = sorted(distributions)
    if not members:
        return {}
    probs = np.stack([np.asarray(distributions[m], dtype=np.float64) for m in members])
    probs = probs[:, None, :]  # (K, 1, C)
    if rule == "agreement":
        p = _probs(probs)
        agree = p[:, 0, :].argmax(axis=1) == int(collective)
        count = int(agree.sum())
        shares = agree / count if count else np.zeros(len(members))
    elif rule == "entropy":
        shares = entropy_weights(probs)[:, 0]
    else:
        raise ValueError(f"{rule!r} is not a label-free rule (agreement, entropy)")
    return {m: float(v) for m, v in zip(members, shares, strict=True)}
