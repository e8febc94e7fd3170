"""Block and transaction pages, decoded with the contracts' ABI. Render only.

Links go both ways: a block lists its transactions, a transaction links its
block, sender, contract, the queries it touched and every address and query
id among its decoded arguments and events.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fi_peer.explorer.calls import Arg, Call, batch_committees
from fi_peer.explorer.html import Html, bits, gwei_text, hex0x, join, number, tag, wei, when
from fi_peer.explorer.layout import (
    addr,
    block_link,
    facts,
    frame,
    page_of,
    pager,
    query_link,
    section,
    status_badge,
    table,
    tx_link,
)
from fi_peer.explorer.pages import function_cell, newest_txs, txs_table
from fi_peer.explorer.source import BlockDetail, ChainSource, Snapshot, TxDetail

_QUERY_ID_TYPES = ("bytes16",)


def blocks_page(source: ChainSource, snap: Snapshot, page: int) -> Html:
    numbers = sorted(snap.ledger.blocks, reverse=True)
    events_per_block: dict[int, int] = {}
    for events in snap.ledger.events_by_tx.values():
        for e in events:
            events_per_block[e.block_number] = events_per_block.get(e.block_number, 0) + 1
    rows = []
    for n in page_of(numbers, page):
        assert isinstance(n, int)
        hashes = snap.ledger.blocks[n]
        first = snap.ledger.txs[hashes[0]]
        rows.append(
            (
                block_link(n),
                when(first.timestamp, short=True),
                number(len(hashes)),
                number(events_per_block.get(n, 0)),
                join(*[join(tx_link(h), " ") for h in hashes[:4]]),
            )
        )
    body = join(
        tag(
            "p",
            "Head: ",
            block_link(snap.head),
            f" · {len(numbers):,} blocks with activity on the explorer's contracts.",
            class_="muted",
        ),
        table(
            ["block", "time (UTC)", "our txs", "events", "transactions"],
            rows,
            numeric=(2, 3),
            empty="No activity yet.",
            id_="blocks",
        ),
        pager("/blocks", page, len(numbers)),
    )
    return frame("Blocks", body, source=source, active="blocks")


def block_page(source: ChainSource, snap: Snapshot, block: BlockDetail) -> Html:
    nav = join(
        block_link(block.number - 1) if block.number > 0 else "",
        " ← → ",
        block_link(block.number + 1) if block.number < snap.head else "",
    )
    head = facts(
        [
            ("number", tag("span", f"{block.number:,}", id="block-number")),
            ("hash", tag("span", hex0x(block.hash), class_="mono")),
            ("parent", join(tag("span", hex0x(block.parent_hash), class_="mono"))),
            ("time", when(block.timestamp)),
            ("gas used / limit", f"{block.gas_used:,} / {block.gas_limit:,}"),
            ("base fee", wei(block.base_fee)),
            ("miner", tag("span", block.miner, class_="mono")),
            ("neighbours", nav),
        ],
        id_="block-facts",
    )
    rows = []
    for i, h in enumerate(block.transactions):
        info = snap.ledger.txs.get(h)
        rows.append(
            (
                str(i),
                tx_link(h, full=True),
                "–" if info is None else addr(info.sender, source),
                "not ours" if info is None else function_cell(source, info.input, info.to),
                "–" if info is None else status_badge(info.status),
                "–" if info is None else number(info.gas_used),
            )
        )
    body = join(
        head,
        section(
            f"Transactions ({len(block.transactions)})",
            table(
                ["#", "hash", "from", "call", "status", "gas"],
                rows,
                numeric=(0, 5),
                empty="No transactions in this block.",
                id_="block-txs",
            ),
        ),
    )
    return frame(f"Block #{block.number:,}", body, source=source, active="blocks")


def txs_page(source: ChainSource, snap: Snapshot, page: int) -> Html:
    hashes = newest_txs(snap)
    shown = [h for h in page_of(hashes, page) if isinstance(h, bytes)]
    body = join(
        tag(
            "p",
            f"{len(hashes):,} transactions to or from the explorer's contracts"
            + ("" if snap.info.otterscan else " (those that emitted events)"),
            class_="muted",
        ),
        txs_table(source, snap, shown),
        pager("/txs", page, len(hashes)),
    )
    return frame("Transactions", body, source=source, active="txs")


def tx_page(source: ChainSource, snap: Snapshot, tx: TxDetail) -> Html:
    status: object = status_badge(tx.status)
    if tx.revert is not None:
        status = join(status, " ", tag("code", _revert_text(tx), class_="revert"))
    fee = None if tx.gas_used is None or tx.gas_price is None else tx.gas_used * tx.gas_price
    to: object = addr(tx.to, source, full=True)
    if tx.to is None:
        to = join("create ", addr(tx.contract_address, source, full=True))
    head = facts(
        [
            ("hash", tag("span", hex0x(tx.hash), class_="mono", id="tx-hash")),
            ("status", status),
            ("block", join(block_link(tx.block_number), " ", when(tx.timestamp))),
            ("from", addr(tx.sender, source, full=True)),
            ("to", to),
            ("value", wei(tx.value)),
            ("nonce", str(tx.nonce)),
            (
                "gas limit / used",
                f"{tx.gas_limit:,} / {'–' if tx.gas_used is None else f'{tx.gas_used:,}'}",
            ),
            ("gas price", _gas_price(tx.gas_price)),
            ("fee", wei(fee)),
        ],
        id_="tx-facts",
    )
    touched = snap.ledger.queries_by_tx.get(tx.hash, [])
    parts: list[object] = [head]
    if touched:
        parts.append(
            section(
                "Queries touched",
                tag("ul", [tag("li", query_link(*k)) for k in touched], id="tx-queries"),
            )
        )
    parts.append(section("Call", _call(source, tx)))
    parts.append(section("Events", _events(source, tx)))
    parts.append(
        tag(
            "details",
            tag("summary", f"input data ({len(tx.input):,} bytes)"),
            tag("pre", hex0x(tx.input), class_="mono wrap"),
        )
    )
    return frame("Transaction", join(*parts), source=source, active="txs")


def _gas_price(price: int | None) -> Html:
    if price is None:
        return tag("span", "–", class_="muted")
    return tag("span", gwei_text(price), title=f"{price:,} wei", data_wei=price)


def _revert_text(tx: TxDetail) -> str:
    r = tx.revert
    assert r is not None
    shown = ", ".join(_plain(a) for a in r.error_args)
    return f"{r.name}({shown})"


def _plain(value: Any) -> str:
    if isinstance(value, bytes):
        return hex0x(value)
    return str(value)


def _call(source: ChainSource, tx: TxDetail) -> Html:
    if not tx.ours:
        return tag("p", "Not a call to the explorer's contracts.", class_="muted")
    call = tx.call
    if call is None:
        return tag("p", "Input does not match the contracts' ABI.", class_="muted")
    querier = tx.sender
    if any(a.name == "terms" for a in call.args):
        querier = str(next(x.value for x in call.arg("terms").items if x.name == "querier"))
    signature = tag("code", f"{call.contract}.{call.function}", id="tx-function")
    args = tag("ul", [tag("li", _arg(source, a, querier)) for a in call.args], class_="args")
    extra: Html = Html("")
    if call.function == "settleBatch":
        extra = _batch(source, call, tx.sender)
    return join(tag("p", signature), args, extra)


def _arg(source: ChainSource, a: Arg, querier: str) -> Html:
    label = join(tag("span", a.name or "·", class_="arg"), " ", tag("span", a.type, class_="type"))
    if a.items or a.type.endswith("]"):
        inner = [tag("li", _arg(source, x, querier)) for x in a.items]
        return join(label, tag("ul", inner or [tag("li", "(empty)", class_="muted")]))
    return join(label, " = ", _value(source, a.name, a.type, a.value, querier))


def _value(source: ChainSource, name: str, kind: str, value: Any, querier: str | None) -> Html:
    if kind == "address":
        return addr(str(value), source, full=True)
    if kind in _QUERY_ID_TYPES and name == "queryId" and querier is not None:
        return query_link(querier, bytes(value))
    if isinstance(value, bytes):
        return tag("span", hex0x(value), class_="mono")
    if kind.startswith("uint") and name in ("price", "amount", "paid", "stake"):
        return join(wei(int(value)))
    if name == "deadline" or name == "unbondingEnds":
        return join(str(value), " (", when(int(value)), ")")
    if name == "delivered":
        return tag("span", f"{int(value)} ({int(value):#b})", class_="mono")
    return tag("span", str(value), class_="mono")


def _batch(source: ChainSource, call: Call, querier: str) -> Html:
    rows = [
        (
            query_link(querier, query_id),
            join(*[join(addr(m, source), " ") for m in committee]),
            tag("span", bits(delivered, len(committee)), class_="mono"),
        )
        for query_id, committee, delivered in batch_committees(call)
    ]
    return section(
        "Batch items",
        table(
            ["query", "committee (from memberIndex)", "delivered (seat 0 first)"], rows, id_="batch"
        ),
    )


def _events(source: ChainSource, tx: TxDetail) -> Html:
    if tx.status is None:
        return tag("p", "Pending: no events yet.", class_="muted")
    rows = []
    for log in tx.logs:
        if log.event is None:
            rows.append(
                (
                    str(log.index),
                    addr(log.address, source),
                    tag("span", "not ours", class_="muted"),
                    "",
                )
            )
            continue
        e = log.event
        querier = _event_querier(e.name, e.args, tx.sender)
        args = tag(
            "ul",
            [
                tag("li", tag("span", k, class_="arg"), " = ", _event_value(source, k, v, querier))
                for k, v in e.args.items()
            ],
            class_="args",
        )
        rows.append((str(log.index), addr(log.address, source), tag("code", e.name), args))
    return table(["log", "contract", "event", "arguments"], rows, empty="No events.", id_="events")


def _event_querier(name: str, args: Mapping[str, Any], sender: str) -> str:
    if "querier" in args:
        return str(args["querier"])
    return sender  # QuerySettled: the querier is the transaction's sender


def _event_value(source: ChainSource, key: str, value: Any, querier: str) -> Html:
    if isinstance(value, tuple | list):
        return join(*[join(_event_value(source, key, v, querier), " ") for v in value])
    if isinstance(value, str) and value.startswith("0x") and len(value) == 42:
        return addr(value, source, full=True)
    if key == "queryId" and isinstance(value, bytes):
        return query_link(querier, value)
    if isinstance(value, bytes):
        return tag("span", hex0x(value), class_="mono")
    if key in ("price", "amount", "paid", "stake"):
        return wei(int(value))
    if key in ("deadline", "unbondingEnds"):
        return join(str(value), " (", when(int(value)), ")")
    if key == "delivered":
        return tag("span", f"{int(value):#b}", class_="mono")
    return tag("span", str(value), class_="mono")
