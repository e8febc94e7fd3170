"""One query, as the querier sees it.

Theory of operation::

    OFFERS --enough_offers / offer_window_end (>= min_committee)--> ANSWERS
    OFFERS --offer_window_end (< min_committee)--------------------> FAILED
    ANSWERS --all_answered / deadline (>= threshold shares)--------> DONE
    ANSWERS --deadline (< threshold) / too_many_declines----------> FAILED

The querier gossips a QueryRequest (no input) and takes the first ``k`` Offers
at or below its price cap; if the offer window (at most half the time budget)
closes first, it takes those it has, provided there are ``min_committee``. Late
offers are told ``not_selected`` so the peer frees the capacity it reserved.
Choosing by reputation comes with the incentives work; today the price cap is
the filter and arrival order (the fastest peers) the choice. Each member gets
an Accept with the committee, the threshold and the input sealed to it alone.
Each Share is acknowledged with a Receipt. The result is the sum of the
delivered contributions (plus the querier's own when ``include_self``); with
fewer than ``threshold`` shares at the deadline the query fails with a reason,
so no query can hang.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fi_peer.errors import LocalProtocolError, UnexpectedMessage
from fi_peer.identity import Identity
from fi_peer.protocol import fixedpoint
from fi_peer.protocol.effects import Effect, Evaluate, QueryDone, QueryOutcome, Send, SetTimer
from fi_peer.protocol.envelope import seal
from fi_peer.protocol.messages import (
    Accept,
    Decline,
    Member,
    Offer,
    QueryRequest,
    Receipt,
    Result,
    Share,
)
from fi_peer.protocol.sealing import seal_input


class QState(enum.Enum):
    OFFERS = "offers"
    ANSWERS = "answers"
    DONE = "done"
    FAILED = "failed"


class QEvent(enum.Enum):
    ENOUGH_OFFERS = "enough_offers"
    OFFER_WINDOW_END = "offer_window_end"
    TOO_FEW_OFFERS = "too_few_offers"
    ALL_ANSWERED = "all_answered"
    DEADLINE = "deadline"
    TOO_FEW_ANSWERS = "too_few_answers"


_TRANSITIONS: dict[tuple[QState, QEvent], QState] = {
    (QState.OFFERS, QEvent.ENOUGH_OFFERS): QState.ANSWERS,
    (QState.OFFERS, QEvent.OFFER_WINDOW_END): QState.ANSWERS,
    (QState.OFFERS, QEvent.TOO_FEW_OFFERS): QState.FAILED,
    (QState.ANSWERS, QEvent.ALL_ANSWERED): QState.DONE,
    (QState.ANSWERS, QEvent.DEADLINE): QState.DONE,
    (QState.ANSWERS, QEvent.TOO_FEW_ANSWERS): QState.FAILED,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class QuerierConfig:
    offer_window_ms: int = 1000
    min_committee: int = 2
    include_self: bool = True

    def threshold(self, committee_size: int) -> int:
        """Shares needed for a result: a strict majority of the committee."""
        return committee_size // 2 + 1


class QuerySession:
    def __init__(
        self,
        identity: Identity,
        request: QueryRequest,
        x: npt.NDArray[np.float32],
        config: QuerierConfig,
        now_ms: int,
    ) -> None:
        if x.shape != (request.input_dim,):
            raise LocalProtocolError(f"input must have shape ({request.input_dim},)")
        self.identity = identity
        self.request = request
        self.x = x
        self.config = config
        self.started_ms = now_ms
        self.state = QState.OFFERS
        self.offers: dict[str, Offer] = {}
        self.committee: tuple[Member, ...] = ()
        self.threshold = 0
        self.shares: dict[str, fixedpoint.Words] = {}
        self.declined: set[str] = set()
        self.local: fixedpoint.Words | None = None
        self.local_pending = config.include_self

    @property
    def query_id(self) -> bytes:
        return self.request.query_id

    @property
    def offers_timer(self) -> tuple[str, bytes]:
        return ("q-offers", self.query_id)

    @property
    def deadline_timer(self) -> tuple[str, bytes]:
        return ("q-deadline", self.query_id)

    @property
    def finished(self) -> bool:
        return self.state in (QState.DONE, QState.FAILED)

    def _goto(self, event: QEvent) -> None:
        try:
            self.state = _TRANSITIONS[(self.state, event)]
        except KeyError:  # pragma: no cover - a bug in this module, not input
            raise LocalProtocolError(f"no transition from {self.state} on {event}") from None

    def start(self) -> list[Effect]:
        # Leave at least half of the time budget for answering.
        half_budget = (self.request.deadline_ms - self.started_ms) // 2
        window = min(self.config.offer_window_ms, half_budget)
        effects: list[Effect] = [
            SetTimer(self.offers_timer, self.started_ms + window),
            SetTimer(self.deadline_timer, self.request.deadline_ms),
        ]
        if self.config.include_self:
            effects.append(
                Evaluate(
                    self.query_id,
                    self.x,
                    self.request.rule,
                    self.request.vector_len,
                    self.identity.peer_id,
                )
            )
        return effects

    # -- offers ---------------------------------------------------------------
    def on_offer(self, sender: str, offer: Offer, now_ms: int) -> list[Effect]:
        if sender in self.offers:
            raise UnexpectedMessage("second offer from one peer")
        if offer.price_wei > self.request.max_price_wei:
            raise UnexpectedMessage("offer above the maximum price")
        if self.state is not QState.OFFERS:  # committee already chosen
            late = Result(query_id=self.query_id, ok=False, reason="not_selected")
            return [Send(sender, seal(self.identity, late, now_ms))]
        self.offers[sender] = offer
        if len(self.offers) >= self.request.k:
            self._goto(QEvent.ENOUGH_OFFERS)
            return self._accept(now_ms)
        return []

    def on_offers_timer(self, now_ms: int) -> list[Effect]:
        if self.state is not QState.OFFERS:
            return []
        if len(self.offers) < self.config.min_committee:
            self._goto(QEvent.TOO_FEW_OFFERS)
            return self._fail(f"too_few_offers_{len(self.offers)}", now_ms)
        self._goto(QEvent.OFFER_WINDOW_END)
        return self._accept(now_ms)

    def _accept(self, now_ms: int) -> list[Effect]:
        chosen = list(self.offers.items())  # never more than k: see on_offer
        self.committee = tuple(Member(peer_id=p, box_key=o.box_key) for p, o in chosen)
        self.threshold = self.config.threshold(len(self.committee))
        effects: list[Effect] = []
        for peer, offer in chosen:
            accept = Accept(
                query_id=self.query_id,
                committee=self.committee,
                threshold=self.threshold,
                price_wei=offer.price_wei,
                answer_deadline_ms=self.request.deadline_ms,
                escrow_ref=b"",
                noise_sigma=0.0,
                sealed_input=seal_input(
                    self.identity.box_key, offer.box_key, self.query_id, self.x
                ),
            )
            effects.append(Send(peer, seal(self.identity, accept, now_ms)))
        return effects

    # -- answers --------------------------------------------------------------
    def _member(self, sender: str) -> bool:
        return any(m.peer_id == sender for m in self.committee)

    def on_share(self, sender: str, share: Share, now_ms: int) -> list[Effect]:
        if self.state is not QState.ANSWERS or not self._member(sender):
            raise UnexpectedMessage("share from a peer outside the committee")
        if sender in self.shares or sender in self.declined:
            raise UnexpectedMessage("second answer from one member")
        if len(share.vector) != 8 * self.request.vector_len:
            raise UnexpectedMessage("share has the wrong vector length")
        self.shares[sender] = fixedpoint.from_bytes(share.vector)
        price = self.offers[sender].price_wei
        receipt = Receipt(
            query_id=self.query_id,
            member=sender,
            share_digest=hashlib.sha256(share.vector).digest(),
            price_wei=price,
        )
        return [Send(sender, seal(self.identity, receipt, now_ms)), *self._maybe_finish(now_ms)]

    def on_decline(self, sender: str, decline: Decline, now_ms: int) -> list[Effect]:
        if self.state is QState.OFFERS and sender in self.offers:
            del self.offers[sender]
            return []
        if self.state is not QState.ANSWERS or not self._member(sender):
            raise UnexpectedMessage("decline from a peer outside the committee")
        if sender in self.shares or sender in self.declined:
            raise UnexpectedMessage("second answer from one member")
        self.declined.add(sender)
        if len(self.committee) - len(self.declined) < self.threshold:
            self._goto(QEvent.TOO_FEW_ANSWERS)
            return self._fail(f"declined_{len(self.declined)}_of_{len(self.committee)}", now_ms)
        return self._maybe_finish(now_ms)

    def on_local(self, vector: npt.ArrayLike, now_ms: int) -> list[Effect]:
        if not self.local_pending:
            raise LocalProtocolError("no local evaluation was requested for this query")
        try:
            words = fixedpoint.encode(vector)
        except ValueError:
            return self.on_local_failed(now_ms)
        if words.shape != (self.request.vector_len,):
            return self.on_local_failed(now_ms)
        self.local_pending = False
        if self.finished:
            return []
        self.local = words
        return self._maybe_finish(now_ms)

    def on_local_failed(self, now_ms: int) -> list[Effect]:
        """The querier's own model could not answer: go on without it."""
        self.local_pending = False
        return [] if self.finished else self._maybe_finish(now_ms)

    def _maybe_finish(self, now_ms: int) -> list[Effect]:
        answered = len(self.shares) + len(self.declined)
        complete = answered == len(self.committee) and not self.local_pending
        if self.state is QState.ANSWERS and complete:
            self._goto(QEvent.ALL_ANSWERED)
            return self._succeed(now_ms)
        return []

    def on_deadline(self, now_ms: int) -> list[Effect]:
        if self.state is QState.OFFERS:  # only if the offers timer could not run first
            self._goto(QEvent.TOO_FEW_OFFERS)
            return self._fail("deadline_before_committee", now_ms)
        if self.state is not QState.ANSWERS:
            return []
        if len(self.shares) < self.threshold:
            self._goto(QEvent.TOO_FEW_ANSWERS)
            return self._fail(f"too_few_shares_{len(self.shares)}_of_{self.threshold}", now_ms)
        self._goto(QEvent.DEADLINE)
        return self._succeed(now_ms)

    # -- endings --------------------------------------------------------------
    def _notify(self, result: Result, now_ms: int) -> list[Effect]:
        data = seal(self.identity, result, now_ms)
        return [Send(m.peer_id, data) for m in self.committee]

    def _succeed(self, now_ms: int) -> list[Effect]:
        contributors = tuple(sorted(self.shares))
        total = np.zeros(self.request.vector_len, dtype=np.uint64)
        for words in self.shares.values():
            total = fixedpoint.add(total, words)
        if self.local is not None:
            total = fixedpoint.add(total, self.local)
        outcome = QueryOutcome(
            query_id=self.query_id,
            ok=True,
            reason="ok",
            total=fixedpoint.decode(total),
            contributors=contributors,
            committee_size=len(self.committee),
            elapsed_ms=now_ms - self.started_ms,
        )
        result = Result(query_id=self.query_id, ok=True, contributors=contributors)
        return [*self._notify(result, now_ms), QueryDone(outcome)]

    def _fail(self, reason: str, now_ms: int) -> list[Effect]:
        outcome = QueryOutcome(
            query_id=self.query_id,
            ok=False,
            reason=reason,
            total=None,
            contributors=(),
            committee_size=len(self.committee),
            elapsed_ms=now_ms - self.started_ms,
        )
        result = Result(query_id=self.query_id, ok=False, reason=reason)
        return [*self._notify(result, now_ms), QueryDone(outcome)]
