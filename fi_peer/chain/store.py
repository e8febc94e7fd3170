"""Payment receipts a member holds, with the terms of their queries, in sqlite.

A member keeps every receipt the querier signed for its shares, with the
query's terms (from the Accept message), until the query is paid: by the
querier's settlement, or by the member's own claim when the querier did not
settle in time. :meth:`ReceiptStore.claimable` lists what is due for a claim.
The store lives in the peer's sqlite file (tables prefixed ``chain_``) and is
scoped to one (chain id, escrow) domain. Amounts are stored as decimal text
(sqlite integers stop at 2**63). Synchronous: each operation is one short
local transaction.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path

from fi_peer.chain.errors import ChainError, InvalidReceipt
from fi_peer.chain.receipts import PaymentReceipt, ReceiptDomain, verify_receipt
from fi_peer.chain.sqlite import SqliteStore
from fi_peer.chain.terms import QueryTerms, checksum

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chain_terms (
    chain_id INTEGER NOT NULL,
    escrow TEXT NOT NULL,
    query_id BLOB NOT NULL,
    querier TEXT NOT NULL,
    committee TEXT NOT NULL,
    price_wei TEXT NOT NULL,
    deadline INTEGER NOT NULL,
    PRIMARY KEY (chain_id, escrow, query_id)
);
CREATE TABLE IF NOT EXISTS chain_receipts (
    chain_id INTEGER NOT NULL,
    escrow TEXT NOT NULL,
    query_id BLOB NOT NULL,
    member TEXT NOT NULL,
    amount_wei TEXT NOT NULL,
    signature BLOB NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (chain_id, escrow, query_id, member)
);
"""


class ReceiptState(enum.Enum):
    PENDING = "pending"  # held, not paid yet
    PAID = "paid"  # credited by the querier's settlement
    CLAIMED = "claimed"  # paid by our claim
    LOST = "lost"  # the query closed without paying it


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredReceipt:
    terms: QueryTerms
    receipt: PaymentReceipt
    signature: bytes
    state: ReceiptState


class ReceiptStore(SqliteStore):
    """Receipts and terms for one escrow, in a sqlite file (or ``":memory:"``)."""

    def __init__(self, path: Path | str, domain: ReceiptDomain) -> None:
        self.domain = domain
        super().__init__(path, _SCHEMA, "receipt store")

    @property
    def _scope(self) -> tuple[int, str]:
        return (self.domain.chain_id, self.domain.escrow)

    def put_terms(self, terms: QueryTerms) -> None:
        """Remember a query's terms (idempotent; differing terms for an id are refused)."""
        existing = self.terms(terms.query_id)
        if existing is not None:
            if existing != terms:
                raise ChainError(f"other terms already stored for query 0x{terms.query_id.hex()}")
            return
        with self._tx() as db:
            db.execute(
                "INSERT INTO chain_terms VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    *self._scope,
                    terms.query_id,
                    terms.querier,
                    json.dumps(list(terms.committee)),
                    str(terms.price_wei),
                    terms.deadline,
                ),
            )

    def terms(self, query_id: bytes) -> QueryTerms | None:
        row = self._db.execute(
            "SELECT querier, committee, price_wei, deadline FROM chain_terms"
            " WHERE chain_id = ? AND escrow = ? AND query_id = ?",
            (*self._scope, query_id),
        ).fetchone()
        if row is None:
            return None
        return QueryTerms(
            query_id=query_id,
            querier=checksum(row[0]),
            committee=tuple(checksum(a) for a in json.loads(row[1])),
            price_wei=int(row[2]),
            deadline=int(row[3]),
        )

    def put_receipt(self, receipt: PaymentReceipt, signature: bytes) -> None:
        """Store a receipt after checking it against the stored terms: the querier
        signed it, the member is in the committee, the amount is at most the price.
        Idempotent for the same receipt."""
        terms = self.terms(receipt.query_id)
        if terms is None:
            raise ChainError(f"no terms stored for query 0x{receipt.query_id.hex()}")
        if receipt.member not in terms.committee:
            raise InvalidReceipt(f"{receipt.member} is not in the query's committee")
        if receipt.amount_wei > terms.price_wei:
            raise InvalidReceipt("receipt amount exceeds the price per share")
        verify_receipt(self.domain, receipt, signature, terms.querier)
        with self._tx() as db:
            db.execute(
                "INSERT INTO chain_receipts VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (
                    *self._scope,
                    receipt.query_id,
                    receipt.member,
                    str(receipt.amount_wei),
                    signature,
                    ReceiptState.PENDING.value,
                ),
            )

    def mark(self, query_id: bytes, member: str, state: ReceiptState) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE chain_receipts SET state = ?"
                " WHERE chain_id = ? AND escrow = ? AND query_id = ? AND member = ?",
                (state.value, *self._scope, query_id, checksum(member)),
            )

    def receipts(
        self, *, state: ReceiptState | None = None, deadline_before: int | None = None
    ) -> list[StoredReceipt]:
        """``deadline_before``: only receipts of queries whose deadline is earlier
        (filtered in SQL: a member polls this every claim round, and decoding every
        pending receipt each time cost a busy member ~40 % of its event loop)."""
        sql = (
            "SELECT query_id, member, amount_wei, signature, state FROM chain_receipts r"
            " WHERE chain_id = ? AND escrow = ?"
        )
        params: tuple[object, ...] = self._scope
        if state is not None:
            sql += " AND state = ?"
            params = (*params, state.value)
        if deadline_before is not None:
            sql += (
                " AND EXISTS (SELECT 1 FROM chain_terms t WHERE t.chain_id = r.chain_id"
                " AND t.escrow = r.escrow AND t.query_id = r.query_id AND t.deadline < ?)"
            )
            params = (*params, deadline_before)
        out: list[StoredReceipt] = []
        for query_id, member, amount, signature, st in self._db.execute(
            sql + " ORDER BY rowid", params
        ):
            terms = self.terms(bytes(query_id))
            assert terms is not None  # put_receipt requires the terms
            out.append(
                StoredReceipt(
                    terms=terms,
                    receipt=PaymentReceipt(
                        query_id=bytes(query_id), member=checksum(member), amount_wei=int(amount)
                    ),
                    signature=bytes(signature),
                    state=ReceiptState(st),
                )
            )
        return out

    def claimable(self, chain_time: int) -> list[StoredReceipt]:
        """Pending receipts whose query's settlement deadline has passed: by then
        the querier settled (the claim then pays a share left out, or reverts
        ``AlreadyPaid``: mark it PAID) or it did not (the claim pays it)."""
        return self.receipts(state=ReceiptState.PENDING, deadline_before=chain_time)
