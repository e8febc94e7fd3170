#!/usr/bin/env python3
"""Start and stop a local FI network: N ``fi-peer run`` daemons as separate processes.

    python -m fi_peer.localnet start --peers 5 --transport libp2p [--dir ./localnet]
    python -m fi_peer.localnet status [--dir ./localnet]
    python -m fi_peer.localnet stop   [--dir ./localnet]

(or ``bash scripts/local_network.sh ...``, which sets up .venv first).

``start`` trains one owner model per peer on a Dirichlet(alpha) non-IID split
of the digits data (cached under ``<dir>/models/``, so a second start is
fast), writes each peer's state dir ``<dir>/peer-<i>/`` (plaintext demo keys,
config.toml: loopback only), starts the daemons with their logs in
``<dir>/logs/``, waits until every peer knows every other one and prints how
to query. For MQTT it starts a private broker on a free loopback port
(Mosquitto if installed, else the embedded amqtt one) unless ``--broker`` is
given. ``<dir>/network.json`` records the processes; ``stop`` sends SIGTERM
to each (SIGKILL after a grace period) and stops the broker.

Peer 0 listens on a fixed free port and every other peer bootstraps from it
(peer 0 from peer 1); the rest is discovery by gossip. Keys are identities
for a demo only: never reuse them.

The :class:`LocalNetwork` class is what the integration tests drive.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fi_peer.config import ChainConfig, PeerConfig, load_config, write_config
from fi_peer.control import ControlClient, ControlError, read_control_file
from fi_peer.errors import FiPeerError
from fi_peer.identity import Identity, load_keystore, save_keystore

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

# Working directory of the processes it starts (the checkout, or site-packages' parent).
ROOT = Path(__file__).resolve().parents[1]

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``check`` until truthy; RuntimeError naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# -- models ----------------------------------------------------------------------------------


def model_paths(cache: Path, peers: int, alpha: float, seed: int, epochs: int) -> list[Path]:
    """Where :func:`ensure_models` keeps the models of one (peers, alpha, seed, epochs)."""
    folder = cache / f"digits-n{peers}-a{alpha:g}-s{seed}-e{epochs}"
    return [folder / f"peer-{i}.pt" for i in range(peers)]


def ensure_models(cache: Path, peers: int, alpha: float, seed: int, epochs: int) -> list[Path]:
    """One owner model file per peer, trained once per (peers, alpha, seed, epochs)."""
    paths = model_paths(cache, peers, alpha, seed, epochs)
    folder = paths[0].parent
    if all(p.is_file() for p in paths):
        return paths
    import torch

    from fi_peer.models.data import load_digits_split
    from fi_peer.models.runtime import save_owner_model
    from fi_peer.models.zoo import train_peer_models

    torch.set_num_threads(1)
    folder.mkdir(parents=True, exist_ok=True)
    split = load_digits_split()
    print(f"training {peers} owner models (alpha={alpha:g}, seed={seed}, {epochs} epochs)...")
    for path, model in zip(
        paths, train_peer_models(peers, alpha, seed, split=split, epochs=epochs), strict=True
    ):
        save_owner_model(model, path)
    samples = {
        "inputs": split.X_test[:32].tolist(),
        "labels": split.y_test[:32].tolist(),
    }
    (folder / "samples.json").write_text(json.dumps(samples))
    return paths


def sample_inputs(cache_folder: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((cache_folder / "samples.json").read_text())
    return doc


# -- brokers ---------------------------------------------------------------------------------


def _death_hook(die_with_parent: bool) -> Callable[[], None] | None:
    """``preexec_fn`` for a child that must not outlive this process: SIGTERM it when
    this process dies, even by SIGKILL (see :func:`fi_peer.chain.anvil.parent_death_hook`)."""
    if not die_with_parent:
        return None
    from fi_peer.chain.anvil import parent_death_hook

    return parent_death_hook(signal.SIGTERM)


def start_broker(folder: Path, *, die_with_parent: bool = False) -> tuple[str, int]:
    """A private MQTT broker on a free loopback port: (URL, pid)."""
    folder.mkdir(parents=True, exist_ok=True)
    mosquitto = next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if Path(p).is_file()), None
    )
    port = free_port()
    log = open(folder / "broker.log", "ab")  # noqa: SIM115 - handed to the child
    if mosquitto is not None:
        conf = folder / "mosquitto.conf"
        # set_tcp_nodelay: without it mosquitto's small messages wait on Nagle (+40 ms hops).
        conf.write_text(
            f"listener {port} {LOOPBACK}\nallow_anonymous true\npersistence false\n"
            "set_tcp_nodelay true\n"
        )
        cmd = [mosquitto, "-c", str(conf)]
    else:
        cmd = [sys.executable, "-m", "network.mqtt", "--host", LOOPBACK, "--port", str(port)]
    process = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        start_new_session=True,
        preexec_fn=_death_hook(die_with_parent),
    )
    log.close()
    wait_for(lambda: _port_open(port) or process.poll() is not None, 15, "the MQTT broker")
    if process.poll() is not None:
        raise RuntimeError(f"the MQTT broker exited; see {folder / 'broker.log'}")
    return f"mqtt://{LOOPBACK}:{port}", process.pid


# -- the network -----------------------------------------------------------------------------


@dataclass
class Peer:
    index: int
    state_dir: Path
    peer_id: str
    listen_port: int
    process: subprocess.Popen[bytes] | None = None
    pid: int | None = None

    @property
    def config(self) -> Path:
        return self.state_dir / "config.toml"

    @property
    def name(self) -> str:
        return f"peer-{self.index}"

    def client(self) -> ControlClient:
        return ControlClient(read_control_file(self.state_dir / "control.json"))


def libp2p_address(peer_id: str, port: int, host: str = LOOPBACK) -> str:
    from network.libp2p import to_libp2p_id

    return f"/ip4/{host}/tcp/{port}/p2p/{to_libp2p_id(peer_id).to_base58()}"


class LocalNetwork:
    """N daemons on this machine, each in its own process."""

    def __init__(
        self,
        folder: Path,
        *,
        transport: str = "libp2p",
        broker: str | None = None,
        announce_interval_ms: int = 2000,
        missed_beats: int = 3,
        offer_window_ms: int = 500,
        env: dict[str, str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        """``die_with_parent``: the daemons (and broker) get SIGTERM when this process
        dies, even by SIGKILL (a demo); off for ``start``, whose network outlives it."""
        if transport not in ("libp2p", "mqtt"):
            raise ValueError("transport must be libp2p or mqtt")
        self.folder = folder.resolve()
        self.transport = transport
        self.broker = broker
        self.broker_pid: int | None = None
        self.announce_interval_ms = announce_interval_ms
        self.missed_beats = missed_beats
        self.offer_window_ms = offer_window_ms
        self.env = env
        self.die_with_parent = die_with_parent
        self.peers: list[Peer] = []
        self.models: list[Path] = []

    @property
    def logs(self) -> Path:
        return self.folder / "logs"

    def prepare(self, models: list[Path]) -> None:
        """Write a state dir per model (identities are kept across runs)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        if self.transport == "mqtt" and self.broker is None:
            self.broker, self.broker_pid = start_broker(
                self.folder / "broker", die_with_parent=self.die_with_parent
            )
        self.models = list(models)
        self.peers = [self._peer(i) for i in range(len(models))]
        for peer in self.peers:
            self.write_config(peer)

    def _peer(self, index: int) -> Peer:
        state = self.folder / f"peer-{index}"
        keystore = state / "keystore.json"
        if keystore.is_file():
            identity = load_keystore(keystore, None)
        else:
            identity = Identity.generate()
            save_keystore(keystore, identity, None)
        return Peer(index, state, identity.peer_id, free_port())

    def add_peer(self, model: Path) -> Peer:
        """One more peer (not started), e.g. a late joiner."""
        self.models.append(model)
        peer = self._peer(len(self.peers))
        self.peers.append(peer)
        self.write_config(peer)
        return peer

    def write_config(self, peer: Peer) -> None:
        seeds = [p for p in self.peers[:2] if p is not peer][:1]
        bootstrap = tuple(libp2p_address(s.peer_id, s.listen_port) for s in seeds)
        config = PeerConfig(
            name=peer.name,
            net="localnet",
            keystore=Path("keystore.json"),
            encrypted=False,
            model=self.models[peer.index],
            transport=self.transport,
            listen=(f"/ip4/{LOOPBACK}/tcp/{peer.listen_port}",),
            bootstrap=bootstrap if self.transport == "libp2p" else (),
            broker=self.broker or "mqtt://127.0.0.1:1883",
            announce_interval_ms=self.announce_interval_ms,
            missed_beats=self.missed_beats,
            offer_window_ms=self.offer_window_ms,
            k=4,
            # A demo network: unlimited privacy budgets (like `fi-peer demo`); the
            # per-query epsilon, noise and secure aggregation are the defaults.
            per_querier_epsilon=math.inf,
            global_epsilon=math.inf,
        )
        write_config(peer.config, config)

    # -- processes --

    def start(self, peer: Peer) -> None:
        if peer.process is not None and peer.process.poll() is None:
            return
        (peer.state_dir / "control.json").unlink(missing_ok=True)
        log = open(self.logs / f"{peer.name}.log", "ab")  # noqa: SIM115 - handed to the child
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
        env.pop("FI_PEER_PASSPHRASE", None)
        peer.process = subprocess.Popen(
            [sys.executable, "-m", "fi_peer.cli", "run", "--config", str(peer.config)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=env,
            start_new_session=True,  # a ^C in the terminal is for the starter to handle
            preexec_fn=_death_hook(self.die_with_parent),
        )
        peer.pid = peer.process.pid
        log.close()

    def start_all(self) -> None:
        for peer in self.peers:
            self.start(peer)

    def status(self, peer: Peer) -> dict[str, Any] | None:
        """The daemon's /v1/status, or None while it is not answering."""
        if peer.process is not None and peer.process.poll() is not None:
            raise RuntimeError(
                f"{peer.name} exited with {peer.process.returncode}; "
                f"see {self.logs / (peer.name + '.log')}"
            )
        try:
            return peer.client().get("/v1/status", timeout=2.0)
        except (ControlError, FiPeerError):
            return None

    def wait_ready(self, peers: list[Peer] | None = None, timeout: float = 90.0) -> None:
        for peer in peers or self.peers:
            wait_for(functools.partial(self.status, peer), timeout, f"{peer.name} to answer")

    def known(self, peer: Peer) -> set[str]:
        """Peer ids in ``peer``'s membership table."""
        try:
            doc = peer.client().get("/v1/peers", timeout=2.0)
        except (ControlError, FiPeerError):
            return set()
        return {row["peer_id"] for row in doc.get("peers", [])}

    def wait_converged(self, peers: list[Peer] | None = None, timeout: float = 60.0) -> None:
        group = peers or [p for p in self.peers if self.running(p)]
        ids = {p.peer_id for p in group}

        def converged() -> bool:
            return all((ids - {p.peer_id}) <= self.known(p) for p in group)

        wait_for(converged, timeout, f"{len(group)} peers to discover each other", 0.2)

    def connections(self, peer: Peer) -> set[str]:
        """Peer ids ``peer`` knows AND has a live transport connection to."""
        try:
            doc = peer.client().get("/v1/peers", timeout=2.0)
        except (ControlError, FiPeerError):
            return set()
        return {row["peer_id"] for row in doc.get("peers", []) if row.get("connected")}

    def wait_connected(self, peers: list[Peer] | None = None, timeout: float = 60.0) -> None:
        """Every peer of the group knows and is connected to every other one."""
        group = peers or [p for p in self.peers if self.running(p)]
        ids = {p.peer_id for p in group}

        def connected() -> bool:
            return all((ids - {p.peer_id}) <= self.connections(p) for p in group)

        wait_for(connected, timeout, f"{len(group)} peers to connect to each other", 0.2)

    def running(self, peer: Peer) -> bool:
        return peer.process is not None and peer.process.poll() is None

    def signal(self, peer: Peer, sig: int) -> None:
        if peer.process is not None and peer.process.poll() is None:
            peer.process.send_signal(sig)

    def stop(self, peer: Peer, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; the exit code."""
        process = peer.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return process.returncode

    def stop_all(self) -> None:
        for peer in self.peers:
            self.signal(peer, signal.SIGTERM)
        for peer in self.peers:
            self.stop(peer)
        if self.broker_pid is not None:
            _terminate_pid(self.broker_pid)
            self.broker_pid = None

    # -- bookkeeping for the CLI --

    def save(self) -> None:
        doc = {
            "transport": self.transport,
            "broker": self.broker,
            "broker_pid": self.broker_pid,
            "peers": [
                {"name": p.name, "peer_id": p.peer_id, "pid": p.pid, "state_dir": str(p.state_dir)}
                for p in self.peers
            ],
        }
        (self.folder / "network.json").write_text(json.dumps(doc, indent=2) + "\n")


@dataclass(frozen=True, kw_only=True)
class PeerChain:
    """The ``[chain]`` table every peer of a :class:`PaidLocalNetwork` gets."""

    rpc_url: str
    deployment: Path  # the deployment.json of the escrow and registry
    accounts: Sequence[LocalAccount]  # peer i pays and is paid with accounts[i]
    price_wei: int  # its price and its max price
    settle_every_queries: int
    settle_every_s: float = 3.0


class PaidLocalNetwork(LocalNetwork):
    """A :class:`LocalNetwork` whose peers settle on chain: each writes its dev
    account's key to ``eth.key`` and has a ``[chain]`` table (auto-withdraw on)."""

    def __init__(self, folder: Path, *, chain: PeerChain, **kwargs: Any) -> None:
        super().__init__(folder, **kwargs)
        self.chain = chain

    def write_config(self, peer: Peer) -> None:
        super().write_config(peer)
        c = self.chain
        key_file = peer.state_dir / "eth.key"
        key_file.write_text(c.accounts[peer.index].key.hex())
        os.chmod(key_file, 0o600)
        chain = ChainConfig(
            rpc_url=c.rpc_url,
            deployment=c.deployment,
            eth_key_file=key_file,
            settle_every_queries=c.settle_every_queries,
            settle_every_s=c.settle_every_s,
            claim_every_s=1.0,
            settle_window_s=3600,
            auto_withdraw=True,
        )
        config = load_config(peer.config)
        write_config(
            peer.config,
            dataclasses.replace(
                config, chain=chain, price_wei=c.price_wei, max_price_wei=c.price_wei
            ),
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _terminate_pid(pid: int, timeout: float = 15.0) -> None:
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: not _alive(pid), timeout, f"process {pid} to exit")
    except RuntimeError:
        os.kill(pid, signal.SIGKILL)


# -- command line ----------------------------------------------------------------------------


def cmd_start(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    record = folder / "network.json"
    if record.is_file():
        doc = json.loads(record.read_text())
        if any(p.get("pid") and _alive(p["pid"]) for p in doc.get("peers", [])):
            print(f"a network is already running from {folder}; stop it first", file=sys.stderr)
            return 2
    models = ensure_models(folder / "models", args.peers, args.alpha, args.seed, args.epochs)
    net = LocalNetwork(folder, transport=args.transport, broker=args.broker)
    try:
        net.prepare(models)
        net.start_all()
        net.save()
        net.wait_ready(timeout=120)
        net.wait_connected(timeout=60)
    except (RuntimeError, FiPeerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        net.stop_all()
        return 1
    samples = models[0].parent / "samples.json"
    digit = folder / "digit.json"
    sample = sample_inputs(models[0].parent)
    digit.write_text(json.dumps({"input": sample["inputs"][0], "label": sample["labels"][0]}))
    print(f"{len(net.peers)} peers over {args.transport} are up; logs in {net.logs}/")
    for peer in net.peers:
        print(f"  {peer.name}  {peer.peer_id[:16]}  pid {peer.pid}  state {peer.state_dir}")
    print(f"\ntry:  fi-peer query {digit} --state-dir {net.peers[0].state_dir}")
    print(f"      fi-peer peers --state-dir {net.peers[1].state_dir}")
    print(f"more inputs with labels: {samples}")
    print(f"stop: python -m fi_peer.localnet stop --dir {folder}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    record = Path(args.dir) / "network.json"
    if not record.is_file():
        print(f"no network recorded in {args.dir}", file=sys.stderr)
        return 1
    doc = json.loads(record.read_text())
    pids = [p["pid"] for p in doc.get("peers", []) if p.get("pid")]
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
    for pid in pids:
        _terminate_pid(pid)
    if doc.get("broker_pid"):
        _terminate_pid(doc["broker_pid"])
    for peer in doc.get("peers", []):
        peer["pid"] = None
    doc["broker_pid"] = None
    record.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"stopped {len(pids)} peers")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    record = Path(args.dir) / "network.json"
    if not record.is_file():
        print(f"no network recorded in {args.dir}", file=sys.stderr)
        return 1
    doc = json.loads(record.read_text())
    for peer in doc.get("peers", []):
        state = "down"
        if peer.get("pid") and _alive(peer["pid"]):
            try:
                client = ControlClient(read_control_file(Path(peer["state_dir"]) / "control.json"))
                s = client.get("/v1/status", timeout=2.0)
                state = f"up, knows {s['membership']} peers, answered {s['answered']}"
            except FiPeerError as exc:
                state = f"running, control API: {exc}"
        print(f"{peer['name']}  {peer['peer_id'][:16]}  {state}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="train/cache models, write configs, start N daemons")
    start.add_argument("--peers", type=int, default=5)
    start.add_argument("--transport", choices=("libp2p", "mqtt"), default="libp2p")
    start.add_argument("--broker", help="use this mqtt:// broker instead of a private one")
    start.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the split")
    start.add_argument("--seed", type=int, default=1)
    start.add_argument("--epochs", type=int, default=30)
    for p in (
        start,
        sub.add_parser("stop", help="stop every daemon and the broker"),
        sub.add_parser("status", help="one line per peer"),
    ):
        p.add_argument("--dir", default="localnet", help="where state, logs, models live")
    args = parser.parse_args(argv)
    if args.command == "start":
        if not 2 <= args.peers <= 64:
            parser.error("--peers must be 2..64")
        return cmd_start(args)
    if args.command == "stop":
        return cmd_stop(args)
    return cmd_status(args)


if __name__ == "__main__":
    sys.exit(main())
