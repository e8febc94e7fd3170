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
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils import keccak

from fi_peer.chain.errors import InvalidReceipt
from fi_peer.chain.terms import QUERY_ID_LEN, checksum

DOMAIN_NAME = "fi-peer QueryEscrow"
DOMAIN_VERSION = "1"
SIGNATURE_LEN = 65
_HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0

RECEIPT_TYPES: dict[str, list[dict[str, str]]] = {
    "Receipt": [
        {"name": "queryId", "type": "bytes16"},
        {"name": "member", "type": "address"},
        {"name": "amount", "type": "uint256"},
    ]
}
_RECEIPT_TYPEHASH = keccak(text="Receipt(bytes16 queryId,address member,uint256 amount)")
_DOMAIN_TYPEHASH = keccak(
    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptDomain:
    """Where a receipt is valid: one chain, one escrow contract."""

    chain_id: int
    escrow: ChecksumAddress

    def as_eip712(self) -> dict[str, Any]:
        return {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": self.chain_id,
            "verifyingContract": self.escrow,
        }

    def separator(self) -> bytes:
        """The EIP-712 domain separator (the contract's ``domainSeparator()``)."""
        return keccak(
            abi_encode(
                ["bytes32", "bytes32", "bytes32", "uint256", "address"],
                [
                    _DOMAIN_TYPEHASH,
                    keccak(text=DOMAIN_NAME),
                    keccak(text=DOMAIN_VERSION),
                    self.chain_id,
                    self.escrow,
                ],
            )
        )


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
    return keccak(b"\x19\x01" + domain.separator() + struct_hash)


def sign_receipt(
    signer: LocalAccount | bytes, domain: ReceiptDomain, receipt: PaymentReceipt
) -> bytes:
    """The querier's 65-byte signature (r | s | v) over ``receipt``."""
    key = signer.key if isinstance(signer, LocalAccount) else signer
    signed = Account.sign_typed_data(
        key,
        domain_data=domain.as_eip712(),
        message_types=RECEIPT_TYPES,
        message_data=receipt.as_eip712(),
    )
    return bytes(signed.signature)


def recover_receipt_signer(
    domain: ReceiptDomain, receipt: PaymentReceipt, signature: bytes
) -> ChecksumAddress:
    """The account that signed ``receipt``; :class:`InvalidReceipt` if malformed."""
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_LEN:
        raise InvalidReceipt(f"a receipt signature is {SIGNATURE_LEN} bytes")
    s, v = int.from_bytes(signature[32:64], "big"), signature[64]
    if s > _HALF_ORDER or v not in (27, 28):
        raise InvalidReceipt("non-canonical signature (high s or bad v)")
    message = encode_typed_data(
        domain_data=domain.as_eip712(),
        message_types=RECEIPT_TYPES,
        message_data=receipt.as_eip712(),
    )
    try:
        return checksum(Account.recover_message(message, signature=signature))
    except Exception as exc:  # eth-keys raises several types for bad points
        raise InvalidReceipt(f"signature does not recover: {exc}") from exc


def verify_receipt(
    domain: ReceiptDomain, receipt: PaymentReceipt, signature: bytes, querier: str
) -> None:
    """Raise :class:`InvalidReceipt` unless ``querier`` signed ``receipt``."""
    signer = recover_receipt_signer(domain, receipt, signature)
    if signer != checksum(querier):
        raise InvalidReceipt(f"receipt signed by {signer}, not by the querier {querier}")
