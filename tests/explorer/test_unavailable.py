"""An RPC that is down, or goes down: pages say so (never a traceback), the last
snapshot stays on show, and the explorer recovers by itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import ServerDisconnectedError
from aiohttp.test_utils import TestClient, TestServer
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.types import RPCEndpoint, RPCResponse

from fi_peer.chain.anvil import free_port
from fi_peer.explorer import ChainSource, ExplorerConfigError, make_app
from tests.explorer.conftest import Scripted


class Switch:
    """Lets a provider's requests through until switched off, then fails them like
    a node that went away (installed before the first request)."""

    def __init__(self, provider: Any) -> None:
        self.down = False
        inner = provider.make_request

        async def make_request(method: RPCEndpoint, params: Any) -> RPCResponse:
            if self.down:
                raise ServerDisconnectedError()
            response: RPCResponse = await inner(method, params)
            return response

        provider.make_request = make_request


async def test_no_rpc_at_all_is_a_503_page(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    w3 = AsyncWeb3(AsyncHTTPProvider(url, exception_retry_configuration=None))
    source = ChainSource(w3, escrow="0x" + "11" * 20, index_path=tmp_path / "i.sqlite")
    try:
        async with TestClient(TestServer(make_app(source))) as client:
            for path in ("/", "/queries", "/peers", "/txs", f"/tx/0x{'ab' * 32}", "/block/1"):
                response = await client.get(path)
                text = await response.text()
                assert response.status == 503, path
                assert "does not answer" in text and "Traceback" not in text, path
                assert url not in text  # an RPC URL may hold an API key: never shown
            response = await client.get("/api/overview.json")
            assert response.status == 503 and (await response.json()) == {"live": False}
    finally:
        source.close()
        await w3.provider.disconnect()


async def test_a_chain_that_goes_away_and_comes_back(scripted: Scripted, tmp_path: Path) -> None:
    h = scripted.history
    w3 = scripted.chain.web3()
    switch = Switch(w3.provider)
    source = ChainSource(
        w3,
        escrow=h.deployment.escrow,
        registry=h.deployment.registry,
        index_path=tmp_path / "i.sqlite",
        min_interval_s=0,
    )
    try:
        async with TestClient(TestServer(make_app(source))) as client:
            response = await client.get("/")
            assert response.status == 200
            assert 'id="banner" hidden' in await response.text()

            switch.down = True
            for path in (
                "/",
                "/queries",
                f"/query/{h.querier}/0x{h.terms['q4'].query_id.hex()}",
                "/peers",
            ):
                response = await client.get(path)
                text = await response.text()
                assert response.status == 200, path  # the last snapshot, with a warning
                assert "does not answer" in text and "Traceback" not in text, path
            response = await client.get(f"/tx/0x{h.tx['settle q4'].hex()}")
            assert response.status == 503  # needs the node: says so
            assert "Traceback" not in await response.text()
            data = await (await client.get("/api/overview.json")).json()
            assert data["live"] is False and data["values"]["queries_opened"]["text"] == "5"

            switch.down = False
            response = await client.get("/")
            text = await response.text()
            assert response.status == 200 and 'id="banner" hidden' in text
            assert (await (await client.get("/api/overview.json")).json())["live"] is True
    finally:
        source.close()


async def test_addresses_that_are_not_our_contracts(scripted: Scripted, tmp_path: Path) -> None:
    h = scripted.history
    w3 = scripted.chain.web3()
    nothing = ChainSource(w3, escrow="0x" + "11" * 20, index_path=tmp_path / "a.sqlite")
    with pytest.raises(ExplorerConfigError, match="no contract at"):
        await nothing.refresh()
    swapped = ChainSource(
        w3,
        escrow=h.deployment.registry,
        registry=h.deployment.escrow,
        index_path=tmp_path / "b.sqlite",
    )
    with pytest.raises(ExplorerConfigError, match="not a QueryEscrow"):
        await swapped.refresh()
    async with TestClient(TestServer(make_app(nothing))) as client:
        response = await client.get("/")
        assert response.status == 502
        assert "no contract at" in await response.text()
