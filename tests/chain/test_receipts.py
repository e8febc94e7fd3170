"""EIP-712 payment receipts: sign, recover, verify (pure)."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak

from fi_peer.chain.errors import InvalidReceipt
from fi_peer.chain.receipts import (
    RECEIPT_TYPES,
    PaymentReceipt,
    ReceiptDomain,
    receipt_digest,
    recover_receipt_signer,
    sign_receipt,
    verify_receipt,
)
from fi_peer.chain.terms import checksum

QUERIER = Account.from_key(b"\x11" * 32)
MEMBER = checksum("0x" + "22" * 20)
DOMAIN = ReceiptDomain(chain_id=31337, escrow=checksum("0x" + "33" * 20))
RECEIPT = PaymentReceipt(query_id=b"\x44" * 16, member=MEMBER, amount_wei=10**15)
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def test_sign_and_verify() -> None:
    sig = sign_receipt(QUERIER, DOMAIN, RECEIPT)
    assert len(sig) == 65 and sig[64] in (27, 28)
    assert sign_receipt(QUERIER.key, DOMAIN, RECEIPT) == sig  # deterministic (RFC 6979)
    assert recover_receipt_signer(DOMAIN, RECEIPT, sig) == QUERIER.address
    verify_receipt(DOMAIN, RECEIPT, sig, QUERIER.address.lower())


def test_digest_is_the_eip712_hash() -> None:
    message = encode_typed_data(
        domain_data=DOMAIN.as_eip712(),
        message_types=RECEIPT_TYPES,
        message_data=RECEIPT.as_eip712(),
    )
    expected = keccak(b"\x19" + message.version + message.header + message.body)
    assert receipt_digest(DOMAIN, RECEIPT) == expected


@pytest.mark.parametrize(
    "other",
    [
        PaymentReceipt(query_id=b"\x45" * 16, member=MEMBER, amount_wei=10**15),
        PaymentReceipt(query_id=b"\x44" * 16, member=checksum("0x" + "23" * 20), amount_wei=10**15),
        PaymentReceipt(query_id=b"\x44" * 16, member=MEMBER, amount_wei=10**15 + 1),
    ],
)
def test_a_receipt_covers_exactly_its_fields(other: PaymentReceipt) -> None:
    sig = sign_receipt(QUERIER, DOMAIN, RECEIPT)
    with pytest.raises(InvalidReceipt, match="not by the querier"):
        verify_receipt(DOMAIN, other, sig, QUERIER.address)


@pytest.mark.parametrize(
    "domain",
    [
        ReceiptDomain(chain_id=1, escrow=DOMAIN.escrow),
        ReceiptDomain(chain_id=DOMAIN.chain_id, escrow=checksum("0x" + "34" * 20)),
    ],
)
def test_a_receipt_is_bound_to_its_chain_and_escrow(domain: ReceiptDomain) -> None:
    sig = sign_receipt(QUERIER, DOMAIN, RECEIPT)
    with pytest.raises(InvalidReceipt):
        verify_receipt(domain, RECEIPT, sig, QUERIER.address)


def test_forged_and_malformed_signatures() -> None:
    sig = sign_receipt(QUERIER, DOMAIN, RECEIPT)
    forged = sign_receipt(Account.from_key(b"\x12" * 32), DOMAIN, RECEIPT)
    with pytest.raises(InvalidReceipt, match="not by the querier"):
        verify_receipt(DOMAIN, RECEIPT, forged, QUERIER.address)
    for bad in (b"", sig[:64], sig + b"\0"):
        with pytest.raises(InvalidReceipt, match="65 bytes"):
            verify_receipt(DOMAIN, RECEIPT, bad, QUERIER.address)
    s = int.from_bytes(sig[32:64], "big")
    malleated = sig[:32] + (N - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    with pytest.raises(InvalidReceipt, match="non-canonical"):
        verify_receipt(DOMAIN, RECEIPT, malleated, QUERIER.address)
    with pytest.raises(InvalidReceipt, match="non-canonical"):
        verify_receipt(DOMAIN, RECEIPT, sig[:64] + b"\x01", QUERIER.address)
    with pytest.raises(InvalidReceipt):
        verify_receipt(DOMAIN, RECEIPT, b"\0" * 64 + b"\x1b", QUERIER.address)


def test_receipts_validate_their_fields() -> None:
    with pytest.raises(ValueError):
        PaymentReceipt(query_id=b"short", member=MEMBER, amount_wei=1)
    with pytest.raises(ValueError):
        PaymentReceipt(query_id=b"\0" * 16, member=MEMBER, amount_wei=0)
    with pytest.raises(ValueError):
        lower = "0x" + "ab" * 20  # not checksummed
        PaymentReceipt(query_id=b"\0" * 16, member=lower, amount_wei=1)  # type: ignore[arg-type]
