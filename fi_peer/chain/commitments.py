"""EIP-712 commitment statements: a member's on-chain-checkable "I committed to C".

Each committee member commits to its noisy answer vector in its Share
(fi_peer.protocol.audit). The Share is signed with the member's Ed25519 key,
which the EVM cannot check (no precompile), so the member also signs the
statement ``ShareCommitment(address querier, bytes16 queryId, bytes32
commitment)`` with its registered Ethereum account under the domain
``{name: "fi-peer PeerRegistry", version: "1", chainId, verifyingContract:
registry}``. Two such statements for one (querier, queryId) with different
commitments are an equivocation: ``PeerRegistry.reportEquivocation`` checks
both with ``ecrecover`` and slashes the member's stake. Pure: no I/O.
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
from fi_peer.chain.terms import QUERY_ID_LEN, checksum

DOMAIN_NAME = "fi-peer PeerRegistry"
DOMAIN_VERSION = "1"
COMMITMENT_LEN = 32

COMMITMENT_TYPES: dict[str, list[dict[str, str]]] = {
    "ShareCommitment": [
        {"name": "querier", "type": "address"},
        {"name": "queryId", "type": "bytes16"},
        {"name": "commitment", "type": "bytes32"},
    ]
}
_TYPEHASH = keccak(text="ShareCommitment(address querier,bytes16 queryId,bytes32 commitment)")


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryDomain:
    """Where a commitment statement is checkable: one chain, one registry."""

    chain_id: int
    registry: ChecksumAddress

    def as_eip712(self) -> dict[str, Any]:
        return domain_data(DOMAIN_NAME, DOMAIN_VERSION, self.chain_id, self.registry)

    def separator(self) -> bytes:
        """The EIP-712 domain separator (the registry's ``domainSeparator()``)."""
        return domain_separator(DOMAIN_NAME, DOMAIN_VERSION, self.chain_id, self.registry)


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitmentStatement:
    """``querier``'s query ``query_id`` was answered with the vector committed to
    by ``commitment`` (signed by the member)."""

    querier: ChecksumAddress
    query_id: bytes
    commitment: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.query_id, bytes) or len(self.query_id) != QUERY_ID_LEN:
            raise ValueError(f"query_id must be {QUERY_ID_LEN} bytes")
        if not isinstance(self.commitment, bytes) or len(self.commitment) != COMMITMENT_LEN:
            raise ValueError(f"commitment must be {COMMITMENT_LEN} bytes")
        if self.querier != checksum(self.querier):
            raise ValueError("querier must be a checksummed address")

    def as_eip712(self) -> dict[str, Any]:
        return {"querier": self.querier, "queryId": self.query_id, "commitment": self.commitment}


def commitment_digest(domain: RegistryDomain, statement: CommitmentStatement) -> bytes:
    """The 32-byte EIP-712 digest (the registry's ``commitmentDigest``)."""
    struct_hash = keccak(
        abi_encode(
            ["bytes32", "address", "bytes16", "bytes32"],
            [_TYPEHASH, statement.querier, statement.query_id, statement.commitment],
        )
    )
    return typed_digest(domain.separator(), struct_hash)


def sign_commitment(
    signer: LocalAccount | bytes, domain: RegistryDomain, statement: CommitmentStatement
) -> bytes:
    """The member's 65-byte signature (r | s | v, low s) over ``statement``."""
    return sign_typed(signer, domain.as_eip712(), COMMITMENT_TYPES, statement.as_eip712())


def recover_commitment_signer(
    domain: RegistryDomain, statement: CommitmentStatement, signature: bytes
) -> ChecksumAddress:
    """The account that signed ``statement``; :class:`InvalidReceipt` if malformed."""
    return recover_typed_signer(
        domain.as_eip712(),
        COMMITMENT_TYPES,
        statement.as_eip712(),
        signature,
        "a commitment signature",
    )
