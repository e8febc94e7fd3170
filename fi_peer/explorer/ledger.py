"""What the explorer shows, computed from the indexed events alone. Pure.

:func:`build_ledger` folds the escrow's and the registry's events, in chain
order, into queries (keyed by querier and query id: ids are scoped to their
querier on chain), accounts and totals. It needs, besides the events, the
sender of each settlement transaction (``QuerySettled`` does not name the
querier: it is the transaction's sender) and block times; :class:`TxInfo`
carries both, read by :mod:`fi_peer.explorer.source`.

Pay per member and query is ``QueryOpened.committee`` x ``QuerySettled.delivered``
x price (or, for a query settled by the querier's reward rule with
``settleWeighted``, the per-seat amounts of the ``WeightedSettled`` event that
follows its ``QuerySettled``), plus any ``Claimed`` amount; ``Credited`` is a per-transaction sum
(one per member per settle or settleBatch) and is what account earnings add up.
An account's escrow balance must equal credited + claimed + refunded (as a
querier) − withdrawn; the pages show it next to ``balanceOf`` from the chain.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fi_peer.chain.indexer import IndexedEvent


@dataclass(frozen=True, slots=True, kw_only=True)
class TxInfo:
    """One transaction of (or to) our contracts, from its receipt and body."""

    hash: bytes
    block_number: int
    index: int
    sender: str
    to: str | None
    status: bool
    gas_used: int
    gas_price: int  # effective price per gas, wei
    value: int
    input: bytes
    contract_address: str | None = None
    timestamp: int | None = None

    @property
    def fee_wei(self) -> int:
        return self.gas_used * self.gas_price

    @property
    def selector(self) -> bytes:
        return self.input[:4]


class QueryState(enum.Enum):
    OPEN = "open"  # escrowed, not settled
    HELD = "held"  # settled, some shares undelivered and held for claims
    SETTLED = "settled"  # settled with every share delivered (closed)
    REFUNDED = "refunded"  # what was held went back to the querier (closed)


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One entry of a query's or an account's timeline."""

    kind: str  # opened | settled | claimed | refunded | credited | withdrawn | registered ...
    block_number: int
    tx_hash: bytes
    log_index: int
    timestamp: int | None
    amount: int = 0
    account: str | None = None
    detail: str = ""


@dataclass(slots=True, kw_only=True)
class Payout:
    settled: int = 0  # credited by the querier's settlement of this query
    claimed: int = 0  # paid by the member's claim with a receipt

    @property
    def total(self) -> int:
        return self.settled + self.claimed


@dataclass(slots=True, kw_only=True)
class Query:
    query_id: bytes
    querier: str
    price: int
    deadline: int
    committee: tuple[str, ...]
    timeline: list[Step] = field(default_factory=list)
    delivered: int | None = None  # bitmap of the settlement (None: not settled)
    refunded: int = 0
    refunded_at: Step | None = None
    payouts: dict[str, Payout] = field(default_factory=dict)
    weighted: bool = False  # settled by a reward rule (settleWeighted), not price per share

    @property
    def key(self) -> tuple[str, bytes]:
        return (self.querier, self.query_id)

    @property
    def escrow_wei(self) -> int:
        return self.price * len(self.committee)

    @property
    def paid_wei(self) -> int:
        return sum(p.total for p in self.payouts.values())

    @property
    def held_wei(self) -> int:
        """Still in escrow for this query (claimable or refundable)."""
        return self.escrow_wei - self.paid_wei - self.refunded

    @property
    def opened(self) -> Step:
        return self.timeline[0]

    @property
    def state(self) -> QueryState:
        if self.refunded_at is not None:
            return QueryState.REFUNDED
        if self.delivered is None:
            return QueryState.OPEN
        if self.delivered == (1 << len(self.committee)) - 1:
            return QueryState.SETTLED
        return QueryState.HELD

    @property
    def claimed(self) -> bool:
        return any(p.claimed for p in self.payouts.values())

    def tx_hashes(self) -> list[bytes]:
        seen: dict[bytes, None] = {}
        for step in self.timeline:
            seen.setdefault(step.tx_hash, None)
        return list(seen)


@dataclass(slots=True, kw_only=True)
class Registration:
    ed25519: bytes
    x25519: bytes
    stake: int
    registered: bool = True
    unbonding_ends: int | None = None


