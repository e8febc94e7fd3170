"""GET /metrics on the control API, and a status handler that is a coroutine (chain reads)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from fi_peer.control import ControlClient, ControlError, ControlInfo, ControlServer, Json
from tests.unit.test_control import TOKEN, FakeHandler, raw

METRICS = "# HELP fi_peer_up Up.\n# TYPE fi_peer_up gauge\nfi_peer_up 1\n"


class MetricsHandler(FakeHandler):
    def __init__(self) -> None:
        super().__init__()
        self.scrapes = 0

    async def status(self) -> Json:  # type: ignore[override]  # async, like the daemon's
        await asyncio.sleep(0)
        return {"peer_id": "ab" * 32, "async": True}

    def metrics(self) -> str:
        self.scrapes += 1
        return METRICS


async def _server(handler: FakeHandler, public: bool) -> ControlServer:
    srv = ControlServer(handler, token=TOKEN, public_metrics=public)
    await srv.start()
    return srv


@pytest_asyncio.fixture
async def private() -> AsyncIterator[tuple[ControlServer, MetricsHandler]]:
    handler = MetricsHandler()
    srv = await _server(handler, public=False)
    yield srv, handler
    await srv.aclose()


def _client(srv: ControlServer, token: str = TOKEN) -> ControlClient:
    return ControlClient(ControlInfo(url=srv.url, token=token, pid=os.getpid(), peer_id="x"))


def _get(path: str, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode()


async def test_metrics_are_text_behind_the_token(
    private: tuple[ControlServer, MetricsHandler],
) -> None:
    srv, handler = private
    text = await asyncio.to_thread(_client(srv).get_text, "/metrics", timeout=5)
    assert text == METRICS
    reply = await raw(srv, _get("/metrics", TOKEN))
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
    assert body == METRICS.encode()
    no_token = await raw(srv, _get("/metrics"))
    assert no_token.startswith(b"HTTP/1.1 401 ")
    assert handler.scrapes == 2  # the refused scrape never reached the handler


async def test_public_metrics_open_only_metrics() -> None:
    handler = MetricsHandler()
    srv = await _server(handler, public=True)
    try:
        assert (await raw(srv, _get("/metrics"))).startswith(b"HTTP/1.1 200 OK")
        assert (await raw(srv, _get("/v1/status"))).startswith(b"HTTP/1.1 401 ")
        assert (await raw(srv, _get("/v1/peers"))).startswith(b"HTTP/1.1 401 ")
        post = b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        assert (await raw(srv, post)).startswith(b"HTTP/1.1 401 ")  # only GET is public
    finally:
        await srv.aclose()


async def test_an_async_status_is_awaited(private: tuple[ControlServer, MetricsHandler]) -> None:
    srv, _ = private
    doc = await asyncio.to_thread(_client(srv).get, "/v1/status", timeout=5)
    assert doc == {"peer_id": "ab" * 32, "async": True}


async def test_wrong_method_and_missing_metrics_are_4xx(
    private: tuple[ControlServer, MetricsHandler],
) -> None:
    srv, _ = private
    with pytest.raises(ControlError, match="405"):
        await asyncio.to_thread(_client(srv).post, "/metrics", {}, timeout=5)
    plain = await _server(FakeHandler(), public=False)  # a handler without metrics()
    try:
        with pytest.raises(ControlError, match=r"404.*no endpoint /metrics"):
            await asyncio.to_thread(_client(plain).get_text, "/metrics", timeout=5)
    finally:
        await plain.aclose()
