"""One query, as a committee member sees it.

Theory of operation::

    (request seen) --offer (fresh mask nonce)--> OFFERED
    OFFERED --accept, paid (VerifyEscrow)--> VERIFYING
    VERIFYING --escrow verified: as OFFERED on accept--> EVALUATING / KEYED
    OFFERED --accept, plaintext--> EVALUATING --evaluated--> CHARGING
    OFFERED --accept, secagg (key shares sent, model started)--> KEYED
    KEYED --evaluated--> HAVE_VECTOR --relay--> CHARGING
    KEYED --relay------> HAVE_RELAY --evaluated--> CHARGING
    CHARGING --charged (share sent, masked under secagg)--> SHARED
    SHARED --unmask (rules hold)--> REVEALED
    any state --result / expiry / our decline (refusal, model error)--> gone

A member offers on a QueryRequest it can serve (task, shape, rule, price,
free capacity, mode) and can afford (its PrivacyGuard; a refusal is a
Decline with the reason), with a fresh per-query mask nonce. It then
accepts only an Accept from that same querier that lists it with its own
keys, whose other members' long-term keys match their signed announcements
(when known), with a strict-majority threshold (``2t > n``, which secure
aggregation's reveal rule relies on) and enough noise for its policy.

Under secure aggregation (fi_peer.privacy.secagg) the member sends its
Shamir key shares at once and runs the model meanwhile; the masked share
leaves when both the model output (noise already added) and the querier's
relay (U1) are in. In both modes the share waits in CHARGING until the
driver has recorded its privacy cost (a ``Charge`` effect, see guard.py;
without a guard the charge is a no-op and the share leaves at once). It reveals at most once,
under the rules of secagg.MaskingMember.reveal; a refused unmask is answered
with a Decline ``refused_<why>``. Receipts for delivered shares are kept:
they are what the member is paid against.

Paid queries (a ``Payments`` object given; see payment.py): the Offer names
this peer's Ethereum address; an Accept naming an escrow (the querier's
address and on-chain deadline) is checked on chain first (``VerifyEscrow``;
nothing is evaluated or sent before ``escrow_verified``), and one without an
escrow is declined when this peer charges a price. A Receipt must then carry
the querier's valid signature over (query, our address, price); a good one
is handed to the driver to keep (``Paid``).

DP noise: the member adds N(0, sigma^2/t) per coordinate to its model output
(fi_peer.privacy.dp.add_member_noise) before the fixed-point encoding and the
masks, with sigma and t from the Accept; any t survivors' noise sums to at
least sigma^2. The generator is numpy's PCG64 seeded with 256 bits from the
OS (or the one the driver passes, for tests); it is not a CSPRNG, and float
Gaussian sampling has known precision artefacts (Mironov, CCS 2012): a
discrete Gaussian on the fixed-point grid would close both (future work).
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nacl.utils
import numpy as np
import numpy.typing as npt

from fi_peer.errors import UnexpectedMessage
from fi_peer.identity import Identity
from fi_peer.privacy import secagg
from fi_peer.privacy.dp import add_member_noise
from fi_peer.protocol import audit, fixedpoint
from fi_peer.protocol.effects import Charge, Effect, Evaluate, Paid, Send, SetTimer, VerifyEscrow
from fi_peer.protocol.envelope import seal
from fi_peer.protocol.guard import PrivacyGuard
from fi_peer.protocol.messages import (
    Accept,
    Decline,
    KeyRelay,
    KeyShares,
    Message,
    ModelCard,
    Offer,
    Opening,
    OpenRequest,
    QueryRequest,
    Receipt,
    Result,
    Reveal,
    Share,
    Unmask,
)
from fi_peer.protocol.payment import EscrowTerms, Payments
from fi_peer.protocol.sealing import open_input

# How long after a query's deadline a member keeps its state (clock skew slack).
GRACE_MS = 5_000
# Relative slack when comparing the querier's noise scale with our own requirement
# (both come from the same calibration; this only absorbs float rounding).
SIGMA_RTOL = 1e-9
MAX_CHANNELS = 4096

SessionKey = tuple[str, bytes]  # (querier peer id, query id): query ids are the querier's choice


class RState(enum.Enum):
    OFFERED = "offered"
    VERIFYING = "verifying"
    EVALUATING = "evaluating"
    KEYED = "keyed"
    HAVE_VECTOR = "have_vector"
    HAVE_RELAY = "have_relay"
    CHARGING = "charging"
    SHARED = "shared"
    REVEALED = "revealed"


class REvent(enum.Enum):
    ACCEPT_PLAIN = "accept_plain"
    ACCEPT_SECAGG = "accept_secagg"
    ACCEPT_PAID = "accept_paid"
    EVALUATED = "evaluated"
    RELAY = "relay"
    CHARGED = "charged"
    UNMASK = "unmask"


_TRANSITIONS: dict[tuple[RState, REvent], RState] = {
    (RState.OFFERED, REvent.ACCEPT_PLAIN): RState.EVALUATING,
    (RState.OFFERED, REvent.ACCEPT_SECAGG): RState.KEYED,
    (RState.OFFERED, REvent.ACCEPT_PAID): RState.VERIFYING,
    (RState.VERIFYING, REvent.ACCEPT_PLAIN): RState.EVALUATING,
    (RState.VERIFYING, REvent.ACCEPT_SECAGG): RState.KEYED,
    (RState.EVALUATING, REvent.EVALUATED): RState.CHARGING,
    (RState.KEYED, REvent.EVALUATED): RState.HAVE_VECTOR,
    (RState.KEYED, REvent.RELAY): RState.HAVE_RELAY,
    (RState.HAVE_VECTOR, REvent.RELAY): RState.CHARGING,
    (RState.HAVE_RELAY, REvent.EVALUATED): RState.CHARGING,
    (RState.CHARGING, REvent.CHARGED): RState.SHARED,
    (RState.SHARED, REvent.UNMASK): RState.REVEALED,
}


@dataclass(slots=True)
class MemberSession:
    querier: str
    request: QueryRequest
    state: RState
    price_wei: int
    mask_key: bytes = b""  # this query's mask nonce (secagg.mask_nonce)
    accept: Accept | None = None
    masking: secagg.MaskingMember | None = None
    words: fixedpoint.Words | None = None  # noisy fixed-point vector, before masking
    share_digest: bytes = b""
    receipt: Receipt | None = None
    escrow: EscrowTerms | None = None  # paid query: the terms the escrow was checked for
    x: npt.NDArray[np.float32] | None = None  # the input, while the escrow is checked

    def goto(self, event: REvent) -> None:
        try:
            self.state = _TRANSITIONS[(self.state, event)]
        except KeyError:
            state = self.state.value
            raise UnexpectedMessage(f"{event.value} not expected in state {state}") from None


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
    # Answer queries that are not securely aggregated (the querier then sees our
    # vector itself). Off unless the owner opts in.
    allow_plaintext: bool = False
    # Smallest committee we join under secure aggregation: with one member, the
    # "sum" is that member's vector.
    min_committee: int = 2
    # Audits (audit.py): the largest fraction of one querier's answers we open.
    max_open_fraction: float = audit.DEFAULT_MAX_FRACTION


class MemberSide:
    """What a member does the same in the default and the HE mode (Responder,
    he_query.HEResponder): judge a request (card, terms, privacy policy), check the
    escrow an Accept names, keep the querier's Receipt (paid: its payment
    signature checked), end a session on its Result or the expiry timer."""

    card: ModelCard
    guard: PrivacyGuard | None
    sessions: dict[SessionKey, Any]
    receipts: list[Receipt]
    payments: Payments | None
    metrics: Counter[str]

    def _session(self, key: SessionKey, *states: Any) -> Any:
        raise NotImplementedError

    def _serve_refusal(
        self,
        request: Any,
        now_ms: int,
        *,
        price_wei: int,
        max_query_ms: int,
        capacity: int,
        refuse_plaintext: bool = False,
    ) -> str | None:
        """Why this peer will not offer for ``request`` (a QueryRequest or HERequest)
        by its model card and terms (None when it will)."""
        card = self.card
        if request.task != card.task or request.n_classes != card.n_classes:
            return "task_mismatch"
        if request.input_dim != card.input_dim:
            return "shape_mismatch"
        if request.rule not in card.rules:
            return "rule_unsupported"
        if isinstance(request, QueryRequest) and request.rule.startswith("he:"):
            # "he:<rule>" in the card names an input-private (HE) rule served,
            # never a default-mode rule
            return "rule_unsupported"
        if refuse_plaintext:
            return "plaintext_refused"
        if request.max_price_wei < price_wei:
            return "price_too_low"
        if request.deadline_ms > now_ms + max_query_ms:
            return "deadline_too_far"
        if len(self.sessions) >= capacity:
            return "busy"
        return None

    @staticmethod
    def _effective_sigma(sigma: float, request: QueryRequest, threshold: int) -> float:
        """Noise protecting our vector in what the querier sees (see guard.py)."""
        return sigma if request.secagg else sigma / math.sqrt(threshold)

    def _privacy_refusal(self, sender: str, request: QueryRequest, now_ms: int) -> str | None:
        if self.guard is None:
            return None
        required = self.guard.required_sigma(request)
        if required is None:
            return "dp_policy_refused"
        # Plaintext: t is not known yet; t <= k, so sigma/sqrt(k) bounds the cost from above.
        sigma = self._effective_sigma(required, request, request.k)
        return self.guard.check(sender, request, sigma, now_ms)

    def _escrow_terms(
        self, session: Any, accept: Any, my_eth: str, committee_eths: tuple[str, ...]
    ) -> tuple[EscrowTerms | None, str | None]:
        """The escrow to check before answering (None: unpaid), or why we decline;
        ``accept`` is an Accept or HEAccept, ``my_eth`` the address it gives us."""
        payments = self.payments
        if payments is None:
            return None, None  # we are not paid on chain: the flow is the unpaid one
        if not accept.querier_eth:
            return None, ("escrow_missing" if session.price_wei > 0 else None)
        if my_eth.lower() != payments.eth_address.lower():
            return None, "wrong_eth_address"
        if accept.price_wei == 0:
            return None, "escrow_price_zero"
        if accept.escrow_deadline_s * 1000 < session.request.deadline_ms:
            return None, "escrow_deadline_too_early"
        try:
            terms = EscrowTerms(
                query_id=accept.query_id,
                querier=accept.querier_eth,
                committee=committee_eths,
                price_wei=accept.price_wei,
                deadline_s=accept.escrow_deadline_s,
            )
        except ValueError:
            return None, "bad_escrow_terms"
        return terms, None

    def _book_receipt(
        self, sender: str, receipt: Receipt, session: Any, bad_sig_metric: str | None = None
    ) -> list[Effect]:
        """Keep a receipt for ``session`` (already checked to be for this member):
        at the agreed price and, paid, with the querier's valid payment signature."""
        if receipt.price_wei != session.price_wei:
            raise UnexpectedMessage("receipt is not for the agreed price")
        escrow: EscrowTerms | None = session.escrow
        if escrow is not None:
            assert self.payments is not None
            valid = len(receipt.payment_sig) > 0 and self.payments.verify_receipt(
                receipt.query_id,
                self.payments.eth_address,
                receipt.price_wei,
                receipt.payment_sig,
                escrow.querier,
            )
            if not valid:
                if bad_sig_metric is not None:
                    self.metrics[bad_sig_metric] += 1
                raise UnexpectedMessage("receipt without a valid payment signature")
        session.receipt = receipt
        self.receipts.append(receipt)
        return [] if escrow is None else [Paid(sender, escrow, receipt)]

    def on_result(self, sender: str, result: Result, now_ms: int) -> list[Effect]:
        key = (sender, result.query_id)
        self._session(key)
        del self.sessions[key]
        return []

    def on_expire(self, key: SessionKey, now_ms: int) -> list[Effect]:
        self.sessions.pop(key, None)
        return []