@dataclass(slots=True, kw_only=True)
class Account:
    address: str
    credited: int = 0
    claimed: int = 0
    refunds: int = 0  # refunds received as a querier
    withdrawn: int = 0
    escrowed: int = 0  # deposited as a querier
    served: list[tuple[str, bytes]] = field(default_factory=list)  # committee seats
    opened: list[tuple[str, bytes]] = field(default_factory=list)  # queries opened
    registration: Registration | None = None
    history: list[Step] = field(default_factory=list)
    slashed: int = 0  # stake lost for equivocation (PeerRegistry.reportEquivocation)
    scores: dict[str, float] = field(default_factory=dict)  # querier -> latest merit score

    @property
    def score(self) -> float | None:
        """Mean of the latest merit score each querier published (None: none)."""
        return sum(self.scores.values()) / len(self.scores) if self.scores else None

    @property
    def earned(self) -> int:
        return self.credited + self.claimed

    @property
    def expected_balance(self) -> int:
        """Escrow balance the events imply (``balanceOf`` must agree)."""
        return self.credited + self.claimed + self.refunds - self.withdrawn


@dataclass(slots=True, kw_only=True)
class GasRow:
    function: str
    count: int = 0
    failed: int = 0
    gas: int = 0
    fee_wei: int = 0


@dataclass(slots=True, kw_only=True)
class Totals:
    queries_opened: int = 0
    queries_settled: int = 0  # settled (all or some delivered)
    queries_refunded: int = 0
    queries_claimed: int = 0  # with at least one claim
    claims: int = 0
    escrowed_wei: int = 0
    paid_wei: int = 0  # settled credits + claims
    refunded_wei: int = 0
    withdrawn_wei: int = 0
    stake_wei: int = 0  # currently staked in the registry
    peers_registered: int = 0
    transactions: int = 0
    failed_transactions: int = 0
    gas_used: int = 0
    fees_wei: int = 0

    @property
    def held_wei(self) -> int:
        """Escrowed and neither paid nor refunded yet."""
        return self.escrowed_wei - self.paid_wei - self.refunded_wei

    @property
    def owed_wei(self) -> int:
        """Credited to balances and not withdrawn yet."""
        return self.paid_wei + self.refunded_wei - self.withdrawn_wei


@dataclass(slots=True, kw_only=True)
class Ledger:
    queries: dict[tuple[str, bytes], Query] = field(default_factory=dict)
    accounts: dict[str, Account] = field(default_factory=dict)
    totals: Totals = field(default_factory=Totals)
    txs: dict[bytes, TxInfo] = field(default_factory=dict)
    events_by_tx: dict[bytes, list[IndexedEvent]] = field(default_factory=dict)
    queries_by_tx: dict[bytes, list[tuple[str, bytes]]] = field(default_factory=dict)
    gas_by_function: dict[str, GasRow] = field(default_factory=dict)
    blocks: dict[int, list[bytes]] = field(default_factory=dict)  # block -> our txs
    problems: list[str] = field(default_factory=list)

    def account(self, address: str) -> Account:
        found = self.accounts.get(address)
        if found is None:
            found = self.accounts[address] = Account(address=address)
        return found

    def queries_with_id(self, query_id: bytes) -> list[Query]:
        return [q for q in self.queries.values() if q.query_id == query_id]

    def search(self, text: str) -> list[Query]:
        """Queries whose id starts with ``text`` (hex, ``0x`` optional), or whose
        querier or a committee member starts with it (case-insensitive)."""
        needle = text.strip().lower()
        if needle.startswith("0x"):
            needle = needle[2:]
        if not needle:
            return list(self.queries.values())
        return [
            q
            for q in self.queries.values()
            if q.query_id.hex().startswith(needle)
            or any(a[2:].lower().startswith(needle) for a in (q.querier, *q.committee))
        ]


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    text = str(value)
    return bytes.fromhex(text[2:] if text.startswith("0x") else text)


