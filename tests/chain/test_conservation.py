"""Conservation over 1,000 random queries, on both chains.

Random committees, prices and outcomes: settled in batches or singly, with all,
some or none delivered; members left out (or of abandoned queries) claiming
with receipts, some for less than the price; refunds after the grace period;
everyone withdrawing at the end. Checked to the wei:

- per query: escrowed (k * price) = paid by settlement + claimed + refunded;
- per transaction: the members' credits add up to what its queries paid;
- per account: ETH at the end = ETH at the start + what it was paid or
  refunded - what it escrowed - the fees of its own transactions;
- the escrow contract ends holding exactly what it held before.

Flows are read from the events of every transaction's receipt; on anvil the
EventIndexer must then report exactly the same events and totals.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fi_peer.chain.client import ChainClient, QueryStatus
from fi_peer.chain.devchain import EthTesterChain
from fi_peer.chain.indexer import indexer_for
from fi_peer.chain.receipts import PaymentReceipt
from fi_peer.chain.terms import QueryTerms, Settlement
from fi_peer.chain.txsender import TxResult
from tests.chain.helpers import GRACE_S, Harness

# FI_CONSERVATION_QUERIES=100 for a quick local run; the acceptance is 1,000.
QUERIES = int(os.environ.get("FI_CONSERVATION_QUERIES", "1000"))
SEED = 20_260_101
T = TypeVar("T")


@dataclass
class Plan:
    terms: QueryTerms
    querier: ChainClient
    settle: bool  # False: abandoned (never settled)
    delivered: int = 0
    claims: dict[str, int] = field(default_factory=dict)  # member -> receipt amount


async def in_order(coros: Iterable[Awaitable[T]]) -> list[T]:
    """One at a time: faster than concurrent sends on both chains (one core each;
    concurrency is tested in test_txsender.py)."""
    return [await c for c in coros]


@pytest.mark.slow  # ~35 s per chain on an idle 2-core machine (about 2,000 transactions)
async def test_conservation_over_1000_random_queries(chain: Harness, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    queriers = [chain.querier, chain.querier2]
    members = chain.members
    everyone = [*queriers, *members, chain.outsider]
    eth_start = {c.address: await c.eth_balance() for c in everyone}
    escrow_start = await chain.querier.eth_balance(chain.deployment.escrow)
    fees: dict[str, int] = defaultdict(int)

    results: list[TxResult] = []

    def paid_fee(client: ChainClient, result: TxResult) -> TxResult:
        fees[client.address] += result.fee_wei
        results.append(result)
        return result

    # ── plan and open ────────────────────────────────────────────────────────
    deadline = await chain.now() + 3_600
    plans: list[Plan] = []
    for n in range(QUERIES):
        querier = rng.choice(queriers)
        k = rng.randint(1, len(members))
        committee = [m.address for m in rng.sample(members, k)]
        price = rng.choice([1, rng.randint(2, 10**6), rng.randint(10**6, 10**15)])
        terms = querier.new_terms(n.to_bytes(16, "big"), committee, price, deadline)
        plan = Plan(terms=terms, querier=querier, settle=rng.random() < 0.8)
        if plan.settle:
            plan.delivered = sum(1 << i for i in range(k) if rng.random() < 0.85)
        for i, member in enumerate(terms.committee):
            if not plan.delivered >> i & 1 and rng.random() < 0.3:
                plan.claims[member] = price if rng.random() < 0.7 else rng.randint(1, price)
        plans.append(plan)

    for p in plans:
        paid_fee(p.querier, await p.querier.open_query(p.terms))

    # ── settle before the deadline: batches of random size, some singly ─────
    async def settle_all(querier: ChainClient) -> None:
        todo = [p for p in plans if p.querier is querier and p.settle]
        while todo:
            size = rng.randint(1, 25)
            batch, todo = todo[:size], todo[size:]
            if size == 1 and rng.random() < 0.5:
                p = batch[0]
                result = await querier.settle(p.terms, p.terms.members_of(p.delivered))
            else:
                items = [Settlement(p.terms, p.delivered) for p in batch]
                result = await querier.settle_batch(items)
            paid_fee(querier, result)
            credited = sum(e.args["amount"] for e in result.all("Credited"))
            assert credited == sum(e.args["paid"] for e in result.all("QuerySettled"))

    for q in queriers:
        await settle_all(q)

    # ── claims: held shares at once, abandoned queries after the deadline ────
    async def claim(plan: Plan, member: str, amount: int) -> None:
        receipt_sig = plan.querier.sign_receipt(plan.terms.query_id, member, amount)
        client = chain.member(member)
        receipt = PaymentReceipt(query_id=plan.terms.query_id, member=member, amount_wei=amount)
        delivered = plan.delivered if plan.settle else 0
        paid_fee(client, await client.claim(plan.terms, receipt, receipt_sig, delivered=delivered))

    def claims_of(settled: bool) -> list[Awaitable[None]]:
        return [claim(p, m, a) for p in plans if p.settle is settled for m, a in p.claims.items()]

    await in_order(claims_of(True))
    await chain.devchain.increase_time(deadline - await chain.now() + 1)
    await in_order(claims_of(False))

    # ── refunds after the grace period, by the querier or anyone ─────────────
    await chain.devchain.increase_time(GRACE_S + 1)
    to_refund = [p for p in plans if not p.settle or p.delivered != p.terms.full_mask]

    async def refund(plan: Plan) -> None:
        caller = plan.querier if rng.random() < 0.5 else chain.outsider
        paid_fee(caller, await caller.refund(plan.terms, delivered=plan.delivered))

    await in_order(refund(p) for p in to_refund)
    for p in rng.sample(plans, 20):
        assert await chain.querier.status(p.terms) is QueryStatus.CLOSED

    # ── everyone withdraws ───────────────────────────────────────────────────
    for client in everyone:
        if await client.balance():
            paid_fee(client, await client.withdraw())
        assert await client.balance() == 0
    assert await chain.querier.eth_balance(chain.deployment.escrow) == escrow_start

    # ── check, from the events of every transaction's receipt ────────────────
    by_query: dict[bytes, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    received: dict[str, int] = defaultdict(int)
    totals: dict[str, int] = defaultdict(int)
    for result in results:
        for e in result.events:
            amount = _amount(e.name, e.args)
            totals[e.name] += amount
            if "queryId" in e.args:
                by_query[e.args["queryId"]][e.name] += amount
            if e.name == "Withdrawn":
                received[e.args["account"]] += amount
    assert len(by_query) == QUERIES
    for p in plans:
        flows = by_query[p.terms.query_id]
        assert flows["QueryOpened"] == p.terms.escrow_wei
        assert flows["QuerySettled"] == bin(p.delivered).count("1") * p.terms.price_wei
        assert flows["Claimed"] == sum(p.claims.values())
        assert flows["QueryOpened"] == flows["QuerySettled"] + flows["Claimed"] + flows["Refunded"]
    escrowed = sum(p.terms.escrow_wei for p in plans)
    assert totals["QueryOpened"] == escrowed
    assert totals["Credited"] + totals["Claimed"] + totals["Refunded"] == escrowed
    assert totals["Withdrawn"] == escrowed

    # per account, to the wei
    spent: dict[str, int] = defaultdict(int)
    for p in plans:
        spent[p.querier.address] += p.terms.escrow_wei
    for client in everyone:
        a = client.address
        assert await client.eth_balance() == eth_start[a] + received[a] - spent[a] - fees[a]

    if not isinstance(chain.devchain, EthTesterChain):
        # The indexer sees exactly what the receipts said. (Not on eth-tester:
        # its eth_getLogs scans the chain once per log, quadratic in blocks.)
        indexer = indexer_for(chain.w3, tmp_path / "index.sqlite", chain.deployment)
        try:
            await indexer.sync()
            indexed = {(e.tx_hash, e.log_index): e.event for e in indexer.events()}
            from_receipts = {(e.tx_hash, e.log_index): e.name for r in results for e in r.events}
            assert indexed == from_receipts
            for name, total in totals.items():
                assert indexer.total(name) == total, name
        finally:
            indexer.close()


def _amount(name: str, args: Mapping[str, Any]) -> int:
    if name == "QueryOpened":
        return int(args["price"]) * len(args["committee"])
    if name == "QuerySettled":
        return int(args["paid"])
    return int(args.get("amount", 0))
