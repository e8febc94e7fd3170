"""Whole queries through PeerCores in a SansIoNet (DESIGN.md, "One query, step by step").

No sockets, no sleeps, no real clock: the net delivers effects in FIFO order and
timers fire only when a test advances the fake clock. Models are deterministic
functions whose outputs are exact in fixed point, so sums are asserted exactly.

Queries are securely aggregated (the default). Where the timing or the bytes on
the wire differ, a test runs in both modes: ``plaintext`` is the opt-in mode
where members send their vectors in the clear. The secure-aggregation rounds
themselves are tested in test_protocol_private.py.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import numpy as np
import pytest

from fi_peer.errors import LocalProtocolError
from fi_peer.identity import Identity
from fi_peer.protocol import codec, fixedpoint
from fi_peer.protocol.effects import Evaluate, QueryOutcome, Send
from fi_peer.protocol.envelope import seal, signing_bytes
from fi_peer.protocol.messages import (
    MAX_ENVELOPE_BYTES,
    Accept,
    Decline,
    Member,
    Offer,
    QueryRequest,
    Receipt,
    Result,
    Share,
)
from fi_peer.protocol.peer import CoreConfig, PeerCore
from fi_peer.protocol.querier import QuerierConfig
from fi_peer.protocol.responder import GRACE_MS, ResponderConfig
from fi_peer.protocol.sealing import seal_input
from tests.unit.sansio_net import SansIoNet

T0 = 1_000_000
TIMEOUT = 5_000
X = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
MALLORY = Identity.from_seed(b"mallory")

Model = Callable[[np.ndarray, str], np.ndarray]


def model_for(i: int) -> Model:
    """Peer i's model: exact in fixed point, different for each peer and input."""

    def model(x: np.ndarray, rule: str) -> np.ndarray:
        return np.array([float(x.sum()) * (i + 1), 0.5 * i, -float(x[0]) - i])

    return model


def kind_of(data: bytes) -> str:
    kind = codec.unpack_raw(data, max_len=MAX_ENVELOPE_BYTES)[1]
    assert isinstance(kind, str)
    return kind


@dataclass
class Tap:
    """A ``drop`` for SansIoNet: records every message, holds back those ``hold`` picks."""

    hold: Callable[[str, str, str], bool] = lambda src, dst, kind: False
    seen: list[tuple[str, str, str, bytes]] = field(default_factory=list)
    held: list[tuple[str, str, str, bytes]] = field(default_factory=list)

    def __call__(self, src: str, dst: str, data: bytes) -> bool:
        kind = kind_of(data)
        self.seen.append((src, dst, kind, data))
        if self.hold(src, dst, kind):
            self.held.append((src, dst, kind, data))
            return True
        return False

    def of(self, kind: str, src: str | None = None, dst: str | None = None) -> list[bytes]:
        return [d for s, t, k, d in self.seen
                if k == kind and src in (None, s) and dst in (None, t)]


@dataclass
class World:
    net: SansIoNet
    querier: PeerCore
    members: list[PeerCore]
    models: dict[str, Model | None]

    def submit(self, x: np.ndarray = X, *, k: int = 3, max_price_wei: int = 100,
               timeout_ms: int = TIMEOUT, querier: PeerCore | None = None) -> bytes:
        core = querier or self.querier
        qid, effects = core.submit_query(
            x, rule="soft", vector_len=3, k=k, max_price_wei=max_price_wei,
            timeout_ms=timeout_ms, now_ms=self.net.now_ms,
        )
        self.net._feed(core.peer_id, effects)
        self.net.run()
        return qid

    def expected(self, x: np.ndarray, ids: list[str]) -> np.ndarray:
        total = np.zeros(3)
        for pid in ids:
            m = self.models[pid]
            assert m is not None
            total += m(x, "soft")
        return total


