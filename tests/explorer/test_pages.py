"""The explorer's pages over a scripted history on eth-tester: every number to
the wei, checked against the script's own arithmetic and against the chain."""

from __future__ import annotations

from hexbytes import HexBytes

from fi_peer.chain.client import ChainClient
from fi_peer.chain.terms import Settlement
from fi_peer.explorer import ChainSource
from tests.explorer.conftest import Site
from tests.explorer.dom import Node, wei_of
from tests.explorer.history import CLAIM4, GRACE_S, MIN_STAKE, PRICES, keys_of


def _stat(page: Node, key: str) -> Node:
    return page.find(id="overview").find("span", data_live=key)


async def _chain_balances(site: Site, accounts: list[str]) -> dict[str, int]:
    reader = site.reader()
    return {a: await reader.balance(a) for a in accounts}


async def test_overview_numbers_are_exact(site: Site) -> None:
    h = site.history
    page = await site.page("/")
    p = PRICES
    escrowed = 3 * p["q1"] + 3 * p["q2"] + 2 * p["q3"] + 2 * p["q4"] + 2 * p["q5"]
    paid = 3 * p["q1"] + 3 * p["q2"] + 2 * p["q3"] + p["q4"] + CLAIM4
    refunded = 2 * p["q5"]
    withdrawn = h.withdrawn[h.members[0]]
    assert withdrawn == p["q1"] + p["q3"]  # m0 sat in q1 and q3 (q5 was refunded)
    counts = {
        "queries_opened": "5",
        "queries_settled": "4",
        "queries_refunded": "1",
        "queries_claimed": "2",
        "claims": "2",
        "peers_registered": "3",  # m3 deregistered
        "transactions": str(len(h.tx)),  # no Otterscan here: the txs that emitted events
        "failed": "0",
    }
    for key, text in counts.items():
        assert _stat(page, key).text == text, key
    amounts = {
        "escrowed": escrowed,
        "paid": paid,
        "refunded": refunded,
        "withdrawn": withdrawn,
        "held": escrowed - paid - refunded,
        "owed": paid + refunded - withdrawn,
        "stake": 4 * MIN_STAKE + 0 + 1 + 2 + 3,  # m3's stake stays until withdrawStake
    }
    for key, amount in amounts.items():
        assert wei_of(_stat(page, key)) == amount, key
    assert amounts["held"] == 5  # q4: 2 prices escrowed, 1 price + (price - 5) paid

    # Against the chain itself: balances owed and the escrow's ETH.
    accounts = [h.querier, h.querier2, h.outsider, *h.members]
    balances = await _chain_balances(site, accounts)
    assert sum(balances.values()) == amounts["owed"]
    contract_eth = await site.w3.eth.get_balance(h.deployment.escrow)
    assert contract_eth == amounts["held"] + amounts["owed"]
    assert "= held + owed" in page.find(id="conservation").text

    gas = 0
    for tx_hash in h.tx.values():
        gas += (await site.w3.eth.get_transaction_receipt(HexBytes(tx_hash)))["gasUsed"]
    assert _stat(page, "gas_used").text == f"{gas:,}"
    gas_rows = {row[0].text: row for row in page.rows("gas")}
    assert set(gas_rows) == {
        "register",
        "openQuery",
        "settle",
        "settleBatch",
        "claim",
        "refund",
        "withdraw",
        "deregister",
    }
    assert gas_rows["openQuery"][1].text == "5"
    assert [a.text for a in page.find(id="latest-queries").find_all("a", class_="qid")] == [
        "0x" + h.terms[name].query_id.hex() for name in ("q5", "q4", "q3", "q2", "q1")
    ]


async def test_overview_json_matches_the_page(site: Site) -> None:
    response = await site.client.get("/api/overview.json")
    assert response.status == 200
    data = await response.json()
    page = await site.page("/")
    assert data["live"] is True
    for key, value in data["values"].items():
        node = _stat(page, key)
        assert node.text == value["text"]
        if value["wei"] is not None:
            assert int(value["wei"]) == wei_of(node)


