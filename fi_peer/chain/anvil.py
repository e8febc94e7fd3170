"""An anvil process (npm ``@foundry-rs/anvil``, from ``node_modules``), and the
:class:`~fi_peer.chain.devchain.DevChain` over it.

:class:`AnvilProcess` starts anvil on 127.0.0.1 (a free port unless given),
waits until its JSON-RPC answers (polling against a deadline, failing fast if
the process exits, with its log in the error), and stops it with SIGINT so
that ``--state`` is dumped (SIGKILL only if it does not exit in time). After
loading a state it sets anvil's clock back to the loaded head's time (anvil
would otherwise mine blocks older than their parent). It is
synchronous on purpose: starting takes ~40 ms, and session fixtures, scripts
and the daemon (through ``asyncio.to_thread``) can all use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aiohttp import ClientTimeout
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import AsyncHTTPProvider, AsyncWeb3

from fi_peer.chain.artifacts import REPO_ROOT
from fi_peer.chain.errors import ChainUnavailable

ANVIL_BIN = REPO_ROOT / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
#: Environment variable naming another anvil executable.
ANVIL_ENV = "FI_PEER_ANVIL"
#: anvil's (and hardhat's) well-known development mnemonic. Never for real funds.
DEV_MNEMONIC = "test test test test test test test test test test test junk"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def anvil_binary() -> Path:
    """``$FI_PEER_ANVIL`` if set, else the binary from ``node_modules``."""
    override = os.environ.get(ANVIL_ENV)
    return Path(override) if override else ANVIL_BIN


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def parent_death_hook(sig: int) -> Callable[[], None] | None:
    """On Linux, a pre-exec hook (``Popen(preexec_fn=...)``) asking the kernel to
    send ``sig`` to the child when this process dies, even by SIGKILL: nothing it
    started outlives it. None elsewhere, and outside the main thread (the kernel
    ties the signal to the thread that forked, and a worker thread may end before
    the process). The hook only calls prctl(2), getppid(2) and _exit(2), which are
    safe between fork and exec while other threads run; if the parent died before
    prctl took effect, the child exits at once."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    prctl = libc.prctl
    signum, parent = int(sig), os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return hook


def _interrupt_when_parent_dies() -> Callable[[], None] | None:
    """anvil gets SIGINT (it then dumps its state and exits) if this process dies
    without stopping it: a killed test run or demo leaves no anvil behind."""
    return parent_death_hook(signal.SIGINT)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Like anvil's own listener: a previous anvil's connections in TIME_WAIT do
        # not make the port busy (a restart on the same port), a live listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


@dataclass(frozen=True, slots=True, kw_only=True)
class AnvilConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port
    chain_id: int = 31337
    mnemonic: str = DEV_MNEMONIC
    accounts: int = 10
    balance_eth: int = 10_000
    state_path: Path | None = None  # --state: load at start, dump on exit and every interval
    state_interval_s: int = 5
    block_time_s: float | None = None  # None: automine
    silent: bool = True
    extra_args: tuple[str, ...] = ()


