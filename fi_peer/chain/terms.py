"""The terms of one escrowed query, and their on-chain commitment. Pure.

The escrow stores one word per query: a commitment to its :class:`QueryTerms`
(querier, price per share, deadline, committee). Everything that touches the
query later (settle, claim, refund, a member's check before answering) passes
the terms again and the contract compares. This module computes exactly what
the contract computes, so a member can check an escrow with one ``eth_call``
and a querier can build a settlement batch offline.

Committees are kept strictly ascending by address (the contract requires it:
it proves there are no duplicates in O(k)). A member's *position* is its index
in that order; delivered sets travel as bitmaps over positions.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from eth_abi import encode as abi_encode
from eth_typing import ChecksumAddress
from eth_utils import is_address, keccak, to_checksum_address

from fi_peer.chain.errors import BatchTooLarge

QUERY_ID_LEN = 16
MAX_COMMITTEE = 32
MAX_BATCH_MEMBERS = 256
MAX_PRICE = 2**128 - 1
MAX_DEADLINE = 2**64 - 1
#: settleWeighted's floor: a delivered member gets at least this many basis
#: points of the price (QueryEscrow.MIN_SHARE_BPS; tests/chain checks they agree).
MIN_SHARE_BPS = 1_000

_TAG_OPEN = 1 << 254
_TAG_HELD = 3 << 254
#: The state word of a closed query (settled with all delivered, or refunded).
CLOSED_STATE = (1).to_bytes(32, "big")


def checksum(address: str) -> ChecksumAddress:
    """Checksummed form of a hex address; ValueError if it is not one."""
    if not is_address(address):
        raise ValueError(f"not an address: {address!r}")
    return to_checksum_address(address)


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryTerms:
    """What ``openQuery`` escrows: k shares at ``price_wei`` for ``committee``.

    ``deadline`` is chain time (unix seconds): the querier settles until then;
    after it members holding receipts may claim, and after ``deadline +
    claimGrace`` anyone may refund what is left to the querier.
    """

    query_id: bytes
    querier: ChecksumAddress
    committee: tuple[ChecksumAddress, ...]
    price_wei: int
    deadline: int

    def __post_init__(self) -> None:
        if not isinstance(self.query_id, bytes) or len(self.query_id) != QUERY_ID_LEN:
            raise ValueError(f"query_id must be {QUERY_ID_LEN} bytes")
        if self.querier != checksum(self.querier):
            raise ValueError("querier must be a checksummed address")
        if not 1 <= len(self.committee) <= MAX_COMMITTEE:
            raise ValueError(f"committee must have 1..{MAX_COMMITTEE} members")
        values = [int(checksum(a), 16) for a in self.committee]
        if any(a != checksum(a) for a in self.committee):
            raise ValueError("committee addresses must be checksummed")
        if values[0] == 0 or any(b <= a for a, b in itertools.pairwise(values)):
            raise ValueError("committee must be strictly ascending (use QueryTerms.create)")
        if not 0 < self.price_wei <= MAX_PRICE:
            raise ValueError("price_wei must be in 1..2**128-1")
        if not 0 < self.deadline <= MAX_DEADLINE:
            raise ValueError("deadline must be a positive uint64 (unix seconds)")

    @classmethod
    def create(
        cls,
        *,
        query_id: bytes,
        querier: str,
        committee: Iterable[str],
        price_wei: int,
        deadline: int,
    ) -> QueryTerms:
        """Terms with the committee checksummed and sorted as the contract wants."""
        members = sorted({checksum(a) for a in committee}, key=lambda a: int(a, 16))
        return cls(
            query_id=query_id,
            querier=checksum(querier),
            committee=tuple(members),
            price_wei=price_wei,
            deadline=deadline,
        )

    @property
    def size(self) -> int:
        return len(self.committee)

    @property
    def escrow_wei(self) -> int:
        """What ``openQuery`` must be sent: k * price."""
        return self.size * self.price_wei

    @property
    def full_mask(self) -> int:
        return (1 << self.size) - 1

    def position(self, member: str) -> int:
        """Index of ``member`` in the committee; ValueError if not in it."""
        try:
            return self.committee.index(checksum(member))
        except ValueError:
            raise ValueError(f"{member} is not in the committee") from None

    def mask_of(self, members: Iterable[str]) -> int:
        """Bitmap (bit i = committee[i]) of ``members``; ValueError on a non-member."""
        mask = 0
        for member in members:
            mask |= 1 << self.position(member)
        return mask

    def members_of(self, mask: int) -> tuple[ChecksumAddress, ...]:
        """The members whose bit is set in ``mask``."""
        if mask < 0 or mask >> self.size:
            raise ValueError("mask has bits outside the committee")
        return tuple(a for i, a in enumerate(self.committee) if mask >> i & 1)

    def commitment(self) -> bytes:
        """The state word of the open query: keccak of abi.encode(querier, price,
        deadline, committee), shifted right by 2 and tagged 01 in the top bits."""
        digest = keccak(
            abi_encode(
                ["address", "uint128", "uint64", "address[]"],
                [self.querier, self.price_wei, self.deadline, list(self.committee)],
            )
        )
        return ((int.from_bytes(digest, "big") >> 2) | _TAG_OPEN).to_bytes(32, "big")

    def held_state(self, delivered: int) -> bytes:
        """The state word after a settlement that left ``delivered``'s complement held."""
        digest = keccak(self.commitment() + delivered.to_bytes(32, "big"))
        return ((int.from_bytes(digest, "big") >> 2) | _TAG_HELD).to_bytes(32, "big")

    @property
    def min_share_wei(self) -> int:
        """settleWeighted's least pay for a delivered member."""
        return self.price_wei * MIN_SHARE_BPS // 10_000

    def as_abi(self) -> tuple[str, list[str], int, int]:
        """The ``Terms`` struct argument of settle / claim / refund."""
        return (self.querier, list(self.committee), self.price_wei, self.deadline)


