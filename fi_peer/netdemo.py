"""``fi-peer demo --network``: a real FI network on this machine, with payments on anvil.

Starts anvil (node_modules), deploys QueryEscrow + PeerRegistry, trains (or
loads cached) one owner model per peer on a Dirichlet(alpha) non-IID split of
the digits data, starts N ``fi-peer run`` daemons as separate processes (via
``scripts/local_network.py``'s :class:`LocalNetwork`) with a ``[chain]`` table
each, starts the explorer, sends queries from several peers through their
control APIs, waits for the batched settlements and withdrawals and returns a
summary. Every process it started is stopped at the end (or on Ctrl-C).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("FI_PEER_HOME", Path.home() / ".fi-peer")) / "netdemo-models"

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class NetDemoSettings:
    peers: int = 5
    queries: int = 40
    alpha: float = 0.3
    seed: int = 1
    epochs: int = 20
    k: int = 4
    transport: str = "libp2p"
    price_wei: int = 10**15
    batch: int = 4  # inputs per control-API request == settle_every_queries
    query_timeout_s: float = 8.0
    folder: Path | None = None  # state dirs and logs (default: a fresh temp dir)
    cache: Path = DEFAULT_CACHE


def _load_local_network() -> types.ModuleType:
    from fi_peer import localnet

    return localnet


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the demo like Ctrl-C: through the finally blocks."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class NetDemo:
    """The processes of one networked demo; :meth:`close` stops them all."""

    def __init__(self, settings: NetDemoSettings, on_progress: Progress | None = None) -> None:
        self.s = settings
        self.on_progress = on_progress or (lambda phase, done, total: None)
        folder = settings.folder or Path(tempfile.mkdtemp(prefix="fi-netdemo-"))
        self.folder = folder.resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.anvil: Any = None
        self.net: Any = None
        self.explorer: subprocess.Popen[bytes] | None = None
        self.explorer_url: str | None = None
        self.deployment: Any = None
        self.timings: dict[str, float] = {}
        self.pids: dict[str, int] = {}

    # -- setup --

    def _timed(self, name: str, started: float) -> None:
        self.timings[name] = round(time.monotonic() - started, 2)

    def start(self) -> None:
        from fi_peer.chain.anvil import AnvilConfig, AnvilProcess, dev_accounts
        from fi_peer.chain.client import deploy_contracts
        from fi_peer.config import ChainConfig, load_config, write_config

        s = self.s
        if s.peers + 1 > 20:
            raise ValueError("at most 19 peers (one anvil dev account each)")
        ln = _load_local_network()
        t = time.monotonic()
        self.on_progress("models", 0, 1)
        with redirect_stdout(sys.stderr):  # its "training..." line: stdout is the report's
            models = ln.ensure_models(s.cache, s.peers, s.alpha, s.seed, s.epochs)
        self.models = models
        self.on_progress("models", 1, 1)
        self._timed("models_s", t)

        t = time.monotonic()
        self.anvil = AnvilProcess(AnvilConfig(accounts=s.peers + 1))
        self.anvil.start()
        self.pids["anvil"] = self.anvil.pid
        accounts = dev_accounts(count=s.peers + 1)

        async def deploy() -> Any:
            from web3 import AsyncHTTPProvider, AsyncWeb3

            w3 = AsyncWeb3(AsyncHTTPProvider(self.anvil.rpc_url))
            try:
                return await deploy_contracts(w3, accounts[0], claim_grace_s=30)
            finally:
                await w3.provider.disconnect()

        self.deployment = asyncio.run(deploy())
        deployment_file = self.folder / "deployment.json"
        self.deployment.save(deployment_file)
        self._timed("chain_s", t)
        rpc_url = self.anvil.rpc_url

        class PaidNetwork(ln.LocalNetwork):  # type: ignore[name-defined]
            def write_config(self, peer: Any) -> None:
                super().write_config(peer)
                key_file = peer.state_dir / "eth.key"
                key_file.write_text(accounts[1 + peer.index].key.hex())
                os.chmod(key_file, 0o600)
                chain = ChainConfig(
                    rpc_url=rpc_url,
                    deployment=deployment_file,
                    eth_key_file=key_file,
                    settle_every_queries=s.batch,
                    settle_every_s=3.0,
                    claim_every_s=1.0,
                    settle_window_s=3600,
                    auto_withdraw=True,
                )
                config = load_config(peer.config)
                write_config(
                    peer.config,
                    dataclasses.replace(
                        config, chain=chain, price_wei=s.price_wei, max_price_wei=s.price_wei
                    ),
                )

        self.address_of: dict[str, str] = {}
        t = time.monotonic()
        self.net = PaidNetwork(
            self.folder / "net",
            transport=s.transport,
            announce_interval_ms=500,
            offer_window_ms=1000,
        )
        self.net.prepare(models)
        self.net.start_all()
        if self.net.broker_pid is not None:
            self.pids["broker"] = self.net.broker_pid
        for peer in self.net.peers:
            self.pids[peer.name] = peer.pid
            self.address_of[peer.peer_id] = accounts[1 + peer.index].address
        self._start_explorer()
        self.on_progress("peers up", 0, s.peers)
        for ready, peer in enumerate(self.net.peers, 1):
            self.net.wait_ready([peer], timeout=120)
            self.on_progress("peers up", ready, s.peers)
        self.net.wait_connected(timeout=60)
        self._timed("network_s", t)

    def _start_explorer(self) -> None:
        log_path = self.folder / "explorer.log"
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        self.explorer = subprocess.Popen(
            [
                sys.executable, "-m", "fi_peer.explorer",
                "--rpc", self.anvil.rpc_url,
                "--contract", self.deployment.escrow,
                "--registry", self.deployment.registry,
                "--port", "0",
                "--refresh", "0.5",
            ],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )  # fmt: skip
        log.close()
        self.pids["explorer"] = self.explorer.pid
        self._explorer_log = log_path

    def _wait_explorer(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self._explorer_log.read_text(errors="replace").splitlines():
                if line.startswith("explorer: "):
                    self.explorer_url = line.split()[1]
                    return self.explorer_url
            if self.explorer is not None and self.explorer.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"the explorer did not start; see {self._explorer_log}")

    # -- the run --

    def run(self) -> dict[str, Any]:
        from fi_peer.models.data import load_digits_split
        from fi_peer.models.runtime import ModelRuntime

        s = self.s
        split = load_digits_split()
        n = min(s.queries, len(split.y_test))
        X, y = split.X_test[:n], [int(v) for v in split.y_test[:n]]
        # single owners' accuracy on the same inputs and on the whole test split
        singles: list[dict[str, Any]] = []
        for peer, path in zip(self.net.peers, self.models, strict=True):
            runtime = ModelRuntime.load(path)
            whole = runtime.predict_proba(split.X_test).argmax(axis=1)
            singles.append(
                {
                    "peer": peer.name,
                    "accuracy": float((whole == split.y_test).mean()),
                    "accuracy_on_queries": float((whole[:n] == split.y_test[:n]).mean()),
                }
            )
        requests = [
            (i // s.batch % s.peers, list(range(i, min(i + s.batch, n))))
            for i in range(0, n, s.batch)
        ]
        results: list[dict[str, Any] | None] = [None] * n
        querier_of: list[int] = [0] * n
        done = 0
        self.on_progress("queries", 0, n)
        t = time.monotonic()

        def send(req: tuple[int, list[int]]) -> tuple[int, list[int], list[dict[str, Any]]]:
            peer = self.net.peers[req[0]]
            try:
                answer = peer.client().post(
                    "/v1/query",
                    {
                        "input": [X[i].tolist() for i in req[1]],
                        "k": min(s.k, s.peers - 1),
                        "timeout_s": s.query_timeout_s,
                        "max_price_wei": s.price_wei,
                    },
                    timeout=s.query_timeout_s + 20,
                )
                rows: list[dict[str, Any]] = answer["results"]
            except Exception as exc:  # reported per query
                rows = [{"ok": False, "reason": f"control API: {exc}"} for _ in req[1]]
            return req[0], req[1], rows

        with ThreadPoolExecutor(max_workers=2) as pool:
            for q, idx, rows in pool.map(send, requests):
                for i, row in zip(idx, rows, strict=True):
                    results[i] = row
                    querier_of[i] = q
                done += len(idx)
                self.on_progress("queries", done, n)
        self._timed("queries_s", t)
        rows_ok = [r for r in results if r is not None]

        # settlement: every querier settles what it escrowed; members withdraw
        t = time.monotonic()
        paid_by: dict[int, int] = {}
        for i, r in enumerate(rows_ok):
            if r.get("payment"):
                paid_by[querier_of[i]] = paid_by.get(querier_of[i], 0) + 1
        total = len(paid_by) + len(self.net.peers)
        self.on_progress("settling", 0, total)
        settled = 0
        ln = _load_local_network()

        def chain_metrics(peer: Any) -> dict[str, Any]:
            status = self.net.status(peer) or {}
            metrics: dict[str, Any] = (status.get("chain") or {}).get("metrics", {})
            return metrics

        settle_ok = True
        try:
            for q, count in paid_by.items():
                peer = self.net.peers[q]
                ln.wait_for(
                    lambda p=peer, c=count: (
                        chain_metrics(p).get("settle.queries", 0)
                        + chain_metrics(p).get("settle.failed", 0)
                        + chain_metrics(p).get("settle.too_late", 0)
                        >= c
                    ),
                    45,
                    f"{peer.name} to settle",
                    0.25,
                )
                settled += 1
                self.on_progress("settling", settled, total)

            # members withdraw on their own (auto_withdraw): wait until every wei the
            # settlements credited has left the escrow (a failed batch credits nothing;
            # its members may claim with their receipts after the grace period)
            def withdrawn_all() -> bool:
                totals = self._event_totals()
                return totals["credited"] > 0 and totals["withdrawn"] >= totals["credited"]

            ln.wait_for(withdrawn_all, 45, "the members to withdraw their credit", 0.5)
            settled += len(self.net.peers)
            self.on_progress("settling", settled, total)
        except RuntimeError as exc:
            settle_ok = False
            settle_error = str(exc)
        self._timed("settle_s", t)
        metrics = {p.name: chain_metrics(p) for p in self.net.peers}
        chain = self._chain_totals()
        explorer_url = self._wait_explorer()

        ok = [r for r in rows_ok if r.get("ok")]
        correct = sum(1 for i, r in enumerate(rows_ok) if r.get("ok") and r.get("label") == y[i])
        reasons: dict[str, int] = {}
        for r in rows_ok:
            if not r.get("ok"):
                key = str(r.get("reason"))
                reasons[key] = reasons.get(key, 0) + 1
        escrowed = sum(int(r["payment"]["escrow_wei"]) for r in rows_ok if r.get("payment"))
        report: dict[str, Any] = {
            "settings": {
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in dataclasses.asdict(self.s).items()
            },
            "folder": str(self.folder),
            "pids": self.pids,
            "explorer_url": explorer_url,
            "rpc_url": self.anvil.rpc_url,
            "escrow": self.deployment.escrow,
            "registry": self.deployment.registry,
            "queries": {
                "sent": n,
                "answered": len(ok),
                "failed": n - len(ok),
                "failure_reasons": reasons,
                "paid": sum(1 for r in rows_ok if r.get("payment")),
                "queriers": sorted({self.net.peers[q].name for q in querier_of}),
                "ids": [r.get("query_id") for r in rows_ok],
            },
            "accuracy": {
                "singles": singles,
                "best_single_on_queries": max(x["accuracy_on_queries"] for x in singles),
                "best_single": max(x["accuracy"] for x in singles),
                "collective": correct / n if n else 0.0,
            },
            "wei": {
                "escrowed": escrowed,
                "paid": chain["credited"],
                "refunded": chain["refunded"],
                "withdrawn": chain["withdrawn"],
                "held": chain["balance"] - (chain["credited"] - chain["withdrawn"]),
                "escrow_balance": chain["balance"],
            },
            "gas": {"used": chain["gas"], "deploy": chain["deploy_gas"]},
            "settled": settle_ok,
            "settle_failed": sum(m.get("settle.failed", 0) for m in metrics.values()),
            "settle_metrics": metrics,
            "timings": self.timings,
        }
        if not settle_ok:
            report["settle_error"] = settle_error
        return report

    def _event_totals(self) -> dict[str, int]:
        from web3 import HTTPProvider, Web3

        w3 = Web3(HTTPProvider(self.anvil.rpc_url))
        latest = w3.eth.block_number

        def amounts(signature: str) -> int:
            topic = Web3.keccak(text=signature)
            logs = w3.eth.get_logs(
                {
                    "address": self.deployment.escrow,
                    "fromBlock": 0,
                    "toBlock": latest,
                    "topics": [topic],
                }
            )
            return sum(int.from_bytes(bytes(log["data"])[-32:], "big") for log in logs)

        return {
            "credited": amounts("Credited(address,uint256)"),
            "refunded": amounts("Refunded(bytes16,address,uint256)"),
            "withdrawn": amounts("Withdrawn(address,uint256)"),
        }

    def _chain_totals(self) -> dict[str, int]:
        from web3 import HTTPProvider, Web3

        w3 = Web3(HTTPProvider(self.anvil.rpc_url))
        escrow = self.deployment.escrow
        latest = w3.eth.block_number
        gas = deploy_gas = 0
        for number in range(1, latest + 1):
            used = int(w3.eth.get_block(number)["gasUsed"])
            gas += used
            if number <= self.deployment.block:
                deploy_gas += used

        return {
            "gas": gas,
            "deploy_gas": deploy_gas,
            **self._event_totals(),
            "balance": int(w3.eth.get_balance(escrow)),
        }

    # -- teardown --

    def close(self) -> None:
        """Stop every process this demo started (idempotent)."""
        if self.net is not None:
            # one SIGTERM each (a second one makes a daemon exit at once, uncleanly)
            for peer in self.net.peers:
                self.net.signal(peer, signal.SIGTERM)
            for peer in self.net.peers:
                if peer.process is not None:
                    try:
                        peer.process.wait(20)
                    except subprocess.TimeoutExpired:
                        peer.process.kill()
                        peer.process.wait(10)
            if self.net.broker_pid is not None:
                _load_local_network()._terminate_pid(self.net.broker_pid)
                self.net.broker_pid = None
        if self.explorer is not None and self.explorer.poll() is None:
            self.explorer.send_signal(signal.SIGINT)
            try:
                self.explorer.wait(10)
            except subprocess.TimeoutExpired:
                self.explorer.kill()
                self.explorer.wait(5)
        if self.anvil is not None:
            self.anvil.stop()


def run_network_demo(
    settings: NetDemoSettings,
    on_progress: Progress | None = None,
    *,
    keep_running: bool = False,
    on_report: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Start, query, settle, report; with ``keep_running`` wait for Ctrl-C first."""
    demo = NetDemo(settings, on_progress)
    started = time.monotonic()
    with _sigterm_as_interrupt():
        try:
            demo.start()
            report = demo.run()
            report["timings"]["total_s"] = round(time.monotonic() - started, 2)
            if on_report is not None:
                on_report(report)
            if keep_running:
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
            return report
        finally:
            # a second Ctrl-C must not cut the teardown short and leave processes behind
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                demo.close()
            finally:
                signal.signal(signal.SIGINT, previous)
