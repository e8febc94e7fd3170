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
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fi_peer.identity import Identity
from tests.integration.support import wait_until
from tests.support_netns import bridged_namespaces, cli_in, daemons_in, write_configs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SUBNET = "10.231.0"
PEERS = 3


@dataclass
class Namespaces:
    peers: list[str]
    veths: list[str]  # the peer-side interface in each peer namespace


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    tag = f"fi{os.getpid() % 1_000_000}"
    veths = [f"{tag}p{i}" for i in range(PEERS)]  # named as their namespaces
    with bridged_namespaces(tag, SUBNET, veths) as peers:
        yield Namespaces(peers, veths)


def _peers(ns: str, config: Path) -> list[dict[str, Any]]:
    result = cli_in(ns, "peers", "--config", str(config), "--json")
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
    configs = write_configs(tmp_path, identities, owner_models, SUBNET, local_network)
    rx_before = _counter(ns.peers[0], ns.veths[0], "rx_bytes")
    with daemons_in(ns.peers, configs) as daemons:

        def connected(i: int) -> bool:
            daemons.assert_running()
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
        result = cli_in(
            ns.peers[querier], "query", str(digit), "--config", str(configs[querier]), "--json"
        )
        assert result.returncode == 0, result.stdout + result.stderr
        answer = json.loads(result.stdout)["results"][0]
        assert answer["ok"], answer
        assert set(answer["contributors"]) == ids - {identities[querier].peer_id}

        assert _counter(ns.peers[0], ns.veths[0], "rx_bytes") - rx_before > 1000
        assert _counter(ns.peers[querier], ns.veths[querier], "tx_bytes") > 1000
    assert daemons.codes == [0] * PEERS, "daemons did not shut down cleanly"
    for config in configs:
        assert "Traceback" not in (config.parent / "daemon.log").read_text()