@dataclass(frozen=True, slots=True)
class Settlement:
    """One query of a batch: its terms and the bitmap of members who delivered."""

    terms: QueryTerms
    delivered: int

    def __post_init__(self) -> None:
        if self.delivered < 0 or self.delivered >> self.terms.size:
            raise ValueError("delivered has bits outside the committee")


@dataclass(frozen=True, slots=True)
class WeightedSettlement:
    """One query settled by a reward rule (``settleWeighted``): ``amounts[i]`` is
    committee[i]'s pay. Checked as the contract checks: 0 for a seat that did not
    deliver, at least ``terms.min_share_wei`` for one that did, and the sum is
    exactly popcount(delivered) * price."""

    terms: QueryTerms
    delivered: int
    amounts: tuple[int, ...]

    def __post_init__(self) -> None:
        t = self.terms
        if self.delivered < 0 or self.delivered >> t.size:
            raise ValueError("delivered has bits outside the committee")
        if len(self.amounts) != t.size:
            raise ValueError(f"need {t.size} amounts (one per seat), got {len(self.amounts)}")
        paid = bin(self.delivered).count("1") * t.price_wei
        for i, amount in enumerate(self.amounts):
            if self.delivered >> i & 1:
                if not t.min_share_wei <= amount <= paid:
                    raise ValueError(f"seat {i}: {amount} wei is outside {t.min_share_wei}..{paid}")
            elif amount != 0:
                raise ValueError(f"seat {i} did not deliver and must get 0, not {amount}")
        if sum(self.amounts) != paid:
            raise ValueError(f"amounts sum to {sum(self.amounts)}, not the {paid} wei delivered")


BatchItem = tuple[bytes, int, int, int, int, int]


def encode_batch(
    settlements: Sequence[Settlement],
) -> tuple[list[ChecksumAddress], list[BatchItem]]:
    """``settleBatch`` arguments: the distinct members (first-seen order) and, per
    query, (queryId, price, deadline, k, member indexes one byte each, delivered)."""
    if not settlements:
        raise ValueError("empty batch")
    index: dict[ChecksumAddress, int] = {}
    items: list[BatchItem] = []
    for s in settlements:
        packed = 0
        for i, member in enumerate(s.terms.committee):
            j = index.setdefault(member, len(index))
            packed |= j << (8 * i)
        t = s.terms
        items.append((t.query_id, t.price_wei, t.deadline, t.size, packed, s.delivered))
    if len(index) > MAX_BATCH_MEMBERS:
        raise BatchTooLarge(
            f"{len(index)} distinct members in one batch; settleBatch takes {MAX_BATCH_MEMBERS}"
        )
    return list(index), items


def plan_batches(
    settlements: Sequence[Settlement], *, max_members: int = MAX_BATCH_MEMBERS, max_items: int = 200
) -> list[list[Settlement]]:
    """Split settlements, in order, into batches that settleBatch accepts."""
    batches: list[list[Settlement]] = []
    current: list[Settlement] = []
    seen: set[str] = set()
    for s in settlements:
        new = seen | set(s.terms.committee)
        if current and (len(new) > max_members or len(current) >= max_items):
            batches.append(current)
            current, new = [], set(s.terms.committee)
        current.append(s)
        seen = new
    if current:
        batches.append(current)
    return batches
