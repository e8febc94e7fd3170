"""The chain client: one account's view of the escrow and the registry.

**Async**, because its only caller is the asyncio daemon: every call waits on
the network (RPC round trips, blocks that take seconds on a real chain), and
waiting must not stall the agent's other queries. Concurrent calls on one
client are safe: :class:`~fi_peer.chain.txsender.TxSender` serialises nonce
assignment and nothing else, so transactions pipeline. Scripts without a loop
use ``asyncio.run``.

Every method speaks our types (:class:`QueryTerms`, :class:`PaymentReceipt`,
addresses as checksummed strings, amounts in wei) and raises only
:class:`~fi_peer.chain.errors.ChainError` subclasses; reverts come back as
:class:`~fi_peer.chain.errors.ContractRevert` with the Solidity error's name.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientTimeout
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from hexbytes import HexBytes
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.contract import AsyncContract

from fi_peer.chain.abi import ContractCodec
from fi_peer.chain.artifacts import Artifact, load_artifact
from fi_peer.chain.commitments import CommitmentStatement, RegistryDomain, sign_commitment
from fi_peer.chain.errors import ChainError, ChainUnavailable
from fi_peer.chain.receipts import PaymentReceipt, ReceiptDomain, sign_receipt
from fi_peer.chain.terms import (
    CLOSED_STATE,
    QueryTerms,
    Settlement,
    WeightedSettlement,
    checksum,
    encode_batch,
)
from fi_peer.chain.txsender import GasPolicy, TxResult, TxSender

ESCROW = "QueryEscrow"
REGISTRY = "PeerRegistry"
# Gas a settlement may need per credited member beyond its estimate: the estimate
# prices each balance write at its current value, and a member that withdraws
# (balance back to 0) before the settlement is mined makes that write cost 22,100
# instead of 5,000 gas; unused gas is not charged.
CREDIT_GAS_SLACK = 20_000


def default_codec() -> ContractCodec:
    return ContractCodec([load_artifact(ESCROW), load_artifact(REGISTRY)])


class QueryStatus(enum.Enum):
    """Where a query stands on chain, as seen with its terms."""

    UNKNOWN = "unknown"  # never opened
    OPEN = "open"  # escrowed, not settled
    HELD = "held"  # settled; the undelivered shares are held for claims
    CLOSED = "closed"  # settled with all delivered, or refunded
    MISMATCH = "mismatch"  # opened, but not with these terms (or settled otherwise)


@dataclass(frozen=True, slots=True, kw_only=True)
class Deployment:
    """Where the contracts live on one chain."""

    chain_id: int
    escrow: ChecksumAddress
    registry: ChecksumAddress
    block: int
    claim_grace_s: int
    min_stake_wei: int
    unbonding_s: int

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Deployment:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                chain_id=int(doc["chain_id"]),
                escrow=checksum(doc["escrow"]),
                registry=checksum(doc["registry"]),
                block=int(doc["block"]),
                claim_grace_s=int(doc["claim_grace_s"]),
                min_stake_wei=int(doc["min_stake_wei"]),
                unbonding_s=int(doc["unbonding_s"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ChainError(f"cannot read deployment {path}: {exc}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerRecord:
    """A registry entry (zero keys: not registered)."""

    ed25519: bytes
    x25519: bytes
    stake_wei: int
    unbonding_ends: int

    @property
    def registered(self) -> bool:
        return self.ed25519 != bytes(32)


async def deploy_contracts(
    w3: AsyncWeb3[Any],
    account: LocalAccount,
    *,
    claim_grace_s: int = 3600,
    min_stake_wei: int = 0,
    unbonding_s: int = 86_400,
    policy: GasPolicy | None = None,
) -> Deployment:
    """Deploy QueryEscrow and PeerRegistry from ``account``."""
    escrow_art, registry_art = load_artifact(ESCROW), load_artifact(REGISTRY)
    sender = TxSender(w3, account, ContractCodec([escrow_art, registry_art]), policy)
    escrow = await _deploy(w3, sender, escrow_art, [claim_grace_s])
    registry = await _deploy(w3, sender, registry_art, [min_stake_wei, unbonding_s])
    assert escrow.contract_address is not None and registry.contract_address is not None
    return Deployment(
        chain_id=await sender.chain_id(),
        escrow=escrow.contract_address,
        registry=registry.contract_address,
        block=escrow.block_number,
        claim_grace_s=claim_grace_s,
        min_stake_wei=min_stake_wei,
        unbonding_s=unbonding_s,
    )


async def deploy_artifact(
    w3: AsyncWeb3[Any], account: LocalAccount, artifact: Artifact, args: Sequence[Any] = ()
) -> TxResult:
    """Deploy any artifact (test fixtures such as ReentrantReceiver)."""
    sender = TxSender(w3, account, ContractCodec([artifact]))
    return await _deploy(w3, sender, artifact, list(args))


async def _deploy(
    w3: AsyncWeb3[Any], sender: TxSender, artifact: Artifact, args: list[Any]
) -> TxResult:
    factory = w3.eth.contract(abi=artifact.abi_list(), bytecode=artifact.bytecode)
    data = bytes.fromhex(factory.constructor(*args).data_in_transaction[2:])
    result = await sender.send(to=None, data=data)
    if result.contract_address is None:
        raise ChainError(f"deploying {artifact.name} created no contract")
    return result


class ChainClient:
    """One account's access to the escrow and registry of a :class:`Deployment`."""

    def __init__(
        self,
        w3: AsyncWeb3[Any],
        account: LocalAccount,
        deployment: Deployment,
        *,
        policy: GasPolicy | None = None,
    ) -> None:
        self.w3 = w3
        self.account = account
        self.deployment = deployment
        self.codec = default_codec()
        self.sender = TxSender(w3, account, self.codec, policy)
        self._escrow: AsyncContract = w3.eth.contract(
            address=deployment.escrow, abi=load_artifact(ESCROW).abi_list()
        )
        self._registry: AsyncContract = w3.eth.contract(
            address=deployment.registry, abi=load_artifact(REGISTRY).abi_list()
        )

    @classmethod
    def connect(
        cls,
        rpc_url: str,
        private_key: bytes | str,
        deployment: Deployment,
        *,
        policy: GasPolicy | None = None,
        request_timeout_s: float = 30.0,
        retry: bool = True,
    ) -> ChainClient:
        """A client over HTTP JSON-RPC (no I/O until the first call). ``retry``:
        web3's retries with backoff of idempotent calls on connection errors."""
        provider = AsyncHTTPProvider(
            rpc_url,
            request_kwargs={"timeout": ClientTimeout(total=request_timeout_s)},
            **({} if retry else {"exception_retry_configuration": None}),
        )
        return cls(AsyncWeb3(provider), Account.from_key(private_key), deployment, policy=policy)

    async def aclose(self) -> None:
        """Close the HTTP session (if any)."""
        if isinstance(self.w3.provider, AsyncHTTPProvider):
            await self.w3.provider.disconnect()

    async def __aenter__(self) -> ChainClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def address(self) -> ChecksumAddress:
        return self.account.address

    @property
    def receipt_domain(self) -> ReceiptDomain:
        return ReceiptDomain(chain_id=self.deployment.chain_id, escrow=self.deployment.escrow)

    async def check_chain(self) -> None:
        """ChainUnavailable unless the node answers with the deployment's chain id
        and the escrow has code."""
        chain_id = await self.sender.chain_id()
        if chain_id != self.deployment.chain_id:
            raise ChainUnavailable(
                f"RPC is chain {chain_id}, the deployment is on {self.deployment.chain_id}"
            )
        code = await self._read(self.w3.eth.get_code(self.deployment.escrow))
        if not code:
            raise ChainUnavailable(f"no contract at {self.deployment.escrow}")

    # ── querier ──────────────────────────────────────────────────────────────

    def new_terms(
        self, query_id: bytes, committee: Iterable[str], price_wei: int, deadline: int
    ) -> QueryTerms:
        """Terms for a query this account will open."""
        return QueryTerms.create(
            query_id=query_id,
            querier=self.address,
            committee=committee,
            price_wei=price_wei,
            deadline=deadline,
        )

    async def open_query(self, terms: QueryTerms) -> TxResult:
        """Escrow ``terms.escrow_wei`` for the query (``openQuery``)."""
        self._require_querier(terms)
        data = self._escrow.encode_abi(
            "openQuery",
            args=[terms.query_id, list(terms.committee), terms.price_wei, terms.deadline],
        )
        return await self._send(self.deployment.escrow, data, value=terms.escrow_wei)

    async def settle(self, terms: QueryTerms, delivered: Iterable[str]) -> TxResult:
        """Credit the members in ``delivered``; the rest stays held for claims."""
        self._require_querier(terms)
        mask = terms.mask_of(delivered)
        data = self._escrow.encode_abi("settle", args=[terms.query_id, terms.as_abi(), mask])
        slack = CREDIT_GAS_SLACK * bin(mask).count("1")
        return await self._send(self.deployment.escrow, data, extra_gas=slack)

    async def settle_weighted(self, settlement: WeightedSettlement) -> TxResult:
        """Settle one query by a reward rule (``settleWeighted``: the delivered
        shares' money split as ``settlement.amounts`` says)."""
        terms = settlement.terms
        self._require_querier(terms)
        data = self._escrow.encode_abi(
            "settleWeighted",
            args=[terms.query_id, terms.as_abi(), settlement.delivered, list(settlement.amounts)],
        )
        slack = CREDIT_GAS_SLACK * bin(settlement.delivered).count("1")
        return await self._send(self.deployment.escrow, data, extra_gas=slack)

    async def settle_batch(self, settlements: Sequence[Settlement]) -> TxResult:
        """Settle many queries in one transaction (see :func:`plan_batches` for
        splitting); each member's balance is written once."""
        for s in settlements:
            self._require_querier(s.terms)
        members, items = encode_batch(settlements)
        data = self._escrow.encode_abi("settleBatch", args=[members, items])
        slack = CREDIT_GAS_SLACK * len(members)
        return await self._send(self.deployment.escrow, data, extra_gas=slack)

    def sign_receipt(self, query_id: bytes, member: str, amount_wei: int) -> bytes:
        """This account's (the querier's) EIP-712 receipt for a member's share."""
        receipt = PaymentReceipt(query_id=query_id, member=checksum(member), amount_wei=amount_wei)
        return sign_receipt(self.account, self.receipt_domain, receipt)

    # ── members and anyone ───────────────────────────────────────────────────

    async def claim(
        self,
        terms: QueryTerms,
        receipt: PaymentReceipt,
        signature: bytes,
        *,
        delivered: int | None = None,
    ) -> TxResult:
        """Claim a receipt's amount for ``receipt.member`` (anyone may send it).

        For a query settled without this member pass the settlement's
        ``delivered`` bitmap, or leave it None to look it up in the logs."""
        if delivered is None:
            delivered = await self._delivered_if_held(terms)
        data = self._escrow.encode_abi(
            "claim",
            args=[
                terms.query_id,
                terms.as_abi(),
                delivered,
                receipt.member,
                receipt.amount_wei,
                signature,
            ],
        )
        return await self._send(self.deployment.escrow, data)

    async def refund(self, terms: QueryTerms, *, delivered: int | None = None) -> TxResult:
        """After deadline + grace: return what is held to the querier's balance."""
        if delivered is None:
            delivered = await self._delivered_if_held(terms)
        data = self._escrow.encode_abi("refund", args=[terms.query_id, terms.as_abi(), delivered])
        return await self._send(self.deployment.escrow, data)

    async def withdraw(self) -> TxResult:
        """Move this account's whole escrow balance to it."""
        data = self._escrow.encode_abi("withdraw", args=[])
        return await self._send(self.deployment.escrow, data)

    # ── registry ─────────────────────────────────────────────────────────────

    async def register(self, ed25519: bytes, x25519: bytes, *, stake_wei: int = 0) -> TxResult:
        """Bind this account to a peer's Ed25519 and X25519 public keys."""
        if len(ed25519) != 32 or len(x25519) != 32:
            raise ValueError("Ed25519 and X25519 public keys are 32 bytes")
        data = self._registry.encode_abi("register", args=[ed25519, x25519])
        return await self._send(self.deployment.registry, data, value=stake_wei)

    async def update_keys(self, ed25519: bytes, x25519: bytes) -> TxResult:
        data = self._registry.encode_abi("updateKeys", args=[ed25519, x25519])
        return await self._send(self.deployment.registry, data)

    async def add_stake(self, stake_wei: int) -> TxResult:
        data = self._registry.encode_abi("addStake", args=[])
        return await self._send(self.deployment.registry, data, value=stake_wei)

    async def deregister(self) -> TxResult:
        data = self._registry.encode_abi("deregister", args=[])
        return await self._send(self.deployment.registry, data)

    async def withdraw_stake(self) -> TxResult:
        data = self._registry.encode_abi("withdrawStake", args=[])
        return await self._send(self.deployment.registry, data)

    @property
    def registry_domain(self) -> RegistryDomain:
        return RegistryDomain(chain_id=self.deployment.chain_id, registry=self.deployment.registry)

    def sign_commitment(self, querier: str, query_id: bytes, commitment: bytes) -> bytes:
        """This account's (a member's) EIP-712 statement of its commitment to one query."""
        statement = CommitmentStatement(
            querier=checksum(querier), query_id=query_id, commitment=commitment
        )
        return sign_commitment(self.account, self.registry_domain, statement)

    async def publish_scores(self, scores: dict[str, float]) -> TxResult:
        """Publish this account's (a querier's) merit scores, each in [0, 1], as events."""
        members = [checksum(m) for m in scores]
        ppm = [round(min(1.0, max(0.0, float(s))) * 1_000_000) for s in scores.values()]
        data = self._registry.encode_abi("publishScores", args=[members, ppm])
        return await self._send(self.deployment.registry, data)

    async def report_equivocation(
        self,
        member: str,
        querier: str,
        query_id: bytes,
        first: tuple[bytes, bytes],
        second: tuple[bytes, bytes],
    ) -> TxResult:
        """Prove ``member`` signed two different (commitment, signature) pairs for
        one query; its stake is slashed, half of it paid to this account."""
        data = self._registry.encode_abi(
            "reportEquivocation",
            args=[checksum(member), checksum(querier), query_id, *first, *second],
        )
        return await self._send(self.deployment.registry, data)

    async def peer(self, account: str) -> PeerRecord:
        ed, x, stake, ends = await self._read(
            self._registry.functions.peerOf(checksum(account)).call()
        )
        return PeerRecord(ed25519=bytes(ed), x25519=bytes(x), stake_wei=stake, unbonding_ends=ends)

    async def is_active(self, account: str) -> bool:
        return bool(await self._read(self._registry.functions.isActive(checksum(account)).call()))

    # ── reads ────────────────────────────────────────────────────────────────

    async def balance(self, account: str | None = None) -> int:
        """Withdrawable escrow balance of ``account`` (default: this one)."""
        who = checksum(account) if account else self.address
        return int(await self._read(self._escrow.functions.balanceOf(who).call()))

    async def eth_balance(self, account: str | None = None) -> int:
        who = checksum(account) if account else self.address
        return int(await self._read(self.w3.eth.get_balance(who)))

    async def state_word(self, querier: str, query_id: bytes) -> bytes:
        """The escrow's state word of ``querier``'s query ``query_id`` (ids are per querier)."""
        call = self._escrow.functions.queryState(checksum(querier), query_id).call()
        return bytes(await self._read(call))

    async def status(self, terms: QueryTerms, delivered: int | None = None) -> QueryStatus:
        """The query's state as seen with ``terms`` (and a settlement's bitmap)."""
        word = await self.state_word(terms.querier, terms.query_id)
        if word == bytes(32):
            return QueryStatus.UNKNOWN
        if word == CLOSED_STATE:
            return QueryStatus.CLOSED
        if word == terms.commitment():
            return QueryStatus.OPEN
        if delivered is None and word[0] >> 6 == 3:
            delivered = await self.settled_mask(terms)
        if delivered is not None and word == terms.held_state(delivered):
            return QueryStatus.HELD
        return QueryStatus.MISMATCH

    async def verify_escrow(self, terms: QueryTerms) -> bool:
        """A member's check before answering: the query is open with exactly these
        terms (so k * price is escrowed and claimable with a receipt)."""
        return await self.state_word(terms.querier, terms.query_id) == terms.commitment()

    async def settled_mask(self, terms: QueryTerms) -> int | None:
        """The delivered bitmap of the query's settlement, from its QuerySettled log
        (sent by the querier: another querier may use the same id)."""
        query_id = terms.query_id
        topic0 = self.codec.event_topic("QuerySettled")
        logs = await self._read(
            self.w3.eth.get_logs(
                {
                    "address": self.deployment.escrow,
                    "fromBlock": self.deployment.block,
                    "toBlock": "latest",
                    "topics": [topic0, query_id.ljust(32, b"\0")],  # type: ignore[list-item]
                }
            )
        )
        for raw in logs:
            event = self.codec.decode_log(raw)
            if event is None:
                continue
            tx = await self._read(self.w3.eth.get_transaction(HexBytes(event.tx_hash)))
            if checksum(tx["from"]) == terms.querier:
                return int(event.args["delivered"])
        return None

    async def claims_of(self, terms: QueryTerms) -> tuple[int, int]:
        """(total claimed in wei, bitmap of claimed positions) of a query."""
        call = self._escrow.functions.claims(terms.querier, terms.query_id).call()
        word = int(await self._read(call))
        return word >> 32, word & 0xFFFFFFFF

    async def claim_grace(self) -> int:
        """The escrow's claim grace (seconds after a deadline before refunds)."""
        return int(await self._read(self._escrow.functions.claimGrace().call()))

    async def chain_time(self) -> int:
        """Timestamp of the latest block."""
        block = await self._read(self.w3.eth.get_block("latest"))
        return int(block["timestamp"])

    # ── internals ────────────────────────────────────────────────────────────

    def _require_querier(self, terms: QueryTerms) -> None:
        if terms.querier != self.address:
            raise ValueError(f"terms name querier {terms.querier}, this client is {self.address}")

    async def _delivered_if_held(self, terms: QueryTerms) -> int:
        word = await self.state_word(terms.querier, terms.query_id)
        if word[0] >> 6 != 3:  # not held: the contract ignores the bitmap
            return 0
        mask = await self.settled_mask(terms)
        return 0 if mask is None else mask

    async def _send(self, to: str, data: Any, value: int = 0, extra_gas: int = 0) -> TxResult:
        raw = bytes.fromhex(data[2:]) if isinstance(data, str) else bytes(data)
        return await self.sender.send(to=to, data=raw, value=value, extra_gas=extra_gas)

    async def _read(self, awaitable: Any) -> Any:
        return await self.sender.read(awaitable)
