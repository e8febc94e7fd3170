"""Paying for queries on chain: the protocol core's payment interface over the
chain client, and the querier's settlement batcher.

- :class:`EthPayments` is the pure ``Payments`` object the core is given: the
  peer's Ethereum account signs EIP-712 receipts (and checks them) for one
  escrow contract on one chain; no chain access.
- :class:`Settler` is the agent's chain adapter: it opens and checks escrows,
  keeps receipts, settles in batches, claims after deadlines and withdraws.
- :class:`EscrowBook` is the querier's durable list of its own escrows, so that
  a restarted querier still settles what it owes and refunds what nobody earned.
- :func:`chain_terms` turns the core's :class:`EscrowTerms` into the chain's
  :class:`QueryTerms` (checksummed, committee sorted as the contract wants).
- :class:`RewardPolicy` is the querier's reward rule at settlement (``equal``,
  ``merit``, ``agreement``, ``entropy``) and its per-member contribution scores
  from opened audit queries (leave-one-out, truncated Monte-Carlo Shapley,
  accuracy merit), kept in a JSON file across restarts. With a rule other than
  ``equal`` the Settler settles each query with ``settleWeighted`` (the
  delivered shares' money split by the rule's weights, each delivered member
  at least the contract's floor); queries whose split comes out equal (no
  audits yet) still go in ``settleBatch``. Deviation from DESIGN.md
  ("Incentives: paid per delivered share at the agreed price"): that stays the
  default and the floor; a querier that opts into a rule redistributes the
  same total (contracts/README.md, "Reward rules").
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import math
import os
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from eth_account.signers.local import LocalAccount

from fi_peer.chain.client import ChainClient, QueryStatus
from fi_peer.chain.commitments import CommitmentStatement, RegistryDomain, sign_commitment
from fi_peer.chain.errors import ChainError, ChainUnavailable, ContractRevert, InvalidReceipt
from fi_peer.chain.receipts import PaymentReceipt, ReceiptDomain, sign_receipt, verify_receipt
from fi_peer.chain.sqlite import SqliteStore
from fi_peer.chain.store import ReceiptState, ReceiptStore
from fi_peer.chain.terms import (
    QueryTerms,
    Settlement,
    WeightedSettlement,
    checksum,
    plan_batches,
)
from fi_peer.incentives.rewards import REWARD_RULES, audit_rule_shares, settlement_amounts
from fi_peer.incentives.scores import Decider, Distribution, audit_contributions
from fi_peer.protocol.audit import AuditBook
from fi_peer.protocol.effects import QueryOutcome
from fi_peer.protocol.messages import Receipt
from fi_peer.protocol.payment import EscrowTerms

log = logging.getLogger(__name__)

# Time after a query's answer deadline for the querier to settle on chain
# (members claim with their receipts after it).
DEFAULT_SETTLE_WINDOW_S = 60
# A settlement is sent only if its query's deadline is further than this ahead of
# the chain's clock: the block that mines it is later than the block read.
SETTLE_MARGIN_S = 0
# Settlement attempts per query before it is left to claims and the refund.
MAX_SETTLE_ATTEMPTS = 5


class EscrowState(enum.Enum):
    OPEN = "open"  # escrowed; how the query ended is not known (yet)
    SETTLING = "settling"  # ended: what it delivered is known, to settle
    HELD = "held"  # settled (or too late to): the rest is refunded after the grace
    CLOSED = "closed"  # nothing left in the escrow for this query


_BOOK_SCHEMA = """
CREATE TABLE IF NOT EXISTS chain_escrows (
    chain_id INTEGER NOT NULL,
    escrow TEXT NOT NULL,
    query_id BLOB NOT NULL,
    querier TEXT NOT NULL,
    committee TEXT NOT NULL,
    price_wei TEXT NOT NULL,
    deadline INTEGER NOT NULL,
    delivered INTEGER,
    state TEXT NOT NULL,
    PRIMARY KEY (chain_id, escrow, query_id)
);
"""


class EscrowBook(SqliteStore):
    """The querier's own escrows and where each stands, in sqlite (or ``":memory:"``):
    written before anything depends on it, so a querier killed at any point
    finds after a restart what to settle (``SETTLING``) and what to refund
    once the claim grace is over (``OPEN``, ``HELD``)."""

    def __init__(self, path: Path | str, domain: ReceiptDomain) -> None:
        self.domain = domain
        super().__init__(path, _BOOK_SCHEMA, "escrow book")

    def opened(self, terms: QueryTerms) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO chain_escrows VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                (
                    self.domain.chain_id,
                    self.domain.escrow,
                    terms.query_id,
                    terms.querier,
                    json.dumps(list(terms.committee)),
                    str(terms.price_wei),
                    terms.deadline,
                    EscrowState.OPEN.value,
                ),
            )

    def mark(self, terms: QueryTerms, state: EscrowState, delivered: int | None = None) -> None:
        self.opened(terms)
        with self._tx() as db:
            db.execute(
                "UPDATE chain_escrows SET state = ?, delivered = COALESCE(?, delivered)"
                " WHERE chain_id = ? AND escrow = ? AND query_id = ?",
                (state.value, delivered, self.domain.chain_id, self.domain.escrow, terms.query_id),
            )

    def entries(
        self, *states: EscrowState, deadline_before: int | None = None
    ) -> list[tuple[QueryTerms, int | None, EscrowState]]:
        """(terms, delivered bitmap if known, state) of every escrow in ``states``
        (all if none given), oldest first; ``deadline_before``: only those whose
        deadline is earlier (filtered in SQL: refund_due polls this every round)."""
        wanted = [st.value for st in (states or tuple(EscrowState))]
        due = "" if deadline_before is None else " AND deadline < ?"
        rows = self._db.execute(
            "SELECT query_id, querier, committee, price_wei, deadline, delivered, state"
            " FROM chain_escrows WHERE chain_id = ? AND escrow = ?"
            f" AND state IN ({', '.join('?' * len(wanted))}){due} ORDER BY rowid",
            (
                self.domain.chain_id,
                self.domain.escrow,
                *wanted,
                *(() if deadline_before is None else (deadline_before,)),
            ),
        ).fetchall()
        out = []
        for query_id, querier, committee, price, deadline, delivered, state in rows:
            terms = QueryTerms(
                query_id=bytes(query_id),
                querier=checksum(querier),
                committee=tuple(checksum(a) for a in json.loads(committee)),
                price_wei=int(price),
                deadline=int(deadline),
            )
            out.append((terms, None if delivered is None else int(delivered), EscrowState(state)))
        return out


def chain_terms(terms: EscrowTerms) -> QueryTerms:
    """The chain's form of the core's escrow terms."""
    return QueryTerms.create(
        query_id=terms.query_id,
        querier=terms.querier,
        committee=terms.committee,
        price_wei=terms.price_wei,
        deadline=terms.deadline_s,
    )


class EthPayments:
    """The protocol core's ``Payments``: sign and check receipts with an Ethereum
    account, for the escrow ``domain`` names. Pure."""

    def __init__(
        self,
        account: LocalAccount,
        domain: ReceiptDomain,
        *,
        settle_window_s: int = DEFAULT_SETTLE_WINDOW_S,
        registry: RegistryDomain | None = None,
    ) -> None:
        self.account = account
        self.domain = domain
        self.settle_window_s = settle_window_s
        self.registry = registry

    @property
    def eth_address(self) -> str:
        return str(self.account.address)

    def escrow_deadline_s(self, answer_deadline_ms: int) -> int:
        return -(-answer_deadline_ms // 1000) + self.settle_window_s

    def sign_receipt(self, query_id: bytes, member: str, amount_wei: int) -> bytes:
        receipt = PaymentReceipt(query_id=query_id, member=checksum(member), amount_wei=amount_wei)
        return sign_receipt(self.account, self.domain, receipt)

    def verify_receipt(
        self, query_id: bytes, member: str, amount_wei: int, signature: bytes, querier: str
    ) -> bool:
        try:
            receipt = PaymentReceipt(
                query_id=query_id, member=checksum(member), amount_wei=amount_wei
            )
            verify_receipt(self.domain, receipt, signature, querier)
        except (InvalidReceipt, ValueError):
            return False
        return True

    def sign_commitment(self, querier: str, query_id: bytes, commitment: bytes) -> bytes:
        """A member's EIP-712 statement of its commitment to one query, for the
        registry (fi_peer.chain.commitments); empty without a registry."""
        if self.registry is None:
            return b""
        statement = CommitmentStatement(
            querier=checksum(querier), query_id=query_id, commitment=commitment
        )
        return sign_commitment(self.account, self.registry, statement)


_STAT_KEYS = ("loo_sum", "shapley_sum", "agreement_sum", "entropy_sum", "scored")
SCORES_VERSION = 1
RECENT_WEIGHTED = 64


class RewardPolicy:
    """A querier's reward rule at settlement and its members' contribution scores.

    ``rule``: ``equal`` (price per delivered share), ``merit`` (the accuracy
    merit of fi_peer.incentives.merit from opened audits, with the member's
    mean Shapley value as its chance gate), ``agreement`` / ``entropy`` (the FI
    paper's label-free rules, on the opened audit vectors: for comparison).
    :meth:`on_audit` folds one audit's openings in (per member: leave-one-out
    and truncated Monte-Carlo Shapley on that query, its label-free shares);
    per-member scores are means over the audits the member took part in
    (committees differ from query to query). :meth:`amounts` is what the
    Settler asks at settlement: per seat, the floor plus the rest of the
    delivered money split by the weights (fi_peer.incentives.rewards.
    settlement_amounts), or None for an equal split. A member that was never
    audited is weighted like the mean of the audited members of its committee
    (a stated prior: new peers are not starved); a member caught opening a
    commitment to another vector weighs 0. Counts and score sums are kept in
    ``path`` (JSON, written atomically after every audit; None: in memory).
    """

    def __init__(
        self,
        rule: str,
        book: AuditBook,
        *,
        decide: Decider,
        proba: Distribution | None = None,
        path: Path | None = None,
    ) -> None:
        if rule not in REWARD_RULES:
            raise ValueError(f"unknown reward rule {rule!r} (one of {', '.join(REWARD_RULES)})")
        self.rule = rule
        self.book = book
        self.decide = decide
        self.proba = proba
        self.path = path
        self.stats: dict[str, dict[str, float]] = {}
        self.address_of: dict[str, str] = {}
        # peer id -> Ethereum account of the peers known now (the daemon's membership)
        self.directory: Callable[[], Mapping[str, str]] | None = None
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_WEIGHTED)
        if path is not None:
            self._load(path)

    # -- persistence ------------------------------------------------------------------
    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the contribution scores {path}: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("version") != SCORES_VERSION:
            raise ValueError(f"{path} is not a version-{SCORES_VERSION} score file")
        for peer, row in dict(doc.get("members", {})).items():
            self.stats[str(peer)] = {k: float(row.get(k, 0.0)) for k in _STAT_KEYS}
            self.book.opened[peer] = int(row.get("audits", 0))
            self.book.hits[peer] = int(row.get("hits", 0))
            self.book.bad[peer] = int(row.get("bad", 0))
            self.book.refusals[peer] = int(row.get("refused", 0))
            if row.get("eth"):
                self.address_of[peer] = checksum(str(row["eth"]))

    def save(self) -> None:
        if self.path is None:
            return
        members = {}
        for peer in sorted(self._known()):
            row: dict[str, Any] = {k: self.stats.get(peer, {}).get(k, 0.0) for k in _STAT_KEYS}
            row.update(
                audits=self.book.opened[peer],
                hits=self.book.hits[peer],
                bad=self.book.bad[peer],
                refused=self.book.refusals[peer],
                eth=self.address_of.get(peer, ""),
            )
            members[peer] = row
        doc = {"version": SCORES_VERSION, "rule": self.rule, "members": members}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".scores-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _known(self) -> set[str]:
        book = self.book
        return set(self.stats) | set(book.opened) | set(book.bad) | set(book.refusals)

    # -- scores -----------------------------------------------------------------------
    def learn(self, peer: str, address: str) -> None:
        """``peer``'s Ethereum account (from its signed announcement)."""
        with contextlib.suppress(ValueError):
            self.address_of[peer] = checksum(address)

    def refresh(self) -> None:
        """Learn the accounts of the peers known now (see ``directory``)."""
        if self.directory is not None:
            for peer, address in self.directory().items():
                self.learn(peer, address)

    def on_audit(self, query_id: bytes) -> bool:
        """Fold one audit's verified openings into the scores; False if none opened."""
        vectors = self.book.opened_vectors(query_id)
        label = self.book.label(query_id)
        if not vectors or label is None:
            return False
        seed = int.from_bytes(query_id[:8], "big")
        loo, phi = audit_contributions(
            vectors, label, self.decide, n_classes=self.book.n_classes, proba=self.proba,
            seed=seed,
        )  # fmt: skip
        total = np.sum([vectors[m] for m in sorted(vectors)], axis=0)
        collective = int(self.decide(total[None, :])[0])
        dists = {m: self._distribution(v) for m, v in vectors.items()}
        agreement = audit_rule_shares("agreement", dists, collective)
        entropy = audit_rule_shares("entropy", dists, collective)
        for m in vectors:
            row = self.stats.setdefault(m, dict.fromkeys(_STAT_KEYS, 0.0))
            row["loo_sum"] += loo[m]
            row["shapley_sum"] += phi[m]
            row["agreement_sum"] += agreement[m]
            row["entropy_sum"] += entropy[m]
            row["scored"] += 1
        return True

    def _distribution(self, vector: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        if self.proba is not None:
            return np.asarray(self.proba(vector[None, :])[0], dtype=np.float64)
        one_hot = np.zeros(self.book.n_classes)
        one_hot[int(self.decide(vector[None, :])[0])] = 1.0
        return one_hot

    def _mean(self, peer: str, key: str) -> float | None:
        row = self.stats.get(peer)
        if not row or row["scored"] <= 0:
            return None
        return row[key] / row["scored"]

    def weights(self, peers: list[str]) -> list[float] | None:
        """The rule's weight of each of ``peers`` (one committee); None: equal."""
        if self.rule == "equal" or not peers:
            return None
        if self.rule == "merit":
            shapley = [self._mean(p, "shapley_sum") or 0.0 for p in peers]
            raw: list[float | None] = [
                float(v) if self.book.opened[p] > 0 else None
                for p, v in zip(peers, self.book.scores(peers, shapley=shapley), strict=True)
            ]
        else:
            raw = [self._mean(p, f"{self.rule}_sum") for p in peers]
        for i, p in enumerate(peers):
            if self.book.bad[p] > 0:
                raw[i] = 0.0
        known = [v for v in raw if v is not None]
        if not known:
            return None
        prior = float(np.mean(known))
        return [prior if v is None else max(0.0, v) for v in raw]

    def amounts(self, terms: QueryTerms, delivered: int) -> tuple[int, ...] | None:
        """Per-seat pay of one query under the rule; None when it is the equal split."""
        if self.rule == "equal" or delivered == 0:
            return None
        self.refresh()
        peer_of = {a: p for p, a in self.address_of.items()}
        peers = [peer_of.get(a, f"?{a}") for a in terms.committee]
        weights = self.weights(peers)
        if weights is None:
            return None
        seats = [bool(delivered >> i & 1) for i in range(terms.size)]
        amounts = settlement_amounts(
            terms.price_wei, seats, weights, min_share_wei=terms.min_share_wei
        )
        if all(a == (terms.price_wei if d else 0) for a, d in zip(amounts, seats, strict=True)):
            return None
        for old in [r for r in self.recent if r["query_id"] == terms.query_id.hex()]:
            self.recent.remove(old)  # computed again (a retried settlement): keep the last
        self.recent.append(
            {
                "query_id": terms.query_id.hex(),
                "rule": self.rule,
                "price_wei": terms.price_wei,
                "committee": list(terms.committee),
                "delivered": delivered,
                "weights": weights,
                "amounts": amounts,
            }
        )
        return tuple(amounts)

    def table(self) -> list[dict[str, Any]]:
        """Per member: audits, hits, refusals, bad openings and every score (status)."""
        self.refresh()
        peers = sorted(self._known())
        if not peers:
            return []
        shapley = [self._mean(p, "shapley_sum") or 0.0 for p in peers]
        merit = self.book.scores(peers, shapley=shapley)
        accuracy = self.book.accuracy(peers)
        rows = []
        for i, p in enumerate(peers):
            rows.append(
                {
                    "peer_id": p,
                    "eth": self.address_of.get(p, ""),
                    "audits": int(self.book.opened[p]),
                    "hits": int(self.book.hits[p]),
                    "refused": int(self.book.refusals[p]),
                    "bad": int(self.book.bad[p]),
                    "accuracy": _finite(accuracy[i]) if self.book.opened[p] else None,
                    "merit": _finite(merit[i]),
                    "loo": self._mean(p, "loo_sum"),
                    "shapley": self._mean(p, "shapley_sum"),
                    "agreement": self._mean(p, "agreement_sum"),
                    "entropy": self._mean(p, "entropy_sum"),
                }
            )
        return rows


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(float(value)) else None


class Settler:
    """One peer's side of payment on chain, for the agent (its ``chain`` adapter).

    As a querier: opens escrows (``open_escrow``), collects what each paid query
    delivered (``on_outcome``) and settles them in batches with ``settleBatch``,
    every ``every_queries`` queries or ``every_s`` seconds (:meth:`run`), and
    settles an escrow that opened after its query ended (nothing delivered) so
    that its whole deposit is refunded. Every escrow is in the :class:`EscrowBook`
    first: after a restart what was owed is settled (:meth:`resume`), and once a
    query's claim grace is over whatever is still held (undelivered shares, or a
    query never settled) is refunded (:meth:`refund_due`). A batch that fails
    (reverted, or the chain unreachable) loses nothing: each of its queries is
    looked up on chain, and those still open are settled again (up to
    ``MAX_SETTLE_ATTEMPTS`` times while their deadline allows; after that the
    members claim and the rest is refunded). As a member: checks escrows
    (``verify_escrow``), keeps each signed receipt with its terms in the
    ReceiptStore (``on_paid``), and after a query's on-chain deadline claims
    what the querier did not settle; ``withdraw`` moves the credited balance
    out. Chain errors are logged and counted, never raised into the agent.
    """

    def __init__(
        self,
        client: ChainClient,
        store: ReceiptStore,
        *,
        every_queries: int = 10,
        every_s: float = 5.0,
        claim_every_s: float = 5.0,
        auto_withdraw: bool = False,
        book_path: Path | str = ":memory:",
        settle_margin_s: int = SETTLE_MARGIN_S,
        rewards: RewardPolicy | None = None,
    ) -> None:
        if every_queries < 1 or every_s <= 0 or claim_every_s <= 0:
            raise ValueError("settlement intervals must be positive")
        self.client = client
        self.store = store
        self.book = EscrowBook(book_path, store.domain)
        self.every_queries = every_queries
        self.every_s = every_s
        self.claim_every_s = claim_every_s
        self.auto_withdraw = auto_withdraw
        self.settle_margin_s = settle_margin_s
        # The querier's reward rule (None or "equal": settleBatch, price per share).
        self.rewards = rewards
        self.pending: list[Settlement] = []
        self.metrics: Counter[str] = Counter()
        self._attempts: Counter[bytes] = Counter()
        self._grace: int | None = None
        self._lock = asyncio.Lock()
        self._flushed = asyncio.Event()

    def close(self) -> None:
        self.store.close()
        self.book.close()

    # -- the agent's adapter ------------------------------------------------------
    async def open_escrow(self, terms: EscrowTerms) -> bool:
        qt = chain_terms(terms)
        try:
            # Booked before the transaction: if we die while it is mined, the
            # refund sweep still finds the escrow (an unknown query is dropped).
            self.book.opened(qt)
            await self.client.open_query(qt)
        except (ChainError, ValueError):
            log.exception("opening the escrow of query %s failed", terms.query_id.hex())
            self.metrics["escrow.open_failed"] += 1
            return False
        self.metrics["escrow.opened"] += 1
        return True

    async def verify_escrow(self, terms: EscrowTerms) -> bool:
        try:
            return await self.client.verify_escrow(chain_terms(terms))
        except (ChainError, ValueError):
            log.exception("checking the escrow of query %s failed", terms.query_id.hex())
            self.metrics["escrow.verify_failed"] += 1
            return False

    async def on_paid(self, querier: str, terms: EscrowTerms, receipt: Receipt) -> None:
        qt = chain_terms(terms)
        payment = PaymentReceipt(
            query_id=terms.query_id, member=self.client.address, amount_wei=receipt.price_wei
        )
        self.store.put_terms(qt)
        self.store.put_receipt(payment, receipt.payment_sig)
        self.metrics["receipts.kept"] += 1

    async def on_outcome(self, outcome: QueryOutcome) -> None:
        if outcome.escrow is None:
            return
        await self.add(chain_terms(outcome.escrow), outcome.delivered)

    async def on_abandoned(self, terms: EscrowTerms) -> None:
        """An escrow that opened after its query ended: settle it with nobody delivered."""
        await self.add(chain_terms(terms), ())

    # -- settlement -------------------------------------------------------------------
    async def add(self, terms: QueryTerms, delivered: tuple[str, ...]) -> None:
        settlement = Settlement(terms, terms.mask_of(delivered))
        try:
            self.book.mark(terms, EscrowState.SETTLING, settlement.delivered)
        except ChainError:
            log.exception("recording the outcome of query %s failed", terms.query_id.hex())
        self.pending.append(settlement)
        if len(self.pending) >= self.every_queries:
            await self.flush()

    def resume(self) -> int:
        """After a restart: queue again what the book says was owed and not settled."""
        queued = {s.terms.query_id for s in self.pending}
        n = 0
        for terms, delivered, _ in self.book.entries(EscrowState.SETTLING):
            if terms.query_id not in queued and delivered is not None:
                self.pending.append(Settlement(terms, delivered))
                n += 1
        self.metrics["settle.resumed"] += n
        return n

    async def flush(self) -> int:
        """Settle everything pending now; the number of queries settled."""
        async with self._lock:
            todo, self.pending = self.pending, []
            done = 0
            for _ in range(2):  # a failed batch is looked up; its open queries go again
                try:
                    now = await self.client.chain_time()
                except ChainError as exc:
                    log.warning("reading the chain time failed (%s); settling later", exc)
                    self.metrics["settle.deferred"] += len(todo)
                    self.pending = todo + self.pending
                    break
                # Past (or too near) its deadline a query cannot be settled (its
                # members claim, the rest is refunded): one such query would make
                # the whole batch revert.
                todo = self._not_late(todo, now)
                retry: list[Settlement] = []
                weighted, plain = self._by_rule(todo)
                for ws in weighted:
                    settled, again = await self._settle_weighted(ws)
                    done += settled
                    retry += again
                for batch in plan_batches(plain):
                    settled, again = await self._settle(batch)
                    done += settled
                    retry += again
                todo = retry
                if not todo:
                    break
            else:
                self.pending = todo + self.pending  # still failing: the next round
            self._flushed.set()
            return done

    def _not_late(self, todo: list[Settlement], now: int) -> list[Settlement]:
        keep = []
        for s in todo:
            if s.terms.deadline <= now + self.settle_margin_s:
                self.metrics["settle.too_late"] += 1
                self._give_up(s)
            else:
                keep.append(s)
        return keep

    def _give_up(self, s: Settlement) -> None:
        """Left to the members' claims and the refund after the grace."""
        self._attempts.pop(s.terms.query_id, None)
        try:
            self.book.mark(s.terms, EscrowState.HELD)
        except ChainError:
            log.exception("recording query %s failed", s.terms.query_id.hex())

    def _settled(self, s: Settlement) -> None:
        self._attempts.pop(s.terms.query_id, None)
        full = s.delivered == s.terms.full_mask
        try:
            self.book.mark(s.terms, EscrowState.CLOSED if full else EscrowState.HELD)
        except ChainError:
            log.exception("recording query %s failed", s.terms.query_id.hex())

    def _by_rule(self, todo: list[Settlement]) -> tuple[list[WeightedSettlement], list[Settlement]]:
        """Split what is due into weighted settlements (the reward rule pays other
        than equal) and plain ones (settleBatch)."""
        if self.rewards is None or self.rewards.rule == "equal":
            return [], todo
        weighted, plain = [], []
        for s in todo:
            try:
                amounts = self.rewards.amounts(s.terms, s.delivered)
                if amounts is not None:
                    weighted.append(WeightedSettlement(s.terms, s.delivered, amounts))
                    continue
            except ValueError:
                log.exception(
                    "reward rule failed for query %s; paying equal", s.terms.query_id.hex()
                )
                self.metrics["settle.rule_failed"] += 1
            plain.append(s)
        return weighted, plain

    async def _settle_weighted(self, ws: WeightedSettlement) -> tuple[int, list[Settlement]]:
        """Send one settleWeighted: (queries settled, queries to send again)."""
        plain = Settlement(ws.terms, ws.delivered)
        try:
            await self.client.settle_weighted(ws)
        except (ChainError, ValueError) as exc:
            log.warning("weighted settlement of %s failed: %s", ws.terms.query_id.hex(), exc)
            self.metrics["settle.failed_batches"] += 1
            return await self._after_failure([plain], unavailable=isinstance(exc, ChainUnavailable))
        self._settled(plain)
        self.metrics["settle.weighted"] += 1
        self.metrics["settle.queries"] += 1
        return 1, []

    async def _settle(self, batch: list[Settlement]) -> tuple[int, list[Settlement]]:
        """Send one batch: (queries settled, queries to send again)."""
        try:
            await self.client.settle_batch(batch)
        except (ChainError, ValueError) as exc:
            log.warning("settling a batch of %d queries failed: %s", len(batch), exc)
            self.metrics["settle.failed_batches"] += 1
            return await self._after_failure(batch, unavailable=isinstance(exc, ChainUnavailable))
        for s in batch:
            self._settled(s)
        self.metrics["settle.batches"] += 1
        self.metrics["settle.queries"] += len(batch)
        return len(batch), []

    async def _after_failure(
        self, batch: list[Settlement], *, unavailable: bool
    ) -> tuple[int, list[Settlement]]:
        """A batch failed: where does each of its queries stand now? Settled by the
        failed transaction after all (mined late) or before: done. Still open:
        send again (bounded). Anything else: nothing to settle."""
        settled, again = 0, []
        for s in batch:
            try:
                status = await self.client.status(s.terms, s.delivered)
            except ChainError:
                status = None  # the chain is away: keep it for the next round
            if status is QueryStatus.HELD or status is QueryStatus.CLOSED:
                self._settled(s)
                settled += 1
                self.metrics["settle.queries"] += 1
                continue
            if status is None or status is QueryStatus.OPEN:
                self._attempts[s.terms.query_id] += 1
                if unavailable or self._attempts[s.terms.query_id] < MAX_SETTLE_ATTEMPTS:
                    again.append(s)
                    continue
            log.warning("query %s not settled (%s)", s.terms.query_id.hex(), status)
            self.metrics["settle.failed"] += 1
            self._give_up(s)
        return settled, again

    async def refund_due(self) -> int:
        """Refund every escrow of ours whose claim grace is over and that still holds
        something (undelivered shares, or a query never settled); the wei refunded."""
        if self._grace is None:
            self._grace = self.client.deployment.claim_grace_s or await self.client.claim_grace()
        now = await self.client.chain_time()
        pending = {s.terms.query_id for s in self.pending}
        total = 0
        for terms, delivered, _ in self.book.entries(
            EscrowState.OPEN,
            EscrowState.SETTLING,
            EscrowState.HELD,
            deadline_before=now - self._grace,
        ):
            if terms.deadline + self._grace >= now or terms.query_id in pending:
                continue
            status = await self.client.status(terms, delivered)
            if status is QueryStatus.CLOSED or status is QueryStatus.UNKNOWN:
                self.book.mark(terms, EscrowState.CLOSED)  # UNKNOWN: the open never mined
                continue
            try:
                result = await self.client.refund(terms)
            except ContractRevert as exc:
                log.warning("refund of query %s reverted: %s", terms.query_id.hex(), exc)
                if exc.name == "QueryClosed":
                    self.book.mark(terms, EscrowState.CLOSED)
                continue
            amount = sum(int(e.args["amount"]) for e in result.all("Refunded"))
            self.book.mark(terms, EscrowState.CLOSED)
            self.metrics["refunds"] += 1
            self.metrics["refunded_wei"] += amount
            total += amount
        return total

    async def claim_due(self) -> int:
        """Claim every kept receipt whose query's deadline passed; the number claimed."""
        now = await self.client.chain_time()
        claimed = 0
        for stored in self.store.claimable(now):
            r = stored.receipt
            try:
                await self.client.claim(stored.terms, r, stored.signature)
            except ContractRevert as exc:
                if exc.name in ("AlreadyPaid", "AlreadyClaimed"):
                    self.store.mark(r.query_id, r.member, ReceiptState.PAID)
                elif exc.name == "QueryClosed":
                    # closed: settled with everyone delivered (paid), or refunded (lost)
                    mask = await self.client.settled_mask(stored.terms)
                    paid = mask is not None and mask >> stored.terms.position(r.member) & 1
                    state = ReceiptState.PAID if paid else ReceiptState.LOST
                    self.store.mark(r.query_id, r.member, state)
                else:
                    log.warning("claim for query %s reverted: %s", r.query_id.hex(), exc)
                continue
            except ChainError:
                log.exception("claim for query %s failed", r.query_id.hex())
                continue
            self.store.mark(r.query_id, r.member, ReceiptState.CLAIMED)
            claimed += 1
            self.metrics["claims"] += 1
        return claimed

    async def withdraw(self) -> int:
        """Move this account's credited balance out; the amount (0: nothing to take)."""
        if await self.client.balance() == 0:
            return 0
        # Count what the Withdrawn event says moved, not the balance read before the
        # transaction: a settleBatch mined in between credits more, and withdraw()
        # takes it all.
        try:
            result = await self.client.withdraw()
        except ContractRevert as exc:
            if exc.name == "NothingToWithdraw":
                return 0
            raise
        amount = sum(int(e.args["amount"]) for e in result.all("Withdrawn"))
        self.metrics["withdrawn_wei"] += amount
        return amount

    async def run(self) -> None:
        """Settle every ``every_s`` seconds; claim, refund (and withdraw) every
        ``claim_every_s`` (until cancelled). Starts with what a previous run owed."""
        try:
            self.resume()
        except ChainError:
            log.exception("reading the escrow book failed")
        loop = asyncio.get_running_loop()
        next_settle = loop.time() + (0.0 if self.pending else self.every_s)
        next_claim = loop.time() + self.claim_every_s
        while True:
            await asyncio.sleep(max(0.0, min(next_settle, next_claim) - loop.time()))
            try:
                if loop.time() >= next_settle:
                    next_settle = loop.time() + self.every_s
                    if self.pending:
                        await self.flush()
                if loop.time() >= next_claim:
                    next_claim = loop.time() + self.claim_every_s
                    await self.claim_due()
                    await self.refund_due()
                    if self.auto_withdraw:
                        await self.withdraw()
            except ChainUnavailable as exc:  # the node is away: the next round retries
                log.warning("settlement round failed: %s", exc)
                self.metrics["rounds.failed"] += 1
            except (ChainError, ValueError):
                log.exception("settlement round failed")
                self.metrics["rounds.failed"] += 1