def world(
    n_members: int = 3,
    *,
    models: list[Model | None] | None = None,
    prices: list[int] | None = None,
    querier_config: QuerierConfig | None = None,
    n_classes: list[int] | None = None,
    plaintext: bool = False,
) -> World:
    net = SansIoNet(now_ms=T0)
    qconf = CoreConfig(querier=querier_config or QuerierConfig(secure_aggregation=not plaintext))
    querier = net.add("querier", model_for(100), qconf)
    members = []
    for i in range(n_members):
        price = prices[i] if prices else 0
        conf = CoreConfig(responder=ResponderConfig(price_wei=price, allow_plaintext=plaintext))
        m = models[i] if models else model_for(i)
        members.append(net.add(f"member{i}", m, conf,
                               n_classes=n_classes[i] if n_classes else 3))
    net.run()
    return World(net, querier, members, dict(net.models))


def ids(*cores: PeerCore) -> list[str]:
    return sorted(c.peer_id for c in cores)


def done(w: World, qid: bytes) -> QueryOutcome:
    assert [o.query_id for o in w.net.outcomes].count(qid) == 1
    return w.net.done[qid]


# -- a query that works -----------------------------------------------------------------------


# Under secure aggregation the shares round ends this long before the deadline.
UNMASK_WINDOW = QuerierConfig().unmask_window_ms
MODES = pytest.mark.parametrize("plaintext", [False, True], ids=["secagg", "plaintext"])


@MODES
def test_query_with_k_members_is_ok_with_the_exact_sum(plaintext: bool) -> None:
    w = world(3, prices=[5, 6, 7], plaintext=plaintext)
    tap = Tap()
    w.net.drop = tap
    qid = w.submit(k=3)
    out = done(w, qid)
    assert out.ok and out.reason == "ok"
    assert out.contributors == tuple(ids(*w.members))
    assert out.committee_size == 3
    assert out.elapsed_ms == 0  # everyone answered at once: no waiting for the deadline
    assert out.total is not None
    expected = w.expected(X, [w.querier.peer_id, *ids(*w.members)])
    assert np.array_equal(out.total, expected)
    assert expected.tolist() == [10.0 * (101 + 1 + 2 + 3), 0.5 * (100 + 0 + 1 + 2),
                                 -4.0 - (100 + 0 + 1 + 2)]
    assert w.querier.queries == {}
    assert w.querier.metrics["queries.ok"] == 1
    # every member holds a receipt for exactly what it sent, at its own price
    for i, member in enumerate(w.members):
        (receipt,) = member.responder.receipts
        model = w.models[member.peer_id]
        assert model is not None
        vector = fixedpoint.to_bytes(fixedpoint.encode(model(X, "soft")))
        (sent,) = [codec.unpack(Share, msgpack.unpackb(d, raw=False)[5]).vector
                   for d in tap.of("share", src=member.peer_id)]
        # in the clear only in plaintext mode; masked (uniform-looking) otherwise
        assert (sent == vector) is plaintext
        assert receipt == Receipt(query_id=qid, member=member.peer_id,
                                  share_digest=hashlib.sha256(sent).digest(),
                                  price_wei=[5, 6, 7][i])
        assert member.responder.sessions == {}  # the Result closed it
        assert member.metrics["accepted.result"] == 1


def test_include_self_false_sums_only_the_members() -> None:
    w = world(3, querier_config=QuerierConfig(include_self=False))
    out = done(w, w.submit(k=3))
    assert out.ok and out.total is not None
    assert np.array_equal(out.total, w.expected(X, ids(*w.members)))


def test_include_self_adds_exactly_the_querier_vector() -> None:
    with_self = world(3)
    without = world(3, querier_config=QuerierConfig(include_self=False))
    a = done(with_self, with_self.submit(k=3)).total
    b = done(without, without.submit(k=3)).total
    assert a is not None and b is not None
    assert np.array_equal(a - b, model_for(100)(X, "soft"))


def test_k_smaller_than_the_network() -> None:
    w = world(5)
    out = done(w, w.submit(k=2))
    assert out.ok and out.committee_size == 2 and len(out.contributors) == 2
    assert set(out.contributors) <= set(ids(*w.members))
    assert out.total is not None
    assert np.array_equal(out.total, w.expected(X, [w.querier.peer_id, *out.contributors]))
    unchosen = [m for m in w.members if m.peer_id not in out.contributors]
    assert all(m.responder.receipts == [] for m in unchosen)


