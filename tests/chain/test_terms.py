"""QueryTerms, commitments and batch encoding (pure; the chain agreeing with
them is checked in test_escrow.py)."""

from __future__ import annotations

import pytest
from eth_account import Account
from hypothesis import given
from hypothesis import strategies as st

from fi_peer.chain.errors import BatchTooLarge
from fi_peer.chain.terms import (
    MAX_BATCH_MEMBERS,
    QueryTerms,
    Settlement,
    checksum,
    encode_batch,
    plan_batches,
)

ADDRESSES = [checksum(f"0x{i:040x}") for i in range(1, 600)]
QUERIER = checksum("0x" + "ab" * 20)


def make(
    committee: list[str], *, query: int = 1, price: int = 10, deadline: int = 100
) -> QueryTerms:
    return QueryTerms.create(
        query_id=query.to_bytes(16, "big"),
        querier=QUERIER,
        committee=committee,
        price_wei=price,
        deadline=deadline,
    )


def test_create_sorts_dedups_and_checksums() -> None:
    lower = [a.lower() for a in ADDRESSES[:3]]
    terms = make([lower[2], lower[0], lower[1], lower[0]])
    assert terms.committee == tuple(ADDRESSES[:3])
    assert terms.size == 3 and terms.escrow_wei == 30 and terms.full_mask == 0b111


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"query_id": b"short"}, "query_id"),
        ({"committee": ()}, "committee"),
        ({"committee": tuple(ADDRESSES[:33])}, "committee"),
        ({"committee": (ADDRESSES[1], ADDRESSES[0])}, "ascending"),
        ({"committee": (ADDRESSES[0], ADDRESSES[0])}, "ascending"),
        ({"price_wei": 0}, "price"),
        ({"price_wei": 2**128}, "price"),
        ({"deadline": 0}, "deadline"),
        ({"deadline": 2**64}, "deadline"),
        ({"querier": QUERIER.lower()}, "checksummed"),
    ],
)
def test_invalid_terms_cannot_exist(changes: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "query_id": bytes(16),
        "querier": QUERIER,
        "committee": tuple(ADDRESSES[:2]),
        "price_wei": 1,
        "deadline": 1,
    }
    fields.update(changes)
    with pytest.raises(ValueError, match=message):
        QueryTerms(**fields)  # type: ignore[arg-type]


def test_masks_and_positions() -> None:
    terms = make(ADDRESSES[:4])
    assert terms.mask_of([ADDRESSES[3], ADDRESSES[1]]) == 0b1010
    assert terms.members_of(0b1010) == (ADDRESSES[1], ADDRESSES[3])
    with pytest.raises(ValueError, match="not in the committee"):
        terms.mask_of([ADDRESSES[10]])
    with pytest.raises(ValueError, match="outside"):
        terms.members_of(0b10000)
    with pytest.raises(ValueError, match="outside"):
        Settlement(terms, 0b10000)


@given(
    st.lists(st.sampled_from(ADDRESSES[:40]), min_size=1, max_size=32, unique=True),
    st.integers(1, 2**128 - 1),
    st.integers(1, 2**64 - 1),
)
def test_commitment_binds_every_field(committee: list[str], price: int, deadline: int) -> None:
    terms = make(committee, price=price, deadline=deadline)
    word = terms.commitment()
    assert len(word) == 32 and word[0] >> 6 == 0b01  # tagged "open"
    assert terms.held_state(0)[0] >> 6 == 0b11  # tagged "held"
    variants = [
        make(committee, price=price % (2**128 - 1) + 1, deadline=deadline),
        make(committee, price=price, deadline=deadline % (2**64 - 1) + 1),
    ]
    if len(committee) < 32:  # a 33rd member is refused by QueryTerms itself
        variants.append(make([*committee, ADDRESSES[50]], price=price, deadline=deadline))
    for other in variants:
        if other != terms:
            assert other.commitment() != word
    assert terms.held_state(1) != terms.held_state(0)


def test_encode_batch_indexes_members_once() -> None:
    a = make(ADDRESSES[0:3], query=1)
    b = make(ADDRESSES[1:4], query=2, price=7)
    members, items = encode_batch([Settlement(a, 0b101), Settlement(b, 0b011)])
    assert members == ADDRESSES[0:4]
    assert items[0] == (a.query_id, 10, 100, 3, 0x020100, 0b101)
    assert items[1] == (b.query_id, 7, 100, 3, 0x030201, 0b011)
    with pytest.raises(ValueError, match="empty"):
        encode_batch([])


def test_batches_over_256_members_are_refused_and_planned_apart() -> None:
    settlements = [Settlement(make(ADDRESSES[i * 32 : (i + 1) * 32], query=i), 0) for i in range(9)]
    with pytest.raises(BatchTooLarge):
        encode_batch(settlements)
    batches = plan_batches(settlements)
    assert [len(b) for b in batches] == [8, 1]
    for batch in batches:
        members, _ = encode_batch(batch)
        assert len(members) <= MAX_BATCH_MEMBERS
    assert [len(b) for b in plan_batches(settlements, max_items=4)] == [4, 4, 1]


def test_a_random_account_is_a_valid_member() -> None:
    account = Account.create()
    terms = make([account.address, ADDRESSES[0]])
    assert terms.position(account.address.lower()) in (0, 1)
