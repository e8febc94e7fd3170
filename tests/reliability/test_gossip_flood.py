"""A peer flooding gossip over libp2p: validated and rate limited BEFORE relay.

Topology (real libp2p hosts in this process, one trio thread)::

    M (attacker) --- A (querier) --- B, C (members)

M is connected to A only; B and C hear M only through what A relays. M
floods the peers topic with authentic Announces signed by its own key (they
pass every check except the relay rate) and with junk (which no validator
passes). A relays at most its per-originator allowance (burst + rate x
time) and no junk at all, so B sees a bounded trickle of M's messages, and
an honest query A asks of B and C in the middle of the flood is answered,
with the exact sum, long before its deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import pytest
import trio

from fi_peer.agent import Agent, relay_check
from fi_peer.identity import Identity
from fi_peer.protocol import fixedpoint
from fi_peer.protocol.envelope import seal
from fi_peer.protocol.peer import CoreConfig, PeerCore
from fi_peer.protocol.querier import QuerierConfig
from network.base import Subscription, Transport
from tests.support_agents import DIM, N_CLASSES, ToyModel, meet, start_agent, toy_card

libp2p = pytest.importorskip("network.libp2p")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FLOOD = 2000  # authentic announcements from M
JUNK = 250  # and junk
X = np.arange(DIM, dtype=np.float32)
# Relay allowance per originator smaller than the default (50/s, burst 200), so that
# the bound stays far below the flood however slowly this shared machine runs it.
GOSSIP = libp2p.GossipSettings(
    heartbeat_interval=1, heartbeat_initial_delay=0.05, relay_rate=10.0, relay_burst=50
)


@dataclass
class FloodNet:
    a: Agent
    members: list[Agent]
    attacker: Identity
    m: object  # the attacker's Libp2pTransport


async def _until(check: object, what: str, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        result = check() if callable(check) else check
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def flood_net() -> AsyncIterator[FloodNet]:
    config = CoreConfig(
        net="flood",
        announce_interval_ms=3_600_000,  # no heartbeats: announcements are the test's
        querier=QuerierConfig(offer_window_ms=1000),
    )
    agents: list[Agent] = []

    def transport(identity: Identity) -> Transport:
        return libp2p.Libp2pTransport(
            bytes(identity.signing_key), gossip=GOSSIP, gossip_validator=relay_check
        )

    for i in range(3):
        agents.append(
            await start_agent(f"flood-honest-{i}", toy_card(), ToyModel(i), config, transport)
        )
    attacker = Identity.from_seed(b"flood-attacker")
    m = libp2p.Libp2pTransport(bytes(attacker.signing_key), gossip=GOSSIP)
    await m.start()
    a, members = agents[0], agents[1:]
    try:
        for member in members:  # a star around A: B and C hear M only through A
            await member.transport.connect(a.transport.addresses()[0])
        await m.connect(a.transport.addresses()[0])
        topic = a.core.peers_topic
        await m.subscribe(topic)

        async def meshed() -> bool:
            known, _ = await a.transport.gossip_view(topic)  # type: ignore[attr-defined]
            return {m.local_id, *(x.peer_id for x in members)} <= known

        await _until(meshed, "A to see everyone's subscriptions")
        await meet(agents, timeout_s=10)
        yield FloodNet(a, members, attacker, m)
    finally:
        await asyncio.gather(m.aclose(), *(agent.aclose() for agent in agents))


async def _raw_flood(node: object, topic: str, items: list[bytes]) -> None:
    """Publish ``items`` from ``node``'s pubsub (trio side), waiting only while a peer's
    outbound queue is full (GossipSub would drop the overflow)."""
    pubsub = node._pubsub  # type: ignore[attr-defined]
    for data in items:
        while any(len(q) >= 24 for q in pubsub.peer_queues.values()):  # noqa: ASYNC110
            await trio.sleep(0.001)
        await pubsub.publish(topic, data)


async def _count_from(sub: Subscription, sender: bytes, seen: list[int]) -> None:
    """Count the messages on ``sub`` whose envelope names ``sender``."""
    async for data in sub:
        if sender in data[:64]:
            seen[0] += 1


async def test_a_gossip_flood_is_not_relayed_and_does_not_delay_an_honest_query(
    flood_net: FloodNet,
) -> None:
    net = flood_net
    a, (b, c) = net.a, net.members
    topic = a.core.peers_topic
    # B's view of M's gossip: a second subscription on B's transport (every
    # subscription gets every message), counting envelopes that name M
    probe = await b.transport.subscribe(topic)
    at_b = [0]
    counter = asyncio.create_task(_count_from(probe, net.attacker.public_key, at_b))
    m_core = PeerCore(net.attacker, toy_card(), config=CoreConfig(net="flood"))
    announce = m_core.announcement()

    def judged_by_a() -> int:
        m = a.metrics
        return sum(v for k, v in m.items() if k == "accepted.announce" or k.startswith("rejected."))

    before = judged_by_a()

    rng = np.random.default_rng(3)
    items: list[bytes] = []
    for i in range(FLOOD):
        items.append(seal(net.attacker, announce, int(time.time() * 1000)))
        if i % (FLOOD // JUNK) == 0:
            items.append(rng.bytes(200))

    started = time.monotonic()
    # M floods through its pubsub directly, as fast as A takes it (our own transport's
    # publisher would pace it politely)
    m = net.m
    flooding = m._thread.call(asyncio.get_running_loop(), _raw_flood, m._node, topic, items)  # type: ignore[attr-defined]
    # the honest query, asked while M floods
    await _until(lambda: a.transport.stats["gossip_rate_limited"] > 0, "the flood to reach A")
    out = await a.query(X, rule="vote", k=2, timeout_s=8)
    await flooding
    # until A has judged every message of the flood (nothing is left in flight)
    await _until(lambda: judged_by_a() - before >= FLOOD + JUNK, "A to judge the whole flood", 120)
    elapsed = time.monotonic() - started
    # B's count is final once A relays nothing more: two heartbeats without change
    last, quiet = -1, time.monotonic()
    while time.monotonic() - quiet < 2.5:
        if at_b[0] != last:
            last, quiet = at_b[0], time.monotonic()
        await asyncio.sleep(0.1)
    counter.cancel()
    await probe.aclose()

    assert out.ok, out.reason
    assert out.elapsed_ms < 4000, out.elapsed_ms  # not held up past a fraction of 8 s
    expected = np.zeros(N_CLASSES, dtype=np.uint64)
    for model in (ToyModel(0), ToyModel(1), ToyModel(2)):
        row = model.contribution(X[None, :], "vote")[0]
        expected = fixedpoint.add(expected, fixedpoint.encode(row))
    assert out.total is not None and np.array_equal(out.total, fixedpoint.decode(expected))
    assert sorted(out.contributors) == sorted([b.peer_id, c.peer_id])

    # what A let through to B: at most its per-originator allowance, and no junk
    allowance = GOSSIP.relay_burst + GOSSIP.relay_rate * elapsed
    relayed = at_b[0]
    print(f"\nflood: {FLOOD} + {JUNK} junk in {elapsed:.1f} s; B got {relayed} of M's; "
          f"A: {dict(a.transport.stats)}")  # fmt: skip
    assert relayed <= allowance, (relayed, allowance)
    assert relayed < FLOOD // 4
    assert b.metrics.get("rejected.malformed", 0) == 0  # junk is never relayed
    stats_a = a.transport.stats
    # every message of M's was either relayed to B or held back, counted (junk
    # past the allowance counts as rate limited: the cheap check comes first)
    held_back = stats_a["gossip_invalid"] + stats_a["gossip_rate_limited"]
    assert held_back == FLOOD + JUNK - relayed, (held_back, relayed)
    assert stats_a["gossip_invalid"] >= 1
    # and A itself still judged every message (the flood is counted, not lost)
    assert a.metrics.get("rejected.malformed", 0) >= JUNK
    assert a.metrics.get("internal_error", 0) == 0
