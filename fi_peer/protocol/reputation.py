"""Committee choice by reputation (price, latency, contribution), with exploration.

Theory of operation
-------------------
Without a selector the querier takes the first k offers. With a
:class:`ReputationSelector` it waits for up to ``pool_size(k)`` offers (or the
offer window) and picks k by an upper confidence bound (UCB1), a bandit rule
that keeps giving new peers work::

    ucb_i = quality_i + c * sqrt(2 ln(N + 1) / n_i)      (n_i = 0: +infinity)

where ``N`` is the number of committee seats filled so far, ``n_i`` how often
peer i was chosen, and

    quality_i = w_c * contribution_i * delivery_i
                - w_p * price_i / max offered price
                - w_l * latency_i / max offered latency

``contribution_i`` is the peer's accuracy on opened audit answers, shrunk
towards the mean (AuditBook.accuracy, in [0, 1]; without the chance gate of
the merit rule, which zeroes everybody on few audits; the mean of the known
scores until the peer has one), ``delivery_i`` its share of delivered
answers when chosen (Laplace-smoothed), price and latency from its Offer. A
peer never chosen is tried first (infinite bonus), so new peers get work; a
lazy peer, once audited, has contribution 0 and loses its seat to peers that
do better, coming back only when its exploration bonus outgrows the gap.
Ties break by a random draw from the generator passed in. Pure: no I/O, no
clock.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fi_peer.protocol.messages import Offer

__all__ = ["ReputationSelector", "SelectorWeights"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SelectorWeights:
    contribution: float = 1.0
    price: float = 0.2
    latency: float = 0.1
    exploration: float = 0.5  # c in the UCB bonus
    oversample: float = 2.0  # offers waited for: ceil(k * oversample)


class ReputationSelector:
    """A querier's memory of peers, and its committee choice (see the module docs)."""

    def __init__(self, rng: np.random.Generator, weights: SelectorWeights | None = None) -> None:
        self.rng = rng
        self.weights = weights or SelectorWeights()
        self.chosen: Counter[str] = Counter()
        self.delivered: Counter[str] = Counter()
        self.contribution: dict[str, float] = {}
        self.seats = 0

    def pool_size(self, k: int) -> int:
        return max(k, math.ceil(k * self.weights.oversample))

    def set_contributions(self, scores: Mapping[str, float]) -> None:
        """Merit scores from audits (AuditBook.scores), clipped into [0, 1]."""
        for peer, s in scores.items():
            self.contribution[peer] = min(1.0, max(0.0, float(s)))

    def observe(self, committee: Iterable[str], delivered: Iterable[str]) -> None:
        """After a query: who was chosen, and who delivered an answer."""
        got = set(delivered)
        for peer in committee:
            self.delivered[peer] += peer in got

    def quality(self, peer: str, offer: Offer, max_price: int, max_latency: int) -> float:
        w = self.weights
        known = list(self.contribution.values())
        prior = float(np.mean(known)) if known else 1.0
        contribution = self.contribution.get(peer, prior)
        delivery = (self.delivered[peer] + 1) / (self.chosen[peer] + 2)
        price = offer.price_wei / max_price if max_price > 0 else 0.0
        latency = offer.expected_latency_ms / max_latency if max_latency > 0 else 0.0
        return w.contribution * contribution * delivery - w.price * price - w.latency * latency

    def choose(self, offers: Mapping[str, Offer], k: int) -> list[str]:
        """k of ``offers`` (fewer if fewer offered), best upper confidence bound first;
        records the choice."""
        peers = sorted(offers)
        if not peers or k <= 0:
            return []
        max_price = max(o.price_wei for o in offers.values())
        max_latency = max(o.expected_latency_ms for o in offers.values())
        log_n = math.log(self.seats + 1)
        ucb = []
        for peer in peers:
            n = self.chosen[peer]
            bonus = math.inf if n == 0 else self.weights.exploration * math.sqrt(2 * log_n / n)
            ucb.append(self.quality(peer, offers[peer], max_price, max_latency) + bonus)
        tiebreak = self.rng.random(len(peers))
        order = sorted(range(len(peers)), key=lambda i: (-ucb[i], tiebreak[i]))
        picked = [peers[i] for i in order[:k]]
        for peer in picked:
            self.chosen[peer] += 1
        self.seats += len(picked)
        return picked
