"""Signed envelopes (envelope.py; DESIGN.md, "Wire format").

Every way an envelope can be wrong is rejected with its own RemoteProtocolError
subclass, and nothing else ever escapes ``Verifier.open``.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fi_peer.errors import (
    BadSignature,
    MalformedMessage,
    OversizedMessage,
    RateLimited,
    RemoteProtocolError,
    ReplayedMessage,
    StaleMessage,
    UnexpectedMessage,
    UnknownKind,
)
from fi_peer.identity import Identity, verify_signature
from fi_peer.privacy.secagg import CIPHERTEXT_LEN, TAG_LEN
from fi_peer.privacy.shamir import SHARE_LEN
from fi_peer.protocol import codec, envelope
from fi_peer.protocol.envelope import (
    DEFAULT_WINDOW_MS,
    SIGNING_DOMAIN,
    ReplayGuard,
    Verifier,
    seal,
    signing_bytes,
)
from fi_peer.protocol.messages import (
    MAX_ENVELOPE_BYTES,
    MESSAGE_TYPES,
    Accept,
    Announce,
    Decline,
    KeyRelay,
    KeyShares,
    Member,
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
from tests.unit.he_wire import he_samples

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z: ts_ms needs a uint64 on the wire
SMALL_NOW = 1_000_000  # as in SansIoNet: ts_ms fits a uint32
W = DEFAULT_WINDOW_MS

ALICE = Identity.from_seed(b"alice")
BOB = Identity.from_seed(b"bob")
MALLORY = Identity.from_seed(b"mallory")

OFFER = Offer(query_id=b"q" * 16, price_wei=7, box_key=ALICE.box_public_key,
              expected_latency_ms=40)
CARD = ModelCard(task="toy", n_classes=3, input_dim=4, arch="fn", model_hash=b"h" * 32,
                 rules=("soft", "vote"))
SAMPLES = [
    Announce(seq=3, addresses=("/ip4/127.0.0.1/tcp/4001",), box_key=b"k" * 32, eth_address="",
             card=CARD, price_wei=5, capacity=8),
    QueryRequest(query_id=b"q" * 16, task="toy", n_classes=3, input_dim=4, rule="soft",
                 vector_len=3, k=2, max_price_wei=100, deadline_ms=NOW + 5000,
                 reply_key=b"r" * 32, epsilon=1.0, delta=1e-5),
    OFFER,
    Accept(query_id=b"q" * 16, committee=(Member(peer_id=BOB.peer_id, box_key=b"k" * 32),),
           threshold=1, price_wei=7, answer_deadline_ms=NOW + 5000, escrow_ref=b"",
           noise_sigma=0.25, sealed_input=b"s" * 80),
    Decline(query_id=b"q" * 16, reason="busy"),
    KeyShares(query_id=b"q" * 16, ciphertexts=(b"e" * CIPHERTEXT_LEN,) * 2, commitment=b"c" * 32),
    KeyRelay(query_id=b"q" * 16, u1=(0, 2), ciphertexts=(b"e" * CIPHERTEXT_LEN,)),
    Share(query_id=b"q" * 16, vector=b"\x01" * 24, commitment=b"c" * 32),
    Share(query_id=b"q" * 16, vector=b"\x01" * 24, commitment=b"", view_tags=(b"t" * TAG_LEN,)),
    Unmask(query_id=b"q" * 16, survivors=(0, 2), dropped=(1,), view_tags=(b"t" * TAG_LEN,)),
    Reveal(query_id=b"q" * 16, seed_shares=(b"\x00" * SHARE_LEN,) * 2,
           pair_seeds=(b"\x01" * 32,)),
    Receipt(query_id=b"q" * 16, member=BOB.peer_id, share_digest=b"d" * 32, price_wei=7),
    Result(query_id=b"q" * 16, ok=True, contributors=(BOB.peer_id,)),
    Share(query_id=b"q" * 16, vector=b"\x01" * 24, commitment=b"c" * 32, commitment_sig=b"s" * 65),
    OpenRequest(query_id=b"q" * 16),
    Opening(query_id=b"q" * 16, vector=b"\x01" * 24, nonce=b"n" * 32),
    Opening(query_id=b"q" * 16, refused="open_limit"),
    *he_samples(NOW),
]
assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())

_nonces = (i.to_bytes(16, "big") for i in itertools.count(1))


def fresh_nonce() -> bytes:
    return next(_nonces)


def fields_of(data: bytes) -> list[Any]:
    out = msgpack.unpackb(data, raw=False)
    assert isinstance(out, list)
    return out


def repack(fields: list[Any]) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def signed(
    signer: Identity,
    kind: str,
    body: bytes,
    *,
    ts: int = NOW,
    nonce: bytes | None = None,
    sender: bytes | None = None,
) -> bytes:
    """An envelope with a genuine signature over arbitrary kind/body."""
    nonce = fresh_nonce() if nonce is None else nonce
    sig = signer.sign(signing_bytes(kind, ts, nonce, body))
    return repack([1, kind, signer.public_key if sender is None else sender, ts, nonce, body, sig])


def signed_of_size(kind: str, size: int) -> bytes:
    """A genuinely signed envelope of exactly ``size`` bytes (body is filler)."""
    length = max(0, size - len(signed(ALICE, kind, b"")))
    for _ in range(4):
        data = signed(ALICE, kind, b"\x00" * length)
        if len(data) == size:
            return data
        length += size - len(data)
    raise AssertionError(f"cannot build a {kind} envelope of {size} bytes")  # pragma: no cover


def open_fresh(data: bytes, now: int = NOW) -> envelope.Opened:
    return Verifier().open(data, now)


# -- the happy path ----------------------------------------------------------------


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.KIND)
@pytest.mark.parametrize("now", [NOW, SMALL_NOW])
def test_seal_then_open(msg: Any, now: int) -> None:
    data = seal(ALICE, msg, now)
    opened = open_fresh(data, now)
    assert opened.message == msg
    assert (opened.kind, opened.sender, opened.ts_ms, opened.size) == (
        msg.KIND, ALICE.peer_id, now, len(data)
    )
    v, kind, sender, ts, nonce, body, sig = fields_of(data)
    assert (v, kind, sender, ts, nonce) == (1, msg.KIND, ALICE.public_key, now, opened.nonce)
    assert body == codec.pack(msg)
    assert len(nonce) == 16 and len(sig) == 64
    assert verify_signature(ALICE.public_key, signing_bytes(kind, ts, nonce, body), sig)
    assert codec.pack(fields_of(data)) == data  # the envelope itself is canonical


def test_signing_bytes_carry_the_domain() -> None:
    raw = signing_bytes("offer", 5, b"n" * 16, b"body")
    assert msgpack.unpackb(raw, raw=False) == [SIGNING_DOMAIN, "offer", 5, b"n" * 16, b"body"]
    assert SIGNING_DOMAIN == "fi-peer/v1"


def test_seal_nonces_are_fresh_and_checked() -> None:
    a, b = seal(ALICE, OFFER, NOW), seal(ALICE, OFFER, NOW)
    assert fields_of(a)[4] != fields_of(b)[4]
    fixed = b"N" * 16
    assert seal(ALICE, OFFER, NOW, nonce=fixed) == seal(ALICE, OFFER, NOW, nonce=fixed)
    for bad in (b"", b"N" * 15, b"N" * 17):
        with pytest.raises(ValueError):
            seal(ALICE, OFFER, NOW, nonce=bad)


# -- each field tampered after signing --------------------------------------------

V, KIND, SENDER, TS, NONCE, BODY, SIG = range(7)


def _flip(b: bytes, i: int = 0) -> bytes:
    return b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1 :]


TAMPER: list[tuple[str, int, Any, type[RemoteProtocolError]]] = [
    ("v=2", V, lambda v: 2, MalformedMessage),
    ("v=0", V, lambda v: 0, MalformedMessage),
    ("v=True", V, lambda v: True, MalformedMessage),
    ("v=1.0", V, lambda v: 1.0, MalformedMessage),
    ("v='1'", V, lambda v: "1", MalformedMessage),
    ("kind=other known", KIND, lambda k: "decline", BadSignature),
    ("kind=result", KIND, lambda k: "result", BadSignature),
    ("kind=unknown", KIND, lambda k: "offer2", UnknownKind),
    ("kind=empty", KIND, lambda k: "", UnknownKind),
    ("kind=bytes", KIND, lambda k: k.encode(), MalformedMessage),
    ("kind=int", KIND, lambda k: 3, MalformedMessage),
    ("sender=other key", SENDER, lambda s: BOB.public_key, BadSignature),
    ("sender=flipped", SENDER, lambda s: _flip(s, 31), BadSignature),
    ("sender=zeros", SENDER, lambda s: b"\x00" * 32, BadSignature),
    ("sender=not a point", SENDER, lambda s: b"\xff" * 32, BadSignature),
    ("sender=31 bytes", SENDER, lambda s: s[:31], MalformedMessage),
    ("sender=hex str", SENDER, lambda s: s.hex(), MalformedMessage),
    ("ts+1", TS, lambda t: t + 1, BadSignature),
    ("ts-1", TS, lambda t: t - 1, BadSignature),
    ("ts=-1", TS, lambda t: -1, MalformedMessage),
    ("ts=2**63", TS, lambda t: 2**63, MalformedMessage),
    ("ts=float", TS, lambda t: float(t), MalformedMessage),
    ("nonce=flipped", NONCE, lambda n: _flip(n, 15), BadSignature),
    ("nonce=15 bytes", NONCE, lambda n: n[:15], MalformedMessage),
    ("nonce=17 bytes", NONCE, lambda n: n + b"\x00", MalformedMessage),
    ("nonce=None", NONCE, lambda n: None, MalformedMessage),
    ("body=flipped first", BODY, lambda b: _flip(b, 0), BadSignature),
    ("body=flipped last", BODY, lambda b: _flip(b, len(b) - 1), BadSignature),
    ("body=extended", BODY, lambda b: b + b"\x00", BadSignature),
    ("body=truncated", BODY, lambda b: b[:-1], BadSignature),
    ("body=empty", BODY, lambda b: b"", BadSignature),
    ("body=other message", BODY, lambda b: codec.pack(SAMPLES[4]), BadSignature),
    ("body=str", BODY, lambda b: "x", MalformedMessage),
    ("body=list", BODY, lambda b: msgpack.unpackb(b), MalformedMessage),
    ("sig=flipped first", SIG, lambda s: _flip(s, 0), BadSignature),
    ("sig=flipped last", SIG, lambda s: _flip(s, 63), BadSignature),
    ("sig=zeros", SIG, lambda s: b"\x00" * 64, BadSignature),
    ("sig=other envelope's", SIG, lambda s: fields_of(seal(ALICE, OFFER, NOW))[SIG], BadSignature),
    ("sig=63 bytes", SIG, lambda s: s[:63], MalformedMessage),
    ("sig=65 bytes", SIG, lambda s: s + b"\x00", MalformedMessage),
]


@pytest.mark.parametrize(("name", "index", "change", "error"), TAMPER, ids=[t[0] for t in TAMPER])
def test_tampered_field_is_rejected(
    name: str, index: int, change: Any, error: type[RemoteProtocolError]
) -> None:
    genuine = seal(ALICE, OFFER, NOW)
    fields = fields_of(genuine)
    fields[index] = change(fields[index])
    verifier = Verifier()
    with pytest.raises(error) as info:
        verifier.open(repack(fields), NOW)
    assert type(info.value) is error
    assert info.value.reason == error.reason
    # a rejected forgery burns nothing: the genuine envelope (same nonce) still opens
    assert len(verifier.replay) == 0
    assert verifier.open(genuine, NOW).message == OFFER


def test_every_field_is_covered_by_the_table() -> None:
    assert {t[1] for t in TAMPER} == set(range(7))
    assert {t[1] for t in TAMPER if t[3] is BadSignature} == {KIND, SENDER, TS, NONCE, BODY, SIG}


def test_v_is_not_signed_but_only_one_value_passes() -> None:
    fields = fields_of(seal(ALICE, OFFER, NOW))
    for v in (3, 255, 2**16):
        fields[V] = v
        with pytest.raises(MalformedMessage, match="version"):
            open_fresh(repack(fields))
    # 2 is the pairwise-MAC form (test_envelope_mac.py): its tag is 32 bytes, not 64.
    fields[V] = 2
    with pytest.raises(MalformedMessage, match="sig must be"):
        open_fresh(repack(fields))


# -- signer -----------------------------------------------------------------------------


def test_wrong_signer_is_bad_signature() -> None:
    """Mallory signs a valid-looking envelope but names Alice as the sender."""
    body = codec.pack(OFFER)
    forged = signed(MALLORY, "offer", body, sender=ALICE.public_key)
    with pytest.raises(BadSignature):
        open_fresh(forged)
    # the same envelope naming Mallory is fine, and is attributed to Mallory
    honest = signed(MALLORY, "offer", body)
    assert open_fresh(honest).sender == MALLORY.peer_id


def test_signature_without_the_domain_is_rejected() -> None:
    body = codec.pack(OFFER)
    nonce = fresh_nonce()
    for data in (body, msgpack.packb(["offer", NOW, nonce, body]),
                 msgpack.packb(["fi-peer/v0", "offer", NOW, nonce, body])):
        sig = ALICE.sign(data)
        env = repack([1, "offer", ALICE.public_key, NOW, nonce, body, sig])
        with pytest.raises(BadSignature):
            open_fresh(env)


def test_signature_is_bound_to_the_kind() -> None:
    """Same body bytes, signed as one kind, cannot be relabelled as another."""
    decline = Decline(query_id=b"q" * 16, reason="busy")
    fields = fields_of(seal(ALICE, decline, NOW))
    fields[KIND] = "offer"
    with pytest.raises(BadSignature):
        open_fresh(repack(fields))


# -- replay ----------------------------------------------------------------------------


def test_replayed_nonce_is_rejected() -> None:
    verifier = Verifier()
    data = seal(ALICE, OFFER, NOW)
    verifier.open(data, NOW)
    with pytest.raises(ReplayedMessage) as info:
        verifier.open(data, NOW + 1)
    assert info.value.reason == "replayed"
    # the same nonce re-signed with another time or body is still a replay
    nonce = fields_of(data)[NONCE]
    with pytest.raises(ReplayedMessage):
        verifier.open(seal(ALICE, OFFER, NOW + 5, nonce=nonce), NOW + 5)
    with pytest.raises(ReplayedMessage):
        verifier.open(seal(ALICE, SAMPLES[4], NOW, nonce=nonce), NOW)
    # nonces are per sender; a fresh nonce is fine
    assert verifier.open(seal(BOB, OFFER, NOW, nonce=nonce), NOW).sender == BOB.peer_id
    assert verifier.open(seal(ALICE, OFFER, NOW), NOW).message == OFFER


def test_replay_is_caught_until_the_message_is_stale() -> None:
    verifier = Verifier()
    data = seal(ALICE, OFFER, NOW)
    verifier.open(data, NOW)
    verifier.replay.prune(NOW + W)  # still inside the window: must be kept
    with pytest.raises(ReplayedMessage):
        verifier.open(data, NOW + W)
    verifier.replay.prune(NOW + W + 1)
    with pytest.raises(StaleMessage):
        verifier.open(data, NOW + W + 1)


def test_future_dated_nonce_is_kept_while_it_can_pass() -> None:
    verifier = Verifier()
    data = seal(ALICE, OFFER, NOW + W)  # as far ahead as the window allows
    verifier.open(data, NOW)
    verifier.replay.prune(NOW + 2 * W)
    with pytest.raises(ReplayedMessage):
        verifier.open(data, NOW + 2 * W)


# -- time window ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "ok"),
    [(0, True), (-W, True), (W, True), (-W - 1, False), (W + 1, False), (-10 * W, False),
     (10 * W, False), (-NOW, False)],
)
def test_time_window(offset: int, ok: bool) -> None:
    verifier = Verifier()
    data = seal(ALICE, OFFER, NOW + offset)
    if ok:
        assert verifier.open(data, NOW).ts_ms == NOW + offset
    else:
        with pytest.raises(StaleMessage) as info:
            verifier.open(data, NOW)
        assert info.value.reason == "stale"
        assert len(verifier.replay) == 0  # a stale message is not remembered


def test_custom_window() -> None:
    verifier = Verifier(window_ms=500)
    assert verifier.open(seal(ALICE, OFFER, NOW - 500), NOW)
    with pytest.raises(StaleMessage):
        verifier.open(seal(ALICE, OFFER, NOW + 501), NOW)


def test_signature_is_checked_before_the_clock() -> None:
    fields = fields_of(seal(ALICE, OFFER, NOW - 10 * W))
    fields[SIG] = _flip(fields[SIG])
    with pytest.raises(BadSignature):
        open_fresh(repack(fields))


# -- size ------------------------------------------------------------------------------------


def test_global_cap_is_checked_before_parsing() -> None:
    with pytest.raises(OversizedMessage) as info:
        open_fresh(b"\xc1" * (MAX_ENVELOPE_BYTES + 1))  # not even msgpack
    assert info.value.reason == "oversized"
    big_accept = signed_of_size("accept", MAX_ENVELOPE_BYTES + 1)
    with pytest.raises(OversizedMessage):
        open_fresh(big_accept)
    # exactly at the cap it passes the size checks (and fails later, on the body)
    with pytest.raises(MalformedMessage):
        open_fresh(signed_of_size("accept", MAX_ENVELOPE_BYTES))


@pytest.mark.parametrize("kind", sorted(MESSAGE_TYPES))
def test_per_kind_cap(kind: str) -> None:
    cap = MESSAGE_TYPES[kind].MAX_ENVELOPE
    with pytest.raises(OversizedMessage, match=kind if cap < MAX_ENVELOPE_BYTES else "cap"):
        open_fresh(signed_of_size(kind, cap + 1))
    with pytest.raises(MalformedMessage):  # at the cap: size passes, filler body does not
        open_fresh(signed_of_size(kind, cap))


def test_size_is_checked_before_the_signature() -> None:
    fields = fields_of(signed_of_size("offer", 5000))
    fields[SIG] = b"\x00" * 64
    with pytest.raises(OversizedMessage):
        open_fresh(repack(fields))


def test_a_small_kind_cannot_borrow_a_big_kinds_cap() -> None:
    """A 30 KiB 'offer' is far under the global cap, still rejected by its own cap."""
    data = signed_of_size("offer", 30_000)
    assert len(data) < MAX_ENVELOPE_BYTES
    with pytest.raises(OversizedMessage):
        open_fresh(data)


# -- one envelope, one encoding ----------------------------------------------------------------


def _respell(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) >= 1
    i = data.index(old)
    return data[:i] + new + data[i + len(old) :]


def test_non_canonical_envelopes_are_rejected() -> None:
    data = seal(ALICE, OFFER, NOW)
    ts_be = NOW.to_bytes(8, "big")
    assert data[:2] == b"\x97\x01"
    variants = {
        "v as uint8": b"\x97\xcc\x01" + data[2:],
        "v as int64": b"\x97\xd3" + (1).to_bytes(8, "big") + data[2:],
        "ts as int64": _respell(data, b"\xcf" + ts_be, b"\xd3" + ts_be),
        "array16": b"\xdc\x00\x07" + data[1:],
        "array32": b"\xdd\x00\x00\x00\x07" + data[1:],
        "kind as str8": _respell(data, b"\xa5offer", b"\xd9\x05offer"),
        "sender as bin16": _respell(data, b"\xc4\x20" + ALICE.public_key,
                                    b"\xc5\x00\x20" + ALICE.public_key),
    }
    for what, alt in variants.items():
        # same values, other bytes: rejected as a shape error
        assert alt != data and msgpack.unpackb(alt, raw=False) == fields_of(data), what
        with pytest.raises(MalformedMessage, match="non-canonical"):
            open_fresh(alt)
    for alt in (data + b"\x00", data + data):  # trailing data
        with pytest.raises(MalformedMessage):
            open_fresh(alt)


def test_small_timestamp_respelled_is_rejected() -> None:
    """Regression: at ts < 2**31 a single byte (uint32 0xce -> int32 0xd2) respells ts_ms."""
    data = seal(ALICE, OFFER, SMALL_NOW)
    alt = _respell(data, b"\xce" + SMALL_NOW.to_bytes(4, "big"),
                   b"\xd2" + SMALL_NOW.to_bytes(4, "big"))
    assert msgpack.unpackb(alt, raw=False) == fields_of(data)
    with pytest.raises(MalformedMessage):
        open_fresh(alt, SMALL_NOW)


def test_envelope_as_a_map_is_rejected() -> None:
    names = ["v", "kind", "sender", "ts_ms", "nonce", "body", "sig"]
    as_map = dict(zip(names, fields_of(seal(ALICE, OFFER, NOW)), strict=True))
    with pytest.raises(MalformedMessage):
        open_fresh(repack(as_map))  # type: ignore[arg-type]
    with pytest.raises(MalformedMessage):
        open_fresh(b"\x80")  # the empty map


def test_non_canonical_signed_bodies_are_rejected() -> None:
    body = codec.pack(OFFER)
    as_map = {"query_id": OFFER.query_id, "price_wei": 7, "box_key": OFFER.box_key,
              "expected_latency_ms": 40}
    assert body[19:20] == b"\x07"  # price_wei as a positive fixint
    for alt in (body[:19] + b"\xcc\x07" + body[20:],  # wider int
                body + b"\x00",  # trailing data
                msgpack.packb(as_map, use_bin_type=True),  # re-encoded as a map
                msgpack.packb(codec.to_wire(OFFER), use_bin_type=False)):  # str for bin
        with pytest.raises(MalformedMessage):
            open_fresh(signed(ALICE, "offer", alt))


def test_body_of_another_kind_is_malformed() -> None:
    with pytest.raises(MalformedMessage):
        open_fresh(signed(ALICE, "offer", codec.pack(SAMPLES[4])))


def test_every_truncation_is_rejected() -> None:
    data = seal(ALICE, SAMPLES[0], NOW)
    for cut in range(len(data)):
        with pytest.raises(RemoteProtocolError):
            open_fresh(data[:cut])


# -- fuzz: nothing but RemoteProtocolError ever escapes ----------------------------------------


@FUZZ
@given(data=st.binary(max_size=3000))
def test_random_bytes_only_raise_remote_protocol_errors(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        Verifier().open(data, NOW)


@FUZZ
@given(tail=st.binary(max_size=400))
def test_random_bytes_behind_an_envelope_header(tail: bytes) -> None:
    prefix = seal(ALICE, OFFER, NOW)[: 2 + 6 + 34]  # array, v, kind, sender
    with pytest.raises(RemoteProtocolError):
        Verifier().open(prefix + tail, NOW)


scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(max_size=40) | st.binary(max_size=80))
wire_values = st.recursive(scalars, lambda c: st.lists(c, max_size=8), max_leaves=30)
field_values = [
    st.sampled_from([1, 0, 2, True]) | wire_values,
    st.sampled_from(sorted(MESSAGE_TYPES)) | wire_values,
    st.sampled_from([ALICE.public_key, b"\x00" * 32]) | st.binary(max_size=40),
    st.sampled_from([NOW, NOW - W - 1]) | st.integers(-(2**63), 2**64 - 1),
    st.binary(min_size=16, max_size=16) | wire_values,
    st.binary(max_size=200) | wire_values,
    st.binary(min_size=64, max_size=64) | wire_values,
]


@FUZZ
@given(fields=st.tuples(*field_values))
def test_random_seven_field_arrays_only_raise_remote_protocol_errors(
    fields: tuple[Any, ...],
) -> None:
    with pytest.raises(RemoteProtocolError):
        Verifier().open(repack(list(fields)), NOW)


@FUZZ
@given(kind=st.sampled_from(sorted(MESSAGE_TYPES)),
       body=st.binary(max_size=300) | wire_values.map(lambda v: msgpack.packb(v)))
def test_genuinely_signed_garbage_bodies_only_raise_malformed(kind: str, body: bytes) -> None:
    try:
        opened = Verifier().open(signed(ALICE, kind, body), NOW)
    except MalformedMessage:
        return
    assert codec.pack(opened.message) == body  # only a canonical, valid body gets through


@FUZZ
@given(
    msg=st.sampled_from(SAMPLES),
    now=st.sampled_from([NOW, SMALL_NOW]),
    data=st.data(),
)
@example(msg=OFFER, now=SMALL_NOW, data=None)  # the 0xce -> 0xd2 respelling (see above)
def test_any_single_byte_change_is_rejected(msg: Any, now: int, data: Any) -> None:
    genuine = seal(ALICE, msg, now, nonce=b"\x42" * 16)
    if data is None:
        index = genuine.index(b"\xce" + now.to_bytes(4, "big"))
        new = 0xD2
    else:
        index = data.draw(st.integers(0, len(genuine) - 1), label="index")
        new = data.draw(st.integers(0, 255).filter(lambda b: b != genuine[index]), label="byte")
    mutated = genuine[:index] + bytes([new]) + genuine[index + 1 :]
    with pytest.raises(RemoteProtocolError):
        Verifier().open(mutated, now)


# -- replay guard: bounded memory ------------------------------------------------------------------


def test_guard_rate_limits_a_full_sender() -> None:
    guard = ReplayGuard(window_ms=1000, max_per_sender=3)
    for i in range(3):
        guard.check_and_record("a", bytes([i]) * 16, NOW, NOW)
    with pytest.raises(RateLimited) as info:
        guard.check_and_record("a", b"\x09" * 16, NOW, NOW)
    assert info.value.reason == "rate_limited"
    assert len(guard) == 3  # the refused nonce was not recorded
    # replays are still recognised as replays when full
    with pytest.raises(ReplayedMessage):
        guard.check_and_record("a", b"\x00" * 16, NOW, NOW)
    # other senders are not affected
    guard.check_and_record("b", b"\x09" * 16, NOW, NOW)
    assert len(guard) == 4


def test_guard_makes_room_once_nonces_age_out() -> None:
    guard = ReplayGuard(window_ms=1000, max_per_sender=2)
    guard.check_and_record("a", b"\x01" * 16, NOW, NOW)
    guard.check_and_record("a", b"\x02" * 16, NOW + 500, NOW + 500)
    with pytest.raises(RateLimited):
        guard.check_and_record("a", b"\x03" * 16, NOW + 1000, NOW + 1000)
    # at NOW+1001 the first nonce can no longer pass the window: its slot is reused
    guard.check_and_record("a", b"\x03" * 16, NOW + 1001, NOW + 1001)
    assert len(guard) == 2
    with pytest.raises(ReplayedMessage):  # the younger one is still remembered
        guard.check_and_record("a", b"\x02" * 16, NOW + 500, NOW + 1001)


def test_guard_prune_frees_memory() -> None:
    guard = ReplayGuard(window_ms=1000, max_per_sender=100)
    for sender in ("a", "b", "c"):
        for i in range(10):
            guard.check_and_record(sender, bytes([i]) * 16, NOW + i, NOW)
    guard.check_and_record("d", b"\x01" * 16, NOW + 2000, NOW + 1500)
    assert len(guard) == 31
    guard.prune(NOW + 1000)  # nothing is older than the window yet
    assert len(guard) == 31
    guard.prune(NOW + 1005)  # ts NOW..NOW+4 go
    assert len(guard) == 3 * 5 + 1
    guard.prune(NOW + 2500)
    assert len(guard) == 1
    assert set(guard._seen) == {"d"}  # emptied senders are forgotten entirely
    guard.prune(NOW + 10_000)
    assert len(guard) == 0 and guard._seen == {}


def test_guard_prune_never_drops_a_nonce_early_when_timestamps_arrive_out_of_order() -> None:
    guard = ReplayGuard(window_ms=1000, max_per_sender=4)
    guard.check_and_record("a", b"\x01" * 16, NOW + 600, NOW)  # stamped ahead
    guard.check_and_record("a", b"\x02" * 16, NOW, NOW)  # older, arrived later
    guard.check_and_record("a", b"\x03" * 16, NOW + 700, NOW)
    guard.prune(NOW + 1001)  # b"\x02" could go, but waits behind b"\x01"
    assert len(guard) == 3
    for nonce, ts in ((b"\x01", NOW + 600), (b"\x03", NOW + 700)):
        with pytest.raises(ReplayedMessage):  # inside the window: still refused
            guard.check_and_record("a", nonce * 16, ts, NOW + 1001)
    guard.prune(NOW + 1601)  # b"\x01" expired: b"\x02" behind it goes too
    assert len(guard) == 1 and b"\x03" * 16 in guard._seen["a"]
    # at the limit, every expired entry makes room, wherever it sits
    guard.check_and_record("a", b"\x04" * 16, NOW + 2000, NOW + 1601)
    guard.check_and_record("a", b"\x05" * 16, NOW + 650, NOW + 1601)
    guard.check_and_record("a", b"\x06" * 16, NOW + 2000, NOW + 1601)
    guard.check_and_record("a", b"\x07" * 16, NOW + 2000, NOW + 1701)  # both expired: room
    assert set(guard._seen["a"]) == {n * 16 for n in (b"\x04", b"\x06", b"\x07")}


def test_verifier_rate_limit_and_recovery() -> None:
    verifier = Verifier(window_ms=1000, max_nonces_per_sender=3)
    for _ in range(3):
        verifier.open(seal(ALICE, OFFER, NOW), NOW)
    with pytest.raises(RateLimited):
        verifier.open(seal(ALICE, OFFER, NOW), NOW)
    assert verifier.open(seal(BOB, OFFER, NOW), NOW).sender == BOB.peer_id
    later = NOW + 1001
    assert verifier.open(seal(ALICE, OFFER, later), later).sender == ALICE.peer_id
    verifier.replay.prune(later + 1001)
    assert len(verifier.replay) == 0


# -- the error tree ------------------------------------------------------------------------------


def test_every_rejection_has_its_own_reason() -> None:
    kinds = [MalformedMessage, OversizedMessage, UnknownKind, BadSignature, StaleMessage,
             ReplayedMessage, RateLimited, UnexpectedMessage]
    reasons = [k.reason for k in kinds]
    assert len(set(reasons)) == len(reasons)
    assert all(issubclass(k, RemoteProtocolError) for k in kinds)
    assert all(r.isidentifier() for r in reasons)
