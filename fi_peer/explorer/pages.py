"""The explorer's pages: overview, queries, peers. Render only; no I/O.

Each function takes the :class:`~fi_peer.explorer.source.Snapshot` (and any
live values the server read for it) and returns a whole page as
:class:`~fi_peer.explorer.html.Html`. Blocks and transactions are in
:mod:`fi_peer.explorer.chainpages`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fi_peer.explorer.html import Html, amount_text, hex0x, join, number, tag, wei, when
from fi_peer.explorer.layout import (
    addr,
    block_link,
    facts,
    frame,
    page_of,
    pager,
    query_link,
    section,
    state_badge,
    table,
    tx_link,
)
from fi_peer.explorer.ledger import Account, Query, QueryState
from fi_peer.explorer.source import ChainSource, Snapshot

RECENT = 10


# ── overview ─────────────────────────────────────────────────────────────────


def overview_values(snap: Snapshot) -> dict[str, tuple[str, int | None]]:
    """Live numbers of the overview: key -> (text, wei or None). The page and
    ``/api/overview.json`` share these keys (the page's script polls the JSON)."""
    t = snap.ledger.totals
    counts = {
        "head": f"#{snap.head:,}",
        "indexed_to": f"#{snap.indexed_to:,}",
        "blocks_active": number(len(snap.ledger.blocks)),
        "queries_opened": number(t.queries_opened),
        "queries_settled": number(t.queries_settled),
        "queries_refunded": number(t.queries_refunded),
        "queries_claimed": number(t.queries_claimed),
        "claims": number(t.claims),
        "transactions": number(t.transactions),
        "failed": number(t.failed_transactions),
        "gas_used": number(t.gas_used),
        "peers_registered": number(t.peers_registered),
    }
    amounts = {
        "escrowed": t.escrowed_wei,
        "paid": t.paid_wei,
        "refunded": t.refunded_wei,
        "held": t.held_wei,
        "withdrawn": t.withdrawn_wei,
        "owed": t.owed_wei,
        "fees": t.fees_wei,
        "stake": t.stake_wei,
    }
    values: dict[str, tuple[str, int | None]] = {k: (v, None) for k, v in counts.items()}
    values.update({k: (amount_text(v), v) for k, v in amounts.items()})
    return values


def _stat(label: str, key: str, values: Mapping[str, tuple[str, int | None]]) -> Html:
    text, amount = values[key]
    value = tag(
        "span",
        text,
        class_="value" + (" wei" if amount is not None else ""),
        data_live=key,
        data_wei=amount,
        title=None if amount is None else f"{amount:,} wei",
    )
    return tag("div", tag("span", label, class_="label"), value, class_="stat", id=f"stat-{key}")


def overview(source: ChainSource, snap: Snapshot, contract_eth: int | None) -> Html:
    v = overview_values(snap)
    t = snap.ledger.totals
    info = snap.info
    groups = tag(
        "div",
        tag(
            "div",
            tag("h3", "Chain"),
            _stat("head block", "head", v),
            _stat("indexed to", "indexed_to", v),
            _stat("blocks with activity", "blocks_active", v),
            class_="card",
        ),
        tag(
            "div",
            tag("h3", "Queries"),
            _stat("opened", "queries_opened", v),
            _stat("settled", "queries_settled", v),
            _stat("refunded", "queries_refunded", v),
            _stat("with claims", "queries_claimed", v),
            _stat("claims", "claims", v),
            class_="card",
        ),
        tag(
            "div",
            tag("h3", "Money"),
            _stat("escrowed", "escrowed", v),
            _stat("paid to members", "paid", v),
            _stat("refunded", "refunded", v),
            _stat("held for claims", "held", v),
            _stat("withdrawn", "withdrawn", v),
            _stat("owed (balances)", "owed", v),
            class_="card",
        ),
        tag(
            "div",
            tag("h3", "Gas and peers"),
            _stat("transactions", "transactions", v),
            _stat("reverted", "failed", v),
            _stat("gas used", "gas_used", v),
            _stat("fees paid", "fees", v),
            _stat("registered peers", "peers_registered", v),
            _stat("staked", "stake", v),
            class_="card",
        ),
        class_="cards",
        id="overview",
    )
    expected = t.held_wei + t.owed_wei
    check: Html = Html("")
    if contract_eth is not None and contract_eth == expected:
        check = tag("span", "= held + owed", class_="badge ok", id="conservation")
    elif contract_eth is not None:
        text = f"≠ held + owed = {amount_text(expected)}"
        check = tag("span", text, class_="badge bad", id="conservation")
    contract_facts = facts(
        [
            ("QueryEscrow", addr(info.escrow, full=True)),
            ("escrow's ETH balance", join(wei(contract_eth), " ", check)),
            ("claim grace", f"{info.claim_grace_s:,} s"),
            ("PeerRegistry", addr(info.registry, full=True) if info.registry else "not given"),
            ("minimum stake", wei(info.min_stake_wei)),
            ("unbonding", "–" if info.unbonding_s is None else f"{info.unbonding_s:,} s"),
            ("chain id", str(info.chain_id)),
            ("indexed from block", block_link(info.start_block)),
            ("node", info.client),
            ("Otterscan API", "yes" if info.otterscan else "no (events only)"),
        ],
        id_="contracts",
    )
    recent = list(reversed(snap.ledger.queries.values()))[:RECENT]
    recent_txs = newest_txs(snap)[:RECENT]
    gas_rows = sorted(snap.ledger.gas_by_function.values(), key=lambda r: -r.gas)
    body = join(
        groups,
        section("Latest queries", queries_table(source, snap, recent), id_="latest-queries"),
        section("Latest transactions", txs_table(source, snap, recent_txs), id_="latest-txs"),
        section(
            "Gas by function",
            table(
                ["function", "transactions", "reverted", "gas used", "gas per tx", "fees"],
                [
                    (
                        tag("code", r.function),
                        number(r.count),
                        number(r.failed),
                        number(r.gas),
                        number(r.gas // r.count),
                        wei(r.fee_wei),
                    )
                    for r in gas_rows
                ],
                numeric=(1, 2, 3, 4, 5),
                id_="gas",
            ),
        ),
        section("Contracts", contract_facts),
        _problems(snap),
    )
    return frame("Overview", body, source=source, active="overview")


def _problems(snap: Snapshot) -> Html:
    if not snap.ledger.problems:
        return Html("")
    items = [tag("li", p) for p in snap.ledger.problems[:50]]
    return section("Events that did not fit", tag("ul", items), id_="problems")


# ── queries ──────────────────────────────────────────────────────────────────


def queries_table(source: ChainSource, snap: Snapshot, queries: Sequence[Query]) -> Html:
    return table(
        ["query id", "querier", "k", "price", "paid", "refunded", "state", "opened (UTC)"],
        [
            (
                query_link(q.querier, q.query_id),
                addr(q.querier, source),
                str(len(q.committee)),
                wei(q.price),
                wei(q.paid_wei),
                wei(q.refunded),
                _state(q, snap),
                tag(
                    "span",
                    block_link(q.opened.block_number),
                    " ",
                    when(q.opened.timestamp, short=True),
                    class_="nowrap",
                ),
            )
            for q in queries
        ],
        numeric=(2, 3, 4, 5),
        empty="No queries.",
        id_="queries",
    )


def _state(q: Query, snap: Snapshot) -> Html:
    badge = state_badge(q.state)
    if q.state is QueryState.OPEN and snap.head_time > q.deadline:
        return join(badge, " ", tag("span", "past deadline", class_="badge warn"))
    if q.state is QueryState.HELD and q.held_wei == 0:
        return join(badge, " ", tag("span", "all paid", class_="badge ok"))
    if q.state is QueryState.HELD and snap.head_time > q.deadline + snap.info.claim_grace_s:
        return join(badge, " ", tag("span", "refundable", class_="badge warn"))
    return badge


STATES = ("", "open", "held", "settled", "refunded")


def queries_page(
    source: ChainSource, snap: Snapshot, *, search: str, state: str, page: int
) -> Html:
    found = snap.ledger.search(search)
    if state:
        found = [q for q in found if q.state.value == state]
    found.reverse()  # newest first
    form = tag(
        "form",
        tag(
            "input",
            type="search",
            name="q",
            id="query-search",
            value=search,
            placeholder="query id prefix, querier or member address",
            autocomplete="off",
            maxlength=100,
        ),
        tag(
            "select",
            [tag("option", s or "any state", value=s, selected=s == state) for s in STATES],
            name="state",
            id="query-state",
        ),
        tag("button", "Filter", type="submit", id="query-filter"),
        action="/queries",
        method="get",
        class_="filter",
    )
    shown = page_of(found, page)
    summary = tag(
        "p",
        f"{len(found):,} of {len(snap.ledger.queries):,} queries",
        class_="muted",
        id="query-count",
    )
    body = join(
        form,
        summary,
        queries_table(source, snap, shown),  # type: ignore[arg-type]
        pager("/queries", page, len(found), q=search, state=state),
    )
    return frame("Queries", body, source=source, active="queries", search=search)


def query_page(source: ChainSource, snap: Snapshot, q: Query, balances: Mapping[str, int]) -> Html:
    grace = snap.info.claim_grace_s
    now = snap.head_time
    deadline_note = "passed" if now > q.deadline else f"in {q.deadline - now:,} s"
    refund_note = "open" if now > q.deadline + grace else f"in {q.deadline + grace - now:,} s"
    head = facts(
        [
            ("query id", tag("span", hex0x(q.query_id), class_="mono", id="query-id")),
            ("state", _state(q, snap)),
            ("querier", addr(q.querier, source, full=True)),
            ("price per share", wei(q.price)),
            ("committee", f"{len(q.committee)} members"),
            ("escrowed", wei(q.escrow_wei)),
            ("paid to members", tag("span", wei(q.paid_wei), id="query-paid")),
            ("refunded", wei(q.refunded)),
            ("held now", wei(q.held_wei)),
            ("deadline", join(when(q.deadline), f" ({deadline_note})")),
            ("refundable after", join(when(q.deadline + grace), f" ({refund_note})")),
        ],
        id_="query-facts",
    )
    timeline = tag(
        "ol",
        [
            tag(
                "li",
                tag("span", s.kind, class_=f"step {s.kind}"),
                " ",
                _step_text(q, s.kind, s.amount, s.account, s.detail),
                " · ",
                block_link(s.block_number),
                " ",
                when(s.timestamp),
                " · tx ",
                tx_link(s.tx_hash),
                data_kind=s.kind,
            )
            for s in q.timeline
        ],
        class_="timeline",
        id="timeline",
    )
    rows = []
    for i, member in enumerate(q.committee):
        p = q.payouts[member]
        delivered = "–" if q.delivered is None else ("yes" if q.delivered >> i & 1 else "no")
        rows.append(
            (
                str(i),
                addr(member, source),
                delivered,
                wei(p.settled),
                wei(p.claimed),
                tag("span", wei(p.total), class_="payout", data_member=member),
                wei(balances.get(member)),
            )
        )
    payouts = table(
        ["seat", "member", "delivered", "by settlement", "by claim", "payout", "balance now"],
        rows,
        numeric=(0, 3, 4, 5, 6),
        id_="payouts",
        foot=(
            "",
            "total",
            "",
            wei(q.paid_wei - _claimed(q)),
            wei(_claimed(q)),
            wei(q.paid_wei),
            "",
        ),
    )
    tx_rows = []
    for h in q.tx_hashes():
        info = snap.ledger.txs.get(h)
        kinds = sorted({s.kind for s in q.timeline if s.tx_hash == h})
        tx_rows.append(
            (
                tx_link(h, full=True),
                ", ".join(kinds),
                function_cell(source, info.input if info else b"", info.to if info else None),
                block_link(info.block_number if info else None),
                "–" if info is None else number(info.gas_used),
            )
        )
    txs = table(
        ["transaction", "steps", "call", "block", "gas used"],
        tx_rows,
        numeric=(4,),
        id_="query-txs",
    )
    body = join(
        head,
        section("Timeline", timeline),
        section(
            "Committee and payouts",
            payouts,
            tag(
                "p",
                "Balance now: the member's withdrawable escrow balance (balanceOf, all queries).",
                class_="muted",
            ),
        ),
        section("Transactions", txs),
    )
    return frame(f"Query {hex0x(q.query_id)[:18]}…", body, source=source, active="queries")


def _claimed(q: Query) -> int:
    return sum(p.claimed for p in q.payouts.values())


def _step_text(q: Query, kind: str, amount: int, account: str | None, detail: str) -> Html:
    if kind == "opened":
        return join("escrowed ", wei(amount), f" for {len(q.committee)} shares")
    if kind == "settled":
        rule = " (split by the querier's reward rule: settleWeighted)" if q.weighted else ""
        return join(f"{detail} delivered, paid ", wei(amount), rule)
    if kind == "claimed":
        return join(addr(account), " claimed ", wei(amount), " with a receipt")
    if kind == "refunded":
        return join("refunded ", wei(amount), " to the querier")
    return Html("")


def function_cell(source: ChainSource, data: bytes, to: str | None) -> Html:
    if to is None:
        return tag("code", "deploy")
    name = source.calls.names().get(data[:4])
    return tag("code", name or "unknown")


def query_choices(source: ChainSource, snap: Snapshot, queries: Sequence[Query]) -> Html:
    body = join(
        tag("p", "Several queriers used this query id (ids are scoped to their querier)."),
        queries_table(source, snap, queries),
    )
    return frame("Query id used by several queriers", body, source=source, active="queries")


# ── peers ────────────────────────────────────────────────────────────────────


def _peer_state(a: Account) -> Html:
    reg = a.registration
    if reg is None:
        return tag("span", "not registered", class_="badge muted")
    if a.slashed:
        return tag("span", "slashed (equivocation)", class_="badge bad")
    if reg.registered:
        return tag("span", "registered", class_="badge ok")
    return tag("span", "deregistered", class_="badge warn")


def _score(a: Account) -> Html:
    if a.score is None:
        return tag("span", "–", class_="muted")
    return tag("span", f"{a.score:.3f}", class_="score", title=f"{len(a.scores)} querier(s)")


def _key(data: bytes | None) -> Html:
    if data is None:
        return tag("span", "–", class_="muted")
    text = data.hex()
    return tag("span", f"{text[:8]}…{text[-4:]}", class_="mono key", title=text)


def _balance_cell(a: Account, balances: Mapping[str, int]) -> Html:
    actual = balances.get(a.address)
    if actual is None:
        return tag("span", "–", class_="muted")
    cell = tag("span", wei(actual), class_="balance", data_account=a.address)
    if actual == a.expected_balance:
        return cell
    return join(
        cell, " ", tag("span", f"events say {amount_text(a.expected_balance)}", class_="badge bad")
    )


def peers_page(source: ChainSource, snap: Snapshot, balances: Mapping[str, int]) -> Html:
    accounts = sorted(
        snap.ledger.accounts.values(),
        key=lambda a: (a.registration is None, -a.earned, a.address),
    )
    rows = [
        (
            addr(a.address, source),
            _peer_state(a),
            _key(a.registration.ed25519 if a.registration else None),
            _key(a.registration.x25519 if a.registration else None),
            wei(a.registration.stake if a.registration else None),
            number(len(a.served)),
            tag("span", wei(a.earned), class_="earned"),
            wei(a.withdrawn),
            _balance_cell(a, balances),
            _score(a),
        )
        for a in accounts
    ]
    body = join(
        table(
            [
                "account",
                "status",
                "Ed25519 (peer id)",
                "X25519",
                "stake",
                "seats",
                "earned",
                "withdrawn",
                "balance (balanceOf)",
                "merit score",
            ],
            rows,
            numeric=(4, 5, 6, 7, 8, 9),
            empty="No peers or accounts yet.",
            id_="peers",
        ),
        tag(
            "p",
            "Earned: credited by settlements plus claims. Balance: the escrow's balanceOf now; "
            "it must equal earned + refunds − withdrawn, else a red badge shows what the "
            "events imply. Merit score: the mean of the latest contribution score each "
            "querier published on chain (publishScores; accuracy on its audit queries).",
            class_="muted",
        ),
    )
    return frame("Peers", body, source=source, active="peers")


def peer_page(
    source: ChainSource, snap: Snapshot, a: Account, balance: int | None, eth_balance: int | None
) -> Html:
    reg = a.registration
    rows: list[tuple[str, object]] = [
        ("account", tag("span", a.address, class_="mono", id="peer-address")),
        ("status", _peer_state(a)),
    ]
    if reg is not None:
        rows += [
            ("Ed25519 (peer id)", tag("span", reg.ed25519.hex(), class_="mono")),
            ("X25519", tag("span", reg.x25519.hex(), class_="mono")),
            ("stake", wei(reg.stake)),
        ]
        if reg.unbonding_ends is not None:
            rows.append(("unbonding ends", when(reg.unbonding_ends)))
    rows += [
        ("credited by settlements", wei(a.credited)),
        ("claimed with receipts", wei(a.claimed)),
        ("refunds (as querier)", wei(a.refunds)),
        ("withdrawn", wei(a.withdrawn)),
        ("balance the events imply", wei(a.expected_balance)),
        (
            "escrow balance (balanceOf)",
            _balance_cell(a, {} if balance is None else {a.address: balance}),
        ),
        ("ETH balance", wei(eth_balance)),
    ]
    ledger = snap.ledger
    served = []
    for key in reversed(a.served):
        q = ledger.queries[key]
        p = q.payouts[a.address]
        served.append(
            (query_link(*key), addr(q.querier, source), _state(q, snap), wei(q.price), wei(p.total))
        )
    opened = [
        (
            query_link(*key),
            str(len(ledger.queries[key].committee)),
            _state(ledger.queries[key], snap),
            wei(ledger.queries[key].escrow_wei),
        )
        for key in reversed(a.opened)
    ]
    history = [
        (
            s.kind,
            wei(s.amount) if s.amount else "",
            block_link(s.block_number),
            when(s.timestamp, short=True),
            tx_link(s.tx_hash),
        )
        for s in reversed(a.history)
    ]
    body = join(
        facts(rows, id_="peer-facts"),
        section(
            "Committee seats",
            table(
                ["query", "querier", "state", "price", "paid to this account"],
                served,
                numeric=(3, 4),
                empty="No seats.",
                id_="served",
            ),
        ),
        section(
            "Queries opened",
            table(
                ["query", "k", "state", "escrow"],
                opened,
                numeric=(1, 3),
                empty="None.",
                id_="opened",
            ),
        ),
        section(
            "History",
            table(
                ["event", "amount", "block", "time (UTC)", "transaction"],
                history,
                numeric=(1,),
                id_="history",
            ),
        ),
    )
    return frame(f"Account {a.address[:10]}…", body, source=source, active="peers")


# ── shared with the chain pages ──────────────────────────────────────────────


def newest_txs(snap: Snapshot) -> list[bytes]:
    txs = sorted(snap.ledger.txs.values(), key=lambda t: (t.block_number, t.index), reverse=True)
    return [t.hash for t in txs]


def txs_table(source: ChainSource, snap: Snapshot, hashes: Sequence[bytes]) -> Html:
    rows = []
    for h in hashes:
        t = snap.ledger.txs[h]
        touched = snap.ledger.queries_by_tx.get(h, [])
        queries: list[object] = [query_link(*k, full=False) for k in touched[:3]]
        if len(touched) > 3:
            queries.append(f" +{len(touched) - 3}")
        rows.append(
            (
                tx_link(h),
                block_link(t.block_number),
                when(t.timestamp, short=True),
                addr(t.sender, source),
                function_cell(source, t.input, t.to),
                tag("span", "ok", class_="badge ok")
                if t.status
                else tag("span", "reverted", class_="badge bad"),
                number(t.gas_used),
                wei(t.fee_wei),
                join(*[join(x, " ") for x in queries]),
            )
        )
    return table(
        ["transaction", "block", "time (UTC)", "from", "call", "status", "gas", "fee", "queries"],
        rows,
        numeric=(6, 7),
        empty="No transactions.",
        id_="txs",
    )
