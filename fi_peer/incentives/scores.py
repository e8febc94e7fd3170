"""Contribution scores over opened audit answers: leave-one-out and Shapley.

Theory of operation
-------------------
An audit query is an ordinary query whose label the querier knows. After the
answer, the querier asks the members to open their commitments for audit
queries only, so it learns each member's own vector ``v_i(x_t)`` for the audit
queries ``t`` (and nothing else). From those it can replay the secure sum of
any coalition ``S`` and decide it with the aggregation rule in use: the value
of a coalition is its collective accuracy on the audit queries,

    v(S) = (1/n) sum_t 1[ decide( sum_{i in S} v_i(x_t) ) = y_t ],

and ``v(empty)`` is a stated constant (default: chance, ``1 / n_classes``: a
committee that says nothing is guessing). A smoother variant (``proba``
given) values a coalition by the mean probability its decided distribution
puts on the true label: the expected accuracy of a decision drawn from that
distribution. It moves with every member's vector, not only when an argmax
flips, so scores from a short window are less noisy.

* Leave-one-out: ``phi_i = v(N) - v(N minus i)``. Cheap (K + 1 values) but
  blind to redundancy: two members holding the same data both score ~0.
* Shapley: the average marginal contribution over all orders of arrival.
  Efficient (the scores sum to ``v(N) - v(empty)``), symmetric (members whose
  answers are interchangeable score the same), and a null member (its vector
  never changes any coalition's decision) scores 0. :func:`exact_shapley`
  enumerates the ``2^K`` coalitions (fine up to K ~ 16);
  :func:`monte_carlo_shapley` samples permutations (with their reverses, an
  antithetic pair, to cut the variance) and truncates a permutation once the
  prefix is within ``tolerance`` of ``v(N)`` (TMC-Shapley, Ghorbani and Zou
  2019): the remaining members' marginals are taken as 0, so each
  permutation's marginals still sum to ``v(prefix) - v(empty)``, within
  ``tolerance`` of ``v(N) - v(empty)``; ``tolerance=0`` gives exact efficiency
  per permutation.

Everything is deterministic: coalition values are cached by bitmask; random
permutations come from a ``numpy.random.Generator`` seeded by the caller's
``seed``. Pure numpy: no torch, no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import combinations

import numpy as np
import numpy.typing as npt

__all__ = [
    "CoalitionAccuracy",
    "Decider",
    "Distribution",
    "ValueFunction",
    "audit_contributions",
    "exact_shapley",
    "leave_one_out",
    "monte_carlo_shapley",
]

Array = npt.NDArray[np.float64]
Decider = Callable[[Array], npt.NDArray[np.int64]]
"""(n, L) summed vectors -> (n,) labels (e.g. ``AggregationRule.decide_batch(s)[0]``)."""
Distribution = Callable[[Array], Array]
"""(n, L) summed vectors -> (n, C) distributions (``AggregationRule.decide_batch(s)[1]``)."""


class ValueFunction:
    """A cooperative game over ``n_players`` players, queried by coalition.

    Subclasses implement :meth:`_value` for a non-empty coalition given as a
    sorted tuple of player indices; values are cached by bitmask.
    """

    def __init__(self, n_players: int, empty_value: float) -> None:
        if n_players < 1:
            raise ValueError(f"need at least one player, got {n_players}")
        if not math.isfinite(empty_value):
            raise ValueError("empty_value must be finite")
        self.n_players = n_players
        self.empty_value = float(empty_value)
        self._cache: dict[int, float] = {0: self.empty_value}

    @property
    def evaluations(self) -> int:
        """How many distinct coalitions have been valued so far (incl. the empty one)."""
        return len(self._cache)

    def mask(self, coalition: Iterable[int]) -> int:
        bits = 0
        for i in coalition:
            if not 0 <= int(i) < self.n_players:
                raise ValueError(f"player {i} out of range [0, {self.n_players})")
            bits |= 1 << int(i)
        return bits

    def value_of_mask(self, bits: int) -> float:
        cached = self._cache.get(bits)
        if cached is None:
            members = tuple(i for i in range(self.n_players) if bits >> i & 1)
            cached = float(self._value(members))
            self._cache[bits] = cached
        return cached

    def __call__(self, coalition: Iterable[int]) -> float:
        return self.value_of_mask(self.mask(coalition))

    def grand_value(self) -> float:
        return self.value_of_mask((1 << self.n_players) - 1)

    def _value(self, members: tuple[int, ...]) -> float:
        raise NotImplementedError


class CoalitionAccuracy(ValueFunction):
    """v(S) = collective accuracy of coalition S on the audit queries.

    ``vectors``: (K, n, L) the members' opened vectors on n audit queries;
    ``labels``: (n,) the known labels; ``decide``: summed vectors -> labels.
    ``empty_value`` None: chance, ``1 / n_classes``. With ``proba`` (summed
    vectors -> distributions) the value is the mean probability of the true
    label instead of the 0/1 accuracy (see the module docs).
    """

    def __init__(
        self,
        vectors: npt.ArrayLike,
        labels: npt.ArrayLike,
        decide: Decider,
        *,
        n_classes: int,
        empty_value: float | None = None,
        proba: Distribution | None = None,
    ) -> None:
        arr = np.asarray(vectors, dtype=np.float64)
        if arr.ndim != 3:
            raise ValueError(f"vectors must be (K, n, L), got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("vectors contain NaN or infinity")
        y = np.asarray(labels, dtype=np.int64)
        if y.shape != (arr.shape[1],) or y.size == 0:
            raise ValueError(f"labels must be ({arr.shape[1]},) and non-empty, got {y.shape}")
        if n_classes < 2:
            raise ValueError(f"need at least 2 classes, got {n_classes}")
        super().__init__(arr.shape[0], 1.0 / n_classes if empty_value is None else empty_value)
        self.vectors = arr
        self.labels = y
        self.decide = decide
        self.proba = proba

    def _value(self, members: tuple[int, ...]) -> float:
        total = self.vectors[list(members)].sum(axis=0)
        if self.proba is not None:
            dist = np.asarray(self.proba(total), dtype=np.float64)
            return float(np.mean(dist[np.arange(self.labels.size), self.labels]))
        return float(np.mean(self.decide(total) == self.labels))


def _check_game(game: ValueFunction) -> int:
    if game.n_players < 1:
        raise ValueError("the game has no players")
    return game.n_players


def leave_one_out(game: ValueFunction) -> Array:
    """phi_i = v(N) - v(N minus {i}) for every player i."""
    k = _check_game(game)
    full = (1 << k) - 1
    grand = game.value_of_mask(full)
    return np.array([grand - game.value_of_mask(full & ~(1 << i)) for i in range(k)])


def exact_shapley(game: ValueFunction) -> Array:
    """The Shapley value by enumerating every coalition (2^K values)."""
    k = _check_game(game)
    if k > 20:
        raise ValueError(f"exact Shapley over {k} players is too costly; use monte_carlo_shapley")
    weights = [math.factorial(s) * math.factorial(k - s - 1) / math.factorial(k) for s in range(k)]
    phi = np.zeros(k)
    for i in range(k):
        others = [j for j in range(k) if j != i]
        acc = 0.0
        for size in range(k):
            for subset in combinations(others, size):
                bits = game.mask(subset)
                acc += weights[size] * (
                    game.value_of_mask(bits | 1 << i) - game.value_of_mask(bits)
                )
        phi[i] = acc
    return phi


def _walk(
    game: ValueFunction, order: Sequence[int], grand: float, tolerance: float, out: Array
) -> None:
    """Add the marginals of one permutation to ``out`` (truncated at ``tolerance``)."""
    bits = 0
    previous = game.empty_value
    for i in order:
        if tolerance > 0 and abs(grand - previous) <= tolerance:
            return  # the rest of the permutation adds (almost) nothing
        bits |= 1 << i
        current = game.value_of_mask(bits)
        out[i] += current - previous
        previous = current


def monte_carlo_shapley(
    game: ValueFunction,
    *,
    permutations: int = 200,
    tolerance: float = 0.0,
    seed: int | Sequence[int] = 0,
) -> Array:
    """Truncated Monte-Carlo Shapley: mean marginals over sampled permutations.

    ``permutations`` orders are drawn from ``numpy.random.default_rng(seed)``
    in antithetic pairs (an order and its reverse); ``tolerance`` is the
    truncation threshold on ``|v(N) - v(prefix)|`` (0: no truncation).
    Deterministic for a given ``seed``.
    """
    k = _check_game(game)
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be finite and >= 0, got {tolerance}")
    rng = np.random.default_rng(seed)
    grand = game.grand_value()
    total = np.zeros(k)
    done = 0
    while done < permutations:
        order = [int(i) for i in rng.permutation(k)]
        _walk(game, order, grand, tolerance, total)
        done += 1
        if done < permutations:
            _walk(game, order[::-1], grand, tolerance, total)
            done += 1
    return total / permutations


def audit_contributions(
    vectors: Mapping[str, npt.ArrayLike],
    label: int,
    decide: Decider,
    *,
    n_classes: int,
    proba: Distribution | None = None,
    permutations: int = 64,
    tolerance: float = 0.01,
    seed: int | Sequence[int] = 0,
) -> tuple[dict[str, float], dict[str, float]]:
    """Leave-one-out and truncated Monte-Carlo Shapley scores of the members of
    ONE audit query: ``vectors`` maps each member that opened to its vector,
    ``label`` is the known answer. The game is :class:`CoalitionAccuracy` over
    this one query (``proba`` given: the probability the coalition's decided
    distribution puts on the label, which moves with every vector). Committees
    differ from query to query, so a querier averages these per member over the
    audits each member took part in."""
    members = sorted(vectors)
    if not members:
        return {}, {}
    stacked = np.stack([np.asarray(vectors[m], dtype=np.float64) for m in members])
    game = CoalitionAccuracy(stacked[:, None, :], [label], decide, n_classes=n_classes, proba=proba)
    loo = leave_one_out(game)
    phi = monte_carlo_shapley(game, permutations=permutations, tolerance=tolerance, seed=seed)
    return (
        {m: float(v) for m, v in zip(members, loo, strict=True)},
        {m: float(v) for m, v in zip(members, phi, strict=True)},
    )
