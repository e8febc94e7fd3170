"""Three daemons in three network namespaces on a virtual switch: traffic crosses interfaces.

The test creates (and always removes) one namespace per peer (``fi<pid>p<i>``,
address 10.231.0.<i+1>/24 on a veth) and a switch namespace (``fi<pid>s``)
whose bridge joins the other veth ends; it is skipped, with the reason the
kernel gave, where that is refused (not root, no CAP_SYS_ADMIN, no veth or
bridge support).
Each daemon runs under ``ip netns exec``, so its control API on 127.0.0.1 is
private to its namespace: the test talks to it with ``fi-peer`` commands run
in the same namespace, as a user on that machine would.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fi_peer.config import PeerConfig, write_config
from fi_peer.identity import Identity, save_keystore
from tests.integration.support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SUBNET = "10.231.0"
PORT = 4001
PEERS = 3


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=False)


@dataclass
class Namespaces:
    peers: list[str]
    veths: list[str]  # the peer-side interface in each peer namespace


def _must(*args: str) -> None:
    result = _ip(*args)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr}"


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_SYS_ADMIN)")
    tag = f"fi{os.getpid() % 1_000_000}"
    switch = f"{tag}s"
    ns = Namespaces([f"{tag}p{i}" for i in range(PEERS)], [f"{tag}p{i}" for i in range(PEERS)])
    created: list[str] = []
    try:
        for name in (switch, *ns.peers):
            result = _ip("netns", "add", name)
            if result.returncode != 0:
                pytest.skip(f"the kernel refused `ip netns add`: {result.stderr.strip()}")
            created.append(name)
        result = _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        if result.returncode != 0:
            pytest.skip(f"the kernel refused a bridge: {result.stderr.strip()}")
        _must("-n", switch, "link", "set", "br0", "up")
        for i, (name, veth) in enumerate(zip(ns.peers, ns.veths, strict=True)):
            result = _ip("-n", switch, "link", "add", f"s{i}", "type", "veth", "peer", veth)
            if result.returncode != 0:
                pytest.skip(f"the kernel refused a veth pair: {result.stderr.strip()}")
            _must("-n", switch, "link", "set", veth, "netns", name)
            _must("-n", switch, "link", "set", f"s{i}", "master", "br0")
            _must("-n", switch, "link", "set", f"s{i}", "up")
            _must("-n", name, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", veth)
            _must("-n", name, "link", "set", veth, "up")
            _must("-n", name, "link", "set", "lo", "up")
        yield ns
    finally:
        for name in created:
            _ip("netns", "del", name)  # takes its interfaces with it


def _in_ns(ns: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "fi_peer.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )


def _peers(ns: str, config: Path) -> list[dict[str, Any]]:
    result = _in_ns(ns, "peers", "--config", str(config), "--json")
    if result.returncode != 0:
        return []
    rows: list[dict[str, Any]] = json.loads(result.stdout)["peers"]
    return rows


def _counter(ns: str, veth: str, name: str) -> int:
    result = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{veth}/statistics/{name}"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return int(result.stdout)


def test_daemons_in_separate_namespaces_answer_a_query(
    namespaces: Namespaces,
    tmp_path: Path,
    owner_models: list[Path],
    samples: dict[str, Any],
    local_network: Any,
) -> None:
    ns = namespaces
    identities = [Identity.generate() for _ in range(PEERS)]
    ids = {identity.peer_id for identity in identities}
    configs: list[Path] = []
    seed = local_network.libp2p_address(identities[0].peer_id, PORT, host=f"{SUBNET}.1")
    for i, identity in enumerate(identities):
        state = tmp_path / f"peer-{i}"
        save_keystore(state / "keystore.json", identity, None)
        config = PeerConfig(
            name=f"ns-{i}",
            net="netns",
            encrypted=False,
            model=owner_models[i],
            listen=(f"/ip4/{SUBNET}.{i + 1}/tcp/{PORT}",),
            bootstrap=(seed,) if i else (),
            announce_interval_ms=500,
            k=PEERS - 1,
            per_querier_epsilon=math.inf,
            global_epsilon=math.inf,
        )
        write_config(state / "config.toml", config)
        configs.append(state / "config.toml")
    rx_before = _counter(ns.peers[0], ns.veths[0], "rx_bytes")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for name, config in zip(ns.peers, configs, strict=True):
            log = open(config.parent / "daemon.log", "wb")  # noqa: SIM115 - owned by the child
            command = ["ip", "netns", "exec", name, sys.executable, "-m", "fi_peer.cli"]
            processes.append(
                subprocess.Popen(
                    [*command, "run", "--config", str(config)],
                    stdout=log,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                )
            )
            log.close()

        def connected(i: int) -> bool:
            for process in processes:
                assert process.poll() is None, "a daemon exited early; see its daemon.log"
            rows = _peers(ns.peers[i], configs[i])
            return {r["peer_id"] for r in rows if r["connected"]} == ids - {identities[i].peer_id}

        for i in range(PEERS):
            wait_until(
                lambda i=i: connected(i), timeout=90, interval=0.3, what=f"peer {i} to connect"
            )
        rows = _peers(ns.peers[0], configs[0])
        assert sorted(r["addresses"][0].split("/")[2] for r in rows) == [
            f"{SUBNET}.{i + 1}" for i in range(1, PEERS)
        ]

        digit = tmp_path / "digit.json"
        digit.write_text(json.dumps({"input": samples["inputs"][0]}))
        querier = PEERS - 1
        result = _in_ns(
            ns.peers[querier], "query", str(digit), "--config", str(configs[querier]), "--json"
        )
        assert result.returncode == 0, result.stdout + result.stderr
        answer = json.loads(result.stdout)["results"][0]
        assert answer["ok"], answer
        assert set(answer["contributors"]) == ids - {identities[querier].peer_id}

        assert _counter(ns.peers[0], ns.veths[0], "rx_bytes") - rx_before > 1000
        assert _counter(ns.peers[querier], ns.veths[querier], "tx_bytes") > 1000
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = []
        for process in processes:
            try:
                codes.append(process.wait(20))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append(process.wait(10))
    assert codes == [0] * PEERS, "daemons did not shut down cleanly"
    for config in configs:
        assert "Traceback" not in (config.parent / "daemon.log").read_text()
