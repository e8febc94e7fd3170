"""The explorer's view of one chain: the event index, transactions, live reads.

Theory of operation. :meth:`ChainSource.refresh` (at most every
``min_interval_s``, one at a time) connects if needed, lets the
:class:`~fi_peer.chain.indexer.EventIndexer` catch up with the chain head,
reads what the events do not carry (each transaction's sender, gas and input;
block times) into caches, and folds everything into a new
:class:`~fi_peer.explorer.ledger.Ledger` held in an immutable :class:`Snapshot`.
Pages render from the latest snapshot; only a few live values (escrow
balances, a block or transaction opened by hash) are read per request.

On a node that speaks Otterscan's ``ots_*`` API (anvil does) the source also
finds the contracts' creation transaction (where indexing starts) and every
transaction to them, reverted ones included, with their receipts in one call;
and it decodes a reverted transaction's error. Elsewhere it falls back to
the transactions that emitted events and to ``--from-block``.

If the chain changes under the caches (a reorg, a restarted dev chain) the
caches are dropped and rebuilt; the indexer rewinds on its own. Every RPC
failure becomes :class:`~fi_peer.chain.errors.ChainUnavailable`; the last
good snapshot stays available, so pages can say the chain is down and still
show what was known.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import ClientError
from hexbytes import HexBytes
from web3 import AsyncWeb3
from web3.exceptions import BlockNotFound, TransactionNotFound, Web3Exception

from fi_peer.chain.abi import ContractCodec, DecodedEvent
from fi_peer.chain.artifacts import load_artifact
from fi_peer.chain.client import ESCROW, REGISTRY
from fi_peer.chain.errors import ChainError, ChainUnavailable, ContractRevert
from fi_peer.chain.indexer import EventIndexer
from fi_peer.chain.terms import checksum
from fi_peer.explorer.calls import Call, CallCodec
from fi_peer.explorer.ledger import Ledger, TxInfo, build_ledger

log = logging.getLogger(__name__)

T = TypeVar("T")

_OTS_PAGE = 200
_OTS_MAX_PAGES = 50  # per refresh; the rest comes with the next one
_PARALLEL_READS = 8


class ExplorerConfigError(ChainError):
    """The chain answers, but the addresses given are not our contracts."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainInfo:
    chain_id: int
    escrow: str
    registry: str | None
    start_block: int
    claim_grace_s: int
    min_stake_wei: int | None
    unbonding_s: int | None
    otterscan: bool
    client: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    info: ChainInfo
    head: int
    head_time: int
    indexed_to: int
    ledger: Ledger


@dataclass(frozen=True, slots=True, kw_only=True)
class LogView:
    index: int
    address: str
    event: DecodedEvent | None  # None: not one of our contracts' events
    topics: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TxDetail:
    hash: bytes
    sender: str
    to: str | None
    value: int
    nonce: int
    input: bytes
    block_number: int | None  # None: pending
    index: int | None
    status: bool | None
    gas_limit: int
    gas_used: int | None
    gas_price: int | None
    contract_address: str | None
    timestamp: int | None
    call: Call | None
    logs: tuple[LogView, ...]
    revert: ContractRevert | None
    ours: bool  # to (or creating) one of the explorer's contracts


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockDetail:
    number: int
    hash: bytes
    parent_hash: bytes
    timestamp: int
    miner: str
    gas_used: int
    gas_limit: int
    base_fee: int | None
    transactions: tuple[bytes, ...]


