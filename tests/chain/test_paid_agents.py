"""Paid queries end to end in one process: agents over the memory hub, the
chain client against the deployment (eth-tester, and anvil when integration
tests run). The escrow is opened before inputs leave, members check it,
receipts are kept, the querier settles in a batch, members withdraw, and the
money adds up to the wei."""

from __future__ import annotations

import asyncio

import numpy as np

from fi_peer.agent import Agent
from fi_peer.chain.client import ChainClient
from fi_peer.chain.store import ReceiptState, ReceiptStore
from fi_peer.identity import Identity
from fi_peer.protocol.peer import CoreConfig, PeerCore
from fi_peer.protocol.querier import QuerierConfig
from fi_peer.protocol.responder import ResponderConfig
from fi_peer.settlement import EthPayments, Settler
from network.memory import MemoryHub
from tests.chain.helpers import PRICE, Harness
from tests.support_agents import ToyModel, toy_card


async def _start(
    hub: MemoryHub, name: str, client: ChainClient, price: int, every: int
) -> tuple[Agent, Settler]:
    identity = Identity.from_seed(name.encode())
    pay = EthPayments(client.account, client.receipt_domain, settle_window_s=3600)
    config = CoreConfig(
        net="paid",
        querier=QuerierConfig(offer_window_ms=500, min_committee=2),
        responder=ResponderConfig(price_wei=price),
    )
    core = PeerCore(identity, toy_card(task="toy"), config=config, payments=pay)
    settler = Settler(client, ReceiptStore(":memory:", client.receipt_domain), every_queries=every)
    agent = Agent(
        core, hub.transport(identity.peer_id), ToyModel(len(name), one_hot=True), chain=settler
    )
    await agent.start()
    return agent, settler


async def test_paid_queries_are_escrowed_settled_in_a_batch_and_withdrawn(chain: Harness) -> None:
    hub = MemoryHub()
    querier, qsettler = await _start(hub, "querier", chain.querier, 0, every=2)
    members = [await _start(hub, f"m{i}", chain.members[i], PRICE, 100) for i in range(3)]
    agents = [querier] + [a for a, _ in members]
    try:
        for a in agents:
            a.announce()
        for a in agents:
            assert await a.wait_for_peers(3, timeout_s=5)
        outcomes = [
            await querier.query(np.ones(4), rule="vote", k=3, max_price_wei=PRICE, timeout_s=5)
            for _ in range(2)
        ]
        for out in outcomes:
            assert out.ok, out.reason
            assert out.escrow is not None and len(out.delivered) == 3
        for _ in range(100):  # the second outcome triggers the batch (a chain task)
            if qsettler.metrics["settle.queries"] == 2:
                break
            await asyncio.sleep(0.05)
        assert qsettler.metrics["settle.batches"] == 1 and qsettler.metrics["settle.queries"] == 2
        escrowed = sum(o.escrow.escrow_wei for o in outcomes if o.escrow)
        credited = 0
        for agent, settler in members:
            receipts = settler.store.receipts(state=ReceiptState.PENDING)
            assert len(receipts) == 2  # kept for a claim, should the querier not settle
            assert agent.metrics["escrow.verified"] == 2
            credit = await settler.client.balance()
            assert credit == 2 * PRICE
            before = await settler.client.eth_balance()
            assert await settler.withdraw() == credit
            assert await settler.client.balance() == 0
            assert await settler.client.eth_balance() > before
            credited += credit
        refunded = await chain.querier.balance()
        assert credited + refunded == escrowed
        # after the deadline the kept receipts turn out paid: nothing more to claim
        await chain.devchain.increase_time(3600 + 60)
        for _, settler in members:
            assert await settler.claim_due() == 0
            assert len(settler.store.receipts(state=ReceiptState.PAID)) == 2
            assert await settler.claim_due() == 0 and settler.metrics["claims"] == 0
    finally:
        for a in agents:
            await a.aclose()


