"""The whole protocol core of one peer, without I/O.

``PeerCore`` routes verified envelopes to membership, the querier sessions
(one per query this peer submitted) and the responder (queries it answers).
A driver feeds it bytes, timer firings and model outputs, always with the
current time, and carries out the effects it returns. ``receive`` never
raises for anything a peer sent: each rejection is counted under
``metrics["rejected.<reason>"]`` and dropped.

Channels are part of the protocol: Announce and QueryRequest arrive only by
gossip, every other kind only as a direct message; anything else is rejected.

Privacy: the responder gets the owner's PrivacyGuard (budget and DP policy,
see guard.py) and a noise generator; the querier takes its noise scale from
the caller of :meth:`submit_query` (the core does not know the aggregation
rules' sensitivities: fi_peer.models sits above it).

Payment: with a ``Payments`` object (payment.py) queries with a price are
escrowed on chain and receipts are signed; the driver carries out
``OpenEscrow``/``VerifyEscrow`` and answers with :meth:`escrow_opened` and
:meth:`escrow_verified`. Without one nothing of this happens.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

import nacl.utils
import numpy as np
import numpy.typing as npt

from fi_peer.errors import LocalProtocolError, RemoteProtocolError, UnexpectedMessage
from fi_peer.identity import Identity
from fi_peer.protocol.audit import AuditBook
from fi_peer.protocol.effects import (
    Charge,
    Effect,
    Evaluate,
    Publish,
    QueryDone,
    Send,
    SetTimer,
)
from fi_peer.protocol.envelope import Opened, Verifier, seal
from fi_peer.protocol.guard import PrivacyGuard
from fi_peer.protocol.he_peer import HECoreMixin
from fi_peer.protocol.he_query import HEConfig
from fi_peer.protocol.membership import MEMBERSHIP_TIMER, Membership
from fi_peer.protocol.messages import (
    QUERY_ID_LEN,
    Accept,
    Announce,
    Decline,
    KeyRelay,
    KeyShares,
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
from fi_peer.protocol.payment import Payments
from fi_peer.protocol.querier import (
    QuerierConfig,
    QuerySession,
    check_noise,
    request_fields,
)
from fi_peer.protocol.reputation import ReputationSelector
from fi_peer.protocol.responder import Responder, ResponderConfig
from fi_peer.protocol.topics import peers_topic, query_topic

GOSSIP_KINDS = frozenset({Announce.KIND, QueryRequest.KIND, "he_request"})
# Decline reasons are chosen by peers: count at most this many distinct ones.
MAX_DECLINE_REASONS = 64
# Recently finished queries remembered so that their late Reveals (the sum is
# rebuilt from the first t) are counted as ``late.reveal``, not as rejections.
MAX_RECENT_QUERIES = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class CoreConfig:
    net: str = "local"
    announce_interval_ms: int = 2000
    missed_beats: int = 3
    window_ms: int = 30_000
    querier: QuerierConfig = field(default_factory=QuerierConfig)
    responder: ResponderConfig = field(default_factory=ResponderConfig)
    he: HEConfig = field(default_factory=HEConfig)


class PeerCore(HECoreMixin):
    def __init__(
        self,
        identity: Identity,
        card: ModelCard,
        *,
        config: CoreConfig | None = None,
        addresses: tuple[str, ...] = (),
        eth_address: str = "",
        guard: PrivacyGuard | None = None,
        rng: np.random.Generator | None = None,
        payments: Payments | None = None,
    ) -> None:
        self.identity = identity
        self.card = card
        self.config = config or CoreConfig()
        self.addresses = addresses
        self.payments = payments
        self.eth_address = eth_address or ("" if payments is None else payments.eth_address)
        self.verifier = Verifier(window_ms=self.config.window_ms, identity=identity)
        self.membership = Membership(
            identity.peer_id,
            interval_ms=self.config.announce_interval_ms,
            missed_beats=self.config.missed_beats,
        )
        self.metrics: Counter[str] = Counter()
        self.responder = Responder(
            identity,
            card,
            self.config.responder,
            guard=guard,
            rng=rng,
            box_key_of=self._announced_box_key,
            metrics=self.metrics,
            payments=payments,
        )
        self.queries: dict[bytes, QuerySession] = {}
        # Audits this peer runs as a querier (audit.py); None: it runs none.
        self.audit_book: AuditBook | None = None
        # Committee choice by reputation (reputation.py); None: the first k offers.
        self.committee_selector: ReputationSelector | None = None
        self._init_he(guard, payments)
        self._recent: OrderedDict[bytes, None] = OrderedDict()
        self._seq = 0

    # -- topics ---------------------------------------------------------------
    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def peers_topic(self) -> str:
        return peers_topic(self.config.net)

    @property
    def query_topic(self) -> str:
        return query_topic(self.config.net, self.card.task)

    def _announced_box_key(self, peer_id: str) -> bytes | None:
        """The X25519 key ``peer_id`` announced itself (signed), if we heard it."""
        info = self.membership.get(peer_id)
        return None if info is None else info.announce.box_key

    def topics(self) -> tuple[str, ...]:
        """Topics the driver must subscribe to before calling :meth:`start`."""
        return (self.peers_topic, self.query_topic)

    # -- lifecycle ------------------------------------------------------------
    def start(self, now_ms: int) -> list[Effect]:
        return self.heartbeat(now_ms)

    def announcement(self) -> Announce:
        return Announce(
            seq=self._seq,
            addresses=self.addresses,
            box_key=self.identity.box_public_key,
            eth_address=self.eth_address,
            card=self.card,
            price_wei=self.config.responder.price_wei,
            capacity=self.config.responder.capacity,
        )

    def heartbeat(self, now_ms: int) -> list[Effect]:
        """Announce now (also done every interval), expire silent peers, prune replay state."""
        self._seq += 1
        gone = self.membership.expire(now_ms)
        self.metrics["membership.expired"] += len(gone)
        self.verifier.replay.prune(now_ms)
        return [
            Publish(self.peers_topic, seal(self.identity, self.announcement(), now_ms)),
            SetTimer(MEMBERSHIP_TIMER, now_ms + self.config.announce_interval_ms),
        ]

    # -- input ----------------------------------------------------------------
    def receive(self, data: bytes, now_ms: int, *, topic: str | None = None) -> list[Effect]:
        """Handle bytes from the network (``topic`` set when they came by gossip)."""
        try:
            opened = self.verifier.open(data, now_ms)
            if (opened.kind in GOSSIP_KINDS) != (topic is not None):
                raise UnexpectedMessage(f"{opened.kind} on the wrong channel")
            effects = self._dispatch(opened, now_ms)
        except RemoteProtocolError as exc:
            self.metrics[f"rejected.{exc.reason}"] += 1
            return []
        if effects is None:
            self.metrics[f"late.{opened.kind}"] += 1
            return []
        self.metrics[f"accepted.{opened.kind}"] += 1
        return effects

    def _query(self, query_id: bytes) -> QuerySession:
        session = self.queries.get(query_id)
        if session is None or session.finished:
            raise UnexpectedMessage("no open query with this id")
        return session

    def _dispatch(self, opened: Opened, now_ms: int) -> list[Effect] | None:
        """The handler's effects; None for a message that came after its query ended."""
        msg, sender = opened.message, opened.sender
        he_effects = self._dispatch_he(opened, now_ms)
        if he_effects is not None:
            return he_effects
        match msg:
            case Announce():
                self.membership.on_announce(sender, msg, now_ms)
                return []
            case QueryRequest():
                return self.responder.on_request(sender, msg, now_ms)
            case Offer():
                return self._reap(self._query(msg.query_id).on_offer(sender, msg, now_ms))
            case Decline():
                effects = self._query(msg.query_id).on_decline(sender, msg, now_ms)
                self._count_decline(msg.reason)
                return self._reap(effects)
            case KeyShares():
                return self._reap(self._query(msg.query_id).on_key_shares(sender, msg, now_ms))
            case Share():
                if self.audit_book is not None:
                    self.audit_book.on_share(msg.query_id, sender, msg.commitment)
                return self._reap(self._query(msg.query_id).on_share(sender, msg, now_ms))
            case Reveal():
                if msg.query_id in self._recent and msg.query_id not in self.queries:
                    return None
                return self._reap(self._query(msg.query_id).on_reveal(sender, msg, now_ms))
            case Accept():
                return self.responder.on_accept(sender, msg, now_ms)
            case KeyRelay():
                return self.responder.on_key_relay(sender, msg, now_ms)
            case Unmask():
                return self.responder.on_unmask(sender, msg, now_ms)
            case Receipt():
                return self.responder.on_receipt(sender, msg, now_ms)
            case Result():
                return self.responder.on_result(sender, msg, now_ms)
            case OpenRequest():
                return self.responder.on_open_request(sender, msg, now_ms)
            case Opening():
                book = self.audit_book
                if book is None or not book.is_audit(msg.query_id):
                    raise UnexpectedMessage("opening for a query that is no audit of ours")
                ok = book.on_opening(sender, msg)
                self.metrics["audit.opened" if ok else "audit.not_opened"] += 1
                if self.committee_selector is not None and ok:
                    audited = sorted(book.opened)
                    scores = book.accuracy(audited)
                    contributions = dict(zip(audited, scores, strict=True))
                    self.committee_selector.set_contributions(contributions)
                return []
        raise UnexpectedMessage(f"no handler for {opened.kind}")  # pragma: no cover

    def _count_decline(self, reason: str) -> None:
        key = f"declined.{reason}"
        if key not in self.metrics:
            distinct = sum(1 for k in self.metrics if k.startswith("declined."))
            if distinct >= MAX_DECLINE_REASONS:
                key = "declined.other"
        self.metrics[key] += 1

    def _reap(self, effects: list[Effect]) -> list[Effect]:
        """Drop finished querier sessions once their QueryDone is emitted."""
        for effect in effects:
            if isinstance(effect, QueryDone):
                # (the session told its committee_selector how each member did)
                self.queries.pop(effect.outcome.query_id, None)
                self._recent[effect.outcome.query_id] = None
                if len(self._recent) > MAX_RECENT_QUERIES:
                    self._recent.popitem(last=False)
                self.metrics["queries.ok" if effect.outcome.ok else "queries.failed"] += 1
        return effects

    def on_timer(self, key: Hashable, now_ms: int) -> list[Effect]:
        if key == MEMBERSHIP_TIMER:
            return self.heartbeat(now_ms)
        he_effects = self._he_timer(key, now_ms)
        if he_effects is not None:
            return he_effects
        if isinstance(key, tuple) and len(key) == 3 and key[0] == "r-expire":
            return self.responder.on_expire((key[1], key[2]), now_ms)
        if not (isinstance(key, tuple) and len(key) == 2):
            raise LocalProtocolError(f"unknown timer {key!r}")
        kind, query_id = key
        session = self.queries.get(query_id)
        if session is None:
            return []
        if kind == "q-offers":
            return self._reap(session.on_offers_timer(now_ms))
        if kind == "q-deadline":
            return self._reap(session.on_deadline(now_ms))
        if kind == "q-keys":
            return self._reap(session.on_keys_timer(now_ms))
        if kind == "q-shares":
            return self._reap(session.on_shares_timer(now_ms))
        raise LocalProtocolError(f"unknown timer {key!r}")

    # -- local requests ---------------------------------------------------------
    def submit_query(
        self,
        x: npt.ArrayLike,
        *,
        rule: str,
        vector_len: int,
        k: int,
        max_price_wei: int,
        timeout_ms: int,
        now_ms: int,
        query_id: bytes | None = None,
        epsilon: float = 0.0,
        delta: float = 0.0,
        noise_sigma: float = 0.0,
        secagg: bool | None = None,
    ) -> tuple[bytes, list[Effect]]:
        """Start a query; its end arrives later as a QueryDone effect.

        ``epsilon``/``delta`` state the privacy each member spends (0: no DP);
        ``noise_sigma`` is the Gaussian noise std the sum must carry for it, which
        the caller calibrates (it knows the rule's sensitivity); members check it
        against their own policy. ``secagg`` overrides the configured mode.
        """
        query_id = query_id or nacl.utils.random(QUERY_ID_LEN)
        if query_id in self.queries:
            raise LocalProtocolError("query id already in use")
        vec = np.asarray(x, dtype=np.float32).ravel()
        try:
            request = QueryRequest(
                **request_fields(
                    self.card,
                    self.identity,
                    query_id=query_id,
                    rule=rule,
                    vector_len=vector_len,
                    k=k,
                    max_price_wei=max_price_wei,
                    deadline_ms=now_ms + timeout_ms,
                    epsilon=epsilon,
                    delta=delta,
                ),
                secagg=self.config.querier.secure_aggregation if secagg is None else secagg,
            )
        except ValueError as exc:
            raise LocalProtocolError(f"invalid query: {exc}") from exc
        check_noise(epsilon, noise_sigma)
        if not np.all(np.isfinite(vec)):
            raise LocalProtocolError("query input has NaN or infinite values")
        if k < self.config.querier.min_committee:
            raise LocalProtocolError(
                f"k={k} is below the minimum committee of {self.config.querier.min_committee}: "
                "a smaller committee would reveal single members' answers"
            )
        session = QuerySession(
            self.identity,
            request,
            vec,
            self.config.querier,
            now_ms,
            noise_sigma=noise_sigma,
            payments=self.payments,
            selector=self.committee_selector,
        )
        self.queries[query_id] = session
        self.metrics["queries.submitted"] += 1
        effects: list[Effect] = [Publish(self.query_topic, seal(self.identity, request, now_ms))]
        return query_id, effects + session.start()

    def evaluated(self, request: Evaluate, vector: npt.ArrayLike, now_ms: int) -> list[Effect]:
        """The driver's model output for an Evaluate effect."""
        if request.querier == self.peer_id:
            session = self.queries.get(request.query_id)
            return [] if session is None else self._reap(session.on_local(vector, now_ms))
        key = (request.querier, request.query_id)
        return self.responder.on_evaluated(key, vector, now_ms)

    def charged(self, charge: Charge, refusal: str | None, now_ms: int) -> list[Effect]:
        """The driver's answer to a Charge effect: None once the cost is durably
        recorded, else why it was not (the member then declines)."""
        if refusal is not None:
            self.metrics["charge.refused"] += 1
        if (charge.querier, charge.request.query_id) in self.he.responder.sessions:
            return self.he.responder.on_charged(
                (charge.querier, charge.request.query_id), refusal, now_ms
            )
        key = (charge.querier, charge.request.query_id)
        if self.responder.has_open_charge(key):
            return self.responder.on_open_charged(key, refusal, now_ms)
        return self.responder.on_charged((charge.querier, charge.request.query_id), refusal, now_ms)

    def request_openings(self, query_id: bytes, now_ms: int) -> list[Effect]:
        """After an audit query's answer: ask its members to open their commitments."""
        if self.audit_book is None or query_id in self.queries:
            return []  # not an audit of ours, or not over yet (openings come after the answer)
        return [
            Send(member, seal(self.identity, request, now_ms))
            for member, request in self.audit_book.open_requests(query_id)
        ]

    def escrow_opened(self, query_id: bytes, ok: bool, now_ms: int) -> list[Effect]:
        """The driver's answer to an OpenEscrow effect (ok: the escrow is on chain)."""
        self.metrics["escrow.opened" if ok else "escrow.failed"] += 1
        if query_id in self.he.queries:
            return self.he.reap(self.he.queries[query_id].on_escrow_opened(ok, now_ms))
        session = self.queries.get(query_id)
        return [] if session is None else self._reap(session.on_escrow_opened(ok, now_ms))

    def escrow_verified(self, key: tuple[str, bytes], ok: bool, now_ms: int) -> list[Effect]:
        """The driver's answer to a VerifyEscrow effect; ``key`` is (querier, query id)."""
        self.metrics["escrow.verified" if ok else "escrow.not_found"] += 1
        if key in self.he.responder.sessions:
            return self.he.responder.on_escrow_verified(key, ok, now_ms)
        return self.responder.on_escrow_verified(key, ok, now_ms)

    def evaluation_failed(self, request: Evaluate, now_ms: int) -> list[Effect]:
        """The driver could not evaluate the model for an Evaluate effect."""
        self.metrics["evaluation.failed"] += 1
        if request.querier == self.peer_id:
            session = self.queries.get(request.query_id)
            return [] if session is None else self._reap(session.on_local_failed(now_ms))
        key = (request.querier, request.query_id)
        return self.responder.on_evaluation_failed(key, now_ms)
