"""Acceptance: the explorer in real headless Chromium against the real demo network.

``fi-peer demo --keep-running`` (anvil, the contracts, four ``fi-peer run``
daemons over libp2p paying on chain, the explorer) runs as a subprocess with
small settings. Once its report says the queries are settled, the test takes a
settled query from the chain's own QuerySettled events, finds it by id with
the explorer's search box, checks its payouts against the chain to the wei
(QueryOpened's committee and price, QuerySettled's delivered bits, Claimed
amounts, the settlement receipt's Credited events and balanceOf), follows the
link to its settlement transaction and checks the hash and the call. Ctrl-C
then stops the demo and every pid it recorded in demo.json must be gone.
Screenshots go to the test's output folder. Every wait is on a condition.
"""

from __future__ import annotations

import math
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from web3 import HTTPProvider, Web3
from web3.logs import DISCARD

from fi_peer.chain.artifacts import load_artifact
from fi_peer.chain.client import ESCROW, Deployment
from fi_peer.chain.terms import checksum
from tests.chain.conftest import require_anvil
from tests.explorer.test_browser import WAIT_S, browser  # noqa: F401 - a fixture, used by name
from tests.integration.test_netdemo import (
    _assert_nothing_left,
    _background_job,
    _command,
    _env,
    _read_report,
    _recorded_children,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# test_netdemo's small network (4 peers, k 3, 10 epochs), with fewer queries
SMALL = ("--queries", "12")


class ChainView:
    """The escrow read straight from anvil (eth_getLogs, eth_call), not through the explorer."""

    def __init__(self, rpc_url: str, deployment: Deployment) -> None:
        self.w3 = Web3(HTTPProvider(rpc_url))
        self.deployment = deployment
        self.escrow = self.w3.eth.contract(
            address=deployment.escrow, abi=load_artifact(ESCROW).abi_list()
        )

    def logs(self, event: str, **filters: Any) -> list[Any]:
        found: list[Any] = getattr(self.escrow.events, event).get_logs(
            from_block=self.deployment.block, argument_filters=filters or None
        )
        return found

    def payouts(self, query_id: bytes) -> tuple[dict[str, int], Any, str]:
        """Per member of the query's committee: price if its delivered bit is set in
        QuerySettled, plus what it claimed; the QuerySettled log; the querier."""
        (opened,) = self.logs("QueryOpened", queryId=query_id)
        (settled,) = self.logs("QuerySettled", queryId=query_id)
        committee = [checksum(m) for m in opened.args.committee]
        price, delivered = int(opened.args.price), int(settled.args.delivered)
        by_settlement = {m: price if delivered >> i & 1 else 0 for i, m in enumerate(committee)}
        assert sum(by_settlement.values()) == int(settled.args.paid)
        payouts = dict(by_settlement)
        for claim in self.logs("Claimed", queryId=query_id):
            payouts[checksum(claim.args.member)] += int(claim.args.amount)
        # the settlement transaction credited each paid member at least its share
        receipt = self.w3.eth.get_transaction_receipt(settled.transactionHash)
        assert receipt["status"] == 1
        credited: dict[str, int] = {}
        for log in self.escrow.events.Credited().process_receipt(receipt, errors=DISCARD):
            member = checksum(log.args.member)
            credited[member] = credited.get(member, 0) + int(log.args.amount)
        for member, share in by_settlement.items():
            assert share == 0 or credited.get(member, 0) >= share, (member, credited)
        assert checksum(receipt["from"]) == checksum(opened.args.querier)
        return payouts, settled, checksum(opened.args.querier)

    def balance_of(self, member: str) -> int:
        return int(self.escrow.functions.balanceOf(member).call())

    def function_of(self, tx_hash: bytes) -> str:
        tx = self.w3.eth.get_transaction(tx_hash)
        function, _ = self.escrow.decode_function_input(tx["input"])
        return str(function.fn_name)


@pytest.mark.timeout(180)
def test_demo_network_query_payouts_match_the_chain_in_chromium(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    driver = request.getfixturevalue("browser")  # test_browser.py's Chromium; skips without it
    require_anvil()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    state = tmp_path / "demo"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    wait = WebDriverWait(driver, WAIT_S)

    def text_is(selector: str, text: str) -> Any:
        def check(d: Any) -> bool:
            found = d.find_elements(By.CSS_SELECTOR, selector)
            return bool(found) and found[0].text == text

        return check

    stderr = open(tmp_path / "demo.stderr", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        _command(state, "--keep-running", *SMALL),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=_env(tmp_path / "home"),
        preexec_fn=_background_job,
    )
    report: dict[str, Any] | None = None
    teardown_s = math.inf
    try:
        # The report comes once every querier settled and the members withdrew.
        report = _read_report(process, 150)
        assert process.poll() is None, "--keep-running exited"
        assert report["settled"], report.get("settle_error")
        assert _recorded_children(state) == report["pids"]
        deployment = Deployment.load(state / "deployment.json")
        assert deployment.escrow == checksum(report["escrow"])
        chain = ChainView(report["rpc_url"], deployment)

        # A query of the demo that the chain settled, with something paid.
        settled_logs = chain.logs("QuerySettled")
        demo_ids = {bytes.fromhex(i) for i in report["queries"]["ids"] if i}
        paid = [s for s in settled_logs if s.args.paid > 0 and s.args.queryId in demo_ids]
        assert paid, f"no settled, paid query among {len(settled_logs)} settlements"
        query_id = bytes(paid[0].args.queryId)
        qid = "0x" + query_id.hex()
        expected, settled, querier = chain.payouts(query_id)
        settle_hash = "0x" + bytes(settled.transactionHash).hex()

        # 1. The overview, once the explorer has indexed every settlement.
        driver.get(report["explorer_url"].rstrip("/") + "/")
        wait.until(text_is('#overview [data-live="queries_settled"]', str(len(settled_logs))))
        driver.save_screenshot(str(shots / "1-overview.png"))

        # 2. The search box in the header, with the full id, leads to the query's page.
        box = wait.until(ec.presence_of_element_located((By.ID, "search")))
        box.send_keys(qid, Keys.ENTER)
        wait.until(text_is("#query-id", qid))
        assert driver.current_url.endswith(f"/query/{querier}/{qid}")

        # 3. Its payouts, per member, to the wei, against the chain.
        payouts = {
            checksum(el.get_attribute("data-member")): int(
                el.find_element(By.CSS_SELECTOR, ".wei").get_attribute("data-wei")
            )
            for el in driver.find_elements(By.CSS_SELECTOR, "#payouts span.payout")
        }
        assert payouts == expected
        shown_paid = driver.find_element(By.CSS_SELECTOR, "#query-paid .wei")
        assert int(shown_paid.get_attribute("data-wei")) == sum(expected.values())
        # "balance now": each member's balanceOf (the demo's members withdrew theirs)
        balances = {}
        for row in driver.find_elements(By.CSS_SELECTOR, "#payouts tbody tr"):
            member = row.find_element(By.CSS_SELECTOR, "span.payout").get_attribute("data-member")
            cell = row.find_elements(By.CSS_SELECTOR, "td")[-1]
            balances[checksum(member)] = int(
                cell.find_element(By.CSS_SELECTOR, ".wei").get_attribute("data-wei")
            )
        assert balances == {m: chain.balance_of(m) for m in expected}
        driver.save_screenshot(str(shots / "2-query.png"))

        # 4. The timeline's link to the settlement transaction: the chain's hash and call.
        driver.find_element(
            By.CSS_SELECTOR, '#timeline li[data-kind="settled"] a[href^="/tx/"]'
        ).click()
        wait.until(text_is("#tx-hash", settle_hash))
        function = chain.function_of(settled.transactionHash)
        assert driver.find_element(By.ID, "tx-function").text == f"QueryEscrow.{function}"
        back = driver.find_elements(By.CSS_SELECTOR, f'#tx-queries a[href$="{qid}"]')
        assert len(back) == 1  # the transaction links back to the query
        driver.save_screenshot(str(shots / "3-transaction.png"))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # Ctrl-C
        interrupted = time.monotonic()
        try:
            process.wait(60)
            teardown_s = time.monotonic() - interrupted
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        stderr.close()
    log = (tmp_path / "demo.stderr").read_text()[-4000:]
    assert teardown_s < 30, f"the teardown took over 30 s:\n{log}"
    assert process.returncode == 0, log
    assert report is not None
    _assert_nothing_left(report, state)  # every pid of demo.json is gone
    names = ["1-overview.png", "2-query.png", "3-transaction.png"]
    assert sorted(p.name for p in shots.iterdir()) == names
    for name in names:
        data = (shots / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000, name
    print(f"query {qid} settled in {settle_hash} ({function}): {expected}")