async def test_query_page_shows_payouts_to_the_wei(site: Site) -> None:
    h = site.history
    q4 = h.terms["q4"]
    page = await site.page(f"/query/{h.querier}/0x{q4.query_id.hex()}")
    assert page.find(id="query-id").text == "0x" + q4.query_id.hex()
    payouts = {n.attrs["data-member"]: wei_of(n) for n in page.find_all("span", class_="payout")}
    assert payouts == h.payouts("q4") == {h.members[4]: PRICES["q4"], h.members[5]: CLAIM4}
    # m4 and m5 earned nothing else: the chain's balances are exactly these payouts.
    assert await _chain_balances(site, list(payouts)) == payouts
    assert wei_of(page.find(id="query-paid")) == PRICES["q4"] + CLAIM4
    assert "held" in page.find(id="query-facts").text
    rows = page.rows("payouts")
    assert [r[2].text for r in rows] == ["yes", "no"]  # m4 delivered; m5 was left out
    kinds = [li.attrs["data-kind"] for li in page.find(id="timeline").find_all("li")]
    assert kinds == ["opened", "settled", "claimed"]
    links = page.links()
    for step in ("open q4", "settle q4", "claim q4"):
        assert f"/tx/0x{h.tx[step].hex()}" in links
    assert [r[0].text for r in page.rows("query-txs")] == [
        "0x" + h.tx[s].hex() for s in ("open q4", "settle q4", "claim q4")
    ]


async def test_every_query_page_agrees_with_the_script(site: Site) -> None:
    h = site.history
    states = {"q1": "settled", "q2": "settled", "q3": "held", "q4": "held", "q5": "refunded"}
    for name, terms in h.terms.items():
        page = await site.page(f"/query/{terms.querier}/0x{terms.query_id.hex()}")
        payouts = {
            n.attrs["data-member"]: wei_of(n) for n in page.find_all("span", class_="payout")
        }
        assert payouts == h.payouts(name), name
        assert states[name] in page.find(id="query-facts").text, name
    q5 = h.terms["q5"]
    page = await site.page(f"/query/{q5.querier}/0x{q5.query_id.hex()}")
    kinds = [li.attrs["data-kind"] for li in page.find(id="timeline").find_all("li")]
    assert kinds == ["opened", "refunded"]


async def test_search_by_id_prefix_querier_and_member(site: Site) -> None:
    h = site.history
    q4 = h.terms["q4"]
    page = await site.page("/queries?q=d4e5f6")
    rows = page.rows("queries")
    assert len(rows) == 1
    assert rows[0][0].find("a").attrs["href"] == f"/query/{h.querier}/0x{q4.query_id.hex()}"
    page = await site.page(f"/queries?q={h.querier2[:12]}")
    assert [r[0].text for r in page.rows("queries")] == ["0x" + h.terms["q5"].query_id.hex()]
    page = await site.page(f"/queries?q={h.members[3].lower()}")  # m3 sat in q2 and q3
    assert {r[0].text for r in page.rows("queries")} == {
        "0x" + h.terms[n].query_id.hex() for n in ("q2", "q3")
    }
    page = await site.page("/queries?state=held")
    assert len(page.rows("queries")) == 2
    assert "2 of 5 queries" in page.find(id="query-count").text
    page = await site.page("/queries?q=ffff")
    assert page.rows("queries")[0][0].text == "No queries."


async def test_the_search_box_goes_to_the_right_page(site: Site) -> None:
    h = site.history
    q4 = h.terms["q4"]
    cases = {
        f"0x{q4.query_id.hex()}": f"/query/0x{q4.query_id.hex()}",
        f"0x{h.tx['settle q4'].hex()}": f"/tx/0x{h.tx['settle q4'].hex()}",
        h.members[4].lower(): f"/peer/{h.members[4]}",
        "12": "/block/12",
        "#7": "/block/7",
        "d4e5": "/queries?q=d4e5",
        "": "/queries",
    }
    for text, location in cases.items():
        response = await site.client.get("/search", params={"q": text}, allow_redirects=False)
        assert response.status == 302, text
        assert response.headers["Location"] == location, text
    status, _ = await site.get(f"/query/0x{q4.query_id.hex()}")
    assert status == 302  # one querier used this id: straight to its page


