"""Membership from signed announcements (membership.py), alone and in a SansIoNet."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest

from fi_peer.errors import UnexpectedMessage
from fi_peer.identity import Identity
from fi_peer.protocol.envelope import seal
from fi_peer.protocol.membership import Membership
from fi_peer.protocol.messages import Announce, ModelCard
from fi_peer.protocol.peer import PeerCore
from tests.unit.sansio_net import SansIoNet, card

T0 = 1_000_000
CARD = ModelCard(task="toy", n_classes=3, input_dim=4, arch="fn", model_hash=b"\x00" * 32,
                 rules=("soft",))


def announce(seq: int, **changes: object) -> Announce:
    base = Announce(seq=seq, addresses=(), box_key=b"k" * 32, eth_address="", card=CARD,
                    price_wei=0, capacity=4)
    return dataclasses.replace(base, **changes)


def model(x: np.ndarray, rule: str) -> np.ndarray:
    return np.array([float(x.sum()), 1.0, 0.0])


# -- the table on its own ----------------------------------------------------------------


def test_new_newer_equal_older() -> None:
    m = Membership("me")
    assert m.on_announce("a", announce(5), T0) is True
    info = m.get("a")
    assert info is not None and (info.announce.seq, info.last_seen_ms) == (5, T0)
    # equal seq: nothing changes, not even the last-seen time
    assert m.on_announce("a", announce(5, price_wei=9), T0 + 100) is False
    info = m.get("a")
    assert info is not None and (info.announce.price_wei, info.last_seen_ms) == (0, T0)
    # older seq: rejected, nothing rolled back
    with pytest.raises(UnexpectedMessage):
        m.on_announce("a", announce(4, price_wei=9), T0 + 200)
    info = m.get("a")
    assert info is not None and (info.announce.seq, info.announce.price_wei) == (5, 0)
    # newer seq: replaces and refreshes
    assert m.on_announce("a", announce(6, price_wei=9), T0 + 300) is True
    info = m.get("a")
    assert info is not None and (info.announce.seq, info.announce.price_wei) == (6, 9)
    assert info.last_seen_ms == T0 + 300


def test_own_announcements_are_ignored() -> None:
    m = Membership("me")
    assert m.on_announce("me", announce(1), T0) is False
    assert len(m) == 0 and "me" not in m


def test_expiry_boundary() -> None:
    m = Membership("me", interval_ms=1000, missed_beats=3)
    assert m.expiry_ms == 3000
    m.on_announce("a", announce(1), T0)
    m.on_announce("b", announce(1), T0 + 500)
    assert m.expire(T0 + 3000) == []  # exactly at the horizon: kept
    assert m.expire(T0 + 3001) == ["a"]
    assert "a" not in m and "b" in m
    assert m.expire(T0 + 3501) == ["b"]
    assert len(m) == 0
    # a forgotten peer comes back with its next announcement, whatever its seq
    assert m.on_announce("a", announce(1), T0 + 4000) is True


def test_peers_are_sorted_by_id() -> None:
    m = Membership("me")
    for pid in ("c", "a", "b"):
        m.on_announce(pid, announce(1), T0)
    assert [p.peer_id for p in m.peers()] == ["a", "b", "c"]


@pytest.mark.parametrize(("interval", "beats"), [(0, 3), (-1, 3), (1000, 0)])
def test_bad_config(interval: int, beats: int) -> None:
    with pytest.raises(ValueError):
        Membership("me", interval_ms=interval, missed_beats=beats)


# -- in a network -----------------------------------------------------------------------------


def make_net(n: int) -> tuple[SansIoNet, list[PeerCore]]:
    net = SansIoNet(now_ms=T0)
    cores = [net.add(f"peer{i}", model) for i in range(n)]
    net.run()
    return net, cores


def known(core: PeerCore) -> set[str]:
    return {p.peer_id for p in core.membership.peers()}


def test_membership_converges() -> None:
    net, cores = make_net(5)
    ids = {c.peer_id for c in cores}
    for core in cores:
        assert known(core) == ids - {core.peer_id}
        assert core.metrics["accepted.announce"] == 4
    net.advance(10_000)  # five more heartbeats each
    for core in cores:
        assert known(core) == ids - {core.peer_id}
        info = core.membership.get(next(iter(ids - {core.peer_id})))
        assert info is not None and info.announce.seq == 6 and info.last_seen_ms == T0 + 10_000
        assert core.metrics["membership.expired"] == 0
        assert sum(v for k, v in core.metrics.items() if k.startswith("rejected.")) == 0


def test_announcement_carries_the_card_and_keys() -> None:
    _net, (a, b) = make_net(2)
    info = b.membership.get(a.peer_id)
    assert info is not None
    assert info.announce.card == card()
    assert info.announce.box_key == a.identity.box_public_key
    assert info.announce.capacity == a.config.responder.capacity


def test_silent_peer_expires_and_comes_back() -> None:
    net, cores = make_net(4)
    quiet, others = cores[0], cores[1:]
    net.drop = lambda src, dst, data: src == quiet.peer_id
    # last heard at T0; expiry = 3 beats of 2 s; checked at each 2 s heartbeat
    net.advance(6_000)  # horizon == T0: still there
    assert all(quiet.peer_id in c.membership for c in others)
    net.advance(2_000)  # horizon T0 + 2000 > T0: gone
    for core in others:
        assert quiet.peer_id not in core.membership
        assert core.metrics["membership.expired"] == 1
        assert len(core.membership) == 2
    assert len(quiet.membership) == 3  # it still hears everyone
    net.drop = lambda src, dst, data: False
    net.advance(2_000)  # its next heartbeat re-announces it
    for core in others:
        assert quiet.peer_id in core.membership
        assert core.metrics["membership.expired"] == 1


def test_replayed_and_rolled_back_announcements() -> None:
    net, (a, b) = make_net(2)
    captured: list[bytes] = []

    def spy(src: str, dst: str, data: bytes) -> bool:
        if src == a.peer_id and msgpack.unpackb(data, raw=False)[1] == "announce":
            captured.append(data)
        return False

    net.drop = spy
    net.advance(4_000)  # a announces seq 2, then 3
    assert len(captured) == 2
    info = b.membership.get(a.peer_id)
    assert info is not None and info.announce.seq == 3
    # replay of a genuine announcement: caught by the nonce check
    assert net.deliver(b.peer_id, captured[0], topic=b.peers_topic) == []
    assert b.metrics["rejected.replayed"] == 1
    # a fresh envelope with an old seq (a's own key): cannot roll its details back
    a_identity = Identity.from_seed(b"peer0")
    old = dataclasses.replace(a.announcement(), seq=1, price_wei=999)
    assert net.deliver(b.peer_id, seal(a_identity, old, net.now_ms), topic=b.peers_topic) == []
    assert b.metrics["rejected.unexpected"] == 1
    info = b.membership.get(a.peer_id)
    assert info is not None and (info.announce.seq, info.announce.price_wei) == (3, 0)
    # a newer one from a's key does update
    new = dataclasses.replace(a.announcement(), seq=50, price_wei=7)
    assert net.deliver(b.peer_id, seal(a_identity, new, net.now_ms), topic=b.peers_topic) == []
    info = b.membership.get(a.peer_id)
    assert info is not None and (info.announce.seq, info.announce.price_wei) == (50, 7)


def test_announcement_sent_directly_is_rejected() -> None:
    net, (_a, b) = make_net(2)
    stranger = Identity.from_seed(b"stranger")
    data = seal(stranger, announce(1), net.now_ms)
    assert net.deliver(b.peer_id, data) == []  # no topic: direct channel
    assert b.metrics["rejected.unexpected"] == 1
    assert stranger.peer_id not in b.membership
    data = seal(stranger, announce(2), net.now_ms)
    assert net.deliver(b.peer_id, data, topic=b.peers_topic) == []
    assert stranger.peer_id in b.membership


def test_forged_announcement_is_not_recorded() -> None:
    net, (_a, b) = make_net(2)
    mallory = Identity.from_seed(b"mallory")
    victim = Identity.from_seed(b"victim")
    data = seal(mallory, announce(1), net.now_ms)
    fields = msgpack.unpackb(data, raw=False)
    fields[2] = victim.public_key  # claim to be the victim
    forged = msgpack.packb(fields, use_bin_type=True)
    assert net.deliver(b.peer_id, forged, topic=b.peers_topic) == []
    assert b.metrics["rejected.bad_signature"] == 1
    assert victim.peer_id not in b.membership and mallory.peer_id not in b.membership