async def test_members_claim_with_their_receipts_when_the_querier_does_not_settle(
    chain: Harness,
) -> None:
    hub = MemoryHub()
    querier, qsettler = await _start(hub, "querier", chain.querier, 0, every=100)
    members = [await _start(hub, f"m{i}", chain.members[i], PRICE, 100) for i in range(3)]
    agents = [querier] + [a for a, _ in members]
    try:
        for a in agents:
            a.announce()
        for a in agents:
            assert await a.wait_for_peers(3, timeout_s=5)
        out = await querier.query(np.ones(4), rule="vote", k=3, max_price_wei=PRICE, timeout_s=5)
        assert out.ok and out.escrow is not None
        await asyncio.sleep(0.1)  # the members' receipts are kept in chain tasks
        for _, settler in members:
            assert await settler.claim_due() == 0  # not before the deadline
        assert len(qsettler.pending) == 1  # the querier never settles
        await chain.devchain.increase_time(3600 + 60)
        for _, settler in members:
            assert await settler.claim_due() == 1
            assert settler.store.receipts(state=ReceiptState.CLAIMED)
        # the balance read before withdraw() is stale when a credit lands in between:
        # what counts is what the transaction moved (the Withdrawn event)
        _, settler = members[0]
        real_balance = settler.client.balance

        async def stale(account: str | None = None) -> int:
            return 1

        settler.client.balance = stale  # type: ignore[method-assign]
        try:
            assert await settler.withdraw() == PRICE
            assert settler.metrics["withdrawn_wei"] == PRICE
            assert await settler.withdraw() == 0  # NothingToWithdraw: not an error
            assert settler.metrics["withdrawn_wei"] == PRICE
        finally:
            settler.client.balance = real_balance  # type: ignore[method-assign]
        for _, settler in members[1:]:
            assert await settler.withdraw() == PRICE
    finally:
        for a in agents:
            await a.aclose()


class FakeClient:
    """Records settlements (no chain): for the batcher's timing."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def settle_batch(self, settlements: list[object]) -> None:
        self.batches.append(len(settlements))

    async def chain_time(self) -> int:
        return 10**9 - 1


def _terms(i: int, deadline: int = 10**9) -> object:
    from fi_peer.chain.terms import QueryTerms

    members = ["0x" + f"{j + 1:040x}" for j in range(3)]
    return QueryTerms.create(
        query_id=i.to_bytes(16, "big"), querier="0x" + "99" * 20, committee=members,
        price_wei=5, deadline=deadline,
    )


async def test_the_batcher_settles_every_n_queries_or_every_t_seconds() -> None:
    from fi_peer.chain.receipts import ReceiptDomain
    from fi_peer.chain.terms import checksum

    client = FakeClient()
    store = ReceiptStore(":memory:", ReceiptDomain(chain_id=1, escrow=checksum("0x" + "11" * 20)))
    settler = Settler(client, store, every_queries=3, every_s=0.2, claim_every_s=60)  # type: ignore[arg-type]
    for i in range(4):
        terms = _terms(i)
        await settler.add(terms, terms.committee[:2])  # type: ignore[attr-defined]
    assert client.batches == [3] and len(settler.pending) == 1
    runner = asyncio.create_task(settler.run())
    try:
        for _ in range(100):
            if client.batches == [3, 1]:
                break
            await asyncio.sleep(0.02)
        assert client.batches == [3, 1] and not settler.pending
    finally:
        runner.cancel()
    assert settler.metrics["settle.queries"] == 4 and settler.metrics["settle.batches"] == 2


async def test_the_batcher_leaves_queries_past_their_deadline_to_claims() -> None:
    from fi_peer.chain.receipts import ReceiptDomain
    from fi_peer.chain.terms import checksum

    client = FakeClient()
    store = ReceiptStore(":memory:", ReceiptDomain(chain_id=1, escrow=checksum("0x" + "11" * 20)))
    settler = Settler(client, store, every_queries=2)  # type: ignore[arg-type]
    late, fresh = _terms(1, deadline=10**9 - 1), _terms(2)
    await settler.add(late, ())  # type: ignore[arg-type]
    await settler.add(fresh, ())  # type: ignore[arg-type]
    assert client.batches == [1] and settler.metrics["settle.too_late"] == 1
