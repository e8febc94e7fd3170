"""Audit queries and the merit reward rule across four ``fi-peer run`` daemons on anvil.

Peer 0 queries with ``reward_rule = "merit"`` and ``publish_scores = true``;
peers 1-3 answer. Of its nine queries two are audits (``audit_labels``: on the
wire they are ordinary queries); after each audit's answer the daemon asks the
members to open their commitments, checks the openings and scores the members.
The two audit inputs are picked so that the members' own answers differ in
accuracy (the test runs the members' models itself, and asks without DP noise
so an opened vector is exactly the model's). The ninth query triggers the
settlement: each query is settled with ``settleWeighted`` by the merit weights,
and the test checks, to the wei, that what the chain paid is what those
weights give (fi_peer.incentives.rewards.settlement_amounts), that the weights
are the merit scores the querier's status shows, and that the scores it
published on chain are those scores.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from web3 import HTTPProvider, Web3

from fi_peer.chain.anvil import AnvilProcess, dev_accounts
from fi_peer.chain.artifacts import load_artifact
from fi_peer.chain.client import ESCROW, REGISTRY, Deployment
from fi_peer.chain.terms import MIN_SHARE_BPS
from fi_peer.incentives.rewards import settlement_amounts
from tests.integration.support import paid_network, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRICE = 10**15
RULE = "evidence"  # the daemons' configured rule (audits are decided with it)
TIMEOUT_S = 8.0


@pytest.fixture(scope="module")
def network(
    tmp_path_factory: pytest.TempPathFactory,
    owner_models: list[Path],
    local_network: Any,
    anvil: AnvilProcess,
    deployment: Deployment,
) -> Iterator[Any]:
    from fi_peer.config import load_config, write_config

    folder = tmp_path_factory.mktemp("audits")
    deployment_file = folder / "deployment.json"
    deployment.save(deployment_file)
    PaidNetwork = paid_network(
        local_network,
        anvil.rpc_url,
        deployment_file,
        PRICE,
        settle_every_queries=9,  # the ninth query settles all nine
        settle_every_s=600.0,
        claim_every_s=600.0,
        settle_window_s=3600,
    )
    net = PaidNetwork(
        folder / "net", transport="libp2p", announce_interval_ms=500, offer_window_ms=500
    )
    try:
        net.prepare(owner_models[:4])
        querier = net.peers[0].config
        config = load_config(querier)
        assert config.chain is not None
        chain = dataclasses.replace(config.chain, reward_rule="merit", publish_scores=True)
        write_config(querier, dataclasses.replace(config, chain=chain))
        net.start_all()
        net.wait_ready(timeout=120)
        net.wait_connected(timeout=60)
        yield net
    finally:
        net.stop_all()


def _audit_inputs(models: list[Path], samples: dict[str, Any]) -> list[int]:
    """Two sample indexes on which some member is right twice and another is not
    (so their audit hits differ)."""
    from fi_peer.models.aggregation import get_rule
    from fi_peer.models.runtime import ModelRuntime

    X = np.asarray(samples["inputs"], dtype=np.float32)
    y = np.asarray(samples["labels"])
    rule = get_rule(RULE)
    right = np.stack(
        [rule.decide_batch(ModelRuntime.load(m).contribution(X, RULE))[0] == y for m in models]
    )  # (members, samples)
    n = len(y)
    for i in range(n):
        for j in range(i + 1, n):
            hits = right[:, i].astype(int) + right[:, j]
            if hits.max() == 2 and hits.min() < 2:
                return [i, j]
    raise AssertionError("no pair of samples separates the members' models")


def _ask(peer: Any, rows: list[list[float]], labels: list[int | None]) -> list[dict[str, Any]]:
    body: dict[str, Any] = {
        "input": rows,
        "k": 3,
        "timeout_s": TIMEOUT_S,
        "max_price_wei": PRICE,
        "epsilon": 0,  # no noise: an opened vector is the member's model output
    }
    if any(label is not None for label in labels):
        body["audit_labels"] = labels
    answer = peer.client().post("/v1/query", body, timeout=TIMEOUT_S + 20)
    results: list[dict[str, Any]] = answer["results"]
    for r in results:
        assert r["ok"], r["reason"]
        assert len(r["payment"]["delivered"]) == 3
    return results


def test_audits_score_members_and_merit_settlement_pays_to_the_wei(
    network: Any,
    owner_models: list[Path],
    samples: dict[str, Any],
    anvil: AnvilProcess,
    deployment: Deployment,
) -> None:
    querier = network.peers[0]
    accounts = dev_accounts()
    peer_of = {accounts[1 + p.index].address: p.peer_id for p in network.peers}
    audit_a, audit_b = _audit_inputs(owner_models[1:4], samples)
    plain = [i for i in range(len(samples["labels"])) if i not in (audit_a, audit_b)]
    x, y = samples["inputs"], samples["labels"]

    # members open at most 25 % of their answers to a querier: audits 4th and 8th
    results = _ask(querier, [x[i] for i in plain[:3]], [None] * 3)
    (audit,) = _ask(querier, [x[audit_a]], [y[audit_a]])
    results += [audit]
    results += _ask(querier, [x[i] for i in plain[3:6]], [None] * 3)
    (audit2,) = _ask(querier, [x[audit_b]], [y[audit_b]])
    results += [audit2]
    for a, label in ((audit, y[audit_a]), (audit2, y[audit_b])):
        assert a["audit"]["label"] == label
        assert a["audit"]["committed"] == 3 and a["audit"]["opened"] == 3, a["audit"]
    for r in results:
        assert ("audit" in r) == (r in (audit, audit2))
    results += _ask(querier, [x[plain[6]]], [None])

    status = wait_until(
        lambda: (
            (s := network.status(querier))
            and s["chain"]["metrics"].get("settle.queries", 0) == 9
            and s
        ),
        timeout=30,
        what="the querier settled its nine queries",
    )
    metrics = status["chain"]["metrics"]
    assert metrics.get("settle.failed", 0) == 0
    audits = status["audits"]
    assert audits["reward_rule"] == "merit"
    members = {row["peer_id"]: row for row in audits["members"]}
    member_ids = {p.peer_id for p in network.peers[1:]}
    assert set(members) == member_ids
    for row in members.values():
        assert row["audits"] == 2 and row["bad"] == 0 and row["refused"] == 0
        assert row["loo"] is not None and row["shapley"] is not None
    assert len({row["hits"] for row in members.values()}) > 1  # the audits tell them apart

    # every query was settled by the merit weights; those weights are the merit scores
    weighted = audits["weighted_settlements"]
    assert metrics["settle.weighted"] == len(weighted) == 9
    w3 = Web3(HTTPProvider(anvil.rpc_url))
    escrow = w3.eth.contract(address=deployment.escrow, abi=load_artifact(ESCROW).abi_list())
    on_chain = {
        bytes(e.args["queryId"]).hex(): list(e.args["amounts"])
        for e in escrow.events.WeightedSettled.get_logs(from_block=0)
    }
    owed: Counter[str] = Counter()
    for entry in weighted:
        committee = entry["committee"]
        merit = [members[peer_of[a]]["merit"] for a in committee]
        assert entry["weights"] == pytest.approx(merit)
        seats = [bool(entry["delivered"] >> i & 1) for i in range(len(committee))]
        expected = settlement_amounts(
            PRICE, seats, entry["weights"], min_share_wei=PRICE * MIN_SHARE_BPS // 10_000
        )
        assert entry["amounts"] == expected
        assert on_chain[entry["query_id"]] == expected  # to the wei
        for address, amount in zip(committee, expected, strict=True):
            owed[address] += amount
    assert sum(owed.values()) == 9 * 3 * PRICE  # conservation: all delivered money paid
    credited: Counter[str] = Counter()
    for e in escrow.events.Credited.get_logs(from_block=0):
        credited[e.args["member"]] += e.args["amount"]
    assert credited == owed
    assert len(set(owed.values())) > 1  # the rule paid the members differently

    # the querier published its merit scores on chain (ppm)
    registry = w3.eth.contract(address=deployment.registry, abi=load_artifact(REGISTRY).abi_list())

    def published() -> dict[str, int]:
        return {
            e.args["member"]: e.args["scorePpm"]
            for e in registry.events.ScorePublished.get_logs(from_block=0)
            if e.args["querier"] == accounts[1].address
        }

    wait_until(lambda: len(published()) == 3, timeout=10, what="scores published")
    assert published() == {
        a: round(members[p]["merit"] * 1_000_000) for a, p in peer_of.items() if p in member_ids
    }


def test_no_daemon_logged_a_traceback(network: Any) -> None:
    for log in sorted(network.logs.glob("*.log")):
        text = log.read_text()
        assert "Traceback" not in text, f"{log.name}:\n{text[-3000:]}"
