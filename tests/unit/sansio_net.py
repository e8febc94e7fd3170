"""A deterministic, synchronous network of PeerCores for sans-io tests.

Effects are delivered in FIFO order; timers fire when the test advances the
fake clock. Models are plain functions ``x -> vector``. A peer may get a
PrivacyGuard (its budget) and a seeded noise generator; the net carries out a
Charge effect at once, with that guard, and reports back like a driver must.
A peer may also get a Payments object (paid queries); the net then carries out
OpenEscrow / VerifyEscrow against an in-memory escrow book (``escrows``),
which a test may make fail (``escrow_fails``), and keeps every Paid effect.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import msgpack
import numpy as np

from fi_peer.identity import Identity
from fi_peer.protocol.effects import (
    Charge,
    Effect,
    Evaluate,
    OpenEscrow,
    Paid,
    Publish,
    QueryDone,
    QueryOutcome,
    Send,
    SetTimer,
    VerifyEscrow,
)
from fi_peer.protocol.guard import PrivacyGuard
from fi_peer.protocol.messages import ModelCard
from fi_peer.protocol.payment import EscrowTerms, Payments
from fi_peer.protocol.peer import CoreConfig, PeerCore

Model = Callable[[np.ndarray, str], np.ndarray]


def card(n_classes: int = 3, input_dim: int = 4, *, he: bool = False) -> ModelCard:
    return ModelCard(
        task="toy",
        n_classes=n_classes,
        input_dim=input_dim,
        arch="fn",
        model_hash=b"\x00" * 32,
        rules=("soft", "vote"),
        he=he,
    )


@dataclass
class SansIoNet:
    now_ms: int = 1_000_000
    cores: dict[str, PeerCore] = field(default_factory=dict)
    models: dict[str, Model | None] = field(default_factory=dict)
    subs: dict[str, set[str]] = field(default_factory=dict)
    queue: deque[tuple[str, Effect]] = field(default_factory=deque)
    timers: list[tuple[int, int, str, Hashable]] = field(default_factory=list)
    done: dict[bytes, QueryOutcome] = field(default_factory=dict)
    outcomes: list[QueryOutcome] = field(default_factory=list)  # every QueryDone, in order
    drop: Callable[[str, str, bytes], bool] = lambda src, dst, data: False
    # (querier address lowercased, query id) -> terms, as a chain would hold them
    escrows: dict[tuple[str, bytes], EscrowTerms] = field(default_factory=dict)
    escrow_fails: Callable[[EscrowTerms], bool] = lambda terms: False
    paid: list[tuple[str, Paid]] = field(default_factory=list)  # (member, effect)
    # (peer, "open_escrow" | "verify_escrow" | message kind sent) in order
    trace: list[tuple[str, str]] = field(default_factory=list)
    _tie: itertools.count = field(default_factory=itertools.count)
    _latest_timer: dict[tuple[str, Hashable], int] = field(default_factory=dict)

    def add(
        self,
        name: str,
        model: Model | None,
        config: CoreConfig | None = None,
        n_classes: int = 3,
        *,
        guard: PrivacyGuard | None = None,
        rng: np.random.Generator | None = None,
        payments: Payments | None = None,
    ) -> PeerCore:
        core = PeerCore(
            Identity.from_seed(name.encode()),
            card(n_classes),
            config=config,
            guard=guard,
            rng=rng,
            payments=payments,
        )
        self.cores[core.peer_id] = core
        self.models[core.peer_id] = model
        for topic in core.topics():
            self.subs.setdefault(topic, set()).add(core.peer_id)
        self.queue.extend((core.peer_id, e) for e in core.start(self.now_ms))
        return core

    def run(self) -> None:
        while self.queue:
            origin, effect = self.queue.popleft()
            self._apply(origin, effect)

    def _apply(self, origin: str, effect: Effect) -> None:
        match effect:
            case Publish(topic, data):
                for peer in sorted(self.subs.get(topic, ())):
                    if peer != origin and not self.drop(origin, peer, data):
                        self._feed(peer, self.cores[peer].receive(data, self.now_ms, topic=topic))
            case Send(peer, data):
                if peer in self.cores and not self.drop(origin, peer, data):
                    self._feed(peer, self.cores[peer].receive(data, self.now_ms))
            case SetTimer(key, at_ms):
                self._latest_timer[(origin, key)] = at_ms
                heapq.heappush(self.timers, (at_ms, next(self._tie), origin, key))
            case Evaluate(x=x, rule=rule):
                model = self.models[origin]
                core = self.cores[origin]
                if model is None:
                    self._feed(origin, core.evaluation_failed(effect, self.now_ms))
                else:
                    self._feed(origin, core.evaluated(effect, model(x, rule), self.now_ms))
            case Charge(querier, request, sigma):
                core = self.cores[origin]
                guard = core.responder.guard
                assert guard is not None, "a Charge comes only from a peer with a guard"
                refusal = guard.charge(querier, request, sigma, self.now_ms)
                self._feed(origin, core.charged(effect, refusal, self.now_ms))
            case OpenEscrow(terms):
                self.trace.append((origin, "open_escrow"))
                ok = not self.escrow_fails(terms)
                if ok:
                    self.escrows[(terms.querier.lower(), terms.query_id)] = terms
                core = self.cores[origin]
                self._feed(origin, core.escrow_opened(terms.query_id, ok, self.now_ms))
            case VerifyEscrow(querier, terms):
                self.trace.append((origin, "verify_escrow"))
                held = self.escrows.get((terms.querier.lower(), terms.query_id))
                ok = held is not None and _same_terms(held, terms)
                core = self.cores[origin]
                key = (querier, terms.query_id)
                self._feed(origin, core.escrow_verified(key, ok, self.now_ms))
            case Paid():
                self.paid.append((origin, effect))
            case QueryDone(outcome):
                self.done[outcome.query_id] = outcome
                self.outcomes.append(outcome)

    def _feed(self, origin: str, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Send):
                self.trace.append((origin, _kind(e.data)))
        self.queue.extend((origin, e) for e in effects)

    def deliver(self, peer: str, data: bytes, *, topic: str | None = None) -> list[Effect]:
        """Hand ``data`` to ``peer`` now, as if from outside the net; queue its effects."""
        effects = self.cores[peer].receive(data, self.now_ms, topic=topic)
        self._feed(peer, effects)
        return effects

    def advance(self, ms: int) -> None:
        """Move the clock, firing due timers in order, delivering as we go."""
        target = self.now_ms + ms
        self.run()
        while self.timers and self.timers[0][0] <= target:
            at, _, origin, key = heapq.heappop(self.timers)
            if self._latest_timer.get((origin, key)) != at:
                continue  # replaced by a later SetTimer for the same key
            self.now_ms = max(self.now_ms, at)
            self._feed(origin, self.cores[origin].on_timer(key, self.now_ms))
            self.run()
        self.now_ms = target


def _same_terms(a: EscrowTerms, b: EscrowTerms) -> bool:
    """Equal as the escrow compares them (committee as a set of addresses)."""
    return (
        a.querier.lower() == b.querier.lower()
        and sorted(m.lower() for m in a.committee) == sorted(m.lower() for m in b.committee)
        and (a.price_wei, a.deadline_s) == (b.price_wei, b.deadline_s)
    )


def _kind(data: bytes) -> str:
    kind = msgpack.unpackb(data, raw=False)[1]
    return str(kind)
