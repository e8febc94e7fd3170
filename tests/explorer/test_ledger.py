"""The ledger folded from events (pure), and pages rendering hostile chain data."""

from __future__ import annotations

from typing import Any

from web3 import AsyncHTTPProvider, AsyncWeb3

from fi_peer.chain.indexer import IndexedEvent
from fi_peer.explorer import pages
from fi_peer.explorer.ledger import QueryState, TxInfo, build_ledger
from fi_peer.explorer.source import ChainInfo, ChainSource, Snapshot
from tests.explorer.dom import parse

ESCROW = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
REGISTRY = "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512"
QUERIER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
OTHER = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
A, B = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC", "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
QID = bytes.fromhex("11" * 16)


class _Chain:
    """Builds events and transactions as the indexer and the source would."""

    def __init__(self) -> None:
        self.events: list[IndexedEvent] = []
        self.txs: dict[bytes, TxInfo] = {}
        self.block = 10

    def tx(self, sender: str, contract: str, *events: tuple[str, dict[str, Any]]) -> bytes:
        self.block += 1
        tx_hash = self.block.to_bytes(32, "big")
        self.txs[tx_hash] = TxInfo(
            hash=tx_hash,
            block_number=self.block,
            index=0,
            sender=sender,
            to=contract,
            status=True,
            gas_used=50_000,
            gas_price=2,
            value=0,
            input=b"\x01\x02\x03\x04",
        )
        for i, (name, args) in enumerate(events):
            qid = args.get("queryId")
            self.events.append(
                IndexedEvent(
                    block_number=self.block,
                    tx_hash=tx_hash,
                    log_index=i,
                    contract=contract,
                    event=name,
                    query_id=None if qid is None else bytes.fromhex(qid[2:]),
                    account=None,
                    amount=None,
                    args=args,
                )
            )
        return tx_hash

    def ledger(self) -> Any:
        return build_ledger(
            self.events, self.txs, escrow=ESCROW, registry=REGISTRY, timestamps={11: 1_000}
        )


def _opened(querier: str, price: int, committee: list[str]) -> tuple[str, dict[str, Any]]:
    args = {
        "queryId": "0x" + QID.hex(),
        "querier": querier,
        "price": price,
        "deadline": 5_000,
        "committee": committee,
    }
    return ("QueryOpened", args)


def test_states_payouts_and_totals() -> None:
    c = _Chain()
    c.tx(QUERIER, ESCROW, _opened(QUERIER, 100, [A, B]))
    c.tx(OTHER, ESCROW, _opened(OTHER, 7, [A]))  # the same id, another querier
    c.tx(
        QUERIER,
        ESCROW,
        ("QuerySettled", {"queryId": "0x" + QID.hex(), "delivered": 0b01, "paid": 100}),
        ("Credited", {"member": A, "amount": 100}),
    )
    ledger = c.ledger()
    mine, other = ledger.queries[(QUERIER, QID)], ledger.queries[(OTHER, QID)]
    assert mine.state is QueryState.HELD and other.state is QueryState.OPEN
    assert {m: p.total for m, p in mine.payouts.items()} == {A: 100, B: 0}
    assert mine.held_wei == 100 and mine.opened.timestamp == 1_000
    c.tx(
        A,
        ESCROW,
        ("Claimed", {"queryId": "0x" + QID.hex(), "member": B, "querier": QUERIER, "amount": 60}),
    )
    c.tx(A, ESCROW, ("Refunded", {"queryId": "0x" + QID.hex(), "querier": QUERIER, "amount": 40}))
    c.tx(A, ESCROW, ("Withdrawn", {"account": A, "amount": 100}))
    ledger = c.ledger()
    mine = ledger.queries[(QUERIER, QID)]
    assert mine.state is QueryState.REFUNDED and mine.held_wei == 0
    assert [s.kind for s in mine.timeline] == ["opened", "settled", "claimed", "refunded"]
    t = ledger.totals
    assert (t.queries_opened, t.queries_settled, t.queries_claimed, t.queries_refunded) == (
        2,
        1,
        1,
        1,
    )
    assert (t.escrowed_wei, t.paid_wei, t.refunded_wei, t.withdrawn_wei) == (207, 160, 40, 100)
    assert t.held_wei == 7 and t.owed_wei == 100
    assert ledger.accounts[A].expected_balance == 0
    assert ledger.accounts[B].expected_balance == 60
    assert ledger.accounts[QUERIER].expected_balance == 40
    assert t.gas_used == 6 * 50_000 and t.fees_wei == 6 * 100_000
    assert ledger.search("1111") == [mine, ledger.queries[(OTHER, QID)]]
    assert ledger.search(OTHER[:10].lower()) == [ledger.queries[(OTHER, QID)]]
    assert ledger.problems == []


