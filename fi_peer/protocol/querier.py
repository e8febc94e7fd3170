"""One query, as the querier sees it.

Theory of operation::

    OFFERS --committee chosen, paid query (OpenEscrow)-----------> ESCROW
    ESCROW --escrow opened: as OFFERS on committee chosen------> KEYS / ANSWERS
    ESCROW --escrow failed / deadline---------------------------> FAILED
    OFFERS --committee chosen, secagg----------------------------> KEYS
    OFFERS --committee chosen, plaintext-------------------------> ANSWERS
    OFFERS --offer window ends with < min_committee offers-------> FAILED
    KEYS --all key shares / keys timer with >= t (relay U1)-----> ANSWERS
    KEYS --keys timer with < t / too many declines--------------> FAILED
    ANSWERS --all shares / deadline, plaintext (>= t)-----------> DONE
    ANSWERS --all masked shares / shares timer, secagg (>= t)---> UNMASK
    ANSWERS --< t shares / too many declines--------------------> FAILED
    UNMASK --t reveals, all if any dropped (sum rebuilt; own vector in or deadline)-> DONE
    UNMASK --deadline with < t reveals / refusals / bad reveal---> FAILED

The querier gossips a QueryRequest (no input) and collects Offers at or below
its price cap. With ``committee_choice = "first"`` (no selector) it takes the
first ``k`` (arrival order); with ``"reputation"`` (a ReputationSelector,
reputation.py) it waits after the ``k``-th offer for at most ``choice_grace_ms``
more (never past the offer window; at once when ``pool_size(k)`` are in) and
chooses ``k`` by price, observed latency and audit contribution, with
exploration. If the offer window (at most half the time budget) closes first,
it takes those it has, provided there are ``min_committee``. Offers not chosen
and late offers are told ``not_selected`` so the peer frees the capacity it
reserved. The session tells its selector what it saw: each offer's delay, each
member's answer latency, and at the end who delivered, declined or dropped.
Each member gets
an Accept with the committee (long-term keys and per-query mask nonces), the
threshold ``t`` (a strict majority), the noise scale and the input sealed to
it alone. Each Share is acknowledged with a Receipt.

Secure aggregation (the default; fi_peer.privacy.secagg): the members' key
shares arrive while their models run; when all are in, or at the keys timer
with at least ``t``, the querier relays to each member of U1 the ciphertexts
addressed to it (members left out are told ``excluded``). Masked shares are
collected until all of U1 answered or the shares timer; then each survivor
is asked to Unmask (the first ``t + unmask_spares`` of them when no one dropped,
the rest after a refusal or a grace) and the sum is rebuilt from the first
``t`` Reveals (from
every survivor's when a member dropped since the relay: only a survivor can
give its pair seed with the dropped; more than ``t - 2`` dropped fails). The
time budget is split so every round has its own timer and all end by the
deadline: keys at most ``keys_window_ms`` (and half of what precedes the
unmask reserve; a grace after the ``t``-th key shares), unmask at most
``unmask_window_ms`` (and a quarter of the time left at Accept). With fewer
than ``t`` at any round the query fails with a reason, so no query can hang.
The result is the sum of the contributions (plus the querier's own vector
when ``include_self``, added in the clear: it is the querier's own).

Paid queries (a ``Payments`` object given and a non-zero price; see
payment.py): offers must name distinct Ethereum addresses; the committee is
paid one price per share (the highest chosen offer, never above the cap);
the escrow is opened (``OpenEscrow``) before any Accept, hence any input,
leaves; each Receipt carries the querier's EIP-712 signature; the outcome
names the escrow and the members who delivered, for settlement.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from fi_peer.errors import LocalProtocolError, UnexpectedMessage
from fi_peer.identity import Identity
from fi_peer.privacy import secagg
from fi_peer.protocol import fixedpoint
from fi_peer.protocol.effects import (
    Effect,
    Evaluate,
    OpenEscrow,
    QueryDone,
    QueryOutcome,
    Send,
    SetTimer,
)
from fi_peer.protocol.envelope import seal
from fi_peer.protocol.he_messages import HERequest
from fi_peer.protocol.messages import (
    Accept,
    Decline,
    KeyRelay,
    KeyShares,
    Member,
    Message,
    ModelCard,
    Offer,
    QueryRequest,
    Receipt,
    Result,
    Reveal,
    Share,
    Unmask,
)
from fi_peer.protocol.payment import EscrowTerms, Payments
from fi_peer.protocol.reputation import ReputationSelector
from fi_peer.protocol.sealing import seal_input


def check_offer_address(eth_address: str, taken: Iterable[str]) -> None:
    """An offer for a paid query (default and HE mode) names the address its member
    is paid to, and not one that another offer (``taken``) named."""
    if not eth_address:
        raise UnexpectedMessage("offer without an address for a paid query")
    if eth_address.lower() in {e.lower() for e in taken}:
        raise UnexpectedMessage("offer with another member's address")


def escrow_for(
    payments: Payments | None,
    request: QueryRequest | HERequest,
    committee_eths: tuple[str, ...],
    price_wei: int,
) -> EscrowTerms:
    """The escrow a paid query's querier opens (default and HE mode) for its
    committee's addresses at one ``price_wei`` per member."""
    assert payments is not None
    return EscrowTerms(
        query_id=request.query_id,
        querier=payments.eth_address,
        committee=committee_eths,
        price_wei=price_wei,
        deadline_s=payments.escrow_deadline_s(request.deadline_ms),
    )


