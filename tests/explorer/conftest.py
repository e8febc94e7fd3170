"""Fixtures of the explorer tests: one eth-tester chain with the scripted
history for the session; each test gets a fresh explorer (its own sqlite index)
over it, between a snapshot and a revert of the chain."""

from __future__ import annotations

import asyncio
import re
import select
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from eth_typing import HexStr
from web3 import AsyncWeb3

from fi_peer.chain.anvil import AnvilChain, AnvilConfig, AnvilProcess
from fi_peer.chain.artifacts import REPO_ROOT
from fi_peer.chain.client import ChainClient, Deployment
from fi_peer.chain.devchain import EthTesterChain, eth_tester_chain
from fi_peer.chain.terms import checksum
from fi_peer.explorer import ChainSource, make_app
from tests.chain.conftest import require_anvil
from tests.chain.helpers import close_web3
from tests.explorer.dom import Node, parse
from tests.explorer.history import History, script_history


@dataclass
class Scripted:
    chain: EthTesterChain
    history: History


@dataclass
class Site:
    """One test's explorer: the chain, the script's record, the source and a client."""

    chain: EthTesterChain
    history: History
    source: ChainSource
    client: TestClient[Any, Any]
    w3: AsyncWeb3[Any]
    index_path: Path

    async def get(self, path: str) -> tuple[int, str]:
        response = await self.client.get(path, allow_redirects=False)
        return response.status, await response.text()

    async def page(self, path: str) -> Node:
        status, text = await self.get(path)
        assert status == 200, f"{path}: {status}\n{text[:2000]}"
        assert "Traceback" not in text
        return parse(text)

    def reader(self) -> ChainClient:
        """A client to read the chain directly (balanceOf), not through the explorer."""
        return ChainClient(self.w3, self.chain.accounts[0], self.history.deployment)


@pytest.fixture(scope="session")
def scripted() -> Scripted:
    chain = eth_tester_chain()
    history = asyncio.run(script_history(chain))
    return Scripted(chain, history)


@pytest.fixture
async def site(scripted: Scripted, tmp_path: Path) -> AsyncIterator[Site]:
    chain, history = scripted.chain, scripted.history
    snapshot = await chain.snapshot()
    w3 = chain.web3()
    source = ChainSource(
        w3,
        escrow=history.deployment.escrow,
        registry=history.deployment.registry,
        index_path=tmp_path / "index.sqlite",
        min_interval_s=0,
    )
    try:
        async with TestClient(TestServer(make_app(source))) as client:
            yield Site(chain, history, source, client, w3, tmp_path / "index.sqlite")
    finally:
        source.close()
        await chain.revert(snapshot)


# ── anvil and the explorer as a process (integration tests) ──────────────────


@dataclass
class AnvilHistory:
    process: AnvilProcess
    chain: AnvilChain
    history: History
    reverted: bytes  # a mined transaction that reverted (NothingToWithdraw)


async def _send_reverting(chain: AnvilChain, deployment: Deployment, sender: str) -> bytes:
    """A withdraw() with nothing to withdraw, mined anyway: anvil's accounts are
    unlocked, and an explicit gas limit skips the estimate that would refuse it."""
    w3 = chain.web3()
    try:
        tx_hash = await w3.eth.send_transaction(
            {
                "from": checksum(sender),
                "to": deployment.escrow,
                "data": HexStr("0x3ccfd60b"),  # withdraw()
                "gas": 100_000,
            }
        )
        receipt = await w3.eth.wait_for_transaction_receipt(tx_hash)
        assert receipt["status"] == 0
        return bytes(tx_hash)
    finally:
        await close_web3(w3)


def start_anvil_history() -> AnvilHistory:
    require_anvil()
    process = AnvilProcess(AnvilConfig(accounts=10))
    process.start()
    try:
        chain = AnvilChain.of(process)
        history = asyncio.run(script_history(chain))
        reverted = asyncio.run(_send_reverting(chain, history.deployment, history.outsider))
    except BaseException:
        process.stop()
        raise
    return AnvilHistory(process, chain, history, reverted)


@pytest.fixture(scope="module")
def anvil_history() -> Iterator[AnvilHistory]:
    """A fresh anvil per test module, with the scripted history and one reverted
    transaction (modules that add activity do not disturb each other)."""
    ah = start_anvil_history()
    yield ah
    assert ah.process.stop() == 0


class ExplorerProcess:
    """``python -m fi_peer.explorer ...`` as a user runs it; ``url`` once it listens."""

    def __init__(self, args: list[str], *, cwd: Path = REPO_ROOT) -> None:
        self.args = [sys.executable, "-m", "fi_peer.explorer", *args]
        self.cwd = cwd
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.stderr = ""

    def start(self, timeout_s: float = 30.0) -> ExplorerProcess:
        self.proc = subprocess.Popen(
            self.args,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        match = re.search(r"explorer: (http://\S+)", line)
        if match is None:
            self.stop()
            raise AssertionError(f"explorer did not start: {line!r} {self.stderr}")
        self.url = match.group(1).rstrip("/")
        return self

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGINT, as Ctrl-C; returns the exit code (SIGKILL after the timeout)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, self.stderr = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.stderr = self.proc.communicate()
        return self.proc.returncode

    def __enter__(self) -> ExplorerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.stop()
