"""EIP-712 payment receipts: the querier's signed "I received your share".

A receipt names (queryId, member, amount) and is signed by the querier's
Ethereum account under the domain ``{name: "fi-peer QueryEscrow", version: "1",
chainId, verifyingContract: escrow}``, so it is worthless on another chain or
another escrow. The 65-byte signature (r | s | v) is what the protocol's
``Receipt`` message carries; the escrow's ``claim`` checks it with ``ecrecover``.
Signatures must be canonical (low s, v in {27, 28}), as the contract demands.
Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils import keccak

from fi_peer.chain.eip712 import (
    domain_data,
    domain_separator,
    recover_typed_signer,
    sign_typed,
    typed_digest,
)
from fi_peer.chain.errors import InvalidReceipt
from fi_peer.chain.terms import QUERY_ID_LEN, checksum

DOMAIN_NAME = "fi-peer QueryEscrow"
DOMAIN_VERSION = "1"

RECEIPT_TYPES: dict[str, list[dict[str, str]]] = {
    "Receipt": [
        {"name": "queryId", "type": "bytes16"},
        {"name": "member", "type": "address"},
        {"name": "amount", "type": "uint256"},
    ]
}
_RECEIPT_TYPEHASH = keccak(text="Receipt(bytes16 queryId,address member,uint256 amount)")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptDomain:
    """Where a receipt is valid: one chain, one escrow contract."""

    chain_id: int
    escrow: ChecksumAddress

    def as_eip712(self) -> dict[str, Any]:
        return domain_data(DOMAIN_NAME, DOMAIN_VERSION, self.chain_id, self.escrow)

    def separator(self) -> bytes:
        """The EIP-712 domain separator (the contract's ``domainSeparator()``)."""
        return domain_separator(DOMAIN_NAME, DOMAIN_VERSION, self.chain_id, self.escrow)


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentReceipt:
    """The querier owes ``member`` ``amount_wei`` for its share in ``query_id``."""

    query_id: bytes
    member: ChecksumAddress
    amount_wei: int

    def __post_init__(self) -> None:
        if not isinstance(self.query_id, bytes) or len(self.query_id) != QUERY_ID_LEN:
            raise ValueError(f"query_id must be {QUERY_ID_LEN} bytes")
        if self.member != checksum(self.member):
            raise ValueError("member must be a checksummed address")
        if not 0 < self.amount_wei < 2**256:
            raise ValueError("amount_wei must be a positive uint256")

    def as_eip712(self) -> dict[str, Any]:
        return {"queryId": self.query_id, "member": self.member, "amount": self.amount_wei}


def receipt_digest(domain: ReceiptDomain, receipt: PaymentReceipt) -> bytes:
    """The 32-byte EIP-712 digest (the contract's ``receiptDigest``)."""
    struct_hash = keccak(
        abi_encode(
            ["bytes32", "bytes16", "address", "uint256"],
            [_RECEIPT_TYPEHASH, receipt.query_id, receipt.member, receipt.amount_wei],
        )
    )
    return typed_digest(domain.separator(), struct_hash)


def sign_receipt(
    signer: LocalAccount | bytes, domain: ReceiptDomain, receipt: PaymentReceipt
) -> bytes:
    """The querier's 65-byte signature (r | s | v) over ``receipt``."""
    return sign_typed(signer, domain.as_eip712(), RECEIPT_TYPES, receipt.as_eip712())


def recover_receipt_signer(
    domain: ReceiptDomain, receipt: PaymentReceipt, signature: bytes
) -> ChecksumAddress:
    """The account that signed ``receipt``; :class:`InvalidReceipt` if malformed."""
    return recover_typed_signer(
        domain.as_eip712(), RECEIPT_TYPES, receipt.as_eip712(), signature, "a receipt signature"
    )


def verify_receipt(
    domain: ReceiptDomain, receipt: PaymentReceipt, signature: bytes, querier: str
) -> None:
    """Raise :class:`InvalidReceipt` unless ``querier`` signed ``receipt``."""
    signer = recover_receipt_signer(domain, receipt, signature)
    if signer != checksum(querier):
        raise InvalidReceipt(f"receipt signed by {signer}, not by the querier {querier}")
