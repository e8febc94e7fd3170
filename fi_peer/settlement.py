"""Paying for queries on chain: the protocol core's payment interface over the
chain client, and the querier's settlement batcher.

- :class:`EthPayments` is the pure ``Payments`` object the core is given: the
  peer's Ethereum account signs EIP-712 receipts (and checks them) for one
  escrow contract on one chain; no chain access.
- :class:`Settler` is the agent's chain adapter: it opens and checks escrows,
  keeps receipts, settles in batches, claims after deadlines and withdraws.
- :func:`chain_terms` turns the core's :class:`EscrowTerms` into the chain's
  :class:`QueryTerms` (checksummed, committee sorted as the contract wants).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from eth_account.signers.local import LocalAccount

from fi_peer.chain.client import ChainClient
from fi_peer.chain.errors import ChainError, ContractRevert, InvalidReceipt
from fi_peer.chain.receipts import PaymentReceipt, ReceiptDomain, sign_receipt, verify_receipt
from fi_peer.chain.store import ReceiptState, ReceiptStore
from fi_peer.chain.terms import QueryTerms, Settlement, checksum, plan_batches
from fi_peer.protocol.effects import QueryOutcome
from fi_peer.protocol.messages import Receipt
from fi_peer.protocol.payment import EscrowTerms

log = logging.getLogger(__name__)

# Time after a query's answer deadline for the querier to settle on chain
# (members claim with their receipts after it).
DEFAULT_SETTLE_WINDOW_S = 60


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
    ) -> None:
        self.account = account
        self.domain = domain
        self.settle_window_s = settle_window_s

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


class Settler:
    """One peer's side of payment on chain, for the agent (its ``chain`` adapter).

    As a querier: opens escrows (``open_escrow``), collects what each paid query
    delivered (``on_outcome``) and settles them in batches with ``settleBatch``,
    every ``every_queries`` queries or ``every_s`` seconds (:meth:`run`), and
    settles an escrow that opened after its query ended (nothing delivered) so
    that its whole deposit is refunded. As a member: checks escrows
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
    ) -> None:
        if every_queries < 1 or every_s <= 0 or claim_every_s <= 0:
            raise ValueError("settlement intervals must be positive")
        self.client = client
        self.store = store
        self.every_queries = every_queries
        self.every_s = every_s
        self.claim_every_s = claim_every_s
        self.auto_withdraw = auto_withdraw
        self.pending: list[Settlement] = []
        self.metrics: Counter[str] = Counter()
        self._lock = asyncio.Lock()
        self._flushed = asyncio.Event()

    # -- the agent's adapter ------------------------------------------------------
    async def open_escrow(self, terms: EscrowTerms) -> bool:
        try:
            await self.client.open_query(chain_terms(terms))
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
        self.pending.append(Settlement(terms, terms.mask_of(delivered)))
        if len(self.pending) >= self.every_queries:
            await self.flush()

    async def flush(self) -> int:
        """Settle everything pending now; the number of queries settled."""
        async with self._lock:
            todo, self.pending = self.pending, []
            # Past its deadline a query cannot be settled (its members claim instead):
            # one such query would make the whole batch revert.
            try:
                now = await self.client.chain_time()
            except ChainError:
                log.exception("reading the chain time failed")
                now = 0
            late = [s for s in todo if s.terms.deadline <= now]
            if late:
                self.metrics["settle.too_late"] += len(late)
                todo = [s for s in todo if s.terms.deadline > now]
            done = 0
            for batch in plan_batches(todo):
                try:
                    await self.client.settle_batch(batch)
                except (ChainError, ValueError):
                    log.exception("settling a batch of %d queries failed", len(batch))
                    self.metrics["settle.failed"] += len(batch)
                    continue
                done += len(batch)
                self.metrics["settle.batches"] += 1
                self.metrics["settle.queries"] += len(batch)
            self._flushed.set()
            return done

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
        """Settle every ``every_s`` seconds and claim every ``claim_every_s`` (until cancelled)."""
        loop = asyncio.get_running_loop()
        next_settle = loop.time() + self.every_s
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
                    if self.auto_withdraw:
                        await self.withdraw()
            except (ChainError, ValueError):
                log.exception("settlement round failed")
                self.metrics["rounds.failed"] += 1