class Responder(MemberSide):
    def __init__(
        self,
        identity: Identity,
        card: ModelCard,
        config: ResponderConfig,
        *,
        guard: PrivacyGuard | None = None,
        rng: np.random.Generator | None = None,
        box_key_of: Callable[[str], bytes | None] = lambda peer: None,
        metrics: Counter[str] | None = None,
        payments: Payments | None = None,
    ) -> None:
        self.identity = identity
        self.payments = payments
        self.card = card
        self.config = config
        self.guard = guard
        self.rng = rng if rng is not None else np.random.default_rng(
            int.from_bytes(nacl.utils.random(32), "little")
        )
        self.box_key_of = box_key_of
        self.metrics: Counter[str] = metrics if metrics is not None else Counter()
        self.sessions: dict[SessionKey, MemberSession] = {}
        self.receipts: list[Receipt] = []
        self._channels: OrderedDict[bytes, secagg.Channel] = OrderedDict()
        self.openings = audit.OpeningDesk(config.max_open_fraction)
        self._open_charges: dict[SessionKey, audit.Sealed] = {}

    @staticmethod
    def timer_key(key: SessionKey) -> tuple[str, str, bytes]:
        return ("r-expire", key[0], key[1])

    def _send(self, peer: str, message: Message, now_ms: int) -> Send:
        # Per-query messages to a querier whose box key its signed QueryRequest gave
        # are MAC'd instead of signed (envelope.MAC_KINDS; seal decides by kind).
        session = self.sessions.get((peer, getattr(message, "query_id", b"")))
        to = None if session is None else (peer, session.request.reply_key)
        return Send(peer, seal(self.identity, message, now_ms, to=to))

    def _decline(self, key: SessionKey, reason: str, now_ms: int) -> list[Effect]:
        """Give up on a query: tell the querier why and forget it."""
        session = self.sessions.pop(key, None)
        self.metrics[f"responder.declined.{reason}"] += 1
        querier = key[0] if session is None else session.querier
        return [self._send(querier, Decline(query_id=key[1], reason=reason), now_ms)]

    def can_serve(self, request: QueryRequest, now_ms: int) -> str | None:
        """Why this peer will not offer (None when it will)."""
        config = self.config
        return self._serve_refusal(
            request,
            now_ms,
            price_wei=config.price_wei,
            max_query_ms=config.max_query_ms,
            capacity=config.capacity,
            refuse_plaintext=not request.secagg and not config.allow_plaintext,
        )

    def on_request(self, sender: str, request: QueryRequest, now_ms: int) -> list[Effect]:
        key = (sender, request.query_id)
        if sender == self.identity.peer_id or key in self.sessions:
            return []
        if request.deadline_ms <= now_ms:
            raise UnexpectedMessage("query request already past its deadline")
        if self.can_serve(request, now_ms) is not None:
            return []
        refusal = self._privacy_refusal(sender, request, now_ms)
        if refusal is not None:
            return self._decline(key, refusal, now_ms)
        session = MemberSession(sender, request, RState.OFFERED, self.config.price_wei)
        if request.secagg:
            session.mask_key = secagg.mask_nonce()
        self.sessions[key] = session
        offer = Offer(
            query_id=request.query_id,
            price_wei=self.config.price_wei,
            box_key=self.identity.box_public_key,
            expected_latency_ms=self.config.expected_latency_ms,
            mask_key=session.mask_key,
            eth_address="" if self.payments is None else self.payments.eth_address,
        )
        expiry = min(request.deadline_ms, now_ms + self.config.offer_ttl_ms)
        return [self._send(sender, offer, now_ms), SetTimer(self.timer_key(key), expiry)]

    def _session(self, key: SessionKey, *states: RState) -> MemberSession:
        session = self.sessions.get(key)
        if session is None:
            raise UnexpectedMessage("no query of this querier is open here")
        if states and session.state not in states:
            raise UnexpectedMessage(f"message not expected in state {session.state.value}")
        return session

    def _channel(self, box_key: bytes) -> secagg.Channel:
        """The long-term channel with a peer (cached: the X25519 is done once per peer)."""
        channel = self._channels.get(box_key)
        if channel is None:
            channel = secagg.Channel(self.identity.box_key, box_key)
            self._channels[box_key] = channel
            if len(self._channels) > MAX_CHANNELS:
                self._channels.popitem(last=False)
        else:
            self._channels.move_to_end(box_key)
        return channel

    def on_accept(self, sender: str, accept: Accept, now_ms: int) -> list[Effect]:
        key = (sender, accept.query_id)
        session = self._session(key, RState.OFFERED)
        request = session.request
        mine = [i for i, m in enumerate(accept.committee) if m.peer_id == self.identity.peer_id]
        me = accept.committee[mine[0]] if mine else None
        if me is None or me.box_key != self.identity.box_public_key:
            raise UnexpectedMessage("accept does not list this peer with its key")
        if me.mask_key != session.mask_key:
            raise UnexpectedMessage("accept does not list this peer with its mask nonce")
        if accept.price_wei < session.price_wei:
            raise UnexpectedMessage("accept below the offered price")
        x = open_input(
            self.identity.box_key,
            request.reply_key,
            request.query_id,
            accept.sealed_input,
            request.input_dim,
        )
        refusal = self._accept_refusal(request, accept)
        if refusal is not None:
            return self._decline(key, refusal, now_ms)
        committee_eths = tuple(m.eth_address for m in accept.committee)
        escrow, refusal = self._escrow_terms(session, accept, me.eth_address, committee_eths)
        if refusal is not None:
            return self._decline(key, refusal, now_ms)
        session.price_wei = accept.price_wei
        session.accept = accept
        expire = SetTimer(self.timer_key(key), request.deadline_ms + GRACE_MS)
        if escrow is not None:
            # Nothing is evaluated (or sent) before the escrow is seen on chain.
            session.escrow, session.x = escrow, x
            session.goto(REvent.ACCEPT_PAID)
            return [VerifyEscrow(sender, escrow), expire]
        effects = self._proceed(key, session, x, now_ms)
        return [*effects, expire] if key in self.sessions else effects

    def on_escrow_verified(self, key: SessionKey, ok: bool, now_ms: int) -> list[Effect]:
        """The driver's answer to VerifyEscrow."""
        session = self.sessions.get(key)
        if session is None or session.state is not RState.VERIFYING:
            return []  # expired or ended meanwhile
        if not ok:
            return self._decline(key, "escrow_not_found", now_ms)
        x, session.x = session.x, None
        assert x is not None
        return self._proceed(key, session, x, now_ms)

    def _proceed(
        self, key: SessionKey, session: MemberSession, x: npt.NDArray[np.float32], now_ms: int
    ) -> list[Effect]:
        """The Accept holds (and its escrow, if paid): run the model, send key shares."""
        sender, request, accept = session.querier, session.request, session.accept
        assert accept is not None
        mine = [i for i, m in enumerate(accept.committee) if m.peer_id == self.identity.peer_id]
        evaluate = Evaluate(request.query_id, x, request.rule, request.vector_len, sender)
        if not request.secagg:
            session.goto(REvent.ACCEPT_PLAIN)
            return [evaluate]
        try:
            committee = [
                secagg.Participant(m.peer_id, m.box_key, m.mask_key) for m in accept.committee
            ]
            channels = [
                None if i == mine[0] else self._channel(m.box_key)
                for i, m in enumerate(accept.committee)
            ]
            session.masking = secagg.MaskingMember(
                context=secagg.session_context(sender, request.query_id),
                committee=committee,
                index=mine[0],
                threshold=accept.threshold,
                mask_nonce=session.mask_key,
                channels=channels,
            )
            ciphertexts, commitment = session.masking.key_shares()
        except secagg.SecAggError as exc:
            return self._decline(key, exc.reason, now_ms)
        except ValueError:  # a committee secagg cannot work with
            return self._decline(key, "bad_committee", now_ms)
        session.goto(REvent.ACCEPT_SECAGG)
        shares = KeyShares(
            query_id=request.query_id, ciphertexts=ciphertexts, commitment=commitment
        )
        # The model runs while the key shares travel: Evaluate goes out first.
        return [evaluate, self._send(sender, shares, now_ms)]

    def _accept_refusal(self, request: QueryRequest, accept: Accept) -> str | None:
        n, t = len(accept.committee), accept.threshold
        if request.secagg:
            if n < self.config.min_committee:
                return "committee_too_small"
            if 2 * t <= n:
                return "threshold_not_majority"
            for m in accept.committee:
                known = self.box_key_of(m.peer_id)
                if known is not None and known != m.box_key:
                    return "box_key_mismatch"
        required = 0.0 if self.guard is None else self.guard.required_sigma(request)
        if required is None:
            return "dp_policy_refused"
        if accept.noise_sigma < required * (1 - SIGMA_RTOL):
            return "noise_too_low"
        return None

    def on_evaluated(self, key: SessionKey, vector: npt.ArrayLike, now_ms: int) -> list[Effect]:
        session = self.sessions.get(key)
        waiting = (RState.EVALUATING, RState.KEYED, RState.HAVE_RELAY)
        if session is None or session.state not in waiting or session.accept is None:
            return []  # expired or cancelled meanwhile: nothing to send
        accept = session.accept
        try:
            raw = np.asarray(vector, dtype=np.float64)
            if raw.shape != (session.request.vector_len,):
                raise ValueError("wrong vector length")
            noisy = add_member_noise(raw, accept.noise_sigma, accept.threshold, self.rng)
            words = fixedpoint.encode(noisy)
        except ValueError:
            return self.on_evaluation_failed(key, now_ms, reason="bad_vector")
        session.words = words
        session.goto(REvent.EVALUATED)
        if session.state is RState.HAVE_VECTOR and session.masking is not None:
            # The relay is still on its way: derive the pair seeds now, for the
            # whole committee (U1 is the committee unless someone dropped).
            try:
                session.masking.prepare()
            except secagg.SecAggError as exc:
                return self._decline(key, exc.reason, now_ms)
        if session.state is RState.CHARGING:
            return self._charge(key, session, now_ms)
        return []

    def on_key_relay(self, sender: str, relay: KeyRelay, now_ms: int) -> list[Effect]:
        key = (sender, relay.query_id)
        session = self._session(key, RState.KEYED, RState.HAVE_VECTOR)
        assert session.masking is not None
        try:
            session.masking.open_relay(relay.u1, relay.ciphertexts)
        except secagg.SecAggError as exc:
            return self._decline(key, exc.reason, now_ms)
        session.goto(REvent.RELAY)
        if session.state is RState.CHARGING:
            return self._charge(key, session, now_ms)
        return []

    def _charge(self, key: SessionKey, session: MemberSession, now_ms: int) -> list[Effect]:
        """The share is ready: have its privacy cost recorded first (no guard: nothing to do)."""
        if self.guard is None:
            return self._share(key, session, now_ms)
        accept = session.accept
        assert accept is not None
        sigma = self._effective_sigma(accept.noise_sigma, session.request, accept.threshold)
        return [Charge(key[0], session.request, sigma)]

    def on_charged(self, key: SessionKey, refusal: str | None, now_ms: int) -> list[Effect]:
        """The driver's answer to a Charge effect."""
        session = self.sessions.get(key)
        if session is None or session.state is not RState.CHARGING:
            return []  # expired or ended meanwhile: the charge stands, nothing is sent
        if refusal is not None:
            return self._decline(key, refusal, now_ms)
        return self._share(key, session, now_ms)

    def _share(self, key: SessionKey, session: MemberSession, now_ms: int) -> list[Effect]:
        """Send the (masked) share; its cost is recorded already."""
        session.goto(REvent.CHARGED)
        words = session.words
        assert words is not None
        tags: tuple[bytes, ...] = ()
        if session.masking is not None:
            try:
                words, tags = session.masking.masked_input(words)
            except secagg.SecAggError as exc:  # e.g. a member's mask key of low order
                return self._decline(key, exc.reason, now_ms)
        data = fixedpoint.to_bytes(words)
        committed = self._commit(key, session)
        if committed is None:
            return self._decline(key, "query_id_reused", now_ms)
        session.words = None
        session.share_digest = hashlib.sha256(data).digest()
        share = Share(
            query_id=key[1],
            vector=data,
            commitment=committed[0],
            view_tags=tags,
            commitment_sig=committed[1],
        )
        return [self._send(session.querier, share, now_ms)]

    def _commit(self, key: SessionKey, session: MemberSession) -> tuple[bytes, bytes] | None:
        """Commit to the noisy vector (before masks) and keep the opening (audit.py);
        None if we committed to this query id before (never twice: equivocation)."""
        if self.openings.committed(*key):
            return None
        assert session.words is not None and session.accept is not None
        noisy = fixedpoint.to_bytes(session.words)
        nonce = nacl.utils.random(audit.NONCE_LEN)
        commitment = audit.commit(key[1], self.identity.peer_id, noisy, nonce)
        accept = session.accept
        # The opening shows our vector with only our share of the noise.
        sigma = accept.noise_sigma / math.sqrt(accept.threshold)
        sealed = audit.Sealed(noisy, nonce, commitment, session.request, sigma)
        self.openings.record(key[0], key[1], sealed)
        signature = b""
        signer = self.payments
        if session.escrow is not None and isinstance(signer, audit.CommitmentSigner):
            signature = signer.sign_commitment(session.escrow.querier, key[1], commitment)
        return commitment, signature

    def on_open_request(self, sender: str, request: OpenRequest, now_ms: int) -> list[Effect]:
        """Open an answer's commitment (an audit), after the query is over, within
        our opening limit; its privacy cost is charged first (like an answer)."""
        key = (sender, request.query_id)
        if key in self.sessions or key in self._open_charges:
            result: audit.Sealed | str = "not_over"
        else:
            result = self.openings.open(sender, request.query_id)
        if result == "unknown_query":
            # Nothing of ours to open for this sender: no reply (anyone could make
            # us send refusals), counted as rejected like any unexpected message.
            raise UnexpectedMessage("open request for a query we did not answer to its sender")
        if isinstance(result, str):
            self.metrics[f"responder.open_refused.{result}"] += 1
            refusal = Opening(query_id=request.query_id, refused=result)
            return [self._send(sender, refusal, now_ms)]
        # A plaintext answer was seen whole already: opening it releases nothing new.
        if self.guard is None or not result.request.secagg:
            return [self._opening(sender, result, now_ms)]
        self._open_charges[key] = result
        return [Charge(sender, result.request, result.sigma)]

    def has_open_charge(self, key: SessionKey) -> bool:
        return key in self._open_charges

    def on_open_charged(self, key: SessionKey, refusal: str | None, now_ms: int) -> list[Effect]:
        """The driver's answer to an opening's Charge."""
        sealed = self._open_charges.pop(key, None)
        if sealed is None:
            return []
        if refusal is not None:
            self.metrics["responder.open_refused.budget"] += 1
            return [self._send(key[0], Opening(query_id=key[1], refused=refusal), now_ms)]
        return [self._opening(key[0], sealed, now_ms)]

    def _opening(self, querier: str, sealed: audit.Sealed, now_ms: int) -> Send:
        self.metrics["responder.opened"] += 1
        qid = sealed.request.query_id
        opening = Opening(query_id=qid, vector=sealed.vector, nonce=sealed.nonce)
        return self._send(querier, opening, now_ms)

    def on_evaluation_failed(
        self, key: SessionKey, now_ms: int, reason: str = "model_error"
    ) -> list[Effect]:
        if key not in self.sessions:
            return []
        return self._decline(key, reason, now_ms)

    def on_unmask(self, sender: str, unmask: Unmask, now_ms: int) -> list[Effect]:
        key = (sender, unmask.query_id)
        session = self._session(key, RState.SHARED, RState.REVEALED)
        if session.masking is None:
            raise UnexpectedMessage("unmask for a plaintext query")
        try:
            shares, seeds = session.masking.reveal(
                unmask.survivors, unmask.dropped, unmask.view_tags
            )
        except secagg.SecAggError as exc:
            # Refused: nothing revealed. The session stays (receipt, result).
            self.metrics[f"responder.refused.{exc.reason}"] += 1
            decline = Decline(query_id=unmask.query_id, reason=f"refused_{exc.reason}")
            return [self._send(sender, decline, now_ms)]
        session.goto(REvent.UNMASK)
        reveal = Reveal(query_id=unmask.query_id, seed_shares=shares, pair_seeds=seeds)
        return [self._send(sender, reveal, now_ms)]

    def on_receipt(self, sender: str, receipt: Receipt, now_ms: int) -> list[Effect]:
        session = self._session((sender, receipt.query_id), RState.SHARED, RState.REVEALED)
        if receipt.member != self.identity.peer_id or session.receipt is not None:
            raise UnexpectedMessage("receipt not for this member, or a second one")
        if receipt.share_digest != session.share_digest:
            raise UnexpectedMessage("receipt is for another share than the one we sent")
        return self._book_receipt(sender, receipt, session, "responder.bad_payment_sig")
