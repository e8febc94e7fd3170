"""The page frame and the small pieces every page uses (links, badges, tables).

URLs are built here and only here, from values the pages already parsed
(checksummed addresses, bytes, ints), so a link can never carry chain text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import urlencode

from fi_peer.chain.errors import ChainUnavailable
from fi_peer.explorer.html import Html, hex0x, join, link, short, tag
from fi_peer.explorer.ledger import QueryState
from fi_peer.explorer.source import ChainSource, Snapshot

NAV = (
    ("overview", "/", "Overview"),
    ("queries", "/queries", "Queries"),
    ("peers", "/peers", "Peers"),
    ("blocks", "/blocks", "Blocks"),
    ("txs", "/txs", "Transactions"),
)
PAGE_SIZE = 50


# ── URLs ─────────────────────────────────────────────────────────────────────


def query_url(querier: str, query_id: bytes) -> str:
    return f"/query/{querier}/{hex0x(query_id)}"


def peer_url(address: str) -> str:
    return f"/peer/{address}"


def tx_url(tx_hash: bytes) -> str:
    return f"/tx/{hex0x(tx_hash)}"


def block_url(number: int) -> str:
    return f"/block/{number}"


def with_params(path: str, **params: object) -> str:
    kept = {
        k: str(v)
        for k, v in params.items()
        if v is not None and v != "" and not (k == "page" and v == 1)
    }
    return f"{path}?{urlencode(kept)}" if kept else path


# ── links and badges ─────────────────────────────────────────────────────────


def addr(address: str | None, source: ChainSource | None = None, *, full: bool = False) -> Html:
    """An account, linked to its page (our contracts by name)."""
    if address is None:
        return tag("span", "–", class_="muted")
    if source is not None and address == source.escrow:
        return tag("span", "QueryEscrow", class_="contract", title=address)
    if source is not None and address == source.registry:
        return tag("span", "PeerRegistry", class_="contract", title=address)
    text = address if full else short(address)
    return link(peer_url(address), text, class_="mono", title=address)


def query_link(querier: str, query_id: bytes, *, full: bool = True) -> Html:
    text = hex0x(query_id)
    return link(
        query_url(querier, query_id),
        text if full else short(text, 10, 4),
        class_="mono qid",
        title=text,
    )


def tx_link(tx_hash: bytes, *, full: bool = False) -> Html:
    text = hex0x(tx_hash)
    return link(tx_url(tx_hash), text if full else short(text, 10, 6), class_="mono", title=text)


def block_link(number: int | None) -> Html:
    if number is None:
        return tag("span", "pending", class_="muted")
    return link(block_url(number), f"#{number:,}", class_="mono")


def state_badge(state: QueryState) -> Html:
    return tag("span", state.value, class_=f"badge {state.value}")


def status_badge(ok: bool | None) -> Html:
    if ok is None:
        return tag("span", "pending", class_="badge open")
    return tag("span", "success" if ok else "reverted", class_="badge " + ("ok" if ok else "bad"))


def mono(text: str, title: str | None = None) -> Html:
    return tag("span", text, class_="mono", title=title)


# ── tables ───────────────────────────────────────────────────────────────────


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    numeric: Iterable[int] = (),
    empty: str = "Nothing yet.",
    id_: str | None = None,
    foot: Sequence[object] | None = None,
) -> Html:
    right = set(numeric)
    head = tag(
        "tr",
        [tag("th", h, class_="num" if i in right else None) for i, h in enumerate(headers)],
    )
    body = [
        tag("tr", [tag("td", c, class_="num" if i in right else None) for i, c in enumerate(row)])
        for row in rows
    ]
    if not body:
        body = [tag("tr", tag("td", empty, colspan=len(headers), class_="muted"))]
    parts = [tag("thead", head), tag("tbody", body)]
    if foot is not None:
        cells = [tag("td", c, class_="num" if i in right else None) for i, c in enumerate(foot)]
        parts.append(tag("tfoot", tag("tr", cells)))
    return tag("div", tag("table", parts, id=id_), class_="scroll")


def facts(pairs: Iterable[tuple[str, object]], *, id_: str | None = None) -> Html:
    """A two-column definition table."""
    rows = [tag("tr", tag("th", k), tag("td", v)) for k, v in pairs]
    return tag("table", rows, class_="facts", id=id_)


def section(title: str, *body: object, id_: str | None = None) -> Html:
    return tag("section", tag("h2", title), *body, id=id_)


def pager(path: str, page: int, total: int, **params: object) -> Html:
    pages = max(1, -(-total // PAGE_SIZE))
    if pages == 1:
        return Html("")
    prev = link(with_params(path, page=page - 1, **params), "← newer") if page > 1 else None
    nxt = link(with_params(path, page=page + 1, **params), "older →") if page < pages else None
    return tag("nav", prev, tag("span", f" page {page} of {pages} "), nxt, class_="pager")


def page_of(items: Sequence[object], page: int) -> Sequence[object]:
    return items[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]


# ── the frame ────────────────────────────────────────────────────────────────


def frame(
    title: str,
    body: object,
    *,
    source: ChainSource | None,
    active: str = "",
    search: str = "",
) -> Html:
    """A whole page: header with navigation, search and the chain's status."""
    snapshot = source.snapshot if source is not None else None
    nav = tag(
        "nav",
        [link(href, label, class_="active" if key == active else None) for key, href, label in NAV],
        class_="tabs",
    )
    form = tag(
        "form",
        tag(
            "input",
            type="search",
            name="q",
            id="search",
            value=search,
            placeholder="query id, address, tx hash or block",
            autocomplete="off",
            maxlength=100,
        ),
        tag("button", "Search", type="submit", id="search-go"),
        action="/search",
        method="get",
        class_="search",
        role="search",
    )
    header = tag(
        "header",
        tag("a", tag("strong", "fi-peer"), " explorer", href="/", class_="brand"),
        nav,
        form,
        _status(source, snapshot),
    )
    page = join(
        Html("<!doctype html>"),
        tag(
            "html",
            tag(
                "head",
                tag("meta", charset="utf-8"),
                tag("meta", name="viewport", content="width=device-width, initial-scale=1"),
                tag("title", f"{title} · fi-peer explorer"),
                tag("link", rel="stylesheet", href="/static/explorer.css"),
                tag("script", src="/static/explorer.js", defer=True),
            ),
            tag(
                "body",
                header,
                tag("main", _banner(source), tag("h1", title), body),
                _footer(source),
            ),
            lang="en",
        ),
    )
    return page