def test_consecutive_queries_are_independent() -> None:
    w = world(3)
    xs = [X, X * 2, np.array([0.5, -1.0, 0.0, 8.0], dtype=np.float32)]
    qids = [w.submit(x, k=3) for x in xs]
    for qid, x in zip(qids, xs, strict=True):
        out = done(w, qid)
        assert out.total is not None
        assert np.array_equal(out.total, w.expected(x, [w.querier.peer_id, *ids(*w.members)]))


# -- prices -------------------------------------------------------------------------------------


def test_offers_above_max_price_are_not_taken() -> None:
    w = world(4, prices=[5, 50, 5, 100])
    cheap = ids(w.members[0], w.members[2])
    qid = w.submit(k=3, max_price_wei=10)
    assert qid not in w.net.done  # only 2 offers for k=3: wait for the window
    # an outsider offers above the maximum, directly: refused, never in the committee
    over = Offer(query_id=qid, price_wei=11, box_key=MALLORY.box_public_key,
                 expected_latency_ms=1)
    assert w.net.deliver(w.querier.peer_id, seal(MALLORY, over, w.net.now_ms)) == []
    assert w.querier.metrics["rejected.unexpected"] == 1
    w.net.advance(1_000)  # offer window closes with 2 >= min_committee offers
    out = done(w, qid)
    assert out.ok and list(out.contributors) == cheap and out.committee_size == 2
    assert out.elapsed_ms == 1_000
    assert out.total is not None
    assert np.array_equal(out.total, w.expected(X, [w.querier.peer_id, *cheap]))
    for member in w.members:
        prices = [r.price_wei for r in member.responder.receipts]
        assert prices == ([5] if member.peer_id in cheap else [])


def test_offer_at_exactly_max_price_is_taken() -> None:
    w = world(2, prices=[10, 10])
    out = done(w, w.submit(k=2, max_price_wei=10))
    assert out.ok and len(out.contributors) == 2


# -- members that do not answer ----------------------------------------------------------------


def test_declining_member_leaves_enough_shares() -> None:
    # k = 4, t = 3: secure aggregation lets t - 2 = 1 member drop after the relay
    # (secagg: k = 3 lets none; test_protocol_private covers that limit)
    w = world(4, models=[model_for(0), None, model_for(2), model_for(3)])
    out = done(w, w.submit(k=4))
    assert out.ok and out.elapsed_ms == 0  # a decline is an answer: no need to wait
    answered = ids(w.members[0], w.members[2], w.members[3])
    assert list(out.contributors) == answered and out.committee_size == 4
    assert out.total is not None
    assert np.array_equal(out.total, w.expected(X, [w.querier.peer_id, *answered]))
    assert w.querier.metrics["accepted.decline"] == 1
    assert w.members[1].metrics["evaluation.failed"] == 1


def test_too_many_declines_fail_at_once_with_a_reason() -> None:
    w = world(3, models=[None, model_for(1), None])
    out = done(w, w.submit(k=3))
    assert not out.ok and out.reason == "declined_2_of_3"
    assert out.total is None and out.contributors == ()
    assert out.elapsed_ms == 0
    # the committee is told; nobody keeps state for the query
    assert all(m.responder.sessions == {} for m in w.members)


@MODES
def test_dropped_share_waits_for_the_deadline_then_ok(plaintext: bool) -> None:
    """Plaintext: the shares round lasts until the deadline; secagg: until the
    unmask window before it (the unmask round then takes no time here). k = 4:
    secagg's t = 3 lets t - 2 = 1 member drop after the relay."""
    w = world(4, plaintext=plaintext)
    silent = w.members[1].peer_id
    w.net.drop = Tap(hold=lambda src, dst, kind: src == silent and kind == "share")
    qid = w.submit(k=4)
    end = TIMEOUT if plaintext else TIMEOUT - UNMASK_WINDOW
    w.net.advance(end - 1)
    assert qid not in w.net.done
    w.net.advance(1)
    out = done(w, qid)
    assert out.ok and out.elapsed_ms == end
    answered = ids(w.members[0], w.members[2], w.members[3])
    assert list(out.contributors) == answered
    assert out.total is not None
    assert np.array_equal(out.total, w.expected(X, [w.querier.peer_id, *answered]))
    # the silent member saw the Result and forgot the query; it got no receipt
    assert w.members[1].responder.sessions == {} and w.members[1].responder.receipts == []