def build_ledger(
    events: Iterable[IndexedEvent],
    txs: Mapping[bytes, TxInfo],
    *,
    escrow: str,
    registry: str | None,
    timestamps: Mapping[int, int],
    function_names: Mapping[bytes, str] | None = None,
) -> Ledger:
    """Fold ``events`` (chain order) into a :class:`Ledger`. ``txs`` must hold
    every transaction that emitted a ``QuerySettled``; it may hold more (reverted
    transactions, deployments), which count towards gas and the transaction list.
    ``function_names``: 4-byte selector -> function name, for gas per function."""
    ledger = Ledger(txs=dict(txs))
    for e in events:
        ledger.events_by_tx.setdefault(e.tx_hash, []).append(e)
        step_args = {
            "block_number": e.block_number,
            "tx_hash": e.tx_hash,
            "log_index": e.log_index,
            "timestamp": timestamps.get(e.block_number),
        }
        if e.contract == escrow:
            _escrow_event(ledger, e, step_args, txs)
        elif registry is not None and e.contract == registry:
            _registry_event(ledger, e, step_args)
    _count(ledger, function_names or {})
    return ledger


def _escrow_event(
    ledger: Ledger, e: IndexedEvent, step: dict[str, Any], txs: Mapping[bytes, TxInfo]
) -> None:
    a = e.args
    t = ledger.totals
    query: Query | None
    if e.event == "QueryOpened":
        query = Query(
            query_id=_bytes(a["queryId"]),
            querier=str(a["querier"]),
            price=int(a["price"]),
            deadline=int(a["deadline"]),
            committee=tuple(str(m) for m in a["committee"]),
        )
        if query.key in ledger.queries:  # the contract forbids it; never trust, though
            ledger.problems.append(f"query {query.query_id.hex()} opened twice")
            return
        query.timeline.append(
            Step(kind="opened", amount=query.escrow_wei, account=query.querier, **step)
        )
        query.payouts = {m: Payout() for m in query.committee}
        ledger.queries[query.key] = query
        _link(ledger, e.tx_hash, query.key)
        t.queries_opened += 1
        t.escrowed_wei += query.escrow_wei
        querier = ledger.account(query.querier)
        querier.escrowed += query.escrow_wei
        querier.opened.append(query.key)
        querier.history.append(Step(kind="opened", amount=query.escrow_wei, **step))
        for member in query.committee:
            ledger.account(member).served.append(query.key)
    elif e.event == "QuerySettled":
        tx = txs.get(e.tx_hash)
        query = None if tx is None else ledger.queries.get((tx.sender, _bytes(a["queryId"])))
        if query is None:
            ledger.problems.append(f"settlement in tx 0x{e.tx_hash.hex()} of an unknown query")
            return
        delivered = int(a["delivered"])
        query.delivered = delivered
        paid = int(a["paid"])
        members = [m for i, m in enumerate(query.committee) if delivered >> i & 1]
        for member in members:
            query.payouts[member].settled += query.price
        query.timeline.append(
            Step(
                kind="settled", amount=paid, detail=f"{len(members)}/{len(query.committee)}", **step
            )
        )
        _link(ledger, e.tx_hash, query.key)
        t.queries_settled += 1
        t.paid_wei += paid
    elif e.event == "WeightedSettled":
        tx = txs.get(e.tx_hash)
        query = None if tx is None else ledger.queries.get((tx.sender, _bytes(a["queryId"])))
        amounts = [int(x) for x in a["amounts"]]
        if query is None or query.delivered is None or len(amounts) != len(query.committee):
            ledger.problems.append(f"weighted settlement in tx 0x{e.tx_hash.hex()} does not fit")
            return
        query.weighted = True
        for i, member in enumerate(query.committee):
            if query.delivered >> i & 1:
                query.payouts[member].settled += amounts[i] - query.price
    elif e.event == "Credited":
        credited = ledger.account(str(a["member"]))
        credited.credited += int(a["amount"])
        credited.history.append(Step(kind="credited", amount=int(a["amount"]), **step))
    elif e.event == "Claimed":
        key = (str(a["querier"]), _bytes(a["queryId"]))
        query = ledger.queries.get(key)
        amount = int(a["amount"])
        member_address = str(a["member"])
        if query is None or member_address not in query.payouts:
            ledger.problems.append(f"claim in tx 0x{e.tx_hash.hex()} of an unknown query")
            return
        if not query.claimed:
            t.queries_claimed += 1
        query.payouts[member_address].claimed += amount
        query.timeline.append(Step(kind="claimed", amount=amount, account=member_address, **step))
        _link(ledger, e.tx_hash, key)
        t.claims += 1
        t.paid_wei += amount
        claimer = ledger.account(member_address)
        claimer.claimed += amount
        claimer.history.append(Step(kind="claimed", amount=amount, **step))
    elif e.event == "Refunded":
        key = (str(a["querier"]), _bytes(a["queryId"]))
        query = ledger.queries.get(key)
        amount = int(a["amount"])
        if query is None:
            ledger.problems.append(f"refund in tx 0x{e.tx_hash.hex()} of an unknown query")
            return
        query.refunded += amount
        query.refunded_at = Step(kind="refunded", amount=amount, account=query.querier, **step)
        query.timeline.append(query.refunded_at)
        _link(ledger, e.tx_hash, key)
        t.queries_refunded += 1
        t.refunded_wei += amount
        querier = ledger.account(query.querier)
        querier.refunds += amount
        querier.history.append(Step(kind="refunded", amount=amount, **step))
    elif e.event == "Withdrawn":
        account = ledger.account(str(a["account"]))
        account.withdrawn += int(a["amount"])
        account.history.append(Step(kind="withdrawn", amount=int(a["amount"]), **step))
        t.withdrawn_wei += int(a["amount"])


