"""Pairwise-MAC envelopes (envelope.py, version 2) and the simulator's OpenMemo.

A MAC envelope authenticates its sender to exactly one recipient, only for
the per-query kinds in MAC_KINDS, only once the recipient has the sender's
box key from a message the sender signed; everything else is rejected as
``bad_signature``. Time window and replay guard apply as to signed envelopes.
"""

from __future__ import annotations

import msgpack
import pytest

from fi_peer.errors import BadSignature, ReplayedMessage, StaleMessage
from fi_peer.identity import Identity
from fi_peer.protocol import codec, envelope
from fi_peer.protocol.envelope import (
    MAC_KINDS,
    MAC_VERSION,
    VERSION,
    OpenMemo,
    Verifier,
    mac_tag,
    pair_key,
    seal,
)
from fi_peer.protocol.messages import KeyRelay, Offer, QueryRequest, Result, Unmask
from tests.unit.he_wire import toy_request_fields

NOW = 1_767_225_600_000
QID = b"q" * 16
ALICE = Identity.from_seed(b"mac-alice")  # the querier
BOB = Identity.from_seed(b"mac-bob")  # a member
MALLORY = Identity.from_seed(b"mac-mallory")

REQUEST = QueryRequest(
    **toy_request_fields(QID, now_ms=NOW, reply_key=ALICE.box_public_key, epsilon=1.0, delta=1e-5)
)
RESULT = Result(query_id=QID, ok=True, contributors=(BOB.peer_id,))


def offer_of(member: Identity) -> Offer:
    return Offer(query_id=QID, price_wei=0, box_key=member.box_public_key, expected_latency_ms=5)


def bob_knowing_alice() -> Verifier:
    """Bob's verifier after Alice's signed QueryRequest bound her box key."""
    verifier = Verifier(identity=BOB)
    verifier.open(seal(ALICE, REQUEST, NOW), NOW)
    return verifier


def to_bob() -> tuple[str, bytes]:
    return (BOB.peer_id, BOB.box_public_key)


def fields(data: bytes) -> list[object]:
    out = msgpack.unpackb(data, raw=False)
    assert isinstance(out, list)
    return out


def test_mac_kinds_are_the_per_query_ones() -> None:
    assert {"key_shares", "key_relay", "unmask", "reveal", "result"} == MAC_KINDS


def test_mac_envelope_opens_for_its_recipient() -> None:
    data = seal(ALICE, RESULT, NOW, to=to_bob())
    assert fields(data)[0] == MAC_VERSION and len(fields(data)[6]) == envelope.MAC_LEN
    opened = bob_knowing_alice().open(data, NOW)
    assert (opened.sender, opened.message) == (ALICE.peer_id, RESULT)


def test_other_kinds_stay_signed_even_with_a_recipient() -> None:
    data = seal(BOB, offer_of(BOB), NOW, to=(ALICE.peer_id, ALICE.box_public_key))
    assert fields(data)[0] == VERSION
    assert Verifier().open(data, NOW).message == offer_of(BOB)


def test_signed_envelopes_of_mac_kinds_are_still_accepted() -> None:
    assert Verifier().open(seal(ALICE, RESULT, NOW), NOW).message == RESULT


def test_the_pair_key_is_symmetric_and_per_pair() -> None:
    ab = pair_key(ALICE, BOB.public_key, BOB.box_public_key)
    assert ab is not None and ab == pair_key(BOB, ALICE.public_key, ALICE.box_public_key)
    assert ab != pair_key(ALICE, MALLORY.public_key, MALLORY.box_public_key)


def test_low_order_box_key_falls_back_to_a_signature() -> None:
    data = seal(ALICE, RESULT, NOW, to=(BOB.peer_id, b"\x00" * 32))
    assert fields(data)[0] == VERSION


def test_without_the_senders_signed_box_key_a_mac_is_refused() -> None:
    with pytest.raises(BadSignature):
        Verifier(identity=BOB).open(seal(ALICE, RESULT, NOW, to=to_bob()), NOW)
    with pytest.raises(BadSignature):  # no identity: MACs cannot be checked at all
        Verifier().open(seal(ALICE, RESULT, NOW, to=to_bob()), NOW)


def test_the_binding_comes_from_an_offer_too() -> None:
    verifier = Verifier(identity=ALICE)
    verifier.open(seal(BOB, offer_of(BOB), NOW), NOW)
    relay = KeyRelay(query_id=QID, u1=(0,), ciphertexts=())
    data = seal(BOB, relay, NOW, to=(ALICE.peer_id, ALICE.box_public_key))
    assert verifier.open(data, NOW).sender == BOB.peer_id