def check_noise(epsilon: float, noise_sigma: float) -> None:
    """A query's noise as its querier states it (default and HE mode): finite,
    >= 0, and > 0 when members spend privacy (``epsilon`` > 0)."""
    if not (np.isfinite(noise_sigma) and 0 <= noise_sigma <= 1e9):
        raise LocalProtocolError("noise_sigma must be finite and >= 0")
    if epsilon > 0 and noise_sigma == 0:
        raise LocalProtocolError("a query with epsilon > 0 needs noise (noise_sigma > 0)")


def request_fields(
    card: ModelCard,
    identity: Identity,
    *,
    query_id: bytes,
    rule: str,
    vector_len: int,
    k: int,
    max_price_wei: int,
    deadline_ms: int,
    epsilon: float,
    delta: float,
) -> dict[str, Any]:
    """The fields a gossiped request has in both modes (QueryRequest, HERequest):
    the query's terms, this peer's model card and its reply key."""
    return {
        "query_id": query_id,
        "task": card.task,
        "n_classes": card.n_classes,
        "input_dim": card.input_dim,
        "rule": rule,
        "vector_len": vector_len,
        "k": k,
        "max_price_wei": max_price_wei,
        "deadline_ms": deadline_ms,
        "reply_key": identity.box_public_key,
        "epsilon": epsilon,
        "delta": delta,
    }


def query_done(
    query_id: bytes,
    reason: str,
    *,
    total: npt.NDArray[np.float64] | None,
    contributors: tuple[str, ...],
    committee_size: int,
    elapsed_ms: int,
    payment: tuple[EscrowTerms | None, tuple[str, ...]],
) -> QueryDone:
    """How a querier session ends, in the default and the HE mode (he_query.py):
    ok with the ``total``, or failed (``total`` None, no contributors) for ``reason``;
    ``payment`` is the session's (escrow, delivered)."""
    escrow, delivered = payment
    return QueryDone(
        QueryOutcome(
            query_id=query_id,
            ok=total is not None,
            reason=reason,
            total=total,
            contributors=contributors,
            committee_size=committee_size,
            elapsed_ms=elapsed_ms,
            escrow=escrow,
            delivered=delivered,
        )
    )


def _in_range(words: fixedpoint.Words, members: int) -> bool:
    """Whether ``words`` can be the sum of ``members`` honest contributions."""
    bound = members * fixedpoint.MAX_ABS_VALUE
    return bool(np.all(np.abs(fixedpoint.decode(words)) <= bound))


@lru_cache(maxsize=4096)
def _usable_box_key(key: bytes) -> bool:
    """Long-term keys come back query after query: check each once."""
    return secagg.usable_public_key(key)


class QState(enum.Enum):
    OFFERS = "offers"
    ESCROW = "escrow"
    KEYS = "keys"
    ANSWERS = "answers"
    UNMASK = "unmask"
    DONE = "done"
    FAILED = "failed"


class QEvent(enum.Enum):
    COMMITTEE_PLAIN = "committee_plain"
    COMMITTEE_SECAGG = "committee_secagg"
    TOO_FEW_OFFERS = "too_few_offers"
    ESCROW_PENDING = "escrow_pending"
    ESCROW_FAILED = "escrow_failed"
    KEYS_IN = "keys_in"
    TOO_FEW_KEYS = "too_few_keys"
    ALL_ANSWERED = "all_answered"
    DEADLINE = "deadline"
    SHARES_IN = "shares_in"
    TOO_FEW_ANSWERS = "too_few_answers"
    UNMASKED = "unmasked"
    UNMASK_FAILED = "unmask_failed"


