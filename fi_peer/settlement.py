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
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections import Counter
from pathlib import Path

from eth_account.signers.local import LocalAccount

from fi_peer.chain.client import ChainClient, QueryStatus
from fi_peer.chain.commitments import CommitmentStatement, RegistryDomain, sign_commitment
from fi_peer.chain.errors import ChainError, ChainUnavailable, ContractRevert, InvalidReceipt
from fi_peer.chain.receipts import PaymentReceipt, ReceiptDomain, sign_receipt, verify_receipt
from fi_peer.chain.sqlite import SqliteStore
from fi_peer.chain.store import ReceiptState, ReceiptStore
from fi_peer.chain.terms import QueryTerms, Settlement, checksum, plan_batches
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

    def entries(self, *states: EscrowState) -> list[tuple[QueryTerms, int | None, EscrowState]]:
        """(terms, delivered bitmap if known, state) of every escrow in ``states``
        (all if none given), oldest first."""
        wanted = [st.value for st in (states or tuple(EscrowState))]
        rows = self._db.execute(
            "SELECT query_id, querier, committee, price_wei, deadline, delivered, state"
            " FROM chain_escrows WHERE chain_id = ? AND escrow = ?"
            f" AND state IN ({', '.join('?' * len(wanted))}) ORDER BY rowid",
            (self.domain.chain_id, self.domain.escrow, *wanted),
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
                for batch in plan_batches(todo):
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
            EscrowState.OPEN, EscrowState.SETTLING, EscrowState.HELD
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
