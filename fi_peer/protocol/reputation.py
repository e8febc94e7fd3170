"""Committee choice by reputation (price, latency, contribution), with exploration.

Theory of operation
-------------------
Without a selector the querier takes the first k offers (arrival order). With a
:class:`ReputationSelector` it keeps collecting offers for a short choice window
after the k-th acceptable one (``[query] choice_grace_ms``; never past the offer
window, and no longer once ``pool_size(k)`` offers are in), then picks k by an
upper confidence bound (UCB1), a bandit rule that keeps giving new peers work::

    ucb_i = quality_i + c * sqrt(2 ln(N + 1) / n_i)      (n_i = 0: +infinity)

where ``N`` is the number of committee seats filled so far, ``n_i`` how often
peer i was chosen, and

    quality_i = w_c * contribution_i * delivery_i
                - w_p * price_i / max_price_wei          (the querier's cap)
                - w_l * latency_i / max(pool latencies, latency_floor_ms)

* ``contribution_i``: the peer's accuracy on opened audit answers, shrunk
  towards the mean (AuditBook.accuracy, in [0, 1]; not the merit rule's score,
  whose chance gate zeroes everybody on few audits); the mean of the known
  scores until the peer has one (1 when nobody is audited).
* ``delivery_i``: its share of delivered answers when chosen, Laplace-smoothed;
  a Decline (budget, capacity: an honest refusal) counts half, a silent drop
  (no answer by the end of the query) nothing.
* ``latency_i``: what the querier observed of the peer, EWMAs over queries of
  its offer delay (request sent -> Offer in) plus its answer latency (Accept
  sent -> key shares or Share in); before its first answer, the latency its
  Offer states. Differences below ``latency_floor_ms`` barely count.

A peer never chosen is tried first (infinite bonus), so new peers get work; a
slow or lazy peer (once audited, contribution near chance) loses its seat to
peers that do better, and comes back when its exploration bonus outgrows the
gap, so it is chosen less but never starved. Ties break by a draw from the
generator passed in: given the seed, the choice is deterministic. Pure: no I/O,
no clock (the querier session passes the times it saw).

The store is bounded (``max_peers``, least recently seen evicted) since peer
ids cost nothing to make. :meth:`to_json` / :meth:`load_json` carry it across
restarts (the daemon keeps it in ``reputation.json``, written at shutdown: a
cache, so a crash only loses what was learnt since the start); contribution is
not in it (it comes back from scores.json).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fi_peer.protocol.messages import Offer

REPUTATION_VERSION = 1

__all__ = [
    "COMMITTEE_CHOICES",
    "REPUTATION_VERSION",
    "PeerStats",
    "ReputationSelector",
    "SelectorWeights",
]

# [query] committee_choice: "reputation" (this module) or "first" (arrival order).
COMMITTEE_CHOICES = ("reputation", "first")


@dataclass(frozen=True, slots=True, kw_only=True)
class SelectorWeights:
    contribution: float = 1.0
    price: float = 0.3
    latency: float = 0.3
    exploration: float = 0.5  # c in the UCB bonus
    oversample: float = 2.0  # choose at once when ceil(k * oversample) offers are in
    ewma: float = 0.3  # weight of a new latency sample
    latency_floor_ms: float = 100.0  # latencies are compared relative to at least this
    declined_credit: float = 0.5  # a Decline counts as this much of a delivery


@dataclass(slots=True)
class PeerStats:
    """What a querier saw of one peer."""

    chosen: int = 0
    delivered: int = 0
    declined: int = 0
    dropped: int = 0
    offers: int = 0
    offer_delay_ms: float | None = None  # EWMA
    answer_ms: float | None = None  # EWMA

    @property
    def outcomes(self) -> int:
        return self.delivered + self.declined + self.dropped


class ReputationSelector:
    """A querier's memory of peers, and its committee choice (see the module docs)."""

    def __init__(
        self,
        rng: np.random.Generator,
        weights: SelectorWeights | None = None,
        *,
        max_peers: int = 10_000,
    ) -> None:
        self.rng = rng
        self.weights = weights or SelectorWeights()
        self.max_peers = max_peers
        self.peers: OrderedDict[str, PeerStats] = OrderedDict()
        self.contribution: dict[str, float] = {}
        self.seats = 0

    # -- the store --------------------------------------------------------------
    def _stats(self, peer: str) -> PeerStats:
        stats = self.peers.get(peer)
        if stats is None:
            stats = self.peers[peer] = PeerStats()
            while len(self.peers) > self.max_peers:
                old, _ = self.peers.popitem(last=False)
                self.contribution.pop(old, None)
        else:
            self.peers.move_to_end(peer)
        return stats

    def stats(self, peer: str) -> PeerStats:
        """A copy-free view (a fresh empty record for an unknown peer, not stored)."""
        return self.peers.get(peer) or PeerStats()

    def pool_size(self, k: int) -> int:
        return max(k, math.ceil(k * self.weights.oversample))

    def set_contributions(self, scores: Mapping[str, float]) -> None:
        """Audit accuracy (AuditBook.accuracy), clipped into [0, 1]."""
        for peer, s in scores.items():
            value = float(s)
            self.contribution[peer] = min(1.0, max(0.0, value)) if math.isfinite(value) else 0.0

    def _ewma(self, old: float | None, sample: float) -> float:
        sample = max(0.0, float(sample))
        return sample if old is None else old + self.weights.ewma * (sample - old)

    def observe_offer(self, peer: str, delay_ms: float) -> None:
        """An Offer came ``delay_ms`` after the request left."""
        stats = self._stats(peer)
        stats.offers += 1
        stats.offer_delay_ms = self._ewma(stats.offer_delay_ms, delay_ms)

    def observe_answer(self, peer: str, latency_ms: float) -> None:
        """A chosen peer's first answer (key shares or Share) came ``latency_ms``
        after its Accept left."""
        stats = self._stats(peer)
        stats.answer_ms = self._ewma(stats.answer_ms, latency_ms)

    def observe_outcome(
        self,
        delivered: Iterable[str] = (),
        declined: Iterable[str] = (),
        dropped: Iterable[str] = (),
    ) -> None:
        """After a query: which chosen members delivered, declined or stayed silent."""
        for peer in delivered:
            self._stats(peer).delivered += 1
        for peer in declined:
            self._stats(peer).declined += 1
        for peer in dropped:
            self._stats(peer).dropped += 1

    def observe(self, committee: Iterable[str], delivered: Iterable[str]) -> None:
        """Shorthand: the members of ``committee`` not in ``delivered`` dropped."""
        got = set(delivered)
        members = list(committee)
        self.observe_outcome(
            delivered=[p for p in members if p in got],
            dropped=[p for p in members if p not in got],
        )

    # -- scores -------------------------------------------------------------------
    def contribution_of(self, peer: str) -> float:
        known = self.contribution.get(peer)
        if known is not None:
            return known
        return float(np.mean(list(self.contribution.values()))) if self.contribution else 1.0

    def delivery(self, peer: str) -> float:
        s = self.stats(peer)
        credit = s.delivered + self.weights.declined_credit * s.declined
        return (credit + 1) / (s.outcomes + 2)

    def latency(self, peer: str, offer: Offer) -> float:
        s = self.stats(peer)
        answer = s.answer_ms if s.answer_ms is not None else float(offer.expected_latency_ms)
        return (s.offer_delay_ms or 0.0) + answer

    def quality(self, peer: str, offer: Offer, max_price: int, max_latency: float) -> float:
        w = self.weights
        merit = self.contribution_of(peer) * self.delivery(peer)
        price = offer.price_wei / max_price if max_price > 0 else 0.0
        latency = self.latency(peer, offer) / max(max_latency, w.latency_floor_ms, 1e-9)
        return w.contribution * merit - w.price * price - w.latency * latency

    def choose(self, offers: Mapping[str, Offer], k: int, *, max_price: int = 0) -> list[str]:
        """k of ``offers`` (fewer if fewer offered), best upper confidence bound first;
        records the choice. ``max_price``: the querier's cap (0: the dearest offer)."""
        peers = sorted(offers)
        if not peers or k <= 0:
            return []
        cap = max_price if max_price > 0 else max(o.price_wei for o in offers.values())
        max_latency = max(self.latency(p, offers[p]) for p in peers)
        log_n = math.log(self.seats + 1)
        ucb = []
        for peer in peers:
            n = self.stats(peer).chosen
            bonus = math.inf if n == 0 else self.weights.exploration * math.sqrt(2 * log_n / n)
            ucb.append(self.quality(peer, offers[peer], cap, max_latency) + bonus)
        tiebreak = self.rng.random(len(peers))
        order = sorted(range(len(peers)), key=lambda i: (-ucb[i], tiebreak[i]))
        picked = [peers[i] for i in order[:k]]
        for peer in picked:
            self._stats(peer).chosen += 1
        self.seats += len(picked)
        return picked

    # -- persistence -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "version": REPUTATION_VERSION,
            "seats": self.seats,
            "peers": {
                peer: [s.chosen, s.delivered, s.declined, s.dropped, s.offers,
                       s.offer_delay_ms, s.answer_ms]
                for peer, s in self.peers.items()
            },
        }  # fmt: skip

    def load_json(self, doc: Any) -> None:
        """Restore :meth:`to_json`'s output; ValueError (and nothing changed) if it
        is not one."""
        if not isinstance(doc, dict) or doc.get("version") != REPUTATION_VERSION:
            raise ValueError(f"not a version-{REPUTATION_VERSION} reputation file")
        peers: OrderedDict[str, PeerStats] = OrderedDict()
        try:
            for peer, row in dict(doc["peers"]).items():
                counts = [int(v) for v in row[:5]]
                ms = [None if v is None else float(v) for v in row[5:7]]
                if len(row) != 7 or min(counts) < 0 or any(
                    v is not None and not (math.isfinite(v) and v >= 0) for v in ms
                ):
                    raise ValueError(f"bad row for {peer!r}")
                peers[str(peer)] = PeerStats(*counts, *ms)
            seats = int(doc["seats"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed reputation file: {exc}") from exc
        while len(peers) > self.max_peers:
            peers.popitem(last=False)
        self.peers, self.seats = peers, max(0, seats)

    # -- status ---------------------------------------------------------------------
    def table(self, limit: int = 100) -> list[dict[str, Any]]:
        """Per peer (most chosen first, at most ``limit``): what the choice uses."""
        rows: list[dict[str, Any]] = []
        for peer, s in self.peers.items():
            rows.append(
                {
                    "peer_id": peer,
                    "chosen": s.chosen,
                    "delivered": s.delivered,
                    "declined": s.declined,
                    "dropped": s.dropped,
                    "offers": s.offers,
                    "offer_delay_ms": _rounded(s.offer_delay_ms),
                    "answer_ms": _rounded(s.answer_ms),
                    "delivery": round(self.delivery(peer), 4),
                    "contribution": (
                        round(self.contribution[peer], 4) if peer in self.contribution else None
                    ),
                }
            )
        rows.sort(key=lambda r: (-r["chosen"], r["peer_id"]))
        return rows[:limit]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
