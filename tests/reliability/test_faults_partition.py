"""A network partition heals and membership recovers.

In-process: four agents on the memory transport split two against two
(``MemoryHub.partition``): each side forgets the other after the missed
heartbeats, a query that needs the other side fails cleanly with its reason,
and once the partition heals every peer knows every other one again and a
query spans both sides.

Across interfaces (root with ``ip netns`` only, skipped otherwise): three
``fi-peer run`` daemons in three namespaces on a bridge; one peer's veth is set
down (a cable pulled), the others expire it, and after the link comes back up
they find each other again and it answers a query.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fi_peer.agent import Agent
from fi_peer.config import PeerConfig, write_config
from fi_peer.identity import Identity, save_keystore
from fi_peer.protocol.messages import ModelCard
from fi_peer.protocol.peer import CoreConfig, PeerCore
from fi_peer.protocol.querier import QuerierConfig
from network.memory import MemoryHub
from tests.integration.support import load_local_network, wait_until

CARD = ModelCard(
    task="toy", n_classes=3, input_dim=4, arch="toy", model_hash=b"\x01" * 32, rules=("vote",)
)
BEAT_MS = 100


class Toy:
    def __init__(self, i: int) -> None:
        self.i = i

    def contribution(self, X: np.ndarray, rule: str) -> np.ndarray:
        return np.tile(np.eye(3)[self.i % 3], (len(X), 1))

    def vector_length(self, rule: str) -> int:
        return 3


async def _eventually(check: Any, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _known(agent: Agent) -> set[str]:
    return {p.peer_id for p in agent.core.membership.peers()}


async def test_memory_partition_heals_and_membership_recovers() -> None:
    hub = MemoryHub()
    config = CoreConfig(
        net="part",
        announce_interval_ms=BEAT_MS,
        missed_beats=3,
        querier=QuerierConfig(offer_window_ms=300, min_committee=2),
    )
    agents = []
    for i in range(4):
        identity = Identity.from_seed(f"partition-{i}".encode())
        core = PeerCore(identity, CARD, config=config)
        agents.append(Agent(core, hub.transport(identity.peer_id), Toy(i)))
    ids = [a.peer_id for a in agents]
    try:
        for a in agents:
            await a.start()
        await _eventually(
            lambda: all(_known(a) == set(ids) - {a.peer_id} for a in agents), "all to meet"
        )
        left, right = ids[:2], ids[2:]
        hub.partition(left, right)
        # each side forgets the other after the missed heartbeats
        await _eventually(
            lambda: (
                all(_known(a) == set(left) - {a.peer_id} for a in agents[:2])
                and all(_known(a) == set(right) - {a.peer_id} for a in agents[2:])
            ),
            "each side to expire the other",
        )
        assert hub.stats["dropped_partition"] > 0
        cut = await agents[0].query(np.ones(4), rule="vote", k=3, timeout_s=2)
        assert not cut.ok and cut.reason == "too_few_offers_1"  # only its own side answered

        hub.heal()
        await _eventually(
            lambda: all(_known(a) == set(ids) - {a.peer_id} for a in agents),
            "membership to recover",
        )
        out = await agents[0].query(np.ones(4), rule="vote", k=3, timeout_s=3)
        assert out.ok, out.reason
        assert set(out.contributors) == set(ids[1:])
        assert out.total is not None
        # the toy members vote classes 1, 2, 0 and the querier 0: the sum says so
        assert np.allclose(out.total, [2, 1, 1], atol=1e-3)
    finally:
        for a in agents:
            await a.aclose()


# -- network namespaces ----------------------------------------------------------------------

SUBNET = "10.232.0"
PORT = 4001
PEERS = 3


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=False)


def _must(*args: str) -> None:
    result = _ip(*args)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr}"


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    """One namespace per peer (veth ``v<i>`` at 10.232.0.<i+1>) on a bridged switch."""
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_SYS_ADMIN)")
    tag = f"fp{os.getpid() % 1_000_000}"
    switch = f"{tag}s"
    peers = [f"{tag}p{i}" for i in range(PEERS)]
    created: list[str] = []
    try:
        for name in (switch, *peers):
            result = _ip("netns", "add", name)
            if result.returncode != 0:
                pytest.skip(f"the kernel refused `ip netns add`: {result.stderr.strip()}")
            created.append(name)
        result = _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        if result.returncode != 0:
            pytest.skip(f"the kernel refused a bridge: {result.stderr.strip()}")
        _must("-n", switch, "link", "set", "br0", "up")
        for i, name in enumerate(peers):
            result = _ip("-n", switch, "link", "add", f"s{i}", "type", "veth", "peer", f"v{i}")
            if result.returncode != 0:
                pytest.skip(f"the kernel refused a veth pair: {result.stderr.strip()}")
            _must("-n", switch, "link", "set", f"v{i}", "netns", name)
            _must("-n", switch, "link", "set", f"s{i}", "master", "br0")
            _must("-n", switch, "link", "set", f"s{i}", "up")
            _must("-n", name, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", f"v{i}")
            _must("-n", name, "link", "set", f"v{i}", "up")
            _must("-n", name, "link", "set", "lo", "up")
        yield peers
    finally:
        for name in created:
            _ip("netns", "del", name)


def _cli(ns: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "fi_peer.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )


def _log_count(config: Path, event: str, peer_id: str) -> int:
    """How often the daemon of ``config`` logged ``peer <event>: <peer>`` (its
    membership watcher's lines): read from its log, no process to spawn."""
    text = (config.parent / "daemon.log").read_text(errors="replace")
    return text.count(f"peer {event}: {peer_id[:12]}")


@pytest.mark.integration
@pytest.mark.slow
def test_netns_link_down_and_up_membership_recovers(
    namespaces: list[str], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    local_network = load_local_network()
    # trained once per session, shared with test_faults.py (same arguments)
    cache = tmp_path_factory.getbasetemp() / "reliability-models"
    models: list[Path] = local_network.ensure_models(cache, 6, 0.5, 1, 5)
    digit = local_network.sample_inputs(models[0].parent)["inputs"][0]
    identities = [Identity.generate() for _ in range(PEERS)]
    ids = [identity.peer_id for identity in identities]
    seed = local_network.libp2p_address(ids[0], PORT, host=f"{SUBNET}.1")
    configs: list[Path] = []
    for i, identity in enumerate(identities):
        state = tmp_path / f"peer-{i}"
        save_keystore(state / "keystore.json", identity, None)
        write_config(
            state / "config.toml",
            PeerConfig(
                name=f"ns-{i}",
                net="netns",
                encrypted=False,
                model=models[i],
                listen=(f"/ip4/{SUBNET}.{i + 1}/tcp/{PORT}",),
                bootstrap=(seed,) if i else (),
                announce_interval_ms=500,
                missed_beats=3,
                k=PEERS - 1,
                per_querier_epsilon=math.inf,
                global_epsilon=math.inf,
            ),
        )
        configs.append(state / "config.toml")
    processes: list[subprocess.Popen[bytes]] = []
    command = ["ip", "netns", "exec"]
    daemon = [sys.executable, "-m", "fi_peer.cli", "run"]
    try:
        for ns, config in zip(namespaces, configs, strict=True):
            log = open(config.parent / "daemon.log", "wb")  # noqa: SIM115 - owned by the child
            processes.append(
                subprocess.Popen(
                    [*command, ns, *daemon, "--config", str(config)],
                    stdout=log,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                )
            )
            log.close()

        def everyone_knows_everyone() -> bool:
            """Each daemon logged every other one joining more often than expiring."""
            for process in processes:
                assert process.poll() is None, "a daemon exited early; see its daemon.log"
            return all(
                _log_count(configs[i], "joined", ids[j]) > _log_count(configs[i], "expired", ids[j])
                for i in range(PEERS)
                for j in range(PEERS)
                if i != j
            )

        wait_until(everyone_knows_everyone, timeout=150, interval=0.2, what="all to meet")
        # pull peer 2's cable: the others expire it
        _must("-n", namespaces[2], "link", "set", "v2", "down")
        wait_until(
            lambda: all(_log_count(configs[i], "expired", ids[2]) == 1 for i in (0, 1)),
            timeout=30,
            interval=0.2,
            what="peer 2 to expire",
        )
        # plug it back: membership recovers everywhere, and peer 2 answers again
        _must("-n", namespaces[2], "link", "set", "v2", "up")
        wait_until(everyone_knows_everyone, timeout=60, interval=0.2, what="membership to recover")
        assert all(_log_count(configs[i], "joined", ids[2]) == 2 for i in (0, 1))
        query = tmp_path / "digit.json"
        query.write_text(json.dumps({"input": digit}))
        result = _cli(namespaces[0], "query", str(query), "--config", str(configs[0]), "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        answer = json.loads(result.stdout)["results"][0]
        assert answer["ok"], answer
        assert set(answer["contributors"]) == {ids[1], ids[2]}
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