def test_a_third_party_cannot_open_or_forge() -> None:
    data = seal(ALICE, RESULT, NOW, to=to_bob())
    mallory = Verifier(identity=MALLORY)
    mallory.open(seal(ALICE, REQUEST, NOW), NOW)
    with pytest.raises(BadSignature):  # addressed to Bob, not to Mallory
        mallory.open(data, NOW)
    # Mallory claims to be Alice towards Bob, with Mallory's own pair key.
    bob = bob_knowing_alice()
    body = codec.pack(RESULT)
    key = pair_key(MALLORY, BOB.public_key, BOB.box_public_key)
    assert key is not None
    nonce = b"n" * 16
    tag = mac_tag(key, "result", ALICE.public_key, BOB.public_key, NOW, nonce, body)
    forged = msgpack.packb([MAC_VERSION, "result", ALICE.public_key, NOW, nonce, body, tag])
    with pytest.raises(BadSignature):
        bob.open(forged, NOW)


def test_a_rebinding_by_mallory_cannot_happen() -> None:
    """Only Alice's own signature binds Alice: Mallory's request binds Mallory."""
    bob = bob_knowing_alice()
    bob.open(seal(MALLORY, REQUEST, NOW), NOW)
    assert bob.bindings[ALICE.public_key] == ALICE.box_public_key
    assert bob.bindings[MALLORY.public_key] == ALICE.box_public_key  # what Mallory signed


def test_tampering_reflection_and_kind_swaps_are_refused() -> None:
    data = seal(ALICE, RESULT, NOW, to=to_bob())
    f = fields(data)
    tampered = list(f)
    tampered[5] = codec.pack(Result(query_id=QID, ok=False, reason="x"))
    bob = bob_knowing_alice()
    with pytest.raises(BadSignature):
        bob.open(msgpack.packb(tampered), NOW)
    # Back to Alice as if Bob had sent it (she knows Bob's key from his Offer).
    alice = Verifier(identity=ALICE)
    alice.open(seal(BOB, offer_of(BOB), NOW), NOW)
    reflected = list(f)
    reflected[2] = BOB.public_key
    with pytest.raises(BadSignature):
        alice.open(msgpack.packb(reflected), NOW)
    # A MAC on a kind that must be signed is refused even when the tag is right.
    body = codec.pack(offer_of(ALICE))
    key = pair_key(ALICE, BOB.public_key, BOB.box_public_key)
    assert key is not None
    tag = mac_tag(key, "offer", ALICE.public_key, BOB.public_key, NOW, b"m" * 16, body)
    with pytest.raises(BadSignature):
        bob.open(
            msgpack.packb([MAC_VERSION, "offer", ALICE.public_key, NOW, b"m" * 16, body, tag]), NOW
        )


def test_window_and_replay_apply_to_macs() -> None:
    bob = bob_knowing_alice()
    data = seal(
        ALICE, Unmask(query_id=QID, survivors=(0,), dropped=(), view_tags=()), NOW, to=to_bob()
    )
    bob.open(data, NOW)
    with pytest.raises(ReplayedMessage):
        bob.open(data, NOW)
    late = seal(ALICE, RESULT, NOW, to=to_bob())
    with pytest.raises(StaleMessage):
        bob_knowing_alice().open(late, NOW + envelope.DEFAULT_WINDOW_MS + 1)


def test_open_memo_serves_signed_copies_and_keeps_per_peer_checks() -> None:
    memo = OpenMemo(max_entries=4)
    a, b = Verifier(identity=ALICE), Verifier(identity=BOB)
    a.memo = b.memo = memo
    data = seal(MALLORY, REQUEST, NOW)
    assert a.open(data, NOW).message == b.open(data, NOW).message == REQUEST
    assert memo.hits == 1
    assert b.bindings[MALLORY.public_key] == ALICE.box_public_key  # bound on a memo hit too
    with pytest.raises(ReplayedMessage):
        b.open(data, NOW)
    with pytest.raises(StaleMessage):
        Verifier(identity=MALLORY).open(data, NOW + envelope.DEFAULT_WINDOW_MS + 1)
    b.open(seal(ALICE, REQUEST, NOW), NOW)  # binds Alice
    b.open(seal(ALICE, RESULT, NOW, to=to_bob()), NOW)
    assert len(memo._entries) == 2  # the two signed ones: MAC envelopes are never memoised
