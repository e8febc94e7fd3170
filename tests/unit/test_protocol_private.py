"""The private query flow through PeerCores in a SansIoNet (DESIGN.md steps 4-7).

Secure aggregation rounds on the wire (Offer with a mask key, Accept with the
committee's keys, KeyShares, KeyRelay, masked Share, Unmask, Reveal), drops at
every round, the cheating querier, the member's refusals, and the privacy
guard: budget checked at offer time, charged before the share leaves, noise
added before masking. Deterministic: fake clock, FIFO delivery, seeded noise.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import pytest

from fi_peer.errors import LocalProtocolError
from fi_peer.identity import Identity
from fi_peer.privacy import secagg, shamir
from fi_peer.privacy.secagg import CIPHERTEXT_LEN, TAG_LEN
from fi_peer.protocol import codec, fixedpoint
from fi_peer.protocol.envelope import seal
from fi_peer.protocol.messages import (
    Accept,
    Decline,
    KeyRelay,
    KeyShares,
    Member,
    Offer,
    QueryRequest,
    Result,
    Reveal,
    Share,
    Unmask,
)
from fi_peer.protocol.peer import CoreConfig, PeerCore
from fi_peer.protocol.querier import QuerierConfig
from fi_peer.protocol.responder import GRACE_MS, ResponderConfig
from tests.unit.sansio_net import SansIoNet
from tests.unit.test_protocol_flow import (
    MALLORY,
    T0,
    TIMEOUT,
    Tap,
    World,
    X,
    _signed_raw,
    done,
    ids,
    model_for,
    world,
)

KEYS_WINDOW = QuerierConfig().keys_window_ms
KEYS_GRACE = QuerierConfig().keys_grace_ms
UNMASK_WINDOW = QuerierConfig().unmask_window_ms
UNMASK_GRACE = QuerierConfig().unmask_grace_ms
# the keys timer: the window, at most half of what precedes the unmask reserve
KEYS_END = min(KEYS_WINDOW, (TIMEOUT - UNMASK_WINDOW) // 2)
QUERIER = Identity.from_seed(b"querier")


def body(data: bytes, cls: type[Any]) -> Any:
    return codec.unpack(cls, msgpack.unpackb(data, raw=False)[5])


def threshold(k: int) -> int:
    return k // 2 + 1


# -- the rounds on the wire ---------------------------------------------------------------------


def test_private_query_runs_every_round_and_sums_exactly() -> None:
    w = world(4)
    tap = Tap()
    w.net.drop = tap
    qid = w.submit(k=4)
    out = done(w, qid)
    assert out.ok and out.elapsed_ms == 0 and out.contributors == tuple(ids(*w.members))
    assert out.total is not None
    assert np.array_equal(out.total, w.expected(X, [w.querier.peer_id, *ids(*w.members)]))
    q = w.querier.peer_id
    request = body(tap.of("query_request")[0], QueryRequest)
    assert request.secagg
    offers = {m.peer_id: body(tap.of("offer", src=m.peer_id)[0], Offer) for m in w.members}
    assert all(len(o.mask_key) == 32 for o in offers.values())
    assert len({o.mask_key for o in offers.values()}) == 4  # fresh per member
    for member in w.members:
        p = member.peer_id
        accept = body(tap.of("accept", dst=p)[0], Accept)
        assert {m.peer_id: m.mask_key for m in accept.committee} == {
            pid: o.mask_key for pid, o in offers.items()
        }
        assert accept.threshold == 3
        (shares,) = [body(d, KeyShares) for d in tap.of("key_shares", src=p, dst=q)]
        assert len(shares.ciphertexts) == 3
        (relay,) = [body(d, KeyRelay) for d in tap.of("key_relay", dst=p)]
        assert relay.u1 == (0, 1, 2, 3) and len(relay.ciphertexts) == 3
        (share,) = [body(d, Share) for d in tap.of("share", src=p)]
        assert len(share.view_tags) == 3
        (unmask,) = [body(d, Unmask) for d in tap.of("unmask", dst=p)]
        assert unmask.survivors == (0, 1, 2, 3) and unmask.dropped == ()
        (reveal,) = [body(d, Reveal) for d in tap.of("reveal", src=p)]
        assert len(reveal.seed_shares) == 4 and reveal.pair_seeds == ()
        assert len(tap.of("receipt", dst=p)) == 1 and len(tap.of("result", dst=p)) == 1
        assert member.responder.sessions == {}
    # the key shares go out before the model answers, i.e. overlap it: each member's
    # KeyShares is on the wire before its Share, and no share precedes any relay
    kinds = [k for _, _, k, _ in tap.seen]
    assert max(i for i, k in enumerate(kinds) if k == "key_relay") < kinds.index("share")
    # what a member sent is not its vector
    model = w.models[w.members[0].peer_id]
    assert model is not None
    plain = fixedpoint.to_bytes(fixedpoint.encode(model(X, "soft")))
    assert body(tap.of("share", src=w.members[0].peer_id)[0], Share).vector != plain


@pytest.mark.parametrize("k", [3, 5, 8])
@pytest.mark.parametrize("kind", ["key_shares", "share", "reveal"])
def test_drops_at_each_round_keep_the_sum_exact(k: int, kind: str) -> None:
    t = threshold(k)
    for n_drop in range(0, k - t + 1):
        w = world(k)
        gone = {m.peer_id for m in w.members[:n_drop]}
        tap = Tap(hold=lambda src, dst, kd, gone=gone, kind=kind: src in gone and kd == kind)
        w.net.drop = tap
        qid = w.submit(k=k)
        w.net.advance(TIMEOUT + GRACE_MS)
        out = done(w, qid)
        if kind == "share" and n_drop > t - 2:  # members reveal seeds for <= t - 2 dropped
            assert not out.ok and out.reason == "too_many_dropped"
            assert out.elapsed_ms == TIMEOUT - UNMASK_WINDOW
            assert all(m.responder.sessions == {} for m in w.members)
            continue
        assert out.ok, (kind, n_drop, out.reason)
        kept = ids(*w.members) if kind == "reveal" else sorted(set(ids(*w.members)) - gone)
        assert list(out.contributors) == kept
        assert out.total is not None
        assert np.array_equal(out.total, w.expected(X, [w.querier.peer_id, *kept]))
        unmasks = [body(d, Unmask) for d in tap.of("unmask")]
        index = {m.peer_id: i for i, m in enumerate(body(tap.of("accept")[0], Accept).committee)}
        dropped = tuple(sorted(index[p] for p in gone)) if kind == "share" else ()
        assert all(u.dropped == dropped for u in unmasks)  # pair seeds with dropouts only
        # timing: a missing key share waits for the keys grace (t are in at once), a
        # missing masked share for the shares timer; the first t + 1 survivors (by
        # share arrival) are asked to reveal: one of them missing costs nothing,
        # two wait for the unmask grace, then the rest are asked
        first = [src for src, _, kd, _ in tap.seen if kd == "share"][: t + 1]
        expected_ms = {"key_shares": KEYS_GRACE, "share": TIMEOUT - UNMASK_WINDOW,
                       "reveal": UNMASK_GRACE if len(gone & set(first)) > 1 else 0}
        assert out.elapsed_ms == (expected_ms[kind] if n_drop else 0)
        if kind == "key_shares":  # left out of U1: told at once, nothing kept
            for m in w.members[:n_drop]:
                assert m.responder.sessions == {}
                results = [body(d, Result) for d in tap.of("result", dst=m.peer_id)]
                assert results[0].reason == "excluded"
        for m in w.members:
            assert m.responder.sessions == {}


@pytest.mark.parametrize(
    ("kind", "reason", "at_ms"),
    [
        ("key_shares", "too_few_key_shares_1_of_2", KEYS_END),
        ("share", "too_few_shares_1_of_2", TIMEOUT - UNMASK_WINDOW),
        ("reveal", "too_few_reveals_1_of_2", TIMEOUT),
    ],
)
def test_below_threshold_at_any_round_the_query_fails_cleanly(
    kind: str, reason: str, at_ms: int
) -> None:
    w = world(3)
    gone = {w.members[0].peer_id, w.members[1].peer_id}
    w.net.drop = Tap(hold=lambda src, dst, kd: src in gone and kd == kind)
    qid = w.submit(k=3)
    w.net.advance(at_ms - 1)
    assert qid not in w.net.done
    w.net.advance(1)
    out = done(w, qid)
    assert not out.ok and out.reason == reason and out.elapsed_ms == at_ms
    assert out.total is None and out.contributors == ()
    w.net.advance(TIMEOUT + GRACE_MS)
    assert all(m.responder.sessions == {} for m in w.members)
    assert w.querier.queries == {}


def test_a_dropped_member_and_a_silent_survivor_fail_the_query_cleanly() -> None:
    """Once a member dropped before its masked share, every survivor's pair seed
    with it is needed: one more survivor silent at the unmask fails the query."""
    w = world(5)
    dropped, silent = w.members[0].peer_id, w.members[1].peer_id
    held = {(dropped, "share"), (silent, "reveal")}
    w.net.drop = Tap(hold=lambda src, dst, kd: (src, kd) in held)
    qid = w.submit(k=5)
    w.net.advance(TIMEOUT + GRACE_MS)
    out = done(w, qid)
    assert not out.ok and out.reason == "too_few_reveals_3_of_3" and out.elapsed_ms == TIMEOUT
    assert all(m.responder.sessions == {} for m in w.members)


def test_late_reveals_are_counted_as_late_not_rejected() -> None:
    w = world(5)
    qid = w.submit(k=5)
    assert done(w, qid).ok
    m = w.querier.metrics
    # t + 1 = 4 of the 5 survivors are asked; t = 3 suffice
    assert sum(p.metrics["accepted.unmask"] for p in w.members) == 4
    assert m["accepted.reveal"] == 3 and m["late.reveal"] == 1
    assert not any(k.startswith("rejected.") for k in m)


def test_a_refusal_has_the_survivors_not_asked_yet_asked_at_once() -> None:
    w = world(5)
    tap = Tap(hold=lambda src, dst, kd: kd == "unmask")
    w.net.drop = tap
    qid = w.submit(k=5)
    start = w.net.now_ms
    asked = [dst for _, dst, _, _ in tap.held]
    assert len(asked) == 4  # t + 1
    (left,) = set(ids(*w.members)) - set(asked)
    # the first asked refuses (a Decline); the others' Unmasks stay held
    w.net.drop = Tap(hold=lambda src, dst, kd: kd == "unmask" and dst != left)
    refusal = Decline(query_id=qid, reason="refused_too_few_survivors")
    refuser = next(m for m in w.members if m.peer_id == asked[0])
    w.net.deliver(w.querier.peer_id, seal(refuser.identity, refusal, w.net.now_ms))
    w.net.run()
    assert w.net.now_ms == start  # no waiting: at once
    left_member = next(m for m in w.members if m.peer_id == left)
    assert left_member.metrics["accepted.unmask"] == 1
    for _src, dst, _kind, data in tap.held[1:]:  # the two other asked ones answer too
        w.net.deliver(dst, data)
    w.net.run()
    out = done(w, qid)
    assert out.ok and out.elapsed_ms < UNMASK_GRACE


def test_a_declining_member_after_its_key_shares_is_dropped_not_waited_for() -> None:
    w = world(4, models=[model_for(0), None, model_for(2), model_for(3)])
    out = done(w, w.submit(k=4))
    kept = ids(w.members[0], w.members[2], w.members[3])
    assert out.ok and list(out.contributors) == kept and out.elapsed_ms == 0
    assert out.total is not None
    assert np.array_equal(out.total, w.expected(X, [w.querier.peer_id, *kept]))


# -- the cheating querier --------------------------------------------------------------------


def test_querier_that_calls_a_member_dropped_after_its_share_learns_nothing_of_it() -> None:
    """The querier receives every masked share but sends Unmask requests that list
    member 0 as dropped. It gets every pair seed of member 0, never a share of its
    self-mask seed, so member 0's vector stays hidden. The honest requests that
    follow are refused: each member reveals once."""
    k = 5
    w = world(k)
    tap = Tap(hold=lambda src, dst, kd: kd == "unmask")
    w.net.drop = tap
    qid = w.submit(k=k)
    accept = body(tap.of("accept")[0], Accept)
    index = {m.peer_id: i for i, m in enumerate(accept.committee)}
    shares = {index[s]: body(d, Share) for s, _, kd, d in tap.seen if kd == "share"}
    assert sorted(shares) == list(range(k))
    victim = 0
    survivors = tuple(i for i in range(k) if i != victim)
    u1 = tuple(range(k))

    def tags_for(r: int) -> tuple[bytes, ...]:
        # the tags the survivors addressed to r, from their (genuine) shares
        return tuple(
            shares[s].view_tags[[u for u in u1 if u != s].index(r)] for s in survivors if s != r
        )

    now = w.net.now_ms
    for r in survivors:
        lie = Unmask(query_id=qid, survivors=survivors, dropped=(victim,), view_tags=tags_for(r))
        w.net.deliver(accept.committee[r].peer_id, seal(QUERIER, lie, now))
    w.net.run()
    reveals = {index[s]: body(d, Reveal) for s, _, kd, d in tap.seen if kd == "reveal"}
    assert sorted(reveals) == list(survivors)
    # every survivor revealed its pair seed with the victim, and seed shares of survivors only
    assert all(len(r.pair_seeds) == 1 and len(r.seed_shares) == k - 1 for r in reveals.values())
    peeled = fixedpoint.from_bytes(shares[victim].vector)
    for v in survivors:
        seed = reveals[v].pair_seeds[0]
        peeled = np.subtract(peeled, secagg.pair_mask(seed, 3, victim, v), dtype=np.uint64)
    # those were the victim's real pairwise masks: only its self mask is left on
    victim_peer = next(m for m in w.members if m.peer_id == accept.committee[victim].peer_id)
    masking = next(iter(victim_peer.responder.sessions.values())).masking
    assert masking is not None
    self_masked = np.subtract(peeled, secagg.self_mask(masking._seed, 3), dtype=np.uint64)
    model = w.models[accept.committee[victim].peer_id]
    assert model is not None
    truth = fixedpoint.encode(model(X, "soft"))
    assert not np.any(peeled == truth)
    assert np.all(np.abs(fixedpoint.decode(peeled) - model(X, "soft")) > 1e3)
    # (the member's noise is in ``truth``'s place: within its scale of the model output)
    assert np.all(np.abs(fixedpoint.decode(self_masked) - model(X, "soft")) < 50)
    # the honest Unmasks (held so far) now arrive: every member refuses a second reveal
    for _src, dst, _kind, data in tap.held:
        w.net.deliver(dst, data)
    w.net.drop = lambda src, dst, data: False
    w.net.run()
    refused = sum(m.metrics["responder.refused.already_revealed"] for m in w.members)
    assert refused == k - 1  # the victim itself was never asked before: it answers
    # the querier (honest code, fooled state) cannot finish with refusals: it fails
    w.net.advance(TIMEOUT)
    out = done(w, qid)
    assert not out.ok and out.reason.startswith("reveals_refused")


def test_unmask_listing_one_member_as_both_kinds_cannot_even_be_decoded() -> None:
    w = world(3)
    tap = Tap(hold=lambda src, dst, kd: kd == "unmask")
    w.net.drop = tap
    qid = w.submit(k=3)
    a = w.members[0]
    wire = [qid, [0, 1, 2], [1], [b"t" * TAG_LEN, b"t" * TAG_LEN]]
    data = _signed_raw(QUERIER, "unmask", msgpack.packb(wire, use_bin_type=True), w.net.now_ms)
    assert w.net.deliver(a.peer_id, data) == []
    assert a.metrics["rejected.malformed"] == 1
    with pytest.raises(ValueError):
        Unmask(query_id=qid, survivors=(0, 1, 2), dropped=(1,), view_tags=(b"t" * 16,) * 2)


def test_member_declines_an_unmask_with_too_few_survivors_and_reveals_nothing() -> None:
    w = world(5)
    tap = Tap(hold=lambda src, dst, kd: kd == "unmask")
    w.net.drop = tap
    qid = w.submit(k=5)
    accept = body(tap.of("accept")[0], Accept)
    a = w.members[0]
    me = [m.peer_id for m in accept.committee].index(a.peer_id)
    other = (me + 1) % 5
    honest = body(next(d for _, dst, _, d in tap.held if dst == a.peer_id), Unmask)
    tag = honest.view_tags[[s for s in honest.survivors if s != me].index(other)]
    survivors = tuple(sorted((me, other)))
    dropped = tuple(i for i in range(5) if i not in survivors)
    lie = Unmask(query_id=qid, survivors=survivors, dropped=dropped, view_tags=(tag,))
    w.net.deliver(a.peer_id, seal(QUERIER, lie, w.net.now_ms))
    w.net.run()
    assert a.metrics["responder.refused.too_few_survivors"] == 1
    assert tap.of("reveal", src=a.peer_id) == []
    (decline,) = [body(d, Decline) for d in tap.of("decline", src=a.peer_id)]
    assert decline.reason == "refused_too_few_survivors"
    assert w.querier.metrics["declined.refused_too_few_survivors"] == 1


# -- the member's checks on Accept and relay ------------------------------------------------------


class WeakThreshold(QuerierConfig):
    def threshold(self, committee_size: int) -> int:
        return committee_size // 2  # not a strict majority


def test_members_refuse_a_threshold_that_is_not_a_majority() -> None:
    w = world(4, querier_config=WeakThreshold())
    out = done(w, w.submit(k=4))
    assert not out.ok and out.reason.startswith("declined_")
    assert all(m.metrics["responder.declined.threshold_not_majority"] == 1 for m in w.members)


def _tampered_accept(w: World, tap: Tap, victim: PeerCore, change: str) -> bytes:
    genuine = body(next(d for _, dst, _, d in tap.held if dst == victim.peer_id), Accept)
    committee = list(genuine.committee)
    j = next(i for i, m in enumerate(committee) if m.peer_id != victim.peer_id)
    if change == "box_key":
        committee[j] = dataclasses.replace(committee[j], box_key=MALLORY.box_public_key)
    else:
        committee[j] = dataclasses.replace(committee[j], mask_key=secagg.mask_nonce())
    return seal(QUERIER, dataclasses.replace(genuine, committee=tuple(committee)), w.net.now_ms)


def test_member_refuses_a_committee_key_that_differs_from_the_announced_one() -> None:
    w = world(3)
    tap = Tap(hold=lambda src, dst, kd: kd == "accept")
    w.net.drop = tap
    w.submit(k=3)
    a = w.members[0]
    w.net.deliver(a.peer_id, _tampered_accept(w, tap, a, "box_key"))
    w.net.run()
    assert a.metrics["responder.declined.box_key_mismatch"] == 1
    assert a.responder.sessions == {}


def test_member_catches_a_swapped_mask_nonce_at_the_relay() -> None:
    w = world(4)  # t = 3: the member that declines after the relay is t - 2 = 1 dropped
    tap = Tap(hold=lambda src, dst, kd: kd == "accept")
    w.net.drop = tap
    qid = w.submit(k=4)
    a = w.members[0]
    tampered = _tampered_accept(w, tap, a, "mask_key")
    w.net.drop = Tap()
    w.net.deliver(a.peer_id, tampered)
    for _src, dst, _kind, data in tap.held:
        if dst != a.peer_id:
            w.net.deliver(dst, data)
    w.net.run()
    assert a.metrics["responder.declined.mask_nonce_mismatch"] == 1
    w.net.advance(TIMEOUT)
    out = done(w, qid)  # the three others still make t = 3
    assert out.ok and a.peer_id not in out.contributors


def test_plaintext_requests_are_refused_unless_the_owner_opts_in() -> None:
    net = SansIoNet(now_ms=T0)
    q = net.add("querier", model_for(100), CoreConfig(querier=QuerierConfig(
        secure_aggregation=False)))
    for i in range(2):
        net.add(f"member{i}", model_for(i))  # default: allow_plaintext=False
    net.run()
    qid, effects = q.submit_query(X, rule="soft", vector_len=3, k=2, max_price_wei=0,
                                  timeout_ms=TIMEOUT, now_ms=net.now_ms)
    net._feed(q.peer_id, effects)
    net.advance(TIMEOUT)
    assert net.done[qid].reason == "too_few_offers_0"


# -- privacy guard: budget and noise ----------------------------------------------------------


@dataclass
class MemoryGuard:
    """An in-memory PrivacyGuard: a budget of ``limit`` answers, ``required`` noise."""

    name: str
    events: list[tuple[str, str]]
    limit: int = 100
    required: float | None = 0.0
    charge_refusal: str | None = None
    charges: list[tuple[str, bytes, float]] = field(default_factory=list)

    def required_sigma(self, request: QueryRequest) -> float | None:
        return self.required if request.epsilon > 0 else 0.0

    def check(self, querier: str, request: QueryRequest, sigma: float, now_ms: int) -> str | None:
        return "querier_budget_exhausted" if len(self.charges) >= self.limit else None

    def charge(self, querier: str, request: QueryRequest, sigma: float, now_ms: int) -> str | None:
        if self.charge_refusal is not None:
            return self.charge_refusal
        self.charges.append((querier, request.query_id, sigma))
        self.events.append(("charge", self.name))
        return None


def guarded_world(
    k: int, *, limits: list[int] | None = None, required: float = 0.0, plaintext: bool = False
) -> tuple[World, list[MemoryGuard], list[tuple[str, str]]]:
    events: list[tuple[str, str]] = []
    net = SansIoNet(now_ms=T0)
    qconf = CoreConfig(querier=QuerierConfig(secure_aggregation=not plaintext))
    querier = net.add("querier", model_for(100), qconf)
    members, guards = [], []
    for i in range(k):
        guard = MemoryGuard(f"member{i}", events, limit=limits[i] if limits else 100,
                            required=required)
        conf = CoreConfig(responder=ResponderConfig(allow_plaintext=plaintext))
        members.append(net.add(f"member{i}", model_for(i), conf, guard=guard,
                               rng=np.random.default_rng(i)))
        guards.append(guard)
    net.run()
    return World(net, querier, members, dict(net.models)), guards, events


def submit(w: World, *, k: int, epsilon: float = 0.0, sigma: float = 0.0) -> bytes:
    qid, effects = w.querier.submit_query(
        X, rule="soft", vector_len=3, k=k, max_price_wei=0, timeout_ms=TIMEOUT,
        now_ms=w.net.now_ms, epsilon=epsilon, delta=1e-5 if epsilon else 0.0, noise_sigma=sigma,
    )
    w.net._feed(w.querier.peer_id, effects)
    w.net.run()
    return qid


def test_budget_is_checked_at_offer_time_and_refused_with_a_decline() -> None:
    w, guards, _ = guarded_world(4, limits=[100, 0, 100, 100])
    tap = Tap()
    w.net.drop = tap
    out = done(w, submit(w, k=3))
    broke = w.members[1].peer_id
    assert out.ok and broke not in out.contributors and len(out.contributors) == 3
    assert tap.of("offer", src=broke) == []
    (decline,) = [body(d, Decline) for d in tap.of("decline", src=broke)]
    assert decline.reason == "querier_budget_exhausted"
    assert w.querier.metrics["declined.querier_budget_exhausted"] == 1
    assert guards[1].charges == []
    assert [len(g.charges) for i, g in enumerate(guards) if i != 1] == [1, 1, 1]


def test_every_share_leaves_after_its_charge() -> None:
    w, guards, events = guarded_world(3)
    names = {m.peer_id: f"member{i}" for i, m in enumerate(w.members)}

    def record(src: str, dst: str, data: bytes) -> bool:
        if codec.unpack_raw(data, max_len=1 << 20)[1] == "share":
            events.append(("share", names[src]))
        return False

    w.net.drop = record
    out = done(w, submit(w, k=3))
    assert out.ok
    for name in names.values():
        assert events.index(("charge", name)) < events.index(("share", name))
    assert all(len(g.charges) == 1 for g in guards)


def test_a_refused_charge_means_no_share_and_a_decline() -> None:
    w, guards, _ = guarded_world(4)
    guards[2].charge_refusal = "global_budget_exhausted"
    tap = Tap()
    w.net.drop = tap
    qid = submit(w, k=4)
    w.net.advance(TIMEOUT)
    out = done(w, qid)
    refuser = w.members[2].peer_id
    assert tap.of("share", src=refuser) == []
    assert [body(d, Decline).reason for d in tap.of("decline", src=refuser)] == [
        "global_budget_exhausted"
    ]
    assert w.members[2].metrics["charge.refused"] == 1
    assert out.ok and refuser not in out.contributors and out.elapsed_ms == 0
    assert out.total is not None
    assert np.array_equal(out.total, w.expected(X, [w.querier.peer_id, *out.contributors]))


def test_noise_is_added_before_masking_at_the_agreed_scale_and_charged_as_such() -> None:
    sigma = 0.5
    w, guards, _ = guarded_world(4, required=sigma)
    totals = []
    for _ in range(40):
        out = done(w, submit(w, k=4, epsilon=1.0, sigma=sigma))
        assert out.ok and out.total is not None
        totals.append(out.total - w.expected(X, [w.querier.peer_id, *out.contributors]))
    noise = np.concatenate(totals)
    # 4 survivors of t = 3, each N(0, sigma^2 / 3): the sum has std sigma * sqrt(4/3)
    assert abs(noise.std() / (sigma * np.sqrt(4 / 3)) - 1) < 0.2
    assert abs(noise.mean()) < 0.2
    # each member paid for noise sigma on the sum (what the querier sees of it)
    assert all(g.charges and {c[2] for c in g.charges} == {sigma} for g in guards)


def test_plaintext_shares_are_charged_for_their_own_smaller_noise() -> None:
    w, guards, _ = guarded_world(3, required=0.6, plaintext=True)
    assert done(w, submit(w, k=3, epsilon=1.0, sigma=0.6)).ok
    t = threshold(3)
    assert all({c[2] for c in g.charges} == {0.6 / np.sqrt(t)} for g in guards)


def test_members_refuse_less_noise_than_their_policy_needs() -> None:
    w, guards, _ = guarded_world(3, required=1.0)
    tap = Tap()
    w.net.drop = tap
    out = done(w, submit(w, k=3, epsilon=1.0, sigma=0.5))
    assert not out.ok and out.reason.startswith("declined_")
    assert {body(d, Decline).reason for d in tap.of("decline")} == {"noise_too_low"}
    assert tap.of("share") == [] and all(g.charges == [] for g in guards)


def test_a_dp_query_without_noise_is_a_local_error() -> None:
    w = world(2)
    with pytest.raises(LocalProtocolError, match="noise"):
        w.querier.submit_query(X, rule="soft", vector_len=3, k=2, max_price_wei=0,
                               timeout_ms=TIMEOUT, now_ms=T0, epsilon=1.0, delta=1e-5)


# -- the new messages are validated like the others ------------------------------------------------

Q = b"q" * 16
CT = b"c" * CIPHERTEXT_LEN
TAG = b"t" * TAG_LEN
SH = b"\x00" * shamir.SHARE_LEN
KEY_SHARES = KeyShares(query_id=Q, ciphertexts=(CT, CT), commitment=b"m" * 32)
RELAY = KeyRelay(query_id=Q, u1=(0, 1, 2), ciphertexts=(CT, CT))
UNMASK = Unmask(query_id=Q, survivors=(0, 2), dropped=(1,), view_tags=(TAG,))
SEED = b"\x00" * secagg.SEED_LEN
REVEAL = Reveal(query_id=Q, seed_shares=(SH, SH), pair_seeds=(SEED,))
SHARE = Share(query_id=Q, vector=b"\x00" * 24, commitment=b"", view_tags=(TAG, TAG))
OFFER = Offer(query_id=Q, price_wei=0, box_key=b"k" * 32, expected_latency_ms=1,
              mask_key=b"m" * 32)
M1 = Member(peer_id="a" * 64, box_key=b"k" * 32, mask_key=b"m" * 32)
M2 = Member(peer_id="b" * 64, box_key=b"k" * 32, mask_key=b"n" * 32)
ACCEPT = Accept(query_id=Q, committee=(M1, M2), threshold=2, price_wei=0,
                answer_deadline_ms=1, escrow_ref=b"", noise_sigma=0.0, sealed_input=b"s")

INVALID: list[tuple[Any, str, Any]] = [
    (KEY_SHARES, "ciphertexts", (CT[:-1],)),
    (KEY_SHARES, "ciphertexts", (CT,) * 64),
    (KEY_SHARES, "commitment", b"m" * 31),
    (RELAY, "u1", (0, 2, 1)),
    (RELAY, "u1", (0, 0, 1)),
    (RELAY, "u1", (0, 1, 64)),
    (RELAY, "u1", ()),
    (RELAY, "ciphertexts", (CT,)),
    (RELAY, "u1", (0, -1, 2)),
    (UNMASK, "dropped", (0,)),
    (UNMASK, "survivors", ()),
    (UNMASK, "view_tags", ()),
    (UNMASK, "view_tags", (TAG[:-1],)),
    (UNMASK, "survivors", (2, 0)),
    (REVEAL, "seed_shares", ()),
    (REVEAL, "seed_shares", (SH[:-1],)),
    (REVEAL, "pair_seeds", (SEED,) * 63),
    (REVEAL, "pair_seeds", (SH,)),  # a share's length, not a seed's
    (SHARE, "view_tags", (TAG + b"x",)),
    (SHARE, "view_tags", (TAG,) * 64),
    (OFFER, "mask_key", b"m" * 31),
    (ACCEPT, "committee", (M1, dataclasses.replace(M2, mask_key=b""))),
    (M1, "mask_key", b"m" * 33),
    (RELAY, "u1", (True, 1, 2)),
]


@pytest.mark.parametrize(("base", "name", "value"), INVALID,
                         ids=[f"{type(c[0]).__name__}.{c[1]}-{i}" for i, c in enumerate(INVALID)])
def test_invalid_new_messages_can_neither_be_built_nor_decoded(
    base: Any, name: str, value: Any
) -> None:
    with pytest.raises((ValueError, TypeError)):
        dataclasses.replace(base, **{name: value})
    wire = codec.to_wire(base)
    wire[[f.name for f in dataclasses.fields(base)].index(name)] = codec.to_wire(value)
    from fi_peer.errors import MalformedMessage

    with pytest.raises(MalformedMessage):
        codec.unpack(type(base), msgpack.packb(wire, use_bin_type=True))


# -- every query ends exactly once, whatever secagg messages are lost ------------------------------


def test_random_losses_of_secagg_messages_end_every_query_exactly_once() -> None:
    rng = random.Random(5)
    net = SansIoNet(now_ms=T0)
    cores = [net.add(f"p{i}", model_for(i)) for i in range(7)]
    net.run()
    lossy = {"key_shares", "key_relay", "share", "unmask", "reveal"}

    def drop(src: str, dst: str, data: bytes) -> bool:
        return codec.unpack_raw(data, max_len=1 << 20)[1] in lossy and rng.random() < 0.08

    net.drop = drop
    submitted: dict[bytes, tuple[PeerCore, np.ndarray]] = {}
    for _ in range(40):
        core = rng.choice(cores)
        x = np.array([rng.randint(-8, 8) for _ in range(4)], dtype=np.float32)
        qid, effects = core.submit_query(x, rule="soft", vector_len=3, k=rng.randint(2, 6),
                                         max_price_wei=0, timeout_ms=rng.randint(2_500, 5_000),
                                         now_ms=net.now_ms)
        submitted[qid] = (core, x)
        net._feed(core.peer_id, effects)
        net.advance(rng.randint(0, 300))
    net.advance(5_000 + GRACE_MS + 1)
    assert Counter(o.query_id for o in net.outcomes) == Counter(set(submitted))
    n_ok = 0
    for outcome in net.outcomes:
        core, x = submitted[outcome.query_id]
        if outcome.ok:
            n_ok += 1
            expected = sum(net.models[p](x, "soft") for p in outcome.contributors)  # type: ignore[misc]
            expected = expected + net.models[core.peer_id](x, "soft")  # type: ignore[misc]
            assert outcome.total is not None and np.array_equal(outcome.total, expected)
        else:
            assert outcome.total is None and outcome.reason != "ok"
    assert 0 < n_ok < 40
    for core in cores:
        assert core.queries == {} and core.responder.sessions == {}
        assert core.metrics.get("internal_error", 0) == 0


def test_offers_with_keys_x25519_cannot_use_are_refused() -> None:
    w = world(2)
    tap = Tap(hold=lambda src, dst, kd: kd == "offer")
    w.net.drop = tap
    qid = w.submit(k=2)
    genuine = body(tap.held[0][3], Offer)
    ident = Identity.from_seed(b"member0")
    # (the mask nonce is not a key: any 32 bytes do; a bad one hurts only its sender)
    for bad in (dataclasses.replace(genuine, box_key=b"\x00" * 32),
                dataclasses.replace(genuine, box_key=(1).to_bytes(32, "little"))):
        w.net.deliver(w.querier.peer_id, seal(ident, bad, w.net.now_ms))
    assert w.querier.metrics["rejected.unexpected"] == 2
    for _src, dst, _kind, data in tap.held:
        w.net.deliver(dst, data)
    w.net.drop = lambda src, dst, data: False
    w.net.run()
    assert done(w, qid).ok
