"""Hostile-input generator shared by the fuzz tests (hypothesis strategies).

An attack is a list of :class:`Hostile` items. Each item knows its channel
(``direct`` or one of the two gossip topics) and builds its wire bytes at
send time from the receiver's clock (``make(now_ms)``), so signed envelopes
are fresh when they arrive. ``copies`` > 1 sends the same bytes again (a
replay). Every item is invalid by construction: a receiver must reject each
copy with exactly one ``rejected.<reason>`` count and accept none.

Nothing here sends a fully valid gossip message (an authentic Announce or
QueryRequest is not hostile input); authentic direct kinds always name a query
the receiver does not have (``unexpected``) or travel on the wrong channel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fi_peer.identity import Identity
from fi_peer.privacy.secagg import CIPHERTEXT_LEN, COMMIT_LEN, TAG_LEN
from fi_peer.privacy.shamir import SHARE_LEN
from fi_peer.protocol import codec
from fi_peer.protocol.envelope import NONCE_LEN, VERSION, signing_bytes
from fi_peer.protocol.messages import (
    MAX_ENVELOPE_BYTES,
    MAX_VECTOR_LEN,
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

DIRECT = "direct"
PEERS = "peers"  # gossip on the peers topic
QUERIES = "queries"  # gossip on the task's query topic
GOSSIP = (PEERS, QUERIES)

# Several signers: one sender may record at most 4096 nonces per window, after
# which everything it signs is rate limited before its body is looked at.
SIGNERS = tuple(Identity.from_seed(f"fuzz-attacker-{i}".encode()) for i in range(16))

Make = Callable[[int], bytes]


@dataclass(frozen=True)
class Hostile:
    category: str
    channel: str
    make: Make
    copies: int = 1


def template(kind: str, query_id: bytes, task: str = "digits") -> Any:
    """A valid message of ``kind`` (as a dataclass) for an unknown query."""
    peer = SIGNERS[0].peer_id
    card = ModelCard(
        task=task, n_classes=10, input_dim=64, arch="mlp", model_hash=b"\x01" * 32, rules=("vote",)
    )
    member = Member(peer_id=peer, box_key=b"\x02" * 32, mask_key=b"\x03" * 32)
    member2 = Member(peer_id="ab" * 32, box_key=b"\x04" * 32, mask_key=b"\x05" * 32)
    msgs: dict[str, Any] = {
        "announce": Announce(
            seq=1,
            addresses=(),
            box_key=b"\x02" * 32,
            eth_address="",
            card=card,
            price_wei=0,
            capacity=4,
        ),
        "query_request": QueryRequest(
            query_id=query_id,
            task=task,
            n_classes=10,
            input_dim=64,
            rule="vote",
            vector_len=10,
            k=2,
            max_price_wei=0,
            deadline_ms=(1 << 62),
            reply_key=b"\x02" * 32,
        ),
        "offer": Offer(
            query_id=query_id,
            price_wei=0,
            box_key=b"\x02" * 32,
            expected_latency_ms=5,
            mask_key=b"\x03" * 32,
        ),
        "accept": Accept(
            query_id=query_id,
            committee=(member, member2),
            threshold=2,
            price_wei=0,
            answer_deadline_ms=(1 << 62),
            escrow_ref=b"",
            noise_sigma=0.0,
            sealed_input=b"\x00" * 300,
        ),
        "decline": Decline(query_id=query_id, reason="busy"),
        "key_shares": KeyShares(
            query_id=query_id,
            ciphertexts=(b"\x00" * CIPHERTEXT_LEN,),
            commitment=b"\x00" * COMMIT_LEN,
        ),
        "key_relay": KeyRelay(
            query_id=query_id, u1=(0, 1), ciphertexts=(b"\x00" * CIPHERTEXT_LEN,)
        ),
        "share": Share(
            query_id=query_id,
            vector=b"\x00" * 80,
            commitment=b"\x00" * 32,
            view_tags=(b"\x00" * TAG_LEN,),
        ),
        "unmask": Unmask(
            query_id=query_id, survivors=(0, 1), dropped=(), view_tags=(b"\x00" * TAG_LEN,)
        ),
        "reveal": Reveal(query_id=query_id, seed_shares=(b"\x00" * SHARE_LEN,), pair_seeds=()),
        "receipt": Receipt(query_id=query_id, member=peer, share_digest=b"\x00" * 32, price_wei=0),
        "result": Result(query_id=query_id, ok=True, contributors=(peer,)),
        "open_request": OpenRequest(query_id=query_id),
        "opening": Opening(query_id=query_id, vector=b"\x00" * 80, nonce=b"\x00" * 32),
    }
    # the input-private (HE) mode's kinds: the codec tests' samples, for this query
    for sample in he_samples(1 << 62):
        named = "query_id" in {f.name for f in dataclasses.fields(sample)}
        msgs[sample.KIND] = dataclasses.replace(sample, query_id=query_id) if named else sample
    return msgs[kind]


def envelope(
    signer: Identity,
    kind: str,
    body: bytes,
    ts_ms: int,
    nonce: bytes,
    *,
    sender: bytes | None = None,
    sig: bytes | None = None,
) -> bytes:
    if sig is None:
        sig = signer.sign(signing_bytes(kind, ts_ms, nonce, body))
    key = signer.public_key if sender is None else sender
    return codec.pack([VERSION, kind, key, ts_ms, nonce, body, sig])


def raw_body(wire: list[Any]) -> bytes:
    out = msgpack.packb(wire, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


# Gossip kinds: a valid query request from anybody is not hostile input, so they are
# only sent with bad bodies or fields (on gossip) below.
GOSSIP_KINDS = ("announce", "query_request", "he_request")
DIRECT_KINDS = tuple(k for k in MESSAGE_TYPES if k not in GOSSIP_KINDS)
KINDS = tuple(MESSAGE_TYPES)

query_ids = st.binary(min_size=16, max_size=16)
signers = st.sampled_from(SIGNERS)
weird_numbers = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, -1.0]),
    st.sampled_from([-1, 0, 1, 1001, 4097, 65_537, (1 << 63), (1 << 64) - 1, -(1 << 63)]),
    st.booleans(),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.none(),
    st.lists(st.integers(-(1 << 63), (1 << 64) - 1), max_size=3),
)


def _signed(
    kind: str, body_of: Callable[[], bytes], signer: Identity, nonce: bytes, skew_ms: int = 0
) -> Make:
    body = body_of()
    return lambda now: envelope(signer, kind, body, now + skew_ms, nonce)


@st.composite
def hostile(draw: st.DrawFn, task: str = "digits") -> Hostile:
    category = draw(
        st.sampled_from(
            [
                "random_bytes",
                "random_msgpack",
                "truncated",
                "oversized_kind",
                "oversized_global",
                "bad_body",
                "bad_body",
                "bad_field",
                "bad_field",
                "replay",
                "forged_sig",
                "foreign_sender",
                "wrong_kind_body",
                "huge_vector",
                "nan_inf",
                "class_count",
                "stale",
                "wrong_channel",
                "bad_envelope",
                "unknown_kind",
            ]
        )
    )
    qid = draw(query_ids)
    signer = draw(signers)
    # fresh per item (drawn nonces collide a lot and would turn most items into replays)
    nonce = os.urandom(NONCE_LEN)
    direct_kind = draw(st.sampled_from(DIRECT_KINDS))
    channel = draw(st.sampled_from((DIRECT, PEERS, QUERIES)))

    def valid_direct() -> Make:
        # authentic and well formed, for a query nobody has: "unexpected" on direct
        body = codec.pack(template(direct_kind, qid, task))
        return _signed(direct_kind, lambda: body, signer, nonce)

    if category == "random_bytes":
        data = draw(st.binary(max_size=2048))
        return Hostile(category, channel, lambda now: data)
    if category == "random_msgpack":
        leaves = st.one_of(
            st.integers(-(1 << 63), (1 << 64) - 1),
            st.binary(max_size=40),
            st.text(max_size=20),
            st.floats(),
            st.booleans(),
            st.none(),
        )
        value = draw(st.recursive(leaves, lambda c: st.lists(c, max_size=8), max_leaves=20))
        data = raw_body(value)
        return Hostile(category, channel, lambda now: data)
    if category == "truncated":
        make = valid_direct()
        cut = draw(st.floats(0.0, 0.999))
        return Hostile(category, channel, lambda now: (lambda d: d[: int(len(d) * cut)])(make(now)))
    if category == "oversized_global" and draw(st.integers(0, 19)) != 0:
        category = "oversized_kind"  # half a megabyte each: a few go a long way
    if category == "oversized_kind":
        kind = draw(st.sampled_from(KINDS))
        cap = MESSAGE_TYPES[kind].MAX_ENVELOPE
        if cap > 64 * 1024:  # keep gossip and bulk traffic small; the global cap has its own case
            kind, cap = "offer", MESSAGE_TYPES["offer"].MAX_ENVELOPE
        pad = draw(st.integers(cap + 1, cap + 4096))
        body = b"\x00" * pad
        return Hostile(category, channel, lambda now: envelope(signer, kind, body, now, nonce))
    if category == "oversized_global":
        extra = draw(st.integers(1, 8192))
        data = b"\x97" + b"\x00" * (MAX_ENVELOPE_BYTES + extra)
        return Hostile(category, DIRECT, lambda now: data)
    if category == "bad_body":
        kind = draw(st.sampled_from(KINDS))
        body = draw(
            st.one_of(
                st.binary(max_size=300),
                st.just(b""),
                st.builds(lambda v: raw_body(v), st.lists(weird_numbers, max_size=14)),
            )
        )
        ch = DIRECT if kind in DIRECT_KINDS else channel
        return Hostile(category, ch, _signed(kind, lambda: body, signer, nonce))
    if category in ("bad_field", "huge_vector", "nan_inf", "class_count"):
        if category == "huge_vector":
            kind = draw(st.sampled_from(["share", "query_request", "accept"]))
        elif category == "nan_inf":
            kind = draw(st.sampled_from(["query_request", "accept"]))
        elif category == "class_count":
            kind = draw(st.sampled_from(["query_request", "announce"]))
        else:
            kind = draw(st.sampled_from([k for k in KINDS if k != "he_request"]))
        wire = codec.to_wire(template(kind, qid, task))
        if category == "huge_vector":
            if kind == "share":
                wire[1] = b"\x00" * draw(
                    st.sampled_from([8 * MAX_VECTOR_LEN + 8, 8 * MAX_VECTOR_LEN + 800, 7, 0])
                )
            elif kind == "query_request":
                wire[5] = draw(st.sampled_from([MAX_VECTOR_LEN + 1, 1 << 40, 0, -5]))
            else:
                wire[7] = b"\x00" * draw(st.sampled_from([4 * 65_536 + 257, 0]))
        elif category == "nan_inf":
            bad = draw(st.sampled_from([math.nan, math.inf, -math.inf, -1e-9, 1e300]))
            index = draw(st.sampled_from([10, 11])) if kind == "query_request" else 6
            if kind == "query_request" and index == 11 and bad == 1e300:
                bad = 2.0  # delta > 1
            wire[index] = bad
        elif category == "class_count":
            bad = draw(st.sampled_from([-1, 0, 1, 1001, 1 << 32, (1 << 64) - 1, -(1 << 63)]))
            if kind == "query_request":
                wire[2] = bad
            else:
                wire[4][1] = bad
        else:
            index = draw(st.integers(0, len(wire) - 1))
            wire[index] = draw(weird_numbers)
            if draw(st.booleans()):
                wire = wire[: draw(st.integers(0, len(wire)))] + draw(
                    st.lists(weird_numbers, max_size=2)
                )
        try:
            body = raw_body(wire)
        except (OverflowError, ValueError, TypeError):
            body = b"\xc1"
        if kind in ("announce", "query_request") and category != "bad_field":
            ch = draw(st.sampled_from(GOSSIP))  # always invalid: fine on gossip
        else:
            ch = DIRECT
        return Hostile(category, ch, _signed(kind, lambda: body, signer, nonce))
    if category == "unknown_kind":
        kind = draw(st.text(max_size=60).filter(lambda k: k not in MESSAGE_TYPES))
        body = codec.pack(template(direct_kind, qid, task))
        return Hostile(category, channel, _signed(kind, lambda: body, signer, nonce))
    if category == "replay":
        return Hostile(category, DIRECT, valid_direct(), copies=draw(st.integers(2, 4)))
    if category == "forged_sig":
        body = codec.pack(template(direct_kind, qid, task))
        how = draw(st.sampled_from(["random", "flip", "zero", "other_key"]))
        ch = DIRECT
        if how == "random":
            sig = draw(st.binary(min_size=64, max_size=64))
            return Hostile(
                category, ch, lambda now: envelope(signer, direct_kind, body, now, nonce, sig=sig)
            )
        if how == "zero":
            return Hostile(
                category,
                ch,
                lambda now: envelope(signer, direct_kind, body, now, nonce, sig=b"\x00" * 64),
            )
        if how == "other_key":
            other = draw(signers.filter(lambda s: s is not signer))

            def make_other(now: int) -> bytes:
                sig = other.sign(signing_bytes(direct_kind, now, nonce, body))
                return envelope(signer, direct_kind, body, now, nonce, sig=sig)

            return Hostile(category, ch, make_other)
        bit = draw(st.integers(0, 511))

        def make_flip(now: int) -> bytes:
            sig = bytearray(signer.sign(signing_bytes(direct_kind, now, nonce, body)))
            sig[bit // 8] ^= 1 << (bit % 8)
            return envelope(signer, direct_kind, body, now, nonce, sig=bytes(sig))

        return Hostile(category, ch, make_flip)
    if category == "foreign_sender":
        # signed by us, claiming someone else's key (e.g. the victim's own)
        claimed = draw(st.binary(min_size=32, max_size=32))
        body = codec.pack(template(direct_kind, qid, task))
        return Hostile(
            category,
            channel,
            lambda now: envelope(signer, direct_kind, body, now, nonce, sender=claimed),
        )
    if category == "wrong_kind_body":
        pair = draw(st.lists(st.sampled_from(KINDS), min_size=2, max_size=2, unique=True))
        kind, body = pair[0], codec.pack(template(pair[1], qid, task))
        ch = DIRECT if kind in DIRECT_KINDS else draw(st.sampled_from(GOSSIP))
        return Hostile(category, ch, _signed(kind, lambda: body, signer, nonce))
    if category == "stale":
        skew = draw(st.sampled_from([-1, 1])) * draw(st.integers(31_000, 10**9))
        return Hostile(
            category,
            channel,
            lambda now: envelope(
                signer,
                direct_kind,
                codec.pack(template(direct_kind, qid, task)),
                max(0, now + skew),
                nonce,
            ),
        )
    if category == "wrong_channel":
        if draw(st.booleans()):  # authentic gossip kinds sent directly
            kind = draw(st.sampled_from(["announce", "query_request"]))
            body = codec.pack(template(kind, qid, task))
            return Hostile(category, DIRECT, _signed(kind, lambda: body, signer, nonce))
        return Hostile(category, draw(st.sampled_from(GOSSIP)), valid_direct())
    # bad_envelope: the 7-field array itself is wrong
    fields: list[Any] = [
        VERSION,
        direct_kind,
        signer.public_key,
        0,
        nonce,
        codec.pack(template(direct_kind, qid, task)),
        b"\x00" * 64,
    ]
    index = draw(st.integers(0, 6))
    fields[index] = draw(weird_numbers)
    if draw(st.booleans()):
        fields = fields[: draw(st.integers(0, 7))]
    try:
        data = raw_body(fields)
    except (OverflowError, ValueError, TypeError):
        data = b"\xc1"
    return Hostile(category, channel, lambda now: data)


@functools.cache
def generate(n_items: int, *, task: str = "digits", per_example: int = 25) -> list[Hostile]:
    """At least ``n_items`` hostile items, drawn by hypothesis (derandomized: the same
    corpus on every run, so a failure names a reproducible input)."""
    corpus: list[Hostile] = []
    examples = math.ceil(n_items / per_example) + 20

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(hostile(task), min_size=per_example, max_size=per_example))
    def collect(items: list[Hostile]) -> None:
        corpus.extend(items)

    collect()
    return corpus[:n_items]


def messages(corpus: list[Hostile]) -> int:
    """How many copies the corpus sends."""
    return sum(item.copies for item in corpus)
