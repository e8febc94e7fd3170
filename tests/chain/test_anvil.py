"""anvil end to end: the process manager, a full payment cycle, and a restart
with ``--state`` that the indexer resumes from without counting anything twice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fi_peer.chain.anvil import AnvilChain, AnvilConfig, AnvilProcess
from fi_peer.chain.client import ChainClient, Deployment, QueryStatus, deploy_contracts
from fi_peer.chain.errors import ChainUnavailable
from fi_peer.chain.indexer import indexer_for
from fi_peer.chain.receipts import PaymentReceipt
from fi_peer.chain.terms import Settlement
from tests.chain.conftest import require_anvil
from tests.chain.helpers import close_web3, qid

pytestmark = pytest.mark.integration

PRICE = 10**16
GRACE = 60


def test_a_missing_binary_is_reported(tmp_path: Path) -> None:
    process = AnvilProcess(binary=tmp_path / "no-anvil")
    with pytest.raises(ChainUnavailable, match="npm ci"):
        process.start()
    assert process.stop() is None


def test_start_on_a_free_port_and_stop_with_sigint() -> None:
    require_anvil()
    with AnvilProcess() as process:
        assert process.running and process.port > 0
        assert process.rpc_url == f"http://127.0.0.1:{process.port}"
        pid = process.pid
        assert pid is not None
    assert not process.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert process.stop() is None  # idempotent


def test_a_busy_port_is_refused() -> None:
    require_anvil()
    with AnvilProcess() as first:
        clash = AnvilProcess(AnvilConfig(port=first.port))
        with pytest.raises(ChainUnavailable, match="in use"):
            clash.start(timeout_s=10)
        assert not clash.running


def test_a_failing_start_reports_the_log(tmp_path: Path) -> None:
    require_anvil()
    process = AnvilProcess(AnvilConfig(extra_args=("--no-such-flag",)))
    with pytest.raises(ChainUnavailable, match="no-such-flag"):
        process.start(timeout_s=10)
    assert not process.running


async def _cycle(chain: AnvilChain, deployment: Deployment, first: int) -> dict[str, int]:
    """One round of every payment path; returns what each member withdrew."""
    w3 = chain.web3()
    try:
        querier = ChainClient(w3, chain.accounts[1], deployment)
        members = [ChainClient(w3, a, deployment) for a in chain.accounts[2:6]]
        addresses = [m.address for m in members]
        by_address = {m.address: m for m in members}
        deadline = await querier.chain_time() + 30
        full = querier.new_terms(qid(first), addresses[:3], PRICE, deadline)
        part = querier.new_terms(qid(first + 1), addresses[1:4], PRICE, deadline)
        gone = querier.new_terms(qid(first + 2), addresses[:2], PRICE, deadline)
        for terms in (full, part, gone):
            await querier.open_query(terms)
            assert await members[0].verify_escrow(terms)
        await querier.settle_batch([Settlement(full, full.full_mask), Settlement(part, 0b011)])
        # the member left out of `part` claims with its receipt at once
        left_out = part.committee[2]
        receipt_sig = querier.sign_receipt(part.query_id, left_out, PRICE)
        receipt = PaymentReceipt(query_id=part.query_id, member=left_out, amount_wei=PRICE)
        await by_address[left_out].claim(part, receipt, receipt_sig)
        # `gone` is never settled: one member claims after the deadline, then refund
        await chain.increase_time(31)
        claimer = gone.committee[0]
        gone_sig = querier.sign_receipt(gone.query_id, claimer, PRICE)
        gone_receipt = PaymentReceipt(query_id=gone.query_id, member=claimer, amount_wei=PRICE)
        await by_address[claimer].claim(gone, gone_receipt, gone_sig)
        await chain.increase_time(GRACE + 1)
        await querier.refund(gone)
        await querier.refund(part)  # nothing left: the held share was claimed
        for terms in (full, part, gone):
            assert await querier.status(terms) is QueryStatus.CLOSED
        withdrawn: dict[str, int] = {}
        for m in [*members, querier]:
            owed = await m.balance()
            if owed:
                result = await m.withdraw()
                assert result.event("Withdrawn").args["amount"] == owed
                withdrawn[m.address] = owed
        return withdrawn
    finally:
        await close_web3(w3)


async def test_payment_cycle_and_restart_with_state(tmp_path: Path) -> None:
    require_anvil()
    state = tmp_path / "chain.json"
    db = tmp_path / "index.sqlite"
    config = AnvilConfig(state_path=state, state_interval_s=60)

    process = AnvilProcess(config)
    process.start()
    try:
        chain = AnvilChain.of(process)
        querier = chain.accounts[1].address
        w3 = chain.web3()
        try:
            deployment = await deploy_contracts(w3, chain.accounts[0], claim_grace_s=GRACE)
            withdrawn = await _cycle(chain, deployment, first=1)
            # 8 shares escrowed: 3 + 2 paid by settlement, 1 + 1 by claims, 1 refunded
            assert sum(v for a, v in withdrawn.items() if a != querier) == 7 * PRICE
            assert withdrawn[querier] == PRICE
            indexer = indexer_for(w3, db, deployment)
            indexed = await indexer.sync()
            assert indexed > 0
            names = ("QueryOpened", "Credited", "Claimed", "Refunded", "Withdrawn")
            totals = {n: indexer.total(n) for n in names}
            assert totals["QueryOpened"] == 8 * PRICE
            paid = totals["Credited"] + totals["Claimed"] + totals["Refunded"]
            assert totals["Withdrawn"] == paid == 8 * PRICE
            head = await w3.eth.block_number
            indexer.close()
        finally:
            await close_web3(w3)
    finally:
        assert process.stop() == 0  # SIGINT: anvil dumps its state and exits cleanly
    assert state.is_file() and state.stat().st_size > 0

    process = AnvilProcess(config)
    process.start()
    try:
        chain = AnvilChain.of(process)
        w3 = chain.web3()
        try:
            assert await w3.eth.block_number == head
            assert await w3.eth.get_code(deployment.escrow)
            indexer = indexer_for(w3, db, deployment)
            assert await indexer.sync() == 0  # resumed: nothing new, nothing twice
            assert indexer.count() == indexed
            assert {n: indexer.total(n) for n in names} == totals

            again = await _cycle(chain, deployment, first=100)
            # chain time never ran backwards across the restart
            stamps = [
                int((await w3.eth.get_block(n))["timestamp"])
                for n in range(head, await w3.eth.block_number + 1)
            ]
            assert stamps == sorted(stamps)
            added = await indexer.sync()
            assert added == indexed  # the same cycle emits the same number of events
            assert indexer.count() == 2 * indexed
            assert indexer.total("Withdrawn") == totals["Withdrawn"] + sum(again.values())
            for n in names:
                assert indexer.total(n) == 2 * totals[n]
            indexer.close()
        finally:
            await close_web3(w3)
    finally:
        assert process.stop() == 0