async def test_peers_page_keys_stake_earnings_and_balances(site: Site) -> None:
    h = site.history
    page = await site.page("/peers")
    balances = {n.attrs["data-account"]: wei_of(n) for n in page.find_all(class_="balance")}
    accounts = [h.querier, h.querier2, h.outsider, *h.members]
    chain = await _chain_balances(site, accounts)
    # The outsider only sent a refund (no event names it): not an account of the escrow.
    assert balances == {a: b for a, b in chain.items() if a != h.outsider}
    assert not page.find_all(class_="badge bad")  # balanceOf == what the events imply
    text = page.find(id="peers").text
    for i in range(4):
        ed, x = keys_of(i)
        assert ed.hex()[:8] in text and x.hex()[:8] in text
    rows = {r[0].find("a").attrs["title"]: r for r in page.rows("peers")}
    m0 = rows[h.members[0]]
    assert wei_of(m0[4]) == MIN_STAKE
    assert wei_of(m0[6]) == PRICES["q1"] + PRICES["q3"]  # earned
    assert wei_of(m0[7]) == h.withdrawn[h.members[0]]
    assert wei_of(m0[8]) == 0
    assert rows[h.members[3]][1].text == "deregistered"
    assert rows[h.members[4]][1].text == "not registered"
    assert wei_of(rows[h.querier2][8]) == 2 * PRICES["q5"]  # its refund


async def test_peer_page(site: Site) -> None:
    h = site.history
    page = await site.page(f"/peer/{h.members[3]}")
    facts = page.find(id="peer-facts").text
    ed, x = keys_of(3)
    assert ed.hex() in facts and x.hex() in facts
    assert "deregistered" in facts and "unbonding ends" in facts
    served = {r[0].text for r in page.rows("served")}
    assert served == {"0x" + h.terms[n].query_id.hex() for n in ("q2", "q3")}
    history = [r[0].text for r in page.rows("history")]
    assert history == ["deregistered", "claimed", "credited", "registered"]
    status, text = await site.get("/peer/0x000000000000000000000000000000000000dEaD")
    assert status == 404 and "no activity" in text


async def test_transaction_page_decodes_a_batch(site: Site) -> None:
    h = site.history
    tx_hash = h.tx["settleBatch q2 q3"]
    page = await site.page(f"/tx/0x{tx_hash.hex()}")
    assert page.find(id="tx-hash").text == "0x" + tx_hash.hex()
    assert page.find(id="tx-function").text == "QueryEscrow.settleBatch"
    q2, q3 = h.terms["q2"], h.terms["q3"]
    batch = page.rows("batch")
    assert [r[0].text for r in batch] == ["0x" + q2.query_id.hex(), "0x" + q3.query_id.hex()]
    assert [r[2].text for r in batch] == ["111", "10"]
    committee = [a.attrs["title"] for a in batch[1][1].find_all("a")]
    assert committee == list(q3.committee)
    events = [r[2].text for r in page.rows("events")]
    assert events == ["QuerySettled", "QuerySettled"] + ["Credited"] * 4
    queries = page.find(id="tx-queries").links()
    assert queries == [f"/query/{h.querier}/0x{t.query_id.hex()}" for t in (q2, q3)]
    block = (await site.w3.eth.get_transaction(HexBytes(tx_hash)))["blockNumber"]
    assert f"/block/{block}" in page.links()
    # ... and back: the block lists the transaction.
    block_page = await site.page(f"/block/{block}")
    assert f"/tx/0x{tx_hash.hex()}" in block_page.links()
    assert block_page.rows("block-txs")[0][3].text == "settleBatch"