@MODES
def test_too_few_shares_fail_at_the_deadline_with_a_reason(plaintext: bool) -> None:
    w = world(3, plaintext=plaintext)
    silent = {w.members[0].peer_id, w.members[2].peer_id}
    w.net.drop = Tap(hold=lambda src, dst, kind: src in silent and kind == "share")
    qid = w.submit(k=3)
    end = TIMEOUT if plaintext else TIMEOUT - UNMASK_WINDOW
    w.net.advance(end - 1)
    assert qid not in w.net.done
    w.net.advance(1)
    out = done(w, qid)
    assert not out.ok and out.reason == "too_few_shares_1_of_2"
    assert out.total is None and out.contributors == () and out.elapsed_ms == end
    assert w.querier.metrics["queries.failed"] == 1


def test_too_few_offers_fail_after_the_offer_window() -> None:
    # two of three peers serve another task shape (n_classes) and do not offer
    w = world(3, n_classes=[3, 10, 10])
    qid = w.submit(k=3)
    w.net.advance(999)
    assert qid not in w.net.done
    w.net.advance(1)
    out = done(w, qid)
    assert not out.ok and out.reason == "too_few_offers_1" and out.elapsed_ms == 1_000
    assert out.committee_size == 0 and out.total is None


def test_no_peers_at_all() -> None:
    w = world(0)
    qid = w.submit(k=2)
    w.net.advance(1_000)
    out = done(w, qid)
    assert not out.ok and out.reason == "too_few_offers_0"


def test_offer_window_never_takes_more_than_half_the_time_budget() -> None:
    w = world(1)
    qid = w.submit(k=3, timeout_ms=400)
    w.net.advance(400)
    out = done(w, qid)
    assert not out.ok and out.reason == "too_few_offers_1" and out.elapsed_ms == 200


# -- every query ends exactly once --------------------------------------------------------------


def test_fifty_queries_with_random_drops_all_end_exactly_once() -> None:
    rng = random.Random(20260101)
    net = SansIoNet(now_ms=T0)
    models: list[Model | None] = [model_for(i) for i in range(6)] + [None]
    prices = [0, 1, 2, 3, 5, 8, 0]
    cores = [
        net.add(f"p{i}", m, CoreConfig(responder=ResponderConfig(price_wei=prices[i])))
        for i, m in enumerate(models)
    ]
    net.run()
    net.drop = lambda src, dst, data: rng.random() < 0.2
    submitted: dict[bytes, tuple[PeerCore, np.ndarray, int]] = {}
    for _ in range(50):
        core = rng.choice(cores)
        x = np.array([rng.randint(-8, 8) for _ in range(4)], dtype=np.float32)
        timeout = rng.randint(300, 4_000)
        qid, effects = core.submit_query(
            x, rule="soft", vector_len=3, k=rng.randint(2, 5),
            max_price_wei=rng.choice([0, 2, 100]), timeout_ms=timeout, now_ms=net.now_ms,
        )
        submitted[qid] = (core, x, timeout)
        net._feed(core.peer_id, effects)
        net.advance(rng.randint(0, 400))
    net.advance(4_000 + GRACE_MS + 1)

    counts = Counter(o.query_id for o in net.outcomes)
    assert set(counts) == set(submitted) and set(counts.values()) == {1}
    assert len(net.outcomes) == 50
    n_ok = 0
    for outcome in net.outcomes:
        core, x, timeout = submitted[outcome.query_id]
        assert 0 <= outcome.elapsed_ms <= timeout
        if outcome.ok:
            n_ok += 1
            assert len(outcome.contributors) >= outcome.committee_size // 2 + 1
            expected = sum(net.models[p](x, "soft") for p in outcome.contributors)  # type: ignore[misc]
            own = net.models[core.peer_id]
            if own is not None:
                expected = expected + own(x, "soft")
            assert outcome.total is not None and np.array_equal(outcome.total, expected)
        else:
            assert outcome.total is None and outcome.reason != "ok"
    assert 0 < n_ok < 50  # drops hurt some queries, not all
    for core in cores:
        assert core.queries == {}
        assert core.responder.sessions == {}  # nothing left behind after the grace period
        assert core.metrics["queries.ok"] + core.metrics["queries.failed"] == (
            core.metrics["queries.submitted"]
        )