def _status(source: ChainSource | None, snapshot: Snapshot | None) -> Html:
    if source is None or snapshot is None:
        return tag(
            "div", tag("span", "not connected", id="live", class_="dot down"), class_="status"
        )
    down = source.error is not None
    return tag(
        "div",
        tag("span", f"chain {snapshot.info.chain_id}", class_="muted"),
        " · block ",
        tag("span", f"#{snapshot.head:,}", data_live="head", class_="mono"),
        " ",
        tag(
            "span",
            "offline" if down else "live",
            id="live",
            class_="dot " + ("down" if down else "up"),
        ),
        class_="status",
    )


def _banner(source: ChainSource | None) -> Html:
    if source is None or source.error is None:
        return tag("div", id="banner", hidden=True, class_="banner")
    snapshot = source.snapshot
    known = (
        f" Showing what was indexed up to block #{snapshot.indexed_to:,}."
        if snapshot is not None
        else ""
    )
    if isinstance(source.error, ChainUnavailable):
        # The kind only: the message may name the RPC URL, which can hold an API key.
        what = tag("strong", "The chain's RPC does not answer. ")
        detail = f"The explorer keeps retrying ({type(source.error).__name__}).{known}"
    else:
        what = tag("strong", "Chain error. ")
        detail = f"{source.error}{known}"
    return tag("div", what, detail, id="banner", class_="banner")


def _footer(source: ChainSource | None) -> Html:
    if source is None:
        return tag("footer", "fi-peer explorer")
    parts: list[object] = ["QueryEscrow ", mono(source.escrow)]
    if source.registry is not None:
        parts += [" · PeerRegistry ", mono(source.registry)]
    return tag("footer", parts, " · reads only the chain")


def text_page(title: str, message: object, source: ChainSource | None) -> Html:
    return frame(title, tag("p", message, class_="message"), source=source)
