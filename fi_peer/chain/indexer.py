"""An idempotent event indexer for the escrow and registry, in sqlite.

Theory of operation. :meth:`EventIndexer.sync` reads our contracts' logs from
the block after the last one it indexed up to the chain head, in bounded
chunks, decodes them and stores each one under its key (chain id, tx hash,
log index) with ``INSERT OR IGNORE``, moving its cursor forward in the same
sqlite transaction. So a crash between two chunks loses nothing, and indexing
a block twice (a restart, an overlapping run) stores nothing twice.

The cursor remembers the hash of its last block. Before each sync the indexer
checks that block on the chain: after an anvil restart with ``--state`` it is
the same and indexing resumes where it stopped; if it differs (a reorg, or a
chain started afresh), the indexer walks back over the blocks it remembers to
the last one the chain still has, deletes what it stored after it, and
re-indexes from there.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from web3 import AsyncWeb3
from web3.exceptions import Web3Exception

from fi_peer.chain.abi import ContractCodec, DecodedEvent
from fi_peer.chain.client import Deployment, default_codec
from fi_peer.chain.errors import ChainUnavailable
from fi_peer.chain.sqlite import SqliteStore
from fi_peer.chain.terms import checksum

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chain_cursor (
    chain_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    next_block INTEGER NOT NULL,
    PRIMARY KEY (chain_id, name)
);
CREATE TABLE IF NOT EXISTS chain_blocks (
    chain_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    number INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (chain_id, name, number)
);
CREATE TABLE IF NOT EXISTS chain_events (
    chain_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    tx_hash BLOB NOT NULL,
    log_index INTEGER NOT NULL,
    block_number INTEGER NOT NULL,
    block_hash BLOB NOT NULL,
    contract TEXT NOT NULL,
    event TEXT NOT NULL,
    query_id BLOB,
    account TEXT,
    amount TEXT,
    args TEXT NOT NULL,
    PRIMARY KEY (chain_id, name, tx_hash, log_index)
);
CREATE INDEX IF NOT EXISTS chain_events_query ON chain_events (query_id);
CREATE INDEX IF NOT EXISTS chain_events_account ON chain_events (account, event);
"""

#: Which argument is "the account" and which "the amount" of each event.
_ACCOUNT_ARG = {
    "QueryOpened": "querier",
    "Credited": "member",
    "Claimed": "member",
    "Refunded": "querier",
    "Withdrawn": "account",
    "Registered": "account",
    "KeysUpdated": "account",
    "StakeAdded": "account",
    "Deregistered": "account",
    "StakeWithdrawn": "account",
    "Equivocated": "member",
    "ScorePublished": "member",
}
_AMOUNT_ARG = {
    "QuerySettled": "paid",
    "Credited": "amount",
    "Claimed": "amount",
    "Refunded": "amount",
    "Withdrawn": "amount",
    "Registered": "stake",
    "StakeAdded": "amount",
    "StakeWithdrawn": "amount",
    "Equivocated": "slashed",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexedEvent:
    block_number: int
    tx_hash: bytes
    log_index: int
    contract: str
    event: str
    query_id: bytes | None
    account: str | None
    amount: int | None
    args: dict[str, Any]


def _json_arg(value: Any) -> Any:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, tuple | list):
        return [_json_arg(v) for v in value]
    return value


