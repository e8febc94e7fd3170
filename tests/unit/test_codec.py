"""Canonical, strict encoding of the message dataclasses (codec.py, messages.py).

Properties: every valid message round-trips, byte for byte; one value has one
encoding (any other msgpack spelling is rejected); an invalid field value can
neither be constructed nor decoded; random bytes only ever give MalformedMessage.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fi_peer.errors import MalformedMessage, RemoteProtocolError
from fi_peer.identity import Identity
from fi_peer.privacy.secagg import CIPHERTEXT_LEN, TAG_LEN
from fi_peer.privacy.shamir import SHARE_LEN
from fi_peer.protocol import codec, envelope
from fi_peer.protocol.messages import (
    MAX_PRICE_WEI,
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
from tests.unit.he_wire import he_biggest, he_samples

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUNDTRIP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies: valid instances of every message -----------------------------------

TOKEN_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "/")
HEX = "0123456789abcdef"


def token(max_len: int = 64) -> st.SearchStrategy[str]:
    return st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=max_len)


def blob(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


def uint(upper: int) -> st.SearchStrategy[int]:
    # shrink towards the msgpack width boundaries too
    edges = [v for v in (0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32) if v <= upper]
    return st.one_of(st.sampled_from([*edges, upper]), st.integers(0, upper))


def prob(upper: float) -> st.SearchStrategy[float]:
    return st.floats(0.0, upper, allow_nan=False, allow_infinity=False)


peer_ids = st.text(alphabet=HEX, min_size=64, max_size=64)
query_ids = blob(16)
keys = blob(32)
prices = uint(MAX_PRICE_WEI)

model_cards = st.builds(
    ModelCard,
    task=token(),
    n_classes=st.integers(2, 1000),
    input_dim=st.integers(1, 65_536),
    arch=token(),
    model_hash=blob(32),
    rules=st.lists(token(32), min_size=1, max_size=16).map(tuple),
)
addresses = st.text(alphabet=st.characters(max_codepoint=127), min_size=1, max_size=256)
announces = st.builds(
    Announce,
    seq=uint(1 << 63),
    addresses=st.lists(addresses, max_size=16).map(tuple),
    box_key=keys,
    eth_address=st.one_of(
        st.just(""), st.text(alphabet=HEX, min_size=40, max_size=40).map("0x".__add__)
    ),
    card=model_cards,
    price_wei=prices,
    capacity=st.integers(0, 1_000_000),
)
query_requests = st.builds(
    QueryRequest,
    query_id=query_ids,
    task=token(),
    n_classes=st.integers(2, 1000),
    input_dim=st.integers(1, 65_536),
    rule=token(32),
    vector_len=st.integers(1, 4096),
    k=st.integers(1, 64),
    max_price_wei=prices,
    deadline_ms=uint(1 << 63),
    reply_key=keys,
    epsilon=prob(1e6),
    delta=prob(1.0),
    secagg=st.booleans(),
)
offers = st.builds(
    Offer,
    query_id=query_ids,
    price_wei=prices,
    box_key=keys,
    expected_latency_ms=st.integers(0, 3_600_000),
    mask_key=st.one_of(st.just(b""), keys),
)
members = st.builds(Member, peer_id=peer_ids, box_key=keys, mask_key=st.one_of(st.just(b""), keys))


@st.composite
def accepts(draw: st.DrawFn) -> Accept:
    masked = draw(st.booleans())
    committee = [
        dataclasses.replace(m, mask_key=draw(keys) if masked else b"")
        for m in draw(st.lists(members, min_size=1, max_size=64, unique_by=lambda m: m.peer_id))
    ]
    return Accept(
        query_id=draw(query_ids),
        committee=tuple(committee),
        threshold=draw(st.integers(1, len(committee))),
        price_wei=draw(prices),
        answer_deadline_ms=draw(uint(1 << 63)),
        escrow_ref=draw(st.binary(max_size=64)),
        noise_sigma=draw(prob(1e9)),
        sealed_input=draw(st.binary(min_size=1, max_size=2048)),
    )


declines = st.builds(Decline, query_id=query_ids, reason=token())
shares = st.builds(
    Share,
    query_id=query_ids,
    vector=st.integers(1, 4096).flatmap(lambda n: blob(8 * n)),
    commitment=st.one_of(st.just(b""), blob(32)),
    view_tags=st.lists(blob(TAG_LEN), max_size=63).map(tuple),
)
key_shares = st.builds(
    KeyShares,
    query_id=query_ids,
    ciphertexts=st.lists(blob(CIPHERTEXT_LEN), max_size=63).map(tuple),
    commitment=blob(32),
)
indices = st.lists(st.integers(0, 63), unique=True).map(lambda v: tuple(sorted(v)))


@st.composite
def key_relays(draw: st.DrawFn) -> KeyRelay:
    u1 = draw(indices.filter(len))
    cts = tuple(draw(blob(CIPHERTEXT_LEN)) for _ in range(len(u1) - 1))
    return KeyRelay(query_id=draw(query_ids), u1=u1, ciphertexts=cts)


@st.composite
def unmasks(draw: st.DrawFn) -> Unmask:
    both = draw(indices.filter(len))
    cut = draw(st.integers(1, len(both)))
    order = draw(st.permutations(both))
    survivors, dropped = tuple(sorted(order[:cut])), tuple(sorted(order[cut:]))
    tags = tuple(draw(blob(TAG_LEN)) for _ in range(len(survivors) - 1))
    return Unmask(query_id=draw(query_ids), survivors=survivors, dropped=dropped, view_tags=tags)


@st.composite
def reveals(draw: st.DrawFn) -> Reveal:
    n = draw(st.integers(1, 64))
    n_seeds = draw(st.integers(1, n))
    return Reveal(
        query_id=draw(query_ids),
        seed_shares=tuple(draw(blob(SHARE_LEN)) for _ in range(n_seeds)),
        pair_seeds=tuple(draw(blob(32)) for _ in range(n - n_seeds)),
    )


receipts = st.builds(
    Receipt, query_id=query_ids, member=peer_ids, share_digest=blob(32), price_wei=prices
)
results = st.builds(
    Result,
    query_id=query_ids,
    ok=st.booleans(),
    contributors=st.lists(peer_ids, max_size=64).map(tuple),
    reason=token(),
)

open_requests = st.builds(OpenRequest, query_id=query_ids)
openings = st.one_of(
    st.builds(
        Opening,
        query_id=query_ids,
        vector=st.integers(1, 4096).flatmap(lambda n: blob(8 * n)),
        nonce=blob(32),
    ),
    st.builds(Opening, query_id=query_ids, refused=token()),
)

STRATEGIES: dict[type, st.SearchStrategy[Any]] = {
    ModelCard: model_cards,
    Member: members,
    Announce: announces,
    QueryRequest: query_requests,
    Offer: offers,
    Accept: accepts(),
    Decline: declines,
    KeyShares: key_shares,
    KeyRelay: key_relays(),
    Share: shares,
    Unmask: unmasks(),
    Reveal: reveals(),
    Receipt: receipts,
    Result: results,
    OpenRequest: open_requests,
    Opening: openings,
    # HE mode (he_messages.py): fixed samples
    **{type(m): st.just(m) for m in he_samples(1_000_000)},
}
any_message = st.one_of(*(STRATEGIES[cls] for cls in MESSAGE_TYPES.values()))


def test_every_wire_type_has_a_strategy() -> None:
    assert set(MESSAGE_TYPES.values()) <= set(STRATEGIES)
    assert {cls.KIND for cls in MESSAGE_TYPES.values()} == set(MESSAGE_TYPES)


# -- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
@ROUNDTRIP
@given(data=st.data())
def test_valid_message_roundtrips(cls: type, data: st.DataObject) -> None:
    msg = data.draw(STRATEGIES[cls])
    raw = codec.pack(msg)
    back = codec.unpack(cls, raw)
    assert back == msg
    assert type(back) is cls
    assert codec.pack(back) == raw
    # the wire form is the array of field values in declaration order
    wire = msgpack.unpackb(raw, raw=False)
    assert isinstance(wire, list) and len(wire) == len(dataclasses.fields(cls))


IDENT = Identity.from_seed(b"codec-sender")


@ROUNDTRIP
@given(msg=any_message)
def test_every_valid_message_fits_its_envelope_cap_and_opens(msg: Any) -> None:
    now = 1_767_225_600_000
    data = envelope.seal(IDENT, msg, now)
    assert len(data) <= type(msg).MAX_ENVELOPE
    opened = envelope.Verifier().open(data, now)
    assert opened.message == msg
    assert opened.kind == msg.KIND
    assert opened.sender == IDENT.peer_id


def test_largest_valid_messages_fit_their_caps() -> None:
    """Every field at its maximum: still sendable (and the biggest prices still encode)."""
    big_card = ModelCard(
        task="t" * 64, n_classes=1000, input_dim=65_536, arch="a" * 64,
        model_hash=b"\xff" * 32, rules=tuple(f"{i:02d}" + "r" * 30 for i in range(16)),
    )
    biggest = [
        Announce(
            seq=1 << 63, addresses=tuple("\x7f" * 256 for _ in range(16)), box_key=b"\xff" * 32,
            eth_address="0x" + "f" * 40, card=big_card, price_wei=MAX_PRICE_WEI,
            capacity=1_000_000,
        ),
        QueryRequest(
            query_id=b"\xff" * 16, task="t" * 64, n_classes=1000, input_dim=65_536,
            rule="r" * 32, vector_len=4096, k=64, max_price_wei=MAX_PRICE_WEI,
            deadline_ms=1 << 63, reply_key=b"\xff" * 32, epsilon=1e6, delta=1.0,
        ),
        Offer(query_id=b"\xff" * 16, price_wei=MAX_PRICE_WEI, box_key=b"\xff" * 32,
              expected_latency_ms=3_600_000, mask_key=b"\xff" * 32),
        Accept(
            query_id=b"\xff" * 16,
            committee=tuple(Member(peer_id=f"{i:064x}", box_key=b"\xff" * 32,
                                   mask_key=b"\xff" * 32) for i in range(64)),
            threshold=64, price_wei=MAX_PRICE_WEI, answer_deadline_ms=1 << 63,
            escrow_ref=b"\xff" * 64, noise_sigma=1e9, sealed_input=b"\xff" * (4 * 65_536 + 256),
        ),
        Decline(query_id=b"\xff" * 16, reason="r" * 64),
        KeyShares(query_id=b"\xff" * 16, ciphertexts=(b"\xff" * CIPHERTEXT_LEN,) * 63,
                  commitment=b"\xff" * 32),
        KeyRelay(query_id=b"\xff" * 16, u1=tuple(range(64)),
                 ciphertexts=(b"\xff" * CIPHERTEXT_LEN,) * 63),
        Share(query_id=b"\xff" * 16, vector=b"\xff" * (8 * 4096), commitment=b"\xff" * 32,
              view_tags=(b"\xff" * TAG_LEN,) * 63, commitment_sig=b"\xff" * 65),
        OpenRequest(query_id=b"\xff" * 16),
        Opening(query_id=b"\xff" * 16, vector=b"\xff" * (8 * 4096), nonce=b"\xff" * 32),
        Opening(query_id=b"\xff" * 16, refused="r" * 64),
        Unmask(query_id=b"\xff" * 16, survivors=tuple(range(63)), dropped=(63,),
               view_tags=(b"\xff" * TAG_LEN,) * 62),
        Unmask(query_id=b"\xff" * 16, survivors=tuple(range(64)), dropped=(),
               view_tags=(b"\xff" * TAG_LEN,) * 63),
        Reveal(query_id=b"\xff" * 16, seed_shares=(b"\xff" * SHARE_LEN,) * 40,
               pair_seeds=(b"\xff" * 32,) * 24),
        Receipt(query_id=b"\xff" * 16, member="f" * 64, share_digest=b"\xff" * 32,
                price_wei=MAX_PRICE_WEI),
        Result(query_id=b"\xff" * 16, ok=False, contributors=tuple(f"{i:064x}" for i in range(64)),
               reason="r" * 64),
        *he_biggest(),
    ]
    assert {type(m) for m in biggest} == set(MESSAGE_TYPES.values())
    now = 1_767_225_600_000
    for msg in biggest:
        data = envelope.seal(IDENT, msg, now)
        assert len(data) <= msg.MAX_ENVELOPE, type(msg).__name__
        assert envelope.Verifier().open(data, now).message == msg


def test_max_price_fits_the_wire() -> None:
    """MAX_PRICE_WEI is a valid price, so it must encode (msgpack ints stop at 2**64-1)."""
    offer = Offer(query_id=b"q" * 16, price_wei=MAX_PRICE_WEI, box_key=b"k" * 32,
                  expected_latency_ms=0)
    assert codec.unpack(Offer, codec.pack(offer)) == offer
    with pytest.raises(ValueError):
        Offer(query_id=b"q" * 16, price_wei=MAX_PRICE_WEI + 1, box_key=b"k" * 32,
              expected_latency_ms=0)


def test_golden_encoding_of_an_offer() -> None:
    """Pins the wire form: array of fields in declaration order, smallest encodings."""
    offer = Offer(query_id=bytes(range(16)), price_wei=300, box_key=b"\x07" * 32,
                  expected_latency_ms=5, mask_key=b"\x09" * 32)
    expected = (
        b"\x96"
        + b"\xc4\x10" + bytes(range(16))
        + b"\xcd\x01\x2c"
        + b"\xc4\x20" + b"\x07" * 32
        + b"\x05"
        + b"\xc4\x20" + b"\x09" * 32
        + b"\xa0"  # eth_address: empty (unpaid)
    )
    assert codec.pack(offer) == expected
    assert codec.unpack(Offer, expected) == offer


def test_nested_dataclass_is_a_nested_array() -> None:
    m = Member(peer_id="a" * 64, box_key=b"k" * 32, mask_key=b"m" * 32)
    acc = Accept(query_id=b"q" * 16, committee=(m,), threshold=1, price_wei=0,
                 answer_deadline_ms=0, escrow_ref=b"", noise_sigma=0.0, sealed_input=b"x")
    wire = msgpack.unpackb(codec.pack(acc), raw=False)
    assert wire[1] == [["a" * 64, b"k" * 32, b"m" * 32, ""]]


# -- invalid values: cannot be constructed, cannot be decoded -------------------------

OFFER = Offer(query_id=b"q" * 16, price_wei=10, box_key=b"k" * 32, expected_latency_ms=50)
REQUEST = QueryRequest(
    query_id=b"q" * 16, task="toy", n_classes=3, input_dim=4, rule="soft", vector_len=3,
    k=2, max_price_wei=100, deadline_ms=5_000, reply_key=b"r" * 32, epsilon=1.0, delta=1e-5,
)
CARD = ModelCard(task="toy", n_classes=3, input_dim=4, arch="fn", model_hash=b"h" * 32,
                 rules=("soft",))
ANNOUNCE = Announce(seq=1, addresses=("/ip4/1.2.3.4",), box_key=b"k" * 32, eth_address="",
                    card=CARD, price_wei=0, capacity=4)
MEMBER = Member(peer_id="a" * 64, box_key=b"k" * 32)
ACCEPT = Accept(query_id=b"q" * 16, committee=(MEMBER,), threshold=1, price_wei=10,
                answer_deadline_ms=9, escrow_ref=b"", noise_sigma=0.5, sealed_input=b"s" * 40)
SHARE = Share(query_id=b"q" * 16, vector=b"\x00" * 24, commitment=b"")
RECEIPT = Receipt(query_id=b"q" * 16, member="b" * 64, share_digest=b"d" * 32, price_wei=10)
RESULT = Result(query_id=b"q" * 16, ok=True, contributors=("b" * 64,))
DECLINE = Decline(query_id=b"q" * 16, reason="busy")

NAN, INF = float("nan"), float("inf")

INVALID: list[tuple[Any, str, Any]] = [
    # wrong lengths
    (OFFER, "query_id", b"q" * 15),
    (OFFER, "query_id", b"q" * 17),
    (OFFER, "box_key", b"k" * 31),
    (REQUEST, "reply_key", b""),
    (CARD, "model_hash", b"h" * 33),
    (SHARE, "vector", b"\x00" * 7),
    (SHARE, "vector", b""),
    (SHARE, "vector", b"\x00" * (8 * 4097)),
    (SHARE, "commitment", b"c" * 31),
    (RECEIPT, "share_digest", b"d" * 16),
    (RECEIPT, "member", "b" * 63),
    (RECEIPT, "member", "B" * 64),
    (RECEIPT, "member", "g" * 64),
    (MEMBER, "peer_id", "a" * 65),
    (RESULT, "contributors", ("b" * 63,)),
    (RESULT, "contributors", tuple(f"{i:064x}" for i in range(65))),
    (ACCEPT, "escrow_ref", b"e" * 65),
    (ACCEPT, "sealed_input", b""),
    (ACCEPT, "committee", ()),
    (ACCEPT, "committee", (MEMBER, MEMBER)),
    (ACCEPT, "threshold", 2),
    (ACCEPT, "threshold", 0),
    (ANNOUNCE, "addresses", ("a",) * 17),
    (ANNOUNCE, "addresses", ("",)),
    (ANNOUNCE, "addresses", ("é",)),
    (ANNOUNCE, "eth_address", "0x1234"),
    (CARD, "rules", ()),
    (CARD, "rules", ("a b",)),
    # negative and out-of-range numbers
    (OFFER, "price_wei", -1),
    (REQUEST, "max_price_wei", -1),
    (ACCEPT, "price_wei", -5),
    (RECEIPT, "price_wei", -1),
    (ANNOUNCE, "price_wei", -1),
    (ANNOUNCE, "seq", -1),
    (ANNOUNCE, "capacity", 1_000_001),
    (OFFER, "price_wei", MAX_PRICE_WEI + 1),
    (OFFER, "expected_latency_ms", 3_600_001),
    (REQUEST, "k", 0),
    (REQUEST, "k", 65),
    (REQUEST, "n_classes", 1),
    (REQUEST, "vector_len", 0),
    (REQUEST, "deadline_ms", -1),
    (CARD, "input_dim", 0),
    # NaN, infinities, out-of-range floats
    (REQUEST, "epsilon", NAN),
    (REQUEST, "epsilon", INF),
    (REQUEST, "epsilon", -0.5),
    (REQUEST, "delta", NAN),
    (REQUEST, "delta", 1.5),
    (ACCEPT, "noise_sigma", NAN),
    (ACCEPT, "noise_sigma", -INF),
    (ACCEPT, "noise_sigma", 2e9),
    # names that are not short ASCII tokens
    (REQUEST, "task", ""),
    (REQUEST, "task", "a/b"),
    (REQUEST, "task", "a b"),
    (REQUEST, "task", "tâche"),
    (REQUEST, "task", "x" * 65),
    (REQUEST, "rule", "r" * 33),
    (DECLINE, "reason", "no\nway"),
    (RESULT, "reason", ""),
    # bool where an int is expected (bool is an int subclass in Python, not on the wire)
    (OFFER, "price_wei", True),
    (OFFER, "expected_latency_ms", False),
    (REQUEST, "k", True),
    (ANNOUNCE, "seq", True),
    (ACCEPT, "threshold", True),
    # other wrong types
    (REQUEST, "epsilon", 1),
    (REQUEST, "deadline_ms", 5_000.0),
    (OFFER, "query_id", "q" * 16),
    (RECEIPT, "member", b"b" * 64),
    (RESULT, "ok", 1),
]


def _ids(case: tuple[Any, str, Any]) -> str:
    return f"{type(case[0]).__name__}.{case[1]}={case[2]!r}"[:60]


@pytest.mark.parametrize(("base", "name", "value"), INVALID, ids=[_ids(c) for c in INVALID])
def test_invalid_value_cannot_be_constructed(base: Any, name: str, value: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        dataclasses.replace(base, **{name: value})


def _wire_with(base: Any, name: str, value: Any) -> Any:
    wire = codec.to_wire(base)
    index = [f.name for f in dataclasses.fields(base)].index(name)
    wire[index] = codec.to_wire(value)
    return wire


@pytest.mark.parametrize(("base", "name", "value"), INVALID, ids=[_ids(c) for c in INVALID])
def test_invalid_value_cannot_be_decoded(base: Any, name: str, value: Any) -> None:
    try:
        raw = msgpack.packb(_wire_with(base, name, value), use_bin_type=True)
    except OverflowError:
        assert isinstance(value, int) and value >= 2**64  # not even a msgpack value
        return
    with pytest.raises(MalformedMessage):
        codec.unpack(type(base), raw)


@pytest.mark.parametrize("base", [OFFER, REQUEST, ANNOUNCE, ACCEPT, SHARE, RECEIPT, RESULT,
                                  DECLINE], ids=lambda b: type(b).__name__)
def test_wrong_field_count_is_rejected(base: Any) -> None:
    wire = codec.to_wire(base)
    for bad in (wire[:-1], [*wire, 0], [], [wire]):
        with pytest.raises(MalformedMessage):
            codec.unpack(type(base), msgpack.packb(bad, use_bin_type=True))


def test_nested_invalid_values_are_rejected() -> None:
    wire = codec.to_wire(ANNOUNCE)
    wire[4][1] = 1  # card.n_classes
    with pytest.raises(MalformedMessage, match="n_classes"):
        codec.unpack(Announce, msgpack.packb(wire, use_bin_type=True))
    wire = codec.to_wire(ACCEPT)
    wire[1] = [["a" * 64]]  # a member with one field
    with pytest.raises(MalformedMessage):
        codec.unpack(Accept, msgpack.packb(wire, use_bin_type=True))
    wire = codec.to_wire(ACCEPT)
    wire[1] = ["a" * 64, b"k" * 32]  # flattened instead of nested
    with pytest.raises(MalformedMessage):
        codec.unpack(Accept, msgpack.packb(wire, use_bin_type=True))


# -- one value, one encoding -----------------------------------------------------------


def test_wider_int_encodings_are_rejected() -> None:
    raw = codec.pack(OFFER)  # price 10 -> positive fixint 0x0a
    assert raw[19:20] == b"\x0a"
    for wide in (b"\xcc\x0a", b"\xcd\x00\x0a", b"\xce\x00\x00\x00\x0a",
                 b"\xcf" + (10).to_bytes(8, "big"), b"\xd0\x0a", b"\xd1\x00\x0a",
                 b"\xd2\x00\x00\x00\x0a", b"\xd3" + (10).to_bytes(8, "big")):
        alt = raw[:19] + wide + raw[20:]
        assert msgpack.unpackb(alt, raw=False) == msgpack.unpackb(raw, raw=False)
        with pytest.raises(MalformedMessage, match="non-canonical"):
            codec.unpack(Offer, alt)


def test_map_encoding_is_rejected() -> None:
    as_map = {f.name: getattr(OFFER, f.name) for f in dataclasses.fields(Offer)}
    with pytest.raises(MalformedMessage):
        codec.unpack(Offer, msgpack.packb(as_map, use_bin_type=True))
    with pytest.raises(MalformedMessage):
        codec.unpack(Offer, msgpack.packb({}, use_bin_type=True))


def test_other_non_canonical_forms_are_rejected() -> None:
    raw = codec.pack(OFFER)
    cases = {
        "array16 header": b"\xdc\x00\x04" + raw[1:],
        "bin16 query id": raw[:1] + b"\xc5\x00\x10" + raw[3:],
        "trailing byte": raw + b"\x00",
        "two values": raw + raw,
        "str instead of bin": msgpack.packb(codec.to_wire(OFFER), use_bin_type=False),
    }
    for what, alt in cases.items():
        with pytest.raises(MalformedMessage):
            codec.unpack(Offer, alt)
        assert alt != raw, what


def test_float32_and_int_for_float_are_rejected() -> None:
    wire = codec.to_wire(REQUEST)
    eps = [f.name for f in dataclasses.fields(QueryRequest)].index("epsilon")
    packer32 = msgpack.Packer(use_bin_type=True, use_single_float=True)
    with pytest.raises(MalformedMessage, match="non-canonical"):
        codec.unpack(QueryRequest, packer32.pack(wire))  # 1.0 is exact in float32
    wire[eps] = 1
    with pytest.raises(MalformedMessage, match="finite float"):
        codec.unpack(QueryRequest, msgpack.packb(wire, use_bin_type=True))


def test_ext_types_and_nil_are_rejected() -> None:
    wire = codec.to_wire(OFFER)
    for alien in (msgpack.ExtType(1, b"x" * 4), None, [], 1.5):
        bad = list(wire)
        bad[1] = alien
        with pytest.raises(MalformedMessage):
            codec.unpack(Offer, msgpack.packb(bad, use_bin_type=True))


def test_oversized_strings_and_lists_are_rejected_before_building() -> None:
    wire = codec.to_wire(DECLINE)
    wire[1] = "r" * (codec.MAX_STR + 1)
    with pytest.raises(MalformedMessage, match="at most"):
        codec.unpack(Decline, msgpack.packb(wire, use_bin_type=True))
    wire = codec.to_wire(RESULT)
    wire[2] = ["b" * 64] * (codec.MAX_ITEMS + 1)
    with pytest.raises(MalformedMessage):
        codec.unpack(Result, msgpack.packb(wire, use_bin_type=True))
    with pytest.raises(MalformedMessage):
        codec.unpack(Share, codec.pack(SHARE), max_len=8)


class _AnyWidth:
    """A msgpack writer that may pick any legal width for each value."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw

    def _choice(self, options: list[bytes]) -> bytes:
        return options[self.draw(st.integers(0, len(options) - 1))]

    def _header(
        self, n: int, fix: tuple[int, int] | None, wide: list[tuple[int, str, int]]
    ) -> bytes:
        options = []
        if fix is not None and n < fix[1]:
            options.append(bytes([fix[0] | n]))
        options += [bytes([code]) + struct.pack(fmt, n) for code, fmt, limit in wide if n < limit]
        return self._choice(options)

    def enc(self, v: Any) -> bytes:
        if isinstance(v, bool):
            return b"\xc3" if v else b"\xc2"
        if isinstance(v, int):
            options = []
            if 0 <= v < 128:
                options.append(bytes([v]))
            if -32 <= v < 0:
                options.append(struct.pack(">b", v))
            for code, fmt, lo, hi in (
                (0xCC, ">B", 0, 2**8), (0xCD, ">H", 0, 2**16), (0xCE, ">I", 0, 2**32),
                (0xCF, ">Q", 0, 2**64), (0xD0, ">b", -(2**7), 2**7), (0xD1, ">h", -(2**15), 2**15),
                (0xD2, ">i", -(2**31), 2**31), (0xD3, ">q", -(2**63), 2**63),
            ):
                if lo <= v < hi:
                    options.append(bytes([code]) + struct.pack(fmt, v))
            return self._choice(options)
        if isinstance(v, float):
            options = [b"\xcb" + struct.pack(">d", v)]
            if struct.unpack(">f", struct.pack(">f", v))[0] == v or math.isnan(v):
                options.append(b"\xca" + struct.pack(">f", v))
            return self._choice(options)
        if isinstance(v, str):
            data = v.encode()
            wide = [(0xD9, ">B", 2**8), (0xDA, ">H", 2**16), (0xDB, ">I", 2**32)]
            return self._header(len(data), (0xA0, 32), wide) + data
        if isinstance(v, bytes):
            wide = [(0xC4, ">B", 2**8), (0xC5, ">H", 2**16), (0xC6, ">I", 2**32)]
            return self._header(len(v), None, wide) + v
        if isinstance(v, list):
            head = self._header(len(v), (0x90, 16), [(0xDC, ">H", 2**16), (0xDD, ">I", 2**32)])
            return head + b"".join(self.enc(x) for x in v)
        raise TypeError(type(v))  # pragma: no cover


