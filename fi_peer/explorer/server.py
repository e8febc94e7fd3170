"""The explorer's HTTP server (aiohttp): routes, errors, headers, lifecycle.

Why aiohttp: it is already installed (web3's HTTP provider runs on it), the
chain layer is async (AsyncWeb3, the indexer), and one event loop then serves
pages and RPC reads together, with no thread pool and no templating engine.
Pages are rendered on the server (works without JavaScript); a 1 KB script
only polls ``/api/overview.json`` to keep the numbers live.

Every response carries a strict Content-Security-Policy (no inline script,
nothing from elsewhere), so even a missed escape could not run script. Errors
become pages: a bad id is a 400, an unknown one a 404, an unreachable RPC a
503 page saying so, and anything unexpected a 500 page (details in the log,
never a traceback in the browser).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import ClientTimeout, web
from web3 import AsyncHTTPProvider, AsyncWeb3

from fi_peer.chain.errors import ChainError, ChainUnavailable
from fi_peer.chain.terms import checksum
from fi_peer.explorer import chainpages, pages
from fi_peer.explorer.html import Html
from fi_peer.explorer.layout import peer_url, query_url, text_page, tx_url, with_params
from fi_peer.explorer.source import ChainSource, ExplorerConfigError, Snapshot

log = logging.getLogger(__name__)

T = TypeVar("T")

STATIC_DIR = Path(__file__).resolve().parent / "static"
_STATIC_TYPES = {".css": "text/css", ".js": "text/javascript"}
SOURCE_KEY = web.AppKey("source", ChainSource)

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_QUERY_ID = re.compile(r"^(?:0x)?([0-9a-fA-F]{32})$")
_TX_HASH = re.compile(r"^(?:0x)?([0-9a-fA-F]{64})$")
_BLOCK = re.compile(r"^#?([0-9]{1,15})$")
_MAX_SEARCH = 100

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class _BadRequest(Exception):
    """A malformed id in a URL (shown as a 400 page)."""


def _html(page: Html, status: int = 200) -> web.Response:
    return web.Response(
        text=page,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )


def _source(request: web.Request) -> ChainSource:
    return request.app[SOURCE_KEY]


async def _snapshot(request: web.Request) -> Snapshot:
    source = _source(request)
    snap = await source.refresh()
    if snap is None:
        raise ChainUnavailable(str(source.error or "not connected yet"))
    return snap


async def _live(source: ChainSource, awaitable: Awaitable[T], default: T) -> T:
    """A live read for a page that can do without it: on an RPC failure the page
    shows ``default`` and the banner says the chain does not answer."""
    try:
        return await awaitable
    except ChainUnavailable as exc:
        source.error = exc
        return default


def _page_number(request: web.Request) -> int:
    try:
        return min(max(1, int(request.query.get("page", "1"))), 1_000_000)
    except ValueError:
        return 1


def _address(text: str) -> str:
    if not _ADDRESS.match(text):
        raise _BadRequest(f"not an address: {text[:80]}")
    return checksum(text)


def _query_id(text: str) -> bytes:
    m = _QUERY_ID.match(text)
    if m is None:
        raise _BadRequest("a query id is 16 bytes: 32 hex digits")
    return bytes.fromhex(m.group(1))


# ── handlers ─────────────────────────────────────────────────────────────────


async def overview(request: web.Request) -> web.Response:
    source = _source(request)
    snap = await _snapshot(request)
    contract_eth = await _live(source, source.eth_balance(source.escrow), None)
    return _html(pages.overview(source, snap, contract_eth))


async def overview_json(request: web.Request) -> web.Response:
    source = _source(request)
    snap = await source.refresh()
    if snap is None:
        return web.json_response({"live": False}, status=503)
    values = {
        key: {"text": text, "wei": None if amount is None else str(amount)}
        for key, (text, amount) in pages.overview_values(snap).items()
    }
    return web.json_response(
        {"live": source.error is None, "head": snap.head, "values": values},
        headers={"Cache-Control": "no-store"},
    )


async def queries(request: web.Request) -> web.Response:
    source = _source(request)
    snap = await _snapshot(request)
    search = request.query.get("q", "")[:_MAX_SEARCH]
    state = request.query.get("state", "")
    if state not in pages.STATES:
        state = ""
    page = _page_number(request)
    return _html(pages.queries_page(source, snap, search=search, state=state, page=page))


async def query(request: web.Request) -> web.Response:
    source = _source(request)
    querier = _address(request.match_info["querier"])
    query_id = _query_id(request.match_info["query_id"])
    snap = await _snapshot(request)
    found = snap.ledger.queries.get((querier, query_id))
    if found is None:
        raise web.HTTPNotFound(text=f"No query 0x{query_id.hex()} opened by {querier}.")
    balances = await _live(source, source.balances(list(found.committee)), {})
    return _html(pages.query_page(source, snap, found, balances))


async def query_by_id(request: web.Request) -> web.Response:
    source = _source(request)
    query_id = _query_id(request.match_info["query_id"])
    snap = await _snapshot(request)
    found = snap.ledger.queries_with_id(query_id)
    if not found:
        raise web.HTTPNotFound(text=f"No query 0x{query_id.hex()} on this chain.")
    if len(found) == 1:
        raise web.HTTPFound(query_url(found[0].querier, query_id))
    return _html(pages.query_choices(source, snap, found))


async def peers(request: web.Request) -> web.Response:
    source = _source(request)
    snap = await _snapshot(request)
    accounts = list(snap.ledger.accounts)
    balances = await _live(source, source.balances(accounts), {})
    return _html(pages.peers_page(source, snap, balances))


async def peer(request: web.Request) -> web.Response:
    source = _source(request)
    address = _address(request.match_info["address"])
    snap = await _snapshot(request)
    account = snap.ledger.accounts.get(address)
    if account is None:
        raise web.HTTPNotFound(text=f"{address} has no activity on the explorer's contracts.")
    balance = (await _live(source, source.balances([address]), {})).get(address)
    eth = await _live(source, source.eth_balance(address), None)
    return _html(pages.peer_page(source, snap, account, balance, eth))


async def blocks(request: web.Request) -> web.Response:
    source = _source(request)
    snap = await _snapshot(request)
    return _html(chainpages.blocks_page(source, snap, _page_number(request)))


async def block(request: web.Request) -> web.Response:
    source = _source(request)
    m = _BLOCK.match(request.match_info["number"])
    if m is None:
        raise _BadRequest("a block number is a decimal integer")
    snap = await _snapshot(request)
    found = await source.block(int(m.group(1)))
    if found is None:
        raise web.HTTPNotFound(text=f"No block {int(m.group(1)):,} yet (head: {snap.head:,}).")
    return _html(chainpages.block_page(source, snap, found))


async def txs(request: web.Request) -> web.Response:
    source = _source(request)
    snap = await _snapshot(request)
    return _html(chainpages.txs_page(source, snap, _page_number(request)))


async def tx(request: web.Request) -> web.Response:
    source = _source(request)
    m = _TX_HASH.match(request.match_info["tx_hash"])
    if m is None:
        raise _BadRequest("a transaction hash is 32 bytes: 64 hex digits")
    snap = await _snapshot(request)
    found = await source.transaction(bytes.fromhex(m.group(1)))
    if found is None:
        raise web.HTTPNotFound(text=f"The node does not know transaction 0x{m.group(1)}.")
    return _html(chainpages.tx_page(source, snap, found))


async def search(request: web.Request) -> web.Response:
    """Send the header's search box to the page it names."""
    text = request.query.get("q", "").strip()[:_MAX_SEARCH]
    if not text:
        raise web.HTTPFound("/queries")
    if _TX_HASH.match(text):
        raise web.HTTPFound(tx_url(bytes.fromhex(text[-64:])))
    if _ADDRESS.match(text):
        raise web.HTTPFound(peer_url(checksum(text)))
    if (m := _BLOCK.match(text)) and (text.startswith("#") or len(text) < 12):
        raise web.HTTPFound(f"/block/{int(m.group(1))}")
    if _QUERY_ID.match(text):
        raise web.HTTPFound(f"/query/0x{text[-32:].lower()}")
    raise web.HTTPFound(with_params("/queries", q=text))