def _registry_event(ledger: Ledger, e: IndexedEvent, step: dict[str, Any]) -> None:
    a = e.args
    if e.event == "ScorePublished":
        member = ledger.account(str(a["member"]))
        member.scores[str(a["querier"])] = int(a["scorePpm"]) / 1_000_000
        return
    if e.event == "Equivocated":
        member = ledger.account(str(a["member"]))
        member.slashed += int(a["slashed"])
        if member.registration is not None:
            member.registration.stake = 0
            member.registration.registered = False
        member.history.append(Step(kind="slashed", amount=int(a["slashed"]), **step))
        return
    account = ledger.account(str(a["account"]))
    reg = account.registration
    if e.event == "Registered":
        account.registration = Registration(
            ed25519=_bytes(a["ed25519"]), x25519=_bytes(a["x25519"]), stake=int(a["stake"])
        )
        account.history.append(Step(kind="registered", amount=int(a["stake"]), **step))
    elif reg is None:
        ledger.problems.append(f"{e.event} of unregistered {account.address}")
    elif e.event == "KeysUpdated":
        reg.ed25519, reg.x25519 = _bytes(a["ed25519"]), _bytes(a["x25519"])
        account.history.append(Step(kind="keys updated", **step))
    elif e.event == "StakeAdded":
        reg.stake = int(a["stake"])
        account.history.append(Step(kind="stake added", amount=int(a["amount"]), **step))
    elif e.event == "Deregistered":
        reg.registered = False
        reg.unbonding_ends = int(a["unbondingEnds"])
        account.history.append(Step(kind="deregistered", **step))
    elif e.event == "StakeWithdrawn":
        reg.stake = 0
        account.history.append(Step(kind="stake withdrawn", amount=int(a["amount"]), **step))


def _link(ledger: Ledger, tx_hash: bytes, key: tuple[str, bytes]) -> None:
    keys = ledger.queries_by_tx.setdefault(tx_hash, [])
    if key not in keys:
        keys.append(key)


def _count(ledger: Ledger, names: Mapping[bytes, str]) -> None:
    t = ledger.totals
    for account in ledger.accounts.values():
        reg = account.registration
        if reg is not None:
            t.stake_wei += reg.stake
            t.peers_registered += reg.registered
    for tx_hash in ledger.events_by_tx:
        if tx_hash not in ledger.txs:
            ledger.problems.append(f"no receipt for tx 0x{tx_hash.hex()}")
    for tx in sorted(ledger.txs.values(), key=lambda x: (x.block_number, x.index)):
        ledger.blocks.setdefault(tx.block_number, []).append(tx.hash)
        t.transactions += 1
        t.failed_transactions += not tx.status
        t.gas_used += tx.gas_used
        t.fees_wei += tx.fee_wei
        name = "deploy" if tx.to is None else names.get(tx.selector, "other")
        row = ledger.gas_by_function.setdefault(name, GasRow(function=name))
        row.count += 1
        row.failed += not tx.status
        row.gas += tx.gas_used
        row.fee_wei += tx.fee_wei
