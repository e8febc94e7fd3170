"""Shared helpers of the chain tests (roles, shortcuts, revert assertions)."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from web3 import AsyncHTTPProvider, AsyncWeb3

from fi_peer.chain.abi import ContractCodec
from fi_peer.chain.artifacts import load_artifact
from fi_peer.chain.client import ESCROW, REGISTRY, ChainClient, Deployment
from fi_peer.chain.devchain import DevChain
from fi_peer.chain.errors import ContractRevert
from fi_peer.chain.receipts import PaymentReceipt
from fi_peer.chain.terms import QueryTerms, checksum
from fi_peer.chain.txsender import TxResult, TxSender

GRACE_S = 100
MIN_STAKE = 1_000
UNBONDING_S = 500
PRICE = 10**15
DEADLINE_IN = 1_000


async def close_web3(w3: AsyncWeb3[Any]) -> None:
    if isinstance(w3.provider, AsyncHTTPProvider):
        await w3.provider.disconnect()


async def reverts(name: str, awaitable: Awaitable[Any]) -> ContractRevert:
    """Await ``awaitable`` and check it reverts with the custom error ``name``."""
    with pytest.raises(ContractRevert) as info:
        await awaitable
    assert info.value.name == name, f"expected {name}, got {info.value}"
    return info.value


class Harness:
    """One test's view of a deployment: roles, clients and shortcuts.

    Accounts: 0 deployer, 1 querier, 2..7 members, 8 outsider, 9 second querier.
    """

    def __init__(self, devchain: DevChain, deployment: Deployment) -> None:
        self.devchain = devchain
        self.deployment = deployment
        self.w3 = devchain.web3()
        accounts = devchain.accounts
        self.deployer_account = accounts[0]
        self.querier = ChainClient(self.w3, accounts[1], deployment)
        self.members = [ChainClient(self.w3, a, deployment) for a in accounts[2:8]]
        self.outsider = ChainClient(self.w3, accounts[8], deployment)
        self.querier2 = ChainClient(self.w3, accounts[9], deployment)
        self.escrow = self.w3.eth.contract(
            address=deployment.escrow, abi=load_artifact(ESCROW).abi_list()
        )
        self.registry = self.w3.eth.contract(
            address=deployment.registry, abi=load_artifact(REGISTRY).abi_list()
        )

    async def aclose(self) -> None:
        await close_web3(self.w3)

    def member(self, address: str) -> ChainClient:
        for m in self.members:
            if m.address == address:
                return m
        raise KeyError(address)

    def sender(self, account: LocalAccount, *extra: str) -> TxSender:
        """A raw sender (for calls the client refuses to build), decoding our errors."""
        artifacts = [load_artifact(n) for n in (ESCROW, REGISTRY, *extra)]
        return TxSender(self.w3, account, ContractCodec(artifacts))

    async def now(self) -> int:
        return await self.querier.chain_time()

    async def terms(
        self,
        query_id: bytes,
        k: int = 3,
        *,
        price: int = PRICE,
        deadline_in: int = DEADLINE_IN,
        querier: ChainClient | None = None,
        committee: Sequence[str] | None = None,
    ) -> QueryTerms:
        q = querier or self.querier
        members = committee or [m.address for m in self.members[:k]]
        return q.new_terms(query_id, members, price, await self.now() + deadline_in)

    async def opened(self, query_id: bytes, k: int = 3, **kw: Any) -> QueryTerms:
        terms = await self.terms(query_id, k, **kw)
        q: ChainClient = kw.get("querier") or self.querier
        await q.open_query(terms)
        return terms

    def receipt(
        self, terms: QueryTerms, member: str, amount: int | None = None
    ) -> tuple[PaymentReceipt, bytes]:
        """The querier's signed receipt for ``member``'s share (price by default)."""
        amount = terms.price_wei if amount is None else amount
        q = self.querier if terms.querier == self.querier.address else self.querier2
        return (
            PaymentReceipt(query_id=terms.query_id, member=checksum(member), amount_wei=amount),
            q.sign_receipt(terms.query_id, member, amount),
        )

    async def send_raw(
        self, account: LocalAccount, contract: Any, fn: str, args: list[Any], value: int = 0
    ) -> TxResult:
        data = contract.encode_abi(fn, args=args)
        return await self.sender(account).send(
            to=contract.address, data=bytes.fromhex(data[2:]), value=value
        )


def qid(n: int) -> bytes:
    """A 16-byte query id."""
    return n.to_bytes(16, "big")
