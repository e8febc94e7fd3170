"""ReceiptStore: a member's receipts and terms in sqlite (pure; no chain)."""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_account import Account

from fi_peer.chain.errors import ChainError, InvalidReceipt
from fi_peer.chain.receipts import PaymentReceipt, ReceiptDomain, sign_receipt
from fi_peer.chain.store import ReceiptState, ReceiptStore
from fi_peer.chain.terms import QueryTerms, checksum

QUERIER = Account.from_key(b"\x01" * 32)
MEMBERS = sorted(
    (Account.from_key(bytes([i]) * 32).address for i in (2, 3, 4)), key=lambda a: int(a, 16)
)
DOMAIN = ReceiptDomain(chain_id=31337, escrow=checksum("0x" + "33" * 20))
PRICE = 2**70  # beyond sqlite's 64-bit integers


def terms(n: int, deadline: int = 1_000) -> QueryTerms:
    return QueryTerms.create(
        query_id=n.to_bytes(16, "big"),
        querier=QUERIER.address,
        committee=MEMBERS,
        price_wei=PRICE,
        deadline=deadline,
    )


def signed(t: QueryTerms, member: str, amount: int = PRICE) -> tuple[PaymentReceipt, bytes]:
    receipt = PaymentReceipt(query_id=t.query_id, member=checksum(member), amount_wei=amount)
    return receipt, sign_receipt(QUERIER, DOMAIN, receipt)


def test_terms_and_receipts_round_trip_and_persist(tmp_path: Path) -> None:
    path = tmp_path / "peer.sqlite"
    store = ReceiptStore(path, DOMAIN)
    t = terms(1)
    store.put_terms(t)
    store.put_terms(t)  # idempotent
    store.put_receipt(*signed(t, MEMBERS[0]))
    store.put_receipt(*signed(t, MEMBERS[0]))  # idempotent
    store.close()

    reopened = ReceiptStore(path, DOMAIN)
    assert reopened.terms(t.query_id) == t
    (held,) = reopened.receipts()
    assert held.terms == t and held.receipt.amount_wei == PRICE
    assert held.state is ReceiptState.PENDING
    # another domain (chain or escrow) sees nothing
    other = ReceiptStore(path, ReceiptDomain(chain_id=1, escrow=DOMAIN.escrow))
    assert other.receipts() == [] and other.terms(t.query_id) is None


def test_claimable_after_the_deadline_until_marked(tmp_path: Path) -> None:
    store = ReceiptStore(":memory:", DOMAIN)
    early, late = terms(1, deadline=100), terms(2, deadline=200)
    for t in (early, late):
        store.put_terms(t)
        store.put_receipt(*signed(t, MEMBERS[1]))
    assert store.claimable(chain_time=100) == []
    assert [r.terms for r in store.claimable(chain_time=101)] == [early]
    assert len(store.claimable(chain_time=201)) == 2
    store.mark(early.query_id, MEMBERS[1], ReceiptState.CLAIMED)
    assert [r.terms for r in store.claimable(chain_time=201)] == [late]
    assert [r.state for r in store.receipts(state=ReceiptState.CLAIMED)] == [ReceiptState.CLAIMED]


def test_bad_receipts_are_refused() -> None:
    store = ReceiptStore(":memory:", DOMAIN)
    t = terms(1)
    with pytest.raises(ChainError, match="no terms"):
        store.put_receipt(*signed(t, MEMBERS[0]))
    store.put_terms(t)
    with pytest.raises(ChainError, match="other terms"):
        store.put_terms(terms(1, deadline=5))
    receipt, _ = signed(t, MEMBERS[0])
    forged = sign_receipt(Account.from_key(b"\x09" * 32), DOMAIN, receipt)
    with pytest.raises(InvalidReceipt):
        store.put_receipt(receipt, forged)
    with pytest.raises(InvalidReceipt, match="not in the query's committee"):
        store.put_receipt(*signed(t, QUERIER.address))
    with pytest.raises(InvalidReceipt, match="exceeds"):
        store.put_receipt(*signed(t, MEMBERS[0], PRICE + 1))
    assert store.receipts() == []
