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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
from fi_peer.identity import Identity, peer_id_from_public_key, verify_signature
from fi_peer.protocol import codec
from fi_peer.protocol.messages import MAX_ENVELOPE_BYTES, MESSAGE_TYPES, Message

VERSION = 1
SIGNING_DOMAIN = "fi-peer/v1"
NONCE_LEN = 16
SIG_LEN = 64
DEFAULT_WINDOW_MS = 30_000
# Messages one sender may have inside one window. A querier sends each member
# about 6 direct messages per query, so 16,384 per 30 s (~546/s) admits a
# sustained ~90 queries/s from one querier; the memory bound is ~1 MB per
# sender at the limit (4,096 capped a querier at ~22 queries/s).
DEFAULT_MAX_NONCES_PER_SENDER = 16_384


def signing_bytes(kind: str, ts_ms: int, nonce: bytes, body: bytes) -> bytes:
    out = codec.pack([SIGNING_DOMAIN, kind, ts_ms, nonce, body])
    return out


def seal(identity: Identity, message: Message, now_ms: int, nonce: bytes | None = None) -> bytes:
    """Sign ``message`` as ``identity`` at time ``now_ms`` and return the wire bytes."""
    if nonce is None:
        nonce = nacl.utils.random(NONCE_LEN)
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce must be {NONCE_LEN} bytes")
    kind = message.KIND
    body = codec.pack(message)
    sig = identity.sign(signing_bytes(kind, now_ms, nonce, body))
    return codec.pack([VERSION, kind, identity.public_key, now_ms, nonce, body, sig])


@dataclass(frozen=True, slots=True)
class Opened:
    """A verified envelope and its decoded message."""

    kind: str
    sender: str
    ts_ms: int
    nonce: bytes
    message: Message
    size: int


def _parse(data: bytes) -> tuple[str, bytes, int, bytes, bytes, bytes]:
    raw: Any = codec.unpack_raw(data, max_len=MAX_ENVELOPE_BYTES)
    if type(raw) is not list or len(raw) != 7:
        raise MalformedMessage("envelope must be an array of 7 fields")
    v, kind, sender, ts_ms, nonce, body, sig = raw
    if type(v) is not int or v != VERSION:
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
    if type(sig) is not bytes or len(sig) != SIG_LEN:
        raise MalformedMessage(f"envelope sig must be {SIG_LEN} bytes")
    # The signature covers the values, not these bytes: without this check one signed
    # envelope would have many spellings (e.g. ts_ms as int32 instead of uint32).
    if codec.pack(raw) != data:
        raise MalformedMessage("non-canonical envelope encoding")
    return kind, sender, ts_ms, nonce, body, sig


class ReplayGuard:
    """Per-sender set of nonces seen inside the time window.

    A nonce needs remembering only while its timestamp is inside the window:
    older envelopes are rejected as stale before the guard is asked. Memory is
    bounded per sender; a sender that fills its allowance inside one window is
    rate limited rather than allowed to evict nonces (which would reopen replays).
    """

    def __init__(self, window_ms: int, max_per_sender: int) -> None:
        self.window_ms = window_ms
        self.max_per_sender = max_per_sender
        self._seen: dict[str, dict[bytes, int]] = {}

    def check_and_record(self, sender: str, nonce: bytes, ts_ms: int, now_ms: int) -> None:
        seen = self._seen.setdefault(sender, {})
        if nonce in seen:
            raise ReplayedMessage("nonce already seen from this sender")
        if len(seen) >= self.max_per_sender:
            self._prune_sender(sender, now_ms)
            if len(seen) >= self.max_per_sender:
                raise RateLimited("too many messages from this sender inside the window")
        seen[nonce] = ts_ms

    def _prune_sender(self, sender: str, now_ms: int) -> None:
        horizon = now_ms - self.window_ms
        seen = self._seen[sender]
        for nonce in [n for n, ts in seen.items() if ts < horizon]:
            del seen[nonce]

    def prune(self, now_ms: int) -> None:
        """Forget everything that can no longer pass the time window."""
        for sender in list(self._seen):
            self._prune_sender(sender, now_ms)
            if not self._seen[sender]:
                del self._seen[sender]

    def __len__(self) -> int:
        return sum(len(s) for s in self._seen.values())


class Verifier:
    """Checks incoming envelopes. One per peer; keeps the replay state."""

    def __init__(
        self,
        *,
        window_ms: int = DEFAULT_WINDOW_MS,
        max_nonces_per_sender: int = DEFAULT_MAX_NONCES_PER_SENDER,
    ) -> None:
        self.window_ms = window_ms
        self.replay = ReplayGuard(window_ms, max_nonces_per_sender)

    def open(self, data: bytes, now_ms: int) -> Opened:
        if len(data) > MAX_ENVELOPE_BYTES:
            raise OversizedMessage(f"{len(data)} bytes exceeds the {MAX_ENVELOPE_BYTES} cap")
        kind, sender_key, ts_ms, nonce, body, sig = _parse(data)
        cls = MESSAGE_TYPES.get(kind)
        if cls is None:
            raise UnknownKind(f"unknown message kind {kind[:40]!r}")
        if len(data) > cls.MAX_ENVELOPE:
            raise OversizedMessage(f"{kind}: {len(data)} bytes exceeds its {cls.MAX_ENVELOPE} cap")
        if not verify_signature(sender_key, signing_bytes(kind, ts_ms, nonce, body), sig):
            raise BadSignature(f"{kind}: signature does not verify")
        if abs(ts_ms - now_ms) > self.window_ms:
            raise StaleMessage(f"{kind}: timestamp off by {ts_ms - now_ms} ms")
        sender = peer_id_from_public_key(sender_key)
        self.replay.check_and_record(sender, nonce, ts_ms, now_ms)
        message = codec.unpack(cls, body, max_len=cls.MAX_ENVELOPE)
        return Opened(kind, sender, ts_ms, nonce, message, len(data))
