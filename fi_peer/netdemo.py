"""``fi-peer demo``: a real FI network on this machine, with payments on anvil.

Trains (or loads cached) one owner model per peer on a Dirichlet(alpha) non-IID
split of the digits data, starts anvil (node_modules), deploys QueryEscrow +
PeerRegistry, registers every peer's Ed25519 and X25519 keys (with a stake) in
the registry from its own account, starts N ``fi-peer run`` daemons as separate
processes over libp2p (via :class:`fi_peer.localnet.LocalNetwork`) with a
``[chain]`` table each, starts the explorer, sends queries from several peers
through their control APIs, waits for the batched settlements and withdrawals
and returns a summary.

Every process it starts is stopped at the end, on Ctrl-C (SIGINT, even one this
process inherited as ignored, as a background job of a non-interactive shell
does) and on SIGTERM; if the demo is SIGKILLed, the kernel stops them
(PR_SET_PDEATHSIG). ``<folder>/demo.json`` records the demo's pid and every
child's pid as soon as it is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("FI_PEER_HOME", Path.home() / ".fi-peer")) / "netdemo-models"


class Progress(Protocol):
    """``on_progress(phase, done, total, info)``: one bar per phase, ``info`` beside it."""

    def __call__(self, phase: str, done: int, total: int, info: str = "") -> None: ...


def _no_progress(phase: str, done: int, total: int, info: str = "") -> None:
    pass


@dataclass(frozen=True)
class NetDemoSettings:
    peers: int = 5
    queries: int = 40
    alpha: float = 0.3
    seed: int = 1
    epochs: int = 20
    k: int = 4
    rule: str = "evidence"
    epsilon: float | None = None  # per-query DP epsilon; None: the daemons' default (2)
    transport: str = "libp2p"
    price_wei: int = 10**15
    stake_wei: int = 10**17  # each peer's stake in the registry (also its minimum)
    batch: int = 4  # inputs per control-API request == settle_every_queries
    # generous: a query takes ~0.3 s, but on a loaded machine a member may lag seconds
    query_timeout_s: float = 20.0
    folder: Path | None = None  # state dirs and logs (default: a fresh temp dir)
    cache: Path = DEFAULT_CACHE


def _load_local_network() -> types.ModuleType:
    from fi_peer import localnet

    return localnet


def _cached(s: NetDemoSettings) -> bool:
    paths = _load_local_network().model_paths(s.cache, s.peers, s.alpha, s.seed, s.epochs)
    return all(path.is_file() for path in paths)


@contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C and SIGTERM end the demo through its finally blocks (KeyboardInterrupt).

    SIGINT gets Python's handler even if this process inherited it ignored: a
    background job of a non-interactive shell (a CI runner's) starts with SIGINT
    ignored, and Python keeps that, so a Ctrl-C would be lost and a
    ``--keep-running`` demo would never stop. Children then start with SIGINT at
    its default (exec resets caught signals)."""

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield  # signals are the main thread's business
        return
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


