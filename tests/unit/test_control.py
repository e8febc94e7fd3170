"""The control API: HTTP server + client on loopback, with a fake handler (no daemon)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from fi_peer.control import (
    ControlClient,
    ControlError,
    ControlInfo,
    ControlServer,
    Json,
    RequestError,
    read_control_file,
    remove_control_file,
    write_control_file,
)

TOKEN = "s3cret-token"


class FakeHandler:
    def __init__(self) -> None:
        self.queries: list[Json] = []

    def status(self) -> Json:
        return {"peer_id": "ab" * 32, "ok": True}

    def peers(self) -> Json:
        return {"peers": [{"peer_id": "cd" * 32}]}

    async def query(self, request: Json) -> Json:
        self.queries.append(request)
        if request.get("input") == "conflict":
            raise RequestError(409, "no other peer is known yet")
        if request.get("input") == "bug":
            raise RuntimeError("secret internals")
        return {"results": [{"ok": True, "label": 3}]}


@pytest_asyncio.fixture
async def server() -> AsyncIterator[tuple[ControlServer, FakeHandler]]:
    handler = FakeHandler()
    srv = ControlServer(handler, token=TOKEN)
    await srv.start()
    yield srv, handler
    await srv.aclose()


def client(srv: ControlServer, token: str = TOKEN) -> ControlClient:
    return ControlClient(ControlInfo(url=srv.url, token=token, pid=os.getpid(), peer_id="x"))


async def call(c: ControlClient, method: str, path: str, body: Json | None = None) -> Json:
    # The client is synchronous (it is the CLI's); the server runs on this loop.
    if method == "GET":
        return await asyncio.to_thread(c.get, path, timeout=5)
    return await asyncio.to_thread(c.post, path, body or {}, timeout=5)


async def raw(srv: ControlServer, request: bytes) -> bytes:
    host, port = srv.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


async def test_status_peers_and_query(server: tuple[ControlServer, FakeHandler]) -> None:
    srv, handler = server
    assert srv.url.startswith("http://127.0.0.1:")
    c = client(srv)
    assert (await call(c, "GET", "/v1/status"))["ok"] is True
    assert (await call(c, "GET", "/v1/peers"))["peers"][0]["peer_id"] == "cd" * 32
    answer = await call(c, "POST", "/v1/query", {"input": [1, 2], "k": 2})
    assert answer["results"][0]["label"] == 3
    assert handler.queries == [{"input": [1, 2], "k": 2}]


@pytest.mark.parametrize("token", ["", "wrong", TOKEN + "x"])
async def test_a_wrong_or_missing_token_is_refused(
    server: tuple[ControlServer, FakeHandler], token: str
) -> None:
    srv, handler = server
    with pytest.raises(ControlError, match=r"401.*bearer token"):
        await call(client(srv, token), "POST", "/v1/query", {"input": [1]})
    assert handler.queries == []


async def test_errors_are_one_line_with_the_right_status(
    server: tuple[ControlServer, FakeHandler],
) -> None:
    srv, _ = server
    c = client(srv)
    with pytest.raises(ControlError, match=r"404.*no endpoint /v2/x"):
        await call(c, "GET", "/v2/x")
    with pytest.raises(ControlError, match="405"):
        await call(c, "POST", "/v1/status")
    with pytest.raises(ControlError, match=r"409.*no other peer"):
        await call(c, "POST", "/v1/query", {"input": "conflict"})
    with pytest.raises(ControlError, match=r"500.*internal error") as err:
        await call(c, "POST", "/v1/query", {"input": "bug"})
    assert "secret internals" not in str(err.value)


async def test_malformed_requests_get_4xx(server: tuple[ControlServer, FakeHandler]) -> None:
    srv, _ = server
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    not_json = b"POST /v1/query HTTP/1.1\r\n" + auth + b"Content-Length: 3\r\n\r\n{x}"
    assert b" 400 " in (await raw(srv, not_json)).split(b"\r\n")[0]
    not_object = b"POST /v1/query HTTP/1.1\r\n" + auth + b"Content-Length: 2\r\n\r\n[]"
    assert b"must be a JSON object" in await raw(srv, not_object)
    huge = b"POST /v1/query HTTP/1.1\r\n" + auth + b"Content-Length: 99999999\r\n\r\n"
    assert b" 413 " in (await raw(srv, huge)).split(b"\r\n")[0]
    assert b" 400 " in (await raw(srv, b"HELLO\r\n\r\n")).split(b"\r\n")[0]


async def test_closing_the_server_ends_idle_connections(
    server: tuple[ControlServer, FakeHandler],
) -> None:
    srv, _ = server
    host, port = srv.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v1/status HTTP/1.1\r\n")  # never finishes its head
    await writer.drain()
    async with asyncio.timeout(5):
        await srv.aclose()
    writer.close()


def test_control_file_is_private_and_removed_only_by_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "state" / "control.json"
    info = ControlInfo(url="http://127.0.0.1:1", token="t", pid=os.getpid(), peer_id="p")
    write_control_file(path, info)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_control_file(path) == info
    remove_control_file(path, os.getpid() + 1)
    assert path.exists()
    remove_control_file(path, os.getpid())
    assert not path.exists()


def test_client_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="is `fi-peer run` running"):
        read_control_file(tmp_path / "control.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ControlError, match="cannot read"):
        read_control_file(tmp_path / "bad.json")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead: Any = ControlClient(ControlInfo(f"http://127.0.0.1:{port}", "t", 1, "p"))
    with pytest.raises(ControlError, match="is it running"):
        dead.get("/v1/status", timeout=2)


async def test_a_busy_port_is_a_control_error() -> None:
    first = ControlServer(FakeHandler(), token=TOKEN)
    await first.start()
    port = int(first.url.rsplit(":", 1)[1])
    second = ControlServer(FakeHandler(), token=TOKEN, port=port)
    try:
        with pytest.raises(ControlError, match="cannot listen"):
            await second.start()
    finally:
        await first.aclose()
