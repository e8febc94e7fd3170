"""Audit queries: commitments in Shares, openings after the answer, merit scores.

Theory of operation
-------------------
Every member's Share carries a hash commitment to its NOISY vector (the
fixed-point words after its DP noise share, before the secure-aggregation
masks)::

    c = BLAKE2b-256( "fi-peer/v1/share-commitment" | len | query id
                     | len | member peer id | len | vector bytes | nonce )

with a fresh 32-byte random nonce (every field length-prefixed, so no two
inputs encode alike). The Share, and so ``c``, is signed by the member's
Ed25519 envelope signature; on paid queries the member also signs ``c`` with
its registered Ethereum account (EIP-712, fi_peer.chain.commitments), which
makes two different commitments for one query slashable on chain
(``PeerRegistry.reportEquivocation``).

An audit query is an ordinary query whose label the querier happens to know.
Nothing in the request, the Accept, the input or the Share tells it apart.
Only AFTER the answer (the Result) may the querier send an ``OpenRequest``,
and then the member replies with an ``Opening`` (vector + nonce) or a refusal:

* binding: the querier recomputes ``c`` from the opened vector and nonce; a
  member cannot open to a vector other than the one it committed to (that
  would be a BLAKE2b second preimage). When every contributor of a query
  opens, the opened words also sum (mod 2^64) to the unmasked aggregate, so
  the commitments are tied to what was actually summed;
* hiding: the nonce keeps ``c`` from revealing the vector before opening;
* opening limit (:class:`OpeningDesk`): a member opens at most
  ``max_fraction`` of the answers it gave one querier (so a querier cannot
  open every answer and bypass secure aggregation); more is refused with
  ``open_limit``;
* budget: an opened vector is a release of the member's own vector with its
  noise share only (std ``sigma / sqrt(t)``), so the member charges it to its
  privacy ledger like a plaintext answer (a ``Charge`` effect) before it
  leaves; a ledger refusal is a refusal to open.

What remains distinguishable: that a query WAS an audit, once the member
sees the OpenRequest (after it answered, too late to answer differently, but
it learns which inputs the querier holds labels for: a querier must not
reuse audit inputs); the timing of OpenRequests (queriers should batch them,
e.g. at settlement); the share of a querier's queries that are opened.

The querier side (:class:`AuditBook`) keeps, per audit, the commitments, the
label and the opened vectors it verified, and turns them into per-member
merit scores (fi_peer.incentives.merit: accuracy of the member's own opened
answers). Pure: no I/O, no clock, no randomness (nonces come from the caller).
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from fi_peer.incentives.merit import accuracy_merit
from fi_peer.protocol import fixedpoint
from fi_peer.protocol.messages import Opening, OpenRequest, QueryRequest

COMMIT_DOMAIN = b"fi-peer/v1/share-commitment"
NONCE_LEN = 32
COMMIT_LEN = 32
DEFAULT_MAX_FRACTION = 0.25
# Sealed answers kept for opening (each up to 32 KiB: at most ~32 MiB), and query
# ids remembered as committed (~80 bytes each) so that none is committed twice.
MAX_PENDING = 1024
MAX_COMMITTED = 65_536


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def commit(query_id: bytes, member: str, vector: bytes, nonce: bytes) -> bytes:
    """The 32-byte commitment of ``member`` to ``vector`` (fixed-point bytes) in a query."""
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce must be {NONCE_LEN} bytes")
    h = hashlib.blake2b(digest_size=COMMIT_LEN)
    h.update(_field(COMMIT_DOMAIN))
    h.update(_field(query_id))
    h.update(_field(member.encode("ascii")))
    h.update(_field(vector))
    h.update(nonce)
    return h.digest()


def verify_opening(
    commitment: bytes, query_id: bytes, member: str, vector: bytes, nonce: bytes
) -> bool:
    """True when (vector, nonce) opens ``commitment`` of ``member`` for ``query_id``."""
    if len(nonce) != NONCE_LEN or len(commitment) != COMMIT_LEN:
        return False
    return hmac.compare_digest(commit(query_id, member, vector, nonce), commitment)


def openings_sum_to(vectors: list[bytes], aggregate: fixedpoint.Words) -> bool:
    """True when the opened fixed-point vectors sum (mod 2^64) to ``aggregate``:
    every contributor opened what it actually put into the secure sum."""
    if not vectors:
        return False
    total = fixedpoint.from_bytes(vectors[0])
    for v in vectors[1:]:
        words = fixedpoint.from_bytes(v)
        if words.shape != total.shape:
            return False
        total = fixedpoint.add(total, words)
    return total.shape == aggregate.shape and bool(np.array_equal(total, aggregate))


# -- member side --------------------------------------------------------------------


@runtime_checkable
class CommitmentSigner(Protocol):
    """Signs a commitment statement with the member's registered Ethereum account
    (fi_peer.chain.commitments; the agent's payments adapter provides it)."""

    def sign_commitment(self, querier: str, query_id: bytes, commitment: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Sealed:
    """What a member keeps to open one answer later."""

    vector: bytes
    nonce: bytes
    commitment: bytes
    request: QueryRequest = field(repr=False)
    sigma: float  # noise std on the member's own vector (its share of the noise)


class OpeningDesk:
    """A member's openings: what it committed to, and how much it has opened.

    ``record`` after every Share sent (counts an answer for that querier);
    ``open`` on an OpenRequest: the sealed answer, or a refusal reason
    (``unknown_query``, ``already_opened``, ``open_limit``). At most
    ``max_fraction`` of a querier's answers are ever opened, counted over the
    answers this desk has seen (``open`` counts an opening before its charge:
    a refused charge still uses up the allowance, erring on the safe side).
    Sealed answers are kept for the last ``capacity`` Shares. The desk also
    remembers which (querier, query id) it committed to (the last
    ``MAX_COMMITTED``), so it never commits twice to one query: an honest member
    must never be slashable. Paid query ids are also unique on chain (the escrow
    opens an id once per querier), which covers ids older than that memory.
    """

    def __init__(
        self, max_fraction: float = DEFAULT_MAX_FRACTION, capacity: int = MAX_PENDING
    ) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError("max_fraction must be in [0, 1]")
        self.max_fraction = max_fraction
        self.capacity = capacity
        self.answered: Counter[str] = Counter()
        self.opened: Counter[str] = Counter()
        self._sealed: OrderedDict[tuple[str, bytes], Sealed | None] = OrderedDict()
        self._committed: OrderedDict[tuple[str, bytes], None] = OrderedDict()

    def committed(self, querier: str, query_id: bytes) -> bool:
        return (querier, query_id) in self._committed

    def record(self, querier: str, query_id: bytes, sealed: Sealed) -> None:
        key = (querier, query_id)
        if key in self._committed:
            raise ValueError("already committed to this query")
        self._committed[key] = None
        self._sealed[key] = sealed
        self.answered[querier] += 1
        while len(self._sealed) > self.capacity:
            self._sealed.popitem(last=False)
        while len(self._committed) > MAX_COMMITTED:
            self._committed.popitem(last=False)

    def allowance(self, querier: str) -> int:
        """How many more answers to ``querier`` may be opened now."""
        limit = int(self.max_fraction * self.answered[querier] + 1e-9)
        return max(0, limit - self.opened[querier])

    def open(self, querier: str, query_id: bytes) -> Sealed | str:
        key = (querier, query_id)
        if key not in self._sealed:
            return "unknown_query"
        sealed = self._sealed[key]
        if sealed is None:
            return "already_opened"
        if self.allowance(querier) < 1:
            return "open_limit"
        self.opened[querier] += 1
        self._sealed[key] = None
        return sealed


# -- querier side -------------------------------------------------------------------

Decider = Callable[[npt.NDArray[np.float64]], npt.NDArray[np.int64]]


@dataclass(slots=True)
class _Audit:
    label: int
    commitments: dict[str, bytes] = field(default_factory=dict)
    opened: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    bad: dict[str, None] = field(default_factory=dict)


class AuditBook:
    """The querier's audits: labels it knows, commitments seen, openings verified.

    ``mark(query_id, label)`` when submitting a query whose label is known (kept
    private; nothing is sent); ``on_share`` for every Share of a marked query;
    ``open_requests`` after the query's answer; ``on_opening`` for every reply
    (False: a bad opening, which is also counted against the member). Scores:
    per member, audits opened and answered right alone (``decide`` on its own
    vector), and the merit scores of fi_peer.incentives.merit.
    """

    def __init__(self, decide: Decider, n_classes: int, capacity: int = MAX_PENDING) -> None:
        self.decide = decide
        self.n_classes = n_classes
        self.capacity = capacity
        self.audits: OrderedDict[bytes, _Audit] = OrderedDict()
        self.hits: Counter[str] = Counter()
        self.opened: Counter[str] = Counter()
        self.bad: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        # Told of every reply to an OpenRequest (query id, member, opened ok): the
        # driver's hook to wait for an audit's openings. Pure callers leave it None.
        self.listener: Callable[[bytes, str, bool], None] | None = None

    def is_audit(self, query_id: bytes) -> bool:
        return query_id in self.audits

    def mark(self, query_id: bytes, label: int) -> None:
        if not 0 <= label < self.n_classes:
            raise ValueError("label out of range")
        self.audits[query_id] = _Audit(label)
        while len(self.audits) > self.capacity:
            self.audits.popitem(last=False)

    def on_share(self, query_id: bytes, member: str, commitment: bytes) -> None:
        audit = self.audits.get(query_id)
        if audit is not None and len(commitment) == COMMIT_LEN:
            audit.commitments.setdefault(member, commitment)

    def open_requests(self, query_id: bytes) -> list[tuple[str, OpenRequest]]:
        """(member, OpenRequest) for every member that committed in this audit."""
        audit = self.audits.get(query_id)
        if audit is None:
            return []
        return [(m, OpenRequest(query_id=query_id)) for m in sorted(audit.commitments)]

    def label(self, query_id: bytes) -> int | None:
        audit = self.audits.get(query_id)
        return None if audit is None else audit.label

    def committed(self, query_id: bytes) -> list[str]:
        """The members whose Share of this audit carried a commitment."""
        audit = self.audits.get(query_id)
        return [] if audit is None else sorted(audit.commitments)

    def opened_vectors(self, query_id: bytes) -> dict[str, npt.NDArray[np.float64]]:
        """The verified opened vectors of one audit, per member."""
        audit = self.audits.get(query_id)
        return {} if audit is None else dict(audit.opened)

    def answered(self, query_id: bytes) -> set[str]:
        """Members that replied to this audit's OpenRequest (opened, refused or bad)."""
        audit = self.audits.get(query_id)
        if audit is None:
            return set()
        return set(audit.opened) | set(audit.refused) | set(audit.bad)

    def refused(self, query_id: bytes) -> dict[str, str]:
        """Members that refused to open this audit, and why."""
        audit = self.audits.get(query_id)
        return {} if audit is None else dict(audit.refused)

    def retry(self, query_id: bytes, members: list[str]) -> list[tuple[str, OpenRequest]]:
        """Forget these members' refusals of one audit and ask them again (e.g. a
        member that refused with ``not_over``: our request overtook the Result)."""
        audit = self.audits.get(query_id)
        if audit is None:
            return []
        for m in members:
            if audit.refused.pop(m, None) is not None:
                self.refusals[m] -= 1  # asked again: the earlier refusal does not count
        return [(m, OpenRequest(query_id=query_id)) for m in members if m in audit.commitments]

    def on_opening(self, member: str, opening: Opening) -> bool:
        """Verify and record one opening; True when it opened the commitment."""
        ok = self._on_opening(member, opening)
        if self.listener is not None and opening.query_id in self.audits:
            self.listener(opening.query_id, member, ok)
        return ok

    def _on_opening(self, member: str, opening: Opening) -> bool:
        audit = self.audits.get(opening.query_id)
        if audit is None or member not in audit.commitments or member in audit.opened:
            return False
        if opening.refused:
            audit.refused[member] = opening.refused
            self.refusals[member] += 1
            return False
        ok = verify_opening(
            audit.commitments[member], opening.query_id, member, opening.vector, opening.nonce
        )
        if not ok:
            self.bad[member] += 1
            audit.bad[member] = None
            return False
        vector = fixedpoint.decode(fixedpoint.from_bytes(opening.vector))
        audit.opened[member] = vector
        self.opened[member] += 1
        label = int(self.decide(vector[None, :])[0])
        self.hits[member] += int(label == audit.label)
        return True

    def accuracy(self, members: list[str], *, shrinkage: float = 10.0) -> npt.NDArray[np.float64]:
        """Each member's audit accuracy shrunk towards the mean of those audited
        (no chance gate: for committee choice); the mean for a member never opened,
        0 for one caught opening badly."""
        hits = np.array([self.hits[m] for m in members], dtype=np.float64)
        audits = np.array([self.opened[m] for m in members], dtype=np.float64)
        seen = audits > 0
        if not seen.any():
            return np.zeros(len(members))
        prior = float((hits[seen] / audits[seen]).mean())
        out: npt.NDArray[np.float64] = (hits + shrinkage * prior) / (audits + shrinkage)
        out[[self.bad[m] > 0 for m in members]] = 0.0
        return out

    def scores(
        self,
        members: list[str],
        *,
        shrinkage: float = 10.0,
        shapley: npt.ArrayLike | None = None,
    ) -> npt.NDArray[np.float64]:
        """Merit scores of ``members`` (0 for a member never opened); a member
        caught opening badly scores 0. ``shapley`` (per member, e.g. its mean
        Shapley value over its audits) lets a member whose own hits do not beat
        chance still score when it helps the collective (see merit.py)."""
        hits = np.array([self.hits[m] for m in members], dtype=np.float64)
        audits = np.array([self.opened[m] for m in members], dtype=np.float64)
        out = np.zeros(len(members))
        seen = audits > 0
        if not seen.any():
            return out
        gate = None if shapley is None else np.asarray(shapley, dtype=np.float64)[seen]
        # The gate of benchmarks/fairness.py (its chosen hyperparameters): with a
        # Shapley value, a member passes on hits beating chance at 0.999, or a
        # positive Shapley value, or hits beating chance at 0.95 without clearly
        # hurting the collective (Shapley >= -0.02).
        out[seen] = accuracy_merit(
            hits[seen],
            audits[seen],
            n_classes=self.n_classes,
            shrinkage=shrinkage,
            shapley=gate,
            strict_level=None if gate is None else 0.999,
            harm=0.02,
        )
        out[[self.bad[m] > 0 for m in members]] = 0.0
        return out
