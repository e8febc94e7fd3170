"""The explorer on anvil, where it also uses the Otterscan API: indexing starts
at the contracts' creation block, deployments and reverted transactions are
listed and counted, and a revert is decoded into the contract's error."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hexbytes import HexBytes

from fi_peer.explorer import ChainSource, make_app
from tests.chain.helpers import close_web3
from tests.explorer.conftest import AnvilHistory
from tests.explorer.dom import parse

pytestmark = pytest.mark.integration


async def test_otterscan_extras(anvil_history: AnvilHistory, tmp_path: Path) -> None:
    ah = anvil_history
    h = ah.history
    w3 = ah.chain.web3()
    source = ChainSource(
        w3,
        escrow=h.deployment.escrow,
        registry=h.deployment.registry,
        index_path=tmp_path / "index.sqlite",
    )
    try:
        async with TestClient(TestServer(make_app(source))) as client:
            page = parse(await (await client.get("/")).text())
            snap = source.snapshot
            assert snap is not None and snap.info.otterscan
            assert snap.info.start_block == h.deployment.block  # the escrow's creation block
            t = snap.ledger.totals
            # every transaction to the contracts: 2 deployments, the script, 1 reverted
            assert t.transactions == 2 + len(h.tx) + 1
            assert t.failed_transactions == 1
            hashes = [*h.tx.values(), ah.reverted]
            gas = 0
            for tx_hash in hashes:
                gas += (await w3.eth.get_transaction_receipt(HexBytes(tx_hash)))["gasUsed"]
            deploy_gas = sum(
                r.gas for r in snap.ledger.gas_by_function.values() if r.function == "deploy"
            )
            assert deploy_gas > 2_000_000
            assert t.gas_used == gas + deploy_gas
            gas_rows = {r[0].text: r for r in page.rows("gas")}
            assert gas_rows["withdraw"][1].text == "2" and gas_rows["withdraw"][2].text == "1"
            assert "yes" in page.find(id="contracts").text  # Otterscan API: yes

            tx = parse(await (await client.get(f"/tx/0x{ah.reverted.hex()}")).text())
            facts = tx.find(id="tx-facts").text
            assert "reverted" in facts and "NothingToWithdraw()" in facts
            assert tx.find(id="tx-function").text == "QueryEscrow.withdraw"
            txs = parse(await (await client.get("/txs")).text())
            assert f"/tx/0x{ah.reverted.hex()}" in txs.links()
    finally:
        source.close()
        await close_web3(w3)
