"""The asyncio agent over the in-memory transport, with deterministic toy models.

Synchronisation is by events and timeouts only: ``wait_for_peers`` for
membership, awaiting the query for results, and one extra query as a
barrier after hostile input (the agent handles messages in order).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import numpy as np
import numpy.typing as npt
import pytest

from fi_peer.agent import Agent, LedgerGuard
from fi_peer.errors import LocalProtocolError
from fi_peer.identity import Identity
from fi_peer.privacy.budget import BudgetLedger, BudgetLimits
from fi_peer.protocol.envelope import seal
from fi_peer.protocol.messages import Accept, Member, ModelCard, Offer, QueryRequest, Share
from fi_peer.protocol.peer import CoreConfig, PeerCore
from fi_peer.protocol.querier import QuerierConfig
from network.memory import MemoryHub

N_CLASSES = 3
DIM = 4


class ToyModel:
    """Member i votes for class i % 3; ``broken`` raises like a failing model."""

    def __init__(self, index: int, broken: bool = False) -> None:
        self.index = index
        self.broken = broken
        self.calls = 0

    def contribution(self, X: npt.NDArray[np.float32], rule: str) -> npt.NDArray[np.float64]:
        self.calls += 1
        if self.broken:
            raise RuntimeError("model exploded")
        return np.tile(np.eye(N_CLASSES)[self.index % N_CLASSES], (len(X), 1))

    def vector_length(self, rule: str) -> int:
        return N_CLASSES


def toy_card() -> ModelCard:
    return ModelCard(
        task="toy",
        n_classes=N_CLASSES,
        input_dim=DIM,
        arch="toy",
        model_hash=b"\x01" * 32,
        rules=("vote",),
    )


CONFIG = CoreConfig(net="t", querier=QuerierConfig(offer_window_ms=300, min_committee=1))


async def start_agents(
    hub: MemoryHub, models: list[ToyModel], config: CoreConfig = CONFIG
) -> list[Agent]:
    agents = []
    for i, model in enumerate(models):
        identity = Identity.from_seed(f"agent-{i}".encode())
        core = PeerCore(identity, toy_card(), config=config)
        agent = Agent(core, hub.transport(identity.peer_id), model)
        await agent.start()
        agents.append(agent)
    for agent in agents:
        agent.announce()
    for agent in agents:
        assert await agent.wait_for_peers(len(agents) - 1, timeout_s=5)
    return agents


@pytest.fixture
async def five() -> AsyncIterator[tuple[MemoryHub, list[Agent], list[ToyModel]]]:
    hub = MemoryHub(seed=3)
    models = [ToyModel(i) for i in range(5)]
    agents = await start_agents(hub, models)
    yield hub, agents, models
    for agent in agents:
        await agent.aclose()


async def test_query_sums_every_contribution(five) -> None:
    _, agents, _ = five
    outcome = await agents[0].query(np.zeros(DIM), rule="vote", k=4, timeout_s=3)
    assert outcome.ok, outcome.reason
    # members 1..4 vote 1,2,0,1 and the querier itself votes 0
    assert outcome.total is not None
    assert outcome.total.tolist() == [2.0, 2.0, 1.0]
    assert len(outcome.contributors) == 4
    assert agents[0].peer_id not in outcome.contributors


async def test_concurrent_queries_from_every_peer_all_end(five) -> None:
    _, agents, _ = five
    outcomes = await asyncio.gather(
        *(
            a.query(np.full(DIM, i, dtype=np.float32), rule="vote", k=4)
            for i, a in enumerate(agents * 4)
        )
    )
    assert [o.ok for o in outcomes] == [True] * 20
    assert all(o.total is not None and o.total.sum() == 5.0 for o in outcomes)
    receipts = sum(len(a.core.responder.receipts) for a in agents)
    assert receipts == 20 * 4


async def test_failing_member_model_declines_and_query_still_answers() -> None:
    hub = MemoryHub(seed=4)
    # k = 4, t = 3: secure aggregation lets t - 2 = 1 member drop after the relay
    models = [ToyModel(0), ToyModel(1), ToyModel(2), ToyModel(3), ToyModel(4, broken=True)]
    agents = await start_agents(hub, models)
    try:
        outcome = await agents[0].query(np.zeros(DIM), rule="vote", k=4, timeout_s=3)
        assert outcome.ok
        assert len(outcome.contributors) == 3  # the broken member declined
        assert outcome.total is not None and outcome.total.sum() == 4.0
        assert agents[4].metrics["evaluation.failed"] == 1
    finally:
        for agent in agents:
            await agent.aclose()


async def test_lost_network_fails_cleanly_within_deadline() -> None:
    hub = MemoryHub(seed=5)
    agents = await start_agents(hub, [ToyModel(i) for i in range(3)])
    try:
        hub.set_loss(1.0)
        outcome = await agents[0].query(np.zeros(DIM), rule="vote", k=2, timeout_s=1)
        assert not outcome.ok
        assert outcome.reason.startswith("too_few_offers")
    finally:
        for agent in agents:
            await agent.aclose()


def _hostile_inputs(victim: Identity, attacker: Identity, now_ms: int) -> list[bytes]:
    qid = b"\x07" * 16
    offer = Offer(query_id=qid, price_wei=0, box_key=b"\x02" * 32, expected_latency_ms=1)
    good = seal(attacker, offer, now_ms)
    fields = msgpack.unpackb(good)
    tampered = fields.copy()
    tampered[5] = tampered[5][:-1] + bytes([tampered[5][-1] ^ 1])
    wrong_signer = fields.copy()
    wrong_signer[2] = victim.public_key
    accept = Accept(
        query_id=qid,
        committee=(Member(peer_id=victim.peer_id, box_key=victim.box_public_key),),
        threshold=1,
        price_wei=0,
        answer_deadline_ms=now_ms + 1000,
        escrow_ref=b"",
        noise_sigma=0.0,
        sealed_input=b"\x00" * 64,
    )
    share = Share(query_id=qid, vector=b"\x00" * 24, commitment=b"")
    request = QueryRequest(
        query_id=qid,
        task="toy",
        n_classes=3,
        input_dim=DIM,
        rule="vote",
        vector_len=3,
        k=1,
        max_price_wei=0,
        deadline_ms=now_ms + 1000,
        reply_key=b"\x03" * 32,
    )
    return [
        os.urandom(200),
        b"",
        msgpack.packb(tampered),
        msgpack.packb(wrong_signer),
        seal(attacker, offer, now_ms - 60_000),  # stale
        seal(attacker, offer, now_ms + 60_000),  # from the future
        good,
        good,  # replay
        seal(attacker, accept, now_ms),  # unsolicited accept
        seal(attacker, share, now_ms),  # share for no query
        seal(attacker, request, now_ms),  # gossip kind on the direct channel
        b"\x00" * (600 * 1024),  # over the global cap
        msgpack.packb([1, "offer", attacker.public_key, now_ms, b"n" * 16, b"b" * 2048, b"s" * 64]),
    ]


async def test_agent_survives_hostile_direct_messages(five) -> None:
    hub, agents, _ = five
    victim = agents[1]
    attacker_id = Identity.from_seed(b"mallory")
    attacker = hub.transport(attacker_id.peer_id)
    await attacker.start()
    try:
        for data in _hostile_inputs(victim.core.identity, attacker_id, victim.now_ms()):
            await attacker.send(victim.peer_id, data)
        await hub.drained()
        # The victim still serves and still queries.
        as_member = await agents[0].query(np.zeros(DIM), rule="vote", k=4, timeout_s=3)
        as_querier = await victim.query(np.zeros(DIM), rule="vote", k=4, timeout_s=3)
        assert as_member.ok and as_querier.ok
        assert victim.peer_id in as_member.contributors
        m = victim.metrics
        rejected = {k: v for k, v in m.items() if k.startswith("rejected.")}
        assert sum(rejected.values()) == 13, rejected
        assert m["rejected.malformed"] >= 2
        assert m["rejected.bad_signature"] == 2
        assert m["rejected.stale"] == 2
        assert m["rejected.replayed"] == 1
        # the well-formed offer, accept and share match no query; a gossip kind came direct
        assert m["rejected.unexpected"] == 4
        assert m["rejected.oversized"] == 2  # global cap and the offer's own cap
        assert m.get("internal_error", 0) == 0
    finally:
        await attacker.aclose()


async def test_close_fails_pending_queries_and_is_idempotent() -> None:
    hub = MemoryHub(seed=6)
    agents = await start_agents(hub, [ToyModel(i) for i in range(3)])
    hub.set_loss(1.0)
    pending = asyncio.ensure_future(agents[0].query(np.zeros(DIM), rule="vote", k=2, timeout_s=30))
    await asyncio.sleep(0)  # let the query submit
    for agent in agents:
        await agent.aclose()
        await agent.aclose()
    outcome = await asyncio.wait_for(pending, 5)
    assert not outcome.ok and outcome.reason == "closed"


# -- privacy: DP noise and the owners' budget ledgers ------------------------------------------


async def start_private_agents(
    hub: MemoryHub, n: int, tmp_path: Path, limits: BudgetLimits
) -> tuple[list[Agent], list[BudgetLedger]]:
    agents, ledgers = [], []
    for i in range(n):
        identity = Identity.from_seed(f"private-{i}".encode())
        ledger = BudgetLedger.open(tmp_path / f"budget-{i}.sqlite", limits)
        ledgers.append(ledger)
        core = PeerCore(identity, toy_card(), config=CONFIG, guard=LedgerGuard(ledger),
                        rng=np.random.default_rng(i))
        agent = Agent(core, hub.transport(identity.peer_id), ToyModel(i))
        await agent.start()
        agents.append(agent)
    for agent in agents:
        agent.announce()
    for agent in agents:
        assert await agent.wait_for_peers(n - 1, timeout_s=5)
    return agents, ledgers


async def test_dp_query_is_noisy_masked_and_charged_before_it_is_answered(tmp_path: Path) -> None:
    hub = MemoryHub(seed=7)
    limits = BudgetLimits(per_querier_epsilon=100.0, global_epsilon=100.0, delta=1e-5)
    agents, ledgers = await start_private_agents(hub, 5, tmp_path, limits)
    try:
        outcome = await agents[0].query(np.zeros(DIM), rule="vote", k=4, timeout_s=3,
                                        epsilon=4.0, delta=1e-5)
        assert outcome.ok, outcome.reason
        assert outcome.total is not None
        exact = np.array([2.0, 2.0, 1.0])  # as in test_query_sums_every_contribution
        assert not np.array_equal(outcome.total, exact)  # noise was added ...
        sigma = await Agent.noise_sigma("vote", 4.0, 1e-5)
        assert np.all(np.abs(outcome.total - exact) < 6 * sigma)  # ... at its scale
        querier = agents[0].peer_id
        for agent, ledger in zip(agents[1:], ledgers[1:], strict=True):
            assert ledger.charged(querier, outcome.query_id)
            assert 0 < ledger.spent(querier, time.time()) <= 4.0 + 1e-6
            assert agent.metrics["accepted.unmask"] == 1
        assert ledgers[0].spent(None, time.time()) == 0  # the querier pays no privacy
    finally:
        for agent in agents:
            await agent.aclose()
        for ledger in ledgers:
            ledger.close()


async def test_members_refuse_once_their_budget_for_a_querier_is_spent(tmp_path: Path) -> None:
    hub = MemoryHub(seed=8)
    # one answer at epsilon 4 fits a per-querier limit of 5, a second does not
    limits = BudgetLimits(per_querier_epsilon=5.0, global_epsilon=100.0, delta=1e-5)
    agents, ledgers = await start_private_agents(hub, 4, tmp_path, limits)
    try:
        first = await agents[0].query(np.zeros(DIM), rule="vote", k=3, timeout_s=2, epsilon=4.0)
        assert first.ok, first.reason
        second = await agents[0].query(np.zeros(DIM), rule="vote", k=3, timeout_s=2, epsilon=4.0)
        assert not second.ok and second.reason.startswith("too_few_offers")
        assert agents[0].metrics["declined.querier_budget_exhausted"] == 3
        # another querier still gets answers: the limit is per querier
        other = await agents[1].query(np.zeros(DIM), rule="vote", k=2, timeout_s=2, epsilon=4.0)
        assert other.ok, other.reason
        assert all(led.spent(agents[0].peer_id, time.time()) <= 5.0 for led in ledgers)
    finally:
        for agent in agents:
            await agent.aclose()
        for ledger in ledgers:
            ledger.close()


async def test_a_failing_ledger_means_no_answer(tmp_path: Path) -> None:
    hub = MemoryHub(seed=9)
    limits = BudgetLimits(per_querier_epsilon=100.0, global_epsilon=100.0, delta=1e-5)
    agents, ledgers = await start_private_agents(hub, 4, tmp_path, limits)
    try:
        ledgers[2].close()  # every check and charge of member 2 now fails
        outcome = await agents[0].query(np.zeros(DIM), rule="vote", k=2, timeout_s=2, epsilon=4.0)
        assert outcome.ok and agents[2].peer_id not in outcome.contributors
        assert agents[0].metrics["declined.ledger_error"] == 1
        assert agents[2].metrics.get("accepted.accept", 0) == 0
    finally:
        for agent in agents:
            await agent.aclose()
        for ledger in ledgers:
            ledger.close()


async def test_unbounded_rules_cannot_be_asked_under_dp(five) -> None:
    _, agents, _ = five
    with pytest.raises(LocalProtocolError, match="unbounded"):
        await agents[0].query(np.zeros(DIM), rule="gated", k=2, epsilon=1.0)
