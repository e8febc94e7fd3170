"""Weighted settlements (settleWeighted) in the explorer: per-member payouts come
from the WeightedSettled amounts, not from price x delivered."""

from __future__ import annotations

from web3 import AsyncHTTPProvider, AsyncWeb3

from fi_peer.explorer import pages
from fi_peer.explorer.source import ChainInfo, ChainSource, Snapshot
from tests.explorer.dom import parse
from tests.explorer.test_ledger import ESCROW, QID, QUERIER, A, B, _Chain, _opened

C = "0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65"


def _weighted_chain() -> _Chain:
    c = _Chain()
    c.tx(QUERIER, ESCROW, _opened(QUERIER, 100, [A, B, C]))
    qid = "0x" + QID.hex()
    c.tx(
        QUERIER,
        ESCROW,
        ("QuerySettled", {"queryId": qid, "delivered": 0b011, "paid": 200}),
        ("Credited", {"member": A, "amount": 170}),
        ("Credited", {"member": B, "amount": 30}),
        ("WeightedSettled", {"queryId": qid, "amounts": (170, 30, 0)}),
    )
    return c


def test_weighted_payouts_follow_the_event_amounts() -> None:
    c = _weighted_chain()
    ledger = c.ledger()
    q = ledger.queries[(QUERIER, QID)]
    assert q.weighted
    assert {m: p.total for m, p in q.payouts.items()} == {A: 170, B: 30, C: 0}
    assert q.paid_wei == 200 and q.held_wei == 100
    assert ledger.accounts[A].credited == 170 and ledger.accounts[B].credited == 30
    assert ledger.totals.paid_wei == 200
    assert ledger.problems == []
    # the member left out claims its receipt; the ledger still adds up
    c.tx(
        C,
        ESCROW,
        ("Claimed", {"queryId": "0x" + QID.hex(), "member": C, "querier": QUERIER, "amount": 100}),
    )
    q = c.ledger().queries[(QUERIER, QID)]
    assert q.payouts[C].total == 100 and q.held_wei == 0


def test_a_weighted_event_that_does_not_fit_is_reported() -> None:
    c = _Chain()
    c.tx(QUERIER, ESCROW, _opened(QUERIER, 100, [A, B]))
    c.tx(QUERIER, ESCROW, ("WeightedSettled", {"queryId": "0x" + QID.hex(), "amounts": (1, 2)}))
    ledger = c.ledger()
    assert len(ledger.problems) == 1 and "weighted" in ledger.problems[0]
    assert ledger.queries[(QUERIER, QID)].paid_wei == 0


def test_the_query_page_shows_the_weighted_payouts() -> None:
    ledger = _weighted_chain().ledger()
    info = ChainInfo(
        chain_id=1,
        escrow=ESCROW,
        registry=None,
        start_block=0,
        claim_grace_s=10,
        min_stake_wei=None,
        unbonding_s=None,
        otterscan=False,
        client="anvil",
    )
    snap = Snapshot(info=info, head=20, head_time=2_000, indexed_to=20, ledger=ledger)
    source = ChainSource(AsyncWeb3(AsyncHTTPProvider("http://127.0.0.1:9")), escrow=ESCROW)
    source.snapshot = snap
    page = pages.query_page(source, snap, ledger.queries[(QUERIER, QID)], {})
    doc = parse(page)
    assert "reward rule" in page
    payouts = {}
    for el in doc.find_all(class_="payout"):
        (amount,) = [n for n in el.walk() if "data-wei" in n.attrs]
        payouts[el.attrs["data-member"]] = int(amount.attrs["data-wei"])
    assert payouts == {A: 170, B: 30, C: 0}
