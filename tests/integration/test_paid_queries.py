"""Paid queries across five ``fi-peer run`` daemons (separate processes) on anvil.

anvil runs from node_modules on a free loopback port; the escrow and registry
are deployed; every daemon gets a ``[chain]`` table (deployment file, its own
dev account's key in a 0600 file, a price per share). Two peers query; every
query is escrowed before its inputs leave, the queriers settle in batches,
the members withdraw (auto_withdraw), and the money adds up to the wei: each
peer withdrew exactly what it was credited for the shares it delivered, and
whatever the escrow still holds is exactly what no member delivered.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fi_peer.chain.anvil import AnvilProcess, dev_accounts
from fi_peer.chain.client import ChainClient, Deployment
from tests.integration.support import paid_network, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRICE = 10**15
QUERY_TIMEOUT_S = 8.0
INPUTS_PER_QUERIER = 3


@pytest.fixture(scope="module")
def network(
    tmp_path_factory: pytest.TempPathFactory,
    owner_models: list[Path],
    local_network: Any,
    anvil: AnvilProcess,
    deployment: Deployment,
) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("paid")
    deployment_file = folder / "deployment.json"
    deployment.save(deployment_file)
    PaidNetwork = paid_network(
        local_network,
        anvil.rpc_url,
        deployment_file,
        PRICE,
        settle_every_queries=INPUTS_PER_QUERIER,
        settle_every_s=60.0,  # the batch comes from the count, not the clock
        claim_every_s=1.0,
        settle_window_s=3600,
    )
    net = PaidNetwork(folder / "net", transport="libp2p", announce_interval_ms=500,
                      offer_window_ms=1000)
    try:
        net.prepare(owner_models[:5])
        net.start_all()
        net.wait_ready(timeout=120)
        net.wait_connected(timeout=60)
        yield net
    finally:
        net.stop_all()


def _chain(network: Any, peer: Any) -> dict[str, Any]:
    status = network.status(peer)
    assert status is not None
    chain: dict[str, Any] = status["chain"]
    return chain


def _escrow_eth_balance(anvil: AnvilProcess, deployment: Deployment) -> int:
    async def read() -> int:
        client = ChainClient.connect(anvil.rpc_url, dev_accounts()[9].key, deployment)
        try:
            return await client.eth_balance(deployment.escrow)
        finally:
            await client.aclose()

    return asyncio.run(read())


def test_paid_queries_are_escrowed_settled_and_withdrawn_to_the_wei(
    network: Any, samples: dict[str, Any], anvil: AnvilProcess, deployment: Deployment
) -> None:
    accounts = dev_accounts()
    address_of = {p.peer_id: accounts[1 + p.index].address for p in network.peers}
    queriers = (network.peers[0], network.peers[3])
    results: list[dict[str, Any]] = []
    for querier in queriers:
        answer = querier.client().post(
            "/v1/query",
            {
                "input": samples["inputs"][:INPUTS_PER_QUERIER],
                "k": 4,
                "timeout_s": QUERY_TIMEOUT_S,
                "max_price_wei": PRICE,
            },
            timeout=QUERY_TIMEOUT_S + 10,
        )
        for r in answer["results"]:
            assert r["ok"], r["reason"]
            pay = r["payment"]
            assert pay["querier"] == address_of[querier.peer_id]
            assert pay["price_wei"] == PRICE and pay["escrow_wei"] == 4 * PRICE
            assert set(pay["delivered"]) <= set(pay["committee"])
            assert len(pay["delivered"]) >= 3  # at least the majority threshold of 4
            results.append(r)
    escrowed = sum(r["payment"]["escrow_wei"] for r in results)
    credit: Counter[str] = Counter()
    for r in results:
        for member in r["payment"]["delivered"]:
            credit[member] += PRICE
    held = escrowed - sum(credit.values())
    assert len(credit) >= 4 and held >= 0

    # the queriers settle in one batch each (every INPUTS_PER_QUERIER queries) ...
    for querier in queriers:
        wait_until(
            lambda q=querier: _chain(network, q)["metrics"].get("settle.queries", 0)
            == INPUTS_PER_QUERIER,
            timeout=20,
            what=f"{querier.name} settled",
        )
        metrics = _chain(network, querier)["metrics"]
        assert metrics["settle.batches"] == 1 and metrics.get("settle.failed", 0) == 0
    # ... and every member withdraws exactly what it was credited
    for peer in network.peers:
        expected = credit[address_of[peer.peer_id]]
        wait_until(
            lambda p=peer, e=expected: _chain(network, p)["metrics"].get("withdrawn_wei", 0) == e,
            timeout=20,
            what=f"{peer.name} withdrew {expected}",
        )
    assert sum(credit.values()) + held == escrowed
    assert _escrow_eth_balance(anvil, deployment) == held


def test_no_daemon_logged_a_traceback_and_all_paid_on_chain(network: Any) -> None:
    for log in sorted(network.logs.glob("*.log")):
        text = log.read_text()
        assert "Traceback" not in text, f"{log.name}:\n{text[-3000:]}"
        assert "paying on chain" in text