def _static(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    path = STATIC_DIR / name
    body = path.read_bytes()
    content_type = _STATIC_TYPES[path.suffix]

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=body, content_type=content_type, headers={"Cache-Control": "max-age=300"}
        )

    return handler


# ── errors and headers ───────────────────────────────────────────────────────


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    source = request.app[SOURCE_KEY]
    try:
        return await handler(request)
    except web.HTTPRedirection:
        raise
    except web.HTTPNotFound as exc:
        message = exc.text if exc.text and not exc.text.startswith("404") else "No such page."
        return _html(text_page("Not found", message, source), 404)
    except web.HTTPMethodNotAllowed:
        return _html(text_page("Not allowed", "The explorer only reads.", source), 405)
    except _BadRequest as exc:
        return _html(text_page("Bad request", str(exc), source), 400)
    except ExplorerConfigError as exc:
        return _html(text_page("Not our contracts", str(exc), source), 502)
    except ChainUnavailable:
        message = (
            "The chain's RPC does not answer, and nothing has been indexed yet. "
            "The explorer keeps trying: reload this page in a moment."
        )
        return _html(text_page("Chain unavailable", message, source), 503)
    except ChainError as exc:
        log.warning("page %s: %s", request.path, exc)
        return _html(text_page("Chain error", str(exc), source), 502)
    except Exception:
        log.exception("page %s failed", request.path)
        return _html(text_page("Internal error", "This page failed; see the log.", None), 500)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)


