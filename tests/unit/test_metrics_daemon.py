"""A real daemon's /metrics and status after queries: counts, latencies, budget per querier.

Three daemons over the in-memory transport, each with its own privacy ledger;
the CLI's ``status`` and ``metrics`` commands are run against the first one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from typer.testing import CliRunner

from fi_peer.cli import app
from fi_peer.config import write_config
from fi_peer.daemon import announced_addresses
from fi_peer.models.data import load_digits_split
from tests.unit.test_daemon import (  # noqa: F401  (models: a fixture)
    Running,
    daemon_configs,
    models,
    running_daemons,
)
from tests.unit.test_metrics import _samples


@pytest_asyncio.fixture
async def ledgered(tmp_path: Path, models: list[Path]) -> AsyncIterator[list[Running]]:  # noqa: F811
    configs = daemon_configs(
        tmp_path, models, "m", net="metrics", per_querier_epsilon=20.0, global_epsilon=200.0
    )
    for config in configs:
        write_config(config.state_dir / "config.toml", config)
    async with running_daemons(
        models, configs, hub_seed=1, seed_prefix="metrics-test", ledgered=True
    ) as running:
        yield running


async def test_metrics_and_status_count_what_happened(ledgered: list[Running]) -> None:
    a, b, c = ledgered
    x = load_digits_split().X_test[:3].tolist()
    answer = await a.post("/v1/query", {"input": x, "rule": "evidence", "k": 2, "epsilon": 2.0})
    assert [r["ok"] for r in answer["results"]] == [True, True, True]

    text = await asyncio.to_thread(a.client().get_text, "/metrics")
    s = _samples(text)
    assert s['fi_peer_queries_total{outcome="ok"}'] == 3
    assert s['fi_peer_query_latency_seconds_count{outcome="ok"}'] == 3
    assert s['fi_peer_query_latency_seconds_bucket{outcome="ok",le="+Inf"}'] == 3
    assert s['fi_peer_query_protocol_latency_seconds_count{outcome="ok"}'] == 3
    assert s["fi_peer_peers_known"] == 2 and s["fi_peer_peers_connected"] == 2
    assert s['fi_peer_privacy_epsilon_budget{scope="global"}'] == 200.0
    # b answered a's three queries: receipts accepted, epsilon charged to a in b's ledger
    b_text = await asyncio.to_thread(b.client().get_text, "/metrics")
    b_samples = _samples(b_text)
    assert b_samples["fi_peer_queries_answered_total"] == 3
    assert b_samples["fi_peer_privacy_epsilon_spent"] > 0

    status = await b.get("/v1/status")
    privacy = status["privacy"]
    spent = privacy["global_epsilon_spent"]
    assert spent == b_samples["fi_peer_privacy_epsilon_spent"]
    assert privacy["global_epsilon_left"] == 200.0 - spent
    per = {row["peer_id"]: row for row in privacy["per_querier"]}
    assert set(per) == {a.daemon.peer_id, c.daemon.peer_id}
    assert per[a.daemon.peer_id]["spent"] == spent  # a is the only querier so far
    assert per[a.daemon.peer_id]["left"] == 20.0 - spent
    assert per[c.daemon.peer_id]["spent"] == 0.0 and per[c.daemon.peer_id]["left"] == 20.0
    assert status["chain"] == {"paid": False}

    # the CLI, as an owner runs it: rich tables and --json
    runner = CliRunner()
    state = str(b.daemon.config.state_dir)
    shown = await asyncio.to_thread(
        runner.invoke, app, ["status", "--state-dir", state], env={"COLUMNS": "200"}
    )
    assert shown.exit_code == 0, shown.output
    assert f"{spent:.2f}" in shown.output and f"{20.0 - spent:.2f}" in shown.output
    assert a.daemon.peer_id[:12] in shown.output and "peers (2)" in shown.output
    assert "queries are free" in shown.output
    as_json = await asyncio.to_thread(
        runner.invoke, app, ["status", "--state-dir", state, "--json"]
    )
    doc = json.loads(as_json.output)
    assert {p["peer_id"] for p in doc["peers"]} == {a.daemon.peer_id, c.daemon.peer_id}
    assert doc["privacy"]["per_querier"] == privacy["per_querier"]
    scraped = await asyncio.to_thread(runner.invoke, app, ["metrics", "--state-dir", state])
    assert scraped.exit_code == 0
    assert _samples(scraped.output)["fi_peer_queries_answered_total"] == 3


def test_announced_addresses_come_first_with_the_peer_id() -> None:
    listening = [
        "/ip4/10.0.0.5/tcp/4001/p2p/12D3KooWAbc",
        "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWAbc",
    ]
    got = announced_addresses(
        ["/ip4/198.51.100.4/tcp/4001", "/ip4/10.0.0.5/tcp/4001"], listening
    )
    assert got == [
        "/ip4/198.51.100.4/tcp/4001/p2p/12D3KooWAbc",
        "/ip4/10.0.0.5/tcp/4001/p2p/12D3KooWAbc",  # the same as a listening one: once
        "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWAbc",
    ]
    assert announced_addresses([], ["memory://x"]) == ["memory://x"]
    assert announced_addresses(["/ip4/1.2.3.4/tcp/1"], []) == ["/ip4/1.2.3.4/tcp/1"]