class EventIndexer(SqliteStore):
    """Indexes the logs of ``contracts`` into a sqlite file (see module docstring)."""

    def __init__(
        self,
        w3: AsyncWeb3[Any],
        db: Path | str,
        *,
        chain_id: int,
        contracts: Sequence[str],
        codec: ContractCodec,
        start_block: int = 0,
        name: str | None = None,
        chunk_blocks: int = 2_000,
        keep_blocks: int = 256,
    ) -> None:
        self._w3 = w3
        self.chain_id = chain_id
        self.contracts = [checksum(a) for a in contracts]
        self._codec = codec
        self._start = start_block
        # One index per set of contracts: a new deployment starts its own cursor.
        self.name = name or ",".join(sorted(self.contracts))
        self._chunk = chunk_blocks
        self._keep = keep_blocks
        super().__init__(db, _SCHEMA, "index")

    @property
    def next_block(self) -> int:
        row = self._db.execute(
            "SELECT next_block FROM chain_cursor WHERE chain_id = ? AND name = ?",
            (self.chain_id, self.name),
        ).fetchone()
        return self._start if row is None else int(row[0])

    async def sync(self) -> int:
        """Index everything up to the chain head; returns how many new events were stored."""
        await self._rewind_if_forked()
        head = int(await self._rpc(self._w3.eth.block_number))
        added = 0
        start = self.next_block
        while start <= head:
            end = min(head, start + self._chunk - 1)
            logs = await self._rpc(
                self._w3.eth.get_logs(
                    {"address": self.contracts, "fromBlock": start, "toBlock": end}
                )
            )
            end_block = await self._rpc(self._w3.eth.get_block(end))
            events = [e for e in (self._codec.decode_log(raw) for raw in logs) if e is not None]
            added += self._store(events, end, bytes(end_block["hash"]))
            start = end + 1
        return added

    def _store(self, events: Iterable[DecodedEvent], end: int, end_hash: bytes) -> int:
        added = 0
        with self._tx() as db:
            for e in events:
                query_id = e.args.get("queryId")
                account = e.args.get(_ACCOUNT_ARG.get(e.name, ""))
                amount = e.args.get(_AMOUNT_ARG.get(e.name, ""))
                if e.name == "QueryOpened":
                    amount = int(e.args["price"]) * len(e.args["committee"])
                cur = db.execute(
                    f"INSERT OR IGNORE INTO chain_events VALUES ({', '.join('?' * 12)})",
                    (
                        self.chain_id,
                        self.name,
                        e.tx_hash,
                        e.log_index,
                        e.block_number,
                        e.block_hash,
                        e.address,
                        e.name,
                        query_id,
                        account,
                        None if amount is None else str(amount),
                        json.dumps({k: _json_arg(v) for k, v in e.args.items()}),
                    ),
                )
                added += cur.rowcount
                self._remember_block(db, e.block_number, e.block_hash)
            self._remember_block(db, end, end_hash)
            db.execute(
                "INSERT INTO chain_cursor VALUES (?, ?, ?)"
                " ON CONFLICT (chain_id, name) DO UPDATE SET next_block = excluded.next_block",
                (self.chain_id, self.name, end + 1),
            )
            db.execute(
                "DELETE FROM chain_blocks WHERE chain_id = ? AND name = ? AND number NOT IN"
                " (SELECT number FROM chain_blocks WHERE chain_id = ? AND name = ?"
                "  ORDER BY number DESC LIMIT ?)",
                (self.chain_id, self.name, self.chain_id, self.name, self._keep),
            )
        return added

    def _remember_block(self, db: sqlite3.Connection, number: int, block_hash: bytes) -> None:
        db.execute(
            "INSERT OR REPLACE INTO chain_blocks VALUES (?, ?, ?, ?)",
            (self.chain_id, self.name, number, block_hash),
        )

    async def _rewind_if_forked(self) -> None:
        known = self._db.execute(
            "SELECT number, hash FROM chain_blocks WHERE chain_id = ? AND name = ?"
            " ORDER BY number DESC",
            (self.chain_id, self.name),
        ).fetchall()
        if not known:
            return
        head = int(await self._rpc(self._w3.eth.block_number))
        keep_from: int | None = None  # first block to re-index
        for number, block_hash in known:
            if number <= head:
                block = await self._rpc(self._w3.eth.get_block(number))
                if bytes(block["hash"]) == bytes(block_hash):
                    keep_from = number + 1
                    break
        if keep_from == known[0][0] + 1:
            return  # the last indexed block is still on the chain
        restart = self._start if keep_from is None else keep_from
        log.warning(
            "chain %s changed at or below block %s; re-indexing from %s",
            self.chain_id,
            known[0][0],
            restart,
        )
        with self._tx() as db:
            db.execute(
                "DELETE FROM chain_events WHERE chain_id = ? AND name = ? AND block_number >= ?",
                (self.chain_id, self.name, restart),
            )
            db.execute(
                "DELETE FROM chain_blocks WHERE chain_id = ? AND name = ? AND number >= ?",
                (self.chain_id, self.name, restart),
            )
            db.execute(
                "INSERT INTO chain_cursor VALUES (?, ?, ?)"
                " ON CONFLICT (chain_id, name) DO UPDATE SET next_block = excluded.next_block",
                (self.chain_id, self.name, restart),
            )

    async def _rpc(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (Web3Exception, OSError) as exc:
            raise ChainUnavailable(f"indexer RPC failed: {exc}") from exc

    # ── queries ──────────────────────────────────────────────────────────────

    def events(
        self,
        *,
        event: str | None = None,
        query_id: bytes | None = None,
        account: str | None = None,
    ) -> list[IndexedEvent]:
        """Stored events in chain order, filtered by name, query id and/or account."""
        sql = (
            "SELECT block_number, tx_hash, log_index, contract, event, query_id, account,"
            " amount, args FROM chain_events WHERE chain_id = ? AND name = ?"
        )
        params: list[Any] = [self.chain_id, self.name]
        for column, value in (("event", event), ("query_id", query_id), ("account", account)):
            if value is not None:
                sql += f" AND {column} = ?"
                if column == "account" and isinstance(value, str):
                    value = checksum(value)
                params.append(value)
        sql += " ORDER BY block_number, log_index"
        return [
            IndexedEvent(
                block_number=row[0],
                tx_hash=bytes(row[1]),
                log_index=row[2],
                contract=row[3],
                event=row[4],
                query_id=None if row[5] is None else bytes(row[5]),
                account=row[6],
                amount=None if row[7] is None else int(row[7]),
                args=json.loads(row[8]),
            )
            for row in self._db.execute(sql, params)
        ]

    def total(self, event: str, account: str | None = None) -> int:
        """Sum of the amounts of ``event`` (for ``account`` if given)."""
        return sum(e.amount or 0 for e in self.events(event=event, account=account))

    def count(self) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM chain_events WHERE chain_id = ? AND name = ?",
            (self.chain_id, self.name),
        ).fetchone()
        return int(row[0])


def indexer_for(w3: AsyncWeb3[Any], db: Path | str, deployment: Deployment) -> EventIndexer:
    """An indexer of a deployment's escrow and registry, from its deploy block."""
    return EventIndexer(
        w3,
        db,
        chain_id=deployment.chain_id,
        contracts=[deployment.escrow, deployment.registry],
        codec=default_codec(),
        start_block=deployment.block,
    )
