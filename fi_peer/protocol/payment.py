"""On-chain payment, as the protocol core sees it (DESIGN.md steps 4-8, "Incentives").

The core does no I/O and imports no chain code: the driver hands it an object
with the :class:`Payments` interface (the agent adapts the chain client to it;
tests use an in-memory fake). Without one (the default: memory demo, unit
tests) nothing here happens and the flow is exactly the unpaid one.

With one, and a non-zero price:

- every Offer carries the member's Ethereum address;
- the querier, once the committee is chosen and before any input leaves,
  emits an ``OpenEscrow`` effect with the :class:`EscrowTerms` and waits for
  ``PeerCore.escrow_opened(query_id, ok)``; a failure fails the query;
- each Accept carries what a member needs to find the escrow (the querier's
  address, the on-chain deadline in seconds, the committee's addresses in the
  committee entries, the price); the member emits ``VerifyEscrow`` and goes on
  (evaluates, answers) only after ``PeerCore.escrow_verified(key, ok)``;
- each Receipt carries the querier's 65-byte EIP-712 signature over
  (query id, member address, price), made with :meth:`Payments.sign_receipt`;
  the member checks it with :meth:`Payments.verify_receipt` and keeps it (it is
  what it claims with if the querier does not settle in time).

Signing and verifying are pure and cheap (no chain access), so the core calls
them synchronously, like ``PrivacyGuard.check``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

SIGNATURE_LEN = 65
_ETH = re.compile(r"0x[0-9a-fA-F]{40}")


def is_eth_address(value: str) -> bool:
    return _ETH.fullmatch(value) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class EscrowTerms:
    """What the querier escrows for one query (the chain's QueryTerms, without
    the chain's types: the committee in committee order, not yet sorted)."""

    query_id: bytes
    querier: str
    committee: tuple[str, ...]
    price_wei: int
    deadline_s: int

    def __post_init__(self) -> None:
        if not is_eth_address(self.querier) or not all(map(is_eth_address, self.committee)):
            raise ValueError("escrow terms need Ethereum addresses")
        if len({a.lower() for a in self.committee}) != len(self.committee):
            raise ValueError("duplicate address in the committee")
        if self.price_wei <= 0 or self.deadline_s <= 0:
            raise ValueError("escrow terms need a positive price and deadline")

    @property
    def escrow_wei(self) -> int:
        return self.price_wei * len(self.committee)


class Payments(Protocol):
    """This peer's side of on-chain payment, as the core needs it (pure)."""

    @property
    def eth_address(self) -> str:
        """This peer's Ethereum account."""
        ...

    def escrow_deadline_s(self, answer_deadline_ms: int) -> int:
        """The on-chain deadline (unix seconds) for a query whose answers are due
        at ``answer_deadline_ms``: the querier settles until then, members claim after."""
        ...

    def sign_receipt(self, query_id: bytes, member: str, amount_wei: int) -> bytes:
        """The querier's 65-byte signature over (query_id, member, amount_wei)."""
        ...

    def verify_receipt(
        self, query_id: bytes, member: str, amount_wei: int, signature: bytes, querier: str
    ) -> bool:
        """True when ``querier`` signed (query_id, member, amount_wei) with ``signature``."""
        ...
