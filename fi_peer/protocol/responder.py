"""One query, as a committee member sees it.

Theory of operation::

    (request seen) --offer--> OFFERED --accept--> EVALUATING --evaluated--> ANSWERED
    OFFERED --expiry (no accept by the deadline)-----------------------------> gone
    EVALUATING --evaluation failed--> (decline sent) -----------------------> gone
    ANSWERED --result / expiry----------------------------------------------> gone

A member offers on a QueryRequest it can serve (task, shape, rule, price,
free capacity), and only then accepts an Accept from that same querier, in
which it must be listed with its own key. It opens the input sealed to it,
asks its driver to evaluate the model, and answers with a Share. Receipts for
delivered shares are kept: they are what the member is paid against.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fi_peer.errors import UnexpectedMessage
from fi_peer.identity import Identity
from fi_peer.protocol import fixedpoint
from fi_peer.protocol.effects import Effect, Evaluate, Send, SetTimer
from fi_peer.protocol.envelope import seal
from fi_peer.protocol.messages import (
    Accept,
    Decline,
    ModelCard,
    Offer,
    QueryRequest,
    Receipt,
    Result,
    Share,
)
from fi_peer.protocol.sealing import open_input

# How long after a query's deadline a member keeps its state (clock skew slack).
GRACE_MS = 5_000

SessionKey = tuple[str, bytes]  # (querier peer id, query id): query ids are the querier's choice


class RState(enum.Enum):
    OFFERED = "offered"
    EVALUATING = "evaluating"
    ANSWERED = "answered"


_NEXT: dict[RState, RState] = {
    RState.OFFERED: RState.EVALUATING,
    RState.EVALUATING: RState.ANSWERED,
}


@dataclass(slots=True)
class MemberSession:
    querier: str
    request: QueryRequest
    state: RState
    price_wei: int
    share_digest: bytes = b""
    receipt: Receipt | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponderConfig:
    price_wei: int = 0
    capacity: int = 64
    expected_latency_ms: int = 50
    # An offer not accepted within this time is forgotten (frees capacity).
    offer_ttl_ms: int = 10_000
    # Requests whose deadline lies further ahead are refused: a far deadline
    # would otherwise hold a slot of our capacity for as long as it says.
    max_query_ms: int = 120_000


class Responder:
    def __init__(self, identity: Identity, card: ModelCard, config: ResponderConfig) -> None:
        self.identity = identity
        self.card = card
        self.config = config
        self.sessions: dict[SessionKey, MemberSession] = {}
        self.receipts: list[Receipt] = []

    @staticmethod
    def timer_key(key: SessionKey) -> tuple[str, str, bytes]:
        return ("r-expire", key[0], key[1])

    def can_serve(self, request: QueryRequest, now_ms: int) -> str | None:
        """Why this peer will not offer (None when it will)."""
        card = self.card
        if request.task != card.task or request.n_classes != card.n_classes:
            return "task_mismatch"
        if request.input_dim != card.input_dim:
            return "shape_mismatch"
        if request.rule not in card.rules:
            return "rule_unsupported"
        if request.max_price_wei < self.config.price_wei:
            return "price_too_low"
        if request.deadline_ms > now_ms + self.config.max_query_ms:
            return "deadline_too_far"
        if len(self.sessions) >= self.config.capacity:
            return "busy"
        return None

    def on_request(self, sender: str, request: QueryRequest, now_ms: int) -> list[Effect]:
        key = (sender, request.query_id)
        if sender == self.identity.peer_id or key in self.sessions:
            return []
        if request.deadline_ms <= now_ms:
            raise UnexpectedMessage("query request already past its deadline")
        if self.can_serve(request, now_ms) is not None:
            return []
        self.sessions[key] = MemberSession(sender, request, RState.OFFERED, self.config.price_wei)
        offer = Offer(
            query_id=request.query_id,
            price_wei=self.config.price_wei,
            box_key=self.identity.box_public_key,
            expected_latency_ms=self.config.expected_latency_ms,
        )
        expiry = min(request.deadline_ms, now_ms + self.config.offer_ttl_ms)
        return [
            Send(sender, seal(self.identity, offer, now_ms)),
            SetTimer(self.timer_key(key), expiry),
        ]

    def _session(self, key: SessionKey, state: RState | None) -> MemberSession:
        session = self.sessions.get(key)
        if session is None:
            raise UnexpectedMessage("no query of this querier is open here")
        if state is not None and session.state is not state:
            raise UnexpectedMessage(f"message not expected in state {session.state.value}")
        return session

    def on_accept(self, sender: str, accept: Accept, now_ms: int) -> list[Effect]:
        key = (sender, accept.query_id)
        session = self._session(key, RState.OFFERED)
        me = [m for m in accept.committee if m.peer_id == self.identity.peer_id]
        if not me or me[0].box_key != self.identity.box_public_key:
            raise UnexpectedMessage("accept does not list this peer with its key")
        if accept.price_wei < session.price_wei:
            raise UnexpectedMessage("accept below the offered price")
        request = session.request
        x = open_input(
            self.identity.box_key,
            request.reply_key,
            request.query_id,
            accept.sealed_input,
            request.input_dim,
        )
        session.price_wei = accept.price_wei
        session.state = _NEXT[session.state]
        return [
            Evaluate(request.query_id, x, request.rule, request.vector_len, sender),
            SetTimer(self.timer_key(key), request.deadline_ms + GRACE_MS),
        ]

    def on_evaluated(self, key: SessionKey, vector: npt.ArrayLike, now_ms: int) -> list[Effect]:
        session = self.sessions.get(key)
        if session is None or session.state is not RState.EVALUATING:
            return []  # expired or cancelled meanwhile: nothing to send
        try:
            words = fixedpoint.encode(np.asarray(vector, dtype=np.float64))
        except ValueError:
            return self.on_evaluation_failed(key, now_ms, reason="bad_vector")
        if words.shape != (session.request.vector_len,):
            return self.on_evaluation_failed(key, now_ms, reason="bad_vector")
        session.state = _NEXT[session.state]
        data = fixedpoint.to_bytes(words)
        session.share_digest = hashlib.sha256(data).digest()
        share = Share(query_id=key[1], vector=data, commitment=b"")
        return [Send(session.querier, seal(self.identity, share, now_ms))]

    def on_evaluation_failed(
        self, key: SessionKey, now_ms: int, reason: str = "model_error"
    ) -> list[Effect]:
        session = self.sessions.pop(key, None)
        if session is None:
            return []
        decline = Decline(query_id=key[1], reason=reason)
        return [Send(session.querier, seal(self.identity, decline, now_ms))]

    def on_receipt(self, sender: str, receipt: Receipt, now_ms: int) -> list[Effect]:
        session = self._session((sender, receipt.query_id), RState.ANSWERED)
        if receipt.member != self.identity.peer_id or session.receipt is not None:
            raise UnexpectedMessage("receipt not for this member, or a second one")
        if receipt.share_digest != session.share_digest:
            raise UnexpectedMessage("receipt is for another share than the one we sent")
        if receipt.price_wei != session.price_wei:
            raise UnexpectedMessage("receipt is not for the agreed price")
        session.receipt = receipt
        self.receipts.append(receipt)
        return []

    def on_result(self, sender: str, result: Result, now_ms: int) -> list[Effect]:
        key = (sender, result.query_id)
        self._session(key, None)
        del self.sessions[key]
        return []

    def on_expire(self, key: SessionKey, now_ms: int) -> list[Effect]:
        self.sessions.pop(key, None)
        return []
