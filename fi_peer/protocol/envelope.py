"""Signed envelopes: the only thing fi-peer ever puts on a wire.

Wire form: the msgpack array ``[v, kind, sender, ts_ms, nonce, body, sig]`` with
``sender`` the 32-byte Ed25519 public key, ``nonce`` 16 random bytes, ``body``
the canonical encoding of one message dataclass (see codec.py) and

    sig = Ed25519(sender, msgpack(["fi-peer/v1", kind, ts_ms, nonce, body]))

The domain string keeps these signatures from ever being valid for anything
else signed by the same key (receipts on chain, libp2p's own handshakes).

A receiver runs the checks cheapest-first and stops at the first failure:
size (global cap, then the cap of the kind) -> envelope shape (canonical) -> kind known ->
signature -> time window (|ts - now| <= window) -> nonce unseen for this sender
-> strict body decoding. Each failure is a RemoteProtocolError subclass whose
``reason`` names it; nothing else escapes :meth:`Verifier.open`.

Pairwise-MAC envelopes (version 2; a deviation from DESIGN.md's "every
envelope is Ed25519-signed", made for throughput). The per-query messages
that only the querier and one member ever read -- ``MAC_KINDS``: KeyShares,
KeyRelay, Unmask, Reveal, Result -- may instead carry

    tag = BLAKE2b-256(key = K_uv, msgpack(["fi-peer/v1/mac", kind, sender,
                                           recipient, ts_ms, nonce, body]))

in the ``sig`` slot: ``[2, kind, sender, ts_ms, nonce, body, tag]``. ``K_uv``
is derived from the static X25519 agreement of the two peers' long-term box
keys (cached per pair, :func:`pair_key`) and both Ed25519 ids. The receiver
knows the sender's box key only from a message the sender *signed* with its
Ed25519 key (its QueryRequest's ``reply_key`` or its Offer's ``box_key``), so
the tag authenticates the sender exactly as well as the signature did to the
receiver (the tag names sender and recipient, so it cannot be reflected or
redirected), and the time window and the replay guard apply unchanged. What
is given up is only third-party verifiability (the recipient could have made
the tag itself), which none of these messages needs: everything that must be
provable to someone else -- Announce, QueryRequest, Offer, Accept, Share (its
commitment is what an audit opens), Receipt, Decline and any kind not listed
-- stays signed, and a v2 envelope of any other kind is rejected. Senders fall
back to signing when they do not know the recipient's box key; signed
envelopes of every kind are always accepted (older peers keep working).
Cost: ~2 us per MAC against ~25 us to sign plus ~50 us to verify.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import msgpack
import nacl.bindings
import nacl.exceptions
import nacl.utils

from fi_peer.errors import (
    BadSignature,
    MalformedMessage,
    OversizedMessage,
    RateLimited,
    ReplayedMessage,
    StaleMessage,
    UnknownKind,
)
from fi_peer.identity import (
    Identity,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_signature,
)
from fi_peer.protocol import codec
from fi_peer.protocol.messages import (
    MAX_ENVELOPE_BYTES,
    MESSAGE_TYPES,
    KeyRelay,
    KeyShares,
    Message,
    Offer,
    QueryRequest,
    Result,
    Reveal,
    Unmask,
)

VERSION = 1
MAC_VERSION = 2
SIGNING_DOMAIN = "fi-peer/v1"
MAC_DOMAIN = "fi-peer/v1/mac"
NONCE_LEN = 16
SIG_LEN = 64
MAC_LEN = 32
# Kinds that may be authenticated by the pair's MAC instead of a signature (see
# the module docs for why exactly these: read by querier and member only, never
# shown to a third party).
MAC_KINDS = frozenset({KeyShares.KIND, KeyRelay.KIND, Unmask.KIND, Reveal.KIND, Result.KIND})
# Signed messages that bind their sender to a long-term X25519 key, and the field.
_BINDING_FIELDS = {QueryRequest.KIND: "reply_key", Offer.KIND: "box_key"}
# Senders whose box key a verifier remembers (least recently used dropped).
MAX_BINDINGS = 16_384
DEFAULT_WINDOW_MS = 30_000
# Messages one sender may have inside one window. A querier sends each member
# 6 direct messages per query (QueryRequest, Accept, KeyRelay, Unmask, Receipt,
# Result), so 24,576 per 30 s (~819/s) admits a sustained ~136 queries/s from
# one querier (the throughput goal is 100); the memory bound is ~1.5 MB per
# sender at the limit (16,384 capped a querier at ~91 queries/s, 4,096 at ~22).
DEFAULT_MAX_NONCES_PER_SENDER = 24_576


def _packb(value: list[Any]) -> bytes:
    out = msgpack.packb(value, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


def signing_bytes(kind: str, ts_ms: int, nonce: bytes, body: bytes) -> bytes:
    # A list of scalars: msgpack directly gives what codec.pack would.
    return _packb([SIGNING_DOMAIN, kind, ts_ms, nonce, body])


@lru_cache(maxsize=8192)
def _pair_key(
    my_box_secret: bytes, me: bytes, my_box: bytes, them: bytes, their_box: bytes
) -> bytes:
    shared = nacl.bindings.crypto_scalarmult(my_box_secret, their_box)
    (a, a_box), (b, b_box) = sorted(((me, my_box), (them, their_box)))
    return hashlib.blake2b(
        shared + a + a_box + b + b_box, digest_size=32, person=b"fi-peer/v1/pair"
    ).digest()


def pair_key(identity: Identity, their_public_key: bytes, their_box_key: bytes) -> bytes | None:
    """The MAC key of ``identity`` and a peer (Ed25519 + X25519 public keys); symmetric.

    The X25519 agreement is done once per pair and cached (the Box of
    sealing.py and the secagg channels cache theirs the same way). None for a
    box key X25519 cannot agree with (low order).
    """
    try:
        return _pair_key(
            bytes(identity.box_key),
            identity.public_key,
            identity.box_public_key,
            their_public_key,
            their_box_key,
        )
    except (nacl.exceptions.CryptoError, nacl.exceptions.TypeError, ValueError, TypeError):
        return None


def mac_tag(
    key: bytes, kind: str, sender: bytes, recipient: bytes, ts_ms: int, nonce: bytes, body: bytes
) -> bytes:
    data = _packb([MAC_DOMAIN, kind, sender, recipient, ts_ms, nonce, body])
    return hashlib.blake2b(data, digest_size=MAC_LEN, key=key).digest()


def seal(
    identity: Identity,
    message: Message,
    now_ms: int,
    nonce: bytes | None = None,
    *,
    to: tuple[str, bytes] | None = None,
) -> bytes:
    """Seal ``message`` as ``identity`` at time ``now_ms`` and return the wire bytes.

    Signed (Ed25519), unless ``to`` names the recipient (peer id, long-term
    X25519 key) and the kind is in MAC_KINDS: then the pair's MAC authenticates it.
    """
    if nonce is None:
        nonce = nacl.utils.random(NONCE_LEN)
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce must be {NONCE_LEN} bytes")
    kind = message.KIND
    body = codec.pack(message)
    sender = identity.public_key
    if to is not None and kind in MAC_KINDS:
        recipient = public_key_from_peer_id(to[0])
        key = pair_key(identity, recipient, to[1])
        if key is not None:
            tag = mac_tag(key, kind, sender, recipient, now_ms, nonce, body)
            return _packb([MAC_VERSION, kind, sender, now_ms, nonce, body, tag])
    sig = identity.sign(signing_bytes(kind, now_ms, nonce, body))
    return _packb([VERSION, kind, sender, now_ms, nonce, body, sig])


@dataclass(frozen=True, slots=True)
class Opened:
    """A verified envelope and its decoded message."""

    kind: str
    sender: str
    ts_ms: int
    nonce: bytes
    message: Message
    size: int


def _parse(data: bytes) -> tuple[int, str, bytes, int, bytes, bytes, bytes]:
    raw: Any = codec.unpack_raw(data, max_len=MAX_ENVELOPE_BYTES)
    if type(raw) is not list or len(raw) != 7:
        raise MalformedMessage("envelope must be an array of 7 fields")
    v, kind, sender, ts_ms, nonce, body, sig = raw
    if type(v) is not int or v not in (VERSION, MAC_VERSION):
        raise MalformedMessage(f"unsupported envelope version {v!r}"[:80])
    if type(kind) is not str:
        raise MalformedMessage("envelope kind must be a string")
    if type(sender) is not bytes or len(sender) != 32:
        raise MalformedMessage("envelope sender must be a 32-byte key")
    if type(ts_ms) is not int or not 0 <= ts_ms < (1 << 63):
        raise MalformedMessage("envelope ts_ms must be a non-negative int")
    if type(nonce) is not bytes or len(nonce) != NONCE_LEN:
        raise MalformedMessage(f"envelope nonce must be {NONCE_LEN} bytes")
    if type(body) is not bytes:
        raise MalformedMessage("envelope body must be bytes")
    if type(sig) is not bytes or len(sig) != (SIG_LEN if v == VERSION else MAC_LEN):
        raise MalformedMessage(f"envelope sig must be {SIG_LEN} bytes ({MAC_LEN}: a MAC)")
    # The signature covers the values, not these bytes: without this check one signed
    # envelope would have many spellings (e.g. ts_ms as int32 instead of uint32).
    # Seven scalars: msgpack packs them as codec.pack would, without its walk.
    if _packb(raw) != data:
        raise MalformedMessage("non-canonical envelope encoding")
    return v, kind, sender, ts_ms, nonce, body, sig


class ReplayGuard:
    """Per-sender set of nonces seen inside the time window.

    A nonce needs remembering only while its timestamp is inside the window:
    older envelopes are rejected as stale before the guard is asked. Memory is
    bounded per sender; a sender that fills its allowance inside one window is
    rate limited rather than allowed to evict nonces (which would reopen replays).

    Each sender's nonces are kept in arrival order (a dict is ordered), so
    pruning pops expired entries from the front and stops at the first one still
    inside the window: O(expired), not O(remembered) at every heartbeat. A
    nonce whose timestamp is older than one that arrived before it (the
    sender's clock stepped back, or an earlier one was stamped ahead) waits
    until those ahead of it expire: kept longer, never dropped early, so no
    replay gets through; at the sender's limit every expired entry goes.
    """

    def __init__(self, window_ms: int, max_per_sender: int) -> None:
        self.window_ms = window_ms
        self.max_per_sender = max_per_sender
        self._seen: dict[str, dict[bytes, int]] = {}

    def check_and_record(self, sender: str, nonce: bytes, ts_ms: int, now_ms: int) -> None:
        seen = self._seen.get(sender)
        if seen is None:
            seen = self._seen[sender] = {}
        elif nonce in seen:
            raise ReplayedMessage("nonce already seen from this sender")
        if len(seen) >= self.max_per_sender:
            self._prune_all(seen, now_ms)
            if len(seen) >= self.max_per_sender:
                raise RateLimited("too many messages from this sender inside the window")
        seen[nonce] = ts_ms

    def _prune_all(self, seen: dict[bytes, int], now_ms: int) -> None:
        """At the limit only: every expired entry, also those behind a younger one."""
        horizon = now_ms - self.window_ms
        for nonce in [n for n, ts in seen.items() if ts < horizon]:
            del seen[nonce]

    @staticmethod
    def _prune_front(seen: dict[bytes, int], horizon: int) -> None:
        """Drop the expired entries at the front (oldest arrivals first)."""
        expired = []
        for nonce, ts in seen.items():
            if ts >= horizon:
                break
            expired.append(nonce)
        for nonce in expired:
            del seen[nonce]

    def prune(self, now_ms: int) -> None:
        """Forget what can no longer pass the time window (front-first; see the class)."""
        horizon = now_ms - self.window_ms
        for sender in list(self._seen):
            seen = self._seen[sender]
            self._prune_front(seen, horizon)
            if not seen:
                del self._seen[sender]

    def __len__(self) -> int:
        return sum(len(s) for s in self._seen.values())


class OpenMemo:
    """Signed envelopes already parsed, verified and decoded, shared by many Verifiers.

    For simulations only (fi_peer.simulate): there one process hosts N peers
    and every announcement reaches all N, so the same bytes would be checked N
    times. Parsing, the Ed25519 check and decoding are pure functions of the
    bytes, so their result is remembered; each peer's own checks (time
    window, replay guard, key bindings) still run for every copy. MAC
    envelopes are never memoised (their check depends on the recipient), nor
    anything that failed. A daemon (one peer per process, duplicates dropped
    by message id before verification) has no use for it.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[str, bytes, int, bytes, Message]] = OrderedDict()
        self.hits = 0

    def get(self, data: bytes) -> tuple[str, bytes, int, bytes, Message] | None:
        entry = self._entries.get(data)
        if entry is not None:
            self.hits += 1
        return entry

    def put(self, data: bytes, entry: tuple[str, bytes, int, bytes, Message]) -> None:
        self._entries[data] = entry
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class Verifier:
    """Checks incoming envelopes. One per peer; keeps the replay state.

    With ``identity`` it also accepts MAC envelopes addressed to that
    identity, from senders whose box key it learned from their own signed
    QueryRequest or Offer (``bindings``).
    """

    def __init__(
        self,
        *,
        window_ms: int = DEFAULT_WINDOW_MS,
        max_nonces_per_sender: int = DEFAULT_MAX_NONCES_PER_SENDER,
        identity: Identity | None = None,
    ) -> None:
        self.window_ms = window_ms
        self.replay = ReplayGuard(window_ms, max_nonces_per_sender)
        self.identity = identity
        self.memo: OpenMemo | None = None
        self.bindings: OrderedDict[bytes, bytes] = OrderedDict()  # Ed25519 key -> X25519 key

    def _bind(self, sender_key: bytes, box_key: bytes) -> None:
        bindings = self.bindings
        if bindings.get(sender_key) == box_key:
            bindings.move_to_end(sender_key)
            return
        bindings[sender_key] = box_key
        bindings.move_to_end(sender_key)
        if len(bindings) > MAX_BINDINGS:
            bindings.popitem(last=False)

    def _check_mac(
        self, kind: str, sender_key: bytes, ts_ms: int, nonce: bytes, body: bytes, tag: bytes
    ) -> None:
        if kind not in MAC_KINDS:
            raise BadSignature(f"{kind}: must be signed, not MAC'd")
        identity = self.identity
        box_key = self.bindings.get(sender_key)
        if identity is None or box_key is None:
            raise BadSignature(f"{kind}: no key of this sender to check its MAC")
        key = pair_key(identity, sender_key, box_key)
        expected = (
            None
            if key is None
            else mac_tag(key, kind, sender_key, identity.public_key, ts_ms, nonce, body)
        )
        if expected is None or not hmac.compare_digest(expected, tag):
            raise BadSignature(f"{kind}: MAC does not verify")

    def open(self, data: bytes, now_ms: int) -> Opened:
        if len(data) > MAX_ENVELOPE_BYTES:
            raise OversizedMessage(f"{len(data)} bytes exceeds the {MAX_ENVELOPE_BYTES} cap")
        memo = self.memo
        hit = None if memo is None else memo.get(data)
        if hit is not None:
            kind, sender_key, ts_ms, nonce, message = hit
            if abs(ts_ms - now_ms) > self.window_ms:
                raise StaleMessage(f"{kind}: timestamp off by {ts_ms - now_ms} ms")
            sender = peer_id_from_public_key(sender_key)
            self.replay.check_and_record(sender, nonce, ts_ms, now_ms)
        else:
            version, kind, sender_key, ts_ms, nonce, body, sig = _parse(data)
            cls = MESSAGE_TYPES.get(kind)
            if cls is None:
                raise UnknownKind(f"unknown message kind {kind[:40]!r}")
            if len(data) > cls.MAX_ENVELOPE:
                raise OversizedMessage(
                    f"{kind}: {len(data)} bytes exceeds its {cls.MAX_ENVELOPE} cap"
                )
            if version == MAC_VERSION:
                self._check_mac(kind, sender_key, ts_ms, nonce, body, sig)
            elif not verify_signature(sender_key, signing_bytes(kind, ts_ms, nonce, body), sig):
                raise BadSignature(f"{kind}: signature does not verify")
            if abs(ts_ms - now_ms) > self.window_ms:
                raise StaleMessage(f"{kind}: timestamp off by {ts_ms - now_ms} ms")
            sender = peer_id_from_public_key(sender_key)
            self.replay.check_and_record(sender, nonce, ts_ms, now_ms)
            message = codec.unpack(cls, body, max_len=cls.MAX_ENVELOPE)
            if memo is not None and version == VERSION:
                memo.put(data, (kind, sender_key, ts_ms, nonce, message))
        field_name = _BINDING_FIELDS.get(kind)
        if field_name is not None:
            self._bind(sender_key, getattr(message, field_name))
        return Opened(kind, sender, ts_ms, nonce, message, len(data))
