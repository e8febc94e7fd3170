"""Per-sender rate limits in process: the token buckets, and the agent's inbound
limit over the memory transport (the same code path for every transport).

Deterministic: the agents' clock stands still, so no token is ever refilled.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import msgpack
import numpy as np
import numpy.typing as npt
import pytest

from fi_peer.agent import Agent
from fi_peer.identity import Identity
from fi_peer.protocol import codec
from fi_peer.protocol.envelope import seal, signing_bytes
from fi_peer.protocol.messages import ModelCard, Result
from fi_peer.protocol.peer import CoreConfig, PeerCore
from network.memory import MemoryHub
from network.ratelimit import RateLimiter

NOW_S = 1_800_000_000.0
BURST = 10


class ToyModel:
    def __init__(self, index: int) -> None:
        self.index = index

    def contribution(self, X: npt.NDArray[np.float32], rule: str) -> npt.NDArray[np.float64]:
        return np.full((len(X), 3), float(self.index + 1))

    def vector_length(self, rule: str) -> int:
        return 3


def card() -> ModelCard:
    return ModelCard(
        task="digits", n_classes=3, input_dim=4, arch="toy", model_hash=b"\x01" * 32,
        rules=("vote",),
    )  # fmt: skip


def test_token_buckets_allow_burst_then_rate_per_key() -> None:
    limit = RateLimiter(rate=10.0, burst=3, max_keys=2)
    assert [limit.allow("m", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limit.allow("b", 0.0)  # another key has its own bucket
    assert not limit.allow("m", 0.05)  # half a token
    assert limit.allow("m", 0.1) and not limit.allow("m", 0.1)
    assert limit.allow("m", 10.0) and limit.ready("m", 10.0)  # refilled, capped at burst
    limit.allow("c", 10.0)  # a third key evicts the least recently used one ("b")
    assert len(limit) == 2
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1)


def test_gossip_settings_reject_nonsense_limits() -> None:
    libp2p = pytest.importorskip("network.libp2p")
    with pytest.raises(ValueError):
        libp2p.GossipSettings(relay_rate=0)
    with pytest.raises(ValueError):
        libp2p.GossipSettings(link_burst=0)


def forged(signer: Identity, claimed: Identity, msg: object, now_ms: int) -> bytes:
    """An envelope that claims ``claimed`` as sender, signed by ``signer``."""
    body = codec.pack(msg)
    nonce = b"\x42" * 16
    sig = signer.sign(signing_bytes(msg.KIND, now_ms, nonce, body))  # type: ignore[attr-defined]
    kind = msg.KIND  # type: ignore[attr-defined]
    return msgpack.packb([1, kind, claimed.public_key, now_ms, nonce, body, sig], use_bin_type=True)


@pytest.fixture
async def victim() -> AsyncIterator[tuple[Agent, MemoryHub]]:
    hub = MemoryHub(seed=5)
    identity = Identity.from_seed(b"limits-victim")
    agent = Agent(
        PeerCore(identity, card(), config=CoreConfig(net="limits")),
        hub.transport(identity.peer_id),
        ToyModel(0),
        clock=lambda: NOW_S,
        inbound_rate=1.0,
        inbound_burst=BURST,
    )
    await agent.start()
    try:
        yield agent, hub
    finally:
        await agent.aclose()


def rejected(agent: Agent) -> Counter[str]:
    return Counter({k: v for k, v in agent.metrics.items() if k.startswith("rejected.") and v})


async def test_a_flooding_sender_is_rate_limited_before_verification(
    victim: tuple[Agent, MemoryHub],
) -> None:
    agent, hub = victim
    now_ms = int(NOW_S * 1000)
    flooder = Identity.from_seed(b"limits-flooder")
    honest = Identity.from_seed(b"limits-honest")
    f = hub.transport(flooder.peer_id)
    h = hub.transport(honest.peer_id)
    await f.start()
    await h.start()
    try:
        # 30 authentic (signed) direct messages for no query: BURST are judged
        # ("unexpected"), the rest dropped unjudged as rate limited
        for i in range(30):
            result = Result(query_id=bytes([i]) * 16, ok=False, reason="x")
            await f.send(agent.peer_id, seal(flooder, result, now_ms))
        # 30 gossip envelopes that CLAIM the honest peer but are signed by the
        # flooder: rejected as forged, and they spend none of the honest peer's tokens
        announce = PeerCore(honest, card(), config=CoreConfig(net="limits")).announcement()
        for _ in range(30):
            await f.publish(agent.core.peers_topic, forged(flooder, honest, announce, now_ms))
        # the honest peer's own announcement still gets through
        await h.publish(agent.core.peers_topic, seal(honest, announce, now_ms))
        assert await agent.wait_for_peers(1, timeout_s=5)
        async with asyncio.timeout(5):  # every message judged (or dropped) and counted
            while sum(rejected(agent).values()) < 60:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
    finally:
        await f.aclose()
        await h.aclose()
    assert rejected(agent) == Counter(
        {"rejected.unexpected": BURST, "rejected.rate_limited": 30 - BURST,
         "rejected.bad_signature": 30}
    )  # fmt: skip
    assert agent.metrics["accepted.announce"] == 1
    assert agent.core.membership.get(honest.peer_id) is not None
