"""Acceptance: the explorer in real headless Chromium (Debian's, driven by
Selenium through Debian's chromedriver), against anvil with a scripted history.

It opens the explorer, finds a query by its id with the search box, checks
that the query's payouts match the chain's balances to the wei, follows the
link to its settlement transaction and on to its block, and watches the
overview update live when a new query is opened. Screenshots go to the test's
output folder; with FI_PEER_UPDATE_SCREENSHOT=1 the overview is also saved to
docs/explorer.png (the README's picture). Every wait is an explicit wait on
page state, never a sleep.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from web3 import HTTPProvider, Web3

from fi_peer.chain.artifacts import REPO_ROOT, load_artifact
from fi_peer.chain.client import ESCROW, ChainClient
from fi_peer.chain.terms import checksum
from tests.chain.helpers import close_web3
from tests.explorer.conftest import AnvilHistory, ExplorerProcess
from tests.explorer.history import CLAIM4, PRICES

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
    "--hide-scrollbars",
)
SCREENSHOT_ENV = "FI_PEER_UPDATE_SCREENSHOT"
DOCS_SCREENSHOT = REPO_ROOT / "docs" / "explorer.png"
WAIT_S = 20


def _require_browser() -> None:
    """Skip without Chromium, chromedriver or Selenium; in CI (where
    scripts/system-deps.d/40-chromium.sh and the dev extra install them), fail."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        message = f"browser test needs {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = Service(
        executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")
    )
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _balances(rpc_url: str, escrow: str, accounts: list[str]) -> dict[str, int]:
    """balanceOf straight from the chain (eth_call), not through the explorer."""
    w3 = Web3(HTTPProvider(rpc_url))
    contract = w3.eth.contract(address=checksum(escrow), abi=load_artifact(ESCROW).abi_list())
    return {a: int(contract.functions.balanceOf(a).call()) for a in accounts}


async def _open_one_more(ah: AnvilHistory) -> None:
    w3 = ah.chain.web3()
    try:
        querier = ChainClient(w3, ah.chain.accounts[1], ah.history.deployment)
        deadline = await querier.chain_time() + 600
        terms = querier.new_terms(b"\x99" * 16, [ah.history.members[4]], 10**15, deadline)
        await querier.open_query(terms)
    finally:
        await close_web3(w3)


def test_find_a_query_check_its_payouts_and_follow_its_transaction(
    anvil_history: AnvilHistory, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    ah = anvil_history
    h = ah.history
    shots = tmp_path / "screenshots"
    shots.mkdir()
    wait = WebDriverWait(browser, WAIT_S)

    def text_is(selector: str, text: str) -> Any:
        def check(driver: Any) -> bool:
            found = driver.find_elements(By.CSS_SELECTOR, selector)
            return bool(found) and found[0].text == text

        return check

    args = [
        "--rpc",
        ah.process.rpc_url,
        "--contract",
        h.deployment.escrow,
        "--registry",
        h.deployment.registry,
        "--port",
        "0",
        "--refresh",
        "0.2",
    ]
    explorer = ExplorerProcess(args).start()
    try:
        # 1. The overview, with the history's numbers.
        browser.get(explorer.url + "/")
        wait.until(text_is('#overview [data-live="queries_opened"]', "5"))
        wait.until(text_is('#overview [data-live="failed"]', "1"))  # the reverted withdraw
        browser.save_screenshot(str(shots / "1-overview.png"))
        if os.environ.get(SCREENSHOT_ENV) == "1":
            shutil.copyfile(shots / "1-overview.png", DOCS_SCREENSHOT)

        # 2. Find q4 by (a prefix of) its id with the search box in the header.
        q4 = h.terms["q4"]
        q4_id = "0x" + q4.query_id.hex()
        box = browser.find_element(By.ID, "search")
        box.send_keys(q4_id[:10], Keys.ENTER)
        wait.until(ec.url_contains("/queries?q="))
        rows = wait.until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#queries tbody tr a.qid") or False
        )
        assert [r.text for r in rows] == [q4_id]
        browser.save_screenshot(str(shots / "2-search.png"))
        rows[0].click()

        # 3. Its page: payouts per member, to the wei, against the chain's balances.
        wait.until(text_is("#query-id", q4_id))
        payouts = {
            el.get_attribute("data-member"): int(
                el.find_element(By.CSS_SELECTOR, ".wei").get_attribute("data-wei")
            )
            for el in browser.find_elements(By.CSS_SELECTOR, "#payouts span.payout")
        }
        chain = _balances(ah.process.rpc_url, h.deployment.escrow, list(q4.committee))
        assert payouts == chain == {h.members[4]: PRICES["q4"], h.members[5]: CLAIM4}
        paid = browser.find_element(By.CSS_SELECTOR, "#query-paid .wei")
        assert int(paid.get_attribute("data-wei")) == sum(chain.values())
        browser.save_screenshot(str(shots / "3-query.png"))

        # 4. Follow the timeline's link to the settlement transaction.
        settle_hash = "0x" + h.tx["settle q4"].hex()
        browser.find_element(
            By.CSS_SELECTOR, '#timeline li[data-kind="settled"] a[href^="/tx/"]'
        ).click()
        wait.until(text_is("#tx-hash", settle_hash))
        assert browser.find_element(By.ID, "tx-function").text == "QueryEscrow.settle"
        credited = browser.find_elements(By.CSS_SELECTOR, "#events .wei")
        assert str(PRICES["q4"]) in [c.get_attribute("data-wei") for c in credited]
        back = browser.find_elements(By.CSS_SELECTOR, f'#tx-queries a[href$="{q4_id}"]')
        assert len(back) == 1  # the transaction links back to the query
        browser.save_screenshot(str(shots / "4-transaction.png"))

        # 5. ... and on to its block, which lists the transaction.
        browser.find_element(By.CSS_SELECTOR, '#tx-facts a[href^="/block/"]').click()
        wait.until(ec.presence_of_element_located((By.ID, "block-number")))
        assert browser.find_elements(By.CSS_SELECTOR, f'#block-txs a[href="/tx/{settle_hash}"]')
        browser.save_screenshot(str(shots / "5-block.png"))

        # 6. Live: a new query on chain shows up on the open overview, no reload.
        browser.get(explorer.url + "/")
        wait.until(text_is('#overview [data-live="queries_opened"]', "5"))
        asyncio.run(_open_one_more(ah))
        wait.until(text_is('#overview [data-live="queries_opened"]', "6"))
        browser.save_screenshot(str(shots / "6-live-update.png"))
    finally:
        code = explorer.stop()
    assert code == 0, explorer.stderr
    assert sorted(p.name for p in shots.iterdir()) == [
        "1-overview.png",
        "2-search.png",
        "3-query.png",
        "4-transaction.png",
        "5-block.png",
        "6-live-update.png",
    ]
