"""EIP-712 typed-data helpers shared by receipts and commitment statements.

Both statements are signed under a ``{name, version, chainId,
verifyingContract}`` domain with a 65-byte canonical signature (r | s | v, low
s, v in {27, 28}) that the contracts check with ``ecrecover``. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils import keccak

from fi_peer.chain.errors import InvalidReceipt
from fi_peer.chain.terms import checksum

SIGNATURE_LEN = 65
_HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0
_DOMAIN_TYPEHASH = keccak(
    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)

TypeSpec = dict[str, list[dict[str, str]]]


def domain_data(name: str, version: str, chain_id: int, contract: str) -> dict[str, Any]:
    """The EIP-712 domain as ``eth_account`` takes it."""
    return {"name": name, "version": version, "chainId": chain_id, "verifyingContract": contract}


def domain_separator(name: str, version: str, chain_id: int, contract: str) -> bytes:
    """The EIP-712 domain separator (a contract's ``domainSeparator()``)."""
    return keccak(
        abi_encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [_DOMAIN_TYPEHASH, keccak(text=name), keccak(text=version), chain_id, contract],
        )
    )


def typed_digest(separator: bytes, struct_hash: bytes) -> bytes:
    """The 32-byte EIP-712 digest of ``struct_hash`` under ``separator``."""
    return keccak(b"\x19\x01" + separator + struct_hash)


def sign_typed(
    signer: LocalAccount | bytes, domain: dict[str, Any], types: TypeSpec, message: dict[str, Any]
) -> bytes:
    """The 65-byte signature (r | s | v, low s) over ``message``."""
    key = signer.key if isinstance(signer, LocalAccount) else signer
    signed = Account.sign_typed_data(
        key, domain_data=domain, message_types=types, message_data=message
    )
    return bytes(signed.signature)


def recover_typed_signer(
    domain: dict[str, Any], types: TypeSpec, message: dict[str, Any], signature: bytes, what: str
) -> ChecksumAddress:
    """The account that signed ``message``; :class:`InvalidReceipt` if malformed.

    ``what`` names the signature in the length error ("a receipt signature").
    """
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_LEN:
        raise InvalidReceipt(f"{what} is {SIGNATURE_LEN} bytes")
    s, v = int.from_bytes(signature[32:64], "big"), signature[64]
    if s > _HALF_ORDER or v not in (27, 28):
        raise InvalidReceipt("non-canonical signature (high s or bad v)")
    encoded = encode_typed_data(domain_data=domain, message_types=types, message_data=message)
    try:
        return checksum(Account.recover_message(encoded, signature=signature))
    except Exception as exc:  # eth-keys raises several types for bad points
        raise InvalidReceipt(f"signature does not recover: {exc}") from exc
