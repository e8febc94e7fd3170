"""Send transactions from one account: nonces, gas and fees, safe under asyncio.

Theory of operation. Many queries run concurrently in one daemon and each may
send a transaction (open, settle, claim) from the same account. Two
transactions must never get the same nonce, and a failed send must not leave a
gap. So:

1. gas is estimated *outside* the lock (in parallel); a revert shows up here,
   before anything is signed, and is decoded into :class:`ContractRevert`;
2. under one :class:`asyncio.Lock` the sender takes the next nonce (cached;
   first read from the chain's *pending* count), reads the base fee, signs
   locally and sends the raw transaction; the nonce advances only if the
   node accepted it. Any send error drops the cache (the next send re-reads
   the chain), and a nonce error is retried once with a fresh nonce;
3. the receipt is awaited *outside* the lock, with a timeout, so concurrent
   queries pipeline instead of waiting for each other's blocks.

Transactions are EIP-1559: ``maxFeePerGas = 2 * baseFee + tip``; gas is the
estimate plus a margin (unused gas is not charged). Keys stay local: the node
only ever sees signed raw transactions, so any RPC URL works.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from hexbytes import HexBytes
from web3 import AsyncWeb3
from web3.exceptions import (
    ContractLogicError,
    TransactionIndexingInProgress,
    TransactionNotFound,
    Web3Exception,
)

from fi_peer.chain.abi import ContractCodec, DecodedEvent
from fi_peer.chain.errors import ChainUnavailable, TransactionFailed

log = logging.getLogger(__name__)

GWEI = 10**9


@dataclass(frozen=True, slots=True, kw_only=True)
class GasPolicy:
    """How gas and fees are chosen for every transaction."""

    margin_percent: int = 25
    margin_gas: int = 20_000
    priority_fee_wei: int = 1 * GWEI
    receipt_timeout_s: float = 60.0
    poll_interval_s: float = 0.25


@dataclass(frozen=True, slots=True, kw_only=True)
class TxResult:
    """A mined, successful transaction and our events in it."""

    tx_hash: bytes
    block_number: int
    gas_used: int
    fee_wei: int  # gas_used * effective gas price: what the sender paid
    events: tuple[DecodedEvent, ...]
    contract_address: ChecksumAddress | None = None

    def event(self, name: str) -> DecodedEvent:
        """The first event called ``name`` (KeyError if none)."""
        for e in self.events:
            if e.name == name:
                return e
        raise KeyError(name)

    def all(self, name: str) -> list[DecodedEvent]:
        return [e for e in self.events if e.name == name]


def revert_data(exc: ContractLogicError) -> bytes:
    """The raw revert bytes web3 attached to ``exc`` (empty if none)."""
    data = exc.data
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return b""
    return b""


class TxSender:
    """Signs and sends the transactions of one account (see the module docstring)."""

    def __init__(
        self,
        w3: AsyncWeb3[Any],
        account: LocalAccount,
        codec: ContractCodec,
        policy: GasPolicy | None = None,
    ) -> None:
        self._w3 = w3
        self._account = account
        self._codec = codec
        self.policy = policy or GasPolicy()
        self._lock = asyncio.Lock()
        self._next_nonce: int | None = None
        self._chain_id: int | None = None

    @property
    def address(self) -> ChecksumAddress:
        return self._account.address

    async def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(await _rpc(self._w3.eth.chain_id))
        return self._chain_id

    def forget_nonce(self) -> None:
        """Re-read the nonce from the chain before the next send (after a chain reset)."""
        self._next_nonce = None

    async def send(
        self,
        *,
        to: str | None,
        data: bytes,
        value: int = 0,
        gas: int | None = None,
        extra_gas: int = 0,
    ) -> TxResult:
        """Estimate, sign, send and wait; :class:`ContractRevert` if the call reverts.

        ``extra_gas`` is added to the estimate: for calls whose cost can grow
        between estimation and mining through other accounts' transactions
        (a storage slot written back to zero meanwhile costs 17,100 more to set)."""
        tx: dict[str, Any] = {"from": self.address, "data": data, "value": value}
        if to is not None:
            tx["to"] = to
        if gas is None:
            estimate = await self.read(self._w3.eth.estimate_gas(tx))  # type: ignore[arg-type]
            gas = estimate * (100 + self.policy.margin_percent) // 100 + self.policy.margin_gas
            gas += extra_gas
        tx_hash = await self._submit(tx, gas)
        return await self._wait(tx_hash)

    async def call(self, *, to: str, data: bytes) -> bytes:
        """``eth_call`` with revert decoding."""
        result = await self.read(self._w3.eth.call({"from": self.address, "to": to, "data": data}))
        return bytes(result)

    async def _submit(self, tx: dict[str, Any], gas: int) -> bytes:
        chain_id = await self.chain_id()
        for attempt in (1, 2):
            async with self._lock:
                try:
                    if self._next_nonce is None:
                        self._next_nonce = int(
                            await self._w3.eth.get_transaction_count(self.address, "pending")
                        )
                    nonce = self._next_nonce
                    block = await self._w3.eth.get_block("latest")
                    base_fee = int(block.get("baseFeePerGas", 0) or 0)
                    fields = {
                        **tx,
                        "nonce": nonce,
                        "gas": gas,
                        "chainId": chain_id,
                        "maxPriorityFeePerGas": self.policy.priority_fee_wei,
                        "maxFeePerGas": 2 * base_fee + self.policy.priority_fee_wei,
                        "type": 2,
                    }
                    fields.pop("from", None)
                    signed = self._account.sign_transaction(fields)
                    tx_hash = bytes(await self._w3.eth.send_raw_transaction(signed.raw_transaction))
                except ContractLogicError as exc:
                    self._next_nonce = None
                    raise self._codec.revert(revert_data(exc)) from exc
                except (Web3Exception, OSError, ValueError) as exc:
                    self._next_nonce = None
                    if attempt == 1 and "nonce" in str(exc).lower():
                        log.warning("nonce rejected (%s); retrying with a fresh nonce", exc)
                        continue
                    raise _unavailable_or_failed(exc) from exc
                self._next_nonce = nonce + 1
                return tx_hash
        raise AssertionError("unreachable")

    async def _wait(self, tx_hash: bytes) -> TxResult:
        """Poll for the receipt: at once (automining chains have it), then backing
        off from 2 ms to ``poll_interval_s``, until ``receipt_timeout_s``."""
        delay = 0.002
        try:
            async with asyncio.timeout(self.policy.receipt_timeout_s):
                while True:
                    try:
                        receipt = await self._w3.eth.get_transaction_receipt(HexBytes(tx_hash))
                        break
                    except (TransactionNotFound, TransactionIndexingInProgress):
                        await asyncio.sleep(delay)
                        delay = min(2 * delay, self.policy.poll_interval_s)
        except TimeoutError as exc:
            raise TransactionFailed("no receipt before the timeout", tx_hash) from exc
        except (Web3Exception, OSError) as exc:
            raise _unavailable_or_failed(exc) from exc
        if receipt["status"] != 1:
            raise TransactionFailed(f"reverted when mined (gas used {receipt['gasUsed']})", tx_hash)
        events = tuple(
            e for e in (self._codec.decode_log(raw) for raw in receipt["logs"]) if e is not None
        )
        created = receipt.get("contractAddress")
        return TxResult(
            tx_hash=tx_hash,
            block_number=int(receipt["blockNumber"]),
            gas_used=int(receipt["gasUsed"]),
            fee_wei=int(receipt["gasUsed"]) * int(receipt.get("effectiveGasPrice", 0) or 0),
            events=events,
            contract_address=created if created else None,
        )

    async def read(self, awaitable: Any) -> Any:
        """Await a web3 read, translating its errors (reverts decoded)."""
        try:
            return await awaitable
        except ContractLogicError as exc:
            raise self._codec.revert(revert_data(exc)) from exc
        except (Web3Exception, OSError) as exc:
            raise _unavailable_or_failed(exc) from exc


async def _rpc(awaitable: Any) -> Any:
    try:
        return await awaitable
    except (Web3Exception, OSError) as exc:
        raise _unavailable_or_failed(exc) from exc


def _unavailable_or_failed(exc: BaseException) -> ChainUnavailable | TransactionFailed:
    if isinstance(exc, OSError | asyncio.TimeoutError) or "connect" in str(exc).lower():
        return ChainUnavailable(f"chain RPC unavailable: {exc}")
    return TransactionFailed(f"transaction rejected: {exc}")