async def test_transaction_pages_of_other_calls(site: Site) -> None:
    h = site.history
    claim = await site.page(f"/tx/0x{h.tx['claim q4'].hex()}")
    assert claim.find(id="tx-function").text == "QueryEscrow.claim"
    text = claim.find(id="events").text
    assert "Claimed" in text and f"{CLAIM4:,}" not in text  # amounts show as ETH ...
    amounts = [wei_of(n) for n in claim.find(id="events").find_all("span", class_="wei")]
    assert CLAIM4 in amounts  # ... with the exact wei alongside
    register = await site.page(f"/tx/0x{h.tx['register m0'].hex()}")
    assert register.find(id="tx-function").text == "PeerRegistry.register"
    # A deployment emits no event but its page decodes the constructor.
    block = await site.page(f"/block/{h.deployment.block}")
    deploy_tx = block.rows("block-txs")[0][1].text
    page = await site.page(f"/tx/{deploy_tx}")
    assert page.find(id="tx-function").text == "QueryEscrow.constructor"
    assert f"claimGrace_ uint64 = {GRACE_S}" in page.find(class_="args").text


async def test_blocks_and_transactions_lists_link_both_ways(site: Site) -> None:
    h = site.history
    blocks = await site.page("/blocks")
    listed = {r[0].text for r in blocks.rows("blocks")}
    txs = await site.page("/txs")
    rows = txs.rows("txs")
    assert len(rows) == len(h.tx)
    for row in rows:
        assert row[1].text in listed  # each transaction's block is listed ...
        assert row[0].find("a").attrs["href"].startswith("/tx/0x")  # ... and linked


async def test_bad_and_unknown_ids_are_pages_not_tracebacks(site: Site) -> None:
    h = site.history
    cases = {
        "/query/nope/0x00": 400,
        f"/query/{h.querier}/0x1234": 400,
        f"/query/{h.querier}/0x{'77' * 16}": 404,
        f"/query/0x{'77' * 16}": 404,
        "/tx/0x1234": 400,
        f"/tx/0x{'ab' * 32}": 404,
        "/block/x": 400,
        "/block/999999": 404,
        "/peer/0xnothex": 400,
        "/no/such/page": 404,
        "/queries?page=-4&state=<bad>": 200,
    }
    for path, expected in cases.items():
        status, text = await site.get(path)
        assert status == expected, path
        assert "Traceback" not in text and "<h1>" in text, path
    response = await site.client.post("/")
    assert response.status == 405


async def test_headers_forbid_scripts_from_anywhere_else(site: Site) -> None:
    response = await site.client.get("/")
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    js = await site.client.get("/static/explorer.js")
    assert js.status == 200 and js.headers["Content-Type"].startswith("text/javascript")


async def test_reflected_search_text_is_escaped(site: Site) -> None:
    evil = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    response = await site.client.get("/queries", params={"q": evil})
    text = await response.text()
    assert "<script>alert" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


async def test_indexing_is_idempotent_and_resumes(site: Site) -> None:
    h = site.history
    first = await site.source.refresh(force=True)
    again = await site.source.refresh(force=True)
    assert first is not None and again is not None and again is not first
    assert again.ledger.totals == first.ledger.totals
    site.source.close()

    # A restart on the same index file: nothing is counted twice.
    resumed = ChainSource(
        site.w3,
        escrow=h.deployment.escrow,
        registry=h.deployment.registry,
        index_path=site.index_path,
        min_interval_s=0,
    )
    try:
        snap = await resumed.refresh(force=True)
        assert snap is not None and snap.ledger.totals == first.ledger.totals
        count = snap.ledger.totals.transactions
        # New activity is picked up, once.
        querier = ChainClient(site.w3, site.chain.accounts[1], h.deployment)
        terms = querier.new_terms(
            b"\x42" * 16, [h.members[4]], 123_456_789, await querier.chain_time() + 500
        )
        await querier.open_query(terms)
        await querier.settle_batch([Settlement(terms, terms.full_mask)])
        for _ in range(2):
            snap = await resumed.refresh(force=True)
            assert snap is not None
            t = snap.ledger.totals
            assert t.transactions == count + 2
            assert t.queries_opened == 6 and t.queries_settled == 5
            assert t.paid_wei == first.ledger.totals.paid_wei + 123_456_789
            events = sum(len(v) for v in snap.ledger.events_by_tx.values())
            assert events == sum(len(v) for v in first.ledger.events_by_tx.values()) + 3
    finally:
        resumed.close()
