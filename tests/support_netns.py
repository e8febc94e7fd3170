"""Network namespaces for daemon tests: a bridged switch, one namespace per peer, and
``fi-peer`` daemons and commands run inside them.

``bridged_namespaces`` skips the test (with the reason the kernel gave) wherever
namespaces, bridges or veth pairs are refused (not root, no CAP_SYS_ADMIN, no
iproute2), and always removes what it created.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fi_peer.config import PeerConfig, write_config
from fi_peer.identity import Identity, save_keystore

PORT = 4001


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=False)


def must(*args: str) -> None:
    result = ip(*args)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr}"


@contextlib.contextmanager
def bridged_namespaces(tag: str, subnet: str, veths: Sequence[str]) -> Iterator[list[str]]:
    """Namespaces ``<tag>p<i>``, one per name in ``veths`` (its interface, at
    ``<subnet>.<i+1>/24``), joined by a bridge in the switch namespace ``<tag>s``."""
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_SYS_ADMIN)")
    switch = f"{tag}s"
    peers = [f"{tag}p{i}" for i in range(len(veths))]
    created: list[str] = []
    try:
        for name in (switch, *peers):
            result = ip("netns", "add", name)
            if result.returncode != 0:
                pytest.skip(f"the kernel refused `ip netns add`: {result.stderr.strip()}")
            created.append(name)
        result = ip("-n", switch, "link", "add", "br0", "type", "bridge")
        if result.returncode != 0:
            pytest.skip(f"the kernel refused a bridge: {result.stderr.strip()}")
        must("-n", switch, "link", "set", "br0", "up")
        for i, (name, veth) in enumerate(zip(peers, veths, strict=True)):
            result = ip("-n", switch, "link", "add", f"s{i}", "type", "veth", "peer", veth)
            if result.returncode != 0:
                pytest.skip(f"the kernel refused a veth pair: {result.stderr.strip()}")
            must("-n", switch, "link", "set", veth, "netns", name)
            must("-n", switch, "link", "set", f"s{i}", "master", "br0")
            must("-n", switch, "link", "set", f"s{i}", "up")
            must("-n", name, "addr", "add", f"{subnet}.{i + 1}/24", "dev", veth)
            must("-n", name, "link", "set", veth, "up")
            must("-n", name, "link", "set", "lo", "up")
        yield peers
    finally:
        for name in created:
            ip("netns", "del", name)  # takes its interfaces with it


def cli_in(ns: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``fi-peer <args>`` run in namespace ``ns``."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "fi_peer.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )


def write_configs(
    folder: Path,
    identities: Sequence[Identity],
    models: Sequence[Path],
    subnet: str,
    local_network: Any,
    **extra: Any,
) -> list[Path]:
    """A state dir ``peer-<i>`` (keystore, config.toml) for each identity: peer i
    listens on ``<subnet>.<i+1>``, the others bootstrap from peer 0; ``extra`` adds
    config fields. Returns the config files."""
    seed = local_network.libp2p_address(identities[0].peer_id, PORT, host=f"{subnet}.1")
    configs: list[Path] = []
    for i, identity in enumerate(identities):
        state = folder / f"peer-{i}"
        save_keystore(state / "keystore.json", identity, None)
        config = PeerConfig(
            name=f"ns-{i}",
            net="netns",
            encrypted=False,
            model=models[i],
            listen=(f"/ip4/{subnet}.{i + 1}/tcp/{PORT}",),
            bootstrap=(seed,) if i else (),
            announce_interval_ms=500,
            k=len(identities) - 1,
            per_querier_epsilon=math.inf,
            global_epsilon=math.inf,
            **extra,
        )
        write_config(state / "config.toml", config)
        configs.append(state / "config.toml")
    return configs


@dataclass
class Daemons:
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)  # exit codes, once stopped

    def assert_running(self) -> None:
        for process in self.processes:
            assert process.poll() is None, "a daemon exited early; see its daemon.log"


@contextlib.contextmanager
def daemons_in(namespaces: Sequence[str], configs: Sequence[Path]) -> Iterator[Daemons]:
    """``fi-peer run`` for each config in its namespace, logging to ``daemon.log`` beside
    it; stopped after the block (SIGTERM, SIGKILL after 20 s), exit codes in ``codes``."""
    daemons = Daemons()
    try:
        for ns, config in zip(namespaces, configs, strict=True):
            log = open(config.parent / "daemon.log", "wb")  # noqa: SIM115 - owned by the child
            command = ["ip", "netns", "exec", ns, sys.executable, "-m", "fi_peer.cli"]
            daemons.processes.append(
                subprocess.Popen(
                    [*command, "run", "--config", str(config)],
                    stdout=log,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                )
            )
            log.close()
        yield daemons
    finally:
        for process in daemons.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in daemons.processes:
            try:
                daemons.codes.append(process.wait(20))
            except subprocess.TimeoutExpired:
                process.kill()
                daemons.codes.append(process.wait(10))