# -- bad input never stops a peer ----------------------------------------------------------------


def _respell_ts(data: bytes, ts: int) -> bytes:
    old = b"\xce" + ts.to_bytes(4, "big")
    assert old in data
    return data.replace(old, b"\xd2" + ts.to_bytes(4, "big"), 1)


def _forged(signer: Identity, sender: Identity, msg: object, now: int) -> bytes:
    body = codec.pack(msg)
    nonce = b"\x17" * 16
    sig = signer.sign(signing_bytes(msg.KIND, now, nonce, body))  # type: ignore[attr-defined]
    return msgpack.packb([1, msg.KIND, sender.public_key, now, nonce, body, sig],  # type: ignore[attr-defined]
                         use_bin_type=True)


def _signed_raw(signer: Identity, kind: str, body: bytes, now: int) -> bytes:
    nonce = b"\x23" * 16
    sig = signer.sign(signing_bytes(kind, now, nonce, body))
    return msgpack.packb([1, kind, signer.public_key, now, nonce, body, sig], use_bin_type=True)


def test_querier_survives_every_kind_of_bad_input_mid_query() -> None:
    w = world(3)
    tap = Tap(hold=lambda src, dst, kind: kind == "share")
    w.net.drop = tap
    q, (a, b, _c) = w.querier, w.members
    ident_a = Identity.from_seed(b"member0")
    qid = w.submit(k=3)
    assert qid in q.queries and len(tap.held) == 3  # committee chosen, answers held back
    now = w.net.now_ms
    share_a = next(d for s, _, k, d in tap.held if s == a.peer_id)
    offer_a = tap.of("offer", src=a.peer_id)[0]
    genuine_share = codec.unpack(Share, msgpack.unpackb(share_a, raw=False)[5])
    request = codec.unpack(QueryRequest, msgpack.unpackb(tap.of("query_request")[0],
                                                         raw=False)[5])

    tampered = bytearray(share_a)
    tampered[-70] ^= 0x01  # inside the body (the last 66 bytes are the signature)
    bad_inputs: list[tuple[str, bytes, str | None, str]] = [
        ("tampered share", bytes(tampered), None, "bad_signature"),
        ("replayed offer", offer_a, None, "replayed"),
        ("stale share", seal(ident_a, genuine_share, now - 30_001), None, "stale"),
        ("future share", seal(ident_a, genuine_share, now + 30_001), None, "stale"),
        ("wrong signer", _forged(MALLORY, ident_a, genuine_share, now), None, "bad_signature"),
        ("oversized", b"\x00" * (MAX_ENVELOPE_BYTES + 1), None, "oversized"),
        ("oversized offer", _signed_raw(ident_a, "offer", b"\x00" * 2_000, now), None,
         "oversized"),
        ("random bytes", random.Random(3).randbytes(300), None, "malformed"),
        ("respelled", _respell_ts(seal(ident_a, genuine_share, now), now), None, "malformed"),
        ("garbage body", _signed_raw(ident_a, "share", b"\x93\x01\x02\x03", now + 1), None,
         "malformed"),
        ("unknown kind", _signed_raw(ident_a, "gossip", b"", now + 2), None, "unknown_kind"),
        ("offer via topic",
         seal(ident_a, Offer(query_id=qid, price_wei=0, box_key=b"k" * 32,
                             expected_latency_ms=1), now), q.query_topic, "unexpected"),
        ("request sent directly", seal(MALLORY, request, now), None, "unexpected"),
        ("unsolicited accept",
         seal(MALLORY, Accept(query_id=qid, committee=(Member(peer_id=q.peer_id,
                                                              box_key=b"k" * 32),),
                              threshold=1, price_wei=0, answer_deadline_ms=now + 10,
                              escrow_ref=b"", noise_sigma=0.0, sealed_input=b"x"), now),
         None, "unexpected"),
        ("share from a non-member", seal(MALLORY, genuine_share, now), None, "unexpected"),
        ("share for an unknown query",
         seal(ident_a, Share(query_id=b"?" * 16, vector=b"\x00" * 24, commitment=b""), now),
         None, "unexpected"),
        ("share of the wrong length",
         seal(ident_a, Share(query_id=qid, vector=b"\x00" * 16, commitment=b""), now),
         None, "unexpected"),
        ("late offer from a member",
         seal(ident_a, Offer(query_id=qid, price_wei=0, box_key=b"k" * 32,
                             expected_latency_ms=1), now), None, "unexpected"),
        ("decline from a non-member", seal(MALLORY, Decline(query_id=qid, reason="no"), now),
         None, "unexpected"),
        ("receipt to a querier",
         seal(ident_a, Receipt(query_id=qid, member=q.peer_id, share_digest=b"d" * 32,
                               price_wei=0), now), None, "unexpected"),
        ("result from a stranger", seal(MALLORY, Result(query_id=qid, ok=True), now), None,
         "unexpected"),
    ]
    for name, data, topic, reason in bad_inputs:
        before = Counter(q.metrics)
        assert w.net.deliver(q.peer_id, data, topic=topic) == [], name
        w.net.run()
        delta = Counter(q.metrics)
        delta.subtract(before)
        assert +delta == Counter({f"rejected.{reason}": 1}), name
        assert qid in q.queries, name  # the query is still in flight

    # the held answers now arrive: the query completes, exactly as without the noise
    for _src, dst, _kind, data in tap.held:
        w.net.deliver(dst, data)
    w.net.drop = lambda src, dst, data: False
    w.net.run()
    out = done(w, qid)
    assert out.ok and out.contributors == tuple(ids(a, b, _c))
    assert out.total is not None
    assert np.array_equal(out.total, w.expected(X, [q.peer_id, *ids(*w.members)]))
    assert q.metrics["accepted.share"] == 3


