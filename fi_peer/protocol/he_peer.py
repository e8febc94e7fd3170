"""PeerCore's part of the HE (CKKS) query mode: routing and the driver's entry points.

A mixin, so that PeerCore (peer.py) needs only small hooks: ``_init_he`` in its
constructor, ``_dispatch_he`` before its own dispatch, ``_he_timer`` before its
own timers, and the charge/escrow answers routed by session key. The state
machines are in he_query.py; the messages in he_messages.py; the effects the
driver carries out (TenSEAL work) in he_effects.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from typing import TYPE_CHECKING

import nacl.utils
import numpy.typing as npt

from fi_peer.errors import LocalProtocolError
from fi_peer.identity import Identity
from fi_peer.protocol.effects import Effect, Publish, QueryDone
from fi_peer.protocol.envelope import Opened, seal
from fi_peer.protocol.guard import PrivacyGuard
from fi_peer.protocol.he_effects import HECombine, HEEvaluate
from fi_peer.protocol.he_messages import (
    HE_BATCH_MIN,
    HE_BATCH_RULES,
    HE_MAX_BATCH,
    HE_MAX_INPUTS,
    HEAccept,
    HEBlobAck,
    HEBlobChunk,
    HEContextAck,
    HEContextChunk,
    HEOffer,
    HEPartial,
    HEReady,
    HERequest,
    HERoute,
    he_card_rules,
)
from fi_peer.protocol.he_query import HEPeer, HEResponder
from fi_peer.protocol.messages import QUERY_ID_LEN, Decline, ModelCard, Receipt, Result
from fi_peer.protocol.payment import Payments
from fi_peer.protocol.querier import check_noise, request_fields

if TYPE_CHECKING:
    from fi_peer.protocol.membership import Membership
    from fi_peer.protocol.peer import CoreConfig


class HECoreMixin:
    identity: Identity
    card: ModelCard
    config: CoreConfig
    membership: Membership
    metrics: Counter[str]
    he: HEPeer

    def _init_he(self, guard: PrivacyGuard | None, payments: Payments | None) -> None:
        rc = self.config.responder
        responder = HEResponder(
            self.identity,
            self.card,
            self.config.he,
            price_wei=rc.price_wei,
            capacity=rc.capacity,
            max_query_ms=rc.max_query_ms,
            min_committee=rc.min_committee,
            expected_latency_ms=rc.expected_latency_ms,
            guard=guard,
            payments=payments,
            metrics=self.metrics,
        )
        self.he = HEPeer(
            self.identity, responder, self.config.he, payments=payments, capable=self._he_capable
        )

    def _he_capable(self, peer_id: str, rule: str) -> bool:
        """False for a peer whose last signed announcement says it does not serve the
        HE mode, or announces the HE rules it serves (``he:<rule>`` card entries) and
        not ``rule``. A peer not in the table (e.g. expired during a stall) is judged by
        its offer alone, as in the default mode: only HE-ready peers send HEOffers.
        A card without ``he:`` entries (an older peer) may serve any HE rule."""
        info = self.membership.get(peer_id)
        if info is None:
            return True
        card = info.announce.card
        served = he_card_rules(card.rules)
        return card.he and (served is None or rule in served)

    def _dispatch_he(self, opened: Opened, now_ms: int) -> list[Effect] | None:
        """Effects of an HE message (or a Decline/Receipt/Result of an HE query);
        None when the message belongs to the default flow."""
        msg, sender = opened.message, opened.sender
        he, member = self.he, self.he.responder
        match msg:
            case HERequest():
                return member.on_request(sender, msg, now_ms)
            case HEOffer():
                return he.reap(he.query(msg.query_id).on_offer(sender, msg, now_ms))
            case HEReady():
                return he.reap(he.query(msg.query_id).on_ready(sender, msg, now_ms))
            case HEContextChunk():
                return member.on_chunk(sender, msg, now_ms)
            case HEContextAck():
                return he.on_context_ack(sender, msg)
            case HEBlobChunk():
                if msg.querier == self.identity.peer_id:
                    return he.reap(he.query(msg.query_id).on_blob_chunk(sender, msg, now_ms))
                return member.on_blob_chunk(sender, msg, now_ms)
            case HEBlobAck():
                if msg.querier == self.identity.peer_id:
                    return he.query(msg.query_id).on_blob_ack(sender, msg)
                return member.on_blob_ack(sender, msg)
            case HEAccept():
                return member.on_accept(sender, msg, now_ms)
            case HERoute():
                return member.on_route(sender, msg, now_ms)
            case HEPartial():
                if msg.querier == self.identity.peer_id:
                    return he.reap(he.query(msg.query_id).on_partial(sender, msg, now_ms))
                return member.on_partial(sender, msg, now_ms)
            case Decline() if msg.query_id in he.queries:
                self.metrics[f"he.declined_by_member.{msg.reason[:32]}"] += 1
                return he.reap(he.query(msg.query_id).on_decline(sender, msg, now_ms))
            case Receipt() if (sender, msg.query_id) in member.sessions:
                return member.on_receipt(sender, msg, now_ms)
            case Result() if (sender, msg.query_id) in member.sessions:
                return member.on_result(sender, msg, now_ms)
        return None

    def _he_timer(self, key: Hashable, now_ms: int) -> list[Effect] | None:
        return self.he.on_timer(key, now_ms)

    # -- local requests (the querier's driver) ------------------------------------------
    def submit_he_query(
        self,
        blobs: tuple[bytes, ...],
        context: bytes,
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
        n_batched: int = 0,
    ) -> tuple[bytes, list[Effect]]:
        """Start an input-private query: ``blobs`` are the input encrypted under this
        peer's CKKS key (one single-layout ciphertext), ``context`` the matching
        *public* context (sent once per member and cached there). Its end arrives
        as a QueryDone whose total is the decrypted aggregate (after HEDecrypt).

        ``n_batched`` > 0: ``blobs`` is one batched-layout tensor of that many inputs
        (the ``support`` rule, no DP); it travels chunked (HEBlobChunk) and the total
        holds ``n_batched`` vectors, input after input."""
        query_id = query_id or nacl.utils.random(QUERY_ID_LEN)
        if query_id in self.he.queries:
            raise LocalProtocolError("query id already in use")
        if n_batched:
            if not HE_BATCH_MIN <= n_batched <= HE_MAX_BATCH or len(blobs) != 1:
                raise LocalProtocolError(
                    f"a batched HE query is one ciphertext of {HE_BATCH_MIN}..{HE_MAX_BATCH} inputs"
                )
            if rule not in HE_BATCH_RULES or epsilon > 0:
                raise LocalProtocolError(
                    "batched HE queries serve the support rule without DP (the DP-bounded "
                    "kernel evidence is single-layout only): send single queries"
                )
        elif not 1 <= len(blobs) <= HE_MAX_INPUTS:
            raise LocalProtocolError(f"an HE query carries 1..{HE_MAX_INPUTS} ciphertexts")
        check_noise(epsilon, noise_sigma)
        digest = self.he.set_context(context)
        try:
            request = HERequest(
                **request_fields(
                    self.card,
                    self.identity,
                    query_id=query_id,
                    rule=rule,
                    vector_len=vector_len,
                    k=k,
                    max_price_wei=max_price_wei,
                    deadline_ms=now_ms + timeout_ms,
                    epsilon=float(epsilon),
                    delta=float(delta),
                ),
                context_digest=digest,
                n_inputs=n_batched or len(blobs),
                layout="batched" if n_batched else "single",
            )
        except ValueError as exc:
            raise LocalProtocolError(f"invalid HE query: {exc}") from exc
        qc = self.config.querier
        if k < max(2, qc.min_committee):
            raise LocalProtocolError(
                f"k={k}: an HE aggregate needs a committee of at least {max(2, qc.min_committee)}"
            )
        session = self.he.submit(
            request,
            blobs,
            now_ms,
            offer_window_ms=qc.offer_window_ms,
            min_committee=qc.min_committee,
            noise_sigma=noise_sigma,
        )
        self.metrics["he.queries.submitted"] += 1
        topic = self.query_topic  # type: ignore[attr-defined]
        effects: list[Effect] = [Publish(topic, seal(self.identity, request, now_ms))]
        return query_id, effects + session.start()

    # -- the driver's answers -----------------------------------------------------------
    def seal_now(self, chunk: HEContextChunk | HEBlobChunk, now_ms: int) -> bytes:
        """A context or ciphertext chunk sealed by this peer now (for HESendChunks)."""
        if not isinstance(chunk, HEContextChunk | HEBlobChunk):
            raise LocalProtocolError("seal_now seals chunks only")
        return seal(self.identity, chunk, now_ms)

    def he_context_loaded(self, querier: str, digest: str, ok: bool, now_ms: int) -> list[Effect]:
        """Answer to HELoadContext (ok: the public context is loaded and kept)."""
        return self.he.responder.on_context_loaded(querier, digest, ok, now_ms)

    def he_evaluated(
        self, request: HEEvaluate, blobs: tuple[bytes, ...] | None, now_ms: int
    ) -> list[Effect]:
        """Answer to HEEvaluate: the encrypted, noised answer (None: it failed)."""
        if blobs is None:
            self.metrics["he.evaluation_failed"] += 1
        return self.he.responder.on_evaluated((request.querier, request.query_id), blobs, now_ms)

    def he_combined(
        self, request: HECombine, blobs: tuple[bytes, ...] | None, now_ms: int
    ) -> list[Effect]:
        """Answer to HECombine: the encrypted sum (None: the parts could not be added)."""
        if blobs is None:
            self.metrics["he.combine_failed"] += 1
        return self.he.responder.on_combined((request.querier, request.query_id), blobs, now_ms)

    def he_decrypted(
        self, query_id: bytes, values: npt.ArrayLike | None, now_ms: int
    ) -> list[Effect]:
        """Answer to HEDecrypt: the aggregate's values (None: undecryptable)."""
        session = self.he.queries.get(query_id)
        if session is None:
            return []
        effects = self.he.reap(session.on_decrypted(values, now_ms))
        for effect in effects:
            if isinstance(effect, QueryDone):
                self.metrics["he.queries.ok" if effect.outcome.ok else "he.queries.failed"] += 1
        return effects
