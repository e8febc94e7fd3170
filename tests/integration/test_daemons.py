"""Five ``fi-peer run`` daemons as separate processes, over libp2p and over Mosquitto.

One network per transport (module scope: starting five processes that import
torch costs seconds on two cores); the tests run in file order on it:

1. queries from two different peers succeed, through the control API and the CLI;
2. a peer that joins late is discovered by everyone, and can query;
3. that peer leaves (SIGTERM): it shuts down cleanly and expires everywhere;
4. SIGKILL of one daemon never blocks a querier: its next query completes with
   the others or fails with a reason before its deadline; the dead peer expires;
5. SIGTERM stops every remaining daemon cleanly (exit 0) within seconds;
6. no daemon logged a traceback.

Everything is synchronised on the control API (``wait_for`` polls until a
deadline); nothing sleeps a fixed time. Loopback only.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.support import Mosquitto, require_mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ANNOUNCE_MS = 500
MISSED_BEATS = 3
EXPIRY_S = ANNOUNCE_MS * MISSED_BEATS / 1000
QUERY_TIMEOUT_S = 8.0


@pytest.fixture(scope="module", params=["libp2p", "mqtt"])
def network(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    owner_models: list[Path],
    local_network: Any,
) -> Iterator[Any]:
    transport = request.param
    folder = tmp_path_factory.mktemp(f"net-{transport}")
    broker: Mosquitto | None = None
    if transport == "mqtt":
        require_mosquitto()
        broker = Mosquitto(folder).start()
    net = local_network.LocalNetwork(
        folder / "net",
        transport=transport,
        broker=broker.url if broker else None,
        announce_interval_ms=ANNOUNCE_MS,
        missed_beats=MISSED_BEATS,
        offer_window_ms=1000,
    )
    try:
        net.prepare(owner_models[:5])
        net.start_all()
        net.wait_ready(timeout=120)
        net.wait_connected(timeout=60)
        yield net
    finally:
        net.stop_all()
        if broker is not None:
            broker.stop()


def ask(peer: Any, inputs: list[Any], *, k: int = 4, timeout_s: float = QUERY_TIMEOUT_S) -> Any:
    return peer.client().post(
        "/v1/query", {"input": inputs, "k": k, "timeout_s": timeout_s}, timeout=timeout_s + 10
    )


def diagnose(network: Any) -> str:
    """Every running daemon's counters, for failure messages."""
    lines = []
    for peer in network.peers:
        status = network.status(peer) if network.running(peer) else None
        if status is not None:
            metrics = {k: v for k, v in status["metrics"].items() if "announce" not in k}
            lines.append(
                f"{peer.name} connected={status['transport']['connected']} "
                f"known={status['membership']} {metrics} {status['transport']['stats']}"
            )
    return "\n".join(lines)


def test_queries_from_two_peers_succeed(network: Any, samples: dict[str, Any]) -> None:
    inputs, labels = samples["inputs"][:8], samples["labels"][:8]
    for querier in (network.peers[0], network.peers[3]):
        others = {p.peer_id for p in network.peers if p is not querier}
        answer = ask(querier, inputs)
        results = answer["results"]
        assert [r["reason"] for r in results] == ["ok"] * len(inputs), diagnose(network)
        for r in results:
            assert set(r["contributors"]) <= others
            assert len(r["contributors"]) >= 3  # the majority threshold of a committee of 4
            assert r["elapsed_ms"] < QUERY_TIMEOUT_S * 1000
        correct = sum(r["label"] == y for r, y in zip(results, labels, strict=True))
        assert correct >= 6, f"collective answered {correct}/8 correctly"


def test_fi_peer_query_cli_prints_answer_contributors_and_timings(
    network: Any, samples: dict[str, Any], tmp_path: Path
) -> None:
    digit = tmp_path / "digit.json"
    digit.write_text(json.dumps({"input": samples["inputs"][0]}))
    peer = network.peers[1]
    result = subprocess.run(
        [sys.executable, "-m", "fi_peer.cli", "query", str(digit), "--config", str(peer.config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"answer \d \(p=", result.stdout), result.stdout
    assert "contributors" in result.stdout and "timings" in result.stdout


def test_late_joiner_is_discovered_and_can_query(
    network: Any, owner_models: list[Path], samples: dict[str, Any]
) -> None:
    late = network.add_peer(owner_models[5])
    network.start(late)
    network.wait_ready([late], timeout=90)
    network.wait_connected([p for p in network.peers if network.running(p)], timeout=30)
    answer = ask(late, samples["inputs"][:2])
    assert [r["reason"] for r in answer["results"]] == ["ok", "ok"], diagnose(network)


def test_leaver_shuts_down_cleanly_and_expires(network: Any, local_network: Any) -> None:
    leaver = network.peers[5]
    started = time.monotonic()
    assert network.stop(leaver) == 0
    assert time.monotonic() - started < 10
    log = (network.logs / f"{leaver.name}.log").read_text()
    assert "shutting down" in log and "stopped" in log
    assert not (leaver.state_dir / "control.json").exists()
    others = [p for p in network.peers if network.running(p)]
    started = time.monotonic()
    local_network.wait_for(
        lambda: all(leaver.peer_id not in network.known(p) for p in others),
        EXPIRY_S + 15,
        "the leaver to expire everywhere",
    )
    assert time.monotonic() - started < EXPIRY_S + 15


def test_sigkill_never_blocks_a_querier(
    network: Any, local_network: Any, samples: dict[str, Any]
) -> None:
    victim, querier = network.peers[4], network.peers[0]
    network.signal(victim, signal.SIGKILL)
    started = time.monotonic()
    answer = ask(querier, samples["inputs"][:4], timeout_s=QUERY_TIMEOUT_S)
    took = time.monotonic() - started
    assert took < QUERY_TIMEOUT_S + 2.5, f"query took {took:.1f} s"
    for r in answer["results"]:
        if r["ok"]:
            assert victim.peer_id not in r["contributors"]
            assert len(r["contributors"]) >= 2
        else:
            assert r["reason"] and r["reason"] != "driver_timeout", r
    assert victim.process.wait(10) == -signal.SIGKILL
    local_network.wait_for(
        lambda: victim.peer_id not in network.known(querier),
        EXPIRY_S + 15,
        "the killed peer to expire",
    )
    answer = ask(querier, samples["inputs"][:2], k=3)
    assert [r["reason"] for r in answer["results"]] == ["ok", "ok"], diagnose(network)


def test_every_daemon_stops_cleanly_and_quickly_on_sigterm(network: Any) -> None:
    alive = [p for p in network.peers if network.running(p)]
    assert len(alive) == 4
    for peer in alive:
        network.signal(peer, signal.SIGTERM)
    started = time.monotonic()
    for peer in alive:
        assert peer.process.wait(15) == 0, f"{peer.name} exited uncleanly"
        assert "stopped" in (network.logs / f"{peer.name}.log").read_text()
        assert not (peer.state_dir / "control.json").exists()
    assert time.monotonic() - started < 12, "SIGTERM took too long to stop the daemons"


def test_no_daemon_logged_a_traceback(network: Any) -> None:
    for log in sorted(network.logs.glob("*.log")):
        text = log.read_text()
        assert "Traceback" not in text, f"{log.name}:\n{text[-3000:]}"
        assert "joined net" in text
