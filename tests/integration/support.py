"""Helpers for tests with real sockets, brokers and processes (127.0.0.0/8 only).

Synchronisation is always "poll observable state until a deadline", never a
fixed sleep: :func:`wait_until` is the one place that sleeps between polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    from fi_peer.chain.anvil import AnvilProcess
    from fi_peer.chain.client import Deployment

T = TypeVar("T")
LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def wait_until(
    check: Callable[[], T | bool | None],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``check()`` until it returns something truthy; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        last = check()
        if last:
            return last  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.1f} s waiting for {what} (last: {last!r})"
            )
        time.sleep(interval)


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").is_file() else None


def require_mosquitto() -> str:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip(
            "mosquitto is not installed (scripts/system-deps.d/30-mosquitto.sh installs it)"
        )
    return binary


def _write_conf(folder: Path, port: int) -> Path:
    conf = folder / "mosquitto.conf"
    conf.write_text(
        f"listener {port} {LOOPBACK}\nallow_anonymous true\npersistence false\n"
        "set_tcp_nodelay true\n"
        "log_dest stderr\nlog_type error\nlog_type warning\n"
    )
    return conf


class Mosquitto:
    """A private Mosquitto on a free loopback port (sync; for process-level tests)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{LOOPBACK}:{self.port}"

    def start(self) -> Mosquitto:
        for _ in range(3):  # the free port may be taken in between: try another
            self.port = free_port()
            if self._launch():
                return self
        raise RuntimeError(f"mosquitto did not start; see {self.folder / 'mosquitto.log'}")

    def restart_on_same_port(self) -> None:
        """Start again on ``self.port`` (after :meth:`stop`), e.g. to test reconnects."""
        if not self._launch():
            raise RuntimeError(f"mosquitto did not restart on port {self.port}")

    def _launch(self) -> bool:
        binary = require_mosquitto()
        conf = _write_conf(self.folder, self.port)
        log = open(self.folder / "mosquitto.log", "ab")  # noqa: SIM115 - owned by Popen
        self.process = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and self.process.poll() is None:
            if port_open(LOOPBACK, self.port):
                return True
            time.sleep(0.01)
        self.stop()
        return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class AsyncMosquitto:
    """A private Mosquitto for async tests (started with asyncio's subprocess API)."""

    def __init__(self) -> None:
        self.port = 0
        self._folder = Path(tempfile.mkdtemp(prefix="fi-mosquitto-"))
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{LOOPBACK}:{self.port}"

    async def start(self) -> AsyncMosquitto:
        binary = require_mosquitto()
        for _ in range(3):
            self.port = free_port()
            conf = _write_conf(self._folder, self.port)
            self._process = await asyncio.create_subprocess_exec(
                binary,
                "-c",
                str(conf),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and self._process.returncode is None:
                if await _port_open_async(self.port):
                    return self
                await asyncio.sleep(0.01)
            await self._terminate()
        raise RuntimeError("mosquitto did not start")

    async def stop(self) -> None:
        await self._terminate()
        shutil.rmtree(self._folder, ignore_errors=True)

    async def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(5):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def _port_open_async(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(LOOPBACK, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


@contextlib.contextmanager
def mosquitto(folder: Path) -> Iterator[Mosquitto]:
    with Mosquitto(folder) as broker:
        yield broker


def load_local_network() -> Any:
    """The local-network machinery (``fi_peer.localnet``, behind scripts/local_network.sh)."""
    from fi_peer import localnet

    return localnet


def deploy_on(anvil: AnvilProcess, *, claim_grace_s: int) -> Deployment:
    """The contracts, deployed on ``anvil`` by its first dev account."""
    from web3 import AsyncHTTPProvider, AsyncWeb3

    from fi_peer.chain.anvil import dev_accounts
    from fi_peer.chain.client import deploy_contracts

    async def deploy() -> Deployment:
        w3 = AsyncWeb3(AsyncHTTPProvider(anvil.rpc_url))
        try:
            return await deploy_contracts(w3, dev_accounts()[0], claim_grace_s=claim_grace_s)
        finally:
            await w3.provider.disconnect()

    return asyncio.run(deploy())


def paid_network(
    local_network: Any, rpc_url: str, deployment_file: Path, price: int, **chain: Any
) -> Any:
    """A ``LocalNetwork`` class whose peer i pays and is paid (``price`` wei a query) with
    dev account 1 + i on the chain at ``rpc_url``; ``chain`` sets the ChainConfig's
    settle and claim fields."""
    from fi_peer.chain.anvil import dev_accounts
    from fi_peer.config import ChainConfig, load_config, write_config

    accounts = dev_accounts()

    class PaidNetwork(local_network.LocalNetwork):  # type: ignore[misc, name-defined]
        def write_config(self, peer: Any) -> None:
            super().write_config(peer)
            key_file = peer.state_dir / "eth.key"
            key_file.write_text(accounts[1 + peer.index].key.hex())
            os.chmod(key_file, 0o600)
            config = ChainConfig(
                rpc_url=rpc_url,
                deployment=deployment_file,
                eth_key_file=key_file,
                auto_withdraw=True,
                **chain,
            )
            write_config(
                peer.config,
                dataclasses.replace(
                    load_config(peer.config), chain=config, price_wei=price, max_price_wei=price
                ),
            )

    return PaidNetwork