def test_member_survives_bad_input_mid_query() -> None:
    w = world(3)
    tap = Tap(hold=lambda src, dst, kind: kind == "share")
    w.net.drop = tap
    a = w.members[0]
    ident_q = Identity.from_seed(b"querier")
    qid = w.submit(k=3)
    now = w.net.now_ms
    accept_a = tap.of("accept", dst=a.peer_id)[0]
    genuine_accept = codec.unpack(Accept, msgpack.unpackb(accept_a, raw=False)[5])
    receipt = Receipt(query_id=qid, member=a.peer_id, share_digest=b"d" * 32, price_wei=0)
    bad_inputs: list[tuple[str, bytes, str]] = [
        ("replayed accept", accept_a, "replayed"),
        ("forged receipt", _forged(MALLORY, ident_q, receipt, now), "bad_signature"),
        ("accept from a stranger", seal(MALLORY, genuine_accept, now), "unexpected"),
        ("second accept from the querier", seal(ident_q, genuine_accept, now), "unexpected"),
        ("result from a stranger", seal(MALLORY, Result(query_id=qid, ok=False,
                                                        reason="x"), now), "unexpected"),
        ("random bytes", b"\x97" + random.Random(5).randbytes(120), "malformed"),
    ]
    for name, data, reason in bad_inputs:
        before = Counter(a.metrics)
        assert w.net.deliver(a.peer_id, data) == [], name
        delta = Counter(a.metrics)
        delta.subtract(before)
        assert +delta == Counter({f"rejected.{reason}": 1}), name
        assert (w.querier.peer_id, qid) in a.responder.sessions, name
    for _src, dst, _kind, data in tap.held:
        w.net.deliver(dst, data)
    w.net.run()
    assert done(w, qid).ok
    (got,) = a.responder.receipts
    assert got.query_id == qid and got.member == a.peer_id
    assert a.responder.sessions == {}


