"""Audit queries (fi_peer.protocol.audit): commitments bind, openings verify, limits hold."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fi_peer.protocol import fixedpoint
from fi_peer.protocol.audit import (
    AuditBook,
    OpeningDesk,
    Sealed,
    commit,
    openings_sum_to,
    verify_opening,
)
from fi_peer.protocol.envelope import seal
from fi_peer.protocol.messages import Opening, QueryRequest
from tests.unit.test_protocol_flow import TIMEOUT, Tap, World, X, done, model_for
from tests.unit.test_protocol_private import MemoryGuard, body, guarded_world

QID = b"q" * 16
MEMBER = "ab" * 32
VEC = fixedpoint.to_bytes(fixedpoint.encode(np.array([0.5, -1.25, 3.0])))
NONCE = bytes(range(32))


def argmax(sums: np.ndarray) -> np.ndarray:
    return np.argmax(sums, axis=1).astype(np.int64)


# -- commitments ----------------------------------------------------------------------------


def test_commitment_binds_the_vector_query_member_and_nonce() -> None:
    c = commit(QID, MEMBER, VEC, NONCE)
    assert len(c) == 32 and commit(QID, MEMBER, VEC, NONCE) == c
    assert verify_opening(c, QID, MEMBER, VEC, NONCE)
    other = fixedpoint.to_bytes(fixedpoint.encode(np.array([0.5, -1.25, 3.0 + 2**-24])))
    # A member cannot open to another vector (one fixed-point step apart), nor move its
    # commitment to another query or member, nor change the nonce.
    assert not verify_opening(c, QID, MEMBER, other, NONCE)
    assert not verify_opening(c, b"r" * 16, MEMBER, VEC, NONCE)
    assert not verify_opening(c, QID, "cd" * 32, VEC, NONCE)
    assert not verify_opening(c, QID, MEMBER, VEC, bytes(32))
    assert not verify_opening(c, QID, MEMBER, VEC, NONCE[:31])
    # Hiding: the same vector under two nonces gives unrelated commitments.
    assert commit(QID, MEMBER, VEC, bytes(32)) != c
    # Length-prefixed fields: moving bytes between fields changes the commitment.
    assert commit(QID, MEMBER, VEC[:8], NONCE) != commit(QID, MEMBER, VEC[:16], NONCE)
    with pytest.raises(ValueError):
        commit(QID, MEMBER, VEC, b"short")


def test_openings_sum_to_the_aggregate() -> None:
    a = fixedpoint.encode(np.array([1.0, -2.0]))
    b = fixedpoint.encode(np.array([-0.5, 4.0]))
    total = fixedpoint.add(a, b)
    assert openings_sum_to([fixedpoint.to_bytes(a), fixedpoint.to_bytes(b)], total)
    assert not openings_sum_to([fixedpoint.to_bytes(a)], total)
    assert not openings_sum_to([], total)


# -- the member's opening limit --------------------------------------------------------------


def sealed(i: int) -> Sealed:
    request = QueryRequest(
        query_id=i.to_bytes(16, "big"),
        task="toy",
        n_classes=3,
        input_dim=4,
        rule="soft",
        vector_len=3,
        k=3,
        max_price_wei=0,
        deadline_ms=10,
        reply_key=b"r" * 32,
    )
    return Sealed(VEC, NONCE, commit(request.query_id, MEMBER, VEC, NONCE), request, 1.0)


def test_opening_desk_opens_at_most_the_configured_fraction_per_querier() -> None:
    desk = OpeningDesk(max_fraction=0.25)
    for i in range(8):
        desk.record("querier", i.to_bytes(16, "big"), sealed(i))
    desk.record("other", (0).to_bytes(16, "big"), sealed(0))
    assert desk.allowance("querier") == 2
    first = desk.open("querier", (0).to_bytes(16, "big"))
    assert isinstance(first, Sealed) and first.vector == VEC
    assert desk.open("querier", (0).to_bytes(16, "big")) == "already_opened"
    assert isinstance(desk.open("querier", (1).to_bytes(16, "big")), Sealed)
    assert desk.open("querier", (2).to_bytes(16, "big")) == "open_limit"  # 3 of 8 > 25 %
    assert desk.open("querier", (99).to_bytes(16, "big")) == "unknown_query"
    # Another querier's allowance is its own: 1 answer, 25 % of it rounds down to 0.
    assert desk.open("other", (0).to_bytes(16, "big")) == "open_limit"
    # More answers raise the allowance again (3 of 12 = 25 %).
    for i in range(8, 12):
        desk.record("querier", i.to_bytes(16, "big"), sealed(i))
    assert isinstance(desk.open("querier", (2).to_bytes(16, "big")), Sealed)
    assert desk.opened["querier"] == 3 and desk.answered["querier"] == 12
    # Never two commitments to one query.
    with pytest.raises(ValueError):
        desk.record("querier", (0).to_bytes(16, "big"), sealed(0))
    assert desk.committed("querier", (0).to_bytes(16, "big"))
    with pytest.raises(ValueError):
        OpeningDesk(max_fraction=1.5)


# -- through PeerCores -----------------------------------------------------------------------


def audit_world(fraction: float = 1.0, sigma: float = 0.0) -> tuple[World, list[MemoryGuard]]:
    w, guards, _ = guarded_world(4)
    w.querier.audit_book = AuditBook(argmax, n_classes=3)
    for m in w.members:
        m.responder.openings.max_fraction = fraction
    return w, guards


def audit_query(w: World, label: int, *, epsilon: float = 0.0, sigma: float = 0.0) -> bytes:
    """Submit one query, marked as an audit before anything is sent, and let it finish."""
    qid, effects = w.querier.submit_query(
        X,
        rule="soft",
        vector_len=3,
        k=3,
        max_price_wei=0,
        timeout_ms=TIMEOUT,
        now_ms=w.net.now_ms,
        epsilon=epsilon,
        delta=1e-5 if epsilon else 0.0,
        noise_sigma=sigma,
    )
    assert w.querier.audit_book is not None
    w.querier.audit_book.mark(qid, label)
    w.net._feed(w.querier.peer_id, effects)
    w.net.run()
    return qid


def request_openings(w: World, qid: bytes) -> None:
    """The querier asks the members of ``qid`` for openings; the network runs dry."""
    w.net._feed(w.querier.peer_id, w.querier.request_openings(qid, w.net.now_ms))
    w.net.run()


def test_audit_openings_verify_sum_to_the_answer_and_are_charged() -> None:
    w, guards = audit_world()
    tap = Tap()
    w.net.drop = tap
    qid = audit_query(w, label=0, epsilon=1.0, sigma=2.0)
    out = done(w, qid)
    assert out.ok and len(out.contributors) == 3
    book = w.querier.audit_book
    assert book is not None
    # Every Share carried a 32-byte commitment (unpaid: no EIP-712 signature).
    assert set(book.audits[qid].commitments) == set(out.contributors)
    # Nothing was opened during the query: open requests only come after it.
    assert tap.of("open_request") == [] and tap.of("opening") == []
    request_openings(w, qid)
    assert len(tap.of("open_request")) == 3
    assert w.querier.metrics["audit.opened"] == 3
    opened = book.audits[qid].opened
    assert set(opened) == set(out.contributors)
    # The openings are what was summed: with the querier's own (local) vector, their
    # exact sum is the noisy answer.
    assert out.total is not None
    local = model_for(100)(X, "soft")
    np.testing.assert_allclose(sum(opened.values()) + local, out.total, rtol=0, atol=1e-6)
    # Each opening was charged like an answer, with the member's own noise share.
    t = 3 // 2 + 1
    for member, guard in zip(w.members, guards, strict=True):
        if member.peer_id in out.contributors:
            sigmas = [s for _, q, s in guard.charges if q == qid]
            assert len(sigmas) == 2 and math.isclose(sigmas[1], sigmas[0] / math.sqrt(t))
    # A second request for the same audit is refused: opened once.
    request_openings(w, qid)
    refusals = [body(d, Opening) for d in tap.of("opening")][3:]
    assert [r.refused for r in refusals] == ["already_opened"] * 3


def test_members_refuse_openings_beyond_their_limit() -> None:
    w, guards = audit_world(fraction=0.25)
    tap = Tap()
    w.net.drop = tap
    qid = audit_query(w, label=0)
    assert done(w, qid).ok
    request_openings(w, qid)
    # One answer each: 25 % of 1 rounds down to no opening at all.
    assert {body(d, Opening).refused for d in tap.of("opening")} == {"open_limit"}
    book = w.querier.audit_book
    assert book is not None and book.audits[qid].opened == {}
    assert sum(book.refusals.values()) == 3
    assert all(len(g.charges) <= 1 for g in guards)  # a refusal is not charged


def test_a_member_cannot_open_to_another_vector() -> None:
    w, _ = audit_world()
    qid = audit_query(w, label=0)
    out = done(w, qid)
    cheat = next(m for m in w.members if m.peer_id in out.contributors)
    tap = Tap(hold=lambda src, dst, kind: src == cheat.peer_id and kind == "opening")
    w.net.drop = tap
    request_openings(w, qid)
    (honest,) = [body(d, Opening) for *_, d in tap.held]
    words = fixedpoint.from_bytes(honest.vector)
    words[0] += np.uint64(1 << 24)  # claim one more unit of evidence for class 0
    forged = Opening(query_id=qid, vector=fixedpoint.to_bytes(words), nonce=honest.nonce)
    w.net.deliver(w.querier.peer_id, seal(cheat.identity, forged, w.net.now_ms))
    book = w.querier.audit_book
    assert book is not None
    assert book.bad[cheat.peer_id] == 1 and cheat.peer_id not in book.audits[qid].opened
    members = sorted(out.contributors)
    scores = book.scores(members)
    assert scores[members.index(cheat.peer_id)] == 0.0
    # Its honest opening, arriving late, no longer counts either: one opening per audit.
    w.net.deliver(w.querier.peer_id, tap.held[0][3])
    assert cheat.peer_id in book.audits[qid].opened  # verified, but the member stays marked
    assert book.scores(members)[members.index(cheat.peer_id)] == 0.0


def test_audit_book_scores_accuracy_of_each_members_own_answers() -> None:
    book = AuditBook(argmax, n_classes=3)
    rng = np.random.default_rng(0)
    for i in range(40):
        qid = i.to_bytes(16, "big")
        label = i % 3
        book.mark(qid, label)
        vectors = {
            "good": np.eye(3)[label],  # always right
            "lazy": np.eye(3)[rng.integers(3)],  # a random guess
            "weak": np.eye(3)[label if i % 2 else (label + 1) % 3],  # right half the time
        }
        for name, v in vectors.items():
            nonce = bytes([i]) * 32
            data = fixedpoint.to_bytes(fixedpoint.encode(v))
            book.on_share(qid, name, commit(qid, name, data, nonce))
            assert book.on_opening(name, Opening(query_id=qid, vector=data, nonce=nonce))
    good, lazy, weak = book.scores(["good", "lazy", "weak"])
    assert book.opened["lazy"] == 40 and book.hits["lazy"] < 18  # not above chance (1/3)
    assert lazy == 0.0
    # Shrunk towards the mean accuracy with 10 pseudo-audits: (40 + 10 m) / 50.
    mean = (40 + book.hits["lazy"] + 20) / 120
    assert good == pytest.approx((40 + 10 * mean) / 50)
    assert weak == pytest.approx((20 + 10 * mean) / 50) and good > weak > 0
    assert book.scores(["never"]).tolist() == [0.0]


def test_openings_only_after_the_query_is_over() -> None:
    w, _ = audit_world()
    # Hold back the querier's Results: the members still hold their sessions open.
    tap = Tap(hold=lambda src, dst, kind: kind == "result")
    w.net.drop = tap
    qid = audit_query(w, label=0)
    assert done(w, qid).ok
    request_openings(w, qid)
    assert {body(d, Opening).refused for d in tap.of("opening")} == {"not_over"}
    # Once the Result is in, the same request is answered.
    tap.hold = lambda src, dst, kind: False
    for _, dst, _, data in tap.held:
        w.net.deliver(dst, data)
    w.net.run()
    request_openings(w, qid)
    book = w.querier.audit_book
    assert book is not None and len(book.audits[qid].opened) == 3
    assert sum(book.refusals.values()) == 3  # the early refusals stay on record