_TRANSITIONS: dict[tuple[QState, QEvent], QState] = {
    (QState.OFFERS, QEvent.COMMITTEE_PLAIN): QState.ANSWERS,
    (QState.OFFERS, QEvent.COMMITTEE_SECAGG): QState.KEYS,
    (QState.OFFERS, QEvent.TOO_FEW_OFFERS): QState.FAILED,
    (QState.OFFERS, QEvent.ESCROW_PENDING): QState.ESCROW,
    (QState.ESCROW, QEvent.COMMITTEE_PLAIN): QState.ANSWERS,
    (QState.ESCROW, QEvent.COMMITTEE_SECAGG): QState.KEYS,
    (QState.ESCROW, QEvent.ESCROW_FAILED): QState.FAILED,
    (QState.KEYS, QEvent.KEYS_IN): QState.ANSWERS,
    (QState.KEYS, QEvent.TOO_FEW_KEYS): QState.FAILED,
    (QState.ANSWERS, QEvent.ALL_ANSWERED): QState.DONE,
    (QState.ANSWERS, QEvent.DEADLINE): QState.DONE,
    (QState.ANSWERS, QEvent.SHARES_IN): QState.UNMASK,
    (QState.ANSWERS, QEvent.TOO_FEW_ANSWERS): QState.FAILED,
    (QState.UNMASK, QEvent.UNMASKED): QState.DONE,
    (QState.UNMASK, QEvent.UNMASK_FAILED): QState.FAILED,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class QuerierConfig:
    offer_window_ms: int = 1000
    min_committee: int = 2
    include_self: bool = True
    # Secure aggregation (members refuse plaintext queries unless their owner opts in).
    secure_aggregation: bool = True
    # Key round (secagg), from the moment the Accepts leave: wait for every member's
    # key shares for at most ``keys_window_ms`` (never more than half of the time
    # before the unmask reserve); once ``t`` are in, wait only a grace for the rest:
    # ``keys_grace_ms`` or half of what the first ``t`` took, whichever is longer
    # (adapts to a loaded network). A fixed 1 s window failed ~40 % of the queries
    # with too_few_key_shares under load (benchmarks/load.py).
    keys_window_ms: int = 4000
    keys_grace_ms: int = 200
    # Time kept for the unmask round at the end of the time budget.
    unmask_window_ms: int = 1000
    # Unmask requests go to the first ``t + unmask_spares`` survivors (by share
    # arrival) when no member dropped, as any ``t`` reveals rebuild the sum; the
    # rest are asked at once on a refusal, or ``unmask_grace_ms`` later if the
    # sum is not rebuilt by then. With a dropped member every survivor is asked.
    unmask_spares: int = 1
    unmask_grace_ms: int = 200
    # Committee choice by reputation (with a selector): after the k-th offer, wait
    # at most this long for more to choose from (0: choose among the first k).
    choice_grace_ms: int = 100

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
        *,
        noise_sigma: float = 0.0,
        payments: Payments | None = None,
        selector: ReputationSelector | None = None,
    ) -> None:
        if x.shape != (request.input_dim,):
            raise LocalProtocolError(f"input must have shape ({request.input_dim},)")
        self.identity = identity
        self.request = request
        self.x = x
        self.config = config
        self.noise_sigma = noise_sigma
        self.started_ms = now_ms
        self.state = QState.OFFERS
        self.offers: dict[str, Offer] = {}
        self.committee: tuple[Member, ...] = ()
        self.index: dict[str, int] = {}
        self.threshold = 0
        self.shares: dict[str, fixedpoint.Words] = {}
        self.declined: set[str] = set()  # gave up before answering (Decline)
        self.refused: set[str] = set()  # refused to reveal (secagg)
        self.unmask_pending: list[int] = []  # survivors not asked to reveal yet
        self.notified: set[str] = set()
        self.local: fixedpoint.Words | None = None
        self.local_pending = config.include_self
        self.aggregator: secagg.Aggregator | None = None
        self.masked_total: fixedpoint.Words | None = None
        self.payments = payments
        # Committee choice by reputation (reputation.py); None: the first k offers.
        self.selector = selector
        self.escrow: EscrowTerms | None = None  # set once the committee is chosen (paid)
        self.escrow_open = False
        self.prices: dict[str, int] = {}
        self.keys_round = (0, 0)  # (Accepts sent, keys timer at most), ms: _send_accepts
        self.offers_end = now_ms  # the offer window's end (start)
        self.accepts_at: int | None = None  # when the Accepts left (answer latency)

    @property
    def paid_mode(self) -> bool:
        """Offers must carry addresses: payments are configured and the cap is not zero."""
        return self.payments is not None and self.request.max_price_wei > 0

    @property
    def query_id(self) -> bytes:
        return self.request.query_id

    @property
    def secagg(self) -> bool:
        return self.request.secagg

    @property
    def offers_timer(self) -> tuple[str, bytes]:
        return ("q-offers", self.query_id)

    @property
    def keys_timer(self) -> tuple[str, bytes]:
        return ("q-keys", self.query_id)

    @property
    def shares_timer(self) -> tuple[str, bytes]:
        return ("q-shares", self.query_id)

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

    def _send(self, peer: str, message: Message, now_ms: int) -> Send:
        # Per-query messages to a member whose box key its signed Offer gave are
        # MAC'd instead of signed (envelope.MAC_KINDS; seal decides by kind).
        offer = self.offers.get(peer)
        to = None if offer is None else (peer, offer.box_key)
        return Send(peer, seal(self.identity, message, now_ms, to=to))

    def start(self) -> list[Effect]:
        # Leave at least half of the time budget for answering.
        half_budget = (self.request.deadline_ms - self.started_ms) // 2
        window = min(self.config.offer_window_ms, half_budget)
        self.offers_end = self.started_ms + window
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
        if (len(offer.mask_key) > 0) != self.secagg:
            raise UnexpectedMessage("offer without a mask nonce for secure aggregation (or one)")
        if not _usable_box_key(offer.box_key):
            raise UnexpectedMessage("offer with a key X25519 cannot use")
        if self.paid_mode:
            check_offer_address(offer.eth_address, (o.eth_address for o in self.offers.values()))
        if self.selector is not None:
            self.selector.observe_offer(sender, now_ms - self.started_ms)
        if self.state is not QState.OFFERS:  # committee already chosen
            late = Result(query_id=self.query_id, ok=False, reason="not_selected")
            return [self._send(sender, late, now_ms)]
        self.offers[sender] = offer
        k = self.request.k
        if self.selector is None:
            return self._accept(now_ms) if len(self.offers) >= k else []
        grace = self.config.choice_grace_ms
        if len(self.offers) >= self.selector.pool_size(k) or (len(self.offers) >= k and grace <= 0):
            return self._accept(now_ms)
        if len(self.offers) == k and now_ms + grace < self.offers_end:
            # the choice window: the offers timer moves up to the grace's end
            return [SetTimer(self.offers_timer, now_ms + grace)]
        return []

    def on_offers_timer(self, now_ms: int) -> list[Effect]:
        if self.state is not QState.OFFERS:
            return []
        if len(self.offers) < self.request.k and now_ms < self.offers_end:
            # the choice window closed after an offer was withdrawn: back to the window
            return [SetTimer(self.offers_timer, self.offers_end)]
        if len(self.offers) < self.config.min_committee:
            self._goto(QEvent.TOO_FEW_OFFERS)
            return self._fail(f"too_few_offers_{len(self.offers)}", now_ms)
        return self._accept(now_ms)

    def _accept(self, now_ms: int) -> list[Effect]:
        chosen = list(self.offers.items())  # never more than k without a selector: see on_offer
        passed: list[Effect] = []
        if self.selector is not None:
            picked = self.selector.choose(
                self.offers, self.request.k, max_price=self.request.max_price_wei
            )
            chosen = [(p, self.offers[p]) for p in picked]
            not_selected = Result(query_id=self.query_id, ok=False, reason="not_selected")
            passed = [self._send(p, not_selected, now_ms) for p in self.offers if p not in picked]
            for p in list(self.offers):
                if p not in picked:
                    del self.offers[p]
        price = max(o.price_wei for _, o in chosen)
        paid = self.paid_mode and price > 0
        self.committee = tuple(
            Member(
                peer_id=p,
                box_key=o.box_key,
                mask_key=o.mask_key,
                eth_address=o.eth_address if paid else "",
            )
            for p, o in chosen
        )
        self.index = {m.peer_id: i for i, m in enumerate(self.committee)}
        self.threshold = self.config.threshold(len(self.committee))
        # Paid: one price per share for the whole committee (the escrow's terms).
        self.prices = {p: price if paid else o.price_wei for p, o in chosen}
        if paid:
            eths = tuple(m.eth_address for m in self.committee)
            self.escrow = escrow_for(self.payments, self.request, eths, price)
            self._goto(QEvent.ESCROW_PENDING)
            return [*passed, OpenEscrow(self.escrow)]
        return [*passed, *self._send_accepts(now_ms)]

    def on_escrow_opened(self, ok: bool, now_ms: int) -> list[Effect]:
        """The driver's answer to OpenEscrow: the Accepts (and inputs) leave only now."""
        if self.state is not QState.ESCROW:
            return []  # the query ended meanwhile (deadline)
        if not ok:
            self._goto(QEvent.ESCROW_FAILED)
            return self._fail("escrow_failed", now_ms)
        self.escrow_open = True
        return self._send_accepts(now_ms)

    def _send_accepts(self, now_ms: int) -> list[Effect]:
        chosen = [(m.peer_id, self.offers[m.peer_id]) for m in self.committee]
        self.accepts_at = now_ms
        escrow = self.escrow
        effects: list[Effect] = []
        if self.secagg:
            self._goto(QEvent.COMMITTEE_SECAGG)
            self.aggregator = secagg.Aggregator(
                context=secagg.session_context(self.identity.peer_id, self.query_id),
                committee=[
                    secagg.Participant(m.peer_id, m.box_key, m.mask_key) for m in self.committee
                ],
                threshold=self.threshold,
            )
            deadline = self.request.deadline_ms
            unmask_window = min(self.config.unmask_window_ms, (deadline - now_ms) // 4)
            shares_end = deadline - unmask_window
            keys_end = now_ms + min(self.config.keys_window_ms, (shares_end - now_ms) // 2)
            self.keys_round = (now_ms, keys_end)
            effects += [
                SetTimer(self.keys_timer, keys_end),
                SetTimer(self.shares_timer, shares_end),
            ]
        else:
            self._goto(QEvent.COMMITTEE_PLAIN)
        for peer, offer in chosen:
            accept = Accept(
                query_id=self.query_id,
                committee=self.committee,
                threshold=self.threshold,
                price_wei=self.prices[peer],
                answer_deadline_ms=self.request.deadline_ms,
                escrow_ref=b"",
                noise_sigma=self.noise_sigma,
                sealed_input=seal_input(
                    self.identity.box_key, offer.box_key, self.query_id, self.x
                ),
                querier_eth="" if escrow is None else escrow.querier,
                escrow_deadline_s=0 if escrow is None else escrow.deadline_s,
            )
            effects.append(self._send(peer, accept, now_ms))
        return effects

    # -- key shares (secagg) ---------------------------------------------------
    def _member(self, sender: str) -> bool:
        return sender in self.index

    def on_key_shares(self, sender: str, shares: KeyShares, now_ms: int) -> list[Effect]:
        agg = self.aggregator
        if self.state is not QState.KEYS or agg is None or not self._member(sender):
            raise UnexpectedMessage("key shares outside the key round or from a non-member")
        if sender in self.declined:
            raise UnexpectedMessage("key shares from a member that declined")
        try:
            agg.add_key_shares(self.index[sender], shares.ciphertexts, shares.commitment)
        except secagg.SecAggError as exc:
            raise UnexpectedMessage(f"bad key shares: {exc}") from exc
        if self._all_keyed():
            return self._relay(now_ms)
        return self._keys_grace(now_ms)

    def _keys_grace(self, now_ms: int) -> list[Effect]:
        """With exactly ``t`` key shares in, move the keys timer up to the grace."""
        if len(self._keyed() - self.declined) != self.threshold:
            return []
        opened, keys_end = self.keys_round
        grace = max(self.config.keys_grace_ms, (now_ms - opened) // 2)
        return [SetTimer(self.keys_timer, min(keys_end, now_ms + grace))]

    def _keyed(self) -> set[str]:
        assert self.aggregator is not None
        return {self.committee[i].peer_id for i in self.aggregator.keyed}

    def _all_keyed(self) -> bool:
        return len((self._keyed() | self.declined) & set(self.index)) == len(self.committee)

    def on_keys_timer(self, now_ms: int) -> list[Effect]:
        if self.state is not QState.KEYS:
            return []
        return self._relay(now_ms)

    def _relay(self, now_ms: int) -> list[Effect]:
        agg = self.aggregator
        assert agg is not None
        keyed = len(self._keyed() - self.declined)
        if keyed < self.threshold:
            self._goto(QEvent.TOO_FEW_KEYS)
            return self._fail(f"too_few_key_shares_{keyed}_of_{self.threshold}", now_ms)
        u1 = agg.fix_u1(exclude=[self.index[p] for p in self.declined])
        self._goto(QEvent.KEYS_IN)
        effects: list[Effect] = []
        for i in u1:
            relay = KeyRelay(query_id=self.query_id, u1=u1, ciphertexts=agg.relay_for(i))
            effects.append(self._send(self.committee[i].peer_id, relay, now_ms))
        excluded = Result(query_id=self.query_id, ok=False, reason="excluded")
        for i, m in enumerate(self.committee):
            if i not in u1 and m.peer_id not in self.declined:
                self.notified.add(m.peer_id)
                effects.append(self._send(m.peer_id, excluded, now_ms))
        return effects

    # -- answers --------------------------------------------------------------
    def _expected(self) -> set[str]:
        """Members whose answer we wait for (U1 under secagg, else the committee)."""
        if self.aggregator is not None and self.aggregator.u1 is not None:
            return {self.committee[i].peer_id for i in self.aggregator.u1}
        return set(self.index)

    def on_share(self, sender: str, share: Share, now_ms: int) -> list[Effect]:
        if self.state is not QState.ANSWERS or sender not in self._expected():
            raise UnexpectedMessage("share from a peer outside the committee (or U1)")
        if sender in self.shares or sender in self.declined:
            raise UnexpectedMessage("second answer from one member")
        if len(share.vector) != 8 * self.request.vector_len:
            raise UnexpectedMessage("share has the wrong vector length")
        words = fixedpoint.from_bytes(share.vector)
        if self.aggregator is not None:
            try:
                self.aggregator.add_masked(self.index[sender], words, share.view_tags)
            except secagg.SecAggError as exc:
                raise UnexpectedMessage(f"bad masked share: {exc}") from exc
        elif share.view_tags:
            raise UnexpectedMessage("view tags on a plaintext share")
        elif not _in_range(words, 1):
            # no honest member can encode such a value (fixedpoint.encode refuses it)
            raise UnexpectedMessage("plaintext share out of the fixed-point range")
        self.shares[sender] = words
        if self.selector is not None and self.accepts_at is not None:
            self.selector.observe_answer(sender, now_ms - self.accepts_at)
        price = self.prices[sender]
        signature = b""
        if self.escrow is not None:
            assert self.payments is not None
            member_eth = self.committee[self.index[sender]].eth_address
            signature = self.payments.sign_receipt(self.query_id, member_eth, price)
        receipt = Receipt(
            query_id=self.query_id,
            member=sender,
            share_digest=hashlib.sha256(share.vector).digest(),
            price_wei=price,
            payment_sig=signature,
        )
        return [self._send(sender, receipt, now_ms), *self._maybe_advance(now_ms)]

    def on_decline(self, sender: str, decline: Decline, now_ms: int) -> list[Effect]:
        if self.state is QState.OFFERS:
            # Withdrawn offers, or peers refusing to offer (budget, policy): a
            # counted reason (PeerCore's ``declined.<reason>``), nothing more.
            self.offers.pop(sender, None)
            return []
        if not self._member(sender):
            raise UnexpectedMessage("decline from a peer outside the committee")
        if self.state is QState.UNMASK:
            return self._on_refusal(sender, now_ms)
        if self.state not in (QState.KEYS, QState.ANSWERS) or sender not in self._expected():
            raise UnexpectedMessage("decline not expected now")
        if sender in self.shares or sender in self.declined:
            raise UnexpectedMessage("second answer from one member")
        self.declined.add(sender)
        left = len(self._expected() - self.declined)
        if left < self.threshold:
            if self.state is QState.KEYS:
                self._goto(QEvent.TOO_FEW_KEYS)
            else:
                self._goto(QEvent.TOO_FEW_ANSWERS)
            return self._fail(f"declined_{len(self.declined)}_of_{len(self.committee)}", now_ms)
        if self.state is QState.KEYS:
            return self._relay(now_ms) if self._all_keyed() else []
        return self._maybe_advance(now_ms)

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
        return self._maybe_advance(now_ms)

    def on_local_failed(self, now_ms: int) -> list[Effect]:
        """The querier's own model could not answer: go on without it."""
        self.local_pending = False
        return [] if self.finished else self._maybe_advance(now_ms)

    def _maybe_advance(self, now_ms: int) -> list[Effect]:
        if self.state is QState.ANSWERS:
            answered = self._expected() <= set(self.shares) | self.declined
            if self.aggregator is not None:
                return self._start_unmask(now_ms) if answered else []
            if answered and not self.local_pending:
                self._goto(QEvent.ALL_ANSWERED)
                return self._succeed(now_ms)
        if self.state is QState.UNMASK and self.masked_total is not None and not self.local_pending:
            self._goto(QEvent.UNMASKED)
            return self._succeed(now_ms)
        return []

    def on_shares_timer(self, now_ms: int) -> list[Effect]:
        if self.state is QState.ANSWERS and self.aggregator is not None:
            return self._start_unmask(now_ms)
        if self.state is QState.UNMASK and self.masked_total is None:
            return self._unmask_the_rest(now_ms)  # the first ones were too slow
        return []

    def on_deadline(self, now_ms: int) -> list[Effect]:
        if self.state is QState.OFFERS:  # only if the offers timer could not run first
            self._goto(QEvent.TOO_FEW_OFFERS)
            return self._fail("deadline_before_committee", now_ms)
        if self.state is QState.ESCROW:
            self._goto(QEvent.ESCROW_FAILED)
            return self._fail("deadline_before_escrow", now_ms)
        if self.state is QState.KEYS:  # only if the keys timer could not run first
            self._goto(QEvent.TOO_FEW_KEYS)
            return self._fail("deadline_before_key_shares", now_ms)
        if self.state is QState.UNMASK:
            if self.masked_total is not None:  # our own model is late: go without it
                self._goto(QEvent.UNMASKED)
                return self._succeed(now_ms)
            assert self.aggregator is not None
            self._goto(QEvent.UNMASK_FAILED)
            revealed = len(self.aggregator.revealed)
            return self._fail(f"too_few_reveals_{revealed}_of_{self.threshold}", now_ms)
        if self.state is not QState.ANSWERS:
            return []
        if len(self.shares) < self.threshold or self.aggregator is not None:
            self._goto(QEvent.TOO_FEW_ANSWERS)
            return self._fail(f"too_few_shares_{len(self.shares)}_of_{self.threshold}", now_ms)
        self._goto(QEvent.DEADLINE)
        return self._succeed(now_ms)

    # -- unmask (secagg) ---------------------------------------------------------
    def _start_unmask(self, now_ms: int) -> list[Effect]:
        agg = self.aggregator
        assert agg is not None
        if len(self.shares) < self.threshold:
            self._goto(QEvent.TOO_FEW_ANSWERS)
            return self._fail(f"too_few_shares_{len(self.shares)}_of_{self.threshold}", now_ms)
        try:
            survivors, dropped = agg.fix_survivors()
        except secagg.SecAggError as exc:  # more dropped than members would reveal for
            self._goto(QEvent.TOO_FEW_ANSWERS)
            return self._fail(exc.reason, now_ms)
        self._goto(QEvent.SHARES_IN)
        # fastest first: self.shares is in arrival order
        order = [i for i in (self.index[p] for p in self.shares) if i in survivors]
        first = len(order)
        effects: list[Effect] = []
        grace_end = now_ms + self.config.unmask_grace_ms
        if not dropped and grace_end < self.request.deadline_ms:
            first = min(first, self.threshold + max(0, self.config.unmask_spares))
        if first < len(order):
            self.unmask_pending = order[first:]
            effects.append(SetTimer(self.shares_timer, grace_end))  # -> on_shares_timer
        effects += [self._unmask(s, now_ms) for s in order[:first]]
        return effects

    def _unmask(self, s: int, now_ms: int) -> Effect:
        agg = self.aggregator
        assert agg is not None and agg.survivors is not None
        unmask = Unmask(
            query_id=self.query_id,
            survivors=agg.survivors,
            dropped=agg.dropped,
            view_tags=agg.tags_for(s),
        )
        return self._send(self.committee[s].peer_id, unmask, now_ms)

    def _unmask_the_rest(self, now_ms: int) -> list[Effect]:
        pending, self.unmask_pending = self.unmask_pending, []
        return [self._unmask(s, now_ms) for s in pending]

    def on_reveal(self, sender: str, reveal: Reveal, now_ms: int) -> list[Effect]:
        agg = self.aggregator
        if self.state is not QState.UNMASK or agg is None or not self._member(sender):
            raise UnexpectedMessage("reveal outside the unmask round or from a non-member")
        if sender in self.refused or self.index[sender] in self.unmask_pending:
            raise UnexpectedMessage("reveal after a refusal, or before being asked")
        try:
            agg.add_reveal(self.index[sender], reveal.seed_shares, reveal.pair_seeds)
        except secagg.SecAggError as exc:
            raise UnexpectedMessage(f"bad reveal: {exc}") from exc
        if self.masked_total is not None or not agg.ready:
            return []
        try:
            total = agg.unmask()
        except secagg.SecAggError as exc:
            self._goto(QEvent.UNMASK_FAILED)
            return self._fail(exc.reason, now_ms)
        assert agg.survivors is not None
        if not _in_range(total, len(agg.survivors)):
            # A masked share cannot be checked alone: a survivor sent garbage (or
            # values no honest member encodes). Fail rather than answer garbage.
            self._goto(QEvent.UNMASK_FAILED)
            return self._fail("aggregate_out_of_range", now_ms)
        self.masked_total = total
        return self._maybe_advance(now_ms)

    def _on_refusal(self, sender: str, now_ms: int) -> list[Effect]:
        agg = self.aggregator
        assert agg is not None and agg.survivors is not None
        index = self.index[sender]
        asked = index in agg.survivors and index not in self.unmask_pending
        if not asked or index in agg.revealed or sender in self.refused:
            raise UnexpectedMessage("refusal from a member not asked to reveal")
        self.refused.add(sender)
        # with dropped members every survivor's pair seeds are needed: one refusal ends it
        short = agg.needs_every_survivor or len(agg.survivors) - len(self.refused) < self.threshold
        if self.masked_total is None and short:
            self._goto(QEvent.UNMASK_FAILED)
            return self._fail(f"reveals_refused_{len(self.refused)}", now_ms)
        return [] if self.masked_total is not None else self._unmask_the_rest(now_ms)

    # -- endings --------------------------------------------------------------
    def _notify(self, result: Result, now_ms: int) -> list[Effect]:
        return [
            self._send(m.peer_id, result, now_ms)
            for m in self.committee
            if m.peer_id not in self.notified
        ]

    def _payment(self) -> tuple[EscrowTerms | None, tuple[str, ...]]:
        """The outcome's payment fields: what to settle (nothing if no escrow opened)."""
        if self.escrow is None or not self.escrow_open:
            return None, ()
        delivered = tuple(self.committee[self.index[p]].eth_address for p in sorted(self.shares))
        return self.escrow, delivered

    def _observe_end(self, now_ms: int) -> None:
        """Tell the selector how each member did: delivered (a share; key shares if
        the query ended in the key round), declined (a Decline or a refused reveal),
        or dropped (silent: it also gets the time it was waited for as its answer
        latency). Nothing when no Accept left (too few offers, escrow failed)."""
        if self.selector is None or self.accepts_at is None:
            return
        answered = set(self.shares)
        if self.aggregator is not None and self.aggregator.u1 is None:
            answered |= self._keyed()  # ended in the key round: keys were all asked for
        members = [m.peer_id for m in self.committee]
        declined = [p for p in members if p in self.declined or p in self.refused]
        dropped = [p for p in members if p not in answered and p not in declined]
        for peer in dropped:
            self.selector.observe_answer(peer, now_ms - self.accepts_at)
        self.selector.observe_outcome(
            delivered=[p for p in members if p in answered and p not in declined],
            declined=declined,
            dropped=dropped,
        )

    def _succeed(self, now_ms: int) -> list[Effect]:
        self._observe_end(now_ms)
        total = np.zeros(self.request.vector_len, dtype=np.uint64)
        if self.aggregator is not None:
            assert self.masked_total is not None and self.aggregator.survivors is not None
            contributors = tuple(
                sorted(self.committee[i].peer_id for i in self.aggregator.survivors)
            )
            total = fixedpoint.add(total, self.masked_total)
        else:
            contributors = tuple(sorted(self.shares))
            for words in self.shares.values():
                total = fixedpoint.add(total, words)
        if self.local is not None:
            total = fixedpoint.add(total, self.local)
        done = query_done(
            self.query_id,
            "ok",
            total=fixedpoint.decode(total),
            contributors=contributors,
            committee_size=len(self.committee),
            elapsed_ms=now_ms - self.started_ms,
            payment=self._payment(),
        )
        result = Result(query_id=self.query_id, ok=True, contributors=contributors)
        return [*self._notify(result, now_ms), done]

    def _fail(self, reason: str, now_ms: int) -> list[Effect]:
        self._observe_end(now_ms)
        done = query_done(
            self.query_id,
            reason,
            total=None,
            contributors=(),
            committee_size=len(self.committee),
            elapsed_ms=now_ms - self.started_ms,
            payment=self._payment(),
        )
        result = Result(query_id=self.query_id, ok=False, reason=reason)
        return [*self._notify(result, now_ms), done]