class AnvilProcess:
    """One anvil child process. Use as a context manager, or start()/stop()."""

    def __init__(self, config: AnvilConfig | None = None, *, binary: Path | None = None) -> None:
        self.config = config or AnvilConfig()
        self.binary = binary or anvil_binary()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.port = self.config.port

    @property
    def rpc_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _argv(self) -> list[str]:
        c = self.config
        argv = [
            str(self.binary),
            "--host", c.host,
            "--port", str(self.port),
            "--chain-id", str(c.chain_id),
            "--mnemonic", c.mnemonic,
            "--accounts", str(c.accounts),
            "--balance", str(c.balance_eth),
        ]  # fmt: skip
        if c.state_path is not None:
            argv += ["--state", str(c.state_path), "--state-interval", str(c.state_interval_s)]
        if c.block_time_s is not None:
            argv += ["--block-time", str(c.block_time_s)]
        if c.silent:
            argv.append("--silent")
        return argv + list(c.extra_args)

    def start(self, timeout_s: float = 15.0) -> None:
        """Start anvil and return once its RPC answers; ChainUnavailable otherwise.

        With port 0 a free port is picked; if anvil loses the race for it, it is
        tried again on another port (up to 3 times)."""
        if self.running:
            raise RuntimeError("anvil is already running")
        if not self.binary.is_file():
            raise ChainUnavailable(
                f"anvil not found at {self.binary}; run `npm ci` (scripts/system-deps.d/20-node.sh)"
            )
        attempts = 3 if self.config.port == 0 else 1
        for attempt in range(1, attempts + 1):
            if self.config.port == 0:
                self.port = free_port(self.config.host)
            try:
                self._spawn_and_wait(timeout_s)
                if self.config.state_path is not None:
                    self._restore_clock()
                return
            except ChainUnavailable:
                self._kill()
                if attempt == attempts:
                    raise

    def _spawn_and_wait(self, timeout_s: float) -> None:
        # Another node on the port would answer our readiness probe: refuse first.
        if not _port_free(self.config.host, self.port):
            raise ChainUnavailable(f"port {self.port} on {self.config.host} is in use")
        # Closed in stop(); anvil writes its log here, read back for error messages.
        self._log = tempfile.TemporaryFile(prefix="anvil-", suffix=".log")  # noqa: SIM115
        self._proc = subprocess.Popen(
            self._argv(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a ^C in the terminal is ours to forward, not anvil's
            preexec_fn=_interrupt_when_parent_dies() or None,
        )
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ChainUnavailable(f"anvil exited with {code} at start: {self.log_tail()}")
            if self._answers() and self._proc.poll() is None:
                return
            if time.monotonic() >= deadline:
                raise ChainUnavailable(
                    f"anvil not ready after {timeout_s} s on {self.rpc_url}: {self.log_tail()}"
                )
            time.sleep(delay)  # pacing between probes, bounded by the deadline above
            delay = min(delay * 2, 0.1)

    def _answers(self) -> bool:
        try:
            self._rpc("eth_chainId", [], timeout_s=0.5)
        except ChainUnavailable:
            return False
        return True

    def _rpc(self, method: str, params: list[Any], timeout_s: float = 5.0) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        request = urllib.request.Request(
            self.rpc_url, data=body.encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                reply = json.loads(response.read())
        except (OSError, ValueError, urllib.error.URLError) as exc:
            raise ChainUnavailable(f"{method} on {self.rpc_url}: {exc}") from exc
        if "result" not in reply:
            raise ChainUnavailable(f"{method} on {self.rpc_url}: {reply.get('error')}")
        return reply["result"]

    def _restore_clock(self) -> None:
        """After loading ``--state``, anvil's clock restarts from the wall clock and
        would mine blocks older than the loaded head (whose time had been moved
        forward): set it back to the head's time so time never runs backwards."""
        head = self._rpc("eth_getBlockByNumber", ["latest", False])
        head_time = int(head["timestamp"], 16)
        if head_time >= int(time.time()):
            self._rpc("evm_setTime", [head_time + 1])

    def log_tail(self, limit: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0, os.SEEK_END)
        size = self._log.tell()
        self._log.seek(max(0, size - limit))
        return self._log.read().decode(errors="replace").strip()

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGINT (anvil dumps ``--state`` and exits), then wait; SIGKILL after
        ``timeout_s``. Returns the exit code (None if it was not running)."""
        proc = self._proc
        if proc is None:
            return None
        code: int | None = proc.poll()
        if code is None:
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        self._close_log()
        self._proc = None
        return code

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None

    def __enter__(self) -> AnvilProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def dev_accounts(mnemonic: str = DEV_MNEMONIC, count: int = 10) -> tuple[LocalAccount, ...]:
    """The funded accounts anvil derives from ``mnemonic`` (m/44'/60'/0'/0/i)."""
    Account.enable_unaudited_hdwallet_features()
    return tuple(
        Account.from_mnemonic(mnemonic, account_path=f"m/44'/60'/0'/0/{i}") for i in range(count)
    )


class AnvilChain:
    """:class:`~fi_peer.chain.devchain.DevChain` over a running anvil (ours or not)."""

    def __init__(
        self,
        rpc_url: str,
        *,
        chain_id: int = 31337,
        mnemonic: str = DEV_MNEMONIC,
        accounts: int = 10,
    ) -> None:
        self.rpc_url = rpc_url
        self._chain_id = chain_id
        self._accounts = dev_accounts(mnemonic, accounts)

    @classmethod
    def of(cls, process: AnvilProcess) -> AnvilChain:
        c = process.config
        return cls(process.rpc_url, chain_id=c.chain_id, mnemonic=c.mnemonic, accounts=c.accounts)

    @property
    def chain_id(self) -> int:
        return self._chain_id

    @property
    def accounts(self) -> tuple[LocalAccount, ...]:
        return self._accounts

    def web3(self) -> AsyncWeb3[Any]:
        timeout = ClientTimeout(total=30)
        return AsyncWeb3(AsyncHTTPProvider(self.rpc_url, request_kwargs={"timeout": timeout}))

    async def _rpc(self, method: str, params: list[Any]) -> Any:
        w3 = self.web3()
        try:
            response = await w3.provider.make_request(method, params)
        except OSError as exc:
            raise ChainUnavailable(f"anvil at {self.rpc_url}: {exc}") from exc
        finally:
            await w3.provider.disconnect()
        if "error" in response:
            raise ChainUnavailable(f"{method} failed: {response['error']}")
        return response.get("result")

    async def increase_time(self, seconds: int) -> int:
        # Relative to the latest block, not to anvil's clock: after a restart with
        # --state, anvil's clock restarts from the wall clock and may lag the chain.
        latest = await self._rpc("eth_getBlockByNumber", ["latest", False])
        target = int(latest["timestamp"], 16) + max(1, seconds)
        await self._rpc("evm_setNextBlockTimestamp", [target])
        await self._rpc("evm_mine", [])
        block = await self._rpc("eth_getBlockByNumber", ["latest", False])
        return int(block["timestamp"], 16)

    async def snapshot(self) -> Any:
        return await self._rpc("evm_snapshot", [])

    async def revert(self, snapshot: Any) -> None:
        if not await self._rpc("evm_revert", [snapshot]):
            raise ChainUnavailable(f"evm_revert({snapshot}) failed")