class NetDemo:
    """The processes of one networked demo; :meth:`close` stops them all."""

    def __init__(self, settings: NetDemoSettings, on_progress: Progress | None = None) -> None:
        self.s = settings
        self.on_progress: Progress = on_progress or _no_progress
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
        self.registered: list[dict[str, Any]] = []
        self.blocks: dict[str, int] = {}  # last block of each setup phase
        self._record()

    # -- setup --

    def _timed(self, name: str, started: float) -> None:
        self.timings[name] = round(time.monotonic() - started, 2)

    def _started(self, name: str, pid: int | None) -> None:
        if pid is not None:
            self.pids[name] = pid
            self._record()

    def _record(self) -> None:
        """``demo.json``: this process and every child started so far (for tests, ops)."""
        doc = {"pid": os.getpid(), "children": self.pids}
        tmp = self.folder / "demo.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(self.folder / "demo.json")

    def start(self) -> None:
        t = time.monotonic()  # the imports count as setup time
        from fi_peer.chain.anvil import AnvilConfig, AnvilProcess, dev_accounts
        from fi_peer.chain.client import deploy_contracts

        s = self.s
        if s.peers + 1 > 20:
            raise ValueError("at most 19 peers (one anvil dev account each)")
        ln = _load_local_network()
        self.on_progress("models", 0, 1, "training" if not _cached(s) else "cached")
        with redirect_stdout(sys.stderr):  # its "training..." line: stdout is the report's
            models = ln.ensure_models(s.cache, s.peers, s.alpha, s.seed, s.epochs)
        self.models = models
        self.on_progress("models", 0, 1, "each owner alone on the test split")
        self._score_singles()
        self.on_progress("models", 1, 1, f"{s.peers} owners, alpha {s.alpha:g}")
        self._timed("models_s", t)

        t = time.monotonic()
        self.on_progress("chain", 0, 1, "anvil")
        self.anvil = AnvilProcess(AnvilConfig(accounts=s.peers + 1))
        self.anvil.start()  # SIGINTed by the kernel if this process dies (main thread)
        self._started("anvil", self.anvil.pid)
        accounts = dev_accounts(count=s.peers + 1)
        rpc_url = self.anvil.rpc_url

        async def deploy() -> Any:
            from web3 import AsyncHTTPProvider, AsyncWeb3

            w3 = AsyncWeb3(AsyncHTTPProvider(rpc_url))
            try:
                deployment = await deploy_contracts(
                    w3, accounts[0], claim_grace_s=30, min_stake_wei=s.stake_wei
                )
                return deployment, await w3.eth.block_number
            finally:
                await w3.provider.disconnect()

        self.on_progress("chain", 0, 1, "deploying")
        self.deployment, self.blocks["deployed"] = asyncio.run(deploy())
        deployment_file = self.folder / "deployment.json"
        self.deployment.save(deployment_file)
        self.on_progress("chain", 1, 1, f"escrow {self.deployment.escrow[:10]}")
        self._timed("chain_s", t)

        self.address_of: dict[str, str] = {}
        t = time.monotonic()
        self.net = ln.PaidLocalNetwork(
            self.folder / "net",
            chain=ln.PeerChain(
                rpc_url=rpc_url,
                deployment=deployment_file,
                accounts=accounts[1:],
                price_wei=s.price_wei,
                settle_every_queries=s.batch,
            ),
            transport=s.transport,
            # a peer expires after 6 missed announcements: 6 s, not a starved second
            announce_interval_ms=1000,
            missed_beats=6,
            # the querier goes on as soon as k offers are in; the window only bounds
            # the wait for slow members (a loaded machine), within half the timeout
            offer_window_ms=3000,
            die_with_parent=True,
        )
        self.net.prepare(models)
        self._started("broker", self.net.broker_pid)
        for peer in self.net.peers:
            self.address_of[peer.peer_id] = accounts[1 + peer.index].address
        # before the daemons start: their accounts' nonces are then theirs alone
        self._register([accounts[1 + p.index] for p in self.net.peers])
        self._timed("register_s", t)

        t = time.monotonic()
        self.on_progress("peers up", 0, s.peers, "starting daemons")
        for peer in self.net.peers:
            self.net.start(peer)
            self._started(peer.name, peer.pid)
        self._start_explorer()
        for ready, peer in enumerate(self.net.peers, 1):
            self.net.wait_ready([peer], timeout=120)
            self.on_progress("peers up", ready, s.peers, f"{peer.name} pid {peer.pid}")
        self.on_progress("peers up", s.peers, s.peers, "connecting over " + s.transport)
        self.net.wait_connected(timeout=60)
        self.on_progress("peers up", s.peers, s.peers, "full mesh")
        self._timed("network_s", t)

    def _register(self, accounts: list[Any]) -> None:
        """Every peer's account registers its Ed25519 and X25519 keys, with a stake."""
        from fi_peer.chain.client import ChainClient
        from fi_peer.identity import load_keystore

        peers, s = self.net.peers, self.s
        self.on_progress("registered", 0, len(peers), "PeerRegistry")

        async def one(peer: Any, account: Any) -> dict[str, Any]:
            identity = load_keystore(peer.state_dir / "keystore.json", None)
            client = ChainClient.connect(self.anvil.rpc_url, account.key, self.deployment)
            try:
                tx = await client.register(
                    identity.public_key, identity.box_public_key, stake_wei=s.stake_wei
                )
            finally:
                await client.aclose()
            self.registered.append(
                {
                    "peer": peer.name,
                    "account": account.address,
                    "ed25519": identity.public_key.hex(),
                    "x25519": identity.box_public_key.hex(),
                    "tx": "0x" + bytes(tx.tx_hash).hex(),
                    "gas": tx.gas_used,
                }
            )
            self.on_progress("registered", len(self.registered), len(peers), peer.name)
            return {"block": tx.block_number}

        async def all_of_them() -> int:
            done = await asyncio.gather(*(one(p, a) for p, a in zip(peers, accounts, strict=True)))
            return max(d["block"] for d in done)

        self.blocks["registered"] = asyncio.run(all_of_them())
        self.registered.sort(key=lambda r: str(r["peer"]))

    def _start_explorer(self) -> None:
        from fi_peer.chain.anvil import parent_death_hook

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
            start_new_session=True,  # a ^C in the terminal is ours to handle
            preexec_fn=parent_death_hook(signal.SIGTERM),  # and it dies with us
        )  # fmt: skip
        log.close()
        self._started("explorer", self.explorer.pid)
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

    def _score_singles(self) -> None:
        """The queried inputs with their labels, and each owner's model alone on them and
        on the whole test split; cached beside the models, so that a warm run imports
        neither torch nor scikit-learn here."""
        cache = self.models[0].parent / f"netdemo-singles-q{self.s.queries}.json"
        try:
            doc = json.loads(cache.read_text())
        except (OSError, ValueError):
            doc = self._compute_singles()
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc))
            tmp.replace(cache)
        self.inputs: list[list[float]] = doc["inputs"]
        self.labels: list[int] = doc["labels"]
        self.singles: list[dict[str, Any]] = doc["singles"]
        self.right_alone: list[list[bool]] = doc["right_alone"]  # per owner, per input

    def _compute_singles(self) -> dict[str, Any]:
        from fi_peer.models.data import load_digits_split
        from fi_peer.models.runtime import ModelRuntime

        split = load_digits_split()
        n = min(self.s.queries, len(split.y_test))
        doc: dict[str, Any] = {
            "inputs": split.X_test[:n].tolist(),
            "labels": [int(v) for v in split.y_test[:n]],
            "singles": [],
            "right_alone": [],
        }
        for index, path in enumerate(self.models):
            whole = ModelRuntime.load(path).predict_proba(split.X_test).argmax(axis=1)
            right = whole == split.y_test
            doc["right_alone"].append([bool(v) for v in right[:n]])
            doc["singles"].append(
                {
                    "peer": f"peer-{index}",
                    "accuracy": float(right.mean()),
                    "accuracy_on_queries": float(right[:n].mean()),
                }
            )
        return doc

    def run(self) -> dict[str, Any]:
        s, X, y = self.s, self.inputs, self.labels
        n = len(y)
        singles, right_alone = self.singles, self.right_alone
        requests = [
            (i // s.batch % s.peers, list(range(i, min(i + s.batch, n))))
            for i in range(0, n, s.batch)
        ]
        results: list[dict[str, Any] | None] = [None] * n
        querier_of: list[int] = [0] * n
        done = answered = correct_so_far = 0
        self.on_progress("queries", 0, n, f"from {min(s.peers, len(requests))} peers")
        t = time.monotonic()

        def send(req: tuple[int, list[int]]) -> tuple[int, list[int], list[dict[str, Any]]]:
            peer = self.net.peers[req[0]]
            try:
                answer = peer.client().post(
                    "/v1/query",
                    {
                        "input": [X[i] for i in req[1]],
                        "k": min(s.k, s.peers - 1),
                        "rule": s.rule,
                        "timeout_s": s.query_timeout_s,
                        "max_price_wei": s.price_wei,
                        **({} if s.epsilon is None else {"epsilon": s.epsilon}),
                    },
                    timeout=s.query_timeout_s + 20,
                )
                rows: list[dict[str, Any]] = answer["results"]
            except Exception as exc:  # reported per query
                rows = [{"ok": False, "reason": f"control API: {exc}"} for _ in req[1]]
            return req[0], req[1], rows

        pool = ThreadPoolExecutor(max_workers=2)
        try:
            for q, idx, rows in pool.map(send, requests):
                for i, row in zip(idx, rows, strict=True):
                    results[i] = row
                    querier_of[i] = q
                    answered += bool(row.get("ok"))
                    correct_so_far += bool(row.get("ok")) and row.get("label") == y[i]
                done += len(idx)
                info = f"{self.net.peers[q].name} asked; {answered} answered"
                self.on_progress("queries", done, n, f"{info}, {correct_so_far / done:.0%} right")
        finally:
            # on Ctrl-C: no new requests; the ones in flight end when the daemons stop
            pool.shutdown(wait=False, cancel_futures=True)
        self._timed("queries_s", t)
        rows_ok = [r for r in results if r is not None]

        # settlement: every querier settles what it escrowed; members withdraw
        t = time.monotonic()
        paid_by: dict[int, int] = {}
        for i, r in enumerate(rows_ok):
            if r.get("payment"):
                paid_by[querier_of[i]] = paid_by.get(querier_of[i], 0) + 1
        total = len(paid_by) + len(self.net.peers)
        self.on_progress("settling", 0, total, "batched settleBatch per querier")
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
                self.on_progress("settling", settled, total, f"{peer.name} settled")

            # members withdraw on their own (auto_withdraw): wait until every wei the
            # settlements credited has left the escrow (a failed batch credits nothing;
            # its members may claim with their receipts after the grace period)
            def withdrawn_all() -> bool:
                totals = self._event_totals()
                return totals["credited"] > 0 and totals["withdrawn"] >= totals["credited"]

            self.on_progress("settling", settled, total, "members withdrawing")
            ln.wait_for(withdrawn_all, 45, "the members to withdraw their credit", 0.5)
            settled += len(self.net.peers)
            self.on_progress("settling", settled, total, "all credit withdrawn")
        except RuntimeError as exc:
            settle_ok = False
            settle_error = str(exc)
        self._timed("settle_s", t)
        t = time.monotonic()
        metrics = {p.name: chain_metrics(p) for p in self.net.peers}
        chain = self._chain_totals()
        explorer_url = self._wait_explorer()
        self._timed("report_s", t)

        ok = [r for r in rows_ok if r.get("ok")]
        answered_idx = [i for i, r in enumerate(rows_ok) if r.get("ok")]
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
                # the same on the answered queries only (a failed query counts as wrong above)
                "collective_on_answered": correct / len(ok) if ok else 0.0,
                "best_single_on_answered": max(
                    sum(r[i] for i in answered_idx) / max(1, len(answered_idx)) for r in right_alone
                ),
            },
            "wei": {
                "escrowed": escrowed,
                "paid": chain["credited"],
                "refunded": chain["refunded"],
                "withdrawn": chain["withdrawn"],
                "held": chain["balance"] - (chain["credited"] - chain["withdrawn"]),
                "escrow_balance": chain["balance"],
            },
            "gas": {
                "used": chain["gas"],
                "deploy": chain["deploy_gas"],
                "register": chain["register_gas"],
                "queries": chain["gas"] - chain["deploy_gas"] - chain["register_gas"],
            },
            "registered": {
                "peers": self.registered,
                "stake_wei": self.s.stake_wei,
                "total_stake_wei": self.s.stake_wei * len(self.registered),
            },
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
        gas = deploy_gas = register_gas = 0
        deployed = self.blocks.get("deployed", self.deployment.block)
        registered = self.blocks.get("registered", deployed)
        for number in range(1, latest + 1):
            used = int(w3.eth.get_block(number)["gasUsed"])
            gas += used
            if number <= deployed:
                deploy_gas += used
            elif number <= registered:
                register_gas += used

        return {
            "gas": gas,
            "deploy_gas": deploy_gas,
            "register_gas": register_gas,
            **self._event_totals(),
            "balance": int(w3.eth.get_balance(escrow)),
        }

    # -- teardown --

    def close(self, timeout_s: float = 20.0) -> None:
        """Stop every process this demo started (idempotent): SIGTERM to the daemons,
        the broker and the explorer at once, wait for them (SIGKILL at the deadline),
        then anvil, which the daemons may use while they stop."""
        processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        if self.net is not None:
            processes += [(p.name, p.process) for p in self.net.peers if p.process is not None]
        if self.explorer is not None:
            processes.append(("explorer", self.explorer))
        broker = self.net.broker_pid if self.net is not None else None
        # one SIGTERM each (a second one makes a daemon exit at once, uncleanly)
        for _, process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        if broker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(broker, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if broker is not None and self.net is not None:
            _reap(broker, deadline)
            self.net.broker_pid = None
        if self.anvil is not None:
            self.anvil.stop()


def _reap(pid: int, deadline: float) -> None:
    """Wait for our child ``pid`` (SIGTERMed) to exit, reaping it: a zombie would look
    alive to a kill(pid, 0) probe until the deadline. SIGKILL at the deadline."""
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # already reaped (or not ours)
            return
        if done:
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            return
        time.sleep(0.05)


def run_network_demo(
    settings: NetDemoSettings,
    on_progress: Progress | None = None,
    *,
    keep_running: bool = False,
    on_report: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Start, query, settle, report; with ``keep_running`` wait for Ctrl-C first.

    KeyboardInterrupt (Ctrl-C or SIGTERM) during the start or the run propagates,
    after every process was stopped; during ``keep_running`` it ends the wait and
    the report is returned."""
    with _interruptible():
        demo = NetDemo(settings, on_progress)
        started = time.monotonic()
        try:
            demo.start()
            report = demo.run()
            report["timings"]["total_s"] = round(time.monotonic() - started, 2)
            if on_report is not None:
                on_report(report)
            if keep_running:
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        time.sleep(3600)  # until a signal interrupts it
            return report
        finally:
            # a second Ctrl-C must not cut the teardown short and leave processes behind
            with _ignoring_signals():
                demo.close()


@contextmanager
def _ignoring_signals() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
