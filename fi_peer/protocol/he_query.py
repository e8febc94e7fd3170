"""The homomorphic (CKKS) query mode, sans-I/O: querier and member state machines.

Theory of operation (messages in he_messages.py; the CKKS work is the
driver's, asked for with the effects of he_effects.py)::

    querier: OFFERS --k offers / offer window (>= min_committee)---> ANSWERS
             OFFERS --paid: OpenEscrow, then as above-------------> ESCROW -> ANSWERS
             ANSWERS --all HEReady (or declined) / ready timer, >= t ready--> ROUTED
             ROUTED --root's HEPartial over >= t members (HEDecrypt)--> DECRYPTING
             DECRYPTING --he_decrypted--> DONE (receipts to the members summed)
             any --< t possible / deadline / root failure--> FAILED

    member:  (HERequest) --HEOffer--> OFFERED --HEAccept (escrow checked if paid)-->
             WAIT_CONTEXT (chunks -> HELoadContext) --> EVALUATING (HEEvaluate)
             --> CHARGING (Charge) --> READY (HEReady sent) --HERoute-->
             COLLECTING (children's HEPartials, timer) --HECombine--> SENT

Public context: the querier's context digest is in every HERequest; a member
answers ``has_context`` in its offer, and the querier sends the chunks only to
members without it, before the HEAccept, credit-based (:class:`ContextTransfers`:
``HE_CONTEXT_WINDOW`` chunks in flight per member, each HEContextAck releases
the next), so no chunk waits in a transport buffer past the replay window, however
many members load at once. Members cache loaded contexts per
(querier, digest) (least recently used, ``max_contexts``); a member takes
chunks only for a digest named by an open request of that querier, so nobody
can make it hold unsolicited megabytes.

Batched queries (docs/he.md, "Batched queries on the wire"): the request
tensor and every partial sum are too large for one message; the header
(HEAccept / HEPartial) names their digest and size and the bytes follow as
HEBlobChunks, windowed by HEBlobAck (:class:`ChunkWindow`), reassembled with
a cap from the request and the digest checked (:class:`BlobAssembler`). A
member waits for its input in WAIT_INPUT; a lost chunk fails the query with a
reason naming the transfer.

Aggregation (docs/he.md, choice (b)): homomorphic summation among members
along a heap over the *live* members in an order fixed by
sha256(query id | member id), which the querier cannot steer. The querier
learns who is live from the HEReady messages (a member sends it once its own
encrypted, noised answer is computed and its privacy cost charged), so
members that declined or died before that are simply not in the tree; a
member that dies later loses only its own subtree's answers (its parent goes
on at its level's timer); the root releases only a sum over >= t members,
and the querier decrypts only that (it checks the member set too). Members
check that a partial from a child names only members of that child's
subtree, and each member contributes to one aggregate per query.

DP: each member adds N(0, sigma^2 / t) inside its ciphertext (the noise std
is computed here, the sampling is the driver's); the privacy cost is charged
like a securely aggregated answer (``Charge`` with the equivalent
QueryRequest) before the member says it is ready, hence before any
ciphertext of its answer leaves. Escrow and receipts as in the default mode:
a receipt (and, paid, the querier's payment signature) for each member whose
answer is in the decrypted aggregate; ``share_digest`` is the aggregate's
sha256 (a member cannot see the aggregate, so it does not check it).
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fi_peer.errors import LocalProtocolError, UnexpectedMessage
from fi_peer.identity import Identity
from fi_peer.privacy.dp import member_noise_std
from fi_peer.protocol.effects import (
    Charge,
    Effect,
    OpenEscrow,
    QueryDone,
    Send,
    SetTimer,
    VerifyEscrow,
)
from fi_peer.protocol.envelope import seal
from fi_peer.protocol.guard import PrivacyGuard
from fi_peer.protocol.he_effects import (
    HECombine,
    HEDecrypt,
    HEEvaluate,
    HELoadContext,
    HESendChunks,
)
from fi_peer.protocol.he_messages import (
    HE_BLOB_WINDOW,
    HE_CHUNK_BYTES,
    HE_CONTEXT_WINDOW,
    HE_MAX_BLOB_CHUNKS,
    HE_MAX_CHUNKS,
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
)
from fi_peer.protocol.messages import Decline, Message, ModelCard, Receipt, Result
from fi_peer.protocol.payment import EscrowTerms, Payments
from fi_peer.protocol.querier import check_offer_address, escrow_for, query_done
from fi_peer.protocol.responder import MemberSide

MAX_CONTEXT_BYTES = HE_MAX_CHUNKS * HE_CHUNK_BYTES
DEFAULT_FAN_IN = 4
GRACE_MS = 5_000
SIGMA_RTOL = 1e-9

SessionKey = tuple[str, bytes]


def aggregation_order(query_id: bytes, members: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The members sorted by sha256(query id | member id): fixed by the query, not
    chosen by the querier (it picks the query id before knowing the offers)."""
    return tuple(
        sorted(members, key=lambda m: hashlib.sha256(query_id + bytes.fromhex(m)).digest())
    )