class ChainSource:
    """See the module docstring. ``w3`` is owned by the caller."""

    def __init__(
        self,
        w3: AsyncWeb3[Any],
        *,
        escrow: str,
        registry: str | None = None,
        index_path: Path | str = ":memory:",
        start_block: int | None = None,
        min_interval_s: float = 0.5,
    ) -> None:
        self.w3 = w3
        self.escrow = checksum(escrow)
        self.registry = checksum(registry) if registry else None
        self._index_path = index_path
        self._start_block = start_block
        self._min_interval = min_interval_s
        escrow_art, registry_art = load_artifact(ESCROW), load_artifact(REGISTRY)
        self.codec = ContractCodec([escrow_art, registry_art])
        self.calls = CallCodec([escrow_art, registry_art])
        self._escrow = w3.eth.contract(address=self.escrow, abi=escrow_art.abi_list())
        self._registry = (
            None
            if self.registry is None
            else w3.eth.contract(address=self.registry, abi=registry_art.abi_list())
        )
        self.info: ChainInfo | None = None
        self._indexer: EventIndexer | None = None
        self._lock = asyncio.Lock()
        self._last_attempt = float("-inf")
        self.snapshot: Snapshot | None = None
        self.error: ChainError | None = None  # of the last refresh (None: it worked)
        self._txs: dict[bytes, TxInfo] = {}
        self._blocks: dict[int, tuple[bytes, int]] = {}  # number -> (hash, timestamp)
        self._ots_cursor: dict[str, int] = {}

    @property
    def contracts(self) -> tuple[str, ...]:
        return (self.escrow,) if self.registry is None else (self.escrow, self.registry)

    def close(self) -> None:
        if self._indexer is not None:
            self._indexer.close()
            self._indexer = None

    # ── refresh ──────────────────────────────────────────────────────────────

    async def refresh(self, *, force: bool = False) -> Snapshot | None:
        """Catch up with the chain (unless done less than ``min_interval_s`` ago)
        and return the latest snapshot. Never raises ChainUnavailable: it is kept
        in :attr:`error` and the previous snapshot stays. Raises
        :class:`ExplorerConfigError` if the addresses are not our contracts."""
        async with self._lock:
            if isinstance(self.error, ExplorerConfigError):
                raise self.error  # wrong addresses do not fix themselves
            if not force and time.monotonic() - self._last_attempt < self._min_interval:
                return self.snapshot
            self._last_attempt = time.monotonic()
            try:
                self.snapshot = await self._refresh()
                self.error = None
            except ExplorerConfigError as exc:
                self.error = exc
                raise
            except (ChainUnavailable, Web3Exception, OSError, ClientError) as exc:
                # (the indexer lets a few aiohttp errors through untranslated)
                error = exc if isinstance(exc, ChainUnavailable) else ChainUnavailable(str(exc))
                if self.error is None:
                    log.warning("chain unavailable: %s", error)
                self.error = error
            except ChainError as exc:
                log.warning("refresh failed: %s", exc)
                self.error = exc
            return self.snapshot

    async def _refresh(self) -> Snapshot:
        if self.info is None:
            self.info = await self._connect()
        info = self.info
        indexer = self._indexer
        assert indexer is not None
        await indexer.sync()
        head_block = await _rpc(self.w3.eth.get_block("latest"))
        head = int(head_block["number"])
        await self._drop_caches_if_forked(head)
        self._blocks[head] = (bytes(head_block["hash"]), int(head_block["timestamp"]))
        if info.otterscan:
            for contract in self.contracts:
                await self._discover(contract, info.start_block)
        events = indexer.events()
        await self._fill_txs({e.tx_hash for e in events})
        numbers = {e.block_number for e in events} | {t.block_number for t in self._txs.values()}
        await self._fill_blocks(numbers)
        timestamps = {n: ts for n, (_, ts) in self._blocks.items()}
        txs = {
            h: replace(t, timestamp=timestamps.get(t.block_number))
            for h, t in self._txs.items()
            if t.block_number <= head
        }
        ledger = build_ledger(
            events,
            txs,
            escrow=self.escrow,
            registry=self.registry,
            timestamps=timestamps,
            function_names=self.calls.names(),
        )
        return Snapshot(
            info=info,
            head=head,
            head_time=int(head_block["timestamp"]),
            indexed_to=indexer.next_block - 1,
            ledger=ledger,
        )

    async def _connect(self) -> ChainInfo:
        chain_id = int(await _rpc(self.w3.eth.chain_id))
        client = str(await _rpc(self.w3.client_version))
        for address, name in ((self.escrow, ESCROW), (self.registry, REGISTRY)):
            if address is not None and not await _rpc(self.w3.eth.get_code(address)):
                raise ExplorerConfigError(
                    f"no contract at {address} on chain {chain_id}: is it the {name} address?"
                )
        try:
            grace = int(await self._escrow.functions.claimGrace().call())
        except (Web3Exception, ValueError) as exc:
            raise ExplorerConfigError(f"{self.escrow} is not a {ESCROW}: {exc}") from exc
        min_stake = unbonding = None
        if self._registry is not None:
            try:
                min_stake = int(await self._registry.functions.minStake().call())
                unbonding = int(await self._registry.functions.unbondingPeriod().call())
            except (Web3Exception, ValueError) as exc:
                raise ExplorerConfigError(f"{self.registry} is not a {REGISTRY}: {exc}") from exc
        otterscan = await self._ots("ots_getApiLevel", []) is not None
        start = self._start_block
        if start is None:
            start = await self._creation_block() if otterscan else None
            start = 0 if start is None else start
        self._indexer = EventIndexer(
            self.w3,
            self._index_path,
            chain_id=chain_id,
            contracts=list(self.contracts),
            codec=self.codec,
            start_block=start,
        )
        log.info("explorer on chain %s from block %s (otterscan: %s)", chain_id, start, otterscan)
        return ChainInfo(
            chain_id=chain_id,
            escrow=self.escrow,
            registry=self.registry,
            start_block=start,
            claim_grace_s=grace,
            min_stake_wei=min_stake,
            unbonding_s=unbonding,
            otterscan=otterscan,
            client=client,
        )

    async def _creation_block(self) -> int | None:
        """The earliest creation block of our contracts (Otterscan), else None."""
        blocks = []
        for contract in self.contracts:
            found = await self._ots("ots_getContractCreator", [contract])
            if not found:
                return None
            tx = await _rpc(self.w3.eth.get_transaction(HexBytes(found["hash"])))
            blocks.append(int(tx["blockNumber"]))
        return min(blocks)

    async def _ots(self, method: str, params: list[Any]) -> Any:
        """An Otterscan call; None if the node does not have it."""
        try:
            response = await self.w3.provider.make_request(method, params)
        except (Web3Exception, ValueError):
            return None
        except (OSError, ClientError, TimeoutError) as exc:
            raise ChainUnavailable(f"{method}: {exc}") from exc
        if "error" in response:
            return None
        return response.get("result")

    async def _discover(self, contract: str, start: int) -> None:
        """Every transaction to ``contract`` since the last call (reverted ones too)."""
        cursor = self._ots_cursor.get(contract, start - 1)
        for _ in range(_OTS_MAX_PAGES):
            page = await self._ots("ots_searchTransactionsAfter", [contract, cursor, _OTS_PAGE])
            if not page or not page.get("txs"):
                break
            receipts = {r["transactionHash"]: r for r in page.get("receipts", [])}
            top = cursor
            for tx in page["txs"]:
                receipt = receipts.get(tx["hash"])
                if receipt is not None:
                    info = _tx_info(tx, receipt)
                    self._txs[info.hash] = info
                    top = max(top, info.block_number)
            # A full page may end inside a block: read that block again next time.
            full = len(page["txs"]) >= _OTS_PAGE and top - 1 > cursor
            cursor = top - 1 if full else top
            if page.get("firstPage") or not full:
                break
        self._ots_cursor[contract] = cursor

    async def _fill_txs(self, hashes: Iterable[bytes]) -> None:
        missing = [h for h in hashes if h not in self._txs]
        if not missing:
            return

        async def one(tx_hash: bytes) -> TxInfo:
            tx, receipt = await asyncio.gather(
                _rpc(self.w3.eth.get_transaction(HexBytes(tx_hash))),
                _rpc(self.w3.eth.get_transaction_receipt(HexBytes(tx_hash))),
            )
            return _tx_info(tx, receipt)

        for info in await _bounded([one(h) for h in missing]):
            self._txs[info.hash] = info

    async def _fill_blocks(self, numbers: Iterable[int]) -> None:
        missing = sorted(n for n in numbers if n not in self._blocks)

        async def one(number: int) -> tuple[int, bytes, int]:
            block = await _rpc(self.w3.eth.get_block(number))
            return number, bytes(block["hash"]), int(block["timestamp"])

        for number, block_hash, timestamp in await _bounded([one(n) for n in missing]):
            self._blocks[number] = (block_hash, timestamp)

    async def _drop_caches_if_forked(self, head: int) -> None:
        """If the chain no longer has the last block we cached (a reorg, a dev
        chain reverted or restarted), forget every cached transaction and block
        (the indexer rewinds by itself)."""
        if not self._blocks:
            return
        last = max(self._blocks)
        if last <= head:
            block = await _rpc(self.w3.eth.get_block(last))
            if bytes(block["hash"]) == self._blocks[last][0]:
                return
        log.warning("chain changed under the explorer's caches; reloading them")
        self._txs.clear()
        self._blocks.clear()
        self._ots_cursor.clear()

    # ── live reads for pages ─────────────────────────────────────────────────

    async def balances(self, accounts: Sequence[str]) -> dict[str, int]:
        """Escrow ``balanceOf`` per account (eth_call)."""

        async def one(account: str) -> int:
            return int(await _rpc(self._escrow.functions.balanceOf(account).call()))

        values = await _bounded([one(a) for a in accounts])
        return dict(zip(accounts, values, strict=True))

    async def eth_balance(self, account: str) -> int:
        return int(await _rpc(self.w3.eth.get_balance(checksum(account))))

    async def block(self, number: int) -> BlockDetail | None:
        try:
            block = await _rpc(self.w3.eth.get_block(number))
        except ChainUnavailable as exc:
            if isinstance(exc.__cause__, BlockNotFound):
                return None
            raise
        if block is None:
            return None
        base_fee = block.get("baseFeePerGas")
        return BlockDetail(
            number=int(block["number"]),
            hash=bytes(block["hash"]),
            parent_hash=bytes(block["parentHash"]),
            timestamp=int(block["timestamp"]),
            miner=str(block.get("miner", "")),
            gas_used=int(block["gasUsed"]),
            gas_limit=int(block["gasLimit"]),
            base_fee=None if base_fee is None else int(base_fee),
            transactions=tuple(bytes(HexBytes(h)) for h in block["transactions"]),  # type: ignore[arg-type]
        )

    async def transaction(self, tx_hash: bytes) -> TxDetail | None:
        """A transaction by hash, decoded (None: the node does not know it)."""
        try:
            tx = await _rpc(self.w3.eth.get_transaction(HexBytes(tx_hash)))
        except ChainUnavailable as exc:
            if isinstance(exc.__cause__, TransactionNotFound):
                return None
            raise
        receipt = None
        if tx.get("blockNumber") is not None:
            receipt = await _rpc(self.w3.eth.get_transaction_receipt(HexBytes(tx_hash)))
        to = None if tx.get("to") is None else checksum(str(tx["to"]))
        data = bytes(tx["input"])
        created = None if receipt is None else receipt.get("contractAddress")
        created = None if created is None else checksum(str(created))
        ours = to in self.contracts or created in self.contracts
        call = None
        if ours:
            call = self.calls.decode(data) if to is not None else self.calls.decode_deployment(data)
        logs: list[LogView] = []
        status = None
        revert = None
        timestamp = None
        if receipt is not None:
            status = bool(receipt["status"])
            for raw in receipt["logs"]:
                address = checksum(str(raw["address"]))
                event = self.codec.decode_log(raw) if address in self.contracts else None
                logs.append(
                    LogView(
                        index=int(raw["logIndex"]),
                        address=address,
                        event=event,
                        topics=len(raw["topics"]),
                    )
                )
            if not status and ours:
                data_hex = await self._ots(
                    "ots_getTransactionError", [HexBytes(tx_hash).to_0x_hex()]
                )
                if isinstance(data_hex, str) and len(data_hex) > 2:
                    revert = self.codec.revert(bytes.fromhex(data_hex[2:]))
            block = await self.block(int(receipt["blockNumber"]))
            timestamp = None if block is None else block.timestamp
        return TxDetail(
            hash=bytes(HexBytes(tx["hash"])),
            sender=checksum(str(tx["from"])),
            to=to,
            value=int(tx["value"]),
            nonce=int(tx["nonce"]),
            input=data,
            block_number=None if receipt is None else int(receipt["blockNumber"]),
            index=None if receipt is None else int(receipt["transactionIndex"]),
            status=status,
            gas_limit=int(tx["gas"]),
            gas_used=None if receipt is None else int(receipt["gasUsed"]),
            gas_price=None if receipt is None else int(receipt["effectiveGasPrice"]),
            contract_address=created,
            timestamp=timestamp,
            call=call,
            logs=tuple(logs),
            revert=revert,
            ours=ours,
        )


