"""The nonce/gas manager under concurrent asyncio use, on both chains."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from fi_peer.chain.anvil import free_port
from fi_peer.chain.client import ChainClient, Deployment, QueryStatus
from fi_peer.chain.errors import ChainUnavailable, ContractRevert
from fi_peer.chain.terms import checksum
from tests.chain.helpers import Harness, qid


async def test_concurrent_sends_from_one_account_get_distinct_nonces(chain: Harness) -> None:
    q = chain.querier
    start = await chain.w3.eth.get_transaction_count(q.address)
    all_terms = [await chain.terms(qid(100 + i), k=1 + i % 5) for i in range(25)]
    results = await asyncio.gather(*(q.open_query(t) for t in all_terms))
    assert len({r.tx_hash for r in results}) == 25
    assert await chain.w3.eth.get_transaction_count(q.address) == start + 25
    statuses = await asyncio.gather(*(q.status(t) for t in all_terms))
    assert set(statuses) == {QueryStatus.OPEN}


async def test_concurrent_mix_with_reverts_leaves_no_nonce_gap(chain: Harness) -> None:
    q = chain.querier
    good = [await chain.terms(qid(200 + i)) for i in range(6)]
    await q.open_query(good[0])
    start = await chain.w3.eth.get_transaction_count(q.address)
    outcomes = await asyncio.gather(
        *(q.open_query(t) for t in good),  # good[0] reverts: QueryExists
        q.withdraw(),  # reverts: NothingToWithdraw
        return_exceptions=True,
    )
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert sorted(e.name for e in errors if isinstance(e, ContractRevert)) == [
        "NothingToWithdraw",
        "QueryExists",
    ]
    assert len(errors) == 2
    assert await chain.w3.eth.get_transaction_count(q.address) == start + 5
    await q.open_query(await chain.terms(qid(300)))  # and the next send still works


async def test_a_nonce_used_elsewhere_is_recovered(chain: Harness) -> None:
    q = chain.querier
    await q.open_query(await chain.terms(qid(1)))  # caches the next nonce
    twin = ChainClient(chain.w3, q.account, chain.deployment)  # same key, another cache
    await twin.open_query(await chain.terms(qid(2)))  # uses the nonce q has cached
    result = await q.open_query(await chain.terms(qid(3)))  # nonce too low -> re-read, retry
    assert result.event("QueryOpened").args["queryId"] == qid(3)


async def test_wrong_chain_is_refused(chain: Harness) -> None:
    await chain.querier.check_chain()
    other = dataclasses.replace(chain.deployment, chain_id=chain.deployment.chain_id + 1)
    with pytest.raises(ChainUnavailable, match="chain"):
        await ChainClient(chain.w3, chain.querier.account, other).check_chain()


async def test_an_unreachable_rpc_is_chain_unavailable() -> None:
    nowhere = "0x" + "11" * 20
    deployment = Deployment(
        chain_id=31337,
        escrow=checksum(nowhere),
        registry=checksum(nowhere),
        block=0,
        claim_grace_s=1,
        min_stake_wei=0,
        unbonding_s=1,
    )
    client = ChainClient.connect(
        f"http://127.0.0.1:{free_port()}",
        b"\x01" * 32,
        deployment,
        request_timeout_s=2,
        retry=False,
    )
    async with client:
        with pytest.raises(ChainUnavailable):
            await client.balance()
        with pytest.raises(ChainUnavailable):
            await client.withdraw()