def test_accept_with_a_bad_sealed_input_is_malformed_and_recoverable() -> None:
    """An Accept whose input does not open is dropped; the genuine one still works."""
    w = world(2)
    tap = Tap(hold=lambda src, dst, kind: kind == "accept")
    w.net.drop = tap
    a = w.members[0]
    ident_q = Identity.from_seed(b"querier")
    qid = w.submit(k=2)
    accept_a = next(d for _, dst, _, d in tap.held if dst == a.peer_id)
    genuine = codec.unpack(Accept, msgpack.unpackb(accept_a, raw=False)[5])
    other_qid_input = seal_input(ident_q.box_key, a.identity.box_public_key, b"!" * 16, X)
    for sealed in (b"\x00" * 80, other_qid_input):
        bad = Accept(**{**{f: getattr(genuine, f) for f in genuine.__slots__},  # type: ignore[attr-defined]
                        "sealed_input": sealed})
        assert w.net.deliver(a.peer_id, seal(ident_q, bad, w.net.now_ms)) == []
    assert a.metrics["rejected.malformed"] == 2
    for _src, dst, _kind, data in tap.held:
        w.net.deliver(dst, data)
    w.net.run()
    out = done(w, qid)
    assert out.ok and len(out.contributors) == 2


# -- regressions: attacks and mistakes found in review ----------------------------------------


def test_foreign_request_reusing_our_query_id_cannot_break_our_query() -> None:
    w = world(2)
    tap = Tap(hold=lambda src, dst, kind: kind == "share")
    w.net.drop = tap
    q = w.querier
    qid = w.submit(k=2)
    assert qid in q.queries and q.queries[qid].local is not None  # own vector already in
    now = w.net.now_ms
    request = QueryRequest(query_id=qid, task="toy", n_classes=3, input_dim=4, rule="soft",
                           vector_len=3, k=1, max_price_wei=0, deadline_ms=now + 5_000,
                           reply_key=MALLORY.box_public_key)
    w.net.deliver(q.peer_id, seal(MALLORY, request, now), topic=q.query_topic)
    accept = Accept(query_id=qid, committee=(Member(peer_id=q.peer_id,
                                                    box_key=q.identity.box_public_key),),
                    threshold=1, price_wei=0, answer_deadline_ms=now + 5_000, escrow_ref=b"",
                    noise_sigma=0.0,
                    sealed_input=seal_input(MALLORY.box_key, q.identity.box_public_key, qid,
                                            np.full(4, 9.0, dtype=np.float32)))
    w.net.deliver(q.peer_id, seal(MALLORY, accept, now))
    w.net.run()  # the Evaluate for Mallory's "query" is carried out here
    for _src, dst, _kind, data in tap.held:
        w.net.deliver(dst, data)
    w.net.run()
    out = done(w, qid)
    assert out.ok and out.total is not None
    assert np.array_equal(out.total, w.expected(X, [q.peer_id, *ids(*w.members)]))


@pytest.mark.parametrize("change", ["digest", "price"])
def test_member_rejects_a_receipt_that_does_not_match_its_share(change: str) -> None:
    w = world(2, prices=[5, 5])
    a = w.members[0]
    w.net.drop = Tap(hold=lambda src, dst, kind: dst == a.peer_id and kind in ("receipt",
                                                                                "result"))
    qid = w.submit(k=2, max_price_wei=5)
    assert done(w, qid).ok
    model = w.models[a.peer_id]
    assert model is not None
    digest = hashlib.sha256(fixedpoint.to_bytes(fixedpoint.encode(model(X, "soft")))).digest()
    receipt = Receipt(query_id=qid, member=a.peer_id,
                      share_digest=b"\x00" * 32 if change == "digest" else digest,
                      price_wei=5 if change == "digest" else 0)
    ident_q = Identity.from_seed(b"querier")
    assert w.net.deliver(a.peer_id, seal(ident_q, receipt, w.net.now_ms)) == []
    assert a.metrics["rejected.unexpected"] == 1
    assert a.responder.receipts == []