def _int(value: Any) -> int:
    """A JSON-RPC quantity (``0x..``) or an int, as int."""
    if isinstance(value, str):
        return int(value, 16)
    return int(value)


def _tx_info(tx: Any, receipt: Any) -> TxInfo:
    """TxInfo from a transaction and its receipt, raw JSON or web3's AttributeDicts."""
    to = tx.get("to")
    created = receipt.get("contractAddress")
    data = tx["input"]
    return TxInfo(
        hash=bytes(HexBytes(tx["hash"])),
        block_number=_int(receipt["blockNumber"]),
        index=_int(receipt["transactionIndex"]),
        sender=checksum(str(tx["from"])),
        to=None if to is None else checksum(str(to)),
        status=_int(receipt["status"]) == 1,
        gas_used=_int(receipt["gasUsed"]),
        gas_price=_int(receipt["effectiveGasPrice"]),
        value=_int(tx["value"]),
        input=bytes(HexBytes(data)),
        contract_address=None if created is None else checksum(str(created)),
    )


async def _rpc(awaitable: Awaitable[T]) -> T:
    try:
        return await awaitable
    except (Web3Exception, OSError, ClientError, TimeoutError, ValueError) as exc:
        raise ChainUnavailable(f"RPC failed: {exc or type(exc).__name__}") from exc


async def _bounded(coros: Sequence[Awaitable[T]]) -> list[T]:
    """Await ``coros`` with at most a few in flight (a remote RPC rate-limits); on
    the first failure the rest are cancelled and that failure is raised."""
    gate = asyncio.Semaphore(_PARALLEL_READS)

    async def run(coro: Awaitable[T]) -> T:
        async with gate:
            return await coro

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(run(c)) for c in coros]
    except BaseExceptionGroup as failed:
        first: BaseException = failed
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return [t.result() for t in tasks]