def tree_parent(live: tuple[str, ...], member: str, fan_in: int) -> str | None:
    """Where ``member`` sends its partial (None: it is the root, it sends to the querier)."""
    pos = live.index(member)
    return None if pos == 0 else live[(pos - 1) // fan_in]


def tree_children(live: tuple[str, ...], member: str, fan_in: int) -> tuple[str, ...]:
    pos = live.index(member)
    first = pos * fan_in + 1
    return live[first : first + fan_in]


def tree_subtree(live: tuple[str, ...], member: str, fan_in: int) -> frozenset[str]:
    out: set[str] = set()
    todo = [member]
    while todo:
        node = todo.pop()
        out.add(node)
        todo.extend(tree_children(live, node, fan_in))
    return frozenset(out)


def tree_height(live: tuple[str, ...], member: str, fan_in: int) -> int:
    """Levels below ``member`` (0 for a leaf)."""
    kids = tree_children(live, member, fan_in)
    return 0 if not kids else 1 + max(tree_height(live, k, fan_in) for k in kids)


def aggregate_digest(blobs: tuple[bytes, ...]) -> bytes:
    h = hashlib.sha256()
    for blob in blobs:
        h.update(len(blob).to_bytes(8, "big"))
        h.update(blob)
    return h.digest()


# --------------------------------------------------------------------------- chunked ciphertexts

MAX_BLOB_TRANSFER = HE_MAX_BLOB_CHUNKS * HE_CHUNK_BYTES
_CT_BYTES = 640 * 1024  # fi_peer.privacy.he.MAX_CIPHERTEXT_BYTES: one ciphertext, any level
_FRAME_SLACK = 64 * 1024


def request_cap(request: HERequest) -> int:
    """Most bytes a batched request may hold: one ciphertext per input feature."""
    return min(MAX_BLOB_TRANSFER, request.input_dim * _CT_BYTES + _FRAME_SLACK)


def response_cap(request: HERequest) -> int:
    """Most bytes a batched answer (or partial sum) may hold: one ciphertext per output,
    at the last level (~131 KB each)."""
    return min(MAX_BLOB_TRANSFER, request.vector_len * _CT_BYTES // 4 + _FRAME_SLACK)


def pack_blobs(blobs: tuple[bytes, ...]) -> bytes:
    """Ciphertext blobs as one byte string (each length-prefixed) for chunking."""
    return b"".join(len(b).to_bytes(4, "big") + b for b in blobs)


def unpack_blobs(data: bytes) -> tuple[bytes, ...]:
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise UnexpectedMessage("chunked ciphertexts: truncated length")
        size = int.from_bytes(data[pos : pos + 4], "big")
        pos += 4
        if size == 0 or pos + size > len(data):
            raise UnexpectedMessage("chunked ciphertexts: bad length")
        out.append(data[pos : pos + size])
        pos += size
    if not out:
        raise UnexpectedMessage("chunked ciphertexts: empty")
    return tuple(out)


def blob_chunks(query_id: bytes, querier: str, data: bytes) -> tuple[HEBlobChunk, ...]:
    """``data`` (pack_blobs) cut into HEBlobChunks named by its sha256."""
    if not 0 < len(data) <= MAX_BLOB_TRANSFER:
        raise LocalProtocolError(f"a chunked ciphertext is 1..{MAX_BLOB_TRANSFER} bytes")
    digest = hashlib.sha256(data).hexdigest()
    total = -(-len(data) // HE_CHUNK_BYTES)
    return tuple(
        HEBlobChunk(
            query_id=query_id,
            querier=querier,
            digest=digest,
            index=i,
            total=total,
            payload=data[i * HE_CHUNK_BYTES : (i + 1) * HE_CHUNK_BYTES],
        )
        for i in range(total)
    )


class ChunkWindow:
    """Sender side of one chunked ciphertext to one receiver, credit-based like
    :class:`ContextTransfers`: at most ``window`` chunks unacknowledged."""

    def __init__(
        self, peer: str, chunks: tuple[HEBlobChunk, ...], window: int = HE_BLOB_WINDOW
    ) -> None:
        if not chunks or window < 1:
            raise LocalProtocolError("a transfer has >= 1 chunk and a window >= 1")
        self.peer = peer
        self.chunks = chunks
        self.window = window
        self.sent = 0
        self.acked: set[int] = set()

    @property
    def digest(self) -> str:
        return self.chunks[0].digest

    @property
    def done(self) -> bool:
        return len(self.acked) == len(self.chunks)

    def start(self) -> HESendChunks:
        self.sent = min(self.window, len(self.chunks))
        return HESendChunks(self.peer, self.chunks[: self.sent])

    def on_ack(self, sender: str, ack: HEBlobAck) -> list[Effect]:
        if sender != self.peer or ack.digest != self.digest or ack.index >= self.sent:
            raise UnexpectedMessage("acknowledgement of a chunk not sent to this peer")
        self.acked.add(ack.index)
        end = min(len(self.acked) + self.window, len(self.chunks))
        if end <= self.sent:
            return []
        start, self.sent = self.sent, end
        return [HESendChunks(self.peer, self.chunks[start:end])]


class BlobAssembler:
    """Receiver side of one chunked ciphertext: any order, duplicates ignored,
    at most ``cap`` bytes (refused beyond: UnexpectedMessage), the sha256 checked
    once complete; ``expect`` is the size the header (HEAccept/HEPartial) declares,
    which may come before or after the chunks."""

    def __init__(self, digest: str, cap: int) -> None:
        self.digest = digest
        self.cap = cap
        self.total = 0
        self.parts: dict[int, bytes] = {}
        self.size = 0
        self.expect = 0
        self.data: bytes | None = None

    def declare(self, size: int) -> None:
        if size > self.cap:
            raise UnexpectedMessage(f"chunked ciphertext of {size} bytes above the cap {self.cap}")
        if self.data is not None and len(self.data) != size:
            raise UnexpectedMessage("chunked ciphertext is not the declared size")
        self.expect = size

    @property
    def missing(self) -> int:
        return self.total - len(self.parts) if self.total else -1

    def add(self, chunk: HEBlobChunk) -> bool:
        """Take a chunk; True when it was new (to acknowledge)."""
        if chunk.digest != self.digest:
            raise UnexpectedMessage("chunk of another ciphertext")
        if self.data is not None or chunk.index in self.parts:
            return False
        if not self.total:
            if (chunk.total - 1) * HE_CHUNK_BYTES >= self.cap:
                raise UnexpectedMessage(f"chunked ciphertext above the cap of {self.cap} bytes")
            self.total = chunk.total
        elif chunk.total != self.total:
            raise UnexpectedMessage("chunks disagree on their number")
        if self.size + len(chunk.payload) > self.cap:
            raise UnexpectedMessage(f"chunked ciphertext above the cap of {self.cap} bytes")
        self.parts[chunk.index] = chunk.payload
        self.size += len(chunk.payload)
        if len(self.parts) == self.total:
            data = b"".join(self.parts[i] for i in range(self.total))
            self.parts = {}
            if hashlib.sha256(data).hexdigest() != self.digest:
                raise UnexpectedMessage("reassembled ciphertext does not match its digest")
            if self.expect and len(data) != self.expect:
                raise UnexpectedMessage("chunked ciphertext is not the declared size")
            self.data = data
        return True

    def blobs(self) -> tuple[bytes, ...] | None:
        """The ciphertexts once complete (and declared), else None."""
        if self.data is None or not self.expect:
            return None
        return unpack_blobs(self.data)


@dataclass(frozen=True, slots=True, kw_only=True)
class HEConfig:
    """Knobs of the HE mode (both roles)."""

    fan_in: int = DEFAULT_FAN_IN
    # Querier: the time per tree level members wait for their children, and the
    # part of the time budget kept for the route and tree rounds.
    hop_ms: int = 1500
    route_reserve_ms: int = 4000
    # Member: serve HE queries (needs an HE-ready model: the card's ``he`` flag).
    max_hop_ms: int = 10_000
    max_contexts: int = 4
    max_pending_contexts: int = 4
    # Querier: a context transfer still under way is not started again before this.
    resend_ms: int = 120_000
    # Member: the rules whose HE vector it serves (fi_peer.he_runtime.HERuntime.rules);
    # others are declined at once ("rule_unsupported"). None: any rule of the card.
    rules: tuple[str, ...] | None = None


# --------------------------------------------------------------------------- querier


class ContextTransfers:
    """The querier's transfers of its public context, credit-based: at most
    ``window`` chunks unacknowledged per member; each HEContextAck of a chunk in
    flight releases the next one. Shared by this peer's HE queries (a transfer
    outlives the query that started it). A lost chunk stalls only its transfer;
    ``HEConfig.resend_ms`` later a new query starts it again."""

    def __init__(self, window: int = HE_CONTEXT_WINDOW) -> None:
        if window < 1:
            raise LocalProtocolError("the transfer window is >= 1 chunk")
        self.window = window
        self.chunks: tuple[HEContextChunk, ...] = ()
        self._next: dict[str, int] = {}
        self._acked: dict[str, set[int]] = {}

    def reset(self, chunks: tuple[HEContextChunk, ...]) -> None:
        self.chunks = chunks
        self._next.clear()
        self._acked.clear()

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(self._next)

    def start(self, peer: str) -> HESendChunks:
        first = min(self.window, len(self.chunks))
        self._next[peer] = first
        self._acked[peer] = set()
        return HESendChunks(peer, self.chunks[:first])

    def on_ack(self, peer: str, ack: HEContextAck) -> list[Effect]:
        nxt = self._next.get(peer)
        if nxt is None or not self.chunks or ack.digest != self.chunks[0].digest:
            raise UnexpectedMessage("acknowledgement of no context transfer under way")
        if ack.index >= nxt:
            raise UnexpectedMessage("acknowledgement of a chunk not sent")
        acked = self._acked[peer]
        acked.add(ack.index)
        if len(acked) == len(self.chunks):
            del self._next[peer], self._acked[peer]
            return []
        end = min(len(acked) + self.window, len(self.chunks))
        if end <= nxt:
            return []
        self._next[peer] = end
        return [HESendChunks(peer, self.chunks[nxt:end])]


class HQState(enum.Enum):
    OFFERS = "offers"
    ESCROW = "escrow"
    ANSWERS = "answers"
    ROUTED = "routed"
    DECRYPTING = "decrypting"
    DONE = "done"
    FAILED = "failed"


class HEQuerySession:
    def __init__(
        self,
        identity: Identity,
        request: HERequest,
        blobs: tuple[bytes, ...],
        chunks: tuple[HEContextChunk, ...],
        now_ms: int,
        *,
        offer_window_ms: int,
        min_committee: int,
        noise_sigma: float,
        config: HEConfig,
        payments: Payments | None,
        capable: Callable[[str, str], bool],
        context_sent: dict[str, int] | None = None,
        transfers: ContextTransfers | None = None,
    ) -> None:
        self.identity = identity
        self.request = request
        self.transfers = transfers
        # member -> when our context went to it (shared by this peer's HE queries)
        self.context_sent = context_sent if context_sent is not None else {}
        self.blobs = blobs
        self.chunks = chunks
        self.started_ms = now_ms
        self.offer_window_ms = offer_window_ms
        self.min_committee = max(2, min_committee)
        self.noise_sigma = noise_sigma
        self.config = config
        self.payments = payments
        self.capable = capable
        self.state = HQState.OFFERS
        self.offers: dict[str, HEOffer] = {}
        self.committee: tuple[str, ...] = ()
        self.eths: dict[str, str] = {}
        self.threshold = 0
        self.price = 0
        self.ready: set[str] = set()
        self.declined: set[str] = set()
        self.live: tuple[str, ...] = ()
        self.summed: tuple[str, ...] = ()
        self.aggregate: tuple[bytes, ...] = ()
        self.escrow: EscrowTerms | None = None
        self.escrow_open = False
        self.context_bytes_sent = 0
        # Batched: the request ciphertext goes chunked, windowed per member, after the
        # accept; the root's aggregate comes back chunked (header HEPartial + chunks).
        self.request_chunks: tuple[HEBlobChunk, ...] = ()
        self.request_bytes = 0
        self.windows: dict[str, ChunkWindow] = {}
        self.inbound: BlobAssembler | None = None
        self.header: HEPartial | None = None
        if request.batched:
            if len(blobs) != 1:
                raise LocalProtocolError("a batched HE query is one tensor ciphertext")
            data = pack_blobs(blobs)
            self.request_chunks = blob_chunks(request.query_id, identity.peer_id, data)
            self.request_bytes = len(data)

    @property
    def query_id(self) -> bytes:
        return self.request.query_id

    @property
    def finished(self) -> bool:
        return self.state in (HQState.DONE, HQState.FAILED)

    @property
    def paid_mode(self) -> bool:
        return self.payments is not None and self.request.max_price_wei > 0

    def timer(self, what: str) -> tuple[str, bytes]:
        return (f"he-q-{what}", self.query_id)

    def _send(self, peer: str, message: Message, now_ms: int) -> Send:
        return Send(peer, seal(self.identity, message, now_ms))

    def start(self) -> list[Effect]:
        half = (self.request.deadline_ms - self.started_ms) // 2
        window = min(self.offer_window_ms, half)
        return [
            SetTimer(self.timer("offers"), self.started_ms + window),
            SetTimer(self.timer("deadline"), self.request.deadline_ms),
        ]

    # -- offers -------------------------------------------------------------------
    def on_offer(self, sender: str, offer: HEOffer, now_ms: int) -> list[Effect]:
        if sender in self.offers:
            raise UnexpectedMessage("second offer from one peer")
        if not self.capable(sender, self.request.rule):
            raise UnexpectedMessage("HE offer from a peer that does not announce this HE rule")
        if offer.price_wei > self.request.max_price_wei:
            raise UnexpectedMessage("offer above the maximum price")
        if self.paid_mode:
            check_offer_address(offer.eth_address, (o.eth_address for o in self.offers.values()))
        if self.state is not HQState.OFFERS:
            late = Result(query_id=self.query_id, ok=False, reason="not_selected")
            return [self._send(sender, late, now_ms)]
        self.offers[sender] = offer
        if len(self.offers) >= self.request.k:
            return self._choose(now_ms)
        return []

    def on_offers_timer(self, now_ms: int) -> list[Effect]:
        if self.state is not HQState.OFFERS:
            return []
        if len(self.offers) < self.min_committee:
            return self._fail(f"too_few_offers_{len(self.offers)}", now_ms)
        return self._choose(now_ms)

    def _choose(self, now_ms: int) -> list[Effect]:
        chosen = list(self.offers.items())[: self.request.k]
        self.committee = tuple(p for p, _ in chosen)
        self.threshold = len(self.committee) // 2 + 1
        self.price = max(o.price_wei for _, o in chosen)
        paid = self.paid_mode and self.price > 0
        self.eths = {p: (o.eth_address if paid else "") for p, o in chosen}
        if paid:
            eths = tuple(self.eths[p] for p in self.committee)
            self.escrow = escrow_for(self.payments, self.request, eths, self.price)
            self.state = HQState.ESCROW
            return [OpenEscrow(self.escrow)]
        return self._send_accepts(now_ms)

    def on_escrow_opened(self, ok: bool, now_ms: int) -> list[Effect]:
        if self.state is not HQState.ESCROW:
            return []
        if not ok:
            return self._fail("escrow_failed", now_ms)
        self.escrow_open = True
        return self._send_accepts(now_ms)

    def _send_accepts(self, now_ms: int) -> list[Effect]:
        self.state = HQState.ANSWERS
        escrow = self.escrow
        effects: list[Effect] = []
        for peer in self.committee:
            recent = now_ms - self.context_sent.get(peer, -(10**15)) < self.config.resend_ms
            if not self.offers[peer].has_context and not recent:
                # sealed as they leave; windowed when the peer's transfers are tracked
                if self.transfers is not None:
                    effects.append(self.transfers.start(peer))
                else:
                    effects.append(HESendChunks(peer, self.chunks))
                self.context_sent[peer] = now_ms
                self.context_bytes_sent += sum(len(c.payload) for c in self.chunks)
            accept = HEAccept(
                query_id=self.query_id,
                members=self.committee,
                eth_addresses=tuple(self.eths[p] for p in self.committee),
                threshold=self.threshold,
                fan_in=self.config.fan_in,
                price_wei=self.price,
                noise_sigma=self.noise_sigma,
                context_digest=self.request.context_digest,
                blobs=() if self.request_chunks else self.blobs,
                querier_eth="" if escrow is None else escrow.querier,
                escrow_deadline_s=0 if escrow is None else escrow.deadline_s,
                blob_digest=self.request_chunks[0].digest if self.request_chunks else "",
                blob_bytes=self.request_bytes,
            )
            effects.append(self._send(peer, accept, now_ms))
            if self.request_chunks:
                window = self.windows[peer] = ChunkWindow(peer, self.request_chunks)
                effects.append(window.start())
        reserve = min(self.config.route_reserve_ms, (self.request.deadline_ms - now_ms) // 3)
        effects.append(SetTimer(self.timer("ready"), self.request.deadline_ms - reserve))
        return effects

    # -- readiness, route ------------------------------------------------------------
    def on_ready(self, sender: str, msg: HEReady, now_ms: int) -> list[Effect]:
        if self.state is not HQState.ANSWERS or sender not in self.committee:
            raise UnexpectedMessage("HE ready outside the answer round or from a non-member")
        if sender in self.ready or sender in self.declined:
            raise UnexpectedMessage("second answer from one member")
        self.ready.add(sender)
        if len(self.ready | self.declined) == len(self.committee):
            return self._route(now_ms)
        return []

    def on_ready_timer(self, now_ms: int) -> list[Effect]:
        return self._route(now_ms) if self.state is HQState.ANSWERS else []

    def _route(self, now_ms: int) -> list[Effect]:
        if len(self.ready) < self.threshold:
            # Members still waiting for our public context: say so, it is the usual
            # cause on a slow network (the transfer goes on and later queries succeed).
            active = set(self.transfers.active) if self.transfers is not None else set()
            stalled = [m for m in self.committee if m in active and m not in self.ready]
            if stalled:
                reason = f"key_exchange_incomplete_{len(stalled)}_of_{len(self.committee)}"
                return self._fail(reason, now_ms)
            gone = self.declined | self.ready
            unsent = [m for m, w in self.windows.items() if not w.done and m not in gone]
            if unsent:
                # a batched request whose chunks did not all arrive (acknowledged)
                reason = f"input_transfer_incomplete_{len(unsent)}_of_{len(self.committee)}"
                return self._fail(reason, now_ms)
            return self._fail(f"too_few_answers_{len(self.ready)}_of_{self.threshold}", now_ms)
        order = aggregation_order(self.query_id, self.committee)
        self.live = tuple(m for m in order if m in self.ready)
        self.state = HQState.ROUTED
        route = HERoute(query_id=self.query_id, live=self.live, hop_ms=self.config.hop_ms)
        data = seal(self.identity, route, now_ms)
        effects: list[Effect] = [Send(m, data) for m in self.live]
        excluded = Result(query_id=self.query_id, ok=False, reason="excluded")
        for m in self.committee:
            if m not in self.ready and m not in self.declined:
                effects.append(self._send(m, excluded, now_ms))
        return effects

    def on_partial(self, sender: str, partial: HEPartial, now_ms: int) -> list[Effect]:
        if self.state is not HQState.ROUTED or not self.live or sender != self.live[0]:
            raise UnexpectedMessage("HE aggregate not from the root of this query's tree")
        members = set(partial.members)
        if partial.querier != self.identity.peer_id or not members <= set(self.live):
            raise UnexpectedMessage("HE aggregate names another querier or non-members")
        if len(members) < self.threshold:
            raise UnexpectedMessage("HE aggregate over fewer members than the threshold")
        if self.request.batched:
            if not partial.blob_digest or self.header is not None:
                raise UnexpectedMessage("batched HE aggregate not chunked, or a second one")
            self.header = partial
            try:
                self._inbound(partial.blob_digest).declare(partial.blob_bytes)
            except UnexpectedMessage as exc:
                return self._fail(f"aggregate_refused_{str(exc)[:24].replace(' ', '_')}", now_ms)
            return self._maybe_decrypt()
        if len(partial.blobs) != self.request.n_inputs:
            raise UnexpectedMessage("HE aggregate has the wrong number of ciphertexts")
        self.summed = partial.members
        self.aggregate = partial.blobs
        self.state = HQState.DECRYPTING
        return [HEDecrypt(self.query_id, partial.blobs, self.request.vector_len)]

    # -- chunked ciphertexts (batched) ---------------------------------------------------
    def on_blob_ack(self, sender: str, ack: HEBlobAck) -> list[Effect]:
        window = self.windows.get(sender)
        if window is None:
            raise UnexpectedMessage("acknowledgement of no transfer to this peer")
        return window.on_ack(sender, ack)

    def _inbound(self, digest: str) -> BlobAssembler:
        if self.inbound is None:
            self.inbound = BlobAssembler(digest, response_cap(self.request))
        elif self.inbound.digest != digest:
            raise UnexpectedMessage("chunks of a second aggregate")
        return self.inbound

    def on_blob_chunk(self, sender: str, chunk: HEBlobChunk, now_ms: int) -> list[Effect]:
        """A chunk of the root's batched aggregate (from the root only)."""
        if self.state is not HQState.ROUTED or not self.live or sender != self.live[0]:
            raise UnexpectedMessage("aggregate chunk not from the root of this query's tree")
        if not self.request.batched:
            raise UnexpectedMessage("chunked aggregate of a single-layout query")
        try:
            new = self._inbound(chunk.digest).add(chunk)
        except UnexpectedMessage as exc:
            return self._fail(f"aggregate_refused_{str(exc)[:24].replace(' ', '_')}", now_ms)
        if not new:
            return []
        ack = HEBlobAck(
            query_id=self.query_id, querier=chunk.querier, digest=chunk.digest, index=chunk.index
        )
        return [self._send(sender, ack, now_ms), *self._maybe_decrypt()]

    def _maybe_decrypt(self) -> list[Effect]:
        if self.header is None or self.inbound is None:
            return []
        blobs = self.inbound.blobs()
        if blobs is None:
            return []
        if len(blobs) != 1:
            raise UnexpectedMessage("a batched aggregate is one tensor ciphertext")
        self.summed = self.header.members
        self.aggregate = blobs
        self.state = HQState.DECRYPTING
        self.inbound = None
        n = self.request.n_inputs
        return [HEDecrypt(self.query_id, blobs, self.request.vector_len, "batched", n)]

    def on_decrypted(self, values: npt.ArrayLike | None, now_ms: int) -> list[Effect]:
        if self.state is not HQState.DECRYPTING:
            return []
        if values is None:
            return self._fail("decrypt_failed", now_ms)
        total = np.asarray(values, dtype=np.float64).ravel()
        if total.shape != (self.request.vector_len * self.request.n_inputs,) or not np.all(
            np.isfinite(total)
        ):
            return self._fail("decrypt_failed", now_ms)
        self.state = HQState.DONE
        digest = aggregate_digest(self.aggregate)
        effects: list[Effect] = []
        for member in self.summed:
            signature = b""
            if self.escrow is not None:
                assert self.payments is not None
                signature = self.payments.sign_receipt(self.query_id, self.eths[member], self.price)
            receipt = Receipt(
                query_id=self.query_id,
                member=member,
                share_digest=digest,
                price_wei=self.price,
                payment_sig=signature,
            )
            effects.append(self._send(member, receipt, now_ms))
        done = query_done(
            self.query_id,
            "ok",
            total=total,
            contributors=tuple(sorted(self.summed)),
            committee_size=len(self.committee),
            elapsed_ms=now_ms - self.started_ms,
            payment=self._payment(),
        )
        result = Result(query_id=self.query_id, ok=True, contributors=tuple(sorted(self.summed)))
        return [*effects, *self._notify(result, now_ms), done]

    # -- declines, deadline ------------------------------------------------------------
    def on_decline(self, sender: str, decline: Decline, now_ms: int) -> list[Effect]:
        if self.state is HQState.OFFERS:
            self.offers.pop(sender, None)
            return []
        if sender not in self.committee:
            raise UnexpectedMessage("decline from a peer outside the committee")
        if self.state is HQState.ANSWERS:
            if sender in self.ready or sender in self.declined:
                raise UnexpectedMessage("decline after an answer")
            self.declined.add(sender)
            if len(self.committee) - len(self.declined) < self.threshold:
                return self._fail(f"declined_{len(self.declined)}_of_{len(self.committee)}", now_ms)
            if len(self.ready | self.declined) == len(self.committee):
                return self._route(now_ms)
            return []
        if self.state is HQState.ROUTED and self.live and sender == self.live[0]:
            return self._fail(f"root_{decline.reason}", now_ms)
        return []

    def on_deadline(self, now_ms: int) -> list[Effect]:
        if self.finished:
            return []
        inbound = self.inbound
        if self.state is HQState.ROUTED and inbound is not None and inbound.missing != 0:
            missing = inbound.missing if inbound.missing > 0 else "all"
            return self._fail(f"aggregate_transfer_incomplete_{missing}_chunks_missing", now_ms)
        return self._fail(f"deadline_in_{self.state.value}", now_ms)

    def _payment(self) -> tuple[EscrowTerms | None, tuple[str, ...]]:
        if self.escrow is None or not self.escrow_open:
            return None, ()
        return self.escrow, tuple(self.eths[m] for m in sorted(self.summed))

    def _notify(self, result: Result, now_ms: int) -> list[Effect]:
        data = seal(self.identity, result, now_ms)
        return [Send(m, data) for m in self.committee]

    def _fail(self, reason: str, now_ms: int) -> list[Effect]:
        self.state = HQState.FAILED
        done = query_done(
            self.query_id,
            reason,
            total=None,
            contributors=(),
            committee_size=len(self.committee),
            elapsed_ms=now_ms - self.started_ms,
            payment=self._payment(),
        )
        result = Result(query_id=self.query_id, ok=False, reason=reason[:64])
        return [*self._notify(result, now_ms), done]


# --------------------------------------------------------------------------- member


class HRState(enum.Enum):
    OFFERED = "offered"
    VERIFYING = "verifying"
    WAIT_INPUT = "wait_input"  # batched: the request's chunks are still arriving
    WAIT_CONTEXT = "wait_context"
    EVALUATING = "evaluating"
    CHARGING = "charging"
    READY = "ready"
    COLLECTING = "collecting"
    COMBINING = "combining"
    SENT = "sent"


@dataclass(slots=True)
class HEMemberSession:
    querier: str
    request: HERequest
    state: HRState
    price_wei: int
    accept: HEAccept | None = None
    escrow: EscrowTerms | None = None
    own: tuple[bytes, ...] = ()
    live: tuple[str, ...] = ()
    children: tuple[str, ...] = ()
    received: dict[str, HEPartial] = field(default_factory=dict)
    parts: dict[str, tuple[bytes, ...]] = field(default_factory=dict)  # received's blobs
    # came before our route: the partial and its blobs
    early: dict[str, tuple[HEPartial, tuple[bytes, ...]]] = field(default_factory=dict)
    receipt: Receipt | None = None
    # Batched: chunked ciphertexts coming in, per (sender, digest): the querier's
    # request and the children's partial sums; chunked partials' headers waiting for
    # their chunks; the request once reassembled; our own partial going out.
    inbound: dict[tuple[str, str], BlobAssembler] = field(default_factory=dict)
    headers: dict[str, HEPartial] = field(default_factory=dict)
    input_blobs: tuple[bytes, ...] | None = None
    outbound: ChunkWindow | None = None


class HEResponder(MemberSide):
    """Member side of the HE mode (one per peer; sessions per (querier, query id))."""

    def __init__(
        self,
        identity: Identity,
        card: ModelCard,
        config: HEConfig,
        *,
        price_wei: int,
        capacity: int,
        max_query_ms: int,
        min_committee: int,
        expected_latency_ms: int,
        guard: PrivacyGuard | None,
        payments: Payments | None,
        metrics: Counter[str],
    ) -> None:
        self.identity = identity
        self.card = card
        self.config = config
        self.price_wei = price_wei
        self.capacity = capacity
        self.max_query_ms = max_query_ms
        self.min_committee = min_committee
        self.expected_latency_ms = expected_latency_ms
        self.guard = guard
        self.payments = payments
        self.metrics = metrics
        self.sessions: dict[SessionKey, HEMemberSession] = {}
        self.receipts: list[Receipt] = []
        # Contexts the driver holds, per (querier, digest), least recently used first.
        self.contexts: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.loading: set[tuple[str, str]] = set()
        self._chunks: OrderedDict[tuple[str, str], tuple[int, dict[int, bytes]]] = OrderedDict()

    @property
    def me(self) -> str:
        return self.identity.peer_id

    def _send(self, peer: str, message: Message, now_ms: int) -> Send:
        return Send(peer, seal(self.identity, message, now_ms))

    @staticmethod
    def expire_timer(key: SessionKey) -> tuple[str, str, bytes]:
        return ("he-r-expire", key[0], key[1])

    @staticmethod
    def combine_timer(key: SessionKey) -> tuple[str, str, bytes]:
        return ("he-r-combine", key[0], key[1])

    def _decline(self, key: SessionKey, reason: str, now_ms: int) -> list[Effect]:
        self.sessions.pop(key, None)
        self.metrics[f"he.declined.{reason}"] += 1
        return [self._send(key[0], Decline(query_id=key[1], reason=reason), now_ms)]

    def has_context(self, querier: str, digest: str) -> bool:
        return (querier, digest) in self.contexts

    # -- request, offer ------------------------------------------------------------
    def can_serve(self, request: HERequest, now_ms: int) -> str | None:
        card = self.card
        if not card.he:
            return "he_unsupported"
        if self.config.rules is not None and request.rule not in self.config.rules:
            return "rule_unsupported"
        return self._serve_refusal(
            request,
            now_ms,
            price_wei=self.price_wei,
            max_query_ms=self.max_query_ms,
            capacity=self.capacity,
        )

    def on_request(self, sender: str, request: HERequest, now_ms: int) -> list[Effect]:
        key = (sender, request.query_id)
        if sender == self.me or key in self.sessions:
            return []
        if request.deadline_ms <= now_ms:
            raise UnexpectedMessage("HE request already past its deadline")
        if self.can_serve(request, now_ms) is not None:
            return []
        if self.guard is not None:
            # as_query_request() is aggregated (secagg): the guard prices the full sigma
            refusal = self._privacy_refusal(sender, request.as_query_request(), now_ms)
            if refusal is not None:
                return self._decline(key, refusal, now_ms)
        self.sessions[key] = HEMemberSession(sender, request, HRState.OFFERED, self.price_wei)
        offer = HEOffer(
            query_id=request.query_id,
            price_wei=self.price_wei,
            expected_latency_ms=self.expected_latency_ms,
            eth_address="" if self.payments is None else self.payments.eth_address,
            has_context=self.has_context(sender, request.context_digest),
        )
        # Without the context the accept comes after ~12 MB of chunks: wait until the deadline.
        ttl = 10_000 if offer.has_context else request.deadline_ms - now_ms
        expiry = min(request.deadline_ms, now_ms + ttl)
        return [self._send(sender, offer, now_ms), SetTimer(self.expire_timer(key), expiry)]

    def _session(self, key: SessionKey, *states: HRState) -> HEMemberSession:
        session = self.sessions.get(key)
        if session is None:
            raise UnexpectedMessage("no HE query of this querier is open here")
        if states and session.state not in states:
            raise UnexpectedMessage(f"HE message not expected in state {session.state.value}")
        return session

    # -- public context ----------------------------------------------------------------
    def on_chunk(self, sender: str, chunk: HEContextChunk, now_ms: int) -> list[Effect]:
        wanted = (sender, chunk.digest) in self._chunks or any(
            q == sender and s.request.context_digest == chunk.digest
            for (q, _), s in self.sessions.items()
        )  # a transfer once started is finished even if its query ended meanwhile
        if not wanted:
            raise UnexpectedMessage("context chunk no open HE request of this querier names")
        ckey = (sender, chunk.digest)
        if ckey in self.contexts or ckey in self.loading:
            return []  # a duplicate (resent for a second query meanwhile)
        entry = self._chunks.get(ckey)
        if entry is None:
            while len(self._chunks) >= self.config.max_pending_contexts:
                self._chunks.popitem(last=False)
            entry = self._chunks[ckey] = (chunk.total, {})
        total, parts = entry
        if total != chunk.total:
            del self._chunks[ckey]
            raise UnexpectedMessage("context chunks disagree on their number")
        if chunk.index in parts:
            return []
        parts[chunk.index] = chunk.payload
        ack = self._send(sender, HEContextAck(digest=chunk.digest, index=chunk.index), now_ms)
        if len(parts) < total:
            return [ack]
        del self._chunks[ckey]
        data = b"".join(parts[i] for i in range(chunk.total))
        if hashlib.sha256(data).hexdigest() != chunk.digest:
            raise UnexpectedMessage("reassembled context does not match its digest")
        self.loading.add(ckey)
        return [ack, HELoadContext(sender, chunk.digest, data)]

    def on_context_loaded(self, querier: str, digest: str, ok: bool, now_ms: int) -> list[Effect]:
        ckey = (querier, digest)
        self.loading.discard(ckey)
        waiting = [
            k
            for k, s in self.sessions.items()
            if k[0] == querier
            and s.state is HRState.WAIT_CONTEXT
            and s.request.context_digest == digest
        ]
        if not ok:
            self.metrics["he.context_rejected"] += 1
            effects: list[Effect] = []
            for k in waiting:
                effects += self._decline(k, "bad_context", now_ms)
            return effects
        self.contexts[ckey] = None
        self.contexts.move_to_end(ckey)
        while len(self.contexts) > self.config.max_contexts:
            self.contexts.popitem(last=False)
        effects = []
        for k in waiting:
            effects += self._evaluate(k, self.sessions[k])
        return effects

    # -- accept, evaluation, charge ---------------------------------------------------
    def on_accept(self, sender: str, accept: HEAccept, now_ms: int) -> list[Effect]:
        key = (sender, accept.query_id)
        session = self._session(key, HRState.OFFERED)
        request = session.request
        if self.me not in accept.members:
            raise UnexpectedMessage("HE accept does not list this peer")
        if accept.context_digest != request.context_digest:
            raise UnexpectedMessage("HE accept names another context than the request")
        if request.batched != bool(accept.blob_digest):
            raise UnexpectedMessage("HE accept: chunked iff the request is batched")
        if not request.batched and len(accept.blobs) != request.n_inputs:
            raise UnexpectedMessage("HE accept carries the wrong number of ciphertexts")
        if accept.price_wei < session.price_wei:
            raise UnexpectedMessage("HE accept below the offered price")
        n, t = len(accept.members), accept.threshold
        refusal: str | None = None
        if n < max(2, self.min_committee):
            refusal = "committee_too_small"
        elif 2 * t <= n or t < 2:
            refusal = "threshold_not_majority"
        elif request.batched and accept.blob_bytes > request_cap(request):
            refusal = "input_too_large"
        else:
            required = 0.0
            if self.guard is not None:
                req = self.guard.required_sigma(request.as_query_request())
                required = math.inf if req is None else req
            if accept.noise_sigma < required * (1 - SIGMA_RTOL):
                refusal = "noise_too_low"
        if refusal is not None:
            return self._decline(key, refusal, now_ms)
        mine = accept.eth_addresses[accept.members.index(self.me)]
        escrow, refusal = self._escrow_terms(session, accept, mine, accept.eth_addresses)
        if refusal is not None:
            return self._decline(key, refusal, now_ms)
        session.price_wei = accept.price_wei
        session.accept = accept
        expire = SetTimer(self.expire_timer(key), request.deadline_ms + GRACE_MS)
        if escrow is not None:
            session.escrow = escrow
            session.state = HRState.VERIFYING
            return [VerifyEscrow(sender, escrow), expire]
        return [*self._proceed(key, session), expire]

    def on_escrow_verified(self, key: SessionKey, ok: bool, now_ms: int) -> list[Effect]:
        session = self.sessions.get(key)
        if session is None or session.state is not HRState.VERIFYING:
            return []
        if not ok:
            return self._decline(key, "escrow_not_found", now_ms)
        return self._proceed(key, session)

    def _proceed(self, key: SessionKey, session: HEMemberSession) -> list[Effect]:
        accept = session.accept
        assert accept is not None
        if session.request.batched and session.input_blobs is None:
            asm = session.inbound.get((key[0], accept.blob_digest))
            blobs = None
            if asm is not None:
                asm.declare(accept.blob_bytes)
                blobs = asm.blobs()
            if blobs is None:
                session.state = HRState.WAIT_INPUT
                return []
            if len(blobs) != 1:
                raise UnexpectedMessage("a batched HE request is one tensor ciphertext")
            session.input_blobs = blobs
            del session.inbound[(key[0], accept.blob_digest)]
        digest = session.request.context_digest
        if (key[0], digest) in self.contexts:
            self.contexts.move_to_end((key[0], digest))
            return self._evaluate(key, session)
        session.state = HRState.WAIT_CONTEXT
        return []

    def _evaluate(self, key: SessionKey, session: HEMemberSession) -> list[Effect]:
        accept = session.accept
        assert accept is not None
        session.state = HRState.EVALUATING
        std = member_noise_std(accept.noise_sigma, accept.threshold) if accept.noise_sigma else 0.0
        request = session.request
        if request.batched:
            assert session.input_blobs is not None
            blobs, session.input_blobs = session.input_blobs, ()
            evaluate = HEEvaluate(
                key[0], key[1], accept.context_digest, blobs, std, request.rule,
                "batched", request.n_inputs,
            )  # fmt: skip
            return [evaluate]
        return [HEEvaluate(key[0], key[1], accept.context_digest, accept.blobs, std, request.rule)]

    def on_evaluated(
        self, key: SessionKey, blobs: tuple[bytes, ...] | None, now_ms: int
    ) -> list[Effect]:
        session = self.sessions.get(key)
        if session is None or session.state is not HRState.EVALUATING:
            return []
        if blobs is None:
            return self._decline(key, "model_error", now_ms)
        session.own = blobs
        session.state = HRState.CHARGING
        if self.guard is None:
            return self.on_charged(key, None, now_ms)
        accept = session.accept
        assert accept is not None
        return [Charge(key[0], session.request.as_query_request(), accept.noise_sigma)]

    def on_charged(self, key: SessionKey, refusal: str | None, now_ms: int) -> list[Effect]:
        session = self.sessions.get(key)
        if session is None or session.state is not HRState.CHARGING:
            return []
        if refusal is not None:
            return self._decline(key, refusal, now_ms)
        session.state = HRState.READY
        return [self._send(key[0], HEReady(query_id=key[1]), now_ms)]

    # -- tree -----------------------------------------------------------------------
    def on_route(self, sender: str, route: HERoute, now_ms: int) -> list[Effect]:
        key = (sender, route.query_id)
        session = self._session(key, HRState.READY)
        accept = session.accept
        assert accept is not None
        order = aggregation_order(route.query_id, accept.members)
        live = tuple(m for m in order if m in set(route.live))
        if set(route.live) - set(accept.members) or self.me not in live:
            raise UnexpectedMessage("HE route names non-members or leaves this peer out")
        if len(live) < accept.threshold:
            return self._decline(key, "route_below_threshold", now_ms)
        if route.hop_ms > self.config.max_hop_ms:
            return self._decline(key, "hop_too_long", now_ms)
        session.live = live
        session.children = tree_children(live, self.me, accept.fan_in)
        session.state = HRState.COLLECTING
        if not session.children:
            return self._combine(key, session, now_ms)
        early, session.early = session.early, {}
        for child, (partial, blobs) in early.items():
            try:
                effects = self._take_partial(key, session, child, partial, blobs, now_ms)
            except UnexpectedMessage:
                self.metrics["he.rejected_early_partial"] += 1
                continue
            if effects:
                return effects  # all children were in: combined
        wait = tree_height(live, self.me, accept.fan_in) * route.hop_ms
        return [SetTimer(self.combine_timer(key), now_ms + wait)]

    def on_partial(self, sender: str, partial: HEPartial, now_ms: int) -> list[Effect]:
        key = (partial.querier, partial.query_id)
        session = self._session(key, HRState.READY, HRState.COLLECTING)
        accept = session.accept
        assert accept is not None
        if session.request.batched != bool(partial.blob_digest):
            raise UnexpectedMessage("HE partial: chunked iff the request is batched")
        if not partial.blob_digest:
            return self._partial_complete(key, session, sender, partial, partial.blobs, now_ms)
        if sender not in accept.members or sender in session.headers:
            raise UnexpectedMessage("HE partial from a non-member, or a second one")
        session.headers[sender] = partial
        asm = self._inbound(session, sender, partial.blob_digest)
        asm.declare(partial.blob_bytes)
        blobs = asm.blobs()
        if blobs is None:
            return []  # its chunks are still coming
        del session.inbound[(sender, partial.blob_digest)]
        return self._partial_complete(key, session, sender, partial, blobs, now_ms)

    def _partial_complete(
        self,
        key: SessionKey,
        session: HEMemberSession,
        sender: str,
        partial: HEPartial,
        blobs: tuple[bytes, ...],
        now_ms: int,
    ) -> list[Effect]:
        accept = session.accept
        assert accept is not None
        if session.state is HRState.READY:
            # The child got its route first: keep it until ours arrives (checked then).
            if sender not in accept.members or sender in session.early:
                raise UnexpectedMessage("HE partial from a non-member, or a second one")
            session.early[sender] = (partial, blobs)
            return []
        if session.state is not HRState.COLLECTING:
            return []  # combined already (its level's timer went off first)
        return self._take_partial(key, session, sender, partial, blobs, now_ms)

    # -- chunked ciphertexts (batched) ---------------------------------------------------
    def _inbound(self, session: HEMemberSession, sender: str, digest: str) -> BlobAssembler:
        ikey = (sender, digest)
        asm = session.inbound.get(ikey)
        if asm is None:
            if any(s == sender for s, _ in session.inbound):
                raise UnexpectedMessage("a second chunked ciphertext from one peer")
            cap = (
                request_cap(session.request)
                if sender == session.querier
                else response_cap(session.request)
            )
            asm = session.inbound[ikey] = BlobAssembler(digest, cap)
        return asm

    def on_blob_chunk(self, sender: str, chunk: HEBlobChunk, now_ms: int) -> list[Effect]:
        """A chunk of the querier's batched request, or of a child's batched partial."""
        key = (chunk.querier, chunk.query_id)
        session = self.sessions.get(key)
        if session is None or not session.request.batched:
            raise UnexpectedMessage("ciphertext chunk of no open batched HE query")
        accept = session.accept
        if sender == session.querier:
            if session.input_blobs is not None or session.state not in (
                HRState.OFFERED,
                HRState.VERIFYING,
                HRState.WAIT_INPUT,
            ):
                return []  # complete already
            if accept is not None and chunk.digest != accept.blob_digest:
                raise UnexpectedMessage("request chunk of another ciphertext than accepted")
        elif accept is None or sender not in accept.members or sender == self.me:
            raise UnexpectedMessage("partial-sum chunk from a non-member")
        elif session.state not in (HRState.READY, HRState.COLLECTING) or sender in session.parts:
            return []
        asm = self._inbound(session, sender, chunk.digest)
        try:
            new = asm.add(chunk)
        except UnexpectedMessage:
            session.inbound.pop((sender, chunk.digest), None)
            if sender == session.querier:
                self.metrics["he.input_refused"] += 1
                return self._decline(key, "input_refused", now_ms)
            raise
        if not new:
            return []
        ack = HEBlobAck(
            query_id=chunk.query_id, querier=chunk.querier, digest=chunk.digest, index=chunk.index
        )
        effects: list[Effect] = [self._send(sender, ack, now_ms)]
        if asm.data is None:
            return effects
        if sender == session.querier:
            if session.state is HRState.WAIT_INPUT:
                effects += self._proceed(key, session)
            return effects
        header = session.headers.get(sender)
        blobs = asm.blobs()
        if header is None or blobs is None:
            return effects  # the header comes later
        del session.inbound[(sender, chunk.digest)]
        return effects + self._partial_complete(key, session, sender, header, blobs, now_ms)

    def on_blob_ack(self, sender: str, ack: HEBlobAck) -> list[Effect]:
        """Our parent (or the querier) took a chunk of our batched partial sum."""
        session = self.sessions.get((ack.querier, ack.query_id))
        if session is None or session.outbound is None:
            raise UnexpectedMessage("acknowledgement of no partial sum sent from here")
        return session.outbound.on_ack(sender, ack)

    def _take_partial(
        self,
        key: SessionKey,
        session: HEMemberSession,
        sender: str,
        partial: HEPartial,
        blobs: tuple[bytes, ...],
        now_ms: int,
    ) -> list[Effect]:
        accept = session.accept
        assert accept is not None
        if sender not in session.children or sender in session.received:
            raise UnexpectedMessage("HE partial from a non-child, or a second one")
        allowed = tree_subtree(session.live, sender, accept.fan_in)
        if sender not in partial.members or not set(partial.members) <= allowed:
            raise UnexpectedMessage("HE partial names members outside the child's subtree")
        expected = 1 if session.request.batched else session.request.n_inputs
        if len(blobs) != expected:
            raise UnexpectedMessage("HE partial has the wrong number of ciphertexts")
        session.received[sender] = partial
        session.parts[sender] = blobs
        if set(session.received) == set(session.children):
            return self._combine(key, session, now_ms)
        return []

    def on_combine_timer(self, key: SessionKey, now_ms: int) -> list[Effect]:
        session = self.sessions.get(key)
        if session is None or session.state is not HRState.COLLECTING:
            return []
        self.metrics["he.children_missing"] += len(session.children) - len(session.received)
        return self._combine(key, session, now_ms)

    def _members(self, session: HEMemberSession) -> tuple[str, ...]:
        members = {self.me}
        for p in session.received.values():
            members |= set(p.members)
        return tuple(sorted(members))

    def _combine(self, key: SessionKey, session: HEMemberSession, now_ms: int) -> list[Effect]:
        accept = session.accept
        assert accept is not None
        if (
            tree_parent(session.live, self.me, accept.fan_in) is None
            and len(self._members(session)) < accept.threshold
        ):
            return self._decline(key, "aggregate_below_threshold", now_ms)
        if not session.received:
            return self._forward(key, session, session.own, now_ms)
        session.state = HRState.COMBINING
        parts = (session.own, *(session.parts[s] for s in session.received))
        request = session.request
        if request.batched:
            combine = HECombine(
                key[0], key[1], accept.context_digest, parts,
                "batched", request.n_inputs, request.vector_len,
            )  # fmt: skip
            return [combine]
        return [HECombine(key[0], key[1], accept.context_digest, parts)]

    def on_combined(
        self, key: SessionKey, blobs: tuple[bytes, ...] | None, now_ms: int
    ) -> list[Effect]:
        session = self.sessions.get(key)
        if session is None or session.state is not HRState.COMBINING:
            return []
        if blobs is None:
            return self._decline(key, "combine_failed", now_ms)
        return self._forward(key, session, blobs, now_ms)

    def _forward(
        self, key: SessionKey, session: HEMemberSession, blobs: tuple[bytes, ...], now_ms: int
    ) -> list[Effect]:
        accept = session.accept
        assert accept is not None
        parent = tree_parent(session.live, self.me, accept.fan_in)
        to = key[0] if parent is None else parent
        members = self._members(session)
        session.state = HRState.SENT
        session.own = ()
        session.received = {}
        session.parts = {}
        session.inbound = {}
        self.metrics["he.partials_sent"] += 1
        if not session.request.batched:
            partial = HEPartial(query_id=key[1], querier=key[0], members=members, blobs=blobs)
            return [self._send(to, partial, now_ms)]
        # Batched (~2.6 MB): a header, then the chunks, windowed by the receiver's acks.
        data = pack_blobs(blobs)
        chunks = blob_chunks(key[1], key[0], data)
        header = HEPartial(
            query_id=key[1],
            querier=key[0],
            members=members,
            blobs=(),
            blob_digest=chunks[0].digest,
            blob_bytes=len(data),
        )
        session.outbound = ChunkWindow(to, chunks)
        return [self._send(to, header, now_ms), session.outbound.start()]

    # -- receipts, results -------------------------------------------------------------
    def on_receipt(self, sender: str, receipt: Receipt, now_ms: int) -> list[Effect]:
        session = self._session((sender, receipt.query_id), HRState.SENT)
        if receipt.member != self.me or session.receipt is not None:
            raise UnexpectedMessage("receipt not for this member, or a second one")
        return self._book_receipt(sender, receipt, session)


# --------------------------------------------------------------------------- both roles


class HEPeer:
    """The HE mode of one PeerCore: its querier sessions and its member side."""

    def __init__(
        self,
        identity: Identity,
        responder: HEResponder,
        config: HEConfig,
        *,
        payments: Payments | None,
        capable: Callable[[str, str], bool],
    ) -> None:
        self.identity = identity
        self.responder = responder
        self.config = config
        self.payments = payments
        self.capable = capable
        self.queries: dict[bytes, HEQuerySession] = {}
        self._chunks: tuple[HEContextChunk, ...] = ()
        self._digest = ""
        self._context_sent: dict[str, int] = {}
        self.transfers = ContextTransfers()

    def set_context(self, data: bytes) -> str:
        """The public context this peer's HE queries use (chunked once); its digest."""
        digest = hashlib.sha256(data).hexdigest()
        if digest != self._digest:
            if not 0 < len(data) <= MAX_CONTEXT_BYTES:
                raise LocalProtocolError(f"a public context is 1..{MAX_CONTEXT_BYTES} bytes")
            total = -(-len(data) // HE_CHUNK_BYTES)
            self._chunks = tuple(
                HEContextChunk(
                    digest=digest,
                    index=i,
                    total=total,
                    payload=data[i * HE_CHUNK_BYTES : (i + 1) * HE_CHUNK_BYTES],
                )
                for i in range(total)
            )
            self._digest = digest
            self._context_sent.clear()
            self.transfers.reset(self._chunks)
        return digest

    def submit(
        self,
        request: HERequest,
        blobs: tuple[bytes, ...],
        now_ms: int,
        *,
        offer_window_ms: int,
        min_committee: int,
        noise_sigma: float,
    ) -> HEQuerySession:
        if request.context_digest != self._digest:
            raise LocalProtocolError("set_context() the public context of this query first")
        session = HEQuerySession(
            self.identity,
            request,
            blobs,
            self._chunks,
            now_ms,
            offer_window_ms=offer_window_ms,
            min_committee=min_committee,
            noise_sigma=noise_sigma,
            config=self.config,
            payments=self.payments,
            capable=self.capable,
            context_sent=self._context_sent,
            transfers=self.transfers,
        )
        self.queries[request.query_id] = session
        return session

    def on_context_ack(self, sender: str, ack: HEContextAck) -> list[Effect]:
        """A member took a chunk of our context: send it the next ones of its window."""
        return self.transfers.on_ack(sender, ack)

    def query(self, query_id: bytes) -> HEQuerySession:
        session = self.queries.get(query_id)
        if session is None or session.finished:
            raise UnexpectedMessage("no open HE query with this id")
        return session

    def reap(self, effects: list[Effect]) -> list[Effect]:
        for effect in effects:
            if isinstance(effect, QueryDone):
                self.queries.pop(effect.outcome.query_id, None)
        return effects

    def on_timer(self, key: Hashable, now_ms: int) -> list[Effect] | None:
        """Effects of an HE timer; None when ``key`` is not one."""
        if not (isinstance(key, tuple) and key and isinstance(key[0], str)):
            return None
        kind = key[0]
        if kind in ("he-r-expire", "he-r-combine") and len(key) == 3:
            skey = (key[1], key[2])
            if kind == "he-r-expire":
                return self.responder.on_expire(skey, now_ms)
            return self.responder.on_combine_timer(skey, now_ms)
        if kind.startswith("he-q-") and len(key) == 2:
            session = self.queries.get(key[1])
            if session is None:
                return []
            if kind == "he-q-offers":
                return self.reap(session.on_offers_timer(now_ms))
            if kind == "he-q-ready":
                return self.reap(session.on_ready_timer(now_ms))
            if kind == "he-q-deadline":
                return self.reap(session.on_deadline(now_ms))
        return None