@FUZZ
@given(data=st.data())
def test_any_other_spelling_is_rejected(data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from([Offer, QueryRequest, Decline, Receipt, Result, Accept]))
    msg = data.draw(STRATEGIES[cls])
    canonical = codec.pack(msg)
    spelled = _AnyWidth(data.draw).enc(codec.to_wire(msg))
    assert msgpack.unpackb(spelled, raw=False) == msgpack.unpackb(canonical, raw=False)
    if spelled == canonical:
        assert codec.unpack(cls, spelled) == msg
    else:
        with pytest.raises(MalformedMessage):
            codec.unpack(cls, spelled)


# -- garbage in, MalformedMessage out ------------------------------------------------------


@FUZZ
@given(cls=st.sampled_from(list(MESSAGE_TYPES.values())), raw=st.binary(max_size=300))
def test_random_bytes_only_raise_malformed(cls: type, raw: bytes) -> None:
    try:
        value = codec.unpack(cls, raw)
    except MalformedMessage as exc:
        assert isinstance(exc, RemoteProtocolError)
    else:  # astronomically unlikely, but then it must be canonical and valid
        assert codec.pack(value) == raw


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=70) | st.binary(max_size=70),
    lambda children: st.lists(children, max_size=14),
    max_leaves=40,
)


@FUZZ
@given(cls=st.sampled_from(list(MESSAGE_TYPES.values())), value=msgpack_values)
def test_random_structures_only_raise_malformed(cls: type, value: Any) -> None:
    raw = msgpack.packb(value, use_bin_type=True)
    try:
        decoded = codec.unpack(cls, raw)
    except MalformedMessage:
        return
    assert codec.pack(decoded) == raw


@FUZZ
@given(data=st.data())
def test_valid_shape_with_one_random_field_only_raises_malformed(data: st.DataObject) -> None:
    """Right arity, one field replaced by an arbitrary value: validation, not a crash."""
    msg = data.draw(st.sampled_from([OFFER, REQUEST, ANNOUNCE, ACCEPT, SHARE, RECEIPT, RESULT]))
    wire = codec.to_wire(msg)
    index = data.draw(st.integers(0, len(wire) - 1))
    wire[index] = data.draw(msgpack_values)
    raw = msgpack.packb(wire, use_bin_type=True)
    try:
        decoded = codec.unpack(type(msg), raw)
    except MalformedMessage:
        return
    assert codec.pack(decoded) == raw