def test_far_future_deadlines_cannot_exhaust_capacity() -> None:
    net = SansIoNet(now_ms=T0)
    slow = CoreConfig(announce_interval_ms=600_000)  # few heartbeats over the hour
    q = net.add("querier", model_for(100), slow)
    members = [net.add(f"member{i}", model_for(i), slow) for i in range(2)]
    net.run()
    capacity = members[0].config.responder.capacity
    max_ms = members[0].config.responder.max_query_ms  # the farthest deadline a member takes
    for i in range(capacity):
        flood = QueryRequest(query_id=i.to_bytes(16, "big"), task="toy", n_classes=3,
                             input_dim=4, rule="soft", vector_len=3, k=2, max_price_wei=0,
                             deadline_ms=net.now_ms + max_ms, reply_key=MALLORY.box_public_key)
        data = seal(MALLORY, flood, net.now_ms)
        for m in members:
            net.deliver(m.peer_id, data, topic=m.query_topic)
    net.run()
    assert all(len(m.responder.sessions) == capacity for m in members)
    net.advance(3_600_000)  # an hour later, Mallory never sent an Accept
    qid, effects = q.submit_query(X, rule="soft", vector_len=3, k=2, max_price_wei=0,
                                  timeout_ms=TIMEOUT, now_ms=net.now_ms)
    net._feed(q.peer_id, effects)
    net.advance(TIMEOUT)
    assert net.done[qid].ok


def test_no_committee_smaller_than_min_committee() -> None:
    w = world(3)
    assert w.querier.config.querier.min_committee == 2
    try:
        qid = w.submit(k=1)
    except LocalProtocolError:
        return  # refusing k < min_committee up front is fine too
    w.net.advance(TIMEOUT)
    out = done(w, qid)
    assert not (out.ok and out.committee_size < 2), out


# -- effects and bookkeeping --------------------------------------------------------------------


def test_failed_query_tells_its_committee() -> None:
    w = world(3)
    tap = Tap(hold=lambda src, dst, kind: kind == "share")
    w.net.drop = tap
    qid = w.submit(k=3)
    w.net.advance(TIMEOUT)
    out = done(w, qid)
    assert not out.ok and out.reason == "too_few_shares_0_of_2"
    results = [codec.unpack(Result, msgpack.unpackb(d, raw=False)[5]) for d in tap.of("result")]
    assert len(results) == 3
    assert all(r == Result(query_id=qid, ok=False, reason=out.reason) for r in results)
    assert all(m.responder.sessions == {} for m in w.members)


def test_querier_effects_on_submit() -> None:
    w = world(0)
    qid, effects = w.querier.submit_query(X, rule="soft", vector_len=3, k=2, max_price_wei=0,
                                          timeout_ms=TIMEOUT, now_ms=T0)
    sends = [e for e in effects if isinstance(e, Send)]
    evaluates = [e for e in effects if isinstance(e, Evaluate)]
    assert sends == []  # the request is gossiped, never sent to anyone directly
    assert len(evaluates) == 1 and evaluates[0].query_id == qid
    assert np.array_equal(evaluates[0].x, X)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"k": 0}, "invalid query"), ({"k": True}, "invalid query"),
     ({"vector_len": 0}, "invalid query"), ({"max_price_wei": -1}, "invalid query"),
     ({"x": np.array([1.0, np.nan, 0, 0])}, "NaN"), ({"x": np.ones(3)}, "shape")],
)
def test_invalid_local_queries_are_local_errors(kwargs: dict[str, object], match: str) -> None:
    w = world(0)
    args: dict[str, object] = {"x": X, "rule": "soft", "vector_len": 3, "k": 2,
                               "max_price_wei": 0, "timeout_ms": TIMEOUT, "now_ms": T0}
    args.update(kwargs)
    with pytest.raises(LocalProtocolError, match=match):
        w.querier.submit_query(**args)  # type: ignore[arg-type]