def test_events_that_do_not_fit_are_reported_not_fatal() -> None:
    c = _Chain()
    c.tx(
        QUERIER, ESCROW, ("QuerySettled", {"queryId": "0x" + QID.hex(), "delivered": 1, "paid": 1})
    )
    c.tx(QUERIER, ESCROW, _opened(QUERIER, 1, [A]), _opened(QUERIER, 1, [A]))
    c.tx(A, REGISTRY, ("StakeAdded", {"account": A, "amount": 1, "stake": 1}))
    problems = c.ledger().problems
    assert len(problems) == 3
    assert "unknown query" in problems[0] and "twice" in problems[1]


def test_registry_lifecycle() -> None:
    c = _Chain()
    ed, x = b"\x01" * 32, b"\x02" * 32
    c.tx(
        A,
        REGISTRY,
        (
            "Registered",
            {"account": A, "ed25519": "0x" + ed.hex(), "x25519": "0x" + x.hex(), "stake": 10},
        ),
    )
    c.tx(A, REGISTRY, ("StakeAdded", {"account": A, "amount": 5, "stake": 15}))
    ledger = c.ledger()
    reg = ledger.accounts[A].registration
    assert reg is not None and reg.ed25519 == ed and reg.stake == 15 and reg.registered
    assert ledger.totals.stake_wei == 15 and ledger.totals.peers_registered == 1
    c.tx(
        A,
        REGISTRY,
        ("Deregistered", {"account": A, "ed25519": "0x" + ed.hex(), "unbondingEnds": 99}),
    )
    c.tx(A, REGISTRY, ("StakeWithdrawn", {"account": A, "amount": 15}))
    ledger = c.ledger()
    reg = ledger.accounts[A].registration
    assert reg is not None and not reg.registered and reg.stake == 0
    assert ledger.totals.peers_registered == 0


def test_hostile_chain_data_is_escaped_on_every_page() -> None:
    """Strings an attacker controls (a node's client version, anything a future
    event might carry) never reach a page as markup."""
    evil = '<img src=x onerror="alert(1)">'
    c = _Chain()
    c.tx(QUERIER, ESCROW, _opened(evil, 100, [evil, B]))
    c.tx(
        evil,
        ESCROW,
        ("QuerySettled", {"queryId": "0x" + QID.hex(), "delivered": 0b11, "paid": 200}),
        ("Credited", {"member": evil, "amount": 100}),
    )
    ledger = c.ledger()
    info = ChainInfo(
        chain_id=1,
        escrow=ESCROW,
        registry=None,
        start_block=0,
        claim_grace_s=10,
        min_stake_wei=None,
        unbonding_s=None,
        otterscan=False,
        client=evil,
    )
    snap = Snapshot(info=info, head=20, head_time=2_000, indexed_to=20, ledger=ledger)
    source = ChainSource(AsyncWeb3(AsyncHTTPProvider("http://127.0.0.1:9")), escrow=ESCROW)
    source.snapshot = snap
    query = ledger.queries[(evil, QID)]
    rendered = [
        pages.overview(source, snap, 0),
        pages.queries_page(source, snap, search=evil, state="", page=1),
        pages.query_page(source, snap, query, {evil: 5}),
        pages.peers_page(source, snap, {evil: 5}),
        pages.peer_page(source, snap, ledger.accounts[evil], 5, 5),
    ]
    for page in rendered:
        assert "<img" not in page and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
        parse(page)  # still well-formed
