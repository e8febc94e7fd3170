"""What the protocol core asks its driver to do.

The core never performs I/O: every handler returns a list of effects, and the
driver (the asyncio agent, a simulator, or a test) carries them out and feeds
the consequences back in (incoming bytes, fired timers, evaluated vectors).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fi_peer.protocol.he_effects import HEEffect
from fi_peer.protocol.messages import QueryRequest, Receipt
from fi_peer.protocol.payment import EscrowTerms

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Publish:
    """Gossip sealed envelope bytes on a topic."""

    topic: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Send:
    """Send sealed envelope bytes directly to one peer."""

    peer: str
    data: bytes


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Call ``PeerCore.on_timer(key, now)`` at ``at_ms`` (re-setting a key replaces it)."""

    key: Hashable
    at_ms: int


@dataclass(frozen=True, slots=True)
class Evaluate:
    """Run the local model on ``x`` for aggregation ``rule``; answer with
    ``PeerCore.evaluated(this_effect, vector, now)`` (``vector_len`` floats) or
    ``PeerCore.evaluation_failed(this_effect, now)``.

    ``querier`` says whose query it is: this peer's own (it contributes to its
    own query) or another's (it answers as a committee member). Query ids are
    chosen by queriers, so only the pair identifies a query."""

    query_id: bytes
    x: npt.NDArray[np.float32] = field(repr=False)
    rule: str
    vector_len: int
    querier: str


@dataclass(frozen=True, slots=True)
class Charge:
    """Record the privacy cost of one answer in the owner's budget, durably, with
    ``guard.charge(querier, request, sigma, now)`` of the PrivacyGuard the core was
    given; then call ``PeerCore.charged(this_effect, refusal, now)`` with its
    result (None: charged). The member's share leaves only after a successful
    charge, so there is never an answer without its charge. If the driver cannot
    charge (an I/O error), it must report a refusal, never None."""

    querier: str
    request: QueryRequest = field(repr=False)
    sigma: float  # noise std protecting this member's vector in what the querier sees


@dataclass(frozen=True, slots=True)
class OpenEscrow:
    """Paid query: escrow ``terms`` on chain (``openQuery``, k * price), then call
    ``PeerCore.escrow_opened(terms.query_id, ok, now)``. No input leaves before
    that; ``ok=False`` (or no answer before the deadline) fails the query."""

    terms: EscrowTerms


@dataclass(frozen=True, slots=True)
class VerifyEscrow:
    """Paid query, member side: check that ``terms`` are escrowed on chain (and
    open), then call ``PeerCore.escrow_verified((querier, query_id), ok, now)``.
    The member evaluates and answers only after ``ok=True``."""

    querier: str
    terms: EscrowTerms


@dataclass(frozen=True, slots=True)
class Paid:
    """Paid query, member side: a receipt whose signature checked out arrived;
    keep it durably with its terms (a claim needs both)."""

    querier: str
    terms: EscrowTerms
    receipt: Receipt


@dataclass(frozen=True, slots=True)
class QueryOutcome:
    """How one query ended, as the querier sees it."""

    query_id: bytes
    ok: bool
    reason: str
    total: FloatArray | None  # sum of contributions (None when the query failed)
    contributors: tuple[str, ...]
    committee_size: int
    elapsed_ms: int
    # Paid queries: the escrowed terms (None: unpaid, or the escrow never opened)
    # and the addresses of the members whose shares arrived (what to settle).
    escrow: EscrowTerms | None = None
    delivered: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class QueryDone:
    """A query this peer submitted has ended."""

    outcome: QueryOutcome


Effect = (
    Publish | Send | SetTimer | Evaluate | Charge | OpenEscrow | VerifyEscrow | Paid | QueryDone
    | HEEffect
)