def make_app(source: ChainSource) -> web.Application:
    """The explorer's aiohttp application over ``source`` (which the caller closes)."""
    app = web.Application(middlewares=[_errors])
    app[SOURCE_KEY] = source
    app.on_response_prepare.append(_security_headers)
    app.router.add_get("/", overview)
    app.router.add_get("/api/overview.json", overview_json)
    app.router.add_get("/queries", queries)
    app.router.add_get("/query/{querier}/{query_id}", query)
    app.router.add_get("/query/{query_id}", query_by_id)
    app.router.add_get("/peers", peers)
    app.router.add_get("/peer/{address}", peer)
    app.router.add_get("/blocks", blocks)
    app.router.add_get("/block/{number}", block)
    app.router.add_get("/txs", txs)
    app.router.add_get("/tx/{tx_hash}", tx)
    app.router.add_get("/search", search)
    for name in ("explorer.css", "explorer.js"):
        app.router.add_get(f"/static/{name}", _static(name))
    return app


# ── running it ───────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True, kw_only=True)
class ExplorerSettings:
    rpc_url: str
    escrow: str
    registry: str | None = None
    host: str = "127.0.0.1"
    port: int = 8090
    index_path: str = ":memory:"
    start_block: int | None = None
    refresh_s: float = 1.0
    rpc_timeout_s: float = 10.0


class Explorer:
    """A running explorer: ``async with Explorer(settings) as e: print(e.url)``."""

    def __init__(self, settings: ExplorerSettings, *, w3: AsyncWeb3[Any] | None = None) -> None:
        self.settings = settings
        self._own_w3 = w3 is None
        self.w3 = w3 or AsyncWeb3(
            AsyncHTTPProvider(
                settings.rpc_url,
                request_kwargs={"timeout": ClientTimeout(total=settings.rpc_timeout_s)},
                exception_retry_configuration=None,
            )
        )
        self.source = ChainSource(
            self.w3,
            escrow=settings.escrow,
            registry=settings.registry,
            index_path=settings.index_path,
            start_block=settings.start_block,
            min_interval_s=settings.refresh_s,
        )
        self._runner: web.AppRunner | None = None
        self.port = settings.port

    @property
    def url(self) -> str:
        host = self.settings.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/"

    async def start(self) -> None:
        """Index once (ExplorerConfigError if the addresses are wrong; an RPC that
        does not answer is only logged), then listen."""
        await self.source.refresh(force=True)
        self._runner = web.AppRunner(make_app(self.source), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        await site.start()
        addresses = self._runner.addresses
        if addresses:
            self.port = int(addresses[0][1])

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.source.close()
        if self._own_w3 and isinstance(self.w3.provider, AsyncHTTPProvider):
            await self.w3.provider.disconnect()

    async def __aenter__(self) -> Explorer:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def serve(
    settings: ExplorerSettings, *, ready: Callable[[Explorer], None] | None = None
) -> None:
    """Run the explorer until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with Explorer(settings) as explorer:
        if ready is not None:
            ready(explorer)
        await stop.wait()
